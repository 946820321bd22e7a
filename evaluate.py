"""evaluate.py: both-axis scoring of a checkpoint, target gain and general retention
(PEFT-Arena §Evaluation; the release's eval/eval_{math,med,general}.sh and
eval/summarize_results.py, cited "PA: <path>" for Sphere-AI-Lab/PEFT-Arena e982d19).

The paper's central claim is that one number is not enough: every checkpoint gets a **target**
score (math: mean of the MATH-500 / AIME24 / AMC23 avg@16 accuracies; medical: macro mean over the
m1 sources) and a **general** score (mean of IFEval instruction-level strict accuracy, the BBH task
mean and NQ-open containment). Forgetting = base general - model general.

The two axes, in symbols. For benchmark b with items i = 1..N_b and n samples each, S_ij in [0, 1]
is the grader's score of sample j of item i; the benchmark score is micro 100 * mean_ij S_ij, or
macro over subtasks (BBH tasks, m1 sources), or IFEval's instruction-level accuracy. Then
    Target(model)  = mean_{b in domain} score_b        (math: each score_b rounded to 0.1 first)
    General(model) = mean_{b with axis "general"} score_b
    gain = Target(model) - Target(base),   forgetting = General(base) - General(model).

Layout (read top to bottom):
  1. The aggregates: `pass_at_k`, `aggregate` (one benchmark), `target_score`, `general_scores`,
     `summarize_suite` (real suites) and `combine_scores` (toy suite).
  2. The benchmarks as records: `register_benchmark(name, loader=, scorer=, aggregate=, axis=,
     decoding...)` fills BENCHMARKS; SUITES and the general axis read the records when they run,
     so a new benchmark is one call (README "Add a benchmark"). TOY_BENCHMARKS: the toy world's five.
  3. Generation: transformers `generate` (batched, left padding, explicit GenerationConfig, stop
     strings) with a resumable JSONL cache; for greedy decoding a plain KV-cache loop
     `greedy_decode` is the fast path (tested token for token against generate); the vLLM backend
     (GPU; API of vLLM 0.34.0, requirements-gpu.txt; CI runs it on CPU through
     tests/vllm_double.py): one engine per process on the base model's folder, reused across
     suites and adapters (merged weights pushed in memory), freed by release_engine().
  4. Suites: `evaluate_toy`, `run_benchmark`, `summarize_suite`; 5. the CLI.
The answer graders (math/LaTeX, letters, BBH, NQ, IFEval) live in graders.py, the engine room;
`score_item(item, response)` in [0, 1] is the one call this file makes into it.

Run:
    python evaluate.py --model toy --suite toy --out runs/eval_toy          # toy world, CPU
    python evaluate.py --model toy --suite toy --bench --threads 1          # timing of the toy suite
    python evaluate.py --model /models/Qwen2.5-7B --adapter runs/lora --suite all --out runs/ev \\
        --data-dir data                                                     # real benchmarks (GPU)

Scores are in percent.

Deviations that can change a reported number (the graders' own are listed in graders.py)
 1. Medical prompt: the tokenizer's chat template with system "You are a helpful assistant." for
    every model (the release hand-builds ChatML for Qwen and a Llama-3 string with a typo).

Implementation notes (same numbers as the release)
 a. Toy suite: greedy decoding with one sample for every family (real math: T=0.6, 16 samples).
 b. Sampled transformers generations (T > 0) are seeded per batch; a resumed run therefore gives
    different (equally distributed) samples than an uninterrupted one. Greedy runs and vLLM
    (seeded per prompt) are unaffected.
 c. MATH-500 gold = the `answer` field (the release re-extracts the last \\boxed{} of `solution`;
    the two agree on all 500 rows up to spaces).
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import gc
import hashlib
import json
import math
import os
import sys
import time
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import AutoConfig, GenerationConfig, StoppingCriteria, StoppingCriteriaList
from transformers.modeling_outputs import CausalLMOutputWithPast

import loading
import peft_methods
import toy_world
from graders import (IFEVAL_BACKENDS, OPTION_LETTERS, SCORERS, ensure_ifeval_data, ifeval_accuracies,
                     ifeval_fallbacks_used, ifeval_slots, nq_exact_match, score_item)
# re-exported only for callers that still use evaluate.<name> (train_grpo: grade_math, grade_reward;
# tests/test_toy_world: extract_math_answer, score_item); new code imports graders directly
from graders import extract_math_answer, grade_math, grade_reward  # noqa: F401

# -----------------------------------------------------------------------------
# 1. The paper's aggregates (PEFT-Arena §Evaluation; PA: eval/summarize_results.py,
#    third_party/math_eval/evaluate.py)

def pass_at_k(n: int, c: int, k: int) -> float:
    """[Chen+21 Codex, Eq. 1] unbiased pass@k = 1 - C(n-c, k) / C(n, k) for one problem."""
    if k > n:
        raise ValueError(f"pass@k needs k <= n samples (k={k}, n={n})")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def aggregate(items: list[dict], samples: list[list[str]], mode: str = "micro",
              ks=(1, 2, 4, 8, 16)) -> dict:
    """Benchmark score in percent from items and their samples.

    mode "micro": 100 * mean over items x samples (math avg@n, NQ, toy med);
         "macro_subtask": unweighted mean of per-subtask accuracies (BBH tasks, m1 sources);
         "ifeval": instruction-level strict accuracy (the paper's IFEval figure) + the other three.
    Math with n > 1 samples adds [PA: third_party/math_eval/evaluate.py] unbiased pass@k averaged
    over problems for every k <= n, and pass_acc (some sample correct); NQ adds true exact match.
    """
    out = {"n_items": len(items), "n": len(items), "n_samples": len(samples[0]) if samples else 0}
    if mode == "ifeval":
        acc = ifeval_accuracies([ifeval_slots(it, ss[0]) for it, ss in zip(items, samples)])
        return {**out, **acc, "score": acc["inst_level_strict"]}
    if len(items) != len(samples):
        raise ValueError(f"{len(items)} items but {len(samples)} sample lists")
    S = [[score_item(it, s) for s in ss] for it, ss in zip(items, samples)]  # (N items, n samples) in [0, 1]
    per_item = [sum(r) / len(r) for r in S]
    subs: dict[str, list[float]] = {}   # BBH tasks, m1 sources ("" when items have none)
    for it, v in zip(items, per_item):
        subs.setdefault(str(it.get("subtask", "")), []).append(v)
    out["subtasks"] = {k: {"score": 100.0 * sum(v) / len(v), "n": len(v)} for k, v in sorted(subs.items())}
    if mode == "macro_subtask":
        out["score"] = sum(s["score"] for s in out["subtasks"].values()) / max(1, len(out["subtasks"]))
        out["micro_score"] = 100.0 * sum(per_item) / max(1, len(per_item))
    elif mode == "micro":
        out["score"] = 100.0 * sum(per_item) / max(1, len(per_item))
    else:
        raise ValueError(f"aggregate mode must be micro, macro_subtask or ifeval, not {mode!r}")
    n = out["n_samples"]
    if n > 1 and items and items[0].get("scorer") == "math":
        c = [round(sum(r)) for r in S]   # correct samples per problem
        out["pass_at_k"] = {str(k): 100.0 * sum(pass_at_k(n, ci, k) for ci in c) / len(c)
                            for k in sorted(set(ks) | {n}) if k <= n}
        out["pass_acc"] = 100.0 * sum(ci > 0 for ci in c) / len(c)
    if items and items[0].get("scorer") == "nq":
        out["exact_match"] = 100.0 * sum(nq_exact_match(ss[0], it["gold"]) for it, ss in zip(items, samples)) / len(items)
    return out


def general_scores(scores: dict, records: dict) -> list[float]:
    """The scores of the general-axis benchmarks present in `scores`, in the records' order (the
    summation order of the mean below, so results stay bit-identical)."""
    return [scores[n] for n, r in records.items() if r["axis"] == "general" and n in scores]


def target_score(scores: dict, domain: str) -> float | None:
    """[PA: eval/summarize_results.py] Target = mean of the domain's benchmarks (None unless all
    present); math rounds each dataset's accuracy to 0.1 first, as the release's summary does."""
    names = [n for n, r in BENCHMARKS.items() if r["axis"] == domain]
    if not all(n in scores for n in names):
        return None
    vals = [round(scores[n], 1) if domain == "math" else scores[n] for n in names]
    return sum(vals) / len(vals)


def combine_scores(families: dict, domain: str, base_general: float | None = None) -> dict:
    """Toy suite: target = the domain family's score; general = mean over the general-axis families
    present (as `compute_general_avg`); forgetting = base general - general."""
    out = {}
    if domain in families:
        out["target_score"] = families[domain]["score"]
    present = {f: families[f]["score"] for f in families}
    general = general_scores(present, TOY_BENCHMARKS)
    if general:
        out["general_score"] = sum(general) / len(general)
        wanted = [f for f, r in TOY_BENCHMARKS.items() if r["axis"] == "general"]
        if len(general) < len(wanted):
            out["general_partial"] = [f for f in wanted if f in families]
    if base_general is not None and "general_score" in out:
        out["base_general"] = float(base_general)
        out["forgetting"] = float(base_general) - out["general_score"]
    return out


def summarize_suite(bench: dict, *, domain: str | None, base_general: float | None) -> dict:
    """Real suites: a target per domain whose benchmarks are all present (`target_score`); General =
    the mean over the general-axis records (IFEval inst-strict, BBH, NQ, + any registered) when all
    are present; forgetting = base_general - General."""
    out = {}
    scores = {n: b["score"] for n, b in bench.items()}
    targets = {d: t for d in SUITES if d not in ("general", "all") and (t := target_score(scores, d)) is not None}
    if targets:
        out["target_scores"] = targets
        dom = domain or next(iter(targets))
        if dom in targets:
            out["target_score"] = targets[dom]
            out["domain"] = dom
    gen = general_scores(scores, BENCHMARKS)
    if len(gen) == len(SUITES["general"]):
        out["general_score"] = sum(gen) / len(gen)
        if base_general is not None:
            out["base_general"] = base_general
            out["forgetting"] = base_general - out["general_score"]
    return out


# -----------------------------------------------------------------------------
# 2. The benchmarks as records: where the data lives (hub formats), the paper's prompt, how each
#    answer is scored and aggregated, and which axis it counts toward. A new benchmark is one
#    `register_benchmark` call (README "Add a benchmark"); suites, scoring and arena.py read the
#    records when they run, so one registered after import (from another module) is picked up.

MATH_STOP = ["</s>", "<|im_end|>", "<|endoftext|>", "\n\nQuestion:"]
BOXED_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
MED_SYSTEM = "You are a helpful assistant."   # DEVIATION 1


def math_prompt(problem: str) -> str:
    """The release's default `cot` prompt (PA: third_party/math_eval), inside the chat template."""
    return f"Question: {problem.strip()}\nAnswer:"


