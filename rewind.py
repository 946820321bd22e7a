"""rewind.py: the overshoot, interpolation paths and path-wise rewinding of finetuned checkpoints.

Implements PEFT-Arena's interpolation and path-wise rewinding (Huang et al., arXiv 2605.28819: the
overshoot claim, the poster's rewinding rows for Qwen2.5-7B SFT OFT b32, the project page
`PA: docs/index.html` and figures `PA: docs/static/images/{train-vs-interp,teaser-1}.png`). The
official release ships no interpolation, rewinding or iOFT code, so this file is the project's
reference version; every choice the paper leaves open is listed under Deviations and is an option.

For each SFT run given with --checkpoint (train_sft.py's `global_step_<k>/` dirs, or HF PEFT
adapters: TRL's `checkpoint-<k>/`, the release's `global_step_<k>/`) it
  * walks the **interpolation paths** from the base model (alpha = 0) to the final checkpoint
    (alpha = 1) on an alpha grid, and the **training path** through the saved checkpoints;
  * scores both axes (target, general) at every point on ONE loaded base model whose weights are
    swapped in place per point (no reload per point);
  * applies **layer-wise rewinding** (SafeRho, MinRho, uniform) as single extra points;
  * picks an **operating point** (max general keeping X% of the final target gain; max
    target + general; the Pareto set) and reports whether the **overshoot** appears;
  * plots the paths in the (target, general) plane and saves rewound models as ordinary
    checkpoints (adapter dirs, or merged HF dirs for dense points) that evaluate.py and geometry.py read.

Paths (W (d_out, d_in) = nn.Linear.weight, W0 base, W_ft final, dW = W_ft - W0):
  dense   W(alpha) = W0 + alpha dW on the merged weights; every method. For OFT this is the
          "dense-delta" baseline that leaves the orthogonal manifold.
  factor  the parameterisation-aware path, in the adapter's own tensors. Each method's class in
          peft_methods.py says how (AdapterLinear.factor_point; a class that says nothing has the
          dense path only, so a method added from the README's recipe is rewound too):
            LoRA / KeepLoRA  B <- alpha B           AdaLoRA E <- alpha E     VeRA lambda_b <- alpha lambda_b
            MiSS             D <- alpha D           IA3     l <- 1 + alpha (l - 1)
            DoRA             B <- alpha B, m <- lerp(||W0||_row, m, alpha)   (NOT additive: the norm)
            PiSSA / MiLoRA   A, B <- lerp from the initial (A0, B0)          (NOT additive: alpha^2 term)
            OFT (= iOFT)     Q <- sqrt(alpha) Q for every block generator, R = Cayley(-Neumann)(Q),
                             W = W0 blockdiag(R)^T: W stays orthogonally related to W0, so W0's
                             singular values are kept for every alpha (exactly with the exact
                             Cayley transform, to O(||Q||^T) with the T-term Neumann series).
          Where dW is linear in the scaled tensor the factor path IS the dense path (`factor_is_dense`).
  training  base (step 0) -> global_step_k -> ... -> final.

Layer-wise rewinding (PEFT-Arena poster "SafeRho/SafeScale, MinRho/MinScale"):
  rho_l = mean over layer l's modules of their strength (OFT: ||Q||_F; the class's rewind_strength);
  tau   = mean of rho_l over the first five layers (SafeRho) or min_l rho_l (MinRho);
  c_l   = min(1, tau / rho_l), applied as Q_l <- c_l Q_l (or sqrt(c_l) Q_l with --rewind-map sqrt).
  `--rewind uniform=0.4` is the generator-path point alpha = 0.4 (the paper's "uniform scale 0.4").

Run:
    python rewind.py --base toy --checkpoint runs/sft-oft-b16 --rewind saferho --rewind minrho \\
        --rewind uniform=0.4 --grid 0:1:0.1 --out runs/rewind-oft-b16     # several --checkpoint: one figure
    python rewind.py --base /models/Qwen2.5-7B --checkpoint runs/qwen-oft-b32 --domain math \\
        --data-dir data --rewind saferho --out runs/rewind-qwen   # --eval real: one vLLM engine, all points
    python rewind.py --base /models/Qwen2.5-7B --checkpoint runs/qwen-oft-b32 --eval none --save all --out DIR
    python rewind.py --smoke --out /tmp/rewind-smoke          # random tiny model, < 1 min on CPU

Outputs in --out: config.json, results.json (every point, rho tables, selections, overshoot
verdicts), results.csv (one row per point), summary.md, tradeoff.png, points/<label>/<name>/ (saved
checkpoints: `evaluate.py --model BASE --adapter DIR` or `--model DIR`), generations/ (the
evaluation cache: a killed run resumes without regenerating).

Shape legend: d_in / d_out of a wrapped Linear; W (d_out, d_in); b OFT block size, n = d_in / b
blocks; q (n, b(b-1)/2) the OFT generator (upper triangles of the skew blocks Q (n, b, b)); L layers.

Deviations that change a number the paper reports (each also marked `DEVIATION n` at the line):
 1. Generator map Q(alpha) = sqrt(alpha) Q (the paper's one caption); `--generator-map linear`: alpha Q.
 3. PiSSA / MiLoRA's factor path lerps both factors from (A0, B0): it is off the additive path by
    (alpha^2 - alpha) s (B - B0)(A - A0). DoRA's lerps the magnitude from ||W0||_row.
 4. rho_l: mean over the layer's modules of ||Q||_F (the quantity rewinding scales, so MinRho equalises
    it exactly); `--rho r_minus_i` (||R - I||_F), `--rho dw` (||dW||_F). The paper does not define rho.
 5. c_l = tau / rho_l capped at 1 (`--no-cap` lifts it), applied linearly (`--rewind-map sqrt`);
    `--factor-rule solve` bisects c_l so that rho_l after rewinding equals tau, for any rho and map.
 7. `uniform=a` is the generator-path point alpha = a (the poster's "uniform scale 0.4" row).
 9. Full FT's dense path moves every parameter (embeddings, norms, biases too), not only Linear weights.
Implementation notes (no number the paper reports changes):
 2. alpha = 0 and 1 of every path are the base and the final checkpoint, evaluated once and shared
    (exact in fp32; PiSSA/MiLoRA's factor path to fp32 rounding: their residual base is stored rounded).
 6. SafeRho averages the first min(5, L) layers (all 4 on the toy model, where it is the mean rho).
 8. Extension: non-OFT methods are rewound too (rho = ||dW||_F); the paper rewinds OFT only.
10. `--eval real` (default for a real --base) scores the paper's suites with evaluate.py, one vLLM engine
    reused across points; `--eval toy` (default for the toy base) is evaluate.evaluate_toy.
11. The training path starts at the base model as step 0 (train_sft.py saves no step-0 checkpoint).
12. Interpolation is torch.lerp in fp32 (exact at both ends), then cast to the model dtype.
13. Overshoot (issue #8's numbers; the paper's definition is qualitative): a point with alpha < 1
    whose general score is >= 5 points above the final's while keeping >= 80% of its target gain.
14. Adapter points are scored as merged dense weights (the paper merges before evaluating;
    `--eval-form adapter` scores through the wrappers), the same model up to fp32 rounding.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

import evaluate
import loading
import peft_methods as pm
import toy_world

PATH_NAMES = ("factor", "dense")
RHO_MEASURES = ("q", "r_minus_i", "dw")
SAFE_RHO_LAYERS = 5          # PEFT-Arena poster: "SafeRho matches the first-five-layer average"
lerp_exact, generator_coefficient = pm.lerp_exact, pm.generator_coefficient   # beside the adapter classes


# -----------------------------------------------------------------------------
# 1. Pure math: grids, rotation strength, rewinding factors, operating points
# -----------------------------------------------------------------------------

def parse_grid(spec: str) -> list[float]:
    """'0:1:0.1' -> [0.0, 0.1, ..., 1.0] (stop included); '0,0.3,1' -> [0.0, 0.3, 1.0].
    Values are rounded to 10 decimals so that 0.1 * 3 prints (and caches) as 0.3."""
    spec, ranged = str(spec).strip(), ":" in str(spec)
    bad = f"--grid {spec!r}: "
    try:
        parts = [float(x) for x in spec.split(":" if ranged else ",") if x.strip()]
    except ValueError:
        parts = []
    if not parts or (ranged and len(parts) != 3):
        raise ValueError(bad + "expected START:STOP:STEP (e.g. 0:1:0.1) or a comma list (e.g. 0,0.3,1)")
    if ranged:
        start, stop, step = parts
        n = round((stop - start) / step) if step > 0 else -1
        if n < 0 or abs(start + n * step - stop) > 1e-9 * max(1.0, abs(stop)):
            raise ValueError(bad + f"step {step} does not divide [{start}, {stop}] (or stop < start, step <= 0)")
        parts = [start + i * step for i in range(n + 1)]
    values = sorted({round(v, 10) for v in parts})
    if values[0] < 0:
        raise ValueError(bad + f"alpha must be >= 0 (got {values[0]}); sqrt(alpha) scales OFT generators")
    return values


def layer_class(method: str) -> type | None:
    """The method's AdapterLinear subclass (None for Full FT): it knows the method's factor path
    (factor_point), its labels and its strength measures (rho_measures, rewind_strength)."""
    if method not in pm.METHODS:
        raise ValueError(f"unknown PEFT method '{method}'; known: {', '.join(pm.METHODS)}")
    return pm.METHODS[method].layer


def has_factor_path(method: str) -> bool:
    cls = layer_class(method)
    return cls is not None and cls.has_factor_path()


def default_paths(method: str) -> list[str]:
    """Dense only without a factor path; the factor path alone where it IS the dense path (dW linear
    in the scaled tensor); both where they differ between the endpoints (DoRA, PiSSA, MiLoRA, OFT)."""
    if not has_factor_path(method):
        return ["dense"]
    return ["factor"] if layer_class(method).factor_is_dense else ["factor", "dense"]


def path_label(method: str, path: str, gen_map: str = "sqrt") -> str:
    cls = layer_class(method) or pm.AdapterLinear
    return cls.dense_label if path == "dense" else cls.factor_label.replace("{gen}", "sqrt(a)" if gen_map == "sqrt" else "a")


def singular_value_distortion(W0: torch.Tensor, W: torch.Tensor, s0: torch.Tensor | None = None) -> float:
    """||sigma(W) - sigma(W0)||_2 / ||sigma(W0)||_2: 0 when W is orthogonally related to W0."""
    s0 = torch.linalg.svdvals(W0.float()) if s0 is None else s0       # (k,) sorted
    s1 = torch.linalg.svdvals(W.float())
    return float(torch.linalg.norm(s1 - s0) / torch.linalg.norm(s0).clamp_min(1e-30))


def layer_index(name: str) -> int | None:
    """Decoder layer of a module/parameter name ('model.layers.3.mlp.down_proj' -> 3), else None."""
    m = re.search(r"(?:^|\.)layers\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def mean_by_layer(module_values: dict[str, float]) -> dict[int, float]:
    """{module name: value} -> {layer: mean over that layer's modules} (modules outside layers dropped)."""
    acc: dict[int, list[float]] = {}
    for name, v in module_values.items():
        if layer_index(name) is not None:
            acc.setdefault(layer_index(name), []).append(float(v))
    return {l: sum(vs) / len(vs) for l, vs in sorted(acc.items())}


# Layer-wise rewinding (PEFT-Arena poster). Finetuning rotates some layers far more than others;
# rewinding pulls the strong layers back toward a target tau and leaves the weak ones alone:
#     SafeRho  tau = mean_{l < 5} rho_l     (the early layers)
#     MinRho   tau = min_l rho_l           (every layer ends at the weakest layer's strength)
#     c_l = min(1, tau / rho_l),  Q_l <- c_l Q_l
# For rho = ||Q||_F the map Q -> c Q scales rho by exactly c, so after rewinding rho_l = min(rho_l, tau).

def rewind_target(rhos: dict[int, float], rule: str, first_k: int = SAFE_RHO_LAYERS) -> tuple[float, dict]:
    """tau: SafeRho = mean of the first `first_k` layers, MinRho = min over layers (PEFT-Arena poster)."""
    if not rhos:
        raise ValueError("rewinding needs at least one decoder layer with adapter modules")
    layers = sorted(rhos)
    if rule == "minrho":
        l_min = min(layers, key=lambda l: rhos[l])
        return rhos[l_min], {"layers_used": [l_min]}
    if rule != "saferho":
        raise ValueError(f"rewind rule must be 'saferho' or 'minrho', not {rule!r}")
    used, info = layers[:first_k], {"layers_used": layers[:first_k]}
    if len(layers) < first_k:      # note 6: fewer layers than the paper's five: all of them
        info["note"] = (f"SafeRho: the model has {len(layers)} adapter layers (< {first_k}); tau is the "
                        f"mean over all {len(layers)} of them")
    return sum(rhos[l] for l in used) / len(used), info


def rewind_factors(rhos: dict[int, float], tau: float, *, cap: bool = True) -> dict[int, float]:
    """c_l = tau / rho_l, capped at 1 (DEVIATION 5: --no-cap lifts it); rho_l = 0 -> c_l = 1."""
    return {l: (min(c, 1.0) if cap else c) for l, c in ((l, tau / r if r > 0 else 1.0) for l, r in rhos.items())}


# For a measure that is not linear in c (||R - I||_F, or any measure under the sqrt map) tau / rho_l
# only approximates the factor; bisection on c finds rho_l(c_l) = tau exactly (DEVIATION 5).

def solve_factor(strength_at: Callable[[float], float], tau: float, *, cap: bool = True, iters: int = 60) -> float:
    """c with strength_at(c) = tau by bisection (strength_at increasing, strength_at(0) = 0). With
    the cap, a layer already at or below tau keeps c = 1; without it c may exceed 1."""
    s1 = strength_at(1.0)
    lo, hi = 0.0, 1.0
    if s1 <= tau:
        if cap or s1 == tau:
            return 1.0
        lo, hi = 1.0, 2.0
        while strength_at(hi) < tau:       # bracket the root above 1
            hi *= 2.0
            if hi > 1e4:
                raise ValueError(f"solve_factor: strength never reaches tau={tau} (strength(1e4) too small)")
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if strength_at(mid) < tau else (lo, mid)
    return 0.5 * (lo + hi)


def parse_rewind(spec: str) -> dict:
    """'saferho' | 'minrho' | 'uniform=0.4' -> {'name', 'kind', 'value'?}."""
    s = spec.strip().lower()
    kind = {"saferho": "saferho", "safescale": "saferho", "minrho": "minrho", "minscale": "minrho"}.get(s)
    if kind:
        return {"name": kind, "kind": kind}
    m = re.fullmatch(r"uniform=([0-9]*\.?[0-9]+)", s)
    if not m:
        raise ValueError(f"--rewind {spec!r}: expected saferho, minrho or uniform=A (e.g. uniform=0.4)")
    return {"name": f"uniform={float(m.group(1)):g}", "kind": "uniform", "value": float(m.group(1))}


def parse_rule(spec: str) -> dict:
    """'keep-target=80' | 'sum' | 'pareto' -> {'name', 'kind', 'keep'?}."""
    s = spec.strip().lower()
    if s in ("sum", "pareto"):
        return {"name": s, "kind": s}
    m = re.fullmatch(r"keep-target=([0-9]*\.?[0-9]+)", s)
    if not m:
        raise ValueError(f"--select {spec!r}: expected keep-target=X (percent of the final target gain kept), sum or pareto")
    return {"name": f"keep-target={float(m.group(1)):g}", "kind": "keep", "keep": float(m.group(1)) / 100.0}


# Operating points. The paper reads the (target, general) plane: a point on a path is worth taking
# when it keeps most of the target gain T - T_base and wins back general ability G. The rules below
# pick one point per path; the overshoot test asks whether some alpha < 1 beats the final checkpoint.

def pareto_front(points: list[dict]) -> list[int]:
    """Indices of the points no other point beats on both target and general (ties kept once)."""
    def beats(j, i):
        q, p = points[j], points[i]
        return q["target"] >= p["target"] and q["general"] >= p["general"] and (
            q["target"] > p["target"] or q["general"] > p["general"] or j < i)
    return [i for i in range(len(points)) if not any(beats(j, i) for j in range(len(points)) if j != i)]


def select_point(points: list[dict], rule: dict, *, base: dict, final: dict) -> int | None:
    """Index of the operating point under `rule` (None if nothing qualifies; 'pareto' -> None).
    keep-target=X: max general among points with target - T_base >= X (T_final - T_base), ties: higher
    target; sum: max target + general, ties: higher general."""
    if not points or rule["kind"] == "pareto":
        return None
    if rule["kind"] == "sum":
        return max(range(len(points)), key=lambda i: (points[i]["target"] + points[i]["general"], points[i]["general"]))
    need = base["target"] + rule["keep"] * (final["target"] - base["target"])
    ok = [i for i, p in enumerate(points) if p["target"] >= need - 1e-9]
    return max(ok, key=lambda i: (points[i]["general"], points[i]["target"])) if ok else None


def overshoot_check(points: list[dict], *, base: dict, final: dict, general_margin: float = 5.0,
                    target_keep: float = 0.8) -> dict:
    """Does a point before the final checkpoint beat it on general by >= general_margin points while
    keeping >= target_keep of its target gain over the base? (note 13: the issue's numbers)"""
    gain = final["target"] - base["target"]
    need_t, need_g = base["target"] + target_keep * gain, final["general"] + general_margin
    cand = [p for p in points if p.get("kind") != "final" and (p.get("alpha") is None or p["alpha"] < 1.0)]
    hits = [p for p in cand if p["general"] >= need_g - 1e-9 and p["target"] >= need_t - 1e-9]
    best = max(cand, key=lambda p: p["general"]) if cand else None
    out = {"overshoot": bool(hits), "final_target_gain": gain, "target_needed": need_t, "general_needed": need_g,
           "criterion": f"general >= final + {general_margin:g} and target gain >= {100 * target_keep:g}% of the final gain",
           "witness": None, "best_general_point": None}
    if hits:
        w = max(hits, key=lambda p: (p["general"], p["target"]))
        out["witness"] = {"alpha": w.get("alpha"), "step": w.get("step"), "kind": w.get("kind"),
                          "target": w["target"], "general": w["general"],
                          "general_over_final": w["general"] - final["general"],
                          "target_gain_kept": (w["target"] - base["target"]) / gain if gain else None}
    if best is not None:
        out["best_general_point"] = {k: best.get(k) for k in ("alpha", "step", "target", "general")}
    if out.setdefault("vacuous", gain <= 0):
        out["note"] = (f"the final checkpoint has no target gain over the base ({gain:+.2f}); the 'keep 80% of "
                       "the gain' condition is vacuous, so the verdict says little")
    return out


# -----------------------------------------------------------------------------
# 2. Checkpoints: the final one and the training trajectory
# -----------------------------------------------------------------------------

def discover_run(path) -> tuple[Path, list[tuple[int, Path]]]:
    """(final checkpoint, [(step, dir)] of the trajectory up to it, by step). `path` is a run dir
    (global_step_<k>/ or TRL's checkpoint-<k>/ inside: peft_methods.run_checkpoints) or one
    checkpoint dir, whose numbered siblings of the same method up to its step form the trajectory."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--checkpoint {path}: no such directory")
    if pm.find_adapter_dir(path) is None:
        traj = [(s, d) for s, d in pm.run_checkpoints(path) if not d.name.startswith(".")]
        if not traj:
            raise FileNotFoundError(f"--checkpoint {path}: holds neither {pm.CONFIG_FILE} nor checkpoint dirs "
                                    f"(global_step_<k>/ or checkpoint-<k>/ with {pm.CONFIG_FILE})")
        return traj[-1][1], traj
    acfg = pm.read_adapter_config(path)
    m = pm.CHECKPOINT_DIR_RE.search(path.name)
    step = int(m.group(1)) if m else acfg.get("extra", {}).get("step")
    sibs = [] if step is None else [
        (s, d) for s, d in pm.run_checkpoints(path.parent) if s <= int(step) and d != path
        and not d.name.startswith(".") and pm.read_adapter_config(d)["method"] == acfg["method"]]
    return path, sorted(sibs + [(int(step or 0), path)])


def _subsample(traj: list, k: int) -> list:
    """At most k checkpoints, evenly spaced, always keeping the last."""
    if k <= 0 or len(traj) <= k:
        return traj
    idx = sorted({round(i * (len(traj) - 1) / (k - 1)) for i in range(k)}) if k > 1 else [len(traj) - 1]
    return [traj[i] for i in idx]


# -----------------------------------------------------------------------------
# 3. One base model, moved in place to any point of any path. A run's state is a dict:
#    model, tok, cfg/method/cls (the checkpoint's), W0 (Full FT: every parameter; PiSSA/MiLoRA: the
#    exact base weights their residual base W0 - s B0 A0 overwrote), W1 (Full FT's final parameters),
#    layers (the adapter wrappers), ft (their final tensors), dense (one plain nn.Linear per module),
#    mode ("wrapped": the wrappers are in the model; "dense": the Linears are), baked (dense mode
#    holding the current adapter point merged), reloaded (a training checkpoint overwrote the tensors).
# -----------------------------------------------------------------------------

# Why one model moved in place: a 7B model loads in minutes, a point is set in seconds. Every point is
# computed from the snapshots (W0, final tensors), never from the previous point, so the order in
# which points are visited cannot change a number. The dense path needs a plain nn.Linear holding
# W(alpha) (no adapter can express lerp(W0, W_ft, alpha) for OFT); the factor path keeps the wrappers.

def _own_tensors(layer: nn.Module) -> dict[str, torch.Tensor]:
    """A wrapper's own adapter parameters and persistent buffers (not base_layer's, not cached indices)."""
    out = dict(layer.named_parameters(recurse=False))
    out.update((k, v) for k, v in layer.named_buffers(recurse=False) if k not in layer._non_persistent_buffers_set)
    return out


def open_run(model: nn.Module, tokenizer, checkpoint, *, base_spec: str | None = None) -> dict:
    """Load one finetuned checkpoint ONCE into the plain base `model`; close_run gives the base back."""
    if pm.peft_state(model) is not None or pm.adapter_layers(model):
        raise ValueError("open_run needs a plain base model (it loads the checkpoint itself); close_run the previous run")
    cfg = pm.read_adapter_config(checkpoint)
    run = dict(model=model, tok=tokenizer, checkpoint=Path(checkpoint), cfg=cfg, method=cfg["method"],
               cls=layer_class(cfg["method"]), W0={}, W1={}, layers={}, ft={}, dense={}, s0={},
               base_spec=base_spec or cfg.get("base_model") or getattr(model.config, "name_or_path", ""),
               grad={n: p.requires_grad for n, p in model.named_parameters()}, training=model.training,
               mode="wrapped", baked=False, reloaded=False)
    if run["method"] == "full":
        run["W0"] = {n: p.detach().clone() for n, p in model.named_parameters()}
    elif run["cls"].original_weight is not pm.AdapterLinear.original_weight:     # residual-base methods
        run["W0"] = {n: model.get_submodule(n).weight.detach().clone() for n in cfg["modules"]}
    pm.load_adapter(model, checkpoint)       # wraps the modules (or writes Full FT weights) ONCE
    model.eval()
    if run["method"] == "full":
        run["W1"] = {n: p.detach().clone() for n, p in model.named_parameters()}
    else:
        run["layers"] = pm.adapter_layers(model)
        run["ft"] = {n: {k: v.detach().clone() for k, v in _own_tensors(l).items()} for n, l in run["layers"].items()}
    return run


def _W0(run: dict, name: str) -> torch.Tensor:
    """fp32 W0 of a module (the exact snapshot where one was taken)."""
    return run["W0"][name].float() if name in run["W0"] else run["layers"][name].original_weight()


def _alpha(name: str, alpha: float, layer_alphas: dict | None) -> float:
    """alpha, or the module's layer's alpha_l (modules outside the decoder layers stay at 1)."""
    return alpha if layer_alphas is None else layer_alphas.get(layer_index(name), 1.0)


def _show(run: dict, dense: bool) -> None:
    """Put every module's plain nn.Linear (dense) or its adapter wrapper into the model."""
    if (run["mode"] == "dense") != dense:
        for name, layer in run["layers"].items():
            if name not in run["dense"]:
                b = layer.base_layer
                run["dense"][name] = nn.utils.skip_init(nn.Linear, layer.in_features, layer.out_features,
                                                        bias=b.bias is not None, device=b.weight.device,
                                                        dtype=b.weight.dtype).requires_grad_(False)
            pm.set_submodule(run["model"], name, run["dense"][name] if dense else layer)
        run["mode"] = "dense" if dense else "wrapped"
    run["baked"] = False


