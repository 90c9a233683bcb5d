#!/usr/bin/env python3
"""docs/experiments.md's RLVR experiment (not a test): SFT, RL or both on the math task, and what each costs the model's other
knowledge. Each variant is configs/math_grpo.json plus its overrides, trained on the same 48 word problems at an equal
budget (12 updates of 4 prompts x 8 sampled responses = 384 responses and 24 optimizer steps; SFT: 24 steps of 4
demonstrations), evaluated on 50 held-out problems with 8 samples each at temperature 1 (pass@1, pass@8, maj@8) before
and after, and on the demo's short-answer eval set (data/eval.json, greedy) before and after for retention: per task
category, the responses that contain the reference.

    python bench/rlvr_experiment.py --only sft,grpo --seeds 0,1,2      # appends to bench/results/rlvr/results.jsonl
    python bench/rlvr_experiment.py --table                            # the markdown table of everything run so far
    python bench/rlvr_experiment.py --only distill,self_distill,distill_task --seeds 0,1,2   # on-policy distillation

The distillation rows first train their teacher ("teacher": SFT on the same worked solutions, 72 steps, seed 0) once.

One process at a time (2 threads); on a 2-core CPU an SFT run takes about 4 minutes, an RL or hybrid run 9-10 with the
hf backend (--set 'NAME:GENERATION_BACKEND="hf"'), about 5 with vLLM (GENERATION_BACKEND "auto" where it is installed).
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "runs" / "rlvr"  # the runs (their models are deleted: the numbers are what this keeps)
RESULTS = ROOT / "bench" / "results" / "rlvr"  # committed: results.jsonl, the base's retention, each run's config and metrics
BUDGET = {"NUM_SAMPLES": 48, "EPOCHS": 1, "SAVE_EVERY": 0, "LOG_EVERY": 4}
SFT_STEPS = {"SFT_BATCH": 4, "EPOCHS": 2, "LR_SFT": 2e-5}  # 24 steps of 4 demonstrations
VARIANTS = {
    "sft": {"MODE": "sft", **SFT_STEPS},
    "grpo": {"MODE": "ppo"},
    "rloo": {"MODE": "ppo", "ADVANTAGE": "rloo"},
    # the same 48 prompts x 8 responses, groups with equal scores dropped: fewer, denser updates
    "grpo_dyn": {"MODE": "ppo", "DYNAMIC_SAMPLING": True},
    # alternate: 12 SFT steps and 12 updates of one optimizer step each (PPO_MINI = PPO_BATCH): 24 steps
    "alternate": {"MODE": "hybrid", "HYBRID": "alternate", "SFT_BATCH": 4, "PPO_MINI": 4, "LR_SFT": 2e-5},
    "gate": {"MODE": "hybrid", "HYBRID": "gate", "GATE_THRESHOLD": 1.0},
    "mix": {"MODE": "hybrid", "HYBRID": "mix", "MIX_COEF": 0.5, "MIX_COEF_END": 0.1, "MIX_SCHEDULE": "cosine"},
    # on-policy distillation (vLLM samples, at the RL rows' budget): the teacher is "teacher" below, SFT on the same
    # worked solutions for 3x the steps (trained once, seed 0, kept); the per-token advantage -(log pi - log teacher)
    # alone (ADVANTAGE "none", no KL to the reference: the teacher is the anchor, as in Tinker's recipe) ...
    "distill": {
        "MODE": "ppo",
        "ADVANTAGE": "none",
        "TEACHER_MODEL": "<teacher>",
        "DISTILL": "token_reverse_kl",
        "DISTILL_COEF": 1.0,
        "INIT_KL_COEF": 0.0,
        "GENERATION_BACKEND": "vllm",
    },
    # ... the frozen initial model as its own teacher, shown the row's worked solution (no second model) ...
    "self_distill": {
        "MODE": "ppo",
        "ADVANTAGE": "none",
        "TEACHER_MODEL": "self",
        "DISTILL": "token_reverse_kl",
        "TEACHER_CONTEXT": "A worked solution: {target}\n\nNow answer in your own words. ",
        "DISTILL_COEF": 1.0,
        "INIT_KL_COEF": 0.0,
        "GENERATION_BACKEND": "vllm",
    },
    # ... and GRPO's task advantage plus the teacher's per-token term (verl's use_task_rewards)
    "distill_task": {
        "MODE": "ppo",
        "TEACHER_MODEL": "<teacher>",
        "DISTILL": "token_reverse_kl",
        "DISTILL_COEF": 1.0,
        "INIT_KL_COEF": 0.0,
        "GENERATION_BACKEND": "vllm",
    },
    "teacher": {"MODE": "sft", **SFT_STEPS, "EPOCHS": 6},  # 72 steps; its model stays in runs/rlvr/teacher-s0
}
TEACHER = OUT / "teacher-s0" / "inference_lm"


def retention(model: str, seed: int) -> dict:
    """Greedy answers to data/eval.json: per category, [responses containing the reference, items]."""
    import torch

    sys.path.insert(0, str(ROOT))
    import hybrid_trainer as ht

    cfg = ht.Config.from_dict(
        {
            "MODE": "sft",
            "MODEL": model,
            "TRAIN_FILE": str(ROOT / "data" / "eval.json"),
            "OUTPUT_DIR": "-",
            "CATEGORY_FIELD": "category",
            "PROMPT_FORMAT": "chat",
            "MAX_NEW_TOKENS": 24,
            "SHUFFLE": False,
            "SEED": seed,
            "BF16": True,
        }
    )
    policy, _, tok = ht.load_model(cfg, torch.device("cpu"), True)
    examples = ht.tokenize_examples(ht.load_examples(cfg), cfg, tok, "chat", "TRAIN_FILE")
    trainer = ht.HybridTrainer(cfg, policy, None, tok, plan=ht.api_plan(cfg, lm=policy.lm, bf16=True))
    counts = defaultdict(lambda: [0, 0])
    for s in ht.evaluate(trainer, examples, {})["samples"]:
        counts[s["category"]][0] += int(s["contains"])
        counts[s["category"]][1] += 1
    return dict(sorted(counts.items()))


def run(name: str, overrides: dict, seed: int) -> dict:
    base = json.loads((ROOT / "configs" / "math_grpo.json").read_text())
    out = OUT / f"{name}-s{seed}"
    if overrides.get("TEACHER_MODEL") == "<teacher>":
        if not (TEACHER / "config.json").is_file():
            finish("teacher", run("teacher", VARIANTS["teacher"], 0))
        overrides = {**overrides, "TEACHER_MODEL": str(TEACHER)}
    cfg = {
        **base,
        **BUDGET,
        **overrides,
        "SEED": seed,
        "OUTPUT_DIR": str(out),
        "TRAIN_FILE": str(ROOT / base["TRAIN_FILE"]),
        "EVAL_FILE": str(ROOT / base["EVAL_FILE"]),
    }
    return launch(name, cfg, overrides, seed, OUT)


def launch(name: str, cfg: dict, overrides: dict, seed: int, out_root: Path) -> dict:
    """Train one run of `cfg` as its own process (out_root/NAME-sSEED; a previous one there is removed) and read its
    numbers: the first and last evaluation, steps, sampled responses, the mean share of GRPO groups with one score
    over its updates, retention, disk."""
    out = Path(cfg["OUTPUT_DIR"])
    if out.exists():
        subprocess.run(["rm", "-rf", str(out)], check=True)
    path = out_root / f"{name}-s{seed}.json"
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
    first, last = evals[0], evals[-1]
    keys = ("eval/pass@1", "eval/pass@8", "eval/maj@8") + (("eval/reverse_kl_to_teacher",) if "eval/reverse_kl_to_teacher" in first else ())
    zero = [r["reward/zero_std_groups"] for r in records if "reward/zero_std_groups" in r]
    return {
        "variant": name,
        "seed": seed,
        "overrides": overrides,
        "minutes": round((time.time() - start) / 60, 2),
        "before": {k: first[k] for k in keys},
        "after": {k: last[k] for k in keys},
        "steps": sum(r["phase"] in ("sft", "ppo") for r in records),
        "responses": sum(
            r.get("dynamic/prompts_generated", cfg.get("PPO_BATCH", 4)) * cfg.get("NUM_GENERATIONS", 8)
            for r in records
            if r["phase"] == "ppo"
        ),
        **({"zero_std_groups": round(statistics.mean(zero), 4)} if zero else {}),
        "retention": retention(str(out / "inference_lm"), seed),
        "disk": subprocess.run(["du", "-sh", "--", str(out)], capture_output=True, text=True).stdout.split()[0],
    }


def finish(name: str, result: dict, out_root: Path = OUT, results_root: Path = RESULTS, keep: tuple = ("teacher",)) -> None:
    """Keep a run's numbers (results.jsonl, its config and metrics in results_root); drop its models (0.5 GB each),
    except those of the variants in `keep`."""
    seed = result["seed"]
    for model_dir in ("inference_lm", "ppo_full"):
        if name not in keep:
            shutil.rmtree(out_root / f"{name}-s{seed}" / model_dir, ignore_errors=True)
    shutil.copy(out_root / f"{name}-s{seed}.json", results_root / f"{name}-s{seed}.config.json")
    shutil.copy(out_root / f"{name}-s{seed}" / "metrics.jsonl", results_root / f"{name}-s{seed}.metrics.jsonl")
    record(result, results_root)


def record(result: dict, results_root: Path = RESULTS) -> None:
    """Append a row's numbers to results_root/results.jsonl and say them."""
    with (results_root / "results.jsonl").open("a") as f:
        f.write(json.dumps(result) + "\n")
    print(f"{result['variant']} seed {result['seed']}: {result['before']} -> {result['after']} ({result['minutes']} min)", flush=True)


