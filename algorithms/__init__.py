"""Method registry: every non-underscore module in this folder is a method, keyed by its file stem.

The stem is also the `--algo` value, the workflow's `{algo}` wildcard and the results path component.
A method module defines (see `_template.py`):

  Config                           required: a frozen dataclass of this method's hyperparameters only;
                                   `num_iterations` (mu, optimizer steps per rollout batch) if it has one
  loss(policy, ref, batch, cfg)    required: -> (loss tensor, {metric: float}) for one micro-batch; the
                                   harness *sums* micro-batch losses, so each is its share of the batch loss;
                                   `ref` (frozen, or EMA-updated by `after_step`) for what is cheaper to
                                   recompute per micro-batch than to store, e.g. old full-vocabulary logits
  prepare(policy, ref, batch, cfg) optional: once per rollout, under no_grad -> batch (fills batch.extra)
  sample(policy, ref, prompt_ids, prompt_mask, sampler_cfg, generator, cfg)
                                   optional: training-time decoding override -> harness.sampler.Trajectory
  after_step(policy, ref, step, cfg)  optional: after each RL step (e.g. an EMA update of `ref`)

A module that fails to import, or lacks a required name, stops discovery with an error naming the file.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from types import ModuleType

OPTIONAL = ("prepare", "sample", "after_step")


def check(module: ModuleType) -> ModuleType:
    """Raise a TypeError naming the file if `module` breaks the plugin contract."""
    where = module.__name__.replace('.', '/') + '.py'
    config = getattr(module, "Config", None)
    if not (dataclasses.is_dataclass(config) and isinstance(config, type)):
        raise TypeError(f"{where} must define `Config` as a dataclass")
    if not config.__dataclass_params__.frozen:
        raise TypeError(f"{where}: `Config` must be frozen (@dataclass(frozen=True))")
    if not callable(getattr(module, "loss", None)):
        raise TypeError(f"{where} must define `loss(policy, ref, batch, cfg) -> (loss, metrics)`")
    for name in OPTIONAL:
        if hasattr(module, name) and not callable(getattr(module, name)):
            raise TypeError(f"{where}: `{name}` must be a function")
    return module


def discover(package: str = __name__) -> dict[str, ModuleType]:
    found = {}
    for info in pkgutil.iter_modules(importlib.import_module(package).__path__):
        if not info.name.startswith("_"):
            found[info.name] = check(importlib.import_module(f"{package}.{info.name}"))
    if not found:
        raise RuntimeError(f"no method modules found in {package}")
    return found


ALGORITHMS = discover()


def get(name: str) -> ModuleType:
    if name not in ALGORITHMS:
        raise KeyError(f"unknown method {name!r}; known methods: {', '.join(sorted(ALGORITHMS))}")
    return ALGORITHMS[name]
