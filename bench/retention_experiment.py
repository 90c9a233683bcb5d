#!/usr/bin/env python3
"""docs/experiments.md's retention experiment (not a test): the split experiment's hybrids (bench/split_experiment.py:
same data, model, budget of 48 optimizer steps and 768 sampled responses per row, bf16 as BF16 "auto" picks, vLLM) with
each retention mechanism, and retention measured inside every run: RETAIN_FILE data/eval.json (the demo's short-answer
set, 60 items in 8 categories, answered greedily, a category's count = answers containing the reference) and
eval/kl_to_reference (the KL to the base model on the task's own held-out samples: RL's Razor's predictor).

    alternate, sft_then_grpo      the split experiment's rows, retention now measured in the run
    *_sftkl                       SFT_KL_COEF 0.1: KL(policy || base) over the vocabulary at each SFT target token
                                  (alternate_sftkl1: 1.0, which ran first and held the model near the base)
    *_replay                      REPLAY_SHARE 0.25: one of each update's 4 prompts from data/train.json's short-answer
                                  prompts (disjoint from data/eval.json), trained toward the base model's own answers
                                  (advantage: the per-token reverse KL to it); the task prompts drop to 3 per update so
                                  the row keeps 24 updates and 768 responses (alternate_replay50: 0.5, 2 of 4)
    alternate_lora, alternate_dft LoRA r=16 (all linear layers) / SFT_LOSS dft: no new code, other levers

sft_then_grpo's second stage starts from the first's model, which is also its reference: its KL and replay pull toward
the SFT model, not the base (said in the table).

    python bench/retention_experiment.py --only alternate_sftkl,alternate_replay --seeds 0,1,2
    python bench/retention_experiment.py --table
"""

import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import rlvr_experiment as rx  # noqa: E402 - its launch, finish and table
import split_experiment as sx  # noqa: E402 - the split's data, settings and rows

ROOT = rx.ROOT
OUT = ROOT / "runs" / "retention"
RESULTS = ROOT / "bench" / "results" / "retention"
rx.retention = lambda *a: {}  # noqa: E731 - each run measures its retention itself (RETAIN_FILE: retention_from_metrics)
RETAIN = {"RETAIN_FILE": str(ROOT / "data" / "eval.json"), "GENERATION_BACKEND": "vllm"}
REPLAY = {"REPLAY_SHARE": 0.25, "REPLAY_FILE": str(ROOT / "data" / "train.json")}
SFT_KL = {"SFT_KL_COEF": 0.1}
ALT, TWO = sx.VARIANTS["alternate"], sx.VARIANTS["sft_then_grpo"]
VARIANTS = {
    "alternate": ALT,
    "alternate_sftkl": {**ALT, **SFT_KL},
    "alternate_sftkl1": {**ALT, "SFT_KL_COEF": 1.0},  # ran first: too strong (the table)
    "alternate_replay": {**ALT, **REPLAY, "NUM_SAMPLES": 24},
    "alternate_replay50": {**ALT, **REPLAY, "REPLAY_SHARE": 0.5, "NUM_SAMPLES": 16},  # 2 of 4 prompts replayed
    "alternate_lora": {**ALT, "LORA_R": 16, "LORA_ALPHA": 32, "LR_SFT": 2e-4, "LR_PPO": 1e-4},
    "alternate_dft": {**ALT, "SFT_LOSS": "dft"},
    "sft_then_grpo": TWO,
    "sft_then_grpo_sftkl": [{**TWO[0], **SFT_KL, "INIT_KL_COEF": 0.0}, TWO[1]],
    "sft_then_grpo_replay": [TWO[0], {**TWO[1], **REPLAY, "NUM_SAMPLES": 72}],
}


def retention_from_metrics(result: dict, out: Path, base: dict) -> dict:
    """The run's own RETAIN_FILE evaluation (its last): per category [answers containing the reference, items], and the
    KL to its reference on the task's samples, first and last."""
    evals = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["phase"] == "eval"]
    last = evals[-1]
    result["retention"] = {c: [round(last[f"retain/{c}"] * n), n] for c, (_, n) in base.items()}
    kl = [e.get("eval/kl_to_reference") for e in (evals[0], last)]
    result["kl_to_reference"] = kl if None not in kl else None
    return result


def run(name: str, spec, seed: int, base: dict) -> dict:
    """One row's run, or its two stages (the second from the first's model; the first's stage row is recorded too)."""
    stages = spec if isinstance(spec, list) else [spec]
    results, model = [], None
    for i, stage in enumerate(stages):
        stage = {**stage, **RETAIN, **({"MODEL": model} if model else {})}
        tag = f".{i + 1}" if len(stages) > 1 else ""
        cfg = {**sx.config(name, stage, seed, tag), "OUTPUT_DIR": str(OUT / f"{name}{tag}-s{seed}")}
        cfg.pop("VLLM_KV_CACHE_GB", None)  # sized from the rollout (the default since this round)
        result = retention_from_metrics(rx.launch(name + tag, cfg, stage, seed, OUT), OUT / f"{name}{tag}-s{seed}", base)
        rx.finish(name + tag, result, OUT, RESULTS, keep=(name + tag,) if i < len(stages) - 1 else ())
        results.append(result)
        model = str(OUT / f"{name}{tag}-s{seed}" / "inference_lm")
    if len(stages) == 1:
        return results[0]
    rx.shutil.rmtree(OUT / f"{name}.1-s{seed}" / "inference_lm", ignore_errors=True)
    row = {
        **results[-1],
        "variant": name,
        "overrides": spec,
        "minutes": round(sum(r["minutes"] for r in results), 2),
        "before": results[0]["before"],
        "steps": sum(r["steps"] for r in results),
        "responses": sum(r["responses"] for r in results),
    }
    rx.record(row, RESULTS)
    return row


def main() -> None:
    args, variants = rx.arguments(__doc__, VARIANTS)
    OUT.mkdir(parents=True, exist_ok=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    base = json.loads((rx.RESULTS / "base_retention.json").read_text())  # the base model on data/eval.json, greedy
    if not args.table:
        for seed in map(int, args.seeds.split(",")):
            for name, spec in variants.items():
                run(name, spec, seed, base)
    results_file = RESULTS / "results.jsonl"
    results = [json.loads(line) for line in results_file.read_text().splitlines()] if results_file.exists() else []
    results = [r for r in results if "." not in r["variant"]]  # the stages are in the file too, for the record
    split = [json.loads(line) for line in (sx.RESULTS / "results.jsonl").read_text().splitlines()]
    baselines = [
        {**r, "variant": f"{r['variant']} (split)"} for r in split if r["variant"] in ("sft", "grpo", "alternate", "sft_then_grpo")
    ]
    if results:  # the split experiment's rows first: the same settings, retention measured after the run (the same greedy answers)
        print(rx.table(baselines + results, base, zero_std=True))
        for name in dict.fromkeys(r["variant"] for r in results):
            kls = [r["kl_to_reference"][1] for r in results if r["variant"] == name and r.get("kl_to_reference")]
            if kls:
                print(f"{name}: KL to its reference on the task's samples at the end {statistics.mean(kls):.4f}")
        print(f"\n{len(results)} runs, {statistics.fsum(r['minutes'] for r in results):.0f} minutes")


if __name__ == "__main__":
    main()
