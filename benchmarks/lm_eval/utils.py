"""The bridge from these lm-eval task YAMLs to benchmarks/<task>.py: data, prompts and scores come from there.

The YAMLs name the task modules' own functions for prompts and targets (`!function benchmarks.gsm8k.prompt`);
what lm-eval needs in another shape is here: the splits as a DatasetDict, the GSM8K extraction as lm-eval
filters, and each task's `process_results`, which scores with the task's `reward` (GSM8K: with the `score` that
its reward applies to the strict extraction, once per filter).
"""

from __future__ import annotations

import datasets
import numpy as np

import benchmarks
from benchmarks import arithmetic, gsm8k, hellaswag, humaneval, sudoku


def dataset(task: str, splits: list[str] = ("test",), **_) -> datasets.DatasetDict:
    """`custom_dataset`: the task module's splits (YAML `dataset_kwargs: {task: <name>, splits: [...]}`);
    lm-eval's metadata arrives as further keywords and is ignored."""
    return datasets.DatasetDict({s: datasets.Dataset.from_list(benchmarks.get(task).load(s)) for s in splits})


def _generated(task):
    """process_results of a generated-answer task: its reward, and accuracy = reward of 1 (as training logs)."""
    def process_results(doc: dict, results: list[str]) -> dict[str, float]:
        value = task.reward(results[0], doc)
        return {"reward": value, "accuracy": float(value == 1.0)}
    return process_results


arithmetic_results = _generated(arithmetic)
sudoku_results = _generated(sudoku)


def humaneval_results(doc: dict, results: list[str]) -> dict[str, float]:
    return {"pass@1": humaneval.reward(results[0], doc)}


def gsm8k_strict(resps: list[list[str]], docs: list[dict]) -> list[list[str]]:
    return [[gsm8k.extract(r, "strict-match") for r in rs] for rs in resps]


def gsm8k_flexible(resps: list[list[str]], docs: list[dict]) -> list[list[str]]:
    return [[gsm8k.extract(r, "flexible-extract") for r in rs] for rs in resps]


def gsm8k_results(doc: dict, results: list[str]) -> dict[str, float]:
    return {"exact_match": gsm8k.score(results[0], doc)}


def hellaswag_results(doc: dict, results: list[tuple[float, bool]]) -> dict[str, float]:
    """lm-eval's acc and acc_norm: the reward of the choice with the highest log-likelihood, and per character."""
    choices = hellaswag.choices(doc)
    ll = np.array([r[0] for r in results])
    chars = np.array([len(c) for c in choices], dtype=float)
    return {"acc": hellaswag.reward(choices[int(ll.argmax())], doc),
            "acc_norm": hellaswag.reward(choices[int((ll / chars).argmax())], doc)}
