"""The real-model path as a new user meets it (issue 14, items 16, 18, 19, 20): data files in the
hubs' own layouts and their errors before any model loads, parquet through pyarrow alone, Full FT
checkpoints that are usable model folders, and one-line errors (full disk, read-only folder,
Ctrl-C, unreachable hub) instead of tracebacks.

    python -m pytest tests/test_real_path_ux.py -q

Nothing here touches the network: the unreachable hub is a closed port on 127.0.0.1.
"""
import errno
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import loading
import train_grpo as tg
import train_sft as ts

ROOT = Path(__file__).resolve().parents[1]

# MetaMathQA (meta-math/MetaMathQA, MetaMathQA-395K.json): one JSON array of these objects
METAMATHQA = [
    {"query": "What is the value of $x$ if $2x + 3 = 11$?", "original_question": "Solve $2x + 3 = 11$.",
     "type": "MATH_Rephrased", "response": "Subtracting 3 from both sides gives $2x = 8$, so $x = 4$.\n"
                                           "The answer is: 4"},
    {"query": "James buys 5 packs of beef that are 4 pounds each. How many pounds of beef did he buy?",
     "original_question": "James buys 5 packs of beef that are 4 pounds each. How many pounds?",
     "type": "GSM_Rephrased", "response": "He bought 5 * 4 = 20 pounds of beef.\nThe answer is: 20"},
]
# the release's veRL parquet rows (the PEFT-Arena release's SFT/RL data, SphereLab/PEFTArena-data): chat prompt, reward_model, extra_info
RELEASE_ROWS = [
    {"data_source": "openr1_math", "prompt": [{"role": "user", "content": f"What is {i} + {i}?"}],
     "ability": "math", "reward_model": {"style": "rule", "ground_truth": str(2 * i)},
     "extra_info": {"split": "train", "index": i, "question": f"What is {i} + {i}?",
                    "answer": f"{i} + {i} = {2 * i}. The answer is \\boxed{{{2 * i}}}."}}
    for i in range(3)]
# DeepScaleR-Preview-Dataset (agentica-org), as the hub's parquet export: problem / answer / solution
DEEPSCALER = [{"problem": "Find $1 + 2$.", "answer": "3", "solution": "$1 + 2 = 3$."},
              {"problem": "Find $2 \\cdot 5$.", "answer": "10", "solution": "$2 \\cdot 5 = 10$."}]


def _parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


@pytest.fixture
def no_model(monkeypatch):
    """loading.load_model fails the test if called: the data must be checked before any model loads."""
    def boom(*a, **k):
        raise AssertionError("the model was loaded before the data file was checked")
    monkeypatch.setattr(loading, "load_model", boom)


def _sft(tmp_path, data, **kw):
    return dict({"model": "toy", "method": "lora", "data": str(data), "out": str(tmp_path / "out"),
                 "global_batch": 2, "micro_batch": 1, "max_steps": 1, "no_progress": True}, **kw)


# -----------------------------------------------------------------------------
# Item 16: key mapping for common layouts, data errors before the model

def test_sft_key_flags_read_the_metamathqa_layout(tmp_path):
    data = tmp_path / "MetaMathQA-395K.json"
    data.write_text(json.dumps(METAMATHQA, indent=1))
    with pytest.raises(ValueError, match=r"MetaMathQA-395K\.json: item 0: row has no prompt.*--prompt-key query"):
        ts.load_pairs(ts.resolve_config(_sft(tmp_path, data)))
    pairs, stats = ts.load_pairs(ts.resolve_config(_sft(tmp_path, data, prompt_key="query", response_key="response")))
    assert pairs == [(r["query"], r["response"]) for r in METAMATHQA] and stats["n_rows"] == 2
    # dotted keys read nested fields (the release's extra_info.question / extra_info.answer)
    pq_file = _parquet(tmp_path / "train.parquet", RELEASE_ROWS)
    pairs, _ = ts.load_pairs(ts.resolve_config(_sft(tmp_path, pq_file, prompt_key="extra_info.question",
                                                    response_key="extra_info.answer")))
    assert pairs[1] == ("What is 1 + 1?", "1 + 1 = 2. The answer is \\boxed{2}.")


