"""Run under `torchrun` by tests/test_distributed.py (or as one plain process): not a test module itself.

python dist_helper.py ppo_step MODEL OUT.safetensors [LORA_R] [CONFIG_JSON]
                                    one PPO step on a fixed batch; each process passes its share of the batch.
                                    CONFIG_JSON: extra keys; with NUM_GENERATIONS 2 the rows form 4 groups of 2
                                    and the hybrid strategy (gate / mix) gets the 4 prompts as demonstrations;
                                    REPLAY_ROWS n: the last n rows are REPLAY_SHARE's; MOVED: the policy moved
                                    from its reference; GRADS: each step's gradient saved instead of the weights
python dist_helper.py fail_on_rank1 CONFIG.json                  the CLI, with rank 1 crashing at its first SFT step
python dist_helper.py dynamic MODEL OUT.safetensors          one GRPO update with DYNAMIC_SAMPLING; generation is
                                    replaced by fixed responses per prompt, so that both process counts see the same
                                    groups: prints the dynamic/* metrics, saves the weights
python dist_helper.py trajectories CHAT_MODEL OUT.safetensors   one GRPO update on scripted calculator trajectories
"""

import dataclasses
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import hybrid_trainer as ht  # noqa: E402
import outputs  # noqa: E402
import runtime  # noqa: E402

QUERIES = ["say yes 1", "the cat sat", "hello world", "two plus two", "paris is", "a dog ran", "write the word", "yes no"]
RESPONSES = ["yes yes", "on the mat", "yes", "is four", "the capital of france", "in the park", "yes", "maybe yes no"]
SCORES = [1.0, 0.2, 0.7, -0.5, 0.3, 0.0, 0.9, -1.0]


