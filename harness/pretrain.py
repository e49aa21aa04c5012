"""Build the tiny base model: a tokenizer, a TinyMDLM, and LLaDA masked-diffusion SFT on the tasks' train data.

Loss (LLaDA SFT, d1 `SFT/sft_trainer.py`): per sequence t ~ U(0, 1), t <- (1 - 1e-3) t + 1e-3; each completion
token (the EOS-filled tail included, as LLaDA pads with EOS) is masked with probability t; the prompt is
never masked. loss = sum over masked tokens of CE / t, divided by the number of completion tokens in the
batch. The budget is set so that the base solves some but not all test items, which is what RL needs.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm
from transformers import PreTrainedTokenizerFast

import benchmarks
from harness import runs
from harness.model import token_logits
from harness.evaluate import score
from harness.rollout import encode_prompts
from harness.sampler import SamplerConfig
from harness.tiny import TinyMDLM, TinyMDLMConfig

PAD, EOS, MASK = "<|pad|>", "<|eos|>", "<|mask|>"
SPECIAL_TOKENS = [PAD, EOS, MASK, "<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@dataclass(frozen=True)
class PretrainConfig:
    out: str = "results/base"
    """folder the base model and tokenizer are written to"""
    tasks: str = "arithmetic:1700,sudoku:200"
    """task:steps pairs; each step trains on one task's train split, the tasks interleaved evenly. The budgets
    put the base at 20-60% test reward on each task, where RL has signal (measured 2026-12-04, 1 thread, 256
    test items: arithmetic 39.5%, sudoku 37.8%; on the whole test sets 32.4% and 37.6%). Arithmetic is learned
    abruptly, so the budget matters and small numerical changes move the base: with sudoku:200, arithmetic:1500
    / 1700 / 1850 / 2000 gave 8.6% / 39.5% / 62.1% / 100% (256 items)"""
    batch_size: int = 64
    """sequences per step"""
    lr: float = 2e-3
    """peak AdamW learning rate (linear warmup over 5% of steps, cosine decay to 10%)"""
    weight_decay: float = 0.01
    """AdamW weight decay"""
    hidden_size: int = 128
    """model width"""
    layers: int = 4
    """transformer blocks"""
    heads: int = 4
    """attention heads"""
    vocab_size: int = 320
    """BPE vocabulary size (byte-level, digits always split; 256 bytes + specials + merges)"""
    seed: int = 0
    """seed of initialisation and data order"""
    threads: int = 1
    """torch CPU threads, fixed: float summation order depends on it, and so does the exact base"""
    eval_limit: int = 256
    """test items per task scored at the end (greedy, the shared sampler)"""


def build_tokenizer(corpus: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE (every string encodes), digits split one per token, with pad/eos/mask and a chat template."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS, mask_token=MASK,
                                   chat_template=CHAT_TEMPLATE)


def sft_tensors(tokenizer, task, examples: list[dict]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(prompt ids, prompt mask, completion ids) with each target EOS-filled to the task's GEN_LENGTH."""
    prompt_ids, prompt_mask = encode_prompts(tokenizer, [task.prompt(e) for e in examples])
    completion = torch.full((len(examples), task.GEN_LENGTH), tokenizer.eos_token_id, dtype=torch.long)
    for i, e in enumerate(examples):
        ids = tokenizer.encode(task.target(e), add_special_tokens=False)[: task.GEN_LENGTH]
        completion[i, : len(ids)] = torch.tensor(ids)
    return prompt_ids, prompt_mask, completion


def sft_loss(model, prompt_ids, prompt_mask, completion, generator: torch.Generator) -> torch.Tensor:
    """LLaDA masked-diffusion SFT loss on one batch (see the module docstring)."""
    B, L = completion.shape
    t = (1 - 1e-3) * torch.rand(B, 1, generator=generator) + 1e-3
    masked = torch.rand(B, L, generator=generator) < t
    noisy = torch.where(masked, torch.full_like(completion, model.config.mask_token_id), completion)
    ids = torch.cat([prompt_ids, noisy], dim=1)
    attention = torch.cat([prompt_mask.long(), torch.ones_like(completion)], dim=1)
    logits = token_logits(model, ids, attention, start=prompt_ids.shape[1])
    ce = F.cross_entropy(logits.transpose(1, 2), completion, reduction="none")
    return (ce * masked / t).sum() / (B * L)


def schedule(spec: str) -> list[str]:
    """'a:3,b:1' -> ['a', 'a', 'b', 'a']: each task's steps spread evenly over the run."""
    try:
        budget = {name: int(steps) for name, steps in (item.split(":") for item in spec.split(","))}
    except ValueError:
        raise ValueError(f"pretrain --tasks {spec!r} must look like 'arithmetic:3000,sudoku:200' (task:steps)") from None
    slots = [((i + 0.5) / n, name) for name, n in budget.items() for i in range(n)]
    return [name for _, name in sorted(slots)]


def pretrain(cfg: PretrainConfig) -> dict:
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    plan = schedule(cfg.tasks)
    tasks = {name: benchmarks.get(name) for name in dict.fromkeys(plan)}
    train = {name: task.load("train") for name, task in tasks.items()}
    corpus = [task.prompt(e) + task.target(e) for name, task in tasks.items() for e in train[name][:2000]]
    tokenizer = build_tokenizer(corpus, cfg.vocab_size)
    config = TinyMDLMConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads, intermediate_size=3 * cfg.hidden_size,
        mask_token_id=tokenizer.mask_token_id, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id)
    model = TinyMDLM(config)
    data = {name: sft_tensors(tokenizer, tasks[name], train[name]) for name in tasks}

    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    steps, warmup = len(plan), max(1, len(plan) // 20)
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warmup, 0.1 + 0.45 * (
        1 + math.cos(math.pi * min(1.0, (s - warmup) / max(1, steps - warmup))))))
    generator, order = torch.Generator().manual_seed(cfg.seed), random.Random(cfg.seed)
    start, model = time.time(), model.train()
    bar = tqdm(plan, desc="pretrain", unit="step", dynamic_ncols=True)
    for name in bar:
        rows = torch.tensor(order.sample(range(len(train[name])), cfg.batch_size))
        loss = sft_loss(model, *(tensor[rows] for tensor in data[name]), generator)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        lr_schedule.step()
        bar.set_postfix(task=name, loss=f"{loss.item():.3f}")
    minutes = (time.time() - start) / 60

    scores = {name: score(model, tokenizer, name, cfg.eval_limit, SamplerConfig().resolve(task))
              for name, task in tasks.items()}
    report = {"config": asdict(cfg), "minutes": round(minutes, 2), "parameters": sum(p.numel() for p in model.parameters()),
              "test": scores}
    runs.save_model(model.eval(), tokenizer, Path(cfg.out))
    runs.write_json(Path(cfg.out) / "pretrain.json", {**report, "provenance": runs.provenance()})
    return report
