"""Retention (issue: hybrids that do not forget): RETAIN_FILE evaluated and reported, SFT_KL_COEF's term against a
hand-computed value, REPLAY_SHARE's rows (no reward, the reverse KL to the initial model as their advantage) against
hand-computed advantages, the CLI, and the bad inputs."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import ENV, EXACT_PPO, ROOT, comparable, interrupted_copy, max_diff, metrics, ppo_cli_config, run_cli, torchrun, torchrun_cli

import hybrid_trainer as ht


def trainer_for(model, **keys):
    cfg = ht.Config.from_dict(
        {"MODEL": str(model), "TRAIN_FILE": "-", "OUTPUT_DIR": "-", "SEED": 0, "PACKING": False, "LOGITS_CHUNK": 0, **keys}
    )
    torch.manual_seed(0)
    policy, ref, tok = ht.load_model(cfg, torch.device("cpu"))
    with torch.no_grad():  # the policy moves away from the reference (a copy of it at load)
        for p in policy.lm.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return ht.HybridTrainer(cfg, policy, ref, tok), ref, tok


def test_sft_kl_term_by_hand(tiny_model):
    """SFT_KL_COEF: loss = (sum of CE + coef x sum over the targets of sum_v p log(p / q)) / target tokens, p the
    policy's distribution, q the reference's; its value and gradient equal that formula computed row by row."""
    trainer, ref, tok = trainer_for(tiny_model, MODE="sft", SFT_KL_COEF=0.5, SFT_BATCH=2)
    pairs = [
        (tok("say yes")["input_ids"], tok(" yes yes")["input_ids"] + [tok.eos_token_id]),
        (tok("hi")["input_ids"], tok(" ok")["input_ids"]),
    ]
    examples = [ht.Example(index=i, item={}, target="", prompt_ids=p, target_ids=t) for i, (p, t) in enumerate(pairs)]
    params = [p for p in trainer.policy.lm.parameters() if p.requires_grad]
    for p in params:
        p.grad = None
    result = trainer.sft_backward(examples)
    ours = [p.grad.clone() for p in params]
    ce_sum = kl_sum = 0.0
    n = sum(len(t) for _, t in pairs)
    for p, t in pairs:
        ids = torch.tensor([p + t])
        logits = trainer.policy.lm(input_ids=ids).logits[0, len(p) - 1 : -1].float()
        with torch.no_grad():
            q = torch.log_softmax(ref(input_ids=ids).logits[0, len(p) - 1 : -1].float(), -1)
        logp = torch.log_softmax(logits, -1)
        ce_sum = ce_sum + F.cross_entropy(logits, torch.tensor(t), reduction="sum")
        kl_sum = kl_sum + (logp.exp() * (logp - q)).sum()
    expected = (ce_sum + 0.5 * kl_sum) / n
    grads = torch.autograd.grad(expected, params)
    assert result.tokens == n
    assert result.loss == pytest.approx(expected.item(), abs=1e-5)
    assert result.kl == pytest.approx(kl_sum.item() / n, abs=1e-6) and result.kl > 0
    for a, b in zip(ours, grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("advantage", ["grpo", "reinforce_pp"])
def test_replayed_rows_take_the_reverse_kl_to_the_initial_model(tiny_model, advantage):
    """Two groups, the second REPLAY_SHARE's: the task rows' advantages are the estimator's on the task rows alone
    (REINFORCE++ whitens over them only), the replayed rows' -(log pi - log pi_ref) per token, and replay/reverse_kl
    their mean over the replayed tokens."""
    keys = {"ADVANTAGE": advantage, "NUM_GENERATIONS": 2, "PPO_BATCH": 2, "PPO_EPOCHS": 1, "INIT_KL_COEF": 0.0, **EXACT_PPO}
    keys["LOSS_AGG"] = "seq_mean_token_mean"  # the policy loss at ratio 1 is then -(mean over rows of each row's mean advantage)
    trainer, _, tok = trainer_for(tiny_model, MODE="ppo", REPLAY_SHARE=0.5, RETAIN_FILE="-", **keys)
    queries = [tok(q)["input_ids"] for q in ("say yes", "say yes", "capital of France", "capital of France")]
    responses = [tok(r)["input_ids"] + [tok.eos_token_id] for r in ("yes yes", "no", "Paris", "the city")]
    samples = ht.samples_from_tokens(queries, responses, [1.0, 0.0, 0.0, 0.0], None, [tok.eos_token_id])
    samples = samples[:2] + [dataclasses.replace(s, replay=True) for s in samples[2:]]
    rollout = ht.make_rollout(samples, 2, tok.pad_token_id, torch.device("cpu"))
    columns, _, _ = ht.forward_no_grad(trainer.update.parts, trainer.cfg, trainer.plan, ht.rollout_tokens(rollout), rollout.r_ids.shape[1])
    mask = rollout.loss_mask
    task = torch.tensor([1.0, 1.0, 0.0, 0.0])[:, None] * mask
    rewards = ht.compute_rewards(rollout.scores, torch.zeros_like(mask), mask, 0.0)
    expected = ht.ADVANTAGES[advantage].fn(rewards=rewards[:2], mask=task[:2], group_size=2, gamma=1.0)[0]  # the task rows alone
    expected = torch.cat([expected, -(columns.logprobs - columns.ref_logprobs)[2:] * mask[2:]])
    stats = trainer.update.learn(rollout)
    assert stats["replay/responses"] == 2
    replay_kl = ht.masked_mean(columns.logprobs - columns.ref_logprobs, mask - task).item()
    assert stats["replay/reverse_kl"] == pytest.approx(replay_kl, abs=1e-6)
    assert stats["ppo/advantages/mean"] == pytest.approx(ht.masked_mean(expected, mask).item(), abs=1e-6)
    row_means = (expected * mask).sum(1) / mask.sum(1)
    assert stats["ppo/loss/policy"] == pytest.approx(-row_means.mean().item(), abs=1e-5)
    assert stats["reward/zero_std_groups"] == 0.0  # the replayed group (all scored 0) is not a task group


def retain_rows(tmp_path):
    rows = [{"instruction": f"capital {i}", "output": "Paris", "category": "capital"} for i in range(3)]
    rows += [{"instruction": f"add {i}", "output": "yes", "category": "add"} for i in range(2)]
    Path(tmp_path / "retain.json").write_text(json.dumps(rows))
    return str(tmp_path / "retain.json")


def cli_config(tmp_path, model, tiny_data, **keys):
    """ppo_cli_config with RETAIN_FILE's categories and a reward that reads the training rows' own "output" column (a
    replayed row scored by it would be a KeyError)."""
    reward = {"type": "python", "path": "yes_reward.py", "function": "score"}
    extra = {"CATEGORY_FIELD": "category", "RETAIN_FILE": retain_rows(tmp_path), "REWARD": reward, "TRUST_REMOTE_CODE": True}
    return ppo_cli_config(tmp_path, model, tiny_data, **{**extra, **keys})


REWARD = """def score(responses, targets, prompts, items):
    assert all(item["output"] == "yes yes" for item in items), "a replayed row was scored"
    return [float("yes" in r) for r in responses]
