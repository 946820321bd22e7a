"""arena.py — the PEFT-Arena command line: build the miniature world, score models on both axes,
run the arena's grids (toy demo, or any model from a config file) and rebuild their reports.

    python arena.py pretrain-toy              # re-create the committed toy base (CPU)
    python arena.py calibrate                 # both-axis scores of the toy base (README table)
    python arena.py demo [--quick]            # the paper's story on the toy world
    python arena.py findings [--smoke]        # each claim tested over seeds, with intervals
    python arena.py run --config configs/toy_grid.yaml [--validate-only]   # a config grid
    python arena.py report runs/toy-grid [--paper]   # tables + scatter again, from cells/*.json alone

Paper: PEFT-Arena (Huang et al. 2026, arXiv 2605.28819) §2-§3, its thesis that PEFT is a stability-
plasticity trade-off. Every model gets two numbers (§3.2):
    Target  = score on the domain's benchmarks                       (plasticity)
    General = mean of BBH, IFEval and NQ                             (stability)
and every trained cell is read against its base model (§4.1):
    Target gain = Target - Target(base),  Forgetting = General(base) - General.
The grid is {Qwen2.5-7B, Llama-3.2-3B-Instruct} x {math, medical} x {SFT, RLVR} x the methods of the
main table (the release's poster, docs/static/pdfs/peft-arena-poster.pdf; "the release" =
github.com/Sphere-AI-Lab/PEFT-Arena). The best methods sit on the Pareto frontier of the plane
(Target gain, -Forgetting). Nothing imports this file: it only calls the training, evaluation and
analysis files, which stand on their own.

`run` reads one YAML/JSON config (keys documented in configs/toy_grid.yaml), checks all of it before
anything trains, then runs the cells in order. Each cell writes RUN/cells/<paradigm>-<domain>-<label>.json
(status ok with the scores, or failed with the error and a traceback file); a rerun skips finished
cells, resumes half-trained ones through the training file's --resume, and retries failed ones.
Exit code: 0 all cells done, 1 a cell failed (the grid went on), 2 the config is invalid (nothing
trained), 3 budget.max_minutes reached (rerun to continue).

Deviations (they change a number the paper reports)
1. The toy world (toy_world.py) stands in for the paper's benchmarks on CPU; see its docstring.
2. Demo: VeRA's paper rank 256 exceeds the toy's 128-wide layers, so the toy uses r = 64.
3. Demo: the toy needs larger learning rates and far fewer steps than the paper's 2e-4 x 4 epochs.

Implementation notes
1. Cells train one after another. The paper trains each on one 8-GPU node with FSDP; here, with
   `gpus: N > 1`, Full FT SFT cells run under `torchrun --nproc_per_node N train_sft.py` (FSDP2) and
   every other cell trains in this process on one GPU (GRPO Full FT of a 7B model fits only with
   `optimizer_offload: cpu`). A cell trained elsewhere into RUN/<paradigm>/<domain>/<label> is scored.
2. Validation is the training scripts' own checks (their parsers and resolve_config) plus
   peft_methods.apply_peft on a 1-layer meta-device copy of the architecture (every decoder layer of
   Qwen2 / Llama has the same Linear shapes; weights are never loaded), plus what only a grid has
   (cells, labels, domains). For a real model memory.py plans each cell (fake tensors, one step) and
   a cell whose per-GPU peak exceeds 92% of `gpu_memory_gib` is refused.
3. Each checkpoint is scored by one evaluate.py call per suite (the domain's target suite, then the
   general suite); the base model's general suite is scored once and shared by both domains.
4. `report --paper` compares with the poster's main table (configs/paper_results.json).
"""
from __future__ import annotations

import argparse
import copy
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
import findings
import geometry
import loading
import memory
import peft_methods
import rewind
import toy_world
import train_grpo
import train_sft
from loading import REPO_DIR, TOY_MODEL_DIR, atomic_write_csv, atomic_write_json, atomic_write_text

# =============================================================================
# 1. The two axes of one model and one leaderboard row (PEFT-Arena §3.2, §4.1)


def _row(paradigm, label, method, hp, res, base, params, seconds):
    """One leaderboard row: the two axes, and both measured against the base model (the paper's
    Target gain = plasticity, Forgetting = base General - General = lost stability)."""
    # PEFT-Arena §4.1:  gain(m) = Target(m) - Target(base),  forgetting(m) = General(base) - General(m);
    # rounded to 0.01 points here and nowhere else (the tables print these numbers)
    return {"paradigm": paradigm, "method": label, "peft_method": method, "hparams": hp,
            "trainable_params": params, "target": round(res["target_score"], 2),
            "general": round(res["general_score"], 2),
            "target_gain": round(res["target_score"] - base["target_score"], 2),
            "forgetting": round(base["general_score"] - res["general_score"], 2),
            "families": {f: round(v["score"], 2) for f, v in res["families"].items()},
            "train_seconds": seconds}


def pareto_indices(points: list[tuple[float, float]]) -> list[int]:
    """Indices of points not dominated in (x, y), both to be maximised (the paper's Pareto frontier
    of plasticity x stability), sorted by x."""
    # m is dominated when another point is at least as good on both axes and better on one: no
    # method then beats it on plasticity without losing stability, so it lies on the frontier
    keep = [i for i, (x, y) in enumerate(points)
            if not any(x2 >= x and y2 >= y and (x2 > x or y2 > y) for j, (x2, y2) in enumerate(points) if j != i)]
    return sorted(keep, key=lambda i: points[i][0])


# =============================================================================
# 2. pretrain-toy and calibrate: the toy base and its both-axis scores


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
        return cmd_calibrate(argparse.Namespace(model=str(out), n=args.n, out=None, threads=args.threads,
                                                batch_size=128))
    return 0


