"""Write the example's instruction dataset: ``python examples/alpaca_example/make_data.py [--output PATH]``.

The example finetunes a tiny model on CPU in minutes, so it needs data that is small, has no licence
question and no download, and that such a model can visibly learn: short Alpaca-style records
(``{"instruction", "input", "output"}``) of mechanical tasks whose answers are a few words and follow from
the prompt (reverse a word, add two numbers, capitalise, name an opposite, count letters, sort numbers,
give a plural). About a third carry their argument in ``input`` (Alpaca's "with input" template), the rest
inside the instruction. A fixed seed makes the file the same on every run; the committed
``data/instructions.json`` is this script's output, and a test checks that it still is.
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable
from pathlib import Path

__all__ = ["OUTPUT", "SEED", "main", "make_records", "render"]

OUTPUT = Path(__file__).resolve().parent / "data" / "instructions.json"
SEED = 1234
COUNT = 400

WORDS = (
    "apple", "river", "garden", "window", "pencil", "candle", "forest", "orange", "planet", "bottle",
    "silver", "yellow", "basket", "monkey", "rocket", "castle", "pepper", "winter", "summer", "guitar",
    "ladder", "kitten", "button", "marble", "cookie", "dragon", "island", "jacket", "lemon", "mirror",
    "needle", "pillow", "rabbit", "saddle", "tunnel", "violin", "wallet", "zebra", "anchor", "bridge",
    "cloud", "desert", "engine", "flower", "hammer", "lantern", "meadow", "parrot", "spoon", "tiger",
)  # fmt: skip
OPPOSITES = (
    ("hot", "cold"), ("big", "small"), ("fast", "slow"), ("up", "down"), ("early", "late"), ("happy", "sad"),
    ("light", "dark"), ("open", "closed"), ("full", "empty"), ("high", "low"), ("old", "new"), ("wet", "dry"),
    ("hard", "soft"), ("loud", "quiet"), ("rich", "poor"), ("strong", "weak"), ("thick", "thin"),
    ("left", "right"), ("day", "night"), ("win", "lose"), ("push", "pull"), ("give", "take"),
    ("begin", "end"), ("inside", "outside"), ("above", "below"), ("front", "back"), ("near", "far"),
    ("true", "false"), ("yes", "no"), ("clean", "dirty"), ("wide", "narrow"), ("long", "short"),
)  # fmt: skip
PLURALS = (
    ("cat", "cats"), ("dog", "dogs"), ("box", "boxes"), ("child", "children"), ("mouse", "mice"),
    ("city", "cities"), ("leaf", "leaves"), ("foot", "feet"), ("tooth", "teeth"), ("bus", "buses"),
    ("baby", "babies"), ("knife", "knives"), ("man", "men"), ("woman", "women"), ("goose", "geese"),
    ("party", "parties"), ("glass", "glasses"), ("wolf", "wolves"), ("person", "people"), ("fish", "fish"),
)  # fmt: skip

Record = dict[str, str]
Task = Callable[[random.Random, bool], Record]


def _record(instruction: str, argument: str, output: str, with_input: bool, inline: str) -> Record:
    """The same task either way: its argument in ``input``, or written into the instruction (``inline``)."""
    if with_input:
        return {"instruction": instruction, "input": argument, "output": output}
    return {"instruction": inline, "input": "", "output": output}


def _reverse(rng: random.Random, with_input: bool) -> Record:
    word = rng.choice(WORDS)
    return _record("Reverse the word.", word, word[::-1], with_input, f"Reverse the word '{word}'.")


def _add(rng: random.Random, with_input: bool) -> Record:
    a, b = rng.randint(0, 50), rng.randint(0, 50)
    return _record("Add the two numbers.", f"{a} and {b}", str(a + b), with_input, f"What is {a} plus {b}?")


def _capitalise(rng: random.Random, with_input: bool) -> Record:
    word = rng.choice(WORDS)
    instruction = "Capitalise the first letter of the word."
    return _record(instruction, word, word.capitalize(), with_input, f"Capitalise the word '{word}'.")


def _opposite(rng: random.Random, with_input: bool) -> Record:
    word, opposite = rng.choice(OPPOSITES)
    if rng.random() < 0.5:
        word, opposite = opposite, word
    return _record("Name the opposite of the word.", word, opposite, with_input, f"What is the opposite of '{word}'?")


def _count_letters(rng: random.Random, with_input: bool) -> Record:
    word = rng.choice(WORDS)
    inline = f"How many letters are in the word '{word}'?"
    return _record("Count the letters in the word.", word, str(len(word)), with_input, inline)


def _sort(rng: random.Random, with_input: bool) -> Record:
    numbers = rng.sample(range(1, 30), 3)
    given, ordered = ", ".join(map(str, numbers)), ", ".join(map(str, sorted(numbers)))
    instruction = "Sort the numbers from smallest to largest."
    return _record(instruction, given, ordered, with_input, f"Sort {given} from smallest to largest.")


def _plural(rng: random.Random, with_input: bool) -> Record:
    word, plural = rng.choice(PLURALS)
    return _record("Give the plural of the word.", word, plural, with_input, f"What is the plural of '{word}'?")


TASKS: tuple[Task, ...] = (_reverse, _add, _capitalise, _opposite, _count_letters, _sort, _plural)


def make_records(count: int = COUNT, seed: int = SEED) -> list[Record]:
    """``count`` distinct records of tasks drawn at random, about one in three with a non-empty input."""
    rng = random.Random(seed)
    records: list[Record] = []
    seen: set[tuple[str, str]] = set()
    attempts = 0
    while len(records) < count:
        attempts += 1
        if attempts > 100 * count:
            raise RuntimeError(f"only {len(records)} distinct records after {attempts} attempts")
        task = rng.choice(TASKS)  # a task with few distinct prompts (plurals) just stops being drawn
        record = task(rng, rng.random() < 1 / 3)
        key = (record["instruction"], record["input"])
        if key not in seen:  # a repeated prompt would be a duplicate sample, not more data
            seen.add(key)
            records.append(record)
    return records


def render(records: list[Record]) -> str:
    """The file's exact text: one record per line, so diffs of a regenerated file stay readable."""
    lines = [json.dumps(record, ensure_ascii=False) for record in records]
    return "[\n" + ",\n".join(f"  {line}" for line in lines) + "\n]\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write the alpaca example's bundled instruction dataset.")
    parser.add_argument("--output", type=Path, default=OUTPUT, help=f"Where to write it (default: {OUTPUT}).")
    args = parser.parse_args(argv)
    records = make_records()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(render(records), encoding="utf-8")
    with_input = sum(1 for record in records if record["input"])
    print(f"{args.output}: {len(records)} records ({with_input} with an input)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
