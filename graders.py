"""graders.py: the answer graders behind evaluate.py, the engine room a reader may skip.

Each grader mirrors the scorer the PEFT-Arena release (cited "PA: <path>", Sphere-AI-Lab/PEFT-Arena
e982d19) or the harness it pins (cited "OC: <path>", OpenCompass v0.5.2) runs:
  1. Math: `extract_math_answer` + `strip_string` (PA: third_party/math_eval/parser.py),
     `math_equal` (PA: third_party/math_eval/grader.py) with a hand-written LaTeX -> sympy parser
     (no Python eval anywhere) under a hard time limit (a killable worker process), `grade_math`;
     the RL reward `grade_reward` (PA: train/peft_arena_verl/utils/reward_score/math_rlvr.py).
  2. Medical letters: `extract_choice_letter` (PA: third_party/med_eval/utils/extract_answer.py).
  3. BBH extraction + exact match (OC: opencompass/datasets/bbh.py).
  4. NQ-open containment (OC: opencompass/datasets/natural_question.py) + true exact match.
  5. IFEval: the 25 checkers, strict and loose, the four accuracies (google-research
     instruction_following_eval, identical in OpenCompass and lm-eval).
  6. `score_item(item, response)` in [0, 1], dispatching on item["scorer"] (toy and real items).

Untrusted text: model outputs never reach eval/exec/sympify/parse_expr, pickle or a shell; symbolic
math goes through `latex_to_sympy`, a recursive-descent parser over a whitelisted LaTeX subset.

Deviations that can change a reported number (each marked `# DEVIATION n` at the line)
 1. Symbolic math: our LaTeX-subset parser replaces latex2sympy/parse_expr (runs of >= 3 letters are
    one symbol, shorter runs products; i is imaginary). About 1 point on MATH-500.
 2. Time limit: sympy runs in a killable worker process (+ warm spare), SIGKILLed at 3 s + 0.25 s;
    one deadline covers a whole grade_math call (the release: 3 s per comparison, pebble pool);
    inputs are bounded up front (<= 400 chars, nesting 60, 40 digits, exponents 1000, n! 200).
 3. Extracted math answers longer than 2000 characters count as no answer.
 4. Intervals/tuples must agree in bracket types ("[0,1)" != "(0,1)"); parts split at top-level commas.
 5. strip_string's unit words: our list of ~100 units of measure (no ordinary words such as "east");
    number words -> digits by a small built-in parser instead of word2number.
 6. Medical letters: a candidate "I" among >= 9 options that reads as the pronoun is skipped
    (`guard_pronoun_i=False` restores the release's quirk).
 7. IFEval without langdetect / nltk punkt_tab: built-in language detector, sentence splitter and
    Treebank-like tokenizer; results.json records the backends (`ifeval_backends`, `ifeval_fallback_used`).
 8. IFEval keywords are matched literally (re.escape); postscript markers and section spliters are
    regexes as in the reference (an invalid one is matched literally where the reference crashes).
 9. GRPO reward: the release's extraction and math_equal variant with our evaluation strip_string.

Implementation notes (same numbers as the reference)
 a. NQ exact match (extra metric): first line after the last "answer is", cut at "."/",", SQuAD-normalised.
 b. BBH task kind (multiple choice or free form) from the task name, else from the gold's shape "(X)".
 c. IFEval title / placeholder / postscript / bullet and sentence scans are linear-time equivalents
    of the reference regexes (tested against them), which are quadratic on pathological inputs.
 d. An IFEval response longer than MAX_IFEVAL_CHARS follows no instruction (bounded scoring time).
"""
from __future__ import annotations

import atexit
import cmath
import difflib
import json
import math
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

# -----------------------------------------------------------------------------
# 1. Math grader (PA: third_party/math_eval/{parser,grader}.py)

MAX_ANSWER_CHARS = 2000  # DEVIATION 3: longer extracted answers count as no answer
MAX_SYMBOLIC_CHARS = 400  # DEVIATION 2: longer strings never reach sympy
MAX_IFEVAL_CHARS = 200_000  # note d: a longer IFEval response follows no instruction
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

    `\\boxed 5$` (no brace) gives the text up to the next '$' (parser.py `extract_answer`). An unbalanced
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


