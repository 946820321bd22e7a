"""Tests for train_sft.py: loss mask and loss by hand, LR schedule, data order vs the release's
DistributedSampler, packing and fast-vs-reference loss parity, the plain optimizer step vs the one
trained (gradient accumulation, token-budget chunks), every peft_methods method training a few steps
(only adapter tensors change, checkpoints reload to identical logits), resume after a SIGKILL (and
bitwise resume of the stateful methods), each bad input, the CLI (--help, --smoke), and per-rank
dropout streams under torchrun (2 CPU ranks). FSDP2 Full FT under torchrun: tests/test_memory.py.

Run:  python -m pytest tests/test_train_sft.py -x -q        (CPU)

Also a benchmark (not a test; HF PEFT is used as the reference oracle, which product code may not):
      python tests/test_train_sft.py --bench [--device cuda] [--shape toy|1.5b|7b]  -> /tmp/bench_sft.md
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import loading  # noqa: E402
import peft_methods  # noqa: E402
import toy_world  # noqa: E402
import train_sft as ts  # noqa: E402

ROWS = [{"prompt": f"{a}+{b}?", "response": f"{a + b}"} for a, b in [(1, 2), (3, 4), (5, 1), (2, 2),
                                                                          (7, 1), (4, 4), (6, 3), (0, 9)]]


# -----------------------------------------------------------------------------
# fixtures

def _build_tiny():
    """The toy architecture with random weights (what conftest's `tiny_random` returns)."""
    return toy_world.build_random_toy_model(seed=0)


@pytest.fixture
def tiny(tiny_random):
    return tiny_random


@pytest.fixture
def tiny_dir(tiny, tmp_path):
    """The tiny model saved as a local HF dir, so `--model <dir>` and --resume can reload it."""
    model, tok = tiny
    d = tmp_path / "tiny_model"
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return str(d)


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _cfg(model_dir, out, data, **kw):
    cfg = {"model": model_dir, "method": "lora", "data": data, "global_batch": 4, "micro_batch": 2,
           "max_steps": 4, "max_length": 64, "lr": 1e-2, "save_every_steps": 2, "out": str(out),
           "no_progress": True}
    cfg.update(kw)
    return cfg


# -----------------------------------------------------------------------------
# pure functions: mask, loss, schedule, data order

def test_loss_mask_by_hand():
    # P = 3 prompt tokens, L = 7 tokens; targets are paired with input_ids[1:] through mask[1:].
    assert ts.build_loss_mask(3, 7, "correct") == [0, 0, 0, 1, 1, 1, 1]   # tokens 3..6 (EOS included)
    assert ts.build_loss_mask(3, 7, "release") == [0, 0, 1, 1, 1, 1, 0]   # tokens 2..5 (veRL: P-1..L-2)
    with pytest.raises(ValueError):
        ts.build_loss_mask(3, 7, "bogus")


def test_encode_example_on_toy_tokenizer(tiny):
    _, tok = tiny
    ex = ts.encode_example(tok, "hi", "ok")
    prompt_text = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"      # ChatML, no system turn
    P = len(tok(prompt_text, add_special_tokens=False)["input_ids"])
    R = len(tok("ok" + tok.eos_token, add_special_tokens=False)["input_ids"])
    assert ex["n_prompt"] == P and len(ex["input_ids"]) == P + R
    assert tok.decode(ex["input_ids"][:P]) == prompt_text and ex["input_ids"][-1] == tok.eos_token_id
    trained = lambda e: tok.decode([t for t, m in zip(e["input_ids"], e["loss_mask"]) if m])  # noqa: E731
    assert trained(ex) == "ok<|im_end|>"                 # response + EOS, nothing of the prompt
    rel = ts.encode_example(tok, "hi", "ok", loss_mask="release")
    last_prompt_token = tok.decode(ex["input_ids"][P - 1:P])
    assert trained(rel) == last_prompt_token + "ok"       # last prompt token, no EOS (the release's veRL mask)
    # the batched encoder gives the same examples, also for chat-message prompts
    pairs = [("hi", "ok"), ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                             {"role": "user", "content": "c"}], "d")]
    for mode in ("correct", "release"):
        assert ts.encode_examples(tok, pairs, loss_mask=mode) == [
            ts.encode_example(tok, p, r, loss_mask=mode) for p, r in pairs]