def med_prompt(question: str, options: dict) -> str:
    """m1's query: the question, then one "X. option" line per option."""
    return question.strip() + "\n" + "\n".join(f"{k}. {v}" for k, v in options.items())


def bbh_prompt(hint: str, question: str) -> str:
    """OpenCompass bbh_gen_5b92b0: instruction line + the task's CoT exemplars + the question."""
    return f"Follow the given examples and answer the question.\n{hint}\n\nQ: {question}\nA: Let's think step by step."


def nq_prompt(question: str) -> str:
    """OpenCompass nq_gen_c788f6 (the release's copy), 0-shot."""
    return ("Answer these questions, your answer should be as simple as possible, start your answer "
            f"with the prompt 'The answer is '.\nQ: {question}?")


class DatasetMissing(FileNotFoundError):
    pass


def _how_to_get(spec: dict) -> str:
    return (f"Expected hub id {spec.get('hub')!r}; format: {spec.get('fmt')}. Download it where the hub is "
            f"reachable and pass --data-dir DIR (files at {', '.join(spec['files'])}) or --path NAME=FILE")


def find_dataset(name: str, data_dir=None, path=None, *, allow_hub: bool = False):
    """Benchmark `name`'s local data: the explicit path, else the first of the record's `files`
    under data_dir; 'hub' when allow_hub; else DatasetMissing naming what was looked for, the hub
    id and the expected format."""
    spec = BENCHMARKS[name]
    cands = ([Path(path)] if path is not None else []) + \
            ([Path(data_dir) / f for f in spec["files"]] if data_dir is not None else [])
    found = next((c for c in cands if c.exists()), None)
    if found is not None or allow_hub:
        return found or "hub"
    raise DatasetMissing(f"benchmark {name!r}: no local data found (looked for: "
                         f"{', '.join(map(str, cands)) or 'nothing, no --data-dir'}). {_how_to_get(spec)}; "
                         "--allow-hub tries the hub.")


