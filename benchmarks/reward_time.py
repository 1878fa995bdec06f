"""Reward seconds per round: math-verify called in-process on every completion (the design before the worker pool,
without its SIGALRM wrapper) vs ``utils.llm_task.math_rewards`` (pre-screen, integer fast path, worker processes).

    python benchmarks/reward_time.py

Two synthetic rounds of 16 prompts x 8 completions: the built-in task's style (boxed integers, some wrong, some
unboxed) and LaTeX fractions (every check goes to math-verify). Prints the pool's start-up time, then ms per round
and whether the rewards agree."""

import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from utils.llm_task import _verify_in_process, last_boxed, math_rewards  # noqa: E402


def in_process(completions: list, golds: list) -> list:
    out = []
    for c, g in zip(completions, golds):
        b = last_boxed(c)
        out.append(_verify_in_process(g, b) if b and b.strip() else 0.0)
    return out


def main() -> None:
    t = time.perf_counter()
    math_rewards(["\\boxed{0.5}"], ["1/2"])  # the first check that needs math-verify starts the worker pool
    print(f"worker pool start + first check: {(time.perf_counter() - t) * 1e3:.0f} ms (once per process)")
    rng = random.Random(0)
    golds = [str(rng.randint(1, 999)) for _ in range(128)]
    ints = []
    for g in golds:
        r = rng.random()
        ints.append(f" 3+4=7. The answer is \\boxed{{{g if r < .4 else int(g) + 1}}}." if r < .6 else " 7")
    fracs = ["\\boxed{\\frac{%d}{%d}}" % (rng.randint(1, 9), rng.randint(2, 9)) for _ in range(128)]
    fgolds = ["%d/%d" % (rng.randint(1, 9), rng.randint(2, 9)) for _ in range(128)]
    for name, c, g in (("built-in style (integers)", ints, golds), ("LaTeX fractions", fracs, fgolds)):
        in_process(c[:4], g[:4])
        math_rewards(c[:4], g[:4])  # warm-up: imports, worker start
        t = time.perf_counter()
        a = in_process(c, g)
        t_old = time.perf_counter() - t
        t = time.perf_counter()
        b = math_rewards(c, g)
        t_new = time.perf_counter() - t
        print(f"{name}: in-process {t_old * 1e3:.1f} ms/round, math_rewards {t_new * 1e3:.1f} ms/round, "
              f"same rewards: {a == b}")


if __name__ == "__main__":
    main()
