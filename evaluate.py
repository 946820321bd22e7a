"""evaluate.py — both-axis scoring (target gain and general retention) for the real benchmarks
and for the toy world (PAPER.md §2, §6; scoring rules in reference/EVAL.md).

The paper's central claim is that one number is not enough: every checkpoint gets a **target**
score (math: mean of MATH-500 / AIME24 / AMC23 avg@16 accuracies; medical: macro mean over the m1
sources) and a **general** score (mean of IFEval instruction-level strict accuracy, the BBH task
mean and NQ-open containment). Forgetting = base general - model general (PAPER.md §6).

Layout (read top to bottom):
  1. Math grader: `extract_math_answer` (last \\boxed{}), `strip_string` (EVAL.md §1.3),
     `math_equal` (§1.4) with a hand-written LaTeX -> sympy parser (no Python eval anywhere),
     a hard per-call time limit (a killable worker process), `grade_math`, the RL reward
     `grade_reward` (§2), `pass_at_k` (§1.5).
  2. Medical letter extraction `extract_choice_letter` (EVAL.md §3, the release's match_choice).
  3. BBH extraction + exact match (§4); 4. NQ containment + true exact match (§6);
  5. IFEval: the 25 checkers, strict and loose, the four accuracies (§5).
  6. `score_item` dispatching on item["scorer"] (toy items and real items alike).
  7. Generation: transformers `generate` (batched, left padding, KV cache, explicit
     GenerationConfig, stop strings) with a resumable JSONL cache; for greedy decoding a plain
     KV-cache loop `greedy_decode` is the fast path (tested token-for-token against generate);
     vLLM backend (GPU; guarded import; API of vLLM 0.34.0, requirements-gpu.txt; CI runs it on
     CPU through tests/vllm_double.py): one engine per process on the base model's folder, reused
     across suites and adapters (merged weights pushed in memory), freed by release_engine().
  8. Toy suite `evaluate_toy`; 9. real benchmark loaders + the paper's prompts; 10. suites; 11. CLI.

Run:
    python evaluate.py --model toy --suite toy --out runs/eval_toy          # toy world, CPU
    python evaluate.py --model toy --suite toy --bench --threads 1          # timing of the toy suite
    python evaluate.py --model /models/Qwen2.5-7B --adapter runs/lora --suite all --out runs/ev \\
        --data-dir data                                                     # real benchmarks (GPU)

Scores are in percent. Per item: `score_item(item, response)` in [0, 1].

Untrusted text: model outputs are never passed to eval/exec/sympify/parse_expr, pickle or a shell.
Symbolic math goes through `latex_to_sympy`, a recursive-descent parser over a whitelisted LaTeX
subset that builds sympy objects directly and refuses inputs whose evaluation could blow up.

Deviations (each also marked `# DEVIATION:` at the line)
 1. Math symbolic step (EVAL.md §1.4 step 8): a hand-written LaTeX-subset parser replaces
    latex2sympy/parse_expr (numbers, + - * / ^, \\frac \\dfrac \\sqrt[n], \\pi, \\infty, \\cdot,
    \\times, \\div, implicit products, |x|, n!, \\binom, trig/log/exp, Greek letters, subscripts,
    i = imaginary unit). Runs of >= 3 plain letters are one symbol (so "seat" != "east"), shorter
    runs are products ("xy" = x*y). Expect ~1 point of difference from the release on MATH-500.
 2. Time limit: every sympy comparison runs in a persistent worker process (plus a warm spare)
    that is SIGKILLed when it has not answered within the limit (3 s, + 0.25 s grace), so no work
    outlives the call, in any thread (the release: a pebble process pool, 3 s per comparison). One
    deadline covers a whole `math_equal`/`grade_math` call, including the parts of tuples,
    matrices, equations and every gold of a list (the release times each comparison separately).
    The worker's start-up (~1-2 s, once per process) is outside the clock. Sympy work is also
    bounded up front (<= 400 characters, nesting <= 60, integers <= 40 digits, exponents <= 1000
    and results <= 20000 bits, n! for n <= 200), so most hostile answers never reach sympy.
 3. Extracted math answers longer than 2000 characters count as no answer ("" -> wrong).
 4. Intervals/tuples (§1.4 step 6) must agree in their bracket types ("[0,1)" never equals
    "(0,1)"); the release ignores the brackets there. Parts are split at top-level commas.
 5. Unit words (§1.3 step 4): a self-written list of ~100 units of measure in the spirit of the
    release's list (including its single letters a c d g h l m o s t), without the release's
    ordinary words (east, west, way(s), men, women, ...), so "\\text{south}" != "\\text{north}";
    English number words -> digits by a small built-in parser instead of word2number.
 6. Medical extraction: a candidate "I" in items with >= 9 options that reads as the pronoun
    ("I hope", "I'm", "I think") is skipped (`guard_pronoun_i=True`); the release returns "I"
    there. `guard_pronoun_i=False` restores the release's quirk.
 7. IFEval language checks use `langdetect` (seeded 0) when it is installed, else a built-in
    detector: Unicode script for single-script languages, distinctive letters for Cyrillic and
    Arabic script, stop-word profiles for Latin and Devanagari languages; Latin text with no
    evidence counts as English. Sentence counts use nltk Punkt when nltk + punkt_tab are
    installed, else a regex splitter with an abbreviation list; capital-word counts use nltk
    word_tokenize when available, else a Treebank-like regex tokenizer (splits n't, 's, ...).
    results.json records which backends ran.
 8. IFEval keywords (existence, frequency) are matched literally (re.escape) rather than as
    regular expressions; like the reference, the frequency keyword, the postscript marker and the
    section spliter are stripped, and a custom postscript marker and the spliter ARE regexes
    (an invalid one is matched literally where the reference would crash).
 9. NQ true exact match: the prediction's first line after its last "answer is", cut at the
    first "." / "," like lm-eval, then SQuAD normalisation; equal to any normalised gold.
10. BBH: the task kind (multiple choice or free form) comes from the task name, or, for unknown
    task names, from the gold's shape "(X)".
11. Medical prompt: the tokenizer's chat template with system "You are a helpful assistant." for
    every model (the release hand-builds ChatML for Qwen and a Llama-3 string with a typo).
12. Toy suite: greedy decoding with one sample for every family (real math: T=0.6, 16 samples).
13. Sampled generations (T > 0) are seeded per batch; a resumed run therefore gives different
    (equally distributed) samples than an uninterrupted one. Greedy runs are unaffected.
14. MATH-500 gold = the `answer` field (the release re-extracts the last \\boxed{} of `solution`;
    EVAL.md §1.1 says they agree on all 500 rows up to spaces).
15. IFEval title / placeholder / postscript / bullet-list checks and the built-in sentence counter
    use linear-time scans equivalent to the reference regexes (tested against them), which are
    quadratic on long pathological inputs (a line of '[', thousands of blank lines, "Mr. Mr. ...").
16. GRPO reward (`grade_reward`, EVAL.md §2): the release's reward extraction and `math_equal`
    variant (case-sensitive first test, no A-E step), but with our evaluation `strip_string`
    instead of the reward's simpler one. Math GRPO keeps `grade_math` (the evaluation grader).
17. A real-benchmark run fetches nltk's punkt_tab on first use; if it cannot (no network), IFEval
    runs the built-in fallbacks of DEVIATION 7, prints a warning and writes
    `ifeval_fallback_used` into results.json.
18. An IFEval response longer than MAX_IFEVAL_CHARS (200,000 characters) follows no instruction
    (strict and loose): the 25 checkers and 8 loose variants take ~3 s per MB, and the scorer's
    bound is the time limit + 1 s on any input. Real IFEval generations stop at 1025 tokens
    (a few thousand characters), so no real verdict changes.
"""
from __future__ import annotations

import argparse
import atexit
import cmath
import hashlib
import json
import math
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

# -----------------------------------------------------------------------------
# 1. Math grader (EVAL.md §1.2-1.5; PA: third_party/math_eval/{parser,grader}.py)

MAX_ANSWER_CHARS = 2000  # DEVIATION 3: longer extracted answers count as no answer
MAX_SYMBOLIC_CHARS = 400  # DEVIATION 2: longer strings never reach sympy
MAX_IFEVAL_CHARS = 200_000  # DEVIATION 18: a longer IFEval response follows no instruction
MAX_PARSE_DEPTH = 60
MAX_INT_DIGITS = 40
MAX_EXPONENT = 1000
MAX_RESULT_BITS = 20000
MAX_FACTORIAL = 200


def _match_brace(s: str, start: int) -> int:
    """Index of the '}' matching the '{' at s[start], or -1 if unbalanced (linear, no recursion)."""
    depth = 0
    for i in range(start, len(s)):
        c = s[i]
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return i
    return -1


def last_boxed_content(text: str) -> str | None:
    """Content of the last \\boxed{...} (brace matched), or None when there is no 'boxed'.

    `\\boxed 5$` (no brace) gives the text up to the next '$' (EVAL.md §1.2 rule 3). An unbalanced
    '{' gives the rest of the text, as the release does.
    """
    k = text.rfind("boxed")
    if k < 0:
        return None
    rest = text[k + len("boxed"):]
    if rest.startswith("{"):
        end = _match_brace(rest, 0)
        return rest[1:end] if end >= 0 else rest[1:]
    return rest.split("$")[0].strip()


_LAST_NUMBER = re.compile(r"-?\d*\.?\d+")


def extract_math_answer(text: str) -> str:
    """The model's final answer, normalised (EVAL.md §1.2): first rule that fires of
    Minerva "final answer is $..$. I hope" -> last \\boxed{} -> "he answer is" -> "final answer is"
    -> last number; then newline/colon/period/slash clean-up and `strip_string`."""
    text = str(text).replace("ки", "")
    if "final answer is $" in text and "$. I hope" in text:
        ans = text.split("final answer is $", 1)[1].split("$. I hope", 1)[0].strip()
    elif "boxed" in text:
        ans = last_boxed_content(text) or ""
    elif "he answer is" in text:
        ans = text.split("he answer is")[-1].strip()
    elif "final answer is" in text:
        ans = text.split("final answer is")[-1].strip()
    else:
        nums = _LAST_NUMBER.findall(text.replace(",", ""))
        ans = nums[-1] if nums else ""
    if len(ans) > MAX_ANSWER_CHARS:
        return ""  # DEVIATION 3
    ans = re.sub(r"\n\s*", "", ans)
    if ans.startswith(":"):
        ans = ans[1:]
    if ans.endswith("."):
        ans = ans[:-1]
    if ans.endswith("/"):
        ans = ans[:-1]
    return strip_string(ans)


# DEVIATION 5: our own unit list (the release has ~150 entries incl. these single letters). Only
# units of measure: ordinary words (directions, people, ways, times, ...) are left out, so that
# "\\text{south}" does not equal "\\text{north}" by both normalising to "\\text{}".
_UNIT_WORDS = [
    "degree", "degrees", "deg", "radian", "radians", "mph", "kmph", "kmh", "km/h", "mile", "miles",
    "meter", "meters", "metre", "metres", "km", "cm", "mm", "m", "inch", "inches", "foot", "feet",
    "ft", "yard", "yards", "sq", "square", "squared", "cubic", "cube", "units", "unit",
    "second", "seconds", "sec", "minute", "minutes", "min", "hour", "hours", "hr", "hrs", "day",
    "days", "week", "weeks", "month", "months", "year", "years", "yr", "noon", "am", "pm",
    "percent", "dollar", "dollars", "cent", "cents", "rupee", "rupees", "rs", "euro", "euros",
    "pound", "pounds", "lb", "lbs", "kg", "gram", "grams", "gm", "ounce", "ounces", "oz",
    "liter", "liters", "litre", "litres", "ml", "gallon", "gallons", "gal", "acre", "acres",
    "hectare", "hectares", "ohm", "ohms", "volt", "volts", "watt", "watts",
    "a", "c", "d", "g", "h", "l", "m", "o", "s", "t",
]
_UNIT_PATTERNS = [re.compile(r"(^|\W)" + re.escape(u) + r"($|\W)") for u in _UNIT_WORDS]

_NUM_WORDS = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen".split())}
_NUM_WORDS.update({w: 10 * (i + 2) for i, w in enumerate(
    "twenty thirty forty fifty sixty seventy eighty ninety".split())})
_NUM_SCALES = {"hundred": 100, "thousand": 1000, "million": 10 ** 6, "billion": 10 ** 9}


def words_to_number(s: str) -> int | None:
    """'twenty-five' -> 25, 'one hundred and five' -> 105; None unless the WHOLE string is
    English number words (the release uses word2number for this, EVAL.md §1.3 step 5)."""
    toks = [t for t in re.split(r"[\s\-]+", s.strip().lower()) if t and t != "and"]
    if not toks or len(toks) > 12:
        return None
    total, cur, seen = 0, 0, False
    for t in toks:
        if t in _NUM_WORDS:
            cur += _NUM_WORDS[t]
            seen = True
        elif t in _NUM_SCALES and seen:
            if t == "hundred":
                cur *= 100
            else:
                total += cur * _NUM_SCALES[t]
                cur = 0
        else:
            return None
    return total + cur if seen else None


def _remove_right_units(s: str) -> str:
    """Drop a trailing \\text{...} (units) when something remains in front of it.

    The release's `re.sub(r"\\text{.*?}$", "", s)`: the lazy `.*?` may run over '}' to reach the
    end, so everything from the first '\\text{' that can reach a final '}' goes, which also
    drops units with an exponent ("5\\text{ cm}^{2}" -> "5", as the release and Math-Verify)."""
    m = re.search(r"\\text\{.*?\}$", s)
    if m and s[:m.start()].strip():
        return s[:m.start()].strip()
    return s


def _fix_sqrt(s: str) -> str:
    # \sqrt3 -> \sqrt{3}, \sqrtx -> \sqrt{x}
    return re.sub(r"\\sqrt(\w)", r"\\sqrt{\1}", s)


def _fix_fracs(s: str) -> str:
    """\\frac12 -> \\frac{1}{2}, \\frac1{b} -> \\frac{1}{b}, \\frac{a}b -> \\frac{a}{b}."""
    parts = s.split("\\frac")
    out = parts[0]
    for sub in parts[1:]:
        out += "\\frac"
        if not sub:
            continue
        if sub[0] == "{":
            end = _match_brace(sub, 0)
            if end >= 0 and end + 1 < len(sub) and sub[end + 1] not in "{":
                out += sub[: end + 1] + "{" + sub[end + 1] + "}" + sub[end + 2:]
            else:
                out += sub
            continue
        if len(sub) < 2:
            out += sub
            continue
        a, b = sub[0], sub[1]
        out += "{" + a + "}" + (sub[1:] if b == "{" else "{" + b + "}" + sub[2:])
    return out


def _fix_a_slash_b(s: str) -> str:
    m = re.fullmatch(r"(-?\d+)/(\d+)", s)
    if m and len(s) < 60:
        return "\\frac{" + m.group(1) + "}{" + m.group(2) + "}"
    return s


