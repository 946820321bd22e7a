"""train_sft.py — supervised finetuning (SFT) of a causal LM with any PEFT method, in plain PyTorch.

Implements PEFT-Arena's SFT setting (arXiv 2605.28819, §4.1 "SFT"; its recipe is the official
release's [PA train/train_sft.sh] and SFT trainer [PA fsdp_sft_trainer.py]). The algorithm, as the
numbered steps of `train`'s loop:

    data:   prompt (chat template, generation prompt) + response + EOS; over-long pairs dropped
    for step k = 0 .. K-1:
      1. the global batch of step k: a fresh permutation per epoch (DistributedSampler order)
      2. LR_k = lr · f(k): linear warmup over 10% of the steps, then cosine to 0
      3. per micro-batch m: L_m = Σ_{t in response} CE(t) / (n_m + 1e-8); backward of mean_m L_m
         (gradient accumulation); clip the global grad norm at 1.0; AdamW (β 0.9, 0.95, wd 0.01),
         the step skipped on a non-finite norm
      4. log the step (loss, LR, grad norm, tokens/s, peak memory)
      5. every N steps and at the end: checkpoint global_step_<k>/ (what rewind.py reads)

Any model `loading.load_model` loads, any `peft_methods` method ("full" = Full FT).
"PA <path>" is a file of the official release (github.com/Sphere-AI-Lab/PEFT-Arena at e982d19);
"PA fsdp_sft_trainer.py" is its `train/peft_arena_verl/trainer/fsdp_sft_trainer.py`.

Run:
    python train_sft.py --model toy --method oft --block-size 16 --task toy-math --out runs/sft-oft-b16
    python train_sft.py --model /models/Qwen2.5-7B --method lora --r 8 --alpha 16 \
        --data openr1-50k/train.parquet --max-length 8192 --out runs/qwen-math-lora-r8
    torchrun --nproc_per_node 8 train_sft.py ...        # DDP; FSDP2 (fully_shard) for --method full
    python train_sft.py --resume --out runs/sft-oft-b16 ...   # continue after a kill (same flags)
    python train_sft.py --smoke --model toy --out /tmp/sft-smoke   # tiny run on CPU
From Python (arena.py):  summary = train_sft.train({"model": "toy", "method": "lora", "task": "toy-math",
                                                   "out": "runs/x"})

Outputs in --out (loading.py's run-directory layout): config.json, metrics.jsonl (one line per
optimizer step), global_step_<k>/ (peft_methods.save_adapter files, or full weights + tokenizer files
for Full FT so `evaluate.py --model <checkpoint>` takes it; trainer_state.json/.pt, optimizer.pt,
config.json) and summary.json. Data (--data): the release parquet, {prompt, response} rows, chat
{messages}, or other keys named with --prompt-key/--response-key; every row is checked before the
model loads.

Shape legend: B sequences in a micro-batch, T tokens per (padded) sequence, V vocab size, D model
width, N trained target tokens in a micro-batch (positions where the loss mask is 1).

Deviations that change a number the paper reports (each marked `# DEVIATION (n)` at the line):
1. Loss mask: the whole response incl. the final EOS is trained, no prompt token; the release's
   veRL mask is off by one (last prompt token, no EOS); `--loss-mask release` reproduces it.
2. Precision: on CUDA trainable tensors and AdamW states are fp32 masters under bf16 autocast
   (frozen base bf16); the release trains bf16 tensors (`--param-dtype bf16` mimics it).
3. Full FT default LR 5e-5 (PA configs/train/sft_full_qwen_math.yaml; the paper gives none).
4. AdaLoRA's rank allocation and orthogonal regulariser are called; the release never calls them
   (`--adalora-release` mimics that).

Implementation notes (no reported number changes with them; marked `# NOTE (x)` at the line):
a. Micro-batches are right-padded to their own longest row; one over --micro-batch-tokens runs as
   row chunks with the same loss and gradient. Gradient checkpointing on for real models only.
b. `messages` rows: only the final assistant turn is trained (earlier turns are prompt).
c. Optional `--pack` (not in the paper): position ids restart per example, no cross-attention.
d. Only the newest checkpoint keeps optimizer.pt (`--keep-optimizer all` keeps every one).
e. CPU peak memory is the process's peak resident set size (ru_maxrss).
f. Multi-GPU: PEFT methods under DDP, Full FT under FSDP2 `fully_shard` (the release shards every
   method). Each rank's dropout stream is seeded seed + rank.
"""
from __future__ import annotations

import argparse, contextlib, hashlib, json, math, os, random, re, resource, shutil, sys, time  # noqa: E401
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from huggingface_hub import hf_hub_download
from tqdm import tqdm

import loading, peft_methods, toy_world  # noqa: E401

PEFT_DEFAULT_LR = 2e-4     # [PA run.py resolve_train_lr] every PEFT method, SFT
FULL_FT_DEFAULT_LR = 5e-5  # DEVIATION (3): [PA configs/train/sft_full_qwen_math.yaml]
MASK_EPS = 1e-8            # [PA fsdp_sft_trainer.py] loss = Σ masked CE / (n_mask + 1e-8)
CKPT_PREFIX = loading.CKPT_PREFIX
TOY_TASKS = {"toy-math": "math", "toy-med": "med"}
# flags that may change between a run and its --resume without changing the trajectory
RESUME_FREE_KEYS = {"resume", "overwrite", "out", "no_progress", "save_every_steps", "keep_optimizer"}
OWNED_FILES = ("config.json", "metrics.jsonl", "summary.json")   # what --overwrite deletes


# -----------------------------------------------------------------------------
# Tokenisation and the loss mask [PA fsdp_sft_trainer.py, PA sft_dataset.py]

