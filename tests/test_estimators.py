"""Tier 1: critic-free estimators, KL estimators, loss options, SFT token losses and hybrid strategies, against
numbers worked out by hand in the comments, and against TRL's GRPO loss on a fixed batch."""

import math
import statistics
import types
from collections import defaultdict

import pytest
import torch

import hybrid_trainer as ht


def outcome_rewards(scores, lengths, width):
    """Per-token rewards with each score on its response's last token (KL part 0) and the mask."""
    rewards, mask = torch.zeros(len(scores), width), torch.zeros(len(scores), width)
    for i, (s, n) in enumerate(zip(scores, lengths)):
        mask[i, :n] = 1
        rewards[i, n - 1] = s
    return rewards, mask


# two groups of G = 3: scores [1, 2, 3] and [0, 0, 0]; response lengths 2, 1, 3, 3, 1, 2
SCORES, LENGTHS = [1.0, 2.0, 3.0, 0.0, 0.0, 0.0], [2, 1, 3, 3, 1, 2]


def per_row(adv, mask):
    """One advantage per response, checking it is the same on each of its tokens and 0 on padding."""
    out = []
    for a, m in zip(adv, mask):
        vals = a[m.bool()]
        assert torch.allclose(vals, vals[0].expand_as(vals)) and (a[~m.bool()] == 0).all()
        out.append(vals[0].item())
    return out


def test_grpo_by_hand():
    # group 1: mean 2, Bessel std 1 -> (-1, 0, 1) / (1 + 1e-4); group 2: all equal -> 0 (no signal)
    rewards, mask = outcome_rewards(SCORES, LENGTHS, 3)
    adv, returns = ht.advantages_grpo(rewards=rewards, mask=mask, group_size=3)
    assert returns is None
    assert per_row(adv, mask) == pytest.approx([-1 / 1.0001, 0, 1 / 1.0001, 0, 0, 0], abs=1e-6)


def test_dr_grpo_and_rloo_by_hand():
    rewards, mask = outcome_rewards(SCORES, LENGTHS, 3)
    adv, _ = ht.advantages_dr_grpo(rewards=rewards, mask=mask, group_size=3)
    assert per_row(adv, mask) == pytest.approx([-1, 0, 1, 0, 0, 0])  # r - group mean, no std
    adv, _ = ht.advantages_rloo(rewards=rewards, mask=mask, group_size=3)
    # leave-one-out: 1 - (2+3)/2 = -1.5; 2 - (1+3)/2 = 0; 3 - (1+2)/2 = 1.5
    assert per_row(adv, mask) == pytest.approx([-1.5, 0, 1.5, 0, 0, 0])


