"""SAVE_BEST: the best evaluation's weights kept as OUTPUT_DIR/best/, through resume, with LoRA; its bad inputs."""

import json

import pytest
import torch
from conftest import comparable, interrupted_copy, metrics, run_cli, write_json
from safetensors.torch import load_file

import hybrid_trainer as ht

RUN = {
    "MODE": "sft",
    "SEED": 0,
    "SFT_BATCH": 2,
    "EPOCHS": 2,
    "LR_SFT": 1e-3,
    "BF16": False,
    "MAX_NEW_TOKENS": 4,
    "EVAL_EVERY": 2,
    "SAVE_EVERY": 2,
    "KEEP_CHECKPOINTS": 10,
    "KEEP_CHECKPOINTS_AT_END": True,
    "LOG_EVERY": 1,
}


def best_eval(out, metric: str, mode: str) -> dict:
    """The evaluation SAVE_BEST should have kept: the first with the best value."""
    evals = [r for r in metrics(out) if r["phase"] == "eval"]
    pick = max if mode == "max" else min
    value = pick(r[metric] for r in evals)
    return next(r for r in evals if r[metric] == value)


def config(tiny_model, tiny_data, out, **extra) -> dict:
    return {**RUN, "MODEL": str(tiny_model), "TRAIN_FILE": str(tiny_data), "EVAL_FILE": str(tiny_data), "OUTPUT_DIR": str(out), **extra}


@pytest.mark.parametrize("mode", ["max", "min"])
def test_best_is_the_best_evaluations_weights(mode, tiny_model, tiny_data, tmp_path):
    """best/ holds the weights of the evaluation with the best metric (the one before training counts), as a plain
    from_pretrained directory; the final model is saved too; the report names the best step."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    run_cli(config(tiny_model, tiny_data, out, SAVE_BEST="eval/rougeL", SAVE_BEST_MODE=mode), tmp_path)
    expected = best_eval(out, "eval/rougeL", mode)
    meta = json.loads((out / "best" / "best.json").read_text())
    assert meta == {"metric": "eval/rougeL", "mode": mode, "value": expected["eval/rougeL"], "step": expected["step"]}
    best = AutoModelForCausalLM.from_pretrained(out / "best").state_dict()
    if meta["step"] == 0:
        source = AutoModelForCausalLM.from_pretrained(tiny_model).state_dict()
    else:
        source = {
            k.removeprefix("lm."): v for k, v in load_file(str(out / "checkpoints" / f"step-{meta['step']}" / "policy.safetensors")).items()
        }
    assert all(torch.equal(best[k], source[k]) for k in source if k in best) and source.keys() & best.keys()
    assert (out / "inference_lm" / "model.safetensors").is_file()
    assert f"at step {meta['step']}, in `best/`" in (out / "report.md").read_text()


def test_min_and_max_pick_other_steps_when_the_metric_moves(tiny_model, tiny_data, tmp_path):
    """The metric is not flat on this run (else the test above could pass by always keeping the first evaluation)."""
    out = tmp_path / "out"
    run_cli(config(tiny_model, tiny_data, out, SAVE_BEST="eval/rougeL", EPOCHS=1, SAVE_EVERY=0, KEEP_CHECKPOINTS_AT_END=False), tmp_path)
    assert best_eval(out, "eval/rougeL", "max")["step"] != best_eval(out, "eval/rougeL", "min")["step"]


def test_resume_keeps_the_best_so_far(tiny_model, tiny_data, tmp_path):
    """A run interrupted after its checkpoint at step 4 (best/ as it then was on disk, possibly newer than that
    checkpoint) and resumed ends with the same best/ as the run that was not interrupted."""
    cfg = config(tiny_model, tiny_data, tmp_path / "out", SAVE_BEST="eval/rougeL")
    run_cli(cfg, tmp_path)
    straight = tmp_path / "out"
    killed = interrupted_copy(straight, tmp_path / "killed", 4)
    state = json.loads((killed / "checkpoints" / "step-4" / "state.json").read_text())["run"]["best"]
    assert state["step"] <= 4
    resumed = run_cli({**cfg, "OUTPUT_DIR": str(killed)}, tmp_path)
    assert "resuming from" in resumed.stdout
    assert comparable(metrics(killed)) == comparable(metrics(straight))
    assert (killed / "best" / "best.json").read_text() == (straight / "best" / "best.json").read_text()
    a, b = load_file(str(straight / "best" / "model.safetensors")), load_file(str(killed / "best" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_lora_best_is_an_adapter(tiny_lora_model, tiny_data, tmp_path):
    out = tmp_path / "out"
    run_cli(config(tiny_lora_model, tiny_data, out, SAVE_BEST="eval/rougeL", LORA_R=4, EPOCHS=1, SAVE_EVERY=0), tmp_path)
    assert (out / "best" / "adapter_config.json").is_file() and not (out / "best" / "model.safetensors").exists()
    assert json.loads((out / "best" / "best.json").read_text())["step"] == best_eval(out, "eval/rougeL", "max")["step"]


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"EVAL_EVERY": 0}, "SAVE_BEST 'eval/rougeL' compares evaluations during the run: set EVAL_EVERY"),
        ({"EVAL_FILE": ""}, "SAVE_BEST 'eval/rougeL' selects by a held-out metric: set EVAL_FILE"),
        ({"SAVE_BEST": "eval/pass@1"}, "SAVE_BEST 'eval/pass@1' is not a metric this run's evaluation logs; it logs: "),
        ({"SAVE_BEST": "rougeL"}, "SAVE_BEST 'rougeL' is not a metric"),
        ({"SAVE_BEST_MODE": "up"}, "SAVE_BEST_MODE"),
    ],
)
def test_bad_save_best_is_one_error_before_weights(extra, message, tiny_model, tiny_data, tmp_path, capsys):
    path = write_json(tmp_path / "c.json", config(tiny_model, tiny_data, tmp_path / "out", **{"SAVE_BEST": "eval/rougeL", **extra}))
    assert ht.main([str(path), "--check"]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and message in err and "Traceback" not in err, err


def test_a_metric_the_evaluation_lacks_stops_at_the_first_evaluation(tiny_model, tiny_data, tmp_path):
    """maj@k exists only with a math reward: known at the first evaluation, before any step."""
    out = tmp_path / "out"
    proc = run_cli(config(tiny_model, tiny_data, out, SAVE_BEST="eval/maj@2", EVAL_NUM_SAMPLES=2), tmp_path, check=False)
    assert proc.returncode == 2 and proc.stderr.count("error:") == 1, proc.stderr[-2000:]
    assert "SAVE_BEST 'eval/maj@2': this run's evaluation does not log it" in proc.stderr and "Traceback" not in proc.stderr
    assert not [r for r in metrics(out) if r["phase"] == "sft"]


def test_two_processes_keep_one_best(tiny_model, tiny_data, tmp_path):
    """Every process takes the same decision (the evaluation is gathered) and the main one writes best/."""
    from conftest import torchrun_cli

    out = tmp_path / "out"
    torchrun_cli(config(tiny_model, tiny_data, out, SAVE_BEST="eval/rougeL", EPOCHS=1, SAVE_EVERY=0), tmp_path)
    assert json.loads((out / "best" / "best.json").read_text())["step"] == best_eval(out, "eval/rougeL", "max")["step"]
    assert not list(out.glob(".tmp-*"))