def table(results: list[dict], base: dict, zero_std: bool = False) -> str:
    """The markdown table: per variant, the mean (± the seeds' standard deviation) of the last evaluation, retention
    per category (mean over seeds), the categories lost, minutes; zero_std: also the mean share of GRPO groups whose
    responses all scored the same (no signal), over each run's updates."""
    by = defaultdict(list)
    for r in results:
        by[r["variant"]].append(r)
    cats = sorted(base)
    head = (
        "| variant | seeds | pass@1 | pass@8 | maj@8 | "
        + ("zero-std groups | " if zero_std else "")
        + " | ".join(cats)
        + " | categories lost | minutes |"
    )
    lines = [
        head,
        "|" + "---|" * (head.count("|") - 1),
        "| base model | - | {:.3f} | {:.3f} | {:.3f} | ".format(*list(results[0]["before"].values())[:3])
        + ("- | " if zero_std else "")
        + " | ".join(f"{base[c][0]}/{base[c][1]}" for c in cats)
        + " | - | - |",
    ]
    for name, rs in by.items():

        def cell(key, rs=rs):
            xs = [r["after"][key] for r in rs]
            return f"{statistics.mean(xs):.3f}" + (f" ± {statistics.stdev(xs):.3f}" if len(xs) > 1 else "")

        mean_ret = {c: statistics.mean(r["retention"][c][0] for r in rs) for c in cats}
        lost = [c for c in cats if mean_ret[c] < base[c][0] - 1]  # beyond noise: more than one item on average
        zeros = [r["zero_std_groups"] for r in rs if "zero_std_groups" in r]
        zero_cell = (f"{statistics.mean(zeros):.2f} | " if zeros else "- | ") if zero_std else ""
        lines.append(
            f"| {name} | {len(rs)} | {cell('eval/pass@1')} | {cell('eval/pass@8')} | {cell('eval/maj@8')} | "
            + zero_cell
            + " | ".join(f"{mean_ret[c]:.3g}/{base[c][1]}" for c in cats)
            + f" | {', '.join(lost) or 'none'} | {statistics.mean(r['minutes'] for r in rs):.1f} |"
        )
    return "\n".join(lines)


