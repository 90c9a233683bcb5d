#!/usr/bin/env python3
"""Side by side with the peer users would pick (not a test): the same GRPO job in TRL 1.16's `GRPOTrainer` and here,
whole process each, and our own `hf` vs `vllm` backends. The job: SmolLM2-135M-Instruct (the embedded default, its
converted safetensors for TRL), the chain task's first 64 prompts in file order (data/chain_prompts.json, no shuffle on
either side), 16 optimizer steps of 4 prompts x 4 responses, 48 new tokens at temperature 1 (top-p 1, no top-k), the
same reward function (rewards.make_reward({"type": "math", "answer_field": "answer"}), TRL calls it through a wrapper),
GRPO's group-normalised advantage, one PPO epoch, clipping 0.2, learning rate 1e-5 (AdamW, constant), no KL, and
one precision for both: --precision bf16 (the default: TRL's default bf16=True, ours BF16 true, as BF16 "auto" chooses
on a CPU with fast bf16) or fp32.

TRL's defaults that would differ from ours or are CPU-hostile, set to match: bf16 as --precision (its default is
True), gradient_checkpointing=False (default True: recomputation costs time, and ours is off), learning_rate 1e-5
(default 1e-6), loss_type "grpo" (its default "dapo"; ours for ADVANTAGE grpo is the per-sequence token mean:
LOSS_AGG auto), lr_scheduler_type "constant" (default linear), warmup 0, shuffle_dataset=False,
max_completion_length 48, top_k 0, logging_steps 1, save_strategy "no" (the final model saved once, as ours does),
report_to "none", use_cpu=True.

Each run: wall time of its whole process (Python start to exit, model load and final save included), its peak
resident memory (getrusage of that child), then, untimed, the held-out reward of its final model: pass@1 over 4
samples at temperature 1 of each of the 100 held-out chain problems (data/chain_eval.json), the same evaluator (ours,
vLLM) for every row.

    python bench/peer_bench.py --only trl,hf,vllm --seeds 0,1,2      # appends to bench/results/peer/results.jsonl
    python bench/peer_bench.py --only trl_vllm --seeds 0             # TRL's own vLLM path (colocate) on the CPU build
    python bench/peer_bench.py --table
"""

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "runs" / "peer"
RESULTS = ROOT / "bench" / "results" / "peer"
PROMPTS, HELD_OUT = ROOT / "data" / "chain_prompts.json", ROOT / "data" / "chain_eval.json"
REWARD = {"type": "math", "answer_field": "answer"}
STEPS, PROMPTS_PER_STEP, GROUP, NEW_TOKENS, LR, CLIP = 16, 4, 4, 48, 1e-5, 0.2
OURS = {
    "MODE": "ppo",
    "MODEL": "smollm2-135m-instruct",
    "TRAIN_FILE": str(PROMPTS),
    "NUM_SAMPLES": STEPS * PROMPTS_PER_STEP,
    "SHUFFLE": False,
    "EPOCHS": 1,
    "PROMPT_FORMAT": "chat",
    "MAXSEQ": 256,
    "MAX_NEW_TOKENS": NEW_TOKENS,
    "TEMPERATURE": 1.0,
    "TOP_P": 1.0,
    "REPETITION_PENALTY": 1.0,
    "NO_REPEAT_NGRAM_SIZE": 0,
    "REWARD": REWARD,
    "ADVANTAGE": "grpo",
    "NUM_GENERATIONS": GROUP,
    "PPO_BATCH": PROMPTS_PER_STEP,
    "PPO_MINI": PROMPTS_PER_STEP,
    "PPO_EPOCHS": 1,
    "CLIPRANGE": CLIP,
    "LR_PPO": LR,
    "INIT_KL_COEF": 0.0,
    "MASK_TRUNCATED": False,
    "BF16": False,
    "SAVE_EVERY": 0,
    "LOG_EVERY": 1,
}
ROWS = {
    "trl": "TRL 1.16 GRPOTrainer, transformers generate",
    "trl_vllm": "TRL 1.16 GRPOTrainer, vLLM colocate",
    "hf": "ours, GENERATION_BACKEND hf",
    "vllm": "ours, GENERATION_BACKEND vllm",
}


def model_dir() -> str:
    """The embedded default's converted safetensors directory (what our run loads; TRL is given the same)."""
    sys.path.insert(0, str(ROOT))
    import hybrid_trainer as ht
    import runtime

    cfg = ht.Config.from_dict({"MODE": "sft", "TRAIN_FILE": str(PROMPTS), "OUTPUT_DIR": "-"})
    paths = runtime.resolve_model(cfg)
    runtime.prepare_weights(cfg, paths)
    return str(paths.weights)