def strip_string(s: str) -> str:
    """Normalise a math answer (EVAL.md §1.3, applied to prediction and gold alike)."""
    s = str(s).strip().replace("\n", "").rstrip(".").replace("\\!", "")
    # step 1: every matrix flavour becomes pmatrix
    s = re.sub(r"\\begin\{array\}\{[^{}]*\}", r"\\begin{pmatrix}", s)
    s = s.replace("\\end{array}", "\\end{pmatrix}").replace("bmatrix", "pmatrix")
    # step 2
    s = s.replace("tfrac", "frac").replace("dfrac", "frac")
    s = s.replace("\\neq", "\\ne").replace("\\leq", "\\le").replace("\\geq", "\\ge")
    s = s.replace("\\left", "").replace("\\right", "")
    s = s.replace("\\{", "{").replace("\\}", "}")
    # step 3: trailing \text{units}
    s = _remove_right_units(s)
    # step 4: unit words, twice, whole tokens only, never emptying the string
    for _ in range(2):
        for pat in _UNIT_PATTERNS:
            s2 = pat.sub(r"\1\2", s)
            if s2 != "":
                s = s2
    # step 5
    s = s.replace("^{\\circ}", "").replace("^\\circ", "")
    s = s.replace("\\$", "").replace("$", "").replace("\\(", "").replace("\\)", "")
    n = words_to_number(s)
    if n is not None:
        s = str(n)
    s = re.sub(r"\\text\{(.*?)\}", r"\1", s)
    # step 6: "x=", "y\in", ... anywhere; empty set; the whole real line
    for key in ("x=", "y=", "z=", "x\\in", "y\\in", "z\\in", "x\\to", "y\\to", "z\\to"):
        s = s.replace(key, "")
    s = s.replace("\\emptyset", "{}").replace("(-\\infty,\\infty)", "\\mathbb{R}")
    # step 7
    s = s.replace("\\%", "").replace("%", "").replace(" .", " 0.").replace("{.", "{0.")
    # step 8
    s = s.replace("infinity", "\\infty")
    if "\\infty" not in s:
        s = s.replace("inf", "\\infty")
    s = s.replace("and", "").replace("\\mathbf", "")
    s = re.sub(r"\\mbox\{.*?\}", "", s)
    if "j" in s and "i" not in s:
        s = s.replace("j", "i")
    # step 9: 12.000 -> 12 (also before a non-digit); .5 -> 0.5; "k=v" with short k -> v
    s = re.sub(r"(\d+)\.0*([^\d])", r"\1\2", s)
    s = re.sub(r"(\d+)\.0*$", r"\1", s)
    if not s:
        return s
    if s[0] == ".":
        s = "0" + s
    if s.count("=") == 1 and len(s.split("=")[0]) <= 2:
        s = s.split("=")[1]
    # step 10
    s = _fix_sqrt(s)
    s = s.replace(" ", "")
    s = _fix_fracs(s)
    s = _fix_a_slash_b(s)
    return s


# --- LaTeX subset -> sympy, without any Python eval (DEVIATION 1) -------------------------------

class LatexParseError(ValueError):
    """The string is outside the supported LaTeX subset or exceeds a resource bound."""


_sympy_mod = None


def _sympy():
    global _sympy_mod
    if _sympy_mod is None:
        import sympy
        _sympy_mod = sympy
    return _sympy_mod


_GREEK = ("alpha beta gamma delta epsilon varepsilon zeta eta theta vartheta iota kappa lambda mu "
          "nu xi rho sigma tau upsilon phi varphi chi psi omega Gamma Delta Theta Lambda Xi Sigma "
          "Phi Psi Omega").split()
_FUNCS = ("sin cos tan sec csc cot arcsin arccos arctan sinh cosh tanh ln log exp").split()
_KNOWN_CMDS = set(_GREEK) | set(_FUNCS) | {
    "frac", "sqrt", "pi", "infty", "cdot", "times", "div", "binom", "mathrm", "text", "operatorname",
    "mathit", "mathbf", "boldsymbol", "displaystyle", "circ", "ne", "le", "ge", "pm"}
_SKIP_CMDS = {"displaystyle"}
_WRAP_CMDS = {"mathrm", "text", "mathit", "mathbf", "boldsymbol", "operatorname"}
_ALLOWED = set("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ+-*/^_()[]{}|!.\\ ")


def _tokenize_latex(s: str) -> list[tuple[str, str]]:
    """Whitelisted characters only. Tokens: (kind, text) with kind in num, letter, word, cmd, op."""
    bad = set(s) - _ALLOWED
    if bad:
        raise LatexParseError(f"characters outside the LaTeX subset: {sorted(bad)[:5]}")
    toks, i, n = [], 0, len(s)
    while i < n:
        c = s[i]
        if c == " ":
            i += 1
        elif c.isdigit() or (c == "." and i + 1 < n and s[i + 1].isdigit()):
            m = re.match(r"\d*\.?\d+|\d+\.?", s[i:])
            num = m.group(0)
            if len(num.replace(".", "")) > MAX_INT_DIGITS:
                raise LatexParseError("number too long")
            toks.append(("num", num))
            i += len(num)
        elif c.isalpha():
            m = re.match(r"[A-Za-z]+", s[i:])
            run = m.group(0)
            if len(run) >= 3:  # DEVIATION 1: a word is one symbol, not a product of letters
                toks.append(("word", run))
            else:
                toks.extend(("letter", ch) for ch in run)
            i += len(run)
        elif c == "\\":
            m = re.match(r"[A-Za-z]+", s[i + 1:])
            if not m:  # "\," "\;" "\ " spacing; "\\" row break is not part of a scalar
                if i + 1 < n and s[i + 1] in " ":
                    i += 2
                    continue
                raise LatexParseError(f"unsupported escape at {i}")
            run = m.group(0)
            # spaces were removed by strip_string, so "\pir" may mean "\pi r": longest known prefix
            for k in range(len(run), 0, -1):
                if run[:k] in _KNOWN_CMDS:
                    break
            else:
                raise LatexParseError(f"unknown command \\{run}")
            toks.append(("cmd", run[:k]))
            i += 1 + k
            rest = run[k:]
            if rest:  # re-tokenise the letters that followed the command
                toks.extend(_tokenize_latex(rest))
                i += len(rest)
        else:
            toks.append(("op", c))
            i += 1
    return toks


class _LatexParser:
    """Recursive descent over the token list. Grammar (lowest to highest precedence):
        expr  := ['+'|'-'] term (('+'|'-') term)*
        term  := power ((('*'|\\cdot|\\times|'/'|\\div) power) | implicit power)*
        power := postfix ['^' script]          (right associative through `script`)
        postfix := atom ['!'] ['_' script]
        atom  := number | letter | word | group | \\frac | \\sqrt | \\binom | function | constant
    """

    def __init__(self, toks):
        self.toks, self.i, self.depth = toks, 0, 0

    # -- helpers --
    def peek(self, k=0):
        j = self.i + k
        return self.toks[j] if j < len(self.toks) else ("eof", "")

    def take(self):
        t = self.peek()
        self.i += 1
        return t

    def expect(self, kind, text):
        t = self.take()
        if t != (kind, text):
            raise LatexParseError(f"expected {text!r}, got {t[1]!r}")

    def enter(self):
        self.depth += 1
        if self.depth > MAX_PARSE_DEPTH:
            raise LatexParseError("nesting too deep")

    # -- guarded arithmetic --
    @staticmethod
    def pow(base, exp):
        sp = _sympy()
        if exp.is_Number:
            if abs(exp) > MAX_EXPONENT:
                raise LatexParseError("exponent too large")
            if base.is_Number and exp.is_Integer:
                bits = max(1, abs(int(base.p)).bit_length(), abs(int(base.q)).bit_length()) \
                    if base.is_Rational else 64
                if bits * abs(int(exp)) > MAX_RESULT_BITS:
                    raise LatexParseError("power result too large")
        elif exp.has(sp.oo, sp.zoo):
            raise LatexParseError("infinite exponent")
        elif not exp.is_Number and base.is_Number and abs(base) > 1 and exp.is_number:
            v = exp.evalf(15)
            if v.is_real and abs(v) > MAX_EXPONENT:
                raise LatexParseError("exponent too large")
        return sp.Pow(base, exp)

    # -- grammar --
    def parse(self):
        e = self.expr()
        if self.peek()[0] != "eof":
            raise LatexParseError(f"trailing input at token {self.i}: {self.peek()[1]!r}")
        return e

    def expr(self):
        self.enter()
        sign = 1
        while self.peek() in (("op", "+"), ("op", "-")):
            if self.take()[1] == "-":
                sign = -sign
        e = sign * self.term()
        while self.peek() in (("op", "+"), ("op", "-")):
            op = self.take()[1]
            t = self.term()
            e = e + t if op == "+" else e - t
        self.depth -= 1
        return e

    def _starts_atom(self, t):
        kind, text = t
        if kind in ("num", "letter", "word"):
            return True
        if kind == "op":
            return text in "([{"
        return kind == "cmd" and text not in ("cdot", "times", "div", "ne", "le", "ge", "pm")

    def term(self):
        e = self.power()
        while True:
            t = self.peek()
            if t in (("op", "*"), ("cmd", "cdot"), ("cmd", "times")):
                self.take()
                e = e * self.power()
            elif t in (("op", "/"), ("cmd", "div")):
                self.take()
                d = self.power()
                if d == 0:
                    raise LatexParseError("division by zero")
                e = e / d
            elif self._starts_atom(t):  # implicit product: 2x, 2\pi, (x+1)(x-1)
                e = e * self.power()
            else:
                return e

    def power(self):
        base = self.postfix()
        if self.peek() == ("op", "^"):
            self.take()
            self.enter()
            if self.peek() in (("op", "-"), ("op", "+")):  # x^-1
                sign = -1 if self.take()[1] == "-" else 1
                exp = sign * self.script()
            else:
                exp = self.script()
            self.depth -= 1
            if self.peek() == ("op", "^"):
                raise LatexParseError("ambiguous double superscript")
            return self.pow(base, exp)
        return base

    def script(self):
        """Argument of ^, _, \\frac, \\sqrt: a {group} or ONE character/command (x^23 = x^2 * 3)."""
        t = self.peek()
        if t == ("op", "{"):
            return self.group("{", "}")
        if t[0] == "num" and len(t[1]) > 1:
            self.toks[self.i] = ("num", t[1][1:])  # keep the rest of the digits for later
            if t[1][1:].startswith("."):
                raise LatexParseError("bad script argument")
            return _sympy().Integer(int(t[1][0]))
        return self.atom()

    def postfix(self):
        e = self.atom()
        while True:
            t = self.peek()
            if t == ("op", "!"):
                self.take()
                if not (e.is_Integer and 0 <= e <= MAX_FACTORIAL):
                    raise LatexParseError("factorial of a non-small integer")
                e = _sympy().factorial(e)
            elif t == ("op", "_"):
                self.take()
                sub = self.script()
                e = _sympy().Symbol(f"{e}_{sub}")  # x_1, 52_8: a name, not arithmetic
            else:
                return e

    def group(self, open_, close):
        self.expect("op", open_)
        e = self.expr()
        self.expect("op", close)
        return e

    def atom(self):
        sp = _sympy()
        self.enter()
        kind, text = self.take()
        try:
            if kind == "num":
                if "." in text:
                    ip, fp = text.split(".")
                    return sp.Rational(int((ip or "0") + fp) if (ip or fp) else 0, 10 ** len(fp))
                return sp.Integer(int(text))
            if kind == "letter":
                return sp.I if text == "i" else sp.Symbol(text)
            if kind == "word":
                return sp.Symbol(text)
            if kind == "op" and text in "([{":
                self.i -= 1
                return self.group(text, {"(": ")", "[": "]", "{": "}"}[text])
            if kind == "op" and text == "|":
                e = self.expr()
                self.expect("op", "|")
                return sp.Abs(e)
            if kind == "cmd":
                return self.command(text)
            raise LatexParseError(f"unexpected token {text!r}")
        finally:
            self.depth -= 1

    def command(self, name):
        sp = _sympy()
        if name == "frac":
            num, den = self.script(), self.script()
            if den == 0:
                raise LatexParseError("division by zero")
            return num / den
        if name == "binom":
            n, k = self.script(), self.script()
            if not (n.is_Integer and k.is_Integer and 0 <= k <= n <= 1000):
                raise LatexParseError("binom needs small integers")
            return sp.binomial(n, k)
        if name == "sqrt":
            if self.peek() == ("op", "["):
                idx = self.group("[", "]")
                if not (idx.is_Integer and 1 < idx <= 100):
                    raise LatexParseError("root index must be a small integer")
                return sp.root(self.script(), idx)
            return sp.sqrt(self.script())
        if name == "pi":
            return sp.pi
        if name == "infty":
            return sp.oo
        if name in _GREEK:
            return sp.Symbol(name)
        if name in _WRAP_CMDS:
            return self.script()
        if name in _SKIP_CMDS:
            return self.atom()
        if name in _FUNCS:
            base = None
            if name == "log" and self.peek() == ("op", "_"):
                self.take()
                base = self.script()
            power = None
            if self.peek() == ("op", "^"):  # \sin^2 x
                self.take()
                power = self.script()
            arg = self.power() if self.peek()[1] not in "([{" else self.atom()
            f = {"sin": sp.sin, "cos": sp.cos, "tan": sp.tan, "sec": sp.sec, "csc": sp.csc,
                 "cot": sp.cot, "arcsin": sp.asin, "arccos": sp.acos, "arctan": sp.atan,
                 "sinh": sp.sinh, "cosh": sp.cosh, "tanh": sp.tanh, "ln": sp.log,
                 "exp": sp.exp}.get(name)
            if name == "exp":
                v = arg.evalf(15) if arg.is_number else None
                if v is not None and v.is_real and abs(v) > MAX_EXPONENT:
                    raise LatexParseError("exponent too large")
            out = (sp.log(arg, base) if base is not None else sp.log(arg)) if name == "log" else f(arg)
            return self.pow(out, power) if power is not None else out
        raise LatexParseError(f"command \\{name} is not a value")


def latex_to_sympy(s: str):
    """Parse a normalised LaTeX answer into a sympy expression. Raises LatexParseError outside
    the subset. Builds objects with sympy's constructors only: no eval, sympify or parse_expr."""
    if len(s) > MAX_SYMBOLIC_CHARS:
        raise LatexParseError(f"answer longer than {MAX_SYMBOLIC_CHARS} characters")
    toks = _tokenize_latex(s)
    if not toks:
        raise LatexParseError("empty")
    try:
        return _LatexParser(toks).parse()
    except RecursionError as err:  # belt and braces; depth is bounded above
        raise LatexParseError("nesting too deep") from err
    except (TypeError, ValueError, ZeroDivisionError, OverflowError, AttributeError) as err:
        if isinstance(err, LatexParseError):
            raise
        raise LatexParseError(f"{type(err).__name__}: {err}") from err


class ComparisonTimeout(BaseException):
    """Raised by SIGALRM inside the comparison worker. A BaseException on purpose: sympy's and our
    own `except Exception` clauses must not swallow it and carry on with no timer running."""


def _alarm_limit(fn, timeout_s: float):
    """fn(), or False when SIGALRM fires after timeout_s (main thread of the worker process only).

    The soft limit: it interrupts pure-Python sympy code and lets the worker answer by itself. Work
    stuck inside one C call does not see the signal; the parent's hard limit then kills the worker.
    """
    def _raise(signum, frame):
        raise ComparisonTimeout()
    old = signal.signal(signal.SIGALRM, _raise)
    signal.setitimer(signal.ITIMER_REAL, max(1e-3, timeout_s))
    try:
        return fn()
    except ComparisonTimeout:
        return False
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _sympy_non_finite(e) -> bool:
    sp = _sympy()
    return bool(e.has(sp.oo, -sp.oo, sp.zoo, sp.nan))


def _sympy_equal(a, b) -> bool:
    """[EVAL.md §1.4 step 8] a == b; simplify(a - b) == 0; numeric isclose 1e-4; a.equals(b).

    Infinite and undefined values (oo, zoo, nan; also numbers beyond float range such as 10^309)
    are equal only to themselves (a == b): `inf <= 1e-4 * inf` once made \infty equal every finite
    gold, a reward a policy could learn to collect. math.isclose/cmath.isclose, which the release's
    comparison uses, are false for inf against anything finite."""
    sp = _sympy()
    if a == b:
        return True
    if _sympy_non_finite(a) or _sympy_non_finite(b):
        return False
    try:
        if sp.simplify(a - b) == 0:
            return True
    except Exception:  # noqa: BLE001 - sympy raises many kinds on odd inputs
        pass
    try:
        if a.is_number and b.is_number:
            va, vb = complex(sp.N(a, 15)), complex(sp.N(b, 15))
            if not (cmath.isfinite(va) and cmath.isfinite(vb)):
                return False  # beyond float range: only the exact tests above may say equal
            return cmath.isclose(va, vb, rel_tol=1e-4)
    except Exception:  # noqa: BLE001
        pass
    try:
        return bool(a.equals(b))
    except Exception:  # noqa: BLE001
        return False


