"""Generic tests run for every method discovered in algorithms/: contract, one real training step,
seed determinism and gradient-accumulation equivalence. A new method file gets these with no edit."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from safetensors.torch import load_file

import algorithms
from harness import runs
from harness.cli import field_docs
from harness.train import TrainConfig, train
from tests.conftest import make_batch, make_model

METHODS = sorted(algorithms.ALGORITHMS)
TIMING = ("time/", "tokens_per_s", "peak_rss_mb")


def tiny_run(model_dir, out, algo, seed=0, steps=2, algo_cfg=None, **overrides):
    settings = dict(algo=algo, task="sudoku", model=str(model_dir), out=str(out), seed=seed, steps=steps,
                    prompts_per_step=2, group_size=4, micro_batch_size=4, eval_every=steps, eval_limit=8,
                    save_every=steps, lr=1e-3)
    return train(TrainConfig(**{**settings, **overrides}), algo_cfg)


def untimed(rows):
    return [{k: v for k, v in r.items() if not k.startswith(TIMING)} for r in rows]


@pytest.mark.parametrize("name", METHODS)
def test_contract_and_documentation(name):
    module = algorithms.ALGORITHMS[name]
    for section in ("Paper:", "Reference:", "Implementation details:", "Deviations:"):
        assert section in module.__doc__, f"{name}: module docstring lacks {section}"
    cfg = module.Config()
    docs = field_docs(module.Config)
    assert all(docs.get(f.name) for f in dataclasses.fields(cfg)), f"{name}: every Config field needs a docstring"
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.__setattr__(dataclasses.fields(cfg)[0].name, None)


@pytest.mark.parametrize("name", METHODS)
def test_one_training_step_is_finite_and_moves_the_weights(name, trained_dir, tmp_path):
    run = tiny_run(trained_dir, tmp_path / "run", name, steps=1)
    rows = runs.read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1]
    assert all(math.isfinite(v) for v in rows[1].values())
    assert rows[1]["forward/training"] > 0 and rows[1]["forward/rollout"] > 0
    assert rows[1]["reward/std"] > 0 and rows[1]["grad_norm"] > 0  # a real learning signal, not weight decay
    before, after = load_file(trained_dir / "model.safetensors"), load_file(run / "checkpoint/model/model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert (run / "config.json").exists() and runs.read_json(run / "provenance.json")["packages"]["torch"]


@pytest.mark.parametrize("name", METHODS)
def test_same_seed_gives_identical_metrics_and_weights(name, trained_dir, tmp_path):
    """2 RL steps, each with mu = 2 optimizer steps where the method has mu (a second inner iteration reuses
    the batch: old-policy records, per-iteration seeds)."""
    cfg = algorithms.get(name).Config()
    cfg = dataclasses.replace(cfg, num_iterations=2) if hasattr(cfg, "num_iterations") else cfg
    a, b = (tiny_run(trained_dir, tmp_path / x, name, seed=3, algo_cfg=cfg) for x in "ab")
    updates = {float(s["step"]) for s in runs.load_state(a / "checkpoint")["optimizer"]["state"].values()}
    assert updates == {2.0 * getattr(cfg, "num_iterations", 1)}  # 2 RL steps x mu optimizer steps
    assert untimed(runs.read_metrics(a / "metrics.jsonl")) == untimed(runs.read_metrics(b / "metrics.jsonl"))
    wa, wb = load_file(a / "checkpoint/model/model.safetensors"), load_file(b / "checkpoint/model/model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    c = tiny_run(trained_dir, tmp_path / "c", name, seed=4, algo_cfg=cfg)
    assert untimed(runs.read_metrics(a / "metrics.jsonl")) != untimed(runs.read_metrics(c / "metrics.jsonl"))


@pytest.mark.parametrize("name", METHODS)
def test_gradient_accumulation_equivalence(name, tokenizer):
    """Batch 8 in one micro-step and 2 x 4 micro-steps give the same gradient, at every inner iteration."""
    module = algorithms.ALGORITHMS[name]
    cfg = module.Config()
    policy, ref = make_model(tokenizer, seed=0), make_model(tokenizer, seed=1)
    batch = make_batch(policy, tokenizer, prompts=2, group=4)
    if hasattr(module, "prepare"):
        with torch.no_grad():
            batch = module.prepare(policy, ref, batch, cfg)
    for it in range(min(2, getattr(cfg, "num_iterations", 1))):
        batch.iteration = it
        grads = []
        for size in (8, 2):
            policy.zero_grad()
            for mb in batch.micro_batches(size):
                module.loss(policy, ref, mb, cfg)[0].backward()
            grads.append([p.grad.clone() for p in policy.parameters()])
        for g8, g2 in zip(*grads):
            torch.testing.assert_close(g8, g2, rtol=1e-4, atol=1e-7)
        assert any(g.abs().sum() > 0 for g in grads[0])


def test_discovery_rejects_a_malformed_module(tmp_path, monkeypatch):
    package = tmp_path / "fake_algos"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "broken.py").write_text("from dataclasses import dataclass\n@dataclass\nclass Config:\n    x: int = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(TypeError, match="broken.py: `Config` must be frozen"):
        algorithms.discover("fake_algos")
    (package / "broken.py").unlink()
    (package / "imports_missing.py").write_text("import nonexistent_module_xyz\n")
    with pytest.raises(ModuleNotFoundError):
        algorithms.discover("fake_algos")


def test_unknown_method_lists_the_known_ones():
    with pytest.raises(KeyError, match="unknown method 'd2'; known methods: .*d1"):
        algorithms.get("d2")
