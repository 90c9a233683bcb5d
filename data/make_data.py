#!/usr/bin/env python3
"""Generate the demo data: instruction -> short exact answer, in train.json (300) and eval.json (60).

Templated factual, arithmetic, formatting and rewriting tasks whose references are exact, so BLEU,
ROUGE, chrF and exact match measure real progress. Train and eval use disjoint facts and numbers.
Deterministic: `python data/make_data.py` rewrites the same files.
"""

import json
import random
from pathlib import Path

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "Japan": "Tokyo", "China": "Beijing", "India": "New Delhi", "Russia": "Moscow", "Egypt": "Cairo",
    "Kenya": "Nairobi", "Canada": "Ottawa", "Mexico": "Mexico City", "Brazil": "Brasilia", "Peru": "Lima",
    "Chile": "Santiago", "Argentina": "Buenos Aires", "Australia": "Canberra", "Norway": "Oslo",
    "Sweden": "Stockholm", "Finland": "Helsinki", "Denmark": "Copenhagen", "Poland": "Warsaw",
    "Greece": "Athens", "Turkey": "Ankara", "Ireland": "Dublin", "Austria": "Vienna", "Hungary": "Budapest",
    "Belgium": "Brussels", "Netherlands": "Amsterdam", "Switzerland": "Bern", "Thailand": "Bangkok",
    "Vietnam": "Hanoi", "South Korea": "Seoul", "Indonesia": "Jakarta", "Iran": "Tehran", "Iraq": "Baghdad",
    "Cuba": "Havana", "Colombia": "Bogota", "Nigeria": "Abuja", "Ghana": "Accra", "Morocco": "Rabat",
    "Ukraine": "Kyiv", "Czechia": "Prague", "Romania": "Bucharest", "Bulgaria": "Sofia", "Serbia": "Belgrade",
    "Croatia": "Zagreb", "Iceland": "Reykjavik", "New Zealand": "Wellington",
}
WORDS = ["apple", "river", "garden", "window", "planet", "silver", "orange", "winter", "forest", "rocket",
         "candle", "bridge", "market", "pencil", "castle", "dragon", "violet", "harbor", "meadow", "puzzle",
         "jacket", "island", "mirror", "thunder", "lantern", "velvet", "falcon", "cobalt", "saddle", "tunnel"]
OPPOSITES = {"hot": "cold", "big": "small", "fast": "slow", "up": "down", "happy": "sad", "light": "dark",
             "early": "late", "open": "closed", "full": "empty", "strong": "weak", "old": "new", "high": "low",
             "rich": "poor", "hard": "soft", "wet": "dry", "loud": "quiet", "long": "short", "near": "far",
             "thick": "thin", "clean": "dirty"}


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


def main() -> None:
    here = Path(__file__).resolve().parent
    countries = sorted(CAPITALS)
    rng = random.Random(0)
    rng.shuffle(countries)
    words, opposites = WORDS[:], sorted(OPPOSITES)
    train = build(300, 1, countries[:40], words[:22], opposites[:15], list(range(2, 60)))
    # held out: unseen countries, words, opposites and numbers
    evals = build(60, 2, countries[40:], words[22:], opposites[15:], list(range(60, 99)),
                  seen={x["instruction"] for x in train})
    (here / "train.json").write_text(json.dumps(train, indent=1) + "\n")
    (here / "eval.json").write_text(json.dumps(evals, indent=1) + "\n")
    print(f"wrote {len(train)} train and {len(evals)} eval items to {here}")


if __name__ == "__main__":
    main()
