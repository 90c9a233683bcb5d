"""The tasks and environments users already have: reasoning-gym's generators and scorers as TRAIN_FILE / EVAL_FILE and
REWARD, TRL's environment classes unchanged, CURRICULUM, and DYNAMIC_SAMPLING on pass/fail."""

import json
import shutil

import pytest
import torch
from conftest import EXACT_PPO, comparable, metrics, run_cli
from test_agents import ScriptedEngine, encode

import environments
import hybrid_trainer as ht
import rewards
import runtime

SUMS = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}  # chain_sum's 1-digit sums: few distinct questions


def items(key: str, config: dict, train: str = "reasoning_gym:chain_sum") -> list:
    return runtime.task_items(train if key == "TRAIN_FILE" else "reasoning_gym:chain_sum", config, key, train)


def test_generated_rows_are_reproducible_and_the_held_out_set_is_disjoint():
    config = {"size": 60, "eval_size": 20, "seed": 5, **SUMS}
    train, again = items("TRAIN_FILE", config), items("TRAIN_FILE", config)
    assert train == again and len(train) == 60  # same seed, same rows
    assert items("TRAIN_FILE", {**config, "seed": 6}) != train
    row = train[0]
    assert row["prompt"][-1]["role"] == "user" and row["metadata"]["source_dataset"] == "chain_sum" and row["task"] == "chain_sum"
    held = items("EVAL_FILE", config)
    asked = {r["prompt"][-1]["content"] for r in train}
    assert len(held) == 20 and not asked & {r["prompt"][-1]["content"] for r in held}
    # with 1-digit sums the held-out seeds alone would repeat training questions: the check above needs the filter
    task = runtime.make_task("reasoning_gym:chain_sum", config, "EVAL_FILE")
    unfiltered = runtime.task_rows(task, "EVAL_FILE", held_out=True)
    assert asked & {r["prompt"][-1]["content"] for r in unfiltered}


def test_levels_and_system_prompts():
    task = runtime.make_task("reasoning_gym:chain_sum", {"size": 8, "level": 2, "system_prompt": "direct"}, "TRAIN_FILE")
    fields = runtime.task_fields(task, 2)
    assert (fields["min_terms"], fields["max_terms"], fields["max_digits"]) == (2, 4, 3)  # reasoning-gym's inclusive ranges
    assert runtime.task_fields(task, 2, "upper_bound")["min_terms"] == 4
    assert runtime.task_levels(task, "TRAIN_FILE") == 11
    rows = runtime.task_rows(task, "TRAIN_FILE")
    assert rows[0]["prompt"][0]["role"] == "system" and "<answer>" in rows[0]["prompt"][0]["content"]
    assert all(2 <= r["metadata"]["num_terms"] <= 4 for r in rows)
    assert runtime.task_rows(task, "TRAIN_FILE", level=0) != rows  # each level has rows of its own


def test_the_reward_is_the_tasks_own_scorer_on_the_extracted_answer():
    import reasoning_gym as rg

    row = items("TRAIN_FILE", {"size": 1, "seed": 1, **SUMS})[0]
    gold = row["completion"]
    fn = rewards.make_reward({"type": "reasoning_gym"})
    responses = [
        f"The answer is {gold}.",
        f"<think>add</think> <answer>{gold}</answer>",
        f"so {gold}",  # last_number: the gold answer is a number
        f"\\boxed{{{gold}}}",
        str(int(gold) + 1),
        "no idea",
    ]
    assert fn.scores(responses, [gold] * 6, [""] * 6, [row] * 6) == [1.0, 1.0, 1.0, 1.0, 0.0, 0.0]
    # a task whose answer is a word: no last_number, and the scorer's own partial credit on the whole response
    word = runtime.task_rows(runtime.make_task("reasoning_gym:caesar_cipher", {"size": 1}, "TRAIN_FILE"), "TRAIN_FILE")[0]
    entry = {"question": "", "answer": word["completion"], "metadata": word["metadata"]}
    texts = [f"{word['completion']} 3", f"The answer is {word['completion']}", "zzz"]
    expected = [rg.get_score_answer_fn("caesar_cipher")(t, entry) for t in (texts[0], word["completion"], "zzz")]
    assert fn.scores(texts, [word["completion"]] * 3, [""] * 3, [word] * 3) == pytest.approx(expected)
    assert 0 < expected[0] < 1  # the partial credit is reasoning-gym's, not ours