def _parse_either(s: str):
    """latex_to_sympy(s), else of s with '\\\\' -> '\\', else None (EVAL.md §1.4 step 8)."""
    for cand in (s, s.replace("\\\\", "\\")):
        try:
            return latex_to_sympy(cand)
        except LatexParseError:
            continue
    return None


def _symbolic_work(pred: str, gold: str) -> bool:
    """Parse both sides and compare them: the work that runs inside the comparison worker."""
    a = _parse_either(pred)
    if a is None:
        return False
    b = _parse_either(gold)
    if b is None:
        return False
    return _sympy_equal(a, b)


# --- the hard time limit: a killable worker process (DEVIATION 2) -------------------------------
#
# The release runs every comparison in a pebble process pool with a 3 s timeout (EVAL.md §1.4 step
# 9). A thread cannot be stopped and SIGALRM only works in the main thread and not inside C code,
# so we keep one persistent child process (plus a warm spare) that does all sympy work. The parent
# writes a JSON request line {"a", "b", "t"} to its stdin and waits for a "1"/"0" line at most t
# + GRACE_S seconds; on silence it SIGKILLs the child, reaps it and promotes the spare, so no work
# outlives the call. Only strings cross the pipe (no pickle of model output). Start-up (python +
# sympy import, ~1-2 s) happens once, outside any comparison's clock, like the release's pool.

_WORKER_BOOT = "import sys; sys.path.insert(0, sys.argv[1]); import evaluate; evaluate._worker_main()"


def _worker_main() -> None:
    """Entry point of the comparison worker: one answer line per request line, until stdin closes."""
    proto = os.fdopen(os.dup(1), "wb", buffering=0)   # the protocol channel ...
    os.dup2(2, 1)                                      # ... and stray prints go to stderr
    _warm_sympy()
    proto.write(b"ready\n")
    for line in sys.stdin.buffer:
        try:
            req = json.loads(line)
            soft = float(req.get("soft", req["t"]))
            ok = _alarm_limit(lambda: _symbolic_work(str(req["a"]), str(req["b"])), soft)
        except ComparisonTimeout:   # the alarm fired between fn's return and the timer reset
            ok = False
        except Exception:  # noqa: BLE001 - a bad request or sympy bug scores 0, the worker lives on
            ok = False
        proto.write(b"1\n" if ok else b"0\n")


class _Worker:
    """One comparison child process and its line-buffered stdout."""

    def __init__(self):
        env = dict(os.environ, EVALUATE_MATH_WORKER="1", OMP_NUM_THREADS="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _WORKER_BOOT, str(Path(__file__).resolve().parent)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, close_fds=True)
        self.buf = b""
        self.ready = False

    def readline(self, timeout_s: float) -> bytes | None:
        """The next line, or None on timeout or when the worker has died."""
        deadline = time.monotonic() + timeout_s
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, 4096)
            if not chunk:
                return None
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line

    def kill(self) -> None:
        """SIGKILL, reap (no zombie) and close the pipes."""
        try:
            self.proc.kill()
        except OSError:
            pass
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass


class SymbolicPool:
    """The comparison workers of this process: `compare(a, b, t)` -> bool within t + GRACE_S."""

    GRACE_S = 0.25     # the worker's own SIGALRM answers at t; the kill comes this much later
    START_S = 120.0    # python + sympy start-up on a loaded machine

    def __init__(self):
        self.pid = os.getpid()
        self.lock = threading.Lock()
        self.active: _Worker | None = None
        self.spare: _Worker | None = None
        self.stats = Counter()

    def _ready(self, w: _Worker) -> _Worker:
        if not w.ready:
            if w.readline(self.START_S) != b"ready":
                w.kill()
                raise RuntimeError(f"evaluate.py: the math comparison worker ({sys.executable} -c "
                                   f"'import evaluate') did not start within {self.START_S:.0f} s; "
                                   "run `python -c \"import evaluate\"` to see why")
            w.ready = True
        return w

    def start(self) -> None:
        """Start (or restart) the active worker and its spare and wait until the active is ready."""
        if self.active is None:
            self.active, self.spare = self.spare or _Worker(), None
        if self.spare is None:
            self.spare = _Worker()
        self._ready(self.active)

    def compare(self, a: str, b: str, timeout_s: float) -> bool:
        line = self.exchange({"a": a, "b": b, "t": timeout_s}, timeout_s + self.GRACE_S)
        return line == b"1"

    def exchange(self, req: dict, wait_s: float) -> bytes | None:
        """Send one request, wait at most wait_s for its answer line; on silence kill the worker.
        (req["soft"], when given, replaces the worker's own alarm time: the tests use it to reach
        the kill path.)"""
        with self.lock:
            self.start()
            w = self.active
            try:
                w.proc.stdin.write(json.dumps(req).encode() + b"\n")
                w.proc.stdin.flush()
                line = w.readline(wait_s)
            except OSError:   # the worker died (broken pipe)
                line = None
            self.stats["comparisons"] += 1
            if line in (b"0", b"1"):
                return line
            # timed out (or crashed): kill it now, so that no work outlives this call
            self.stats["killed"] += 1
            w.kill()
            self.active = None
            return None

    def pids(self) -> list[int]:
        return [w.proc.pid for w in (self.active, self.spare) if w is not None]

    def shutdown(self) -> None:
        with self.lock:
            for w in (self.active, self.spare):
                if w is not None:
                    w.kill()
            self.active = self.spare = None


_POOL: SymbolicPool | None = None


def symbolic_pool() -> SymbolicPool:
    """This process's comparison pool (a fresh one after a fork: pipes are not shared)."""
    global _POOL
    if _POOL is None or _POOL.pid != os.getpid():
        _POOL = SymbolicPool()
    return _POOL


@atexit.register
def shutdown_symbolic_pool() -> None:
    """Stop this process's comparison workers (also run at interpreter exit)."""
    if _POOL is not None and _POOL.pid == os.getpid():
        _POOL.shutdown()


def symbolic_equal(pred: str, gold: str, timeout_s: float = 3.0, deadline: float | None = None) -> bool:
    """Are the two LaTeX strings symbolically equal? Decided in the worker process within
    min(timeout_s, deadline - now) seconds (+ GRACE_S to kill it); a timeout scores 0 (EVAL.md §1.4
    step 9). timeout_s None or <= 0 runs in this process with no limit (trusted input only)."""
    if timeout_s is None or timeout_s <= 0:
        _warm_sympy()
        return _symbolic_work(pred, gold)
    t = timeout_s if deadline is None else min(timeout_s, deadline - time.monotonic())
    if t <= 0.01:
        return False
    return symbolic_pool().compare(pred, gold, t)


_SYMPY_WARM = False


def _warm_sympy() -> None:
    """Import sympy and the pieces it loads lazily on first use BEFORE any clock starts: on a loaded
    2-core machine the first import alone can take longer than the per-item limit."""
    global _SYMPY_WARM
    if not _SYMPY_WARM:
        sp = _sympy()
        x = sp.Symbol("x")
        sp.simplify((x + 1) ** 2 - (x ** 2 + 2 * x + 1))   # pulls in simplify's lazy imports
        sp.nsimplify(sp.Rational(1, 2) - sp.Float(0.5))
        _SYMPY_WARM = True


_NUMBER_RE = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d{1,3})?")


def parse_number(s: str) -> float | None:
    """float of a plain number ('1,000', '12.5', '50%' -> 0.5), else None. No float('nan'/'inf')."""
    s = s.replace(",", "").strip()
    scale = 1.0
    if s.endswith("\\%"):
        s, scale = s[:-2], 0.01
    elif s.endswith("%"):
        s, scale = s[:-1], 0.01
    if len(s) > 60 or not _NUMBER_RE.fullmatch(s):
        return None
    try:
        v = float(s) * scale
    except (ValueError, OverflowError):
        return None
    return v if math.isfinite(v) else None  # "1e999" -> inf must not equal every other huge number


def _choice_clean(pred: str) -> str:
    """The release's `choice_answer_clean`: last standalone A-E in the upper-cased answer."""
    pred = pred.strip("\n").rstrip(".").rstrip("/").strip(" ").lstrip(":")
    found = re.findall(r"\b(A|B|C|D|E)\b", pred.upper())
    p = found[-1] if found else pred.strip().strip(".")
    return p.rstrip(".").rstrip("/")


def _split_top_level(s: str, sep: str) -> list[str]:
    parts, depth, cur = [], 0, []
    for c in s:
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        if c == sep and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(c)
    parts.append("".join(cur))
    return parts


def _matrix_cells(s: str) -> list[list[str]] | None:
    m = re.fullmatch(r"\\begin\{pmatrix\}(.*)\\end\{pmatrix\}", s, flags=re.S)
    if not m:
        return None
    rows = [r for r in m.group(1).split("\\\\") if r.strip()]
    return [r.split("&") for r in rows]


def math_equal(pred: str, gold: str, timeout_s: float = 3.0, *, release_reward: bool = False,
               _depth: int = 0, _deadline: float | None = None) -> bool:
    """Is the answer `pred` equivalent to `gold`? (EVAL.md §1.4; both sides are normalised with
    `strip_string` first, so raw answers such as '\\dfrac12' and '0.5' may be passed.)

    `timeout_s` bounds the whole call (all symbolic sub-comparisons of tuples, matrices and
    equations share one deadline), enforced by killing the worker process (DEVIATION 2).
    `release_reward=True` is the RL reward's variant (EVAL.md §2): case-sensitive first string
    test and no A-E step."""
    if pred is None or gold is None:
        return False
    pred, gold = str(pred), str(gold)
    if len(pred) > MAX_ANSWER_CHARS or len(gold) > MAX_ANSWER_CHARS or _depth > 8:
        return False
    if _deadline is None and timeout_s is not None and timeout_s > 0:
        _deadline = time.monotonic() + timeout_s
    kw = {"release_reward": release_reward, "_depth": _depth + 1, "_deadline": _deadline}
    pred, gold = strip_string(pred), strip_string(gold)
    # step 1: plain string match (case-sensitive in the RL reward)
    if (pred.strip() == gold.strip()) if release_reward else (pred.strip().lower() == gold.strip().lower()):
        return True
    # step 2: multiple-choice gold (not in the RL reward)
    if not release_reward and gold in ("A", "B", "C", "D", "E") and _choice_clean(pred) == gold:
        return True
    # step 3: numeric branch, with the release's /100, x100 leniency and NO symbolic fallback
    pn, gn = parse_number(pred), parse_number(gold)
    if pn is not None and gn is not None:
        for g in (gn / 100, gn, gn * 100):
            if math.isclose(pn, g, rel_tol=1e-4):
                return True
        return False
    # step 4
    if not pred:
        return False
    if "pmatrix" in pred and "pmatrix" not in gold and re.fullmatch(r"\{.*\}", gold):
        gold = "\\begin{pmatrix}" + gold[1:-1].replace(",", "\\\\") + "\\end{pmatrix}"
    # step 5: bracket-insensitive string match
    p, g = pred, gold
    if (p.startswith("[") and p.endswith("]") and not g.startswith("(")) or \
            (p.startswith("(") and p.endswith(")") and not g.startswith("[")):
        p, g = p[1:-1], g.strip("[]()")
    for ch in "{}()":
        p, g = p.replace(ch, ""), g.replace(ch, "")
    if p.lower() == g.lower():
        return True
    # step 6: tuples / intervals (DEVIATION 4: bracket types must agree) and matrices
    if re.fullmatch(r"[(\[].+[)\]]", pred, flags=re.S) and re.fullmatch(r"[(\[].+[)\]]", gold, flags=re.S):
        pp, gp = _split_top_level(pred[1:-1], ","), _split_top_level(gold[1:-1], ",")
        if len(pp) == len(gp) and len(pp) > 1:
            if pred[0] != gold[0] or pred[-1] != gold[-1]:
                return False
            return all(math_equal(a, b, timeout_s, **kw) for a, b in zip(pp, gp))
    pm, gm = _matrix_cells(pred), _matrix_cells(gold)
    if pm is not None and gm is not None:
        if len(pm) != len(gm) or any(len(a) != len(b) for a, b in zip(pm, gm)):
            return False
        return all(math_equal(a, b, timeout_s, **kw) for ra, rb in zip(pm, gm) for a, b in zip(ra, rb))
    # step 7: equations
    if pred.count("=") == 1 and gold.count("=") == 1:
        pl, pr = pred.split("=")
        gl, gr = gold.split("=")
        d1, d2 = f"{pl}-({pr})", f"{gl}-({gr})"
        return (symbolic_equal(d1, d2, timeout_s, _deadline)
                or symbolic_equal(d1, f"-({d2})", timeout_s, _deadline))
    if pred.count("=") == 1 and gold.count("=") == 0:
        pl, pr = pred.split("=")
        if len(pl.strip()) <= 2:
            return math_equal(pr, gold, timeout_s, **kw)
        return False
    if gold.count("=") == 1 and pred.count("=") == 0:
        gl, gr = gold.split("=")
        if len(gl.strip()) <= 2:
            return math_equal(pred, gr, timeout_s, **kw)
        return False
    # step 8: symbolic equivalence under a time limit (step 9)
    return symbolic_equal(pred, gold, timeout_s, _deadline)


def grade_math(response: str, gold, timeout_s: float = 3.0) -> bool:
    """Score one response against a gold answer (str, number, or list of acceptable answers).
    One deadline of timeout_s covers the whole call, whatever the number of golds."""
    pred = extract_math_answer(response)
    golds = gold if isinstance(gold, (list, tuple)) else [gold]
    deadline = time.monotonic() + timeout_s if timeout_s is not None and timeout_s > 0 else None
    return any(math_equal(pred, str(g), timeout_s, _deadline=deadline) for g in golds)


def extract_reward_answer(text: str) -> str:
    """The RL reward's extraction (EVAL.md §2; PA: .../reward_score/math_rlvr.py): last boxed{...}
    -> text after the last "he answer is" -> last number; first line; one leading ':' and one
    trailing '.' and '/' dropped; then `strip_string` (ours, DEVIATION 16)."""
    text = str(text)
    if "boxed" in text:
        ans = last_boxed_content(text) or ""
    elif "he answer is" in text:
        ans = text.split("he answer is")[-1].strip()
    else:
        nums = _LAST_NUMBER.findall(text.replace(",", ""))
        ans = nums[-1] if nums else ""
    if len(ans) > MAX_ANSWER_CHARS:
        return ""  # DEVIATION 3
    ans = ans.strip().split("\n")[0] if ans.strip() else ""
    ans = ans.removeprefix(":").removesuffix(".").removesuffix("/")
    return strip_string(ans)


def grade_reward(response: str, gold, timeout_s: float = 3.0) -> bool:
    """The release's binary RL reward (PAPER.md §5 "Reward", EVAL.md §2): `extract_reward_answer`
    + `math_equal(release_reward=True)` against reward_model.ground_truth (a number or, for the
    medical data, a letter such as "C"), under the same enforced time limit as `grade_math`."""
    return math_equal(extract_reward_answer(response), str(gold), timeout_s, release_reward=True)


def pass_at_k(n: int, c: int, k: int) -> float:
    """[Chen+21 Codex, Eq. 1] unbiased pass@k = 1 - C(n-c, k) / C(n, k) for one problem."""
    if k > n:
        raise ValueError(f"pass@k needs k <= n samples (k={k}, n={n})")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


# -----------------------------------------------------------------------------
# 2. Medical letter extraction (EVAL.md §3; PA: third_party/med_eval/utils/extract_answer.py)

_OPTION_LETTERS = "ABCDEFGHIJKLMN"
_CJK = "\u4e00-\u9fff"


