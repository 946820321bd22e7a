"""Tests for geometry.py (PEFT-Arena weight-space, CSD and activation geometry; release
tools/spectral_analysis.py, tools/csd_single_checkpoint.py, tools/activation_geometry_single_checkpoint.py):
every metric on synthetic matrices with a known answer, and against an independent numpy/scipy
computation; activation collection on a tiny random model; a CLI smoke run on full-model and on adapter checkpoints.

Run: python -m pytest tests/test_geometry.py -x -q
"""
from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import evaluate as ev
import geometry as geo
import loading
import peft_methods as pm

scipy_linalg = pytest.importorskip("scipy.linalg")
scipy_stats = pytest.importorskip("scipy.stats")


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def block_rotation(n: int, b: int, scale: float, seed: int = 0) -> np.ndarray:
    """blockdiag(R_1..R_{n/b}), R_i = (I + Q)(I - Q)^{-1} (exact Cayley) of a random skew Q: orthogonal."""
    rng = np.random.default_rng(seed)
    R = np.zeros((n, n))
    for s in range(0, n, b):
        A = rng.normal(0, scale, (b, b))
        Q = A - A.T
        R[s:s + b, s:s + b] = (np.eye(b) + Q) @ np.linalg.inv(np.eye(b) - Q)
    return R


# -----------------------------------------------------------------------------
# Acceptance 1: synthetic matrices with known answers

def test_zero_update_gives_zero_everything():
    W0 = randn(24, 40)
    dW = torch.zeros_like(W0)
    m = geo.weight_space_metrics(W0, dW, with_sva=True)
    assert max(m["dP_diag"]) == 0.0 and max(m["E_delta"]) == 0.0
    assert m["fluct_retention"] == 0.0 and m["fluct_adaptation"] == 0.0
    assert m["erank"] == 0.0 and m["norms"]["l1"] == 0.0 and m["norms"]["rel_l2"] == 0.0
    assert m["sva_mean"] == pytest.approx(1.0, abs=1e-5)
    h = randn(50, 40, seed=1)
    c = geo.csd_metrics(dW, W0, h)
    assert c["abs"] == 0.0 and c["rel"] == 0.0 and c["un"] == 0.0 and c["n_tokens"] == 50
    assert geo.csd_ratios(c, c) == {"ratio_abs": 0.0, "ratio_rel": 0.0, "ratio_un": 0.0}
    X0 = randn(300, 32, seed=2) + 0.5
    a = geo.activation_geometry(X0, X0.clone(), pca_ks=(8,))
    assert a["cka"] == pytest.approx(1.0, abs=1e-6)
    assert a["raw_residual"] == 0.0 and a["proc_residual"] < 1e-5
    assert a["gram_distortion"] == 0.0 and a["cos_mean"] == pytest.approx(1.0, abs=1e-6)
    assert a["angle_mean"] == 0.0 and a["norm_logratio"] < 1e-6
    assert a["pca_dist_k8"] < 1e-5


def test_rotation_of_activations_procrustes_zero_raw_large():
    X0 = randn(400, 24, seed=3) + 1.0                       # non-zero mean: centring matters
    Q = torch.linalg.qr(randn(24, 24, seed=4))[0]           # random orthogonal
    X1 = X0 @ Q
    r = geo.procrustes_residuals(X0, X1)
    assert r["proc_residual"] < 1e-4
    assert r["raw_residual"] > 0.8                          # ~sqrt(2) for a random rotation
    assert r["proc_improvement"] == pytest.approx(r["raw_residual"] - r["proc_residual"])
    assert geo.linear_cka(X0, X1) == pytest.approx(1.0, abs=1e-5)
    assert geo.gram_distortion(X0, X1) < 1e-5             # cosines between rows are kept
    assert geo.norm_drift(X0, X1)["norm_logratio"] < 1e-5
    assert geo.cosine_drift(X0, X1)["cos_drift"] > 0.1      # but each row moved


@pytest.mark.parametrize("r", [1, 3, 6])
def test_rank_r_update_has_stable_rank_at_most_r(r):
    dW = randn(30, r, seed=r) @ randn(r, 50, seed=10 + r)
    s = geo.stable_rank(dW)
    assert 1.0 <= s["erank"] <= r + 1e-4
    # r equal singular values: erank is exactly r
    U = torch.linalg.qr(randn(30, 30, seed=5))[0][:, :r]
    V = torch.linalg.qr(randn(50, 50, seed=6))[0][:, :r]
    assert geo.stable_rank(2.5 * U @ V.T)["erank"] == pytest.approx(r, rel=1e-5)


