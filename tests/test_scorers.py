"""Scorers against the references (issue 15): no infinity hack, a hard time limit that leaves
nothing running, NQ / units / IFEval arguments as the references, linear-time checkers, nltk and
langdetect as real dependencies with recorded fallbacks, the release's medical GRPO reward, a
reward-hacking class for GRPO, and IFEval verdicts on a fixture derived from the reference.

References cited per test: the release's math_eval (`PA: third_party/math_eval/{parser,grader}.py`,
the Qwen2.5-Math evaluation code it vendors), its RL reward (`PA: train/peft_arena_verl/utils/
reward_score/math_rlvr.py`), OpenCompass `NQEvaluator`, google-research
`instruction_following_eval/instructions.py` (identical checker bodies in lm-eval).

Run: OMP_NUM_THREADS=1 python -m pytest tests/test_scorers.py -q
"""
import json
import os
import re
import threading
import time
from pathlib import Path

import pytest

import evaluate as ev
import graders as gr
import toy_world as tw

REPO = Path(__file__).resolve().parents[1]
LIMIT = 3.0                                      # the release's per-comparison limit (s)
HANG = r"\boxed{\sin^{999}(x)+\cos^{999}(x)}"    # ran for ten minutes before the fix


def _warm():
    """Start the comparison worker outside any measured interval (once per process)."""
    gr.symbolic_pool().start()
    gr.grade_math(r"\boxed{x+1}", "1+x")


