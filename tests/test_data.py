"""The ecosystem's formats: data files (JSON, JSONL, CSV, Parquet, save_to_disk), data formats (fields,
prompt_completion, messages), bad data, TensorBoard events, the model card, and rewards of the user's own."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import EXACT_PPO, interrupted_copy, metrics, write_json

import hybrid_trainer as ht
import rewards

CONVERSATION = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "say yes"},
    {"role": "assistant", "content": "yes"},
    {"role": "user", "content": "again"},
    {"role": "assistant", "content": "yes yes"},
]
PC_STANDARD = [{"prompt": f"say yes {i}:", "completion": " yes yes"} for i in range(4)]
PC_CHAT = [
    {"prompt": [{"role": "user", "content": f"say yes {i}"}], "completion": [{"role": "assistant", "content": "yes"}]} for i in range(4)
]
MESSAGES = [{"messages": CONVERSATION}] * 4


def write(tmp_path, rows, kind):
    """rows -> a file (json, jsonl, csv, parquet) or a save_to_disk directory (disk, diskdict: train + test)."""
    import datasets

    path = tmp_path / f"data.{kind}"
    if kind == "json":
        write_json(path, rows)
    elif kind == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif kind == "csv":
        datasets.Dataset.from_list(rows).to_csv(str(path), index=False)
    elif kind == "parquet":
        datasets.Dataset.from_list(rows).to_parquet(str(path))
    elif kind == "disk":
        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    else:
        datasets.DatasetDict({"train": datasets.Dataset.from_list(rows), "test": datasets.Dataset.from_list(rows[:2])}).save_to_disk(
            str(path)
        )
    return path


def load(tmp_path, rows, kind, tokenizer, **cfg):
    path = write(tmp_path, rows, kind)
    config = ht.Config.from_dict({"TRAIN_FILE": str(path), "OUTPUT_DIR": "-", "SEED": 0, "SHUFFLE": False, **cfg})
    examples, fmt = ht.load_data(config, "TRAIN_FILE")
    return ht.tokenize_examples(examples, config, tokenizer, "chat", "TRAIN_FILE"), fmt


@pytest.fixture(scope="module")
def tok(tiny_chat_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_chat_model)


@pytest.mark.parametrize("kind", ["json", "jsonl", "csv", "parquet", "disk", "diskdict"])
def test_prompt_completion_in_every_file_kind(kind, tok, tmp_path):
    examples, fmt = load(tmp_path, PC_STANDARD, kind, tok)
    assert fmt == "prompt_completion" and len(examples) == 4
    assert examples[1].prompt == "say yes 1:" and examples[1].target == " yes yes"  # a plain prompt is used as is (TRL)
    assert examples[1].target_ids[-1] == tok.eos_token_id


@pytest.mark.parametrize("kind", ["jsonl", "parquet", "diskdict"])
def test_messages_and_chat_prompt_completion(kind, tok, tmp_path):
    examples, fmt = load(tmp_path, MESSAGES, kind, tok)
    assert fmt == "messages"
    # everything before the last assistant turn, system included, rendered by the chat template; the response is the last turn
    assert examples[0].prompt == ("<|system|>be brief<|end|><|user|>say yes<|end|><|assistant|>yes<|end|><|user|>again<|end|><|assistant|>")
    assert examples[0].target == "yes yes" and examples[0].question == "again"
    examples, fmt = load(tmp_path, PC_CHAT, kind, tok)
    assert fmt == "prompt_completion"
    assert examples[2].prompt == "<|user|>say yes 2<|end|><|assistant|>" and examples[2].target == "yes"


def test_fields_format_and_forced_format(tok, tmp_path):
    examples, fmt = load(tmp_path, [{"instruction": "say yes", "output": "yes"}], "csv", tok)
    assert fmt == "fields" and examples[0].prompt == "<|user|>say yes<|end|><|assistant|>"
    # DATA_FORMAT fields on prompt/completion columns: `completion` is then just another key
    examples, fmt = load(tmp_path, PC_STANDARD, "json", tok, DATA_FORMAT="fields", SELECT_OUTPUT="completion")
    assert fmt == "fields" and examples[0].target == " yes yes"


def test_sft_all_turns_trains_every_assistant_turn(tiny_chat_model, tmp_path):
    path = write(tmp_path, MESSAGES[:1], "jsonl")
    base = {"MODE": "sft", "MODEL": str(tiny_chat_model), "TRAIN_FILE": str(path), "OUTPUT_DIR": "-", "SEED": 0}
    counts = {}
    for all_turns in (False, True):
        cfg = ht.Config.from_dict({**base, "SFT_ALL_TURNS": all_turns})
        policy, ref, tok = ht.load_model(cfg, torch.device("cpu"))
        (ex,) = ht.tokenize_examples(ht.load_examples(cfg), cfg, tok, "chat", "TRAIN_FILE")
        counts[all_turns] = ht.HybridTrainer(cfg, policy, ref, tok, None).sft_step([ex])["sft/tokens"]
        if all_turns:
            first = ex.sft_pairs[0]
            assert tok.decode(first[0]) == "<|system|>be brief<|end|><|user|>say yes<|end|><|assistant|>"
            assert tok.decode(first[1]) == "yes<|end|>"
    assert counts[True] == counts[False] + len(tok("yes")["input_ids"]) + 1  # the earlier turn + its end token


def test_split_selection(tok, tmp_path):
    path = write(tmp_path, PC_STANDARD, "diskdict")
    cfg = ht.Config.from_dict({"TRAIN_FILE": str(path), "EVAL_FILE": str(path), "OUTPUT_DIR": "-"})
    assert len(ht.load_data(cfg, "TRAIN_FILE")[0]) == 4 and len(ht.load_data(cfg, "EVAL_FILE")[0]) == 2  # train / test
    cfg = ht.Config.from_dict({"TRAIN_FILE": str(path), "TRAIN_SPLIT": "test", "OUTPUT_DIR": "-"})
    assert len(ht.load_data(cfg, "TRAIN_FILE")[0]) == 2


# ---- bad data: one error line naming the file, the row and the column, exit 2 ----
def bad_parquet(t):
    (t / "bad.parquet").write_text("not parquet")
    return t / "bad.parquet"


BAD_DATA = [
    ("missing column", lambda t: write(t, [{"prompt": "a"}], "parquet"), "row 0 has no column 'completion'"),
    (
        "no assistant turn",
        lambda t: write(t, [{"messages": [{"role": "user", "content": "hi"}]}], "jsonl"),
        "row 0, column 'messages': no assistant turn",
    ),
    (
        "unknown role",
        lambda t: write(t, [{"messages": [{"role": "bot", "content": "hi"}]}], "json"),
        "row 0, column 'messages'[0]: unknown role 'bot'",
    ),
    (
        "empty completion",
        lambda t: write(t, PC_STANDARD + [{"prompt": "a", "completion": ""}], "csv"),
        "row 4, column 'completion': empty or not text",
    ),
    (
        "non-string content",
        lambda t: write_json(t / "d.json", [{"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]}]),
        "row 0, column 'messages'[0].content is int",
    ),
    ("unreadable parquet", bad_parquet, "cannot be read as Parquet"),
    ("DatasetDict without the split", lambda t: write(t, PC_STANDARD, "diskdict"), "has no split 'valid' (its splits: ['test', 'train'])"),
]


@pytest.mark.parametrize("case, build, message", BAD_DATA, ids=[c[0] for c in BAD_DATA])
def test_bad_data_gives_one_error_line(case, build, message, tiny_chat_model, tmp_path, capsys):
    path = build(tmp_path)
    cfg = {"MODE": "sft", "MODEL": str(tiny_chat_model), "TRAIN_FILE": str(path), "OUTPUT_DIR": str(tmp_path / "out"), "SEED": 0}
    if "split" in case:
        cfg["TRAIN_SPLIT"] = "valid"
    if case == "missing column":
        cfg["DATA_FORMAT"] = "prompt_completion"
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    assert ht.main([str(tmp_path / "c.json")]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0] and str(path.name) in lines[0], err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def test_check_prints_format_and_one_rendered_example(tiny_chat_model, tmp_path, capsys):
    path = write(tmp_path, MESSAGES, "jsonl")
    (tmp_path / "c.json").write_text(
        json.dumps({"MODEL": str(tiny_chat_model), "TRAIN_FILE": str(path), "OUTPUT_DIR": str(tmp_path / "out"), "MODE": "sft"})
    )
    assert ht.main([str(tmp_path / "c.json"), "--check"]) == 0
    out = capsys.readouterr().out
    assert "data: DATA_FORMAT messages (auto-detected" in out
    assert "--- prompt ---\n<|system|>be brief<|end|><|user|>say yes" in out
    assert "--- response ---\nyes yes<|end|>\n--- trained: " in out  # as SFT trains it: the template's turn, its end
    assert "(as the chat template renders the assistant turn); a response ends at any of ['<|end|>']" in out


# ---- TensorBoard, model card ----
def scalars(logdir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return acc, [(e.step, e.value) for e in acc.Scalars(tag)]


def test_tensorboard_matches_metrics_also_after_resume_and_model_card(tiny_model, tiny_data, tmp_path):
    out = tmp_path / "out"
    cfg = {
        "MODE": "hybrid",
        "MODEL": str(tiny_model),
        "TRAIN_FILE": str(tiny_data),
        "EVAL_FILE": str(tiny_data),
        "EVAL_SAMPLES": 2,
        "OUTPUT_DIR": str(out),
        "SEED": 0,
        "SFT_BATCH": 2,
        "PPO_BATCH": 2,
        "MAX_NEW_TOKENS": 4,
        "REPORT_TO": ["tensorboard"],
        "SAVE_EVERY": 1,
        "KEEP_CHECKPOINTS": 10,
        "KEEP_CHECKPOINTS_AT_END": True,
        "REWARD": {"type": "contains", "pattern": "yes"},
    }
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    assert ht.main([str(tmp_path / "c.json")]) == 0

    def check(run_dir):
        records = [r for r in metrics(run_dir) if r["phase"] != "eval"]
        for tag in ("sft/loss", "reward/mean", "objective/kl"):
            acc, events = scalars(run_dir / "tensorboard", tag)
            expected = [(r["step"], r[tag]) for r in records if tag in r]
            assert [s for s, _ in events] == [s for s, _ in expected], tag  # every step once
            assert [v for _, v in events] == pytest.approx([v for _, v in expected], rel=1e-6)
        assert {"eval/samples/text_summary", "config/text_summary"} <= set(acc.Tags()["tensors"])

    check(out)
    # an interrupted run: its events reach step 8, its checkpoint step 3; resuming rewrites 4..8 once
    killed = interrupted_copy(out, tmp_path / "killed", 3)
    (tmp_path / "k.json").write_text(json.dumps({**cfg, "OUTPUT_DIR": str(killed)}))
    assert ht.main([str(tmp_path / "k.json")]) == 0
    check(killed)

    card = (out / "inference_lm" / "README.md").read_text()
    header = card.split("---\n")[1]
    import yaml

    meta = yaml.safe_load(header)
    assert meta["base_model"] == str(tiny_model) and meta["library_name"] == "transformers"
    assert {"hybrid-trainer", "sft", "ppo", "hybrid-alternate"} <= set(meta["tags"])
    assert "| reward |" in card and str(tiny_data) in card and "AutoModelForCausalLM.from_pretrained" in card


# ---- rewards of the user's own ----
USER_REWARDS = """
def score(responses, targets, prompts, items):
    return [float(r.count("yes")) for r in responses]