def test_fluctuation_constant_zero_short_zero_and_numpy_reference():
    assert geo.fluctuation_score(torch.full((50,), 3.0)) < 1e-6
    assert geo.fluctuation_score(torch.tensor([1.0, 5.0, 2.0, 9.0])) == 0.0     # k < window
    x = randn(97, seed=7).abs()
    xp = np.pad(x.double().numpy(), 2, mode="reflect")
    m = np.convolve(xp, np.ones(5) / 5, mode="valid")
    ref = np.abs(x.double().numpy() - m).mean()
    assert geo.fluctuation_score(x) == pytest.approx(ref, rel=1e-5)
    spiky = torch.ones(50)
    spiky[::7] = 10.0
    assert geo.fluctuation_score(spiky) > geo.fluctuation_score(torch.linspace(1, 2, 50))


def test_oft_merged_weight_keeps_spectrum_and_retention_closed_form():
    """W_ft = W0 R^T (R block-diagonal orthogonal, OFT merge): sigma(W_ft) = sigma(W0) exactly; the
    retention profile is sigma_i (1 - v_i^T R v_i) (rotation of singular vectors, not of the
    spectrum), SVA_i = |v_i^T R v_i|, so dP_diag = sigma_i (1 - SVA_i)."""
    W0 = randn(32, 64, seed=8)
    R = block_rotation(64, 8, 0.1, seed=9)
    W_ft = W0 @ torch.tensor(R.T, dtype=torch.float32)
    s0, s1 = torch.linalg.svdvals(W0), torch.linalg.svdvals(W_ft)
    assert torch.allclose(s0, s1, rtol=1e-5, atol=1e-5 * float(s0[0]))
    prof = geo.spectral_profiles(W0, W_ft - W0)
    U, S, Vh = np.linalg.svd(W0.double().numpy(), full_matrices=False)
    vRv = np.einsum("ij,jk,ik->i", Vh, R, Vh)                 # v_i^T R v_i
    assert np.allclose(prof["dP_diag"].numpy(), S * np.abs(vRv - 1), atol=2e-5 * S[0])
    assert float(prof["dP_diag"].max()) > 1e-3 * S[0]         # visible, not zero
    sv = geo.sva(W0, W_ft)
    assert np.allclose(sv["cos"].numpy(), np.abs(vRv), atol=1e-3)
    assert np.allclose(prof["dP_diag"].numpy(), S * (1 - sv["cos"].numpy()), atol=2e-3 * S[0])
    m = geo.weight_space_metrics(W0, W_ft - W0, with_sva=True)
    assert m["sigma_max_rel_change"] < 1e-5 and m["sva_min"] <= m["sva_mean"] < 1.0


# -----------------------------------------------------------------------------
# Acceptance 2: each metric against an independent computation

def test_spectral_profiles_match_numpy_literal_formula_and_reference():
    W0 = randn(40, 72, seed=11)
    dW = 0.05 * randn(40, 3, seed=12) @ randn(3, 72, seed=13)
    prof = geo.spectral_profiles(W0, dW)
    W0n, Wft = W0.double().numpy(), (W0 + dW).double().numpy()
    U, S, Vh = np.linalg.svd(W0n, full_matrices=False)
    P = np.einsum("mi,mn,in->i", U, Wft, Vh)                  # u_i^T W_ft v_i
    assert np.allclose(prof["sigma"].numpy(), S, rtol=1e-5)
    assert np.allclose(prof["P_diag"].numpy(), P, atol=1e-5 * S[0])
    assert np.allclose(prof["dP_diag"].numpy(), np.abs(P - S), atol=1e-5 * S[0])
    E = np.linalg.norm((Wft - W0n) @ Vh.T, axis=0)            # ||dW v_i||
    assert np.allclose(prof["E_delta"].numpy(), E, rtol=1e-4, atol=1e-7)
    ref = geo.spectral_profiles_reference(W0, W0 + dW)        # literal, with sigma subtracted
    assert torch.allclose(ref["dP_diag"], prof["dP_diag"], atol=2e-5 * S[0])
    assert torch.allclose(ref["E_delta"], prof["E_delta"], rtol=1e-4, atol=1e-6)


