#!/usr/bin/env python3
"""Fine-tune a causal LM with SFT, PPO, or both interleaved, from one JSON config.

    python hybrid_trainer.py configs/demo.json           # train
    python hybrid_trainer.py configs/demo.json --check   # validate config + data, print the plan and one example
    python hybrid_trainer.py --help                      # every config key, with its default, and every registry

MODE "sft":    cross-entropy on response tokens (+ EOS) only; the prompt is masked.
MODE "ppo":    sample NUM_GENERATIONS responses per prompt, score them with rewards.make_reward(REWARD), and
               run a clipped PPO update: with a value head (ADVANTAGE "gae") or critic-free (grpo, rloo, ...),
               with a KL penalty against a frozen reference (in the reward or in the loss).
MODE "hybrid": HYBRID "alternate": CYCLE_SFT_STEPS SFT steps, then CYCLE_PPO_UPDATES PPO updates, repeated until
               the epoch's data is used, for EPOCHS; "gate": per prompt, SFT on its reference when no sampled
               response scores GATE_THRESHOLD, else RL; "mix": (1 - mu) RL + mu SFT on every prompt.

The PPO details follow Huang et al., "The N Implementation Details of RLHF with PPO" (2023) and TRL 0.11's
classic PPOTrainer.step(queries, responses, scores).

Map, top to bottom (each section owns what it lists; nothing below reaches into a section's internals except
through the names given here). This file is the algorithm; what it runs on and what a run writes are a click away,
in two modules that never import this one:
  1. Config and Plan   Config: every key, typed, documented, validated at load, frozen. Plan: everything derived once
                       at start (seed, precision, processes, batch sizes, the step schedule, step counts, model paths);
                       the update and the loop read their sizes there.
  2. Math              pure tensor functions; the registries KL_PENALTIES, LOSS_AGGREGATIONS, POLICY_LOSSES, KL_PLACES,
                       ROLLOUT_IS_MODES, ADVANTAGES, SFT_LOSSES, SFT_TOKEN_WEIGHTS, MIX_SCHEDULES, HYBRID_STRATEGIES.
  3. Data              rows (runtime's: files, reasoning-gym tasks) -> Examples (DATA_FORMATS registry), prompts, tokens,
                       batches.
  4. The update        the policy (PolicyWithValueHead, load_model); Optimizers; SFTTerm; the PPO update's typed
                       records (Sample -> Collected -> Rollout -> OldPolicy -> UpdateBatch -> LossStats); step 1's turn
                       loop (TurnLoop: Trajectory, one turn without an environment); steps 1-3 (Collector: generate,
                       score, gather) and 4-7 (PPOUpdate: log-probs, advantages, epochs, statistics) in file order;
                       HybridTrainer composes them and owns its state (state_dict / load_state_dict); evaluation (+ RETAIN_FILE's).
  5. The loop          the step schedule, the draws (CURRICULUM's levels, REPLAY_SHARE's prompts), metrics, signals,
                       evaluation and SAVE_BEST.
  6. run and main      start-up (checks, the plan, loading), --check, finish, the command line.
  runtime.py           processes, model loading (LoRA, reference, teacher), the packed forward (PACKING), precision,
                       chat templates (Chat), the engines (GENERATION_BACKENDS), the CPU-speed code and its side effects,
                       the data's rows (files; reasoning-gym tasks generated from TASK_CONFIG, at a curriculum level).
  outputs.py           OUTPUT_DIR and faults (a full disk), checkpoints (CHECKPOINT: the layout; their size), the final
                       model, metrics.jsonl and the trackers (TRACKERS), the summary line, report.md and the model card.
  rewards.py           make_reward(spec): the REWARDS registry, the code sandbox.
  environments.py      make_environment(spec): the ENVIRONMENTS registry (TRL's environment classes too), action formats.
Where to add:
  an advantage estimator  a function in section 2 + one line in ADVANTAGES (its extra pass, if any, in Estimator)
  a policy loss           a function returning PolicyTerms + one line in POLICY_LOSSES (its own LOSS_AGG, if any)
  a hybrid strategy       a function returning a HybridSplit (with its metrics) + one line in HYBRID_STRATEGIES
  a KL penalty / SFT loss a function + one line in KL_PENALTIES / SFT_LOSSES
  a field of the Rollout  one line in Sample (per response, filled in Collector.collect) and one in Rollout (padded in
                          make_rollout), then the code that reads it; a per-token number of step 4: one line in
                          TokenColumns; a statistic of the loss: one line in LossStats
  an environment          a builder in environments.py + one line in environments.ENVIRONMENTS (reset(row), step(action));
                          TurnLoop (step 1) appends its observations with loss_mask 0, which every loss, estimator and
                          statistic reads
  a teacher model         (on-policy distillation) its log-probs of the sampled tokens: a TokenColumns field computed in
                          PPOUpdate.forward_no_grad beside the reference's (step 4), read in step 5
  a data format           an example_from_* function + one line in DATA_FORMATS
  a reward type           a builder in rewards.py + one line in rewards.REWARDS (a rewards.Scorer when it reports more
                          than its scores)
  a generation backend    a class with generate() and sync_weights() + one line in runtime.GENERATION_BACKENDS
  a tracker (REPORT_TO)   a start function and a table function + one line in outputs.TRACKERS
A registry's names are the choices its config key accepts, and --help lists them.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import difflib
import functools
import gc
import json
import math
import os
import random
import shutil
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional, Union

import numpy as np

# Heavy imports (torch, transformers, trl) happen inside functions where possible, so `--check` and
# `--help` answer fast. torch itself is needed by the math below.
import torch
import torch.nn as nn
import torch.nn.functional as F

import outputs
import runtime

# names the Python API reached through this module before it was split (README, Python API): still reachable here
from runtime import Processes, UserError, init_processes, pick_device, resolve_bf16, shard  # noqa: F401

IMPORTED_AT = time.time()  # the start-up line: the interpreter and the imports above took until here


# ==================================================================================================
# 1. Config and Plan
# ==================================================================================================
def _key(default, help: Union[str, Callable[[], str]], choices: Optional[typing.Callable[[], Any]] = None):
    """A config field: default value plus the one-line help shown by --help and docs/config.md (a function: help read
    from a registry when asked). `choices`: the names the key accepts, read from a registry when asked (the registries
    are defined further down); "{choices}" in the help becomes them, "{described}" each with its Choice's doc, and
    validate() checks the value against them."""
    meta = {"help": help, "choices": choices}
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class Config:  # over the 250-line mark: one documented line per key (117 of them), then validate() and its helpers
    # --- what to train ---
    MODE: str = _key("hybrid", "sft | ppo | hybrid")
    MODEL: str = _key("smollm2-135m-instruct", "local model dir, a .gguf file, or an alias: " + ", ".join(runtime.MODEL_ALIASES))
    TRAIN_FILE: str = _key(
        "",
        "training data (required): JSON list, JSONL, CSV, Parquet, or a datasets save_to_disk directory; "
        "for RL its rows may be prompts without a response when the reward reads the answer from the "
        "row (math's answer_field, code's tests); or \"reasoning_gym:NAME\", a task generated with TASK_CONFIG",
    )
    TASK_CONFIG: dict = _key(
        {},
        'a reasoning_gym:NAME task: "size" (1000), "eval_size" (200), "seed" (SEED), "level" (its curriculum level), '
        '"system_prompt" (text, or a reasoning-gym SYSTEM_PROMPTS name), and the task\'s own fields (composite: "datasets")',
    )
    CURRICULUM: dict = _key(
        {},
        'off (empty) or the RL prompts\' level by the training pass rate (reward >= EVAL_PASS_SCORE) of the last "window" '
        'updates (4): one up above "raise_above" (0.7), one down below "lower_below" (0.2), from "start" (0); the levels: a '
        'reasoning_gym task\'s curriculum ("mode": inclusive | upper_bound), or the sorted values of "column" in file rows',
    )
    OUTPUT_DIR: str = _key("", "where metrics, checkpoints and models go (required)")
    TRUST_REMOTE_CODE: bool = _key(
        False, 'run code named by the config: custom model code from MODEL, "python" rewards and environments (off unless you ask)'
    )
    CACHE_DIR: str = _key("", "where a .gguf model is converted to safetensors once ('' = ~/.cache/hybrid_trainer)")
    # --- LoRA, memory, multi-process ---
    LORA_R: int = _key(0, "LoRA rank (0 = off: full fine-tuning); the value head is always trained in full")
    LORA_ALPHA: float = _key(16, "LoRA scaling alpha (the update is scaled by LORA_ALPHA / LORA_R)")
    LORA_DROPOUT: float = _key(0.0, "dropout on the LoRA input; > 0 makes the first PPO ratio differ from 1 (warned)")
    LORA_TARGETS: Union[str, list] = _key("all-linear", "modules that get LoRA: all-linear, or a list of module names")
    GRADIENT_CHECKPOINTING: bool = _key(False, "recompute activations in backward: less memory, ~30% more compute")
    SKIP_ZERO_ADVANTAGE: bool = _key(
        True,
        "responses whose advantage is 0 on every token skip the PPO epochs' forward and backward where nothing else in "
        "the loss reads them (no critic, no KL in the loss, no DISTILL jsd); the loss keeps the whole minibatch's normaliser",
    )
    PACKING: bool = _key(
        True,
        "the update's and SFT's forwards run their rows packed: no padding, each prompt once for the responses that "
        "share it (a group's), each response attending to its prompt and itself; where the model gives the padded "
        "numbers so (checked once); not under FSDP (see docs/performance.md)",
    )
    LOGITS_CHUNK: int = _key(
        1024,
        "the PPO update's log-probs and entropy and the SFT loss come from the last hidden "
        "states this many response positions at a time through the LM head, each chunk's logits "
        "recomputed in backward, so the (responses x tokens x vocabulary) logits never exist whole "
        "(0 = the model's own logits)",
    )
    FSDP: bool = _key(False, "shard parameters, gradients and optimizer state over processes (FSDP2; needs torchrun)")
    # --- data ---
    TRAIN_SPLIT: str = _key("", "split of a saved DatasetDict used for training ('' = train)")
    SFT_FILE: str = _key(
        "",
        "MODE hybrid, HYBRID alternate: the SFT side's demonstrations (any TRAIN_FILE kind, used whole); "
        "TRAIN_FILE then feeds RL only ('' = TRAIN_FILE feeds both)",
    )
    SFT_SPLIT: str = _key("", "split of a saved DatasetDict SFT_FILE ('' = train)")
    EVAL_SPLIT: str = _key("", "split of a saved DatasetDict used for evaluation ('' = test, else validation)")
    DATA_FORMAT: str = _key(
        "auto",
        "{choices}: fields (SELECT_OUTPUT is the response, the other keys the prompt), "
        "prompt_completion, messages (chat; the last assistant turn is the response), auto (messages, then "
        "prompt_completion, then fields, by the columns present)",
        choices=lambda: ("auto",) + tuple(DATA_FORMATS),
    )
    SFT_ALL_TURNS: bool = _key(False, "messages: SFT trains on every assistant turn of a conversation, not only the last")
    SELECT_OUTPUT: str = _key("output", "DATA_FORMAT fields: item key holding the target response (a list uses its first element)")
    CATEGORY_FIELD: str = _key("", "item key naming its category: kept out of the prompt, grouped in report.md ('' = none)")
    PROMPT_FORMAT: str = _key("auto", "how a prompt is rendered: {described}", choices=lambda: PROMPT_FORMATS)
    CHAT_TEMPLATE_KWARGS: dict = _key(
        {},
        "options every rendering passes to MODEL's chat template, e.g. {\"enable_thinking\": false} for Qwen3 (TRL's chat_template_kwargs)",
    )
    REASONING: Union[str, dict] = _key(
        "auto",
        'where a response\'s reasoning sits, kept apart from the answer rewards score: "auto" (<think>...</think> when the chat '
        'template writes them), "none", or {"open": ..., "close": ...}; see docs/models.md',
    )
    PERCENT: float = _key(100, "use this percent of the items (0 < PERCENT <= 100), after a seeded shuffle")
    NUM_SAMPLES: int = _key(0, "use this many items instead of PERCENT (0 = use PERCENT)")
    SHUFFLE: bool = _key(True, "shuffle items with SEED before subsetting and each epoch (never runs a script)")
    MAXSEQ: int = _key(1024, "max tokens of prompt + response")
    # --- SFT ---
    SFT_BATCH: int = _key(4, "examples per SFT step (one optimizer step)")
    LR_SFT: float = _key(5e-5, "AdamW learning rate for SFT")
    # --- PPO ---
    PPO_BATCH: int = _key(4, "prompts per PPO update (each gets NUM_GENERATIONS responses)")
    PPO_MINI: Optional[int] = _key(
        None, "prompts' worth of responses per minibatch inside a PPO update: PPO_MINI x NUM_GENERATIONS responses (null = PPO_BATCH)"
    )
    MINIBATCH_GROUPS: bool = _key(
        False,
        "a PPO minibatch holds whole groups of NUM_GENERATIONS responses (as verl's), so each prompt runs once in it; "
        "false: responses drawn across groups (as TRL's)",
    )
    ADVANTAGE: str = _key(
        "gae",
        "advantage estimator: {choices}; gae trains a value head (PPO), the others are critic-free",
        choices=lambda: tuple(ADVANTAGES),
    )
    NUM_GENERATIONS: int = _key(1, "responses sampled per prompt (G); grpo, dr_grpo, rloo and reinforce_pp_baseline need >= 2")
    PPO_EPOCHS: int = _key(4, "passes over the PPO batch per update")
    LR_PPO: float = _key(1e-5, "AdamW learning rate for PPO (policy + value head)")
    INIT_KL_COEF: float = _key(0.2, "initial KL penalty coefficient")
    ADAPTIVE_KL: bool = _key(True, "adapt the KL coefficient toward TARGET_KL (Ziegler et al. 2019)")
    TARGET_KL: float = _key(0.3, "target KL (nats per sequence) for the adaptive controller")
    KL_HORIZON: int = _key(10000, "horizon of the adaptive KL controller")
    KL_PENALTY: str = _key(
        "kl",
        "per-token KL estimate: {choices} (kl = k1 = logp - ref; k2 = mse = 0.5 (logp - ref)^2; "
        "k3 = r - 1 - log r, r = p_ref / p: 'low_var_kl'; full = over the whole distribution)",
        choices=lambda: tuple(KL_PENALTIES),
    )
    KL_IN: str = _key("reward", "where the KL goes: {choices} (see the KL_IN registry below)", choices=lambda: tuple(KL_PLACES))
    GAMMA: float = _key(1.0, "discount factor")
    LAM: float = _key(0.95, "GAE lambda")
    CLIPRANGE: float = _key(0.2, "PPO policy ratio clip range: ratios outside [1 - CLIPRANGE, 1 + CLIPRANGE_HIGH] are clipped")
    CLIPRANGE_HIGH: Optional[float] = _key(None, "upper clip range (DAPO's clip-higher uses 0.28 with CLIPRANGE 0.2; null = CLIPRANGE)")
    LOSS_AGG: str = _key(
        "auto",
        "policy loss over tokens: {choices} (auto: the policy loss's own, gmpo's seq_mean_token_mean; "
        "else the estimator's, dr_grpo's seq_mean_token_sum_norm; else token_mean)",
        choices=lambda: ("auto",) + tuple(LOSS_AGGREGATIONS),
    )
    POLICY_LOSS: str = _key(
        "ppo",
        "the policy loss: {choices} (see the POLICY_LOSS registry below and docs/algorithms.md)",
        choices=lambda: tuple(POLICY_LOSSES),
    )
    IMPORTANCE_LEVEL: str = _key("token", "{described}", choices=lambda: IMPORTANCE_LEVELS)
    SAPO_TAU_POS: float = _key(1.0, "POLICY_LOSS sapo: the gate's temperature where the advantage is positive (TRL's default)")
    SAPO_TAU_NEG: float = _key(1.05, "POLICY_LOSS sapo: the gate's temperature where the advantage is negative or 0 (TRL's default)")
    CLIPRANGE_VALUE: float = _key(0.2, "value prediction clip range")
    VF_COEF: float = _key(0.1, "value loss coefficient")
    WHITEN_REWARDS: bool = _key(False, "whiten per-token rewards (scale only) before GAE")
    MISSING_EOS_PENALTY: Optional[float] = _key(None, "subtract this from the score of responses that never emit EOS (null = off)")
    RATIO_THRESHOLD: float = _key(10.0, "skip a minibatch whose mean probability ratio exceeds this")
    DYNAMIC_SAMPLING: bool = _key(
        False,
        "drop groups whose NUM_GENERATIONS scores are all equal (no signal for a group-relative "
        "estimator) and draw more prompts until the update holds PPO_BATCH prompts with signal (DAPO)",
    )
    DYNAMIC_SAMPLING_BY: str = _key(
        "score",
        "{choices}: DYNAMIC_SAMPLING drops groups whose scores are all equal, or that all pass or all fail (EVAL_PASS_SCORE)",
        choices=lambda: ("score", "pass"),
    )
    MAX_SAMPLING_ROUNDS: int = _key(3, "DYNAMIC_SAMPLING: rounds of generation per update at most (then it runs with what it has)")
    MASK_TRUNCATED: bool = _key(
        False,
        "responses that hit MAX_NEW_TOKENS without EOS get no gradient (TRL's "
        "mask_truncated_completions); their scores still count in their group's statistics",
    )
    # --- sampling ---
    MAX_NEW_TOKENS: int = _key(128, "max tokens generated per response")
    TEMPERATURE: float = _key(0.7, "sampling temperature (also used for PPO log-probs)")
    TOP_P: float = _key(0.9, "nucleus sampling (1.0 = off)")
    NO_REPEAT_NGRAM_SIZE: int = _key(3, "forbid repeated n-grams of this size (0 = off)")
    REPETITION_PENALTY: float = _key(1.15, "repetition penalty (1.0 = off)")
    GENERATION_BACKEND: str = _key(
        "auto",
        "what generates responses (PPO rollouts, remax's greedy pass, evaluation): {choices}; "
        "auto = vllm when it is installed and NO_REPEAT_NGRAM_SIZE is 0, else hf (the plan says which)",
        choices=lambda: ("auto",) + tuple(runtime.GENERATION_BACKENDS),
    )
    VLLM_GPU_MEMORY_UTILIZATION: float = _key(
        0.3,
        "vllm on CUDA: share of the GPU's memory the engine may take (weights + KV "
        "cache); it sleeps between rollouts, so training gets the memory back",
    )
    VLLM_KV_CACHE_GB: Optional[float] = _key(
        None, "vllm on CPU: GiB of KV cache (null: what a rollout needs, its responses x MAXSEQ tokens, and a quarter more)"
    )
    VLLM_ENFORCE_EAGER: bool = _key(
        True, "vllm: no CUDA graphs / compilation (starts in seconds; false: faster decoding after a start of minutes)"
    )
    ROLLOUT_IS: str = _key(
        "auto",
        "correct the engine/trainer sampling mismatch: {choices} (see the ROLLOUT_IS registry below); "
        "auto = sequence_mask (TRL's default) with vllm, off with hf (its log-probs are the trainer's own)",
        choices=lambda: ("auto",) + tuple(ROLLOUT_IS_MODES),
    )
    ROLLOUT_IS_CAP: float = _key(3.0, "ROLLOUT_IS: the cap C on the trainer/engine probability ratio (TRL: 3.0)")
    # --- reward ---
    REWARD: dict = _key({"type": "cosine_sts"}, "reward spec for rewards.make_reward (see docs/rewards.md)")
    # --- agents: multi-turn rollouts with an environment ---
    ENVIRONMENT: dict = _key(
        {},
        "environment spec for environments.make_environment ({} = off: single-turn); its types "
        "are the ENVIRONMENT table below (see docs/agents.md)",
    )
    ACTION_FORMAT: Union[str, dict] = _key(
        "auto",
        lambda: (
            "how the model acts in its own text: {choices} (auto: the environment's "
            "own: " + ", ".join(f"{t} {f}" for t, f in action_formats()[1].items()) + "), or your "
            'own markers {"open": "<act>", "close": "</act>"}; the turn stops at the '
            "closing marker"
        ),
        choices=lambda: ("auto",) + tuple(action_formats()[0]),
    )
    MAX_TURNS: int = _key(4, "ENVIRONMENT: model turns per trajectory at most (its observations come between them)")
    MAX_OBSERVATION_TOKENS: int = _key(256, "ENVIRONMENT: an observation longer than this many tokens is cut from the middle, saying so")
    ENV_STEP_TIMEOUT: float = _key(
        30.0, "ENVIRONMENT: seconds an environment step may take; a step that takes longer ends its trajectory (reward 0, counted)"
    )
    ENV_REWARD_WEIGHT: float = _key(
        1.0, "ENVIRONMENT: its own rewards (its steps', summed; a TRL class's get_reward()) are added to REWARD's score times this"
    )
    OBSERVATION_ROLE: str = _key("tool", "ENVIRONMENT: the chat role of an observation turn (tool; user for templates without one)")
    # --- on-policy distillation: a teacher scores the student's own tokens ---
    TEACHER_MODEL: str = _key(
        "",
        'a local model dir, .gguf or alias sharing the student\'s vocabulary, loaded frozen; "self": '
        "the frozen initial policy (LoRA: the adapter off) shown TEACHER_CONTEXT; '' = no teacher",
    )
    TEACHER_CONTEXT: str = _key(
        "A correct answer is: {target}\n\n",
        'TEACHER_MODEL "self": text put before the prompt\'s '
        "last user message for the teacher only; {target} is the row's reference response",
    )
    DISTILL: str = _key(
        "", "the distillation loss: {choices} ('' = none; see the DISTILL registry below)", choices=lambda: ("",) + tuple(DISTILL_LOSSES)
    )
    DISTILL_COEF: float = _key(1.0, "DISTILL's weight: token_reverse_kl's advantage is added times this; jsd's loss term")
    DISTILL_DISCOUNT: float = _key(
        0.0, "token_reverse_kl: discount of the later tokens' terms summed into each token's advantage (0: each token's own, as Tinker)"
    )
    DISTILL_BETA: float = _key(
        0.5, "jsd: 0 forward KL(teacher || student), 1 reverse KL(student || teacher), between: the generalized JSD (TRL's beta)"
    )
    # --- schedule ---
    HYBRID: str = _key(
        "alternate",
        "hybrid strategy: {choices}: alternate (CYCLE_SFT_STEPS SFT steps, then CYCLE_PPO_UPDATES PPO "
        "updates), gate (per prompt: SFT on its reference if no sampled response scores GATE_THRESHOLD, else RL; "
        "HPT), mix ((1 - mu) RL + mu SFT on the same prompts' references; CHORD, InstructGPT's ptx)",
        choices=lambda: tuple(HYBRID_STRATEGIES),
    )
    GATE_THRESHOLD: Optional[float] = _key(None, "gate: a prompt whose best sampled score is below this is trained by SFT (null = 0.5)")
    MIX_COEF: float = _key(0.5, "mix: mu at the start, in [0, 1]")
    MIX_COEF_END: Optional[float] = _key(None, "mix: mu at the end of the run, in [0, 1] (null = MIX_COEF)")
    MIX_SCHEDULE: str = _key(
        "constant", "mix: mu from MIX_COEF to MIX_COEF_END over the run: {choices}", choices=lambda: tuple(MIX_SCHEDULES)
    )
    SFT_LOSS: str = _key(
        "ce",
        "{choices}: ce (cross-entropy), dft (each token's CE times its stop-gradient probability; DFT): SFT steps, gate, mix",
        choices=lambda: tuple(SFT_LOSSES),
    )
    SFT_TOKEN_WEIGHT: str = _key(
        "none",
        "gate/mix SFT term: {choices}: none, phi (each token weighted by p(1 - p), stop-gradient; CHORD-phi)",
        choices=lambda: tuple(SFT_TOKEN_WEIGHTS),
    )
    SFT_KL_COEF: float = _key(
        0.0, "retention: the SFT loss plus this x KL(policy || reference) over the vocabulary at each target token (0 = off)"
    )
    REPLAY_SHARE: float = _key(
        0.0,
        "retention: this share of each update's prompts are REPLAY_FILE's, trained toward the frozen initial model (their "
        "advantage the per-token reverse KL to it, no reward) (0 = off)",
    )
    REPLAY_FILE: str = _key("", "REPLAY_SHARE's prompts, any TRAIN_FILE kind ('' = RETAIN_FILE's; apart, retention is measured unreplayed)")
    CYCLE_SFT_STEPS: int = _key(1, "SFT steps per hybrid cycle (HYBRID alternate)")
    CYCLE_PPO_UPDATES: int = _key(1, "PPO updates per hybrid cycle (HYBRID alternate)")
    EPOCHS: int = _key(1, "passes over the data")
    GRAD_ACCUM: int = _key(1, "split each SFT batch / PPO minibatch into this many micro-batches (same math, less memory)")
    MAX_GRAD_NORM: float = _key(1.0, "gradient clipping norm")
    LR_SCHEDULE: str = _key("constant", "{choices} decay over the run, per optimizer (SFT, PPO)", choices=lambda: tuple(LR_SCHEDULES))
    WARMUP_STEPS: int = _key(0, "linear warm-up, in optimizer steps of each optimizer")
    REF_UPDATE: str = _key("never", "{described}", choices=lambda: REF_UPDATES)
    # --- precision, seed, logging ---
    BF16: Union[bool, str] = _key(
        "auto",
        "bfloat16 autocast: auto (on with CUDA bf16; on a CPU when a start-up probe finds bf16 matmuls faster than fp32) | true | false",
    )
    FP16: bool = _key(False, "float16 autocast with loss scaling (CUDA only)")
    SEED: Optional[int] = _key(None, "random seed (null = drawn from the OS and recorded in the resolved config)")
    REPORT_TO: list = _key(
        [],
        "also log to these trackers, any of {choices} (offline or local unless your environment says otherwise: see docs/outputs.md)",
        choices=lambda: tuple(outputs.TRACKERS),
    )
    LOG_EVERY: int = _key(5, "print a summary line every this many steps (the first and last step always print)")
    CLEANSE: bool = _key(True, "free cached accelerator memory after each cycle")
    # --- evaluation ---
    EVAL_FILE: str = _key("", "held-out data (any TRAIN_FILE kind) evaluated before, during and after training ('' = off)")
    EVAL_SAMPLES: int = _key(50, "eval items used")
    RETAIN_FILE: str = _key(
        "",
        "what the model must not lose (any EVAL_FILE kind, with references): answered greedily at each evaluation, "
        "logged as retain/contains_reference and retain/<category> ('' = off)",
    )
    EVAL_NUM_SAMPLES: int = _key(
        1,
        "responses per eval item: 1 = greedy; k > 1 = k samples at EVAL_TEMPERATURE, reported as "
        "pass@1, pass@k (and maj@k with a math reward)",
    )
    EVAL_TEMPERATURE: float = _key(1.0, "sampling temperature of the eval samples (EVAL_NUM_SAMPLES > 1)")
    EVAL_PASS_SCORE: float = _key(
        1.0, "an eval sample passes (pass@k) when its reward is at least this (1.0: a right math answer, all tests of a code reward)"
    )
    EVAL_EVERY: int = _key(0, "evaluate every this many steps (0 = only at start and end)")
    SAVE_BEST: str = _key(
        "",
        "keep the weights of the best evaluation by this eval metric as OUTPUT_DIR/best/, e.g. "
        "\"eval/pass@1\" ('' = off; needs EVAL_FILE and EVAL_EVERY); the final model is saved too",
    )
    SAVE_BEST_MODE: str = _key("max", "which SAVE_BEST is better: {described}", choices=lambda: SAVE_BEST_MODES)
    # --- reliability ---
    SAVE_EVERY: int = _key(0, "write a checkpoint every this many steps (0 = off)")
    KEEP_CHECKPOINTS: int = _key(2, "checkpoints kept (older ones are pruned)")
    KEEP_CHECKPOINTS_AT_END: bool = _key(False, "keep the resume checkpoints after a run that finished (the final model is saved)")
    RESUME: Union[bool, str] = _key("auto", "auto (newest checkpoint in OUTPUT_DIR) | a checkpoint path | false")
    MAX_BAD_STEPS: int = _key(5, "stop after this many consecutive skipped (non-finite) steps")

    # ---- loading and validation: check values, fill the defaults that depend on other keys, nothing else ----
    @classmethod
    def from_dict(cls, raw: Any) -> "Config":
        if not isinstance(raw, dict):
            raise runtime.UserError(f"config must be a JSON object, got {type(raw).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        for key in raw:
            if key not in names:
                close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.6)
                hint = f" - did you mean {close[0]!r}?" if close else " (see --help for the keys)"
                raise runtime.UserError(f"unknown config key {key!r}{hint}")
        hints = typing.get_type_hints(cls)
        cfg = cls(**{k: runtime.coerce(k, v, hints[k]) for k, v in raw.items()})
        return dataclasses.replace(cfg, **cfg.validate())

    def validate(self) -> dict:
        """Check every value (one UserError naming the key, the value and the rule) -> the keys whose written value
        is filled in or normalised: null defaults that follow other keys, case, the sketch's string booleans."""

        def need(ok: bool, msg: str):
            if not ok:
                raise runtime.UserError(msg)

        fill = {"MODE": self.MODE.lower()}
        need(fill["MODE"] in ("sft", "ppo", "hybrid"), f"MODE must be 'sft', 'ppo' or 'hybrid', got {self.MODE!r}")
        need(bool(self.TRAIN_FILE), "TRAIN_FILE is required: a JSON, JSONL, CSV or Parquet file, or a datasets directory")
        need(bool(self.OUTPUT_DIR), "OUTPUT_DIR is required: the folder for metrics, checkpoints and models")
        need(bool(self.MODEL), "MODEL is required: a local model dir, a .gguf file or an alias")
        need(bool(self.SELECT_OUTPUT), "SELECT_OUTPUT must name the item key holding the response")
        for f in dataclasses.fields(self):  # every key whose value names a registry entry
            if f.metadata["choices"] is not None and not isinstance(getattr(self, f.name), dict):
                for value in getattr(self, f.name) if isinstance(getattr(self, f.name), list) else [getattr(self, f.name)]:
                    one_of(f.name, value, f.metadata["choices"]())
        self._check_ranges(need)
        fill["PPO_MINI"] = self.PPO_BATCH if self.PPO_MINI is None else self.PPO_MINI
        need(
            1 <= fill["PPO_MINI"] <= self.PPO_BATCH, f"PPO_MINI must be between 1 and PPO_BATCH ({self.PPO_BATCH}), got {fill['PPO_MINI']}"
        )
        need(
            self.GRAD_ACCUM <= min(self.SFT_BATCH, fill["PPO_MINI"]),
            f"GRAD_ACCUM ({self.GRAD_ACCUM}) must not exceed SFT_BATCH ({self.SFT_BATCH}) or PPO_MINI ({fill['PPO_MINI']})",
        )
        if fill["MODE"] == "hybrid":
            need(self.CYCLE_SFT_STEPS + self.CYCLE_PPO_UPDATES >= 1, "hybrid MODE needs CYCLE_SFT_STEPS + CYCLE_PPO_UPDATES >= 1")
        fill.update(self._check_rl(need))
        self._warn_unused(fill["MODE"])
        fill["GATE_THRESHOLD"] = 0.5 if self.GATE_THRESHOLD is None else self.GATE_THRESHOLD
        if isinstance(self.BF16, str):
            low = self.BF16.strip().lower()
            need(low in ("auto",) + _TRUE + _FALSE, f'BF16 must be true, false or "auto", got {self.BF16!r}')
            fill["BF16"] = "auto" if low == "auto" else low in _TRUE
        need(not (fill.get("BF16", self.BF16) is True and self.FP16), "BF16 and FP16 are both true: pick one")
        targets = self.LORA_TARGETS
        need(
            targets == "all-linear" or isinstance(targets, list) and targets and all(isinstance(t, str) and t for t in targets),
            f'LORA_TARGETS must be "all-linear" or a non-empty list of module names, got {targets!r}',
        )
        resume = False if isinstance(self.RESUME, str) and self.RESUME.lower() in _FALSE else self.RESUME
        need(
            resume is False or resume is True or isinstance(resume, str) and resume != "",
            f"RESUME must be 'auto', a checkpoint path or false, got {self.RESUME!r}",
        )
        fill["RESUME"] = "auto" if resume is True else resume
        reasoning = self.REASONING
        need(
            reasoning in ("auto", "none")
            or isinstance(reasoning, dict)
            and set(reasoning) == {"open", "close"}
            and all(isinstance(v, str) and v for v in reasoning.values()),
            f'REASONING must be "auto", "none" or {{"open": ..., "close": ...}} with two non-empty strings; got {reasoning!r}',
        )
        taken = sorted(set(self.CHAT_TEMPLATE_KWARGS) & {"chat_template", "tools", "tokenize", "add_generation_prompt", "conversation"})
        need(
            not taken,
            f"CHAT_TEMPLATE_KWARGS: {taken} are the trainer's to set, per rendering (tools: ENVIRONMENT with ACTION_FORMAT tool_call)",
        )
        self._check_distill(need, fill["MODE"])
        self._check_retention(need, fill["MODE"])
        self._check_save_best(need)
        if self.CURRICULUM:
            fill["CURRICULUM"] = self._check_curriculum(need, fill["MODE"])
        if self.ENVIRONMENT:
            self._check_environment(need)
            fill["ACTION_FORMAT"] = (
                "tool_call" if self.ENVIRONMENT.get("type") == "trl" and self.ACTION_FORMAT == "auto" else self.ACTION_FORMAT
            )
        need(self.REWARD.get("type") != "environment" or bool(self.ENVIRONMENT), 'REWARD "environment" scores by ENVIRONMENT: set one')
        if self.MODE.lower() != "sft" or self.EVAL_FILE:  # the reward is used: its spec must build
            import rewards  # light: the reward types import their libraries when built

            try:
                rewards.check_spec(self.REWARD, trust_remote_code=self.TRUST_REMOTE_CODE)
            except rewards.RewardSpecError as e:
                raise runtime.UserError(f"REWARD: {e}") from None
        return fill

    def _check_environment(self, need) -> None:
        """ENVIRONMENT's spec (environments.check_spec), the role its observations take, and ACTION_FORMAT."""
        import environments

        try:
            environments.check_spec(self.ENVIRONMENT, trust_remote_code=self.TRUST_REMOTE_CODE)
        except environments.EnvSpecError as e:
            raise runtime.UserError(f"ENVIRONMENT: {e}" if not str(e).startswith("ENVIRONMENT") else str(e)) from None
        need(self.OBSERVATION_ROLE in ROLES, f"OBSERVATION_ROLE must be one of {', '.join(ROLES)}, got {self.OBSERVATION_ROLE!r}")
        custom = self.ACTION_FORMAT
        need(
            not isinstance(custom, dict) or set(custom) == {"open", "close"} and all(isinstance(v, str) and v for v in custom.values()),
            f'ACTION_FORMAT as an object needs exactly "open" and "close", two non-empty strings; got {custom!r}',
        )

    def _check_rl(self, need) -> dict:
        """The RL keys that depend on each other -> their filled defaults."""
        fill = {}
        need(not (self.KL_IN == "loss" and self.KL_PENALTY == "full"), 'KL_PENALTY "full" works only with KL_IN "reward"')
        need(
            not ADVANTAGES[self.ADVANTAGE].group or self.NUM_GENERATIONS >= 2,
            f"ADVANTAGE {self.ADVANTAGE!r} compares the responses to the same prompt: set NUM_GENERATIONS >= 2 "
            f"(got {self.NUM_GENERATIONS}; 4 to 8 is usual)",
        )
        need(
            not self.DYNAMIC_SAMPLING or self.NUM_GENERATIONS >= 2,
            "DYNAMIC_SAMPLING drops groups whose NUM_GENERATIONS "
            f"scores are all equal: set NUM_GENERATIONS >= 2 (got {self.NUM_GENERATIONS})",
        )
        if self.DYNAMIC_SAMPLING and not ADVANTAGES[self.ADVANTAGE].group:
            runtime.warn(
                f"DYNAMIC_SAMPLING has no effect with ADVANTAGE {self.ADVANTAGE!r}: it is not group-relative (equal scores "
                "still carry signal for it); use grpo, dr_grpo, rloo or reinforce_pp_baseline"
            )
        need(
            self.GENERATION_BACKEND != "vllm" or self.NO_REPEAT_NGRAM_SIZE == 0,
            f"NO_REPEAT_NGRAM_SIZE={self.NO_REPEAT_NGRAM_SIZE} has no equivalent in vLLM: set NO_REPEAT_NGRAM_SIZE 0 with "
            'GENERATION_BACKEND "vllm" (REPETITION_PENALTY works with both)',
        )
        auto_is = "sequence_mask" if runtime.resolve_backend(self)[0] == "vllm" else "off"
        fill["ROLLOUT_IS"] = auto_is if self.ROLLOUT_IS == "auto" else self.ROLLOUT_IS
        need(
            self.IMPORTANCE_LEVEL == "token" or self.POLICY_LOSS in ("ppo", "gspo"),
            f'IMPORTANCE_LEVEL "sequence" is '
            f'POLICY_LOSS "gspo"; it does not combine with POLICY_LOSS {self.POLICY_LOSS!r}: drop IMPORTANCE_LEVEL',
        )
        fill["POLICY_LOSS"] = "gspo" if self.IMPORTANCE_LEVEL == "sequence" else self.POLICY_LOSS
        own = POLICY_LOSSES[fill["POLICY_LOSS"]].loss_agg
        fill["LOSS_AGG"] = (own or ADVANTAGES[self.ADVANTAGE].loss_agg) if self.LOSS_AGG == "auto" else self.LOSS_AGG
        fill["CLIPRANGE_HIGH"] = self.CLIPRANGE if self.CLIPRANGE_HIGH is None else self.CLIPRANGE_HIGH
        need(
            fill["CLIPRANGE_HIGH"] >= self.CLIPRANGE,
            f"CLIPRANGE_HIGH ({self.CLIPRANGE_HIGH}) must be >= CLIPRANGE ({self.CLIPRANGE}): clip-higher widens the upper side only",
        )
        fill["MIX_COEF_END"] = self.MIX_COEF if self.MIX_COEF_END is None else self.MIX_COEF_END
        for key in ("MIX_COEF", "MIX_COEF_END"):
            need(0 <= fill.get(key, getattr(self, key)) <= 1, f"{key} must be in [0, 1], got {fill.get(key, getattr(self, key))}")
        return fill

    def _check_distill(self, need, mode: str) -> None:
        need(
            not self.DISTILL or bool(self.TEACHER_MODEL),
            f'DISTILL {self.DISTILL!r} needs a teacher: set TEACHER_MODEL (a model directory, .gguf or alias, or "self")',
        )
        need(
            not self.TEACHER_MODEL or bool(self.DISTILL), f"TEACHER_MODEL is set but DISTILL is empty: choose {' or '.join(DISTILL_LOSSES)}"
        )
        need(0 <= self.DISTILL_BETA <= 1, f"DISTILL_BETA must be in [0, 1] (0 forward KL, 1 reverse KL), got {self.DISTILL_BETA}")
        need(0 <= self.DISTILL_DISCOUNT <= 1, f"DISTILL_DISCOUNT must be in [0, 1], got {self.DISTILL_DISCOUNT}")
        need(self.DISTILL_COEF >= 0, f"DISTILL_COEF must be >= 0, got {self.DISTILL_COEF}")
        need(
            self.TEACHER_MODEL != "self" or self.REF_UPDATE == "never",
            'TEACHER_MODEL "self" is the frozen initial policy, which REF_UPDATE "cycle" would move: use REF_UPDATE "never"',
        )
        need(
            self.ADVANTAGE != "none" or self.DISTILL == "token_reverse_kl",
            'ADVANTAGE "none" leaves the update no signal but DISTILL "token_reverse_kl"\'s: set DISTILL, or another ADVANTAGE',
        )
        if self.TEACHER_MODEL and mode == "sft":
            runtime.warn('TEACHER_MODEL is ignored in MODE "sft": distillation trains on the student\'s own samples (ppo or hybrid)')

    def _check_retention(self, need, mode: str) -> None:
        """SFT_KL_COEF and REPLAY_SHARE (the frozen reference is loaded for them: runtime.needs_reference)."""
        need(self.SFT_KL_COEF >= 0, f"SFT_KL_COEF must be >= 0 (0 = off), got {self.SFT_KL_COEF}")
        sft_side = mode == "sft" or mode == "hybrid" and (self.HYBRID == "alternate" or HYBRID_STRATEGIES[self.HYBRID].in_update)
        if self.SFT_KL_COEF > 0 and not sft_side:
            runtime.warn(f"SFT_KL_COEF is ignored in MODE {mode!r}: it is a term of the SFT loss (MODE sft or hybrid)")
        share = self.REPLAY_SHARE
        need(0 <= share <= 1, f"REPLAY_SHARE must be in [0, 1] (the share of each update's prompts replayed), got {share}")
        if share == 0:
            return runtime.warn("REPLAY_FILE is ignored: REPLAY_SHARE is 0") if self.REPLAY_FILE else None
        k = round(share * self.PPO_BATCH)
        need(mode != "sft", 'REPLAY_SHARE mixes replayed prompts into the RL updates: MODE "sft" has none')
        need(bool(self.RETAIN_FILE or self.REPLAY_FILE), "REPLAY_SHARE replays RETAIN_FILE's prompts (or REPLAY_FILE's): set one")
        why = f"REPLAY_SHARE {share} of PPO_BATCH {self.PPO_BATCH} is {k} replayed prompts per update: it must leave at least one of each"
        need(1 <= k < self.PPO_BATCH, why + " (replayed and TRAIN_FILE's)")
        need(self.REF_UPDATE == "never", 'REPLAY_SHARE trains toward the initial model, which REF_UPDATE "cycle" moves: use "never"')
        for bad, why in (
            (ADVANTAGES[self.ADVANTAGE].critic, f"ADVANTAGE {self.ADVANTAGE!r} (a critic learns from rewards replayed rows do not get)"),
            (self.DYNAMIC_SAMPLING, "DYNAMIC_SAMPLING (it would drop the replayed groups: they have no reward)"),
            (mode == "hybrid" and HYBRID_STRATEGIES[self.HYBRID].in_update, f"HYBRID {self.HYBRID!r} (it would SFT on replayed prompts)"),
        ):
            need(not bad, f"REPLAY_SHARE does not combine with {why}")

    def _check_save_best(self, need) -> None:
        if not self.SAVE_BEST:
            return
        need(
            bool(self.EVAL_FILE or self.RETAIN_FILE),
            f"SAVE_BEST {self.SAVE_BEST!r} selects by a held-out metric: set EVAL_FILE (or RETAIN_FILE)",
        )
        need(
            self.EVAL_EVERY > 0,
            f"SAVE_BEST {self.SAVE_BEST!r} compares evaluations during the run: set EVAL_EVERY "
            "(the steps between them; without it the run evaluates only at its start and end)",
        )
        known = eval_metric_keys(self)
        need(
            self.SAVE_BEST in known or self.RETAIN_FILE and self.SAVE_BEST.startswith("retain/"),  # categories: at the first
            f"SAVE_BEST {self.SAVE_BEST!r} is not a metric this run's evaluation logs; it logs: {', '.join(sorted(known))}",
        )

    def _check_curriculum(self, need, mode: str) -> dict:
        """CURRICULUM's rule, its defaults filled in (whether the task or the column has levels: at load)."""
        rule = {**CURRICULUM_DEFAULTS, **self.CURRICULUM}
        unknown = sorted(set(rule) - set(CURRICULUM_DEFAULTS))
        need(not unknown, f"CURRICULUM: unknown field(s) {unknown}; it takes {', '.join(CURRICULUM_DEFAULTS)}")
        number = all(isinstance(rule[k], (int, float)) and not isinstance(rule[k], bool) for k in ("raise_above", "lower_below"))
        need(
            number and 0 <= rule["lower_below"] < rule["raise_above"] <= 1,
            f"CURRICULUM: need 0 <= lower_below < raise_above <= 1; got {rule['lower_below']!r}, {rule['raise_above']!r}",
        )
        for k in ("window", "start"):
            ok = isinstance(rule[k], int) and not isinstance(rule[k], bool) and rule[k] >= (1 if k == "window" else 0)
            need(ok, f"CURRICULUM {k!r} must be a whole number >= {1 if k == 'window' else 0}; got {rule[k]!r}")
        need(rule["mode"] in ("inclusive", "upper_bound"), f'CURRICULUM "mode" must be "inclusive" or "upper_bound"; got {rule["mode"]!r}')
        need(mode != "sft", 'CURRICULUM steers the RL prompts by their pass rate: MODE "sft" has none')
        need(
            runtime.is_task(self.TRAIN_FILE) != bool(rule["column"]),
            'CURRICULUM needs levels: a "reasoning_gym:NAME" TRAIN_FILE (its curriculum), or "column" naming the difficulty '
            "column of TRAIN_FILE's rows (not both)",
        )
        return rule

    def _check_ranges(self, need) -> None:
        need(0 < self.PERCENT <= 100, f"PERCENT must be in (0, 100], got {self.PERCENT}")
        at_least_one = "SFT_BATCH PPO_BATCH PPO_EPOCHS EPOCHS MAXSEQ MAX_NEW_TOKENS NUM_GENERATIONS GRAD_ACCUM LOG_EVERY KL_HORIZON \
            EVAL_SAMPLES KEEP_CHECKPOINTS MAX_BAD_STEPS EVAL_NUM_SAMPLES MAX_SAMPLING_ROUNDS MAX_TURNS MAX_OBSERVATION_TOKENS"
        for key in at_least_one.split():
            need(getattr(self, key) >= 1, f"{key} must be >= 1, got {getattr(self, key)}")
        at_least_zero = "NUM_SAMPLES CYCLE_SFT_STEPS CYCLE_PPO_UPDATES NO_REPEAT_NGRAM_SIZE EVAL_EVERY SAVE_EVERY WARMUP_STEPS \
            LOGITS_CHUNK INIT_KL_COEF CLIPRANGE CLIPRANGE_VALUE VF_COEF"
        for key in at_least_zero.split():
            need(getattr(self, key) >= 0, f"{key} must be >= 0, got {getattr(self, key)}")
        need(self.LORA_R >= 0, f"LORA_R must be >= 0 (0 = full fine-tuning), got {self.LORA_R}")
        positive = "LR_SFT LR_PPO TEMPERATURE REPETITION_PENALTY MAX_GRAD_NORM RATIO_THRESHOLD TARGET_KL LORA_ALPHA EVAL_TEMPERATURE \
            ROLLOUT_IS_CAP SAPO_TAU_POS SAPO_TAU_NEG ENV_STEP_TIMEOUT"
        for key in positive.split():
            need(getattr(self, key) > 0, f"{key} must be > 0, got {getattr(self, key)}")
        need(0 < self.TOP_P <= 1, f"TOP_P must be in (0, 1], got {self.TOP_P}")
        kv = self.VLLM_KV_CACHE_GB
        need(kv is None or kv > 0, f"VLLM_KV_CACHE_GB must be > 0 or null (what a rollout needs), got {kv}")
        need(
            0 < self.VLLM_GPU_MEMORY_UTILIZATION < 1,
            f"VLLM_GPU_MEMORY_UTILIZATION must be in (0, 1), got {self.VLLM_GPU_MEMORY_UTILIZATION}",
        )
        need(0 <= self.GAMMA <= 1 and 0 <= self.LAM <= 1, f"GAMMA and LAM must be in [0, 1], got {self.GAMMA}, {self.LAM}")
        need(0 <= self.LORA_DROPOUT < 1, f"LORA_DROPOUT must be in [0, 1), got {self.LORA_DROPOUT}")

    def _warn_unused(self, mode: str) -> None:
        strategy = self.HYBRID if mode == "hybrid" else None
        if self.HYBRID != "alternate" and strategy is None:
            runtime.warn(f'HYBRID {self.HYBRID!r} is ignored: it applies to MODE "hybrid" (here {mode!r})')
        if self.SFT_FILE and strategy != "alternate":
            why = (
                f"HYBRID {strategy!r} trains SFT inside each update on the RL prompt's own reference (where its TRAIN_FILE row has one)"
                if strategy
                else f'it feeds the SFT side of MODE "hybrid" (here {mode!r})'
            )
            runtime.warn(f'SFT_FILE is ignored: {why}; it is the demonstrations of HYBRID "alternate"')
        if self.TASK_CONFIG and not any(runtime.is_task(f) for f in (self.TRAIN_FILE, self.EVAL_FILE, self.SFT_FILE)):
            runtime.warn('TASK_CONFIG is ignored: no TRAIN_FILE, EVAL_FILE or SFT_FILE names a task ("reasoning_gym:NAME")')
        if self.GATE_THRESHOLD is not None and strategy != "gate":
            runtime.warn(
                f'GATE_THRESHOLD is ignored: it applies to MODE "hybrid" with HYBRID "gate" (here MODE {mode!r}, HYBRID {self.HYBRID!r})'
            )

    def resolved(self) -> dict:
        return dataclasses.asdict(self)


