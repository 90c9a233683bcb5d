"""Environments for multi-turn rollouts (agents): `make_environment(spec)` builds one from a JSON spec, like a reward.

    env_type = make_environment({"type": "calculator"})
    env = env_type.new(row)                  # one instance per trajectory
    env.reset(row)                           # -> messages added before the prompt, or None
    env.step("347*29")                       # -> Step(observation="10063", reward=None, done=False)

The trainer owns the turn loop and the tokens (hybrid_trainer.py, `TurnLoop`): the model writes a turn; when the turn
holds an action in ACTION_FORMAT (e.g. `<calc>347*29</calc>`, or a ```python block), the action's text goes to step(),
and the observation comes back as the next turn of the conversation; a turn without an action is the final answer.
Every type is one builder in ENVIRONMENTS: its keyword arguments are the spec's fields, checked (types, bounds, unknown
names) before any model loads, as rewards.py checks a reward's.

Built in:
  calculator  arithmetic (integers, decimals, + - * / ** % //, parentheses, × ÷) evaluated by walking its syntax tree:
              no eval, bounded length, exponent and result
  code        the action (a ```python block) runs in rewards.py's code sandbox, with every limit, every time; the
              observation is what it printed (stdout and stderr, a traceback included)
  python      your own class (`path`, `class`) with reset(row) and step(action) -> (observation, reward, done); only with
              TRUST_REMOTE_CODE: true, like the python reward
  trl         a TRL environment class (GRPOTrainer's environment_factory) unchanged: reset(**row), its public methods the
              tools (schemas from their signatures and docstrings), get_reward() its own reward; TRUST_REMOTE_CODE too
"""

from __future__ import annotations

import ast
import inspect
import json
import math
import operator
import threading
import time
from fractions import Fraction
from pathlib import Path
from typing import Annotated, Any, Callable, NamedTuple, Optional

import rewards


class Step(NamedTuple):
    """What one environment step returns (a user's step may return the first three as a tuple)."""

    observation: Optional[str]  # the environment's reply, the next turn of the conversation (None: nothing to add)
    reward: Optional[float] = None  # a reward for this step (summed over the trajectory, times ENV_REWARD_WEIGHT)
    done: bool = False  # the trajectory ends here
    error: bool = False  # the action failed (counted as env/action_errors; the observation says why)


class ActionFormat(NamedTuple):
    """How an action sits in the assistant's own text: between `open` and the first `close` after it. The turn ends
    there: the engine stops at `close` as a stop string where `close` cannot occur in `open` (`stops`), else at EOS,
    and the turn loop cuts it after the action either way."""

    open: str
    close: str
    stops: bool
    help: str


ACTION_FORMATS = {
    "calc_tag": ActionFormat("<calc>", "</calc>", True, "<calc>expression</calc> (the calculator's default)"),
    "python_block": ActionFormat(
        "```python\n",
        "```",
        False,
        "a fenced ```python block (the code environment's default; "
        "the fence opens blocks too, so the engine runs to EOS and the turn is cut after the block)",
    ),
    "tool_tag": ActionFormat("<tool>", "</tool>", True, "<tool>text</tool> (the python environment's default)"),
    "tool_call": ActionFormat(
        "<tool_call>",
        "</tool_call>",
        True,
        'the chat template\'s own tool-call format (Qwen-family templates): <tool_call>{"name": ..., "arguments": {...}}</tool_call>',
    ),
}


# ACTION_FORMAT "tool_call" on a template that writes a call as a bare JSON object, the whole turn (Llama 3.x): no
# markers; the action is the JSON object the turn starts with (find_action), the turn ends at the model's stop token
JSON_TOOL_CALL = ActionFormat("", "", False, 'a JSON object {"name": ..., "parameters": {...}} as the turn (Llama 3.x templates)')

DEFAULT_FORMATS = {"calculator": "calc_tag", "code": "python_block", "python": "tool_tag", "trl": "tool_call"}  # ACTION_FORMAT "auto"


def action_format(spec: Any) -> ActionFormat:
    """ACTION_FORMAT: a name in ACTION_FORMATS, or {"open": ..., "close": ...} (a stop string unless open holds close)."""
    if isinstance(spec, dict):
        return ActionFormat(spec["open"], spec["close"], spec["close"] not in spec["open"], "your own markers")
    return ACTION_FORMATS[spec]