def cmd_calibrate(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = loading.load_model(args.model, device="cpu", dtype="float32")
    t0 = time.time()
    # one pass scores all five toy families; the med target is read off the same result
    res = evaluate.evaluate_toy(model, tok, domain="math", n_per_family=args.n, batch_size=args.batch_size)
    dt, fam = time.time() - t0, res["families"]
    print(f"toy calibration of {args.model} ({args.n} held-out test items per family, greedy; {dt:.0f} s):")
    rows = [("general (mean of 3)", res["general_score"])] + [(f"  {f}", fam[f]["score"]) for f in ("ifeval", "nq", "bbh")]
    rows += [("target: math", res["target_score"]), ("target: med", fam["med"]["score"])]
    w = max(len(r[0]) for r in rows)
    print("\n".join(f"{name:<{w}}  {score:6.1f}" for name, score in rows))
    # the toy base must know the general families and leave room to learn on both targets
    ok = res["general_score"] >= 85 and 15 <= fam["math"]["score"] <= 50 and 15 <= fam["med"]["score"] <= 50
    print("calibration bar (general >= 85, each target in [15, 50]):", "met" if ok else "NOT met")
    if args.out:
        atomic_write_json(Path(args.out), {"model": args.model, "n_per_family": args.n,
                                           "seconds": round(dt, 1), "results": res})
    return 0


# =============================================================================
# 3. demo: the paper's main table in miniature (the poster's layout), every cell resumable

# (label, method, hyperparameters): the main table's SFT rows on the toy base (VeRA r64: Deviation 2)
SFT_CELLS = [
    ("Full FT", "full", {}), ("OFT b16", "oft", {"block_size": 16}), ("OFT b32", "oft", {"block_size": 32}),
    ("LoRA r4", "lora", {"r": 4, "alpha": 8}), ("LoRA r8", "lora", {"r": 8, "alpha": 16}),
    ("LoRA r16", "lora", {"r": 16, "alpha": 32}), ("AdaLoRA r8", "adalora", {}),
    ("PiSSA r8", "pissa", {"r": 8, "alpha": 16}), ("MiLoRA r8", "milora", {"r": 8, "alpha": 16}),
    ("MiSS r8", "miss", {"r": 8}), ("VeRA r64", "vera", {"r": 64}), ("DoRA r8", "dora", {"r": 8, "alpha": 16}),
    ("IA3", "ia3", {}), ("KeepLoRA r8", "keeplora", {"r": 8, "alpha": 16}),
]
GRPO_CELLS = [("Full FT", "full", {}), ("OFT b16", "oft", {"block_size": 16}),
              ("LoRA r8", "lora", {"r": 8, "alpha": 16})]
QUICK_SFT = {"Full FT", "OFT b16", "LoRA r8"}
INTERP_CELLS = ["Full FT", "LoRA r8", "OFT b16"]
# Toy budgets (Deviation 3), sized for a laptop CPU: 14 SFT cells x 120 steps, 3 GRPO cells x 12
# rollout steps (train_grpo.TOY_PRESET: batch, G, lengths, LRs), 100 test items per family.
DEMO = {
    "full": dict(sft_steps=120, quick_sft_steps=60, n_per_family=100, quick_n=50,
                 grpo_steps=12, quick_grpo_steps=0, grid="0:1:0.2", quick_grid="0:1:0.5"),
    "sft": dict(global_batch=16, micro_batch=16, lr_full=1e-3, lr_peft=3e-3, n_train=2000),
}


def slug(label: str) -> str:
    return label.lower().replace(" ", "-")


def _toy_model(ckpt: Path | None = None):
    """The toy base, with the adapter or full weights of `ckpt` loaded when given."""
    model, tok = loading.load_model("toy", device="cpu", dtype="float32")
    if ckpt is not None:
        peft_methods.load_adapter(model, ckpt)
    return model, tok


def _score_checkpoint(ckpt: Path | None, *, domain, n, base_general):
    """Both axes of the toy base (+ `ckpt`) on the toy suite (one pass, all five families)."""
    model, tok = _toy_model(ckpt)
    return evaluate.evaluate_toy(model, tok, domain=domain, n_per_family=n, base_general=base_general,
                                 batch_size=128)


def _train_demo_cell(paradigm: str, method: str, hp: dict, ckpt_root: Path, *, domain: str, quick: bool) -> None:
    """train_sft.train / train_grpo.train of one demo cell into ckpt_root (resumed if started)."""
    P = DEMO["full"]
    resume, overwrite = loading.resume_or_overwrite(ckpt_root)
    common = dict(model="toy", method=method, task=f"toy-{domain}", out=str(ckpt_root), resume=resume,
                  overwrite=overwrite, no_progress=False, **hp)
    if paradigm == "SFT":
        S, steps = DEMO["sft"], P["quick_sft_steps"] if quick else P["sft_steps"]
        train_sft.train(dict(common, n_train=S["n_train"], global_batch=S["global_batch"],
                             micro_batch=S["micro_batch"], epochs=8, max_steps=steps,
                             lr=S["lr_full"] if method == "full" else S["lr_peft"],
                             save_every_steps=max(1, steps // 5)))
    else:
        steps = P["quick_grpo_steps"] if quick else P["grpo_steps"]
        train_grpo.train(dict(common, preset="toy", steps=steps, save_every_steps=steps))


def _demo_cell(run: Path, paradigm: str, cell: tuple, base: dict, *, domain: str, n: int, quick: bool,
               tag: str, log) -> dict:
    """Train (unless a finished run is there) and score one demo cell; writes its cell files."""
    label, method, hp = cell
    ckpt_root, t0 = run / paradigm.lower() / slug(label), time.time()
    final = loading.finished_checkpoint(ckpt_root)
    if final is None:
        log(f"[demo] {tag} {paradigm} {label}: training")
        _train_demo_cell(paradigm, method, hp, ckpt_root, domain=domain, quick=quick)
        final = loading.finished_checkpoint(ckpt_root)
        if final is None:
            raise RuntimeError(f"{paradigm} {label}: training ended without a final checkpoint in {ckpt_root}")
    seconds = round(time.time() - t0, 1)
    res = _score_checkpoint(final, domain=domain, n=n, base_general=base["general_score"])
    row = _row(paradigm, label, method, hp, res, base, peft_methods.count_trainable(_toy_model(final)[0]), seconds)
    row["checkpoint"] = str(final)
    path = run / "cells" / f"{paradigm}-{slug(label)}.json"
    atomic_write_json(path.with_suffix(".eval.json"), res)   # evaluate.py results (geometry reads it)
    atomic_write_json(path, row)
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
    n_base = sum(p.numel() for p in _toy_model()[0].parameters())
    rows = [_row("Base", "Base", "base", {}, base, base, n_base, 0.0)]
    log(f"[demo] base: target {base['target_score']:.1f}  general {base['general_score']:.1f}")
    # 2. the grid: SFT rows, then the RLVR (GRPO) rows; a finished cell is read back, not rerun
    sft_cells = [c for c in SFT_CELLS if not quick or c[0] in QUICK_SFT]
    grpo_cells = [] if quick and not P["quick_grpo_steps"] else GRPO_CELLS
    plan = [("SFT", c) for c in sft_cells] + [("GRPO", c) for c in grpo_cells]
    for i, (paradigm, c) in enumerate(plan, 1):
        path = run / "cells" / f"{paradigm}-{slug(c[0])}.json"
        if path.exists():
            rows.append(json.loads(path.read_text()))
            log(f"[demo] {i}/{len(plan)} {paradigm} {c[0]}: done earlier (skipped)")
        else:
            rows.append(_demo_cell(run, paradigm, c, base, domain=domain, n=n, quick=quick,
                                   tag=f"{i}/{len(plan)}", log=log))
    # 3. the tables and the scatter, then the analyses of the SFT checkpoints (geometry.py: spectra,
    # CSD, activation geometry; rewind.py: interpolation paths back to the base, SafeRho / MinRho)
    write_report(run, rows, base)
    sft = [r for r in rows if r["paradigm"] == "SFT"]
    if not quick and not (run / "geometry" / "correlations.md").exists():
        argv = ["--base", "toy", "--domain", domain, "--out", str(run / "geometry"), "--max-prompts", "100",
                "--max-tokens", "2048", "--base-results", str(base_path)]
        for r in sft:
            argv += ["--checkpoint", r["checkpoint"], "--label", slug(r["method"]),
                     "--results", str(run / "cells" / f"SFT-{slug(r['method'])}.eval.json")]
        log(f"[demo] geometry over {len(sft)} SFT checkpoints")
        geometry.main(argv)
    if not (run / "interpolation" / "results.json").exists():
        grid = P["quick_grid"] if quick else P["grid"]
        argv = ["--base", "toy", "--domain", domain, "--grid", grid, "--out", str(run / "interpolation"),
                "--n-per-family", str(n), "--max-train-points", "3", "--rewind", "saferho", "--rewind", "minrho"]
        roots = [str(Path(r["checkpoint"]).parent) for r in sft if r["method"] in INTERP_CELLS]
        for r in roots:
            argv += ["--checkpoint", r]
        log(f"[demo] interpolation paths for {len(roots)} SFT runs on grid {grid}")
        rewind.main(argv)
    return rows


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


# =============================================================================
# 4. run: a config-driven grid (domains x paradigms x methods) on the toy or a real model
#
# One config file describes one model's grid (configs/paper_qwen2.5-7b.yaml,
# configs/paper_llama-3.2-3b-instruct.yaml, the CPU-sized configs/toy_grid.yaml). All of it is
# checked BEFORE anything trains (`validate_config`); every problem is reported at once, naming
# the file, the cell(s) and the field, e.g.
#     toy.yaml: cell sft/math/LoRA r0: methods[1].hparams.r = 0: lora: rank r=0 is invalid ...

PARADIGMS = {"sft": "SFT", "grpo": "GRPO"}       # config name -> table label (the paper's RLVR = GRPO)
ALIASES = {"rlvr": "grpo", "medical": "med"}
DOMAINS = ("math", "med")
RUN_KEYS = ("name", "out", "model", "shapes", "paper_model", "dtype", "device", "gpus", "gpu_memory_gib",
            "domains", "paradigms", "data", "train", "methods", "eval", "budget")
DTYPES = ("float32", "fp32", "bfloat16", "bf16", "float16", "fp16")
METHOD_KEYS = ("label", "method", "hparams", "paradigms", "train")
# eval settings and their defaults; they become evaluate.py flags (see _eval_argv)
EVAL_DEFAULTS = {"suite": None, "n_per_family": 100, "batch_size": 64, "max_new_tokens": None, "seed": 0,
                 "limit": None, "data_dir": "data", "paths": {}, "bbh_prompt_dir": None, "backend": "auto",
                 "num_samples": None, "temperature": None, "allow_hub": False, "vllm_gpu_memory_utilization": None}
# train_sft / train_grpo keys that arena.py sets itself, from model / method / hparams / device / dtype
ARENA_OWNED = {"model", "method", "out", "resume", "overwrite", "r", "alpha", "block_size", "dropout",
               "hp", "smoke", "device", "dtype"}
DRY_RUN_KEYS = {"dry_run", "gpus", "gpu_memory_gib"}   # the scripts' memory-plan flags (memory.py)
HPARAM_FLAGS = ("r", "alpha", "block_size", "dropout")     # peft_methods.hparams_from_flags flags
METHOD_NAMES = {"full": "Full FT", "lora": "LoRA", "dora": "DoRA", "pissa": "PiSSA", "milora": "MiLoRA",
                "keeplora": "KeepLoRA", "adalora": "AdaLoRA", "vera": "VeRA", "ia3": "IA3",
                "miss": "MiSS", "oft": "OFT"}
_MISSING = object()
SCRIPTS = {"sft": train_sft, "grpo": train_grpo}


class _YamlLoader(yaml.SafeLoader):
    """YAML 1.1 reads `2e-4` as a STRING (PyYAML wants `2.0e-4`); this loader also resolves the
    dot-less exponent form as a float, as YAML 1.2 does."""


_YamlLoader.add_implicit_resolver("tag:yaml.org,2002:float",
                                  re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"), list("-+0123456789."))


def read_config(path: Path) -> dict:
    """A run config from YAML (.yaml/.yml) or JSON."""
    text = path.read_text()
    return json.loads(text) if path.suffix.lower() == ".json" else (yaml.load(text, Loader=_YamlLoader) or {})


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


def _unknown(d: dict, field: str, known, add, what: str = "key") -> None:
    """Every key of mapping `d` not in `known` is a problem (with the closest known key, if any)."""
    for k in d:
        if k not in known:
            close = difflib.get_close_matches(str(k), list(known), n=1)
            add(f"{field}{k}", d[k], f"unknown {what}" + (f" (did you mean {close[0]!r}?)" if close else "")
                + f"; known: {', '.join(known)}")


def _check_train_settings(paradigm: str, settings, field: str, add) -> None:
    """Each key must be a train_sft.py / train_grpo.py config key (argparse dest) that arena.py does
    not set itself; values are checked later by the script's own resolve_config, per cell."""
    script = f"train_{paradigm}.py"
    if not isinstance(settings, dict):
        return add(field, settings, f"expected a mapping of {script} settings")
    dests = [a.dest for a in SCRIPTS[paradigm].build_parser()._actions if a.dest not in ARENA_OWNED | {"help"}]
    for k, v in settings.items():
        if k in ARENA_OWNED:
            add(f"{field}.{k}", v, "set by arena.py from model / method / hparams / device / dtype; remove it here")
        elif k in DRY_RUN_KEYS:
            add(f"{field}.{k}", v, "a --dry-run setting of the script; arena.py plans memory itself "
                "(--validate-only) from the config's top-level gpus / gpu_memory_gib")
        elif k not in dests:
            close = difflib.get_close_matches(k, dests, n=1)
            add(f"{field}.{k}", v, f"unknown {script} setting" + (f" (did you mean {close[0]!r}?)" if close else "")
                + f"; see `python {script} --help` (flag --x-y = key x_y)")


def _paradigm_blocks(blocks, field: str, add) -> dict:
    """{paradigm: script settings} (train, data.<domain>, methods[i].train), aliases mapped."""
    if not isinstance(blocks, dict):
        add(field, blocks, "expected a mapping {sft: {...}, grpo: {...}}")
        return {}
    blocks = {ALIASES.get(p, p): v for p, v in blocks.items()}
    _unknown(blocks, f"{field}.", PARADIGMS, add, "paradigm")
    for p in PARADIGMS:
        if p in blocks:
            _check_train_settings(p, blocks[p] or {}, f"{field}.{p}", add)
    return blocks


def _names(vals, key: str, known, add) -> list[str]:
    """domains / paradigms: a non-empty list of known names (aliases mapped), none twice."""
    if not isinstance(vals, list) or not vals:
        add(key, vals, f"required: a non-empty list from {list(known)}")
        return []
    out = []
    for i, v in enumerate(vals):
        v2 = ALIASES.get(v, v)
        if v2 not in known or v2 in out:
            add(f"{key}[{i}]", v, "listed twice" if v2 in out else f"unknown; known: {', '.join(known)}")
        else:
            out.append(v2)
    return out


def resolve_model(spec: str, shapes: str | None, *, allow_hub: bool = False):
    """(hf_config or None, where it came from, error or None, warnings). Reads configs only, offline:
    'toy' and local directories from disk, a hub id only from the local Hugging Face cache
    (huggingface_hub.try_to_load_from_cache never opens a connection)."""
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
    n_layers, c.num_hidden_layers = int(c.num_hidden_layers), 1
    if isinstance(getattr(c, "layer_types", None), list):
        c.layer_types = c.layer_types[:1]
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(c)
    return model, n_layers


def _scaled_count(model, n_layers: int, trainable_only: bool = True) -> int:
    """Parameter count of the full-depth model from its 1-layer skeleton:
    total = (all - layer 0) + n_layers * layer 0 (named_parameters counts tied weights once)."""
    sizes = [(n, p.numel()) for n, p in model.named_parameters() if p.requires_grad or not trainable_only]
    layer0 = sum(k for n, k in sizes if ".layers.0." in n)
    return sum(k for _, k in sizes) - layer0 + n_layers * layer0


def _fmt_count(n) -> str:
    return "-" if n is None else _fmt_params(n)


def _positive(v, default, field: str, msg: str, add, integer: bool = False):
    """A positive number (an integer if `integer`), null = `default`; else a problem and the default."""
    v = default if v is None else v
    if v is not None and (isinstance(v, bool) or not isinstance(v, int if integer else (int, float)) or v <= 0):
        add(field, v, f"expected {msg}")
        return default
    return v


def _check_model(cfg: dict, add, warnings: list, allow_hub: bool) -> dict:
    """The model's config, resolved offline (never its weights), and its 1-layer meta skeleton."""
    model = {"hf_config": None, "where": None, "skeleton": None, "n_layers": 0, "n_params": None}
    if cfg["shapes"] and not (peft_methods.SHAPES_DIR / f"{cfg['shapes']}.json").exists():
        add("shapes", cfg["shapes"], "no such file configs/model_shapes/<shapes>.json; available: "
            + ", ".join(sorted(p.stem for p in peft_methods.SHAPES_DIR.glob("*.json"))))
    if not isinstance(cfg["model"], str) or not cfg["model"]:
        add("model", cfg["model"], "required: 'toy', a local HF model directory, or a hub id")
        return model
    hf, model["where"], err, w = resolve_model(cfg["model"], cfg["shapes"], allow_hub=allow_hub)
    warnings += w
    if err:
        add("model", cfg["model"], err)
    if hf is None:
        warnings.append("hyperparameters were NOT checked against layer shapes (no model config "
                        "available; set `shapes:` to a configs/model_shapes/*.json name)")
    else:
        sk, n = model_skeleton(hf)
        model.update(hf_config=hf, skeleton=sk, n_layers=n, n_params=_scaled_count(sk, n, trainable_only=False))
    return model


def _check_eval(cfg: dict, add, warnings: list) -> dict:
    """The eval section with its defaults filled; the values become evaluate.py flags (evaluate.py
    checks them when a model is scored), so only names and choices are checked here."""
    _unknown(cfg["eval"], "eval.", EVAL_DEFAULTS, add)
    ev = {k: d if cfg["eval"].get(k) is None else cfg["eval"][k] for k, d in EVAL_DEFAULTS.items()}
    ev["suite"] = ev["suite"] or ("toy" if cfg["model"] == "toy" else "real")
    for k, choices in (("suite", ("toy", "real")), ("backend", ("auto", "hf", "vllm"))):
        if ev[k] not in choices:
            add(f"eval.{k}", ev[k], f"must be one of {list(choices)}")
    if not isinstance(ev["paths"], dict):
        add("eval.paths", ev.pop("paths"), "expected a mapping {benchmark: file}")
        ev["paths"] = {}
    _unknown(ev["paths"], "eval.paths.", evaluate.BENCHMARKS, add, "benchmark")
    if ev["suite"] == "real":   # benchmark files are read only when a model is scored: a warning now
        names = sorted({b for d in cfg["domains"] for b in evaluate.SUITES[d]} | set(evaluate.SUITES["general"]))
        missing = [b for b in names if not _dataset_found(b, ev)]
        if missing:
            warnings.append(f"eval: no local files for benchmark(s) {', '.join(missing)} under data_dir "
                            f"{ev['data_dir']!r} (needed when the base model is scored; file layouts: "
                            "evaluate.BENCHMARKS, tests/fixtures/eval/README.md)")
    return ev


def _check_sections(raw: dict, source: str, add, warnings: list, allow_hub: bool) -> tuple[dict, dict]:
    """Every section on its own: top level, model, node, domains, paradigms, train/data settings,
    eval, budget. Returns (the normalised config, the model's info)."""
    _unknown(raw, "", RUN_KEYS, add)
    cfg = {k: raw.get(k) for k in RUN_KEYS}
    cfg["name"] = cfg["name"] or Path(source).stem
    cfg["out"] = cfg["out"] or f"runs/{cfg['name']}"
    model = _check_model(cfg, add, warnings, allow_hub)
    # the node: dtype, device, GPUs per node and memory per GPU (H100: 80 GiB; for the memory plan)
    if cfg["dtype"] is not None and cfg["dtype"] not in DTYPES:
        add("dtype", cfg["dtype"], f"must be one of {list(DTYPES)} (or null = bf16 on CUDA, fp32 on CPU)")
    if cfg["device"] is not None and str(cfg["device"]).split(":")[0] not in ("cpu", "cuda"):
        add("device", cfg["device"], "must be cpu, cuda or cuda:N (or null = cuda if available)")
    cfg["gpus"] = _positive(cfg["gpus"], 1, "gpus", "the number of GPUs of the node (an integer >= 1)", add, True)
    cfg["gpu_memory_gib"] = _positive(cfg["gpu_memory_gib"], 80.0, "gpu_memory_gib",
                                      "the memory of one GPU in GiB (H100 80, H200 141)", add)
    cfg["domains"] = _names(cfg["domains"], "domains", DOMAINS, add)
    cfg["paradigms"] = _names(cfg["paradigms"], "paradigms", tuple(PARADIGMS), add)
    cfg["train"] = _paradigm_blocks(cfg["train"] or {}, "train", add)
    for k in ("data", "eval", "budget"):     # the mappings default to {}
        if not isinstance(cfg[k] or {}, dict):
            add(k, cfg[k], "expected a mapping")
        cfg[k] = cfg[k] if isinstance(cfg[k], dict) else {}
    data = {ALIASES.get(d, d): v for d, v in cfg["data"].items()}
    _unknown(data, "data.", DOMAINS, add, "domain")
    cfg["data"] = {d: _paradigm_blocks(v, f"data.{d}", add) for d, v in data.items() if d in DOMAINS}
    cfg["eval"] = _check_eval(cfg, add, warnings)
    _unknown(cfg["budget"], "budget.", ("max_minutes",), add)
    cfg["budget"] = {"max_minutes": _positive(cfg["budget"].get("max_minutes"), None, "budget.max_minutes",
                                              "a positive number of minutes (or null = no limit)", add)}
    return cfg, model


def _dataset_found(name: str, ev: dict) -> bool:
    try:
        evaluate.find_dataset(name, ev["data_dir"], ev["paths"].get(name), allow_hub=ev["allow_hub"])
        return True
    except Exception:  # noqa: BLE001 - needed at evaluation time, not now
        return False


def _method_entries(cfg: dict, add) -> list[dict]:
    """`methods` -> [{index, field, label, method, hparams, paradigms, train}]. Labels name the cell
    files, so they must be file-safe and differ after slug()."""
    if not isinstance(cfg["methods"], list) or not cfg["methods"]:
        add("methods", cfg["methods"], "required: a non-empty list of {label, method, hparams, paradigms, train}")
        return []
    entries, labels = [], {}
    for i, m in enumerate(cfg["methods"]):
        f = f"methods[{i}]"
        if not isinstance(m, dict):
            add(f, m, "expected a mapping {label, method, hparams, paradigms, train}")
            continue
        _unknown(m, f + ".", METHOD_KEYS, add)
        hp = m.get("hparams") or {}
        if not isinstance(hp, dict):
            add(f"{f}.hparams", hp, "expected a mapping of hyperparameters")
            hp = {}
        name = str(m.get("method"))
        h = paper_hp(name, hp)     # the default label is the main table's, e.g. "LoRA r8a16"
        label = str(m.get("label") or METHOD_NAMES.get(name, name) + ("" if h == "-" else f" {h}"))
        if re.search(r"[^\w .+()\-]", label):
            add(f"{f}.label", label, "labels name files: use letters, digits, spaces and . _ + - ( ) only")
        if slug(label) in labels:
            add(f"{f}.label", label, f"same file name as methods[{labels[slug(label)]}]'s label (case and "
                "spaces aside); labels name the cells, so they must differ")
        labels.setdefault(slug(label), i)
        mp = m.get("paradigms", cfg["paradigms"])
        mp = [ALIASES.get(p, p) for p in mp] if isinstance(mp, list) else add(f"{f}.paradigms", mp, "expected a list") or []
        for j, p in enumerate(mp):
            if p not in PARADIGMS:
                add(f"{f}.paradigms[{j}]", p, f"unknown paradigm; known: {', '.join(PARADIGMS)}")
        entries.append(dict(index=i, field=f, label=label, method=m.get("method"), hparams=hp,
                            paradigms=[p for p in cfg["paradigms"] if p in mp],
                            train=_paradigm_blocks(m.get("train") or {}, f"{f}.train", add)))
    return entries


def _grid_cells(cfg: dict, entries: list[dict], add, warnings: list) -> list[dict]:
    """The grid in run order: per domain, its base model, then paradigms x methods."""
    cells = []
    for d in cfg["domains"]:
        cells.append({"id": f"base/{d}", "index": len(cells), "domain": d, "paradigm": "base", "label": "Base",
                      "method": "base", "hparams": {}, "file": f"cells/base-{d}.json"})
        for p in cfg["paradigms"]:
            for e in (e for e in entries if p in e["paradigms"]):
                cells.append({"id": f"{p}/{d}/{e['label']}", "index": len(cells), "domain": d, "paradigm": p,
                              "label": e["label"], "method": e["method"], "hparams": e["hparams"],
                              "entry": e["index"], "file": f"cells/{p}-{d}-{slug(e['label'])}.json",
                              "ckpt_dir": f"{p}/{d}/{slug(e['label'])}"})
    for e in entries:
        if not e["paradigms"] and cfg["paradigms"]:
            warnings.append(f"{e['field']} ({e['label']}): no cell: none of its paradigms is in the "
                            f"config's paradigms {cfg['paradigms']}")
    if entries and cfg["domains"] and cfg["paradigms"] and all(c["paradigm"] == "base" for c in cells):
        add("methods", None, "no cell to run: every method's `paradigms` excludes the config's paradigms")
    return cells


def _check_hparams(e: dict, cells: list[dict], cfg: dict, model: dict, cache: dict, add) -> None:
    """A method's name, then its hyperparameters through peft_methods itself: apply_peft on the
    meta skeleton per paradigm (SFT may target other modules) checks them against the real layer
    shapes and counts each cell's trainable parameters; its HparamError names the field at fault.
    Without a skeleton only make_config runs (names of the method's fields)."""
    f, name, hp = e["field"], e["method"], e["hparams"]
    if name not in peft_methods.METHODS:
        return add(f"{f}.method", name, f"unknown PEFT method; known: {', '.join(peft_methods.METHODS)}",
                   [c["id"] for c in cells])
    for p in e["paradigms"]:
        tm = None    # train_sft.py's --target-modules; train_grpo.py always uses the defaults
        if p == "sft":
            tm = {**(cfg["train"].get(p) or {}), **(e["train"].get(p) or {})}.get("target_modules")
        targets = tuple(tm.split(",")) if isinstance(tm, str) and tm else peft_methods.DEFAULT_TARGETS
        key = (name, json.dumps(hp, sort_keys=True), targets)
        if key not in cache:
            m = copy.deepcopy(model["skeleton"])
            try:
                if m is None:
                    peft_methods.make_config(name, **hp)
                else:
                    peft_methods.apply_peft(m, name, target_modules=targets, _init=False, **hp)
                cache[key] = (None if m is None else _scaled_count(m, model["n_layers"]), None, "")
            except Exception as err:  # noqa: BLE001 - the message names the module and the shapes
                cache[key] = (None, str(err), getattr(err, "field", ""))
        n, err, field = cache[key]
        pcells = [c for c in cells if c["paradigm"] == p]
        where = f" [layer shapes from {model['where']}]" if model["where"] else ""
        if err and field == "target_modules":
            add(f"train.{p}.target_modules", tm, err, [c["id"] for c in pcells])
        elif err:
            add(f"{f}.hparams" + (f".{field}" if field else ""), hp.get(field, _MISSING) if field else hp,
                err + where, [c["id"] for c in pcells])
        for c in pcells:
            c["trainable_params"] = n


def _cell_train_config(c: dict, e: dict, cfg: dict, add) -> tuple[dict, dict] | None:
    """The train_sft / train_grpo config of one cell and the config field each key came from; later
    layers win: train.<paradigm> <- data.<domain>.<paradigm> <- methods[i].train.<paradigm>."""
    d, p = c["domain"], c["paradigm"]
    layers = [(f"train.{p}", cfg["train"].get(p)), (f"data.{d}.{p}", cfg["data"].get(d, {}).get(p)),
              (f"{e['field']}.train.{p}", e["train"].get(p))]
    layers = [(fld, s if isinstance(s, dict) else {}) for fld, s in layers]
    tc, origin = {}, {}
    if not any("task" in s or "data" in s for _, s in layers):
        if cfg["model"] != "toy" and cfg["eval"]["suite"] != "toy":
            add(f"data.{d}.{p}", _MISSING, "required for a real model: the training file (data: "
                f"path.jsonl|parquet{', hub_file' if p == 'sft' else ', domain'}) or task: toy-{d}", [c["id"]])
            return None
        tc["task"] = f"toy-{d}"     # the toy world's SFT / RL rows for this domain
    dests = {a.dest for a in SCRIPTS[p].build_parser()._actions} - ARENA_OWNED   # others: _check_train_settings
    for fld, s in layers:
        tc.update({k: v for k, v in s.items() if k in dests})
        origin.update({k: f"{fld}.{k}" for k in s if k in dests})
    # the method's hyperparameters as script keys: the four flags, the rest as --hp K=V (JSON)
    hp = c["hparams"]
    tc.update(model=cfg["model"], method=e["method"], hp=[f"{k}={json.dumps(v)}" for k, v in hp.items()
                                                          if k not in HPARAM_FLAGS],
              **{k: v for k, v in hp.items() if k in HPARAM_FLAGS})
    tc.update({"device": cfg["device"]} if cfg["device"] else {})
    if p == "grpo":   # train_grpo's own dtype, and the reward of the domain for a data file
        tc.update({"dtype": cfg["dtype"]} if cfg["dtype"] else {})
        tc.update({"domain": d} if tc.get("data") and not tc.get("domain") else {})
    tc["out"] = str(Path(cfg["out"]) / c["ckpt_dir"])
    return tc, origin


def _resolve_cells(cells: list[dict], entries: dict, cfg: dict, add, warnings: list) -> None:
    """Each cell's exact training config, resolved and checked by the training script's own
    resolve_config (its loading.ConfigError names the key at fault, `.field`)."""
    missing_data: dict[tuple, list] = {}
    for c in cells:
        e = entries[c["entry"]]
        made = _cell_train_config(c, e, cfg, add) if e["method"] in peft_methods.METHODS else None
        if made is None:
            continue
        c["train"], origin = made
        p = c["paradigm"]
        try:
            c["train_resolved"] = SCRIPTS[p].resolve_config(dict(c["train"]))
        except Exception as err:  # noqa: BLE001 - the scripts' own checks
            key = getattr(err, "field", None)
            add(origin.get(key, f"train.{p}.{key}" if key else f"train.{p}"),
                c["train"].get(key, _MISSING) if key else _MISSING, str(err), [c["id"]])
            continue
        v = c["train"].get("data")     # a hub dataset id (hub_file) is fetched by train_sft
        if isinstance(v, str) and not (p == "sft" and c["train"].get("hub_file")) and not Path(v).exists():
            missing_data.setdefault((origin.get("data", "data"), v), []).append(c["id"])
    for (fld, v), ids in missing_data.items():
        warnings.append(f"{fld} = {v!r}: file not found (needed when cell {ids[0]}"
                        + (f" and {len(ids) - 1} more" if len(ids) > 1 else "") + " train)")


def cell_gpus(cell: dict, cfg: dict) -> int:
    """GPUs a cell trains on: Full FT SFT takes the node's `gpus` through torchrun (FSDP2; the paper
    trains on one 8-GPU node); every other cell trains in this process on one GPU."""
    return cfg["gpus"] if cell["paradigm"] == "sft" and cell["method"] == "full" else 1


_MEMORY_PLANS: dict[tuple, tuple] = {}   # per process: a plan is a pure function of (shapes, settings, budget)


def plan_memory(cells: list[dict], cfg: dict, hf_config, where: str, add) -> None:
    """memory.py's per-GPU peak for every cell (cached per setting: domains share it); a cell that
    cannot fit the GPUs it will get is a problem naming the estimate and what would fit."""
    budget = cfg["gpu_memory_gib"]
    shapes = hf_config.to_json_string() if hasattr(hf_config, "to_json_string") else repr(hf_config)
    for c in (c for c in cells if c.get("train_resolved") is not None):
        tr, n, full = c["train_resolved"], cell_gpus(c, cfg), c["method"] == "full"
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
        if c["memory"]["fits"]:
            continue
        # what would make it fit: memory.what_fits' alternatives, and the config key to set
        hint = ("; would fit: " + "; ".join(alts)) if alts else "; nothing tried fits"
        if c["paradigm"] == "sft" and full and cfg["gpus"] < 8:
            hint += " (set `gpus:` to the node's GPU count: Full FT SFT then runs under torchrun, FSDP2)"
        if c["paradigm"] == "grpo" and full and tr.get("optimizer_offload") != "cpu":
            hint += (" (train_grpo.py has no multi-GPU path; set the method's "
                     "`train: {grpo: {optimizer_offload: cpu}}`: fp32 masters + AdamW on the CPU)")
        add("memory", _MISSING, f"needs ~{est['peak_gib']:.1f} GiB per GPU on {n} GPU(s) ({how}; "
            f"shapes from {where}){hint}", [c["id"]])


def format_problems(problems: list[dict], source: str) -> list[str]:
    """One line per (field, value, message): '<file>: cell <id> (+N more): <field> = <value>: <msg>'."""
    merged: dict[tuple, list] = {}
    for pr in problems:
        key = (pr["field"], "" if pr["value"] is _MISSING else repr(pr["value"]), pr["msg"])
        merged.setdefault(key, [])
        merged[key] += [c for c in pr["cells"] if c not in merged[key]]
    out = []
    for (field, value, msg), cells in merged.items():
        where = f"cell {cells[0]}" + (f" (+{len(cells) - 1} more)" if len(cells) > 1 else "") + ": " if cells else ""
        out.append(f"{source}: {where}{field}{' = ' + value if value else ''}: {msg}")
    return out


def validate_config(raw, source: str = "config", *, allow_hub: bool = False) -> dict:
    """Check a run config without training or loading weights; returns the plan:
    {"config": normalised config, "cells": [...], "errors": [str], "warnings": [str],
     "model_where", "n_params", "n_layers"}. Every error names its cell(s) and field."""
    if not isinstance(raw, dict):
        return {"config": {}, "cells": [], "warnings": [],
                "errors": [f"{source}: the file must hold a mapping of settings (got {type(raw).__name__})"]}
    problems, warnings = [], []

    def add(field, value, msg, cells=()):
        problems.append({"cells": list(cells), "field": field, "value": value, "msg": msg})
    # 1. the sections on their own (every problem is collected; the checks go on after one)
    cfg, model = _check_sections(raw, source, add, warnings, allow_hub)
    entries = _method_entries(cfg, add)
    # 2. the grid, then each cell as its training script will see it (on the meta device)
    cells = _grid_cells(cfg, entries, add, warnings)
    train_cells = [c for c in cells if c["paradigm"] != "base"]
    # the hyperparameters first (per method, cached: domains share a skeleton check), then each
    # cell's training config: a cell's trainable count is known before its script ever runs
    cache: dict[tuple, tuple] = {}    # (method, hparams, targets) -> (count, error, field)
    for e in entries:
        _check_hparams(e, [c for c in train_cells if c["entry"] == e["index"]], cfg, model, cache, add)
    _resolve_cells(train_cells, {e["index"]: e for e in entries}, cfg, add, warnings)
    # 3. will each cell fit the GPUs it gets? (the toy needs no plan)
    if cfg["model"] != "toy" and model["hf_config"] is not None:
        plan_memory(train_cells, cfg, model["hf_config"], model["where"], add)
    return {"config": cfg, "cells": cells, "errors": format_problems(problems, source),
            "warnings": list(dict.fromkeys(warnings)), "model_where": model["where"],
            "n_params": model["n_params"], "n_layers": model["n_layers"]}


def cell_fingerprint(cell: dict, cfg: dict) -> str:
    """A short hash of everything that decides a cell's numbers (model, train config, eval); where
    and how fast it runs does not change them (out dir, device, eval batch size)."""
    what = {"model": cfg["model"], "dtype": cfg["dtype"],
            "eval": {k: v for k, v in cfg["eval"].items() if k != "batch_size"},
            "train": {k: v for k, v in (cell.get("train") or {}).items() if k not in ("out", "device")}}
    return hashlib.sha1(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:12]


def print_plan(plan: dict, source: str, log=print) -> None:
    cfg, cells = plan["config"], [c for c in plan["cells"] if c["paradigm"] != "base"]
    log(f"[run] {source}: model {cfg['model']!r} (shapes from {plan['model_where'] or 'nowhere'}; "
        f"{_fmt_count(plan['n_params'])} parameters), {len(cfg['domains'])} domain(s) x "
        f"{len(cfg['paradigms'])} paradigm(s): {len(cells)} cells -> {cfg['out']}")
    w, mem = max([len(c["id"]) for c in cells] + [4]), any("memory" in c for c in cells)
    log(f"  {'#':>3}  {'cell':<{w}}  {'method':<8}  {'trainable':>10}"
        + (f"  {'GiB/GPU':>8}  {'GPUs':>4}  fits" if mem else "") + "  hparams")
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
    a += ["--adapter", str(adapter)] if adapter else []
    a += ["--domain", domain] if domain else []
    if cfg["dtype"]:
        a += ["--dtype", {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16"}.get(cfg["dtype"], cfg["dtype"])]
    a += ["--device", cfg["device"]] if cfg["device"] else []
    a += ["--max-new-tokens", str(ev["max_new_tokens"])] if ev["max_new_tokens"] else []
    if suite == "toy":
        return a + ["--n-per-family", str(ev["n_per_family"])]
    a += ["--data-dir", ev["data_dir"], "--backend", ev["backend"]]
    for k in ("limit", "num_samples", "temperature", "bbh_prompt_dir", "vllm_gpu_memory_utilization"):
        if ev.get(k) is not None:     # evaluate.py's defaults otherwise (vLLM's share: 0.85)
            a += ["--" + k.replace("_", "-"), str(ev[k])]
    for name, path in sorted(ev["paths"].items()):
        a += ["--path", f"{name}={path}"]
    return a + (["--allow-hub"] if ev["allow_hub"] else [])


def evaluate_model(spec: str, adapter, domain: str, cfg: dict, out_root: Path) -> dict:
    """Both axes of one model (+ adapter) through evaluate.py (PEFT-Arena §3.2): the toy suite (all
    five families), or the real target suite of `domain` plus the general suite (General = mean of
    BBH, IFEval, NQ; evaluate.py computes both). Each suite run is cached in out_root/<suite>/
    (results.json + generations), reused when its evaluate.py flags are unchanged."""
    suites = ["toy"] if cfg["eval"]["suite"] == "toy" else [domain, "general"]
    res = {}
    try:
        for s in suites:
            out = out_root / s
            # the toy suite scores both targets in one pass and the general suite has no target, so
            # neither gets --domain: the base model's runs are then shared by every domain
            argv = _eval_argv(spec, adapter, s, domain if s in DOMAINS else None, cfg["eval"], cfg, out)
            stamp = out / "arena_eval.json"
            if (out / "results.json").exists() and stamp.exists() and json.loads(stamp.read_text()) == argv:
                res[s] = json.loads((out / "results.json").read_text())    # scored earlier, same flags
                continue
            # keep_engine: the next suite of the same model reuses the loaded vLLM engine, sized
            # (context_suites) for every suite it will serve
            res[s] = evaluate.main(argv, keep_engine=True, context_suites=[x for x in suites if x != "toy"])
            atomic_write_json(stamp, argv)
    finally:
        evaluate.release_engine()   # one vLLM engine served every suite of this model; free it
    if suites == ["toy"]:
        r = res["toy"]
        fam = {f: round(v["score"], 2) for f, v in r["families"].items()}
        return {"target": r["families"][domain]["score"], "general": r["general_score"], "families": fam}
    fam = {b: round(v["score"], 2) for s in suites for b, v in res[s].get("benchmarks", {}).items()}
    return {"target": res[domain]["target_score"], "general": res["general"]["general_score"], "families": fam}


def train_argv(settings: dict, parser) -> list[str]:
    """A train_sft.py config dict -> its command line (the inverse of parse_args for these keys)."""
    acts = {a.dest: a for a in parser._actions if a.dest != "help"}
    argv: list[str] = []
    for k, v in settings.items():
        a = acts[k]
        flag, boolopt = a.option_strings[0], isinstance(a, argparse.BooleanOptionalAction)
        if v is None or v == a.default and not boolopt:
            continue
        if isinstance(a, argparse._StoreTrueAction):
            argv += [flag] if v else []
        elif boolopt:
            argv += [flag if v else "--no-" + flag[2:]]
        elif isinstance(a, argparse._AppendAction):
            argv += [x for item in v for x in (flag, str(item))]
        else:
            argv += [flag, *(str(x) for x in v)] if a.nargs not in (None, "?") else [flag, str(v)]
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
    """Score the base model of a domain (the reference point of both axes), or train (resume, or
    reuse a finished run of) one cell and score it on both axes against that base."""
    cfg, t0 = plan["config"], time.time()
    row = {"cell": cell["id"], "index": cell["index"], "status": "ok", "domain": cell["domain"],
           "paradigm": PARADIGMS.get(cell["paradigm"], "Base"), "method": cell["label"],
           "peft_method": cell["method"], "hparams": cell["hparams"], "model": cfg["model"]}
    if cell["paradigm"] == "base":
        res = evaluate_model(cfg["model"], None, cell["domain"], cfg, run / "evals" / "base")
        return {**row, "trainable_params": plan["n_params"], "target": round(res["target"], 2),
                "general": round(res["general"], 2), "target_gain": 0.0, "forgetting": 0.0,
                "families": res["families"], "train_seconds": 0.0, "eval_seconds": round(time.time() - t0, 1)}
    # a trained cell: its checkpoint root holds the training script's own run directory (config.json,
    # global_step_<k>/, summary.json written last), so loading's run-dir helpers read its state
    ckpt_root = run / cell["ckpt_dir"]
    final = loading.finished_checkpoint(ckpt_root)     # trained earlier (or on another node): only score it
    if final is None:
        # a half-trained cell resumes through the training file's own --resume (same config, checked
        # there); a directory with files but no run config in it is cleared by --overwrite
        resume, overwrite = loading.resume_or_overwrite(ckpt_root)
        tc = dict(cell["train"], out=str(ckpt_root), resume=resume, overwrite=overwrite, no_progress=not progress)
        n_gpus = cell_gpus(cell, cfg)
        log(f"[run] {cell['id']}: {'resuming' if resume else 'training'} -> {ckpt_root}"
            + (f" (torchrun --nproc_per_node {n_gpus}; FSDP2 on CUDA)" if n_gpus > 1 else ""))
        if n_gpus > 1:
            launch_torchrun(n_gpus, tc)
        else:
            SCRIPTS[cell["paradigm"]].train(tc)
        final = loading.finished_checkpoint(ckpt_root)
        if final is None:
            raise RuntimeError(f"training ended without a final checkpoint in {ckpt_root}")
    summary = json.loads((ckpt_root / loading.RUN_SUMMARY).read_text())
    t_train, t1 = time.time() - t0, time.time()
    log(f"[run] {cell['id']}: scoring {final}")
    res = evaluate_model(cfg["model"], final, cell["domain"], cfg, run / "evals" / Path(cell["file"]).stem)
    target, general = round(res["target"], 2), round(res["general"], 2)
    ok_base = base is not None and base.get("status") == "ok"   # without one (it failed) the gains stay None
    # trainable_params: validation's count of the cell (apply_peft on the meta skeleton, the same
    # parameters the script trains); steps and train_last: loading.write_summary's schema
    return {**row, "trainable_params": cell.get("trainable_params"), "target": target, "general": general,
            "target_gain": round(target - base["target"], 2) if ok_base else None,
            "forgetting": round(base["general"] - general, 2) if ok_base else None,
            "families": res["families"], "train_seconds": round(t_train, 1),
            "eval_seconds": round(time.time() - t1, 1), "checkpoint": str(final),
            "train_steps": summary["steps"], "train_last": summary.get("train_last")}


def run_grid(plan: dict, run: Path, *, progress: bool = False, log=print) -> int:
    """Every cell in order; finished cells are skipped, failed ones retried (a failure is recorded
    with its traceback and the grid goes on). Returns the exit code: 0 all done, 1 some cell
    failed, 3 stopped by budget.max_minutes."""
    t0, budget = time.time(), plan["config"]["budget"]["max_minutes"]
    n_train, k = sum(c["paradigm"] != "base" for c in plan["cells"]), 0
    bases: dict[str, dict] = {}      # domain -> the base row its cells are measured against
    # per domain the base cell comes first (_grid_cells), so every trained cell meets its base row
    for cell in plan["cells"]:
        is_base = cell["paradigm"] == "base"
        k += not is_base
        tag = cell["id"] if is_base else f"{k}/{n_train} {cell['id']}"
        path = run / cell["file"]
        old = json.loads(path.read_text()) if path.exists() else None
        if old is not None and old.get("status") == "ok":
            log(f"[run] {tag}: done earlier (skipped)")
            bases.update({cell["domain"]: old} if is_base else {})
            continue
        if not is_base and budget and time.time() - t0 > budget * 60:
            log(f"[run] budget of {budget} min spent: stopping before {cell['id']}; rerun to continue")
            return 1 if _failed(run, log) else 3
        if old is not None:
            log(f"[run] {tag}: failed earlier ({old.get('error', '?')}); retrying")
        fp, t1 = cell_fingerprint(cell, plan["config"]), time.time()
        try:
            if is_base:
                log(f"[run] {tag}: scoring the base model")
            row = run_cell(cell, plan, run, bases.get(cell["domain"]), progress=progress, log=log)
            times = "" if is_base else f"  [{row['train_seconds']:.0f}s train, {row['eval_seconds']:.0f}s eval]"
            log(f"[run] {tag}: target {row['target']:.1f}  general {row['general']:.1f}{times}")
        except Exception as err:  # noqa: BLE001 - record it, go on with the grid
            rel = cell["file"].replace(".json", ".traceback.txt")
            atomic_write_text(run / rel, "".join(traceback.format_exception(type(err), err, err.__traceback__)))
            row = {"cell": cell["id"], "index": cell["index"], "status": "failed", "domain": cell["domain"],
                   "paradigm": PARADIGMS.get(cell["paradigm"], "Base"), "method": cell["label"],
                   "peft_method": cell["method"], "hparams": cell["hparams"],
                   "error": f"{type(err).__name__}: {err}", "traceback": rel, "seconds": round(time.time() - t1, 1)}
            log(f"[run] {tag}: FAILED: {row['error'].splitlines()[0][:300]} (traceback: {run / rel})")
        row["fingerprint"] = fp
        if is_base:
            bases[cell["domain"]] = row
        atomic_write_json(path, row)
        write_run_report(run)     # the tables are current after every cell
        gc.collect()              # the next cell loads its own model: free this one's memory first
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return 1 if _failed(run, log) else 0


def _failed(run: Path, log) -> bool:
    failed = [r["cell"] for r in read_run_rows(run) if r.get("status") != "ok"]
    if failed:
        log(f"[run] {len(failed)} failed cell(s): {', '.join(failed)} (tracebacks under {run / 'cells'})")
    return bool(failed)


def stale_cells(plan: dict, run: Path) -> list[str]:
    """Cells finished earlier with different settings: a rerun skips every cell whose file says ok,
    so an edited config must not meet old results (the fingerprint saved with each row tells them
    apart; rows from before fingerprints pass)."""
    out = []
    for cell in (c for c in plan["cells"] if (run / c["file"]).exists()):
        path, fp = run / cell["file"], cell_fingerprint(cell, plan["config"])
        old = json.loads(path.read_text())
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
    try:
        raw = read_config(path)
    except Exception as e:  # noqa: BLE001 - unreadable file or YAML syntax error
        print(f"{path.name}: cannot read the config: {e}", file=sys.stderr)
        return 2
    plan = validate_config(dict(raw, out=args.out) if isinstance(raw, dict) and args.out else raw, path.name,
                           allow_hub=args.allow_hub)
    run = Path(plan["config"].get("out") or "runs/unnamed")
    errors = plan["errors"] + (stale_cells(plan, run) if plan["cells"] else [])
    print_plan(plan, path.name)
    for w in plan["warnings"]:
        print(f"[run] warning: {w}")
    if errors:
        print(f"[run] {len(errors)} problem(s) in {path}; nothing was trained:", file=sys.stderr)
        print("\n".join("  " + e for e in errors), file=sys.stderr)
        return 2
    print(f"[run] validation: OK ({len(plan['cells']) - len(plan['config']['domains'])} cells)")
    if args.validate_only:
        return 0
    run.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run / "config.json", {
        "kind": "arena-run", "source": str(path), "config": plan["config"], "model_where": plan["model_where"],
        "n_params": plan["n_params"], "cells": [{k: v for k, v in c.items() if k != "entry"} for c in plan["cells"]]})
    t0 = time.time()
    code = run_grid(plan, run, progress=args.progress)
    print()
    print((run / "leaderboard.md").read_text() if (run / "leaderboard.md").exists() else "")
    print(f"[run] finished in {time.time() - t0:.0f} s (exit code {code}); outputs in {run}/")
    return code


# =============================================================================
# 5. reports: tables and the stability-plasticity scatter, from the cell files alone


def _fmt_params(n: int | None) -> str:
    if n is None:
        return "–"
    return f"{n / 1e9:.2f}B" if n >= 1e9 else (f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}K")


def _num(v, fmt: str) -> str:
    return "–" if v is None else format(v, fmt)


def leaderboard_markdown(rows: list[dict], paper: list[dict | None] | None = None) -> str:
    """The main table's layout (poster): Train | Method | Tr. | Target | General, plus our
    Target gain and Forgetting against the base model. `paper` (one entry per row, None where the
    paper has no such cell) adds the published Tr., Target and General beside ours."""
    head = "| Train | Method | Tr. | Target | General | Target gain | Forgetting |"
    head += " Paper Tr. | Paper Target | Paper General |" if paper is not None else ""
    out = [head, "|---" * head.count(" | ") + "|---|"]
    for i, r in enumerate(rows):
        line = (f"| {r['paradigm']} | {r['method']} | {_fmt_params(r['trainable_params'])} | "
                f"{_num(r['target'], '.1f')} | {_num(r['general'], '.1f')} | {_num(r['target_gain'], '+.1f')} | "
                f"{_num(r['forgetting'], '+.1f')} |")
        if paper is not None:
            pc = paper[i]
            line += f" {pc['params'] or '–'} | {pc['target']:.2f} | {pc['general']:.2f} |" if pc else " – | – | – |"
        out.append(line)
    return "\n".join(out) + "\n"


def write_report(run: Path, rows: list[dict], base: dict) -> None:
    """The demo's results.json, results.csv, leaderboard.md and scatter."""
    atomic_write_json(run / "results.json", {"base": {"target": base["target_score"],
                                                      "general": base["general_score"]}, "rows": rows})
    atomic_write_csv(run / "results.csv", ["paradigm", "method", "trainable_params", "target", "general",
                                           "target_gain", "forgetting"], rows)
    atomic_write_text(run / "leaderboard.md", leaderboard_markdown(rows))
    plot_scatter(rows, run / "stability_plasticity.png")


# ---- the scatter: x = Target gain (plasticity), y = -Forgetting (stability), Pareto frontier drawn

_STYLE = {"Base": ("black", "*"), "SFT": ("tab:blue", "o"), "GRPO": ("tab:red", "s")}   # colour, marker


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
        best = near if len(near) > len(best) else best
    return best


def _draw(fig, ax, rows, pts, front, size=1.0) -> None:
    """Markers, the Pareto frontier, the axes through the base, and decluttered labels."""
    for r, (x, y) in zip(rows, pts):
        c, mk = _STYLE[r["paradigm"]]
        ax.scatter(x, y, c=c, marker=mk, s=(140 if mk == "*" else 50) * size, zorder=3)
    ax.plot([p[0] for p in front], [p[1] for p in front], "--", c="grey", zorder=2, label="Pareto frontier")
    ax.axhline(0, c="lightgrey", lw=0.8, zorder=1)
    ax.axvline(0, c="lightgrey", lw=0.8, zorder=1)


def _annotate(fig, ax, rows, pts) -> None:
    try:
        texts = [ax.annotate(("GRPO " if r["paradigm"] == "GRPO" else "") + r["method"], (x, y), xytext=(4, 4),
                             textcoords="offset points", fontsize=8,
                             arrowprops=dict(arrowstyle="-", lw=0.5, color="grey", shrinkA=1, shrinkB=4))
                 for r, (x, y) in zip(rows, pts)]
        _declutter(fig, ax, texts)
    except Exception:  # noqa: BLE001 - labels are a nicety
        pass


def plot_scatter(rows: list[dict], png: Path, title: str = "Stability-plasticity trade-off on the toy arena") -> None:
    """The stability-plasticity plane (the paper's trade-off figure). When four or more methods
    crowd one spot (`crowded_cluster`) they are labelled in a zoomed inset placed in whichever of
    four candidate boxes holds the fewest points; the main plot keeps their markers and a zoom box."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(9, 6.5), dpi=120)
    pts = [(r["target_gain"], -r["forgetting"]) for r in rows]
    front = [pts[i] for i in pareto_indices(pts)]
    _draw(fig, ax, rows, pts, front)
    for p, (c, mk) in _STYLE.items():
        ax.scatter([], [], c=c, marker=mk, label=p)
    ys = [p[1] for p in pts]
    ax.set_ylim(min(ys) - 2, max(ys) + 0.15 * (max(ys) - min(ys) + 1))   # room for labels on top
    ax.set(xlabel="target gain over base (points)  — plasticity", ylabel="general change vs base (points)  — stability",
           title=title)
    ax.legend(loc="lower left", fontsize=8)
    cluster = crowded_cluster(pts) if len(pts) >= 8 else []
    cluster = cluster if len(cluster) >= 4 else []
    outer = [i for i in range(len(rows)) if i not in cluster]
    _annotate(fig, ax, [rows[i] for i in outer], [pts[i] for i in outer])
    if cluster:
        boxes = [(0.12, 0.22, 0.36, 0.36), (0.55, 0.22, 0.36, 0.36), (0.12, 0.5, 0.36, 0.36), (0.55, 0.5, 0.36, 0.36)]
        to_ax = ax.transAxes.inverted()
        axfrac = [to_ax.transform(ax.transData.transform(p)) for p in pts]
        box = min(boxes, key=lambda b: sum(b[0] - 0.05 <= fx <= b[0] + b[2] + 0.05 and b[1] - 0.05 <= fy <= b[1] + b[3] + 0.05
                                           for fx, fy in axfrac))
        ins, cp = ax.inset_axes(box), [pts[i] for i in cluster]
        _draw(fig, ins, [rows[i] for i in cluster], cp, front, size=0.8)
        cx, cy = [p[0] for p in cp], [p[1] for p in cp]
        px, py = max(1.0, 0.35 * (max(cx) - min(cx))), max(0.5, 0.6 * (max(cy) - min(cy)))
        ins.set(xlim=(min(cx) - px, max(cx) + px), ylim=(min(cy) - py, max(cy) + py))
        ins.tick_params(labelsize=7)
        ins.set_title("crowded region (zoom)", fontsize=8)
        ax.indicate_inset_zoom(ins, edgecolor="grey")
        _annotate(fig, ins, [rows[i] for i in cluster], cp)
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

    def overlap(a, b) -> float:   # area of the intersection of two boxes
        w, h = min(a.x1, b.x1) - max(a.x0, b.x0), min(a.y1, b.y1) - max(a.y0, b.y0)
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
            best = (cost, dx, dy) if best is None or cost < best[0] else best
            if cost == 0:
                break
        place(t, best[1], best[2])
        if t.arrow_patch is not None:
            t.arrow_patch.set_visible(best[1:] not in near)
        placed.append(t.get_window_extent(r))


# ---- reports of `run` and `demo` directories, rebuilt from RUN/cells/*.json alone

# the published numbers: the poster's main table, KeepLoRA from the web version (docs/index.html)
PAPER_RESULTS = REPO_DIR / "configs" / "paper_results.json"
RUN_CSV_COLS = ["domain", "paradigm", "method", "status", "trainable_params", "target", "general",
                "target_gain", "forgetting"]


def paper_columns(rows: list[dict], model_key: str | None, domain: str, model_spec: str):
    """(per-row published numbers, None where no cell matches, or None for the whole table when
    no row matches; a note saying where the numbers come from, or that none match)."""
    table = json.loads(PAPER_RESULTS.read_text())
    cols = []
    for r in rows:   # the paper's cell: (train, method name, H.P. column) of the main table
        base = r["paradigm"] == "Base"
        key = ("SFT" if base else {"SFT": "SFT", "GRPO": "RLVR"}.get(r["paradigm"]),
               "Base" if base else METHOD_NAMES.get(r.get("peft_method")),
               "-" if base else paper_hp(r.get("peft_method"), r.get("hparams") or {}))
        pr = next((pr for pr in table["rows"] if model_key and (pr["train"], pr["method"], pr["hp"]) == key
                   and domain in pr.get(model_key, {})), None)
        cols.append(pr and {"params": pr[model_key]["params"], "target": pr[model_key][domain][0],
                            "general": pr[model_key][domain][1], "table": pr["table"]})
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
    rows = [json.loads(p.read_text()) for p in sorted((run / "cells").glob("*.json")) if not p.name.endswith(".eval.json")]
    return sorted([r for r in rows if isinstance(r, dict) and "cell" in r], key=lambda r: r["index"])


def _paper_model(run: Path, model: str) -> str | None:
    """The paper's model key: the `paper_model` of the config the run was made from (RUN/config.json),
    else guessed from the model spec (a hub id or a local directory name), else None."""
    try:
        key = json.loads((run / "config.json").read_text())["config"]["paper_model"]
    except (OSError, ValueError, KeyError, TypeError):
        key = None
    s = model.lower()
    if key is None and "qwen2.5-7b" in s and "instruct" not in s:
        key = "qwen2.5-7b"
    elif key is None and "llama-3.2-3b" in s and "instruct" in s:
        key = "llama-3.2-3b-instruct"
    return key


def _domain_section(rows: list[dict], d: str, model: str, key, png: Path) -> tuple[list[str], str | None]:
    """One target domain's part of a run's leaderboard.md (its table, the paper's columns unless
    `key` is False, the failed cells) and its scatter; returns (markdown lines, note)."""
    ok = [r for r in rows if r["domain"] == d and r["status"] == "ok"]
    cols, note = paper_columns(ok, key, d, model) if key is not False else (None, None)
    md = [f"## Target: {d}", "", leaderboard_markdown(ok, paper=cols) if ok else "(no finished cell yet)\n"]
    md += [note, ""] if note is not None else []
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
    `run` writes these after every cell; `python arena.py report RUN` calls the same function, so
    a report never depends on the process that ran the cells (after a crash, or another node)."""
    rows = read_run_rows(run)
    domains = list(dict.fromkeys(r["domain"] for r in rows))
    model = next((r["model"] for r in rows if r.get("model")), "?")
    key = (paper_model or _paper_model(run, model)) if paper else False
    bases = {r["domain"]: {"target": r["target"], "general": r["general"]}
             for r in rows if r["paradigm"] == "Base" and r["status"] == "ok"}
    atomic_write_json(run / "results.json", {"kind": "arena-run", "name": run.name, "model": model, "base": bases,
                                             "rows": rows, "failed": [r["cell"] for r in rows if r["status"] != "ok"]})
    atomic_write_csv(run / "results.csv", RUN_CSV_COLS, rows)
    md, notes = [f"# {run.name}: {model}", ""], []
    for d in domains:
        png = run / ("stability_plasticity.png" if len(domains) == 1 else f"stability_plasticity-{d}.png")
        section, note = _domain_section(rows, d, model, key, png)
        md += section
        notes += [note] if note is not None else []
    atomic_write_text(run / "leaderboard.md", "\n".join(md).rstrip() + "\n")
    return notes


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
    rank = {k: i for i, k in enumerate([("SFT", c[0]) for c in sft_cells] + [("GRPO", c[0]) for c in grpo_cells])}
    keys = sorted(found, key=lambda k: (rank.get(k, len(rank)), k[0] != "SFT", k[1]))
    # the toy base's parameter count from its config alone (meta skeleton; no weights read)
    skel, n_layers = model_skeleton(transformers.AutoConfig.from_pretrained(TOY_MODEL_DIR))
    n_base = _scaled_count(skel, n_layers, trainable_only=False)
    rows = [_row("Base", "Base", "base", {}, base, base, n_base, 0.0)] + [found[k] for k in keys]
    write_report(run, rows, base)
    if not paper:
        return []
    cols, note = paper_columns(rows, paper_model, cfg.get("domain", base.get("domain", "math")), "toy")
    atomic_write_text(run / "leaderboard.md", leaderboard_markdown(rows, paper=cols) + "\n" + note + "\n")
    return [note]


def cmd_report(args) -> int:
    run, cells = Path(args.run_dir), Path(args.run_dir) / "cells"
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


# =============================================================================
# 6. the command line: (flag, argparse keywords) per subcommand

_THREADS = ("--threads", dict(type=int, default=0, help="torch CPU threads (0 = torch default)"))
COMMANDS = {
    "pretrain-toy": (cmd_pretrain_toy, "pretrain the miniature toy base model (CPU)", [
        ("--out", dict(default=str(TOY_MODEL_DIR), help="directory to write (default: the committed toy_model/)")),
        ("--seed", dict(type=int, default=0, help="random seed (data stream and init)")),
        ("--steps", dict(type=int, default=None, help="optimiser steps (default: toy_world.PRETRAIN_DEFAULTS)")),
        ("--batch-size", dict(type=int, default=None, help="sequences per step")),
        ("--lr", dict(type=float, default=None, help="peak learning rate")), _THREADS,
        ("--no-progress", dict(action="store_true", help="no progress bar")),
        ("--skip-calibration", dict(action="store_true", help="do not score the result")),
        ("--n", dict(type=int, default=200, help="held-out test items per family for the calibration"))]),
    "calibrate": (cmd_calibrate, "score a model on every toy family (general and both targets)", [
        ("--model", dict(default="toy", help="model spec: toy | local HF dir | hub id")),
        ("--n", dict(type=int, default=200, help="held-out test items per family")),
        ("--batch-size", dict(type=int, default=128, help="generation batch size (prompts)")), _THREADS,
        ("--out", dict(default=None, help="optional JSON file for the full results"))]),
    "demo": (cmd_demo, "the paper's story on the toy world (CPU, minutes)", [
        ("--domain", dict(choices=["math", "med"], default="math", help="target domain")),
        ("--quick", dict(action="store_true", help="3 methods, fewer steps and items")),
        ("--out", dict(default=None, help="run directory (default runs/demo-<domain>[-quick])")), _THREADS]),
    "run": (cmd_run, "a config-driven grid (domains x paradigms x methods) on the toy or a real model; "
            "validated before training, resumable", [
        ("--config", dict(required=True, help="YAML or JSON run config (configs/toy_grid.yaml, "
                          "configs/paper_qwen2.5-7b.yaml, configs/paper_llama-3.2-3b-instruct.yaml)")),
        ("--out", dict(default=None, help="run directory (default: the config's `out`, else runs/<name>)")),
        (("--validate-only", "--dry-run"), dict(action="store_true", help="print the planned cells and the "
                                                "validation result; train nothing")),
        ("--allow-hub", dict(action="store_true", help="a hub model id missing from the local HF cache is a "
                             "warning, not an error (load_model then downloads it when the first cell starts)")),
        _THREADS, ("--progress", dict(action="store_true", help="training progress bars (tqdm)"))]),
    "findings": (lambda args: findings.run(args), "the paper's findings tested over seeds: curves, "
                 "intervals and a verdict per claim (findings.md; about 50 min on 2 CPU cores, resumable)",
                 lambda: findings.FLAGS),    # read when the parser is built (findings imports arena)
    "report": (cmd_report, "rebuild results.json/.csv, leaderboard.md and the scatter of a `run` or `demo` "
               "directory from its cells/*.json", [
        ("run_dir", dict(help="a directory written by `arena.py run` or `arena.py demo`")),
        ("--paper", dict(action="store_true", help="put the paper's published Target/General (configs/"
                         "paper_results.json: the poster's main table) beside ours where the cell matches")),
        ("--paper-model", dict(choices=["qwen2.5-7b", "llama-3.2-3b-instruct"], default=None,
                               help="which published model to compare with (default: inferred from the model spec)"))]),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="arena.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    for name, (fn, help_, flags) in COMMANDS.items():
        s = sub.add_parser(name, help=help_)
        for flag, kw in (flags() if callable(flags) else flags):
            s.add_argument(*((flag,) if isinstance(flag, str) else flag), **kw)
        s.set_defaults(func=fn)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(loading.run_cli("arena.py", main, resume_hint="rerun the same command: finished cells are "
                             "kept and an interrupted cell resumes from its last checkpoint"))
