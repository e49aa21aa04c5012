"""LFPO: likelihood-free policy optimisation by contrastive cross-entropy on implicit old/new logits.

Paper: Wei, Kang, Wang, Zhang, ..., Shu, Jiang. LFPO, "Likelihood-Free Policy Optimization" (the full title
was not retrieved), arXiv 2603.01563.
Reference: the paper's full text and code (github.com/kithib/LFPO) could not be retrieved. This is the
reconstruction of shared/docs/specs/lfpo_agrpo.md §2, from the abstract, the Figure 1 image
(kithib/kithib.github.io@8b34168:images/LFPO.png) and its evident template DiffusionNFT
(NVlabs/DiffusionNFT@24af555, scripts/train_nft_sd3.py: implicit policies, loss scaling, soft update).

Implementation details:
1. Rollouts come from the EMA "old" policy (Figure 1, Step 1): `sample` decodes with `ref`, which for this
   method IS theta_old (the loop's reference copy, soft-updated by `after_step`). The shared sampler is used.
2. Reward -> optimality probability r in [0, 1] (§2.2, DiffusionNFT recipe): A_i = (R_i - mean_group) /
   (std_group + 1e-4) with the population std of the group (flow_grpo/stat_tracking.py), r_i = 1/2 +
   1/2 clip(A_i, -c, c) / c (train_nft_sd3.py); or the raw reward clipped to [0, 1].
3. K stratified trajectory states per sample (§2.2): t_ik = floor((k + U_ik) T_i / K), one step in each
   stratum [k T_i / K, (k+1) T_i / K) of the row's steps [0, T_i); the state before step t is rebuilt from
   (tokens, unmask step) by harness.likelihood.step_logits.
4. Implicit policies in logit space (§2.2): z+ = (1 - beta) z_old + beta z_theta, z- = (1 + beta) z_old -
   beta z_theta; or, with mixing="prob", p+- = (1 -+ beta) p_old +- beta p_theta, clamped at the smallest
   positive float and renormalised (spec §2.2). z_old is theta_old's logits on the same state, which `loss`
   recomputes from `ref` (= theta_old, unchanged within an RL step) for its micro-batch under no_grad: one
   extra forward of `ref` per loss call, so mu = num_iterations > 1 recomputes them mu times. Storing them
   per rollout would take [B, K, L, V] floats (~1.2e10 at LLaDA-8B scale); DiffusionNFT likewise keeps a
   second "old" LoRA adapter.
5. Contrastive cross-entropy toward the FINAL tokens at the masked positions of the intermediate state
   (§2.2): l_ik = mean over masked j of [r_i CE(z+_j, y_ij) + (1 - r_i) CE(z-_j, y_ij)], and
   L = (c / beta) (1 / (G K)) sum_ik l_ik, averaged over every (row, state) of the batch. The gradient at
   theta = theta_old is (c / beta) beta (2r - 1)(p_old - e_y) = clip(A) (p_old - e_y) per position (§2.7).
6. Block-wise gradient accumulation (Figure 1, Step 2): each harness micro-batch forwards its rows' K
   states together and back-propagates at once; the loss is normalised by the whole batch, so the split
   does not change the gradient.
7. After each RL step (Figure 1, Step 4): theta_old <- alpha theta_old + (1 - alpha) theta, with
   alpha = min(ema_ramp * step, ema_max) (DiffusionNFT `return_decay` type 1: min(0.001 step, 0.5)).

Deviations:
- Reconstruction choices, each a Config field because LFPO's value or rule is unknown (spec §2.2, §2.4):
  `beta` (1.0, DiffusionNFT's default), `adv_clip` (c = 5, DiffusionNFT `adv_clip_max`), `reward_map`,
  `num_states` (K = 4, the middle of the spec's proposed 4-8), `mixing` (logit space by default, "directly
  optimizes denoising logits"), `positions` (all masked positions, future blocks and the EOS-filled tail
  included, as LLaDA's SFT loss counts padding; or only those up to the first EOS), the EMA schedule
  (`ema_ramp`, `ema_max`), `num_iterations` (U inner updates on the same states; the spec proposes 1-2).
- Each state is averaged over its masked positions (the spec's 1/|M|), not weighted by LLaDA's 1/t;
  logits are untempered (temperature 1) in the loss.
- No KL penalty to the frozen base (DiffusionNFT's optional 1e-4 term; LFPO's use of it is unknown).
- Every random draw (strata offsets) comes from a local generator seeded by the batch seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from harness.likelihood import step_logits
from harness.rollout import Batch, group_centered
from harness.sampler import Trajectory, generate

REWARD_MAPS = ("advantage", "raw")
MIXING = ("logit", "prob")
POSITIONS = ("all", "completion")


@dataclass(frozen=True)
class Config:
    beta: float = 1.0
    """beta, the step from the old policy to the implicit +/- policies (DiffusionNFT default; LFPO's unknown)"""
    adv_clip: float = 5.0
    """c: advantages are clipped to [-c, c] before the map to r, and the loss is scaled by c / beta
    (DiffusionNFT `adv_clip_max`)"""
    reward_map: str = "advantage"
    """reward -> r in [0, 1]: advantage (group-normalised, clipped, rescaled; DiffusionNFT) | raw (reward clipped
    to [0, 1], for 0/1 rewards as Figure 1 draws them)"""
    num_states: int = 4
    """K, stratified trajectory states per sample (unknown; the spec proposes 4-8)"""
    mixing: str = "logit"
    """where old and new policies are mixed: logit (z+- = (1 -+ beta) z_old +- beta z_theta) | prob"""
    positions: str = "all"
    """masked positions that carry a target: all (future blocks and EOS tail included) | completion (up to the
    first EOS)"""
    ema_ramp: float = 0.001
    """alpha = min(ema_ramp * step, ema_max) in theta_old <- alpha theta_old + (1 - alpha) theta (DiffusionNFT
    `return_decay` type 1); inf gives a constant alpha = ema_max"""
    ema_max: float = 0.5
    """the cap of alpha (DiffusionNFT type 1: 0.5); 1 with ema_ramp = inf freezes theta_old"""
    num_iterations: int = 1
    """U, optimizer steps on the same states per rollout batch (Figure 1 "Repeat N times"; unknown)"""

    def __post_init__(self):
        for name, allowed in (("reward_map", REWARD_MAPS), ("mixing", MIXING), ("positions", POSITIONS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"lfpo {name}={getattr(self, name)!r}; choose one of {', '.join(allowed)}")
        if not self.beta > 0:
            raise ValueError(f"lfpo beta={self.beta} must be > 0 (the loss is scaled by c / beta)")


@torch.no_grad()
def sample(policy, ref, prompt_ids, prompt_mask, sampler_cfg, generator, cfg: Config) -> Trajectory:
    # ALGO LOGIC (rollout seam): the EMA old policy generates (Figure 1, Step 1).
    return generate(ref, prompt_ids, prompt_mask, sampler_cfg, generator)


def optimality(rewards: torch.Tensor, group: torch.Tensor, cfg: Config) -> torch.Tensor:
    """r in [0, 1] per row (§2.2): the clipped group-normalised advantage rescaled, or the raw reward clipped."""
    if cfg.reward_map == "raw":
        return rewards.clamp(0, 1)
    centered = group_centered(rewards, group)
    var = torch.zeros(int(group.max()) + 1, device=rewards.device).index_add_(0, group, centered**2)
    std = (var / torch.bincount(group))[group].sqrt()  # population std (np.std), as DiffusionNFT
    return 0.5 + 0.5 * torch.clamp(centered / (std + 1e-4), -cfg.adv_clip, cfg.adv_clip) / cfg.adv_clip


def stratified_steps(steps: torch.Tensor, num_states: int, generator: torch.Generator) -> torch.Tensor:
    """[B, K] one step per stratum [k T_i / K, (k+1) T_i / K) of each row's steps [0, T_i)."""
    u = torch.rand(len(steps), num_states, generator=generator)
    t = ((torch.arange(num_states) + u) * steps[:, None].float().cpu() / num_states).floor().long()
    return torch.minimum(t, steps[:, None].cpu() - 1)


def _state_logits(model, batch: Batch, t: torch.Tensor) -> torch.Tensor:
    """[B K, L, V] logits on each row's K states (rows repeated K times, states in stratum order)."""
    K = t.shape[1]
    return step_logits(model, batch.prompt_ids.repeat_interleave(K, 0), batch.prompt_mask.repeat_interleave(K, 0),
                       batch.completion.repeat_interleave(K, 0), batch.unmask_step.repeat_interleave(K, 0),
                       t.flatten())


@torch.no_grad()
def prepare(policy, ref, batch: Batch, cfg: Config) -> Batch:
    # ALGO LOGIC: r per row and K stratified states per row (theta_old's logits on them are recomputed in `loss`).
    B = len(batch)
    t = stratified_steps(batch.nfe, cfg.num_states, torch.Generator().manual_seed(batch.seed)).to(batch.completion.device)
    batch.extra["r"] = optimality(batch.rewards, batch.group, cfg)
    batch.extra["state_step"] = t
    batch.extra["rows"] = torch.full((B,), float(B), device=batch.completion.device)
    return batch


def _finite(z: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(z), z, torch.zeros_like(z))  # the mask token's -inf column


def implicit_log_probs(old_logp: torch.Tensor, logits: torch.Tensor, cfg: Config, mask_id: int):
    """(log p+, log p-) over the vocabulary: the implicit positive and negative policies (§2.2)."""
    b = cfg.beta
    if cfg.mixing == "logit":
        z_old, z = _finite(old_logp), _finite(logits)
        mixed = [((1 - b) * z_old + b * z), ((1 + b) * z_old - b * z)]
        return [torch.log_softmax(m.index_fill(-1, torch.tensor([mask_id], device=m.device), float("-inf")), -1)
                for m in mixed]
    p_old, p = old_logp.exp(), torch.softmax(logits, -1)
    mask = torch.tensor([mask_id], device=p.device)
    out = []
    for mix in ((1 - b) * p_old + b * p, (1 + b) * p_old - b * p):
        mix = mix.clamp(min=torch.finfo(mix.dtype).tiny)  # the negative part of p- (and of p+ for beta > 1)
        norm = mix.index_fill(-1, mask, 0.0).sum(-1, keepdim=True)
        out.append((torch.log(mix) - torch.log(norm)).index_fill(-1, mask, float("-inf")))
    return out


def loss(policy, ref, batch: Batch, cfg: Config) -> tuple[torch.Tensor, dict[str, float]]:
    # ALGO LOGIC: r-weighted contrastive CE of the implicit +/- policies toward the final tokens.
    K = cfg.num_states
    t = batch.extra["state_step"]
    logits = _state_logits(policy, batch, t)
    with torch.no_grad():  # theta_old = ref (the EMA rollout policy) on the same states
        old_logp = torch.log_softmax(_state_logits(ref, batch, t), -1)
    log_pos, log_neg = implicit_log_probs(old_logp, logits, cfg, policy.config.mask_token_id)
    target = batch.completion.repeat_interleave(K, 0)[..., None]
    ce_pos, ce_neg = -log_pos.gather(-1, target).squeeze(-1), -log_neg.gather(-1, target).squeeze(-1)
    masked = batch.unmask_step.repeat_interleave(K, 0) >= t.flatten()[:, None]  # still [MASK] in the state
    if cfg.positions == "completion":
        masked = masked & batch.completion_mask.repeat_interleave(K, 0)
    masked = masked.float()
    r = batch.extra["r"].repeat_interleave(K)[:, None]
    per_state = ((r * ce_pos + (1 - r) * ce_neg) * masked).sum(-1) / masked.sum(-1).clamp(min=1)
    total = cfg.adv_clip / cfg.beta * per_state.sum() / (batch.extra["rows"][0] * K)
    ce_theta = -torch.log_softmax(logits, -1).gather(-1, target).squeeze(-1)
    metrics = {"ce": ((ce_theta.detach() * masked).sum() / masked.sum().clamp(min=1)).item(),
               "r": batch.extra["r"].mean().item(),
               "masked_fraction": masked.mean().item()}
    return total, metrics


@torch.no_grad()
def after_step(policy, ref, step: int, cfg: Config) -> None:
    # ALGO LOGIC: EMA update of the old (rollout) policy, theta_old <- alpha theta_old + (1 - alpha) theta.
    alpha = min(cfg.ema_ramp * step, cfg.ema_max)
    for old, new in zip(ref.parameters(), policy.parameters()):
        old.mul_(alpha).add_(new, alpha=1 - alpha)
