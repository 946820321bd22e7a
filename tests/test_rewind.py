"""Tests for rewind.py: interpolation paths, layer-wise rewinding, operating points, one-model grids.

Scope (issue #8, acceptance 1 and 3): alpha = 0 is the base model and alpha = 1 the final model
(logits, fp32) on every path of every method rewind.py covers; the factor path equals the dense path
where dW is linear in the scaled tensor and differs where it is not (DoRA's norm, PiSSA's alpha^2
term); the OFT generator path keeps W0's singular values for every alpha while the dense path does
not; MinRho equalises rho across layers; factors never exceed 1; a grid reuses one loaded model;
saved points are ordinary checkpoints. Everything runs on `tiny_random` (the toy architecture with
random weights), CPU, fp32.

Run: python -m pytest tests/test_rewind.py -q
"""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import geometry
import peft_methods as pm
import rewind as rw
from loading import load_model
from toy_world import build_random_toy_model

ROOT = Path(__file__).resolve().parents[1]
IDS = torch.tensor([[5, 17, 99, 3, 250, 41, 7, 600], [11, 2, 300, 45, 8, 77, 900, 12]])   # (B=2, T=8)


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits.float()                     # (B, T, V)


HPARAMS = {"lora": dict(r=4, alpha=8, dropout=0.0), "dora": dict(r=4, alpha=8, dropout=0.0),
           "pissa": dict(r=4, alpha=8, dropout=0.0), "milora": dict(r=4, alpha=8, dropout=0.0),
           "miss": dict(r=4, dropout=0.0), "oft": dict(block_size=16), "ia3": {},
           "vera": dict(r=16, dropout=0.0), "adalora": dict(dropout=0.0), "full": {},
           "keeplora": dict(r=4, alpha=8, dropout=0.0, _init=False)}   # no seed-gradient batch here
ALL_METHODS = list(pm.METHODS)                  # every registry entry, so an added method is tested too


def make_checkpoint(tmp_path: Path, method: str, *, step: int = 2, seed: int = 0, scale: float = 1.0,
                    layer_scale=None, **hp) -> Path:
    """A saved checkpoint of `method` on the tiny random model with random (non-identity) adapters.

    layer_scale(l) multiplies OFT generators of layer l (to make rotation strength differ by layer)."""
    model, _ = build_random_toy_model(seed=0)
    pm.apply_peft(model, method, **{**HPARAMS.get(method, {}), **hp})
    g = torch.Generator().manual_seed(seed + 10 * step)
    with torch.no_grad():
        if method == "full":
            for p in model.parameters():
                p.add_(0.02 * scale * torch.randn(p.shape, generator=g))
        for name, layer in pm.adapter_layers(model).items():
            for k, t in rw._own_tensors(layer).items():
                noise = torch.randn(t.shape, generator=g)
                if k in ("lora_A0", "lora_B0", "ranknum", "rank_mask"):
                    continue
                if k == "oft_q":
                    f = layer_scale(rw.layer_index(name)) if layer_scale else 1.0
                    t.copy_(0.05 * scale * f * noise)
                elif k in ("ia3_l", "magnitude", "lambda_d"):
                    t.mul_(1 + 0.1 * scale * noise)
                else:
                    t.add_(0.05 * scale * noise)
    d = tmp_path / f"{method}_run" / f"global_step_{step}"
    pm.save_adapter(model, d, base_model="tiny_random", extra={"step": step})
    (d / "trainer_state.json").write_text(json.dumps({"step": step}))
    return d


def final_reference(ckpt) -> torch.Tensor:
    model, _ = build_random_toy_model(seed=0)
    pm.load_adapter(model, ckpt)
    model.eval()
    return logits(model)


def merged_reference(ckpt) -> torch.Tensor:
    model, _ = build_random_toy_model(seed=0)
    pm.load_adapter(model, ckpt)
    if pm.peft_state(model)["method"] != "full":
        pm.merge_and_unload(model)
    return logits(model.eval())


# -----------------------------------------------------------------------------
# pure functions

