"""Faults a long run meets: a disk that fills (a real small file system: a tmpfs mounted for the test, which CI can do as
root) at a checkpoint, at the final save and at a metrics line, with one and two processes; a damaged checkpoint
(truncated, missing, empty file) that resume skips for the previous one; the space estimate checked up front."""

import contextlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ENV, EXACT_PPO, ROOT, interrupted_copy, metrics, run_cli, torchrun_cli
from safetensors.torch import load_file

import outputs

BASE = {
    "MODE": "hybrid",
    "SEED": 5,
    "SFT_BATCH": 2,
    "PPO_BATCH": 2,
    "PPO_MINI": 1,
    "MAX_NEW_TOKENS": 4,
    "EPOCHS": 1,
    "LR_SFT": 1e-3,
    "LR_PPO": 1e-3,
    "REWARD": {"type": "contains", "pattern": "yes"},
    "LOG_EVERY": 100,
    **EXACT_PPO,
}


@contextlib.contextmanager
def small_disk(path: Path, size_kb: int):
    """A tmpfs of size_kb mounted at path for the block (needs root: CI runs as root)."""
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(path)], capture_output=True, text=True)
    assert done.returncode == 0, f"these tests mount a small tmpfs (as root): {done.stderr.strip()}"
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def checkpoint_kb(tiny_model, tiny_data, tmp_path) -> int:
    out = tmp_path / "measure"
    run_cli(
        {
            **BASE,
            "MODEL": str(tiny_model),
            "TRAIN_FILE": str(tiny_data),
            "OUTPUT_DIR": str(out),
            "SAVE_EVERY": 1,
            "KEEP_CHECKPOINTS_AT_END": True,
            "EPOCHS": 1,
        },
        tmp_path,
    )
    return sum(p.stat().st_size for p in outputs.latest_checkpoint(out).iterdir()) // 1024


def one_error(stderr: str, *needles: str) -> None:
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    for needle in needles:
        assert needle in errors[0], errors[0]


def test_full_disk_at_a_checkpoint_keeps_the_previous_one_and_resumes(tiny_model, tiny_data, tmp_path):
    ckpt = checkpoint_kb(tiny_model, tiny_data, tmp_path)
    cfg = {**BASE, "MODEL": str(tiny_model), "TRAIN_FILE": str(tiny_data), "SAVE_EVERY": 1, "KEEP_CHECKPOINTS": 2}
    straight = tmp_path / "straight"
    run_cli({**cfg, "OUTPUT_DIR": str(straight)}, tmp_path)
    with small_disk(tmp_path / "disk", int(ckpt * 1.6)) as disk:  # room for one checkpoint, not for two
        out = disk / "out"
        proc = run_cli({**cfg, "OUTPUT_DIR": str(out)}, tmp_path, check=False)
        assert proc.returncode == 2, proc.stderr[-3000:]
        one_error(
            proc.stderr,
            "the disk is full",
            "checkpoint step-2",
            str(out / "checkpoints"),
            "needed about",
            "step-1, is intact",
            "rerun the same command",
        )
        assert "warning: OUTPUT_DIR" in proc.stderr and "free" in proc.stderr  # the estimate said so at start
        assert not list((out / "checkpoints").glob(".tmp-*"))  # the partial checkpoint is gone
        assert outputs.checkpoint_damage(out / "checkpoints" / "step-1") is None
        moved = tmp_path / "moved"
        shutil.copytree(out, moved)  # space freed: here, the run moves to a bigger disk
    run_cli({**cfg, "OUTPUT_DIR": str(moved)}, tmp_path)
    a, b = (load_file(str(d / "inference_lm" / "model.safetensors")) for d in (straight, moved))
    assert all((a[k] == b[k]).all() for k in a)