def read_data(path) -> list | dict:
    """The rows of a benchmark file. loading.read_records reads .jsonl, .parquet and JSON arrays;
    two shapes it does not know are read here: a JSON object (m1 by source, a BBH task file) and
    NQ's DPR TSV (question<TAB>a Python list literal of answers; literal_eval never runs code)."""
    p = Path(path)
    if p.suffix in (".csv", ".tsv"):
        rows = [ln.rstrip("\n").partition("\t") for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
        answers = [ast.literal_eval(a) for _, _, a in rows]
        return [{"question": q, "answer": list(a) if isinstance(a, (list, tuple)) else [str(a)]}
                for (q, _, _), a in zip(rows, answers)]
    if p.suffix == ".json" and p.read_text(encoding="utf-8").lstrip().startswith("{"):
        return json.loads(p.read_text(encoding="utf-8"))
    return [row for row, _ in loading.read_records(p, "--path")[0]]


def read_rows(name: str, data_dir=None, path=None, allow_hub: bool = False):
    """Rows of benchmark `name` (local file, or the hub's `hub` id / `config` / `split`)."""
    where = find_dataset(name, data_dir, path, allow_hub=allow_hub)
    if where != "hub":
        return read_data(where)
    spec = BENCHMARKS[name]
    try:
        import datasets
        ds = datasets.load_dataset(spec["hub"], *([spec["config"]] if spec.get("config") else []),
                                   **({"split": spec["split"]} if spec.get("split") else {}))
        return {k: list(v) for k, v in ds.items()} if not spec.get("split") else list(ds)  # m1: a split per source
    except Exception as err:  # noqa: BLE001
        raise DatasetMissing(f"benchmark {name!r}: loading hub id {spec['hub']!r} failed ({type(err).__name__}: "
                             f"{str(err)[:200]}); {_how_to_get(spec)}") from err


def require_fields(name: str, rid, row: dict, *keys) -> dict:
    """`row` when it has every field in `keys`, else a ValueError naming the benchmark, row and format."""
    missing = [k for k in keys if k not in row]
    if missing:
        raise ValueError(f"benchmark {name!r}, row {rid}: missing field(s) {missing}; row has "
                         f"{sorted(row)}; expected format: {BENCHMARKS[name].get('fmt')}")
    return row


def make_item(name: str, rid, prompt: str, gold, subtask: str = "", **extra) -> dict:
    """One scored item of benchmark `name`: {id, family, subtask (BBH task, m1 source), prompt (the
    paper's text, before the chat template), gold, scorer (the record's), ...extra}."""
    return {"id": f"{name}-{rid}", "family": name, "subtask": subtask, "prompt": prompt, "gold": gold,
            "scorer": BENCHMARKS[name]["scorer"], **extra}


# Every loader: (name, data_dir, path, *, allow_hub, prompt_dir) -> [make_item(...), ...]

def load_math(name, data_dir=None, path=None, *, allow_hub=False, prompt_dir=None) -> list[dict]:
    """MATH-500 / AIME24 / AMC23 / GSM8K (gold: GSM8K's number after '####'; else, note c, the
    `answer` field; AMC23's float golds "27.0" become "27" in strip_string)."""
    items = []
    for i, r in enumerate(read_rows(name, data_dir, path, allow_hub)):
        if name == "gsm8k":
            problem = require_fields(name, i, r, "question", "answer")["question"]
            gold = str(r["answer"]).split("####")[-1].strip().replace(",", "")
        else:
            gold = str(require_fields(name, i, r, "answer")["answer"])
            problem = r.get("problem", r.get("question"))
            if problem is None:
                raise ValueError(f"benchmark {name!r}, row {i}: no 'problem' or 'question' field")
        items.append(make_item(name, r.get("unique_id", r.get("id", r.get("idx", i))), math_prompt(problem),
                               gold, str(r.get("subject", ""))))
    return items


def load_m1(name="m1", data_dir=None, path=None, *, allow_hub=False, prompt_dir=None) -> list[dict]:
    """m1 medical items (subtask = source), from the hub's JSON dict {source: [rows]} or the
    release's flat processed list; the boxed instruction is appended to the user turn."""
    rows = read_rows(name, data_dir, path, allow_hub)
    if isinstance(rows, dict):
        flat = [(s, i, require_fields(name, i, r, "question", "options", "answer_idx")) for s, lst in rows.items()
                for i, r in enumerate(lst)]
    else:
        flat = [(require_fields(name, i, r, "options", "answer_idx", "source")["source"], i, r)
                for i, r in enumerate(rows)]
    items = []
    for source, i, r in flat:
        prompt = (not isinstance(rows, dict) and r.get("prompt")) or med_prompt(r["question"], r["options"])
        options = r["options"]
        if isinstance(options, list):  # some re-uploads store the options as a list
            options = {OPTION_LETTERS[k]: v for k, v in enumerate(options)}
        items.append(make_item(name, f"{source}-{i}", prompt + "\n" + BOXED_INSTRUCTION, str(r["answer_idx"]),
                               source, options=options))
    return items


def load_ifeval(name="ifeval", data_dir=None, path=None, *, allow_hub=False, prompt_dir=None) -> list[dict]:
    """IFEval items: the raw prompt, its instruction ids and their kwargs (no gold)."""
    rows = [require_fields(name, i, r, "prompt", "instruction_id_list", "kwargs")
            for i, r in enumerate(read_rows(name, data_dir, path, allow_hub))]
    return [make_item(name, r.get("key", i), r["prompt"], None, instruction_id_list=list(r["instruction_id_list"]),
                      kwargs=[dict(k) for k in r["kwargs"]]) for i, r in enumerate(rows)]


def load_bbh(name="bbh", data_dir=None, path=None, *, allow_hub=False, prompt_dir=None) -> list[dict]:
    """BBH items of every task present, from <data>/<task>.json + <prompts>/<task>.txt."""
    spec = BENCHMARKS[name]

    def first_dir(given, rels):   # `given`, else the first of rels under data_dir that exists
        return Path(given) if given else next(
            (Path(data_dir) / f for f in rels if data_dir and (Path(data_dir) / f).is_dir()), None)

    ddir, pdir = first_dir(path, spec["files"]), first_dir(prompt_dir, spec["prompt_dirs"])
    tasks = sorted(p.stem for p in ddir.glob("*.json")) if ddir and ddir.is_dir() else []
    if not tasks or pdir is None or not pdir.is_dir():
        raise DatasetMissing(f"benchmark 'bbh': need a directory of <task>.json files (found {ddir}) and a CoT "
                             f"prompt directory (found {pdir}). {_how_to_get(spec)}, with "
                             f"{spec['prompt_dirs'][0]}/ (or --bbh-prompt-dir DIR).")
    items = []
    for task in tasks:
        data = read_data(ddir / f"{task}.json")
        hint_file = pdir / f"{task}.txt"
        if not hint_file.exists():
            raise DatasetMissing(f"benchmark 'bbh': task {task} has no CoT prompt file {hint_file}")
        hint = hint_file.read_text(encoding="utf-8")
        for i, ex in enumerate(data["examples"] if isinstance(data, dict) else data):
            require_fields(name, i, ex, "input", "target")
            items.append(make_item(name, f"{task}-{i}", bbh_prompt(hint, ex["input"]), str(ex["target"]), task))
    return items


def load_nq(name="nq", data_dir=None, path=None, *, allow_hub=False, prompt_dir=None) -> list[dict]:
    """NQ-open items: the gold is the list of acceptable answers."""
    rows = [require_fields(name, i, r, "question", "answer")
            for i, r in enumerate(read_rows(name, data_dir, path, allow_hub))]
    return [make_item(name, i, nq_prompt(r["question"]), [r["answer"]] if isinstance(r["answer"], str)
                      else [str(a) for a in r["answer"]]) for i, r in enumerate(rows)]


BENCHMARKS: dict[str, dict] = {}


def register_benchmark(name: str, *, loader, scorer, axis: str = "extra", aggregate: str = "micro",
                       prompt=None, max_new_tokens: int = 512, temperature: float = 0.0,
                       top_p: float = 1.0, n: int = 1, stop=(), files=(), **data) -> dict:
    """Add benchmark `name` (or replace it). loader: (name, data_dir, path, *, allow_hub,
    prompt_dir) -> items (see make_item); scorer: a graders.SCORERS rule name, or a function
    (item, response) -> [0, 1] (registered there under `name`); aggregate: an `aggregate` mode;
    axis: the target domain it counts toward ("math", "med"), "general" (the general axis is the
    mean over these, in registration order), or "extra" (scored, in no mean); the decoding
    settings; files: data paths under --data-dir; data: e.g. hub, split, fmt, system, raw_for_base."""
    if callable(scorer):
        SCORERS[name], scorer = scorer, name
    BENCHMARKS[name] = dict(loader=loader, prompt=prompt, scorer=scorer, aggregate=aggregate, axis=axis,
                            decoding=dict(temperature=temperature, top_p=top_p, n=n,
                                          max_new_tokens=max_new_tokens, stop=list(stop)),
                            files=list(files), **data)
    return BENCHMARKS[name]


# The paper's benchmarks (PEFT-Arena §Evaluation; the release's eval scripts and OpenCompass configs)
# with the paper's decoding; system: a system turn; raw_for_base: base models get the raw text.
for _n, _hub, _split, _files in (
        ("math500", "HuggingFaceH4/MATH-500", "test", ["math500/test.jsonl", "MATH-500/test.jsonl"]),
        ("aime24", "HuggingFaceH4/aime_2024", "train", ["aime24/test.jsonl",
                                                        "aime24/data/train-00000-of-00001.parquet",
                                                        "aime_2024/data/train-00000-of-00001.parquet"]),
        ("amc23", "math-ai/amc23", "test", ["amc23/test.jsonl"])):
    register_benchmark(_n, loader=load_math, prompt=math_prompt, scorer="math", axis="math", temperature=0.6,
                       n=16, max_new_tokens=8192, stop=MATH_STOP, hub=_hub, split=_split, files=_files,
                       fmt="JSONL or parquet rows {problem, answer, ...}")
register_benchmark("gsm8k", loader=load_math, prompt=math_prompt, scorer="math", temperature=0.6, n=16,
                   max_new_tokens=8192, stop=MATH_STOP, hub="openai/gsm8k", config="main", split="test",
                   files=["gsm8k/test.jsonl", "gsm8k/main/test-00000-of-00001.parquet"],
                   fmt="JSONL or parquet rows {question, answer ('... #### N')}")
register_benchmark("m1", loader=load_m1, prompt=med_prompt, system=MED_SYSTEM, scorer="choice",
                   aggregate="macro_subtask", axis="med", max_new_tokens=8192, hub="UCSC-VLAA/m1_eval_data",
                   split=None, files=["m1_eval/m1_eval_data.json", "m1_eval_data.json",
                                      "m1_eval/m1_eval_data_processed.json"],
                   fmt="JSON dict {source: [{question, options {letter: text}, answer_idx}]} or the "
                       "release's flat list [{prompt, options, answer_idx, source}]")
register_benchmark("ifeval", loader=load_ifeval, scorer="ifeval", aggregate="ifeval", axis="general",
                   max_new_tokens=1025, hub="google/IFEval", split="train",
                   files=["ifeval/ifeval_input_data.jsonl", "ifeval/input_data.jsonl"],
                   fmt="JSONL rows {key, prompt, instruction_id_list [...], kwargs [{...}]}")
register_benchmark("bbh", loader=load_bbh, prompt=bbh_prompt, raw_for_base=True, scorer="bbh",
                   aggregate="macro_subtask", axis="general", max_new_tokens=512,
                   hub="lukaemon/bbh (+ suzgunmirac/BIG-Bench-Hard cot-prompts)", split="test",
                   files=["bbh/bbh", "BBH/data", "bbh/data"],
                   prompt_dirs=["bbh/cot-prompts", "BBH/lib_prompt", "bbh/lib_prompt"],
                   fmt="a directory of <task>.json files {\"examples\": [{input, target}]} and one of "
                       "<task>.txt 3-shot CoT prompts (BIG-Bench-Hard layout: bbh/ and cot-prompts/)")
register_benchmark("nq", loader=load_nq, prompt=nq_prompt, scorer="nq", axis="general", max_new_tokens=50,
                   hub="google-research-datasets/nq_open", split="validation",
                   files=["nq_open/nq_open/validation-00000-of-00001.parquet",
                          "nq_open/validation-00000-of-00001.parquet",
                          "nq_open/validation.jsonl", "nq/nq-test.qa.csv"],
                   fmt="parquet/JSONL rows {question, answer [str, ...]} or the DPR TSV nq-test.qa.csv")


class _Suites(Mapping):
    """SUITES[axis] = the names of the benchmarks counting toward that axis, in registration order
    (math, med, general), and SUITES["all"] = all three; read from BENCHMARKS on every access."""
    def _table(self) -> dict:
        axes = dict.fromkeys(r["axis"] for r in BENCHMARKS.values() if r["axis"] != "extra")
        t = {a: [n for n, r in BENCHMARKS.items() if r["axis"] == a] for a in axes}
        return {**t, "all": [n for a in axes for n in t[a]]}

    def __getitem__(self, key):
        return self._table()[key]

    def __iter__(self):
        return iter(self._table())

    def __len__(self):
        return len(self._table())


SUITES = _Suites()

# The toy world's five families as records (CPU, toy_world.py): items, prompts and scorers come from
# toy_world.make_eval_items; max_new_tokens = the longest canonical response of the family (char-level
# tokens) plus a margin for the EOS. General-axis families in summation order.
TOY_BENCHMARKS = {
    "ifeval": dict(axis="general", aggregate="ifeval", scorer="ifeval", max_new_tokens=64),
    "bbh": dict(axis="general", aggregate="macro_subtask", scorer="bbh", max_new_tokens=144),
    "nq": dict(axis="general", aggregate="micro", scorer="nq", max_new_tokens=56),
    "math": dict(axis="math", aggregate="micro", scorer="math", max_new_tokens=80),
    "med": dict(axis="med", aggregate="micro", scorer="choice", max_new_tokens=84),
}


def load_benchmark(name: str, data_dir=None, path=None, *, allow_hub=False, bbh_prompt_dir=None,
                   limit: int | None = None) -> list[dict]:
    """The items of benchmark `name` through its record's loader; `limit` items per benchmark (per
    subtask for the macro-averaged ones, so every BBH task / m1 source stays represented)."""
    if name not in BENCHMARKS:
        raise KeyError(f"unknown benchmark {name!r}; known: {sorted(BENCHMARKS)}")
    spec = BENCHMARKS[name]
    items = spec["loader"](name, data_dir, path, allow_hub=allow_hub, prompt_dir=bbh_prompt_dir)
    if not limit:
        return items
    if spec["aggregate"] != "macro_subtask":
        return items[:limit]
    per: Counter = Counter()
    kept = []
    for it in items:   # the first `limit` items of every subtask
        per[it["subtask"]] += 1
        if per[it["subtask"]] <= limit:
            kept.append(it)
    return kept


# -----------------------------------------------------------------------------
# 3. Generation: transformers `generate` (CPU/GPU) or vLLM (GPU), behind a resumable JSONL cache
#
# Shapes: B prompts in a batch (samples of one prompt are adjacent rows), T prompt tokens after
# left padding, N new tokens.

def _sha1(text: str, k: int) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:k]