"""


@pytest.mark.parametrize(
    "keys",
    [
        {"REPLAY_SHARE": 0.5, "EVAL_EVERY": 2, "SAVE_BEST": "retain/capital"},
        {"REPLAY_SHARE": 0.5, "REPLAY_FILE": "REPLAY"},  # prompts alone, apart from RETAIN_FILE
        {"MODE": "sft", "SFT_KL_COEF": 0.1, "INIT_KL_COEF": 0.0, "SFT_BATCH": 2},
        {"MODE": "hybrid", "HYBRID": "alternate", "SFT_KL_COEF": 0.1, "REPLAY_SHARE": 0.5, "SFT_BATCH": 2, "LORA_R": 4},
    ],
)
def test_cli_retains(tmp_path, tiny_model, tiny_data, keys):
    (tmp_path / "yes_reward.py").write_text(REWARD)
    eval_file = tmp_path / "eval.json"
    eval_file.write_text(json.dumps([{"instruction": "say yes", "output": "yes yes"}] * 2))
    (tmp_path / "replay.jsonl").write_text("".join(json.dumps({"prompt": f"capital {i}"}) + "\n" for i in range(3)))
    keys = {k: str(tmp_path / "replay.jsonl") if v == "REPLAY" else v for k, v in keys.items()}
    cfg = cli_config(tmp_path, tiny_model, tiny_data, EVAL_FILE=str(eval_file), **keys)
    cfg["REWARD"]["path"] = str(tmp_path / "yes_reward.py")
    run_cli(cfg, tmp_path)
    records = metrics(tmp_path / "out")
    evals = [r for r in records if r.get("phase") == "eval"]
    assert len(evals) >= 2
    for r in evals:
        assert {"retain/contains_reference", "retain/capital", "retain/add", "eval/kl_to_reference"} <= set(r), r.keys()
    assert evals[0]["eval/kl_to_reference"] == pytest.approx(0.0, abs=1e-4)  # before training: the policy is the reference
    ppo = [r for r in records if r.get("phase") == "ppo"]
    assert all(r["replay/responses"] == 2 for r in ppo) and (ppo != []) == ("REPLAY_SHARE" in keys)
    sft = [r for r in records if r.get("phase") == "sft"]
    assert all("sft/kl" in r for r in sft) and (sft != []) == ("SFT_KL_COEF" in keys)
    report = (tmp_path / "out" / "report.md").read_text()
    assert "| retain/capital |" in report and "| kl_to_reference |" in report
    if keys.get("SAVE_BEST"):
        assert json.loads((tmp_path / "out" / "best" / "best.json").read_text())["metric"] == "retain/capital"


@pytest.mark.parametrize(
    "keys, message",
    [
        ({"RETAIN_FILE": "/no/such/retain.json"}, "RETAIN_FILE '/no/such/retain.json' does not exist"),
        ({"RETAIN_FILE": "EMPTY"}, "holds no items"),
        ({"RETAIN_FILE": "NOREF"}, "RETAIN_FILE"),
        ({"REPLAY_SHARE": 1.5}, "REPLAY_SHARE must be in [0, 1]"),
        ({"REPLAY_SHARE": 0.5, "RETAIN_FILE": ""}, "REPLAY_SHARE replays RETAIN_FILE's prompts (or REPLAY_FILE's): set one"),
        ({"REPLAY_SHARE": 0.5, "REPLAY_FILE": "/no/such/replay.json"}, "REPLAY_FILE '/no/such/replay.json' does not exist"),
        ({"REPLAY_SHARE": 0.1}, "is 0 replayed prompts per update"),
        ({"REPLAY_SHARE": 0.5, "MODE": "hybrid", "HYBRID": "alternate", "REF_UPDATE": "cycle"}, 'REF_UPDATE "cycle" moves'),
        ({"REPLAY_SHARE": 0.5, "ADVANTAGE": "gae", "NUM_GENERATIONS": 1}, "REPLAY_SHARE does not combine with ADVANTAGE 'gae'"),
        ({"REPLAY_SHARE": 0.5, "MODE": "hybrid", "HYBRID": "gate"}, "REPLAY_SHARE does not combine with HYBRID 'gate'"),
        ({"SFT_KL_COEF": -1.0}, "SFT_KL_COEF must be >= 0"),
    ],
)
def test_bad_retention_input_is_one_error_before_weights(tmp_path, tiny_model, tiny_data, keys, message, capsys):
    (tmp_path / "empty.json").write_text("[]")
    (tmp_path / "noref.json").write_text(json.dumps([{"instruction": "capital of France"}]))
    files = {"EMPTY": str(tmp_path / "empty.json"), "NOREF": str(tmp_path / "noref.json")}
    keys = {k: files.get(v, v) if isinstance(v, str) else v for k, v in keys.items()}
    cfg = cli_config(tmp_path, tiny_model, tiny_data, **keys)
    cfg["REWARD"] = {"type": "contains", "pattern": "yes"}
    path = tmp_path / "c.json"
    path.write_text(json.dumps(cfg))
    assert ht.main([str(path), "--check"]) == 2  # --check: nothing loads weights
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and message in err and "Traceback" not in err, err


def test_check_counts_the_retain_file(tmp_path, tiny_model, tiny_data, capsys):
    cfg = cli_config(tmp_path, tiny_model, tiny_data, REWARD={"type": "contains", "pattern": "yes"})
    path = tmp_path / "c.json"
    path.write_text(json.dumps(cfg))
    assert ht.main([str(path), "--check"]) == 0
    assert "5 RETAIN_FILE items" in capsys.readouterr().out


def test_replay_one_process_equals_two(tiny_model, tmp_path):
    """REPLAY_SHARE's rows on the second process only (rows 6-7 of 8): the estimator over the task rows and the replayed
    rows' KL term do not depend on the process count."""
    helper = ROOT / "tests" / "dist_helper.py"
    extra = {"NUM_GENERATIONS": 2, "ADVANTAGE": "reinforce_pp", "REPLAY_SHARE": 0.25, "RETAIN_FILE": "-", "REPLAY_ROWS": 2}
    extra |= {"MOVED": True, "GRADS": True}  # a policy away from its reference; the gradients each step applies
    args = [helper, "ppo_step", tiny_model, None, "0", json.dumps(extra)]
    one = subprocess.run(
        [sys.executable, *map(str, args[:3]), str(tmp_path / "one.st"), *args[4:]], capture_output=True, text=True, env=ENV
    )
    assert one.returncode == 0, one.stderr[-3000:]
    two = torchrun([*args[:3], tmp_path / "two.st", *args[4:]])
    numbers = [json.loads(next(x for x in p.stdout.splitlines() if x.startswith("numbers "))[8:]) for p in (one, two)]
    assert numbers[0]["replay/reverse_kl"] != 0
    for key, value in numbers[0].items():
        if key != "perf/update_tokens":  # each process's own padding; a gradient's norm sums the processes' in another order
            assert numbers[1][key] == pytest.approx(value, abs=1e-6, rel=1e-5 if key == "ppo/grad_norm" else 1e-6), key
    # the gradients (not Adam's steps, which lift rounding-level differences to a fraction of a step: 7.5e-5 in the
    # weights with the moved policy and no replayed row, 2.5e-4 with them, while every logged number agrees to 1e-6)
    assert max_diff(tmp_path / "one.st", tmp_path / "two.st") <= 1e-6


