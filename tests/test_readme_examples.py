"""The README's "Add your own method" example, pasted into a copy of the repo, gets SFT, evaluation,
geometry, rewinding and the generic tests without another file touched (issue 17, acceptance 4).

The copy holds the product files, tests and the committed toy model; the README's two code blocks
are appended to its peft_methods.py exactly as written, and every CLI then runs with
`--method lora_fa` (or on its checkpoint) in a fresh process, as a forker would run them.
"""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def readme_section(title: str) -> str:
    """The text of README section `## <title>` up to the next `## ` heading."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    m = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## )", text, re.S | re.M)
    assert m, f"README.md has no section '## {title}'"
    return m.group(1)


def python_blocks(section: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", section, re.S)


def paste_method_into_copy(dst: Path) -> Path:
    """A copy of the repo in dst with the README's method pasted at the end of peft_methods.py."""
    dst.mkdir()
    for p in ROOT.iterdir():
        if p.suffix == ".py" or p.name in ("tests", "toy_model", "configs", "pytest.ini", "README.md"):
            if p.is_dir():
                shutil.copytree(p, dst / p.name, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy2(p, dst / p.name)
    blocks = python_blocks(readme_section("Add your own method"))
    assert len(blocks) == 2, "the README example is a method block and a registry entry"
    with open(dst / "peft_methods.py", "a", encoding="utf-8") as f:
        f.write("\n\n" + "\n\n".join(blocks))
    return dst


def run(cwd: Path, *args: str, timeout: int = 600) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONHASHSEED": "0"}
    r = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, f"{' '.join(args)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout + r.stderr


@pytest.mark.slow
def test_readme_method_pasted_in_gets_sft_eval_geometry_rewind_and_the_generic_tests(tmp_path):
    repo = paste_method_into_copy(tmp_path / "repo")
    run(repo, "-c", "import peft_methods as pm; assert 'lora_fa' in pm.METHODS")
    # SFT: a tiny run on the toy model, checkpoints in runs/sft/global_step_<k>/
    run(repo, "train_sft.py", "--smoke", "--model", "toy", "--method", "lora_fa", "--r", "4",
        "--out", "runs/sft", "--no-progress")
    ckpts = sorted((repo / "runs/sft").glob("global_step_*"))
    assert ckpts, "SFT wrote no checkpoint"
    # evaluation of the adapter checkpoint on the toy suite
    run(repo, "evaluate.py", "--model", "toy", "--adapter", str(ckpts[-1]), "--suite", "toy",
        "--n-per-family", "4", "--out", "runs/eval")
    assert (repo / "runs/eval").exists()
    # geometry: weight spectra and activation geometry of the checkpoint
    run(repo, "geometry.py", "--checkpoint", str(ckpts[-1]), "--max-prompts", "8", "--max-tokens", "64",
        "--out", "runs/geom", "--no-plots")
    assert any((repo / "runs/geom").iterdir())
    # rewinding: interpolation toward the base over the run
    run(repo, "rewind.py", "--checkpoint", "runs/sft", "--grid", "0,1", "--n-per-family", "4",
        "--rewind", "uniform=0.5", "--out", "runs/rewind")
    assert (repo / "runs/rewind").exists()
    # the generic tests pick the method up from the registry
    out = run(repo, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "lora_fa",
              "tests/test_peft_methods.py", "tests/test_rewind.py", "tests/test_train_sft.py")
    n_passed = int(re.search(r"(\d+) passed", out).group(1))
    assert n_passed >= 10 and "failed" not in out, out[-2000:]
