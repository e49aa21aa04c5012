"""The real entry points on a toy budget: the CLI, resuming, run-folder contents, clear errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from harness import runs
from harness.cli import main
from tests.test_algorithms import tiny_run, untimed

ROOT = Path(__file__).resolve().parent.parent


def test_cli_train_runs_end_to_end(model_dir, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "harness", "train", "--algo", "d1", "--task", "sudoku", "--model", str(model_dir),
           "--out", str(out), "--steps", "2", "--prompts_per_step", "2", "--group_size", "2", "--eval_limit", "4",
           "--eval_every", "1", "--algo.num_iterations", "2", "--sampler.temperature", "0.5"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = runs.read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2] and all("eval/reward" in r for r in rows)
    items = runs.read_metrics(out / "test_items.jsonl")  # each evaluation's reward per test item, in order
    assert [r["step"] for r in items] == [0, 1, 2] and all(len(r["reward"]) == 4 for r in items)
    assert [sum(r["reward"]) / 4 for r in items] == pytest.approx([r["eval/reward"] for r in rows], abs=1e-12)
    config = json.loads((out / "config.json").read_text())
    assert config["algo"]["num_iterations"] == 2 and config["sampler"]["temperature"] == 0.5
    assert config["sampler"]["gen_length"] == 16  # resolved from the task
    assert rows[1]["forward/rollout"] == 16 and rows[1]["forward/training"] == 2  # NFE and mu x micro-batches


def test_help_documents_every_field(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--algo", "d1", "--help"])
    text = capsys.readouterr().out
    for flag in ("--prompts_per_step", "--sampler.remasking", "--eval_sampler.decoding", "--algo.p_mask"):
        assert flag in text
    assert "probability of masking each prompt token" in text


def test_unknown_flag_is_rejected_by_name(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--algo", "d1", "--lrr", "0.1"])
    assert "unrecognized arguments: --lrr" in capsys.readouterr().err


def test_resume_continues_bit_identically_and_runs_can_be_extended(model_dir, tmp_path):
    full = tiny_run(model_dir, tmp_path / "full", "d1", steps=3, save_every=1, eval_every=1)
    part = tiny_run(model_dir, tmp_path / "part", "d1", steps=2, save_every=1, eval_every=1)
    assert runs.load_state(part / "checkpoint")["step"] == 2
    resumed = tiny_run(model_dir, part, "d1", steps=3, save_every=1, eval_every=1)
    assert untimed(runs.read_metrics(resumed / "metrics.jsonl")) == untimed(runs.read_metrics(full / "metrics.jsonl"))
    a, b = load_file(full / "checkpoint/model/model.safetensors"), load_file(resumed / "checkpoint/model/model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_changed_config_refuses_to_resume(model_dir, tmp_path):
    tiny_run(model_dir, tmp_path / "run", "d1", steps=1)
    with pytest.raises(ValueError, match="holds a checkpoint of a different configuration or initial model"):
        tiny_run(model_dir, tmp_path / "run", "d1", steps=1, lr=0.5)


def test_a_method_sample_override_is_called_with_the_documented_signature(trained_dir, tmp_path, monkeypatch):
    """`sample(policy, ref, prompt_ids, prompt_mask, sampler_cfg, generator, cfg)` replaces the rollout sampler."""
    from algorithms import d1
    from harness.sampler import generate

    calls = []

    def sample(policy, ref, prompt_ids, prompt_mask, sampler_cfg, generator, cfg):
        calls.append((policy is not ref, type(cfg).__name__, sampler_cfg.temperature))
        traj = generate(policy, prompt_ids, prompt_mask, sampler_cfg, generator)
        traj.extra["marker"] = torch.ones(len(prompt_ids))
        return traj

    monkeypatch.setattr(d1, "sample", sample, raising=False)
    run = tiny_run(trained_dir, tmp_path / "run", "d1", steps=1)
    # the rollout of step 1 at the sampler's temperature; greedy `eval_own` evaluations at steps 0 and 1
    assert calls == [(True, "Config", 0.0), (True, "Config", 0.9), (True, "Config", 0.0)]
    rows = runs.read_metrics(run / "metrics.jsonl")
    for row in rows:  # same decoder as the shared sampler here, so the two evaluations agree exactly
        assert {k: row[f"eval_own/{k}"] for k in ("reward", "accuracy", "nfe")} == \
               {k: row[f"eval/{k}"] for k in ("reward", "accuracy", "nfe")}


def test_variable_length_tuple_fields_take_any_number_of_values():
    """`tuple[float, ...]` fields (e.g. DiFFPO's gamma grid) accept a list of any length on the command line."""
    import argparse

    from algorithms import diffpo
    from harness.cli import add_fields, build

    parser = argparse.ArgumentParser()
    add_fields(parser, diffpo.Config(), "algo.")
    values = {k.removeprefix("algo."): v for k, v in vars(parser.parse_args(["--algo.gamma_grid", "0", "0.5", "2"])).items()}
    assert build(diffpo.Config(), values).gamma_grid == (0.0, 0.5, 2.0)
