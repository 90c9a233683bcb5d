"""Tier 3 for the estimators and hybrid strategies: each learns the tiny task through the CLI entry point, the mix
is the convex combination it claims, INIT_KL_COEF 0 runs no reference, and resume stays exact."""

import dataclasses
import json
import shutil

import pytest
import torch
from conftest import LEARN, YesFraction, capture_steps, comparable, metrics, trainer_for

import hybrid_trainer as ht


def cli(cfg: dict, tmp_path, name="config.json") -> int:
    path = tmp_path / name
    path.write_text(json.dumps(cfg))
    return ht.main([str(path)])


@pytest.mark.parametrize(
    "advantage, hybrid",
    [(a, None) for a in ht.ADVANTAGES if a not in ("gae", "none")]  # none: test_distill
    + [("grpo", "gate"), ("gae", "mix")],
)
def test_estimator_or_strategy_raises_reward(advantage, hybrid, tiny_model, tiny_data, tmp_path):
    out = tmp_path / "out"
    cfg = {
        **LEARN,
        "MODE": "hybrid" if hybrid else "ppo",
        "ADVANTAGE": advantage,
        "MODEL": str(tiny_model),
        "TRAIN_FILE": str(tiny_data),
        "OUTPUT_DIR": str(out),
        **({"HYBRID": hybrid} if hybrid else {}),
    }
    assert cli(cfg, tmp_path) == 0
    records = metrics(out)
    rewards = [r["reward/mean"] for r in records]
    assert len(rewards) == 20 and all(r["phase"] == "ppo" for r in records)
    assert sum(rewards[:3]) / 3 < 0.2 and sum(rewards[-3:]) / 3 > 0.6, rewards
    assert all(0 <= r["reward/zero_std_groups"] <= 1 for r in records)
    if advantage != "gae":  # critic-free: no value loss is computed or logged
        assert not any("ppo/loss/value" in r for r in records)
    if hybrid == "gate":
        fractions = [r["hybrid/gate_sft_fraction"] for r in records]
        assert fractions[0] > 0.5 and fractions[-1] < fractions[0], fractions  # imitation gives way to RL as it learns
    if hybrid == "mix":
        assert all(r["hybrid/mu"] == 0.5 and r["hybrid/sft_loss"] > 0 for r in records)


def grads_of_mix(mu, trainer, queries, responses, scores, demos):
    """The gradient the mix's first (only) minibatch step would apply, captured instead of stepping."""
    cfg = dataclasses.replace(trainer.cfg, MIX_COEF=mu, MIX_COEF_END=mu)  # a trainer of its own on the same weights
    trainer = ht.HybridTrainer(cfg, trainer.policy, trainer.ref_lm, trainer.tokenizer, trainer.reward, plan=trainer.plan)
    captured = capture_steps(trainer)
    trainer.ppo_step(queries, responses, scores, demos=demos)
    return captured[0]


def test_mix_gradient_is_the_convex_combination(tiny_model, tiny_data):
    trainer, examples = trainer_for(
        {
            "MODE": "hybrid",
            "HYBRID": "mix",
            "ADVANTAGE": "grpo",
            "NUM_GENERATIONS": 2,
            "PPO_BATCH": 4,
            "PPO_EPOCHS": 1,
            "MAX_NEW_TOKENS": 5,
        },
        tiny_model,
        tiny_data,
        YesFraction(),
    )
    demos = examples[:4]
    queries = [e.prompt_ids for e in demos for _ in range(2)]
    torch.manual_seed(0)
    responses, _ = trainer.generate(queries)
    scores = [0.0, 1.0, 0.5, 0.5, 1.0, 0.0, 0.2, 0.9]
    g_rl, g_sft, g_mix = (grads_of_mix(mu, trainer, queries, responses, scores, demos) for mu in (0.0, 1.0, 0.3))
    assert g_rl.abs().sum() > 0 and g_sft.abs().sum() > 0
    torch.testing.assert_close(g_mix, 0.7 * g_rl + 0.3 * g_sft, atol=1e-6, rtol=1e-4)


