"""The models users bring: tiny random models of real chat-template families (the templates the installed trl ships,
each family's special tokens, tokenizer EOS and generation_config EOS list; conftest.build_family_model). SFT trains
what the family's own template renders for the assistant turn, through its first stop token; a row the template
rejects is one error line; SFT then GRPO runs through the CLI on each."""

import json

import pytest
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
    }
    run_cli(cfg, tmp_path)
    phases = [r["phase"] for r in metrics(tmp_path / "out")]
    assert "sft" in phases and "ppo" in phases
    assert (tmp_path / "out" / "inference_lm" / "generation_config.json").is_file()
