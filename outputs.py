"""What a run writes: OUTPUT_DIR and the faults a long run meets (a full disk, a damaged checkpoint), checkpoints and
resume, the final model, metrics.jsonl and the trackers, report.md and the model card. hybrid_trainer.py imports from
here; this module imports runtime.py and never the trainer (a trainer is read by its attributes and state_dict()).

  1. Faults        a full disk (DiskFull, writing, all_or_none), free space, OUTPUT_DIR's state and plan.
  2. Checkpoints   the layout (CHECKPOINT), writing one whole or not at all, the manifest that proves it, finding the one
                   to resume from, reading it back; their size estimated (storage_estimate).
  3. Final model   inference_lm/, ppo_full/, best/.
  4. Metrics       metrics.jsonl and the REPORT_TO trackers (TRACKERS); the loop's summary line.
  5. Reports       report.md with its tables and plots, the model card.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import secrets
import shutil
import sys
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import numpy as np
import torch
import torch.nn as nn

from runtime import (
    ALIAS_HUB_IDS,
    AdapterReference,
    UserError,
    barrier,
    clear_gguf_flag,
    full_tensor,
    gather_objects,
    human_bytes,
    is_main,
    rank,
    say,
    shown,
    warn,
)

# ==================================================================================================
# 1. Faults a long run meets: a full disk, a damaged checkpoint; OUTPUT_DIR
# ==================================================================================================
# ---- faults a long run meets: a full disk, a damaged checkpoint ----
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class DiskFull(UserError):
    """A write found no space left on its file system (ENOSPC, or a quota: EDQUOT): one `error:` line, exit 2."""


def free_bytes(path: Path) -> int:
    """Free bytes on the file system that holds `path` (or would: its nearest existing parent)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def tensor_bytes(obj) -> int:
    """Bytes of the tensors in a (nested) state dict."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def is_disk_full(e: BaseException, directory: Path, needed: int) -> bool:
    """Was this failed write a full disk? An OSError says so by its errno; torch.save's and safetensors' writers raise
    errors that lost it (torch: "unexpected pos ...", "basic_ios::clear: iostream error"), and then the space left
    is the evidence."""
    if isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS:
        return True
    if "No space left on device" in str(e) or "Disk quota exceeded" in str(e):
        return True
    return not isinstance(e, OSError) and free_bytes(directory) < needed


@contextlib.contextmanager
def writing(what: str, directory: Path, needed: int, then: str = ""):
    """A write of about `needed` bytes into `directory`: a full disk becomes one DiskFull naming both and what to do."""
    free = free_bytes(directory)
    try:
        yield
    except UserError:
        raise
    except Exception as e:
        if not is_disk_full(e, directory, needed):
            raise
        raise DiskFull(
            f"the disk is full: writing {what} to {directory} needed about {human_bytes(needed)}, and "
            f"{human_bytes(free)} was free there{then}"
        ) from None


def all_or_none(failure: Optional[str]) -> None:
    """Every process learns whether any of them failed a write (each reaches this collective), and raises the first."""
    failures = [f for f in gather_objects(failure) if f]
    if failures:
        raise DiskFull(failures[0])


def disk_usage(path: Path) -> str:
    """'545 MB (inference_lm 542 MB)': the total and its largest entries; a file with several names (hard links)
    counts once, under the entry met first."""
    seen: set = set()

    def size(p: Path) -> int:
        total = 0
        for f in [p] if p.is_file() else sorted(p.rglob("*")):
            st = f.stat() if f.is_file() and not f.is_symlink() else None
            if st is not None and (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
        return total

    parts = sorted(((size(p), p.name) for p in sorted(path.iterdir())), reverse=True)  # inference_lm before ppo_full
    total = sum(n for n, _ in parts)
    big = [f"{name} {human_bytes(n)}" for n, name in parts[:4] if n >= 0.1 * total]
    return human_bytes(total) + (f" ({', '.join(big)})" if big else "")


def check_writable(path: Path, key: str) -> None:
    """Create `path` (with its parents) and write a probe file in it, then remove all the probe created: one
    `error:` line naming the path and the reason instead of a traceback after the model has loaded."""
    missing, p = [], path
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    created = []
    try:
        if not p.is_dir():
            raise UserError(f"{key} {shown(path)} cannot be created: {p} is a file, not a directory")
        for d in reversed(missing):
            d.mkdir()
            created.append(d)
        probe = path / f".write-probe-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise UserError(f"{key} {shown(path)} is not writable: {e.strerror or e}") from None
    finally:
        for d in reversed(created):
            shutil.rmtree(d, ignore_errors=True)


RUN_FILES = ("config.json", "metrics.jsonl", "checkpoints", "ppo_full", "inference_lm", "best", "report.md")


def output_dir_state(path: Path, cfg) -> str:
    """'free', 'resumable' (unfinished run with a checkpoint, and RESUME allows it), 'finished' or 'used'."""
    if (path / "inference_lm").exists() or (path / "ppo_full").exists():
        return "finished"
    if cfg.RESUME is not False and latest_checkpoint(path):
        return "resumable"
    return "used" if any((path / name).exists() for name in RUN_FILES) else "free"


def plan_output_dir(cfg) -> Path:
    """OUTPUT_DIR, or a fresh run-N inside it when it holds another run's results (never overwritten)."""
    out = Path(cfg.OUTPUT_DIR).expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"OUTPUT_DIR {shown(cfg.OUTPUT_DIR)} is a file, expected a directory")
    candidate, n, first_state = out, 2, output_dir_state(out, cfg)
    while output_dir_state(candidate, cfg) in ("finished", "used"):
        candidate, n = out / f"run-{n}", n + 1
    if candidate != out:
        what = "a finished model" if first_state == "finished" else "files of an earlier run (and RESUME cannot continue it)"
        warn(f"OUTPUT_DIR {out} already holds {what}; this run writes to {candidate} instead")
    return candidate


def resolved_config(cfg, plan) -> dict:
    """config.json: every key, with what the Plan decided for SEED and BF16, so the file reruns the same run."""
    return {**cfg.resolved(), "SEED": plan.seed, "BF16": plan.bf16}


# ==================================================================================================
# 2. Checkpoints and resume
# ==================================================================================================
MANIFEST = "manifest.json"


