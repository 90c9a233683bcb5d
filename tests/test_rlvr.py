"""RLVR mechanics: DAPO's dynamic sampling (groups kept and dropped by hand, epoch accounting, exact resume, 1 process
= 2 processes), MASK_TRUNCATED, pass@k against Chen et al.'s formula, maj@k, the math presets, and their bad inputs."""

import json
import math

import pytest
from conftest import EXACT_PPO, ROOT, capture_steps, comparable, max_diff, metrics, run_cli, torchrun, trainer_for

import hybrid_trainer as ht
import outputs


@pytest.mark.parametrize(
    "n, c, k, expected",
    [
        (8, 0, 1, 0.0),
        (8, 8, 8, 1.0),
        (5, 2, 1, 0.4),
        (5, 2, 2, 1 - 3 / 10),  # 1 - C(3, 2) / C(5, 2)
        (10, 3, 4, 1 - 35 / 210),  # 1 - C(7, 4) / C(10, 4)
        (4, 1, 4, 1.0),  # n - c < k: some sample of any 4 passes
    ],
)
def test_pass_at_k_is_the_unbiased_estimator(n, c, k, expected):
    assert outputs.pass_at_k(n, c, k) == pytest.approx(expected)
    assert outputs.pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k))


def collected(scores, G):
    P = len(scores) // G
    examples = [ht.Example(index=i, item={}, target="t") for i in range(P)]
    return ht.Collected(examples, [ht.Sample([i], [i, i], True, s) for i, s in enumerate(scores)], {"x": 1.0}, 1.0, 2.0)


def test_groups_with_signal_by_hand():
    c = collected([1, 1, 0, 1, 0, 0, 0.5, 0.2], G=2)  # groups: (1, 1) (0, 1) (0, 0) (0.5, 0.2)
    kept = c.groups_with_signal(2)
    assert [e.index for e in kept.examples] == [1, 3] and [s.score for s in kept.samples] == [0, 1, 0.5, 0.2]
    assert [s.query for s in kept.samples] == [[2], [3], [6], [7]]
    both = kept.join(collected([0, 1], G=2))
    assert len(both.examples) == 3 and [s.score for s in both.samples] == [0, 1, 0.5, 0.2, 0, 1]
    assert (both.generate_s, both.score_s) == (1.0, 2.0)


DYNAMIC = {
    "MODE": "ppo",
    "ADVANTAGE": "grpo",
    "NUM_GENERATIONS": 4,
    "PPO_BATCH": 2,
    "PPO_EPOCHS": 1,
    "MAX_NEW_TOKENS": 4,
    "DYNAMIC_SAMPLING": True,
    "MAX_SAMPLING_ROUNDS": 3,
    "SEED": 1,
    "EPOCHS": 2,
    "LOG_EVERY": 100,
    "REWARD": {"type": "contains", "pattern": "yes"},
    **EXACT_PPO,
}


def test_dynamic_sampling_uses_every_prompt_once_per_epoch_and_resumes_exactly(tiny_model, tiny_data, tmp_path):
    base = {
        **DYNAMIC,
        "MODEL": str(tiny_model),
        "TRAIN_FILE": str(tiny_data),
        "SAVE_EVERY": 1,
        "KEEP_CHECKPOINTS": 20,
        "KEEP_CHECKPOINTS_AT_END": True,
    }
    straight = tmp_path / "straight"
    run_cli({**base, "OUTPUT_DIR": str(straight)}, tmp_path)
    records = metrics(straight)
    for epoch in (0, 1):  # a prompt drawn is a prompt used: the 8 items, each once per epoch
        updates = [r for r in records if r["epoch"] == epoch]
        assert sum(r["dynamic/prompts_generated"] for r in updates) == 8, updates
    for r in records:
        assert r["dynamic/prompts_kept"] <= 2 and 1 <= r["dynamic/rounds"] <= 3
        assert r["dynamic/groups_dropped"] == r["dynamic/prompts_generated"] - r["dynamic/prompts_kept"]
    assert any(r["dynamic/rounds"] > 1 for r in records)  # some update had to draw more
    assert len(records) < 8  # fewer updates than the 4 per epoch without it
    resumed = tmp_path / "resumed"
    run_cli({**base, "OUTPUT_DIR": str(resumed), "RESUME": str(straight / "checkpoints" / "step-1")}, tmp_path)
    assert comparable(metrics(resumed)) == comparable(records[1:])


def test_dynamic_sampling_one_process_equals_two(tiny_model, tmp_path):
    helper = ROOT / "tests" / "dist_helper.py"
    import subprocess
    import sys

    one = subprocess.run(
        [sys.executable, str(helper), "dynamic", str(tiny_model), str(tmp_path / "one.st")],
        capture_output=True,
        text=True,
        env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
    )
    assert one.returncode == 0, one.stderr[-3000:]
    two = torchrun([helper, "dynamic", tiny_model, tmp_path / "two.st"])
    line = next(x for x in one.stdout.splitlines() if x.startswith("dynamic "))
    assert line in two.stdout  # the same groups kept and dropped, the same rounds
    assert json.loads(line[8:]) == {
        "dynamic/rounds": 3,
        "dynamic/prompts_generated": 7,
        "dynamic/groups_dropped": 4,
        "dynamic/prompts_kept": 3,
    }
    assert max_diff(tmp_path / "one.st", tmp_path / "two.st") <= 5e-5  # each process sums its share of the rows run


