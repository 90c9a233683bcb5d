"""LoRA: the reference is what it claims (base with the adapter disabled, or the frozen starting adapter),
ratio 1 and KL 0 at the first update, learning, small checkpoints with exact resume, a merged model that
reproduces the policy, and clear errors."""

import json
import shutil

import pytest
import torch
from conftest import EXACT_PPO, YesFraction, comparable, max_diff, metrics, run_cli, trainer_for
from safetensors.torch import load_file

import runtime


def first_update(trainer, examples):
    responses, _ = trainer.generate([e.prompt_ids for e in examples])
    return trainer.ppo_step([e.prompt_ids for e in examples], responses, [1.0] * len(examples))


def test_fresh_adapter_reference_is_the_base_without_a_copy(tiny_model, tiny_data):
    trainer, examples = trainer_for(
        {"LORA_R": 4, "PPO_BATCH": 8, "PPO_MINI": 4, "MAX_NEW_TOKENS": 5, "LR_PPO": 1e-2}, tiny_model, tiny_data, YesFraction()
    )
    assert isinstance(trainer.ref_lm, runtime.AdapterReference) and trainer.ref_lm.adapter is None
    assert trainer.ref_lm.lm is trainer.policy.lm  # the same module: no second copy of the base weights
    trainable = {n for n, p in trainer.policy.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("v_head") for n in trainable)
    stats = first_update(trainer, examples)
    assert stats["objective/kl"] == 0.0
    assert abs(stats["ppo/policy/ratio_first_minibatch"] - 1.0) < 1e-6
    assert first_update(trainer, examples)["objective/kl"] != 0.0  # the adapter moved; the reference did not


