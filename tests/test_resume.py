"""Resume anywhere: `python -m harness train` SIGKILLed at chosen and at random points, restarted (also after
deleting config.json and metrics.jsonl, as Snakemake's --rerun-incomplete does), ends with metrics and weights
bit-identical to a run that was never stopped."""

from __future__ import annotations

import hashlib
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from harness import runs
from harness.cli import main
from harness.train import TrainConfig, train
from tests.conftest import make_model
from tests.test_algorithms import tiny_run, untimed

ROOT = Path(__file__).resolve().parent.parent
STEPS = 4

# Runs `python -m harness train ARGS`, SIGKILLing itself at the point named by argv[1] ("-" = never):
#   state:N    the N-th checkpoint write, after the model files and before state.pt (a half-written temporary)
#   swap:N     the N-th checkpoint swap, between its two renames (no `checkpoint/`, only `.checkpoint.old`)
#   update:N   the N-th optimizer update, i.e. inside a step, between inner iterations
#   metrics:N  the N-th metrics.jsonl write, before its rename (a temporary next to the old file)
DRIVER = """import os, signal, sys
import torch
point, n = sys.argv[1].split(":") if sys.argv[1] != "-" else ("-", 0)
calls = [0]

def hit():
    calls[0] += 1
    if calls[0] == int(n):
        os.kill(os.getpid(), signal.SIGKILL)

real_replace, real_save, real_update = os.replace, torch.save, torch.optim.AdamW.step

def replace(src, dst, **kw):
    if point == "metrics" and str(dst).endswith("metrics.jsonl"):
        hit()
    real_replace(src, dst, **kw)
    if point == "swap" and str(dst).endswith(".checkpoint.old"):
        hit()

def save(obj, path, *a, **kw):
    if point == "state" and str(path).endswith("state.pt"):
        hit()
    return real_save(obj, path, *a, **kw)

def update(self, *a, **kw):
    if point == "update":
        hit()
    return real_update(self, *a, **kw)

os.replace, torch.save, torch.optim.AdamW.step = replace, save, update
from harness.cli import main
from harness.train import TrainConfig, train
main(["train", *sys.argv[2:]])
"""


def train_args(model, out) -> list[str]:
    return ["--algo", "d1", "--task", "sudoku", "--model", str(model), "--out", str(out), "--steps", str(STEPS),
            "--prompts_per_step", "2", "--group_size", "4", "--micro_batch_size", "4", "--eval_limit", "4",
            "--eval_every", "2", "--save_every", "1", "--lr", "1e-3", "--threads", "1", "--algo.num_iterations", "2"]


def launch(point: str, model, out) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", DRIVER, point, *train_args(model, out)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def started(run: Path, since: float) -> bool:
    """Imports and model loading are done: the launch has (re)written config.json."""
    config = run / "config.json"
    return config.exists() and config.stat().st_mtime >= since


def outcome(run: Path) -> tuple[list[dict], str]:
    weights = hashlib.sha256((run / "checkpoint/model/model.safetensors").read_bytes()).hexdigest()
    return untimed(runs.read_metrics(run / "metrics.jsonl")), runs.read_metrics(run / "test_items.jsonl"), weights


@pytest.fixture(scope="module")
def reference(trained_dir, tmp_path_factory):
    """The uninterrupted run, in-process through the same CLI, and the seconds from writing config.json (after
    loading the model) to the end."""
    out = tmp_path_factory.mktemp("reference") / "run"
    main(["train", *train_args(trained_dir, out)])
    assert any(row["reward/std"] > 0 for row in runs.read_metrics(out / "metrics.jsonl")[1:])  # a real signal
    return outcome(out), time.time() - (out / "config.json").stat().st_mtime


def test_killed_in_checkpoint_writes_steps_and_metrics_writes_resumes_bit_identically(trained_dir, tmp_path,
                                                                                     reference):
    run = tmp_path / "run"
    # each launch resumes from the last complete checkpoint of the previous one and is killed again
    for point in ("state:2", "update:3", "swap:1", "metrics:2"):
        proc = launch(point, trained_dir, run)
        assert proc.wait(300) == -signal.SIGKILL, f"{point}: {proc.stderr.read()[-3000:]}"
        proc.stderr.close()
        if point == "swap:1":
            assert not (run / "checkpoint").exists() and (run / ".checkpoint.old/state.pt").exists()
            # Snakemake deletes a failed job's outputs before rerunning it
            for name in ("metrics.jsonl", "test_items.jsonl", "config.json"):
                (run / name).unlink()
    assert list(run.glob(".metrics.jsonl.*")), "the metrics:2 kill should leave a temporary behind"
    proc = launch("-", trained_dir, run)
    assert proc.wait(300) == 0, proc.stderr.read()[-3000:]
    proc.stderr.close()
    assert outcome(run) == reference[0]
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint", "config.json", "metrics.jsonl", "provenance.json",
                                                     "test_items.jsonl"]


