"""evaluate.py beyond the scorers: benchmark loaders on hub-format fixtures
(tests/fixtures/eval), missing-data messages, generation (batched greedy == one by one, stop
strings, seeded sampling, JSONL cache reuse and resume), the toy suite's aggregation, and the CLI
end to end on a tiny random Qwen2. CPU, a 2-layer toy-architecture model.

Run: python -m pytest tests/test_evaluate_gen.py -x -q
"""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

import evaluate as ev
import graders as gr
import peft_methods as pm
import toy_world as tw

FIX = Path(__file__).parent / "fixtures" / "eval"
REPO = Path(__file__).resolve().parents[1]


# -----------------------------------------------------------------------------
# Loaders (exact hub formats)

def test_load_math_benchmarks():
    m = ev.load_benchmark("math500", FIX)
    assert [it["gold"] for it in m] == [r"\frac{1}{2}", "3", "[0,1)"]
    assert m[0]["prompt"].startswith("Question: What is") and m[0]["prompt"].endswith("\nAnswer:")
    assert m[0]["subtask"] == "Prealgebra" and m[0]["scorer"] == "math"
    assert gr.grade_math(r"\boxed{0.5}", m[0]["gold"])
    aime = ev.load_benchmark("aime24", FIX)
    assert [it["gold"] for it in aime] == ["024", "009"]
    assert gr.grade_math(r"\boxed{24}", aime[0]["gold"])          # zero-padded gold
    amc = ev.load_benchmark("amc23", FIX)
    assert [it["gold"] for it in amc] == ["27.0", "7.0"]
    assert gr.grade_math(r"\boxed{27}", amc[0]["gold"])           # float gold
    assert len(ev.load_benchmark("math500", FIX, limit=2)) == 2


def test_load_parquet_hub_files():
    pytest.importorskip("pyarrow")
    aime = ev.load_benchmark("aime24", None, FIX / "aime_2024/data/train-00000-of-00001.parquet")
    assert [it["gold"] for it in aime] == ["024", "009"] and aime[0]["id"] == "aime24-60"
    gsm = ev.load_benchmark("gsm8k", FIX)
    assert [it["gold"] for it in gsm] == ["7", "2400"]              # after '####', commas removed
    nq = ev.load_benchmark("nq", FIX)
    assert nq[1]["gold"] == ["William Shakespeare", "Shakespeare"]


def test_load_m1_ifeval_bbh_nq_tsv():
    med = ev.load_benchmark("m1", FIX)
    assert [it["subtask"] for it in med] == ["MedQA_USLME_test"] * 2 + ["MedXpertQA"]
    assert med[0]["gold"] == "C" and med[0]["options"]["C"] == "Vitamin C"
    assert "\nA. Vitamin A\nB. Vitamin B12" in med[0]["prompt"]
    assert med[0]["prompt"].endswith(ev.BOXED_INSTRUCTION)
    assert gr.score_item(med[2], r"The final answer is \boxed{J}") == 1.0
    ife = ev.load_benchmark("ifeval", FIX)
    assert len(ife) == 3 and ife[0]["instruction_id_list"] == ["punctuation:no_comma", "startend:end_checker"]
    assert ife[0]["kwargs"][1]["end_phrase"] == "Is there anything else?" and ife[0]["kwargs"][1]["num_words"] is None
    assert gr.score_item(ife[0], "Tea is warm and calm. Is there anything else?") == 1.0
    bbh = ev.load_bbh("bbh", FIX)
    assert sorted({it["subtask"] for it in bbh}) == ["boolean_expressions", "date_understanding"]
    p = bbh[0]["prompt"]
    assert p.startswith("Follow the given examples and answer the question.\nEvaluate the result")
    assert p.endswith("\n\nQ: not ( True and False ) is\nA: Let's think step by step.")
    assert gr.score_item(bbh[2], "Yesterday was 2020-01-01. So the answer is (A).") == 1.0
    assert len(ev.load_benchmark("bbh", FIX, limit=1)) == 2                 # one per task
    nq = ev.load_benchmark("nq", None, FIX / "nq/nq-test.qa.csv")
    assert nq[0]["gold"] == ["Paris"] and nq[0]["prompt"].endswith("Q: what is the capital city of france?")