def test_masked_ce_and_micro_batch_loss_by_hand():
    # V = 2. logits [0, ln 3] -> p = (1/4, 3/4). target 1: CE = ln(4/3); target 0: CE = ln 4.
    logits = torch.tensor([[0.0, math.log(3.0)], [0.0, math.log(3.0)]])
    s, n = ts.masked_ce_sum(logits, torch.tensor([1, 0]))
    assert n == 2 and s.item() == pytest.approx(math.log(16 / 3), abs=1e-6)
    # micro-batch 1: Σ = 3 over 2 tokens; micro-batch 2: Σ = 2 over 1 token
    s1, s2 = torch.tensor(3.0), torch.tensor(2.0)
    micro = ts.micro_batch_loss(s1, 2, 2) + ts.micro_batch_loss(s2, 1, 2)
    assert micro.item() == pytest.approx((3 / 2 + 2 / 1) / 2)             # paper: mean of means = 1.75
    tok = ts.micro_batch_loss(s1, 2, 2, norm="token", n_tokens_global=3) + \
        ts.micro_batch_loss(s2, 1, 2, norm="token", n_tokens_global=3)
    assert tok.item() == pytest.approx(5 / 3)                              # pooled token mean
    assert ts.micro_batch_loss(torch.tensor(0.0), 0, 1).item() == 0.0      # empty mask: no NaN (+1e-8)


def test_reference_loss_matches_manual_and_fast_path(tiny):
    model, tok = tiny
    exs = ts.encode_examples(tok, [("hi", "ok"), ("a longer prompt", "and a reply")])
    batch = ts.collate(exs, tok.pad_token_id)                              # (2, T), right-padded
    with torch.no_grad():
        s_ref, n_ref = ts.reference_loss_terms(model, batch)
        s_fast, n_fast = ts.fast_loss_terms(model, batch)
        # manual: each example alone, no padding, log-softmax gather over its response targets
        manual, n_manual = 0.0, 0
        for ex in exs:
            ids = torch.tensor([ex["input_ids"]])
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)   # (L-1, V)
            for t in range(1, len(ex["input_ids"])):
                if ex["loss_mask"][t]:
                    manual -= logp[t - 1, ex["input_ids"][t]].item()
                    n_manual += 1
    assert n_ref == n_fast == n_manual == sum(len(ex["input_ids"]) - ex["n_prompt"] for ex in exs)
    assert s_ref.item() == pytest.approx(manual, rel=1e-5)
    assert s_fast.item() == pytest.approx(s_ref.item(), rel=1e-5)


def test_packing_equals_separate_examples(tiny):
    model, tok = tiny
    exs = ts.encode_examples(tok, [(r["prompt"], r["response"]) for r in ROWS[:5]])
    rows = ts.pack_examples(exs, max_length=70)
    assert sum(r["n_docs"] for r in rows) == 5 and len(rows) < 5
    assert all(len(r["input_ids"]) <= 70 for r in rows)
    with torch.no_grad():
        s_packed, n_packed = ts.fast_loss_terms(model, ts.collate(rows, tok.pad_token_id))
        s_sep, n_sep = ts.fast_loss_terms(model, ts.collate(exs, tok.pad_token_id))
    assert n_packed == n_sep
    assert s_packed.item() == pytest.approx(s_sep.item(), rel=1e-5)   # no cross-example attention


def test_drop_overlong():
    exs = [{"input_ids": [0] * n, "loss_mask": [0] * n} for n in (3, 5, 8)]
    kept, dropped = ts.drop_overlong(exs, 5)
    assert [len(e["input_ids"]) for e in kept] == [3, 5] and dropped == 1


def test_lr_schedule_values():
    total = 20
    w = ts.warmup_steps_for(total)                     # int(0.1 * 20) = 2
    assert w == 2 and ts.warmup_steps_for(9) == 0 and ts.warmup_steps_for(780) == 78
    f = [ts.lr_factor(s, total, w) for s in range(total + 1)]
    assert f[0] == 0.0 and f[1] == 0.5 and f[2] == 1.0          # linear warmup step/warmup
    assert f[11] == pytest.approx(0.5)                           # p = 9/18: ½(1 + cos π/2)
    assert f[8] == pytest.approx(0.5 * (1 + math.cos(math.pi * 6 / 18)))
    assert f[20] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in zip(f[2:], f[3:]))            # monotone decay after warmup
    assert ts.lr_factor(0, 10, 0) == 1.0                         # no warmup: start at the peak


def test_global_batch_order_is_a_function_of_step():
    n, G = 10, 4                                                 # 2 steps/epoch, 2 examples dropped
    e0 = ts.global_batch_indices(n, G, 0, 0)[0] + ts.global_batch_indices(n, G, 1, 0)[0]
    assert len(set(e0)) == 8
    idx, epoch = ts.global_batch_indices(n, G, 2, 0)
    assert epoch == 1 and idx != ts.global_batch_indices(n, G, 0, 0)[0]
    assert ts.global_batch_indices(n, G, 3, 0) == ts.global_batch_indices(n, G, 3, 0)


