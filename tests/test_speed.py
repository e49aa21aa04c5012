"""The speed benchmark (`python -m harness.bench`) on a toy budget: its outputs, its FLOP counts, its
token-identity figure. Nothing here is timed; the speed figures themselves live in the benchmark."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

import algorithms
from harness import bench
from harness.tiny import TinyMDLM, TinyMDLMConfig


def test_flop_count_includes_attention_and_pins_the_formula():
    cfg = TinyMDLMConfig(vocab_size=50, hidden_size=32, num_attention_heads=2, num_hidden_layers=3, intermediate_size=48)
    model, (B, S) = TinyMDLM(cfg).eval(), (3, 10)
    d, inner, V = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    per_token = cfg.num_hidden_layers * (2 * d * 3 * d + 2 * d * d + 2 * d * 2 * inner + 2 * inner * d) + 2 * d * V
    attention = cfg.num_hidden_layers * 2 * 2 * B * S * S * d  # Q K^T and A V over every head
    with torch.no_grad():
        assert bench.counted(lambda: model(input_ids=torch.zeros(B, S, dtype=torch.long)))[1] == B * S * per_token + attention
        # logits kept for 4 positions: the last layer's queries, MLP and head run there only
        kept = bench.counted(lambda: model(input_ids=torch.zeros(B, S, dtype=torch.long), logits_to_keep=torch.arange(4)))[1]
    last_layer_saved = (S - 4) * B * (2 * d * d + 2 * d * 2 * inner + 2 * inner * d + 2 * d * V) + 2 * 2 * B * (S - 4) * S * d
    assert kept == B * S * per_token + attention - last_layer_saved


@pytest.fixture(scope="module")
def bench_out(trained_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("perf")
    table = bench.main(["--model", str(trained_dir), "--out", str(out), "--task", "sudoku", "--threads", "1",
                        "--repeats", "1", "--batch", "8", "--long_length", "8", "--long_block", "4", "--eval_limit", "12", "--train_steps", "1"])
    return out, table


def test_bench_writes_every_figure(bench_out):
    out, table = bench_out
    for name in ("equal_steps", "frontier", "equal_accuracy", "forward", "allocator", "rl_step", "summary"):
        assert not pd.read_csv(out / f"{name}.csv").empty, name
    assert (out / "table.md").read_text().startswith("| figure")
    assert (out / "table.tex").read_text().startswith(r"\begin{tabular}")
    assert set(table.met) <= {"yes", "no", ""} and (out / "run.json").exists()


def test_equal_steps_exact_mode_matches_the_reference_and_counts_fewer_flops(bench_out):
    steps = pd.read_csv(bench_out[0] / "equal_steps.csv").set_index(["workload", "sampler"])
    for workload in ("task", "long"):
        ref, exact, dual = (steps.loc[(workload, s)] for s in ("reference", "exact", "dual"))
        assert exact.token_match == 1.0 and ref.speedup == 1.0
        # the reference encodes the whole canvas every step: S positions per step, L steps, L tokens
        assert ref.amplification == pytest.approx(ref.prompt_length + ref.gen_length)
        assert dual.flops_per_token < exact.flops_per_token < ref.flops_per_token
    assert steps.loc[("rollout", "exact")].temperature > 0 and pd.isna(steps.loc[("rollout", "exact")].token_match)


def test_frontier_and_equal_accuracy_pick(bench_out):
    out = bench_out[0]
    frontier, acc = pd.read_csv(out / "frontier.csv"), pd.read_csv(out / "equal_accuracy.csv")
    assert frontier.setting.iloc[0] == "reference" and frontier.delta.iloc[0] == 0
    chosen = acc[acc.chosen].iloc[0]
    row = frontier.set_index("setting").loc[chosen.setting]
    assert row.delta >= -0.01  # within one point of the reference
    within = frontier[(frontier.delta >= -0.01) & (frontier.setting != "reference")]
    assert row.flops_per_token == within.flops_per_token.min()  # and the cheapest such setting
    assert (frontier.nfe[frontier.setting.str.startswith("steps=1 ")] == 1).all()


def test_rl_step_covers_every_method(bench_out):
    rl = pd.read_csv(bench_out[0] / "rl_step.csv")
    assert sorted(rl.method) == sorted(algorithms.ALGORITHMS)
    shares = rl[["rollout_share", "scoring_share", "update_share"]]
    assert ((shares >= 0) & (shares <= 1)).all().all() and (shares.sum(axis=1) - 1).abs().max() < 1e-5  # CSVs keep 6 digits
    assert (rl.forward_rollout > 0).all()
