"""Every task: fixed disjoint splits solved by their targets; tiny tasks: the one prompt template, golden rewards."""

from __future__ import annotations

import pytest

import benchmarks
from benchmarks import arithmetic, sudoku


TEST_SIZES = {"arithmetic": 5000, "sudoku": 4096, "gsm8k": 1319, "humaneval": 164, "hellaswag": 10042}


@pytest.mark.parametrize("name", sorted(benchmarks.TASKS))
def test_splits_are_fixed_disjoint_and_solved_by_their_targets(name):
    task = benchmarks.get(name)
    test = task.load("test")
    try:
        train = task.load("train")
    except ValueError as e:  # an evaluation-only task says so
        assert f"{name} is evaluation-only" in str(e)
        train = []
    assert len(test) == TEST_SIZES[name] and (not train or len(train) >= 5000)
    assert not {task.prompt(e) for e in train} & {task.prompt(e) for e in test}
    checked = test[:8] if name == "humaneval" else test  # all 164 canonical solutions run in test_sandbox.py
    assert all(task.reward(task.target(e), e) == 1.0 for e in checked)
    if hasattr(task, "choices"):  # multiple choice: the target is one of the choices
        assert all(task.target(e) in task.choices(e) for e in test)
    else:
        assert task.GEN_LENGTH % task.BLOCK_LENGTH == 0
    with pytest.raises(ValueError, match="'dev'"):
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
    # all 288 valid grids, distinct, in lexicographic order (the puzzles are seeded draws from this list)
    assert len(sudoku.GRIDS) == 288 and sudoku.GRIDS == sorted(set(sudoku.GRIDS))
    units = [[4 * r + c for c in range(4)] for r in range(4)] + [[4 * r + c for r in range(4)] for c in range(4)]
    units += [[4 * (r + i) + c + j for i in (0, 1) for j in (0, 1)] for r in (0, 2) for c in (0, 2)]
    assert all(sorted(g[i] for i in unit) == list("1234") for g in sudoku.GRIDS for unit in units)
    assert all(sudoku._unique(e["puzzle"]) for e in sudoku.load("test"))
    assert not sudoku._unique("0" * 16)


def test_unknown_task_lists_the_known_ones():
    known = "arithmetic, gsm8k, hellaswag, humaneval, sudoku"
    with pytest.raises(KeyError, match=f"unknown task 'sudok'; known tasks: {known}"):
        benchmarks.get("sudok")