def build_loss_mask(n_prompt: int, n_total: int, mode: str = "correct") -> list[int]:
    """Per-token mask over input_ids: 1 = this token is a trained target (predicted from the token
    before it). Paired with targets input_ids[1:] via mask[1:], exactly as veRL does.

    correct: tokens P..L-1 (the whole response incl. the final EOS); no prompt token.
    release: [PA fsdp_sft_trainer.py, veRL off-by-one] the attention mask zeroed on 0..P-2 and at
             L-1, i.e. tokens P-1..L-2: the last prompt token is trained, the final EOS is not.
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


def encode_examples(tokenizer, pairs: list[tuple], *, loss_mask: str = "correct") -> list[dict]:
    """(prompt, response) pairs -> [{input_ids, loss_mask, n_prompt}] (plain lists, length L each).

    [PA sft_dataset.py] prompt = chat template of the user turn(s) with the generation prompt;
    response = answer + eos_token; both tokenised separately with add_special_tokens=False and
    concatenated (separately, so no BPE merge crosses the prompt/response boundary). One batched
    fast-tokenizer call per side.
    """
    if not pairs:
        return []
    if tokenizer.eos_token is None:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no eos_token; SFT appends it to every response")
    as_chat = lambda p: [{"role": "user", "content": p}] if isinstance(p, str) else list(p)  # noqa: E731
    prompts = [loading.render_chat(tokenizer, as_chat(p), add_generation_prompt=True) for p, _ in pairs]
    p_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    r_ids = tokenizer([r + tokenizer.eos_token for _, r in pairs], add_special_tokens=False)["input_ids"]
    return [{"input_ids": p + r, "loss_mask": build_loss_mask(len(p), len(p) + len(r), loss_mask),
             "n_prompt": len(p)} for p, r in zip(p_ids, r_ids)]


def encode_example(tokenizer, prompt, response: str, *, loss_mask: str = "correct") -> dict:
    """One (prompt, response) pair -> {input_ids, loss_mask, n_prompt} (see `encode_examples`)."""
    return encode_examples(tokenizer, [(prompt, response)], loss_mask=loss_mask)[0]


def drop_overlong(examples: list[dict], max_length: int) -> tuple[list[dict], int]:
    """[PA sft_dataset.py] pairs longer than max_length are dropped, not truncated -> (kept, n_dropped)."""
    kept = [ex for ex in examples if len(ex["input_ids"]) <= max_length]
    return kept, len(examples) - len(kept)


def pack_examples(examples: list[dict], max_length: int) -> list[dict]:
    """Greedy in-order packing into rows of <= max_length tokens (note c; opt-in, the paper never packs).

    position_ids restart at 0 for every example; with attention_mask=None transformers derives a
    block-diagonal causal mask from them, so examples never attend to each other. The first token
    of each example is never a target (it would be predicted from the previous example).
    """
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
    return rows + ([cur] if cur is not None else [])


def collate(examples: list[dict], pad_id: int) -> dict:
    """Right-pad a micro-batch to its longest row -> tensors of shape (B, T).

    Unpacked rows get a 0/1 attention_mask. Packed rows get position_ids instead (padding forms its
    own trailing segment with loss mask 0, so it never touches a real token).
    """
    # NOTE (a): pad to the micro-batch's longest row, not to --max-length as veRL does (same loss).
    B, T = len(examples), max(len(ex["input_ids"]) for ex in examples)
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
    return {"input_ids": input_ids, "loss_mask": loss_mask, ("position_ids" if packed else "attention_mask"): extra}


# -----------------------------------------------------------------------------
# Loss: masked cross-entropy on response tokens [PA fsdp_sft_trainer.py]

def masked_ce_sum(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Σ CE over already-selected target positions: logits (N, V), targets (N,) -> (fp32 sum, N)."""
    ce = F.cross_entropy(logits.float(), targets, reduction="sum")   # upcast: bf16 CE is lossy
    return ce, targets.numel()


def micro_batch_loss(ce_sum: torch.Tensor, n_tokens: int, n_micro: int, *, norm: str = "micro", n_tokens_global=None,
                     world_size: int = 1) -> torch.Tensor:
    """The quantity whose gradient is accumulated for one micro-batch.

    micro (default, the paper): per micro-batch Σ CE / (n_mask + 1e-8), averaged over the
        micro-batches of the global batch (veRL's `balance_dp_token=False`), so the step loss is the
        mean of per-micro-batch token means and a token's weight depends on how many targets share
        its micro-batch; DDP's gradient averaging over ranks keeps it a mean.
    token: every target token of the global batch weighs the same: Σ CE / n_tokens_global, times
        world_size because DDP averages (not sums) gradients over ranks.
    """
    if norm == "micro":
        return ce_sum / (n_tokens + MASK_EPS) / n_micro
    if norm == "token":
        return ce_sum * world_size / max(n_tokens_global, 1)
    raise ValueError(f"--loss-norm must be 'micro' or 'token', not {norm!r}")


def fast_loss_terms(model, batch: dict, *, fast: bool = True) -> tuple[torch.Tensor, int]:
    """(Σ CE over the trained targets, N): targets = input_ids[:, 1:] where loss_mask[:, 1:] is 1.

    fast: lm_head runs only on the N trained positions (prompt and padding logits are never formed:
    with V = 152k that is most of the activation memory). Valid for plain `hidden @ W_lm` heads
    (Qwen2, Llama; `supports_fast_loss`). fast=False is the plain reference: full logits, shifted,
    masked (the same value).
    """
    kw = dict(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
              position_ids=batch.get("position_ids"), use_cache=False)
    sel = batch["loss_mask"][:, 1:].bool()                             # (B, T-1): targets = ids[:, 1:]
    if fast:
        hidden = model.model(**kw).last_hidden_state                   # (B, T, D)
        logits = model.get_output_embeddings()(hidden[:, :-1][sel])    # (N, D) -> (N, V)
    else:
        logits = model(**kw).logits[:, :-1][sel]                       # (B, T, V) -> (N, V)
    return masked_ce_sum(logits, batch["input_ids"][:, 1:][sel])       # (N, V), (N,)


def reference_loss_terms(model, batch: dict) -> tuple[torch.Tensor, int]:
    """The plain reference of `fast_loss_terms`: full logits from model(...)."""
    return fast_loss_terms(model, batch, fast=False)


def supports_fast_loss(model) -> bool:
    """A plain `hidden @ W_lm` head: no logit soft-capping or scaling (Gemma, Cohere, Granite)."""
    cfg = model.config
    return (hasattr(model, "model") and model.get_output_embeddings() is not None
            and all(getattr(cfg, k, None) is None for k in ("final_logit_softcapping", "logit_scale", "logits_scaling")))


class CausalLMLoss(torch.nn.Module):
    """forward(**batch) -> (Σ masked CE, N). A module rather than a function only because DDP and
    FSDP2 must see the forward call to synchronise gradients / gather parameters."""

    def __init__(self, model, fast: bool = True):
        super().__init__()
        self.model, self.fast = model, fast

    def forward(self, **batch):
        """batch: collate's dict of (B, T) tensors -> (Σ CE, N) of its trained targets."""
        return fast_loss_terms(self.model, batch, fast=self.fast)


# -----------------------------------------------------------------------------
# Schedule and data order [PA fsdp_sft_trainer.py]

def warmup_steps_for(total_steps: int, warmup_ratio: float = 0.1) -> int:
    """warmup = int(0.1 · total)."""
    return int(warmup_ratio * total_steps)


def lr_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    """Multiplier of the base LR for the optimizer step taken after `step` completed steps.

    Linear warmup factor step/warmup, then ½(1 + cos πp), p = (step − warmup)/(total − warmup), min
    ratio 0. As in veRL/HF (LambdaLR stepped after the optimizer), the very first update uses
    factor 0 when warmup > 0. Skipped steps (non-finite grad norm) still advance the schedule.
    """
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    p = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * p)))


