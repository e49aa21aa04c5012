"""Multi-digit addition with an exact-answer reward.

Prompt `aa+bb=` with a, b uniform in [0, 99] written with two digits; the completion is the sum written
with three digits (`07+25=` -> `032`). Fixed widths keep every digit at a fixed position, which a tiny
bidirectional model needs to learn carries in minutes. Reward 1 if the completion, stripped of whitespace,
is exactly the sum, else 0. The splits are drawn once from fixed seeds; test problems never occur in train.
"""

from __future__ import annotations

import functools
import random

GEN_LENGTH, BLOCK_LENGTH, STEPS = 8, 8, 8
MAX_OPERAND = 99
TRAIN_SIZE, TEST_SIZE, SPLIT_SEED = 5_000, 256, 1234


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
    test = _problems(SPLIT_SEED, TEST_SIZE)
    if split == "test":
        return test
    if split == "train":
        return _problems(SPLIT_SEED + 1, TRAIN_SIZE, exclude={(e["a"], e["b"]) for e in test})
    raise ValueError(f"unknown split {split!r} for arithmetic; use 'train' or 'test'")


def prompt(example: dict) -> str:
    return f"{example['a']:02d}+{example['b']:02d}="


def target(example: dict) -> str:
    return example["answer"]


def reward(completion: str, example: dict) -> float:
    return float(completion.strip() == example["answer"])
