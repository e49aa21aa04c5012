"""Bad input through the real CLI: one line `error: ...` that names the value, the place and the fix, a
non-zero exit, no traceback (unless DLLM_DEBUG=1) and no run folder left behind."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import benchmarks
from harness.cli import main
from harness.sampler import SamplerConfig
from tests.test_algorithms import tiny_run

ROOT = Path(__file__).resolve().parent.parent
DATA = {"gsm8k/train.jsonl": ['{"question": "1+1?", "answer": "#### 2"}', '{"question": "2+2?", "answer": "#### 4"}'],
        "gsm8k/test.jsonl": ['{"question": "3+3?", "answer": "#### 6"}'],
        "hellaswag/hellaswag_val.jsonl": ['{"activity_label": "a", "ctx_a": "b", "ctx_b": "", "endings": ["c", "d"], '
                                          '"label": 0}']}
# argv after `train`, a change to the data folder {file: lines}, the expected error (a regex)
CASES = {
    "mistyped flag": (["--lrr", "0.1"], None, r"unrecognized arguments: --lrr 0\.1 \(did you mean --lr\?\)"),
    "mistyped method flag": (["--algo.num_iteration", "2"], None, r"did you mean --algo\.num_iterations\?"),
    "wrong type": (["--steps", "two"], None, r"argument --steps: invalid int value: 'two'; see `python -m harness "
                                             r"train --help`"),
    "wrong type, nested": (["--sampler.temperature", "hot"], None, r"--sampler\.temperature: invalid float"),
    "impossible value": (["--save_every", "0"], None, r"--save_every=0 must be a positive integer"),
    "unknown method": (["--algo", "d2"], None, r"unknown method 'd2'; known methods: agrpo, d1, "),
    "unknown task": (["--task", "sudok"], None, r"unknown task 'sudok'; known tasks: arithmetic, gsm8k, "),
    "multiple-choice task": (["--task", "hellaswag"], None, r"--task hellaswag is evaluation-only \(no train split\); "
                             r"train on one of arithmetic, gsm8k, sudoku, and evaluate with `python -m harness eval"),
    "evaluation-only task": (["--task", "humaneval"], None, r"--task humaneval is evaluation-only"),
    "lengths": (["--sampler.gen_length", "10", "--sampler.block_length", "4"], None,
                r"sampler\.gen_length=10 is not divisible by sampler\.block_length=4; choose a block length"),
    "unknown remasking": (["--eval_sampler.remasking", "lowconf"], None,
                          r"sampler\.remasking='lowconf'; choose one of low_confidence"),
    "missing data file": (["--task", "gsm8k"], {"gsm8k/train.jsonl": None},
                          r"gsm8k/train\.jsonl does not exist; DLLM_DATA_DIR must hold gsm8k/train\.jsonl"),
    "bad JSON": (["--task", "gsm8k"], {"gsm8k/train.jsonl": [DATA["gsm8k/train.jsonl"][0], '{"question": "x",']},
                 r"gsm8k/train\.jsonl, line 2: not valid JSON \(.*\); repair or remove the line"),
    "missing field": (["--task", "gsm8k"], {"gsm8k/test.jsonl": ['{"question": "3+3?"}']},
                      r"gsm8k/test\.jsonl, line 1: the record lacks answer \(a gsm8k/test\.jsonl record needs "
                      r"question, answer\); repair or remove it"),
    "not an object": (["--task", "gsm8k"], {"gsm8k/train.jsonl": ["[1, 2]"]},
                      r"gsm8k/train\.jsonl, line 1: the record lacks question, answer"),
}


def error_of(argv: list[str], capsys) -> str:
    """The CLI's error output for argv; asserts it is one line starting with `error: `."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    code = exit_.value.code
    text = code if isinstance(code, str) else capsys.readouterr().err.strip()  # our errors / argparse's
    assert code not in (0, None) and text.startswith("error: ") and "\n" not in text, text
    return text


@pytest.fixture
def data(tmp_path, monkeypatch):
    """A small data folder as DLLM_DATA_DIR; `data(changes)` rewrites files (None deletes one). The tasks'
    cached splits are cleared before and after."""
    def make(changes: dict | None = None) -> Path:
        folder = tmp_path / "data"
        for name, lines in {**DATA, **(changes or {})}.items():
            path = folder / name
            path.parent.mkdir(parents=True, exist_ok=True)
            if lines is None:
                path.unlink(missing_ok=True)
            else:
                path.write_text("".join(line + "\n" for line in lines))
        monkeypatch.setenv("DLLM_DATA_DIR", str(folder))
        return folder

    caches = [benchmarks.get(name).load for name in ("gsm8k", "humaneval", "hellaswag")]
    for cache in caches:
        cache.cache_clear()
    yield make
    for cache in caches:
        cache.cache_clear()


@pytest.mark.parametrize("case", CASES)
def test_each_bad_input_is_one_clear_error_and_writes_nothing(case, model_dir, tmp_path, data, capsys):
    argv, changes, expected = CASES[case]
    data(changes)
    out = tmp_path / "run"
    text = error_of(["train", "--model", str(model_dir), "--out", str(out), *argv], capsys)
    assert re.search(expected, text), text
    assert not out.exists()


