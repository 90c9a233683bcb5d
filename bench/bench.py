#!/usr/bin/env python3
"""Benchmark (not a test). Each iteration runs an SFT step and a PPO update, as hybrid mode does (both
optimizers hold state); after one warm-up it prints one JSON line with, per phase (generate, reference
forward, rollout, PPO epochs, SFT step), seconds, tokens/s and MFU: achieved matmul FLOP/s as a fraction of
this machine's measured matmul rate in the dtype used, twice: against an n = 2048 square matmul ("mfu") and against
the model's own matmul shapes at one PPO minibatch's rows ("mfu_model_shapes": the rate the steps could reach).
Also peak memory (RSS on CPU,
torch.cuda.max_memory_allocated on CUDA) per process.

    python bench/bench.py                                  # SmolLM2-135M, full fine-tuning, fp32
    python bench/bench.py --config configs/demo.json       # the demo's batch sizes, lengths and reward
    python bench/bench.py --lora 16 --bf16                 # LoRA r=16, bf16 autocast
    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 bench/bench.py      # 2 processes (batch sizes are global)

FLOPs are counted as 2 x (non-embedding parameters) per token for a forward pass and 3x that for forward +
backward of full fine-tuning (2x with LoRA: no weight gradients of the frozen base), over real tokens
(padding excluded); generation counts prompt and generated tokens once each (KV cache).
"""

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import hybrid_trainer as ht  # noqa: E402
import rewards  # noqa: E402
import runtime  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def best_seconds(fn: Callable, device: torch.device, reps: int) -> float:
    """Best wall time of fn() over `reps` calls after one warm-up (CUDA synchronised around each)."""
    best = float("inf")
    for i in range(reps + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:
            best = min(best, time.perf_counter() - t0)
    return best


def matmul_rate(dtype: torch.dtype, device: torch.device, n: int = 2048) -> float:
    """Measured FLOP/s of an n x n matmul in `dtype` (best of 5 after a warm-up)."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / best_seconds(lambda: a @ b, device, 5)


def shape_rate(lm: torch.nn.Module, rows: int, dtype: torch.dtype, device: torch.device) -> float:
    """Measured FLOP/s of the model's own matmuls: (rows x in) @ (in x out) for every nn.Linear of `lm` (the LM head
    included), each unique shape timed best of 3 after a warm-up, weighted by how often the model has it."""
    counts: dict = {}
    for m in lm.modules():
        if isinstance(m, torch.nn.Linear):
            counts[(m.in_features, m.out_features)] = counts.get((m.in_features, m.out_features), 0) + 1
    flops = seconds = 0.0
    for (n_in, n_out), count in counts.items():
        x, w = torch.randn(rows, n_in, device=device, dtype=dtype), torch.randn(n_out, n_in, device=device, dtype=dtype)
        flops += count * 2 * rows * n_in * n_out
        seconds += count * best_seconds(lambda x=x, w=w: x @ w.T, device, 3)
    return flops / seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="a trainer config whose model, batch sizes, lengths and reward to use")
    p.add_argument("--model")
    p.add_argument("--data", default=str(ROOT / "data" / "train.json"))
    p.add_argument("--batch", type=int, help="SFT_BATCH and PPO_BATCH (default 8)")
    p.add_argument("--mini", type=int, help="PPO_MINI (default 4)")
    p.add_argument("--max-new-tokens", type=int, help="default 48")
    p.add_argument("--steps", type=int, default=3, help="timed iterations (after one warm-up)")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--lora", type=int, default=0, help="LORA_R (0 = full fine-tuning)")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--fsdp", action="store_true")
    p.add_argument("--reward", help='reward spec (JSON; default {"type": "chrf"})')
    args = p.parse_args()

    base = {
        "MODEL": "smollm2-135m-instruct",
        "SFT_BATCH": 8,
        "PPO_BATCH": 8,
        "PPO_MINI": 4,
        "MAX_NEW_TOKENS": 48,
        "REWARD": {"type": "chrf"},
        "TOP_P": 1.0,
        "REPETITION_PENALTY": 1.0,
        "NO_REPEAT_NGRAM_SIZE": 0,
        "GENERATION_BACKEND": "hf",
    }
    if args.config:
        keep = (
            "MODEL",
            "SFT_BATCH",
            "PPO_BATCH",
            "PPO_MINI",
            "PPO_EPOCHS",
            "MAX_NEW_TOKENS",
            "MAXSEQ",
            "REWARD",
            "PROMPT_FORMAT",
            "TEMPERATURE",
            "TOP_P",
            "REPETITION_PENALTY",
            "NO_REPEAT_NGRAM_SIZE",
            "GRAD_ACCUM",
            "CATEGORY_FIELD",
            "ADVANTAGE",
            "NUM_GENERATIONS",
            "KL_IN",
            "KL_PENALTY",
            "INIT_KL_COEF",
            "LOSS_AGG",
            "IMPORTANCE_LEVEL",
            "CLIPRANGE_HIGH",
            "HYBRID",
            "GATE_THRESHOLD",
            "MIX_COEF",
            "MIX_COEF_END",
            "MIX_SCHEDULE",
            "SFT_LOSS",
            "GENERATION_BACKEND",
        )
        base.update({k: v for k, v in json.loads(Path(args.config).read_text()).items() if k in keep})
    for key, value in (
        ("MODEL", args.model),
        ("SFT_BATCH", args.batch),
        ("PPO_BATCH", args.batch),
        ("PPO_MINI", args.mini),
        ("MAX_NEW_TOKENS", args.max_new_tokens),
        ("REWARD", args.reward and json.loads(args.reward)),
    ):
        if value is not None:
            base[key] = value
    cfg = ht.Config.from_dict(
        {
            **base,
            "TRAIN_FILE": args.data,
            "OUTPUT_DIR": "-",
            "SEED": 0,
            "BF16": args.bf16,
            "LORA_R": args.lora,
            "GRADIENT_CHECKPOINTING": args.gradient_checkpointing,
            "FSDP": args.fsdp,
        }
    )
    procs = runtime.Processes.from_env()
    device = runtime.pick_device(cfg, procs)
    runtime.init_processes(device, procs)
    if device.type == "cpu":  # as run() does: freed blocks stay in the heap (without it, page faults diluted the rates)
        runtime.keep_freed_memory()
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    peak_rate = sum(runtime.gather_objects(matmul_rate(dtype, device)))  # all processes together: phases count global tokens
    t0 = time.perf_counter()
    policy, ref, tok = ht.load_model(cfg, device)
    load_s = time.perf_counter() - t0
    fmt = ht.resolve_prompt_format(cfg, tok)
    examples = ht.tokenize_examples(ht.load_examples(cfg), cfg, tok, fmt, "TRAIN_FILE")
    reward = rewards.make_reward(cfg.REWARD, device=device, reference=(ref, tok))
    trainer = ht.HybridTrainer(cfg, policy, ref, tok, reward, device, n_items=len(examples))
    embed = policy.lm.get_input_embeddings().weight.numel()
    n_matmul = sum(p.numel() for p in policy.lm.parameters()) - embed  # tied LM head: counted once, as a matmul
    train_factor = 2 if args.lora else 3  # forward + backward, relative to a forward

    sft, ppo = [], []
    for i in range(args.steps + 1):
        batch = examples[i * cfg.SFT_BATCH : (i + 1) * cfg.SFT_BATCH]
        t = time.perf_counter()
        trainer.sft_step(batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
        sft.append((time.perf_counter() - t, sum(len(e.prompt_ids) + len(e.target_ids) for e in batch)))
        prompts = examples[i * cfg.PPO_BATCH : (i + 1) * cfg.PPO_BATCH]  # x NUM_GENERATIONS responses
        ppo.append(trainer.ppo_update(prompts) | {"prompt_tokens": sum(len(e.prompt_ids) for e in prompts) * cfg.NUM_GENERATIONS})
    sft, ppo = sft[1:], ppo[1:]  # drop warm-up
    mean = lambda key: statistics.mean(s[key] for s in ppo)  # noqa: E731

    batch_tokens = mean("time/tokens")  # real tokens of prompts + responses in one PPO batch
    # the model's own shapes, at the rows of one PPO minibatch's forward (all processes together, as peak_rate)
    model_rate = sum(runtime.gather_objects(shape_rate(policy.lm, max(int(batch_tokens * cfg.PPO_MINI / cfg.PPO_BATCH), 1), dtype, device)))

    def phase(seconds: float, tokens: float, passes: float) -> dict:
        flops = 2 * n_matmul * tokens * passes
        return {
            "s": round(seconds, 3),
            "tokens_per_s": round(tokens / seconds, 1),
            "mfu": round(flops / seconds / peak_rate, 4),
            "mfu_model_shapes": round(flops / seconds / model_rate, 4),
        }

    generated = mean("ppo/response_length") * cfg.PPO_BATCH * cfg.NUM_GENERATIONS
    rollout_policy_s = mean("time/rollout_s") - mean("time/reference_forward_s")
    phases = {
        "generate": phase(mean("time/generate_s"), mean("prompt_tokens") + generated, 1),
        "reference_forward": phase(mean("time/reference_forward_s"), batch_tokens, 1),
        # fused: what is left of the rollout beside the reference is bookkeeping (1 ms read as 70x the matmul rate)
        "rollout_policy_forward": (
            phase(rollout_policy_s, batch_tokens, 1)
            if rollout_policy_s > 0.25 * mean("time/reference_forward_s")
            else "fused into the first minibatch"
        ),
        "ppo_epochs": phase(mean("time/ppo_epochs_s"), batch_tokens * cfg.PPO_EPOCHS, train_factor),
        "sft_step": phase(statistics.mean(s for s, _ in sft), statistics.mean(n for _, n in sft), train_factor),
    }
    peak_gib = (
        torch.cuda.max_memory_allocated() if device.type == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    ) / 2**30
    peaks = runtime.gather_objects(round(peak_gib, 2))
    if not runtime.is_main():
        return
    print(
        json.dumps(
            {
                "model": cfg.MODEL,
                "device": device.type,
                "cpu": runtime.cpu_model() if device.type == "cpu" else torch.cuda.get_device_name(),
                "dtype": str(dtype).split(".")[-1],
                "lora_r": args.lora,
                "fsdp": args.fsdp,
                "gradient_checkpointing": args.gradient_checkpointing,
                "processes": runtime.world_size(),
                "torch_threads": torch.get_num_threads(),
                "trainable_params": sum(p.numel() for p in trainer.optim.params) if not args.fsdp else None,
                "sft_batch": cfg.SFT_BATCH,
                "ppo_batch": cfg.PPO_BATCH,
                "ppo_mini": cfg.PPO_MINI,
                "ppo_epochs": cfg.PPO_EPOCHS,
                "max_new_tokens": cfg.MAX_NEW_TOKENS,
                "load_s": round(load_s, 2),
                "matmul_gflops": round(peak_rate / 1e9, 1),
                "matmul_gflops_model_shapes": round(model_rate / 1e9, 1),
                "peak_mem_gib_per_process": peaks,
                "peak_mem_kind": "cuda_max_allocated" if device.type == "cuda" else "rss",
                "sft_step_s": phases["sft_step"]["s"],
                "ppo_update_s": round(mean("time/generate_s") + mean("time/score_s") + mean("time/update_s"), 3),
                "ppo_score_s": round(mean("time/score_s"), 3),
                "mean_response_tokens": round(mean("ppo/response_length"), 1),
                "phases": phases,
            }
        )
    )


if __name__ == "__main__":
    main()
