"""rewind.py: the overshoot, interpolation paths and path-wise rewinding of finetuned checkpoints.

Implements PEFT-Arena's interpolation and path-wise rewinding (Huang et al., arXiv 2605.28819: the
overshoot claim, the poster's rewinding rows for Qwen2.5-7B SFT OFT b32, the project page
`PA: docs/index.html` and figures `PA: docs/static/images/{train-vs-interp,teaser-1}.png`). The
official release ships no interpolation, rewinding or iOFT code, so this file is the project's
reference version. Every choice the paper leaves open is picked below, listed
under Deviations, and exposed as an option.

What it does, for each SFT run given with --checkpoint (train_sft.py's `global_step_<k>/` dirs, or
HF PEFT adapters: TRL's `checkpoint-<k>/`, the release's `global_step_<k>/`):
  * walks the **interpolation paths** from the base model (alpha = 0) to the final checkpoint
    (alpha = 1) on an alpha grid, and the **training path** through every saved checkpoint;
  * evaluates both axes (target, general) at every point with `evaluate.evaluate_toy`, on ONE loaded
    base model whose weights are swapped in place per point (no reload per point);
  * applies **layer-wise rewinding** (SafeRho, MinRho, uniform) as single extra points;
  * picks an **operating point** (max general keeping X% of the final target gain; max
    target + general; the Pareto set) and reports whether the **overshoot** appears;
  * plots the paths in the (target, general) plane, and saves rewound models as ordinary
    checkpoints (adapter dirs for `--adapter`, merged HF dirs for `--model`) that evaluate.py and
    geometry.py accept.

Paths (PEFT-Arena rewinding; W (d_out, d_in) = nn.Linear.weight, W0 base, W_ft final, dW = W_ft - W0):
  dense   W(alpha) = W0 + alpha * dW on the merged weights; every method. For OFT this is the
          "dense-delta" baseline that leaves the orthogonal manifold.
  factor  the parameterisation-aware path, in the adapter's own tensors (each method's class says
          how: AdapterLinear.factor_point in peft_methods.py; a method that says nothing has the
          dense path only):
            LoRA / KeepLoRA  B <- alpha B           AdaLoRA E <- alpha E     VeRA lambda_b <- alpha lambda_b
            MiSS             D <- alpha D           IA3     l <- 1 + alpha (l - 1)
            DoRA             B <- alpha B, m <- lerp(||W0||_row, m, alpha)   (NOT additive: the norm)
            PiSSA / MiLoRA   A, B <- lerp from the initial (A0, B0)          (NOT additive: alpha^2 term)
            OFT (= iOFT)     Q <- sqrt(alpha) Q for every block generator, R = Cayley(-Neumann)(Q),
                             W = W0 blockdiag(R)^T: W stays orthogonally related to W0, so the
                             singular values of W0 are kept for every alpha (exactly with the exact
                             Cayley transform, to O(||Q||^T) with the T-term Neumann series).
          For LoRA, KeepLoRA, AdaLoRA, VeRA, IA3 and MiSS dW is linear in the scaled tensor, so the
          factor path IS the dense path (tests/test_rewind.py shows both give the same model).
  training  base (step 0) -> global_step_k -> ... -> final.

Layer-wise rewinding (PEFT-Arena poster "SafeRho/SafeScale, MinRho/MinScale"):
  rho_l = mean over layer l's OFT modules of ||Q||_F (default; or ||R - I||_F, or ||dW||_F);
  tau   = mean of rho_l over the first five layers (SafeRho) or min_l rho_l (MinRho);
  c_l   = min(1, tau / rho_l), applied as Q_l <- c_l Q_l (or sqrt(c_l) Q_l with --rewind-map sqrt).
  `--rewind uniform=0.4` is the generator-path point alpha = 0.4 (the paper's "uniform scale 0.4").

Run:
    python rewind.py --base toy --checkpoint runs/sft-lora-r8 --grid 0:1:0.1 --out runs/rewind-lora-r8
    python rewind.py --base toy --checkpoint runs/sft-oft-b16 --rewind saferho --rewind minrho \
        --rewind uniform=0.4 --out runs/rewind-oft-b16 --n-per-family 100
    python rewind.py --base toy --checkpoint runs/sft-full --checkpoint runs/sft-lora-r8 \
        --checkpoint runs/sft-oft-b16 --rewind saferho --out runs/rewind-toy-math   # one figure, 3 methods
    python rewind.py --base /models/Qwen2.5-7B --checkpoint runs/qwen-oft-b32 --eval none --save all \
        --out runs/rewind-qwen       # writes every point as a checkpoint for `evaluate.py` (vLLM)
    python rewind.py --base /models/Qwen2.5-7B --checkpoint runs/qwen-oft-b32 --eval real \
        --domain math --data-dir data --rewind saferho --out runs/rewind-qwen   # scores every point
        # on math + general (one vLLM engine reused across points; --limit N for a quick look)
    python rewind.py --smoke --out /tmp/rewind-smoke          # random tiny model, < 1 min on CPU
    python -m pytest tests/test_rewind.py -q

Outputs in --out: config.json (resolved), results.json (every point, rho tables, selections,
overshoot verdicts), results.csv (one row per evaluated point), summary.md (the table for the README),
tradeoff.png, points/<label>/<name>/ (saved rewound checkpoints: `evaluate.py --model BASE --adapter
DIR` or `--model DIR`), generations/ (evaluation cache: a killed run resumes without regenerating).

Shape legend: d_in / d_out of a wrapped Linear; W (d_out, d_in); b OFT block size, n = d_in / b
blocks; q (n, b(b-1)/2) the OFT generator (strict upper triangles of the skew blocks Q (n, b, b));
R (n, b, b) the rotation blocks; L the number of decoder layers.

Deviations that change a number the paper reports (each also marked `DEVIATION n` at the line):
 1. Generator map: Q(alpha) = sqrt(alpha) Q by default (the one web caption the paper gives);
    `--generator-map linear` uses alpha Q.
 3. PiSSA / MiLoRA "scaling the adapter" has no linear form (dW = s(BA - B0A0)); the factor path
    interpolates both factors from their initial values and differs from the additive path by
    (alpha^2 - alpha) s (B - B0)(A - A0). DoRA's factor path scales B and interpolates the magnitude
    from ||W0||_row; it differs from the additive path because of the row norm.
 4. Layer strength rho_l: default mean over the layer's modules of ||Q||_F (Q over all blocks of a
    module, so it is the quantity the rewinding scales and MinRho equalises it exactly); options
    `--rho r_minus_i` (||R - I||_F) and `--rho dw` (||dW||_F). The paper does not specify rho.
 5. Factors c_l = tau / rho_l capped at 1 (`--no-cap` lifts the cap), applied linearly to Q
    (`--rewind-map sqrt` applies sqrt(c_l), the generator-path map); `--factor-rule solve` instead
    finds c_l by bisection so that rho_l after rewinding equals tau for any rho and map.
 7. `uniform=a` is the generator-path point alpha = a (through --generator-map), because the paper's
    "uniform scale 0.4" row (poster) equals the alpha = 0.4 point of its OFT curve.
 9. Full FT's dense path interpolates every parameter (embeddings, norms, biases included), not only
    the Linear weights: that is W0 + alpha (W_ft - W0) for the whole model.

Implementation notes (change no number the paper reports; numbered with the list above):
 2. Shared endpoints: alpha = 0 and alpha = 1 of every path are, by construction, the base model and
    the final checkpoint; each is evaluated once and shared by all paths (the tests prove every path
    reproduces them: exactly in fp32, PiSSA/MiLoRA's factor path to fp32 rounding because their
    residual base W0 - s B0 A0 is stored rounded).
 6. SafeRho averages the first min(5, L) layers; on the 4-layer toy model
    that is all 4 layers (the results and the log say so), which makes SafeRho the mean-rho target.
 8. Extension: rewinding is also defined for non-OFT methods (rho = ||dW||_F, factors applied along
    the factor path, or the dense path for Full FT); the paper rewinds OFT only.
10. Evaluation inside rewind.py: `--eval real` (the default for a real --base) scores the paper's
    benchmarks at every point with evaluate.py's loaders, decoding and aggregates, one vLLM engine
    reused across points (each point's dense weights pushed in); `--eval toy` (the default for the
    toy base, refused for a real one) is the toy suite (evaluate.evaluate_toy: greedy, one sample).
11. The training path starts at the base model as "step 0" (train_sft.py saves no step-0 checkpoint;
    for KeepLoRA, which is not the identity at init, step 0 is still the base model).
12. Interpolation is computed in fp32 with torch.lerp, which returns the start exactly at alpha = 0
    and the end exactly at alpha = 1 (W0 + 1 * (W_ft - W0) does not), then cast to the model dtype.
13. Overshoot test (numbers from issue #8; the paper's definition is qualitative): a point with
    alpha < 1 whose general score is >= 5 points above the final checkpoint's while keeping >= 80%
    of its target gain over the base.
14. Adapter points (factor path, training checkpoints, rewinds) are scored as merged dense weights
    (`--eval-form merged`, default), as the paper merges every adapter before evaluating; the same
    model up to fp32 rounding, and OFT generation does not rebuild R at every token.
    `--eval-form adapter` scores through the wrappers instead.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
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
CKPT_RE = re.compile(r"(?:global_step_|checkpoint-|step[_-]?)(\d+)$")


# -----------------------------------------------------------------------------
# 1. Pure math: grids, interpolation, the factor paths, rotation strength, rewinding factors
# -----------------------------------------------------------------------------

def parse_grid(spec: str) -> list[float]:
    """'0:1:0.1' -> [0.0, 0.1, ..., 1.0] (stop included); '0,0.3,1' -> [0.0, 0.3, 1.0].

    Values are rounded to 10 decimals so that 0.1 * 3 prints (and caches) as 0.3.
    """
    spec = str(spec).strip()
    form = "expected START:STOP:STEP (e.g. 0:1:0.1) or a comma list (e.g. 0,0.3,1)"
    try:
        parts = [float(x) for x in spec.split(":")] if ":" in spec else \
            [float(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--grid {spec!r}: {form}") from None
    if ":" in spec:
        if len(parts) != 3:
            raise ValueError(f"--grid {spec!r}: {form}")
        start, stop, step = parts
        if step <= 0 or stop < start:
            raise ValueError(f"--grid {spec!r}: need start <= stop and step > 0")
        n = round((stop - start) / step)
        if abs(start + n * step - stop) > 1e-9 * max(1.0, abs(stop)):
            raise ValueError(f"--grid {spec!r}: step {step} does not divide [{start}, {stop}] "
                             f"({(stop - start) / step:.4f} steps)")
        values = [round(start + i * step, 10) for i in range(n + 1)]
    else:
        values = [round(v, 10) for v in parts]
    if not values:
        raise ValueError(f"--grid {spec!r} gives no points")
    if min(values) < 0:
        raise ValueError(f"--grid {spec!r}: alpha must be >= 0 (got {min(values)}); sqrt(alpha) scales OFT generators")
    return sorted(set(values))


# the interpolation primitives live beside the adapter classes that use them (peft_methods)
lerp_exact = pm.lerp_exact
generator_coefficient = pm.generator_coefficient


def additive_point(W0: torch.Tensor, dW: torch.Tensor, alpha: float) -> torch.Tensor:
    """Plain reference of the additive path: [PEFT-Arena additive path] W(alpha) = W0 + alpha dW (fp32)."""
    return W0.float() + float(alpha) * dW.float()


def generator_coefficient(alpha: float, gen_map: str = "sqrt") -> float:
    """The factor s(alpha) applied to an OFT generator: Q(alpha) = s(alpha) Q.

    DEVIATION 1: sqrt (the paper's caption "Q_m(alpha) = sqrt(alpha) Q_m") by default; linear = alpha.
    """
    if gen_map == "sqrt":
        if alpha < 0:
            raise ValueError(f"generator map sqrt needs alpha >= 0, got {alpha}")
        return math.sqrt(alpha)
    if gen_map == "linear":
        return float(alpha)
    raise ValueError(f"generator map must be 'sqrt' or 'linear', not {gen_map!r}")


def layer_class(method: str) -> type | None:
    """The method's AdapterLinear subclass (None for Full FT): what rewinding needs to know about a
    method (its factor path, labels, strength measures) lives on it."""
    if method not in pm.METHODS:
        raise ValueError(f"unknown PEFT method '{method}'; known: {', '.join(pm.METHODS)}")
    return pm.METHODS[method].layer


def has_factor_path(method: str) -> bool:
    """True when the method's adapter tensors define a factor path (AdapterLinear.factor_point)."""
    cls = layer_class(method)
    return cls is not None and (bool(cls.factor_tensors) or
                                cls.factor_point.__func__ is not pm.AdapterLinear.factor_point.__func__)


def factor_point(method: str, tensors: dict[str, torch.Tensor], alpha: float, *,
                 W0: torch.Tensor | None = None, gen_map: str = "sqrt") -> dict[str, torch.Tensor]:
    """The adapter tensors of one module at point `alpha` of the factor path (PEFT-Arena Sec. 5).

    `tensors` are the module's FINAL tensors by their wrapper names. Returns only the tensors that
    change along the path: alpha = 0 gives the identity adapter (the base model), alpha = 1 the
    final tensors exactly. The formula is the method's own (`AdapterLinear.factor_point`).
    """
    if method == "full":
        raise ValueError("full fine-tuning has no adapter factors: its only path is the dense one (--paths dense)")
    new = layer_class(method).factor_point(tensors, alpha, W0=W0, gen_map=gen_map)
    if new is None:
        raise ValueError(f"no factor path is defined for method {method!r}; use --paths dense")
    return new


def oft_generator_path_weight(W0: torch.Tensor, q: torch.Tensor, alpha: float, b: int, *,
                              gen_map: str = "sqrt", use_cayley_neumann: bool = True,
                              num_terms: int = 5) -> torch.Tensor:
    """Plain reference of one module on the generator path: W(alpha) = W0 blockdiag(R(alpha))^T (fp32).

    q (rows, b(b-1)/2) with rows = n blocks (or 1 with block sharing); W0 (d_out, d_in).
    """
    qa = q.float() * generator_coefficient(alpha, gen_map)             # (rows, b(b-1)/2)
    R = pm.oft_rotation(qa, b, use_cayley_neumann=use_cayley_neumann, num_terms=num_terms)  # (rows, b, b)
    return pm.oft_merge_reference(W0.float(), R)                        # (d_out, d_in)


def singular_value_distortion(W0: torch.Tensor, W: torch.Tensor, s0: torch.Tensor | None = None) -> float:
    """||sigma(W) - sigma(W0)||_2 / ||sigma(W0)||_2: 0 when W is orthogonally related to W0."""
    s0 = torch.linalg.svdvals(W0.float()) if s0 is None else s0       # (k,) sorted
    s1 = torch.linalg.svdvals(W.float())
    return float(torch.linalg.norm(s1 - s0) / torch.linalg.norm(s0).clamp_min(1e-30))


def layer_index(name: str) -> int | None:
    """Decoder layer of a module/parameter name ('model.layers.3.mlp.down_proj' -> 3), else None."""
    m = re.search(r"(?:^|\.)layers\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def oft_module_strength(q: torch.Tensor, b: int, measure: str = "q", *, n_blocks: int | None = None,
                        use_cayley_neumann: bool = True, num_terms: int = 5) -> float:
    """Rotation strength of one OFT module from its generator q (rows, b(b-1)/2).

    measure "q":         ||Q||_F of the module's whole block-diagonal generator;
    measure "r_minus_i": ||R - I||_F of its block-diagonal rotation.
    With block sharing (rows = 1) the one block stands for all n_blocks blocks.
    """
    rows = q.shape[0]
    rep = (n_blocks or rows) / rows
    if measure == "q":
        Q = pm.skew_from_triu(q.float(), b)                             # (rows, b, b)
        sq = Q.pow(2).sum()
    elif measure == "r_minus_i":
        R = pm.oft_rotation(q.float(), b, use_cayley_neumann=use_cayley_neumann, num_terms=num_terms)
        sq = (R - torch.eye(b, dtype=R.dtype, device=R.device)).pow(2).sum()
    else:
        raise ValueError(f"oft rotation strength measure must be 'q' or 'r_minus_i', not {measure!r}")
    return math.sqrt(float(sq) * rep)


def mean_by_layer(module_values: dict[str, float]) -> dict[int, float]:
    """{module name: value} -> {layer: mean over that layer's modules} (modules outside layers dropped)."""
    acc: dict[int, list[float]] = {}
    for name, v in module_values.items():
        l = layer_index(name)
        if l is not None:
            acc.setdefault(l, []).append(float(v))
    return {l: sum(vs) / len(vs) for l, vs in sorted(acc.items())}


def rewind_target(rhos: dict[int, float], rule: str, first_k: int = SAFE_RHO_LAYERS) -> tuple[float, dict]:
    """tau for SafeRho (mean of the first `first_k` layers) or MinRho (min over layers) (PEFT-Arena poster)."""
    if not rhos:
        raise ValueError("rewinding needs at least one decoder layer with adapter modules")
    layers = sorted(rhos)
    if rule == "saferho":
        used = layers[:first_k]
        info = {"layers_used": used}
        if len(layers) < first_k:
            # DEVIATION 6: fewer layers than the paper's five: clip to what exists
            info["note"] = (f"SafeRho: the model has {len(layers)} adapter layers (< {first_k}); tau is the "
                            f"mean over all {len(layers)} of them")
        return sum(rhos[l] for l in used) / len(used), info
    if rule == "minrho":
        l_min = min(layers, key=lambda l: rhos[l])
        return rhos[l_min], {"layers_used": [l_min]}
    raise ValueError(f"rewind rule must be 'saferho' or 'minrho', not {rule!r}")


def rewind_factors(rhos: dict[int, float], tau: float, *, cap: bool = True) -> dict[int, float]:
    """c_l = tau / rho_l, capped at 1 (the poster leaves the cap open: Deviation 5); rho_l = 0 -> c_l = 1."""
    out = {}
    for l, rho in rhos.items():
        # DEVIATION 5: the cap at 1 is the paper's "probably"; --no-cap lifts it
        c = tau / rho if rho > 0 else 1.0
        out[l] = min(c, 1.0) if cap else c
    return out


def solve_factor(strength_at: Callable[[float], float], tau: float, *, cap: bool = True,
                 iters: int = 60) -> float:
    """c with strength_at(c) = tau by bisection (strength_at increasing, strength_at(0) = 0).

    With the cap, a layer already at or below tau keeps c = 1. Without it, c may exceed 1.
    """
    s1 = strength_at(1.0)
    if s1 <= tau:
        if cap or s1 == tau:
            return 1.0
        hi = 2.0
        while strength_at(hi) < tau:
            hi *= 2.0
            if hi > 1e4:
                raise ValueError(f"solve_factor: strength never reaches tau={tau} (strength(1e4) too small)")
        lo = 1.0
    else:
        lo, hi = 0.0, 1.0
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if strength_at(mid) < tau:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def parse_rewind(spec: str) -> dict:
    """'saferho' | 'minrho' | 'uniform=0.4' -> {'name', 'kind', 'value'?}."""
    s = spec.strip().lower()
    if s in ("saferho", "safescale"):
        return {"name": "saferho", "kind": "saferho"}
    if s in ("minrho", "minscale"):
        return {"name": "minrho", "kind": "minrho"}
    m = re.fullmatch(r"uniform=([0-9]*\.?[0-9]+)", s)
    if m:
        v = float(m.group(1))
        return {"name": f"uniform={v:g}", "kind": "uniform", "value": v}
    raise ValueError(f"--rewind {spec!r}: expected saferho, minrho or uniform=A (e.g. uniform=0.4)")


# ---- operating points ---------------------------------------------------------------------------

def parse_rule(spec: str) -> dict:
    """'keep-target=80' | 'sum' | 'pareto' -> {'name', 'kind', 'keep'?}."""
    s = spec.strip().lower()
    if s in ("sum", "pareto"):
        return {"name": s, "kind": s}
    m = re.fullmatch(r"keep-target=([0-9]*\.?[0-9]+)", s)
    if m:
        return {"name": f"keep-target={float(m.group(1)):g}", "kind": "keep", "keep": float(m.group(1)) / 100.0}
    raise ValueError(f"--select {spec!r}: expected keep-target=X (percent of the final target gain kept), "
                     "sum or pareto")


def pareto_front(points: list[dict]) -> list[int]:
    """Indices of the points no other point beats on both target and general (ties kept once)."""
    out = []
    for i, p in enumerate(points):
        dominated = False
        for j, q in enumerate(points):
            if j == i:
                continue
            if q["target"] >= p["target"] and q["general"] >= p["general"] and (
                    q["target"] > p["target"] or q["general"] > p["general"] or j < i):
                dominated = True
                break
        if not dominated:
            out.append(i)
    return out


def select_point(points: list[dict], rule: dict, *, base: dict, final: dict) -> int | None:
    """Index of the operating point under `rule` (None if nothing qualifies; 'pareto' -> None).

    keep-target=X: max general among points with target - T_base >= X (T_final - T_base)
                   (ties: higher target); sum: max target + general (ties: higher general).
    """
    if not points or rule["kind"] == "pareto":
        return None
    if rule["kind"] == "sum":
        return max(range(len(points)), key=lambda i: (points[i]["target"] + points[i]["general"], points[i]["general"]))
    gain = final["target"] - base["target"]
    need = base["target"] + rule["keep"] * gain
    ok = [i for i, p in enumerate(points) if p["target"] >= need - 1e-9]
    if not ok:
        return None
    return max(ok, key=lambda i: (points[i]["general"], points[i]["target"]))


def overshoot_check(points: list[dict], *, base: dict, final: dict, general_margin: float = 5.0,
                    target_keep: float = 0.8) -> dict:
    """Does a point with alpha < 1 beat the final checkpoint on general by >= general_margin points
    while keeping >= target_keep of its target gain over the base? (DEVIATION 13: the issue's numbers.)"""
    gain = final["target"] - base["target"]
    need_t = base["target"] + target_keep * gain
    need_g = final["general"] + general_margin
    # candidates: every point before the final checkpoint (alpha < 1 on a path, or an earlier step)
    cand = [p for p in points if p.get("kind") != "final" and (p.get("alpha") is None or p["alpha"] < 1.0)]
    hits = [p for p in cand if p["general"] >= need_g - 1e-9 and p["target"] >= need_t - 1e-9]
    best = max(cand, key=lambda p: p["general"]) if cand else None
    out = {"overshoot": bool(hits), "final_target_gain": gain, "target_needed": need_t,
           "general_needed": need_g, "criterion": f"general >= final + {general_margin:g} and target gain >= "
                                                  f"{100 * target_keep:g}% of the final gain",
           "witness": None, "best_general_point": None}
    if hits:
        w = max(hits, key=lambda p: (p["general"], p["target"]))
        out["witness"] = {"alpha": w.get("alpha"), "step": w.get("step"), "kind": w.get("kind"),
                          "target": w["target"], "general": w["general"],
                          "general_over_final": w["general"] - final["general"],
                          "target_gain_kept": (w["target"] - base["target"]) / gain if gain else None}
    if best is not None:
        out["best_general_point"] = {"alpha": best.get("alpha"), "step": best.get("step"),
                                     "target": best["target"], "general": best["general"]}
    out["vacuous"] = gain <= 0
    if gain <= 0:
        out["note"] = (f"the final checkpoint has no target gain over the base ({gain:+.2f}); the 'keep 80% of "
                       "the gain' condition is vacuous, so the verdict says little")
    return out


# -----------------------------------------------------------------------------
# 2. Checkpoints: find the final one and the training trajectory
# -----------------------------------------------------------------------------

def checkpoint_step(path) -> int | None:
    """Step of a checkpoint dir: from its name (global_step_<k>, checkpoint-<k>) or adapter_config extra.step."""
    path = Path(path)
    m = CKPT_RE.search(path.name)
    if m:
        return int(m.group(1))
    try:
        step = pm.read_adapter_config(path).get("extra", {}).get("step")
        return int(step) if step is not None else None
    except (FileNotFoundError, ValueError):
        return None


def _is_checkpoint(d: Path) -> bool:
    """Ours or an HF PEFT adapter dir (TRL's checkpoint-<k>/, the release's global_step_<k>/)."""
    return d.is_dir() and not d.name.startswith(".") and pm.find_adapter_dir(d) is not None


def discover_run(path) -> tuple[Path, list[tuple[int, Path]]]:
    """(final checkpoint, [(step, dir), ...] of the whole trajectory incl. the final one, by step).

    `path` is a run dir holding checkpoint dirs (train_sft.py's global_step_<k>/) or one checkpoint
    dir (then numbered siblings of the same method form the trajectory).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--checkpoint {path}: no such directory")
    if _is_checkpoint(path):
        method = pm.read_adapter_config(path)["method"]
        sibs = [d for d in path.parent.iterdir() if _is_checkpoint(d) and CKPT_RE.search(d.name)]
        traj = [(checkpoint_step(d), d) for d in sibs if pm.read_adapter_config(d)["method"] == method]
        if path not in [d for _, d in traj]:
            traj.append((checkpoint_step(path) or 0, path))
        traj = sorted(traj, key=lambda t: t[0])
        fstep = checkpoint_step(path)
        traj = [(s, d) for s, d in traj if fstep is None or s <= fstep]
        return path, traj
    ckpts = [(checkpoint_step(d), d) for d in path.iterdir() if _is_checkpoint(d)]
    ckpts = [(s, d) for s, d in ckpts if s is not None]
    if not ckpts:
        raise FileNotFoundError(f"--checkpoint {path}: holds neither {pm.CONFIG_FILE} nor checkpoint dirs "
                                f"(global_step_<k>/ or checkpoint-<k>/ with {pm.CONFIG_FILE})")
    ckpts.sort(key=lambda t: t[0])
    return ckpts[-1][1], ckpts


def _subsample(traj: list, k: int) -> list:
    """At most k checkpoints, evenly spaced, always keeping the last."""
    if k <= 0 or len(traj) <= k:
        return traj
    idx = sorted({round(i * (len(traj) - 1) / (k - 1)) for i in range(k)}) if k > 1 else [len(traj) - 1]
    return [traj[i] for i in idx]


# -----------------------------------------------------------------------------
# 3. The path runner: one base model, any point of any path set in place
# -----------------------------------------------------------------------------

def _own_tensors(layer: nn.Module) -> dict[str, torch.Tensor]:
    """A wrapper's own adapter parameters and persistent buffers (not base_layer's, not cached indices)."""
    out = dict(layer.named_parameters(recurse=False))
    for k, v in layer.named_buffers(recurse=False):
        if k not in layer._non_persistent_buffers_set:
            out[k] = v
    return out


class PathRunner:
    """Holds ONE base model with one finetuned checkpoint loaded and moves it, in place, to any point:
    the base, the final checkpoint, a factor/dense path point, a training checkpoint, a rewound model.

    State is real here (the snapshots and the wrapped/dense mode), hence a class. Modes:
      wrapped  the adapter wrappers are in the model; factor points and training checkpoints.
      dense    each wrapper is swapped for a plain nn.Linear holding W(alpha); dense points.
    Full FT has no wrappers: every point is written into the model's parameters from snapshots of
    W0 and W_ft (model dtype). `close()` returns the exact base model (same object) for the next run.
    """

    def __init__(self, model: nn.Module, tokenizer, checkpoint, *, base_spec: str | None = None,
                 snapshot_device=None):
        self.model, self.tokenizer = model, tokenizer
        self.checkpoint = Path(checkpoint)
        self.cfg = pm.read_adapter_config(self.checkpoint)
        self.method = self.cfg["method"]
        self.base_spec = base_spec or self.cfg.get("base_model") or getattr(model.config, "name_or_path", "")
        if pm.peft_state(model) is not None or pm.adapter_layers(model):
            raise ValueError("PathRunner needs a plain base model (it loads the checkpoint itself); "
                             "call close() on the previous runner first")
        self._requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
        self._was_training = model.training

        def snap(t):
            return t.detach().to(snapshot_device or t.device, copy=True)
        self.W0_exact: dict[str, torch.Tensor] = {}
        if self.method == "full":
            self.W0 = {n: snap(p) for n, p in model.named_parameters()}
        else:
            # Residual-base methods (PiSSA, MiLoRA) overwrite base_layer.weight with W0 - s B0 A0 at load
            # time; keep the exact W0 so that alpha = 0 and close() give the base bit for bit.
            layer_cls = pm.METHODS[self.method].layer
            if layer_cls.original_weight is not pm.AdapterLinear.original_weight:
                self.W0_exact = {n: snap(model.get_submodule(n).weight) for n in self.cfg["modules"]}
        pm.load_adapter(model, self.checkpoint)       # wraps the modules (or writes Full FT weights) ONCE
        model.eval()
        if self.method == "full":
            self.W1 = {n: snap(p) for n, p in model.named_parameters()}
            self.layers = {}
        else:
            self.layers = pm.adapter_layers(model)
            self.ft = {n: {k: snap(v) for k, v in _own_tensors(l).items()} for n, l in self.layers.items()}
        self.mode = "wrapped"
        self._dense: dict[str, nn.Linear] = {}
        # where the wrappers' adapter tensors are: "final" (the snapshot), "moved" (a factor point) or
        # "checkpoint" (a training checkpoint, which for PiSSA also rewrote the residual base)
        self._tensors = "final"
        self._baked = False                           # dense mode holding the merged current factor point
        self._s0: dict[str, torch.Tensor] = {}        # cached singular values of W0 per module

    # ---- modes ------------------------------------------------------------------------------
    def _to_wrapped(self):
        if self.mode == "dense":
            for name, layer in self.layers.items():
                pm.set_submodule(self.model, name, layer)
            self.mode = "wrapped"
        self._baked = False

    def _to_dense(self):
        if self.mode == "wrapped":
            for name, layer in self.layers.items():
                lin = self._dense.get(name)
                if lin is None:
                    base = layer.base_layer
                    lin = nn.utils.skip_init(nn.Linear, layer.in_features, layer.out_features,
                                             bias=base.bias is not None, device=base.weight.device,
                                             dtype=base.weight.dtype)
                    lin.requires_grad_(False)
                    self._dense[name] = lin
                pm.set_submodule(self.model, name, lin)
            self.mode = "dense"

    def _restore_final_tensors(self):
        """Final adapter tensors back into the wrappers (and, after a training checkpoint, PiSSA's
        residual base): every path is computed from the final checkpoint, never from the last point."""
        if self._tensors == "final" or self.method == "full":
            return
        with torch.no_grad():
            for name, layer in self.layers.items():
                own = _own_tensors(layer)
                for k, v in self.ft[name].items():
                    own[k].copy_(v)
                if self._tensors == "checkpoint" and name in self.W0_exact:
                    layer.after_load(self.W0_exact[name].float())   # W_res = W0 - s B0 A0 (peft_methods hook)
        self._tensors = "final"

    def _W0(self, name: str) -> torch.Tensor:
        """fp32 W0 of a wrapped module (exact snapshot for residual-base methods)."""
        if name in self.W0_exact:
            return self.W0_exact[name].float()
        return self.layers[name].original_weight()

    # ---- points -----------------------------------------------------------------------------
    def set_factor(self, alpha: float = 1.0, *, layer_alphas: dict[int, float] | None = None,
                   gen_map: str = "sqrt") -> None:
        """Factor-path point alpha (or a per-layer alpha_l; modules outside layers stay at 1)."""
        if self.method == "full":
            raise ValueError("full fine-tuning has no factor path (its dW has no adapter factors); use the dense path")
        self._restore_final_tensors()
        self._to_wrapped()
        with torch.no_grad():
            for name, layer in self.layers.items():
                a = alpha if layer_alphas is None else layer_alphas.get(layer_index(name), 1.0)
                new = factor_point(self.method, self.ft[name], a, W0=layer.base_layer.weight, gen_map=gen_map)
                own = _own_tensors(layer)
                for k, v in self.ft[name].items():
                    own[k].copy_(new.get(k, v))
        self._tensors = "final" if (alpha == 1.0 and layer_alphas is None) else "moved"

    def set_dense(self, alpha: float = 1.0, *, layer_alphas: dict[int, float] | None = None) -> None:
        """Dense-path point: every touched tensor W(alpha) = lerp(W0, W_ft, alpha) (PEFT-Arena additive path)."""
        with torch.no_grad():
            if self.method == "full":
                # DEVIATION 9: every parameter moves (embeddings, norms, biases too)
                for n, p in self.model.named_parameters():
                    a = alpha if layer_alphas is None else layer_alphas.get(layer_index(n), 1.0)
                    p.copy_(lerp_exact(self.W0[n], self.W1[n], a).to(p.dtype))
                return
            self._restore_final_tensors()
            self._to_dense()
            self._baked = False
            for name, layer in self.layers.items():
                a = alpha if layer_alphas is None else layer_alphas.get(layer_index(name), 1.0)
                lin = self._dense[name]
                W = lerp_exact(self._W0(name), layer.merged_weight(), a)                 # (d_out, d_in)
                lin.weight.copy_(W.to(lin.weight.dtype))
                if lin.bias is not None:   # only IA3 changes a bias; lerp(b, b) = b for the others
                    lin.bias.copy_(lerp_exact(layer.base_layer.bias, layer.merged_bias(), a).to(lin.bias.dtype))

    def bake(self) -> None:
        """Serve the current adapter point as a dense merged model: each wrapper's merged weight goes
        into its plain nn.Linear (PEFT-Arena evaluates every adapter merged into a dense model). Same model up to fp32 rounding; much faster generation for OFT, whose wrapper
        rebuilds R at every forward. The wrappers keep their tensors, so save_point can still write
        the point as an adapter."""
        if self.method == "full" or self.mode == "dense":
            return
        self._to_dense()
        with torch.no_grad():
            for name, layer in self.layers.items():
                lin = self._dense[name]
                lin.weight.copy_(layer.merged_weight().to(lin.weight.dtype))
                if lin.bias is not None:
                    lin.bias.copy_(layer.merged_bias().to(lin.bias.dtype))
        self._baked = True

    def set_base(self) -> None:
        """alpha = 0: the base model exactly (dense mode with the exact W0)."""
        self.set_dense(0.0)

    def set_final(self) -> None:
        """alpha = 1: the final checkpoint exactly (its own adapter tensors)."""
        if has_factor_path(self.method):
            self.set_factor(1.0)
        elif self.method == "full":
            self.set_dense(1.0)
        else:                               # the wrappers with their own final tensors
            self._restore_final_tensors()
            self._to_wrapped()

    def set_path(self, path: str, alpha: float, *, gen_map: str = "sqrt") -> None:
        if path == "factor":
            self.set_factor(alpha, gen_map=gen_map)
        elif path == "dense":
            self.set_dense(alpha)
        else:
            raise ValueError(f"unknown path {path!r}; known: {PATH_NAMES}")

    def set_checkpoint(self, ckpt) -> None:
        """A training checkpoint of the same run, loaded in place (peft_methods.load_adapter)."""
        ccfg = pm.read_adapter_config(ckpt)
        if ccfg["method"] != self.method or sorted(ccfg["modules"]) != sorted(self.cfg["modules"]) \
                or ccfg.get("hparams") != self.cfg.get("hparams"):
            raise ValueError(f"checkpoint {ckpt} ({ccfg['method']}, {ccfg.get('hparams')}) is not from the same run "
                             f"as {self.checkpoint} ({self.method}, {self.cfg.get('hparams')})")
        if self.method != "full":
            self._to_wrapped()
        pm.load_adapter(self.model, ckpt)
        self.model.eval()
        for name, W0 in self.W0_exact.items():   # rebuild the residual base from the exact W0 (no drift)
            self.layers[name].after_load(W0.float())
        self._tensors = "checkpoint"

    # ---- rewinding ---------------------------------------------------------------------------
    def default_measure(self) -> str:
        # DEVIATION 4: rho = ||Q||_F for OFT (unspecified in the paper); DEVIATION 8: ||dW||_F elsewhere
        cls = layer_class(self.method)
        return "dw" if cls is None else cls.rho_measures[0]

    @torch.no_grad()
    def module_strength(self, name: str, measure: str, c: float = 1.0, rewind_map: str = "linear") -> float:
        """Strength of one module when its final factors are moved to factor-path point c."""
        if measure in ("q", "r_minus_i"):
            if measure not in getattr(layer_class(self.method), "rho_measures", ()):
                raise ValueError(f"--rho {measure} is defined for OFT only (method here: {self.method}); use --rho dw")
            layer = self.layers[name]
            q = factor_point(self.method, self.ft[name], c, gen_map=rewind_map)["oft_q"]
            return oft_module_strength(q, layer.block_size, measure, n_blocks=layer.n_blocks,
                                       use_cayley_neumann=layer.cfg.use_cayley_neumann, num_terms=layer.cfg.num_terms)
        if measure != "dw":
            raise ValueError(f"--rho must be one of {RHO_MEASURES}, not {measure!r}")
        if self.method == "full":
            return c * float(torch.linalg.norm(self.W1[name].float() - self.W0[name].float()))
        layer = self.layers[name]
        if not has_factor_path(self.method):     # the dense path: ||W(c) - W0|| = c ||dW||
            return c * float(torch.linalg.norm(layer.merged_weight() - self._W0(name)))
        new = factor_point(self.method, self.ft[name], c, W0=layer.base_layer.weight, gen_map=rewind_map)
        W = layer.merged_weight_at(new)          # the factors set for a moment, then put back
        return float(torch.linalg.norm(W - self._W0(name)))

    def strength_modules(self) -> list[str]:
        """The modules whose strength makes up rho_l: wrapped modules, or Full FT's 2-D layer weights."""
        if self.method == "full":
            return [n for n, p in self.W1.items() if p.dim() == 2 and layer_index(n) is not None]
        return [n for n in self.layers if layer_index(n) is not None]

    def layer_rhos(self, measure: str, factors: dict[int, float] | None = None,
                   rewind_map: str = "linear") -> dict[int, float]:
        """rho_l = mean over layer l's modules of the strength, at per-layer point c_l (default 1)."""
        self._restore_final_tensors()
        vals = {}
        for n in self.strength_modules():
            c = 1.0 if factors is None else factors.get(layer_index(n), 1.0)
            vals[n] = self.module_strength(n, measure, c, rewind_map)
        return mean_by_layer(vals)

    def rewind(self, spec: dict, *, measure: str | None = None, first_k: int = SAFE_RHO_LAYERS,
               rewind_map: str = "linear", factor_rule: str = "ratio", cap: bool = True,
               gen_map: str = "sqrt") -> dict:
        """Move the model to the rewound point of `spec` (parse_rewind) and return its description."""
        measure = measure or self.default_measure()
        self._restore_final_tensors()
        layers = sorted(mean_by_layer({n: 0.0 for n in self.strength_modules()}))
        info: dict = {"name": spec["name"], "kind": spec["kind"], "measure": measure}
        if spec["kind"] == "uniform":
            # DEVIATION 7: uniform=a is the factor-path point alpha = a (generator map for OFT)
            factors = {l: spec["value"] for l in layers}
            use_map = gen_map
            info.update(map=gen_map, note=f"the factor-path point alpha = {spec['value']:g}")
        else:
            rho = self.layer_rhos(measure)
            tau, tinfo = rewind_target(rho, spec["kind"], first_k)
            info.update(tinfo, tau=tau, rho_before=rho, map=rewind_map, factor_rule=factor_rule, cap=cap)
            use_map = rewind_map
            if factor_rule == "ratio":
                factors = rewind_factors(rho, tau, cap=cap)
            elif factor_rule == "solve":
                mods = self.strength_modules()
                factors = {}
                for l in layers:
                    names = [n for n in mods if layer_index(n) == l]

                    def strength_at(c, names=names):
                        return sum(self.module_strength(n, measure, c, rewind_map) for n in names) / len(names)
                    factors[l] = solve_factor(strength_at, tau, cap=cap)
            else:
                raise ValueError(f"--factor-rule must be 'ratio' or 'solve', not {factor_rule!r}")
            info["rho_after"] = self.layer_rhos(measure, factors, rewind_map)
        info["factors"] = factors
        if not has_factor_path(self.method):
            self.set_dense(layer_alphas=factors)
        else:
            self.set_factor(layer_alphas=factors, gen_map=use_map)
        return info

    # ---- diagnostics, saving, cleanup --------------------------------------------------------
    def module_weights(self):
        """Yield (name, W0 fp32, current W fp32) for every module the method changes (Linear weights)."""
        if self.method == "full":
            for n in self.strength_modules():
                yield n, self.W0[n].float(), self.model.get_parameter(n).detach().float()
            return
        for name, layer in self.layers.items():
            if self.mode == "dense":
                W = self._dense[name].weight.detach().float()
            else:
                W = layer.merged_weight().detach()
            yield name, self._W0(name), W

    def sv_distortion(self) -> float:
        """Mean over modules of the relative singular-value distortion of the current point vs W0."""
        vals = []
        with torch.no_grad():
            for name, W0, W in self.module_weights():
                if name not in self._s0:
                    self._s0[name] = torch.linalg.svdvals(W0)
                vals.append(singular_value_distortion(W0, W, self._s0[name]))
        return sum(vals) / len(vals) if vals else 0.0

    def save_point(self, out_dir, fmt: str = "auto", *, extra: dict | None = None) -> tuple[Path, str]:
        """Write the current point as an ordinary checkpoint: 'adapter' (peft_methods.save_adapter:
        load with `--model BASE --adapter DIR`) or 'merged' (a Hugging Face dir: `--model DIR`)."""
        out_dir = Path(out_dir)
        if fmt == "auto":
            fmt = "adapter" if (self.method != "full" and (self.mode == "wrapped" or self._baked)) else "merged"
        if fmt == "adapter" and self._baked:
            self._to_wrapped()            # the wrappers still hold this point's tensors
        if fmt == "adapter" and self.method != "full" and self.mode == "dense":
            raise ValueError(f"{out_dir}: a dense-path point of a {self.method} adapter is no longer an adapter; "
                             "save it with --save-format merged")
        tmp = out_dir.with_name(".tmp-" + out_dir.name)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        meta = {"rewind": extra or {}, "source_checkpoint": str(self.checkpoint), "base_model": self.base_spec}
        if fmt == "adapter":
            pm.save_adapter(self.model, tmp, base_model=self.base_spec, extra=meta)
        elif fmt == "merged":
            sd = None if (self.method == "full" or self.mode == "dense") else pm.merged_state_dict(self.model)
            if sd is None:   # the model's own tensors are the point; adapter bookkeeping is not saved
                sd = {k: v for k, v in self.model.state_dict().items() if not k.startswith(pm.VERA_SHARED_ATTR)}
            self.model.save_pretrained(tmp, state_dict=sd)
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(tmp)
            loading.atomic_write_json(tmp / "rewind_point.json", meta)
        else:
            raise ValueError(f"--save-format must be auto, adapter or merged, not {fmt!r}")
        loading.atomic_replace_dir(tmp, out_dir)
        return out_dir, fmt

    def close(self) -> nn.Module:
        """Put the exact base model back (same object, plain modules, original requires_grad)."""
        with torch.no_grad():
            if self.method == "full":
                for n, p in self.model.named_parameters():
                    p.copy_(self.W0[n])
            else:
                for name, layer in self.layers.items():
                    base = layer.base_layer
                    if name in self.W0_exact:
                        base.weight.copy_(self.W0_exact[name])
                    pm.set_submodule(self.model, name, base)
        pm.drop_peft_state(self.model)
        for n, p in self.model.named_parameters():
            p.requires_grad_(self._requires_grad.get(n, False))
        self.model.train(self._was_training)
        self.layers, self._dense, self.ft, self.W0, self.W1 = {}, {}, {}, {}, {}
        self.mode = "closed"
        return self.model


