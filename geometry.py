"""geometry.py — why methods forget: weight-space spectra, capability-conditioned drift (CSD) and
activation geometry of finetuned checkpoints, and their correlation with measured forgetting.

Implements PEFT-Arena (Huang et al. 2026, arXiv 2605.28819) §7-§8. Tags at the formulas:
  [PA-W]   weight-space geometry (release tools/spectral_analysis.py, tools/compare_model_norms.py)
  [PA-CSD] Capability-Conditioned Drift (release tools/csd_single_checkpoint.py)
  [PA-ACT] activation geometry (release tools/activation_geometry_single_checkpoint.py)
  [PA-T]   the CSD / activation correlation tables and the spectral figure of the project page.
Layout: pure maths first (tensors in, numbers out, fp32; tests check each against numpy/scipy),
then activation collection and checkpoints, then scores/tables/plots, then the CLI.

Run (toy; the toy brings its own general/target prompts):
    python geometry.py --base toy --checkpoint runs/sft_lora --checkpoint runs/sft_oft --out runs/geom
Paper scale (prompt files: txt = one per line; json/jsonl = objects whose first key of prompt,
input, question, query, problem, instruction, text is the prompt; target and general results
files of one checkpoint comma-joined are merged):
    python geometry.py --base /models/Qwen2.5-7B --checkpoint DIR [...] --general-prompts g.jsonl \
        --target-prompts math.jsonl --results ev/ck/math/results.json,ev/ck/general/results.json \
        --base-results ev/base/math/results.json,ev/base/general/results.json --out runs/geom
    python geometry.py correlate --metrics runs/geom/*/metrics.json --out runs/geom_all
    python geometry.py bench-svd --rows 3584 --cols 18944 --device cuda     # paper-size SVD timing
A --checkpoint is an adapter dir (ours or HF PEFT), a full HF model dir (dW = W_ft - W0), or a run
dir (its last checkpoint). An adapter's dW is `peft_methods.delta_weight(layer)` in fp32 (never
merged; PiSSA's dW is against the original W0). Outputs under --out: config.json,
<label>/metrics.json, summary.json, correlations.{json,csv,md}, spectral_profiles.png, erank_layers.png.

Module sets: "paper" = layer 18 mlp.down_proj of 28 layers; "paper8" = layers 9, 18 x {q,k,v,down}.
On L layers the paper's layer l is round(l * L / 28) (toy, L = 4: layers 1 and 3).
Shapes: W is (m, n) (y = W x); k = min(m, n); N token rows; D activation width; K PCA rank.

Deviations from the paper / release (one line each)
1. Retention profile uses u_i^T dW v_i (== u_i^T W_ft v_i - sigma_i exactly; no fp32 SVD noise floor).
2. PCA subspaces by exact SVD, not the randomised torch.pca_lowrank.
3. Activations kept in fp32 on the host (release fp16), capped at --max-tokens rows per distribution.
4. Activation metrics averaged over the activation modules: one point per checkpoint.
5. Global norms sum decoder Linear weights only (no embeddings, norms, biases).
6. W0 is the base loaded once in the forward dtype, upcast to fp32 (release: fp32 merged copy).
Notes: N1 angle = 2 asin(||z1 - z0|| / 2) (arccos loses ~3e-4 rad near cos = 1 in fp32);
N2 the toy's "paper" module is layer round(18 * 4 / 28) = 3, inside the paper8 analogue.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import random
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import loading
import peft_methods
import toy_world

EPS = 1e-12          # the release's epsilon in every ratio ([PA-W], [PA-CSD])
PAPER_NUM_LAYERS = 28  # Qwen2.5-7B and Llama-3.2-3B both have 28 decoder layers
PAPER8_LAYERS = (9, 18)
PAPER_LAYER = 18     # CSD and spectral module: layer 18 mlp.down_proj
PAPER8_SUFFIXES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.down_proj")
PROMPT_KEYS = ("prompt", "input", "question", "query", "problem", "instruction", "text")


# -----------------------------------------------------------------------------
# Weight space [PA-W]
#
# The question: does an update dW = W_ft - W0 spend its energy along the directions W0 already
# uses most (large sigma_i), or spread it thinly along the whole spectrum? Write W0 = U Sigma V^T.
# Two profiles over the singular index i answer it:
#   retention  dP_diag(i) = |u_i^T dW v_i|  how much the i-th singular "gain" of W0 changed;
#   adaptation E_dW(i)    = ||dW v_i||      how much the update acts on the i-th input direction.
# Their spikiness (fluctuation score) and the stable rank of dW summarise a method: LoRA's
# low-rank update gives a small erank and a smooth retention profile; OFT keeps Sigma exactly and
# only turns the singular vectors (see `spectral_profiles` and `sva`).

def thin_svd(W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD W = U diag(S) Vh in fp32: U (m, k), S (k,) descending, Vh (k, n), k = min(m, n)."""
    return torch.linalg.svd(W.float(), full_matrices=False)


def spectral_profiles(W0: torch.Tensor, dW: torch.Tensor, svd=None) -> dict:
    """Retention and adaptation profiles of an update dW along W0's singular directions.

    [PA-W] W0 = U Sigma V^T;  P_diag(i) = u_i^T W_ft v_i;  dP_diag(i) = |P_diag(i) - sigma_i|;
               E_dW(i) = ||dW v_i||_2  (update energy along the i-th input direction).
    Returns tensors of shape (k,): sigma, P_diag, dP_diag, E_delta.

    OFT (W_ft = W0 R^T, R block-diagonal orthogonal): the singular values are kept exactly, since
    W0 R^T = U Sigma (R V)^T, so the right singular vectors become v_i^ft = R v_i. The retention
    profile is then NOT zero: dP_diag(i) = sigma_i |v_i^T R v_i - 1| = sigma_i (1 - cos theta_i),
    where theta_i is the angle by which R turns v_i. It is second order in the rotation (v^T Q v = 0
    for a skew generator Q), so small for small rotations, and it measures the turning of the
    singular vectors, not a change of the spectrum. Where sigma_i is simple and v_i^T R v_i >= 0,
    it equals sigma_i (1 - SVA_i) with SVA_i = |<v_i, v_i^ft>| (see `sva`).
    """
    W0, dW = W0.float(), dW.float()
    U, S, Vh = thin_svd(W0) if svd is None else svd               # (m,k), (k,), (k,n)
    # DEVIATION 1: u_i^T W_ft v_i - sigma_i == u_i^T dW v_i exactly; we never subtract sigma_i,
    # so the fp32 SVD error of W0 does not leak into the profile.
    UtdW = U.T @ dW                                                # (k,m) @ (m,n) -> (k,n)
    diag = (UtdW * Vh).sum(dim=1)                                  # (k,): u_i^T dW v_i
    E = (dW @ Vh.T).norm(dim=0)                                    # (m,n) @ (n,k) -> (m,k) -> (k,)
    return {"sigma": S, "P_diag": S + diag, "dP_diag": diag.abs(), "E_delta": E}


def spectral_profiles_reference(W0: torch.Tensor, W_ft: torch.Tensor) -> dict:
    """Plain, literal version of `spectral_profiles` (one singular triplet at a time, subtracting
    sigma_i as the release does). For tests; O(k) matrix-vector products."""
    W0, W_ft = W0.float(), W_ft.float()
    U, S, Vh = thin_svd(W0)
    dW = W_ft - W0
    P = torch.stack([U[:, i] @ (W_ft @ Vh[i]) for i in range(S.numel())])   # (k,): u_i^T W_ft v_i
    E = torch.stack([(dW @ Vh[i]).norm() for i in range(S.numel())])        # (k,): ||dW v_i||
    return {"sigma": S, "P_diag": P, "dP_diag": (P - S).abs(), "E_delta": E}


def stable_rank(dW: torch.Tensor, top: int = 5) -> dict:
    """[PA-W] erank(dW) = ||dW||_F^2 / ||dW||_2^2 = sum_j s_j^2 / s_1^2 (0 if s_1 = 0).

    The "effective rank" of the paper's figure is this stable rank: it is <= rank(dW) and equals r
    for r equal singular values. Also returns the top-`top` singular values of dW.
    """
    s = torch.linalg.svdvals(dW.float())                           # (k,) descending
    s1 = float(s[0]) if s.numel() else 0.0
    erank = float((s.double() ** 2).sum() / s1 ** 2) if s1 > 0 else 0.0
    return {"erank": erank, "top_singular_values": s[:top].tolist()}


def fluctuation_score(x: torch.Tensor, window: int = 5) -> float:
    """[PA-W] F(x) = (1/k) sum_i |x_i - m_i|, m = conv1d(reflect_pad(x), ones(w)/w).

    Higher = spikier profile. Applied to the RAW dP_diag and E_delta (not the plot-normalised
    curves). 0 if k < w (the release's convention; reflect padding needs k > w // 2 anyway).
    """
    x = x.detach().float().flatten()
    k = x.numel()
    if k < window:
        return 0.0
    half = window // 2
    # reflect (not replicate) padding: the edge value is not repeated, as np.pad(mode="reflect").
    xp = F.pad(x.view(1, 1, k), (half, window - 1 - half), mode="reflect")   # (1,1,k+w-1)
    m = F.conv1d(xp, torch.full((1, 1, window), 1.0 / window, dtype=x.dtype, device=x.device))
    return float((x - m.view(k)).abs().mean())


