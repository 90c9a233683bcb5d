#!/usr/bin/env python3
"""Attention on the CPU at SmolLM2's shapes (not a test): what hybrid_trainer.cpu_attention changes against
transformers' "sdpa" (9 query heads on 3 key-value heads, head dim 64, batch 8, a left-padded boolean mask as
generation and the update build it). Per variant, milliseconds per call (mean of --calls after a warm-up), on the
same inputs:

- repeat:   "sdpa" with a mask: each key and value head copied per query head (repeat_kv), then SDPA;
- gqa:      SDPA with enable_gqa=True on the grouped heads (cpu_attention in fp32: the same numbers, checked here);
- gqa_fp32: bf16 inputs cast to fp32, gqa, the output cast back (cpu_attention in bf16).

    python bench/attention_bench.py
"""

import argparse
import json
import time

import torch
import torch.nn.functional as F


def repeat_kv(x: torch.Tensor, n: int) -> torch.Tensor:
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, n, s, d).reshape(b, h * n, s, d)


def padded_causal_mask(batch: int, q_len: int, kv_len: int) -> torch.Tensor:
    mask = torch.ones(batch, 1, q_len, kv_len, dtype=torch.bool).tril(kv_len - q_len)
    mask[:2, :, :, :5] = False  # two rows left-padded by 5
    mask[:2, :, :, -1] = True  # no query row sees nothing
    return mask


def attend(kind: str, q, k, v, mask):
    if kind == "repeat":
        return F.scaled_dot_product_attention(q, repeat_kv(k, 3), repeat_kv(v, 3), attn_mask=mask)
    if kind == "gqa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, enable_gqa=True).to(q.dtype)


def timed(kind: str, inputs: tuple, mask, grad: bool, calls: int) -> tuple[float, torch.Tensor]:
    q, k, v = (x.detach().requires_grad_(grad) for x in inputs)

    def once():
        out = attend(kind, q, k, v, mask)
        if grad:
            out.sum().backward()
        return out

    for _ in range(3):
        out = once()
    t = time.perf_counter()
    for _ in range(calls):
        once()
    return (time.perf_counter() - t) / calls * 1000, out.detach()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calls", type=int, default=20)
    args = p.parse_args()
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        for q_len, kv_len, grad in ((59, 59, True), (120, 120, True), (59, 59, False), (1, 90, False)):
            inputs = (
                torch.randn(8, 9, q_len, 64, dtype=dtype),
                torch.randn(8, 3, kv_len, 64, dtype=dtype),
                torch.randn(8, 3, kv_len, 64, dtype=dtype),
            )
            mask = padded_causal_mask(8, q_len, kv_len)
            kinds = ("repeat", "gqa") + (("gqa_fp32",) if dtype == torch.bfloat16 else ())
            res = {kind: timed(kind, inputs, mask, grad, args.calls) for kind in kinds}
            print(
                json.dumps(
                    {
                        "dtype": str(dtype).removeprefix("torch."),
                        "q_len": q_len,
                        "kv_len": kv_len,
                        "pass": "forward + backward" if grad else "forward",
                        **{f"{kind}_ms": round(ms, 2) for kind, (ms, _) in res.items()},
                        "gqa_equals_repeat": torch.equal(res["repeat"][1], res["gqa"][1]),
                    }
                )
            )


if __name__ == "__main__":
    main()
