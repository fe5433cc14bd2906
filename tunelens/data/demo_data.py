"""The embedded demo dataset: instruction data the project generates itself (no outside data).

A few hundred Alpaca-format rows across task families whose answers follow a fixed, learnable
style ("37 + 58 = 95.", "The atomic number of carbon is 6."). A base model answers them in its own
words; after fine-tuning it adopts the style, so BLEU/ROUGE visibly move. The generator is seeded and
uses only Python's `random.Random`, so every machine produces the same rows.
"""

from __future__ import annotations

import random

# Public-domain facts: (name, symbol, atomic number, standard atomic mass in u).
ELEMENTS = [
    ("hydrogen", "H", 1, 1.008), ("helium", "He", 2, 4.0026), ("lithium", "Li", 3, 6.94),
    ("beryllium", "Be", 4, 9.0122), ("boron", "B", 5, 10.81), ("carbon", "C", 6, 12.011),
    ("nitrogen", "N", 7, 14.007), ("oxygen", "O", 8, 15.999), ("fluorine", "F", 9, 18.998),
    ("neon", "Ne", 10, 20.180), ("sodium", "Na", 11, 22.990), ("magnesium", "Mg", 12, 24.305),
    ("aluminium", "Al", 13, 26.982), ("silicon", "Si", 14, 28.085), ("phosphorus", "P", 15, 30.974),
    ("sulfur", "S", 16, 32.06), ("chlorine", "Cl", 17, 35.45), ("argon", "Ar", 18, 39.95),
    ("potassium", "K", 19, 39.098), ("calcium", "Ca", 20, 40.078), ("iron", "Fe", 26, 55.845),
    ("copper", "Cu", 29, 63.546), ("zinc", "Zn", 30, 65.38), ("silver", "Ag", 47, 107.87),
    ("gold", "Au", 79, 196.97),
]
WORDS = [
    "python", "banana", "keyboard", "river", "garden", "window", "rocket", "pencil", "orange", "planet",
    "silver", "candle", "mirror", "forest", "guitar", "bridge", "yellow", "summer", "turtle", "compass",
]
NAMES = ["Ana", "Ben", "Chloe", "David", "Emma", "Farid", "Grace", "Hugo", "Ines", "Jonas"]
ITEMS = ["apples", "books", "marbles", "stamps", "pencils", "cookies", "coins", "shells"]
UNITS = [("kilometers", "meters", 1000), ("meters", "centimeters", 100), ("kilograms", "grams", 1000),
         ("hours", "minutes", 60), ("minutes", "seconds", 60), ("liters", "milliliters", 1000)]
# (instruction phrasing, function name, body, description)
PY_FUNCTIONS = [
    ("returns the sum of a list of numbers", "total", "return sum(values)"),
    ("returns the largest number in a list", "largest", "return max(values)"),
    ("returns the smallest number in a list", "smallest", "return min(values)"),
    ("returns the even numbers of a list", "evens", "return [v for v in values if v % 2 == 0]"),
    ("returns the odd numbers of a list", "odds", "return [v for v in values if v % 2 == 1]"),
    ("returns the squares of a list of numbers", "squares", "return [v * v for v in values]"),
    ("returns a list sorted in descending order", "descending", "return sorted(values, reverse=True)"),
    ("returns the average of a list of numbers", "average", "return sum(values) / len(values)"),
    ("returns the number of items in a list", "count", "return len(values)"),
    ("returns a list without duplicates, keeping the order", "unique", "return list(dict.fromkeys(values))"),
]
PY_PHRASES = ["Write a Python function that {what}.", "Implement a Python function that {what}.",
              "Create a Python function named `{name}` that {what}."]
VOWELS = set("aeiou")


def _arithmetic(rng: random.Random) -> dict:
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    op = rng.choice(["+", "-", "*"])
    value = {"+": a + b, "-": a - b, "*": a * b}[op]
    phrase = rng.choice(["What is {a} {op} {b}?", "Calculate {a} {op} {b}.", "Compute {a} {op} {b}."])
    return {"instruction": phrase.format(a=a, op=op, b=b), "input": "", "output": f"{a} {op} {b} = {value}."}


def _word_problem(rng: random.Random) -> dict:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    have, more = rng.randint(2, 30), rng.randint(2, 30)
    if rng.random() < 0.5:
        text = f"{name} has {have} {item} and gets {more} more. How many {item} does {name} have now?"
        answer = f"{name} has {have} + {more} = {have + more} {item}."
    else:
        have += more
        text = f"{name} has {have} {item} and gives away {more}. How many {item} does {name} have left?"
        answer = f"{name} has {have} - {more} = {have - more} {item} left."
    return {"instruction": "Solve the word problem.", "input": text, "output": answer}


