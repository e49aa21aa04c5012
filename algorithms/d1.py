"""d1 / diffu-GRPO: GRPO with a one-step mean-field likelihood and random prompt masking.

Paper: Zhao, Gupta, Zheng, Grover. "d1: Scaling Reasoning in Diffusion Large Language Models via
Reinforcement Learning", arXiv 2504.12216 (NeurIPS 2025).
Reference: dllm-reasoning/d1@837888f, diffu-grpo/diffu_grpo_trainer.py (`forward_process`,
`_get_per_token_logps`, `compute_loss`), diffu-grpo/slurm_scripts/train.yaml (hyperparameters).
Spec: shared/docs/specs/d1_diffpo.md §1.

Implementation details:
1. Sequence likelihood ~ sum_k log p(o_k | q'), read from ONE forward pass on q' + [MASK]^L, where q' masks
   each prompt token with probability p_mask (harness.likelihood.mean_field_logp; trainer `forward_process`).
2. mu mask seeds per rollout batch; inner iteration n uses seed n for the current, old and reference passes,
   so all three see the same q'_n (trainer: `set_seed(mask_seed)` before each mask draw).
3. Old and reference log-probs for all mu seeds are computed once after the rollout, under no_grad
   (`_generate_and_score_completions`). With mu = 1 the old log-prob is the detached current one.
4. Advantage A_i = r_i - mean of its group, no std scaling (Dr. GRPO; paper Eq. 2).
5. Per token: -min(rho A, clip(rho, 1 - eps, 1 + eps) A) + beta k3, with k3 = e^(ref - l) - (ref - l) - 1,
   summed over the completion mask (up to and including the first EOS).
6. Each rollout batch drives mu optimizer steps (TRL `num_iterations`).

Deviations:
- Token normalisation is over all valid tokens of the optimizer batch, not of each per-device micro-batch:
  the gradient then does not depend on how the batch is split (grad-accumulation equivalence).
- Mask seeds are per (row, iteration) and drawn with a local generator; the official code reseeds the
  global RNG with 12-bit seeds inside every log-prob call (spec §1.6 bug 6), which couples the rollout
  randomness to the mask seeds. Ours does not.
- mu = 1 with beta > 0 works (the official code crashes, spec §1.6 bug 1).
- `clip_fraction` counts tokens whose clipped branch is active, not tokens out of range (bug 9).
- No LoRA dropout in the rollout or old passes (bug 8): the harness samples and scores in eval mode.
- Rewards are the benchmark's (one function per task, shared by every method), not d1's format rewards.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from harness.likelihood import mean_field_logp
from harness.rollout import Batch, group_centered


@dataclass(frozen=True)
class Config:
    beta: float = 0.04
    """weight of the k3 KL to the reference (train.yaml `beta`)"""
    epsilon: float = 0.5
    """PPO clip range (train.yaml `epsilon`)"""
    p_mask: float = 0.15
    """probability of masking each prompt token (train.yaml `p_mask_prompt`; config default 0.3)"""
    num_iterations: int = 12
    """mu, optimizer steps per rollout batch (train.yaml: 12 for GSM8K/MATH; sbatch: 8 for Countdown/Sudoku)"""
    random_masking: bool = True
    """fresh mask seeds per rollout batch; False fixes every seed at 42 (train.yaml `random_masking`)"""


def _logp(model, batch: Batch, seeds: torch.Tensor, cfg: Config) -> torch.Tensor:
    return mean_field_logp(model, batch.prompt_ids, batch.prompt_mask, batch.completion, seeds, cfg.p_mask)


@torch.no_grad()
def prepare(policy, ref, batch: Batch, cfg: Config) -> Batch:
    # ALGO LOGIC: advantages, per-(row, iteration) mask seeds, frozen old/ref log-probs for every seed.
    mu = cfg.num_iterations
    if cfg.random_masking:
        seeds = torch.randint(0, 2**31 - 1, (len(batch), mu), generator=torch.Generator().manual_seed(batch.seed))
    else:
        seeds = torch.full((len(batch), mu), 42) + torch.arange(len(batch))[:, None]  # fixed, distinct per row
    batch.extra["advantages"] = group_centered(batch.rewards, batch.group)
    batch.extra["mask_seeds"] = seeds
    batch.extra["token_norm"] = batch.completion_mask.sum().float().expand(len(batch))
    if mu > 1:
        batch.extra["old_logp"] = torch.stack([_logp(policy, batch, seeds[:, n], cfg) for n in range(mu)], 1)
    if cfg.beta > 0:
        batch.extra["ref_logp"] = torch.stack([_logp(ref, batch, seeds[:, n], cfg) for n in range(mu)], 1)
    return batch


def loss(policy, ref, batch: Batch, cfg: Config) -> tuple[torch.Tensor, dict[str, float]]:
    # ALGO LOGIC: clipped surrogate on mean-field token log-probs + beta * k3, token-normalised.
    n = batch.iteration
    logp = _logp(policy, batch, batch.extra["mask_seeds"][:, n], cfg)
    old = batch.extra["old_logp"][:, n] if "old_logp" in batch.extra else logp.detach()
    ratio = torch.exp(logp - old)
    adv = batch.extra["advantages"][:, None]
    clipped = torch.clamp(ratio, 1 - cfg.epsilon, 1 + cfg.epsilon)
    per_token = -torch.min(ratio * adv, clipped * adv)
    mask = batch.completion_mask.float()
    metrics = {}
    if cfg.beta > 0:
        delta = batch.extra["ref_logp"][:, n] - logp
        kl = torch.exp(delta) - delta - 1
        per_token = per_token + cfg.beta * kl
        metrics["kl"] = ((kl * mask).sum() / mask.sum()).item()
    loss = (per_token * mask).sum() / batch.extra["token_norm"][0]
    active = ((ratio > 1 + cfg.epsilon) & (adv > 0)) | ((ratio < 1 - cfg.epsilon) & (adv < 0))
    metrics["clip_fraction"] = ((active.float() * mask).sum() / mask.sum()).item()
    metrics["ratio"] = ((ratio.detach() * mask).sum() / mask.sum()).item()
    return loss, metrics
