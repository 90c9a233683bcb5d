#!/usr/bin/env python3
"""The split experiment's GRPO row at two checkouts, side by side on one machine (not a test): the update's time per
update (median over the run's 24 updates: time/update_s and its parts), the tokens it ran against those that carry
signal (perf/update_tokens / perf/useful_tokens, where the checkout logs them), the held-out pass@1 before and after,
and the whole run's minutes. The runs are bench/split_experiment.py's own, taken in turn:

    git worktree add --detach /tmp/base 62afaa3 && ln -s "$PWD/.venv" /tmp/base/.venv
    (cd /tmp/base && HYBRID_TRAINER_CACHE=/tmp/cache-base python bench/split_experiment.py --only grpo --seeds 0)
    HYBRID_TRAINER_CACHE=/tmp/cache-new python bench/split_experiment.py --only grpo --seeds 0
    python bench/goals.py --add 62afaa3 /tmp/base/runs/split/grpo-s0 --add "this checkout" runs/split/grpo-s0
    python bench/goals.py --table

Each --add copies the run's metrics.jsonl and config.json into bench/results/goals/ and appends its medians to
bench/results/goals/results.jsonl with the machine (a fresh cache directory each: each checkout probes bf16 itself).
"""

import argparse
import json
import re
import shutil
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from peer_bench import machine  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "goals"
TIMES = ("update_s", "ppo_epochs_s", "reference_forward_s", "rollout_s", "generate_s")


def summary(label: str, run: Path) -> dict:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    updates, evals = [r for r in rows if r.get("phase") == "ppo"], [r for r in rows if r.get("phase") == "eval"]
    counted = [r for r in updates if "perf/update_tokens" in r]
    tokens = {}
    if counted:
        ran, useful = (statistics.mean(r[k] for r in counted) for k in ("perf/update_tokens", "perf/useful_tokens"))
        tokens = {"update_tokens": round(ran), "useful_tokens": round(useful), "ratio": round(ran / useful, 3)}
    plan = json.loads((run / "plan.json").read_text()) if (run / "plan.json").is_file() else {}
    return {
        "label": label,
        "updates": len(updates),
        **{k: round(statistics.median(r[f"time/{k}"] for r in updates), 2) for k in TIMES},
        "update_s_total": round(sum(r["time/update_s"] for r in updates), 1),
        **tokens,
        "pass@1": [evals[0]["eval/pass@1"], evals[-1]["eval/pass@1"]],
        "precision": plan.get("precision", ""),
        "machine": machine(),
    }


def table() -> str:
    rows = [json.loads(line) for line in (RESULTS / "results.jsonl").read_text().splitlines()]
    out = [
        "| checkout | update (s, median) | PPO epochs | reference | step 4 (no-grad passes) | generation | update tokens / useful | "
        "held-out pass@1 before -> after | precision |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = f"{r['update_tokens']} / {r['useful_tokens']} = {r['ratio']}" if "ratio" in r else "not logged"
        out.append(
            f"| {r['label']} | {r['update_s']} | {r['ppo_epochs_s']} | {r['reference_forward_s']} | {r['rollout_s']} | "
            f"{r['generate_s']} | {ratio} | {r['pass@1'][0]} -> {r['pass@1'][1]} | {r['precision'].split(':')[0]} |"
        )
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--add", nargs=2, action="append", default=[], metavar=("LABEL", "RUN_DIR"))
    p.add_argument("--table", action="store_true")
    args = p.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    for label, run in args.add:
        result = summary(label, Path(run))
        slug = re.sub(r"[^A-Za-z0-9]+", "_", label).strip("_")
        for name in ("metrics.jsonl", "config.json"):
            shutil.copy(Path(run) / name, RESULTS / f"split_grpo-{slug}.{name}")
        with (RESULTS / "results.jsonl").open("a") as f:
            f.write(json.dumps(result) + "\n")
        print(json.dumps(result))
    print(table())


if __name__ == "__main__":
    main()
