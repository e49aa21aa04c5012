"""Tables and figures from a small synthetic results/summary.csv, and aggregation from synthetic run folders."""

import json
import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "workflow" / "scripts"))

import aggregate  # noqa: E402
import figures  # noqa: E402
import stats  # noqa: E402
import tables  # noqa: E402

METHODS = ["d1", "agrpo", "espo", "dmpo", "diffpo", "lfpo"]
NAMES = {"d1": "d1 (diffu-GRPO)", "diffpo": "DiFFPO"}


def synthetic_summary(methods=METHODS, tasks=("arithmetic", "sudoku"), seeds=3, steps=8, every=2) -> pd.DataFrame:
    """Runs whose test reward rises with the method's index, seeded noise; diffpo logs its own decoding and
    every run an entropy-bounded frontier at two gammas at its first and last step."""
    rng, rows = np.random.default_rng(0), []

    def add(task, algo, seed, step, metric, value):
        rows.append({"profile": "test", "task": task, "algo": algo, "seed": seed, "step": step, "metric": metric,
                     "value": float(value)})

    for task in tasks:
        nfe = 8.0 if task == "arithmetic" else 16.0
        for m in ("reward", "accuracy"):
            add(task, "base", 0, 0, f"pretrain/{m}", 0.3)
        add(task, "base", 0, 0, "pretrain/minutes", 2.5)
        add(task, "base", 0, 0, "bench/s", 160.0)
        add(task, "base", 0, 0, "bench/cpu_time", 30.0)
        add(task, "base", 0, 0, "lm_eval/gsm8k/exact_match/flexible-extract", 0.0)
        for i, algo in enumerate(methods):
            for seed in range(seeds):
                for step in range(steps + 1):
                    reward = 0.3 + 0.02 * i * step / steps + 0.01 * rng.standard_normal() * (step > 0)
                    if step:
                        add(task, algo, seed, step, "reward/mean", reward)
                        for phase, n in (("rollout", nfe), ("scoring", 2 + i), ("training", 12)):
                            add(task, algo, seed, step, f"forward/{phase}", n)
                        for phase, t in (("rollout", 0.3), ("scoring", 0.1 * i), ("update", 1.0)):
                            add(task, algo, seed, step, f"time/{phase}", t + 0.01 * seed)
                        add(task, algo, seed, step, "time/step", 1.3 + 0.1 * i + 0.03 * seed)
                    if step % every == 0:
                        add(task, algo, seed, step, "eval/reward", reward)
                        add(task, algo, seed, step, "eval/accuracy", reward / 2)
                        add(task, algo, seed, step, "eval/nfe", nfe)
                        if algo == "diffpo" and step:
                            add(task, algo, seed, step, "eval_own/reward", reward - 0.02)
                            add(task, algo, seed, step, "eval_own/nfe", nfe / 2)
                add(task, algo, seed, steps, "bench/s", 30 + i + seed)
                add(task, algo, seed, steps, "bench/max_rss", 500 + 10 * i)
                add(task, algo, seed, steps, "bench/cpu_time", 20 + i + seed)
                add(task, algo, seed, steps, "lm_eval/gsm8k/exact_match/flexible-extract", 0.01 * i)
                add(task, algo, seed, steps, "lm_eval/gsm8k/seconds", 3.0)
                add(task, algo, seed, steps, "lm_eval/gsm8k/sample_len", 16)
                for step, r in ((0, 0.3), (steps, reward)):  # the frontier of the initial and the final model
                    for g, frac in (("0.1", 0.8), ("10.0", 0.3)):
                        add(task, algo, seed, step, f"eval_eb{g}/reward", r - 0.1 * (frac < 0.5))
                        add(task, algo, seed, step, f"eval_eb{g}/nfe", frac * nfe)
    return pd.DataFrame(rows)