def _string_task(rng: random.Random) -> dict:
    word = rng.choice(WORDS)
    kind = rng.randrange(4)
    if kind == 0:
        return {"instruction": "Reverse the following word.", "input": word,
                "output": f"The reversed word is {word[::-1]}."}
    if kind == 1:
        return {"instruction": "Convert the following word to uppercase.", "input": word,
                "output": f"The uppercase word is {word.upper()}."}
    if kind == 2:
        count = sum(ch in VOWELS for ch in word)
        return {"instruction": "Count the vowels in the following word.", "input": word,
                "output": f"The word {word} has {count} vowels."}
    return {"instruction": "How many letters does the following word have?", "input": word,
            "output": f"The word {word} has {len(word)} letters."}


def _element(rng: random.Random) -> dict:
    name, symbol, number, mass = rng.choice(ELEMENTS)
    kind = rng.randrange(3)
    if kind == 0:
        return {"instruction": f"What is the atomic number of {name}?", "input": "",
                "output": f"The atomic number of {name} is {number}."}
    if kind == 1:
        return {"instruction": f"Calculate the atomic mass for {name}.", "input": "",
                "output": f"The atomic mass of {name} is {mass} u."}
    return {"instruction": f"What is the chemical symbol of {name}?", "input": "",
            "output": f"The chemical symbol of {name} is {symbol}."}


def _conversion(rng: random.Random) -> dict:
    source, target, factor = rng.choice(UNITS)
    amount = rng.randint(2, 40)
    return {"instruction": f"Convert {amount} {source} to {target}.", "input": "",
            "output": f"{amount} {source} is {amount * factor} {target}."}


def _sorting(rng: random.Random) -> dict:
    numbers = rng.sample(range(1, 100), rng.randint(4, 7))
    ascending = rng.random() < 0.5
    order = "ascending" if ascending else "descending"
    ordered = sorted(numbers, reverse=not ascending)
    return {"instruction": f"Sort the following numbers in {order} order.",
            "input": ", ".join(map(str, numbers)), "output": ", ".join(map(str, ordered))}


def _python(rng: random.Random) -> dict:
    what, name, body = rng.choice(PY_FUNCTIONS)
    phrase = rng.choice(PY_PHRASES)
    code = f"def {name}(values):\n    {body}"
    return {"instruction": phrase.format(what=what, name=name), "input": "", "output": code}


FAMILIES = (_arithmetic, _word_problem, _string_task, _element, _conversion, _sorting, _python)


def generate_demo_rows(n_rows: int = 400, seed: int = 20261123) -> list[dict]:
    """`n_rows` distinct rows (instruction, input, output), the same on every machine for a given seed."""
    return _distinct_rows(FAMILIES, n_rows, seed, "demo generator")


def _distinct_rows(families, n_rows: int, seed: int, what: str) -> list[dict]:
    """`n_rows` rows with distinct (instruction, input), drawing from the families in turn."""
    rng = random.Random(seed)
    rows, seen = [], set()
    attempts = 0
    while len(rows) < n_rows:
        attempts += 1
        if attempts > n_rows * 50:
            raise RuntimeError(f"{what} could not find {n_rows} distinct rows")
        row = families[attempts % len(families)](rng)  # families with few distinct rows run out; others fill in
        key = (row["instruction"], row["input"])
        if key in seen:
            continue
        seen.add(key)
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------ held-out task families
# Task families the training rows never contain (an evaluation set disjoint from training by construction):
# does the fine-tuned answer style carry over to tasks the model was not tuned on?
def _division(rng: random.Random) -> dict:
    divisor, quotient = rng.randint(2, 12), rng.randint(2, 20)
    dividend = divisor * quotient
    return {"instruction": f"What is {dividend} divided by {divisor}?", "input": "",
            "output": f"{dividend} / {divisor} = {quotient}."}


def _first_letter(rng: random.Random) -> dict:
    word = rng.choice(WORDS)
    return {"instruction": "What is the first letter of the following word?", "input": word,
            "output": f"The first letter of {word} is {word[0]}."}


def _element_from_symbol(rng: random.Random) -> dict:
    name, symbol, _, _ = rng.choice(ELEMENTS)
    return {"instruction": f"Which element has the chemical symbol {symbol}?", "input": "",
            "output": f"The element with the symbol {symbol} is {name}."}


HOLDOUT_FAMILIES = (_division, _first_letter, _element_from_symbol)


def generate_holdout_rows(n_rows: int = 12, seed: int = 20261130) -> list[dict]:
    """`n_rows` distinct rows of task families that `generate_demo_rows` never produces."""
    return _distinct_rows(HOLDOUT_FAMILIES, n_rows, seed, "held-out demo generator")
