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
# demo


def cmd_demo(args) -> int:
    missing = [m for m in ("train_sft", "train_grpo", "evaluate", "geometry", "rewind")
               if not (REPO_DIR / f"{m}.py").exists()]
    print("The arena demo trains every method of the paper on the toy base model (SFT: Full FT, "
          "LoRA r4/r8/r16, DoRA, PiSSA, MiLoRA, VeRA, IA3, OFT b16/b32, MiSS, AdaLoRA, KeepLoRA; "
          "GRPO: Full FT, LoRA r8, OFT b16), scores each on both axes, runs the geometry "
          "diagnostics and the interpolation curves, and prints the leaderboard.")
    print("Not built yet: the end-to-end demo driver (issue #9)" +
          (f"; missing files: {', '.join(missing)}" if missing else "") + ".")
    print("Available now: `python arena.py calibrate` scores the toy base on both axes.")
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
