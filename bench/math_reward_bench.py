#!/usr/bin/env python3
"""Benchmark (not a test): the math reward on 10,000 responses, this CPU. Two mixes: GSM8K-like integer answers
(the fast path, no sympy) and one where a fifth of the answers are LaTeX (fractions, roots) that go through
math-verify in the worker processes. Prints seconds and responses/s for each.

    python bench/math_reward_bench.py [--n 10000] [--workers 2]
"""

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import rewards  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=10000)
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args()
    rng = random.Random(0)
    golds = [str(rng.randint(1, 500)) for _ in range(args.n)]
    integer = [
        f"Step 1: ... so she has {g if rng.random() < 0.5 else int(g) + 1} apples.\n#### {g if rng.random() < 0.5 else int(g) + 1}"
        for g in golds
    ]
    latex = [
        f"so the answer is \\boxed{{\\frac{{{2 * int(g)}}}{{2}}}}" if i % 5 == 0 else r for i, (g, r) in enumerate(zip(golds, integer))
    ]
    reward = rewards.make_reward({"type": "math", "workers": args.workers})
    out = {"n": args.n, "workers": args.workers}
    for name, responses in (("integers", integer), ("a fifth LaTeX", latex)):
        start = time.perf_counter()
        scores = reward.scores(responses, golds)
        seconds = time.perf_counter() - start
        out[name] = {
            "seconds": round(seconds, 2),
            "responses_per_s": round(args.n / seconds),
            "mean_score": round(sum(scores) / len(scores), 3),
        }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
