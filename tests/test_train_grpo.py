"""Tests for train_grpo.py: hand-computed GRPO math, a per-token comparison with TRL's
`GRPOTrainer._compute_loss` (test-only oracle), the sampler, the merged-weight push, bad input,
and a few-step run (in process and via the CLI) on a tiny random Qwen2.

Run: python -m pytest tests/test_train_grpo.py -x -q      (CPU, well under a minute)
"""
import copy
import json
import math
import os
import subprocess
import sys
import warnings
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import evaluate  # noqa: E402
import loading  # noqa: E402
from loading import ConfigError  # noqa: E402
import peft_methods as pm  # noqa: E402
import toy_world  # noqa: E402
import train_grpo as tg  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def tiny(request):
    """(model, tokenizer): the lead's `tiny_random` fixture, else the toy architecture at random."""
    try:
        return request.getfixturevalue("tiny_random")
    except pytest.FixtureLookupError:
        return toy_world.build_random_toy_model(seed=0)


# -----------------------------------------------------------------------------
# advantages


def test_group_advantages_hand_computed():
    r = torch.tensor([1., 0., 0., 1., 1., 1., 1., 1.])
    # group 1: mean 0.5, unbiased std sqrt(4 * 0.25 / 3) = 0.577350; group 2 all equal -> 0
    s = math.sqrt(1 / 3)
    want = torch.tensor([0.5, -0.5, -0.5, 0.5]) / (s + 1e-6)
    A = tg.group_advantages(r, 4)
    assert torch.allclose(A[:4], want, atol=1e-6) and abs(A[0].item() - 0.866024) < 1e-5
    assert torch.equal(A[4:], torch.zeros(4))
    # [0, 0, 1]: mean 1/3, std sqrt(((1/3)^2 * 2 + (2/3)^2) / 2) = sqrt(1/3)
    A3 = tg.group_advantages(torch.tensor([0., 0., 1.]), 3)
    assert torch.allclose(A3, torch.tensor([-0.577350, -0.577350, 1.154700]), atol=1e-5)
    # Dr. GRPO: no std
    assert torch.allclose(tg.group_advantages(r, 4, scale="none")[:4], torch.tensor([.5, -.5, -.5, .5]))


def test_group_advantages_group_of_one_and_all_equal_never_nan():
    # group of 1 (verl): mean 0, std 1 -> A = r / (1 + eps)
    A = tg.group_advantages(torch.tensor([1., 0.]), 1)
    assert torch.allclose(A, torch.tensor([1 / (1 + 1e-6), 0.]))
    assert torch.equal(tg.group_advantages(torch.tensor([1., 0.]), 1, scale="none"), torch.tensor([1., 0.]))
    # all-equal groups: exactly 0 even with eps = 0 and non-representable rewards
    for eps in (1e-6, 0.0):
        A = tg.group_advantages(torch.tensor([0.1, 0.1, 0.1, 0., 0., 0.]), 3, eps=eps)
        assert torch.equal(A, torch.zeros(6)), A


# -----------------------------------------------------------------------------
# log-probs, entropy, masks


def test_token_logprobs_hand_and_reference():
    logits = torch.tensor([[[0.0, math.log(3.0)]]])            # softmax [1/4, 3/4]
    tok = torch.tensor([[1]])
    assert abs(tg.token_logprobs(logits, tok).item() - math.log(0.75)) < 1e-6
    # T = 2: logits / 2 -> p1 = sqrt(3) / (1 + sqrt(3))
    want = math.log(math.sqrt(3) / (1 + math.sqrt(3)))
    assert abs(tg.token_logprobs(logits, tok, temperature=2.0).item() - want) < 1e-6
    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 5, 11, generator=g) * 4
    t = torch.randint(0, 11, (3, 5), generator=g)
    for T in (1.0, 0.7):
        assert torch.allclose(tg.token_logprobs(z, t, T), tg.token_logprobs_reference(z, t, T), atol=1e-5)
    # entropy: uniform over 4 -> ln 4; one-hot-ish -> ~0
    assert abs(tg.token_entropy(torch.zeros(1, 1, 4)).item() - math.log(4)) < 1e-6
    assert tg.token_entropy(torch.tensor([[[100.0, 0.0, 0.0]]])).item() < 1e-6


def test_completion_mask_first_eos_and_padding():
    ids = torch.tensor([[5, 2, 0, 0], [5, 6, 7, 8], [2, 2, 2, 2]])
    m = tg.completion_mask(ids, [2], lengths=[2, 4, 1])
    assert m.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    # pad == EOS (Qwen2.5 base): the real EOS is kept, the padding after it is not
    m = tg.completion_mask(torch.tensor([[5, 2, 2, 2], [7, 7, 7, 7]]), [2])
    assert m.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    # several EOS ids: the first of either ends the completion
    m = tg.completion_mask(torch.tensor([[5, 9, 3, 2]]), [2, 3])
    assert m.tolist() == [[1, 1, 1, 0]]


# -----------------------------------------------------------------------------
# clipped surrogate, dual clip, KL, aggregation


def _loss_at(ratios, A, **kw):
    old = torch.zeros(1, len(ratios))
    logp = torch.log(torch.tensor([ratios])).requires_grad_(True)
    loss, info = tg.policy_loss_per_token(logp, old, torch.tensor([A]), **kw)
    return loss, info, logp


