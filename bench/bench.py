#!/usr/bin/env python3
"""Benchmark (not a test): seconds per SFT step, seconds per PPO update split into generate / score /
update, tokens/s and peak memory (RSS on CPU, torch.cuda.max_memory_allocated on CUDA), printed as one
JSON line. Each iteration runs an SFT step and a PPO update, as hybrid mode does (both optimizers hold state).

    python bench/bench.py --model smollm2-135m-instruct --bf16
    python bench/bench.py --lora 16                                   # LoRA r=16 instead of full fine-tuning
    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 bench/bench.py      # 2 processes (batch sizes are global)
"""

import argparse
import json
import resource
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
    p.add_argument("--lora", type=int, default=0, help="LORA_R (0 = full fine-tuning)")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--fsdp", action="store_true")
    p.add_argument("--reward", default='{"type": "chrf"}', help="reward spec (JSON)")
    args = p.parse_args()

    cfg = ht.Config.from_dict({"MODEL": args.model, "TRAIN_FILE": args.data, "OUTPUT_DIR": "-", "SEED": 0,
                               "SFT_BATCH": args.batch, "PPO_BATCH": args.batch, "PPO_MINI": args.mini,
                               "MAX_NEW_TOKENS": args.max_new_tokens, "BF16": args.bf16, "TOP_P": 1.0, "LORA_R": args.lora,
                               "GRADIENT_CHECKPOINTING": args.gradient_checkpointing, "FSDP": args.fsdp,
                               "REPETITION_PENALTY": 1.0, "NO_REPEAT_NGRAM_SIZE": 0, "REWARD": json.loads(args.reward)})
    device = ht.pick_device(cfg)
    ht.init_processes(device)
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
        sft_tokens = trainer.sft_step(batch)["sft/tokens"] + sum(len(e.prompt_ids) for e in batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
        sft.append(time.perf_counter() - t)
        ppo.append(trainer.ppo_update(batch))
    sft, ppo = sft[1:], ppo[1:]  # drop warm-up
    mean = lambda key: statistics.mean(s[key] for s in ppo)  # noqa: E731
    peak_gib = (torch.cuda.max_memory_allocated() if device.type == "cuda"
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**30
    peaks = ht.gather_objects(round(peak_gib, 2))
    if not ht.is_main():
        return
    print(json.dumps({
        "model": args.model, "device": device.type, "bf16": args.bf16, "lora_r": args.lora, "fsdp": args.fsdp,
        "gradient_checkpointing": args.gradient_checkpointing, "processes": ht.world_size(),
        "torch_threads": torch.get_num_threads(),
        "trainable_params": sum(p.numel() for p in trainer.params) if not args.fsdp else None,
        "batch": args.batch, "ppo_mini": args.mini, "max_new_tokens": args.max_new_tokens, "load_s": round(load_s, 2),
        "peak_mem_gib_per_process": peaks, "peak_mem_kind": "cuda_max_allocated" if device.type == "cuda" else "rss",
        "sft_step_s": round(statistics.mean(sft), 3), "sft_tokens_per_s": round(sft_tokens / statistics.mean(sft), 1),
        "ppo_update_s": round(mean("time/generate_s") + mean("time/score_s") + mean("time/update_s"), 3),
        "ppo_generate_s": round(mean("time/generate_s"), 3), "ppo_score_s": round(mean("time/score_s"), 3),
        "ppo_update_only_s": round(mean("time/update_s"), 3),
        "generated_tokens_per_s": round(mean("time/tokens_per_s"), 1),
        "mean_response_tokens": round(mean("ppo/response_length"), 1),
    }))


if __name__ == "__main__":
    main()
