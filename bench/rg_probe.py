#!/usr/bin/env python3
"""Which reasoning-gym tasks a model has signal on before training (not a test): pass@1 and pass@8 at temperature 1
and the share of prompts whose 8 samples are not all scored alike (the groups GRPO can learn from), per task and
curriculum level, on held-out rows generated as TRAIN_FILE "reasoning_gym:NAME" generates them, scored by the
reasoning_gym reward. This chose the task of bench/curriculum_experiment.py (docs/experiments.md).

    python bench/rg_probe.py                                   # five tasks, levels 0 and 1, 24 problems each
    python bench/rg_probe.py --tasks chain_sum --levels 0,1,2  # -> bench/results/rg_probe/<model>.jsonl (appended)
"""

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--tasks", default="chain_sum,basic_arithmetic,leg_counting,letter_counting,count_bits")
    p.add_argument("--levels", default="0,1")
    p.add_argument("--n", type=int, default=24, help="problems per task and level")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--backend", default="hf", help="GENERATION_BACKEND")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    import torch

    import hybrid_trainer as ht
    import runtime

    out = ROOT / "bench" / "results" / "rg_probe"
    out.mkdir(parents=True, exist_ok=True)
    cfg = ht.Config.from_dict(
        {
            "MODE": "ppo",
            "MODEL": args.model,
            "TRAIN_FILE": "reasoning_gym:chain_sum",
            "OUTPUT_DIR": "-",
            "MAX_NEW_TOKENS": args.max_new_tokens,
            "REWARD": {"type": "reasoning_gym"},
            "ADVANTAGE": "grpo",
            "NUM_GENERATIONS": 8,
            "EVAL_NUM_SAMPLES": 8,
            "EVAL_TEMPERATURE": 1.0,
            "EVAL_SAMPLES": args.n,
            "TEMPERATURE": 1.0,
            "TOP_P": 1.0,
            "REPETITION_PENALTY": 1.0,
            "NO_REPEAT_NGRAM_SIZE": 0,
            "SEED": args.seed,
            "GENERATION_BACKEND": args.backend,
        }
    )
    device = torch.device("cpu")
    on = runtime.resolve_bf16(cfg, device, runtime.resolve_model(cfg))[0]
    runtime.seed_everything(args.seed)
    policy, _, tok = ht.load_model(cfg, device, on)
    trainer = ht.HybridTrainer(cfg, policy, None, tok, plan=ht.api_plan(cfg, lm=policy.lm, bf16=on))
    reward = runtime.build_reward(cfg, device)
    for name in args.tasks.split(","):
        for level in map(int, args.levels.split(",")):
            task = runtime.make_task(f"reasoning_gym:{name}", {"eval_size": args.n, "seed": args.seed, "level": level}, "--tasks")
            rows = runtime.task_rows(task, "--tasks", held_out=True)
            examples = ht.tokenize_examples(ht.make_examples(rows, "output", name, data_format="prompt_completion"), cfg, tok, "chat", name)
            start = time.time()
            result = ht.evaluate(trainer, examples, {"reward": reward})
            mixed = [0 < s["passes"] < s["k"] for s in result["samples"]]  # its 8 samples neither all pass nor all fail
            record = {
                "model": args.model,
                "task": name,
                "level": level,
                "config": {k: v for k, v in runtime.task_fields(task, level).items() if k != "datasets"},
                "n": args.n,
                "max_new_tokens": args.max_new_tokens,
                "bf16": on,
                "seed": args.seed,
                **{k: round(result[f"eval/{k}"], 4) for k in ("pass@1", "pass@8") if f"eval/{k}" in result},
                "reward_mean": round(result["eval/reward"], 4),
                "seconds": round(time.time() - start, 1),
                "example": result["samples"][0],
                "signal": round(sum(mixed) / len(mixed), 4),
            }
            print(json.dumps({k: v for k, v in record.items() if k not in ("example", "config")}), flush=True)
            with (out / f"{Path(args.model).name}.jsonl").open("a") as f:
                f.write(json.dumps(record, default=str) + "\n")


if __name__ == "__main__":
    main()
