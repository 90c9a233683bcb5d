"""Multi-process runs under torchrun (CPU, gloo, 2 processes, one thread each): 1 process = 2 processes,
FSDP = DDP, one set of outputs, exact resume, and an error on one process ends all of them."""

import json
import subprocess
import sys
import time

import pytest
from conftest import ENV, HYBRID_RESUME, ROOT, comparable, max_diff, metrics, run_cli, sigkill_at_checkpoint, torchrun, torchrun_cli

SFT = {"MODE": "sft", "SEED": 0, "SFT_BATCH": 4, "EPOCHS": 2, "LR_SFT": 1e-3, "BF16": False}  # fp32: an equality test


def test_sft_one_process_equals_two(tiny_model, tiny_data, tmp_path):
    cfg = {**SFT, "MODEL": str(tiny_model), "TRAIN_FILE": str(tiny_data)}
    run_cli({**cfg, "OUTPUT_DIR": str(tmp_path / "one")}, tmp_path)
    torchrun_cli({**cfg, "OUTPUT_DIR": str(tmp_path / "two")}, tmp_path)
    assert max_diff(tmp_path / "one/inference_lm/model.safetensors", tmp_path / "two/inference_lm/model.safetensors") <= 1e-5
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert [r["sft/tokens"] for r in one] == [r["sft/tokens"] for r in two]  # global token counts
    assert [r["sft/loss"] for r in one] == pytest.approx([r["sft/loss"] for r in two], rel=1e-5)


