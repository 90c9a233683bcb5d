"""Run under `torchrun` by tests/test_distributed.py (or as one plain process): not a test module itself.

    python dist_helper.py ppo_step MODEL OUT.safetensors [LORA_R] [CONFIG_JSON]
                                        one PPO step on a fixed batch; each process passes its share of the batch.
                                        CONFIG_JSON: extra keys; with NUM_GENERATIONS 2 the rows form 4 groups of 2
                                        and the hybrid strategy (gate / mix) gets the 4 prompts as demonstrations
    python dist_helper.py fail_on_rank1 CONFIG.json                  the CLI, with rank 1 crashing at its first SFT step
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import hybrid_trainer as ht  # noqa: E402

QUERIES = ["say yes 1", "the cat sat", "hello world", "two plus two", "paris is", "a dog ran", "write the word", "yes no"]
RESPONSES = ["yes yes", "on the mat", "yes", "is four", "the capital of france", "in the park", "yes", "maybe yes no"]
SCORES = [1.0, 0.2, 0.7, -0.5, 0.3, 0.0, 0.9, -1.0]


def ppo_step(model: str, out: str, lora_r: str = "0", extra: str = "{}") -> None:
    import json

    from safetensors.torch import save_file

    extra = json.loads(extra)
    G = extra.get("NUM_GENERATIONS", 1)
    cfg = ht.Config.from_dict({"MODE": "ppo", "MODEL": model, "TRAIN_FILE": "-", "OUTPUT_DIR": "-", "SEED": 3,
                               "PPO_BATCH": 8 // G, "PPO_MINI": 4 // G, "PPO_EPOCHS": 2, "LR_PPO": 1e-3, "LORA_R": int(lora_r),
                               "WHITEN_REWARDS": True, "TEMPERATURE": 1.0, **extra})
    device = torch.device("cpu")
    ht.init_processes(device)
    torch.manual_seed(0)  # the same fresh adapter and value head on every process
    policy, ref, tok = ht.load_model(cfg, device)
    trainer = ht.HybridTrainer(cfg, policy, ref, tok)
    queries = [tok(QUERIES[i // G * G])["input_ids"] for i in range(len(QUERIES))]  # G rows per prompt
    responses = [tok(r)["input_ids"] + [tok.eos_token_id] for r in RESPONSES]
    demos = [ht.Example(index=i, item={}, target=RESPONSES[i * G], prompt_ids=queries[i * G],
                        target_ids=responses[i * G]) for i in range(len(QUERIES) // G)]
    start, end = ht.share_bounds(len(QUERIES))
    stats = trainer.ppo_step(queries[start:end], responses[start:end], SCORES[start:end], demos=demos)
    state = ht.trainable_state(policy)
    if ht.is_main():
        save_file(state, out)
        print(f"stats kl={stats['objective/kl']:.6f} ratio={stats['ppo/policy/ratio_first_minibatch']:.6f}", flush=True)
    ht.barrier()


def fail_on_rank1(config: str) -> int:
    original = ht.HybridTrainer.sft_step

    def sft_step(self, examples):
        if ht.rank() == 1:
            raise RuntimeError("simulated crash on rank 1")
        return original(self, examples)

    ht.HybridTrainer.sft_step = sft_step
    return ht.main([config])


if __name__ == "__main__":
    if sys.argv[1] == "ppo_step":
        ppo_step(*sys.argv[2:])
    else:
        sys.exit(fail_on_rank1(sys.argv[2]))