def match_choice(text: str, options, *, guard_pronoun_i: bool = True) -> tuple[str | None, str | None]:
    """(first, last) option letter in a response, following the release's `match_choice`.

    `options` is either the option letters ("ABCDE") or a dict letter -> option text; with letters
    only, the option-text rules 4-5 cannot run and (None, None) means "no letter found".
    """
    text = str(text)
    if "## Final Response\n\n" in text:
        text = text.split("## Final Response\n\n")[-1]
    # rule 2: strict "answer is X"
    strict = re.findall(r"(answer is\s*?)([A-N])", text, flags=re.S)
    if strict:
        return strict[0][1], strict[-1][1]
    letters = _OPTION_LETTERS[: len(options)]
    # rule 3: standalone letters (prefix and suffix characters are consumed, as in the release)
    pat = re.compile(r"([" + _CJK + r"]|is |是|项|\*|\W| |\(|为|^|'|\"|#)(?![aA] )([" + letters +
                     r"])(\W|[" + _CJK + r"]|$)", flags=re.S)
    found = []
    for m in pat.finditer(text):
        if guard_pronoun_i and len(letters) >= 9 and m.group(2) == "I":
            # DEVIATION 6: "I hope", "I'm", "I think" -> the pronoun, not option I
            after = text[m.end(2): m.end(2) + 2]
            if re.match(r"( [a-z]|'[a-z])", after):
                continue
        found.append(m.group(2))
    if found:
        return found[0], found[-1]
    if not isinstance(options, dict):
        return None, None
    # rule 4: option text, last occurrence wins
    low = text.lower()
    present = [(k, low.rindex(str(v).lower())) for k, v in options.items() if str(v).lower() in low]
    if present:
        last = max(present, key=lambda kv: kv[1])[0]
        firsts = [(k, low.index(str(v).lower())) for k, v in options.items() if str(v).lower() in low]
        first = max(firsts, key=lambda kv: kv[1])[0]  # the release's "first" bug, kept
        return first, last
    # rule 5: most similar option text (ties -> later option)
    import difflib
    best, best_r = None, -1.0
    for k, v in options.items():
        r = difflib.SequenceMatcher(None, str(v).lower(), low[:20000]).ratio()
        if r >= best_r:
            best, best_r = k, r
    return best, best


def extract_choice_letter(text: str, options="ABCDE", *, guard_pronoun_i: bool = True) -> str | None:
    """The LAST extracted option letter (what the release scores), or None when none is found."""
    return match_choice(text, options, guard_pronoun_i=guard_pronoun_i)[1]


def grade_choice(response: str, gold: str, options="ABCDE") -> bool:
    letter = extract_choice_letter(response, options)
    return letter is not None and letter.lower() == str(gold).strip().lower()


# -----------------------------------------------------------------------------
# 3. BBH (EVAL.md §4; OC: opencompass/datasets/bbh.py)

BBH_MCQ_TASKS = (
    "temporal_sequences", "disambiguation_qa", "date_understanding",
    "tracking_shuffled_objects_three_objects", "tracking_shuffled_objects_five_objects",
    "tracking_shuffled_objects_seven_objects", "penguins_in_a_table", "geometric_shapes", "snarks",
    "ruin_names", "logical_deduction_three_objects", "logical_deduction_five_objects",
    "logical_deduction_seven_objects", "hyperbaton", "movie_recommendation",
    "salient_translation_error_detection", "reasoning_about_colored_objects")
BBH_FREE_TASKS = (
    "multistep_arithmetic_two", "navigate", "dyck_languages", "word_sorting", "sports_understanding",
    "boolean_expressions", "object_counting", "formal_fallacies", "causal_judgement", "web_of_lies")
BBH_TASKS = BBH_MCQ_TASKS + BBH_FREE_TASKS


def bbh_extract_mcq(text: str) -> str:
    """Multiple choice: text between the first and second 'answer is ', then the first '(X'
    letter, else the first capital letter, else the text. Applied to prediction AND target."""
    ans = str(text)
    pieces = ans.split("answer is ")
    if len(pieces) > 1:
        ans = pieces[1].strip()
    m = re.search(r"\(([A-Z])\)*", ans)
    if m:
        return m.group(1)
    m = re.search(r"[A-Z]", ans)
    return m.group(0) if m else ans


def bbh_extract_free(text: str) -> str:
    """Free form: after the first 'answer is ', first line, one trailing '.', inside **bold**."""
    ans = str(text)
    pieces = ans.split("answer is ")
    if len(pieces) > 1:
        ans = pieces[1].strip()
    ans = ans.split("\n")[0].strip()
    if ans.endswith("."):
        ans = ans[:-1].strip()
    m = re.search(r"\*\*(.*?)\*\*", ans)
    return m.group(1) if m else ans


def bbh_kind(task: str | None, gold: str | None = None) -> str:
    """'mcq' or 'free' for a task name (DEVIATION 10: unknown names go by the gold's shape)."""
    if task in BBH_MCQ_TASKS:
        return "mcq"
    if task in BBH_FREE_TASKS:
        return "free"
    return "mcq" if gold is not None and re.fullmatch(r"\([A-Z]\)", str(gold).strip()) else "free"


def bbh_extract_answer(text: str, kind: str = "free") -> str:
    if kind not in ("free", "mcq"):
        raise ValueError(f"bbh kind must be 'free' or 'mcq', not {kind!r}")
    return bbh_extract_mcq(text) if kind == "mcq" else bbh_extract_free(text)


def bbh_match(pred: str, gold: str) -> bool:
    """Exact, case-sensitive equality (OpenCompass BBHEvaluator)."""
    return pred == gold


def grade_bbh(response: str, gold: str, task: str | None = None) -> bool:
    kind = bbh_kind(task, gold)
    if kind == "mcq":
        return bbh_match(bbh_extract_mcq(response), bbh_extract_mcq(gold))
    return bbh_match(bbh_extract_free(response), str(gold))


# -----------------------------------------------------------------------------
# 4. NQ-open (EVAL.md §6; OC: opencompass/datasets/natural_question.py + general_postprocess)

def nq_normalize(s) -> str:
    """OpenCompass `general_postprocess` + lower-casing: cut at the first newline/'.'/',', drop
    punctuation, drop the words a/an/the, collapse whitespace."""
    s = re.split(r"[\n.,]", str(s), maxsplit=1)[0]
    s = re.sub(r"[^\w\s]", "", s)
    s = re.sub(r"\b(a|an|the)\b", "", s, flags=re.IGNORECASE)
    return re.sub(r"\s+", " ", s).strip().lower()


def _nq_prediction(pred) -> str:
    """OpenCompass NQEvaluator: strip, first line, lower-case, after the last 'answer is'."""
    p = str(pred).strip().split("\n")[0].lower()
    if "answer is" in p:
        p = p.split("answer is")[-1]
    return p


def nq_contains(pred, golds) -> bool:
    """PEFT-Arena's NQ rule: some normalised gold is a substring of the normalised prediction
    (an empty normalised gold matches everything, as in OpenCompass)."""
    golds = [golds] if isinstance(golds, str) else list(golds)
    p = nq_normalize(_nq_prediction(pred))
    return any(nq_normalize(g) in p for g in golds)


def _squad_normalize(s: str) -> str:
    s = str(s).lower()
    s = "".join(ch for ch in s if ch not in set(r"""!"#$%&'()*+,-./:;<=>?@[\]^_`{|}~"""))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def nq_exact_match(pred, golds) -> bool:
    """True exact match (DEVIATION 9): first line, after the last 'answer is', cut at '.'/',',
    SQuAD normalisation, equal to some normalised gold."""
    golds = [golds] if isinstance(golds, str) else list(golds)
    p = re.split(r"[.,]", _nq_prediction(pred), maxsplit=1)[0]
    p = _squad_normalize(p)
    return any(p == _squad_normalize(g) for g in golds)


# -----------------------------------------------------------------------------
# 5. IFEval (EVAL.md §5; google-research instruction_following_eval, identical in OC and lm-eval)

def _compare(count: int, relation: str, n: int, where: str) -> bool:
    """IFEval's two relations: 'less than' -> count < n, 'at least' -> count >= n."""
    if relation == "less than":
        return count < n
    if relation == "at least":
        return count >= n
    raise ValueError(f"{where}: relation must be 'less than' or 'at least', not {relation!r}")


# --- optional nltk / langdetect, with self-contained fallbacks (DEVIATION 7) ---------------------

def _load_nltk():
    try:
        import nltk  # noqa: F401
        from nltk.tokenize import PunktTokenizer, word_tokenize
        PunktTokenizer("english")  # raises LookupError when punkt_tab data is missing
        return nltk
    except Exception:  # noqa: BLE001 - any failure means "use the built-in fallback"
        return None


def _load_langdetect():
    try:
        import langdetect
        langdetect.DetectorFactory.seed = 0  # EVAL.md §7: deterministic detection
        return langdetect
    except Exception:  # noqa: BLE001
        return None


# nltk and langdetect are dependencies (requirements.txt). The built-in fallbacks remain for the
# toy world (which never counts sentences) and for machines without punkt_tab; a real-benchmark
# run calls `ensure_ifeval_data` first (one download attempt) and records which fallbacks ran.
_IN_WORKER = os.environ.get("EVALUATE_MATH_WORKER") == "1"   # the math worker needs neither
_NLTK = None if _IN_WORKER else _load_nltk()
_LANGDETECT = None if _IN_WORKER else _load_langdetect()
IFEVAL_BACKENDS: dict = {}
_FALLBACKS_USED: set = set()


def _set_backends() -> None:
    IFEVAL_BACKENDS.update({"sentences_and_words": "nltk" if _NLTK else "builtin-regex",
                            "language": "langdetect(seed=0)" if _LANGDETECT else "builtin-heuristic"})


_set_backends()


def _note_fallback(kind: str) -> None:
    if not getattr(_BUILTIN_ONLY, "on", False):    # a toy item's built-in use is by design
        _FALLBACKS_USED.add(kind)


def ifeval_fallbacks_used(reset: bool = False) -> list[str]:
    """Which built-in fallbacks ('sentences_and_words', 'language') ran since the last reset."""
    out = sorted(_FALLBACKS_USED)
    if reset:
        _FALLBACKS_USED.clear()
    return out


def _download_punkt_tab(nltk) -> bool:
    import socket
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(20)   # no network must not mean a long hang
    try:
        return bool(nltk.download("punkt_tab", quiet=True, raise_on_error=False))
    except Exception:  # noqa: BLE001 - any failure: report below
        return False
    finally:
        socket.setdefaulttimeout(old)


def ensure_ifeval_data(download: bool = True) -> list[str]:
    """Before scoring real IFEval: fetch nltk's punkt_tab on first use when it is missing, and
    print one clear line per checker family that will run a built-in fallback. Returns the
    messages (empty when the reference libraries and data are all there)."""
    global _NLTK, _LANGDETECT
    msgs = []
    if _NLTK is None:
        try:
            import nltk
        except ImportError:
            nltk = None
            msgs.append("nltk is not installed (pip install -r requirements.txt)")
        offline = any(os.environ.get(k) == "1" for k in ("EVALUATE_OFFLINE", "HF_HUB_OFFLINE"))
        if nltk is not None and download and not offline and _download_punkt_tab(nltk):
            _NLTK = _load_nltk()
        if nltk is not None and _NLTK is None:
            msgs.append("nltk's punkt_tab data is missing and could not be downloaded (no network, "
                        "or EVALUATE_OFFLINE/HF_HUB_OFFLINE=1); install it "
                        "with `python -m nltk.downloader punkt_tab` (or set NLTK_DATA to a folder "
                        "holding tokenizers/punkt_tab)")
    if _LANGDETECT is None:
        _LANGDETECT = _load_langdetect()
        if _LANGDETECT is None:
            msgs.append("langdetect is not installed (pip install -r requirements.txt)")
    _set_backends()
    for m in msgs:
        print(f"[evaluate] WARNING: {m}; IFEval uses a built-in fallback there "
              f"(backends: {IFEVAL_BACKENDS}), which differs from the reference on some responses "
              "(DEVIATION 7); the result file records it as ifeval_fallback_used.", file=sys.stderr)
    return msgs

_ABBREVIATIONS = {"mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "vs", "etc", "e.g", "i.e", "inc",
                  "ltd", "co", "corp", "no", "fig", "al", "approx", "dept", "est", "u.s", "u.k",
                  "jan", "feb", "mar", "apr", "jun", "jul", "aug", "sep", "sept", "oct", "nov", "dec",
                  "mt", "ft", "gen", "gov", "sen", "rep", "rev", "capt", "col", "lt", "sgt"}


_SENTENCE_END = re.compile(r"(?<![.!?])[.!?]++[\"')\]]*+(?=\s|$)")


# Toy-world IFEval items (toy_world.py marks them `"checkers": "builtin"`) always use the built-in
# checkers: the toy world was built and its teacher responses checked against them, and a short
# all-capitals word list is not English text langdetect can judge. Real items use nltk/langdetect.
_BUILTIN_ONLY = threading.local()


def _use_nltk() -> bool:
    return _NLTK is not None and not getattr(_BUILTIN_ONLY, "on", False)


def _use_langdetect() -> bool:
    return _LANGDETECT is not None and not getattr(_BUILTIN_ONLY, "on", False)


def count_sentences(text: str) -> int:
    """English sentence count: nltk Punkt when installed, else a regex splitter at . ! ? followed
    by whitespace, skipping known abbreviations and single-letter initials.

    The fallback runs in linear time: a run of end marks is matched once from its first mark
    (lookbehind, possessive), and the word before a mark is read from a short window instead of
    re-splitting all the text since the last sentence end (quadratic on "Mr. Mr. Mr. ...")."""
    if _use_nltk():
        from nltk.tokenize import PunktTokenizer
        return len(PunktTokenizer("english").tokenize(text))
    _note_fallback("sentences_and_words")
    count, start = 0, 0
    first = _NON_SPACE.search(text, start)        # first non-space since the last sentence end
    for m in _SENTENCE_END.finditer(text):
        w0 = max(start, m.start() - 40)
        seg = text[w0:m.start()]
        words = seg.split()
        last = words[-1].lower().rstrip(".") if words else ""
        if len(words) == 1 and w0 > start and not seg[0].isspace() and not text[w0 - 1].isspace():
            last = ""                             # a word longer than the window: no abbreviation
        if m.group(0).startswith(".") and (last in _ABBREVIATIONS or re.fullmatch(r"[a-z]", last)):
            continue
        if first is not None and first.start() < m.start():
            count += 1
        start = m.end()
        first = _NON_SPACE.search(text, start)
    if first is not None:
        count += 1
    return count


_TB_TOKEN = re.compile(r"""(?ix)
    \w+(?=n't\b) | n't\b | \w+(?='(?:s|re|ve|ll|d|m)\b) | '(?:s|re|ve|ll|d|m)\b  # DO N'T, IT 'S
    | \w+(?:[-.']\w+)*                                  # words, hyphenated words, U.S
    | \.\.\. | [^\w\s]                                  # ellipsis, single punctuation marks
""")


def word_tokenize(text: str) -> list[str]:
    """nltk.word_tokenize when available, else a Treebank-like regex tokenizer."""
    if _use_nltk():
        from nltk.tokenize import word_tokenize as nltk_wt
        return nltk_wt(text)
    _note_fallback("sentences_and_words")
    return _TB_TOKEN.findall(text)


_SCRIPT_LANG = [  # single-script languages, decided by their Unicode block
    ("bn", "\u0980-\u09ff"), ("pa", "\u0a00-\u0a7f"), ("gu", "\u0a80-\u0aff"), ("ta", "\u0b80-\u0bff"),
    ("te", "\u0c00-\u0c7f"), ("kn", "\u0c80-\u0cff"), ("ml", "\u0d00-\u0d7f"), ("th", "\u0e00-\u0e7f"),
    ("ko", "\uac00-\ud7af\u1100-\u11ff"), ("ja", "\u3040-\u30ff"), ("he", "\u0590-\u05ff")]
