#!/usr/bin/env python3
"""Benchmark (not a test) of the hot path on fixed inputs, so two versions of the trainer do the same work:
`ppo_step` on 8 demo prompts with their reference responses as the "sampled" responses, and `sft_step` on the
same 8, SmolLM2-135M, fp32. Prints one JSON line: seconds per step (mean of --steps after a warm-up, and the
warm-up's), tokens/s, page faults and system seconds per PPO update (the kernel's share), peak RSS.

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
from typing import Any, NamedTuple


class Bench(NamedTuple):
    """A trainer on fixed inputs, as setup() builds it."""

    ht: Any  # the checkout's hybrid_trainer module
    cfg: Any
    trainer: Any
    examples: list


def overrides(sets: list) -> dict:
    """--set KEY=JSON arguments -> config overrides."""
    return {k: json.loads(v) for k, v in (s.split("=", 1) for s in sets)}


def setup(root: str, extra: dict, mini: int = 8) -> Bench:
    """The trainer of checkout `root` (SmolLM2-135M, fp32 unless extra sets BF16) and the demo's tokenized items."""
    sys.path.insert(0, root)
    import torch

    import hybrid_trainer as ht
    import runtime

    cfg = ht.Config.from_dict(
        {
            "MODE": "ppo",
            "TRAIN_FILE": str(Path(root) / "data" / "train.json"),
            "OUTPUT_DIR": "-",
            "SEED": 0,
            "PPO_BATCH": 8,
            "PPO_MINI": mini,
            "PPO_EPOCHS": 4,
            "SFT_BATCH": 8,
            "BF16": False,
            "PROMPT_FORMAT": "chat",
            "TEMPERATURE": 1.0,
            **extra,
        }
    )
    torch.manual_seed(0)
    if hasattr(ht, "keep_freed_memory"):  # as run() does on the CPU (an older checkout: glibc's defaults)
        runtime.keep_freed_memory()
    policy, ref, tok = ht.load_model(cfg, torch.device("cpu"))
    examples = ht.tokenize_examples(ht.load_examples(cfg), cfg, tok, "chat", "TRAIN_FILE")
    teacher = runtime.load_teacher(cfg, torch.device("cpu"), False, ref) if hasattr(ht, "load_teacher") else None
    trainer = ht.HybridTrainer(cfg, policy, ref, tok, **({"teacher": teacher} if teacher is not None else {}))
    return Bench(ht, cfg, trainer, examples)


def ppo_update(b: Bench, i: int) -> int:
    """One PPO update on items 8i .. 8i+7 (their reference responses as the sampled ones) -> tokens processed."""
    G = getattr(b.cfg, "NUM_GENERATIONS", 1)
    rows = [e for e in b.examples[i * 8 : (i + 1) * 8][: 8 // G] for _ in range(G)]
    teacher_queries = [e.teacher_prompt_ids for e in rows] if getattr(b.cfg, "TEACHER_MODEL", "") == "self" else None
    b.trainer.ppo_step(
        [e.prompt_ids for e in rows],
        [e.target_ids for e in rows],
        [float(j % 3) for j in range(len(rows))],
        **({"teacher_queries": teacher_queries} if teacher_queries else {}),
    )
    return sum(len(e.prompt_ids) + len(e.target_ids) for e in rows) * b.cfg.PPO_EPOCHS


def sft_step(b: Bench, i: int) -> int:
    """One SFT step on items 8i .. 8i+7 -> tokens processed."""
    batch = b.examples[i * 8 : (i + 1) * 8]
    b.trainer.sft_step(batch)
    return sum(len(e.prompt_ids) + len(e.target_ids) for e in batch)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default=str(Path(__file__).resolve().parent.parent), help="checkout whose trainer to time")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--mini", type=int, default=8, help="PPO_MINI (8 = the whole batch)")
    p.add_argument("--set", action="append", default=[], help="KEY=JSON config override")
    args = p.parse_args()
    extra = overrides(args.set)
    b = setup(args.root, extra, args.mini)
    ppo_s, sft_s, ppo_tokens, sft_tokens, faults, system_s = [], [], [], [], [], []
    for i in range(args.steps + 1):
        t, before = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
        ppo_tokens.append(ppo_update(b, i))
        ppo_s.append(time.perf_counter() - t)
        after = resource.getrusage(resource.RUSAGE_SELF)
        faults.append(after.ru_minflt - before.ru_minflt)
        system_s.append(after.ru_stime - before.ru_stime)
        t = time.perf_counter()
        sft_tokens.append(sft_step(b, i))
        sft_s.append(time.perf_counter() - t)
    print(
        json.dumps(
            {
                "root": args.root,
                "overrides": extra,
                "ppo_mini": args.mini,
                "ppo_step_s": round(statistics.mean(ppo_s[1:]), 3),
                "sft_step_s": round(statistics.mean(sft_s[1:]), 3),
                "first_ppo_step_s": round(ppo_s[0], 3),  # the warm-up: the run's first update pays it too
                "ppo_page_faults": round(statistics.mean(faults[1:])),
                "ppo_system_s": round(statistics.mean(system_s[1:]), 2),
                "ppo_tokens_per_s": round(sum(ppo_tokens[1:]) / sum(ppo_s[1:]), 1),
                "sft_tokens_per_s": round(sum(sft_tokens[1:]) / sum(sft_s[1:]), 1),
                "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
            }
        )
    )


if __name__ == "__main__":
    main()
