"""Scorer tests for evaluate.py: math, medical letters, BBH, NQ, IFEval (25 checkers, strict and
loose), score_item dispatch, and the security test (hostile model outputs are scored false, fast,
with no side effect). Pure functions only, no model.

Run: python -m pytest tests/test_evaluate.py -x -q
"""
import builtins
import math
import threading
import time

import pytest

import evaluate as ev
import graders as gr
import toy_world as tw

# -----------------------------------------------------------------------------
# Math: answers (math_equal) and whole responses (grade_math), PA: third_party/math_eval/{parser,grader}.py

MATH_EQUAL_CASES = [
    # (pred, gold, expected)
    (r"\frac{1}{2}", "0.5", True),
    (r"\dfrac12", r"\frac{1}{2}", True),
    (r"\tfrac{3}{4}", "0.75", True),
    ("1/2", r"\frac{1}{2}", True),
    (r"\frac{1}{3}", "0.33", False),           # 1e-4 relative tolerance, not 1e-2
    ("27", "27.0", True),                       # AMC golds are floats
    ("25", "025", True),                        # AIME golds are zero padded
    ("2.04", "204", True),                      # the release's x100 leniency (kept for parity)
    ("3", "4", False),
    ("-3", "3", False),
    (r"5\text{ cm}", "5", True),                # trailing \text{} units
    ("10 inches", "10", True),                  # unit words
    (r"30^\circ", "30", True),
    (r"50\%", "50", True),
    (r"\$12.50", "12.5", True),
    ("1,000", "1000", True),
    ("x=3", "3", True),
    ("3", "x = 3", True),
    ("y = 2x+1", "2x+1", True),
    ("five", "5", True),                        # number words
    (r"\left( 3, \frac{\pi}{2} \right)", r"(3,\frac{\pi}{2})", True),
    ("(1,2)", "(2,1)", False),
    ("[0,1)", "[0,1)", True),
    ("[0,1)", "(0,1)", False),                  # DEVIATION 4: bracket types matter
    (r"(0,\frac{1}{2}]", "(0,0.5]", True),
    (r"(-\infty,3]", r"(-\infty, 3]", True),
    (r"\begin{pmatrix}1&2\\3&4\end{pmatrix}", r"\begin{bmatrix}1&2\\3&4\end{bmatrix}", True),
    (r"\begin{pmatrix}\frac12\\1\end{pmatrix}", r"\begin{pmatrix}0.5\\1\end{pmatrix}", True),
    (r"\begin{pmatrix}1&2\\3&5\end{pmatrix}", r"\begin{pmatrix}1&2\\3&4\end{pmatrix}", False),
    (r"2\sqrt{2}", r"\sqrt{8}", True),
    (r"\frac{\sqrt{3}}{2}", r"\frac{\sqrt3}{2}", True),
    (r"\sqrt{2}", "1.41421356", True),
    (r"\pi", "3.14159", True),
    (r"\pi", "3.15", False),
    ("x^2+2x+1", "(x+1)^2", True),
    ("x^2+1", "(x+1)^2", False),
    ("2+3i", "3i+2", True),
    ("2-3i", "2+3i", False),
    (r"\text{(C)}", "C", True),                 # multiple-choice gold
    ("52_8", "52_8", True),
    ("52_8", "42", False),
    (r"\infty", r"\infty", True),
    ("", "0", False),
]


@pytest.mark.parametrize("pred,gold,expected", MATH_EQUAL_CASES)
def test_math_equal(pred, gold, expected):
    # a generous limit: this test checks the equivalence rules, not speed (a loaded CI machine
    # must not turn a slow-but-correct comparison into a False); the time limit has its own test
    assert gr.math_equal(pred, gold, timeout_s=60.0) is expected


