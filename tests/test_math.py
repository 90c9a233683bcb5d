"""Tier 1: the pure PPO math, against numbers worked out by hand in the comments."""

import functools
import math

import pytest
import torch
import torch.nn.functional as F

import hybrid_trainer as ht
import runtime


def test_logprobs_from_logits_matches_hand_softmax():
    # logits [0, ln 3] -> softmax [1/4, 3/4]; label 1 -> log 3/4. At T=2: logits [0, ln3/2] -> [1/(1+sqrt3), sqrt3/(1+sqrt3)]
    logits = torch.tensor([[[0.0, math.log(3.0)]]])
    labels = torch.tensor([[1]])
    assert ht.logprobs_from_logits(logits, labels).item() == pytest.approx(math.log(0.75))
    s3 = math.sqrt(3)
    assert ht.logprobs_from_logits(logits, labels, temperature=2.0).item() == pytest.approx(math.log(s3 / (1 + s3)))


def test_logprobs_agrees_with_trl_selective_log_softmax():
    from trl.trainer.utils import selective_log_softmax

    torch.manual_seed(0)
    logits, labels = torch.randn(3, 5, 11), torch.randint(0, 11, (3, 5))
    torch.testing.assert_close(ht.logprobs_from_logits(logits, labels, 0.7), selective_log_softmax(logits, labels, temperature=0.7))


def test_masked_mean_var_whiten_equal_plain_functions_on_unmasked_slice():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, -50.0, 7.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 1]]).float()
    kept = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 7.0])
    assert ht.masked_mean(x, mask).item() == pytest.approx(kept.mean().item())  # 22 / 6
    assert ht.masked_var(x, mask).item() == pytest.approx(kept.var(unbiased=True).item())
    assert ht.masked_var(x, mask, unbiased=False).item() == pytest.approx(kept.var(unbiased=False).item())
    whitened = ht.masked_whiten(x, mask)
    expected = (kept - kept.mean()) / kept.std(unbiased=True)
    torch.testing.assert_close(whitened[mask.bool()], expected, atol=1e-5, rtol=1e-5)
    assert whitened[0, 3] == 0 and whitened[1, 2] == 0  # padding stays zero


def test_masked_mean_along_dim():
    x = torch.tensor([[2.0, 4.0, 9.0], [1.0, 1.0, 1.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    torch.testing.assert_close(ht.masked_mean(x, mask, dim=1), torch.tensor([3.0, 0.0]))  # empty row -> 0, not NaN


def test_whiten_without_shift_keeps_mean():
    # x = [1, 3]: mean 2, unbiased std sqrt(2). shift_mean=False -> (x - 2)/sqrt2 + 2
    x, mask = torch.tensor([[1.0, 3.0]]), torch.ones(1, 2)
    out = ht.masked_whiten(x, mask, shift_mean=False)
    torch.testing.assert_close(out, torch.tensor([[2 - 1 / math.sqrt(2), 2 + 1 / math.sqrt(2)]]), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "kind, expected",
    [
        ("kl", [0.5, -0.25]),  # logp - ref
        ("abs", [0.5, 0.25]),
        ("mse", [0.125, 0.03125]),  # 0.5 * d^2
    ],
)
def test_kl_penalty_kinds(kind, expected):
    logp, ref = torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.5, -1.75]])
    torch.testing.assert_close(ht.kl_per_token(logp, ref, kind), torch.tensor([expected]))


def test_full_kl_is_exact_kl_divergence():
    # p = [0.5, 0.5], q = [0.25, 0.75]: KL = 0.5 ln 2 + 0.5 ln(2/3)
    p, q = torch.tensor([[[0.5, 0.5]]]).log(), torch.tensor([[[0.25, 0.75]]]).log()
    assert ht.kl_per_token(p, q, "full").item() == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(2 / 3))


def test_compute_rewards_adds_score_on_last_response_token():
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    rewards = ht.compute_rewards(torch.tensor([1.0, -2.0]), kl, mask, kl_coef=0.5)
    # row 0: -0.5*[0.1, 0.2] then score 1 on token 1 -> [-0.05, 0.9, 0]; row 1: [-0.2, -0.25, -0.3 - 2]
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, 0.9, 0.0], [-0.2, -0.25, -2.3]]))


