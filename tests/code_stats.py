"""Size and shape of the product code, the figures issue "Minimal again" sets bars on.

    python tests/code_stats.py            # the table and the verdict for each bar
    python tests/code_stats.py --strict   # exit 1 if a bar is missed

Counts, for every top-level `.py` file: non-blank lines, comment + docstring lines per code line
(a trailing `# ...` after code counts the line as code), every function longer than 80 lines and
every function whose cyclomatic complexity is over 25. The complexity is McCabe's number counted
as radon counts it (1 + one per if/elif/for/while/except/ternary/assert/comprehension-if and per
extra operand of `and`/`or`); `radon cc` is the independent check where radon is installed.
"""
import argparse
import ast
import io
import sys
import tokenize
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PAPER_FACING = ("peft_methods.py", "train_sft.py", "train_grpo.py", "evaluate.py", "geometry.py",
                "rewind.py", "arena.py")
BARS = {"total": 7000, "paper_facing": 5000, "max_function_lines": 80, "max_complexity": 25,
        "min_comment_ratio": 0.4}


def complexity(fn: ast.AST) -> int:
    """McCabe complexity of one function body, nested functions excluded (radon's rule)."""
    n = 1
    stack = list(ast.iter_child_nodes(fn))
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
            continue
        if isinstance(node, (ast.If, ast.IfExp, ast.Assert)):
            n += 1
        elif isinstance(node, (ast.For, ast.AsyncFor, ast.While)):
            n += 1 + bool(node.orelse)
        elif isinstance(node, ast.Try):
            n += len(node.handlers) + bool(node.orelse)
        elif isinstance(node, ast.BoolOp):
            n += len(node.values) - 1
        elif isinstance(node, ast.comprehension):
            n += 1 + len(node.ifs)
        elif isinstance(node, ast.match_case):
            n += 1
        stack.extend(ast.iter_child_nodes(node))
    return n


def _docstring_lines(tree: ast.AST) -> set[int]:
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None),
                                                                     ast.Constant) \
                    and isinstance(body[0].value.value, str):
                lines.update(range(body[0].lineno, body[0].end_lineno + 1))
    return lines


def file_stats(path: Path) -> dict:
    text = path.read_text()
    tree = ast.parse(text)
    doc = _docstring_lines(tree)
    code_lines, comment_only = set(), set()
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type == tokenize.COMMENT:
            comment_only.add(tok.start[0])
        elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
                              tokenize.ENDMARKER):
            code_lines.update(range(tok.start[0], tok.end[0] + 1))
    code = code_lines - doc
    comments = (comment_only - code) | doc
    nonblank = sum(1 for ln in text.splitlines() if ln.strip())
    long_fns, complex_fns = [], []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            if length > BARS["max_function_lines"]:
                long_fns.append((node.name, length))
            cc = complexity(node)
            if cc > BARS["max_complexity"]:
                complex_fns.append((node.name, cc))
    return {"nonblank": nonblank, "code": len(code), "comments": len(comments),
            "long": long_fns, "complex": complex_fns}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--strict", action="store_true", help="exit 1 if a bar is missed")
    args = ap.parse_args(argv)
    stats = {p.name: file_stats(p) for p in sorted(REPO.glob("*.py"))}
    print(f"{'file':<18}{'non-blank':>10}{'code':>7}{'comment':>8}{'ratio':>7}  over the bars")
    for name, s in stats.items():
        over = [f"{f} {n} lines" for f, n in s["long"]] + [f"{f} cc {c}" for f, c in s["complex"]]
        ratio = s["comments"] / max(s["code"], 1)
        print(f"{name:<18}{s['nonblank']:>10}{s['code']:>7}{s['comments']:>8}{ratio:>7.2f}  "
              + "; ".join(over))
    total = sum(s["nonblank"] for s in stats.values())
    pf = [stats[n] for n in PAPER_FACING if n in stats]
    pf_lines = sum(s["nonblank"] for s in pf)
    pf_ratio = sum(s["comments"] for s in pf) / max(sum(s["code"] for s in pf), 1)
    n_long = sum(len(s["long"]) for s in stats.values())
    n_complex = sum(len(s["complex"]) for s in stats.values())
    checks = [("non-blank lines, all files", total, total <= BARS["total"], f"<= {BARS['total']}"),
              ("non-blank lines, paper-facing", pf_lines, pf_lines <= BARS["paper_facing"],
               f"<= {BARS['paper_facing']}"),
              ("functions over 80 lines", n_long, n_long == 0, "0"),
              ("functions with complexity over 25", n_complex, n_complex == 0, "0"),
              ("comment lines per code line, paper-facing", f"{pf_ratio:.2f}",
               pf_ratio >= BARS["min_comment_ratio"], f">= {BARS['min_comment_ratio']}")]
    print()
    for what, value, ok, bar in checks:
        print(f"{what:<44}{value!s:>8}  bar {bar:<8} {'ok' if ok else 'MISSED'}")
    return 1 if args.strict and not all(c[2] for c in checks) else 0


if __name__ == "__main__":
    sys.exit(main())
