#!/usr/bin/env python3
"""The memory a vLLM run holds against the same run with hf (not a test): the split experiment's GRPO row
(bench/split_experiment.py) shortened to 3 updates, no evaluation, BF16 auto, each case in a fresh process: its peak
resident memory (ru_maxrss), and what the engine said it added at start (its copy of the weights, its KV cache, its
worker).

    python bench/vllm_memory.py                       # hf, vllm (KV cache sized from the rollout), vllm with 1 GiB
    python bench/vllm_memory.py --table               # -> bench/results/memory/vllm.jsonl
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import peer_bench  # noqa: E402
import split_experiment as split  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "memory" / "vllm.jsonl"
JOB = {**split.COMMON, **split.VARIANTS["grpo"], "NUM_SAMPLES": 12, "EVAL_FILE": "", "LOG_EVERY": 1, "SAVE_EVERY": 0}
JOB.pop("VLLM_KV_CACHE_GB", None)
CASES = {
    "hf": {"GENERATION_BACKEND": "hf"},
    "vllm, KV cache from the rollout": {"GENERATION_BACKEND": "vllm"},
    "vllm, KV cache 1 GiB": {"GENERATION_BACKEND": "vllm", "VLLM_KV_CACHE_GB": 1.0},
}
RUN = """
import resource, sys
sys.path.insert(0, {root!r})
import hybrid_trainer as ht
code = ht.main([{config!r}])
print("PEAK", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, flush=True)
"""


def measure(case: str, extra: dict) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "config.json"
        config.write_text(json.dumps({**JOB, **extra, "OUTPUT_DIR": str(Path(tmp) / "out")}))
        proc = subprocess.run(
            [sys.executable, "-c", RUN.format(root=str(ROOT), config=str(config))],
            capture_output=True,
            text=True,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
        if proc.returncode:
            raise SystemExit(proc.stderr[-3000:])
    peak = int(re.search(r"^PEAK (\d+)", proc.stdout, re.M).group(1))
    engine = re.search(r"^vllm engine: (.*)$", proc.stdout, re.M)
    return {"case": case, "peak_gib": round(peak / 2**30, 2), "engine": engine.group(1) if engine else None}


def table() -> str:
    rows = [json.loads(line) for line in RESULTS.read_text().splitlines()]
    out = ["| case | peak resident (GiB) | the engine at start | machine |", "|---|---|---|---|"]
    out += [f"| {r['case']} | {r['peak_gib']} | {r['engine'] or '-'} | {r['machine'][:40]} |" for r in rows]
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--table", action="store_true")
    args = p.parse_args()
    if not args.table:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        for case, extra in CASES.items():
            result = {**measure(case, extra), "machine": peer_bench.machine()}
            print(json.dumps(result), flush=True)
            with RESULTS.open("a") as f:
                f.write(json.dumps(result) + "\n")
    print(table())


if __name__ == "__main__":
    main()