def test_a_composite_of_tasks_with_weights():
    config = {
        "size": 40,
        "seed": 2,
        "datasets": [{"name": "chain_sum", "weight": 1, "config": SUMS}, {"name": "basic_arithmetic", "weight": 3, "config": {}}],
    }
    rows = runtime.task_items("reasoning_gym:composite", config, "TRAIN_FILE", "reasoning_gym:composite")
    tasks = [r["task"] for r in rows]
    assert set(tasks) == {"chain_sum", "basic_arithmetic"} and tasks.count("basic_arithmetic") > tasks.count("chain_sum")
    fn = rewards.make_reward({"type": "reasoning_gym"})
    assert fn.scores([r["completion"] for r in rows], [r["completion"] for r in rows], [""] * 40, rows) == [1.0] * 40


def test_curriculum_rule_by_hand():
    rule = {**ht.CURRICULUM_DEFAULTS, "window": 2, "raise_above": 0.6, "lower_below": 0.2}
    assert ht.curriculum_level(1, [0.9], rule, 5) == 1  # the window is not full yet
    assert ht.curriculum_level(1, [0.5, 0.8], rule, 5) == 2  # mean 0.65 > 0.6
    assert ht.curriculum_level(1, [0.9, 0.2, 0.9], rule, 5) == 1  # the last two: 0.55
    assert ht.curriculum_level(1, [0.1, 0.2], rule, 5) == 0  # 0.15 < 0.2
    assert ht.curriculum_level(4, [1.0, 1.0], rule, 5) == 4 and ht.curriculum_level(0, [0.0, 0.0], rule, 5) == 0  # the ends hold


def task_config(model, out, **keys) -> dict:
    return {
        "MODE": "ppo",
        "MODEL": str(model),
        "TRAIN_FILE": "reasoning_gym:chain_sum",
        "TASK_CONFIG": {"size": 8, "seed": 1},
        "OUTPUT_DIR": str(out),
        "REWARD": {"type": "reasoning_gym"},
        "ADVANTAGE": "grpo",
        "NUM_GENERATIONS": 2,
        "PPO_BATCH": 2,
        "MAX_NEW_TOKENS": 4,
        "SEED": 0,
        "LOG_EVERY": 100,
        **EXACT_PPO,
        **keys,
    }


def test_curriculum_rises_logs_its_level_and_resumes_exactly(tiny_chat_model, tmp_path):
    """EVAL_PASS_SCORE 0: every response passes, so the level rises after each full window; the draws come from the
    level's own rows; a run resumed from a mid-run checkpoint repeats the rest exactly (level, window, draws)."""
    base = task_config(
        tiny_chat_model,
        tmp_path / "straight",
        EPOCHS=2,
        EVAL_PASS_SCORE=0.0,
        CURRICULUM={"window": 2, "start": 1},
        SAVE_EVERY=1,
        KEEP_CHECKPOINTS=10,
        KEEP_CHECKPOINTS_AT_END=True,
    )
    (tmp_path / "c.json").write_text(json.dumps(base))
    assert ht.main([str(tmp_path / "c.json")]) == 0
    full = metrics(tmp_path / "straight")
    assert [r["curriculum/level"] for r in full] == [1, 1, 2, 2, 3, 3, 4, 4]
    assert all(r["reward/pass_rate"] == 1.0 for r in full)
    (tmp_path / "r.json").write_text(
        json.dumps({**base, "OUTPUT_DIR": str(tmp_path / "r"), "RESUME": str(tmp_path / "straight/checkpoints/step-3")})
    )
    assert ht.main([str(tmp_path / "r.json")]) == 0
    assert comparable(metrics(tmp_path / "r")) == comparable(full[3:])
    shutil.rmtree(tmp_path / "straight")