_TRUE, _FALSE = runtime.TRUE, runtime.FALSE


def action_formats() -> tuple[dict, dict]:
    """environments' ACTION_FORMATS registry, and each environment type's own format (ACTION_FORMAT "auto")."""
    import environments  # light: the environments import their libraries when built

    return environments.ACTION_FORMATS, environments.DEFAULT_FORMATS


def one_of(key: str, value: str, choices: tuple) -> None:
    """A key whose value names one of `choices`: anything else is an error with a "did you mean"."""
    if value not in choices:
        close = difflib.get_close_matches(str(value), choices, n=1, cutoff=0.5)
        hint = f" - did you mean {close[0]!r}?" if close else ""
        raise runtime.UserError(f"{key} must be one of {', '.join(choices)}; got {value!r}{hint}")


def load_config(path: str) -> Config:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise runtime.UserError(f"cannot read config {path}: {e.strerror}") from None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise runtime.UserError(f"config {path} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    return Config.from_dict(raw)


def config_defaults() -> list[tuple[str, Any, str]]:
    """(key, default, help) for every config key, in file order; a key's choices are its registry's names."""

    def doc(f) -> str:
        text = f.metadata["help"]() if callable(f.metadata["help"]) else f.metadata["help"]
        choices = f.metadata["choices"]() if f.metadata["choices"] else ()
        described = ", ".join(f"{name} ({entry.doc})" for name, entry in choices.items()) if isinstance(choices, dict) else ""
        return text.replace("{choices}", " | ".join(choices)).replace("{described}", described)

    return [
        (f.name, f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default, doc(f))
        for f in dataclasses.fields(Config)
    ]


def config_help() -> str:
    lines = ["config keys (JSON, with defaults):"]
    lines += [f"  {key:<22} {json.dumps(default):<24} {doc}" for key, default, doc in config_defaults()]
    lines += ["", "registries (each config key below accepts one of its names):"]
    for key, registry in registry_table():
        lines.append(f"  {key}:")
        lines += [f"    {name:<24} {summary}" for name, summary in registry]
    return "\n".join(lines)


def registry_table() -> list[tuple[str, list[tuple[str, str]]]]:
    """(config key, [(name, first line of its docstring)]) for every registry of interchangeable pieces."""
    import environments
    import rewards

    def first_line(obj) -> str:
        if isinstance(obj, (Choice, KLPlace)):
            return obj.doc
        if isinstance(obj, environments.ActionFormat):
            return obj.help
        fn = getattr(obj, "fn", obj)  # an Estimator or a Strategy holds its function
        text = " ".join((getattr(fn, "__doc__", None) or "").strip().split("\n\n")[0].split())
        return text if len(text) <= 110 else text[: text.rfind(" ", 0, 108)] + " ..."

    tables = {
        "ADVANTAGE": ADVANTAGES,
        "POLICY_LOSS": POLICY_LOSSES,
        "LOSS_AGG": LOSS_AGGREGATIONS,
        "KL_IN": KL_PLACES,
        "ROLLOUT_IS": ROLLOUT_IS_MODES,
        "HYBRID": HYBRID_STRATEGIES,
        "KL_PENALTY": KL_PENALTIES,
        "SFT_LOSS": SFT_LOSSES,
        "SFT_TOKEN_WEIGHT": SFT_TOKEN_WEIGHTS,
        "MIX_SCHEDULE": MIX_SCHEDULES,
        "LR_SCHEDULE": LR_SCHEDULES,
        "DATA_FORMAT": DATA_FORMATS,
        "GENERATION_BACKEND": runtime.GENERATION_BACKENDS,
        "REWARD type": rewards.REWARDS,
        "REWARD math extract": rewards.MATH_EXTRACTORS,
        "ENVIRONMENT type": environments.ENVIRONMENTS,
        "DISTILL": DISTILL_LOSSES,
        "ACTION_FORMAT": environments.ACTION_FORMATS,
        "PROMPT_FORMAT": PROMPT_FORMATS,
        "IMPORTANCE_LEVEL": IMPORTANCE_LEVELS,
        "REF_UPDATE": REF_UPDATES,
        "SAVE_BEST_MODE": SAVE_BEST_MODES,
    }
    return [(key, [(name, first_line(entry)) for name, entry in registry.items()]) for key, registry in tables.items()]


def config_markdown() -> str:
    """docs/config.md's key table."""
    return "\n".join(
        ["| key | default | meaning |", "|---|---|---|"]
        + [f"| `{key}` | `{json.dumps(default)}` | {doc.replace('|', '/')} |" for key, default, doc in config_defaults()]
    )


@dataclass(frozen=True)
class Plan:
    """What a run derives once at start from the config, the launch and the model, read-only afterwards: printed as
    one block, written to OUTPUT_DIR/plan.json and into each checkpoint. Built by make_plan (pure) in run(). The
    update and the loop read their sizes here; the properties are the same facts per process or per epoch."""

    seed: int  # SEED, or drawn by the main process when SEED is null (seed_drawn), or the resumed run's
    seed_drawn: bool  # printed by describe(): the seed to put in a config to rerun the run
    bf16: bool  # bf16 autocast (BF16 true, or "auto" resolved on this machine)
    precision: str  # why: the run's first line
    world_size: int  # processes
    maxseq: int  # MAXSEQ, clamped to the model's context window
    model: str  # the directory the weights load from (an alias's or .gguf's converted copy in CACHE_DIR)
    adapter: Optional[str]  # MODEL's LoRA adapter directory, if MODEL is one
    n_items: int  # training items (after PERCENT / NUM_SAMPLES): TRAIN_FILE's, the RL side's (and SFT's without SFT_FILE)
    schedule: tuple  # one epoch's steps in order, "sft" and "ppo" (step_plan)
    sft_batch: int  # SFT examples per step (SFT_BATCH)
    ppo_batch: int  # prompts per PPO update (PPO_BATCH)
    group_size: int  # responses per prompt (NUM_GENERATIONS): rows i*G .. i*G+G-1 of an update answer prompt i
    responses_per_minibatch: int  # PPO_MINI x NUM_GENERATIONS
    total_steps: int  # (SFT steps + PPO updates) x EPOCHS
    sft_optimizer_steps: int  # in the run: sizes the SFT learning-rate schedule
    ppo_optimizer_steps: int  # in the run (updates x PPO_EPOCHS x minibatches): sizes the PPO schedule
    checkpoint_bytes: Optional[int] = None  # one checkpoint, estimated (storage_estimate); None: the model's size unknown
    final_bytes: Optional[int] = None  # the final model (inference_lm and ppo_full's own files), estimated
    n_sft_items: Optional[int] = None  # the SFT side's items when SFT_FILE holds them (None: TRAIN_FILE's n_items)
    backend: str = "hf"  # what generates (GENERATION_BACKEND, "auto" resolved by resolve_backend)
    generation: str = ""  # why: printed at start beside the precision
    weight_first: bool = False  # hf decoding's fp32 linear layers as weight @ x^T (resolve_weight_first: a CPU probe)
    replay_prompts: int = 0  # REPLAY_SHARE: replayed prompts in each update (of ppo_batch); the rest are TRAIN_FILE's

    def items(self, side: str) -> int:
        """The items of a side's stream ("sft" or "ppo"): each walks its own once per epoch."""
        return self.n_sft_items if side == "sft" and self.n_sft_items is not None else self.n_items

    @property
    def responses_per_update(self) -> int:  # PPO_BATCH x NUM_GENERATIONS
        return self.ppo_batch * self.group_size

    @property
    def minibatches_per_epoch(self) -> int:  # per PPO epoch of an update: ceil(PPO_BATCH / PPO_MINI)
        return math.ceil(self.responses_per_update / self.responses_per_minibatch)

    @property
    def sft_batch_per_process(self) -> int:
        return self.sft_batch // self.world_size

    @property
    def prompts_per_process(self) -> int:
        return self.ppo_batch // self.world_size

    @property
    def sft_steps_per_epoch(self) -> int:
        return self.schedule.count("sft")

    @property
    def ppo_updates_per_epoch(self) -> int:
        return self.schedule.count("ppo")

    def batch_size(self, side: str) -> int:
        """Items a step of `side` ("sft" or "ppo") draws from its stream (REPLAY_SHARE's prompts come from their own)."""
        return self.sft_batch if side == "sft" else self.ppo_batch - self.replay_prompts

    def describe(self) -> str:
        """The block printed at start."""
        rows = [
            ("seed", f"{self.seed}" + (" (drawn)" if self.seed_drawn else "")),
            ("precision", self.precision),
            ("generation", self.generation),
            ("processes", self.world_size),
            ("model", self.model + (f" + adapter {self.adapter}" if self.adapter else "")),
            ("MAXSEQ", self.maxseq),
            (
                "training items",
                f"{self.n_items}"
                if self.n_sft_items is None
                else f"{self.n_items} RL prompts (TRAIN_FILE), {self.n_sft_items} SFT demonstrations (SFT_FILE)",
            ),
            ("steps", f"{self.total_steps} ({self.sft_steps_per_epoch} SFT + {self.ppo_updates_per_epoch} PPO per epoch)"),
            ("per process", f"{self.sft_batch_per_process} SFT examples, {self.prompts_per_process} PPO prompts"),
            (
                "PPO update",
                f"{self.responses_per_update} responses, minibatches of {self.responses_per_minibatch} "
                f"({self.minibatches_per_epoch} per epoch)",
            ),
            ("optimizer steps", f"SFT {self.sft_optimizer_steps}, PPO {self.ppo_optimizer_steps}"),
            (
                "replay",
                f"{self.replay_prompts} of each update's {self.ppo_batch} prompts from REPLAY_FILE (or RETAIN_FILE)"
                if self.replay_prompts
                else "off",
            ),
            ("disk", outputs.storage_line(self.checkpoint_bytes, self.final_bytes)),
        ]
        return "plan:\n" + "\n".join(f"  {k:<16} {v}" for k, v in rows)


def make_plan(
    cfg: Config,
    n_items: int,
    world: int,
    seed: int,
    seed_drawn: bool,
    bf16: bool,
    precision: str,
    model: str,
    adapter: Optional[str] = None,
    context: Optional[int] = None,
    counts: Optional[runtime.ParameterCounts] = None,
    n_sft_items: Optional[int] = None,
    weight_first: tuple[bool, str] = (False, ""),
) -> Plan:
    """Every derived size, once. Pure: run() passes in what it read from the launch, the machine and the model
    (n_sft_items: SFT_FILE's rows, when it feeds the SFT side; weight_first: resolve_weight_first's choice and why)."""
    runtime.check_launch(cfg, world)
    outputs.check_trackers(cfg)
    maxseq = min(cfg.MAXSEQ, context) if context else cfg.MAXSEQ
    if maxseq < cfg.MAXSEQ:
        runtime.warn(f"MAXSEQ={cfg.MAXSEQ} exceeds the context of MODEL ({context} tokens); using MAXSEQ={context}")
    schedule = tuple(step_plan(cfg, n_items, n_sft_items))
    n_sft, n_ppo = schedule.count("sft"), schedule.count("ppo")
    minibatches = math.ceil(cfg.PPO_BATCH / cfg.PPO_MINI)
    critic = ADVANTAGES[cfg.ADVANTAGE].critic
    checkpoint_bytes, final_bytes = outputs.storage_estimate(cfg, counts, bf16, critic) if counts else (None, None)
    backend, generation = runtime.resolve_backend(cfg)
    return Plan(
        seed=seed,
        seed_drawn=seed_drawn,
        bf16=bf16,
        precision=precision,
        world_size=world,
        maxseq=maxseq,
        model=model,
        adapter=adapter,
        n_items=n_items,
        schedule=schedule,
        sft_batch=cfg.SFT_BATCH,
        ppo_batch=cfg.PPO_BATCH,
        group_size=cfg.NUM_GENERATIONS,
        responses_per_minibatch=cfg.PPO_MINI * cfg.NUM_GENERATIONS,
        total_steps=len(schedule) * cfg.EPOCHS,
        sft_optimizer_steps=n_sft * cfg.EPOCHS,
        ppo_optimizer_steps=n_ppo * cfg.EPOCHS * cfg.PPO_EPOCHS * minibatches,
        checkpoint_bytes=checkpoint_bytes,
        final_bytes=final_bytes,
        n_sft_items=n_sft_items,
        backend=backend,
        generation=generation + (f"; {weight_first[1]}" if weight_first[1] else ""),
        weight_first=weight_first[0],
        replay_prompts=replay_prompts(cfg),
    )


def replay_prompts(cfg: Config) -> int:
    """REPLAY_SHARE's replayed prompts per update (validate keeps it within 1 .. PPO_BATCH - 1 when on)."""
    return round(cfg.REPLAY_SHARE * cfg.PPO_BATCH) if cfg.MODE.lower() != "sft" else 0


def api_plan(cfg: Config, n_items: Optional[int] = None, lm: Optional[nn.Module] = None, bf16: Optional[bool] = None) -> Plan:
    """The Plan of a trainer built from Python (README.md, Python API) rather than by run(): bf16 (default: BF16 true;
    "auto" is fp32 here), SEED or a drawn one, this launch's processes, MAXSEQ clamped to `lm`'s context. A decaying
    LR_SCHEDULE needs n_items (the run length)."""
    if n_items is None and cfg.LR_SCHEDULE != "constant":
        raise ValueError(f"LR_SCHEDULE {cfg.LR_SCHEDULE!r} needs the run length: pass n_items to HybridTrainer")
    seed = cfg.SEED if cfg.SEED is not None else draw_seed()
    bf16 = cfg.BF16 is True if bf16 is None else bf16
    context = runtime.model_context(lm.config) if lm is not None else None
    return make_plan(
        cfg,
        n_items or 1,
        runtime.world_size(),
        seed,
        cfg.SEED is None,
        bf16,
        f"bf16 {'on' if bf16 else 'off'} (Python API)",
        getattr(getattr(lm, "config", None), "name_or_path", cfg.MODEL),
        context=context,
    )


def draw_seed() -> int:
    return int.from_bytes(os.urandom(4), "big") >> 1


# ==================================================================================================
# 2. Pure PPO math. Shapes: B = batch, T = response length, V = vocabulary.
# ==================================================================================================
def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """(B, T, V) logits, (B, T) labels -> (B, T) log p(label) under softmax(logits / temperature)."""
    return token_stats(logits, labels, temperature, entropy=False)[0]


def token_stats(
    logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0, entropy: bool = True
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(..., V) logits, (...) labels -> (log p(label) at temperature, the entropy of the distribution: no gradient;
    None with entropy=False; TRL's entropy_from_logits). The one log-prob formula: logprobs_from_logits is its first."""
    from trl.trainer.utils import entropy_from_logits

    scaled = logits.float() if temperature == 1 else logits.float() / temperature  # x / 1 is x: no pass over V
    logprobs = torch.log_softmax(scaled, dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    if not entropy:
        return logprobs, None
    with torch.no_grad():
        return logprobs, entropy_from_logits(scaled)


def chunked_token_stats(
    hidden: torch.Tensor, head: Callable, labels: torch.Tensor, temperature: float, chunk: int, entropy: bool = True
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """token_stats from the last hidden states (B, T, H) through the LM head `head`, `chunk` positions at a time: with
    gradient each chunk's logits are recomputed in backward (checkpointed), so no (B, T, V) tensor exists, only one
    chunk's (TRL's selective_log_softmax saves the log-softmax copy; Liger and verl fuse the head the same way).
    -> (log-probs (B, T), entropy (B, T)); equal to token_stats(head(hidden), labels) position by position."""
    logprobs, ent = chunked_head(hidden, head, lambda logits, y: token_stats(logits, y, temperature, entropy), labels, chunk=chunk)
    return logprobs, ent


def chunked_head(hidden: torch.Tensor, head: Callable, fn: Callable, *columns: torch.Tensor, chunk: int) -> tuple:
    """fn(head(h), *the columns' values there) -> a tuple of per-position tensors (or None), over `chunk` positions at a
    time of hidden (B, T, H) and the (B, T) columns; under gradient each chunk is checkpointed (its logits recomputed
    in backward), unless there is only one: recomputing it would cost a head forward and lower no peak (its logits
    and their gradients exist together either way) -> fn's outputs as (B, T) each."""
    from torch.utils.checkpoint import checkpoint

    B, T, H = hidden.shape
    step = lambda h, *cols: fn(head(h), *cols)  # noqa: E731
    grad = torch.is_grad_enabled() and hidden.requires_grad and B * T > chunk
    pieces = zip(hidden.reshape(B * T, H).split(chunk), *(c.reshape(B * T).split(chunk) for c in columns))
    parts = [checkpoint(step, *piece, use_reentrant=False) if grad else step(*piece) for piece in pieces]
    return tuple(None if outs[0] is None else torch.cat(outs).view(B, T) for outs in zip(*parts))


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: Optional[int] = None) -> torch.Tensor:
    """Mean of x over positions where mask is 1 (all of them, or along dim)."""
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of x over masked positions (Bessel-corrected by default, as TRL)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.sum()
        if n < 2:
            return var
        var = var * n / (n - 1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x - mean) / std over masked positions; shift_mean=False keeps the mean (scales only)."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


# ---- KL penalties: (B, T) log-probs of the sampled tokens under the policy and the reference -> (B, T) ----
def kl_k1(logprobs, ref_logprobs):
    """k1: logp - ref (unbiased, can be negative per token)."""
    return logprobs - ref_logprobs


def kl_abs(logprobs, ref_logprobs):
    """|logp - ref|."""
    return (logprobs - ref_logprobs).abs()


def kl_k2(logprobs, ref_logprobs):
    """k2 = mse: 0.5 (logp - ref)^2."""
    return 0.5 * (logprobs - ref_logprobs) ** 2


def kl_k3(logprobs, ref_logprobs):
    """k3: r - 1 - log r with r = p_ref / p (Schulman): unbiased, >= 0 (verl's "low_var_kl", TRL GRPO's KL)."""
    log_r = ref_logprobs - logprobs
    return torch.exp(log_r) - 1 - log_r


def kl_full(logprobs, ref_logprobs):
    """The exact KL over the whole distribution: inputs are log-distributions (B, T, V)."""
    return (logprobs.exp() * (logprobs - ref_logprobs)).sum(-1)


KL_PENALTIES = {"kl": kl_k1, "abs": kl_abs, "mse": kl_k2, "k2": kl_k2, "k3": kl_k3, "full": kl_full}


def kl_per_token(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str = "kl") -> torch.Tensor:
    """Per-token KL estimate KL_PENALTIES[kind], (B, T). For kind "full", inputs are whole log-distributions (B, T, V)."""
    if kind not in KL_PENALTIES:
        raise ValueError(f"unknown KL penalty {kind!r}")
    return KL_PENALTIES[kind](logprobs, ref_logprobs)


def last_positions(mask: torch.Tensor) -> torch.Tensor:
    """(B, T) mask -> (B,) the position of each row's last 1 (0 for a row with none)."""
    positions = torch.arange(mask.shape[1], device=mask.device)
    return (positions * (mask > 0)).amax(1)


def compute_rewards(scores: torch.Tensor, kl: torch.Tensor, loss_mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """Per-token rewards (B, T): -kl_coef * kl on every token the loss covers, plus the score on the last of them."""
    rewards = -kl_coef * kl * loss_mask
    rewards[torch.arange(len(scores)), last_positions(loss_mask)] += scores
    return rewards


def compute_gae(values: torch.Tensor, rewards: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """Generalised advantage estimation over the tokens the loss covers. (B, T) each -> (advantages, returns).

    Positions with mask 0 are skipped: past the response end (the last token bootstraps from 0), and inside a
    response (an environment's observation tokens): GAE runs over the model's tokens as one sequence, each
    bootstrapping from the value of the next token the loss covers (as OpenRLHF and ROLL do for multi-turn).
    """
    values, rewards = values * mask, rewards * mask
    on, v, r = (mask > 0).unbind(1), values.unbind(1), rewards.unbind(1)  # columns, sliced once
    last_gae = torch.zeros_like(values[:, 0])
    next_value = torch.zeros_like(last_gae)
    columns = [last_gae] * values.shape[1]
    for t in reversed(range(values.shape[1])):
        delta = r[t] + gamma * next_value - v[t]
        columns[t] = delta + gamma * lam * last_gae
        last_gae = torch.where(on[t], columns[t], last_gae)
        next_value = torch.where(on[t], v[t], next_value)
    advantages = torch.stack(columns, 1) * mask
    return advantages, advantages + values


class PolicyLoss(NamedTuple):
    loss: torch.Tensor  # scalar
    clipfrac: torch.Tensor  # fraction of tokens where the clip (CISPO: the weight's cap; GMPO: the log-ratio clip) was active
    approx_kl: torch.Tensor  # 0.5 * mean (logp - old_logp)^2
    ratio: torch.Tensor  # mean probability ratio (GSPO, GMPO: of the per-response ratios, over their tokens)


# ---- loss aggregations: a (B, T) per-token loss and its mask -> a scalar (LOSS_AGG) ----
# `units` counts what the mean divides by (tokens, or responses with a token): a GRAD_ACCUM chunk of a minibatch
# weighs its units over the minibatch's, so that the chunks' gradients add up to the whole minibatch's.
def agg_token_mean(x, mask, max_len):
    """mean over all tokens (TRL "bnpo" / DAPO; verl "token-mean")"""
    return masked_mean(x, mask)


def _seq_mean(per_seq, mask):
    has = (mask.sum(1) > 0).float()  # responses with no token (excluded rows) do not count
    return (per_seq * has).sum() / has.sum().clamp(min=1)


def agg_seq_mean_token_mean(x, mask, max_len):
    """mean over responses of each one's token mean (TRL "grpo"; verl "seq-mean-token-mean")"""
    return _seq_mean((x * mask).sum(1) / mask.sum(1).clamp(min=1), mask)


def agg_seq_mean_token_sum_norm(x, mask, max_len):
    """mean over responses of token sums / MAX_NEW_TOKENS (TRL "dr_grpo", Liu et al. 2025; verl "seq-mean-token-sum-norm")"""
    return _seq_mean((x * mask).sum(1) / max_len, mask)


def tokens(mask):
    return mask.sum()


def responses(mask):
    return (mask.sum(1) > 0).sum()


class Aggregation(NamedTuple):
    fn: Callable  # (x (B, T), mask (B, T), max_len) -> scalar
    units: Callable  # mask (B, T) -> what the mean divides by: its tokens, or its responses with a token


LOSS_AGGREGATIONS = {
    "token_mean": Aggregation(agg_token_mean, tokens),
    "seq_mean_token_mean": Aggregation(agg_seq_mean_token_mean, responses),
    "seq_mean_token_sum_norm": Aggregation(agg_seq_mean_token_sum_norm, responses),
}


def aggregate_loss(x: torch.Tensor, mask: torch.Tensor, mode: str = "token_mean", max_len: Optional[int] = None) -> torch.Tensor:
    """A (B, T) per-token loss -> a scalar by LOSS_AGGREGATIONS[mode] (verl core_algos.agg_loss; TRL grpo_trainer.py
    loss types)."""
    return LOSS_AGGREGATIONS[mode].fn(x, mask, max_len)


# ---- policy losses: one function each, in the POLICY_LOSSES registry ----
# Every loss gets the same keyword arguments and takes what it needs: log_ratio = log pi - log pi_old (B, T),
# logprobs (B, T) with grad, advantages (B, T), mask (B, T), low / high (CLIPRANGE / CLIPRANGE_HIGH),
# tau = (SAPO_TAU_POS, SAPO_TAU_NEG) -> PolicyTerms. policy_loss() then applies the rollout correction's weights,
# adds the KL term (KL_IN "loss") and aggregates (LOSS_AGG).
class PolicyTerms(NamedTuple):
    per_token: torch.Tensor  # (B, T) the loss on each token
    ratio: torch.Tensor  # (B, T), or (B, 1) for a ratio per response: the importance ratio
    clipped: torch.Tensor  # same shape as ratio, bool: the clip was active there


def _clipped_surrogate(ratio, advantages, low, high):
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - low, 1.0 + high)
    return PolicyTerms(torch.maximum(unclipped, clipped), ratio, clipped > unclipped)


def loss_ppo(log_ratio, advantages, low, high, **_):
    """-min(r A, clip(r, 1 - low, 1 + high) A), r per token (Schulman et al. 2017; high > low: DAPO's clip-higher)"""
    return _clipped_surrogate(torch.exp(log_ratio), advantages, low, high)


def loss_gspo(log_ratio, advantages, mask, low, high, **_):
    """the clipped surrogate with one ratio per response, exp(mean over its tokens of log r) (GSPO, Zheng et al.
    2025; TRL importance_sampling_level "sequence")"""
    return _clipped_surrogate(torch.exp(masked_mean(log_ratio, mask, dim=1)[:, None]), advantages, low, high)


def loss_cispo(log_ratio, logprobs, advantages, high, **_):
    """-sg(min(r, 1 + high)) A log pi (CISPO, MiniMax-M1 2025): every token keeps a gradient, the importance weight is
    capped above only, as TRL (its epsilon_high is our 1 + CLIPRANGE_HIGH); verl also clips below"""
    ratio = torch.exp(log_ratio)
    return PolicyTerms(-torch.clamp(ratio, max=1.0 + high).detach() * advantages * logprobs, ratio, ratio > 1.0 + high)


def loss_sapo(log_ratio, advantages, tau, **_):
    """-sigmoid(tau (r - 1)) 4 / tau A, a soft gate instead of the hard clip; tau = SAPO_TAU_POS where A > 0, else
    SAPO_TAU_NEG (SAPO, Qwen 2025; TRL loss_type "sapo")"""
    ratio = torch.exp(log_ratio)
    t = torch.where(advantages > 0, tau[0], tau[1])
    return PolicyTerms(-torch.sigmoid(t * (ratio - 1)) * 4 / t * advantages, ratio, torch.zeros_like(ratio, dtype=torch.bool))


def loss_gmpo(log_ratio, advantages, mask, low, high, **_):
    """-A exp(mean_t sgn(A) min(sgn(A) log r_t, sgn(A) clip(log r_t, -low, high))) per response: the geometric mean of
    its token ratios, each clipped in log space (GMPO, Zhao et al. 2025; verl "geo_mean"). A: the response's mean
    advantage; the response's loss stands on each of its tokens (LOSS_AGG auto: seq_mean_token_mean, the paper's mean)."""
    sign = torch.sign(advantages)
    clamped = torch.clamp(log_ratio, -low, high)
    kept = sign * torch.minimum(sign * log_ratio, sign * clamped)
    ratio = torch.exp(masked_mean(kept, mask, dim=1))[:, None]
    advantage = masked_mean(advantages, mask, dim=1)[:, None]
    return PolicyTerms((-advantage * ratio).expand_as(mask), torch.exp(log_ratio), (kept != log_ratio) & (mask > 0))


class PolicyLossKind(NamedTuple):
    fn: Callable
    loss_agg: Optional[str] = None  # LOSS_AGG "auto" with this loss (None: the estimator's)


POLICY_LOSSES = {
    "ppo": PolicyLossKind(loss_ppo),
    "gspo": PolicyLossKind(loss_gspo),
    "cispo": PolicyLossKind(loss_cispo),
    "sapo": PolicyLossKind(loss_sapo),
    "gmpo": PolicyLossKind(loss_gmpo, loss_agg="seq_mean_token_mean"),
}


class LossSettings(NamedTuple):
    """What the policy loss is, fixed for a run (PPOUpdate makes it once from the Config)."""

    cliprange: float = 0.2  # CLIPRANGE: the ratio's clip below (and above, without cliprange_high)
    cliprange_high: Optional[float] = None  # CLIPRANGE_HIGH (DAPO's clip-higher); None: cliprange
    kind: str = "ppo"  # POLICY_LOSS: the POLICY_LOSSES entry
    agg: str = "token_mean"  # LOSS_AGG, resolved: the LOSS_AGGREGATIONS entry
    max_len: Optional[int] = None  # MAX_NEW_TOKENS: seq_mean_token_sum_norm's constant
    tau: tuple = (1.0, 1.05)  # (SAPO_TAU_POS, SAPO_TAU_NEG)

    @classmethod
    def from_config(cls, cfg: Config) -> "LossSettings":
        return cls(
            cfg.CLIPRANGE, cfg.CLIPRANGE_HIGH, cfg.POLICY_LOSS, cfg.LOSS_AGG, cfg.MAX_NEW_TOKENS, (cfg.SAPO_TAU_POS, cfg.SAPO_TAU_NEG)
        )


def policy_loss(
    logprobs,
    old_logprobs,
    advantages,
    mask,
    settings: LossSettings,
    kl: Optional[torch.Tensor] = None,
    is_weights: Optional[torch.Tensor] = None,
) -> PolicyLoss:
    """The policy loss POLICY_LOSSES[settings.kind], all inputs (B, T). is_weights: the rollout correction's per-token
    weights (ROLLOUT_IS), multiplying the loss before the KL is added (TRL grpo_trainer.py _compute_loss). kl: a
    per-token term (coef x KL, KL_IN "loss", as TRL's GRPO) added before aggregating by LOSS_AGGREGATIONS[settings.agg]."""
    cliprange, cliprange_high, kind, agg, max_len, tau = settings
    log_ratio = logprobs - old_logprobs
    high = cliprange if cliprange_high is None else cliprange_high
    terms = POLICY_LOSSES[kind].fn(
        log_ratio=log_ratio, logprobs=logprobs, advantages=advantages, mask=mask, low=cliprange, high=high, tau=tau
    )
    per_token = terms.per_token
    if is_weights is not None:
        per_token = per_token * is_weights
    if kl is not None:
        per_token = per_token + kl
    loss = aggregate_loss(per_token, mask, agg, max_len)
    clipfrac = masked_mean(terms.clipped.float().expand_as(mask), mask)
    return PolicyLoss(loss, clipfrac, 0.5 * masked_mean(log_ratio**2, mask), masked_mean(terms.ratio.expand_as(mask), mask))


class ValueLoss(NamedTuple):
    loss: torch.Tensor
    clipfrac: torch.Tensor


def value_loss(values, old_values, returns, mask, cliprange_value: float) -> ValueLoss:
    """0.5 * max of squared errors of clipped and unclipped value predictions, all inputs (B, T)."""
    clipped_values = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    err, err_clipped = (values - returns) ** 2, (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(err, err_clipped), mask)
    return ValueLoss(loss, masked_mean((err_clipped > err).float(), mask))


# ---- where the KL goes (KL_IN) ----
class KLPlace(NamedTuple):
    doc: str
    in_reward: bool  # coef x step 4's per-token KL is subtracted from each token's reward
    in_loss: bool  # coef x the current policy's per-token KL is added to the policy loss


KL_PLACES = {
    "reward": KLPlace("a per-token penalty in the reward (PPO-style)", in_reward=True, in_loss=False),
    "loss": KLPlace("INIT_KL_COEF x the per-token KL added to the policy loss (GRPO-style)", in_reward=False, in_loss=True),
}


# ---- the rollout correction: the engine samples from pi_engine, the trainer's log-probs are pi_trainer's ----
def is_token_truncate(log_ratio, mask, cap):
    """per token: min(pi_trainer / pi_engine, cap) (truncated importance sampling, Yao et al. 2025; TRL token_truncate)"""
    return torch.exp(log_ratio).clamp(max=cap) * mask


def is_sequence_mask(log_ratio, mask, cap):
    """per response: its ratio prod(pi_trainer / pi_engine), or 0 beyond cap (TRL's default sequence_mask)"""
    ratio = torch.exp((log_ratio * mask).sum(1, keepdim=True))
    return torch.where(ratio > cap, torch.zeros_like(ratio), ratio).expand_as(mask) * mask


def is_off(log_ratio, mask, cap):
    """no correction: every weight 1"""
    return torch.ones_like(mask)


ROLLOUT_IS_MODES = {"token_truncate": is_token_truncate, "sequence_mask": is_sequence_mask, "off": is_off}


def rollout_is_weights(logprobs, engine_logprobs, mask, mode: str, cap: float) -> torch.Tensor:
    """(B, T) weights of the policy gradient for ROLLOUT_IS `mode` from the trainer's and the engine's log-probs of the
    sampled tokens (B, T each): 1 wherever the two agree (trl/trainer/grpo_trainer.py, vllm_importance_sampling_*)."""
    return ROLLOUT_IS_MODES[mode](logprobs - engine_logprobs, mask, cap)


# ---- advantage estimators: one pure function each, in the ADVANTAGES registry ----
# Every estimator gets the same keyword arguments and takes what it needs:
#   rewards (B, T): per-token rewards, -kl_coef x KL on each token plus the score on the last (compute_rewards;
#                   with KL_IN "loss" the KL part is 0). Outcome estimators use a response's total, rewards.sum(1).
#   mask (B, T), values (B, T) (gae only), group_size G (rows i*G .. i*G+G-1 answer the same prompt),
#   gamma, lam, whiten_rewards, baseline (B,) (remax: the greedy response's score).
# -> (advantages (B, T), returns (B, T) for the value loss, or None: no critic).
def advantages_gae(rewards, mask, values, gamma, lam, whiten_rewards=False, **_):
    """PPO: GAE over the value head's estimates, advantages whitened over the batch (TRL 0.11 PPOTrainer)."""
    if whiten_rewards:
        rewards = masked_whiten(rewards, mask, shift_mean=False)
    advantages, returns = compute_gae(values, rewards, mask, gamma, lam)
    return masked_whiten(advantages, mask), returns


def _groups(rewards, mask, group_size):
    """(B, T) per-token rewards -> (B / G, G) response totals."""
    return (rewards * mask).sum(1).view(-1, group_size)


def advantages_grpo(rewards, mask, group_size, **_):
    """GRPO (Shao et al. 2024): (r - group mean) / (group std + 1e-4), std Bessel-corrected, on every token
    (TRL grpo_trainer.py, scale_rewards "group"; verl core_algos.compute_grpo_outcome_advantage)."""
    r = _groups(rewards, mask, group_size)
    a = (r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-4)
    return a.reshape(-1, 1) * mask, None


def advantages_dr_grpo(rewards, mask, group_size, **_):
    """Dr. GRPO (Liu et al. 2025): r - group mean, no std division (TRL scale_rewards "none"); its loss divides
    token sums by MAX_NEW_TOKENS (LOSS_AGG auto -> seq_mean_token_sum_norm)."""
    r = _groups(rewards, mask, group_size)
    return (r - r.mean(1, keepdim=True)).reshape(-1, 1) * mask, None


def advantages_rloo(rewards, mask, group_size, **_):
    """RLOO (Ahmadian et al. 2024): r_i - mean of the other G - 1 rewards of its group (TRL rloo_trainer.py,
    verl compute_rloo_outcome_advantage)."""
    r = _groups(rewards, mask, group_size)
    return (r - (r.sum(1, keepdim=True) - r) / (group_size - 1)).reshape(-1, 1) * mask, None


def returns_to_go(rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """Discounted sum of each covered token's reward and the covered tokens after it, (B, R); positions the mask does not
    cover pass the return on undiscounted (the model's tokens as one sequence)."""
    returns = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        running = torch.where(mask[:, t] > 0, rewards[:, t] + gamma * running, running)
        returns[:, t] = running
    return returns


def advantages_reinforce_pp(rewards, mask, gamma, **_):
    """REINFORCE++ (Hu 2025): discounted return-to-go of the per-token rewards (KL penalty + final score),
    whitened over the batch (verl compute_reinforce_plus_plus_outcome_advantage)."""
    return masked_whiten(returns_to_go(rewards, mask, gamma), mask), None


def advantages_reinforce_pp_baseline(rewards, mask, group_size, **_):
    """REINFORCE++-baseline: response total minus its group mean on every token, then whitened over the batch
    (verl compute_reinforce_plus_plus_baseline_outcome_advantage)."""
    r = _groups(rewards, mask, group_size)
    centred = (r - r.mean(1, keepdim=True)).reshape(-1, 1) * mask
    return masked_whiten(centred, mask), None


def advantages_remax(rewards, mask, baseline, **_):
    """ReMax (Li et al. 2024): return-to-go (undiscounted) minus the score of a greedy response to the same prompt
    (verl compute_remax_outcome_advantage)."""
    returns = (rewards * mask).flip(-1).cumsum(-1).flip(-1)
    return (returns - baseline[:, None]) * mask, None


def greedy_baseline(sample_and_score, prompts: list, group_size: int) -> torch.Tensor:
    """ReMax's extra pass: one greedy response per prompt, scored like the samples -> (len(prompts) x G,) baseline,
    each prompt's score on its G rows. sample_and_score(prompts, greedy) -> (len(prompts),) scores."""
    return sample_and_score(prompts, greedy=True).repeat_interleave(group_size)


class Estimator(NamedTuple):
    fn: Any
    critic: bool = False  # trains a value head (runs its forward, adds the value loss)
    group: bool = False  # needs NUM_GENERATIONS >= 2
    baseline: Optional[Callable] = None  # an extra pass before the update -> the estimator's `baseline` argument
    loss_agg: str = "token_mean"  # LOSS_AGG "auto"


def advantages_none(rewards, mask, **_):
    """None: zero advantages, for a run whose signal is the distillation term alone (DISTILL token_reverse_kl)."""
    return torch.zeros_like(rewards), None


ADVANTAGES = {
    "gae": Estimator(advantages_gae, critic=True),
    "grpo": Estimator(advantages_grpo, group=True),
    "dr_grpo": Estimator(advantages_dr_grpo, group=True, loss_agg="seq_mean_token_sum_norm"),
    "rloo": Estimator(advantages_rloo, group=True),
    "reinforce_pp": Estimator(advantages_reinforce_pp),
    "reinforce_pp_baseline": Estimator(advantages_reinforce_pp_baseline, group=True),
    "remax": Estimator(advantages_remax, baseline=greedy_baseline),
    "none": Estimator(advantages_none),
}


# ---- on-policy distillation: a teacher's judgement of the student's own tokens (DISTILL) ----
def distill_advantages(
    logprobs: torch.Tensor, teacher_logprobs: torch.Tensor, mask: torch.Tensor, discount: float = 0.0, **_
) -> torch.Tensor:
    """token_reverse_kl: the sampled-token form of on-policy distillation (Thinking Machines' Tinker recipe; Agarwal
    et al. 2024): each sampled token's advantage is -(log pi - log nu), the student's log-prob minus the teacher's, a
    one-sample estimate of the reverse KL; stop-gradient, through the normal clipped policy loss. discount > 0: the
    discounted sum over the later tokens too (returns_to_go). (B, R), 0 off the mask."""
    return returns_to_go(-(logprobs - teacher_logprobs).detach() * mask, mask, discount) * mask


def generalized_jsd(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor, beta: float, temperature: float = 1.0, chunk: int = 64
) -> torch.Tensor:
    """jsd: the generalized Jensen-Shannon divergence over the full vocabulary (Agarwal et al. 2024, eq. 1, as TRL's
    GKD generalized_jsd_loss): beta 0 = forward KL(teacher || student), 1 = reverse KL(student || teacher), between
    them beta KL(teacher || m) + (1 - beta) KL(student || m), m = beta teacher + (1 - beta) student. -> the sum over the
    masked tokens (the caller divides). Computed `chunk` positions at a time, each recomputed in backward
    (checkpointed), so float32 log-softmaxes exist for one chunk only, never the whole (b, r, V)."""
    from torch.utils.checkpoint import checkpoint

    s_flat = student_logits.reshape(-1, student_logits.shape[-1])
    t_flat = teacher_logits.reshape(-1, teacher_logits.shape[-1]).detach()
    rows = mask.reshape(-1).nonzero().squeeze(-1)
    total = student_logits.new_zeros((), dtype=torch.float32)
    for part in rows.split(chunk):
        total = total + checkpoint(_jsd_rows, s_flat[part], t_flat[part], beta, temperature, use_reentrant=False)
    return total


def _jsd_rows(student: torch.Tensor, teacher: torch.Tensor, beta: float, temperature: float) -> torch.Tensor:
    s = torch.log_softmax(student.float() / temperature, -1)
    t = torch.log_softmax(teacher.float() / temperature, -1)
    if beta == 0:
        return (t.exp() * (t - s)).sum()
    if beta == 1:
        return (s.exp() * (s - t)).sum()
    m = torch.logsumexp(torch.stack([s + math.log1p(-beta), t + math.log(beta)]), 0)
    return (beta * (t.exp() * (t - m)).sum(-1) + (1 - beta) * (s.exp() * (s - m)).sum(-1)).sum()


class DistillLoss(NamedTuple):
    fn: Callable
    in_loss: bool  # a term of its own in step 6's loss (reads the whole distribution); else added to step 5's advantages


DISTILL_LOSSES = {"token_reverse_kl": DistillLoss(distill_advantages, in_loss=False), "jsd": DistillLoss(generalized_jsd, in_loss=True)}


CURRICULUM_DEFAULTS = {"raise_above": 0.7, "lower_below": 0.2, "window": 4, "start": 0, "mode": "inclusive", "column": ""}


def curriculum_level(level: int, rates: list, rule: dict, n_levels: int) -> int:
    """CURRICULUM's rule (online difficulty as in AdaRFT; one level at a time as reasoning-gym's curricula): the mean
    training pass rate of the last `window` updates at this level -> one level up above raise_above, one down below
    lower_below, else the same."""
    if len(rates) < rule["window"]:
        return level
    rate = sum(rates[-rule["window"] :]) / rule["window"]
    return min(level + 1, n_levels - 1) if rate > rule["raise_above"] else max(level - 1, 0) if rate < rule["lower_below"] else level


def zero_std_groups(scores: torch.Tensor, group_size: int) -> float:
    """Fraction of groups whose G scores are all equal: their group-relative advantages are 0 (no signal)."""
    g = scores.view(-1, group_size)
    return ((g.max(1).values - g.min(1).values) == 0).float().mean().item()


# ---- SFT losses: (B, T) per-token cross-entropy and sg(p) = exp(-CE), stop-gradient -> (B, T) per-token loss ----
def sft_ce(ce, p):
    """cross-entropy, -log p"""
    return ce


def sft_dft(ce, p):
    """-log p x sg(p) (DFT, Wu et al. 2025, "On the Generalization of SFT")"""
    return ce * p


SFT_LOSSES = {"ce": sft_ce, "dft": sft_dft}


def weight_none(loss, p):
    """every token weighs the same"""
    return loss


def weight_phi(loss, p):
    """x sg(p (1 - p)) (CHORD-phi, Zhang et al. 2025): tokens the policy is unsure of weigh most"""
    return loss * p * (1 - p)


SFT_TOKEN_WEIGHTS = {"none": weight_none, "phi": weight_phi}


def sft_token_losses(logits: torch.Tensor, labels: torch.Tensor, kind: str = "ce", token_weight: str = "none") -> torch.Tensor:
    """(B, T, V) logits, (B, T) labels (-100 = ignored) -> (B, T) per-token loss SFT_LOSSES[kind] weighted by
    SFT_TOKEN_WEIGHTS[token_weight], 0 where ignored."""
    ce = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="none").view_as(labels)
    p = torch.exp(-ce.detach())
    return SFT_TOKEN_WEIGHTS[token_weight](SFT_LOSSES[kind](ce, p), p) * (labels != -100)


# ---- hybrid strategies: how one update splits its prompts between RL and SFT on their demonstrations ----
def mu_constant(start: float, end: float, progress: float) -> float:
    """mu = MIX_COEF throughout"""
    return start


def mu_linear(start: float, end: float, progress: float) -> float:
    """mu from MIX_COEF to MIX_COEF_END in a straight line"""
    return start + (end - start) * progress


def mu_cosine(start: float, end: float, progress: float) -> float:
    """mu from MIX_COEF to MIX_COEF_END along half a cosine"""
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * progress))


MIX_SCHEDULES = {"constant": mu_constant, "linear": mu_linear, "cosine": mu_cosine}


def mix_coef(start: float, end: float, schedule: str, progress: float) -> float:
    """mu at `progress` in [0, 1] of the run, MIX_SCHEDULES[schedule] from start to end."""
    return MIX_SCHEDULES[schedule](start, end, progress)


class HybridSplit(NamedTuple):
    sft: torch.Tensor  # (P,) bool: prompts whose reference response gets the SFT loss
    rl: torch.Tensor  # (P,) bool: prompts whose sampled responses get the RL loss
    mu: float  # loss = (1 - mu) x RL + mu x SFT
    metrics: dict = {}  # the strategy's own metrics for this update


def hybrid_alternate(group_scores: torch.Tensor, cfg: "Config", progress: float) -> None:
    """Blocks of CYCLE_SFT_STEPS SFT steps and CYCLE_PPO_UPDATES PPO updates (the step schedule); updates are all RL."""
    return None


def hybrid_gate(group_scores: torch.Tensor, cfg: "Config", progress: float) -> HybridSplit:
    """HPT (Lv et al. 2025, "Towards a Unified View of LLM Post-Training"): a prompt none of whose G responses
    scores GATE_THRESHOLD is trained on its demonstration, the others by RL; mu = the SFT share of the prompts."""
    sft = group_scores.max(1).values < cfg.GATE_THRESHOLD
    fraction = sft.float().mean().item()
    return HybridSplit(sft, ~sft, fraction, {"hybrid/gate_sft_fraction": fraction})


def hybrid_mix(group_scores: torch.Tensor, cfg: "Config", progress: float) -> HybridSplit:
    """CHORD (Zhang et al. 2025): (1 - mu) RL + mu SFT on every prompt's demonstration, mu following
    MIX_SCHEDULE; a constant mu is InstructGPT's PPO-ptx (Ouyang et al. 2022) on the demonstrations."""
    every = torch.ones(len(group_scores), dtype=torch.bool)
    return HybridSplit(every, every, mix_coef(cfg.MIX_COEF, cfg.MIX_COEF_END, cfg.MIX_SCHEDULE, progress))


class Strategy(NamedTuple):
    fn: Any  # (group scores (P, G), cfg, progress) -> HybridSplit, or None: the update is all RL
    in_update: bool = True  # splits inside each PPO update (else the step schedule alternates SFT steps and updates)


HYBRID_STRATEGIES = {"alternate": Strategy(hybrid_alternate, in_update=False), "gate": Strategy(hybrid_gate), "mix": Strategy(hybrid_mix)}


class Choice(NamedTuple):
    """A registry entry that is a setting, not a function."""

    value: Any
    doc: str


IMPORTANCE_LEVELS = {
    "token": Choice("token", "a ratio per token"),
    "sequence": Choice("sequence", '= POLICY_LOSS "gspo", kept for older configs'),
}
REF_UPDATES = {
    "never": Choice("never", "the frozen initial reference"),
    "cycle": Choice("cycle", "hybrid: the reference becomes the policy at the start of each PPO phase"),
}
SAVE_BEST_MODES = {"max": Choice("max", "a larger value is better"), "min": Choice("min", "a smaller value is better")}
LR_SCHEDULES = {  # transformers.get_scheduler's names
    "constant": Choice("constant_with_warmup", "constant after WARMUP_STEPS of linear warm-up"),
    "linear": Choice("linear", "linear decay to 0 after the warm-up"),
    "cosine": Choice("cosine", "cosine decay to 0 after the warm-up"),
}


class AdaptiveKLController:
    """Ziegler et al. 2019, eq. 2: move the KL coefficient so the observed KL tracks the target."""

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        self.value, self.target, self.horizon = init_kl_coef, target, horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        proportional_error = float(np.clip(current_kl / self.target - 1, -0.2, 0.2))
        self.value *= 1 + proportional_error * n_steps / self.horizon


class FixedKLController:
    def __init__(self, kl_coef: float):
        self.value = kl_coef

    def update(self, current_kl: float, n_steps: int) -> None:
        pass


def apply_missing_eos_penalty(scores: torch.Tensor, ended: torch.Tensor, penalty: Optional[float]) -> torch.Tensor:
    """Subtract `penalty` from the score of responses that never emitted EOS."""
    if penalty is None:
        return scores
    return scores - penalty * (~ended).to(scores.dtype)


def epoch_schedule(n_sft: int, n_ppo: int, cycle_sft: int, cycle_ppo: int) -> list[str]:
    """Order of steps in one epoch: cycle_sft 'sft' steps then cycle_ppo 'ppo' steps, repeated until
    both sides' batches are used (a side whose batches are used drops out)."""
    if cycle_sft == 0:
        n_sft = 0
    if cycle_ppo == 0:
        n_ppo = 0
    schedule, sft_left, ppo_left = [], n_sft, n_ppo
    while sft_left or ppo_left:
        take = min(cycle_sft, sft_left)
        schedule += ["sft"] * take
        sft_left -= take
        take = min(cycle_ppo, ppo_left)
        schedule += ["ppo"] * take
        ppo_left -= take
    return schedule


# ==================================================================================================
# 3. Data
# ==================================================================================================
@dataclass
class Example:
    index: int  # row of the item in its file
    item: dict  # the raw row (passed to rewards)
    target: str  # the reference response (the last assistant turn, the completion, or SELECT_OUTPUT's value)
    prompt: str = ""  # formatted prompt text (filled by tokenize_examples)
    prompt_ids: list = field(default_factory=list)
    target_ids: list = field(default_factory=list)  # response tokens + EOS, truncated to fit MAXSEQ
    category: Optional[str] = None  # CATEGORY_FIELD's value (not part of the prompt; groups the report)
    messages: Optional[list] = None  # chat messages before the response (messages / conversational prompt_completion)
    raw_prompt: Optional[str] = None  # a plain-text prompt used as is (standard prompt_completion, as TRL)
    question: str = ""  # the prompt as a person reads it (the report's samples)
    turns: list = field(default_factory=list)  # (messages, target) of earlier assistant turns (SFT_ALL_TURNS)
    opening: Optional[list] = None  # a conversation that acts (has tool turns): its messages before the first assistant turn
    teacher_prompt_ids: Optional[list] = None  # TEACHER_MODEL "self": the prompt with TEACHER_CONTEXT, as the teacher sees it
    sft_pairs: list = field(default_factory=list)  # tokenized turns: (prompt_ids, target_ids), the last one included
    replay: bool = False  # REPLAY_SHARE: a replayed prompt in an update (no reward; trained toward the initial model)


ROLES = ("system", "user", "assistant", "tool")


def pick_data_format(wanted: str, items: list, prompt_only: bool = False, output_key: str = "") -> str:
    """DATA_FORMAT auto: messages when the rows have a `messages` column, then prompt_completion (`prompt` and
    `completion`; or, where rows may be prompts alone, `prompt` without SELECT_OUTPUT), else fields (today's:
    SELECT_OUTPUT is the response, the other keys the prompt)."""
    if wanted != "auto":
        return wanted
    keys = set(items[0]) if isinstance(items[0], dict) else set()
    bare_prompt = prompt_only and "prompt" in keys and output_key not in keys
    return "messages" if "messages" in keys else "prompt_completion" if {"prompt", "completion"} <= keys or bare_prompt else "fields"


def sketch_prompt(item: dict, output_key: str) -> str:
    """The design sketch's template: every field but the output, lists joined by commas, None skipped."""
    prompt = "### Prompt:\n\n```"
    for k, v in item.items():
        if k == output_key or v is None:
            continue
        prompt += f"{k}: {','.join(map(str, v)) if isinstance(v, list) else v}\n"
    return prompt.strip() + "```\n\n### Response:\n\n"


def chat_user_text(item: dict, output_key: str) -> str:
    """Chat message text: the lone input field's value, or `key: value` lines for several fields."""
    fields = {k: v for k, v in item.items() if k != output_key and v is not None}
    if len(fields) == 1:
        (v,) = fields.values()
        return ",".join(map(str, v)) if isinstance(v, list) else str(v)
    return "\n".join(f"{k}: {','.join(map(str, v)) if isinstance(v, list) else v}" for k, v in fields.items())


def check_messages(messages: Any, where: str) -> list:
    """A list of {"role", "content"} chat messages with known roles and string contents, or a UserError."""
    if not isinstance(messages, list) or not messages:
        raise runtime.UserError(f'{where}: expected a non-empty list of {{"role", "content"}} messages, got {str(messages)[:80]!r}')
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise runtime.UserError(f'{where}[{j}]: expected an object with "role" and "content", got {str(m)[:80]!r}')
        if m["role"] not in ROLES:
            raise runtime.UserError(f"{where}[{j}]: unknown role {m['role']!r} (expected one of {', '.join(ROLES)})")
        if not isinstance(m["content"], str):
            raise runtime.UserError(f"{where}[{j}].content is {type(m['content']).__name__} {str(m['content'])[:60]!r}, expected a string")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def example_from_fields(i: int, item: dict, output_key: str, where: str) -> Example:
    """SELECT_OUTPUT's value is the response, the other keys the prompt (the design sketch's items)."""
    if output_key not in item:
        raise runtime.UserError(f"{where} row {i} has no output key {output_key!r} (SELECT_OUTPUT); its keys: {sorted(item)}")
    target = item[output_key]
    if isinstance(target, list):
        target = target[0] if target else None
    if target is None or isinstance(target, (dict, list)) or str(target).strip() == "":
        raise runtime.UserError(f"{where} row {i}, column {output_key!r}: empty or non-text output {item[output_key]!r}")
    if len(item) < 2:
        raise runtime.UserError(f"{where} row {i} has only the output key {output_key!r}: nothing to build a prompt from")
    return Example(index=i, item=item, target=str(target), question=chat_user_text(item, output_key))


def example_from_prompt_completion(i: int, item: dict, output_key: str, where: str) -> Example:
    """TRL's prompt-completion format: `prompt` a string (used as is) or chat messages (rendered with the chat
    template), `completion` a string or assistant messages (their contents joined)."""
    for col in ("prompt", "completion"):
        if col not in item:
            raise runtime.UserError(f"{where} row {i} has no column {col!r} (DATA_FORMAT prompt_completion); its columns: {sorted(item)}")
    prompt, completion = item["prompt"], item["completion"]
    if isinstance(completion, list):
        completion = "".join(m["content"] for m in check_messages(completion, f"{where} row {i}, column 'completion'"))
    if not isinstance(completion, str) or not completion.strip():
        raise runtime.UserError(f"{where} row {i}, column 'completion': empty or not text: {str(item['completion'])[:80]!r}")
    if isinstance(prompt, list):
        messages = check_messages(prompt, f"{where} row {i}, column 'prompt'")
        return Example(index=i, item=item, target=completion, messages=messages, question=messages[-1]["content"])
    if not isinstance(prompt, str) or not prompt.strip():
        raise runtime.UserError(f"{where} row {i}, column 'prompt': empty or not text: {str(prompt)[:80]!r}")
    return Example(index=i, item=item, target=completion, raw_prompt=prompt, question=prompt)


def example_from_messages(i: int, item: dict, output_key: str, where: str) -> Example:
    """A conversation: its last assistant turn is the response, everything before it (system turns included) the
    prompt; earlier assistant turns are kept for SFT_ALL_TURNS."""
    if "messages" not in item:
        raise runtime.UserError(f"{where} row {i} has no column 'messages' (DATA_FORMAT messages); its columns: {sorted(item)}")
    messages = check_messages(item["messages"], f"{where} row {i}, column 'messages'")
    turns = [j for j, m in enumerate(messages) if m["role"] == "assistant" and j > 0]
    if not turns:
        raise runtime.UserError(
            f"{where} row {i}, column 'messages': no assistant turn after the first message "
            f"(roles: {[m['role'] for m in messages]}); the last assistant turn is the response to train on"
        )
    last = turns[-1]
    if not messages[last]["content"].strip():
        raise runtime.UserError(f"{where} row {i}, column 'messages'[{last}]: the last assistant turn is empty")
    users = [m["content"] for m in messages[:last] if m["role"] == "user"]
    acting = any(m["role"] == "tool" for m in messages[:last])
    return Example(
        index=i,
        item=item,
        target=messages[last]["content"],
        messages=messages[:last],
        question=users[-1] if users else messages[last - 1]["content"],
        turns=[(messages[:j], messages[j]["content"]) for j in turns[:-1] if messages[j]["content"].strip()],
        opening=messages[: turns[0]] if acting else None,
    )


DATA_FORMATS = {"fields": example_from_fields, "prompt_completion": example_from_prompt_completion, "messages": example_from_messages}


def prompt_row_from_prompt_completion(i: int, item: dict, output_key: str, where: str) -> Optional[Example]:
    """TRL's prompt-only rows: `prompt` and no `completion` -> an Example without a response (None: a full row)."""
    if "completion" in item or "prompt" not in item:
        return None
    return dataclasses.replace(example_from_prompt_completion(i, {**item, "completion": "-"}, output_key, where), item=item, target="")


def prompt_row_from_messages(i: int, item: dict, output_key: str, where: str) -> Optional[Example]:
    """A conversation ending in a user turn, with no assistant turn -> the prompt without a response (None: another row)."""
    messages = item.get("messages")
    if (
        not isinstance(messages, list)
        or not messages
        or not isinstance(messages[-1], dict)
        or messages[-1].get("role") != "user"
        or any(isinstance(m, dict) and m.get("role") == "assistant" for m in messages)
    ):
        return None
    messages = check_messages(messages, f"{where} row {i}, column 'messages'")
    return Example(index=i, item=item, target="", messages=messages, question=messages[-1]["content"])


# the formats whose rows may be prompts alone (where RL alone reads TRAIN_FILE); `fields` has none: its prompt is every
# column but SELECT_OUTPUT, so a missing response column would put the answer column into the prompt
PROMPT_ONLY = {"prompt_completion": prompt_row_from_prompt_completion, "messages": prompt_row_from_messages}


def make_examples(
    items: list, output_key: str, key: str, category_field: str = "", data_format: str = "fields", prompt_only: bool = False
) -> list[Example]:
    """Validate rows and build Examples in `data_format`; errors name the file (in `key`), the row and the column.
    prompt_only: a row may be a prompt without a response (target ""; prompt_completion without `completion`,
    messages ending in a user turn), for RL whose reward reads its answer from the row."""
    examples = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise runtime.UserError(f"{key} row {i} is a {type(item).__name__}, expected a JSON object")
        category = None
        if category_field and category_field in item:
            item = dict(item)
            category = str(item.pop(category_field))
        if prompt_only and data_format in PROMPT_ONLY:
            ex = PROMPT_ONLY[data_format](i, item, output_key, key) or DATA_FORMATS[data_format](i, item, output_key, key)
        else:
            ex = DATA_FORMATS[data_format](i, item, output_key, key)
        ex.category = category
        examples.append(ex)
    return examples


def select_subset(examples: list, cfg: Config, seed: Optional[int] = None) -> list:
    """Seeded shuffle (if SHUFFLE; seed: the Plan's, default SEED), then NUM_SAMPLES or PERCENT of the items."""
    if cfg.SHUFFLE:
        examples = examples[:]
        random.Random(cfg.SEED if seed is None else seed).shuffle(examples)
    n = cfg.NUM_SAMPLES if cfg.NUM_SAMPLES > 0 else max(1, int(len(examples) * cfg.PERCENT / 100))
    return examples[:n]


def load_data(cfg: Config, key: str) -> tuple[list[Example], str]:
    """TRAIN_FILE, SFT_FILE, EVAL_FILE or RETAIN_FILE -> (examples, the data format used). TRAIN_FILE's rows may be prompts without
    a response where only RL reads them (prompts_only)."""
    path, split = {
        "TRAIN_FILE": (cfg.TRAIN_FILE, cfg.TRAIN_SPLIT),
        "SFT_FILE": (cfg.SFT_FILE, cfg.SFT_SPLIT),
        "EVAL_FILE": (cfg.EVAL_FILE, cfg.EVAL_SPLIT),
        "RETAIN_FILE": (cfg.RETAIN_FILE, ""),
        "REPLAY_FILE": (cfg.REPLAY_FILE, ""),
    }[key]
    if runtime.is_task(path):
        items = runtime.task_items(path, cfg.TASK_CONFIG, key, cfg.TRAIN_FILE, cfg.SEED or 0)
    else:
        items = runtime.read_items(path, key, split)
    optional = key == "TRAIN_FILE" and prompts_only(cfg) or key == "REPLAY_FILE"
    fmt = pick_data_format(cfg.DATA_FORMAT, items, optional, cfg.SELECT_OUTPUT)
    return make_examples(items, cfg.SELECT_OUTPUT, f"{key} {path!r}", cfg.CATEGORY_FIELD, fmt, optional), fmt


def prompts_only(cfg: Config) -> bool:
    """TRAIN_FILE's rows may be prompts without a response: RL reads them (MODE ppo and hybrid; check_prompt_rows says
    where a hybrid's SFT needs them)."""
    return cfg.MODE in ("ppo", "hybrid")


def sft_file_feeds_sft(cfg: Config) -> bool:
    """SFT_FILE holds the SFT side's demonstrations (MODE hybrid, HYBRID alternate); elsewhere it is unused (warned)."""
    return cfg.MODE == "hybrid" and cfg.HYBRID == "alternate" and bool(cfg.SFT_FILE)


def load_examples(cfg: Config, seed: Optional[int] = None) -> list[Example]:
    return select_subset(load_data(cfg, "TRAIN_FILE")[0], cfg, seed)


PROMPT_FORMATS = {
    "auto": Choice("auto", "chat if the tokenizer has a chat template, else sketch"),
    "sketch": Choice("sketch", "the design sketch's ### Prompt: template"),
    "chat": Choice("chat", "the tokenizer's chat template"),
}


def resolve_prompt_format(cfg: Config, tokenizer) -> str:
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if cfg.PROMPT_FORMAT == "chat" and not has_template:
        raise runtime.UserError("PROMPT_FORMAT is 'chat' but the tokenizer of MODEL has no chat template; use 'sketch'")
    if cfg.PROMPT_FORMAT == "auto":
        return "chat" if has_template else "sketch"
    return cfg.PROMPT_FORMAT


def render_chat(messages: list, tokenizer, chat: Optional[runtime.Chat] = None) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise runtime.UserError(
            "the data holds chat messages but the tokenizer of MODEL has no chat template to render them; "
            "use a chat model, or DATA_FORMAT fields / a plain-text prompt"
        )
    return (chat or runtime.make_chat(None, tokenizer)).text(messages)


def format_prompt(ex: Example, output_key: str, fmt: str, tokenizer, chat: Optional[runtime.Chat] = None) -> str:
    """The prompt text: chat messages through the chat template, a plain prompt as is, or (fields) the item in
    PROMPT_FORMAT `fmt` (sketch template or one chat user message)."""
    if ex.raw_prompt is None and fmt == "sketch" and ex.messages is None:
        return sketch_prompt(ex.item, output_key)
    messages = prompt_chat(ex, output_key, fmt)
    return ex.raw_prompt if messages is None else render_chat(messages, tokenizer, chat)


def prompt_chat(ex: Example, output_key: str, fmt: str) -> Optional[list]:
    """The messages format_prompt renders with the chat template (None: a plain or sketch prompt, no template)."""
    if ex.messages is not None:
        return ex.messages
    if ex.raw_prompt is not None or fmt == "sketch":
        return None
    return [{"role": "user", "content": chat_user_text(ex.item, output_key)}]


def prompt_messages(ex: Example, cfg: Config) -> list:
    """The chat messages of an example's rollout prompt (an acting conversation: those before its first assistant turn)."""
    if ex.opening is not None:
        return [dict(m) for m in ex.opening]
    if ex.messages is not None:
        return [dict(m) for m in ex.messages]
    return [{"role": "user", "content": chat_user_text(ex.item, cfg.SELECT_OUTPUT)}]


def template_target(messages: list, target: str, prompt_ids: list, chat: runtime.Chat) -> Optional[list]:
    """The assistant turn `target` answers `messages` with, as the chat template renders it: the ids of the whole
    conversation minus those of the prompt (rendered with add_generation_prompt), from one rendering each, through the
    first stop token (what the template writes after it is never generated). That keeps the template's own end of
    turn (Gemma's <end_of_turn>, Phi-3's <|end|>) and what it writes around reasoning (Qwen3's empty think block), as
    TRL's SFT trainer does. None where the template is not prefix-preserving (the prompt's rendering is not the start
    of the conversation's) or writes no stop token after the answer."""
    full_ids = chat.ids(messages + [{"role": "assistant", "content": target}], generation_prompt=False)
    if full_ids[: len(prompt_ids)] != prompt_ids:
        return None
    rest = full_ids[len(prompt_ids) :]
    cut = next((i + 1 for i, t in enumerate(rest) if t in chat.stops), None)
    return rest[:cut] if cut else None


def sft_target(messages: Optional[list], target: str, prompt_ids: list, chat: runtime.Chat) -> tuple[list, bool]:
    """The ids SFT trains for `target` -> (ids, whether the chat template rendered them): template_target for a chat
    prompt (`messages`), else, and where the template cannot give it, the target's text + the tokenizer's EOS."""
    ids = template_target(messages, target, prompt_ids, chat) if messages is not None else None
    if ids is not None:
        return ids, True
    tok = chat.tokenizer
    text = (
        runtime.text_ids(tok, target)
        if runtime.holds_control(target, chat.controls)
        else tok(target, add_special_tokens=False)["input_ids"]
    )
    return text + [tok.eos_token_id], False


def tokenize_examples(
    examples: list,
    cfg: Config,
    tokenizer,
    fmt: str,
    key: str,
    maxseq: Optional[int] = None,
    stop_ids: Optional[list] = None,
    chat: Optional[runtime.Chat] = None,
) -> list[Example]:
    """Format and tokenize prompts and targets. A chat prompt's target is what the chat template renders for the
    assistant turn (template_target, through the first of stop_ids: runtime.stop_token_ids, default the tokenizer's
    EOS; chat: the run's, default make_chat's); a plain or sketch prompt's is the target's text + EOS. Items whose
    prompt leaves no room for a response in maxseq (the Plan's, default MAXSEQ) are skipped with one warning; long
    targets are truncated (EOS kept when it fits). With SFT_ALL_TURNS, every assistant turn of a conversation becomes
    an SFT (prompt, target) pair."""
    kept, skipped, unrendered = [], [], []
    maxseq, chat = maxseq or cfg.MAXSEQ, chat or runtime.make_chat(cfg, tokenizer, stop_ids)

    def encode(prompt: str, target: str, messages: Optional[list], index: int, render_target: bool = True):
        prompt_ids = chat.ids(messages) if messages is not None else tokenizer(prompt, add_special_tokens=False)["input_ids"]
        target_ids, rendered = sft_target(messages if target and render_target else None, target, prompt_ids, chat)
        if messages is not None and target and render_target and not rendered:
            unrendered.append(index)
        return prompt_ids, target_ids[: max(maxseq - len(prompt_ids), 0)]

    def encode_chat(messages: list, target: str, index: int):
        return encode(render_chat(messages, tokenizer, chat), target, messages, index)

    for ex in examples:
        acting = bool(cfg.ENVIRONMENT) and ex.opening is not None  # rollouts start before the first assistant turn
        messages = ex.opening if acting else prompt_chat(ex, cfg.SELECT_OUTPUT, fmt)  # None: a plain or sketch prompt
        ex.prompt = format_prompt(ex, cfg.SELECT_OUTPUT, fmt, tokenizer, chat) if not acting else render_chat(messages, tokenizer, chat)
        ex.prompt_ids, ex.target_ids = encode(ex.prompt, ex.target, messages, ex.index, render_target=not acting)
        last = encode_chat(ex.messages, ex.target, ex.index) if acting else (ex.prompt_ids, ex.target_ids)
        if not last[1]:
            skipped.append(ex.index)
            continue
        if cfg.TEACHER_MODEL == "self":
            ex.teacher_prompt_ids = teacher_prompt_ids(ex, cfg, fmt, chat)
        if (cfg.SFT_ALL_TURNS or acting) and ex.turns:  # with an environment, SFT trains on every acting turn
            pairs = [encode_chat(messages, target, ex.index) for messages, target in ex.turns]
            ex.sft_pairs = [(p, t) for p, t in pairs if t] + [last]
        kept.append(ex)
    if unrendered:
        runtime.warn(
            f"{key}: MODEL's chat template does not render the assistant turn after the prompt it renders (not "
            f"prefix-preserving) or ends it with no stop token, for {len(unrendered)} item(s) (first indices: "
            f"{sorted(set(unrendered))[:5]}): their targets are the response's text + EOS instead"
        )
    if skipped:
        runtime.warn(
            f"{key}: skipped {len(skipped)} item(s) whose prompt fills MAXSEQ={maxseq} tokens "
            f"(first indices: {skipped[:5]}); raise MAXSEQ to keep them"
        )
    if not kept:
        raise runtime.UserError(f"{key}: no item has a prompt shorter than MAXSEQ={maxseq} tokens")
    return kept


def teacher_prompt_ids(ex: Example, cfg: Config, fmt: str, chat: runtime.Chat) -> list:
    """TEACHER_MODEL "self": the prompt with TEACHER_CONTEXT (the reference filled in) before its last user message, or
    before a plain prompt: privileged context the student never sees (SDFT / OPSD). The context is text: a control
    token's string in it stays text."""
    tok, context = chat.tokenizer, cfg.TEACHER_CONTEXT.replace("{target}", ex.target)
    if ex.raw_prompt is not None or (fmt == "sketch" and ex.messages is None):
        prompt = format_prompt(ex, cfg.SELECT_OUTPUT, fmt, tok, chat)
        if runtime.holds_control(context, chat.controls):
            return runtime.text_ids(tok, context) + tok(prompt, add_special_tokens=False)["input_ids"]
        return tok(context + prompt, add_special_tokens=False)["input_ids"]
    messages = prompt_messages(ex, cfg)
    last = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=len(messages) - 1)
    messages[last] = {**messages[last], "content": context + messages[last]["content"]}
    return chat.ids(messages)


def control_rows(examples: list, cfg: Config, fmt: str, controls: tuple) -> list[int]:
    """The rows whose text (a message, the response, the prompt's fields) holds a control token's string: tokenized
    as text, counted and warned about at start (check_chat_rendering)."""

    def texts(e: Example) -> list:
        chats = [prompt_chat(e, cfg.SELECT_OUTPUT, fmt) or []] + [messages + [{"content": target}] for messages, target in e.turns or []]
        return [m.get("content") for messages in chats for m in messages] + [e.target]

    return [e.index for e in examples if any(runtime.holds_control(t, controls) for t in texts(e))]


def sft_pairs(examples: list[Example]) -> list[tuple[list, list]]:
    """(prompt_ids, target_ids) the SFT loss trains on: each example's response, or with SFT_ALL_TURNS every
    assistant turn of its conversation."""
    return [pair for e in examples for pair in (e.sft_pairs or [(e.prompt_ids, e.target_ids)])]


def epoch_order(n_items: int, seed: int, epoch: int, side: str, shuffle: bool) -> list[int]:
    """The order one side (sft, ppo) draws the items in, in one epoch; deterministic in (seed, epoch, side), so resume
    is exact."""
    order = list(range(n_items))
    if shuffle:
        random.Random(f"{seed}/{epoch}/{side}").shuffle(order)
    return order


def batches(n_items: int, batch_size: int, seed: int, epoch: int, side: str, shuffle: bool) -> list[list[int]]:
    """Index batches for one epoch and side (epoch_order in chunks); the last batch may be short."""
    order = epoch_order(n_items, seed, epoch, side, shuffle)
    return [order[i : i + batch_size] for i in range(0, n_items, batch_size)]


# ==================================================================================================
# 4. The update: the policy, the optimizers, the SFT step, the PPO update (numbered steps over one Rollout), evaluation
# ==================================================================================================
# ---- the policy: the causal LM and its value head (the critic) in one module ----
class PolicyWithValueHead(nn.Module):
    """The causal LM plus a scalar value head on its last hidden state, in one module. logits_chunk > 0: the update's
    forwards return the last hidden states instead of the logits, for chunked_token_stats (Forward.stats), where
    the LM head is a plain function of them (checked once on a probe: else the model's own logits). pack (PACKING):
    the rows are packed without padding (runtime.packed_hidden) where that gives the padded numbers (packs())."""

    def __init__(self, lm: nn.Module, logits_chunk: int = 0, pack: bool = False):
        super().__init__()
        self.lm = lm
        self.v_head = nn.Linear(lm.get_output_embeddings().in_features, 1)
        nn.init.zeros_(self.v_head.weight)  # zero-init: the first values are 0, not noise
        nn.init.zeros_(self.v_head.bias)
        self.logits_chunk, self.pack = logits_chunk, pack

    def forward(self, input_ids, attention_mask, n_response: int, values: bool = True) -> "Forward":
        """(B, L) ids with the response in the last n_response columns -> Forward at the positions that predict each
        response token: logits (B, R, V), or with logits_chunk the last hidden states (B, R, H) and the head; values
        (B, R), None with values=False (critic-free estimators)."""
        chunked = self.logits_chunk > 0 and self.head_is_separable()
        packed = runtime.packing(self.lm, self.pack, input_ids, attention_mask, n_response)
        if packed is not None:
            hidden = runtime.packed_hidden(self.lm, None, None, 0, packed)
        else:
            out = runtime.response_forward(self.lm, input_ids, attention_mask, n_response if not chunked else 0, hidden=values or chunked)
            hidden = out.hidden_states[-1][:, -(n_response + 1) : -1] if values or chunked else None
        value = self.v_head(hidden.to(self.v_head.weight.dtype)).squeeze(-1).float() if values else None
        if chunked:
            return Forward(logits=None, values=value, hidden=hidden, head=self.lm.get_output_embeddings(), chunk=self.logits_chunk)
        return Forward(logits=out.logits[:, :-1] if packed is None else self.lm.get_output_embeddings()(hidden), values=value)

    def head_is_separable(self) -> bool:
        return runtime.head_is_separable(self.lm)

    def packs(self) -> bool:  # PACKING, where it gives the padded numbers (runtime.packs_apart: probed once)
        return self.pack and runtime.packs_apart(self.lm)


def load_model(cfg: Config, device: torch.device, bf16: Optional[bool] = None, paths: Optional[runtime.ModelPaths] = None):
    """-> (policy with value head, reference, tokenizer): runtime.load_lm's LM (LoRA, FSDP, the reference) wrapped with
    the value head, which continues an earlier run's trained critic when MODEL is its ppo_full/."""
    paths = paths or runtime.resolve_model(cfg)
    lm, reference, tokenizer = runtime.load_lm(cfg, device, bf16, paths)
    policy = PolicyWithValueHead(
        lm, 0 if cfg.FSDP else cfg.LOGITS_CHUNK, cfg.PACKING and not cfg.FSDP
    )  # FSDP: the head's weight is a shard
    v_head = (paths.adapter or paths.weights) / "value_head.safetensors"
    if v_head.is_file():
        from safetensors.torch import load_file

        policy.v_head.load_state_dict(load_file(str(v_head)))
    policy.v_head.to(device)
    return policy, reference, tokenizer


class BadStep(Exception):
    """A step whose loss, gradient or reward was not finite: skipped, counted, reported."""


class Optimizers:
    """The trainable parameters, the two AdamW optimizers (SFT: the LM; PPO: the LM and the value head) with their
    LR_SCHEDULE, the fp16 loss scaler, and the optimizer step. `version` counts the steps taken, so a generation
    engine that holds a copy of the weights knows when they moved."""

    def __init__(self, cfg: Config, plan: Plan, policy: "PolicyWithValueHead", critic: bool, device: torch.device):
        from transformers import get_scheduler

        # Trainable: everything (full fine-tuning) or adapter + value head (LoRA). Gradients of parameters that
        # FSDP does not shard are summed over processes by reduce_gradients; FSDP reduces its own.
        self.lm_params = [p for p in policy.lm.parameters() if p.requires_grad]
        self.params = self.lm_params + list(policy.v_head.parameters())
        self.rl_params = self.params if critic else self.lm_params  # critic-free: the value head idles
        # fused: one kernel for all parameters; PyTorch's CPU default is a per-tensor Python loop (7x slower here).
        # Sharded (DTensor) parameters mixed with plain ones take the per-tensor path.
        kw = dict(fused=True) if not any(hasattr(p, "device_mesh") for p in self.params) else dict(foreach=False)
        self.sft = torch.optim.AdamW(self.lm_params, lr=cfg.LR_SFT, **kw)  # value head untouched by SFT
        self.ppo = torch.optim.AdamW(self.params, lr=cfg.LR_PPO, **kw)
        self.scaler = torch.amp.GradScaler(device.type, enabled=cfg.FP16)
        name = LR_SCHEDULES[cfg.LR_SCHEDULE].value
        self.schedulers = {
            opt: get_scheduler(name, opt, num_warmup_steps=cfg.WARMUP_STEPS, num_training_steps=max(1, n))
            for opt, n in ((self.sft, plan.sft_optimizer_steps), (self.ppo, plan.ppo_optimizer_steps))
        }
        self.max_grad_norm, self.version = cfg.MAX_GRAD_NORM, 0

    def release(self) -> None:
        """After the last step: AdamW's moments (twice the trainable weights) and any gradients freed, so the final
        save runs beside the weights alone. The optimizers stay usable: a further step would start fresh moments."""
        for optimizer in (self.sft, self.ppo):
            optimizer.state.clear()
            optimizer.zero_grad(set_to_none=True)

    def step(self, optimizer, params) -> float:
        """Sum gradients over processes, unscale, clip, and step; a non-finite gradient norm skips the step."""
        runtime.reduce_gradients([p for p in params if not hasattr(p, "device_mesh")])
        self.scaler.unscale_(optimizer)
        grad_norm = runtime.clip_grad_norm(params, self.max_grad_norm)
        if not math.isfinite(grad_norm) and self.scaler.is_enabled():
            # fp16 overflow: expected while the loss scale calibrates; the scaler skips the step and lowers the scale
            self.scaler.step(optimizer)
            self.scaler.update()
            return grad_norm
        if not math.isfinite(grad_norm):
            optimizer.zero_grad(set_to_none=True)
            self.scaler.update()
            raise BadStep(f"gradient norm is {grad_norm}")
        self.scaler.step(optimizer)
        self.scaler.update()
        self.schedulers[optimizer].step()
        self.version += 1
        return grad_norm


# ---- the SFT term: cross-entropy on response tokens + EOS, for SFT steps and for gate / mix inside an update ----
class SFTTerm:
    """Backward of coef x the SFT loss (SFT_LOSS per token, mean over the global batch's response tokens) on this
    process's share of a batch of examples, in GRAD_ACCUM chunks. HybridTrainer.sft_step calls it; the PPO update
    gets it as its SFT term (gate, mix)."""

    def __init__(
        self, cfg: Config, policy: "PolicyWithValueHead", scaler, pad_id: int, device: torch.device, autocast: Callable, reference=None
    ):
        """reference: the frozen reference, which SFT_KL_COEF's term reads (None: no term)."""
        self.cfg, self.policy, self.scaler, self.pad_id, self.device, self.autocast = cfg, policy, scaler, pad_id, device, autocast
        self.reference = reference if cfg.SFT_KL_COEF > 0 else None

    def __call__(self, examples: list[Example], coef: float = 1.0, token_weight: str = "none") -> "SFTResult":
        """-> (the loss over all processes, before coef, SFT_KL_COEF's term included; the global batch's response
        tokens; the KL to the reference per response token, None without the term)."""
        pairs = sft_pairs(examples)
        n_tokens = sum(len(t) for _, t in pairs)
        mine, scale = runtime.my_share(pairs)
        ids, mask = runtime.right_pad([p + t for p, t in mine], self.pad_id)
        labels, _ = runtime.right_pad([[-100] * len(p) + t for p, t in mine], -100)
        ids, mask, labels = ids.to(self.device), mask.to(self.device), labels.to(self.device)
        # Logits only from the shortest prompt's last token on: the LM head over prompt positions is wasted work.
        keep = ids.shape[1] - min(len(p) for p, _ in mine) + 1
        total, kl_total = torch.zeros(1, device=self.device), torch.zeros(1, device=self.device)
        chunked = self.policy.logits_chunk > 0 and self.policy.head_is_separable()  # LOGITS_CHUNK: no whole logits
        losses = lambda logits, y: (sft_token_losses(logits[None], y[None], self.cfg.SFT_LOSS, token_weight)[0],)  # noqa: E731
        for rows in runtime.accum_rows(len(mine), len(pairs), self.cfg.GRAD_ACCUM):
            chunk = [mine[i] for i in rows.tolist()]
            padded, kl = len(chunk) * max(len(p) + len(t) for p, t in chunk), None
            if self.reference is not None:  # SFT_KL_COEF: whole logits at the targets, the policy's and the reference's
                per_token, kl = self.with_kl(ids[rows], mask[rows], labels[rows, -keep + 1 :], keep, token_weight)
            elif self.policy.packs() and runtime.positions_run(chunk, padded, runtime.grouped(self.policy.lm)) < padded:
                per_token = self.packed_losses(chunk, token_weight)  # PACKING: the loss at each target token's prediction
            else:
                with self.autocast():
                    out = self.policy.lm(
                        input_ids=ids[rows],
                        attention_mask=mask[rows],
                        use_cache=False,
                        logits_to_keep=1 if chunked else keep,
                        output_hidden_states=chunked,
                    )
                    if chunked:
                        (per_token,) = chunked_head(
                            out.hidden_states[-1][:, -keep:-1],
                            self.policy.lm.get_output_embeddings(),
                            losses,
                            labels[rows, -keep + 1 :],
                            chunk=self.policy.logits_chunk,
                        )
                if not chunked:
                    per_token = sft_token_losses(out.logits[:, :-1], labels[rows, -keep + 1 :], self.cfg.SFT_LOSS, token_weight)
            loss = (per_token.sum() + (0.0 if kl is None else self.cfg.SFT_KL_COEF * kl)) * (scale / n_tokens)
            self.scaler.scale(loss * coef).backward()
            total += loss.detach()
            kl_total += 0.0 if kl is None else kl.detach() * (scale / n_tokens)
        loss, kl = runtime.all_reduce_sum(torch.cat([total, kl_total])).tolist()
        return SFTResult(loss, n_tokens, kl if self.reference is not None else None)

    def with_kl(self, ids, mask, labels, keep: int, token_weight: str) -> tuple[torch.Tensor, torch.Tensor]:
        """SFT_KL_COEF: one padded forward of the policy and one of the frozen reference (no grad), whole logits at the
        target positions -> (the per-token SFT losses, the sum over the targets of KL(policy || reference) over the
        vocabulary: generalized_jsd at beta 1, TRL's GKD formula)."""
        with self.autocast():
            logits = self.policy.lm(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=keep).logits[:, :-1]
            with torch.no_grad():
                ref = self.reference(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=keep).logits[:, :-1]
        return sft_token_losses(logits, labels, self.cfg.SFT_LOSS, token_weight), generalized_jsd(logits, ref, labels != -100, 1.0)

    def packed_losses(self, pairs: list[tuple[list, list]], token_weight: str) -> torch.Tensor:
        """The per-token SFT losses (b, T) of these (prompt, target) pairs from one packed forward (pack_sequences):
        the same numbers as the padded rows'."""
        width = max(len(t) for _, t in pairs)
        labels = torch.tensor([t + [-100] * (width - len(t)) for _, t in pairs], device=self.device)
        policy, losses = self.policy, lambda logits, y: (sft_token_losses(logits[None], y[None], self.cfg.SFT_LOSS, token_weight)[0],)  # noqa: E731
        packed = runtime.pack_sequences(pairs, width, self.device, runtime.grouped(policy.lm))
        with self.autocast():
            hidden = runtime.packed_hidden(policy.lm, None, None, 0, packed)
            if policy.logits_chunk > 0:
                return chunked_head(hidden, policy.lm.get_output_embeddings(), losses, labels, chunk=policy.logits_chunk)[0]
            logits = policy.lm.get_output_embeddings()(hidden)
        return sft_token_losses(logits, labels, self.cfg.SFT_LOSS, token_weight)


class SFTResult(NamedTuple):
    loss: float  # over all processes, SFT_KL_COEF's term included
    tokens: int  # the global batch's response tokens
    kl: Optional[float]  # SFT_KL_COEF: KL(policy || reference) per response token; None without the term


# ---- the PPO update's records: what passes between its numbered steps. B responses, R = the longest, L = the ----
# ---- longest prompt + R. Adding a field: one line in its record, plus the code that fills it and the code that reads it.
class EnvStats(NamedTuple):
    """What one trajectory did (env/ metrics; with no environment: one turn, no action)."""

    turns: int  # model turns
    actions: int  # environment steps taken
    action_errors: int  # steps whose action failed (the observation says why)
    parse_errors: int  # tool calls that did not parse: answered with an error observation, or (never closed) ending the trajectory
    observation_tokens: int  # tokens the environment's turns and the template added (loss mask 0)
    model_tokens: int  # tokens the model sampled (loss mask 1)
    truncated: bool  # stopped by MAX_TURNS, MAX_NEW_TOKENS or MAXSEQ before a final answer
    error: str = ""  # the environment raised or hung: the trajectory ended there and scores 0


@dataclass
class Sample:
    """One sampled response as it crosses step 3's gather: plain lists and numbers (picklable). n = its length."""

    query: list  # the prompt's token ids
    response: list  # (n) the sampled token ids, ending at EOS or cut at the token limit
    ended: bool  # emitted EOS
    score: float  # the reward, MISSING_EOS_PENALTY applied
    baseline: float = 0.0  # the estimator's extra pass for its prompt (remax: the greedy response's score), else 0
    engine_logprobs: Optional[list] = None  # (n) the engine's log-prob of each sampled token (vllm); None: not reported
    loss_mask: Optional[list] = None  # (n) 1 where the loss covers the token (the model sampled it), 0 where not; None: all
    env: Optional[EnvStats] = None  # what its trajectory did (with an environment), for the env/ metrics
    teacher_query: Optional[list] = None  # TEACHER_MODEL "self": the prompt with TEACHER_CONTEXT, as the teacher sees it
    replay: bool = False  # REPLAY_SHARE: its prompt is a replayed one (no reward; trained toward the initial model)


class Share(NamedTuple):
    """What one process sends in step 3's one gather."""

    samples: list  # its Samples, in row order
    sums: dict  # weighted_sum component -> the sum of its scores over these samples ({} for a stateful reward)
    error: Optional[str]  # why its reward could not score (then every process skips the update)


@dataclass
class Collected:
    """Steps 1-3 for a batch of P prompts, gathered: every process holds all of it. Lists, so that batches join and
    groups filter cheaply before the padded Rollout is made."""

    examples: list  # the P prompts
    samples: list  # B = P x G Samples; rows i*G .. i*G+G-1 answer prompt i
    sums: dict  # weighted_sum component -> the sum of its scores over the B samples
    generate_s: float = 0.0  # seconds generating (step 1), this process's
    score_s: float = 0.0  # seconds scoring, with the estimator's extra pass (step 2)
    env_s: float = 0.0  # seconds in environment steps (step 1, with an environment)

    def join(self, other: "Collected") -> "Collected":
        return Collected(
            examples=self.examples + other.examples,
            samples=self.samples + other.samples,
            sums={k: self.sums.get(k, 0.0) + other.sums.get(k, 0.0) for k in {**self.sums, **other.sums}},
            generate_s=self.generate_s + other.generate_s,
            score_s=self.score_s + other.score_s,
            env_s=self.env_s + other.env_s,
        )

    def groups_with_signal(self, G: int, pass_score: Optional[float] = None) -> "Collected":
        """Only the prompts whose G scores are not all equal (the others give group-relative estimators nothing); with
        pass_score (DYNAMIC_SAMPLING_BY pass), whose G responses do not all pass or all fail (a shaped reward's spread
        among failures is no signal of what passes: verl-recipe#125)."""
        mark = (lambda s: s.score) if pass_score is None else (lambda s: s.score >= pass_score)
        keep = [i for i in range(len(self.examples)) if len({mark(s) for s in self.samples[i * G : (i + 1) * G]}) > 1]
        return Collected(
            examples=[self.examples[i] for i in keep], samples=[s for i in keep for s in self.samples[i * G : (i + 1) * G]], sums={}
        )


@dataclass
class Tokens:
    """Token ids of B rows: the prompt left-padded, then the response right-padded."""

    input_ids: torch.Tensor  # (B, L) long
    attention_mask: torch.Tensor  # (B, L) long: 1 on prompt and response tokens (what attention sees)
    r_ids: torch.Tensor  # (B, R) long: the responses' ids
    r_mask: torch.Tensor  # (B, R) float: 1 on response tokens


@dataclass
class Rollout(Tokens):
    """One PPO update's batch, padded, the same on every process after step 3's gather. Rows i*G .. i*G+G-1 answer
    prompt i."""

    loss_mask: torch.Tensor  # (B, R) float: 1 on the response tokens the losses, estimators, KL and statistics cover
    scores: torch.Tensor  # (B,) float32: rewards (MISSING_EOS_PENALTY applied)
    baseline: torch.Tensor  # (B,) float32: the estimator's extra pass (remax: the greedy response's score), else 0
    ended: torch.Tensor  # (B,) bool: emitted EOS
    group_size: int  # G
    engine_logprobs: Optional[torch.Tensor] = None  # (B, R): the engine's log-probs of the response tokens (vllm), else None
    teacher: Optional[Tokens] = None  # TEACHER_MODEL "self": the teacher's prompts (with TEACHER_CONTEXT), the same responses
    replay: Optional[torch.Tensor] = None  # (B,) bool: REPLAY_SHARE's rows (None: none)

    @property
    def size(self) -> int:
        return len(self.r_ids)


def right_pad_floats(rows: list[list[float]], width: int) -> torch.Tensor:
    """Lists of floats -> (len(rows), width) float32, zero-padded on the right."""
    out = torch.zeros((len(rows), width), dtype=torch.float32)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row[:width], dtype=torch.float32)
    return out


def make_rollout(samples: list[Sample], group_size: int, pad_id: int, device: torch.device) -> Rollout:
    """Every process's Samples, in rank order -> the padded Rollout."""
    if len(samples) % group_size:
        raise ValueError(f"{len(samples)} responses do not form groups of NUM_GENERATIONS={group_size}")
    q_ids, q_mask = runtime.left_pad([s.query for s in samples], pad_id)
    r_ids, r_mask = runtime.right_pad([s.response for s in samples], pad_id)
    R, r_mask = r_ids.shape[1], r_mask.to(device).float()
    for i, s in enumerate(samples):
        if s.loss_mask is not None and len(s.loss_mask) != len(s.response):
            raise ValueError(f"response {i}: {len(s.loss_mask)} loss-mask entries for {len(s.response)} tokens")
    loss_mask = (
        r_mask
        if all(s.loss_mask is None for s in samples)
        else right_pad_floats([[1.0] * len(s.response) if s.loss_mask is None else s.loss_mask for s in samples], R).to(device) * r_mask
    )
    engine = [s.engine_logprobs for s in samples]
    teacher = None
    if all(s.teacher_query is not None for s in samples):
        t_ids, t_mask = runtime.left_pad([s.teacher_query for s in samples], pad_id)
        teacher = Tokens(
            input_ids=torch.cat([t_ids, r_ids], 1).to(device),
            attention_mask=torch.cat([t_mask, r_mask.long().cpu()], 1).to(device),
            r_ids=r_ids.to(device),
            r_mask=r_mask,
        )
    return Rollout(
        input_ids=torch.cat([q_ids, r_ids], 1).to(device),
        attention_mask=torch.cat([q_mask, r_mask.long().cpu()], 1).to(device),
        r_ids=r_ids.to(device),
        r_mask=r_mask,
        loss_mask=loss_mask,
        scores=torch.tensor([s.score for s in samples], dtype=torch.float32, device=device),
        baseline=torch.tensor([s.baseline for s in samples], dtype=torch.float32, device=device),
        ended=torch.tensor([s.ended for s in samples], dtype=torch.bool),
        group_size=group_size,
        engine_logprobs=right_pad_floats(engine, R).to(device) if all(e is not None for e in engine) else None,
        teacher=teacher,
        replay=torch.tensor([s.replay for s in samples], device=device) if any(s.replay for s in samples) else None,
    )


def samples_from_tokens(
    queries: list, responses: list, scores: list, baseline: Optional[list], stop_ids: list, teacher_queries: Optional[list] = None
) -> list[Sample]:
    """The classic API's lists -> Samples; a response ended when its last token is a stop token (stop_token_ids)."""
    return [
        Sample(
            query=q,
            response=r,
            ended=bool(r) and r[-1] in stop_ids,
            score=s,
            baseline=baseline[i] if baseline else 0.0,
            teacher_query=teacher_queries[i] if teacher_queries else None,
        )
        for i, (q, r, s) in enumerate(zip(queries, responses, scores))
    ]


class Forward(NamedTuple):
    """The policy's forward on some rows (with grad: what the first minibatch may reuse from step 4)."""

    logits: Optional[torch.Tensor]  # (b, r, V); None when chunked: then hidden and head give them chunk by chunk
    values: Optional[torch.Tensor]  # (b, r), None without a critic
    hidden: Optional[torch.Tensor] = None  # (b, r, H): the last hidden states (LOGITS_CHUNK)
    head: Optional[Callable] = None  # the LM head (the output embedding)
    chunk: int = 0  # positions per chunk

    def stats(self, labels: torch.Tensor, temperature: float, entropy: bool = True) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """-> (log-probs of labels (b, r), entropy (b, r), no gradient; None with entropy=False), from the logits or
        chunk by chunk (the head in the caller's autocast)."""
        if self.logits is not None:
            return token_stats(self.logits, labels, temperature, entropy)
        return chunked_token_stats(self.hidden, self.head, labels, temperature, self.chunk, entropy)

    def full_logits(self) -> torch.Tensor:
        """(b, r, V): DISTILL jsd and KL_PENALTY "full" read the whole distribution."""
        return self.logits if self.logits is not None else self.head(self.hidden)


@dataclass
class TokenColumns:
    """Step 4's per-token numbers for some rows, (rows, R) each; None: not computed."""

    logprobs: Optional[torch.Tensor] = None  # the sampling policy's log-probs of the response tokens (at TEMPERATURE)
    values: Optional[torch.Tensor] = None  # the value head's estimates
    ref_logprobs: Optional[torch.Tensor] = None  # the reference's
    kl: Optional[torch.Tensor] = None  # KL_PENALTY "full": needs both whole distributions, so it is computed beside them
    teacher_logprobs: Optional[torch.Tensor] = None  # DISTILL: the teacher's log-probs of the student's sampled tokens

    def present(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self) if getattr(self, f.name) is not None]

    @staticmethod
    def cat(parts: list["TokenColumns"]) -> "TokenColumns":
        return TokenColumns(**{name: torch.cat([getattr(p, name) for p in parts]) for name in parts[0].present()})