def test_gae_by_hand():
    # gamma 0.9, lam 0.8, one row, values [1, 2], rewards [0, 1]
    # t=1: delta = 1 + 0.9*0 - 2 = -1          -> A1 = -1
    # t=0: delta = 0 + 0.9*2 - 1 = 0.8         -> A0 = 0.8 + 0.9*0.8*(-1) = 0.08
    adv, ret = ht.compute_gae(torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 1.0]]), torch.ones(1, 2), 0.9, 0.8)
    torch.testing.assert_close(adv, torch.tensor([[0.08, -1.0]]))
    torch.testing.assert_close(ret, torch.tensor([[1.08, 1.0]]))


def test_gae_matches_plain_loop_and_ignores_padding():
    torch.manual_seed(0)
    values, rewards = torch.randn(3, 6), torch.randn(3, 6)
    lengths = [6, 4, 1]
    mask = torch.tensor([[1.0] * n + [0.0] * (6 - n) for n in lengths])
    adv, _ = ht.compute_gae(values, rewards, mask, gamma=0.99, lam=0.95)
    for row, n in enumerate(lengths):  # plain per-sequence reference on the unpadded slice
        gae, expected = 0.0, [0.0] * n
        for t in reversed(range(n)):
            next_v = values[row, t + 1].item() if t + 1 < n else 0.0
            delta = rewards[row, t].item() + 0.99 * next_v - values[row, t].item()
            gae = delta + 0.99 * 0.95 * gae
            expected[t] = gae
        torch.testing.assert_close(adv[row, :n], torch.tensor(expected), atol=1e-5, rtol=1e-5)


def test_policy_loss_clipping_by_hand():
    # log-ratios [ln 1.5, ln 0.5, 0], advantages [1, 1, -2], clip 0.2
    # token 0: ratio 1.5, A=1: max(-1.5, -1.2) = -1.2 (clipped active)
    # token 1: ratio 0.5, A=1: max(-0.5, -0.8) = -0.5 (unclipped)
    # token 2: ratio 1.0, A=-2: max(2, 2) = 2
    old = torch.zeros(1, 3)
    new = torch.tensor([[math.log(1.5), math.log(0.5), 0.0]])
    out = ht.policy_loss(new, old, torch.tensor([[1.0, 1.0, -2.0]]), torch.ones(1, 3), ht.LossSettings(cliprange=0.2))
    assert out.loss.item() == pytest.approx((-1.2 - 0.5 + 2.0) / 3)
    assert out.clipfrac.item() == pytest.approx(1 / 3)
    assert out.ratio.item() == pytest.approx((1.5 + 0.5 + 1.0) / 3)
    assert out.approx_kl.item() == pytest.approx(0.5 * (math.log(1.5) ** 2 + math.log(0.5) ** 2) / 3)


def test_policy_loss_ratio_one_gives_minus_mean_advantage():
    adv = torch.tensor([[0.5, -1.5, 3.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    out = ht.policy_loss(torch.zeros(1, 3), torch.zeros(1, 3), adv, mask, ht.LossSettings(0.2))
    assert out.loss.item() == pytest.approx(0.5)  # -(0.5 - 1.5)/2
    assert out.clipfrac.item() == 0 and out.ratio.item() == 1


def test_value_loss_clipping_by_hand():
    # old 0, new [1, 0.1], returns [1, 1], clip 0.2
    # token 0: clipped value 0.2 -> max((1-1)^2, (0.2-1)^2) = 0.64 (clipped active)
    # token 1: clipped value 0.1 -> max(0.81, 0.81) = 0.81
    out = ht.value_loss(torch.tensor([[1.0, 0.1]]), torch.zeros(1, 2), torch.ones(1, 2), torch.ones(1, 2), 0.2)
    assert out.loss.item() == pytest.approx(0.5 * (0.64 + 0.81) / 2)
    assert out.clipfrac.item() == pytest.approx(0.5)


def test_adaptive_kl_controller_by_hand():
    ctl = ht.AdaptiveKLController(0.2, target=6.0, horizon=10000)
    ctl.update(current_kl=9.0, n_steps=100)  # error = clip(9/6 - 1) = 0.2 -> x (1 + 0.2*100/10000) = 1.002
    assert ctl.value == pytest.approx(0.2 * 1.002)
    ctl.update(current_kl=5.4, n_steps=1000)  # error = -0.1 -> x 0.99
    assert ctl.value == pytest.approx(0.2 * 1.002 * 0.99)
    fixed = ht.FixedKLController(0.3)
    fixed.update(100.0, 1000)
    assert fixed.value == 0.3


def test_truncate_after_eos_and_missing_eos_penalty():
    eos = 9
    ids = torch.tensor([[5, 9, 7, 9], [1, 2, 3, 4], [9, 9, 9, 9]])
    mask, ended = runtime.truncate_after_eos(ids, eos)
    torch.testing.assert_close(mask, torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]))
    assert ended.tolist() == [True, False, True]
    scores = ht.apply_missing_eos_penalty(torch.tensor([1.0, 1.0, 1.0]), ended, 0.5)
    assert scores.tolist() == [1.0, 0.5, 1.0]
    assert ht.apply_missing_eos_penalty(scores, ended, None) is scores


def test_truncate_after_the_first_of_several_stop_tokens():
    """Every stop token ends a response (stop_token_ids: the tokenizer's EOS and the generation config's), the first wins."""
    ids = torch.tensor([[5, 3, 9, 7], [1, 2, 4, 9], [1, 2, 4, 6]])
    mask, ended = runtime.truncate_after_eos(ids, [9, 3])
    torch.testing.assert_close(mask, torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]]))
    assert ended.tolist() == [True, True, False]