def _last_number(text: str) -> str:
    """The last number of the text with commas removed, or "" (both extractions' last rule)."""
    nums = _LAST_NUMBER.findall(text.replace(",", ""))
    return nums[-1] if nums else ""


def _answer_span(text: str, rules) -> str:
    """The text the first firing rule picks: "boxed" -> the last \\boxed{} content, a phrase -> what
    follows its last occurrence, then the last number; "" when longer than MAX_ANSWER_CHARS."""
    for rule in rules:
        if rule in text:
            ans = (last_boxed_content(text) or "") if rule == "boxed" else text.split(rule)[-1].strip()
            break
    else:
        ans = _last_number(text)
    return "" if len(ans) > MAX_ANSWER_CHARS else ans   # DEVIATION 3


def extract_math_answer(text: str) -> str:
    """The model's final answer, normalised (PA: third_party/math_eval/parser.py:extract_answer): first rule that fires of
    Minerva "final answer is $..$. I hope" -> last \\boxed{} -> "he answer is" -> "final answer is"
    -> last number; then newline/colon/period/slash clean-up and `strip_string`."""
    text = str(text).replace("ки", "")
    if "final answer is $" in text and "$. I hope" in text:
        ans = text.split("final answer is $", 1)[1].split("$. I hope", 1)[0].strip()
        ans = "" if len(ans) > MAX_ANSWER_CHARS else ans   # DEVIATION 3
    else:
        ans = _answer_span(text, ("boxed", "he answer is", "final answer is"))
    ans = re.sub(r"\n\s*", "", ans).removeprefix(":").removesuffix(".").removesuffix("/")
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
    English number words (the release uses word2number for this, `strip_string` step 5)."""
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
    """Normalise a math answer (PA: third_party/math_eval/parser.py:strip_string, applied to
    prediction and gold alike; the step numbers below follow its order)."""
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


def _sympy():
    import sympy   # heavy: imported on the first symbolic comparison (in the worker, at start-up)
    return sympy


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
        if name in ("frac", "binom", "sqrt"):
            return {"frac": self.frac, "binom": self.binom, "sqrt": self.sqrt}[name]()
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
            return self.function(name)
        raise LatexParseError(f"command \\{name} is not a value")

    def frac(self):
        num, den = self.script(), self.script()
        if den == 0:
            raise LatexParseError("division by zero")
        return num / den

    def binom(self):
        n, k = self.script(), self.script()
        if not (n.is_Integer and k.is_Integer and 0 <= k <= n <= 1000):
            raise LatexParseError("binom needs small integers")
        return _sympy().binomial(n, k)

    def sqrt(self):
        sp = _sympy()
        if self.peek() == ("op", "["):
            idx = self.group("[", "]")
            if not (idx.is_Integer and 1 < idx <= 100):
                raise LatexParseError("root index must be a small integer")
            return sp.root(self.script(), idx)
        return sp.sqrt(self.script())

    def function(self, name):
        """\\sin x, \\sin^2 x, \\log_b x, \\exp(x), ...: an optional base and power, then the argument."""
        sp = _sympy()
        base = None
        if name == "log" and self.peek() == ("op", "_"):
            self.take()
            base = self.script()
        power = None
        if self.peek() == ("op", "^"):  # \sin^2 x
            self.take()
            power = self.script()
        arg = self.power() if self.peek()[1] not in "([{" else self.atom()
        if name == "exp":
            v = arg.evalf(15) if arg.is_number else None
            if v is not None and v.is_real and abs(v) > MAX_EXPONENT:
                raise LatexParseError("exponent too large")
        if name == "log":
            out = sp.log(arg, base) if base is not None else sp.log(arg)
        else:
            out = {"sin": sp.sin, "cos": sp.cos, "tan": sp.tan, "sec": sp.sec, "csc": sp.csc,
                   "cot": sp.cot, "arcsin": sp.asin, "arccos": sp.acos, "arctan": sp.atan,
                   "sinh": sp.sinh, "cosh": sp.cosh, "tanh": sp.tanh, "ln": sp.log, "exp": sp.exp}[name](arg)
        return self.pow(out, power) if power is not None else out


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
    """[grader.py `symbolic_equal`] a == b; simplify(a - b) == 0; numeric isclose 1e-4; a.equals(b).

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
    """latex_to_sympy(s), else of s with '\\\\' -> '\\', else None (grader.py `symbolic_equal`)."""
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
# The release runs every comparison in a pebble process pool with a 3 s timeout (grader.py). A
# thread cannot be stopped and SIGALRM only works in the main thread and not inside C code, so we
# keep one persistent child process (plus a warm spare) that does all sympy work. The parent
# writes a JSON request line {"a", "b", "t"} to its stdin and waits for a "1"/"0" line at most t
# + GRACE_S seconds; on silence it SIGKILLs the child, reaps it and promotes the spare, so no work
# outlives the call. Only strings cross the pipe (no pickle of model output). Start-up (python +
# sympy import) happens once, outside any comparison's clock, like the release's pool.