class CheckpointFile(NamedTuple):
    """One file of checkpoints/step-N/: which part of the checkpoint it holds and how it is written."""

    key: str  # the part: a key of HybridTrainer.state_dict(), or "state" (the trainer's scalars + the loop's RunState)
    name: str  # the file's name; "{rank}" in it: one file per process
    kind: str  # "safetensors" (weights), "torch" (torch.save, read back with weights_only=True) or "json"
    required: bool = True  # else written only when its part is not empty (the reference: only when it moves)
    on_device: bool = False  # read back onto the trainer's device (else the CPU)


CHECKPOINT = (  # the layout of a checkpoint, in the order written (the manifest after them proves it whole)
    CheckpointFile("policy", "policy.safetensors", "safetensors"),  # the weights that train, unsharded
    CheckpointFile("optimizers", "optimizers.pt", "torch", on_device=True),  # both AdamWs and schedulers, the grad scaler
    CheckpointFile("reference", "reference.safetensors", "safetensors", required=False),  # REF_UPDATE moves it
    CheckpointFile("state", "state.json", "json"),  # KL coefficient, the reward's state, RunState, config, plan
    CheckpointFile("rng", "rng-{rank}.pt", "torch"),  # each process's random streams
)
CHECKPOINT_STATE = next(f.name for f in CHECKPOINT if f.key == "state")


def checkpoint_state(path: Path) -> dict:
    """A checkpoint's state.json: the loop's "run", the "config" and "plan" it was written with, the trainer's scalars."""
    return json.loads((path / CHECKPOINT_STATE).read_text())


def check_file(path: Path, size: Optional[int]) -> Optional[str]:
    """What is wrong with one file of a checkpoint (None: nothing): missing, another size than written, a header or
    archive that does not parse. Reads headers and the zip directory only: fast enough at every save and resume."""
    if not path.is_file():
        return "missing"
    actual = path.stat().st_size
    if size is not None and actual != size:
        return f"{actual} bytes, {size} were written"
    if actual == 0:
        return "empty"
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                f.keys()
        elif path.suffix == ".pt":
            import zipfile

            with zipfile.ZipFile(path) as z:  # torch.save's format: a truncated file has no central directory
                z.namelist()
        elif path.suffix == ".json":
            json.loads(path.read_text())
    except Exception as e:  # noqa: BLE001 - any failure to parse is damage
        return f"does not parse ({type(e).__name__}: {str(e)[:80]})"
    return None


def write_manifest(directory: Path) -> None:
    """The last file a checkpoint writes: every other file's size, so that a resume can prove it whole."""
    files = {p.name: p.stat().st_size for p in sorted(directory.iterdir()) if p.is_file() and p.name != MANIFEST}
    (directory / MANIFEST).write_text(json.dumps({"files": files}, indent=1))


def checkpoint_damage(path: Path) -> Optional[str]:
    """'FILE: what is wrong' for the first damaged file of a checkpoint, or None when it is whole. A checkpoint of an
    earlier version has no manifest: its files are checked by their structure only."""
    manifest = path / MANIFEST
    if manifest.is_file():
        problem = check_file(manifest, None)
        if problem:
            return f"{manifest}: {problem}"
        files = json.loads(manifest.read_text())["files"]
    else:
        files = {p.name: None for p in sorted(path.iterdir()) if p.is_file()} if path.is_dir() else {}
        files = {**{f.name: None for f in CHECKPOINT if f.required and "{" not in f.name}, **files}
    for name, size in files.items():
        problem = check_file(path / name, size)
        if problem:
            return f"{path / name}: {problem}"
    return None


def checkpoints(out_dir: Path) -> list[Path]:
    """OUTPUT_DIR's checkpoints, oldest first (by step)."""
    steps = sorted((int(p.name[5:]), p) for p in (out_dir / "checkpoints").glob("step-*") if p.name[5:].isdigit())
    return [p for _, p in steps]


def latest_checkpoint(out_dir: Path) -> Optional[Path]:
    found = checkpoints(out_dir)
    return found[-1] if found else None


def find_resume_point(cfg, out_dir: Path) -> Optional[Path]:
    """The checkpoint to resume from: RESUME's, or with "auto" the newest whole one in OUTPUT_DIR (a damaged one is
    skipped with a warning naming its file and what is wrong)."""
    if cfg.RESUME is False:
        return None
    if cfg.RESUME == "auto":
        damaged = []
        for path in reversed(checkpoints(out_dir)):
            problem = checkpoint_damage(path)
            if problem is None:
                return path
            damaged.append(problem)
            warn(f"checkpoint {path.name} is damaged and is skipped: {problem}")
        if damaged:
            raise UserError(
                f"no checkpoint in {out_dir / 'checkpoints'} can resume the run, each is damaged: {'; '.join(damaged)}. "
                "Set RESUME to a good copy of one, or RESUME false to start over in another OUTPUT_DIR"
            )
        return None
    path = Path(cfg.RESUME).expanduser()
    if not (path / CHECKPOINT_STATE).is_file() and not (path / MANIFEST).is_file():
        raise UserError(f"RESUME {shown(cfg.RESUME)} is not a checkpoint directory (no {CHECKPOINT_STATE})")
    if problem := checkpoint_damage(path):
        raise UserError(f"RESUME {shown(cfg.RESUME)} is a damaged checkpoint: {problem}")
    return path


def resumed_facts(cfg, checkpoint: Path) -> tuple[int, Optional[bool]]:
    """-> (the seed the run started with: data order and sampling depend on it, its bf16 choice when BF16 is
    "auto": kept whatever a probe would say now, else None). Other changed keys get a warning."""
    saved = checkpoint_state(checkpoint)["config"]
    bf16 = saved["BF16"] if cfg.BF16 == "auto" and isinstance(saved.get("BF16"), bool) else None
    mine = {**cfg.resolved(), "SEED": saved["SEED"] if cfg.SEED is None else cfg.SEED, "BF16": cfg.BF16 if bf16 is None else bf16}
    changed = [
        k
        for k, v in mine.items()
        if k not in ("RESUME", "LOG_EVERY", "SAVE_EVERY", "KEEP_CHECKPOINTS", "KEEP_CHECKPOINTS_AT_END") and saved.get(k, v) != v
    ]
    if changed:
        warn(f"resuming {checkpoint} with changed keys {changed}: the result will differ from an uninterrupted run")
    return saved["SEED"], bf16


