"""The PPO update's records and registries: a loss mask that zeroes tokens inside a response (no gradient, no statistic,
still attended to), the policy losses (GMPO by hand; CISPO and SAPO against TRL in test_estimators), every loss with
every estimator and strategy, the Plan and the launch, and the rewards' declared capabilities."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import EXACT_PPO, ROOT, max_diff, metrics, run_cli, trainer_for

import hybrid_trainer as ht
import rewards
import runtime


# ---- pure functions over a mask with a gap ----
def test_gae_skips_positions_the_loss_does_not_cover():
    """GAE over [v0, (gap), v2] equals GAE over the compacted sequence [v0, v2]: the gap passes nothing on."""
    values, rewards_ = torch.tensor([[0.5, 9.0, 0.2, 0.0]]), torch.tensor([[0.1, 7.0, 1.0, 0.0]])
    mask = torch.tensor([[1.0, 0.0, 1.0, 0.0]])
    adv, ret = ht.compute_gae(values, rewards_, mask, gamma=0.9, lam=0.8)
    a2 = 1.0 - 0.2  # the last covered token bootstraps from 0
    a0 = 0.1 + 0.9 * 0.2 - 0.5 + 0.9 * 0.8 * a2  # bootstraps from the next covered token's value
    torch.testing.assert_close(adv, torch.tensor([[a0, 0.0, a2, 0.0]]))
    compact, _ = ht.compute_gae(torch.tensor([[0.5, 0.2]]), torch.tensor([[0.1, 1.0]]), torch.ones(1, 2), 0.9, 0.8)
    torch.testing.assert_close(adv[:, [0, 2]], compact)
    torch.testing.assert_close(ret[:, [0, 2]], compact + torch.tensor([[0.5, 0.2]]))


def test_rewards_and_return_to_go_over_a_gap():
    mask = torch.tensor([[1.0, 0.0, 1.0, 0.0]])
    r = ht.compute_rewards(torch.tensor([2.0]), torch.full((1, 4), 0.5), mask, kl_coef=0.1)
    torch.testing.assert_close(r, torch.tensor([[-0.05, 0.0, 2.0 - 0.05, 0.0]]))  # the score on the last covered token
    returns, _ = ht.advantages_reinforce_pp(rewards=r, mask=mask, gamma=0.5)
    compact, _ = ht.advantages_reinforce_pp(rewards=r[:, [0, 2]], mask=torch.ones(1, 2), gamma=0.5)
    torch.testing.assert_close(returns[:, [0, 2]], compact)
    assert returns[0, 1] == 0 and returns[0, 3] == 0


def test_gmpo_by_hand():
    """GMPO: -A exp(mean_t sgn(A) min(sgn(A) log r_t, sgn(A) clip(log r_t, -0.2, 0.2))) per response."""
    old = torch.zeros(2, 3)
    logp = torch.tensor([[0.1, 0.5, -0.3], [0.1, 0.5, -0.3]], requires_grad=True)
    adv = torch.tensor([[1.0] * 3, [-2.0] * 3])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    out = ht.policy_loss(logp, old, adv, mask, ht.LossSettings(0.2, 0.2, "gmpo", "seq_mean_token_mean"))
    # A > 0: min(log r, clip) per token = [0.1, 0.2, -0.3] -> mean 0.0 -> ratio 1, loss -1
    # A < 0: -min(-log r, -clip) = max(log r, clip) over the 2 tokens = [0.1, 0.5] -> mean 0.3 -> loss 2 e^0.3
    expected = (-1.0 * 1.0 + 2.0 * torch.exp(torch.tensor(0.3))) / 2
    torch.testing.assert_close(out.loss, expected)
    grad = torch.autograd.grad(out.loss, logp)[0]
    # response 1: only unclipped tokens carry gradient, d/dlogp_t = -A ratio / 3 / 2; response 2: 2 e^0.3 / 2 / 2
    g1 = -1.0 / 3 / 2
    g2 = 2.0 * torch.exp(torch.tensor(0.3)).item() / 2 / 2
    torch.testing.assert_close(grad, torch.tensor([[g1, 0.0, g1], [g2, g2, 0.0]]))
    assert out.clipfrac.item() == pytest.approx(1 / 5)  # one of the five covered tokens was clipped


def test_every_loss_is_the_policy_gradient_at_ratio_one():
    """At r = 1 (the first minibatch) every loss's gradient is -A / tokens, the plain policy gradient."""
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    adv = torch.tensor([[0.7] * 3, [-1.3] * 3])
    for kind in ht.POLICY_LOSSES:
        logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -1.1, -2.2]], requires_grad=True)
        out = ht.policy_loss(logp, logp.detach(), adv, mask, ht.LossSettings(0.2, 0.2, kind, "seq_mean_token_mean"))
        grad = torch.autograd.grad(out.loss, logp)[0]
        expected = -adv * mask / mask.sum(1, keepdim=True) / 2
        torch.testing.assert_close(grad, expected, msg=kind)


