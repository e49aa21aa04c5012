"""4x4 Sudoku with partial credit (the d1 reward rule).

Prompt: the 16-cell puzzle row by row, `0` for a blank; the completion is the 16-digit solved grid.
Reward (d1, `reward_func.py`, sudoku): keep only the digits of the completion, right-pad with `0` or truncate
to 16, and score the fraction of the puzzle's blank cells whose digit equals the solution's. Puzzles are
drawn from all 288 valid grids with 8 to 12 blanks and kept only if their solution is unique, so the
reference solution is the only correct one. The splits are drawn once from fixed seeds: 256 test puzzles, then
20,000 train puzzles, then 3,840 more test puzzles that train does not hold (4,096 test puzzles in all; a change of
a point in mean reward is within the paired 95% CI on 256).
"""

from __future__ import annotations

import functools
import itertools
import random

import numpy as np

GEN_LENGTH, BLOCK_LENGTH, STEPS = 16, 16, 16
MIN_BLANKS, MAX_BLANKS = 8, 12
FIRST_TEST, TRAIN_SIZE, TEST_SIZE, SPLIT_SEED = 256, 20_000, 4_096, 4321


def _grids() -> list[str]:
    """All 288 valid 4x4 grids as 16-character strings, in lexicographic order: rows (permutations of 1234) are
    stacked one at a time, and a row is kept only if no column and no 2x2 box repeats a digit so far."""
    rows = ["".join(p) for p in itertools.permutations("1234")]

    def extend(grid: tuple[str, ...]) -> list[str]:
        if len(grid) == 4:
            return ["".join(grid)]
        out = []
        for row in rows:
            columns_ok = all(row[c] != above[c] for above in grid for c in range(4))
            box_ok = len(grid) % 2 == 0 or all(len({*grid[-1][c:c + 2], *row[c:c + 2]}) == 4 for c in (0, 2))
            if columns_ok and box_ok:
                out += extend((*grid, row))
        return out

    return extend(())


GRIDS = _grids()
_GRID_ARRAY = np.array([[int(d) for d in g] for g in GRIDS])


def _unique(puzzle: str) -> bool:
    """True if exactly one valid grid agrees with every given digit."""
    cells = np.array([int(d) for d in puzzle])
    given = cells > 0
    return int((_GRID_ARRAY[:, given] == cells[given]).all(1).sum()) == 1


def _puzzles(seed: int, n: int, exclude: set = frozenset()) -> list[dict]:
    rng, seen, out = random.Random(seed), set(exclude), []
    while len(out) < n:
        solution = rng.choice(GRIDS)
        blanks = set(rng.sample(range(16), rng.randint(MIN_BLANKS, MAX_BLANKS)))
        puzzle = "".join("0" if i in blanks else d for i, d in enumerate(solution))
        if puzzle not in seen and _unique(puzzle):
            seen.add(puzzle)
            out.append({"puzzle": puzzle, "solution": solution})
    return out


@functools.cache
def load(split: str) -> list[dict]:
    first = _puzzles(SPLIT_SEED, FIRST_TEST)
    train = _puzzles(SPLIT_SEED + 1, TRAIN_SIZE, exclude={e["puzzle"] for e in first})
    if split == "train":
        return train
    if split == "test":
        return first + _puzzles(SPLIT_SEED + 2, TEST_SIZE - FIRST_TEST, exclude={e["puzzle"] for e in first + train})
    raise ValueError(f"unknown split {split!r} for sudoku; use 'train' or 'test'")


def prompt(example: dict) -> str:
    return example["puzzle"]


def target(example: dict) -> str:
    return example["solution"]


def reward(completion: str, example: dict) -> float:
    digits = "".join(ch for ch in completion if ch.isdigit())
    if not digits:
        return 0.0
    digits = digits[:16].ljust(16, "0")
    blanks = [i for i, ch in enumerate(example["puzzle"]) if ch == "0"]
    return sum(digits[i] == example["solution"][i] for i in blanks) / len(blanks)