def test_policy_loss_hand_computed_with_dual_clip():
    r = [1.0, 1.5, 0.5, 4.0]
    # A = +1: -min(ρ, clip(ρ, .8, 1.2)) -> [-1, -1.2, -0.5, -1.2]
    loss, info, logp = _loss_at(r, 1.0)
    assert torch.allclose(loss, torch.tensor([[-1.0, -1.2, -0.5, -1.2]]))
    assert info["clip_high"].tolist() == [[False, True, False, True]]
    assert not info["clip_low"].any() and not info["clip_dual"].any()
    loss.sum().backward()   # clipped tokens carry no gradient; d(-ρ)/dℓ = -ρ elsewhere
    assert torch.allclose(logp.grad, torch.tensor([[-1.0, 0.0, -0.5, 0.0]]))
    # A = -1: max(ρ, clip ρ) -> [1, 1.5, 0.8, 4]; dual clip c=3 caps 4 -> 3
    loss, info, logp = _loss_at(r, -1.0)
    assert torch.allclose(loss, torch.tensor([[1.0, 1.5, 0.8, 3.0]]))
    assert info["clip_low"].tolist() == [[False, False, True, False]]
    assert info["clip_dual"].tolist() == [[False, False, False, True]]
    loss.sum().backward()
    assert torch.allclose(logp.grad, torch.tensor([[1.0, 1.5, 0.0, 0.0]]))
    loss, _, _ = _loss_at(r, -1.0, dual_clip=None)
    assert torch.allclose(loss, torch.tensor([[1.0, 1.5, 0.8, 4.0]]))
    # A = -2, ρ = 4: max(8, 2.4) = 8, capped at -A c = 6; separate ε_high = 0.28 (DAPO)
    loss, _, _ = _loss_at([4.0], -2.0)
    assert abs(loss.item() - 6.0) < 1e-5
    loss, _, _ = _loss_at([1.5], 1.0, eps_high=0.28)
    assert abs(loss.item() + 1.28) < 1e-6
    # log-ratio clamp at ±20 (verl) and A = 0 gives 0
    big, _ = tg.policy_loss_per_token(torch.tensor([[30.0]]), torch.tensor([[0.0]]), torch.tensor([-1.0]),
                                      dual_clip=None)
    assert big.item() == pytest.approx(math.exp(20), rel=1e-5)   # ρ = e^20, not e^30
    zero, _, _ = _loss_at([0.3, 2.0], 0.0)
    assert torch.equal(zero, torch.zeros(1, 2))


def test_kl_k3_hand_computed():
    logp, ref = torch.log(torch.tensor([[0.5, 0.3]])), torch.log(torch.tensor([[0.25, 0.3]]))
    D = tg.kl_k3(logp, ref)
    # Δ = ln 0.5: 0.5 - ln 0.5 - 1 = 0.193147; equal log-probs -> 0
    assert abs(D[0, 0].item() - (0.5 - math.log(0.5) - 1)) < 1e-6 and abs(D[0, 1].item()) < 1e-7
    g = torch.Generator().manual_seed(1)
    assert (tg.kl_k3(torch.randn(50, generator=g), torch.randn(50, generator=g)) >= 0).all()


def test_aggregate_loss_variants_hand_computed_and_accumulation():
    l = torch.tensor([[1., 2., 3.], [4., 0., 0.]])
    m = torch.tensor([[1., 1., 1.], [1., 0., 0.]])
    assert tg.aggregate_loss(l, m, "dapo").item() == pytest.approx(10 / 4)        # token-mean
    assert tg.aggregate_loss(l, m, "grpo").item() == pytest.approx((6 / 3 + 4 / 1) / 2)
    assert tg.aggregate_loss(l, m, "bnpo").item() == pytest.approx(10 / 4)
    assert tg.aggregate_loss(l, m, "dr_grpo", max_len=5).item() == pytest.approx(10 / (2 * 5))
    for mode in tg.LOSS_AGG:   # empty mask -> 0, not NaN
        assert tg.aggregate_loss(l, torch.zeros_like(m), mode).item() == 0.0
    with pytest.raises(ValueError, match="loss-agg"):
        tg.aggregate_loss(l, m, "nope")
    # micro-batches with mini-batch normalisers sum to the full-batch value
    for mode in ("dapo", "grpo", "dr_grpo"):
        full = tg.aggregate_loss(l, m, mode, max_len=5)
        parts = sum(tg.aggregate_loss(l[i:i + 1], m[i:i + 1], mode, num_tokens=4, num_seqs=2, max_len=5)
                    for i in range(2))
        assert parts.item() == pytest.approx(full.item())


# -----------------------------------------------------------------------------
# TRL oracle: GRPOTrainer._compute_loss on identical tensors


def _trl_loss(loss_type, logp, old, adv, mask, *, beta=0.0, ref=None, max_len=None):
    """Run TRL's `_compute_loss` with a stand-in `self` whose forward returns our log-probs."""
    trl_grpo = pytest.importorskip("trl.trainer.grpo_trainer")

    class Acc:
        num_processes = 1
        gather = gather_for_metrics = staticmethod(lambda x: x)
        reduce = staticmethod(lambda x, reduction="sum": x)

    logp = logp.clone().requires_grad_(True)
    fake = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logp, torch.zeros_like(logp), None),
        aux_loss_enabled=False, top_entropy_quantile=1.0, off_policy_mask_threshold=None,
        importance_sampling_level="token", beta=beta, loss_type=loss_type, epsilon_low=0.2,
        epsilon_high=0.2, use_vllm=False, vllm_importance_sampling_correction=False,
        model=SimpleNamespace(training=True), current_gradient_accumulation_steps=1,
        max_completion_length=max_len or logp.shape[1], _entropy_bonus_enabled=False,
        _metrics={"train": defaultdict(list)}, accelerator=Acc(),
        args=SimpleNamespace(delta=None, use_bias_correction_kl=False, steps_per_generation=1))
    N, L = logp.shape
    inputs = {"prompt_ids": torch.zeros(N, 1, dtype=torch.long), "prompt_mask": torch.ones(N, 1),
              "completion_ids": torch.zeros(N, L, dtype=torch.long), "completion_mask": mask,
              "advantages": adv, "old_per_token_logps": old, "num_items_in_batch": mask.sum()}
    if ref is not None:
        inputs["ref_per_token_logps"] = ref
    return trl_grpo.GRPOTrainer._compute_loss(fake, None, inputs), logp


def _trl_per_token(logp, old, adv, beta=0.0, ref=None):
    """TRL's per-token loss: with `dapo` and normaliser Σm, ∂loss/∂m_t = ℓ_t / Σm."""
    mask = torch.ones_like(logp).requires_grad_(True)
    loss, _ = _trl_loss("dapo", logp, old, adv, mask, beta=beta, ref=ref)
    (g,) = torch.autograd.grad(loss, mask)
    # d/dm [Σ ℓ m / Σ m] = ℓ/Σm - loss/Σm   (Σm is a tensor in the graph too)
    return g * mask.sum().detach() + loss.detach()


