#!/usr/bin/env python3
"""docs/experiments.md's agents experiment (not a test): does the calculator help SmolLM2-135M-Instruct, and which training
teaches it to use it? Arithmetic it cannot do in its head (data/tool_*.json: 3-digit x 2-digit products, sums of three
numbers, a product minus a number), evaluated on 12 held-out problems with 8 samples each at temperature 1 (pass@1,
pass@8) before and after, at an equal budget per row: 8 optimizer steps on the same 32 training problems (SFT: 8 steps
of 4 demonstrations; GRPO: 8 updates of 4 prompts x 4 trajectories, one optimizer step each; alternate: 4 + 4).

    python bench/tool_experiment.py --base                    # only the untrained model (each row's "before" is too)
    python bench/tool_experiment.py --only tool_sft,grpo_env --seeds 0,1,2
    python bench/tool_experiment.py --table                   # the markdown table of everything run so far

Results append to bench/results/tool/results.jsonl, with each run's config and metrics beside it.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "runs" / "tool"
RESULTS = ROOT / "bench" / "results" / "tool"
COMMON = {
    "MODEL": "smollm2-135m-instruct",
    "PROMPT_FORMAT": "chat",
    "NUM_SAMPLES": 32,
    "EPOCHS": 1,
    "MAXSEQ": 384,
    "MAX_NEW_TOKENS": 48,
    "TEMPERATURE": 1.0,
    "TOP_P": 1.0,
    "REPETITION_PENALTY": 1.0,
    "NO_REPEAT_NGRAM_SIZE": 0,
    "REWARD": {"type": "math", "answer_field": "answer"},
    "CATEGORY_FIELD": "category",
    "EVAL_SAMPLES": 12,
    "EVAL_NUM_SAMPLES": 8,
    "EVAL_TEMPERATURE": 1.0,
    "LOG_EVERY": 2,
    "SAVE_EVERY": 0,
    "SFT_BATCH": 4,
    "LR_SFT": 2e-5,
    "ADVANTAGE": "grpo",
    "NUM_GENERATIONS": 4,
    "PPO_BATCH": 4,
    "PPO_MINI": 4,
    "PPO_EPOCHS": 1,
    "LR_PPO": 2e-5,
    "INIT_KL_COEF": 0.0,
    "BF16": False,
    "GENERATION_BACKEND": "vllm",
    "VLLM_KV_CACHE_GB": 1.0,
}
TOOL = {"TRAIN_FILE": "data/tool_train.json", "EVAL_FILE": "data/tool_eval.json", "ENVIRONMENT": {"type": "calculator"}, "MAX_TURNS": 3}
DIRECT = {"TRAIN_FILE": "data/direct_train.json", "EVAL_FILE": "data/direct_eval.json"}
VARIANTS = {
    "tool_sft": {**TOOL, "MODE": "sft"},  # SFT on the tool demonstrations (every assistant turn; observations masked)
    "grpo_env": {**TOOL, "MODE": "ppo"},  # GRPO with the calculator environment
    "alternate_env": {**TOOL, "MODE": "hybrid", "HYBRID": "alternate", "NUM_SAMPLES": 32},  # 1 SFT step, 1 update, ...
    "direct_sft": {**DIRECT, "MODE": "sft"},  # SFT without the tool: the model answers directly
}


def run(name: str, overrides: dict, seed: int, steps_only: bool = False) -> dict:
    out = OUT / f"{name}-s{seed}"
    cfg = {**COMMON, **overrides, "SEED": seed, "OUTPUT_DIR": str(out)}
    for key in ("TRAIN_FILE", "EVAL_FILE"):
        cfg[key] = str(ROOT / cfg[key])
    if name == "alternate_env":  # 16 items alternate: 4 SFT steps of 4, 4 updates of 4 prompts = 8 optimizer steps
        cfg["NUM_SAMPLES"] = 16
    subprocess.run(["rm", "-rf", str(out)], check=True)
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"{name}-s{seed}.json"
    path.write_text(json.dumps(cfg, indent=1))
    start = time.time()
    proc = subprocess.run(
        [sys.executable, str(ROOT / "hybrid_trainer.py"), str(path)],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    if proc.returncode:
        raise SystemExit(f"{name} seed {seed} failed:\n{proc.stderr[-3000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["phase"] == "eval"]
    keys = [k for k in ("eval/pass@1", "eval/pass@8", "eval/maj@8", "eval/actions", "eval/action_error_rate") if k in evals[0]]
    return {
        "variant": name,
        "seed": seed,
        "minutes": round((time.time() - start) / 60, 2),
        "before": {k: evals[0][k] for k in keys},
        "after": {k: evals[-1][k] for k in keys},
        "steps": sum(r["phase"] in ("sft", "ppo") for r in records),
        "sampled_tokens": sum(r.get("env/model_tokens", 0) * 16 for r in records if r["phase"] == "ppo"),
    }


def base(seed: int = 0) -> list[dict]:
    """The untrained model, with and without the tool: a run of 0 steps is only its evaluation (EVAL_FILE's 12 items x 8)."""
    rows = []
    for name, data in (("base_with_tool", TOOL), ("base_without_tool", DIRECT)):
        out = OUT / f"{name}-s{seed}"
        cfg = {
            **COMMON,
            **data,
            "MODE": "sft",
            "SEED": seed,
            "OUTPUT_DIR": str(out),
            "NUM_SAMPLES": 1,
            "SFT_BATCH": 1,
            "LR_SFT": 1e-12,
        }  # one step at a negligible rate: the evaluation before it is the base model's
        for key in ("TRAIN_FILE", "EVAL_FILE"):
            cfg[key] = str(ROOT / cfg[key])
        subprocess.run(["rm", "-rf", str(out)], check=True)
        OUT.mkdir(parents=True, exist_ok=True)
        path = OUT / f"{name}-s{seed}.json"
        path.write_text(json.dumps(cfg, indent=1))
        proc = subprocess.run(
            [sys.executable, str(ROOT / "hybrid_trainer.py"), str(path)],
            capture_output=True,
            text=True,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
        if proc.returncode:
            raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
        first = next(json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines())
        rows.append({"variant": name, "seed": seed, **{k: v for k, v in first.items() if k.startswith("eval/")}})
        save(name, seed)
    return rows


def save(name: str, seed: int) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}-s{seed}.config.json").write_text((OUT / f"{name}-s{seed}.json").read_text())
    (RESULTS / f"{name}-s{seed}.metrics.jsonl").write_text((OUT / f"{name}-s{seed}" / "metrics.jsonl").read_text())
    subprocess.run(["rm", "-rf", str(OUT / f"{name}-s{seed}" / "inference_lm"), str(OUT / f"{name}-s{seed}" / "ppo_full")])


def table(results: list[dict]) -> str:
    by = defaultdict(list)
    for r in results:
        if "after" in r:
            by[r["variant"]].append(r)
    lines = [
        "| row | seeds | pass@1 before → after | pass@8 before → after | actions per trajectory (after) | minutes |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        if "after" not in r:
            lines.append(
                f"| {r['variant']} (untrained) | - | {r['eval/pass@1']:.3f} | {r['eval/pass@8']:.3f} | {r.get('eval/actions', 0):.2f} | - |"
            )
    for name, rs in by.items():

        def cell(key, rs=rs):
            b, a = [r["before"][key] for r in rs], [r["after"][key] for r in rs]
            spread = f" ± {statistics.stdev(a):.3f}" if len(a) > 1 else ""
            return f"{statistics.mean(b):.3f} → {statistics.mean(a):.3f}{spread}"

        actions = [r["after"].get("eval/actions") for r in rs if "eval/actions" in r["after"]]
        lines.append(
            f"| {name} | {len(rs)} | {cell('eval/pass@1')} | {cell('eval/pass@8')} | "
            f"{statistics.mean(actions) if actions else 0:.2f} | {statistics.mean(r['minutes'] for r in rs):.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default="", help="comma-separated rows: " + ", ".join(VARIANTS))
    p.add_argument("--seeds", default="0")
    p.add_argument("--base", action="store_true", help="the untrained model's pass@1 / pass@8 with and without the tool")
    p.add_argument("--table", action="store_true")
    args = p.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    results_file = RESULTS / "results.jsonl"
    if args.base:
        with results_file.open("a") as f:
            for row in base():
                f.write(json.dumps(row) + "\n")
                print(row, flush=True)
    if not args.table and args.only:
        for seed in map(int, args.seeds.split(",")):
            for name in args.only.split(","):
                result = run(name, VARIANTS[name], seed)
                save(name, seed)
                with results_file.open("a") as f:
                    f.write(json.dumps(result) + "\n")
                print(f"{name} seed {seed}: {result['before']} -> {result['after']} ({result['minutes']} min)", flush=True)
    results = [json.loads(line) for line in results_file.read_text().splitlines()] if results_file.exists() else []
    if results:
        print(table(results))


if __name__ == "__main__":
    main()
