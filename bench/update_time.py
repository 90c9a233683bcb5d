#!/usr/bin/env python3
"""The split experiment's GRPO update on the same inputs at any checkout (not a test): its settings (bench/
split_experiment.py's COMMON and grpo row, hf generation, seed 0), 6 updates of 4 prompts x 8 responses through the
Python API, and the medians of the last 5 (the first warms up): time/update_s and its parts, with the tokens the
update ran where the checkout logs them. The same seed samples the same first batch at every checkout; later ones
drift with the weights' rounding. bench/goals.py compares whole runs; this, the update alone, in less time.

    python bench/update_time.py --root /tmp/base --precision bf16     # another checkout (git worktree add /tmp/base REV)
    python bench/update_time.py --precision fp32                      # this one; appends to bench/results/goals/update_time.jsonl
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
KEYS = ("time/update_s", "time/ppo_epochs_s", "time/reference_forward_s", "time/rollout_s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default=str(HERE.parent), help="the checkout whose trainer runs")
    p.add_argument("--precision", default="bf16", choices=("bf16", "fp32"))
    p.add_argument("--label", default="")
    args = p.parse_args()
    sys.path[:0] = [args.root, str(HERE)]
    import split_experiment as split
    import torch
    from peer_bench import machine

    import hybrid_trainer as ht
    import rewards

    bf16 = args.precision == "bf16"
    overrides = {"EVAL_FILE": "", "GENERATION_BACKEND": "hf", "BF16": bf16, "SEED": 0, "OUTPUT_DIR": "-"}
    cfg = ht.Config.from_dict({**split.COMMON, **split.VARIANTS["grpo"], **overrides})
    torch.manual_seed(0)
    policy, ref, tok = ht.load_model(cfg, torch.device("cpu"), True)
    examples = ht.tokenize_examples(ht.load_examples(cfg), cfg, tok, "chat", "TRAIN_FILE")
    trainer = ht.HybridTrainer(cfg, policy, ref, tok, rewards.make_reward(cfg.REWARD), plan=ht.api_plan(cfg, lm=policy.lm, bf16=bf16))
    stats = [trainer.ppo_update(examples[4 * i : 4 * i + 4], draw=None) for i in range(6)]
    result = {
        "label": args.label or args.root,
        "precision": args.precision,
        **{k.split("/")[1]: round(statistics.median(s[k] for s in stats[1:]), 2) for k in KEYS},
        "update_tokens": [s.get("perf/update_tokens") for s in stats],
        "useful_tokens": [s.get("perf/useful_tokens") for s in stats],
        "machine": machine(),
    }
    out = HERE / "results" / "goals" / "update_time.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as f:
        f.write(json.dumps(result) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