def gather_columns(
    contiguous: TokenColumns, permuted: TokenColumns, perm: torch.Tensor, B: int, R: int, device: torch.device
) -> TokenColumns:
    """Step 4's one crossing: this process's rows of `contiguous` (its share of rows 0 .. B-1) and of `permuted` (its
    share of perm's rows, in perm's order; perm may hold some rows only, when nothing is contiguous: the others 0) ->
    all B rows of each, in batch order, on every process."""
    columns = [(contiguous, name, False) for name in contiguous.present()] + [(permuted, name, True) for name in permuted.present()]
    n = B if contiguous.present() else len(perm)
    gathered = runtime.gather_rows(torch.stack([getattr(part, name).to(device) for part, name, _ in columns], 1), n)
    out = TokenColumns()
    for j, (_, name, in_perm_order) in enumerate(columns):
        if in_perm_order:
            column = torch.zeros((B, R), device=device)
            column[perm.to(device)] = gathered[:, j]
        else:
            column = gathered[:, j]
        setattr(out, name, column)
    return out


@dataclass
class OldPolicy:
    """Step 4's no-grad pass over the Rollout, (B, R) each."""

    logprobs: torch.Tensor  # the sampling policy's log-probs of the response tokens (at TEMPERATURE)
    values: torch.Tensor  # the value head's estimates (zeros without a critic)
    ref_logprobs: torch.Tensor  # the reference's (= logprobs without a reference: KL 0)
    kl: torch.Tensor  # KL_PENALTY's per-token estimate
    first: Optional[Forward]  # the first minibatch's forward, with grad, when it is the whole batch
    reference_s: float  # seconds in the reference's forward
    first_forward_s: float  # seconds in the first minibatch's forward (counted with the PPO epochs)
    teacher_logprobs: Optional[torch.Tensor] = None  # DISTILL: the teacher's (B, R)
    positions: int = 0  # token positions this process's forwards of step 4 ran (padding included)
    first_rows: Optional[torch.Tensor] = None  # the rows `first` ran, in the first minibatch's order (some: old_policy)
    passes: int = 0  # models run over the whole batch in step 4 (the policy, the reference, the teacher)


