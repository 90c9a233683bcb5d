"""Tier 2: config and data validation through the CLI. Every bad input: exit 2, one `error:` line naming
the problem, no traceback, nothing written to OUTPUT_DIR."""

import dataclasses
import json
import subprocess
import sys

import pytest
from conftest import ENV, ROOT, write_tiny_gguf

import hybrid_trainer as ht
import runtime

GOOD_ITEMS = [{"instruction": f"say yes {i}", "output": "yes"} for i in range(4)]


@pytest.fixture
def env(tmp_path, tiny_model):
    """A valid config (written on demand with overrides) and its files."""
    train = tmp_path / "train.json"
    train.write_text(json.dumps(GOOD_ITEMS))
    base = {
        "MODE": "sft",
        "MODEL": str(tiny_model),
        "TRAIN_FILE": str(train),
        "OUTPUT_DIR": str(tmp_path / "out"),
        "MAX_NEW_TOKENS": 4,
        "SEED": 0,
    }

    def write(overrides=None, raw=None, drop=()):
        cfg = {**base, **(overrides or {})}
        for k in drop:
            cfg.pop(k)
        path = tmp_path / "config.json"
        path.write_text(raw if raw is not None else json.dumps(cfg))
        return path

    return tmp_path, write


def data_file(tmp_path, text, name="bad.json"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def empty_dir(tmp_path):
    path = tmp_path / "not_a_model"
    path.mkdir()
    return str(path)


# (case id, how to build the config, substring the error must contain)
BAD_INPUTS = [
    ("malformed config JSON", lambda t: {"raw": '{"MODE": "sft",, }'}, "not valid JSON"),
    ("config is a list", lambda t: {"raw": "[1, 2]"}, "must be a JSON object"),
    ("unknown key with suggestion", lambda t: {"overrides": {"LR_SFTT": 1e-4}}, "did you mean 'LR_SFT'"),
    ("bad MODE", lambda t: {"overrides": {"MODE": "rlhf"}}, "MODE must be 'sft', 'ppo' or 'hybrid'"),
    ("int key given a string", lambda t: {"overrides": {"SFT_BATCH": "four"}}, "SFT_BATCH must be an integer"),
    ("int key given a fraction", lambda t: {"overrides": {"EPOCHS": 1.5}}, "EPOCHS must be an integer"),
    ("float key given a bool", lambda t: {"overrides": {"LR_SFT": True}}, "LR_SFT must be a number"),
    ("bool key given junk", lambda t: {"overrides": {"WHITEN_REWARDS": "maybe"}}, "WHITEN_REWARDS must be true or false"),
    ("BF16 given junk", lambda t: {"overrides": {"BF16": "maybe"}}, 'BF16 must be true, false or "auto"'),
    ("str key given a number", lambda t: {"overrides": {"SELECT_OUTPUT": 3}}, "SELECT_OUTPUT must be a string"),
    ("null for a required number", lambda t: {"overrides": {"PPO_BATCH": None}}, "PPO_BATCH must not be null"),
    ("batch size zero", lambda t: {"overrides": {"SFT_BATCH": 0}}, "SFT_BATCH must be >= 1"),
    ("negative learning rate", lambda t: {"overrides": {"LR_SFT": -1e-5}}, "LR_SFT must be > 0"),
    ("PERCENT zero", lambda t: {"overrides": {"PERCENT": 0}}, "PERCENT must be in (0, 100]"),
    ("PERCENT over 100", lambda t: {"overrides": {"PERCENT": 150}}, "PERCENT must be in (0, 100]"),
    ("PPO_MINI above PPO_BATCH", lambda t: {"overrides": {"PPO_BATCH": 2, "PPO_MINI": 4}}, "PPO_MINI must be between 1 and PPO_BATCH"),
    ("GRAD_ACCUM above batch", lambda t: {"overrides": {"SFT_BATCH": 2, "GRAD_ACCUM": 3}}, "GRAD_ACCUM (3) must not exceed"),
    ("BF16 and FP16", lambda t: {"overrides": {"BF16": True, "FP16": "true"}}, "BF16 and FP16 are both true"),
    ("TOP_P above 1", lambda t: {"overrides": {"TOP_P": 1.5}}, "TOP_P must be in (0, 1]"),
    ("TEMPERATURE zero", lambda t: {"overrides": {"TEMPERATURE": 0}}, "TEMPERATURE must be > 0"),
    ("bad KL_PENALTY", lambda t: {"overrides": {"KL_PENALTY": "js"}}, "KL_PENALTY must be one of kl, abs, mse, k2, k3, full"),
    ("SHUFFLE names a script", lambda t: {"overrides": {"SHUFFLE": "shuffle.py"}}, "scripts named in a config are never run"),
    ("REWARD not an object", lambda t: {"overrides": {"MODE": "ppo", "REWARD": "cosine"}}, "REWARD must be a JSON object"),
    ("unknown reward type", lambda t: {"overrides": {"MODE": "ppo", "REWARD": {"type": "cosin_sts"}}}, "did you mean 'cosine_sts'"),
    (
        "bad reward field value",
        lambda t: {"overrides": {"MODE": "ppo", "REWARD": {"type": "rouge", "variant": "rouge3"}}},
        "variant must be one of",
    ),
    (
        "unknown reward field",
        lambda t: {"overrides": {"MODE": "ppo", "REWARD": {"type": "contains", "patern": "x"}}},
        "did you mean 'pattern'",
    ),
    (
        "bad component weight",
        lambda t: {"overrides": {"MODE": "ppo", "REWARD": {"type": "weighted_sum", "components": [{"type": "bleu", "weight": "high"}]}}},
        "weight must be a number",
    ),
    (
        "reward model not offline",
        lambda t: {"overrides": {"MODE": "ppo", "REWARD": {"type": "perplexity", "model": "gpt2"}}},
        'Use "reference"',
    ),
    ("TRAIN_FILE missing", lambda t: {"overrides": {"TRAIN_FILE": str(t / "nope.json")}}, "does not exist"),
    ("TRAIN_FILE not given", lambda t: {"drop": ["TRAIN_FILE"]}, "TRAIN_FILE is required"),
    ("TRAIN_FILE is a directory", lambda t: {"overrides": {"TRAIN_FILE": str(t)}}, "is a directory but not a dataset written by datasets"),
    ("TRAIN_FILE malformed", lambda t: {"overrides": {"TRAIN_FILE": data_file(t, '[{"a": 1,]')}}, "is not valid JSON"),
    (
        "TRAIN_FILE bad JSONL line",
        lambda t: {"overrides": {"TRAIN_FILE": data_file(t, '{"instruction": "a", "output": "b"}\n{oops\n', "d.jsonl")}},
        "line 2 is not valid JSON",
    ),
    ("empty dataset", lambda t: {"overrides": {"TRAIN_FILE": data_file(t, "[]")}}, "holds no items"),
    (
        "non-object item",
        lambda t: {"overrides": {"TRAIN_FILE": data_file(t, json.dumps(GOOD_ITEMS + ["text"]))}},
        "row 4 is a str, expected a JSON object",
    ),
    (
        "missing output key",
        lambda t: {"overrides": {"TRAIN_FILE": data_file(t, json.dumps([{"instruction": "x", "answer": "y"}]))}},
        "row 0 has no output key 'output'",
    ),
    (
        "empty output",
        lambda t: {"overrides": {"TRAIN_FILE": data_file(t, json.dumps(GOOD_ITEMS + [{"instruction": "x", "output": "  "}]))}},
        "row 4, column 'output': empty or non-text output",
    ),
    ("MODEL path missing", lambda t: {"overrides": {"MODEL": str(t / "no_model")}}, "not found"),
    ("MODEL dir not a model", lambda t: {"overrides": {"MODEL": empty_dir(t)}}, "is a directory but not a model"),
    ("MODEL a plain file", lambda t: {"overrides": {"MODEL": data_file(t, "x", "weights.bin")}}, "is a file but not a .gguf model"),
    ("OUTPUT_DIR is a file", lambda t: {"overrides": {"OUTPUT_DIR": data_file(t, "x", "taken")}}, "is a file, expected a directory"),
    ("RESUME not a checkpoint", lambda t: {"overrides": {"RESUME": str(t)}}, "is not a checkpoint directory"),
    ("FP16 without CUDA", lambda t: {"overrides": {"FP16": True}}, "FP16 needs a CUDA GPU"),
    ("no prompt fits MAXSEQ", lambda t: {"overrides": {"MAXSEQ": 3}}, "no item has a prompt shorter than MAXSEQ=3"),
    ("EVAL_FILE missing", lambda t: {"overrides": {"EVAL_FILE": str(t / "eval.json")}}, "EVAL_FILE"),
    ("OUTPUT_DIR not creatable", lambda t: {"overrides": {"OUTPUT_DIR": "/proc/x/out"}}, "OUTPUT_DIR '/proc/x/out' is not writable"),
    ("OUTPUT_DIR under a file", lambda t: {"overrides": {"OUTPUT_DIR": data_file(t, "x", "afile") + "/out"}}, "is a file, not a directory"),
    (
        "CACHE_DIR not writable",
        lambda t: {"overrides": {"MODEL": str(write_tiny_gguf(t / "m.gguf")), "CACHE_DIR": "/proc/x"}},
        "CACHE_DIR '/proc/x' is not writable",
    ),
    ("LORA_R negative", lambda t: {"overrides": {"LORA_R": -4}}, "LORA_R must be >= 0"),
    (
        "LORA_TARGETS names no module",
        lambda t: {"overrides": {"LORA_R": 4, "LORA_TARGETS": ["q_proj"]}},
        "its linear modules: c_attn, c_fc, c_proj",
    ),
    ("FSDP in one process", lambda t: {"overrides": {"FSDP": True}}, "FSDP is true but this is a single process"),
    ("unknown ADVANTAGE", lambda t: {"overrides": {"ADVANTAGE": "grop"}}, "did you mean 'grpo'"),
    ("unknown HYBRID", lambda t: {"overrides": {"HYBRID": "gated"}}, "did you mean 'gate'"),
    ("unknown LOSS_AGG", lambda t: {"overrides": {"LOSS_AGG": "token-mean"}}, "did you mean 'token_mean'"),
    ("group estimator with G = 1", lambda t: {"overrides": {"MODE": "ppo", "ADVANTAGE": "rloo"}}, "set NUM_GENERATIONS >= 2"),
    ("CLIPRANGE_HIGH below CLIPRANGE", lambda t: {"overrides": {"CLIPRANGE_HIGH": 0.1}}, "CLIPRANGE_HIGH (0.1) must be >= CLIPRANGE (0.2)"),
    ("MIX_COEF above 1", lambda t: {"overrides": {"MIX_COEF": 1.5}}, "MIX_COEF must be in [0, 1], got 1.5"),
    ("KL full in the loss", lambda t: {"overrides": {"KL_IN": "loss", "KL_PENALTY": "full"}}, "works only with KL_IN"),
    (
        "tool_call without a tool schema",
        lambda t: {
            "overrides": {
                "MODE": "ppo",
                "TRAIN_FILE": str(ROOT / "data" / "tool_train.json"),
                "REWARD": {"type": "math"},
                "ENVIRONMENT": {"type": "code"},
                "ACTION_FORMAT": "tool_call",
            }
        },
        "ENVIRONMENT 'code' declares none (tool_schema)",
    ),
    ("LOGITS_CHUNK negative", lambda t: {"overrides": {"LOGITS_CHUNK": -1}}, "LOGITS_CHUNK must be >= 0, got -1"),
    (
        "CATEGORY_FIELD in no row",
        lambda t: {"overrides": {"CATEGORY_FIELD": "topic"}},
        "CATEGORY_FIELD 'topic' is in no row of TRAIN_FILE: their columns are ['instruction', 'output']",
    ),
]


def test_a_category_field_some_rows_lack_is_a_warning_with_the_count(env, capsys):
    tmp_path, write = env
    rows = [{**item, "topic": "a"} if i < 3 else item for i, item in enumerate(GOOD_ITEMS)]
    config = write({"CATEGORY_FIELD": "topic", "TRAIN_FILE": data_file(tmp_path, json.dumps(rows))})
    assert ht.main([str(config), "--check"]) == 0
    assert "warning: CATEGORY_FIELD 'topic' is missing from 1 of 4 rows of TRAIN_FILE" in capsys.readouterr().err


@pytest.mark.parametrize("case, build, message", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_gives_one_error_line_and_exit_2(env, capsys, case, build, message):
    if case == "FP16 without CUDA":
        pytest.importorskip("torch")
        import torch

        if torch.cuda.is_available():
            pytest.skip("CUDA is available here")
    tmp_path, write = env
    config = write(**build(tmp_path))
    code = ht.main([str(config)])
    err = capsys.readouterr().err
    error_lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2, err
    assert len(error_lines) == 1 and message in error_lines[0], err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists(), "a failed start must leave no output behind"


def test_bf16_on_device_without_bf16(env, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    tmp_path, write = env
    assert ht.main([str(write({"BF16": True}))]) == 2
    assert "BF16 is true but this CPU has no bfloat16 support" in capsys.readouterr().err


def test_cli_subprocess_bad_config_no_traceback(env):
    tmp_path, write = env
    proc = subprocess.run(
        [sys.executable, str(ROOT / "hybrid_trainer.py"), str(write({"MODE": "hybird"}))], capture_output=True, text=True, cwd=tmp_path
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: MODE must be 'sft', 'ppo' or 'hybrid', got 'hybird'"


def test_check_prints_resolved_config_without_loading(env, capsys):
    tmp_path, write = env
    assert ht.main([str(write({"MODE": "hybrid", "REWARD": {"type": "bleu"}})), "--check"]) == 0
    out = capsys.readouterr().out
    resolved = json.loads(out[: out.rindex("}") + 1])
    assert set(resolved) == {f.name for f in ht.dataclasses.fields(ht.Config)}  # every key, defaults filled in
    assert resolved["PPO_MINI"] == resolved["PPO_BATCH"] == 4 and resolved["TARGET_KL"] == 0.3
    assert resolved["LR_SFT"] == 5e-5 and resolved["NO_REPEAT_NGRAM_SIZE"] == 3 and resolved["ADAPTIVE_KL"] is True
    assert "ok: 4 training items" in out
    assert not (tmp_path / "out").exists()


def test_help_lists_every_registry_from_the_registry_itself():
    proc = subprocess.run([sys.executable, str(ROOT / "hybrid_trainer.py"), "--help"], capture_output=True, text=True)
    import rewards

    for registry in (
        ht.ADVANTAGES,
        ht.HYBRID_STRATEGIES,
        ht.KL_PENALTIES,
        ht.SFT_LOSSES,
        ht.SFT_TOKEN_WEIGHTS,
        ht.MIX_SCHEDULES,
        ht.LR_SCHEDULES,
        ht.DATA_FORMATS,
        runtime.GENERATION_BACKENDS,
        rewards.REWARDS,
    ):
        for name in registry:
            assert f"\n    {name} " in proc.stdout, name
    keys = {key: doc for key, _, doc in ht.config_defaults()}  # a key's choices in its help are its registry's names
    assert " | ".join(ht.ADVANTAGES) in keys["ADVANTAGE"] and " | ".join(ht.KL_PENALTIES) in keys["KL_PENALTY"]


def test_config_is_frozen_and_the_plan_derives_every_size():
    cfg = ht.Config.from_dict(
        {
            "TRAIN_FILE": "t",
            "OUTPUT_DIR": "o",
            "MODE": "hybrid",
            "SFT_BATCH": 4,
            "PPO_BATCH": 4,
            "PPO_MINI": 2,
            "NUM_GENERATIONS": 2,
            "ADVANTAGE": "grpo",
            "PPO_EPOCHS": 3,
            "EPOCHS": 2,
            "MAXSEQ": 4096,
        }
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.SEED = 3
    assert cfg.SEED is None and cfg.BF16 == "auto"  # nothing resolved into the config
    plan = ht.make_plan(cfg, n_items=10, world=2, seed=7, seed_drawn=True, bf16=False, precision="p", model="m", context=1024)
    # alternate, 10 items: ceil(10 / 4) = 3 SFT steps and 3 PPO updates per epoch; PPO: 2 minibatches x 3 epochs per update
    assert (plan.sft_steps_per_epoch, plan.ppo_updates_per_epoch, plan.total_steps) == (3, 3, 12)
    assert (plan.sft_optimizer_steps, plan.ppo_optimizer_steps) == (6, 3 * 2 * 3 * 2)
    assert (plan.responses_per_update, plan.responses_per_minibatch, plan.minibatches_per_epoch) == (8, 4, 2)
    assert (plan.sft_batch_per_process, plan.prompts_per_process, plan.world_size, plan.maxseq) == (2, 2, 2, 1024)
    with pytest.raises(runtime.UserError, match=r"PPO_MINI \(2\) must be divisible by the number of processes \(4\)"):
        ht.make_plan(cfg, 10, 4, 7, False, False, "p", "m")


def test_generation_backend_auto_is_vllm_where_installed_and_allowed(monkeypatch):
    """GENERATION_BACKEND "auto" (the default) resolves in the Plan, which says why; ROLLOUT_IS "auto" follows it."""
    import importlib.util

    real = importlib.util.find_spec
    installed = {"vllm": True}
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: (real("json") if installed["vllm"] else None) if name == "vllm" else real(name, *a)
    )

    def plan_of(**keys):
        cfg = ht.Config.from_dict({"TRAIN_FILE": "t", "OUTPUT_DIR": "o", "MODE": "ppo", **keys})
        return cfg, ht.make_plan(cfg, 8, 1, 0, False, False, "p", "m")

    cfg, plan = plan_of(NO_REPEAT_NGRAM_SIZE=0)
    assert cfg.GENERATION_BACKEND == "auto" and plan.backend == "vllm" and cfg.ROLLOUT_IS == "sequence_mask"
    assert "vLLM is installed" in plan.generation and plan.generation in plan.describe()
    cfg, plan = plan_of()  # NO_REPEAT_NGRAM_SIZE 3 by default: vLLM has none
    assert plan.backend == "hf" and "NO_REPEAT_NGRAM_SIZE 3 has no vLLM equivalent" in plan.generation and cfg.ROLLOUT_IS == "off"
    cfg, plan = plan_of(NO_REPEAT_NGRAM_SIZE=0, GENERATION_BACKEND="hf")
    assert plan.backend == "hf" and "set in the config" in plan.generation and cfg.ROLLOUT_IS == "off"
    installed["vllm"] = False
    cfg, plan = plan_of(NO_REPEAT_NGRAM_SIZE=0)
    assert plan.backend == "hf" and "vLLM is not installed" in plan.generation and cfg.ROLLOUT_IS == "off"
    with pytest.raises(runtime.UserError, match="needs vLLM, which is not installed"):
        plan_of(NO_REPEAT_NGRAM_SIZE=0, GENERATION_BACKEND="vllm")


@pytest.mark.parametrize("preset", sorted(p.stem for p in (ROOT / "configs").glob("*.json")))
def test_every_preset_validates_with_either_backend(preset, monkeypatch):
    """Each preset loads with GENERATION_BACKEND hf and vllm; the design sketch's (NO_REPEAT_NGRAM_SIZE 3) take vllm once
    that is 0, and say so when it is not."""
    monkeypatch.chdir(ROOT)
    keys = json.loads((ROOT / "configs" / f"{preset}.json").read_text())
    for backend in ("hf", "vllm"):
        over = {"GENERATION_BACKEND": backend}
        if backend == "vllm" and keys.get("NO_REPEAT_NGRAM_SIZE", 3):
            with pytest.raises(runtime.UserError, match="NO_REPEAT_NGRAM_SIZE=3 has no equivalent in vLLM"):
                ht.Config.from_dict({**keys, **over})
            over["NO_REPEAT_NGRAM_SIZE"] = 0
        cfg = ht.Config.from_dict({**keys, **over})
        assert runtime.resolve_backend(cfg)[0] == backend


def test_run_writes_the_plan_next_to_the_config(tiny_model, tmp_path):
    train = tmp_path / "train.json"
    train.write_text(json.dumps(GOOD_ITEMS))
    out = tmp_path / "out"
    path = tmp_path / "c.json"
    path.write_text(
        json.dumps(
            {
                "MODE": "sft",
                "MODEL": str(tiny_model),
                "TRAIN_FILE": str(train),
                "OUTPUT_DIR": str(out),
                "SFT_BATCH": 2,
                "BF16": False,
                "MAXSEQ": 5000,
            }
        )
    )
    proc = subprocess.run([sys.executable, str(ROOT / "hybrid_trainer.py"), str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    plan, config = (json.loads((out / name).read_text()) for name in ("plan.json", "config.json"))
    assert plan["seed_drawn"] and plan["seed"] == config["SEED"] and plan["maxseq"] == 1024 and config["MAXSEQ"] == 5000
    assert plan["total_steps"] == 2 and plan["model"] == str(tiny_model.resolve())
    assert "plan:\n  seed " in proc.stdout and f"{plan['seed']} (drawn)" in proc.stdout


def test_help_explains_run_and_check():
    proc = subprocess.run([sys.executable, str(ROOT / "hybrid_trainer.py"), "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    assert "--check" in proc.stdout and "without loading model weights" in proc.stdout
    for key in ("CYCLE_SFT_STEPS", "KL_PENALTY", "RATIO_THRESHOLD", "MISSING_EOS_PENALTY"):
        assert key in proc.stdout


def test_sketch_string_booleans_and_seed_drawn():
    cfg = ht.Config.from_dict({"TRAIN_FILE": "t", "OUTPUT_DIR": "o", "BF16": "false", "WHITEN_REWARDS": "True", "MODE": "SFT"})
    assert cfg.BF16 is False and cfg.WHITEN_REWARDS is True and cfg.MODE == "sft"
    assert cfg.SEED is None  # the config keeps null; the Plan draws the seed
    plan = ht.api_plan(cfg)
    assert isinstance(plan.seed, int) and plan.seed_drawn


def test_prompt_template_matches_sketch_and_hides_output():
    item = {"question": "2+2?", "tags": ["math", "easy"], "note": None, "output": "4"}
    prompt = ht.sketch_prompt(item, "output")
    assert prompt == "### Prompt:\n\n```question: 2+2?\ntags: math,easy```\n\n### Response:\n\n"
    assert "4" not in prompt and "_output_key" not in prompt


def test_list_output_uses_first_element_and_subset_is_seeded(tmp_path):
    ex = ht.make_examples([{"q": "a", "output": ["first", "second"]}], "output", "TRAIN_FILE")
    assert ex[0].target == "first"
    items = [{"q": str(i), "output": "x"} for i in range(10)]
    cfg = ht.Config.from_dict({"TRAIN_FILE": "t", "OUTPUT_DIR": "o", "PERCENT": 50, "SEED": 3})
    a = ht.select_subset(ht.make_examples(items, "output", "T"), cfg)
    b = ht.select_subset(ht.make_examples(items, "output", "T"), cfg)
    assert len(a) == 5 and [e.index for e in a] == [e.index for e in b]
    assert len(ht.select_subset(a, dataclasses.replace(cfg, NUM_SAMPLES=3))) == 3


def test_jsonl_is_accepted(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"q": "a", "output": "b"}\n\n{"q": "c", "output": "d"}\n')
    assert [e.target for e in ht.make_examples(runtime.read_items(str(path), "TRAIN_FILE"), "output", "TRAIN_FILE")] == ["b", "d"]


def test_the_config_reference_documents_every_config_key():
    page = (ROOT / "docs" / "config.md").read_text()
    assert ht.config_markdown() in page  # the table is generated: python -c "import hybrid_trainer as h; print(h.config_markdown())"
    for key, _, _ in ht.config_defaults():
        assert f"| `{key}` |" in page, key


def test_imports_run_one_way_and_the_readme_api_resolves():
    """No module imports the trainer (runtime.py and outputs.py are what it runs on and what it writes); every
    `ht.NAME` and `runtime.NAME` the README's Python API shows exists, and so do the names it named before the split."""
    import ast
    import re

    import runtime

    for name in ("runtime.py", "outputs.py", "rewards.py", "environments.py"):
        tree = ast.parse((ROOT / name).read_text())
        imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert "hybrid_trainer" not in imported, name
    readme = (ROOT / "README.md").read_text()
    api = " ".join(re.findall(r"```python\n(.*?)```", readme, re.S) + re.findall(r"`((?:ht|runtime)\.\w+\(?)", readme))
    for module, name in re.findall(r"\b(ht|runtime)\.([A-Za-z_]\w*)", api.replace("runtime.py", "")):
        assert hasattr(ht if module == "ht" else runtime, name), f"{module}.{name}"
    for name in ("pick_device", "Processes", "resolve_bf16", "load_model", "api_plan", "HybridTrainer", "init_processes", "shard", "run"):
        assert hasattr(ht, name), name


def test_gate_threshold_without_gate_warns(env, capsys):
    tmp_path, write = env
    assert ht.main([str(write({"MODE": "hybrid", "GATE_THRESHOLD": 0.3})), "--check"]) == 0
    assert "warning: GATE_THRESHOLD is ignored" in capsys.readouterr().err


def test_exit_now_runs_the_atexit_handlers_flushes_and_keeps_the_exit_code():
    """The command line's exit skips the interpreter's teardown, not what a library registered to run at exit (a
    tracker's last flush), nor unflushed output; a live non-daemon thread gets the ordinary exit, which waits for it."""
    code = (
        "import atexit, sys, threading, time; sys.path.insert(0, %r); import runtime; "
        "atexit.register(lambda: print('handler ran', flush=True)); sys.stdout.write('unflushed '); "
        "%s runtime.exit_now(3)"
    )
    quick = subprocess.run([sys.executable, "-c", code % (str(ROOT), "")], capture_output=True, text=True, timeout=120)
    assert quick.returncode == 3 and quick.stdout.startswith("unflushed ") and "handler ran" in quick.stdout
    waits = subprocess.run(
        [
            sys.executable,
            "-c",
            code % (str(ROOT), "threading.Thread(target=lambda: (time.sleep(1), print('thread done', flush=True))).start();"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert waits.returncode == 3 and "thread done" in waits.stdout and "handler ran" in waits.stdout


def test_a_run_does_not_import_scikit_learn_and_assisted_generation_keeps_roc_curve(tiny_model, tiny_data, tmp_path):
    """defer_scikit_learn (run()'s start-up): transformers' assisted-generation module is imported without importing
    scikit-learn (1-1.8 s of every start-up), and its roc_curve, which only assisted generation calls, still gives
    scikit-learn's numbers on its first call; transformers' is_sklearn_available is the real one again."""
    pytest.importorskip("sklearn")
    config = tmp_path / "c.json"
    config.write_text(
        json.dumps(
            {
                "MODE": "ppo",
                "MODEL": str(tiny_model),
                "TRAIN_FILE": str(tiny_data),
                "SEED": 0,
                "OUTPUT_DIR": str(tmp_path / "out"),
                "PPO_BATCH": 4,
                "NUM_SAMPLES": 4,
                "MAX_NEW_TOKENS": 4,
                "REWARD": {"type": "contains", "pattern": "yes"},
            }
        )
    )
    code = (
        "import sys; sys.path.insert(0, %r); import hybrid_trainer as ht; assert ht.main([%r]) == 0; "
        "print('sklearn imported:', 'sklearn' in sys.modules); "
        "import transformers.utils, transformers.generation.candidate_generator as cg; "
        "print('available:', transformers.utils.is_sklearn_available(), cg.is_sklearn_available()); "
        "got = cg.roc_curve([0, 1, 1, 0], [0.1, 0.9, 0.8, 0.3]); from sklearn.metrics import roc_curve; "
        "want = roc_curve([0, 1, 1, 0], [0.1, 0.9, 0.8, 0.3]); "
        "print('same:', all((a == b).all() for a, b in zip(got, want)))"
    ) % (str(ROOT), str(config))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=ENV)
    assert proc.returncode == 0, proc.stderr
    assert "sklearn imported: False" in proc.stdout and "available: True True" in proc.stdout and "same: True" in proc.stdout, proc.stdout