def two_args(responses, targets):
    return [0.0] * len(responses)

def too_few(responses, targets, prompts, items):
    return [1.0]

def words(responses, targets, prompts, items):
    return ["high"] * len(responses)
"""


def user_file(tmp_path):
    (tmp_path / "my_rewards.py").write_text(USER_REWARDS)
    return str(tmp_path / "my_rewards.py")


def test_python_reward_needs_the_opt_in_and_is_used_with_it(tmp_path):
    spec = {"type": "python", "path": user_file(tmp_path), "function": "score"}
    with pytest.raises(rewards.RewardSpecError, match="set TRUST_REMOTE_CODE: true"):
        rewards.make_reward(spec)
    reward = rewards.make_reward(spec, trust_remote_code=True)
    assert reward.scores(["yes yes", "no"], ["a", "b"], ["p", "q"], [{}, {}]) == [2.0, 0.0]


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"path": "nope.py"}, "does not exist"),
        ({"function": "scor"}, "has no function 'scor' (its functions: ['score', 'too_few', 'two_args', 'words'])"),
        ({"function": "two_args"}, "must accept (responses, targets, prompts, items)"),
        ({"function": "words"}, "returned 'high' for response 0: expected a finite number"),
    ],
)
def test_python_reward_failures_at_load(spec, message, tmp_path):
    full = {"type": "python", "path": user_file(tmp_path), **spec}
    with pytest.raises(rewards.RewardSpecError) as e:
        rewards.make_reward(full, trust_remote_code=True)
    assert message in str(e.value)


def test_python_reward_through_the_cli(tiny_model, tiny_data, tmp_path, capsys):
    base = {
        "MODE": "ppo",
        "MODEL": str(tiny_model),
        "TRAIN_FILE": str(tiny_data),
        "SEED": 0,
        "PPO_BATCH": 4,
        "MAX_NEW_TOKENS": 4,
        "EPOCHS": 1,
        **EXACT_PPO,
        "REWARD": {"type": "python", "path": user_file(tmp_path)},
    }
    (tmp_path / "c.json").write_text(json.dumps({**base, "OUTPUT_DIR": str(tmp_path / "a")}))
    assert ht.main([str(tmp_path / "c.json")]) == 2  # refused without the opt-in, before any weights load
    assert "set TRUST_REMOTE_CODE: true" in capsys.readouterr().err
    # a function that passes the one-item trial but returns the wrong count in training: steps skipped, reported
    bad = {
        **base,
        "TRUST_REMOTE_CODE": True,
        "REWARD": {"type": "python", "path": user_file(tmp_path), "function": "too_few"},
        "OUTPUT_DIR": str(tmp_path / "b"),
    }
    (tmp_path / "b.json").write_text(json.dumps(bad))
    assert ht.main([str(tmp_path / "b.json")]) == 0
    err = capsys.readouterr().err
    assert "skipped: reward raised ValueError: too_few() returned 1 scores for 4 responses" in err
    assert all(r.get("ppo/skipped") == 1 for r in metrics(tmp_path / "b"))


def test_rewards_module_does_not_import_the_trainer():
    code = "import sys, rewards; print('hybrid_trainer' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ht.Path(ht.__file__).parent)
    assert out.stdout.strip() == "False", out.stderr
    assert "hybrid_trainer" not in ht.Path(rewards.__file__).read_text()
