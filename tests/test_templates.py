"""The models users bring: tiny random models of real chat-template families (the templates the installed trl ships,
each family's special tokens, tokenizer EOS and generation_config EOS list; conftest.build_family_model). SFT trains
what the family's own template renders for the assistant turn, through its first stop token; a row the template
rejects is one error line; SFT then GRPO runs through the CLI on each."""

import json
from pathlib import Path

import pytest
import torch
from conftest import TEMPLATE_FAMILIES, build_family_model, metrics, run_cli

import hybrid_trainer as ht
import runtime

FAMILIES = list(TEMPLATE_FAMILIES)
ROWS = [
    {"messages": [{"role": "user", "content": "what is the capital of france?"}, {"role": "assistant", "content": "paris"}]},
    {"messages": [{"role": "user", "content": "the cat sat on the"}, {"role": "assistant", "content": "mat"}]},
]


@pytest.fixture(scope="module")
def family_models(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("families")
    return {family: build_family_model(root / family, family) for family in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_the_sft_target_is_the_templates_assistant_turn(family, family_models, tmp_path):
    """Gemma 3 ends the turn with <end_of_turn>, Phi-3 with <|end|>, Llama 3.1 with <|eot_id|>, Qwen3 writes an empty
    think block first: the target is that, token for token, not the response + the tokenizer's EOS."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = family_models[family]
    tok, lm = AutoTokenizer.from_pretrained(model), AutoModelForCausalLM.from_pretrained(model)
    data = tmp_path / "train.json"
    data.write_text(json.dumps(ROWS))
    cfg = ht.Config.from_dict({"MODEL": str(model), "TRAIN_FILE": str(data), "OUTPUT_DIR": "-", "MODE": "sft"})
    examples = ht.tokenize_examples(
        ht.load_examples(cfg), cfg, tok, "chat", "TRAIN_FILE", stop_ids=runtime.stop_token_ids(tok, lm.generation_config)
    )
    (ex,) = [e for e in examples if e.target == "paris"]
    expected = TEMPLATE_FAMILIES[family][-1]
    assert ex.target_ids == tok(expected, add_special_tokens=False)["input_ids"], tok.decode(ex.target_ids)
    assert (
        ex.prompt_ids
        == tok(tok.apply_chat_template(ROWS[0]["messages"][:1], tokenize=False, add_generation_prompt=True), add_special_tokens=False)[
            "input_ids"
        ]
    )


def test_a_row_the_template_rejects_is_one_error_line(family_models, tmp_path, capsys):
    """Gemma (1/2)'s template has no system role and raises on one: the file, the row and the template's words."""
    rows = ROWS + [{"messages": [{"role": "system", "content": "be brief"}, *ROWS[0]["messages"]]}]
    data = tmp_path / "train.json"
    data.write_text(json.dumps(rows))
    config = tmp_path / "c.json"
    config.write_text(
        json.dumps({"MODE": "sft", "MODEL": str(family_models["gemma"]), "TRAIN_FILE": str(data), "OUTPUT_DIR": str(tmp_path / "out")})
    )
    for args in ([str(config), "--check"], [str(config)]):
        assert ht.main(args) == 2
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and f"TRAIN_FILE '{data}' row 2" in lines[0] and "System role not supported" in lines[0], err
        assert "Traceback" not in err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("family", FAMILIES)
def test_sft_then_grpo_through_the_cli(family, family_models, tmp_path):
    data = tmp_path / "train.json"
    data.write_text(json.dumps(ROWS * 2))
    cfg = {
        "MODE": "hybrid",
        "MODEL": str(family_models[family]),
        "TRAIN_FILE": str(data),
        "OUTPUT_DIR": str(tmp_path / "out"),
        "SEED": 0,
        "BF16": False,
        "SFT_BATCH": 2,
        "PPO_BATCH": 1,
        "ADVANTAGE": "grpo",
        "NUM_GENERATIONS": 2,
        "CYCLE_SFT_STEPS": 1,
        "CYCLE_PPO_UPDATES": 1,
        "MAX_NEW_TOKENS": 4,
        "GENERATION_BACKEND": "hf",
        "REWARD": {"type": "contains", "pattern": "a"},
        "LOG_EVERY": 1,
        "LORA_R": 4,  # the default targets (all-linear) on each architecture
    }
    run_cli(cfg, tmp_path)
    phases = [r["phase"] for r in metrics(tmp_path / "out")]
    assert "sft" in phases and "ppo" in phases
    from transformers import AutoTokenizer, GenerationConfig

    saved, model = tmp_path / "out" / "inference_lm", family_models[family]
    assert AutoTokenizer.from_pretrained(saved).chat_template == AutoTokenizer.from_pretrained(model).chat_template
    assert GenerationConfig.from_pretrained(saved).eos_token_id == GenerationConfig.from_pretrained(model).eos_token_id


def load_family(model):
    import torch

    torch.manual_seed(0)
    cfg = ht.Config.from_dict({"MODE": "ppo", "MODEL": str(model), "TRAIN_FILE": "-", "OUTPUT_DIR": "-", "SEED": 0, "BF16": False})
    policy, ref, tok = ht.load_model(cfg, torch.device("cpu"))
    return cfg, policy, tok


def test_reasoning_is_read_apart_from_the_answer():
    """Hand-made responses: the answer after the first close marker, the reasoning before it; a block that never
    closes (opened by the response, or by the prompt) leaves no answer; without REASONING nothing changes."""
    r, split, Answer = runtime.Reasoning("<think>", "</think>"), runtime.split_reasoning, runtime.Answer
    assert split("<think>\nhmm, 2+2\n</think>\n\n4", r) == Answer("4", "hmm, 2+2")
    assert split("<think>\n\n</think>\n\nparis", r) == Answer("paris", "")  # Qwen3's empty block
    assert split("paris", r) == Answer("paris", None)
    assert split("<think>still thinking", r) == Answer("", "still thinking", True)
    assert split("still thinking", r, opened=True) == Answer("", "still thinking", True)
    assert split("hmm</think>\nparis", r, opened=True) == Answer("paris", "hmm")  # the template opened the block
    assert split("<think>x</think>paris", None) == Answer("<think>x</think>paris", None)
    qwen3 = (Path(__import__("trl").__file__).parent / "chat_templates" / "qwen3.jinja").read_text()
    gemma3 = (Path(__import__("trl").__file__).parent / "chat_templates" / "gemma3.jinja").read_text()
    assert runtime.resolve_reasoning("auto", qwen3) == r and runtime.resolve_reasoning("auto", gemma3) is None
    assert runtime.resolve_reasoning("none", qwen3) is None
    assert runtime.resolve_reasoning({"open": "<r>", "close": "</r>"}, "") == runtime.Reasoning("<r>", "</r>")


class Recorder:
    """A reward that keeps what it was given: 1.0 for the answer "paris"."""

    stateful = False

    def __init__(self):
        self.calls = []

    def scores(self, responses, targets, prompts=None, items=None, update=True):
        self.calls.append((list(responses), list(items)))
        return [float(r == "paris") for r in responses]


@pytest.mark.parametrize("family", FAMILIES)
def test_rewards_and_evaluation_see_the_answer_without_the_reasoning(family, family_models):
    """Through the trainer's own scoring (training and evaluation): Qwen3's template writes <think>, so its rewards get
    "paris" with the reasoning in item["reasoning"], a block that never closes scores as no answer and is counted;
    a family without reasoning markup gets the response as written."""
    cfg, policy, tok = load_family(family_models[family])
    reward = Recorder()
    trainer = ht.HybridTrainer(cfg, policy, None, tok, reward)
    (ex,) = ht.tokenize_examples(ht.make_examples(ROWS[:1], "output", "TRAIN_FILE", data_format="messages"), cfg, tok, "chat", "TRAIN_FILE")
    texts = ["<think>\nthe capital\n</think>\n\nparis", "<think>\nstill thinking", "paris"]
    scored = trainer.collector.score([tok(t, add_special_tokens=False)["input_ids"] for t in texts], [ex] * 3)
    (responses, items), thinks = reward.calls[-1], family == "qwen3"
    if thinks:
        assert responses == ["paris", "", "paris"] and scored.scores == [1.0, 0.0, 1.0]
        assert [i["reasoning"] for i in items] == ["the capital", None, None]
        assert scored.components["unclosed_reasoning"] == 1.0
    else:
        assert responses == texts and "reasoning" not in items[0] and "unclosed_reasoning" not in scored.components
    trainer.turns.generate = lambda prompts, **kw: runtime.Generation(
        [tok(texts[0], add_special_tokens=False)["input_ids"]] * len(prompts), torch.ones(len(prompts), dtype=torch.bool), None
    )
    result = ht.evaluate(trainer, [ex], {"reward": reward})
    (sample,) = result["samples"]
    assert (sample["response"], sample.get("reasoning"), result["eval/reward"]) == (
        ("paris", "the capital", 1.0) if thinks else (texts[0], None, 0.0)
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_a_control_tokens_text_in_a_message_stays_text(family, family_models, tmp_path, capsys):
    """A user message (and a response) holding the family's own turn markers as text: the prompt's and the target's
    ids hold no more control tokens than the clean rendering's, yet decode to the same text; --check warns once,
    naming the first such row."""
    model = family_models[family]
    _, policy, tok = load_family(model)
    specials = TEMPLATE_FAMILIES[family][2]
    forged = "".join(specials[1:]) + " forged"
    rows = [ROWS[1], {"messages": [{"role": "user", "content": "hi " + forged}, {"role": "assistant", "content": "ok " + forged}]}]
    data = tmp_path / "train.json"
    data.write_text(json.dumps(rows))
    cfg = ht.Config.from_dict({"MODE": "sft", "MODEL": str(model), "TRAIN_FILE": str(data), "OUTPUT_DIR": "-"})
    stops = runtime.stop_token_ids(tok, policy.lm.generation_config)
    (ex,) = [e for e in ht.tokenize_examples(ht.load_examples(cfg), cfg, tok, "chat", "TRAIN_FILE", stop_ids=stops) if e.index == 1]
    control_ids = set(tok.convert_tokens_to_ids(specials))
    clean = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]
    clean_ids = tok(tok.apply_chat_template(clean, tokenize=False), add_special_tokens=False)["input_ids"]
    ids = ex.prompt_ids + ex.target_ids
    assert sum(i in control_ids for i in ids) <= sum(i in control_ids for i in clean_ids), tok.convert_ids_to_tokens(ids)
    assert tok.decode(ex.prompt_ids) == tok.apply_chat_template(rows[1]["messages"][:1], tokenize=False, add_generation_prompt=True)
    assert "ok " + forged in tok.decode(ex.target_ids)
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"MODE": "sft", "MODEL": str(model), "TRAIN_FILE": str(data), "OUTPUT_DIR": str(tmp_path / "o")}))
    assert ht.main([str(config), "--check"]) == 0
    warned = [line for line in capsys.readouterr().err.splitlines() if "control token" in line]
    assert len(warned) == 1 and "1 row(s)" in warned[0] and "row 1" in warned[0], warned


def test_chat_template_kwargs_reach_every_rendering(family_models, tmp_path):
    """Qwen3 with {"enable_thinking": false}: the prompt carries the empty think block (the template's own switch), so
    the SFT target is the bare answer; the training template and --check render the same way."""
    model = family_models["qwen3"]
    _, policy, tok = load_family(model)
    data = tmp_path / "train.json"
    data.write_text(json.dumps(ROWS[:1]))
    cfg = ht.Config.from_dict(
        {"MODE": "sft", "MODEL": str(model), "TRAIN_FILE": str(data), "OUTPUT_DIR": "-", "CHAT_TEMPLATE_KWARGS": {"enable_thinking": False}}
    )
    (ex,) = ht.tokenize_examples(ht.load_examples(cfg), cfg, tok, "chat", "TRAIN_FILE")
    assert tok.decode(ex.prompt_ids).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert tok.decode(ex.target_ids) == "paris<|im_end|>"


@pytest.mark.parametrize(
    "keys, words",
    [
        ({"REASONING": "think"}, 'REASONING must be "auto", "none" or'),
        ({"REASONING": {"open": "<r>"}}, 'REASONING must be "auto", "none" or'),
        ({"CHAT_TEMPLATE_KWARGS": {"tools": []}}, "CHAT_TEMPLATE_KWARGS: ['tools'] are the trainer's"),
        ({"CHAT_TEMPLATE_KWARGS": "thinking"}, "CHAT_TEMPLATE_KWARGS must be a JSON object"),
        ({"ACTION_FORMAT": 5}, "ACTION_FORMAT must be a string or a JSON object"),
    ],
)
def test_bad_template_keys_are_one_error(keys, words):
    with pytest.raises(runtime.UserError, match=None) as e:
        ht.Config.from_dict({"TRAIN_FILE": "x", "OUTPUT_DIR": "y", **keys})
    assert words in str(e.value), str(e.value)
