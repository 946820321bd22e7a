"""findings.py: the paper's findings, each tested on the toy arena with seeds and confidence intervals.

PEFT-Arena reports one run per cell (§10). Here every SFT setting of the main table is trained over
several seeds, scored at several checkpoints along training (so a method is a curve in the
(target gain, forgetting) plane, not a point), and each claim of §2 gets a verdict computed from
the numbers: "holds" when the interval of the difference it rests on excludes 0 on the claimed
side, "does not hold" when it excludes 0 on the other side, "inconclusive" otherwise (stats.py).

    python arena.py findings                 # the study: about 50 min on 2 CPU cores (BENCHMARKS.md), resumable
    python arena.py findings --smoke         # every step at toy-of-the-toy size (CI)

Claims (PEFT-Arena §2; ids as in findings.md):
  F1 Full FT gains the most target and forgets the most.
  F2 At comparable trainable-parameter budgets OFT has the more favourable frontier: less
     forgetting at equal target gain (paper: OFT b32 vs LoRA r8; OFT b16 vs LoRA r4).
  F3 PiSSA can collapse general ability (more forgetting than LoRA at the same rank).
  F4 VeRA and IA3 are stable (forgetting under 2 points) but gain less target than LoRA r8.
  F5 GRPO forgets less than SFT for the same method, at the final steps and at equal target gain.
  F6 Smoother spectral profiles go with better retention: the fluctuation scores of the retention
     and adaptation profiles (PEFT-Arena §5) correlate positively with forgetting.
  F7 Activation drift goes with forgetting: Procrustes residual, Gram distortion and general-data
     CSD correlate positively with it, CKA negatively (paper: Pearson 0.71 / 0.49 / 0.48 / -0.76).
  F8 The final SFT checkpoint overshoots: one step back on the interpolation path (alpha = 0.8)
     scores more target + general than the final; OFT's Cayley-generator path beats its dense path
     at equal alpha (PEFT-Arena §9; the paper's alpha = 0.3 row).
  F9 Longer GRPO lowers pass@64 while pass@1 holds (does not fall).

Correlations (F6, F7) pool the final SFT checkpoints of every setting and seed (n = settings x
seeds points; the seeds of one setting are not independent draws of a method, so read n as an
upper bound on the effective sample), with the Fisher-z interval of Pearson r.

Deviations (budgets: a toy world, not the paper's models):
  1. SFT runs for `sft_steps` steps, fewer than the demo's 120, so that no method saturates the
     target (the demo's LoRA r8 reaches 97%); the budget is the same for every method.
  2. Scores are greedy on `n_per_family` held-out items per family (the paper's avg@16 for math
     is a sampled mean), drawn afresh for each seed: the test sample is a source of randomness
     like the others, so a setting's mean over seeds rests on seeds x `n_per_family` items and its
     t-interval over seeds covers item sampling too. Every checkpoint of one seed (and the base)
     is scored on that seed's items, so the differences within a seed stay paired. pass@k uses
     n = 64 samples at temperature 1 on `passk_items` math items of the seed's draw.
  3. "Longer GRPO" (F9) is `long_grpo_steps` = 2 x the demo's 12 rollout steps (the paper
     trains 1000 steps against 200).

Implementation notes:
  a. Checkpoints are scored with their adapters merged into the base weights (merged = unmerged
     is tested for every method in tests/test_peft_methods.py), which skips the adapter's extra
     matmuls; only the four families the math axes use are generated (not med).
  b. Train units start longest first (the GRPO runs), so no worker waits for a straggler.
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import time
from pathlib import Path

import torch

import arena
import evaluate
import geometry
import loading
import peft_methods
import rewind
import stats
import toy_world
import train_grpo
import train_sft

# (setting pairs the paper compares at comparable budgets: poster main table, Tr. column)
BUDGET_PAIRS = [("OFT b32", "LoRA r8"), ("OFT b16", "LoRA r4")]
BUDGETS = {
    "full": dict(seeds=(0, 1, 2), sft_steps=48, n_checkpoints=6, n_per_family=300, n_train=2000,
                 grpo_steps=12, long_grpo_steps=24, passk_items=50, passk_n=64, workers=2, settings=None, max_new_tokens=None,
                 grpo=dict(eval_n=0), geom_prompts=100, geom_tokens=2048, interp_alphas=(0.2, 0.4, 0.6, 0.8)),
    # the smoke study: two seeds of the settings the claims name, a few steps and items each
    "smoke": dict(seeds=(0, 1), sft_steps=2, n_checkpoints=2, n_per_family=4, n_train=64, max_new_tokens=12,
                  grpo_steps=1, long_grpo_steps=2, passk_items=3, passk_n=4, workers=1,
                  grpo=dict(eval_n=0, prompts_per_step=2, group_size=2, max_new_tokens=8, mini_batches=1, num_prompts=8),
                  geom_prompts=8, geom_tokens=256, interp_alphas=(0.8,),
                  settings=("Full FT", "OFT b16", "OFT b32", "LoRA r4", "LoRA r8", "PiSSA r8", "VeRA r64", "IA3")),
}
PASS_KS = (1, 2, 4, 8, 16, 32, 64)
INTERP = ("Full FT", "LoRA r8", "OFT b32")        # PEFT-Arena tradeoff-curve-alt: Full, LoRA r8, OFT b32
OVERSHOOT_ALPHA = 0.8                             # F8: one grid step back from the final checkpoint
# F6/F7: geometry.summary_row key, name, sign of the claimed correlation with forgetting, paper r
GEOMETRY_CLAIMS = {
    "F6": [("w_fluct_retention", "retention fluctuation", 1, None),
           ("w_fluct_adaptation", "adaptation fluctuation", 1, None)],
    "F7": [("act_proc_residual", "Procrustes residual", 1, 0.711), ("act_gram_distortion", "Gram distortion", 1, 0.485),
           ("csd_G_un", "CSD_G,un", 1, 0.481), ("act_cka", "CKA", -1, -0.761)],
}


# -----------------------------------------------------------------------------
# 1. Curves: forgetting at equal target gain
# -----------------------------------------------------------------------------

def forgetting_at_gain(curve: list[tuple[float, float]], gain: float) -> float | None:
    """Forgetting where a training curve first reaches `gain` (linear between checkpoints).

    `curve` is [(target gain, forgetting)] in training order, starting at the base (0, 0). The
    first crossing is the earliest point of training with that much target: what a practitioner
    stopping there would keep. None when the curve never reaches `gain`.
    """
    for (g0, f0), (g1, f1) in zip(curve, curve[1:]):
        if g0 <= gain <= g1 and g1 > g0:
            return f0 + (f1 - f0) * (gain - g0) / (g1 - g0)
        if g1 == gain:
            return f1
    return None


def matched_gain(curves: list[list[tuple[float, float]]]) -> float:
    """The largest target gain every curve reaches (the level at which they can be compared)."""
    return min(max(g for g, _ in c) for c in curves)


# -----------------------------------------------------------------------------
# 2. The claims, decided from the numbers
# -----------------------------------------------------------------------------

def _per_seed(rows: dict, label: str, key: str, paradigm: str = "SFT") -> dict[int, float]:
    """{seed: value} of the final checkpoint of one setting ("gain" or "forgetting")."""
    return {s: r[key] for (p, lab, s), r in rows.items() if p == paradigm and lab == label}


def _ci(rows: dict, label: str, key: str, paradigm: str = "SFT") -> dict:
    """Interval over seeds of one setting's final `key`."""
    return stats.mean_ci(list(_per_seed(rows, label, key, paradigm).values()))


