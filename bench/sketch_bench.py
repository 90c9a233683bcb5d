#!/usr/bin/env python3
"""The design sketch's PPO job, whole process, the sketch (TRL 0.11.4's PPOTrainer) and this trainer in turn on one
machine (not a test). The job: SmolLM2-135M-Instruct (the embedded default's converted safetensors for the sketch),
the demo's first 24 prompts after the seeded shuffle (data/train.json, NUM_SAMPLES 24), PPO_BATCH 8, 32 new
tokens, chrF, one epoch = 3 updates; everything else
each trainer's defaults (ours: BF16 "auto", GENERATION_BACKEND "auto", which is hf here: NO_REPEAT_NGRAM_SIZE
defaults to 3). The sketch's code is taken from the design document (its one python block, with the changes
in PATCHES without which it does not run) and run, with this
checkout's rewards.py beside it (the sketch imports make_reward), by an interpreter that has TRL 0.11.4:

    python3 -m venv /tmp/trl011 && /tmp/trl011/bin/pip install torch==2.13.0 trl==0.11.4 transformers==4.46.3 \\
        accelerate==1.0.1 'datasets<4' sacrebleu rich   # rich: TRL 0.11.4 imports it and does not require it
    python bench/sketch_bench.py --sketch-python /tmp/trl011/bin/python --runs 2   # appends to bench/results/sketch/

    python bench/sketch_bench.py --sketch-python /tmp/trl011/bin/python --set BF16=false   # ours in fp32, as the sketch

Each run: wall time of the whole process and its peak RSS, with the machine (results compare only within one) and
ours' overrides; the pairs alternate (sketch, ours, sketch, ours).
"""

import argparse
import json
import re
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from peer_bench import machine, machine_dir, model_dir, timed  # noqa: E402
from step_bench import overrides  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "runs" / "sketch"
RESULTS = ROOT / "bench" / "results" / "sketch"
JOB = {
    "MODE": "ppo",
    "TRAIN_FILE": str(ROOT / "data" / "train.json"),
    "NUM_SAMPLES": 24,
    "PPO_BATCH": 8,
    "MAX_NEW_TOKENS": 32,
    "REWARD": {"type": "chrf"},
    "EPOCHS": 1,
    "SEED": 0,
}


# The sketch as written does not run here; the smallest changes that make it run, and nothing else:
PATCHES = [
    # device_map "auto" puts the model on "cpu" without a GPU, which TRL 0.11.4's value-head model refuses ("CPU & disk
    # offloading is not supported"); None loads it in place
    ('    device_map = "auto"', "    device_map = None"),
    # log_with given twice (PPOConfig's and accelerator_kwargs'): Accelerator() "got multiple values for keyword argument"
    ('        accelerator_kwargs={"log_with": None},\n', ""),
    # the loop's DataLoaders collate a batch of item dicts into one dict of lists; the loop reads a list of items
    (
        "        ppo_iter = iter(DataLoader(ds, batch_size=PPO_BATCH, shuffle=True))",
        "        ppo_iter = iter(DataLoader(ds, batch_size=PPO_BATCH, shuffle=True, collate_fn=list))",
    ),
    (
        "        sft_iter = iter(DataLoader(ds, batch_size=SFT_BATCH, shuffle=True))",
        "        sft_iter = iter(DataLoader(ds, batch_size=SFT_BATCH, shuffle=True, collate_fn=list))",
    ),
    # PPOTrainer.step takes one tensor per score ("Elements in scores must be tensors"); the loop appends floats
    (
        "                    ppo_trainer.step(q, r, rewards)",
        "                    ppo_trainer.step(q, r, [torch.tensor(x) for x in rewards])",
    ),
]


def sketch_code(design: Path) -> str:
    """The design document's python block (between ````python and ````)."""
    text = design.read_text()
    match = re.search(r"````python\n(.*?)\n````", text, re.S)
    if not match:
        raise SystemExit(f"{design}: no ````python block")
    code = match.group(1)
    for old, new in PATCHES:
        if old not in code:
            raise SystemExit(f"{design}: the sketch no longer has {old.strip()!r}; check PATCHES")
        code = code.replace(old, new, 1)
    return code


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sketch-python", required=True, help="an interpreter with TRL 0.11.4")
    p.add_argument("--design", default=str(ROOT.parent / "shared" / "seed" / "hybrid_trainer_design.md"))
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--set", action="append", default=[], help="KEY=JSON: a key of ours' config (the sketch's stays as it is)")
    args = p.parse_args()
    ours = overrides(args.set)
    where = machine()
    logs = machine_dir(RESULTS, where) / time.strftime("%Y%m%d-%H%M%S")  # this invocation's logs
    weights = Path(model_dir())
    sketch_dir, sketch_model = OUT / "sketch_code", OUT / "sketch_model"
    shutil.rmtree(OUT, ignore_errors=True)
    sketch_dir.mkdir(parents=True)
    sketch_model.mkdir()
    for f in weights.iterdir():  # the same files; transformers 4.46 does not know 5.x's tokenizer class name: SmolLM2's own
        (sketch_model / f.name).symlink_to(f)
    tok_config = json.loads((weights / "tokenizer_config.json").read_text())
    (sketch_model / "tokenizer_config.json").unlink()
    (sketch_model / "tokenizer_config.json").write_text(json.dumps({**tok_config, "tokenizer_class": "GPT2TokenizerFast"}))
    (sketch_dir / "hybrid_trainer.py").write_text(sketch_code(Path(args.design)))
    shutil.copy(ROOT / "rewards.py", sketch_dir / "rewards.py")
    logs.mkdir(parents=True, exist_ok=True)
    for i in range(args.runs):
        for who in ("sketch", "ours"):
            out = OUT / f"{who}-{i}"
            config = {
                **JOB,
                "MODEL": str(sketch_model) if who == "sketch" else "smollm2-135m-instruct",
                "OUTPUT_DIR": str(out),
                **({} if who == "sketch" else ours),
            }
            if who == "sketch":  # its own key: CLEANSE (default true) calls torch.cuda.ipc_collect(), which fails without CUDA
                config["CLEANSE"] = False
            path = OUT / f"{who}-{i}.json"
            path.write_text(json.dumps(config, indent=1))
            script = sketch_dir / "hybrid_trainer.py" if who == "sketch" else ROOT / "hybrid_trainer.py"
            python = args.sketch_python if who == "sketch" else sys.executable
            seconds, peak_gb, code = timed([python, str(script), str(path)], OUT / f"{who}-{i}.log", cwd=script.parent)
            result = {
                "who": who,
                "run": i,
                "wall_s": round(seconds, 1),
                "peak_rss_gb": round(peak_gb, 2),
                "exit": code,
                "machine": where,
                **({"set": ours} if who == "ours" and ours else {}),
            }
            if code:
                result["error"] = (OUT / f"{who}-{i}.log").read_text()[-1500:]
            with (RESULTS / "results.jsonl").open("a") as f:
                f.write(json.dumps(result) + "\n")
            shutil.copy(OUT / f"{who}-{i}.log", logs / f"{who}-{i}.log")
            print(json.dumps({k: v for k, v in result.items() if k != "error"}), flush=True)
            shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