class _Tok:
    eos_token_id = 2


class _GenerationConfig:
    def __init__(self, eos):
        self.eos_token_id = eos


@pytest.mark.parametrize("declared, stops", [(2, [2]), ([106, 1], [2, 106, 1]), ([2, 107], [2, 107]), (None, [2])])
def test_stop_token_ids_are_the_tokenizers_eos_and_the_generation_configs(declared, stops):
    assert runtime.stop_token_ids(_Tok(), _GenerationConfig(declared)) == stops


def test_padding_helpers_and_positions():
    ids, mask = runtime.left_pad([[1, 2, 3], [4]], pad_id=0)
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert runtime.position_ids_from_mask(mask).tolist() == [[0, 1, 2], [0, 0, 0]]
    ids, mask = runtime.right_pad([[1, 2, 3], [4]], pad_id=0)
    assert ids.tolist() == [[1, 2, 3], [4, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]


@pytest.mark.parametrize(
    "n_sft, n_ppo, cs, cp, expected",
    [
        (3, 2, 1, 1, ["sft", "ppo", "sft", "ppo", "sft"]),  # a side whose batches are used drops out
        (4, 1, 2, 1, ["sft", "sft", "ppo", "sft", "sft"]),
        (2, 0, 1, 0, ["sft", "sft"]),  # sft mode
        (0, 3, 0, 1, ["ppo", "ppo", "ppo"]),  # ppo mode
        (3, 3, 0, 2, ["ppo", "ppo", "ppo"]),  # hybrid with CYCLE_SFT_STEPS = 0
    ],
)
def test_epoch_schedule(n_sft, n_ppo, cs, cp, expected):
    assert ht.epoch_schedule(n_sft, n_ppo, cs, cp) == expected


def test_batches_keep_short_last_batch_and_are_deterministic():
    b = ht.batches(10, 4, seed=1, epoch=0, side="ppo", shuffle=True)
    assert [len(x) for x in b] == [4, 4, 2] and sorted(sum(b, [])) == list(range(10))
    assert b == ht.batches(10, 4, seed=1, epoch=0, side="ppo", shuffle=True)
    assert b != ht.batches(10, 4, seed=1, epoch=1, side="ppo", shuffle=True)
    assert ht.batches(5, 2, 0, 0, "sft", shuffle=False) == [[0, 1], [2, 3], [4]]


def test_trim_padding_drops_only_all_padding_columns():
    # two rows: prompts of 2 and 1 tokens left-padded to 3; responses of 1 and 2 tokens right-padded to 4
    ids = torch.tensor([[0, 5, 6, 7, 0, 0, 0], [0, 0, 8, 9, 9, 0, 0]])
    attn = torch.tensor([[0, 1, 1, 1, 0, 0, 0], [0, 0, 1, 1, 1, 0, 0]])
    r_mask = torch.tensor([[1.0, 0, 0, 0], [1.0, 1, 0, 0]])
    per_token = torch.arange(8.0).reshape(2, 4)
    batch = ht.UpdateBatch(ids, attn, r_mask.long(), r_mask, r_mask, *[per_token] * 6)
    out, n_response = ht.trim_padding(batch, 4)
    assert n_response == 2
    assert out.input_ids.tolist() == [[5, 6, 7, 0], [0, 8, 9, 9]]  # first column and last two were padding everywhere
    assert out.attention_mask.tolist() == [[1, 1, 1, 0], [0, 1, 1, 1]]
    assert out.r_mask.tolist() == [[1.0, 0.0], [1.0, 1.0]] and out.advantages.tolist() == [[0.0, 1.0], [4.0, 5.0]]


def test_weight_first_linear_is_f_linear_and_is_undone_after_its_block():
    """weight_first_linear (hf decoding's linear layers on a CPU where the probe prefers it): F.linear's values within
    float32 rounding for a few rows (2-D, 3-D, none, with and without bias); F.linear itself with grad or more than
    WEIGHT_FIRST_ROWS rows. weight_first_linears swaps only fp32 nn.Linear forwards, and puts them back on an error."""
    torch.manual_seed(0)
    for bias in (True, False):
        layer = torch.nn.Linear(16, 40, bias=bias)
        for shape in ((3, 16), (2, 1, 16), (0, 16), (runtime.WEIGHT_FIRST_ROWS, 16)):
            x = torch.randn(shape)
            with torch.no_grad():
                ours = runtime.weight_first_linear(layer, x)
            assert ours.shape == shape[:-1] + (40,) and ours.is_contiguous()
            torch.testing.assert_close(ours, F.linear(x, layer.weight, layer.bias), atol=1e-5, rtol=1e-5)
        many = torch.randn(runtime.WEIGHT_FIRST_ROWS + 1, 16)
        with torch.no_grad():
            assert torch.equal(runtime.weight_first_linear(layer, many), F.linear(many, layer.weight, layer.bias))
        x = torch.randn(3, 16)
        out = runtime.weight_first_linear(layer, x)  # with grad: F.linear, its graph intact
        assert torch.equal(out, F.linear(x, layer.weight, layer.bias)) and out.requires_grad
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2).to(torch.bfloat16))
    with runtime.weight_first_linears(model):
        assert isinstance(vars(model[0]).get("forward"), functools.partial) and "forward" not in vars(model[2])
    with pytest.raises(RuntimeError), runtime.weight_first_linears(model):
        raise RuntimeError("inside")
    with runtime.weight_first_linears(model, on=False):
        assert "forward" not in vars(model[0])
    assert all("forward" not in vars(m) for m in model)


