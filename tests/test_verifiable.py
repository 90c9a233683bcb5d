"""Verifiable rewards: the math reward against math-verify itself and TRL's accuracy_reward, its extraction order,
gold answers checked at load, the timeout (a hung answer) from a thread; think_format and overlong against TRL's
functions; all through make_reward like any other type."""

import threading
import time

import pytest

import rewards


def math_reward(**fields):
    return rewards.make_reward({"type": "math", **fields})


@pytest.mark.parametrize(
    "text, order, expected",
    [
        ("so \\boxed{\\frac{1}{2}} and then \\boxed{7}", None, "7"),  # the last \boxed{}
        ("\\boxed{a_{1} + \\{b\\}}", None, "a_{1} + \\{b\\}"),  # braces balanced
        ("Janet has 3 + 4 = 7 eggs.\n#### 7", None, "7"),  # GSM8K
        ("... so the answer is 1,000. Done", None, "1,000"),
        ("The answer is: $\\frac{3}{4}$", None, "\\frac{3}{4}"),
        ("I think 12 then 15, finally -2.5", None, "-2.5"),  # the last number
        ("no answer here", None, None),
        ("#### 5 but \\boxed{6}", ["hash", "boxed"], "5"),  # the configured order
    ],
)
def test_extraction_order(text, order, expected):
    assert rewards.extract_answer(text, tuple(order or rewards.MATH_EXTRACTORS)) == expected


@pytest.mark.parametrize(
    "response, reference, score",
    [
        ("\\boxed{\\frac{1}{2}}", "0.5", 1.0),
        ("the answer is 1/2", "\\frac{1}{2}", 1.0),
        ("#### 1,000", "1000", 1.0),
        ("so x = 3", "3", 1.0),  # the last number
        ("\\boxed{x = 3}", "3", 1.0),  # an equation's right-hand side
        ("\\boxed{\\{1, 2\\}}", "\\{2, 1\\}", 1.0),  # sets
        ("\\boxed{(1, 2]}", "(1, 2]", 1.0),  # intervals
        ("\\boxed{[1, 2]}", "(1, 2]", 0.0),
        ("\\boxed{41}", "42", 0.0),
        ("no number at all", "42", 0.0),
    ],
)
def test_math_reward_by_hand(response, reference, score):
    assert math_reward().scores([response], [reference]) == [score]


def test_format_score_for_a_parsable_wrong_answer():
    reward = math_reward(format_score=0.1)
    assert reward.scores(["\\boxed{41}", "\\boxed{42}", "nothing"], ["42"] * 3) == [0.1, 1.0, 0.0]


def test_equals_math_verify_and_trl_accuracy_reward():
    """On \\boxed answers: 1.0 exactly when math-verify says so, and when TRL's accuracy_reward does."""
    from math_verify import parse, verify
    from trl.rewards import accuracy_reward

    golds = ["\\frac{1}{3}", "0.25", "\\sqrt{8}", "1000", "\\{1, 2\\}", "(0, 1]", "x^2 + 1", "-7", "3.14", "\\pi"]
    preds = ["\\frac{2}{6}", "\\frac{1}{4}", "2\\sqrt{2}", "1,000", "\\{2, 1\\}", "(0, 1)", "1 + x^2", "7", "3.14", "3.14159"]
    ours = math_reward().scores([f"so \\boxed{{{p}}}" for p in preds], golds)
    theirs = [float(verify(parse(f"${g}$"), parse(f"${p}$"))) for g, p in zip(golds, preds)]
    trl = accuracy_reward([[{"content": f"so \\boxed{{{p}}}"}] for p in preds], [f"${g}$" for g in golds])
    assert ours == theirs == trl, (ours, theirs, trl)
    assert ours == [1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0]


def test_answer_field_and_gsm8k_solutions():
    items = [{"question": "q", "answer": "Half of 8 is 4.\n#### 4"}, {"question": "q", "answer": "#### 10"}]
    reward = math_reward(answer_field="answer")
    assert reward.scores(["it is 4", "\\boxed{10}"], ["(a worked solution)"] * 2, None, items) == [1.0, 1.0]


def test_gold_answer_that_cannot_be_parsed_is_an_error_at_load():
    rows = [("TRAIN_FILE 'm.json' row 0", "#### 4", {}), ("TRAIN_FILE 'm.json' row 1", "Paris is the capital.", {})]
    with pytest.raises(rewards.RewardSpecError, match="TRAIN_FILE 'm.json' row 1: the gold answer"):
        rewards.make_reward({"type": "math"}, rows=rows)
    rows = [("TRAIN_FILE 'm.json' row 7", "x", {"other": 1})]
    with pytest.raises(rewards.RewardSpecError, match="row 7: no gold answer in column 'answer'"):
        rewards.make_reward({"type": "math", "answer_field": "answer"}, rows=rows)