def test_curriculum_draws_the_levels_rows(tiny_chat_model, tmp_path):
    """draw() with CURRICULUM: the prompts of an update are the current level's; a file's "column" orders its levels."""
    cfg = ht.Config.from_dict(task_config(tiny_chat_model, "-", CURRICULUM={"window": 1}))
    tok = ht.load_model(cfg, torch.device("cpu"))[2]
    levels = ht.make_levels(cfg, [], lambda rows: ht.tokenize_examples(rows, cfg, tok, "chat", "TRAIN_FILE"))
    r = ht.Run(cfg, ht.api_plan(cfg, 8), None, [], [], [], {}, tmp_path, None, "chat", levels)
    state = ht.RunState(level=3)
    drawn = ht.draw(r, state, "ppo", 2)
    pool = [e.item for e in levels.pool(3)]
    assert all(e.item in pool for e in drawn) and state.level_drawn == 2 and state.drawn["ppo"] == 2
    assert max(row["metadata"]["num_terms"] for row in pool) > 2 == max(e.item["metadata"]["num_terms"] for e in levels.pool(0))
    assert all(e.prompt_ids for e in drawn)  # tokenized when the level was first drawn
    rows = [{"prompt": f"q{i}", "completion": "a", "hard": h} for i, h in enumerate([2, 0, 1, 0, 2])]
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(rows))
    cfg = ht.Config.from_dict({**task_config(tiny_chat_model, "-"), "TRAIN_FILE": str(path), "CURRICULUM": {"column": "hard"}})
    levels = ht.make_levels(cfg, ht.load_data(cfg, "TRAIN_FILE")[0], lambda rows: rows)
    assert levels.count == 3 and [[e.item["prompt"] for e in levels.pool(k)] for k in range(3)] == [["q1", "q3"], ["q2"], ["q0", "q4"]]


def test_dynamic_sampling_on_pass_or_fail_differs_from_equal_scores():
    """A shaped reward (correct 1 + a format bonus 0.2): a group that all failed still has a spread of scores. By score it
    is kept (a phantom gradient: verl-recipe#125); by pass (EVAL_PASS_SCORE 1) it is dropped, as a group that all passed."""
    groups = [[0.2, 0.0, 0.2, 0.0], [1.2, 1.0, 1.2, 1.2], [1.2, 0.0, 0.2, 1.0], [0.0] * 4]
    collected = ht.Collected(
        examples=[f"p{i}" for i in range(4)],
        samples=[ht.Sample(query=[1], response=[2], ended=True, score=s) for g in groups for s in g],
        sums={},
    )
    assert collected.groups_with_signal(4).examples == ["p0", "p1", "p2"]
    assert collected.groups_with_signal(4, 1.0).examples == ["p2"]


# ---- TRL environment classes, as GRPOTrainer's environment_factory takes them ----
INCREMENT_DOC = '''        """
        Increment the counter.

        Args:
            step: How much to add.

        Returns:
            The counter after the increment.
        """
'''
TRL_ENV = (
    '''
class IncrementEnv:
    """A counter the model raises with its tool (the shape of TRL's environment_factory classes)."""

    def reset(self, **kwargs) -> str | None:
        self.counter = 0
        return " Start at 0."

    def increment(self, step: int) -> int:
'''
    + INCREMENT_DOC
    + """        if step < 0:
            raise ValueError("step must be positive")
        self.counter += step
        return self.counter

    def get_reward(self) -> float:
        return float(self.counter == 3)
"""
)


def trl_env(tmp_path, source=TRL_ENV, cls="IncrementEnv"):
    (tmp_path / "env.py").write_text(source)
    return {"type": "trl", "path": str(tmp_path / "env.py"), "class": cls}


