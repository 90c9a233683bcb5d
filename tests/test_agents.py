"""Agents: environments (environments.py), the turn loop (TurnLoop), token-exact trajectories and their loss masks.

A scripted engine (ScriptedEngine: emits given token sequences, obeys max_tokens and stop strings the way an engine
does, running past the stop marker as vLLM's detokenizer can) checks buffers, masks, stop cuts and limits exactly; the
tiny model runs through the CLI with the calculator and code environments."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ENV, HOSTILE, MARK, ROOT, comparable, leftovers, max_diff, metrics, run_cli, sigkill_at_checkpoint, torchrun

import environments
import hybrid_trainer as ht
import runtime


# ---- the calculator, by hand ----
@pytest.mark.parametrize(
    "expr, value",
    [
        ("347*29", "10063"),
        ("347 × 29", "10063"),
        ("1,234 + 766", "2000"),
        ("12/4", "3"),
        ("7/2", "3.5"),
        ("2**10", "1024"),
        ("-(3 + 4) * 5 % 6", "1"),
        ("0.1 + 0.2", "0.3"),
        ("10 ÷ 4", "2.5"),
        ("17 // 5", "3"),
        ("2^3", "8"),
        ("1/3", "0.333333333333"),
        ("12 * 3 =", "36"),
    ],
)
def test_calculator_values(expr, value):
    assert environments.calculate(expr) == value


@pytest.mark.parametrize(
    "expr, why",
    [
        ("__import__('os').system('id')", "not arithmetic"),
        ("open('x')", "not arithmetic"),
        ("2**65", "whole exponents up to 64"),
        ("2**0.5", "whole exponents"),
        ("1/0", "division by zero"),
        ("5 % 0", "division by zero"),
        ("9**64 * 9**64", "more than 30 digits"),
        ("1" * 201, "longer than 200"),
        ("", "empty"),
        ("3 +", "cannot read"),
        ("[1]", "not arithmetic"),
        ("True + 1", "not arithmetic"),
        ("x * 2", "not arithmetic"),
        ("lambda: 1", "not arithmetic"),
    ],
)
def test_calculator_refuses(expr, why):
    with pytest.raises(environments.CalcError, match=why):
        environments.calculate(expr)


def test_calculator_step_reports_errors_as_observations():
    env = environments.make_environment({"type": "calculator"}).new({})
    assert env.reset({}) is None
    assert env.step("6*7") == environments.Step("42")
    bad = env.step("import os")
    assert bad.observation.startswith("error: ") and bad.error and not bad.done


def test_find_action_and_truncate_middle():
    calc = environments.ACTION_FORMATS["calc_tag"]
    assert environments.find_action("so <calc>2*3</calc>", calc) == "2*3"
    assert environments.find_action("<calc>1</calc> no", calc) == "1"
    assert environments.find_action("the answer is 6", calc) is None
    assert environments.find_action("</calc> without an opening", calc) is None
    assert environments.find_action("<calc>1</calc> then <calc>2</calc>", calc) == "1"
    block = environments.ACTION_FORMATS["python_block"]
    assert environments.find_action("run:\n```python\nprint(1)\n```", block) == "print(1)\n"
    assert environments.truncate_middle(list(range(10)), 4) == ([0, 1], [8, 9], 6)
    assert environments.truncate_middle([1, 2], 4) == ([1, 2], [], 0)


# ---- specs ----
def test_bad_specs_name_the_field(tmp_path):
    check = environments.check_spec
    for spec, message in [
        ({"type": "calculater"}, "did you mean 'calculator'"),
        ({"type": "code", "timeout": 0}, "timeout must be"),
        ({"type": "calculator", "digits": 3}, "unknown field 'digits'"),
        ("calculator", "JSON object"),
        ({"type": "python", "path": "x.py", "class": "E"}, "TRUST_REMOTE_CODE"),
    ]:
        with pytest.raises(environments.EnvSpecError, match=message):
            check(spec, trust_remote_code=False)
    with pytest.raises(environments.EnvSpecError, match="does not exist"):
        check({"type": "python", "path": str(tmp_path / "none.py"), "class": "E"}, trust_remote_code=True)
    (tmp_path / "env.py").write_text("class Other:\n    pass\n")
    with pytest.raises(environments.EnvSpecError, match=r"has no class 'E' \(its classes: \['Other'\]\)"):
        environments.make_environment({"type": "python", "path": str(tmp_path / "env.py"), "class": "E"}, trust_remote_code=True)
    with pytest.raises(environments.EnvSpecError, match="has no method reset or step"):
        environments.make_environment({"type": "python", "path": str(tmp_path / "env.py"), "class": "Other"}, trust_remote_code=True)


@pytest.mark.parametrize(
    "env, message",
    [
        ({"type": "nope"}, "ENVIRONMENT: unknown type 'nope'"),
        ({"type": "python", "path": "envs.py", "class": "E"}, "set TRUST_REMOTE_CODE: true"),
    ],
)
def test_bad_environment_is_one_error_line_before_weights(tmp_path, tiny_chat_model, env, message, capsys):
    cfg = {
        "MODE": "ppo",
        "MODEL": str(tiny_chat_model),
        "TRAIN_FILE": str(ROOT / "data" / "tool_train.json"),
        "OUTPUT_DIR": str(tmp_path / "out"),
        "REWARD": {"type": "math"},
        "ENVIRONMENT": env,
    }
    path = tmp_path / "c.json"
    path.write_text(json.dumps(cfg))
    assert ht.main([str(path), "--check"]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and message in err and "Traceback" not in err, err


# ---- the scripted engine ----
class ScriptedEngine:
    """A generation backend for tests: script(prompt_ids) -> the ids the model 'samples' next (EOS included where the
    turn ends). It honours max_tokens and, with stop strings, ends a turn `overshoot` tokens after the stop marker
    (an engine's detokenizer may see the marker a token late), as HF and vLLM do."""

    def __init__(self, tokenizer, script, overshoot: int = 2):
        self.tok, self.script, self.overshoot, self.calls = tokenizer, script, overshoot, []

    def sync_weights(self, version):
        pass

    def sleep(self):
        pass

    def generate(self, prompts, n=1, greedy=False, temperature=None, max_tokens=None, stop=None):
        out, ended, logprobs = [], [], []
        limits = max_tokens or [10**6] * len(prompts)
        self.calls.append((len(prompts), n, list(limits), stop))
        for prompt, limit in zip(prompts, limits):
            for _ in range(n):
                ids = list(self.script(prompt))[:limit]
                if stop:
                    for k in range(1, len(ids) + 1):
                        if any(s in self.tok.decode(ids[:k]) for s in stop):
                            ids = ids[: k + self.overshoot]
                            break
                eos = self.tok.eos_token_id
                ids = ids[: ids.index(eos) + 1] if eos in ids else ids
                out.append(ids)
                ended.append(bool(ids) and ids[-1] == eos)
                logprobs.append([-0.5] * len(ids))
        return runtime.Generation(out, torch.tensor(ended), logprobs)


def encode(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def trainer_with(tiny_chat_model, script, env_spec, overshoot=2, **keys):
    cfg = ht.Config.from_dict(
        {
            "MODE": "ppo",
            "MODEL": str(tiny_chat_model),
            "TRAIN_FILE": "-",
            "OUTPUT_DIR": "-",
            "ENVIRONMENT": env_spec,
            "ADVANTAGE": "grpo",
            "NUM_GENERATIONS": 2,
            "PPO_BATCH": 1,
            "MAX_NEW_TOKENS": 64,
            "MAXSEQ": 256,
            "SEED": 0,
            "INIT_KL_COEF": 0.0,
            "REWARD": {"type": "math"},
            **keys,
        }
    )
    policy, _, tok = ht.load_model(cfg, torch.device("cpu"))
    env = runtime.build_environment(cfg) if env_spec else None
    trainer = ht.HybridTrainer(cfg, policy, None, tok, runtime.build_reward(cfg, "cpu"), environment=env)
    trainer._engine = ScriptedEngine(tok, lambda prompt: script(tok, prompt), overshoot)
    return trainer, tok


def example(tok, question="What is 12 * 3?", answer="36"):
    messages = [{"role": "user", "content": question}]
    ex = ht.Example(index=0, item={"answer": answer}, target=f"The answer is {answer}.", messages=messages, question=question)
    ex.prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ex.prompt_ids = encode(tok, ex.prompt)
    return ex


def calc_script(tok, prompt):
    """First turn: an action (and tokens after its marker, which the loop cuts); after an observation: the answer."""
    text = tok.decode(prompt)
    if "<|tool|>" not in text:
        return encode(tok, "<calc>12*3</calc> and more") + [tok.eos_token_id]
    return encode(tok, "The answer is 36.") + [tok.eos_token_id]


def rendered_ids(tok, t: ht.Trajectory) -> list:
    """The finished conversation rendered by the chat template, cut after its last EOS (what the buffer must equal)."""
    ids = encode(tok, tok.apply_chat_template(t.messages, tokenize=False))
    return ids[: max(i for i, x in enumerate(ids) if x == tok.eos_token_id) + 1]


def test_two_turn_trajectory_is_token_exact_with_loss_mask(tiny_chat_model):
    trainer, tok = trainer_with(tiny_chat_model, calc_script, {"type": "calculator"})
    (t, _) = trainer.turns.run([example(tok)], n=2)
    action, answer = encode(tok, "<calc>12*3</calc>"), encode(tok, "The answer is 36.") + [tok.eos_token_id]
    observation = [tok.eos_token_id] + encode(tok, "<|tool|>36<|end|><|assistant|>")
    assert t.ids == action + observation + answer  # the tokens after the marker were cut, the template closed the turn
    assert t.mask == [1] * len(action) + [0] * len(observation) + [1] * len(answer)
    assert t.logprobs == [-0.5] * len(action) + [0.0] * len(observation) + [-0.5] * len(answer)
    assert t.prompt_ids + t.ids == rendered_ids(tok, t)
    assert [m["role"] for m in t.messages] == ["user", "assistant", "tool", "assistant"]
    assert (t.turns, t.actions, t.action_errors, t.truncated, t.ended, t.last) == (2, 1, 0, False, True, answer)
    calls = trainer._engine.calls
    assert calls[0][:2] == (1, 2) and calls[1][:2] == (2, 1), calls  # turn 1: n per prompt; turn 2: the active ones


def test_smollm2_template_suffix_and_a_whole_trajectory():
    """SmolLM2's own template: the observation's ids start with the newline the template puts after <|im_end|>, and a
    finished trajectory equals the rendered conversation."""
    cfg = ht.Config.from_dict({"TRAIN_FILE": "-", "OUTPUT_DIR": "-"})
    paths = runtime.resolve_model(cfg)
    tok = runtime.load_tokenizer(cfg, paths)
    suffix = runtime.template_suffix(runtime.make_chat(None, tok), {"role": "tool", "content": "10063"})
    assert tok.decode(suffix) == "<|im_end|>\n<|im_start|>tool\n10063<|im_end|>\n<|im_start|>assistant\n"
    turn_loop = ht.TurnLoop(
        ht.Config.from_dict({"TRAIN_FILE": "-", "OUTPUT_DIR": "-", "ENVIRONMENT": {"type": "calculator"}}),
        ht.api_plan(ht.Config.from_dict({"TRAIN_FILE": "-", "OUTPUT_DIR": "-"}), 1),
        None,
        tok,
        environments.make_environment({"type": "calculator"}),
    )
    engine = ScriptedEngine(tok, lambda p: calc_script_smol(tok, p))
    turn_loop.generate = lambda prompts, **kw: engine.generate(prompts, **kw)
    (t,) = turn_loop.run([example(tok, "What is 347 * 29?", "10063")], n=1)
    assert t.prompt_ids + t.ids == rendered_ids(tok, t) and t.messages[2]["content"] == "10063"


def test_tool_call_format_on_a_qwen_template():
    """ACTION_FORMAT "tool_call": the prompt carries the tool's schema (apply_chat_template(tools=...)), the model writes
    the template's <tool_call> JSON, the observation is the template's <tool_response> turn; token-exact against the
    rendered conversation. Qwen 2.5's template (as TRL ships it) on SmolLM2's tokenizer, which has the same <|im_*|>
    tokens; a malformed call is answered with an error observation and the trajectory goes on."""
    import trl

    cfg = ht.Config.from_dict({"TRAIN_FILE": "-", "OUTPUT_DIR": "-", "ENVIRONMENT": {"type": "calculator"}, "ACTION_FORMAT": "tool_call"})
    tok = runtime.load_tokenizer(cfg, runtime.resolve_model(cfg))
    tok.chat_template = (Path(trl.__file__).parent / "chat_templates" / "qwen2_5.jinja").read_text()
    env = environments.make_environment({"type": "calculator"})
    loop = ht.TurnLoop(cfg, ht.api_plan(cfg, 1), None, tok, env)
    calls = [
        '<tool_call>\n{"name": "calculator", "arguments": {"expression": "347*29"}}\n</tool_call>',
        "<tool_call>\nnot json\n</tool_call>",
    ]

    def script(prompt):
        text = tok.decode(prompt)
        if "<tool_response>" not in text:
            return encode(tok, calls[0]) + [tok.eos_token_id]
        if text.count("<tool_response>") == 1:
            return encode(tok, calls[1])
        return encode(tok, "#### 10063") + [tok.eos_token_id]

    engine = ScriptedEngine(tok, script, overshoot=0)
    loop.generate = lambda prompts, **kw: engine.generate(prompts, **kw)
    (t,) = loop.run([example(tok, "What is 347 * 29?", "10063")], n=1)
    assert "# Tools" in tok.decode(t.prompt_ids) and '"name": "calculator"' in tok.decode(t.prompt_ids)
    assert [m["role"] for m in t.messages][-5:] == ["assistant", "tool", "assistant", "tool", "assistant"]
    assert t.messages[-4]["content"] == "10063" and t.messages[-2]["content"].startswith("error: a tool call is a JSON")
    assert (t.actions, t.action_errors, t.parse_errors) == (2, 1, 1)  # the malformed call: answered without the environment
    rendered = encode(tok, tok.apply_chat_template(t.messages, tools=[env.tool_schema], tokenize=False))
    rendered = rendered[: max(i for i, x in enumerate(rendered) if x == tok.eos_token_id) + 1]
    assert t.prompt_ids + t.ids == rendered
    assert "<|im_start|>user\n<tool_response>\n10063\n</tool_response><|im_end|>" in tok.decode(t.ids)


def calc_script_smol(tok, prompt):
    if "<|im_start|>tool" not in tok.decode(prompt):
        return encode(tok, "Let me compute <calc>347*29</calc>") + [tok.eos_token_id]
    return encode(tok, "347 * 29 = 10063. The answer is 10063.") + [tok.eos_token_id]


def test_re_tokenizing_would_have_changed_the_ids(tiny_chat_model):
    """The model samples 'the cat' one character at a time (a valid, non-canonical tokenization): the buffer keeps
    those ids, while decoding and re-rendering the conversation tokenizes 'the cat' into merged tokens."""

    def script(tok, prompt):
        if "<|tool|>" not in tok.decode(prompt):
            return encode(tok, "<calc>2*2</calc>")
        return [encode(tok, c)[0] for c in "the cat"] + [tok.eos_token_id]

    trainer, tok = trainer_with(tiny_chat_model, script, {"type": "calculator"})
    (t, _) = trainer.turns.run([example(tok)], n=2)
    sampled = [encode(tok, c)[0] for c in "the cat"] + [tok.eos_token_id]
    assert t.ids[-len(sampled) :] == sampled
    assert tok.decode(t.prompt_ids + t.ids) == tok.decode(rendered_ids(tok, t))  # the same text ...
    assert t.prompt_ids + t.ids != rendered_ids(tok, t)  # ... other ids: re-tokenizing would train on tokens never sampled


def test_limits_max_turns_tokens_and_observation_length(tiny_chat_model):
    always_act = lambda tok, prompt: encode(tok, "<calc>9*9</calc>") + [tok.eos_token_id]  # noqa: E731
    trainer, tok = trainer_with(tiny_chat_model, always_act, {"type": "calculator"}, MAX_TURNS=3)
    (t, _) = trainer.turns.run([example(tok)], n=2)
    assert (t.turns, t.actions, t.truncated, t.done) == (3, 2, True, True)  # the third action is not run: no turn follows
    assert [m["role"] for m in t.messages][1:] == ["assistant", "tool"] * 2 + ["assistant"]
    trainer, tok = trainer_with(tiny_chat_model, always_act, {"type": "calculator"}, MAX_TURNS=9, MAX_NEW_TOKENS=30)
    (t, _) = trainer.turns.run([example(tok)], n=2)
    assert sum(t.mask) <= 30 and t.truncated
    # a long observation is cut from the middle, saying so
    long = {"type": "calculator"}
    trainer, tok = trainer_with(
        tiny_chat_model,
        lambda tok, p: encode(tok, "<calc>10**29</calc>") if "<|tool|>" not in tok.decode(p) else [tok.eos_token_id],
        long,
        MAX_OBSERVATION_TOKENS=6,
    )
    (t, _) = trainer.turns.run([example(tok)], n=2)
    assert "tokens cut" in t.messages[2]["content"] and t.messages[2]["content"].startswith("1")
    assert t.prompt_ids + t.ids == rendered_ids(tok, t)


@pytest.mark.parametrize("advantage", ["grpo", "gae"])
def test_the_update_reads_the_trajectory_loss_mask(tiny_chat_model, advantage):
    """ppo_update on scripted trajectories: the Rollout's loss mask is 1 on the model's tokens and 0 on the observation,
    the reward scores the final answer (36: right), and the env metrics count what happened; with the value head too
    (gae: values read on the model's tokens, the observation skipped)."""
    trainer, tok = trainer_with(tiny_chat_model, calc_script, {"type": "calculator"}, ADVANTAGE=advantage)
    batch, _, _ = trainer.collector.batch([example(tok)])
    rollout = ht.make_rollout(batch.samples, 2, tok.pad_token_id, torch.device("cpu"))
    n_action = len(encode(tok, "<calc>12*3</calc>"))
    n_obs = 1 + len(encode(tok, "<|tool|>36<|end|><|assistant|>"))
    assert rollout.loss_mask[0, :n_action].eq(1).all() and rollout.loss_mask[0, n_action : n_action + n_obs].eq(0).all()
    assert rollout.scores.tolist() == [1.0, 1.0]
    stats = trainer.ppo_update([example(tok)])
    assert stats["env/turns"] == 2 and stats["env/actions"] == 1 and stats["env/observation_tokens"] == n_obs
    assert stats["env/truncated"] == 0 and stats["env/failed"] == 0 and "time/env_s" in stats
    assert stats["ppo/response_length"] == rollout.loss_mask.sum(1).mean().item()  # the model's tokens only
    if advantage == "gae":
        assert "ppo/loss/value" in stats and stats["ppo/loss/value"] > 0


class Raises:
    def reset(self, row):
        return None

    def step(self, action):
        raise RuntimeError("the user's environment broke")


class Hangs:
    def reset(self, row):
        return [{"role": "system", "content": "Use the tool."}]

    def step(self, action):
        time.sleep(30)


class Rewards:
    def reset(self, row):
        return None

    def step(self, action):
        return ("ok", 0.25, False)


def test_user_environments_that_raise_hang_or_reward(tiny_chat_model, tmp_path, monkeypatch):
    path = tmp_path / "envs.py"
    source = open(__file__).read()
    path.write_text("import time\n\n" + source[source.index("class Raises:") : source.index("def test_user_environments")])
    action = lambda tok, p: (
        encode(tok, "<tool>go</tool>")
        if "<|tool|>" not in tok.decode(p)  # noqa: E731
        else encode(tok, "done") + [tok.eos_token_id]
    )
    keys = dict(TRUST_REMOTE_CODE=True, ENV_STEP_TIMEOUT=0.5)
    trainer, tok = trainer_with(tiny_chat_model, action, {"type": "python", "path": str(path), "class": "Raises"}, **keys)
    stats = trainer.ppo_update([example(tok)])
    assert stats["env/failed"] == 1.0 and stats["reward/mean"] == 0.0
    trainer, tok = trainer_with(tiny_chat_model, action, {"type": "python", "path": str(path), "class": "Hangs"}, **keys)
    t0 = time.perf_counter()
    (t, _) = trainer.turns.run([example(tok)], n=2)
    assert "ENV_STEP_TIMEOUT=0.5" in t.error and time.perf_counter() - t0 < 5
    assert t.messages[0] == {"role": "system", "content": "Use the tool."}  # reset's messages lead the prompt
    trainer, tok = trainer_with(
        tiny_chat_model, action, {"type": "python", "path": str(path), "class": "Rewards"}, ENV_REWARD_WEIGHT=2.0, **keys
    )
    batch, _, _ = trainer.collector.batch([example(tok)])
    assert [s.score for s in batch.samples] == [0.5, 0.5]  # math scores "done" 0, plus 2 x the step's 0.25


def test_hostile_actions_through_the_code_environment(tiny_chat_model, world):
    """The sandbox's hostile table as actions of a whole rollout: each gets an observation, nothing is harmed."""
    project = ROOT / "sandbox-was-here.txt"
    programs = [
        p.format(out=str(world["out"]), home=str(world["home"]), project=str(project), port=world["port"], mark=MARK) for _, p in HOSTILE
    ] + ["import os\nprint(os.environ.get('HT_SECRET'))"]
    queue = list(programs)

    def script(tok, prompt):
        if "<|tool|>" in tok.decode(prompt)[-400:] or not queue:
            return encode(tok, "done") + [tok.eos_token_id]
        return encode(tok, "```python\n" + queue.pop(0) + "\n```")

    spec = {"type": "code", "timeout": 2.0, "memory_mb": 256, "workers": 4}
    trainer, tok = trainer_with(
        tiny_chat_model, script, spec, NUM_GENERATIONS=len(programs), MAXSEQ=1024, MAX_NEW_TOKENS=400, MAX_OBSERVATION_TOKENS=64
    )
    trajs = trainer.turns.run([example(tok)], n=len(programs))
    observations = [t.messages[2]["content"] for t in trajs]
    assert all(t.actions == 1 and not t.error for t in trajs), [t.error for t in trajs]
    by_case = dict(zip([c for c, _ in HOSTILE] + ["print the secret"], observations))
    assert "timed out" in by_case["infinite loop"] and "printed more than" in by_case["100 MB of output"], by_case
    assert "MemoryError" in by_case["memory bomb"] or "error:" in by_case["memory bomb"]
    assert "s3cret" not in "".join(observations)
    for d in (world["out"], world["home"]):
        assert (d / "keep.txt").read_text() == "keep"
    assert not project.exists() and world["accepted"] == []
    time.sleep(0.5)
    assert leftovers() == []
    assert all(t.prompt_ids + t.ids == rendered_ids(tok, t) for t in trajs)


def test_hf_stop_criterion_looks_at_the_generated_text_only(tiny_chat_model):
    """HFEngine's StopOnText: a row stops once its generated tokens hold the marker; the prompt's own markers (earlier
    turns' actions) do not count."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_chat_model)
    prompt = encode(tok, "<calc>1</calc> done")
    rows = [prompt + encode(tok, "the <calc>2</calc>"), prompt + encode(tok, "the cat sat")]
    width = max(map(len, rows))
    ids = torch.tensor([r + [tok.eos_token_id] * (width - len(r)) for r in rows])
    assert runtime.StopOnText(tok, ["</calc>"], len(prompt))(ids, None).tolist() == [True, False]


def test_code_environment_shows_output_and_tracebacks():
    env = environments.make_environment({"type": "code", "timeout": 3.0}, say=lambda line: None).new({})
    assert env.step("print(6 * 7)") == environments.Step("42")
    failed = env.step("1/0")
    assert failed.error and "ZeroDivisionError" in failed.observation
    assert env.step("x = 1").observation == "(no output)"


# ---- SFT on tool demonstrations ----
def test_sft_trains_acting_turns_and_masks_observations(tiny_chat_model):
    cfg = ht.Config.from_dict(
        {"MODE": "sft", "MODEL": str(tiny_chat_model), "TRAIN_FILE": "-", "OUTPUT_DIR": "-", "ENVIRONMENT": {"type": "calculator"}}
    )
    _, _, tok = ht.load_model(cfg, torch.device("cpu"))
    row = {
        "messages": [
            {"role": "user", "content": "What is 12 * 3?"},
            {"role": "assistant", "content": "<calc>12*3</calc>"},
            {"role": "tool", "content": "36"},
            {"role": "assistant", "content": "The answer is 36."},
        ],
        "answer": "36",
    }
    (ex,) = ht.tokenize_examples(ht.make_examples([row], "output", "TRAIN_FILE", data_format="messages"), cfg, tok, "chat", "TRAIN_FILE")
    assert ex.prompt == "<|user|>What is 12 * 3?<|end|><|assistant|>"  # the rollout starts at the question
    (p1, t1), (p2, t2) = ex.sft_pairs
    assert tok.decode(t1) == "<calc>12*3</calc><|end|>" and tok.decode(t2) == "The answer is 36.<|end|>"
    assert tok.decode(p2).endswith("<|tool|>36<|end|><|assistant|>")  # the observation is prompt: no loss on it


# ---- the CLI: the tiny model with each environment ----
def agent_config(tmp_path, model, **keys):
    return {
        "MODE": "ppo",
        "MODEL": str(model),
        "TRAIN_FILE": str(ROOT / "data" / "tool_train.json"),
        "NUM_SAMPLES": 4,
        "OUTPUT_DIR": str(tmp_path / "out"),
        "REWARD": {"type": "math"},
        "ENVIRONMENT": {"type": "calculator"},
        "ADVANTAGE": "grpo",
        "NUM_GENERATIONS": 2,
        "PPO_BATCH": 2,
        "PPO_EPOCHS": 1,
        "MAX_NEW_TOKENS": 24,
        "MAXSEQ": 384,
        "MAX_TURNS": 2,
        "TEMPERATURE": 1.0,
        "TOP_P": 1.0,
        "NO_REPEAT_NGRAM_SIZE": 0,
        "REPETITION_PENALTY": 1.0,
        "SEED": 0,
        "LOG_EVERY": 1,
        **keys,
    }


@pytest.mark.parametrize(
    "env, backend", [({"type": "calculator"}, "hf"), ({"type": "calculator"}, "vllm"), ({"type": "code", "timeout": 2.0}, "hf")]
)
def test_cli_runs_with_an_environment(tmp_path, tiny_chat_model, env, backend):
    """The tiny model, untrained, rarely acts: one scripted-free run checks the wiring end to end (metrics, the
    evaluation's env metrics and the report's whole trajectory), on each engine."""
    keys = dict(ENVIRONMENT=env, GENERATION_BACKEND=backend, CATEGORY_FIELD="category")
    evaluated = env["type"] == "calculator"  # the code environment's run: the wiring only (its actions: the hostile test)
    if evaluated:  # markers the tiny model writes often: it acts, and the calculator answers
        keys.update(EVAL_FILE=str(ROOT / "data" / "tool_eval.json"), EVAL_SAMPLES=2, EVAL_NUM_SAMPLES=2, **ACTS)
    if backend == "vllm":
        keys.update(VLLM_KV_CACHE_GB=0.25, BF16=False)
    run_cli(agent_config(tmp_path, tiny_chat_model, **keys), tmp_path)
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    ppo = [r for r in records if "env/turns" in r]
    assert len(ppo) == 2 and all("time/env_s" in r for r in ppo)
    if evaluated:  # some trajectory acted and was answered (a second turn), none past MAX_TURNS
        assert any(r["env/actions"] > 0 for r in ppo) and any(r["env/turns"] > 1 for r in ppo), ppo
        assert all(r["env/turns"] <= 2 for r in ppo)
    else:  # the untrained model writes no fenced code block: one turn each, no action
        assert all(r["env/turns"] == 1 and r["env/actions"] == 0 for r in ppo), ppo
    if evaluated:
        evals = [r for r in records if r.get("phase") == "eval"]
        assert len(evals) == 2 and all("eval/turns" in r and "eval/action_error_rate" in r for r in evals)
        assert "## One whole trajectory" in (tmp_path / "out" / "report.md").read_text()
    if backend == "vllm":
        assert all("rollout/logprob_abs_diff" in r and r["rollout/logprob_abs_diff"] < 1e-3 for r in ppo)


# ---- processes, resume, hybrids ----
def test_one_process_equals_two_on_trajectories(tiny_chat_model, tmp_path):

    helper = ROOT / "tests" / "dist_helper.py"
    one = subprocess.run(
        [sys.executable, str(helper), "trajectories", str(tiny_chat_model), str(tmp_path / "one.st")],
        capture_output=True,
        text=True,
        env=ENV,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    two = torchrun([helper, "trajectories", tiny_chat_model, tmp_path / "two.st"])
    assert max_diff(tmp_path / "one.st", tmp_path / "two.st") <= 1e-6
    line = one.stdout.splitlines()[-1]
    assert line == two.stdout.splitlines()[-1] and '"env/actions": 0.5' in line and '"reward/mean": 0.5' in line, line


# markers the untrained tiny model writes often ("on" and "tion" are merged tokens of its BPE; "t" then " " was rare
# enough on an AMD EPYC that a whole run never acted): its trajectories act in most turns
ACTS = {"ACTION_FORMAT": {"open": "o", "close": "n"}}


def test_resume_with_an_environment_after_sigkill(tiny_chat_model, tmp_path):
    base = agent_config(
        tmp_path,
        tiny_chat_model,
        **ACTS,
        NUM_SAMPLES=6,
        PPO_BATCH=2,
        SAVE_EVERY=1,
        MAX_TURNS=3,
        MAX_NEW_TOKENS=16,
        LR_PPO=1e-3,
        KEEP_CHECKPOINTS=5,
    )
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run_cli({**base, "OUTPUT_DIR": str(straight)}, tmp_path)
    assert any(r["env/actions"] > 0 for r in metrics(straight) if "env/actions" in r)  # trajectories act
    path = tmp_path / "killed.json"
    path.write_text(json.dumps({**base, "OUTPUT_DIR": str(killed)}))
    sigkill_at_checkpoint(
        [sys.executable, ROOT / "hybrid_trainer.py", path], killed, 2, {**os.environ, "HF_HUB_OFFLINE": "1"}
    )  # as run_cli's runs (the same threads)
    assert not (killed / "inference_lm").exists(), "the run finished before it could be killed"
    resumed = run_cli({**base, "OUTPUT_DIR": str(killed)}, tmp_path)
    assert "resuming from" in resumed.stdout
    assert comparable(metrics(killed)) == comparable(metrics(straight))
    assert max_diff(straight / "inference_lm/model.safetensors", killed / "inference_lm/model.safetensors") <= 1e-6


@pytest.mark.parametrize("hybrid", ["alternate", "gate", "mix"])
def test_hybrids_with_an_environment(tiny_chat_model, tmp_path, hybrid):
    """SFT on the tool demonstrations (their acting turns) and RL through the environment in one run; with
    DYNAMIC_SAMPLING for alternate, MASK_TRUNCATED for gate, LoRA for mix."""
    keys = {
        "alternate": {"DYNAMIC_SAMPLING": True},
        "gate": {"GATE_THRESHOLD": 1.0, "MASK_TRUNCATED": True},
        "mix": {"MIX_COEF": 0.5, "LORA_R": 4},
    }[hybrid]
    cfg = agent_config(
        tmp_path, tiny_chat_model, **ACTS, MODE="hybrid", HYBRID=hybrid, SFT_BATCH=2, NUM_SAMPLES=2, MAX_NEW_TOKENS=16, **keys
    )
    run_cli(cfg, tmp_path)
    records = metrics(tmp_path / "out")
    assert any("env/turns" in r for r in records)
    if hybrid == "alternate":  # SFT steps of their own
        assert any("sft/loss" in r for r in records)
    else:  # SFT inside the updates: gate (no response reaches 1.0) and mix send prompts to it
        assert any(r.get("hybrid/sft_prompts", 0) > 0 for r in records)


TOOL_CALL = {"name": "calculator", "arguments": {"expression": "347*29"}}


@pytest.mark.parametrize("family", ["qwen2_5", "qwen3", "llama3_1"])
def test_tool_calls_by_each_familys_own_template(family, tmp_path):
    """ACTION_FORMAT "tool_call" on each family whose template has tools: Qwen's <tool_call> markers (Qwen3 through
    trl's prefix-preserving training template, its reasoning kept in earlier turns), Llama 3.1's bare JSON with
    "parameters". The call is parsed, the result is the template's tool turn, a malformed call is an error
    observation counted in parse_errors, and the buffer equals the template's rendering of the conversation."""
    from conftest import build_family_model
    from transformers import AutoTokenizer, GenerationConfig

    model = build_family_model(tmp_path / family, family)
    tok = AutoTokenizer.from_pretrained(model)
    cfg = ht.Config.from_dict(
        {
            "TRAIN_FILE": "-",
            "OUTPUT_DIR": "-",
            "MODEL": str(model),
            "ENVIRONMENT": {"type": "calculator"},
            "ACTION_FORMAT": "tool_call",
            "MAX_NEW_TOKENS": 512,
        }
    )
    env = environments.make_environment({"type": "calculator"})
    chat = runtime.make_chat(cfg, tok, runtime.stop_token_ids(tok, GenerationConfig.from_pretrained(model)), tools=True)
    assert ("chat_template" in chat.options) == (family == "qwen3")  # Qwen3's own drops earlier turns' reasoning
    loop = ht.TurnLoop(cfg, ht.api_plan(cfg, 1), None, tok, env, chat)
    think = "<think>\nI will call it\n</think>\n\n" if family == "qwen3" else ""
    if family == "llama3_1":
        calls = [json.dumps({"name": "calculator", "parameters": TOOL_CALL["arguments"]}), '{"name": "calculator", "parameters": 5}']
    else:
        calls = [f"<tool_call>\n{json.dumps(TOOL_CALL)}\n</tool_call>", "<tool_call>\nnot json\n</tool_call>"]
    turns = [think + calls[0], think + calls[1], ("<think>\n\n</think>\n\n" if think else "") + "#### 10063"]

    def script(prompt):
        return encode(tok, turns[min(tok.decode(prompt).count("10063") + tok.decode(prompt).count("error:"), 2)]) + [tok.eos_token_id]

    engine = ScriptedEngine(tok, script, overshoot=0)
    loop.generate = lambda prompts, **kw: engine.generate(prompts, **kw)
    messages = [{"role": "user", "content": "What is 347 * 29?"}]
    ex = ht.Example(index=0, item={"answer": "10063"}, target="10063", messages=messages, question="q")
    ex.prompt_ids = chat.ids(messages, tools=[env.tool_schema])
    (t,) = loop.run([ex], n=1)
    assert [m["role"] for m in t.messages][-5:] == ["assistant", "tool", "assistant", "tool", "assistant"]
    assert t.messages[-4]["content"] == "10063" and t.messages[-2]["content"].startswith("error:")
    assert (t.actions, t.action_errors, t.parse_errors) == (2, 1, 1) and ht.env_metrics([t.stats()])["env/parse_errors"] == 1
    rendered = chat.ids(t.messages, generation_prompt=False, tools=[env.tool_schema])
    rendered = rendered[: max(i for i, x in enumerate(rendered) if x in chat.stops) + 1]
    assert t.prompt_ids + t.ids == rendered, (tok.decode(t.prompt_ids + t.ids), tok.decode(rendered))


def test_tool_call_on_a_template_without_tools_is_one_error(tmp_path):
    from conftest import build_family_model
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(build_family_model(tmp_path / "gemma3", "gemma3"))
    cfg = ht.Config.from_dict({"TRAIN_FILE": "-", "OUTPUT_DIR": "-", "ENVIRONMENT": {"type": "calculator"}, "ACTION_FORMAT": "tool_call"})
    with pytest.raises(runtime.UserError, match="renders no tool calls"):
        ht.TurnLoop(cfg, ht.api_plan(cfg, 1), None, tok, environments.make_environment({"type": "calculator"}))
