"""Shared fixtures: a tiny random masked-diffusion model and tokenizer built in-process (no downloads)."""

from __future__ import annotations

import os

# Nothing in the tests may reach the Hugging Face Hub, whatever the shell sets: set before transformers, peft or
# bitsandbytes is imported (bitsandbytes, which peft imports, asks the Hub for a CPU kernel at import), and
# inherited by the tests' subprocesses.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

import benchmarks  # noqa: E402
from harness import runs  # noqa: E402
from harness.pretrain import build_tokenizer  # noqa: E402
from harness.tiny import TinyMDLM, TinyMDLMConfig  # noqa: E402

torch.set_num_threads(1)


def make_model(tokenizer, seed: int = 0, **overrides) -> TinyMDLM:
    torch.manual_seed(seed)
    config = TinyMDLMConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=64, mask_token_id=tokenizer.mask_token_id,
                            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, **overrides)
    # a larger init than the default so that random logits are far from uniform (distinct confidences)
    model = TinyMDLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
    return model


@pytest.fixture(scope="session")
def tokenizer():
    tasks = [benchmarks.get(name) for name in ("arithmetic", "sudoku")]  # the tiny tasks; no data files needed
    corpus = [t.prompt(e) + t.target(e) for t in tasks for e in t.load("test")[:200]]
    return build_tokenizer(corpus, vocab_size=300)


@pytest.fixture(scope="session")
def model(tokenizer):
    return make_model(tokenizer)


@pytest.fixture(scope="session")
def model_dir(tokenizer, tmp_path_factory):
    """A saved tiny random model folder, as `python -m harness pretrain` writes one."""
    folder = tmp_path_factory.mktemp("base") / "model"
    runs.save_model(make_model(tokenizer), tokenizer, folder)
    return folder


def make_batch(model, tokenizer, prompts: int = 2, group: int = 4, seed: int = 0, task: str = "arithmetic"):
    """A real rollout batch of the random tiny model, with rewards replaced by distinct seeded values."""
    from harness.rollout import rollout
    from harness.sampler import SamplerConfig

    t = benchmarks.get(task)
    cfg = SamplerConfig(temperature=1.0).resolve(t)
    batch, _ = rollout(model, tokenizer, t, t.load("test")[:prompts], cfg, group, torch.Generator().manual_seed(seed))
    batch.rewards = torch.rand(len(batch), generator=torch.Generator().manual_seed(seed + 1))
    batch.seed = seed
    return batch


@pytest.fixture(scope="session")
def trained_dir(tmp_path_factory):
    """A weak base from the real pretrain entry point (a few SFT steps): sudoku rewards are partial and varied."""
    from harness.pretrain import PretrainConfig, pretrain

    folder = tmp_path_factory.mktemp("pretrained") / "base"
    report = pretrain(PretrainConfig(out=str(folder), tasks="sudoku:30", batch_size=32, hidden_size=32,
                                     layers=2, heads=2, eval_limit=16))
    assert 0 < report["test"]["sudoku"]["reward"] < 1
    return folder


def reward_climb(module, cfg, tokenizer, steps: int = 4, lr: float = 1e-3) -> list[float]:
    """Mean rollout reward per step of a method trained from the random tiny model on a toy reward (the fraction
    of even token ids in the completion), through its own sample/prepare/loss and plain Adam."""
    from harness.rollout import rollout
    from harness.sampler import SamplerConfig

    task = benchmarks.get("arithmetic")
    policy, ref = make_model(tokenizer), make_model(tokenizer).requires_grad_(False)
    optimizer = torch.optim.Adam(policy.parameters(), lr=lr)
    sample = None
    if hasattr(module, "sample"):
        def sample(model, ids, mask, sampler, generator):
            return module.sample(model, ref, ids, mask, sampler, generator, cfg)
    sampler, generator, history = SamplerConfig(temperature=1.0).resolve(task), torch.Generator().manual_seed(0), []
    for step in range(steps):
        batch, _ = rollout(policy, tokenizer, task, task.load("train")[2 * step:2 * step + 2], sampler, 8, generator,
                           sample)
        batch.rewards, batch.seed = (batch.completion % 2 == 0).float().mean(1), step
        history.append(batch.rewards.mean().item())
        with torch.no_grad():
            batch = module.prepare(policy, ref, batch, cfg)
        for iteration in range(getattr(cfg, "num_iterations", 1)):
            batch.iteration = iteration
            optimizer.zero_grad()
            module.loss(policy, ref, batch, cfg)[0].backward()
            optimizer.step()
    return history