GRADE_MATH_CASES = [
    (r"So the answer is $\boxed{\dfrac12}$.", r"\frac{1}{2}", True),   # the release's behaviour
    (r"Thus \boxed{\frac{3}{4}}.", "0.75", True),
    (r"First \boxed{1}, then correcting, \boxed{2}.", "2", True),      # the LAST box counts
    (r"First \boxed{1}, then correcting, \boxed{2}.", "1", False),
    (r"\boxed{\boxed{7}}", "7", True),
    ("The final answer is $5$. I hope it is correct.", "5", True),     # Minerva format
    ("The answer is 42.", "42", True),
    ("We get 3 apples and 7 oranges", "7", True),                       # last-number fallback
    ("I do not know", "0", False),
    (r"\boxed 5$ done", "5", True),                                     # boxed without a brace
    (r"\boxed{x = 3}", "3", True),
    (r"\boxed{(3,\frac{\pi}{2})}", r"\left( 3, \frac{\pi}{2} \right)", True),
    ("The answer is 27", 27.0, True),
    (r"\boxed{756}", "756", True),                                       # the release's reward test
    (r"\boxed{C}", "C", True),
    (r"\boxed{12}", ["11", "12"], True),                                 # list of golds
]


@pytest.mark.parametrize("response,gold,expected", GRADE_MATH_CASES)
def test_grade_math(response, gold, expected):
    assert gr.grade_math(response, gold) is expected


def test_strip_string_examples():
    assert gr.strip_string(r"\dfrac12") == r"\frac{1}{2}"
    assert gr.strip_string(r"\left( 3, \frac{\pi}{2} \right)") == r"(3,\frac{\pi}{2})"
    assert gr.strip_string("12.000") == "12"
    assert gr.strip_string(".5") == "0.5"
    assert gr.strip_string(r"\sqrt3") == r"\sqrt{3}"
    assert gr.strip_string("k = 7") == "7"
    assert gr.words_to_number("one hundred and five") == 105
    assert gr.words_to_number("twenty-five") == 25
    assert gr.words_to_number("five apples") is None


def test_latex_parser_builds_sympy_without_eval():
    sp = pytest.importorskip("sympy")
    assert gr.latex_to_sympy(r"\frac{1}{2}") == sp.Rational(1, 2)
    assert gr.latex_to_sympy(r"2\pi r") == 2 * sp.pi * sp.Symbol("r")
    assert gr.latex_to_sympy(r"\sqrt[3]{8}") == 2
    assert gr.latex_to_sympy("x^23") == sp.Symbol("x") ** 2 * 3      # LaTeX: one char superscript
    assert gr.latex_to_sympy("|-3|") == 3
    assert gr.latex_to_sympy("5!") == 120
    assert gr.latex_to_sympy(r"\binom{5}{2}") == 10
    for bad in ["__import__('os')", "1,2", "a=b", r"\frac{1}{0}", r"\unknown{3}", "2^{2000}", "(((1)"]:
        with pytest.raises(gr.LatexParseError):
            gr.latex_to_sympy(bad)


def test_pass_at_k():
    assert ev.pass_at_k(16, 0, 1) == 0.0
    assert ev.pass_at_k(16, 16, 8) == 1.0
    assert math.isclose(ev.pass_at_k(16, 4, 1), 4 / 16)
    # brute force over all k-subsets for a small case
    n, c, k = 5, 2, 2
    import itertools
    subsets = list(itertools.combinations(range(n), k))
    hit = sum(any(i < c for i in s) for s in subsets) / len(subsets)
    assert math.isclose(ev.pass_at_k(n, c, k), hit)
    with pytest.raises(ValueError):
        ev.pass_at_k(4, 1, 8)


# -----------------------------------------------------------------------------
# Security: hostile outputs are scored false, fast, with no side effect (issue #5)

