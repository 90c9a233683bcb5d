"""The code reward's sandbox against hostile programs. Each program below would pass its test only if its attack
worked (it defines add() correctly only then), so a score of 0 shows the attack failed; each case also checks that
the trainer's files, environment, sockets and processes are as they were. Run with every isolation level this
machine has: bubblewrap namespaces, and the limits-only fallback (full only as root: its own uid and network)."""

import os
import subprocess
import sys
import time

import pytest
from conftest import HOSTILE, MARK, ROOT, leftovers

import rewards

TESTS = ["assert add(1, 2) == 3", "assert add(2, 2) == 4"]


def levels() -> list[str]:
    found = ["namespaces"] if rewards.sandbox_isolation().level == "namespaces" else []
    return found + (["limits"] if os.geteuid() == 0 else [])


def test_this_machine_has_the_full_sandbox():
    """Not parametrised, so it cannot be skipped: the hostile table below runs once per level found, and a machine
    without bubblewrap would quietly run it under limits only. CI installs bubblewrap (.ci/run); so must a developer."""
    where = rewards.sandbox_isolation()
    assert where.level == "namespaces", f"the code sandbox has no namespaces here ({where.detail}): apt install bubblewrap"
    assert "namespaces" in levels()


@pytest.mark.parametrize("level", levels())
def test_hostile_programs_score_zero_and_change_nothing(level, world, monkeypatch):
    monkeypatch.setattr(rewards, "_ISOLATION", rewards.Isolation(level, level))
    project = ROOT / "sandbox-was-here.txt"
    fn = rewards.code(rewards.Context(say=lambda line: None), timeout=2.0, memory_mb=256, max_processes=16, workers=4)
    programs = [
        p.format(out=str(world["out"]), home=str(world["home"]), project=str(project), port=world["port"], mark=MARK) for _, p in HOSTILE
    ]
    start = time.monotonic()
    scores, _, results = fn.score(programs, [""] * len(programs), [""] * len(programs), [{"tests": TESTS}] * len(programs))
    elapsed = time.monotonic() - start
    assert scores == [0.0] * len(HOSTILE), dict(zip([c for c, _ in HOSTILE], scores))
    whys = {case: r.why for (case, _), r in zip(HOSTILE, results)}
    assert "timed out" in whys["infinite loop"] and "printed more than" in whys["100 MB of output"], whys
    assert "s3cret" not in "".join(r.output for r in results)
    for d in (world["out"], world["home"]):
        assert (d / "keep.txt").read_text() == "keep"
    assert not project.exists()
    assert world["accepted"] == [], "a program reached the trainer's socket"
    time.sleep(0.5)
    assert leftovers() == []
    assert subprocess.run(["true"]).returncode == 0  # the trainer can still start processes
    assert elapsed < 30, elapsed


@pytest.mark.parametrize("level", levels())
def test_solutions_score_as_specified(level, monkeypatch):
    monkeypatch.setattr(rewards, "_ISOLATION", rewards.Isolation(level, level))
    item = {"tests": TESTS + ["assert add(-1, 1) == 0", "assert add(10, 5) == 15"]}
    cases = [
        ("def add(a, b):\n    return a + b", 1.0),  # correct
        # a - b: add(1, 2) = -1, add(2, 2) = 0, add(-1, 1) = -2, add(10, 5) = 5: none pass
        ("Here it is:\n```python\ndef add(a, b):\n    return a - b\n```", 0.0),
        ("```python\ndef add(a, b):\n    return 3\n```", 0.25),  # partial: only add(1, 2)
        ("```python\ndef add(a, b): return a + b\n```\nand a faster one:\n```py\ndef add(a, b): return sum((a, b))\n```", 1.0),
        ("def add(a, b):\n    import time\n    time.sleep(10)\n    return a + b", 0.0),  # timeout
        ("def add(a, b) return a + b", 0.0),  # syntax error
        ("print('no function here')", 0.0),
    ]
    fn = rewards.code(rewards.Context(say=lambda line: None), timeout=1.5, workers=3)
    scores = fn([p for p, _ in cases], [""] * len(cases), [""] * len(cases), [item] * len(cases))
    assert scores == [expected for _, expected in cases]
    all_or_nothing = rewards.code(rewards.Context(say=lambda line: None), mode="all", timeout=1.5)
    assert all_or_nothing([cases[0][0], cases[2][0]], ["", ""], ["", ""], [item, item]) == [1.0, 0.0]