def ppo_step(model: str, out: str, lora_r: str = "0", extra: str = "{}") -> None:
    import json

    from safetensors.torch import save_file

    extra = json.loads(extra)
    replay_rows = extra.pop("REPLAY_ROWS", 0)  # REPLAY_SHARE: the last rows are replayed prompts' (no reward, toward the reference)
    moved = extra.pop("MOVED", False)  # the policy moved away from its reference (seeded noise): the KL is not 0
    grads = extra.pop("GRADS", False)  # save each optimizer step's gradient (the weights do not move) instead of the weights
    G = extra.get("NUM_GENERATIONS", 1)
    cfg = ht.Config.from_dict(
        {
            "MODE": "ppo",
            "MODEL": model,
            "TRAIN_FILE": "-",
            "OUTPUT_DIR": "-",
            "SEED": 3,
            "PPO_BATCH": 8 // G,
            "PPO_MINI": 4 // G,
            "PPO_EPOCHS": 2,
            "LR_PPO": 1e-3,
            "LORA_R": int(lora_r),
            "WHITEN_REWARDS": True,
            "TEMPERATURE": 1.0,
            **extra,
        }
    )
    device = torch.device("cpu")
    runtime.init_processes(device)
    torch.manual_seed(0)  # the same fresh adapter and value head on every process
    policy, ref, tok = ht.load_model(cfg, device)
    if moved:  # the same noise on every process
        with torch.no_grad():
            for p in policy.lm.parameters():
                p.add_(0.05 * torch.randn_like(p))
    trainer = ht.HybridTrainer(cfg, policy, ref, tok, teacher=runtime.load_teacher(cfg, device, False, ref))  # DISTILL's, if any
    queries = [tok(QUERIES[i // G * G])["input_ids"] for i in range(len(QUERIES))]  # G rows per prompt
    responses = [tok(r)["input_ids"] + [tok.eos_token_id] for r in RESPONSES]
    demos = [
        ht.Example(index=i, item={}, target=RESPONSES[i * G], prompt_ids=queries[i * G], target_ids=responses[i * G])
        for i in range(len(QUERIES) // G)
    ]
    captured = []
    if grads:  # Adam turns rounding-level gradient differences into up to a whole step: compare what it was given

        def capture(optimizer, params):
            runtime.reduce_gradients(params)  # as Optimizers.step sums them over the processes first
            captured.append(torch.cat([p.grad.reshape(-1) for p in params if p.grad is not None]).clone())
            optimizer.zero_grad(set_to_none=True)
            return 0.0

        trainer.optim.step = capture
    start, end = runtime.share_bounds(len(QUERIES))
    if replay_rows:  # ppo_step's three lines, with the replayed rows marked
        mine = ht.samples_from_tokens(queries[start:end], responses[start:end], SCORES[start:end], None, trainer.stop_ids)
        mine = [dataclasses.replace(s, replay=start + i >= len(QUERIES) - replay_rows) for i, s in enumerate(mine)]
        rollout = ht.make_rollout(sum(runtime.gather_objects(mine), []), G, trainer.pad_id, trainer.device)
        stats = trainer.update.learn(rollout)
    else:
        stats = trainer.ppo_step(queries[start:end], responses[start:end], SCORES[start:end], demos=demos)
    state = {f"step{i}": g for i, g in enumerate(captured)} if grads else outputs.trainable_state(policy)
    if runtime.is_main():
        save_file(state, out)
        numbers = {k: v for k, v in stats.items() if isinstance(v, float) and not k.startswith("time/")}
        print("numbers " + json.dumps(numbers), flush=True)
        print(f"stats kl={stats['objective/kl']:.6f} ratio={stats['ppo/policy/ratio_first_minibatch']:.6f}", flush=True)
    runtime.barrier()


def fail_on_rank1(config: str) -> int:
    original = ht.HybridTrainer.sft_step

    def sft_step(self, examples):
        if runtime.rank() == 1:
            raise RuntimeError("simulated crash on rank 1")
        return original(self, examples)

    ht.HybridTrainer.sft_step = sft_step
    return ht.main([config])


def dynamic(model: str, out: str) -> None:
    """Prompts 0-7; prompt i's G = 2 responses are "yes yes" / "no" for odd i (scores 1, 0: signal) and "no" twice for
    even i (no signal). PPO_BATCH 4 from prompts 0-3 keeps 2 groups, then draws 2 more (4, 5: one kept), then 1 more
    (6: none) in MAX_SAMPLING_ROUNDS 3."""
    from safetensors.torch import save_file

    cfg = ht.Config.from_dict(
        {
            "MODE": "ppo",
            "MODEL": model,
            "TRAIN_FILE": "-",
            "OUTPUT_DIR": "-",
            "SEED": 3,
            "ADVANTAGE": "grpo",
            "NUM_GENERATIONS": 2,
            "PPO_BATCH": 4,
            "PPO_MINI": 2,
            "PPO_EPOCHS": 2,
            "LR_PPO": 1e-3,
            "DYNAMIC_SAMPLING": True,
            "MAX_SAMPLING_ROUNDS": 3,
            "TEMPERATURE": 1.0,
            "REWARD": {"type": "contains", "pattern": "yes"},
        }
    )
    device = torch.device("cpu")
    runtime.init_processes(device)
    torch.manual_seed(0)
    policy, ref, tok = ht.load_model(cfg, device)
    import rewards

    trainer = ht.HybridTrainer(cfg, policy, ref, tok, rewards.make_reward(cfg.REWARD))
    examples = [ht.Example(index=i, item={}, target="yes", prompt=f"say {i}", prompt_ids=tok(f"say {i}")["input_ids"]) for i in range(8)]
    by_prompt = {tuple(e.prompt_ids): e.index for e in examples}

    def fixed(prompts, n=1, greedy=False, temperature=None, max_tokens=None, stop=None):
        texts = [("yes yes" if by_prompt[tuple(p)] % 2 and j == 0 else "no") for p in prompts for j in range(n)]
        responses = [tok(t)["input_ids"] + [tok.eos_token_id] for t in texts]
        return runtime.Generation(responses, torch.ones(len(responses), dtype=torch.bool))

    trainer.engine.generate = fixed
    stream = iter(examples[4:])
    stats = trainer.ppo_update(examples[:4], draw=lambda n: [e for _, e in zip(range(n), stream)])
    state = outputs.trainable_state(policy)
    if runtime.is_main():
        save_file(state, out)
        print("dynamic " + json.dumps({k: v for k, v in stats.items() if k.startswith("dynamic/")}), flush=True)
    runtime.barrier()


def trajectories(model: str, out: str) -> None:
    """One GRPO update on 4 prompts x 2 calculator trajectories, the engine scripted (the same turns with any process
    count): in each group one trajectory acts (<calc>, the observation, then the right answer) and one answers wrongly at
    once. Each process runs its share's turn loop; the update must not depend on how the trajectories were shared."""
    from safetensors.torch import save_file

    cfg = ht.Config.from_dict(
        {
            "MODE": "ppo",
            "MODEL": model,
            "TRAIN_FILE": "-",
            "OUTPUT_DIR": "-",
            "SEED": 3,
            "ADVANTAGE": "grpo",
            "NUM_GENERATIONS": 2,
            "PPO_BATCH": 4,
            "PPO_MINI": 2,
            "PPO_EPOCHS": 2,
            "LR_PPO": 1e-4,
            "TEMPERATURE": 1.0,
            "ENVIRONMENT": {"type": "calculator"},
            "REWARD": {"type": "math"},
            "INIT_KL_COEF": 0.05,
            "KL_IN": "loss",
            "KL_PENALTY": "k3",
        }
    )
    device = torch.device("cpu")
    runtime.init_processes(device)
    torch.manual_seed(0)
    policy, ref, tok = ht.load_model(cfg, device)
    trainer = ht.HybridTrainer(cfg, policy, ref, tok, runtime.build_reward(cfg, device), environment=runtime.build_environment(cfg))
    encode = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    examples = []
    for i in range(4):
        messages = [{"role": "user", "content": f"What is {i + 2} * 3?"}]
        prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        examples.append(
            ht.Example(
                index=i,
                item={"answer": str((i + 2) * 3)},
                target=str((i + 2) * 3),
                messages=messages,
                prompt=prompt,
                prompt_ids=encode(prompt),
            )
        )

    def scripted(prompts, n=1, greedy=False, temperature=None, max_tokens=None, stop=None):
        out = []
        for p in prompts:
            text = tok.decode(p)
            for j in range(n):
                if "<|tool|>" in text:
                    out.append(encode("the answer is " + text.split("<|tool|>")[-1].split("<|end|>")[0]) + [tok.eos_token_id])
                else:
                    i = int(text.split("What is ")[-1].split(" ")[0])
                    out.append(encode(f"<calc>{i}*3</calc>") if j == 0 else encode("the answer is 0") + [tok.eos_token_id])
        return runtime.Generation(out, torch.tensor([r[-1] == tok.eos_token_id for r in out]), None)

    trainer.engine.generate = scripted
    stats = trainer.ppo_update(examples)
    state = outputs.trainable_state(policy)
    if runtime.is_main():
        save_file(state, out)
        print(
            "trajectories "
            + json.dumps({k: round(v, 6) for k, v in stats.items() if k.startswith(("env/", "reward/mean", "objective/kl"))}),
            flush=True,
        )
    runtime.barrier()


def vllm_sync(model: str, out: str) -> None:
    """Each process: a PPO step with vllm as the engine, then the engine's greedy continuations must equal HF's of the
    updated policy on that process."""
    cfg = ht.Config.from_dict(
        {
            "MODE": "ppo",
            "MODEL": model,
            "TRAIN_FILE": "-",
            "OUTPUT_DIR": "-",
            "SEED": 3,
            "PPO_BATCH": 8,
            "PPO_MINI": 4,
            "PPO_EPOCHS": 2,
            "LR_PPO": 1e-2,
            "TEMPERATURE": 1.0,
            "GENERATION_BACKEND": "vllm",
            "NO_REPEAT_NGRAM_SIZE": 0,
            "BF16": False,
            "MAX_NEW_TOKENS": 6,
        }
    )
    device = torch.device("cpu")
    runtime.init_processes(device)
    torch.manual_seed(0)
    policy, ref, tok = ht.load_model(cfg, device)
    trainer = ht.HybridTrainer(cfg, policy, ref, tok)
    queries = [tok(q)["input_ids"] for q in QUERIES]
    responses = [tok(r)["input_ids"] + [tok.eos_token_id] for r in RESPONSES]
    start, end = runtime.share_bounds(len(QUERIES))
    trainer.ppo_step(queries[start:end], responses[start:end], SCORES[start:end])
    engine = trainer.engine_generate(queries, greedy=True).responses
    hf = runtime.HFEngine(cfg, trainer.plan, policy, tok, device).generate(queries, greedy=True).responses
    print(f"rank {runtime.rank()}: " + ("engine holds the policy" if engine == hf else f"STALE {engine} vs {hf}"), flush=True)
    runtime.barrier()
    for engine in list(runtime.OPEN_ENGINES):
        engine.close()


def engine_fails_on_rank1(config: str) -> int:
    original = runtime.VLLMEngine.generate

    def generate(self, *args, **kw):
        if runtime.rank() == 1:
            raise RuntimeError("simulated engine failure on rank 1")
        return original(self, *args, **kw)

    runtime.VLLMEngine.generate = generate
    return ht.main([config])


if __name__ == "__main__":
    if sys.argv[1] == "vllm_sync":
        vllm_sync(*sys.argv[2:])
    elif sys.argv[1] == "engine_fails_on_rank1":
        sys.exit(engine_fails_on_rank1(sys.argv[2]))
    elif sys.argv[1] == "ppo_step":
        ppo_step(*sys.argv[2:])
    elif sys.argv[1] == "dynamic":
        dynamic(*sys.argv[2:])
    elif sys.argv[1] == "trajectories":
        trajectories(*sys.argv[2:])
    else:
        sys.exit(fail_on_rank1(sys.argv[2]))