def test_hostile_math_outputs_are_false_fast_and_inert(tmp_path, monkeypatch):
    sp = pytest.importorskip("sympy")
    target = tmp_path / "pwned"
    called = []

    def trap(*a, **k):
        called.append(a)
        raise AssertionError("eval-like function called on model output")

    # Warm up first: sympy imports some submodules lazily, and a lazy import that runs while
    # builtins.eval/exec are trapped fails half-way and leaves a broken module in sys.modules for
    # every later test in the session. Exercise the whole comparison path before trapping.
    import sympy.parsing.sympy_parser as spp
    import sympy.printing  # noqa: F401
    for a, b in [("\\frac{1}{2}", "0.5"), ("x^2+2x+1", "(x+1)^2"), ("\\sqrt{2}", "2^{1/2}"),
                 ("[1,2)", "[1,2)"), ("\\begin{pmatrix}1\\\\2\\end{pmatrix}", "(1,2)")]:
        gr.math_equal(a, b)
    monkeypatch.setattr(builtins, "eval", trap)
    monkeypatch.setattr(builtins, "exec", trap)
    monkeypatch.setattr(sp, "sympify", trap)
    monkeypatch.setattr(sp, "parse_expr", trap, raising=False)
    monkeypatch.setattr(spp, "parse_expr", trap)
    hostile = [
        f"\\boxed{{__import__('os').system('touch {target}')}}",
        f"The answer is __import__('os').system('touch {target}')",
        "\\boxed{" + "{" * 100_000 + "1" + "}" * 100_000 + "}",        # deep braces
        "\\boxed{" + "\\frac{1}{" * 500 + "2" + "}" * 500 + "}",       # deep parse nesting
        "\\boxed{" + "9" * 1_000_000 + "}",                             # megabyte answer
        "x" * 1_000_000,                                                # megabyte, no answer
        "\\boxed{" * 200_000,                                           # megabyte of openers
        r"\boxed{9^{9^{9^{9}}}}",                                       # power tower
        r"\boxed{10^{1000000}}",
        r"\boxed{(x+1)^{100000}}",
        r"\boxed{1e999999}",
        r"\boxed{1000000!}",
    ]
    for text in hostile:
        t0 = time.time()
        assert gr.grade_math(text, "1") is False
        assert time.time() - t0 < 2.0, text[:60]
    assert not target.exists()
    assert not called


def test_time_limit_main_thread_and_worker_thread():
    """The hard limit holds from the main thread and from another thread (the worker process
    does the sympy work, so no thread is left behind; tests/test_scorers.py has the details)."""
    gr.symbolic_pool().start()
    hang = r"\boxed{\sin^{999}(x)+\cos^{999}(x)}"
    t0 = time.time()
    assert gr.grade_math(hang, "1", timeout_s=0.5) is False
    assert time.time() - t0 < 1.5
    assert gr.grade_math(r"\boxed{x^2+2x+1}", "(x+1)^2", timeout_s=3.0) is True
    box = {}

    def worker():
        t1 = time.time()
        box["v"] = gr.grade_math(hang, "1", timeout_s=0.5)
        box["t"] = time.time() - t1

    n_threads = threading.active_count()
    th = threading.Thread(target=worker)
    th.start()
    th.join()
    assert box["v"] is False and box["t"] < 1.5
    assert threading.active_count() == n_threads


# -----------------------------------------------------------------------------
# Medical letter extraction (PA: third_party/med_eval/utils/extract_answer.py:match_choice,
# last letter)

MED_CASES = [
    # (text, options, expected last letter)
    (r"so the final answer is \boxed{C}", "ABCD", "C"),             # the release's behaviour
    ("The answer is B", "ABCD", "B"),                                # strict rule
    ("The answer is (C).", "ABCDE", "C"),                            # toy format
    ("answer is A. Wait, actually the answer is D", "ABCD", "D"),    # last strict match
    ("I think (B) is plausible but the correct option is D.", "ABCD", "D"),
    (r"\boxed{B}. I hope this helps", "ABCDEFGHIJ", "B"),            # DEVIATION 6 guard
    (r"\boxed{B}. I hope this helps", "ABCD", "B"),                  # I is not an option here
    ("A patient presents with fever. Answer: C", "ABCD", "C"),       # article "A " skipped
    ("Option E is wrong; B.", "ABCD", "B"),                          # E not an allowed letter
    ("**C**", "ABCD", "C"),
    ("The correct choice is C, not D.", "ABCD", "D"),                # release quirk: last wins
    ("答案是B", "ABCD", "B"),
    ("The answer is B\n## Final Response\n\nThe answer is A", "ABCD", "A"),
    ("no letters here", "ABCD", None),
    ("(A) and (B) are wrong, (C) is right", "ABCD", "C"),
    ("The answer is c", "ABCD", None),                               # lowercase is not a letter
    ("I'm fairly sure it is J", "ABCDEFGHIJ", "J"),                  # pronoun "I'm" skipped
    ("The answer is I", "ABCDEFGHIJ", "I"),                          # strict rule keeps I
    ("A", "ABCD", "A"),
    ("A drug like this", "ABCD", None),
    ({"A": "aspirin", "B": "insulin"}, None, None),                  # placeholder, replaced below
]
MED_CASES = MED_CASES[:-1] + [
    ("You should give insulin.", {"A": "aspirin", "B": "insulin"}, "B"),       # option text rule
    ("aspirin? no, insulin. On reflection: aspirin", {"A": "aspirin", "B": "insulin"}, "A"),
    ("insulni therapy", {"A": "aspirin", "B": "insulin"}, "B"),                # similarity rule
]