# -----------------------------------------------------------------------------
# 4. Trade-off analysis: evaluate every point of one run on the one loaded model
# -----------------------------------------------------------------------------

def default_paths(method: str) -> list[str]:
    """Full FT and methods without a factor path: dense only. Methods whose factor path is the dense
    path (dW linear in the scaled tensor): the factor path. DoRA, PiSSA, MiLoRA, OFT: both, because
    they differ between the endpoints (the class's `factor_is_dense`)."""
    if not has_factor_path(method):
        return ["dense"]
    return ["factor"] if layer_class(method).factor_is_dense else ["factor", "dense"]


def path_label(method: str, path: str, gen_map: str = "sqrt") -> str:
    cls = layer_class(method) or pm.AdapterLinear
    if path == "dense":
        return cls.dense_label
    return cls.factor_label.replace("{gen}", "sqrt(a)" if gen_map == "sqrt" else "a")


def make_toy_evaluator(*, domain: str = "math", n_per_family: int = 200, batch_size: int = 64,
                       seed: int = 0, families=None, cache_root=None, progress: bool = False):
    """evaluate_fn(model, tokenizer, *, base_general, tag) -> evaluate.evaluate_toy result (percent).

    DEVIATION 10: the toy suite; real models use make_real_evaluator (--eval real)."""

    def evaluate_fn(model, tokenizer, *, base_general=None, tag=None):
        cache = Path(cache_root) / tag if (cache_root and tag) else None
        return evaluate.evaluate_toy(model, tokenizer, domain=domain, n_per_family=n_per_family,
                                     batch_size=batch_size, families=families, base_general=base_general,
                                     seed=seed, cache_dir=cache, progress=progress)
    return evaluate_fn