def test_sft_kl_one_process_equals_two(tiny_model, tiny_data, tmp_path):
    cfg = {"MODE": "sft", "SEED": 0, "SFT_BATCH": 4, "LR_SFT": 1e-3, "BF16": False, "SFT_KL_COEF": 0.5}
    cfg |= {"MODEL": str(tiny_model), "TRAIN_FILE": str(tiny_data), "EPOCHS": 2}
    run_cli({**cfg, "OUTPUT_DIR": str(tmp_path / "one")}, tmp_path)
    torchrun_cli({**cfg, "OUTPUT_DIR": str(tmp_path / "two")}, tmp_path)
    assert max_diff(tmp_path / "one/inference_lm/model.safetensors", tmp_path / "two/inference_lm/model.safetensors") <= 1e-5
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert one[-1]["sft/kl"] > 0
    for key in ("sft/loss", "sft/kl"):
        assert [r[key] for r in one] == pytest.approx([r[key] for r in two], rel=1e-5, abs=1e-7), key


def test_resume_with_replay_is_exact(tmp_path, tiny_model, tiny_data):
    """A run killed after its checkpoint at step 2 and resumed replays the same prompts (the position is in the
    checkpoint) and ends with the same numbers and weights."""
    (tmp_path / "yes_reward.py").write_text(REWARD)
    cfg = cli_config(tmp_path, tiny_model, tiny_data, REPLAY_SHARE=0.5, NUM_SAMPLES=4, SAVE_EVERY=1, KEEP_CHECKPOINTS=10)
    cfg |= {"KEEP_CHECKPOINTS_AT_END": True, "LR_PPO": 1e-3, "BF16": False}
    cfg["REWARD"]["path"] = str(tmp_path / "yes_reward.py")
    run_cli(cfg, tmp_path)
    straight = tmp_path / "out"
    killed = interrupted_copy(straight, tmp_path / "killed", 2)
    assert "resuming from" in run_cli({**cfg, "OUTPUT_DIR": str(killed)}, tmp_path).stdout
    assert comparable(metrics(killed)) == comparable(metrics(straight))
    assert max_diff(straight / "inference_lm/model.safetensors", killed / "inference_lm/model.safetensors") <= 1e-6