def test_step_batches_match_distributed_sampler():
    # the release: DistributedSampler(seed 0, drop_last) on W ranks, per-rank batches of G/W
    from torch.utils.data import DistributedSampler
    N, W, per = 203, 4, 3
    for epoch in range(2):
        ranks = []
        for r in range(W):
            smp = DistributedSampler(range(N), num_replicas=W, rank=r, shuffle=True, seed=0, drop_last=True)
            smp.set_epoch(epoch)
            ranks.append(list(smp))
        for k in range(N // (W * per)):
            release = {i for r in range(W) for i in ranks[r][k * per:(k + 1) * per]}
            assert release == set(ts.global_batch_indices(N, W * per, epoch * (N // (W * per)) + k, 0)[0])


def test_row_layouts(tmp_path):
    assert ts.row_to_pair({"prompt": "p", "response": "r"}, "x") == ("p", "r")
    assert ts.row_to_pair({"extra_info": {"question": "q", "answer": "a"}, "prompt": [{}]}, "x") == ("q", "a")
    msgs = [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]
    assert ts.row_to_pair({"messages": msgs}, "x") == (msgs[:1], "a")
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    path = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist([{"data_source": "openr1", "extra_info": {"question": "q1", "answer": "a1"}}]), path)
    rows, bad = loading.read_records(path)
    assert bad == 0 and ts.row_to_pair(*rows[0]) == ("q1", "a1")


# -----------------------------------------------------------------------------
# every method trains; only adapter tensors change; checkpoints reload to identical logits

def _small_hparams(method):
    fields = {f.name for f in dataclasses.fields(peft_methods.make_config(method))}
    return {"r": 4} if "r" in fields and method not in ("vera",) else {}


@pytest.mark.parametrize("method", sorted(peft_methods.METHODS))
def test_every_method_trains_and_reloads(method, tiny, tiny_dir, tmp_path):
    model, tok = tiny
    data = _write_jsonl(tmp_path / "d.jsonl", ROWS[:4])
    frozen_before, trainable_before = {}, {}

    def after_setup(m):   # snapshot right after apply_peft (PiSSA rewrites W0 at init)
        for n, p in m.named_parameters():
            (trainable_before if p.requires_grad else frozen_before)[n] = p.detach().clone()

    # a fixed batch: the 4 rows form the global batch of every step
    cfg = _cfg(tiny_dir, tmp_path / "run", data, method=method, global_batch=4, micro_batch=4, max_steps=6, epochs=6,
               lr=1e-3 if method == "full" else 3e-3, save_every_steps=0, **_small_hparams(method))
    losses = []
    s = ts.train(cfg, model=model, tokenizer=tok,
                 hooks={"after_setup": after_setup, "after_step": lambda k, row: losses.append(row["loss"])})
    assert all(math.isfinite(x) for x in losses) and len(losses) == 6
    assert losses[-1] < losses[0], f"{method}: loss did not decrease {losses}"
    assert s["n_trainable"] == sum(t.numel() for t in trainable_before.values()) > 0
    after = dict(model.named_parameters())
    assert all(torch.equal(after[n], t) for n, t in frozen_before.items()), "a frozen tensor changed"
    assert any(not torch.equal(after[n], t) for n, t in trainable_before.items()), "nothing trained"
    # reload the final checkpoint onto a fresh copy of the base
    ckpt = Path(s["final_checkpoint"])
    assert ckpt.name == "global_step_6" and (ckpt / "adapter_config.json").exists()
    fresh, _ = loading.load_model(tiny_dir)
    peft_methods.load_adapter(fresh, ckpt)
    batch = ts.collate(ts.encode_examples(tok, [(r["prompt"], r["response"]) for r in ROWS[4:]]), tok.pad_token_id)
    model.eval()
    fresh.eval()
    with torch.no_grad():
        kw = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        torch.testing.assert_close(fresh(**kw).logits, model(**kw).logits, rtol=0, atol=1e-5)


def test_train_options_end_to_end(tiny, tiny_dir, tmp_path):
    """--grad-checkpointing changes nothing numerically; --pack and --loss-mask release run and are recorded."""
    data = _write_jsonl(tmp_path / "d.jsonl", ROWS)
    base = dict(method="lora", dropout=0.0, max_steps=2, save_every_steps=0)
    plain = ts.train(_cfg(tiny_dir, tmp_path / "plain", data, **base))
    gc = ts.train(_cfg(tiny_dir, tmp_path / "gc", data, grad_checkpointing=True, **base))
    assert gc["last_loss"] == pytest.approx(plain["last_loss"], abs=1e-6)
    packed = ts.train(_cfg(tiny_dir, tmp_path / "pack", data, pack=True, global_batch=2, micro_batch=1, **base))
    assert packed["n_train_rows"] < 8 and math.isfinite(packed["last_loss"])
    rel = ts.train(_cfg(tiny_dir, tmp_path / "rel", data, loss_mask="release", **base))
    assert json.loads((tmp_path / "rel" / "config.json").read_text())["loss_mask"] == "release"
    assert rel["first_loss"] != plain["first_loss"]      # different targets -> different loss


# -----------------------------------------------------------------------------
# resume after a kill

@pytest.mark.slow
def test_resume_after_sigkill_matches_uninterrupted_run(tiny_dir, tmp_path):
    data = _write_jsonl(tmp_path / "d.jsonl", ROWS)
    common = dict(method="lora", global_batch=4, micro_batch=2, epochs=15, max_steps=30, save_every_steps=3, lr=5e-3)
    ref = ts.train(_cfg(tiny_dir, tmp_path / "ref", data, **common))
    # the same run as a CLI process, SIGKILLed as soon as its first checkpoint is on disk
    out = tmp_path / "killed"
    argv = [sys.executable, str(REPO / "train_sft.py"), "--model", tiny_dir, "--method", "lora", "--data", data,
            "--global-batch", "4", "--micro-batch", "2", "--epochs", "15", "--max-steps", "30", "--save-every-steps", "3",
            "--lr", "5e-3", "--max-length", "64", "--out", str(out), "--no-progress"]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not (out / "global_step_3").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    killed_at = loading.latest_checkpoint(out)
    assert killed_at is not None and killed_at.name != "global_step_30"
    (out / ".tmp-global_step_99").mkdir()          # debris of a checkpoint write cut by the kill
    res = ts.train(_cfg(tiny_dir, out, data, resume=True, **common))
    assert res["resumed_from"] == str(killed_at) and res["steps"] == 30
    a = load_file(str(Path(ref["final_checkpoint"]) / "adapter.safetensors")) if (
        Path(ref["final_checkpoint"]) / "adapter.safetensors").exists() else None
    if a is None:  # whatever file name peft_methods uses: compare every safetensors file
        a = {f.name + k: v for f in Path(ref["final_checkpoint"]).glob("*.safetensors") for k, v in load_file(str(f)).items()}
        b = {f.name + k: v for f in Path(res["final_checkpoint"]).glob("*.safetensors") for k, v in load_file(str(f)).items()}
    else:
        b = load_file(str(Path(res["final_checkpoint"]) / "adapter.safetensors"))
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    steps = [json.loads(ln)["step"] for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 31))              # lost steps re-logged once, no duplicates


class _Killed(Exception):
    pass


@pytest.mark.parametrize("method", ["adalora", "keeplora", "dora", "full"])
def test_resume_is_exact_for_stateful_methods(method, tiny_dir, tmp_path):
    """In-process 'kill' (an exception after step 5; checkpoints every 2 steps) then --resume:
    the final tensors equal an uninterrupted run's (AdaLoRA's allocation EMAs and masks included)."""
    data = _write_jsonl(tmp_path / "d.jsonl", ROWS)
    common = dict(method=method, epochs=4, max_steps=8, save_every_steps=2, lr=1e-3 if method == "full" else 3e-3)
    ref = ts.train(_cfg(tiny_dir, tmp_path / "ref", data, **common))

    def kill(step, row):
        if step == 5:
            raise _Killed

    with pytest.raises(_Killed):
        ts.train(_cfg(tiny_dir, tmp_path / "cut", data, **common), hooks={"after_step": kill})
    assert loading.latest_checkpoint(tmp_path / "cut").name == "global_step_4"
    res = ts.train(_cfg(tiny_dir, tmp_path / "cut", data, resume=True, **common))
    files = lambda d: {f.name: load_file(str(f)) for f in Path(d).glob("*.safetensors")}  # noqa: E731
    a, b = files(ref["final_checkpoint"]), files(res["final_checkpoint"])
    assert a.keys() == b.keys() and a
    for f in a:
        assert a[f].keys() == b[f].keys()
        for k in a[f]:
            assert torch.equal(a[f][k], b[f][k]), f"{f}:{k}"   # same process: bitwise


# -----------------------------------------------------------------------------
# bad input (acceptance 5)

def test_missing_and_empty_data_file(tiny_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        ts.train(_cfg(tiny_dir, tmp_path / "a", str(tmp_path / "nope.jsonl")))
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="empty"):
        ts.train(_cfg(tiny_dir, tmp_path / "b", str(tmp_path / "empty.jsonl")))


def test_malformed_jsonl_line_named_and_skippable(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n" + '{"prompt": "x", "response": \n' + json.dumps(ROWS[1]) + "\n[1, 2]\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: malformed"):
        loading.read_records(path)
    rows, bad = loading.read_records(path, skip_bad_rows=True)
    assert len(rows) == 2 and bad == 2 and rows[1][1].endswith("bad.jsonl:3")


def test_rows_without_response(tiny_dir, tmp_path):
    data = _write_jsonl(tmp_path / "d.jsonl", ROWS[:4] + [{"prompt": "no answer"}, {"prompt": "x", "response": "  "}])
    with pytest.raises(ValueError, match=r"d\.jsonl:5: row has no response"):
        ts.train(_cfg(tiny_dir, tmp_path / "a", data))
    s = ts.train(_cfg(tiny_dir, tmp_path / "b", data, skip_bad_rows=True, max_steps=1))
    assert s["n_bad_rows"] == 2 and s["n_rows"] == 4


def test_every_sample_too_long(tiny_dir, tmp_path):
    data = _write_jsonl(tmp_path / "d.jsonl", ROWS[:4])
    with pytest.raises(ValueError, match=r"every one of the 4 examples is longer than --max-length 10"):
        ts.train(_cfg(tiny_dir, tmp_path / "a", data, max_length=10))


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tiny, tiny_dir, tmp_path):
    model, tok = tiny
    data = _write_jsonl(tmp_path / "d.jsonl", ROWS[:4])

    def poison(step, row):   # after step 2 (saved), make every trainable tensor NaN
        if step == 2:
            with torch.no_grad():
                for p in model.parameters():
                    if p.requires_grad:
                        p.fill_(float("nan"))

    out = tmp_path / "run"
    with pytest.raises(FloatingPointError, match=r"step 3 .*global_step_2"):
        ts.train(_cfg(tiny_dir, out, data, save_every_steps=1), model=model, tokenizer=tok,
                 hooks={"after_step": poison})
    assert loading.latest_checkpoint(out).name == "global_step_2"
    for f in loading.latest_checkpoint(out).glob("*.safetensors"):
        assert all(torch.isfinite(t).all() for t in load_file(str(f)).values())


def test_occupied_output_dir(tiny_dir, tmp_path):
    data = _write_jsonl(tmp_path / "d.jsonl", ROWS[:4])
    out = tmp_path / "run"
    ts.train(_cfg(tiny_dir, out, data, max_steps=2))
    with pytest.raises(FileExistsError, match=r"a different run .*'lr': \(0\.01, 0\.02\)"):
        ts.train(_cfg(tiny_dir, out, data, max_steps=2, lr=2e-2))
    with pytest.raises(ValueError, match="holds a different run"):
        ts.train(_cfg(tiny_dir, out, data, max_steps=2, lr=2e-2, resume=True))
    with pytest.raises(FileExistsError, match="this run already"):
        ts.train(_cfg(tiny_dir, out, data, max_steps=2))
    s = ts.train(_cfg(tiny_dir, out, data, max_steps=2, lr=2e-2, overwrite=True))
    assert s["steps"] == 2 and json.loads((out / "config.json").read_text())["lr"] == 2e-2
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("not a run")
    with pytest.raises(FileExistsError, match="already holds files"):
        ts.train(_cfg(tiny_dir, tmp_path / "other", data))


def test_hub_id_without_network_is_a_clear_error(monkeypatch):
    import huggingface_hub.constants as hc
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)   # never touch the network in tests
    with pytest.raises(RuntimeError, match=r"could not fetch 'openr1-50k/train\.parquet'.*--data /path"):
        ts.fetch_hub_file("SphereLab/PEFTArena-data", "openr1-50k/train.parquet")
    with pytest.raises(ValueError, match="--hub-file"):
        ts.fetch_hub_file("SphereLab/PEFTArena-data", None)


def test_bad_flags():
    with pytest.raises(ValueError, match="exactly one of --task and --data"):
        ts.resolve_config({"out": "x"})
    with pytest.raises(ValueError, match="unknown train_sft config keys"):
        ts.resolve_config({"out": "x", "task": "toy-math", "learning_rate": 1})
    assert ts.resolve_config({"out": "x", "task": "toy-math", "method": "full"})["lr"] == ts.FULL_FT_DEFAULT_LR
    assert ts.resolve_config({"out": "x", "task": "toy-math", "method": "oft"})["lr"] == ts.PEFT_DEFAULT_LR


# -----------------------------------------------------------------------------
# CLI

@pytest.mark.slow
def test_cli_help():
    r = subprocess.run([sys.executable, str(REPO / "train_sft.py"), "--help"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0
    for flag in ("--block-size", "--loss-mask", "--global-batch", "--resume", "--smoke", "--pack"):
        assert flag in r.stdout


@pytest.mark.slow
def test_cli_smoke(tiny_dir, tmp_path):
    out = tmp_path / "smoke"
    r = subprocess.run([sys.executable, str(REPO / "train_sft.py"), "--smoke", "--model", tiny_dir, "--task",
                        "toy-math", "--out", str(out), "--no-progress"], capture_output=True, text=True,
                       timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4 and math.isfinite(summary["last_loss"])
    assert sorted(p.name for p in out.glob("global_step_*")) == ["global_step_2", "global_step_4"]
    r = subprocess.run([sys.executable, str(REPO / "train_sft.py"), "--smoke", "--model", tiny_dir, "--task",
                        "toy-math", "--out", str(out), "--lr", "1"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "--overwrite" in r.stderr and "Traceback" not in r.stderr


# -----------------------------------------------------------------------------
# benchmark (python tests/test_train_sft.py --bench): our adapters vs HF PEFT, same plain loop.
# Each row runs in its own process so peak memory (CUDA allocator / CPU peak RSS) is per row.

BENCH_SHAPES = {
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False)}
BENCH_HP = {"lora": {"r": 8, "alpha": 16}, "dora": {"r": 8, "alpha": 16}, "oft": {"block_size": 32}, "full": {}}


def _bench_model(shape, method, dev):
    """bf16 frozen base on CUDA (fp32 for Full FT masters), fp32 on CPU; random init except 'toy'."""
    dtype = torch.float32 if (method == "full" or dev.type == "cpu") else torch.bfloat16
    if shape == "toy":
        if (loading.TOY_MODEL_DIR / "config.json").exists():
            return loading.load_model("toy", device=dev, dtype=dtype)[0], "toy"
        return _build_tiny()[0].to(dev, dtype), "toy arch (random: toy_model/ missing)"
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(0)
    with torch.device(dev):
        m = Qwen2ForCausalLM(Qwen2Config(**BENCH_SHAPES[shape], max_position_embeddings=4096))
    return m.to(dtype), f"Qwen2.5-{shape.upper()}-shaped (random)"


def _bench_one(shape, method, impl, device, seq_len, micro_batch, steps):
    """One row: (label, trainable, tokens/s, peak GiB) of `steps` timed optimizer steps after 2 warm-up."""
    dev = loading.pick_device(device)
    model, label = _bench_model(shape, method, dev)
    if method != "full":
        if impl == "ours":
            peft_methods.apply_peft(model, method, peft_methods.make_config(method, **BENCH_HP[method]), adapter_dtype=torch.float32)
        else:   # HF PEFT oracle, adapters upcast to fp32 (its default), same targets
            import peft
            t = list(peft_methods.DEFAULT_TARGETS)
            cfg = {"lora": lambda: peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=t),
                   "dora": lambda: peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, use_dora=True, target_modules=t),
                   "oft": lambda: peft.OFTConfig(oft_block_size=32, r=0, target_modules=t)}[method]()
            model = peft.get_peft_model(model, cfg).base_model.model
    else:
        peft_methods.apply_peft(model, "full")
    model.train()
    model.config.use_cache = False
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (micro_batch, seq_len), generator=g).to(dev)  # (B, T)
    loss_mask = torch.ones_like(ids)
    loss_mask[:, : seq_len // 4] = 0                         # a prompt quarter, not trained
    mb = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "loss_mask": loss_mask}
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.95), weight_decay=0.01)
    lm = ts.CausalLMLoss(model, fast=True)
    ac = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if dev.type == "cuda" else contextlib.nullcontext
    for i in range(2 + steps):
        if i == 2:
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        ts.optimizer_step(lm, [mb], opt, params, lr=1e-5, max_grad_norm=1.0, autocast=ac)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    tok_s = steps * micro_batch * seq_len / (time.perf_counter() - t0)
    return {"label": label, "device": str(dev), "trainable": sum(p.numel() for p in params),
            "tokens_per_s": tok_s, "peak_gib": ts.peak_memory_gib(dev)}