@dataclass
class UpdateBatch(Tokens):
    """Step 5's output, what step 6's minibatches train on: (B, R) each besides the Tokens."""

    loss_mask: torch.Tensor  # float: the tokens the RL loss covers: the rollout's loss_mask, less the prompts a hybrid
    #                          strategy sent to SFT and (MASK_TRUNCATED) the responses cut at the token limit
    old_logprobs: torch.Tensor
    old_values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    ref_logprobs: torch.Tensor
    is_weights: torch.Tensor  # the rollout correction's weights of the policy gradient (ROLLOUT_IS; ones when off)
    teacher: Optional[Tokens] = None  # DISTILL jsd: what the teacher reads (the rollout's own tokens, or "self"'s prompts)


def select_rows(batch, rows: torch.Tensor):
    """The given rows of every tensor field of a batch record (Tokens, UpdateBatch)."""
    return dataclasses.replace(
        batch,
        **{
            f.name: getattr(batch, f.name)[rows]
            if isinstance(getattr(batch, f.name), torch.Tensor)
            else select_rows(getattr(batch, f.name), rows)
            for f in dataclasses.fields(batch)
            if isinstance(getattr(batch, f.name), (torch.Tensor, Tokens))
        },
    )


def trim_padding(batch, n_response: int) -> tuple[Any, int]:
    """Drop columns that are padding in every row of a batch record: leading prompt padding of `input_ids` /
    `attention_mask` (B, L) and trailing response padding of every (B, n_response) field, by `r_mask`. Same math,
    fewer tokens. -> (the trimmed record, its new n_response)."""
    first = int(batch.attention_mask.any(0).int().argmax())
    kept_response = int(batch.r_mask.sum(1).max())
    end = batch.attention_mask.shape[1] - n_response + kept_response
    cut = {}
    for f in dataclasses.fields(batch):
        value = getattr(batch, f.name)
        if isinstance(value, torch.Tensor) and value.dim() == 2:
            cut[f.name] = value[:, first:end] if f.name in ("input_ids", "attention_mask") else value[:, :kept_response]
        elif isinstance(value, Tokens):  # a nested view of the same responses (the teacher's): trimmed alike
            cut[f.name] = trim_padding(value, n_response)[0]
    return dataclasses.replace(batch, **cut), kept_response