def test_per_token_loss_matches_trl_and_dual_clip_is_the_only_difference():
    g = torch.Generator().manual_seed(0)
    N, L = 6, 7
    old = torch.randn(N, L, generator=g) - 2
    logp = old + torch.randn(N, L, generator=g) * 0.8        # ratios from ~0.1 to ~10
    logp[1, 0], logp[3, 2], logp[5, 6] = old[1, 0] + 2.0, old[3, 2] + 1.5, old[5, 6] - 2.5  # ρ 7.4, 4.5, 0.08
    adv = torch.tensor([1.2, -0.7, 0.0, -2.0, 0.4, -1.0])
    trl = _trl_per_token(logp, old, adv)
    ours, _ = tg.policy_loss_per_token(logp, old, adv, dual_clip=None)
    assert torch.allclose(ours, trl, atol=1e-5)
    # release's dual clip: only tokens with A < 0 and loss > -3A differ, and there ours = -3A
    dual, info = tg.policy_loss_per_token(logp, old, adv, dual_clip=3.0)
    capped = torch.where(adv[:, None] < 0, torch.minimum(trl, -3.0 * adv[:, None]), trl)
    assert torch.allclose(dual, capped, atol=1e-5)
    assert info["clip_dual"].any(), "the test tensors should exercise the dual clip"
    # with β > 0 both add β·k3
    ref = logp + torch.randn(N, L, generator=g) * 0.3
    trl_kl = _trl_per_token(logp, old, adv, beta=0.04, ref=ref)
    assert torch.allclose(ours + 0.04 * tg.kl_k3(logp, ref), trl_kl, atol=1e-5)


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "bnpo", "dr_grpo"])
def test_aggregation_matches_trl(loss_type):
    g = torch.Generator().manual_seed(3)
    N, L = 4, 6
    old = torch.randn(N, L, generator=g)
    logp = old + 0.3 * torch.randn(N, L, generator=g)
    adv = torch.tensor([0.5, -1.0, 1.5, -0.2])
    mask = tg.completion_mask(torch.zeros(N, L, dtype=torch.long), [1], lengths=[6, 3, 1, 4])
    trl, trl_logp = _trl_loss(loss_type, logp, old, adv, mask, max_len=9)
    mine_logp = logp.clone().requires_grad_(True)
    per_tok, _ = tg.policy_loss_per_token(mine_logp, old, adv, dual_clip=None)
    mine = tg.aggregate_loss(per_tok, mask, loss_type, max_len=9)
    assert mine.item() == pytest.approx(trl.item(), abs=1e-6)
    trl.backward()
    mine.backward()
    assert torch.allclose(mine_logp.grad, trl_logp.grad, atol=1e-6)


# -----------------------------------------------------------------------------
# rewards and bad input