def real_suites(cfg: dict) -> list[str]:
    """--suite for --eval real: the named suite, or the domain's target suite + general."""
    return [cfg["suite"]] if cfg.get("suite") else [cfg.get("domain", "math"), "general"]


def make_real_evaluator(cfg: dict, *, cache_root=None):
    """evaluate_fn for --eval real: the paper's benchmarks (evaluate.py's loaders, decoding and
    aggregates) at every point, items loaded once. With the vLLM backend ONE engine (built on
    --base's folder) serves every point: each point's dense weights (merged adapters) are pushed into
    it layer by layer (evaluate.push_weights), nothing is written to disk; release it with
    evaluate.release_engine() (run_analysis does)."""
    suites = real_suites(cfg)
    names = [n for s in suites for n in evaluate.SUITES[s]]
    paths = evaluate._parse_paths(cfg.get("path"))
    items = {n: evaluate.load_benchmark(n, cfg.get("data_dir") or "data", paths.get(n),
                                        allow_hub=cfg.get("allow_hub", False),
                                        bbh_prompt_dir=cfg.get("bbh_prompt_dir"), limit=cfg.get("limit"))
             for n in names}      # bad data fails here, before any point is built
    backend = cfg.get("backend") or "auto"
    if backend == "auto":
        backend = "vllm" if evaluate.vllm_available() else "hf"
    if backend == "vllm" and not evaluate.vllm_available():
        raise SystemExit("rewind.py: --backend vllm needs vllm installed and a CUDA GPU")
    mnt = cfg.get("max_new_tokens") or -1
    max_new = {n: mnt if mnt > 0 else evaluate.BENCHMARKS[n]["decoding"]["max_new_tokens"] for n in names}
    domain = cfg.get("domain", "math")

    def evaluate_fn(model, tokenizer, *, base_general=None, tag=None):
        t0 = time.time()
        llm = None
        if backend == "vllm":
            from transformers import AutoConfig
            path, _ = loading.resolve_spec(cfg["base"])
            hf = AutoConfig.from_pretrained(path)
            ctx = evaluate._vllm_context(names, items, tokenizer, cfg["base"], max_new,
                                         int(getattr(hf, "max_position_embeddings", 1 << 30)))
            llm = evaluate.get_engine(path, max_model_len=ctx, seed=cfg.get("seed", 0),
                                      gpu_memory_utilization=cfg.get("vllm_gpu_memory_utilization", 0.5))
            evaluate.push_weights(llm, pm.iter_merged_state(model),
                                  tied_embeddings=bool(getattr(hf, "tie_word_embeddings", False)))
            evaluate._ENGINE["weights"] = f"rewind:{tag}"
        bench = {}
        for n in names:
            ov = {"max_new_tokens": max_new[n]}
            if evaluate.BENCHMARKS[n]["decoding"]["n"] > 1:
                ov.update(n=cfg.get("num_samples") if (cfg.get("num_samples") or -1) > 0 else None,
                          temperature=cfg.get("temperature") if (cfg.get("temperature") or -1) >= 0 else None)
            cache = Path(cache_root) / tag if (cache_root and tag) else None
            bench[n] = evaluate.run_benchmark(n, items[n], None if llm else model, tokenizer,
                                              model_name=str(cfg["base"]), batch_size=cfg.get("batch_size", 64),
                                              seed=cfg.get("seed", 0), cache_dir=cache, backend=backend,
                                              vllm_llm=llm, overrides=ov, progress=cfg.get("progress", False))
        res = evaluate.summarize_suite(bench, domain=domain, base_general=base_general)
        res.setdefault("target_score", None)
        res.setdefault("general_score", None)
        res.update(families={n: {"score": b["score"]} for n, b in bench.items()}, backend=backend,
                   seconds=round(time.time() - t0, 2))
        return res
    return evaluate_fn


