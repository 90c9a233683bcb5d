#!/usr/bin/env python3
"""Where the time of one PPO update and one SFT step goes (not a test): torch.profiler over step_bench's fixed inputs
(SmolLM2-135M, 8 demo prompts with their reference responses, PPO_EPOCHS 4, one minibatch), after one warm-up of
each, in fp32 and in bf16 autocast. Prints one markdown table per run and one JSON line per phase.

    python bench/profile_step.py                         # fp32 and bf16
    python bench/profile_step.py --dtypes bf16 --root /tmp/base     # another checkout's trainer

Categories, from the operators' self time (each op counted once, where it ran; a thread pool's work is inside its op):
- matmul: mm / addmm / bmm / baddbmm / the linear backward's matmuls, except the LM head's (its vocabulary-sized
  output, recognised by shape) which is "LM head matmul";
- attention: scaled_dot_product_attention's kernels;
- log-softmax etc.: log_softmax, softmax, logsumexp, gather, their backwards (the log-probs and the entropy);
- casts: _to_copy / copy_ / to (in bf16, autocast's casts of weights and activations);
- optimizer: everything inside AdamW's step (torch records it as Optimizer.step#AdamW.step), as total time;
- collectives: c10d / gloo / nccl operators (none in one process);
- other ops: the remaining operators (elementwise, norms, indexing, embedding, reductions);
- Python and framework: the step's wall time minus all operators' self time: the interpreter, the autograd engine
  between nodes, the dispatcher, the profiler's own cost (it inflates this row: read it as an upper bound).

The profiler's costs also land in large operators (a 113 MB fill or cast timed at 170-200 ms that takes 7-8 ms
without it); bench/perf_breakdown.py samples the same update with Linux perf instead, leaving it uninstrumented.
"""

import argparse
import json
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import step_bench  # noqa: E402

MATMUL = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addbmm", "aten::_addmm_activation"}
SOFTMAX = {
    "aten::_log_softmax",
    "aten::_log_softmax_backward_data",
    "aten::_softmax",
    "aten::_softmax_backward_data",
    "aten::logsumexp",
    "aten::gather",
    "aten::scatter_add_",
    "aten::scatter_add",
    "aten::gather_backward",
}
CASTS = {"aten::_to_copy", "aten::copy_", "aten::to", "aten::_autocast_to_reduced_precision", "aten::clone"}
ROWS = (
    "matmul",
    "LM head matmul",
    "attention",
    "log-softmax etc.",
    "casts",
    "optimizer",
    "collectives",
    "other ops",
    "Python and framework",
)


def category(name: str, shapes: list, vocab: int) -> str:
    if name in MATMUL:
        return "LM head matmul" if any(vocab in s for s in shapes if isinstance(s, (list, tuple))) else "matmul"
    if "attention" in name or "flash" in name:
        return "attention"
    if name in SOFTMAX:
        return "log-softmax etc."
    if name in CASTS:
        return "casts"
    if any(x in name for x in ("c10d", "gloo", "nccl", "all_reduce", "all_gather", "broadcast", "reduce_scatter")):
        return "collectives"
    return "other ops"


def profile(b: step_bench.Bench, step, i: int, vocab: int) -> dict:
    """Seconds per category of one call step(b, i), under the profiler."""
    import torch
    from torch.profiler import ProfilerActivity

    with torch.profiler.profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        t0 = time.perf_counter()
        tokens = step(b, i)
        wall = time.perf_counter() - t0
    seconds = defaultdict(float)
    for e in prof.events():
        if e.name.startswith("Optimizer.step#"):
            seconds["optimizer"] += e.cpu_time_total / 1e6  # its operators are in this row only
        elif e.name.startswith(("aten::", "c10d")) and not any(p.name.startswith("Optimizer.step#") for p in parents(e)):
            seconds[category(e.name, e.input_shapes or [], vocab)] += e.self_cpu_time_total / 1e6
    seconds["Python and framework"] = max(wall - sum(seconds.values()), 0.0)
    return {"wall_s": wall, "tokens": tokens, **{k: seconds.get(k, 0.0) for k in ROWS}}


def parents(event):
    p = event.cpu_parent
    while p is not None:
        yield p
        p = p.cpu_parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default=str(Path(__file__).resolve().parent.parent), help="checkout whose trainer to profile")
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--set", action="append", default=[], help="KEY=JSON config override")
    args = p.parse_args()
    extra = step_bench.overrides(args.set)
    if "," in args.dtypes:  # each precision in a fresh process: a second model in one process profiles differently
        for dtype in args.dtypes.split(","):
            subprocess.run(
                [sys.executable, __file__, "--dtypes", dtype, "--root", args.root] + [f"--set={s}" for s in args.set], check=True
            )
        return
    for dtype in args.dtypes.split(","):
        b = step_bench.setup(args.root, {**extra, "BF16": dtype == "bf16"})
        vocab = b.trainer.policy.lm.get_output_embeddings().weight.shape[0]
        step_bench.ppo_update(b, 0)  # warm-up: the optimizers' state, the allocator, lazy imports
        step_bench.sft_step(b, 0)
        results = {"PPO update": profile(b, step_bench.ppo_update, 1, vocab), "SFT step": profile(b, step_bench.sft_step, 1, vocab)}
        print(f"\n{dtype}: seconds (share of the step)\n")
        print("| | " + " | ".join(results) + " |\n|---|" + "---|" * len(results))
        for row in ("wall_s",) + ROWS:
            cells = [f"{r[row]:.3f}" + ("" if row == "wall_s" else f" ({100 * r[row] / r['wall_s']:.0f}%)") for r in results.values()]
            print(f"| {'whole step' if row == 'wall_s' else row} | " + " | ".join(cells) + " |")
        for phase, r in results.items():
            print(
                json.dumps(
                    {
                        "dtype": dtype,
                        "phase": phase,
                        "root": args.root,
                        **{k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()},
                    }
                )
            )


if __name__ == "__main__":
    main()
