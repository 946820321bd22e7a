"""arena.py — the PEFT-Arena command line: build the miniature world, score models on both axes,
and (as the project grows) run the arena's grids and reports.

    python arena.py --help
    python arena.py pretrain-toy              # re-create the committed toy base (<= 10 min, 2 cores)
    python arena.py calibrate                 # both-axis scores of the toy base (README table)
    python arena.py demo                      # the paper's story on the toy world

Paper: PAPER.md §2 (the stability-plasticity thesis: every model gets a Target and a General score).
Nothing imports this file: training, evaluation and analysis files stand on their own, and this
file only calls them.

Deviations
1. The toy world (toy_world.py) stands in for the paper's benchmarks on CPU; see its docstring.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from loading import REPO_DIR, TOY_MODEL_DIR, atomic_write_json

# -----------------------------------------------------------------------------
# pretrain-toy


def cmd_pretrain_toy(args) -> int:
    import torch
    import toy_world
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


# -----------------------------------------------------------------------------
# calibrate: score a model on every toy family (both targets and the general suite)


def calibration_table(res_math: dict, res_med: dict) -> str:
    fam = res_math["families"]
    rows = [("general (mean of 3)", res_math["general_score"])]
    rows += [(f"  {f}", fam[f]["score"]) for f in ("ifeval", "nq", "bbh")]
    rows += [("target: math", res_math["target_score"]), ("target: med", res_med["target_score"])]
    w = max(len(r[0]) for r in rows)
    return "\n".join(f"{name:<{w}}  {score:6.1f}" for name, score in rows)


def cmd_calibrate(args) -> int:
    import torch
    import evaluate
    from loading import load_model
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_model(args.model, device="cpu", dtype="float32")
    t0 = time.time()
    res = evaluate.evaluate_toy(model, tok, domain="math", n_per_family=args.n,
                                batch_size=args.batch_size)
    res_med = dict(res)
    res_med["target_score"] = res["families"]["med"]["score"]
    dt = time.time() - t0
    print(f"toy calibration of {args.model} ({args.n} held-out test items per family, greedy; "
          f"{dt:.0f} s):")
    print(calibration_table(res, res_med))
    ok = (res["general_score"] >= 85 and 15 <= res["families"]["math"]["score"] <= 50
          and 15 <= res["families"]["med"]["score"] <= 50)
    print("calibration bar (general >= 85, each target in [15, 50]):", "met" if ok else "NOT met")
    if args.out:
        atomic_write_json(Path(args.out), {"model": args.model, "n_per_family": args.n,
                                           "seconds": round(dt, 1), "results": res})
    return 0


# -----------------------------------------------------------------------------
# demo: the paper's grid in miniature (PAPER.md §10.1 layout), every cell resumable

# (label, method, hyperparameters) — the paper's SFT rows (PAPER.md §3.1) on the toy base.
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

# Toy-world budgets (DEVIATION 3: the toy needs larger learning rates and far fewer steps than the
# paper's 2e-4 x 4 epochs of 50k samples; measured in the README).
DEMO = {
    "full": dict(sft_steps=150, quick_sft_steps=60, n_per_family=100, quick_n=50,
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


def _score_checkpoint(ckpt: Path | None, *, domain, n, base_general, threads):
    """Load the toy base (+ adapter or full weights in `ckpt`) and score it on both axes."""
    import evaluate
    import peft_methods
    from loading import load_model
    model, tok = load_model("toy", device="cpu", dtype="float32")
    if ckpt is not None:
        peft_methods.load_adapter(model, ckpt)
    return evaluate.evaluate_toy(model, tok, domain=domain, n_per_family=n,
                                 base_general=base_general, batch_size=128)


def _row(paradigm, label, method, hp, res, base, params, seconds):
    return {"paradigm": paradigm, "method": label, "peft_method": method, "hparams": hp,
            "trainable_params": params, "target": round(res["target_score"], 2),
            "general": round(res["general_score"], 2),
            "target_gain": round(res["target_score"] - base["target_score"], 2),
            "forgetting": round(base["general_score"] - res["general_score"], 2),
            "families": {f: round(v["score"], 2) for f, v in res["families"].items()},
            "train_seconds": seconds}


def run_demo(run: Path, *, domain: str = "math", quick: bool = False, log=print) -> list[dict]:
    """Train, score and analyse every demo cell under `run`; a rerun skips finished cells."""
    import evaluate
    import train_grpo
    import train_sft
    from loading import load_model
    import peft_methods
    P = DEMO["full"]
    n = P["quick_n"] if quick else P["n_per_family"]
    run.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run / "config.json", {"domain": domain, "quick": quick, "demo": DEMO,
                                            "sft_cells": SFT_CELLS, "grpo_cells": GRPO_CELLS})
    rows: list[dict] = []

    # ---- the base model: the reference point of both axes
    base_path = run / "cells" / "base.json"
    if base_path.exists():
        base = json.loads(base_path.read_text())
    else:
        log("[demo] scoring the toy base model")
        base = _score_checkpoint(None, domain=domain, n=n, base_general=None, threads=None)
        atomic_write_json(base_path, base)
    model, _ = load_model("toy", device="cpu", dtype="float32")
    n_base = sum(p.numel() for p in model.parameters())
    rows.append(_row("Base", "Base", "base", {}, base, base, n_base, 0.0))
    log(f"[demo] base: target {base['target_score']:.1f}  general {base['general_score']:.1f}")

    sft_cells = [c for c in SFT_CELLS if not quick or c[0] in QUICK_SFT]
    grpo_cells = [] if quick and not P["quick_grpo_steps"] else GRPO_CELLS
    plan = [("SFT", c) for c in sft_cells] + [("GRPO", c) for c in grpo_cells]
    for i, (paradigm, (label, method, hp)) in enumerate(plan, 1):
        cell = _cell_path(run, paradigm, label)
        if cell.exists():
            rows.append(json.loads(cell.read_text()))
            log(f"[demo] {i}/{len(plan)} {paradigm} {label}: done earlier (skipped)")
            continue
        ckpt_root = run / paradigm.lower() / slug(label)
        t0 = time.time()
        final = _finished(ckpt_root)
        if final is None:
            log(f"[demo] {i}/{len(plan)} {paradigm} {label}: training")
            resume = ckpt_root.exists() and any(ckpt_root.glob("global_step_*"))
            if paradigm == "SFT":
                S = DEMO["sft"]
                cfg = dict(model="toy", method=method, task=f"toy-{domain}", out=str(ckpt_root),
                           n_train=S["n_train"], global_batch=S["global_batch"],
                           micro_batch=S["micro_batch"], epochs=8,
                           max_steps=P["quick_sft_steps"] if quick else P["sft_steps"],
                           lr=S["lr_full"] if method == "full" else S["lr_peft"],
                           save_every_steps=max(1, (P["quick_sft_steps"] if quick else P["sft_steps"]) // 5),
                           resume=resume, overwrite=not resume and ckpt_root.exists(),
                           no_progress=False, **hp)
                train_sft.train(cfg)
            else:
                steps = P["quick_grpo_steps"] if quick else P["grpo_steps"]
                cfg = dict(model="toy", method=method, task=f"toy-{domain}", out=str(ckpt_root),
                           preset="toy", steps=steps, save_every_steps=steps, resume=resume,
                           overwrite=not resume and ckpt_root.exists(), no_progress=False, **hp)
                train_grpo.train(cfg)
            final = _finished(ckpt_root)
            if final is None:
                raise RuntimeError(f"{paradigm} {label}: training ended without a final checkpoint in {ckpt_root}")
        seconds = round(time.time() - t0, 1)
        res = _score_checkpoint(final, domain=domain, n=n, base_general=base["general_score"], threads=None)
        m, _ = load_model("toy", device="cpu", dtype="float32")
        peft_methods.load_adapter(m, final)
        row = _row(paradigm, label, method, hp, res, base, peft_methods.count_trainable(m), seconds)
        row["checkpoint"] = str(final)
        atomic_write_json(cell.with_suffix(".eval.json"), res)   # evaluate.py results (geometry reads it)
        atomic_write_json(cell, row)
        rows.append(row)
        log(f"[demo] {paradigm} {label}: target {row['target']:.1f} ({row['target_gain']:+.1f})  "
            f"general {row['general']:.1f} (forgetting {row['forgetting']:+.1f})  [{seconds:.0f}s]")
    write_report(run, rows, base)
    if not quick:
        run_geometry(run, rows, domain=domain, log=log)
    run_interpolation(run, rows, domain=domain, n=n, grid=P["quick_grid"] if quick else P["grid"], log=log)
    return rows


def run_geometry(run: Path, rows: list[dict], *, domain: str, log=print) -> None:
    """geometry.py on every SFT checkpoint: spectra, CSD, activation geometry, correlations."""
    import geometry
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
    import rewind
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
# reports: tables and figures from results alone


def write_report(run: Path, rows: list[dict], base: dict) -> None:
    import csv
    atomic_write_json(run / "results.json", {"base": {"target": base["target_score"],
                                                      "general": base["general_score"]},
                                             "rows": rows})
    cols = ["paradigm", "method", "trainable_params", "target", "general", "target_gain", "forgetting"]
    tmp = run / "results.csv.tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for r in rows:
            w.writerow([r[c] for c in cols])
    tmp.replace(run / "results.csv")
    from loading import atomic_write_text
    atomic_write_text(run / "leaderboard.md", leaderboard_markdown(rows))
    plot_scatter(rows, run / "stability_plasticity.png")


def _fmt_params(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


def leaderboard_markdown(rows: list[dict]) -> str:
    """The paper's main-table layout (PAPER.md §10.1): Train | Method | Tr. | Target | General."""
    out = ["| Train | Method | Tr. | Target | General | Target gain | Forgetting |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['paradigm']} | {r['method']} | {_fmt_params(r['trainable_params'])} | "
                   f"{r['target']:.1f} | {r['general']:.1f} | {r['target_gain']:+.1f} | {r['forgetting']:+.1f} |")
    return "\n".join(out) + "\n"


