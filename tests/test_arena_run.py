"""arena.py run / report: config validation before anything trains (each error names the cell and
the field; bad model path, hub id not available offline, unknown method, impossible
hyperparameters), the paper configs validating offline up to model availability, a tiny toy grid
end to end (SFT and GRPO cells, a failing cell recorded while the grid goes on, rerun skips
finished cells, a half-trained cell resumes), `report` rebuilding identical tables from
cells/*.json alone (run and demo directories), and `report --paper`.

    OMP_NUM_THREADS=1 python -m pytest tests/test_arena_run.py -q      # ~30-40 s on one CPU thread
"""
import copy
import json
import math
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import arena

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


def _toy_config(tmp_path, **over):
    """configs/toy_grid.yaml shrunk to a handful of steps and items (plumbing, not results)."""
    cfg = arena.read_config(CONFIGS / "toy_grid.yaml")
    cfg["out"] = str(tmp_path / "run")
    cfg["train"]["sft"].update(n_train=16, global_batch=4, micro_batch=4, max_steps=3)
    cfg["train"]["grpo"].update(steps=1, prompts_per_step=2, group_size=2, max_new_tokens=8, num_prompts=8)
    cfg["eval"].update(n_per_family=4, max_new_tokens=24)
    cfg.update(over)
    return cfg


def _errors(cfg, **kw):
    return arena.validate_config(cfg, "config.yaml", **kw)["errors"]


# -----------------------------------------------------------------------------
# validation


def test_validation_errors_name_cell_and_field():
    cfg = {"model": "toy", "domains": ["math", "chemistry"], "paradigms": ["sft"], "typo": 1,
           "train": {"sft": {"lr": -1.0e-3, "max_step": 3}},
           "methods": [{"label": "Full FT", "method": "full"},
                       {"label": "LoRA r0", "method": "lora", "hparams": {"r": 0}},
                       {"label": "LoRA huge", "method": "lora", "hparams": {"r": 4096}},
                       {"label": "OFT b48", "method": "oft", "hparams": {"block_size": 48}},
                       {"label": "Mystery", "method": "lorax"},
                       {"label": "LoRA typo", "method": "lora", "hparams": {"rank": 8}}]}
    errs = _errors(cfg)
    joined = "\n".join(errs)
    # the hyperparameters are checked by peft_methods itself (apply_peft on the meta skeleton; its
    # HparamError names the field), the train settings by train_sft.resolve_config (ConfigError)
    assert any(e.startswith("config.yaml: cell sft/math/LoRA r0: methods[1].hparams.r = 0: lora: rank r=0 ")
               and "need 1 <= r <= min(d_in, d_out) = 128" in e for e in errs), joined
    # a rank above the layer's dimension, found on the meta skeleton (no weights loaded)
    assert any(e.startswith("config.yaml: cell sft/math/LoRA huge: methods[2].hparams.r = 4096: ")
               and "min(d_in, d_out) = 128" in e for e in errs), joined
    # OFT: the block size must divide every targeted layer's in-features (toy: 128 / 512)
    assert any(e.startswith("config.yaml: cell sft/math/OFT b48: methods[3].hparams.block_size = 48: ")
               and "does not divide d_in=128" in e for e in errs), joined
    unknown = [e for e in errs if "methods[4].method = 'lorax'" in e]
    assert unknown and "cell sft/math/Mystery" in unknown[0]
    for name in ("full", "lora", "oft", "keeplora"):
        assert name in unknown[0]                                   # the known methods are listed
    assert any("cell sft/math/LoRA typo: methods[5].hparams = {'rank': 8}: lora: unknown hyperparameter(s) "
               "['rank']" in e for e in errs), joined
    assert "config.yaml: cell sft/math/Full FT (+4 more): train.sft.lr = -0.001: --lr -0.001 must be > 0" in errs
    assert any(e.startswith("config.yaml: train.sft.max_step = 3: unknown train_sft.py setting")
               and "max_steps" in e for e in errs), joined
    assert any(e.startswith("config.yaml: domains[1] = 'chemistry': unknown") for e in errs), joined
    assert any(e.startswith("config.yaml: typo = 1: unknown key") for e in errs), joined