# ---- the loss mask through a whole update ----
def masked_rollout(trainer, examples, gap: bool):
    tok = trainer.tokenizer
    responses = [tok("yes no yes maybe yes")["input_ids"] + [tok.eos_token_id] for _ in range(4)]
    mask = [0.0 if i in (2, 3) else 1.0 for i in range(len(responses[0]))]  # two tokens the model did not sample
    samples = [
        ht.Sample(e.prompt_ids, r, True, s, loss_mask=mask if gap else None) for e, r, s in zip(examples, responses, [1.0, -0.5, 0.5, 0.2])
    ]
    return ht.make_rollout(samples, 1, trainer.pad_id, trainer.device)


def test_a_loss_mask_gap_gets_no_gradient_no_statistic_and_is_still_attended(tiny_model, tiny_data):
    trainer, examples = trainer_for({"PPO_BATCH": 4, "PPO_EPOCHS": 1, "LR_PPO": 1e-2, "VF_COEF": 1.0}, tiny_model, tiny_data, None)
    examples = examples[:4]
    full, gapped = masked_rollout(trainer, examples, False), masked_rollout(trainer, examples, True)
    assert torch.equal(full.attention_mask, gapped.attention_mask) and torch.equal(full.r_mask, gapped.r_mask)
    R = gapped.r_ids.shape[1]
    gap = (gapped.r_mask > 0) & (gapped.loss_mask == 0)
    assert gap.sum() == 2 * 4
    # still attended: the tokens after the gap see it (their log-probs are those of the unmasked batch)
    perm = torch.arange(4)
    old_full, old_gapped = trainer.update.old_policy(full, perm), trainer.update.old_policy(gapped, perm)
    torch.testing.assert_close(old_full.logprobs, old_gapped.logprobs)
    # no gradient: the gradients reaching the logits and the values at the gap are 0 (and elsewhere not)
    grads = {}
    forward = trainer.policy.forward

    def recording(*args, **kw):
        out = forward(*args, **kw)
        logits = out.logits if out.logits is not None else out.hidden  # LOGITS_CHUNK: the head reads the hidden states
        if logits.requires_grad:  # the minibatch's forward, not step 4's
            logits.register_hook(lambda g: grads.__setitem__("logits", g))
            out.values.register_hook(lambda g: grads.__setitem__("values", g))
        return out

    trainer.policy.forward = recording
    trainer.update.fuse_first_forward = False
    trainer.kl_ctl.value = 0.5
    stats = trainer.update.learn(gapped)
    trainer.policy.forward = forward
    assert grads["logits"].shape[1] == R
    assert grads["logits"][gap].abs().max() == 0 and grads["values"][gap].abs().max() == 0
    covered = gapped.loss_mask > 0
    assert grads["logits"][covered].abs().sum(-1).min() > 0 and grads["values"][covered].abs().min() > 0
    # no statistic: lengths, KL, entropy count the covered tokens only (the policy has moved: the KL is not 0)
    second = trainer.update.old_policy(gapped, perm)
    stats = trainer.update.learn(gapped)
    assert stats["ppo/response_length"] == pytest.approx(gapped.loss_mask.sum(1).mean().item())
    assert stats["ppo/response_length"] < gapped.r_mask.sum(1).mean().item()
    assert stats["objective/kl"] == pytest.approx((second.kl * gapped.loss_mask).sum(1).mean().item(), rel=1e-5)
    assert stats["objective/kl"] != pytest.approx((second.kl * gapped.r_mask).sum(1).mean().item(), rel=1e-3)


def test_the_rollout_loss_mask_is_the_response_mask_single_turn(tiny_model, tiny_data):
    trainer, examples = trainer_for({"PPO_BATCH": 4}, tiny_model, tiny_data, None)
    rollout = masked_rollout(trainer, examples[:4], False)
    assert torch.equal(rollout.loss_mask, rollout.r_mask)


# ---- every policy loss with every estimator and hybrid strategy ----
class Spread:
    """0 on the prompts "say yes N" of even N (gate sends them to SFT); between 0.5 and 1 by the response's characters
    on the others, so two different responses almost always score differently (remax's sample against its greedy one:
    by length alone they tied on some machines, and the loss was 0)."""

    def scores(self, responses, targets, prompts=None, items=None, update=True):
        odd = [int(p.split("say yes ")[1][0]) % 2 for p in prompts]
        return [o * (0.5 + sum(map(ord, r)) % 5 / 8) for o, r in zip(odd, responses)]


COMBOS = [(loss, adv, None) for loss in ht.POLICY_LOSSES for adv in ht.ADVANTAGES if adv != "none"] + [
    (loss, "grpo", hybrid) for loss in ht.POLICY_LOSSES for hybrid in ("gate", "mix")
]


