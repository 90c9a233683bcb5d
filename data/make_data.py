#!/usr/bin/env python3
"""Generate the data files. Deterministic: `python data/make_data.py` rewrites the same files.

- train.json (300) and eval.json (60): the demo, instruction -> short exact answer. Templated factual,
  arithmetic, formatting and rewriting tasks whose references are exact, so BLEU, ROUGE, chrF and exact match
  measure real progress. Train and eval use disjoint facts and numbers.
- math_train.json (400) and math_eval.json (100): grade-school arithmetic word problems for the math reward
  (RLVR), in the prompt-completion format: the question as a chat prompt, a short worked solution ending in
  `#### <answer>` as the completion, the answer, and a category (neither is part of the prompt). One- and
  two-step problems with numbers up to 9; the held-out problems use other names and things.
- code.json (12): small Python functions with assertion tests, for the code reward (`tests`, `entry_point`).
- tool_train.json (400) and tool_eval.json (100): arithmetic a 135M model cannot do in its head (3-digit x 2-digit
  products, sums of three numbers, a product minus a number), as tool-use conversations for the calculator
  environment: question, <calc> call, result, answer after ####; direct_train.json / direct_eval.json hold the same
  problems answered without the tool (the no-tool baseline).
"""

import json
import random
from pathlib import Path

CAPITALS = {
    "France": "Paris",
    "Germany": "Berlin",
    "Italy": "Rome",
    "Spain": "Madrid",
    "Portugal": "Lisbon",
    "Japan": "Tokyo",
    "China": "Beijing",
    "India": "New Delhi",
    "Russia": "Moscow",
    "Egypt": "Cairo",
    "Kenya": "Nairobi",
    "Canada": "Ottawa",
    "Mexico": "Mexico City",
    "Brazil": "Brasilia",
    "Peru": "Lima",
    "Chile": "Santiago",
    "Argentina": "Buenos Aires",
    "Australia": "Canberra",
    "Norway": "Oslo",
    "Sweden": "Stockholm",
    "Finland": "Helsinki",
    "Denmark": "Copenhagen",
    "Poland": "Warsaw",
    "Greece": "Athens",
    "Turkey": "Ankara",
    "Ireland": "Dublin",
    "Austria": "Vienna",
    "Hungary": "Budapest",
    "Belgium": "Brussels",
    "Netherlands": "Amsterdam",
    "Switzerland": "Bern",
    "Thailand": "Bangkok",
    "Vietnam": "Hanoi",
    "South Korea": "Seoul",
    "Indonesia": "Jakarta",
    "Iran": "Tehran",
    "Iraq": "Baghdad",
    "Cuba": "Havana",
    "Colombia": "Bogota",
    "Nigeria": "Abuja",
    "Ghana": "Accra",
    "Morocco": "Rabat",
    "Ukraine": "Kyiv",
    "Czechia": "Prague",
    "Romania": "Bucharest",
    "Bulgaria": "Sofia",
    "Serbia": "Belgrade",
    "Croatia": "Zagreb",
    "Iceland": "Reykjavik",
    "New Zealand": "Wellington",
}
WORDS = [
    "apple",
    "river",
    "garden",
    "window",
    "planet",
    "silver",
    "orange",
    "winter",
    "forest",
    "rocket",
    "candle",
    "bridge",
    "market",
    "pencil",
    "castle",
    "dragon",
    "violet",
    "harbor",
    "meadow",
    "puzzle",
    "jacket",
    "island",
    "mirror",
    "thunder",
    "lantern",
    "velvet",
    "falcon",
    "cobalt",
    "saddle",
    "tunnel",
]
OPPOSITES = {
    "hot": "cold",
    "big": "small",
    "fast": "slow",
    "up": "down",
    "happy": "sad",
    "light": "dark",
    "early": "late",
    "open": "closed",
    "full": "empty",
    "strong": "weak",
    "old": "new",
    "high": "low",
    "rich": "poor",
    "hard": "soft",
    "wet": "dry",
    "loud": "quiet",
    "long": "short",
    "near": "far",
    "thick": "thin",
    "clean": "dirty",
}