@pytest.mark.parametrize("lora_r", ["0", "4"])
def test_ppo_step_two_halves_equal_whole_batch(lora_r, tiny_model, tmp_path):
    helper = ROOT / "tests" / "dist_helper.py"
    one = subprocess.run(
        [sys.executable, str(helper), "ppo_step", str(tiny_model), str(tmp_path / "one.st"), lora_r],
        capture_output=True,
        text=True,
        env=ENV,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    two = torchrun([helper, "ppo_step", tiny_model, tmp_path / "two.st", lora_r])
    assert max_diff(tmp_path / "one.st", tmp_path / "two.st") <= 1e-5
    assert one.stdout.splitlines()[-1] == two.stdout.splitlines()[-1] == "stats kl=0.000000 ratio=1.000000"


@pytest.mark.parametrize(
    "lora_r, extra",
    [
        ("0", {"MODE": "hybrid", "HYBRID": "gate", "ADVANTAGE": "grpo", "NUM_GENERATIONS": 2, "GATE_THRESHOLD": 0.5}),
        (
            "4",
            {
                "MODE": "hybrid",
                "HYBRID": "mix",
                "ADVANTAGE": "rloo",
                "NUM_GENERATIONS": 2,
                "SFT_LOSS": "dft",
                "SFT_TOKEN_WEIGHT": "phi",
                "KL_IN": "loss",
                "KL_PENALTY": "k3",
                "LOSS_AGG": "seq_mean_token_mean",
            },
        ),
    ],
)
def test_group_estimators_and_hybrid_strategies_two_halves_equal_whole(lora_r, extra, tiny_model, tmp_path):
    """Groups, the gate's split (one of the 4 prompts falls below the threshold) and the mix's SFT term are global."""
    helper = ROOT / "tests" / "dist_helper.py"
    args = ["ppo_step", str(tiny_model), None, lora_r, json.dumps(extra)]
    one = subprocess.run(
        [sys.executable, str(helper), *[a or str(tmp_path / "one.st") for a in args]], capture_output=True, text=True, env=ENV
    )
    assert one.returncode == 0, one.stderr[-3000:]
    two = torchrun([helper, *[a or tmp_path / "two.st" for a in args]])
    # PACKING packs each process's rows apart: another summation order, which Adam's sign-like first steps lift where a
    # gradient is at rounding level (measured 1.2e-5 here); a real error (a local group, a missing row) moves a weight
    # by a whole step (LR_PPO)
    assert max_diff(tmp_path / "one.st", tmp_path / "two.st") <= 5e-5
    assert one.stdout.splitlines()[-1] == two.stdout.splitlines()[-1]


def test_hybrid_under_two_processes_writes_one_set_of_outputs(tiny_model, tiny_data, tmp_path):
    out = tmp_path / "out"
    proc = torchrun_cli(
        {
            "MODE": "hybrid",
            "MODEL": str(tiny_model),
            "TRAIN_FILE": str(tiny_data),
            "OUTPUT_DIR": str(out),
            "SEED": 0,
            "SFT_BATCH": 4,
            "PPO_BATCH": 4,
            "PPO_MINI": 2,
            "MAX_NEW_TOKENS": 5,
            "LOG_EVERY": 1,
            "EVAL_FILE": str(tiny_data),
            "REWARD": {"type": "contains", "pattern": "yes"},
        },
        tmp_path,
    )
    assert [r["phase"] for r in metrics(out)] == ["eval", "sft", "ppo", "sft", "ppo", "eval"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["out"]
    assert (out / "inference_lm" / "model.safetensors").is_file() and (out / "report.md").is_file()
    lines = [
        line for line in (proc.stdout + proc.stderr).splitlines() if line.strip() and not line.startswith("hybrid:") and "%|" not in line
    ]
    assert len(lines) == len(set(lines)), lines  # nothing printed twice
    assert sum(line.startswith("done:") for line in lines) == 1
    assert "2 processes" in proc.stdout


def test_resume_with_two_processes_after_sigkill(tiny_model, tiny_data, tmp_path):
    base = {**HYBRID_RESUME, "PPO_MINI": 2, "MODEL": str(tiny_model), "TRAIN_FILE": str(tiny_data)}
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    torchrun_cli({**base, "OUTPUT_DIR": str(straight)}, tmp_path)
    path = tmp_path / "killed.json"
    path.write_text(json.dumps({**base, "OUTPUT_DIR": str(killed)}))
    sigkill_at_checkpoint(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", ROOT / "hybrid_trainer.py", path],
        killed,
        5,
        ENV,
    )  # the launcher and both processes
    assert not (killed / "inference_lm").exists(), "the run finished before it could be killed"
    checkpoint = max((killed / "checkpoints").glob("step-*"), key=lambda p: int(p.name[5:]))
    assert sorted(p.name for p in checkpoint.glob("rng-*.pt")) == ["rng-0.pt", "rng-1.pt"]
    resumed = torchrun_cli({**base, "OUTPUT_DIR": str(killed)}, tmp_path)
    assert "resuming from" in resumed.stdout
    assert comparable(metrics(killed)) == comparable(metrics(straight))
    assert max_diff(straight / "inference_lm/model.safetensors", killed / "inference_lm/model.safetensors") <= 1e-6


def test_fsdp_matches_ddp_and_runs_hybrid_with_lora(tiny_model, tiny_data, tmp_path):
    cfg = {**SFT, "MODEL": str(tiny_model), "TRAIN_FILE": str(tiny_data)}
    torchrun_cli({**cfg, "OUTPUT_DIR": str(tmp_path / "ddp")}, tmp_path)
    torchrun_cli({**cfg, "FSDP": True, "OUTPUT_DIR": str(tmp_path / "fsdp")}, tmp_path)
    assert max_diff(tmp_path / "ddp/inference_lm/model.safetensors", tmp_path / "fsdp/inference_lm/model.safetensors") <= 1e-5
    out = tmp_path / "hybrid"
    torchrun_cli(
        {
            "MODE": "hybrid",
            "MODEL": str(tiny_model),
            "TRAIN_FILE": str(tiny_data),
            "OUTPUT_DIR": str(out),
            "SEED": 0,
            "FSDP": True,
            "LORA_R": 4,
            "REF_UPDATE": "cycle",
            "SFT_BATCH": 4,
            "PPO_BATCH": 4,
            "PPO_MINI": 2,
            "MAX_NEW_TOKENS": 5,
            "SAVE_EVERY": 2,
            "REWARD": {"type": "contains", "pattern": "yes"},
        },
        tmp_path,
    )
    assert [r["phase"] for r in metrics(out)] == ["sft", "ppo", "sft", "ppo"]
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out / "inference_lm")  # full, unsharded, merged
    assert (out / "ppo_full" / "adapter_model.safetensors").is_file()


def test_error_on_one_process_ends_all_with_one_message(tiny_model, tiny_data, tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({**SFT, "MODEL": str(tiny_model), "TRAIN_FILE": str(tiny_data), "OUTPUT_DIR": str(tmp_path / "o")}))
    start = time.time()
    proc = torchrun([ROOT / "tests" / "dist_helper.py", "fail_on_rank1", path], check=False, timeout=200)
    assert proc.returncode != 0
    assert time.time() - start < 150  # no hang
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: process 1 of 2 failed: RuntimeError: simulated crash on rank 1"], proc.stderr[-3000:]


@pytest.mark.parametrize(
    "overrides, env, message",
    [
        ({"FSDP": True}, {}, "FSDP is true but this is a single process"),
        ({"SFT_BATCH": 3}, {"WORLD_SIZE": "2"}, "SFT_BATCH (3) must be divisible by the number of processes (2)"),
        ({"PPO_BATCH": 4, "PPO_MINI": 1}, {"WORLD_SIZE": "2"}, "PPO_MINI (1) must be divisible by the number of processes (2)"),
    ],
)
def test_bad_multiprocess_settings(overrides, env, message, tiny_model, tiny_data, tmp_path):
    path = tmp_path / "c.json"
    path.write_text(
        json.dumps({"MODE": "sft", "MODEL": str(tiny_model), "TRAIN_FILE": str(tiny_data), "OUTPUT_DIR": str(tmp_path / "o"), **overrides})
    )
    proc = subprocess.run(
        [sys.executable, str(ROOT / "hybrid_trainer.py"), str(path), "--check"], capture_output=True, text=True, env={**ENV, **env}
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and message in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    assert not (tmp_path / "o").exists()


def test_reward_error_in_remax_greedy_pass_on_one_process_skips_the_update_on_both(tiny_model, tiny_data, tmp_path):
    """The reward fails on process 1 only, and only in remax's extra greedy pass (2 responses there, 4 sampled): the
    error travels with the rollout's gather, so both processes skip the same update; no hang, no stray traceback."""
    reward = tmp_path / "flaky.py"
    reward.write_text(
        "import os\n\n\ndef score(responses, targets, prompts, items):\n"
        "    if os.environ.get('RANK') == '1' and len(responses) == 2:\n"
        "        raise ValueError('greedy-pass failure on rank 1')\n"
        "    return [float('yes' in r) for r in responses]\n"
    )
    out = tmp_path / "out"
    start = time.time()
    proc = torchrun_cli(
        {
            "MODE": "ppo",
            "MODEL": str(tiny_model),
            "TRAIN_FILE": str(tiny_data),
            "OUTPUT_DIR": str(out),
            "SEED": 0,
            "ADVANTAGE": "remax",
            "NUM_GENERATIONS": 2,
            "PPO_BATCH": 4,
            "PPO_MINI": 2,
            "MAX_NEW_TOKENS": 4,
            "TRUST_REMOTE_CODE": True,
            "REWARD": {"type": "python", "path": str(reward)},
        },
        tmp_path,
        check=False,
        timeout=200,
    )
    assert time.time() - start < 150, "hang"  # no hang
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    records = [r for r in metrics(out) if r["phase"] == "ppo"]
    assert records and all(r.get("ppo/skipped") == 1 for r in records), proc.stderr[-3000:]
    assert all("greedy-pass failure on rank 1" in r["skipped_reason"] for r in records)
