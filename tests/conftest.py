"""Shared fixtures: a tiny GPT-2-style model and byte-level BPE tokenizer built at test time (no network)."""

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

CORPUS = [
    "the cat sat on the mat",
    "a dog ran in the park",
    "paris is the capital of france",
    "two plus two is four",
    "hello world",
    "write the word yes",
    "### Prompt: ### Response:",
    "question: answer: instruction: output: input:",
    "0123456789 + - = ? ! . , ` : ( ) [ ]",
    "yes yes yes no no no maybe",
    "berlin madrid rome london tokyo",
]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def tiny_tokenizer(specials: list, **special_tokens):
    """A ~300-token byte-level BPE trained on CORPUS, with `specials` as its special tokens (eos_token= etc. name them)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok.train_from_iterator(CORPUS * 20, trainers.BpeTrainer(vocab_size=300, special_tokens=specials, initial_alphabet=alphabet))
    return PreTrainedTokenizerFast(tokenizer_object=tok, **special_tokens)


def build_tiny_model(path: Path, chat: bool = False, seed: int = 0, n_layer: int = 2, n_embd: int = 64, init_range: float = 0.02) -> Path:
    """Train a ~300-token byte-level BPE on CORPUS and save it with a random 2-layer GPT-2. A larger init_range
    gives embeddings large enough that a LoRA adapter (which cannot change the tied embeddings) can move the
    output distribution."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    specials = ["<|endoftext|>"] + (["<|user|>", "<|assistant|>", "<|end|>", "<|system|>"] if chat else [])
    fast = tiny_tokenizer(specials, eos_token="<|endoftext|>" if not chat else "<|end|>", bos_token="<|endoftext|>")
    if chat:
        fast.chat_template = CHAT_TEMPLATE
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(fast),
        n_positions=1024,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=2,
        initializer_range=init_range,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
    )
    GPT2LMHeadModel(config).save_pretrained(path)
    fast.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny_model"))


@pytest.fixture(scope="session")
def tiny_lora_model(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny_lora_model"), init_range=0.2)


@pytest.fixture(scope="session")
def tiny_chat_model(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny_chat_model"), chat=True)


def write_json(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj))
    return path


@pytest.fixture
def tiny_data(tmp_path) -> Path:
    items = [{"instruction": f"say yes {i}", "output": "yes yes"} for i in range(8)]
    return write_json(tmp_path / "train.json", items)


def write_tiny_gguf(path: Path, seed: int = 0, chat_template: str = "") -> Path:
    """A 1-layer llama-architecture GGUF (F32, random weights) with a byte-level BPE tokenizer, written with
    the `gguf` package, the way llama.cpp lays out SmolLM2."""
    import gguf
    import numpy as np
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(
        CORPUS * 20,
        trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()),
    )
    state = json.loads(tok.to_str())
    vocab = sorted(state["model"]["vocab"].items(), key=lambda kv: kv[1])
    merges = [m if isinstance(m, str) else " ".join(m) for m in state["model"]["merges"]]
    hidden, inter, heads, n_vocab = 32, 64, 2, len(vocab)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(128)
    w.add_embedding_length(hidden)
    w.add_block_count(1)
    w.add_feed_forward_length(inter)
    w.add_head_count(heads)
    w.add_head_count_kv(heads)
    w.add_rope_dimension_count(hidden // heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(n_vocab)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([3 if t == "<|endoftext|>" else 1 for t, _ in vocab])
    w.add_token_merges(merges)
    w.add_bos_token_id(0)
    w.add_eos_token_id(0)
    if chat_template:
        w.add_chat_template(chat_template)
    rng = np.random.default_rng(seed)
    rand = lambda *shape: (rng.standard_normal(shape) * 0.02).astype(np.float32)  # noqa: E731
    tensors = {
        "token_embd.weight": rand(n_vocab, hidden),
        "output_norm.weight": np.ones(hidden, np.float32),
        "output.weight": rand(n_vocab, hidden),
        "blk.0.attn_norm.weight": np.ones(hidden, np.float32),
        "blk.0.ffn_norm.weight": np.ones(hidden, np.float32),
    }
    for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
        tensors[f"blk.0.{name}.weight"] = rand(hidden, hidden)
    tensors.update(
        {
            "blk.0.ffn_gate.weight": rand(inter, hidden),
            "blk.0.ffn_up.weight": rand(inter, hidden),
            "blk.0.ffn_down.weight": rand(hidden, inter),
        }
    )
    for name, array in tensors.items():
        w.add_tensor(name, array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# ---- helpers the test files share ----
ROOT = Path(__file__).resolve().parent.parent
EXACT_PPO = {"TEMPERATURE": 1.0, "TOP_P": 1.0, "REPETITION_PENALTY": 1.0, "NO_REPEAT_NGRAM_SIZE": 0, "GENERATION_BACKEND": "hf"}


def ppo_cli_config(tmp_path, model, tiny_data, **keys):
    """A small GRPO CLI run on tiny_data (4 items, groups of 2, 6 new tokens), exact PPO sampling; keys override."""
    return {
        "MODE": "ppo",
        "MODEL": str(model),
        "TRAIN_FILE": str(tiny_data),
        "OUTPUT_DIR": str(tmp_path / "out"),
        "SEED": 0,
        "PROMPT_FORMAT": "sketch",
        "ADVANTAGE": "grpo",
        "NUM_GENERATIONS": 2,
        "PPO_BATCH": 2,
        "PPO_EPOCHS": 1,
        "MAX_NEW_TOKENS": 6,
        "NUM_SAMPLES": 4,
        "REWARD": {"type": "contains", "pattern": "yes"},
        "LOG_EVERY": 1,
        **EXACT_PPO,
        **keys,
    }


def run_cli(config: dict, tmp_path: Path, *extra, check=True) -> subprocess.CompletedProcess:
    path = tmp_path / f"config-{time.monotonic_ns()}.json"
    path.write_text(json.dumps(config))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "hybrid_trainer.py"), str(path), *extra],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