_WORKER_BOOT = "import sys; sys.path.insert(0, sys.argv[1]); import graders; graders._worker_main()"


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
                raise RuntimeError(f"graders.py: the math comparison worker ({sys.executable} -c "
                                   f"'import graders') did not start within {self.START_S:.0f} s; "
                                   "run `python -c \"import graders\"` to see why")
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
    min(timeout_s, deadline - now) seconds (+ GRACE_S to kill it); a timeout scores 0 (as in
    grader.py). timeout_s None or <= 0 runs in this process with no limit (trusted input only)."""
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


def _plain_match(pred: str, gold: str, release_reward: bool) -> bool:
    """grader.py steps 1-2: string match (case-sensitive in the RL reward), multiple-choice gold
    (not in the RL reward)."""
    if (pred.strip() == gold.strip()) if release_reward else (pred.strip().lower() == gold.strip().lower()):
        return True
    return not release_reward and gold in ("A", "B", "C", "D", "E") and _choice_clean(pred) == gold


def _numeric_verdict(pred: str, gold: str) -> bool | None:
    """grader.py step 3: both plain numbers -> compared with the release's /100, x100 leniency and
    NO symbolic fallback; None when either side is not a plain number."""
    pn, gn = parse_number(pred), parse_number(gold)
    if pn is None or gn is None:
        return None
    return any(math.isclose(pn, g, rel_tol=1e-4) for g in (gn / 100, gn, gn * 100))


def _bracket_free_match(pred: str, gold: str) -> bool:
    """grader.py step 5: outer brackets and every { } ( ) removed, compared case-insensitively."""
    p, g = pred, gold
    if (p.startswith("[") and p.endswith("]") and not g.startswith("(")) or \
            (p.startswith("(") and p.endswith(")") and not g.startswith("[")):
        p, g = p[1:-1], g.strip("[]()")
    for ch in "{}()":
        p, g = p.replace(ch, ""), g.replace(ch, "")
    return p.lower() == g.lower()


def _parts_verdict(pred: str, gold: str, timeout_s, kw: dict) -> bool | None:
    """grader.py step 6: tuples / intervals (DEVIATION 4: bracket types must agree) and matrices,
    compared part by part; None when neither shape applies."""
    if re.fullmatch(r"[(\[].+[)\]]", pred, flags=re.S) and re.fullmatch(r"[(\[].+[)\]]", gold, flags=re.S):
        pp, gp = _split_top_level(pred[1:-1], ","), _split_top_level(gold[1:-1], ",")
        if len(pp) == len(gp) and len(pp) > 1:
            if pred[0] != gold[0] or pred[-1] != gold[-1]:
                return False
            return all(math_equal(a, b, timeout_s, **kw) for a, b in zip(pp, gp))
    pm, gm = _matrix_cells(pred), _matrix_cells(gold)
    if pm is None or gm is None:
        return None
    if len(pm) != len(gm) or any(len(a) != len(b) for a, b in zip(pm, gm)):
        return False
    return all(math_equal(a, b, timeout_s, **kw) for ra, rb in zip(pm, gm) for a, b in zip(ra, rb))


def _equation_verdict(pred: str, gold: str, timeout_s, kw: dict) -> bool | None:
    """grader.py step 7: two equations compare lhs - (rhs) up to sign; an equation against a value
    compares its right side when its left side is short ("x=3" vs "3"); None: no '=' involved."""
    n_p, n_g = pred.count("="), gold.count("=")
    if n_p == 1 and n_g == 1:
        pl, pr = pred.split("=")
        gl, gr = gold.split("=")
        d1, d2 = f"{pl}-({pr})", f"{gl}-({gr})"
        return (symbolic_equal(d1, d2, timeout_s, kw["_deadline"])
                or symbolic_equal(d1, f"-({d2})", timeout_s, kw["_deadline"]))
    if n_p == 1 and n_g == 0:
        pl, pr = pred.split("=")
        return len(pl.strip()) <= 2 and math_equal(pr, gold, timeout_s, **kw)
    if n_g == 1 and n_p == 0:
        gl, gr = gold.split("=")
        return len(gl.strip()) <= 2 and math_equal(pred, gr, timeout_s, **kw)
    return None


def math_equal(pred: str, gold: str, timeout_s: float = 3.0, *, release_reward: bool = False,
               _depth: int = 0, _deadline: float | None = None) -> bool:
    """Is the answer `pred` equivalent to `gold`? (PA: third_party/math_eval/grader.py:math_equal;
    both sides are normalised with `strip_string` first, so raw answers such as '\\dfrac12' and
    '0.5' may be passed.)

    `timeout_s` bounds the whole call (all symbolic sub-comparisons of tuples, matrices and
    equations share one deadline), enforced by killing the worker process (DEVIATION 2).
    `release_reward=True` is the RL reward's variant (PA: train/peft_arena_verl/utils/
    reward_score/math_rlvr.py): case-sensitive first string test and no A-E step."""
    if pred is None or gold is None:
        return False
    pred, gold = str(pred), str(gold)
    if len(pred) > MAX_ANSWER_CHARS or len(gold) > MAX_ANSWER_CHARS or _depth > 8:
        return False
    if _deadline is None and timeout_s is not None and timeout_s > 0:
        _deadline = time.monotonic() + timeout_s
    kw = {"release_reward": release_reward, "_depth": _depth + 1, "_deadline": _deadline}
    pred, gold = strip_string(pred), strip_string(gold)
    if _plain_match(pred, gold, release_reward):                       # steps 1-2
        return True
    verdict = _numeric_verdict(pred, gold)                             # step 3
    if verdict is not None:
        return verdict
    if not pred:                                                       # step 4
        return False
    if "pmatrix" in pred and "pmatrix" not in gold and re.fullmatch(r"\{.*\}", gold):
        gold = "\\begin{pmatrix}" + gold[1:-1].replace(",", "\\\\") + "\\end{pmatrix}"
    if _bracket_free_match(pred, gold):                                # step 5
        return True
    for step in (_parts_verdict, _equation_verdict):                   # steps 6, 7
        verdict = step(pred, gold, timeout_s, kw)
        if verdict is not None:
            return verdict
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
    """The RL reward's extraction (PA: train/peft_arena_verl/utils/reward_score/math_rlvr.py): last boxed{...}
    -> text after the last "he answer is" -> last number; first line; one leading ':' and one
    trailing '.' and '/' dropped; then `strip_string` (ours, DEVIATION 9)."""
    ans = _answer_span(str(text), ("boxed", "he answer is"))
    ans = ans.strip().split("\n")[0] if ans.strip() else ""
    ans = ans.removeprefix(":").removesuffix(".").removesuffix("/")
    return strip_string(ans)


def grade_reward(response: str, gold, timeout_s: float = 3.0) -> bool:
    """The release's binary RL reward (PEFT-Arena §RLVR "Reward"; PA: .../reward_score/math_rlvr.py):
    `extract_reward_answer` + `math_equal(release_reward=True)` against reward_model.ground_truth
    (a number or, for the medical data, a letter such as "C"), under `grade_math`'s time limit."""
    return math_equal(extract_reward_answer(response), str(gold), timeout_s, release_reward=True)