def _paired(a: dict[int, float], b: dict[int, float]) -> dict:
    """Interval of mean over seeds of a - b (the same seed: the same data order and test items)."""
    return stats.mean_ci([a[s] - b[s] for s in sorted(set(a) & set(b))])


def claim_f1(rows, labels) -> tuple[str, str]:
    parts, worst = [], {}
    for key in ("gain", "forgetting"):
        full = _per_seed(rows, "Full FT", key)
        for lab in labels:
            if lab == "Full FT":
                continue
            iv = _paired(full, _per_seed(rows, lab, key))
            parts.append(stats.verdict(iv))
            if key not in worst or iv["mean"] < worst[key][1]["mean"]:
                worst[key] = (lab, iv)
    ours = "; ".join(f"{k}: Full - {lab} = {stats.fmt_ci(iv)}" for k, (lab, iv) in worst.items())
    return stats.all_of(parts), "closest rival " + ours


def claim_budget_pairs(curves, rows) -> tuple[str, str]:
    parts, text = [], []
    for oft, lora in BUDGET_PAIRS:
        diffs = []
        for s in sorted({k[2] for k in curves if k[1] == oft}):
            c_oft, c_lora = curves[("SFT", oft, s)], curves[("SFT", lora, s)]
            g = matched_gain([c_oft, c_lora])
            diffs.append(forgetting_at_gain(c_lora, g) - forgetting_at_gain(c_oft, g))
        iv = stats.mean_ci(diffs)
        parts.append(stats.verdict(iv))
        text.append(f"{lora} - {oft} forgetting at equal gain {stats.fmt_ci(iv)}")
    return stats.all_of(parts), "; ".join(text)


def claim_f3(rows) -> tuple[str, str]:
    iv = _paired(_per_seed(rows, "PiSSA r8", "forgetting"), _per_seed(rows, "LoRA r8", "forgetting"))
    return stats.verdict(iv), f"PiSSA r8 - LoRA r8 forgetting {stats.fmt_ci(iv)}"


def claim_f4(rows) -> tuple[str, str]:
    parts, text = [], []
    lora_gain = _per_seed(rows, "LoRA r8", "gain")
    for lab in ("VeRA r64", "IA3"):
        forget = _ci(rows, lab, "forgetting")
        stable = stats.verdict(forget, -1, threshold=2.0)            # forgetting < 2 points
        less = _paired(lora_gain, _per_seed(rows, lab, "gain"))
        parts += [stable, stats.verdict(less)]
        text.append(f"{lab}: forgetting {stats.fmt_ci(forget)}, LoRA r8 - {lab} gain {stats.fmt_ci(less)}")
    return stats.all_of(parts), "; ".join(text)


def claim_f5(rows, curves, grpo_labels) -> tuple[str, str]:
    parts, text = [], []
    for lab in grpo_labels:
        final = _paired(_per_seed(rows, lab, "forgetting"), _per_seed(rows, lab, "forgetting", "GRPO"))
        matched = []
        for s, r in ((s, r) for (p, l, s), r in rows.items() if p == "GRPO" and l == lab):
            f_sft = forgetting_at_gain(curves[("SFT", lab, s)], r["gain"])
            if f_sft is not None:
                matched.append(f_sft - r["forgetting"])
        at_gain = stats.mean_ci(matched)
        parts += [stats.verdict(final), stats.verdict(at_gain)]
        text.append(f"{lab}: SFT - GRPO forgetting {stats.fmt_ci(final)} final, {stats.fmt_ci(at_gain)} at equal gain")
    return stats.all_of(parts), "; ".join(text)