def test_sft_data_errors_come_before_the_model(tmp_path, no_model):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        ts.train(_sft(tmp_path, tmp_path / "nope.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(METAMATHQA[0]) + "\n{oops\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: malformed JSONL line"):
        ts.train(_sft(tmp_path, bad, prompt_key="query", overwrite=True))
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps(METAMATHQA[0]) + "\n" + json.dumps({"query": "q only"}) + "\n")
    with pytest.raises(ValueError, match=r"rows\.jsonl:2: --response-key 'response' is missing.*'query'"):
        ts.train(_sft(tmp_path, rows, prompt_key="query", response_key="response", overwrite=True))


def test_grpo_key_flags_and_data_errors_before_the_model(tmp_path, no_model):
    data = _parquet(tmp_path / "deepscaler.parquet", DEEPSCALER)
    with pytest.raises(ValueError, match=r"deepscaler\.parquet: row 0: needs 'prompt'.*--answer-key.*'problem'"):
        tg.load_rl_rows(tg.resolve_config({"data": data}))
    rows, domain = tg.load_rl_rows(tg.resolve_config({"data": data, "prompt_key": "problem", "answer_key": "answer"}))
    assert [(r["prompt"], r["answer"]) for r in rows] == [(r["problem"], r["answer"]) for r in DEEPSCALER]
    assert domain == "math"
    js = tmp_path / "deepscaler.json"                  # the hub's own file: one JSON array
    js.write_text(json.dumps(DEEPSCALER))
    rows2, _ = tg.load_rl_rows(tg.resolve_config({"data": str(js), "prompt_key": "problem", "answer_key": "answer"}))
    assert rows2 == rows
    # train(): the data error comes before the sampler engine and the model
    with pytest.raises(ValueError, match="row 0: needs"):
        tg.train({"data": data, "out": str(tmp_path / "g"), "steps": 1})
    with pytest.raises(FileNotFoundError, match="missing.parquet"):
        tg.train({"data": str(tmp_path / "missing.parquet"), "out": str(tmp_path / "g2"), "steps": 1})


# -----------------------------------------------------------------------------
# Item 18: one parquet reader (pyarrow, in requirements.txt), its absence said before the model

def test_parquet_needs_pyarrow_only(tmp_path, monkeypatch):
    path = _parquet(tmp_path / "train.parquet", RELEASE_ROWS)
    monkeypatch.setitem(sys.modules, "pandas", None)           # `import pandas` now fails
    pairs, _ = ts.load_pairs(ts.resolve_config(_sft(tmp_path, path)))
    assert pairs[2] == ("What is 2 + 2?", "2 + 2 = 4. The answer is \\boxed{4}.")
    rows, _ = tg.load_rl_rows(tg.resolve_config({"data": path}))
    assert rows[2]["answer"] == "4" and rows[2]["prompt"] == [{"role": "user", "content": "What is 2 + 2?"}]


def test_missing_pyarrow_is_a_clear_error_before_the_model(tmp_path, monkeypatch, no_model):
    path = _parquet(tmp_path / "train.parquet", RELEASE_ROWS)
    for mod in ("pyarrow", "pyarrow.parquet", "pandas"):
        monkeypatch.setitem(sys.modules, mod, None)
    with pytest.raises(ImportError, match=r"--data .*train\.parquet: reading \.parquet files needs pyarrow.*pip install"):
        ts.train(_sft(tmp_path, path))
    with pytest.raises(ImportError, match=r"train\.parquet: reading \.parquet files needs pyarrow"):
        tg.train({"data": path, "out": str(tmp_path / "g"), "steps": 1})


def test_requirements_name_pyarrow():
    reqs = [ln.split("#")[0].strip() for ln in (ROOT / "requirements.txt").read_text().splitlines()]
    assert any(r.startswith("pyarrow") for r in reqs)
    assert not any(r.startswith("pandas") for r in reqs)      # one parquet reader


# -----------------------------------------------------------------------------
# Item 19: a Full FT checkpoint is a usable model folder

def _full_ft_model(seed=0):
    import peft_methods as pm
    model, tok = loading.load_model("toy", dtype="float32", device="cpu")
    pm.apply_peft(model, "full")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1e-3 * torch.randn(p.shape, generator=g))
    return model, tok, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)


