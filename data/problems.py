"""
Math word problems in GSM8K's JSONL format: {"question": ..., "answer": "<worked solution>\\n#### <number>"}.

A deterministic generator (fixed seed) of short arithmetic word problems at a few
difficulty levels, so that the accuracy term of the reward carries a learning signal for
a small model. A user's own GSM8K or MATH-style file, in the same format, works in their place.

    python -m data.problems            # writes data/math/{train,test}.jsonl at the default level

Levels (the worked answer shows the steps):
  0: "What is a + b?" / "What is a - b?", a below 20 and b below 10
  1: one addition or subtraction of numbers below 10
  2: one operation (+, -, x) on numbers below 20
  3: two steps on numbers below 20
  4: two steps on numbers up to 99
"""

import argparse
import json
import os
import random

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_DIR = os.path.join(HERE, "math")
DEFAULT_LEVEL = 0

NAMES = ["Tom", "Anna", "Sam", "Lea", "Omar", "Mia", "Ravi", "Zoe", "Ben", "Ivy", "Leo", "Nina"]
ITEMS = ["apples", "pencils", "stickers", "marbles", "books", "cookies", "coins", "shells", "cards", "eggs"]


class DataError(ValueError):
    """A data file that cannot be read; the message names the file and line."""


def _one_step(rng, hi, ops):
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    op = rng.choice(ops)
    if op == "+":
        a, b = rng.randint(2, hi - 1), rng.randint(2, hi - 1)
        q = f"{name} has {a} {item}. {name} gets {b} more {item}. How many {item} does {name} have now?"
        return q, f"{name} has {a} + {b} = {a + b} {item}.", a + b
    if op == "-":
        a = rng.randint(3, hi - 1)
        b = rng.randint(1, a - 1)
        q = f"{name} has {a} {item}. {name} gives away {b} {item}. How many {item} does {name} have left?"
        return q, f"{name} has {a} - {b} = {a - b} {item} left.", a - b
    a, b = rng.randint(2, min(hi - 1, 9)), rng.randint(2, min(hi - 1, 9))
    q = f"There are {a} boxes with {b} {item} in each box. How many {item} are there in total?"
    return q, f"There are {a} x {b} = {a * b} {item}.", a * b


def _two_steps(rng, hi):
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b = rng.randint(2, hi - 1), rng.randint(2, hi - 1)
    c = rng.randint(1, a + b - 1)
    q = (f"{name} has {a} {item}. {name} buys {b} more {item} and then gives {c} {item} to a friend. How "
         f"many {item} does {name} have now?")
    steps = (f"After buying, {name} has {a} + {b} = {a + b} {item}. After giving {c} away, {name} has "
             f"{a + b} - {c} = {a + b - c} {item}.")
    return q, steps, a + b - c


def _bare(rng):
    a, b = rng.randint(2, 19), rng.randint(2, 9)
    if rng.random() < 0.5 or a <= b:
        return f"What is {a} + {b}?", f"{a} + {b} = {a + b}.", a + b
    return f"What is {a} - {b}?", f"{a} - {b} = {a - b}.", a - b


def make_problem(rng, level):
    if level == 0:
        q, steps, ans = _bare(rng)
    elif level == 1:
        q, steps, ans = _one_step(rng, 10, "+-")
    elif level == 2:
        q, steps, ans = _one_step(rng, 20, "+-*")
    elif level == 3:
        q, steps, ans = _two_steps(rng, 20)
    elif level == 4:
        q, steps, ans = _two_steps(rng, 100)
    else:
        raise ValueError(f"level must be 0 to 4, got {level}")
    return {"question": q, "answer": f"{steps}\n#### {ans}"}


def generate(n, level=DEFAULT_LEVEL, seed=0):
    """Up to n distinct problems (a level's problem space can be smaller than n)."""
    rng = random.Random(seed)
    seen = {}
    for _ in range(50 * n):
        p = make_problem(rng, level)
        seen.setdefault(p["question"], p)
        if len(seen) == n:
            break
    return list(seen.values())


def read_jsonl(path):
    """Problems from a GSM8K-style JSONL file; a bad line is an error naming the file and the line."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such data file")
    out = []
    with open(path, "rb") as f:
        for i, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise DataError(f"{path}:{i}: not UTF-8 text; save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                ex = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{i}: not valid JSON ({e.msg}); each line must be one JSON "
                                "object") from None
            except RecursionError:
                raise DataError(f"{path}:{i}: nested too deeply to read; each line must be a flat JSON "
                                "object") from None
            fields = ex if isinstance(ex, dict) else {}
            if not (isinstance(fields.get("question"), str) and isinstance(fields.get("answer"), str)):
                raise DataError(f'{path}:{i}: each line needs string fields "question" and "answer"')
            if "####" not in ex["answer"]:
                raise DataError(f'{path}:{i}: the answer must end with "#### <final answer>" (GSM8K format)')
            out.append(ex)
    if not out:
        raise DataError(f"{path}: no problems in the file")
    return out


def write_jsonl(path, examples):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for ex in examples:
            f.write(json.dumps(ex) + "\n")


def main():
    parser = argparse.ArgumentParser(description="Write train/test JSONL of generated math word problems.")
    parser.add_argument("--level", type=int, default=DEFAULT_LEVEL)
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--test", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=DEFAULT_DIR)
    args = parser.parse_args()
    problems = generate(args.train + args.test, args.level, args.seed)
    # distinct questions, so the held-out split never repeats a training question
    n_test = min(args.test, len(problems) // 4)
    test, train = problems[:n_test], problems[n_test:]
    write_jsonl(os.path.join(args.out, "train.jsonl"), train)
    write_jsonl(os.path.join(args.out, "test.jsonl"), test)
    print(f"wrote {len(train)} train and {len(test)} test problems (level {args.level}) to {args.out}")


if __name__ == "__main__":
    main()
