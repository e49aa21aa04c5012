"""AGRPO: GRPO on the exact step likelihood of a randomly unmasked trajectory, estimated with M sampled steps.

Paper: Zhan. "Principled and Tractable RL for Reasoning with Diffusion Language Models" (v2: "Simple Policy
Gradients for Reasoning with Diffusion Language Models"), arXiv 2510.04019 (ICML 2026).
Reference: probablyabot/agrpo@98f1182, agrpo_trainer.py (`_generate_and_score_completions`, `compute_loss`,
`_get_per_token_logps_and_entropies`), generate.py (`generate`), agrpo_config.py, train.yaml (hyperparameters).
Spec: shared/docs/specs/lfpo_agrpo.md §0-§1.

With random unmasking the positions committed at each step do not depend on the model, so the log-probability
of the whole trajectory is the sum over steps t of log pi(committed tokens | state before t). GRPO's sum over
tokens becomes a sum over denoising steps, estimated without bias from M steps per sequence.

Implementation details:
1. Rollouts use the shared sampler with `random` remasking (train.yaml `unmasking: random`), declared as this
   method's `sample` override; evaluation uses the shared evaluation sampler. The sampler records, per
   position, the unmask step u_k, the log-prob of the committed token and the entropy of the sampling
   distribution (generate.py `generate`).
2. Advantage A_i = r_i - mean of its group, no std scaling (`_generate_and_score_completions`).
3. Effective length T_i = 1 + the last step that committed a token of the answer (`compute_loss`,
   `last_step`); steps >= T_i are never drawn.
4. M = `mc_samples` steps per sequence from a low-discrepancy sampler over all S = B * M draws,
   u_s = (pi(s) + U_s) / S for a random permutation pi (`compute_loss`, citing arXiv:2409.02908 App. G.2),
   reshaped to [B, M]. Uniform mode: t = floor(u * T_i), weight 1 (HEAD's fix: the first commit's
   floor(u * last_step) never reached the last step). Entropy mode: q_i(t) proportional to the summed
   entropies of the tokens committed at t, plus 1e-8, for t < T_i; t = inverse CDF of q_i at u
   (`searchsorted`), weight (1 / T_i) / q_i(t), so the estimate stays unbiased for the 1/T_i-normalised sum.
5. Per committed token of a drawn step: -min(rho A, clip(rho, 1 - eps, 1 + eps) A) + beta * rho * k3, with
   rho = pi_theta / pi_old on the state rebuilt from (tokens, unmask steps) and k3 = e^D - D - 1,
   D = log pi_ref - log pi_theta; the factor rho on k3 is the code's importance correction (arXiv:2512.02556),
   and gradient flows through it. log pi is the sampling distribution softmax(logits / temperature) at the
   rollout's temperature (Batch.temperature; harness.likelihood.step_logp), which replays the sampler's
   recorded log-probs exactly.
6. Loss = sum over rows, drawn steps and committed tokens of weight * per-token term, divided by M times the
   number of sequences (`compute_loss`: `per_token_loss.sum() / (mc_samples * num_generations)` per
   one-group device batch), so its expectation is (1/B) sum_i (1/T_i) sum_{t < T_i} l_{i,t}.
7. pi_old is the sampler's own record (num_iterations = 1 in train.yaml; with more inner iterations each draws
   fresh steps, as TRL reruns `compute_loss`).

Deviations:
- The M states of a micro-batch go through one batched forward pass and one backward; the official code runs
  one forward/backward per MC step to hold one activation graph at a time. The gradient is the same; at
  scale, a smaller micro_batch_size gives the same memory.
- No top-k / top-p vocabulary truncation: the shared sampler has none, so pi is the full tempered softmax
  (the official sampler records a per-position allowed-vocabulary mask for top_k=150, top_p=0.99).
- T_i counts the steps up to the last one that committed a position inside the harness's completion mask (up
  to and including the first EOS: the answer the reward reads); the official code counts up to the last step
  that committed any non-EOS token, anywhere (and asserts that there is one; an all-EOS row is valid here).
- The steps are drawn once per rollout batch in `prepare` from a generator seeded by the batch seed, over the
  whole batch (the official code draws per device batch from the global RNG); the IS weights use float64 and
  the inverse-CDF index is clamped to T_i - 1 (float round-off could otherwise return T).
- The loss is normalised by M times the number of rows of the whole optimizer batch, not per device batch,
  so any micro-batch split gives the same gradient (identical to the official code when a device batch is
  one group, as in train.yaml).
- The sampler has no early exit for all-EOS blocks (the official sampler fills them and skips their steps);
  it changes cost, not the objective.
- One clip range (TRL `epsilon`; the official code reads epsilon_low/high, both 0.2 in train.yaml).
- Rewards are the benchmark's (one function per task, shared by every method), not AGRPO's format rewards.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from harness.likelihood import step_logp
from harness.rollout import Batch, group_centered
from harness.sampler import generate

IMPORTANCE_SAMPLING = ("uniform", "entropy")


@dataclass(frozen=True)
class Config:
    mc_samples: int = 24
    """M, denoising steps drawn per sequence (train.yaml `mc_samples`; agrpo_config.py default 1)"""
    importance_sampling: str = "entropy"
    """uniform | entropy: how steps are drawn (train.yaml `importance_sampling`; agrpo_config.py default uniform)"""
    low_discrepancy: bool = True
    """stratified draws u_s = (pi(s) + U_s) / S over the batch (train.yaml `low_discrepancy`)"""
    epsilon: float = 0.2
    """PPO clip range (train.yaml `epsilon`)"""
    beta: float = 0.0
    """weight of the rho-weighted k3 KL to the reference (train.yaml `beta`)"""
    num_iterations: int = 1
    """mu, optimizer steps per rollout batch (train.yaml `num_iterations`)"""


def sample(policy, ref, prompt_ids, prompt_mask, sampler_cfg, generator, cfg: Config):
    """Training rollouts: the shared sampler with random unmasking, which makes the step likelihood exact."""
    # ALGO LOGIC: the declared rollout override (train.yaml `unmasking: random`).
    if sampler_cfg.decoding != "steps":
        raise ValueError(f"AGRPO needs sampler.decoding='steps' (a fixed number of randomly chosen positions per "
                         f"step); got {sampler_cfg.decoding!r}, whose choice of positions depends on the model")
    return generate(policy, prompt_ids, prompt_mask, replace(sampler_cfg, remasking="random"), generator)


def effective_length(batch: Batch) -> torch.Tensor:
    """[B] T_i = 1 + the last step that committed a position of the answer (up to and including the first EOS)."""
    return torch.where(batch.completion_mask, batch.unmask_step, -1).max(dim=1).values + 1


def step_distribution(unmask_step: torch.Tensor, entropy: torch.Tensor, T: torch.Tensor) -> torch.Tensor:
    """[B, steps] q_i(t) proportional to the entropy committed at step t (+1e-8) for t < T_i, 0 after."""
    steps = int(unmask_step.max()) + 1
    h = torch.full((len(T), steps), 1e-8, dtype=torch.float64, device=T.device)
    h.scatter_add_(1, unmask_step, entropy.double())
    h[torch.arange(steps, device=T.device)[None, :] >= T[:, None]] = 0.0
    return h / h.sum(1, keepdim=True)


def draw_steps(T: torch.Tensor, M: int, generator: torch.Generator, low_discrepancy: bool,
               q: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(steps [B, M], importance weights [B, M]): uniform on {0..T_i-1} (weight 1), or from q (weight (1/T_i)/q)."""
    B, S = len(T), len(T) * M
    u = torch.rand(S, dtype=torch.float64, generator=generator)
    if low_discrepancy:
        u = (torch.randperm(S, generator=generator).double() + u) / S
    u, last = u.view(B, M).to(T.device), (T - 1)[:, None]
    if q is None:
        t = torch.minimum(torch.floor(u * T[:, None]).long(), last)
        return t, torch.ones(B, M, device=T.device)
    t = torch.minimum(torch.searchsorted(q.cumsum(1), u), last)
    return t, ((1.0 / T[:, None]) / q.gather(1, t)).float()