def bench_main(argv=None):
    import argparse
    ap = argparse.ArgumentParser(description="SFT tokens/s and peak memory: train_sft + peft_methods vs HF PEFT")
    ap.add_argument("--bench", action="store_true")
    ap.add_argument("--device", default=None, help="cpu / cuda; None = cuda if available")
    ap.add_argument("--shape", choices=["toy", "1.5b", "7b"], default="toy")
    ap.add_argument("--methods", default="lora,oft,dora,full", help="comma-separated")
    ap.add_argument("--seq-len", type=int, default=256, help="tokens per sequence")
    ap.add_argument("--micro-batch", type=int, default=8, help="sequences per forward")
    ap.add_argument("--steps", type=int, default=5, help="timed optimizer steps (after 2 warm-up steps)")
    ap.add_argument("--out", default="/tmp/bench_sft.md", help="markdown table written here")
    ap.add_argument("--one", nargs=2, metavar=("METHOD", "IMPL"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.one:
        print("BENCH " + json.dumps(_bench_one(a.shape, a.one[0], a.one[1], a.device, a.seq_len, a.micro_batch, a.steps)))
        return
    lines = [f"SFT step throughput: micro-batch {a.micro_batch} x {a.seq_len} tokens, one micro-batch per step, "
             f"{a.steps} timed steps after 2 warm-up; AdamW; fast masked loss; threads {torch.get_num_threads()}",
             "", "| model | device | method | implementation | trainable | tokens/s | peak GiB |", "|---|---|---|---|---|---|---|"]
    for method in a.methods.split(","):
        for impl in (["ours"] if method == "full" else ["ours", "hf-peft"]):
            cmd = [sys.executable, __file__, "--one", method, impl, "--shape", a.shape, "--seq-len", str(a.seq_len),
                   "--micro-batch", str(a.micro_batch), "--steps", str(a.steps)] + (["--device", a.device] if a.device else [])
            r = subprocess.run(cmd, capture_output=True, text=True)
            row = next((json.loads(l[6:]) for l in r.stdout.splitlines() if l.startswith("BENCH ")), None)
            name = "train_sft + peft_methods" if impl == "ours" else "same loop + HF PEFT"
            if row is None:
                err = (r.stderr.strip().splitlines() or ["?"])[-1][:120]
                lines.append(f"| {a.shape} | {a.device or 'auto'} | {method} | {name} | - | failed: {err} | - |")
            else:
                lines.append(f"| {row['label']} | {row['device']} | {method} | {name} | {row['trainable']:,} | "
                             f"{row['tokens_per_s']:,.0f} | {row['peak_gib']:.2f} |")
            print(lines[-1], flush=True)
    Path(a.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {a.out}")


# -----------------------------------------------------------------------------
# token budget, grad checkpointing default, per-rank seeds; the plain step vs accumulation

def test_token_budget_splits_a_micro_batch_with_the_same_loss_and_gradient(tiny):
    """--micro-batch-tokens: a micro-batch over the budget runs as row chunks whose padded size fits,
    and the step's loss and update equal the one-shot micro-batch's (the paper's per-micro-batch
    token mean is kept: each chunk is normalised by its whole micro-batch's target count)."""
    model0, tok = tiny
    pairs = [("a", "b c d e f g"), ("a much longer prompt here", "x"), ("hi", "ok there"), ("q", "r s")]
    mbs = [ts.collate(ts.encode_examples(tok, pairs[:3]), tok.pad_token_id),
           ts.collate(ts.encode_examples(tok, pairs[3:]), tok.pad_token_id)]
    B, T = mbs[0]["input_ids"].shape
    res = []
    for budget in (0, T + 1):        # T + 1 tokens: one row per forward
        model = copy.deepcopy(model0).train()
        lm = ts.CausalLMLoss(model)
        seen = []
        h = lm.register_forward_pre_hook(lambda m, a, kw: seen.append(tuple(kw["input_ids"].shape)),
                                         with_kwargs=True)
        params = [p for p in model.parameters() if p.requires_grad]
        r = ts.optimizer_step(lm, mbs, torch.optim.SGD(params, lr=1.0), params, lr=1.0,
                              max_grad_norm=0.0, max_tokens=budget)
        h.remove()
        res.append((r, model, seen))
    assert res[0][2] == [tuple(mb["input_ids"].shape) for mb in mbs]
    assert len(res[1][2]) == B + 1 and all(b * t <= T + 1 for b, t in res[1][2]), res[1][2]
    assert res[1][0]["loss"] == pytest.approx(res[0][0]["loss"], rel=1e-6)
    for (n, a), b in zip(res[0][1].named_parameters(), res[1][1].parameters()):
        assert torch.allclose(a, b, atol=1e-6), n


def _step_params(model0, step_fn, make_opt=lambda ps: torch.optim.AdamW(ps, lr=1e-2, betas=(0.9, 0.95))):
    """A copy of model0 (all tensors trainable) after one step_fn(loss_module, params, optimizer)
    -> (its result, the updated tensors)."""
    model = copy.deepcopy(model0).train()
    params = [p for p in model.parameters() if p.requires_grad]
    res = step_fn(ts.CausalLMLoss(model), params, make_opt(params))
    return res, [p.detach().clone() for p in params]


def test_one_micro_batch_step_is_the_plain_step(tiny):
    """The plain path, written out (Σ masked CE / (N + 1e-8), backward, clip at 1.0, AdamW), equals
    optimizer_step on one micro-batch bit for bit."""
    model0, tok = tiny
    mb = ts.collate(ts.encode_examples(tok, [("a", "b c d"), ("a longer prompt", "x y")]), tok.pad_token_id)

    def plain(lm, params, opt):
        ce_sum, n = lm(**mb)
        (ce_sum / (n + 1e-8)).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        return ce_sum.item() / (n + 1e-8)

    ref_loss, ref = _step_params(model0, plain)
    res, got = _step_params(model0, lambda lm, params, opt: ts.optimizer_step(lm, [mb], opt, params, lr=1e-2,
                                                                               max_grad_norm=1.0))
    assert res["loss"] == pytest.approx(ref_loss, rel=1e-6) and not res["skipped"]
    assert all(torch.equal(a, b) for a, b in zip(ref, got))


def test_grad_accumulation_equals_one_big_micro_batch(tiny):
    """--loss-norm token: two micro-batches of 2 rows accumulate the gradient of one micro-batch of 4
    (with --loss-norm micro they differ by design: the paper's mean of per-micro-batch means). SGD
    with lr 1, as in the token-budget test: the update is the gradient itself."""
    model0, tok = tiny
    exs = ts.encode_examples(tok, [("a", "b c d"), ("a longer prompt", "x"), ("hi", "ok there"), ("q", "r s")])
    one = [ts.collate(exs, tok.pad_token_id)]
    two = [ts.collate(exs[:2], tok.pad_token_id), ts.collate(exs[2:], tok.pad_token_id)]
    step = lambda mbs: lambda lm, params, opt: ts.optimizer_step(  # noqa: E731
        lm, mbs, opt, params, lr=1.0, max_grad_norm=0.0, loss_norm="token")
    sgd = lambda ps: torch.optim.SGD(ps, lr=1.0)  # noqa: E731
    (r1, p1), (r2, p2) = _step_params(model0, step(one), sgd), _step_params(model0, step(two), sgd)
    assert r1["loss"] == pytest.approx(r2["loss"], rel=1e-6) and r1["n_targets"] == r2["n_targets"]
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(p1, p2))


def test_grad_checkpointing_defaults_on_for_real_models():
    base = {"out": "/tmp/x", "data": "d.jsonl"}
    assert ts.resolve_config({**base, "model": "/models/Qwen2.5-7B"})["grad_checkpointing"] is True
    assert ts.resolve_config({**base, "model": "toy"})["grad_checkpointing"] is False
    assert ts.resolve_config({**base, "model": "/m", "grad_checkpointing": False})["grad_checkpointing"] is False


_RANK_SCRIPT = r"""
import json, os, sys, torch
sys.path.insert(0, {repo!r})
import train_sft
def after_setup(model):
    r = int(os.environ["RANK"])
    with open(os.path.join({out!r}, f"rank{{r}}.json"), "w") as f:
        json.dump(torch.rand(8).tolist(), f)
    raise SystemExit(0)
train_sft.train({cfg!r}, hooks={{"after_setup": after_setup}})
"""


@pytest.mark.slow
def test_ddp_ranks_draw_different_dropout_streams(tiny_dir, tmp_path):
    """Under torchrun (2 CPU ranks, gloo) each rank's random stream (dropout masks) is seeded
    seed + rank; with one seed everywhere both ranks drew the same masks."""
    data = _write_jsonl(tmp_path / "d.jsonl", ROWS)
    cfg = _cfg(tiny_dir, tmp_path / "run", data, dropout=0.1)
    script = tmp_path / "ranks.py"
    script.write_text(_RANK_SCRIPT.format(repo=str(REPO), out=str(tmp_path), cfg=cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_port", str(29500 + os.getpid() % 1000), str(script)],
                       env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0 != r1


if __name__ == "__main__":
    bench_main(sys.argv[1:])