def test_safe_rewards_counts_and_warns_once_per_kind():
    def fn(resp, ans):
        if resp == "boom":
            raise KeyError("x")
        if resp == "zero":
            return 1 / 0
        if resp == "nan":
            return float("nan")
        return float(resp == ans)
    stats = {}
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        out = tg.safe_rewards(fn, ["a", "boom", "boom", "zero", "nan", "b"], ["a"] * 6, stats)
    assert out == [1.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    assert stats["reward_errors"] == {"KeyError": 2, "ZeroDivisionError": 1, "ValueError": 1}
    assert len([x for x in w if "reward function raised" in str(x.message)]) == 3


def test_reward_functions_math_and_med():
    rm, rd = tg.make_reward_fn("math"), tg.make_reward_fn("med")
    assert rm("3 + 4 = 7. The answer is \\boxed{7}.", "7") == 1.0
    assert rm("The answer is \\boxed{8}.", "7") == 0.0
    assert rm("", "7") == 0.0                                   # empty completion scores 0
    assert rd("X is treated with latol. The answer is (C).", "C") == 1.0
    assert rd("The answer is (B).", "C") == 0.0 and rd("", "C") == 0.0
    with pytest.raises(ValueError):
        tg.make_reward_fn("chess")


def test_overlong_prompts_dropped_or_refused(tiny):
    _, tok = tiny
    rows = [{"prompt": "hi", "answer": "1"}, {"prompt": "x" * 400, "answer": "2"}]
    with pytest.warns(RuntimeWarning, match="dropped 1/2 prompts longer than 60"):
        kept = tg.tokenize_prompts(rows, tok, max_prompt_tokens=60, context=512)
    assert [r["answer"] for r in kept] == ["1"] and kept[0]["prompt_ids"]
    with pytest.raises(ValueError, match="max-prompt-tokens"), pytest.warns(RuntimeWarning):
        tg.tokenize_prompts(rows[1:], tok, max_prompt_tokens=1024, context=100)


def test_release_layout_jsonl_rows(tmp_path):
    p = tmp_path / "rl.jsonl"
    rows = [{"prompt": [{"role": "user", "content": "1+1?"}], "data_source": "med_23k_think",
             "reward_model": {"ground_truth": "C", "style": "rule"}},
            {"prompt": "2+2?", "answer": 4}]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    got, domain = tg.load_rl_rows(tg.resolve_config({"data": str(p)}))
    assert domain == "med" and [r["answer"] for r in got] == ["C", "4"]
    assert got[0]["prompt"] == [{"role": "user", "content": "1+1?"}]
    p.write_text(json.dumps(rows[0]) + "\n{oops\n")
    with pytest.raises(ValueError, match="rl.jsonl:2"):
        tg.load_rl_rows(tg.resolve_config({"data": str(p)}))
    p.write_text(json.dumps({"prompt": "x"}) + "\n")
    with pytest.raises(ValueError, match="row 0: needs 'prompt' and reward_model.ground_truth"):
        tg.load_rl_rows(tg.resolve_config({"data": str(p)}))


def test_config_validation_names_flags():
    with pytest.raises(ValueError, match="--prompts-per-step 3 must be divisible by --mini-batches 2"):
        tg.resolve_config({"prompts_per_step": 3, "mini_batches": 2})
    with pytest.raises(ValueError, match="--dual-clip"):
        tg.resolve_config({"dual_clip": 0.5})
    with pytest.raises(ValueError, match="unknown config keys"):
        tg.resolve_config({"learning_rate": 1.0})
    c = tg.resolve_config({"method": "full", "preset": "paper"})
    assert c["lr"] == 1e-6 and c["group_size"] == 8 and c["mini_batches"] == 4
    assert tg.resolve_config({"preset": "paper"})["lr"] == 1e-5
    hp = tg.method_hparams(tg.resolve_config({"method": "lora", "r": 8, "hp": ["use_rslora=true"]}), pm)
    assert hp == {"r": 8, "dropout": 0.0, "use_rslora": True}
    with pytest.raises(ValueError, match="--block-size does not apply to --method lora"):
        tg.method_hparams(tg.resolve_config({"method": "lora", "block_size": 16}), pm)


# -----------------------------------------------------------------------------
# packing, sampler


def test_left_and_right_padding_do_not_change_logprobs(tiny):
    model, _ = tiny
    p1, c1 = [5, 6, 7], [8, 9, 10, 2]
    p2, c2 = [11, 12, 13, 14, 15, 16], [17, 18, 19, 20, 21, 22, 23]
    ids, attn, lens, P, L = tg.pack_batch([p1], [c1], pad_id=0, device="cpu")
    alone, _ = tg.sequence_logprobs(model, ids, attn, P, L, 1.0)
    ids, attn, lens, P, L = tg.pack_batch([p1, p2], [c1, c2], pad_id=0, device="cpu")
    both, _ = tg.sequence_logprobs(model, ids, attn, P, L, 1.0)
    assert (P, L) == (6, 7) and lens.tolist() == [4, 7]
    assert torch.allclose(both[0, :4], alone[0], atol=1e-5)
    # and the gathered log-probs are those of the unpadded causal forward
    full = torch.tensor([p1 + c1])
    ref = torch.log_softmax(model(full).logits[0, 2:-1].float(), -1).gather(-1, torch.tensor(c1)[:, None])[:, 0]
    assert torch.allclose(alone[0], ref, atol=1e-5)


def test_generation_config_is_neutral_and_model_defaults_do_not_leak(tiny):
    model, tok = tiny
    gc = tg.make_generation_config(max_new_tokens=6, temperature=1.0, pad_token_id=0, eos_token_ids=[2])
    assert gc.do_sample and gc.top_k == 0 and gc.top_p == 1.0 and gc.repetition_penalty == 1.0
    model = copy.deepcopy(model)
    model.generation_config.top_k = 1          # a leaking greedy-ish default would collapse samples
    model.generation_config.temperature = 0.01
    comps, fin = tg.sample_hf(model, [[5, 6, 7], [8, 9]], group_size=4, max_new_tokens=6,
                              temperature=1.0, pad_id=0, eos_token_ids=[2], seed=0)
    assert len(comps) == 8 and len(fin) == 8
    assert len({tuple(c) for c in comps[:4]}) > 1, "G samples of one prompt should differ at T=1"
    for c, f in zip(comps, fin):
        assert 1 <= len(c) <= 6 and (f == (c[-1] == 2)) and 2 not in c[:-1]
    again, _ = tg.sample_hf(model, [[5, 6, 7], [8, 9]], group_size=4, max_new_tokens=6,
                            temperature=1.0, pad_id=0, eos_token_ids=[2], seed=0)
    assert again == comps                      # seeded per step


def test_trim_at_eos():
    assert tg.trim_at_eos([4, 5, 2, 0, 0], {2}) == ([4, 5, 2], True)
    assert tg.trim_at_eos([4, 5], {2}) == ([4, 5], False)
    assert tg.trim_at_eos([], {2}) == ([], False)


# -----------------------------------------------------------------------------
# one optimiser step: direction, accumulation exactness, bad batches


def _opt_cfg(**kw):
    base = {"prompts_per_step": 2, "group_size": 2, "mini_batches": 1, "max_new_tokens": 8,
            "grad_clip": 0.0, "method": "full"}
    base.update(kw)
    return tg.resolve_config(base)


_PROMPTS = [[5, 6, 7], [5, 6, 7], [8, 9], [8, 9]]
_COMPS = [[10, 11, 2], [12, 13, 14, 15], [16, 2], [17, 18, 19]]


def _run_opt(model, cfg, adv, comps=_COMPS, opt=None):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = opt or torch.optim.SGD(params, lr=1.0)
    return tg._optimise(model, None, opt, params, cfg, _PROMPTS, comps, [True] * len(comps),
                        adv, [2], 0, 8, "full", None)


def _seq_score(model, adv):
    ids, attn, lens, P, L = tg.pack_batch(_PROMPTS, _COMPS, 0, "cpu")
    with torch.no_grad():
        lp, _ = tg.sequence_logprobs(model, ids, attn, P, L, 1.0)
    m = tg.completion_mask(ids[:, P:], [2], lens)
    return float(((lp * m).sum(1) / m.sum(1) * adv).sum())


def test_one_step_raises_good_and_lowers_bad_completions(tiny):
    model = copy.deepcopy(tiny[0])
    adv = torch.tensor([1.0, -1.0, -1.0, 1.0])
    before = _seq_score(model, adv)
    params = [p for p in model.parameters() if p.requires_grad]
    m = _run_opt(model, _opt_cfg(), adv, opt=torch.optim.AdamW(params, lr=1e-3))
    assert m["optimizer_steps"] == 1 and m["clip_frac"] == 0.0 and m["approx_kl_old"] == pytest.approx(0, abs=1e-6)
    assert _seq_score(model, adv) > before + 1e-3


@pytest.mark.parametrize("agg", ["dapo", "grpo", "dr_grpo"])
def test_micro_batching_is_exact(tiny, agg):
    adv = torch.tensor([0.7, -0.7, 1.0, -1.0])
    ms = []
    for mb in (4, 1):
        model = copy.deepcopy(tiny[0])
        _run_opt(model, _opt_cfg(micro_batch_size=mb, loss_agg=agg), adv)
        ms.append(model)
    for (n, a), b in zip(ms[0].named_parameters(), ms[1].parameters()):
        assert torch.allclose(a, b, atol=1e-5), n


@pytest.mark.parametrize("agg", ["dapo", "grpo", "dr_grpo"])
def test_optimise_equals_a_plain_full_batch_reference(tiny, agg):
    """_optimise skips A = 0 completions and micro-batches; a plain one-shot loss over the whole
    batch (zero-advantage rows included) must give the same SGD update."""
    adv = torch.tensor([0.0, 0.0, 1.3, -0.4])            # group 1 all-equal, group 2 mixed
    fast = copy.deepcopy(tiny[0])
    m = _run_opt(fast, _opt_cfg(micro_batch_size=1, loss_agg=agg), adv)
    assert m["trained_frac"] == 0.5
    ref = copy.deepcopy(tiny[0])
    ids, attn, lens, P, L = tg.pack_batch(_PROMPTS, _COMPS, 0, "cpu")
    lp, _ = tg.sequence_logprobs(ref, ids, attn, P, L, 1.0)
    mask = tg.completion_mask(ids[:, P:], [2], lens)
    per_tok, _ = tg.policy_loss_per_token(lp, lp.detach(), adv)
    tg.aggregate_loss(per_tok, mask, agg, max_len=8).backward()
    with torch.no_grad():
        for p in ref.parameters():
            if p.grad is not None:
                p -= p.grad
    for (n, a), b in zip(fast.named_parameters(), ref.parameters()):
        assert torch.allclose(a, b, atol=1e-6), n


@pytest.mark.parametrize("agg", ["dapo", "grpo", "dr_grpo"])
def test_plain_loss_is_the_reference_and_optimise_equals_it(tiny, agg):
    """grpo_loss_plain (the algorithm in one forward) equals the hand-written loss, and one SGD
    step on it equals _optimise with both speed-ups on (A = 0 skip, micro-batches of 1)."""
    adv = torch.tensor([0.0, 0.0, 1.3, -0.4])
    cfg = _opt_cfg(micro_batch_size=1, loss_agg=agg)
    plain = copy.deepcopy(tiny[0])
    loss = tg.grpo_loss_plain(plain, _PROMPTS, _COMPS, adv, cfg=cfg, eos_ids=[2], pad_id=0)
    ids, attn, lens, P, L = tg.pack_batch(_PROMPTS, _COMPS, 0, "cpu")
    lp, _ = tg.sequence_logprobs(copy.deepcopy(tiny[0]), ids, attn, P, L, 1.0)
    per_tok, _ = tg.policy_loss_per_token(lp, lp.detach(), adv)
    ref = tg.aggregate_loss(per_tok, tg.completion_mask(ids[:, P:], [2], lens), agg, max_len=8)
    assert torch.equal(loss, ref)
    loss.backward()
    with torch.no_grad():
        for p in plain.parameters():
            if p.grad is not None:
                p -= p.grad
    fast = copy.deepcopy(tiny[0])
    _run_opt(fast, cfg, adv)
    for (n, a), b in zip(fast.named_parameters(), plain.parameters()):
        assert torch.allclose(a, b, atol=1e-6), n


def test_zero_advantage_and_empty_completions_leave_weights_unchanged_and_finite(tiny):
    model = copy.deepcopy(tiny[0])
    before = [p.detach().clone() for p in model.parameters()]
    # all-equal groups (A = 0) next to empty completions: loss 0, weights unchanged (SGD, no decay)
    m = _run_opt(model, _opt_cfg(), torch.zeros(4), comps=[[], [], [16, 2], []])
    assert m["loss"] == 0.0 and m["optimizer_steps"] == 1
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    # a whole batch of empty completions with non-zero advantages: no tokens, no NaN, no change
    m = _run_opt(model, _opt_cfg(), torch.tensor([1.0, -1.0, 1.0, -1.0]), comps=[[], [], [], []])
    assert m["loss"] == 0.0 and math.isfinite(m["grad_norm"]) and m["grad_norm"] == 0.0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    # some empty completions among real ones: finite metrics, finite weights, and a real update
    m = _run_opt(model, _opt_cfg(), torch.tensor([1.0, -1.0, 1.0, -1.0]), comps=[[], [12, 2], [16, 2], []])
    assert all(math.isfinite(m[k]) for k in ("loss", "entropy", "grad_norm", "clip_frac"))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_kl_to_reference_with_adapters_off_and_frozen_copy(tiny):
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    # PEFT: the reference is the same model with its adapters off -> KL 0 at the identity init
    model = copy.deepcopy(tiny[0])
    pm.apply_peft(model, "lora", r=4, dropout=0.0)
    cfg = _opt_cfg(beta=0.1, method="lora")
    params = [p for p in model.parameters() if p.requires_grad]
    m = tg._optimise(model, None, torch.optim.SGD(params, lr=0.0), params, cfg, _PROMPTS, _COMPS,
                     [True] * 4, adv, [2], 0, 8, "lora", None)
    assert m["kl"] == pytest.approx(0.0, abs=1e-7)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    m = tg._optimise(model, None, torch.optim.SGD(params, lr=0.0), params, cfg, _PROMPTS, _COMPS,
                     [True] * 4, adv, [2], 0, 8, "lora", None)
    assert m["kl"] > 1e-4
    # Full FT: a frozen copy of the start weights is the reference
    model = copy.deepcopy(tiny[0])
    ref = copy.deepcopy(model).requires_grad_(False)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(3.0)
    params = list(model.parameters())
    m = tg._optimise(model, ref, torch.optim.SGD(params, lr=0.0), params, _opt_cfg(beta=0.1),
                     _PROMPTS, _COMPS, [True] * 4, adv, [2], 0, 8, "full", None)
    assert m["kl"] > 1e-4 and math.isfinite(m["loss"])


# -----------------------------------------------------------------------------
# weight push to the sampler: the merged weights reproduce the adapted model


@pytest.mark.parametrize("method,hp", [("lora", {"r": 4}), ("oft", {})])
def test_pushed_merged_weights_give_the_adapted_logits(tiny, method, hp):
    if method not in getattr(pm, "METHODS", {method: 0}):
        pytest.skip(f"{method} not in peft_methods.METHODS yet")
    base = copy.deepcopy(tiny[0])
    plain = copy.deepcopy(base)
    pm.apply_peft(base, method, **hp)
    base.eval()                                 # new wrappers start in train mode (LoRA dropout)
    with torch.no_grad():                       # move the adapter off its identity init
        g = torch.Generator().manual_seed(0)
        for p in base.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    sd = tg.weights_for_sampler(base, method)
    missing, unexpected = plain.load_state_dict(sd, strict=False)
    assert not unexpected, unexpected
    x = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        want, got = base(x).logits, plain(x).logits
    assert not torch.allclose(want, tiny[0](x).logits, atol=1e-4), "adapter should change the logits"
    assert torch.allclose(got, want, atol=1e-4)


def test_sampling_from_the_merged_copy_equals_sampling_from_the_adapted_model(tiny):
    model = copy.deepcopy(tiny[0])
    plain = copy.deepcopy(model)
    pm.apply_peft(model, "lora", r=4, dropout=0.0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    plain.load_state_dict(tg.weights_for_sampler(model, "lora"), strict=False)
    kw = dict(group_size=3, max_new_tokens=8, temperature=1.0, pad_id=0, eos_token_ids=[2], seed=3)
    live, _ = tg.sample_hf(model, [[5, 6, 7], [9, 10]], **kw)
    merged, _ = tg.sample_hf(plain, [[5, 6, 7], [9, 10]], **kw)
    base, _ = tg.sample_hf(tiny[0], [[5, 6, 7], [9, 10]], **kw)
    assert live == merged and live != base


def test_full_ft_push_uses_hf_names(tiny):
    sd = tg.weights_for_sampler(tiny[0], "full")
    assert "model.embed_tokens.weight" in sd and "model.layers.0.self_attn.q_proj.bias" in sd
    assert not any(k.startswith(("base_model.", "_orig_mod.")) or ".base_layer" in k for k in sd)


@pytest.mark.skipif(not tg.vllm_usable(), reason="vLLM path needs CUDA and the vllm package")
def test_vllm_engine_push_and_sample(tmp_path, tiny):       # pragma: no cover - GPU only
    model, tok = tiny
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    llm = tg.make_vllm_engine(str(tmp_path), max_model_len=64, max_num_seqs=8, seed=0)
    assert tg.push_weights_vllm(llm, model, "full") == len(dict(model.named_parameters()))
    comps, fin, lps = tg.sample_vllm(llm, [[5, 6, 7]], group_size=4, max_new_tokens=8,
                                     temperature=1.0, eos_token_ids=[tok.eos_token_id])
    assert len(comps) == 4 and all(len(lp) == len(c) for lp, c in zip(lps, comps))
    evaluate.shutdown_vllm(llm)


# -----------------------------------------------------------------------------
# end to end: train() in process (+ resume) and the CLI --smoke


@pytest.mark.slow
def test_train_in_process_and_resume(tmp_path, tiny, monkeypatch):
    model, tok = tiny
    # a random model never answers right: a length-parity reward gives mixed groups, so the
    # whole update path runs (the real graders are tested above)
    monkeypatch.setattr(tg, "make_reward_fn", lambda domain: lambda resp, ans: float(len(resp) % 2))
    cfg = {"smoke": True, "method": "lora", "r": 4, "out": str(tmp_path / "run"),
           "no_progress": True, "task": "toy-med", "max_new_tokens": 6}
    s = tg.train(dict(cfg), model=copy.deepcopy(model), tokenizer=tok)
    out = Path(s["out"])
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2] and s["steps"] == 2
    for k in ("reward_mean", "reward_std", "pass_rate", "clip_frac", "entropy", "response_len_mean",
              "tokens_per_s", "approx_kl_old", "grad_norm"):
        assert lines[-1][k] is not None and math.isfinite(lines[-1][k]), k
    final = Path(s["final_checkpoint"])
    assert final == out / "global_step_2" and (final / "adapter_config.json").exists()
    assert json.loads((final / "trainer_state.json").read_text())["step"] == 2
    saved = json.loads((out / "config.json").read_text())
    assert saved["method"] == "lora" and saved["trainable_params"] == s["trainable_params"] > 0
    hp = json.loads((final / "adapter_config.json").read_text())["hparams"]
    assert hp["r"] == 4 and hp["dropout"] == 0.0                      # RL: no adapter dropout
    assert (out / "global_step_1" / "adapter_config.json").exists()   # the trajectory is kept
    # an occupied --out is refused without --resume / --overwrite
    with pytest.raises(FileExistsError, match="--resume"):
        tg.train(dict(cfg), model=copy.deepcopy(model), tokenizer=tok)
    # resume: one more step continues from step 2 and keeps the log consistent
    s2 = tg.train({**cfg, "steps": 3, "resume": True}, model=copy.deepcopy(model), tokenizer=tok)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert s2["steps"] == 3 and [x["step"] for x in lines] == [1, 2, 3]
    assert not (out / "global_step_2" / "optimizer.pt").exists()      # only the newest keeps it
    assert (out / "global_step_3" / "optimizer.pt").exists()
    with pytest.raises(ValueError, match="differing settings"):
        tg.train({**cfg, "steps": 4, "resume": True, "lr": 0.5}, model=copy.deepcopy(model), tokenizer=tok)


@pytest.mark.slow
def test_start_from_an_sft_checkpoint(tmp_path, tiny):
    model, tok = tiny
    sft = copy.deepcopy(model)
    pm.apply_peft(sft, "lora", r=4)                      # an "SFT" adapter with dropout 0.05
    with torch.no_grad():
        for n, p in sft.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    pm.save_adapter(sft, tmp_path / "sft", base_model="tiny")
    cfg = {"smoke": True, "steps": 1, "method": "oft", "init_from": str(tmp_path / "sft"),
           "out": str(tmp_path / "a"), "no_progress": True}
    with pytest.raises(ValueError, match="holds a 'lora' checkpoint but --method is 'oft'"):
        tg.train(cfg, model=copy.deepcopy(model), tokenizer=tok)
    m = copy.deepcopy(model)
    s = tg.train({**cfg, "method": "lora", "out": str(tmp_path / "b")}, model=m, tokenizer=tok)
    assert s["steps"] == 1
    # training continued the SFT adapter (not a fresh zero-B one), with dropout switched off
    B0 = dict(sft.named_parameters())["model.layers.0.self_attn.q_proj.lora_B"]
    B1 = dict(m.named_parameters())["model.layers.0.self_attn.q_proj.lora_B"]
    assert B1.abs().sum() > 0 and torch.allclose(B1, B0, atol=0.05)
    assert all(d.p == 0.0 for d in m.modules() if isinstance(d, torch.nn.Dropout))


@pytest.mark.slow
def test_cli_smoke_subprocess(tmp_path, tiny):
    model, tok = tiny
    mdir = tmp_path / "tiny_model"
    model.save_pretrained(mdir)
    tok.save_pretrained(mdir)
    r = subprocess.run([sys.executable, str(REPO / "train_grpo.py"), "--smoke", "--model", str(mdir),
                        "--task", "toy-math", "--method", "full", "--out", str(tmp_path / "cli"), "--no-progress"],
                       capture_output=True, text=True, timeout=300, cwd=REPO,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads(r.stdout)
    assert summary["steps"] == 2 and Path(summary["final_checkpoint"]).is_dir()
    assert (tmp_path / "cli" / "metrics.jsonl").read_text().count("\n") == 2
    help_text = tg.build_parser().format_help()      # --help, without a second interpreter start
    assert "--group-size" in help_text and "--dual-clip" in help_text


# -----------------------------------------------------------------------------
# memory and precision (issue 14 items 2, 4, 6)


def test_token_budget_bounds_each_forward_and_keeps_the_update(tiny):
    """--micro-batch-tokens: every trainer forward's padded size (rows x width) stays within the
    budget, and the SGD update equals the one-shot (unbudgeted) micro-batch of all 4 sequences."""
    adv = torch.tensor([0.7, -0.7, 1.0, -1.0])
    models, shapes = [], []
    for budget in (0, 8):   # 0 = off: one micro-batch of 4 x (3 + 4) = 28 tokens
        model = copy.deepcopy(tiny[0])
        seen = []
        h = model.register_forward_pre_hook(lambda m, a, kw: seen.append(tuple(kw["input_ids"].shape)),
                                            with_kwargs=True)
        _run_opt(model, _opt_cfg(micro_batch_size=4, micro_batch_tokens=budget), adv)
        h.remove()
        models.append(model)
        shapes.append(seen)
    assert shapes[0] == [(4, 7)]
    assert len(shapes[1]) > 1 and all(r * w <= 8 for r, w in shapes[1]), shapes[1]
    for (n, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        assert torch.allclose(a, b, atol=1e-6), n
    # the packer itself: in order, sequence cap and token cap, an over-budget row alone
    assert tg.token_budget_micros([0, 1, 2, 3], [2, 2, 2, 2], [2, 2, 9, 2], 3, 8) == [[0, 1], [2], [3]]
    assert tg.token_budget_micros([0, 1, 2], [1, 1, 1], [1, 1, 1], 2, 0) == [[0, 1], [2]]


def test_grad_checkpointing_defaults_on_for_real_models():
    assert tg.resolve_config({"model": "/models/Qwen2.5-7B", "data": "x.parquet"})["grad_checkpointing"] is True
    assert tg.resolve_config({"model": "toy"})["grad_checkpointing"] is False     # the toy demo as before
    assert tg.resolve_config({"model": "/m", "data": "x", "grad_checkpointing": False})["grad_checkpointing"] is False


def _changed(before: dict, model, names) -> tuple[float, float]:
    """(fraction of entries changed, mean |update|) over the trainable tensors `names`."""
    now = dict(model.named_parameters())
    n = ch = 0
    s = 0.0
    for k in names:
        d = now[k].detach().float() - before[k].float()
        n += d.numel()
        ch += int((d != 0).sum())
        s += float(d.abs().sum())
    return ch / n, s / n


@pytest.mark.parametrize("method,lr,pick", [("full", 1e-6, "weight"), ("lora", 1e-5, "lora_A")])
def test_bf16_step_at_paper_lr_moves_weights_as_fp32_does(tmp_path, tiny, monkeypatch, method, lr, pick):
    """Acceptance 3: a GRPO step at the paper's LR with bf16 compute changes the trainable weights as
    the fp32 run does (fp32 masters; pure bf16 rounded ~98% of Full FT updates and most of lora_A's away)."""
    model0, tok = tiny
    monkeypatch.setattr(tg, "make_reward_fn",
                        lambda domain: lambda resp, ans: float(sum(map(ord, resp)) % 2))
    res = {}
    real_optimise = tg._optimise
    for dt in (torch.float32, torch.bfloat16):
        model = copy.deepcopy(model0).to(torch.bfloat16).to(dt)   # identical (bf16-exact) start
        seen = {}

        def snap(m, seen=seen):
            seen.update({k: p.detach().clone() for k, p in m.named_parameters() if p.requires_grad})
        cfg = {"smoke": True, "method": method, "r": 8 if method == "lora" else None, "lr": lr, "out": str(tmp_path / str(dt)),
               "no_progress": True, "task": "toy-math", "steps": 1, "group_size": 4,
               "prompts_per_step": 2, "max_new_tokens": 6, "grad_clip": 0.0}

        def spy(model, *a, **k):
            snap(model)
            return real_optimise(model, *a, **k)
        monkeypatch.setattr(tg, "_optimise", spy)
        s = tg.train(cfg, model=model, tokenizer=tok)
        assert s["last"]["grad_norm"] > 0
        names = [k for k in seen if pick in k]
        assert names
        res[dt] = _changed(seen, model, names)
        assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    (f32, u32), (fbf, ubf) = res[torch.float32], res[torch.bfloat16]
    assert f32 > 0.5, res
    assert fbf > 0.9 * f32, res           # no lost updates
    assert 0.5 < ubf / u32 < 2.0, res     # and the same size of step (~lr per entry for AdamW)


def _replay_sampler(monkeypatch):
    """Record the first run's rollouts and replay them in later runs (same completions for both
    precision paths, so their updates can be compared entry by entry)."""
    real, tape = tg.sample_hf, []

    def sample(*a, **k):
        if sample.replay:
            return tape[sample.calls.pop(0)]
        tape.append(real(*a, **k))
        return tape[-1]
    sample.replay, sample.calls = False, []
    monkeypatch.setattr(tg, "sample_hf", sample)
    return sample, tape


def test_optimizer_offload_step_equals_the_fp32_master_path(tmp_path, tiny, monkeypatch):
    """--optimizer-offload cpu (bf16 weights + grads on the device, fp32 masters + AdamW on the CPU)
    updates as the fp32-master path (fp32 weights + bf16 autocast) does: at the paper's Full FT LR
    1e-6 ~every master entry moves (no lost update), the masters agree with the fp32 path's
    weights, and the bf16 weights are the masters' bf16 cast."""
    model0, tok = tiny
    monkeypatch.setattr(tg, "make_reward_fn", lambda domain: lambda resp, ans: float(sum(map(ord, resp)) % 2))
    sample, tape = _replay_sampler(monkeypatch)
    real_optimise = tg._optimise
    cfg = {"smoke": True, "method": "full", "lr": 1e-6, "no_progress": True, "task": "toy-math",
           "steps": 1, "group_size": 4, "prompts_per_step": 2, "max_new_tokens": 6, "grad_clip": 1.0}
    got = {}
    for mode in ("none", "cpu"):
        model = copy.deepcopy(model0).to(torch.bfloat16)          # bf16 compute, bf16-exact start
        seen = {}

        def spy(m, ref, opt, *a, seen=seen, **k):
            seen["before"] = {n: p.detach().float().clone() for n, p in m.named_parameters()}
            seen["opt"] = opt
            return real_optimise(m, ref, opt, *a, **k)
        monkeypatch.setattr(tg, "_optimise", spy)
        if mode == "cpu":
            sample.replay, sample.calls = True, [0]
        s = tg.train({**cfg, "optimizer_offload": mode, "out": str(tmp_path / mode)}, model=model, tokenizer=tok)
        assert s["last"]["grad_norm"] > 0
        got[mode] = (seen, model, s["last"]["grad_norm"])
    (s32, m32, gn32), (soff, moff, gnoff) = got["none"], got["cpu"]
    assert all(p.dtype == torch.float32 for p in m32.parameters())        # the fp32-master path
    assert all(p.dtype == torch.bfloat16 for p in moff.parameters())      # offload: bf16 on the device
    opt = soff["opt"]
    assert isinstance(opt, tg.OffloadAdamW)
    assert all(m.dtype == torch.float32 and m.device.type == "cpu" for m in opt.masters)
    assert abs(gnoff - gn32) < 0.02 * gn32                                # the same full-gradient norm
    names = [n for n, _ in moff.named_parameters()]
    assert len(names) == len(opt.masters)
    n = moved = near = same = 0
    for (name, p), master in zip(moff.named_parameters(), opt.masters):
        before, ref = s32["before"][name], dict(m32.named_parameters())[name].detach()
        assert torch.equal(soff["before"][name], before)                  # same start
        assert torch.equal(p.detach(), master.to(torch.bfloat16))         # device weights = cast masters
        d_off, d_ref = master - before, ref - before
        n += d_off.numel()
        moved += int((d_off != 0).sum())
        # AdamW's first step is ~lr·sign(g): the two paths agree except where the bf16-noisy
        # gradient flips the sign of a near-zero entry
        near += int(((d_off - d_ref).abs() <= 0.05 * 1e-6 + 1e-12).sum())
        # the bf16 weights: the fp32 path's weights rounded to bf16, within one bf16 rounding step
        # (+ 2 lr where an update's sign flipped)
        diff = (p.detach().float() - ref.to(torch.bfloat16).float()).abs()
        assert bool((diff <= ref.abs() * 2 ** -7 + 2.5e-6).all()), name
        same += int((diff == 0).sum())
    print(f"moved {moved / n:.4f} near {near / n:.4f} same-bf16 {same / n:.4f}")
    assert moved / n > 0.95, moved / n                                    # no lost updates at lr 1e-6
    assert near / n > 0.9, near / n
    assert same / n > 0.99, same / n


def test_optimizer_offload_resume_restores_the_fp32_masters(tmp_path, tiny, monkeypatch):
    """Two offload steps in one run == one step + --resume one step: the checkpoint's optimizer.pt
    carries the fp32 masters and AdamW moments (the saved weights are only their bf16 cast)."""
    model0, tok = tiny
    monkeypatch.setattr(tg, "make_reward_fn", lambda domain: lambda resp, ans: float(len(resp) % 2))
    cfg = {"smoke": True, "method": "full", "lr": 1e-6, "no_progress": True, "task": "toy-math",
           "group_size": 4, "prompts_per_step": 2, "max_new_tokens": 6, "optimizer_offload": "cpu",
           "save_every_steps": 1}
    base = copy.deepcopy(model0).to(torch.bfloat16)
    s = tg.train({**cfg, "steps": 2, "out": str(tmp_path / "a")}, model=copy.deepcopy(base), tokenizer=tok)
    tg.train({**cfg, "steps": 1, "out": str(tmp_path / "b")}, model=copy.deepcopy(base), tokenizer=tok)
    sd1 = torch.load(tmp_path / "b" / "global_step_1" / "optimizer.pt", weights_only=False)
    assert sd1["offload"] == "cpu" and len(sd1["masters"]) == len(list(base.parameters()))
    s2 = tg.train({**cfg, "steps": 2, "out": str(tmp_path / "b"), "resume": True},
                  model=copy.deepcopy(base), tokenizer=tok)
    assert s2["steps"] == s["steps"] == 2
    a = torch.load(tmp_path / "a" / "global_step_2" / "optimizer.pt", weights_only=False)
    b = torch.load(tmp_path / "b" / "global_step_2" / "optimizer.pt", weights_only=False)
    for x, y in zip(a["masters"], b["masters"], strict=True):
        assert torch.equal(x, y)
    for k, st in a["adamw"]["state"].items():
        assert torch.equal(st["exp_avg_sq"], b["adamw"]["state"][k]["exp_avg_sq"])
    moved = sum(int((x != y).sum()) for x, y in zip(a["masters"], sd1["masters"]))
    assert moved > 0.9 * sum(x.numel() for x in a["masters"])             # step 2 moved the masters
    # a checkpoint without the masters (the fp32-master path's) is refused on resume with offload
    with pytest.raises(ValueError, match="optimizer-offload"):
        tg.OffloadAdamW(list(base.parameters()), lr=1e-6).load_state_dict(
            torch.optim.AdamW(list(base.parameters())).state_dict())


def test_optimizer_offload_is_for_full_ft_only():
    with pytest.raises(ConfigError, match="--optimizer-offload cpu is for --method full"):
        tg.resolve_config({"method": "lora", "optimizer_offload": "cpu"})
    with pytest.raises(ConfigError, match="param-dtype bf16"):
        tg.resolve_config({"method": "full", "optimizer_offload": "cpu", "param_dtype": "bf16"})
    assert tg.resolve_config({"method": "full", "optimizer_offload": "cpu"})["optimizer_offload"] == "cpu"


def test_offload_adamw_staging_path_equals_the_direct_one_and_torch_adamw_on_the_masters():
    """OffloadAdamW's transfer path through the (on CUDA pinned) staging buffers gives the same
    masters and weights as the direct one, and the masters follow torch.optim.AdamW on fp32
    copies exactly (clip on the fp32 grads included); the bf16 weights are their cast."""
    torch.manual_seed(0)
    w0 = [torch.randn(5, 3).to(torch.bfloat16), torch.randn(7).to(torch.bfloat16)]
    grads = [[torch.randn_like(w, dtype=torch.float32).to(torch.bfloat16) for w in w0] for _ in range(3)]
    ref = [w.float().clone().requires_grad_() for w in w0]
    ref_opt = torch.optim.AdamW(ref, lr=1e-6, weight_decay=0.01, foreach=False)
    runs = []
    for staged in (False, True):
        ws = [w.clone().requires_grad_() for w in w0]
        opt = tg.OffloadAdamW(ws, lr=1e-6, weight_decay=0.01)
        if staged:   # what CUDA does, minus pinning: every transfer through a buffer of the weight's dtype
            opt.staging = [torch.empty_like(w) for w in ws]
        for g in grads:
            for w, gi in zip(ws, g):
                w.grad = gi.clone()
            torch.nn.utils.clip_grad_norm_(opt.pull_grads(), 1.0)
            assert all(w.grad is None for w in ws)                   # freed on the device
            opt.step()
            opt.zero_grad()
        runs.append((ws, opt.masters))
    for g in grads:
        for r, gi in zip(ref, g):
            r.grad = gi.float()
        torch.nn.utils.clip_grad_norm_(ref, 1.0)
        ref_opt.step()
        ref_opt.zero_grad()
    (w_a, m_a), (w_b, m_b) = runs
    for a, b, ma, mb, r, w in zip(w_a, w_b, m_a, m_b, ref, w0):
        assert torch.equal(ma, mb) and torch.equal(a, b)
        assert torch.equal(ma, r.detach())                            # exact fp32-master AdamW
        assert torch.equal(a.detach(), ma.to(torch.bfloat16))
        assert bool((ma != w.float()).all())                          # 3 steps of ~1e-6 kept
