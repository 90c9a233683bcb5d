#!/usr/bin/env python3
"""Where the peer GRPO job's rollout goes (not a test): its settings (bench/peer_bench.py's OURS, bf16), the engine
built by the trainer, then 4 rounds of the job's step-1 work on the first 4 prompts x 4 responses: pushing the
policy's weights into the engine (sync_weights; nothing for hf) and generating 48 new tokens each. The first round
warms up. One JSON line per round.

    python bench/rollout_split.py                      # vllm
    python bench/rollout_split.py --backend hf
"""

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", default="vllm", choices=("vllm", "hf"))
    args = p.parse_args()
    sys.path[:0] = [str(HERE.parent), str(HERE)]
    import peer_bench
    import torch

    import hybrid_trainer as ht
    import rewards

    cfg = ht.Config.from_dict({**peer_bench.OURS, "BF16": True, "GENERATION_BACKEND": args.backend, "SEED": 0, "OUTPUT_DIR": "-"})
    torch.manual_seed(0)
    policy, ref, tok = ht.load_model(cfg, torch.device("cpu"), True)
    examples = ht.tokenize_examples(ht.load_examples(cfg), cfg, tok, "chat", "TRAIN_FILE")
    trainer = ht.HybridTrainer(cfg, policy, ref, tok, rewards.make_reward(cfg.REWARD), plan=ht.api_plan(cfg, lm=policy.lm, bf16=True))
    engine, prompts = trainer.engine, [ex.prompt_ids for ex in examples[:4]]
    for i in range(4):
        t0 = time.perf_counter()
        engine.sync_weights(i + 1)
        t1 = time.perf_counter()
        out = engine.generate(prompts, n=cfg.NUM_GENERATIONS)
        t2 = time.perf_counter()
        tokens = sum(len(r) for r in out.responses)
        row = {"backend": args.backend, "round": i, "sync_s": round(t1 - t0, 3), "generate_s": round(t2 - t1, 3), "tokens": tokens}
        print(json.dumps({**row, "machine": peer_bench.machine()}))


if __name__ == "__main__":
    main()