def stat(key: str):
    """A LossStats field: a 0-d tensor, logged as `key`."""
    return field(default=None, metadata={"key": key})


@dataclass
class LossStats:
    """A minibatch's loss statistics, each GRAD_ACCUM chunk's value times its share of the minibatch, summed (then
    over processes). Adding a statistic: one line here, and the code in rl_backward that computes it."""

    policy: Optional[torch.Tensor] = stat("ppo/loss/policy")
    value: Optional[torch.Tensor] = stat("ppo/loss/value")  # critic only
    total: Optional[torch.Tensor] = stat("ppo/loss/total")
    clipfrac: Optional[torch.Tensor] = stat("ppo/policy/clipfrac")
    approx_kl: Optional[torch.Tensor] = stat("ppo/policy/approxkl")
    ratio: Optional[torch.Tensor] = stat("ppo/policy/ratio")
    value_clipfrac: Optional[torch.Tensor] = stat("ppo/val/clipfrac")  # critic only
    entropy: Optional[torch.Tensor] = stat("ppo/policy/entropy")
    distill_jsd: Optional[torch.Tensor] = stat("distill/jsd")  # DISTILL jsd only: per token, over the minibatch
    nonfinite: Optional[torch.Tensor] = stat("")  # > 0: a chunk's loss was not finite (not logged)

    @staticmethod
    def zeros(device: torch.device) -> "LossStats":
        return LossStats(**{f.name: torch.zeros((), device=device) for f in dataclasses.fields(LossStats)})

    def add(self, weight, **values: torch.Tensor) -> None:
        for name, v in values.items():
            setattr(self, name, getattr(self, name) + v.detach().float().to(getattr(self, name).device) * weight)

    def add_losses(self, weight, pl: PolicyLoss, vl: ValueLoss, total: torch.Tensor, entropy: torch.Tensor, stat_weight) -> None:
        """A chunk's losses times its share of the minibatch's loss, their statistics times its share of the rows run."""
        self.add(weight, policy=pl.loss, value=vl.loss, total=total)
        self.add(stat_weight, clipfrac=pl.clipfrac, approx_kl=pl.approx_kl, ratio=pl.ratio, value_clipfrac=vl.clipfrac, entropy=entropy)

    def summed(self) -> "LossStats":
        """Summed over processes (one all_reduce)."""
        names = [f.name for f in dataclasses.fields(self)]
        total = runtime.all_reduce_sum(torch.stack([getattr(self, name) for name in names]))
        return LossStats(**dict(zip(names, total.unbind())))

    def metrics(self, critic: bool, distill: bool = False) -> dict:
        logged = [
            f
            for f in dataclasses.fields(self)
            if f.metadata["key"] and (critic or f.name not in ("value", "value_clipfrac")) and (distill or f.name != "distill_jsd")
        ]
        values = torch.stack([getattr(self, f.name) for f in logged]).tolist()  # one device-to-host copy
        return {f.metadata["key"]: v for f, v in zip(logged, values)}


# ---- step 1 with an environment: the turn loop (single-turn rollouts are its case with no environment) ----
def env_metrics(stats: list[EnvStats], prefix: str = "env") -> dict:
    """Means per trajectory of what the trajectories did (truncated, failed: fractions)."""
    n, names = max(len(stats), 1), ("turns", "actions", "action_errors", "parse_errors", "observation_tokens", "model_tokens", "truncated")
    return {
        **{f"{prefix}/{k}": sum(getattr(x, k) for x in stats) / n for k in names},
        f"{prefix}/failed": sum(bool(x.error) for x in stats) / n,
    }


@dataclass
class Trajectory:
    """One prompt's rollout as it grows, turn by turn: the model's sampled ids as they were sampled, each observation
    tokenized on its own as the suffix the chat template adds, and appended (token in, token out)."""

    example: Example
    prompt_ids: list  # the prompt (what the environment's reset added, rendered with it)
    env: Any = None  # its environment instance; None: single-turn
    messages: list = field(default_factory=list)  # the conversation: the prompt's messages, then the turns after it
    n_prompt: int = 0  # how many of the messages are the prompt's
    ids: list = field(default_factory=list)  # after the prompt: every model turn and observation, in order
    mask: list = field(default_factory=list)  # per id: 1 sampled by the model, 0 an observation's or the template's
    logprobs: Optional[list] = field(default_factory=list)  # per id: the engine's log-prob (0.0 off the model's); None: not reported
    last: list = field(default_factory=list)  # the last model turn's ids: its text is the final answer the reward scores
    ended: bool = False  # the last model turn emitted EOS
    done: bool = False
    env_reward: float = 0.0  # the environment's step rewards, summed
    turns: int = 0
    actions: int = 0
    action_errors: int = 0
    parse_errors: int = 0  # tool calls that did not parse (ACTION_FORMAT tool_call)
    truncated: bool = False
    error: str = ""

    def stats(self) -> EnvStats:
        model = int(sum(self.mask))
        return EnvStats(
            turns=self.turns,
            actions=self.actions,
            action_errors=self.action_errors,
            parse_errors=self.parse_errors,
            observation_tokens=len(self.ids) - model,
            model_tokens=model,
            truncated=self.truncated,
            error=self.error,
        )

    def text(self) -> str:
        """The conversation after the prompt, as a person reads it (the report)."""
        return "\n".join(f"[{m['role']}] {m['content']}" for m in self.messages[self.n_prompt :])


class TurnLoop:
    """Step 1: the trajectories of a batch advance together, turn by turn: one batched generation over those still
    active (the first turn: n per prompt, as a single-turn rollout), then the environments of those that acted
    (`workers` at a time, each step bounded by ENV_STEP_TIMEOUT), then their observation ids appended; until the
    environment says done, a turn has no action (the final answer), MAX_TURNS, MAXSEQ or MAX_NEW_TOKENS model tokens
    per trajectory. With no environment it is one turn: the single-turn rollout, with its numbers."""

    def __init__(self, cfg: Config, plan: Plan, generate: Callable, tokenizer, env_type=None, chat: Optional[runtime.Chat] = None):
        import environments

        self.cfg, self.plan, self.generate, self.tokenizer, self.env_type = cfg, plan, generate, tokenizer, env_type
        self.tools = env_type.tools() if env_type is not None and cfg.ACTION_FORMAT == "tool_call" else None
        self.chat = chat or runtime.make_chat(cfg, tokenizer, tools=self.tools is not None)
        self.format = None
        if env_type is not None:  # tool_call: the template's own format
            named = env_type.default_format if cfg.ACTION_FORMAT == "auto" else cfg.ACTION_FORMAT
            self.format = runtime.tool_call_format(self.chat, self.tools[0]) if self.tools else environments.action_format(named)
        self.stop = [self.format.close] if env_type is not None and self.format.stops else None
        self.env_s = 0.0  # seconds in environment steps, summed over the runs (the caller reads differences)

    def run(self, examples: list[Example], n: int, greedy: bool = False, temperature: Optional[float] = None) -> list[Trajectory]:
        """n trajectories per example, rows i*n .. i*n+n-1 for example i."""
        import environments

        trajs = [self.start(e) for e in examples for _ in range(n)]
        first = True
        while True:
            active = [t for t in trajs if not t.done]
            if self.cfg.FSDP and self.env_type is not None:  # every process generates as often as the busiest (synced_gpus)
                if runtime.all_reduce_max(len(active)) == 0:
                    break
            elif not active:
                break
            if first and all(t.prompt_ids is t.example.prompt_ids for t in trajs):  # the single-turn call, n per prompt
                limits = None if self.env_type is None else [self.room(t) for t in trajs[::n]]
                gen = self.generate(
                    [e.prompt_ids for e in examples], greedy=greedy, n=n, temperature=temperature, max_tokens=limits, stop=self.stop
                )
            else:
                rows = active or trajs[:1]  # FSDP: a process with nothing left keeps the others company
                gen = self.generate(
                    [t.prompt_ids + t.ids for t in rows],
                    greedy=greedy,
                    temperature=temperature,
                    max_tokens=[max(1, self.room(t)) for t in rows],
                    stop=self.stop,
                )
            first = False
            logprobs = gen.logprobs or [None] * len(gen.responses)
            acting = [
                (t, a)
                for t, ids, ended, lp in zip(active, gen.responses, gen.ended.tolist(), logprobs)
                if (a := self.take_turn(t, ids, bool(ended), lp)) is not None
            ]
            if acting:
                t0 = time.perf_counter()
                outcomes = self.env_type.steps([(t.env, a) for t, a in acting], self.cfg.ENV_STEP_TIMEOUT)
                self.env_s += time.perf_counter() - t0
                for (t, _), outcome in zip(acting, outcomes):
                    self.observe(t, outcome)
        for t in [t for t in trajs if t.env is not None and not t.error]:  # the environment's own reward (a TRL class's get_reward)
            reward, error = environments.final_reward(t.env)
            t.env_reward, t.error = t.env_reward + reward, error and f"item {t.example.index}: {error}"
        return trajs

    def start(self, ex: Example) -> Trajectory:
        if self.env_type is None:
            return Trajectory(example=ex, prompt_ids=ex.prompt_ids)
        env = self.env_type.new(ex.item)
        added = env.reset(ex.item)
        messages = prompt_messages(ex, self.cfg)
        if isinstance(added, str):  # a TRL environment's text goes after the last user message's (as GRPOTrainer does)
            messages, added = messages[:-1] + [{**messages[-1], "content": messages[-1]["content"] + added}], None
        if not added and self.tools is None:
            return Trajectory(example=ex, prompt_ids=ex.prompt_ids, env=env, messages=messages, n_prompt=len(messages))
        messages = [dict(m) for m in added or []] + messages
        return Trajectory(
            example=ex, prompt_ids=self.chat.ids(messages, tools=self.tools), env=env, messages=messages, n_prompt=len(messages)
        )

    def room(self, t: Trajectory) -> int:
        """Model tokens this trajectory may still sample: MAX_NEW_TOKENS in all, within MAXSEQ."""
        return min(self.cfg.MAX_NEW_TOKENS - int(sum(t.mask)), self.plan.maxseq - len(t.prompt_ids) - len(t.ids))

    def action_end(self, ids: list) -> Optional[int]:
        """The length of the shortest prefix of a turn whose text holds a whole action (the engine may have run past
        it: a stop string seen a token late, or no stop string for the format), or None. A binary search: holding an
        action is monotone in the prefix (find_action)."""
        import environments

        has = lambda k: environments.find_action(self.tokenizer.decode(ids[:k], skip_special_tokens=True), self.format) is not None  # noqa: E731
        if not has(len(ids)):
            return None
        lo, hi = 1, len(ids)
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if has(mid) else (mid + 1, hi)
        return lo

    def take_turn(self, t: Trajectory, ids: list, ended: bool, logprobs: Optional[list]) -> Optional[str]:
        """Append a model turn -> the action to run, or None when the trajectory is done."""
        import environments

        cut = None if self.env_type is None else self.action_end(ids)
        if cut is not None:
            ids, ended, logprobs = ids[:cut], False, None if logprobs is None else logprobs[:cut]
        t.ids += ids
        t.mask += [1] * len(ids)
        t.logprobs = None if logprobs is None or t.logprobs is None else t.logprobs + list(logprobs)
        t.last, t.ended, t.turns = list(ids), ended, t.turns + 1
        if self.env_type is None:
            t.done = True
            return None
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        t.messages.append({"role": "assistant", "content": text})
        action = None if cut is None else environments.find_action(text, self.format)
        if action is None:  # a final answer (or a turn cut at its limit without one)
            t.done, t.truncated = True, not ended
            t.parse_errors += int(self.tools is not None and self.started_a_call(text))  # a call that never parsed
        elif t.turns >= self.cfg.MAX_TURNS or self.room(t) <= 0:
            t.done, t.truncated = True, True
        elif self.tools is not None:  # tool_call: the call's argument is the action; a malformed call is answered here
            action, error = self.env_type.parse_call(action.strip())
            if action is None:
                t.parse_errors += 1
                self.observe(t, environments.Outcome(environments.Step(error, error=True), "", 0.0))
        return None if t.done else action

    def started_a_call(self, text: str) -> bool:
        """A turn with no whole call in it began one: its opening marker, or (bare JSON calls) a turn that opens a JSON object."""
        answer = self.chat.answer(text).text if self.chat.reasoning else text
        return self.format.open in answer if self.format.open else answer.lstrip().startswith("{")

    def observe(self, t: Trajectory, outcome) -> None:
        """Append an environment step's observation (cut from the middle to MAX_OBSERVATION_TOKENS), or end the
        trajectory: the environment said done, raised or hung (then it scores 0), or the observation leaves no room."""
        import environments

        if outcome.step is None:
            t.done, t.error = True, f"item {t.example.index}, turn {t.turns}: {outcome.error}"
            return
        step = outcome.step
        t.actions, t.action_errors = t.actions + 1, t.action_errors + int(step.error)
        t.env_reward += step.reward or 0.0
        if step.done or step.observation is None:
            t.done = True
            return
        tok = self.tokenizer
        head, tail, cut = environments.truncate_middle(
            tok(step.observation, add_special_tokens=False)["input_ids"], self.cfg.MAX_OBSERVATION_TOKENS
        )
        text = step.observation if not cut else (tok.decode(head) + f"\n[... {cut} tokens cut ...]\n" + tok.decode(tail))
        message = {"role": self.cfg.OBSERVATION_ROLE, "content": text}
        ids = runtime.template_suffix(self.chat, message)  # the template closes the turn cut at its action
        if len(t.prompt_ids) + len(t.ids) + len(ids) >= self.plan.maxseq:
            t.done, t.truncated = True, True
            return
        t.ids += ids
        t.mask += [0] * len(ids)
        t.logprobs = None if t.logprobs is None else t.logprobs + [0.0] * len(ids)
        t.messages.append(message)