def test_mask_truncated_takes_the_gradient_of_truncated_responses(tiny_model, tiny_data):
    """Responses without EOS give no gradient: all truncated -> no policy gradient at all; one ended -> some."""

    def grad_norm(mask, responses_end_with_eos):
        trainer, examples = trainer_for(
            {"ADVANTAGE": "rloo", "NUM_GENERATIONS": 2, "PPO_BATCH": 2, "PPO_EPOCHS": 1, "MASK_TRUNCATED": mask},
            tiny_model,
            tiny_data,
            None,
        )
        tok, captured = trainer.tokenizer, capture_steps(trainer)
        queries = [e.prompt_ids for e in examples[:2] for _ in range(2)]
        responses = [tok("yes yes")["input_ids"] + ([tok.eos_token_id] if end else []) for end in responses_end_with_eos]
        trainer.ppo_step(queries, responses, [1.0, 0.0, 0.0, 1.0])
        return captured[0].norm().item()

    assert grad_norm(True, [False] * 4) == 0.0
    assert grad_norm(False, [False] * 4) > 0
    assert grad_norm(True, [True, False, False, False]) > 0


def test_pass_at_k_and_majority_vote_in_the_eval_and_report(tiny_model, tmp_path):
    data = tmp_path / "math.json"
    items = [{"prompt": f"what is {a} + {a}?", "completion": f"{a} + {a} = {2 * a}.\n#### {2 * a}", "category": "add"} for a in range(1, 7)]
    data.write_text(json.dumps(items))
    out = tmp_path / "out"
    run_cli(
        {
            "MODE": "sft",
            "MODEL": str(tiny_model),
            "TRAIN_FILE": str(data),
            "EVAL_FILE": str(data),
            "OUTPUT_DIR": str(out),
            "SEED": 0,
            "SFT_BATCH": 3,
            "MAX_NEW_TOKENS": 8,
            "EVAL_NUM_SAMPLES": 4,
            "EVAL_TEMPERATURE": 1.5,
            "CATEGORY_FIELD": "category",
            "REWARD": {"type": "math"},
        },
        tmp_path,
    )
    evals = [r for r in metrics(out) if r["phase"] == "eval"]
    assert len(evals) == 2
    for r in evals:
        assert 0 <= r["eval/pass@1"] <= r["eval/pass@4"] <= 1 and 0 <= r["eval/maj@4"] <= 1
        assert r["eval/pass@1"] == pytest.approx(r["eval/reward"])  # a 0/1 reward: pass@1 is its mean
        assert all(s["k"] == 4 and 0 <= s["passes"] <= 4 for s in r["samples"])
    report = (out / "report.md").read_text()
    assert "pass@1 before | after | pass@4 before | after | maj@4 before | after |" in report


@pytest.mark.parametrize("preset", ["math_grpo", "math_hybrid"])
def test_math_presets_validate(preset):
    cfg = ht.load_config(str(ROOT / "configs" / f"{preset}.json"))
    assert cfg.REWARD["type"] in ("math", "weighted_sum") and cfg.EVAL_NUM_SAMPLES == 8
    assert cfg.TRAIN_FILE == "data/math_train.json" and cfg.EVAL_FILE == "data/math_eval.json"


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"DYNAMIC_SAMPLING": True}, "DYNAMIC_SAMPLING drops groups whose NUM_GENERATIONS scores are all equal: set NUM_GENERATIONS >= 2"),
        ({"EVAL_NUM_SAMPLES": 0}, "EVAL_NUM_SAMPLES must be >= 1, got 0"),
        ({"MAX_SAMPLING_ROUNDS": 0}, "MAX_SAMPLING_ROUNDS must be >= 1, got 0"),
        ({"EVAL_TEMPERATURE": 0}, "EVAL_TEMPERATURE must be > 0"),
    ],
)
def test_bad_rlvr_settings(overrides, message, tmp_path, capsys):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"MODE": "ppo", "TRAIN_FILE": "t", "OUTPUT_DIR": str(tmp_path / "o"), **overrides}))
    assert ht.main([str(path), "--check"]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and message in err, err


def test_dynamic_sampling_warns_without_a_group_estimator(capsys):
    ht.Config.from_dict({"MODE": "ppo", "TRAIN_FILE": "t", "OUTPUT_DIR": "o", "DYNAMIC_SAMPLING": True, "NUM_GENERATIONS": 2})
    assert "DYNAMIC_SAMPLING has no effect with ADVANTAGE 'gae'" in capsys.readouterr().err
