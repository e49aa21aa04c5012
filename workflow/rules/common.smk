# Config validation, the run table (method x task x seed), the snapshot steps and the input functions.

import shlex
import shutil
import sys
from pathlib import Path

from snakemake.utils import validate


validate(config, "../schemas/config.schema.yaml")

ROOT = Path(workflow.basedir).parent
PROFILE = config["profile"]
BASE = f"results/base/{PROFILE}"
RUN = "results/runs/{profile}/{task}/{algo}/seed{seed}"
# The harness of this checkout, run by the interpreter that runs Snakemake (the project's environment), from
# any working directory (--directory): `OMP_NUM_THREADS={threads} {params.harness} train ...`.
HARNESS = f"PYTHONPATH={shlex.quote(str(ROOT))} {shlex.quote(sys.executable)} -m harness"


def discover_methods():
    """Every non-underscore module in algorithms/, by file stem: the convention of algorithms/__init__.py
    (read from the folder, not imported, so that planning the DAG does not load torch)."""
    return sorted(p.stem for p in (ROOT / "algorithms").glob("*.py") if not p.stem.startswith("_"))


ALGOS = discover_methods() if config["algorithms"] == "all" else list(config["algorithms"])
if set(ALGOS) - set(discover_methods()):
    raise ValueError(
        f"config algorithms: unknown method(s) {sorted(set(ALGOS) - set(discover_methods()))}; "
        f"algorithms/ holds {discover_methods()}"
    )
TASKS = list(config["tasks"])
SEEDS = list(range(config["seeds"]))
STEPS = config["train"]["steps"]
LM_EVAL = config["lm_eval"]["enabled"]
# Steps whose model the run keeps in snapshots/step{N}/ for lm-eval: every snapshot_every and the last.
SNAPSHOTS = sorted({*range(config["lm_eval"]["snapshot_every"], STEPS + 1, config["lm_eval"]["snapshot_every"]), STEPS})
GAMMAS = [str(g) for g in config["lm_eval"]["eb_gammas"]]
TABLES = ["results", "compute", "lm_eval", "reference"]
FIGURES = ["curve_step", "curve_forward", "curve_time", "frontier", "time_breakdown"]
# The paper is also built with LaTeX when asked to, or ("auto") when latexmk is installed.
LATEX = config["paper"]["latex"] is True or (config["paper"]["latex"] == "auto" and shutil.which("latexmk") is not None)


wildcard_constraints:
    profile="[A-Za-z0-9_-]+",
    task="[A-Za-z0-9_]+",
    algo="[A-Za-z0-9_]+",
    seed=r"\d+",
    step=r"\d+",
    gamma=r"[0-9.]+|inf",


def run_dirs():
    return [RUN.format(profile=PROFILE, task=t, algo=a, seed=s) for t in TASKS for a in ALGOS for s in SEEDS]


def flags(options, prefix="--"):
    """A config mapping as command-line flags: {steps: 10} -> '--steps 10'."""
    return " ".join(f"{prefix}{k} {v}" for k, v in options.items())


def train_flags(wildcards):
    shared = {**config["train"], **({"snapshot_every": config["lm_eval"]["snapshot_every"]} if LM_EVAL else {})}
    return f'{flags(shared)} {flags(config["algo_args"].get(wildcards.algo, {}), "--algo.")}'


def eval_tasks(task, step):
    """The run's own task at every snapshot; at the last step also the configured lm-eval tasks."""
    extra = config["lm_eval"]["tasks"] if int(step) == STEPS else []
    return ",".join(dict.fromkeys([task, *extra]))


def run_eval_files(run):
    if not LM_EVAL:
        return []
    return [f"{run}/eval/step{n}.json" for n in SNAPSHOTS] + [f"{run}/eval/eb{g}.json" for g in GAMMAS]


def summary_inputs():
    files = [f"{BASE}/pretrain.json", f"{BASE}/timing.tsv"]
    for run in run_dirs():
        files += [f"{run}/metrics.jsonl", f"{run}/timing.tsv", *run_eval_files(run)]
    if LM_EVAL:
        files += [f"{BASE}/eval/step0.json"] + [f"{BASE}/eval/eb{g}.json" for g in GAMMAS]
    return files


def final_outputs():
    return (
        ["results/summary.csv"]
        + expand("paper/tables/{name}.{ext}", name=TABLES, ext=["md", "tex"])
        + expand("paper/figures/{name}.{ext}", name=FIGURES, ext=["pdf", "png"])
        + paper_outputs()
    )


def paper_outputs():
    return ["paper/build/paper.md", "paper/build/paper.html"] + (["paper/build/main.pdf"] if LATEX else [])