def _save_sft_full(tmp_path):
    model, tok, opt = _full_ft_model()
    ckpt = ts.save_checkpoint(tmp_path / "sft", 1, model, opt, {"step": 1},
                              {"method": "full", "keep_optimizer": "last"}, rank=0, world_size=1,
                              fsdp=False, base_spec="toy")
    return model, tok, ckpt


def test_full_ft_checkpoints_are_model_folders(tmp_path):
    from transformers import AutoTokenizer
    model, tok, ckpt = _save_sft_full(tmp_path)
    m2, _, opt = _full_ft_model(seed=1)
    ckpt_rl = tg.save_checkpoint(tmp_path / "rl", m2, opt, {"method": "full", "model": "toy"}, {"step": 1})
    text = "What is 12 + 30?"
    for ck in (ckpt, ckpt_rl):
        assert (Path(ck) / "generation_config.json").is_file()
        assert AutoTokenizer.from_pretrained(ck)(text)["input_ids"] == tok(text)["input_ids"]
        assert loading.load_tokenizer(str(ck))(text)["input_ids"] == tok(text)["input_ids"]
    loaded, _ = loading.load_model(str(ckpt), dtype="float32", device="cpu")
    want = model.state_dict()
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, want[k]), k


def test_evaluate_scores_a_full_ft_checkpoint_as_model(tmp_path):
    """The issue's reproduction: `evaluate.py --model <global_step_N>` used to fail with
    'You need to have sentencepiece or tiktoken installed'."""
    import evaluate
    _, _, ckpt = _save_sft_full(tmp_path)
    res = evaluate.main(["--model", str(ckpt), "--suite", "toy", "--n-per-family", "2",
                         "--families", "math", "--out", str(tmp_path / "ev")])
    assert res["families"]["math"]["n_items"] == 2


def test_old_checkpoints_without_tokenizer_files(tmp_path, tiny_random, capsys):
    _, tok, ckpt = _save_sft_full(tmp_path)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (Path(ckpt) / f).unlink(missing_ok=True)
    t2 = loading.load_tokenizer(str(ckpt))                           # the base's, recorded in the checkpoint
    assert t2("a b c")["input_ids"] == tok("a b c")["input_ids"]
    assert "using the tokenizer of its base model 'toy'" in capsys.readouterr().err
    model, _ = tiny_random
    model.save_pretrained(tmp_path / "weights_only")                # a HF dir without tokenizer files
    with pytest.raises(FileNotFoundError, match=r"weights_only has no tokenizer files .*copy them"):
        loading.load_model(str(tmp_path / "weights_only"))


def test_adapter_checkpoint_as_model_says_use_adapter(tmp_path):
    import peft_methods as pm
    model, _ = loading.load_model("toy", dtype="float32", device="cpu")
    pm.apply_peft(model, "lora", r=4)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    ckpt = ts.save_checkpoint(tmp_path / "run", 1, model, opt, {"step": 1}, {"method": "lora", "keep_optimizer": "last"},
                              rank=0, world_size=1, fsdp=False, base_spec="toy")
    with pytest.raises(ValueError, match=r"'lora' adapter checkpoint.*--model toy .*--adapter"):
        loading.load_model(str(ckpt))


# -----------------------------------------------------------------------------
# Item 20: one line for a full disk / read-only folder, Ctrl-C, an unreachable hub

def test_full_disk_and_read_only_folder_are_one_line_naming_the_path(tmp_path, monkeypatch, capsys):
    target = tmp_path / "run" / "results.json"

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    with monkeypatch.context() as m:
        m.setattr(os, "fsync", no_space)
        with pytest.raises(OSError, match=rf"cannot write {target}: No space left on device; the disk is full"):
            loading.atomic_write_json(target, {"a": 1})
    assert list(target.parent.iterdir()) == []                        # no temp file left behind

    def read_only(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system", str(tmp_path / "run"))
    with monkeypatch.context() as m:
        m.setattr(os, "replace", read_only)
        with pytest.raises(OSError, match=r"cannot write .*model\.safetensors: .*read-only: choose a writable --out"):
            loading.atomic_save_file({"w": torch.zeros(2)}, tmp_path / "run" / "model.safetensors")
        # a script entry point prints it as one line and exits 1
        with pytest.raises(SystemExit) as ex:
            loading.run_cli("evaluate.py", lambda: loading.atomic_write_text(target, "x"))
    assert ex.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"evaluate.py: error: cannot write {target}")
    # mkdir into a forbidden place (a raw OSError with a filename) is one line too
    with pytest.raises(SystemExit):
        loading.run_cli("x.py", lambda: (_ for _ in ()).throw(PermissionError(errno.EACCES, "Permission denied", "/root/x")))
    assert capsys.readouterr().err.strip() == ("x.py: error: cannot write /root/x: Permission denied; no permission "
                                               "to write there: choose a writable --out")


