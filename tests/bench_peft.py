"""tests/bench_peft.py (a benchmark, not a test: it imports HF PEFT, which only tests may use): forward+backward step time and peak memory of every PEFT method, ours beside HF PEFT.

Issue 3, acceptance 5 (the PEFT-Arena methods at the paper's settings; the per-method
speed and memory anchors). For each method: one training step = forward, token-mean CE loss, backward (no
optimizer step), on the same model and batch, for peft_methods.py and for HF PEFT's
implementation of the same method (PEFT is used here as a baseline only, never in product code).

Run:
    python tests/bench_peft.py --smoke                                   # seconds, CPU
    python tests/bench_peft.py --out /tmp/bench_peft.md                  # toy model on CPU (default)
    python tests/bench_peft.py --device cuda --shape qwen2.5-1.5b --dtype bfloat16 --batch 4 --seq 512
                                                                   # random-init Qwen2.5-1.5B shape on a GPU

Measurement:
  * time: median over --steps timed steps after --warmup steps (CUDA: synchronised).
  * peak memory: CUDA: torch.cuda.max_memory_allocated during one step, minus the memory held
    before it. CPU: there is no allocator counter, so one extra step is run under
    torch.profiler(profile_memory=True) and its memory timeline (every allocation and free, in
    time order) gives the peak of live tensor bytes above the level before the step (the model's
    own weights are not included).

Deviations:
 1. No optimizer step is timed (AdamW cost is proportional to the trainable count and identical
    in both implementations).
 2. Methods PEFT does not have (MiLoRA, KeepLoRA, Full FT) have no PEFT column; MiLoRA and
    KeepLoRA have PiSSA's and LoRA's forward cost.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root (run from anywhere)
import loading  # noqa: E402
import peft_methods as pm  # noqa: E402

# (label, our method, our hparams, PEFT config class name, PEFT kwargs) at the paper's settings
SETTINGS = [
    ("full", "full", {}, None, None),
    ("lora r8", "lora", {"r": 8, "alpha": 16}, "LoraConfig", {"r": 8, "lora_alpha": 16}),
    ("dora r8", "dora", {"r": 8, "alpha": 16}, "LoraConfig", {"r": 8, "lora_alpha": 16, "use_dora": True}),
    ("pissa r8", "pissa", {"r": 8, "alpha": 16}, "LoraConfig", {"r": 8, "lora_alpha": 16, "init_lora_weights": "pissa"}),
    ("milora r8", "milora", {"r": 8, "alpha": 16}, None, None),
    ("keeplora r8", "keeplora", {"r": 8, "alpha": 16}, None, None),
    ("adalora r8", "adalora", {"r": 8, "alpha": 16}, "AdaLoraConfig", {"init_r": 12, "target_r": 8, "lora_alpha": 16, "total_step": 1000}),
    ("vera r256", "vera", {"r": 256}, "VeraConfig", {"r": 256}),
    ("ia3", "ia3", {}, "IA3Config", {"feedforward_modules": ["down_proj"]}),
    ("miss r8", "miss", {"r": 8}, "MissConfig", {"r": 8}),
    ("oft b16", "oft", {"block_size": 16}, "OFTConfig", {"oft_block_size": 16, "r": 0}),
    ("oft b32", "oft", {"block_size": 32}, "OFTConfig", {"oft_block_size": 32, "r": 0}),
]
TOY_ARCH = dict(vocab_size=128, hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, tie_word_embeddings=True, attn_implementation="sdpa")
DROPOUT_KEY = {"LoraConfig": "lora_dropout", "AdaLoraConfig": "lora_dropout", "VeraConfig": "vera_dropout",
               "MissConfig": "miss_dropout"}


def build_model(shape: str, device: str, dtype: torch.dtype, **overrides):
    """Random-init model: 'toy' (toy_world architecture) or a configs/model_shapes/<shape>.json."""
    if shape == "toy":   # the toy architecture of toy_world.py (built here: no tokenizer needed)
        from transformers import Qwen2Config, Qwen2ForCausalLM
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(Qwen2Config(**TOY_ARCH))
    else:
        import transformers
        cfg = pm.load_shape_config(shape, **overrides)
        torch.manual_seed(0)
        with torch.device(device):
            model = transformers.AutoModelForCausalLM.from_config(cfg)
    return model.to(device=device, dtype=dtype)


def step(model, batch):
    loss = model(**batch).loss
    loss.backward()
    for p in model.parameters():
        p.grad = None
    return loss


def cpu_peak_bytes(model, batch) -> int:
    """Peak live tensor bytes during one step above the level before it (CPU has no allocator counter).

    torch.profiler's memory timeline (alloc/free events with their times); if that private API is
    missing, the running sum of the bytes the profiler attributes to each op, in op start order.
    """
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        step(model, batch)
    try:
        from torch.profiler._memory_profiler import MemoryProfileTimeline
        _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline("cpu")
        totals = [sum(s) for s in sizes]
        return max(totals) - totals[0]
    except Exception:  # pragma: no cover - fallback for other torch versions
        cur = peak = 0
        for e in sorted(prof.events(), key=lambda e: e.time_range.start):
            cur += e.self_cpu_memory_usage
            peak = max(peak, cur)
        return peak


def time_interleaved(models: dict, batch, *, device, warmup, steps) -> dict:
    """Median step time (ms) of each model; steps of the models alternate, so a load change on a
    shared machine hits both implementations alike."""
    for m in models.values():
        m.train()
        for _ in range(warmup):
            step(m, batch)
    times = {k: [] for k in models}
    for _ in range(steps):
        for k, m in models.items():
            if device == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            step(m, batch)
            if device == "cuda":
                torch.cuda.synchronize()
            times[k].append(time.perf_counter() - t)
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


def peak_mb(model, batch, *, device) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step(model, batch)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    return cpu_peak_bytes(model, batch) / 2**20


def make_ours(base, method, hp, batch, dropout, adapter_dtype):
    m = copy.deepcopy(base)
    if "dropout" in {f.name for f in dataclasses.fields(pm.METHODS[method].config)}:
        hp = {**hp, "dropout": dropout}
    pm.apply_peft(m, method, init_batch=batch if method == "keeplora" else None, adapter_dtype=adapter_dtype, **hp)
    return m


def make_peft(base, cls_name, kw, dropout):
    import peft
    kw = dict(kw)
    if cls_name in DROPOUT_KEY:
        kw[DROPOUT_KEY[cls_name]] = dropout
    cfg = getattr(peft, cls_name)(target_modules=list(pm.DEFAULT_TARGETS), **kw)
    # autocast_adapter_dtype=False keeps adapters in the base dtype, like ours (Deviation 9 of peft_methods)
    return peft.get_peft_model(copy.deepcopy(base), cfg, autocast_adapter_dtype=False)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = ap.add_argument_group("model and batch")
    g.add_argument("--shape", default="toy", help="'toy' or a configs/model_shapes/<name>.json (random init)")
    g.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    g.add_argument("--batch", type=int, default=8, help="sequences per step")
    g.add_argument("--seq", type=int, default=256, help="tokens per sequence")
    g.add_argument("--num-layers", type=int, default=None, help="override the shape's decoder layer count (smoke runs)")
    g.add_argument("--dropout", type=float, default=0.05, help="adapter dropout where the method has one (arena SFT)")
    r = ap.add_argument_group("run")
    r.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: shared-machine etiquette)")
    r.add_argument("--warmup", type=int, default=2, help="untimed steps")
    r.add_argument("--steps", type=int, default=7, help="timed steps per implementation, interleaved (median reported)")
    r.add_argument("--methods", nargs="*", default=None, help="labels to run (default: all)")
    r.add_argument("--no-peft", action="store_true", help="skip the HF PEFT baseline")
    r.add_argument("--smoke", action="store_true", help="tiny run: batch 2 x 32 tokens, 1 step, lora and oft only")
    o = ap.add_argument_group("output")
    o.add_argument("--out", default="/tmp/bench_peft.md", help="markdown results (a .json beside it)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.batch, args.seq, args.warmup, args.steps = 2, 32, 1, 1
        args.methods = args.methods or ["lora r8", "oft b16"]
    assert args.batch > 0 and args.seq > 0 and args.steps > 0
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_peft: --device cuda but no CUDA device is available")
    dtype = getattr(torch, args.dtype)
    torch.set_num_threads(args.threads)
    load = open("/proc/loadavg").read().split()[:3] if Path("/proc/loadavg").exists() else ["?"]
    print(f"device {args.device}, dtype {args.dtype}, torch threads {torch.get_num_threads()}", flush=True)

    base = build_model(args.shape, args.device, dtype,
                       **({"num_hidden_layers": args.num_layers} if args.num_layers else {}))
    vocab = base.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=gen).to(args.device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}

    rows = []
    for label, method, hp, cls_name, kw in SETTINGS:
        if args.methods and label not in args.methods:
            continue
        models = {"ours": make_ours(base, method, hp, batch, args.dropout, None)}
        if cls_name and not args.no_peft:
            models["peft"] = make_peft(base, cls_name, kw, args.dropout)
        ms = time_interleaved(models, batch, device=args.device, warmup=args.warmup, steps=args.steps)
        row = {"label": label}
        for k, m in models.items():
            row[k] = {"ms": ms[k], "peak_mb": peak_mb(m, batch, device=args.device), "trainable": pm.count_trainable(m)}
        del models
        rows.append(row)
        o, p = row["ours"], row.get("peft")
        print(f"{label:<12} ours {o['ms']:8.1f} ms {o['peak_mb']:8.1f} MB" +
              (f" | peft {p['ms']:8.1f} ms {p['peak_mb']:8.1f} MB" if p else ""), flush=True)

    cmd = "python " + " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:]))
    lines = [f"### peft_methods.py vs HF PEFT: one training step (forward + CE + backward)", "",
             f"- machine: {platform.node()} / {platform.processor() or platform.machine()}, "
             f"{torch.get_num_threads()} torch thread(s), {__import__('os').cpu_count()} cores, load average at start "
             f"{' '.join(load)} (shared machine: timings are noisy), device {args.device}"
             + (f" ({torch.cuda.get_device_name()})" if args.device == "cuda" else ""),
             f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}; torch {torch.__version__}",
             f"- command: `{cmd}`",
             f"- model: {args.shape} (random init), {args.dtype}; batch {args.batch} x {args.seq} tokens; "
             f"adapter dropout {args.dropout}; median of {args.steps} steps after {args.warmup} warm-up",
             "- peak memory: " + ("torch.cuda.max_memory_allocated above the pre-step level" if args.device == "cuda"
                                  else "peak live tensor bytes above the pre-step level, from torch.profiler's CPU memory timeline"),
             "",
             "| method | trainable | ours ms | PEFT ms | time ours/PEFT | ours peak MB | PEFT peak MB | mem ours/PEFT |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        o, p = row["ours"], row.get("peft")
        if p:
            lines.append(f"| {row['label']} | {o['trainable']:,} | {o['ms']:.1f} | {p['ms']:.1f} | {o['ms'] / p['ms']:.2f} | "
                         f"{o['peak_mb']:.1f} | {p['peak_mb']:.1f} | {o['peak_mb'] / max(p['peak_mb'], 1e-9):.2f} |")
        else:
            lines.append(f"| {row['label']} | {o['trainable']:,} | {o['ms']:.1f} | - | - | {o['peak_mb']:.1f} | - | - |")
    by = {r["label"]: r for r in rows}
    if "oft b16" in by and "lora r8" in by:
        ratio = by["oft b16"]["ours"]["ms"] / by["lora r8"]["ours"]["ms"]
        lines += ["", f"OFT b16 / LoRA r8 step time (ours): {ratio:.2f}x (target <= 1.5x)."]
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    loading.atomic_write_text(args.out, text)
    loading.atomic_write_json(Path(args.out).with_suffix(".json"), {"args": vars(args), "rows": rows})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