# -----------------------------------------------------------------------------
# 2. Medical letter extraction (PA: third_party/med_eval/utils/extract_answer.py)

OPTION_LETTERS = "ABCDEFGHIJKLMN"
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
    letters = OPTION_LETTERS[: len(options)]
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
# 3. BBH (OC: opencompass/datasets/bbh.py)

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


def _after_answer_is(text) -> str:
    """The text between the first and second 'answer is ' (all of it when there is none)."""
    pieces = str(text).split("answer is ")
    return pieces[1].strip() if len(pieces) > 1 else str(text)


def bbh_extract_mcq(text: str) -> str:
    """Multiple choice: text between the first and second 'answer is ', then the first '(X'
    letter, else the first capital letter, else the text. Applied to prediction AND target."""
    ans = _after_answer_is(text)
    m = re.search(r"\(([A-Z])\)*", ans)
    if m:
        return m.group(1)
    m = re.search(r"[A-Z]", ans)
    return m.group(0) if m else ans


def bbh_extract_free(text: str) -> str:
    """Free form: after the first 'answer is ', first line, one trailing '.', inside **bold**."""
    ans = _after_answer_is(text).split("\n")[0].strip()
    if ans.endswith("."):
        ans = ans[:-1].strip()
    m = re.search(r"\*\*(.*?)\*\*", ans)
    return m.group(1) if m else ans


