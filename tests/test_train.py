"""Tier 3: end-to-end runs of tiny configs. They show the trainer learns, saves, protects and resumes."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import EXACT_PPO, HYBRID_RESUME, ROOT, YesFraction, comparable, max_diff, metrics, run_cli, sigkill_at_checkpoint, trainer_for

import hybrid_trainer as ht
import outputs
import runtime


@pytest.mark.parametrize("mode", ["sft", "ppo", "hybrid"])
def test_each_mode_end_to_end_through_cli(mode, tiny_model, tiny_data, tmp_path):
    out = tmp_path / "out"
    cfg = {
        "MODE": mode,
        "MODEL": str(tiny_model),
        "TRAIN_FILE": str(tiny_data),
        "OUTPUT_DIR": str(out),
        "SEED": 0,
        "SFT_BATCH": 4,
        "PPO_BATCH": 4,
        "PPO_MINI": 2,
        "MAX_NEW_TOKENS": 6,
        "LOG_EVERY": 1,
        "REWARD": {"type": "contains", "pattern": "yes"},
    }
    proc = run_cli(cfg, tmp_path)
    records = metrics(out)
    expected = {"sft": ["sft"] * 2, "ppo": ["ppo"] * 2, "hybrid": ["sft", "ppo", "sft", "ppo"]}[mode]
    assert [r["phase"] for r in records] == expected
    assert "step 1 [" in proc.stdout + proc.stderr  # LOG_EVERY summary line
    assert re.search(
        r"start-up: [\d.]+ s \(interpreter and imports [\d.]+ s, checks and plan [\d.]+ s, model [\d.]+ s, data and rewards "
        r"[\d.]+ s, trainer [\d.]+ s\)",
        proc.stdout,
    ), proc.stdout  # where the seconds outside the steps go
    assert re.search(r"finish: final model [\d.]+ s", proc.stdout), proc.stdout
    for r in records:
        if r["phase"] == "ppo":
            for key in (
                "reward/mean",
                "reward/std",
                "objective/kl",
                "objective/kl_coef",
                "ppo/policy/entropy",
                "ppo/loss/policy",
                "ppo/loss/value",
                "ppo/policy/clipfrac",
                "ppo/policy/approxkl",
                "ppo/response_length",
                "time/tokens_per_s",
            ):
                assert key in r and r[key] == r[key], key  # present and not NaN
    from transformers import AutoModelForCausalLM, AutoTokenizer

    lm = AutoModelForCausalLM.from_pretrained(out / "inference_lm")
    AutoTokenizer.from_pretrained(out / "inference_lm")
    assert not any(n.startswith("v_head") for n, _ in lm.named_parameters())
    assert (out / "ppo_full" / "value_head.safetensors").is_file() == (mode != "sft")  # saved when it was trained
    assert (out / "ppo_full" / "model.safetensors").is_file()
    assert os.path.samefile(out / "ppo_full" / "model.safetensors", out / "inference_lm" / "model.safetensors")  # one copy
    assert json.loads((out / "ppo_full" / "trainer_config.json").read_text())["MODE"] == mode


def test_the_final_save_runs_without_the_optimizers_state(tiny_model, tiny_data, tmp_path, monkeypatch):
    """finish() releases AdamW's moments and the gradients (Optimizers.release) and gives the freed heap back
    (return_freed_memory) before the final save, which needs neither; the trained weights are what is saved, and a
    released optimizer still steps (fresh moments)."""
    seen, save_final = {}, outputs.save_final

    def spy(out_dir, trainer, cfg, card=""):
        seen["states"] = [len(o.state) for o in (trainer.optim.sft, trainer.optim.ppo)]
        seen["grads"] = [p.grad for p in trainer.optim.params if p.grad is not None]
        seen["weights"] = {k: v.detach().clone() for k, v in trainer.policy.lm.state_dict().items()}
        return save_final(out_dir, trainer, cfg, card)

    monkeypatch.setattr(outputs, "save_final", spy)
    cfg = {
        "MODE": "hybrid",
        "MODEL": str(tiny_model),
        "TRAIN_FILE": str(tiny_data),
        "OUTPUT_DIR": str(tmp_path / "out"),
        "SEED": 0,
        "SFT_BATCH": 4,
        "PPO_BATCH": 4,
        "PPO_MINI": 2,
        "MAX_NEW_TOKENS": 4,
        "REWARD": {"type": "contains", "pattern": "yes"},
    }
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    assert ht.main([str(tmp_path / "c.json")]) == 0
    assert seen["states"] == [0, 0] and seen["grads"] == []
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "out" / "inference_lm" / "model.safetensors"))
    assert all(torch.equal(saved[k], seen["weights"][k]) for k in saved)
    assert runtime.return_freed_memory()  # glibc (Linux CI): malloc_trim ran

    trainer, examples = trainer_for({"PPO_BATCH": 4, "PPO_MINI": 4, "MAX_NEW_TOKENS": 4}, tiny_model, tiny_data, YesFraction())
    trainer.ppo_update(examples[:4])
    trainer.optim.release()
    assert not trainer.optim.ppo.state and all(p.grad is None for p in trainer.optim.params)
    trainer.ppo_update(examples[:4])  # steps again, from fresh moments
    assert len(trainer.optim.ppo.state) == len(trainer.optim.params)


def test_sft_loss_falls_on_memorisation_set(tiny_model, tmp_path):
    data = tmp_path / "mem.json"
    data.write_text(json.dumps([{"instruction": f"capital {c}", "output": f"the capital is {c}"} for c in ("paris", "rome")]))
    out = tmp_path / "out"
    run_cli(
        {
            "MODE": "sft",
            "MODEL": str(tiny_model),
            "TRAIN_FILE": str(data),
            "OUTPUT_DIR": str(out),
            "SEED": 0,
            "SFT_BATCH": 2,
            "LR_SFT": 3e-3,
            "EPOCHS": 30,
        },
        tmp_path,
    )
    losses = [r["sft/loss"] for r in metrics(out)]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.25 * sum(losses[:5]) / 5, losses


def test_ppo_raises_mean_reward_on_tiny_task(tiny_model, tiny_data):
    trainer, examples = trainer_for(
        {"PPO_BATCH": 16, "PPO_MINI": 8, "LR_PPO": 3e-3, "INIT_KL_COEF": 0.01, "MAX_NEW_TOKENS": 6}, tiny_model, tiny_data, YesFraction()
    )
    batch = (examples * 2)[:16]
    rewards = [trainer.ppo_update(batch)["reward/mean"] for _ in range(25)]
    assert sum(rewards[:3]) / 3 < 0.2, rewards
    assert sum(rewards[-3:]) / 3 > 0.6, rewards


def test_ratio_is_one_on_first_minibatch_and_value_head_starts_at_zero(tiny_model, tiny_data):
    trainer, examples = trainer_for(
        {"PPO_BATCH": 8, "PPO_MINI": 4, "LR_PPO": 1e-3, "MAX_NEW_TOKENS": 5}, tiny_model, tiny_data, YesFraction()
    )
    responses, _ = trainer.generate([e.prompt_ids for e in examples])
    stats = trainer.ppo_step([e.prompt_ids for e in examples], responses, [1.0] * 8)
    assert stats["ppo/val/mean"] == 0.0  # zero-initialised value head
    assert abs(stats["ppo/policy/ratio_first_minibatch"] - 1.0) < 1e-6
    assert stats["ppo/skipped_minibatches"] == 0


def test_ratio_threshold_skips_minibatches(tiny_model, tiny_data):
    # every minibatch has ratio ~1 > 0.5: all skipped, weights unchanged
    trainer, examples = trainer_for(
        {"PPO_BATCH": 8, "PPO_MINI": 4, "MAX_NEW_TOKENS": 5, "RATIO_THRESHOLD": 0.5}, tiny_model, tiny_data, YesFraction()
    )
    before = [p.detach().clone() for p in trainer.policy.parameters()]
    responses, _ = trainer.generate([e.prompt_ids for e in examples])
    stats = trainer.ppo_step([e.prompt_ids for e in examples], responses, [1.0] * 8)
    assert stats["ppo/skipped_minibatches"] == 2 * trainer.cfg.PPO_EPOCHS
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.policy.parameters()))


def test_sft_step_leaves_value_head_alone_and_masks_prompt(tiny_model, tiny_data):
    trainer, examples = trainer_for({"SFT_BATCH": 4, "LR_SFT": 1e-2}, tiny_model, tiny_data, None)
    v_before = trainer.policy.v_head.weight.detach().clone()
    stats = trainer.sft_step(examples[:4])
    assert torch.equal(v_before, trainer.policy.v_head.weight)
    assert stats["sft/tokens"] == sum(len(e.target_ids) for e in examples[:4])  # response + EOS only


def test_grad_accum_gives_same_update(tiny_model, tiny_data):
    results = []
    for accum in (1, 2):
        trainer, examples = trainer_for({"SFT_BATCH": 4, "GRAD_ACCUM": accum, "LR_SFT": 1e-3}, tiny_model, tiny_data, None)
        loss = trainer.sft_step(examples[:4])["sft/loss"]
        results.append((loss, [p.detach().clone() for p in trainer.policy.lm.parameters()]))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-5)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_short_last_ppo_batch_is_used(tiny_model, tiny_data, tmp_path):
    out = tmp_path / "out"
    run_cli(
        {
            "MODE": "ppo",
            "MODEL": str(tiny_model),
            "TRAIN_FILE": str(tiny_data),
            "OUTPUT_DIR": str(out),
            "SEED": 0,
            "PPO_BATCH": 3,
            "PPO_MINI": 2,
            "MAX_NEW_TOKENS": 4,
            "REWARD": {"type": "contains", "pattern": "yes"},
        },
        tmp_path,
    )
    assert len(metrics(out)) == 3  # 8 items -> batches of 3, 3, 2


def test_finished_output_is_never_overwritten(tiny_model, tiny_data, tmp_path):
    out = tmp_path / "out"
    cfg = {"MODE": "sft", "MODEL": str(tiny_model), "TRAIN_FILE": str(tiny_data), "OUTPUT_DIR": str(out), "SEED": 0}
    run_cli(cfg, tmp_path)
    first = (out / "inference_lm" / "model.safetensors").read_bytes()
    proc = run_cli({**cfg, "LR_SFT": 1e-2}, tmp_path)
    assert "already holds a finished model" in proc.stderr
    assert (out / "inference_lm" / "model.safetensors").read_bytes() == first
    assert (out / "run-2" / "inference_lm" / "model.safetensors").is_file()


def test_sketch_presets_run_unchanged_with_local_model(tiny_model, tiny_data, tmp_path):
    """The design sketch's three presets, verbatim but for local paths (MODEL and perplexity's model)."""
    presets = {
        "sft": {
            "MODE": "sft",
            "MODEL": "gpt2",
            "TRAIN_FILE": "train.json",
            "OUTPUT_DIR": "./out_sft",
            "SFT_BATCH": 8,
            "LR_SFT": 5e-5,
            "EPOCHS": 1,
            "MAXSEQ": 1024,
        },
        "ppo": {
            "MODE": "ppo",
            "MODEL": "gpt2",
            "TRAIN_FILE": "train.json",
            "OUTPUT_DIR": "./out_ppo",
            "PPO_BATCH": 4,
            "PPO_MINI": 4,
            "LR_PPO": 1e-5,
            "TARGET_KL": 0.3,
            "EPOCHS": 1,
            "MAXSEQ": 1024,
            "MAX_NEW_TOKENS": 128,
            "REWARD": {"type": "cosine_sts"},
        },
        "hybrid": {
            "MODE": "hybrid",
            "MODEL": "gpt2",
            "TRAIN_FILE": "train.json",
            "OUTPUT_DIR": "./out_hybrid",
            "SFT_BATCH": 8,
            "LR_SFT": 5e-5,
            "PPO_BATCH": 4,
            "PPO_MINI": 4,
            "LR_PPO": 1e-5,
            "TARGET_KL": 0.3,
            "CYCLE_SFT_STEPS": 1,
            "CYCLE_PPO_UPDATES": 1,
            "EPOCHS": 1,
            "MAXSEQ": 1024,
            "MAX_NEW_TOKENS": 128,
            "REWARD": {
                "type": "weighted_sum",
                "components": [{"type": "cosine_sts", "weight": 0.6}, {"type": "perplexity", "model": "gpt2", "weight": 0.4}],
                "postprocess": [{"type": "clip", "min": 0, "max": 1}],
            },
        },
    }
    for name, preset in presets.items():
        text = json.dumps(preset).replace('"gpt2"', json.dumps(str(tiny_model)))
        cfg = {**json.loads(text), "TRAIN_FILE": str(tiny_data), "OUTPUT_DIR": str(tmp_path / name)}
        run_cli(cfg, tmp_path)
        assert (tmp_path / name / "inference_lm").is_dir(), name


def test_resume_after_sigkill_matches_uninterrupted_run(tiny_model, tiny_data, tmp_path):
    base = {**HYBRID_RESUME, "MODEL": str(tiny_model), "TRAIN_FILE": str(tiny_data)}
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run_cli({**base, "OUTPUT_DIR": str(straight)}, tmp_path)
    total = len(metrics(straight))
    # kill -9 the second run as soon as it has written a mid-run checkpoint
    path = tmp_path / "killed.json"
    path.write_text(json.dumps({**base, "OUTPUT_DIR": str(killed)}))
    sigkill_at_checkpoint([sys.executable, ROOT / "hybrid_trainer.py", path], killed, 5, dict(os.environ), timeout=120)
    assert not (killed / "inference_lm").exists(), "the run finished before it could be killed"
    resumed = run_cli({**base, "OUTPUT_DIR": str(killed)}, tmp_path)
    assert "resuming from" in resumed.stdout
    assert comparable(metrics(killed)) == comparable(metrics(straight))
    assert len(metrics(killed)) == total
    assert max_diff(straight / "inference_lm" / "model.safetensors", killed / "inference_lm" / "model.safetensors") <= 1e-6


def test_sigterm_checkpoints_and_exits_143(tiny_model, tiny_data, tmp_path):
    out = tmp_path / "out"
    path = tmp_path / "c.json"
    path.write_text(
        json.dumps(
            {**HYBRID_RESUME, "SAVE_EVERY": 0, "EPOCHS": 50, "MODEL": str(tiny_model), "TRAIN_FILE": str(tiny_data), "OUTPUT_DIR": str(out)}
        )
    )
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "hybrid_trainer.py"), str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.time() + 120
    log = out / "metrics.jsonl"
    while time.time() < deadline and not (log.exists() and log.read_text().count("\n") >= 2):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "resume:" in err
    step = len(metrics(out))
    assert (out / "checkpoints" / f"step-{step}" / "state.json").is_file()


def test_checkpoints_are_pruned(tiny_model, tiny_data, tmp_path):
    out = tmp_path / "out"
    run_cli(
        {
            "MODE": "sft",
            "MODEL": str(tiny_model),
            "TRAIN_FILE": str(tiny_data),
            "OUTPUT_DIR": str(out),
            "SEED": 0,
            "SFT_BATCH": 2,
            "SAVE_EVERY": 1,
            "KEEP_CHECKPOINTS": 2,
            "KEEP_CHECKPOINTS_AT_END": True,
        },
        tmp_path,
    )
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-3", "step-4"]


def test_linear_lr_schedule_with_warmup(tiny_model, tiny_data, tmp_path):
    out = tmp_path / "out"
    run_cli(
        {
            "MODE": "sft",
            "MODEL": str(tiny_model),
            "TRAIN_FILE": str(tiny_data),
            "OUTPUT_DIR": str(out),
            "SEED": 0,
            "SFT_BATCH": 2,
            "EPOCHS": 2,
            "LR_SFT": 1e-3,
            "LR_SCHEDULE": "linear",
            "WARMUP_STEPS": 2,
        },
        tmp_path,
    )
    # 8 optimizer steps, 2 of warm-up: lr = 1e-3 * [0, 1/2, then (8 - s) / 6 for s = 2..7]
    expected = [0.0, 0.5e-3] + [1e-3 * (8 - s) / 6 for s in range(2, 8)]
    assert [r["sft/lr"] for r in metrics(out)] == pytest.approx(expected)


@pytest.mark.parametrize("ref_update", ["never", "cycle"])
def test_reference_update_per_cycle(ref_update, tiny_model, tiny_data, tmp_path):
    out = tmp_path / "out"
    run_cli(
        {
            "MODE": "hybrid",
            "MODEL": str(tiny_model),
            "TRAIN_FILE": str(tiny_data),
            "OUTPUT_DIR": str(out),
            "SEED": 0,
            "SFT_BATCH": 4,
            "PPO_BATCH": 4,
            "LR_SFT": 1e-2,
            "MAX_NEW_TOKENS": 4,
            "REF_UPDATE": ref_update,
            "BF16": False,
            "REWARD": {"type": "contains", "pattern": "yes"},
            **EXACT_PPO,
        },
        tmp_path,
    )
    kls = [abs(r["objective/kl"]) for r in metrics(out) if r["phase"] == "ppo"]  # each right after an SFT step
    if ref_update == "cycle":
        assert max(kls) < 1e-5, kls  # reference = policy at the start of each PPO phase
    else:
        assert min(kls) > 1e-3, kls  # SFT moved the policy away from the frozen initial reference


def test_unfinished_run_without_checkpoint_is_kept(tiny_model, tiny_data, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1, "phase": "sft", "sft/loss": 9.9}\n')  # crashed before a checkpoint
    proc = run_cli({"MODE": "sft", "MODEL": str(tiny_model), "TRAIN_FILE": str(tiny_data), "OUTPUT_DIR": str(out), "SEED": 0}, tmp_path)
    assert "files of an earlier run" in proc.stderr
    assert (out / "metrics.jsonl").read_text() == '{"step": 1, "phase": "sft", "sft/loss": 9.9}\n'
    assert (out / "run-2" / "inference_lm").is_dir()


def test_decaying_schedule_needs_run_length(tiny_model, tiny_data):
    with pytest.raises(ValueError, match="pass n_items"):
        trainer_for({"LR_SCHEDULE": "linear"}, tiny_model, tiny_data, None)


def test_gradient_checkpointing_gives_same_update(tiny_model, tiny_data):
    results = []
    for checkpointing in (False, True):
        trainer, examples = trainer_for(
            {"SFT_BATCH": 4, "LR_SFT": 1e-3, "GRADIENT_CHECKPOINTING": checkpointing}, tiny_model, tiny_data, None
        )
        assert any(getattr(m, "gradient_checkpointing", False) for m in trainer.policy.lm.modules()) == checkpointing
        loss = trainer.sft_step(examples[:4])["sft/loss"]
        results.append((loss, [p.detach().clone() for p in trainer.policy.lm.parameters()]))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-6)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_ppo_full_continues_rl_with_its_value_head_and_is_not_a_second_copy(tiny_model, tiny_data, tmp_path):
    from safetensors.torch import load_file

    first = tmp_path / "first"
    proc = run_cli(
        {
            "MODE": "ppo",
            "MODEL": str(tiny_model),
            "TRAIN_FILE": str(tiny_data),
            "OUTPUT_DIR": str(first),
            "SEED": 0,
            "PPO_BATCH": 4,
            "MAX_NEW_TOKENS": 4,
            "LR_PPO": 1e-2,
            "REWARD": {"type": "contains", "pattern": "yes"},
        },
        tmp_path,
    )
    weights = first / "inference_lm" / "model.safetensors"
    assert weights.stat().st_nlink == 2 or (first / "ppo_full" / "model.safetensors").is_symlink()
    assert f"holds {weights.stat().st_size / 1e6:.3g} MB" not in proc.stdout  # not twice the model
    cfg = ht.Config.from_dict({"MODE": "ppo", "MODEL": str(first / "ppo_full"), "TRAIN_FILE": str(tiny_data), "OUTPUT_DIR": "-"})
    policy, _, _ = ht.load_model(cfg, torch.device("cpu"))
    saved = load_file(str(first / "ppo_full" / "value_head.safetensors"))
    assert saved["weight"].abs().sum() > 0  # trained
    assert torch.equal(policy.v_head.weight.detach(), saved["weight"]) and torch.equal(policy.v_head.bias.detach(), saved["bias"])
    lm = load_file(str(weights))
    assert all(torch.equal(p.detach(), lm[n]) for n, p in policy.lm.named_parameters() if n in lm)
    second = tmp_path / "second"  # and RL goes on from there
    run_cli(
        {
            "MODE": "ppo",
            "MODEL": str(first / "ppo_full"),
            "TRAIN_FILE": str(tiny_data),
            "OUTPUT_DIR": str(second),
            "SEED": 1,
            "PPO_BATCH": 4,
            "MAX_NEW_TOKENS": 4,
            "REWARD": {"type": "contains", "pattern": "yes"},
        },
        tmp_path,
    )
    assert metrics(second)[0]["ppo/val/mean"] != 0.0  # the critic starts trained, not at zero


def test_stateful_reward_with_missing_eos_penalty_and_a_greedy_baseline(tiny_model, tiny_data, tmp_path):
    """A running-normalised reward scores the sampled batch first (so its first batch is normalised by its own
    statistics: mean 0), then remax's greedy pass; the EOS penalty follows the scores."""
    out = tmp_path / "out"
    run_cli(
        {
            "MODE": "ppo",
            "MODEL": str(tiny_model),
            "TRAIN_FILE": str(tiny_data),
            "OUTPUT_DIR": str(out),
            "SEED": 0,
            "ADVANTAGE": "remax",
            "PPO_BATCH": 4,
            "MAX_NEW_TOKENS": 3,
            "MISSING_EOS_PENALTY": 0.5,
            **EXACT_PPO,
            "REWARD": {"type": "chrf", "postprocess": [{"type": "normalize"}]},
        },
        tmp_path,
    )
    records = metrics(out)
    assert len(records) == 2 and all(r["reward/mean"] == r["reward/mean"] for r in records)
    assert records[0]["ppo/ended_with_eos"] < 1  # some responses were cut, and penalised
    assert records[0]["reward/std"] > 0.5  # normalised, not all equal
    assert records[0]["reward/mean"] == pytest.approx(-0.5 * (1 - records[0]["ppo/ended_with_eos"]), abs=1e-5)