@torch.no_grad()
def _final_tensors(run: dict) -> None:
    """The final adapter tensors back into the wrappers (after a training checkpoint also PiSSA's
    residual base, from the exact W0): every point is computed from the final checkpoint."""
    for name, layer in run["layers"].items():
        own = _own_tensors(layer)
        for k, v in run["ft"][name].items():
            own[k].copy_(v)
        if run["reloaded"] and name in run["W0"]:
            layer.after_load(run["W0"][name].float())      # W_res = W0 - s B0 A0 (peft_methods hook)
    run["reloaded"] = False


@torch.no_grad()
def _fill_dense(run: dict, alpha: float | None = None, layer_alphas: dict | None = None) -> None:
    """Each module's plain nn.Linear gets the wrapper's merged weight (alpha None: the current adapter
    point, merged) or lerp(W0, W_ft, alpha_l) (PEFT-Arena additive path; note 12: exact at both ends)."""
    _show(run, dense=True)
    for name, layer in run["layers"].items():
        lin = run["dense"][name]
        W = layer.merged_weight()                                               # (d_out, d_in) fp32
        if alpha is not None:
            W = lerp_exact(_W0(run, name), W, _alpha(name, alpha, layer_alphas))
        lin.weight.copy_(W.to(lin.weight.dtype))
        if lin.bias is not None:   # only IA3 changes a bias; lerp(b, b) = b for the others
            b = layer.merged_bias()
            b = b if alpha is None else lerp_exact(layer.base_layer.bias, b, _alpha(name, alpha, layer_alphas))
            lin.bias.copy_(b.to(lin.bias.dtype))