def describe(env_type: str, spec: Any, max_turns: int, max_new_tokens: int) -> str:
    """--check's line on ENVIRONMENT: how the model acts (ACTION_FORMAT, "auto": the environment's default), its turns."""
    fmt = action_format(DEFAULT_FORMATS[env_type] if spec == "auto" else spec)
    return (
        f"environment: {env_type}; the model acts by writing {fmt.open}...{fmt.close} (ACTION_FORMAT "
        f"{spec if isinstance(spec, str) else 'custom'}); up to {max_turns} turns, {max_new_tokens} model tokens per trajectory"
    )


def find_action(text: str, fmt: ActionFormat) -> Optional[str]:
    """The action of a turn: the text between its first `open` and the first `close` after it, or None. Monotone: a
    text that holds an action still holds it with more text after it (the turn loop's cut relies on it). Without
    markers (JSON_TOOL_CALL): the JSON object the turn starts with."""
    if not fmt.open:
        body = text.lstrip()
        try:
            return body[: json.JSONDecoder().raw_decode(body)[1]] if body.startswith("{") else None
        except ValueError:
            return None
    start = text.find(fmt.open)
    end = -1 if start < 0 else text.find(fmt.close, start + len(fmt.open))
    return None if end < 0 else text[start + len(fmt.open) : end]


def read_call(action: str) -> tuple[Optional[str], Optional[dict]]:
    """A tool call's JSON as chat templates render one ({"name": ..., "arguments": {...}}; Llama 3.x: "parameters")
    -> (its name, its arguments), None for what it lacks; raises ValueError when it is not JSON."""
    call = json.loads(action)
    if not isinstance(call, dict):
        return None, None
    arguments = call.get("arguments", call.get("parameters"))
    return call.get("name"), arguments if isinstance(arguments, dict) else None


def parse_tool_call(action: str, schema: dict) -> tuple[Optional[str], str]:
    """A tool_call action ({"name": ..., "arguments": {...}}, as chat templates render tool calls) -> (the argument the
    environment's step takes, ""), or (None, why it is not a call of the schema's function)."""
    function = schema["function"]
    try:
        name, arguments = read_call(action)
    except ValueError:
        return None, 'error: a tool call is a JSON object {"name": ..., "arguments": {...}}'
    if name != function["name"] or arguments is None:
        return None, f'error: the tool is {function["name"]!r}, called as {{"name": "{function["name"]}", "arguments": {{...}}}}'
    (param,) = function["parameters"]["required"]
    value = arguments.get(param)
    if not isinstance(value, str):
        return None, f"error: {function['name']} needs the argument {param!r}, a string"
    return value, ""


class EnvSpecError(ValueError):
    """A bad ENVIRONMENT spec: the trainer prints it as one error line."""


class EnvironmentType:
    """A built environment spec: makes one instance per trajectory and runs a batch of steps, at most `workers` at a
    time, each stopped after `timeout` seconds. A step that raises or hangs ends its trajectory (Outcome.error)."""

    name = ""
    default_format = "tool_tag"
    workers = 1
    tool_schema: Optional[dict] = None  # the function the tool_call format calls (for apply_chat_template(tools=...))

    def new(self, row: dict):
        raise NotImplementedError

    def tools(self) -> list:
        """The schemas of the functions a tool call may name (ACTION_FORMAT tool_call)."""
        return [self.tool_schema] if self.tool_schema else []

    def parse_call(self, action: str) -> tuple[Optional[str], str]:
        """A tool call's JSON -> (what step() takes, "") or (None, the error observation)."""
        return parse_tool_call(action, self.tool_schema)

    def steps(self, calls: list[tuple[Any, str]], timeout: float) -> list["Outcome"]:
        """(instance, action) pairs -> one Outcome each, in order; `workers` at a time, each with `timeout` seconds."""
        return run_steps(calls, timeout, self.workers)


class Outcome(NamedTuple):
    step: Optional[Step]  # None: the step raised or hung
    error: str  # "" or why the trajectory ended
    seconds: float


def as_step(out: Any) -> Step:
    if isinstance(out, Step):
        return out
    if not isinstance(out, (tuple, list)) or len(out) not in (3, 4):
        raise TypeError(f"step() returned {type(out).__name__}; expected (observation, reward or None, done)")
    observation, reward, done = out[:3]
    if observation is not None and not isinstance(observation, str):
        raise TypeError(f"step() returned an observation of type {type(observation).__name__}; expected a string or None")
    if reward is not None and (isinstance(reward, bool) or not isinstance(reward, (int, float)) or not math.isfinite(reward)):
        raise TypeError(f"step() returned reward {reward!r}; expected a finite number or None")
    return Step(observation, None if reward is None else float(reward), bool(done), bool(out[3]) if len(out) == 4 else False)


