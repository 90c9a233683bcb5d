#!/usr/bin/env python3
"""The GPU check's runs (bench/gpu_check.sh runs this after the tests): short SFT, PPO (value head), GRPO and LoRA
runs of SmolLM2-135M-Instruct's shapes, one table of seconds per phase, tokens/s, MFU against the GPU's bf16 peak, and
peak GPU memory. On a CPU (CI) the same code runs as a smoke test on a tiny model.

    python bench/gpu_check.py --model DIR [--steps 3] [--out gpu_check.md]

FLOPs as bench/bench.py counts them: 2 x non-embedding parameters per token forward, x3 for forward + backward of full
fine-tuning (x2 with LoRA), over real tokens; generation counts prompt and generated tokens once.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# dense bf16 peak FLOP/s by device name (vendor data sheets); anything else: a measured matmul rate
BF16_PEAK = {
    "H100 80GB HBM3": 989e12,
    "H100 SXM": 989e12,
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H200": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
    "A10G": 125e12,
}
RUNS = {  # name -> (config overrides, LoRA)
    "sft": {"MODE": "sft"},
    "ppo (gae)": {"MODE": "ppo"},
    "grpo": {
        "MODE": "ppo",
        "ADVANTAGE": "grpo",
        "NUM_GENERATIONS": 4,
        "PPO_BATCH": 4,
        "KL_IN": "loss",
        "KL_PENALTY": "k3",
        "INIT_KL_COEF": 0.04,
    },
    "lora r=16 (grpo)": {"MODE": "ppo", "ADVANTAGE": "grpo", "NUM_GENERATIONS": 4, "PPO_BATCH": 4, "LORA_R": 16, "INIT_KL_COEF": 0.0},
}


def peak_flops(torch, device) -> tuple[float, str]:
    if device.type == "cuda":
        name = torch.cuda.get_device_name()
        for key, value in BF16_PEAK.items():
            if key in name:
                return value, f"{name}: data-sheet bf16 peak {value / 1e12:.0f} TFLOP/s"
    from bench import matmul_rate

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rate = matmul_rate(dtype, device, 1024)
    return rate, f"{device.type}: measured matmul rate {rate / 1e12:.2f} TFLOP/s ({str(dtype)[6:]})"


def one(name: str, overrides: dict, model: str, steps: int, device, bf16: bool) -> dict:
    import torch

    import hybrid_trainer as ht
    import rewards

    cfg = ht.Config.from_dict(
        {
            "MODEL": model,
            "TRAIN_FILE": str(ROOT / "data" / "train.json"),
            "OUTPUT_DIR": "-",
            "SEED": 0,
            "BF16": bf16,
            "SFT_BATCH": 8,
            "PPO_BATCH": 8,
            "MAX_NEW_TOKENS": 48,
            "TEMPERATURE": 1.0,
            "TOP_P": 1.0,
            "REPETITION_PENALTY": 1.0,
            "NO_REPEAT_NGRAM_SIZE": 0,
            "GENERATION_BACKEND": "hf",
            "PROMPT_FORMAT": "auto",
            "REWARD": {"type": "chrf"},
            **overrides,
        }
    )
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    policy, ref, tok = ht.load_model(cfg, device, bf16)
    fmt = ht.resolve_prompt_format(cfg, tok)
    examples = ht.tokenize_examples(ht.load_examples(cfg, 0), cfg, tok, fmt, "TRAIN_FILE")
    trainer = ht.HybridTrainer(
        cfg, policy, ref, tok, rewards.make_reward(cfg.REWARD, device=device), device, plan=ht.api_plan(cfg, len(examples), policy.lm, bf16)
    )
    n_matmul = sum(p.numel() for p in policy.lm.parameters()) - policy.lm.get_input_embeddings().weight.numel()
    train = 2 if cfg.LORA_R else 3
    rows = []
    for i in range(steps + 1):  # the first is a warm-up
        t = time.perf_counter()
        if cfg.MODE == "sft":
            batch = examples[i * 8 : (i + 1) * 8]
            trainer.sft_step(batch)
            tokens = sum(len(e.prompt_ids) + len(e.target_ids) for e in batch)
            rows.append({"step_s": time.perf_counter() - t, "train_flops": 2 * n_matmul * tokens * train})
        else:
            batch = examples[i * cfg.PPO_BATCH : (i + 1) * cfg.PPO_BATCH]
            s = trainer.ppo_update(batch)
            generated = s["ppo/response_length"] * cfg.PPO_BATCH * cfg.NUM_GENERATIONS
            prompt = sum(len(e.prompt_ids) for e in batch) * cfg.NUM_GENERATIONS
            rows.append(
                {
                    "step_s": time.perf_counter() - t,
                    "generate_s": s["time/generate_s"],
                    "update_s": s["time/update_s"],
                    "gen_tokens": generated,
                    "gen_flops": 2 * n_matmul * (prompt + generated),
                    "train_flops": 2 * n_matmul * s["time/tokens"] * (train * cfg.PPO_EPOCHS + 1 + (ref is not None)),
                }
            )
        if device.type == "cuda":
            torch.cuda.synchronize()
    rows = rows[1:]
    mean = lambda key: statistics.mean(r[key] for r in rows)  # noqa: E731
    out = {"run": name, "step_s": mean("step_s"), "train_flops": mean("train_flops")}
    if "generate_s" in rows[0]:
        out.update(
            {
                "generate_s": mean("generate_s"),
                "update_s": mean("update_s"),
                "gen_tokens_per_s": mean("gen_tokens") / mean("generate_s"),
                "gen_flops": mean("gen_flops"),
            }
        )
    out["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    del trainer, policy, ref
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--only", default="")
    p.add_argument("--out", default="")
    args = p.parse_args()
    import torch

    sys.path.insert(0, str(ROOT / "bench"))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    peak, where = peak_flops(torch, device)
    lines = [
        f"GPU check: {where}; {'bf16' if bf16 else 'fp32'}; model {args.model}; mean of {args.steps} steps after a warm-up",
        "",
        "| run | step s | generate s | update s | generated tokens/s | MFU generate | MFU train | peak GPU memory GiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, overrides in RUNS.items():
        if args.only and name.split()[0] not in args.only.split(","):
            continue
        r = one(name, overrides, args.model, args.steps, device, bf16)
        train_s = r.get("update_s", r["step_s"])
        cells = [
            name,
            f"{r['step_s']:.2f}",
            f"{r['generate_s']:.2f}" if "generate_s" in r else "-",
            f"{train_s:.2f}",
            f"{r['gen_tokens_per_s']:.0f}" if "gen_tokens_per_s" in r else "-",
            f"{r['gen_flops'] / r['generate_s'] / peak:.3f}" if "generate_s" in r else "-",
            f"{r['train_flops'] / train_s / peak:.3f}",
            f"{r['peak_gib']:.2f}" if r["peak_gib"] is not None else "n/a (CPU)",
        ]
        lines.append("| " + " | ".join(cells) + " |")
        print(json.dumps(r), flush=True)
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")


if __name__ == "__main__":
    main()