def test_stable_rank_and_norms_match_numpy():
    dW, W0 = randn(20, 35, seed=14), randn(20, 35, seed=15)
    s = np.linalg.svd(dW.double().numpy(), compute_uv=False)
    out = geo.stable_rank(dW, top=5)
    assert out["erank"] == pytest.approx((s ** 2).sum() / s[0] ** 2, rel=1e-5)
    assert np.allclose(out["top_singular_values"], s[:5], rtol=1e-5)
    n = geo.weight_norms(dW, W0)
    a, b = dW.double().numpy(), W0.double().numpy()
    assert n["l1"] == pytest.approx(np.abs(a).sum(), rel=1e-6)
    assert n["l2"] == pytest.approx(np.linalg.norm(a), rel=1e-6)
    assert n["rel_l1"] == pytest.approx(np.abs(a).sum() / np.abs(b).sum(), rel=1e-6)
    assert n["rel_l2"] == pytest.approx(np.linalg.norm(a) / np.linalg.norm(b), rel=1e-6)
    assert n["rmse"] == pytest.approx(np.sqrt((a ** 2).mean()), rel=1e-6)
    assert n["mean_abs"] == pytest.approx(np.abs(a).mean(), rel=1e-6)
    g = geo.global_norms([n, n])
    assert g["l1"] == pytest.approx(2 * n["l1"]) and g["l2"] == pytest.approx(math.sqrt(2) * n["l2"])


def test_sva_matches_numpy():
    W0, W1 = randn(16, 30, seed=16), randn(16, 30, seed=17)
    V0 = np.linalg.svd(W0.double().numpy(), full_matrices=False)[2]
    V1 = np.linalg.svd(W1.double().numpy(), full_matrices=False)[2]
    cos = np.abs((V0 * V1).sum(1))
    out = geo.sva(W0, W1)
    assert np.allclose(out["cos"].numpy(), cos, atol=1e-4)
    assert out["mean"] == pytest.approx(cos.mean(), abs=1e-4) and out["min"] == pytest.approx(cos.min(), abs=1e-4)


def test_csd_matches_per_token_loop_and_chunking():
    W0, dW, h = randn(12, 20, seed=18), 0.1 * randn(12, 20, seed=19), randn(37, 20, seed=20)
    Wn, dn, hn = W0.double().numpy(), dW.double().numpy(), h.double().numpy()
    e_dwh = np.mean([np.sum((dn @ x) ** 2) for x in hn])
    e_w0h = np.mean([np.sum((Wn @ x) ** 2) for x in hn])
    e_h = np.mean([np.sum(x ** 2) for x in hn])
    c = geo.csd_metrics(dW, W0, h, chunk_rows=8)              # 5 chunks, the last one short
    assert c["abs"] == pytest.approx(e_dwh, rel=1e-5)
    assert c["rel"] == pytest.approx(e_dwh / (e_w0h + 1e-12), rel=1e-5)
    assert c["un"] == pytest.approx(e_dwh / ((np.sum(dn ** 2) + 1e-12) * (e_h + 1e-12)), rel=1e-5)
    whole = geo.csd_metrics(dW, W0, h, chunk_rows=10_000)
    assert whole["abs"] == pytest.approx(c["abs"], rel=1e-6)
    t = geo.csd_metrics(dW, W0, 2 * h)
    r = geo.csd_ratios(c, t)
    assert r["ratio_rel"] == pytest.approx(1.0, rel=1e-5)    # rel is scale-free in h
    assert r["ratio_abs"] == pytest.approx(0.25, rel=1e-5)


def _pair(seed, n=240, d=20):
    X0 = randn(n, d, seed=seed) + 0.3
    X1 = 0.8 * X0 + 0.5 * randn(n, d, seed=seed + 1) @ randn(d, d, seed=seed + 2) / math.sqrt(d)
    return X0, X1


def test_procrustes_matches_scipy():
    X0, X1 = _pair(21)
    C0 = X0.double().numpy() - X0.double().numpy().mean(0)
    C1 = X1.double().numpy() - X1.double().numpy().mean(0)
    R, _ = scipy_linalg.orthogonal_procrustes(C1, C0)        # argmin ||C1 R - C0||
    out = geo.procrustes_residuals(X0, X1)
    assert out["proc_residual"] == pytest.approx(np.linalg.norm(C1 @ R - C0) / np.linalg.norm(C0), rel=1e-4)
    assert out["raw_residual"] == pytest.approx(np.linalg.norm(C1 - C0) / np.linalg.norm(C0), rel=1e-5)
    assert 0 < out["proc_residual"] < out["raw_residual"]