def tasks(rng: random.Random, countries, words, opposites, numbers):
    """Yield (category, instruction, output) triples drawn from the given facts."""
    kinds = ["capital", "add", "times", "upper", "reverse", "opposite", "letters", "sort"]
    while True:
        kind = rng.choice(kinds)
        if kind == "capital":
            c = rng.choice(countries)
            yield kind, f"What is the capital of {c}? Answer with the city name only.", CAPITALS[c]
        elif kind == "add":
            a, b = rng.choice(numbers), rng.choice(numbers)
            yield kind, f"What is {a} + {b}? Answer with the number only.", str(a + b)
        elif kind == "times":
            a, b = rng.randint(2, 12), rng.choice(numbers) % 13 + 2
            yield kind, f"What is {a} times {b}? Answer with the number only.", str(a * b)
        elif kind == "upper":
            w = rng.choice(words)
            yield kind, f"Write the word '{w}' in capital letters.", w.upper()
        elif kind == "reverse":
            ws = rng.sample(words, 3)
            yield kind, f"Reverse the order of these words: {' '.join(ws)}", " ".join(reversed(ws))
        elif kind == "opposite":
            w = rng.choice(opposites)
            yield kind, f"What is the opposite of '{w}'? Answer with one word.", OPPOSITES[w]
        elif kind == "letters":
            w = rng.choice(words)
            yield kind, f"How many letters are in the word '{w}'? Answer with the number only.", str(len(w))
        else:
            ws = rng.sample(words, 3)
            yield kind, f"Sort these words alphabetically: {', '.join(ws)}", ", ".join(sorted(ws))


def build(n: int, seed: int, countries, words, opposites, numbers, seen=frozenset()):
    rng, items, keys = random.Random(seed), [], set(seen)
    for kind, instruction, output in tasks(rng, countries, words, opposites, numbers):
        if instruction not in keys:
            keys.add(instruction)
            items.append({"instruction": instruction, "output": output, "category": kind})
        if len(items) == n:
            return items


NAMES = [
    "Ava",
    "Ben",
    "Cleo",
    "Dan",
    "Eva",
    "Finn",
    "Gus",
    "Hana",
    "Ivan",
    "Jade",
    "Kai",
    "Lena",
    "Milo",
    "Nora",
    "Omar",
    "Pia",
    "Quinn",
    "Rosa",
    "Sam",
    "Tara",
]
THINGS = [
    "apples",
    "pencils",
    "stickers",
    "marbles",
    "cookies",
    "books",
    "stamps",
    "shells",
    "cards",
    "balloons",
    "buttons",
    "candles",
    "eggs",
    "flowers",
    "coins",
    "toys",
]


def math_problem(rng: random.Random, names, things, low: int, high: int) -> dict:
    """One word problem: {question, solution (worked, ending in #### answer), answer, category}."""
    kind = rng.choice(["add", "subtract", "multiply", "divide", "two_step", "compare"])
    name, thing = rng.choice(names), rng.choice(things)
    a, b = rng.randint(low, high), rng.randint(2, 9)
    if kind == "add":
        q, steps, answer = (
            f"{name} has {a} {thing}. {name} gets {b} more. How many {thing} does {name} have now?",
            f"{a} + {b} = {a + b}",
            a + b,
        )
    elif kind == "subtract":
        q, steps, answer = (f"{name} had {a + b} {thing} and gave away {b}. How many {thing} are left?", f"{a + b} - {b} = {a}", a)
    elif kind == "multiply":
        q, steps, answer = (f"Each bag holds {b} {thing}. How many {thing} are in {a} bags?", f"{a} * {b} = {a * b}", a * b)
    elif kind == "divide":
        q, steps, answer = (
            f"{name} shares {a * b} {thing} equally among {b} friends. How many {thing} does each friend get?",
            f"{a * b} / {b} = {a}",
            a,
        )
    elif kind == "two_step":
        c = rng.randint(1, a * b - 1)
        q, steps, answer = (
            f"{name} buys {a} boxes of {b} {thing} and gives away {c}. How many {thing} does {name} keep?",
            f"{a} * {b} = {a * b}, and {a * b} - {c} = {a * b - c}",
            a * b - c,
        )
    else:
        other = rng.choice([n for n in names if n != name])
        q, steps, answer = (
            f"{name} has {a + b} {thing} and {other} has {a}. How many more {thing} does {name} have?",
            f"{a + b} - {a} = {b}",
            b,
        )
    return {
        "prompt": [{"role": "user", "content": f"{q} {MATH_ASK}"}],
        "completion": f"{steps}.\n#### {answer}",
        "answer": str(answer),
        "category": kind,
    }


MATH_ASK = "Show the calculation, then give the final answer after ####."


def math_set(n: int, seed: int, names, things, low: int, high: int, seen=frozenset()) -> list:
    rng, items, keys = random.Random(seed), [], set(seen)
    while len(items) < n:
        item = math_problem(rng, names, things, low, high)
        if item["prompt"][0]["content"] not in keys:
            keys.add(item["prompt"][0]["content"])
            items.append(item)
    return items