def test_killed_at_random_times_resumes_bit_identically(trained_dir, tmp_path, reference):
    rng, run, kills = random.Random(), tmp_path / "run", []
    for _ in range(2):
        done = len(runs.read_metrics(run / "metrics.jsonl"))  # steps done so far (+1 for step 0)
        launched, proc = time.time(), launch("-", trained_dir, run)
        while proc.poll() is None and not started(run, launched):
            time.sleep(0.02)
        time.sleep(rng.uniform(0, reference[1] * (STEPS + 1 - done) / (STEPS + 1)))  # somewhere in what is left
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(60) in (-signal.SIGKILL, 0), proc.stderr.read()[-3000:]
        proc.stderr.close()
        kills.append((done, len(runs.read_metrics(run / "metrics.jsonl"))) if proc.returncode else "finished")
    proc = launch("-", trained_dir, run)
    assert proc.wait(300) == 0, proc.stderr.read()[-3000:]
    proc.stderr.close()
    assert outcome(run) == reference[0], f"killed (metrics rows before, after): {kills}"


def test_a_checkpoint_of_another_base_is_an_error_or_with_restart_if_changed_discarded(model_dir, tokenizer, tmp_path):
    """What Snakemake reruns after the base was retrained: same config, new initial weights."""
    base = tmp_path / "base"
    shutil.copytree(model_dir, base)
    tiny_run(base, tmp_path / "run", "d1", steps=1)
    runs.save_model(make_model(tokenizer, seed=1), tokenizer, base)
    with pytest.raises(ValueError, match="holds a checkpoint of a different configuration or initial model"):
        tiny_run(base, tmp_path / "run", "d1", steps=1)
    restarted = tiny_run(base, tmp_path / "run", "d1", steps=1, restart_if_changed=True)
    fresh = tiny_run(base, tmp_path / "fresh", "d1", steps=1)
    assert outcome(restarted) == outcome(fresh)


def test_an_interrupted_workflow_job_resumes_bit_identically(trained_dir, tmp_path):
    """Snakemake SIGKILLed with its train job after the checkpoint of step 2; `snakemake --unlock` and
    `--rerun-incomplete` delete the job's outputs (metrics.jsonl, test_items.jsonl, config.json, snapshots/) and
    rerun it: the harness resumes and restores them, and the run ends as one that was never stopped."""
    from tests.test_workflow import snakemake

    work, config = tmp_path / "work", yaml.safe_load((ROOT / "config/smoke.yaml").read_text())
    base, run = work / "results/base/resume", work / "results/runs/resume/sudoku/d1/seed0"
    shutil.copytree(trained_dir, base)  # the fixture's base stands in for the pretrain rule's output
    (base / "pretrain.json").write_text("{}")
    config.update(profile="resume", algorithms=["d1"], tasks=["sudoku"])
    config["train"].update(steps=6, save_every=1, eval_every=3, snapshot_every=2)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    where = ("--snakefile", str(ROOT / "workflow/Snakefile"), "--directory", str(work), "--configfile",
             str(tmp_path / "config.yaml"))
    job = (*where, "--cores", "1", str(run.relative_to(work) / "metrics.jsonl"))

    proc = subprocess.Popen([sys.executable, "-m", "snakemake", *job], cwd=ROOT, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while proc.poll() is None and not (run / "checkpoint/snapshots/step2").exists():
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert snakemake(*where, "--unlock").returncode == 0
    done = snakemake(*job, "--rerun-incomplete", timeout=300)
    assert done.returncode == 0, done.stdout[-3000:]
    assert re.search(r"resuming .* from its checkpoint of step [2-5]", (run / "train.log").read_text())

    reference = train(TrainConfig(algo="d1", task="sudoku", model=str(base), out=str(tmp_path / "reference"),
                                  profile="resume", threads=1, eval_eb_gammas=tuple(config["lm_eval"]["eb_gammas"]),
                                  **config["train"]))
    assert outcome(run) == outcome(reference)
    for step in (2, 4, 6):
        snapshot = [(folder / f"snapshots/step{step}/model.safetensors").read_bytes() for folder in (run, reference)]
        assert snapshot[0] == snapshot[1], step