def test_full_disk_at_the_final_save_and_at_a_metrics_line(tiny_model, tiny_data, tmp_path):
    cfg = {**BASE, "MODEL": str(tiny_model), "TRAIN_FILE": str(tiny_data)}
    with small_disk(tmp_path / "disk", 300) as disk:  # metrics fit, the final model (~0.6 MB) does not
        out = disk / "out"
        proc = run_cli({**cfg, "OUTPUT_DIR": str(out)}, tmp_path, check=False)
        assert proc.returncode == 2, proc.stderr[-3000:]
        one_error(proc.stderr, "the disk is full", "the final model", str(out))
        assert not list(out.glob(".tmp-*")) and not (out / "inference_lm").exists()
    with small_disk(tmp_path / "disk2", 2000) as disk:
        out = disk / "out"
        ballast = disk / "ballast"  # the first SFT step fills the disk: the metrics line after it finds no space
        path = tmp_path / "m.json"
        path.write_text(json.dumps({**cfg, "OUTPUT_DIR": str(out)}))
        script = (
            f"import sys; sys.path.insert(0, {str(ROOT)!r}); import hybrid_trainer as ht\n"
            "orig = ht.HybridTrainer.sft_step\n"
            "def sft_step(self, batch):\n"
            "    stats = orig(self, batch)\n"
            f"    with open({str(ballast)!r}, 'wb', buffering=0) as f:\n"
            "        try:\n"
            "            while True: f.write(b'x' * 4096); f.flush()\n"
            "        except OSError: pass\n"
            "    return stats\n"
            "ht.HybridTrainer.sft_step = sft_step\n"
            f"sys.exit(ht.main([{str(path)!r}]))\n"
        )
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=ENV)
        assert proc.returncode == 2, proc.stderr[-3000:]
        one_error(proc.stderr, "the disk is full", "metrics.jsonl", str(out))


def test_full_disk_with_two_processes_ends_both_with_one_message(tiny_model, tiny_data, tmp_path):
    ckpt = checkpoint_kb(tiny_model, tiny_data, tmp_path)
    cfg = {**BASE, "MODEL": str(tiny_model), "TRAIN_FILE": str(tiny_data), "SAVE_EVERY": 1, "KEEP_CHECKPOINTS": 2, "PPO_MINI": 2}
    with small_disk(tmp_path / "disk", int(ckpt * 1.6)) as disk:
        out = disk / "out"
        start = time.monotonic()
        proc = torchrun_cli({**cfg, "OUTPUT_DIR": str(out)}, tmp_path, check=False, timeout=300)
        assert proc.returncode != 0 and time.monotonic() - start < 200
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "the disk is full" in errors[0], proc.stderr[-3000:]
        assert not list((out / "checkpoints").glob(".tmp-*"))
        assert outputs.checkpoint_damage(out / "checkpoints" / "step-1") is None