def claim_f9(passk) -> tuple[str, str]:
    """pass@K (K the largest k sampled: 64 in the study) falls after longer GRPO; pass@1 does not."""
    kmax = str(max(int(k) for r in passk.values() for k in r["short"]))
    dk = stats.mean_ci([r["long"][kmax] - r["short"][kmax] for r in passk.values()])
    d1 = stats.mean_ci([r["long"]["1"] - r["short"]["1"] for r in passk.values()])
    holds_1 = stats.FAILS if stats.verdict(d1) == stats.FAILS else stats.HOLDS   # "holds or rises"
    verdict = stats.all_of([stats.verdict(dk, -1), holds_1]) if d1["lo"] is not None else stats.INCONCLUSIVE
    return verdict, (f"long - short: pass@{kmax} {stats.fmt_ci(dk)}, pass@1 {stats.fmt_ci(d1)} "
                     f"(n = {dk['n']} runs)")


def _finite(v) -> bool:
    return v is not None and math.isfinite(v)


def claim_geometry(cid: str, geo: dict, rows: dict) -> tuple[str, str]:
    """F6 / F7: Pearson r (Fisher-z interval) of each metric with forgetting over the final SFT
    checkpoints; geo[(label, seed)] is geometry.summary_row of that checkpoint."""
    parts, text, n = [], [], 0
    for key, name, sign, _ in GEOMETRY_CLAIMS[cid]:
        pts = [(g[key], rows[("SFT", lab, s)]["forgetting"]) for (lab, s), g in geo.items()
               if _finite(g.get(key)) and ("SFT", lab, s) in rows]
        iv = stats.pearson_ci([x for x, _ in pts], [y for _, y in pts])
        parts.append(stats.verdict(iv, sign))
        text.append(f"{name} r = {stats.fmt_ci(iv, digits=2)}")
        n = max(n, iv["n"])
    return stats.all_of(parts), "; ".join(text) + f" (n = {n} checkpoints)"


def _both(p: dict) -> float:
    return p["target"] + p["general"]


def claim_f8(interp: dict, rows: dict) -> tuple[str, str]:
    """interp[(label, seed)][path][alpha] = {"target", "general"} (alpha 1: the final checkpoint,
    scored once in rows). Overshoot: target + general at alpha = 0.8 on the dense path minus the
    final's, pooled over the INTERP settings and seeds. OFT: generator minus dense path at equal
    alpha, averaged over the alpha grid, one number per seed."""
    a = f"{OVERSHOOT_ALPHA:g}"
    back = [_both(r["dense"][a]) - _both(rows[("SFT", lab, s)]) for (lab, s), r in interp.items() if a in r["dense"]]
    gen = [sum(_both(r["factor"][k]) - _both(r["dense"][k]) for k in r["factor"]) / len(r["factor"])
           for (lab, s), r in interp.items() if "factor" in r]
    over, path = stats.mean_ci(back), stats.mean_ci(gen)
    return (stats.all_of([stats.verdict(over), stats.verdict(path)]),
            f"alpha {a} - final, target + general: {stats.fmt_ci(over)} (n = {over['n']} runs); "
            f"OFT generator - dense path: {stats.fmt_ci(path)} (n = {path['n']} seeds)")


# -----------------------------------------------------------------------------
# 3. The study: units of work (train, score), each written once and skipped on a rerun
# -----------------------------------------------------------------------------