def sva(W0: torch.Tensor, W_ft: torch.Tensor, svd0=None) -> dict:
    """[PA-W] Singular-vector alignment (the paper reports it for OFT only).

    cos_i = |<v_i^pre, v_i^ft>| / (||v_i^pre|| ||v_i^ft|| + 1e-10), index by index (no matching of
    singular values), v = right singular vectors. Returns cos (k,), mean, min.
    Caveat: for (nearly) repeated singular values the vectors are not unique and cos_i is noisy.
    """
    _, _, Vh0 = thin_svd(W0) if svd0 is None else svd0            # (k,n)
    _, _, Vh1 = thin_svd(W_ft)                                     # (k,n)
    cos = (Vh0 * Vh1).sum(1).abs() / (Vh0.norm(dim=1) * Vh1.norm(dim=1) + 1e-10)   # (k,)
    return {"cos": cos, "mean": float(cos.mean()), "min": float(cos.min())}


def weight_norms(dW: torch.Tensor, W0: torch.Tensor) -> dict:
    """[PA-W, compare_model_norms.py] L1, L2 (flattened = Frobenius), relative ||dW|| / (||W0|| +
    1e-12) for both, mean |dW| and RMSE. Sums accumulate in fp64 (68M entries on Qwen down_proj)."""
    dW, W0 = dW.float(), W0.float()
    numel = dW.numel()
    l1 = float(dW.abs().sum(dtype=torch.float64))
    l2 = math.sqrt(float(dW.square().sum(dtype=torch.float64)))
    w_l1 = float(W0.abs().sum(dtype=torch.float64))
    w_l2 = math.sqrt(float(W0.square().sum(dtype=torch.float64)))
    return {"l1": l1, "l2": l2, "rel_l1": l1 / (w_l1 + EPS), "rel_l2": l2 / (w_l2 + EPS),
            "mean_abs": l1 / numel, "rmse": l2 / math.sqrt(numel)}


def global_norms(per_module: list[dict]) -> dict:
    """[PA-W, compare_model_norms.py] global L1 = sum of L1s, global L2 = sqrt(sum of L2^2)."""
    return {"l1": float(sum(d["l1"] for d in per_module)),
            "l2": float(math.sqrt(sum(d["l2"] ** 2 for d in per_module)))}


def weight_space_metrics(W0: torch.Tensor, dW: torch.Tensor, *, with_sva: bool = False,
                         window: int = 5, top: int = 5, svd0=None) -> dict:
    """All [PA-W] quantities of one module: profiles (k,), fluctuation scores, stable rank, norms, SVA.
    svd0: a cached thin_svd(W0) (the same for every checkpoint of one base)."""
    W0, dW = W0.float(), dW.float()
    svd0 = thin_svd(W0) if svd0 is None else svd0
    prof = spectral_profiles(W0, dW, svd0)
    out = {"shape": list(W0.shape), "sigma": prof["sigma"].tolist(), "dP_diag": prof["dP_diag"].tolist(),
           "E_delta": prof["E_delta"].tolist(),
           # release names: smoothness_retention / smoothness_adaptation
           "fluct_retention": fluctuation_score(prof["dP_diag"], window),
           "fluct_adaptation": fluctuation_score(prof["E_delta"], window),
           **stable_rank(dW, top), "norms": weight_norms(dW, W0)}
    if with_sva:
        s = sva(W0, W0 + dW, svd0)
        out["sva_mean"], out["sva_min"] = s["mean"], s["min"]
        # the spectrum is what OFT should keep: report its largest relative change as a check
        s_ft = torch.linalg.svdvals(W0 + dW)
        out["sigma_max_rel_change"] = float(((s_ft - svd0[1]).abs() / (svd0[1][0] + EPS)).max())
    return out


# -----------------------------------------------------------------------------
# Capability-conditioned drift [PA-CSD]

def csd_metrics(dW: torch.Tensor, W0: torch.Tensor, h: torch.Tensor, chunk_rows: int = 1024) -> dict:
    """[PA-CSD] Capability-conditioned drift of one distribution, E over its token rows h (N, n)
    (the inputs of the module in the BASE model), eps = 1e-12:
        CSD_abs = E||dW h||^2;   CSD_rel = E||dW h||^2 / (E||W0 h||^2 + eps);
        CSD_un  = E||dW h||^2 / ((||dW||_F^2 + eps)(E||h||^2 + eps))   (release name: update_norm).
    rel asks "how big is the update next to the weight it edits, on these inputs"; un factors out
    the update's size and the inputs' scale, leaving only how well dW's row space lines up with
    where the data lives. No bias: CSD is about the weight.
    Streams `chunk_rows` rows at a time so the (N, m) products never exist whole (4096 x 18944 on
    Qwen down_proj would be 310 MB each); the sums are fp64 scalars."""
    n, dWh2, W0h2, h2 = 0, 0.0, 0.0, 0.0
    for i in range(0, h.shape[0], chunk_rows):
        hc = h[i:i + chunk_rows].to(device=dW.device, dtype=torch.float32)      # (N',n)
        n += hc.shape[0]
        dWh2 += float((hc @ dW.float().T).square().sum(dtype=torch.float64))    # (N',n)@(n,m)
        W0h2 += float((hc @ W0.float().T).square().sum(dtype=torch.float64))
        h2 += float(hc.square().sum(dtype=torch.float64))
    dW_fro2 = float(dW.float().square().sum(dtype=torch.float64))
    N = max(n, 1)
    e_dwh, e_w0h, e_h = dWh2 / N, W0h2 / N, h2 / N
    return {"abs": e_dwh, "rel": e_dwh / (e_w0h + EPS), "un": e_dwh / ((dW_fro2 + EPS) * (e_h + EPS)),
            "n_tokens": n}


def csd_ratios(general: dict, target: dict) -> dict:
    """[PA-CSD] ratio = CSD_G / (CSD_T + eps) for rel and un (abs added for completeness)."""
    return {f"ratio_{k}": general[k] / (target[k] + EPS) for k in ("abs", "rel", "un")}


# -----------------------------------------------------------------------------
# Activation geometry [PA-ACT]; X0 = base, X1 = finetuned outputs on the same tokens
#
# Each metric compares the two (N, D) clouds row by row (same token in both) and is blind to a
# different kind of change:
#   cosine / norm drift   each token's direction / length            (per row, local);
#   Gram distortion       the cosines between tokens                 (blind to any rotation);
#   Procrustes residual   what is left after the best rotation       (0 = isometric drift);
#   linear CKA            similarity of the centred clouds            (blind to rotation + scale);
#   PCA subspace distance whether the top-K principal directions moved.
# The paper's finding: forgetting goes with NON-isometric change (Procrustes, Gram up; CKA down),
# not with rotation as such (see [PA-T]).