@pytest.mark.parametrize("damage", ["truncated", "missing", "empty"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(damage, tiny_model, tiny_data, tmp_path):
    cfg = {
        **BASE,
        "MODEL": str(tiny_model),
        "TRAIN_FILE": str(tiny_data),
        "SAVE_EVERY": 1,
        "KEEP_CHECKPOINTS": 10,
        "KEEP_CHECKPOINTS_AT_END": True,
    }
    straight = tmp_path / "straight"
    run_cli({**cfg, "OUTPUT_DIR": str(straight)}, tmp_path)
    resumed = interrupted_copy(straight, tmp_path / "resumed", checkpoint=3)
    policy = resumed / "checkpoints" / "step-3" / "policy.safetensors"
    if damage == "truncated":
        data = policy.read_bytes()
        policy.write_bytes(data[: len(data) // 2])
    elif damage == "missing":
        policy.unlink()
    else:
        policy.write_bytes(b"")
    assert outputs.checkpoint_damage(policy.parent) is not None
    proc = run_cli({**cfg, "OUTPUT_DIR": str(resumed)}, tmp_path)
    warning = [line for line in proc.stderr.splitlines() if line.startswith("warning:") and "is damaged and is skipped" in line]
    assert len(warning) == 1 and str(policy) in warning[0], proc.stderr[-3000:]
    assert "resuming from" in proc.stdout + proc.stderr and "step-2" in proc.stdout + proc.stderr
    a, b = (load_file(str(d / "inference_lm" / "model.safetensors")) for d in (straight, resumed))
    assert all((a[k] == b[k]).all() for k in a)
    assert [r["step"] for r in metrics(resumed)] == [r["step"] for r in metrics(straight)]


def test_no_good_checkpoint_and_a_damaged_resume_path_are_one_error_each(tiny_model, tiny_data, tmp_path):
    cfg = {
        **BASE,
        "MODEL": str(tiny_model),
        "TRAIN_FILE": str(tiny_data),
        "SAVE_EVERY": 1,
        "KEEP_CHECKPOINTS": 10,
        "KEEP_CHECKPOINTS_AT_END": True,
    }
    straight = tmp_path / "straight"
    run_cli({**cfg, "OUTPUT_DIR": str(straight)}, tmp_path)
    resumed = interrupted_copy(straight, tmp_path / "resumed", checkpoint=2)
    for step in (1, 2):
        (resumed / "checkpoints" / f"step-{step}" / "optimizers.pt").write_bytes(b"garbage")
    proc = run_cli({**cfg, "OUTPUT_DIR": str(resumed)}, tmp_path, check=False)
    assert proc.returncode == 2
    one_error(proc.stderr, "no checkpoint", "step-1", "step-2", "optimizers.pt")
    proc = run_cli({**cfg, "OUTPUT_DIR": str(tmp_path / "other"), "RESUME": str(resumed / "checkpoints" / "step-2")}, tmp_path, check=False)
    assert proc.returncode == 2
    one_error(proc.stderr, "RESUME", str(resumed / "checkpoints" / "step-2" / "optimizers.pt"))


def test_space_is_checked_up_front(tiny_model, tiny_data, tmp_path):
    cfg = {**BASE, "MODEL": str(tiny_model), "TRAIN_FILE": str(tiny_data), "SAVE_EVERY": 1}
    with small_disk(tmp_path / "disk", 100) as disk:  # not one checkpoint fits
        proc = run_cli({**cfg, "OUTPUT_DIR": str(disk / "out")}, tmp_path, check=False)
        assert proc.returncode == 2
        one_error(proc.stderr, "OUTPUT_DIR", "free", "one checkpoint needs about")
        assert "Loading weights" not in proc.stderr  # before any weights load
        check = run_cli({**cfg, "OUTPUT_DIR": str(disk / "out")}, tmp_path, "--check", check=False)
        assert check.returncode == 2 and "one checkpoint needs about" in check.stderr
    proc = run_cli({**cfg, "OUTPUT_DIR": str(tmp_path / "roomy")}, tmp_path, "--check")
    assert "disk: a checkpoint about" in proc.stdout and "the final model about" in proc.stdout


def test_the_estimate_is_close_to_what_a_run_writes(tiny_model, tiny_data, tmp_path):
    out = tmp_path / "out"
    proc = run_cli(
        {
            **BASE,
            "MODEL": str(tiny_model),
            "TRAIN_FILE": str(tiny_data),
            "OUTPUT_DIR": str(out),
            "SAVE_EVERY": 2,
            "KEEP_CHECKPOINTS_AT_END": True,
        },
        tmp_path,
    )
    plan = json.loads((out / "plan.json").read_text())
    written = sum(p.stat().st_size for p in outputs.latest_checkpoint(out).iterdir())
    assert 0.8 * written <= plan["checkpoint_bytes"] <= 1.25 * written, (plan["checkpoint_bytes"], written)
    final = sum(p.stat().st_size for p in (out / "inference_lm").iterdir() if p.suffix == ".safetensors")
    assert 0.8 * final <= plan["final_bytes"] <= 1.5 * final + 100_000, (plan["final_bytes"], final)
    assert "a checkpoint about" in proc.stdout  # the plan's block says it
