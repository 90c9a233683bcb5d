#!/usr/bin/env python3
"""Benchmark (not a test): the memory of one PPO update with long responses. HybridTrainer.ppo_step (the documented
Python API) of SmolLM2-135M, fp32, defaults but one PPO epoch and one minibatch, on 8 fixed responses of --tokens
tokens each (the demo prompts, each answered by its reference response repeated to that length). Each case runs in a
fresh process; prints one JSON line per case: resident memory after loading (policy + reference), the peak during the
update and the difference, seconds per update.

    python bench/memory_bench.py --tokens 512,1024                     # this checkout
    python bench/memory_bench.py --tokens 512,1024 --root /tmp/base    # another (git worktree add /tmp/base REV)
    python bench/memory_bench.py --set LOGITS_CHUNK=0                  # the whole logits, for comparison
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

CASE = r"""
import json, resource, sys, time
sys.path.insert(0, __ROOT__)
import psutil, torch
import hybrid_trainer as ht
import runtime

cfg = ht.Config.from_dict({"MODE": "ppo", "TRAIN_FILE": __ROOT__ + "/data/train.json", "OUTPUT_DIR": "-", "SEED": 0,
                           "PPO_BATCH": 8, "PPO_EPOCHS": 1, "BF16": False, "PROMPT_FORMAT": "chat",
                           "MAXSEQ": __TOKENS__ + 256, "MAX_NEW_TOKENS": __TOKENS__, **__EXTRA__})
torch.manual_seed(0)
policy, ref, tok = ht.load_model(cfg, torch.device("cpu"))
examples = ht.tokenize_examples(ht.load_examples(cfg), cfg, tok, "chat", "TRAIN_FILE")[:8]
trainer = ht.HybridTrainer(cfg, policy, ref, tok)
queries = [e.prompt_ids for e in examples]
responses = [((e.target_ids[:-1] or [tok.eos_token_id]) * __TOKENS__)[:__TOKENS__] for e in examples]
loaded = psutil.Process().memory_info().rss
t0 = time.perf_counter()
trainer.ppo_step(queries, responses, [1.0, 0.0] * 4)
seconds = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"tokens": __TOKENS__, "extra": __EXTRA__, "loaded_gib": round(loaded / 2**30, 2), "peak_gib": round(peak / 2**30, 2),
                  "above_loaded_gib": round((peak - loaded) / 2**30, 2), "update_s": round(seconds, 1)}))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default=str(Path(__file__).resolve().parent.parent), help="checkout whose trainer to measure")
    p.add_argument("--tokens", default="512,1024")
    p.add_argument("--set", action="append", default=[], help="KEY=JSON config override")
    args = p.parse_args()
    extra = {k: json.loads(v) for k, v in (s.split("=", 1) for s in args.set)}
    for tokens in map(int, args.tokens.split(",")):
        code = CASE.replace("__ROOT__", repr(args.root)).replace("__TOKENS__", str(tokens)).replace("__EXTRA__", repr(extra))
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        print(
            proc.stdout.strip().splitlines()[-1] if proc.returncode == 0 else f"tokens {tokens} failed: {proc.stderr[-1500:]}", flush=True
        )


if __name__ == "__main__":
    main()
