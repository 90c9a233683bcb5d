"""SFT_FILE: a few demonstrations for the SFT side, many prompts (answer only) for RL; each side walks its own stream,
exact resume with both; prompt-only rows and their bad inputs."""

import json

import pytest
from conftest import comparable, interrupted_copy, metrics, run_cli, write_json
from transformers import AutoTokenizer

import hybrid_trainer as ht

PROMPTS = [{"prompt": f"question: two plus {n} is", "answer": str(2 + n)} for n in range(6)]  # RL: no response
DEMOS = [{"prompt": f"write the word yes {n}", "completion": " ".join(["yes"] * (n + 1)), "answer": str(n)} for n in range(4)]
MATH = {"type": "math", "answer_field": "answer"}
ALTERNATE = {
    "MODE": "hybrid",
    "HYBRID": "alternate",
    "SEED": 0,
    "SFT_BATCH": 2,
    "PPO_BATCH": 2,
    "CYCLE_SFT_STEPS": 1,
    "CYCLE_PPO_UPDATES": 1,
    "EPOCHS": 1,
    "MAX_NEW_TOKENS": 4,
    "LR_SFT": 1e-3,
    "LR_PPO": 1e-3,
    "BF16": False,
    "REWARD": MATH,
    "LOG_EVERY": 1,
    "ADVANTAGE": "grpo",
    "NUM_GENERATIONS": 2,
}


@pytest.fixture
def split(tmp_path):
    return write_json(tmp_path / "prompts.json", PROMPTS), write_json(tmp_path / "demos.json", DEMOS)


def config(tiny_model, split, out, **extra) -> dict:
    prompts, demos = split
    return {**ALTERNATE, "MODEL": str(tiny_model), "TRAIN_FILE": str(prompts), "SFT_FILE": str(demos), "OUTPUT_DIR": str(out), **extra}


def test_alternate_walks_each_file_once_per_epoch(tiny_model, split, tmp_path):
    """6 prompts in updates of 2 and 4 demonstrations in steps of 2: sft, ppo, sft, ppo, ppo (the side that runs out
    drops out); the SFT steps trained on SFT_FILE's responses, every one once (their token counts add up)."""
    out = tmp_path / "out"
    proc = run_cli(config(tiny_model, split, out), tmp_path)
    assert "6 RL prompts (TRAIN_FILE), 4 SFT demonstrations (SFT_FILE)" in proc.stdout
    steps = [r for r in metrics(out) if r["phase"] in ("sft", "ppo")]
    assert [r["phase"] for r in steps] == ["sft", "ppo", "sft", "ppo", "ppo"]
    tok = AutoTokenizer.from_pretrained(tiny_model)
    assert sum(r["sft/tokens"] for r in steps if r["phase"] == "sft") == sum(len(tok(d["completion"])["input_ids"]) + 1 for d in DEMOS)
    plan = json.loads((out / "plan.json").read_text())
    assert (plan["n_items"], plan["n_sft_items"]) == (6, 4)


def test_resume_with_two_streams_is_exact(tiny_model, split, tmp_path):
    """Each side's position is in the checkpoint: killed after step 2 (one SFT step and one update in) and resumed,
    the run logs the same numbers as the one that was not interrupted."""
    cfg = config(tiny_model, split, tmp_path / "out", SAVE_EVERY=1, KEEP_CHECKPOINTS=10, KEEP_CHECKPOINTS_AT_END=True, EPOCHS=2)
    run_cli(cfg, tmp_path)
    straight = tmp_path / "out"
    killed = interrupted_copy(straight, tmp_path / "killed", 3)
    state = json.loads((killed / "checkpoints" / "step-3" / "state.json").read_text())["run"]
    assert state["drawn"] == {"sft": 4, "ppo": 2}
    resumed = run_cli({**cfg, "OUTPUT_DIR": str(killed)}, tmp_path)
    assert "resuming from" in resumed.stdout
    assert comparable(metrics(killed)) == comparable(metrics(straight))


def test_check_shows_one_example_of_each_side(tiny_model, split, tmp_path, capsys):
    path = write_json(tmp_path / "c.json", config(tiny_model, split, tmp_path / "out"))
    assert ht.main([str(path), "--check"]) == 0
    out = capsys.readouterr().out
    assert "example (TRAIN_FILE row " in out and ", the RL side)" in out and "(none: a prompt for RL, scored from its row)" in out
    assert "example (SFT_FILE row " in out and ", the SFT side)" in out
    assert "6 training items + 4 SFT_FILE" in out


