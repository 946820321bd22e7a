"""toy_world.py — the miniature arena: a tiny Qwen2 pretrained here on synthetic stand-ins for the
paper's benchmarks, so the whole arena runs on a 2-core CPU in minutes.

It owns the synthetic world itself (tokenizer, model config, task generators, pretraining).
Scoring is NOT here: every toy item names the scorer of `evaluate.py` it is graded with, the same
grader the real benchmarks use (math: last \\boxed{}; medical: last option letter; BBH: text after
"answer is"; NQ: normalised gold contained in the prediction; IFEval: the instruction checkers).

PEFT-Arena's two axes (target = math or medical, general = mean of BBH, IFEval, NQ) and their
miniature here:

    paper benchmark              toy family   what it is here
    IFEval (general)             ifeval       copy a word list under 1-2 verifiable format instructions
                                              (IFEval ids and kwargs, scored by the IFEval checkers)
    NQ-open (general)            nq           questions about a fixed fictional atlas learned in
                                              pretraining; NQ rule (gold contained in the answer)
    BBH (general)                bbh          boolean expressions, Dyck completion, word sorting,
                                              object counting; "So the answer is X."; mean over subtasks
    MATH-500 etc. (target)       math         2-3 step single-digit word problems with a worked
                                              solution ending in \\boxed{N}
    m1 medical QA (target)       med          5-option MCQ over a fictional pharmacopoeia

Splits are disjoint by construction: every item has a canonical key (its generating parameters) and
belongs to the test split iff a stable hash of that key falls in the test bucket (1 in 5); the
train generator rejects test keys and vice versa, whatever the seed.

Pretraining (`pretrain`, run by `python arena.py pretrain-toy`) mixes the general families (the
bulk), arithmetic drills (single facts and story-free chains), atlas facts, and only a trickle of
the two target domains, so the base model starts low but not at zero on the targets, like
Qwen2.5-7B on math. Half of the pretraining math examples give the bare answer without the
working (note N4).

Deviations
1. Stand-ins, not the benchmarks: the toy families share the real benchmarks' answer formats and
   scorers, not their content. Numbers from the toy world illustrate the paper's trade-off; they are
   not comparable with the paper's tables.

Implementation notes (of the miniature; no paper number depends on them)
N2. The toy tokenizer is a 1024-symbol byte-level BPE learned offline from a fixed sample of the
    toy world (digits kept as single tokens), not Qwen2's 151k vocabulary: a character-level
    tokenizer made sequences ~3x longer. It is wrapped as a normal `transformers` fast tokenizer
    with a ChatML template and no system prompt.
N3. Pretraining loss is on assistant tokens only for chat examples (a chat "instruct" base) and on
    every token of plain documents (atlas and pharmacopoeia statements).
N4. Two answer modes for math. Half of the pretraining math examples (`MATH_DIRECT_FRAC`) are
    written as "The answer is \\boxed{N}." with no working, so the base answers some test prompts
    directly (rarely right) and works the others out (mostly right), and T = 1 samples often take
    the worked mode where the greedy answer does not. This is the stand-in for a real base model
    that often answers a math prompt without reasoning, and it gives RLVR what it has on Qwen2.5:
    right answers that sampling already finds, to be made the greedy answer. With one mode only,
    the base's errors were confident wrong facts that T = 1 samples rarely avoided, and GRPO had
    little to reinforce (train_grpo.py's toy-preset notes).

Shapes: B batch, T tokens.
"""
from __future__ import annotations

import functools
import hashlib
import math
import random
import shutil
import time
from pathlib import Path

import torch

import loading

# -----------------------------------------------------------------------------
# Tokenizer and model config

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

TOY_CONFIG = dict(
    vocab_size=1024, hidden_size=128, intermediate_size=512, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
    rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=True, use_sliding_window=False,
    hidden_act="silu", initializer_range=0.02)


BPE_VOCAB = 1024  # embedding rows (a multiple of 64); 3 specials + 256 bytes + 765 merges


