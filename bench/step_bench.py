#!/usr/bin/env python3
"""Benchmark (not a test) of the hot path on fixed inputs, so two versions of the trainer do the same work:
`ppo_step` on 8 demo prompts with their reference responses as the "sampled" responses, and `sft_step` on the
same 8, SmolLM2-135M, fp32. Prints one JSON line: seconds per step (mean of --steps after a warm-up), tokens/s,
peak RSS.

    python bench/step_bench.py                        # this checkout
    python bench/step_bench.py --root /tmp/base       # another checkout (git worktree add /tmp/base REV)
    python bench/step_bench.py --set ADVANTAGE=grpo --set NUM_GENERATIONS=4 --set PPO_BATCH=2
    python bench/step_bench.py --set TEACHER_MODEL='"self"' --set DISTILL='"token_reverse_kl"'   # distillation's cost
"""

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default=str(Path(__file__).resolve().parent.parent), help="checkout whose trainer to time")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--mini", type=int, default=8, help="PPO_MINI (8 = the whole batch)")
    p.add_argument("--set", action="append", default=[], help="KEY=JSON config override")
    args = p.parse_args()
    sys.path.insert(0, args.root)
    import torch

    import hybrid_trainer as ht

    extra = {k: json.loads(v) for k, v in (s.split("=", 1) for s in args.set)}
    cfg = ht.Config.from_dict({"MODE": "ppo", "TRAIN_FILE": str(Path(args.root) / "data" / "train.json"), "OUTPUT_DIR": "-",
                               "SEED": 0, "PPO_BATCH": 8, "PPO_MINI": args.mini, "PPO_EPOCHS": 4, "SFT_BATCH": 8,
                               "BF16": False, "PROMPT_FORMAT": "chat", "TEMPERATURE": 1.0, **extra})
    torch.manual_seed(0)
    policy, ref, tok = ht.load_model(cfg, torch.device("cpu"))
    examples = ht.tokenize_examples(ht.load_examples(cfg), cfg, tok, "chat", "TRAIN_FILE")
    teacher = ht.load_teacher(cfg, torch.device("cpu"), False, ref) if hasattr(ht, "load_teacher") else None
    trainer = ht.HybridTrainer(cfg, policy, ref, tok, **({"teacher": teacher} if teacher is not None else {}))
    G = getattr(cfg, "NUM_GENERATIONS", 1)
    ppo_s, sft_s, ppo_tokens, sft_tokens = [], [], [], []
    for i in range(args.steps + 1):
        batch = examples[i * 8:(i + 1) * 8]
        rows = [e for e in batch[:8 // G] for _ in range(G)]
        t = time.perf_counter()
        teacher_queries = [e.teacher_prompt_ids for e in rows] if getattr(cfg, "TEACHER_MODEL", "") == "self" else None
        trainer.ppo_step([e.prompt_ids for e in rows], [e.target_ids for e in rows], [float(j % 3) for j in range(len(rows))],
                         **({"teacher_queries": teacher_queries} if teacher_queries else {}))
        ppo_s.append(time.perf_counter() - t)
        ppo_tokens.append(sum(len(e.prompt_ids) + len(e.target_ids) for e in rows) * cfg.PPO_EPOCHS)
        t = time.perf_counter()
        trainer.sft_step(batch)
        sft_s.append(time.perf_counter() - t)
        sft_tokens.append(sum(len(e.prompt_ids) + len(e.target_ids) for e in batch))
    print(json.dumps({"root": args.root, "overrides": extra, "ppo_mini": args.mini,
                      "ppo_step_s": round(statistics.mean(ppo_s[1:]), 3), "sft_step_s": round(statistics.mean(sft_s[1:]), 3),
                      "ppo_tokens_per_s": round(sum(ppo_tokens[1:]) / sum(ppo_s[1:]), 1),
                      "sft_tokens_per_s": round(sum(sft_tokens[1:]) / sum(sft_s[1:]), 1),
                      "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}))


if __name__ == "__main__":
    main()