def test_one_string_of_tests_and_entry_point(monkeypatch):
    humaneval = {"test": "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(0, 0) == 0\n"}
    fn = rewards.code(rewards.Context(say=lambda line: None), tests_field="test", entry_point="plus", timeout=2.0)
    assert fn(
        ["def plus(a, b): return a + b", "def plus(a, b): return a * b", "def add(a, b): return a + b"], [""] * 3, [""] * 3, [humaneval] * 3
    ) == [1.0, 0.0, 0.0]


def test_code_reward_bad_specs_and_rows():
    ok = {"type": "code"}
    rewards.check_spec(ok)
    for spec, message in [
        ({"type": "code", "timeout": 0}, "timeout must be a number > 0"),
        ({"type": "code", "timeout": -1.5}, "timeout must be a number > 0"),
        ({"type": "code", "memory_mb": 4}, "memory_mb must be an integer >= 16"),
        ({"type": "code", "tests_feild": "x"}, "did you mean 'tests_field'"),
        ({"type": "code", "mode": "some"}, "mode must be one of"),
    ]:
        with pytest.raises(rewards.RewardSpecError, match=message):
            rewards.check_spec(spec)
    ctx = rewards.Context(say=lambda line: None, rows=[("TRAIN_FILE 'd.json' row 3", "x", {"prompt": "p"})])
    with pytest.raises(rewards.RewardSpecError, match="TRAIN_FILE 'd.json' row 3 has no column 'tests'"):
        rewards.make_reward(ok, rows=ctx.rows, say=ctx.say)
    with pytest.raises(rewards.RewardSpecError, match="row 0, column 'tests': expected a list of assertion strings"):
        rewards.make_reward(ok, rows=[("row 0", "x", {"tests": 5})], say=ctx.say)


def test_the_isolation_in_force_is_said():
    lines = []
    rewards.code(rewards.Context(say=lines.append))
    assert len(lines) == 1 and lines[0].startswith("code reward sandbox: ") and "per program 5 s, 512 MB" in lines[0]
    if rewards.sandbox_isolation().level == "namespaces":
        assert "bubblewrap: user, PID, network" in lines[0]


def test_require_refuses_without_namespaces(monkeypatch):
    monkeypatch.setattr(rewards, "_ISOLATION", rewards.Isolation("limits", "resource limits only"))
    with pytest.raises(rewards.RewardSpecError, match='isolation "require" needs bubblewrap namespaces'):
        rewards.code(rewards.Context(say=lambda line: None), isolation="require")


def test_extract_program():
    assert rewards.extract_program("no fences") == "no fences"
    assert rewards.extract_program("a\n```python\nx = 1\n```\nb\n```\ny = 2\n```") == "y = 2\n"
    assert sys.version_info >= (3, 10)


def test_the_code_data_file_scores_its_references_full_marks():
    """data/code.json (what users and the next experiments start from): each reference solution passes all of its row's
    tests in the sandbox, and an empty program passes none."""
    import json

    rows = json.loads((ROOT / "data" / "code.json").read_text())
    reward = rewards.make_reward(
        {"type": "code", "timeout": 3.0, "workers": 4},
        rows=[(f"row {i}", r["completion"], r) for i, r in enumerate(rows)],
        say=lambda line: None,
    )
    assert reward.scores([r["completion"] for r in rows], [""] * len(rows), None, rows) == [1.0] * len(rows)
    assert reward.scores(["pass"] * len(rows), [""] * len(rows), None, rows) == [0.0] * len(rows)
