#!/usr/bin/env python3
"""Where a PPO update's time goes without instrumenting it (not a test): Linux `perf record` samples both cores while
step_bench's PPO update (SmolLM2-135M, 8 responses, PPO_EPOCHS 4, one minibatch) repeats, after two warm-ups, and the
samples are grouped by the function they landed in. torch.profiler times each operator from the Python side, and on a
2-core Xeon with AMX it charged a 113 MB fill or cast of the tied embedding's gradient 170-200 ms in four steps of
five, where the same operator took 7-8 ms uninstrumented; sampling leaves the run as it is.

    python bench/perf_breakdown.py                  # bf16 (default), 10 s of samples
    python bench/perf_breakdown.py --dtype fp32 --seconds 20

Needs `perf` (Debian: linux-perf) and perf_event_paranoid <= 1 (or root). Shares are of all samples on both cores:
"OpenMP wait" is the second thread spinning between parallel regions while the first runs Python or serial work.
"""

import argparse
import collections
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CATEGORIES = [  # (name, pattern on the symbol or the library): the first that matches
    ("bf16 matmul (oneDNN JIT kernels)", r"^\[JIT\]|dnnl|brgemm"),
    ("fp32 matmul (MKL sgemm)", r"sgemm|mkl_blas"),
    ("casts (fp32 <-> bf16)", r"reduced_float_copy|convert|_to_copy"),
    ("fused AdamW", r"adam"),
    ("attention kernel", r"flash_attention|sdpa"),
    ("norms and reductions", r"norm_kernel|reduce|sum_kernel|mean_kernel"),
    ("elementwise mul / add / fill", r"mul_kernel|add_kernel|fill_kernel|VectorizedLoop2d|vectorized_loop"),
    ("exp / log (softmax, silu)", r"Sleef|softmax|silu"),
    ("malloc / free", r"malloc|free|unlink_chunk|consolidate|memalign"),
    ("OpenMP wait", r"libgomp"),
    ("Python", r"libpython|_PyEval|^_Py"),
    ("kernel (page faults, syscalls)", r"^\[kernel\.kallsyms\]$"),  # the dso only: many symbols end in _kernel
]


def category(symbol: str, dso: str) -> str:
    for name, pattern in CATEGORIES:
        if re.search(pattern, symbol) or re.search(pattern, dso):
            return name
    return "other"


def child(dtype: str, ready: Path, seconds: float) -> None:
    """The measured process: warm-ups, then PPO updates until `seconds` have passed after `ready` is written."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import step_bench

    b = step_bench.setup(str(Path(__file__).resolve().parent.parent), {"BF16": dtype == "bf16"})
    for _ in range(2):
        step_bench.ppo_update(b, 0)
    ready.write_text("ready")
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds + 2:
        step_bench.ppo_update(b, 1)
        n += 1
    print(json.dumps({"updates": n, "seconds_per_update": round((time.perf_counter() - t0) / n, 3)}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args.dtype, Path(args.child), args.seconds)
    if shutil.which("perf") is None:
        sys.exit("perf_breakdown.py needs Linux perf (Debian: apt-get install linux-perf)")
    with tempfile.TemporaryDirectory() as tmp:
        ready, data = Path(tmp) / "ready", Path(tmp) / "perf.data"
        proc = subprocess.Popen(
            [sys.executable, __file__, "--dtype", args.dtype, "--seconds", str(args.seconds), "--child", str(ready)],
            stdout=subprocess.PIPE,
            text=True,
        )
        while not ready.exists():
            if proc.poll() is not None:
                sys.exit("the measured process ended before it was ready")
            time.sleep(0.2)
        subprocess.run(
            ["perf", "record", "-F", "499", "-p", str(proc.pid), "-o", str(data), "--", "sleep", str(args.seconds)],
            check=True,
            capture_output=True,
        )
        timing = json.loads(proc.communicate()[0].strip().splitlines()[-1])
        report = subprocess.run(
            ["perf", "report", "-i", str(data), "--no-children", "--sort", "dso,symbol", "-g", "none", "--stdio", "--percent-limit", "0"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    shares = collections.Counter()
    for line in report.splitlines():
        m = re.match(r"\s*([\d.]+)%\s+(\S+(?: tid \d+)?)\s+\[(.)\]\s+(.*)", line)
        if m:
            share, dso, where, symbol = float(m.group(1)), m.group(2), m.group(3), m.group(4)
            shares[category(symbol, "[kernel.kallsyms]" if where == "k" else dso)] += share
    print(f"\n{args.dtype} PPO update ({timing['seconds_per_update']} s each while sampled): share of samples\n")
    print("| where | share |\n|---|---|")
    for name, share in shares.most_common():
        print(f"| {name} | {share:.1f}% |")
    print(json.dumps({"dtype": args.dtype, **timing, "shares": {k: round(v, 2) for k, v in shares.most_common()}}))


if __name__ == "__main__":
    main()