@pytest.fixture
def trained_adapter(tiny_model, tmp_path):
    """A LoRA adapter with non-zero weights, saved the peft way, whose base is the tiny model's local path."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], init_lora_weights=False))
    path = tmp_path / "adapter"
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(path)
    assert json.loads((path / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_model)
    return path


def test_adapter_as_model_is_its_own_reference(trained_adapter, tiny_model, tiny_data):
    trainer, examples = trainer_for({"PPO_BATCH": 8, "PPO_MINI": 4, "MAX_NEW_TOKENS": 5}, trained_adapter, tiny_data, YesFraction())
    assert trainer.ref_lm.adapter == "ref"
    ids = torch.tensor([examples[0].prompt_ids])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        policy = trainer.policy.lm(input_ids=ids, attention_mask=mask).logits
        reference = trainer.ref_lm(input_ids=ids, attention_mask=mask).logits
        with trainer.policy.lm.disable_adapter():
            bare = trainer.policy.lm(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(policy, reference)
    assert (policy - bare).abs().max() > 1e-3  # the adapter matters: the bare base would be the wrong reference
    stats = first_update(trainer, examples)
    assert stats["objective/kl"] == 0.0  # not the huge KL of TRL's 'adapter disabled' pitfall
    assert abs(stats["ppo/policy/ratio_first_minibatch"] - 1.0) < 1e-6
    assert all(not p.requires_grad for n, p in trainer.policy.named_parameters() if ".ref." in n)


def test_ppo_with_lora_raises_reward(tiny_lora_model, tiny_data):
    # tiny_lora_model: embeddings at init scale 0.2; at 0.02 the frozen tied embeddings cap p("yes") near 1%
    trainer, examples = trainer_for(
        {"LORA_R": 16, "LORA_ALPHA": 32, "PPO_BATCH": 16, "PPO_MINI": 8, "LR_PPO": 1e-2, "INIT_KL_COEF": 0.01, "MAX_NEW_TOKENS": 6},
        tiny_lora_model,
        tiny_data,
        YesFraction(),
    )
    batch = (examples * 2)[:16]
    rewards = [trainer.ppo_update(batch)["reward/mean"] for _ in range(25)]
    assert sum(rewards[:3]) / 3 < 0.2, rewards
    assert sum(rewards[-3:]) / 3 > 0.6, rewards


LORA_HYBRID = {
    "MODE": "hybrid",
    "SEED": 5,
    "LORA_R": 4,
    "REF_UPDATE": "cycle",
    "SFT_BATCH": 2,
    "PPO_BATCH": 2,
    "PPO_MINI": 1,
    "MAX_NEW_TOKENS": 4,
    "LR_SFT": 1e-2,
    "LR_PPO": 1e-2,
    "SAVE_EVERY": 1,
    "KEEP_CHECKPOINTS": 20,
    "KEEP_CHECKPOINTS_AT_END": True,
    "REWARD": {"type": "contains", "pattern": "yes"},
    **EXACT_PPO,
}


def test_lora_checkpoints_hold_only_trainable_weights_and_resume_exactly(tiny_model, tiny_data, tmp_path):
    base = {**LORA_HYBRID, "MODEL": str(tiny_model), "TRAIN_FILE": str(tiny_data)}
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_cli({**base, "OUTPUT_DIR": str(straight)}, tmp_path)
    checkpoint = straight / "checkpoints" / "step-3"
    weights = load_file(str(checkpoint / "policy.safetensors"))
    assert weights and all("lora_" in k or k.startswith("v_head") for k in weights)  # no base weights
    assert all("lora_" in k for k in load_file(str(checkpoint / "reference.safetensors")))  # the moving "ref" adapter
    shutil.copytree(checkpoint, resumed / "checkpoints" / "step-3")
    (resumed / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in metrics(straight)[:3]))
    run_cli({**base, "OUTPUT_DIR": str(resumed)}, tmp_path)
    assert comparable(metrics(resumed)) == comparable(metrics(straight))
    assert max_diff(straight / "inference_lm" / "model.safetensors", resumed / "inference_lm" / "model.safetensors") <= 1e-6


def test_saved_adapter_and_merged_model_reproduce_the_policy(tiny_model, tiny_data, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    run_cli(
        {
            "MODE": "sft",
            "MODEL": str(tiny_model),
            "TRAIN_FILE": str(tiny_data),
            "OUTPUT_DIR": str(out),
            "SEED": 0,
            "LORA_R": 4,
            "LR_SFT": 1e-2,
            "BF16": False,
        },
        tmp_path,
    )  # fp32: merged = adapter policy to 1e-5
    assert {p.name for p in (out / "ppo_full").iterdir()} >= {"adapter_model.safetensors", "adapter_config.json", "trainer_config.json"}
    assert not (out / "ppo_full" / "value_head.safetensors").exists()  # SFT never trained it
    ids = torch.tensor([[5, 17, 42, 9, 100, 3]])
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    with torch.no_grad():
        base_logits = base(ids).logits
        policy = PeftModel.from_pretrained(base, out / "ppo_full").eval()
        policy_logits = policy(ids).logits
        merged_logits = AutoModelForCausalLM.from_pretrained(out / "inference_lm")(ids).logits
    assert (policy_logits - base_logits).abs().max() > 1e-3  # training changed the policy
    torch.testing.assert_close(merged_logits, policy_logits, atol=1e-5, rtol=1e-5)


def test_lora_dropout_warns(tiny_model, tiny_data, tmp_path):
    proc = run_cli(
        {
            "MODE": "sft",
            "MODEL": str(tiny_model),
            "TRAIN_FILE": str(tiny_data),
            "OUTPUT_DIR": str(tmp_path / "o"),
            "LORA_R": 2,
            "LORA_DROPOUT": 0.1,
        },
        tmp_path,
    )
    assert proc.stderr.count("LORA_DROPOUT=0.1") == 1


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"LORA_R": -1}, "LORA_R must be >= 0"),
        ({"LORA_R": 4, "LORA_TARGETS": ["no_such_module"]}, "LORA_TARGETS ['no_such_module'] matches no module of MODEL"),
        ({"LORA_R": 4, "LORA_TARGETS": "q_proj"}, 'LORA_TARGETS must be "all-linear" or a non-empty list'),
        ({"LORA_DROPOUT": 1.0}, "LORA_DROPOUT must be in [0, 1)"),
    ],
)
def test_bad_lora_settings(overrides, message, tiny_model, tiny_data, tmp_path):
    proc = run_cli(
        {"MODE": "sft", "MODEL": str(tiny_model), "TRAIN_FILE": str(tiny_data), "OUTPUT_DIR": str(tmp_path / "o"), **overrides},
        tmp_path,
        check=False,
    )
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and message in proc.stderr, proc.stderr
    assert proc.stderr.count("\n") == 1
    if "TARGETS" in message and "matches" in message:
        assert "its linear modules: c_attn, c_fc, c_proj" in proc.stderr
    assert not (tmp_path / "o").exists()


def test_adapter_whose_base_is_not_available_offline(trained_adapter, tiny_data, tmp_path):
    config = json.loads((trained_adapter / "adapter_config.json").read_text())
    (trained_adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "meta-llama/Llama-3-8B"}))
    proc = run_cli(
        {"MODE": "sft", "MODEL": str(trained_adapter), "TRAIN_FILE": str(tiny_data), "OUTPUT_DIR": str(tmp_path / "o")},
        tmp_path,
        check=False,
    )
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "is a LoRA adapter whose base model 'meta-llama/Llama-3-8B' is not available offline" in proc.stderr