def read_generation_cache(cache_path, settings_key: str | None = None) -> dict:
    """{(prompt_id, sample_index): row} from a JSONL cache. Rows written under other generation
    settings are ignored, and so is a torn last line from an interrupted run."""
    out = {}
    lines = Path(cache_path).read_text(encoding="utf-8").splitlines() if Path(cache_path).exists() else []
    for lineno, line in enumerate(lines, 1):
        try:
            row = json.loads(line) if line.strip() else None
        except ValueError:
            print(f"[evaluate] {cache_path}:{lineno}: unreadable cache line ignored (interrupted write?)",
                  file=sys.stderr)
            continue
        if row is not None and (settings_key is None or row.get("settings") == settings_key):
            out[(row["prompt_id"], int(row["sample_index"]))] = row
    return out


def _append_rows(cache_path, rows: list[dict]) -> None:
    if cache_path is None or not rows:
        return
    Path(cache_path).parent.mkdir(parents=True, exist_ok=True)
    with open(cache_path, "a+", encoding="utf-8") as f:
        if f.tell() > 0:  # a torn last line (killed mid-write) must not swallow the next row
            f.seek(f.tell() - 1)
            if f.read(1) != "\n":
                f.write("\n")
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        f.flush()
        os.fsync(f.fileno())  # a kill after this line loses nothing already generated


def truncate_at_stop(text: str, stop) -> tuple[str, bool]:
    """Cut `text` at the earliest stop string (the stop string itself is removed, as in vLLM)."""
    cut = min((i for i in (text.find(s) for s in (stop or [])) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def make_generation_config(model, tokenizer, *, max_new_tokens: int, temperature: float, top_p: float):
    """An explicit GenerationConfig. Every sampling knob is set, because generate() fills unset
    (None) fields from the checkpoint's generation_config.json (Qwen ships top_k=20 and
    repetition_penalty=1.05, which would silently change the decoding the paper used).
    EOS = the union of the model's generation_config ids and the tokenizer's."""
    eos = set()
    for src in (getattr(model, "generation_config", None), tokenizer):
        e = getattr(src, "eos_token_id", None)
        eos.update([] if e is None else e if isinstance(e, (list, tuple)) else [e])
    eos = sorted(int(i) for i in eos)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
    kw = dict(max_new_tokens=int(max_new_tokens), do_sample=temperature > 0, num_beams=1,
              repetition_penalty=1.0, no_repeat_ngram_size=0, eos_token_id=eos or None,
              pad_token_id=pad, use_cache=True)
    if temperature > 0:  # top_k=0 and min_p=0 switch those filters off (vLLM / the paper use neither)
        kw.update(temperature=float(temperature), top_p=float(top_p), top_k=0, min_p=0.0)
    return GenerationConfig(**kw)


def _stop_criteria(tokenizer, stop, prompt_len: int):
    """A StoppingCriteria ending a row once its new text contains a stop string. Only the last
    few tokens are decoded each step (a stop string of L characters spans <= L tokens)."""
    tail = max(len(s) for s in stop) + 2

    class _StopOnStrings(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            new = input_ids[:, prompt_len:][:, -tail:]  # (B, <=tail)
            texts = tokenizer.batch_decode(new, skip_special_tokens=True)
            return torch.tensor([any(s in t for s in stop) for t in texts], dtype=torch.bool,
                                device=input_ids.device)  # (B,)

    return StoppingCriteriaList([_StopOnStrings()])


# transformers 5.24 renamed the KV cache `past_key_values` -> `cache` (forward argument and output
# field; the old name is removed in 5.40). The GPU pin (vLLM 0.34.0) needs transformers < 5.23, which
# knows only `past_key_values`; a wrong name would be swallowed by **kwargs and decode uncached.
KV_CACHE_NAME = ("cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)}
                 else "past_key_values")


def greedy_decode(model, input_ids, attention_mask, *, max_new_tokens: int, eos_ids, pad_id: int,
                  stop_check=None):
    """Greedy decoding with a KV cache in a plain loop: the fast path of `generate` for T = 0.

    Same semantics as transformers `generate(do_sample=False)`, which stays the reference (a test
    checks they agree token for token): positions count only real tokens (left padding), a row
    that emitted EOS (or hit a stop string) gets `pad_id` from then on, and the loop ends when
    every row is done. It skips generate()'s per-step machinery (logits processors, stopping-
    criteria lists, cache bookkeeping).
    """
    B = input_ids.shape[0]
    dev = input_ids.device
    eos = torch.tensor(sorted(set(eos_ids or [])), dtype=torch.long, device=dev)
    pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T): position of each real token
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=pos, use_cache=True,
                logits_to_keep=1)
    cache = getattr(out, KV_CACHE_NAME)   # the KV cache
    nxt = out.logits[:, -1].argmax(-1)  # (B,)
    last = pos[:, -1]  # (B,)
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    new = []
    for step in range(max_new_tokens):
        tok = torch.where(done, torch.full_like(nxt, pad_id), nxt)  # (B,)
        new.append(tok)
        done = done | torch.isin(tok, eos)
        if stop_check is not None:
            done = done | stop_check(torch.stack(new, 1))
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(B, 1)], 1)  # (B, T + step + 1)
        last = last + 1
        out = model(input_ids=tok[:, None], attention_mask=attention_mask, position_ids=last[:, None],
                    use_cache=True, **{KV_CACHE_NAME: cache})
        cache = getattr(out, KV_CACHE_NAME)
        nxt = out.logits[:, -1].argmax(-1)  # (B,)
    return torch.stack(new, 1)  # (B, N)


