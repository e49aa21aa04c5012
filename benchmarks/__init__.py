"""Task registry: every non-underscore module here is a task, keyed by its file stem.

A task module defines
  GEN_LENGTH, BLOCK_LENGTH, STEPS   default sampler lengths for the task (shared by every method)
  load(split) -> list[dict]         "train" or "test"; seeded and fixed, independent of the run seed
  prompt(example) -> str            the user turn; the model's chat template is applied by the harness
  target(example) -> str           a reference completion (supervised pretraining of the tiny base)
  reward(completion, example)       -> float in [0, 1]: the RL reward *and* the evaluation metric

Modules that are infrastructure, not tasks, are listed in NOT_TASKS.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
from pathlib import Path
from types import ModuleType

NOT_TASKS = {"sandbox"}
REQUIRED = ("GEN_LENGTH", "BLOCK_LENGTH", "STEPS", "load", "prompt", "target", "reward")


def data_dir() -> Path:
    """The offline data folder: $DLLM_DATA_DIR (the README and CI point it at ../shared/data)."""
    value = os.environ.get("DLLM_DATA_DIR")
    if not value:
        raise FileNotFoundError("no data directory: set DLLM_DATA_DIR to the folder holding gsm8k/, humaneval/, ...")
    path = Path(value)
    if not path.is_dir():
        raise FileNotFoundError(f"DLLM_DATA_DIR={value!r} is not a directory; point it at the offline data folder")
    return path


def _discover() -> dict[str, ModuleType]:
    tasks = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("_") or info.name in NOT_TASKS or info.ispkg:
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        missing = [name for name in REQUIRED if not hasattr(module, name)]
        if missing:
            raise TypeError(f"benchmarks/{info.name}.py is not a valid task: it lacks {', '.join(missing)}")
        tasks[info.name] = module
    return tasks


TASKS = _discover()


def get(name: str) -> ModuleType:
    """The task module called `name`, or an error that lists the known tasks."""
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}")
    return TASKS[name]