def set_factor(run: dict, alpha: float = 1.0, *, layer_alphas: dict | None = None, gen_map: str = "sqrt") -> None:
    """Factor-path point alpha (or per-layer alpha_l): the class's factor_point moves the adapter's tensors."""
    if not has_factor_path(run["method"]):
        raise ValueError(f"no factor path is defined for method {run['method']!r} (its class names no factor_tensors); use the dense path")
    _final_tensors(run)
    _show(run, dense=False)
    with torch.no_grad():
        for name, layer in run["layers"].items():
            new = run["cls"].factor_point(run["ft"][name], _alpha(name, alpha, layer_alphas),
                                          W0=layer.base_layer.weight, gen_map=gen_map)
            own = _own_tensors(layer)
            for k, v in new.items():
                own[k].copy_(v)


def set_dense(run: dict, alpha: float = 1.0, *, layer_alphas: dict | None = None) -> None:
    """Dense-path point: every touched tensor W(alpha) = lerp(W0, W_ft, alpha). alpha = 0: the base exactly."""
    if run["method"] != "full":
        _final_tensors(run)
        return _fill_dense(run, alpha, layer_alphas)
    with torch.no_grad():       # DEVIATION 9: every parameter moves (embeddings, norms, biases too)
        for n, p in run["model"].named_parameters():
            p.copy_(lerp_exact(run["W0"][n], run["W1"][n], _alpha(n, alpha, layer_alphas)).to(p.dtype))