def global_batch_indices(n_examples: int, global_batch: int, step: int, seed: int) -> tuple[list[int], int]:
    """Example indices of optimizer step `step` (0-based) and its epoch.

    DistributedSampler semantics: a fresh permutation per epoch from (seed + epoch), drop_last, so
    steps/epoch = ⌊N / global_batch⌋ (= the release's ⌊⌊N/8⌋/32⌋ on 8 GPUs) and the data position
    is a function of `step` alone (which makes resuming exact). torch.randperm with a generator
    seeded (seed + epoch) is what DistributedSampler draws, and rank r taking perm[r::W] in per-rank
    batches of G/W puts the same SET of examples into step k as perm[kG:(k+1)G]; only their split
    into micro-batches differs (which matters only to the per-micro-batch mean).
    """
    epoch, k = divmod(step, n_examples // global_batch)
    perm = torch.randperm(n_examples, generator=torch.Generator().manual_seed(seed + epoch))  # (N,)
    return perm[k * global_batch:(k + 1) * global_batch].tolist(), epoch


# -----------------------------------------------------------------------------
# One optimizer step: accumulation over micro-batches, each split to a token budget (a speed-up
# with the same loss and gradient), then clip and AdamW.

def optimizer_step(loss_module, micro_batches: list[dict], optimizer, params: list, *, lr: float, max_grad_norm: float,
                   loss_norm: str = "micro", world_size: int = 1, autocast=contextlib.nullcontext, no_sync=None,
                   extra_loss=None, post_step=None, max_tokens: int = 0) -> dict:
    """Accumulate gradients over `micro_batches`, clip, and take one AdamW step.

    max_tokens > 0: a micro-batch over the token budget runs as row chunks (`split_by_tokens`); a
    chunk is normalised by its whole micro-batch's target count, so its gradient is its share of the
    micro-batch's. no_sync (DDP/FSDP2) defers the gradient all-reduce to the last backward.
    extra_loss (AdaLoRA's orthogonal regulariser) is averaged like the CE; post_step (AdaLoRA's rank
    allocation) reads the gradients after the step. A non-finite grad norm skips the step [PA
    fsdp_sft_trainer.py]. Returns {loss, grad_norm, skipped, n_targets}; loss is the global-batch
    loss (all ranks); a non-finite loss is the caller's to report.
    """
    for group in optimizer.param_groups:
        group["lr"] = lr
    n_micro = len(micro_batches)
    device = micro_batches[0]["input_ids"].device
    # --loss-norm token divides by the target count of the whole global batch (all ranks)
    n_global = sum(int(mb["loss_mask"][:, 1:].sum()) for mb in micro_batches)
    if world_size > 1 and loss_norm == "token":
        n_global = all_reduce_int(n_global, device)
    log_sum = torch.zeros((), dtype=torch.float64, device=device)   # the step's loss, for the log
    for i, mb in enumerate(micro_batches):
        n = int(mb["loss_mask"][:, 1:].sum())            # the whole micro-batch's targets
        parts = split_by_tokens(mb, max_tokens)
        for j, part in enumerate(parts):                 # each backward adds into .grad
            last = i == n_micro - 1 and j == len(parts) - 1
            with no_sync() if (no_sync is not None and not last) else contextlib.nullcontext():
                with autocast():
                    ce_sum, _ = loss_module(**part)
                loss = micro_batch_loss(ce_sum, n, n_micro, norm=loss_norm, n_tokens_global=n_global, world_size=world_size)
                if extra_loss is not None and j == 0:
                    loss = loss + extra_loss() / n_micro
                loss.backward()
                ce_sum = ce_sum.detach()
            log_sum += ce_sum / (n + MASK_EPS) / n_micro if loss_norm == "micro" else ce_sum / max(n_global, 1)
    if world_size > 1:   # the loss of every rank's share: a mean of means (micro), a sum (token)
        torch.distributed.all_reduce(log_sum)
        if loss_norm == "micro":
            log_sum /= world_size
    # clip the global L2 grad norm; the AdamW step unless it is non-finite; zero the grads
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else float("inf"))
    grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)  # FSDP2: DTensor
    skipped = not math.isfinite(grad_norm)
    if not skipped:
        optimizer.step()
        if post_step is not None:   # AdaLoRA's rank allocation reads the gradients: before zero_grad
            post_step()
    optimizer.zero_grad(set_to_none=True)
    return {"loss": float(log_sum), "grad_norm": grad_norm, "skipped": skipped, "n_targets": n_global}


def split_by_tokens(mb: dict, max_tokens: int) -> list[dict]:
    """Row chunks of a collated micro-batch whose padded size (rows × longest row) <= max_tokens.

    [PA train/train_rl.sh: the release's RL recipe bounds each forward to 16384 tokens per GPU] A chunk keeps
    its rows in order and is re-trimmed to its own longest row (right padding, so trimming drops only
    padding); packed rows (position_ids) keep their width. A row longer than the budget on its own
    gets a chunk of its own. max_tokens <= 0, or a micro-batch that fits: [mb] unchanged.
    """
    B, T = mb["input_ids"].shape
    if max_tokens <= 0 or B * T <= max_tokens:
        return [mb]
    widths = [int(w) for w in mb["attention_mask"].sum(1)] if "attention_mask" in mb else [T] * B
    chunks, cur, w = [], [], 0
    for i in range(B):
        if cur and (len(cur) + 1) * max(w, widths[i]) > max_tokens:
            chunks.append((cur, w))
            cur, w = [], 0
        cur, w = cur + [i], max(w, widths[i])
    chunks.append((cur, w))
    return [{k: v[rows, :width] for k, v in mb.items()} for rows, width in chunks]


# -----------------------------------------------------------------------------
# SFT rows (loading.read_records: JSONL / JSON / Parquet; or a hub file) -> (prompt, response) pairs

def row_to_pair(row: dict, where: str, keys: tuple | None = None) -> tuple:
    """A row (a dict: loading.read_records checks that) -> (prompt, response); prompt is a string or a
    list of chat messages.

    Layouts: the release parquet {extra_info: {question, answer}} [PA train/train_sft.sh: prompt_key
    extra_info]; {prompt, response}; chat {messages: [..., {role: assistant, content}]} (note b);
    any other with keys = (prompt_key, response_key) (dotted = nested), e.g. MetaMathQA's ("query",
    "response").
    """
    if keys is not None:   # --prompt-key / --response-key: each a non-empty string or message list
        got = [loading.get_key(row, key) for key in keys]
        for v, key, flag in zip(got, keys, ("--prompt-key", "--response-key")):
            if not (isinstance(v, list) and v) and not (isinstance(v, str) and v.strip()):
                raise loading.DataError(f"{where}: {flag} {key!r} is {'empty' if v is not None else 'missing'} "
                                        f"(row keys: {sorted(row)}); pass --skip-bad-rows to skip such rows")
        return got[0], got[1]
    extra, msgs = row.get("extra_info"), row.get("messages")
    if isinstance(extra, dict) and "question" in extra:
        prompt, response = extra["question"], extra.get("answer")
    elif "messages" in row:
        if not (isinstance(msgs, list) and len(msgs) >= 2 and all(isinstance(m, dict) and "role" in m
                                                                   and "content" in m for m in msgs)
                and msgs[-1]["role"] == "assistant"):
            raise ValueError(f"{where}: 'messages' must be a list of {{role, content}} dicts whose last one, "
                             "the assistant's response, follows at least one prompt message")
        prompt, response = msgs[:-1], msgs[-1]["content"]   # NOTE (b): only the last turn is trained
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
    """Download one file of a hub dataset (the local cache first, then one quick probe of the hub)."""
    if not filename:
        raise ValueError(f"--data {repo_id} looks like a hub dataset id: also pass --hub-file, the file "
                         "inside it (e.g. --hub-file openr1-50k/train.parquet)")
    with contextlib.suppress(Exception):   # cached: no network, no retries
        return Path(hf_hub_download(repo_id, filename, repo_type="dataset", local_files_only=True))
    try:
        loading.probe_hub(repo_id, filename, repo_type="dataset", what="dataset")
        return Path(hf_hub_download(repo_id, filename, repo_type="dataset"))
    except Exception as e:  # noqa: BLE001 - re-raised with the fix
        raise RuntimeError(f"--data {repo_id}: could not fetch {filename!r} from the Hugging Face hub "
                           f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). Without "
                           "network, download the file elsewhere and pass --data /path/to/file") from None