def test_cka_matches_hsic_formula():
    X0, X1 = _pair(24, n=120, d=12)
    X1 = X1[:, :9]                                           # CKA allows different widths
    a, b = X0.double().numpy(), X1.double().numpy()
    n = a.shape[0]
    H = np.eye(n) - np.ones((n, n)) / n

    def hsic(K, L):
        return np.trace(K @ H @ L @ H) / (n - 1) ** 2

    K, L = a @ a.T, b @ b.T
    ref = hsic(K, L) / math.sqrt(hsic(K, K) * hsic(L, L))
    assert geo.linear_cka(X0, X1) == pytest.approx(ref, rel=1e-5)


def test_gram_cosine_and_norm_drift_match_numpy():
    X0, X1 = _pair(27, n=1500, d=10)                          # > 1024 rows: the seeded subset is used
    a, b = X0.double().numpy(), X1.double().numpy()
    idx = np.sort(np.random.default_rng(0).choice(1500, size=1024, replace=False))
    z0 = a[idx] / np.linalg.norm(a[idx], axis=1, keepdims=True)
    z1 = b[idx] / np.linalg.norm(b[idx], axis=1, keepdims=True)
    K0, K1 = z0 @ z0.T, z1 @ z1.T
    assert geo.gram_distortion(X0, X1) == pytest.approx(np.linalg.norm(K1 - K0) / np.linalg.norm(K0), rel=1e-4)
    za = a / np.linalg.norm(a, axis=1, keepdims=True)
    zb = b / np.linalg.norm(b, axis=1, keepdims=True)
    cos = np.clip((za * zb).sum(1), -1, 1)
    c = geo.cosine_drift(X0, X1)
    assert c["cos_mean"] == pytest.approx(cos.mean(), rel=1e-5)
    assert c["cos_drift"] == pytest.approx((1 - cos).mean(), rel=1e-4)
    assert c["angle_mean"] == pytest.approx(np.arccos(cos).mean(), rel=1e-4)
    assert c["angle_median"] == pytest.approx(np.median(np.arccos(cos)), rel=1e-4)
    rho = np.linalg.norm(b, axis=1) / np.linalg.norm(a, axis=1)
    nd = geo.norm_drift(X0, X1)
    assert nd["norm_logratio"] == pytest.approx(np.abs(np.log(rho)).mean(), rel=1e-4)
    assert nd["norm_ratio_mean"] == pytest.approx(rho.mean(), rel=1e-5)
    assert nd["norm_ratio_std"] == pytest.approx(rho.std(), rel=1e-4)


def test_pca_subspace_distance_matches_projectors_and_clips_k():
    X0, X1 = _pair(30, n=200, d=40)
    a, b = X0.double().numpy(), X1.double().numpy()
    for k in (4, 16):
        V0 = np.linalg.svd(a - a.mean(0), full_matrices=False)[2][:k].T
        V1 = np.linalg.svd(b - b.mean(0), full_matrices=False)[2][:k].T
        ref = np.linalg.norm(V0 @ V0.T - V1 @ V1.T) / math.sqrt(2 * k)
        out = geo.pca_subspace_distance(X0, X1, k)
        assert out["k_eff"] == k and out["dist"] == pytest.approx(ref, rel=1e-3)
        assert geo.pca_subspace_distance_reference(X0, X1, k) == pytest.approx(ref, rel=1e-3)
        assert 0 < out["dist"] <= 1
    # width 40 < k = 64: k is clipped to the width, and the full-width subspaces coincide
    out = geo.pca_subspace_distance(X0, X1, 64)
    assert out["k_eff"] == 40 and out["dist"] < 1e-3
    assert geo.pca_subspace_distance(X0[:10], X1[:10], 32)["k_eff"] == 9     # n - 1 rows
    # activation_geometry shares one SVD per side across k: same numbers as the per-k function
    a = geo.activation_geometry(X0, X1, pca_ks=(4, 16, 64))
    for k in (4, 16, 64):
        ref = geo.pca_subspace_distance(X0, X1, k)
        assert a[f"pca_k{k}_eff"] == ref["k_eff"]
        assert a[f"pca_dist_k{k}"] == pytest.approx(ref["dist"], abs=1e-6)