def test_parse_grid():
    assert rw.parse_grid("0:1:0.1") == [round(0.1 * i, 10) for i in range(11)]
    assert rw.parse_grid("0:1:0.1")[3] == 0.3 and len(rw.parse_grid("0:1:0.1")) == 11
    assert rw.parse_grid("1,0,0.3,0.3") == [0.0, 0.3, 1.0]
    with pytest.raises(ValueError, match="does not divide"):
        rw.parse_grid("0:1:0.3")
    with pytest.raises(ValueError, match=">= 0"):
        rw.parse_grid("-0.5,1")
    with pytest.raises(ValueError, match="START:STOP:STEP"):
        rw.parse_grid("a:b")


def test_lerp_exact_endpoints_and_reference():
    g = torch.Generator().manual_seed(0)
    W0, W1 = torch.randn(64, 32, generator=g), 3 * torch.randn(64, 32, generator=g)
    assert torch.equal(rw.lerp_exact(W0, W1, 0.0), W0)
    assert torch.equal(rw.lerp_exact(W0, W1, 1.0), W1)
    for a in (0.1, 0.37, 0.5, 0.9):   # agrees with the plain additive formula W0 + a dW
        torch.testing.assert_close(rw.lerp_exact(W0, W1, a), W0 + a * (W1 - W0), rtol=1e-6, atol=1e-6)


def test_generator_coefficient():
    assert rw.generator_coefficient(0.25, "sqrt") == 0.5
    assert rw.generator_coefficient(0.25, "linear") == 0.25
    with pytest.raises(ValueError):
        rw.generator_coefficient(0.5, "cube")


def test_rewind_factors_never_exceed_one():
    g = torch.Generator().manual_seed(1)
    for _ in range(50):
        rhos = {l: float(v) for l, v in enumerate(torch.rand(7, generator=g) * 3)}
        for rule in ("saferho", "minrho"):
            tau, _ = rw.rewind_target(rhos, rule)
            c = rw.rewind_factors(rhos, tau, cap=True)
            assert max(c.values()) <= 1.0
            for l in rhos:   # a layer is scaled only if it is above the target, and then to tau exactly
                if rhos[l] > tau:
                    assert math.isclose(c[l] * rhos[l], tau, rel_tol=1e-12)
                else:
                    assert c[l] == 1.0
    assert max(rw.rewind_factors({0: 1.0, 1: 3.0}, 2.0, cap=False).values()) == 2.0   # the cap matters


def test_rewind_target_saferho_clips_to_available_layers():
    rhos = {0: 1.0, 1: 2.0, 2: 3.0, 3: 6.0}
    tau, info = rw.rewind_target(rhos, "saferho")
    assert tau == 3.0 and info["layers_used"] == [0, 1, 2, 3] and "4 adapter layers" in info["note"]
    tau, info = rw.rewind_target({l: float(l + 1) for l in range(8)}, "saferho")
    assert tau == 3.0 and info["layers_used"] == [0, 1, 2, 3, 4] and "note" not in info
    assert rw.rewind_target(rhos, "minrho")[0] == 1.0


def test_solve_factor_bisection():
    c = rw.solve_factor(lambda c: 2.0 * c ** 2, 0.5)          # 2c^2 = 0.5 -> c = 0.5
    assert abs(c - 0.5) < 1e-9
    assert rw.solve_factor(lambda c: 0.1 * c, 0.5) == 1.0      # already below tau: capped at 1
    assert abs(rw.solve_factor(lambda c: 0.1 * c, 0.5, cap=False) - 5.0) < 1e-6


def test_parse_rewind_and_rules():
    assert rw.parse_rewind("uniform=0.4") == {"name": "uniform=0.4", "kind": "uniform", "value": 0.4}
    assert rw.parse_rewind("MinRho")["kind"] == "minrho"
    with pytest.raises(ValueError):
        rw.parse_rewind("uniform")
    assert rw.parse_rule("keep-target=80")["keep"] == 0.8
    with pytest.raises(ValueError):
        rw.parse_rule("best")