def _score(res: dict | None) -> dict:
    if res is None:
        return {"target": None, "general": None}
    fams = {f: v.get("score") for f, v in (res.get("families") or {}).items()}
    return {"target": res.get("target_score"), "general": res.get("general_score"),
            "forgetting": res.get("forgetting"), "families": fams, "eval_seconds": res.get("seconds")}


def _fingerprint(ckpt: Path, extra: str) -> str:
    """Short hash of a checkpoint's files (name, size, mtime) + settings: keys the generation cache."""
    h = hashlib.sha1(extra.encode())
    for f in sorted(Path(ckpt).iterdir()):
        if f.is_file():
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:10]


# What changes the generations of a point, beyond the checkpoint's own files: the generation
# cache (--out/generations) is keyed on these, so a rerun into the same --out with other settings
# scores afresh instead of reusing answers made under the old ones.
BASE_CACHE_FIELDS = ("base", "dtype", "device", "domain", "n_per_family", "seed", "families")
RUN_CACHE_FIELDS = BASE_CACHE_FIELDS + ("gen_map", "eval_form", "rho", "safe_layers", "rewind_map",
                                        "factor_rule", "no_cap")


REAL_CACHE_FIELDS = ("suite", "limit", "max_new_tokens", "num_samples", "temperature", "data_dir", "path",
                     "backend")