def _pair(X0: torch.Tensor, X1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncate to a common row count n and cast to fp32 (paper: 'truncated to a common n')."""
    n = min(X0.shape[0], X1.shape[0])
    return X0[:n].float(), X1[:n].float()


def cosine_drift(X0: torch.Tensor, X1: torch.Tensor) -> dict:
    """[PA-ACT] z = x/||x||; cos_t = clamp(<z0_t, z1_t>, -1, 1); mean cos, mean(1 - cos),
    mean and median angle (radians)."""
    X0, X1 = _pair(X0, X1)
    Z0 = X0 / X0.norm(dim=1, keepdim=True).clamp_min(EPS)          # (N,D)
    Z1 = X1 / X1.norm(dim=1, keepdim=True).clamp_min(EPS)          # (N,D)
    cos = (Z0 * Z1).sum(1).clamp(-1.0, 1.0)                        # (N,)
    # NOTE N1: angle = 2 asin(||z1 - z0|| / 2), exact for unit vectors and stable near 0.
    ang = 2 * torch.asin(((Z1 - Z0).norm(dim=1) / 2).clamp(0.0, 1.0))   # (N,)
    return {"cos_mean": float(cos.mean()), "cos_drift": float((1 - cos).mean()),
            "angle_mean": float(ang.mean()), "angle_median": float(ang.quantile(0.5))}


def norm_drift(X0: torch.Tensor, X1: torch.Tensor) -> dict:
    """[PA-ACT] rho_t = ||x1_t|| / (||x0_t|| + 1e-12); mean |log(rho + 1e-12)|, mean rho,
    population std of rho."""
    X0, X1 = _pair(X0, X1)
    rho = X1.norm(dim=1) / (X0.norm(dim=1) + EPS)                  # (N,)
    return {"norm_logratio": float(torch.log(rho + EPS).abs().mean()),
            "norm_ratio_mean": float(rho.mean()), "norm_ratio_std": float(rho.std(correction=0))}


def gram_distortion(X0: torch.Tensor, X1: torch.Tensor, max_rows: int = 1024, seed: int = 0) -> float:
    """[PA-ACT] K = Z Z^T (uncentred, rows normalised: the cosines between tokens) on <= max_rows
    rows (numpy default_rng(seed), no replacement, sorted); d_gram = ||K1 - K0||_F / (||K0||_F + eps).
    Invariant to any rotation of the features: it sees only how tokens sit relative to each other."""
    X0, X1 = _pair(X0, X1)
    n = X0.shape[0]
    rows = np.arange(n) if n <= max_rows else np.sort(
        np.random.default_rng(seed).choice(n, size=max_rows, replace=False))
    idx = torch.as_tensor(rows, device=X0.device)
    Z0 = X0[idx] / X0[idx].norm(dim=1, keepdim=True).clamp_min(EPS)    # (r,D)
    Z1 = X1[idx] / X1[idx].norm(dim=1, keepdim=True).clamp_min(EPS)    # (r,D)
    K0, K1 = Z0 @ Z0.T, Z1 @ Z1.T                                       # (r,r)
    return float((K1 - K0).norm() / (K0.norm() + EPS))


def procrustes_residuals(X0: torch.Tensor, X1: torch.Tensor) -> dict:
    """[PA-ACT] Column-centre X~ = X - mean_rows(X);  d_raw = ||X~1 - X~0||_F / (||X~0||_F + eps);
    SVD X~1^T X~0 = U S V^T, R* = U V^T = argmin_{R orthogonal} ||X~1 R - X~0||_F;
    d_proc = ||X~1 R* - X~0||_F / (||X~0||_F + eps);  improvement = d_raw - d_proc.
    d_proc ~ 0 means the finetuned features are a rotation of the base features (isometric drift)."""
    X0, X1 = _pair(X0, X1)
    C0, C1 = X0 - X0.mean(0), X1 - X1.mean(0)                      # (N,D) each
    denom = C0.norm() + EPS
    d_raw = float((C1 - C0).norm() / denom)
    U, _, Vh = torch.linalg.svd(C1.T @ C0)                         # (D,N)@(N,D) -> (D,D)
    R = U @ Vh                                                     # (D,D) orthogonal
    d_proc = float((C1 @ R - C0).norm() / denom)
    return {"raw_residual": d_raw, "proc_residual": d_proc, "proc_improvement": d_raw - d_proc}


def linear_cka(X0: torch.Tensor, X1: torch.Tensor) -> float:
    """[PA-ACT] CKA = ||X~0^T X~1||_F^2 / (||X~0^T X~0||_F ||X~1^T X~1||_F + eps), centred X~.
    (Feature-space form of HSIC(K,L)/sqrt(HSIC(K,K) HSIC(L,L)) with linear kernels; a test checks
    it against the HSIC formula on n x n Gram matrices.)"""
    X0, X1 = _pair(X0, X1)
    C0, C1 = X0 - X0.mean(0), X1 - X1.mean(0)                      # (N,D0), (N,D1)
    num = (C0.T @ C1).norm() ** 2                                  # (D0,N)@(N,D1)
    return float(num / ((C0.T @ C0).norm() * (C1.T @ C1).norm() + EPS))


def _top_right_vectors(C: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k right singular vectors of C (N, D) as columns (D, k), by an exact SVD (Deviation 2)."""
    # DEVIATION 2: exact SVD where the release uses the randomised torch.pca_lowrank.
    _, _, Vh = torch.linalg.svd(C, full_matrices=False)            # (min(N,D), D)
    return Vh[:k].T                                                # (D,k)


def pca_subspace_distances(X0: torch.Tensor, X1: torch.Tensor, ks) -> dict:
    """[PA-ACT] k_eff = min(k, n - 1, D); V_i = top-k_eff right singular vectors of X~_i (the
    principal directions); d_sub = ||V0 V0^T - V1 V1^T||_F / sqrt(2 k_eff + eps) in [0, 1]
    (0: same subspace, 1: orthogonal). Returns {k: (distance, k_eff)}; nan when k_eff < 1.
    Fast path (reference: `pca_subspace_distance_reference`, with the (D, D) projectors): one SVD
    per side serves every k (the top-k vectors are the first k of the top-k_max), and
    ||P0 - P1||_F^2 = 2 ||(I - P0) V1||_F^2 for two rank-K projectors: the residual
    V1 - V0 (V0^T V1) has no cancellation near 0 (unlike 2K - 2 ||V0^T V1||_F^2)."""
    X0, X1 = _pair(X0, X1)
    k_max = min(max(ks), X0.shape[0] - 1, X0.shape[1], X1.shape[1]) if ks else 0
    if k_max >= 1:
        V0 = _top_right_vectors(X0 - X0.mean(0), k_max)              # (D,k_max)
        V1 = _top_right_vectors(X1 - X1.mean(0), k_max)              # (D,k_max)
    out = {}
    for k in ks:
        k_eff = min(k, k_max)
        if k_eff < 1:
            out[k] = (float("nan"), k_eff)
            continue
        A, B = V0[:, :k_eff], V1[:, :k_eff]
        resid = B - A @ (A.T @ B)                                     # (D,K)
        out[k] = (float(math.sqrt(2.0) * resid.norm() / math.sqrt(2 * k_eff + EPS)), k_eff)
    return out


def pca_subspace_distance(X0: torch.Tensor, X1: torch.Tensor, k: int) -> dict:
    """{dist, k_eff} of `pca_subspace_distances` for one k."""
    dist, k_eff = pca_subspace_distances(X0, X1, [k])[k]
    return {"dist": dist, "k_eff": k_eff}


def pca_subspace_distance_reference(X0: torch.Tensor, X1: torch.Tensor, k: int) -> float:
    """Literal version with the (D, D) projectors, for tests."""
    X0, X1 = _pair(X0, X1)
    k_eff = min(k, X0.shape[0] - 1, X0.shape[1])
    V0 = _top_right_vectors(X0 - X0.mean(0), k_eff)
    V1 = _top_right_vectors(X1 - X1.mean(0), k_eff)
    return float((V0 @ V0.T - V1 @ V1.T).norm() / math.sqrt(2 * k_eff + EPS))


def activation_geometry(X0: torch.Tensor, X1: torch.Tensor, *, gram_max_rows: int = 1024,
                        seed: int = 0, pca_ks=(32, 64)) -> dict:
    """All [PA-ACT] metrics for one module's outputs X0 (base) and X1 (finetuned), rows = same tokens."""
    X0, X1 = _pair(X0, X1)
    out = {"n_rows": X0.shape[0], "width": X0.shape[1]}
    out.update(cosine_drift(X0, X1))
    out.update(norm_drift(X0, X1))
    out["gram_distortion"] = gram_distortion(X0, X1, gram_max_rows, seed)
    out.update(procrustes_residuals(X0, X1))
    out["cka"] = linear_cka(X0, X1)
    for k, (dist, k_eff) in pca_subspace_distances(X0, X1, pca_ks).items():
        out[f"pca_k{k}_eff"] = k_eff
        out[f"pca_dist_k{k}"] = dist
    return out


# -----------------------------------------------------------------------------
# Correlations [PA-T], hand-written; tests compare with scipy.stats
#
# One point per checkpoint: (metric, forgetting) or, for CSD_T, (metric, target gain). With a
# handful of checkpoints the Spearman rho (rank order only) is the sturdier of the two numbers.

def pearson(x, y) -> float:
    """Pearson r in fp64; nan for fewer than 2 points or a constant input (as scipy)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"pearson: need two 1-D arrays of equal length, got {x.shape} and {y.shape}")
    if x.size < 2:
        return float("nan")
    xc, yc = x - x.mean(), y - y.mean()
    den = math.sqrt(float((xc * xc).sum()) * float((yc * yc).sum()))
    if den == 0.0:
        return float("nan")
    return float(np.clip((xc * yc).sum() / den, -1.0, 1.0))


def rankdata(a) -> np.ndarray:
    """Ranks 1..n with ties given their average rank (scipy.stats.rankdata 'average'): a run of
    equal sorted values at positions i..j gets (i + j) / 2 + 1."""
    a = np.asarray(a, dtype=np.float64)
    order = np.argsort(a, kind="mergesort")
    s = a[order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]]) if a.size else np.zeros(0, dtype=np.int64)
    ends = np.r_[starts[1:], a.size] - 1
    ranks = np.empty(a.size, dtype=np.float64)
    ranks[order] = np.repeat(0.5 * (starts + ends) + 1.0, ends - starts + 1)
    return ranks


def spearman(x, y) -> float:
    """Spearman rho = Pearson r of the (tie-averaged) ranks."""
    return pearson(rankdata(x), rankdata(y))


# [PA-T] metric key in summary rows, display name, correlated with, paper Pearson / Spearman
CORRELATION_ROWS = [
    ("csd_G_rel", "CSD_G,rel", "forgetting", 0.347, 0.317),
    ("csd_G_un", "CSD_G,un", "forgetting", 0.481, 0.603),
    ("csd_T_rel", "CSD_T,rel", "target_gain", -0.164, 0.107),
    ("act_proc_residual", "Procrustes residual", "forgetting", 0.711, 0.568),
    ("act_gram_distortion", "Gram distortion", "forgetting", 0.485, 0.361),
    ("act_cka", "CKA", "forgetting", -0.761, -0.711),
] + [(key, name, vs, None, None) for key, name, vs in (   # beyond the paper's tables (no paper value)
    ("csd_G_abs", "CSD_G,abs", "forgetting"), ("csd_T_un", "CSD_T,un", "target_gain"),
    ("csd_ratio_rel", "CSD ratio G/T (rel)", "forgetting"),
    ("csd_ratio_un", "CSD ratio G/T (un)", "forgetting"), ("act_raw_residual", "Raw residual", "forgetting"),
    ("act_proc_improvement", "Procrustes improvement", "forgetting"),
    ("act_cos_drift", "Cosine drift 1-cos", "forgetting"), ("act_angle_mean", "Mean angle (rad)", "forgetting"),
    ("act_norm_logratio", "Norm drift mean abs log rho", "forgetting"),
    ("act_pca_dist_k32", "PCA subspace dist k32", "forgetting"),
    ("act_pca_dist_k64", "PCA subspace dist k64", "forgetting"), ("w_erank", "erank(dW)", "forgetting"),
    ("w_fluct_retention", "Retention fluctuation", "forgetting"),
    ("w_fluct_adaptation", "Adaptation fluctuation", "forgetting"),
    ("w_rel_l2", "‖dW‖_F / ‖W0‖_F", "forgetting"), ("global_l2", "global ‖dW‖_2", "forgetting"))]


def correlation_table(rows: list[dict], spec=CORRELATION_ROWS) -> list[dict]:
    """Pearson/Spearman of each metric with forgetting (CSD_T with target gain) across checkpoints.

    rows: one flat dict per checkpoint (`summary_row`). A checkpoint enters a metric's correlation
    only if it has both the metric and the score; n says how many did.
    """
    table = []
    for key, name, vs, paper_p, paper_s in spec:
        pts = [(r[key], r[vs]) for r in rows if r.get(key) is not None and r.get(vs) is not None
               and math.isfinite(r[key]) and math.isfinite(r[vs])]
        x, y = [p[0] for p in pts], [p[1] for p in pts]
        table.append({"metric": key, "name": name, "vs": vs, "n": len(pts),
                      "pearson": pearson(x, y) if len(pts) >= 3 else float("nan"),
                      "spearman": spearman(x, y) if len(pts) >= 3 else float("nan"),
                      "paper_pearson": paper_p, "paper_spearman": paper_s})
    return table


# -----------------------------------------------------------------------------
# Prompts, module names, activation collection (needs a model; runs on CPU or GPU)

def read_prompts(path: str | Path) -> list[str]:
    """Prompts from .txt (one per non-empty line), .jsonl (one JSON object or string per line) or
    .json (a list of them). An object's prompt is its first non-empty string value among
    PROMPT_KEYS (the release's order). Not loading.read_records: plain strings are allowed here."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist")
    text, suffix = path.read_text(encoding="utf-8"), path.suffix.lower()
    if suffix in (".txt", ""):
        items = [(line, None) for line in text.splitlines() if line.strip()]
    elif suffix not in (".json", ".jsonl"):
        raise ValueError(f"prompt file {path}: unknown extension {suffix!r} (use .txt, .jsonl or .json)")
    else:
        lines = ([(i, line) for i, line in enumerate(text.splitlines(), 1) if line.strip()]
                 if suffix == ".jsonl" else [(None, text)])
        items = []
        for lineno, line in lines:
            try:
                data = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno or err.lineno}: not valid JSON ({err.msg})") from err
            if suffix == ".json" and not isinstance(data, list):
                raise ValueError(f"{path}: expected a JSON list of prompts/objects, got {type(data).__name__}")
            items += ([(obj, f"{path}[{i}]") for i, obj in enumerate(data)] if suffix == ".json"
                      else [(data, f"{path}:{lineno}")])
    prompts = []
    for obj, where in items:
        if not isinstance(obj, (str, dict)):
            raise ValueError(f"{where}: expected a JSON object or string, got {type(obj).__name__}")
        hit = obj if isinstance(obj, str) else next(
            (obj[k] for k in PROMPT_KEYS if isinstance(obj.get(k), str) and obj[k].strip()), None)
        if hit is None:
            raise ValueError(f"{where}: object has none of the keys {PROMPT_KEYS} with a non-empty "
                             f"string value (its keys: {sorted(obj)[:12]})")
        prompts.append(hit)
    if not prompts:
        raise ValueError(f"prompt file {path} holds no prompts")
    return prompts


def sample_prompts(prompts: list[str], max_prompts: int, seed: int = 0) -> list[str]:
    """[PA-CSD] <= max_prompts sampled without replacement by random.Random(seed), indices sorted."""
    if len(prompts) <= max_prompts:
        return list(prompts)
    idx = sorted(random.Random(seed).sample(range(len(prompts)), max_prompts))
    return [prompts[i] for i in idx]


def paper_layer(layer: int, num_layers: int) -> int:
    """The paper's layer index (of 28) mapped proportionally onto a model with num_layers layers."""
    return min(num_layers - 1, int(round(layer * num_layers / PAPER_NUM_LAYERS)))


def decoder_layout(model) -> tuple[str, int]:
    """(prefix of the decoder layer list, number of layers), e.g. ('model.layers', 28): the
    '<prefix>.layers.<i>' list with the most entries."""
    found = {}
    for name, _ in model.named_modules():
        m = re.match(r"^(?P<prefix>(?:.*\.)?layers)\.(?P<i>\d+)$", name)
        if m:
            found.setdefault(m["prefix"], set()).add(int(m["i"]))
    if not found:
        raise ValueError(f"cannot find a '<prefix>.layers.<i>' decoder layer list in {type(model).__name__}")
    prefix = max(found, key=lambda p: len(found[p]))
    return prefix, max(found[prefix]) + 1


def resolve_modules(model, spec: str) -> list[str]:
    """Module names for a spec: 'paper' (layer-18 down_proj analogue), 'paper8', 'all-down_proj',
    'none', or a comma list of full module names (each must be an nn.Linear of `model`)."""
    prefix, L = decoder_layout(model)
    sets = {"none": [],   # NOTE N2: "paper" is layer round(18 L / 28) (toy: 3), not "the middle"
            "paper": [f"{prefix}.{paper_layer(PAPER_LAYER, L)}.mlp.down_proj"],
            "paper8": [f"{prefix}.{paper_layer(l, L)}.{s}" for l in PAPER8_LAYERS for s in PAPER8_SUFFIXES],
            "all-down_proj": [f"{prefix}.{i}.mlp.down_proj" for i in range(L)]}
    names = [n for tok in spec.split(",") if tok.strip() for n in sets.get(tok.strip(), [tok.strip()])]
    modules = dict(model.named_modules())
    for name in names:
        mod = modules.get(name)
        if not isinstance(mod, torch.nn.Linear):
            near = [n for n in modules if n.endswith(name.split(".")[-1])][:4]
            raise ValueError(f"module {name!r} (from {spec!r}) is not an nn.Linear of the base model "
                             f"({type(mod).__name__ if mod is not None else 'missing'}); e.g. {near}")
    return list(dict.fromkeys(names))    # de-duplicated, order kept


@torch.inference_mode()
def collect_activations(model, tokenizer, prompts: list[str], taps: list[tuple[str, str]], *,
                        max_tokens: int = 4096, max_length: int = 1024) -> dict:
    """Token-row activations of modules during full forward passes, streamed and capped.

    taps: (module name, "input" | "output"). [PA-CSD] raw text, no chat template,
    add_special_tokens=True, truncation to max_length, batch 1 (no padding, so every row is a real
    token); prompts in the given order until max_tokens rows. Rows are moved to the host in fp32 as
    they come (the model may run in bf16 on GPU), and only the capped count is ever kept.
    Returns {(name, kind): Tensor (N, D)} with N <= max_tokens and the number of prompts used
    under the key "n_prompts".
    """
    device = next(model.parameters()).device
    store = {tap: [] for tap in taps}
    state = {"need": 0}
    handles = []
    for name, kind in taps:
        if kind not in ("input", "output"):
            raise ValueError(f"tap kind {kind!r} for {name} must be 'input' or 'output'")
        mod = model.get_submodule(name)

        def hook(_mod, args, out, key=(name, kind)):
            x = args[0] if key[1] == "input" else out
            rows = x.reshape(-1, x.shape[-1])[: state["need"]]      # (1,T,D) -> (T,D), capped
            # DEVIATION 3: fp32 host copy (release: fp16); exact for bf16/fp16 activations
            store[key].append(rows.detach().to("cpu", torch.float32))
        handles.append(mod.register_forward_hook(hook))
    n_rows, n_prompts = 0, 0
    try:
        for text in prompts:
            if n_rows >= max_tokens:
                break
            ids = tokenizer(text, add_special_tokens=True, truncation=True, max_length=max_length,
                            return_tensors="pt")["input_ids"].to(device)                 # (1,T)
            if ids.shape[1] == 0:
                continue
            state["need"] = max_tokens - n_rows
            model(input_ids=ids, use_cache=False)
            n_rows += min(ids.shape[1], state["need"])
            n_prompts += 1
    finally:
        for h in handles:
            h.remove()
    out = {tap: (torch.cat(v) if v else torch.empty(0)) for tap, v in store.items()}
    out["n_prompts"] = n_prompts
    return out


# -----------------------------------------------------------------------------
# Checkpoints and dense updates

_NOTED: set[str] = set()   # run dirs already reported (main checks every --checkpoint before loading)


def read_checkpoint_info(ckpt: str | Path) -> dict:
    """{'kind': 'adapter'|'hf', 'method', 'config', 'path'} of a checkpoint dir: an adapter dir
    (ours or HF PEFT), a full HF model dir, or a training run dir (global_step_<k>/ or TRL's
    checkpoint-<k>/), of which the last checkpoint is measured (peft_methods.run_checkpoints)."""
    ckpt = Path(ckpt)
    steps = ([] if peft_methods.find_adapter_dir(ckpt) is not None or (ckpt / "config.json").is_file()
             or not ckpt.is_dir() else peft_methods.run_checkpoints(ckpt))
    if steps:
        if str(ckpt) not in _NOTED:
            _NOTED.add(str(ckpt))
            print(f"[geometry] {ckpt} is a training run: measuring its last checkpoint {steps[-1][1].name}")
        ckpt = steps[-1][1]
    if peft_methods.find_adapter_dir(ckpt) is not None:
        cfg = peft_methods.read_adapter_config(ckpt)
        return {"kind": "adapter", "method": str(cfg.get("method", "unknown")), "config": cfg, "path": ckpt}
    if (ckpt / "config.json").is_file():
        return {"kind": "hf", "method": "full", "config": {}, "path": ckpt}
    raise FileNotFoundError(f"--checkpoint {ckpt}: neither adapter_config.json (peft_methods.py or HF PEFT "
                            "checkpoint) nor config.json (full HF model) nor checkpoint dirs "
                            "(global_step_<k>/, checkpoint-<k>/) found")


def load_finetuned(base_spec: str, ckpt: str | Path, *, dtype, device):
    """(model, info, adapters): the base with the adapter loaded (peft_methods.load_adapter), or the
    full HF model of the checkpoint (no adapters)."""
    info = read_checkpoint_info(ckpt)
    if info["kind"] != "adapter":
        return loading.load_model(str(info["path"]), dtype=dtype, device=device)[0], info, {}
    model, _ = loading.load_model(base_spec, dtype=dtype, device=device)
    wanted = info["config"].get("base_model")
    if wanted and str(wanted) != str(base_spec):
        print(f"[geometry] note: {info['path']} was trained on base {wanted!r}; measuring against "
              f"--base {base_spec!r}")
    peft_methods.load_adapter(model, str(info["path"]))
    return model, info, peft_methods.adapter_layers(model)


def _find_adapter(adapters: dict, name: str):
    """The wrapper of module `name` (keys may carry a prefix), or None."""
    hits = [k for k in adapters if k.endswith("." + name) or name.endswith("." + k)]
    return adapters[name] if name in adapters else adapters[hits[0]] if len(hits) == 1 else None


def module_update(base_model, ft_model, adapters: dict, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(W0, dW) of one Linear, both fp32 on the model's device. Adapter-wrapped module: dW =
    peft_methods.delta_weight(wrapper) (exact; PiSSA vs the original W0); otherwise W_ft - W0
    (full FT, or a module the adapter did not touch: dW = 0)."""
    W0 = base_model.get_submodule(name).weight.detach().float()             # (m,n)
    layer = _find_adapter(adapters, name)
    if layer is not None:
        dW = peft_methods.delta_weight(layer).detach().to(W0.device, torch.float32)   # (m,n)
    else:
        mod = ft_model.get_submodule(name)
        if not hasattr(mod, "weight") or hasattr(mod, "base_layer"):
            raise RuntimeError(f"{name}: wrapped module not found in peft_methods.adapter_layers()")
        dW = mod.weight.detach().float().to(W0.device) - W0
    if dW.shape != W0.shape:
        raise RuntimeError(f"{name}: dW shape {tuple(dW.shape)} != W0 shape {tuple(W0.shape)}")
    return W0, dW


def merge_check(base_model, adapters: dict, name: str, dW: torch.Tensor) -> float | None:
    """max|merged_weight - (W0 + dW)| / max|W0|: a cheap consistency check of the two contract
    functions (catches e.g. a PiSSA residual base taken as W0). None for non-adapter modules."""
    layer = _find_adapter(adapters, name)
    if layer is None:
        return None
    W0 = base_model.get_submodule(name).weight.detach().float()
    W_ft = peft_methods.merged_weight(layer).detach().to(W0.device, torch.float32)
    return float((W_ft - W0 - dW).abs().max() / (W0.abs().max() + EPS))


# -----------------------------------------------------------------------------
# Per-checkpoint summary, scores, plots

SCORE_KEYS = ("target_score", "general_score", "forgetting")


def merge_results(spec, *, required: bool = True) -> dict:
    """{target_score, general_score, forgetting} merged from one checkpoint's evaluate.py results
    files: a path, "A.json,B.json" or a list (a real evaluation writes the target and the general
    suite to separate folders). A missing file (when `required`), bad JSON, or a score that two
    files give differently is an error naming the file(s)."""
    merged, source = {}, {}
    items = spec if isinstance(spec, (list, tuple)) else [spec]
    for path in [Path(p) for item in items for p in str(item).split(",") if p.strip()]:
        if not path.is_file():
            if required:
                raise FileNotFoundError(f"--results: {path} not found (an evaluate.py results.json)")
            continue
        try:
            r = json.loads(path.read_text())
        except ValueError as e:
            raise ValueError(f"--results: {path} is not valid JSON ({e})") from None
        for key in SCORE_KEYS if isinstance(r, dict) else ():
            if r.get(key) is None:
                continue
            v = float(r[key])
            if key in merged and not math.isclose(merged[key], v, abs_tol=1e-9):
                raise ValueError(f"--results: {key} is {merged[key]} in {source[key]} but {v} in {path}; "
                                 "give one file per suite of the same checkpoint")
            merged[key], source[key] = v, path
    return merged


def read_scores(results_path, base_results=None, *, required: bool = True) -> dict:
    """{target_score, general_score, forgetting, target_gain} (None where unknown) [PA-T].
    forgetting: the files' own value if present, else base general - general;
    target_gain = target - base target. required=False: a missing file means no scores."""
    out = {k: None for k in (*SCORE_KEYS, "target_gain")}
    if results_path is None:
        return out
    r = merge_results(results_path, required=required)
    b = merge_results(base_results) if base_results else {}
    out.update(target_score=r.get("target_score"), general_score=r.get("general_score"))
    if r.get("forgetting") is not None:
        out["forgetting"] = r["forgetting"]
    elif b.get("general_score") is not None and out["general_score"] is not None:
        out["forgetting"] = b["general_score"] - out["general_score"]
    if b.get("target_score") is not None and out["target_score"] is not None:
        out["target_gain"] = out["target_score"] - b["target_score"]
    return out


def summary_row(metrics: dict) -> dict:
    """One flat row of scalars per checkpoint (the correlation inputs): the first (paper) weight
    and CSD modules, and activation metrics averaged over the activation modules."""
    row = {"label": metrics["label"], "method": metrics["method"], **metrics.get("scores", {})}
    if metrics.get("weight"):
        w = next(iter(metrics["weight"].values()))                 # the primary (paper) module
        row.update(w_erank=w["erank"], w_fluct_retention=w["fluct_retention"],
                   w_fluct_adaptation=w["fluct_adaptation"], w_rel_l2=w["norms"]["rel_l2"],
                   w_l2=w["norms"]["l2"], w_sva_mean=w.get("sva_mean"))
    if metrics.get("global_norms"):
        row.update(global_l1=metrics["global_norms"]["l1"], global_l2=metrics["global_norms"]["l2"])
    if metrics.get("csd"):
        c = next(iter(metrics["csd"].values()))
        row.update({f"csd_{d}_{k}": c[d][k] for d in ("G", "T") if d in c for k in ("abs", "rel", "un")})
        row.update({f"csd_ratio_{k}": c[f"ratio_{k}"] for k in ("abs", "rel", "un") if f"ratio_{k}" in c})
    act = metrics.get("activation", {})
    if act:
        keys = ["proc_residual", "raw_residual", "proc_improvement", "gram_distortion", "cka",
                "cos_drift", "angle_mean", "norm_logratio"]
        keys += [k for k in next(iter(act.values())) if k.startswith("pca_dist_k")]
        for k in keys:   # DEVIATION 4: mean over the activation modules, one point per checkpoint
            row[f"act_{k}"] = float(np.mean([a[k] for a in act.values()]))
    return row


def _fmt(v, digits=3) -> str:
    """A table cell: "–" for missing/nan, scientific for very large or small, else fixed digits."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if isinstance(v, float) and (abs(v) >= 1e4 or (0 < abs(v) < 1e-2)):
        return f"{v:.2e}"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def write_correlations(rows: list[dict], out_dir: Path) -> list[dict] | None:
    """correlations.json/.csv/.md (atomic): the table beside the paper's values, and a
    per-checkpoint slice. Needs >= 3 checkpoints with a forgetting score."""
    with_scores = [r for r in rows if r.get("forgetting") is not None]
    if len(with_scores) < 3:
        print(f"[geometry] correlations skipped: {len(with_scores)} checkpoint(s) with a forgetting "
              "score (need >= 3; pass --results or put results.json in each checkpoint dir)")
        return None
    table = correlation_table(rows)
    loading.atomic_write_json(out_dir / "correlations.json", {"table": table, "rows": rows})
    loading.atomic_write_csv(out_dir / "correlations.csv", list(table[0]), table, lineterminator="\n")
    lines = ["| Metric | vs | n | Pearson | Spearman | Paper Pearson | Paper Spearman |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {t['name'].replace('|', '/')} | {t['vs']} | {t['n']} | {_fmt(t['pearson'])} | "
              f"{_fmt(t['spearman'])} | {_fmt(t['paper_pearson'])} | {_fmt(t['paper_spearman'])} |"
              for t in table]
    cols = [("act_proc_residual", "Proc ↓"), ("act_gram_distortion", "Gram ↓"), ("act_cka", "CKA ↑"),
            ("csd_G_rel", "CSD_G,rel"), ("csd_T_rel", "CSD_T,rel"), ("csd_ratio_rel", "Ratio"),
            ("w_erank", "erank"), ("forgetting", "Forget ↓"), ("target_gain", "Target gain")]
    lines += ["", "| Checkpoint | Method | " + " | ".join(c[1] for c in cols) + " |",
              "|---|---|" + "---|" * len(cols)]
    lines += [f"| {r['label']} | {r['method']} | " + " | ".join(_fmt(r.get(c[0]), 4) for c in cols) + " |"
              for r in rows]
    n = max((t["n"] for t in table), default=0)
    lines += ["", f"n = number of checkpoints with both values (at most {n}); with so few points "
              "the correlations are indicative only."]
    md = "\n".join(lines) + "\n"
    loading.atomic_write_text(out_dir / "correlations.md", md)
    print(md)
    return table


def _positive(a) -> np.ndarray:
    """Values for a log axis: zeros and negatives become nan (not drawn)."""
    a = np.asarray(a, dtype=np.float64)
    return np.where(a > 0, a, np.nan)


SPECTRAL_COLS = 5   # checkpoints per row of spectral_profiles.png: 14 + the legend cell fill 3 x 5


def _spectral_panels(w: dict, name: str) -> tuple:
    """(curve, colour, key, reference, reference key, title) of one checkpoint's retention and
    adaptation panels: each profile is drawn against the pretrained spectrum in its own normalisation."""
    sigma, E = np.asarray(w["sigma"]), np.asarray(w["E_delta"])
    return ((w["dP_diag"], "tab:red", "|ΔP_diag(i)|", sigma / sigma[0], "σ_i/σ_1 (W0)",
             f"{name}\nF_ret={w['fluct_retention']:.2e}"),
            (E / E.sum() if E.sum() > 0 else E, "tab:blue", "E_Δ(i)/Σ E_Δ", sigma / sigma.sum(),
             "σ_i/Σσ (W0)", f"F_ada={w['fluct_adaptation']:.2e}  erank={w['erank']:.1f}"))


def plot_spectral_profiles(plt, metrics_list: list[dict]):
    """[PA-W] figure: one cell per checkpoint, wrapped SPECTRAL_COLS to a row so it stays readable at
    README width; a cell is the retention profile dP_diag vs sigma_i/sigma_1 (top) over the adaptation
    profile E_i/sum E vs sigma_i/sum sigma (bottom; the release's normalisation), log y-axes.
    All retention panels share one y scale and all adaptation panels another, so checkpoints compare by
    eye; every panel shares the x axis (the same module, the same singular indices)."""
    items = [(m["label"], m["method"], next(iter(m["weight"].items()))) for m in metrics_list if m.get("weight")]
    if not items:
        return None
    cols = min(SPECTRAL_COLS, len(items) + 1)          # + 1: the last cell holds the two keys
    blocks = -(-(len(items) + 1) // cols)
    # a block row is a retention row over an adaptation row (the checkpoint's name heads the pair)
    fig = plt.figure(figsize=(2.75 * cols + 0.3, 4.0 * blocks + 0.4))
    grid = fig.add_gridspec(2 * blocks, cols)
    first = [None, None]        # the first retention / adaptation axes: every later one shares them
    for k, (label, method, (_mod, w)) in enumerate(items):
        b, j = divmod(k, cols)
        name = label if label == method else f"{label} ({method})"
        for r, (y, color, key, ref, ref_key, title) in enumerate(_spectral_panels(w, name)):
            ax = fig.add_subplot(grid[2 * b + r, j], sharex=first[0], sharey=first[r])
            first[r] = first[r] or ax
            ax.plot(np.arange(1, len(y) + 1), _positive(y), lw=0.9, color=color, label=key)
            ax.plot(np.arange(1, len(ref) + 1), _positive(ref), lw=1.2, color="0.4", ls="--", label=ref_key)
            ax.set_yscale("log")
            ax.set_title(title, fontsize=9)
            ax.grid(alpha=0.3, which="major")
            # shared scales: tick labels on the outer edge only (left column; lowest panel of a column)
            ax.tick_params(labelsize=8, labelleft=j == 0, labelbottom=r == 1 and k + cols >= len(items))
        if k + cols >= len(items):
            ax.set_xlabel("singular index i of W0", fontsize=9)
    b, j = divmod(len(items), cols)                    # the cell after the last checkpoint
    for r, lab in enumerate(("retention |ΔP_diag(i)|", "adaptation E_Δ(i)/Σ E_Δ")):
        for ax in fig.axes[r:2 * len(items):2 * cols]:   # the left column's panels of this profile
            ax.set_ylabel(lab, fontsize=9)
        key = fig.add_subplot(grid[2 * b + r, j])
        key.axis("off")
        key.legend(*first[r].get_legend_handles_labels(), loc="center", fontsize=9,
                   title=lab.split()[0] + " profile", title_fontsize=9)
    fig.suptitle(f"Spectral profiles of {items[0][2][0]} per checkpoint (log scale, shared axes; "
                 "dashed: pretrained spectrum)", fontsize=11)
    return fig


def plot_erank_layers(plt, metrics_list: list[dict]):
    """[PA-W] effective rank erank(dW) of mlp.down_proj across layers, one line per checkpoint. With 14+
    lines a 10-colour cycle repeats, so each line gets its own colour x dash x marker (_line_styles)
    and the key, outside the axes, lists the checkpoints top to bottom in the order of their last point."""
    from matplotlib import ticker
    series = [(m["label"], m["erank_layers"]) for m in metrics_list if m.get("erank_layers")]
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(8.6, 4.8))
    last = {}
    for (label, er), style in zip(series, _line_styles(len(series))):
        layers = sorted(int(k) for k in er)
        ys = _positive([er[str(l)] for l in layers])
        last[ax.plot(layers, ys, ms=5, lw=1.4, label=label, **style)[0]] = np.nan_to_num(ys[-1], nan=-1.0)
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 3.0, 5.0)))
    ax.yaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(ticker.NullFormatter())
    ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    ax.set(xlabel="layer", ylabel="erank(ΔW) = ‖ΔW‖_F² / ‖ΔW‖_2²")
    ax.set_title("Effective rank of the mlp.down_proj update across layers", fontsize=11)
    ax.grid(alpha=0.3, which="both")
    order = sorted(last, key=last.get, reverse=True)
    ax.legend(order, [h.get_label() for h in order], fontsize=8.5, loc="upper left",
              bbox_to_anchor=(1.01, 1.0), title="checkpoint\n(by last layer)", title_fontsize=8.5)
    return fig


