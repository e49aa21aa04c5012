"""Task registry: every non-underscore module here is a task, keyed by its file stem.

A task module defines
  GEN_LENGTH, BLOCK_LENGTH, STEPS   default sampler lengths for the task (shared by every method)
  load(split) -> list[dict]         "train" or "test"; seeded and fixed, independent of the run seed
  prompt(example) -> str            the user turn; the model's chat template is applied by the harness
  target(example) -> str           a reference completion (supervised pretraining of the tiny base)
  reward(completion, example)       -> float in [0, 1]: the RL reward *and* the evaluation metric

Two kinds of task need less:
  evaluation-only tasks (humaneval, hellaswag) set EVALUATION_ONLY = True and have no train split:
                        load("train") raises ValueError, and `python -m harness train` refuses them.
  multiple-choice tasks (hellaswag) define choices(example) -> list[str] instead of the sampler lengths;
                        they are scored by the log-likelihood of each choice (lm-eval `multiple_choice`),
                        target(example) is the gold choice and reward(choice, example) scores a picked one.
Every task is also an lm-eval task of the same name: benchmarks/lm_eval/<name>.yaml. Its metric "reward,none"
is the mean reward (and "accuracy,none" the fraction with reward 1); a task whose lm-eval metrics keep lm-eval's
stock names sets LM_EVAL_REWARD to the one that equals its mean reward (gsm8k: "exact_match,strict-match").

Modules that are infrastructure, not tasks, are listed in NOT_TASKS.
"""

from __future__ import annotations

import gzip
import importlib
import json
import os
import pkgutil
from pathlib import Path
from types import ModuleType

NOT_TASKS = {"sandbox"}
REQUIRED = ("load", "prompt", "target", "reward")
SAMPLER_LENGTHS = ("GEN_LENGTH", "BLOCK_LENGTH", "STEPS")  # required unless the task is multiple-choice


def data_dir() -> Path:
    """The offline data folder: $DLLM_DATA_DIR (the README and CI point it at ../shared/data)."""
    value = os.environ.get("DLLM_DATA_DIR")
    if not value:
        raise FileNotFoundError("no data directory: set DLLM_DATA_DIR to the folder holding gsm8k/, humaneval/, ...")
    path = Path(value)
    if not path.is_dir():
        raise FileNotFoundError(f"DLLM_DATA_DIR={value!r} is not a directory; point it at the offline data folder")
    return path


def read(local: str, hub: str, config: str | None, split: str, fields: tuple[str, ...]) -> list[dict]:
    """Records of a real benchmark split: the JSON-lines file `local` (optionally .gz) under $DLLM_DATA_DIR
    when that is set, else the Hugging Face Hub dataset `hub` (config, split). Every record must be a JSON
    object with `fields`; a bad one is a ValueError naming the file and line (or Hub row)."""
    if os.environ.get("DLLM_DATA_DIR"):
        path = data_dir() / local
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist; DLLM_DATA_DIR must hold {local} (see its README)")
        with (gzip.open if path.suffix == ".gz" else open)(path, "rt", encoding="utf-8") as f:
            lines = [(f"{path}, line {n}", line) for n, line in enumerate(f, 1) if line.strip()]
        records = []
        for where, line in lines:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e}); repair or remove the line, or restore the file "
                                 f"from the source its README names") from None
        places = [where for where, _ in lines]
    else:
        import datasets

        try:
            records = list(datasets.load_dataset(hub, config, split=split))
        except ConnectionError as e:  # offline mode raises a subclass of it
            raise ConnectionError(f"cannot load {hub} from the Hub ({e}); offline, set DLLM_DATA_DIR to the data "
                                  f"folder holding {local}") from e
        places = [f"{hub} ({split}), row {n}" for n in range(len(records))]
    for where, record in zip(places, records):
        missing = [name for name in fields if name not in record] if isinstance(record, dict) else list(fields)
        if missing:
            raise ValueError(f"{where}: the record lacks {', '.join(missing)} (a {local} record needs "
                             f"{', '.join(fields)}); repair or remove it")
    return records


def _discover() -> dict[str, ModuleType]:
    tasks = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("_") or info.name in NOT_TASKS or info.ispkg:
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        required = REQUIRED if hasattr(module, "choices") else REQUIRED + SAMPLER_LENGTHS
        missing = [name for name in required if not hasattr(module, name)]
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
