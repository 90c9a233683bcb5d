#!/usr/bin/env python3
"""The work an update does that carries no signal (not a test): the tokens its forwards and backwards run (perf/update_tokens:
padding and each prompt G times included) against those that carry signal (perf/useful_tokens: real tokens, each
prompt once per group), per update, with the PPO epochs' and the reference's seconds, on four jobs at their own
settings, shortened to a few updates (no evaluation, fp32, hf generation: the counts do not depend on the engine, only
on what is sampled; the same seed samples the same responses with PACKING on and off up to float rounding):

    split_grpo       the split experiment's GRPO row (bench/split_experiment.py)
    split_alternate  its alternate row (SFT steps between the updates; the updates counted)
    peer_grpo        the peer GRPO job (bench/peer_bench.py, ours)
    sketch_ppo       the design sketch's PPO job (bench/sketch_bench.py, ours)

    python bench/token_waste.py --label padded --set PACKING=false   # appends to bench/results/tokens/results.jsonl
    python bench/token_waste.py --label packed
    python bench/token_waste.py --only peer_grpo --label "zero-advantage rows run" --set SKIP_ZERO_ADVANTAGE=false
    python bench/token_waste.py --table
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import peer_bench  # noqa: E402
import sketch_bench  # noqa: E402
import split_experiment as split  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "tokens"
SHORT = {"EVAL_FILE": "", "GENERATION_BACKEND": "hf", "LOG_EVERY": 1, "SAVE_EVERY": 0, "EPOCHS": 1, "SEED": 0, "BF16": False}
JOBS = {
    "split_grpo": {**split.COMMON, **split.VARIANTS["grpo"], "NUM_SAMPLES": 12},
    "split_alternate": {**split.COMMON, **split.VARIANTS["alternate"], "NUM_SAMPLES": 12},
    "peer_grpo": {**peer_bench.OURS, "NUM_SAMPLES": 12},
    "sketch_ppo": {**sketch_bench.JOB, "NUM_SAMPLES": 24},
}


def measure(name: str, config: dict, extra: dict) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.json"
        path.write_text(json.dumps({**config, **SHORT, **extra, "OUTPUT_DIR": str(Path(tmp) / "out")}))
        subprocess.run(
            [sys.executable, str(ROOT / "hybrid_trainer.py"), str(path)],
            check=True,
            env={"HF_HUB_OFFLINE": "1", **dict(__import__("os").environ)},
        )
        rows = [json.loads(line) for line in (Path(tmp) / "out" / "metrics.jsonl").read_text().splitlines()]
    updates = [r for r in rows if "perf/update_tokens" in r]
    ran = statistics.mean(r["perf/update_tokens"] for r in updates)
    useful = statistics.mean(r["perf/useful_tokens"] for r in updates)
    return {
        "job": name,
        "updates": len(updates),
        "update_tokens": round(ran),
        "useful_tokens": round(useful),
        "ratio": round(ran / useful, 3),
        "skipped_responses": round(statistics.mean(r.get("perf/skipped_responses", 0) for r in updates), 2),
        **{k: round(statistics.median(r[f"time/{k}"] for r in updates), 2) for k in ("ppo_epochs_s", "reference_forward_s", "update_s")},
    }


def table() -> str:
    rows = [json.loads(line) for line in (RESULTS / "results.jsonl").read_text().splitlines()]
    out = [
        "| job | label | updates | perf/update_tokens per update | perf/useful_tokens | ratio | PPO epochs (s, median) "
        "| reference (s) | update (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    out += [
        f"| {r['job']} | {r['label']} | {r['updates']} | {r['update_tokens']} | {r['useful_tokens']} | {r['ratio']} | "
        f"{r['ppo_epochs_s']} | {r['reference_forward_s']} | {r['update_s']} |"
        for r in rows
    ]
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--label", default="", help="what this checkout is (before / after ...)")
    p.add_argument("--only", default="", help="comma-separated jobs: " + ", ".join(JOBS))
    p.add_argument("--set", action="append", default=[], help="KEY=JSON config overrides for every job")
    p.add_argument("--table", action="store_true")
    args = p.parse_args()
    if not args.table:
        RESULTS.mkdir(parents=True, exist_ok=True)
        for name in args.only.split(",") if args.only else JOBS:
            extra = {k: json.loads(v) for k, v in (s.split("=", 1) for s in args.set)}
            result = {**measure(name, JOBS[name], extra), "label": args.label, "machine": peer_bench.machine()}
            with (RESULTS / "results.jsonl").open("a") as f:
                f.write(json.dumps(result) + "\n")
            print(json.dumps(result), flush=True)
    print(table())


if __name__ == "__main__":
    main()