def _pyplot():
    """matplotlib.pyplot on the file-only Agg backend (optional package: imported when plotting)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _line_styles(n: int) -> list[dict]:
    """n line styles a reader can tell apart: tab20's ten dark hues drawn solid, then its ten light ones
    dashed (then dotted, dash-dot, ...), with a marker cycle of another period on top, so no two of the
    first 40 lines share colour, dash and marker."""
    from matplotlib import colormaps
    tab20 = colormaps["tab20"].colors            # pairs: (dark, light) of each of ten hues
    return [dict(color=tab20[2 * (k % 10) + (k // 10) % 2], ls=("-", "--", ":", "-.")[(k // 10) % 4],
                 marker="os^Dv<>P"[k % 8]) for k in range(n)]


def finish(metrics_list: list[dict], out_dir: Path, *, plots: bool = True) -> list[dict]:
    """summary.json, correlations and plots (matplotlib, Agg backend) from per-checkpoint metrics."""
    rows = [summary_row(m) for m in metrics_list]
    loading.atomic_write_json(out_dir / "summary.json", rows)
    write_correlations(rows, out_dir)
    if plots:
        plt = _pyplot()
        for fn, name in ((plot_spectral_profiles, "spectral_profiles.png"),
                         (plot_erank_layers, "erank_layers.png")):
            fig = fn(plt, metrics_list)
            if fig is not None:     # written to a temp name, then renamed (atomic)
                tmp = out_dir / f".{name}.tmp.png"
                fig.tight_layout()
                fig.savefig(tmp, dpi=110)
                plt.close(fig)
                tmp.replace(out_dir / name)
                print(f"[geometry] wrote {out_dir / name}")
    return rows


# -----------------------------------------------------------------------------
# The run: base activations once, then each checkpoint

def check_inputs(args) -> list[str]:
    """Everything that can fail before a model loads (caps, --label/--results counts, results
    files, checkpoint dirs); returns the labels (default: the dir names, -2, -3 for repeats)."""
    assert args.max_tokens > 1 and args.max_prompts >= 1 and args.max_length >= 1, "caps must be positive"
    assert args.fluct_window >= 1 and args.gram_rows >= 2 and all(k >= 1 for k in args.pca_k)
    if args.results is not None and len(args.results) != len(args.checkpoint):
        raise SystemExit(f"--results given {len(args.results)} times for {len(args.checkpoint)} --checkpoint")
    for res in (args.results or []) + ([args.base_results] if args.base_results else []):
        merge_results(res)
    if args.label and len(args.label) != len(args.checkpoint):
        raise ValueError(f"--label given {len(args.label)} times for {len(args.checkpoint)} --checkpoint")
    labels, seen = list(args.label or []), {}
    for c in args.checkpoint if not args.label else []:
        base = Path(c).resolve().name or "ckpt"
        seen[base] = seen.get(base, 0) + 1
        labels.append(base if seen[base] == 1 else f"{base}-{seen[base]}")
    return labels


def load_prompt_sets(args) -> tuple[list[str], list[str], list[str], list[str]]:
    """(all general, all target, sampled general, sampled target) prompts [PA-CSD]; the toy base
    brings its own from toy_world.py."""
    if (args.general_prompts is None or args.target_prompts is None) and args.base != "toy":
        raise SystemExit(f"--base {args.base}: pass --general-prompts and --target-prompts (only "
                         "--base toy has built-in prompts, from toy_world.py)")
    G_all = (read_prompts(args.general_prompts) if args.general_prompts
             else toy_world.general_prompts(args.max_prompts, seed=args.seed))
    T_all = (read_prompts(args.target_prompts) if args.target_prompts
             else toy_world.target_prompts(args.domain, args.max_prompts, seed=args.seed))
    return (G_all, T_all, sample_prompts(G_all, args.max_prompts, args.seed),
            sample_prompts(T_all, args.max_prompts, args.seed))


def collect_base_activations(args, base_model, tok, G, T, mods) -> dict:
    """The base model's activations, once per run: CSD inputs on G and T, activation outputs on G."""
    t0 = time.time()
    caps = dict(max_tokens=args.max_tokens, max_length=args.max_length)
    csd_taps = [(n, "input") for n in mods["csd"]]
    acts_G = collect_activations(base_model, tok, G, csd_taps + [(n, "output") for n in mods["act"]], **caps)
    acts_T = collect_activations(base_model, tok, T, csd_taps, **caps)
    n_G, n_T = (next((v.shape[0] for k, v in a.items() if k != "n_prompts"), 0) for a in (acts_G, acts_T))
    print(f"[geometry] base activations: general {n_G} tokens from {acts_G['n_prompts']} prompts, "
          f"target {n_T} tokens from {acts_T['n_prompts']} prompts ({time.time() - t0:.1f}s)")
    for k in args.pca_k:
        for name in mods["act"]:
            width = acts_G[(name, "output")].shape[1]
            if min(k, n_G - 1, width) < k:
                print(f"[geometry] note: PCA k={k} clipped to {min(k, n_G - 1, width)} for {name} "
                      f"(width {width}, {n_G} rows)")
    return {"G": acts_G, "T": acts_T, "tokenizer": tok, "G_prompts": G, "svd0": {}, "n_G": n_G, "n_T": n_T}


