#!/usr/bin/env python3
"""How hard is each difficulty of the chain task family for a model (not a test): its pass@1 / pass@8 / maj@8 at
temperature 1 before any training, per family and number of steps, through the trainer's own evaluation (the math
reward, 8 samples per problem). This is what chose the difficulty of data/chain_*.json (docs/experiments.md, "Hybrids on the data
users have").

    python bench/difficulty_probe.py                       # words and bare, 1-5 steps, 40 problems each
    python bench/difficulty_probe.py --steps 2,3 --n 64    # -> bench/results/difficulty/<model>.jsonl (appended)
"""

import argparse
import dataclasses
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def make_data():
    spec = importlib.util.spec_from_file_location("make_data", ROOT / "data" / "make_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--families", default="words,bare")
    p.add_argument("--steps", default="1,2,3,4,5")
    p.add_argument("--high", type=int, default=9, help="numbers 1..high")
    p.add_argument("--ask", default="", help="the instruction after the question (default: make_data's MATH_ASK)")
    p.add_argument("--n", type=int, default=40, help="problems per difficulty")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--start-high", type=int, default=0, help="the first number 2..start_high (default: high)")
    p.add_argument("--forms", action="store_true", help="the bare sum in any of make_data.BARE_FORMS (default: What is)")
    p.add_argument("--shot", action="store_true", help="one worked example before each question (make_data.CHAIN_SHOT)")
    p.add_argument("--backend", default="vllm", help="GENERATION_BACKEND")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bf16", default="auto")
    args = p.parse_args()

    import random

    import torch

    import hybrid_trainer as ht
    import runtime

    md = make_data()
    out = ROOT / "bench" / "results" / "difficulty"
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp())
    sets = {}
    for family in args.families.split(","):
        for steps in map(int, args.steps.split(",")):
            rng = random.Random(1000 + steps)  # per difficulty; word problems take the later names and things
            sets[family, steps] = [
                md.chain_problem(
                    rng,
                    md.NAMES[14:],
                    md.THINGS[11:],
                    steps,
                    args.high,
                    family == "words",
                    args.ask,
                    args.shot,
                    args.start_high,
                    md.BARE_FORMS if args.forms else md.BARE_FORMS[:1],
                )
                for _ in range(args.n)
            ]
    first = tmp / "probe.json"
    first.write_text(json.dumps(next(iter(sets.values()))))
    bf16 = {"auto": "auto", "true": True, "false": False}[args.bf16]
    cfg = ht.Config.from_dict(
        {
            "MODE": "ppo",
            "MODEL": args.model,
            "TRAIN_FILE": str(first),
            "OUTPUT_DIR": "-",
            "CATEGORY_FIELD": "category",
            "PROMPT_FORMAT": "chat",
            "MAX_NEW_TOKENS": args.max_new_tokens,
            "REWARD": {"type": "math"},
            "ADVANTAGE": "grpo",
            "NUM_GENERATIONS": 8,
            "EVAL_NUM_SAMPLES": 8,
            "EVAL_TEMPERATURE": 1.0,
            "TEMPERATURE": 1.0,
            "TOP_P": 1.0,
            "REPETITION_PENALTY": 1.0,
            "NO_REPEAT_NGRAM_SIZE": 0,
            "SEED": args.seed,
            "BF16": bf16,
            "GENERATION_BACKEND": args.backend,
            "VLLM_KV_CACHE_GB": 1,
        }
    )
    device = torch.device("cpu")
    on = runtime.resolve_bf16(cfg, device, runtime.resolve_model(cfg))[0] if bf16 == "auto" else bf16
    runtime.seed_everything(args.seed)
    policy, _, tok = ht.load_model(cfg, device, on)
    trainer = ht.HybridTrainer(cfg, policy, None, tok, plan=ht.api_plan(cfg, lm=policy.lm, bf16=on))
    reward = runtime.build_reward(cfg, device)
    for (family, steps), rows in sets.items():
        path = tmp / f"{family}-{steps}.json"
        path.write_text(json.dumps(rows))
        examples = ht.tokenize_examples(ht.load_examples(dataclasses.replace(cfg, TRAIN_FILE=str(path))), cfg, tok, "chat", "TRAIN_FILE")
        start = time.time()
        result = ht.evaluate(trainer, examples, {"reward": reward})
        record = {
            "model": args.model,
            "family": family,
            "steps": steps,
            "high": args.high,
            "n": args.n,
            "max_new_tokens": args.max_new_tokens,
            "ask": args.ask or md.MATH_ASK,
            "shot": args.shot,
            "forms": args.forms,
            "start_high": args.start_high,
            "backend": args.backend,
            "bf16": on,
            "seed": args.seed,
            **{k: round(result[f"eval/{k}"], 4) for k in ("pass@1", "pass@8", "maj@8")},
            "seconds": round(time.time() - start, 1),
            "example": result["samples"][0],
        }
        print(json.dumps({k: v for k, v in record.items() if k != "example"}), flush=True)
        with (out / f"{Path(args.model).name}.jsonl").open("a") as f:
            f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