def run_steps(calls: list[tuple[Any, str]], timeout: float, workers: int) -> list[Outcome]:
    """`workers` steps at a time, each in a daemon thread of its own: a step that hangs is abandoned after `timeout`
    seconds (its thread cannot be killed, but it holds nothing of the trainer's and dies with the process)."""
    out: list[Outcome] = []
    for at in range(0, len(calls), max(1, workers)):
        started = []
        for instance, action in calls[at : at + max(1, workers)]:
            box: dict = {}
            thread = threading.Thread(target=_one_step, args=(instance, action, box), daemon=True)
            started.append((thread, box, time.perf_counter()))
            thread.start()
        for thread, box, t0 in started:
            thread.join(max(0.0, t0 + timeout - time.perf_counter()))
            if thread.is_alive():
                out.append(Outcome(None, f"step did not return within ENV_STEP_TIMEOUT={timeout:g} s", timeout))
            else:
                out.append(Outcome(box.get("step"), box.get("error", ""), box.get("seconds", 0.0)))
    return out


def _one_step(instance: Any, action: str, box: dict) -> None:
    t0 = time.perf_counter()
    try:
        box["step"] = as_step(instance.step(action))
    except Exception as e:  # noqa: BLE001 - a user's environment: any failure ends its trajectory, reported
        box["error"] = f"step raised {type(e).__name__}: {e}"
    box["seconds"] = time.perf_counter() - t0


# ---- calculator ----
_OPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}


class CalcError(ValueError):
    pass


def calculate(expression: str, max_length: int = 200, max_digits: int = 30) -> str:
    """An arithmetic expression -> its value as text, exact (fractions) until shown: an integer, or a decimal of at most
    12 significant digits. Only numbers, + - * / // % **, unary signs and parentheses (× ÷ and a thousands comma
    are read as * / and nothing); anything else, a result over max_digits digits or an exponent over 64 raises
    CalcError, whose text is the observation."""
    text = expression.strip().replace("×", "*").replace("÷", "/").replace("^", "**").replace("−", "-")
    text = text.rstrip("=").strip()
    if not text:
        raise CalcError("empty expression")
    if len(text) > max_length:
        raise CalcError(f"expression longer than {max_length} characters")
    try:
        tree = ast.parse(text.replace(",", ""), mode="eval")
    except SyntaxError:
        raise CalcError(f"cannot read {expression.strip()[:60]!r} as arithmetic") from None
    limit = 10**max_digits

    def value(node: ast.AST) -> Fraction:
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return Fraction(str(node.value)) if isinstance(node.value, float) else Fraction(node.value)
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            return _UNARY[type(node.op)](value(node.operand))
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            left, right = value(node.left), value(node.right)
            if isinstance(node.op, ast.Pow):
                if right.denominator != 1 or abs(right) > 64:
                    raise CalcError("only whole exponents up to 64")
                if left == 0 and right < 0:
                    raise CalcError("division by zero")
            elif isinstance(node.op, (ast.Div, ast.FloorDiv, ast.Mod)) and right == 0:
                raise CalcError("division by zero")
            out = _OPS[type(node.op)](left, right)
            out = Fraction(out)
            if abs(out) >= limit or out.denominator >= limit:
                raise CalcError(f"result has more than {max_digits} digits")
            return out
        raise CalcError(f"not arithmetic: {ast.get_source_segment(text.replace(',', ''), node) or type(node).__name__}")

    result = value(tree.body)
    if abs(result) >= limit:
        raise CalcError(f"result has more than {max_digits} digits")
    if result.denominator == 1:
        return str(result.numerator)
    return f"{float(result):.12g}"


class Calculator:
    """One trajectory's calculator (no state)."""

    def __init__(self, max_length: int, max_digits: int, system: str):
        self.max_length, self.max_digits, self.system = max_length, max_digits, system

    def reset(self, row: dict) -> Optional[list]:
        return [{"role": "system", "content": self.system}] if self.system else None

    def step(self, action: str) -> Step:
        try:
            return Step(calculate(action, self.max_length, self.max_digits))
        except CalcError as e:
            return Step(f"error: {e}", error=True)