@pytest.mark.parametrize("text,options,expected", MED_CASES)
def test_extract_choice_letter(text, options, expected):
    assert gr.extract_choice_letter(text, options) == expected


def test_choice_release_quirk_and_grading():
    # guard off = the release's behaviour: the pronoun becomes option I (the release's quirk)
    assert gr.extract_choice_letter(r"\boxed{B}. I hope this helps", "ABCDEFGHIJ", guard_pronoun_i=False) == "I"
    assert gr.grade_choice("The answer is (C).", "c") is True
    assert gr.grade_choice("The answer is (C).", "D") is False
    assert gr.grade_choice("nothing", "A") is False


# -----------------------------------------------------------------------------
# BBH (OC: opencompass/datasets/bbh.py): multiple-choice and free-form extraction, case-sensitive exact match

BBH_CASES = [
    # (response, gold, task, expected)
    ("Step. So the answer is (C).", "(C)", "snarks", True),
    ("we see (B) then (D)", "(B)", "date_understanding", True),          # first option wins
    ("So the answer is (A).", "(B)", "hyperbaton", False),
    ("So the answer is C.", "(C)", "ruin_names", True),                  # bare capital letter
    ("the answer is (D) and then the answer is (A)", "(D)", "geometric_shapes", True),
    ("none", "(A)", "temporal_sequences", False),
    ("So the answer is **valid**.", "valid", "formal_fallacies", True),
    ("So the answer is Yes.", "yes", "sports_understanding", False),     # case-sensitive
    ("So the answer is yes.", "yes", "sports_understanding", True),
    ("So the answer is True.", "True", "boolean_expressions", True),
    ("So the answer is False", "True", "boolean_expressions", False),
    ("So the answer is 12.", "12", "object_counting", True),
    ("So the answer is -42.", "-42", "multistep_arithmetic_two", True),
    ("So the answer is ] ) }.", "] ) }", "dyck_languages", True),
    ("So the answer is apple banana cherry.", "apple banana cherry", "word_sorting", True),
    ("So the answer is invalid.\nBecause ...", "invalid", "formal_fallacies", True),
    ("So the answer is No.", "Yes", "web_of_lies", False),
    ("The answer is 12", "12", "object_counting", True),
    ("12", "12", "object_counting", True),
    ("It is 12.", "12", "object_counting", False),
    ("So the answer is (B).", "(B)", "some_new_mcq_task", True),         # kind from gold shape
    ("So the answer is Yes.", "Yes", "navigate", True),
]


@pytest.mark.parametrize("response,gold,task,expected", BBH_CASES)
def test_bbh(response, gold, task, expected):
    assert gr.grade_bbh(response, gold, task) is expected


def test_bbh_extractors():
    assert gr.bbh_extract_answer("So the answer is (C).", "mcq") == "C"
    assert gr.bbh_extract_answer("So the answer is **valid**.", "free") == "valid"
    assert gr.bbh_match("valid", "valid") and not gr.bbh_match("Valid", "valid")
    assert len(gr.BBH_TASKS) == 27 and len(gr.BBH_MCQ_TASKS) == 17
    with pytest.raises(ValueError):
        gr.bbh_extract_answer("x", "neither")