def bbh_kind(task: str | None, gold: str | None = None) -> str:
    """'mcq' or 'free' for a task name (note b: unknown names go by the gold's shape)."""
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
# 4. NQ-open (OC: opencompass/datasets/natural_question.py + general_postprocess)

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
    """True exact match (note a): first line, after the last 'answer is', cut at '.'/',',
    SQuAD normalisation, equal to some normalised gold."""
    golds = [golds] if isinstance(golds, str) else list(golds)
    p = re.split(r"[.,]", _nq_prediction(pred), maxsplit=1)[0]
    p = _squad_normalize(p)
    return any(p == _squad_normalize(g) for g in golds)


# -----------------------------------------------------------------------------
# 5. IFEval (google-research instruction_following_eval, identical in OC and lm-eval)

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
        langdetect.DetectorFactory.seed = 0  # deterministic detection, as the reference harnesses seed it
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
              "(graders.py DEVIATION 7); the result file records it as ifeval_fallback_used.", file=sys.stderr)
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


def _by_distinctive_letters(script: str, text: str) -> str:
    """Cyrillic: Ukrainian / Russian / Bulgarian; Arabic script: Urdu / Persian / Arabic."""
    if script == "cyrillic":
        if re.search("[іїєґ]", text.lower()):
            return "uk"
        if re.search("[ыэё]", text.lower()):
            return "ru"
        return "bg" if text.lower().count("ъ") > 0 else "ru"
    if re.search("[ٹڈڑںےھ]", text):
        return "ur"
    if re.search("[پچژگکی]", text):
        return "fa"
    return "ar"


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
    if script in ("cyrillic", "arabic"):
        return _by_distinctive_letters(script, text)
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


def count_placeholders(r: str) -> int:  # note c (same result, linear time)
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


def find_titles(r: str) -> list[str]:  # note c (same result, linear time)
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


def count_line_marks(r: str, mark: str) -> int:  # note c (same result, linear time)
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


def _english(r: str) -> bool:
    lang = detect_language(r)
    return lang is None or lang == "en"