def test_bad_math_specs():
    for spec, message in [
        ({"type": "math", "timeout": 0}, "timeout must be a number > 0"),
        ({"type": "math", "extract": ["boxd"]}, "extract must be a non-empty list of"),
        ({"type": "math", "workers": 0}, "workers must be an integer >= 1"),
        ({"type": "math", "answer": "x"}, "unknown field 'answer'"),
    ]:
        with pytest.raises(rewards.RewardSpecError, match=message):
            rewards.make_reward(spec)


def test_a_hung_answer_times_out_off_the_main_thread():
    """10^(10^(10^10)) = 5 never finishes in sympy: scored wrong after the timeout, from a worker thread, and the
    next answers still score."""
    reward = math_reward(timeout=1.0)
    out = {}

    def score():
        start = time.monotonic()
        out["scores"] = reward.scores(["\\boxed{10^{10^{10^{10}}}}", "\\boxed{\\frac{10}{2}}"], ["5", "5"])
        out["seconds"] = time.monotonic() - start

    thread = threading.Thread(target=score)
    thread.start()
    thread.join(60)
    assert out["scores"] == [0.0, 1.0] and out["seconds"] < 15, out


def test_majority_vote_helpers():
    fn = rewards.REWARDS["math"](rewards.Context())
    assert fn.answer("so \\boxed{12}") == "12" and fn.same("0.5", "\\frac{1}{2}") and not fn.same("1", "2")


@pytest.mark.parametrize(
    "text",
    [
        "<think>\nreasoning\n</think>\nThe answer is 4.",
        "<think>a</think>4",
        "no tags",
        "<think>a</think><think>b</think>4",
        "answer first <think>a</think>",
        "<think>\nunclosed",
        "<think></think>",
        "<think>x</think>\n",
    ],
)
def test_think_format_equals_trl(text):
    from trl.rewards import think_format_reward

    assert rewards.make_reward({"type": "think_format"}).scores([text], [""]) == think_format_reward([[{"content": text}]])
    custom = rewards.make_reward({"type": "think_format", "open": "<reasoning>", "close": "</reasoning>"})
    swapped = text.replace("<think>", "<reasoning>").replace("</think>", "</reasoning>")
    assert custom.scores([swapped], [""]) == think_format_reward([[{"content": text}]])


class WordTokenizer:
    """A tokenizer stand-in: one token per word."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": text.split()}


def test_overlong_equals_trl_soft_punishment():
    from trl.rewards import get_soft_overlong_punishment

    reward = rewards.make_reward({"type": "overlong", "max_length": 20, "buffer": 5}, tokenizer=WordTokenizer())
    lengths = [0, 10, 15, 16, 18, 20, 21, 40]
    ours = reward.scores([" ".join(["w"] * n) for n in lengths], [""] * len(lengths))
    trl = get_soft_overlong_punishment(max_completion_len=20, soft_punish_cache=5)([[0] * n for n in lengths])
    assert ours == pytest.approx(trl)
    assert ours == pytest.approx([0, 0, 0, -0.2, -0.6, -1.0, -1.0, -1.0])
    with pytest.raises(rewards.RewardSpecError, match="buffer \\(30\\) must not exceed max_length \\(20\\)"):
        rewards.make_reward({"type": "overlong", "max_length": 20, "buffer": 30}, tokenizer=WordTokenizer())
    with pytest.raises(rewards.RewardSpecError, match='needs "max_length"'):
        rewards.make_reward({"type": "overlong"}, tokenizer=WordTokenizer())
    with pytest.raises(rewards.RewardSpecError, match="trainer's tokenizer"):
        rewards.make_reward({"type": "overlong", "max_length": 20})


def test_the_math_data_files_have_parsable_gold_answers_that_match_their_answer_column():
    import json
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "data"
    rows = [r for name in ("math_train.json", "math_eval.json") for r in json.loads((root / name).read_text())]
    reward = rewards.make_reward({"type": "math"}, rows=[(f"row {i}", r["completion"], r) for i, r in enumerate(rows)])
    assert reward.scores([f"so \\boxed{{{r['answer']}}}" for r in rows], [r["completion"] for r in rows], None, rows) == [1.0] * len(rows)
