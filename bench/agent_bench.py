#!/usr/bin/env python3
"""Benchmark (not a test): what multi-turn rollouts cost. One GRPO update of SmolLM2-135M (fp32, 4 prompts x 2
trajectories) with the same number of model tokens per trajectory (--tokens, default 64), sampled as 1 turn without an
environment, or as 2 and 4 turns of tokens/turns each with the calculator between them (every turn ends in an action:
the bench cuts the turns at a fixed length and has the calculator answer each; EOS is ignored), on the hf and vllm
engines. Prints one JSON line per case: seconds per update and in generation / environment / the rest of the update,
model tokens/s of generation, and the tokens the observations added.

    python bench/agent_bench.py                       # hf and vllm, 1 / 2 / 4 turns
    python bench/agent_bench.py --backends hf --turns 1,2
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def case(backend: str, turns: int, tokens: int, updates: int) -> dict:
    import torch

    import environments
    import hybrid_trainer as ht
    import runtime

    keys = {
        "MODE": "ppo",
        "TRAIN_FILE": str(ROOT / "data" / "tool_train.json"),
        "OUTPUT_DIR": "-",
        "SEED": 0,
        "BF16": False,
        "ADVANTAGE": "grpo",
        "NUM_GENERATIONS": 2,
        "PPO_BATCH": 4,
        "PPO_EPOCHS": 1,
        "MAX_NEW_TOKENS": tokens,
        "MAXSEQ": 512,
        "TEMPERATURE": 1.0,
        "TOP_P": 1.0,
        "NO_REPEAT_NGRAM_SIZE": 0,
        "REPETITION_PENALTY": 1.0,
        "INIT_KL_COEF": 0.0,
        "GENERATION_BACKEND": backend,
        "VLLM_KV_CACHE_GB": 0.5,
        "REWARD": {"type": "math", "answer_field": "answer"},
        "NUM_SAMPLES": 4 * (updates + 1),
    }
    if turns > 1:
        keys.update({"ENVIRONMENT": {"type": "calculator"}, "MAX_TURNS": turns})
    cfg = ht.Config.from_dict(keys)
    torch.manual_seed(0)
    policy, ref, tok = ht.load_model(cfg, torch.device("cpu"))
    examples = ht.tokenize_examples(ht.load_examples(cfg), cfg, tok, "chat", "TRAIN_FILE")
    trainer = ht.HybridTrainer(cfg, policy, ref, tok, runtime.build_reward(cfg, "cpu"), environment=runtime.build_environment(cfg))
    engine = trainer.engine
    if backend == "vllm":
        engine.ignore_eos = True
    else:
        engine.sample_config.eos_token_id = None  # every turn runs to its length
    per_turn = tokens // turns
    original_room = ht.TurnLoop.room
    ht.TurnLoop.room = lambda self, t: min(per_turn, original_room(self, t)) if turns > 1 else original_room(self, t)
    ht.TurnLoop.action_end = lambda self, ids: len(ids)  # every turn is an action ...
    environments.find_action = lambda text, fmt: "12*3"  # ... that the calculator answers
    rows = []
    for i in range(updates + 1):  # the first is a warm-up
        t0 = time.perf_counter()
        stats = trainer.ppo_update(examples[i * 4 : (i + 1) * 4])
        rows.append((time.perf_counter() - t0, stats))
    ht.TurnLoop.room = original_room
    for e in list(runtime.OPEN_ENGINES):
        e.close()
    timed = rows[1:]
    mean = lambda key: statistics.mean(s.get(key, 0.0) for _, s in timed)  # noqa: E731
    total = statistics.mean(t for t, _ in timed)
    model_tokens = tokens * 8
    return {
        "backend": backend,
        "turns": turns,
        "model_tokens_per_trajectory": tokens,
        "update_s": round(total, 2),
        "generate_s": round(mean("time/generate_s"), 2),
        "env_s": round(mean("time/env_s"), 3),
        "rest_of_update_s": round(total - mean("time/generate_s") - mean("time/env_s"), 2),
        "model_tokens_per_s": round(model_tokens / max(mean("time/generate_s"), 1e-9), 1),
        "observation_tokens_per_trajectory": round(mean("env/observation_tokens"), 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backends", default="hf,vllm")
    p.add_argument("--turns", default="1,2,4")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--updates", type=int, default=2)
    args = p.parse_args()
    for backend in args.backends.split(","):
        for turns in map(int, args.turns.split(",")):
            print(json.dumps(case(backend, turns, args.tokens, args.updates)), flush=True)


if __name__ == "__main__":
    main()
