"""4x4 Sudoku with partial credit (the d1 reward rule).

Prompt: the 16-cell puzzle row by row, `0` for a blank; the completion is the 16-digit solved grid.
Reward (d1, `reward_func.py`, sudoku): keep only the digits of the completion, right-pad with `0` or truncate
to 16, and score the fraction of the puzzle's blank cells whose digit equals the solution's. Puzzles are
drawn from all 288 valid grids with 8 to 12 blanks and kept only if their solution is unique, so the
reference solution is the only correct one.
"""

from __future__ import annotations

import functools
import itertools
import random

import numpy as np

GEN_LENGTH, BLOCK_LENGTH, STEPS = 16, 16, 16
MIN_BLANKS, MAX_BLANKS = 8, 12
TRAIN_SIZE, TEST_SIZE, SPLIT_SEED = 20_000, 256, 4321


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
    test = _puzzles(SPLIT_SEED, TEST_SIZE)
    if split == "test":
        return test
    if split == "train":
        return _puzzles(SPLIT_SEED + 1, TRAIN_SIZE, exclude={e["puzzle"] for e in test})
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