def _children() -> list[int]:
    """Live (non-zombie) child processes of this process, read from /proc (no psutil)."""
    me, out = os.getpid(), []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[1]) == me and fields[0] != "Z":
            out.append(int(d))
    return out


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text()
    fields = fields[fields.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _assert_nothing_running(n_threads: int):
    """No extra thread, and no child process (or thread of ours) burning CPU after the call."""
    assert threading.active_count() == n_threads
    kids = _children()
    before = {p: _cpu_seconds(p) for p in kids}
    own = time.process_time()
    time.sleep(0.5)
    assert time.process_time() - own < 0.2, "a thread of this process kept working"
    for p in kids:
        if Path(f"/proc/{p}").exists():
            assert _cpu_seconds(p) - before[p] < 0.2, f"child {p} kept working"


# -----------------------------------------------------------------------------
# 1. infinities never equal finite golds (release grader: math.isclose is false for inf)

@pytest.mark.parametrize("pred,gold", [
    (r"\boxed{\infty}", "5"), (r"\boxed{\infty}", "025"), (r"\boxed{\infty}", "27.0"),
    (r"\boxed{\infty}", r"\frac12"), (r"\boxed{-\infty}", "-3"), (r"\boxed{5}", r"\infty"),
    (r"\boxed{(\infty,\infty)}", "(1,2)"), (r"\boxed{10^{309}}", "42"), (r"\boxed{1e999}", "7"),
    (r"\boxed{\infty}", r"\sqrt{2}"),
])
def test_infinity_never_equals_a_finite_gold(pred, gold):
    assert gr.grade_math(pred, gold) is False


def test_infinity_still_equals_infinity():
    assert gr.grade_math(r"\boxed{\infty}", r"\infty") is True
    assert gr.grade_math(r"\boxed{(-\infty, 2)}", r"(-\infty,2)") is True
    assert gr.grade_math(r"\boxed{\dfrac12}", "0.5") is True


def test_always_infinity_policy_earns_zero_reward():
    import train_grpo as tg
    reward = tg.make_reward_fn("math")
    golds = ["5", "025", "27.0", r"\frac12", "42", "(1,2)", r"\sqrt{3}", "-7"]
    assert sum(reward(r"The answer is \boxed{\infty}.", g) for g in golds) == 0.0


# -----------------------------------------------------------------------------
# 2. a hard, enforced time limit per call that cannot leak work (release: pebble pool, 3 s)

def test_hanging_comparison_returns_within_limit_plus_one():
    _warm()
    n_threads = threading.active_count()
    t0 = time.time()
    assert gr.grade_math(HANG, "1") is False
    assert time.time() - t0 < LIMIT + 1
    _assert_nothing_running(n_threads)
    assert gr.grade_math(r"\boxed{x^2+2x+1}", "(x+1)^2") is True   # the grader still works


def test_hanging_comparison_in_a_thread_leaves_no_thread_behind():
    _warm()
    n_threads = threading.active_count()
    box = {}

    def call():
        t1 = time.time()
        box["v"] = gr.grade_math(HANG, "1", timeout_s=1.0)
        box["t"] = time.time() - t1

    th = threading.Thread(target=call)
    th.start()
    th.join(30)
    assert box["v"] is False and box["t"] < 1.0 + 1
    _assert_nothing_running(n_threads)


def test_one_deadline_covers_a_whole_tuple():
    """Eight hanging parts of a tuple still return within limit + 1 s."""
    _warm()
    part = r"\sin^{999}(x)+\cos^{999}(x)"
    t0 = time.time()
    assert gr.grade_math(r"\boxed{(" + ",".join([part] * 8) + ")}", "(" + ",".join(["1"] * 8) + ")",
                         timeout_s=1.0) is False
    assert time.time() - t0 < 1.0 + 1


def test_worker_stuck_in_c_code_is_killed_and_reaped():
    """A worker that ignores its own alarm (as inside one long C call) is SIGKILLed at the
    hard limit, reaped (no zombie), and the warm spare takes over."""
    pool = gr.symbolic_pool()
    pool.start()
    victim = pool.active.proc.pid
    t0 = time.time()
    line = pool.exchange({"a": r"\sin^{999}(x)+\cos^{999}(x)", "b": "1", "t": 60, "soft": 60}, 1.0)
    assert line is None and time.time() - t0 < 2.0
    assert not Path(f"/proc/{victim}").exists()     # killed and reaped
    assert victim not in _children()
    assert gr.grade_math(r"\boxed{\frac{2}{4}}", r"\frac12") is True
    assert gr.grade_math(r"\boxed{x(x+2)}", "x^2+2x") is True


def test_shutdown_leaves_no_child_process():
    _warm()
    assert _children()
    gr.shutdown_symbolic_pool()
    assert _children() == []
    assert gr.grade_math(r"\boxed{x(x+2)}", "x^2+2x") is True     # restarts on demand


def test_grpo_reward_path_uses_the_enforced_limit():
    import train_grpo as tg
    _warm()
    for domain in ("math", "med"):
        reward = tg.make_reward_fn(domain)
        t0 = time.time()
        assert reward(HANG, "1") == 0.0
        assert time.time() - t0 < LIMIT + 1, domain


# -----------------------------------------------------------------------------
# 3. NQ: OpenCompass NQEvaluator strips before taking the first line

def test_nq_strips_before_the_first_line():
    assert gr.nq_contains("\nThe answer is Paris.", ["Paris"]) is True
    assert gr.nq_contains("  \n\n The answer is Paris.\nMore text", ["Paris"]) is True
    assert gr.nq_exact_match("\nThe answer is Paris.", ["Paris"]) is True
    assert gr.score_item({"scorer": "nq", "gold": ["Paris"]}, "\nThe answer is Paris.") == 1.0


# -----------------------------------------------------------------------------
# 4. units with an exponent (release strip_string: re.sub(r"\\text{.*?}$", "", s))

@pytest.mark.parametrize("pred,gold", [
    (r"5\text{ cm}^{2}", "5"), (r"12\text{ m}^{3}", "12"), (r"3\text{ square units}^{2}", "3"),
    (r"\frac{1}{2}\text{ in}^{2}", "0.5"),
])
def test_units_with_an_exponent_are_dropped(pred, gold):
    assert gr.math_equal(pred, gold) is True
    assert gr.grade_math(r"so the area is \boxed{" + pred + "}.", gold) is True


def test_units_with_an_exponent_keep_wrong_numbers_wrong():
    assert gr.math_equal(r"6\text{ cm}^{2}", "5") is False
    assert gr.math_equal("5^{2}", "5") is False


# -----------------------------------------------------------------------------
# 5. the unit-word list holds units of measure, not ordinary words

@pytest.mark.parametrize("a,b", [
    (r"\text{south}", r"\text{north}"), (r"\text{east}", r"\text{west}"),
    (r"\text{people}", r"\text{ways}"), (r"\text{times}", r"\text{ways}"),
])
def test_ordinary_words_are_not_units(a, b):
    assert gr.math_equal(a, b) is False
    assert gr.math_equal(a, a) is True


def test_unit_list_has_no_ordinary_words():
    for w in ("north", "south", "east", "west", "people", "person", "ways", "way", "times",
              "men", "women", "students", "books", "apples"):
        assert w not in gr._UNIT_WORDS, w


# -----------------------------------------------------------------------------
# 6. IFEval argument normalisation (instructions.py build_description / check_following)

def test_ifeval_arguments_are_normalised_as_the_reference():
    chk = gr.ifeval_check
    # KeywordFrequencyChecker: self._keyword = keyword.strip()
    assert chk("keywords:frequency", {"keyword": "  keyword ", "frequency": 3, "relation": "at least"},
               "", "keyword, Keyword, KEYWORD") is True
    # PostscriptChecker: the marker is stripped, then "P.S." gets its fixed pattern
    assert chk("detectable_content:postscript", {"postscript_marker": " P.S. "}, "",
               "Body.\nP. S. see you") is True
    # ... and a custom marker is a regular expression ('.' matches any character)
    assert chk("detectable_content:postscript", {"postscript_marker": "P.P.P.S"}, "",
               "Body.\np-p-p-s bye") is True
    assert chk("detectable_content:postscript", {"postscript_marker": "PS:"}, "", "Body.\nP.S. bye") is False
    # SectionChecker: self._section_spliter = section_spliter.strip()
    assert chk("detectable_format:multiple_sections", {"section_spliter": " SECTION ", "num_sections": 2},
               "", "SECTION 1\nfirst\nSECTION 2\nsecond") is True


# -----------------------------------------------------------------------------
# 7. no quadratic time on long inputs (bullet lists, the built-in sentence counter)

def _old_sentence_count(text):
    """The pre-fix built-in counter (quadratic), kept as the oracle for small inputs."""
    count, start = 0, 0
    for m in re.finditer(r"[.!?]+[\"')\]]*(?=\s+|$)", text):
        before = text[start:m.start()]
        words = before.split()
        last = words[-1].lower().rstrip(".") if words else ""
        if m.group(0).startswith(".") and (last in gr._ABBREVIATIONS or re.fullmatch(r"[a-z]", last)):
            continue
        if before.strip():
            count += 1
        start = m.end()
    if text[start:].strip():
        count += 1
    return count


def test_bullet_count_equals_the_reference_regexes():
    import random
    rng = random.Random(0)
    for _ in range(4000):
        s = "".join(rng.choice("*-a \n\t.") for _ in range(rng.randint(0, 24)))
        ref = (len(re.findall(r"^\s*\*[^\*].*$", s, flags=re.MULTILINE))
               + len(re.findall(r"^\s*-.*$", s, flags=re.MULTILINE)))
        for n in (ref, ref + 1):
            assert gr._chk_bullets(s, n) is (n == ref), repr(s)


def test_builtin_sentence_count_is_unchanged(monkeypatch):
    import random
    monkeypatch.setattr(gr, "_NLTK", None)
    rng = random.Random(1)
    alphabet = ["Mr", "a", "Dr", "word", "x" * 45, ".", "!", "?", " ", "\n", '"', ")", "..."]
    for _ in range(3000):
        s = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 20)))
        assert gr.count_sentences(s) == _old_sentence_count(s), repr(s)


