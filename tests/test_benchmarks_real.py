"""GSM8K, HumanEval and HellaSwag: hand-written GSM8K completions scored as lm-eval's stock task scores them,
HumanEval through the sandbox, HellaSwag requests and metrics identical to lm-eval's stock task, and one lm-eval
task per registry task. The sandbox's adversarial suite (and all 164 canonical solutions) is in test_sandbox.py."""

from __future__ import annotations

import socket
from pathlib import Path

import lm_eval
import pytest
from lm_eval.api.model import LM
from lm_eval.tasks import TaskManager
from lm_eval.tasks._yaml_loader import load_yaml

import benchmarks
from benchmarks import gsm8k, humaneval
from benchmarks.sandbox import isolation
from harness.evaluate import TASKS_DIR, DiffusionLM

STOCK = Path(lm_eval.__file__).parent / "tasks"

# (completion for GSM8K test item i, strict-match score, flexible-extract score); gold answers 18, 3, 70000, 540,
# 20, 64
COMPLETIONS = [
    ("She sells 16 - 3 - 4 = 9 eggs for 9 * 2 = 18 dollars.\n#### 18", 1.0, 1.0),  # correct
    ("It takes 2 + 1 = 3 bolts.\n#### 4", 0.0, 0.0),  # wrong final answer
    ("The profit is $70,000.", 0.0, 1.0),  # no '####'; the last number, with '$' and ',', is right
    ("He runs 540 meters.\n#### 540.", 1.0, 1.0),  # the final '.' is ignored
    ("#### 20 cups, not 3", 1.0, 0.0),  # strict takes '#### 20', flexible the last number
    ("I cannot tell.", 0.0, 0.0),  # malformed: no number at all
]


class Canned(LM):
    """An lm-eval model that answers each document with a fixed text."""

    def __init__(self, texts: list[str]):
        super().__init__()
        self.texts = texts

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        return [self.texts[r.doc_id] for r in requests]

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError

    loglikelihood_rolling = loglikelihood


def stock_task(path: Path, name: str, data_files: dict) -> dict:
    """lm-eval's own task config, reading the offline copy instead of the Hub."""
    cfg = {k: v for k, v in load_yaml(path, resolve_func=True).items() if k != "tag"}
    return cfg | {"task": name, "dataset_path": "json", "dataset_name": None, "training_split": None,
                  "dataset_kwargs": {"data_files": data_files}, "num_fewshot": 0}


def by_doc(result: dict, name: str, filter_name: str = "none") -> list[dict]:
    samples = [s for s in result["samples"][name] if s["filter"] == filter_name]
    return sorted(samples, key=lambda s: s["doc_id"])


def test_gsm8k_extraction_and_score_on_hand_written_completions():
    docs = gsm8k.load("test")
    for (text, strict, flexible), doc in zip(COMPLETIONS, docs):
        assert gsm8k.reward(text, doc) == strict
        assert gsm8k.score(gsm8k.extract(text, "flexible-extract"), doc) == flexible
    assert gsm8k.extract(COMPLETIONS[0][0]) == "18" and gsm8k.extract("I cannot tell.") == "[invalid]"
    assert gsm8k.extract(COMPLETIONS[4][0], "flexible-extract") == "3"
    with pytest.raises(ValueError, match="unknown extraction 'loose'"):
        gsm8k.extract("#### 1", "loose")