# -----------------------------------------------------------------------------
# NQ-open (OC: opencompass/datasets/natural_question.py): containment (the paper's rule) and true exact match

NQ_CASES = [
    # (prediction, golds, contains, exact_match)
    ("The answer is Barack Obama.", ["Barack Obama"], True, True),
    ("It was the 1990s, I think", ["1990s"], True, False),
    ("the answer is 42", ["4"], True, False),                 # containment quirk
    ("The answer is Paris", ["London"], False, False),
    ("The answer is the Eiffel Tower.", ["Eiffel Tower"], True, True),
    ("The answer is Washington.", ["Washington, D.C."], True, False),   # gold cut at ','
    ("The answer is\nParis", ["Paris"], False, False),       # only the first line counts
    ("The answer is 1,000 people", ["1000"], False, False),
    ("THE ANSWER IS ROME", ["Rome"], True, True),
    ("The answer is Rome", "Rome", True, True),               # a single gold string
    ("answer is an apple", ["apple"], True, True),
    ("the answer is Mount Everest, the tallest", ["Everest"], True, False),
    ("The answer is 1945.", ["1945"], True, True),
    ("I am not sure", ["Paris"], False, False),
    ("The answer is Jupiter", ["Saturn", "Jupiter"], True, True),
    ("The answer is anything", [""], True, False),            # empty gold matches everything
    ("The answer is: Paris!", ["Paris"], True, True),
    ("Paris", ["paris"], True, True),
    ("The answer is New York City", ["New York"], True, False),
    ("The answer is Tokyo", ["Kyoto"], False, False),
]


@pytest.mark.parametrize("pred,golds,contains,em", NQ_CASES)
def test_nq(pred, golds, contains, em):
    assert gr.nq_contains(pred, golds) is contains
    assert gr.nq_exact_match(pred, golds) is em


def test_nq_normalize():
    assert gr.nq_normalize("The  Beatles!") == "beatles"
    assert gr.nq_normalize("A Tale of Two Cities") == "tale of two cities"
    assert gr.nq_normalize("U.S.") == "u"
    assert gr.nq_normalize("Hello, world") == "hello"
    assert gr.nq_normalize("line one\nline two") == "line one"


# -----------------------------------------------------------------------------
# IFEval (google-research instruction_following_eval): every checker passes one case and fails one, strict and loose

IFEVAL_CASES = [
    # (id, kwargs, passing response, failing response)
    ("keywords:existence", {"keywords": ["banana", "kiwi"]}, "I like Banana and kiwi.", "I like banana only."),
    ("keywords:frequency", {"keyword": "war", "frequency": 2, "relation": "at least"},
     "war and software", "peace"),
    ("keywords:forbidden_words", {"forbidden_words": ["bad"]}, "this badge is fine", "that is bad"),
    ("keywords:letter_frequency", {"letter": "z", "let_frequency": 2, "let_relation": "at least"},
     "Zoo zebra", "zoo"),
    ("language:response_language", {"language": "en"},
     "This is a simple sentence in English and it is fine.",
     "Esto es una frase en español y no es para el sistema de los ingleses."),
    ("length_constraints:number_sentences", {"num_sentences": 3, "relation": "less than"},
     "One. Two.", "One. Two. Three. Four."),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 3}, "a *** b *** c", "a ****** b"),
    ("length_constraints:number_words", {"num_words": 5, "relation": "at least"},
     "one two three four five", "one two"),
    ("length_constraints:nth_paragraph_first_word",
     {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "second"},
     "First para.\n\nSecond para here.", "First para.\n\nThird para."),
    ("detectable_content:number_placeholders", {"num_placeholders": 2}, "[name] at [address]", "[name]"),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Hi.\nP.S. bye", "Hi. PS bye"),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "* a\n* b", "* a"),
    ("detectable_format:constrained_response", {}, "My answer is yes.", "Yes."),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2}, "*one* and **two**", "*one*"),
    ("detectable_format:multiple_sections", {"section_spliter": "SECTION", "num_sections": 2},
     "SECTION 1\na\nSECTION 2\nb", "SECTION 1\na"),
    ("detectable_format:json_format", {}, '```json\n{"a": 1}\n```', '{"a": 1'),
    ("detectable_format:title", {}, "<<Poem>>\ntext", "Poem"),
    ("combination:two_responses", {}, "A\n******\nB", "A\n******\nA"),
    ("combination:repeat_prompt", {"prompt_to_repeat": "Say hi."}, "Say hi. Hi!", "Hi! Say hi."),
    ("startend:end_checker", {"end_phrase": "Any other questions?"},
     "Done. Any other questions?", "Any other questions? Done."),
    ("startend:quotation", {}, '"hello"', "hello"),
    ("change_case:capital_word_frequency", {"capital_frequency": 2, "capital_relation": "at least"},
     "THIS is IMPORTANT", "This is important"),
    ("change_case:english_capital", {}, "THIS IS ALL CAPS.", "This Is Not."),
    ("change_case:english_lowercase", {}, "this is all lowercase.", "This is not."),
    ("punctuation:no_comma", {}, "no commas here", "a, b"),
]