def measure_checkpoint(args, base_model, base_acts: dict, ckpt: str, label: str, mods: dict,
                       scores: dict, device, dtype) -> dict:
    """Every metric of one checkpoint (weight space, CSD, activation geometry) as a JSON-able dict."""
    t0 = time.time()
    ft, info, adapters = load_finetuned(args.base, ckpt, dtype=dtype, device=device)
    print(f"[geometry] {label}: method={info['method']} ({info['kind']}), "
          f"{len(adapters)} wrapped modules, loaded in {time.time() - t0:.1f}s")
    metrics = {"label": label, "checkpoint": str(info["path"]), "method": info["method"],
               "adapter_config": info["config"], "scores": scores, "weight": {}, "csd": {},
               "activation": {}, "merge_check": {}, "erank_layers": {}}
    update = lambda name: module_update(base_model, ft, adapters, name)   # noqa: E731
    # --- weight space [PA-W]; the SVD of W0 is cached once per run, not once per checkpoint
    for name in mods["weight"]:
        W0, dW = update(name)
        if name not in base_acts["svd0"]:
            base_acts["svd0"][name] = thin_svd(W0)
        metrics["weight"][name] = weight_space_metrics(
            W0, dW, with_sva=info["method"] == "oft" or args.sva_all, window=args.fluct_window,
            top=args.top_singular, svd0=base_acts["svd0"][name])
        metrics["merge_check"][name] = merge_check(base_model, adapters, name, dW)
    for name in mods["erank"]:
        layer = int(re.search(r"\.(\d+)\.", name).group(1))
        metrics["erank_layers"][str(layer)] = stable_rank(update(name)[1], args.top_singular)["erank"]
    norms = [weight_norms(dW, W0) for W0, dW in map(update, mods["norms"])]
    metrics["global_norms"] = global_norms(norms) if norms else None
    # --- CSD [PA-CSD]: base-model inputs, this checkpoint's dW
    for name in mods["csd"]:
        W0, dW = update(name)
        c = {d: csd_metrics(dW, W0, base_acts[d][(name, "input")].to(W0.device)) for d in ("G", "T")}
        metrics["csd"][name] = {**c, **csd_ratios(c["G"], c["T"])}
    # --- activation geometry [PA-ACT]: outputs of base and finetuned on the same general tokens
    if mods["act"]:
        ft_acts = collect_activations(ft, base_acts["tokenizer"], base_acts["G_prompts"],
                                      [(n, "output") for n in mods["act"]],
                                      max_tokens=args.max_tokens, max_length=args.max_length)
        for name in mods["act"]:
            metrics["activation"][name] = activation_geometry(
                base_acts["G"][(name, "output")].to(device), ft_acts[(name, "output")].to(device),
                gram_max_rows=args.gram_rows, seed=args.seed, pca_ks=args.pca_k)
    del ft, adapters
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    metrics["seconds"] = round(time.time() - t0, 2)
    return metrics


