"""findings.py: curve matching and the claim rules on synthetic numbers with known answers, and the
whole study at smoke size (resumes; same seeds give the same numbers)."""
import math
import random

import pytest

import arena
import findings
import stats


def test_forgetting_at_gain_interpolates_the_first_crossing():
    curve = [(0.0, 0.0), (10.0, 2.0), (20.0, 6.0), (15.0, 9.0), (30.0, 12.0)]
    assert findings.forgetting_at_gain(curve, 15.0) == pytest.approx(4.0)     # first crossing, not the later one
    assert findings.forgetting_at_gain(curve, 10.0) == pytest.approx(2.0)
    assert findings.forgetting_at_gain(curve, 25.0) == pytest.approx(11.0)    # 9 + 3 * 10/15: (15, 9) -> (30, 12)
    assert findings.forgetting_at_gain(curve, 31.0) is None
    assert findings.matched_gain([curve, [(0.0, 0.0), (18.0, 1.0)]]) == 18.0


def _rows(spec: dict, seeds=range(5), noise=0.5, seed=0) -> dict:
    """rows[("SFT", label, seed)] = {"gain", "forgetting"} around the given means."""
    rng = random.Random(seed)
    return {(p, lab, s): {"gain": g + rng.gauss(0, noise), "forgetting": f + rng.gauss(0, noise)}
            for (p, lab), (g, f) in spec.items() for s in seeds}


def test_f1_holds_when_full_leads_both_axes_and_fails_when_a_method_forgets_more():
    spec = {("SFT", "Full FT"): (50, 20), ("SFT", "LoRA r8"): (40, 2), ("SFT", "OFT b16"): (42, 3)}
    assert findings.claim_f1(_rows(spec), ["Full FT", "LoRA r8", "OFT b16"])[0] == stats.HOLDS
    spec[("SFT", "PiSSA r8")] = (45, 30)
    assert findings.claim_f1(_rows(spec), ["Full FT", "LoRA r8", "OFT b16", "PiSSA r8"])[0] == stats.FAILS


def test_f3_and_f4_rules():
    spec = {("SFT", "LoRA r8"): (40, 1.0), ("SFT", "PiSSA r8"): (35, 15.0),
            ("SFT", "VeRA r64"): (10, 0.2), ("SFT", "IA3"): (5, 0.1)}
    rows = _rows(spec, noise=0.3)
    assert findings.claim_f3(rows)[0] == stats.HOLDS
    assert findings.claim_f4(rows)[0] == stats.HOLDS
    spec[("SFT", "IA3")] = (5, 8.0)                       # IA3 forgetting well above 2 points
    assert findings.claim_f4(_rows(spec, noise=0.3))[0] == stats.FAILS
    spec[("SFT", "PiSSA r8")] = (35, 1.0)                 # no difference: no call
    assert findings.claim_f3(_rows(spec, noise=0.3))[0] == stats.INCONCLUSIVE


def test_f2_compares_forgetting_at_equal_target_gain():
    # OFT reaches gain 30 with 2 points of forgetting, LoRA with 6: OFT is the better frontier,
    # although LoRA's final point (gain 40) has a larger gain
    curves = {}
    for s in range(4):
        e = 0.1 * s
        curves[("SFT", "OFT b32", s)] = [(0, 0), (15, 1 + e), (30, 2 + e)]
        curves[("SFT", "LoRA r8", s)] = [(0, 0), (20, 3 + e), (40, 8 + e)]
        curves[("SFT", "OFT b16", s)] = [(0, 0), (30, 5 + e)]
        curves[("SFT", "LoRA r4", s)] = [(0, 0), (30, 5 + e + (0.3 if s % 2 else -0.3))]
    verdict, text = findings.claim_budget_pairs(curves, {})
    assert "LoRA r8 - OFT b32 forgetting at equal gain +3.5" in text       # 5.5 - 2 at gain 30
    assert verdict == stats.INCONCLUSIVE                                    # the b16 / r4 pair is a tie


def test_f5_and_f9_rules():
    rows = _rows({("SFT", "LoRA r8"): (40, 6.0), ("GRPO", "LoRA r8"): (20, 0.5)}, seeds=range(4), noise=0.2)
    curves = {("SFT", "LoRA r8", s): [(0, 0), (20, 3.0 + 0.1 * s), (40, 6.0)] for s in range(4)}
    assert findings.claim_f5(rows, curves, ["LoRA r8"])[0] == stats.HOLDS
    passk = {("LoRA r8", s): {"short": {"1": 40 + s * 0.1, "64": 90 + s * 0.2},
                              "long": {"1": 41 + s * 0.1, "64": 85 + s * 0.3}} for s in range(4)}
    assert findings.claim_f9(passk)[0] == stats.HOLDS
    for s in range(4):                                    # pass@1 falls clearly too: the claim fails
        passk[("LoRA r8", s)]["long"]["1"] = 30 + s * 0.1
    assert findings.claim_f9(passk)[0] == stats.FAILS


