"""train_sft.py — supervised finetuning (SFT) of a causal LM with any PEFT method, in plain PyTorch.

Implements the paper's SFT protocol (PAPER.md §3.3 and §4): chat-template prompt + response + EOS,
loss on response tokens only, over-long pairs dropped (not truncated), AdamW (0.9, 0.95) with weight
decay 0.01, 10% linear warmup then cosine to 0, gradient clipping at 1.0 with the step skipped on a
non-finite norm, gradient accumulation to a global batch of sequences, and checkpoints every N steps.
The saved trajectory (`<out>/global_step_<k>/`) is what rewind.py compares against interpolation
(PAPER.md §9). Any model from `loading.load_model` and any method from `peft_methods` ("full" = Full FT).

Run:
    python train_sft.py --model toy --method oft --block-size 16 --task toy-math --out runs/sft-oft-b16
    python train_sft.py --model toy --method lora --r 8 --alpha 16 --task toy-med --out runs/sft-lora-r8
    python train_sft.py --model /models/Qwen2.5-7B --method lora --r 8 --alpha 16 \
        --data openr1-50k/train.parquet --max-length 8192 --out runs/qwen-math-lora-r8
    python train_sft.py ... --data MetaMathQA-395K.json --prompt-key query --response-key response
    torchrun --nproc_per_node 8 train_sft.py ...        # DDP; FSDP2 (fully_shard) for --method full
    python train_sft.py --resume --out runs/sft-oft-b16 ...   # continue after a kill (same flags)
    python train_sft.py --smoke --model toy --out /tmp/sft-smoke   # tiny run, < 1 min on CPU
From Python (arena.py):  summary = train_sft.train({"model": "toy", "method": "lora", "r": 8,
                                                   "task": "toy-math", "out": "runs/x"})

Outputs in --out: config.json (resolved config), metrics.jsonl (one line per optimizer step: step,
loss, lr, grad norm, tokens/s, peak memory), global_step_<k>/ (adapter via peft_methods.save_adapter
or full weights for Full FT, trainer_state.json, trainer_state.pt, optimizer.pt, config.json; Full FT
checkpoints also hold the tokenizer files and generation_config.json, so `loading.load_model` and
`evaluate.py --model <checkpoint>` take them as a model) and summary.json at the end.

Data (--data): the release parquet, {prompt, response} rows, chat {messages}, or any other keys named
with --prompt-key/--response-key; the file is read and every row checked before the model loads.

Defaults worth knowing (all as in the paper unless listed under Deviations):
- Loss normalisation `--loss-norm micro`: each micro-batch's loss is Σ masked CE / (n_mask + 1e-8)
  and the step's loss is the mean over micro-batches (PAPER.md §4), so a token's weight depends on
  how many targets share its micro-batch; `--loss-norm token` weighs every target token equally.
- LR: peak × lr_factor(step): linear warmup over int(0.1·total) steps starting from 0 (the first
  update has LR 0, as in veRL/HF), then cosine to 0. Steps with a non-finite grad norm are skipped
  but still advance the schedule.
- Batches: --global-batch sequences per optimizer step (all ranks), split into micro-batches of
  --micro-batch per forward; steps/epoch = ⌊N/global batch⌋ (drop_last).
- Resume: checkpoints are whole directories renamed into place, so a kill loses at most the steps
  since the last save; --resume restores weights, AdamW state, RNG states and the data position and
  continues bit-for-bit on the same machine (tests/test_train_sft.py checks it against an
  uninterrupted run).

Shape legend: B sequences in a micro-batch, T tokens per (padded) sequence, V vocab size, D model
width, N trained target tokens in a micro-batch (positions where the loss mask is 1).

Deviations from the paper / release (each also marked `# DEVIATION:` at the line):
1. Loss mask: by default every response token including the final EOS is a target and no prompt
   token is. The release's veRL mask trains the last prompt token and not the final EOS (PAPER.md §4,
   §12.15); `--loss-mask release` reproduces it.
2. Precision: on CUDA the frozen base weights are bf16 (as in the paper) but trainable tensors
   (adapters, Full-FT weights) and AdamW states are fp32 masters under bf16 autocast; the release
   trains bf16 tensors with no fp32 copy (`--param-dtype bf16` mimics that). CPU runs are fp32.
3. Each micro-batch is right-padded to its own longest sequence, not to --max-length (same loss,
   less compute); no FlashAttention varlen / Liger kernels. A micro-batch over --micro-batch-tokens
   (default 16384, the release's 16k tokens per GPU) runs as row chunks with the same loss and
   gradient. Gradient checkpointing is on by default for real models, off for the toy.
4. Full FT default LR 5e-5, from the release's example config (PAPER.md §3.3, §12.5); PEFT 2e-4.
5. AdaLoRA: peft_methods' rank-allocation and orthogonal-regulariser hooks are called when present
   (what AdaLoRA is meant to do); the release never calls them (`--adalora-release`, METHODS.md §9).
6. `messages` rows: only the final assistant turn is trained (earlier turns are prompt).
7. Optional `--pack` (the paper does not pack): examples are concatenated into rows of at most
   --max-length tokens with position ids restarting per example, which transformers turns into a
   block-diagonal causal mask, so packed examples do not attend to each other.
8. Only the newest checkpoint keeps optimizer.pt (`--keep-optimizer all` keeps every one); the
   trajectory's weights are always kept.
9. CPU peak memory is the process's peak resident set size (ru_maxrss), not allocator statistics.
10. Multi-GPU: PEFT methods run under DDP (the frozen base replicated); FSDP2 `fully_shard` is used
    for Full FT (`--fsdp auto`). The release shards every method with FSDP2. Each rank's dropout
    stream is seeded seed + rank (loading.set_rank_seed); weights and data order use the seed.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import random
import re
import resource
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import loading

PEFT_DEFAULT_LR = 2e-4     # [PAPER.md §3.3] every PEFT method, SFT
FULL_FT_DEFAULT_LR = 5e-5  # DEVIATION (4): [PAPER.md §3.3, §12.5] release example config for Full FT
MASK_EPS = 1e-8            # [PAPER.md §4] loss = Σ masked CE / (n_mask + 1e-8)
CKPT_PREFIX = "global_step_"
TOY_TASKS = {"toy-math": "math", "toy-med": "med"}
# flags that may change between a run and its --resume without changing the trajectory
RESUME_FREE_KEYS = {"resume", "overwrite", "out", "no_progress", "save_every_steps", "keep_optimizer"}


# -----------------------------------------------------------------------------
# Tokenisation and the loss mask (PAPER.md §4)

def build_loss_mask(n_prompt: int, n_total: int, mode: str = "correct") -> list[int]:
    """Per-token mask over input_ids: 1 = this token is a trained target (predicted from the token
    before it). Paired with targets input_ids[1:] via mask[1:], exactly as veRL does.

    correct: tokens P..L-1 (the whole response incl. the final EOS); no prompt token.
    release: [PAPER.md §4, veRL off-by-one] the attention mask zeroed on 0..P-2 and at L-1, i.e.
             tokens P-1..L-2: the last prompt token is trained, the final EOS is not.
    """
    P, L = n_prompt, n_total
    assert 0 < P < L, f"need 0 < prompt length {P} < total length {L}"
    if mode == "correct":
        # DEVIATION (1): the release trains P-1..L-2; we train exactly the response, EOS included,
        # so the model learns to stop.
        return [0] * P + [1] * (L - P)
    if mode == "release":   # opt-in fidelity to the release's shifted mask
        return [0] * (P - 1) + [1] * (L - P) + [0]
    raise ValueError(f"--loss-mask must be 'correct' or 'release', not {mode!r}")


def _prompt_messages(prompt) -> list[dict]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def encode_example(tokenizer, prompt, response: str, *, loss_mask: str = "correct") -> dict:
    """One (prompt, response) pair -> {input_ids, loss_mask, n_prompt} (plain lists, length L).

    [PAPER.md §4] prompt = chat template of the user turn(s) with the generation prompt; response =
    answer + eos_token; both tokenised separately with add_special_tokens=False and concatenated
    (separately, so no BPE merge crosses the prompt/response boundary).
    """
    prompt_text = loading.render_chat(tokenizer, _prompt_messages(prompt), add_generation_prompt=True)
    p_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    r_ids = tokenizer(response + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
    ids = p_ids + r_ids
    return {"input_ids": ids, "loss_mask": build_loss_mask(len(p_ids), len(ids), loss_mask),
            "n_prompt": len(p_ids)}


def encode_examples(tokenizer, pairs: list[tuple], *, loss_mask: str = "correct") -> list[dict]:
    """Batched `encode_example` (one fast-tokenizer call per side); same output, test-checked."""
    if not pairs:
        return []
    if tokenizer.eos_token is None:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no eos_token; SFT appends it "
                         "to every response (PAPER.md §4)")
    prompts = [loading.render_chat(tokenizer, _prompt_messages(p), add_generation_prompt=True)
               for p, _ in pairs]
    responses = [r + tokenizer.eos_token for _, r in pairs]
    p_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    r_ids = tokenizer(responses, add_special_tokens=False)["input_ids"]
    return [{"input_ids": p + r, "loss_mask": build_loss_mask(len(p), len(p) + len(r), loss_mask),
             "n_prompt": len(p)} for p, r in zip(p_ids, r_ids)]


def drop_overlong(examples: list[dict], max_length: int) -> tuple[list[dict], int]:
    """[PAPER.md §3.3] pairs longer than max_length are dropped, not truncated. Returns (kept, n_dropped)."""
    kept = [ex for ex in examples if len(ex["input_ids"]) <= max_length]
    return kept, len(examples) - len(kept)


def pack_examples(examples: list[dict], max_length: int) -> list[dict]:
    """Greedy in-order packing into rows of <= max_length tokens (Deviation 7).

    position_ids restart at 0 for every example; with attention_mask=None transformers derives a
    block-diagonal causal mask from them, so examples never attend to each other. The first token
    of each example is never a target (it would be predicted from the previous example).
    """
    # DEVIATION (7): the paper never packs; this is opt-in.
    rows, cur = [], None
    for ex in examples:
        n = len(ex["input_ids"])
        if cur is not None and len(cur["input_ids"]) + n > max_length:
            rows.append(cur)
            cur = None
        if cur is None:
            cur = {"input_ids": [], "loss_mask": [], "position_ids": [], "n_docs": 0}
        cur["input_ids"] += ex["input_ids"]
        cur["loss_mask"] += [0] + ex["loss_mask"][1:]
        cur["position_ids"] += list(range(n))
        cur["n_docs"] += 1
    if cur is not None:
        rows.append(cur)
    return rows


def collate(examples: list[dict], pad_id: int) -> dict:
    """Right-pad a micro-batch to its longest row (Deviation 3) -> tensors of shape (B, T).

    Unpacked rows get a 0/1 attention_mask. Packed rows get position_ids instead (padding forms its
    own trailing segment with loss mask 0, so it never touches a real token).
    """
    # DEVIATION (3): pad to the micro-batch's longest row, not to --max-length as veRL does.
    T = max(len(ex["input_ids"]) for ex in examples)
    B = len(examples)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)        # (B, T)
    loss_mask = torch.zeros((B, T), dtype=torch.long)                # (B, T)
    packed = "position_ids" in examples[0]
    extra = torch.zeros((B, T), dtype=torch.long)                    # (B, T) attention or positions
    for i, ex in enumerate(examples):
        n = len(ex["input_ids"])
        input_ids[i, :n] = torch.tensor(ex["input_ids"])
        loss_mask[i, :n] = torch.tensor(ex["loss_mask"])
        if packed:
            extra[i, :n] = torch.tensor(ex["position_ids"])
            extra[i, n:] = torch.arange(T - n)
        else:
            extra[i, :n] = 1
    batch = {"input_ids": input_ids, "loss_mask": loss_mask}
    batch["position_ids" if packed else "attention_mask"] = extra
    return batch


# -----------------------------------------------------------------------------
# Loss (PAPER.md §4)

def masked_ce_sum(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Σ CE over already-selected target positions: logits (N, V), targets (N,) -> (fp32 sum, N)."""
    ce = F.cross_entropy(logits.float(), targets, reduction="sum")   # upcast: bf16 CE is lossy
    return ce, targets.numel()


