"""A newcomer's first hour: disk use, paths in messages, the seed in --check, short runs that print, the
report that explains itself, and torch threads that fit the CPUs this process may use."""

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT, metrics, run_cli

import hybrid_trainer as ht
import runtime


def test_finished_run_deletes_checkpoints_and_says_how_much_it_holds(tiny_model, tiny_data, tmp_path):
    cfg = {"MODE": "sft", "MODEL": str(tiny_model), "TRAIN_FILE": str(tiny_data), "SEED": 0, "SFT_BATCH": 2, "SAVE_EVERY": 1}
    proc = run_cli({**cfg, "OUTPUT_DIR": str(tmp_path / "a")}, tmp_path)
    assert not (tmp_path / "a" / "checkpoints").exists()
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("done:") and f"{tmp_path / 'a'} holds " in last and "inference_lm" in last
    run_cli({**cfg, "OUTPUT_DIR": str(tmp_path / "b"), "KEEP_CHECKPOINTS_AT_END": True}, tmp_path)
    assert sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir()) == ["step-3", "step-4"]


def test_relative_paths_in_messages_show_where_they_were_looked_for(tiny_model, tmp_path):
    (tmp_path / "elsewhere").mkdir()
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"MODEL": str(tiny_model), "TRAIN_FILE": "data/train.json", "OUTPUT_DIR": "out"}))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "hybrid_trainer.py"), str(config), "--check"],
        capture_output=True,
        text=True,
        cwd=tmp_path / "elsewhere",
    )
    assert proc.returncode == 2
    where = tmp_path / "elsewhere"
    assert proc.stderr.strip() == (
        f"error: TRAIN_FILE 'data/train.json' (looked at {where / 'data/train.json'}; relative paths "
        f"start from the current directory {where}) does not exist"
    )


def test_check_says_a_null_seed_is_drawn_at_start(tiny_model, tiny_data, tmp_path):
    config = tmp_path / "c.json"
    config.write_text(
        json.dumps({"MODE": "sft", "MODEL": str(tiny_model), "TRAIN_FILE": str(tiny_data), "OUTPUT_DIR": str(tmp_path / "o")})
    )
    proc = subprocess.run([sys.executable, str(ROOT / "hybrid_trainer.py"), str(config), "--check"], capture_output=True, text=True)
    assert proc.returncode == 0
    assert json.loads(proc.stdout[: proc.stdout.rindex("}") + 1])["SEED"] is None
    assert "SEED is null: a seed will be drawn when the run starts and recorded in OUTPUT_DIR/config.json" in proc.stdout
    assert not (tmp_path / "o").exists()  # the writability probe left nothing behind


def test_first_and_last_step_always_print(tiny_model, tiny_data, tmp_path):
    proc = run_cli(
        {
            "MODE": "sft",
            "MODEL": str(tiny_model),
            "TRAIN_FILE": str(tiny_data),
            "OUTPUT_DIR": str(tmp_path / "o"),
            "SEED": 0,
            "SFT_BATCH": 2,
            "LOG_EVERY": 100,
        },
        tmp_path,
    )
    lines = [line.split("[")[0].strip().split("\r")[-1] for line in (proc.stdout + proc.stderr).splitlines() if " [sft] " in line]
    assert [line[-6:] for line in lines] == ["step 1", "step 4"], lines
    assert ht.Config.from_dict({"TRAIN_FILE": "t", "OUTPUT_DIR": "o"}).LOG_EVERY <= 5