def test_selection_pareto_and_overshoot_by_hand():
    base = {"target": 30.0, "general": 50.0}
    final = {"kind": "final", "alpha": 1.0, "target": 50.0, "general": 35.0}
    pts = [dict(base, kind="base", alpha=0.0),
           {"kind": "path", "alpha": 0.3, "target": 40.0, "general": 49.0},
           {"kind": "path", "alpha": 0.6, "target": 47.0, "general": 44.0},   # gain 17/20 = 85%, G +9
           {"kind": "path", "alpha": 0.8, "target": 46.0, "general": 40.0},   # dominated by 0.6
           final]
    # keep 80% of the gain (target >= 46): max general among {0.6, 0.8, final} -> 0.6
    assert rw.select_point(pts, rw.parse_rule("keep-target=80"), base=base, final=final) == 2
    # keep 90% (target >= 48): only the final qualifies
    assert rw.select_point(pts, rw.parse_rule("keep-target=90"), base=base, final=final) == 4
    assert rw.select_point(pts, rw.parse_rule("sum"), base=base, final=final) == 2           # 91 is the max
    assert rw.pareto_front(pts) == [0, 1, 2, 4]
    ov = rw.overshoot_check(pts, base=base, final=final)
    assert ov["overshoot"] and ov["witness"]["alpha"] == 0.6 and not ov["vacuous"]
    assert math.isclose(ov["witness"]["target_gain_kept"], 0.85)
    # raise the bar above what any point reaches: no overshoot
    assert not rw.overshoot_check(pts, base=base, final=final, general_margin=10.0)["overshoot"]
    # the final point itself is never a witness, and a final without target gain is flagged
    assert rw.overshoot_check([final], base=base, final=final)["witness"] is None
    assert rw.overshoot_check(pts, base=dict(base, target=60.0), final=final)["vacuous"]


def test_discover_run_layout(tmp_path):
    for step in (1, 3, 2):
        make_checkpoint(tmp_path, "lora", step=step)
    run = tmp_path / "lora_run"
    final, traj = rw.discover_run(run)
    assert final.name == "global_step_3" and [s for s, _ in traj] == [1, 2, 3]
    final, traj = rw.discover_run(run / "global_step_2")   # one checkpoint: siblings up to it
    assert final.name == "global_step_2" and [s for s, _ in traj] == [1, 2]
    with pytest.raises(FileNotFoundError, match="global_step"):
        rw.discover_run(tmp_path)


# -----------------------------------------------------------------------------
# acceptance 1: the endpoints of every path (logits, fp32)

@pytest.mark.parametrize("method", ALL_METHODS)
def test_endpoints_are_base_and_final(method, tiny_random, tmp_path):
    ckpt = make_checkpoint(tmp_path, method)
    model, tok = tiny_random
    base = logits(model)
    final, merged = final_reference(ckpt), merged_reference(ckpt)
    assert (final - base).abs().max() > 1e-3          # the adapter really changes the model
    runner = rw.open_run(model, tok, ckpt)
    rw.set_dense(runner, 0.0)
    assert torch.equal(logits(model), base), "dense alpha = 0 must be the base model bit for bit"
    rw.set_final(runner)
    assert torch.equal(logits(model), final), "alpha = 1 must be the final checkpoint bit for bit"
    rw.set_dense(runner, 1.0)
    assert torch.equal(logits(model), merged), "dense alpha = 1 must be the merged final model"
    torch.testing.assert_close(logits(model), final, rtol=1e-4, atol=1e-4)
    rw.set_dense(runner, 0.0)
    assert torch.equal(logits(model), base)
    if rw.has_factor_path(method):
        rw.set_factor(runner, 0.0)
        if method in ("pissa", "milora"):
            # residual base W0 - s B0 A0 is stored rounded: equal to fp32 rounding only (Deviation 2)
            torch.testing.assert_close(logits(model), base, rtol=1e-5, atol=1e-5)
        else:
            assert torch.equal(logits(model), base), "factor alpha = 0 must be the base model bit for bit"
        rw.set_factor(runner, 1.0)
        assert torch.equal(logits(model), final)
        rw.set_factor(runner, 0.5)
        adapter_form = logits(model)
        rw.bake(runner)                      # merged-weight evaluation form (Deviation 14)
        assert runner["mode"] == "dense"
        torch.testing.assert_close(logits(model), adapter_form, rtol=1e-4, atol=1e-4)
    assert rw.close_run(runner) is model
    assert not pm.adapter_layers(model) and pm.peft_state(model) is None
    assert torch.equal(logits(model), base), "close() must give the exact base model back"


