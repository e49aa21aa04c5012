"""HellaSwag: pick the most likely of four endings (multiple choice, scored by log-likelihood).

Prompt and choices as lm-eval's stock task (`hellaswag` v1.0, `utils.process_docs`): the prompt is
`{activity_label}: {ctx_a} {ctx_b capitalised}` and the choices are the four endings, each cleaned by `clean`
(WikiHow's `[title]` becomes `. `, other `[...]` tags and double spaces are removed); lm-eval scores
`" " + choice` after the prompt. The evaluated split is the validation set (the test labels are hidden), served
as "test". reward(choice, example) is 1 for the gold ending: lm-eval's `acc` is the reward of the choice with the
highest log-likelihood, `acc_norm` that of the highest log-likelihood per character. Evaluation only.

Data: hellaswag/hellaswag_val.jsonl under $DLLM_DATA_DIR, else the Hub's Rowan/hellaswag (validation). The
offline copy is approximate: its source lost the ctx_a/ctx_b split (ctx_b is empty, so nothing is
capitalised), see the data README; scores are close to, not identical with, the Hub's.
"""

from __future__ import annotations

import functools
import re

import benchmarks

EVALUATION_ONLY = True


def clean(text: str) -> str:
    """lm-eval hellaswag `preprocess`: strip, `[title]` -> `. `, drop `[...]` tags, collapse double spaces."""
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


@functools.cache
def load(split: str) -> list[dict]:
    if split != "test":
        raise ValueError(f"hellaswag is evaluation-only: it has no {split!r} split, only 'test' (the validation set)")
    records = benchmarks.read("hellaswag/hellaswag_val.jsonl", "Rowan/hellaswag", None, "validation",
                              ("activity_label", "ctx_a", "ctx_b", "endings", "label"))
    return [{**r, "query": clean(f"{r['activity_label']}: {r['ctx_a']} {r['ctx_b'].capitalize()}"),
             "choices": [clean(e) for e in r["endings"]], "gold": int(r["label"])} for r in records]


def prompt(example: dict) -> str:
    return example["query"]


def choices(example: dict) -> list[str]:
    return example["choices"]


def target(example: dict) -> str:
    return example["choices"][example["gold"]]


def reward(completion: str, example: dict) -> float:
    return float(completion.strip() == target(example).strip())