def micro_batch_loss(ce_sum: torch.Tensor, n_tokens: int, n_micro: int, *, norm: str = "micro",
                     n_tokens_global: int | None = None, world_size: int = 1) -> torch.Tensor:
    """The quantity whose gradient is accumulated for one micro-batch.

    micro (default, the paper): [PAPER.md §4] per micro-batch Σ CE / (n_mask + 1e-8), averaged over
        the micro-batches of the global batch (`balance_dp_token=False`), so the step loss is the
        mean of per-micro-batch token means; DDP's gradient averaging over ranks keeps it a mean.
    token: every target token of the global batch weighs the same: Σ CE / n_tokens_global, times
        world_size because DDP averages (not sums) gradients over ranks.
    """
    if norm == "micro":
        return ce_sum / (n_tokens + MASK_EPS) / n_micro
    if norm == "token":
        return ce_sum * world_size / max(n_tokens_global, 1)
    raise ValueError(f"--loss-norm must be 'micro' or 'token', not {norm!r}")


def reference_loss_terms(model, batch: dict) -> tuple[torch.Tensor, int]:
    """Plain reference: full logits from model(...), shifted, masked. Returns (Σ CE, N)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                   position_ids=batch.get("position_ids"), use_cache=False).logits  # (B, T, V)
    sel = batch["loss_mask"][:, 1:].bool()                             # (B, T-1): targets = ids[:, 1:]
    return masked_ce_sum(logits[:, :-1][sel], batch["input_ids"][:, 1:][sel])  # (N, V), (N,)


def fast_loss_terms(model, batch: dict) -> tuple[torch.Tensor, int]:
    """Same value as `reference_loss_terms`, but lm_head runs only on the N trained positions
    (prompt and padding logits are never formed: with V = 152k that is most of the activation memory).
    Valid for plain `hidden @ W_lm` heads (Qwen2, Llama); `train` falls back to the reference otherwise.
    """
    hidden = model.model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                         position_ids=batch.get("position_ids"), use_cache=False).last_hidden_state  # (B, T, D)
    sel = batch["loss_mask"][:, 1:].bool()                             # (B, T-1)
    logits = model.get_output_embeddings()(hidden[:, :-1][sel])        # (N, D) -> (N, V)
    return masked_ce_sum(logits, batch["input_ids"][:, 1:][sel])


def supports_fast_loss(model) -> bool:
    cfg = model.config
    return (hasattr(model, "model") and model.get_output_embeddings() is not None
            and getattr(cfg, "final_logit_softcapping", None) is None
            and getattr(cfg, "logit_scale", None) is None and getattr(cfg, "logits_scaling", None) is None)


class CausalLMLoss(nn.Module):
    """forward(**batch) -> (Σ masked CE, N). A module rather than a function only because DDP and
    FSDP2 must see the forward call to synchronise gradients / gather parameters."""

    def __init__(self, model, fast: bool = True):
        super().__init__()
        self.model, self.fast = model, fast

    def forward(self, **batch):
        return (fast_loss_terms if self.fast else reference_loss_terms)(self.model, batch)


# -----------------------------------------------------------------------------
# Schedule, optimiser, data order

def warmup_steps_for(total_steps: int, warmup_ratio: float = 0.1) -> int:
    """[PAPER.md §4] warmup = int(0.1 · total)."""
    return int(warmup_ratio * total_steps)


def lr_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    """Multiplier of the base LR for the optimizer step taken after `step` completed steps.

    [PAPER.md §4] linear warmup factor step/warmup, then ½(1 + cos πp), p = (step − warmup)/(total −
    warmup), min ratio 0. As in veRL/HF (LambdaLR stepped after the optimizer), the very first update
    uses factor 0 when warmup > 0.
    """
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    p = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * p)))


def make_param_groups(model, weight_decay: float, decay_1d: bool = True) -> list[dict]:
    """[PAPER.md §4] one group with weight decay on every trainable tensor (adapters included);
    decay_1d=False moves 1-D tensors (biases, norms, IA3/VeRA/DoRA vectors) to a wd=0 group."""
    params = [p for p in model.parameters() if p.requires_grad]
    if decay_1d:
        return [{"params": params, "weight_decay": weight_decay}]
    return [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]


def global_batch_indices(n_examples: int, global_batch: int, step: int, seed: int) -> tuple[list[int], int]:
    """Example indices of optimizer step `step` (0-based) and its epoch.

    [PAPER.md §4] DistributedSampler semantics: a fresh permutation per epoch from (seed + epoch),
    drop_last, so steps/epoch = ⌊N / global_batch⌋ (= the release's ⌊⌊N/8⌋/32⌋ on 8 GPUs) and the
    data position is a function of `step` alone (which makes resuming exact). torch.randperm with
    a generator seeded (seed + epoch) is what DistributedSampler draws, and rank r taking perm[r::W]
    in per-rank batches of G/W puts the same SET of examples into step k as perm[kG:(k+1)G]; only
    their split into micro-batches differs (which matters only to the per-micro-batch mean).
    """
    steps_per_epoch = n_examples // global_batch
    epoch, k = divmod(step, steps_per_epoch)
    perm = torch.randperm(n_examples, generator=torch.Generator().manual_seed(seed + epoch))  # (N,)
    return perm[k * global_batch:(k + 1) * global_batch].tolist(), epoch


# -----------------------------------------------------------------------------
# Reading SFT rows (JSONL / JSON / Parquet / hub) -> (prompt, response) pairs

def read_rows(path, *, skip_bad_rows: bool = False) -> tuple[list[tuple[dict, str]], int]:
    """-> ([(row, where)], n_bad). `where` ("file:line" / "file: row i") names the row in errors."""
    path = Path(path)
    if not path.exists():
        raise loading.DataFileNotFound(f"--data {path}: data file not found")
    if path.is_dir() or path.stat().st_size == 0:
        raise loading.DataError(f"--data {path}: data file is {'a directory' if path.is_dir() else 'empty'}")
    if path.suffix == ".parquet":   # the release's format (pyarrow, in requirements.txt)
        rows = [(r, f"{path}: row {i}") for i, r in enumerate(loading.read_parquet_rows(path))]
        bad = 0
    else:
        rows, bad = [], 0
        with open(path, encoding="utf-8") as f:
            text = f.read()
        if path.suffix == ".json" and text.lstrip().startswith("["):   # e.g. MetaMathQA-395K.json
            try:
                items = json.loads(text)
            except ValueError as e:
                raise loading.DataError(f"{path}: not valid JSON ({e})") from None
            rows = [(r, f"{path}: item {i}") for i, r in enumerate(items)]
        else:
            for lineno, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    if not isinstance(row, dict):
                        raise ValueError(f"expected a JSON object, got {type(row).__name__}")
                except ValueError as e:  # json.JSONDecodeError is a ValueError
                    if skip_bad_rows:
                        bad += 1
                        continue
                    raise loading.DataError(f"{path}:{lineno}: malformed JSONL line ({e}); fix it or pass "
                                            "--skip-bad-rows to skip and count such lines") from None
                rows.append((row, f"{path}:{lineno}"))
    if not rows:
        raise loading.DataError(f"--data {path}: holds no usable rows ({bad} malformed)")
    return rows, bad


def _mapped_pair(row: dict, where: str, keys: tuple) -> tuple:
    """(row[prompt_key], row[response_key]) for --prompt-key/--response-key (dotted = nested)."""
    got = []
    for key, flag in zip(keys, ("--prompt-key", "--response-key")):
        v = loading.get_key(row, key) if isinstance(row, dict) else None
        if not (isinstance(v, list) and v) and not (isinstance(v, str) and v.strip()):
            have = sorted(row) if isinstance(row, dict) else type(row).__name__
            raise loading.DataError(f"{where}: {flag} {key!r} is {'empty' if v is not None else 'missing'} "
                                    f"(row keys: {have}); pass --skip-bad-rows to skip such rows")
        got.append(v)
    return got[0], got[1]


def row_to_pair(row: dict, where: str, keys: tuple | None = None) -> tuple:
    """A row -> (prompt, response); prompt is a string or a list of chat messages.

    Accepted layouts: the release parquet {extra_info: {question, answer}} (PAPER.md §4);
    {prompt, response}; chat {messages: [..., {role: assistant, content}]} (Deviation 6); any other
    with keys = (prompt_key, response_key) from --prompt-key/--response-key (e.g. MetaMathQA's
    ("query", "response")).
    """
    if keys is not None:
        return _mapped_pair(row, where, keys)
    if not isinstance(row, dict):
        raise loading.DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    extra = row.get("extra_info")
    if isinstance(extra, dict) and "question" in extra:
        prompt, response = extra["question"], extra.get("answer")
    elif "messages" in row:
        msgs = row["messages"]
        if not (isinstance(msgs, list) and msgs and all(isinstance(m, dict) and "role" in m and "content" in m
                                                       for m in msgs)):
            raise ValueError(f"{where}: 'messages' must be a non-empty list of {{role, content}} dicts")
        if msgs[-1]["role"] != "assistant" or len(msgs) < 2:
            raise ValueError(f"{where}: no response: the last message must be the assistant's "
                             "and follow at least one prompt message")
        prompt, response = msgs[:-1], msgs[-1]["content"]   # DEVIATION (6): only the last turn is trained
    else:
        prompt, response = row.get("prompt"), row.get("response")
    hint = (f"row keys: {sorted(row)}; name other keys with --prompt-key/--response-key, "
            "e.g. --prompt-key query --response-key response for MetaMathQA")
    if not isinstance(response, str) or not response.strip():
        raise loading.DataError(f"{where}: row has no response (expected 'response', extra_info.answer or a "
                                f"final assistant message; {hint}); pass --skip-bad-rows to skip such rows")
    if not prompt or not isinstance(prompt, (str, list)):
        raise loading.DataError(f"{where}: row has no prompt (expected 'prompt', extra_info.question or "
                                f"messages; {hint})")
    return prompt, response


def fetch_hub_file(repo_id: str, filename: str | None) -> Path:
    """Download one file of a hub dataset (only outside tests; needs network or a filled cache)."""
    if not filename:
        raise ValueError(f"--data {repo_id} looks like a hub dataset id: also pass --hub-file, the file "
                         "inside it (e.g. --hub-file openr1-50k/train.parquet)")
    from huggingface_hub import hf_hub_download
    try:   # the local cache first: no network, no retries
        return Path(hf_hub_download(repo_id, filename, repo_type="dataset", local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached: one quick probe, then the download
        pass
    try:
        loading.probe_hub(repo_id, filename, repo_type="dataset", what="dataset")
        return Path(hf_hub_download(repo_id, filename, repo_type="dataset"))
    except Exception as e:  # noqa: BLE001 - re-raised with the fix
        raise RuntimeError(f"--data {repo_id}: could not fetch {filename!r} from the Hugging Face hub "
                           f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). Without "
                           "network, download the file elsewhere and pass --data /path/to/file") from None


def data_keys(cfg: dict) -> tuple | None:
    """(prompt_key, response_key) when --prompt-key/--response-key are given (the other one
    defaults to 'prompt' / 'response'), else None (the built-in layouts)."""
    pk, rk = cfg.get("prompt_key"), cfg.get("response_key")
    if pk is None and rk is None:
        return None
    return pk or "prompt", rk or "response"


def load_pairs(cfg: dict) -> tuple[list[tuple], dict]:
    """The configured SFT set -> ([(prompt, response)], stats)."""
    if cfg["task"]:
        import toy_world
        rows = toy_world.make_sft_rows(TOY_TASKS[cfg["task"]], cfg["n_train"], seed=cfg["data_seed"])
        rows = [(r, f"{cfg['task']} row {i}") for i, r in enumerate(rows)]
        bad = 0
    else:
        path = Path(cfg["data"])
        looks_hub = (not path.exists() and re.fullmatch(r"[\w.-]+/[\w.-]+", cfg["data"]) is not None
                     and path.suffix not in (".jsonl", ".json", ".parquet"))
        rows, bad = read_rows(fetch_hub_file(cfg["data"], cfg["hub_file"]) if looks_hub else path,
                              skip_bad_rows=cfg["skip_bad_rows"])
    keys = data_keys(cfg)
    pairs = []
    for row, where in rows:
        try:
            pairs.append(row_to_pair(row, where, keys))
        except ValueError:
            if not cfg["skip_bad_rows"]:
                raise
            bad += 1
    if cfg["n_train"] > 0:
        pairs = pairs[:cfg["n_train"]]   # files: the first n rows in file order
    if not pairs:
        raise loading.DataError(f"no usable rows in {cfg['data'] or cfg['task']} ({bad} bad rows skipped)")
    return pairs, {"n_rows": len(pairs), "n_bad_rows": bad}


# -----------------------------------------------------------------------------
# Configuration (argparse; `train` also takes a dict)

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="SFT with any PEFT method (PAPER.md §4).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("model and method")
    g.add_argument("--model", default="toy", help="'toy' (the committed toy base), a local HF model dir, or a hub id")
    g.add_argument("--method", default="lora", help="peft_methods.METHODS name; 'full' = full finetuning")
    g.add_argument("--r", type=int, default=None, help="rank r (LoRA family, AdaLoRA, MiSS, VeRA); None = method default")
    g.add_argument("--alpha", type=float, default=None, help="LoRA scale numerator α (scale α/r); None = method default")
    g.add_argument("--block-size", type=int, default=None, help="OFT block size b (rows of each rotation block)")
    g.add_argument("--dropout", type=float, default=None, help="adapter dropout probability; None = method default")
    g.add_argument("--hp", action="append", default=[], metavar="KEY=VALUE",
                   help="any other make_config field (value parsed as JSON, else a string); repeatable")
    g.add_argument("--target-modules", default=None, help="comma-separated module names; None = peft_methods.DEFAULT_TARGETS")
    g.add_argument("--adalora-release", action="store_true",
                   help="mimic the release: never call AdaLoRA's rank allocation / orthogonal regulariser")
    g.add_argument("--param-dtype", choices=["auto", "fp32", "bf16"], default="auto",
                   help="auto: fp32 trainable tensors (frozen base bf16 on CUDA); bf16: release-style pure bf16")
    g.add_argument("--trust-remote-code", action="store_true", help="allow model code from the hub")
    g = p.add_argument_group("data")
    g.add_argument("--task", choices=sorted(TOY_TASKS), default=None, help="toy-world SFT set (toy_world.make_sft_rows)")
    g.add_argument("--data", default=None, help="JSONL/JSON/Parquet file, or a hub dataset id (with --hub-file)")
    g.add_argument("--hub-file", default=None, help="file inside the hub dataset, e.g. openr1-50k/train.parquet")
    g.add_argument("--prompt-key", default=None, help="row key of the prompt (string or chat messages) when "
                   "the file uses neither the release layout nor prompt/response/messages; dotted for nested "
                   "fields (MetaMathQA: --prompt-key query --response-key response)")
    g.add_argument("--response-key", default=None, help="row key of the response (see --prompt-key)")
    g.add_argument("--n-train", type=int, default=-1,
                   help="rows: toy sets generate this many (-1 = 2000); files keep the first n (-1 = all)")
    g.add_argument("--data-seed", type=int, default=0, help="seed of the toy-world rows")
    g.add_argument("--max-length", type=int, default=8192, help="tokens (prompt + response); longer pairs are dropped")
    g.add_argument("--loss-mask", choices=["correct", "release"], default="correct",
                   help="correct: response incl. EOS; release: veRL off-by-one (last prompt token, no EOS)")
    g.add_argument("--pack", action="store_true", help="pack examples into rows of --max-length tokens (not in the paper)")
    g.add_argument("--skip-bad-rows", action="store_true", help="skip and count malformed rows instead of failing")
    g = p.add_argument_group("optimisation")
    g.add_argument("--lr", type=float, default=None,
                   help=f"peak LR; None = {PEFT_DEFAULT_LR} (PEFT) / {FULL_FT_DEFAULT_LR} (full)")
    g.add_argument("--weight-decay", type=float, default=0.01, help="AdamW decoupled weight decay")
    g.add_argument("--adam-betas", type=float, nargs=2, default=[0.9, 0.95], help="AdamW β1 β2")
    g.add_argument("--adam-eps", type=float, default=1e-8, help="AdamW ε")
    g.add_argument("--no-decay-1d", action="store_true", help="no weight decay on 1-D tensors (paper: decay all)")
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="clip the global L2 grad norm (<= 0: no clip)")
    g.add_argument("--warmup-ratio", type=float, default=0.1, help="fraction of optimizer steps of linear warmup")
    g.add_argument("--epochs", type=int, default=4, help="passes over the data")
    g.add_argument("--max-steps", type=int, default=-1,
                   help="cap on optimizer steps (-1 = epochs × steps/epoch); sets the schedule length")
    g.add_argument("--global-batch", type=int, default=256, help="sequences per optimizer step, all ranks together")
    g.add_argument("--micro-batch", type=int, default=2, help="sequences per forward pass per rank")
    g.add_argument("--micro-batch-tokens", type=int, default=16384,
                   help="token budget per forward: a micro-batch whose padded size (rows x longest row) "
                   "exceeds it is run in row chunks that each fit, with the same loss and gradient "
                   "(release: 16k tokens per GPU); 0 = off")
    g.add_argument("--loss-norm", choices=["micro", "token"], default="micro",
                   help="micro: mean of per-micro-batch token means (paper); token: one mean over the global batch")
    g = p.add_argument_group("runtime")
    g.add_argument("--device", default=None, help="cpu / cuda / cuda:1; None = cuda if available (torchrun: LOCAL_RANK)")
    g.add_argument("--seed", type=int, default=0, help="seed of adapter init, dropout and data order (paper sampler seed 0)")
    g.add_argument("--grad-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="non-reentrant activation checkpointing; default: on for real models, off for the toy")
    g.add_argument("--fsdp", choices=["auto", "on", "off"], default="auto",
                   help="under torchrun: FSDP2 fully_shard instead of DDP; auto = on for --method full on CUDA")
    g.add_argument("--loss-impl", choices=["fast", "reference"], default="fast",
                   help="fast: lm_head only on trained positions; reference: full logits")
    g = p.add_argument_group("checkpoints and output")
    g.add_argument("--out", default=None, help="run directory (required unless --smoke)")
    g.add_argument("--save-every-steps", type=int, default=-1,
                   help="optimizer steps between checkpoints; -1 = once per epoch, 0 = only at the end")
    g.add_argument("--keep-optimizer", choices=["last", "all"], default="last", help="which checkpoints keep optimizer.pt")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    g.add_argument("--overwrite", action="store_true", help="delete a previous run in --out and start again")
    g.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    g.add_argument("--smoke", action="store_true", help="tiny run (<= 4 steps, 32 rows) to check the plumbing on CPU")
    g = p.add_argument_group("memory plan (--dry-run: nothing is built, no data or weights are read)")
    g.add_argument("--dry-run", action="store_true", help="print the per-GPU peak memory of one training "
                   "step at the planned settings (memory.py: the model on fake tensors) and exit; --model "
                   "may be a configs/model_shapes name or .json file")
    g.add_argument("--gpus", type=int, default=None, help="GPUs of the planned run (torchrun "
                   "--nproc_per_node); default: $WORLD_SIZE or 1. Only --dry-run reads it")
    g.add_argument("--gpu-memory-gib", type=float, default=80.0,
                   help="memory of one GPU for the --dry-run verdict (H100 80, H200 141)")
    return p


def resolve_config(config=None) -> dict:
    """argv list / Namespace / dict / None -> the resolved config dict (defaults filled, checked)."""
    parser = build_parser()
    if config is None or isinstance(config, (list, tuple)):
        cfg = vars(parser.parse_args(list(config) if config is not None else []))
    else:
        cfg = vars(parser.parse_args([]))
        given = vars(config) if isinstance(config, argparse.Namespace) else dict(config)
        unknown = sorted(set(given) - set(cfg) - {"derived"})
        if unknown:
            raise ValueError(f"unknown train_sft config keys {unknown}; see python train_sft.py --help")
        cfg.update({k: v for k, v in given.items() if k != "derived"})
    if cfg["smoke"]:
        cfg.update(max_steps=min(cfg["max_steps"], 4) if cfg["max_steps"] > 0 else 4, n_train=32,
                   global_batch=4, micro_batch=2, max_length=min(cfg["max_length"], 512), save_every_steps=2)
        if not cfg["task"] and not cfg["data"]:
            cfg["task"] = "toy-math"
        cfg["out"] = cfg["out"] or f"runs/smoke-sft-{cfg['method']}"
    if cfg["task"] and cfg["n_train"] <= 0:
        cfg["n_train"] = 2000
    if cfg["lr"] is None:
        cfg["lr"] = FULL_FT_DEFAULT_LR if cfg["method"] == "full" else PEFT_DEFAULT_LR
    if cfg["grad_checkpointing"] is None:
        # [PAPER.md §4 Systems] on for real models: without it LoRA at 8192 tokens needs ~216 GiB on
        # a 7B model; off for the toy (tiny activations; the demo's numbers and speed stay as they were)
        cfg["grad_checkpointing"] = cfg["model"] != "toy"
    cfg["adam_betas"] = list(cfg["adam_betas"])
    dry = cfg["dry_run"]   # a memory plan needs neither a run directory nor data
    checks = [   # (holds, config key at fault, message)
        (dry or bool(cfg["out"]), "out", "--out is required (the run directory)"),
        (dry or (cfg["task"] is None) != (cfg["data"] is None), "task", "pass exactly one of --task and --data"),
        (cfg["gpus"] is None or cfg["gpus"] >= 1, "gpus", f"--gpus {cfg['gpus']} must be >= 1"),
        (cfg["micro_batch"] >= 1 and cfg["global_batch"] >= cfg["micro_batch"], "micro_batch",
         f"need 1 <= --micro-batch {cfg['micro_batch']} <= --global-batch {cfg['global_batch']}"),
        (cfg["max_length"] >= 2, "max_length", f"--max-length {cfg['max_length']} must be >= 2 tokens"),
        (cfg["micro_batch_tokens"] >= 0, "micro_batch_tokens",
         f"--micro-batch-tokens {cfg['micro_batch_tokens']} must be >= 0 (0 = off)"),
        (cfg["lr"] > 0, "lr", f"--lr {cfg['lr']} must be > 0"),
        (0 <= cfg["warmup_ratio"] < 1, "warmup_ratio", f"--warmup-ratio {cfg['warmup_ratio']} must be in [0, 1)"),
        (cfg["epochs"] >= 1, "epochs", f"--epochs {cfg['epochs']} must be >= 1"),
        (not (cfg["resume"] and cfg["overwrite"]), "resume", "--resume and --overwrite exclude each other"),
    ]
    for ok, key, msg in checks:
        if not ok:
            raise loading.ConfigError(msg, key)
    return cfg


def method_hparams(cfg: dict, peft_methods, total_steps: int) -> dict:
    """CLI hyperparameter flags -> make_config kwargs, checked against the method's dataclass fields."""
    return peft_methods.hparams_from_flags(cfg["method"], cfg, cfg["hp"], total_steps)


# -----------------------------------------------------------------------------
# Output directory, checkpoints, resume

def _checkpoints(out: Path) -> list[tuple[int, Path]]:
    found = []
    for d in out.glob(CKPT_PREFIX + "*"):
        m = re.fullmatch(CKPT_PREFIX + r"(\d+)", d.name)
        if m and (d / "trainer_state.json").exists():
            found.append((int(m.group(1)), d))
    return sorted(found)


def latest_checkpoint(out) -> Path | None:
    """Newest complete checkpoint (directories appear by atomic rename, so each one is whole)."""
    ckpts = _checkpoints(Path(out))
    return ckpts[-1][1] if ckpts else None


def config_diff(old: dict, new: dict) -> dict:
    keys = (set(old) | set(new)) - RESUME_FREE_KEYS - {"derived"}
    return {k: (old.get(k), new.get(k)) for k in sorted(keys) if old.get(k) != new.get(k)}


def prepare_out_dir(out: Path, cfg: dict, is_main: bool) -> Path | None:
    """Refuse an occupied --out unless --resume/--overwrite; return the checkpoint to resume from."""
    cfg_path = out / "config.json"
    occupied = out.exists() and any(out.iterdir())
    if cfg["resume"]:
        if not cfg_path.exists():
            if occupied:
                raise FileExistsError(f"--resume: {out} holds files but no config.json, so it is not a "
                                      "train_sft run; pick another --out")
            return None
        diff = config_diff(json.loads(cfg_path.read_text()), cfg)
        if diff:
            raise ValueError(f"--resume: {out} holds a different run; differing settings (old, new): {diff}")
        return latest_checkpoint(out)
    if occupied:
        if not cfg["overwrite"]:
            what = "files"
            if cfg_path.exists():
                diff = config_diff(json.loads(cfg_path.read_text()), cfg)
                what = f"a different run (differing settings (old, new): {diff})" if diff else "this run already"
            raise FileExistsError(f"output directory {out} already holds {what}; pass --resume to continue "
                                  "it or --overwrite to delete it and start again")
        if is_main:  # delete only what train_sft writes, never unrelated files
            for d in out.glob(CKPT_PREFIX + "*"):
                shutil.rmtree(d)
            for d in out.glob(".tmp-" + CKPT_PREFIX + "*"):
                shutil.rmtree(d)
            for name in ("config.json", "metrics.jsonl", "summary.json"):
                (out / name).unlink(missing_ok=True)
    return None


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def adapter_aux_state(model) -> dict:
    """Adapter training state kept outside the adapter tensors: AdaLoRA's sensitivity EMAs (`_ipt`,
    peft_methods internals), needed for an exact resume of a run with rank allocation on."""
    import peft_methods
    return {n: l._ipt for n, l in peft_methods.adapter_layers(model).items() if getattr(l, "_ipt", None)}


def save_checkpoint(out: Path, step: int, model, optimizer, state: dict, cfg: dict, *, rank: int,
                    world_size: int, fsdp: bool, base_spec: str) -> Path:
    """Write global_step_<step>/ into a temp dir, then rename it into place (atomic per checkpoint)."""
    import peft_methods
    final = out / f"{CKPT_PREFIX}{step}"
    tmp = out / f".tmp-{CKPT_PREFIX}{step}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier(world_size)
    if fsdp:
        # FSDP2's state_dict() holds shards (DTensors): gather the full weights to rank 0's CPU (a
        # collective), load them into a meta-device shell of the model, and save that (Full FT only).
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        full_sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank == 0:
            from transformers import AutoModelForCausalLM
            with torch.device("meta"):
                shell = AutoModelForCausalLM.from_config(model.config)
            peft_methods.apply_peft(shell, "full")
            shell.load_state_dict(full_sd, assign=True, strict=False)
            shell.tie_weights()   # re-tie lm_head to the embedding where the config ties them
            peft_methods.save_adapter(shell, tmp, base_model=base_spec, extra={"step": step})
        torch.save(optimizer.state_dict(), tmp / f"optimizer.rank{rank}.pt")  # this rank's shards
    elif rank == 0:
        peft_methods.save_adapter(model, tmp, base_model=base_spec, extra={"step": step})
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    if world_size > 1:   # every rank's dropout stream differs (seed + rank): keep each for --resume
        torch.save(rng_state(), tmp / f"rng.rank{rank}.pt")
    if rank == 0:
        if cfg["method"] == "full":   # a usable model folder: evaluate.py --model <checkpoint>
            loading.save_tokenizer_files(base_spec, tmp, model)
        torch.save({"rng": rng_state(), "adapter_aux": adapter_aux_state(model)}, tmp / "trainer_state.pt")
        loading.atomic_write_json(tmp / "config.json", cfg)
        loading.atomic_write_json(tmp / "trainer_state.json", state)   # written last: marks completeness
    _barrier(world_size)
    if rank == 0:
        loading.atomic_replace_dir(tmp, final)
        if cfg["keep_optimizer"] == "last":   # DEVIATION (8): older checkpoints keep weights only
            for k, d in _checkpoints(out):
                if k < step:
                    for f in d.glob("optimizer*.pt"):
                        f.unlink()
    _barrier(world_size)
    return final


def _barrier(world_size: int) -> None:
    if world_size > 1:
        torch.distributed.barrier()


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    # DEVIATION (9): CPU has no allocator statistics; report the peak RSS (KiB on Linux).
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def data_fingerprint(examples: list[dict]) -> str:
    """Cheap hash of the encoded set (lengths, masks, token sums) to detect changed data on resume."""
    h = hashlib.sha1()
    for ex in examples:
        h.update(f"{len(ex['input_ids'])},{sum(ex['input_ids'])},{sum(ex['loss_mask'])};".encode())
    return h.hexdigest()


# -----------------------------------------------------------------------------
# One optimizer step (shared with the benchmark in tests/test_train_sft.py)

def split_by_tokens(mb: dict, max_tokens: int) -> list[dict]:
    """Row chunks of a collated micro-batch whose padded size (rows × longest row) <= max_tokens.

    [PAPER.md §5 "Systems": the release bounds each forward by tokens, 16k per GPU] A chunk keeps
    its rows in order and is re-trimmed to its own longest row (right padding, so trimming drops only
    padding); packed rows (position_ids) keep their width. A row longer than the budget on its own
    gets a chunk of its own. max_tokens <= 0, or a micro-batch that fits: [mb] unchanged.
    """
    B, T = mb["input_ids"].shape
    if max_tokens <= 0 or B * T <= max_tokens:
        return [mb]
    if "attention_mask" in mb:
        widths = [int(w) for w in mb["attention_mask"].sum(1)]              # real tokens per row
    else:
        widths = [T] * B
    chunks, cur, w = [], [], 0
    for i in range(B):
        if cur and (len(cur) + 1) * max(w, widths[i]) > max_tokens:
            chunks.append((cur, w))
            cur, w = [], 0
        cur, w = cur + [i], max(w, widths[i])
    chunks.append((cur, w))
    return [{k: v[rows, :width] for k, v in mb.items()} for rows, width in chunks]



def optimizer_step(loss_module, micro_batches: list[dict], optimizer, params: list, *, lr: float,
                   max_grad_norm: float, loss_norm: str = "micro", world_size: int = 1,
                   autocast=contextlib.nullcontext, no_sync=None, extra_loss=None, post_step=None,
                   max_tokens: int = 0) -> dict:
    """Accumulate gradients over `micro_batches`, clip, and take one AdamW step.

    max_tokens > 0: a micro-batch over the token budget runs as row chunks (`split_by_tokens`), each
    chunk's Σ CE normalised by its whole micro-batch's target count, so the loss and the gradient are
    those of the unsplit micro-batch (the paper's per-micro-batch mean is kept).

    Returns {loss, grad_norm, skipped, n_targets}. loss is the global-batch loss (all ranks). A
    non-finite grad norm skips the update [PAPER.md §4]; a non-finite loss is reported to the caller.
    """
    for group in optimizer.param_groups:
        group["lr"] = lr
    n_micro = len(micro_batches)
    n_local = sum(int(mb["loss_mask"][:, 1:].sum()) for mb in micro_batches)
    n_global = n_local
    if world_size > 1 and loss_norm == "token":
        t = torch.tensor([n_local], device=micro_batches[0]["input_ids"].device)
        torch.distributed.all_reduce(t)
        n_global = int(t.item())
    log_sum = torch.zeros((), dtype=torch.float64, device=micro_batches[0]["input_ids"].device)
    for i, mb in enumerate(micro_batches):
        n = int(mb["loss_mask"][:, 1:].sum())            # the whole micro-batch's targets
        parts = split_by_tokens(mb, max_tokens)
        for j, part in enumerate(parts):
            last = i == n_micro - 1 and j == len(parts) - 1
            sync_ctx = no_sync() if (no_sync is not None and not last) else contextlib.nullcontext()
            with sync_ctx:
                with autocast():
                    ce_sum, _ = loss_module(**part)
                loss = micro_batch_loss(ce_sum, n, n_micro, norm=loss_norm, n_tokens_global=n_global,
                                        world_size=world_size)
                if extra_loss is not None and j == 0:   # e.g. AdaLoRA's orthogonal regulariser, averaged likewise
                    loss = loss + extra_loss() / n_micro
                loss.backward()
            log_sum += (ce_sum.detach() / (n + MASK_EPS) / n_micro if loss_norm == "micro"
                        else ce_sum.detach() / max(n_global, 1))
    if world_size > 1:
        torch.distributed.all_reduce(log_sum)
        if loss_norm == "micro":
            log_sum /= world_size
    clip = max_grad_norm if max_grad_norm > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(params, clip)
    if hasattr(grad_norm, "full_tensor"):   # FSDP2 returns a DTensor
        grad_norm = grad_norm.full_tensor()
    grad_norm = float(grad_norm)
    skipped = not math.isfinite(grad_norm)
    if not skipped:
        optimizer.step()
        if post_step is not None:   # AdaLoRA's rank allocation reads the gradients: before zero_grad
            post_step()
    optimizer.zero_grad(set_to_none=True)
    return {"loss": float(log_sum), "grad_norm": grad_norm, "skipped": skipped, "n_targets": n_global}


# -----------------------------------------------------------------------------
# Distributed setup (torchrun). Single GPU and CPU need no launcher.

def init_distributed(cfg: dict) -> tuple[int, int, torch.device]:
    """-> (rank, world_size, device). Under torchrun with WORLD_SIZE > 1: NCCL on CUDA, gloo on CPU."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return 0, 1, loading.pick_device(cfg["device"])
    import torch.distributed as dist
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return dist.get_rank(), world_size, torch.device("cuda", local_rank)
    return dist.get_rank(), world_size, torch.device("cpu")


def wrap_parallel(model, loss_module, fsdp: bool, world_size: int, device: torch.device):
    """DDP, or FSDP2 fully_shard (per decoder layer, then the root) for Full FT of big models.

    Returns (module to call, no_sync context factory or None, is_fsdp).
    """
    if world_size == 1:
        return loss_module, None, False
    if fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        # [PAPER.md §4] FSDP2 with bf16 compute and fp32 gradient reduction (CUDA; CPU stays fp32).
        mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if device.type == "cuda" else MixedPrecisionPolicy())
        for layer in model.model.layers:
            fully_shard(layer, mp_policy=mp)
        fully_shard(loss_module, mp_policy=mp)   # root: embeddings, final norm, lm_head
        # accumulate without reduce-scatter until the last micro-batch
        @contextlib.contextmanager
        def no_sync():
            loss_module.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                loss_module.set_requires_gradient_sync(True)
        return loss_module, no_sync, True
    from torch.nn.parallel import DistributedDataParallel as DDP
    ddp = DDP(loss_module, device_ids=[device.index] if device.type == "cuda" else None)
    return ddp, ddp.no_sync, False


# -----------------------------------------------------------------------------
# --dry-run: the memory plan (memory.py), before anything is built

def dry_run(cfg: dict) -> dict:
    """Print the per-GPU peak memory of one step at cfg's settings on `--gpus` CUDA GPUs; returns
    memory.estimate's dict. Nothing real is built: the model lives on fake tensors."""
    import memory   # imported here: memory.py imports this file
    import peft_methods
    if cfg["method"] not in peft_methods.METHODS:
        raise loading.ConfigError(f"--method {cfg['method']!r} is not one of {sorted(peft_methods.METHODS)}", "method")
    gpus = cfg["gpus"] or int(os.environ.get("WORLD_SIZE", "1"))
    hf_config = memory.hf_config_for(cfg["model"])
    plan = memory.sft_plan(cfg, gpus=gpus, cuda=True)
    print(memory.report(hf_config, plan, spec=cfg["model"], gpu_memory_gib=cfg["gpu_memory_gib"],
                        tool="train_sft"))
    return memory.estimate(hf_config, plan)


# -----------------------------------------------------------------------------
# The training routine

def train(config=None, *, model=None, tokenizer=None, hooks: dict | None = None) -> dict:
    """Run (or resume) one SFT run and return its summary dict (also written to <out>/summary.json).

    config: argv list, argparse.Namespace or dict of flag names (dashes -> underscores).
    model, tokenizer: an already loaded base model (not yet wrapped) to train instead of loading
        cfg["model"] (cfg["model"] is still recorded, and used to reload on --resume).
    hooks: optional callables {"after_setup": f(model)} (after wrapping, before the first step) and
        {"after_step": f(step, metrics_row)} (after each optimizer step and its checkpoint, if any).
    """
    import peft_methods
    hooks = hooks or {}
    cfg = resolve_config(config)
    if cfg["dry_run"]:
        return dry_run(cfg)
    if cfg["method"] not in peft_methods.METHODS:
        raise ValueError(f"--method {cfg['method']!r} is not one of {sorted(peft_methods.METHODS)}")
    rank, world_size, device = init_distributed(cfg)
    is_main = rank == 0
    if cfg["global_batch"] % (cfg["micro_batch"] * world_size):
        raise ValueError(f"--global-batch {cfg['global_batch']} must be a multiple of --micro-batch "
                         f"{cfg['micro_batch']} × world size {world_size}")
    out = Path(cfg["out"])
    resume_from = prepare_out_dir(out, cfg, is_main)
    _barrier(world_size)
    out.mkdir(parents=True, exist_ok=True)
    loading.set_seed(cfg["seed"])
    # ---- data rows first: a missing file, a bad row or key, or no pyarrow fails in seconds, before the model
    pairs, stats = load_pairs(cfg)

    # ---- model and tokenizer. DEVIATION (2): fp32 trainable masters unless --param-dtype bf16.
    full = cfg["method"] == "full"
    if cfg["param_dtype"] == "bf16":
        dtype = torch.bfloat16
    elif cfg["param_dtype"] == "fp32" or full or device.type != "cuda":
        dtype = torch.float32
    else:
        dtype = torch.bfloat16   # frozen base in bf16, adapters in fp32 (adapter_dtype below)
    if model is None:
        model, tokenizer = loading.load_model(cfg["model"], dtype=dtype, device=device,
                                              trust_remote_code=cfg["trust_remote_code"])
    elif tokenizer is None:
        raise ValueError("train(model=...) also needs tokenizer=...")
    model.to(device)
    if is_main:
        print(f"[train_sft] device {device} (world size {world_size}); base dtype "
              f"{next(model.parameters()).dtype}; autocast bf16: {device.type == 'cuda'}")

    # ---- data: (rows read above) -> encoded examples -> drop over-long -> (pack)
    examples = encode_examples(tokenizer, pairs, loss_mask=cfg["loss_mask"])
    lengths = [len(ex["input_ids"]) for ex in examples]
    examples, n_dropped = drop_overlong(examples, cfg["max_length"])
    if not examples:
        raise ValueError(f"every one of the {len(lengths)} examples is longer than --max-length "
                         f"{cfg['max_length']} tokens (shortest {min(lengths)}, longest {max(lengths)}); "
                         "raise --max-length")
    if cfg["pack"]:
        examples = pack_examples(examples, cfg["max_length"])
    n_ex, G = len(examples), cfg["global_batch"]
    if n_ex < G:
        raise ValueError(f"{n_ex} training {'rows' if cfg['pack'] else 'examples'} < --global-batch {G}: "
                         "not even one optimizer step; lower --global-batch or add data")
    steps_per_epoch = n_ex // G
    total_steps = cfg["epochs"] * steps_per_epoch
    if cfg["max_steps"] > 0:
        total_steps = min(total_steps, cfg["max_steps"])
    warmup_steps = warmup_steps_for(total_steps, cfg["warmup_ratio"])
    save_every = steps_per_epoch if cfg["save_every_steps"] < 0 else cfg["save_every_steps"]
    fingerprint = data_fingerprint(examples)
    stats.update(n_examples_encoded=len(lengths), n_dropped_too_long=n_dropped, n_train_rows=n_ex,
                 steps_per_epoch=steps_per_epoch, total_steps=total_steps, warmup_steps=warmup_steps,
                 world_size=world_size, data_fingerprint=fingerprint)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    per_rank = G // world_size

    def micro_batches_for(step: int) -> tuple[list[dict], int]:
        idx, epoch = global_batch_indices(n_ex, G, step, cfg["seed"])
        mine = idx[rank * per_rank:(rank + 1) * per_rank]
        mbs = [collate([examples[i] for i in mine[j:j + cfg["micro_batch"]]], pad_id)
               for j in range(0, per_rank, cfg["micro_batch"])]
        return [{k: v.to(device) for k, v in mb.items()} for mb in mbs], epoch

    # ---- PEFT: fresh wrap, or re-apply + load from the checkpoint
    targets = tuple(cfg["target_modules"].split(",")) if cfg["target_modules"] else peft_methods.DEFAULT_TARGETS
    hp = method_hparams(cfg, peft_methods, total_steps)
    adapter_dtype = torch.bfloat16 if cfg["param_dtype"] == "bf16" else torch.float32
    if resume_from is not None:
        peft_methods.load_adapter(model, resume_from)
    else:
        init_batch = None
        if cfg["method"] == "keeplora":   # seed gradient from the first micro-batch (METHODS.md §8)
            mb = micro_batches_for(0)[0][0]
            # labels = input_ids on trained tokens (HF shifts them inside model(labels=...)), so the
            # seed loss is this file's masked token-mean CE; loss_mask itself is not a model kwarg.
            init_batch = {k: v for k, v in mb.items() if k != "loss_mask"}
            init_batch["labels"] = torch.where(mb["loss_mask"].bool(), mb["input_ids"], -100)
        peft_methods.apply_peft(model, cfg["method"], peft_methods.make_config(cfg["method"], **hp),
                                target_modules=targets, adapter_dtype=adapter_dtype, init_batch=init_batch)
    model.to(device)
    n_trainable = peft_methods.count_trainable(model)
    if cfg["grad_checkpointing"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model.train()
    if world_size > 1:   # weights are built from `seed` on every rank; dropout streams per rank
        loading.set_rank_seed(cfg["seed"], rank)
    if "after_setup" in hooks:
        hooks["after_setup"](model)

    # DEVIATION (5): AdaLoRA's hooks are called (the release never does); looked up with getattr
    # because CONTRACTS.md leaves them optional.
    ada_reg = ada_alloc = None
    if cfg["method"] == "adalora" and not cfg["adalora_release"]:
        ada_reg = getattr(peft_methods, "adalora_regularizer", None)
        ada_alloc = getattr(peft_methods, "adalora_update_and_allocate", None)
        if is_main and (ada_reg is None or ada_alloc is None):
            print("[train_sft] note: peft_methods has no AdaLoRA regulariser/allocation hook; "
                  "training as the release does (fixed-rank SVD-form LoRA)")

    loss_module = CausalLMLoss(model, fast=cfg["loss_impl"] == "fast" and supports_fast_loss(model))
    use_fsdp = cfg["fsdp"] == "on" or (cfg["fsdp"] == "auto" and full and device.type == "cuda")
    if use_fsdp and not full and world_size > 1:   # DEVIATION (10): PEFT methods use DDP
        raise ValueError("--fsdp on is for --method full (PEFT methods use DDP: the frozen base is replicated)")
    runner, no_sync, fsdp = wrap_parallel(model, loss_module, use_fsdp, world_size, device)
    params = [p for p in loss_module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(make_param_groups(loss_module, cfg["weight_decay"], not cfg["no_decay_1d"]),
                                  lr=cfg["lr"], betas=tuple(cfg["adam_betas"]), eps=cfg["adam_eps"])
    autocast = ((lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" and not fsdp
                else contextlib.nullcontext)

    # ---- resume state
    start_step, state = 0, {}
    metrics_path = out / "metrics.jsonl"
    if resume_from is not None:
        state = json.loads((resume_from / "trainer_state.json").read_text())
        if state["data_fingerprint"] != fingerprint:
            raise ValueError(f"--resume: the encoded data differs from the run in {out} (fingerprint "
                             f"{fingerprint[:12]} vs {state['data_fingerprint'][:12]})")
        opt_file = resume_from / (f"optimizer.rank{rank}.pt" if fsdp else "optimizer.pt")
        optimizer.load_state_dict(torch.load(opt_file, map_location=device, weights_only=False))
        extra = torch.load(resume_from / "trainer_state.pt", map_location=device, weights_only=False)
        own = resume_from / f"rng.rank{rank}.pt"   # each rank's own streams (seed + rank)
        set_rng_state(torch.load(own, weights_only=False) if (world_size > 1 and own.exists()) else extra["rng"])
        layers = peft_methods.adapter_layers(model)
        for name, aux in extra.get("adapter_aux", {}).items():
            layers[name]._ipt = aux
        start_step = state["step"]
        if is_main:
            print(f"[train_sft] resuming from {resume_from} (step {start_step}/{total_steps})")
    cfg_out = dict(cfg, derived=dict(stats, n_trainable=n_trainable, method_hparams=hp))
    if is_main:
        old = metrics_path.read_text().splitlines() if (resume_from and metrics_path.exists()) else []
        keep = [ln for ln in old if ln.strip() and json.loads(ln)["step"] <= start_step]
        loading.atomic_write_text(metrics_path, "".join(ln + "\n" for ln in keep))  # drop lost steps
        loading.atomic_write_json(out / "config.json", cfg_out)
        print(f"[train_sft] config: {json.dumps(cfg_out, default=str)}")

    # ---- the loop
    from tqdm import tqdm
    bar = tqdm(total=total_steps, initial=start_step, disable=not is_main or cfg["no_progress"],
               desc=f"sft {cfg['method']}", dynamic_ncols=True)
    tokens_seen = state.get("tokens_seen", 0)
    n_skipped = state.get("n_skipped_steps", 0)
    train_time = state.get("train_time_s", 0.0)
    first_loss, last_loss = state.get("first_loss"), state.get("last_loss")
    last_ckpt = resume_from
    metrics_f = open(metrics_path, "a", encoding="utf-8") if is_main else None
    try:
        for step in range(start_step, total_steps):
            t0 = time.perf_counter()
            mbs, epoch = micro_batches_for(step)
            n_tok = sum(int(mb["attention_mask"].sum()) if "attention_mask" in mb else
                        int((mb["input_ids"] != pad_id).sum()) for mb in mbs)
            lr = cfg["lr"] * lr_factor(step, total_steps, warmup_steps)
            res = optimizer_step(
                runner, mbs, optimizer, params, lr=lr, max_grad_norm=cfg["max_grad_norm"],
                loss_norm=cfg["loss_norm"], world_size=world_size, autocast=autocast, no_sync=no_sync,
                extra_loss=(lambda: ada_reg(model)) if ada_reg else None,
                post_step=(lambda: ada_alloc(model, step, total_steps)) if ada_alloc else None,
                max_tokens=cfg["micro_batch_tokens"])
            if not math.isfinite(res["loss"]):
                raise FloatingPointError(
                    f"non-finite training loss ({res['loss']}) at optimizer step {step + 1} (epoch {epoch}); "
                    f"stopped without saving. Last good checkpoint: {last_ckpt or 'none yet'}. Lower --lr, "
                    "check the data, then continue with --resume (or start again with --overwrite)")
            if world_size > 1:
                t = torch.tensor([n_tok], device=device)
                torch.distributed.all_reduce(t)
                n_tok = int(t.item())
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            dt = time.perf_counter() - t0
            train_time += dt
            tokens_seen += n_tok
            n_skipped += res["skipped"]
            first_loss = res["loss"] if first_loss is None else first_loss
            last_loss = res["loss"]
            row = {"step": step + 1, "epoch": epoch, "loss": res["loss"], "lr": lr, "grad_norm": res["grad_norm"],
                   "skipped": res["skipped"], "tokens": n_tok, "tokens_per_s": n_tok / dt,
                   "peak_mem_gib": peak_memory_gib(device)}
            if is_main:
                metrics_f.write(json.dumps(row) + "\n")
                metrics_f.flush()
                bar.set_postfix(loss=f"{res['loss']:.4f}", tok_s=f"{n_tok / dt:.0f}", lr=f"{lr:.2e}")
                bar.update(1)
            done = step + 1
            if (save_every > 0 and done % save_every == 0) or done == total_steps:
                state = {"step": done, "epoch": done // steps_per_epoch, "batch_in_epoch": done % steps_per_epoch,
                         "examples_seen": done * G, "tokens_seen": tokens_seen, "n_skipped_steps": n_skipped,
                         "train_time_s": train_time, "first_loss": first_loss, "last_loss": last_loss,
                         "data_fingerprint": fingerprint, "data_seed": cfg["seed"],
                         "scheduler": {"base_lr": cfg["lr"], "warmup_steps": warmup_steps, "total_steps": total_steps,
                                       "next_lr_factor": lr_factor(done, total_steps, warmup_steps)},
                         "files": {"optimizer": "optimizer.pt (AdamW state_dict)", "rng": "trainer_state.pt"}}
                last_ckpt = save_checkpoint(out, done, model, optimizer, state, cfg_out, rank=rank,
                                            world_size=world_size, fsdp=fsdp, base_spec=cfg["model"])
            if "after_step" in hooks:   # after the step's checkpoint (if any) is on disk
                hooks["after_step"](done, row)
    finally:
        bar.close()
        if metrics_f is not None:
            metrics_f.close()

    summary = {"out": str(out), "method": cfg["method"], "model": cfg["model"], "steps": total_steps,
               "final_checkpoint": str(latest_checkpoint(out)), "first_loss": first_loss, "last_loss": last_loss,
               "n_trainable": n_trainable, "tokens_seen": tokens_seen, "train_time_s": train_time,
               "tokens_per_s": tokens_seen / train_time if train_time else None,
               "peak_mem_gib": peak_memory_gib(device), "n_skipped_steps": n_skipped,
               "resumed_from": str(resume_from) if resume_from else None, **stats}
    if is_main:
        loading.atomic_write_json(out / "summary.json", summary)
        print(f"[train_sft] done: {json.dumps(summary, default=str)}")
    return summary


if __name__ == "__main__":
    try:
        loading.run_cli("train_sft.py", lambda: train(sys.argv[1:]), resume_hint="rerun the same "
                        "command with --resume to continue from the last checkpoint")
    except (ValueError, FileNotFoundError, FileExistsError, FloatingPointError, RuntimeError) as err:
        print(f"train_sft.py: error: {err}", file=sys.stderr)
        sys.exit(1)