class YesFraction:
    """Test reward a tiny model can learn: occurrences of 'yes' in the response, 3 or more = 1 (0..1)."""

    def scores(self, responses, targets, prompts=None, items=None, update=True):
        return [min(1.0, r.count("yes") / 3) for r in responses]

    def state_dict(self):
        return {}


def trainer_for(cfg_overrides, tiny_model, tiny_data, reward):
    import torch

    import hybrid_trainer as ht

    cfg = ht.Config.from_dict(
        {"MODE": "ppo", "MODEL": str(tiny_model), "TRAIN_FILE": str(tiny_data), "OUTPUT_DIR": "-", "SEED": 0, **EXACT_PPO, **cfg_overrides}
    )
    torch.manual_seed(0)
    policy, ref, tok = ht.load_model(cfg, torch.device("cpu"))
    examples = ht.tokenize_examples(ht.load_examples(cfg), cfg, tok, "sketch", "TRAIN_FILE")
    return ht.HybridTrainer(cfg, policy, ref, tok, reward), examples


HYBRID_RESUME = {
    "MODE": "hybrid",
    "SEED": 7,
    "REF_UPDATE": "cycle",
    "LR_SCHEDULE": "cosine",
    "WARMUP_STEPS": 2,
    "SFT_BATCH": 2,
    "PPO_BATCH": 2,
    "PPO_MINI": 1,
    "CYCLE_SFT_STEPS": 2,
    "CYCLE_PPO_UPDATES": 1,
    "MAX_NEW_TOKENS": 4,
    "EPOCHS": 2,
    "LR_SFT": 1e-3,
    "LR_PPO": 1e-3,
    "SAVE_EVERY": 1,
    "REWARD": {"type": "weighted_sum", "components": [{"type": "contains", "pattern": "yes"}], "postprocess": [{"type": "normalize"}]},
}


def interrupted_copy(out: Path, dest: Path, checkpoint: int) -> Path:
    """A finished run's directory as an interrupted run would have left it: everything it logged, but no final model
    and no checkpoint after step `checkpoint`."""
    shutil.copytree(out, dest)
    for name in ("inference_lm", "ppo_full", "report.md"):
        shutil.rmtree(dest / name) if (dest / name).is_dir() else (dest / name).unlink(missing_ok=True)
    for ckpt in (dest / "checkpoints").glob("step-*"):
        if int(ckpt.name[5:]) > checkpoint:
            shutil.rmtree(ckpt)
    return dest