def set_path(run: dict, path: str, alpha: float, *, gen_map: str = "sqrt") -> None:
    if path not in PATH_NAMES:
        raise ValueError(f"unknown path {path!r}; known: {PATH_NAMES}")
    set_factor(run, alpha, gen_map=gen_map) if path == "factor" else set_dense(run, alpha)


def set_final(run: dict) -> None:
    """alpha = 1: the final checkpoint exactly (its own adapter tensors in the wrappers)."""
    if run["method"] == "full":
        set_dense(run, 1.0)
    elif has_factor_path(run["method"]):
        set_factor(run, 1.0)
    else:                               # the wrappers with their own final tensors
        _final_tensors(run)
        _show(run, dense=False)


def bake(run: dict) -> None:
    """Serve the current adapter point as a merged dense model (note 14); the wrappers keep their
    tensors, so save_point can still write it as an adapter."""
    if run["method"] != "full" and run["mode"] == "wrapped":
        _fill_dense(run)
        run["baked"] = True


def set_checkpoint(run: dict, ckpt) -> None:
    """A training checkpoint of the same run, loaded in place (peft_methods.load_adapter)."""
    c, r = pm.read_adapter_config(ckpt), run["cfg"]
    if (c["method"], sorted(c["modules"]), c.get("hparams")) != (r["method"], sorted(r["modules"]), r.get("hparams")):
        raise ValueError(f"checkpoint {ckpt} ({c['method']}, {c.get('hparams')}) is not from the same run "
                         f"as {run['checkpoint']} ({run['method']}, {r.get('hparams')})")
    _show(run, dense=False)
    pm.load_adapter(run["model"], ckpt)
    run["model"].eval()
    for name, layer in run["layers"].items():     # rebuild the residual base from the exact W0 (no drift)
        if name in run["W0"]:
            layer.after_load(run["W0"][name].float())
    run["reloaded"] = True


def close_run(run: dict) -> nn.Module:
    """Put the exact base model back (same object, plain modules, original requires_grad)."""
    model = run["model"]
    with torch.no_grad():
        if run["method"] == "full":
            for n, p in model.named_parameters():
                p.copy_(run["W0"][n])
        for name, layer in run["layers"].items():
            if name in run["W0"]:
                layer.base_layer.weight.copy_(run["W0"][name])
            pm.set_submodule(model, name, layer.base_layer)
    pm.drop_peft_state(model)
    for n, p in model.named_parameters():
        p.requires_grad_(run["grad"].get(n, False))
    model.train(run["training"])
    run.update(layers={}, dense={}, ft={}, W0={}, W1={}, mode="closed")
    return model


# ---- rewinding ------------------------------------------------------------------------------

def strength_modules(run: dict) -> list[str]:
    """The modules whose strength makes up rho_l: wrapped modules, or Full FT's 2-D layer weights."""
    if run["method"] == "full":
        return [n for n, p in run["W1"].items() if p.dim() == 2 and layer_index(n) is not None]
    return [n for n in run["layers"] if layer_index(n) is not None]


# rho of one module. OFT (rewind_strength on OftLinear): ||Q||_F of its block-diagonal generator, the
# quantity that c scales; every other method: ||W(c) - W0||_F of its merged weight at factor point c.

@torch.no_grad()
def module_strength(run: dict, name: str, measure: str, c: float = 1.0, rewind_map: str = "linear") -> float:
    """Strength of one module with its final factors moved to factor-path point c (DEVIATION 4, note 8)."""
    cls = run["cls"]
    if measure not in RHO_MEASURES:
        raise ValueError(f"--rho must be one of {RHO_MEASURES}, not {measure!r}")
    if measure not in (cls.rho_measures if cls else ("dw",)):
        raise ValueError(f"--rho {measure} is defined for OFT only (method here: {run['method']}); use --rho dw")
    if run["method"] == "full":
        return c * float(torch.linalg.norm(run["W1"][name].float() - run["W0"][name].float()))
    layer = run["layers"][name]
    if not cls.has_factor_path():              # the dense path: ||W(c) - W0|| = c ||dW||
        return c * float(torch.linalg.norm(layer.merged_weight() - _W0(run, name)))
    new = cls.factor_point(run["ft"][name], c, W0=layer.base_layer.weight, gen_map=rewind_map)
    return layer.rewind_strength(new, measure, _W0(run, name))


def layer_rhos(run: dict, measure: str, factors: dict | None = None, rewind_map: str = "linear") -> dict[int, float]:
    """rho_l = mean over layer l's modules of the strength, at per-layer point c_l (default 1)."""
    _final_tensors(run)
    return mean_by_layer({n: module_strength(run, n, measure, _alpha(n, 1.0, factors), rewind_map)
                          for n in strength_modules(run)})


def rewind_point(run: dict, spec: dict, *, measure: str | None = None, first_k: int = SAFE_RHO_LAYERS,
                 rewind_map: str = "linear", factor_rule: str = "ratio", cap: bool = True, gen_map: str = "sqrt") -> dict:
    """Move the model to the rewound point of `spec` (parse_rewind) and return its description."""
    measure = measure or (run["cls"].rho_measures[0] if run["cls"] else "dw")    # DEVIATION 4 / note 8
    _final_tensors(run)
    layers = sorted(mean_by_layer({n: 0.0 for n in strength_modules(run)}))
    info: dict = {"name": spec["name"], "kind": spec["kind"], "measure": measure}
    if spec["kind"] == "uniform":      # DEVIATION 7: the factor-path point alpha = a (generator map for OFT)
        factors, use_map = {l: spec["value"] for l in layers}, gen_map
        info.update(map=gen_map, note=f"the factor-path point alpha = {spec['value']:g}")
    else:
        rho = layer_rhos(run, measure)
        tau, tinfo = rewind_target(rho, spec["kind"], first_k)
        info.update(tinfo, tau=tau, rho_before=rho, map=rewind_map, factor_rule=factor_rule, cap=cap)
        use_map = rewind_map
        if factor_rule not in ("ratio", "solve"):
            raise ValueError(f"--factor-rule must be 'ratio' or 'solve', not {factor_rule!r}")
        if factor_rule == "ratio":
            factors = rewind_factors(rho, tau, cap=cap)
        else:                          # DEVIATION 5: bisect c_l so that rho_l(c_l) = tau
            mods = strength_modules(run)
            factors = {l: solve_factor(lambda c, ns=[n for n in mods if layer_index(n) == l]: sum(
                module_strength(run, n, measure, c, rewind_map) for n in ns) / len(ns), tau, cap=cap) for l in layers}
        info["rho_after"] = layer_rhos(run, measure, factors, rewind_map)
    info["factors"] = factors
    if has_factor_path(run["method"]):
        set_factor(run, layer_alphas=factors, gen_map=use_map)
    else:
        set_dense(run, layer_alphas=factors)
    return info


# ---- diagnostics and saving ---------------------------------------------------------------------

def module_weights(run: dict):
    """Yield (name, W0 fp32, current W fp32) for every module the method changes (Linear weights)."""
    if run["method"] == "full":
        for n in strength_modules(run):
            yield n, run["W0"][n].float(), run["model"].get_parameter(n).detach().float()
        return
    for name, layer in run["layers"].items():
        W = run["dense"][name].weight.detach().float() if run["mode"] == "dense" else layer.merged_weight().detach()
        yield name, _W0(run, name), W


