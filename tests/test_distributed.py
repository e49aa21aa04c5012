"""`accelerate launch` with 2 CPU processes (gloo DDP, and DeepSpeed ZeRO-2 and ZeRO-3 through DeepSpeed's CPU
accelerator over gloo) trains exactly what one process trains with the same rollout chunks: groups span the processes
(3 prompts x G = 4 split 6 + 6 rows), the rewards and rows are gathered, `prepare` sees the whole batch, and the
gradients are summed over the processes. Under ZeRO-3 the reference of full fine-tuning is partitioned too, LFPO's EMA
updates partitioned adapter weights, and the saved weights are gathered whole."""

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
# ZeRO-3 keeps a parameter under DeepSpeed's persistence threshold (1e5 elements: every one of the tiny model's) whole
# on every process; with threshold 0 it partitions them all, and every forward pass gathers each layer collectively.
ZERO3 = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}, "train_batch_size": "auto",
         "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto", "gradient_clipping": "auto"}
LAUNCHERS = {"ddp": ["--multi_gpu"], "zero2": ["--use_deepspeed", "--zero_stage", "2"],
             "zero3": ["--use_deepspeed", "--deepspeed_config_file", "{tmp}/zero3.json"]}
# d1 with full fine-tuning; DMPO (weights from a softmax over each group of log-likelihood ratios: groups must be
# whole in `prepare`) and LFPO (its reference is a second adapter, called inside the DDP loss) with LoRA, without
# LoRA dropout: its masks come from each process's own random stream, so with it 2 processes differ from 1 by chance.
LORA = {"lora_rank": 4, "lora_alpha": 8.0, "lora_dropout": 0.0}
RUNS = {"d1": {}, "dmpo": LORA, "lfpo": LORA}
SETTINGS = dict(steps=2, prompts_per_step=3, group_size=4, micro_batch_size=3, rollout_batch_size=3, eval_every=2,
                eval_limit=4, save_every=2)
# DMPO's log-RND is a difference of two sequence log-likelihoods (tens of nats): it cancels, so float summation order
# alone (ZeRO-3's reduce-scatter against one process's sum; weights within 1e-7) moves it by about 1e-6
CANCELLING = {"algo/log_rnd": 1e-5}
# what differs between one process and two by construction: wall times, and forward passes counted per process
COUNTED = ("forward/", "sequences/", "peak_rss_mb", "tokens_per_s")


def flags(options: dict) -> list[str]:
    return [x for k, v in options.items() for x in (f"--{k}", str(v))]


def launch(launcher: str, script: Path, tmp_path: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    """`script` run by `accelerate launch` on 2 CPU processes under `launcher`."""
    (tmp_path / "zero3.json").write_text(json.dumps(ZERO3))
    env = {"DS_ACCELERATOR": "cpu"} if launcher != "ddp" else {"ACCELERATE_USE_CPU": "1"}
    return subprocess.run([*LAUNCH, *(a.format(tmp=tmp_path) for a in LAUNCHERS[launcher]), str(script)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **env})


def comparable(rows):
    return [{k: v for k, v in r.items() if not k.startswith(COUNTED)} for r in untimed(rows)]


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_two_processes_train_what_one_process_trains(launcher, trained_dir, tmp_path):
    script = tmp_path / "launch.py"  # one launch trains the three runs one after the other
    script.write_text("from harness.cli import main\n" + "".join(
        f"main({['train', '--algo', algo, '--task', 'sudoku', '--model', str(trained_dir), '--lr', '1e-3', '--out', str(tmp_path / 'two' / algo), *flags({**SETTINGS, **extra, 'algo.num_iterations': 2})]!r})\n"
        for algo, extra in RUNS.items()))
    done = launch(launcher, script, tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    for algo, extra in RUNS.items():
        one = tiny_run(trained_dir, tmp_path / "one" / algo, algo, **SETTINGS, **extra,
                       algo_cfg=algorithms.get(algo).Config(num_iterations=2))
        two = tmp_path / "two" / algo
        provenance = json.loads((two / "provenance.json").read_text())
        expected = "MULTI_CPU" if launcher == "ddp" else "DEEPSPEED"  # accelerate's DistributedType on CPU
        assert (provenance["processes"], provenance["distributed"]) == (2, expected)
        assert provenance.get("zero_stage") == {"ddp": None, "zero2": 2, "zero3": 3}[launcher]
        a, b = runs.read_metrics(one / "metrics.jsonl"), runs.read_metrics(two / "metrics.jsonl")
        assert len(a) == len(b) == 3 and a[1]["reward/std"] > 0, algo  # rewards that vary: a learning signal
        for x, y in zip(comparable(a), comparable(b)):
            assert x.keys() == y.keys(), algo
            for k in x:
                assert y[k] == pytest.approx(x[k], rel=1e-5, abs=CANCELLING.get(k, 1e-6)), (algo, x["step"], k)
        name = "adapter_model" if extra else "model"
        w1, w2 = (load_file(r / f"checkpoint/model/{name}.safetensors") for r in (one, two))
        assert w1.keys() == w2.keys()
        for k in w1:
            torch.testing.assert_close(w2[k], w1[k], rtol=1e-5, atol=1e-6, msg=f"{algo}: {k}")
        # each of the 2 processes sampled its half: the rollout forward passes add up to those of one process
        assert b[1]["sequences/rollout"] == a[1]["sequences/rollout"]


def test_zero3_processes_may_run_unequal_numbers_of_forward_passes_without_gradient(trained_dir, tmp_path):
    """ZeRO-3 gathers each layer collectively in a forward pass: a process that decodes longer than the others (EB,
    threshold decoding) would wait for them forever. Inside `harness.train.whole` each process holds the whole
    weights without DeepSpeed's hooks: process 0 runs three forward passes there, process 1 one, both get the
    unpartitioned model's logits, and the training forward and backward afterwards gather through the hooks again."""
    script = tmp_path / "unequal.py"
    script.write_text(f"""
import torch
from accelerate import Accelerator, PartialState
from harness.model import load, token_logits
from harness.train import whole
plain = load({str(trained_dir)!r})[0]  # before DeepSpeed's config exists: not partitioned
PartialState(backend="gloo")
accelerator = Accelerator()
accelerator.state.deepspeed_plugin.deepspeed_config.update(
    train_micro_batch_size_per_gpu=2, gradient_accumulation_steps=1, train_batch_size=4)
model = load({str(trained_dir)!r})[0]
assert all(p.numel() == 0 for p in model.parameters())  # zero.Init: loaded partitioned
engine, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
ids = torch.arange(12).reshape(2, 6) + 10
with torch.no_grad(), whole([engine]):
    for _ in range(3 if accelerator.process_index == 0 else 1):
        torch.testing.assert_close(token_logits(model, ids), token_logits(plain, ids))
accelerator.backward(token_logits(engine, ids).logsumexp(-1).mean())
optimizer.step()
with torch.no_grad(), whole([engine]):
    moved = token_logits(model, ids)
assert not torch.allclose(moved, token_logits(plain, ids))
accelerator.wait_for_everyone()
open({str(tmp_path)!r} + f"/done{{accelerator.process_index}}", "w").close()
""")
    done = launch("zero3", script, tmp_path, timeout=120)  # without `whole`: process 0 waits forever
    assert done.returncode == 0, done.stderr[-4000:]
    assert (tmp_path / "done0").exists() and (tmp_path / "done1").exists()