CODE = [  # (entry point, prompt, tests)
    ("add", "Write a Python function add(a, b) that returns the sum of a and b.", ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"]),
    (
        "is_even",
        "Write a Python function is_even(n) that returns True when n is even.",
        ["assert is_even(4) is True", "assert is_even(7) is False", "assert is_even(0) is True"],
    ),
    (
        "reverse",
        "Write a Python function reverse(s) that returns the string s reversed.",
        ["assert reverse('abc') == 'cba'", "assert reverse('') == ''"],
    ),
    (
        "maximum",
        "Write a Python function maximum(xs) that returns the largest number in the list xs.",
        ["assert maximum([1, 5, 3]) == 5", "assert maximum([-2, -7]) == -2"],
    ),
    (
        "count_vowels",
        "Write a Python function count_vowels(s) that counts the vowels (a, e, i, o, u) in s.",
        ["assert count_vowels('hello') == 2", "assert count_vowels('sky') == 0", "assert count_vowels('AEIOU'.lower()) == 5"],
    ),
    (
        "factorial",
        "Write a Python function factorial(n) that returns n! for n >= 0.",
        ["assert factorial(0) == 1", "assert factorial(5) == 120"],
    ),
    (
        "square_all",
        "Write a Python function square_all(xs) that returns a list of the squares of xs.",
        ["assert square_all([1, 2, 3]) == [1, 4, 9]", "assert square_all([]) == []"],
    ),
    (
        "first_word",
        "Write a Python function first_word(s) that returns the first word of the sentence s.",
        ["assert first_word('hello big world') == 'hello'", "assert first_word('one') == 'one'"],
    ),
    (
        "sum_list",
        "Write a Python function sum_list(xs) that returns the sum of the numbers in xs.",
        ["assert sum_list([1, 2, 3]) == 6", "assert sum_list([]) == 0"],
    ),
    (
        "is_palindrome",
        "Write a Python function is_palindrome(s) that returns True when s reads the same backwards.",
        ["assert is_palindrome('level') is True", "assert is_palindrome('abc') is False"],
    ),
    (
        "fizz",
        "Write a Python function fizz(n) that returns 'Fizz' when n is divisible by 3, else str(n).",
        ["assert fizz(9) == 'Fizz'", "assert fizz(4) == '4'"],
    ),
    (
        "average",
        "Write a Python function average(xs) that returns the mean of a non-empty list of numbers.",
        ["assert average([2, 4]) == 3", "assert average([5]) == 5"],
    ),
]


CODE_SOLUTIONS = [
    "def add(a, b):\n    return a + b",
    "def is_even(n):\n    return n % 2 == 0",
    "def reverse(s):\n    return s[::-1]",
    "def maximum(xs):\n    return max(xs)",
    "def count_vowels(s):\n    return sum(c in 'aeiou' for c in s)",
    "def factorial(n):\n    return 1 if n == 0 else n * factorial(n - 1)",
    "def square_all(xs):\n    return [x * x for x in xs]",
    "def first_word(s):\n    return s.split()[0]",
    "def sum_list(xs):\n    return sum(xs)",
    "def is_palindrome(s):\n    return s == s[::-1]",
    "def fizz(n):\n    return 'Fizz' if n % 3 == 0 else str(n)",
    "def average(xs):\n    return sum(xs) / len(xs)",
]


CHAIN_MOVES = [
    ("finds {n} more", "+"),
    ("gets {n} more", "+"),
    ("loses {n}", "-"),
    ("gives away {n}", "-"),
    ("buys {n} more", "+"),
    ("sells {n}", "-"),
]


BARE_FORMS = (
    "What is {e}?",
    "Compute {e}.",
    "Calculate {e}.",
    "{e} = ?",
    "Work out {e}.",
    "Find {e}.",
    "Evaluate {e}.",
    "What does {e} equal?",
    "What is the value of {e}?",
    "Tell me {e}.",
    "How much is {e}?",
    "Give {e}.",
)
CHAIN_SHOT = "For example: What is 6 + 3 - 4? 6 + 3 = 9, 9 - 4 = 5.\n#### 5\n\nNow: "  # one worked example before the question


def chain_problem(
    rng: random.Random,
    names,
    things,
    steps: int,
    high: int = 9,
    words: bool = True,
    ask: str = "",
    shot: bool = False,
    start_high: int = 0,
    forms=BARE_FORMS[:1],
) -> dict:
    """One problem of the chain family, whose difficulty knob is `steps`, the number of additions and subtractions
    (numbers 1..high, the first one 2..start_high if given; every partial result stays positive): a word problem ("Ava
    has 5 shells. Ava finds 3 more, then gives away 2. How many shells does Ava have now?"), or the bare sum in one of
    `forms` (words False). The worked solution does one operation per step and ends in `#### <answer>`. ask: the
    instruction after the question (default MATH_ASK); shot: one worked example (CHAIN_SHOT) before the question, as
    few-shot prompts do (GSM8K's 8-shot)."""
    name, thing = rng.choice(names), rng.choice(things)
    total = rng.randint(2, start_high or high)
    start, parts, lines = total, [], []
    for _ in range(steps):
        move, op = rng.choice(CHAIN_MOVES)
        if op == "-" and total <= 1:
            move, op = "finds {n} more", "+"
        n = rng.randint(1, high) if op == "+" else rng.randint(1, min(high, total - 1))
        lines.append(f"{total} {op} {n} = {total + n if op == '+' else total - n}")
        total = total + n if op == "+" else total - n
        parts.append((move.format(n=n), op, n))
    if words:
        moves = ", then ".join(m for m, _, _ in parts)
        q = f"{name} has {start} {thing}. {name} {moves}. How many {thing} does {name} have now?"
    else:
        q = (rng.choice(forms) if len(forms) > 1 else forms[0]).format(e=" ".join([str(start)] + [f"{op} {n}" for _, op, n in parts]))
    return {
        "prompt": [{"role": "user", "content": f"{CHAIN_SHOT if shot else ''}{q} {ask or MATH_ASK}"}],
        "completion": ", ".join(lines) + f".\n#### {total}",
        "answer": str(total),
        "category": f"steps_{steps}",
    }


CHAIN_STEPS = (1, 2)  # the chain split's difficulties, equally often (bench/difficulty_probe.py measured 1-3; README)


def chain_set(
    n: int, seed: int, names, things, seen=frozenset(), held_out=frozenset(), answer_only: bool = False, distinct_sums: bool = False
) -> list:
    """n distinct bare chain problems in any of BARE_FORMS, the difficulties of CHAIN_STEPS in turn. seen: questions
    already used; held_out: sums (worked solutions) no problem here may be (the held-out set's: a form is not a new
    problem); distinct_sums: no sum twice (the held-out set). answer_only: prompt, answer and category, no worked
    solution (the RL side of the split: the math reward reads the answer column)."""
    rng, items, keys, sums = random.Random(seed), [], set(seen), set(held_out)
    while len(items) < n:
        item = chain_problem(rng, names, things, CHAIN_STEPS[len(items) % len(CHAIN_STEPS)], words=False, forms=BARE_FORMS)
        if item["prompt"][0]["content"] not in keys and item["completion"] not in sums:
            keys.add(item["prompt"][0]["content"])
            if distinct_sums:
                sums.add(item["completion"])
            items.append({k: v for k, v in item.items() if k != "completion"} if answer_only else item)
    return items


TOOL_ASK = "You have a calculator: write <calc>expression</calc> and its result comes back. Then give the final answer after ####."
DIRECT_ASK = "Give the final answer after ####."


def tool_problem(rng: random.Random, names, things, digits: int) -> tuple:
    """(category, question, expression, answer): arithmetic a 135M model cannot do reliably in its head. digits: the
    size of the numbers (the difficulty knob)."""
    lo, hi = 10 ** (digits - 1), 10**digits - 1
    name, thing = rng.choice(names), rng.choice(things)
    kind = rng.choice(["product", "sum", "two_step"])
    if kind == "product":
        a, b = rng.randint(lo, hi), rng.randint(12, 99)
        return kind, f"A crate holds {a} {thing}. How many {thing} are in {b} crates?", f"{a}*{b}", a * b
    if kind == "sum":
        a, b, c = rng.randint(lo, hi), rng.randint(lo, hi), rng.randint(100, 999)
        return (
            kind,
            f"{name} counted {a} {thing} on Monday, {b} on Tuesday and {c} on Wednesday. How many {thing} in all?",
            f"{a}+{b}+{c}",
            a + b + c,
        )
    a, b = rng.randint(lo, hi), rng.randint(12, 99)
    c = rng.randint(100, a * b - 1)
    return (kind, f"{name} buys {b} boxes of {a} {thing} and gives away {c}. How many {thing} does {name} keep?", f"{a}*{b}-{c}", a * b - c)


def tool_set(n: int, seed: int, names, things, digits: int = 3, seen=frozenset()) -> list:
    """Tool-use demonstrations as conversations: the question, the assistant's calculator call, the result as a tool
    turn, the answer. The same problems without the tool are made by direct_rows."""
    rng, items, keys = random.Random(seed), [], set(seen)
    while len(items) < n:
        kind, question, expression, answer = tool_problem(rng, names, things, digits)
        if question in keys:
            continue
        keys.add(question)
        shown = expression.replace("*", " * ").replace("+", " + ").replace("-", " - ")
        items.append(
            {
                "messages": [
                    {"role": "user", "content": f"{question} {TOOL_ASK}"},
                    {"role": "assistant", "content": f"<calc>{expression}</calc>"},
                    {"role": "tool", "content": str(answer)},
                    {"role": "assistant", "content": f"{shown} = {answer}.\n#### {answer}"},
                ],
                "answer": str(answer),
                "category": kind,
            }
        )
    return items


def direct_rows(tool_rows: list) -> list:
    """The same problems, answered without a tool (the no-tool baseline): prompt-completion rows."""
    out = []
    for row in tool_rows:
        question = row["messages"][0]["content"].replace(TOOL_ASK, DIRECT_ASK)
        out.append(
            {
                "prompt": [{"role": "user", "content": question}],
                "completion": row["messages"][3]["content"],
                "answer": row["answer"],
                "category": row["category"],
            }
        )
    return out


def main() -> None:
    here = Path(__file__).resolve().parent
    countries = sorted(CAPITALS)
    rng = random.Random(0)
    rng.shuffle(countries)
    words, opposites = WORDS[:], sorted(OPPOSITES)
    train = build(300, 1, countries[:40], words[:22], opposites[:15], list(range(2, 60)))
    # held out: unseen countries, words, opposites and numbers
    evals = build(60, 2, countries[40:], words[22:], opposites[15:], list(range(60, 99)), seen={x["instruction"] for x in train})
    (here / "train.json").write_text(json.dumps(train, indent=1) + "\n")
    (here / "eval.json").write_text(json.dumps(evals, indent=1) + "\n")
    math_train = math_set(400, 3, NAMES[:14], THINGS[:11], 1, 9)
    # held out: other names and things, and numbers from a range of their own
    math_eval = math_set(100, 4, NAMES[14:], THINGS[11:], 1, 9, seen={x["prompt"][0]["content"] for x in math_train})
    (here / "math_train.json").write_text(json.dumps(math_train, indent=1) + "\n")
    (here / "math_eval.json").write_text(json.dumps(math_eval, indent=1) + "\n")
    code = [
        {"prompt": prompt, "completion": f"```python\n{solution}\n```", "tests": tests, "entry_point": name}
        for (name, prompt, tests), solution in zip(CODE, CODE_SOLUTIONS)
    ]
    (here / "code.json").write_text(json.dumps(code, indent=1) + "\n")
    # the split users have: a few worked solutions, many answer-only prompts, a held-out set; no question in two
    chain_eval = chain_set(100, 9, NAMES, THINGS, distinct_sums=True)  # first: its sums are held out of the others
    held_out = {x["completion"] for x in chain_eval}
    chain_demos = chain_set(32, 7, NAMES, THINGS, held_out=held_out)
    chain_prompts = chain_set(
        1200, 8, NAMES, THINGS, seen={x["prompt"][0]["content"] for x in chain_demos}, held_out=held_out, answer_only=True
    )
    for name, rows in (("chain_demos", chain_demos), ("chain_prompts", chain_prompts), ("chain_eval", chain_eval)):
        (here / f"{name}.json").write_text(json.dumps(rows, indent=1) + "\n")
    tool_train = tool_set(400, 5, NAMES[:14], THINGS[:11])
    tool_eval = tool_set(100, 6, NAMES[14:], THINGS[11:], seen={x["messages"][0]["content"] for x in tool_train})
    for name, rows in (("tool_train", tool_train), ("tool_eval", tool_eval)):
        (here / f"{name}.json").write_text(json.dumps(rows, indent=1) + "\n")
        (here / f"{name.replace('tool', 'direct')}.json").write_text(json.dumps(direct_rows(rows), indent=1) + "\n")
    print(
        f"wrote {len(train)} + {len(evals)} demo items, {len(math_train)} + {len(math_eval)} math problems, "
        f"{len(code)} code tasks, {len(chain_demos)} + {len(chain_prompts)} + {len(chain_eval)} chain problems "
        f"(demonstrations, answer-only prompts, held out) "
        f"and {len(tool_train)} + {len(tool_eval)} tool problems (with and without the tool) to {here}"
    )


if __name__ == "__main__":
    main()