def test_nucleus_filter_keeps_the_tokens_transformers_top_p_keeps():
    """NucleusFilter (hf generation's TOP_P) against transformers' TopPLogitsWarper, by hand and on random rows: peaked
    ones (the top 64 hold top_p), flat ones (k doubles up to the whole vocabulary), rows with -inf bans (no-repeat
    n-grams), nearly one-hot ones (scale 30: one token holds almost all the mass)."""
    from transformers.generation.logits_process import TopPLogitsWarper

    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    kept = runtime.NucleusFilter(0.75)(None, probs.log()).isfinite()
    assert kept.tolist() == [[False, True, False, True]]  # 0.5, then 0.3 (0.5 before it < 0.75); 0.15 has 0.8 before it
    g = torch.Generator().manual_seed(0)
    for vocab, scale in ((49152, 4.0), (49152, 1.0), (300, 0.1), (1000, 30.0)):
        scores = torch.randn(16, vocab, generator=g) * scale
        scores[::3, ::7] = -float("inf")
        for top_p in (0.1, 0.5, 0.9, 0.99):
            ours = runtime.NucleusFilter(top_p)(None, scores)
            theirs = TopPLogitsWarper(top_p)(None, scores)
            assert torch.equal(ours[ours.isfinite()], scores[ours.isfinite()])
            # the same tokens, but for one at the threshold within float32 rounding (the warper sums a long tail in
            # float32): its mass up from the least probable, in float64, is 1 - top_p within 1e-5
            rows, cols = (ours.isfinite() != theirs.isfinite()).nonzero(as_tuple=True)
            assert len(rows.unique()) == len(rows) <= 1, (vocab, scale, top_p, rows.tolist())
            for r, c in zip(rows.tolist(), cols.tolist()):
                p = scores[r].softmax(-1).double()
                assert abs(p[p <= p[c]].sum().item() - (1 - top_p)) < 1e-5