class CalculatorType(EnvironmentType):
    name = "calculator"
    default_format = DEFAULT_FORMATS[name]
    tool_schema = {
        "type": "function",
        "function": {
            "name": "calculator",
            "description": "Evaluate an arithmetic expression (+ - * / ** %, parentheses).",
            "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]},
        },
    }

    def __init__(self, max_length: int, max_digits: int, system: str):
        self.args = (max_length, max_digits, system)

    def new(self, row: dict) -> Calculator:
        return Calculator(*self.args)


def calculator(
    ctx: rewards.Context, max_length: Annotated[int, ">=1"] = 200, max_digits: Annotated[int, ">=1"] = 30, system: str = ""
) -> CalculatorType:
    """Arithmetic, evaluated by walking the expression's syntax tree (no eval): integers, decimals, + - * / // % **
    (whole exponents up to 64), unary signs, parentheses; × ÷ ^ are read as * / **. At most max_length characters and
    max_digits digits in any intermediate result; a bad expression gets an `error: ...` observation (an action error).
    system: a system message put before the prompt (e.g. how to call the calculator); "" adds none."""
    return CalculatorType(max_length, max_digits, system)


# ---- code: the model's program, in the sandbox ----
_MAIN = """
import sys, traceback
try:
    exec(compile({program!r}, "main.py", "exec"), {{"__name__": "__main__"}})
except SystemExit:
    pass
except BaseException:
    traceback.print_exc(file=sys.stdout)
"""


class CodeRunner:
    """One trajectory's code environment: each action is a fresh program in a fresh sandbox (no state between
    steps; a program that needs earlier definitions repeats them)."""

    def __init__(self, kind: "CodeType"):
        self.kind = kind

    def reset(self, row: dict) -> Optional[list]:
        return [{"role": "system", "content": self.kind.system}] if self.kind.system else None

    def step(self, action: str) -> Step:
        result = self.kind.sandbox.run(_MAIN.format(program=action))
        output = result.output.rstrip()
        failed = result.why and result.why != "no result" or "Traceback (most recent call last)" in output
        if result.why:
            output = (output + "\n" if output else "") + f"error: {result.why}"
        return Step(output or "(no output)", error=bool(failed))


class CodeType(EnvironmentType):
    name = "code"
    default_format = DEFAULT_FORMATS[name]

    def __init__(self, limits: rewards.SandboxLimits, workers: int, system: str):
        self.limits, self.workers, self.system = limits, workers, system
        self.sandbox = rewards.Sandbox(limits, workers)

    def new(self, row: dict) -> CodeRunner:
        return CodeRunner(self)


def code(
    ctx: rewards.Context,
    timeout: Annotated[float, ">0"] = 5.0,
    memory_mb: Annotated[int, ">=16"] = 512,
    max_processes: Annotated[int, ">=1"] = 16,
    max_output_kb: Annotated[int, ">=1"] = 64,
    workers: Annotated[int, ">=1"] = 2,
    isolation: str = "best",
    system: str = "",
) -> CodeType:
    """The action (the turn's ```python block) runs as a program in the code reward's sandbox: a fresh child each time,
    bubblewrap namespaces where available (no network, none of the trainer's files, a private /tmp), and always the
    time, CPU, memory, process, file-size and output limits; `workers` programs at a time. The observation is what it
    printed (a traceback included), then `error: <why>` when a limit stopped it. isolation "require": refuse to start
    without namespaces."""
    where = rewards.sandbox_isolation()
    if isolation not in ("best", "require"):
        raise EnvSpecError(f'code: isolation must be "best" or "require", got {isolation!r}')
    if isolation == "require" and where.level != "namespaces":
        raise EnvSpecError(f'code: isolation "require" needs bubblewrap namespaces, and this machine has {where.detail}')
    ctx.say(
        f"code environment sandbox: {where.detail}; per action {timeout:g} s, {memory_mb} MB, {max_processes} "
        f"processes, {max_output_kb} KB of output, {workers} at a time"
    )
    return CodeType(rewards.SandboxLimits(timeout, memory_mb, max_processes, max_output_kb), workers, system)


# ---- python: the user's own class ----
class UserType(EnvironmentType):
    name = "python"
    default_format = DEFAULT_FORMATS[name]

    def __init__(self, cls: type, args: dict, workers: int, label: str):
        self.cls, self.args, self.workers, self.label = cls, args, workers, label

    def new(self, row: dict):
        return self.cls(**self.args)


