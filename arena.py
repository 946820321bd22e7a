"""arena.py — the PEFT-Arena command line: build the miniature world, score models on both axes,
run the arena's grids (toy demo, or any model from a config file) and rebuild their reports.

    python arena.py --help
    python arena.py pretrain-toy              # re-create the committed toy base (CPU)
    python arena.py calibrate                 # both-axis scores of the toy base (README table)
    python arena.py demo                      # the paper's story on the toy world
    python arena.py run --config configs/toy_grid.yaml                      # a config grid (CPU)
    python arena.py run --config configs/paper_qwen2.5-7b.yaml --validate-only   # plan + checks only
    python arena.py run --config configs/paper_qwen2.5-7b.yaml              # the paper's grid (GPU)
    python arena.py report runs/toy-grid [--paper]   # tables + scatter again, from cells/*.json alone

Paper: PEFT-Arena (Huang et al. 2026, arXiv 2605.28819), its thesis that PEFT is a stability-
plasticity trade-off: every model gets a Target score (plasticity) and a General score (stability,
the mean of BBH, IFEval and NQ), over the grid {Qwen2.5-7B, Llama-3.2-3B-Instruct} x {math, medical}
x {SFT, RLVR} x methods of its main table (the release's poster, docs/static/pdfs/peft-arena-poster.pdf;
"the release" = github.com/Sphere-AI-Lab/PEFT-Arena). Nothing imports this file: training,
evaluation and analysis files stand on their own, and this file only calls them.

`run` reads one YAML/JSON config (model, domains, paradigms, methods with hyperparameters,
train_sft/train_grpo settings, evaluation suite, budget; keys documented in configs/toy_grid.yaml),
checks all of it before anything trains, then runs the cells in order. Each cell writes
RUN/cells/<paradigm>-<domain>-<label>.json (status ok with the scores, or failed with the error and
a traceback file); a rerun skips finished cells, resumes half-trained ones through the training
file's --resume, and retries failed ones. Exit code: 0 all cells done, 1 a cell failed (the grid
went on), 2 the config is invalid (nothing trained), 3 budget.max_minutes reached (rerun to continue).

Deviations (they change a number the paper reports)
1. The toy world (toy_world.py) stands in for the paper's benchmarks on CPU; see its docstring.
2. Demo: VeRA's paper rank 256 exceeds the toy's 128-wide layers, so the toy uses r = 64.
3. Demo: the toy needs larger learning rates and far fewer steps than the paper's 2e-4 x 4 epochs
   (DEMO holds the toy budgets).

Implementation notes
1. `run` trains its cells one after another; the paper trains every cell on one 8-GPU node with
   FSDP (the release's train/train_sft.sh, train/train_rl.sh). With `gpus: N > 1`, Full FT SFT cells
   run under `torchrun --nproc_per_node N train_sft.py` (FSDP2); every other cell trains in this
   process on one GPU (train_grpo.py has no multi-GPU path: GRPO Full FT of a 7B model fits only with
   `optimizer_offload: cpu`, which the memory plan checks). A cell trained elsewhere into
   RUN/<paradigm>/<domain>/<label> is found finished and only scored.
2. Validation is the training scripts' own config checks (their parsers, resolve_config, and
   peft_methods.apply_peft on the meta device) plus what only a grid has (cells, labels, domains).
   Ranks and block sizes are checked on a 1-layer copy of the architecture (every decoder layer of
   Qwen2 / Llama has the same Linear shapes); weights are never loaded. For a real model it also
   plans memory (memory.py: fake tensors at the real shapes, one training step, 1-2 layers
   extrapolated) and refuses a cell whose per-GPU peak (+ vLLM's share for GRPO) exceeds 92% of
   `gpu_memory_gib`. Missing training-data or benchmark files are warnings: they are read only when
   a cell trains or is scored, and a cell that then fails is recorded as failed.
3. `run` scores each checkpoint with one evaluate.py call per suite (the domain's target suite,
   then the general suite), so a real model is loaded twice per cell; the base model's general
   suite is scored once and shared by both domains. The toy suite scores everything in one pass.
4. `report --paper` compares with the poster's main table (KeepLoRA from the web version,
   docs/index.html); the poster's own anomalies (e.g. RLVR "OFT b32" listing the b16 count) are kept.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import gc
import hashlib
import json
import re
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch
import transformers
import yaml
from huggingface_hub import try_to_load_from_cache

import evaluate
import geometry
import loading
import memory
import peft_methods
import rewind
import toy_world
import train_grpo
import train_sft
from loading import REPO_DIR, TOY_MODEL_DIR, atomic_write_csv, atomic_write_json, atomic_write_text

# -----------------------------------------------------------------------------
# pretrain-toy and calibrate: the toy base and its both-axis scores


def cmd_pretrain_toy(args) -> int:
    d = toy_world.PRETRAIN_DEFAULTS
    args.steps, args.batch_size, args.lr = args.steps or d["steps"], args.batch_size or d["batch_size"], args.lr or d["lr"]
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    print(f"pretraining the toy base: {args.steps} steps x {args.batch_size} sequences, seed "
          f"{args.seed} -> {out}", flush=True)
    summary = toy_world.pretrain(out, seed=args.seed, steps=args.steps, batch_size=args.batch_size,
                                 lr=args.lr, progress=not args.no_progress)
    print(f"done in {summary['train_seconds']:.0f} s; {summary['params']:,} parameters; final loss "
          f"{summary['log'][-1]['loss']}")
    if not args.skip_calibration:
        return cmd_calibrate(argparse.Namespace(model=str(out), n=args.n, out=None, domain="math",
                                                threads=args.threads, batch_size=128))
    return 0


def calibration_table(res_math: dict, res_med: dict) -> str:
    fam = res_math["families"]
    rows = [("general (mean of 3)", res_math["general_score"])]
    rows += [(f"  {f}", fam[f]["score"]) for f in ("ifeval", "nq", "bbh")]
    rows += [("target: math", res_math["target_score"]), ("target: med", res_med["target_score"])]
    w = max(len(r[0]) for r in rows)
    return "\n".join(f"{name:<{w}}  {score:6.1f}" for name, score in rows)


def cmd_calibrate(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = loading.load_model(args.model, device="cpu", dtype="float32")
    t0 = time.time()
    # one pass scores all five toy families; the med target is read off the same result
    res = evaluate.evaluate_toy(model, tok, domain="math", n_per_family=args.n,
                                batch_size=args.batch_size)
    res_med = dict(res)
    res_med["target_score"] = res["families"]["med"]["score"]
    dt = time.time() - t0
    print(f"toy calibration of {args.model} ({args.n} held-out test items per family, greedy; "
          f"{dt:.0f} s):")
    print(calibration_table(res, res_med))
    # the toy base must know the general families and leave room to learn on both targets
    ok = (res["general_score"] >= 85 and 15 <= res["families"]["math"]["score"] <= 50
          and 15 <= res["families"]["med"]["score"] <= 50)
    print("calibration bar (general >= 85, each target in [15, 50]):", "met" if ok else "NOT met")
    if args.out:
        atomic_write_json(Path(args.out), {"model": args.model, "n_per_family": args.n,
                                           "seconds": round(dt, 1), "results": res})
    return 0


# -----------------------------------------------------------------------------
# demo: the paper's main table in miniature (the poster's layout), every cell resumable

# (label, method, hyperparameters): the main table's SFT rows on the toy base.
# VeRA's paper rank 256 exceeds the toy's 128-wide layers, so the toy uses r = 64 (DEVIATION 2).
SFT_CELLS = [
    ("Full FT", "full", {}),
    ("OFT b16", "oft", {"block_size": 16}),
    ("OFT b32", "oft", {"block_size": 32}),
    ("LoRA r4", "lora", {"r": 4, "alpha": 8}),
    ("LoRA r8", "lora", {"r": 8, "alpha": 16}),
    ("LoRA r16", "lora", {"r": 16, "alpha": 32}),
    ("AdaLoRA r8", "adalora", {}),
    ("PiSSA r8", "pissa", {"r": 8, "alpha": 16}),
    ("MiLoRA r8", "milora", {"r": 8, "alpha": 16}),
    ("MiSS r8", "miss", {"r": 8}),
    ("VeRA r64", "vera", {"r": 64}),
    ("DoRA r8", "dora", {"r": 8, "alpha": 16}),
    ("IA3", "ia3", {}),
    ("KeepLoRA r8", "keeplora", {"r": 8, "alpha": 16}),
]
GRPO_CELLS = [("Full FT", "full", {}), ("OFT b16", "oft", {"block_size": 16}),
              ("LoRA r8", "lora", {"r": 8, "alpha": 16})]
QUICK_SFT = {"Full FT", "OFT b16", "LoRA r8"}
INTERP_CELLS = ["Full FT", "LoRA r8", "OFT b16"]

# Toy-world budgets (DEVIATION 3: larger learning rates and far fewer steps than the paper's
# 2e-4 x 4 epochs of 50k samples), sized for a laptop CPU (README: timings): 14 SFT cells x 120
# steps, 3 GRPO cells x 12 rollout steps, 100 test items per family, interpolation grid 0:1:0.2.
DEMO = {
    "full": dict(sft_steps=120, quick_sft_steps=60, n_per_family=100, quick_n=50,
                 grpo_steps=12, quick_grpo_steps=0, grid="0:1:0.2", quick_grid="0:1:0.5"),
    "sft": dict(global_batch=16, micro_batch=16, lr_full=1e-3, lr_peft=3e-3, n_train=2000),
    # GRPO uses train_grpo.TOY_PRESET (batch, G, lengths, learning rates)
}


def slug(label: str) -> str:
    return label.lower().replace(" ", "-")


def _cell_path(run: Path, paradigm: str, label: str) -> Path:
    return run / "cells" / f"{paradigm}-{slug(label)}.json"


def _finished(ckpt_root: Path) -> Path | None:
    """The final checkpoint of a finished training run (summary.json present), else None."""
    if not (ckpt_root / "summary.json").exists():
        return None
    steps = sorted(ckpt_root.glob("global_step_*"), key=lambda p: int(p.name.rsplit("_", 1)[1]))
    return steps[-1] if steps else None


def _score_checkpoint(ckpt: Path | None, *, domain, n, base_general):
    """Load the toy base (+ adapter or full weights in `ckpt`) and score it on both axes."""
    model, tok = loading.load_model("toy", device="cpu", dtype="float32")
    if ckpt is not None:
        peft_methods.load_adapter(model, ckpt)
    return evaluate.evaluate_toy(model, tok, domain=domain, n_per_family=n,
                                 base_general=base_general, batch_size=128)


def _row(paradigm, label, method, hp, res, base, params, seconds):
    """One leaderboard row: the two axes, and both measured against the base model (the paper's
    Target gain = plasticity, Forgetting = base General - General = lost stability)."""
    return {"paradigm": paradigm, "method": label, "peft_method": method, "hparams": hp,
            "trainable_params": params, "target": round(res["target_score"], 2),
            "general": round(res["general_score"], 2),
            "target_gain": round(res["target_score"] - base["target_score"], 2),
            "forgetting": round(base["general_score"] - res["general_score"], 2),
            "families": {f: round(v["score"], 2) for f, v in res["families"].items()},
            "train_seconds": seconds}


def _train_demo_cell(paradigm: str, method: str, hp: dict, ckpt_root: Path, *, domain: str,
                     quick: bool) -> None:
    """train_sft.train / train_grpo.train of one demo cell into ckpt_root (resumed if started)."""
    P = DEMO["full"]
    resume = ckpt_root.exists() and any(ckpt_root.glob("global_step_*"))
    if paradigm == "SFT":
        S = DEMO["sft"]
        steps = P["quick_sft_steps"] if quick else P["sft_steps"]
        cfg = dict(model="toy", method=method, task=f"toy-{domain}", out=str(ckpt_root),
                   n_train=S["n_train"], global_batch=S["global_batch"],
                   micro_batch=S["micro_batch"], epochs=8, max_steps=steps,
                   lr=S["lr_full"] if method == "full" else S["lr_peft"],
                   save_every_steps=max(1, steps // 5),
                   resume=resume, overwrite=not resume and ckpt_root.exists(),
                   no_progress=False, **hp)
        train_sft.train(cfg)
    else:
        steps = P["quick_grpo_steps"] if quick else P["grpo_steps"]
        cfg = dict(model="toy", method=method, task=f"toy-{domain}", out=str(ckpt_root),
                   preset="toy", steps=steps, save_every_steps=steps, resume=resume,
                   overwrite=not resume and ckpt_root.exists(), no_progress=False, **hp)
        train_grpo.train(cfg)


def _demo_cell(run: Path, paradigm: str, label: str, method: str, hp: dict, base: dict, *,
               domain: str, n: int, quick: bool, tag: str, log) -> dict:
    """Train (unless a finished run is there) and score one demo cell; writes its cell files."""
    cell = _cell_path(run, paradigm, label)
    ckpt_root = run / paradigm.lower() / slug(label)
    t0 = time.time()
    final = _finished(ckpt_root)
    if final is None:
        log(f"[demo] {tag} {paradigm} {label}: training")
        _train_demo_cell(paradigm, method, hp, ckpt_root, domain=domain, quick=quick)
        final = _finished(ckpt_root)
        if final is None:
            raise RuntimeError(f"{paradigm} {label}: training ended without a final checkpoint in {ckpt_root}")
    seconds = round(time.time() - t0, 1)
    res = _score_checkpoint(final, domain=domain, n=n, base_general=base["general_score"])
    m, _ = loading.load_model("toy", device="cpu", dtype="float32")
    peft_methods.load_adapter(m, final)
    row = _row(paradigm, label, method, hp, res, base, peft_methods.count_trainable(m), seconds)
    row["checkpoint"] = str(final)
    atomic_write_json(cell.with_suffix(".eval.json"), res)   # evaluate.py results (geometry reads it)
    atomic_write_json(cell, row)
    log(f"[demo] {paradigm} {label}: target {row['target']:.1f} ({row['target_gain']:+.1f})  "
        f"general {row['general']:.1f} (forgetting {row['forgetting']:+.1f})  [{seconds:.0f}s]")
    return row


def run_demo(run: Path, *, domain: str = "math", quick: bool = False, log=print) -> list[dict]:
    """Train, score and analyse every demo cell under `run`; a rerun skips finished cells."""
    P = DEMO["full"]
    n = P["quick_n"] if quick else P["n_per_family"]
    run.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run / "config.json", {"domain": domain, "quick": quick, "demo": DEMO,
                                            "sft_cells": SFT_CELLS, "grpo_cells": GRPO_CELLS})
    # 1. the base model: the reference point of both axes
    base_path = run / "cells" / "base.json"
    if base_path.exists():
        base = json.loads(base_path.read_text())
    else:
        log("[demo] scoring the toy base model")
        base = _score_checkpoint(None, domain=domain, n=n, base_general=None)
        atomic_write_json(base_path, base)
    model, _ = loading.load_model("toy", device="cpu", dtype="float32")
    n_base = sum(p.numel() for p in model.parameters())
    rows = [_row("Base", "Base", "base", {}, base, base, n_base, 0.0)]
    log(f"[demo] base: target {base['target_score']:.1f}  general {base['general_score']:.1f}")

    # 2. the grid: SFT rows, then the RLVR (GRPO) rows; a finished cell is read back, not rerun
    sft_cells = [c for c in SFT_CELLS if not quick or c[0] in QUICK_SFT]
    grpo_cells = [] if quick and not P["quick_grpo_steps"] else GRPO_CELLS
    plan = [("SFT", c) for c in sft_cells] + [("GRPO", c) for c in grpo_cells]
    for i, (paradigm, (label, method, hp)) in enumerate(plan, 1):
        cell = _cell_path(run, paradigm, label)
        if cell.exists():
            rows.append(json.loads(cell.read_text()))
            log(f"[demo] {i}/{len(plan)} {paradigm} {label}: done earlier (skipped)")
            continue
        rows.append(_demo_cell(run, paradigm, label, method, hp, base, domain=domain, n=n, quick=quick,
                               tag=f"{i}/{len(plan)}", log=log))
    # 3. the tables and the scatter, then the analyses of the SFT checkpoints
    write_report(run, rows, base)
    if not quick:
        run_geometry(run, rows, domain=domain, log=log)
    run_interpolation(run, rows, domain=domain, n=n, grid=P["quick_grid"] if quick else P["grid"], log=log)
    return rows


def run_geometry(run: Path, rows: list[dict], *, domain: str, log=print) -> None:
    """geometry.py on every SFT checkpoint: spectra, CSD, activation geometry, correlations."""
    out = run / "geometry"
    if (out / "correlations.md").exists():
        log("[demo] geometry: done earlier (skipped)")
        return
    sft = [r for r in rows if r["paradigm"] == "SFT"]
    argv = ["--base", "toy", "--domain", domain, "--out", str(out), "--max-prompts", "100",
            "--max-tokens", "2048", "--base-results", str(run / "cells" / "base.json")]
    for r in sft:
        cell = _cell_path(run, "SFT", r["method"])
        argv += ["--checkpoint", r["checkpoint"], "--label", slug(r["method"]),
                 "--results", str(cell.with_suffix(".eval.json"))]
    log(f"[demo] geometry over {len(sft)} SFT checkpoints")
    geometry.main(argv)


def run_interpolation(run: Path, rows: list[dict], *, domain: str, n: int, grid: str, log=print) -> None:
    """rewind.py: interpolation paths back to the base for Full FT, LoRA r8 and OFT b16 (with
    OFT's generator path beside its dense path, and SafeRho/MinRho rewinding)."""
    out = run / "interpolation"
    if (out / "results.json").exists():
        log("[demo] interpolation: done earlier (skipped)")
        return
    roots = [str(Path(r["checkpoint"]).parent) for r in rows
             if r["paradigm"] == "SFT" and r["method"] in INTERP_CELLS]
    argv = ["--base", "toy", "--domain", domain, "--grid", grid, "--out", str(out), "--n-per-family", str(n),
            "--max-train-points", "3", "--rewind", "saferho", "--rewind", "minrho"]
    for r in roots:
        argv += ["--checkpoint", r]
    log(f"[demo] interpolation paths for {len(roots)} SFT runs on grid {grid}")
    rewind.main(argv)


# -----------------------------------------------------------------------------
# run: a config-driven grid (domains x paradigms x methods) on the toy or a real model
#
# The paper's grid is {Qwen2.5-7B, Llama-3.2-3B-Instruct} x {math, medical} x {SFT, RLVR} x methods,
# each cell scored on Target and General. One config file describes one model's grid
# (configs/paper_qwen2.5-7b.yaml, configs/paper_llama-3.2-3b-instruct.yaml, and the CPU-sized
# configs/toy_grid.yaml). Everything in the file is checked BEFORE anything trains
# (`validate_config`), every problem is reported at once, naming the cell and the field:
#     toy.yaml: cell sft/math/LoRA r0: methods[1].hparams.r = 0: rank must be >= 1
# Then the cells run in order; each is resumable and writes RUN/cells/<cell>.json when done.

PARADIGMS = {"sft": "SFT", "grpo": "GRPO"}       # config name -> table label (the paper's RLVR = GRPO)
PARADIGM_ALIASES = {"rlvr": "grpo"}
DOMAINS = ("math", "med")
DOMAIN_ALIASES = {"medical": "med"}
RUN_KEYS = ("name", "out", "model", "shapes", "paper_model", "dtype", "device", "gpus", "gpu_memory_gib",
            "domains", "paradigms", "data", "train", "methods", "eval", "budget")
DTYPES = ("float32", "fp32", "bfloat16", "bf16", "float16", "fp16")
DEFAULT_GPU_MEMORY_GIB = 80.0    # an H100 (H200: 141); the node's GPUs for the memory plan
METHOD_KEYS = ("label", "method", "hparams", "paradigms", "train")
# eval settings -> (type, default); they become evaluate.py flags (see _eval_argv)
EVAL_KEYS = {"suite": (str, None), "n_per_family": (int, 100), "batch_size": (int, 64),
             "max_new_tokens": (int, None), "seed": (int, 0), "limit": (int, None),
             "data_dir": (str, "data"), "paths": (dict, {}), "bbh_prompt_dir": (str, None),
             "backend": (str, "auto"), "num_samples": (int, None), "temperature": (float, None),
             "allow_hub": (bool, False), "vllm_gpu_memory_utilization": (float, None)}
BUDGET_KEYS = {"max_minutes": (float, None)}
# train_sft / train_grpo keys that arena.py sets itself, from model/method/hparams/device/dtype
ARENA_OWNED = {"model", "method", "out", "resume", "overwrite", "r", "alpha", "block_size", "dropout",
               "hp", "smoke", "device", "dtype"}
DRY_RUN_KEYS = {"dry_run", "gpus", "gpu_memory_gib"}   # the scripts' memory-plan flags (memory.py)
HPARAM_FLAGS = ("r", "alpha", "block_size", "dropout")     # peft_methods.hparams_from_flags flags
# Ranges no layer shape decides (make_config takes any value; apply_peft checks only against shapes)
HPARAM_RANGES = {"r": (lambda v: v >= 1, "rank must be >= 1"),
                 "init_r": (lambda v: v >= 1, "rank must be >= 1"),
                 "alpha": (lambda v: v > 0, "alpha must be > 0"),
                 "block_size": (lambda v: v >= 2, "OFT block size must be >= 2"),
                 "dropout": (lambda v: 0 <= v < 1, "dropout must be in [0, 1)")}
METHOD_NAMES = {"full": "Full FT", "lora": "LoRA", "dora": "DoRA", "pissa": "PiSSA", "milora": "MiLoRA",
                "keeplora": "KeepLoRA", "adalora": "AdaLoRA", "vera": "VeRA", "ia3": "IA3",
                "miss": "MiSS", "oft": "OFT"}
_MISSING = object()


class _YamlLoader(yaml.SafeLoader):
    """YAML 1.1 reads `2e-4` as a STRING (PyYAML wants `2.0e-4`); this loader also resolves the
    dot-less exponent form as a float, as YAML 1.2 does."""


_YamlLoader.add_implicit_resolver("tag:yaml.org,2002:float",
                                  re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"), list("-+0123456789."))


def read_config(path: Path) -> dict:
    """A run config from YAML (.yaml/.yml) or JSON (PyYAML comes with transformers)."""
    text = path.read_text()
    if path.suffix.lower() == ".json":
        return json.loads(text)
    return yaml.load(text, Loader=_YamlLoader) or {}


def paper_hp(method: str, hp: dict) -> str:
    """The main table's H.P. column for a method's hyperparameters: r8a16, b32, r64, -."""
    try:
        c = peft_methods.make_config(method, **hp)
    except Exception:  # noqa: BLE001 - an unknown method / field: no canonical form
        return "-"
    if method in ("lora", "dora", "pissa", "milora", "adalora"):
        return f"r{c.r}a{c.alpha:g}"
    if method in ("miss", "vera", "keeplora"):
        return f"r{c.r}"
    return f"b{c.block_size}" if method == "oft" else "-"


def default_label(method: str, hp: dict) -> str:
    h = paper_hp(method, hp)
    return METHOD_NAMES.get(method, method) + ("" if h == "-" else f" {h}")


# value test and message per expected type (bools are not numbers; ints are floats)
_TYPE_TESTS = {bool: (lambda v: isinstance(v, bool), "expected true/false"),
               int: (lambda v: isinstance(v, int) and not isinstance(v, bool), "expected an integer"),
               float: (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "expected a number"),
               str: (lambda v: isinstance(v, str), "expected a string"),
               dict: (lambda v: isinstance(v, dict), "expected a mapping"),
               list: (lambda v: isinstance(v, (list, tuple)), "expected a list")}
_TYPE_TESTS[tuple] = _TYPE_TESTS[list]


def _type_problem(v, typ, allow_none: bool) -> str | None:
    """None if v fits typ, else what was expected (a type without a test accepts anything)."""
    if v is None:
        return None if allow_none else "a value is required here (null given)"
    test, msg = _TYPE_TESTS.get(typ, (lambda v: True, None))
    return None if test(v) else msg


class _Findings:
    """What validation found: problems (each naming its cells, field and value) and warnings.
    Calling it adds a problem, so each check takes it as `add(field, value, msg, cells)`."""

    def __init__(self):
        self.problems: list[dict] = []
        self.warnings: list[str] = []

    def __call__(self, field, value, msg, cells=()):
        self.problems.append({"cells": list(cells), "field": field, "value": value, "msg": msg})


def _train_parser(paradigm: str):
    return (train_sft if paradigm == "sft" else train_grpo).build_parser()


def _action_problem(a: argparse.Action, v) -> str | None:
    """What is wrong with config value v for the script's argparse action a (None if it fits)."""
    if isinstance(a, argparse._StoreTrueAction):
        prob = _type_problem(v, bool, False)
    elif isinstance(a, argparse.BooleanOptionalAction):   # --x / --no-x, None = the script's auto rule
        prob = _type_problem(v, bool, True)
    elif a.nargs not in (None, "?"):
        prob = _type_problem(v, list, False)
        if prob is None and isinstance(a.nargs, int) and len(v) != a.nargs:
            prob = f"expected a list of {a.nargs} values"
    else:
        prob = _type_problem(v, a.type or str, a.default is None)
    if prob is None and a.choices is not None and v is not None and v not in a.choices:
        prob = f"must be one of {list(a.choices)}"
    return prob


def _check_train_settings(paradigm: str, settings, field: str, add) -> None:
    """Each key must be a train_sft.py / train_grpo.py config key (argparse dest) of the right type."""
    script = "train_sft.py" if paradigm == "sft" else "train_grpo.py"
    if not isinstance(settings, dict):
        add(field, settings, f"expected a mapping of {script} settings")
        return
    # the scripts take a config dict as it is (argparse converts only command-line strings), so a
    # YAML value of the wrong type would surface mid-training: check it against the flag here
    actions = {a.dest: a for a in _train_parser(paradigm)._actions if a.dest != "help"}
    for k, v in settings.items():
        f = f"{field}.{k}"
        if k in ARENA_OWNED:
            add(f, v, "set by arena.py from model / method / hparams / device / dtype; remove it here")
        elif k in DRY_RUN_KEYS:
            add(f, v, "a --dry-run setting of the script; arena.py plans memory itself (--validate-only) "
                "from the config's top-level gpus / gpu_memory_gib")
        elif k not in actions:
            close = difflib.get_close_matches(k, [a for a in actions if a not in ARENA_OWNED], n=1)
            add(f, v, f"unknown {script} setting" + (f" (did you mean {close[0]!r}?)" if close else "")
                + f"; see `python {script} --help` (flag --x-y = key x_y)")
        else:
            prob = _action_problem(actions[k], v)
            if prob is None and k == "lr" and v is not None and v <= 0:
                prob = "learning rate must be > 0"
            if prob:
                add(f, v, prob)


def _check_paradigm_blocks(blocks: dict, field: str, add) -> None:
    """{paradigm: script settings} (train.*, data.<domain>.*, methods[i].train.*)."""
    for p, settings in blocks.items():
        if p not in PARADIGMS:
            add(f"{field}.{p}", settings, f"unknown paradigm; known: {', '.join(PARADIGMS)}")
        else:
            _check_train_settings(p, settings, f"{field}.{p}", add)


def resolve_model(spec: str, shapes: str | None, *, allow_hub: bool = False):
    """(hf_config or None, where it came from, error or None, warnings). Reads configs only.

    Offline by construction: 'toy' and local directories are read from disk, a hub id only from
    the local Hugging Face cache (huggingface_hub.try_to_load_from_cache never opens a connection).
    """
    warn, err, cfg, where = [], None, None, None
    try:
        path, local = loading.resolve_spec(spec)
    except Exception as e:  # noqa: BLE001 - a missing directory, a file instead of a directory
        path, local, err = None, False, f"{e} (a local path: nothing is downloaded)"
    if path is not None and local:
        cfg, where = transformers.AutoConfig.from_pretrained(path), f"{path}/config.json"
    elif path is not None:
        try:
            cached = try_to_load_from_cache(spec, "config.json")
        except Exception:  # noqa: BLE001 - not even a valid repo id
            cached = None
        if isinstance(cached, str):
            cfg, where = transformers.AutoConfig.from_pretrained(str(Path(cached).parent)), f"HF cache {cached}"
        else:
            msg = (f"not a local directory and not in the Hugging Face cache (checked offline; nothing "
                   "is downloaded). Download it on a machine with network access (e.g. `hf download "
                   f"{spec}`) or set model to a local directory holding config.json + weights + tokenizer")
            if allow_hub:
                warn.append(f"model {spec!r}: {msg}; --allow-hub: load_model will try to download it")
            else:
                err = msg + "; or pass --allow-hub to let load_model download it at run time"
    if cfg is None and shapes:
        try:
            cfg, where = peft_methods.load_shape_config(shapes), f"configs/model_shapes/{shapes}.json"
        except Exception as e:  # noqa: BLE001 - reported as a field error by the caller
            warn.append(f"shapes {shapes!r}: {e}")
    return cfg, where, err, warn


def model_skeleton(hf_config):
    """A 1-layer copy of the architecture on the meta device (no memory, no weights) and the real
    layer count: every decoder layer of these models has the same Linear shapes, so one layer is
    enough to check ranks and block sizes and to count trainable parameters."""
    c = copy.deepcopy(hf_config)
    n_layers = int(c.num_hidden_layers)
    c.num_hidden_layers = 1
    if isinstance(getattr(c, "layer_types", None), list):
        c.layer_types = c.layer_types[:1]
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(c)
    return model, n_layers


def _scaled_count(model, n_layers: int, trainable_only: bool = True) -> int:
    """Parameter count of the full-depth model from its 1-layer skeleton."""
    seen, total, layer0 = set(), 0, 0
    for n, p in model.named_parameters():
        if id(p) in seen or (trainable_only and not p.requires_grad):
            continue
        seen.add(id(p))
        total += p.numel()
        layer0 += p.numel() if ".layers.0." in n else 0
    return total - layer0 + n_layers * layer0


def check_on_skeleton(skeleton, n_layers: int, method: str, hp: dict, targets):
    """apply_peft on a copy of the meta skeleton (no data-dependent init): (trainable count, error,
    the config field at fault: peft_methods.HparamError.field, "" when the error names none)."""
    m = copy.deepcopy(skeleton)
    try:
        peft_methods.apply_peft(m, method, target_modules=targets, _init=False, **hp)
    except Exception as e:  # noqa: BLE001 - the message names the module and the shapes
        return None, str(e), getattr(e, "field", "")
    return _scaled_count(m, n_layers), None, ""


def _fmt_count(n) -> str:
    return "-" if n is None else _fmt_params(n)


# ---- validation, one step per config section; each step adds to `add` (a _Findings)


def _check_top_level(raw: dict, source: str, add) -> dict:
    """Unknown top-level keys; the four sections default to {}; name and out default from the file."""
    for k in raw:
        if k not in RUN_KEYS:
            add(k, raw[k], f"unknown key; known: {', '.join(RUN_KEYS)}")
    cfg = {k: raw.get(k) for k in RUN_KEYS}
    for k in ("data", "train", "eval", "budget"):
        cfg[k] = cfg[k] if cfg[k] is not None else {}
        if not isinstance(cfg[k], dict):
            add(k, cfg[k], "expected a mapping")
            cfg[k] = {}
    cfg["name"] = cfg["name"] or Path(source).stem
    cfg["out"] = cfg["out"] or f"runs/{cfg['name']}"
    return cfg


def _check_model(cfg: dict, add, allow_hub: bool) -> dict:
    """The model's config, resolved offline (never its weights), and its 1-layer meta skeleton."""
    model = {"hf_config": None, "where": None, "skeleton": None, "n_layers": 0, "n_params": None}
    if not isinstance(cfg["model"], str) or not cfg["model"]:
        add("model", cfg["model"], "required: 'toy', a local HF model directory, or a hub id")
        return model
    hf_config, model["where"], err, w = resolve_model(cfg["model"], cfg["shapes"], allow_hub=allow_hub)
    add.warnings += w
    if err:
        add("model", cfg["model"], err)
    if cfg["shapes"] and not (peft_methods.SHAPES_DIR / f"{cfg['shapes']}.json").exists():
        add("shapes", cfg["shapes"], "no such file configs/model_shapes/<shapes>.json; available: "
            + ", ".join(sorted(p.stem for p in peft_methods.SHAPES_DIR.glob("*.json"))))
    if hf_config is None:
        add.warnings.append("hyperparameters were NOT checked against layer shapes (no model config "
                            "available; set `shapes:` to a configs/model_shapes/*.json name)")
        return model
    skeleton, n_layers = model_skeleton(hf_config)
    model.update(hf_config=hf_config, skeleton=skeleton, n_layers=n_layers,
                 n_params=_scaled_count(skeleton, n_layers, trainable_only=False))
    return model


def _check_node(cfg: dict, add) -> None:
    """dtype and device, then the node: GPUs per node and memory per GPU (for the memory plan)."""
    if cfg["dtype"] is not None and cfg["dtype"] not in DTYPES:
        add("dtype", cfg["dtype"], f"must be one of {list(DTYPES)} (or null = bf16 on CUDA, fp32 on CPU)")
    if cfg["device"] is not None:
        if not isinstance(cfg["device"], str) or cfg["device"].split(":")[0] not in ("cpu", "cuda"):
            add("device", cfg["device"], "must be cpu, cuda or cuda:N (or null = cuda if available)")
        elif cfg["device"].startswith("cuda") and not torch.cuda.is_available():
            add.warnings.append(f"device {cfg['device']!r}: no CUDA device on this machine (fine for "
                                "--validate-only; the run itself needs one)")
    if cfg["gpus"] is None:
        cfg["gpus"] = 1
    elif _type_problem(cfg["gpus"], int, False) or cfg["gpus"] < 1:
        add("gpus", cfg["gpus"], "expected the number of GPUs of the node (an integer >= 1)")
        cfg["gpus"] = 1
    if cfg["gpu_memory_gib"] is None:
        cfg["gpu_memory_gib"] = DEFAULT_GPU_MEMORY_GIB
    elif _type_problem(cfg["gpu_memory_gib"], float, False) or cfg["gpu_memory_gib"] <= 0:
        add("gpu_memory_gib", cfg["gpu_memory_gib"], "expected the memory of one GPU in GiB (H100 80, H200 141)")
        cfg["gpu_memory_gib"] = DEFAULT_GPU_MEMORY_GIB


def _check_names(vals, key: str, known, aliases: dict, add) -> list[str]:
    """domains / paradigms: a non-empty list of known names (aliases mapped), none twice."""
    if not isinstance(vals, list) or not vals:
        add(key, vals, f"required: a non-empty list from {list(known)}")
        return []
    out = []
    for i, v in enumerate(vals):
        v2 = aliases.get(v, v)
        if v2 not in known:
            add(f"{key}[{i}]", v, f"unknown; known: {', '.join(known)}"
                + (" (aliases: " + ", ".join(f"{a}={b}" for a, b in aliases.items()) + ")" if aliases else ""))
        elif v2 in out:
            add(f"{key}[{i}]", v, "listed twice")
        else:
            out.append(v2)
    return out


def _check_train_and_data(cfg: dict, add) -> None:
    """train.<paradigm> and data.<domain>.<paradigm>: keys checked against the scripts' parsers."""
    cfg["train"] = {PARADIGM_ALIASES.get(p, p): v for p, v in cfg["train"].items()}
    cfg["data"] = {DOMAIN_ALIASES.get(d, d): ({PARADIGM_ALIASES.get(p, p): x for p, x in v.items()}
                                              if isinstance(v, dict) else v) for d, v in cfg["data"].items()}
    _check_paradigm_blocks(cfg["train"], "train", add)
    for d, per in cfg["data"].items():
        if d not in DOMAINS:
            add(f"data.{d}", per, f"unknown domain; known: {', '.join(DOMAINS)}")
        elif not isinstance(per, dict):
            add(f"data.{d}", per, "expected a mapping {sft: {...}, grpo: {...}}")
        else:
            _check_paradigm_blocks(per, f"data.{d}", add)


def _check_eval(cfg: dict, add) -> dict:
    """The eval section with its defaults filled (they become evaluate.py flags)."""
    for k, v in cfg["eval"].items():
        if k not in EVAL_KEYS:
            add(f"eval.{k}", v, f"unknown key; known: {', '.join(EVAL_KEYS)}")
        elif prob := _type_problem(v, EVAL_KEYS[k][0], EVAL_KEYS[k][1] is None):
            add(f"eval.{k}", v, prob)
    ev = {}
    for k, (typ, default) in EVAL_KEYS.items():
        v = cfg["eval"].get(k, default)
        ev[k] = v if _type_problem(v, typ, default is None) is None else default
    ev["suite"] = ev["suite"] or ("toy" if cfg["model"] == "toy" else "real")
    if ev["suite"] not in ("toy", "real"):
        add("eval.suite", ev["suite"], "must be 'toy' (toy_world items) or 'real' (the paper's benchmarks)")
    if ev["backend"] not in ("auto", "hf", "vllm"):
        add("eval.backend", ev["backend"], "must be auto, hf or vllm")
    u = ev["vllm_gpu_memory_utilization"]
    if isinstance(u, (int, float)) and not 0 < u <= 1:
        add("eval.vllm_gpu_memory_utilization", u, "must be in (0, 1] (vLLM's share of the GPU)")
    for k in ("n_per_family", "batch_size", "max_new_tokens", "limit", "num_samples"):
        if isinstance(ev[k], int) and ev[k] < 1:
            add(f"eval.{k}", ev[k], "must be >= 1 (or null for the default)")
    for name in ev["paths"]:
        if name not in evaluate.BENCHMARKS:
            add(f"eval.paths.{name}", ev["paths"][name], f"unknown benchmark; known: {', '.join(evaluate.BENCHMARKS)}")
    if ev["suite"] == "real":
        _warn_missing_benchmarks(ev, cfg["domains"], add)
    return ev


def _warn_missing_benchmarks(ev: dict, domains: list[str], add) -> None:
    """Benchmark files are read only when a model is scored: missing ones are a warning now."""
    missing = []
    for name in sorted({b for d in domains for b in evaluate.SUITES[d]} | set(evaluate.SUITES["general"])):
        try:
            evaluate.find_dataset(name, ev["data_dir"], ev["paths"].get(name), allow_hub=ev["allow_hub"])
        except Exception:  # noqa: BLE001 - needed at evaluation time, not now
            missing.append(name)
    if missing:
        add.warnings.append(f"eval: no local files for benchmark(s) {', '.join(missing)} under data_dir "
                            f"{ev['data_dir']!r} (needed when the base model is scored; file layouts: "
                            "evaluate.BENCHMARKS, tests/fixtures/eval/README.md)")


def _check_budget(budget_cfg: dict, add) -> dict:
    budget = {}
    for k, v in budget_cfg.items():
        if k not in BUDGET_KEYS:
            add(f"budget.{k}", v, f"unknown key; known: {', '.join(BUDGET_KEYS)}")
        elif _type_problem(v, BUDGET_KEYS[k][0], True) or (v is not None and v <= 0):
            add(f"budget.{k}", v, "expected a positive number of minutes (or null = no limit)")
        else:
            budget[k] = v
    return {k: budget.get(k, d) for k, (_, d) in BUDGET_KEYS.items()}


def _check_method_entry(i: int, m, paradigms: list[str], labels: dict, add) -> dict | None:
    """One `methods` entry -> {index, field, label, method, hparams, paradigms, train}. Labels name
    the cell files, so they must be file-safe and differ after slug() (`labels`: slug -> index)."""
    f = f"methods[{i}]"
    if not isinstance(m, dict):
        add(f, m, "expected a mapping {label, method, hparams, paradigms, train}")
        return None
    for k in m:
        if k not in METHOD_KEYS:
            add(f"{f}.{k}", m[k], f"unknown key; known: {', '.join(METHOD_KEYS)}")
    name, hp = m.get("method"), m.get("hparams") or {}
    if not isinstance(hp, dict):
        add(f"{f}.hparams", hp, "expected a mapping of hyperparameters")
        hp = {}
    label = m.get("label") or default_label(str(name), hp)
    if not isinstance(label, str):
        add(f"{f}.label", label, "expected a string")
        label = str(label)
    if re.search(r"[^\w .+()\-]", label):
        add(f"{f}.label", label, "labels name files: use letters, digits, spaces and . _ + - ( ) only")
    if slug(label) in labels:
        add(f"{f}.label", label, f"same file name as methods[{labels[slug(label)]}]'s label (case and "
            "spaces aside); labels name the cells, so they must differ")
    labels.setdefault(slug(label), i)
    mp = m.get("paradigms", paradigms)
    if not isinstance(mp, list):
        add(f"{f}.paradigms", mp, "expected a list")
        mp = []
    mp2 = []
    for j, p in enumerate(mp):
        p2 = PARADIGM_ALIASES.get(p, p)
        if p2 not in PARADIGMS:
            add(f"{f}.paradigms[{j}]", p, f"unknown paradigm; known: {', '.join(PARADIGMS)}")
        elif p2 in paradigms:
            mp2.append(p2)
    mtrain = m.get("train") or {}
    if not isinstance(mtrain, dict):
        add(f"{f}.train", mtrain, "expected a mapping {sft: {...}, grpo: {...}}")
        mtrain = {}
    mtrain = {PARADIGM_ALIASES.get(p, p): v for p, v in mtrain.items()}
    _check_paradigm_blocks(mtrain, f"{f}.train", add)
    return dict(index=i, field=f, label=label, method=name, hparams=hp,
                paradigms=[p for p in paradigms if p in mp2], train=mtrain)


def _check_methods(cfg: dict, add) -> list[dict]:
    methods = cfg["methods"]
    if not isinstance(methods, list) or not methods:
        add("methods", methods, "required: a non-empty list of {label, method, hparams, paradigms, train}")
        return []
    labels: dict[str, int] = {}
    entries = [_check_method_entry(i, m, cfg["paradigms"], labels, add) for i, m in enumerate(methods)]
    return [e for e in entries if e is not None]


def _grid_cells(cfg: dict, entries: list[dict], add) -> list[dict]:
    """The grid in run order: per domain, its base model, then paradigms x methods."""
    cells = []
    for d in cfg["domains"]:
        cells.append({"id": f"base/{d}", "index": len(cells), "domain": d, "paradigm": "base", "label": "Base",
                      "method": "base", "hparams": {}, "file": f"cells/base-{d}.json"})
        for p in cfg["paradigms"]:
            for e in entries:
                if p not in e["paradigms"]:
                    continue
                cells.append({"id": f"{p}/{d}/{e['label']}", "index": len(cells), "domain": d, "paradigm": p,
                              "label": e["label"], "method": e["method"], "hparams": e["hparams"],
                              "entry": e["index"], "file": f"cells/{p}-{d}-{slug(e['label'])}.json",
                              "ckpt_dir": f"{p}/{d}/{slug(e['label'])}"})
    paradigms = cfg["paradigms"]
    for e in entries:
        if not e["paradigms"] and paradigms:
            add.warnings.append(f"{e['field']} ({e['label']}): no cell: none of its paradigms is in the "
                                f"config's paradigms {paradigms}")
    if entries and cfg["domains"] and paradigms and all(c["paradigm"] == "base" for c in cells):
        add("methods", None, "no cell to run: every method's `paradigms` excludes the config's paradigms")
    return cells


def _check_hparam_values(e: dict, ids: list[str], add) -> bool:
    """Names, types and ranges of one method's hyperparameters (its make_config dataclass fields)."""
    f, name, hp = e["field"], e["method"], e["hparams"]
    fields = {x.name: x for x in dataclasses.fields(peft_methods.make_config(name))}
    ok = True
    for k, v in hp.items():
        if k not in fields:
            add(f"{f}.hparams.{k}", v, f"not a hyperparameter of {name}; valid: {sorted(fields) or 'none'}", ids)
            ok = False
            continue
        default = fields[k].default
        typ = type(default) if default is not None and default is not dataclasses.MISSING else None
        prob = _type_problem(v, typ, default is None) if typ else None
        if prob is None and k in HPARAM_RANGES and v is not None and not HPARAM_RANGES[k][0](v):
            prob = HPARAM_RANGES[k][1]
        if prob:
            add(f"{f}.hparams.{k}", v, prob, ids)
            ok = False
    return ok


def _check_shapes(e: dict, ids: list[str], cfg: dict, model: dict, train_cells: list[dict], cache: dict,
                  add) -> None:
    """apply_peft on the meta skeleton per paradigm (SFT may target other modules): ranks and block
    sizes against the real layer shapes, and each cell's trainable-parameter count."""
    f, name, hp = e["field"], e["method"], e["hparams"]
    for p in e["paradigms"]:
        tm = None    # train_sft.py's --target-modules; train_grpo.py always uses the defaults
        if p == "sft":
            tm = {**(cfg["train"].get(p) or {}), **(e["train"].get(p) or {})}.get("target_modules")
        targets = tuple(tm.split(",")) if isinstance(tm, str) and tm else peft_methods.DEFAULT_TARGETS
        key = (name, json.dumps(hp, sort_keys=True), targets)
        if key not in cache:
            cache[key] = check_on_skeleton(model["skeleton"], model["n_layers"], name, hp, targets)
        n, err, hf = cache[key]
        pids = [i for i in ids if i.startswith(p + "/")]
        if err and hf == "target_modules":
            add(f"train.{p}.target_modules", tm, err, pids)
        elif err and hf:
            add(f"{f}.hparams.{hf}", hp.get(hf, _MISSING), f"{err} [layer shapes from {model['where']}]", pids)
        elif err:
            add(f"{f}.hparams", hp, f"{err} [layer shapes from {model['where']}]", pids)
        for c in train_cells:
            if c["id"] in pids:
                c["trainable_params"] = n


def _check_hparams(entries: list[dict], train_cells: list[dict], cfg: dict, model: dict, add) -> None:
    """Per method: its name, its hyperparameters, then their fit to the model's layer shapes."""
    cache: dict[tuple, tuple] = {}    # (method, hparams, targets) -> check_on_skeleton result
    for e in entries:
        ids = [c["id"] for c in train_cells if c["entry"] == e["index"]]
        if e["method"] not in peft_methods.METHODS:
            add(f"{e['field']}.method", e["method"],
                f"unknown PEFT method; known: {', '.join(peft_methods.METHODS)}", ids)
            continue
        ok = _check_hparam_values(e, ids, add)
        if e["method"] == "keeplora" and "grpo" in e["paradigms"]:
            inits = [s.get("init_from") for s in (cfg["train"].get("grpo") or {}, e["train"].get("grpo") or {})
                     if isinstance(s, dict)]
            if not any(inits):
                add(f"{e['field']}.paradigms", e["paradigms"], "keeplora cannot start GRPO from the base model "
                    "(train_grpo needs an SFT checkpoint: train.grpo.init_from); use paradigms: [sft]",
                    [i for i in ids if i.startswith("grpo/")])
        if ok and model["skeleton"] is not None:
            _check_shapes(e, ids, cfg, model, train_cells, cache, add)


def _cell_layers(c: dict, e: dict, cfg: dict) -> list[tuple[str, dict]]:
    """(field, settings) of one cell; later layers win: train.<paradigm> <- data.<domain>.<paradigm>
    <- methods[i].train.<paradigm>."""
    d, p = c["domain"], c["paradigm"]
    per_domain = cfg["data"].get(d) if isinstance(cfg["data"].get(d), dict) else {}
    return [(f"train.{p}", cfg["train"].get(p) or {}), (f"data.{d}.{p}", per_domain.get(p) or {}),
            (f"{e['field']}.train.{p}", e["train"].get(p) or {})]


def _hparam_args(hp: dict) -> dict:
    """A method's hyperparameters as training-script keys: the four flags, the rest as --hp K=V."""
    return {"hp": [f"{k}={json.dumps(v)}" for k, v in hp.items() if k not in HPARAM_FLAGS],
            **{k: v for k, v in hp.items() if k in HPARAM_FLAGS}}


def _cell_train_config(c: dict, e: dict, cfg: dict, add) -> tuple[dict, dict] | None:
    """The train_sft / train_grpo config of one cell and the config field each key came from."""
    d, p = c["domain"], c["paradigm"]
    layers = _cell_layers(c, e, cfg)
    tc, origin = {}, {}
    if not any("task" in s or "data" in s for _, s in layers if isinstance(s, dict)):
        if cfg["model"] != "toy" and cfg["eval"]["suite"] != "toy":
            extra = ", hub_file" if p == "sft" else ", domain"
            add(f"data.{d}.{p}", _MISSING, "required for a real model: the training file "
                f"(data: path.jsonl|parquet{extra}) or task: toy-{d}", [c["id"]])
            return None
        tc["task"] = f"toy-{d}"     # the toy world's SFT / RL rows for this domain
    dests = {a.dest for a in _train_parser(p)._actions}
    for fld, s in layers:
        for k, v in (s.items() if isinstance(s, dict) else ()):
            if k not in ARENA_OWNED and k in dests:    # the others are reported above
                tc[k], origin[k] = v, f"{fld}.{k}"
    tc.update(model=cfg["model"], method=e["method"], **_hparam_args(c["hparams"]))
    if cfg["device"]:
        tc["device"] = cfg["device"]
    if p == "grpo" and cfg["dtype"]:
        tc["dtype"] = cfg["dtype"]
    if p == "grpo" and tc.get("data") and not tc.get("domain"):
        tc["domain"] = d
    tc["out"] = str(Path(cfg["out"]) / c["ckpt_dir"])
    return tc, origin


def _resolve_cells(train_cells: list[dict], entries: list[dict], cfg: dict, add) -> None:
    """Each cell's exact training config, resolved and checked by the training script's own
    resolve_config (the one path: its errors carry the key at fault, loading.ConfigError.field)."""
    by_index = {e["index"]: e for e in entries}
    missing_data: dict[tuple, list] = {}
    for c in train_cells:
        e = by_index[c["entry"]]
        if e["method"] not in peft_methods.METHODS:
            continue
        made = _cell_train_config(c, e, cfg, add)
        if made is None:
            continue
        tc, origin = made
        c["train"] = tc
        p = c["paradigm"]
        try:
            c["train_resolved"] = (train_sft if p == "sft" else train_grpo).resolve_config(dict(tc))
        except Exception as err:  # noqa: BLE001 - the scripts' own checks
            key = getattr(err, "field", None)
            fld = origin.get(key, f"train.{p}.{key}" if key else f"train.{p}")
            add(fld, tc.get(key, _MISSING) if key else _MISSING, str(err), [c["id"]])
            continue
        v = tc.get("data")
        looks_hub = p == "sft" and tc.get("hub_file")       # a hub dataset id, fetched by train_sft
        if isinstance(v, str) and not looks_hub and not Path(v).exists():
            missing_data.setdefault((origin.get("data", "data"), v), []).append(c["id"])
    for (fld, v), ids in missing_data.items():
        add.warnings.append(f"{fld} = {v!r}: file not found (needed when cell {ids[0]}"
                            + (f" and {len(ids) - 1} more" if len(ids) > 1 else "") + " train)")


def validate_config(raw, source: str = "config", *, allow_hub: bool = False) -> dict:
    """Check a run config without training or loading weights; returns the plan:
    {"config": normalised config, "cells": [...], "errors": [str], "warnings": [str],
     "model_where", "n_params", "n_layers"}. Every error names its cell(s) and field."""
    if not isinstance(raw, dict):
        return {"config": {}, "cells": [], "warnings": [],
                "errors": [f"{source}: the file must hold a mapping of settings (got {type(raw).__name__})"]}
    add = _Findings()
    # 1. the sections on their own (every problem is collected; the checks go on after one)
    cfg = _check_top_level(raw, source, add)
    model = _check_model(cfg, add, allow_hub)
    _check_node(cfg, add)
    cfg["domains"] = _check_names(cfg["domains"], "domains", DOMAINS, DOMAIN_ALIASES, add)
    cfg["paradigms"] = _check_names(cfg["paradigms"], "paradigms", tuple(PARADIGMS), PARADIGM_ALIASES, add)
    _check_train_and_data(cfg, add)
    cfg["eval"] = _check_eval(cfg, add)
    cfg["budget"] = _check_budget(cfg["budget"], add)
    entries = _check_methods(cfg, add)
    # 2. the grid, then each cell as its training script will see it (on the meta device)
    cells = _grid_cells(cfg, entries, add)
    train_cells = [c for c in cells if c["paradigm"] != "base"]
    _check_hparams(entries, train_cells, cfg, model, add)
    _resolve_cells(train_cells, entries, cfg, add)
    # 3. will each cell fit the GPUs it gets? (the toy needs no plan)
    if cfg["model"] != "toy" and model["hf_config"] is not None:
        plan_memory(train_cells, cfg, model["hf_config"], model["where"], add)
    return {"config": cfg, "cells": cells, "errors": format_problems(add.problems, source),
            "warnings": list(dict.fromkeys(add.warnings)), "model_where": model["where"],
            "n_params": model["n_params"], "n_layers": model["n_layers"]}


def cell_gpus(cell: dict, cfg: dict) -> int:
    """GPUs a cell trains on: Full FT SFT takes the node's `gpus` through torchrun (FSDP2; the paper
    trains on one 8-GPU node); every other cell trains in this process on one GPU (Implementation
    note 1)."""
    return cfg["gpus"] if cell["paradigm"] == "sft" and cell["method"] == "full" else 1


_MEMORY_PLANS: dict[tuple, tuple] = {}   # per process: a plan is a pure function of (shapes, settings, budget)


def _memory_hint(c: dict, cfg: dict, tr: dict, alts: list[str]) -> str:
    """What would make a cell fit: memory.what_fits' alternatives, and the config key to set."""
    hint = ("; would fit: " + "; ".join(alts)) if alts else "; nothing tried fits"
    if c["paradigm"] == "sft" and c["method"] == "full" and cfg["gpus"] < 8:
        hint += " (set `gpus:` to the node's GPU count: Full FT SFT then runs under torchrun, FSDP2)"
    if c["paradigm"] == "grpo" and c["method"] == "full" and tr.get("optimizer_offload") != "cpu":
        hint += (" (train_grpo.py has no multi-GPU path; set the method's "
                 "`train: {grpo: {optimizer_offload: cpu}}`: fp32 masters + AdamW on the CPU)")
    return hint


def plan_memory(train_cells: list[dict], cfg: dict, hf_config, where: str, add) -> None:
    """memory.py's per-GPU peak for every cell (cached per setting: domains share it); a cell that
    cannot fit the GPUs it will get is a problem naming the estimate and what would fit."""
    budget = cfg["gpu_memory_gib"]
    shapes = hf_config.to_json_string() if hasattr(hf_config, "to_json_string") else repr(hf_config)
    for c in train_cells:
        tr = c.get("train_resolved")
        if tr is None:
            continue
        n = cell_gpus(c, cfg)
        plan = memory.sft_plan(tr, gpus=n) if c["paradigm"] == "sft" else memory.grpo_plan(tr, gpu_memory_gib=budget)
        key = (shapes, repr(plan), budget)
        if key not in _MEMORY_PLANS:
            est = memory.estimate(hf_config, plan)
            alts = [] if memory.fits(est, budget) else memory.what_fits(hf_config, plan, budget, max_gpus=8)
            _MEMORY_PLANS[key] = (est, alts)
        est, alts = _MEMORY_PLANS[key]
        how = memory.format_estimate(est, budget)
        c["memory"] = {"gib_per_gpu": round(est["peak_gib"], 1), "gpus": n, "fits": memory.fits(est, budget),
                       "sampler_gib": round(est["sampler_gib"], 1), "how": how}
        if not c["memory"]["fits"]:
            add("memory", _MISSING, f"needs ~{est['peak_gib']:.1f} GiB per GPU on {n} GPU(s) ({how}; "
                f"shapes from {where}){_memory_hint(c, cfg, tr, alts)}", [c["id"]])


def format_problems(problems: list[dict], source: str) -> list[str]:
    """One line per (field, value, message): '<file>: cell <id> (+N more): <field> = <value>: <msg>'."""
    merged: dict[tuple, list] = {}
    for pr in problems:
        key = (pr["field"], "" if pr["value"] is _MISSING else repr(pr["value"]), pr["msg"])
        merged.setdefault(key, [])
        merged[key] += [c for c in pr["cells"] if c not in merged[key]]
    out = []
    for (field, value, msg), cells in merged.items():
        where = ""
        if cells:
            where = f"cell {cells[0]}" + (f" (+{len(cells) - 1} more)" if len(cells) > 1 else "") + ": "
        out.append(f"{source}: {where}{field}{' = ' + value if value else ''}: {msg}")
    return out


def cell_fingerprint(cell: dict, cfg: dict) -> str:
    """A short hash of everything that decides a cell's numbers (model, train config, eval)."""
    # where and how fast it runs does not change the numbers: out dir, device, eval batch size
    what = {"model": cfg["model"], "dtype": cfg["dtype"],
            "eval": {k: v for k, v in cfg["eval"].items() if k != "batch_size"},
            "train": {k: v for k, v in (cell.get("train") or {}).items() if k not in ("out", "device")}}
    return hashlib.sha1(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:12]


def print_plan(plan: dict, source: str, log=print) -> None:
    cfg = plan["config"]
    cells = [c for c in plan["cells"] if c["paradigm"] != "base"]
    log(f"[run] {source}: model {cfg['model']!r} (shapes from {plan['model_where'] or 'nowhere'}; "
        f"{_fmt_count(plan['n_params'])} parameters), {len(cfg['domains'])} domain(s) x "
        f"{len(cfg['paradigms'])} paradigm(s): {len(cells)} cells -> {cfg['out']}")
    w = max([len(c["id"]) for c in cells] + [4])
    mem = any("memory" in c for c in cells)
    head = f"  {'GiB/GPU':>8}  {'GPUs':>4}  fits" if mem else ""
    log(f"  {'#':>3}  {'cell':<{w}}  {'method':<8}  {'trainable':>10}{head}  hparams")
    for i, c in enumerate(cells, 1):
        m = c.get("memory")
        cols = (f"  {m['gib_per_gpu']:>8.1f}  {m['gpus']:>4}  {'yes' if m['fits'] else 'NO ':<4}" if m
                else (f"  {'?':>8}  {'':>4}  {'':<4}" if mem else ""))
        log(f"  {i:>3}  {c['id']:<{w}}  {str(c['method']):<8}  {_fmt_count(c.get('trainable_params')):>10}{cols}  "
            f"{json.dumps(c['hparams'])}")
    if mem:
        g = cfg["gpu_memory_gib"]
        log(f"  memory plan (memory.py; fake tensors, 1-2 layers extrapolated to {plan['n_layers']}): peak "
            f"GiB per GPU of one training step (+ vLLM's share for GRPO) against "
            f"{memory.USABLE_FRACTION * g:.1f} usable of {g:g} GiB per GPU ({cfg['gpus']} GPU(s))"
            + (f"; Full FT SFT on {cfg['gpus']} GPUs via torchrun (FSDP2), the other cells on 1 GPU"
               if cfg["gpus"] > 1 else "; every cell on 1 GPU"))


# ---- running the grid


def _eval_argv(spec: str, adapter, suite: str, domain: str | None, ev: dict, cfg: dict, out: Path) -> list[str]:
    """evaluate.py flags for one suite run (toy suite, or one real suite: math | med | general)."""
    a = ["--model", spec, "--suite", suite, "--out", str(out), "--batch-size", str(ev["batch_size"]),
         "--seed", str(ev["seed"])]
    if adapter:
        a += ["--adapter", str(adapter)]
    if domain:
        a += ["--domain", domain]
    if cfg["dtype"]:
        a += ["--dtype", {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16"}.get(cfg["dtype"], cfg["dtype"])]
    if cfg["device"]:
        a += ["--device", cfg["device"]]
    if ev["max_new_tokens"]:
        a += ["--max-new-tokens", str(ev["max_new_tokens"])]
    if suite == "toy":
        return a + ["--n-per-family", str(ev["n_per_family"])]
    a += ["--data-dir", ev["data_dir"], "--backend", ev["backend"]]
    for k, flag in (("limit", "--limit"), ("num_samples", "--num-samples"), ("temperature", "--temperature"),
                    ("bbh_prompt_dir", "--bbh-prompt-dir"),
                    ("vllm_gpu_memory_utilization", "--vllm-gpu-memory-utilization")):  # evaluate.py: 0.85
        if ev.get(k) is not None:
            a += [flag, str(ev[k])]
    for name, path in sorted(ev["paths"].items()):
        a += ["--path", f"{name}={path}"]
    return a + (["--allow-hub"] if ev["allow_hub"] else [])


def _score_suites(spec, adapter, domain, cfg, out_root: Path, suites, res: dict) -> None:
    """evaluate.main per suite into res (cached runs reused); the vLLM engine is kept between them."""
    for s in suites:
        out = out_root / s
        # the toy suite scores both targets in one pass and the general suite has no target, so
        # neither gets --domain: the base model's runs are then shared by every domain
        argv = _eval_argv(spec, adapter, s, domain if s in DOMAINS else None, cfg["eval"], cfg, out)
        stamp = out / "arena_eval.json"
        if (out / "results.json").exists() and stamp.exists() and json.loads(stamp.read_text()) == argv:
            res[s] = json.loads((out / "results.json").read_text())    # scored earlier, same flags
            continue
        # keep_engine: the next suite of the same model reuses the loaded vLLM engine;
        # context_suites: the engine is sized for every suite it will serve
        res[s] = evaluate.main(argv, keep_engine=True,
                               context_suites=[x for x in suites if x != "toy"])
        atomic_write_json(stamp, argv)


def evaluate_model(spec: str, adapter, domain: str, cfg: dict, out_root: Path) -> dict:
    """Both axes for one model (+ adapter) through evaluate.py: the toy suite (all five families),
    or the real target suite of `domain` plus the general suite. Each suite run is cached in
    out_root/<suite>/ (results.json + generations), reused when its evaluate.py flags are unchanged."""
    # Target = the domain's suite score, General = the general suite's score (the paper's mean of
    # BBH, IFEval and NQ; evaluate.py computes both)
    suites = ["toy"] if cfg["eval"]["suite"] == "toy" else [domain, "general"]
    res = {}
    try:
        _score_suites(spec, adapter, domain, cfg, out_root, suites, res)
    finally:
        evaluate.release_engine()   # one vLLM engine served every suite of this model; free it
    if suites == ["toy"]:
        r = res["toy"]
        fam = {f: round(v["score"], 2) for f, v in r["families"].items()}
        return {"target": r["families"][domain]["score"], "general": r["general_score"], "families": fam}
    fam = {b: round(v["score"], 2) for s in suites for b, v in res[s].get("benchmarks", {}).items()}
    return {"target": res[domain]["target_score"], "general": res["general"]["general_score"], "families": fam}


def _failed_row(cell: dict, err: BaseException, run: Path, fp: str, seconds: float) -> dict:
    """The cell file of a failed cell; the traceback goes to a text file beside it."""
    rel = cell["file"].replace(".json", ".traceback.txt")
    atomic_write_text(run / rel, "".join(traceback.format_exception(type(err), err, err.__traceback__)))
    return {"cell": cell["id"], "index": cell["index"], "status": "failed", "domain": cell["domain"],
            "paradigm": PARADIGMS.get(cell["paradigm"], "Base"), "method": cell["label"],
            "peft_method": cell["method"], "hparams": cell["hparams"],
            "error": f"{type(err).__name__}: {err}", "traceback": rel,
            "fingerprint": fp, "seconds": round(seconds, 1)}


def run_base(cell: dict, plan: dict, run: Path) -> dict:
    """Score the base model of one domain (the reference point of both axes)."""
    cfg = plan["config"]
    t0 = time.time()
    res = evaluate_model(cfg["model"], None, cell["domain"], cfg, run / "evals" / "base")
    return {"cell": cell["id"], "index": cell["index"], "status": "ok", "domain": cell["domain"],
            "paradigm": "Base", "method": "Base", "peft_method": "base", "hparams": {},
            "model": cfg["model"], "trainable_params": plan["n_params"],
            "target": round(res["target"], 2), "general": round(res["general"], 2),
            "target_gain": 0.0, "forgetting": 0.0, "families": res["families"],
            "train_seconds": 0.0, "eval_seconds": round(time.time() - t0, 1)}


def train_argv(settings: dict, parser) -> list[str]:
    """A train_sft.py config dict -> its command line (the inverse of parse_args for these keys)."""
    acts = {a.dest: a for a in parser._actions if a.dest != "help"}
    argv: list[str] = []
    for k, v in settings.items():
        a = acts[k]
        flag = a.option_strings[0]
        if v is None or v == a.default and not isinstance(a, argparse.BooleanOptionalAction):
            continue
        if isinstance(a, argparse._StoreTrueAction):
            argv += [flag] if v else []
        elif isinstance(a, argparse.BooleanOptionalAction):
            argv += [flag if v else "--no-" + flag[2:]]
        elif isinstance(a, argparse._AppendAction):
            for x in v:
                argv += [flag, str(x)]
        elif a.nargs not in (None, "?"):
            argv += [flag, *(str(x) for x in v)]
        else:
            argv += [flag, str(v)]
    return argv


def launch_torchrun(n_gpus: int, settings: dict) -> None:
    """Train a Full FT SFT cell on `n_gpus` GPUs of this node: `torchrun --standalone` of
    train_sft.py (FSDP2 fully_shard for --method full). Raises on failure."""
    settings = {k: v for k, v in settings.items() if k != "device"}   # torchrun: LOCAL_RANK picks it
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n_gpus}",
           str(REPO_DIR / "train_sft.py"), *train_argv(settings, train_sft.build_parser())]
    res = subprocess.run(cmd, cwd=REPO_DIR)
    if res.returncode != 0:
        raise RuntimeError(f"torchrun train_sft.py exited with {res.returncode}: {' '.join(cmd)}")


def run_cell(cell: dict, plan: dict, run: Path, base: dict | None, *, progress: bool = False, log=print) -> dict:
    """Train (or resume, or reuse a finished run of) one cell, then score it on both axes."""
    cfg = plan["config"]
    ckpt_root = run / cell["ckpt_dir"]
    t0 = time.time()
    final = _finished(ckpt_root)     # trained earlier (or on another node): only score it
    if final is None:
        # a half-trained cell resumes through the training file's own --resume (same config, checked
        # there); a directory with files but no run config in it is cleared by --overwrite
        resume = (ckpt_root / "config.json").exists()
        occupied = ckpt_root.exists() and any(ckpt_root.iterdir())
        tc = dict(cell["train"], out=str(ckpt_root), resume=resume, overwrite=occupied and not resume,
                  no_progress=not progress)
        n_gpus = cell_gpus(cell, cfg)
        log(f"[run] {cell['id']}: {'resuming' if resume else 'training'} -> {ckpt_root}"
            + (f" (torchrun --nproc_per_node {n_gpus}; FSDP2 on CUDA)" if n_gpus > 1 else ""))
        if n_gpus > 1:
            launch_torchrun(n_gpus, tc)
        else:
            (train_sft if cell["paradigm"] == "sft" else train_grpo).train(tc)
        final = _finished(ckpt_root)
        if final is None:
            raise RuntimeError(f"training ended without a final checkpoint in {ckpt_root}")
    summary = json.loads((ckpt_root / "summary.json").read_text())
    t_train = time.time() - t0
    log(f"[run] {cell['id']}: scoring {final}")
    t1 = time.time()
    res = evaluate_model(cfg["model"], final, cell["domain"], cfg, run / "evals" / Path(cell["file"]).stem)
    target, general = round(res["target"], 2), round(res["general"], 2)
    # both axes are read against this domain's base model; without one (it failed) they stay None
    ok_base = base is not None and base.get("status") == "ok"
    # SFT and GRPO summaries name two fields differently (n_trainable / trainable_params,
    # last_loss / reward_last): the row reads whichever the script wrote
    return {"cell": cell["id"], "index": cell["index"], "status": "ok", "domain": cell["domain"],
            "paradigm": PARADIGMS[cell["paradigm"]], "method": cell["label"], "peft_method": cell["method"],
            "hparams": cell["hparams"], "model": cfg["model"],
            "trainable_params": summary.get("n_trainable", summary.get("trainable_params")),
            "target": target, "general": general,
            "target_gain": round(target - base["target"], 2) if ok_base else None,
            "forgetting": round(base["general"] - general, 2) if ok_base else None,
            "families": res["families"], "train_seconds": round(t_train, 1),
            "eval_seconds": round(time.time() - t1, 1), "checkpoint": str(final),
            "train_steps": summary.get("steps"),
            "train_last": summary.get("last_loss", summary.get("reward_last"))}


def _run_grid_cell(cell: dict, plan: dict, run: Path, bases: dict, tag: str, *, progress, log) -> dict:
    """One cell's row, ok or failed: a failure is recorded and the grid goes on."""
    fp = cell_fingerprint(cell, plan["config"])
    is_base = cell["paradigm"] == "base"
    t1 = time.time()
    try:
        if is_base:
            log(f"[run] {tag}: scoring the base model")
            row = bases[cell["domain"]] = run_base(cell, plan, run)
        else:
            row = run_cell(cell, plan, run, bases.get(cell["domain"]), progress=progress, log=log)
        row["fingerprint"] = fp
    except Exception as err:  # noqa: BLE001 - record it, go on with the grid
        row = _failed_row(cell, err, run, fp, time.time() - t1)
        if is_base:
            bases[cell["domain"]] = row
        log(f"[run] {tag}: FAILED: {row['error'].splitlines()[0][:300]} (traceback: {run / row['traceback']})")
        return row
    times = "" if is_base else f"  [{row['train_seconds']:.0f}s train, {row['eval_seconds']:.0f}s eval]"
    log(f"[run] {tag}: target {row['target']:.1f}  general {row['general']:.1f}{times}")
    return row


def run_grid(plan: dict, run: Path, *, progress: bool = False, log=print) -> int:
    """Every cell in order; finished cells are skipped, failed ones retried. Returns the exit code:
    0 all done, 1 some cell failed (recorded, the grid went on), 3 stopped by budget.max_minutes."""
    t0 = time.time()
    budget = plan["config"]["budget"]["max_minutes"]
    n_train = sum(c["paradigm"] != "base" for c in plan["cells"])
    k, stopped = 0, False
    bases: dict[str, dict] = {}      # domain -> the base row its cells are measured against
    for cell in plan["cells"]:
        is_base = cell["paradigm"] == "base"
        k += not is_base
        tag = cell["id"] if is_base else f"{k}/{n_train} {cell['id']}"
        path = run / cell["file"]
        old = json.loads(path.read_text()) if path.exists() else None
        if old is not None and old.get("status") == "ok":
            log(f"[run] {tag}: done earlier (skipped)")
            if is_base:
                bases[cell["domain"]] = old
            continue
        if not is_base and budget and time.time() - t0 > budget * 60:
            log(f"[run] budget of {budget} min spent: stopping before {cell['id']}; rerun to continue")
            stopped = True
            break
        if old is not None:
            log(f"[run] {tag}: failed earlier ({old.get('error', '?')}); retrying")
        atomic_write_json(path, _run_grid_cell(cell, plan, run, bases, tag, progress=progress, log=log))
        write_run_report(run)     # the tables are current after every cell
        gc.collect()              # the next cell loads its own model: free this one's memory first
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    failed = [r["cell"] for r in read_run_rows(run) if r.get("status") != "ok"]
    if failed:
        log(f"[run] {len(failed)} failed cell(s): {', '.join(failed)} (tracebacks under {run / 'cells'})")
        return 1
    return 3 if stopped else 0


def stale_cells(plan: dict, run: Path) -> list[str]:
    """Cells finished earlier with different settings (their numbers would be silently reused)."""
    # a rerun skips every cell whose file says ok, so an edited config must not meet old results:
    # the fingerprint saved with each row tells them apart (rows from before fingerprints pass)
    out = []
    for cell in plan["cells"]:
        path = run / cell["file"]
        if path.exists():
            old = json.loads(path.read_text())
            fp = cell_fingerprint(cell, plan["config"])
            if old.get("status") == "ok" and old.get("fingerprint") not in (None, fp):
                out.append(f"cell {cell['id']}: finished earlier with different settings (fingerprint "
                           f"{old.get('fingerprint')} vs {fp}); delete {path}"
                           + (f" and {run / cell['ckpt_dir']}" if cell.get("ckpt_dir") else "")
                           + " to redo it, or restore the old settings")
    return out


def cmd_run(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    path = Path(args.config)
    source = path.name
    try:
        raw = read_config(path)
    except Exception as e:  # noqa: BLE001 - unreadable file or YAML syntax error
        print(f"{source}: cannot read the config: {e}", file=sys.stderr)
        return 2
    if isinstance(raw, dict) and args.out:
        raw = dict(raw, out=args.out)
    plan = validate_config(raw, source, allow_hub=args.allow_hub)
    run = Path(plan["config"].get("out") or "runs/unnamed")
    errors = plan["errors"] + (stale_cells(plan, run) if plan["cells"] else [])
    print_plan(plan, source)
    for w in plan["warnings"]:
        print(f"[run] warning: {w}")
    if errors:
        print(f"[run] {len(errors)} problem(s) in {path}; nothing was trained:", file=sys.stderr)
        for e in errors:
            print("  " + e, file=sys.stderr)
        return 2
    print(f"[run] validation: OK ({len(plan['cells']) - len(plan['config']['domains'])} cells)")
    if args.validate_only:
        return 0
    run.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run / "config.json", {
        "kind": "arena-run", "source": str(path), "config": plan["config"], "model_where": plan["model_where"],
        "n_params": plan["n_params"],
        "cells": [{k: v for k, v in c.items() if k != "entry"} for c in plan["cells"]]})
    t0 = time.time()
    code = run_grid(plan, run, progress=args.progress)
    print()
    print((run / "leaderboard.md").read_text() if (run / "leaderboard.md").exists() else "")
    print(f"[run] finished in {time.time() - t0:.0f} s (exit code {code}); outputs in {run}/")
    return code


# -----------------------------------------------------------------------------
# reports: tables and figures from results alone


def write_report(run: Path, rows: list[dict], base: dict) -> None:
    atomic_write_json(run / "results.json", {"base": {"target": base["target_score"],
                                                      "general": base["general_score"]},
                                             "rows": rows})
    atomic_write_csv(run / "results.csv", ["paradigm", "method", "trainable_params", "target", "general",
                                           "target_gain", "forgetting"], rows)
    atomic_write_text(run / "leaderboard.md", leaderboard_markdown(rows))
    plot_scatter(rows, run / "stability_plasticity.png")


def _fmt_params(n: int | None) -> str:
    if n is None:
        return "–"
    if n >= 1e9:
        return f"{n / 1e9:.2f}B"
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


def _num(v, fmt: str) -> str:
    return "–" if v is None else format(v, fmt)


def leaderboard_markdown(rows: list[dict], paper: list[dict | None] | None = None) -> str:
    """The main table's layout (poster): Train | Method | Tr. | Target | General, plus our
    Target gain and Forgetting against the base model.

    `paper` (one entry per row, None where the paper has no such cell) adds the published
    trainable-parameter count, Target and General beside ours (`report --paper`)."""
    head = "| Train | Method | Tr. | Target | General | Target gain | Forgetting |"
    if paper is not None:
        head += " Paper Tr. | Paper Target | Paper General |"
    out = [head, "|---" * head.count(" | ") + "|---|"]
    for i, r in enumerate(rows):
        line = (f"| {r['paradigm']} | {r['method']} | {_fmt_params(r['trainable_params'])} | "
                f"{_num(r['target'], '.1f')} | {_num(r['general'], '.1f')} | {_num(r['target_gain'], '+.1f')} | "
                f"{_num(r['forgetting'], '+.1f')} |")
        if paper is not None:
            pc = paper[i]
            line += (f" {pc['params'] or '–'} | {pc['target']:.2f} | {pc['general']:.2f} |" if pc
                     else " – | – | – |")
        out.append(line)
    return "\n".join(out) + "\n"


def pareto_indices(points: list[tuple[float, float]]) -> list[int]:
    """Indices of points not dominated in (x, y), both to be maximised (the paper's Pareto frontier
    of plasticity x stability), sorted by x."""
    keep = []
    for i, (x, y) in enumerate(points):
        if not any((x2 >= x and y2 >= y) and (x2 > x or y2 > y) for j, (x2, y2) in enumerate(points) if j != i):
            keep.append(i)
    return sorted(keep, key=lambda i: points[i][0])


def _label(r: dict) -> str:
    return ("GRPO " if r["paradigm"] == "GRPO" else "") + r["method"]


_COLOURS = {"Base": "black", "SFT": "tab:blue", "GRPO": "tab:red"}
_MARKERS = {"Base": "*", "SFT": "o", "GRPO": "s"}


def _draw_points(ax, rows, pts, size=1.0) -> None:
    for r, (x, y) in zip(rows, pts):
        mk = _MARKERS[r["paradigm"]]
        ax.scatter(x, y, c=_COLOURS[r["paradigm"]], marker=mk, s=(140 if mk == "*" else 50) * size, zorder=3)


def _annotate(fig, ax, rows, pts) -> None:
    try:
        texts = [ax.annotate(_label(r), (x, y), xytext=(4, 4), textcoords="offset points", fontsize=8,
                             arrowprops=dict(arrowstyle="-", lw=0.5, color="grey", shrinkA=1, shrinkB=4))
                 for r, (x, y) in zip(rows, pts)]
        _declutter(fig, ax, texts)
    except Exception:  # noqa: BLE001 - labels are a nicety
        pass


def crowded_cluster(pts: list[tuple[float, float]], frac: float = 0.1) -> list[int]:
    """Indices of the largest group of points that fit in a box of +-`frac` of each axis span
    around one of them: methods whose labels would pile up (those that barely moved, around the
    base; or those that all reach the same gain with little forgetting). The scatter draws them
    in a zoomed inset instead of labelling them in place. Ties go to the earliest centre."""
    xs, ys = [p[0] for p in pts] + [0.0], [p[1] for p in pts] + [0.0]
    wx, wy = max(xs) - min(xs) or 1.0, max(ys) - min(ys) or 1.0
    best: list[int] = []
    for cx, cy in pts:
        near = [i for i, (x, y) in enumerate(pts) if abs(x - cx) <= frac * wx and abs(y - cy) <= frac * wy]
        if len(near) > len(best):
            best = near
    return best


def _draw_inset(fig, ax, rows, pts, cluster, front) -> None:
    """The crowded points again in a zoomed inset, placed in whichever of four candidate boxes
    (axes fractions) holds the fewest points; the main plot keeps their markers and a zoom box."""
    boxes = [(0.12, 0.22, 0.36, 0.36), (0.55, 0.22, 0.36, 0.36), (0.12, 0.5, 0.36, 0.36), (0.55, 0.5, 0.36, 0.36)]
    to_ax = ax.transAxes.inverted()
    axfrac = [to_ax.transform(ax.transData.transform(p)) for p in pts]
    box = min(boxes, key=lambda b: sum(b[0] - 0.05 <= fx <= b[0] + b[2] + 0.05 and b[1] - 0.05 <= fy <= b[1] + b[3] + 0.05
                                       for fx, fy in axfrac))
    ins = ax.inset_axes(box)
    cp = [pts[i] for i in cluster]
    _draw_points(ins, [rows[i] for i in cluster], cp, size=0.8)
    cx, cy = [p[0] for p in cp], [p[1] for p in cp]
    px, py = max(1.0, 0.35 * (max(cx) - min(cx))), max(0.5, 0.6 * (max(cy) - min(cy)))
    ins.set_xlim(min(cx) - px, max(cx) + px)
    ins.set_ylim(min(cy) - py, max(cy) + py)
    ins.plot([pts[i][0] for i in front], [pts[i][1] for i in front], "--", c="grey", zorder=2)
    ins.axhline(0, c="lightgrey", lw=0.8, zorder=1)
    ins.axvline(0, c="lightgrey", lw=0.8, zorder=1)
    ins.tick_params(labelsize=7)
    ins.set_title("crowded region (zoom)", fontsize=8)
    ax.indicate_inset_zoom(ins, edgecolor="grey")
    _annotate(fig, ins, [rows[i] for i in cluster], cp)


def plot_scatter(rows: list[dict], png: Path, title: str = "Stability-plasticity trade-off on the toy arena") -> None:
    """Stability-plasticity plane (the paper's trade-off figure): target gain (x) vs general change
    (y), Pareto frontier drawn. When four or more methods crowd one spot (`crowded_cluster`), they
    are labelled in a zoomed inset placed in the emptiest quarter of the plot."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(9, 6.5), dpi=120)
    pts = [(r["target_gain"], -r["forgetting"]) for r in rows]
    _draw_points(ax, rows, pts)
    front = pareto_indices(pts)
    ax.plot([pts[i][0] for i in front], [pts[i][1] for i in front], "--", c="grey", zorder=2,
            label="Pareto frontier")
    for p, c in _COLOURS.items():
        ax.scatter([], [], c=c, marker=_MARKERS[p], label=p)
    ys = [p[1] for p in pts]
    ax.set_ylim(min(ys) - 2, max(ys) + 0.15 * (max(ys) - min(ys) + 1))   # room for labels on top
    ax.axhline(0, c="lightgrey", lw=0.8, zorder=1)
    ax.axvline(0, c="lightgrey", lw=0.8, zorder=1)
    ax.set_xlabel("target gain over base (points)  — plasticity")
    ax.set_ylabel("general change vs base (points)  — stability")
    ax.set_title(title)
    ax.legend(loc="lower left", fontsize=8)
    cluster = crowded_cluster(pts) if len(pts) >= 8 else []
    if len(cluster) < 4:
        cluster = []
    outer = [i for i in range(len(rows)) if i not in cluster]
    _annotate(fig, ax, [rows[i] for i in outer], [pts[i] for i in outer])
    if cluster:
        _draw_inset(fig, ax, rows, pts, cluster, front)
    fig.tight_layout()
    tmp = png.with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(png)


def _declutter(fig, ax, texts) -> None:
    """Place each label at the first candidate offset (rings of growing distance around its point)
    whose box overlaps no earlier label and no marker and stays inside the axes; if none is free,
    the candidate with the least overlap. Labels placed away from their point keep a thin leader
    line (a tiny stand-in for adjustText, which we do not depend on)."""
    from matplotlib.transforms import Bbox
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    inside = ax.get_window_extent(r)
    # every marker is an obstacle: a 16x16 px box around its point (display coordinates)
    markers = [Bbox.from_bounds(*(ax.transData.transform(t.xy) - 8), 16, 16) for t in texts]
    near = [(4, 4), (4, -12), (-4, 4), (-4, -12)]
    offsets = near + [(sx * dx, sy * dy) for dx, dy in ((6, 16), (14, 26), (24, 36), (40, 48))
                      for sx in (1, -1) for sy in (1, -1)] + [(0, 30), (0, -40), (0, 56), (0, -66)]

    def overlap(a, b) -> float:
        w = min(a.x1, b.x1) - max(a.x0, b.x0)
        h = min(a.y1, b.y1) - max(a.y0, b.y0)
        return w * h if w > 0 and h > 0 else 0.0

    def place(t, dx, dy):
        t.xyann = (dx, dy)
        t.set_horizontalalignment("left" if dx > 0 else ("center" if dx == 0 else "right"))
        return t.get_window_extent(r)

    placed = []
    for k, t in enumerate(texts):
        best = None
        for dx, dy in offsets:
            bb = place(t, dx, dy)
            outside = not (bb.x0 >= inside.x0 and bb.x1 <= inside.x1 and bb.y0 >= inside.y0 and bb.y1 <= inside.y1)
            cost = (sum(overlap(bb, p) for p in placed)
                    + sum(overlap(bb, m) for i, m in enumerate(markers) if i != k) + (1e9 if outside else 0.0))
            if best is None or cost < best[0]:
                best = (cost, dx, dy)
            if cost == 0:
                break
        _, dx, dy = best
        place(t, dx, dy)
        if t.arrow_patch is not None:
            t.arrow_patch.set_visible((dx, dy) not in near)
        placed.append(t.get_window_extent(r))


# ---- reports of `run` and `demo` directories, rebuilt from RUN/cells/*.json alone

# the published numbers: the poster's main table, KeepLoRA from the web version (docs/index.html)
PAPER_RESULTS = REPO_DIR / "configs" / "paper_results.json"
RUN_CSV_COLS = ["domain", "paradigm", "method", "status", "trainable_params", "target", "general",
                "target_gain", "forgetting"]


def infer_paper_model(spec: str | None) -> str | None:
    """The paper's model key for a model spec (hub id or local dir name), or None."""
    s = str(spec or "").lower()
    if "qwen2.5-7b" in s and "instruct" not in s:
        return "qwen2.5-7b"
    if "llama-3.2-3b" in s and "instruct" in s:
        return "llama-3.2-3b-instruct"
    return None


def paper_lookup(row: dict, model_key: str | None, domain: str, table: dict) -> dict | None:
    """The published (params, Target, General) of the paper's cell matching `row`, or None."""
    if model_key is None:
        return None
    base = row["paradigm"] == "Base"
    train = "SFT" if base else {"SFT": "SFT", "GRPO": "RLVR"}.get(row["paradigm"])
    method = "Base" if base else METHOD_NAMES.get(row.get("peft_method"))
    hp = "-" if base else paper_hp(row.get("peft_method"), row.get("hparams") or {})
    for pr in table["rows"]:
        if (pr["train"], pr["method"], pr["hp"]) == (train, method, hp) and domain in pr.get(model_key, {}):
            t, g = pr[model_key][domain]
            return {"params": pr[model_key]["params"], "target": t, "general": g, "table": pr["table"]}
    return None


def paper_columns(rows: list[dict], model_key: str | None, domain: str, model_spec: str):
    """(per-row published numbers, None where no cell matches, or None for the whole table when
    no row matches; a note saying where the numbers come from, or that none match)."""
    table = json.loads(PAPER_RESULTS.read_text())
    cols = [paper_lookup(r, model_key, domain, table) for r in rows]
    n = sum(c is not None for c in cols)
    if n == 0:   # no empty columns: the note says why
        return None, (f"--paper: no row of this run matches a published PEFT-Arena cell. The paper reports "
                      f"{' and '.join(table['models'].values())} only (its main table); this run's model is "
                      f"{model_spec!r}" + (f" (matched as {model_key})" if model_key else "") + ".")
    tables = sorted({c["table"] for c in cols if c})
    return cols, (f"Paper columns: published Target / General (%) and trainable parameters of "
                  f"{table['models'][model_key]}, target {domain}, from configs/paper_results.json "
                  f"({'; '.join(tables)}); {n} of {len(rows)} rows matched.")


def read_run_rows(run: Path) -> list[dict]:
    """Every cell row of a `run` directory (finished or failed), in grid order."""
    rows = []
    for p in sorted((run / "cells").glob("*.json")):
        if p.name.endswith(".eval.json"):
            continue
        r = json.loads(p.read_text())
        if isinstance(r, dict) and "cell" in r:
            rows.append(r)
    return sorted(rows, key=lambda r: r["index"])


def config_paper_model(run: Path) -> str | None:
    """The `paper_model` of the config a `run` directory was made from (RUN/config.json), or None:
    `report --paper` then compares with that model without --paper-model (the flag still wins)."""
    try:
        saved = json.loads((run / "config.json").read_text())
    except (OSError, ValueError):
        return None
    cfg = saved.get("config") if isinstance(saved, dict) else None
    return cfg.get("paper_model") if isinstance(cfg, dict) else None


def _domain_report(rows: list[dict], d: str, model: str, png: Path, paper_key) -> tuple[list, str]:
    """One target domain's part of a run's leaderboard.md (its table, the paper's columns when
    `paper_key` is not False, the failed cells) and its scatter; returns (markdown lines, note)."""
    ok = [r for r in rows if r["domain"] == d and r["status"] == "ok"]
    md, cols, note = [f"## Target: {d}", ""], None, None
    if paper_key is not False:
        cols, note = paper_columns(ok, paper_key, d, model)
    md.append(leaderboard_markdown(ok, paper=cols) if ok else "(no finished cell yet)\n")
    if note is not None:
        md += [note, ""]
    bad = [r for r in rows if r["domain"] == d and r["status"] != "ok"]
    if bad:
        md += ["Failed cells (tracebacks next to the cell files):", ""]
        md += [f"- {r['cell']}: {r['error'].splitlines()[0][:200]} (`{r['traceback']}`)" for r in bad] + [""]
    plottable = [r for r in ok if r["target_gain"] is not None and r["forgetting"] is not None]
    if plottable:
        plot_scatter(plottable, png, title=f"Stability-plasticity trade-off: {model}, target {d}")
    return md, note


def write_run_report(run: Path, *, paper: bool = False, paper_model: str | None = None) -> list[str]:
    """results.json, results.csv, leaderboard.md and one scatter per domain, from cells/*.json.
    `run` writes these after every cell; `python arena.py report RUN` calls the same function."""
    # everything is rebuilt from the cell files, so a report never depends on the process that ran
    # the cells (`report` after a crash, or after cells were trained on another node, is the same)
    rows = read_run_rows(run)
    domains = list(dict.fromkeys(r["domain"] for r in rows))
    model = next((r["model"] for r in rows if r.get("model")), "?")
    key = (paper_model or config_paper_model(run) or infer_paper_model(model)) if paper else False
    bases = {r["domain"]: {"target": r["target"], "general": r["general"]}
             for r in rows if r["paradigm"] == "Base" and r["status"] == "ok"}
    failed = [r["cell"] for r in rows if r["status"] != "ok"]
    atomic_write_json(run / "results.json", {"kind": "arena-run", "name": run.name, "model": model,
                                             "base": bases, "rows": rows, "failed": failed})
    atomic_write_csv(run / "results.csv", RUN_CSV_COLS, rows)
    md, notes = [f"# {run.name}: {model}", ""], []
    for d in domains:
        png = run / ("stability_plasticity.png" if len(domains) == 1 else f"stability_plasticity-{d}.png")
        section, note = _domain_report(rows, d, model, png, key)
        md += section
        notes += [note] if note is not None else []
    atomic_write_text(run / "leaderboard.md", "\n".join(md).rstrip() + "\n")
    return notes


def _toy_param_count() -> int:
    """Parameters of the toy base from its config alone (meta device; no weights read)."""
    skel, n_layers = model_skeleton(transformers.AutoConfig.from_pretrained(TOY_MODEL_DIR))
    return _scaled_count(skel, n_layers, trainable_only=False)


def write_demo_report(run: Path, *, paper: bool = False, paper_model: str | None = None) -> list[str]:
    """The demo's results.json / results.csv / leaderboard.md / scatter, rebuilt from cells/*.json
    (base.json = the base model's evaluate.py result; <PARADIGM>-<label>.json = one row each)."""
    base = json.loads((run / "cells" / "base.json").read_text())
    found = {}
    for p in (run / "cells").glob("*.json"):
        if p.name != "base.json" and not p.name.endswith(".eval.json"):
            r = json.loads(p.read_text())
            found[(r["paradigm"], r["method"])] = r
    cfg = json.loads((run / "config.json").read_text()) if (run / "config.json").exists() else {}
    # rows in the order the demo ran them (its config.json holds the exact lists)
    sft_cells, grpo_cells = SFT_CELLS, GRPO_CELLS
    if cfg.get("sft_cells") is not None:
        sft_cells, grpo_cells = cfg["sft_cells"], cfg.get("grpo_cells", [])
    order = [("SFT", c[0]) for c in sft_cells] + [("GRPO", c[0]) for c in grpo_cells]
    rank = {k: i for i, k in enumerate(order)}
    keys = sorted(found, key=lambda k: (rank.get(k, len(rank)), k[0] != "SFT", k[1]))
    rows = [_row("Base", "Base", "base", {}, base, base, _toy_param_count(), 0.0)] + [found[k] for k in keys]
    write_report(run, rows, base)
    if not paper:
        return []
    domain = cfg.get("domain", base.get("domain", "math"))
    cols, note = paper_columns(rows, paper_model, domain, "toy")
    atomic_write_text(run / "leaderboard.md", leaderboard_markdown(rows, paper=cols) + "\n" + note + "\n")
    return [note]


def cmd_report(args) -> int:
    run = Path(args.run_dir)
    cells = run / "cells"
    if not cells.is_dir():
        print(f"{run}: no cells/ directory (is it a `run` or `demo` output directory?)", file=sys.stderr)
        return 2
    if read_run_rows(run):
        notes = write_run_report(run, paper=args.paper, paper_model=args.paper_model)
    elif (cells / "base.json").exists():
        notes = write_demo_report(run, paper=args.paper, paper_model=args.paper_model)
    else:
        print(f"{run}: cells/ holds no cell results yet", file=sys.stderr)
        return 2
    print((run / "leaderboard.md").read_text())
    for n in notes if args.paper else []:
        print(f"[report] {n}")
    print(f"[report] rebuilt {run}/results.json, results.csv, leaderboard.md and the scatter plot(s) "
          f"from {run}/cells/*.json")
    return 0


def cmd_demo(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    run = Path(args.out or f"runs/demo-{args.domain}{'-quick' if args.quick else ''}")
    t0 = time.time()
    rows = run_demo(run, domain=args.domain, quick=args.quick)
    print()
    print(leaderboard_markdown(rows))
    print(f"[demo] finished in {time.time() - t0:.0f} s; outputs in {run}/ (results.json, results.csv, "
          f"leaderboard.md, stability_plasticity.png)")
    return 0


# -----------------------------------------------------------------------------
# the command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="arena.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    threads = dict(type=int, default=0, help="torch CPU threads (0 = torch default)")

    s = sub.add_parser("pretrain-toy", help="pretrain the miniature toy base model (CPU)")
    g = s.add_argument_group("output")
    g.add_argument("--out", default=str(TOY_MODEL_DIR), help="directory to write (default: the committed toy_model/)")
    g = s.add_argument_group("training")
    g.add_argument("--seed", type=int, default=0, help="random seed (data stream and init)")
    g.add_argument("--steps", type=int, default=None, help="optimiser steps (default: toy_world.PRETRAIN_DEFAULTS)")
    g.add_argument("--batch-size", type=int, default=None, help="sequences per step")
    g.add_argument("--lr", type=float, default=None, help="peak learning rate")
    g.add_argument("--threads", **threads)
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = s.add_argument_group("calibration")
    g.add_argument("--skip-calibration", action="store_true", help="do not score the result")
    g.add_argument("--n", type=int, default=200, help="held-out test items per family for the calibration")
    s.set_defaults(func=cmd_pretrain_toy)

    s = sub.add_parser("calibrate", help="score a model on every toy family (general and both targets)")
    s.add_argument("--model", default="toy", help="model spec: toy | local HF dir | hub id")
    s.add_argument("--n", type=int, default=200, help="held-out test items per family")
    s.add_argument("--batch-size", type=int, default=128, help="generation batch size (prompts)")
    s.add_argument("--threads", **threads)
    s.add_argument("--out", default=None, help="optional JSON file for the full results")
    s.set_defaults(func=cmd_calibrate)

    s = sub.add_parser("demo", help="the paper's story on the toy world (CPU, minutes)")
    s.add_argument("--domain", choices=["math", "med"], default="math", help="target domain")
    s.add_argument("--quick", action="store_true", help="3 methods, fewer steps and items")
    s.add_argument("--out", default=None, help="run directory (default runs/demo-<domain>[-quick])")
    s.add_argument("--threads", **threads)
    s.set_defaults(func=cmd_demo)

    s = sub.add_parser("run", help="a config-driven grid (domains x paradigms x methods) on the toy or a "
                       "real model; validated before training, resumable")
    g = s.add_argument_group("config")
    g.add_argument("--config", required=True, help="YAML or JSON run config (configs/toy_grid.yaml, "
                   "configs/paper_qwen2.5-7b.yaml, configs/paper_llama-3.2-3b-instruct.yaml)")
    g.add_argument("--out", default=None, help="run directory (default: the config's `out`, else runs/<name>)")
    g.add_argument("--validate-only", "--dry-run", action="store_true",
                   help="print the planned cells and the validation result; train nothing")
    g.add_argument("--allow-hub", action="store_true",
                   help="a hub model id missing from the local HF cache is a warning, not an error "
                   "(load_model then downloads it when the first cell starts)")
    g = s.add_argument_group("runtime")
    g.add_argument("--threads", **threads)
    g.add_argument("--progress", action="store_true", help="training progress bars (tqdm)")
    s.set_defaults(func=cmd_run)

    s = sub.add_parser("report", help="rebuild results.json/.csv, leaderboard.md and the scatter of a `run` "
                       "or `demo` directory from its cells/*.json")
    s.add_argument("run_dir", help="a directory written by `arena.py run` or `arena.py demo`")
    s.add_argument("--paper", action="store_true", help="put the paper's published Target/General "
                   "(configs/paper_results.json: the poster's main table) beside ours where the cell matches")
    s.add_argument("--paper-model", choices=["qwen2.5-7b", "llama-3.2-3b-instruct"], default=None,
                   help="which published model to compare with (default: inferred from the model spec)")
    s.set_defaults(func=cmd_report)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(loading.run_cli("arena.py", main, resume_hint="rerun the same command: finished cells are "
                             "kept and an interrupted cell resumes from its last checkpoint"))