def test_gate_trains_gated_prompts_by_sft_only(tiny_model, tiny_data):
    """A gated prompt's sampled responses get no RL gradient; with every prompt gated the step is pure SFT."""
    trainer, examples = trainer_for(
        {
            "MODE": "hybrid",
            "HYBRID": "gate",
            "ADVANTAGE": "rloo",
            "NUM_GENERATIONS": 2,
            "PPO_BATCH": 2,
            "PPO_EPOCHS": 1,
            "MAX_NEW_TOKENS": 5,
            "GATE_THRESHOLD": 2.0,
        },
        tiny_model,
        tiny_data,
        YesFraction(),
    )
    demos = examples[:2]
    queries = [e.prompt_ids for e in demos for _ in range(2)]
    responses, _ = trainer.generate(queries)
    g_gated = grads_of_mix(0.0, trainer, queries, responses, [0.0, 1.0, 0.3, 0.6], demos)  # every best score < 2
    trainer.optim.ppo.zero_grad(set_to_none=True)
    trainer.sft_backward(demos)
    g_sft = torch.cat([p.grad.reshape(-1) for p in trainer.optim.lm_params])
    torch.testing.assert_close(g_gated, g_sft, atol=1e-6, rtol=1e-4)


def test_no_reference_when_kl_coef_is_zero(tiny_model, tiny_data):
    trainer, examples = trainer_for(
        {"INIT_KL_COEF": 0.0, "ADVANTAGE": "grpo", "NUM_GENERATIONS": 2, "PPO_BATCH": 2, "MAX_NEW_TOKENS": 4},
        tiny_model,
        tiny_data,
        YesFraction(),
    )
    assert trainer.ref_lm is None
    stats = trainer.ppo_update(examples[:2])
    assert stats["objective/kl"] == 0 and stats["time/reference_forward_s"] == 0


def test_mix_schedule_and_groups_resume_exactly(tiny_model, tiny_data, tmp_path):
    """Resume from a mid-run checkpoint of a mix + GRPO run with a cosine mu: the rest equals the uninterrupted run."""
    base = {
        **LEARN,
        "MODE": "hybrid",
        "HYBRID": "mix",
        "ADVANTAGE": "grpo",
        "NUM_GENERATIONS": 2,
        "PPO_BATCH": 4,
        "PPO_MINI": 2,
        "PPO_EPOCHS": 2,
        "EPOCHS": 2,
        "MIX_COEF": 0.8,
        "MIX_COEF_END": 0.1,
        "MIX_SCHEDULE": "cosine",
        "SAVE_EVERY": 1,
        "KEEP_CHECKPOINTS": 10,
        "KEEP_CHECKPOINTS_AT_END": True,
        "MODEL": str(tiny_model),
        "TRAIN_FILE": str(tiny_data),
        "SEED": 3,
        "REWARD": {
            "type": "weighted_sum",
            "components": [{"type": "contains", "pattern": "yes", "name": "yes"}, {"type": "length", "target": 3}],
        },
    }
    straight = tmp_path / "straight"
    assert cli({**base, "OUTPUT_DIR": str(straight)}, tmp_path) == 0
    full = metrics(straight)
    assert len(full) == 4 and len({r["hybrid/mu"] for r in full}) == 4  # mu moves every step
    for r in full:  # each weighted_sum component is logged, and they add up to the reward
        assert r["reward/mean"] == pytest.approx(r["reward/yes"] + r["reward/length"], abs=1e-6)
    resumed = tmp_path / "resumed"
    assert cli({**base, "OUTPUT_DIR": str(resumed), "RESUME": str(straight / "checkpoints" / "step-2")}, tmp_path, "r.json") == 0
    assert comparable(metrics(resumed)) == comparable(full[2:])
    shutil.rmtree(straight)