def load_pairs(cfg: dict) -> tuple[list[tuple], dict]:
    """The configured SFT set -> ([(prompt, response)], stats); files keep the first --n-train rows."""
    if cfg["task"]:
        rows = toy_world.make_sft_rows(TOY_TASKS[cfg["task"]], cfg["n_train"], seed=cfg["data_seed"])
        rows, bad = [(r, f"{cfg['task']} row {i}") for i, r in enumerate(rows)], 0
    else:
        path = Path(cfg["data"])
        looks_hub = (not path.exists() and re.fullmatch(r"[\w.-]+/[\w.-]+", cfg["data"]) is not None
                     and path.suffix not in (".jsonl", ".json", ".parquet"))
        rows, bad = loading.read_records(fetch_hub_file(cfg["data"], cfg["hub_file"]) if looks_hub else path,
                                         skip_bad_rows=cfg["skip_bad_rows"])
    pk, rk = cfg.get("prompt_key"), cfg.get("response_key")   # either one given: the other defaults
    keys = None if pk is None and rk is None else (pk or "prompt", rk or "response")
    pairs = []
    for row, where in rows:
        try:
            pairs.append(row_to_pair(row, where, keys))
        except ValueError:
            if not cfg["skip_bad_rows"]:
                raise
            bad += 1
    pairs = pairs[:cfg["n_train"]] if cfg["n_train"] > 0 else pairs
    if not pairs:
        raise loading.DataError(f"no usable rows in {cfg['data'] or cfg['task']} ({bad} bad rows skipped)")
    return pairs, {"n_rows": len(pairs), "n_bad_rows": bad}


