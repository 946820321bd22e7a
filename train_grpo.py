"""train_grpo.py — RLVR with GRPO, written out by hand in plain PyTorch.

Paper: PEFT-Arena (arXiv 2605.28819), the RLVR (GRPO) setting; the official release's verl recipe
(`train/train_rl.sh`, `train/peft_arena_verl/trainer/main_ppo.py`). Algorithm: [Shao+24 DeepSeekMath,
§4.1, Alg. 1] GRPO, with the release's PPO clip [Schulman+17 PPO, Eq. 7] and dual clip [Ye+20],
token-mean aggregation [Yu+25 DAPO, token-level loss] and the Dr. GRPO variants [Liu+25 Dr. GRPO] as flags;
verl's `trainer/ppo/core_algos.py` and TRL's `GRPOTrainer` are the reference implementations.

What it does, per rollout step: take B prompts, sample G completions per prompt from the current
policy (vLLM in the same process on the same GPU when installed, else transformers `generate`),
score them with a binary verifiable reward (evaluate.py's graders), turn the rewards into
group-normalised advantages, and take `--mini-batches` AdamW steps on the clipped surrogate over
any PEFT method of peft_methods.py or Full FT; then push the new weights to the sampler.

Run:
    python train_grpo.py --model toy --method lora --r 8 --alpha 16 --task toy-math --out runs/grpo-lora-r8
    python train_grpo.py --smoke --out /tmp/grpo-smoke          # a few seconds on CPU
    python train_grpo.py --resume --out runs/grpo-lora-r8 ...   # continue after a kill (same flags)
    python train_grpo.py --model /models/Qwen2.5-7B --method oft --block-size 32 \
        --data data/openr1_rl.parquet --domain math --preset paper --out runs/grpo-math-oft
In Python (arena.py): `train_grpo.train({"model": "toy", "method": "lora", "r": 8, ...}) -> summary`.

Outputs in --out: config.json, metrics.jsonl (one line per rollout step), global_step_<k>/
(peft_methods.save_adapter files + trainer_state.json, + optimizer.pt in the newest; Full FT ones
also tokenizer files, so they load as models), summary.json, eval_before/after.json with --eval-n.

Shape legend: N = B*G completions of a step, B prompts, G completions per prompt, P prompt
tokens (left-padded), L completion tokens (right-padded), V vocabulary.

Deviations (change a number the paper reports)
1. Token-mean ("dapo") is exact over the whole optimiser mini-batch, also when it is split into
   micro-batches (normaliser = the mini-batch's token count, as TRL's `dapo`). The release (verl)
   averages micro-batch token means, which differs when micro-batches hold different token counts.
2. With `--optimizer-offload cpu` (Full FT on one GPU; the release shards over 8 GPUs with FSDP)
   the grads accumulate over micro-batches in bf16 before they reach the fp32 masters.

Implementation notes (same numbers as the release, up to float rounding)
1. Weight sync: every method (LoRA included) is pushed as merged dense weights under HF names
   (`peft_methods.merged_state_dict`); the release uses vLLM's native LoRA for LoRA.
2. The weights are pushed once before each generation when the optimiser has stepped since the
   last push (verl also syncs once per rollout).
3. Per-token loss equals TRL's (`GRPOTrainer._compute_loss`, compared in tests) except for the two
   release features TRL lacks: the dual clip (c = 3) and the log-ratio clamp to [-20, 20].
4. Group of 1: mean 0, std 1 as in verl; all-equal groups get exactly A = 0 (max == min), not
   the rounding noise of (r - mean) / (std + eps).
5. A reward function that raises scores 0 (counted, warned once per exception type); the release
   would crash the run.
6. The toy preset (TOY_PRESET) raises the LR and shrinks batch, G and lengths so a 1M-parameter
   model moves on CPU; `--preset paper` gives the paper's values.
7. Prompts longer than `--max-prompt-tokens` are dropped with a warning, as the release filters
   overlong prompts; generation is capped so that prompt + completion fits the context.
8. Dropout is off in every module (TRL's `disable_dropout`; the release's RL adapters have none).
9. Metric "pass_rate" is pass@G over the step's prompts; "reward_mean" is per-completion accuracy.
10. Precision: under bf16 compute the trainable tensors are fp32 masters and forwards run under
   bf16 autocast (`precision_plan`), as the release's FSDP mixed precision.
11. Micro-batches are bounded by sequences and padded tokens (release: 16k tokens per GPU), packed
   in order (verl also re-balances by length); real models use gradient checkpointing.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import importlib.util
import json
import math
import shutil
import sys
import time
import types
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

import evaluate
import loading
import peft_methods
import toy_world

# -----------------------------------------------------------------------------
# Pure math (tests import these). Paper symbols: r rewards, A advantages, ℓ log-probs,
# ρ ratio, ε_low/ε_high clip range, c dual-clip constant, β KL weight.


def group_advantages(rewards: torch.Tensor, group_size: int, *, scale: str = "group",
                     eps: float = 1e-6) -> torch.Tensor:
    """Group-relative advantages, one scalar per completion.

    [Shao+24 DeepSeekMath, GRPO] A_i = (r_i - mean_g r) / (std_g r + eps)   (scale="group")
    [Liu+25 Dr. GRPO]            A_i =  r_i - mean_g r                       (scale="none")
    std is torch's unbiased (Bessel) std as in verl (PEFT-Arena RLVR setup, eps 1e-6); a group of one gets
    mean 0 and std 1 (verl's rule). Completions are group-contiguous: rewards[g*G:(g+1)*G] share
    a prompt.
    """
    if scale not in ("group", "none"):
        raise ValueError(f"advantage scale must be 'group' or 'none', got {scale!r}")
    r = rewards.detach().float().reshape(-1, group_size)                # (B, G)
    if group_size == 1:
        # verl core_algos: len(group) == 1 -> mean 0, std 1 (the reward itself is the advantage)
        mean, std = torch.zeros_like(r), torch.ones_like(r)
    else:
        mean = r.mean(dim=1, keepdim=True).expand_as(r)                  # (B, G)
        std = r.std(dim=1, unbiased=True, keepdim=True).expand_as(r)     # (B, G)
    # Dividing by the group std makes the update scale-free across prompts but up-weights
    # near-deterministic groups (tiny std); Dr. GRPO drops it to remove that difficulty bias.
    A = r - mean
    if scale == "group":
        A = A / (std + eps)
    # Implementation note 4: all-equal groups carry no signal -> exactly 0 (never NaN, never rounding noise).
    if group_size > 1:
        flat = (r.max(dim=1, keepdim=True).values == r.min(dim=1, keepdim=True).values)
        A = torch.where(flat.expand_as(A), torch.zeros_like(A), A)
    return A.reshape(-1)                                                 # (N,)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """ℓ(t) = log softmax(z_t / T)[token_t], in fp32 (TRL `selective_log_softmax`).

    Fast path: gather the chosen logit and subtract the row's logsumexp, so the (.., V) log-softmax
    is never materialised. `logits` (B, L, V) must already be aligned so that row t predicts
    tokens[:, t] (i.e. the caller dropped the last position). The same T as sampling: a sampler at
    T = 1.0 and a trainer at another T would make the ratio wrong from the first token.
    """
    z = logits.float() / temperature                                     # (B, L, V)
    chosen = z.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)              # (B, L)
    return chosen - torch.logsumexp(z, dim=-1)                           # (B, L)


def token_logprobs_reference(logits, tokens, temperature: float = 1.0):
    """Plain reference for `token_logprobs`: full log-softmax, then gather (tests check equality)."""
    logp_all = F.log_softmax(logits.float() / temperature, dim=-1)       # (B, L, V)
    return logp_all.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)         # (B, L)


def token_entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """H_t = logsumexp(z) - Σ_v softmax(z)_v z_v on the temperature-scaled logits (diagnostic)."""
    z = logits.float() / temperature                                     # (B, L, V)
    return torch.logsumexp(z, -1) - (torch.softmax(z, -1) * z).sum(-1)   # (B, L)


def completion_mask(completion_ids: torch.Tensor, eos_token_ids, lengths=None) -> torch.Tensor:
    """1 on completion tokens up to and including the FIRST EOS, 0 after it and on padding.

    Built from the first-EOS index and the true lengths, never from `token == pad_id`: when pad ==
    EOS (Qwen2.5 base) that would drop the real EOS and the model would never learn to stop
    (TRL's `completion_mask` is built the same way). `lengths` (B,) are the unpadded completion lengths (None = full width).
    """
    Bn, L = completion_ids.shape
    pos = torch.arange(L, device=completion_ids.device).expand(Bn, L)   # (B, L)
    is_eos = torch.zeros_like(completion_ids, dtype=torch.bool)
    for e in eos_token_ids:
        is_eos |= completion_ids == e
    # index of the first EOS, or L when there is none (a truncated completion keeps all tokens)
    first_eos = torch.where(is_eos, pos, torch.full_like(pos, L)).min(dim=1).values   # (B,)
    mask = pos <= first_eos.unsqueeze(1)                                 # (B, L)
    if lengths is not None:
        lengths = torch.as_tensor(lengths, device=completion_ids.device)
        mask &= pos < lengths.unsqueeze(1)
    return mask.float()


def policy_loss_per_token(logp, old_logp, advantages, *, eps_low: float = 0.2, eps_high: float = 0.2,
                          dual_clip: float | None = 3.0, log_ratio_clamp: float | None = 20.0):
    """Per-token clipped surrogate with the release's dual clip (verl `core_algos.py`, `vanilla`).

    [Schulman+17 PPO, Eq. 7]  L = -min(ρ A, clip(ρ, 1-ε_low, 1+ε_high) A) = max(-ρA, -clip(ρ)A)
    [Ye+20 dual-clip PPO]     for A < 0:  L = min(L, -c A)   (c = 3): a huge ρ on a bad sample
                              cannot blow the loss up.
    ρ = exp(clamp(ℓ - ℓ_old, -20, 20)) (the clamp is verl's; exp(20) is already absurd).
    `advantages` is (N,) per sequence and is broadcast to every token. Returns the (N, L) loss and a
    dict of (N, L) bool flags for the clip metrics.
    """
    A = advantages.reshape(-1, 1).to(logp.dtype)                         # (N, 1)
    log_ratio = logp - old_logp.detach()                                 # (N, L)
    if log_ratio_clamp is not None:
        log_ratio = log_ratio.clamp(-log_ratio_clamp, log_ratio_clamp)
    ratio = torch.exp(log_ratio)                                         # (N, L) ρ
    loss_unclipped = -A * ratio
    loss_clipped = -A * ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    # The max of the two losses is PPO's pessimistic bound: once ρ has left [1-ε_low, 1+ε_high] in
    # the direction that A rewards, the clipped term wins and its gradient is 0, so one rollout
    # batch cannot push π_θ far from π_old.
    loss = torch.maximum(loss_unclipped, loss_clipped)                   # (N, L)
    flags = {"clip_low": (ratio < 1.0 - eps_low) & (A < 0),              # the clip branch is active
             "clip_high": (ratio > 1.0 + eps_high) & (A > 0)}
    # Implementation note 3: TRL has neither the dual clip nor the log-ratio clamp (tests compare the two).
    if dual_clip is not None and dual_clip > 0:
        assert dual_clip > 1.0, f"dual-clip constant must exceed 1, got {dual_clip}"
        capped = torch.minimum(loss, -A * dual_clip)
        flags["clip_dual"] = (A < 0) & (loss > -A * dual_clip)
        loss = torch.where(A < 0, capped, loss)
    else:
        flags["clip_dual"] = torch.zeros_like(flags["clip_low"])
    return loss, {"ratio": ratio.detach(), **flags}


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """[Schulman 2020, k3] D = exp(Δ) - Δ - 1 with Δ = ℓ_ref - ℓ_θ; unbiased for KL(π_θ||π_ref) and ≥ 0.

    Added to the per-token loss as +β·D [Shao+24 DeepSeekMath, Eq. 4]. Paper: β = 0 (no reference forward at all).
    """
    delta = ref_logp.detach() - logp                                     # (N, L)
    return torch.exp(delta) - delta - 1.0


LOSS_AGG = ("dapo", "grpo", "bnpo", "dr_grpo")


def aggregate_loss(per_token_loss: torch.Tensor, mask: torch.Tensor, mode: str = "dapo", *,
                   num_tokens: float | None = None, num_seqs: float | None = None,
                   max_len: int | None = None, num_micro: int = 1) -> torch.Tensor:
    """Reduce the (N, L) per-token loss to a scalar (verl `core_algos.agg_loss`; TRL `loss_type`).

    dapo    (verl `token-mean`, the PAPER's default): Σ m·ℓ / N_tok, N_tok = tokens of the whole
            optimiser mini-batch (`num_tokens`; default this micro-batch).
    grpo    (verl `seq-mean-token-mean`): (1/N_seq) Σ_i (1/|o_i|) Σ_t m·ℓ.
    bnpo    Σ m·ℓ / Σ m of this micro-batch, averaged over `num_micro` micro-batches.
    dr_grpo (verl `seq-mean-token-sum-norm`): Σ m·ℓ / (N_seq · L_max), L_max = `max_len`
            (the configured max completion length; default this tensor's width).
    The `num_*` arguments make gradient accumulation over micro-batches exact: the micro-batch
    losses then sum to the mini-batch loss. Empty masks give 0, never NaN.
    """
    # The normaliser decides the length bias: "grpo" weighs every sequence equally, so a token
    # of a long wrong answer counts less than one of a short one; "dapo" weighs tokens equally;
    # "dr_grpo" uses a constant, so the gradient no longer depends on the lengths at all.
    m = mask.to(per_token_loss.dtype)
    total = (per_token_loss * m).sum()
    n_seq = float(num_seqs) if num_seqs is not None else float(per_token_loss.shape[0])
    if mode == "dapo":
        n_tok = float(num_tokens) if num_tokens is not None else float(m.sum())
        return total / max(n_tok, 1.0)
    if mode == "grpo":
        per_seq = (per_token_loss * m).sum(-1) / m.sum(-1).clamp(min=1.0)   # (N,)
        return per_seq.sum() / max(n_seq, 1.0)
    if mode == "bnpo":
        return total / m.sum().clamp(min=1.0) / num_micro
    if mode == "dr_grpo":
        L = max_len if max_len is not None else per_token_loss.shape[1]
        return total / max(n_seq * L, 1.0)
    raise ValueError(f"--loss-agg must be one of {LOSS_AGG}, got {mode!r}")


# -----------------------------------------------------------------------------
# Rewards: binary verifiable reward from evaluate.py's graders (release `reward_score/shared_reward.py`)


def make_reward_fn(domain: str):
    """Return reward(response, answer) -> 1.0 / 0.0 (evaluate.py's graders).

    Both graders compare in evaluate.py's worker process under a hard 3 s limit per call (a
    hanging sympy comparison is killed, never stalls the step). Math: `grade_math`. Medical: the
    release's reward (`reward_score/shared_reward.py`, `math_rlvr.py`): boxed-answer extraction + `math_equal` against the
    gold letter (`evaluate.grade_reward`), not the evaluation's A-N letter extractor, so "The final
    answer is \\boxed{C}. Option A is wrong because of B." earns 1 for gold C."""
    if domain == "math":
        return lambda response, answer: float(bool(evaluate.grade_math(response, str(answer))))
    if domain == "med":
        return lambda response, answer: float(bool(evaluate.grade_reward(response, str(answer).strip())))
    raise ValueError(f"no reward for domain {domain!r}; expected 'math' or 'med'")


def safe_rewards(reward_fn, responses: list[str], answers: list, stats: dict) -> list[float]:
    """Score every completion; a grader that raises (or returns NaN/None) scores 0.

    Implementation note 5: the error is counted in stats["reward_errors"][kind] and warned once per kind, so
    one bad item cannot kill a long run, and a systematic grader bug is still loud.
    """
    out = []
    for resp, ans in zip(responses, answers):
        try:
            r = reward_fn(resp, ans)
            if r is None or not math.isfinite(float(r)):
                raise ValueError(f"reward function returned {r!r}")
            out.append(float(r))
        except Exception as err:  # noqa: BLE001 - graders run on arbitrary model output
            kind = type(err).__name__
            errs = stats.setdefault("reward_errors", {})
            if kind not in errs:
                warnings.warn(f"train_grpo: reward function raised {kind}: {err} (response "
                              f"{resp[:60]!r}); scoring 0. Further {kind}s are only counted.",
                              RuntimeWarning, stacklevel=2)
            errs[kind] = errs.get(kind, 0) + 1
            out.append(0.0)
    return out


# -----------------------------------------------------------------------------
# Packing and per-token log-probs of a model


def pack_batch(prompts: list[list[int]], completions: list[list[int]], pad_id: int, device):
    """[left-padded prompt | right-padded completion] for the trainer forward.

    Left-padding the prompts keeps every completion starting at the same column P, so the
    completion block is one (N, L) slice. Position ids come from the attention mask (as generate
    does), so padding does not shift positions and the trainer sees exactly what the sampler saw.
    """
    P = max(len(p) for p in prompts)
    L = max(1, max(len(c) for c in completions))
    N = len(prompts)
    input_ids = torch.full((N, P + L), pad_id, dtype=torch.long)         # (N, P+L)
    attn = torch.zeros((N, P + L), dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        input_ids[i, P - len(p):P] = torch.tensor(p, dtype=torch.long)
        attn[i, P - len(p):P] = 1
        if c:
            input_ids[i, P:P + len(c)] = torch.tensor(c, dtype=torch.long)
            attn[i, P:P + len(c)] = 1
    lengths = torch.tensor([len(c) for c in completions])                 # (N,)
    return input_ids.to(device), attn.to(device), lengths.to(device), P, L


def token_budget_micros(idx: list[int], prompt_lens: list[int], completion_lens: list[int],
                        max_seqs: int, max_tokens: int = 0) -> list[list[int]]:
    """Split `idx` (kept in order) into micro-batches for the trainer forward/backward.

    Each holds <= max_seqs sequences and, with max_tokens > 0, a padded size n × (longest prompt +
    longest completion) <= max_tokens — the release's dynamic batching bounds each forward by tokens
    (16k per GPU, release `train/train_rl.sh`) rather than by sequences, so 64 responses of 8k tokens never
    share one forward. A sequence longer than the budget on its own gets a micro-batch of its own.
    The loss is unchanged: the mini-batch-wide normalisers (Deviation 1) make the accumulated
    gradient independent of how a mini-batch is cut (tests/test_train_grpo.py checks it).
    """
    out, cur, P, L = [], [], 0, 0
    for i in idx:
        p, c = prompt_lens[i], max(1, completion_lens[i])
        # padded size if row i joined: (rows + 1) x (longest prompt + longest completion)
        over = max_tokens > 0 and (len(cur) + 1) * (max(P, p) + max(L, c)) > max_tokens
        if cur and (len(cur) >= max_seqs or over):
            out.append(cur)
            cur, P, L = [], 0, 0
        cur.append(i)
        P, L = max(P, p), max(L, c)
    if cur:
        out.append(cur)
    return out


def precision_plan(compute_dtype: torch.dtype, method: str, param_dtype: str = "auto",
                   optimizer_offload: str = "none") -> dict:
    """How to hold and run the policy: {load (the base's dtype), adapter (adapter dtype or None =
    the base's), autocast (bf16 autocast around forwards)}.

    bf16 compute with bf16 trainable tensors loses small updates: at the paper's LRs (1e-5 adapters,
    1e-6 Full FT) an AdamW step of ~lr is below half a bf16 ulp of most weights (2^-9 relative), so
    it rounds away.
    Default ("auto"): trainable tensors are fp32 masters — adapters fp32 on the bf16 base, Full FT
    weights fp32 — and forwards run under bf16 autocast, so the compute stays bf16 (as the paper's
    FSDP mixed precision: bf16 params for compute, fp32 master weights). "bf16" keeps the old
    pure-bf16 behaviour (the release without an fp32 master; not recommended).
    optimizer_offload "cpu" (Full FT only): the same fp32-master semantics with the masters on the
    CPU (OffloadAdamW) — the GPU holds the weights in the compute dtype and their grads.
    """
    if optimizer_offload == "cpu":
        return {"load": compute_dtype, "adapter": None, "autocast": compute_dtype == torch.bfloat16}
    if compute_dtype != torch.bfloat16 or param_dtype == "bf16":
        return {"load": compute_dtype, "adapter": None, "autocast": False}
    if method == "full":
        return {"load": torch.float32, "adapter": None, "autocast": True}
    return {"load": torch.bfloat16, "adapter": torch.float32, "autocast": True}


class OffloadAdamW:
    """AdamW with its fp32 master weights and moments on the CPU (--optimizer-offload cpu, Full FT).

    Why: the fp32-master path keeps 16 B/param on the GPU (fp32 weight + grad + two moments: 113 GiB
    for a 7B model), which only FSDP over several GPUs makes fit; train_grpo has one process. Here
    the GPU holds the weights in the compute dtype (bf16: 2 B/param) and their grads (2 B/param);
    the CPU holds fp32 masters + two moments + fp32 grads (16 B/param) and, on CUDA, a pinned
    staging copy of each tensor in the compute dtype (2 B/param) for the transfers.
    Per optimiser step: pull_grads() moves each grad to the CPU as fp32 (freeing the GPU grad),
    the caller clips the norm of that full gradient, step() runs torch.optim.AdamW on the masters
    and copies them, cast to the compute dtype, back into the GPU weights. The update accumulates in
    the fp32 master, so an lr-sized step below half a bf16 ulp is kept (not rounded away), as in the
    paper's FSDP mixed precision (bf16 compute params, fp32 masters). Differences from the fp32
    master path: DEVIATION 2: the grads accumulate over micro-batches in the compute dtype, and the forward
    reads the master rounded to bf16 once per step instead of autocast's per-op cast (same values).
    """

    def __init__(self, params, *, lr: float, betas=(0.9, 0.999), weight_decay: float = 0.01):
        self.params = list(params)
        pin = any(p.device.type == "cuda" for p in self.params)
        self.masters = [p.detach().to("cpu", torch.float32, copy=True) for p in self.params]
        self.staging = [None] * len(self.params)
        if pin:   # page-locked: the D2H / H2D copies run at full PCIe speed
            self.masters = [m.pin_memory() for m in self.masters]
            self.staging = [torch.empty(p.shape, dtype=p.dtype, pin_memory=True) for p in self.params]
        # foreach=False: one parameter's temporaries at a time on the CPU (not a full fp32 copy)
        self.opt = torch.optim.AdamW(self.masters, lr=lr, betas=tuple(betas), weight_decay=weight_decay,
                                     foreach=False)
        self.param_groups = self.opt.param_groups
        self._pulled = False

    @torch.no_grad()
    def pull_grads(self) -> list[torch.Tensor]:
        """Each GPU grad -> its master's fp32 grad on the CPU, the GPU grad freed; returns the masters
        (clip their grads: the norm of the full gradient, in fp32)."""
        for p, m, buf in zip(self.params, self.masters, self.staging):
            g, p.grad = p.grad, None
            if g is None:
                m.grad = None
                continue
            if buf is not None:
                buf.copy_(g)          # D2H into pinned memory (synchronous)
                g = buf
            m.grad = g.to(torch.float32, copy=True)
            del g
        self._pulled = True
        return self.masters

    @torch.no_grad()
    def step(self) -> None:
        if not self._pulled:
            self.pull_grads()
        self.opt.step()
        self._pulled = False
        self._push()

    @torch.no_grad()
    def _push(self) -> None:
        """fp32 masters -> the GPU weights, cast to their dtype on the CPU (no GPU temporaries)."""
        for p, m, buf in zip(self.params, self.masters, self.staging):
            if buf is not None:
                buf.copy_(m)
                p.copy_(buf, non_blocking=True)
            else:
                p.copy_(m)
        if any(p.device.type == "cuda" for p in self.params):
            torch.cuda.synchronize()   # the staging buffers are rewritten by the next pull

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None
        self.opt.zero_grad(set_to_none=True)
        self._pulled = False

    def state_dict(self) -> dict:
        """AdamW's state plus the fp32 masters (the checkpoint's weights are only their bf16 cast)."""
        return {"offload": "cpu", "adamw": self.opt.state_dict(), "masters": [m.detach() for m in self.masters]}

    def load_state_dict(self, sd: dict) -> None:
        if sd.get("offload") != "cpu":
            raise ValueError("optimizer.pt was written without --optimizer-offload cpu; resume with the "
                             "setting the run was started with")
        self.opt.load_state_dict(sd["adamw"])
        with torch.no_grad():
            for m, saved in zip(self.masters, sd["masters"], strict=True):
                m.copy_(saved)
        self._push()


def amp_context(plan: dict, device: torch.device):
    """A zero-argument factory of the forward's autocast context (bf16 on `device`, or none)."""
    if not plan["autocast"]:
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16)


def sequence_logprobs(model, input_ids, attn, P: int, L: int, temperature: float,
                      with_entropy: bool = False):
    """ℓ_θ of the L completion tokens, (N, L) fp32 (and the (N, L) entropy if asked)."""
    # Positions count real tokens only, so the left padding does not shift the rotary positions
    # (the sampler saw the prompt starting at position 0).
    position_ids = (attn.cumsum(-1) - 1).clamp(min=0)                    # (N, P+L)
    # Only the last L+1 positions' logits are needed: position p predicts token p+1.
    logits = model(input_ids=input_ids, attention_mask=attn, position_ids=position_ids,
                   logits_to_keep=L + 1, use_cache=False).logits         # (N, L+1, V)
    logits = logits[:, :-1]                                              # (N, L, V) row t -> token P+t
    targets = input_ids[:, P:]                                           # (N, L)
    logp = token_logprobs(logits, targets, temperature)
    ent = token_entropy(logits.detach(), temperature) if with_entropy else None
    return logp, ent


# -----------------------------------------------------------------------------
# Sampling (1): transformers `generate` fallback — CPU, or whenever vLLM is absent


def make_generation_config(*, max_new_tokens: int, temperature: float, pad_token_id: int, eos_token_ids):
    """An explicit GenerationConfig: pure ancestral sampling at T, nothing else.

    Every sampling knob is set, because unset (None) fields are filled from the model's
    generation_config.json (transformers #35045) and the library default top_k = 50 (#38549)
    would silently truncate the distribution the trainer's log-probs do not truncate.
    """
    from transformers import GenerationConfig
    return GenerationConfig(
        do_sample=True, temperature=temperature, top_p=1.0, top_k=0, min_p=None, typical_p=1.0,
        epsilon_cutoff=0.0, eta_cutoff=0.0, repetition_penalty=1.0, no_repeat_ngram_size=0,
        num_beams=1, max_new_tokens=max_new_tokens, pad_token_id=pad_token_id,
        eos_token_id=list(eos_token_ids), bos_token_id=None, disable_compile=True)


def trim_at_eos(ids: list[int], eos_token_ids) -> tuple[list[int], bool]:
    """Cut after the first EOS (kept: it is trained). Returns (ids, finished)."""
    for t, tok in enumerate(ids):
        if tok in eos_token_ids:
            return ids[:t + 1], True
    return ids, False


@torch.no_grad()
def sample_hf(model, prompts: list[list[int]], *, group_size: int, max_new_tokens: int,
              temperature: float, pad_id: int, eos_token_ids, batch_size: int = 64, seed: int = 0):
    """G completions per prompt with `model.generate`; group-contiguous; each trimmed at its EOS.

    Returns (completions: list[list[int]], finished: list[bool]). `model` is the training model
    itself (always in sync) or, with --hf-sampler merged, a plain copy holding its merged weights.
    The global torch RNG is re-seeded with `seed` (per step: reproducible runs and resumes).
    """
    device = next(model.parameters()).device
    was_training = model.training
    gc_attr = "is_activation_checkpointing" if hasattr(model, "is_activation_checkpointing") \
        else "is_gradient_checkpointing"
    gc_on = bool(getattr(model, gc_attr, False))
    if gc_on:
        model.gradient_checkpointing_disable()  # it forces use_cache=False: generation would crawl
    model.eval()
    gen_cfg = make_generation_config(max_new_tokens=max_new_tokens, temperature=temperature,
                                     pad_token_id=pad_id, eos_token_ids=eos_token_ids)
    # Re-seed per rollout step (seed = f(--seed, step)): a run and its --resume draw the same
    # completions at every step, whatever ran in between.
    torch.manual_seed(seed)
    flat = [p for p in prompts for _ in range(group_size)]               # N = B*G, group-contiguous
    completions, finished = [], []
    for s in range(0, len(flat), batch_size):
        chunk = flat[s:s + batch_size]
        P = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), P), pad_id, dtype=torch.long)      # (n, P) left-padded
        attn = torch.zeros((len(chunk), P), dtype=torch.long)
        for i, p in enumerate(chunk):
            ids[i, P - len(p):] = torch.tensor(p)
            attn[i, P - len(p):] = 1
        out = model.generate(input_ids=ids.to(device), attention_mask=attn.to(device),
                             generation_config=gen_cfg)                  # (n, P + L')
        for row in out[:, P:].tolist():
            c, fin = trim_at_eos(row, eos_token_ids)
            completions.append(c)
            finished.append(fin)
    if gc_on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train(was_training)
    return completions, finished


# -----------------------------------------------------------------------------
# Sampling (2): vLLM in the same process, on the same GPU (as vLLM's
# `examples/offline_inference/rlhf_colocate.py`). Needs CUDA; it cannot
# run on the CPU machine this repo is developed on, so keep it small and check it on a GPU box.


def vllm_usable() -> bool:
    return importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()


def make_vllm_engine(model_dir: str, *, max_model_len: int, max_num_seqs: int, seed: int,
                     gpu_memory_utilization: float = 0.3, sleep_mode: bool = False):
    """evaluate.make_vllm_engine (bf16, in-process engine core, cache freed first) with the
    rollout's settings. Build it BEFORE the trainer takes GPU memory: vLLM asserts that
    `gpu_memory_utilization` of the total is free at start-up (vllm #20305)."""
    # vLLM refuses max_num_batched_tokens < max_num_seqs (SchedulerConfig.verify_max_model_len),
    # and B x G sequences (paper: 2048) can exceed the prompt + completion length
    batched = max(4096, max_model_len, max_num_seqs)
    return evaluate.make_vllm_engine(
        str(model_dir), seed=seed, max_model_len=max_model_len,
        gpu_memory_utilization=gpu_memory_utilization, max_num_seqs=max_num_seqs,
        max_num_batched_tokens=batched,
        enable_prefix_caching=True,                     # the G samples share the prompt
        enable_sleep_mode=sleep_mode, enforce_eager=True,
        logprobs_mode="processed_logprobs")             # log-probs after temperature (§1.6)


def sample_vllm(llm, prompts: list[list[int]], *, group_size: int, max_new_tokens: int,
                temperature: float, eos_token_ids):
    """G completions per prompt from vLLM; returns (completions, finished, sampler_logps)."""
    from vllm import SamplingParams
    # Explicit params: with None vLLM would use generation_config.json (T 0.7, top_k 20 for
    # Qwen2.5-Instruct). top_k 0 = off; logprobs=0 -> only the sampled token's log-prob.
    sp = SamplingParams(n=group_size, temperature=temperature, top_p=1.0, top_k=0, min_p=0.0,
                        max_tokens=max_new_tokens, logprobs=0, stop_token_ids=list(eos_token_ids),
                        skip_special_tokens=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
    completions, finished, logps = [], [], []
    for o in outs:                              # request order == prompt order
        for c in o.outputs:                     # n = G completions -> group-contiguous
            ids = list(c.token_ids)
            lp = [c.logprobs[t][tok].logprob for t, tok in enumerate(ids)] if c.logprobs else []
            # UNSURE: vLLM keeps the stop token in token_ids; if a version drops it, put the EOS
            # back, since it is trained.
            if c.finish_reason == "stop" and (not ids or ids[-1] not in eos_token_ids):
                ids.append(eos_token_ids[0])
            completions.append(ids)
            finished.append(c.finish_reason == "stop")
            logps.append(lp)
    return completions, finished, logps


@torch.no_grad()
def weights_for_sampler(model, method: str) -> dict:
    """The dense weights the sampler must hold, under HF parameter names.

    PEFT: each wrapped module's effective weight computed out of place in fp32 (never an in-place
    merge, which drifts in bf16) by `peft_methods.merged_state_dict`. Full FT: the
    parameters themselves. Tied embeddings appear once (`model.embed_tokens.weight`), which is the
    name vLLM loads (vLLM `models/qwen2.py`). The vLLM push streams `sampler_weight_groups` instead.
    """
    # Implementation note 1: merged dense weights for every method, LoRA included (release: vLLM native LoRA).
    if method == "full":
        return {n: p.detach() for n, p in model.named_parameters()}
    return peft_methods.merged_state_dict(model)


def sampler_weight_groups(model, method: str):
    """weights_for_sampler one decoder layer at a time (peft_methods.iter_merged_state): a push
    holds one layer's merged copies, not all of them."""
    if method == "full":
        groups: dict[str, dict] = {}
        for n, p in model.named_parameters():
            groups.setdefault(peft_methods._group_of(n), {})[n] = p.detach()
        yield from groups.values()
        return
    yield from peft_methods.iter_merged_state(model)


@torch.no_grad()
def push_weights_vllm(llm, model, method: str) -> int:
    """Copy the trainer's effective weights into the live (awake) vLLM model, layer by layer, and
    check that vLLM loaded every pushed name (evaluate.push_weights)."""
    # `load_weights` maps HF names onto vLLM's fused qkv/gate_up params and copies in place
    # (casting to bf16), so CUDA-graph pointers stay valid.
    return evaluate.push_weights(llm, sampler_weight_groups(model, method),
                                 tied_embeddings=bool(getattr(model.config, "tie_word_embeddings", False)))


def wake_vllm(llm, *, push=None) -> None:
    """Wake a sleeping engine before a rollout: weights first (a push must land in mapped memory),
    then `push()` if the weights are stale, then the KV cache. Called before EVERY rollout, pushed
    or not: vLLM's scheduler resumes only when weights and KV cache are both awake, so a rollout
    after a step that made no optimiser step would otherwise wait forever."""
    torch.cuda.empty_cache()
    llm.wake_up(tags=["weights"])
    if push is not None:
        push()
    llm.wake_up(tags=["kv_cache"])


# -----------------------------------------------------------------------------
# Data: toy rows or the release's RL parquet/JSONL, tokenised once


def _rl_row(rec: dict, where: str, cfg) -> dict:
    """One record -> {'prompt', 'answer', 'data_source'}; --prompt-key/--answer-key name other keys."""
    pk, ak = cfg.get("prompt_key"), cfg.get("answer_key")
    prompt = loading.get_key(rec, pk) if pk else rec.get("prompt")
    if hasattr(prompt, "tolist"):
        prompt = prompt.tolist()               # list columns read by other parquet readers come back as arrays
    gold = loading.get_key(rec, ak) if ak else (rec.get("reward_model") or {}).get("ground_truth", rec.get("answer"))
    if prompt is None or gold is None:
        wanted = (f"--prompt-key {pk or 'prompt'!r} and --answer-key {ak!r}" if (pk or ak) else
                  "'prompt' and reward_model.ground_truth (or 'answer'); name other keys with "
                  "--prompt-key/--answer-key")
        raise loading.DataError(f"{where}: needs {wanted}; has keys {sorted(rec)}")
    return {"prompt": prompt, "answer": str(gold), "data_source": rec.get("data_source")}


def load_rl_rows(cfg) -> tuple[list[dict], str]:
    """[{'prompt': str | list[messages], 'answer': str}], domain. train() calls it before any model
    or sampler engine is built, so data errors cost seconds."""
    if cfg["data"] is None:
        domain = cfg["task"].split("-", 1)[1]
        return toy_world.make_rl_rows(domain, cfg["num_prompts"], seed=cfg["data_seed"]), domain
    path = Path(cfg["data"])
    records, _ = loading.read_records(path)    # .parquet / .jsonl / .json -> [(record, "file:line")]
    # name the row in errors as "--data <file>:<line> row <i>" (parquet: "--data <file>: row <i>")
    rows = [_rl_row(rec, f"--data {where}" + ("" if where.endswith(f"row {i}") else f" row {i}"), cfg)
            for i, (rec, where) in enumerate(records)]
    if not rows:
        raise loading.DataError(f"--data {path}: holds no rows")
    domain = cfg["domain"] or ("med" if rows and rows[0].get("data_source") == "med_23k_think" else "math")
    return rows, domain


def tokenize_prompts(rows, tokenizer, *, max_prompt_tokens: int, context: int):
    """Chat-render and tokenise once (the sampler and the trainer see identical ids); drop
    overlong prompts with one warning (implementation note 7). Returns kept rows with 'prompt_ids'."""
    limit = min(max_prompt_tokens, context - 1)   # at least one generated token must fit
    kept, dropped = [], []
    for row in rows:
        ids = tokenizer(loading.render_chat(tokenizer, row["prompt"]), add_special_tokens=False)["input_ids"]
        (kept if 0 < len(ids) <= limit else dropped).append({**row, "prompt_ids": ids})
    if dropped:
        warnings.warn(f"train_grpo: dropped {len(dropped)}/{len(rows)} prompts longer than {limit} "
                      f"tokens (--max-prompt-tokens {max_prompt_tokens}, model context {context}); "
                      f"longest was {max(len(r['prompt_ids']) for r in dropped)}", RuntimeWarning)
    if not kept:
        raise ValueError(f"train_grpo: no prompt fits: all {len(rows)} are longer than {limit} "
                         f"tokens (raise --max-prompt-tokens or use a longer-context model)")
    return kept


# -----------------------------------------------------------------------------
# Run directory: --out, resume, checkpoint listing (complete = trainer_state.json written),
# checkpoints (adapter + optimiser + trainer_state, atomically), metrics log


CKPT_PREFIX = loading.CKPT_PREFIX   # as train_sft.py: rewind.py reads both trajectories the same way
# flags that may change between a run and its --resume without changing the trajectory so far
RESUME_FREE_KEYS = {"resume", "overwrite", "out", "no_progress", "save_every_steps", "steps", "eval_n"}
# what --overwrite deletes (besides the checkpoints); nothing else in --out is touched
OWNED_FILES = ("config.json", "metrics.jsonl", "summary.json", "eval_before.json", "eval_after.json")


def save_checkpoint(out: Path, model, opt, cfg: dict, state: dict) -> Path:
    """global_step_<k>/: save_adapter files + optimizer.pt + trainer_state.{pt,json} + config.json,
    written into a temp dir and renamed into place. Older checkpoints keep their weights (the
    trajectory) but drop optimizer.pt."""
    step = state["step"]
    final, tmp = out / f"{CKPT_PREFIX}{step}", out / f".tmp-{CKPT_PREFIX}{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    peft_methods.save_adapter(model, tmp, base_model=cfg["model"], extra={"trainer": "train_grpo", "step": step})
    if cfg["method"] == "full":   # a usable model folder: evaluate.py --model <checkpoint>
        loading.save_tokenizer_files(cfg["model"], tmp, model)
    torch.save(opt.state_dict(), tmp / "optimizer.pt")
    torch.save({"torch_rng": torch.get_rng_state()}, tmp / "trainer_state.pt")
    loading.atomic_write_json(tmp / "config.json", cfg)
    loading.atomic_write_json(tmp / "trainer_state.json", state)       # last: marks completeness
    loading.atomic_replace_dir(tmp, final)
    # Old checkpoints keep their weights: the trajectory that rewind.py interpolates along; only
    # the newest needs the optimiser state to resume.
    for k, d in loading.list_checkpoints(out):
        if k < step:
            (d / "optimizer.pt").unlink(missing_ok=True)
    return final


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume keep only the log lines of steps already in the checkpoint (atomic rewrite)."""
    if not path.exists():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
    loading.atomic_write_text(path, "".join(ln + "\n" for ln in keep))


# -----------------------------------------------------------------------------
# The training loop


def train(config: dict | None = None, *, model=None, tokenizer=None) -> dict:
    """Run GRPO; returns a summary dict. `config` holds argparse dests (see build_parser);
    a preloaded (base) `model`/`tokenizer` may be passed instead of loading `config['model']`.
    The vLLM sampler engine, if one was built, is shut down before returning (or raising)."""
    if (config or {}).get("dry_run"):
        return dry_run(config)
    engine: dict = {}
    try:
        return _train(config, model=model, tokenizer=tokenizer, engine=engine)
    finally:
        llm = engine.pop("llm", None)
        if llm is not None:
            evaluate.shutdown_vllm(llm)   # vLLM's teardown; the caller's next engine gets the memory
            del llm


def _train(config, *, model, tokenizer, engine: dict) -> dict:
    """Set-up (`_set_up`), then the GRPO loop of [Shao+24 DeepSeekMath, Alg. 1], one rollout step
    per iteration; see `train`."""
    cfg = resolve_config(config)
    out = Path(cfg["out"])
    resume_from = loading.prepare_run_dir(out, cfg, script="train_grpo", free_keys=RESUME_FREE_KEYS,
                                          owned_files=OWNED_FILES, new_keys_only=True)
    out.mkdir(parents=True, exist_ok=True)
    loading.set_seed(cfg["seed"])
    # data rows first: a missing file, a bad row or key, or no pyarrow fails in seconds, before the
    # sampler engine and the model are built
    rows, domain = load_rl_rows(cfg)
    run = _set_up(cfg, model, tokenizer, engine, resume_from, rows, domain)
    state, rows, sampler = run.state, run.rows, run.sampler
    metrics_path = out / "metrics.jsonl"
    _truncate_metrics(metrics_path, state["step"])
    stats: dict = {}
    B, G = cfg["prompts_per_step"], cfg["group_size"]
    t_start = time.time()
    bar = None
    if not cfg["no_progress"]:
        from tqdm import tqdm
        bar = tqdm(total=cfg["steps"], initial=state["step"], desc="grpo", dynamic_ncols=True)
    last = {}
    # One iteration = one rollout step of [Shao+24 DeepSeekMath, Alg. 1]. For a prompt q with G
    # sampled completions o_1..o_G the step maximises (here: minimises the negative of)
    #   J(θ) = E[ 1/Σ|o_i| Σ_i Σ_t min(ρ_it A_i, clip(ρ_it, 1-ε_low, 1+ε_high) A_i) ] - β D_KL,
    #   ρ_it = π_θ(o_it | q, o_i,<t) / π_old(o_it | q, o_i,<t),   A_i = group-normalised reward
    # (token-mean "dapo" normaliser shown; PEFT-Arena §RLVR setup). No value network: the group's
    # mean reward is the baseline, so there is no critic to train or to hold in memory.
    while state["step"] < cfg["steps"]:
        step = state["step"]
        t0 = time.time()
        batch = [rows[(state["cursor"] + i) % len(rows)] for i in range(B)]   # shuffle=False (release)
        state["cursor"] = (state["cursor"] + B) % len(rows)
        prompts = [r["prompt_ids"] for r in batch]
        # cap generation so prompt + completion fits the context (implementation note 7)
        max_new = max(1, min(cfg["max_new_tokens"], run.context - max(len(p) for p in prompts)))

        # 1) sample G completions per prompt from π_old (the current weights, pushed if stale)
        run.model.eval()
        completions, finished, sampler_logps = sampler.sample(prompts, max_new, step,
                                                              state["optimizer_steps"])
        t_gen = time.time() - t0

        # 2) verifiable reward r ∈ {0, 1} per completion
        responses = [run.tokenizer.decode([t for t in c if t not in run.eos_ids], skip_special_tokens=True)
                     for c in completions]
        answers = [r["answer"] for r in batch for _ in range(G)]
        rewards = torch.tensor(safe_rewards(run.reward_fn, responses, answers, stats))   # (N,)
        # 3) group-normalised advantages [Shao+24, §4.1.2]
        adv = group_advantages(rewards, G, scale=cfg["adv_scale"], eps=cfg["adv_eps"])  # (N,)

        # 4-6) per-token log-probs, clipped ratio objective (+ β KL), AdamW step per mini-batch
        flat_prompts = [p for p in prompts for _ in range(G)]
        m = _optimise(run.model, run.ref_model, run.opt, run.params, cfg, flat_prompts, completions,
                      finished, adv, run.eos_ids, run.pad_id, max_new, cfg["method"], sampler_logps,
                      amp=run.amp)
        state["optimizer_steps"] += m.pop("optimizer_steps")
        state["step"] = step + 1
        # (7) the weights reach the sampler at the next step's sample() (implementation note 2)

        # 8) log and checkpoint
        last = _step_metrics(step + 1, rewards, G, completions, finished, m, t0, t_gen, cfg, stats)
        with open(metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(last) + "\n")
        if bar is not None:
            bar.update(1)
            bar.set_postfix(reward=f"{last['reward_mean']:.3f}", pass_=f"{last['pass_rate']:.2f}",
                            len=f"{last['response_len_mean']:.0f}", tok_s=f"{last['tokens_per_s']:.0f}")
        every = cfg["save_every_steps"]
        if (every > 0 and state["step"] % every == 0) or state["step"] == cfg["steps"]:
            save_checkpoint(out, run.model, run.opt, run.cfg_to_save, state)
    if bar is not None:
        bar.close()
    return _finish_run(run, out, cfg, state, stats, last, t_start, metrics_path)


def _set_up(cfg, model, tokenizer, engine, resume_from, rows, domain):
    """Sampler engine, policy (+ adapter), optimiser, tokenised prompts, reward, eval before and
    the resolved config, in this order (vLLM needs its memory share free; RNG order is fixed)."""
    device0 = loading.pick_device(cfg["device"]) if model is None else next(model.parameters()).device
    use_vllm = cfg["sampler"] == "vllm" or (cfg["sampler"] == "auto" and vllm_usable()
                                            and device0.type == "cuda")
    llm = _start_vllm(cfg, engine) if use_vllm else None
    # precision: fp32 masters for trainable tensors under bf16 compute (precision_plan)
    compute = (next(model.parameters()).dtype if model is not None
               else loading.pick_dtype(cfg["dtype"], device0))
    prec = precision_plan(compute, cfg["method"], cfg["param_dtype"], cfg["optimizer_offload"])
    if model is None:
        model, tokenizer = loading.load_model(cfg["model"], dtype=prec["load"], device=cfg["device"])
    elif cfg["method"] == "full" and prec["load"] != compute:
        model.to(prec["load"])      # a preloaded bf16 base: its trainable weights become fp32 masters
    device = next(model.parameters()).device
    amp = amp_context(prec, device)
    print(f"[grpo] model {cfg['model']} on {device} ({next(model.parameters()).dtype}); "
          f"method {cfg['method']}; preset {cfg['resolved_preset']}", file=sys.stderr)
    # A plain copy to sample from (hf path): decoding through the adapter wrappers recomputes every
    # adapter each token (OFT: the rotations). It receives the merged weights exactly like vLLM.
    hf_merged = not use_vllm and cfg["method"] != "full" and (
        cfg["hf_sampler"] == "merged" or (cfg["hf_sampler"] == "auto" and device.type == "cpu"))
    sampler_model = copy.deepcopy(model).eval().requires_grad_(False) if hf_merged else None
    state = {"step": 0, "cursor": 0, "optimizer_steps": 0}
    n_train = _attach_method(model, cfg, prec, resume_from, state)
    ref_model, params, opt = _make_optimizer(model, cfg, resume_from)
    context = int(getattr(model.config, "max_position_embeddings", 1 << 30))
    rows = tokenize_prompts(rows, tokenizer, max_prompt_tokens=cfg["max_prompt_tokens"], context=context)
    reward_fn = make_reward_fn(domain)
    # stop ids: the tokenizer's EOS plus any extra ones of generation_config.json (Qwen: 2 of them)
    gen_eos = getattr(model.generation_config, "eos_token_id", None)
    gen_eos = gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos]
    eos_ids = sorted({i for i in [tokenizer.eos_token_id, *gen_eos] if i is not None})
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    summary = {"domain": domain}     # summary.json's GRPO fields, completed by _finish_run
    if cfg["eval_n"] and cfg["data"] is None and state["step"] == 0:
        summary["eval_before"] = _evaluate(model, tokenizer, domain, cfg, Path(cfg["out"]) / "eval_before.json")
    cfg_to_save = {**cfg, "trainable_params": n_train, "sampler_used": "vllm" if use_vllm else "hf"}
    loading.write_run_config(Path(cfg["out"]), cfg_to_save)    # + environment(): torch, threads, CPU
    sampler = _Sampler(model, cfg, amp, llm, sampler_model, eos_ids, pad_id)
    return types.SimpleNamespace(model=model, tokenizer=tokenizer, ref_model=ref_model, params=params,
                                 opt=opt, amp=amp, state=state, rows=rows, domain=domain, context=context,
                                 reward_fn=reward_fn, eos_ids=eos_ids, pad_id=pad_id, sampler=sampler,
                                 summary=summary, cfg_to_save=cfg_to_save, n_train=n_train)


def _start_vllm(cfg, engine: dict):
    """The in-process vLLM engine over the base model's directory, built before the trainer takes
    GPU memory (vLLM wants its memory share free at start-up)."""
    model_dir = loading.TOY_MODEL_DIR if cfg["model"] == "toy" else cfg["model"]
    from transformers import AutoConfig
    ctx = AutoConfig.from_pretrained(model_dir).max_position_embeddings
    llm = make_vllm_engine(str(model_dir), max_model_len=min(ctx, cfg["max_prompt_tokens"] + cfg["max_new_tokens"]),
                           max_num_seqs=cfg["prompts_per_step"] * cfg["group_size"], seed=cfg["seed"],
                           gpu_memory_utilization=cfg["vllm_gpu_memory_utilization"],
                           sleep_mode=cfg["vllm_sleep"])
    engine["llm"] = llm
    loading.set_seed(cfg["seed"])  # vLLM (in-process) re-seeds the global RNGs: seed them again
    return llm


def _attach_method(model, cfg, prec, resume_from, state) -> int:
    """The PEFT method on the base (fresh, --init-from an SFT checkpoint, or the resumed one);
    dropout off. Returns the number of trainable parameters."""
    method = cfg["method"]
    if resume_from is not None:
        peft_methods.load_adapter(model, resume_from)
        state.update(json.loads((resume_from / "trainer_state.json").read_text()))
        print(f"[grpo] resumed from {resume_from} (step {state['step']})", file=sys.stderr)
    elif cfg["init_from"]:
        src = peft_methods.read_adapter_config(cfg["init_from"]).get("method")
        if src != method:
            raise ValueError(f"--init-from {cfg['init_from']} holds a {src!r} checkpoint but --method "
                             f"is {method!r}; pass --method {src} to continue it")
        peft_methods.load_adapter(model, cfg["init_from"])
    else:
        if method == "keeplora":
            raise ValueError("--method keeplora needs an SFT init batch for its seed gradients; "
                             "train it with train_sft.py and start GRPO with --init-from <checkpoint>")
        peft_methods.apply_peft(model, method, adapter_dtype=prec["adapter"], **method_hparams(cfg, peft_methods))
    if not cfg["dropout"]:
        # Implementation note 8: dropout off in every module (TRL `disable_dropout`): ℓ_old is computed without dropout, so
        # with it the ratio would not be 1 on-policy. An SFT checkpoint may carry LoRA dropout 0.05.
        for mod in model.modules():
            if isinstance(mod, torch.nn.Dropout):
                mod.p = 0.0
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if n_train == 0:
        raise RuntimeError(f"method {method!r}: no trainable parameters after setup")
    return n_train


def _make_optimizer(model, cfg, resume_from):
    """(reference policy or None, trainable params, AdamW), restored on --resume.

    Reference policy for the optional KL (β > 0): PEFT = the same model with adapters off (no
    copy, so None here); Full FT = a frozen copy of the start weights."""
    ref_model = None
    if cfg["beta"] > 0 and cfg["method"] == "full":
        ref_model = copy.deepcopy(model).eval().requires_grad_(False)
    if cfg["grad_checkpointing"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    params = [p for p in model.parameters() if p.requires_grad]
    # [PEFT-Arena, RLVR setup] AdamW (0.9, 0.999), weight decay 0.01, constant LR, no warmup, clip 1.0
    if cfg["optimizer_offload"] == "cpu":   # fp32 masters + moments on the CPU (OffloadAdamW)
        opt = OffloadAdamW(params, lr=cfg["lr"], betas=cfg["adam_betas"], weight_decay=cfg["weight_decay"])
    else:
        opt = torch.optim.AdamW(params, lr=cfg["lr"], betas=tuple(cfg["adam_betas"]),
                                weight_decay=cfg["weight_decay"])
    if resume_from is not None:
        opt.load_state_dict(torch.load(resume_from / "optimizer.pt", weights_only=False))
        torch.set_rng_state(torch.load(resume_from / "trainer_state.pt", weights_only=False)["torch_rng"])
    return ref_model, params, opt


class _Sampler:
    """Step 1 of the loop: G completions per prompt from the current policy, by vLLM or by
    transformers `generate` (the live model, or a plain copy that receives merged weights)."""

    def __init__(self, model, cfg, amp, llm, merged_copy, eos_ids, pad_id):
        self.model, self.cfg, self.amp, self.llm, self.copy = model, cfg, amp, llm, merged_copy
        self.eos_ids, self.pad_id = eos_ids, pad_id
        self.pushed_at, self.asleep = -1, False    # optimiser step the sampler's weights are from

    def sample(self, prompts, max_new: int, step: int, optimizer_steps: int):
        """(completions, finished, sampler log-probs or None) for this rollout step."""
        cfg, G, method = self.cfg, self.cfg["group_size"], self.cfg["method"]
        # π_old must be the policy that sampled: the sampler's weights are refreshed when the
        # optimiser has stepped since the last push (once per rollout at most, as verl).
        stale = self.pushed_at != optimizer_steps          # implementation note 2: push when stale
        if self.llm is not None:
            push = (lambda: push_weights_vllm(self.llm, self.model, method)) if stale else None
            if self.asleep:
                wake_vllm(self.llm, push=push)     # every rollout wakes it, pushed or not
                self.asleep = False
            elif push is not None:
                push()
            self.pushed_at = optimizer_steps
            out = sample_vllm(self.llm, prompts, group_size=G, max_new_tokens=max_new,
                              temperature=cfg["temperature"], eos_token_ids=self.eos_ids)
            if cfg["vllm_sleep"]:
                self.llm.sleep(level=1)  # level 1 keeps a CPU copy of the weights (2 would drop them)
                self.asleep = True
            return out
        gen_model = self.model
        if self.copy is not None:
            if stale:
                res = self.copy.load_state_dict(weights_for_sampler(self.model, method), strict=False)
                if res.unexpected_keys or res.missing_keys:
                    raise RuntimeError(f"merged weights do not fit the sampler copy: missing "
                                       f"{res.missing_keys[:5]}, unexpected {res.unexpected_keys[:5]}")
                self.pushed_at = optimizer_steps
            gen_model = self.copy
        with self.amp():   # the fp32-master policy samples with bf16 compute, as it trains
            completions, finished = sample_hf(
                gen_model, prompts, group_size=G, max_new_tokens=max_new, temperature=cfg["temperature"],
                pad_id=self.pad_id, eos_token_ids=self.eos_ids, batch_size=cfg["gen_batch_size"],
                seed=cfg["seed"] * 100003 + step)
        return completions, finished, None


def _step_metrics(step, rewards, G, completions, finished, m, t0, t_gen, cfg, stats) -> dict:
    """One metrics.jsonl line: reward, pass@G, zero-std groups, the optimiser's metrics, lengths,
    truncation, throughput."""
    # A group whose G rewards are all equal has A = 0 everywhere: no gradient. frac_reward_zero_std
    # is therefore the share of the batch that taught nothing; pass_rate (pass@G) bounds what GRPO
    # can make greedy (a prompt no sample solves never gets a positive advantage).
    r_groups = rewards.view(-1, G)                                                   # (B, G)
    lens = torch.tensor([len(c) for c in completions], dtype=torch.float)
    n_gen_tokens = sum(len(c) for c in completions)
    dt = time.time() - t0
    return {"step": step, "reward_mean": rewards.mean().item(),
            "reward_std": rewards.std().item() if rewards.numel() > 1 else 0.0,
            "pass_rate": (r_groups.max(1).values > 0).float().mean().item(),   # implementation note 9: pass@G
            "frac_reward_zero_std": (r_groups.max(1).values == r_groups.min(1).values).float().mean().item(),
            **m, "response_len_mean": lens.mean().item(), "response_len_max": lens.max().item(),
            "truncated_frac": 1.0 - sum(finished) / len(finished),
            "gen_tokens_per_s": n_gen_tokens / max(t_gen, 1e-9),
            "tokens_per_s": n_gen_tokens / max(dt, 1e-9), "step_time_s": dt, "lr": cfg["lr"],
            "reward_errors": sum(stats.get("reward_errors", {}).values())}


def _finish_run(run, out, cfg, state, stats, last, t_start, metrics_path) -> dict:
    """Final checkpoint (if the last step was not saved), eval after, summary.json (loading's
    schema; train_last = reward_last, the mean reward of the last fifth of the steps)."""
    found = loading.list_checkpoints(out)
    if not found or found[-1][0] != state["step"]:
        save_checkpoint(out, run.model, run.opt, run.cfg_to_save, state)
        found = loading.list_checkpoints(out)
    extra, seconds = run.summary, time.time() - t_start
    extra.update({"optimizer_steps": state["optimizer_steps"], "train_time_s": seconds, "last": last,
                  "reward_errors": stats.get("reward_errors", {})})
    curve = [json.loads(x) for x in metrics_path.read_text().splitlines() if x.strip()]
    if curve:
        k = max(1, len(curve) // 5)
        extra["reward_first"] = sum(c["reward_mean"] for c in curve[:k]) / k
        extra["reward_last"] = sum(c["reward_mean"] for c in curve[-k:]) / k
    if cfg["eval_n"] and cfg["data"] is None:
        extra["eval_after"] = _evaluate(run.model, run.tokenizer, run.domain, cfg, out / "eval_after.json")
        if "eval_before" in extra:
            b, a = extra["eval_before"], extra["eval_after"]
            extra["target_gain"] = a["target_score"] - b["target_score"]
            extra["general_change"] = a["general_score"] - b["general_score"]
    return loading.write_summary(out, script="train_grpo", cfg=cfg, steps=state["step"],
                                 trainable_params=run.n_train, final_checkpoint=found[-1][1],
                                 train_seconds=seconds, train_last=extra.get("reward_last"),
                                 train_last_name="reward", **extra)


# -----------------------------------------------------------------------------
# Optimising on one rollout batch: the plain algorithm, then the two speed-ups


def grpo_loss_plain(model, prompts, completions, adv, *, cfg, eos_ids, pad_id, old_logp=None):
    """The plain algorithm's loss on one mini-batch: one forward over all its completions, then
    [Shao+24 DeepSeekMath, Eq. 3] with the release's clip and `cfg['loss_agg']` aggregation.

    On-policy (old_logp None) ℓ_old = sg(ℓ_θ), so ρ = 1 and the gradient is the policy gradient
    Σ A ∇ℓ_θ / normaliser. `_optimise` computes the same gradient faster (tests check equality)."""
    device = next(model.parameters()).device
    ids, attn, lens, P, L = pack_batch(prompts, completions, pad_id, device)   # (N, P+L)
    logp, _ = sequence_logprobs(model, ids, attn, P, L, cfg["temperature"])    # (N, L) ℓ_θ
    mask = completion_mask(ids[:, P:], eos_ids, lens)                          # (N, L)
    old = logp.detach() if old_logp is None else old_logp
    per_token, _ = policy_loss_per_token(logp, old, adv.to(device), eps_low=cfg["clip_eps_low"],
                                         eps_high=cfg["clip_eps_high"], dual_clip=cfg["dual_clip"] or None)
    return aggregate_loss(per_token, mask, cfg["loss_agg"], max_len=cfg["max_new_tokens"])


def _optimise(model, ref_model, opt, params, cfg, prompts, completions, finished, adv, eos_ids,
              pad_id, max_new, method, sampler_logps, amp=None) -> dict:
    """All optimiser steps on one rollout batch ([Shao+24 DeepSeekMath, Alg. 1] inner loop);
    returns its metrics. `amp`: factory of the forwards' autocast context (precision_plan).

    The algorithm: (a) ℓ_old of every completion under the sampling policy (and ℓ_ref if β > 0),
    no grad; (b) for each of --mini-batches slices of whole groups: per-token clipped loss,
    aggregated over the mini-batch, backward, clip, AdamW step: `grpo_loss_plain` per mini-batch.
    Two speed-ups change no number (tests compare with `grpo_loss_plain`): `trained_rows` skips the
    forward of A = 0 completions, and `_RolloutBatch.chunks` cuts a mini-batch into micro-batches
    under a token budget (gradient accumulation, exact by the mini-batch-wide normalisers).
    """
    amp = amp or contextlib.nullcontext
    batch = _RolloutBatch(prompts, completions, finished, eos_ids, pad_id, cfg,
                          next(model.parameters()).device)
    N, n_mini = len(completions), cfg["mini_batches"]
    per_mini = N // n_mini                      # whole groups: B/n_mini prompts x G completions
    minis = [list(range(k * per_mini, (k + 1) * per_mini)) for k in range(n_mini)]
    # ℓ_old of mini-batch 1 in a single epoch comes from its own training forward (reuse_first)
    reuse_first = cfg["ppo_epochs"] == 1
    active = trained_rows(adv, cfg)
    n_masked = batch.token_counts()
    ent = [0.0, 0.0]                            # Σ entropy, Σ tokens of π_old on trained rows
    # (a) ℓ_old (and ℓ_ref), no grad
    old, ref = _old_and_ref_logprobs(model, ref_model, batch, active, set(minis[0]) if reuse_first
                                     else set(), cfg, ent, amp)
    acc = {"loss": [], "kl": [], "approx_kl_old": [], "clip_low": [], "clip_high": [],
           "clip_dual": [], "grad_norm": [], "sampler_logp_diff": []}
    model.train()
    steps = 0
    # Mini-batch 1 of epoch 1 is on-policy (θ = θ_old, ρ = 1, the gradient is the policy
    # gradient); every later one is off-policy by the updates before it, which is what the
    # stored ℓ_old and the clip in ρ are for [Schulman+17 PPO, §3].
    for epoch in range(cfg["ppo_epochs"]):
        for k, mini in enumerate(minis):
            # (b) one optimiser step per mini-batch.
            # DEVIATION 1: mini-batch-wide normalisers (exact under micro-batching)
            n_tok = sum(n_masked[i] for i in mini)
            micros = batch.chunks([i for i in mini if active[i]])
            opt.zero_grad(set_to_none=True)
            if not micros:
                # every group of this mini-batch had equal rewards: the gradient is exactly 0, so
                # skip the forward/backward but still step (AdamW's decay and momentum act as in
                # the release, which runs the zero-loss forward).
                for p in params:
                    p.grad = torch.zeros_like(p)
                acc["loss"].append(0.0)
            else:
                acc["loss"].append(_mini_batch_backward(
                    model, batch, micros, old, ref, adv, cfg, n_tok, len(mini),
                    reuse_first and k == 0, ent, acc, amp))
            steps += _clip_and_step(opt, params, cfg["grad_clip"], acc)
    model.eval()
    gap = _sampler_logp_gap(old, sampler_logps, batch.device)
    if gap is not None:
        acc["sampler_logp_diff"].append(gap)
    res = {k: (sum(v) / len(v) if v else None) for k, v in acc.items()}
    res["clip_frac"] = (res["clip_low"] or 0) + (res["clip_high"] or 0)
    res["entropy"] = ent[0] / ent[1] if ent[1] else None     # π_old, on the trained completions
    res["trained_frac"] = sum(active) / N
    res["optimizer_steps"] = steps
    return res


def _mini_batch_backward(model, batch, micros, old, ref, adv, cfg, n_tok, n_seq, first, ent, acc,
                         amp) -> float:
    """Accumulate one mini-batch's gradient over its micro-batches; returns its loss.

    [Shao+24 DeepSeekMath, Eq. 3] per token: clipped surrogate (+ β·D_KL), aggregated with the
    normalisers of the WHOLE mini-batch (n_tok tokens, n_seq sequences), so the micro losses sum
    to the mini-batch loss. `first`: no update has happened yet, so ℓ_old = sg(ℓ_θ) of this
    forward (TRL skips the separate pass on-policy likewise)."""
    mini_loss = 0.0
    for idx in micros:
        ids, attn, P, L, mask = batch.micro(idx)
        with amp():
            lp, H = sequence_logprobs(model, ids, attn, P, L, cfg["temperature"], with_entropy=first)
        if first:
            old_lp = lp.detach()                                                  # (n, L)
            for j, i in enumerate(idx):
                old[i] = old_lp[j]
            ent[0], ent[1] = ent[0] + float((H * mask).sum()), ent[1] + float(mask.sum())
        else:
            old_lp = _pad_stack([old[i] for i in idx], L, batch.device)           # (n, L)
        a = adv[idx].to(batch.device)                                             # (n,)
        loss_tok, info = policy_loss_per_token(
            lp, old_lp, a, eps_low=cfg["clip_eps_low"], eps_high=cfg["clip_eps_high"],
            dual_clip=cfg["dual_clip"] or None)
        if cfg["beta"] > 0:
            kl = kl_k3(lp, _pad_stack([ref[i] for i in idx], L, batch.device))
            loss_tok = loss_tok + cfg["beta"] * kl                                # + β·D per token
            acc["kl"].append(_masked_mean(kl.detach(), mask))
        loss = aggregate_loss(loss_tok, mask, cfg["loss_agg"], num_tokens=n_tok, num_seqs=n_seq,
                              max_len=cfg["max_new_tokens"], num_micro=len(micros))
        # backward() adds this micro-batch's gradient into .grad; the micro losses share the
        # mini-batch's normaliser, so the accumulated sum is the mini-batch gradient exactly.
        loss.backward()
        mini_loss += loss.item()
        acc["approx_kl_old"].append(_masked_mean((old_lp - lp.detach()), mask))
        for key in ("clip_low", "clip_high", "clip_dual"):
            acc[key].append(_masked_mean(info[key].float(), mask))
    return mini_loss


def _clip_and_step(opt, params, grad_clip: float, acc: dict) -> int:
    """Clip the gradient's global norm and step ([PEFT-Arena, RLVR setup] clip 1.0); a step whose
    norm is not finite is skipped, as the release's trainer does. Returns 1 if it stepped."""
    # offload: the grads move to the CPU masters first (fp32), and the norm is theirs
    clip_on = opt.pull_grads() if isinstance(opt, OffloadAdamW) else params
    # Global-norm clipping bounds the size of one AdamW step's input when a few completions with
    # large |A| dominate the batch; the norm is logged (grad_norm) either way.
    gn = torch.nn.utils.clip_grad_norm_(clip_on, grad_clip if grad_clip > 0 else float("inf"))
    stepped = 0
    if torch.isfinite(gn):
        opt.step()
        stepped = 1
    else:
        warnings.warn(f"train_grpo: non-finite grad norm {gn}; optimiser step skipped", RuntimeWarning)
    opt.zero_grad(set_to_none=True)
    acc["grad_norm"].append(float(gn))
    return stepped


class _RolloutBatch:
    """The N completions of one rollout, cut and packed for the trainer's forwards."""

    def __init__(self, prompts, completions, finished, eos_ids, pad_id, cfg, device):
        self.prompts, self.completions, self.finished = prompts, completions, finished
        self.eos_ids, self.pad_id, self.cfg, self.device = eos_ids, pad_id, cfg, device
        self.p_lens, self.c_lens = [len(p) for p in prompts], [len(c) for c in completions]

    def micro(self, idx):
        """Rows `idx` packed: ids, attn, P, L and the (n, L) loss mask."""
        ids, attn, lens, P, L = pack_batch([self.prompts[i] for i in idx],
                                           [self.completions[i] for i in idx], self.pad_id, self.device)
        mask = completion_mask(ids[:, P:], self.eos_ids, lens)                  # (n, L)
        if self.cfg["mask_truncated"]:   # DAPO overlong filter: no loss on cut-off completions
            mask *= torch.tensor([float(self.finished[i]) for i in idx], device=self.device).unsqueeze(1)
        return ids, attn, P, L, mask

    def token_counts(self) -> list[float]:
        """Loss tokens per completion (for the mini-batch normalisers), trained or not."""
        N, mb, n = len(self.completions), self.cfg["micro_batch_size"], []
        for s in range(0, N, mb):
            n += [float(row.sum()) for row in self.micro(list(range(s, min(N, s + mb))))[4]]
        return n

    def chunks(self, idx):
        """Speed-up 2: micro-batches under --micro-batch-size and --micro-batch-tokens."""
        return token_budget_micros(idx, self.p_lens, self.c_lens, self.cfg["micro_batch_size"],
                                   self.cfg["micro_batch_tokens"])


def trained_rows(adv, cfg) -> list[bool]:
    """Speed-up 1: which completions need a forward. With A = 0 (all-equal groups) a completion
    adds nothing to the loss's numerator, only its tokens to the normaliser, which is passed in
    separately: with β = 0 it needs no forward at all (exact for dapo/grpo/dr_grpo, whose
    normalisers are mini-batch-wide; not for bnpo, whose normaliser is the micro-batch's)."""
    skip_zero = cfg["beta"] == 0 and cfg["loss_agg"] != "bnpo"
    return [not skip_zero or bool(adv[i] != 0) for i in range(len(adv))]


@torch.no_grad()
def _old_and_ref_logprobs(model, ref_model, batch, active, reused, cfg, ent, amp):
    """ℓ_old of the trained completions outside `reused` (and ℓ_ref of all when β > 0), per row.

    ℓ_old = log-probs of the sampling policy, recomputed by the trainer before any update and
    stored, because mini-batches 2..k of a rollout are off-policy. Reference for the KL: Full FT =
    the frozen copy `ref_model`; PEFT = the same model with its adapters off."""
    # ℓ_old is recomputed by the trainer rather than taken from vLLM: the sampler runs other
    # kernels in bf16, and a ratio of log-probs from two implementations would not be 1
    # on-policy. Their gap is logged as sampler_logp_diff (a weight-sync check).
    N, T = len(batch.completions), cfg["temperature"]
    old, ref = [None] * N, [None] * N
    model.eval()
    for idx in batch.chunks([i for i in range(N) if active[i] and i not in reused]):
        ids, attn, P, L, mask = batch.micro(idx)
        with amp():
            lp, H = sequence_logprobs(model, ids, attn, P, L, T, with_entropy=True)
        for j, i in enumerate(idx):
            old[i] = lp[j]
        ent[0], ent[1] = ent[0] + float((H * mask).sum()), ent[1] + float(mask.sum())
    if cfg["beta"] > 0:
        for idx in batch.chunks(list(range(N))):
            ids, attn, P, L, mask = batch.micro(idx)
            off = peft_methods.disable_adapters(model) if ref_model is None else contextlib.nullcontext()
            with off, amp():
                rlp, _ = sequence_logprobs(model if ref_model is None else ref_model, ids, attn, P, L, T)
            for j, i in enumerate(idx):
                ref[i] = rlp[j]
    return old, ref


def _sampler_logp_gap(old, sampler_logps, device):
    """Mean |ℓ_old - ℓ_sampler| (vLLM): small (bf16 rounding) when the weights are in sync, O(1)
    when broken; None when nothing was compared (every group skipped), never a fake 0.0."""
    if sampler_logps is None:
        return None
    d = [(o[:len(sl)] - torch.tensor(sl[:len(o)], device=device)).abs()
         for o, sl in zip(old, sampler_logps) if o is not None and len(sl)]
    return float(torch.cat(d).mean()) if d else None


def _pad_stack(rows, L, device):
    out = torch.zeros(len(rows), L, device=device)
    for j, r in enumerate(rows):
        out[j, :min(L, r.numel())] = r[:L]
    return out


def _masked_mean(x, mask) -> float:
    return float((x * mask).sum() / mask.sum().clamp(min=1.0))


def _evaluate(model, tokenizer, domain, cfg, path: Path) -> dict:
    res = evaluate.evaluate_toy(model, tokenizer, domain=domain, n_per_family=cfg["eval_n"])
    loading.atomic_write_json(path, res)
    print(f"[grpo] eval {path.name}: target {res['target_score']:.1f} general "
          f"{res['general_score']:.1f}", file=sys.stderr)
    return res


# -----------------------------------------------------------------------------
# Configuration and CLI: presets, flags, resolution and checks, --dry-run

# [PEFT-Arena, RLVR setup] B = 256 prompts x G = 8, <= 8192 new tokens, 4 mini-batches of 64
# prompts, constant LR 1e-5 (PEFT) / 1e-6 (Full FT)
PAPER_PRESET = dict(prompts_per_step=256, group_size=8, max_new_tokens=8192, mini_batches=4,
                    steps=200, lr={"full": 1e-6, "*": 1e-5})
# Implementation note 6: the toy preset. At the paper's LRs a 1M-parameter model barely moves in a
# few dozen steps, so the toy takes larger LRs (below the ones that collapsed; the README's Results have the
# runs) and a smaller batch, G and length. It gains for the paper's reason: GRPO makes
# greedy what sampling already finds (toy_world.py note N4).
TOY_PRESET = dict(prompts_per_step=64, group_size=8, max_new_tokens=96, mini_batches=4,
                  steps=12, lr={"full": 1e-4, "oft": 6e-4, "*": 1.5e-3})


def _lr_text(preset: dict) -> str:
    """'full 1e-4, oft 6e-4, other 1.5e-3': a preset's LRs for --help (written once, in the preset)."""
    return ", ".join(f"{'other' if k == '*' else k} {v:.1e}".replace(".0e", "e") for k, v in preset["lr"].items())


SMOKE = dict(prompts_per_step=2, group_size=2, max_new_tokens=8, mini_batches=1, steps=2,
             num_prompts=8, eval_n=0, save_every_steps=1)


B_OPT = argparse.BooleanOptionalAction
# The CLI as a table: group -> [(flag, type, default, help, extra add_argument kwargs)]; None type =
# a string. The method flags match train_sft.py's, so arena.py passes one dict to both scripts.
FLAGS = {
    "model and method": [
        ("--model", None, "toy", "'toy', a local HF model dir, or a hub id"),
        ("--method", None, "lora", "peft_methods.METHODS name; 'full' = Full FT"),
        ("--r", int, None, "rank r (LoRA family, AdaLoRA, MiSS, VeRA); None = method default"),
        ("--alpha", float, None, "LoRA scale numerator α (scale α/r); None = method default"),
        ("--block-size", int, None, "OFT block size b"),
        ("--dropout", float, None, "adapter dropout; None = 0 for RL (the release's RL LoRA config has no dropout)"),
        ("--hp", None, [], "any other make_config field (value parsed as JSON, else a string); repeatable",
         dict(action="append", metavar="KEY=VALUE")),
        ("--init-from", None, None, "SFT checkpoint dir to start from (same --method)"),
        ("--dtype", None, None, "compute dtype fp32|bf16 (default bf16 on CUDA, fp32 on CPU)"),
        ("--param-dtype", None, "auto", "auto: trainable tensors are fp32 masters under bf16 compute; bf16: pure bf16",
         dict(choices=["auto", "bf16"])),
        ("--optimizer-offload", None, "none", "cpu (Full FT): fp32 masters + AdamW moments on the CPU (16 B/param "
         "there), bf16 weights + grads on the GPU (4 B/param)", dict(choices=["none", "cpu"])),
        ("--device", None, None, "cpu|cuda (default: cuda if available)"),
        ("--grad-checkpointing", None, None, "non-reentrant activation checkpointing; default: on for real models, "
         "off for the toy", dict(action=B_OPT))],
    "data": [
        ("--task", None, None, "toy-math | toy-med (ignored with --data); default toy-math for --model toy (a real "
         "model needs --data or an explicit --task)"),
        ("--data", None, None, "RL .parquet/.jsonl in the release layout (prompt = chat messages, reward_model.ground_truth)"),
        ("--prompt-key", None, None, "row key of the prompt in --data (dotted for nested fields); default 'prompt'"),
        ("--answer-key", None, None, "row key of the gold answer in --data (dotted for nested fields); default "
         "reward_model.ground_truth, else 'answer'"),
        ("--domain", None, None, "math|med reward for --data (default: from data_source, 'med_23k_think' -> med, else math)"),
        ("--num-prompts", int, 2048, "toy prompts to generate (rows)"),
        ("--data-seed", int, 0, "seed of the toy RL rows"),
        ("--max-prompt-tokens", int, 1024, "longer prompts are dropped (tokens; release: 1024)")],
    "rollout": [
        ("--preset", None, "auto", "fills unset values below (auto: toy for toy-* tasks, else paper)",
         dict(choices=["auto", "paper", "toy"])),
        ("--prompts-per-step", int, None, "B prompts per step (paper 256)"),
        ("--group-size", int, None, "G completions per prompt (paper 8)"),
        ("--max-new-tokens", int, None, "completion cap in tokens (paper 8192)"),
        ("--temperature", float, 1.0, "sampling T; log-probs use the same T"),
        ("--sampler", None, "auto", "auto: vLLM if installed and on CUDA, else transformers generate",
         dict(choices=["auto", "hf", "vllm"])),
        ("--gen-batch-size", int, 128, "sequences per generate call (hf)"),
        ("--hf-sampler", None, "auto", "hf sampler: live = the adapted model; merged = a plain copy that receives "
         "merged weights like vLLM (faster decoding, one more model copy); auto = merged for PEFT on CPU",
         dict(choices=["auto", "live", "merged"])),
        ("--vllm-gpu-memory-utilization", float, 0.3, "fraction of GPU memory"),
        ("--vllm-sleep", None, False, "sleep(level=1) vLLM while training", dict(action="store_true"))],
    "objective": [
        ("--adv-scale", None, "group", "group: (r-mean)/(std+eps) (GRPO, paper); none: r-mean (Dr. GRPO)",
         dict(choices=["group", "none"])),
        ("--adv-eps", float, 1e-6, "eps in the std denominator (verl 1e-6)"),
        ("--loss-agg", None, "dapo", "dapo = token-mean (paper); grpo; bnpo; dr_grpo", dict(choices=list(LOSS_AGG))),
        ("--clip-eps-low", float, 0.2, "ε_low"),
        ("--clip-eps-high", float, 0.2, "ε_high (DAPO clip-higher: 0.28)"),
        ("--dual-clip", float, 3.0, "dual-clip c for A<0 (0 = off)"),
        ("--beta", float, 0.0, "k3 KL weight to the reference (paper 0)"),
        ("--mask-truncated", None, False, "no loss on completions that hit --max-new-tokens (DAPO overlong "
         "filter; paper: off)", dict(action="store_true")),
        ("--mini-batches", int, None, "optimiser steps per rollout batch (paper 4)"),
        ("--ppo-epochs", int, 1, "passes over each rollout batch (paper 1)"),
        ("--micro-batch-size", int, 64, "sequences per forward/backward"),
        ("--micro-batch-tokens", int, 16384, "padded tokens (sequences x width) per forward/backward (release: "
         "16k per GPU); 0 = off")],
    "optimiser": [
        ("--lr", float, None, f"constant LR (default: from the preset, by method; paper: {_lr_text(PAPER_PRESET)}; "
         f"toy: {_lr_text(TOY_PRESET)})"),
        ("--weight-decay", float, 0.01, "AdamW weight decay"),
        ("--adam-betas", float, [0.9, 0.999], "AdamW betas", dict(nargs=2)),
        ("--grad-clip", float, 1.0, "max grad norm (0 = off)"),
        ("--steps", int, None, "rollout steps (each = --mini-batches optimiser steps)")],
    "run": [
        ("--out", None, "runs/grpo", "output directory"),
        ("--seed", int, 42, "seed (release: 42)"),
        ("--save-every-steps", int, 50, "rollout steps between checkpoints (release save_freq 50; 0 = only at the end)"),
        ("--resume", None, False, "continue from the newest checkpoint in --out", dict(action="store_true")),
        ("--overwrite", None, False, "delete a previous run in --out first", dict(action="store_true")),
        ("--eval-n", int, 0, "toy only: evaluate_toy items per family before and after training (0 = off)"),
        ("--smoke", None, False, "tiny sizes, 2 steps, for a quick check", dict(action="store_true")),
        ("--no-progress", None, False, "no tqdm bar", dict(action="store_true"))],
    "memory plan (--dry-run: nothing is built, no data or weights are read)": [
        ("--dry-run", None, False, "print the planned GPU peak memory of one rollout step (training + the vLLM "
         "share; memory.py) and exit; --model may be a configs/model_shapes name or .json file", dict(action="store_true")),
        ("--gpu-memory-gib", float, 80.0, "GPU memory in GiB (H100 80, H200 141): the --dry-run verdict and vLLM's share")],
}


def build_parser() -> argparse.ArgumentParser:
    """The CLI of the FLAGS table, one argument group per table group."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for title, flags in FLAGS.items():
        g = p.add_argument_group(title)
        for flag, typ, default, text, *kw in flags:   # list defaults copied: the table is never mutated
            default = list(default) if isinstance(default, list) else default
            g.add_argument(flag, default=default, help=text, **({"type": typ} if typ else {}), **(kw[0] if kw else {}))
    return p


def method_hparams(cfg: dict, peft_methods) -> dict:
    """CLI method flags -> make_config kwargs, checked against the method's dataclass fields.

    RL differs from SFT in one default: adapter dropout 0 (the release passes LoRA only r, alpha,
    targets in `fsdp_sft_trainer.py` `_build_lora_config`). Dropout would also make ℓ_old (no dropout) and ℓ_θ (dropout) disagree.
    """
    hp = peft_methods.hparams_from_flags(
        cfg["method"], cfg, cfg["hp"], cfg["steps"] * cfg["mini_batches"] * cfg["ppo_epochs"])
    fields = {f.name for f in dataclasses.fields(peft_methods.make_config(cfg["method"]))}
    if "dropout" in fields and "dropout" not in hp:   # neither --dropout nor --hp dropout=...
        hp["dropout"] = 0.0
    return hp


def resolve_config(overrides: dict | None = None) -> dict:
    """Parser defaults <- overrides <- preset (only unset values) <- --smoke; then validate."""
    cfg = vars(build_parser().parse_args([]))
    unknown = set(overrides or {}) - set(cfg)
    if unknown:
        raise ValueError(f"train_grpo: unknown config keys {sorted(unknown)}")
    cfg.update(overrides or {})
    if cfg["task"] is None:
        if cfg["data"] is None and cfg["model"] != "toy" and not cfg.get("dry_run"):
            raise loading.ConfigError(f"--data is required for a real model ({cfg['model']}): the release's RL "
                                      "parquet/jsonl; pass --task toy-math (or toy-med) to train it "
                                      "on the toy rows on purpose", "data")
        cfg["task"] = "toy-math"
    if cfg["smoke"]:   # smoke sizes, except where the caller set a value explicitly
        cfg.update({k: v for k, v in SMOKE.items() if k not in (overrides or {})})
    preset = cfg["preset"]
    if preset == "auto":
        preset = "toy" if cfg["data"] is None and cfg["task"].startswith("toy") else "paper"
    pre = TOY_PRESET if preset == "toy" else PAPER_PRESET
    for k in ("prompts_per_step", "group_size", "max_new_tokens", "mini_batches", "steps"):
        if cfg[k] is None:
            cfg[k] = pre[k]
    if cfg["lr"] is None:
        cfg["lr"] = pre["lr"].get(cfg["method"], pre["lr"]["*"])
    cfg["resolved_preset"] = preset
    cfg["adam_betas"] = list(cfg["adam_betas"])
    if cfg["grad_checkpointing"] is None:
        # on for real models (responses of thousands of tokens: activations dominate), off for the
        # toy (tiny activations; keeps the demo's numbers and speed as they were)
        cfg["grad_checkpointing"] = cfg["model"] != "toy"
    check_config(cfg)
    return cfg


def check_config(cfg: dict) -> None:
    """The resolved config's invariants; each error names the key at fault (ConfigError.field)."""
    def fail(msg, key):
        raise loading.ConfigError(msg, key)
    if cfg["data"] is None and cfg["task"] not in ("toy-math", "toy-med"):
        fail(f"--task must be toy-math or toy-med (or pass --data), got {cfg['task']!r}", "task")
    for k in ("prompts_per_step", "group_size", "max_new_tokens", "mini_batches", "steps",
              "ppo_epochs", "micro_batch_size"):
        if cfg[k] < 1:
            fail(f"--{k.replace('_', '-')} must be >= 1, got {cfg[k]}", k)
    if cfg["micro_batch_tokens"] < 0:
        fail(f"--micro-batch-tokens must be >= 0 (0 = off), got {cfg['micro_batch_tokens']}",
             "micro_batch_tokens")
    if cfg["prompts_per_step"] % cfg["mini_batches"]:
        fail(f"--prompts-per-step {cfg['prompts_per_step']} must be divisible by --mini-batches "
             f"{cfg['mini_batches']} (mini-batches split whole groups)", "prompts_per_step")
    if not (0 < cfg["clip_eps_low"] < 1 and cfg["clip_eps_high"] > 0):
        fail(f"clip range must be 0 < --clip-eps-low < 1 and --clip-eps-high > 0, got "
             f"{cfg['clip_eps_low']}, {cfg['clip_eps_high']}", "clip_eps_low")
    if cfg["dual_clip"] and cfg["dual_clip"] <= 1:
        fail(f"--dual-clip must be > 1 (or 0 = off), got {cfg['dual_clip']}", "dual_clip")
    if cfg["resume"] and cfg["overwrite"]:
        fail("--resume and --overwrite exclude each other", "resume")
    if cfg["temperature"] <= 0:
        fail(f"--temperature must be > 0 for sampling, got {cfg['temperature']}", "temperature")
    if cfg["optimizer_offload"] == "cpu" and cfg["method"] != "full":
        fail(f"--optimizer-offload cpu is for --method full (Full FT); {cfg['method']!r} "
             "trains small adapters whose optimizer state fits the GPU", "optimizer_offload")
    if cfg["optimizer_offload"] == "cpu" and cfg["param_dtype"] == "bf16":
        fail("--optimizer-offload cpu keeps fp32 masters; it excludes --param-dtype bf16", "optimizer_offload")


def dry_run(overrides: dict) -> dict:
    """--dry-run: print the planned per-GPU peak memory (training step + vLLM's share; memory.py)
    and return memory.estimate's dict. A real model without --data is planned at the paper preset."""
    import memory   # imported here: memory.py imports this file
    overrides = dict(overrides)
    if overrides.get("model", "toy") != "toy" and overrides.get("preset", "auto") == "auto":
        overrides["preset"] = "paper"
    cfg = resolve_config(overrides)
    if cfg["method"] not in peft_methods.METHODS:
        raise loading.ConfigError(f"--method {cfg['method']!r} is not one of {sorted(peft_methods.METHODS)}", "method")
    hf_config = memory.hf_config_for(cfg["model"])
    plan = memory.grpo_plan(cfg, gpu_memory_gib=cfg["gpu_memory_gib"], cuda=True)
    print(memory.report(hf_config, plan, spec=cfg["model"], gpu_memory_gib=cfg["gpu_memory_gib"],
                        tool="train_grpo"))
    print("[train_grpo] one process on one GPU (train_grpo has no multi-GPU path); vLLM shares that GPU",
          file=sys.stderr)
    return memory.estimate(hf_config, plan)


if __name__ == "__main__":
    parser = build_parser()
    # only the flags given on the command line count as overrides (so --smoke/presets fill the rest)
    given = {k: v for k, v in vars(parser.parse_args()).items() if v != parser.get_default(k)}
    if given.get("dry_run"):
        sys.exit(loading.run_cli("train_grpo.py", lambda: (dry_run(given), 0)[1],
                                 one_line=(ValueError, FileNotFoundError)))
    print("[grpo] config " + json.dumps(resolve_config(given), default=str), file=sys.stderr)
    summary = loading.run_cli("train_grpo.py", lambda: train(given), resume_hint="rerun the same "
                              "command with --resume to continue from the last checkpoint")
    print(json.dumps({k: v for k, v in summary.items() if not k.startswith("eval_")}, indent=1, default=str))
