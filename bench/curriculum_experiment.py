#!/usr/bin/env python3
"""docs/experiments.md's curriculum experiment (not a test): GRPO on reasoning-gym's chain_sum (the task where
bench/rg_probe.py found SmolLM2-135M-Instruct's signal: pass@8 0.50 at level 0, 0.04 at level 1) at a fixed difficulty
against GRPO with CURRICULUM, every row on the same budget: 24 updates of 4 prompts x 8 responses (768 sampled
responses, 48 optimizer steps), the split experiment's GRPO settings (LR 1e-5, KL 0.04 in the loss), hf generation.

    fixed0      TASK_CONFIG level 0 (2 terms, 1 digit) for the whole run
    fixed1      level 1 (reasoning-gym's inclusive range: 2-3 terms, 1-2 digits)
    curriculum  from level 0, one level up when the training pass rate of the last 3 updates is above 0.5, down
                below 0.1

Held out: 40 problems at each of levels 0, 1 and 2 (seeds no training row uses), greedy, before and after; pass@1 per
level from the final evaluation's samples, and the level of each update.

    python bench/curriculum_experiment.py --rows fixed0,fixed1,curriculum --seeds 0,1,2  # -> bench/results/curriculum/
    python bench/curriculum_experiment.py --table
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import split_experiment as split  # noqa: E402 - the GRPO settings this experiment shares

OUT = ROOT / "runs" / "curriculum"
RESULTS = ROOT / "bench" / "results" / "curriculum"
LEVELS = (0, 1, 2)
# the split experiment's GRPO row (its sampling, GRPO and KL settings), on the task: the reward, 32 new tokens, the
# held-out levels greedy, hf generation; its SFT, vLLM and file keys do not apply here
COMMON = {
    **{k: v for k, v in split.COMMON.items() if not k.startswith(("SFT_", "LR_SFT", "VLLM_", "EVAL_", "CATEGORY_"))},
    "MODE": "ppo",
    "TRAIN_FILE": "reasoning_gym:chain_sum",
    "MAX_NEW_TOKENS": 32,
    "REWARD": {"type": "reasoning_gym"},
    "CATEGORY_FIELD": "level",
    "EVAL_SAMPLES": 40 * len(LEVELS),
    "EVAL_NUM_SAMPLES": 1,
    "GENERATION_BACKEND": "hf",
}
ROWS = {
    "fixed0": {"TASK_CONFIG": {"size": 96, "level": 0}},
    "fixed1": {"TASK_CONFIG": {"size": 96, "level": 1}},
    "curriculum": {"TASK_CONFIG": {"size": 96}, "CURRICULUM": {"start": 0, "raise_above": 0.5, "lower_below": 0.1, "window": 3}},
}


def eval_file() -> Path:
    """The held-out set: 40 rows at each level, from the held-out seeds (runtime.task_rows), a "level" column."""
    import runtime

    path = OUT / "eval_levels.jsonl"
    rows = []
    for level in LEVELS:
        task = runtime.make_task("reasoning_gym:chain_sum", {"eval_size": 40, "level": level}, "eval")
        rows += [{**row, "level": level} for row in runtime.task_rows(task, "eval", held_out=True)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run(row: str, seed: int, evals: Path) -> dict:
    out = OUT / f"{row}-seed{seed}"
    cfg = {**COMMON, **ROWS[row], "SEED": seed, "EVAL_FILE": str(evals), "OUTPUT_DIR": str(out), "RESUME": False}
    cfg["TASK_CONFIG"] = {**cfg["TASK_CONFIG"], "seed": seed}
    out.mkdir(parents=True, exist_ok=True)
    (out.parent / f"{row}-seed{seed}.json").write_text(json.dumps(cfg, indent=2))
    start = time.time()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, str(ROOT / "hybrid_trainer.py"), str(out.parent / f"{row}-seed{seed}.json")], check=True, env=env)
    minutes = (time.time() - start) / 60
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals_ = [r for r in records if r.get("phase") == "eval"]

    def per_level(record: dict) -> dict:
        by = {}
        for s in record["samples"]:
            by.setdefault(str(s["category"]), []).append(s["reward"] >= 1.0)
        return {level: round(sum(v) / len(v), 4) for level, v in sorted(by.items())}

    ppo = [r for r in records if r.get("phase") == "ppo"]
    result = {
        "row": row,
        "seed": seed,
        "before": per_level(evals_[0]),
        "after": per_level(evals_[-1]),
        "levels": [r.get("curriculum/level", ROWS[row]["TASK_CONFIG"].get("level", 0)) for r in ppo],
        "train_pass_rate": [round(r["reward/pass_rate"], 4) for r in ppo],
        "zero_std_groups": round(statistics.mean(r["reward/zero_std_groups"] for r in ppo if "reward/zero_std_groups" in r), 4),
        "minutes": round(minutes, 1),
        "machine": os.uname().machine,
    }
    for path in (out / "inference_lm", out / "ppo_full"):
        subprocess.run(["rm", "-rf", str(path)], check=False)
    return result


def table() -> str:
    results = [json.loads(line) for line in (RESULTS / "results.jsonl").read_text().splitlines()]
    lines = [
        "| row | seeds | pass@1 level 0 | level 1 | level 2 | levels visited | zero-std groups | minutes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in ROWS:
        rs = [r for r in results if r["row"] == row]
        if not rs:
            continue

        def cell(level: str, rs: list = rs) -> str:
            v = [r["after"][level] for r in rs]
            before = statistics.mean(r["before"][level] for r in rs)
            spread = f" ± {statistics.stdev(v):.3f}" if len(v) > 1 else ""
            return f"{before:.3f} → {statistics.mean(v):.3f}{spread}"

        visited = sorted({lv for r in rs for lv in r["levels"]})
        zero = statistics.mean(r["zero_std_groups"] for r in rs)
        minutes = statistics.mean(r["minutes"] for r in rs)
        lines.append(f"| {row} | {len(rs)} | {cell('0')} | {cell('1')} | {cell('2')} | {visited} | {zero:.2f} | {minutes:.1f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default=",".join(ROWS))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--table", action="store_true")
    args = p.parse_args()
    if args.table:
        print(table())
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    evals = eval_file()
    for seed in map(int, args.seeds.split(",")):
        for row in args.rows.split(","):
            result = run(row, seed, evals)
            print(json.dumps(result), flush=True)
            with (RESULTS / "results.jsonl").open("a") as f:
                f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
