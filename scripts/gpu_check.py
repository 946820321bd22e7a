"""scripts/gpu_check.py — the real-model path on one GPU, checked in under 10 minutes (issue 14).

Run through scripts/gpu_check.sh (`--cpu`: the same checks at tiny shapes on CPU, for CI).
Models are random-initialised at Qwen2.5-1.5B / Llama-3.2-3B shapes (configs/model_shapes/) with
the toy tokenizer (toy_model/): nothing is downloaded. Each check prints PASS / FAIL / SKIP lines;
the exit code is 1 when any check failed.

1. memory: the measured peak of one LoRA SFT step of the ~1.5B-shaped model (CUDA:
   torch.cuda.max_memory_allocated; CPU: memory.LiveBytes on real tensors) next to memory.py's
   --dry-run estimate, within 15%.
2. sft-loss: train_sft's first-step loss on the device equals CPU fp32's within bf16 tolerance (2%
   relative) for LoRA, OFT, DoRA and Full FT, both shapes (CUDA: bf16 base + fp32 masters under
   autocast; CPU mode: --param-dtype bf16 against fp32). Adapter dropout 0: the RNG streams differ.
3. grpo-motion: two GRPO rollout steps at the paper's LRs (LoRA 1e-5, Full FT 1e-6), one optimiser
   step each, with fp32 masters (default) and pure bf16 (--param-dtype bf16): the fraction of the
   decoder layers' trainable entries that changed per step; Full FT also with --optimizer-offload
   cpu (its fp32 masters on the CPU; the device weights checked to be their cast). Embedding rows
   of unseen tokens get no gradient, so embeddings and lm_head are left out. The reward is a
   stand-in (odd response length = 1), so a random model gets non-zero advantages.
4. arena: `arena.py run` of LoRA SFT + GRPO cells and the base, scored on the real suites'
   fixtures (tests/fixtures/eval) in this one process; vLLM (when it imports, on CUDA) or HF
   generate; afterwards no vLLM engine object may be alive and CUDA memory is back near its start.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import arena  # noqa: E402
import loading  # noqa: E402
import memory  # noqa: E402
import peft_methods  # noqa: E402
import train_grpo  # noqa: E402
import train_sft  # noqa: E402

SHAPES = {"qwen": "qwen2.5-1.5b", "llama": "llama-3.2-3b"}
TINY = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
            num_hidden_layers=2, vocab_size=1024, max_position_embeddings=2048)
SFT_METHODS = {"lora": {"r": 8, "alpha": 16, "dropout": 0.0}, "oft": {"block_size": 16},
               "dora": {"r": 8, "alpha": 16, "dropout": 0.0}, "full": {}}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")
RESULTS: list[tuple[str, str, str]] = []   # (check, PASS|FAIL|SKIP, detail)
LOG = io.StringIO()


def quiet():
    """The trainers' config / summary prints go to a log file, not the check's output."""
    return contextlib.redirect_stdout(LOG)


def report(check: str, ok: bool | None, detail: str) -> None:
    status = "SKIP" if ok is None else ("PASS" if ok else "FAIL")
    RESULTS.append((check, status, detail))
    print(f"[gpu_check] {status} {check}: {detail}", flush=True)


def model_dir(shape: str, overrides: dict, out: Path) -> str:
    """A random-initialised model directory at `shape` (+ overrides) with the toy tokenizer."""
    import transformers
    cfg = peft_methods.load_shape_config(shape, **overrides)
    cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = None, 2, 0    # the toy tokenizer's ids
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    for f in TOKENIZER_FILES:
        shutil.copy(Path(loading.TOY_MODEL_DIR) / f, out / f)
    return str(out)


# -----------------------------------------------------------------------------
# 1. measured peak memory next to the --dry-run estimate


def check_memory(cpu: bool) -> None:
    shape = SHAPES["qwen"]
    hf_config = peft_methods.load_shape_config(shape, **(TINY if cpu else {}))
    plan = memory.Plan("sft", "lora", {"r": 8, "alpha": 16}, compute_bf16=not cpu, rows=2,
                       seq_len=256 if cpu else 2048, n_micro=2)
    est = memory.estimate(hf_config, plan)["train_gib"]
    device = torch.device("cpu" if cpu else "cuda")
    with torch.device(device):
        torch.manual_seed(0)
        model = memory.build_model(hf_config, plan, int(hf_config.num_hidden_layers), init=True)
    loss_module = train_sft.CausalLMLoss(model, fast=True)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, foreach=True)
    amp = contextlib.nullcontext if cpu else (lambda: torch.autocast("cuda", dtype=torch.bfloat16))

    def mbs():
        ids = torch.randint(0, hf_config.vocab_size, (plan.rows, plan.seq_len), device=device)
        return [{"input_ids": ids, "loss_mask": torch.ones_like(ids)} for _ in range(plan.n_micro)]
    train_sft.optimizer_step(loss_module, mbs(), opt, params, lr=1e-4, max_grad_norm=1.0, autocast=amp)
    if cpu:
        meter = memory.LiveBytes()
        for t in [*model.parameters(), *model.buffers(),
                  *(v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor))]:
            meter.track(t)
        with meter:
            train_sft.optimizer_step(loss_module, mbs(), opt, params, lr=1e-4, max_grad_norm=1.0, autocast=amp)
        real = meter.peak / memory.GIB
    else:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        train_sft.optimizer_step(loss_module, mbs(), opt, params, lr=1e-4, max_grad_norm=1.0, autocast=amp)
        torch.cuda.synchronize()
        real = torch.cuda.max_memory_allocated() / memory.GIB
    err = abs(est - real) / real
    report("memory", err < 0.15, f"{shape}{' (tiny)' if cpu else ''} LoRA r8 SFT, {plan.rows} x {plan.seq_len} "
           f"tokens, 2 micro-batches: measured {real:.3f} GiB, --dry-run estimate {est:.3f} GiB "
           f"({100 * (est - real) / real:+.1f}%)")
    del model, loss_module, params, opt
    gc.collect()
    if not cpu:
        torch.cuda.empty_cache()


# -----------------------------------------------------------------------------
# 2. SFT first-step losses: device vs CPU fp32


def sft_first_loss(model: str, method: str, out: Path, **extra) -> float:
    cfg = dict(model=model, method=method, task="toy-math", n_train=8, global_batch=4, micro_batch=2,
               max_steps=1, max_length=256, lr=1e-4, out=str(out), no_progress=True, overwrite=True,
               save_every_steps=0, hp=[f"{k}={json.dumps(v)}" for k, v in SFT_METHODS[method].items()], **extra)
    with quiet():
        return train_sft.train(cfg)["first_loss"]


def check_sft_losses(dirs: dict, cpu: bool, tmp: Path) -> None:
    other = dict(device="cpu", param_dtype="bf16") if cpu else dict(device="cuda")
    what = "CPU bf16" if cpu else "CUDA (bf16 compute)"
    for name, d in dirs.items():
        for method in SFT_METHODS:
            ref = sft_first_loss(d, method, tmp / f"sft-{name}-{method}-cpu", device="cpu")
            got = sft_first_loss(d, method, tmp / f"sft-{name}-{method}-dev", **other)
            rel = abs(got - ref) / abs(ref)
            report("sft-loss", rel < 0.02, f"{name} {method}: {what} {got:.5f} vs CPU fp32 {ref:.5f} "
                   f"(rel diff {rel:.2e}, tolerance 2e-2)")


# -----------------------------------------------------------------------------
# 3. GRPO: do steps move the trainable weights? fp32 masters vs pure bf16


def grpo_fractions(model: str, method: str, cpu: bool, param_dtype: str, out: Path,
                   offload: str = "none") -> list[float]:
    """Per rollout step, the fraction of decoder-layer trainable entries that changed: of the
    model's weights, or with --optimizer-offload cpu of the fp32 masters on the CPU (the device
    weights being their bf16 cast, checked)."""
    fractions = []
    real_optimise = train_grpo._optimise

    def layers(m, opt):
        named = [(n, p) for n, p in m.named_parameters() if p.requires_grad]
        if isinstance(opt, train_grpo.OffloadAdamW):
            for (n, p), master in zip(named, opt.masters, strict=True):
                if not torch.equal(p.detach().cpu(), master.to(p.dtype)):
                    raise AssertionError(f"offload: device weight {n} is not its master's cast")
            named = [(n, master) for (n, _p), master in zip(named, opt.masters)]
        return {n: p.detach().float().clone() for n, p in named if ".layers." in n}

    def spy(model_, ref_, opt, *args, **kw):
        before = layers(model_, opt)
        res = real_optimise(model_, ref_, opt, *args, **kw)
        after = layers(model_, opt)
        changed = sum(int((after[n] != before[n]).sum()) for n in before)
        fractions.append(changed / max(1, sum(t.numel() for t in before.values())))
        return res
    odd_length = lambda domain: (lambda response, answer: float(len(response) % 2))  # noqa: E731
    saved = (train_grpo._optimise, train_grpo.make_reward_fn)
    train_grpo._optimise, train_grpo.make_reward_fn = spy, odd_length
    try:
        with quiet():
            train_grpo.train(dict(model=model, method=method, task="toy-math", preset="paper", steps=2,
                                  prompts_per_step=4, group_size=4, max_new_tokens=16, mini_batches=1,
                                  num_prompts=16, sampler="hf", device="cpu" if cpu else "cuda", dtype="bf16",
                                  param_dtype=param_dtype, optimizer_offload=offload, out=str(out), overwrite=True, no_progress=True,
                                  save_every_steps=0, **({"r": 8, "alpha": 16} if method == "lora" else {})))
    finally:
        train_grpo._optimise, train_grpo.make_reward_fn = saved
    return fractions


def check_grpo_motion(d: str, cpu: bool, tmp: Path) -> None:
    for method in ("lora", "full"):
        lr = train_grpo.PAPER_PRESET["lr"].get(method, train_grpo.PAPER_PRESET["lr"]["*"])
        master = grpo_fractions(d, method, cpu, "auto", tmp / f"grpo-{method}-auto")
        pure = grpo_fractions(d, method, cpu, "bf16", tmp / f"grpo-{method}-bf16")
        ok = len(master) == 2 and master[-1] >= 0.9 and master[-1] >= pure[-1]
        extra = ""
        if method == "full":   # --optimizer-offload cpu: the fp32 masters on the CPU move as well
            off = grpo_fractions(d, method, cpu, "auto", tmp / f"grpo-{method}-offload", offload="cpu")
            ok = ok and len(off) == 2 and off[-1] >= 0.9
            extra = f", fp32 masters offloaded to CPU {[round(x, 4) for x in off]}"
        report("grpo-motion", ok, f"{method} at lr {lr:g}: fraction of decoder-layer trainable entries "
               f"changed per step: fp32 master {[round(x, 4) for x in master]}, pure bf16 "
               f"{[round(x, 4) for x in pure]}{extra}")


# -----------------------------------------------------------------------------
# 4. arena.py run: SFT + GRPO + scoring in one process, no engine left behind


def live_vllm_engines() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects()
               if type(o).__name__ == "LLM" and type(o).__module__.startswith("vllm"))


def check_arena(d: str, cpu: bool, tmp: Path) -> None:
    import importlib.util
    vllm = not cpu and importlib.util.find_spec("vllm") is not None
    cfg = {"name": "gpu-check", "out": str(tmp / "arena"), "model": d, "dtype": "float32" if cpu else "bfloat16",
           "device": "cpu" if cpu else "cuda", "domains": ["math"], "paradigms": ["sft", "grpo"],
           "data": {"math": {"sft": {"task": "toy-math"}, "grpo": {"task": "toy-math"}}},
           "train": {"sft": {"n_train": 8, "global_batch": 4, "micro_batch": 2, "max_steps": 1, "max_length": 256,
                             "save_every_steps": 0},
                     "grpo": {"steps": 1, "prompts_per_step": 2, "group_size": 2, "max_new_tokens": 8,
                              "mini_batches": 1, "num_prompts": 8, "save_every_steps": 0,
                              **({} if vllm else {"sampler": "hf"})}},
           "methods": [{"label": "LoRA r8a16", "method": "lora", "hparams": {"r": 8, "alpha": 16}}],
           "eval": {"suite": "real", "data_dir": str(ROOT / "tests" / "fixtures" / "eval"), "limit": 1,
                    "max_new_tokens": 8, "num_samples": 1, "backend": "vllm" if vllm else "hf", "batch_size": 16}}
    path = tmp / "arena.json"
    path.write_text(json.dumps(cfg))
    start = torch.cuda.memory_allocated() if not cpu else 0
    with quiet():
        code = arena.main(["run", "--config", str(path)])
    rows = json.loads((tmp / "arena" / "results.json").read_text())["rows"]
    engines = live_vllm_engines()
    left = (torch.cuda.memory_allocated() - start) / memory.GIB if not cpu else 0.0
    ok = code == 0 and all(r["status"] == "ok" for r in rows) and engines == 0 and left < 1.0
    report("arena", ok, f"exit {code}; cells {[(r['cell'], r['status']) for r in rows]}; scoring backend "
           f"{'vllm' if vllm else 'hf'}; live vLLM engines after the run: {engines}; CUDA memory left "
           f"allocated: {left:.2f} GiB")
    if not vllm:
        report("arena-vllm", None, "vLLM does not import here (or --cpu): the vLLM sampler and scorer were not run")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cpu", action="store_true", help="tiny shapes on CPU (CI); default: one CUDA GPU")
    p.add_argument("--only", default=None, help="comma-separated subset: memory,sft-loss,grpo-motion,arena")
    args = p.parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        print("gpu_check: no CUDA device; run with --cpu for the CPU mode", file=sys.stderr)
        return 2
    only = set(args.only.split(",")) if args.only else {"memory", "sft-loss", "grpo-motion", "arena"}
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp_:
        tmp = Path(tmp_)
        small = TINY if args.cpu else {"num_hidden_layers": 4}      # real widths, 4 layers, on GPU
        if "memory" in only:
            check_memory(args.cpu)
        dirs = {name: model_dir(shape, small, tmp / f"model-{name}") for name, shape in SHAPES.items()}
        if "sft-loss" in only:
            check_sft_losses(dirs, args.cpu, tmp)
        if "grpo-motion" in only:
            check_grpo_motion(dirs["qwen"], args.cpu, tmp)
        if "arena" in only:
            check_arena(dirs["qwen"], args.cpu, tmp)
    failed = [r for r in RESULTS if r[1] == "FAIL"]
    print(f"[gpu_check] {len(RESULTS) - len(failed)}/{len(RESULTS)} passed or skipped, {len(failed)} failed "
          f"in {time.time() - t0:.0f} s ({'CPU mode' if args.cpu else torch.cuda.get_device_name()})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
