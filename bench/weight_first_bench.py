#!/usr/bin/env python3
"""Benchmark (not a test): hf decoding with the fp32 linear layers as F.linear against weight-first
(hybrid_trainer.weight_first_linear), one generate of the design sketch's PPO job (its first 8 prompts of
data/train.json, 32 new tokens, TOP_P 0.9, REPETITION_PENALTY 1.15, NO_REPEAT_NGRAM_SIZE 3), SmolLM2-135M-Instruct
in fp32, the two alternating in one process with the same seed per round; and the probe that chooses between them
(weight_first_speedup, uncached, in this process). Prints one JSON line per generate and a summary.

    python bench/weight_first_bench.py [--rounds 4]
"""

import argparse
import json
import sys
import tempfile
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    import torch

    import hybrid_trainer as ht
    import runtime

    runtime.defer_scikit_learn()
    runtime.keep_freed_memory()
    cfg = ht.Config.from_dict(
        {
            "MODE": "ppo",
            "TRAIN_FILE": str(ROOT / "data" / "train.json"),
            "OUTPUT_DIR": "-",
            "SEED": 0,
            "MAX_NEW_TOKENS": 32,
            "REWARD": {"type": "chrf"},
            "GENERATION_BACKEND": "hf",
            "BF16": False,
        }
    )
    device, paths = torch.device("cpu"), runtime.resolve_model(cfg)
    runtime.prepare_weights(cfg, paths)
    policy, _, tokenizer = ht.load_model(cfg, device, False, paths)
    prompts = [e.prompt_ids for e in ht.tokenize_examples(ht.load_examples(cfg, 0), cfg, tokenizer, "chat", "TRAIN_FILE")[:8]]
    with tempfile.TemporaryDirectory() as tmp:
        probe = runtime.weight_first_speedup(runtime.decoding_shapes(paths), Path(tmp) / "probe.json")[0]
    seconds = {False: [], True: []}
    for r in range(args.rounds):
        for on in (False, True):
            engine = runtime.HFEngine(cfg, types.SimpleNamespace(maxseq=cfg.MAXSEQ, bf16=False, weight_first=on), policy, tokenizer, device)
            torch.manual_seed(r)
            t0 = time.perf_counter()
            out = engine.generate(prompts)
            seconds[on].append(time.perf_counter() - t0)
            print(
                json.dumps(
                    {
                        "round": r,
                        "weight_first": on,
                        "seconds": round(seconds[on][-1], 3),
                        "tokens": sum(map(len, out.responses)),
                        "first_response": out.responses[0][:8],
                    }
                ),
                flush=True,
            )
    ratios = [a / b for a, b in zip(seconds[False], seconds[True])]
    print(
        json.dumps(
            {
                "summary": True,
                "cpu": runtime.cpu_model(),
                "threads": torch.get_num_threads(),
                "probe": probe,
                "f_linear_s": [round(s, 3) for s in seconds[False]],
                "weight_first_s": [round(s, 3) for s in seconds[True]],
                "speedup_per_round": [round(x, 3) for x in ratios],
            }
        )
    )


if __name__ == "__main__":
    main()
