"""memory.py — per-GPU peak memory of one training step, planned before training (no GPU, no weights).

Used by `train_sft.py --dry-run`, `train_grpo.py --dry-run` and `arena.py run --validate-only`.

How: the model is built from its config.json at the real shapes inside PyTorch's FakeTensorMode
(tensors carry shape, dtype and device but no storage), wrapped exactly as the trainer wraps it
(peft_methods.apply_peft with the adapter dtype, gradient checkpointing, the precision plan), and
one optimiser step is run: forward, backward, clip, AdamW (foreach, as on CUDA). A
TorchDispatchMode (`LiveBytes`) sees every tensor an op creates, counts each storage's bytes once
while it is alive (a weakref finalizer subtracts them when it is freed) and keeps the peak: the
same quantity as `torch.cuda.max_memory_allocated`, minus the caching allocator's rounding.
The same mode on real tensors measures a real CPU step (tests/test_memory.py compares the two).

What is emulated (each a worst case for the planned settings):
- SFT: one micro-batch forward = min(--micro-batch, --micro-batch-tokens // --max-length) rows
  (train_sft.split_by_tokens) of --max-length tokens, every position a trained target (the fast
  loss's logits then cover all of them); two micro-batches (gradient accumulation) when the step
  has more than one.
- GRPO: the ℓ_old pass (no grad, with entropy), then two training micro-batches of
  token_budget_micros' size at width --max-prompt-tokens + --max-new-tokens, clip, AdamW. The
  sampler's share is added on top: vLLM holds --vllm-gpu-memory-utilization of the GPU for its
  whole life (its weights + KV cache), unless --vllm-sleep frees it while training.
- AdamW states exist already (a warm-up step with zero gradients allocates them first), so the
  peak is that of step 2 onwards, not the cheaper first step.
- --optimizer-offload cpu (GRPO Full FT, train_grpo.OffloadAdamW): the GPU holds the bf16 weights
  and grads and no optimizer state; the optimiser phase only moves the grads to the CPU (each freed
  on the GPU) and copies the masters back in place, so its GPU peak is the weights + grads. The
  CPU's share (fp32 masters, moments and grads + pinned bf16 staging: 18 B/param) is reported
  beside it, not counted against the GPU.
- No padding mask (attention_mask None, every row full length): HF's 4-D bool mask for padded
  rows (B·T² bytes) is not counted.

Extrapolation (said in every result): decoder layers of Qwen2 / Llama are identical, so a model
deeper than `FULL_DEPTH_MAX` layers is measured at 1 and 2 layers and the peak is extended
linearly, peak(L) = peak(1) + (L-1)·(peak(2) - peak(1)), per phase (forward/backward, optimiser).
Multi-GPU: PEFT under DDP keeps everything per GPU (the 1-GPU figure). Full FT under FSDP2
(fully_shard per layer) is extrapolated, not emulated: the fp32 trainable state (weights, grads,
two AdamW moments = 16 B/param) is divided by the GPU count, the autocast cache of bf16 weight
copies is replaced by the all-gathered bf16 weights and grads of two layers plus the root
(embeddings and lm_head), and the optimiser phase is divided by the GPU count.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

import loading
import peft_methods
import train_grpo
import train_sft

GIB = 2 ** 30
FULL_DEPTH_MAX = 4        # deeper models: measure 1 and 2 layers and extrapolate
# --optimizer-offload cpu: fp32 master + 2 AdamW moments + fp32 grad + pinned bf16 staging, per param
OFFLOAD_CPU_BYTES_PER_PARAM = 4 + 8 + 4 + 2
USABLE_FRACTION = 0.92    # of a GPU's memory: the rest for the CUDA context, NCCL and fragmentation


# -----------------------------------------------------------------------------
# Counting live bytes


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of every live tensor storage created under it (or `track`ed) and the peak.

    A storage is counted once however many views share it; its bytes are subtracted when Python
    frees it. Works on fake tensors (planning) and on real ones (the tests' reference).
    """

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._seen = WeakIdKeyDictionary()

    def _free(self, n: int) -> None:
        self.live -= n

    def track(self, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        if st in self._seen:
            return
        n = st.nbytes()
        self._seen[st] = n
        self.live += n
        self.peak = max(self.peak, self.live)
        weakref.finalize(st, self._free, n)

    def reset_peak(self) -> None:
        self.peak = self.live

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.track(t)
        return out


# -----------------------------------------------------------------------------
# The plan: what the trainer will do, in the few numbers that decide its memory


@dataclasses.dataclass
class Plan:
    paradigm: str                  # "sft" | "grpo"
    method: str                    # peft_methods name; "full" = Full FT
    hparams: dict                  # make_config kwargs
    targets: tuple = peft_methods.DEFAULT_TARGETS
    compute_bf16: bool = True      # bf16 compute (CUDA); False = fp32 everywhere
    param_bf16: bool = False       # --param-dtype bf16 (no fp32 masters)
    grad_checkpointing: bool = True
    rows: int = 1                  # sequences per forward (after the token budget)
    seq_len: int = 8192            # tokens per sequence (SFT: max length; GRPO: prompt + completion)
    completion_len: int = 0        # GRPO: L (the logits kept)
    n_micro: int = 1               # micro-batches per optimiser step on one GPU
    gpus: int = 1
    fsdp: bool = False             # Full FT under FSDP2 (extrapolated, see the docstring)
    sampler_gib: float = 0.0       # GRPO: vLLM's share while training
    offload: bool = False          # GRPO Full FT --optimizer-offload cpu (masters + AdamW on the CPU)

    def describe(self) -> str:
        s = (f"{self.paradigm} {self.method} {json.dumps(self.hparams, sort_keys=True)}: {self.rows} x "
             f"{self.seq_len} tokens per forward, {self.n_micro} micro-batch(es)/step, "
             f"{'bf16' if self.compute_bf16 else 'fp32'} compute, "
             f"{'bf16' if self.param_bf16 or self.offload else 'fp32'} trainable"
             f"{' (fp32 masters on CPU)' if self.offload else ''}, grad ckpt {self.grad_checkpointing}, "
             f"{self.gpus} GPU(s)" + (" FSDP2" if self.fsdp else "")
             + (", optimizer offloaded to CPU" if self.offload else ""))
        return s


def sft_plan(cfg: dict, *, gpus: int = 1, cuda: bool = True) -> Plan:
    """Plan of a resolved train_sft config on `gpus` GPUs (CUDA: bf16 compute, as train_sft does)."""
    full = cfg["method"] == "full"
    rows = max(1, min(cfg["micro_batch"], (cfg["micro_batch_tokens"] // cfg["max_length"])
                      if cfg["micro_batch_tokens"] > 0 else cfg["micro_batch"]))
    per_gpu = max(1, cfg["global_batch"] // max(1, gpus))
    chunks = -(-cfg["micro_batch"] // rows)                 # split_by_tokens chunks per micro-batch
    n_micro = max(1, per_gpu // cfg["micro_batch"]) * chunks
    fsdp = gpus > 1 and (cfg["fsdp"] == "on" or (cfg["fsdp"] == "auto" and full and cuda))
    targets = tuple(cfg["target_modules"].split(",")) if cfg["target_modules"] else peft_methods.DEFAULT_TARGETS
    hp = peft_methods.hparams_from_flags(cfg["method"], cfg, cfg["hp"], 1000)
    return Plan("sft", cfg["method"], hp, targets, compute_bf16=cuda, param_bf16=cfg["param_dtype"] == "bf16",
                grad_checkpointing=cfg["grad_checkpointing"], rows=rows, seq_len=cfg["max_length"],
                n_micro=n_micro, gpus=gpus, fsdp=fsdp)


def grpo_plan(cfg: dict, *, gpu_memory_gib: float | None = None, cuda: bool = True) -> Plan:
    """Plan of a resolved train_grpo config (one process, one GPU; vLLM beside it when on CUDA)."""
    P, L = cfg["max_prompt_tokens"], cfg["max_new_tokens"]
    width = P + L
    rows = cfg["micro_batch_size"]
    if cfg["micro_batch_tokens"] > 0:
        rows = max(1, min(rows, cfg["micro_batch_tokens"] // width))
    per_mini = cfg["prompts_per_step"] * cfg["group_size"] // cfg["mini_batches"]
    vllm = cuda and cfg["sampler"] != "hf"
    share = 0.0
    if vllm and not cfg["vllm_sleep"]:
        share = cfg["vllm_gpu_memory_utilization"] * (gpu_memory_gib or 0.0)
    hp = train_grpo.method_hparams(cfg, peft_methods)
    dtype = cfg["dtype"] or ("bf16" if cuda else "fp32")
    return Plan("grpo", cfg["method"], hp, peft_methods.DEFAULT_TARGETS,
                compute_bf16=dtype in ("bf16", "bfloat16"), param_bf16=cfg["param_dtype"] == "bf16",
                grad_checkpointing=cfg["grad_checkpointing"], rows=rows, seq_len=width, completion_len=L,
                n_micro=-(-per_mini // rows), sampler_gib=share,
                offload=cfg.get("optimizer_offload", "none") == "cpu")


# -----------------------------------------------------------------------------
# One emulated step


def _dtypes(plan: Plan) -> tuple[torch.dtype, torch.dtype | None, bool]:
    """(base load dtype, adapter dtype, autocast) exactly as train_sft / train_grpo.precision_plan."""
    if not plan.compute_bf16:
        return torch.float32, None, False
    if plan.offload:
        return torch.bfloat16, None, True           # bf16 GPU weights, fp32 masters on the CPU
    if plan.param_bf16:
        return torch.bfloat16, torch.bfloat16, False
    if plan.method == "full":
        return torch.float32, None, True            # fp32 masters, bf16 autocast
    return torch.bfloat16, torch.float32, True      # bf16 frozen base, fp32 adapters


def build_model(hf_config, plan: Plan, n_layers: int, *, init: bool = False):
    """The wrapped model at `n_layers` depth, in the current tensor mode (fake or real). init=False
    skips the adapters' data-dependent initialisation (shapes only: planning); real measurements
    pass init=True so the step computes on initialised values."""
    import transformers
    c = copy.deepcopy(hf_config)
    c.num_hidden_layers = n_layers
    if isinstance(getattr(c, "layer_types", None), list):
        c.layer_types = c.layer_types[:n_layers]
    load, adapter, _ = _dtypes(plan)
    model = transformers.AutoModelForCausalLM.from_config(c, dtype=load)
    peft_methods.apply_peft(model, plan.method, target_modules=plan.targets, adapter_dtype=adapter,
                            _init=init, **plan.hparams)
    if plan.grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model.train()
    return model


def _sft_loss(model, ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """train_sft.fast_loss_terms with every position a target. A function of its own, as there:
    its locals (hidden states, logits) are freed before backward, and the peak depends on it."""
    hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state    # (B, T, D)
    # the trainer's hidden[:, :-1][mask] with a static index (a boolean mask has no fake shape)
    sel = torch.arange(ids.shape[0] * (ids.shape[1] - 1))                     # (N,)
    logits = model.get_output_embeddings()(hidden[:, :-1].flatten(0, 1).index_select(0, sel))  # (N, V)
    return train_sft.masked_ce_sum(logits, ids[:, 1:].reshape(-1))


def _sft_forward_backward(model, plan: Plan, amp) -> None:
    """One SFT micro-batch of the worst case: `rows` full-length rows, every position trained."""
    ids = torch.zeros(plan.rows, plan.seq_len, dtype=torch.long)              # (B, T)
    with amp():
        ce, n = _sft_loss(model, ids)
    (ce / n / plan.n_micro).backward()


def _grpo_loss(model, ids: torch.Tensor, L: int, n_tok: float, fresh: bool) -> torch.Tensor:
    """train_grpo._optimise's training micro-batch loss (sequence_logprobs, clipped surrogate, dapo)."""
    logits = model(input_ids=ids, logits_to_keep=L + 1, use_cache=False).logits[:, :-1]  # (n, L, V)
    lp = train_grpo.token_logprobs(logits, ids[:, -L:])                        # (n, L)
    if fresh:                                                                  # entropy of π_old
        train_grpo.token_entropy(logits.detach())
    loss, _ = train_grpo.policy_loss_per_token(lp, lp.detach(), torch.ones(ids.shape[0]))
    return train_grpo.aggregate_loss(loss, torch.ones_like(lp), "dapo", num_tokens=n_tok)


def _grpo_forward_backward(model, plan: Plan, amp, *, fresh: bool) -> None:
    ids = torch.zeros(plan.rows, plan.seq_len, dtype=torch.long)              # (n, P+L)
    with amp():
        loss = _grpo_loss(model, ids, plan.completion_len, float(plan.rows * plan.completion_len), fresh)
    loss.backward()


def _grpo_old_pass(model, plan: Plan, amp) -> None:
    """ℓ_old and entropy without grad (before the first optimiser step of a rollout)."""
    L = plan.completion_len
    ids = torch.zeros(plan.rows, plan.seq_len, dtype=torch.long)
    with torch.no_grad(), amp():
        logits = model(input_ids=ids, logits_to_keep=L + 1, use_cache=False).logits[:, :-1]
        train_grpo.token_logprobs(logits, ids[:, -L:])
        train_grpo.token_entropy(logits)


def step_peaks(model, plan: Plan, *, autocast: bool | None = None) -> dict:
    """Run one optimiser step under LiveBytes; {static, fb (forward/backward peak), opt (peak of
    clip + AdamW), trainable_bytes}. AdamW's states are allocated first (zero-gradient step)."""
    if autocast is None:
        autocast = _dtypes(plan)[2]
    device = next(model.parameters()).device
    amp = ((lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if autocast
           else contextlib.nullcontext)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = None if plan.offload else torch.optim.AdamW(params, lr=1e-5, foreach=True)  # foreach: CUDA's default
    if opt is not None:
        for p in params:                  # allocate exp_avg / exp_avg_sq (steady state: step >= 2)
            p.grad = torch.zeros_like(p)
        opt.step()
        opt.zero_grad(set_to_none=True)
    meter = LiveBytes()
    seen = set()
    for t in [*model.parameters(), *model.buffers(),
              *(v for s in (opt.state.values() if opt else ()) for v in s.values() if isinstance(v, torch.Tensor))]:
        if id(t) not in seen:
            seen.add(id(t))
            meter.track(t)
    static = meter.live
    with meter:
        if plan.paradigm == "grpo":
            _grpo_old_pass(model, plan, amp)
        for k in range(min(2, plan.n_micro)):
            if plan.paradigm == "sft":
                _sft_forward_backward(model, plan, amp)
            else:
                _grpo_forward_backward(model, plan, amp, fresh=k == 0)
        fb = meter.peak
        meter.reset_peak()
        if opt is None:   # offload: each grad leaves for the CPU (freed here); masters copied in place
            for p in params:
                p.grad = None
        else:
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        opt_peak = meter.peak
    return {"static": static, "fb": fb, "opt": opt_peak,
            "trainable_params": sum(p.numel() for p in params)}


def measure(hf_config, plan: Plan, n_layers: int) -> dict:
    """step_peaks of the model at `n_layers` depth, built and run on fake tensors."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = build_model(hf_config, plan, n_layers)
        return step_peaks(model, plan)


# -----------------------------------------------------------------------------
# The estimate


def _layer_params(hf_config) -> tuple[int, int]:
    """(parameters of one decoder layer, of the root: embeddings + lm_head + final norm)."""
    D, F_, V = hf_config.hidden_size, hf_config.intermediate_size, hf_config.vocab_size
    H, KV = hf_config.num_attention_heads, getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads
    hd = getattr(hf_config, "head_dim", None) or D // H
    layer = D * H * hd * 2 + D * KV * hd * 2 + 3 * D * F_ + 2 * D
    root = V * D * (1 if getattr(hf_config, "tie_word_embeddings", False) else 2) + D
    return layer, root


def estimate(hf_config, plan: Plan) -> dict:
    """Per-GPU peak memory (GiB) of the planned step: {peak_gib (train + sampler), train_gib,
    sampler_gib, layers_measured, layers, extrapolated, fsdp_extrapolated, trainable_params, plan}."""
    L = int(hf_config.num_hidden_layers)
    if L <= FULL_DEPTH_MAX:
        m = measure(hf_config, plan, L)
        per = {k: m[k] for k in ("static", "fb", "opt")}
        measured = [L]
        n_train = m["trainable_params"]
    else:
        m1, m2 = measure(hf_config, plan, 1), measure(hf_config, plan, 2)
        per = {k: m1[k] + (L - 1) * (m2[k] - m1[k]) for k in ("static", "fb", "opt")}
        measured = [1, 2]
        n_train = m1["trainable_params"] + (L - 1) * (m2["trainable_params"] - m1["trainable_params"])
    fb, opt = per["fb"], per["opt"]
    if plan.fsdp and plan.gpus > 1:
        layer, root = _layer_params(hf_config)
        state = 16 * n_train                                       # fp32 weight + grad + 2 moments
        cache = 2 * n_train if _dtypes(plan)[2] else 0             # autocast's bf16 weight copies
        gathered = 4 * (2 * layer + root)                          # bf16 weights + grads, unsharded
        fb = fb - state - cache + state / plan.gpus + gathered
        opt = opt / plan.gpus + gathered
    train = max(fb, opt)
    cpu = OFFLOAD_CPU_BYTES_PER_PARAM * n_train if plan.offload else 0
    return {"peak_gib": train / GIB + plan.sampler_gib, "train_gib": train / GIB, "cpu_gib": cpu / GIB,
            "sampler_gib": plan.sampler_gib, "static_gib": per["static"] / GIB, "fb_gib": fb / GIB,
            "opt_gib": opt / GIB, "layers": L, "layers_measured": measured, "extrapolated": L > FULL_DEPTH_MAX,
            "fsdp_extrapolated": bool(plan.fsdp and plan.gpus > 1), "trainable_params": n_train,
            "plan": plan.describe()}


def fits(est: dict, gpu_memory_gib: float) -> bool:
    """Whether the estimate fits a GPU of `gpu_memory_gib`, keeping 8% for context and fragmentation."""
    return est["peak_gib"] <= USABLE_FRACTION * gpu_memory_gib


def format_estimate(est: dict, gpu_memory_gib: float | None = None) -> str:
    how = (f"layers {est['layers_measured']} measured, extrapolated to {est['layers']}"
           if est["extrapolated"] else f"all {est['layers']} layers measured")
    if est["fsdp_extrapolated"]:
        how += "; FSDP2 sharding extrapolated"
    s = (f"peak {est['peak_gib']:.1f} GiB/GPU (training {est['train_gib']:.1f}: forward/backward "
         f"{est['fb_gib']:.1f}, optimiser {est['opt_gib']:.1f}; sampler {est['sampler_gib']:.1f}) [{how}]")
    if est.get("cpu_gib"):
        s += f"; CPU RAM {est['cpu_gib']:.1f} GiB (optimizer offload: fp32 masters + AdamW moments + grads)"
    if gpu_memory_gib:
        s += (f"; budget {USABLE_FRACTION * gpu_memory_gib:.1f} of {gpu_memory_gib:g} GiB: "
              + ("fits" if fits(est, gpu_memory_gib) else "DOES NOT FIT"))
    return s


def hf_config_for(spec: str):
    """config of a model spec without weights: a configs/model_shapes name or .json file, a model
    directory (its config.json) or a hub id in the local cache. Raises FileNotFoundError."""
    p = Path(spec)
    if p.suffix == ".json" and p.is_file():
        if p.parent.resolve() == peft_methods.SHAPES_DIR.resolve() or p.name != "config.json":
            d = {k: v for k, v in json.loads(p.read_text()).items() if not k.startswith("_")}
            import transformers
            return transformers.AutoConfig.for_model(d.pop("model_type"), **d)
        p = p.parent
    if (peft_methods.SHAPES_DIR / f"{spec}.json").exists():
        return peft_methods.load_shape_config(spec)
    if spec == "toy":
        p = Path(loading.TOY_MODEL_DIR)
    import arena
    cfg, _where, err, _w = arena.resolve_model(str(p), None)
    if cfg is None:
        raise FileNotFoundError(f"--model {spec}: no config.json to plan from ({err}); pass a "
                                f"configs/model_shapes name ({', '.join(sorted(x.stem for x in peft_methods.SHAPES_DIR.glob('*.json')))}) "
                                "or its .json file")
    return cfg


# -----------------------------------------------------------------------------
# What would fit, and the dry-run report


def what_fits(hf_config, plan: Plan, gpu_memory_gib: float, *, max_gpus: int = 8) -> list[str]:
    """Changes of the plan that fit `gpu_memory_gib`, each with its estimate (tried in order:
    the optimizer offload for GRPO Full FT, FSDP2 over more GPUs for Full FT SFT, fewer rows per
    forward, vLLM asleep while training)."""
    tries = []
    if plan.method == "full" and plan.paradigm == "grpo" and not plan.offload and plan.compute_bf16:
        tries.append(("--optimizer-offload cpu (fp32 masters + AdamW on the CPU)",
                      dataclasses.replace(plan, offload=True, param_bf16=False)))
    if plan.method == "full" and plan.paradigm == "sft":
        n = 2
        while n <= max_gpus:
            if n > plan.gpus:
                tries.append((f"torchrun --nproc_per_node {n} (FSDP2)", dataclasses.replace(plan, gpus=n, fsdp=True)))
            n *= 2
    rows = plan.rows
    while rows > 1:
        rows //= 2
        flag = ("--micro-batch-tokens" if plan.paradigm == "grpo" else "--micro-batch / --micro-batch-tokens")
        tries.append((f"{flag} for {rows} row(s) of {plan.seq_len} tokens per forward",
                      dataclasses.replace(plan, rows=rows, n_micro=plan.n_micro * (plan.rows // rows))))
    if plan.sampler_gib:
        tries.append(("--vllm-sleep (vLLM frees its memory while training)", dataclasses.replace(plan, sampler_gib=0.0)))
    out = []
    for what, p in tries:
        est = estimate(hf_config, p)
        if fits(est, gpu_memory_gib):
            out.append(f"{what}: {est['peak_gib']:.1f} GiB/GPU")
            if p.gpus > plan.gpus:   # the smallest GPU count is enough
                break
    return out


def report(hf_config, plan: Plan, *, spec: str, gpu_memory_gib: float | None, tool: str) -> str:
    """The --dry-run text: model, plan, per-GPU peak, the verdict and what would fit."""
    est = estimate(hf_config, plan)
    lines = [f"[{tool}] dry run: model {spec} ({est['layers']} layers; {est['trainable_params']:,} trainable "
             "parameters); built on fake tensors, no weights read, no GPU used",
             f"[{tool}] plan: {plan.describe()}",
             f"[{tool}] per-GPU {format_estimate(est, gpu_memory_gib)}"]
    if gpu_memory_gib and not fits(est, gpu_memory_gib):
        alts = what_fits(hf_config, plan, gpu_memory_gib)
        lines.append(f"[{tool}] would fit: " + ("; ".join(alts) if alts else "nothing tried fits "
                                                "(fewer tokens per sequence, or a bigger GPU)"))
    return "\n".join(lines)
