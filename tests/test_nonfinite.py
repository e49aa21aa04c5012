"""NaN/Inf in the loss or the gradients: the run stops naming the step, the inner iteration and the last good
checkpoint, or, with `nonfinite_skips`, drops that optimizer step, counts it and stops after too many in a row."""

from __future__ import annotations

import re

import pytest

from algorithms import d1
from harness import runs
from harness.train import TrainConfig, train

MU = 2  # optimizer steps per RL step; one micro-batch each, so loss call k is step (k-1)//MU+1, iteration (k-1)%MU


@pytest.fixture
def poison(monkeypatch):
    """poison(kind, calls): d1's loss returns a NaN loss ("loss") or a finite loss with NaN gradients ("grad")
    at the given 1-based loss calls."""
    def arm(kind: str, calls: set[int]):
        real, count = d1.loss, [0]

        def loss(policy, ref, batch, cfg):
            value, metrics = real(policy, ref, batch, cfg)
            count[0] += 1
            if count[0] in calls and kind == "loss":
                value = value * float("nan")
            elif count[0] in calls:
                zero = next(policy.parameters()).sum() * 0.0
                zero.register_hook(lambda grad: grad * float("nan"))
                value = value + zero  # the loss stays finite, the gradients do not
            return value, metrics

        monkeypatch.setattr(d1, "loss", loss)
    return arm


def tiny_d1(model_dir, out, **overrides):
    settings = dict(algo="d1", task="sudoku", model=str(model_dir), out=str(out), steps=3, prompts_per_step=2,
                    group_size=4, micro_batch_size=8, eval_every=3, eval_limit=4, save_every=1, lr=1e-3)
    return train(TrainConfig(**{**settings, **overrides}), d1.Config(num_iterations=MU))


def test_nan_loss_stops_naming_step_iteration_and_last_checkpoint(model_dir, tmp_path, poison):
    poison("loss", {3})
    ckpt = tmp_path / "run" / "checkpoint"
    with pytest.raises(FloatingPointError, match=rf"non-finite loss \(nan\) at step 2, inner iteration 0; the last "
                                                 rf"good checkpoint is {re.escape(str(ckpt))} \(step 1\); lower --lr"):
        tiny_d1(model_dir, tmp_path / "run")
    assert runs.load_state(ckpt)["step"] == 1


def test_nan_gradient_stops_before_any_checkpoint(model_dir, tmp_path, poison):
    poison("grad", {2})
    with pytest.raises(FloatingPointError, match=r"non-finite gradient norm \(nan\) at step 1, inner iteration 1; "
                                                 r"the last good checkpoint is none \(nothing saved yet\)"):
        tiny_d1(model_dir, tmp_path / "run")


def test_skip_policy_drops_the_update_and_counts_it(model_dir, tmp_path, poison):
    poison("grad", {2, 5, 6})  # step 1 iteration 1; step 3 both iterations (2 in a row)
    run = tiny_d1(model_dir, tmp_path / "run", nonfinite_skips=2)
    rows = runs.read_metrics(run / "metrics.jsonl")
    assert [r["nonfinite/skipped"] for r in rows[1:]] == [1, 0, 2]
    assert rows[3]["loss"] is None and rows[3]["grad_norm"] is None and "algo/clip_fraction" in rows[2] and "algo/clip_fraction" not in rows[3]
    assert rows[1]["loss"] is not None and rows[2]["grad_norm"] > 0
    # AdamW counted 3 of the 6 updates: the skipped ones never reached the optimizer
    steps = {float(s["step"]) for s in runs.load_state(run / "checkpoint")["optimizer"]["state"].values()}
    assert steps == {3.0}


def test_skip_policy_still_stops_after_too_many_in_a_row(model_dir, tmp_path, poison):
    poison("loss", {2, 3, 4})  # step 1 iteration 1, step 2 iterations 0 and 1
    with pytest.raises(FloatingPointError, match=r"non-finite loss \(nan\) at step 2, inner iteration 1 \(3 in a "
                                                 r"row\); the last good checkpoint is .* \(step 1\)"):
        tiny_d1(model_dir, tmp_path / "run", nonfinite_skips=2)