@pytest.mark.parametrize("method", ALL_METHODS)
def test_every_method_has_a_rewind_path(method, tiny_random, tmp_path):
    """Every registry entry: each default path and uniform rewinding give the base at alpha = 0 and
    the trained model at alpha = 1 (what rewinding needs comes from the method's class)."""
    ckpt = make_checkpoint(tmp_path, method)
    model, tok = tiny_random
    base = logits(model)
    final, merged = final_reference(ckpt), merged_reference(ckpt)
    runner = rw.open_run(model, tok, ckpt)
    assert rw.path_label(method, "dense") and (rw.layer_class(method) or pm.AdapterLinear).rho_measures[0] in rw.RHO_MEASURES
    for path in rw.default_paths(method):
        assert rw.path_label(method, path)
        rw.set_path(runner, path, 1.0)
        assert torch.equal(logits(model), final if path == "factor" else merged)
        rw.set_path(runner, path, 0.0)
        torch.testing.assert_close(logits(model), base, rtol=1e-5, atol=1e-5)
    rw.rewind_point(runner, rw.parse_rewind("uniform=1"))
    torch.testing.assert_close(logits(model), final, rtol=1e-4, atol=1e-4)
    rw.rewind_point(runner, rw.parse_rewind("uniform=0"))
    if method != "full":   # Full FT's embeddings, norms and head sit outside the layers and stay at 1
        torch.testing.assert_close(logits(model), base, rtol=1e-5, atol=1e-5)
    info = rw.rewind_point(runner, rw.parse_rewind("minrho"))
    assert max(info["factors"].values()) <= 1.0
    rw.close_run(runner)


class _ScaleLinear(pm.LoraLinear):
    """A forker's method that tells rewinding nothing: no factor tensors, no labels."""
    method = "toyscale"
    factor_tensors = ()
    factor_label = pm.AdapterLinear.factor_label


def test_added_method_without_rewind_knowledge_gets_the_dense_path(tiny_random, tmp_path, monkeypatch):
    monkeypatch.setitem(pm.METHODS, "toyscale", pm.Method(pm.LoraConfig, _ScaleLinear, lambda i, o, c: c.r * (i + o)))
    assert not rw.has_factor_path("toyscale") and rw.default_paths("toyscale") == ["dense"]
    ckpt = make_checkpoint(tmp_path, "toyscale", r=4, alpha=8, dropout=0.0)
    model, tok = tiny_random
    base, final = logits(model), final_reference(ckpt)
    runner = rw.open_run(model, tok, ckpt)
    rw.set_final(runner)
    assert torch.equal(logits(model), final)
    rw.set_dense(runner, 0.0)
    assert torch.equal(logits(model), base)
    rw.rewind_point(runner, rw.parse_rewind("uniform=0"))
    assert torch.equal(logits(model), base)
    info = rw.rewind_point(runner, rw.parse_rewind("minrho"))   # rho = ||dW||_F along the dense path
    after = list(info["rho_after"].values())
    assert info["measure"] == "dw" and max(after) - min(after) <= 1e-5 * max(after)
    with pytest.raises(ValueError, match="no factor path"):
        rw.set_factor(runner, 0.5)
    rw.close_run(runner)


# -----------------------------------------------------------------------------
# factor path vs dense path

@pytest.mark.parametrize("method", [m for m in ALL_METHODS if rw.has_factor_path(m) and m != "oft"])
def test_factor_path_vs_dense_path(method, tiny_random, tmp_path):
    ckpt = make_checkpoint(tmp_path, method, scale=4.0)
    model, tok = tiny_random
    runner = rw.open_run(model, tok, ckpt)
    a = 0.3
    rw.set_factor(runner, a)
    Wf = {n: l.merged_weight().detach() for n, l in runner["layers"].items()}
    lf = logits(model)
    rw.set_dense(runner, a)
    Wd = {n: runner["dense"][n].weight.float().clone() for n in runner["layers"]}
    ld = logits(model)
    diff = max(float((Wf[n] - Wd[n]).abs().max()) for n in Wf)
    if pm.METHODS[method].layer.factor_is_dense:
        assert diff < 1e-5, f"{method}: dW is linear in the scaled tensor, so both paths are one model"
        torch.testing.assert_close(lf, ld, rtol=1e-4, atol=1e-4)
    elif method == "dora":
        # the row norm makes DoRA's factor path a different model between the endpoints
        assert diff > 1e-4
    else:
        assert method in ("pissa", "milora"), f"{method}: add its factor-vs-dense relation here"
        # PiSSA: s B(a) A(a) - [s B0 A0 + a s (BA - B0A0)] = (a^2 - a) s (B - B0)(A - A0), exactly
        for n, layer in runner["layers"].items():
            ft = runner["ft"][n]
            dB, dA = ft["lora_B"] - ft["lora_B0"], ft["lora_A"] - ft["lora_A0"]
            expect = (a * a - a) * layer.scaling * (dB @ dA)
            torch.testing.assert_close(Wf[n] - Wd[n], expect, rtol=1e-3, atol=1e-5)
        assert diff > 1e-4
    rw.close_run(runner)


