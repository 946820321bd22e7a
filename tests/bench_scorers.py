"""Throughput of the math scorer and the cost of its hard time limit (issue 15).

A realistic mix of MATH-500-style (prediction, gold) pairs: a third settle by string equality,
a third by the numeric branch, a third reach the symbolic step (equivalent and wrong forms of
fractions, roots, polynomials, tuples, intervals, matrices, equations). Each pair is graded with
`grade_math` (the enforced limit: sympy work in the killable worker process) and with the
limit switched off (timeout_s=None: the same comparison in this process, no worker). A hanging
comparison is timed separately.

Run: OMP_NUM_THREADS=1 python tests/bench_scorers.py [--repeat 3]
"""
import argparse
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import graders as gr  # noqa: E402

STRING = [("\\boxed{%d}" % n, str(n)) for n in (3, 17, 204, 1000, 25)] + [
    (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"), (r"\boxed{\sqrt{2}}", r"\sqrt{2}"),
    (r"\boxed{\text{(C)}}", r"\text{(C)}"), (r"\boxed{2\pi}", r"2\pi"), (r"\boxed{x^2+1}", "x^2+1")]
NUMERIC = [(r"\boxed{0.5}", r"\frac12"), (r"\boxed{27}", "27.0"), (r"\boxed{25}", "025"),
           (r"\boxed{1,000}", "1000"), (r"\boxed{50\%}", "0.5"), (r"\boxed{12}", "13"),
           (r"\boxed{3.14}", "3.1416"), (r"\boxed{-4}", "4"), (r"\boxed{7}", "7.000"),
           (r"\boxed{0.25}", r"\dfrac{1}{4}")]
SYMBOLIC = [(r"\boxed{x^2+2x+1}", "(x+1)^2"), (r"\boxed{\frac{\sqrt{3}}{2}}", r"\frac{1}{2}\sqrt{3}"),
            (r"\boxed{2\sqrt{2}}", r"\sqrt{8}"), (r"\boxed{(3,\frac{\pi}{2})}", r"\left( 3, \frac{\pi}{2} \right)"),
            (r"\boxed{[0,1)}", "[0,1)"), (r"\boxed{y=2x+1}", "y = 1 + 2x"),
            (r"\boxed{\begin{pmatrix}1\\2\end{pmatrix}}", r"\begin{pmatrix}1\\2\end{pmatrix}"),
            (r"\boxed{\frac{x+1}{x}}", r"1+\frac{1}{x}"), (r"\boxed{x^2-1}", "(x-1)(x+2)"),
            (r"\boxed{\sqrt{2}+1}", r"\frac{1}{\sqrt{2}-1}")]
HANG = r"\boxed{\sin^{999}(x)+\cos^{999}(x)}"


def _rate(pairs, repeat, timeout_s):
    t0 = time.perf_counter()
    n = 0
    for _ in range(repeat):
        for pred, gold in pairs:
            gr.grade_math(pred, gold, timeout_s=timeout_s)
            n += 1
    dt = time.perf_counter() - t0
    return n / dt, 1000 * dt / n


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    gr.symbolic_pool().start()
    start_s = time.perf_counter() - t0
    gr._warm_sympy()
    mix = STRING + NUMERIC + SYMBOLIC
    print(f"# {platform.node()} {platform.machine()} {os.cpu_count()} CPUs, python "
          f"{platform.python_version()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"worker start-up (once per process, outside every clock): {start_s:.2f} s")
    print(f"{'set':<10} {'pairs':>5} {'limit':<22} {'items/s':>9} {'ms/item':>8}")
    for name, pairs in (("string", STRING), ("numeric", NUMERIC), ("symbolic", SYMBOLIC), ("mix", mix)):
        for label, t in (("enforced 3 s (worker)", 3.0), ("none (in-process)", None)):
            rate, ms = _rate(pairs, args.repeat, t)
            print(f"{name:<10} {len(pairs):>5} {label:<22} {rate:>9.1f} {ms:>8.2f}")
    t1 = time.perf_counter()
    gr.grade_math(HANG, "1")
    print(f"hanging comparison (sin^999 + cos^999 vs 1): returns after {time.perf_counter() - t1:.2f} s "
          f"(limit 3 s), pool stats {dict(gr.symbolic_pool().stats)}")


if __name__ == "__main__":
    main()