@pytest.mark.parametrize("loss, advantage, hybrid", COMBOS)
def test_every_loss_works_with_every_estimator_and_strategy(loss, advantage, hybrid, tiny_model, tiny_data):
    G = 1 if not ht.ADVANTAGES[advantage].group and hybrid is None else 2
    overrides = {
        "POLICY_LOSS": loss,
        "ADVANTAGE": advantage,
        "NUM_GENERATIONS": G,
        "PPO_BATCH": 4 // G,
        "PPO_MINI": 2 // G,
        "PPO_EPOCHS": 2,
        "MAX_NEW_TOKENS": 4,
        "LR_PPO": 1e-3,
        "KL_IN": "loss" if G > 1 else "reward",
    }
    if hybrid:
        overrides.update({"MODE": "hybrid", "HYBRID": hybrid, "GATE_THRESHOLD": 0.5})
    trainer, examples = trainer_for(overrides, tiny_model, tiny_data, Spread())
    before = [p.detach().clone() for p in trainer.policy.lm.parameters()]
    stats = trainer.ppo_update(examples[: 4 // G], draw=None)
    assert stats["ppo/skipped_minibatches"] == 0
    assert all(v == v for k, v in stats.items() if isinstance(v, float)), stats  # no NaN
    if hybrid == "gate":
        assert 0 < stats["hybrid/gate_sft_fraction"] < 1, stats  # some prompts by SFT, the others by RL (with this loss)
    else:
        assert stats["ppo/loss/policy"] != 0
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.policy.lm.parameters()))


LEARN = {
    "MODE": "ppo",
    "ADVANTAGE": "grpo",
    "NUM_GENERATIONS": 4,
    "PPO_BATCH": 8,
    "PPO_EPOCHS": 4,
    "LR_PPO": 3e-3,
    "INIT_KL_COEF": 0.01,
    "MAX_NEW_TOKENS": 6,
    "EPOCHS": 20,
    "LOG_EVERY": 100,
    "SEED": 0,
    "REWARD": {"type": "contains", "pattern": "yes"},
    **EXACT_PPO,
}


@pytest.mark.parametrize("loss", [name for name in ht.POLICY_LOSSES if name != "ppo"])  # ppo: test_algorithms' runs
def test_each_policy_loss_raises_the_reward_through_the_cli(loss, tiny_model, tiny_data, tmp_path):
    out = tmp_path / "out"
    run_cli(
        {
            **LEARN,
            "POLICY_LOSS": loss,
            "MODEL": str(tiny_model),
            "TRAIN_FILE": str(tiny_data),
            "OUTPUT_DIR": str(out),
            **({"CLIPRANGE_HIGH": 4.0} if loss == "cispo" else {}),
        },
        tmp_path,
    )
    rewards_ = [r["reward/mean"] for r in metrics(out) if r["phase"] == "ppo"]
    # the best three updates in a row beat the first three: at LR 3e-3 a tiny model can overshoot after it learned
    # (sapo: 0.03 -> 1.0 at update 14, then 0.19), and where that happens moves with the summation order (PACKING)
    best = max(sum(rewards_[i : i + 3]) / 3 for i in range(len(rewards_) - 2))
    assert best > sum(rewards_[:3]) / 3 + 0.3, " ".join(f"{r:.3f}" for r in rewards_)


def test_importance_level_sequence_is_gspo():
    cfg = ht.Config.from_dict({"TRAIN_FILE": "-", "OUTPUT_DIR": "-", "IMPORTANCE_LEVEL": "sequence"})
    assert cfg.POLICY_LOSS == "gspo"
    with pytest.raises(runtime.UserError, match='IMPORTANCE_LEVEL "sequence" is POLICY_LOSS "gspo"'):
        ht.Config.from_dict({"TRAIN_FILE": "-", "OUTPUT_DIR": "-", "IMPORTANCE_LEVEL": "sequence", "POLICY_LOSS": "cispo"})
    assert ht.Config.from_dict({"TRAIN_FILE": "-", "OUTPUT_DIR": "-", "POLICY_LOSS": "gmpo"}).LOSS_AGG == "seq_mean_token_mean"


def test_help_lists_the_new_registries():
    proc = subprocess.run([sys.executable, str(ROOT / "hybrid_trainer.py"), "--help"], capture_output=True, text=True)
    for key in ("POLICY_LOSS:", "LOSS_AGG:", "KL_IN:", "ROLLOUT_IS:", "REWARD math extract:"):
        assert f"  {key}\n" in proc.stdout, key
    for name in (*ht.POLICY_LOSSES, *ht.LOSS_AGGREGATIONS, *ht.KL_PLACES, *ht.ROLLOUT_IS_MODES, *rewards.MATH_EXTRACTORS):
        assert f"    {name} " in proc.stdout, name