def _key_fields(cfg: dict, names) -> list:
    """The fields' values; with --eval real also the real-suite settings (toy keys stay as they were)."""
    extra = REAL_CACHE_FIELDS if cfg.get("eval") == "real" else ()
    return [cfg.get(k) for k in tuple(names) + extra]


def base_cache_key(cfg: dict) -> str:
    """Cache key of the base model's generations."""
    fields = _key_fields(cfg, BASE_CACHE_FIELDS)
    return hashlib.sha1(json.dumps(fields, default=str).encode()).hexdigest()[:10]


def run_cache_key(cfg: dict, final: Path) -> str:
    """Cache key of one run's points: its final checkpoint's files + every setting that shapes a point."""
    return _fingerprint(final, json.dumps(_key_fields(cfg, RUN_CACHE_FIELDS), default=str))


def analyse_run(runner: PathRunner, evaluate_fn, *, label: str, grid: list[float], paths: list[str],
                rewinds: list[dict], trajectory: list[tuple[int, Path]], base_point: dict,
                gen_map: str = "sqrt", rewind_opts: dict | None = None, sv: bool = False,
                save: str = "selected", save_format: str = "auto", out: Path | None = None,
                select_rules: list[dict] | None = None, overshoot_opts: dict | None = None,
                cache_key: str = "", eval_form: str = "merged", log=print) -> dict:
    """Evaluate the training path, every path's grid and every rewind of one run; select; report."""
    method = runner.method
    rewind_opts = rewind_opts or {}
    select_rules = select_rules or [parse_rule("keep-target=80")]
    base_general = base_point.get("general")
    points: list[dict] = []

    def evaluate_here(kind, *, path=None, alpha=None, step=None, rewind=None, tag):
        t0 = time.time()
        if eval_form == "merged":
            runner.bake()     # DEVIATION 14: adapter points are scored as merged dense models (paper: merged + vLLM)
        res = evaluate_fn(runner.model, runner.tokenizer, base_general=base_general,
                          tag=f"{label}-{cache_key}/{tag}") if evaluate_fn else None
        p = {"label": label, "method": method, "kind": kind, "path": path, "alpha": alpha, "step": step,
             "rewind": rewind, **_score(res)}
        if sv:
            p["sv_distortion"] = runner.sv_distortion()
        p["seconds"] = round(time.time() - t0, 2)
        if p["target"] is not None and base_point.get("target") is not None:
            p["target_gain"] = p["target"] - base_point["target"]
        points.append(p)
        where = (f"{path} a={alpha:g}" if kind == "path" else f"rewind {rewind}" if kind == "rewind"
                 else f"final a=1 (step {step})" if kind == "final" else f"{kind} step {step}")
        tg = "-" if p["target"] is None else f"{p['target']:.2f}"
        gg = "-" if p["general"] is None else f"{p['general']:.2f}"
        extra = f" sv-dist {p['sv_distortion']:.2e}" if sv else ""
        log(f"[rewind] {label} {where}: target {tg} general {gg}{extra} ({p['seconds']:.1f} s)")
        return p

    # base point shared by every path (evaluated once on the plain model by the caller);
    # DEVIATION 11: it is also step 0 of the training path
    base = dict(base_point, label=label, method=method, kind="base", path=None, alpha=0.0, step=0)
    if sv:
        base["sv_distortion"] = 0.0
    points.append(base)

    # training path: intermediate checkpoints (the final one is the alpha = 1 point)
    final_step = trajectory[-1][0] if trajectory else None
    for step, ckpt in trajectory[:-1]:
        runner.set_checkpoint(ckpt)
        evaluate_here("training", step=step, tag=f"train_step{step}")
    runner.set_final()
    final = evaluate_here("final", alpha=1.0, step=final_step, tag="final")

    # interpolation paths (endpoints are the base and the final point: DEVIATION 2)
    for path in paths:
        for a in grid:
            if a in (0.0, 1.0):
                continue
            runner.set_path(path, a, gen_map=gen_map)
            p = evaluate_here("path", path=path, alpha=a, tag=f"{path}_a{a:g}")
            if save == "all" and out is not None:
                _save(runner, p, out, label, f"{path}_a{a:g}", save_format,
                      {"path": path, "alpha": a, "gen_map": gen_map})

    rewind_infos = _rewind_points(runner, evaluate_here, rewinds, label=label, gen_map=gen_map,
                                  rewind_opts=rewind_opts, out=out if save in ("selected", "all") else None,
                                  save_format=save_format, log=log)
    result = {"label": label, "method": method, "hparams": runner.cfg.get("hparams"),
              "checkpoint": str(runner.checkpoint), "final_step": final_step, "paths": paths,
              "gen_map": gen_map, "points": points, "rewinds": rewind_infos}
    scored = all(p["target"] is not None and p["general"] is not None for p in points)
    if scored:
        result.update(_select_and_check(points, base, final, paths, select_rules, overshoot_opts or {}))
        # the selected operating point of the first rule becomes a checkpoint too
        sel = result["selection"][select_rules[0]["name"]].get("all")
        if sel is not None and save in ("selected", "all") and out is not None and sel["kind"] == "path":
            runner.set_path(sel["path"], sel["alpha"], gen_map=gen_map)
            _save(runner, sel, out, label, f"selected_{sel['path']}_a{sel['alpha']:g}", save_format,
                  {"path": sel["path"], "alpha": sel["alpha"], "rule": select_rules[0]["name"]})
    runner.set_final()
    return result