def test_a_trl_environment_class_runs_unchanged_and_token_exact(tmp_path):
    """Qwen2.5's template: the class's method is the tool with TRL's schema, reset's text ends the user turn, a call
    is run on the instance, one that raises is an {'error': ...} observation, get_reward() is added to the score, and
    the buffer is the template's rendering of the conversation."""
    from conftest import build_family_model
    from transformers import AutoTokenizer, GenerationConfig
    from transformers.utils import get_json_schema

    model = build_family_model(tmp_path / "qwen", "qwen2_5")
    tok = AutoTokenizer.from_pretrained(model)
    spec = trl_env(tmp_path)
    keys = {
        "TRAIN_FILE": "-",
        "OUTPUT_DIR": "-",
        "MODEL": str(model),
        "ENVIRONMENT": spec,
        "TRUST_REMOTE_CODE": True,
        "MAX_NEW_TOKENS": 512,
    }
    cfg = ht.Config.from_dict(keys)
    assert cfg.ACTION_FORMAT == "tool_call"  # "auto" for a TRL class: the template's own calls
    env = runtime.build_environment(cfg)
    import importlib.util

    module_spec = importlib.util.spec_from_file_location("env_for_schema", tmp_path / "env.py")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    assert env.tools() == [get_json_schema(module.IncrementEnv().increment)]
    chat = runtime.make_chat(cfg, tok, runtime.stop_token_ids(tok, GenerationConfig.from_pretrained(model)), tools=True)
    loop = ht.TurnLoop(cfg, ht.api_plan(cfg, 1), None, tok, env, chat)
    call = lambda step: f"<tool_call>\n{json.dumps({'name': 'increment', 'arguments': {'step': step}})}\n</tool_call>"  # noqa: E731
    turns = [call(-1), call(3), "#### done"]

    def script(prompt):
        return encode(tok, turns[tok.decode(prompt).count("<tool_response>")]) + [tok.eos_token_id]

    engine = ScriptedEngine(tok, script, overshoot=0)
    loop.generate = lambda prompts, **kw: engine.generate(prompts, **kw)
    messages = [{"role": "user", "content": "Reach 3."}]
    ex = ht.Example(index=0, item={"prompt": messages}, target="", messages=messages, question="q")
    ex.prompt_ids = chat.ids(messages, tools=env.tools())
    (t,) = loop.run([ex], n=1)
    assert t.messages[0]["content"] == "Reach 3. Start at 0."  # reset's text, appended as GRPOTrainer appends it
    observations = [m["content"] for m in t.messages if m["role"] == "tool"]
    assert observations == ["{'error': 'step must be positive'}", "3"] and not t.truncated
    assert (t.actions, t.action_errors, t.env_reward) == (2, 1, 1.0)  # get_reward(): the counter reached 3
    rendered = chat.ids(t.messages, generation_prompt=False, tools=env.tools())
    rendered = rendered[: max(i for i, x in enumerate(rendered) if x in chat.stops) + 1]
    assert t.prompt_ids + t.ids == rendered


def test_a_trl_environment_trains_through_the_cli(tiny_chat_model, tmp_path):
    """REWARD "environment": the score is the class's own (get_reward); a template without tools is refused, so the
    tiny model runs it with the Qwen family's template."""
    from conftest import build_family_model

    model = build_family_model(tmp_path / "qwen", "qwen2_5")
    rows = [{"messages": [{"role": "user", "content": "Reach 3."}]}] * 2
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    out = tmp_path / "out"
    config = {
        **task_config(model, out),
        "TRAIN_FILE": str(tmp_path / "rows.json"),
        "ENVIRONMENT": trl_env(tmp_path),
        "TRUST_REMOTE_CODE": True,
        "REWARD": {"type": "environment"},
        "MAX_NEW_TOKENS": 24,
        "MAX_TURNS": 2,
    }
    del config["TASK_CONFIG"]
    run_cli(config, tmp_path)
    (record,) = metrics(out)
    assert record["reward/mean"] == 0.0 and "env/turns" in record  # a random model never reaches 3