def rng_state(perm_generator: torch.Generator) -> dict:
    """Python's, numpy's, torch's (CPU and CUDA) random streams and the minibatch order's generator."""
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (np_state[0], np_state[1].tolist(), *np_state[2:]),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "perm": perm_generator.get_state(),
    }


def set_rng_state(state: dict, perm_generator: torch.Generator) -> None:
    random.setstate((state["python"][0], tuple(state["python"][1]), state["python"][2]))
    np.random.set_state((state["numpy"][0], np.array(state["numpy"][1], dtype=np.uint32), *state["numpy"][2:]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    perm_generator.set_state(state["perm"])


def trainable_state(module: nn.Module) -> dict:
    """The parameters that train (everything, or adapter + value head with LoRA), unsharded."""
    return {name: full_tensor(p) for name, p in module.named_parameters() if p.requires_grad}


def load_into(module: nn.Module, state: dict, what: str) -> None:
    """Copy `state` into the module's parameters of those names (sharding them again under FSDP)."""
    from torch.distributed.tensor import distribute_tensor

    params = dict(module.named_parameters())
    if missing := [k for k in state if k not in params]:
        raise UserError(
            f"{what} does not fit this model (unknown weights {missing[:3]}): was it written with other MODEL / LORA_* settings?"
        )
    with torch.no_grad():
        for name, value in state.items():
            p = params[name]
            value = value.to(p.device, p.dtype)
            p.copy_(distribute_tensor(value, p.device_mesh, p.placements) if hasattr(p, "device_mesh") else value)


def reference_state(ref) -> dict:
    """The moving reference (REF_UPDATE cycle): its adapter, or every weight of the frozen copy (tied ones once)."""
    state = ref.state_dict() if isinstance(ref, AdapterReference) else dict(ref.named_parameters())
    return {k: full_tensor(v) for k, v in state.items()}


def optimizer_state(model: nn.Module, optimizer, fsdp: bool) -> dict:
    """Plain state_dict, or under FSDP the unsharded one keyed by parameter name (a collective)."""
    if not fsdp:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(model: nn.Module, optimizer, state: dict, fsdp: bool) -> None:
    if not fsdp:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def save_checkpoint(out_dir: Path, checkpoint: dict, step: int, keep: int) -> Path:
    """checkpoint (HybridTrainer.state_dict() with the loop's state added to "state") written as CHECKPOINT lays it out,
    into a temp dir renamed into place, then the oldest beyond `keep` go. Every process calls it; the main process
    writes the shared files, each its own random streams. A full disk removes the partial checkpoint on every process."""
    from safetensors.torch import save_file

    root = out_dir / "checkpoints"
    final, tmp = root / f"step-{step}", root / f".tmp-step-{step}"
    previous = latest_checkpoint(out_dir)
    then = (
        f"; the partial checkpoint was removed and {f'the previous one, {previous},' if previous else 'no earlier checkpoint'} "
        'is intact. Free space (or lower KEEP_CHECKPOINTS), then rerun the same command: RESUME "auto" continues '
        "from the newest good checkpoint"
    )
    needed = sum(tensor_bytes(part) for key, part in checkpoint.items() if key != "state")
    writers = {
        "safetensors": lambda part, path: save_file(part, str(path)),
        "torch": lambda part, path: torch.save(part, path),
        "json": lambda part, path: path.write_text(json.dumps(part, indent=1)),
    }

    def attempt(write: Callable, main_only: bool = True) -> None:
        """One part of the checkpoint; every process learns whether any failed (a full disk), and then the partial
        checkpoint goes."""
        failure = None
        if is_main() or not main_only:
            try:
                with writing(f"checkpoint step-{step}", root, needed, then):
                    write()
            except DiskFull as e:
                failure = str(e)
        try:
            all_or_none(failure)
        except DiskFull:
            if is_main():
                shutil.rmtree(tmp, ignore_errors=True)
            raise

    def write(files: list[CheckpointFile]) -> None:
        for f in files:
            if f.required or checkpoint[f.key]:
                writers[f.kind](checkpoint[f.key], tmp / f.name.format(rank=rank()))

    def shared_files() -> None:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        write([f for f in CHECKPOINT if "{rank}" not in f.name])

    attempt(shared_files)
    attempt(lambda: write([f for f in CHECKPOINT if "{rank}" in f.name]), main_only=False)
    attempt(lambda: write_manifest(tmp))  # last: a checkpoint with a manifest was written whole
    if is_main():
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in checkpoints(out_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def load_checkpoint(path: Path, device: torch.device) -> dict:
    """A checkpoint as CHECKPOINT lays it out -> {key: part} (None for a part it does not hold), with this process's
    random streams (a checkpoint written by fewer processes: the main one's)."""
    from safetensors.torch import load_file

    readers = {
        "safetensors": lambda file, f: load_file(str(file)),
        "json": lambda file, f: json.loads(file.read_text()),
        "torch": lambda file, f: torch.load(file, weights_only=True, map_location=device if f.on_device else None),
    }
    parts = {}
    for f in CHECKPOINT:
        file = path / f.name.format(rank=rank())
        if not file.is_file() and "{rank}" in f.name:
            file = path / f.name.format(rank=0)
        parts[f.key] = readers[f.kind](file, f) if f.required or file.is_file() else None
    return parts


def storage_estimate(cfg, counts, bf16: bool, critic: bool) -> tuple[int, int]:
    """(bytes of one checkpoint, bytes of the final model). A checkpoint: the trainable weights and the value head in
    fp32, AdamW's two fp32 moments of each optimizer that trains (SFT: the LM's trainable weights; PPO: those and the
    value head), the moving reference (REF_UPDATE cycle). The final model: the LM in its training dtype (with LoRA
    the merged base: bf16 with BF16), the adapter, the value head when one trains
    (critic: the ADVANTAGE has one). counts: runtime.ParameterCounts."""
    lora = counts.adapter > 0
    head = counts.hidden + 1
    trainable = counts.adapter if lora else counts.total
    sft = cfg.MODE == "sft" or cfg.MODE == "hybrid"
    ppo = cfg.MODE != "sft"
    optimizers = 8 * trainable * sft + 8 * (trainable + head) * ppo
    reference = (4 * counts.adapter if lora else (2 if bf16 else 4) * counts.total) if cfg.REF_UPDATE == "cycle" else 0
    checkpoint = 4 * (trainable + head) + optimizers + reference + 64_000  # + state.json, rng and manifest files
    base = (2 if bf16 and lora else 4) * counts.total
    final = base + 4 * counts.adapter + 4 * head * (ppo and critic) + 32_000  # + config, tokenizer
    return checkpoint, final


def storage_line(checkpoint: Optional[int], final: Optional[int]) -> str:
    if checkpoint is None:
        return "unknown until the model is converted (a .gguf converts at the first run)"
    return f"a checkpoint about {human_bytes(checkpoint)}, the final model about {human_bytes(final)}"


# ==================================================================================================
# 3. The final model: inference_lm/, ppo_full/, best/
# ==================================================================================================
def save_final(out_dir: Path, trainer, cfg, card: str = "") -> None:
    """inference_lm/ (a plain causal LM; with LoRA the adapter merged into the base) and ppo_full/ (what continuing RL
    needs beyond it: the LM's weights as links to inference_lm's files, never a second copy, or with LoRA the adapter;
    the value head when one was trained; the tokenizer and the trainer's config). Every process calls it (FSDP
    gathers); the main one writes (write_final)."""
    lm, state, lora = saveable_lm(trainer, cfg)
    v_head = {k: full_tensor(v) for k, v in trainer.policy.v_head.state_dict().items()}
    if not is_main():
        return
    tok = trainer.tokenizer
    latest = latest_checkpoint(out_dir)
    then = "; the partial copies were removed. " + (
        f"The newest checkpoint, {latest}, is kept: free space and rerun the same command to resume from it and save"
        if latest
        else "There is no checkpoint (SAVE_EVERY 0): the run's weights are lost; free space (the estimate is in plan.json) and run again"
    )
    try:
        with writing("the final model (inference_lm, ppo_full)", out_dir, trainer.plan.final_bytes or tensor_bytes(v_head), then):
            write_final(out_dir, trainer, cfg, lm, tok, lora, state, v_head, card)
    except DiskFull:
        for name in (".tmp-inference_lm", ".tmp-ppo_full"):
            shutil.rmtree(out_dir / name, ignore_errors=True)
        raise
    for name in ("inference_lm", "ppo_full"):
        print(f"saved {name} -> {out_dir / name}", flush=True)


def saveable_lm(trainer, cfg):
    """-> (lm, state_dict or None, lora): the policy's LM as save_pretrained takes it. Under FSDP every process gathers
    the full weights (call it on all); with FSDP + LoRA the main process rebuilds an unsharded copy (state None)."""
    lm = trainer.policy.lm
    lora = hasattr(lm, "peft_config")
    untied = {n for n, _ in lm.named_parameters()} | {n for n, _ in lm.named_buffers()}  # a tied weight once
    state = {k: full_tensor(v) for k, v in lm.state_dict().items() if k in untied} if cfg.FSDP else None  # every process
    if is_main() and lora and state is not None:  # FSDP + LoRA: rebuild an unsharded model to save the adapter and merge
        lm, state = unsharded_peft_copy(lm, state), None
    return lm, state, lora


def save_best(out_dir: Path, trainer, cfg, step: int, value: float) -> None:
    """OUTPUT_DIR/best/: the weights of the best evaluation so far (SAVE_BEST), replaced whole (written beside, then
    renamed): a plain from_pretrained directory, or with LoRA the adapter (its base named inside, as ppo_full's), with
    the tokenizer and best.json (metric, direction, value, step). Every process calls it (FSDP gathers)."""
    lm, state, lora = saveable_lm(trainer, cfg)
    failure = None
    if is_main():
        clear_gguf_flag(lm.get_base_model() if lora else lm)
        meta = {"metric": cfg.SAVE_BEST, "mode": cfg.SAVE_BEST_MODE, "value": value, "step": step}

        def write(tmp: Path) -> None:
            if lora:
                lm.save_pretrained(tmp, selected_adapters=["default"])
            else:
                lm.save_pretrained(tmp, state_dict=state)
            trainer.tokenizer.save_pretrained(tmp)
            (tmp / "best.json").write_text(json.dumps(meta, indent=1))

        try:
            with writing(
                "the best model (best/)",
                out_dir,
                trainer.plan.final_bytes or 0,
                "; the partial copy was removed "
                "and best/ holds the previous best. Free space, then rerun the same command (it resumes from the "
                "newest checkpoint)",
            ):
                write_dir(out_dir / "best", write)
        except DiskFull as e:
            shutil.rmtree(out_dir / ".tmp-best", ignore_errors=True)
            failure = str(e)
    all_or_none(failure)  # a full disk ends every process with the main one's message
    say(f"best {cfg.SAVE_BEST} so far: {value:.4f} at step {step} -> {out_dir / 'best'}")


def write_final(out_dir: Path, trainer, cfg, lm, tok, lora: bool, state: Optional[dict], v_head: dict, card: str) -> None:
    """save_final's writes, on the main process."""
    from safetensors.torch import save_file

    clear_gguf_flag(lm.get_base_model() if lora else lm)
    full = out_dir / ".tmp-ppo_full"
    shutil.rmtree(full, ignore_errors=True)
    full.mkdir(parents=True)
    if lora:
        lm.save_pretrained(full, selected_adapters=["default"])
        lm = lm.merge_and_unload(adapter_names=["default"])  # plain model: base weights + the trained update
        clear_gguf_flag(lm)
    write_dir(
        out_dir / "inference_lm",
        lambda tmp: (
            lm.save_pretrained(tmp, state_dict=state),
            tok.save_pretrained(tmp),
            (tmp / "README.md").write_text(card) if card else None,
        ),
    )
    if not lora:  # the same weights: linked, not copied
        lm.config.save_pretrained(full)
        for weights in (out_dir / "inference_lm").glob("model*.safetensors*"):
            link_or_copy(weights, full / weights.name)
    tok.save_pretrained(full)
    if trainer.critic and cfg.MODE != "sft":  # a value head that was trained (else: zeros)
        save_file(v_head, str(full / "value_head.safetensors"))
    (full / "trainer_config.json").write_text(json.dumps(resolved_config(cfg, trainer.plan), indent=2))
    shutil.rmtree(out_dir / "ppo_full", ignore_errors=True)
    os.replace(full, out_dir / "ppo_full")


def write_dir(final: Path, write: Callable) -> None:
    """write(tmp) into a temporary sibling, then renamed into place: a crash leaves no half-written directory."""
    tmp = final.parent / f".tmp-{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)


def link_or_copy(src: Path, dst: Path) -> None:
    """A hard link (no second copy of the bytes; either name can be deleted), else a relative symbolic link, else a copy."""
    try:
        os.link(src, dst)
    except OSError:
        try:
            dst.symlink_to(os.path.relpath(src, dst.parent))
        except OSError:
            shutil.copy2(src, dst)


def unsharded_peft_copy(lm, state: dict):
    """FSDP + LoRA: the same peft model rebuilt unsharded on the CPU (base from disk, then every gathered weight)."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(lm.config.name_or_path, dtype=next(iter(state.values())).dtype)
    copy_ = get_peft_model(base, lm.peft_config["default"])
    state = {k: v for k, v in state.items() if ".ref." not in k}
    result = copy_.load_state_dict(state, strict=False)
    if result.unexpected_keys or [k for k in result.missing_keys if k in state]:
        raise RuntimeError(f"unsharded copy does not match: {result.unexpected_keys[:3]}")
    return copy_


# ==================================================================================================
# 4. Metrics: metrics.jsonl and the REPORT_TO trackers
# ==================================================================================================
class MetricsLog:
    """OUTPUT_DIR/metrics.jsonl: one JSON line per step (and per evaluation), flushed at once; and the REPORT_TO
    trackers (accelerate.tracking's), with the same keys and steps, the resolved config as the run's parameters, eval
    samples as a table. Only the main process writes. Resume: metrics.jsonl drops the lines past the checkpoint;
    TensorBoard purges them (purge_step); the others continue the same run (its id kept in OUTPUT_DIR/trackers.json)
    and are not sent again the steps they already hold: the resumed run repeats them exactly."""

    def __init__(self, path: Path, keep_up_to_step: Optional[int] = None, cfg=None, config: Optional[dict] = None):
        self.path, self.trackers, self.sent_up_to = path, [], -1  # the last step the trackers got before a resume
        if not is_main():  # one metrics.jsonl per run: the main process writes it
            self.file = open(os.devnull, "w")
            return
        if keep_up_to_step is not None and path.exists():  # resume: drop lines past the checkpoint
            lines = [line for line in path.read_text().splitlines() if line.strip()]
            self.sent_up_to = max((json.loads(line)["step"] for line in lines), default=-1)
            path.write_text("".join(line + "\n" for line in lines if json.loads(line)["step"] <= keep_up_to_step))
        self.file = path.open("a")
        if cfg is not None and cfg.REPORT_TO:
            self.trackers = start_trackers(cfg, path.parent, config or cfg.resolved(), keep_up_to_step or 0)

    def log(self, record: dict) -> None:
        line = json.dumps(record) + "\n"
        latest = latest_checkpoint(self.path.parent)
        then = (
            f"; the run stops here. Its newest checkpoint, {latest}, is intact: free space and rerun the same command to resume"
            if latest
            else "; the run stops here, and it has no checkpoint (SAVE_EVERY 0): free space and run again"
        )
        try:
            with writing("a line of metrics.jsonl", self.path.parent, len(line), then):
                self.file.write(line)
                self.file.flush()
        except DiskFull:
            with contextlib.suppress(OSError):  # what the file still buffers cannot be written either
                self.file.close()
            self.file = open(os.devnull, "w")
            raise
        step = record["step"]
        scalars = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        with writing("the trackers' files (REPORT_TO)", self.path.parent, len(line), then):
            for name, tracker in self.trackers:
                if step <= self.sent_up_to and name != "tensorboard":  # held from before the resume (TensorBoard purged them)
                    continue
                tracker.log(scalars, step=step)
                if record.get("samples"):
                    TRACKERS[name].table(tracker, record["samples"], step)

    def close(self) -> None:
        self.file.close()
        for _, tracker in self.trackers:
            tracker.finish()

    def read(self) -> list[dict]:
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


SAMPLE_COLUMNS = ["prompt", "target", "response", "reward"]


def sample_rows(samples: list[dict]) -> list[list]:
    return [[str(s["prompt"]), str(s["target"]), str(s["response"]), number(s["reward"])] for s in samples]


def store_params(tracker, config: dict) -> None:
    """The resolved config as the run's parameters (strings for what is not a number, a string or a bool)."""
    tracker.store_init_configuration({k: v if isinstance(v, (int, float, str, bool)) else json.dumps(v) for k, v in config.items()})


def tensorboard_config(tracker, config: dict) -> None:
    """The resolved config as a JSON text (TensorBoard's hparams would need a directory of their own)."""
    tracker.writer.add_text("config", "```json\n" + json.dumps(config, indent=2) + "\n```", 0)


def start_tensorboard(cfg, out: Path, run: str, tags: list, resume_step: int, ids: dict):
    """event files in OUTPUT_DIR/tensorboard (tensorboard --logdir OUTPUT_DIR); resume purges the steps past it"""
    from accelerate.tracking import TensorBoardTracker

    # purge_step: TensorBoard drops what an interrupted run wrote past the checkpoint, so no step appears twice
    return TensorBoardTracker("tensorboard", out, purge_step=resume_step + 1)


def start_wandb(cfg, out: Path, run: str, tags: list, resume_step: int, ids: dict):
    """Weights & Biases, offline (OUTPUT_DIR/wandb; `wandb sync` uploads it) unless WANDB_MODE or WANDB_API_KEY say otherwise"""
    for var in [v for v, value in os.environ.items() if v.startswith("WANDB_") and value == ""]:
        del os.environ[var]  # an empty variable is unset (wandb's settings reject WANDB_MODE="" with a traceback)
    import wandb
    from accelerate.tracking import WandBTracker

    os.environ.setdefault("WANDB_SILENT", "true")
    mode = None if os.environ.get("WANDB_MODE") or os.environ.get("WANDB_API_KEY") else "offline"
    ids.setdefault("wandb", secrets.token_hex(4))  # a run id of our own, kept for resume
    return WandBTracker(
        os.environ.get("WANDB_PROJECT", "hybrid_trainer"),
        name=run,
        id=ids["wandb"],
        resume="allow",
        tags=tags,
        dir=str(out),
        mode=mode,
        settings=wandb.Settings(console="off", quiet=True),
    )


def start_mlflow(cfg, out: Path, run: str, tags: list, resume_step: int, ids: dict):
    """MLflow: a local SQLite store, OUTPUT_DIR/mlflow.db (mlflow ui --backend-store-uri sqlite:///...), unless
    MLFLOW_TRACKING_URI is set"""
    import logging

    import mlflow
    from accelerate.tracking import MLflowTracker

    logging.getLogger("mlflow").setLevel(logging.WARNING)  # its database set-up notes
    if not os.environ.get("MLFLOW_TRACKING_URI"):  # (its plain-file store is retired: MLflow asks for a database)
        mlflow.set_tracking_uri(f"sqlite:///{(out / 'mlflow.db').resolve()}")
    tracker = MLflowTracker(
        experiment_name="hybrid_trainer",
        logging_dir=str((out / "mlflow-artifacts").resolve()),
        run_name=run,
        run_id=ids.get("mlflow"),
        tags={t: "true" for t in tags},
    )
    tracker.on_start = lambda: ids.update(mlflow=tracker.active_run.info.run_id)
    return tracker


USER_TRACKIO_DIR = os.environ.get("TRACKIO_DIR")  # the user's, if any, as this process started


def start_trackio(cfg, out: Path, run: str, tags: list, resume_step: int, ids: dict):
    """trackio: a local directory, OUTPUT_DIR/trackio unless TRACKIO_DIR is set (trackio show to browse it)"""
    wanted = USER_TRACKIO_DIR or str((out / "trackio").resolve())
    if "trackio" in sys.modules and str(sys.modules["trackio"].TRACKIO_DIR) != wanted:
        warn(
            f"trackio writes to {sys.modules['trackio'].TRACKIO_DIR}, not {wanted}: it fixes its directory when this process "
            "first imported it (an earlier run in the same Python process)"
        )
    os.environ["TRACKIO_DIR"] = wanted
    from accelerate.tracking import TrackioTracker

    return TrackioTracker("hybrid_trainer", name=run, resume="allow", group="-".join(tags))


def wandb_table(tracker, samples: list[dict], step: int) -> None:
    tracker.log_table("eval/samples", columns=SAMPLE_COLUMNS, data=sample_rows(samples), step=step)


def trackio_table(tracker, samples: list[dict], step: int) -> None:
    import trackio

    tracker.log({"eval/samples": trackio.Table(columns=SAMPLE_COLUMNS, data=sample_rows(samples))}, step=step)


def mlflow_table(tracker, samples: list[dict], step: int) -> None:
    import mlflow

    mlflow.log_table(
        {c: [row[i] for row in sample_rows(samples)] for i, c in enumerate(SAMPLE_COLUMNS)},
        artifact_file=f"eval_samples/step_{step:06d}.json",
    )


def tensorboard_table(tracker, samples: list[dict], step: int) -> None:
    rows = ["| prompt | reference | response | reward |", "|---|---|---|---|"] + [
        "| " + " | ".join(str(x).replace("|", "/").replace("\n", " ")[:200] for x in row) + " |" for row in sample_rows(samples)
    ]
    tracker.writer.add_text("eval/samples", "\n".join(rows), step)
    tracker.writer.flush()


class Tracker(NamedTuple):
    start: Callable  # (cfg, OUTPUT_DIR, run name, tags, resume step, saved run ids) -> an accelerate GeneralTracker
    table: Callable  # (tracker, eval samples, step): the samples as the tracker's kind of table
    module: str  # what must be importable
    package: str  # what pip installs
    config: Callable = store_params  # (tracker, resolved config): stored once, when the run starts


TRACKERS = {
    "tensorboard": Tracker(start_tensorboard, tensorboard_table, "tensorboard", "tensorboard", tensorboard_config),
    "wandb": Tracker(start_wandb, wandb_table, "wandb", "wandb"),
    "mlflow": Tracker(start_mlflow, mlflow_table, "mlflow", "mlflow-skinny sqlalchemy alembic"),
    "trackio": Tracker(start_trackio, trackio_table, "trackio", "trackio"),
}


def start_trackers(cfg, out: Path, config: dict, resume_step: int) -> list:
    """REPORT_TO's trackers, started, with the resolved config as the run's parameters (a new run) -> [(name, tracker)].
    Run name: OUTPUT_DIR's name when the run started; tags: MODE, ADVANTAGE (and HYBRID). Run names and ids persist in
    OUTPUT_DIR/trackers.json, so a resumed run continues the same tracker runs."""
    from accelerate import PartialState

    PartialState()  # accelerate's trackers log through its state (the launch this process already joined)
    ids_file = out / "trackers.json"
    ids = json.loads(ids_file.read_text()) if ids_file.is_file() else {}
    tags = [cfg.MODE, cfg.ADVANTAGE] + ([cfg.HYBRID] if cfg.MODE == "hybrid" else [])
    started = []
    for name in cfg.REPORT_TO:
        tracker = TRACKERS[name].start(cfg, out, ids.setdefault("name", out.name), tags, resume_step, ids)
        tracker.start()
        getattr(tracker, "on_start", lambda: None)()
        if not resume_step:
            TRACKERS[name].config(tracker, config)
        started.append((name, tracker))
    ids_file.write_text(json.dumps(ids))
    return started


def summary_line(record: dict) -> str:
    keys = [
        "sft/loss",
        "reward/mean",
        "objective/kl",
        "objective/kl_coef",
        "ppo/loss/policy",
        "ppo/loss/value",
        "ppo/policy/clipfrac",
        "ppo/response_length",
        "time/tokens_per_s",
    ]
    parts = [f"{k.split('/', 1)[-1].replace('/', '_')}={record[k]:.4g}" for k in keys if k in record]
    return f"step {record['step']} [{record['phase']}] " + " ".join(parts)


def check_trackers(cfg) -> None:
    """REPORT_TO's trackers are installed (checked at start and by --check, before any weights load)."""
    import importlib.util

    for name in cfg.REPORT_TO:
        if importlib.util.find_spec(TRACKERS[name].module) is None:
            raise UserError(
                f"REPORT_TO {name!r} needs {TRACKERS[name].module}, which is not installed: pip install {TRACKERS[name].package}"
            )


# ==================================================================================================
# 5. Reports: report.md and its plots, the model card
# ==================================================================================================
def pass_at_k(n: int, c: int, k: int) -> float:
    """Chen et al. 2021 ("Evaluating Large Language Models Trained on Code"), eq. 1: the unbiased estimate of the
    chance that at least one of k samples passes, from n samples of which c passed: 1 - C(n - c, k) / C(n, k)."""
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def write_report(out_dir: Path, records: list[dict], cfg=None, n_train: Optional[int] = None) -> str:
    """report.md: what was trained, the before/after table, a per-category table when items have one, examples
    that improved and that got worse, and the curves (PNG) with what each shows. Returns the table."""
    evals = [r for r in records if r.get("phase") == "eval"]
    first, last = evals[0], evals[-1]
    names = [k for k in first if k.startswith(("eval/", "retain/")) and k in last]  # RETAIN_FILE's rows: retain/...
    cell = lambda text: str(text).replace("|", "\\|").replace("\n", " ")[:160]  # noqa: E731
    table = "\n".join(
        [f"| metric | before (step {first['step']}) | after (step {last['step']}) | change |", "|---|---|---|---|"]
        + [f"| {k.removeprefix('eval/')} | {first[k]:.4f} | {last[k]:.4f} | {last[k] - first[k]:+.4f} |" for k in names]
    )
    steps = [r for r in records if r.get("phase") in ("sft", "ppo")]
    n_sft, n_ppo = sum(r["phase"] == "sft" for r in steps), sum(r["phase"] == "ppo" for r in steps)
    parts = ["# Training report\n"] + ([what_was_trained(cfg, n_sft, n_ppo, n_train, first, last)] if cfg is not None else [])
    parts += [
        "## Evaluation before and after\n",
        "Each row is a mean over the held-out items: `reward` is the configured reward, `bleu` and `rougeL` compare the "
        "response with the reference (0 to 1), `exact_match` counts responses equal to the reference after normalising "
        "case and punctuation, and `contains_reference` counts responses that contain the reference anywhere. A rise in "
        "`exact_match` with a flat or falling `contains_reference` means the model learnt the answer format rather "
        "than more answers; a fall in `contains_reference` means it forgot some. The `retain/` rows answer `RETAIN_FILE` "
        "(what the model must not lose) greedily: the share of answers containing the reference, overall and per category; "
        "`kl_to_reference` is the KL to the frozen reference on the held-out samples, which predicts forgetting.\n",
        table + "\n",
    ]
    if (out_dir / "best" / "best.json").is_file():
        best = json.loads((out_dir / "best" / "best.json").read_text())
        parts.append(
            f"**Best model** (`SAVE_BEST` `{best['metric']}`, {best['mode']}): {best['value']:.4f} at step "
            f"{best['step']}, in `best/` (the final model, step {last['step']}, is in `inference_lm/`).\n"
        )
    before, after = first["samples"], last["samples"]
    categories = sorted({s.get("category") for s in after if s.get("category") is not None})
    if categories:
        parts += [
            "## By category\n",
            "The same evaluation grouped by the items' category (`CATEGORY_FIELD`): the mean reward, "
            "and how many responses contain the reference (with several samples per item: summed over items of each "
            "one's share of samples). A category whose count falls is knowledge the model lost.\n",
            category_table(before, after, categories) + "\n",
        ]
    completions, shown_first = sample_completions(before, after, cell) if after else ([], 0)
    parts += completions
    if after and "trajectory" in after[0]:
        parts += one_trajectory(before[shown_first], after[shown_first], shown_first, cell)
    plots = plot_metrics(out_dir, records)
    if plots:
        parts.append("## Curves\n")
        for p in plots:
            parts.append(f"![{p.stem}]({p.name})\n\n{PLOT_CAPTIONS[p.stem[5:]]}\n")
    (out_dir / "report.md").write_text("\n".join(parts))
    return table


def what_was_trained(cfg, n_sft: int, n_ppo: int, n_train: Optional[int], first: dict, last: dict) -> str:
    """report.md's first paragraph: the mode, model, steps, data and reward, and what the evaluations were."""
    lora = f" with LoRA r={cfg.LORA_R}" if cfg.LORA_R else ""
    return (
        f"**What was trained.** `MODE` {cfg.MODE} on `{cfg.MODEL}`{lora}: {n_sft} SFT steps and {n_ppo} PPO updates over "
        f"{n_train} training items of `{cfg.TRAIN_FILE}` ({cfg.EPOCHS} epoch(s)); reward `{json.dumps(cfg.REWARD)}`. Before "
        f"training (step {first['step']}) and after (step {last['step']}) the model answered the {len(last['samples'])} "
        f"held-out prompts of `{cfg.EVAL_FILE}` greedily.\n"
    )


def one_trajectory(before: dict, after: dict, i: int, cell: Callable) -> list[str]:
    """report.md's whole trajectory of held-out item i (an environment's run), before and after training."""
    return [
        "## One whole trajectory\n",
        f"Held-out item {i} ({cell(before['prompt'])}), every turn after the prompt: the model's, and the environment's observations.\n",
        f"Before (reward {number(before['reward'])}):\n\n```\n{before['trajectory']}\n```\n",
        f"After (reward {number(after['reward'])}):\n\n```\n{after['trajectory']}\n```\n",
    ]


def answer_cell(sample: dict, cell: Callable) -> str:
    """A sample's response in a report table: the answer, and (REASONING) the reasoning before it, marked."""
    reasoning = sample.get("reasoning")
    return cell(sample["response"]) + (f" <br>*reasoning:* {cell(reasoning)}" if reasoning else "")


def sample_completions(before: list[dict], after: list[dict], cell: Callable) -> tuple[list[str], int]:
    """report.md's sample completions: the held-out items whose reward improved most, got worse most, and (always a
    few) unchanged -> (the section's parts, the item shown first)."""
    delta = [((a["reward"] or 0.0) - (b["reward"] or 0.0), i) for i, (b, a) in enumerate(zip(before, after))]
    improved = [i for d, i in sorted(delta, reverse=True) if d > 0][:3]
    worse = [i for d, i in sorted(delta) if d < 0][:3]
    unchanged = [i for d, i in delta if d == 0][: max(0, 4 - len(improved) - len(worse))]
    samples = ["| change | prompt | target | before | after | reward before → after |", "|---|---|---|---|---|---|"]
    for label, picked in (("improved", improved), ("worse", worse), ("unchanged", unchanged)):
        for i in picked:
            b, a = before[i], after[i]
            samples.append(
                f"| {label} | {cell(b['prompt'])} | {cell(b['target'])} | {answer_cell(b, cell)} | {answer_cell(a, cell)} | "
                f"{number(b['reward'])} → {number(a['reward'])} |"
            )
    parts = [
        "## Sample completions\n",
        "The held-out items whose reward improved most, then those that got worse most "
        f"({len([d for d, _ in delta if d > 0])} improved, {len([d for d, _ in delta if d < 0])} got worse, the rest unchanged): "
        "a headline gain can hide both.\n",
        "\n".join(samples) + "\n",
    ]
    return parts, (improved + unchanged + worse + [0])[0]


def category_table(before: list[dict], after: list[dict], categories: list) -> str:
    """Per category, before -> after: the mean reward, the responses that contain the reference, and with several
    samples per item (pass@k evaluation) pass@1, pass@k and maj@k."""
    sampled, voted = "passes" in after[0], "majority" in after[0]
    k = after[0].get("k", 1)
    head = "| category | items | reward before | reward after | contains reference before | after |"
    if sampled:
        head += f" pass@1 before | after | pass@{k} before | after |" + (f" maj@{k} before | after |" if voted else "")
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    measures = [lambda s: pass_at_k(s["k"], s["passes"], 1), lambda s: pass_at_k(s["k"], s["passes"], s["k"])]
    measures += [lambda s: float(s["majority"])] if voted else []
    for c in categories:
        idx = [i for i, s in enumerate(after) if s.get("category") == c]
        reward_b, reward_a = (np.mean([xs[i]["reward"] or 0.0 for i in idx]) for xs in (before, after))
        row = (
            f"| {c} | {len(idx)} | {reward_b:.3f} | {reward_a:.3f} | "
            f"{sum(before[i]['contains'] for i in idx):g}/{len(idx)} | {sum(after[i]['contains'] for i in idx):g}/{len(idx)} |"
        )
        if sampled:
            row += "".join(f" {np.mean([measure(xs[i]) for i in idx]):.3f} |" for measure in measures for xs in (before, after))
        rows.append(row)
    return "\n".join(rows)


def model_card(cfg, n_train: int, table: str) -> str:
    """inference_lm/README.md in the Hugging Face model-card format: YAML header (base_model, library_name, tags),
    then what was trained on what, the key settings, the eval before/after table, and how to load it."""
    base = ALIAS_HUB_IDS.get(cfg.MODEL.lower(), cfg.MODEL)
    method = {
        "sft": ["sft"],
        "ppo": [cfg.ADVANTAGE if cfg.ADVANTAGE != "gae" else "ppo"],
        "hybrid": ["sft", cfg.ADVANTAGE if cfg.ADVANTAGE != "gae" else "ppo", f"hybrid-{cfg.HYBRID}"],
    }[cfg.MODE]
    tags = ["hybrid-trainer", "trl"] + method + (["lora"] if cfg.LORA_R else [])
    keys = "MODE ADVANTAGE NUM_GENERATIONS HYBRID SFT_LOSS LORA_R EPOCHS SFT_BATCH LR_SFT PPO_BATCH PPO_EPOCHS LR_PPO".split()
    keys += "INIT_KL_COEF KL_IN MAX_NEW_TOKENS TEMPERATURE SEED".split()
    settings = "\n".join(f"| `{k}` | `{json.dumps(getattr(cfg, k))}` |" for k in keys)
    evaluation = (
        f"## Evaluation\n\nGreedy responses to the held-out prompts of `{cfg.EVAL_FILE}` before and after "
        f"training (`reward` is the training reward):\n\n{table}\n"
        if table
        else ""
    )
    return f"""---
base_model: {base}
library_name: transformers
tags:
{chr(10).join(f"- {t}" for t in tags)}
---

# {Path(cfg.OUTPUT_DIR).name}

Fine-tuned from `{base}` with `hybrid_trainer.py` (`MODE` {cfg.MODE}) on {n_train} items of
`{cfg.TRAIN_FILE}`. Reward: `{json.dumps(cfg.REWARD)}`.{" LoRA (r=%d) merged into the base weights." % cfg.LORA_R if cfg.LORA_R else ""}

## Training settings

| key | value |
|---|---|
{settings}

The whole resolved config is in `../config.json`, the per-step metrics in `../metrics.jsonl`.

{evaluation}
## How to load

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{Path(cfg.OUTPUT_DIR).resolve() / "inference_lm"}")
tokenizer = AutoTokenizer.from_pretrained("{Path(cfg.OUTPUT_DIR).resolve() / "inference_lm"}")
```
"""


def number(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"


PLOT_CAPTIONS = {
    "reward": "Mean reward of the sampled responses at each PPO update (noisy: a fresh batch each time).",
    "kl": "KL from the reference per response (nats), estimated from the sampled tokens at each PPO update. The estimate is "
    "noisy per batch and can be negative (a negative value is sampling noise, not a negative divergence); "
    '`KL_PENALTY: "full"` computes it exactly over the vocabulary.',
    "sft_loss": "SFT cross-entropy per response token (nats) at each SFT step.",
    "curriculum": "`CURRICULUM`: the level each PPO update's prompts came from (the training pass rate is `reward/pass_rate`).",
    "eval": "Held-out metrics at each evaluation (`EVAL_EVERY`).",
}


def plot_metrics(out_dir: Path, records: list[dict]) -> list[Path]:
    """One PNG per curve that has data: reward, KL, SFT loss, and eval metrics when there are 3 or more
    evaluations (with two, the report's table says it all). Headless matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evals = [r for r in records if r.get("phase") == "eval"]
    curves = {
        "reward": (["reward/mean"], "mean reward"),
        "kl": (["objective/kl"], "KL (nats per response)"),
        "sft_loss": (["sft/loss"], "cross-entropy (nats per token)"),
        "curriculum": (["curriculum/level"], "level"),
        "eval": (sorted({k for r in evals for k in r if k.startswith("eval/")}) if len(evals) >= 3 else [], "metric value"),
    }
    written = []
    for name, (keys, ylabel) in curves.items():
        series = {k: [(r["step"], r[k]) for r in records if k in r] for k in keys}
        if not any(series.values()):
            continue
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for k, points in series.items():
            if points:
                ax.plot(*zip(*points), marker="o" if len(points) < 30 else None, label=k)
        if name == "kl":
            ax.axhline(0, color="grey", lw=0.8)
        ax.set_xlabel("step (SFT steps + PPO updates)")
        ax.set_ylabel(ylabel)
        ax.set_title(name.replace("_", " "))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / f"plot_{name}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written