def _hf_generate_chunk(model, tokenizer, chunk, gen_cfg, stop, seed, greedy_impl: str = "fast"):
    """Generate one batch. chunk: list of (prompt_id, prompt_text, sample_index)."""
    old_side, tokenizer.padding_side = tokenizer.padding_side, "left"  # generation appends on the right
    try:
        enc = tokenizer([p for _, p, _ in chunk], return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = old_side
    device = next(model.parameters()).device
    input_ids, attn = enc["input_ids"].to(device), enc["attention_mask"].to(device)  # (B, T), (B, T)
    T = input_ids.shape[1]
    if gen_cfg.do_sample:   # note b: one seed per batch, derived from the seed and the batch's contents
        torch.manual_seed(int(_sha1(f"{seed}|{[(c[0], c[2]) for c in chunk]}", 8), 16))
    with torch.no_grad():
        if not gen_cfg.do_sample and greedy_impl == "fast":
            crit = _stop_criteria(tokenizer, stop, 0)[0] if stop else None
            new = greedy_decode(model, input_ids, attn, max_new_tokens=gen_cfg.max_new_tokens,
                                eos_ids=gen_cfg.eos_token_id, pad_id=gen_cfg.pad_token_id,
                                stop_check=crit and (lambda ids: crit(ids, None))).cpu()  # (B, N)
        else:  # the reference path, and every sampled run
            kwargs = {"stopping_criteria": _stop_criteria(tokenizer, stop, T)} if stop else {}
            new = model.generate(input_ids=input_ids, attention_mask=attn, generation_config=gen_cfg,
                                 **kwargs)[:, T:].cpu()  # (B, T + N) -> (B, N)
    eos = set(gen_cfg.eos_token_id or [])
    rows = []
    for (pid, _, j), seq in zip(chunk, new.tolist()):
        # the row ends at its first EOS (kept in the count) or pad (a stop string's padding)
        end = next((k for k, t in enumerate(seq) if t in eos or t == gen_cfg.pad_token_id), None)
        n_tok = len(seq) if end is None else end + (seq[end] in eos)
        text, hit = truncate_at_stop(tokenizer.decode(seq[:n_tok], skip_special_tokens=True), stop)
        finish = "stop" if hit else "length" if end is None or seq[end] not in eos else "eos"
        rows.append({"prompt_id": pid, "sample_index": j, "text": text, "num_tokens": n_tok, "finish": finish})
    return rows


def _generate_missing(todo, done: dict, key: str, settings: dict, *, model, tokenizer, batch_size, cache_path,
                      backend, vllm_llm, progress, greedy_impl) -> None:
    """Generate the (prompt_id, prompt, sample_index) triples of `todo` in chunks into `done`,
    appending every finished chunk to the cache."""
    if backend == "vllm":
        chunks = [todo[i:i + 4096] for i in range(0, len(todo), 4096)]
    else:   # longest prompts first: less padding, and an OOM shows in the first batch, not the last
        todo.sort(key=lambda w: -len(w[1]))
        chunks = [todo[i:i + batch_size] for i in range(0, len(todo), batch_size)]
        gen_cfg = make_generation_config(model, tokenizer, max_new_tokens=settings["max_new_tokens"],
                                         temperature=settings["temperature"],
                                         top_p=settings["top_p"]) if todo else None
    for chunk in tqdm(chunks, desc="generate", unit="batch") if progress and chunks else chunks:
        rows = (_vllm_generate_chunk(vllm_llm, chunk, settings) if backend == "vllm" else
                _hf_generate_chunk(model, tokenizer, chunk, gen_cfg, settings["stop"], settings["seed"], greedy_impl))
        for r in rows:
            r["settings"] = key
            done[(r["prompt_id"], r["sample_index"])] = r
        _append_rows(cache_path, rows)


def generate_records(model, tokenizer, prompts: list[str], *, max_new_tokens: int,
                     temperature: float = 0.0, top_p: float = 1.0, n: int = 1, batch_size: int = 64,
                     stop=None, seed: int = 0, cache_path=None, prompt_ids=None, backend: str = "hf",
                     vllm_llm=None, progress: bool = False,
                     greedy_impl: str = "fast") -> list[list[dict]]:
    """n completions per (already rendered) prompt, as cache rows {prompt_id, sample_index, text,
    num_tokens, finish ('eos' | 'stop' | 'length'), settings}: greedy when temperature == 0, else
    temperature / top-p sampling. Stops at EOS or a stop string (removed from the text). With
    `cache_path`, finished rows are appended to a JSONL file after every batch, and rows already
    there (same settings) are reused: re-scoring never regenerates, and an interrupted run resumes
    where it stopped. The cache does not know which model wrote it: one cache file per model."""
    if n < 1 or max_new_tokens < 1 or batch_size < 1 or not (0.0 < top_p <= 1.0) or temperature < 0:
        raise ValueError(f"generate: need n, max_new_tokens, batch_size >= 1, 0 < top_p <= 1 and temperature "
                         f">= 0 (got {n}, {max_new_tokens}, {batch_size}, {top_p}, {temperature})")
    settings = {"max_new_tokens": int(max_new_tokens), "temperature": float(temperature),
                "top_p": float(top_p), "stop": sorted(set(stop or [])), "seed": int(seed)}
    key = _sha1(json.dumps(settings, sort_keys=True), 12)
    pids = list(prompt_ids) if prompt_ids is not None else [_sha1(p, 16) for p in prompts]
    if len(pids) != len(prompts):
        raise ValueError(f"generate: {len(prompts)} prompts but {len(pids)} prompt ids")
    done = read_generation_cache(cache_path, key) if cache_path else {}
    greedy = temperature == 0   # greedy samples are identical: sample 0 once, copied to the others
    todo: dict = {}
    for pid, p in zip(pids, prompts):
        for j in range(1 if greedy else n):
            if (pid, j) not in done:
                todo.setdefault((pid, j), (pid, p, j))
    _generate_missing(list(todo.values()), done, key, settings, model=model, tokenizer=tokenizer,
                      batch_size=batch_size, cache_path=cache_path, backend=backend, vllm_llm=vllm_llm,
                      progress=progress, greedy_impl=greedy_impl)
    rows = [[done[(pid, 0 if greedy else j)] for j in range(n)] for pid in pids]
    return [[dict(r, sample_index=j) if r["sample_index"] != j else r for j, r in enumerate(rs)] for rs in rows]


def generate(model, tokenizer, prompts: list[str], **kw) -> list[list[str]]:
    """The texts of `generate_records` (same keyword arguments): n completions per prompt."""
    return [[r["text"] for r in rows] for rows in generate_records(model, tokenizer, prompts, **kw)]


# --- vLLM backend (GPU; on CPU the tests run it through tests/vllm_double.py) -----------------
# API as of vLLM 0.34.0 (requirements-gpu.txt). One engine per process: built on the base model's
# folder, reused by every suite and every adapter of that base (their merged weights are pushed in,
# layer by layer: nothing is written to disk), freed with vLLM's own teardown by release_engine().

def vllm_available() -> bool:
    """True when vllm imports and CUDA is present (the import is guarded: vllm is optional)."""
    try:
        if not torch.cuda.is_available():
            return False
        import vllm  # noqa: F401
        return True
    except Exception:  # noqa: BLE001
        return False


def make_vllm_engine(model_path: str, *, seed: int = 0, max_model_len: int | None = None,
                     gpu_memory_utilization: float = 0.85, **extra):
    """A vLLM engine on a dense HF checkpoint directory (bf16). Frees the trainer's cached CUDA
    memory first: vLLM sizes its share from the memory that is free at start-up."""
    free_cuda_cache()
    # in-process engine core: apply_model (the weight push) runs here on the live model, no pickling
    # of tensors; set before vLLM reads its environment
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM
    return LLM(model=str(model_path), dtype="bfloat16", seed=seed, tensor_parallel_size=1,
               gpu_memory_utilization=gpu_memory_utilization, trust_remote_code=False, **extra,
               **({"max_model_len": int(max_model_len)} if max_model_len else {}))


def free_cuda_cache() -> None:
    """gc + torch.cuda.empty_cache(): memory the caller dropped goes back to the device."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def shutdown_vllm(llm) -> None:
    """vLLM's own in-process teardown (EngineCore.shutdown, cleanup_dist_env_and_memory), then the
    caching allocator. The caller must drop its own references to `llm` too."""
    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        core.shutdown()
    try:
        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory
        cleanup_dist_env_and_memory()
    except ImportError:
        pass
    free_cuda_cache()


_ENGINE: dict = {}   # {"llm", "path", "max_model_len", "util", "seed", "weights"}: this process's engine


def get_engine(model_path: str, *, max_model_len: int, seed: int = 0,
               gpu_memory_utilization: float = 0.85):
    """The process's engine for `model_path`, reused when it was built on the same folder with a
    long enough context; otherwise the old one is freed and a new one is built."""
    e = _ENGINE
    if e and (e["path"] != str(model_path) or e["max_model_len"] < max_model_len
              or e["util"] != gpu_memory_utilization or e["seed"] != seed):
        release_engine()
    if not _ENGINE:
        llm = make_vllm_engine(model_path, seed=seed, max_model_len=max_model_len,
                               gpu_memory_utilization=gpu_memory_utilization)
        _ENGINE.update(llm=llm, path=str(model_path), max_model_len=int(max_model_len),
                       util=gpu_memory_utilization, seed=seed, weights=None)
    return _ENGINE["llm"]


def release_engine() -> None:
    """Free this process's evaluation engine (no-op when there is none)."""
    llm = _ENGINE.pop("llm", None)
    _ENGINE.clear()
    if llm is not None:
        shutdown_vllm(llm)
        del llm
        free_cuda_cache()


def vllm_param_name(hf_name: str) -> str:
    """The name vLLM's load_weights reports for an HF tensor (fused qkv_proj / gate_up_proj)."""
    for a, b in ((".q_proj.", ".qkv_proj."), (".k_proj.", ".qkv_proj."), (".v_proj.", ".qkv_proj."),
                 (".gate_proj.", ".gate_up_proj."), (".up_proj.", ".gate_up_proj.")):
        if a in hf_name:
            return hf_name.replace(a, b)
    return hf_name


def push_weights(llm, groups, *, tied_embeddings: bool) -> int:
    """Copy dense HF-named weights into the live vLLM model, one group (decoder layer) per
    `load_weights` call, so only one layer's merged copies exist at a time; then drop stale KV
    blocks. Every pushed name must come back in the set of names vLLM loaded (vLLM >= 0.8 returns
    it; it silently ignores e.g. unknown '.bias' names): a mismatch is an error. Returns the number
    of tensors pushed."""
    expected, loaded, n = set(), set(), 0
    for group in groups:
        if not group:
            continue
        names = list(group)
        # in process (VLLM_ENABLE_V1_MULTIPROCESSING=0) the function runs here; load_weights maps
        # HF names onto vLLM's fused params and copies in place (casting to the engine's dtype)
        res = llm.apply_model(lambda m, g=group: m.load_weights(iter(g.items())))
        got = res[0] if isinstance(res, list) else res
        if got is None:
            raise RuntimeError("vLLM's load_weights returned no set of loaded names, so the weight "
                               "push cannot be checked; use the vLLM release of requirements-gpu.txt")
        loaded |= set(got)
        expected |= {vllm_param_name(k) for k in names if not (tied_embeddings and k.startswith("lm_head."))}
        n += len(names)
        del group, res, got
    missing = sorted(expected - loaded)
    if missing:
        raise RuntimeError(f"vLLM did not load {len(missing)} of the {len(expected)} pushed weights "
                           f"(e.g. {missing[:3]}): the sampler would keep its old weights")
    llm.reset_prefix_cache()                 # else prompts reuse KV computed with the old weights
    return n


def prompt_seed(seed: int, prompt_id: str) -> int:
    """Per-prompt sampling seed from any id ('math500-0', 'm1-MedQA-12', hex hashes): a stable
    hash of the id, so reruns and resumed runs draw the same samples."""
    h = int(hashlib.sha256(str(prompt_id).encode("utf-8")).hexdigest()[:8], 16)
    return (int(seed) * 1000003 + h) % (2 ** 31)


def _vllm_generate_chunk(llm, chunk, settings):
    """chunk: (prompt_id, prompt, sample_index) triples; samples of one prompt become one
    request with SamplingParams(n=...), seeded per prompt so reruns are reproducible."""
    from vllm import SamplingParams
    by_pid: dict[str, list] = {}
    for pid, p, j in chunk:
        by_pid.setdefault(pid, [p, []])[1].append(j)
    tok = llm.get_tokenizer()
    # token ids without added specials, exactly as the transformers path encodes the rendered
    # prompt (a text prompt would get a second BOS from vLLM's tokenizer call)
    outs = llm.generate([{"prompt_token_ids": tok(p, add_special_tokens=False).input_ids} for p, _ in by_pid.values()],
                        [SamplingParams(n=len(js), temperature=settings["temperature"], top_p=settings["top_p"],
                                        max_tokens=settings["max_new_tokens"], stop=settings["stop"] or None,
                                        seed=prompt_seed(settings["seed"], pid)) for pid, (_, js) in by_pid.items()],
                        use_tqdm=False)
    rows = []
    for (pid, (_, js)), o in zip(by_pid.items(), outs):
        for j, c in zip(js, o.outputs):
            # stop_reason: None = the tokenizer's EOS, an int = a stop token (generation_config's
            # other EOS ids), a str = a stop string
            finish = "stop" if c.finish_reason == "stop" and isinstance(c.stop_reason, str) else \
                "length" if c.finish_reason == "length" else "eos"
            rows.append({"prompt_id": pid, "sample_index": j, "text": c.text,
                         "num_tokens": len(c.token_ids), "finish": finish})
    return rows


# -----------------------------------------------------------------------------
# 4. Suites: generate (cached) and score every benchmark of a suite

def evaluate_toy(model, tokenizer, *, domain: str = "math", n_per_family: int = 200,
                 batch_size: int = 64, families=None, base_general: float | None = None,
                 max_new_tokens: dict | int | None = None, seed: int = 0, cache_dir=None,
                 return_samples: bool = False, progress: bool = False) -> dict:
    """Score a model on the toy world's test items (greedy, one sample; note a).

    Returns percent scores: {"target_score", "general_score", "forgetting" (with base_general),
    "families": {fam: {"score", "n_items", "subtasks"?, ...}}, "generation", "seconds"}.
    """
    fams = list(families) if families is not None else list(toy_world.FAMILIES)
    unknown = set(fams) - set(toy_world.FAMILIES)
    if unknown:
        raise ValueError(f"unknown toy families {sorted(unknown)}; known: {list(toy_world.FAMILIES)}")
    if domain not in ("math", "med"):
        raise ValueError(f"toy domain must be 'math' or 'med', not {domain!r}")
    t0 = time.time()
    res = {"domain": domain, "families": {}, "generation": {}}
    samples_out = {}
    for fam in fams:
        items = toy_world.make_eval_items(fam, "test", n_per_family, seed=seed)
        if isinstance(max_new_tokens, int):
            mnt = max_new_tokens
        else:
            mnt = (max_new_tokens or {}).get(fam, TOY_BENCHMARKS[fam]["max_new_tokens"])
        prompts = [loading.render_chat(tokenizer, it["prompt"]) for it in items]
        cache = Path(cache_dir) / f"toy_{fam}.jsonl" if cache_dir else None
        samples = generate(model, tokenizer, prompts, max_new_tokens=mnt, batch_size=batch_size,
                           seed=seed, cache_path=cache, prompt_ids=[it["id"] for it in items],
                           progress=progress)
        res["families"][fam] = aggregate(items, samples, TOY_BENCHMARKS[fam]["aggregate"])
        res["generation"][fam] = {"max_new_tokens": mnt, "temperature": 0.0, "n": 1}
        if return_samples:
            samples_out[fam] = [{"id": it["id"], "response": s[0]} for it, s in zip(items, samples)]
    res.update(combine_scores(res["families"], domain, base_general))
    res["seconds"] = round(time.time() - t0, 2)
    if return_samples:
        res["samples"] = samples_out
    return res


def is_instruct(name: str) -> bool:
    """The release's rule (PA: eval/generate_opencompass_config.py): BBH uses the chat template
    only for 'instruct' model names."""
    return any(m in str(name).lower() for m in ("instruct", "-ins", "ins-", "chat", "it-"))


def render_prompt(tokenizer, item: dict, *, raw: bool = False, system: str | None = None) -> str:
    if raw:
        return item["prompt"]
    msgs = ([{"role": "system", "content": system}] if system else []) + \
           [{"role": "user", "content": item["prompt"]}]
    return loading.render_chat(tokenizer, msgs)


def _prompt_style(name: str, model_name: str) -> tuple[bool, str | None]:
    """(raw, system) for benchmark `name`: base models get BBH's raw completion prompt, m1 a
    system turn (DEVIATION 1)."""
    spec = BENCHMARKS[name]
    return spec.get("raw_for_base", False) and not is_instruct(model_name), spec.get("system")


def run_benchmark(name: str, items: list[dict], model, tokenizer, *, model_name: str = "",
                  batch_size: int = 64, seed: int = 0, cache_dir=None, backend: str = "hf",
                  vllm_llm=None, overrides: dict | None = None, progress: bool = False) -> dict:
    """Generate (cached) and score one real benchmark with its paper decoding settings."""
    dec = dict(BENCHMARKS[name]["decoding"])
    dec.update({k: v for k, v in (overrides or {}).items() if v is not None})
    raw, system = _prompt_style(name, model_name)
    prompts = [render_prompt(tokenizer, it, raw=raw, system=system) for it in items]
    cache = Path(cache_dir) / f"{name}.jsonl" if cache_dir else None
    recs = generate_records(model, tokenizer, prompts, max_new_tokens=dec["max_new_tokens"],
                            temperature=dec["temperature"], top_p=dec["top_p"], n=dec["n"],
                            batch_size=batch_size, stop=dec["stop"], seed=seed, cache_path=cache,
                            prompt_ids=[it["id"] for it in items], backend=backend, vllm_llm=vllm_llm,
                            progress=progress)
    samples = [[r["text"] for r in rows] for rows in recs]
    res = aggregate(items, samples, BENCHMARKS[name]["aggregate"])
    res["mean_new_tokens"] = sum(r["num_tokens"] for rows in recs for r in rows) / max(1, sum(map(len, recs)))
    res["generation"] = dict(dec, raw_prompt=raw, system=system, seed=seed, backend=backend)
    return res


# -----------------------------------------------------------------------------
# 5. CLI

def _load_for_eval(spec: str, adapter: str | None, *, dtype=None, device=None):
    """(model, tokenizer, adapter_info) via loading.load_model (+ peft_methods.load_adapter)."""
    model, tok = loading.load_model(spec, dtype=dtype, device=device)
    info = None
    if adapter:
        peft_methods.load_adapter(model, adapter)
        model.eval()
        info = peft_methods.read_adapter_config(adapter)
    return model, tok, info


def _vllm_context(names, items, tok, model_name: str, max_new: dict, model_max: int) -> int:
    """max_model_len for the engine: the longest rendered prompt plus its benchmark's
    max_new_tokens (not the model's maximum, e.g. 131072 for Llama-3.2, whose KV cache reservation
    would be wasted), capped at the model's maximum."""
    need = 1
    for n in names:
        raw, system = _prompt_style(n, model_name)
        longest = max((len(tok(render_prompt(tok, it, raw=raw, system=system), add_special_tokens=False).input_ids)
                       for it in items[n]), default=0)
        need = max(need, longest + max_new[n])
    return min(need, model_max)


def _parse_paths(pairs) -> dict:
    """--path NAME=FILE pairs -> {NAME: FILE} for known benchmarks."""
    out = dict(p.split("=", 1) if "=" in p else (None, p) for p in pairs or [])
    if None in out:
        raise SystemExit(f"--path expects NAME=FILE, got {out[None]!r}")
    unknown = sorted(set(out) - set(BENCHMARKS))
    if unknown:
        raise SystemExit(f"--path: unknown benchmark {unknown[0]!r}; known: {sorted(BENCHMARKS)}")
    return out


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description="Both-axis evaluation (target + general), PEFT-Arena §Evaluation")
    g = ap.add_argument_group("model")
    g.add_argument("--model", default="toy", help="'toy', a local HF model dir, or a hub id")
    g.add_argument("--adapter", default=None, help="checkpoint dir written by peft_methods.save_adapter, or an HF PEFT adapter dir")
    g.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: bf16 on CUDA, fp32 on CPU)")
    g.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    g = ap.add_argument_group("what to score")
    g.add_argument("--suite", default=None, choices=["toy", *SUITES],
                   help="default: toy for --model toy; a real model must name its suite (toy items "
                   "on a real model only when asked: --suite toy)")
    g.add_argument("--domain", default=None, choices=["math", "med"],
                   help="which target counts as target_score (toy default: math; real: the suite's)")
    g.add_argument("--extra", nargs="*", default=[], choices=[n for n, r in BENCHMARKS.items() if r["axis"] == "extra"],
                   help="extra benchmarks (not in the paper's mean)")
    g.add_argument("--limit", type=int, default=None, help="items per benchmark (per BBH task / m1 source); default all")
    g.add_argument("--n-per-family", type=int, default=200, help="toy items per family")
    g.add_argument("--families", nargs="*", default=None, help="toy families (default: all five)")
    g = ap.add_argument_group("data (real benchmarks)")
    g.add_argument("--data-dir", default="data", help="root of the local benchmark files (see BENCHMARKS)")
    g.add_argument("--path", action="append", default=[], metavar="NAME=FILE", help="explicit file per benchmark")
    g.add_argument("--bbh-prompt-dir", default=None, help="directory of <task>.txt CoT prompts")
    g.add_argument("--allow-hub", action="store_true", help="try the hub ids when no local file is found")
    g = ap.add_argument_group("generation")
    g.add_argument("--backend", default="auto", choices=["auto", "hf", "vllm"],
                   help="auto = vLLM when it imports and CUDA is present (never for the toy suite)")
    g.add_argument("--batch-size", type=int, default=64, help="prompts x samples per generate() call (hf)")
    g.add_argument("--vllm-gpu-memory-utilization", type=float, default=0.85,
                   help="vLLM: fraction of the GPU's memory the engine may take (weights + KV cache)")
    g.add_argument("--max-new-tokens", type=int, default=-1, help="tokens; -1 = each benchmark's paper value")
    g.add_argument("--num-samples", type=int, default=-1, help="samples per math prompt; -1 = 16 (paper)")
    g.add_argument("--temperature", type=float, default=-1.0, help="math sampling temperature; -1 = 0.6 (paper)")
    g.add_argument("--seed", type=int, default=0, help="sampling seed (paper: 0 for math)")
    g = ap.add_argument_group("output")
    g.add_argument("--out", default=None, help="output dir: results.json, config.json, generations/*.jsonl")
    g.add_argument("--base-general", type=float, default=None, help="base model's general score (percent) -> forgetting")
    g.add_argument("--base-results", default=None, help="a base model's results.json (its general_score -> forgetting)")
    g.add_argument("--bench", action="store_true", help="time the toy suite (no generation cache) and print seconds")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    g.add_argument("--progress", action="store_true", help="show generation progress bars")
    return ap