_STOPWORDS = {
    "en": "the and of to is in that it you for was with on are as be this have not but they at by or",
    "es": "el la de que y en los se del las por un una con no es para al lo como más pero sus le",
    "pt": "o a de que e do da em um para é com não uma os no se na por mais as dos como mas ao",
    "fr": "le la les de des et est un une du en que qui dans pour pas sur au avec ce il elle ne",
    "de": "der die das und ist nicht ein eine zu den von mit sich des auf für im dem es auch ich",
    "it": "il di che e la per un una non sono è della le del in si gli con come anche ma nel",
    "pl": "i w nie na się z że to jest do jak co ale po tak od jego przez są dla czy być",
    "vi": "và của là có trong được cho không những với các một người này đã để khi",
    "sw": "na ya wa kwa ni za katika la kuwa hii au lakini pia hiyo kama watu sana",
    "fi": "ja on ei se että hän oli ovat kun mutta tai myös ole mitä tämä niin kuin",
    "hi": "है के में की और को से का एक हैं यह पर कि भी नहीं था",
    "mr": "आहे आणि या व ते हे की त्या आहेत होते मध्ये म्हणून",
    "ne": "छ र को मा ले पनि गर्न यो हो भएको थियो छन्",
}
_STOPWORDS = {k: set(v.split()) for k, v in _STOPWORDS.items()}


def detect_language(text: str) -> str | None:
    """ISO-639-1 code of `text`, or None when undecidable (IFEval then passes the check).

    langdetect (seeded) when installed, else the built-in heuristic of DEVIATION 7.
    """
    if _use_langdetect():
        try:
            return _LANGDETECT.detect(text)
        except Exception:  # noqa: BLE001 - LangDetectException -> undecidable
            return None
    _note_fallback("language")
    letters = [c for c in text if c.isalpha()]
    if not letters:
        return None
    counts = Counter()
    for code, rng in _SCRIPT_LANG:
        counts[code] = len(re.findall(f"[{rng}]", text))
    counts["cyrillic"] = len(re.findall("[\u0400-\u04ff]", text))
    counts["arabic"] = len(re.findall("[\u0600-\u06ff]", text))
    counts["devanagari"] = len(re.findall("[\u0900-\u097f]", text))
    counts["han"] = len(re.findall("[\u4e00-\u9fff]", text))
    counts["latin"] = len(re.findall("[A-Za-z\u00c0-\u024f\u1e00-\u1eff]", text))
    script, n = counts.most_common(1)[0]
    if n == 0:
        return None
    if script == "han":  # kanji without kana: IFEval has no Chinese, so Japanese
        return "ja"
    if script == "cyrillic":
        if re.search("[іїєґ]", text.lower()):
            return "uk"
        if re.search("[ыэё]", text.lower()):
            return "ru"
        return "bg" if text.lower().count("ъ") > 0 else "ru"
    if script == "arabic":
        if re.search("[ٹڈڑںےھ]", text):
            return "ur"
        if re.search("[پچژگکی]", text):
            return "fa"
        return "ar"
    words = re.findall(r"\w+", text.lower())
    if script == "devanagari":
        cands = ["hi", "mr", "ne"]
    elif script == "latin":
        if re.search("[ăâđêôơư]", text.lower()) and re.search("[ạảấầẩẫậắằẳẵặẹẻẽếềểễệỉịọỏốồổỗộớờởỡợụủứừửữựỳỵỷỹ]",
                                                              text.lower()):
            return "vi"
        cands = ["en", "es", "pt", "fr", "de", "it", "pl", "sw", "fi"]
    else:
        return script
    scores = {c: sum(w in _STOPWORDS[c] for w in words) for c in cands}
    best = max(cands, key=lambda c: (scores[c], c == cands[0]))
    return best if scores[best] > 0 else cands[0]  # no evidence: English / Hindi by default


# --- the 25 checkers: (response, **kwargs) -> bool ------------------------------------------------

def _chk_existence(r, keywords):
    return all(re.search(re.escape(k), r, flags=re.IGNORECASE) for k in keywords)  # DEVIATION 8


def _chk_frequency(r, keyword, frequency, relation):
    # the reference strips the keyword (KeywordFrequencyChecker.build_description)
    n = len(re.findall(re.escape(keyword.strip()), r, flags=re.IGNORECASE))
    return _compare(n, relation, frequency, "keywords:frequency")


def _chk_forbidden(r, forbidden_words):
    return not any(re.search(r"\b" + re.escape(w) + r"\b", r, flags=re.IGNORECASE)
                   for w in forbidden_words)


def _chk_letter_frequency(r, letter, let_frequency, let_relation):
    n = Counter(r.lower())[letter.lower()]
    return n < let_frequency if let_relation == "less than" else n >= let_frequency


def _chk_language(r, language):
    lang = detect_language(r)
    return True if lang is None else lang == language


def _chk_num_sentences(r, num_sentences, relation):
    return _compare(count_sentences(r), relation, num_sentences, "number_sentences")


def _chk_num_paragraphs(r, num_paragraphs):
    paragraphs = re.split(r"\s?\*\*\*\s?", r)
    n = len(paragraphs)
    for i, p in enumerate(paragraphs):
        if not p.strip():
            if i == 0 or i == len(paragraphs) - 1:
                n -= 1
            else:
                return False  # an empty paragraph between two separators
    return n == num_paragraphs


def _chk_num_words(r, num_words, relation):
    return _compare(len(re.findall(r"\w+", r)), relation, num_words, "number_words")


def _chk_nth_paragraph_first_word(r, num_paragraphs, nth_paragraph, first_word):
    paragraphs = re.split(r"\n\n", r)
    n_nonblank = sum(1 for p in paragraphs if p.strip())
    if nth_paragraph > n_nonblank:
        return False
    para = paragraphs[nth_paragraph - 1].strip()
    if not para:
        return False
    word = para.split()[0].strip().lstrip("'").lstrip('"')
    got = ""
    for ch in word:
        if ch in {".", ",", "?", "!", "'", '"'}:
            break
        got += ch.lower()
    return n_nonblank == num_paragraphs and got == first_word.lower()


def count_placeholders(r: str) -> int:  # DEVIATION 15 (same result, linear time)
    """len(re.findall(r"\\[.*?\\]", r)) in linear time (the regex is quadratic on a long line of
    '[' without ']'). Per line: each '[' pairs with the next ']'; once a '[' finds no ']', no
    later '[' of that line can."""
    n = 0
    for line in r.split("\n"):
        i = line.find("[")
        while i >= 0:
            j = line.find("]", i + 1)
            if j < 0:
                break
            n += 1
            i = line.find("[", j + 1)
    return n


def find_titles(r: str) -> list[str]:  # DEVIATION 15 (same result, linear time)
    """re.findall(r"<<[^\\n]+>>", r) in linear time. Per line at most one match: it starts at the
    first '<<' and, [^\\n]+ being greedy, ends at the line's last '>>' (at least one character
    inside); nothing after that last '>>' can match again."""
    out = []
    for line in r.split("\n"):
        i = line.find("<<")
        if i < 0:
            continue
        j = line.rfind(">>")
        if j >= i + 3:
            out.append(line[i:j + 2])
    return out


def _chk_placeholders(r, num_placeholders):
    return count_placeholders(r) >= num_placeholders


def _chk_postscript(r, postscript_marker):
    """PostscriptChecker: the marker is stripped; "P.P.S" and "P.S." have fixed patterns, any other
    marker is used, lower-cased, AS A REGULAR EXPRESSION as the reference does ("PS:" must match
    literally, "P.P.P.S" lets '.' match any character). A marker that is not a valid regex falls
    back to a literal match (the reference would crash)."""
    low = r.lower()
    marker = postscript_marker.strip()
    # the reference patterns start with \s*, which can match empty: dropping it keeps "is there a
    # match" unchanged and avoids quadratic time on long runs of whitespace
    if marker == "P.P.S":
        pat = r"p\.\s?p\.\s?s.*$"
    elif marker == "P.S.":
        pat = r"p\.\s?s\..*$"
    else:
        pat = marker.lower() + r".*$"
    try:
        return re.search(pat, low, flags=re.MULTILINE) is not None
    except re.error:
        return re.search(re.escape(marker.lower()) + r".*$", low, flags=re.MULTILINE) is not None


_NON_SPACE = re.compile(r"\S")


def count_line_marks(r: str, mark: str) -> int:  # DEVIATION 15 (same result, linear time)
    """len(re.findall(r"^\\s*\\*[^\\*].*$", r, re.M)) for mark '*' and
    len(re.findall(r"^\\s*-.*$", r, re.M)) for mark '-', in linear time.

    The reference regexes are quadratic on many blank lines: from every line start `\\s*` runs
    over all the following whitespace, newlines included. A match from a blank line start ends
    where the match from the next non-blank line would, so counting from each line's own first
    non-space character ([^\\S\\n]*, never crossing a newline) gives the same count. For '*' the
    character after the mark may be the newline; `.*` then swallows the next line, which can then
    not start a match (the `\\n.*` branch keeps that)."""
    return len((_STAR_LINE if mark == "*" else _DASH_LINE).findall(r))


_STAR_LINE = re.compile(r"^[^\S\n]*\*(?:[^*\n]|\n.*)", flags=re.MULTILINE)
_DASH_LINE = re.compile(r"^[^\S\n]*-", flags=re.MULTILINE)


def _chk_bullets(r, num_bullets):
    return count_line_marks(r, "*") + count_line_marks(r, "-") == num_bullets


def _chk_constrained(r):
    r = r.strip()
    return any(c in r for c in ("My answer is yes.", "My answer is no.", "My answer is maybe."))


def _chk_highlights(r, num_highlights):
    n = sum(1 for h in re.findall(r"\*[^\n\*]*\*", r) if h.strip("*").strip())
    n += sum(1 for h in re.findall(r"\*\*[^\n\*]*\*\*", r) if h[2:-2].strip())
    return n >= num_highlights


def _chk_sections(r, section_spliter, num_sections):
    # SectionChecker: the spliter is stripped and used as a regular expression (all IFEval
    # spliters are plain words); an invalid one is matched literally
    spliter = section_spliter.strip()
    try:
        re.compile(spliter)
    except re.error:
        spliter = re.escape(spliter)
    pieces = re.split(r"\s?" + spliter + r"\s?\d+\s?", r)
    return len(pieces) - 1 >= num_sections


def _chk_json(r):
    v = r.strip()
    for fence in ("```json", "```Json", "```JSON", "```"):
        v = v.removeprefix(fence)
    v = v.removesuffix("```").strip()
    try:
        json.loads(v)
    except (ValueError, RecursionError):
        return False
    return True


def _chk_title(r):
    return any(t.lstrip("<").rstrip(">").strip() for t in find_titles(r))


def _chk_two_responses(r):
    valid = []
    pieces = r.split("******")
    for i, p in enumerate(pieces):
        if not p.strip():
            if i not in (0, len(pieces) - 1):
                return False
        else:
            valid.append(p)
    return len(valid) == 2 and valid[0].strip() != valid[1].strip()


def _chk_repeat_prompt(r, prompt_to_repeat):
    return r.strip().lower().startswith(prompt_to_repeat.strip().lower())


def _chk_end(r, end_phrase):
    return r.strip().strip('"').lower().endswith(end_phrase.strip().lower())


def _chk_quotation(r):
    v = r.strip()
    return len(v) > 1 and v[0] == '"' and v[-1] == '"'


def _chk_capital_words(r, capital_frequency, capital_relation):
    n = sum(1 for w in word_tokenize(r) if w.isupper())
    return _compare(n, capital_relation, capital_frequency, "capital_word_frequency")


def _chk_english_capital(r):
    lang = detect_language(r)
    return r.isupper() and (lang is None or lang == "en")


def _chk_english_lowercase(r):
    lang = detect_language(r)
    return r.islower() and (lang is None or lang == "en")


def _chk_no_comma(r):
    return "," not in r


IFEVAL_CHECKERS = {
    "keywords:existence": _chk_existence,
    "keywords:frequency": _chk_frequency,
    "keywords:forbidden_words": _chk_forbidden,
    "keywords:letter_frequency": _chk_letter_frequency,
    "language:response_language": _chk_language,
    "length_constraints:number_sentences": _chk_num_sentences,
    "length_constraints:number_paragraphs": _chk_num_paragraphs,
    "length_constraints:number_words": _chk_num_words,
    "length_constraints:nth_paragraph_first_word": _chk_nth_paragraph_first_word,
    "detectable_content:number_placeholders": _chk_placeholders,
    "detectable_content:postscript": _chk_postscript,
    "detectable_format:number_bullet_lists": _chk_bullets,
    "detectable_format:constrained_response": _chk_constrained,
    "detectable_format:number_highlighted_sections": _chk_highlights,
    "detectable_format:multiple_sections": _chk_sections,
    "detectable_format:json_format": _chk_json,
    "detectable_format:title": _chk_title,
    "combination:two_responses": _chk_two_responses,
    "combination:repeat_prompt": _chk_repeat_prompt,
    "startend:end_checker": _chk_end,
    "startend:quotation": _chk_quotation,
    "change_case:capital_word_frequency": _chk_capital_words,
    "change_case:english_capital": _chk_english_capital,
    "change_case:english_lowercase": _chk_english_lowercase,
    "punctuation:no_comma": _chk_no_comma,
}


def _loose_variants(response: str) -> list[str]:
    """The 8 loose-mode variants: +- first line, +- last line, each also without '*'."""
    lines = response.split("\n")
    no_first = "\n".join(lines[1:]).strip()
    no_last = "\n".join(lines[:-1]).strip()
    no_both = "\n".join(lines[1:-1]).strip()
    base = [response, no_first, no_last, no_both]
    return base + [v.replace("*", "") for v in base]


def ifeval_check(instruction_id: str, kwargs: dict | None, prompt: str, response: str,
                 loose: bool = False) -> bool:
    """Does `response` follow one IFEval instruction (strict, or loose when `loose`)?

    kwargs is the hub row's dict for this slot: None values are dropped (google/IFEval carries
    every key with nulls). `prompt` fills combination:repeat_prompt when its kwarg is absent.
    """
    if instruction_id not in IFEVAL_CHECKERS:
        raise KeyError(f"unknown IFEval instruction id {instruction_id!r}; known: "
                       f"{sorted(IFEVAL_CHECKERS)}")
    kw = {k: v for k, v in (kwargs or {}).items() if v is not None}
    if instruction_id == "combination:repeat_prompt" and "prompt_to_repeat" not in kw:
        kw["prompt_to_repeat"] = prompt
    fn = IFEVAL_CHECKERS[instruction_id]
    response = str(response)
    try:
        if not loose:
            return bool(response.strip()) and bool(fn(response, **kw))
        return any(v.strip() and fn(v, **kw) for v in _loose_variants(response))
    except TypeError as err:
        raise TypeError(f"IFEval {instruction_id}: bad kwargs {sorted(kw)} ({err})") from err


def ifeval_slots(item: dict, response: str) -> list[dict]:
    """One dict per (instruction id, kwargs) slot: {'id', 'strict', 'loose'}."""
    ids, kws = item["instruction_id_list"], item.get("kwargs") or [{}] * len(item["instruction_id_list"])
    if len(ids) != len(kws):
        raise ValueError(f"IFEval item {item.get('id', item.get('key'))}: {len(ids)} instruction ids "
                         f"but {len(kws)} kwargs dicts")
    if len(str(response)) > MAX_IFEVAL_CHARS:                  # DEVIATION 18
        return [{"id": i, "strict": False, "loose": False} for i in ids]
    _BUILTIN_ONLY.on = item.get("checkers") == "builtin"      # toy items: see _BUILTIN_ONLY
    try:
        return [{"id": i, "strict": ifeval_check(i, k, item.get("prompt", ""), response),
                 "loose": ifeval_check(i, k, item.get("prompt", ""), response, loose=True)}
                for i, k in zip(ids, kws)]
    finally:
        _BUILTIN_ONLY.on = False


def ifeval_accuracies(slot_lists: list[list[dict]]) -> dict:
    """The four IFEval accuracies in percent: prompt-level (all slots pass) and instruction-level
    (micro average over slots), strict and loose. PEFT-Arena reports inst_level_strict."""
    n_prompts = len(slot_lists)
    n_slots = sum(len(s) for s in slot_lists)
    out = {"n_prompts": n_prompts, "n_instructions": n_slots}
    for mode in ("strict", "loose"):
        out[f"prompt_level_{mode}"] = 100.0 * sum(all(x[mode] for x in s) for s in slot_lists) / max(1, n_prompts)
        out[f"inst_level_{mode}"] = 100.0 * sum(x[mode] for s in slot_lists for x in s) / max(1, n_slots)
    return out