def pareto_indices(points: list[tuple[float, float]]) -> list[int]:
    """Indices of points not dominated in (x, y), both to be maximised."""
    keep = []
    for i, (x, y) in enumerate(points):
        if not any((x2 >= x and y2 >= y) and (x2 > x or y2 > y) for j, (x2, y2) in enumerate(points) if j != i):
            keep.append(i)
    return sorted(keep, key=lambda i: points[i][0])


def plot_scatter(rows: list[dict], png: Path) -> None:
    """Stability-plasticity plane: target gain (x) vs general retention (y), Pareto frontier drawn."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 6), dpi=120)
    colours = {"Base": "black", "SFT": "tab:blue", "GRPO": "tab:red"}
    pts = [(r["target_gain"], -r["forgetting"]) for r in rows]
    for r, (x, y) in zip(rows, pts):
        mk = "*" if r["paradigm"] == "Base" else ("o" if r["paradigm"] == "SFT" else "s")
        ax.scatter(x, y, c=colours[r["paradigm"]], marker=mk, s=140 if mk == "*" else 50, zorder=3)
    front = pareto_indices(pts)
    ax.plot([pts[i][0] for i in front], [pts[i][1] for i in front], "--", c="grey", zorder=2,
            label="Pareto frontier")
    for p, c in colours.items():
        ax.scatter([], [], c=c, marker="*" if p == "Base" else ("o" if p == "SFT" else "s"), label=p)
    ys = [p[1] for p in pts]
    ax.set_ylim(min(ys) - 2, max(ys) + 0.12 * (max(ys) - min(ys) + 1))   # room for labels on top
    ax.axhline(0, c="lightgrey", lw=0.8, zorder=1)
    ax.axvline(0, c="lightgrey", lw=0.8, zorder=1)
    try:
        texts = [ax.annotate(("GRPO " if r["paradigm"] == "GRPO" else "") + r["method"], (x, y),
                             xytext=(4, 4), textcoords="offset points", fontsize=8)
                 for r, (x, y) in zip(rows, pts)]
        _declutter(fig, ax, texts)
    except Exception:  # noqa: BLE001 - labels are a nicety
        pass
    ax.set_xlabel("target gain over base (points)  — plasticity")
    ax.set_ylabel("general change vs base (points)  — stability")
    ax.set_title("Stability-plasticity trade-off on the toy arena")
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    tmp = png.with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(png)


def _declutter(fig, ax, texts) -> None:
    """Place each label at the first of eight offsets around its point that overlaps no earlier
    label and stays inside the axes (a tiny stand-in for adjustText)."""
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    inside = ax.get_window_extent(r)
    offsets = [(4, 4), (4, -12), (-4, 4), (-4, -12), (4, 14), (4, -22), (-4, 14), (-4, -22)]
    placed = []
    for t in texts:
        for dx, dy in offsets:
            t.xyann = (dx, dy)
            t.set_horizontalalignment("left" if dx > 0 else "right")
            bb = t.get_window_extent(r)
            if (not any(bb.overlaps(p) for p in placed) and bb.x0 >= inside.x0 and bb.x1 <= inside.x1
                    and bb.y0 >= inside.y0 and bb.y1 <= inside.y1):
                break
        placed.append(t.get_window_extent(r))


def cmd_demo(args) -> int:
    import torch
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="arena.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    s = sub.add_parser("pretrain-toy", help="pretrain the miniature toy base model (<= 10 min on 2 CPU cores)")
    g = s.add_argument_group("output")
    g.add_argument("--out", default=str(TOY_MODEL_DIR), help="directory to write (default: the committed toy_model/)")
    g = s.add_argument_group("training")
    g.add_argument("--seed", type=int, default=0, help="random seed (data stream and init)")
    g.add_argument("--steps", type=int, default=None, help="optimiser steps (default: toy_world.PRETRAIN_DEFAULTS)")
    g.add_argument("--batch-size", type=int, default=None, help="sequences per step")
    g.add_argument("--lr", type=float, default=None, help="peak learning rate")
    g.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = s.add_argument_group("calibration")
    g.add_argument("--skip-calibration", action="store_true", help="do not score the result")
    g.add_argument("--n", type=int, default=200, help="held-out test items per family for the calibration")
    s.set_defaults(func=cmd_pretrain_toy)

    s = sub.add_parser("calibrate", help="score a model on every toy family (general and both targets)")
    s.add_argument("--model", default="toy", help="model spec: toy | local HF dir | hub id")
    s.add_argument("--n", type=int, default=200, help="held-out test items per family")
    s.add_argument("--batch-size", type=int, default=128, help="generation batch size (prompts)")
    s.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    s.add_argument("--out", default=None, help="optional JSON file for the full results")
    s.set_defaults(func=cmd_calibrate)

    s = sub.add_parser("demo", help="the paper's story on the toy world (CPU, minutes)")
    s.add_argument("--domain", choices=["math", "med"], default="math", help="target domain")
    s.add_argument("--quick", action="store_true", help="3 methods, fewer steps and items (<= 3 min)")
    s.add_argument("--out", default=None, help="run directory (default runs/demo-<domain>[-quick])")
    s.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    s.set_defaults(func=cmd_demo)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.cmd == "pretrain-toy":
        import toy_world
        d = toy_world.PRETRAIN_DEFAULTS
        args.steps = args.steps or d["steps"]
        args.batch_size = args.batch_size or d["batch_size"]
        args.lr = args.lr or d["lr"]
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