# ---- steps 1-3: generate, score, gather ----
class Collector:
    """Steps 1-3 of a PPO update: each process generates and scores its share of a global batch of prompts, then one
    gather gives every process the whole batch; DYNAMIC_SAMPLING repeats them for more prompts."""

    def __init__(self, cfg: Config, plan: Plan, turns: TurnLoop, sleep: Callable, reward, tokenizer, estimator: "Estimator"):
        """turns: step 1's rollouts with the current weights; sleep(): the engine's memory goes back."""
        self.cfg, self.plan, self.turns, self.sleep = cfg, plan, turns, sleep
        self.reward, self.tokenizer, self.estimator = reward, tokenizer, estimator

    def batch(self, examples: list[Example], draw: Optional[Callable] = None) -> tuple[Collected, Collected, dict]:
        """Steps 1-3 for one update -> (the batch to learn from, everything generated, DYNAMIC_SAMPLING's metrics)."""
        generated = self.collect(examples)
        if self.cfg.DYNAMIC_SAMPLING and self.estimator.group:
            return self.with_signal(generated, draw)
        return generated, generated, {}

    def collect(self, examples: list[Example]) -> Collected:
        G = self.plan.group_size
        t0 = time.perf_counter()
        share, weight = runtime.my_share(examples)  # weight 0: a short batch left this process nothing; it runs to stay in step
        # 1. G trajectories per prompt through the engine (which first takes the current weights): one turn each
        #    without an environment; with one, the turn loop (its observations get loss mask 0)
        env_s = self.turns.env_s
        trajs = self.turns.run(share, G)
        trajs = trajs if weight else []  # a placeholder share ran to stay in step with the others
        env_s = self.turns.env_s - env_s
        t1 = time.perf_counter()
        # 2. score this process's trajectories (a stateful reward: the whole batch's, gathered first, alike on every
        #    process), then the estimator's extra pass (remax: a greedy response per prompt, scored)
        stateful = getattr(self.reward, "stateful", True)
        scores, scored = self.score_mine(trajs)
        errors = [scored.error] if scored.error else []
        baseline = (
            self.estimator.baseline(lambda ex, greedy: self.sample_and_score(ex, weight, errors, greedy), share, G)
            if self.estimator.baseline
            else torch.zeros(len(trajs))
        )
        self.sleep()  # CUDA: the engine's memory goes back to training until the next rollout
        # 3. gather once: every process holds the whole batch
        acting = self.turns.env_type is not None
        samples = [
            Sample(
                query=t.prompt_ids,
                response=t.ids,
                ended=t.ended,
                score=float(s),
                baseline=float(b),
                engine_logprobs=t.logprobs,
                loss_mask=t.mask if acting else None,
                env=t.stats() if acting else None,
                teacher_query=t.example.teacher_prompt_ids,
                replay=t.example.replay,
            )
            for t, s, b in zip(trajs, scores.tolist(), baseline.tolist())
        ]
        parts = runtime.gather_objects(
            Share(samples=samples, sums={} if stateful else scored.components, error=errors[0] if errors else None)
        )
        errors = [p.error for p in parts if p.error]
        if errors:
            raise BadStep(errors[0])
        sums = (
            scored.components
            if stateful
            else {k: sum(p.sums.get(k, 0.0) for p in parts) for k in sorted(set().union(*(p.sums for p in parts)))}
        )
        return Collected(
            examples=list(examples),
            samples=[s for p in parts for s in p.samples],
            sums=sums,
            generate_s=t1 - t0 - env_s,
            score_s=time.perf_counter() - t1,
            env_s=env_s,
        )

    def with_signal(self, first: Collected, draw: Optional[Callable]) -> tuple[Collected, Collected, dict]:
        """Step 3 with DAPO's dynamic sampling (Yu et al. 2025; verl filter_groups, OpenRLHF dynamic_filtering): keep the
        groups whose G scores differ, and collect as many more prompts from the stream as are missing, until PPO_BATCH
        prompts have signal or MAX_SAMPLING_ROUNDS rounds ran. Every prompt drawn is used up (scored, then kept or
        dropped). -> (the kept groups, everything generated, metrics)."""
        G, wanted = self.plan.group_size, self.plan.responses_per_update
        by = self.cfg.EVAL_PASS_SCORE if self.cfg.DYNAMIC_SAMPLING_BY == "pass" else None
        kept, generated, rounds = first.groups_with_signal(G, by), first, 1
        while len(kept.samples) < wanted and rounds < self.cfg.MAX_SAMPLING_ROUNDS and draw is not None:
            more = draw((wanted - len(kept.samples)) // G)
            if not more:  # the epoch's prompts are used up
                break
            batch = self.collect(more)
            kept, generated, rounds = kept.join(batch.groups_with_signal(G, by)), generated.join(batch), rounds + 1
        return (
            kept,
            generated,
            {
                "dynamic/rounds": rounds,
                "dynamic/prompts_generated": len(generated.examples),
                "dynamic/groups_dropped": len(generated.examples) - len(kept.examples),
                "dynamic/prompts_kept": len(kept.examples),
            },
        )

    def score(self, responses: list[list[int]], examples: list[Example]) -> "Scored":
        """The reward on these responses (batched); a raising reward or a non-finite score is reported in `error`,
        naming the item and the response, never a corrupt update."""
        import rewards

        task = [i for i, e in enumerate(examples) if not e.replay]
        if len(task) < len(examples):  # REPLAY_SHARE's rows get no reward (their signal: the reverse KL to the initial model)
            scored, scores = self.score([responses[i] for i in task], [examples[i] for i in task]), [0.0] * len(examples)
            for i, score in zip(task, scored.scores):
                scores[i] = score
            return scored._replace(scores=scores)
        texts = self.tokenizer.batch_decode(responses, skip_special_tokens=True) if responses else []  # ([] decodes to [""])
        texts, items, components = runtime.read_answers(self.turns.chat, texts, [e.prompt for e in examples], [e.item for e in examples])
        scores, error = [], None
        try:
            if texts:
                args = (texts, [e.target for e in examples], [e.prompt for e in examples], items)
                if isinstance(self.reward, rewards.Reward):  # components (weighted_sum) come back with the scores
                    out = self.reward.score(*args, token_ids=responses)
                    scores, components = out.values, {**components, **out.components}
                else:  # any object with the documented scores(responses, targets, prompts, items)
                    scores = self.reward.scores(*args)
            for i, s in enumerate(scores):
                if not isinstance(s, (int, float)) or not math.isfinite(s):
                    error = f"reward returned {s!r} for item {examples[i].index}, response {texts[i][:200]!r}"
                    break
        except Exception as e:  # noqa: BLE001 - any reward failure is reported, never a corrupt update
            error = f"reward raised {type(e).__name__}: {e} (first response: {texts[0][:200]!r})"
        return Scored(scores=[float(s) for s in scores], components={name: sum(v) for name, v in sorted(components.items())}, error=error)

    def score_mine(self, trajs: list[Trajectory]) -> tuple[torch.Tensor, "Scored"]:
        """This process's scores, MISSING_EOS_PENALTY applied -> ((len(trajs),) float32, the Scored they came from;
        its components are the whole batch's for a stateful reward). A stateful reward (running state: normalize)
        scores every process's responses, so its state stays the same everywhere and as with one process. With an
        environment the reward scores the final answer (the last model turn) and gets the conversation in the item
        (`trajectory`); the environment's step rewards are added (ENV_REWARD_WEIGHT); a trajectory whose environment
        failed scores 0."""
        responses, ended = [t.last for t in trajs], torch.tensor([t.ended for t in trajs], dtype=torch.bool)
        rows = [
            t.example if t.env is None else dataclasses.replace(t.example, item={**t.example.item, "trajectory": t.messages}) for t in trajs
        ]
        if getattr(self.reward, "stateful", True):
            pairs, start = runtime.gather_lists(list(zip(responses, rows)))
            scored = self.score([r for r, _ in pairs], [e for _, e in pairs])
            mine = scored.scores[start : start + len(responses)]
        else:
            scored = self.score(responses, rows)
            mine = scored.scores
        if scored.error:
            return torch.zeros(0), scored
        scores = torch.tensor(mine, dtype=torch.float32)
        if self.turns.env_type is not None:
            scores = scores + self.cfg.ENV_REWARD_WEIGHT * torch.tensor([t.env_reward for t in trajs], dtype=torch.float32)
            scores = scores.masked_fill(torch.tensor([bool(t.error) for t in trajs], dtype=torch.bool), 0.0)
        return apply_missing_eos_penalty(scores, ended, self.cfg.MISSING_EOS_PENALTY), scored

    def sample_and_score(self, share: list[Example], weight: float, errors: list, greedy: bool = False) -> torch.Tensor:
        """One trajectory per example of this process's share, scored -> (len(share),) float32, or (0,) when the share
        is a placeholder (weight 0). An estimator's extra pass (remax) calls it. A reward error goes to `errors` (the
        caller's gather carries it, so every process skips the update together) and the scores are zeros."""
        trajs = self.turns.run(share, 1, greedy=greedy)
        responses = trajs if weight else []
        scores, scored = self.score_mine(responses)
        if scored.error:
            errors.append(scored.error)
            return torch.zeros(len(responses))
        return scores


class Scored(NamedTuple):
    scores: list  # one float per response
    components: dict  # weighted_sum component -> the sum of its scores over these responses
    error: Optional[str]  # why the reward could not score them (the update is skipped on every process)


# ---- steps 4-7: log-probs, advantages, epochs, statistics ----
class UpdateParts(NamedTuple):
    """What PPOUpdate works with, all of it HybridTrainer's (which checkpoints what has state)."""

    policy: nn.Module  # the PolicyWithValueHead
    reference: Any  # the frozen reference LM (or AdapterReference), None without a KL term
    optim: Optimizers
    estimator: Estimator  # ADVANTAGES[ADVANTAGE]
    strategy: Optional[Strategy]  # gate / mix's HYBRID_STRATEGIES entry, None otherwise
    kl_ctl: Any  # the KL controller: .value, .update(kl, n)
    sft_term: Callable  # (examples, coef, token_weight) -> (loss, tokens): the SFT backward (SFTTerm)
    perm_generator: torch.Generator  # the minibatch order, alike on every process
    device: torch.device
    autocast: Callable  # () -> the forward's autocast context
    teacher: Any = None  # DISTILL's frozen teacher (a causal LM, or the reference for "self"), None without one


class PPOUpdate:
    """Steps 4-7 of a PPO update on a gathered Rollout: the update's math with the model in the loop. Every process
    holds the whole Rollout and computes its share of each forward and each minibatch. Built by HybridTrainer from
    what it uses; holds no other state (the KL controller and the minibatch order's generator are shared with the
    trainer, which checkpoints them)."""

    def __init__(self, cfg: Config, plan: Plan, parts: UpdateParts):
        self.cfg, self.plan, self.parts = cfg, plan, parts
        self.policy, self.reference, self.optim, self.teacher = parts.policy, parts.reference, parts.optim, parts.teacher
        self.estimator, self.strategy, self.kl_ctl, self.sft_term = parts.estimator, parts.strategy, parts.kl_ctl, parts.sft_term
        self.perm_generator, self.device, self.autocast = parts.perm_generator, parts.device, parts.autocast
        self.distill = DISTILL_LOSSES[cfg.DISTILL] if parts.teacher is not None and cfg.DISTILL else None
        self.kl_place, self.agg = KL_PLACES[cfg.KL_IN], LOSS_AGGREGATIONS[cfg.LOSS_AGG]
        self.loss_settings = LossSettings.from_config(cfg)
        self.fuse_first_forward = True  # reuse the first minibatch's forward as step 4's when it is the whole batch
        self.kl_in_loss = self.kl_place.in_loss and parts.reference is not None  # KL_IN loss (no reference: no KL)
        jsd = self.distill is not None and self.distill.in_loss
        self.skips = cfg.SKIP_ZERO_ADVANTAGE and not parts.estimator.critic and not self.kl_in_loss and not jsd  # a zero row is exactly 0

    def learn(self, rollout: Rollout, demos: Optional[list[Example]] = None, progress: float = 0.0) -> dict:
        """Steps 4-7 of an update -> its statistics. demos: the batch's P prompts (gate / mix train on their references);
        progress: the fraction of the run done (the mix's mu schedule)."""
        cfg, dev, G, B = self.cfg, self.device, rollout.group_size, rollout.size
        if demos is not None and len(demos) * G != B:
            raise ValueError(f"{len(demos)} demonstrations for {B} responses in groups of {G}: expected {B // G}")
        lr = self.optim.ppo.param_groups[0]["lr"]
        t0 = time.perf_counter()
        g = G if cfg.MINIBATCH_GROUPS else 1  # the rows of a group stay together: its prompt runs once in a minibatch
        order = lambda: (torch.randperm(B // g, generator=self.perm_generator)[:, None] * g + torch.arange(g)).flatten()  # noqa: E731
        perms = [order() for _ in range(cfg.PPO_EPOCHS)]
        # 4. log-probs and values of the sampling policy, log-probs of the reference (each process its share)
        known = self.scored_signal(rollout, demos)  # the rows with a gradient, where their scores alone say it
        old = self.old_policy(rollout, perms[0], known)
        t1 = time.perf_counter()
        # 5. the hybrid strategy picks RL and SFT prompts; rewards and advantages (ADVANTAGES[ADVANTAGE]) over the RL
        #    responses only (gate: batch whitening must not compare the prompts it kept with those it sent to SFT)
        split, rl_mask, sft_pool = split_prompts(self.strategy, rollout, demos, cfg, progress)
        kl_coef = self.kl_ctl.value
        rewards = compute_rewards(rollout.scores, old.kl, rollout.loss_mask, kl_coef if self.kl_place.in_reward else 0.0)
        replayed = None if rollout.replay is None else rl_mask * rollout.replay[:, None].float()  # REPLAY_SHARE's rows
        advantages, returns = self.advantages(rollout, rewards, rl_mask if replayed is None else rl_mask - replayed, old.values)
        if replayed is not None:  # their advantage: the per-token reverse KL to the initial model (the reference)
            advantages = advantages + distill_advantages(old.logprobs, old.ref_logprobs, replayed)
        if self.distill is not None and not self.distill.in_loss:  # DISTILL token_reverse_kl: the teacher's term
            advantages = advantages + cfg.DISTILL_COEF * self.distill.fn(old.logprobs, old.teacher_logprobs, rl_mask, cfg.DISTILL_DISCOUNT)
        if cfg.MASK_TRUNCATED:  # no gradient for responses cut at the token limit; their scores counted above
            rl_mask = rl_mask * rollout.ended.to(dev)[:, None].float()
        is_weights, mismatch = rollout_correction(rollout, old, cfg.ROLLOUT_IS, cfg.ROLLOUT_IS_CAP)
        teacher_view = (rollout.teacher or rollout_tokens(rollout)) if self.distill is not None and self.distill.in_loss else None
        batch = UpdateBatch(input_ids=rollout.input_ids, attention_mask=rollout.attention_mask, r_ids=rollout.r_ids,
                            r_mask=rollout.r_mask, loss_mask=rl_mask, old_logprobs=old.logprobs, old_values=old.values,
                            advantages=advantages, returns=returns, ref_logprobs=old.ref_logprobs, is_weights=is_weights,
                            teacher=teacher_view)  # fmt: skip
        # 6. PPO epochs over minibatches (each with its part of the SFT demonstrations, under gate / mix); a response
        #    with no gradient (advantage 0 on every token it is trained on, and nothing else in the loss) is not run
        signal = (advantages * rl_mask).ne(0).any(1) if self.skips else None
        assert known is None or torch.equal(known, signal), "scored_signal must be step 5's: step 4 ran its rows only"
        mb_stats, skipped, positions, idle = self.epochs(batch, perms, old, sft_pool, split.mu if split else None, signal)
        t2 = time.perf_counter()
        # 7. statistics; the adaptive KL controller moves
        seq_kl = (old.kl * rollout.loss_mask).sum(1).mean().item()
        self.kl_ctl.update(seq_kl, B)
        stats = update_stats(rollout, old, rewards, advantages, returns, mb_stats, self.estimator.critic)
        if replayed is not None:  # on the replayed tokens, before the update
            stats.update({"replay/reverse_kl": masked_mean(old.logprobs - old.ref_logprobs, replayed).item()})
            stats["replay/responses"] = int(rollout.replay.sum())
        stats.update({"objective/kl": seq_kl, "objective/kl_coef": kl_coef, "ppo/skipped_minibatches": skipped, "ppo/lr": lr})
        stats["perf/skipped_responses"] = idle / cfg.PPO_EPOCHS  # SKIP_ZERO_ADVANTAGE's, per epoch
        stats.update({"time/rollout_s": t1 - t0 - old.first_forward_s, "time/ppo_epochs_s": t2 - t1 + old.first_forward_s})
        stats["time/reference_forward_s"] = old.reference_s
        passes = old.passes + cfg.PPO_EPOCHS - (old.first is not None)  # step 4's models and step 6's epochs
        stats.update(runtime.token_counts(old.positions + positions, rollout.attention_mask, rollout.r_mask, G, passes))
        if split is not None:
            stats.update({"hybrid/mu": split.mu, "hybrid/sft_prompts": len(sft_pool), **split.metrics})
        if old.teacher_logprobs is not None:  # on the student's own samples, per token the loss covers
            stats.update(distill_metrics(old, rollout.loss_mask, cfg.DISTILL_COEF))
        return {**stats, **mismatch}

    def advantages(self, rollout: Rollout, rewards, mask, values) -> tuple[torch.Tensor, torch.Tensor]:
        """Step 5's ADVANTAGES[ADVANTAGE] over the rows of `mask` -> (advantages, returns: the values without a critic)."""
        kw = {"gamma": self.cfg.GAMMA, "lam": self.cfg.LAM, "whiten_rewards": self.cfg.WHITEN_REWARDS, "baseline": rollout.baseline}
        advantages, returns = self.estimator.fn(rewards=rewards, mask=mask, values=values, group_size=rollout.group_size, **kw)
        return advantages, values if returns is None else returns

    def scored_signal(self, rollout: Rollout, demos: Optional[list]) -> Optional[torch.Tensor]:
        """SKIP_ZERO_ADVANTAGE: the (B,) rows with a gradient where the scores alone decide it (no KL in the reward, no
        replay, no teacher term, no hybrid split: step 5's advantages with a zero KL and no values), else None."""
        in_reward = self.kl_place.in_reward and self.reference is not None and self.kl_ctl.value != 0
        if not self.skips or in_reward or (self.strategy and demos is not None) or rollout.replay is not None or self.distill is not None:
            return None
        zeros, mask, ended = torch.zeros_like(rollout.loss_mask), rollout.loss_mask, rollout.ended.to(rollout.loss_mask.device)
        advantages = self.advantages(rollout, compute_rewards(rollout.scores, zeros, mask, 0.0), mask, zeros)[0]
        return (advantages * mask * (ended[:, None].float() if self.cfg.MASK_TRUNCATED else 1.0)).ne(0).any(1)  # step 5's

    # ---- 4. ----
    def old_policy(self, rollout: Rollout, first_perm: torch.Tensor, known: Optional[torch.Tensor] = None) -> OldPolicy:
        """Step 4. Each process runs the no-grad forwards on its share of the rows; one gather gives every process all
        of them. When the first minibatch is the whole batch, its forward (same weights, no dropout, with grad) gives
        the old log-probs and values: the rollout's policy forward would compute exactly the same again. known
        (scored_signal): that forward runs those rows only if nothing else runs all (the others' log-probs stay 0,
        unread); else, if a third have no gradient, the no-grad pass runs instead and step 6 the others."""
        cfg, dev, B, R = self.cfg, self.device, rollout.size, rollout.r_ids.shape[1]
        alone = known is not None and self.reference is None and self.teacher is None
        fused = (
            (known is None or alone or known.float().mean().item() >= 2 / 3)
            and self.fuse_first_forward
            and self.plan.responses_per_minibatch >= B
            and runtime.accum_chunks(cfg.GRAD_ACCUM, B) == 1
            and cfg.KL_PENALTY != "full"
        )
        start, end = runtime.share_bounds(B)
        rows = slice(start, end) if end > start else slice(0, 1)  # an empty share still joins FSDP's collectives
        teacher_tokens = None if rollout.teacher is None else select_rows(rollout.teacher, rows)
        tokens = select_rows(rollout_tokens(rollout), rows)
        mine_columns, reference_s, ran = forward_no_grad(
            self.parts, self.cfg, self.plan, tokens, R, policy=not fused, teacher_tokens=teacher_tokens
        )
        positions = [ran]
        mine_columns = select_rows(mine_columns, slice(0, end - start))  # in batch order
        first, permuted, t_first = None, TokenColumns(), time.perf_counter()
        first_rows = first_perm[known.cpu()[first_perm]] if fused and alone else first_perm
        first_rows = first_rows if len(first_rows) else first_perm[:1]  # no row has a gradient: one keeps the step's graph
        if fused:
            self.policy.train()
            mine, weight = runtime.my_share(first_rows)
            mb, r_len = trim_padding(select_rows(rollout_tokens(rollout), mine.to(dev)), R)
            with self.autocast():
                first = self.policy(mb.input_ids, mb.attention_mask, r_len, values=self.estimator.critic)
                with torch.no_grad():
                    first_logprobs = first.stats(mb.r_ids, cfg.TEMPERATURE, entropy=False)[0]
            n = len(mine) if weight else 0
            pad = lambda t: F.pad(t.detach().float(), (0, R - r_len))[:n]  # noqa: E731
            permuted = TokenColumns(logprobs=pad(first_logprobs), values=None if first.values is None else pad(first.values))
            positions.append(runtime.forward_positions(self.policy, mb))
        t_first = time.perf_counter() - t_first  # the first minibatch's forward: counted with the PPO epochs
        out = gather_columns(mine_columns, permuted, first_rows, B, R, dev)
        logprobs = out.logprobs
        ref_logprobs = out.ref_logprobs if out.ref_logprobs is not None else logprobs  # INIT_KL_COEF 0: no reference, KL 0
        kl = out.kl if out.kl is not None else kl_per_token(logprobs, ref_logprobs, cfg.KL_PENALTY)
        values = out.values if out.values is not None else torch.zeros_like(logprobs)
        return OldPolicy(
            logprobs=logprobs,
            values=values,
            ref_logprobs=ref_logprobs,
            kl=kl,
            first=first,
            reference_s=reference_s,
            first_forward_s=t_first,
            teacher_logprobs=out.teacher_logprobs,
            positions=sum(positions),
            passes=sum(m is not None for m in (self.parts.teacher, self.parts.reference)) + 1,  # + the policy (fused or not)
            first_rows=first_rows if fused else None,
        )

    # ---- 6. ----
    def epochs(
        self, batch: UpdateBatch, perms: list, old: OldPolicy, sft_pool: list, mu: Optional[float], signal=None
    ) -> tuple[list, int, int, int]:
        """Step 6: PPO_EPOCHS passes over the batch in minibatches of PPO_MINI x G responses (perms: each epoch's
        order); under gate / mix each minibatch also trains on its part of the SFT demonstrations, shuffled per epoch.
        signal: (B,) bool, the rows with a gradient (SKIP_ZERO_ADVANTAGE; None: all): only they run, the loss still
        divided by the whole minibatch's units, so the step is the same (first minibatch fused: old.first_rows). -> (each
        minibatch's stats, RATIO_THRESHOLD's skips, the token positions this process's forwards ran, the rows not run)."""
        R, first = batch.r_ids.shape[1], old.first
        mb_stats, skipped, positions, idle = [], 0, 0, 0
        self.policy.train()
        for perm in perms:
            parts = perm.split(self.plan.responses_per_minibatch)
            sft_order = torch.randperm(len(sft_pool), generator=self.perm_generator) if sft_pool else torch.zeros(0, dtype=torch.long)
            for mb_rows, sft_rows in zip(parts, sft_order.tensor_split(len(parts))):
                run = old.first_rows if first is not None else mb_rows if signal is None else mb_rows[signal[mb_rows.to(self.device)].cpu()]
                run = run if len(run) else mb_rows[:1]  # no row has a gradient: one keeps the step's graph (its gradient, 0)
                idle += len(mb_rows) - len(run)
                mine, weight = runtime.my_share(run)
                mb, r_len = trim_padding(select_rows(batch, mine.to(self.device)), R)
                rl_rows = batch.loss_mask[mb_rows.to(self.device)]
                demo = ([sft_pool[i] for i in sft_rows.tolist()], mu) if mu is not None else None
                units = (self.agg.units(rl_rows), self.agg.units(batch.loss_mask[run.to(self.device)]))  # the loss's, the stats'
                stats = self.minibatch(mb, r_len, units, weight, len(run), forward=first, demo=demo, n_tokens=rl_rows.sum())
                if first is None:  # step 4 counted the fused forward; rl_backward runs the GRAD_ACCUM micro-batches
                    accum = runtime.accum_rows(len(mb.r_ids), len(run), self.cfg.GRAD_ACCUM, self.device)
                    positions += sum(runtime.forward_positions(self.policy, select_rows(mb, rows)) for rows in accum)
                first = None  # only the first minibatch reuses step 4's forward
                if stats is None:
                    skipped += 1
                else:
                    mb_stats.append(stats)
        return mb_stats, skipped, positions, idle

    def minibatch(
        self,
        mb: UpdateBatch,
        R: int,
        n_units: tuple,
        weight: float,
        n_rows: int,
        forward: Optional[Forward] = None,
        demo: Optional[tuple] = None,
        n_tokens: Optional[torch.Tensor] = None,
    ) -> Optional[dict]:
        """One optimizer step on this process's rows of a minibatch. n_units: what LOSS_AGG's mean divides by over the
        whole minibatch (its RL tokens, or responses), and over the rows that run (the statistics' mean). `forward`: this
        minibatch's forward, already computed (step 4). `demo`: (examples, mu) under gate / mix: the loss is (1 - mu) x
        RL + mu x SFT on the examples' reference responses. None when skipped because the mean ratio exceeded
        RATIO_THRESHOLD."""
        critic = self.estimator.critic
        mu = demo[1] if demo is not None else 0.0
        self.optim.ppo.zero_grad(set_to_none=True)
        n_tokens = mb.loss_mask.sum() if n_tokens is None else n_tokens  # the whole minibatch's RL tokens (jsd's mean)
        acc = self.rl_backward(mb, R, n_units, weight, n_rows, forward, mu, n_tokens) if mu < 1 else LossStats.zeros(self.device)
        sft_loss = None
        if demo is not None and demo[0] and mu > 0:  # every process sees the same demo list: the same collectives
            sft_loss = self.sft_term(demo[0], mu, self.cfg.SFT_TOKEN_WEIGHT)[0]
        acc = acc.summed()
        if acc.nonfinite > 0 or (sft_loss is not None and not math.isfinite(sft_loss)):
            self.optim.ppo.zero_grad(set_to_none=True)
            raise BadStep(f"PPO loss is not finite (loss {acc.total.item()}, SFT loss {sft_loss})")
        stats = acc.metrics(critic, distill=self.distill is not None and self.distill.in_loss) if mu < 1 else {}
        if sft_loss is not None:
            stats["hybrid/sft_loss"] = sft_loss
        if acc.ratio.item() > self.cfg.RATIO_THRESHOLD:  # the minibatch's mean ratio (0 when mu = 1: no RL term)
            self.optim.ppo.zero_grad(set_to_none=True)
            return None
        stats["ppo/grad_norm"] = self.optim.step(self.optim.ppo, self.optim.rl_params)
        return stats

    def rl_backward(
        self,
        mb: UpdateBatch,
        R: int,
        n_units: tuple,
        weight: float,
        n_rows: int,
        forward: Optional[Forward],
        mu: float,
        n_tokens: torch.Tensor,
    ) -> LossStats:
        """Backward of (1 - mu) x the RL loss on this process's rows, in GRAD_ACCUM chunks, each weighted by its share of
        the minibatch's n_units over all processes (DISTILL jsd's term: its sum over the chunk's tokens / the
        minibatch's n_tokens) -> this process's part of the LossStats."""
        cfg, critic = self.cfg, self.estimator.critic
        acc = LossStats.zeros(self.device)
        for rows in runtime.accum_rows(len(mb.r_ids), n_rows, cfg.GRAD_ACCUM, self.device):
            c = select_rows(mb, rows)
            m = c.loss_mask  # the tokens the RL loss covers
            chunk_weight, stat_weight = (self.agg.units(m) / n.clamp(min=1) * weight for n in n_units)  # the loss's, the stats'
            with self.autocast():
                fwd = forward if forward is not None else self.policy(c.input_ids, c.attention_mask, R, values=critic)
                logprobs, token_entropy = fwd.stats(c.r_ids, cfg.TEMPERATURE)  # chunk by chunk with LOGITS_CHUNK
            values = fwd.values
            kl = self.kl_ctl.value * kl_per_token(logprobs, c.ref_logprobs, cfg.KL_PENALTY) if self.kl_in_loss else None
            pl = policy_loss(logprobs, c.old_logprobs, c.advantages, m, self.loss_settings, kl, c.is_weights)
            if critic:
                vl = value_loss(values, c.old_values, c.returns, m, cfg.CLIPRANGE_VALUE)
                total = pl.loss + cfg.VF_COEF * vl.loss
            else:
                vl, total = ValueLoss(torch.zeros(()), torch.zeros(())), pl.loss
            objective = total * chunk_weight
            jsd = None
            if c.teacher is not None:  # DISTILL jsd: the full-vocabulary divergence from the teacher, backpropagated
                with torch.no_grad(), self.autocast():
                    teacher_logits = runtime.response_forward(self.teacher, c.teacher.input_ids, c.teacher.attention_mask, R).logits[:, :-1]
                with self.autocast():
                    logits = fwd.full_logits()  # jsd reads the whole distribution (its own chunks: generalized_jsd)
                jsd = generalized_jsd(logits, teacher_logits, m, cfg.DISTILL_BETA, cfg.TEMPERATURE) / n_tokens.clamp(min=1) * weight
                objective = objective + cfg.DISTILL_COEF * jsd
            self.optim.scaler.scale(objective * (1 - mu)).backward()
            with torch.no_grad():
                entropy = masked_mean(token_entropy, m)
                acc.add_losses(chunk_weight, pl, vl, total, entropy, stat_weight)
                acc.add(weight, nonfinite=torch.tensor(float(not torch.isfinite(objective))))
                if jsd is not None:
                    acc.add(1.0, distill_jsd=jsd)
        return acc


# ---- the steps' helpers, functions of their records: 4. the no-grad pass; 5. the hybrid split, the rollout correction ----
@torch.no_grad()
def forward_no_grad(
    parts: UpdateParts, cfg: Config, plan: Plan, tokens: Tokens, R: int, policy: bool = True, teacher_tokens: Optional[Tokens] = None
) -> tuple[TokenColumns, float, int]:
    """Chunked no-grad forward of the reference (and of the policy, and of DISTILL's teacher) on these rows ->
    (their TokenColumns: the reference's log-probs, the policy's log-probs, values and KL_PENALTY "full"'s KL, the
    teacher's log-probs of the sampled tokens; seconds in the reference; the token positions the forwards ran).
    Without a reference (INIT_KL_COEF 0) its forward is skipped. teacher_tokens: what the teacher reads instead of
    `tokens` ("self": its prompts). PACKING packs each model's rows where it keeps packed sequences apart."""
    T, kind, pack = cfg.TEMPERATURE, cfg.KL_PENALTY, parts.policy.pack
    columns, reference_s, positions = [], 0.0, 0
    parts.policy.eval()

    def logprobs(lm, seen: Tokens, rows, logits: bool = False) -> tuple:  # -> (log-probs, positions run, logits or None)
        with parts.autocast():
            if cfg.LOGITS_CHUNK and not logits and runtime.head_is_separable(lm):  # chunk by chunk, as the policy's
                hidden, ran = runtime.response_hidden(lm, seen.input_ids[rows], seen.attention_mask[rows], R, pack)
                head = lm.get_output_embeddings()
                return chunked_token_stats(hidden, head, tokens.r_ids[rows], T, cfg.LOGITS_CHUNK, entropy=False)[0], ran, None
            out, ran = runtime.response_logits(lm, seen.input_ids[rows], seen.attention_mask[rows], R, pack)
        return logprobs_from_logits(out, tokens.r_ids[rows], T), ran, out

    for rows in torch.arange(len(tokens.input_ids), device=tokens.input_ids.device).split(plan.responses_per_minibatch):
        part, ids, mask = TokenColumns(), tokens.input_ids[rows], tokens.attention_mask[rows]
        if parts.teacher is not None:
            part.teacher_logprobs, ran, _ = logprobs(parts.teacher, tokens if teacher_tokens is None else teacher_tokens, rows)
            positions += ran
        if parts.reference is not None:
            t0 = time.perf_counter()
            part.ref_logprobs, ran, ref_logits = logprobs(parts.reference, tokens, rows, logits=kind == "full")
            positions, reference_s = positions + ran, reference_s + time.perf_counter() - t0
        if policy:
            with parts.autocast():
                fwd = parts.policy(ids, mask, R, values=parts.estimator.critic)
                part.logprobs, part.values = fwd.stats(tokens.r_ids[rows], T, entropy=False)[0], fwd.values
            positions += runtime.forward_positions(parts.policy, Tokens(ids, mask, tokens.r_ids[rows], tokens.r_mask[rows]))
            if kind == "full" and parts.reference is not None:
                with parts.autocast():
                    logits = fwd.full_logits()
                part.kl = kl_per_token(torch.log_softmax(logits.float() / T, -1), torch.log_softmax(ref_logits.float() / T, -1), "full")
        columns.append(part)
    return TokenColumns.cat(columns), reference_s, positions


def split_prompts(strategy: Optional[Strategy], rollout: Rollout, demos: Optional[list], cfg: Config, progress: float):
    """Step 5's first part: gate / mix split the batch's P prompts between RL and SFT on their references (a prompt
    without a reference, a prompt-only row, has nothing to SFT on: it stays RL) -> (the HybridSplit or None, the RL loss
    mask (B, R), the prompts SFT trains on)."""
    if not strategy or demos is None:
        return None, rollout.loss_mask, []
    G = rollout.group_size
    split = strategy.fn(rollout.scores.view(-1, G).cpu(), cfg, progress)
    has_ref = torch.tensor([bool(d.target) for d in demos])
    split = split._replace(sft=split.sft & has_ref, rl=split.rl | (split.sft & ~has_ref))
    rl_mask = rollout.loss_mask * split.rl.repeat_interleave(G).to(rollout.loss_mask.device)[:, None].float()
    return split, rl_mask, [d for d, s in zip(demos, split.sft.tolist()) if s]


def rollout_correction(rollout: Rollout, old: OldPolicy, mode: str, cap: float) -> tuple[torch.Tensor, dict]:
    """When the engine reported its log-probs (vllm): how far they are from the trainer's (metrics), and ROLLOUT_IS's
    per-token weights of the policy gradient -> (weights (B, R): ones without a correction; metrics), over the rows
    step 4 has log-probs of (those step 6 runs, old_policy)."""
    mask = rollout.loss_mask
    if old.first_rows is not None:
        mask = mask * torch.zeros(len(mask), device=mask.device).index_fill(0, old.first_rows.to(mask.device), 1.0)[:, None]
    if rollout.engine_logprobs is None:
        return torch.ones_like(mask), {}
    engine = rollout.engine_logprobs
    metrics = {
        "rollout/logprob_abs_diff": masked_mean((old.logprobs - engine).abs(), mask).item(),
        "rollout/kl_engine_trainer": masked_mean(engine - old.logprobs, mask).item(),
    }  # k1 of KL(engine || trainer)
    weights = rollout_is_weights(old.logprobs, engine, mask, mode, cap)
    if mode != "off":
        metrics["rollout/is_weight_mean"] = masked_mean(weights, mask).item()
        metrics["rollout/is_zeroed_responses"] = ((weights * mask).sum(1) == 0).float().mean().item()
    return weights, metrics


def rollout_tokens(rollout: Rollout) -> Tokens:
    return Tokens(input_ids=rollout.input_ids, attention_mask=rollout.attention_mask, r_ids=rollout.r_ids, r_mask=rollout.r_mask)


# ---- 7. ----
def distill_metrics(old: OldPolicy, mask: torch.Tensor, coef: float) -> dict:
    """distill/: the reverse KL to the teacher and its log-prob on the student's own samples, per token of `mask`."""
    return {
        "distill/reverse_kl": masked_mean(old.logprobs - old.teacher_logprobs, mask).item(),
        "distill/teacher_logprob": masked_mean(old.teacher_logprobs, mask).item(),
        "distill/coef": coef,
    }


def update_stats(rollout: Rollout, old: OldPolicy, rewards, advantages, returns, mb_stats: list, critic: bool) -> dict:
    """Step 7: the minibatches' means and the batch's statistics (the keys of TRL 0.11's PPOTrainer.step), over the
    tokens the loss covers."""
    mask, scores = rollout.loss_mask, rollout.scores if rollout.replay is None else rollout.scores[~rollout.replay]  # task rows'
    out = {k: float(np.mean([s[k] for s in mb_stats if k in s])) for k in dict.fromkeys(k for s in mb_stats for k in s)}
    out.update(
        {
            "objective/non_score_reward": (rewards * mask).sum(1).mean().item() - rollout.scores.mean().item(),
            "ppo/mean_scores": scores.mean().item(),
            "ppo/std_scores": scores.std(unbiased=False).item(),
            "ppo/response_length": mask.sum(1).mean().item(),
            "ppo/advantages/mean": masked_mean(advantages, mask).item(),
            "time/tokens": int(rollout.attention_mask.sum()),
        }
    )
    if critic:  # without a value head its stats would be zeros
        out.update({"ppo/returns/mean": masked_mean(returns, mask).item(), "ppo/val/mean": masked_mean(old.values, mask).item()})
    if rollout.group_size > 1:
        out["reward/zero_std_groups"] = zero_std_groups(scores, rollout.group_size)
    if mb_stats and "ppo/policy/ratio" in mb_stats[0]:
        out["ppo/policy/ratio_first_minibatch"] = mb_stats[0]["ppo/policy/ratio"]
    return out


class HybridTrainer:
    """One run's training machinery, by composition: the policy, the reference, the reward, the generation engine, the
    optimizers, the KL controller, the SFT term, steps 1-3 (Collector) and steps 4-7 (PPOUpdate). sft_step and
    ppo_update are the loop's two kinds of step; ppo_step is TRL 0.11's classic API."""

    def __init__(
        self,
        cfg: Config,
        policy: "PolicyWithValueHead",
        ref_lm,
        tokenizer,
        reward=None,
        device: Optional[torch.device] = None,
        n_items: Optional[int] = None,
        plan: Optional[Plan] = None,
        environment=None,
        teacher=None,
    ):
        """plan: run()'s; from Python, api_plan(cfg, n_items) is made here (n_items sizes a decaying LR_SCHEDULE).
        environment: an environments.EnvironmentType (runtime.build_environment(cfg) for ENVIRONMENT), None: single-turn.
        teacher: DISTILL's frozen teacher (load_teacher(cfg, ...)), None without one."""
        self.cfg, self.policy, self.ref_lm, self.tokenizer, self.reward = cfg, policy, ref_lm, tokenizer, reward
        self.device = device or torch.device("cpu")
        self.plan = plan or api_plan(cfg, n_items, policy.lm)
        estimator = ADVANTAGES[cfg.ADVANTAGE]
        strategy = HYBRID_STRATEGIES[cfg.HYBRID] if cfg.MODE == "hybrid" and HYBRID_STRATEGIES[cfg.HYBRID].in_update else None
        self.critic = estimator.critic  # trains a value head (saved in ppo_full/)
        self.optim = Optimizers(cfg, self.plan, policy, estimator.critic, self.device)
        self.perm_generator = torch.Generator().manual_seed(self.plan.seed)  # minibatch order, alike on every process
        self.kl_ctl = (
            AdaptiveKLController(cfg.INIT_KL_COEF, cfg.TARGET_KL, cfg.KL_HORIZON)
            if cfg.ADAPTIVE_KL
            else FixedKLController(cfg.INIT_KL_COEF)
        )
        self._engine = None  # started at the first generation: an SFT run without evaluation needs none
        self.pad_id = tokenizer.pad_token_id
        self.stop_ids = runtime.stop_token_ids(tokenizer, policy.lm.generation_config)  # what ends a response: the engines' too
        self.sft_backward = SFTTerm(cfg, policy, self.optim.scaler, self.pad_id, self.device, self.autocast, ref_lm)
        tools = environment is not None and cfg.ACTION_FORMAT == "tool_call"
        self.chat = runtime.make_chat(cfg, tokenizer, self.stop_ids, tools)  # how chats render, what ends a response, REASONING
        self.turns = TurnLoop(cfg, self.plan, self.engine_generate, tokenizer, environment, self.chat)
        self.collector = Collector(cfg, self.plan, self.turns, lambda: self.engine.sleep(), reward, tokenizer, estimator)
        self.teacher = teacher
        kl_ref = ref_lm if runtime.kl_reference(cfg) else None  # else loaded as "self"'s teacher or for SFT_KL_COEF only
        self.update = PPOUpdate(
            cfg,
            self.plan,
            UpdateParts(
                policy=policy,
                reference=kl_ref,
                optim=self.optim,
                estimator=estimator,
                strategy=strategy,
                kl_ctl=self.kl_ctl,
                sft_term=self.sft_backward,
                perm_generator=self.perm_generator,
                device=self.device,
                autocast=self.autocast,
                teacher=teacher,
            ),
        )

    @property
    def engine(self):
        """The generation backend (GENERATION_BACKENDS[plan.backend]: GENERATION_BACKEND, "auto" resolved), built on first use."""
        if self._engine is None:
            t0 = time.perf_counter()
            self._engine = runtime.GENERATION_BACKENDS[self.plan.backend](self.cfg, self.plan, self.policy, self.tokenizer, self.device)
            if self.plan.backend != "hf":  # hf's is the policy itself: nothing starts
                runtime.say(f"engine: {self.plan.backend} started in {time.perf_counter() - t0:.1f} s")
        return self._engine

    def autocast(self):
        return runtime.autocast_context(self.plan.bf16, self.cfg.FP16, self.device)

    def state_dict(self) -> dict:
        """Everything an exact resume needs of the trainer, keyed as outputs.CHECKPOINT lays a checkpoint out: the
        weights that train, both optimizers and schedulers, the reference when it moves (REF_UPDATE), the KL
        coefficient and the reward's running state, and this process's random streams. Under FSDP a collective (it
        gathers): every process calls it."""
        o, fsdp = self.optim, self.cfg.FSDP
        moving = self.cfg.REF_UPDATE != "never" and self.ref_lm is not None
        return {
            "policy": outputs.trainable_state(self.policy),
            "optimizers": {
                "opt_sft": outputs.optimizer_state(self.policy, o.sft, fsdp),
                "opt_ppo": outputs.optimizer_state(self.policy, o.ppo, fsdp),
                "sched_sft": o.schedulers[o.sft].state_dict(),
                "sched_ppo": o.schedulers[o.ppo].state_dict(),
                "scaler": o.scaler.state_dict(),
            },
            "reference": outputs.reference_state(self.ref_lm) if moving else {},
            "state": {
                "kl_coef": self.kl_ctl.value,
                "reward": self.reward.state_dict() if self.reward is not None else None,
                "world_size": self.plan.world_size,
            },
            "rng": outputs.rng_state(self.perm_generator),
        }

    def load_state_dict(self, state: dict, source: str = "checkpoint") -> None:
        """The inverse of state_dict (source: what the state came from, for messages)."""
        o, fsdp = self.optim, self.cfg.FSDP
        outputs.load_into(self.policy, state["policy"], source)
        outputs.load_optimizer_state(self.policy, o.sft, state["optimizers"]["opt_sft"], fsdp)
        outputs.load_optimizer_state(self.policy, o.ppo, state["optimizers"]["opt_ppo"], fsdp)
        o.schedulers[o.sft].load_state_dict(state["optimizers"]["sched_sft"])
        o.schedulers[o.ppo].load_state_dict(state["optimizers"]["sched_ppo"])
        o.version += 1  # the weights moved: an engine holding a copy takes them before it generates
        if state.get("reference"):
            if isinstance(self.ref_lm, runtime.AdapterReference):
                self.ref_lm.load_state_dict(state["reference"])
            else:
                outputs.load_into(self.ref_lm, state["reference"], f"{source} (reference)")
        o.scaler.load_state_dict(state["optimizers"]["scaler"])
        scalars = state["state"]
        self.kl_ctl.value = scalars["kl_coef"]
        if self.reward is not None and scalars["reward"] is not None:
            self.reward.load_state_dict(scalars["reward"])
        saved_world = scalars.get("world_size", 1)
        if saved_world != self.plan.world_size:
            runtime.warn(
                f"{source} was written by {saved_world} process(es), this run has {self.plan.world_size}: the run "
                "continues but sampling will not repeat exactly"
            )
        outputs.set_rng_state(state["rng"], self.perm_generator)

    def sync_reference(self) -> None:
        """REF_UPDATE 'cycle': the reference becomes a frozen copy of the current policy LM (or adapter)."""
        if self.ref_lm is None:
            return
        if isinstance(self.ref_lm, runtime.AdapterReference):
            self.ref_lm.sync()
        else:
            self.ref_lm.load_state_dict(self.policy.lm.state_dict())

    def generate(
        self, prompts: list[list[int]], greedy: bool = False, n: int = 1, temperature: Optional[float] = None
    ) -> tuple[list[list[int]], torch.Tensor]:
        """n responses per prompt from the generation engine, which first takes the current weights -> (responses, ended)."""
        out = self.engine_generate(prompts, greedy, n, temperature)
        return out.responses, out.ended

    def engine_generate(
        self,
        prompts: list[list[int]],
        greedy: bool = False,
        n: int = 1,
        temperature: Optional[float] = None,
        max_tokens: Optional[list] = None,
        stop: Optional[list] = None,
    ) -> runtime.Generation:
        self.engine.sync_weights(self.optim.version)
        return self.engine.generate(prompts, n=n, greedy=greedy, temperature=temperature, max_tokens=max_tokens, stop=stop)

    def sft_step(self, examples: list[Example]) -> dict:
        """One optimizer step on a global batch: this process takes its share; the loss is normalised by the
        response tokens of the whole batch, so gradients summed over processes equal one process's."""
        self.policy.train()
        lr = self.optim.sft.param_groups[0]["lr"]
        self.optim.sft.zero_grad(set_to_none=True)
        total, n_tokens, kl = self.sft_backward(examples)
        if not math.isfinite(total):
            self.optim.sft.zero_grad(set_to_none=True)
            raise BadStep(f"SFT loss is {total}")
        grad_norm = self.optim.step(self.optim.sft, self.optim.lm_params)
        stats = {"sft/loss": total, "sft/grad_norm": grad_norm, "sft/tokens": n_tokens, "sft/lr": lr}
        return stats if kl is None else {**stats, "sft/kl": kl}

    def ppo_update(self, examples: list[Example], progress: float = 0.0, draw: Optional[Callable] = None) -> dict:
        """One PPO update from a global batch of P prompts: steps 1-3 (Collector), then 4-7 (PPOUpdate). progress: the
        fraction of the run done (the mix's mu schedule). draw(n): up to n more prompts from the epoch's stream, for
        DYNAMIC_SAMPLING."""
        batch, generated, info = self.collector.batch(examples, draw)
        t0 = time.perf_counter()
        stats = {}
        if batch.examples:
            rollout = make_rollout(batch.samples, self.plan.group_size, self.pad_id, self.device)
            stats = self.update.learn(rollout, batch.examples, progress)
        scores = [s.score for s in generated.samples if not s.replay]  # REPLAY_SHARE's rows have no reward
        n = len(scores)
        stats.update(
            {
                "reward/mean": float(np.mean(scores)),
                "reward/std": float(np.std(scores)),
                "reward/pass_rate": float(np.mean([x >= self.cfg.EVAL_PASS_SCORE for x in scores])),  # CURRICULUM's signal
                "ppo/ended_with_eos": sum(s.ended for s in generated.samples) / len(generated.samples),
                **info,
                "time/generate_s": generated.generate_s,
                "time/score_s": generated.score_s,
                "time/update_s": time.perf_counter() - t0,
                "time/tokens_per_s": sum(len(s.response) for s in generated.samples) / max(generated.generate_s, 1e-9),
                **{f"reward/{name}": total / n for name, total in generated.sums.items()},
            }
        )
        if self.turns.env_type is not None:
            stats.update(env_metrics([s.env for s in generated.samples]), **{"time/env_s": generated.env_s})
            model_tokens = sum(s.env.model_tokens for s in generated.samples)
            stats["time/tokens_per_s"] = model_tokens / max(generated.generate_s, 1e-9)  # the model's tokens only
            for s in [s for s in generated.samples if s.env.error][:3]:
                runtime.warn(f"ENVIRONMENT: a trajectory ended with an error (scored 0): {s.env.error}")
        return stats

    def ppo_step(
        self,
        queries: list[list[int]],
        responses: list[list[int]],
        scores,
        baseline=None,
        demos: Optional[list[Example]] = None,
        teacher_queries: Optional[list] = None,
    ) -> dict:
        """TRL 0.11's classic step: one PPO update on B (query, response, score) triples; responses end at EOS (no
        padding). With several processes each passes its share and the step gathers the rest (3.), so whitening,
        KL and scores are global and the minibatches hold the same rows as with one process. Rows i*G .. i*G+G-1
        (G = NUM_GENERATIONS) answer the same prompt. baseline: (B,) scores of greedy responses (remax). demos: the
        batch's P = B / G prompts as Examples (global, in row order), which the hybrid strategies gate / mix train on.
        teacher_queries: TEACHER_MODEL "self": each row's prompt as the teacher reads it (with TEACHER_CONTEXT)."""
        scores = [float(x) for x in torch.as_tensor(scores, dtype=torch.float32).reshape(-1).tolist()]
        baseline = None if baseline is None else [float(x) for x in torch.as_tensor(baseline).reshape(-1).tolist()]
        mine = samples_from_tokens(list(queries), list(responses), scores, baseline, self.stop_ids, teacher_queries)
        samples = sum(runtime.gather_objects(mine), [])
        return self.update.learn(make_rollout(samples, self.plan.group_size, self.pad_id, self.device), demos)


EVAL_METRICS = {"bleu": {"type": "bleu"}, "rougeL": {"type": "rouge", "variant": "rougeL"}, "exact_match": {"type": "exact_match"}}


def eval_metric_keys(cfg: Config) -> set:
    """The metrics evaluate() logs for this config (what SAVE_BEST may name). maj@k needs a math reward: a run whose
    first evaluation lacks it stops there (keep_best)."""
    k = cfg.EVAL_NUM_SAMPLES
    evaluated = (
        {"eval/reward", "eval/contains_reference", *(f"eval/{name}" for name in EVAL_METRICS)}
        | ({"eval/pass@1", f"eval/pass@{k}", f"eval/maj@{k}"} if k > 1 else set())
        | ({"eval/reverse_kl_to_teacher"} if cfg.TEACHER_MODEL else set())
        | ({"eval/turns", "eval/actions", "eval/action_error_rate"} if cfg.ENVIRONMENT else set())
        | ({"eval/kl_to_reference"} if cfg.RETAIN_FILE and runtime.needs_reference(cfg) else set())
    )
    return (evaluated if cfg.EVAL_FILE else set()) | ({"retain/contains_reference"} if cfg.RETAIN_FILE else set())


@dataclass
class EvalSample:
    """One held-out item's evaluation: its first response, and with k samples per item their mean reward and share
    containing the reference. metrics.jsonl logs it as row() (the report and the trackers read that)."""

    prompt: str
    target: str
    response: str
    reward: Optional[float]  # None: no reward is configured
    contains: Union[bool, float]  # the response contains the reference (k > 1: the share of the k that do)
    category: Optional[str]  # CATEGORY_FIELD's value
    trajectory: Optional[str] = None  # with an environment: the first response's whole trajectory
    reasoning: Optional[str] = None  # REASONING: the first response's reasoning (`response` is its answer)
    passes: Optional[int] = None  # k > 1: the responses whose reward reaches EVAL_PASS_SCORE
    k: Optional[int] = None
    majority: Optional[bool] = None  # k > 1 with a math reward: the majority answer is right

    def row(self) -> dict:
        """As metrics.jsonl logs it: the fields of an evaluation that has them (reward and category always)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None or k in ("reward", "category")}


def eval_trajectories(trainer: HybridTrainer, examples: list[Example], k: Optional[int] = None) -> tuple[list[EvalTrajectory], dict]:
    """Each process's share of the eval prompts, k responses each (None: EVAL_NUM_SAMPLES; greedy for k = 1), gathered
    -> (item i's trajectories at i*k .. i*k+k-1, {metric: this process's [sum of log pi - log judge, tokens]}: with k
    None, the reverse KL to DISTILL's teacher and, with RETAIN_FILE, to the reference: RL's Razor's predictor of
    forgetting, on the task's own samples)."""
    cfg, measured = trainer.cfg, k is None
    k = cfg.EVAL_NUM_SAMPLES if k is None else k
    judges = {"eval/reverse_kl_to_teacher": trainer.teacher, "eval/kl_to_reference": trainer.ref_lm if cfg.RETAIN_FILE else None}
    judges = {name: judge for name, judge in judges.items() if judge is not None and measured}
    bs = max(cfg.PPO_BATCH, 8)  # prompts per generate call (each with its k responses)
    mine, done, sums = runtime.shard(examples), [], {name: torch.zeros(2, dtype=torch.float64) for name in judges}
    for i in range(math.ceil(runtime.largest_share(len(examples)) / bs)):  # the same count on every process
        chunk = mine[i * bs : (i + 1) * bs]
        trajs = trainer.turns.run(chunk or examples[:1], n=k, greedy=k == 1, temperature=cfg.EVAL_TEMPERATURE)
        done += (
            [
                EvalTrajectory(
                    answer=trainer.tokenizer.decode(t.last, skip_special_tokens=True),
                    messages=t.messages,
                    env_reward=t.env_reward,
                    stats=t.stats(),
                    text=t.text(),
                )
                for t in trajs
            ]
            if chunk
            else []
        )
        for name, judge in judges.items():  # on the student's own samples; a placeholder chunk runs too (FSDP), uncounted
            kl_sum, kl_tokens = reverse_kl_to(trainer, trajs, judge, own_prompt=name != "eval/reverse_kl_to_teacher")
            sums[name] = sums[name] + torch.tensor([kl_sum, kl_tokens], dtype=torch.float64) * bool(chunk)
    trainer.engine.sleep()
    return sum(runtime.gather_objects(done), []), sums


def retain_metrics(trainer: HybridTrainer, examples: list[Example]) -> dict:
    """RETAIN_FILE: each item answered greedily -> retain/contains_reference (the share of answers containing the
    reference) and retain/<category> per CATEGORY_FIELD value."""
    done, _ = eval_trajectories(trainer, examples, k=1)
    texts = runtime.read_answers(trainer.chat, [d.answer for d in done], [e.prompt for e in examples], [e.item for e in examples])[0]
    hits = [contains_reference(t, e.target) for e, t in zip(examples, texts)]
    result = {"retain/contains_reference": float(np.mean(hits))}
    for category in sorted({e.category for e in examples if e.category is not None}):
        result[f"retain/{category}"] = float(np.mean([h for h, e in zip(hits, examples) if e.category == category]))
    return result


def evaluate(trainer: HybridTrainer, examples: list[Example], metrics: dict) -> dict:
    """Completions for the eval prompts (each process its share): greedy, or EVAL_NUM_SAMPLES = k samples each at
    EVAL_TEMPERATURE; scored by the configured reward and the fixed metrics (means over every response). With k > 1
    also pass@1, pass@k (a sample passes when its reward reaches EVAL_PASS_SCORE) and, with a math reward, maj@k."""
    import rewards

    cfg, k, acting = trainer.cfg, trainer.cfg.EVAL_NUM_SAMPLES, trainer.turns.env_type is not None
    done, kl_sums = eval_trajectories(trainer, examples)
    rows = [e for e in examples for _ in range(k)]
    texts, items, unclosed = runtime.read_answers(trainer.chat, [d.answer for d in done], [e.prompt for e in rows], [e.item for e in rows])
    items = [{**item, "trajectory": d.messages} if acting else item for item, d in zip(items, done)]
    args = (texts, [e.target for e in rows], [e.prompt for e in rows], items)
    result, per_item = {}, {}
    for name, fn in metrics.items():
        try:
            per_item[name] = [float(x) for x in fn.scores(*args, update=False)]
            if acting and name == "reward":  # scored as in training: the environment's rewards added, failures 0
                per_item[name] = [0.0 if d.stats.error else x + cfg.ENV_REWARD_WEIGHT * d.env_reward for x, d in zip(per_item[name], done)]
            result[f"eval/{name}"] = float(np.mean(per_item[name]))
        except Exception as e:  # noqa: BLE001 - a failing metric must not kill the run
            runtime.warn(f"eval metric {name} failed: {type(e).__name__}: {e}")
            result[f"eval/{name}"] = float("nan")
    contains = [contains_reference(t, e.target) for e, t in zip(rows, texts)]
    result["eval/contains_reference"] = float(np.mean(contains))
    if unclosed:
        result["eval/unclosed_reasoning"] = float(np.mean(unclosed["unclosed_reasoning"]))
    rewards_ = per_item.get("reward", [None] * len(texts))
    samples = [
        EvalSample(
            prompt=e.question,
            target=e.target,
            response=texts[i * k],
            reward=None if rewards_[i * k] is None else float(np.mean(rewards_[i * k : (i + 1) * k])),
            contains=contains[i * k] if k == 1 else float(np.mean(contains[i * k : (i + 1) * k])),
            category=e.category,
            reasoning=trainer.chat.answer(done[i * k].answer, e.prompt).reasoning,
        )
        for i, e in enumerate(examples)
    ]
    for name, sums in kl_sums.items():
        kl_sum, kl_tokens = runtime.all_reduce_sum(sums.float()).tolist()
        result[name] = kl_sum / max(kl_tokens, 1.0)
    if acting:
        stats = [d.stats for d in done]
        actions = sum(x.actions for x in stats)
        result.update(
            {
                "eval/turns": float(np.mean([x.turns for x in stats])),
                "eval/actions": actions / len(stats),
                "eval/action_error_rate": sum(x.action_errors for x in stats) / max(actions, 1),
            }
        )
        for i, sample in enumerate(samples):
            sample.trajectory = done[i * k].text
    if k > 1 and "reward" in per_item:
        solver = rewards.math_part(metrics["reward"])
        for i, (e, sample) in enumerate(zip(examples, samples)):
            sample.passes, sample.k = sum(x >= cfg.EVAL_PASS_SCORE for x in rewards_[i * k : (i + 1) * k]), k
            if solver is not None:
                sample.majority = rewards.majority_correct(solver, texts[i * k : (i + 1) * k], e.target, e.item)
        result.update(pass_metrics(samples, k))
    result["samples"] = [sample.row() for sample in samples]  # every item: the report's category table and examples
    return result


def reverse_kl_to(trainer: HybridTrainer, trajs: list[Trajectory], judge, own_prompt: bool = False) -> tuple[float, float]:
    """Over these trajectories' model tokens: the sum of log pi - log judge (the student's log-prob of its own sampled
    token minus the judge's: a one-sample estimate of the reverse KL per token) and the number of tokens. The judge
    reads "self"'s teacher prompts unless own_prompt (the reference reads the student's)."""
    teacher_query = lambda t: None if own_prompt else t.example.teacher_prompt_ids  # noqa: E731
    ids = lambda t: (t.ids, t.mask) if t.ids else ([trainer.tokenizer.eos_token_id], [0])  # noqa: E731 - an empty one: EOS, uncounted
    samples = [Sample(t.prompt_ids, ids(t)[0], t.ended, 0.0, loss_mask=ids(t)[1], teacher_query=teacher_query(t)) for t in trajs]
    rollout = make_rollout(samples, 1, trainer.pad_id, trainer.device)
    parts = trainer.update.parts._replace(reference=None, teacher=judge)
    columns, _, _ = forward_no_grad(
        parts, trainer.cfg, trainer.plan, rollout_tokens(rollout), rollout.r_ids.shape[1], teacher_tokens=rollout.teacher
    )
    mask = rollout.loss_mask
    return ((columns.logprobs - columns.teacher_logprobs) * mask).sum().item(), mask.sum().item()


class EvalTrajectory(NamedTuple):
    """What evaluation keeps of a trajectory (picklable: gathered across processes)."""

    answer: str  # the last model turn's text
    messages: list  # the conversation
    env_reward: float
    stats: EnvStats
    text: str  # the turns after the prompt, as a person reads them


def pass_metrics(samples: list[EvalSample], k: int) -> dict:
    """eval/pass@1 (the mean pass rate of the samples), eval/pass@k, and eval/maj@k when the samples were voted on."""
    out = {
        "eval/pass@1": float(np.mean([outputs.pass_at_k(k, s.passes, 1) for s in samples])),
        f"eval/pass@{k}": float(np.mean([outputs.pass_at_k(k, s.passes, k) for s in samples])),
    }
    if all(s.majority is not None for s in samples):
        out[f"eval/maj@{k}"] = float(np.mean([s.majority for s in samples]))
    return out


def contains_reference(response: str, target: str) -> bool:
    """The reference appears in the response (case-insensitive): knowing the answer, whatever the format."""
    return target.strip().lower() in response.lower()


# ==================================================================================================
# 5. The loop
# ==================================================================================================
class Best(NamedTuple):
    step: int  # the step whose evaluation it was
    value: float  # SAVE_BEST's metric there


@dataclass
class RunState:
    step: int = 0  # steps done (SFT steps + PPO updates)
    epoch: int = 0
    pos: int = 0  # steps done in the current epoch's schedule
    bad_streak: int = 0  # consecutive skipped steps
    bad_total: int = 0
    drawn: dict = field(default_factory=lambda: {"sft": 0, "ppo": 0})  # items each side drew in this epoch
    best: Optional[Best] = None  # SAVE_BEST: the best evaluation so far (its weights in best/)
    level: int = 0  # CURRICULUM: the level the RL prompts come from
    level_drawn: int = 0  # CURRICULUM: prompts drawn at this level (its seeded order, lap after lap)
    pass_rates: list = field(default_factory=list)  # CURRICULUM: each update's training pass rate at this level
    replayed: int = 0  # REPLAY_SHARE: prompts replayed so far (their seeded order, lap after lap)

    def to_dict(self) -> dict:
        """As a checkpoint's state.json holds it."""
        return {**dataclasses.asdict(self), "best": self.best._asdict() if self.best else None}

    @classmethod
    def from_dict(cls, saved: dict) -> "RunState":
        return cls(**{**saved, "best": Best(**saved["best"]) if saved.get("best") else None})


def step_plan(cfg: Config, n_items: int, n_sft_items: Optional[int] = None) -> list[str]:
    """One epoch's steps in order: "sft" and "ppo" (MODE, and HYBRID alternate's cycles). Each side walks its own
    items once (n_sft_items: SFT_FILE's; else TRAIN_FILE's n_items feed both)."""
    n_sft_items = n_items if n_sft_items is None else n_sft_items
    n_sft = math.ceil(n_sft_items / cfg.SFT_BATCH) if cfg.MODE in ("sft", "hybrid") else 0
    n_ppo = math.ceil(n_items / (cfg.PPO_BATCH - replay_prompts(cfg))) if cfg.MODE in ("ppo", "hybrid") else 0
    cycle_sft, cycle_ppo = {"sft": (1, 0), "ppo": (0, 1), "hybrid": (cfg.CYCLE_SFT_STEPS, cfg.CYCLE_PPO_UPDATES)}[cfg.MODE]
    if cfg.MODE == "hybrid" and HYBRID_STRATEGIES[cfg.HYBRID].in_update:  # gate / mix: SFT happens inside each update
        n_sft, cycle_sft, cycle_ppo = 0, 0, 1
    return epoch_schedule(n_sft, n_ppo, cycle_sft, cycle_ppo)


class Run(NamedTuple):
    """What the loop works with, set up once by run()."""

    cfg: Config
    plan: Plan
    trainer: HybridTrainer
    examples: list  # TRAIN_FILE's: the RL side's, and the SFT side's unless SFT_FILE holds them
    sft_examples: list  # the SFT side's (SFT_FILE's, or the same list as examples)
    eval_examples: list
    eval_metrics: dict
    out_dir: Path
    metrics: outputs.MetricsLog
    prompt_format: str  # sketch or chat, as resolved for MODEL's tokenizer
    levels: Optional[Levels] = None  # CURRICULUM's
    retain_examples: list = []  # RETAIN_FILE's (evaluated)
    replay_examples: list = []  # REPLAY_SHARE's prompts: REPLAY_FILE's, or RETAIN_FILE's

    @property
    def evaluates(self) -> bool:
        return bool(self.eval_examples or self.retain_examples)


class Levels(NamedTuple):
    """CURRICULUM's levels (make_levels): the RL prompts at each one."""

    rule: dict  # CURRICULUM with its defaults
    count: int
    pool: Callable[[int], list]  # level -> its tokenized Examples (made once)


def draw(r: Run, state: RunState, side: str, n: int) -> list[Example]:
    """The next n items (fewer at the epoch's end) of a side's stream: the epoch's order from where it stopped. Every
    item is drawn once per epoch, also when DYNAMIC_SAMPLING draws more than PPO_BATCH for an update. CURRICULUM: as
    many RL prompts from the current level's pool, in its own seeded order."""
    order = epoch_order(r.plan.items(side), r.plan.seed, state.epoch, side, r.cfg.SHUFFLE)
    start = state.drawn[side]
    state.drawn[side] = min(len(order), start + n)
    if side == "ppo" and r.levels is not None:
        pool, picked, wanted = r.levels.pool(state.level), [], state.drawn[side] - start
        while len(picked) < wanted:  # the level's order, lap after lap (each lap's seeded once)
            lap, i = divmod(state.level_drawn, len(pool))
            taken = epoch_order(len(pool), r.plan.seed + lap, state.level, "ppo", r.cfg.SHUFFLE)[i : i + wanted - len(picked)]
            picked, state.level_drawn = picked + [pool[k] for k in taken], state.level_drawn + len(taken)
        return picked
    return [(r.sft_examples if side == "sft" else r.examples)[i] for i in order[start : state.drawn[side]]]


def draw_replay(r: Run, state: RunState, n: int) -> list[Example]:
    """REPLAY_SHARE: the next n replay prompts (REPLAY_FILE's or RETAIN_FILE's), marked replay, in their seeded order lap after lap."""
    pool, laps = r.replay_examples, [divmod(i, len(r.replay_examples)) for i in range(state.replayed, state.replayed + n)]
    orders = {lap: epoch_order(len(pool), r.plan.seed, lap, "replay", True) for lap, _ in laps}  # each lap's order once
    state.replayed += n
    return [dataclasses.replace(pool[orders[lap][j]], replay=True) for lap, j in laps]


def climb(r: Run, state: RunState, pass_rate: float) -> dict:
    """CURRICULUM after an update: its pass rate joins the window, the rule may move the level (a new level starts
    its own window) -> the metrics (the level this update trained at)."""
    state.pass_rates.append(pass_rate)
    trained_at, state.level = state.level, curriculum_level(state.level, state.pass_rates, r.levels.rule, r.levels.count)
    if state.level != trained_at:
        state.level_drawn, state.pass_rates = 0, []
        runtime.say(f"curriculum: level {trained_at} -> {state.level} (pass rate {pass_rate:.2f} this update)")
    return {"curriculum/level": trained_at}


def take_step(r: Run, state: RunState, phase: str) -> Optional[dict]:
    """One SFT step or PPO update on the next batch of its side's stream; a BadStep is counted and logged, not raised
    -> the step's record (None: that side's items are used up in this epoch)."""
    t0 = time.perf_counter()
    batch = draw(r, state, phase, r.plan.batch_size(phase))
    if batch and phase == "ppo" and r.plan.replay_prompts:
        batch += draw_replay(r, state, r.plan.replay_prompts)
    state.pos += 1
    if not batch:
        return None
    try:
        progress = state.step / max(1, r.plan.total_steps - 1)  # the mix's mu schedule
        stats = (
            r.trainer.sft_step(batch) if phase == "sft" else r.trainer.ppo_update(batch, progress, draw=lambda n: draw(r, state, "ppo", n))
        )
        if r.levels is not None and "reward/pass_rate" in stats:
            stats.update(climb(r, state, stats["reward/pass_rate"]))
        state.bad_streak = 0
    except BadStep as e:
        state.bad_streak += 1
        state.bad_total += 1
        stats = {f"{phase}/skipped": 1, "skipped_reason": str(e)}
        runtime.warn(f"step {state.step + 1} ({phase}) skipped: {e}")
    state.step += 1
    record = {
        "step": state.step,
        "epoch": state.epoch,
        "phase": phase,
        **stats,
        "skipped_total": state.bad_total,
        "time/step_s": time.perf_counter() - t0,
    }
    r.metrics.log(record)
    return record


def resumed_draws(r: Run, state: RunState) -> dict:
    """A checkpoint of an earlier version has no stream positions: every step before it drew a whole batch."""
    schedule = r.plan.schedule[: state.pos]
    return {side: min(r.plan.items(side), schedule.count(side) * r.plan.batch_size(side)) for side in ("sft", "ppo")}


def checkpoint(r: Run, state: RunState) -> Path:
    """checkpoints/step-N/: the trainer's state_dict with the loop's RunState, the resolved config and the plan."""
    saved = r.trainer.state_dict()
    saved["state"].update(run=state.to_dict(), config=outputs.resolved_config(r.cfg, r.plan), plan=dataclasses.asdict(r.plan))
    return outputs.save_checkpoint(r.out_dir, saved, state.step, r.cfg.KEEP_CHECKPOINTS)


def train_loop(r: Run, state: RunState, stop: runtime.StopRequest) -> int:
    """EPOCHS passes over the step schedule from `state` on: log, evaluate, checkpoint; stop cleanly on a signal
    -> 0, or 128 + the signal."""
    from tqdm.auto import tqdm

    cfg, schedule, first_step = r.cfg, r.plan.schedule, state.step + 1  # first and last steps print
    bar = tqdm(total=r.plan.total_steps, initial=state.step, desc=cfg.MODE, unit="step", dynamic_ncols=True, disable=not runtime.is_main())
    with contextlib.closing(bar):
        if state.pos and not any(state.drawn.values()):
            state.drawn = resumed_draws(r, state)
        while state.epoch < cfg.EPOCHS:
            while state.pos < len(schedule):
                phase = schedule[state.pos]
                if cfg.REF_UPDATE == "cycle" and phase == "ppo" and state.pos > 0 and schedule[state.pos - 1] == "sft":
                    r.trainer.sync_reference()
                record = take_step(r, state, phase)
                if record is None:  # this side's items ran out early (DYNAMIC_SAMPLING drew them): the slot is empty
                    continue
                bar.update(1)
                if (state.step % cfg.LOG_EVERY == 0 or state.step in (first_step, r.plan.total_steps)) and runtime.is_main():
                    bar.write(outputs.summary_line(record))
                if state.bad_streak >= cfg.MAX_BAD_STEPS:
                    raise runtime.UserError(
                        f"{state.bad_streak} consecutive steps were skipped (non-finite loss, gradient or "
                        f"reward; last: {record['skipped_reason']}); stopping. Lower LR_SFT/LR_PPO or check "
                        f"the reward. Last good checkpoint: {outputs.latest_checkpoint(r.out_dir) or 'none'}"
                    )
                if r.evaluates and cfg.EVAL_EVERY and state.step % cfg.EVAL_EVERY == 0:
                    log_eval(r, state)
                if cfg.SAVE_EVERY and state.step % cfg.SAVE_EVERY == 0 and state.bad_streak == 0:  # only good states
                    checkpoint(r, state)
                signum = int(runtime.all_reduce_max(stop.signum or 0))
                if signum:  # any process signalled: all stop after the same step
                    path = checkpoint(r, state)
                    runtime.say(
                        f"stopped after step {state.step}; checkpoint: {path}\nresume: python hybrid_trainer.py <same "
                        "config> (RESUME 'auto' continues from it)",
                        err=True,
                    )
                    return 128 + (stop.signum or signum)
                if cfg.CLEANSE and r.trainer.device.type == "cuda" and phase != schedule[min(state.pos, len(schedule) - 1)]:
                    torch.cuda.empty_cache()
            state.epoch, state.pos, state.drawn = state.epoch + 1, 0, {"sft": 0, "ppo": 0}
    return 0


def log_eval(r: Run, state: RunState) -> dict:
    step = state.step
    result = evaluate(r.trainer, r.eval_examples, r.eval_metrics) if r.eval_examples else {"samples": []}
    result.update(retain_metrics(r.trainer, r.retain_examples) if r.retain_examples else {})
    r.metrics.log({"step": step, "phase": "eval", **{k: v for k, v in result.items() if k != "samples"}, "samples": result["samples"]})
    shown = " ".join(f"{k.removeprefix('eval/')}={v:.4f}" for k, v in result.items() if k.startswith(("eval/", "retain/")))
    runtime.say(f"eval @ step {step}: {shown}")
    if r.cfg.SAVE_BEST:
        keep_best(r, state, result)
    return result


def keep_best(r: Run, state: RunState, result: dict) -> None:
    """SAVE_BEST: this evaluation's weights become OUTPUT_DIR/best/ when its metric beats the best so far (strictly:
    a tie keeps the earlier). The evaluation before training counts, so if training only makes the metric worse, best/
    is the starting model. Every process takes the same decision (the evaluation is gathered)."""
    cfg, name = r.cfg, r.cfg.SAVE_BEST
    if name not in result:
        raise runtime.UserError(
            f"SAVE_BEST {name!r}: this run's evaluation does not log it (maj@k needs a math reward); it logs: "
            f"{', '.join(k for k in result if k.startswith('eval/'))}"
        )
    value = result[name]
    if value != value:  # the metric failed this time (its warning was printed): nothing to compare
        return
    best = state.best
    if best is None or (value > best.value if cfg.SAVE_BEST_MODE == "max" else value < best.value):
        outputs.save_best(r.out_dir, r.trainer, cfg, state.step, value)
        state.best = Best(step=state.step, value=value)


# ==================================================================================================
# 6. run and main: start-up, --check, finish, the command line
# ==================================================================================================
def show_data_example(
    cfg: Config, ex: Example, data_format: str, paths: runtime.ModelPaths, file: str = "TRAIN_FILE", side: str = ""
) -> None:
    """--check: the data format used and one example exactly as training will render it, with the tokenizer the run
    will use: the model's, or, for a .gguf not converted yet, read from the .gguf itself (seconds, where converting
    takes the whole model). Without any tokenizer it says so instead of showing another template."""
    how = f"auto-detected from the columns {sorted(ex.item)[:8]}" if cfg.DATA_FORMAT == "auto" else "set in the config"
    runtime.say(f"data: DATA_FORMAT {data_format} ({how})")
    tokenizer, why_not = runtime.check_tokenizer(cfg, paths)
    if tokenizer is not None:
        prompt = format_prompt(ex, cfg.SELECT_OUTPUT, resolve_prompt_format(cfg, tokenizer), tokenizer, runtime.make_chat(cfg, tokenizer))
    elif ex.raw_prompt is not None or (cfg.PROMPT_FORMAT == "sketch" and ex.messages is None):
        prompt = format_prompt(ex, cfg.SELECT_OUTPUT, "sketch", None)  # no tokenizer involved: exact
    else:
        shown_ = json.dumps(ex.messages, ensure_ascii=False) if ex.messages is not None else chat_user_text(ex.item, cfg.SELECT_OUTPUT)
        prompt = (
            f"(the exact prompt cannot be shown: {why_not}; the run renders this with MODEL's chat template, or the "
            f"sketch template if it has none)\n{shown_}"
        )
    extra = f" (+ {len(ex.turns)} earlier assistant turn(s) for SFT_ALL_TURNS)" if ex.turns and cfg.SFT_ALL_TURNS else ""
    if cfg.ENVIRONMENT and ex.opening is not None:
        extra = f" (SFT trains on its {len(ex.turns) + 1} assistant turns; RL rollouts start before the first)"
    response = ex.target or "(none: a prompt for RL, scored from its row)"
    if tokenizer is not None and ex.target:  # what SFT trains, token for token (tokenize_examples' own rendering)
        stops = runtime.stop_token_ids(tokenizer, runtime.declared_generation_config(paths))
        chat, messages = runtime.make_chat(cfg, tokenizer, stops), prompt_chat(ex, cfg.SELECT_OUTPUT, resolve_prompt_format(cfg, tokenizer))
        prompt_ids = chat.ids(messages) if messages is not None else tokenizer(prompt, add_special_tokens=False)["input_ids"]
        ids, rendered = sft_target(messages, ex.target, prompt_ids, chat)
        how = "as the chat template renders the assistant turn" if rendered else "the response's text + EOS"
        response = (
            f"{tokenizer.decode(ids)}\n--- trained: {len(ids)} tokens ({how}); a response ends at any of "
            f"{tokenizer.convert_ids_to_tokens(stops)} (the tokenizer's EOS and generation_config.json's) ---"
        )
    runtime.say(f"example ({file} row {ex.index}{side}){extra}:\n--- prompt ---\n{prompt}\n--- response ---\n{response}\n---")
    if cfg.ENVIRONMENT:
        import environments

        runtime.say(environments.describe(cfg.ENVIRONMENT["type"], cfg.ACTION_FORMAT, cfg.MAX_TURNS, cfg.MAX_NEW_TOKENS))


def check_chat_rendering(cfg: Config, files: dict[str, tuple[str, list]], paths: runtime.ModelPaths) -> None:
    """Before any weights load (and in --check): MODEL's chat template renders every chat row of each file, prompt and
    response, with CHAT_TEMPLATE_KWARGS; a row it rejects (a role it has no place for, such as Gemma's system turn, or
    a content type) is one error naming the file, the row and the template's own message. Rows whose text holds a
    control token's string are counted, one warning per file (tokenize_examples keeps that text as text).
    files: key -> (path, examples)."""
    tokenizer, _ = runtime.check_tokenizer(cfg, paths)
    if tokenizer is None:
        return
    chat, fmt = runtime.make_chat(cfg, tokenizer), resolve_prompt_format(cfg, tokenizer)
    for key, (path, examples) in files.items():
        forged = control_rows(examples, cfg, fmt, chat.controls)
        if forged:
            runtime.warn(
                f"{key} {path!r}: {len(forged)} row(s) hold a control token's text in a message or response (first: row "
                f"{forged[0]}); it is trained as text, never as the control token"
            )
        if not getattr(tokenizer, "chat_template", None):
            continue
        for ex in examples:
            chats = [prompt_chat(ex, cfg.SELECT_OUTPUT, fmt)] + [messages for messages, _ in ex.turns or []]
            for messages in (m for m in chats if m is not None):
                try:
                    chat.text(messages + [{"role": "assistant", "content": ex.target or "."}], generation_prompt=False)
                except Exception as e:  # noqa: BLE001 - jinja's TemplateError and what the template raises itself
                    why = str(e).splitlines()[0] if str(e) else type(e).__name__
                    raise runtime.UserError(
                        f"{key} {path!r} row {ex.index}: MODEL's chat template rejects it: {why} "
                        f"(its roles: {[m['role'] for m in messages]})"
                    ) from None


def run(cfg: Config, check: bool = False, reward=None) -> int:
    """Validate everything cheap first (no weights), then plan, load, train, save. `reward` overrides REWARD.
    Under torchrun / accelerate launch every process runs this; the main one writes and prints."""
    try:
        with runtime.start_up_without_gc():
            started = start_run(cfg, check, reward)
        return 0 if started is None else train_and_finish(*started)
    finally:
        gc.unfreeze()  # a caller that goes on (tests, a sweep in one process) collects this run's cycles again


def start_run(cfg: Config, check: bool, reward) -> Optional[tuple[Run, RunState]]:
    """run()'s start-up: checks, plan, model, trainer -> (the Run, its RunState); None once --check has reported."""
    procs = runtime.use_processes(runtime.Processes.from_env())  # the launch, read once
    runtime.defer_scikit_learn()  # before transformers' model code is first imported
    examples, data_format = load_data(cfg, "TRAIN_FILE")
    runtime.check_prompt_rows(cfg, examples)
    if cfg.CURRICULUM:  # its levels exist: an error line before any weights load
        count, first = make_levels(cfg, examples, list).count, cfg.CURRICULUM["start"]
        if first >= count:
            raise runtime.UserError(f"CURRICULUM 'start' {first}: the levels are 0 to {count - 1}")
        runtime.say(f"curriculum: {count} levels, from level {first}")
    sft = load_data(cfg, "SFT_FILE") if sft_file_feeds_sft(cfg) else None  # None: TRAIN_FILE feeds both sides
    eval_examples = load_data(cfg, "EVAL_FILE")[0][: cfg.EVAL_SAMPLES] if cfg.EVAL_FILE else []
    wanted = {"RETAIN_FILE": cfg.RETAIN_FILE, "REPLAY_FILE": cfg.REPLAY_FILE if cfg.REPLAY_SHARE > 0 else ""}  # an unused one: not read
    retain = {key: load_data(cfg, key)[0] if path else [] for key, path in wanted.items()}
    runtime.check_category_field(cfg, {"TRAIN_FILE": examples, "EVAL_FILE": eval_examples, "RETAIN_FILE": retain["RETAIN_FILE"]})
    paths = runtime.resolve_model(cfg)  # reads no weights; a missing adapter base is an error here
    check_chat_rendering(
        cfg,
        {"TRAIN_FILE": (cfg.TRAIN_FILE, examples), "EVAL_FILE": (cfg.EVAL_FILE, eval_examples)}
        | {key: (getattr(cfg, key), rows) for key, rows in retain.items() if rows}
        | ({"SFT_FILE": (cfg.SFT_FILE, sft[0])} if sft else {}),
        paths,
    )
    runtime.check_launch(cfg, procs.world)
    outputs.check_trackers(cfg)
    environment = runtime.build_environment(cfg)
    runtime.check_teacher(cfg, paths, examples)
    out_dir = outputs.plan_output_dir(cfg)
    resume_from = outputs.find_resume_point(cfg, out_dir)
    if runtime.is_main():  # before any weights load
        outputs.check_writable(out_dir, "OUTPUT_DIR")
        if paths.gguf and not paths.converted:
            outputs.check_writable(runtime.cache_root(cfg), "CACHE_DIR")  # the conversion will be written there
    if check:
        check_only(cfg, select_subset(examples, cfg, cfg.SEED or 0), eval_examples, data_format, paths, out_dir, resume_from, sft, retain)
        return None
    device = runtime.pick_device(cfg, procs)
    runtime.init_processes(device, procs)
    threads = runtime.set_threads(procs)
    if device.type == "cpu":
        runtime.keep_freed_memory()
    runtime.barrier()  # every process has planned the output dir before the main one creates it
    r, state = start(
        cfg, examples, eval_examples, paths, out_dir, resume_from, device, reward, environment, sft[0] if sft else None, retain
    )
    sft_file = f" (+ {len(r.sft_examples)} SFT_FILE)" if r.sft_examples is not r.examples else ""
    runtime.say(
        f"{cfg.MODE}: {len(r.examples)} items{sft_file}, prompt format {r.prompt_format}, device {device.type}"
        f"{', bf16' if r.plan.bf16 else ', fp16' if cfg.FP16 else ''}"
        f"{f', LoRA r={cfg.LORA_R}' if hasattr(r.trainer.policy.lm, 'peft_config') else ''}"
        f"{f' (adapter {r.plan.adapter})' if r.plan.adapter else ''}"
        f"{f', {r.plan.world_size} processes' + (' (FSDP)' if cfg.FSDP else '') if r.plan.world_size > 1 else ''}, "
        f"{sum(p.numel() for p in r.trainer.optim.params) if not cfg.FSDP else 'sharded'} trainable parameters, "
        f"{threads}, output {out_dir}"
    )
    return r, state


def train_and_finish(r: Run, state: RunState) -> int:
    """run()'s training: the loop, then the final model and report (a stop request: the checkpoint's exit code)."""
    if r.evaluates and state.step == 0:
        log_eval(r, state)
    with runtime.StopRequest() as stop:
        code = train_loop(r, state, stop)
    return code or finish(r, state)


def check_only(
    cfg: Config,
    examples: list,
    eval_examples: list,
    data_format: str,
    paths: runtime.ModelPaths,
    out_dir: Path,
    resume_from: Optional[Path],
    sft: Optional[tuple] = None,
    retain: Optional[dict] = None,
) -> None:
    """--check: the resolved config, the data format and one example as the model will see it (with SFT_FILE: one of
    each side: sft is load_data's (examples, format)); no weights load."""
    runtime.say(json.dumps(cfg.resolved(), indent=2))
    if cfg.SEED is None:
        runtime.say("SEED is null: a seed will be drawn when the run starts and recorded in OUTPUT_DIR/config.json")
    show_data_example(cfg, examples[0], data_format, paths, "TRAIN_FILE", ", the RL side" if sft else "")
    if sft:
        show_data_example(cfg, sft[0][0], sft[1], paths, "SFT_FILE", ", the SFT side")
    counts = runtime.parameter_counts(cfg, paths)
    critic = ADVANTAGES[cfg.ADVANTAGE].critic
    checkpoint, final = outputs.storage_estimate(cfg, counts, cfg.BF16 is True, critic) if counts else (None, None)
    free = outputs.free_bytes(out_dir)
    runtime.say(f"disk: {outputs.storage_line(checkpoint, final)}; {runtime.human_bytes(free)} free in {out_dir}")
    runtime.check_space(cfg, checkpoint, final, out_dir, free)
    n_sft = len(sft[0]) if sft else None
    runtime.say(
        f"ok: {len(examples)} training items{f' + {n_sft} SFT_FILE' if sft else ''}, {len(eval_examples)} eval items"
        f"{''.join(f', {len(rows)} {key} items' for key, rows in (retain or {}).items() if rows)}; "
        f"{len(step_plan(cfg, len(examples), n_sft)) * cfg.EPOCHS} "
        f"steps; output -> {out_dir}" + (f"; would resume from {resume_from}" if resume_from else "")
    )


def start(
    cfg: Config,
    examples: list,
    eval_examples: list,
    paths: runtime.ModelPaths,
    out_dir: Path,
    resume_from: Optional[Path],
    device: torch.device,
    reward=None,
    environment=None,
    sft_examples: Optional[list] = None,
    retain: Optional[dict] = None,
) -> tuple[Run, RunState]:
    """The Plan (seed, precision, sizes), the model, the tokenized data, the reward and the trainer; the run's files;
    the checkpoint's state when resuming. sft_examples: SFT_FILE's (None: TRAIN_FILE's feed both sides)."""
    plan, examples = plan_run(cfg, examples, paths, out_dir, resume_from, device, sft_examples)
    runtime.seed_everything(plan.seed)
    watch = runtime.Stopwatch.since_launch(IMPORTED_AT)  # the start-up line says where the seconds go
    policy, ref_lm, tokenizer = load_model(cfg, device, plan.bf16, paths)
    watch.lap("model")
    fmt = resolve_prompt_format(cfg, tokenizer)
    stops = runtime.stop_token_ids(tokenizer, policy.lm.generation_config)
    chat = runtime.make_chat(cfg, tokenizer, stops, tools=environment is not None and cfg.ACTION_FORMAT == "tool_call")  # as the trainer's
    runtime.check_environment_data(cfg, examples + eval_examples + (sft_examples or []), fmt, chat)
    files = {"TRAIN_FILE": examples, "SFT_FILE": sft_examples, "EVAL_FILE": eval_examples, **(retain or {})}
    files = {
        key: tokenize_examples(part, cfg, tokenizer, fmt, key, plan.maxseq, stops, chat) if part else part for key, part in files.items()
    }
    examples, eval_examples, retain = files["TRAIN_FILE"], files["EVAL_FILE"] or [], files.get("RETAIN_FILE") or []
    sft_examples = examples if sft_examples is None else files["SFT_FILE"]
    reward, eval_metrics = build_rewards(cfg, device, ref_lm, tokenizer, reward, examples, eval_examples)
    watch.lap("data and rewards")
    teacher = runtime.load_teacher(cfg, device, plan.bf16, ref_lm)
    if teacher is not None:
        watch.lap("teacher")
    trainer = HybridTrainer(cfg, policy, ref_lm, tokenizer, reward, device, plan=plan, environment=environment, teacher=teacher)
    watch.lap("trainer")
    runtime.say(f"start-up: {watch.total():.1f} s ({watch})")
    if runtime.is_main():
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(outputs.resolved_config(cfg, plan), indent=2))
        (out_dir / "plan.json").write_text(json.dumps(dataclasses.asdict(plan), indent=2))
    levels = make_levels(cfg, examples, lambda rows: tokenize_examples(rows, cfg, tokenizer, fmt, "TRAIN_FILE", plan.maxseq, stops, chat))
    state = RunState(level=levels.rule["start"] if levels else 0)
    if resume_from is not None:
        saved = outputs.load_checkpoint(resume_from, device)
        trainer.load_state_dict(saved, f"checkpoint {resume_from}")
        state = RunState.from_dict(saved["state"]["run"])
        runtime.say(f"resuming from {resume_from} (step {state.step})")
    metrics = outputs.MetricsLog(out_dir / "metrics.jsonl", keep_up_to_step=state.step, cfg=cfg, config=outputs.resolved_config(cfg, plan))
    run = Run(cfg, plan, trainer, examples, sft_examples, eval_examples, eval_metrics, out_dir, metrics, fmt, levels, retain)
    return run._replace(replay_examples=files.get("REPLAY_FILE") or retain), state


def make_levels(cfg: Config, examples: list, prepare: Callable[[list], list]) -> Optional[Levels]:
    """CURRICULUM's levels: a reasoning_gym task's curriculum (its rows generated at a level when first drawn), or the
    sorted values of "column" in TRAIN_FILE's rows (each level its rows); prepare tokenizes. None without CURRICULUM."""
    rule = cfg.CURRICULUM
    if not rule:
        return None
    if runtime.is_task(cfg.TRAIN_FILE):
        task = runtime.make_task(cfg.TRAIN_FILE, cfg.TASK_CONFIG, "TRAIN_FILE", cfg.SEED or 0)
        where = f"TRAIN_FILE {cfg.TRAIN_FILE!r}"
        rows = lambda level: runtime.task_rows(task, where, level=level, mode=rule["mode"])  # noqa: E731
        made = functools.cache(lambda level: prepare(make_examples(rows(level), cfg.SELECT_OUTPUT, where, "", "prompt_completion", True)))
        return Levels(rule, runtime.task_levels(task, where), made)
    column = rule["column"]
    value = {id(e): e.item.get(column, e.category if column == cfg.CATEGORY_FIELD else None) for e in examples}
    missing = [e.index for e in examples if value[id(e)] is None or isinstance(value[id(e)], (dict, list))]
    if missing:
        raise runtime.UserError(f"CURRICULUM column {column!r}: TRAIN_FILE rows {missing[:5]} have no level there (a number or a name)")
    values = sorted(set(value.values()), key=lambda v: (isinstance(v, str), v))
    pools = [[e for e in examples if value[id(e)] == v] for v in values]
    return Levels(rule, len(values), pools.__getitem__)


def plan_run(cfg: Config, examples: list, paths, out_dir: Path, resume_from: Optional[Path], device, sft_examples) -> tuple[Plan, list]:
    """start()'s Plan: the seed (a resumed run's, SEED, or one drawn by the main process), this run's subset of the
    items, the weights ready (a .gguf converted once), precision and the decoding probe, sizes; checked against the
    disk and said -> (the Plan, the items)."""
    seed, bf16 = outputs.resumed_facts(cfg, resume_from) if resume_from is not None else (cfg.SEED, None)
    seed_drawn = seed is None
    seed = runtime.on_main(draw_seed) if seed_drawn else seed  # a drawn seed: the main process's, everywhere
    examples = select_subset(examples, cfg, seed)
    with runtime.main_first():  # the main process converts a .gguf into the shared cache first
        runtime.prepare_weights(cfg, paths)
    precision = f"bf16 {'on' if bf16 else 'off'}: as when the run started (resumed)" if bf16 is not None else None
    if bf16 is None:
        bf16, precision = runtime.on_main(runtime.resolve_bf16, cfg, device, paths)  # the main process's choice, everywhere
    weight_first = runtime.on_main(runtime.resolve_weight_first, cfg, device, bf16, paths)  # a speed choice: the main process's
    n_sft = None if sft_examples is None else len(sft_examples)
    plan = make_plan(cfg, len(examples), runtime.world_size(), seed, seed_drawn, bf16, precision, str(paths.weights),
                     str(paths.adapter) if paths.adapter else None, runtime.model_context(paths.config()),
                     runtime.parameter_counts(cfg, paths), n_sft, weight_first)  # fmt: skip
    free = runtime.on_main(outputs.free_bytes, out_dir)  # the main one writes
    runtime.check_space(cfg, plan.checkpoint_bytes, plan.final_bytes, out_dir, free)
    runtime.say(plan.precision)
    runtime.say(plan.describe())
    if cfg.MODE != "sft" and (off := runtime.sampling_is_off_policy(cfg)):
        runtime.warn(
            f"sampling with {', '.join(off)} draws responses from a distribution other than the policy's, so the PPO "
            "ratio and KL are off-policy; this is the known cause of 'KL divergence is starting to become negative' "
            "(huggingface/trl#235, #351, #1857). Set TOP_P=1, REPETITION_PENALTY=1, NO_REPEAT_NGRAM_SIZE=0 for exact PPO."
        )
    return plan, examples


def build_rewards(cfg: Config, device, ref_lm, tokenizer, reward, examples: list, eval_examples: list) -> tuple[Any, dict]:
    """The reward (REWARD, unless run() was given one; checked against every row it will score) and the evaluation's
    metrics -> (reward, {name: reward-like})."""
    if reward is None and (cfg.MODE != "sft" or cfg.EVAL_FILE):  # the reward is used
        rows = [
            (f"{key} {path!r} row {e.index}", e.target, e.item)
            for key, path, part in (("TRAIN_FILE", cfg.TRAIN_FILE, examples), ("EVAL_FILE", cfg.EVAL_FILE, eval_examples))
            for e in part
        ]
        reward = runtime.build_reward(cfg, device, ref_lm, tokenizer, sample=examples[0], rows=rows)
    metrics = {k: runtime.build_reward(cfg, device, spec=v) for k, v in EVAL_METRICS.items()} if eval_examples else {}
    eval_metrics = {"reward": reward, **metrics} if eval_examples else {}
    return reward, eval_metrics


def finish(r: Run, state: RunState) -> int:
    """After the last step: the final evaluation, report.md, the saved models; checkpoints go."""
    cfg, out_dir, table = r.cfg, r.out_dir, ""
    watch = runtime.Stopwatch()
    if r.evaluates:
        if not (cfg.EVAL_EVERY and state.step % cfg.EVAL_EVERY == 0):  # else the loop just evaluated this step
            log_eval(r, state)
        watch.lap("final evaluation")
        if runtime.is_main():
            with outputs.writing(
                "report.md and its plots",
                out_dir,
                1 << 20,
                "; the checkpoints are kept: free space and rerun the same command (it resumes from the newest one)",
            ):
                table = outputs.write_report(out_dir, r.metrics.read(), cfg, len(r.examples))
            runtime.say(f"\n{table}\nreport: {out_dir / 'report.md'}")
        watch.lap("report")
    r.trainer.optim.release()  # the final save needs neither AdamW's state nor gradients (a checkpoint holds them)
    if r.trainer.device.type == "cpu":
        runtime.return_freed_memory()  # what the steps kept (keep_freed_memory) back to the system, for the save's page cache
    outputs.save_final(out_dir, r.trainer, cfg, outputs.model_card(cfg, len(r.examples), table))
    watch.lap("final model")
    runtime.say(f"finish: {watch}")
    r.metrics.close()
    if runtime.is_main() and not cfg.KEEP_CHECKPOINTS_AT_END and (out_dir / "checkpoints").exists():
        shutil.rmtree(out_dir / "checkpoints")  # the run finished: the final model is saved, resume state is not needed
    if runtime.is_main():  # only the main process walks OUTPUT_DIR: it alone renames and deletes in it (the others would race it)
        runtime.say(
            f"done: {state.step} steps, {state.bad_total} skipped; metrics in {out_dir / 'metrics.jsonl'}; "
            f"{out_dir} holds {outputs.disk_usage(out_dir)}"
        )
    runtime.barrier()
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="hybrid_trainer.py",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Fine-tune a causal LM with SFT, PPO or both interleaved, from one JSON config.",
        epilog="--check validates the config and the data files, prints the resolved config (every key, defaults "
        "filled in) and exits 0 without loading model weights.\n\n" + config_help(),
    )
    parser.add_argument("config", help="path to the JSON config")
    parser.add_argument("--check", action="store_true", help="validate config and data, print the resolved config, exit")
    args = parser.parse_args(argv)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    runtime.use_processes(runtime.Processes.from_env())  # before the config loads: its errors are said once, by the main process
    return runtime.run_command(lambda: run(load_config(args.config), check=args.check))


if __name__ == "__main__":
    runtime.exit_now(main())
