"""arena.py: the demo driver end to end on a test-only grid (one SFT cell, a handful of steps), the
output schema, finite numbers, resume on rerun, the report helpers, and the CLI help.

    python -m pytest tests/test_arena.py -q
"""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

import arena

ROOT = Path(__file__).resolve().parents[1]


def test_pareto_and_leaderboard():
    pts = [(0, 0), (30, 0), (34, -1), (30, -6), (10, -2)]
    assert arena.pareto_indices(pts) == [1, 2]
    md = arena.leaderboard_markdown([{"paradigm": "SFT", "method": "LoRA r8", "trainable_params": 90112,
                                      "target": 82.0, "general": 93.3, "target_gain": 49.0,
                                      "forgetting": 3.9}])
    assert md.splitlines()[0].startswith("| Train | Method | Tr. |") and "| SFT | LoRA r8 | 90.1K | 82.0 | 93.3 | +49.0 | +3.9 |" in md


def test_crowded_cluster_and_scatter_inset(tmp_path):
    """Methods whose labels would pile up are found (and only they) wherever they crowd: next to
    the base, or together at high gain; the scatter draws them in a zoomed inset without failing."""
    near_base = [(0, 0), (47, -20.5), (39, -2.6), (48, -3.8), (-1, 0), (2, 0), (4, -0.3), (3, -0.2),
                 (34, -22.1), (10, -0.3)]
    assert arena.crowded_cluster(near_base) == [0, 4, 5, 6, 7]
    high_gain = [(0, 0), (52, -17.9), (51, -1.9), (49, -7.0), (50, -0.7), (53, -0.2), (53, -1.2),
                 (27, 0.3), (46, -21.2), (52, 0.7), (23, 0.0), (53, 0.0), (41, -0.2), (33, -0.2)]
    assert arena.crowded_cluster(high_gain) == [2, 4, 5, 6, 9, 11]
    for k, pts in enumerate((near_base, high_gain)):
        rows = [{"paradigm": "Base" if i == 0 else ("GRPO" if i in (4, 5, 6) else "SFT"), "method": f"m{i}",
                 "target_gain": x, "forgetting": -y} for i, (x, y) in enumerate(pts)]
        png = tmp_path / f"s{k}.png"
        arena.plot_scatter(rows, png)
        assert png.stat().st_size > 10_000


@pytest.mark.slow
def test_demo_on_a_test_grid_writes_results_and_resumes(toy, tmp_path, monkeypatch):
    monkeypatch.setattr(arena, "SFT_CELLS", [("LoRA r8", "lora", {"r": 8, "alpha": 16})])
    monkeypatch.setattr(arena, "QUICK_SFT", {"LoRA r8"})
    monkeypatch.setattr(arena, "INTERP_CELLS", ["LoRA r8"])
    demo = {"full": dict(arena.DEMO["full"], quick_sft_steps=3, quick_n=4, quick_grid="0:1:1",
                         quick_grpo_steps=0),
            "sft": dict(arena.DEMO["sft"], global_batch=4, micro_batch=4, n_train=32)}
    monkeypatch.setattr(arena, "DEMO", demo)
    run = tmp_path / "demo"
    rows = arena.run_demo(run, domain="math", quick=True, log=lambda *a: None)
    assert [r["paradigm"] for r in rows] == ["Base", "SFT"]
    for f in ("results.json", "results.csv", "leaderboard.md", "stability_plasticity.png",
              "interpolation/results.json"):
        assert (run / f).exists(), f
    res = json.loads((run / "results.json").read_text())
    for r in res["rows"]:
        for k in ("trainable_params", "target", "general", "target_gain", "forgetting"):
            assert isinstance(r[k], (int, float)) and math.isfinite(r[k]), (r["method"], k)
    assert res["rows"][1]["trainable_params"] == 90112          # LoRA r8 on the toy base
    assert res["rows"][0]["forgetting"] == 0.0
    header = (run / "results.csv").read_text().splitlines()[0]
    assert header == "paradigm,method,trainable_params,target,general,target_gain,forgetting"

    # a rerun skips every finished cell: no training, same rows
    called = []
    import train_sft
    monkeypatch.setattr(train_sft, "train", lambda *a, **k: called.append(1))
    rows2 = arena.run_demo(run, domain="math", quick=True, log=lambda *a: None)
    assert not called and [r["target"] for r in rows2] == [r["target"] for r in rows]


def test_cli_help_lists_subcommands():
    out = subprocess.run([sys.executable, "arena.py", "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0
    for cmd in ("pretrain-toy", "calibrate", "demo"):
        assert cmd in out.stdout


def test_report_paper_model_comes_from_the_run_config(tmp_path, capsys):
    """`report --paper` on a run whose model path says nothing of the paper's models (a local copy)
    compares with the config's `paper_model` (saved in RUN/config.json); --paper-model still wins."""
    run = tmp_path / "run"
    (run / "cells").mkdir(parents=True)
    m = "/models/my-local-copy"                       # infer_paper_model cannot guess from this name
    base = {"cell": "base/math", "index": 0, "status": "ok", "domain": "math", "paradigm": "Base",
            "method": "Base", "peft_method": "base", "hparams": {}, "model": m, "trainable_params": 7_615_616_512,
            "target": 35.0, "general": 47.0, "target_gain": 0.0, "forgetting": 0.0, "families": {}}
    lora = dict(base, cell="sft/math/LoRA r8a16", index=1, paradigm="SFT", method="LoRA r8a16",
                peft_method="lora", hparams={"r": 8, "alpha": 16}, trainable_params=20_185_088,
                target=42.0, general=40.0, target_gain=7.0, forgetting=7.0)
    for r in (base, lora):
        (run / "cells" / (r["cell"].replace("/", "-") + ".json")).write_text(json.dumps(r))
    (run / "config.json").write_text(json.dumps({"kind": "arena-run", "config": {"model": m,
                                                                                 "paper_model": "qwen2.5-7b"}}))
    assert arena.main(["report", str(run), "--paper"]) == 0
    md = (run / "leaderboard.md").read_text()
    assert "2 of 2 rows matched" in md and "| 20.19M | 42.47 | 39.22 |" in md     # the poster's main table, Qwen column
    assert arena.main(["report", str(run), "--paper", "--paper-model", "llama-3.2-3b-instruct"]) == 0
    assert "Llama" in (run / "leaderboard.md").read_text()