def main(argv=None, *, keep_engine: bool = False, context_suites=()) -> dict:
    """The CLI. `keep_engine`: leave this process's vLLM engine alive for a next call on the same
    base model (arena.py scores the target and general suites with one engine, then calls
    release_engine()); by default it is freed before returning. `context_suites`: suites the kept
    engine will also serve, so its max_model_len covers their prompts too (no rebuild)."""
    args = build_parser().parse_args(argv)
    if args.suite is None:
        if args.model != "toy":
            raise SystemExit(f"evaluate.py: --suite is required for a real model ({args.model}): "
                             "math | med | general | all (or toy to score the toy items on it)")
        args.suite = "toy"
    try:
        return _main(args, argv, context_suites)
    finally:
        if not keep_engine:
            release_engine()


def _start_run(args, argv) -> tuple[Path | None, float | None]:
    """Checks, threads, the base model's general score, and the resolved config.json."""
    for flag, v in (("--limit", args.limit or 1), ("--n-per-family", args.n_per_family), ("--batch-size", args.batch_size)):
        assert v > 0, f"{flag} must be positive"
    if args.out is None and not args.bench:
        raise SystemExit("--out DIR is required (or --bench)")
    if args.threads:
        torch.set_num_threads(args.threads)
    base_general = args.base_general
    if args.base_results:
        with open(args.base_results, encoding="utf-8") as f:
            base_general = json.load(f)["general_score"]
    out = Path(args.out) if args.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
        config = dict(vars(args), base_general_resolved=base_general, ifeval_backends=IFEVAL_BACKENDS,
                      argv=sys.argv if argv is None else list(argv))
        loading.atomic_write_json(out / "config.json", config)
    print(f"[evaluate] model={args.model} adapter={args.adapter} suite={args.suite} "
          f"torch_threads={torch.get_num_threads()}", file=sys.stderr)
    return out, base_general


