#!/usr/bin/env python3
"""Benchmark (not a test): seconds per SFT step, seconds per PPO update split into generate / score /
update, and generated tokens/s, printed as one JSON line.

    python bench/bench.py --model smollm2-135m-instruct --bf16
    python bench/bench.py --model path/to/local/model --batch 8 --max-new-tokens 64 --steps 3
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import hybrid_trainer as ht  # noqa: E402
import rewards  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--data", default=str(Path(__file__).resolve().parent.parent / "data" / "train.json"))
    p.add_argument("--batch", type=int, default=8, help="SFT_BATCH and PPO_BATCH")
    p.add_argument("--mini", type=int, default=4, help="PPO_MINI")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--steps", type=int, default=3, help="timed steps of each kind (after one warm-up)")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--reward", default='{"type": "chrf"}', help="reward spec (JSON)")
    args = p.parse_args()

    cfg = ht.Config.from_dict({"MODEL": args.model, "TRAIN_FILE": args.data, "OUTPUT_DIR": "-", "SEED": 0,
                               "SFT_BATCH": args.batch, "PPO_BATCH": args.batch, "PPO_MINI": args.mini,
                               "MAX_NEW_TOKENS": args.max_new_tokens, "BF16": args.bf16, "TOP_P": 1.0,
                               "REPETITION_PENALTY": 1.0, "NO_REPEAT_NGRAM_SIZE": 0, "REWARD": json.loads(args.reward)})
    device = ht.pick_device(cfg)
    t0 = time.perf_counter()
    policy, ref, tok = ht.load_model(cfg, device)
    load_s = time.perf_counter() - t0
    fmt = ht.resolve_prompt_format(cfg, tok)
    examples = ht.tokenize_examples(ht.load_examples(cfg), cfg, tok, fmt, "TRAIN_FILE")
    reward = rewards.make_reward(cfg.REWARD, device=device, reference=(ref, tok))
    trainer = ht.HybridTrainer(cfg, policy, ref, tok, reward, device, n_items=len(examples))

    sft, ppo = [], []
    for i in range(args.steps + 1):
        batch = examples[i * args.batch:(i + 1) * args.batch]
        t = time.perf_counter()
        trainer.sft_step(batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
        sft.append(time.perf_counter() - t)
        ppo.append(trainer.ppo_update(batch))
    sft, ppo = sft[1:], ppo[1:]  # drop warm-up
    mean = lambda key: statistics.mean(s[key] for s in ppo)  # noqa: E731
    print(json.dumps({
        "model": args.model, "device": device.type, "bf16": args.bf16, "torch_threads": torch.get_num_threads(),
        "batch": args.batch, "ppo_mini": args.mini, "max_new_tokens": args.max_new_tokens, "load_s": round(load_s, 2),
        "sft_step_s": round(statistics.mean(sft), 3),
        "ppo_update_s": round(mean("time/generate_s") + mean("time/score_s") + mean("time/update_s"), 3),
        "ppo_generate_s": round(mean("time/generate_s"), 3), "ppo_score_s": round(mean("time/score_s"), 3),
        "ppo_update_only_s": round(mean("time/update_s"), 3),
        "generated_tokens_per_s": round(mean("time/tokens_per_s"), 1),
        "mean_response_tokens": round(mean("ppo/response_length"), 1),
    }))


if __name__ == "__main__":
    main()