# -----------------------------------------------------------------------------
# 6. One entry point for every scored item (toy world and real benchmarks)

SCORERS = ("math", "choice", "bbh", "nq", "ifeval")


def score_item(item: dict, response: str) -> float:
    """Score one response to one item in [0, 1], dispatching on item["scorer"]:
    math -> grade_math; choice -> last option letter; bbh -> extraction + exact match;
    nq -> containment (the paper's rule); ifeval -> fraction of instructions followed (strict)."""
    scorer = item.get("scorer")
    gold = item.get("gold")
    if scorer == "math":
        return float(grade_math(response, gold))
    if scorer == "choice":
        return float(grade_choice(response, gold, item.get("options", "ABCDE")))
    if scorer == "bbh":
        return float(grade_bbh(response, gold, item.get("subtask")))
    if scorer == "nq":
        return float(nq_contains(response, gold))
    if scorer == "ifeval":
        slots = ifeval_slots(item, response)
        return sum(s["strict"] for s in slots) / max(1, len(slots))
    raise ValueError(f"item {item.get('id')!r}: unknown scorer {scorer!r}; expected one of {SCORERS}")


# -----------------------------------------------------------------------------
# 7. Generation: transformers `generate` (CPU/GPU) or vLLM (GPU), behind a resumable JSONL cache
#
# Shapes: B prompts in a batch (samples of one prompt are adjacent rows), T prompt tokens after
# left padding, N new tokens.

def _settings_key(settings: dict) -> str:
    return hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def prompt_id(prompt: str) -> str:
    """Default cache id of a prompt: a hash of its exact text."""
    return hashlib.sha1(prompt.encode("utf-8")).hexdigest()[:16]


def read_generation_cache(cache_path, settings_key: str | None = None) -> dict:
    """{(prompt_id, sample_index): row} from a JSONL cache. Rows written under other generation
    settings are ignored, and so is a torn last line from an interrupted run."""
    out = {}
    p = Path(cache_path)
    if not p.exists():
        return out
    with open(p, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except ValueError:
                print(f"[evaluate] {p}:{lineno}: unreadable cache line ignored (interrupted write?)",
                      file=sys.stderr)
                continue
            if settings_key is None or row.get("settings") == settings_key:
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
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())  # a kill after this line loses nothing already generated