def _run_toy(args, out, base_general, t0: float) -> dict:
    """--suite toy: the five toy families, greedy, on CPU."""
    model, tok, ainfo = _load_for_eval(args.model, args.adapter, dtype=args.dtype, device=args.device)
    t_load = time.time() - t0
    res = evaluate_toy(model, tok, domain=args.domain or "math", n_per_family=args.n_per_family,
                       batch_size=args.batch_size, families=args.families, base_general=base_general,
                       seed=args.seed, progress=args.progress,
                       max_new_tokens=None if args.max_new_tokens < 0 else args.max_new_tokens,
                       cache_dir=None if (args.bench or out is None) else out / "generations")
    res.update(model=args.model, adapter=args.adapter, adapter_config=ainfo, suite="toy",
               load_seconds=round(t_load, 2), total_seconds=round(time.time() - t0, 2),
               torch_threads=torch.get_num_threads())
    if args.bench:
        print(f"[bench] toy suite: {len(res['families'])} families x {args.n_per_family} items, "
              f"batch {args.batch_size}, {torch.get_num_threads()} threads: scoring "
              f"{res['seconds']:.1f} s, load {t_load:.1f} s, total {res['total_seconds']:.1f} s")
    return res


def _load_real(args, names, items: dict, paths: dict, context_suites):
    """(backend, model, tokenizer, vLLM engine, adapter info) for a real suite. With vLLM: the
    process's engine on the base model's folder, holding the weights to score: an adapter is merged
    into dense weights in memory (PEFT-Arena §Evaluation: every adapter is merged into a dense bf16
    HF model and served with vLLM) and pushed in layer by layer, no merged copy on disk. The engine
    is reused by later suites and adapters of the same base; its context also covers
    `context_suites`, the suites a kept engine will serve next."""
    backend = args.backend
    if backend == "auto":
        backend = "vllm" if vllm_available() else "hf"
    if backend == "vllm" and not vllm_available():
        raise SystemExit("--backend vllm needs vllm installed and a CUDA GPU")
    if backend != "vllm":
        model, tok, ainfo = _load_for_eval(args.model, args.adapter, dtype=args.dtype, device=args.device)
        return backend, model, tok, None, ainfo
    ctx_names = list(dict.fromkeys(names + [n for c in context_suites for n in SUITES[c]]))
    ctx_items = {n: items[n] if n in items else load_benchmark(
        n, args.data_dir, paths.get(n), allow_hub=args.allow_hub, bbh_prompt_dir=args.bbh_prompt_dir,
        limit=args.limit) for n in ctx_names}
    max_new = {n: (args.max_new_tokens if args.max_new_tokens > 0
                   else BENCHMARKS[n]["decoding"]["max_new_tokens"]) for n in ctx_names}
    path, _ = loading.resolve_spec(args.model)
    tok = loading.load_tokenizer(args.model)
    hf_cfg = AutoConfig.from_pretrained(path)
    ctx = _vllm_context(ctx_names, ctx_items, tok, args.model, max_new,
                        int(getattr(hf_cfg, "max_position_embeddings", 1 << 30)))
    llm = get_engine(path, max_model_len=ctx, seed=args.seed, gpu_memory_utilization=args.vllm_gpu_memory_utilization)
    want = str(args.adapter) if args.adapter else None
    if _ENGINE.get("weights") != want:
        model, _, _ = _load_for_eval(args.model, args.adapter, dtype="float32", device="cpu")
        push_weights(llm, peft_methods.iter_merged_state(model),
                     tied_embeddings=bool(getattr(hf_cfg, "tie_word_embeddings", False)))
        _ENGINE["weights"] = want
        del model
        free_cuda_cache()
    ainfo = peft_methods.read_adapter_config(args.adapter) if args.adapter else None
    return backend, None, tok, llm, ainfo