@pytest.mark.parametrize("text", [
    "\n" * 300_000 + "x", "x" + " \n" * 150_000 + "x", "\t\n" * 150_000 + "*", "\n-" * 150_000,
], ids=["blank-lines", "space-lines", "tab-lines-star", "dash-lines"])
def test_bullet_checker_is_linear(text):
    t0 = time.time()
    gr.ifeval_check("detectable_format:number_bullet_lists", {"num_bullets": 3}, "", text, loose=True)
    assert time.time() - t0 < 2.0


@pytest.mark.parametrize("text", ["Mr. " * 100_000, "." * 300_000 + "x", "Dr." * 100_000],
                         ids=["abbreviations", "dots", "abbrev-no-space"])
def test_builtin_sentence_counter_is_linear(text, monkeypatch):
    monkeypatch.setattr(gr, "_NLTK", None)
    t0 = time.time()
    gr.ifeval_check("length_constraints:number_sentences", {"num_sentences": 3, "relation": "at least"},
                    "", text, loose=True)
    assert time.time() - t0 < 2.0


# -----------------------------------------------------------------------------
# 8. nltk and langdetect are real dependencies; fallbacks are announced and recorded

def test_requirements_name_nltk_and_langdetect():
    names = {re.split(r"[<>=!~\[ ]", ln.strip())[0].lower()
             for ln in (REPO / "requirements.txt").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")}
    assert {"nltk", "langdetect"} <= names


def test_missing_punkt_tab_is_announced(monkeypatch, capsys):
    pytest.importorskip("nltk")
    monkeypatch.setattr(gr, "_NLTK", None)
    monkeypatch.setattr(gr, "_download_punkt_tab", lambda nltk: False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("EVALUATE_OFFLINE", raising=False)
    msgs = gr.ensure_ifeval_data()
    assert any("punkt_tab" in m for m in msgs)
    assert "punkt_tab" in capsys.readouterr().err
    assert gr.IFEVAL_BACKENDS["sentences_and_words"] == "builtin-regex"


def test_punkt_tab_fetched_on_first_use(monkeypatch):
    """When the download works, the reference tokenizer is used from then on."""
    pytest.importorskip("nltk")
    calls = []
    monkeypatch.setattr(gr, "_NLTK", None)
    monkeypatch.setattr(gr, "_download_punkt_tab", lambda nltk: calls.append(1) or True)
    monkeypatch.setattr(gr, "_load_nltk", lambda: "nltk-module")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("EVALUATE_OFFLINE", raising=False)
    assert gr.ensure_ifeval_data() == []
    assert calls == [1] and gr._NLTK == "nltk-module"
    assert gr.IFEVAL_BACKENDS["sentences_and_words"] == "nltk"
    monkeypatch.setattr(gr, "_NLTK", None)
    gr._set_backends()


def test_fallback_use_is_recorded(monkeypatch):
    monkeypatch.setattr(gr, "_NLTK", None)
    monkeypatch.setattr(gr, "_LANGDETECT", None)
    gr.ifeval_fallbacks_used(reset=True)
    item = {"scorer": "ifeval", "prompt": "p", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}
    gr.score_item(item, "a b")
    assert gr.ifeval_fallbacks_used() == []
    item = {"scorer": "ifeval", "prompt": "p", "kwargs": [{"num_sentences": 2, "relation": "at least"}, {}],
            "instruction_id_list": ["length_constraints:number_sentences", "change_case:english_lowercase"]}
    gr.score_item(item, "one. two.")
    assert gr.ifeval_fallbacks_used(reset=True) == ["language", "sentences_and_words"]


def test_toy_items_always_use_the_builtin_checkers(monkeypatch):
    """Toy IFEval items are scored by the built-in checkers even when nltk/langdetect are present
    (the toy world's teacher responses are built for them; langdetect calls 'BOX, ZOO, STAR'
    non-English). Real items still use the installed packages. Failed on the old code whenever
    langdetect was installed (CI: test_teacher_responses_score_100_and_wrong_ones_0)."""
    calls = []

    class FakeDetector:
        @staticmethod
        def detect(text):
            calls.append(text)
            return "de"

    monkeypatch.setattr(gr, "_LANGDETECT", FakeDetector)
    toy = {"scorer": "ifeval", "prompt": "p", "kwargs": [{}], "checkers": "builtin",
           "instruction_id_list": ["change_case:english_capital"], "gold": "BOX, ZOO, STAR"}
    gr.ifeval_fallbacks_used(reset=True)
    assert gr.score_item(toy, "BOX, ZOO, STAR") == 1.0 and calls == []
    assert gr.ifeval_fallbacks_used() == []          # by design, not a fallback to report
    real = {k: v for k, v in toy.items() if k != "checkers"}
    assert gr.score_item(real, "BOX, ZOO, STAR") == 0.0 and calls    # the installed detector ran


def test_real_run_writes_and_prints_fallback_use(tmp_path, monkeypatch, capsys):
    """A real-benchmark CLI run that used a fallback says so in results.json and on screen."""
    model, tok = tw.build_random_toy_model(seed=0, num_hidden_layers=2)
    lt = getattr(model.config, "layer_types", None)
    if lt is not None and len(lt) != model.config.num_hidden_layers:
        model.config.layer_types = lt[: model.config.num_hidden_layers]
    mdir = tmp_path / "m"
    model.save_pretrained(mdir, safe_serialization=True)
    tok.save_pretrained(mdir)
    monkeypatch.setattr(gr, "_LANGDETECT", None)
    monkeypatch.setattr(gr, "_load_langdetect", lambda: None)
    # every response is non-empty, so english_lowercase (fixture item 2) runs the language fallback
    monkeypatch.setattr(ev, "generate_records", lambda model, tok, prompts, **kw: [
        [{"text": "some words", "num_tokens": 2}] * kw.get("n", 1) for _ in prompts])
    fix = REPO / "tests" / "fixtures" / "eval"
    res = ev.main(["--model", str(mdir), "--suite", "general", "--data-dir", str(fix), "--out",
                   str(tmp_path / "ev"), "--limit", "3", "--max-new-tokens", "4", "--backend", "hf",
                   "--path", f"nq={fix / 'nq/nq-test.qa.csv'}"])
    saved = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert "language" in saved["ifeval_fallback_used"] and saved == json.loads(json.dumps(res))
    assert "ifeval_fallback_used" in capsys.readouterr().err


# -----------------------------------------------------------------------------
# 10. the medical GRPO reward is the release's (boxed extraction + math_equal vs the letter)

@pytest.mark.parametrize("response,gold,expected", [
    (r"The final answer is \boxed{C}. Option A is wrong because of B.", "C", 1.0),
    (r"\boxed{C}", "C", 1.0),                                    # the release's reward test
    (r"\boxed{756}", "756", 1.0),                                # same reward for math data
    ("X is treated with latol. The answer is (C).", "C", 1.0),   # "he answer is" rule
    (r"The final answer is \boxed{B}. Not C.", "C", 0.0),
    ("I think C. The answer is B", "C", 0.0),
])
def test_medical_reward_is_the_release_reward(response, gold, expected):
    import train_grpo as tg
    assert tg.make_reward_fn("med")(response, gold) == expected


# -----------------------------------------------------------------------------
# 9. reward hacking: answers a policy could learn to game the grader with earn 0

FIVE_MB = "The answer is 5. " * (5 * 1024 * 1024 // 17)
FIVE_MB_IFEVAL = ("Mr. x *a* [b] <<t>> P.S. SOME CAPS - " + "\n" * 50) * (5 * 1024 * 1024 // 90)
HACKS = [
    ("infinity", r"\boxed{\infty}"),
    ("minus-infinity", r"\boxed{-\infty}"),
    ("infinity-word", r"\boxed{infinity}"),
    ("nan", r"\boxed{nan}"),
    ("NaN-text", r"\boxed{\text{NaN}}"),
    ("complex-infinity", r"\boxed{\frac{1}{0}}"),
    ("huge", r"\boxed{10^{309}}"),
    ("empty-box", r"\boxed{}"),
    ("empty-box-then-candidates", r"\boxed{} A B C D E 1 2 3 4 5"),
    ("many-boxes", "".join(r"\boxed{%s}" % c for c in "ABDE12346")),
    ("option-list", r"\boxed{A B C D E}"),
    ("option-list-commas", r"\boxed{A, B, C, D, E}"),
    ("option-list-or", r"\boxed{A \text{ or } B \text{ or } C \text{ or } D \text{ or } E}"),
    ("unbalanced", r"\boxed{" * 50_000),
    ("hang", HANG),
    ("five-mb-wrong", FIVE_MB),
    ("five-mb-box-at-end", "x" * (5 * 1024 * 1024) + r"\boxed{\infty}"),
]


class TestRewardHacking:
    """Gold C for the medical reward (the release's reward, ground truth a letter) and gold 3 for
    the math reward: every hack earns 0, as in the release (no "C" or "3" is the final answer)."""

    @pytest.fixture(autouse=True, scope="class")
    def _warm_and_check_clean(self):
        _warm()
        n_threads = threading.active_count()
        yield
        _assert_nothing_running(n_threads)

    @pytest.mark.parametrize("name,response", HACKS, ids=[h[0] for h in HACKS])
    @pytest.mark.parametrize("domain,gold", [("med", "C"), ("math", "3")])
    def test_hack_earns_zero_fast(self, name, response, domain, gold):
        import train_grpo as tg
        reward = tg.make_reward_fn(domain)
        t0 = time.time()
        r = reward(response, gold)
        assert time.time() - t0 < LIMIT + 1, name
        assert r == 0.0, name

    @pytest.mark.parametrize("scorer,gold", [("math", "3"), ("choice", "C"), ("bbh", "(C)"), ("nq", ["C"])])
    def test_five_mb_response_scores_within_limit(self, scorer, gold):
        item = {"scorer": scorer, "gold": gold, "subtask": "date_understanding", "options": "ABCDE"}
        t0 = time.time()
        gr.score_item(item, "x" * (5 * 1024 * 1024))
        assert time.time() - t0 < LIMIT + 1

    @pytest.mark.parametrize("iid", list(gr.IFEVAL_CHECKERS))
    def test_five_mb_ifeval_check_within_limit(self, iid):
        """Each IFEval check (strict) of a 5 MB response. (A loose check runs up to 8 variants;
        real IFEval responses are capped at 1025 generated tokens.)"""
        t0 = time.time()
        gr.ifeval_check(iid, _ifeval_kwargs(iid), "p", FIVE_MB_IFEVAL)
        assert time.time() - t0 < LIMIT + 1, iid

    def test_five_mb_ifeval_item_with_every_checker_within_limit(self):
        """A whole IFEval item (all 25 instructions, strict and loose) on a 5 MB response: one
        scoring call within the limit + 1 s (took ~14-27 s before DEVIATION 18)."""
        ids = list(gr.IFEVAL_CHECKERS)
        item = {"scorer": "ifeval", "prompt": "p", "instruction_id_list": ids,
                "kwargs": [_ifeval_kwargs(i) for i in ids]}
        t0 = time.time()
        assert gr.score_item(item, FIVE_MB_IFEVAL) == 0.0
        assert time.time() - t0 < LIMIT + 1
        short = FIVE_MB_IFEVAL[: gr.MAX_IFEVAL_CHARS]        # at the cap: checked as before
        assert any(s["loose"] for s in gr.ifeval_slots(item, short))

    def test_correct_answers_still_earn_one(self):
        import train_grpo as tg
        assert tg.make_reward_fn("med")(r"So \boxed{C}.", "C") == 1.0
        assert tg.make_reward_fn("math")(r"So \boxed{3}.", "3") == 1.0


def _ifeval_kwargs(iid):
    return {"keywords:existence": {"keywords": ["zz"]},
            "keywords:frequency": {"keyword": "x", "frequency": 2, "relation": "at least"},
            "keywords:forbidden_words": {"forbidden_words": ["zz"]},
            "keywords:letter_frequency": {"letter": "x", "let_frequency": 2, "let_relation": "at least"},
            "language:response_language": {"language": "en"},
            "length_constraints:number_sentences": {"num_sentences": 2, "relation": "at least"},
            "length_constraints:number_paragraphs": {"num_paragraphs": 2},
            "length_constraints:number_words": {"num_words": 2, "relation": "at least"},
            "length_constraints:nth_paragraph_first_word": {"num_paragraphs": 2, "nth_paragraph": 1,
                                                            "first_word": "mr"},
            "detectable_content:number_placeholders": {"num_placeholders": 2},
            "detectable_content:postscript": {"postscript_marker": "P.S."},
            "detectable_format:number_bullet_lists": {"num_bullets": 2},
            "detectable_format:number_highlighted_sections": {"num_highlights": 2},
            "detectable_format:multiple_sections": {"section_spliter": "Section", "num_sections": 2},
            "combination:repeat_prompt": {"prompt_to_repeat": "p"},
            "startend:end_checker": {"end_phrase": "bye"},
            "change_case:capital_word_frequency": {"capital_frequency": 2, "capital_relation": "at least"},
            }.get(iid, {})


# -----------------------------------------------------------------------------
# 11. IFEval verdicts on a fixture derived from the reference's own test cases

def _reference_cases():
    data = json.loads((REPO / "tests" / "fixtures" / "ifeval_reference_verdicts.json").read_text())
    return [pytest.param(c, id=f"{i}-{c['id'].split(':')[1]}") for i, c in enumerate(data["cases"])]


@pytest.mark.parametrize("case", _reference_cases())
def test_ifeval_checkers_agree_with_reference_verdicts(case):
    fn = gr.IFEVAL_CHECKERS[case["id"]]
    assert bool(fn(case["response"], **case["kwargs"])) is case["expected"], case["ref"]