@pytest.mark.parametrize("method", [m for m in ALL_METHODS if rw.has_factor_path(m) and pm.METHODS[m].layer.factor_is_dense])
def test_factor_point_matches_peft_scale_update(method, tiny_random, tmp_path):
    """The plain per-method formulas agree with peft_methods.scale_update_ (the library's hook)."""
    ckpt = make_checkpoint(tmp_path, method)
    model, tok = tiny_random
    pm.load_adapter(model, ckpt)
    for name, layer in pm.adapter_layers(model).items():
        ft = {k: v.detach().clone() for k, v in rw._own_tensors(layer).items()}
        new = pm.METHODS[method].layer.factor_point(ft, 0.35, W0=layer.base_layer.weight)
        pm.scale_update_(layer, 0.35)
        own = rw._own_tensors(layer)
        for k, v in new.items():
            torch.testing.assert_close(own[k], v, rtol=1e-6, atol=1e-7)


# -----------------------------------------------------------------------------
# OFT: the generator path keeps the spectrum, the dense path does not

def test_oft_generator_path_keeps_singular_values(tiny_random, tmp_path):
    # exact Cayley: R exactly orthogonal, so W0 blockdiag(R)^T has W0's singular values
    ckpt = make_checkpoint(tmp_path, "oft", scale=6.0, use_cayley_neumann=False)
    model, tok = tiny_random
    runner = rw.open_run(model, tok, ckpt)
    s0 = {n: torch.linalg.svdvals(rw._W0(runner, n)) for n in runner["layers"]}
    dense_dist = []
    for a in (0.1, 0.3, 0.5, 0.7, 1.0):
        rw.set_factor(runner, a)
        for n, layer in runner["layers"].items():
            s = torch.linalg.svdvals(layer.merged_weight())
            torch.testing.assert_close(s, s0[n], rtol=2e-5, atol=2e-5 * float(s0[n][0]))
        # the scaled generator really is sqrt(a) * q
        n0 = next(iter(runner["layers"]))
        torch.testing.assert_close(runner["layers"][n0].oft_q, runner["ft"][n0]["oft_q"] * math.sqrt(a))
        rw.set_dense(runner, a)
        dense_dist.append(max(rw.singular_value_distortion(rw._W0(runner, n), runner["dense"][n].weight)
                              for n in runner["layers"]))
    # the dense path leaves the orthogonal manifold in the middle (the bump of teaser-1.png) ...
    assert max(dense_dist[:4]) > 1e-3
    assert dense_dist[-1] < 1e-5             # ... and is back on it only at alpha = 1
    # the reference formula agrees with the wrapper
    n0, l0 = next(iter(runner["layers"].items()))
    rw.set_factor(runner, 0.3)
    R = pm.oft_rotation(runner["ft"][n0]["oft_q"].float() * math.sqrt(0.3), 16, use_cayley_neumann=False)   # (n, b, b)
    ref = pm.oft_merge_reference(rw._W0(runner, n0), R)          # W0 blockdiag(R(0.3))^T
    torch.testing.assert_close(l0.merged_weight(), ref, rtol=1e-5, atol=1e-6)
    rw.close_run(runner)