def test_outcome_estimators_use_the_kl_penalised_total():
    # KL in the reward: per-token -0.1 on each of 2 tokens + score 1 -> total 0.8; group [0.8, 0.0] -> rloo +-0.8
    rewards = torch.tensor([[-0.1, 0.9], [0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    adv, _ = ht.advantages_rloo(rewards=rewards, mask=mask, group_size=2)
    assert per_row(adv, mask) == pytest.approx([0.8, -0.8])


def test_reinforce_pp_by_hand():
    # gamma 0.5; row 1 rewards [0, 0, 4] -> returns [1, 2, 4]; row 2 [2] (+ padding) -> [2]; whitened over 4 tokens
    rewards = torch.tensor([[0.0, 0.0, 4.0], [2.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    adv, returns = ht.advantages_reinforce_pp(rewards=rewards, mask=mask, gamma=0.5)
    assert returns is None
    kept = [1.0, 2.0, 4.0, 2.0]
    mean, std = statistics.mean(kept), statistics.stdev(kept)  # 2.25, sqrt(4.75 / 3)
    expected = [(x - mean) / std for x in kept]
    assert adv[mask.bool()].tolist() == pytest.approx(expected, abs=1e-4)
    assert adv[1, 1:].abs().sum() == 0


def test_reinforce_pp_baseline_by_hand():
    # G = 2, scores [1, 3] and [2, 2], one token each: centred [-1, 1, 0, 0]; mean 0, Bessel std sqrt(2/3)
    rewards, mask = outcome_rewards([1.0, 3.0, 2.0, 2.0], [1, 1, 1, 1], 1)
    adv, _ = ht.advantages_reinforce_pp_baseline(rewards=rewards, mask=mask, group_size=2)
    s = math.sqrt(2 / 3)
    assert adv[:, 0].tolist() == pytest.approx([-1 / s, 1 / s, 0, 0], abs=1e-4)


def test_remax_by_hand():
    # rewards [0, 0, 4] -> return-to-go [4, 4, 4]; greedy baseline 3 -> [1, 1, 1]; row 2: [1] - 2 = -1
    rewards = torch.tensor([[0.0, 0.0, 4.0], [1.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    adv, _ = ht.advantages_remax(rewards=rewards, mask=mask, baseline=torch.tensor([3.0, 2.0]))
    assert adv.tolist() == [[1.0, 1.0, 1.0], [-1.0, 0.0, 0.0]]


def test_registry_flags():
    assert ht.ADVANTAGES["gae"].critic and not any(e.critic for k, e in ht.ADVANTAGES.items() if k != "gae")
    assert {k for k, e in ht.ADVANTAGES.items() if e.group} == {"grpo", "dr_grpo", "rloo", "reinforce_pp_baseline"}
    assert ht.ADVANTAGES["dr_grpo"].loss_agg == "seq_mean_token_sum_norm"


def test_zero_std_groups():
    assert ht.zero_std_groups(torch.tensor([1.0, 2.0, 0.5, 0.5, 0.0, 0.0]), 2) == pytest.approx(2 / 3)


@pytest.mark.parametrize(
    "kind, expected",
    [
        ("k2", [0.125, 0.03125]),  # 0.5 (logp - ref)^2
        # k3: log r = ref - logp = -0.5 -> e^-0.5 - 1 + 0.5 = 0.1065307; log r = 0.25 -> e^0.25 - 1.25 = 0.0340254
        ("k3", [math.exp(-0.5) - 0.5, math.exp(0.25) - 1.25]),
    ],
)
def test_kl_k2_k3_by_hand(kind, expected):
    logp, ref = torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.5, -1.75]])
    assert ht.kl_per_token(logp, ref, kind)[0].tolist() == pytest.approx(expected, rel=1e-5)


def test_clip_higher_by_hand():
    # token 1: ratio 1.5, advantage +1: clipped at 1 + 0.28 -> loss -1.28 (symmetric 0.2: -1.2)
    # token 2: ratio 0.5, advantage -1: the low side clips at 0.8 -> loss max(0.5, 0.8) = 0.8 either way
    logp = torch.log(torch.tensor([[1.5, 0.5]]))
    old, adv, mask = torch.zeros(1, 2), torch.tensor([[1.0, -1.0]]), torch.ones(1, 2)
    high = ht.policy_loss(logp, old, adv, mask, ht.LossSettings(0.2, cliprange_high=0.28))
    sym = ht.policy_loss(logp, old, adv, mask, ht.LossSettings(0.2))
    assert high.loss.item() == pytest.approx((-1.28 + 0.8) / 2)
    assert sym.loss.item() == pytest.approx((-1.2 + 0.8) / 2)
    assert high.clipfrac.item() == sym.clipfrac.item() == 1.0


def test_loss_aggregations_by_hand():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    assert ht.aggregate_loss(x, mask, "token_mean").item() == pytest.approx(10 / 4)
    assert ht.aggregate_loss(x, mask, "seq_mean_token_mean").item() == pytest.approx((2 + 4) / 2)
    assert ht.aggregate_loss(x, mask, "seq_mean_token_sum_norm", max_len=4).item() == pytest.approx((6 / 4 + 4 / 4) / 2)
    empty = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])  # a row without tokens (gated) does not count
    assert ht.aggregate_loss(x, empty, "seq_mean_token_mean").item() == pytest.approx(2.0)


def test_gspo_sequence_ratio_by_hand():
    # row log-ratios [0.2, -0.4]: mean -0.1 -> one ratio e^-0.1 for both tokens, inside the clip range
    # row log-ratios [0.6, 0.4]: mean 0.5 -> e^0.5 = 1.6487 > 1.2: clipped, loss -1.2 on both tokens
    old = torch.zeros(2, 2)
    logp = torch.tensor([[0.2, -0.4], [0.6, 0.4]])
    out = ht.policy_loss(logp, old, torch.ones(2, 2), torch.ones(2, 2), ht.LossSettings(0.2, kind="gspo"))
    assert out.loss.item() == pytest.approx((-math.exp(-0.1) * 2 - 1.2 * 2) / 4, rel=1e-5)
    assert out.clipfrac.item() == pytest.approx(0.5)
    assert out.ratio.item() == pytest.approx((math.exp(-0.1) + math.exp(0.5)) / 2, rel=1e-5)


def test_sft_token_losses_ce_dft_phi_by_hand():
    # logits [0, ln 3], label 1: p = 3/4, CE = -ln 3/4. DFT: CE x 3/4. phi: CE x 3/4 x 1/4. Ignored label -> 0.
    logits = torch.tensor([[[0.0, math.log(3.0)], [0.0, 0.0]]], requires_grad=True)
    labels = torch.tensor([[1, -100]])
    ce = -math.log(0.75)
    assert ht.sft_token_losses(logits, labels, "ce")[0].tolist() == pytest.approx([ce, 0.0])
    assert ht.sft_token_losses(logits, labels, "dft")[0].tolist() == pytest.approx([ce * 0.75, 0.0])
    assert ht.sft_token_losses(logits, labels, "ce", "phi")[0].tolist() == pytest.approx([ce * 0.75 * 0.25, 0.0])
    # the weight is a stop-gradient: DFT's gradient is 3/4 of CE's
    g_ce = torch.autograd.grad(ht.sft_token_losses(logits, labels, "ce").sum(), logits)[0]
    g_dft = torch.autograd.grad(ht.sft_token_losses(logits, labels, "dft").sum(), logits)[0]
    torch.testing.assert_close(g_dft, 0.75 * g_ce)


def test_mix_schedule_by_hand():
    assert ht.mix_coef(0.5, 0.1, "constant", 0.7) == 0.5
    assert ht.mix_coef(0.5, 0.1, "linear", 0.5) == pytest.approx(0.3)
    assert ht.mix_coef(0.5, 0.1, "cosine", 0.0) == pytest.approx(0.5)
    assert ht.mix_coef(0.5, 0.1, "cosine", 1.0) == pytest.approx(0.1)
    assert ht.mix_coef(0.5, 0.1, "cosine", 0.25) == pytest.approx(0.1 + 0.4 * 0.5 * (1 + math.cos(math.pi / 4)))


def test_gate_and_mix_splits():
    cfg = ht.Config.from_dict(
        {
            "TRAIN_FILE": "-",
            "OUTPUT_DIR": "-",
            "SEED": 0,
            "GATE_THRESHOLD": 0.5,
            "MIX_COEF": 0.4,
            "MIX_COEF_END": 0.0,
            "MIX_SCHEDULE": "linear",
            "HYBRID": "gate",
        }
    )
    # best scores 0.4 (< 0.5: SFT on the demonstration) and 0.9 (RL)
    split = ht.hybrid_gate(torch.tensor([[0.1, 0.4], [0.2, 0.9]]), cfg, 0.0)
    assert split.sft.tolist() == [True, False] and split.rl.tolist() == [False, True] and split.mu == 0.5
    split = ht.hybrid_mix(torch.tensor([[0.1, 0.4], [0.2, 0.9]]), cfg, 0.5)
    assert split.sft.all() and split.rl.all() and split.mu == pytest.approx(0.2)


# ---- the same numbers as TRL's GRPO loss (trl/trainer/grpo_trainer.py, GRPOTrainer._compute_loss) ----
def trl_grpo_loss(loss_type, logps, old, ref, adv, mask, eps_low, eps_high, beta, level, max_len):
    """Run TRL's own _compute_loss on fixed per-token log-probs (its model forward replaced by them)."""
    from trl import GRPOTrainer

    identity = types.SimpleNamespace(
        gather=lambda x: x, gather_for_metrics=lambda x: x, reduce=lambda x, reduction="sum": x, num_processes=1
    )
    stub = types.SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, torch.zeros_like(logps), None),
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        importance_sampling_level=level,
        beta=beta,
        args=types.SimpleNamespace(
            use_bias_correction_kl=False, delta=None, steps_per_generation=1, sapo_temperature_pos=1.0, sapo_temperature_neg=1.05
        ),
        loss_type=loss_type,
        epsilon_low=eps_low,
        epsilon_high=1 + eps_high if loss_type == "cispo" else eps_high,
        use_vllm=False,
        vllm_importance_sampling_correction=False,
        model=types.SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1,
        max_completion_length=max_len,
        accelerator=identity,
        _entropy_bonus_enabled=False,
        aux_loss_enabled=False,
        _metrics={"train": defaultdict(list)},
    )
    inputs = {
        "prompt_ids": torch.zeros(len(mask), 1, dtype=torch.long),
        "prompt_mask": torch.ones(len(mask), 1),
        "completion_ids": torch.zeros_like(mask, dtype=torch.long),
        "completion_mask": mask,
        "advantages": adv,
        "old_per_token_logps": old,
        "ref_per_token_logps": ref,
        "num_items_in_batch": mask.sum(),
    }
    return GRPOTrainer._compute_loss(stub, None, inputs)


@pytest.mark.parametrize(
    "loss_type, agg, level, beta, eps_high",
    [
        ("grpo", "seq_mean_token_mean", "token", 0.0, 0.2),
        ("grpo", "seq_mean_token_mean", "sequence", 0.0, 0.2),  # GSPO
        ("bnpo", "token_mean", "token", 0.04, 0.2),  # with the k3 KL in the loss
        ("dapo", "token_mean", "token", 0.0, 0.28),  # clip-higher, token-level normalisation
        ("dr_grpo", "seq_mean_token_sum_norm", "token", 0.04, 0.2),
        ("cispo", "token_mean", "token", 0.0, 0.28),  # TRL's epsilon_high (the weight's cap) is our 1 + CLIPRANGE_HIGH
        ("cispo", "token_mean", "token", 0.04, 0.2),
        ("sapo", "seq_mean_token_mean", "token", 0.0, 0.2),  # TRL's default temperatures 1.0 / 1.05, ours too
        ("sapo", "seq_mean_token_mean", "token", 0.04, 0.2),
    ],
)
def test_policy_loss_matches_trl_grpo(loss_type, agg, level, beta, eps_high):
    torch.manual_seed(0)
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0]])
    old = -torch.rand(4, 4) * 2
    logps = (old + 0.4 * torch.randn(4, 4)).requires_grad_(True)  # ratios on both sides of the clip range
    ref = old + 0.3 * torch.randn(4, 4)
    rewards, _ = outcome_rewards([1.0, 0.0, 0.5, 0.2], [3, 2, 4, 1], 4)
    adv, _ = ht.advantages_grpo(rewards=rewards, mask=mask, group_size=2)
    theirs = trl_grpo_loss(loss_type, logps, old, ref, adv[:, :1].squeeze(1), mask, 0.2, eps_high, beta, level, 6)
    kl = beta * ht.kl_per_token(logps, ref, "k3") if beta else None
    kind = loss_type if loss_type in ("cispo", "sapo") else "gspo" if level == "sequence" else "ppo"
    ours = ht.policy_loss(logps, old, adv, mask, ht.LossSettings(0.2, eps_high, kind, agg, 6), kl).loss
    torch.testing.assert_close(ours, theirs)
    g_ours = torch.autograd.grad(ours, logps)[0]
    g_theirs = torch.autograd.grad(trl_grpo_loss(loss_type, logps, old, ref, adv[:, 0], mask, 0.2, eps_high, beta, level, 6), logps)[0]
    torch.testing.assert_close(g_ours * mask, g_theirs * mask)