@torch.no_grad()
def prepare(policy, ref, batch: Batch, cfg: Config) -> Batch:
    # ALGO LOGIC: advantages, effective lengths, the MC steps and IS weights of every inner iteration, ref log-probs.
    if cfg.importance_sampling not in IMPORTANCE_SAMPLING:
        raise ValueError(f"agrpo importance_sampling={cfg.importance_sampling!r}; choose uniform or entropy")
    mu, M = cfg.num_iterations, cfg.mc_samples
    T = effective_length(batch)
    q = step_distribution(batch.unmask_step, batch.entropy, T) if cfg.importance_sampling == "entropy" else None
    generator = torch.Generator().manual_seed(batch.seed)
    draws = [draw_steps(T, M, generator, cfg.low_discrepancy, q) for _ in range(mu)]
    batch.extra["advantages"] = group_centered(batch.rewards, batch.group)
    batch.extra["T"] = T
    batch.extra["mc_steps"] = torch.stack([t for t, _ in draws], 1)  # [B, mu, M]
    batch.extra["is_weights"] = torch.stack([w for _, w in draws], 1)
    batch.extra["norm"] = torch.full((len(batch),), float(M * len(batch)), device=T.device)
    if cfg.beta > 0:
        batch.extra["ref_logp"] = torch.stack([_step_logp(ref, batch, batch.extra["mc_steps"][:, n])
                                               for n in range(mu)], 1)  # [B, mu, M, L]
    return batch