def test_oft_generator_path_neumann_is_nearly_isospectral(tiny_random, tmp_path):
    """With the default Cayley-Neumann (T=5) R is only approximately orthogonal: the generator path
    keeps the spectrum to O(||Q||^5), far better than the dense path."""
    ckpt = make_checkpoint(tmp_path, "oft", scale=0.2)
    model, tok = tiny_random
    runner = rw.open_run(model, tok, ckpt)
    rw.set_factor(runner, 0.5)
    gen = rw.sv_distortion(runner)
    rw.set_dense(runner, 0.5)
    dense = rw.sv_distortion(runner)
    assert gen < 1e-5 and dense > 100 * gen
    rw.set_factor(runner, 0.5, gen_map="linear")            # the alpha * Q option
    torch.testing.assert_close(next(iter(runner["layers"].values())).oft_q,
                               next(iter(runner["ft"].values()))["oft_q"] * 0.5)
    rw.close_run(runner)


# -----------------------------------------------------------------------------
# layer-wise rewinding

def test_minrho_equalises_rho_and_saferho(tiny_random, tmp_path):
    ckpt = make_checkpoint(tmp_path, "oft", layer_scale=lambda l: 1.0 + l)   # later layers rotate more
    model, tok = tiny_random
    runner = rw.open_run(model, tok, ckpt)
    rho = rw.layer_rhos(runner, "q")
    assert sorted(rho) == [0, 1, 2, 3] and rho[3] > 2 * rho[0]
    info = rw.rewind_point(runner, rw.parse_rewind("minrho"))
    after = list(info["rho_after"].values())
    assert max(after) - min(after) <= 1e-6 * max(after), f"MinRho must make rho equal across layers: {after}"
    assert max(info["factors"].values()) <= 1.0 and info["factors"][0] == 1.0
    for n, layer in runner["layers"].items():   # the model really holds c_l * q
        c = info["factors"][rw.layer_index(n)]
        torch.testing.assert_close(layer.oft_q, runner["ft"][n]["oft_q"] * c)
    # ||R - I||_F with bisection: equal too (ratio would only be approximate for this measure)
    info = rw.rewind_point(runner, rw.parse_rewind("minrho"), measure="r_minus_i", factor_rule="solve")
    after = list(info["rho_after"].values())
    assert max(after) - min(after) <= 1e-5 * max(after)
    assert max(info["factors"].values()) <= 1.0
    # SafeRho on 4 layers: tau = mean of all 4, layers below it untouched, above it brought to tau
    info = rw.rewind_point(runner, rw.parse_rewind("saferho"))
    assert "note" in info and math.isclose(info["tau"], sum(rho.values()) / 4, rel_tol=1e-9)
    for l, c in info["factors"].items():
        assert c <= 1.0
        if rho[l] <= info["tau"]:
            assert c == 1.0 and math.isclose(info["rho_after"][l], rho[l], rel_tol=1e-9)
        else:
            assert math.isclose(info["rho_after"][l], info["tau"], rel_tol=1e-6)
    # uniform=0.4 is the generator-path point alpha = 0.4
    rw.rewind_point(runner, rw.parse_rewind("uniform=0.4"))
    lu = logits(model)
    rw.set_factor(runner, 0.4)
    assert torch.equal(lu, logits(model))
    rw.close_run(runner)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_rewind_additive_method_dw_measure(method, tiny_random, tmp_path):
    """Extension (Deviation 8): LoRA / Full FT rewinding with rho = ||dW||_F equalises rho under MinRho."""
    ckpt = make_checkpoint(tmp_path, method)
    model, tok = tiny_random
    runner = rw.open_run(model, tok, ckpt)
    info = rw.rewind_point(runner, rw.parse_rewind("minrho"))
    after = list(info["rho_after"].values())
    assert info["measure"] == "dw" and max(after) - min(after) <= 1e-5 * max(after)
    assert max(info["factors"].values()) <= 1.0
    # the model really sits at the per-layer points c_l
    for n, W0, W in rw.module_weights(runner):
        c = info["factors"][rw.layer_index(n)]
        if method == "full":     # every weight of layer l is lerp(W0, W_ft, c_l)
            torch.testing.assert_close(W, rw.lerp_exact(W0, runner["W1"][n], c), rtol=1e-6, atol=1e-7)
        else:                    # B <- c_l B
            torch.testing.assert_close(runner["layers"][n].lora_B, runner["ft"][n]["lora_B"] * c)
    with pytest.raises(ValueError, match="OFT only"):
        rw.rewind_point(runner, rw.parse_rewind("minrho"), measure="q")
    rw.close_run(runner)