def test_ifeval_table_covers_all_25_checkers():
    assert len(gr.IFEVAL_CHECKERS) == 25
    assert {c[0] for c in IFEVAL_CASES} == set(gr.IFEVAL_CHECKERS)


@pytest.mark.parametrize("iid,kwargs,good,bad", IFEVAL_CASES)
@pytest.mark.parametrize("loose", [False, True])
def test_ifeval_checker(iid, kwargs, good, bad, loose):
    assert gr.ifeval_check(iid, kwargs, "prompt", good, loose=loose) is True
    assert gr.ifeval_check(iid, kwargs, "prompt", bad, loose=loose) is False


LOOSE_ONLY = [  # strict fails, loose passes (first/last line removed, or '*' removed)
    ("change_case:english_lowercase", {}, "Sure! Here it is:\nthis is lowercase text."),
    ("startend:quotation", {}, 'Here you go:\n"hello"'),
    ("startend:end_checker", {"end_phrase": "bye"}, "Thanks, **bye**"),
    ("detectable_format:json_format", {}, 'Here is the JSON:\n{"a": 1}'),
]


@pytest.mark.parametrize("iid,kwargs,response", LOOSE_ONLY)
def test_ifeval_loose_only(iid, kwargs, response):
    assert gr.ifeval_check(iid, kwargs, "", response) is False
    assert gr.ifeval_check(iid, kwargs, "", response, loose=True) is True


