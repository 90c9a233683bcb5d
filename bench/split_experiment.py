#!/usr/bin/env python3
"""docs/experiments.md's experiment on the data users have (not a test): a few worked solutions and many prompts with only a
checkable answer (data/chain_demos.json: 32 demonstrations; data/chain_prompts.json: 1,200 answer-only prompts;
data/chain_eval.json: held out), on the chain task, whose difficulty was chosen by bench/difficulty_probe.py so that
SmolLM2-135M-Instruct starts with signal for RL. Every row has the same budget: 48 optimizer steps, and 768 sampled
responses for the rows that sample (24 updates of 4 prompts x 8), twice the RLVR experiment's:

    sft            SFT on the 32 demonstrations alone, 6 epochs (48 steps of 4)
    grpo           GRPO on 96 of the prompts alone (24 updates, 2 optimizer steps each)
    sft_then_grpo  SFT on the demonstrations (24 steps), then GRPO from that model on the 96 prompts (24 updates of 1
                   step): two runs, the peers' practice
    alternate      SFT_FILE demonstrations + TRAIN_FILE prompts (32): 3 epochs of 8 SFT steps and 8 updates of 1 step
    gate, mix      one TRAIN_FILE of the 32 demonstrations and 64 prompts (a third have a reference): SFT inside the
                   update on the prompts that have one (gate: those the model fails; mix: all, mu 0.5 -> 0.1)
    distill_task   GRPO on the prompts plus the per-token reverse KL to a teacher, the sft row's seed-0 model

Evaluated on 50 held-out problems with 8 samples each at temperature 1 (pass@1, pass@8, maj@8) before and after, and
on the demo's short-answer set for retention (bench/rlvr_experiment.py's). Generation by vLLM.

    python bench/split_experiment.py --only sft,grpo --seeds 0,1,2     # appends to bench/results/split/results.jsonl
    python bench/split_experiment.py --table                           # the markdown table of everything run so far
"""

import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import rlvr_experiment as rx  # noqa: E402 - its launch, finish, retention and table

ROOT = rx.ROOT
OUT = ROOT / "runs" / "split"  # the runs (models deleted, except the teacher's)
RESULTS = ROOT / "bench" / "results" / "split"
DEMOS, PROMPTS, EVAL = (str(ROOT / "data" / f"chain_{n}.json") for n in ("demos", "prompts", "eval"))
COMMON = {
    "MODEL": "smollm2-135m-instruct",
    "PROMPT_FORMAT": "chat",
    "CATEGORY_FIELD": "category",
    "MAXSEQ": 256,
    "MAX_NEW_TOKENS": 64,
    "TEMPERATURE": 1.0,
    "TOP_P": 1.0,
    "REPETITION_PENALTY": 1.0,
    "NO_REPEAT_NGRAM_SIZE": 0,
    "REWARD": {"type": "math", "answer_field": "answer"},
    "EVAL_FILE": EVAL,
    "EVAL_SAMPLES": 50,
    "EVAL_NUM_SAMPLES": 8,
    "EVAL_TEMPERATURE": 1.0,
    "LOG_EVERY": 4,
    "SAVE_EVERY": 0,
    "EPOCHS": 1,
    "ADVANTAGE": "grpo",
    "NUM_GENERATIONS": 8,
    "PPO_BATCH": 4,
    "PPO_MINI": 2,
    "PPO_EPOCHS": 1,
    "LR_PPO": 1e-5,
    "INIT_KL_COEF": 0.04,
    "KL_IN": "loss",
    "KL_PENALTY": "k3",
    "MASK_TRUNCATED": False,
    "SFT_BATCH": 4,
    "LR_SFT": 2e-5,
    "GENERATION_BACKEND": "vllm",
    "VLLM_KV_CACHE_GB": 1.0,
}
MIXED = OUT / "mixed.json"  # gate and mix: the demonstrations and 64 prompts in one file (written by main)
TEACHER = OUT / "sft-s0" / "inference_lm"
VARIANTS = {
    "sft": {"MODE": "sft", "TRAIN_FILE": DEMOS, "EPOCHS": 6},
    "grpo": {"MODE": "ppo", "TRAIN_FILE": PROMPTS, "NUM_SAMPLES": 96},
    "grpo_dyn": {"MODE": "ppo", "TRAIN_FILE": PROMPTS, "NUM_SAMPLES": 96, "DYNAMIC_SAMPLING": True},
    # two runs: the second starts from the first's model (MODEL "<stage 1>")
    "sft_then_grpo": [
        {"MODE": "sft", "TRAIN_FILE": DEMOS, "EPOCHS": 3},
        {"MODE": "ppo", "TRAIN_FILE": PROMPTS, "NUM_SAMPLES": 96, "PPO_MINI": 4, "MODEL": "<stage 1>"},
    ],
    "alternate": {
        "MODE": "hybrid",
        "HYBRID": "alternate",
        "SFT_FILE": DEMOS,
        "TRAIN_FILE": PROMPTS,
        "NUM_SAMPLES": 32,
        "EPOCHS": 3,
        "PPO_MINI": 4,
    },
    "gate": {"MODE": "hybrid", "HYBRID": "gate", "GATE_THRESHOLD": 1.0, "TRAIN_FILE": str(MIXED)},
    "mix": {"MODE": "hybrid", "HYBRID": "mix", "MIX_COEF": 0.5, "MIX_COEF_END": 0.1, "MIX_SCHEDULE": "cosine", "TRAIN_FILE": str(MIXED)},
    "distill_task": {
        "MODE": "ppo",
        "TRAIN_FILE": PROMPTS,
        "NUM_SAMPLES": 96,
        "TEACHER_MODEL": "<teacher>",
        "DISTILL": "token_reverse_kl",
        "DISTILL_COEF": 1.0,
        "INIT_KL_COEF": 0.0,
    },
}


