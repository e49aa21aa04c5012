"""The lm-eval model and `python -m harness eval`: every task offline end to end, lm-eval's own CLI, generation
identical to training's rollouts, the ELBO log-likelihood unbiased, acc / acc_norm on a forced two-choice task."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import datasets
import lm_eval
import numpy as np
import pytest
import torch
from lm_eval.api.instance import Instance
from lm_eval.tasks import TaskManager

import benchmarks
from benchmarks import hellaswag
from harness import cli
from harness.evaluate import TASKS_DIR, DiffusionLM
from harness.likelihood import exact_elbo
from harness.rollout import encode_prompts, rollout
from harness.sampler import SamplerConfig
from harness.tiny import TinyMDLMConfig


def bridge():
    """benchmarks/lm_eval/utils.py, which lm-eval loads by file path (the folder is not a package)."""
    spec = importlib.util.spec_from_file_location("lm_eval_bridge", TASKS_DIR / "utils.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def manager() -> TaskManager:
    return TaskManager(include_path=str(TASKS_DIR), include_defaults=False)


def test_eval_command_runs_every_task_offline(model_dir, tmp_path):
    out = tmp_path / "eval" / "lm_eval.json"
    cli.main(["eval", "--model", str(model_dir), "--tasks", "arithmetic,sudoku,gsm8k,humaneval,hellaswag",
              "--limit", "2", "--mc_samples", "2", "--sampler.gen_length", "16", "--sampler.block_length", "8",
              "--sampler.steps", "4", "--out", str(out)])
    result = json.loads(out.read_text())
    metrics = {"arithmetic": ["reward,none", "accuracy,none"], "sudoku": ["reward,none", "accuracy,none"],
               "gsm8k": ["exact_match,strict-match", "exact_match,flexible-extract"],
               "humaneval": ["pass@1,none"], "hellaswag": ["acc,none", "acc_norm,none"]}
    assert set(result["results"]) == set(metrics) == set(result["harness"]["tasks"])
    for task, names in metrics.items():
        assert result["versions"][task] == 1.0 and result["n-samples"][task]["effective"] == 2
        assert all(0 <= result["results"][task][name] <= 1 for name in names)
        assert all(math.isfinite(result["results"][task][name.replace(",", "_stderr,")]) for name in names)
        ours = result["harness"]["tasks"][task]
        assert ours["seconds"] > 0
        # NFE per item: 4 sampler steps (2 blocks of 8, 2 steps each); hellaswag: 4 choices x 2 copies x 2 samples
        assert ours["nfe"] == ([16, 16] if task == "hellaswag" else [4, 4]) and ours["nfe_mean"] == ours["nfe"][0]
    assert result["harness"]["tasks"]["gsm8k"]["sampler"] == dict(vars(SamplerConfig(gen_length=16, block_length=8,
                                                                                       steps=4)))
    assert result["harness"]["tasks"]["hellaswag"]["likelihood"]["mc_samples"] == 2
    assert result["harness"]["config"]["limit"] == 2 and result["harness"]["provenance"]["git_sha"]
    assert result["config"]["pretrained"] == str(model_dir) and result["config"]["limit"] == 2
    assert {"lm_eval_version", "transformers_version", "date", "configs", "n-shot"} <= set(result)


def test_two_processes_give_the_single_process_results(model_dir, tmp_path):
    """`accelerate launch` on 2 CPU processes: 3 items per task split 2 + 1, so lm-eval pads one rank, gathers
    through all_gather / gather_object, and our NFE records are gathered too."""
    args = ["eval", "--model", str(model_dir), "--tasks", "arithmetic,hellaswag", "--limit", "3", "--mc_samples", "2"]
    # accelerate's `--cpu` starts ONE process on one machine; `--multi_gpu` with ACCELERATE_USE_CPU=1 starts 2 (gloo)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "harness"]
    done = subprocess.run([*launch, *args, "--out", str(tmp_path / "two.json")], cwd=Path(__file__).parent.parent,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "ACCELERATE_USE_CPU": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count("Loading weights: 100%") == 2 and done.stdout.count("results: ") == 1  # 2 ran, 1 wrote
    cli.main([*args, "--out", str(tmp_path / "one.json")])
    one, two = (json.loads((tmp_path / name).read_text()) for name in ("one.json", "two.json"))
    assert two["results"] == one["results"] and two["n-samples"] == one["n-samples"]
    assert [two["harness"]["tasks"][t]["nfe"] for t in ("arithmetic", "hellaswag")] == [[8] * 3, [16] * 3]


def test_lm_evals_own_cli_runs_the_registered_model_on_our_tasks(model_dir, tmp_path):
    """The route of the module docstring: lm-eval's CLI with the `dllm` model registered by `harness.evaluate`,
    our task folder on --include_path; the scores are those of `python -m harness eval`."""
    command = [sys.executable, "-m", "harness.evaluate", "--model", "dllm", "--model_args",
               f"pretrained={model_dir},mc_samples=2", "--tasks", "arithmetic,hellaswag", "--limit", "2",
               "--include_path", str(TASKS_DIR), "--apply_chat_template", "--confirm_run_unsafe_code",
               "--output_path", str(tmp_path / "cli")]
    done = subprocess.run(command, cwd=Path(__file__).parent.parent, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (written,) = (tmp_path / "cli").rglob("results_*.json")
    via_cli = json.loads(written.read_text())
    cli.main(["eval", "--model", str(model_dir), "--tasks", "arithmetic,hellaswag", "--limit", "2",
              "--mc_samples", "2", "--out", str(tmp_path / "ours.json")])
    ours = json.loads((tmp_path / "ours.json").read_text())
    assert via_cli["config"]["model"] == "dllm"
    for task in ("arithmetic", "hellaswag"):
        assert via_cli["results"][task] == ours["results"][task] and via_cli["versions"][task] == 1.0


@pytest.mark.parametrize("name", ["arithmetic", "sudoku"])
def test_generation_and_metric_are_the_training_path(trained_dir, name):
    """Same prompt ids, same completions, same rewards as `harness.rollout` (what training evaluates with)."""
    lm = DiffusionLM(str(trained_dir))
    result = lm_eval.simple_evaluate(model=lm, tasks=[name], task_manager=manager(), limit=8, log_samples=True,
                                     apply_chat_template=True)
    samples = sorted(result["samples"][name], key=lambda s: s["doc_id"])
    task = benchmarks.get(name)
    examples = task.load("test")[:8]
    batch, texts = rollout(lm.model, lm.tokenizer, task, examples, SamplerConfig().resolve(task), group_size=1)
    ids, mask = encode_prompts(lm.tokenizer, [task.prompt(e) for e in examples])
    for i, sample in enumerate(samples):
        assert lm._encode(sample["arguments"][0][0]) == ids[i][mask[i]].tolist()
        assert sample["resps"][0][0] == texts[i]
        assert sample["reward"] == task.reward(texts[i], examples[i]) == pytest.approx(batch.rewards[i].item())
    assert result["results"][name]["reward,none"] == pytest.approx(batch.rewards.mean().item())
    if name == "sudoku":  # the weak base earns partial, varied rewards: the comparison is not 0 == 0
        assert len(set(batch.rewards.tolist())) > 2


def test_loglikelihood_is_the_unbiased_coupled_elbo(model, tokenizer):
    lm = DiffusionLM(model, tokenizer=tokenizer, mc_samples=1)
    request = Instance("loglikelihood", doc={}, arguments=("12+34=", "046"), idx=0, metadata=("t", 0, 1))
    ctx, cont = lm._encode_pair(*request.args)
    assert (ctx, cont) == lm._encode_pair("12+34=", "046") and lm._encode_pair("a ", "b") == lm._encode_pair("a", " b")
    exact = exact_elbo(model, torch.tensor([ctx]), torch.ones(1, len(ctx), dtype=torch.bool), torch.tensor([cont]))
    values = []
    for seed in range(400):
        lm.seed = seed
        (value, greedy), = lm.loglikelihood([request], disable_tqdm=True)
        values.append(value)
        assert greedy is False
    lm.seed = 7
    assert lm.loglikelihood([request], disable_tqdm=True)[0][0] == values[7]  # seeded, hence reproducible
    sem = np.std(values) / np.sqrt(len(values))
    assert 0 < sem and abs(np.mean(values) - exact.item()) < 4 * sem
    assert lm.nfe[("t", 0, 0)] == 2  # one coupled sample: a mask and its complement


def test_rolling_windows_score_every_token_once(model, tokenizer):
    lm = DiffusionLM(model, tokenizer=tokenizer, mc_samples=2)
    text = "12+34=046 " * 6
    tokens = lm._encode(text)
    model.config.max_position_embeddings = 8
    try:
        seen = []
        original = lm._elbo
        lm._elbo = lambda pairs, seeds, bar: seen.extend(pairs) or original(pairs, seeds, bar)
        request = Instance("loglikelihood_rolling", doc={}, arguments=(text,), idx=0, metadata=("t", 0, 1))
        (value,) = lm.loglikelihood_rolling([request], disable_tqdm=True)
    finally:
        model.config.max_position_embeddings = 512
    assert math.isfinite(value) and value < 0
    assert [t for _, cont in seen for t in cont] == tokens and all(len(c) + len(x) <= 9 for c, x in seen)
    assert lm.nfe[("t", 0, 0)] == 2 * 2 * len(seen) and len(seen) == math.ceil(len(tokens) / 8)


class Unigram(torch.nn.Module):
    """Every position predicts the same distribution whatever the input: log-likelihoods known in closed form."""

    def __init__(self, config, logits):
        super().__init__()
        self.config, self.logits = config, torch.nn.Parameter(logits, requires_grad=False)

    def forward(self, input_ids, attention_mask=None, **kwargs):
        return SimpleNamespace(logits=self.logits.expand(*input_ids.shape, -1))


def test_acc_and_acc_norm_on_a_forced_two_choice_task(tokenizer):
    """Choice "1" (one token) beats "22222222" (eight) in log-likelihood but loses per character, so acc and
    acc_norm pick different choices; with the gold on either side both metrics are forced, and they equal
    lm-eval's own multiple-choice metrics on the same log-likelihoods."""
    one, two = tokenizer.convert_tokens_to_ids(["1", "2"])
    logits = torch.full((len(tokenizer),), -30.0)
    logits[one], logits[two] = 0.0, 1.0
    config = TinyMDLMConfig(vocab_size=len(tokenizer), mask_token_id=tokenizer.mask_token_id)
    lm = DiffusionLM(Unigram(config, logits), tokenizer=tokenizer, mc_samples=4)
    logp = torch.log_softmax(logits.index_fill(0, torch.tensor([tokenizer.mask_token_id]), -torch.inf), 0)
    logp1, logp2 = logp[one].item(), logp[two].item()
    assert lm._encode_pair("x", "22222222")[1] == [two] * 8
    # ll("1") = logp1 exactly (one token); ll("2"*8) is an ELBO sample of 8 logp2 within [9 logp2, 4.5 logp2]
    assert 4.5 * logp2 < logp1 < 9 * logp2 / 8

    docs = [{"query": "x", "choices": ["1", "22222222"], "gold": gold} for gold in (0, 1)]
    ours = {"task": "forced", "output_type": "multiple_choice", "test_split": "test", "target_delimiter": "",
            "custom_dataset": lambda **_: datasets.DatasetDict({"test": datasets.Dataset.from_list(docs)}),
            "doc_to_text": hellaswag.prompt, "doc_to_choice": hellaswag.choices, "doc_to_target": "gold",
            "process_results": bridge().hellaswag_results,
            "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True}
                            for m in ("acc", "acc_norm")]}
    stock = {k: v for k, v in ours.items() if k != "process_results"} | {"task": "forced_stock"}
    result = lm_eval.simple_evaluate(model=lm, tasks=[ours, stock], task_manager=manager(), log_samples=True)
    for name in ("forced", "forced_stock"):
        samples = sorted(result["samples"][name], key=lambda s: s["doc_id"])
        assert [(s["acc"], s["acc_norm"]) for s in samples] == [(1.0, 0.0), (0.0, 1.0)]
        assert samples[0]["resps"][0][0][0] == pytest.approx(logp1, abs=1e-5)
        assert result["results"][name]["acc,none"] == result["results"][name]["acc_norm,none"] == 0.5