def _step_logp(model, batch: Batch, steps: torch.Tensor) -> torch.Tensor:
    """[B, M, L] log pi(o_k | state before step steps[i, m]), all M states of a row in one batched pass."""
    B, M = steps.shape
    ids, mask, completion, unmask_step = (x.repeat_interleave(M, 0) for x in (
        batch.prompt_ids, batch.prompt_mask, batch.completion, batch.unmask_step))
    logp = step_logp(model, ids, mask, completion, unmask_step, steps.reshape(-1), batch.temperature)
    return logp.view(B, M, -1)


def loss(policy, ref, batch: Batch, cfg: Config) -> tuple[torch.Tensor, dict[str, float]]:
    # ALGO LOGIC: clipped surrogate on the step likelihood of M drawn steps, IS-weighted, 1/(M B)-normalised.
    n = batch.iteration
    steps = batch.extra["mc_steps"][:, n]  # [b, M]
    committed = (batch.unmask_step[:, None, :] == steps[..., None]).float()  # [b, M, L]
    logp = _step_logp(policy, batch, steps)
    ratio = torch.exp(logp - batch.logp[:, None, :])
    adv = batch.extra["advantages"][:, None, None]
    per_token = -torch.min(ratio * adv, torch.clamp(ratio, 1 - cfg.epsilon, 1 + cfg.epsilon) * adv)
    metrics = {}
    if cfg.beta > 0:
        delta = batch.extra["ref_logp"][:, n] - logp
        kl = (torch.exp(delta) - delta - 1) * ratio
        per_token = per_token + cfg.beta * kl
        metrics["kl"] = ((kl.detach() * committed).sum() / committed.sum()).item()
    weights = batch.extra["is_weights"][:, n, :, None]
    loss = (per_token * weights * committed).sum() / batch.extra["norm"][0]
    active = ((ratio > 1 + cfg.epsilon) & (adv > 0)) | ((ratio < 1 - cfg.epsilon) & (adv < 0))
    metrics["clip_fraction"] = ((active.float() * committed).sum() / committed.sum()).item()
    metrics["ratio"] = ((ratio.detach() * committed).sum() / committed.sum()).item()
    metrics["effective_steps"] = batch.extra["T"].float().mean().item()
    return loss, metrics