def test_ifeval_reference_vectors_and_hub_kwargs():
    # the reference checkers' behaviour
    assert gr.ifeval_check("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "", "*** a *** b")
    assert gr.ifeval_check("startend:end_checker", {"end_phrase": "Is there anything else I can help with?"},
                           "", '"Sure. Is there anything else I can help with?"')
    # hub rows carry every key with nulls: they are dropped
    kw = {"num_words": None, "relation": None, "end_phrase": "bye", "keywords": None}
    assert gr.ifeval_check("startend:end_checker", kw, "", "ok bye")
    # empty responses never pass in strict mode
    assert gr.ifeval_check("punctuation:no_comma", {}, "", "   ") is False
    with pytest.raises(KeyError):
        gr.ifeval_check("nope:nothing", {}, "", "x")
    with pytest.raises(ValueError):
        gr.ifeval_check("length_constraints:number_words", {"num_words": 3, "relation": "about"}, "", "a b c")


def test_ifeval_accuracies():
    item = {"prompt": "p", "instruction_id_list": ["punctuation:no_comma", "startend:quotation"],
            "kwargs": [{}, {}]}
    slots_a = gr.ifeval_slots(item, '"a b"')        # both pass
    slots_b = gr.ifeval_slots(item, "a, b")         # both fail
    slots_c = gr.ifeval_slots(item, 'x:\n"a b"')    # comma ok; quotation loose only
    acc = gr.ifeval_accuracies([slots_a, slots_b, slots_c])
    assert acc["n_prompts"] == 3 and acc["n_instructions"] == 6
    assert math.isclose(acc["inst_level_strict"], 100 * 3 / 6)
    assert math.isclose(acc["inst_level_loose"], 100 * 4 / 6)
    assert math.isclose(acc["prompt_level_strict"], 100 * 1 / 3)
    assert math.isclose(acc["prompt_level_loose"], 100 * 2 / 3)


@pytest.mark.skipif(gr._LANGDETECT is not None, reason="built-in detector only")
@pytest.mark.parametrize("text,lang", [
    ("The cat is on the table and it is happy.", "en"),
    ("El gato está en la mesa y es muy feliz con los niños.", "es"),
    ("Le chat est sur la table et il est très content.", "fr"),
    ("Die Katze ist auf dem Tisch und sie ist nicht müde.", "de"),
    ("Привет, как дела? Это простой текст.", "ru"),
    ("Привіт, це український текст із літерою ї.", "uk"),
    ("これは日本語の文章です。", "ja"),
    ("이것은 한국어 문장입니다.", "ko"),
    ("यह एक हिंदी वाक्य है और यह सरल है।", "hi"),
    ("هذه جملة باللغة العربية.", "ar"),
    ("این یک جمله فارسی است.", "fa"),
    ("یہ ایک اردو جملہ ہے۔", "ur"),
    ("นี่คือประโยคภาษาไทย", "th"),
    ("זה משפט בעברית.", "he"),
    ("12345 !!!", None),
])
def test_builtin_language_detector(text, lang):
    assert gr.detect_language(text) == lang


def test_linear_time_helpers_agree_with_the_reference_regexes():
    import random
    import re
    rng = random.Random(0)
    for _ in range(3000):
        s = "".join(rng.choice("[]<> a\n") for _ in range(rng.randint(0, 30)))
        assert gr.count_placeholders(s) == len(re.findall(r"\[.*?\]", s)), s
        assert gr.find_titles(s) == re.findall(r"<<[^\n]+>>", s), s
        for marker, pat in (("P.S.", r"\s*p\.\s?s\..*$"), ("P.P.S", r"\s*p\.\s?p\.\s?s.*$")):
            t = s.replace("<", "p").replace(">", ".").replace("[", "s")
            assert gr._chk_postscript(t, marker) == bool(re.findall(pat, t.lower(), flags=re.MULTILINE)), t
    t0 = time.time()
    for iid, kw, text in [("detectable_format:title", {}, "<" * 200_000),
                          ("detectable_content:number_placeholders", {"num_placeholders": 1}, "[" * 200_000),
                          ("detectable_content:postscript", {"postscript_marker": "P.S."}, "x" + " " * 200_000 + "x")]:
        assert gr.ifeval_check(iid, kw, "", text, loose=True) is False
    assert time.time() - t0 < 2.0


def test_sentence_and_word_fallbacks():
    if gr._NLTK is None:
        assert gr.count_sentences("Hello there. Mr. Smith went to Washington! Did he? Yes.") == 4
        assert gr.word_tokenize("I DON'T know, it's FINE.") == \
            ["I", "DO", "N'T", "know", ",", "it", "'s", "FINE", "."]
    assert gr.count_sentences("") == 0


# -----------------------------------------------------------------------------
# score_item dispatch (toy and real items)

def test_score_item_dispatch():
    assert gr.score_item({"scorer": "math", "gold": "12"}, r"so \boxed{12}.") == 1.0
    assert gr.score_item({"scorer": "choice", "gold": "C", "options": "ABCDE"}, "The answer is (C).") == 1.0
    assert gr.score_item({"scorer": "choice", "gold": "C", "options": "ABCDE"}, "The answer is (D).") == 0.0
    assert gr.score_item({"scorer": "bbh", "gold": "False", "subtask": "boolean_expressions"},
                         "So the answer is False.") == 1.0
    assert gr.score_item({"scorer": "nq", "gold": ["Zorn"]}, "The capital of Elb is Zorn.") == 1.0
    item = {"scorer": "ifeval", "prompt": "p", "instruction_id_list": ["punctuation:no_comma", "startend:quotation"],
            "kwargs": [{}, {}]}
    assert gr.score_item(item, "a b") == 0.5
    with pytest.raises(ValueError):
        gr.score_item({"scorer": "nope", "gold": "x"}, "x")


def test_score_item_on_toy_world_canonical_responses():
    for fam in ("math", "med", "nq", "bbh"):
        items = tw.make_eval_items(fam, "test", 20, seed=0)
        assert all(gr.score_item(it, tw.item_response(it)) == 1.0 for it in items), fam
        # a wrong answer scores 0
        assert gr.score_item(items[0], "I have no idea.") == 0.0


# -----------------------------------------------------------------------------
# A benchmark registered after import (README "Add a benchmark"): suites, scoring and the general
# axis read the records when they run

def test_registered_benchmark_joins_suites_scoring_and_the_general_axis(monkeypatch):
    monkeypatch.setattr(ev, "BENCHMARKS", dict(ev.BENCHMARKS))
    before = list(ev.SUITES["general"])
    ev.register_benchmark("echo", loader=None, axis="general", scorer=lambda item, r: float(r == item["gold"]))
    try:
        assert ev.SUITES["general"] == before + ["echo"] and ev.SUITES["all"][-1] == "echo"
        item = ev.make_item("echo", 0, "say hi", "hi")
        assert item["id"] == "echo-0" and gr.score_item(item, "hi") == 1.0
        scores = {"ifeval": 60.0, "bbh": 30.0, "nq": 20.0, "echo": 10.0}
        out = ev.summarize_suite({n: {"score": v} for n, v in scores.items()}, domain=None, base_general=40.0)
        assert out["general_score"] == (60.0 + 30.0 + 20.0 + 10.0) / 4 and out["forgetting"] == 40.0 - 30.0
        assert "general_score" not in ev.summarize_suite({n: {"score": 1.0} for n in before}, domain=None,
                                                          base_general=None)   # echo missing: no mean
    finally:
        gr.SCORERS.pop("echo", None)   # (BENCHMARKS is restored by monkeypatch)


@pytest.mark.slow
def test_readme_benchmark_pasted_in_is_scored_on_the_general_axis(tmp_path):
    import json
    import os
    import re
    import shutil
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text(encoding="utf-8")
    m = re.search(r"^## Add a benchmark\n(.*?)(?=^## )", readme, re.S | re.M)
    assert m, "README.md has no '## Add a benchmark' section"
    code = "\n\n".join(re.findall(r"```python\n(.*?)```", m.group(1), re.S))
    assert "register_benchmark(" in code
    repo = tmp_path / "repo"
    repo.mkdir()
    for p in root.iterdir():
        if p.suffix == ".py" or p.name == "toy_model":
            (shutil.copytree if p.is_dir() else shutil.copy2)(p, repo / p.name)
    src = (repo / "evaluate.py").read_text(encoding="utf-8")
    head, main = src.split('\nif __name__ == "__main__":', 1)
    (repo / "evaluate.py").write_text(head + "\n\n" + code + '\n\nif __name__ == "__main__":' + main, encoding="utf-8")
    data = tmp_path / "data"
    shutil.copytree(root / "tests" / "fixtures" / "eval", data)
    (data / "capitals").mkdir()
    (data / "capitals" / "test.jsonl").write_text(
        '{"country": "France", "capital": "Paris"}\n{"country": "Japan", "capital": "Tokyo"}\n', encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "evaluate.py", "--model", "toy", "--suite", "general", "--data-dir",
                        str(data), "--path", f"nq={data / 'nq/nq-test.qa.csv'}", "--limit", "2",
                        "--max-new-tokens", "3", "--backend", "hf", "--out", str(tmp_path / "ev")],
                       cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "ev" / "results.json").read_text())
    b = res["benchmarks"]
    assert list(b) == ["ifeval", "bbh", "nq", "capitals"] and b["capitals"]["n_items"] == 2
    assert math.isclose(res["general_score"], sum(v["score"] for v in b.values()) / 4)