def _rewind_points(runner, evaluate_here, rewinds, *, label, gen_map, rewind_opts, out, save_format, log) -> list:
    """Layer-wise rewinding: move to each rewound point, evaluate it (and save it when `out`)."""
    rewind_infos = []
    for spec in rewinds:
        info = runner.rewind(spec, gen_map=gen_map, **rewind_opts)
        if info.get("note"):
            log(f"[rewind] {label} {spec['name']}: {info['note']}")
        if "factors" in info:
            log(f"[rewind] {label} {spec['name']}: factors " +
                ", ".join(f"L{l}={c:.3f}" for l, c in sorted(info["factors"].items())))
        p = evaluate_here("rewind", rewind=spec["name"], tag=f"rewind_{spec['name']}")
        p["rewind_info"] = _jsonable(info)
        rewind_infos.append(p["rewind_info"])
        if out is not None:
            _save(runner, p, out, label, f"rewind_{spec['name'].replace('=', '')}", save_format,
                  {"rewind": _jsonable(info)})
    return rewind_infos


def _select_and_check(points, base, final, paths, rules, overshoot_opts) -> dict:
    """Per rule: the selected point on each path and over every candidate; Pareto sets; overshoot."""
    pools = {path: [p for p in points if p["kind"] in ("base", "final") or p.get("path") == path] for path in paths}
    pools["all"] = [p for p in points if p["kind"] in ("base", "final", "path", "rewind")]
    pools["training"] = [p for p in points if p["kind"] in ("base", "training", "final")]
    selection = {}
    for rule in rules:
        selection[rule["name"]] = {}
        for pool_name, pool in pools.items():
            i = select_point(pool, rule, base=base, final=final)
            selection[rule["name"]][pool_name] = None if i is None else pool[i]
    pareto = {k: [dict(kind=pool[i]["kind"], path=pool[i].get("path"), alpha=pool[i].get("alpha"),
                       step=pool[i].get("step"), rewind=pool[i].get("rewind"), target=pool[i]["target"],
                       general=pool[i]["general"]) for i in pareto_front(pool)] for k, pool in pools.items()}
    over = {path: overshoot_check(pools[path], base=base, final=final, **overshoot_opts) for path in paths}
    # the training path's own version: did an earlier checkpoint already do better?
    tr = [dict(p, alpha=None) for p in pools["training"] if p["kind"] == "training"]
    over["training"] = overshoot_check(tr, base=base, final=final, **overshoot_opts)
    return {"selection": selection, "pareto": pareto, "overshoot": over}


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    return obj


def _save(runner, point, out, label, name, fmt, extra):
    d, used = runner.save_point(Path(out) / "points" / label / name, fmt, extra=dict(extra, label=label))
    point["saved"] = str(d)
    point["saved_format"] = used


# -----------------------------------------------------------------------------
# 5. The whole analysis: one base model for every run
# -----------------------------------------------------------------------------

def run_analysis(cfg: dict, *, loader: Callable | None = None, evaluate_fn=None, log=print) -> dict:
    """Load the base ONCE, evaluate it, then analyse each --checkpoint run on that same object.

    cfg: the resolved CLI config (see build_parser). `loader(spec, dtype=, device=)` defaults to
    loading.load_model; `evaluate_fn` defaults to the toy evaluator (None with --eval none).
    """
    out = Path(cfg["out"]) if cfg.get("out") else None
    loader = loader or loading.load_model
    model, tok = loader(cfg["base"], dtype=cfg.get("dtype"), device=cfg.get("device"))
    model.eval()
    if evaluate_fn is None and cfg.get("eval", "toy") == "toy":
        evaluate_fn = make_toy_evaluator(domain=cfg["domain"], n_per_family=cfg["n_per_family"],
                                         batch_size=cfg["batch_size"], seed=cfg["seed"],
                                         families=cfg.get("families"),
                                         cache_root=(out / "generations") if (out and cfg.get("cache", True)) else None,
                                         progress=cfg.get("progress", False))
    if evaluate_fn is None and cfg.get("eval") == "real":
        evaluate_fn = make_real_evaluator(
            cfg, cache_root=(out / "generations") if (out and cfg.get("cache", True)) else None)
    try:
        return _run_points(cfg, model, tok, evaluate_fn, out, log)
    finally:
        if cfg.get("eval") == "real":
            evaluate.release_engine()     # the one engine that scored every point


def _run_points(cfg, model, tok, evaluate_fn, out, log) -> dict:
    """run_analysis after loading: the base point, then every run's points."""
    grid = parse_grid(cfg["grid"])
    rewinds = [parse_rewind(s) for s in cfg.get("rewind") or []]
    rules = [parse_rule(s) for s in cfg.get("select") or ["keep-target=80"]]
    base_key = base_cache_key(cfg)
    t0 = time.time()
    res0 = evaluate_fn(model, tok, base_general=None, tag=f"base-{base_key}") if evaluate_fn else None
    base_point = {"label": "base", "kind": "base", **_score(res0), "seconds": round(time.time() - t0, 2)}
    if res0 is not None:
        log(f"[rewind] base: target {base_point['target']:.2f} general {base_point['general']:.2f} "
            f"({base_point['seconds']:.1f} s)")
    rewind_opts = {"measure": cfg.get("rho"), "first_k": cfg.get("safe_layers", SAFE_RHO_LAYERS),
                   "rewind_map": cfg.get("rewind_map", "linear"), "factor_rule": cfg.get("factor_rule", "ratio"),
                   "cap": not cfg.get("no_cap", False)}
    labels = cfg.get("label") or []
    runs = []
    for i, ck in enumerate(cfg["checkpoint"]):
        final, traj = discover_run(ck)
        if cfg.get("train_path", "auto") == "none":
            traj = [t for t in traj if t[1] == final] or [(checkpoint_step(final), final)]
        traj = _subsample(traj, cfg.get("max_train_points", 0))
        runner = PathRunner(model, tok, final, base_spec=cfg["base"], snapshot_device=cfg.get("snapshot_device"))
        label = labels[i] if i < len(labels) else _default_label(runner.cfg, [r["label"] for r in runs])
        trained_on = runner.cfg.get("base_model")
        if trained_on and str(trained_on) != str(cfg["base"]):
            log(f"[rewind] note: {final} was trained on base {trained_on!r}; interpolating towards "
                f"--base {cfg['base']!r}")
        paths = _run_paths(cfg.get("paths"), runner.method, label, log)
        log(f"[rewind] {label}: method {runner.method}, final {final} (step {traj[-1][0] if traj else '?'}), "
            f"{max(len(traj) - 1, 0)} training checkpoints, paths {paths}, grid {grid}")
        key = run_cache_key(cfg, final)
        try:
            runs.append(analyse_run(runner, evaluate_fn, label=label, grid=grid, paths=paths, rewinds=rewinds,
                                    trajectory=traj, base_point=base_point, gen_map=cfg.get("gen_map", "sqrt"),
                                    rewind_opts=rewind_opts, sv=cfg.get("sv_distortion", False),
                                    save=cfg.get("save", "selected"), save_format=cfg.get("save_format", "auto"),
                                    out=out, select_rules=rules, cache_key=key,
                                    eval_form=cfg.get("eval_form", "merged"),
                                    overshoot_opts={"general_margin": cfg.get("overshoot_general", 5.0),
                                                    "target_keep": cfg.get("overshoot_target_keep", 80.0) / 100.0},
                                    log=log))
        finally:
            runner.close()
    results = {"base": base_point, "runs": runs, "model_id": id(model)}
    if out is not None:
        write_outputs(results, cfg, out, log=log)
    return results