def test_correlations_match_scipy_with_ties_and_constants():
    rng = np.random.default_rng(0)
    x = rng.normal(size=9)
    y = 0.5 * x + rng.normal(size=9)
    assert geo.pearson(x, y) == pytest.approx(scipy_stats.pearsonr(x, y)[0], abs=1e-12)
    assert geo.spearman(x, y) == pytest.approx(scipy_stats.spearmanr(x, y)[0], abs=1e-12)
    xt, yt = [1, 2, 2, 3, 5, 5, 5, 0], [3, 1, 4, 1, 5, 9, 2, 6]
    assert geo.spearman(xt, yt) == pytest.approx(scipy_stats.spearmanr(xt, yt)[0], abs=1e-12)
    assert np.allclose(geo.rankdata(xt), scipy_stats.rankdata(xt))
    assert math.isnan(geo.pearson([1, 1, 1], [1, 2, 3])) and math.isnan(geo.spearman([2], [3]))
    rows = [{"label": str(i), "method": "m", "forgetting": float(f), "target_gain": None,
             "act_cka": float(c), "csd_T_rel": 1.0} for i, (f, c) in enumerate(zip(x, y))]
    t = {r["metric"]: r for r in geo.correlation_table(rows)}
    assert t["act_cka"]["n"] == 9 and t["act_cka"]["pearson"] == pytest.approx(geo.pearson(y, x))
    assert t["act_cka"]["paper_pearson"] == -0.761
    assert t["csd_T_rel"]["n"] == 0 and math.isnan(t["csd_T_rel"]["pearson"])   # no target gain


# -----------------------------------------------------------------------------
# Prompts and module names

def test_read_prompts_formats_and_key_order(tmp_path):
    (tmp_path / "a.txt").write_text("first prompt\n\nsecond prompt\n")
    assert geo.read_prompts(tmp_path / "a.txt") == ["first prompt", "second prompt"]
    rows = [{"text": "t", "prompt": "p"}, {"question": "q", "instruction": "i"}, "plain"]
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert geo.read_prompts(tmp_path / "b.jsonl") == ["p", "q", "plain"]
    (tmp_path / "c.json").write_text(json.dumps([{"problem": "x"}, {"query": "y"}]))
    assert geo.read_prompts(tmp_path / "c.json") == ["x", "y"]
    (tmp_path / "d.jsonl").write_text('{"prompt": "ok"}\n{"answer": "no prompt"}\n')
    with pytest.raises(ValueError, match=r"d\.jsonl:2:"):
        geo.read_prompts(tmp_path / "d.jsonl")
    (tmp_path / "e.csv").write_text("x")
    with pytest.raises(ValueError, match="extension"):
        geo.read_prompts(tmp_path / "e.csv")


def test_sample_prompts_seeded_sorted_without_replacement():
    prompts = [f"p{i}" for i in range(1000)]
    got = geo.sample_prompts(prompts, 300, seed=0)
    idx = sorted(random.Random(0).sample(range(1000), 300))
    assert got == [prompts[i] for i in idx] and len(set(got)) == 300
    assert geo.sample_prompts(prompts[:5], 300) == prompts[:5]


def test_paper_layer_mapping():
    assert [geo.paper_layer(l, 28) for l in (9, 18)] == [9, 18]
    assert [geo.paper_layer(l, 4) for l in (9, 18)] == [1, 3]


# -----------------------------------------------------------------------------
# Model-level: collection and the CLI

@pytest.fixture
def tiny(tiny_random):
    """(model, tokenizer) of the tiny random toy architecture (conftest `tiny_random`)."""
    return tiny_random