# ---- the launch and the Plan ----
def test_the_launch_is_read_by_run_not_at_import(monkeypatch):
    code = "import hybrid_trainer, runtime; print(runtime.PROCS.world, runtime.PROCS.rank, runtime.Processes.from_env().world)"
    env = {**os.environ, "RANK": "1", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
    assert proc.stdout.split() == ["1", "0", "2"], proc.stderr
    threads = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # set by `make test`: it would keep torch's count as it is
    try:  # set_threads divides the CPUs among the launch's processes on this node, from the Processes it is given
        assert runtime.set_threads(runtime.Processes(local_world=2)).endswith("/ 2 processes)")
        assert torch.get_num_threads() == max(1, runtime.usable_cpus() // 2)
    finally:
        torch.set_num_threads(threads)


def test_a_plan_for_two_processes_in_one():
    cfg = ht.Config.from_dict(
        {
            "TRAIN_FILE": "-",
            "OUTPUT_DIR": "-",
            "MODE": "ppo",
            "PPO_BATCH": 4,
            "PPO_MINI": 2,
            "NUM_GENERATIONS": 2,
            "ADVANTAGE": "grpo",
            "SFT_BATCH": 4,
        }
    )
    plan = ht.make_plan(cfg, 8, 2, 1, False, False, "p", "m")
    assert (plan.world_size, plan.prompts_per_process, plan.responses_per_update, plan.responses_per_minibatch) == (2, 2, 8, 4)
    assert plan.schedule == ("ppo",) * 2 and plan.batch_size("ppo") == 4 and plan.group_size == 2
    assert json.loads(json.dumps(ht.dataclasses.asdict(plan)))["schedule"] == ["ppo", "ppo"]


# ---- rewards: what they report comes back from the call ----
def test_weighted_sum_components_come_back_with_the_scores():
    reward = rewards.make_reward(
        {"type": "weighted_sum", "components": [{"type": "contains", "pattern": "yes", "weight": 2}, {"type": "length", "target": 2}]}
    )
    out = reward.score(["yes yes", "no"], ["", ""])
    assert out.components == {"contains": [1.0, 0.0], "length": [1.0, 0.5]} and out.values == [3.0, 0.5]
    assert reward.scores(["yes yes", "no"], ["", ""]) == out.values
    assert not hasattr(reward, "components")


def test_overlong_counts_the_generated_ids_not_a_retokenization():
    class Words:  # the text's word count: what re-tokenizing would count
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": text.split()}

    reward = rewards.make_reward({"type": "overlong", "max_length": 4, "buffer": 2}, tokenizer=Words())
    # one word that was generated as 5 tokens (e.g. a word split into pieces): 5 > 4 tokens is -1; re-tokenized it is 1
    assert reward.score(["antidisestablishment"], [""], token_ids=[[1, 2, 3, 4, 5]]).values == [-1.0]
    assert reward.score(["antidisestablishment"], [""]).values == [0.0]


def test_the_trainer_passes_generated_ids_to_the_reward(tiny_model, tiny_data):
    seen = []

    class Spy(rewards.Scorer):
        def score(self, responses, targets, prompts, items, update=True, token_ids=None):
            seen.append(token_ids)
            return rewards.Scores([0.0] * len(responses))

    trainer, examples = trainer_for({"PPO_BATCH": 2, "MAX_NEW_TOKENS": 3}, tiny_model, tiny_data, rewards.Reward("spy", Spy(), []))
    scored = trainer.collector.score([[5, 6, 7], [8]], examples[:2])
    assert scored.error is None and seen == [[[5, 6, 7], [8]]]


# ---- LOGITS_CHUNK: the log-probs and entropy from the hidden states, chunk by chunk ----
@pytest.mark.parametrize("chunk", [1, 3, 7, 1000])
def test_chunked_token_stats_equal_the_full_logits_in_value_and_gradient(chunk):
    """chunked_token_stats (checkpointed chunks of the head) = token_stats(head(hidden)): log-probs and entropy, and
    the gradients reaching the hidden states and the head's weight, within 1e-6 in fp32."""
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 50, bias=False)
    hidden = torch.randn(3, 5, 8, requires_grad=True)
    labels = torch.randint(0, 50, (3, 5))
    weights = torch.randn(3, 5)
    full_lp, full_ent = ht.token_stats(head(hidden), labels, 0.7)
    (full_lp * weights).sum().backward()
    grads = hidden.grad.clone(), head.weight.grad.clone()
    hidden.grad, head.weight.grad = None, None
    lp, ent = ht.chunked_token_stats(hidden, head, labels, 0.7, chunk)
    (lp * weights).sum().backward()
    torch.testing.assert_close(lp, full_lp, atol=1e-6, rtol=0)
    torch.testing.assert_close(ent, full_ent, atol=1e-6, rtol=0)
    torch.testing.assert_close(hidden.grad, grads[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(head.weight.grad, grads[1], atol=1e-6, rtol=0)
    assert not ent.requires_grad
    torch.testing.assert_close(full_lp, ht.logprobs_from_logits(head(hidden), labels, 0.7))


def well_conditioned(optimizer) -> None:
    """AdamW with eps 1: its step is then about LR x the gradient for this tiny model's small gradients, so the same
    gradient up to float rounding gives the same weights up to rounding. With eps 1e-8 AdamW moves a weight by about
    LR x sign(gradient) whatever its size: where a gradient is zero or near it, the two paths' rounding became a
    large part of an LR step, and weights differed by 1e-5 on one CPU (an AMD EPYC) and not on another."""
    for group in optimizer.param_groups:
        group["eps"] = 1.0


@pytest.mark.parametrize("advantage", ["gae", "grpo"])
def test_an_update_with_chunked_logits_equals_one_with_the_whole_logits(advantage, tiny_model, tiny_data):
    """The same PPO update (step 4's fused first forward included) with LOGITS_CHUNK 3 and 0: every logged number and
    every weight within 1e-6."""

    def update(chunk):
        G = 2 if advantage == "grpo" else 1
        # grpo with the KL in the loss, as GRPO has it: in the reward, a group whose scores tie (Spread's) is left with
        # the per-token KL alone, which the group's std normalization blows up; policy == reference gives KL exactly 0
        # on the whole path and float rounding (2e-7) on the chunked one, which became advantages of 1e-4 on one CPU
        kl_in = {"KL_IN": "loss"} if advantage == "grpo" else {}
        trainer, examples = trainer_for(
            {
                "LOGITS_CHUNK": chunk,
                "ADVANTAGE": advantage,
                "NUM_GENERATIONS": G,
                "PPO_BATCH": 4 // G,
                "PPO_MINI": 4 // G,
                "PPO_EPOCHS": 2,
                "MAX_NEW_TOKENS": 6,
                "LR_PPO": 1e-3,
                **kl_in,
            },
            tiny_model,
            tiny_data,
            Spread(),
        )
        well_conditioned(trainer.optim.ppo)
        torch.manual_seed(1)
        stats = trainer.ppo_update(examples[: 4 // G], draw=None)
        return stats, {k: v.detach().clone() for k, v in trainer.policy.state_dict().items()}, trainer

    (chunked, w_chunked, trainer), (whole, w_whole, _) = update(3), update(0)
    assert trainer.policy.logits_chunk == 3  # the tiny GPT-2's head is separable: the chunked path ran
    assert chunked.keys() == whole.keys()
    for k in whole:
        if not k.startswith("time/"):
            assert chunked[k] == pytest.approx(whole[k], abs=1e-6, rel=1e-6), k
    assert max_diff(w_chunked, w_whole) <= 1e-6


def test_a_head_that_is_not_a_function_of_the_hidden_states_keeps_the_logits(tiny_model, tiny_data):
    """A model whose logits are not its output embedding of its last hidden state (here: scaled after the head, as
    soft-capping models do) is found by the probe: the update uses the model's own logits."""
    trainer, _ = trainer_for({"LOGITS_CHUNK": 4}, tiny_model, tiny_data, Spread())
    lm = trainer.policy.lm
    original = lm.forward

    def scaled(*args, **kw):
        out = original(*args, **kw)
        out["logits"] = out.logits * 0.5
        return out

    lm.forward = scaled
    assert not trainer.policy.head_is_separable() and not trainer.policy.packs()


@pytest.mark.parametrize("sft_loss", ["ce", "dft"])
def test_an_sft_step_with_chunked_logits_equals_one_with_the_whole_logits(sft_loss, tiny_model, tiny_data):
    def step(chunk):
        trainer, examples = trainer_for(
            {"MODE": "sft", "LOGITS_CHUNK": chunk, "SFT_LOSS": sft_loss, "SFT_BATCH": 4, "LR_SFT": 1e-3}, tiny_model, tiny_data, None
        )
        well_conditioned(trainer.optim.sft)
        stats = trainer.sft_step(examples[:4])
        return stats, {k: v.detach().clone() for k, v in trainer.policy.lm.state_dict().items()}

    (chunked, w_chunked), (whole, w_whole) = step(3), step(0)
    assert chunked["sft/loss"] == pytest.approx(whole["sft/loss"], abs=1e-6, rel=1e-6)
    assert max_diff(w_chunked, w_whole) <= 1e-6


def test_useful_tokens_by_hand():
    """Two groups of two: prompts of 3 and 2 tokens (left-padded to 3), responses of 2, 1, 3 and 0 tokens: each
    prompt once per group, every response token: 3 + 2 + 6 = 11."""
    prompt_mask = torch.tensor([[1, 1, 1], [1, 1, 1], [0, 1, 1], [0, 1, 1]])
    r_mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [0, 0, 0]], dtype=torch.float)
    assert runtime.useful_tokens(torch.cat([prompt_mask, r_mask.long()], 1), r_mask, 2) == 11


@pytest.mark.parametrize("mini, accum", [(1, 1), (2, 1), (2, 2)])  # 2: the whole batch (step 4's first forward); accum: GRAD_ACCUM
def test_update_tokens_count_every_forward_of_the_update(mini, accum, tiny_model, tiny_data):
    """perf/update_tokens is what the models' forwards ran in the update (counted here by wrapping them), and
    perf/useful_tokens the real tokens of those passes with each prompt once per group."""
    trainer, examples = trainer_for(
        {"ADVANTAGE": "grpo", "NUM_GENERATIONS": 2, "PPO_BATCH": 2, "PPO_MINI": mini, "PPO_EPOCHS": 2, "MAX_NEW_TOKENS": 6}
        | {"GRAD_ACCUM": accum, "SFT_BATCH": 2},
        tiny_model,
        tiny_data,
        Spread(),
    )
    trainer.policy.packs(), runtime.packs_apart(trainer.update.parts.reference)  # their probe forwards, before the update
    ran, learning = [], []
    for lm in (trainer.policy.lm, trainer.update.parts.reference):
        forward = lm.forward
        lm.forward = lambda *a, _f=forward, **kw: (ran.append(kw["input_ids"].numel()) if learning else None, _f(*a, **kw))[1]
    learn = trainer.update.learn
    trainer.update.learn = lambda *a, **kw: (learning.append(1), learn(*a, **kw))[1]
    stats = trainer.ppo_update(examples[:2], draw=None)
    assert stats["perf/update_tokens"] == sum(ran)  # Spread's flat groups: SKIP_ZERO_ADVANTAGE's rows not run, not counted
    assert 0 < stats["perf/useful_tokens"] and (stats["perf/skipped_responses"] > 0 or stats["perf/useful_tokens"] <= sum(ran))


def test_pack_rows_by_hand():
    """Four left-padded rows; rows 0 and 1 share the prompt [7, 8] (a group): one segment [7, 8 | 1 | 2, 3], each
    response at the positions it has alone and attending to the prompt and itself only; the segments by first-fit
    decreasing into rows as long as the longest; each response token predicted at the position before it (the
    first: the prompt's last)."""
    mask = torch.tensor([[0, 1, 1, 1, 0, 0], [0, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 0, 0]])
    ids = torch.tensor([[0, 7, 8, 1, 0, 0], [0, 7, 8, 2, 3, 0], [4, 5, 6, 9, 9, 9], [0, 0, 3, 5, 0, 0]])
    packed = runtime.pack_rows(ids, mask, 3)
    assert packed.input_ids.tolist() == [[4, 5, 6, 9, 9, 9], [7, 8, 1, 2, 3, 0], [3, 5, 0, 0, 0, 0]]
    assert packed.position_ids[:, :5].tolist() == [[0, 1, 2, 3, 4], [0, 1, 2, 2, 3], [0, 1, 0, 0, 0]]
    assert packed.index.tolist() == [[7, 0, 0], [7, 9, 0], [2, 3, 4], [12, 0, 0]]
    sees = {(k, q): [j for j in range(6) if packed.mask[k, q, j]] for k, q in ((0, 5), (1, 2), (1, 3), (1, 4), (1, 5), (2, 1))}
    assert sees == {(0, 5): [0, 1, 2, 3, 4, 5], (1, 2): [0, 1, 2], (1, 3): [0, 1, 3], (1, 4): [0, 1, 3, 4], (1, 5): [5], (2, 1): [0, 1]}
    assert runtime.packed_positions(runtime.row_pairs(ids, mask, 3)) == 18


def test_grouped_attention_packs_long_rows_with_the_same_numbers():
    """With grouped attention (cpu_attention: each prompt's queries against its own keys, each response's against its
    prompt's and its own) the segments go into one long row, no padding at its end, and the hidden states at every
    response position equal each sequence's alone and the row-per-segment packing's within 1e-5 in fp32 (grouped-query
    attention, groups of very different lengths, an empty response); the probe finds the model's attention took the
    groups; the responses' group attends exactly to each response's prompt and to itself."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    config.num_key_value_heads = 2  # grouped-query attention
    lm = LlamaForCausalLM(config).eval()
    runtime.use_cpu_attention(lm)
    assert runtime.packs_apart(lm) and runtime.grouped(lm)
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [3, 4], [20, 21, 22, 23, 24]]
    pairs = [(p, [(7 * g + 3 * i + j) % 64 for j in range((5 * i + 3 * g) % 12)]) for g, p in enumerate(prompts) for i in range(4)]
    assert any(not r for _, r in pairs)
    wise, plain = runtime.pack_sequences(pairs, 12, "cpu", grouped=True), runtime.pack_sequences(pairs, 12, "cpu")
    real = sum(len(p) for p in prompts) + sum(len(r) for _, r in pairs)
    assert wise.input_ids.shape == (1, real) and runtime.packed_positions(pairs, grouped=True) == real
    assert plain.input_ids.shape[0] == 3 and plain.input_ids.numel() > real
    _, responses = wise.groups
    for queries, keys, mask, real_q in zip(responses.queries, responses.keys, responses.mask, responses.real):
        own = queries[real_q].tolist()
        seen = keys[mask[0, len(own) - 1]].tolist()  # what the response's last token attends: its prompt, then itself
        assert wise.input_ids[0, seen[: -len(own)]].tolist() in prompts and seen[-len(own) :] == own
    calls = runtime.GROUPED_CALLS[0]
    with torch.no_grad():
        together, rows = runtime.packed_hidden(lm, None, None, 0, wise), runtime.packed_hidden(lm, None, None, 0, plain)
        assert runtime.GROUPED_CALLS[0] == calls + config.num_hidden_layers
        for b, (p, r) in enumerate(pairs):
            if r:
                alone = lm(input_ids=torch.tensor([p + r]), output_hidden_states=True).hidden_states[-1][0, len(p) - 1 : -1]
                assert (together[b, : len(r)] - alone).abs().max() < 1e-5 and (together[b, : len(r)] - rows[b, : len(r)]).abs().max() < 1e-5


@pytest.mark.parametrize("advantage", ["grpo", "gae"])
def test_a_packed_update_equals_a_padded_one(advantage, tiny_model, tiny_data):
    """The same PPO update with PACKING on and off, on prompts and responses of very different lengths (the step-4
    fused forward, the second epoch's own, a critic, the reference's pass included): every logged number and every
    weight within 1e-5 in fp32; the packed one ran fewer token positions."""
    mini = 4

    def update(pack):
        G = 2 if advantage == "grpo" else 1
        trainer, examples = trainer_for(
            {"PACKING": pack, "ADVANTAGE": advantage, "NUM_GENERATIONS": G, "PPO_BATCH": 4 // G, "PPO_MINI": mini // G, "PPO_EPOCHS": 2}
            | {"MAX_NEW_TOKENS": 12, "LR_PPO": 1e-3, "KL_IN": "loss" if G > 1 else "reward"},
            tiny_model,
            tiny_data,
            Spread(),
        )
        well_conditioned(trainer.optim.ppo)
        examples = examples[: 4 // G]
        examples[0].prompt_ids = examples[0].prompt_ids * 4  # one prompt 4x as long: the others pack beside each other
        torch.manual_seed(1)
        stats = trainer.ppo_update(examples, draw=None)
        return stats, {k: v.detach().clone() for k, v in trainer.policy.state_dict().items()}, trainer

    (packed, w_packed, trainer), (padded, w_padded, _) = update(True), update(False)
    assert trainer.policy.packs()
    assert packed["perf/update_tokens"] < padded["perf/update_tokens"] and packed["perf/useful_tokens"] == padded["perf/useful_tokens"]
    for k in padded:
        if not k.startswith(("time/", "perf/update_tokens")):
            assert packed[k] == pytest.approx(padded[k], abs=1e-5, rel=1e-5), k
    assert max_diff(w_packed, w_padded) <= 1e-5


@pytest.mark.parametrize("chunk", [0, 3])
def test_a_packed_sft_step_equals_a_padded_one(chunk, tiny_model, tiny_data):
    """An SFT step on pairs of very different lengths, PACKING on and off (with and without LOGITS_CHUNK): the loss
    and every weight within 1e-5 in fp32."""

    def step(pack):
        trainer, examples = trainer_for(
            {"MODE": "sft", "PACKING": pack, "LOGITS_CHUNK": chunk, "SFT_BATCH": 4, "LR_SFT": 1e-3}, tiny_model, tiny_data, None
        )
        well_conditioned(trainer.optim.sft)
        examples = examples[:4]
        examples[0].prompt_ids = examples[0].prompt_ids * 4
        stats = trainer.sft_step(examples)
        return stats, {k: v.detach().clone() for k, v in trainer.policy.lm.state_dict().items()}, trainer

    (packed, w_packed, trainer), (padded, w_padded, _) = step(True), step(False)
    assert trainer.policy.packs()
    assert packed["sft/loss"] == pytest.approx(padded["sft/loss"], abs=1e-5, rel=1e-5)
    assert max_diff(w_packed, w_padded) <= 1e-5


@pytest.mark.parametrize(
    "mini, accum, agg, loss", [(1, 1, "token_mean", "ppo"), (2, 2, "seq_mean_token_mean", "gspo"), (4, 1, "token_mean", "ppo")]
)
def test_skipping_responses_without_gradient_changes_no_weight(mini, accum, agg, loss, tiny_model, tiny_data):
    """SKIP_ZERO_ADVANTAGE on and off, GRPO without a KL in the loss, Spread's flat groups (every response of an even
    prompt scores 0: advantage 0): the skipped rows ran no forward, and the weights and the losses are the unskipped
    update's within 1e-6 in fp32 (PPO_MINI 1 has minibatches where no row has a gradient: one runs, its gradient 0;
    PPO_MINI 4, one minibatch: the scores say which rows have none, so the first minibatch's forward, step 4's, runs
    the others only, and both epochs skip them)."""

    def update(skip):
        keys = {"SKIP_ZERO_ADVANTAGE": skip, "ADVANTAGE": "grpo", "NUM_GENERATIONS": 2, "PPO_BATCH": 4, "PPO_MINI": mini}
        keys |= {"PPO_EPOCHS": 2, "GRAD_ACCUM": accum, "LOSS_AGG": agg, "POLICY_LOSS": loss, "MAX_NEW_TOKENS": 8, "LR_PPO": 1e-3}
        trainer, examples = trainer_for(keys | {"INIT_KL_COEF": 0.0}, tiny_model, tiny_data, Spread())
        well_conditioned(trainer.optim.ppo)
        torch.manual_seed(1)
        stats = trainer.ppo_update(examples[:4], draw=None)
        return stats, {k: v.detach().clone() for k, v in trainer.policy.state_dict().items()}

    (skipped, w_skipped), (whole, w_whole) = update(True), update(False)
    assert skipped["reward/zero_std_groups"] == whole["reward/zero_std_groups"] >= 0.5  # the metrics still count them
    assert skipped["perf/skipped_responses"] >= 2 and whole["perf/skipped_responses"] == 0
    if mini == 4:  # every epoch skips every flat group's rows, the first too, whose forward is step 4's (no pass over all)
        assert skipped["perf/skipped_responses"] == 8 * skipped["reward/zero_std_groups"] == 6
        assert skipped["perf/update_tokens"] < 0.5 * whole["perf/update_tokens"]
    assert skipped["perf/update_tokens"] < whole["perf/update_tokens"]
    for k in ("ppo/loss/policy", "ppo/loss/total", "reward/mean", "objective/kl", "ppo/grad_norm"):
        assert skipped[k] == pytest.approx(whole[k], abs=1e-6, rel=1e-6), k
    assert max_diff(w_skipped, w_whole) <= 1e-6


def test_the_reference_and_teacher_log_probs_come_chunk_by_chunk(tiny_model, tiny_data):
    """No-grad passes (step 4's reference, and the policy's) never run the LM head on more than LOGITS_CHUNK positions
    at once: no whole-vocabulary logits of a minibatch; their log-probs equal the whole head's (the chunked-logits
    update test compares every number)."""
    trainer, examples = trainer_for(
        {"LOGITS_CHUNK": 3, "ADVANTAGE": "grpo", "NUM_GENERATIONS": 2, "PPO_BATCH": 2, "PPO_MINI": 1, "MAX_NEW_TOKENS": 6, "KL_IN": "loss"},
        tiny_model,
        tiny_data,
        Spread(),
    )
    reference = trainer.update.parts.reference
    runtime.head_is_separable(reference), runtime.packs_apart(reference)  # their probes run whole heads, once, before
    seen = []
    head = reference.get_output_embeddings()
    hook = head.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[:-1].numel()))
    trainer.ppo_update(examples[:2], draw=None)
    hook.remove()
    assert seen and max(seen) <= 3, seen


def test_minibatches_hold_whole_groups(tiny_model, tiny_data):
    """MINIBATCH_GROUPS: each epoch's order is a random order of groups, a group's G rows together, so every minibatch
    of PPO_MINI x G rows holds whole groups and runs each prompt once; false (default): rows across groups."""
    orders = {}
    for together in (True, False):
        trainer, examples = trainer_for(
            {"MINIBATCH_GROUPS": together, "ADVANTAGE": "grpo", "NUM_GENERATIONS": 2, "PPO_BATCH": 4, "PPO_MINI": 1}
            | {"PPO_EPOCHS": 3, "MAX_NEW_TOKENS": 6, "INIT_KL_COEF": 0.0},
            tiny_model,
            tiny_data,
            Spread(),
        )
        run = trainer.update.epochs
        trainer.update.epochs = lambda batch, perms, *a, _t=together, _run=run, **kw: (
            orders.setdefault(_t, perms),
            _run(batch, perms, *a, **kw),
        )[1]
        trainer.ppo_update(examples[:4], draw=None)
    for perm in orders[True]:
        assert sorted(perm.tolist()) == list(range(8))
        assert all(len({int(i) // 2 for i in mb}) == 1 for mb in perm.split(2))  # each minibatch: one group's two rows
    assert any(len({int(i) // 2 for i in mb}) > 1 for perm in orders[False] for mb in perm.split(2))
