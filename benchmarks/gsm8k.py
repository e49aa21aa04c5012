"""GSM8K grade-school math with lm-eval's stock prompt, answer extraction and exact-match metric.

Prompt `Question: {question}\\nAnswer:` (lm-eval `gsm8k` v3.0), zero-shot: the same text is the RL prompt and
the evaluation prompt (lm-eval's stock task prepends 5 exemplars; `--num_fewshot 5` through lm-eval restores
that). The reference completion is the dataset's own answer: a rationale ending in `#### <number>`.

Two extractions, as lm-eval's filters (`extract`): "strict-match" takes the number after the first `#### `;
"flexible-extract" takes the last number in the completion. The extracted answer is compared with the gold
one by lm-eval's `exact_match` with the stock settings (`score`: commas, `$`, everything up to `#### ` and a
final `.` removed, case ignored). The reward is the strict-match score, so it equals lm-eval's
`exact_match,strict-match` on every completion; the lm-eval task also reports `exact_match,flexible-extract`.

Sampler lengths: d1's GSM8K canvas (slurm_scripts/train.yaml @837888f: max_completion_length 256,
block_length 32, diffusion_steps 128).
Data: gsm8k/{train,test}.jsonl under $DLLM_DATA_DIR, else the Hub's openai/gsm8k (config main).
"""

from __future__ import annotations

import functools

import benchmarks

GEN_LENGTH, BLOCK_LENGTH, STEPS = 256, 32, 128
LM_EVAL_REWARD = "exact_match,strict-match"  # the lm-eval metric that equals the mean reward (a 0/1 reward)
EXTRACTIONS = {  # lm-eval gsm8k.yaml v3.0 filter_list: regex and which match to keep
    "strict-match": (r"#### (\-?[0-9\.\,]+)", 0),
    "flexible-extract": (r"(-?[$0-9.,]{2,})|(-?[0-9]+)", -1),
}
IGNORE = [",", "\\$", "(?s).*#### ", "\\.$"]  # lm-eval gsm8k.yaml v3.0 exact_match regexes_to_ignore


@functools.cache
def load(split: str) -> list[dict]:
    if split not in ("train", "test"):
        raise ValueError(f"unknown split {split!r} for gsm8k; use 'train' or 'test'")
    return benchmarks.read(f"gsm8k/{split}.jsonl", "openai/gsm8k", "main", split, ("question", "answer"))


def prompt(example: dict) -> str:
    return f"Question: {example['question']}\nAnswer:"


def target(example: dict) -> str:
    return example["answer"]


@functools.cache
def _filter(how: str):
    from lm_eval.filters.extraction import RegexFilter

    if how not in EXTRACTIONS:
        raise ValueError(f"unknown extraction {how!r}; choose one of {', '.join(EXTRACTIONS)}")
    pattern, group = EXTRACTIONS[how]
    return RegexFilter(regex_pattern=pattern, group_select=group)


def extract(completion: str, how: str = "strict-match") -> str:
    """The answer lm-eval's filter `how` extracts from a completion ("[invalid]" when there is none)."""
    return _filter(how).apply([[completion]], [None])[0][0]


def score(answer: str, example: dict) -> float:
    """lm-eval's exact_match of an extracted answer against the gold answer, with the stock gsm8k settings."""
    from lm_eval.api.metrics import exact_match_hf_evaluate

    return float(exact_match_hf_evaluate(predictions=[answer], references=[example["answer"]],
                                         regexes_to_ignore=IGNORE, ignore_case=True)["exact_match"])


def reward(completion: str, example: dict) -> float:
    return score(extract(completion, "strict-match"), example)