def test_report_explains_itself_with_categories(tiny_model, tmp_path):
    items = [{"instruction": f"say yes {i}", "output": "yes yes", "category": "yes"} for i in range(4)]
    items += [{"instruction": f"capital {c}", "output": c, "category": "capitals"} for c in ("paris", "rome")]
    data = tmp_path / "d.json"
    data.write_text(json.dumps(items))
    out = tmp_path / "out"
    run_cli(
        {
            "MODE": "hybrid",
            "MODEL": str(tiny_model),
            "TRAIN_FILE": str(data),
            "EVAL_FILE": str(data),
            "CATEGORY_FIELD": "category",
            "OUTPUT_DIR": str(out),
            "SEED": 0,
            "SFT_BATCH": 3,
            "PPO_BATCH": 3,
            "MAX_NEW_TOKENS": 4,
            "LR_SFT": 1e-2,
            "REWARD": {"type": "chrf"},
        },
        tmp_path,
    )
    report = (out / "report.md").read_text()
    assert "**What was trained.** `MODE` hybrid" in report and "2 SFT steps and 2 PPO updates over 6 training items" in report
    assert "Each row is a mean over the held-out items" in report and "| contains_reference |" in report
    assert "## By category" in report
    assert "| capitals | 2 |" in report and "| yes | 4 |" in report
    evals = [r for r in metrics(out) if r["phase"] == "eval"]
    assert all("category" not in s["prompt"] for s in evals[0]["samples"])  # the category is not part of the prompt
    deltas = [(a["reward"] - b["reward"]) for b, a in zip(evals[0]["samples"], evals[-1]["samples"])]
    if any(d > 0 for d in deltas):
        assert "| improved |" in report
    if any(d < 0 for d in deltas):
        assert "| worse |" in report
    assert f"{sum(d > 0 for d in deltas)} improved, {sum(d < 0 for d in deltas)} got worse" in report
    assert "can be negative (a negative value is sampling noise" in report  # the KL caption
    assert not (out / "plot_eval.png").exists()  # two evaluations: the table says it all
    assert (out / "plot_kl.png").exists() and (out / "plot_sft_loss.png").exists()


def test_eval_plot_with_three_evaluations(tiny_model, tiny_data, tmp_path):
    out = tmp_path / "out"
    run_cli(
        {
            "MODE": "sft",
            "MODEL": str(tiny_model),
            "TRAIN_FILE": str(tiny_data),
            "EVAL_FILE": str(tiny_data),
            "EVAL_SAMPLES": 2,
            "EVAL_EVERY": 2,
            "OUTPUT_DIR": str(out),
            "SEED": 0,
            "SFT_BATCH": 2,
            "MAX_NEW_TOKENS": 3,
            "REWARD": {"type": "chrf"},
        },
        tmp_path,
    )
    assert [r["step"] for r in metrics(out) if r["phase"] == "eval"] == [0, 2, 4]  # the last step is evaluated once
    assert (out / "plot_eval.png").exists()


def test_threads_follow_usable_cpus(tmp_path, monkeypatch):
    quota = tmp_path / "cpu.max"
    quota.write_text("150000 100000\n")
    assert runtime.usable_cpus(quota) == 1  # 1.5 CPUs of quota -> 1 thread
    quota.write_text("max 100000\n")
    assert runtime.usable_cpus(quota) == len(os.sched_getaffinity(0))
    code = "import runtime, torch; print(runtime.set_threads(runtime.Processes.from_env())); print(torch.get_num_threads())"
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    pinned = subprocess.run(["taskset", "-c", "0", sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
    assert pinned.stdout.split("\n")[1] == "1", pinned.stdout + pinned.stderr  # torch alone would take every core
    shared = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**env, "LOCAL_WORLD_SIZE": str(len(os.sched_getaffinity(0)))},
    )
    assert shared.stdout.split("\n")[1] == "1" and "processes" in shared.stdout
    honoured = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env={**env, "OMP_NUM_THREADS": "1"})
    assert "OMP_NUM_THREADS" in honoured.stdout


@pytest.mark.parametrize("name", ["out_sft", "out_ppo", "out_hybrid"])
def test_preset_outputs_are_ignored_by_git(name):
    proc = subprocess.run(["git", "check-ignore", "-q", f"{name}/model.safetensors"], cwd=ROOT)
    assert proc.returncode == 0