@torch.no_grad()
def sv_distortion(run: dict) -> float:
    """Mean over modules of the relative singular-value distortion of the current point vs W0."""
    vals = []
    for name, W0, W in module_weights(run):
        if name not in run["s0"]:                       # W0's singular values, once per module
            run["s0"][name] = torch.linalg.svdvals(W0)
        vals.append(singular_value_distortion(W0, W, run["s0"][name]))
    return sum(vals) / len(vals) if vals else 0.0


def save_point(run: dict, out_dir, *, extra: dict | None = None) -> tuple[Path, str]:
    """Write the current point as an ordinary checkpoint: an adapter dir (peft_methods.save_adapter:
    `--model BASE --adapter DIR`) for adapter points, a merged HF dir (`--model DIR`) for dense
    points and Full FT."""
    out_dir, model = Path(out_dir), run["model"]
    fmt = "adapter" if run["method"] != "full" and (run["mode"] == "wrapped" or run["baked"]) else "merged"
    if run["baked"]:
        _show(run, dense=False)          # the wrappers still hold this point's tensors
    tmp = out_dir.with_name(".tmp-" + out_dir.name)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    meta = {"rewind": extra or {}, "source_checkpoint": str(run["checkpoint"]), "base_model": run["base_spec"]}
    if fmt == "adapter":
        pm.save_adapter(model, tmp, base_model=run["base_spec"], extra=meta)
    else:    # the model's own tensors are the point; adapter bookkeeping is not saved
        model.save_pretrained(tmp, state_dict={k: v for k, v in model.state_dict().items()
                                               if not k.startswith(pm.VERA_SHARED_ATTR)})
        if run["tok"] is not None:
            run["tok"].save_pretrained(tmp)
        loading.atomic_write_json(tmp / "rewind_point.json", meta)
    loading.atomic_replace_dir(tmp, out_dir)
    return out_dir, fmt


# -----------------------------------------------------------------------------
# 4. Evaluators (note 10) and the generation cache
# -----------------------------------------------------------------------------

def make_toy_evaluator(*, domain: str = "math", n_per_family: int = 200, batch_size: int = 64,
                       seed: int = 0, families=None, cache_root=None, progress: bool = False):
    """evaluate_fn(model, tokenizer, *, base_general, tag) -> evaluate.evaluate_toy's result (percent)."""
    def evaluate_fn(model, tokenizer, *, base_general=None, tag=None):
        return evaluate.evaluate_toy(model, tokenizer, domain=domain, n_per_family=n_per_family,
                                     batch_size=batch_size, families=families, base_general=base_general, seed=seed,
                                     cache_dir=Path(cache_root) / tag if (cache_root and tag) else None, progress=progress)
    return evaluate_fn


def make_real_evaluator(cfg: dict, *, cache_root=None):
    """evaluate_fn for --eval real: the paper's benchmarks (evaluate.py's loaders, decoding and
    aggregates), items loaded once. With vLLM ONE engine (built on --base's folder) serves every
    point: each point's dense weights are pushed into it (evaluate.push_weights), nothing is written
    to disk; run_analysis releases it (evaluate.release_engine)."""
    names = [n for s in ([cfg["suite"]] if cfg.get("suite") else [cfg["domain"], "general"]) for n in evaluate.SUITES[s]]
    paths = evaluate._parse_paths(cfg.get("path"))
    items = {n: evaluate.load_benchmark(n, cfg["data_dir"] or "data", paths.get(n), allow_hub=cfg["allow_hub"],
                                        bbh_prompt_dir=cfg["bbh_prompt_dir"], limit=cfg["limit"])
             for n in names}      # bad data fails here, before any point is built
    backend = cfg["backend"] if cfg["backend"] != "auto" else ("vllm" if evaluate.vllm_available() else "hf")
    if backend == "vllm" and not evaluate.vllm_available():
        raise SystemExit("rewind.py: --backend vllm needs vllm installed and a CUDA GPU")
    mnt = cfg["max_new_tokens"] or -1
    max_new = {n: mnt if mnt > 0 else evaluate.BENCHMARKS[n]["decoding"]["max_new_tokens"] for n in names}

    def evaluate_fn(model, tokenizer, *, base_general=None, tag=None):
        t0, llm, bench = time.time(), None, {}
        if backend == "vllm":
            from transformers import AutoConfig
            path, _ = loading.resolve_spec(cfg["base"])
            hf = AutoConfig.from_pretrained(path)
            ctx = evaluate._vllm_context(names, items, tokenizer, cfg["base"], max_new,
                                         int(getattr(hf, "max_position_embeddings", 1 << 30)))
            llm = evaluate.get_engine(path, max_model_len=ctx, seed=cfg["seed"],
                                      gpu_memory_utilization=cfg["vllm_gpu_memory_utilization"])
            evaluate.push_weights(llm, pm.iter_merged_state(model), tied_embeddings=bool(getattr(hf, "tie_word_embeddings", False)))
            evaluate._ENGINE["weights"] = f"rewind:{tag}"
        for n in names:
            ov = {"max_new_tokens": max_new[n]}
            if evaluate.BENCHMARKS[n]["decoding"]["n"] > 1:   # -1: the paper's sampling settings
                ov.update(n=cfg["num_samples"] if (cfg["num_samples"] or -1) > 0 else None,
                          temperature=cfg["temperature"] if (cfg["temperature"] or -1) >= 0 else None)
            bench[n] = evaluate.run_benchmark(n, items[n], None if llm else model, tokenizer, model_name=str(cfg["base"]),
                                              batch_size=cfg["batch_size"], seed=cfg["seed"], backend=backend,
                                              cache_dir=Path(cache_root) / tag if (cache_root and tag) else None,
                                              vllm_llm=llm, overrides=ov, progress=cfg["progress"])
        res = {"target_score": None, "general_score": None,
               **evaluate.summarize_suite(bench, domain=cfg["domain"], base_general=base_general)}
        res.update(families={n: {"score": b["score"]} for n, b in bench.items()}, backend=backend,
                   seconds=round(time.time() - t0, 2))
        return res
    return evaluate_fn


def _score(res: dict | None) -> dict:
    if res is None:
        return {"target": None, "general": None}
    return {"target": res.get("target_score"), "general": res.get("general_score"), "forgetting": res.get("forgetting"),
            "families": {f: v.get("score") for f, v in (res.get("families") or {}).items()},
            "eval_seconds": res.get("seconds")}


# The generation cache (--out/generations) is keyed on what changes a point's generations beyond the
# checkpoint's files, so a rerun into the same --out with other settings scores afresh.
BASE_CACHE_FIELDS = ("base", "dtype", "device", "domain", "n_per_family", "seed", "families")
RUN_CACHE_FIELDS = BASE_CACHE_FIELDS + ("gen_map", "eval_form", "rho", "safe_layers", "rewind_map", "factor_rule", "no_cap")
REAL_CACHE_FIELDS = ("suite", "limit", "max_new_tokens", "num_samples", "temperature", "data_dir", "path", "backend")


def _key(cfg: dict, names, files=None) -> str:
    """sha1 of the fields' values (with --eval real also the real-suite settings) and of the
    checkpoint files' names, sizes and mtimes: 10 hex digits."""
    fields = [cfg.get(k) for k in tuple(names) + (REAL_CACHE_FIELDS if cfg.get("eval") == "real" else ())]
    h = hashlib.sha1(json.dumps(fields, default=str).encode())
    for f in sorted(Path(files).iterdir()) if files else ():
        if f.is_file():
            h.update(f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}".encode())
    return h.hexdigest()[:10]


def base_cache_key(cfg: dict) -> str:
    return _key(cfg, BASE_CACHE_FIELDS)


def run_cache_key(cfg: dict, final: Path) -> str:
    return _key(cfg, RUN_CACHE_FIELDS, final)


# -----------------------------------------------------------------------------
# 5. The analysis: one base model for every run
# -----------------------------------------------------------------------------