def synthetic_items(methods=METHODS, tasks=("arithmetic", "sudoku"), seeds=3, steps=8, n=40) -> pd.DataFrame:
    """Per-item rewards of each run's first and last evaluation: the final model of method i gets item j right
    where the base does, and also the items j < 2 i that the base gets wrong (the base: every odd item)."""
    rows = [{"profile": "test", "task": task, "algo": algo, "seed": seed, "step": step, "item": j,
             "reward": float(j % 2 or (step > 0 and j < 2 * i))}
            for task in tasks for i, algo in enumerate(methods) for seed in range(seeds) for step in (0, steps)
            for j in range(n)]
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def summary_csv(tmp_path_factory):
    path = tmp_path_factory.mktemp("results") / "summary.csv"
    synthetic_summary().to_csv(path, index=False)
    synthetic_items().to_csv(path.with_name("items.csv"), index=False)
    return path


def test_mean_ci_is_a_bootstrap_interval_around_the_mean():
    mean, low, high = stats.mean_ci([0.2, 0.3, 0.4, 0.5])
    assert mean == pytest.approx(0.35) and 0.2 <= low < mean < high <= 0.5
    assert stats.mean_ci([0.3, 0.3, 0.3]) == (0.3, 0.3, 0.3)
    assert np.isnan(stats.mean_ci([0.3])[1])


def test_results_table_has_base_row_methods_in_config_order_and_cis(summary_csv):
    items = stats.load(summary_csv.with_name("items.csv"))
    table = tables.results_table(stats.load(summary_csv), "reward", METHODS, NAMES, items)
    assert list(table.method) == ["base", "d1 (diffu-GRPO)", "agrpo", "espo", "dmpo", "DiFFPO",
                                  "DiFFPO, own decoding", "lfpo"]
    assert table.loc[0, "arithmetic reward %"] == "30.0"  # every run's step 0 agrees: no interval
    lfpo = table.set_index("method").loc["lfpo", "arithmetic reward %"]
    mean, low, high = (float(x) for x in lfpo.replace("[", "").replace(",", "").replace("]", "").split())
    assert low < mean < high and mean == pytest.approx(40.0, abs=2.0)  # 0.3 + 0.02 * 5, seeded noise
    assert table.set_index("method").loc["DiFFPO, own decoding", "sudoku NFE"] == "8.0"
    gain = table.set_index("method")["sudoku reward gain, paired"]
    assert gain["base"] == gain["DiFFPO, own decoding"] == "–" and gain["d1 (diffu-GRPO)"] == "0.0"
    mean, low, high = (float(x) for x in gain["lfpo"].replace("[", "").replace(",", "").replace("]", "").split())
    assert mean == 12.5 and 0 < low < mean < high < 30  # 5 of 40 items gained: a CI over items, all above 0


def test_paired_gain_is_per_item_final_minus_first_averaged_over_seeds():
    rows = [(seed, step, item, reward) for seed, step, rewards in (
        (0, 0, [0, 1, 0]), (0, 8, [1, 1, 0]), (1, 0, [0, 1, 0]), (1, 4, [0, 1, 1]), (1, 8, [0, 0, 1]))
        for item, reward in enumerate(rewards)]
    items = pd.DataFrame(rows, columns=["seed", "step", "item", "reward"])
    assert tables.gains(items).tolist() == [0.5, -0.5, 0.5]  # step 4 is neither the first nor the last


def test_compute_table_sums_forward_passes_and_time_per_run(summary_csv):
    table = tables.compute_table(stats.load(summary_csv), METHODS, NAMES).set_index(["task", "method"])
    assert table.loc[("arithmetic", "d1 (diffu-GRPO)"), "forward passes"] == str(8 * (8 + 2 + 12))
    assert table.loc[("arithmetic", "agrpo"), "training time s"] == f"{8 * (1.4 + 0.03):.1f}"
    assert table.loc[("all", "base (pretraining)"), "training time s"] == "150"
    assert table.loc[("all", "base (pretraining)"), "job wall time s"] == "160"
    assert table.loc[("sudoku", "agrpo"), "job wall time s"] == "32.0"  # 30 + 1 + mean seed 1
    assert "job CPU time s" not in table  # Snakemake's cpu_time stops at its last sample (30 s in)
    assert table.loc[("sudoku", "lfpo"), "peak memory MB"] == "550"