# -----------------------------------------------------------------------------
# acceptance 3: a grid reuses one loaded model; outputs; saved points are ordinary checkpoints

def test_grid_reuses_one_model_and_writes_outputs(tmp_path):
    for step in (1, 2):
        make_checkpoint(tmp_path, "lora", step=step, scale=step)
        make_checkpoint(tmp_path, "oft", step=step, scale=step)
    loads, seen = [], []

    def loader(spec, dtype=None, device=None):
        loads.append(spec)
        return build_random_toy_model(seed=0)

    def fake_eval(model, tokenizer, *, base_general=None, tag=None):
        seen.append(id(model))
        lg = logits(model)
        return {"target_score": 50 + 40 * float(lg[..., :100].mean()),
                "general_score": 50 + 40 * float(lg[..., 100:].mean()), "families": {}}

    cfg = dict(base="tiny", checkpoint=[str(tmp_path / "lora_run"), str(tmp_path / "oft_run")], grid="0:1:0.25",
               rewind=["minrho", "uniform=0.4"], out=str(tmp_path / "out"), save="all", sv_distortion=True,
               select=["keep-target=80", "sum"])
    res = rw.run_analysis(cfg, loader=loader, evaluate_fn=fake_eval, log=lambda *a: None)
    assert loads == ["tiny"], "the base model must be loaded exactly once"
    assert len(set(seen)) == 1 and seen[0] == res["model_id"], "every point must be evaluated on the same object"
    # base + per run: 1 training checkpoint + final + 3 interior points per path + 2 rewinds
    assert len(seen) == 1 + (1 + 1 + 3 * 1 + 2) + (1 + 1 + 3 * 2 + 2)
    lora, oft = res["runs"]
    assert lora["paths"] == ["factor"] and oft["paths"] == ["factor", "dense"]
    gen = [p["general"] for p in lora["points"] if p["kind"] == "path"]
    assert len(set(gen)) == 3, "the weights must actually change from point to point"
    gen_sv = [p["sv_distortion"] for p in oft["points"] if p.get("path") == "factor"]
    dense_sv = [p["sv_distortion"] for p in oft["points"] if p.get("path") == "dense"]
    assert max(gen_sv) < min(dense_sv)
    assert set(oft["selection"]) == {"keep-target=80", "sum"} and "factor" in oft["overshoot"]
    out = tmp_path / "out"
    for f in ("results.json", "results.csv", "tradeoff.png", "summary.md"):
        assert (out / f).stat().st_size > 0
    rows = (out / "results.csv").read_text().splitlines()
    assert len(rows) == 1 + len(lora["points"]) + len(oft["points"])

    # saved points are ordinary checkpoints: an OFT adapter dir and a merged HF dir
    pdir = out / "points" / oft["label"]
    ad, md = pdir / "factor_a0.5", pdir / "dense_a0.5"
    assert (ad / pm.CONFIG_FILE).exists() and (md / "config.json").exists() and not (md / pm.CONFIG_FILE).exists()
    m1, tok = build_random_toy_model(seed=0)
    pm.load_adapter(m1, ad)
    r = rw.open_run(*build_random_toy_model(seed=0), tmp_path / "oft_run" / "global_step_2")
    rw.set_factor(r, 0.5)
    assert torch.equal(logits(m1.eval()), logits(r["model"]))
    rw.set_dense(r, 0.5)
    m2, _ = load_model(str(md), dtype="float32", device="cpu")
    assert torch.equal(logits(m2), logits(r["model"]))
    assert geometry.read_checkpoint_info(ad)["kind"] == "adapter"
    assert geometry.read_checkpoint_info(md)["kind"] == "hf"
    assert (pdir / "rewind_minrho" / pm.CONFIG_FILE).exists()


