"""The Snakemake workflow: lint, dry runs, config validation, method discovery, and the smoke profile end to
end in a temporary directory (summary.csv, tables, figures, paper, report; regenerating retrains nothing)."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
METHODS = sorted(p.stem for p in (ROOT / "algorithms").glob("*.py") if not p.stem.startswith("_"))
PROFILES = sorted(p.name for p in (ROOT / "config").glob("*.yaml"))  # every profile, a paper.yaml included
LM_EVAL = {True: {"lm_eval": {"benchmarks": ["gsm8k", "hellaswag"], "benchmark_seeds": 2, "limit": 2,
                               "eb_gammas": [0.5, 2.0]}},
           False: {"lm_eval": {"benchmarks": [], "benchmark_seeds": 1, "limit": 2, "eb_gammas": []}}}


def snakemake(*args: str, cwd: Path = ROOT, timeout: int = 120) -> subprocess.CompletedProcess:
    """`snakemake ARGS` with stderr folded into stdout (Snakemake reports errors on either)."""
    return subprocess.run([sys.executable, "-m", "snakemake", *args], cwd=cwd, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout)


def job_counts(output: str) -> dict[str, int]:
    """The 'Job stats' table of a dry run: {rule: count}."""
    table = output.split("Job stats:")[1].split("\n\n")[0]
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M) if m[1] != "total"}


def copy_project(dest: Path) -> Path:
    """What a workflow run needs from a checkout: the workflow, its configs, the methods and paper sources."""
    for folder in ("workflow", "config", "algorithms", "paper"):
        shutil.copytree(ROOT / folder, dest / folder, ignore=shutil.ignore_patterns("build", "tables", "figures"))
    return dest


def test_lint_finds_nothing_but_the_missing_conda_environments():
    """One Python environment (environment.yml) serves every rule, so no rule names a conda env."""
    done = snakemake("--lint")
    lints = re.findall(r"^\s+\* (.+?):?$", done.stdout, re.M)
    assert lints and set(lints) == {"Specify a conda environment or container for each rule."}, lints


@pytest.mark.parametrize("lm_eval", [False, True])
@pytest.mark.parametrize("profile", PROFILES)
def test_dry_run_plans_every_method_task_and_seed(profile, lm_eval, tmp_path):
    cfg = yaml.safe_load((ROOT / "config" / profile).read_text())
    """The train jobs of the grid; with lm-eval on, a benchmark job per run of the first benchmark_seeds seeds and
    one for the base, the frontier's gammas passed to training (evaluated in the train job); with it off, no lm-eval
    job, no snapshot and no frontier."""
    (tmp_path / "lm_eval.yaml").write_text(yaml.safe_dump(LM_EVAL[lm_eval]))
    done = snakemake("-n", "-p", "--configfile", f"config/{profile}", str(tmp_path / "lm_eval.yaml"))
    assert done.returncode == 0, done.stdout[-3000:]
    counts = job_counts(done.stdout)
    methods = METHODS if cfg["algorithms"] == "all" else cfg["algorithms"]
    runs = len(methods) * len(cfg["tasks"]) * cfg["seeds"]
    assert counts["train"] == runs
    assert {"aggregate", "tables", "figures", "paper"} <= set(counts)
    if lm_eval:
        assert counts["lm_eval_base"] == 1 and "lm_eval_frontier" not in counts
        assert counts["lm_eval_benchmarks"] == runs // cfg["seeds"] * min(2, cfg["seeds"])
        assert "--tasks gsm8k,hellaswag --limit 2 " in done.stdout
        assert done.stdout.count("--eval_eb_gammas 0.5 2.0 ") == runs
        assert f"--snapshot_every {cfg['train']['steps']}" in done.stdout
    else:
        assert not any(rule.startswith("lm_eval") for rule in counts)
        assert "--snapshot_every" not in done.stdout and "--eval_eb_gammas" not in done.stdout


@pytest.mark.parametrize("override, message", [
    ("seedz=3", "Additional properties are not allowed ('seedz' was unexpected)"),
    ("seeds=two", "'two' is not of type 'integer'"),
    ("algorithms=[nope]", "unknown method(s) ['nope']"),
])
def test_bad_config_is_rejected_with_a_clear_message(override, message):
    done = snakemake("-n", "--config", override)
    assert done.returncode != 0 and message in done.stdout


def test_a_new_method_file_joins_the_grid_with_no_other_edit(tmp_path):
    project = copy_project(tmp_path)
    shutil.copy(ROOT / "algorithms" / "d1.py", project / "algorithms" / "zz_throwaway.py")
    done = snakemake("-n", "--configfile", "config/smoke.yaml", cwd=project)
    assert done.returncode == 0, done.stdout[-3000:]
    assert "results/runs/smoke/arithmetic/zz_throwaway/seed0/metrics.jsonl" in done.stdout
    assert job_counts(done.stdout)["train"] == len(METHODS) + 1


def test_smoke_workflow_end_to_end(tmp_path):
    """Every method trains, and summary.csv, the tables, the figures, the paper and the report come out; then
    regenerating the paper from the existing results retrains nothing."""
    work = tmp_path / "work"
    shutil.copytree(ROOT / "paper", work / "paper", ignore=shutil.ignore_patterns("build", "tables", "figures"))
    args = ("--snakefile", str(ROOT / "workflow" / "Snakefile"), "--directory", str(work),
            "--configfile", str(ROOT / "config" / "smoke.yaml"))
    done = snakemake(*args, "--cores", "2", timeout=900)
    assert done.returncode == 0, done.stdout[-5000:]

    summary = pd.read_csv(work / "results" / "summary.csv")
    assert list(summary.columns) == ["profile", "task", "algo", "seed", "step", "metric", "value"]
    assert set(summary.algo) == {"base", *METHODS} and set(summary.profile) == {"smoke"}
    evals = summary[summary.metric == "eval/reward"]
    for algo in METHODS:
        assert sorted(evals[evals.algo == algo].step) == [0, 1, 2], algo
        assert (summary[(summary.algo == algo)].metric == "bench/s").sum() == 1
    for algo in ["base", *METHODS]:  # smoke.yaml: gsm8k on the final models of seed 0 and the base
        rows = summary[summary.algo == algo].set_index("metric").value
        assert rows["lm_eval/gsm8k/nfe_mean"] > 0 and 0 <= rows["lm_eval/gsm8k/exact_match/strict-match"] <= 1, algo
    frontier = summary[summary.metric == "eval_eb1.0/nfe"]  # gamma 1.0: the initial and the final model of every run
    assert sorted(frontier.algo) == sorted(METHODS * 2) and set(frontier.step) == {0, 2}
    assert (frontier.value <= 8).all()  # at most one step per token of arithmetic's 8-token canvas
    results = (work / "paper/tables/results.md").read_text()
    assert all(f"| {algo} " in results for algo in METHODS)  # smoke.yaml sets no display names
    for name in ("curve_step", "curve_forward", "curve_time", "frontier", "time_breakdown", "fidelity"):
        assert (work / f"paper/figures/{name}.png").stat().st_size > 5000
    exact = pd.read_csv(work / "results/fidelity/exact.csv")  # the fidelity study on the smoke base
    assert len(exact) == 2 * 2 * 2 * 4  # two batches x two samplers' rollouts x 2 prompts x 4 completions
    fidelity = (work / "paper/tables/fidelity.md").read_text()
    assert all(f"| {m} " in fidelity for m in ("d1", "agrpo", "espo", "dmpo", "diffpo", "lfpo"))
    html = (work / "paper/build/paper.html").read_text()
    assert "data:image/png;base64," in html and "<table>" in html

    (work / "results/summary.csv").unlink()
    shutil.rmtree(work / "paper/figures")
    again = snakemake(*args, "--cores", "2", timeout=300)
    assert again.returncode == 0, again.stdout[-3000:]
    assert set(job_counts(again.stdout)) == {"aggregate", "tables", "figures", "fidelity_report", "paper", "all"}

    report = snakemake(*args, "--report", str(work / "report.html"), timeout=300)
    assert report.returncode == 0, report.stdout[-3000:]
    assert (work / "report.html").stat().st_size > 100_000