def test_geometry_claims_read_the_sign_of_r_with_its_interval():
    rng = random.Random(1)
    rows, geo = {}, {}
    for i in range(12):                                   # forgetting rises with the drift metrics
        forget = float(i)
        rows[("SFT", f"m{i}", 0)] = {"forgetting": forget}
        geo[(f"m{i}", 0)] = {"act_proc_residual": 0.1 * i + rng.gauss(0, 0.05), "act_gram_distortion": 0.2 * i + rng.gauss(0, 0.1),
                             "csd_G_un": 0.01 * i + rng.gauss(0, 0.01), "act_cka": 1 - 0.02 * i + rng.gauss(0, 0.01),
                             "w_fluct_retention": rng.random(), "w_fluct_adaptation": rng.random()}
    verdict, text = findings.claim_geometry("F7", geo, rows)
    assert verdict == stats.HOLDS and "(n = 12 checkpoints)" in text
    for g in geo.values():                                # CKA now rises with forgetting: F7 fails
        g["act_cka"] = 2 - g["act_cka"]
    assert findings.claim_geometry("F7", geo, rows)[0] == stats.FAILS
    assert findings.claim_geometry("F6", geo, rows)[0] == stats.INCONCLUSIVE   # noise: no call


def test_f8_overshoot_and_generator_path():
    rows, interp = {}, {}
    for s in range(4):
        for lab in ("Full FT", "LoRA r8", "OFT b32"):
            rows[("SFT", lab, s)] = {"target": 50.0, "general": 60.0 + 0.1 * s}
            interp[(lab, s)] = {"dense": {"0.4": {"target": 40.0, "general": 65.0},
                                          "0.8": {"target": 49.0, "general": 64.0 + 0.2 * s}}}
        interp[("OFT b32", s)]["factor"] = {"0.4": {"target": 42.0, "general": 66.0 + 0.1 * s},
                                            "0.8": {"target": 49.5, "general": 64.5}}
    verdict, text = findings.claim_f8(interp, rows)      # +3 at alpha 0.8; generator +1.5 on average
    assert verdict == stats.HOLDS and "n = 12 runs" in text and "n = 4 seeds" in text
    for s in range(4):                                   # the final is better than alpha 0.8: no overshoot
        rows[("SFT", "LoRA r8", s)]["general"] = rows[("SFT", "Full FT", s)]["general"] = 80.0 + s
        rows[("SFT", "OFT b32", s)]["general"] = 80.0 + s
    assert findings.claim_f8(interp, rows)[0] == stats.FAILS


@pytest.mark.slow
def test_smoke_study_resumes_and_is_deterministic(tmp_path):
    out = tmp_path / "f"
    assert findings.main(["--smoke", "--out", str(out)]) == 0
    first = (out / "findings.md").read_text()
    for f in ("tradeoff_curves.png", "final_points.png", "passk.png", "geometry.png", "interpolation.png"):
        assert (out / f).stat().st_size > 10_000
    assert all(f"| F{c} |" in first for c in range(1, 10))
    # a rerun finds every unit done and writes the same table
    assert findings.plan_units(out, findings.BUDGETS["smoke"], "train") == []
    assert findings.plan_units(out, findings.BUDGETS["smoke"], "score") == []
    assert findings.main(["--smoke", "--out", str(out)]) == 0
    assert (out / "findings.md").read_text() == first


@pytest.mark.slow
def test_same_seed_gives_the_same_numbers_and_another_seed_other_numbers(tmp_path):
    import torch
    from safetensors.torch import load_file

    import loading
    B = findings.BUDGETS["smoke"]

    def run(seed, name):
        out = tmp_path / name
        findings._train_sft(out, "lora", {"r": 8, "alpha": 16}, seed, B)
        ckpt = loading.finished_checkpoint(out)
        return load_file(str(ckpt / "adapter.safetensors")), findings._score(ckpt, seed, B), ckpt

    (a, score_a, ckpt), (b, score_b, _), (c, _, _) = run(0, "a"), run(0, "b"), run(1, "c")
    assert score_a == score_b and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)      # init, dropout and data order follow the seed
    # scoring merged (the study's speed-up) gives the unmerged adapter's scores
    assert findings._score_model(*arena._toy_model(ckpt), 0, B) == score_a


def test_general_halfwidths_by_hand():
    """One seed: 1.96 sqrt(sum_f p(1-p) / n) / 3; a mean over 4 seeds with independent items halves it."""
    rows = {("SFT", "A", s): {"families": {"ifeval": 50.0, "bbh": 50.0, "nq": 50.0}} for s in range(4)}
    one, cell = findings.general_halfwidths(rows, 300)
    assert one == pytest.approx(1.96 * math.sqrt(3 * 0.25 / 300) / 3 * 100)     # 3.27 points
    assert cell == pytest.approx(one / 2)


def test_train_units_start_with_the_long_grpo_runs(tmp_path):
    units = findings.plan_units(tmp_path, findings.BUDGETS["smoke"], "train")
    kinds = [u["kind"] for u in units]
    assert kinds == sorted(kinds, key=lambda k: k != "grpo") and kinds[0] == "grpo" and "sft" in kinds


def test_resume_refuses_a_directory_made_with_another_budget(tmp_path):
    """A finished unit of another budget (or scoring protocol) must not be mixed into the study."""
    import json
    B = dict(findings.BUDGETS["smoke"])
    (tmp_path / "config.json").write_text(json.dumps({"budget": dict(B, long_grpo_steps=36)}))
    with pytest.raises(SystemExit, match="config.json.*budget, protocol"):
        findings.run_findings(tmp_path, B)
    assert not (tmp_path / "sft").exists()           # refused before any work