def _run_paths(spec: str | None, method: str, label: str, log) -> list[str]:
    """--paths (a comma list, or auto = default_paths) for one run; a factor path the method lacks -> dense."""
    paths = default_paths(method) if spec in (None, "auto") else [p.strip() for p in spec.split(",")]
    for p in paths:
        if p not in PATH_NAMES:
            raise ValueError(f"--paths: unknown path {p!r}; known: {PATH_NAMES} (or auto)")
    if "factor" in paths and not has_factor_path(method):
        log(f"[rewind] {label}: {'full fine-tuning' if method == 'full' else method} has no factor path; "
            "using dense only")
        paths = ["dense"]
    return paths


def _default_label(acfg: dict, taken: list[str]) -> str:
    """'lora-r8', 'oft-b16', 'full', ...; '-2', '-3' appended when several runs share a label."""
    hp = acfg.get("hparams") or {}
    m = acfg["method"]
    label = f"oft-b{hp.get('block_size')}" if m == "oft" else (f"{m}-r{hp['r']}" if "r" in hp else m)
    k, out = 2, label
    while out in taken:
        out, k = f"{label}-{k}", k + 1
    return out


# -----------------------------------------------------------------------------
# 6. Outputs: results.json / results.csv / tradeoff.png
# -----------------------------------------------------------------------------

CSV_FIELDS = ["label", "method", "kind", "path", "alpha", "step", "rewind", "target", "general", "forgetting",
              "target_gain", "sv_distortion", "seconds", "saved"]


def write_outputs(results: dict, cfg: dict, out: Path, log=print) -> None:
    out.mkdir(parents=True, exist_ok=True)
    res = {k: v for k, v in results.items() if k != "model_id"}
    loading.atomic_write_json(out / "results.json", _jsonable(res))
    loading.atomic_write_csv(out / "results.csv", CSV_FIELDS, [p for r in res["runs"] for p in r["points"]])
    if all(p.get("target") is not None for r in res["runs"] for p in r["points"]) and res["runs"]:
        plot_tradeoff(res, out / "tradeoff.png", sv=cfg.get("sv_distortion", False))
        log(f"[rewind] wrote {out / 'tradeoff.png'}")
    if all(r.get("overshoot") for r in res["runs"]) and res["runs"]:
        loading.atomic_write_text(out / "summary.md", summary_markdown(res, cfg))
    for r in res["runs"]:
        for path, o in (r.get("overshoot") or {}).items():
            log(f"[rewind] {r['label']} overshoot on {path} path: {_overshoot_verdict(o)}")
    log(f"[rewind] wrote {out / 'results.json'} and {out / 'results.csv'}")


def _overshoot_verdict(o: dict) -> str:
    wt = o["witness"]
    where = f"a={wt['alpha']:g}" if wt and wt.get("alpha") is not None else f"step {wt and wt.get('step')}"
    verdict = (f"YES at {where} (general +{wt['general_over_final']:.2f}, target gain kept "
               f"{100 * wt['target_gain_kept']:.0f}%)" if wt and wt.get("target_gain_kept") is not None
               else ("YES" if o["overshoot"] else "no"))
    if o.get("vacuous"):
        verdict += f" (vacuous: the final checkpoint has no target gain, {o['final_target_gain']:+.2f})"
    return verdict


def _tg(p: dict) -> str:
    return f"{p['target']:.2f} / {p['general']:.2f}"


def _summary_point_rows(r: dict) -> list[str]:
    """Markdown rows of one run: base, final, best-general point per path, rewinds, selected points."""
    pts, lab = r["points"], r["label"]
    base = next(p for p in pts if p["kind"] == "base")
    final = next(p for p in pts if p["kind"] == "final")
    lines = [f"| {lab} | base | {_tg(base)} |", f"| {lab} | final (step {final.get('step')}) | {_tg(final)} |"]
    for path in r["paths"]:
        pp = sorted([p for p in pts if p.get("path") == path], key=lambda p: p["alpha"])
        best = max(pp, key=lambda p: p["general"]) if pp else None
        if best is not None:
            lines.append(f"| {lab} | {path_label(r['method'], path, r.get('gen_map', 'sqrt'))}: "
                         f"best general at a={best['alpha']:g} | {_tg(best)} |")
    lines += [f"| {lab} | rewind {p['rewind']} | {_tg(p)} |" for p in pts if p["kind"] == "rewind"]
    for rule, sel in (r.get("selection") or {}).items():
        if sel.get("all") is not None:
            p = sel["all"]
            where = (f"{p['path']} a={p['alpha']:g}" if p["kind"] == "path" else
                     f"rewind {p['rewind']}" if p["kind"] == "rewind" else p["kind"])
            lines.append(f"| {lab} | selected ({rule}): {where} | {_tg(p)} |")
    return lines


def _overshoot_rows(r: dict) -> list[str]:
    lines = []
    for path, o in (r.get("overshoot") or {}).items():
        w = o.get("witness")
        if not w:
            wt = "-"
        else:
            where = f"a={w['alpha']:g}" if w.get("alpha") is not None else f"step {w.get('step')}"
            wt = f"{where}: {w['target']:.2f} / {w['general']:.2f}"
        yn = ("yes" if o["overshoot"] else "no") + (" (vacuous: no target gain)" if o.get("vacuous") else "")
        lines.append(f"| {r['label']} | {path} | {yn} | {wt} |")
    return lines


def summary_markdown(res: dict, cfg: dict) -> str:
    """A short Markdown report (for the README): base, final, selected points, rewinds, overshoot."""
    cmd = " ".join(str(a) for a in cfg.get("argv", []))
    lines = ["# Interpolation and rewinding (PEFT-Arena, arXiv 2605.28819)", "", f"Command: `python {cmd}`", "",
             f"Target / General in %, toy domain `{cfg.get('domain')}`, {cfg.get('n_per_family')} items per family. "
             f"Overshoot = a point before the final checkpoint with general >= final + "
             f"{cfg.get('overshoot_general', 5.0):g} and >= {cfg.get('overshoot_target_keep', 80.0):g}% of the final "
             "target gain.", "",
             "| run | point | Target / General |", "|---|---|---|"]
    for r in res["runs"]:
        lines += _summary_point_rows(r)
    lines += ["", "| run | path | overshoot | witness (Target / General) |", "|---|---|---|---|"]
    for r in res["runs"]:
        lines += _overshoot_rows(r)
    return "\n".join(lines) + "\n"


PATH_STYLE = {"factor": dict(color="tab:blue", marker="o"), "dense": dict(color="tab:orange", marker="s")}
REWIND_MARKERS = ["^", "v", "D", "P", "X", "<", ">"]


def _path_points(r: dict, path: str, base: dict, final: dict) -> list[dict]:
    """base -> the path's grid points by alpha -> final."""
    return [base] + sorted([p for p in r["points"] if p.get("path") == path], key=lambda p: p["alpha"]) + [final]


def _plot_paths(ax, r: dict, base: dict, final: dict) -> None:
    """The training path (dashed, labelled by step) and every interpolation path (solid, by alpha)."""
    pts = r["points"]
    tr = [base] + sorted([p for p in pts if p["kind"] == "training"], key=lambda p: p["step"]) + [final]
    ax.plot([p["target"] for p in tr], [p["general"] for p in tr], "--", color="0.45", lw=1.3,
            marker=".", ms=7, label="training path (SFT checkpoints)", zorder=2)
    for p in tr[1:-1]:
        ax.annotate(f"s{p['step']}", (p["target"], p["general"]), textcoords="offset points",
                    xytext=(4, -10), fontsize=7, color="0.35")
    for path in r["paths"]:
        pp = _path_points(r, path, base, final)
        st = PATH_STYLE[path]
        ax.plot([p["target"] for p in pp], [p["general"] for p in pp], "-", lw=1.8, ms=5, alpha=0.9,
                label=path_label(r["method"], path, r.get("gen_map", "sqrt")), zorder=3, **st)
        for p in pp[1:-1]:
            if round(p["alpha"] * 10, 6) % 2 == 0 or len(pp) <= 8:   # label every other grid point
                ax.annotate(f"{p['alpha']:g}", (p["target"], p["general"]), textcoords="offset points",
                            xytext=(4, 3), fontsize=7, color=st["color"])


def _plot_markers(ax, r: dict, base: dict, final: dict) -> None:
    """Rewound points, base, final checkpoint, the first rule's selected point; title and axes."""
    for k, p in enumerate([p for p in r["points"] if p["kind"] == "rewind"]):
        ax.scatter([p["target"]], [p["general"]], marker=REWIND_MARKERS[k % len(REWIND_MARKERS)], s=80,
                   color=f"C{4 + k}", edgecolor="k", zorder=5, label=f"rewind: {p['rewind']}")
    ax.scatter([base["target"]], [base["general"]], marker="s", s=70, color="k", zorder=6, label="base (a=0)")
    ax.scatter([final["target"]], [final["general"]], marker="*", s=220, color="tab:red", edgecolor="k",
               zorder=6, label=f"final checkpoint (step {final.get('step')})")
    sel_rules = r.get("selection") or {}
    if sel_rules:
        rule = next(iter(sel_rules))
        sel = sel_rules[rule].get("all")
        if sel is not None:
            ax.scatter([sel["target"]], [sel["general"]], s=380, facecolors="none", edgecolors="tab:green",
                       linewidths=2.2, zorder=7, label=f"selected ({rule})")
    ov = r.get("overshoot") or {}
    verdict = ", ".join(f"{k}: {'yes' if v['overshoot'] else 'no'}" for k, v in ov.items() if k != "training")
    hp = r.get("hparams") or {}
    hp_s = ", ".join(f"{k}={v}" for k, v in hp.items() if k in ("r", "alpha", "block_size"))
    ax.set_title(f"{r['label']} ({r['method']}{'; ' + hp_s if hp_s else ''})\novershoot: {verdict or 'n/a'}",
                 fontsize=10)
    ax.set_xlabel("target score (%)")
    ax.set_ylabel("general score (%) = mean(IFEval, BBH, NQ)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best", framealpha=0.85, markerscale=0.6)


def _plot_sv(ax2, r: dict, base: dict, final: dict) -> None:
    """Singular-value distortion of every path against alpha."""
    for path in r["paths"]:
        pp = _path_points(r, path, base, final)
        ax2.plot([p["alpha"] for p in pp], [p.get("sv_distortion", float("nan")) for p in pp], "-",
                 label=path_label(r["method"], path, r.get("gen_map", "sqrt")), **PATH_STYLE[path])
    ax2.set_xlabel("alpha")
    ax2.set_ylabel("SV distortion vs W0\n||s(W)-s(W0)|| / ||s(W0)||", fontsize=9)
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=7)


