"""The vLLM path end to end on CPU, through tests/vllm_double.py (vLLM 0.34.0's API over a
transformers model): evaluate.py --backend vllm on the real suites' fixtures, train_grpo.py
--sampler vllm, rewind.py --eval real; regression tests of issue 14 items 1, 5, 8, 10-14 (each fails
on commit 0fe9550) and checks of the double itself.
"""
import inspect
import json
import math
from pathlib import Path

import pytest
import torch

import arena
import evaluate as ev
from loading import ConfigError, load_model, load_tokenizer
import peft_methods as pm
import rewind
import train_grpo as tg
from toy_world import build_random_toy_model

FIX = Path(__file__).parent / "fixtures" / "eval"
NQ = f"nq={FIX / 'nq' / 'nq-test.qa.csv'}"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A random-init Qwen2-shaped model (the toy architecture, 2 layers, tied embeddings) on disk."""
    model, tok = build_random_toy_model(seed=0, num_hidden_layers=2)
    d = tmp_path_factory.mktemp("tiny_qwen2")
    model.save_pretrained(d, safe_serialization=True)
    tok.save_pretrained(d)
    return d


def _adapter(tiny_dir, out: Path) -> Path:
    """A LoRA adapter on tiny_dir with visibly non-zero weights."""
    base, _, _ = ev._load_for_eval(str(tiny_dir), None, dtype="float32", device="cpu")
    pm.apply_peft(base, "lora", r=4, alpha=8)
    torch.manual_seed(1)
    for p in base.parameters():
        if p.requires_grad:
            p.data.normal_(0, 0.3)
    pm.save_adapter(base, out, base_model=str(tiny_dir))
    return out


def _eval_argv(tiny_dir, out, suite="all", *extra):
    return ["--model", str(tiny_dir), "--suite", suite, "--data-dir", str(FIX), "--out", str(out),
            "--limit", "2", "--max-new-tokens", "3", "--num-samples", "2", "--path", NQ, *extra]


def _grpo_cfg(tiny_dir, out, **kw):
    return dict(dict(model=str(tiny_dir), task="toy-math", method="lora", sampler="vllm", smoke=True,
                     out=str(out), no_progress=True), **kw)


def _metrics(out) -> list[dict]:
    return [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines() if x.strip()]


# -----------------------------------------------------------------------------
# the double enforces vLLM 0.34.0's API

def test_double_rejects_what_vllm_rejects(vllm_double, tiny_dir):
    vd = vllm_double
    with pytest.raises(TypeError, match="unexpected keyword argument 'max_num_tokens'"):
        vd.LLM(model=str(tiny_dir), max_num_tokens=10)
    with pytest.raises(TypeError, match="Unexpected keyword argument 'max_new_tokens'"):
        vd.SamplingParams(max_new_tokens=3)
    with pytest.raises(vd.VLLMValidationError, match="n must be 1 when using greedy"):
        vd.SamplingParams(n=2, temperature=0.0)
    assert not issubclass(vd.VLLMValidationError, ValueError)
    with pytest.raises(ValueError, match="greater than the derived max_model_len"):
        vd.LLM(model=str(tiny_dir), max_model_len=100000)
    with pytest.raises(ValueError, match=r"max_num_batched_tokens \(64\) must be greater than or equal to max_num_seqs \(128\)"):
        vd.LLM(model=str(tiny_dir), max_num_batched_tokens=64, max_num_seqs=128)
    llm = vd.LLM(model=str(tiny_dir), gpu_memory_utilization=0.6, enable_sleep_mode=True)
    with pytest.raises(ValueError, match="less than desired GPU memory utilization"):
        vd.LLM(model=str(tiny_dir), gpu_memory_utilization=0.6)        # the first one holds 0.6
    llm.sleep(level=1)
    with pytest.raises(RuntimeError, match="sleeping engine"):
        llm.generate([{"prompt_token_ids": [5, 6]}], vd.SamplingParams(max_tokens=2))
    assert llm.wake_up(tags=["weights"]) is False and llm.wake_up(tags=["kv_cache"]) is True
    out = llm.generate([{"prompt_token_ids": [5, 6]}], vd.SamplingParams(max_tokens=3, temperature=0))
    assert len(out) == 1 and 1 <= len(out[0].outputs[0].token_ids) <= 3
    assert vd.live_engines() == [llm]
    ev.shutdown_vllm(llm)
    assert vd.live_engines() == []


def test_double_greedy_matches_transformers(vllm_double, tiny_dir):
    """The double decodes like the HF backend (greedy, fp32): the same texts for the same prompts."""
    model, tok = load_model(str(tiny_dir), dtype="float32", device="cpu")
    prompts = [tok.apply_chat_template([{"role": "user", "content": "word " * (i + 1)}], tokenize=False,
                                       add_generation_prompt=True) for i in range(3)]
    llm = vllm_double.LLM(model=str(tiny_dir))
    hf = ev.generate(model, tok, prompts, max_new_tokens=6)
    vl = ev.generate(None, tok, prompts, max_new_tokens=6, backend="vllm", vllm_llm=llm)
    assert hf == vl
    ev.shutdown_vllm(llm)


# -----------------------------------------------------------------------------
# Acceptance 2: evaluate.py --backend vllm on all three real suites, train_grpo.py --sampler vllm

def test_evaluate_vllm_backend_all_real_suites_on_fixtures(vllm_double, tiny_dir, tmp_path):
    res = ev.main(_eval_argv(tiny_dir, tmp_path / "v", "all", "--backend", "vllm"))
    assert res["backend"] == "vllm"
    assert set(res["benchmarks"]) == {"math500", "aime24", "amc23", "m1", "ifeval", "bbh", "nq"}
    assert {"target_score", "general_score"} <= set(res) and set(res["target_scores"]) == {"math", "med"}
    assert res["benchmarks"]["math500"]["n_samples"] == 2
    assert len(vllm_double.CREATED) == 1 and vllm_double.live_engines() == []
    # greedy benchmarks score the same through the HF backend (same model, same prompts)
    hf = ev.main(_eval_argv(tiny_dir, tmp_path / "h", "all", "--backend", "hf"))
    for b in ("m1", "ifeval", "bbh", "nq"):
        assert res["benchmarks"][b]["score"] == hf["benchmarks"][b]["score"], b
    rows = [json.loads(x) for x in (tmp_path / "v" / "generations" / "bbh.jsonl").read_text().splitlines()]
    rows_hf = [json.loads(x) for x in (tmp_path / "h" / "generations" / "bbh.jsonl").read_text().splitlines()]
    key = lambda r: (r["prompt_id"], r["sample_index"])   # noqa: E731
    assert [r["text"] for r in sorted(rows, key=key)] == [r["text"] for r in sorted(rows_hf, key=key)]


@pytest.mark.parametrize("method", ["lora", "full"])
def test_train_grpo_vllm_sampler_end_to_end(vllm_double, tiny_dir, tmp_path, monkeypatch, method):
    # a reward with spread (even/odd response length) so groups train and logps are compared
    monkeypatch.setattr(tg, "make_reward_fn", lambda domain: (lambda resp, ans: float(len(resp) % 2)))
    s = tg.train(_grpo_cfg(tiny_dir, tmp_path / method, method=method, group_size=4))
    assert s["steps"] == 2
    cfg = json.loads((tmp_path / method / "config.json").read_text())
    assert cfg["sampler_used"] == "vllm"
    assert len(vllm_double.CREATED) == 1 and vllm_double.live_engines() == []
    diffs = [m["sampler_logp_diff"] for m in _metrics(tmp_path / method)]
    got = [d for d in diffs if d is not None]
    assert got and all(0 <= d < 1e-3 for d in got), diffs   # fp32 trainer vs fp32 double: in sync


# -----------------------------------------------------------------------------
# item 1: per-prompt seeds from real (non-hex) ids

def test_item1_vllm_sampling_seed_from_real_item_ids(vllm_double, tiny_dir):
    llm = vllm_double.LLM(model=str(tiny_dir))
    tok = llm.get_tokenizer()
    prompts = ["a b c", "d e f", "a b c"]
    ids = ["math500-0", "m1-MedQA-12", "ifeval-1000"]
    a = ev.generate(None, tok, prompts, max_new_tokens=4, temperature=1.0, n=2, seed=3, prompt_ids=ids,
                    backend="vllm", vllm_llm=llm)
    b = ev.generate(None, tok, prompts, max_new_tokens=4, temperature=1.0, n=2, seed=3, prompt_ids=ids,
                    backend="vllm", vllm_llm=llm)
    assert a == b and len(a) == 3 and all(len(x) == 2 for x in a)
    assert ev.prompt_seed(3, "math500-0") != ev.prompt_seed(3, "math500-1")
    assert ev.prompt_seed(3, "math500-0") == ev.prompt_seed(3, "math500-0") < 2 ** 31
    ev.shutdown_vllm(llm)


# -----------------------------------------------------------------------------
# item 5: engine constraints; --vllm-sleep wakes before every rollout

def test_item5_batched_tokens_cover_num_seqs(vllm_double, tiny_dir):
    # 1024 prompts x G 8 = 8192 sequences per step, 512-token context
    llm = tg.make_vllm_engine(str(tiny_dir), max_model_len=512, max_num_seqs=8192, seed=0)
    assert llm.kwargs["max_num_batched_tokens"] >= 8192
    ev.shutdown_vllm(llm)


def test_item5_sleep_mode_wakes_when_no_optimiser_step_was_made(vllm_double, tiny_dir, tmp_path, monkeypatch):
    # no optimiser step in any rollout (as when every step's gradient is non-finite): no weight push
    monkeypatch.setattr(tg, "_optimise", lambda *a, **k: {"optimizer_steps": 0})
    s = tg.train(_grpo_cfg(tiny_dir, tmp_path / "g", vllm_sleep=True))
    assert s["steps"] == 2 and s["optimizer_steps"] == 0
    assert vllm_double.CREATED[0].n_generate_calls == 2


# -----------------------------------------------------------------------------
# item 8: no toy defaults on a real model unless asked

def test_item8_evaluate_real_model_needs_a_suite(tiny_dir, tmp_path):
    with pytest.raises(SystemExit, match="--suite is required"):
        ev.main(["--model", str(tiny_dir), "--out", str(tmp_path / "e"), "--n-per-family", "1",
                 "--max-new-tokens", "1"])
    res = ev.main(["--model", str(tiny_dir), "--suite", "toy", "--out", str(tmp_path / "t"),
                   "--n-per-family", "1", "--max-new-tokens", "1", "--families", "math"])
    assert res["suite"] == "toy"      # toy items on a real model when asked


def test_item8_train_grpo_real_model_needs_data(tiny_dir, tmp_path):
    with pytest.raises(ConfigError, match="--data is required for a real model") as e:
        tg.resolve_config({"model": str(tiny_dir), "out": str(tmp_path / "g")})
    assert e.value.field == "data"
    assert tg.resolve_config({"model": str(tiny_dir), "task": "toy-math"})["task"] == "toy-math"
    assert tg.resolve_config({})["task"] == "toy-math"          # the toy base keeps its default


def test_item8_rewind_toy_eval_refused_for_a_real_base(tmp_path):
    base, run = rewind.make_smoke_run(tmp_path / "smoke")      # a real (non-'toy') --base folder
    with pytest.raises(SystemExit, match="real model"):
        rewind.main(["--base", str(base), "--checkpoint", str(run), "--eval", "toy", "--grid", "0,1",
                     "--n-per-family", "1", "--max-train-points", "1", "--out", str(tmp_path / "r")])
    assert rewind.build_parser().parse_args(["--base", "x"]).eval is None   # resolved: real for a real base


# -----------------------------------------------------------------------------
# item 10: one engine per process, freed; memory freed first; max_model_len from the prompts

def _arena_cfg(backend="vllm"):
    return {"dtype": None, "device": None,
            "eval": {"suite": "real", "batch_size": 8, "seed": 0, "max_new_tokens": 3, "data_dir": str(FIX),
                     "backend": backend, "limit": 2, "num_samples": 2, "temperature": None,
                     "bbh_prompt_dir": None, "paths": {"nq": str(FIX / "nq" / "nq-test.qa.csv")},
                     "allow_hub": False}}


def test_item10_arena_scores_both_suites_with_one_engine_then_frees_it(vllm_double, tiny_dir, tmp_path):
    r = arena.evaluate_model(str(tiny_dir), None, "math", _arena_cfg(), tmp_path / "cell")
    assert r["target"] is not None and r["general"] is not None
    assert len(vllm_double.CREATED) == 1            # math and general suites: one engine
    assert vllm_double.live_engines() == []          # freed with vLLM's teardown at the end


def test_item10_arena_passes_the_memory_share(tiny_dir, tmp_path):
    cfg = _arena_cfg()
    cfg["eval"]["vllm_gpu_memory_utilization"] = 0.4
    argv = arena._eval_argv(str(tiny_dir), None, "math", "math", cfg["eval"], cfg, tmp_path)
    assert argv[argv.index("--vllm-gpu-memory-utilization") + 1] == "0.4"
    assert ev.build_parser().parse_args(argv).vllm_gpu_memory_utilization == 0.4
    assert "--vllm-gpu-memory-utilization" not in arena._eval_argv(str(tiny_dir), None, "math", "math",
                                                                   _arena_cfg()["eval"], cfg, tmp_path)


def test_item10_max_model_len_and_memory_share(vllm_double, tiny_dir, tmp_path):
    ev.main(_eval_argv(tiny_dir, tmp_path / "e", "general", "--backend", "vllm",
                       "--vllm-gpu-memory-utilization", "0.4"))
    llm = vllm_double.CREATED[0]
    assert llm.kwargs["gpu_memory_utilization"] == 0.4
    # the longest rendered prompt + 3 new tokens, not the model's 512
    tok = load_tokenizer(str(tiny_dir))
    longest = 0
    for n in ("ifeval", "bbh", "nq"):
        items = ev.load_benchmark(n, FIX, FIX / "nq" / "nq-test.qa.csv" if n == "nq" else None, limit=2)
        raw = n == "bbh" and not ev.is_instruct(str(tiny_dir))
        longest = max([longest] + [len(tok(ev.render_prompt(tok, it, raw=raw), add_special_tokens=False).input_ids)
                                   for it in items])
    assert llm.max_model_len == longest + 3 < 512


def test_item10_cuda_cache_freed_before_the_engine_is_built(vllm_double, tiny_dir, monkeypatch):
    events = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: events.append(("empty_cache", len(vllm_double.CREATED))))
    llm = ev.make_vllm_engine(str(tiny_dir), max_model_len=64)
    assert ("empty_cache", 0) in events              # before the engine existed
    ev.shutdown_vllm(llm)
    events.clear()
    llm = tg.make_vllm_engine(str(tiny_dir), max_model_len=64, max_num_seqs=8, seed=0)
    assert ("empty_cache", 1) in events              # the GRPO sampler's engine likewise
    ev.shutdown_vllm(llm)


# -----------------------------------------------------------------------------
# item 11: adapters are not written to disk as merged models

def test_item11_adapter_scored_without_a_merged_copy_on_disk(vllm_double, tiny_dir, tmp_path):
    ad = _adapter(tiny_dir, tmp_path / "ad")
    out = tmp_path / "v"
    res = ev.main(_eval_argv(tiny_dir, out, "general", "--backend", "vllm", "--adapter", str(ad)))
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert not any(p.endswith((".safetensors", ".bin")) for p in written), written
    assert not (out / "merged_model").exists()
    # the pushed weights are the adapter's: same greedy answers as the HF backend with the adapter
    hf = ev.main(_eval_argv(tiny_dir, tmp_path / "h", "general", "--backend", "hf", "--adapter", str(ad)))
    plain = ev.main(_eval_argv(tiny_dir, tmp_path / "p", "general", "--backend", "hf"))
    texts = lambda d: sorted((json.loads(x)["prompt_id"], json.loads(x)["text"])   # noqa: E731
                             for x in (d / "generations" / "bbh.jsonl").read_text().splitlines())
    assert texts(out) == texts(tmp_path / "h") != texts(tmp_path / "p")
    assert res["benchmarks"]["nq"]["score"] == hf["benchmarks"]["nq"]["score"]
    assert vllm_double.live_engines() == []


# -----------------------------------------------------------------------------
# item 12: the GRPO push streams by layer, checks vLLM's loaded names; logp diff None when unmeasured

def test_item12_weight_push_streams_one_layer_at_a_time(vllm_double, tiny_dir, tmp_path):
    tg.train(_grpo_cfg(tiny_dir, tmp_path / "g", method="lora"))
    calls = vllm_double.CREATED[0].llm_engine.engine_core.load_calls
    # two pushes (start, after step 1), each: embed_tokens | layer 0 (12 tensors: q/k/v weight+bias,
    # o, gate/up/down, 2 norms) | layer 1 | final norm | tied lm_head (skipped by vLLM: 0 loaded)
    assert sorted(calls) == sorted([1, 12, 12, 1, 0] * 2), calls
    assert max(calls) <= 12 and len(calls) >= 2 * 4   # per call: at most one decoder layer


def test_item12_a_weight_vllm_did_not_load_is_an_error(vllm_double, tiny_dir, tmp_path, monkeypatch):
    real = vllm_double._WorkerModel.load_weights

    def drops_o_proj(self, weights):   # as vLLM does with names it ignores (e.g. stray '.bias')
        return real(self, ((k, v) for k, v in weights if "o_proj" not in k))
    monkeypatch.setattr(vllm_double._WorkerModel, "load_weights", drops_o_proj)
    with pytest.raises(RuntimeError, match="vLLM did not load 2 of the"):
        tg.train(_grpo_cfg(tiny_dir, tmp_path / "g", method="full"))
    assert vllm_double.live_engines() == []          # freed on the error path too


def test_item12_sampler_logp_diff_is_none_when_nothing_was_compared(vllm_double, tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(tg, "make_reward_fn", lambda domain: (lambda resp, ans: 0.0))   # every group skipped
    tg.train(_grpo_cfg(tiny_dir, tmp_path / "g"))
    ms = _metrics(tmp_path / "g")
    assert len(ms) == 2 and all(m["sampler_logp_diff"] is None for m in ms)


# -----------------------------------------------------------------------------
# item 13: the dead LoRARequest path is gone

def test_item13_no_vllm_lora_request_path():
    for f in (ev.generate, ev.generate_records, ev._vllm_generate_chunk):
        assert "lora_dir" not in inspect.signature(f).parameters
    assert "LoRARequest" not in inspect.getsource(ev)


# -----------------------------------------------------------------------------
# item 14: rewind.py scores real suites, one engine across points

def test_item14_rewind_scores_real_suites_with_one_engine(vllm_double, tmp_path):
    base, run = rewind.make_smoke_run(tmp_path / "smoke")
    res = rewind.main(["--base", str(base), "--checkpoint", str(run), "--eval", "real", "--suite", "all",
                       "--data-dir", str(FIX), "--path", NQ, "--limit", "1", "--max-new-tokens", "2",
                       "--num-samples", "2", "--grid", "0,0.5,1", "--backend", "vllm", "--max-train-points", "1",
                       "--out", str(tmp_path / "r")])
    pts = [res["base"]] + res["runs"][0]["points"]
    assert len(pts) >= 3 and all(p["target"] is not None and p["general"] is not None for p in pts)
    assert set(res["base"]["families"]) == {"math500", "aime24", "amc23", "m1", "ifeval", "bbh", "nq"}
    assert len(vllm_double.CREATED) == 1 and vllm_double.live_engines() == []
    assert sum(vllm_double.CREATED[0].llm_engine.engine_core.load_calls) > 0   # points pushed in
    assert {p["kind"] for p in res["runs"][0]["points"]} >= {"path", "final"}
    # each point's pushed weights reached the engine: the points' generations (per-point caches) differ
    gens = tmp_path / "r" / "generations"
    texts = {d.name: (d / "bbh.jsonl").read_text() for d in gens.rglob("*") if (d / "bbh.jsonl").is_file()}
    assert len(texts) == 3 and len(set(texts.values())) > 1, sorted(texts)   # base, alpha 0.5, final