def _tokenizer_corpus(n: int = 6000, seed: int = 12345) -> list[str]:
    """Fixed text sample of the whole world (every family, both documents) to learn BPE merges."""
    rng = random.Random(seed)
    texts = atlas_documents() + pharma_documents()
    for fam in FAMILIES:
        it = iter_items(fam, "train", seed, dedup=False)
        for _ in range(n // len(FAMILIES)):
            x = next(it)
            texts.append(x["prompt"] + "\n" + item_response(x))
    texts += [" ".join(arithmetic_drill(rng)) for _ in range(n // 10)]
    return texts


@functools.lru_cache(maxsize=1)
def _trained_bpe_json() -> str:
    """The learned tokenizer as JSON (cached: training the merges takes a few seconds)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=BPE_VOCAB, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False, min_frequency=2)
    tk.train_from_iterator(_tokenizer_corpus(), trainer=trainer)
    return tk.to_str()


def build_toy_tokenizer():
    """Byte-level BPE (1024 symbols) learned from a fixed sample of the toy world (note N2).

    Digits are always single tokens (so arithmetic is done digit by digit, as in Qwen2's
    tokenizer); the specials are ChatML's. Built deterministically: same merges on every machine.
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast
    tk = Tokenizer.from_str(_trained_bpe_json())
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>")
    tok.chat_template = CHAT_TEMPLATE
    tok.model_max_length = TOY_CONFIG["max_position_embeddings"]
    return tok


def toy_config(tokenizer=None):
    from transformers import Qwen2Config
    tok = tokenizer or build_toy_tokenizer()
    return Qwen2Config(**TOY_CONFIG, bos_token_id=None, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id)


def build_random_toy_model(seed: int = 0, num_hidden_layers: int | None = None):
    """(model, tokenizer) with the toy architecture and random weights (fp32, CPU, eval mode)."""
    from transformers import Qwen2ForCausalLM
    tok = build_toy_tokenizer()
    cfg = toy_config(tok)
    if num_hidden_layers is not None:
        cfg.num_hidden_layers = num_hidden_layers
        cfg.layer_types = cfg.layer_types[:num_hidden_layers]  # keep the config self-consistent
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(cfg).eval()
    return model, tok


# -----------------------------------------------------------------------------
# Splits: disjoint by construction

TEST_BUCKETS = 5  # 1 key in 5 is a test key


def split_of(key: str) -> str:
    """'test' or 'train' from an item's canonical key (never from the seed).

    nq keys split by paraphrase template (held-out phrasings test recall of pretraining facts);
    every other family by a stable hash of the key.
    """
    if key.startswith("nq|"):
        return "test" if int(key.rsplit("|", 1)[1]) in NQ_TEST_TEMPLATES else "train"
    h = int(hashlib.sha1(key.encode()).hexdigest()[:8], 16)
    return "test" if h % TEST_BUCKETS == 0 else "train"


# -----------------------------------------------------------------------------
# Fixed vocabularies and knowledge bases (built from a fixed seed, independent of any run seed)

WORDS = ("apple bird cake door egg fish goat hat ink jam kite lamp moon nest owl pear queen rose "
         "sun tree van wolf box yarn zoo ant bell cup desk fox gift hill iron jar key leaf map nut "
         "oak pen ring star tent vase web ball coin drum fern").split()
NUM_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
NAMES = ["Ana", "Ben", "Cara", "Dev", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jo", "Kim", "Leo",
         "Mia", "Ned", "Ola", "Pia", "Raj", "Sam", "Tia", "Uma"]
ITEMS = ["apples", "books", "coins", "shells", "pens", "cards", "stones", "cups", "keys", "eggs"]
ANIMALS = ["cat", "dog", "fish", "bird", "frog", "goat", "duck", "horse"]


def _names(rng: random.Random, n: int, syll: list[str], k=(2, 3)) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        w = "".join(rng.choice(syll) for _ in range(rng.randint(*k))).capitalize()
        if w not in out and 4 <= len(w) <= 9:
            out.append(w)
    return out


def _build_atlas():
    """A fictional atlas: 40 lands, each with a capital, a river, an animal and a colour."""
    rng = random.Random(1234)
    syll = ["ka", "lo", "mi", "ra", "ze", "vo", "tu", "pe", "si", "na", "bo", "ri", "da", "fe", "gu"]
    lands = _names(rng, 40, syll, (2, 3))
    cities = _names(rng, 40, ["mar", "tel", "vin", "os", "dul", "ka", "pre", "sor", "bel", "qua",
                              "nim", "ro"], (2, 2))
    rivers = _names(rng, 40, ["ash", "ul", "em", "or", "ith", "an", "sel", "mo", "ra", "fen"], (2, 2))
    colours = ["red", "blue", "green", "gold", "white", "black", "purple", "orange"]
    atlas = {}
    for i, land in enumerate(lands):
        atlas[land] = {"capital": cities[i], "river": rivers[i],
                       "animal": ANIMALS[rng.randrange(len(ANIMALS))],
                       "colour": colours[rng.randrange(len(colours))]}
    return atlas


def _build_pharmacopoeia():
    """A fictional clinical knowledge base: 30 diseases, each with a drug, an organ, a symptom."""
    rng = random.Random(4321)
    diseases = [n + " " + rng.choice(["fever", "syndrome", "pox", "palsy", "flu"]) for n in
                _names(rng, 30, ["bor", "van", "ly", "the", "cor", "mu", "sta", "pi", "ren", "xo"], (2, 2))]
    drugs = [n.lower() for n in _names(rng, 30, ["zo", "la", "mid", "pra", "xin", "tol", "cef",
                                                   "ril", "dex", "ba"], (2, 3))]
    organs = ["liver", "heart", "lungs", "skin", "kidneys", "brain", "stomach", "eyes", "bones", "blood"]
    symptoms = ["cough", "rash", "headache", "chills", "nausea", "fatigue", "itching", "dizziness",
                "cramps", "thirst"]
    kb = {}
    for i, d in enumerate(diseases):
        kb[d] = {"drug": drugs[i], "organ": organs[rng.randrange(len(organs))],
                 "symptom": symptoms[rng.randrange(len(symptoms))]}
    return kb


ATLAS = _build_atlas()
PHARMA = _build_pharmacopoeia()

# -----------------------------------------------------------------------------
# Family: ifeval (IFEval analogue). Content task: list 2-4 words; plus 1-2 format instructions
# written in IFEval's own instruction ids and kwargs, so evaluate.py's checkers grade them.

END_PHRASES = ["Hope this helps.", "That is all.", "Bye now."]
PS_MARKERS = ["P.S.", "P.P.S"]


_IFEVAL_FIXED = {"change_case:english_capital": "Use only capital letters.",
                 "change_case:english_lowercase": "Use only lowercase letters.",
                 "startend:quotation": "Wrap your whole answer in double quotes.",
                 "punctuation:no_comma": "Do not use any commas.",
                 "detectable_format:title": "Give it a title in double angular brackets, like <<title>>."}


def _ifeval_instruction(rng, iid, words):
    """Return (instruction text, kwargs) for one IFEval instruction id."""
    if iid in _IFEVAL_FIXED:                  # no parameters, no random draw
        return _IFEVAL_FIXED[iid], {}
    if iid == "startend:end_checker":
        p = rng.choice(END_PHRASES)
        return f"End your answer with the exact phrase '{p}'", {"end_phrase": p}
    if iid == "keywords:existence":
        k = rng.choice([w for w in WORDS if w not in words])
        return f"Include the keyword {k}.", {"keywords": [k]}
    if iid == "length_constraints:number_words":
        if rng.random() < 0.5:
            n = len(words) + rng.randint(1, 3)
            return f"Answer with at least {n} words.", {"relation": "at least", "num_words": n}
        n = len(words)  # "less than n" forces dropping the last word
        return f"Answer with less than {n} words.", {"relation": "less than", "num_words": n}
    if iid == "detectable_content:postscript":
        m = rng.choice(PS_MARKERS)
        return f"At the end, add a postscript starting with {m}", {"postscript_marker": m}
    raise KeyError(iid)


IFEVAL_IDS = ["change_case:english_capital", "change_case:english_lowercase", "startend:quotation",
              "startend:end_checker", "keywords:existence", "length_constraints:number_words",
              "punctuation:no_comma", "detectable_format:title", "detectable_content:postscript"]
# pairs that cannot both hold, or whose canonical response would be ambiguous
_IFEVAL_CONFLICTS = {frozenset(["change_case:english_capital", "change_case:english_lowercase"]),
                     frozenset(["startend:quotation", "startend:end_checker"]),
                     frozenset(["startend:quotation", "detectable_content:postscript"]),
                     frozenset(["startend:end_checker", "detectable_content:postscript"]),
                     frozenset(["startend:quotation", "detectable_format:title"]),
                     frozenset(["change_case:english_capital", "detectable_content:postscript"]),
                     frozenset(["change_case:english_capital", "startend:end_checker"]),
                     frozenset(["change_case:english_lowercase", "startend:end_checker"]),
                     frozenset(["change_case:english_lowercase", "detectable_content:postscript"]),
                     frozenset(["length_constraints:number_words", "keywords:existence"]),
                     frozenset(["length_constraints:number_words", "detectable_format:title"]),
                     frozenset(["length_constraints:number_words", "startend:end_checker"]),
                     frozenset(["length_constraints:number_words", "detectable_content:postscript"])}


def _ifeval_response(words, iids, kwargs):
    """The canonical response that satisfies every instruction (what pretraining teaches)."""
    ws = list(words)
    for iid, kw in zip(iids, kwargs):
        if iid == "length_constraints:number_words":
            n = kw["num_words"]
            if kw["relation"] == "at least":
                ws = [ws[i % len(ws)] for i in range(n)]  # cycle the list until long enough
            else:
                ws = ws[: n - 1]
        if iid == "keywords:existence":
            ws = ws + kw["keywords"]
    sep = " " if "punctuation:no_comma" in iids else ", "
    text = sep.join(ws)
    if "detectable_format:title" in iids:
        text = "<<Word list>>\n" + text
    if "change_case:english_capital" in iids:  # after the title: the checker reads every letter
        text = text.upper()
    if "change_case:english_lowercase" in iids:
        text = text.lower()
    if "startend:quotation" in iids:
        text = '"' + text + '"'
    for iid, kw in zip(iids, kwargs):
        if iid == "startend:end_checker":
            text = text + " " + kw["end_phrase"]
        if iid == "detectable_content:postscript":
            text = text + "\n" + kw["postscript_marker"] + " Thanks."
    return text


def _gen_ifeval(rng: random.Random):
    k = rng.randint(2, 4)
    words = rng.sample(WORDS, k)
    if rng.random() < 0.5:  # capitalised inputs make the lowercase instruction non-trivial
        words = [w.capitalize() for w in words]
    n_inst = 1 if rng.random() < 0.5 else 2
    while True:
        iids = sorted(rng.sample(IFEVAL_IDS, n_inst))
        if n_inst == 1 or frozenset(iids) not in _IFEVAL_CONFLICTS:
            break
    texts, kwargs = zip(*[_ifeval_instruction(rng, i, words) for i in iids])
    prompt = f"List these words: {', '.join(words)}. " + " ".join(texts)
    key = "ifeval|" + prompt
    return key, {"family": "ifeval", "subtask": "+".join(i.split(":")[1] for i in iids),
                 "prompt": prompt, "scorer": "ifeval", "instruction_id_list": list(iids),
                 "kwargs": list(kwargs), "gold": _ifeval_response(words, iids, kwargs),
                 "checkers": "builtin"}  # scored with evaluate.py's built-in checkers


# -----------------------------------------------------------------------------
# Family: nq (NQ analogue). Four paraphrases per relation; the last one is held out for test,
# and each fact's train paraphrases are seen in pretraining.

NQ_TEMPLATES = {
    "capital": ["What is the capital of {x}?", "Name the capital city of {x}.",
                "Which city is the capital of {x}?", "What city is the seat of government of {x}?",
                "Tell me which city is the capital of {x}.",
                "What's the capital of {x}?", "Tell me the capital of {x}."],
    "river": ["What is the main river of {x}?", "Name the river that flows through {x}.",
              "Which river runs through {x}?", "What river crosses {x}?",
              "Tell me which river runs through {x}.",
              "What's the main river of {x}?", "Tell me the main river of {x}."],
    "animal": ["What is the national animal of {x}?", "Name the national animal of {x}.",
               "Which animal is the symbol of {x}?", "What animal represents {x}?",
               "Tell me which animal is the symbol of {x}.",
               "What's the national animal of {x}?", "Tell me the national animal of {x}."],
    "colour": ["What colour is the flag of {x}?", "Name the colour of the flag of {x}.",
               "Which colour is on the flag of {x}?", "What colour does the flag of {x} have?",
               "Tell me which colour is on the flag of {x}.",
               "What's the colour of the flag of {x}?", "Tell me the flag colour of {x}."],
}
NQ_TEST_TEMPLATES = (5, 6)  # these phrasings never appear in training data
NQ_ANSWERS = {"capital": "The capital of {x} is {y}.", "river": "The main river of {x} is the {y}.",
              "animal": "The national animal of {x} is the {y}.",
              "colour": "The flag of {x} is {y}."}


def _gen_nq(rng: random.Random, split: str):
    land = rng.choice(sorted(ATLAS))
    rel = rng.choice(sorted(NQ_TEMPLATES))
    t = rng.choice(NQ_TEST_TEMPLATES) if split == "test" else rng.randrange(NQ_TEST_TEMPLATES[0])
    y = ATLAS[land][rel]
    prompt = NQ_TEMPLATES[rel][t].format(x=land)
    key = f"nq|{land}|{rel}|{t}"
    return key, {"family": "nq", "subtask": rel, "prompt": prompt, "scorer": "nq", "gold": [y],
                 "response": NQ_ANSWERS[rel].format(x=land, y=y)}


def atlas_documents() -> list[str]:
    """Plain-text statements of every atlas fact (pretraining documents)."""
    docs = []
    for land, f in sorted(ATLAS.items()):
        docs.append(f"{land} is a land whose capital is {f['capital']}. The {f['river']} river flows "
                    f"through {land}. Its national animal is the {f['animal']} and its flag is {f['colour']}.")
    return docs


# -----------------------------------------------------------------------------
# Family: bbh (BBH analogue): four algorithmic sub-tasks answered "So the answer is X."

def _bool_expr(rng):
    vals = [rng.choice([True, False]) for _ in range(rng.randint(3, 4))]
    negs = [rng.random() < 0.3 for _ in vals]
    ops = [rng.choice(["and", "or"]) for _ in range(len(vals) - 1)]
    terms = [("not " if n else "") + str(v) for v, n in zip(vals, negs)]
    # explicit left-to-right grouping so precedence never matters
    expr = terms[0]
    for i, (op, t) in enumerate(zip(ops, terms[1:])):
        expr = f"{expr} {op} {t}" if i == 0 else f"({expr}) {op} {t}"
    steps = []
    cur = [(not v) if n else v for v, n in zip(vals, negs)]
    for v, n, c in zip(vals, negs, cur):
        if n:
            steps.append(f"not {v} = {c}.")
    acc = cur[0]
    for op, c in zip(ops, cur[1:]):
        new = (acc and c) if op == "and" else (acc or c)
        steps.append(f"{acc} {op} {c} = {new}.")
        acc = new
    prompt = f"Evaluate the boolean expression: {expr}"
    return f"bool|{expr}", prompt, " ".join(steps) + f" So the answer is {acc}.", str(acc)


_PAIRS = {"(": ")", "[": "]", "{": "}", "<": ">"}


def _dyck(rng):
    stack, seq = [], []
    for _ in range(rng.randint(3, 6)):
        if stack and rng.random() < 0.35:
            seq.append(_PAIRS[stack.pop()])
        else:
            o = rng.choice(list(_PAIRS))
            stack.append(o)
            seq.append(o)
    if not stack:
        o = rng.choice(list(_PAIRS))
        stack.append(o)
        seq.append(o)
    closers = " ".join(_PAIRS[o] for o in reversed(stack))
    prompt = f"Complete the rest of the sequence, closing all brackets: {' '.join(seq)}"
    return f"dyck|{' '.join(seq)}", prompt, f"So the answer is {closers}.", closers


def _sorting(rng):
    while True:
        ws = rng.sample(WORDS, 3)
        if len({w[0] for w in ws}) == 3:
            break
    s = " ".join(sorted(ws))
    prompt = f"Sort the following words alphabetically: {' '.join(ws)}"
    return f"sort|{' '.join(ws)}", prompt, f"So the answer is {s}.", s


def _counting(rng):
    kinds = rng.sample(ANIMALS, rng.randint(2, 3))
    counts = [rng.randint(1, 4) for _ in kinds]
    parts = [("a " + k if c == 1 else f"{NUM_WORDS[c]} {k}s") for k, c in zip(kinds, counts)]
    listing = ", ".join(parts[:-1]) + " and " + parts[-1]
    total = sum(counts)
    prompt = f"I have {listing}. How many animals do I have?"
    steps = " + ".join(str(c) for c in counts) + f" = {total}."
    return f"count|{listing}", prompt, f"{steps} So the answer is {total}.", str(total)


BBH_SUBTASKS = {"boolean_expressions": _bool_expr, "dyck_languages": _dyck,
                "word_sorting": _sorting, "object_counting": _counting}


def _gen_bbh(rng: random.Random, subtask: str | None = None):
    sub = subtask or rng.choice(sorted(BBH_SUBTASKS))
    key, prompt, response, gold = BBH_SUBTASKS[sub](rng)
    return "bbh|" + key, {"family": "bbh", "subtask": sub, "prompt": prompt, "scorer": "bbh",
                          "gold": gold, "response": response}


# -----------------------------------------------------------------------------
# Family: math (MATH analogue): 2-3 single-digit steps, worked chain, \boxed{N}

_PLUS = ["finds {n} more", "gets {n} more", "buys {n} more"]
_MINUS = ["gives away {n}", "loses {n}", "sells {n}"]


def _chain_step(rng: random.Random, cur: int) -> tuple[str, int, int]:
    """One step of a worked chain from the running total `cur`: (op, n, new total). Subtract
    (half the time, only from >= 3) or add a single digit, the sum kept <= 18 so that every step
    is a fact of the arithmetic drill (from 18 itself: + 1). Shared by `_gen_math` and
    `chain_drill`."""
    if cur >= 3 and rng.random() < 0.5:
        n = rng.randint(1, min(9, cur))
        return "-", n, cur - n
    n = rng.randint(1, max(1, min(9, 18 - cur)))
    return "+", n, cur + n


def _gen_math(rng: random.Random):
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a = rng.randint(1, 9)
    steps, cur, ops = [], a, []
    for _ in range(rng.randint(2, 3)):
        op, n, nxt = _chain_step(rng, cur)
        ops.append((op, n, rng.randrange(3)))   # the third field picks the story's verb
        steps.append(f"{cur} {op} {n} = {nxt}.")
        cur = nxt
    pronoun = "she" if name in NAMES[::2] else "he"
    story = [f"{name} has {a} {item}."]
    for i, (op, n, v) in enumerate(ops):
        verb = (_PLUS if op == "+" else _MINUS)[v].format(n=n)
        story.append(f"Then {pronoun} {verb}." if i else f"{name} {verb}.")
    prompt = " ".join(story) + f" How many {item} does {name} have now?"
    response = " ".join(steps) + f" The answer is \\boxed{{{cur}}}."
    key = f"math|{name}|{item}|{a}|" + ",".join(f"{o}{n}{v}" for o, n, v in ops)
    return key, {"family": "math", "subtask": f"{len(ops)}-step", "prompt": prompt, "scorer": "math",
                 "gold": str(cur), "response": response}


def arithmetic_drill(rng: random.Random):
    """'Compute 7 + 5.' -> '7 + 5 = 12.' (general pretraining data, not a scored family)."""
    a = rng.randint(0, 18)
    if rng.random() < 0.5:
        b = rng.randint(0, min(9, a))
        return f"Compute {a} - {b}.", f"{a} - {b} = {a - b}."
    b = rng.randint(0, min(9, 18 - a))
    return f"Compute {a} + {b}.", f"{a} + {b} = {a + b}."


def chain_drill(rng: random.Random):
    """'Compute 6 + 5 - 3.' -> '6 + 5 = 11. 11 - 3 = 8.' (general pretraining data): the worked
    chain of the math family without the story, so the base learns to carry a running total
    from step to step (the same steps as `_gen_math`: `_chain_step`)."""
    cur = rng.randint(1, 9)
    expr, steps = [str(cur)], []
    for _ in range(rng.randint(2, 3)):
        op, n, nxt = _chain_step(rng, cur)
        expr.append(f"{op} {n}")
        steps.append(f"{cur} {op} {n} = {nxt}.")
        cur = nxt
    return f"Compute {' '.join(expr)}.", " ".join(steps)


def direct_math_response(item: dict) -> str:
    """The bare-answer form of a math solution, no working: 'The answer is \\boxed{8}.'"""
    return f"The answer is \\boxed{{{item['gold']}}}."


# -----------------------------------------------------------------------------
# Family: med (medical-QA analogue): 5-option MCQ over the pharmacopoeia

MED_QUESTIONS = {"drug": "Which drug treats {d}?", "organ": "Which organ does {d} affect?",
                 "symptom": "What is the main symptom of {d}?"}
MED_FACTS = {"drug": "{d} is treated with {y}.", "organ": "{d} affects the {y}.",
             "symptom": "The main symptom of {d} is {y}."}
LETTERS = "ABCDE"


def _gen_med(rng: random.Random):
    d = rng.choice(sorted(PHARMA))
    rel = rng.choice(sorted(MED_QUESTIONS))
    y = PHARMA[d][rel]
    pool = sorted({v[rel] for v in PHARMA.values()} - {y})
    opts = rng.sample(pool, 4) + [y]
    rng.shuffle(opts)
    letter = LETTERS[opts.index(y)]
    prompt = (MED_QUESTIONS[rel].format(d=d) + "\n"
              + "\n".join(f"{L}. {o}" for L, o in zip(LETTERS, opts))
              + "\nAnswer with the letter of the correct option.")
    response = MED_FACTS[rel].format(d=d, y=y) + f" The answer is ({letter})."
    key = f"med|{d}|{rel}|{'|'.join(opts)}"
    return key, {"family": "med", "subtask": rel, "prompt": prompt, "scorer": "choice",
                 "options": LETTERS, "gold": letter, "response": response}


def pharma_documents() -> list[str]:
    return [f"{d} affects the {f['organ']}. Its main symptom is {f['symptom']}. {d} is treated with "
            f"{f['drug']}." for d, f in sorted(PHARMA.items())]


# -----------------------------------------------------------------------------
# Public item API: items, SFT/RL rows, prompt sets

FAMILIES = {"ifeval": "general", "nq": "general", "bbh": "general", "math": "target", "med": "target"}
GENERAL_FAMILIES = [f for f, k in FAMILIES.items() if k == "general"]
TARGET_DOMAINS = ["math", "med"]
_GENERATORS = {"ifeval": lambda rng, split: _gen_ifeval(rng), "nq": _gen_nq,
               "bbh": lambda rng, split: _gen_bbh(rng), "math": lambda rng, split: _gen_math(rng),
               "med": lambda rng, split: _gen_med(rng)}
# seed offsets keep the streams of different families and splits independent
_SPLIT_SALT = {"train": 0, "test": 7919}


def _distinct(draw, split: str, dedup: bool, what: str):
    """Endless stream of the items `draw()` returns that belong to `split`, deduplicated by
    canonical key unless `dedup=False`; each gets its stable id and key."""
    seen: set[str] = set()
    misses = 0
    while True:
        key, item = draw()
        if split_of(key) != split or (dedup and key in seen):
            misses += 1
            if misses > 200_000:
                raise RuntimeError(f"{what} ran out of distinct {split} items")
            continue
        if dedup:
            seen.add(key)
        item["id"] = f"{item['family']}-{split}-{hashlib.sha1(key.encode()).hexdigest()[:10]}"
        item["key"] = key
        yield item


def iter_items(family: str, split: str, seed: int = 0, dedup: bool = True):
    """Endless stream of items of `family` in `split`, deduplicated by canonical key unless
    `dedup=False` (pretraining samples with replacement: the nq train split has only 640 items)."""
    if family not in _GENERATORS:
        raise KeyError(f"unknown toy family {family!r}; known: {sorted(_GENERATORS)}")
    if split not in _SPLIT_SALT:
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    rng = random.Random(f"{family}|{split}|{seed}")
    yield from _distinct(lambda: _GENERATORS[family](rng, split), split, dedup, f"toy family {family!r}")


def make_eval_items(family: str, split: str = "test", n: int = 200, seed: int = 0) -> list[dict]:
    """`n` distinct scored items (dicts with id, key, family, subtask, prompt, scorer and gold,
    plus what the scorer needs). BBH is balanced over its sub-tasks so that its score (a mean over
    sub-tasks) is not dominated by one of them."""
    if family == "bbh":
        per, items = math.ceil(n / len(BBH_SUBTASKS)), []
        for sub in sorted(BBH_SUBTASKS):
            rng = random.Random(f"bbh|{sub}|{split}|{seed}")
            stream = _distinct(lambda: _gen_bbh(rng, sub), split, True, f"toy bbh/{sub}")
            items += [next(stream) for _ in range(per)]
        return items[:n] if n % len(BBH_SUBTASKS) == 0 else items
    it = iter_items(family, split, seed)
    return [next(it) for _ in range(n)]


def item_response(item: dict) -> str:
    """The canonical (teacher) response of an item."""
    return item.get("response", item["gold"] if isinstance(item["gold"], str) else item["gold"][0])


def _target_items(domain: str, n: int, seed: int, what: str) -> list[dict]:
    if domain not in TARGET_DOMAINS:
        raise ValueError(f"toy {what} domain must be one of {TARGET_DOMAINS}, not {domain!r}")
    it = iter_items(domain, "train", seed)
    return [next(it) for _ in range(n)]


def make_sft_rows(domain: str, n: int, seed: int = 0) -> list[dict]:
    """Target-domain SFT set (train split): {prompt, response} with worked responses."""
    return [{"prompt": x["prompt"], "response": item_response(x)}
            for x in _target_items(domain, n, seed + 1000, "SFT")]


def make_rl_rows(domain: str, n: int, seed: int = 0) -> list[dict]:
    """Target-domain RL set (train split): {prompt, answer} (gold only, no worked solution)."""
    return [{"prompt": x["prompt"], "answer": x["gold"]} for x in _target_items(domain, n, seed + 2000, "RL")]


def general_prompts(n: int, seed: int = 0) -> list[str]:
    """General-capability prompts (train split, round robin over the general families): the
    'general' distribution D_G of PEFT-Arena's capability-conditioned drift (geometry.py)."""
    its = [iter_items(f, "train", seed + 3000) for f in GENERAL_FAMILIES]
    return [next(its[i % len(its)])["prompt"] for i in range(n)]


def target_prompts(domain: str, n: int, seed: int = 0) -> list[str]:
    it = iter_items(domain, "train", seed + 4000)
    return [next(it)["prompt"] for _ in range(n)]


# -----------------------------------------------------------------------------
# Pretraining

# mixture weights of the pretraining stream (note N3 for the loss): the general families
# dominate, the targets are a trickle.
PRETRAIN_MIX = {"ifeval": 0.25, "nq": 0.20, "bbh": 0.25, "drill": 0.06, "chain": 0.06,
                "atlas": 0.08, "math": 0.015, "med": 0.03, "pharma": 0.04}
# Fraction of the pretraining math examples written as a bare answer (`direct_math_response`)
# instead of the worked chain. Web text states many answers without the working, and base models
# such as Qwen2.5 often answer a math prompt directly, which is far less accurate than working it
# out; most of what RLVR adds on such a base is choosing the worked mode every time ("sharpening"
# what sampling already finds). Here the base's greedy answer starts in the direct
# mode for many prompts while T = 1 samples often work the problem, so GRPO has that signal to
# reinforce. See note N4.
MATH_DIRECT_FRAC = 0.5


def _encode_chat(tok, prompt: str, response: str) -> tuple[list[int], list[int]]:
    """ids and labels (-100 on the prompt) for one chat example; the response ends with EOS."""
    # the chat template rendered by hand (tests check it equals apply_chat_template): rendering
    # jinja per example is slow in the pretraining loop
    p = f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
    p_ids = tok(p, add_special_tokens=False).input_ids
    r_ids = tok(response, add_special_tokens=False).input_ids + [tok.eos_token_id]
    return p_ids + r_ids, [-100] * len(p_ids) + r_ids


def pretrain_stream(tok, seed: int):
    """Endless stream of (ids, labels) examples drawn from the pretraining mixture."""
    rng = random.Random(seed)
    its = {f: iter_items(f, "train", seed, dedup=False) for f in FAMILIES}
    docs = {"atlas": atlas_documents(), "pharma": pharma_documents()}
    names, weights = zip(*PRETRAIN_MIX.items())
    while True:
        kind = rng.choices(names, weights)[0]
        if kind in docs:
            ids = tok(rng.choice(docs[kind]), add_special_tokens=False).input_ids + [tok.pad_token_id]
            yield ids, list(ids)
        elif kind == "drill":
            yield _encode_chat(tok, *arithmetic_drill(rng))
        elif kind == "chain":
            yield _encode_chat(tok, *chain_drill(rng))
        else:
            x = next(its[kind])
            if kind == "math" and rng.random() < MATH_DIRECT_FRAC:
                yield _encode_chat(tok, x["prompt"], direct_math_response(x))
            else:
                yield _encode_chat(tok, x["prompt"], item_response(x))


def _collate(batch, pad_id):
    T = max(len(ids) for ids, _ in batch)
    ids = torch.full((len(batch), T), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(batch), T), -100, dtype=torch.long)  # (B, T)
    att = torch.zeros((len(batch), T), dtype=torch.long)
    for i, (x, y) in enumerate(batch):
        ids[i, : len(x)] = torch.tensor(x)
        labels[i, : len(y)] = torch.tensor(y)
        att[i, : len(x)] = 1
    return ids, labels, att


PRETRAIN_DEFAULTS = {"steps": 2000, "batch_size": 64, "lr": 3e-3}


def pretrain(out_dir: str | Path, *, seed: int = 0, steps: int = PRETRAIN_DEFAULTS["steps"],
             batch_size: int = PRETRAIN_DEFAULTS["batch_size"], lr: float = PRETRAIN_DEFAULTS["lr"],
             warmup: int = 100, threads: int | None = None, log_every: int = 50,
             progress: bool = True) -> dict:
    """Pretrain the toy base from scratch and save it (safetensors + config + tokenizer).

    AdamW (0.9, 0.95), wd 0.1, linear warmup then cosine to 10% of `lr`, grad clip 1.0. Fixed
    step count (not a time budget) so the same seed gives the same model on any machine.
    """
    from tqdm import tqdm
    from transformers import Qwen2ForCausalLM
    if threads:
        torch.set_num_threads(threads)
    loading.set_seed(seed)
    tok = build_toy_tokenizer()
    cfg = toy_config(tok)
    cfg._attn_implementation = "sdpa"
    model = Qwen2ForCausalLM(cfg)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)

    def lr_at(s):
        if s < warmup:
            return lr * (s + 1) / warmup
        p = (s - warmup) / max(1, steps - warmup)
        return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))

    stream = pretrain_stream(tok, seed)
    bucket_rng = random.Random(seed)
    queue: list = []

    def next_batch():
        # length bucketing: sort a pool of 8 batches by length, so padding wastes little compute
        if not queue:
            pool = sorted((next(stream) for _ in range(8 * batch_size)), key=lambda e: len(e[0]))
            chunks = [pool[i:i + batch_size] for i in range(0, len(pool), batch_size)]
            bucket_rng.shuffle(chunks)
            queue.extend(chunks)
        return queue.pop()

    t0, log = time.time(), []
    bar = tqdm(range(steps), desc="pretrain-toy", disable=not progress)
    for step in bar:
        ids, labels, att = _collate(next_batch(), tok.pad_token_id)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        loss = model(input_ids=ids, attention_mask=att, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % log_every == 0 or step == steps - 1:
            log.append({"step": step, "loss": round(loss.item(), 4), "lr": lr_at(step),
                        "elapsed_s": round(time.time() - t0, 1)})
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    summary = {"seed": seed, "steps": steps, "batch_size": batch_size, "lr": lr, "warmup": warmup,
               "mix": PRETRAIN_MIX, "params": sum(p.numel() for p in model.parameters()),
               "train_seconds": round(time.time() - t0, 1), "log": log}
    loading.atomic_write_json(tmp / "pretrain_summary.json", summary)
    loading.atomic_replace_dir(tmp, out)
    return summary