def run_analysis(cfg: dict, *, loader: Callable | None = None, evaluate_fn=None, log=print) -> dict:
    """Load the base ONCE, evaluate it, then analyse each --checkpoint run on that same object.
    cfg: CLI settings (missing keys take the CLI defaults); `loader(spec, dtype=, device=)`
    defaults to loading.load_model, `evaluate_fn` to the --eval evaluator."""
    cfg = {**DEFAULTS, **cfg}
    out = Path(cfg["out"]) if cfg["out"] else None
    model, tok = (loader or loading.load_model)(cfg["base"], dtype=cfg["dtype"], device=cfg["device"])
    model.eval()
    cache = out / "generations" if out else None
    if evaluate_fn is None and cfg["eval"] in (None, "toy"):
        evaluate_fn = make_toy_evaluator(domain=cfg["domain"], n_per_family=cfg["n_per_family"], batch_size=cfg["batch_size"],
                                         seed=cfg["seed"], families=cfg["families"], cache_root=cache, progress=cfg["progress"])
    elif evaluate_fn is None and cfg["eval"] == "real":
        evaluate_fn = make_real_evaluator(cfg, cache_root=cache)
    try:
        t0 = time.time()
        res0 = evaluate_fn(model, tok, base_general=None, tag=f"base-{base_cache_key(cfg)}") if evaluate_fn else None
        base = {"label": "base", "kind": "base", **_score(res0), "seconds": round(time.time() - t0, 2)}
        if res0 is not None:
            log(f"[rewind] base: target {base['target']:.2f} general {base['general']:.2f} ({base['seconds']:.1f} s)")
        runs = []
        for i, ck in enumerate(cfg["checkpoint"]):
            final, traj = discover_run(ck)
            traj = _subsample(traj, cfg["max_train_points"])
            run = open_run(model, tok, final, base_spec=cfg["base"])
            label = cfg["label"][i] if i < len(cfg["label"]) else _default_label(run["cfg"], [r["label"] for r in runs])
            if run["cfg"].get("base_model") and str(run["cfg"]["base_model"]) != str(cfg["base"]):
                log(f"[rewind] note: {final} was trained on base {run['cfg']['base_model']!r}; "
                    f"interpolating towards --base {cfg['base']!r}")
            try:
                runs.append(analyse_run(run, evaluate_fn, cfg, label=label, traj=traj, base_point=base,
                                        key=run_cache_key(cfg, final), log=log))
            finally:
                close_run(run)
        results = {"base": base, "runs": runs, "model_id": id(model)}
        if out is not None:
            write_outputs(results, cfg, out, log=log)
        return results
    finally:
        if cfg["eval"] == "real":
            evaluate.release_engine()     # the one engine that scored every point


def analyse_run(run: dict, evaluate_fn, cfg: dict, *, label: str, traj: list, base_point: dict,
                key: str = "", log=print) -> dict:
    """Evaluate the training path, every path's grid and every rewind of one run; select; report."""
    method, gen_map, grid, paths = run["method"], cfg["gen_map"], parse_grid(cfg["grid"]), default_paths(run["method"])
    save = Path(cfg["out"]) if cfg["out"] and cfg["save"] != "none" else None
    log(f"[rewind] {label}: method {method}, final {run['checkpoint']} (step {traj[-1][0] if traj else '?'}), "
        f"{max(len(traj) - 1, 0)} training checkpoints, paths {paths}, grid {grid}")
    # the base point is shared by every path; note 11: it is also step 0 of the training path
    points = [dict(base_point, label=label, method=method, kind="base", path=None, alpha=0.0, step=0)]
    if cfg["sv_distortion"]:
        points[0]["sv_distortion"] = 0.0

    def point(kind: str, tag: str, **where) -> dict:
        t0 = time.time()
        if cfg["eval_form"] == "merged":
            bake(run)          # note 14: adapter points are scored as merged dense models
        res = evaluate_fn(run["model"], run["tok"], base_general=base_point.get("general"),
                          tag=f"{label}-{key}/{tag}") if evaluate_fn else None
        p = {"label": label, "method": method, "kind": kind, "path": None, "alpha": None, "step": None,
             "rewind": None, **where, **_score(res)}
        if cfg["sv_distortion"]:
            p["sv_distortion"] = sv_distortion(run)
        p["seconds"] = round(time.time() - t0, 2)
        if p["target"] is not None and base_point.get("target") is not None:
            p["target_gain"] = p["target"] - base_point["target"]
        points.append(p)
        scores = " ".join("-" if p[k] is None else f"{k} {p[k]:.2f}" for k in ("target", "general"))
        log(f"[rewind] {label} {tag}: {scores}" + (f" sv-dist {p['sv_distortion']:.2e}" if cfg["sv_distortion"] else "")
            + f" ({p['seconds']:.1f} s)")
        return p

    for step, ckpt in traj[:-1]:       # the training path; its last checkpoint is the alpha = 1 point
        set_checkpoint(run, ckpt)
        point("training", f"train_step{step}", step=step)
    set_final(run)
    final = point("final", "final", alpha=1.0, step=traj[-1][0] if traj else None)
    for path in paths:                 # note 2: alpha = 0 and 1 are the base and final points
        for a in [a for a in grid if a not in (0.0, 1.0)]:
            set_path(run, path, a, gen_map=gen_map)
            p = point("path", f"{path}_a{a:g}", path=path, alpha=a)
            if save and cfg["save"] == "all":
                _save(run, p, save, label, f"{path}_a{a:g}", {"path": path, "alpha": a, "gen_map": gen_map})
    infos = []
    for spec in [parse_rewind(s) for s in cfg["rewind"]]:
        info = rewind_point(run, spec, gen_map=gen_map, measure=cfg["rho"], first_k=cfg["safe_layers"],
                            rewind_map=cfg["rewind_map"], factor_rule=cfg["factor_rule"], cap=not cfg["no_cap"])
        log(f"[rewind] {label} {spec['name']}: " + (info["note"] + "; " if info.get("note") else "")
            + "factors " + ", ".join(f"L{l}={c:.3f}" for l, c in sorted(info["factors"].items())))
        p = point("rewind", f"rewind_{spec['name']}", rewind=spec["name"])
        infos.append(_jsonable(info))
        p["rewind_info"] = infos[-1]
        if save:
            _save(run, p, save, label, f"rewind_{spec['name'].replace('=', '')}", {"rewind": infos[-1]})
    result = {"label": label, "method": method, "hparams": run["cfg"].get("hparams"), "checkpoint": str(run["checkpoint"]),
              "final_step": final["step"], "paths": paths, "gen_map": gen_map, "points": points, "rewinds": infos}
    if all(p["target"] is not None and p["general"] is not None for p in points):
        result.update(_select_and_check(run, result, final, cfg, save))
    set_final(run)
    return result


def _select_and_check(run, result, final, cfg, save) -> dict:
    """Per --select rule: the selected point on each path and over every candidate (the first rule's
    is saved as a checkpoint too); Pareto sets; the overshoot verdict per path and for training."""
    points, paths, base, label = result["points"], result["paths"], result["points"][0], result["label"]
    rules = [parse_rule(s) for s in cfg["select"] or ["keep-target=80"]]
    overshoot_opts = {"general_margin": cfg["overshoot_general"], "target_keep": cfg["overshoot_target_keep"] / 100}
    pools = {path: [p for p in points if p["kind"] in ("base", "final") or p.get("path") == path] for path in paths}
    pools["all"] = [p for p in points if p["kind"] in ("base", "final", "path", "rewind")]
    pools["training"] = [p for p in points if p["kind"] in ("base", "training", "final")]
    selection = {r["name"]: {k: (None if (i := select_point(pool, r, base=base, final=final)) is None else pool[i])
                             for k, pool in pools.items()} for r in rules}
    keys = ("kind", "path", "alpha", "step", "rewind", "target", "general")
    pareto = {k: [{f: pool[i].get(f) for f in keys} for i in pareto_front(pool)] for k, pool in pools.items()}
    over = {path: overshoot_check(pools[path], base=base, final=final, **overshoot_opts) for path in paths}
    # the training path's own version: did an earlier checkpoint already do better?
    tr = [dict(p, alpha=None) for p in pools["training"] if p["kind"] == "training"]
    over["training"] = overshoot_check(tr, base=base, final=final, **overshoot_opts)
    sel = selection[rules[0]["name"]]["all"]
    if sel is not None and save and sel["kind"] == "path":
        set_path(run, sel["path"], sel["alpha"], gen_map=cfg["gen_map"])
        _save(run, sel, save, label, f"selected_{sel['path']}_a{sel['alpha']:g}",
              {"path": sel["path"], "alpha": sel["alpha"], "rule": rules[0]["name"]})
    return {"selection": selection, "pareto": pareto, "overshoot": over}


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj.tolist() if isinstance(obj, torch.Tensor) else obj


def _save(run, point, out, label, name, extra):
    d, used = save_point(run, Path(out) / "points" / label / name, extra=dict(extra, label=label))
    point["saved"], point["saved_format"] = str(d), used


def _default_label(acfg: dict, taken: list[str]) -> str:
    """'lora-r8', 'oft-b16', 'full', ...; '-2', '-3' appended when several runs share a label."""
    hp, m = acfg.get("hparams") or {}, acfg["method"]
    label = f"oft-b{hp.get('block_size')}" if m == "oft" else (f"{m}-r{hp['r']}" if "r" in hp else m)
    k, out = 2, label
    while out in taken:
        out, k = f"{label}-{k}", k + 1
    return out