def python(
    ctx: rewards.Context, path: str = "", class_name: str = "", args: Optional[dict] = None, workers: Annotated[int, ">=1"] = 1
) -> UserType:
    """Your own environment: the class `class` in the local Python file `path`, made once per trajectory with
    `args` as keyword arguments, with reset(row) -> messages or None and step(action_text) -> (observation, reward or
    None, done). It runs your code, so the config must opt in with TRUST_REMOTE_CODE: true. A step that raises ends
    its trajectory (reward 0, counted, logged with the row); one that takes longer than ENV_STEP_TIMEOUT is abandoned.
    workers: steps run at once (threads)."""
    file = _python_file(path, ctx.trust_remote_code)
    cls = _user_class(file, class_name, "python")
    missing = [m for m in ("reset", "step") if not callable(getattr(cls, m, None))]
    if missing:
        raise EnvSpecError(
            f"python environment class {class_name!r} in {str(file)!r} has no method {' or '.join(missing)}: "
            "it needs reset(row) -> messages or None and step(action) -> (observation, reward, done)"
        )
    return UserType(cls, dict(args or {}), workers, f"{file}:{class_name}")


def _python_file(path: str, trusted: Optional[bool], type_name: str = "python") -> Path:
    defines = 'your environment class, and "class": its name'
    return rewards.user_python_file(path, trusted, "environment", defines, EnvSpecError, type_name)


# ---- trl: a TRL environment class, as GRPOTrainer's environment_factory takes it ----
class TrlEnvironment:
    """One trajectory's instance of a TRL environment class (trl/trainer/grpo_trainer.py: _tool_call_loop, reset and
    get_reward as GRPOTrainer calls them): reset(row) is its reset(**row), whose text (if any) is appended to the last
    user message; step(call) runs one tool call; a tool that raises answers {'error': ...}, as TRL's does."""

    def __init__(self, instance: Any, reward_method: str = "get_reward"):
        self.instance, self.reward_method = instance, reward_method

    def reset(self, row: dict) -> Optional[str]:
        out = self.instance.reset(**row)
        if out is not None and not isinstance(out, str):
            raise TypeError(f"reset() returned {type(out).__name__}; a TRL environment's reset returns a string or None")
        return out

    def step(self, action: str) -> Step:
        call = json.loads(action)  # TrlType.parse_call wrote it
        try:
            return Step(str(getattr(self.instance, call["name"])(**call["arguments"])))
        except Exception as e:  # noqa: BLE001 - the tool's failure is its observation, as in TRL
            return Step(str({"error": str(e)}), error=True)

    def final_reward(self) -> float:
        """get_reward() (or the spec's reward_method) where the class has one: its own reward, once per finished
        trajectory; else 0."""
        get = getattr(type(self.instance), self.reward_method, None)
        return float(get(self.instance)) if callable(get) else 0.0


class TrlType(EnvironmentType):
    name = "trl"
    default_format = DEFAULT_FORMATS[name]

    def __init__(self, cls: type, schemas: list, workers: int, reward_method: str):
        self.cls, self.schemas, self.workers, self.reward_method = cls, schemas, workers, reward_method
        self.names = [s["function"]["name"] for s in schemas]

    def new(self, row: dict) -> TrlEnvironment:
        return TrlEnvironment(self.cls(), self.reward_method)

    def tools(self) -> list:
        return self.schemas

    def parse_call(self, action: str) -> tuple[Optional[str], str]:
        try:
            name, arguments = read_call(action)
        except ValueError:
            name, arguments = None, None
        if name not in self.names or arguments is None:
            return None, f'error: a tool call is {{"name": one of {self.names}, "arguments": {{...}}}}'
        return json.dumps({"name": name, "arguments": arguments}), ""