def test_resolve_modules_and_collect_activations_capped(tiny):
    model, tok = tiny
    L = model.config.num_hidden_layers                       # 4 on the toy architecture
    l9, l18 = geo.paper_layer(9, L), geo.paper_layer(18, L)
    names = geo.resolve_modules(model, "paper8")
    assert names[0] == f"model.layers.{l9}.self_attn.q_proj" and names[-1] == f"model.layers.{l18}.mlp.down_proj"
    assert geo.resolve_modules(model, "paper") == [f"model.layers.{l18}.mlp.down_proj"]
    assert len(geo.resolve_modules(model, "all-down_proj,none")) == L
    with pytest.raises(ValueError, match="not an nn.Linear"):
        geo.resolve_modules(model, "model.layers.1.mlp")
    q = "model.layers.1.self_attn.q_proj"
    prompts = ["The quick brown fox jumps over the lazy dog.",
               "Another prompt here that is long enough to pass the cap of rows.",
               "never reached"]
    n0 = len(tok(prompts[0])["input_ids"])
    cap = n0 + 3                                             # the cap falls inside the second prompt
    acts = geo.collect_activations(model, tok, prompts, [(q, "input"), (q, "output")], max_tokens=cap)
    X_in, X_out = acts[(q, "input")], acts[(q, "output")]
    assert X_in.shape == (cap, model.config.hidden_size) and X_out.shape[0] == cap and acts["n_prompts"] == 2
    assert X_in.dtype == torch.float32
    mod = model.get_submodule(q)
    with torch.no_grad():
        assert torch.allclose(mod(X_in), X_out, atol=1e-5)   # the hook saw the module's own I/O
    single = geo.collect_activations(model, tok, prompts[:1], [(q, "output")], max_tokens=4096)
    assert torch.allclose(single[(q, "output")], X_out[:n0], atol=1e-5)


def _save_model(model, tok, path):
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def test_cli_full_checkpoints_end_to_end(tiny, tmp_path):
    """Three 'full FT' checkpoints with rank-1 updates of growing size on every down_proj: erank is 1,
    the update norm tracks the (planted) forgetting perfectly, and every output file is written."""
    model, tok = tiny
    base = _save_model(model, tok, tmp_path / "base")
    ckpts, base_sd = [], {k: v.clone() for k, v in model.state_dict().items()}
    for i, scale in enumerate((0.01, 0.03, 0.09)):
        sd = {k: v.clone() for k, v in base_sd.items()}
        for k in sd:
            if k.endswith("mlp.down_proj.weight"):
                sd[k] += scale * randn(sd[k].shape[0], 1, seed=i) @ randn(1, sd[k].shape[1], seed=50 + i)
        model.load_state_dict(sd)
        ckpts.append(_save_model(model, tok, tmp_path / f"full{i}"))
        json.dump({"target_score": 10.0 + i, "general_score": 50.0 - 5 * i},
                  open(tmp_path / f"full{i}" / "results.json", "w"))
    json.dump({"target_score": 9.0, "general_score": 51.0}, open(tmp_path / "base.json", "w"))
    (tmp_path / "g.txt").write_text("\n".join(f"general prompt number {i} about things" for i in range(20)))
    (tmp_path / "t.jsonl").write_text("\n".join(json.dumps({"problem": f"What is {i}+{i}?"}) for i in range(20)))
    out = tmp_path / "out"
    rows = geo.main(["--base", base, *sum((["--checkpoint", c] for c in ckpts), []),
                     "--general-prompts", str(tmp_path / "g.txt"), "--target-prompts", str(tmp_path / "t.jsonl"),
                     "--base-results", str(tmp_path / "base.json"), "--max-tokens", "200",
                     "--max-prompts", "12", "--out", str(out)])
    for f in ("config.json", "summary.json", "correlations.json", "correlations.csv", "correlations.md",
              "spectral_profiles.png", "erank_layers.png", "full0/metrics.json"):
        assert (out / f).is_file(), f
    cfg = json.loads((out / "config.json").read_text())
    L = model.config.num_hidden_layers
    paper_mod = f"model.layers.{geo.paper_layer(18, L)}.mlp.down_proj"
    assert cfg["prompts"]["general_tokens"] == 200 and cfg["modules"]["csd"] == [paper_mod]
    assert [r["forgetting"] for r in rows] == [1.0, 6.0, 11.0]
    assert [r["target_gain"] for r in rows] == [1.0, 2.0, 3.0]
    for r in rows:
        assert r["w_erank"] == pytest.approx(1.0, abs=1e-4)
        assert 0 < r["csd_G_rel"] and 0 < r["act_proc_residual"] < r["act_raw_residual"]
        assert 0 < r["act_cka"] < 1
    m = json.loads((out / "full1" / "metrics.json").read_text())
    assert set(m["erank_layers"]) == {str(i) for i in range(L)}
    assert all(a["pca_k64_eff"] == 64 for a in m["activation"].values()
               if a["width"] >= 64)
    t = {r["metric"]: r for r in json.loads((out / "correlations.json").read_text())["table"]}
    assert t["global_l2"]["n"] == 3 and t["global_l2"]["spearman"] == pytest.approx(1.0)
    assert "| CKA | forgetting | 3 |" in (out / "correlations.md").read_text()
    # the correlate subcommand rebuilds the same table from the metrics files
    again = geo.main_correlate(["--metrics", *[str(out / f"full{i}" / "metrics.json") for i in range(3)],
                                "--out", str(tmp_path / "again"), "--no-plots"])
    assert again == rows


