#!/usr/bin/env python3
"""Benchmark (not a test): the two generation backends on the same prompts and seed, SmolLM2-135M-Instruct, this
machine. For each backend: start-up seconds, generation tokens/s for the demo's shape (8 prompts x 4 samples x 24
new tokens) and for long responses (16 prompts x 256 new tokens, no EOS), the seconds to push the weights into the
engine after an update (vllm; hf has nothing to push), one whole GRPO update (generate + score + learn), and the
process's peak RSS. One backend per process (run twice), so peaks do not mix.

    python bench/generation_bench.py --backend hf
    python bench/generation_bench.py --backend vllm [--lora 16]
"""

import argparse
import json
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def setup(backend: str, lora: int, bf16_key: str):
    """The demo's GRPO trainer on SmolLM2-135M-Instruct with this backend, and the demo's chat examples."""
    import torch

    import hybrid_trainer as ht
    import runtime

    cfg = ht.Config.from_dict(
        {
            "MODE": "ppo",
            "TRAIN_FILE": str(ROOT / "data" / "train.json"),
            "OUTPUT_DIR": "-",
            "SEED": 0,
            "ADVANTAGE": "grpo",
            "NUM_GENERATIONS": 4,
            "PPO_BATCH": 8,
            "PPO_MINI": 8,
            "PPO_EPOCHS": 1,
            "MAX_NEW_TOKENS": 24,
            "TEMPERATURE": 1.0,
            "TOP_P": 1.0,
            "REPETITION_PENALTY": 1.0,
            "NO_REPEAT_NGRAM_SIZE": 0,
            "PROMPT_FORMAT": "chat",
            "GENERATION_BACKEND": backend,
            "LORA_R": lora,
            "BF16": bf16_key,
            "INIT_KL_COEF": 0.0,
            "MAXSEQ": 512,
            "REWARD": {"type": "chrf"},
        }
    )
    device = torch.device("cpu")
    paths = runtime.resolve_model(cfg)
    runtime.prepare_weights(cfg, paths)
    bf16, why = runtime.resolve_bf16(cfg, device, paths)
    policy, ref, tok = ht.load_model(cfg, device, bf16, paths)
    examples = ht.tokenize_examples(ht.load_examples(cfg, 0), cfg, tok, "chat", "TRAIN_FILE")
    import rewards

    plan = ht.make_plan(cfg, len(examples), 1, 0, False, bf16, why, str(paths.weights), context=runtime.model_context(paths.config()))
    trainer = ht.HybridTrainer(cfg, policy, ref, tok, rewards.make_reward(cfg.REWARD), device, plan=plan)
    return trainer, examples, tok, why


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", choices=["hf", "vllm"], required=True)
    p.add_argument("--lora", type=int, default=0, help="LORA_R (0: full fine-tuning)")
    p.add_argument("--bf16", default="auto")
    args = p.parse_args()
    import torch

    import hybrid_trainer as ht
    import runtime

    trainer, examples, tok, why = setup(args.backend, args.lora, args.bf16)
    t0 = time.perf_counter()
    trainer.engine  # noqa: B018 - the engine starts here (hf: nothing to start)
    start_s = time.perf_counter() - t0
    out = {
        "backend": args.backend,
        "lora_r": args.lora,
        "precision": why,
        "cpu": runtime.cpu_model(),
        "threads": torch.get_num_threads(),
        "start_s": round(start_s, 2),
    }

    def timed_generate(prompts, n, max_new):
        trainer.cfg = ht.dataclasses.replace(trainer.cfg, MAX_NEW_TOKENS=max_new)
        trainer.engine.cfg = trainer.cfg
        trainer.engine_generate(prompts[:1], n=1)  # warm-up (and the first weight push)
        torch.manual_seed(1)
        t = time.perf_counter()
        gen = trainer.engine_generate(prompts, n=n)
        seconds = time.perf_counter() - t
        tokens = sum(len(r) for r in gen.responses)
        return {"seconds": round(seconds, 2), "tokens": tokens, "tokens_per_s": round(tokens / seconds, 1)}

    prompts = [e.prompt_ids for e in examples]
    out["demo_8x4x24"] = timed_generate(prompts[:8], 4, 24)
    if args.backend == "vllm":  # long responses: no early stop, every response 256 tokens
        trainer.engine.ignore_eos = True
    else:
        stops = trainer.engine.stop_ids
        trainer.engine.sample_config.eos_token_id, trainer.engine.stop_ids = None, [-1]
    out["long_16x256"] = timed_generate(prompts[8:24], 1, 256)
    if args.backend == "vllm":
        trainer.engine.ignore_eos = False
    else:
        trainer.engine.sample_config.eos_token_id, trainer.engine.stop_ids = stops, stops
    trainer.cfg = trainer.engine.cfg = ht.dataclasses.replace(trainer.cfg, MAX_NEW_TOKENS=24)
    updates = []
    for i in range(3):
        t = time.perf_counter()
        stats = trainer.ppo_update(examples[i * 8 : (i + 1) * 8])
        updates.append({"update_s": time.perf_counter() - t, "generate_s": stats["time/generate_s"]})
    out["ppo_update_s"] = round(sum(u["update_s"] for u in updates[1:]) / 2, 2)
    out["ppo_generate_s"] = round(sum(u["generate_s"] for u in updates[1:]) / 2, 2)
    if args.backend == "vllm":
        t = time.perf_counter()
        trainer.engine.sync_weights(-1)
        out["weight_sync_s"] = round(time.perf_counter() - t, 3)
    out["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    print(json.dumps(out))
    for engine in list(runtime.OPEN_ENGINES):
        engine.close()


if __name__ == "__main__":
    main()