def _interrupt(script: str, args: list[str], tmp_path) -> subprocess.CompletedProcess:
    """Run `script args` as `python script` would, with Ctrl-C arriving at the first model load or
    result write (loading's functions, patched before the script imports them)."""
    code = ("import sys, runpy, loading\n"
            "def ctrl_c(*a, **k):\n    raise KeyboardInterrupt\n"
            "loading.load_model = loading.atomic_write_json = ctrl_c\n"
            f"sys.argv = [{script!r}] + {args!r}\n"
            f"runpy.run_path({script!r}, run_name='__main__')\n")
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=env)


@pytest.mark.parametrize("script,args,hint", [
    ("train_sft.py", ["--task", "toy-math", "--out", "{tmp}/sft"], "with --resume"),
    ("train_grpo.py", ["--out", "{tmp}/grpo"], "with --resume"),
    ("evaluate.py", ["--model", "toy", "--suite", "toy", "--out", "{tmp}/ev"], "generations"),
    ("geometry.py", ["--checkpoint", "toy_model", "--out", "{tmp}/geo"], "rerun the same command"),
    ("rewind.py", ["--smoke", "--out", "{tmp}/rw"], "rerun the same command"),
    ("arena.py", ["calibrate", "--n", "1"], "finished cells are kept"),
])
def test_ctrl_c_is_one_line_saying_how_to_resume(script, args, hint, tmp_path):
    out = _interrupt(script, [a.replace("{tmp}", str(tmp_path)) for a in args], tmp_path)
    assert out.returncode == 130, out.stderr[-2000:]
    assert "Traceback" not in out.stderr, out.stderr[-2000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith(f"{script}: interrupted (Ctrl-C)") and hint in last, last


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_hub_fails_in_seconds_naming_the_id(tmp_path):
    """Old: ~50 s of retries. The hub endpoint is a closed local port (no network is touched)."""
    env = dict(os.environ, HF_ENDPOINT=f"http://127.0.0.1:{_closed_port()}", HF_HOME=str(tmp_path / "hf"),
               HF_HUB_OFFLINE="0", TRANSFORMERS_OFFLINE="0", OMP_NUM_THREADS="1")
    t0 = time.time()
    out = subprocess.run([sys.executable, "evaluate.py", "--model", "someorg/no-such-model", "--suite", "toy",
                          "--out", str(tmp_path / "ev")], cwd=ROOT, capture_output=True, text=True,
                         timeout=40, env=env)
    seconds = time.time() - t0
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("evaluate.py: error: could not load model 'someorg/no-such-model'") and "--model" in last
    assert seconds < 20, seconds            # interpreter + torch import included; the error itself takes ~1 s


def test_offline_hub_id_fails_fast(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    t0 = time.time()
    with pytest.raises(OSError, match=r"could not load model 'someorg/no-such-model'.*HF_HUB_OFFLINE.*--model"):
        loading.load_model("someorg/no-such-model")
    assert time.time() - t0 < 5


@pytest.mark.parametrize("args,needle", [
    (["--model", "{tmp}/no-such-model", "--suite", "math", "--data-dir", "tests/fixtures/eval"],
     "model path '{tmp}/no-such-model' does not exist"),
    (["--model", "toy", "--suite", "math", "--data-dir", "{tmp}/empty"],
     "benchmark 'math500': no local data found"),
])
def test_evaluate_missing_model_or_data_is_one_line(args, needle, tmp_path):
    """Item 20: a missing --model folder (old: FileNotFoundError traceback from loading.resolve_spec)
    and missing benchmark data (old: DatasetMissing traceback) are one line each, exit code 1."""
    (tmp_path / "empty").mkdir()
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    out = subprocess.run([sys.executable, "evaluate.py", *args, "--out", str(tmp_path / "ev")], cwd=ROOT,
                         capture_output=True, text=True, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("evaluate.py: error: ") and needle.replace("{tmp}", str(tmp_path)) in last, last
