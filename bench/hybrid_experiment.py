#!/usr/bin/env python3
"""docs/experiments.md's algorithm comparison: SFT only, PPO (gae), GRPO, RLOO, and the hybrids alternate, gate and mix,
on the demo data with the embedded SmolLM2, at an equal budget: 20 updates of 8 generated responses each (the
group estimators sample G = 4 responses for 2 prompts), 20 SFT steps of 8 demonstrations for SFT and alternate.

    python bench/hybrid_experiment.py [--only grpo,mix] [--parallel 2] [--out runs/experiment]

Each variant is configs/demo.json plus the overrides below, run as its own process (one thread each when
--parallel > 1). Prints and writes a markdown table: eval reward, exact match, and per task category the share
of eval responses that contain the reference, before -> after.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GROUP = {"NUM_GENERATIONS": 4, "PPO_BATCH": 2, "PPO_MINI": 1, "NUM_SAMPLES": 40}  # 20 updates x 8 responses
VARIANTS = {
    "sft": {"MODE": "sft"},
    "ppo (gae)": {"MODE": "ppo"},
    "grpo": {"MODE": "ppo", "ADVANTAGE": "grpo", "INIT_KL_COEF": 0.04, "KL_IN": "loss", "KL_PENALTY": "k3", **GROUP},
    "rloo": {"MODE": "ppo", "ADVANTAGE": "rloo", **GROUP},
    "alternate": {"MODE": "hybrid", "HYBRID": "alternate"},
    "gate": {"MODE": "hybrid", "HYBRID": "gate", "GATE_THRESHOLD": 0.5},
    "gate (grpo)": {"MODE": "hybrid", "HYBRID": "gate", "GATE_THRESHOLD": 0.5, "ADVANTAGE": "grpo", **GROUP},
    "mix": {"MODE": "hybrid", "HYBRID": "mix", "MIX_COEF": 0.5, "MIX_COEF_END": 0.1, "MIX_SCHEDULE": "cosine"},
    # the SFT term of mix runs at LR_PPO: these give it the SFT steps' learning rate
    "mix (phi, lr 5e-5)": {
        "MODE": "hybrid",
        "HYBRID": "mix",
        "MIX_COEF": 0.7,
        "MIX_COEF_END": 0.3,
        "MIX_SCHEDULE": "linear",
        "SFT_TOKEN_WEIGHT": "phi",
        "LR_PPO": 5e-5,
    },
    "mix (dft, lr 5e-5)": {"MODE": "hybrid", "HYBRID": "mix", "MIX_COEF": 0.7, "SFT_LOSS": "dft", "LR_PPO": 5e-5},
}


def summary(out: Path) -> dict:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["phase"] == "eval"]
    first, last = evals[0], evals[-1]
    cats = defaultdict(lambda: [0, 0, 0])
    for a, b in zip(first["samples"], last["samples"]):
        c = cats[a["category"]]
        c[0] += a["contains"]
        c[1] += b["contains"]
        c[2] += 1
    return {
        "reward": (first["eval/reward"], last["eval/reward"]),
        "exact": (first["eval/exact_match"], last["eval/exact_match"]),
        "categories": {k: v for k, v in sorted(cats.items())},
        "steps": sum(r["phase"] != "eval" for r in records),
        "responses": sum(r.get("time/tokens", 0) > 0 and (r["phase"] == "ppo") for r in records),
    }


def table(results: dict) -> str:
    cats = sorted({c for r in results.values() for c in r["categories"]})
    head = "| variant | eval reward | exact match | " + " | ".join(cats) + " | categories lost |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, r in results.items():
        lost = [c for c in cats if r["categories"][c][1] < r["categories"][c][0]]
        cells = [f"{r['categories'][c][0]}→{r['categories'][c][1]}/{r['categories'][c][2]}" for c in cats]
        lines.append(
            f"| {name} | {r['reward'][0]:.3f} → {r['reward'][1]:.3f} | {r['exact'][0]:.3f} → {r['exact'][1]:.3f} | "
            + " | ".join(cells)
            + f" | {', '.join(lost) or 'none'} |"
        )
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="", help="comma-separated variant names")
    ap.add_argument("--parallel", type=int, default=1)
    ap.add_argument("--out", default="runs/experiment")
    args = ap.parse_args()
    base = json.loads((ROOT / "configs" / "demo.json").read_text())
    base.update({"SAVE_EVERY": 0, "LOG_EVERY": 10})
    names = [n for n in VARIANTS if not args.only or n in args.only.split(",")]
    out_root = Path(args.out)
    out_root.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **({"OMP_NUM_THREADS": "1"} if args.parallel > 1 else {})}
    running, done = {}, {}
    queue = list(names)
    while queue or running:
        while queue and len(running) < args.parallel:
            name = queue.pop(0)
            out = out_root / name.replace(" ", "_").replace("(", "").replace(")", "")
            if (out / "report.md").exists():
                done[name] = out
                continue
            cfg = {**base, **VARIANTS[name], "OUTPUT_DIR": str(out), "RESUME": "auto"}
            path = out_root / f"{out.name}.json"
            path.write_text(json.dumps(cfg, indent=2))
            log = open(out_root / f"{out.name}.log", "w")
            running[name] = (
                subprocess.Popen(
                    [sys.executable, str(ROOT / "hybrid_trainer.py"), str(path)], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT
                ),
                out,
                time.time(),
            )
        for name, (proc, out, t0) in list(running.items()):
            if proc.poll() is not None:
                print(f"{name}: exit {proc.returncode} after {time.time() - t0:.0f} s", flush=True)
                del running[name]
                if proc.returncode == 0:
                    done[name] = out
        time.sleep(2)
    results = {n: summary(done[n]) for n in names if n in done}
    text = table(results)
    (out_root / "results.md").write_text(text + "\n")
    (out_root / "results.json").write_text(json.dumps(results, indent=2))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
