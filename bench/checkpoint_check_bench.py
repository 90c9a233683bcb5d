#!/usr/bin/env python3
"""Benchmark (not a test): what proving a checkpoint costs at SmolLM2-135M's size. Writes a checkpoint of that size
the way save_checkpoint does (policy.safetensors: 134.5 M fp32 weights + value head; optimizers.pt: both AdamW
optimizers' two moments; state.json), then times the manifest (written at every save), the check resume runs
(sizes, safetensors headers, the .pt archive's directory, JSON), and for comparison a SHA-256 of every byte.

    python bench/checkpoint_check_bench.py [--params 134515008] [--dir /tmp/ckpt-bench]
"""

import argparse
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import outputs  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", type=int, default=134_515_008, help="trainable parameters (SmolLM2-135M's)")
    p.add_argument("--dir", default="/tmp/ckpt-bench")
    args = p.parse_args()
    d = Path(args.dir)
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    chunk = 1 << 24  # weights as tensors of 16 M parameters, as a model's state dict holds many
    sizes = [min(chunk, args.params - i) for i in range(0, args.params, chunk)]
    weights = {f"w{i}": torch.randn(n) for i, n in enumerate(sizes)}
    t = time.perf_counter()
    save_file(weights, str(d / "policy.safetensors"))

    def moments():
        return {k: {"exp_avg": torch.zeros_like(v), "exp_avg_sq": torch.zeros_like(v)} for k, v in weights.items()}

    torch.save({"opt_sft": moments(), "opt_ppo": moments()}, d / "optimizers.pt")
    (d / "state.json").write_text(json.dumps({"run": {"step": 1}}))
    write_s = time.perf_counter() - t
    t = time.perf_counter()
    outputs.write_manifest(d)
    manifest_s = time.perf_counter() - t
    t = time.perf_counter()
    assert outputs.checkpoint_damage(d) is None
    check_s = time.perf_counter() - t
    t = time.perf_counter()
    for f in sorted(d.iterdir()):
        with open(f, "rb") as fh:
            hashlib.file_digest(fh, "sha256")
    sha_s = time.perf_counter() - t
    total = sum(f.stat().st_size for f in d.iterdir())
    print(
        json.dumps(
            {
                "checkpoint_gb": round(total / 1e9, 2),
                "write_s": round(write_s, 2),
                "manifest_s": round(manifest_s, 4),
                "check_s": round(check_s, 4),
                "sha256_s": round(sha_s, 2),
            }
        )
    )
    shutil.rmtree(d)


if __name__ == "__main__":
    main()