def truncate_at_stop(text: str, stop) -> tuple[str, bool]:
    """Cut `text` at the earliest stop string (the stop string itself is removed, as in vLLM)."""
    cut = min((i for i in (text.find(s) for s in (stop or [])) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def _eos_ids(model, tokenizer) -> list[int]:
    ids = set()
    for src in (getattr(model, "generation_config", None), tokenizer):
        e = getattr(src, "eos_token_id", None)
        if e is None:
            continue
        ids.update(e if isinstance(e, (list, tuple)) else [e])
    return sorted(int(i) for i in ids)


def make_generation_config(model, tokenizer, *, max_new_tokens: int, temperature: float, top_p: float):
    """An explicit GenerationConfig. Every sampling knob is set, because generate() fills unset
    (None) fields from the checkpoint's generation_config.json (Qwen ships top_k=20 and
    repetition_penalty=1.05, which would silently change the decoding the paper used)."""
    from transformers import GenerationConfig
    sample = temperature > 0
    eos = _eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
    kw = dict(max_new_tokens=int(max_new_tokens), do_sample=sample, num_beams=1,
              repetition_penalty=1.0, no_repeat_ngram_size=0, eos_token_id=eos or None,
              pad_token_id=pad, use_cache=True)
    if sample:  # top_k=0 and min_p=0 switch those filters off (vLLM / the paper use neither)
        kw.update(temperature=float(temperature), top_p=float(top_p), top_k=0, min_p=0.0)
    return GenerationConfig(**kw)


def _stop_criteria(tokenizer, stop, prompt_len: int):
    """A StoppingCriteria ending a row once its new text contains a stop string. Only the last
    few tokens are decoded each step (a stop string of L characters spans <= L tokens)."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    tail = max(len(s) for s in stop) + 2

    class _StopOnStrings(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            new = input_ids[:, prompt_len:][:, -tail:]  # (B, <=tail)
            texts = tokenizer.batch_decode(new, skip_special_tokens=True)
            return torch.tensor([any(s in t for s in stop) for t in texts], dtype=torch.bool,
                                device=input_ids.device)  # (B,)

    return StoppingCriteriaList([_StopOnStrings()])


def greedy_decode(model, input_ids, attention_mask, *, max_new_tokens: int, eos_ids, pad_id: int,
                  stop_check=None):
    """Greedy decoding with a KV cache in a plain loop: the fast path of `generate` for T = 0.

    Same semantics as transformers `generate(do_sample=False)`, which stays the reference (a test
    checks they agree token for token): positions count only real tokens (left padding), a row
    that emitted EOS (or hit a stop string) gets `pad_id` from then on, and the loop ends when
    every row is done. It skips generate()'s per-step machinery (logits processors, stopping-
    criteria lists, cache bookkeeping), about 1.7x faster for the tiny toy model on CPU.
    """
    import torch
    B = input_ids.shape[0]
    dev = input_ids.device
    eos = torch.tensor(sorted(set(eos_ids or [])), dtype=torch.long, device=dev)
    pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T): position of each real token
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=pos, use_cache=True,
                logits_to_keep=1)
    cache = out.past_key_values
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
                    past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        nxt = out.logits[:, -1].argmax(-1)  # (B,)
    return torch.stack(new, 1)  # (B, N)


def _hf_generate_chunk(model, tokenizer, chunk, gen_cfg, stop, seed, greedy_impl: str = "fast"):
    """Generate one batch. chunk: list of (prompt_id, prompt_text, sample_index)."""
    import torch
    texts = [p for _, p, _ in chunk]
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation appends on the right, so pad on the left
    try:
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = old_side
    device = next(model.parameters()).device
    input_ids = enc["input_ids"].to(device)  # (B, T)
    attn = enc["attention_mask"].to(device)  # (B, T)
    T = input_ids.shape[1]
    if gen_cfg.do_sample:
        # DEVIATION 13: one seed per batch, derived from the seed and the batch's contents
        h = hashlib.sha1(f"{seed}|{[(c[0], c[2]) for c in chunk]}".encode()).hexdigest()
        torch.manual_seed(int(h[:8], 16))
    with torch.no_grad():
        if not gen_cfg.do_sample and greedy_impl == "fast":
            stop_check = None
            if stop:
                crit = _stop_criteria(tokenizer, stop, 0)[0]
                stop_check = lambda new_ids: crit(new_ids, None)  # noqa: E731
            new = greedy_decode(model, input_ids, attn, max_new_tokens=gen_cfg.max_new_tokens,
                                eos_ids=gen_cfg.eos_token_id, pad_id=gen_cfg.pad_token_id,
                                stop_check=stop_check).cpu()  # (B, N)
        else:  # the reference path, and every sampled run
            kwargs = {"stopping_criteria": _stop_criteria(tokenizer, stop, T)} if stop else {}
            out = model.generate(input_ids=input_ids, attention_mask=attn, generation_config=gen_cfg,
                                 **kwargs)  # (B, T + N)
            new = out[:, T:].cpu()  # (B, N)
    eos = set(gen_cfg.eos_token_id or [])
    pad = gen_cfg.pad_token_id
    rows = []
    for (pid, _, j), seq in zip(chunk, new.tolist()):
        n_tok, finish = len(seq), "length"
        for k, t in enumerate(seq):
            if t in eos:
                n_tok, finish = k + 1, "eos"
                break
            if t == pad:  # rows finished by a stop string are padded afterwards
                n_tok = k
                break
        text = tokenizer.decode(seq[:n_tok], skip_special_tokens=True)
        text, hit = truncate_at_stop(text, stop)
        rows.append({"prompt_id": pid, "sample_index": j, "text": text, "num_tokens": n_tok,
                     "finish": "stop" if hit else finish})
    return rows


def generate_records(model, tokenizer, prompts: list[str], *, max_new_tokens: int,
                     temperature: float = 0.0, top_p: float = 1.0, n: int = 1, batch_size: int = 64,
                     stop=None, seed: int = 0, cache_path=None, prompt_ids=None, backend: str = "hf",
                     vllm_llm=None, progress: bool = False,
                     greedy_impl: str = "fast") -> list[list[dict]]:
    """Like `generate` but returns the cache rows: per prompt, n dicts with prompt_id,
    sample_index, text, num_tokens, finish ('eos' | 'stop' | 'length'), settings."""
    if n < 1 or max_new_tokens < 1 or batch_size < 1:
        raise ValueError(f"generate: need n >= 1, max_new_tokens >= 1, batch_size >= 1 "
                         f"(got n={n}, max_new_tokens={max_new_tokens}, batch_size={batch_size})")
    if not (0.0 < top_p <= 1.0) or temperature < 0:
        raise ValueError(f"generate: need 0 < top_p <= 1 and temperature >= 0 (got {top_p}, {temperature})")
    stop = sorted(set(stop or []))
    settings = {"max_new_tokens": int(max_new_tokens), "temperature": float(temperature),
                "top_p": float(top_p), "stop": stop, "seed": int(seed)}
    key = _settings_key(settings)
    pids = list(prompt_ids) if prompt_ids is not None else [prompt_id(p) for p in prompts]
    if len(pids) != len(prompts):
        raise ValueError(f"generate: {len(prompts)} prompts but {len(pids)} prompt ids")
    done = read_generation_cache(cache_path, key) if cache_path else {}
    greedy = temperature == 0
    # greedy samples are identical: generate sample 0 once, copy it to the other indices
    n_gen = 1 if greedy else n
    todo, seen = [], set()
    for pid, p in zip(pids, prompts):
        for j in range(n_gen):
            if (pid, j) not in done and (pid, j) not in seen:
                seen.add((pid, j))
                todo.append((pid, p, j))
    if todo:
        if backend == "vllm":
            chunks = [todo[i:i + 4096] for i in range(0, len(todo), 4096)]
        else:
            # longest prompts first: similar lengths share a batch (less padding), and an OOM
            # shows up in the first batch rather than at the end
            todo.sort(key=lambda w: -len(w[1]))
            chunks = [todo[i:i + batch_size] for i in range(0, len(todo), batch_size)]
            gen_cfg = make_generation_config(model, tokenizer, max_new_tokens=max_new_tokens,
                                             temperature=temperature, top_p=top_p)
        it = chunks
        if progress:
            from tqdm import tqdm
            it = tqdm(chunks, desc="generate", unit="batch")
        for chunk in it:
            if backend == "vllm":
                rows = _vllm_generate_chunk(vllm_llm, chunk, settings)
            else:
                rows = _hf_generate_chunk(model, tokenizer, chunk, gen_cfg, stop, seed, greedy_impl)
            for r in rows:
                r["settings"] = key
                done[(r["prompt_id"], r["sample_index"])] = r
            _append_rows(cache_path, rows)
    out = []
    for pid in pids:
        rows = []
        for j in range(n):
            r = done[(pid, 0 if greedy else j)]
            rows.append(dict(r, sample_index=j) if r["sample_index"] != j else r)
        out.append(rows)
    return out


def generate(model, tokenizer, prompts: list[str], *, max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, n: int = 1, batch_size: int = 64, stop=None, seed: int = 0,
             cache_path=None, prompt_ids=None, backend: str = "hf", vllm_llm=None,
             progress: bool = False, greedy_impl: str = "fast") -> list[list[str]]:
    """n completions per (already rendered) prompt: greedy when temperature == 0, else
    temperature / top-p sampling. Stops at EOS (tokenizer + generation_config ids) or a stop
    string (removed from the text). With `cache_path`, finished rows are appended to a JSONL
    file after every batch, and rows already there (same settings) are reused: re-scoring never
    regenerates, and an interrupted run resumes where it stopped. The cache does not know which
    model wrote it: use one cache file per model/adapter."""
    recs = generate_records(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                            temperature=temperature, top_p=top_p, n=n, batch_size=batch_size,
                            stop=stop, seed=seed, cache_path=cache_path, prompt_ids=prompt_ids,
                            backend=backend, vllm_llm=vllm_llm, progress=progress,
                            greedy_impl=greedy_impl)
    return [[r["text"] for r in rows] for rows in recs]


# --- vLLM backend (GPU; on CPU the tests run it through tests/vllm_double.py) -----------------
# API as of vLLM 0.34.0 (requirements-gpu.txt). One engine per process: built on the base model's
# folder, reused by every suite and every adapter of that base (their merged weights are pushed in,
# layer by layer: nothing is written to disk), freed with vLLM's own teardown by release_engine().

def vllm_available() -> bool:
    """True when vllm imports and CUDA is present (the import is guarded: vllm is optional)."""
    try:
        import torch
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
    kw = dict(model=str(model_path), dtype="bfloat16", seed=seed, tensor_parallel_size=1,
              gpu_memory_utilization=gpu_memory_utilization, trust_remote_code=False, **extra)
    if max_model_len:
        kw["max_model_len"] = int(max_model_len)
    return LLM(**kw)


def free_cuda_cache() -> None:
    """gc + torch.cuda.empty_cache(): memory the caller dropped goes back to the device."""
    import gc
    import torch
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


_ENGINE: dict = {}   # {"llm", "path", "max_model_len", "util", "weights"}: this process's engine


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


_STACKED = ((".q_proj.", ".qkv_proj."), (".k_proj.", ".qkv_proj."), (".v_proj.", ".qkv_proj."),
            (".gate_proj.", ".gate_up_proj."), (".up_proj.", ".gate_up_proj."))


def vllm_param_name(hf_name: str) -> str:
    """The name vLLM's load_weights reports for an HF tensor (fused qkv_proj / gate_up_proj)."""
    for a, b in _STACKED:
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
    req_prompts, params, order = [], [], []
    tok = llm.get_tokenizer()
    for pid, (p, js) in by_pid.items():
        sp = SamplingParams(n=len(js), temperature=settings["temperature"], top_p=settings["top_p"],
                            max_tokens=settings["max_new_tokens"], stop=settings["stop"] or None,
                            seed=prompt_seed(settings["seed"], pid))
        # token ids without added specials, exactly as the transformers path encodes the rendered
        # prompt (a text prompt would get a second BOS from vLLM's tokenizer call)
        req_prompts.append({"prompt_token_ids": tok(p, add_special_tokens=False).input_ids})
        params.append(sp)
        order.append((pid, js))
    outs = llm.generate(req_prompts, params, use_tqdm=False)
    rows = []
    for (pid, js), o in zip(order, outs):
        for j, c in zip(js, o.outputs):
            # stop_reason: None = the tokenizer's EOS, an int = a stop token (generation_config's
            # other EOS ids), a str = a stop string
            finish = {"stop": "stop", "length": "length"}.get(c.finish_reason, "eos")
            if c.finish_reason == "stop" and not isinstance(c.stop_reason, str):
                finish = "eos"
            rows.append({"prompt_id": pid, "sample_index": j, "text": c.text,
                         "num_tokens": len(c.token_ids), "finish": finish})
    return rows


# -----------------------------------------------------------------------------
# 8. Aggregation and the toy suite

def score_samples(items: list[dict], samples: list[list[str]]) -> list[list[float]]:
    """Score matrix S (N items x n samples) in {0..1} (IFEval: fraction of slots, strict)."""
    if len(items) != len(samples):
        raise ValueError(f"{len(items)} items but {len(samples)} sample lists")
    return [[score_item(it, s) for s in ss] for it, ss in zip(items, samples)]


def aggregate(items: list[dict], samples: list[list[str]], mode: str = "micro",
              ks=(1, 2, 4, 8, 16)) -> dict:
    """Benchmark score in percent from items and their samples.

    mode "micro": 100 * mean over items x samples (math avg@n, NQ, toy med);
         "macro_subtask": unweighted mean of per-subtask accuracies (BBH tasks, m1 sources);
         "ifeval": instruction-level strict accuracy (the paper's IFEval figure) + the other three.
    """
    out = {"n_items": len(items), "n": len(items), "n_samples": len(samples[0]) if samples else 0}
    if mode == "ifeval":
        slot_lists = [ifeval_slots(it, ss[0]) for it, ss in zip(items, samples)]
        acc = ifeval_accuracies(slot_lists)
        out.update(acc)
        out["score"] = acc["inst_level_strict"]
        return out
    S = score_samples(items, samples)
    per_item = [sum(r) / len(r) for r in S]
    subs: dict[str, list[float]] = {}
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
        # [EVAL.md §1.5] unbiased pass@k, averaged over problems, for every k <= n
        c = [round(sum(r)) for r in S]
        out["pass_at_k"] = {str(k): 100.0 * sum(pass_at_k(n, ci, k) for ci in c) / len(c)
                            for k in sorted(set(ks) | {n}) if k <= n}
        out["pass_acc"] = 100.0 * sum(ci > 0 for ci in c) / len(c)
    if items and items[0].get("scorer") == "nq":
        out["exact_match"] = 100.0 * sum(nq_exact_match(ss[0], it["gold"]) for it, ss in zip(items, samples)) / len(items)
    return out


# Per-family new-token budgets of the toy suite (char-level tokens): the longest canonical
# response of each family (ifeval 49, nq 43, bbh 122, math 63, med 68 characters over the first
# 200 test items) plus a margin for the EOS and small deviations.
TOY_MAX_NEW_TOKENS = {"ifeval": 64, "nq": 56, "bbh": 144, "math": 80, "med": 84}
TOY_AGG_MODE = {"ifeval": "ifeval", "nq": "micro", "bbh": "macro_subtask", "math": "micro", "med": "micro"}


def _render(tokenizer, prompt: str) -> str:
    try:
        from loading import render_chat
    except ImportError:
        render_chat = None
    if render_chat is not None:
        return render_chat(tokenizer, prompt)
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    return prompt


def combine_scores(families: dict, domain: str, base_general: float | None = None) -> dict:
    """target = the domain's score; general = mean(IFEval inst-strict, BBH mean, NQ containment)
    (PAPER.md §6, `compute_general_avg`); forgetting = base general - general."""
    out = {}
    if domain in families:
        out["target_score"] = families[domain]["score"]
    general = [families[f]["score"] for f in ("ifeval", "bbh", "nq") if f in families]
    if general:
        out["general_score"] = sum(general) / len(general)
        if len(general) < 3:
            out["general_partial"] = [f for f in ("ifeval", "bbh", "nq") if f in families]
    if base_general is not None and "general_score" in out:
        out["base_general"] = float(base_general)
        out["forgetting"] = float(base_general) - out["general_score"]
    return out


def evaluate_toy(model, tokenizer, *, domain: str = "math", n_per_family: int = 200,
                 batch_size: int = 64, families=None, base_general: float | None = None,
                 max_new_tokens: dict | int | None = None, seed: int = 0, cache_dir=None,
                 return_samples: bool = False, progress: bool = False) -> dict:
    """Score a model on the toy world's test items (greedy, one sample; DEVIATION 12).

    Returns percent scores: {"target_score", "general_score", "forgetting" (with base_general),
    "families": {fam: {"score", "n_items", "subtasks"?, ...}}, "generation", "seconds"}.
    """
    import toy_world
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
            mnt = (max_new_tokens or {}).get(fam, TOY_MAX_NEW_TOKENS[fam])
        prompts = [_render(tokenizer, it["prompt"]) for it in items]
        cache = Path(cache_dir) / f"toy_{fam}.jsonl" if cache_dir else None
        samples = generate(model, tokenizer, prompts, max_new_tokens=mnt, batch_size=batch_size,
                           seed=seed, cache_path=cache, prompt_ids=[it["id"] for it in items],
                           progress=progress)
        res["families"][fam] = aggregate(items, samples, TOY_AGG_MODE[fam])
        res["generation"][fam] = {"max_new_tokens": mnt, "temperature": 0.0, "n": 1}
        if return_samples:
            samples_out[fam] = [{"id": it["id"], "response": s[0]} for it, s in zip(items, samples)]
    res.update(combine_scores(res["families"], domain, base_general))
    res["seconds"] = round(time.time() - t0, 2)
    if return_samples:
        res["samples"] = samples_out
    return res


# -----------------------------------------------------------------------------
# 9. Real benchmarks: local files in the hub formats, and the paper's prompts (EVAL.md §0, §7, §8)

MATH_STOP = ["</s>", "<|im_end|>", "<|endoftext|>", "\n\nQuestion:"]
BOXED_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
BBH_HINT_HEAD = "Follow the given examples and answer the question.\n"
NQ_PROMPT = ("Answer these questions, your answer should be as simple as possible, start your answer "
             "with the prompt 'The answer is '.\nQ: {question}?")

# name -> hub id, candidate local files (relative to --data-dir), format, decoding (EVAL.md §0)
BENCHMARKS = {
    "math500": dict(hub="HuggingFaceH4/MATH-500", split="test",
                    files=["math500/test.jsonl", "MATH-500/test.jsonl"],
                    fmt="JSONL rows {problem, solution, answer, subject, level, unique_id}",
                    decoding=dict(temperature=0.6, top_p=1.0, n=16, max_new_tokens=8192, stop=MATH_STOP)),
    "aime24": dict(hub="HuggingFaceH4/aime_2024", split="train",
                   files=["aime24/test.jsonl", "aime24/data/train-00000-of-00001.parquet",
                          "aime_2024/data/train-00000-of-00001.parquet"],
                   fmt="JSONL (release) or parquet (hub) rows {id, problem, solution, answer (str), url}",
                   decoding=dict(temperature=0.6, top_p=1.0, n=16, max_new_tokens=8192, stop=MATH_STOP)),
    "amc23": dict(hub="math-ai/amc23", split="test", files=["amc23/test.jsonl"],
                  fmt="JSONL rows {id, problem, answer (float), url, question}",
                  decoding=dict(temperature=0.6, top_p=1.0, n=16, max_new_tokens=8192, stop=MATH_STOP)),
    "gsm8k": dict(hub="openai/gsm8k", config="main", split="test",
                  files=["gsm8k/test.jsonl", "gsm8k/main/test-00000-of-00001.parquet"],
                  fmt="JSONL or parquet rows {question, answer ('... #### N')}",
                  decoding=dict(temperature=0.6, top_p=1.0, n=16, max_new_tokens=8192, stop=MATH_STOP)),
    "m1": dict(hub="UCSC-VLAA/m1_eval_data", split=None,
               files=["m1_eval/m1_eval_data.json", "m1_eval_data.json", "m1_eval/m1_eval_data_processed.json"],
               fmt="JSON dict {source: [{question, options {letter: text}, answer_idx, ...}]} or the "
                   "release's flat list [{prompt, options, answer_idx, source}]",
               decoding=dict(temperature=0.0, top_p=1.0, n=1, max_new_tokens=8192, stop=[])),
    "ifeval": dict(hub="google/IFEval", split="train",
                   files=["ifeval/ifeval_input_data.jsonl", "ifeval/input_data.jsonl"],
                   fmt="JSONL rows {key, prompt, instruction_id_list [...], kwargs [{...}]}",
                   decoding=dict(temperature=0.0, top_p=1.0, n=1, max_new_tokens=1025, stop=[])),
    "bbh": dict(hub="lukaemon/bbh (+ suzgunmirac/BIG-Bench-Hard cot-prompts)", split="test",
                files=["bbh/bbh", "BBH/data", "bbh/data"],
                prompt_dirs=["bbh/cot-prompts", "BBH/lib_prompt", "bbh/lib_prompt"],
                fmt="a directory of <task>.json files {\"examples\": [{input, target}]} and a directory "
                    "of <task>.txt 3-shot CoT prompts (BIG-Bench-Hard layout: bbh/ and cot-prompts/)",
                decoding=dict(temperature=0.0, top_p=1.0, n=1, max_new_tokens=512, stop=[])),
    "nq": dict(hub="google-research-datasets/nq_open", split="validation",
               files=["nq_open/nq_open/validation-00000-of-00001.parquet",
                      "nq_open/validation-00000-of-00001.parquet", "nq_open/validation.jsonl",
                      "nq/nq-test.qa.csv"],
               fmt="parquet/JSONL rows {question, answer [str, ...]} or the DPR TSV nq-test.qa.csv",
               decoding=dict(temperature=0.0, top_p=1.0, n=1, max_new_tokens=50, stop=[])),
}
SUITES = {"math": ["math500", "aime24", "amc23"], "med": ["m1"], "general": ["ifeval", "bbh", "nq"]}
SUITES["all"] = SUITES["math"] + SUITES["med"] + SUITES["general"]


class DatasetMissing(FileNotFoundError):
    pass


def read_records(path) -> list | dict:
    """Rows of a local dataset file by its suffix: .jsonl, .json, .parquet (needs pyarrow), or the
    DPR-style .csv/.tsv of NQ (question<TAB>python-literal list of answers)."""
    p = Path(path)
    if not p.exists():
        raise DatasetMissing(f"dataset file {p} does not exist")
    suf = p.suffix.lower()
    if suf == ".jsonl":
        rows = []
        with open(p, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except ValueError as err:
                        raise ValueError(f"{p}:{lineno}: not valid JSON ({err})") from err
        return rows
    if suf == ".json":
        with open(p, encoding="utf-8") as f:
            return json.load(f)
    if suf == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as err:
            raise ImportError(f"reading {p} needs pyarrow (pip install pyarrow), or convert the file "
                              "to JSONL with the same fields") from err
        return pq.read_table(p).to_pylist()
    if suf in (".csv", ".tsv"):
        import ast
        rows = []
        with open(p, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                q, _, a = line.rstrip("\n").partition("\t")
                try:
                    ans = ast.literal_eval(a)  # literals only: never executes code
                except (ValueError, SyntaxError) as err:
                    raise ValueError(f"{p}:{lineno}: answer column is not a Python list literal") from err
                rows.append({"question": q, "answer": list(ans) if isinstance(ans, (list, tuple)) else [str(ans)]})
        return rows
    raise ValueError(f"{p}: unsupported dataset format {suf!r} (expected .jsonl, .json, .parquet, .csv)")


def find_dataset(name: str, data_dir=None, path=None, *, allow_hub: bool = False):
    """Resolve benchmark `name` to a local path (explicit path, else the first existing candidate
    under data_dir), or, when allow_hub, to the string 'hub'. Otherwise raise DatasetMissing
    naming the hub id, the local files looked for, and the expected format."""
    spec = BENCHMARKS[name]
    tried = []
    if path is not None:
        if Path(path).exists():
            return Path(path)
        tried.append(str(path))
    if data_dir is not None:
        for rel in spec["files"]:
            cand = Path(data_dir) / rel
            if cand.exists():
                return cand
            tried.append(str(cand))
    if allow_hub:
        return "hub"
    raise DatasetMissing(
        f"benchmark {name!r}: no local data found (looked for: {', '.join(tried) or 'nothing, no --data-dir'}). "
        f"Expected hub id {spec['hub']!r}" + (f" split {spec['split']!r}" if spec.get("split") else "") +
        f"; format: {spec['fmt']}. Download it where the hub is reachable and pass --data-dir DIR "
        f"(files at {', '.join(spec['files'])}) or --path {name}=FILE; --allow-hub tries the hub.")


def _load_from_hub(name: str):
    spec = BENCHMARKS[name]
    try:
        import datasets
        args = [spec["hub"]] + ([spec["config"]] if spec.get("config") else [])
        ds = datasets.load_dataset(*args, split=spec["split"]) if spec["split"] else datasets.load_dataset(*args)
        if spec["split"] is None:  # m1: one split per source
            return {k: list(v) for k, v in ds.items()}
        return list(ds)
    except Exception as err:  # noqa: BLE001
        raise DatasetMissing(f"benchmark {name!r}: loading hub id {spec['hub']!r} failed "
                             f"({type(err).__name__}: {str(err)[:200]}); expected format: {spec['fmt']}; "
                             "pass a local file with --data-dir or --path") from err


def _rows(name, data_dir=None, path=None, allow_hub=False):
    where = find_dataset(name, data_dir, path, allow_hub=allow_hub)
    return (_load_from_hub(name) if where == "hub" else read_records(where)), str(where)


def _need(row: dict, keys, name: str, i: int):
    missing = [k for k in keys if k not in row]
    if missing:
        raise ValueError(f"benchmark {name!r}, row {i}: missing field(s) {missing}; row has {sorted(row)}; "
                         f"expected format: {BENCHMARKS[name]['fmt']}")


def math_prompt(problem: str) -> str:
    """The release's default `cot` prompt (EVAL.md §0), rendered inside the chat template."""
    return f"Question: {problem.strip()}\nAnswer:"


def load_math_benchmark(name: str, data_dir=None, path=None, *, allow_hub=False) -> list[dict]:
    """MATH-500 / AIME24 / AMC23 / GSM8K items (scorer 'math')."""
    rows, src = _rows(name, data_dir, path, allow_hub)
    items = []
    for i, r in enumerate(rows):
        if name == "gsm8k":
            _need(r, ["question", "answer"], name, i)
            problem, gold = r["question"], str(r["answer"]).split("####")[-1].strip().replace(",", "")
        else:
            _need(r, ["answer"], name, i)
            problem = r.get("problem", r.get("question"))
            if problem is None:
                raise ValueError(f"benchmark {name!r}, row {i} of {src}: no 'problem' or 'question' field")
            gold = r["answer"]  # DEVIATION 14: the answer field, not the solution's last box
            # AMC23 golds are JSON floats (27.0) -> "27.0", which strip_string turns into "27"
            gold = str(gold)
        rid = r.get("unique_id", r.get("id", r.get("idx", i)))
        items.append({"id": f"{name}-{rid}", "family": name, "subtask": str(r.get("subject", "")),
                      "prompt": math_prompt(problem), "gold": gold, "scorer": "math"})
    return items


def med_prompt(question: str, options: dict) -> str:
    body = question.strip() + "\n" + "\n".join(f"{k}. {v}" for k, v in options.items())
    return body


def load_m1(data_dir=None, path=None, *, allow_hub=False) -> list[dict]:
    """m1 medical items (scorer 'choice'; subtask = source), from the hub's dict-by-source JSON or
    the release's flat processed list. The boxed instruction is appended to the user turn."""
    rows, src = _rows("m1", data_dir, path, allow_hub)
    flat = []
    if isinstance(rows, dict):
        for source, lst in rows.items():
            for i, r in enumerate(lst):
                _need(r, ["question", "options", "answer_idx"], "m1", i)
                flat.append((source, i, med_prompt(r["question"], r["options"]), r["options"], r["answer_idx"]))
    elif isinstance(rows, list):
        for i, r in enumerate(rows):
            _need(r, ["options", "answer_idx", "source"], "m1", i)
            prompt = r.get("prompt") or med_prompt(r["question"], r["options"])
            flat.append((r["source"], i, prompt, r["options"], r["answer_idx"]))
    else:
        raise ValueError(f"{src}: m1 data must be a JSON dict keyed by source or a list of rows")
    items = []
    for source, i, prompt, options, gold in flat:
        if isinstance(options, list):  # some re-uploads store the options as a list
            options = {_OPTION_LETTERS[k]: v for k, v in enumerate(options)}
        items.append({"id": f"m1-{source}-{i}", "family": "m1", "subtask": source,
                      "prompt": prompt + "\n" + BOXED_INSTRUCTION, "options": options,
                      "gold": str(gold), "scorer": "choice"})
    return items


def load_ifeval(data_dir=None, path=None, *, allow_hub=False) -> list[dict]:
    rows, _ = _rows("ifeval", data_dir, path, allow_hub)
    items = []
    for i, r in enumerate(rows):
        _need(r, ["prompt", "instruction_id_list", "kwargs"], "ifeval", i)
        items.append({"id": f"ifeval-{r.get('key', i)}", "family": "ifeval",
                      "subtask": "", "prompt": r["prompt"],
                      "instruction_id_list": list(r["instruction_id_list"]),
                      "kwargs": [dict(k) for k in r["kwargs"]], "gold": None, "scorer": "ifeval"})
    return items


def bbh_prompt(hint: str, question: str) -> str:
    """OpenCompass bbh_gen_5b92b0: instruction line + the task's CoT exemplars + the question."""
    return f"{BBH_HINT_HEAD}{hint}\n\nQ: {question}\nA: Let's think step by step."


def load_bbh(data_dir=None, path=None, prompt_dir=None, *, tasks=None) -> list[dict]:
    """BBH items of every task present, from <data>/<task>.json + <prompts>/<task>.txt."""
    spec = BENCHMARKS["bbh"]
    ddir = Path(path) if path else next((Path(data_dir) / f for f in spec["files"]
                                         if data_dir and (Path(data_dir) / f).is_dir()), None)
    pdir = Path(prompt_dir) if prompt_dir else next((Path(data_dir) / f for f in spec["prompt_dirs"]
                                                     if data_dir and (Path(data_dir) / f).is_dir()), None)
    if ddir is None or not ddir.is_dir() or pdir is None or not pdir.is_dir():
        raise DatasetMissing(
            f"benchmark 'bbh': need a task directory (found {ddir}) and a CoT prompt directory "
            f"(found {pdir}). Expected hub {spec['hub']}; format: {spec['fmt']}. Pass --data-dir DIR "
            f"with {spec['files'][0]}/ and {spec['prompt_dirs'][0]}/, or --path bbh=DIR --bbh-prompt-dir DIR.")
    names = sorted(p.stem for p in ddir.glob("*.json"))
    if tasks:
        names = [t for t in names if t in tasks]
    if not names:
        raise DatasetMissing(f"benchmark 'bbh': no <task>.json files in {ddir}")
    items = []
    for task in names:
        data = read_records(ddir / f"{task}.json")
        examples = data["examples"] if isinstance(data, dict) else data
        hint_file = pdir / f"{task}.txt"
        if not hint_file.exists():
            raise DatasetMissing(f"benchmark 'bbh': task {task} has no CoT prompt file {hint_file}")
        hint = hint_file.read_text(encoding="utf-8")
        for i, ex in enumerate(examples):
            _need(ex, ["input", "target"], "bbh", i)
            items.append({"id": f"bbh-{task}-{i}", "family": "bbh", "subtask": task,
                          "prompt": bbh_prompt(hint, ex["input"]), "gold": str(ex["target"]),
                          "scorer": "bbh"})
    return items


def load_nq(data_dir=None, path=None, *, allow_hub=False) -> list[dict]:
    rows, _ = _rows("nq", data_dir, path, allow_hub)
    items = []
    for i, r in enumerate(rows):
        _need(r, ["question", "answer"], "nq", i)
        ans = r["answer"]
        golds = [ans] if isinstance(ans, str) else [str(a) for a in ans]
        items.append({"id": f"nq-{i}", "family": "nq", "subtask": "",
                      "prompt": NQ_PROMPT.format(question=r["question"]), "gold": golds, "scorer": "nq"})
    return items


def load_benchmark(name: str, data_dir=None, path=None, *, allow_hub=False, bbh_prompt_dir=None,
                   limit: int | None = None) -> list[dict]:
    if name in ("math500", "aime24", "amc23", "gsm8k"):
        items = load_math_benchmark(name, data_dir, path, allow_hub=allow_hub)
    elif name == "m1":
        items = load_m1(data_dir, path, allow_hub=allow_hub)
    elif name == "ifeval":
        items = load_ifeval(data_dir, path, allow_hub=allow_hub)
    elif name == "bbh":
        items = load_bbh(data_dir, path, bbh_prompt_dir)
    elif name == "nq":
        items = load_nq(data_dir, path, allow_hub=allow_hub)
    else:
        raise KeyError(f"unknown benchmark {name!r}; known: {sorted(BENCHMARKS)}")
    if limit:
        if name in ("bbh", "m1"):  # keep every task/source represented
            per: dict[str, int] = {}
            kept = []
            for it in items:
                if per.get(it["subtask"], 0) < limit:
                    per[it["subtask"]] = per.get(it["subtask"], 0) + 1
                    kept.append(it)
            items = kept
        else:
            items = items[:limit]
    return items


# -----------------------------------------------------------------------------
# 10. Real suites

INSTRUCT_MARKERS = ("instruct", "-ins", "ins-", "chat", "it-")


def is_instruct(name: str) -> bool:
    """The release's rule (PAPER.md §6): BBH uses the chat template only for 'instruct' names."""
    return any(m in str(name).lower() for m in INSTRUCT_MARKERS)


def render_prompt(tokenizer, item: dict, *, raw: bool = False, system: str | None = None) -> str:
    if raw:
        return item["prompt"]
    msgs = ([{"role": "system", "content": system}] if system else []) + \
           [{"role": "user", "content": item["prompt"]}]
    try:
        from loading import render_chat
        return render_chat(tokenizer, msgs)
    except ImportError:
        if getattr(tokenizer, "chat_template", None):
            return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        return "\n\n".join(m["content"] for m in msgs)


def run_benchmark(name: str, items: list[dict], model, tokenizer, *, model_name: str = "",
                  batch_size: int = 64, seed: int = 0, cache_dir=None, backend: str = "hf",
                  vllm_llm=None, overrides: dict | None = None, progress: bool = False) -> dict:
    """Generate (cached) and score one real benchmark with its paper decoding settings."""
    dec = dict(BENCHMARKS[name]["decoding"])
    dec.update({k: v for k, v in (overrides or {}).items() if v is not None})
    raw = name == "bbh" and not is_instruct(model_name)  # base models: raw BBH completion
    system = "You are a helpful assistant." if name == "m1" else None  # DEVIATION 11
    prompts = [render_prompt(tokenizer, it, raw=raw, system=system) for it in items]
    cache = Path(cache_dir) / f"{name}.jsonl" if cache_dir else None
    recs = generate_records(model, tokenizer, prompts, max_new_tokens=dec["max_new_tokens"],
                            temperature=dec["temperature"], top_p=dec["top_p"], n=dec["n"],
                            batch_size=batch_size, stop=dec["stop"], seed=seed, cache_path=cache,
                            prompt_ids=[it["id"] for it in items], backend=backend, vllm_llm=vllm_llm,
                            progress=progress)
    samples = [[r["text"] for r in rows] for rows in recs]
    mode = {"ifeval": "ifeval", "bbh": "macro_subtask", "m1": "macro_subtask"}.get(name, "micro")
    res = aggregate(items, samples, mode)
    res["mean_new_tokens"] = sum(r["num_tokens"] for rows in recs for r in rows) / max(1, sum(map(len, recs)))
    res["generation"] = dict(dec, raw_prompt=raw, system=system, seed=seed, backend=backend)
    return res


def summarize_suite(bench: dict, *, domain: str | None, base_general: float | None) -> dict:
    """Paper aggregates: Math = mean of the three dataset accs, each rounded to 0.1 (EVAL.md §1.5);
    Medical = macro over sources; General = mean(IFEval inst-strict, BBH, NQ); forgetting."""
    out = {}
    targets = {}
    if all(b in bench for b in SUITES["math"]):
        targets["math"] = sum(round(bench[b]["score"], 1) for b in SUITES["math"]) / 3
    if "m1" in bench:
        targets["med"] = bench["m1"]["score"]
    if targets:
        out["target_scores"] = targets
        dom = domain or next(iter(targets))
        if dom in targets:
            out["target_score"] = targets[dom]
            out["domain"] = dom
    gen = {k: bench[k]["score"] for k in ("ifeval", "bbh", "nq") if k in bench}
    if len(gen) == 3:
        out["general_score"] = sum(gen.values()) / 3
        if base_general is not None:
            out["base_general"] = base_general
            out["forgetting"] = base_general - out["general_score"]
    return out


# -----------------------------------------------------------------------------
# 11. CLI

def _load_for_eval(spec: str, adapter: str | None, *, dtype=None, device=None):
    """(model, tokenizer, adapter_info) via loading.load_model (+ peft_methods.load_adapter)."""
    from loading import load_model
    model, tok = load_model(spec, dtype=dtype, device=device)
    info = None
    if adapter:
        from peft_methods import load_adapter, read_adapter_config
        load_adapter(model, adapter)
        model.eval()
        info = read_adapter_config(adapter)
    return model, tok, info


def _vllm_context(names, items, tok, model_name: str, max_new: dict, model_max: int) -> int:
    """max_model_len for the engine: the longest rendered prompt plus its benchmark's
    max_new_tokens (not the model's maximum, e.g. 131072 for Llama-3.2, whose KV cache reservation
    would be wasted), capped at the model's maximum."""
    need = 1
    for n in names:
        raw = n == "bbh" and not is_instruct(model_name)
        system = "You are a helpful assistant." if n == "m1" else None
        longest = max((len(tok(render_prompt(tok, it, raw=raw, system=system), add_special_tokens=False).input_ids)
                       for it in items[n]), default=0)
        need = max(need, longest + max_new[n])
    return min(need, model_max)


def _prepare_vllm(spec: str, adapter: str | None, *, names, items, max_new: dict, seed: int,
                  gpu_memory_utilization: float):
    """The process's vLLM engine on the base model's folder holding the weights to score: an
    adapter is merged into dense weights in memory (PAPER.md §6: 'every adapter is merged into a
    dense bf16 HF model and served with vLLM') and pushed in layer by layer; no merged copy is
    written to disk. The engine is reused by later suites and adapters of the same base."""
    from loading import load_tokenizer, resolve_spec
    from transformers import AutoConfig
    path, _ = resolve_spec(spec)
    tok = load_tokenizer(spec)
    hf_cfg = AutoConfig.from_pretrained(path)
    ctx = _vllm_context(names, items, tok, spec, max_new, int(getattr(hf_cfg, "max_position_embeddings", 1 << 30)))
    llm = get_engine(path, max_model_len=ctx, seed=seed, gpu_memory_utilization=gpu_memory_utilization)
    want = str(adapter) if adapter else None
    if _ENGINE.get("weights") != want:
        from peft_methods import iter_merged_state
        model, _, _ = _load_for_eval(spec, adapter, dtype="float32", device="cpu")
        push_weights(llm, iter_merged_state(model),
                     tied_embeddings=bool(getattr(hf_cfg, "tie_word_embeddings", False)))
        _ENGINE["weights"] = want
        del model
        free_cuda_cache()
    return llm, tok


def _parse_paths(pairs) -> dict:
    out = {}
    for p in pairs or []:
        if "=" not in p:
            raise SystemExit(f"--path expects NAME=FILE, got {p!r}")
        k, v = p.split("=", 1)
        if k not in BENCHMARKS:
            raise SystemExit(f"--path: unknown benchmark {k!r}; known: {sorted(BENCHMARKS)}")
        out[k] = v
    return out


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description="Both-axis evaluation (target + general), PAPER.md §6")
    g = ap.add_argument_group("model")
    g.add_argument("--model", default="toy", help="'toy', a local HF model dir, or a hub id")
    g.add_argument("--adapter", default=None, help="checkpoint dir written by peft_methods.save_adapter, or an HF PEFT adapter dir")
    g.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: bf16 on CUDA, fp32 on CPU)")
    g.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    g = ap.add_argument_group("what to score")
    g.add_argument("--suite", default=None, choices=["toy", "math", "med", "general", "all"],
                   help="default: toy for --model toy; a real model must name its suite (toy items "
                   "on a real model only when asked: --suite toy)")
    g.add_argument("--domain", default=None, choices=["math", "med"],
                   help="which target counts as target_score (toy default: math; real: the suite's)")
    g.add_argument("--extra", nargs="*", default=[], choices=["gsm8k"], help="extra benchmarks (not in the paper's mean)")
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


def _main(args, argv, context_suites=()) -> dict:
    assert args.limit is None or args.limit > 0, "--limit must be positive"
    assert args.n_per_family > 0, "--n-per-family must be positive"
    assert args.batch_size > 0, "--batch-size must be positive"
    if args.out is None and not args.bench:
        raise SystemExit("--out DIR is required (or --bench)")
    import torch
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
    try:
        from loading import atomic_write_json
    except ImportError:
        def atomic_write_json(path, obj):
            tmp = Path(str(path) + ".tmp")
            tmp.write_text(json.dumps(obj, indent=2))
            os.replace(tmp, path)
    if out:
        atomic_write_json(out / "config.json", config)
    print(f"[evaluate] model={args.model} adapter={args.adapter} suite={args.suite} "
          f"torch_threads={torch.get_num_threads()}", file=sys.stderr)
    t0 = time.time()

    if args.suite == "toy":
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
    else:
        domain = args.domain or ({"math": "math", "med": "med"}.get(args.suite, "math"))
        names = SUITES[args.suite] + [e for e in args.extra if e not in SUITES[args.suite]]
        paths = _parse_paths(args.path)
        items = {n: load_benchmark(n, args.data_dir, paths.get(n), allow_hub=args.allow_hub,
                                   bbh_prompt_dir=args.bbh_prompt_dir, limit=args.limit) for n in names}
        backend = args.backend
        if backend == "auto":
            backend = "vllm" if vllm_available() else "hf"
        if backend == "vllm" and not vllm_available():
            raise SystemExit("--backend vllm needs vllm installed and a CUDA GPU")
        ainfo = None
        overrides_math = {"n": None if args.num_samples < 0 else args.num_samples,
                          "temperature": None if args.temperature < 0 else args.temperature}
        max_new = {n: (args.max_new_tokens if args.max_new_tokens > 0
                       else BENCHMARKS[n]["decoding"]["max_new_tokens"]) for n in names}
        if backend == "vllm":
            ctx_names = list(dict.fromkeys(names + [n for c in context_suites for n in SUITES[c]]))
            ctx_items = {n: items[n] if n in items else load_benchmark(
                n, args.data_dir, paths.get(n), allow_hub=args.allow_hub, bbh_prompt_dir=args.bbh_prompt_dir,
                limit=args.limit) for n in ctx_names}
            max_new = {n: (args.max_new_tokens if args.max_new_tokens > 0
                           else BENCHMARKS[n]["decoding"]["max_new_tokens"]) for n in ctx_names}
            llm, tok = _prepare_vllm(args.model, args.adapter, names=ctx_names, items=ctx_items, max_new=max_new,
                                     seed=args.seed, gpu_memory_utilization=args.vllm_gpu_memory_utilization)
            model = None
            if args.adapter:
                from peft_methods import read_adapter_config
                ainfo = read_adapter_config(args.adapter)
        else:
            llm = None
            model, tok, ainfo = _load_for_eval(args.model, args.adapter, dtype=args.dtype, device=args.device)
        bench = {}
        if "ifeval" in names:   # first real use: fetch punkt_tab, warn about fallbacks
            ensure_ifeval_data()
            ifeval_fallbacks_used(reset=True)
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
        res["ifeval_fallback_used"] = ifeval_fallbacks_used() if "ifeval" in names else []
        if res["ifeval_fallback_used"]:
            print(f"[evaluate] WARNING: IFEval used built-in fallbacks for {res['ifeval_fallback_used']} "
                  "(not the reference's nltk/langdetect); see ifeval_fallback_used in results.json",
                  file=sys.stderr)
    res["ifeval_backends"] = IFEVAL_BACKENDS
    if out:
        atomic_write_json(out / "results.json", res)
    parts = [f"{k}={res[k]:.2f}" for k in ("target_score", "general_score", "forgetting") if k in res]
    print(f"[evaluate] {args.model}{' + ' + args.adapter if args.adapter else ''} suite={args.suite}: "
          + " ".join(parts) + (f" -> {out / 'results.json'}" if out else ""))
    return res


if __name__ == "__main__":
    import loading
    loading.run_cli("evaluate.py", main, resume_hint="rerun the same command: the generations "
                    "cached under --out/generations are reused", one_line=(DatasetMissing,))