def trl_worker(out: str, seed: int, vllm: bool, bf16: bool) -> None:
    """One TRL run (this process is what the parent times)."""
    import datasets
    from trl import GRPOConfig, GRPOTrainer

    sys.path.insert(0, str(ROOT))
    import rewards

    reward = rewards.make_reward(REWARD)

    def math_reward(prompts, completions, answer, **_):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return reward.scores(texts, [""] * len(texts), [str(p) for p in prompts], [{"answer": a} for a in answer])

    rows = json.loads(PROMPTS.read_text())[: STEPS * PROMPTS_PER_STEP]
    data = datasets.Dataset.from_list([{"prompt": r["prompt"], "answer": r["answer"]} for r in rows])
    args = GRPOConfig(
        output_dir=out,
        seed=seed,
        data_seed=seed,
        use_cpu=True,
        bf16=bf16,
        gradient_checkpointing=False,
        learning_rate=LR,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        per_device_train_batch_size=PROMPTS_PER_STEP * GROUP,
        gradient_accumulation_steps=1,
        num_generations=GROUP,
        max_completion_length=NEW_TOKENS,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        beta=0.0,
        epsilon=CLIP,
        num_iterations=1,
        loss_type="grpo",
        scale_rewards="group",
        mask_truncated_completions=False,
        shuffle_dataset=False,
        max_steps=STEPS,
        num_train_epochs=1,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        dataloader_num_workers=0,
        use_vllm=vllm,
        **({"vllm_mode": "colocate"} if vllm else {}),
    )
    trainer = GRPOTrainer(model=model_dir(), reward_funcs=math_reward, args=args, train_dataset=data)
    trainer.train()
    trainer.save_model(str(Path(out) / "inference_lm"))
    (Path(out) / "log_history.json").write_text(json.dumps(trainer.state.log_history))


def eval_worker(model: str, seed: int) -> None:
    """pass@1 (4 samples at temperature 1, vLLM in bf16) of `model` on the held-out chain problems: one JSON line."""
    import torch

    sys.path.insert(0, str(ROOT))
    import hybrid_trainer as ht
    import rewards

    cfg = ht.Config.from_dict(
        {
            "MODE": "sft",
            "MODEL": model,
            "TRAIN_FILE": str(HELD_OUT),
            "OUTPUT_DIR": "-",
            "PROMPT_FORMAT": "chat",
            "SHUFFLE": False,
            "SEED": seed,
            "BF16": True,
            "MAX_NEW_TOKENS": NEW_TOKENS,
            "EVAL_NUM_SAMPLES": 4,
            "EVAL_TEMPERATURE": 1.0,
            "TOP_P": 1.0,
            "REPETITION_PENALTY": 1.0,
            "NO_REPEAT_NGRAM_SIZE": 0,
            "GENERATION_BACKEND": "vllm",
            "REWARD": REWARD,
        }
    )
    torch.manual_seed(seed)
    policy, _, tok = ht.load_model(cfg, torch.device("cpu"), True)
    examples = ht.tokenize_examples(ht.load_examples(cfg), cfg, tok, "chat", "TRAIN_FILE")
    trainer = ht.HybridTrainer(cfg, policy, None, tok, plan=ht.api_plan(cfg, lm=policy.lm, bf16=False))
    result = ht.evaluate(trainer, examples, {"reward": rewards.make_reward(REWARD)})
    print(json.dumps({k: v for k, v in result.items() if k.startswith("eval/pass@") or k == "eval/reward"}))


def machine() -> str:
    """This machine, as each result records it: results from different machines compare only within one."""
    sys.path.insert(0, str(ROOT))
    import runtime

    return f"{runtime.cpu_model()}, {os.cpu_count()} CPUs"


def machine_dir(base: Path, label: str) -> Path:
    """Where one machine's logs go (results from before the label have theirs in `base` itself)."""
    return base / re.sub(r"[^A-Za-z0-9]+", "_", label).strip("_")


def timed(argv: list, log: Path, cwd: Optional[Path] = None) -> tuple[float, float, int]:
    """Run argv as a child (output to `log`): (wall seconds, its peak RSS in GB, exit code)."""
    start = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, cwd=cwd, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        _, status, usage = os.wait4(proc.pid, 0)
    return time.perf_counter() - start, usage.ru_maxrss / 2**20, os.waitstatus_to_exitcode(status)