def test_missing_dataset_message_names_hub_id_file_and_format(tmp_path):
    with pytest.raises(ev.DatasetMissing) as e:
        ev.load_benchmark("math500", tmp_path)
    msg = str(e.value)
    assert "HuggingFaceH4/MATH-500" in msg and "math500/test.jsonl" in msg and "JSONL" in msg
    with pytest.raises(ev.DatasetMissing) as e:
        ev.load_benchmark("bbh", tmp_path)
    assert "cot-prompts" in str(e.value)
    with pytest.raises(ev.DatasetMissing) as e:
        ev.load_benchmark("ifeval", None)
    assert "google/IFEval" in str(e.value)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"problem": "x"}\n')
    with pytest.raises(ValueError, match="missing field"):
        ev.load_benchmark("math500", None, bad)


# -----------------------------------------------------------------------------
# Generation (tiny random model)

@pytest.fixture(scope="module")
def tiny():
    return tw.build_random_toy_model(seed=0, num_hidden_layers=2)


def _prompts(tok, k=5):
    return [tok.apply_chat_template([{"role": "user", "content": "word " * (i + 1)}], tokenize=False,
                                    add_generation_prompt=True) for i in range(k)]


def test_batched_greedy_equals_one_by_one_and_stop_strings(tiny):
    model, tok = tiny
    prompts = _prompts(tok, 3)
    one = ev.generate(model, tok, prompts, max_new_tokens=5, batch_size=1)
    many = ev.generate(model, tok, prompts, max_new_tokens=5, batch_size=3)
    assert one == many and all(len(s) == 1 for s in one)
    # a stop string cut from the greedy text truncates it there
    recs = ev.generate_records(model, tok, prompts[:1], max_new_tokens=5)
    text = recs[0][0]["text"]
    assert recs[0][0]["num_tokens"] <= 5
    if len(text) >= 3:
        stop = text[1:3]
        cut = ev.generate_records(model, tok, prompts[:1], max_new_tokens=5, stop=[stop])[0][0]
        assert cut["text"] == text[: text.find(stop)] and cut["finish"] == "stop"
    assert ev.truncate_at_stop("abc\n\nQuestion: x", ["\n\nQuestion:"]) == ("abc", True)


def test_fast_greedy_loop_matches_transformers_generate(tiny):
    """greedy_decode (fast path) vs model.generate (reference): same tokens, same stops."""
    model, tok = tiny
    prompts = _prompts(tok, 4)
    fast = ev.generate_records(model, tok, prompts, max_new_tokens=6, batch_size=4)
    ref = ev.generate_records(model, tok, prompts, max_new_tokens=6, batch_size=4, greedy_impl="hf")
    assert [[(r["text"], r["num_tokens"]) for r in rows] for rows in fast] == \
        [[(r["text"], r["num_tokens"]) for r in rows] for rows in ref]
    # stop strings: both paths cut at the same place
    text = fast[0][0]["text"]
    if len(text) >= 3:
        stop = [text[2]]
        a = ev.generate_records(model, tok, prompts, max_new_tokens=6, stop=stop)
        b = ev.generate_records(model, tok, prompts, max_new_tokens=6, stop=stop, greedy_impl="hf")
        assert [r[0]["text"] for r in a] == [r[0]["text"] for r in b]


