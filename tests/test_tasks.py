"""Tiny tasks: seeded disjoint splits, the one prompt template, golden reward values."""

from __future__ import annotations

import pytest

import benchmarks
from benchmarks import arithmetic, sudoku


@pytest.mark.parametrize("name", sorted(benchmarks.TASKS))
def test_splits_are_fixed_disjoint_and_solved_by_their_targets(name):
    task = benchmarks.get(name)
    train, test = task.load("train"), task.load("test")
    assert len(test) == 256 and len(train) >= 5000
    assert not {task.prompt(e) for e in train} & {task.prompt(e) for e in test}
    assert all(task.reward(task.target(e), e) == 1.0 for e in test)
    assert task.GEN_LENGTH % task.BLOCK_LENGTH == 0
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        task.load("dev")


def test_arithmetic_reward_is_exact_match():
    e = {"a": 17, "b": 25, "answer": "42"}
    assert arithmetic.prompt(e) == "17+25="
    assert [arithmetic.reward(c, e) for c in ("42", " 42\n", "042", "41", "4 2", "")] == [1, 1, 0, 0, 0, 0]


def test_sudoku_reward_is_d1_partial_credit():
    e = {"puzzle": "0003304242010020", "solution": "2413314242311324"}  # blanks at 0,1,2,5,10,12,13,15
    assert sudoku.reward("2413314242311324", e) == 1.0
    assert sudoku.reward("answer: 2413 3142 4231 1324", e) == 1.0  # non-digits are dropped
    assert sudoku.reward("24", e) == 2 / 8  # right-padded with 0
    assert sudoku.reward("2413314242311324999", e) == 1.0  # truncated to 16
    assert sudoku.reward("1111111111111111", e) == 3 / 8  # blanks 2, 5, 12 hold a 1
    assert sudoku.reward("no digits", e) == 0.0


def test_sudoku_puzzles_have_unique_solutions():
    assert len(sudoku.GRIDS) == 288
    assert all(sudoku._unique(e["puzzle"]) for e in sudoku.load("test"))
    assert not sudoku._unique("0" * 16)


def test_unknown_task_lists_the_known_ones():
    with pytest.raises(KeyError, match="unknown task 'sudok'; known tasks: arithmetic, sudoku"):
        benchmarks.get("sudok")