# -----------------------------------------------------------------------------
# 6. Outputs: results.json / results.csv / summary.md / tradeoff.png
# -----------------------------------------------------------------------------

CSV_FIELDS = ["label", "method", "kind", "path", "alpha", "step", "rewind", "target", "general", "forgetting",
              "target_gain", "sv_distortion", "seconds", "saved"]


def _where(p: dict) -> str:
    return (f"a={p['alpha']:g}" if p.get("alpha") is not None else f"step {p.get('step')}") if p else "-"


def write_outputs(results: dict, cfg: dict, out: Path, log=print) -> None:
    res = {k: v for k, v in results.items() if k != "model_id"}
    loading.atomic_write_json(out / "results.json", _jsonable(res))
    loading.atomic_write_csv(out / "results.csv", CSV_FIELDS, [p for r in res["runs"] for p in r["points"]])
    if res["runs"] and all(p.get("target") is not None for r in res["runs"] for p in r["points"]):
        plot_tradeoff(res, out / "tradeoff.png")
    if res["runs"] and all(r.get("overshoot") for r in res["runs"]):
        loading.atomic_write_text(out / "summary.md", summary_markdown(res, cfg))
    for r in res["runs"]:
        for path, o in (r.get("overshoot") or {}).items():
            w = o["witness"]
            log(f"[rewind] {r['label']} overshoot on {path} path: " + (
                f"YES at {_where(w)} (general +{w['general_over_final']:.2f}, target gain kept "
                f"{100 * w['target_gain_kept']:.0f}%)" if w and w.get("target_gain_kept") is not None
                else "YES" if o["overshoot"] else "no") + (" (vacuous: no target gain)" if o.get("vacuous") else ""))
    log(f"[rewind] wrote {out / 'results.json'} and results.csv (summary.md, tradeoff.png when scored)")


def summary_markdown(res: dict, cfg: dict) -> str:
    """A short Markdown report: base, final, best-general point per path, rewinds, selected points, overshoot."""
    tg = lambda p: f"{p['target']:.2f} / {p['general']:.2f}"      # noqa: E731
    lines = ["# Interpolation and rewinding (PEFT-Arena, arXiv 2605.28819)", "",
             f"Command: `python {' '.join(str(a) for a in cfg.get('argv', []))}`", "",
             f"Target / General in %, toy domain `{cfg.get('domain')}`, {cfg.get('n_per_family')} items per family. "
             f"Overshoot = a point before the final checkpoint with general >= final + {cfg['overshoot_general']:g} "
             f"and >= {cfg['overshoot_target_keep']:g}% of the final target gain.", "",
             "| run | point | Target / General |", "|---|---|---|"]
    for r in res["runs"]:
        pts, lab = r["points"], r["label"]
        final = next(p for p in pts if p["kind"] == "final")
        lines += [f"| {lab} | base | {tg(pts[0])} |", f"| {lab} | final (step {final.get('step')}) | {tg(final)} |"]
        for path in r["paths"]:
            pp = sorted([p for p in pts if p.get("path") == path], key=lambda p: p["alpha"])
            if pp:
                best = max(pp, key=lambda p: p["general"])
                lines.append(f"| {lab} | {path_label(r['method'], path, r['gen_map'])}: best general at a={best['alpha']:g} | {tg(best)} |")
        lines += [f"| {lab} | rewind {p['rewind']} | {tg(p)} |" for p in pts if p["kind"] == "rewind"]
        for rule, sel in r["selection"].items():
            if (p := sel.get("all")) is not None:
                where = (f"{p['path']} a={p['alpha']:g}" if p["kind"] == "path" else
                         f"rewind {p['rewind']}" if p["kind"] == "rewind" else p["kind"])
                lines.append(f"| {lab} | selected ({rule}): {where} | {tg(p)} |")
    lines += ["", "| run | path | overshoot | witness (Target / General) |", "|---|---|---|---|"]
    for r in res["runs"]:
        for path, o in r["overshoot"].items():
            w = o.get("witness")
            lines.append(f"| {r['label']} | {path} | {'yes' if o['overshoot'] else 'no'}"
                         f"{' (vacuous: no target gain)' if o.get('vacuous') else ''} | "
                         f"{f'{_where(w)}: ' + tg(w) if w else '-'} |")
    return "\n".join(lines) + "\n"


TRADEOFF_COLS = 3       # runs per row of tradeoff.png: 3 x 4.4 in stays under 14 in at README width
MIN_SCORE_SPAN = 5.0    # score points: the narrowest axis window, so a 0.2-point band is drawn as 0.2 points


def _score_limits(values: list[float], min_span: float = MIN_SCORE_SPAN) -> tuple[float, float]:
    """Axis limits for a percentage score: the data plus a 5% margin, never narrower than min_span
    points, and slid back towards [0, 100] when widening pushed the window past an end (no axis
    shows a score of 103%; the margin may still pass 0 or 100 so a point on the edge is drawn whole)."""
    lo, hi = min(values), max(values)
    half = max(hi - lo, min_span) / 2 * 1.1
    margin = half - max(hi - lo, min_span) / 2
    mid = min(max((lo + hi) / 2, half - margin), 100 + margin - half)
    return mid - half, mid + half


def _tradeoff_panel(ax, r: dict) -> None:
    """One run in the (target, general) plane: training path (dashed), every interpolation path (solid,
    labelled by alpha), rewinds, base, final checkpoint, the first rule's selected point."""
    pts = r["points"]
    base, final = pts[0], next(p for p in pts if p["kind"] == "final")
    xy = lambda ps: ([p["target"] for p in ps], [p["general"] for p in ps])    # noqa: E731
    tr = [base] + sorted([p for p in pts if p["kind"] == "training"], key=lambda p: p["step"]) + [final]
    ax.plot(*xy(tr), "--", color="0.45", marker=".", label="training path (SFT checkpoints)")
    # on a shared axis two paths can run close together: the second path's alphas go below its points
    for path, (color, marker, dy) in zip(r["paths"], (("tab:blue", "o", 3), ("tab:orange", "s", -10))):
        pp = [base] + sorted([p for p in pts if p.get("path") == path], key=lambda p: p["alpha"]) + [final]
        ax.plot(*xy(pp), "-", color=color, marker=marker, ms=5, label=path_label(r["method"], path, r["gen_map"]))
        for p in pp[1:-1]:
            ax.annotate(f"{p['alpha']:g}", (p["target"], p["general"]), xytext=(4, dy), textcoords="offset points",
                        fontsize=8, color=color)
    for k, p in enumerate([p for p in pts if p["kind"] == "rewind"]):
        ax.scatter(*xy([p]), marker="^v<>DPX"[k % 7], s=80, color=f"C{4 + k}", edgecolor="k", label=f"rewind: {p['rewind']}")
    ax.scatter(*xy([base]), marker="s", s=70, color="k", label="base (a=0)")
    ax.scatter(*xy([final]), marker="*", s=220, color="tab:red", edgecolor="k", label=f"final (step {final.get('step')})")
    sel = next(iter((r.get("selection") or {}).values()), {}).get("all")
    if sel is not None:
        ax.scatter(*xy([sel]), s=380, facecolors="none", edgecolors="tab:green", linewidths=2.2, label="selected")
    ax.set_title(f"{r['label']} ({r['method']})", fontsize=11)
    ax.grid(alpha=0.3)
    # the key goes under the panel: inside, it would hide points wherever the shared window puts them
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2, frameon=False, markerscale=0.7)


