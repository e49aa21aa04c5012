"""ESPO: a sequence-level clipped objective on the ELBO, the whole completion treated as one action.

Paper: Ou, Han, Xu, Xu, Xie, Ermon, Wu, Li. "Principled RL for Diffusion LLMs Emerges from a Sequence-Level
Perspective", arXiv 2512.03759 (ICLR 2026).
Reference: ML-GSAI/ESPO@b5f2dac, espo/espo_trainer.py (`forward_process`, `_get_elbo`, `_get_elbo_mc`,
`_generate_and_score_completions`, `compute_loss`, `compute_approx_kl`), recipes/run_*_llada.sh and
recipes/train.yaml (hyperparameters).
Spec: shared/docs/specs/espo_dmpo.md Part A.

Implementation details:
1. Sequence log-likelihood ~ the ELBO E_t[(1/t) sum_{masked k} log p(o_k | o_unmasked, prompt)], estimated with
   stratified mask counts n ~ U{0..L}, weight (L+1)/n, plus the complementary pass over the unmasked positions
   with weight (L+1)/(L-n), averaged (harness.likelihood.elbo; trainer `forward_process`, `_get_elbo` with
   `reduce_var`, always on), and over `num_mc` samples (`_get_elbo_mc`). It is a sum over all L canvas
   positions, the EOS tail included (the trainer never applies `completion_mask`).
2. One seed per (row, inner iteration) drawn after the rollout; iteration j uses the same seed for the
   current, old and reference ELBOs, so all three see the same masks (`mask_seeds[GA, mu, num_mc]`,
   `this_itr_idx`). Old ELBOs (if mu > 1) and reference ELBOs (if beta > 0) for every iteration are computed
   once after the rollout, under no_grad; with mu = 1 the old ELBO is the detached current one.
3. Leave-one-out advantages A_i = r_i - mean_{j != i} r_j = G/(G-1) (r_i - mean r), no std scaling
   (`leave_one_out = True`; `scale_rewards: false` in train.yaml).
4. Ratio rho_i = exp((ELBO_theta - ELBO_old) / L) with L the canvas length (`compute_loss`, `coef_1`).
5. Loss = -(1/B) sum_i min(rho_i A_i, clip(rho_i, 1 - eps, 1 + eps) A_i)
          + beta * (1/(B L)) sum_i (ELBO_theta - ELBO_ref)^2 / 2     (k2 on the sequence ELBO, scaled by 1/L).
6. Each rollout batch drives mu = `num_iterations` optimizer steps.

Deviations:
- Mask counts are stratified across the `num_mc` samples of a row, from the row's own seed; the official
  `forward_process` stratifies across the rows of a micro-batch from one shared seed. Ours makes a row's
  estimate independent of which rows share its micro-batch (gradient-accumulation equivalence); each
  count is still marginally U{0..L} and the estimator is still unbiased.
- Seeds drive local `torch.Generator`s; the official code reseeds every global RNG from 12-bit seeds inside
  each ELBO call (spec A6 quirk 2), which also fixes the next rollout's Gumbel noise.
- B is the number of rows of the whole optimizer batch (the official loss averages per micro-batch, then HF
  divides by the accumulation steps: the same value when micro-batches have equal size).
- ELBO forward passes carry the prompt attention mask (the official ones do not, spec A6 quirk 4), and the
  mask token gets probability zero (harness.model.token_logits).
- No LoRA dropout in the old and reference passes: the harness scores in eval mode.
- One clip range (TRL `epsilon`; epsilon_high defaults to it, and no recipe sets it).
- Rollouts use the shared sampler and rewards (ESPO hard-codes block length 32 and its own rewards).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from harness.likelihood import elbo
from harness.rollout import Batch, group_centered


@dataclass(frozen=True)
class Config:
    num_mc: int = 2
    """Monte-Carlo samples per ELBO, each a masked and a complementary pass (run_*_llada.sh `--num_mc 2`)"""
    beta: float = 1e-3
    """weight of the k2 KL on the ELBO (run_gsm8k/math: 1e-3; countdown 3e-3; sudoku 1e-2)"""
    epsilon: float = 0.2
    """clip range of the sequence ratio (train.yaml `epsilon`; run_countdown_llada.sh: 0)"""
    num_iterations: int = 8
    """mu, optimizer steps per rollout batch (run_*_llada.sh `NUM_ITER=8`)"""


def leave_one_out(rewards: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """A_i = r_i - mean of the other rewards of i's group = G/(G-1) (r_i - group mean)."""
    sizes = torch.bincount(group)[group].to(rewards.dtype)
    if (sizes < 2).any():
        raise ValueError("ESPO's leave-one-out advantage needs at least 2 completions per prompt; raise group_size")
    return group_centered(rewards, group) * sizes / (sizes - 1)


def _elbo(model, batch: Batch, seeds: torch.Tensor, cfg: Config) -> torch.Tensor:
    return elbo(model, batch.prompt_ids, batch.prompt_mask, batch.completion, seeds, cfg.num_mc)


@torch.no_grad()
def prepare(policy, ref, batch: Batch, cfg: Config) -> Batch:
    # ALGO LOGIC: LOO advantages, per-(row, iteration) mask seeds, frozen old/ref ELBOs for every seed.
    mu = cfg.num_iterations
    seeds = torch.randint(0, 2**31 - 1, (len(batch), mu), generator=torch.Generator().manual_seed(batch.seed))
    batch.extra["advantages"] = leave_one_out(batch.rewards, batch.group)
    batch.extra["mask_seeds"] = seeds
    batch.extra["rows"] = torch.full((len(batch),), float(len(batch)), device=batch.rewards.device)
    if mu > 1:
        batch.extra["old_elbo"] = torch.stack([_elbo(policy, batch, seeds[:, n], cfg) for n in range(mu)], 1)
    if cfg.beta > 0:
        batch.extra["ref_elbo"] = torch.stack([_elbo(ref, batch, seeds[:, n], cfg) for n in range(mu)], 1)
    return batch


def loss(policy, ref, batch: Batch, cfg: Config) -> tuple[torch.Tensor, dict[str, float]]:
    # ALGO LOGIC: clipped sequence-level ratio exp(dELBO / L) + beta * k2(ELBO, ELBO_ref) / L.
    n, L, B = batch.iteration, batch.completion.shape[1], batch.extra["rows"][0]
    value = _elbo(policy, batch, batch.extra["mask_seeds"][:, n], cfg)
    old = batch.extra["old_elbo"][:, n] if "old_elbo" in batch.extra else value.detach()
    ratio = torch.exp((value - old) / L)
    adv = batch.extra["advantages"]
    clipped = torch.clamp(ratio, 1 - cfg.epsilon, 1 + cfg.epsilon)
    loss = -torch.min(ratio * adv, clipped * adv).sum() / B
    metrics = {}
    if cfg.beta > 0:
        k2 = (value - batch.extra["ref_elbo"][:, n]) ** 2 / 2
        loss = loss + cfg.beta * k2.sum() / (B * L)
        metrics["kl"] = (k2.detach().mean() / L).item()
    active = ((ratio > 1 + cfg.epsilon) & (adv > 0)) | ((ratio < 1 - cfg.epsilon) & (adv < 0))
    metrics["clip_fraction"] = active.float().mean().item()
    metrics["ratio"] = ratio.detach().mean().item()
    metrics["elbo_per_token"] = (value.detach().mean() / L).item()
    return loss, metrics