def arguments(doc: str, variants: dict) -> tuple[argparse.Namespace, dict]:
    """An experiment script's command line (--only, --seeds, --set, --table) and the variants it chose: --only's, or
    every one unless --set names new ones; --set NAME:KEY=JSON is NAME with KEY changed, on top of the variant named
    before NAME's first underscore (e.g. gate_lr2e-5:LR_PPO=2e-5)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default="", help="comma-separated variants: " + ", ".join(variants))
    p.add_argument("--seeds", default="0")
    p.add_argument("--set", action="append", default=[], help="NAME:KEY=JSON: run NAME (a new variant) with KEY changed")
    p.add_argument("--table", action="store_true")
    args = p.parse_args()
    chosen = {k: variants[k] for k in (args.only.split(",") if args.only else [] if args.set else variants)}
    for spec in args.set:
        name, change = spec.split(":", 1)
        key, value = change.split("=", 1)
        chosen[name] = {**chosen.get(name, variants.get(name.split("_")[0], {})), key: json.loads(value)}
    return args, chosen


def main() -> None:
    args, variants = arguments(__doc__, VARIANTS)
    OUT.mkdir(parents=True, exist_ok=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    results_file, base_file = RESULTS / "results.jsonl", RESULTS / "base_retention.json"
    if not base_file.exists():
        base_file.write_text(json.dumps(retention("smollm2-135m-instruct", 0)))
    base = json.loads(base_file.read_text())
    if not args.table:
        for seed in map(int, args.seeds.split(",")):
            for name, overrides in variants.items():
                finish(name, run(name, overrides, seed))
    results = [json.loads(line) for line in results_file.read_text().splitlines()] if results_file.exists() else []
    if results:
        print(table(results, base))


if __name__ == "__main__":
    main()