def test_bad_model_path_and_offline_hub_id_fail_clearly(monkeypatch):
    def no_network(*a, **k):
        raise AssertionError("validation must not open a network connection")
    monkeypatch.setattr(socket.socket, "connect", no_network)
    base = {"domains": ["math"], "paradigms": ["sft"], "methods": [{"method": "lora", "hparams": {"r": 8}}]}
    errs = _errors(dict(base, model="/nonexistent/peft-arena-model"))
    assert any(e.startswith("config.yaml: model = '/nonexistent/peft-arena-model': ")
               and "does not exist" in e for e in errs), errs
    errs = _errors(dict(base, model="no-such-org/no-such-model-peft-arena"))
    model_errs = [e for e in errs if e.startswith("config.yaml: model = 'no-such-org/no-such-model-peft-arena': ")]
    assert model_errs and "not in the Hugging Face cache" in model_errs[0] and "nothing is downloaded" in model_errs[0]
    # --allow-hub turns exactly that into a warning (load_model would download at run time)
    plan = arena.validate_config(dict(base, model="no-such-org/no-such-model-peft-arena", shapes="qwen2.5-7b",
                                      data={"math": {"sft": {"task": "toy-math"}}}), "c.yaml", allow_hub=True)
    assert plan["errors"] == [] and any("--allow-hub" in w for w in plan["warnings"])


@pytest.mark.parametrize("name,lora_r8", [("paper_qwen2.5-7b.yaml", "20.19M"),
                                          ("paper_llama-3.2-3b-instruct.yaml", "12.16M")])
def test_paper_configs_validate_offline_up_to_model_availability(name, lora_r8, capsys):
    plan = arena.validate_config(arena.read_config(CONFIGS / name), name)
    # offline the only possible problem is the model itself (hparams are checked on its shapes);
    # every cell fits one GPU of the node (issue 14 acceptance 4): GRPO Full FT through
    # `optimizer_offload: cpu` (fp32 masters + AdamW on the CPU), Full FT SFT through FSDP2
    assert all(e.startswith(f"{name}: model = ") for e in plan["errors"]), plan["errors"]
    unfit = [c["id"] for c in plan["cells"] if "memory" in c and not c["memory"]["fits"]]
    assert unfit == [], unfit
    assert all("memory" in c for c in plan["cells"] if c["paradigm"] != "base")
    offload = [c["id"] for c in plan["cells"] if c.get("train_resolved", {}).get("optimizer_offload") == "cpu"]
    assert offload == (["grpo/math/Full FT", "grpo/med/Full FT"] if "qwen2.5-7b" in name else []), offload
    assert all("CPU RAM" in c["memory"]["how"] for c in plan["cells"] if c["id"] in offload)
    cells = [c for c in plan["cells"] if c["paradigm"] != "base"]
    assert len(cells) == 2 * (18 + 3)                 # {math, med} x (18 SFT + 3 RLVR rows of the main table)
    counts = {c["id"]: arena._fmt_count(c["trainable_params"]) for c in cells}
    assert counts["sft/math/LoRA r8a16"] == lora_r8 and counts["grpo/med/LoRA r8a16"] == lora_r8
    code = arena.main(["run", "--config", str(CONFIGS / name), "--validate-only", "--threads", "1"])
    out = capsys.readouterr()
    assert code == (2 if plan["errors"] else 0)
    assert "sft/med/KeepLoRA r8" in out.out and "grpo/math/OFT b32" in out.out
    if plan["errors"]:
        assert f"{len(plan['errors'])} problem(s)" in out.err and "not in the Hugging Face cache" in out.err


