#!/usr/bin/env python3
"""The bf16 levers, measured rather than assumed (not a test): one training step of SmolLM2-135M (forward, the
response tokens' log-probs through the LM head, backward, fused AdamW) on 8 sequences of --tokens tokens, each
variant in its own process, best of --steps after two warm-ups. The model is set up as load_model sets the policy up
on a CPU (weights read into memory, not memory-mapped; the CPU attention function; glibc told to keep freed memory).
--response-tokens K: only the last K positions' logits, as a PPO update computes them (default: every position).

- fp32:            fp32 weights, no autocast
- autocast:        fp32 weights, bf16 autocast (what BF16 true does)
- bf16_weights:    the weights themselves in bf16, no autocast: no per-call weight casts (the upper bound of keeping a
                   bf16 copy of the weights for the forward; AdamW on bf16 weights is not what training should do)
- bf16_copy:       what a bf16 weight copy would be: the model in bf16 for the forward and backward, fp32 master
                   weights in AdamW (each step: bf16 gradients cast into the masters' fp32 .grad, the fused step on
                   the masters, the bf16 weights refreshed from them)
- autocast_compile: autocast with torch.compile of the model's forward (inductor, fixed shapes)

and the matmul rate at the model's own shapes (bench.shape_rate) in the variant's dtype, so each row's MFU says how
near the step is to what the matrix units do at these sizes.

    python bench/bf16_levers.py                      # every variant
    python bench/bf16_levers.py --only autocast,bf16_weights --tokens 256
    python bench/bf16_levers.py --only autocast,bf16_copy --tokens 80 --response-tokens 32 --steps 5   # the sketch's job
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = ("fp32", "autocast", "bf16_weights", "bf16_copy", "autocast_compile")


def one(variant: str, tokens: int, steps: int, response: int = 0) -> dict:
    import torch

    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "bench"))
    import bench
    import hybrid_trainer as ht
    import runtime

    cfg = ht.Config.from_dict({"MODE": "sft", "TRAIN_FILE": str(ROOT / "data" / "train.json"), "OUTPUT_DIR": "-", "BF16": False})
    paths = runtime.resolve_model(cfg)
    runtime.prepare_weights(cfg, paths)
    from transformers import AutoModelForCausalLM

    runtime.keep_freed_memory()
    in_bf16 = variant in ("bf16_weights", "bf16_copy")
    lm = AutoModelForCausalLM.from_pretrained(paths.weights, dtype=torch.bfloat16 if in_bf16 else torch.float32, disable_mmap=True)
    runtime.use_cpu_attention(lm)
    lm.train()
    forward = torch.compile(lm, dynamic=False) if variant == "autocast_compile" else lm
    params = list(lm.parameters())
    masters = [p.detach().float().requires_grad_() for p in params] if variant == "bf16_copy" else params
    opt = torch.optim.AdamW(masters, lr=1e-6, fused=True)
    ids = torch.randint(0, lm.config.vocab_size, (8, tokens), generator=torch.Generator().manual_seed(0))
    keep = response + 1 if response else 0  # logits_to_keep: 0 = every position
    use_autocast = variant.startswith("autocast")
    times = []
    for _ in range(steps + 2):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_autocast):
            logits = forward(input_ids=ids, logits_to_keep=keep).logits[:, :-1]
        targets = ids[:, -logits.shape[1] :, None]
        loss = -torch.log_softmax(logits.float(), -1).gather(-1, targets).mean()
        loss.backward()
        if masters is not params:  # bf16 gradients into the fp32 masters; the step; the bf16 weights refreshed
            with torch.no_grad():
                for p, m in zip(params, masters):
                    m.grad, p.grad = p.grad.float(), None
        opt.step()
        opt.zero_grad(set_to_none=True)
        if masters is not params:
            with torch.no_grad():
                torch._foreach_copy_(params, masters)
        times.append(time.perf_counter() - t0)
    best = min(times[2:])
    n_matmul = sum(p.numel() for p in lm.parameters()) - lm.get_input_embeddings().weight.numel()
    flops = 3 * 2 * n_matmul * 8 * tokens  # forward + backward of full fine-tuning (SmolLM2's tied LM head not counted)
    dtype = torch.float32 if variant == "fp32" else torch.bfloat16
    rate = bench.shape_rate(lm, 8 * tokens, dtype, torch.device("cpu"))
    return {
        "variant": variant,
        "tokens": 8 * tokens,
        "response_tokens": response,
        "step_s": round(best, 3),
        "first_step_s": round(times[0], 1),
        "tokens_per_s": round(8 * tokens / best, 1),
        "achieved_gflops": round(flops / best / 1e9, 1),
        "model_shape_gflops": round(rate / 1e9, 1),
        "mfu_model_shapes": round(flops / best / rate, 3),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=",".join(VARIANTS))
    p.add_argument("--tokens", type=int, default=128, help="tokens per sequence (8 sequences)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--response-tokens", type=int, default=0, help="logits only for the last K positions (0: every one)")
    p.add_argument("--variant", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.variant:
        return print(json.dumps(one(args.variant, args.tokens, args.steps, args.response_tokens)))
    for variant in args.only.split(","):
        proc = subprocess.run(
            [
                sys.executable,
                __file__,
                "--variant",
                variant,
                "--tokens",
                str(args.tokens),
                "--steps",
                str(args.steps),
                "--response-tokens",
                str(args.response_tokens),
            ],
            capture_output=True,
            text=True,
        )
        lines = [x for x in proc.stdout.splitlines() if x.startswith("{")]
        print(lines[-1] if lines else json.dumps({"variant": variant, "error": proc.stderr[-600:]}), flush=True)


if __name__ == "__main__":
    main()