def print_checkpoint_line(label: str, m: dict) -> None:
    """One line per measured checkpoint: the headline number of each section."""
    w = next(iter(m["weight"].values()), None)
    a = m["activation"]
    print(f"[geometry] {label}: "
          + (f"erank={w['erank']:.2f} F_ret={w['fluct_retention']:.2e} "
             f"F_ada={w['fluct_adaptation']:.2e} " if w else "")
          + (f"CSD_G,rel={next(iter(m['csd'].values()))['G']['rel']:.3e} " if m["csd"] else "")
          + (f"Proc={np.mean([v['proc_residual'] for v in a.values()]):.4f} "
             f"CKA={np.mean([v['cka'] for v in a.values()]):.4f} " if a else "")
          + f"({m['seconds']}s)")


# -----------------------------------------------------------------------------
# Command line

# (flag, argparse keywords): the order is the order of the keys in config.json
FLAGS = [
    ("--base", dict(default="toy", help="base model spec: 'toy', a local HF dir or a hub id")),
    ("--checkpoint", dict(action="append", required=True,
                          help="adapter dir (ours or HF PEFT), full HF model dir, or run dir; repeat")),
    ("--label", dict(action="append", default=None, help="display name per --checkpoint (same order)")),
    ("--device", dict(default=None, help="cuda | cpu (default: cuda if available)")),
    ("--dtype", dict(default=None, help="forward dtype (default bf16 on cuda, fp32 on cpu); maths fp32")),
    ("--general-prompts", dict(default=None, help="txt/jsonl/json general prompts (default: toy's)")),
    ("--target-prompts", dict(default=None, help="txt/jsonl/json target prompts (default: toy's)")),
    ("--domain", dict(default="math", choices=("math", "med"), help="toy target domain")),
    ("--max-prompts", dict(type=int, default=300, help="prompts sampled per distribution [PA-CSD]")),
    ("--max-tokens", dict(type=int, default=4096, help="token rows kept per distribution")),
    ("--max-length", dict(type=int, default=1024, help="truncation per prompt, in tokens")),
    ("--seed", dict(type=int, default=0, help="prompt sampling and Gram row subset seed")),
    # module sets: names, or paper | paper8 | all-down_proj | none
    ("--weight-modules", dict(default="paper", help="spectral profiles, comma list")),
    ("--erank-modules", dict(default="all-down_proj", help="erank across layers (plot)")),
    ("--csd-modules", dict(default="paper", help="CSD modules; the first is tabled")),
    ("--act-modules", dict(default="paper8", help="activation geometry modules")),
    ("--no-global-norms", dict(action="store_true", help="skip global L1/L2 of dW over decoder Linears")),
    ("--fluct-window", dict(type=int, default=5, help="fluctuation score window (points)")),
    ("--top-singular", dict(type=int, default=5, help="top singular values of dW stored")),
    ("--gram-rows", dict(type=int, default=1024, help="rows in the Gram distortion subset")),
    ("--pca-k", dict(type=int, nargs="+", default=[32, 64], help="PCA subspace ranks K")),
    ("--sva-all", dict(action="store_true", help="SVA for every method, not only OFT")),
    ("--results", dict(action="append", default=None, metavar="FILE[,FILE]",
                       help="evaluate.py results.json per --checkpoint (default CKPT/results.json); "
                            "target and general suite files comma-joined are merged")),
    ("--base-results", dict(default=None, metavar="FILE[,FILE]",
                            help="the base model's results.json (target gain), as --results")),
    ("--out", dict(required=True, help="output directory")),
    ("--no-plots", dict(action="store_true", help="skip the PNG figures")),
]