def plot_tradeoff(results: dict, png: Path, *, sv: bool = False) -> None:
    """One panel per run in the (target, general) plane: paths (solid), training path (dashed),
    base, final checkpoint, rewinds and the selected operating point. Optional second row: the
    singular-value distortion of every path against alpha."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    runs = results["runs"]
    n = len(runs)
    rows = 2 if sv else 1
    fig, axes = plt.subplots(rows, n, figsize=(6.4 * n, 6.0 + 2.8 * (rows - 1)), squeeze=False,
                             gridspec_kw={"height_ratios": [3, 1.4][:rows]})
    for j, r in enumerate(runs):
        base = next(p for p in r["points"] if p["kind"] == "base")
        final = next(p for p in r["points"] if p["kind"] == "final")
        _plot_paths(axes[0][j], r, base, final)
        _plot_markers(axes[0][j], r, base, final)
        if sv:
            _plot_sv(axes[1][j], r, base, final)
    fig.suptitle("Interpolation vs training path in the (target, general) plane (PEFT-Arena)", fontsize=11)
    fig.tight_layout()
    png = Path(png)
    tmp = png.with_name(".tmp-" + png.name)
    fig.savefig(tmp, dpi=130, format="png")
    plt.close(fig)
    tmp.replace(png)


# -----------------------------------------------------------------------------
# 7. CLI
# -----------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Interpolation paths, layer-wise rewinding and the overshoot "
                                            "(PEFT-Arena)", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("models")
    g.add_argument("--base", default="toy", help="base model: 'toy', a local HF dir or a hub id (loaded once)")
    g.add_argument("--checkpoint", action="append", default=[],
                   help="a run dir (global_step_<k>/ or TRL checkpoint-<k>/ inside; ours or HF PEFT adapters) "
                        "or one checkpoint dir; repeat for several runs")
    g.add_argument("--label", action="append", default=[], help="display label per --checkpoint (default from method)")
    g.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: bf16 on CUDA, fp32 on CPU)")
    g.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    g.add_argument("--snapshot-device", default=None,
                   help="where the W0 / final snapshots live (default: the model's device; 'cpu' saves GPU "
                        "memory for Full FT of large models at the cost of a host-to-device copy per point)")
    g = p.add_argument_group("paths")
    g.add_argument("--grid", default="0:1:0.1", help="alpha grid START:STOP:STEP (stop included) or a comma list")
    g.add_argument("--paths", default="auto",
                   help="comma list of factor,dense; auto = dense for full, factor for linear adapters, both "
                        "for dora/pissa/milora/oft")
    g.add_argument("--generator-map", dest="gen_map", default="sqrt", choices=["sqrt", "linear"],
                   help="OFT generator path Q(a) = sqrt(a) Q (paper caption) or a Q")
    g.add_argument("--train-path", default="auto", choices=["auto", "none"],
                   help="auto = evaluate every saved checkpoint of the run; none = final only")
    g.add_argument("--max-train-points", type=int, default=0,
                   help="evaluate at most this many training checkpoints (evenly spaced, final kept); 0 = all")
    g = p.add_argument_group("layer-wise rewinding")
    g.add_argument("--rewind", action="append", default=[], help="saferho | minrho | uniform=A (repeatable)")
    g.add_argument("--rho", default=None, choices=list(RHO_MEASURES),
                   help="per-module strength: q = ||Q||_F, r_minus_i = ||R-I||_F (OFT), dw = ||dW||_F; "
                        "default q for OFT, dw otherwise")
    g.add_argument("--safe-layers", type=int, default=SAFE_RHO_LAYERS, help="SafeRho: average over the first K layers")
    g.add_argument("--rewind-map", default="linear", choices=["linear", "sqrt"],
                   help="apply c_l to Q as c_l Q (linear) or sqrt(c_l) Q (the generator-path map)")
    g.add_argument("--factor-rule", default="ratio", choices=["ratio", "solve"],
                   help="c_l = tau/rho_l (ratio) or bisection so rho_l after rewinding = tau (solve)")
    g.add_argument("--no-cap", action="store_true", help="allow c_l > 1 (strengthen weak layers)")
    _add_eval_args(p)
    g = p.add_argument_group("operating point and overshoot")
    g.add_argument("--select", action="append", default=[],
                   help="keep-target=X (max general keeping X%% of the final target gain) | sum | pareto; "
                        "repeatable, the first is marked in the plot (default keep-target=80)")
    g.add_argument("--overshoot-general", type=float, default=5.0, help="points of general above the final checkpoint")
    g.add_argument("--overshoot-target-keep", type=float, default=80.0, help="percent of the final target gain kept")
    g = p.add_argument_group("output")
    g.add_argument("--out", default=None, help="output dir (results.json/csv, tradeoff.png, config.json, points/)")
    g.add_argument("--save", default="selected", choices=["none", "selected", "all"],
                   help="which points become checkpoints: rewinds + selected point, or every grid point")
    g.add_argument("--save-format", default="auto", choices=["auto", "adapter", "merged"],
                   help="auto = adapter dir for factor points, merged HF dir for dense points and Full FT")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    g.add_argument("--progress", action="store_true", help="generation progress bars")
    g.add_argument("--smoke", action="store_true",
                   help="random tiny model + synthetic LoRA run with 2 checkpoints, 3-point grid (< 1 min, CPU)")
    return p


def _add_eval_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval", default=None, choices=["toy", "real", "none"],
                   help="real = the paper's benchmarks at every point (evaluate.py's suites; one vLLM engine "
                   "reused across points); toy = evaluate.evaluate_toy (toy base only); none = only build/save "
                   "points. Default: toy for --base toy, real otherwise")
    g.add_argument("--domain", default="math", choices=["math", "med"], help="target domain")
    g.add_argument("--suite", default=None, choices=["math", "med", "general", "all"],
                   help="--eval real: one suite (default: the domain's target suite + general)")
    g.add_argument("--data-dir", default="data", help="--eval real: root of the benchmark files (evaluate.py)")
    g.add_argument("--path", action="append", default=[], metavar="NAME=FILE", help="--eval real: file per benchmark")
    g.add_argument("--bbh-prompt-dir", default=None, help="--eval real: directory of BBH <task>.txt CoT prompts")
    g.add_argument("--allow-hub", action="store_true", help="--eval real: try the hub ids when no local file is found")
    g.add_argument("--limit", type=int, default=None, help="--eval real: items per benchmark (default all)")
    g.add_argument("--max-new-tokens", type=int, default=-1, help="--eval real: tokens; -1 = each benchmark's paper value")
    g.add_argument("--num-samples", type=int, default=-1, help="--eval real: samples per math prompt; -1 = 16 (paper)")
    g.add_argument("--temperature", type=float, default=-1.0, help="--eval real: math temperature; -1 = 0.6 (paper)")
    g.add_argument("--backend", default="auto", choices=["auto", "hf", "vllm"],
                   help="--eval real: auto = vLLM when it imports and CUDA is present")
    g.add_argument("--vllm-gpu-memory-utilization", type=float, default=0.5,
                   help="--eval real with vLLM: the engine's share of the GPU (the point's model is there too)")
    g.add_argument("--n-per-family", type=int, default=200, help="toy test items per family (5 families)")
    g.add_argument("--families", nargs="*", default=None, help="toy families (default all five)")
    g.add_argument("--batch-size", type=int, default=64, help="prompts per generate() call")
    g.add_argument("--seed", type=int, default=0, help="toy item / generation seed")
    g.add_argument("--no-cache", dest="cache", action="store_false",
                   help="do not keep generations under --out/generations (the cache makes a killed run resumable)")
    g.add_argument("--eval-form", default="merged", choices=["merged", "adapter"],
                   help="score adapter points as merged dense weights (as the paper, and fast) or through the "
                        "adapter forward (exact wrapper numerics; slow for OFT)")
    g.add_argument("--sv-distortion", action="store_true",
                   help="also record the singular-value distortion vs W0 at every point (SVD of every module)")


def make_smoke_run(root: Path, method: str = "lora", seed: int = 0) -> tuple[str, Path]:
    """A random tiny base model dir and a fake 2-checkpoint SFT run of `method` (for --smoke / tests)."""
    root = Path(root)
    base_dir, run_dir = root / "smoke_base", root / "smoke_run"
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
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.eval is None:
        args.eval = "toy" if (args.base == "toy" or args.smoke) else "real"
    if args.eval == "toy" and args.base != "toy" and not args.smoke:
        raise SystemExit(f"rewind.py: --eval toy scores the toy world's items, but --base {args.base!r} is a "
                         "real model: use --eval real (the paper's benchmarks, e.g. --suite math --data-dir "
                         "data) or --eval none --save all")
    if args.smoke:
        _smoke_args(args)
    _check_args(args)
    # the command as a user would type it (also when called in-process, e.g. by arena.py demo)
    cfg = dict(vars(args), argv=["rewind.py"] + (sys.argv[1:] if argv is None else list(argv)), torch_threads=torch.get_num_threads(),
               device_resolved=str(loading.pick_device(args.device)))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    loading.atomic_write_json(out / "config.json", cfg)
    print(f"[rewind] config: {json.dumps({k: v for k, v in cfg.items() if k != 'argv'}, default=str)}")
    return run_analysis(cfg)


def _smoke_args(args) -> None:
    """--smoke: a random tiny base and a synthetic 2-checkpoint LoRA run under --out, a 3-point grid."""
    if not args.out:
        raise SystemExit("rewind.py: --smoke needs --out DIR")
    base_dir, run_dir = make_smoke_run(Path(args.out))
    args.base, args.checkpoint = base_dir, [str(run_dir)]
    args.grid = "0,0.5,1" if args.grid == "0:1:0.1" else args.grid
    args.n_per_family = min(args.n_per_family, 1)
    args.rewind = args.rewind or ["minrho", "uniform=0.4"]
    args.sv_distortion = True


def _check_args(args) -> None:
    if not args.checkpoint:
        raise SystemExit("rewind.py: at least one --checkpoint DIR is required (or --smoke)")
    if not args.out:
        raise SystemExit("rewind.py: --out DIR is required")
    assert args.n_per_family > 0, "--n-per-family must be positive"
    assert args.batch_size > 0, "--batch-size must be positive"
    assert args.safe_layers > 0, "--safe-layers must be positive"
    assert args.max_train_points >= 0, "--max-train-points must be >= 0"
    try:
        parse_grid(args.grid)
        for s in args.rewind:
            parse_rewind(s)
        for s in args.select:
            parse_rule(s)
    except ValueError as err:
        raise SystemExit(f"rewind.py: {err}")
    if args.eval == "real" and args.smoke:
        raise SystemExit("rewind.py: --smoke builds a toy run; use --eval toy or none with it")


if __name__ == "__main__":
    try:
        loading.run_cli("rewind.py", main)
    except (ValueError, FileNotFoundError) as err:
        print(f"rewind.py: error: {err}", file=sys.stderr)
        sys.exit(1)