def test_cli_adapter_checkpoints(tiny, tmp_path):
    """LoRA and OFT adapter checkpoints (peft_methods.py): dW comes from delta_weight and agrees with
    merged_weight - W0; LoRA r4 has erank <= 4; OFT keeps the spectrum of W0."""
    model, tok = tiny
    paper_mod = f"model.layers.{geo.paper_layer(18, model.config.num_hidden_layers)}.mlp.down_proj"
    base = _save_model(model, tok, tmp_path / "base")
    ckpts = []
    for method, hp in (("lora", {"r": 4, "alpha": 8}), ("oft", {"block_size": 16})):
        m, _ = loading.load_model(base, dtype="fp32", device="cpu")
        try:
            pm.apply_peft(m, method, **hp)
        except TypeError:
            pm.apply_peft(m, method, pm.make_config(method, **hp))
        g = torch.Generator().manual_seed(1)
        for p in m.parameters():
            if p.requires_grad:
                p.data.add_(0.02 * torch.randn(p.shape, generator=g))
        pm.save_adapter(m, tmp_path / method, base_model=base)
        ckpts.append(str(tmp_path / method))
    (tmp_path / "g.txt").write_text("\n".join(f"general prompt {i}" for i in range(10)))
    out = tmp_path / "out"
    geo.main(["--base", base, *sum((["--checkpoint", c] for c in ckpts), []), "--general-prompts",
              str(tmp_path / "g.txt"), "--target-prompts", str(tmp_path / "g.txt"),
              "--max-tokens", "64", "--out", str(out), "--no-plots", "--erank-modules", "none"])
    lora = json.loads((out / "lora" / "metrics.json").read_text())
    oft = json.loads((out / "oft" / "metrics.json").read_text())
    w = lora["weight"][paper_mod]
    assert 0 < w["erank"] <= 4 + 1e-4
    assert all(v < 1e-5 for v in lora["merge_check"].values())
    assert lora["csd"][paper_mod]["ratio_rel"] == pytest.approx(1.0, rel=1e-4)
    w = oft["weight"][paper_mod]
    assert w["sigma_max_rel_change"] < 1e-3 and "sva_mean" in w


def test_cli_help_and_prompt_files_required_off_toy(tmp_path):
    root = Path(geo.__file__).resolve().parent
    out = subprocess.run([sys.executable, "geometry.py", "--help"], cwd=root, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and "--general-prompts" in out.stdout and "--max-tokens" in out.stdout
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "config.json").write_text("{}")
    with pytest.raises(SystemExit, match="--general-prompts"):
        geo.main(["--base", str(tmp_path / "ck"), "--checkpoint", str(tmp_path / "ck"), "--out", str(tmp_path / "o")])
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        geo.main(["--checkpoint", str(tmp_path), "--out", str(tmp_path / "o")])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_collect_activations_bf16_cuda_matches_fp32_cpu(tiny):
    """bf16 forwards on GPU (the paper's diagnostics precision) give fp32 host rows close to fp32 CPU."""
    model, tok = tiny
    q = "model.layers.1.self_attn.q_proj"
    prompts = ["The quick brown fox jumps.", "Another prompt here"]
    ref = geo.collect_activations(model, tok, prompts, [(q, "output")], max_tokens=40)[(q, "output")]
    gpu = geo.collect_activations(model.to("cuda", torch.bfloat16), tok, prompts, [(q, "output")],
                                  max_tokens=40)[(q, "output")]
    assert gpu.dtype == torch.float32 and gpu.device.type == "cpu" and gpu.shape == ref.shape
    assert geo.linear_cka(ref, gpu) > 0.99


# -----------------------------------------------------------------------------
# Scores of real runs: evaluate.py writes the target suite and the general suite to separate files

def _real_results(path, suite, scores, base_general=None):
    """A results.json as `evaluate.py --suite SUITE --out DIR` writes it (evaluate.main's dict and
    evaluate.summarize_suite's aggregates; per-benchmark details trimmed to the scores)."""
    bench = {b: {"score": s, "n_items": 10, "n_samples": 1} for b, s in scores.items()}
    res = {"model": "/models/Qwen2.5-7B", "adapter": "ck", "adapter_config": None, "suite": suite,
           "benchmarks": bench, "backend": "vllm", "limit": None, "total_seconds": 1.0}
    res.update(ev.summarize_suite(bench, domain="math" if suite == "math" else None, base_general=base_general))
    res["ifeval_backends"] = {}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=2))
    return str(path)