def config(name: str, overrides: dict, seed: int, stage: str = "") -> dict:
    return {**COMMON, **overrides, "SEED": seed, "OUTPUT_DIR": str(OUT / f"{name}{stage}-s{seed}")}


def run(name: str, spec, seed: int) -> dict:
    """One row's run (or its two stages, the second from the first's model)."""
    if isinstance(spec, list):
        first = rx.launch(f"{name}.1", config(name, spec[0], seed, ".1"), spec[0], seed, OUT)
        rx.finish(f"{name}.1", first, OUT, RESULTS, keep=(f"{name}.1",))
        second_spec = {**spec[1], "MODEL": str(OUT / f"{name}.1-s{seed}" / "inference_lm")}
        second = rx.launch(f"{name}.2", config(name, second_spec, seed, ".2"), second_spec, seed, OUT)
        rx.finish(f"{name}.2", second, OUT, RESULTS, keep=())
        rx.shutil.rmtree(OUT / f"{name}.1-s{seed}" / "inference_lm", ignore_errors=True)
        return {
            **second,
            "variant": name,
            "overrides": spec,
            "minutes": round(first["minutes"] + second["minutes"], 2),
            "before": first["before"],
            "steps": first["steps"] + second["steps"],
            "responses": first["responses"] + second["responses"],
        }
    if spec.get("TEACHER_MODEL") == "<teacher>":
        if not (TEACHER / "config.json").is_file():
            rx.finish("sft", run("sft", VARIANTS["sft"], 0), OUT, RESULTS, keep=("sft",))
        spec = {**spec, "TEACHER_MODEL": str(TEACHER)}
    return rx.launch(name, config(name, spec, seed), spec, seed, OUT)


def write_mixed() -> None:
    """The 32 demonstrations and the first 64 prompts, interleaved: one file where a third of the rows have a
    reference (what gate and mix train SFT on)."""
    demos, prompts = json.loads(Path(DEMOS).read_text()), json.loads(Path(PROMPTS).read_text())[:64]
    rows = [row for pair in zip(demos, prompts[0::2], prompts[1::2]) for row in pair]
    MIXED.write_text(json.dumps(rows, indent=1))


def main() -> None:
    args, variants = rx.arguments(__doc__, VARIANTS)
    OUT.mkdir(parents=True, exist_ok=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_mixed()
    base = json.loads((rx.RESULTS / "base_retention.json").read_text())  # the same base model and eval set
    if not args.table:
        for seed in map(int, args.seeds.split(",")):
            for name, spec in variants.items():
                result = run(name, spec, seed)
                if isinstance(spec, list):  # its stages' files are kept by run(); the row's numbers here
                    rx.record(result, RESULTS)
                else:
                    rx.finish(name, result, OUT, RESULTS, keep=("sft",) if seed == 0 else ())
    results_file = RESULTS / "results.jsonl"
    results = [json.loads(line) for line in results_file.read_text().splitlines()] if results_file.exists() else []
    results = [r for r in results if "." not in r["variant"]]  # the stages are in the file too, for the record
    if results:
        print(rx.table(results, base, zero_std=True))
        print(f"\n{len(results)} runs, {statistics.fsum(r['minutes'] for r in results):.0f} minutes")


if __name__ == "__main__":
    main()