def test_ppo_takes_prompt_only_rows(tiny_model, split, tmp_path):
    """MODE ppo needs no responses when the reward reads the answer from the row (also as chat messages)."""
    prompts, _ = split
    run_cli({**config(tiny_model, split, tmp_path / "out", MODE="ppo"), "SFT_FILE": ""}, tmp_path)
    assert [r["phase"] for r in metrics(tmp_path / "out") if r["phase"] != "eval"] == ["ppo"] * 3
    rows = [{"messages": [{"role": "user", "content": p["prompt"]}], "answer": p["answer"]} for p in PROMPTS]
    examples, fmt = ht.load_data(
        ht.Config.from_dict({"MODE": "ppo", "TRAIN_FILE": str(write_json(tmp_path / "m.json", rows)), "OUTPUT_DIR": "-", "REWARD": MATH}),
        "TRAIN_FILE",
    )
    assert fmt == "messages" and examples[0].target == "" and examples[0].messages[-1]["role"] == "user"


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"SFT_FILE": "missing.json"}, "SFT_FILE"),
        ({"SFT_FILE": "[]"}, "holds no items"),
        ({"REWARD": {"type": "chrf"}}, "is a prompt without a response, and REWARD 'chrf' compares responses with it"),
        ({"REWARD": {"type": "math"}}, "is a prompt without a response, and REWARD 'math' compares responses with it"),
        ({"HYBRID": "gate"}, "HYBRID 'gate' trains SFT on each prompt's own reference response, and no TRAIN_FILE"),
        ({"SFT_FILE": ""}, 'and HYBRID "alternate" trains its SFT steps on TRAIN_FILE\'s responses: set SFT_FILE'),
        ({"TEACHER_MODEL": "self", "DISTILL": "token_reverse_kl"}, "TEACHER_CONTEXT's {target}), and TRAIN_FILE rows [0, 1, 2, 3, 4]"),
    ],
)
def test_bad_split_inputs_are_one_error(extra, message, tiny_model, split, tmp_path, capsys):
    if extra.get("SFT_FILE") == "[]":
        extra = {"SFT_FILE": str(write_json(tmp_path / "empty.json", []))}
    path = write_json(tmp_path / "c.json", config(tiny_model, split, tmp_path / "out", **extra))
    assert ht.main([str(path), "--check"]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and message in err and "Traceback" not in err, err


def test_gate_trains_sft_only_on_the_prompts_with_a_reference(tiny_model, split, tmp_path):
    """Rows with a response and prompts alone in one TRAIN_FILE: the gate sends every failing prompt to SFT when it has a
    reference; the others stay RL (nothing to imitate)."""
    rows = [DEMOS[0], PROMPTS[0], DEMOS[1], PROMPTS[1]]
    train = write_json(tmp_path / "mixed.json", rows)
    out = tmp_path / "out"
    run_cli(
        {
            **config(tiny_model, split, out, HYBRID="gate", GATE_THRESHOLD=2.0, PPO_BATCH=4, PPO_MINI=2, SHUFFLE=False),
            "TRAIN_FILE": str(train),
            "SFT_FILE": "",
        },
        tmp_path,
    )
    (update,) = [r for r in metrics(out) if r["phase"] == "ppo"]
    assert update["hybrid/sft_prompts"] == 2  # every prompt fails a threshold of 2; two of them have a reference


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"MODE": "ppo"}, "SFT_FILE is ignored: it feeds the SFT side of MODE \"hybrid\" (here 'ppo')"),
        (
            {"HYBRID": "mix"},
            "SFT_FILE is ignored: HYBRID 'mix' trains SFT inside each update on the RL prompt's own reference "
            "(where its TRAIN_FILE row has one)",
        ),
    ],
)
def test_sft_file_where_unused_warns(extra, message, tiny_model, split, tmp_path, capsys):
    _, demos = split
    full = write_json(tmp_path / "full.json", DEMOS)  # rows with responses: gate and mix need them
    path = write_json(tmp_path / "c.json", {**config(tiny_model, split, tmp_path / "out", **extra), "TRAIN_FILE": str(full)})
    assert ht.main([str(path), "--check"]) == 0
    assert message in capsys.readouterr().err