def test_read_scores_merges_target_and_general_result_files(tmp_path):
    """A real checkpoint's scores come from two evaluate.py runs (--suite math, --suite general):
    both files together give target gain and forgetting; clashing or missing files are errors."""
    base_t = _real_results(tmp_path / "base/math/results.json", "math", {"math500": 70.0, "aime24": 10.0, "amc23": 40.0})
    base_g = _real_results(tmp_path / "base/general/results.json", "general", {"ifeval": 60.0, "bbh": 50.0, "nq": 40.0})
    t = _real_results(tmp_path / "ck/math/results.json", "math", {"math500": 76.0, "aime24": 13.0, "amc23": 44.0})
    g = _real_results(tmp_path / "ck/general/results.json", "general", {"ifeval": 57.0, "bbh": 48.0, "nq": 39.0},
                      base_general=50.0)
    s = geo.read_scores(f"{t},{g}", f"{base_t},{base_g}")
    assert s["target_score"] == pytest.approx((76 + 13 + 44) / 3)
    assert s["target_gain"] == pytest.approx((76 + 13 + 44) / 3 - 40.0)
    assert s["general_score"] == pytest.approx(48.0) and s["forgetting"] == pytest.approx(2.0)
    assert geo.read_scores([t, g], [base_t, base_g]) == s                   # a list works as well
    other = _real_results(tmp_path / "other/math/results.json", "math", {"math500": 1.0, "aime24": 1.0, "amc23": 1.0})
    with pytest.raises(ValueError, match="target_score .* in .*other"):
        geo.read_scores(f"{t},{other}", base_t)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        geo.read_scores(f"{t},{tmp_path / 'nope.json'}")


def _metrics(label, csd_t_rel, csd_g_rel):
    c = {"G": {"abs": csd_g_rel, "rel": csd_g_rel, "un": csd_g_rel},
         "T": {"abs": csd_t_rel, "rel": csd_t_rel, "un": csd_t_rel}}
    c.update(geo.csd_ratios(c["G"], c["T"]))
    return {"label": label, "method": "lora", "scores": {}, "weight": {}, "csd": {"m": c}, "activation": {}}


def test_correlate_real_runs_uses_target_gain(tmp_path):
    """End to end: `geometry.py correlate` with each checkpoint's target and general results files
    (comma-joined) fills the CSD_T-vs-target-gain rows of the correlation table."""
    base = ",".join([_real_results(tmp_path / "base/math/results.json", "math",
                                   {"math500": 70.0, "aime24": 10.0, "amc23": 40.0}),
                     _real_results(tmp_path / "base/general/results.json", "general",
                                   {"ifeval": 60.0, "bbh": 50.0, "nq": 40.0})])
    metrics, results = [], []
    for i in range(4):
        m = tmp_path / f"m{i}" / "metrics.json"
        m.parent.mkdir()
        m.write_text(json.dumps(_metrics(f"ck{i}", 0.01 * (i + 1), 0.02 * (i + 1) ** 2)))
        metrics.append(str(m))
        t = _real_results(tmp_path / f"ck{i}/math/results.json", "math",
                          {"math500": 70.0 + 3 * i, "aime24": 10.0 + i, "amc23": 40.0 + 2 * i})
        g = _real_results(tmp_path / f"ck{i}/general/results.json", "general",
                          {"ifeval": 60.0 - i * i, "bbh": 50.0 - i, "nq": 40.0})
        results.append(f"{t},{g}")
    geo.main_correlate(["--metrics", *metrics, "--results", *results, "--base-results", base,
                        "--out", str(tmp_path / "out"), "--no-plots"])
    table = json.loads((tmp_path / "out" / "correlations.json").read_text())
    rows = {(t["metric"], t["vs"]): t for t in table["table"]}
    gain = rows[("csd_T_rel", "target_gain")]
    assert gain["n"] == 4 and gain["spearman"] == pytest.approx(1.0)   # CSD_T grows with the gain here
    assert [r["target_gain"] for r in table["rows"]] == pytest.approx([0.0, 2.0, 4.0, 6.0])
    assert rows[("csd_G_rel", "forgetting")]["n"] == 4
