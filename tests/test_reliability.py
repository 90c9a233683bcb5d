"""Non-finite steps are skipped and counted; too many in a row stop the run; long prompts are skipped."""

import json
import math

import pytest
import torch

import hybrid_trainer as ht
import outputs
import runtime


class FlakyReward:
    """Scores NaN on calls listed in `bad_calls`, else 1.0."""

    def __init__(self, bad_calls):
        self.bad_calls, self.calls = set(bad_calls), 0

    def scores(self, responses, targets, prompts=None, items=None, update=True):
        self.calls += 1
        return [math.nan if self.calls in self.bad_calls else 1.0 for _ in responses]

    def state_dict(self):
        return {}


def ppo_cfg(tiny_model, tiny_data, out, **kw):
    return ht.Config.from_dict(
        {
            "MODE": "ppo",
            "MODEL": str(tiny_model),
            "TRAIN_FILE": str(tiny_data),
            "OUTPUT_DIR": str(out),
            "SEED": 0,
            "PPO_BATCH": 2,
            "MAX_NEW_TOKENS": 3,
            **kw,
        }
    )


def test_nan_reward_skips_update_and_is_counted(tiny_model, tiny_data, tmp_path, capsys):
    out = tmp_path / "out"
    assert ht.run(ppo_cfg(tiny_model, tiny_data, out), reward=FlakyReward({2})) == 0
    records = outputs.MetricsLog(out / "metrics.jsonl").read()
    assert [r.get("ppo/skipped", 0) for r in records] == [0, 1, 0, 0]
    assert records[-1]["skipped_total"] == 1
    assert "reward returned nan for item" in records[1]["skipped_reason"]
    assert "step 2 (ppo) skipped" in capsys.readouterr().err


def test_consecutive_bad_steps_stop_the_run_keeping_last_checkpoint(tiny_model, tiny_data, tmp_path, capsys):
    out = tmp_path / "out"
    cfg = ppo_cfg(tiny_model, tiny_data, out, MAX_BAD_STEPS=2, SAVE_EVERY=1)
    with pytest.raises(runtime.UserError, match="2 consecutive steps were skipped") as err:
        ht.run(cfg, reward=FlakyReward({2, 3}))
    assert str(out / "checkpoints" / "step-1") in str(err.value)  # written after the last good step
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-1"]  # none after a skipped step
    assert not (out / "inference_lm").exists()


def test_raising_reward_is_reported_with_response(tiny_model, tiny_data):
    class Broken:
        def scores(self, *a, **k):
            raise RuntimeError("scorer crashed")

    cfg = ppo_cfg(tiny_model, tiny_data, "-")
    policy, ref, tok = ht.load_model(cfg, torch.device("cpu"))
    trainer = ht.HybridTrainer(cfg, policy, ref, tok, Broken())
    ex = ht.tokenize_examples(ht.load_examples(cfg), cfg, tok, "sketch", "TRAIN_FILE")
    with pytest.raises(ht.BadStep, match="reward raised RuntimeError: scorer crashed .first response"):
        trainer.ppo_update(ex[:2])


def test_nan_loss_skips_sft_step_without_touching_weights(tiny_model, tiny_data):
    cfg = ppo_cfg(tiny_model, tiny_data, "-", MODE="sft")
    policy, ref, tok = ht.load_model(cfg, torch.device("cpu"))
    trainer = ht.HybridTrainer(cfg, policy, ref, tok, None)
    ex = ht.tokenize_examples(ht.load_examples(cfg), cfg, tok, "sketch", "TRAIN_FILE")
    with torch.no_grad():
        policy.lm.get_output_embeddings().weight[0, 0] = math.inf
    before = [p.detach().clone() for p in policy.lm.parameters()]
    with pytest.raises(ht.BadStep, match="SFT loss is nan"):
        trainer.sft_step(ex[:2])
    assert all(torch.equal(a, b) or torch.isinf(a).any() for a, b in zip(before, policy.lm.parameters()))


def test_prompts_too_long_for_maxseq_are_skipped_with_one_warning(tiny_model, tmp_path, capsys):
    items = [{"instruction": "yes " * (60 if i in (1, 3) else 1), "output": "yes " * 20} for i in range(5)]
    data = tmp_path / "d.json"
    data.write_text(json.dumps(items))
    cfg = ht.Config.from_dict(
        {"MODE": "sft", "MODEL": str(tiny_model), "TRAIN_FILE": str(data), "OUTPUT_DIR": "-", "MAXSEQ": 45, "SHUFFLE": False}
    )
    _, _, tok = ht.load_model(cfg, torch.device("cpu"))
    kept = ht.tokenize_examples(ht.load_examples(cfg), cfg, tok, "sketch", "TRAIN_FILE")
    assert [e.index for e in kept] == [0, 2, 4]
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "skipped 2 item(s)" in err and "[1, 3]" in err
    for e in kept:  # long responses are truncated to the room left, not dropped
        assert len(e.prompt_ids) + len(e.target_ids) == 45


def test_maxseq_beyond_model_context_is_clamped(tiny_model, capsys):
    cfg = ht.Config.from_dict({"MODEL": str(tiny_model), "TRAIN_FILE": "-", "OUTPUT_DIR": "-", "MAXSEQ": 5000})
    policy, _, _ = ht.load_model(cfg, torch.device("cpu"))
    assert ht.api_plan(cfg, lm=policy.lm).maxseq == 1024  # the tiny GPT-2's n_positions
    assert "MAXSEQ=5000 exceeds the context of MODEL (1024 tokens)" in capsys.readouterr().err
