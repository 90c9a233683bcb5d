#!/usr/bin/env python3
"""A refactor changes no number: run the same short runs (fixed seed, fp32, a tiny chat model built here) with two
checkouts of the trainer and compare their metrics.jsonl line by line. Every number of the first checkout must
match within --tol (time/* keys excepted: they are wall-clock); texts (eval samples) must be equal. Keys only the
second checkout logs are listed, not failed.

    git worktree add --detach /tmp/base <REV>
    python bench/same_numbers.py --base /tmp/base                 # base vs this checkout
    python bench/same_numbers.py --base /tmp/base --only grpo,gate
    python bench/same_numbers.py --base /tmp/base --new-set MINIBATCH_GROUPS=false   # a new key at the base's behaviour

Exit 0 when every run matches, 1 otherwise. Not a test: it takes a few minutes on 2 cores.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

COMMON = {
    "SEED": 0,
    "BF16": False,
    "NUM_SAMPLES": 8,
    "MAX_NEW_TOKENS": 8,
    "MAXSEQ": 96,
    "PPO_EPOCHS": 2,
    "LR_PPO": 1e-3,
    "LR_SFT": 1e-3,
    "REWARD": {"type": "chrf"},
    "EVAL_SAMPLES": 4,
    "LOG_EVERY": 100,
    "TEMPERATURE": 1.0,
}
RUNS = {
    "ppo": {"MODE": "ppo", "PPO_BATCH": 4, "PPO_MINI": 2},
    "ppo_fused": {
        "MODE": "ppo",
        "PPO_BATCH": 4,
        "TOP_P": 1.0,
        "NO_REPEAT_NGRAM_SIZE": 0,
        "REPETITION_PENALTY": 1.0,
        "GENERATION_BACKEND": "hf",
    },
    "grpo": {
        "MODE": "ppo",
        "ADVANTAGE": "grpo",
        "NUM_GENERATIONS": 4,
        "PPO_BATCH": 2,
        "PPO_MINI": 1,
        "KL_IN": "loss",
        "KL_PENALTY": "k3",
        "INIT_KL_COEF": 0.04,
    },
    "gate": {"MODE": "hybrid", "HYBRID": "gate", "ADVANTAGE": "rloo", "NUM_GENERATIONS": 2, "PPO_BATCH": 2, "GATE_THRESHOLD": 0.3},
    "mix": {
        "MODE": "hybrid",
        "HYBRID": "mix",
        "ADVANTAGE": "grpo",
        "NUM_GENERATIONS": 2,
        "PPO_BATCH": 2,
        "SFT_LOSS": "dft",
        "MIX_COEF": 0.7,
        "MIX_COEF_END": 0.2,
        "MIX_SCHEDULE": "cosine",
        "SFT_TOKEN_WEIGHT": "phi",
    },
    "remax": {"MODE": "ppo", "ADVANTAGE": "remax", "PPO_BATCH": 4, "KL_PENALTY": "full"},
    "alternate": {
        "MODE": "hybrid",
        "SFT_BATCH": 4,
        "PPO_BATCH": 4,
        "CYCLE_SFT_STEPS": 1,
        "CYCLE_PPO_UPDATES": 1,
        "REF_UPDATE": "cycle",
        "LR_SCHEDULE": "cosine",
        "WARMUP_STEPS": 1,
    },
    "lora": {"MODE": "hybrid", "HYBRID": "mix", "LORA_R": 4, "ADVANTAGE": "rloo", "NUM_GENERATIONS": 2, "PPO_BATCH": 2},
    "lora_vllm": {
        "MODE": "hybrid",
        "HYBRID": "mix",
        "LORA_R": 4,
        "ADVANTAGE": "rloo",
        "NUM_GENERATIONS": 2,
        "PPO_BATCH": 2,
        "GENERATION_BACKEND": "vllm",
        "NO_REPEAT_NGRAM_SIZE": 0,
        "MAX_NEW_TOKENS": 6,
    },
    "stateful": {
        "MODE": "ppo",
        "ADVANTAGE": "remax",
        "PPO_BATCH": 4,
        "MISSING_EOS_PENALTY": 0.5,  # a running normalisation
        "REWARD": {
            "type": "weighted_sum",
            "components": [{"type": "chrf"}, {"type": "length", "target": 3}],
            "postprocess": [{"type": "normalize"}],
        },
    },
}


def compare(base: list, new: list, tol: float) -> list[str]:
    problems, extra = [], set()
    if len(base) != len(new):
        problems.append(f"{len(base)} lines vs {len(new)}")
    for a, b in zip(base, new):
        extra |= set(b) - set(a)
        for key, va in a.items():
            if key.startswith("time/"):
                continue
            if key not in b:
                problems.append(f"step {a['step']}: {key} missing")
            elif isinstance(va, float) or isinstance(b[key], float):
                if not (math.isclose(va, b[key], rel_tol=tol, abs_tol=tol) or (math.isnan(va) and math.isnan(b[key]))):
                    problems.append(f"step {a['step']}: {key} {va!r} vs {b[key]!r}")
            elif va != b[key]:
                problems.append(f"step {a['step']}: {key} differs: {str(va)[:80]!r} vs {str(b[key])[:80]!r}")
    if extra:
        print(f"    (keys only the second logs: {sorted(extra)})")
    return problems


def run(root: Path, tag: str, name: str, work: Path, model: Path, data: Path, extra: dict) -> list:
    out = work / f"{tag}-{name}"
    cfg = {
        **COMMON,
        **RUNS[name],
        **extra,
        "MODEL": str(model),
        "TRAIN_FILE": str(data / "train.json"),
        "EVAL_FILE": str(data / "eval.json"),
        "OUTPUT_DIR": str(out),
        "CACHE_DIR": str(work / "cache"),
    }
    path = work / f"{tag}-{name}.json"
    path.write_text(json.dumps(cfg))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    done = subprocess.run([sys.executable, str(root / "hybrid_trainer.py"), str(path)], env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{root} {name} failed:\n{done.stderr[-3000:]}")
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="the other checkout (the reference numbers)")
    p.add_argument("--new", default=str(ROOT), help="the checkout compared with it (default: this one)")
    p.add_argument("--only", default="", help="comma-separated runs: " + ", ".join(RUNS))
    p.add_argument("--tol", type=float, default=1e-6)
    p.add_argument("--new-set", action="append", default=[], help="KEY=JSON for the second checkout only (a key the base lacks)")
    args = p.parse_args()
    new_set = {k: json.loads(v) for k, v in (s.split("=", 1) for s in args.new_set)}
    from conftest import build_tiny_model

    names = args.only.split(",") if args.only else list(RUNS)
    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = build_tiny_model(work / "model", chat=True)
        data = work / "data"
        data.mkdir()
        words = ["yes", "no", "cat", "dog", "paris", "world", "four", "mat"]
        items = [{"instruction": f"write the word {w}", "output": f"{w} {w}"} for w in words * 2]
        (data / "train.json").write_text(json.dumps(items))
        (data / "eval.json").write_text(json.dumps(items[:4]))
        for name in names:
            base, new = (
                run(Path(r).resolve(), tag, name, work, model, data, extra)
                for tag, r, extra in (("base", args.base, {}), ("new", args.new, new_set))
            )
            problems = compare(base, new, args.tol)
            print(f"{name}: {len(base)} lines, " + ("same numbers" if not problems else f"{len(problems)} differences"), flush=True)
            for line in problems[:10]:
                print("    " + line)
            failed += bool(problems)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