def test_tables_are_written_as_markdown_and_latex(summary_csv, tmp_path):
    outputs = [str(tmp_path / f"{stem}.{ext}") for stem in ("results", "compute", "lm_eval", "reference")
               for ext in ("md", "tex")]
    tables.main(summary_csv, summary_csv.with_name("items.csv"), ROOT / "paper" / "reported.csv", outputs, "reward",
                METHODS, NAMES)
    assert "| base " in (tmp_path / "results.md").read_text()
    assert "\\toprule" in (tmp_path / "results.tex").read_text()
    assert "| gsm8k/exact_match/flexible-extract " in (tmp_path / "lm_eval.md").read_text()
    reference = (tmp_path / "reference.md").read_text()
    assert "82.41" in reference and "specs/espo_dmpo.md B5" in reference


def test_lm_eval_table_has_a_row_per_metric_and_a_column_per_method(summary_csv):
    summary = stats.load(summary_csv)
    table = tables.lm_eval_table(summary, METHODS, NAMES)
    assert list(table.columns) == ["task", "lm-eval metric", "base", "d1 (diffu-GRPO)", "agrpo", "espo", "dmpo",
                                   "DiFFPO", "lfpo"]
    assert list(table["lm-eval metric"]) == ["gsm8k/exact_match/flexible-extract"] * 2  # seconds and counts are not scores
    assert table.loc[0, "lfpo"] == "0.050" and table.loc[0, "base"] == "0.000"
    empty = tables.lm_eval_table(summary[~summary.metric.str.startswith("lm_eval/")], METHODS, NAMES)
    assert "lm_eval.benchmarks is empty" in empty.iloc[0, 0]


def test_every_reported_number_cites_a_spec_section():
    reported = tables.reference_table(ROOT / "paper" / "reported.csv")
    assert len(reported) and reported.source.str.contains(r"specs/\w+\.md (?:§[\d.]+|[AB]\d)").all()
    assert not reported.method.isin(["AGRPO", "DiFFPO", "LFPO"]).any()  # none of theirs could be verified


def test_figures_are_written_as_pdf_and_png(summary_csv, tmp_path):
    outputs = [str(tmp_path / f"{stem}.{ext}") for stem in ("curve_step", "curve_forward", "curve_time",
                                                             "frontier", "time_breakdown") for ext in ("pdf", "png")]
    figures.main(summary_csv, outputs, "reward", METHODS, NAMES)
    for path in map(Path, outputs):
        assert path.stat().st_size > 5000, path


def test_curves_accumulate_forward_passes_and_time(summary_csv):
    data = figures.curves(stats.load(summary_csv).query("algo != 'base'"), "reward").set_index(["task", "algo", "step"])
    assert data.loc[("arithmetic", "d1", 0), "forward"] == 0
    assert data.loc[("arithmetic", "d1", 4), "forward"] == 4 * (8 + 2 + 12)
    assert data.loc[("sudoku", "espo", 8), "time"] == pytest.approx(8 * (1.3 + 0.2 + 0.03))


