"""`accelerate launch` with 2 CPU processes (gloo DDP, and DeepSpeed ZeRO-2 through DeepSpeed's CPU accelerator
over gloo) trains exactly what one process trains with the same rollout chunks: groups span the processes (3 prompts x G = 4 split 6 + 6 rows), the rewards and rows are gathered,
`prepare` sees the whole batch, and the gradients are summed over the processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import algorithms
from harness import runs
from tests.test_algorithms import tiny_run, untimed

ROOT = Path(__file__).resolve().parent.parent
# accelerate's `--cpu` starts ONE process on one machine; `--multi_gpu` with ACCELERATE_USE_CPU=1 starts gloo processes.
# DeepSpeed runs on CPU with DS_ACCELERATOR=cpu, without ACCELERATE_USE_CPU (with it accelerate drops DeepSpeed):
# ZeRO-2 partitions the optimizer state and the gradients over the 2 processes, and steps the optimizer itself.
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
          "--mixed_precision", "no", "--dynamo_backend", "no"]
LAUNCHERS = {"ddp": ["--multi_gpu"], "zero2": ["--use_deepspeed", "--zero_stage", "2"]}
# d1 with full fine-tuning; DMPO (weights from a softmax over each group of log-likelihood ratios: groups must be
# whole in `prepare`) and LFPO (its reference is a second adapter, called inside the DDP loss) with LoRA, without
# LoRA dropout: its masks come from each process's own random stream, so with it 2 processes differ from 1 by chance.
LORA = {"lora_rank": 4, "lora_alpha": 8.0, "lora_dropout": 0.0}
RUNS = {"d1": {}, "dmpo": LORA, "lfpo": LORA}
SETTINGS = dict(steps=2, prompts_per_step=3, group_size=4, micro_batch_size=3, rollout_batch_size=3, eval_every=2,
                eval_limit=4, save_every=2)
# what differs between one process and two by construction: wall times, and forward passes counted per process
COUNTED = ("forward/", "sequences/", "peak_rss_mb", "tokens_per_s")


def flags(options: dict) -> list[str]:
    return [x for k, v in options.items() for x in (f"--{k}", str(v))]


def comparable(rows):
    return [{k: v for k, v in r.items() if not k.startswith(COUNTED)} for r in untimed(rows)]


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_two_processes_train_what_one_process_trains(launcher, trained_dir, tmp_path):
    script = tmp_path / "launch.py"  # one launch trains the three runs one after the other
    script.write_text("from harness.cli import main\n" + "".join(
        f"main({['train', '--algo', algo, '--task', 'sudoku', '--model', str(trained_dir), '--lr', '1e-3', '--out', str(tmp_path / 'two' / algo), *flags({**SETTINGS, **extra, 'algo.num_iterations': 2})]!r})\n"
        for algo, extra in RUNS.items()))
    done = subprocess.run([*LAUNCH, *LAUNCHERS[launcher], str(script)], cwd=ROOT, capture_output=True, text=True,
                          timeout=900, env={**os.environ, "PYTHONPATH": str(ROOT),
                                            **({"DS_ACCELERATOR": "cpu"} if launcher == "zero2" else {"ACCELERATE_USE_CPU": "1"})})
    assert done.returncode == 0, done.stderr[-4000:]
    for algo, extra in RUNS.items():
        one = tiny_run(trained_dir, tmp_path / "one" / algo, algo, **SETTINGS, **extra,
                       algo_cfg=algorithms.get(algo).Config(num_iterations=2))
        two = tmp_path / "two" / algo
        provenance = json.loads((two / "provenance.json").read_text())
        expected = {"ddp": "MULTI_CPU", "zero2": "DEEPSPEED"}[launcher]  # accelerate's DistributedType on CPU
        assert (provenance["processes"], provenance["distributed"]) == (2, expected)
        a, b = runs.read_metrics(one / "metrics.jsonl"), runs.read_metrics(two / "metrics.jsonl")
        assert len(a) == len(b) == 3 and a[1]["reward/std"] > 0, algo  # rewards that vary: a learning signal
        for x, y in zip(comparable(a), comparable(b)):
            assert x.keys() == y.keys(), algo
            for k in x:
                assert y[k] == pytest.approx(x[k], rel=1e-5, abs=1e-6), (algo, x["step"], k)
        name = "adapter_model" if extra else "model"
        w1, w2 = (load_file(r / f"checkpoint/model/{name}.safetensors") for r in (one, two))
        assert w1.keys() == w2.keys()
        for k in w1:
            torch.testing.assert_close(w2[k], w1[k], rtol=1e-5, atol=1e-6, msg=f"{algo}: {k}")
        # each of the 2 processes sampled its half: the rollout forward passes add up to those of one process
        assert b[1]["sequences/rollout"] == a[1]["sequences/rollout"]