def test_cli_refuses_a_bad_config_before_training(tmp_path):
    cfg = _toy_config(tmp_path)
    cfg["methods"] = [{"label": "LoRA r8", "method": "lora", "hparams": {"r": 0}, "paradigms": ["sft"]}]
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps(cfg))               # JSON is valid YAML
    out = subprocess.run([sys.executable, "arena.py", "run", "--config", str(path), "--threads", "1"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**__import__("os").environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 2, out.stdout + out.stderr
    assert "config.yaml: cell sft/math/LoRA r8: methods[0].hparams.r = 0: lora: rank r=0 is invalid" in out.stderr
    assert not (tmp_path / "run").exists()          # nothing was trained or written


def test_yaml_reads_dotless_exponents_as_floats(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  sft: {lr: 2e-4, epochs: 4}\n")
    assert arena.read_config(p)["train"]["sft"] == {"lr": 2e-4, "epochs": 4}


# -----------------------------------------------------------------------------
# the toy grid end to end


@pytest.mark.slow
def test_toy_grid_runs_records_failures_resumes_and_reports(toy, tmp_path, monkeypatch, capsys):
    import train_grpo
    import train_sft
    cfg = _toy_config(tmp_path)
    cfg["methods"] = [
        # fails at training time (its data file is missing: a warning at validation, not an error)
        {"label": "LoRA bad-data", "method": "lora", "hparams": {"r": 8}, "paradigms": ["sft"],
         "train": {"sft": {"task": None, "data": str(tmp_path / "missing.jsonl")}}},
        {"label": "LoRA r8", "method": "lora", "hparams": {"r": 8, "alpha": 16}},
    ]
    path = tmp_path / "grid.json"
    path.write_text(json.dumps(cfg))
    run = tmp_path / "run"
    code = arena.main(["run", "--config", str(path), "--threads", "1"])
    assert code == 1                                                 # a cell failed, the grid went on
    cells = run / "cells"
    assert sorted(p.name for p in cells.glob("*.json")) == [
        "base-math.json", "grpo-math-lora-r8.json", "sft-math-lora-bad-data.json", "sft-math-lora-r8.json"]
    bad = json.loads((cells / "sft-math-lora-bad-data.json").read_text())
    assert bad["status"] == "failed" and "missing.jsonl" in bad["error"]
    assert (run / bad["traceback"]).exists() and "Traceback" in (run / bad["traceback"]).read_text()

    res = json.loads((run / "results.json").read_text())
    assert res["kind"] == "arena-run" and res["failed"] == ["sft/math/LoRA bad-data"]
    ok = [r for r in res["rows"] if r["status"] == "ok"]
    assert [(r["paradigm"], r["method"]) for r in ok] == [("Base", "Base"), ("SFT", "LoRA r8"), ("GRPO", "LoRA r8")]
    for r in ok:
        for k in ("trainable_params", "target", "general", "target_gain", "forgetting"):
            assert isinstance(r[k], (int, float)) and math.isfinite(r[k]), (r["cell"], k)
        assert set(r["families"]) == {"ifeval", "nq", "bbh", "math", "med"}
    assert ok[0]["trainable_params"] == 1116288 and ok[1]["trainable_params"] == 90112
    assert (run / "results.csv").read_text().splitlines()[0] == ",".join(arena.RUN_CSV_COLS)
    md = (run / "leaderboard.md").read_text()
    assert "| SFT | LoRA r8 | 90.1K |" in md and "Failed cells" in md and "sft/math/LoRA bad-data" in md
    assert (run / "stability_plasticity.png").exists()
    assert json.loads((run / "config.json").read_text())["kind"] == "arena-run"

    # rerun: finished cells are skipped; only the failed one is tried again
    calls = []

    def fake_train(tc, **kw):
        calls.append(dict(tc))
        raise RuntimeError("still broken")
    monkeypatch.setattr(train_sft, "train", fake_train)
    monkeypatch.setattr(train_grpo, "train", fake_train)
    assert arena.main(["run", "--config", str(path), "--threads", "1"]) == 1
    assert [Path(c["out"]).name for c in calls] == ["lora-bad-data"]

    # a half-trained cell resumes through the training file's --resume
    ckpt = run / "sft" / "math" / "lora-r8"
    summary = (ckpt / "summary.json").read_text()
    (ckpt / "summary.json").unlink()
    (cells / "sft-math-lora-r8.json").unlink()
    calls.clear()

    def fake_resume(tc, **kw):
        calls.append(dict(tc))
        (Path(tc["out"]) / "summary.json").write_text(summary)     # "finish" the run
        return json.loads(summary)
    monkeypatch.setattr(train_sft, "train", fake_resume)
    arena.main(["run", "--config", str(path), "--threads", "1"])
    resumed = [c for c in calls if Path(c["out"]).name == "lora-r8"]
    assert resumed and resumed[0]["resume"] is True and resumed[0]["overwrite"] is False
    assert json.loads((cells / "sft-math-lora-r8.json").read_text())["status"] == "ok"

    # changed settings for a finished cell: refused before anything runs
    cfg2 = copy.deepcopy(cfg)
    cfg2["methods"][1]["hparams"]["alpha"] = 32
    path2 = tmp_path / "grid2.json"
    path2.write_text(json.dumps(cfg2))
    assert arena.main(["run", "--config", str(path2), "--threads", "1"]) == 2
    assert "finished earlier with different settings" in capsys.readouterr().err

    # report: the same tables from cells/*.json alone
    before = {f: (run / f).read_bytes() for f in ("results.json", "results.csv", "leaderboard.md")}
    for f in before:
        (run / f).unlink()
    (run / "config.json").unlink()
    assert arena.main(["report", str(run)]) == 0
    assert {f: (run / f).read_bytes() for f in before} == before

    # --paper on a toy run says clearly that nothing matches
    capsys.readouterr()
    assert arena.main(["report", str(run), "--paper"]) == 0
    out = capsys.readouterr().out
    assert "no row of this run matches a published PEFT-Arena cell" in out and "'toy'" in out
    assert "no row of this run matches" in (run / "leaderboard.md").read_text()


# -----------------------------------------------------------------------------
# report on hand-written cells (no training)


def _row(cell, index, paradigm, label, method, hp, target, general, domain="math", model="toy", params=1000):
    return {"cell": cell, "index": index, "status": "ok", "domain": domain, "paradigm": paradigm,
            "method": label, "peft_method": method, "hparams": hp, "model": model,
            "trainable_params": params, "target": target, "general": general,
            "target_gain": None, "forgetting": None, "families": {}}


def test_report_paper_columns_match_published_numbers(tmp_path):
    run = tmp_path / "qwen-run"
    (run / "cells").mkdir(parents=True)
    m = "/models/Qwen2.5-7B"
    rows = [_row("base/math", 0, "Base", "Base", "base", {}, 35.0, 47.0, model=m, params=7_615_616_512),
            _row("sft/math/LoRA r8a16", 1, "SFT", "LoRA r8a16", "lora", {"r": 8, "alpha": 16}, 42.0, 40.0, model=m),
            _row("sft/math/VeRA r64", 2, "SFT", "VeRA r64", "vera", {"r": 64}, 36.0, 46.0, model=m),
            _row("grpo/math/OFT b32", 3, "GRPO", "OFT b32", "oft", {"block_size": 32}, 48.0, 48.5, model=m)]
    for r in rows:
        r["target_gain"], r["forgetting"] = round(r["target"] - 35.0, 2), round(47.0 - r["general"], 2)
        (run / "cells" / (r["cell"].replace("/", "-") + ".json")).write_text(json.dumps(r))
    assert arena.main(["report", str(run), "--paper"]) == 0
    md = (run / "leaderboard.md").read_text()
    assert "| Base | Base | 7.62B |" in md and "| 7.61B | 35.30 | 46.97 |" in md      # the poster's main table
    assert "| SFT | LoRA r8a16 |" in md and "| 20.19M | 42.47 | 39.22 |" in md
    assert "| GRPO | OFT b32 |" in md and "| 8.49M | 48.37 | 48.90 |" in md           # RLVR row, poster count
    vera = [ln for ln in md.splitlines() if "VeRA r64" in ln][0]
    assert vera.endswith("| – | – | – |")                                             # the paper has r256 only
    assert "3 of 4 rows matched" in md and "poster main table (docs/static/pdfs/peft-arena-poster.pdf)" in md


def test_report_rebuilds_a_demo_directory(tmp_path):
    run = tmp_path / "demo"
    (run / "cells").mkdir(parents=True)
    base = {"domain": "math", "target_score": 33.0, "general_score": 97.2,
            "families": {"ifeval": {"score": 98.0}, "nq": {"score": 100.0}, "bbh": {"score": 93.6},
                         "math": {"score": 33.0}, "med": {"score": 23.0}}}
    (run / "cells" / "base.json").write_text(json.dumps(base))
    grpo = {"paradigm": "GRPO", "method": "OFT b16", "peft_method": "oft", "hparams": {"block_size": 16},
            "trainable_params": 38400, "target": 39.0, "general": 97.2, "target_gain": 6.0,
            "forgetting": 0.0, "families": {}, "train_seconds": 1.0}
    sft = dict(grpo, paradigm="SFT", method="LoRA r8", peft_method="lora", hparams={"r": 8, "alpha": 16},
               trainable_params=90112, target=82.0, general=93.3, target_gain=49.0, forgetting=3.9)
    (run / "cells" / "GRPO-oft-b16.json").write_text(json.dumps(grpo))
    (run / "cells" / "SFT-lora-r8.json").write_text(json.dumps(sft))
    (run / "cells" / "SFT-lora-r8.eval.json").write_text(json.dumps(base))    # evaluate.py output: not a row
    assert arena.main(["report", str(run)]) == 0
    lines = (run / "results.csv").read_text().splitlines()
    assert lines[0] == "paradigm,method,trainable_params,target,general,target_gain,forgetting"
    assert lines[1:] == ["Base,Base,1116288,33.0,97.2,0.0,0.0", "SFT,LoRA r8,90112,82.0,93.3,49.0,3.9",
                         "GRPO,OFT b16,38400,39.0,97.2,6.0,0.0"]
    assert (run / "leaderboard.md").read_text() == arena.leaderboard_markdown(
        json.loads((run / "results.json").read_text())["rows"])
    assert (run / "stability_plasticity.png").exists()


def test_help_lists_run_and_report():
    text = arena.build_parser().format_help()
    assert " run " in text and " report " in text
    sub = arena.build_parser()._subparsers._group_actions[0].choices
    run_help = sub["run"].format_help()
    assert "--validate-only" in run_help and "--allow-hub" in run_help
    assert "--paper" in sub["report"].format_help()


@pytest.mark.slow
def test_real_suite_path_on_fixture_benchmarks(toy, tmp_path):
    """eval.suite real through evaluate.py (the toy model on tests/fixtures/eval's few hand-written
    items in the hub formats): two domains, the base model's general suite scored once."""
    cfg = {"name": "real-path", "out": str(tmp_path / "run"), "model": "toy", "dtype": "float32",
           "device": "cpu", "domains": ["math", "med"], "paradigms": ["sft"],
           "train": {"sft": {"n_train": 8, "global_batch": 4, "micro_batch": 4, "max_steps": 1,
                             "lr": 3.0e-3, "save_every_steps": 0}},
           "methods": [{"label": "LoRA r8", "method": "lora", "hparams": {"r": 8, "alpha": 16}}],
           "eval": {"suite": "real", "data_dir": str(ROOT / "tests" / "fixtures" / "eval"), "limit": 1,
                    "max_new_tokens": 8, "num_samples": 1, "backend": "hf", "batch_size": 16}}
    path = tmp_path / "real.json"
    path.write_text(json.dumps(cfg))
    assert arena.main(["run", "--config", str(path), "--threads", "1"]) == 0
    run = tmp_path / "run"
    assert sorted(p.name for p in (run / "evals" / "base").iterdir()) == ["general", "math", "med"]
    rows = json.loads((run / "results.json").read_text())["rows"]
    assert [r["cell"] for r in rows] == ["base/math", "sft/math/LoRA r8", "base/med", "sft/med/LoRA r8"]
    assert set(rows[1]["families"]) == {"math500", "aime24", "amc23", "ifeval", "bbh", "nq"}
    assert set(rows[3]["families"]) == {"m1", "ifeval", "bbh", "nq"}
    assert rows[0]["general"] == rows[2]["general"]                  # one general suite for the base
    for r in rows:
        assert all(math.isfinite(r[k]) for k in ("target", "general", "target_gain", "forgetting"))
    assert (run / "stability_plasticity-math.png").exists() and (run / "stability_plasticity-med.png").exists()