def test_gsm8k_task_scores_as_lm_evals_stock_task():
    """Our lm-eval task and the stock one (v3.0, zero-shot, same files) build the same prompts and score the same
    completions the same way, filter by filter; strict-match is the training reward."""
    folder = benchmarks.data_dir() / "gsm8k"
    stock = stock_task(STOCK / "gsm8k/gsm8k.yaml", "gsm8k_stock",
                       {split: str(folder / f"{split}.jsonl") for split in ("train", "test")})
    result = lm_eval.simple_evaluate(model=Canned([c for c, _, _ in COMPLETIONS]), tasks=["gsm8k", stock],
                                     task_manager=TaskManager(include_path=str(TASKS_DIR), include_defaults=False),
                                     limit=len(COMPLETIONS), log_samples=True)
    for column, filter_name in ((1, "strict-match"), (2, "flexible-extract")):
        ours, theirs = by_doc(result, "gsm8k", filter_name), by_doc(result, "gsm8k_stock", filter_name)
        scores = [s["exact_match"] for s in ours]
        assert scores == [s["exact_match"] for s in theirs] == [c[column] for c in COMPLETIONS]
        assert [s["arguments"] for s in ours] == [s["arguments"] for s in theirs]
    assert result["results"]["gsm8k"]["exact_match,strict-match"] == 0.5


def test_humaneval_reward_runs_the_tests_in_the_sandbox():
    problems = humaneval.load("test")
    assert [p["task_id"] for p in problems[:2]] == ["HumanEval/0", "HumanEval/1"]
    assert [humaneval.reward(p["canonical_solution"], p) for p in problems[:2]] == [1.0, 1.0]
    assert humaneval.reward("    return None\n", problems[0]) == 0.0
    assert humaneval.prompt(problems[0]) == problems[0]["prompt"]


@pytest.mark.skipif(not isolation()["namespaces"], reason="network isolation needs the namespaces")
def test_humaneval_completion_that_reaches_the_network_scores_zero():
    """The completion would pass if its connection succeeded: a listener on loopback is there to accept it."""
    problem = humaneval.load("test")[0]
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.settimeout(0.5)
        port = server.getsockname()[1]
        reach = f"    import socket; socket.create_connection(('127.0.0.1', {port}), timeout=1).close()\n"
        assert humaneval.reward(reach + problem["canonical_solution"], problem) == 0.0
        with pytest.raises(TimeoutError):
            server.accept()


def test_humaneval_task_reports_pass_at_1_from_the_reward():
    problems = humaneval.load("test")
    texts = [problems[0]["canonical_solution"], "    return None\n"]
    result = lm_eval.simple_evaluate(model=Canned(texts), tasks=["humaneval"], limit=2, log_samples=True,
                                     task_manager=TaskManager(include_path=str(TASKS_DIR), include_defaults=False),
                                     confirm_run_unsafe_code=True)
    assert [s["pass@1"] for s in by_doc(result, "humaneval")] == [1.0, 0.0]
    assert result["results"]["humaneval"]["pass@1,none"] == 0.5


def test_hellaswag_task_matches_lm_evals_stock_task(model, tokenizer):
    """Same contexts and continuations as the stock task (v1.0, its own process_docs, same file), hence the same
    ELBO log-likelihoods, and the same acc / acc_norm."""
    path = benchmarks.data_dir() / "hellaswag/hellaswag_val.jsonl"
    stock = stock_task(STOCK / "hellaswag/hellaswag.yaml", "hellaswag_stock", {"validation": str(path)})
    lm = DiffusionLM(model, tokenizer=tokenizer, mc_samples=2)
    result = lm_eval.simple_evaluate(model=lm, tasks=["hellaswag", stock], limit=4, log_samples=True,
                                     task_manager=TaskManager(include_path=str(TASKS_DIR), include_defaults=False))
    ours, theirs = by_doc(result, "hellaswag"), by_doc(result, "hellaswag_stock")
    assert [s["arguments"] for s in ours] == [s["arguments"] for s in theirs]
    assert [s["resps"] for s in ours] == [s["resps"] for s in theirs]
    assert [(s["acc"], s["acc_norm"]) for s in ours] == [(s["acc"], s["acc_norm"]) for s in theirs]


def test_every_task_is_an_lm_eval_task_of_the_same_name():
    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    assert manager.all_tasks == sorted(benchmarks.TASKS)
    for name in benchmarks.TASKS:
        config = load_yaml(TASKS_DIR / f"{name}.yaml", resolve_func=False)
        assert config["task"] == name and config["dataset_kwargs"]["task"] == name
        assert isinstance(config["metadata"]["version"], float)