def comparable(records):
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in records]


ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def torchrun(args: list, timeout: int = 300, check: bool = True, **kw) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=timeout, **kw)
    if check:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def torchrun_cli(config: dict, tmp_path: Path, **kw) -> subprocess.CompletedProcess:
    path = tmp_path / f"config-{time.monotonic_ns()}.json"
    path.write_text(json.dumps(config))
    return torchrun([ROOT / "hybrid_trainer.py", path], **kw)


def sigkill_at_checkpoint(cmd: list, out: Path, step: int, env: dict, timeout: float = 240) -> None:
    """Start `cmd` (a run writing checkpoints to out/checkpoints) and kill -9 it, with every process it started (a
    launcher's workers too), as soon as a checkpoint at `step` or later exists (older ones may be pruned meanwhile)."""
    import signal

    import psutil

    proc = subprocess.Popen([str(c) for c in cmd], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while time.time() < deadline and not any(int(p.name[5:]) >= step for p in (out / "checkpoints").glob("step-*")):
        time.sleep(0.02)
    launcher = psutil.Process(proc.pid)
    for p in [launcher, *launcher.children(recursive=True)]:  # all at once
        p.send_signal(signal.SIGKILL)
    proc.wait()
    time.sleep(0.5)


# ---- weights and gradients ----
def max_diff(a, b) -> float:
    """The largest absolute difference between two sets of weights of the same names: safetensors files or dicts of
    tensors (state dicts)."""
    from safetensors.torch import load_file

    x, y = (load_file(str(w)) if isinstance(w, (str, Path)) else w for w in (a, b))
    assert x.keys() == y.keys()
    return max((x[k].float() - y[k].float()).abs().max().item() for k in x)


def capture_steps(trainer) -> list:
    """The trainer's optimizer steps replaced by a capture: each step appends the flat gradient it would have applied
    (the parameters with a gradient, concatenated) and zeroes it; the weights do not move."""
    import torch

    captured = []

    def capture(optimizer, params):
        captured.append(torch.cat([p.grad.reshape(-1) for p in params if p.grad is not None]).clone())
        optimizer.zero_grad(set_to_none=True)
        return 0.0

    trainer.optim.step = capture
    return captured


# ---- learning runs ----
LEARN = {
    "NUM_GENERATIONS": 4,
    "PPO_BATCH": 8,
    "PPO_EPOCHS": 4,
    "LR_PPO": 3e-3,
    "INIT_KL_COEF": 0.01,
    "MAX_NEW_TOKENS": 6,
    "EPOCHS": 20,
    "LOG_EVERY": 100,
    "SEED": 0,
    "REWARD": {"type": "contains", "pattern": "yes"},
    **EXACT_PPO,
}


# ---- the code sandbox's hostile programs (tests/test_sandbox.py, and through the code environment) ----
MARK = "sandbox-test-leftover-9f1c"


def leftovers() -> list[str]:
    """Processes still running a hostile program's marker command line."""
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if MARK in cmdline and "pytest" not in cmdline:
                found.append(f"{pid}: {cmdline[:80]}")
    return found


@pytest.fixture
def world(tmp_path, monkeypatch):
    """What a hostile program goes after: the trainer's output directory and home (stand-ins, with a file each),
    an environment secret, and a socket the trainer listens on at 127.0.0.1."""
    out, home = tmp_path / "out", tmp_path / "home"
    for d in (out, home):
        d.mkdir()
        (d / "keep.txt").write_text("keep")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("HT_SECRET", "s3cret-value")
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(5)
    server.settimeout(0.2)
    accepted, done = [], threading.Event()

    def accept():
        while not done.is_set():
            try:
                accepted.append(server.accept())
            except OSError:
                pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield {"out": out, "home": home, "port": server.getsockname()[1], "accepted": accepted}
    done.set()
    thread.join()
    server.close()


# (case, program: defines a correct add() only if its attack worked)
HOSTILE = [
    ("infinite loop", "while True:\n    pass\ndef add(a, b): return a + b"),
    ("fork bomb", "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\ndef add(a, b): return a + b"),
    ("memory bomb", "x = bytearray(8 << 30)\ndef add(a, b): return a + b"),
    ("100 MB of output", "import sys\nfor _ in range(100):\n    sys.stdout.write('x' * (1 << 20))\ndef add(a, b): return a + b"),
    ("rm -rf the output dir and ~", "import shutil\nshutil.rmtree({out!r})\nshutil.rmtree({home!r})\ndef add(a, b): return a + b"),
    ("write into the project", "open({project!r}, 'w').write('pwned')\ndef add(a, b): return a + b"),
    (
        "read an environment secret",
        "import os\nok = os.environ.get('HT_SECRET') == 's3cret-value'\ndef add(a, b): return a + b if ok else None",
    ),
    ("connect to 127.0.0.1", "import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\ndef add(a, b): return a + b"),
    (
        "kill the parent",
        "import os, time\nparent = os.getppid()\nos.kill(parent, 9)\ntime.sleep(0.3)\n"
        "gone = os.getppid() != parent\ndef add(a, b): return a + b if gone else None",
    ),
    (
        "a background process that outlives the test",
        "import subprocess, sys\n"
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)  # {mark}'], start_new_session=True)\n"
        "def add(a, b): return None",
    ),
    ("sys.exit(0) before the tests", "import sys\ndef add(a, b): return a + b\nsys.exit(0)"),
]