@pytest.mark.parametrize(
    "keys, message",
    [
        ({"TRAIN_FILE": "reasoning_gym:chain_summ"}, "no task 'chain_summ'; close: chain_sum"),
        ({"TASK_CONFIG": {"num_terms": 3}}, "'num_terms' is not a field of reasoning-gym's 'chain_sum'; it takes min_terms"),
        ({"TASK_CONFIG": {"min_terms": 0}}, "refused TASK_CONFIG"),
        ({"TASK_CONFIG": {"size": 0}}, "TASK_CONFIG 'size' must be a whole number"),
        ({"TRAIN_FILE": "reasoning_gym:composite", "CURRICULUM": {"window": 2}, "TASK_CONFIG": {"datasets": []}}, "refused"),
        ({"TRAIN_FILE": "reasoning_gym:gsm_symbolic", "CURRICULUM": {"window": 2}}, "has no curriculum"),
        ({"CURRICULUM": {"windw": 2}}, "unknown field(s) ['windw']"),
        ({"CURRICULUM": {"start": 11}}, "CURRICULUM 'start' 11: the levels are 0 to 10"),
        ({"TASK_CONFIG": {"level": 11}}, "has levels 0 to 10"),
        ({"ENVIRONMENT": {"type": "trl", "path": "env.py", "class": "A"}}, 'type "trl" runs the code'),
        ({"CURRICULUM": {"raise_above": 0.1, "lower_below": 0.5}}, "lower_below < raise_above"),
        ({"MODE": "sft", "CURRICULUM": {"window": 2}}, 'MODE "sft" has none'),
        ({"DYNAMIC_SAMPLING_BY": "passes"}, "DYNAMIC_SAMPLING_BY"),
        ({"REWARD": {"type": "environment"}}, 'REWARD "environment" scores by ENVIRONMENT'),
    ],
)
def test_bad_tasks_and_curricula_are_one_error_line(tiny_chat_model, tmp_path, keys, message):
    proc = run_cli({**task_config(tiny_chat_model, tmp_path / "out"), **keys}, tmp_path, "--check", check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.count("error:") == 1 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_reasoning_gym_not_installed_and_rows_that_are_not_its(monkeypatch, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "reasoning_gym" else real(name, *a))
    with pytest.raises(runtime.UserError, match="reasoning-gym is not installed: pip install reasoning-gym"):
        runtime.make_task("reasoning_gym:chain_sum", {}, "TRAIN_FILE")
    with pytest.raises(rewards.RewardSpecError, match="reasoning_gym needs reasoning-gym"):
        rewards.make_reward({"type": "reasoning_gym"})
    monkeypatch.setattr(importlib.util, "find_spec", real)
    with pytest.raises(rewards.RewardSpecError, match="is not a reasoning-gym row"):
        rewards.make_reward({"type": "reasoning_gym"}, rows=[("TRAIN_FILE 'x.json' row 0", "4", {"answer": "4"})])


@pytest.mark.parametrize(
    "source, message",
    [
        (TRL_ENV.replace("def reset", "def restart"), "has no reset method"),
        (TRL_ENV.replace(INCREMENT_DOC, ""), "tool 'increment'"),
        ("class IncrementEnv:\n    def reset(self, **kwargs):\n        return None\n", "has no public method"),
    ],
)
def test_bad_trl_classes_are_one_error_line(tmp_path, source, message):
    with pytest.raises(environments.EnvSpecError, match=message):
        environments.make_environment(trl_env(tmp_path, source), trust_remote_code=True)
    with pytest.raises(environments.EnvSpecError, match="TRUST_REMOTE_CODE"):
        environments.check_spec(trl_env(tmp_path), trust_remote_code=False)


def test_a_trl_class_rewarded_by_a_method_of_its_own(tmp_path):
    """reward_method names the method that scores a finished trajectory (not a tool); a missing one is an error."""
    source = TRL_ENV.replace("def get_reward(self)", "def solved(self)")
    env_type = environments.make_environment({**trl_env(tmp_path, source), "reward_method": "solved"}, trust_remote_code=True)
    assert [s["function"]["name"] for s in env_type.tools()] == ["increment"]
    env = env_type.new({})
    env.reset({})
    env.step(env_type.parse_call('{"name": "increment", "arguments": {"step": 3}}')[0])
    assert environments.final_reward(env) == (1.0, "")
    assert env_type.parse_call('{"name": "solved", "arguments": {}}')[0] is None  # not a tool
    with pytest.raises(environments.EnvSpecError, match="has no method 'missing'"):
        environments.make_environment({**trl_env(tmp_path, source), "reward_method": "missing"}, trust_remote_code=True)