def test_good_small_data_trains(model_dir, tmp_path, data):
    """The data folder of the cases above is valid as it stands: the errors come from the changes alone."""
    data()
    short = SamplerConfig(gen_length=8, block_length=8, steps=8)
    run = tiny_run(model_dir, tmp_path / "run", "d1", task="gsm8k", steps=1, prompts_per_step=1, group_size=2,
                   eval_limit=1, sampler=short, eval_sampler=short)
    assert (run / "checkpoint").exists()


def test_missing_data_directory(model_dir, tmp_path, data, monkeypatch, capsys):
    data()
    monkeypatch.setenv("DLLM_DATA_DIR", str(tmp_path / "nowhere"))
    text = error_of(["train", "--task", "gsm8k", "--model", str(model_dir), "--out", str(tmp_path / "run")], capsys)
    assert text == f"error: DLLM_DATA_DIR='{tmp_path / 'nowhere'}' is not a directory; point it at the offline data folder"
    assert not (tmp_path / "run").exists()


def test_malformed_hellaswag_row_names_file_line_and_field(data):
    folder = data({"hellaswag/hellaswag_val.jsonl": [DATA["hellaswag/hellaswag_val.jsonl"][0], "",
                                                     '{"activity_label": "a", "ctx_a": "b", "endings": [], "label": 0}']})
    with pytest.raises(ValueError, match=f"{folder}/hellaswag/hellaswag_val.jsonl, line 3: the record lacks ctx_b"):
        benchmarks.get("hellaswag").load("test")


@pytest.fixture
def no_mask_model(model_dir, tmp_path) -> Path:
    """The tiny model folder with its mask token removed from config.json and the tokenizer."""
    folder = tmp_path / "no-mask"
    shutil.copytree(model_dir, folder)
    for name, key in (("config.json", "mask_token_id"), ("tokenizer_config.json", "mask_token")):
        settings = json.loads((folder / name).read_text())
        settings.pop(key)
        (folder / name).write_text(json.dumps(settings))
    return folder


def test_model_folders_without_a_mask_token_or_missing(no_mask_model, tmp_path, capsys):
    out = tmp_path / "run"
    text = error_of(["train", "--task", "arithmetic", "--model", str(no_mask_model), "--out", str(out)], capsys)
    assert f"error: {no_mask_model} has no mask token: set `mask_token_id` in its config.json" in text
    text = error_of(["train", "--task", "arithmetic", "--model", str(tmp_path / "nowhere"), "--out", str(out)], capsys)
    assert "python -m harness pretrain" in text
    assert not out.exists()


def test_changed_config_on_resume_and_unknown_eval_task(model_dir, tmp_path, capsys):
    run = tiny_run(model_dir, tmp_path / "run", "d1", steps=1)
    args = ["train", "--algo", "d1", "--task", "sudoku", "--model", str(model_dir), "--out", str(run)]
    assert "holds a checkpoint of a different configuration or initial model" in error_of(args + ["--lr", "0.5"], capsys)
    assert "unknown task 'gsm9k'" in error_of(["eval", "--model", str(model_dir), "--tasks", "gsm9k", "--out",
                                               str(tmp_path / "e.json")], capsys)
    assert not (tmp_path / "e.json").exists()


def test_the_process_prints_one_line_and_the_traceback_only_when_asked(tmp_path):
    cmd = [sys.executable, "-m", "harness", "train", "--task", "hellaswag", "--out", str(tmp_path / "run")]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and done.stderr.startswith("error: --task hellaswag is evaluation-only")
    assert done.stderr.count("\n") == 1 and not (tmp_path / "run").exists()
    debug = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120,
                           env={**os.environ, "DLLM_DEBUG": "1"})
    assert debug.returncode == 1 and "Traceback (most recent call last)" in debug.stderr
    assert debug.stderr.rstrip().endswith("ValueError: --task hellaswag is evaluation-only (no train split); train "
                                          "on one of arithmetic, gsm8k, sudoku, and evaluate with `python -m harness "
                                          "eval --tasks hellaswag`")


@pytest.mark.parametrize("spec, expected", [
    ("arithmetic:ten", "pretrain --tasks 'arithmetic:ten' must look like 'arithmetic:3000,sudoku:200' (task:steps)"),
    ("arith:10", "unknown task 'arith'; known tasks: arithmetic, "),
    ("humaneval:10", "humaneval is evaluation-only: it has no 'train' split"),
])
def test_pretrain_task_budgets(spec, expected, tmp_path, data, capsys):
    data()
    assert expected in error_of(["pretrain", "--tasks", spec, "--out", str(tmp_path / "base")], capsys)
    assert not (tmp_path / "base").exists()


@pytest.mark.parametrize("train, message", [
    ({"steps": 2, "lrr": 0.1}, "Additional properties are not allowed ('lrr' was unexpected)"),
    ({"steps": "two"}, "'two' is not of type 'integer'"),
    ({"steps": 2, "nonfinite_skips": -1}, "-1 is less than the minimum of 0"),
])
def test_workflow_config_keys_and_types_are_checked_before_anything_runs(train, message, tmp_path):
    from tests.test_workflow import snakemake

    (tmp_path / "bad.yaml").write_text(json.dumps({"train": train}))  # JSON is YAML
    done = snakemake("-n", "--configfile", "config/config.yaml", str(tmp_path / "bad.yaml"))
    assert done.returncode != 0 and message in done.stdout, done.stdout[-2000:]