def test_generation_cache_keys_change_with_every_point_setting(tmp_path):
    """A rerun into the same --out with another rewind measure, eval form or dtype must not reuse
    the cached generations of the old settings (same settings: same keys)."""
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "adapter.safetensors").write_bytes(b"x")
    cfg = {"base": "toy", "domain": "math", "n_per_family": 20, "seed": 0, "gen_map": "sqrt"}
    assert rw.run_cache_key(dict(cfg), ck) == rw.run_cache_key(dict(cfg), ck)
    assert rw.base_cache_key(dict(cfg)) == rw.base_cache_key(dict(cfg))
    run_changes = {"rho": "r_minus_i", "eval_form": "wrapped", "dtype": "bfloat16", "rewind_map": "sqrt",
                   "factor_rule": "power", "no_cap": True, "safe_layers": 3, "gen_map": "linear",
                   "families": ["math"], "n_per_family": 30}
    for k, v in run_changes.items():
        assert rw.run_cache_key({**cfg, k: v}, ck) != rw.run_cache_key(cfg, ck), k
    for k in ("dtype", "device", "n_per_family", "seed"):
        assert rw.base_cache_key({**cfg, k: "other"}) != rw.base_cache_key(cfg), k
    assert rw.base_cache_key({**cfg, "rho": "r_minus_i"}) == rw.base_cache_key(cfg)   # the base has no rewind
    before = rw.run_cache_key(cfg, ck)
    (ck / "adapter.safetensors").write_bytes(b"xy")             # the checkpoint was retrained
    assert rw.run_cache_key(cfg, ck) != before


def test_training_checkpoints_swap_in_place(tiny_random, tmp_path):
    """Loading a training checkpoint and going back to the final one gives the final model exactly
    (PiSSA included: the residual base is rebuilt from the exact W0, no drift)."""
    for step in (1, 2):
        make_checkpoint(tmp_path, "pissa", step=step, scale=step)
    model, tok = tiny_random
    runner = rw.open_run(model, tok, tmp_path / "pissa_run" / "global_step_2")
    final = logits(model)
    rw.set_checkpoint(runner, tmp_path / "pissa_run" / "global_step_1")
    torch.testing.assert_close(logits(model), final_reference(tmp_path / "pissa_run" / "global_step_1"))
    rw.set_final(runner)
    assert torch.equal(logits(model), final)
    with pytest.raises(ValueError, match="not from the same run"):
        rw.set_checkpoint(runner, make_checkpoint(tmp_path, "lora"))
    rw.close_run(runner)


def test_toy_evaluator_end_to_end(tiny_random, tmp_path):
    """The real evaluate.evaluate_toy on the one model (tiny sizes): scores land in the points."""
    make_checkpoint(tmp_path, "lora")
    fn = rw.make_toy_evaluator(n_per_family=1, families=["math", "nq"], batch_size=8)
    model, tok = tiny_random
    cfg = dict(base="tiny", checkpoint=[str(tmp_path / "lora_run")], grid="0,0.5,1", out=None, save="none")
    res = rw.run_analysis(cfg, loader=lambda *a, **k: (model, tok), evaluate_fn=fn, log=lambda *a: None)
    pts = res["runs"][0]["points"]
    assert all(p["target"] is not None and p["general"] is not None for p in pts)
    assert set(pts[-1]["families"]) == {"math", "nq"}


def test_cli_help_and_bad_input():
    r = subprocess.run([sys.executable, "rewind.py", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--rewind" in r.stdout and "--n-per-family" in r.stdout
    r = subprocess.run([sys.executable, "rewind.py", "--checkpoint", "x", "--out", "/tmp/x", "--grid", "0:1:0.3"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "does not divide" in r.stderr


def test_cli_smoke_subprocess(tmp_path):
    """--smoke end to end in a subprocess (random tiny model, synthetic 2-checkpoint LoRA run); --eval
    none keeps it short: the scored path is covered in-process above."""
    r = subprocess.run([sys.executable, "rewind.py", "--smoke", "--eval", "none", "--out", str(tmp_path / "s"),
                        "--threads", "1"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((tmp_path / "s" / "results.json").read_text())
    run = res["runs"][0]
    assert run["method"] == "lora" and [p["kind"] for p in run["points"]].count("rewind") == 2
    assert json.loads((tmp_path / "s" / "config.json").read_text())["smoke"] is True
    assert (tmp_path / "s" / "points" / run["label"] / "rewind_minrho" / pm.CONFIG_FILE).exists()