def test_fast_greedy_eos_and_padding_match_generate(tiny):
    import torch
    from transformers import GenerationConfig
    model, tok = tiny
    prompts = _prompts(tok, 4)
    enc = tok(prompts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    ids, attn = enc["input_ids"], enc["attention_mask"]
    T = ids.shape[1]
    free = ev.greedy_decode(model, ids, attn, max_new_tokens=6, eos_ids=[], pad_id=tok.pad_token_id)
    eos = int(free[0, 2])  # the token row 0 emits at step 3 becomes "EOS"
    fast = ev.greedy_decode(model, ids, attn, max_new_tokens=6, eos_ids=[eos], pad_id=tok.pad_token_id)
    gc = GenerationConfig(max_new_tokens=6, do_sample=False, eos_token_id=[eos], pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        ref = model.generate(input_ids=ids, attention_mask=attn, generation_config=gc)[:, T:]
    assert torch.equal(fast, ref)
    for row in fast.tolist():
        if eos in row:  # after its EOS a row only holds padding
            assert all(t == tok.pad_token_id for t in row[row.index(eos) + 1:])


def test_sampling_is_seeded_and_gives_n_samples(tiny):
    model, tok = tiny
    prompts = _prompts(tok, 2)
    a = ev.generate(model, tok, prompts, max_new_tokens=5, temperature=1.0, top_p=0.9, n=3, seed=1)
    b = ev.generate(model, tok, prompts, max_new_tokens=5, temperature=1.0, top_p=0.9, n=3, seed=1)
    assert a == b and all(len(s) == 3 for s in a)
    assert len({s for ss in a for s in ss}) > 1  # random weights, T=1: samples differ
    with pytest.raises(ValueError):
        ev.generate(model, tok, prompts, max_new_tokens=0)


def test_cache_reuse_and_resume(tiny, tmp_path, monkeypatch):
    model, tok = tiny
    prompts = _prompts(tok, 5)
    ids = [f"p{i}" for i in range(5)]
    full = ev.generate(model, tok, prompts, max_new_tokens=5, batch_size=2, prompt_ids=ids)
    cache = tmp_path / "gen.jsonl"
    # an "interrupted" run: only the first two prompts finished, then a torn line
    ev.generate(model, tok, prompts[:2], max_new_tokens=5, batch_size=2, prompt_ids=ids[:2], cache_path=cache)
    with open(cache, "a") as f:
        f.write('{"prompt_id": "p2", "sample_ind')
    calls = []
    real = ev._hf_generate_chunk

    def counting(model_, tok_, chunk, *a, **k):
        calls.append([c[0] for c in chunk])
        return real(model_, tok_, chunk, *a, **k)

    monkeypatch.setattr(ev, "_hf_generate_chunk", counting)
    resumed = ev.generate(model, tok, prompts, max_new_tokens=5, batch_size=2, prompt_ids=ids, cache_path=cache)
    assert resumed == full
    assert sorted(p for c in calls for p in c) == ["p2", "p3", "p4"]   # only the missing ones
    rows = [json.loads(line) for line in cache.read_text().splitlines()[-3:]]
    assert {"prompt_id", "sample_index", "text", "num_tokens", "settings"} <= set(rows[0])
    # re-scoring never regenerates
    calls.clear()
    again = ev.generate(model, tok, prompts, max_new_tokens=5, batch_size=2, prompt_ids=ids, cache_path=cache)
    assert again == full and calls == []
    # other settings do not reuse the rows
    ev.generate(model, tok, prompts[:1], max_new_tokens=3, prompt_ids=ids[:1], cache_path=cache)
    assert calls == [["p0"]]


# -----------------------------------------------------------------------------
# Toy suite

def test_evaluate_toy_aggregation_with_scripted_responses(monkeypatch):
    n = 12
    items = {f: tw.make_eval_items(f, "test", n, seed=0) for f in tw.FAMILIES}
    by_id = {it["id"]: it for its in items.values() for it in its}

    def scripted(model, tok, prompts, *, prompt_ids, **kw):
        # the canonical answer for even items, a wrong one for odd items
        out = []
        for k, pid in enumerate(prompt_ids):
            it = by_id[pid]
            out.append([tw.item_response(it) if k % 2 == 0 else "no idea"])
        return out

    monkeypatch.setattr(ev, "generate", scripted)

    class Tok:
        chat_template = None

    res = ev.evaluate_toy(None, Tok(), domain="med", n_per_family=n, base_general=90.0)
    expect = {}
    for fam, its in items.items():
        scores = [gr.score_item(it, tw.item_response(it) if k % 2 == 0 else "no idea") for k, it in enumerate(its)]
        if fam == "bbh":
            subs = {}
            for it, s in zip(its, scores):
                subs.setdefault(it["subtask"], []).append(s)
            expect[fam] = 100 * sum(sum(v) / len(v) for v in subs.values()) / len(subs)
        elif fam == "ifeval":
            slots = [gr.ifeval_slots(it, tw.item_response(it) if k % 2 == 0 else "no idea") for k, it in enumerate(its)]
            expect[fam] = 100 * sum(s["strict"] for ss in slots for s in ss) / sum(map(len, slots))
        else:
            expect[fam] = 100 * sum(scores) / len(scores)
        assert math.isclose(res["families"][fam]["score"], expect[fam]), fam
    assert math.isclose(res["target_score"], expect["med"])
    general = (expect["ifeval"] + expect["bbh"] + expect["nq"]) / 3
    assert math.isclose(res["general_score"], general)
    assert math.isclose(res["forgetting"], 90.0 - general)
    assert 0 < res["general_score"] < 100


def test_evaluate_toy_runs_a_real_model(tiny):
    model, tok = tiny
    res = ev.evaluate_toy(model, tok, n_per_family=2, max_new_tokens=3, batch_size=16)
    assert set(res["families"]) == {"ifeval", "nq", "bbh", "math", "med"}
    assert 0 <= res["target_score"] <= 100 and 0 <= res["general_score"] <= 100
    assert "forgetting" not in res


# -----------------------------------------------------------------------------
# CLI end to end (tiny random model saved to disk, real-format fixtures)

@pytest.fixture(scope="module")
def tiny_dir(tiny, tmp_path_factory):
    model, tok = tiny
    d = tmp_path_factory.mktemp("tiny_model")
    lt = getattr(model.config, "layer_types", None)
    if lt is not None and len(lt) != model.config.num_hidden_layers:  # toy_world shrinks layers after init
        model.config.layer_types = lt[: model.config.num_hidden_layers]
    model.save_pretrained(d, safe_serialization=True)
    tok.save_pretrained(d)
    return d


def test_cli_all_suites_on_fixtures(tiny_dir, tmp_path):
    out = tmp_path / "ev"
    args = ["--model", str(tiny_dir), "--suite", "all", "--data-dir", str(FIX), "--out", str(out),
            "--limit", "2", "--max-new-tokens", "3", "--num-samples", "2", "--backend", "hf",
            "--path", f"nq={FIX / 'nq/nq-test.qa.csv'}", "--base-general", "50"]
    res = ev.main(args)
    saved = json.loads((out / "results.json").read_text())
    assert saved["target_score"] == res["target_score"]
    assert set(saved["benchmarks"]) == {"math500", "aime24", "amc23", "m1", "ifeval", "bbh", "nq"}
    assert saved["benchmarks"]["math500"]["n_items"] == 2 and saved["benchmarks"]["math500"]["n_samples"] == 2
    assert "2" in saved["benchmarks"]["math500"]["pass_at_k"]
    assert set(saved["benchmarks"]["bbh"]["subtasks"]) == {"boolean_expressions", "date_understanding"}
    g = saved["benchmarks"]
    assert math.isclose(saved["general_score"], (g["ifeval"]["score"] + g["bbh"]["score"] + g["nq"]["score"]) / 3)
    assert math.isclose(saved["forgetting"], 50 - saved["general_score"])
    assert saved["benchmarks"]["math500"]["generation"]["temperature"] == 0.6
    assert (out / "config.json").exists() and (out / "generations" / "math500.jsonl").exists()
    # re-running re-scores from the cache: identical results
    res2 = ev.main(args)
    assert res2["benchmarks"]["bbh"]["score"] == res["benchmarks"]["bbh"]["score"]


def test_cli_toy_suite_subprocess(tiny_dir, tmp_path):
    out = tmp_path / "toy"
    r = subprocess.run([sys.executable, str(REPO / "evaluate.py"), "--model", str(tiny_dir), "--suite", "toy",
                        "--n-per-family", "2", "--max-new-tokens", "3", "--out", str(out), "--threads", "1"],
                       capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "target_score=" in r.stdout and "general_score=" in r.stdout
    saved = json.loads((out / "results.json").read_text())
    assert saved["suite"] == "toy" and set(saved["families"]) == {"ifeval", "nq", "bbh", "math", "med"}


def test_cli_help_is_cheap():
    r = subprocess.run([sys.executable, str(REPO / "evaluate.py"), "--help"], capture_output=True, text=True,
                       cwd=REPO, timeout=120)
    assert r.returncode == 0 and "--suite" in r.stdout and "--max-new-tokens" in r.stdout


# -----------------------------------------------------------------------------
# GPU only (issue #5 acceptance 5): skipped on the CPU machine

def _cuda():
    import torch
    return torch.cuda.is_available()


@pytest.mark.skipif(not _cuda(), reason="needs a CUDA GPU")
def test_cuda_transformers_backend_scores_fixtures(tiny):
    import copy
    model, tok = tiny
    gpu = copy.deepcopy(model).cuda()
    for name in ("math500", "bbh", "ifeval", "m1"):
        items = ev.load_benchmark(name, FIX)
        ov = {"max_new_tokens": 8, "n": 2} if name == "math500" else {"max_new_tokens": 8}
        res = ev.run_benchmark(name, items, gpu, tok, batch_size=4, overrides=ov)
        assert 0.0 <= res["score"] <= 100.0 and res["n_items"] == len(items)
    # greedy on CUDA (fp32) agrees with CPU on nearly every prompt of a random model
    prompts = _prompts(tok, 4)
    cpu_out = ev.generate(model, tok, prompts, max_new_tokens=6)
    gpu_out = ev.generate(gpu, tok, prompts, max_new_tokens=6)
    assert sum(a == b for a, b in zip(cpu_out, gpu_out)) >= 3


@pytest.mark.skipif(not ev.vllm_available(), reason="needs vllm and a CUDA GPU")
def test_vllm_greedy_matches_transformers(tiny, tiny_dir):
    import copy
    import torch
    model, tok = tiny
    gpu = copy.deepcopy(model).to(torch.bfloat16).cuda()
    prompts = _prompts(tok, 4)
    hf = ev.generate(gpu, tok, prompts, max_new_tokens=8)
    llm = ev.make_vllm_engine(str(tiny_dir), gpu_memory_utilization=0.3)
    vl = ev.generate(None, tok, prompts, max_new_tokens=8, backend="vllm", vllm_llm=llm)
    assert sum(a == b for a, b in zip(hf, vl)) >= 3


def test_cli_loads_an_adapter(tiny_dir, tmp_path):
    import torch
    base, tok, _ = ev._load_for_eval(str(tiny_dir), None, dtype="float32", device="cpu")
    pm.apply_peft(base, "lora", r=4, alpha=8)
    torch.manual_seed(0)
    for p in base.parameters():
        if p.requires_grad:
            p.data.normal_(0, 0.5)  # a visibly different model
    pm.save_adapter(base, tmp_path / "ad", base_model=str(tiny_dir))
    plain, _, _ = ev._load_for_eval(str(tiny_dir), None, dtype="float32", device="cpu")
    adapted, _, info = ev._load_for_eval(str(tiny_dir), str(tmp_path / "ad"), dtype="float32", device="cpu")
    assert info["method"] == "lora"
    prompts = _prompts(tok, 3)
    assert ev.generate(adapted, tok, prompts, max_new_tokens=4) == ev.generate(base, tok, prompts, max_new_tokens=4)
    assert ev.generate(adapted, tok, prompts, max_new_tokens=4) != ev.generate(plain, tok, prompts, max_new_tokens=4)
    res = ev.main(["--model", str(tiny_dir), "--adapter", str(tmp_path / "ad"), "--suite", "toy",
                   "--n-per-family", "2", "--max-new-tokens", "3", "--out", str(tmp_path / "ev")])
    assert res["adapter"] == str(tmp_path / "ad") and res["adapter_config"]["method"] == "lora"


def test_greedy_loop_uses_the_kv_cache_name_of_the_installed_transformers(tiny):
    """transformers 5.24 renamed the KV cache `past_key_values` -> `cache` (forward argument and
    output field); the GPU pin (vLLM 0.34.0) needs transformers < 5.23, which knows only
    `past_key_values`. A wrong name is silent (the forward swallows it in **kwargs and decodes
    without the cache), so the greedy loop must use the name this install has."""
    import dataclasses
    import inspect
    from transformers.modeling_outputs import CausalLMOutputWithPast
    model, _ = tiny
    assert ev.KV_CACHE_NAME in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)}
    assert ev.KV_CACHE_NAME in inspect.signature(type(model).forward).parameters