def trl(
    ctx: rewards.Context, path: str = "", class_name: str = "", reward_method: str = "get_reward", workers: Annotated[int, ">=1"] = 1
) -> TrlType:
    """A TRL environment class unchanged (GRPOTrainer's environment_factory): `class` in the local file `path`, made
    with no arguments once per trajectory; reset(**row) -> a string appended to the last user message, or None; every
    public method (not reset or get_reward) is a tool, its schema built from its signature and docstring as TRL builds
    it (transformers' get_json_schema); calls in the chat template's format (ACTION_FORMAT tool_call); get_reward()
    (or the method `reward_method` names), where defined, is added to the score once per finished trajectory
    (ENV_REWARD_WEIGHT; REWARD "environment" when it is the whole score). Runs your code: TRUST_REMOTE_CODE: true."""
    from transformers.utils import get_json_schema

    file = _python_file(path, ctx.trust_remote_code, "trl")
    cls = _user_class(file, class_name, "trl")
    if reward_method != "get_reward" and not callable(getattr(cls, reward_method, None)):
        raise EnvSpecError(f"trl environment class {class_name!r} in {str(file)!r} has no method {reward_method!r} (reward_method)")
    if not callable(getattr(cls, "reset", None)):
        raise EnvSpecError(f"trl environment class {class_name!r} in {str(file)!r} has no reset method: TRL's needs reset(**row)")
    probe = cls()  # as GRPOTrainer probes one instance for its tools
    names = [
        n
        for n, _ in inspect.getmembers(cls, predicate=inspect.isfunction)
        if n not in ("reset", "get_reward", reward_method) and not n.startswith("_")
    ]
    if not names:
        raise EnvSpecError(f"trl environment class {class_name!r} in {str(file)!r} has no public method: its tools are its public methods")
    schemas = []
    for name in names:
        try:
            schemas.append(get_json_schema(getattr(probe, name)))
        except Exception as e:  # noqa: BLE001 - transformers' DocstringParsingException / TypeHintParsingException
            raise EnvSpecError(
                f"trl environment class {class_name!r}: tool {name!r}: {e} (TRL builds its schema from the docstring)"
            ) from None
    return TrlType(cls, schemas, workers, reward_method)


def _user_class(file: Path, class_name: str, kind: str) -> type:
    module = rewards.load_user_module(file, "environment", EnvSpecError)
    cls = getattr(module, class_name, None)
    if not inspect.isclass(cls):
        defined = sorted(k for k, v in vars(module).items() if inspect.isclass(v) and v.__module__ == module.__name__)
        raise EnvSpecError(
            f"{kind} environment file {str(file)!r} has no class {class_name!r} (its classes: "
            f'{defined or "none"}); set "class" to the one to use'
        )
    return cls


def final_reward(env: Any) -> tuple[float, str]:
    """A finished trajectory's reward from its environment itself (a TRL class's get_reward) -> (reward, error)."""
    if not isinstance(env, TrlEnvironment):
        return 0.0, ""
    try:
        return env.final_reward(), ""
    except Exception as e:  # noqa: BLE001 - a user's environment: its failure scores 0, reported
        return 0.0, f"get_reward raised {type(e).__name__}: {e}"


ENVIRONMENTS: dict[str, Callable[..., EnvironmentType]] = {"calculator": calculator, "code": code, "python": python, "trl": trl}
RENAMED = {"class": "class_name"}  # spec field -> builder argument (a Python keyword)


def _fields_of(spec: dict) -> dict:
    return {RENAMED.get(k, k): v for k, v in spec.items() if k != "type"}


def check_spec(spec: Any, trust_remote_code: Optional[bool] = None, where: str = "ENVIRONMENT") -> None:
    """Validate an environment spec (type, fields, their types and bounds; python: the opt-in and the file) without
    building it. Raises EnvSpecError naming the field."""
    try:
        builder = rewards.check_type(spec, ENVIRONMENTS, where)
        rewards.check_fields({"type": spec["type"], **_fields_of(spec)}, builder, where, skip_ctx=True, common={"type"})
    except rewards.RewardSpecError as e:
        raise EnvSpecError(str(e).replace("class_name", "class")) from None
    if spec["type"] in ("python", "trl"):
        if not spec.get("class"):
            raise EnvSpecError(f'{where}: {spec["type"]} needs "class": the name of your environment class in {spec.get("path")!r}')
        try:
            _python_file(spec.get("path", ""), trust_remote_code, spec["type"])
        except EnvSpecError as e:
            raise EnvSpecError(f"{where}: {e}") from None


def make_environment(spec: dict, **context) -> EnvironmentType:
    """Build an environment type from its spec (context: rewards.Context's fields: trust_remote_code, say)."""
    check_spec(spec, context.get("trust_remote_code", False))
    ctx = rewards.Context(**context)
    try:
        return ENVIRONMENTS[spec["type"]](ctx, **_fields_of(spec))
    except EnvSpecError as e:
        raise EnvSpecError(f"ENVIRONMENT: {e}") from None


def truncate_middle(ids: list, max_tokens: int) -> tuple[list, list, int]:
    """Token ids longer than max_tokens -> (head, tail, tokens cut) with head + tail = max_tokens, cut from the middle."""
    if len(ids) <= max_tokens:
        return ids, [], 0
    head = max_tokens // 2
    tail = max_tokens - head
    return ids[:head], ids[len(ids) - tail :] if tail else [], len(ids) - max_tokens