def build_parser() -> argparse.ArgumentParser:
    """The main command's parser, from FLAGS."""
    p = argparse.ArgumentParser(description="Weight-space spectra, CSD and activation geometry of "
                                "finetuned checkpoints (PEFT-Arena) and their correlation with "
                                "forgetting. Subcommands: correlate, bench-svd.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for flag, kw in FLAGS:
        p.add_argument(flag, **kw)
    return p


def main(argv=None) -> list[dict]:
    """Prompts -> base model and its activations (once) -> each checkpoint's metrics -> tables."""
    args = build_parser().parse_args(argv)
    labels = check_inputs(args)
    device = loading.pick_device(args.device)
    dtype = loading.pick_dtype(args.dtype, device)
    # fp32 maths must be fp32: no TF32 in the SVDs/matmuls on Ampere+ GPUs
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    for c in args.checkpoint:
        read_checkpoint_info(c)            # fail before any model is loaded
    print(f"[geometry] device={device} dtype={dtype} "
          f"({'bf16 forwards on GPU' if device.type == 'cuda' else 'fp32 on CPU'}; metrics in fp32)")
    G_all, T_all, G, T = load_prompt_sets(args)
    # DEVIATION 6: one load in the forward dtype serves both the forwards and W0 (upcast to fp32)
    base_model, tok = loading.load_model(args.base, dtype=dtype, device=device)
    # module names per measurement; DEVIATION 5: global norms over the decoder's Linear weights only
    prefix, _ = decoder_layout(base_model)
    mods = {k: resolve_modules(base_model, getattr(args, f"{k}_modules"))
            for k in ("weight", "erank", "csd", "act")}
    mods["norms"] = [] if args.no_global_norms else [
        n for n, m in base_model.named_modules()
        if isinstance(m, torch.nn.Linear) and n.startswith(prefix + ".")]
    base_acts = collect_base_activations(args, base_model, tok, G, T, mods)
    config = {**vars(args), "device": str(device), "dtype": str(dtype), "labels": labels,
              "modules": {k: v for k, v in mods.items() if k != "norms"},
              "n_global_norm_modules": len(mods["norms"]),
              "prompts": {"general_available": len(G_all), "target_available": len(T_all),
                          "general_sampled": len(G), "target_sampled": len(T),
                          "general_prompts_used": base_acts["G"]["n_prompts"],
                          "general_tokens": base_acts["n_G"],
                          "target_prompts_used": base_acts["T"]["n_prompts"],
                          "target_tokens": base_acts["n_T"]},
              "torch": torch.__version__, "argv": sys.argv if argv is None else ["geometry.py", *argv]}
    loading.atomic_write_json(out_dir / "config.json", config)
    metrics_list = []
    for i, (ckpt, label) in enumerate(zip(args.checkpoint, labels)):
        res = args.results[i] if args.results else str(Path(ckpt) / "results.json")
        scores = read_scores(res, args.base_results, required=bool(args.results))
        m = measure_checkpoint(args, base_model, base_acts, ckpt, label, mods, scores, device, dtype)
        loading.atomic_write_json(out_dir / label / "metrics.json", m)
        print_checkpoint_line(label, m)
        metrics_list.append(m)
    return finish(metrics_list, out_dir, plots=not args.no_plots)


def main_correlate(argv) -> list[dict]:
    """`geometry.py correlate`: summary, correlations and plots again from finished metrics.json
    files, optionally with other scores (--results/--base-results as in the main command)."""
    p = argparse.ArgumentParser(prog="geometry.py correlate")
    p.add_argument("--metrics", nargs="+", required=True, help="<out>/<label>/metrics.json files")
    p.add_argument("--results", nargs="+", default=None, metavar="FILE[,FILE]",
                   help="results.json per metrics file (same order); overrides the stored scores")
    p.add_argument("--base-results", default=None, metavar="FILE[,FILE]", help="the base model's")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--no-plots", action="store_true")
    args = p.parse_args(argv)
    if args.results and len(args.results) != len(args.metrics):
        raise SystemExit(f"--results has {len(args.results)} files for {len(args.metrics)} --metrics")
    ms = [json.loads(Path(path).read_text()) for path in args.metrics]
    for m, res in zip(ms, args.results or []):
        m["scores"] = read_scores(res, args.base_results)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    return finish(ms, Path(args.out), plots=not args.no_plots)


def main_bench_svd(argv) -> dict:
    """`geometry.py bench-svd`: time the paper-size weight-space pass (thin SVD of a 3584 x 18944
    fp32 W0, svdvals, and the whole `weight_space_metrics`) on a random W0 and a rank-8 dW."""
    p = argparse.ArgumentParser(prog="geometry.py bench-svd")
    p.add_argument("--rows", type=int, default=3584, help="d_out of W0 (Qwen2.5-7B down_proj)")
    p.add_argument("--cols", type=int, default=18944, help="d_in of W0 (Qwen2.5-7B down_proj)")
    p.add_argument("--device", default=None, help="cuda | cpu (default: cuda if available)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats after one warm-up")
    p.add_argument("--out", default=None, help="optional JSON file for the timings")
    args = p.parse_args(argv)
    dev = loading.pick_device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False
    g = torch.Generator(device="cpu").manual_seed(0)
    W0 = (torch.randn(args.rows, args.cols, generator=g) / math.sqrt(args.cols)).to(dev)   # (m,n)
    dW = (1e-3 * torch.randn(args.rows, 8, generator=g) @ torch.randn(8, args.cols, generator=g)).to(dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def timed(fn):
        fn()                                      # warm-up (cuSOLVER handles, etc.)
        ts = []
        for _ in range(args.repeats):
            sync()
            t = time.perf_counter()
            fn()
            sync()
            ts.append(time.perf_counter() - t)
        return {"min_s": round(min(ts), 4), "median_s": round(float(np.median(ts)), 4)}

    res = {"device": str(dev), "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
           "shape": [args.rows, args.cols], "dtype": "float32", "torch": torch.__version__,
           "thin_svd": timed(lambda: thin_svd(W0)), "svdvals": timed(lambda: torch.linalg.svdvals(W0)),
           "weight_space_metrics": timed(lambda: weight_space_metrics(W0, dW))}
    if dev.type == "cuda":
        res["peak_mem_GiB"] = round(torch.cuda.max_memory_allocated(dev) / 2**30, 2)
    print(json.dumps(res, indent=2))
    if args.out:
        loading.atomic_write_json(args.out, res)
    return res


if __name__ == "__main__":
    sub = {"correlate": main_correlate, "bench-svd": main_bench_svd}.get((sys.argv + [""])[1])
    if sub is not None:
        loading.run_cli("geometry.py", lambda: sub(sys.argv[2:]))
    else:
        loading.run_cli("geometry.py", main, resume_hint="finished checkpoints' metrics.json are kept; "
                        "rerun the same command (geometry.py correlate rebuilds the tables from them)")