# ---- tiny models of real template families: the family's own chat template (the installed trl's copy), special ----
# ---- tokens, tokenizer EOS and generation_config EOS list, on a 2-layer model of its architecture ----
TEMPLATE_FAMILIES = {
    # family: (trl template, architecture, special tokens, tokenizer EOS, BOS, generation_config eos_token_id,
    #          the assistant turn "paris" as the template renders it, through its first stop token)
    "qwen2_5": (
        "qwen2_5.jinja",
        "qwen2",
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        "<|im_end|>",
        None,
        ["<|im_end|>", "<|endoftext|>"],
        "paris<|im_end|>",
    ),
    "qwen3": (
        "qwen3.jinja",
        "qwen3",
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        "<|im_end|>",
        None,
        ["<|im_end|>", "<|endoftext|>"],
        "<think>\n\n</think>\n\nparis<|im_end|>",
    ),
    "llama3_1": (
        "llama3_1.jinja",
        "llama",
        ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>"],
        "<|eot_id|>",
        "<|begin_of_text|>",
        ["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"],
        "paris<|eot_id|>",
    ),
    "gemma3": (
        "gemma3.jinja",
        "gemma3_text",
        ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"],
        "<eos>",
        "<bos>",
        ["<eos>", "<end_of_turn>"],
        "paris<end_of_turn>",
    ),
    "phi3": (
        "phi3.jinja",
        "phi3",
        ["<|endoftext|>", "<|user|>", "<|assistant|>", "<|end|>", "<|system|>"],
        "<|endoftext|>",
        None,
        ["<|endoftext|>", "<|end|>"],
        "paris<|end|>",
    ),
    "gemma": (
        "gemma.jinja",
        "gemma",
        ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"],
        "<eos>",
        "<bos>",
        ["<eos>", "<end_of_turn>"],
        "paris<end_of_turn>",
    ),  # no system role: its template raises on one
}


def build_family_model(path: Path, family: str) -> Path:
    """A tiny random model of `family` (TEMPLATE_FAMILIES): a byte-level BPE on CORPUS with the family's special tokens,
    its chat template read from the installed trl, its EOS, and generation_config.json's eos_token_id list."""
    import torch
    import trl
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    template, arch, specials, eos, bos, gen_eos, _ = TEMPLATE_FAMILIES[family]
    fast = tiny_tokenizer(specials, eos_token=eos, bos_token=bos, pad_token=specials[0])
    fast.chat_template = (Path(trl.__file__).parent / "chat_templates" / template).read_text()
    torch.manual_seed(0)
    dims = dict(
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,  # vLLM's CPU attention takes head_dim 32 and up
        max_position_embeddings=512,
        vocab_size=len(fast),
        tie_word_embeddings=True,
    )
    config = AutoConfig.for_model(
        arch, **dims, eos_token_id=fast.convert_tokens_to_ids(gen_eos), bos_token_id=fast.bos_token_id, pad_token_id=fast.pad_token_id
    )
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config = GenerationConfig(
        eos_token_id=fast.convert_tokens_to_ids(gen_eos), bos_token_id=fast.bos_token_id, pad_token_id=fast.pad_token_id
    )
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return path