def prepare_examples(cfg: dict, tokenizer, pairs: list[tuple], stats: dict, world_size: int) -> list[dict]:
    """Pairs -> encoded examples, over-long ones dropped, optionally packed; the step plan
    (steps/epoch = ⌊N / global batch⌋, total steps, warmup steps) and counts are added to stats."""
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
    total_steps = cfg["epochs"] * (n_ex // G)
    total_steps = min(total_steps, cfg["max_steps"]) if cfg["max_steps"] > 0 else total_steps
    # a cheap hash of the encoded set (lengths, masks, token sums): --resume refuses changed data
    h = hashlib.sha1()
    for ex in examples:
        h.update(f"{len(ex['input_ids'])},{sum(ex['input_ids'])},{sum(ex['loss_mask'])};".encode())
    stats.update(n_examples_encoded=len(lengths), n_dropped_too_long=n_dropped, n_train_rows=n_ex,
                 steps_per_epoch=n_ex // G, total_steps=total_steps,
                 warmup_steps=warmup_steps_for(total_steps, cfg["warmup_ratio"]),
                 world_size=world_size, data_fingerprint=h.hexdigest())
    return examples


def step_micro_batches(examples: list[dict], step: int, cfg: dict, run, pad_id: int) -> tuple[list[dict], int]:
    """This rank's micro-batches of optimizer step `step` (collated, on its device) and the epoch.

    Of the step's G = --global-batch example indices, rank r of W takes the slice [r·G/W, (r+1)·G/W)
    and cuts it into micro-batches of --micro-batch rows, each a dict of (B, T) tensors.
    """
    per_rank = cfg["global_batch"] // run.world_size
    idx, epoch = global_batch_indices(len(examples), cfg["global_batch"], step, cfg["seed"])
    mine = idx[run.rank * per_rank:(run.rank + 1) * per_rank]
    mbs = [collate([examples[i] for i in mine[j:j + cfg["micro_batch"]]], pad_id)
           for j in range(0, per_rank, cfg["micro_batch"])]
    return [{k: v.to(run.device) for k, v in mb.items()} for mb in mbs], epoch


# -----------------------------------------------------------------------------
# The training routine: set-up, then the loop (the numbered steps of the module docstring)

def train(config=None, *, model=None, tokenizer=None, hooks: dict | None = None) -> dict | None:
    """Run (or resume) one SFT run and return its summary dict (also written to <out>/summary.json;
    None on ranks other than 0).

    config: argv list, argparse.Namespace or dict of flag names (dashes -> underscores).
    model, tokenizer: an already loaded base model (not yet wrapped) to train instead of loading
        cfg["model"] (cfg["model"] is still recorded, and used to reload on --resume).
    hooks: optional {"after_setup": f(model)} (after wrapping, before the first step) and
        {"after_step": f(step, metrics_row)} (after each optimizer step and its checkpoint, if any).
    """
    hooks = hooks or {}
    cfg = resolve_config(config)
    if cfg["dry_run"]:
        return dry_run(cfg)
    run = start_run(cfg)                        # ranks, device, --out, the checkpoint to resume from
    pairs, stats = load_pairs(cfg)              # data errors come in seconds, before the model
    model, tokenizer = load_base_model(cfg, run, model, tokenizer)
    examples = prepare_examples(cfg, tokenizer, pairs, stats, run.world_size)
    total_steps, warmup_steps, steps_per_epoch = stats["total_steps"], stats["warmup_steps"], stats["steps_per_epoch"]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batches_for = lambda step: step_micro_batches(examples, step, cfg, run, pad_id)  # noqa: E731
    hp = attach_method(model, cfg, run, total_steps, batches_for)
    n_trainable = peft_methods.count_trainable(model)
    if "after_setup" in hooks:
        hooks["after_setup"](model)
    opt = build_optimizer(model, cfg, run)      # loss module (DDP/FSDP2), AdamW, autocast, AdaLoRA hooks
    state = restore_state(run, model, opt, stats["data_fingerprint"], total_steps)   # {} unless --resume
    start = state.get("step", 0)
    cfg_out = dict(cfg, derived=dict(stats, n_trainable=n_trainable, method_hparams=hp))
    if run.is_main:
        write_run_config(run.out, cfg_out, start)
    save_every = steps_per_epoch if cfg["save_every_steps"] < 0 else cfg["save_every_steps"]
    totals = {k: state.get(k, v) for k, v in (("tokens_seen", 0), ("n_skipped_steps", 0), ("train_time_s", 0.0),
                                              ("first_loss", None), ("last_loss", None))}
    last_ckpt = run.resume_from
    metrics = open(run.out / "metrics.jsonl", "a", encoding="utf-8") if run.is_main else contextlib.nullcontext()
    with metrics as log, tqdm(total=total_steps, initial=start, desc=f"sft {cfg['method']}",
                              disable=not run.is_main or cfg["no_progress"], dynamic_ncols=True) as bar:
        for step in range(start, total_steps):
            t0 = time.perf_counter()
            # 1. the step's global batch (a fresh permutation per epoch), this rank's micro-batches
            mbs, epoch = batches_for(step)
            # 2. the LR: linear warmup, then cosine to 0
            lr = cfg["lr"] * lr_factor(step, total_steps, warmup_steps)
            # 3. masked CE on the response tokens, backward, accumulated over the micro-batches;
            #    clip the grad norm; the AdamW step (skipped on a non-finite norm)
            res = optimizer_step(
                opt.runner, mbs, opt.optimizer, opt.params, lr=lr, max_grad_norm=cfg["max_grad_norm"],
                loss_norm=cfg["loss_norm"], world_size=run.world_size, autocast=opt.autocast,
                no_sync=opt.no_sync, extra_loss=(lambda: opt.ada_reg(model)) if opt.ada_reg else None,
                post_step=(lambda: opt.ada_alloc(model, step, total_steps)) if opt.ada_alloc else None,
                max_tokens=cfg["micro_batch_tokens"])
            if not math.isfinite(res["loss"]):
                raise FloatingPointError(
                    f"non-finite training loss ({res['loss']}) at optimizer step {step + 1} (epoch {epoch}); "
                    f"stopped without saving. Last good checkpoint: {last_ckpt or 'none yet'}. Lower --lr, "
                    "check the data, then continue with --resume (or start again with --overwrite)")
            # 4. one metrics row: loss, LR, grad norm, tokens/s, peak memory
            row = record_step(totals, res, mbs, step=step, epoch=epoch, lr=lr, t0=t0, pad_id=pad_id, run=run)
            if run.is_main:
                log.write(json.dumps(row) + "\n")
                log.flush()
                bar.set_postfix(loss=f"{res['loss']:.4f}", tok_s=f"{row['tokens_per_s']:.0f}", lr=f"{lr:.2e}")
                bar.update(1)
            # 5. a checkpoint every --save-every-steps steps and at the end
            done = step + 1
            if (save_every > 0 and done % save_every == 0) or done == total_steps:
                last_ckpt = save_checkpoint(run.out, done, model, opt.optimizer,
                                            trainer_state(done, totals, stats, cfg), cfg_out, rank=run.rank,
                                            world_size=run.world_size, fsdp=opt.fsdp, base_spec=cfg["model"])
            if "after_step" in hooks:   # after the step's checkpoint (if any) is on disk
                hooks["after_step"](done, row)
    return write_summary(run, cfg, totals, stats, n_trainable)


def start_run(cfg: dict) -> SimpleNamespace:
    """Processes (torchrun or one), the run directory (refused if occupied, unless --resume or
    --overwrite: loading.prepare_run_dir) and the global seed -> the run: rank, world_size,
    device, out, resume_from (the checkpoint --resume continues from, None: a fresh start)."""
    rank, world_size, device = init_distributed(cfg)
    if cfg["global_batch"] % (cfg["micro_batch"] * world_size):
        raise ValueError(f"--global-batch {cfg['global_batch']} must be a multiple of --micro-batch "
                         f"{cfg['micro_batch']} × world size {world_size}")
    out = Path(cfg["out"])
    resume_from = loading.prepare_run_dir(out, cfg, script="train_sft", free_keys=RESUME_FREE_KEYS,
                                          owned_files=OWNED_FILES, new_keys_only=True, is_main=rank == 0)
    _barrier(world_size)
    out.mkdir(parents=True, exist_ok=True)
    loading.set_seed(cfg["seed"])
    return SimpleNamespace(rank=rank, world_size=world_size, device=device, out=out, resume_from=resume_from,
                           is_main=rank == 0)


def load_base_model(cfg: dict, run, model=None, tokenizer=None):
    """The base model and tokenizer on run.device (loaded from cfg["model"] unless given)."""
    # DEVIATION (2): fp32 trainable masters unless --param-dtype bf16. auto: the frozen base loads in
    # bf16 on CUDA (its adapters are made fp32 in attach_method); Full FT and CPU runs load fp32.
    fp32 = cfg["param_dtype"] != "bf16" and (cfg["param_dtype"] == "fp32" or cfg["method"] == "full"
                                            or run.device.type != "cuda")
    if model is None:
        model, tokenizer = loading.load_model(cfg["model"], dtype=torch.float32 if fp32 else torch.bfloat16,
                                              device=run.device, trust_remote_code=cfg["trust_remote_code"])
    elif tokenizer is None:
        raise ValueError("train(model=...) also needs tokenizer=...")
    model.to(run.device)
    if run.is_main:
        print(f"[train_sft] device {run.device} (world size {run.world_size}); base dtype "
              f"{next(model.parameters()).dtype}; autocast bf16: {run.device.type == 'cuda'}")
    return model, tokenizer


def attach_method(model, cfg: dict, run, total_steps: int, batches_for) -> dict:
    """Wrap the base with cfg's method: fresh, or re-applied and loaded from the checkpoint on
    --resume. Returns the method's hyperparameters (make_config kwargs)."""
    targets = tuple(cfg["target_modules"].split(",")) if cfg["target_modules"] else peft_methods.DEFAULT_TARGETS
    hp = peft_methods.hparams_from_flags(cfg["method"], cfg, cfg["hp"], total_steps)
    if run.resume_from is not None:
        peft_methods.load_adapter(model, run.resume_from)
    else:
        init_batch = None
        if cfg["method"] == "keeplora":   # seed gradient from the first micro-batch [PA keeplora.py]
            mb = batches_for(0)[0][0]
            # labels = input_ids on trained tokens (HF shifts them inside model(labels=...)), so the
            # seed loss is this file's masked token-mean CE; loss_mask itself is not a model kwarg.
            init_batch = {k: v for k, v in mb.items() if k != "loss_mask"}
            init_batch["labels"] = torch.where(mb["loss_mask"].bool(), mb["input_ids"], -100)
        peft_methods.apply_peft(model, cfg["method"], peft_methods.make_config(cfg["method"], **hp),
                                target_modules=targets, init_batch=init_batch,
                                adapter_dtype=torch.bfloat16 if cfg["param_dtype"] == "bf16" else torch.float32)
    model.to(run.device)
    if cfg["grad_checkpointing"]:   # speed-up (memory): same gradients, test-checked
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model.train()
    if run.world_size > 1:   # weights are built from `seed` on every rank; dropout streams per rank
        loading.set_rank_seed(cfg["seed"], run.rank)
    return hp


def build_optimizer(model, cfg: dict, run) -> SimpleNamespace:
    """The loss module (wrapped in DDP or FSDP2 under torchrun), AdamW over the trainable tensors
    (one group, weight decay on every one, adapters included, as the release), the autocast
    context, and AdaLoRA's hooks (None unless used)."""
    # DEVIATION (4): AdaLoRA's regulariser and rank allocation are called (the release never does).
    ada = cfg["method"] == "adalora" and not cfg["adalora_release"]
    full = cfg["method"] == "full"
    loss_module = CausalLMLoss(model, fast=supports_fast_loss(model))
    use_fsdp = cfg["fsdp"] == "on" or (cfg["fsdp"] == "auto" and full and run.device.type == "cuda")
    if use_fsdp and not full and run.world_size > 1:   # NOTE (f): PEFT methods use DDP
        raise ValueError("--fsdp on is for --method full (PEFT methods use DDP: the frozen base is replicated)")
    runner, no_sync, fsdp = wrap_parallel(model, loss_module, use_fsdp, run.world_size, run.device)
    groups = [{"params": [p for p in loss_module.parameters() if p.requires_grad], "weight_decay": cfg["weight_decay"]}]
    optimizer = torch.optim.AdamW(groups, lr=cfg["lr"], betas=tuple(cfg["adam_betas"]), eps=1e-8)
    autocast = ((lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if run.device.type == "cuda" and not fsdp
                else contextlib.nullcontext)
    return SimpleNamespace(runner=runner, no_sync=no_sync, fsdp=fsdp, optimizer=optimizer, autocast=autocast,
                           params=[p for p in loss_module.parameters() if p.requires_grad],
                           ada_reg=peft_methods.adalora_regularizer if ada else None,
                           ada_alloc=peft_methods.adalora_update_and_allocate if ada else None)


def record_step(totals: dict, res: dict, mbs: list[dict], *, step: int, epoch: int, lr: float, t0: float,
                pad_id: int, run) -> dict:
    """Add one step to the run's totals (they go into trainer_state.json) -> its metrics.jsonl row.

    tokens counts real tokens (no padding) of the whole global batch, all ranks; the step's time runs
    from its batch assembly to its finished update (CUDA synchronised), so tokens/s is end to end.
    """
    n_tok = sum(int(mb["attention_mask"].sum()) if "attention_mask" in mb else   # real tokens, no padding
                int((mb["input_ids"] != pad_id).sum()) for mb in mbs)
    if run.world_size > 1:
        n_tok = all_reduce_int(n_tok, run.device)
    if run.device.type == "cuda":   # the step's queued GPU work counts to the step's time
        torch.cuda.synchronize(run.device)
    dt = time.perf_counter() - t0
    totals["train_time_s"] += dt
    totals["tokens_seen"] += n_tok
    totals["n_skipped_steps"] += res["skipped"]
    totals["first_loss"] = res["loss"] if totals["first_loss"] is None else totals["first_loss"]
    totals["last_loss"] = res["loss"]
    return {"step": step + 1, "epoch": epoch, "loss": res["loss"], "lr": lr, "grad_norm": res["grad_norm"],
            "skipped": res["skipped"], "tokens": n_tok, "tokens_per_s": n_tok / dt,
            "peak_mem_gib": peak_memory_gib(run.device)}


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory of this process so far, GiB: CUDA's allocator peak, or the CPU peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    # NOTE (e): CPU has no allocator statistics; report the peak RSS (KiB on Linux).
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def write_run_config(out: Path, cfg_out: dict, start_step: int) -> None:
    """config.json (loading.write_run_config: the resolved config + environment) and metrics.jsonl
    cut to the steps the resumed checkpoint holds (the steps after it are trained and logged again)."""
    path = out / "metrics.jsonl"
    if path.exists():
        keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= start_step]
        loading.atomic_write_text(path, "".join(ln + "\n" for ln in keep))
    loading.write_run_config(out, cfg_out)
    print(f"[train_sft] config: {json.dumps(cfg_out, default=str)}")


def write_summary(run, cfg: dict, totals: dict, stats: dict, n_trainable: int) -> dict | None:
    """summary.json in loading.write_summary's schema (train_last = the last step's loss), plus the
    run's totals and data counts; written by rank 0 (other ranks return None).

    arena.py reads steps, n_trainable / trainable_params and last_loss; scripts/gpu_check.py reads
    first_loss; tests read n_rows, n_bad_rows, n_train_rows, resumed_from and world_size.
    """
    if not run.is_main:
        return None
    t = totals["train_time_s"]
    summary = loading.write_summary(
        run.out, script="train_sft.py", cfg=cfg, steps=stats["total_steps"], trainable_params=n_trainable,
        final_checkpoint=loading.latest_checkpoint(run.out), train_seconds=t, train_last=totals["last_loss"],
        train_last_name="loss", n_trainable=n_trainable, **totals, tokens_per_s=totals["tokens_seen"] / t if t else None,
        peak_mem_gib=peak_memory_gib(run.device), resumed_from=str(run.resume_from) if run.resume_from else None,
        **stats)
    print(f"[train_sft] done: {json.dumps(summary, default=str)}")
    return summary


# -----------------------------------------------------------------------------
# Multi-GPU (torchrun): DDP, or FSDP2 for Full FT. Single GPU and CPU need no launcher.

def init_distributed(cfg: dict) -> tuple[int, int, torch.device]:
    """-> (rank, world_size, device). Under torchrun with WORLD_SIZE > 1: NCCL on CUDA, gloo on CPU."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return 0, 1, loading.pick_device(cfg["device"])
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return torch.distributed.get_rank(), world_size, torch.device("cuda", local_rank)
    return torch.distributed.get_rank(), world_size, torch.device("cpu")


def wrap_parallel(model, loss_module, fsdp: bool, world_size: int, device: torch.device):
    """DDP, or FSDP2 fully_shard (per decoder layer, then the root) for Full FT of big models.

    Returns (module to call, no_sync context factory or None, is_fsdp).
    """
    if world_size == 1:
        return loss_module, None, False
    if fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        # [PA fsdp_sft_trainer.py] FSDP2 with bf16 compute and fp32 gradient reduction (CPU: fp32).
        mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if device.type == "cuda" else MixedPrecisionPolicy())
        for layer in model.model.layers:
            fully_shard(layer, mp_policy=mp)
        fully_shard(loss_module, mp_policy=mp)   # root: embeddings, final norm, lm_head

        @contextlib.contextmanager
        def no_sync():   # accumulate without reduce-scatter until the last micro-batch
            loss_module.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                loss_module.set_requires_gradient_sync(True)
        return loss_module, no_sync, True
    ddp = torch.nn.parallel.DistributedDataParallel(
        loss_module, device_ids=[device.index] if device.type == "cuda" else None)
    return ddp, ddp.no_sync, False


def all_reduce_int(n: int, device) -> int:
    """Σ of an int over the ranks."""
    t = torch.tensor([n], device=device)
    torch.distributed.all_reduce(t)
    return int(t.item())


def _barrier(world_size: int) -> None:
    """Wait for every rank (no-op in a single process)."""
    if world_size > 1:
        torch.distributed.barrier()


def dry_run(cfg: dict) -> dict:
    """--dry-run: print the per-GPU peak memory of one step at cfg's settings on `--gpus` CUDA GPUs;
    returns memory.estimate's dict. Nothing real is built: the model lives on fake tensors."""
    import memory   # here, not at the top: memory.py imports this file (an import cycle)
    hf_config = memory.hf_config_for(cfg["model"])
    plan = memory.sft_plan(cfg, gpus=cfg["gpus"] or int(os.environ.get("WORLD_SIZE", "1")), cuda=True)
    print(memory.report(hf_config, plan, spec=cfg["model"], gpu_memory_gib=cfg["gpu_memory_gib"], tool="train_sft"))
    return memory.estimate(hf_config, plan)


# -----------------------------------------------------------------------------
# Checkpoints, in loading.py's run-directory layout (trainer_state.json, written last, marks one
# complete); train_grpo.py keeps the same layout.

def trainer_state(done: int, totals: dict, stats: dict, cfg: dict) -> dict:
    """trainer_state.json of the checkpoint after `done` steps (written last: marks it complete).

    The data position (epoch, batch in epoch) is a function of `done` alone (global_batch_indices);
    the totals continue the run's counters; the fingerprint lets --resume refuse changed data.
    """
    steps_per_epoch, total_steps, warmup = stats["steps_per_epoch"], stats["total_steps"], stats["warmup_steps"]
    return {"step": done, "epoch": done // steps_per_epoch, "batch_in_epoch": done % steps_per_epoch,
            "examples_seen": done * cfg["global_batch"], **totals,
            "data_fingerprint": stats["data_fingerprint"], "data_seed": cfg["seed"],
            "scheduler": {"base_lr": cfg["lr"], "warmup_steps": warmup, "total_steps": total_steps,
                          "next_lr_factor": lr_factor(done, total_steps, warmup)},
            "files": {"optimizer": "optimizer.pt (AdamW state_dict)", "rng": "trainer_state.pt"}}


def rng_state() -> dict:
    """Every random stream a step draws from (dropout masks, AdaLoRA, sampling), for an exact --resume."""
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    """Put back the streams `rng_state` saved (CUDA's only where this process has CUDA)."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(out: Path, step: int, model, optimizer, state: dict, cfg: dict, *, rank: int,
                    world_size: int, fsdp: bool, base_spec: str) -> Path:
    """Write global_step_<step>/ into a temp dir, then rename it into place (atomic per checkpoint).

    Files: the method's tensors (peft_methods.save_adapter; Full FT: every weight + tokenizer files),
    optimizer.pt (AdamW's state; under FSDP2 one optimizer.rank<r>.pt of shards per rank),
    trainer_state.pt (RNG streams, AdaLoRA's EMAs), config.json, and trainer_state.json, written
    last (loading.CKPT_COMPLETE: the marker loading.list_checkpoints looks for).
    """
    final, tmp = out / f"{CKPT_PREFIX}{step}", out / f".tmp-{CKPT_PREFIX}{step}"
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
        # AdaLoRA's sensitivity EMAs (`_ipt`) live outside the adapter tensors: kept for an exact resume
        aux = {n: l._ipt for n, l in peft_methods.adapter_layers(model).items() if getattr(l, "_ipt", None)}
        torch.save({"rng": rng_state(), "adapter_aux": aux}, tmp / "trainer_state.pt")
        loading.atomic_write_json(tmp / "config.json", cfg)
        loading.atomic_write_json(tmp / loading.CKPT_COMPLETE, state)   # written last: marks completeness
    _barrier(world_size)
    if rank == 0:
        loading.atomic_replace_dir(tmp, final)
        if cfg["keep_optimizer"] == "last":   # NOTE (d): older checkpoints keep weights only
            for f in [f for k, d in loading.list_checkpoints(out) if k < step for f in d.glob("optimizer*.pt")]:
                f.unlink()
    _barrier(world_size)
    return final


def restore_state(run, model, opt: SimpleNamespace, fingerprint: str, total_steps: int) -> dict:
    """--resume: trainer_state.json of run.resume_from, with AdamW's state, the RNG streams and
    AdaLoRA's allocation state restored in place, so the run continues bit for bit. {} if fresh."""
    ckpt = run.resume_from
    if ckpt is None:
        return {}
    state = json.loads((ckpt / loading.CKPT_COMPLETE).read_text())
    if state["data_fingerprint"] != fingerprint:
        raise ValueError(f"--resume: the encoded data differs from the run in {run.out} (fingerprint "
                         f"{fingerprint[:12]} vs {state['data_fingerprint'][:12]})")
    opt_file = ckpt / (f"optimizer.rank{run.rank}.pt" if opt.fsdp else "optimizer.pt")
    opt.optimizer.load_state_dict(torch.load(opt_file, map_location=run.device, weights_only=False))
    extra = torch.load(ckpt / "trainer_state.pt", map_location=run.device, weights_only=False)
    own = ckpt / f"rng.rank{run.rank}.pt"   # each rank's own streams (seed + rank)
    set_rng_state(torch.load(own, weights_only=False) if (run.world_size > 1 and own.exists()) else extra["rng"])
    layers = peft_methods.adapter_layers(model)
    for name, aux in extra.get("adapter_aux", {}).items():
        layers[name]._ipt = aux
    if run.is_main:
        print(f"[train_sft] resuming from {ckpt} (step {state['step']}/{total_steps})")
    return state


# -----------------------------------------------------------------------------
# Configuration: one table of flags (argparse; `train` also takes a dict)

_B, _I, _F = {"action": "store_true"}, {"type": int}, {"type": float}   # kwargs shorthands of the flag table
FLAGS = {   # group -> [(flag, argparse kwargs, help)]; no default given: None
    "model and method": [
        ("--model", {"default": "toy"}, "'toy' (the committed toy base), a local HF model dir, or a hub id"),
        ("--method", {"default": "lora"}, "peft_methods.METHODS name; 'full' = full finetuning"),
        ("--r", _I, "rank r (LoRA family, AdaLoRA, MiSS, VeRA); None = method default"),
        ("--alpha", _F, "LoRA scale numerator α (scale α/r); None = method default"),
        ("--block-size", _I, "OFT block size b (rows of each rotation block)"),
        ("--dropout", _F, "adapter dropout probability; None = method default"),
        ("--hp", {"action": "append", "default": [], "metavar": "KEY=VALUE"}, "other make_config field (JSON); repeatable"),
        ("--target-modules", {}, "comma-separated module names; None = peft_methods.DEFAULT_TARGETS"),
        ("--adalora-release", _B, "as the release: no AdaLoRA rank allocation / regulariser"),
        ("--param-dtype", {"choices": ["auto", "fp32", "bf16"], "default": "auto"}, "auto: fp32 trainable tensors, "
         "frozen base bf16 on CUDA; bf16: all bf16 (the release)"),
        ("--trust-remote-code", _B, "allow model code from the hub")],
    "data": [
        ("--task", {"choices": sorted(TOY_TASKS)}, "toy-world SFT set (toy_world.make_sft_rows)"),
        ("--data", {}, "JSONL/JSON/Parquet file, or a hub dataset id (with --hub-file)"),
        ("--hub-file", {}, "file inside the hub dataset, e.g. openr1-50k/train.parquet"),
        ("--prompt-key", {}, "row key of the prompt (string or chat messages) for other layouts; dotted = "
         "nested (MetaMathQA: --prompt-key query --response-key response)"),
        ("--response-key", {}, "row key of the response (see --prompt-key)"),
        ("--n-train", {**_I, "default": -1}, "rows: toy sets make n (-1 = 2000); files keep the first n (-1 = all)"),
        ("--data-seed", {**_I, "default": 0}, "seed of the toy-world rows"),
        ("--max-length", {**_I, "default": 8192}, "tokens (prompt + response); longer pairs are dropped"),
        ("--loss-mask", {"choices": ["correct", "release"], "default": "correct"},
         "correct: response incl. EOS; release: veRL's (last prompt token, no EOS)"),
        ("--pack", _B, "pack examples into rows of --max-length tokens (not in the paper)"),
        ("--skip-bad-rows", _B, "skip and count malformed rows instead of failing")],
    "optimisation": [
        ("--lr", _F, f"peak LR; None: {PEFT_DEFAULT_LR} PEFT, {FULL_FT_DEFAULT_LR} full"),
        ("--weight-decay", {**_F, "default": 0.01}, "AdamW decoupled weight decay (every trainable tensor)"),
        ("--adam-betas", {**_F, "nargs": 2, "default": [0.9, 0.95]}, "AdamW β1 β2"),
        ("--max-grad-norm", {**_F, "default": 1.0}, "clip the global L2 grad norm (<= 0: no clip)"),
        ("--warmup-ratio", {**_F, "default": 0.1}, "fraction of optimizer steps of linear warmup"),
        ("--epochs", {**_I, "default": 4}, "passes over the data"),
        ("--max-steps", {**_I, "default": -1}, "optimizer steps (-1 = epochs × steps/epoch); the schedule's length"),
        ("--global-batch", {**_I, "default": 256}, "sequences per optimizer step, all ranks together"),
        ("--micro-batch", {**_I, "default": 2}, "sequences per forward pass per rank"),
        ("--micro-batch-tokens", {**_I, "default": 16384}, "tokens per forward: a bigger micro-batch (rows × "
         "longest row) runs in row chunks, same loss and gradient (release RL: 16k per GPU); 0 = off"),
        ("--loss-norm", {"choices": ["micro", "token"], "default": "micro"},
         "micro: mean of per-micro-batch token means (paper); token: one token mean")],
    "runtime": [
        ("--device", {}, "cpu / cuda / cuda:1; None = cuda if available (torchrun: LOCAL_RANK)"),
        ("--seed", {**_I, "default": 0}, "seed of adapter init, dropout and data order (paper sampler seed 0)"),
        ("--grad-checkpointing", {"action": argparse.BooleanOptionalAction}, "non-reentrant; None: on for real "
         "models, off for the toy"),
        ("--fsdp", {"choices": ["auto", "on", "off"], "default": "auto"},
         "under torchrun: FSDP2 fully_shard instead of DDP; auto = on for --method full on CUDA")],
    "checkpoints and output": [
        ("--out", {}, "run directory (required unless --smoke)"),
        ("--save-every-steps", {**_I, "default": -1}, "steps between checkpoints (-1 = an epoch, 0 = only the end)"),
        ("--keep-optimizer", {"choices": ["last", "all"], "default": "last"}, "which checkpoints keep optimizer.pt"),
        ("--resume", _B, "continue the run in --out from its latest checkpoint"),
        ("--overwrite", _B, "delete a previous run in --out and start again"),
        ("--no-progress", _B, "no tqdm bar"),
        ("--smoke", _B, "tiny run (<= 4 steps, 32 rows) to check the plumbing on CPU")],
    "memory plan (--dry-run: nothing is built, no data or weights are read)": [
        ("--dry-run", _B, "print the per-GPU peak memory of one training step (memory.py: the model on fake "
         "tensors) and exit; --model may be a configs/model_shapes name or .json"),
        ("--gpus", _I, "GPUs of the planned run; default: $WORLD_SIZE or 1 (--dry-run only)"),
        ("--gpu-memory-gib", {**_F, "default": 80.0}, "GiB per GPU for the --dry-run verdict (H100 80, H200 141)")],
}


def build_parser() -> argparse.ArgumentParser:
    """The CLI from FLAGS, one argument group per table section (arena.py reads its dests)."""
    p = argparse.ArgumentParser(description="SFT with any PEFT method (the PEFT-Arena SFT protocol).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for title, flags in FLAGS.items():
        group = p.add_argument_group(title)
        for flag, kw, help_ in flags:
            group.add_argument(flag, help=help_, **kw)
    return p


def resolve_config(config=None) -> dict:
    """argv list / Namespace / dict / None -> the resolved config dict (defaults filled, checked).

    A dict may hold any subset of the flags' dests (the rest take their defaults); an unknown key is
    an error. "derived" (what a run adds to its config.json) is ignored, so a stored config resolves.
    """
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
    _fill_defaults(cfg)
    check_config(cfg)
    return cfg


def _fill_defaults(cfg: dict) -> None:
    """--smoke's tiny run, the toy set size, the LR by method, gradient checkpointing by model."""
    if cfg["smoke"]:
        cfg.update(max_steps=min(cfg["max_steps"], 4) if cfg["max_steps"] > 0 else 4, n_train=32,
                   global_batch=4, micro_batch=2, max_length=min(cfg["max_length"], 512), save_every_steps=2)
        cfg["task"] = cfg["task"] or (None if cfg["data"] else "toy-math")
        cfg["out"] = cfg["out"] or f"runs/smoke-sft-{cfg['method']}"
    if cfg["task"] and cfg["n_train"] <= 0:
        cfg["n_train"] = 2000
    if cfg["lr"] is None:
        cfg["lr"] = FULL_FT_DEFAULT_LR if cfg["method"] == "full" else PEFT_DEFAULT_LR
    if cfg["grad_checkpointing"] is None:
        # [PA fsdp_sft_trainer.py] on for real models (LoRA at 8192 tokens on a 7B model does not
        # fit one GPU without it); off for the toy (tiny activations; the demo stays as it was)
        cfg["grad_checkpointing"] = cfg["model"] != "toy"
    cfg["adam_betas"] = list(cfg["adam_betas"])


def check_config(cfg: dict) -> None:
    """Each bad setting raises loading.ConfigError naming its key (arena.py points at it)."""
    dry = cfg["dry_run"]   # a memory plan needs neither a run directory nor data
    checks = [   # (holds, config key at fault, message)
        (cfg["method"] in peft_methods.METHODS, "method", f"--method {cfg['method']!r} is not one of "
         f"{sorted(peft_methods.METHODS)}"),
        (dry or bool(cfg["out"]), "out", "--out is required (the run directory)"),
        (dry or (cfg["task"] is None) != (cfg["data"] is None), "task", "pass exactly one of --task and --data"),
        (cfg["gpus"] is None or cfg["gpus"] >= 1, "gpus", f"--gpus {cfg['gpus']} must be >= 1"),
        (cfg["micro_batch"] >= 1 and cfg["global_batch"] >= cfg["micro_batch"], "micro_batch",
         f"need 1 <= --micro-batch {cfg['micro_batch']} <= --global-batch {cfg['global_batch']}"),
        (cfg["max_length"] >= 2, "max_length", f"--max-length {cfg['max_length']} must be >= 2 tokens"),
        (cfg["micro_batch_tokens"] >= 0, "micro_batch_tokens", "--micro-batch-tokens must be >= 0 (0 = off)"),
        (cfg["lr"] > 0, "lr", f"--lr {cfg['lr']} must be > 0"),
        (0 <= cfg["warmup_ratio"] < 1, "warmup_ratio", f"--warmup-ratio {cfg['warmup_ratio']} must be in [0, 1)"),
        (cfg["epochs"] >= 1, "epochs", f"--epochs {cfg['epochs']} must be >= 1"),
        (not (cfg["resume"] and cfg["overwrite"]), "resume", "--resume and --overwrite exclude each other"),
    ]
    bad = next(((key, msg) for ok, key, msg in checks if not ok), None)
    if bad:
        raise loading.ConfigError(bad[1], bad[0])


if __name__ == "__main__":
    loading.run_cli("train_sft.py", lambda: train(sys.argv[1:]), one_line=(
        ValueError, FileNotFoundError, FileExistsError, FloatingPointError, RuntimeError),
        resume_hint="rerun the same command with --resume to continue from the last checkpoint")