def test_aggregate_reads_only_run_folders(tmp_path):
    run = tmp_path / "results/runs/p/arithmetic/d1/seed1"
    (run / "eval").mkdir(parents=True)
    (run / "metrics.jsonl").write_text(json.dumps({"step": 0, "eval/reward": 0.25}) + "\n"
                                       + json.dumps({"step": 2, "loss": 0.5, "eval/reward": 0.5, "flag": True}) + "\n")
    (run / "timing.tsv").write_text("s\th:m:s\tmax_rss\n12.5\t0:00:12\t480.1\n")
    lm = {"results": {"arithmetic": {"alias": "arithmetic", "reward,none": 0.5, "reward_stderr,none": 0.1},
                      "gsm8k": {"exact_match,strict-match": 0.1}}, "versions": {"arithmetic": "1.0"},
          "harness": {"tasks": {"arithmetic": {"nfe_mean": 6.5, "nfe": [6, 7], "seconds": 2.0, "decoding": "eb"},
                                "gsm8k": {"nfe_mean": 40, "seconds": 3.0}}, "seconds": 5.0}}
    (run / "eval/step2.json").write_text(json.dumps(lm))
    base = tmp_path / "results/base/p"
    base.mkdir(parents=True)
    (base / "timing.tsv").write_text("s\th:m:s\tcpu_time\n190.0\t0:03:10\t188.4\n")
    (base / "pretrain.json").write_text(json.dumps(
        {"minutes": 2.5, "parameters": 1000, "test": {"arithmetic": {"reward": 0.3}, "sudoku": {"reward": 0.2}}}))
    files = [run / "metrics.jsonl", run / "timing.tsv", run / "eval/step2.json",
             base / "pretrain.json", base / "timing.tsv"]
    rows = pd.DataFrame(aggregate.aggregate([str(f) for f in files], ["arithmetic"]))
    got = {(r.algo, r.step, r.metric): r.value for r in rows.itertuples()}
    assert got == {
        ("base", 0, "pretrain/reward"): 0.3, ("base", 0, "pretrain/minutes"): 2.5,
        ("base", 0, "pretrain/parameters"): 1000.0, ("base", 0, "bench/s"): 190.0, ("base", 0, "bench/cpu_time"): 188.4,
        ("d1", 0, "eval/reward"): 0.25, ("d1", 2, "eval/reward"): 0.5, ("d1", 2, "loss"): 0.5,
        ("d1", 2, "bench/s"): 12.5, ("d1", 2, "bench/max_rss"): 480.1,
        ("d1", 2, "lm_eval/arithmetic/reward"): 0.5, ("d1", 2, "lm_eval/gsm8k/exact_match/strict-match"): 0.1,
        ("d1", 2, "lm_eval/arithmetic/nfe_mean"): 6.5, ("d1", 2, "lm_eval/gsm8k/nfe_mean"): 40.0,
        ("d1", 2, "lm_eval/arithmetic/seconds"): 2.0, ("d1", 2, "lm_eval/gsm8k/seconds"): 3.0,
    }
    assert set(rows.profile) == {"p"} and set(rows.task) == {"arithmetic"} and set(rows[rows.algo == "d1"].seed) == {1}
    (run / "test_items.jsonl").write_text("".join(json.dumps({"step": step, "reward": [step / 2, 0.5]}) + "\n"
                                                  for step in (0, 1, 2)))
    items = aggregate.item_rows([str(f) for f in files + [run / "test_items.jsonl"]])
    assert [(r["algo"], r["seed"], r["step"], r["item"], r["reward"]) for r in items] == [
        ("d1", 1, 0, 0, 0.0), ("d1", 1, 0, 1, 0.5), ("d1", 1, 2, 0, 1.0), ("d1", 1, 2, 1, 0.5)]  # first and last
    with pytest.raises(ValueError, match="not inside a run folder"):
        aggregate.aggregate([str(tmp_path / "elsewhere/metrics.jsonl")], ["arithmetic"])


def test_both_paper_sources_include_every_generated_table_and_figure():
    """main.md (HTML build) and main.tex (LaTeX build) are kept in step: the same tables and figures (those of
    rules/common.smk and of the fidelity study, rules/fidelity.smk)."""
    smk = "".join((ROOT / f"workflow/rules/{name}.smk").read_text() for name in ("common", "fidelity"))
    tables_, figures_ = (set().union(*(m.replace('"', "").split(", ") for m in re.findall(
        rf'^(?:FIDELITY_)?{name} = \[(.*?)\]', smk, re.M))) for name in ("TABLES", "FIGURES"))
    md, tex = (ROOT / "paper/main.md").read_text(), (ROOT / "paper/main.tex").read_text()
    assert set(re.findall(r"<!-- include tables/(\w+)\.md -->", md)) == tables_
    assert set(re.findall(r"\]\(figures/(\w+)\.png\)", md)) == figures_
    # a table float (\generated) or, for generated prose, the plain text (\input)
    assert set(re.findall(r"\\generated\{(\w+)\}", tex)) | set(re.findall(r"\\input\{tables/(\w+)\.tex\}", tex)) == tables_
    assert set(re.findall(r"\\plot\{(\w+)\}", tex)) == figures_
