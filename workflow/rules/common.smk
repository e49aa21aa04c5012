# Config validation, the run table (method x task x seed), the snapshot steps and the input functions.

import shlex
import shutil
import sys
import zlib
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
# Paper scale (config/paper.yaml): every run starts from MODEL (a hub id or folder, read at run time, not at
# planning time) instead of the tiny base built here, and train and lm-eval jobs run under `accelerate launch`.
MODEL = config.get("model")
LAUNCH = config.get("launch")


def launcher(key):
    """A job's `python -m harness`: as is, or under `launch` through `accelerate launch` with the profile's
    accelerate config and one process per GPU, on a rendezvous port derived from `key` (the job's first output),
    so that jobs sharing a node do not collide."""
    if not LAUNCH:
        return HARNESS
    port = 20000 + zlib.crc32(str(key).encode()) % 20000
    accelerate_config = shlex.quote(str(ROOT / LAUNCH["accelerate_config"]))
    return (f"PYTHONPATH={shlex.quote(str(ROOT))} {shlex.quote(sys.executable)} -m accelerate.commands.launch "
            f"--config_file {accelerate_config} --num_processes {LAUNCH['processes']} --main_process_port {port} "
            f"-m harness")


def job_resources(group, **defaults):
    """A rule's resources: its defaults (sized for this CPU) overridden by the profile's `resources.<group>` (GPUs,
    runtime, memory for the Slurm executor)."""
    return {**defaults, **config.get("resources", {}).get(group, {})}


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
# lm-eval of the real benchmarks on the final models of the first BENCHMARK_SEEDS seeds and on the base; the test
# evaluations on the training task, the inference frontier at GAMMAS included, are lm-eval's inside the train job.
BENCHMARKS = list(config["lm_eval"]["benchmarks"])
BENCHMARK_SEEDS = range(min(config["lm_eval"]["benchmark_seeds"], config["seeds"])) if BENCHMARKS else range(0)
GAMMAS = list(config["lm_eval"]["eb_gammas"])
# The final model is kept in snapshots/step{STEPS}/ when the benchmarks evaluate it.
FINAL_MODEL = bool(BENCHMARK_SEEDS)
TABLES = ["results", "compute", "lm_eval", "reference"]
FIGURES = ["curve_step", "curve_forward", "curve_time", "frontier", "time_breakdown"]
# The paper is also built with LaTeX when asked to, or ("auto") when latexmk is installed.
LATEX = config["paper"]["latex"] is True or (config["paper"]["latex"] == "auto" and shutil.which("latexmk") is not None)


wildcard_constraints:
    profile="[A-Za-z0-9_-]+",
    task="[A-Za-z0-9_]+",
    algo="[A-Za-z0-9_]+",
    seed=r"\d+",


def run_dirs():
    """(run folder, seed) of every method x task x seed."""
    return [(RUN.format(profile=PROFILE, task=t, algo=a, seed=s), s) for t in TASKS for a in ALGOS for s in SEEDS]


def flags(options, prefix="--"):
    """A config mapping as command-line flags: {steps: 10, betas: [0.9, 0.99]} -> '--steps 10 --betas 0.9 0.99'."""
    value = lambda v: " ".join(map(str, v)) if isinstance(v, list) else v
    return " ".join(f"{prefix}{k} {value(v)}" for k, v in options.items())


def train_flags(wildcards):
    shared = {**({"snapshot_every": STEPS} if FINAL_MODEL else {}), **({"eval_eb_gammas": GAMMAS} if GAMMAS else {}),
              **config["train"], **config.get("train_overrides", {}).get(wildcards.algo, {})}
    return f'{flags(shared)} {flags(config["algo_args"].get(wildcards.algo, {}), "--algo.")}'


def base_eval_files():
    return [f"{BASE}/eval/step0.json"] if BENCHMARK_SEEDS else []


def run_eval_files(run, seed):
    return [f"{run}/eval/step{STEPS}.json"] if seed in BENCHMARK_SEEDS else []


def summary_inputs():
    files = [] if MODEL else [f"{BASE}/pretrain.json", f"{BASE}/timing.tsv"]
    for run, seed in run_dirs():
        files += [f"{run}/metrics.jsonl", f"{run}/test_items.jsonl", f"{run}/timing.tsv", *run_eval_files(run, seed)]
    return files + base_eval_files()


def final_outputs():
    return (
        ["results/summary.csv"]
        + expand("paper/tables/{name}.{ext}", name=TABLES, ext=["md", "tex"])
        + expand("paper/figures/{name}.{ext}", name=FIGURES, ext=["pdf", "png"])
        + paper_outputs()
    )


def paper_outputs():
    return ["paper/build/paper.md", "paper/build/paper.html"] + (["paper/build/main.pdf"] if LATEX else [])
