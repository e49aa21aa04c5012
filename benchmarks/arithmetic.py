"""Multi-digit addition with an exact-answer reward.

Prompt `aa+bb=` with a, b uniform in [0, 99] written with two digits; the completion is the sum written
with three digits (`07+25=` -> `032`). Fixed widths keep every digit at a fixed position, which a tiny
bidirectional model needs to learn carries in minutes. Reward 1 if the completion, stripped of whitespace,
is exactly the sum, else 0. The splits are drawn once from fixed seeds: 256 test problems, then 5,000 train problems
from the rest; test is then completed with every problem train does not hold (4,744 more, in a seeded order), 5,000
in all. A 256-item test set cannot resolve what RL changes: greedy answers flip on many items between two close
models, and the paired 95% CI of a 2-seed mean's change over the base spans 10 to 12 points on 256 items.
"""

from __future__ import annotations

import functools
import random

GEN_LENGTH, BLOCK_LENGTH, STEPS = 8, 8, 8
MAX_OPERAND = 99
FIRST_TEST, TRAIN_SIZE, SPLIT_SEED = 256, 5_000, 1234


def _problems(seed: int, n: int, exclude: set = frozenset()) -> list[dict]:
    rng, seen, out = random.Random(seed), set(exclude), []
    while len(out) < n:
        a, b = rng.randint(0, MAX_OPERAND), rng.randint(0, MAX_OPERAND)
        if (a, b) not in seen:
            seen.add((a, b))
            out.append({"a": a, "b": b, "answer": f"{a + b:03d}"})
    return out


@functools.cache
def load(split: str) -> list[dict]:
    first = _problems(SPLIT_SEED, FIRST_TEST)
    train = _problems(SPLIT_SEED + 1, TRAIN_SIZE, exclude={(e["a"], e["b"]) for e in first})
    if split == "train":
        return train
    if split == "test":
        rest = (MAX_OPERAND + 1) ** 2 - FIRST_TEST - TRAIN_SIZE
        return first + _problems(SPLIT_SEED + 2, rest, exclude={(e["a"], e["b"]) for e in first + train})
    raise ValueError(f"unknown split {split!r} for arithmetic; use 'train' or 'test'")


def prompt(example: dict) -> str:
    return f"{example['a']:02d}+{example['b']:02d}="


def target(example: dict) -> str:
    return example["answer"]


def reward(completion: str, example: dict) -> float:
    return float(completion.strip() == example["answer"])