# instruction id -> (response, **kwargs) -> bool; the reference's checker of the same name
IFEVAL_CHECKERS = {
    "keywords:existence": lambda r, keywords: all(                                       # DEVIATION 8
        re.search(re.escape(k), r, flags=re.IGNORECASE) for k in keywords),
    "keywords:frequency": lambda r, keyword, frequency, relation: _compare(   # the keyword is stripped
        len(re.findall(re.escape(keyword.strip()), r, flags=re.IGNORECASE)), relation, frequency,
        "keywords:frequency"),
    "keywords:forbidden_words": lambda r, forbidden_words: not any(
        re.search(r"\b" + re.escape(w) + r"\b", r, flags=re.IGNORECASE) for w in forbidden_words),
    "keywords:letter_frequency": lambda r, letter, let_frequency, let_relation: (
        Counter(r.lower())[letter.lower()] < let_frequency if let_relation == "less than"
        else Counter(r.lower())[letter.lower()] >= let_frequency),
    "language:response_language": lambda r, language: (lambda lang: True if lang is None else lang == language)(
        detect_language(r)),
    "length_constraints:number_sentences": lambda r, num_sentences, relation: _compare(
        count_sentences(r), relation, num_sentences, "number_sentences"),
    "length_constraints:number_paragraphs": _chk_num_paragraphs,
    "length_constraints:number_words": lambda r, num_words, relation: _compare(
        len(re.findall(r"\w+", r)), relation, num_words, "number_words"),
    "length_constraints:nth_paragraph_first_word": _chk_nth_paragraph_first_word,
    "detectable_content:number_placeholders": lambda r, num_placeholders: count_placeholders(r) >= num_placeholders,
    "detectable_content:postscript": _chk_postscript,
    "detectable_format:number_bullet_lists": _chk_bullets,
    "detectable_format:constrained_response": lambda r: any(
        c in r.strip() for c in ("My answer is yes.", "My answer is no.", "My answer is maybe.")),
    "detectable_format:number_highlighted_sections": lambda r, num_highlights: (
        sum(1 for h in re.findall(r"\*[^\n\*]*\*", r) if h.strip("*").strip())
        + sum(1 for h in re.findall(r"\*\*[^\n\*]*\*\*", r) if h[2:-2].strip())) >= num_highlights,
    "detectable_format:multiple_sections": _chk_sections,
    "detectable_format:json_format": _chk_json,
    "detectable_format:title": lambda r: any(t.lstrip("<").rstrip(">").strip() for t in find_titles(r)),
    "combination:two_responses": _chk_two_responses,
    "combination:repeat_prompt": lambda r, prompt_to_repeat: r.strip().lower().startswith(
        prompt_to_repeat.strip().lower()),
    "startend:end_checker": lambda r, end_phrase: r.strip().strip('"').lower().endswith(end_phrase.strip().lower()),
    "startend:quotation": lambda r: len(r.strip()) > 1 and r.strip()[0] == '"' and r.strip()[-1] == '"',
    "change_case:capital_word_frequency": lambda r, capital_frequency, capital_relation: _compare(
        sum(1 for w in word_tokenize(r) if w.isupper()), capital_relation, capital_frequency,
        "capital_word_frequency"),
    "change_case:english_capital": lambda r: _english(r) and r.isupper(),     # detection runs first, as
    "change_case:english_lowercase": lambda r: _english(r) and r.islower(),   # in the reference
    "punctuation:no_comma": lambda r: "," not in r,
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
    if len(str(response)) > MAX_IFEVAL_CHARS:                  # note d
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

def _ifeval_strict_fraction(item: dict, response: str) -> float:
    slots = ifeval_slots(item, response)
    return sum(s["strict"] for s in slots) / max(1, len(slots))


# item["scorer"] -> (item, response) -> score; a new kind of answer is one entry here
SCORERS = {
    "math": lambda item, r: grade_math(r, item.get("gold")),
    "choice": lambda item, r: grade_choice(r, item.get("gold"), item.get("options", "ABCDE")),  # last letter
    "bbh": lambda item, r: grade_bbh(r, item.get("gold"), item.get("subtask")),     # extraction + exact match
    "nq": lambda item, r: nq_contains(r, item.get("gold")),                          # the paper's containment
    "ifeval": _ifeval_strict_fraction,                   # fraction of instructions followed (strict)
}


def score_item(item: dict, response: str) -> float:
    """Score one response to one item in [0, 1], dispatching on item["scorer"] (see SCORERS)."""
    scorer = item.get("scorer")
    if scorer not in SCORERS:
        raise ValueError(f"item {item.get('id')!r}: unknown scorer {scorer!r}; expected one of {tuple(SCORERS)}")
    return float(SCORERS[scorer](item, response))