def plot_tradeoff(results: dict, png: Path) -> None:
    """One panel per run (TRADEOFF_COLS to a row) in the (target, general) plane. Every panel shares both
    axes, fitted to all runs together and never narrower than MIN_SCORE_SPAN points, so runs compare by
    eye and a band of a few tenths of a point does not fill a panel as if it were a cliff."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    runs = results["runs"]
    cols = min(TRADEOFF_COLS, len(runs))
    rows = -(-len(runs) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.4 * cols + 0.4, 5.9 * rows + 0.3), squeeze=False,
                             sharex=True, sharey=True)
    for ax, r in zip(axes.flat, runs):
        _tradeoff_panel(ax, r)
        ax.tick_params(labelbottom=True)        # each panel has its own key below, so its own x labels
        ax.set_xlabel("target score (%)")
    for ax in axes.flat[len(runs):]:
        ax.set_visible(False)
    for ax in axes[:, 0]:
        ax.set_ylabel("general score (%)")
    every = [p for r in runs for p in r["points"]]
    axes[0, 0].set_xlim(*_score_limits([p["target"] for p in every]))      # shared: sets every panel
    axes[0, 0].set_ylim(*_score_limits([p["general"] for p in every]))
    fig.suptitle(f"Target vs general score per run\n(shared axes, each at least {MIN_SCORE_SPAN:g} points wide)",
                 fontsize=12)
    fig.tight_layout()
    tmp = png.with_name(".tmp-" + png.name)
    fig.savefig(tmp, dpi=130, format="png")
    plt.close(fig)
    tmp.replace(png)


# -----------------------------------------------------------------------------
# 7. CLI: one table row per flag (flag, default, help, extra argparse keywords)
# -----------------------------------------------------------------------------

FLAGS = {
    "models": [
        ("--base", "toy", "base model: 'toy', a local HF dir or a hub id (loaded once)", {}),
        ("--checkpoint", [], "a run dir (global_step_<k>/, checkpoint-<k>/) or one checkpoint dir; repeatable", {}),
        ("--label", [], "display label per --checkpoint (default from the method)", {}),
        ("--dtype", None, "float32 | bfloat16 (default: bf16 on CUDA, fp32 on CPU)", {}),
        ("--device", None, "cpu | cuda (default: cuda when available)", {})],
    "paths": [
        ("--grid", "0:1:0.1", "alpha grid START:STOP:STEP (stop included) or a comma list", {}),
        ("--generator-map", "sqrt", "OFT Q(a) = sqrt(a) Q (DEVIATION 1) or a Q", dict(dest="gen_map", choices=["sqrt", "linear"])),
        ("--max-train-points", 0, "at most this many training checkpoints (evenly spaced, final kept); 0 = all", {})],
    "layer-wise rewinding": [
        ("--rewind", [], "saferho | minrho | uniform=A (repeatable)", {}),
        ("--rho", None, "module strength (DEVIATION 4); default: the method's first", dict(choices=list(RHO_MEASURES))),
        ("--safe-layers", SAFE_RHO_LAYERS, "SafeRho: average over the first K layers", {}),
        ("--rewind-map", "linear", "apply c_l as c_l Q or sqrt(c_l) Q (DEVIATION 5)", dict(choices=["linear", "sqrt"])),
        ("--factor-rule", "ratio", "c_l = tau/rho_l, or solve rho_l(c_l) = tau (DEVIATION 5)", dict(choices=["ratio", "solve"])),
        ("--no-cap", False, "allow c_l > 1 (strengthen weak layers)", {})],
    "evaluation": [
        ("--eval", None, "real = the paper's suites; toy = evaluate_toy (toy base only); none = only build/save "
         "points. Default: toy for --base toy, real otherwise (note 10)", dict(choices=["toy", "real", "none"])),
        ("--domain", "math", "target domain", dict(choices=["math", "med"])),
        ("--suite", None, "--eval real: one suite (default: the domain's + general)", dict(choices=["math", "med", "general", "all"])),
        ("--data-dir", "data", "--eval real: root of the benchmark files (evaluate.py)", {}),
        ("--path", [], "--eval real: NAME=FILE per benchmark", {}),
        ("--bbh-prompt-dir", None, "--eval real: directory of BBH <task>.txt CoT prompts", {}),
        ("--allow-hub", False, "--eval real: try the hub ids when no local file is found", {}),
        ("--limit", None, "--eval real: items per benchmark (default all)", dict(type=int)),
        ("--max-new-tokens", -1, "--eval real: tokens; -1 = each benchmark's paper value", {}),
        ("--num-samples", -1, "--eval real: samples per math prompt; -1 = 16 (paper)", {}),
        ("--temperature", -1.0, "--eval real: math temperature; -1 = 0.6 (paper)", {}),
        ("--backend", "auto", "--eval real: auto = vLLM when it imports and CUDA is present", dict(choices=["auto", "hf", "vllm"])),
        ("--vllm-gpu-memory-utilization", 0.5, "--eval real with vLLM: the engine's share of the GPU", {}),
        ("--n-per-family", 200, "toy test items per family (5 families)", {}),
        ("--families", None, "toy families (default all five)", dict(nargs="*")),
        ("--batch-size", 64, "prompts per generate() call", {}),
        ("--seed", 0, "toy item / generation seed", {}),
        ("--eval-form", "merged", "score adapter points merged (note 14) or through the adapter", dict(choices=["merged", "adapter"])),
        ("--sv-distortion", False, "also record the singular-value distortion vs W0 at every point", {})],
    "operating point, overshoot and output": [
        ("--select", [], "keep-target=X | sum | pareto; repeatable, the first is plotted (default keep-target=80)", {}),
        ("--overshoot-general", 5.0, "points of general above the final checkpoint (note 13)", {}),
        ("--overshoot-target-keep", 80.0, "percent of the final target gain kept (note 13)", {}),
        ("--out", None, "output dir", {}),
        ("--save", "selected", "checkpoints: rewinds + selected point, or every grid point", dict(choices=["none", "selected", "all"])),
        ("--threads", None, "torch CPU threads", dict(type=int)),
        ("--progress", False, "generation progress bars", {}),
        ("--smoke", False, "random tiny model + synthetic 2-checkpoint LoRA run, 3-point grid (< 1 min, CPU)", {})],
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Interpolation paths, layer-wise rewinding and the overshoot (PEFT-Arena)",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for group, rows in FLAGS.items():
        g = p.add_argument_group(group)
        for flag, default, help_, kw in rows:
            kind = ({"action": "append"} if isinstance(default, list) else {"action": "store_true"} if default is False
                    else {"type": type(default)} if isinstance(default, (int, float)) else {})
            g.add_argument(flag, default=default, help=help_, **{**kind, **kw})
    return p


DEFAULTS = vars(build_parser().parse_args([]))


def make_smoke_run(root: Path, method: str = "lora", seed: int = 0) -> tuple[str, Path]:
    """A random tiny base model dir and a fake 2-checkpoint SFT run of `method` (for --smoke / tests)."""
    base_dir, run_dir = Path(root) / "smoke_base", Path(root) / "smoke_run"
    model, tok = toy_world.build_random_toy_model(seed=seed)
    if not (base_dir / "config.json").exists():
        model.save_pretrained(base_dir)
        tok.save_pretrained(base_dir)
    pm.apply_peft(model, method, **({"block_size": 16} if method == "oft" else {}))
    g = torch.Generator().manual_seed(seed + 1)
    for step in (1, 2):
        with torch.no_grad():
            for layer in pm.adapter_layers(model).values():
                for k, t in _own_tensors(layer).items():
                    if k in ("lora_B", "oft_q", "miss_D"):
                        t.copy_(0.02 * step * torch.randn(t.shape, generator=g))
        d = run_dir / f"global_step_{step}"
        pm.save_adapter(model, d, base_model=str(base_dir), extra={"step": step})
        loading.atomic_write_json(d / "trainer_state.json", {"step": step})
    return str(base_dir), run_dir


def main(argv=None) -> dict:
    a = build_parser().parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    a.eval = a.eval or ("toy" if (a.base == "toy" or a.smoke) else "real")
    if not a.out:
        raise SystemExit("rewind.py: --out DIR is required")
    if a.eval == "toy" and a.base != "toy" and not a.smoke:
        raise SystemExit(f"rewind.py: --eval toy scores the toy world's items, but --base {a.base!r} is a real model: "
                         "use --eval real (the paper's benchmarks, e.g. --suite math --data-dir data) or --eval none --save all")
    if a.smoke:       # a random tiny base and a synthetic 2-checkpoint LoRA run under --out, a 3-point grid
        if a.eval == "real":
            raise SystemExit("rewind.py: --smoke builds a toy run; use --eval toy or none with it")
        a.base, run_dir = make_smoke_run(Path(a.out))
        a.checkpoint, a.grid = [str(run_dir)], "0,0.5,1" if a.grid == "0:1:0.1" else a.grid
        a.n_per_family, a.rewind, a.sv_distortion = min(a.n_per_family, 1), a.rewind or ["minrho", "uniform=0.4"], True
    if not a.checkpoint:
        raise SystemExit("rewind.py: at least one --checkpoint DIR is required (or --smoke)")
    if min(a.n_per_family, a.batch_size, a.safe_layers) <= 0 or a.max_train_points < 0:
        raise SystemExit("rewind.py: --n-per-family, --batch-size and --safe-layers must be > 0, --max-train-points >= 0")
    try:
        parse_grid(a.grid), [parse_rewind(s) for s in a.rewind], [parse_rule(s) for s in a.select]
    except ValueError as err:
        raise SystemExit(f"rewind.py: {err}")
    # the command as a user would type it (also when called in-process, e.g. by arena.py demo)
    cfg = dict(vars(a), argv=["rewind.py"] + (sys.argv[1:] if argv is None else list(argv)),
               device_resolved=str(loading.pick_device(a.device)))
    loading.write_run_config(Path(a.out), cfg)
    print(f"[rewind] config: {json.dumps({k: v for k, v in cfg.items() if k != 'argv'}, default=str)}")
    return run_analysis(cfg)


if __name__ == "__main__":
    loading.run_cli("rewind.py", main, one_line=(ValueError, FileNotFoundError))