def test_grpo_and_rloo_advantages_match_trl_trainers(tiny_model, tmp_path):
    """TRL 1.x computes group advantages inside its trainers: run GRPOTrainer's and RLOOTrainer's own scoring step
    on the tiny model (2 prompts x G = 4 samples, its rewards recorded) and compare with ours on those rewards."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    seen = []

    def reward(completions, **_):  # spread-out scores with ties, from the sampled text
        seen.append([float(len(c) % 5) + 0.25 * (i % 3) for i, c in enumerate(completions)])
        return seen[-1]

    for config, trainer_cls, ours in ((GRPOConfig, GRPOTrainer, ht.advantages_grpo), (RLOOConfig, RLOOTrainer, ht.advantages_rloo)):
        args = config(
            output_dir=str(tmp_path / "trl"),
            per_device_train_batch_size=8,
            num_generations=4,
            max_completion_length=6,
            report_to=[],
            use_cpu=True,
            bf16=False,
        )
        trainer = trainer_cls(
            model=model,
            reward_funcs=reward,
            args=args,
            processing_class=tok,
            train_dataset=Dataset.from_list([{"prompt": "say yes"}, {"prompt": "hello"}]),
        )
        out = trainer._generate_and_score_completions([{"prompt": "say yes"}] * 4 + [{"prompt": "hello"}] * 4)
        rewards, mask = outcome_rewards(seen[-1], [1] * 8, 1)
        mine, _ = ours(rewards=rewards, mask=mask, group_size=4)
        torch.testing.assert_close(mine[:, 0], out["advantages"].float(), atol=1e-5, rtol=1e-5)