def _run_real(args, out, base_general, t0: float, context_suites) -> dict:
    """--suite math | med | general | all: the paper's benchmarks, then the suite's aggregates."""
    domain = args.domain or ({"math": "math", "med": "med"}.get(args.suite, "math"))
    names = SUITES[args.suite] + [e for e in args.extra if e not in SUITES[args.suite]]
    paths = _parse_paths(args.path)
    items = {n: load_benchmark(n, args.data_dir, paths.get(n), allow_hub=args.allow_hub,
                               bbh_prompt_dir=args.bbh_prompt_dir, limit=args.limit) for n in names}
    backend, model, tok, llm, ainfo = _load_real(args, names, items, paths, context_suites)
    overrides_math = {"n": None if args.num_samples < 0 else args.num_samples,
                      "temperature": None if args.temperature < 0 else args.temperature}
    uses_ifeval = any(BENCHMARKS[n]["scorer"] == "ifeval" for n in names)
    if uses_ifeval:   # first real use: fetch punkt_tab, warn about fallbacks
        ensure_ifeval_data()
        ifeval_fallbacks_used(reset=True)
    bench = {}
    for n in names:
        ov = dict(overrides_math) if BENCHMARKS[n]["decoding"]["n"] > 1 else {}
        if args.max_new_tokens > 0:
            ov["max_new_tokens"] = args.max_new_tokens
        bench[n] = run_benchmark(n, items[n], model, tok, model_name=args.model, batch_size=args.batch_size,
                                 seed=args.seed, cache_dir=out / "generations", backend=backend,
                                 vllm_llm=llm, overrides=ov, progress=args.progress)
        print(f"[evaluate] {n}: {bench[n]['score']:.2f} ({bench[n]['n_items']} items x "
              f"{bench[n]['n_samples']} samples)", file=sys.stderr)
    res = {"model": args.model, "adapter": args.adapter, "adapter_config": ainfo, "suite": args.suite,
           "benchmarks": bench, "backend": backend, "limit": args.limit,
           "total_seconds": round(time.time() - t0, 2)}
    res.update(summarize_suite(bench, domain=domain, base_general=base_general))
    res["ifeval_fallback_used"] = ifeval_fallbacks_used() if uses_ifeval else []
    if res["ifeval_fallback_used"]:
        print(f"[evaluate] WARNING: IFEval used built-in fallbacks for {res['ifeval_fallback_used']} "
              "(not the reference's nltk/langdetect); see ifeval_fallback_used in results.json",
              file=sys.stderr)
    return res


def _main(args, argv, context_suites=()) -> dict:
    out, base_general = _start_run(args, argv)
    t0 = time.time()
    if args.suite == "toy":
        res = _run_toy(args, out, base_general, t0)
    else:
        res = _run_real(args, out, base_general, t0, context_suites)
    res["ifeval_backends"] = IFEVAL_BACKENDS
    if out:
        loading.atomic_write_json(out / "results.json", res)
    parts = [f"{k}={res[k]:.2f}" for k in ("target_score", "general_score", "forgetting") if k in res]
    print(f"[evaluate] {args.model}{' + ' + args.adapter if args.adapter else ''} suite={args.suite}: "
          + " ".join(parts) + (f" -> {out / 'results.json'}" if out else ""))
    return res


if __name__ == "__main__":
    loading.run_cli("evaluate.py", main, resume_hint="rerun the same command: the generations "
                    "cached under --out/generations are reused", one_line=(DatasetMissing,))