def run(row: str, seed: int, precision: str, where: str) -> dict:
    out = OUT / f"{row}-{precision}-s{seed}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    if row.startswith("trl"):
        argv = [sys.executable, __file__, "--trl-worker", str(out), str(seed), "--precision", precision] + (
            ["--vllm"] if row == "trl_vllm" else []
        )
    else:
        cfg = {**OURS, "SEED": seed, "OUTPUT_DIR": str(out / "run"), "GENERATION_BACKEND": row, "BF16": precision == "bf16"}
        (out / "config.json").write_text(json.dumps(cfg, indent=1))
        argv = [sys.executable, str(ROOT / "hybrid_trainer.py"), str(out / "config.json")]
    seconds, peak_gb, code = timed(argv, out / "train.log")
    result = {
        "row": row,
        "precision": precision,
        "seed": seed,
        "wall_s": round(seconds, 1),
        "peak_rss_gb": round(peak_gb, 2),
        "exit": code,
        "machine": where,
    }
    model = out / "inference_lm" if row.startswith("trl") else out / "run" / "inference_lm"
    if code == 0:
        ev = subprocess.run(
            [sys.executable, __file__, "--eval-worker", str(model), str(seed)],
            capture_output=True,
            text=True,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
        lines = [x for x in ev.stdout.splitlines() if x.startswith("{")]
        result.update(json.loads(lines[-1]) if lines else {"eval_error": ev.stderr[-800:]})
    else:
        result["error"] = (out / "train.log").read_text()[-1500:]
    shutil.rmtree(model, ignore_errors=True)  # 0.5 GB each: the numbers are what this keeps
    shutil.rmtree(out / "run" / "ppo_full", ignore_errors=True)
    logs = machine_dir(RESULTS, where)
    logs.mkdir(parents=True, exist_ok=True)
    with (RESULTS / "results.jsonl").open("a") as f:
        f.write(json.dumps(result) + "\n")
    shutil.copy(out / "train.log", logs / f"{row}-{precision}-s{seed}.log")
    if (out / "run" / "metrics.jsonl").is_file():
        shutil.copy(out / "run" / "metrics.jsonl", logs / f"{row}-{precision}-s{seed}.metrics.jsonl")
    if (out / "log_history.json").is_file():
        shutil.copy(out / "log_history.json", logs / f"{row}-{precision}-s{seed}.log_history.json")
    print(json.dumps({k: v for k, v in result.items() if k != "error"}), flush=True)
    return result


def mean_sd(xs: list, digits: int) -> str:
    return f"{statistics.mean(xs):.{digits}f}" + (f" ± {statistics.stdev(xs):.{digits}f}" if len(xs) > 1 else "")


UNLABELLED = "a 2-core Intel Xeon with AMX (results from before each recorded its machine)"


def table() -> str:
    """One table per machine."""
    results = [json.loads(x) for x in (RESULTS / "results.jsonl").read_text().splitlines()]
    out = []
    for where in dict.fromkeys(r.get("machine", UNLABELLED) for r in results):
        mine = [r for r in results if r.get("machine", UNLABELLED) == where]
        lines = [
            f"{where}:",
            "",
            "| run | precision | seeds | whole process (s) | peak RSS (GB) | held-out pass@1 |",
            "|---|---|---|---|---|---|",
        ]
        for precision in ("bf16", "fp32"):
            for row, title in ROWS.items():
                lines += table_row(
                    [r for r in mine if r["row"] == row and r.get("precision", "fp32") == precision], f"{title} | {precision}"
                )
        out.append("\n".join(lines))
    return "\n\n".join(out)


def table_row(results: list, title: str) -> list:
    done = [r for r in results if r["exit"] == 0 and "eval/pass@1" in r]
    if not done:
        failed = [r for r in results if r["exit"] != 0]
        return [f"| {title} | {len(failed)} | failed (exit {failed[-1]['exit']}) | | |"] if failed else []
    cells = [mean_sd([r[key] for r in done], digits) for key, digits in (("wall_s", 1), ("peak_rss_gb", 2), ("eval/pass@1", 3))]
    return [f"| {title} | {len(done)} | " + " | ".join(cells) + " |"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default="trl,hf,vllm", help=f"rows, comma-separated: {', '.join(ROWS)}")
    p.add_argument("--seeds", default="0")
    p.add_argument("--precision", default="bf16", choices=("bf16", "fp32"))
    p.add_argument("--table", action="store_true")
    p.add_argument("--trl-worker", nargs=2, metavar=("OUT", "SEED"), help=argparse.SUPPRESS)
    p.add_argument("--vllm", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--eval-worker", nargs=2, metavar=("MODEL", "SEED"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.trl_worker:
        return trl_worker(args.trl_worker[0], int(args.trl_worker[1]), args.vllm, args.precision == "bf16")
    if args.eval_worker:
        return eval_worker(args.eval_worker[0], int(args.eval_worker[1]))
    if args.table:
        return print(table())
    rows = args.only.split(",")
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        raise SystemExit(f"unknown rows {unknown}: choose from {', '.join(ROWS)}")
    where = machine()
    for seed in (int(s) for s in args.seeds.split(",")):
        for row in rows:  # the rows of one seed back to back: the machine's state is alike for each
            run(row, seed, args.precision, where)


if __name__ == "__main__":
    main()