def _train_sft(out: Path, method: str, hp: dict, seed: int, B: dict) -> None:
    steps, S = B["sft_steps"], arena.DEMO["sft"]     # the demo's recipe (arena._train_demo_cell)
    resume = any(out.glob(loading.CKPT_PREFIX + "*"))
    train_sft.train(dict(model="toy", method=method, task="toy-math", out=str(out), max_steps=steps,
                         n_train=B["n_train"], global_batch=S["global_batch"], micro_batch=S["micro_batch"],
                         epochs=8, lr=S["lr_full"] if method == "full" else S["lr_peft"],
                         save_every_steps=max(1, steps // B["n_checkpoints"]), seed=seed, data_seed=seed,
                         resume=resume, overwrite=not resume and out.exists(), no_progress=True, **hp))


def _train_grpo(out: Path, method: str, hp: dict, seed: int, B: dict) -> None:
    resume = any(out.glob(loading.CKPT_PREFIX + "*"))
    train_grpo.train(dict(model="toy", method=method, task="toy-math", out=str(out), preset="toy",
                          steps=B["long_grpo_steps"], save_every_steps=B["grpo_steps"], seed=seed,
                          data_seed=seed, resume=resume, overwrite=not resume and out.exists(),
                          no_progress=True, **B["grpo"], **hp))


SCORED_FAMILIES = ("math", *toy_world.GENERAL_FAMILIES)     # the math target and the general axis
# how a checkpoint is scored (Deviation 2, note a): part of a run's identity, like its budget
PROTOCOL = {"test_items": "drawn per seed", "adapters": "merged", "families": list(SCORED_FAMILIES)}


def _score(ckpt: Path | None, seed: int, B: dict) -> dict:
    """Both axes of one checkpoint (greedy; the seed's held-out items, the same for all its
    checkpoints), adapters merged first (implementation note a)."""
    model, tok = arena._toy_model(ckpt)
    return _score_model(peft_methods.merge_and_unload(model), tok, seed, B)


def _score_model(model, tok, seed: int, B: dict) -> dict:
    res = evaluate.evaluate_toy(model, tok, domain="math", n_per_family=B["n_per_family"], batch_size=128,
                                max_new_tokens=B["max_new_tokens"], families=SCORED_FAMILIES, seed=seed)
    return {"target": res["target_score"], "general": res["general_score"],
            "families": {f: v["score"] for f, v in res["families"].items()}}


def _pass_at_k(ckpt: Path, seed: int, B: dict) -> dict:
    """{k: pass@k} on math test items, n samples each at temperature 1 (Chen et al. 2021, Eq. 1)."""
    model, tok = arena._toy_model(ckpt)
    items = toy_world.make_eval_items("math", "test", B["passk_items"], seed=seed)
    prompts = [loading.render_chat(tok, it["prompt"]) for it in items]
    mnt = B["max_new_tokens"] or evaluate.TOY_BENCHMARKS["math"]["max_new_tokens"]
    samples = evaluate.generate(model, tok, prompts, max_new_tokens=mnt,
                                temperature=1.0, n=B["passk_n"], batch_size=256, seed=seed)
    ks = [k for k in PASS_KS if k <= B["passk_n"]]
    return evaluate.aggregate(items, samples, "micro", ks=ks)["pass_at_k"]


def _interp_paths(method: str) -> list[str]:
    """The dense path W0 + alpha dW for every method, and the factor path where it is a different
    model between the endpoints (OFT's Cayley generator sqrt(alpha) Q; PEFT-Arena §9)."""
    return ["dense", "factor"] if set(rewind.default_paths(method)) == {"factor", "dense"} else ["dense"]


def _interpolate(ckpt: Path, method: str, seed: int, B: dict) -> dict:
    """{path: {alpha: scores}} along the paths from the base (alpha 0) to `ckpt` (alpha 1)."""
    model, tok = arena._toy_model()
    run, out = rewind.open_run(model, tok, ckpt), {}
    for path in _interp_paths(method):
        out[path] = {}
        for alpha in B["interp_alphas"]:
            rewind.set_path(run, path, alpha)
            rewind.bake(run)        # served merged, like every scored checkpoint (note a)
            out[path][f"{alpha:g}"] = _score_model(run["model"], tok, seed, B)
    return out


def _geometry(ckpts: list[tuple[str, str]], out: Path, B: dict) -> None:
    """geometry.py over one seed's final SFT checkpoints (weight spectra, CSD, activations)."""
    argv = ["--base", "toy", "--domain", "math", "--out", str(out), "--no-plots", "--device", "cpu",
            "--max-prompts", str(B["geom_prompts"]), "--max-tokens", str(B["geom_tokens"])]
    for label, ckpt in ckpts:
        argv += ["--checkpoint", ckpt, "--label", label]
    geometry.main(argv)


def run_unit(unit: dict) -> str:
    """One unit of work in a worker process: train a run, or score/sample its checkpoints."""
    torch.set_num_threads(1)          # two single-thread workers beat one two-thread process here
    out, B, kind = Path(unit["out"]), unit["budget"], unit["kind"]
    if kind == "sft":
        _train_sft(out, unit["method"], unit["hp"], unit["seed"], B)
    elif kind == "grpo":
        _train_grpo(out, unit["method"], unit["hp"], unit["seed"], B)
    elif kind == "score":
        loading.atomic_write_json(unit["result"], _score(Path(unit["ckpt"]) if unit["ckpt"] else None, unit["seed"], B))
    elif kind == "passk":
        loading.atomic_write_json(unit["result"], _pass_at_k(Path(unit["ckpt"]), unit["seed"], B))
    elif kind == "interp":
        loading.atomic_write_json(unit["result"], _interpolate(Path(unit["ckpt"]), unit["method"], unit["seed"], B))
    elif kind == "geometry":
        _geometry(unit["ckpts"], out, B)
    return unit["key"]


def _runs(B: dict):
    """(paradigm, label, method, hp, seed, run dir name) of every training run of the study."""
    cells = [c for c in arena.SFT_CELLS if B["settings"] is None or c[0] in B["settings"]]
    grpo = {lab for lab, _, _ in arena.GRPO_CELLS}
    for seed in B["seeds"]:
        for lab, method, hp in cells:
            yield "SFT", lab, method, hp, seed
        for lab, method, hp in cells:
            if lab in grpo:
                yield "GRPO", lab, method, hp, seed


def _run_dir(run: Path, paradigm: str, label: str, seed: int) -> Path:
    return run / paradigm.lower() / f"{arena.slug(label)}-s{seed}"


def plan_units(run: Path, B: dict, phase: str) -> list[dict]:
    """The units still to do in one phase ("train", then "score" once every run has finished)."""
    units = []
    for paradigm, lab, method, hp, seed in _runs(B):
        d = _run_dir(run, paradigm, lab, seed)
        base = dict(budget=B, method=method, hp=hp, seed=seed, out=str(d))
        if phase == "train":
            if loading.finished_checkpoint(d) is None:
                units.append(dict(base, kind=paradigm.lower(), key=f"train {paradigm} {lab} s{seed}"))
            continue
        for step, ckpt in loading.list_checkpoints(d):
            res = run / "scores" / f"{d.parent.name}-{d.name}-{step}.json"
            if not res.exists():
                units.append(dict(base, kind="score", ckpt=str(ckpt), result=str(res),
                                  key=f"score {paradigm} {lab} s{seed} step {step}"))
            pk = run / "passk" / f"{d.name}-{step}.json"
            if paradigm == "GRPO" and not pk.exists():
                units.append(dict(base, kind="passk", ckpt=str(ckpt), result=str(pk),
                                  key=f"pass@k {lab} s{seed} step {step}"))
    if phase == "train":     # the long GRPO runs first (implementation note b)
        return sorted(units, key=lambda u: u["kind"] != "grpo")
    units = _analysis_units(run, B) + units      # the long geometry units first (no straggler)
    for seed in B["seeds"]:
        if not _base_path(run, seed).exists():
            units.append(dict(budget=B, kind="score", ckpt=None, result=str(_base_path(run, seed)),
                              seed=seed, key=f"score base s{seed}", out=str(run)))
    return units


def _base_path(run: Path, seed: int) -> Path:
    return run / "scores" / f"base-s{seed}.json"


def _analysis_units(run: Path, B: dict) -> list[dict]:
    """Geometry of each seed's final SFT checkpoints (F6, F7); interpolation paths of the INTERP
    settings (F8). Planned in the score phase: they need only the finished runs."""
    units = []
    for seed in B["seeds"]:
        sft = [(lab, m, _run_dir(run, p, lab, s)) for p, lab, m, _, s in _runs(B) if p == "SFT" and s == seed]
        gdir = run / "geometry" / f"s{seed}"
        if not (gdir / "summary.json").exists():
            units.append(dict(budget=B, kind="geometry", out=str(gdir), key=f"geometry s{seed}",
                              ckpts=[(arena.slug(lab), str(loading.finished_checkpoint(d))) for lab, _, d in sft]))
        for lab, method, d in sft:
            res = run / "interp" / f"{d.name}.json"
            if lab in INTERP and not res.exists():
                units.append(dict(budget=B, kind="interp", method=method, seed=seed, out=str(d), result=str(res),
                                  ckpt=str(loading.finished_checkpoint(d)), key=f"interpolate {lab} s{seed}"))
    return units


def run_units(units: list[dict], workers: int, log=print) -> None:
    """Run the units on `workers` processes (spawned: a clean torch each), or in this one."""
    t0 = time.time()
    if workers <= 1 or len(units) <= 1:
        for i, key in enumerate(map(run_unit, units), 1):
            log(f"[findings] {i}/{len(units)} {key} ({time.time() - t0:.0f} s)")
        return
    with mp.get_context("spawn").Pool(workers) as pool:
        for i, key in enumerate(pool.imap_unordered(run_unit, units), 1):
            log(f"[findings] {i}/{len(units)} {key} ({time.time() - t0:.0f} s)")


# -----------------------------------------------------------------------------
# 4. Collect the numbers, decide, report
# -----------------------------------------------------------------------------

def _read(path: Path) -> dict:
    return json.loads(path.read_text())


def collect(run: Path, B: dict) -> dict:
    """Every number of the study: rows[(paradigm, label, seed)] is the run's compared checkpoint
    (SFT: the final one; GRPO: step grpo_steps, the demo's budget), curves[...] its
    [(target gain, forgetting)] from the base along training, passk[(label, seed)] short/long,
    geo[(label, seed)] the geometry summary row of the final SFT checkpoint, interp[(label, seed)]
    its interpolation paths, base[seed] the base model's scores on the seed's items."""
    base = {seed: _read(_base_path(run, seed)) for seed in B["seeds"]}
    rows, curves, passk, geo, interp = {}, {}, {}, {}, {}
    for paradigm, lab, _, _, seed in _runs(B):
        d = _run_dir(run, paradigm, lab, seed)
        pts = [(0.0, 0.0)]
        for step, _ in loading.list_checkpoints(d):
            s = _read(run / "scores" / f"{d.parent.name}-{d.name}-{step}.json")
            pt = {"step": step, "target": s["target"], "general": s["general"], "families": s["families"],
                  "gain": s["target"] - base[seed]["target"], "forgetting": base[seed]["general"] - s["general"]}
            pts.append((pt["gain"], pt["forgetting"]))
            if paradigm == "SFT" or step == B["grpo_steps"]:
                rows[(paradigm, lab, seed)] = pt
        curves[(paradigm, lab, seed)] = pts
        if paradigm == "GRPO":
            passk[(lab, seed)] = {"short": _read(run / "passk" / f"{d.name}-{B['grpo_steps']}.json"),
                                  "long": _read(run / "passk" / f"{d.name}-{B['long_grpo_steps']}.json")}
            continue
        summary = {r["label"]: r for r in _read(run / "geometry" / f"s{seed}" / "summary.json")}
        geo[(lab, seed)] = summary[arena.slug(lab)]
        if lab in INTERP:
            interp[(lab, seed)] = _read(run / "interp" / f"{d.name}.json")
    return dict(rows=rows, curves=curves, passk=passk, geo=geo, interp=interp, base=base)


PAPER = {   # PEFT-Arena poster main table and §10.6 (Qwen2.5-7B math unless named)
    "F1": "Full FT +15.3 T / -12.8 G (PiSSA -22.2 G)",
    "F2": "Delta G: OFT b32 -2.60 vs LoRA r8 -7.75 (T 46.9 vs 42.5)",
    "F3": "Llama math G: PiSSA 7.08 vs LoRA r8 36.57",
    "F4": "VeRA +4.1 T / +0.3 G; IA3 -0.2 T / -2.3 G",
    "F5": "G after RLVR vs SFT: Full 48.7 vs 34.2, OFT 48.9 vs 44.4, LoRA 48.3 vs 39.2",
    "F6": "smoothness bars: PiSSA and MiSS spikiest, OFT and Full smooth (no r reported)",
    "F7": "Pearson with forgetting: Procrustes 0.71, Gram 0.49, CSD_G,un 0.48, CKA -0.76",
    "F8": "OFT b32 final 46.9 / 44.4; alpha 0.3: Cayley 45.8 / 48.6 vs dense 43.9 / 43.9",
    "F9": "longer GRPO: LoRA pass@1 +2.30, pass@64 -2.93; OFT -0.07 / -1.46",
}
CLAIMS = {
    "F1": "Full FT gains the most target and forgets the most",
    "F2": "at comparable budgets OFT forgets less than LoRA at equal target gain",
    "F3": "PiSSA can collapse general ability (vs LoRA r8)",
    "F4": "VeRA and IA3 are stable (forgetting < 2 points) but gain less than LoRA r8",
    "F5": "GRPO forgets less than SFT for the same method",
    "F6": "smoother spectral profiles (lower fluctuation) go with less forgetting",
    "F7": "Procrustes, Gram, CSD_G rise and CKA falls with forgetting",
    "F8": "the final SFT checkpoint overshoots; OFT's generator path beats its dense path",
    "F9": "longer GRPO lowers pass@64 while pass@1 holds",
}


def decide(d: dict) -> dict[str, tuple[str, str]]:
    """{claim id: (verdict, our numbers)}: every verdict computed by the rules of section 2."""
    rows, curves = d["rows"], d["curves"]
    labels = list(dict.fromkeys(k[1] for k in rows if k[0] == "SFT"))
    grpo = list(dict.fromkeys(k[1] for k in rows if k[0] == "GRPO"))
    return {"F1": claim_f1(rows, labels), "F2": claim_budget_pairs(curves, rows), "F3": claim_f3(rows),
            "F4": claim_f4(rows), "F5": claim_f5(rows, curves, grpo), "F6": claim_geometry("F6", d["geo"], rows),
            "F7": claim_geometry("F7", d["geo"], rows), "F8": claim_f8(d["interp"], rows), "F9": claim_f9(d["passk"])}


def _general_var(r: dict, n: int) -> float:
    """Item-sampling variance of one general score (a mean of F proportions on n items each):
    sum_f p_f (1 - p_f) / n / F^2, in points^2."""
    ps = [r["families"][f] / 100 for f in toy_world.GENERAL_FAMILIES]
    return 1e4 * sum(p * (1 - p) for p in ps) / n / len(ps) ** 2


def general_halfwidths(rows: dict, n: int) -> tuple[float, float]:
    """The largest item-sampling 95% half-width of a compared general score, in points: of one
    seed's checkpoint, and of a setting's mean over its seeds (independent item draws, Deviation 2:
    variance sum_s var_s / S^2)."""
    one = max(1.96 * math.sqrt(_general_var(r, n)) for r in rows.values())
    cells = {}
    for (paradigm, lab, _), r in rows.items():
        cells.setdefault((paradigm, lab), []).append(_general_var(r, n))
    mean = max(1.96 * math.sqrt(sum(v) / len(v) ** 2) for v in cells.values())
    return one, mean


def findings_markdown(d: dict, B: dict) -> str:
    verdicts, rows, base = decide(d), d["rows"], d["base"]
    one, cell = general_halfwidths(rows, B["n_per_family"])
    bt, bg = (stats.mean_ci([b[k] for b in base.values()])["mean"] for k in ("target", "general"))
    out = ["# Findings on the toy arena", "",
           f"`python arena.py findings` - {len(B['seeds'])} seeds, SFT {B['sft_steps']} steps "
           f"({B['n_checkpoints']} checkpoints), GRPO {B['grpo_steps']} / {B['long_grpo_steps']} steps, "
           f"{B['n_per_family']} test items per family; intervals are 95% t-intervals over seeds.", "",
           "| | claim | paper | toy (mean [95% CI], points) | verdict |", "|---|---|---|---|---|"]
    for cid, (v, ours) in verdicts.items():
        out.append(f"| {cid} | {CLAIMS[cid]} | {PAPER[cid]} | {ours} | **{v}** |")
    out += ["", f"Base (mean over the seeds' item draws): target {bt:.1f}, general {bg:.1f}. Largest "
            f"item-sampling 95% half-width of a compared general score: {one:.1f} points for one seed's "
            f"checkpoint, {cell:.1f} for a setting's mean over {len(B['seeds'])} seeds (each seed scores "
            f"its own {B['n_per_family']} items per family).", "",
            "| Train | Method | Target gain | Forgetting |", "|---|---|---|---|"]
    for paradigm in ("SFT", "GRPO"):
        for lab in dict.fromkeys(k[1] for k in rows if k[0] == paradigm):
            g = _ci(rows, lab, "gain", paradigm)
            f = _ci(rows, lab, "forgetting", paradigm)
            out.append(f"| {paradigm} | {lab} | {stats.fmt_ci(g)} | {stats.fmt_ci(f)} |")
    return "\n".join(out) + "\n"


# -----------------------------------------------------------------------------
# 5. Figures (shared, labelled axes; readable at README width)
# -----------------------------------------------------------------------------

def _mean_curve(curves: dict, paradigm: str, lab: str):
    """Per checkpoint: (gain CI, forgetting CI) over seeds, in training order."""
    runs = [c for (p, l, _), c in curves.items() if p == paradigm and l == lab]
    n = min(len(c) for c in runs)
    return [(stats.mean_ci([c[i][0] for c in runs]), stats.mean_ci([c[i][1] for c in runs])) for i in range(n)]


def _err(iv: dict) -> list[float]:
    return [0.0, 0.0] if iv["lo"] is None else [iv["mean"] - iv["lo"], iv["hi"] - iv["mean"]]


def plot_curves(curves: dict, path: Path) -> None:
    """One panel per SFT setting (its curve in colour, every other setting in grey), shared axes."""
    plt = geometry._pyplot()
    labels = list(dict.fromkeys(k[1] for k in curves if k[0] == "SFT"))
    mean = {lab: _mean_curve(curves, "SFT", lab) for lab in labels}
    cols = 4
    fig, axes = plt.subplots(math.ceil(len(labels) / cols), cols, figsize=(12, 2.6 * math.ceil(len(labels) / cols)),
                             sharex=True, sharey=True, squeeze=False)
    for ax, lab in zip(axes.flat, labels):
        for other in labels:
            ax.plot([g["mean"] for g, _ in mean[other]], [f["mean"] for _, f in mean[other]], color="0.85", lw=1)
        pts = mean[lab]
        ax.errorbar([g["mean"] for g, _ in pts], [f["mean"] for _, f in pts],
                    xerr=list(zip(*[_err(g) for g, _ in pts])), yerr=list(zip(*[_err(f) for _, f in pts])),
                    color="tab:blue", marker="o", ms=3, lw=1.5, capsize=2)
        ax.set_title(lab, fontsize=10)
        ax.axhline(0, color="0.6", lw=0.5)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(labels):]:
        ax.axis("off")
    fig.supxlabel("target gain (points; base = 0)")
    fig.supylabel("forgetting (points of general; up = worse)")
    fig.suptitle("SFT trade-off curves: mean over seeds at each checkpoint, 95% CI bars")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_final(rows: dict, path: Path) -> None:
    """Final SFT and GRPO points with 95% CI bars in both directions."""
    plt = geometry._pyplot()
    fig, ax = plt.subplots(figsize=(11, 6))
    colour = {lab: plt.cm.tab20(i % 20) for i, lab in enumerate(dict.fromkeys(k[1] for k in rows))}
    for paradigm, marker in (("SFT", "o"), ("GRPO", "^")):
        for lab in dict.fromkeys(k[1] for k in rows if k[0] == paradigm):
            g = _ci(rows, lab, "gain", paradigm)
            f = _ci(rows, lab, "forgetting", paradigm)
            ax.errorbar(g["mean"], f["mean"], xerr=[[e] for e in _err(g)], yerr=[[e] for e in _err(f)],
                        marker=marker, ms=7 if paradigm == "GRPO" else 6, capsize=3, lw=1, color=colour[lab],
                        label=f"{lab}" + (" (GRPO)" if paradigm == "GRPO" else ""))
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))   # labels beside, not on, the crowded points
    ax.set_xlabel("target gain (points)")
    ax.set_ylabel("forgetting (points of general; up = worse)")
    ax.set_title("Final checkpoints: mean over seeds, 95% CI (circles SFT, triangles GRPO)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_passk(passk: dict, path: Path) -> None:
    """pass@k against k after the short and the long GRPO run, one panel per method, shared axes."""
    plt = geometry._pyplot()
    labels = list(dict.fromkeys(lab for lab, _ in passk))
    fig, axes = plt.subplots(1, len(labels), figsize=(4 * len(labels), 3.5), sharey=True, squeeze=False)
    for ax, lab in zip(axes[0], labels):
        runs = [r for (l, _), r in passk.items() if l == lab]
        ks = sorted(int(k) for k in runs[0]["short"])
        for which, color in (("short", "tab:blue"), ("long", "tab:red")):
            ivs = [stats.mean_ci([r[which][str(k)] for r in runs]) for k in ks]
            ax.errorbar(ks, [iv["mean"] for iv in ivs], yerr=list(zip(*[_err(iv) for iv in ivs])),
                        color=color, marker="o", ms=3, capsize=2, label=f"{which} GRPO")
        ax.set_xscale("log", base=2)
        ax.set_title(lab)
        ax.set_xlabel("k")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("pass@k on toy math (%)")
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_geometry(geo: dict, rows: dict, path: Path) -> None:
    """F6/F7: each metric against forgetting, one point per SFT setting (mean over seeds, 95% CI
    bars both ways); forgetting shares one y-axis; the title gives r over all checkpoints."""
    plt = geometry._pyplot()
    metrics = [m for cid in ("F6", "F7") for m in GEOMETRY_CLAIMS[cid]]
    labels = list(dict.fromkeys(lab for lab, _ in geo))
    fig, axes = plt.subplots(2, 3, figsize=(12, 7), sharey=True)
    for ax, (key, name, _, paper_r) in zip(axes.flat, metrics):
        xs, ys = [], []
        for i, lab in enumerate(labels):
            pts = [(g[key], rows[("SFT", lab, s)]["forgetting"]) for (l, s), g in geo.items()
                   if l == lab and _finite(g.get(key))]
            if not pts:
                continue
            xs += [x for x, _ in pts]
            ys += [y for _, y in pts]
            gx, gy = stats.mean_ci([x for x, _ in pts]), stats.mean_ci([y for _, y in pts])
            ax.errorbar(gx["mean"], gy["mean"], xerr=[[e] for e in _err(gx)], yerr=[[e] for e in _err(gy)],
                        marker="o", ms=4, capsize=2, lw=1, color=plt.cm.tab20(i % 20), label=lab)
        iv = stats.pearson_ci(xs, ys)
        ax.set_title(f"{name}: r = {stats.fmt_ci(iv, digits=2)}" + (f" (paper {paper_r:+.2f})" if paper_r else ""),
                     fontsize=9)
        ax.set_xlabel(name)
        ax.grid(alpha=0.3)
    for ax in axes[:, 0]:
        ax.set_ylabel("forgetting (points)")
    axes.flat[0].legend(fontsize=6, ncol=2)
    fig.suptitle("Geometry of the final SFT checkpoints against forgetting (mean over seeds, 95% CI)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_interp(interp: dict, rows: dict, path: Path) -> None:
    """F8: (target, general) along each interpolation path from the final checkpoint (alpha = 1,
    star) back toward the base, mean over seeds; shared axes across the settings."""
    plt = geometry._pyplot()
    labels = list(dict.fromkeys(lab for lab, _ in interp))
    fig, axes = plt.subplots(1, len(labels), figsize=(4.2 * len(labels), 4), sharex=True, sharey=True, squeeze=False)
    for ax, lab in zip(axes[0], labels):
        runs = {s: r for (l, s), r in interp.items() if l == lab}
        final = [rows[("SFT", lab, s)] for s in runs]
        ft, fg = (stats.mean_ci([f[k] for f in final])["mean"] for k in ("target", "general"))
        for p, style in (("dense", "-"), ("factor", "--")):
            alphas = sorted((a for a in next(iter(runs.values())).get(p, {})), key=float)
            if not alphas:
                continue
            t = [stats.mean_ci([r[p][a]["target"] for r in runs.values()])["mean"] for a in alphas] + [ft]
            g = [stats.mean_ci([r[p][a]["general"] for r in runs.values()])["mean"] for a in alphas] + [fg]
            ax.plot(t, g, style, marker="o", ms=3, label=rewind.path_label(_method_of(lab), p))
            for a, x, y in zip(alphas, t, g):
                ax.annotate(a, (x, y), xytext=(3, 3), textcoords="offset points", fontsize=7)
        ax.plot([ft], [fg], "k*", ms=10, label="final (alpha 1)")
        ax.set_title(lab)
        ax.set_xlabel("target (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("general (%)")
    fig.suptitle("Interpolation toward the base (PEFT-Arena §9): mean over seeds, alpha at each point")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _method_of(label: str) -> str:
    return next(m for lab, m, _ in arena.SFT_CELLS if lab == label)


# -----------------------------------------------------------------------------
# 6. CLI
# -----------------------------------------------------------------------------

def _check_resume(run: Path, cfg: dict) -> None:
    """Refuse to resume a directory made with another budget or scoring protocol: its finished
    units would be mixed with new ones (the worker count may change)."""
    path = run / loading.RUN_CONFIG
    if not path.exists():
        return
    def saved(c):       # as config.json holds it (tuples -> lists), without the worker count
        c = json.loads(json.dumps(c))
        return {**c, "budget": {k: v for k, v in (c.get("budget") or {}).items() if k != "workers"}}
    diff = loading.config_diff(saved(json.loads(path.read_text())), saved(cfg), (), new_keys_only=True)
    if diff:
        raise SystemExit(f"{path}: this run directory was made with other settings ({', '.join(diff)} "
                         f"differ); pass another --out, or delete it to start over")


def run_findings(run: Path, B: dict, log=print) -> Path:
    """Train, score, decide and draw; a rerun skips every finished unit."""
    cfg = {"budget": B, "protocol": PROTOCOL, "sft_train": arena.DEMO["sft"], "sft_cells": arena.SFT_CELLS,
           "grpo_cells": arena.GRPO_CELLS}
    _check_resume(run, cfg)
    run.mkdir(parents=True, exist_ok=True)
    loading.write_run_config(run, cfg)
    for phase in ("train", "score"):
        units = plan_units(run, B, phase)
        log(f"[findings] {phase}: {len(units)} units to do")
        run_units(units, B["workers"], log)
    d = collect(run, B)
    loading.atomic_write_text(run / "findings.md", findings_markdown(d, B))
    plot_curves(d["curves"], run / "tradeoff_curves.png")
    plot_final(d["rows"], run / "final_points.png")
    plot_passk(d["passk"], run / "passk.png")
    plot_geometry(d["geo"], d["rows"], run / "geometry.png")
    plot_interp(d["interp"], d["rows"], run / "interpolation.png")
    log(f"[findings] wrote {run / 'findings.md'} and five figures")
    return run / "findings.md"


FLAGS = [   # also `python arena.py findings` (arena.COMMANDS)
    ("--out", dict(default="runs/findings", help="run directory (resumed when it exists)")),
    ("--smoke", dict(action="store_true", help="every step at a tiny size (minutes; for CI)")),
    ("--workers", dict(type=int, default=None, help="worker processes (default: 2; 1 with --smoke)")),
]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description="The paper's findings on the toy arena: seeds, intervals, verdicts.")
    for flag, kw in FLAGS:
        ap.add_argument(flag, **kw)
    return ap


def run(args) -> int:
    """The study from parsed FLAGS; prints findings.md."""
    B = dict(BUDGETS["smoke" if args.smoke else "full"])
    if args.workers is not None:
        B["workers"] = args.workers
    t0 = time.time()
    path = run_findings(Path(args.out), B)
    print(path.read_text())
    print(f"[findings] finished in {time.time() - t0:.0f} s; outputs in {path.parent}/")
    return 0


def main(argv=None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
