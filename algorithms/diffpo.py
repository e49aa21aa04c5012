"""DiFFPO: off-policy GRPO on a two-times mean-field surrogate, plus a learned entropy-bounded sampler.

Paper: Zhao, Liang, Tang, Yao, Kallus. "DiFFPO: Training Diffusion LLMs to Reason Fast and Furious via
Reinforcement Learning", arXiv 2510.02212 (2025).
Reference: no official code was found, and the full text was not reachable (spec §2.4). This is the
reconstruction of shared/docs/specs/d1_diffpo.md §2 (from paper fragments and reviews); everything it
inherits comes from d1 (dllm-reasoning/d1@837888f, see algorithms/d1.py and spec §1). The EB sampler is
harness.sampler decoding="eb" (spec §0.3).

Implementation details:
1. Rollouts (§2.2 "Sampler policy", §2.3). In the sampler and joint modes `sample` runs one forward pass on
   c + [MASK]^L and reads the threshold token at the first completion slot: pi(g | c) is the softmax of
   that slot's logits over M reserved vocabulary ids (the M highest non-special ids), one per value of
   `gamma_grid`. Each rollout draws g (argmax when decoding greedily), then decodes with the EB sampler at
   gamma = gamma_grid[g]. The trajectory record keeps g and log pi_old(g | c).
   In the model mode the rollouts are the shared top-k (low-confidence) sampler.
2. Two-times mean-field surrogate (§2.2). Inner iteration n draws tau_n ~ U{0..T-1}. A token decoded at
   or before step tau (recorded 0-based unmask step < tau) is scored from the prompt-only pass on
   c' + [MASK]^L (d1's estimator); a later token is scored from c'' + z_tau, where z_tau reveals exactly
   the tokens decoded at or before tau (harness.rollout.state_at). Both passes run as one batched forward
   through harness.likelihood.step_logits (t = 0 is the all-mask canvas), and are scored under the
   sampling distribution softmax(logits / temperature) at the rollout's temperature (Batch.temperature),
   as the behaviour log-probs are ("use the same temperature as the sampler", §2.2).
3. Random prompt masking (d1 §1.2): c' and c'' mask each prompt token with probability `p_mask` and
   `p_mask_z`, from per-(row, iteration) seeds shared by the current, old and reference passes.
4. Truncated importance weight (§2.2): w_k = min(C, pi_hat_old(o_k | .) / pi_old(o_k | c, z_{d_k - 1})), the
   denominator being the behaviour log-prob the sampler recorded (Batch.logp). w is a constant.
5. Token term: -w min(rho A, clip(rho, 1 - eps, 1 + eps) A) + beta k3(ref) per token, rho the surrogate
   ratio at the same tau and masks, summed over the completion mask and divided by the valid tokens of the
   whole batch (d1 §1.2).
6. Old and reference surrogate log-probs for all mu iterations are computed once per rollout under no_grad
   (d1 `_generate_and_score_completions`); with mu = 1 the old log-prob is the detached current one.
7. Threshold term (§2.2 item 6): -min(rho_g A, clip(rho_g, 1 - eps, 1 + eps) A) per rollout with the same
   sequence advantage, averaged over the rows of the batch; the threshold logits are read from the
   prompt-only pass of the same iteration, so rho_g = 1 at the first inner step.
8. Advantage A_i = r_i - mean of its group (d1), with r_i = reward - nfe_penalty * NFE_i / L (§2.2).
9. Modes (§2.2 table): model = token term, top-k rollouts; sampler = threshold term only, EB rollouts;
   joint = both, EB rollouts.

Deviations:
- Reconstruction choices, each a Config field because the paper's value or rule is unknown (spec §2.2,
  §2.4): `tau_per` (one tau per iteration for the whole batch, or one per sample), `p_mask` / `p_mask_z`
  (whether d1's prompt masking is kept in either pass), `is_cap` (C; 5 is the middle of the spec's
  suggested sweep {2, 5, 10}, not a paper value), `beta` (a KL term is not confirmed; d1's k3 with
  beta = 0.04 by default), `epsilon` and `num_iterations` (d1's values), `gamma_grid` (our log-spaced grid
  with 0), `nfe_penalty` (whether the reward charges for NFE is unknown; 0 = pure correctness).
- The threshold token's parameterisation (reserved ids, the first completion slot, softmax over the
  reserved ids only) is ours (spec §2.2 "recommended implementation [I]"). g is drawn from the untempered
  softmax; greedy decoding takes its argmax.
- The IS denominator is the recorded per-step behaviour log-prob (inferred, spec §2.2 [I]).
- Normalisation: d1's token-level normalisation over the batch, not the per-sequence 1/|o_i| of the
  reconstructed objective (spec §2.2): DiFFPO builds on d1's code, and the two differ only across lengths.
- NFE: `Trajectory.nfe` counts EB steps. The threshold pass reads the same input as EB's first step
  (c + [MASK]^L), so a fused sampler needs no extra NFE; ours runs it separately and the harness's
  `forward/rollout` count includes it (spec §2.7 item 11: both are reported).
- In the sampler mode the gradient reaches every weight the threshold logits depend on (the tiny model has
  no separate head); no KL term is used there.
- The old threshold log-prob is recomputed on each iteration's masked prompt (like d1's token log-probs);
  with p_mask = 0 it equals the rollout record.
- A batch not sampled through `sample` (a plain shared-sampler rollout) carries no threshold token: it gets
  no threshold term.
- As in algorithms/d1.py: per-(row, iteration) seeds from a local generator, mu = 1 works with beta > 0,
  no dropout in the rollout or old passes, and the benchmark's task rewards.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from harness.likelihood import masked_prompt, step_logits
from harness.model import log_policy
from harness.rollout import Batch, group_centered
from harness.sampler import Trajectory, generate

MODES = ("model", "sampler", "joint")
TAU_PER = ("batch", "sample")


@dataclass(frozen=True)
class Config:
    mode: str = "joint"
    """what is trained: model (token term, top-k rollouts) | sampler (threshold term, EB) | joint (both, EB)"""
    epsilon: float = 0.5
    """PPO clip range of both terms (d1 train.yaml; DiFFPO's value unknown)"""
    beta: float = 0.04
    """weight of the k3 KL to the reference on the surrogate log-probs (d1; not confirmed for DiFFPO); 0 = off"""
    is_cap: float = 5.0
    """C, the cap of the truncated importance weight (unknown; middle of the spec's sweep {2, 5, 10})"""
    num_iterations: int = 12
    """mu, optimizer steps per rollout batch, each with a fresh tau and prompt masks (d1 train.yaml)"""
    p_mask: float = 0.15
    """probability of masking each prompt token in the prompt-only pass (d1 train.yaml; unknown for DiFFPO)"""
    p_mask_z: float = 0.0
    """the same for the prompt of the c + z_tau pass (0 keeps that pass exact at d_k = tau + 1)"""
    tau_per: str = "batch"
    """batch: one tau per inner iteration for the whole batch (zh review) | sample: one per row"""
    gamma_grid: tuple[float, ...] = (0.0, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
    """the EB thresholds the threshold token chooses from, one reserved vocabulary id each (ours)"""
    nfe_penalty: float = 0.0
    """lambda_NFE: the reward is reduced by lambda * NFE / L (unknown whether DiFFPO does; 0 = off)"""

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"diffpo mode={self.mode!r}; choose one of {', '.join(MODES)}")
        if self.tau_per not in TAU_PER:
            raise ValueError(f"diffpo tau_per={self.tau_per!r}; choose one of {', '.join(TAU_PER)}")
        if not self.is_cap > 0:
            raise ValueError(f"diffpo is_cap={self.is_cap} must be > 0 (use inf for untruncated weights)")


def gamma_token_ids(config, size: int) -> torch.Tensor:
    """The `size` highest vocabulary ids that are not special tokens, ascending: id j stands for gamma_grid[j]."""
    special = {getattr(config, k, None) for k in ("mask_token_id", "pad_token_id", "eos_token_id", "bos_token_id")}
    top = range(config.vocab_size - 1, max(config.vocab_size - 2 - size - len(special), -1), -1)
    ids = [i for i in top if i not in special][:size][::-1]
    if len(ids) < size:
        raise ValueError(f"a vocabulary of {config.vocab_size} ids cannot reserve {size} threshold tokens; "
                         f"shorten gamma_grid")
    return torch.tensor(ids)


def gamma_log_probs(model, canvas_logits: torch.Tensor, cfg: Config) -> torch.Tensor:
    """[B, M] log pi(g | c): the first completion slot's logits on c + [MASK]^L, over the reserved ids only."""
    ids = gamma_token_ids(model.config, len(cfg.gamma_grid)).to(canvas_logits.device)
    return torch.log_softmax(canvas_logits[:, 0, ids], dim=-1)


@torch.no_grad()
def sample(policy, ref, prompt_ids, prompt_mask, sampler_cfg, generator, cfg: Config) -> Trajectory:
    # ALGO LOGIC (rollout seam): draw a threshold token per prompt, then decode with EB at that threshold.
    if cfg.mode == "model":
        return generate(policy, prompt_ids, prompt_mask, sampler_cfg, generator)
    blank = torch.zeros(len(prompt_ids), sampler_cfg.gen_length, dtype=torch.long, device=prompt_ids.device)
    logp = gamma_log_probs(policy, step_logits(policy, prompt_ids, prompt_mask, blank, blank, 0), cfg)  # all masked
    if sampler_cfg.temperature > 0:
        g = torch.multinomial(logp.exp(), 1, generator=generator).squeeze(1)
    else:
        g = logp.argmax(-1)
    gamma = torch.tensor(cfg.gamma_grid, device=prompt_ids.device)[g]
    traj = generate(policy, prompt_ids, prompt_mask, replace(sampler_cfg, decoding="eb"), generator, eb_gamma=gamma)
    traj.extra.update(gamma_index=g, gamma_logp=logp.gather(1, g[:, None]).squeeze(1))
    return traj


def _surrogate(model, batch: Batch, n: int, cfg: Config) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Iteration n's ([B, L] 2-MF token log-probs, [B] threshold-token log-probs); None where the mode has none."""
    B, mask_id = len(batch), model.config.mask_token_id
    seeds, tau = batch.extra["mask_seeds"][:, n], batch.extra["tau"][:, n]
    prompts = [masked_prompt(batch.prompt_ids, batch.prompt_mask, seeds, cfg.p_mask, mask_id)]
    steps = [torch.zeros_like(tau)]  # t = 0: c' + [MASK]^L, the prompt-only pass
    if cfg.mode != "sampler":
        prompts.append(masked_prompt(batch.prompt_ids, batch.prompt_mask, seeds, cfg.p_mask_z, mask_id))
        steps.append(tau)  # c'' + z_tau
    k = len(prompts)
    logits = step_logits(model, torch.cat(prompts), batch.prompt_mask.repeat(k, 1), batch.completion.repeat(k, 1),
                         batch.unmask_step.repeat(k, 1), torch.cat(steps))
    gamma_logp = None
    if cfg.mode != "model":
        index = batch.extra["gamma_index"].clamp(min=0)[:, None]
        gamma_logp = gamma_log_probs(model, logits[:B], cfg).gather(1, index).squeeze(1)
    if cfg.mode == "sampler":
        return None, gamma_logp
    late = (batch.unmask_step >= tau[:, None])[..., None]  # decoded after tau: conditioned on z_tau
    log_q = log_policy(torch.where(late, logits[B:], logits[:B]), batch.temperature)
    return log_q.gather(-1, batch.completion[..., None]).squeeze(-1), gamma_logp


@torch.no_grad()
def prepare(policy, ref, batch: Batch, cfg: Config) -> Batch:
    # ALGO LOGIC: advantages, per-iteration tau and mask seeds, frozen old/ref surrogate log-probs.
    B, L, mu = len(batch), batch.completion.shape[1], cfg.num_iterations
    dev = batch.completion.device
    g = torch.Generator().manual_seed(batch.seed)
    seeds = torch.randint(0, 2**31 - 1, (B, mu), generator=g)
    T = batch.nfe.cpu()  # steps of each rollout; recorded unmask steps lie in [0, T_i)
    if cfg.tau_per == "batch":
        tau = (torch.rand(mu, generator=g) * T.max()).long().expand(B, mu).clone()
    else:
        tau = (torch.rand(B, mu, generator=g) * T[:, None]).long()
    reward = batch.rewards - cfg.nfe_penalty * batch.nfe.float() / L
    batch.extra["advantages"] = group_centered(reward, batch.group)
    batch.extra["mask_seeds"], batch.extra["tau"] = seeds.to(dev), tau.to(dev)
    batch.extra["token_norm"] = batch.completion_mask.sum().float().expand(B)
    batch.extra["rows"] = torch.full((B,), float(B), device=dev)
    # A plain shared-sampler batch (no `sample` record): no threshold token.
    batch.extra.setdefault("gamma_index", torch.full((B,), -1, dtype=torch.long, device=dev))
    if mu > 1:
        old = [_surrogate(policy, batch, n, cfg) for n in range(mu)]
        if cfg.mode != "sampler":
            batch.extra["old_logp"] = torch.stack([tok for tok, _ in old], 1)
        if cfg.mode != "model":
            batch.extra["old_gamma_logp"] = torch.stack([gam for _, gam in old], 1)
    if cfg.beta > 0 and cfg.mode != "sampler":
        batch.extra["ref_logp"] = torch.stack([_surrogate(ref, batch, n, cfg)[0] for n in range(mu)], 1)
    return batch


def loss(policy, ref, batch: Batch, cfg: Config) -> tuple[torch.Tensor, dict[str, float]]:
    # ALGO LOGIC: IS-weighted clipped 2-MF token term (+ k3 KL) and the clipped threshold-token term.
    n = batch.iteration
    logp, gamma_logp = _surrogate(policy, batch, n, cfg)
    adv = batch.extra["advantages"]
    total, metrics = torch.zeros((), device=adv.device), {}
    if logp is not None:
        old = batch.extra["old_logp"][:, n] if "old_logp" in batch.extra else logp.detach()
        log_weight, log_cap = old - batch.logp, math.log(cfg.is_cap)  # old is constant: w carries no gradient
        weight = torch.exp(torch.clamp(log_weight, max=log_cap))
        ratio = torch.exp(logp - old)
        clipped = torch.clamp(ratio, 1 - cfg.epsilon, 1 + cfg.epsilon)
        a = adv[:, None]
        per_token = -weight * torch.min(ratio * a, clipped * a)
        mask = batch.completion_mask.float()
        if cfg.beta > 0:
            delta = batch.extra["ref_logp"][:, n] - logp
            kl = torch.exp(delta) - delta - 1
            per_token = per_token + cfg.beta * kl
            metrics["kl"] = ((kl * mask).sum() / mask.sum()).item()
        total = total + (per_token * mask).sum() / batch.extra["token_norm"][0]
        active = ((ratio > 1 + cfg.epsilon) & (a > 0)) | ((ratio < 1 - cfg.epsilon) & (a < 0))
        metrics["clip_fraction"] = ((active.float() * mask).sum() / mask.sum()).item()
        metrics["ratio"] = ((ratio.detach() * mask).sum() / mask.sum()).item()
        metrics["is_weight"] = ((weight * mask).sum() / mask.sum()).item()
        metrics["is_truncated"] = (((log_weight >= log_cap) * mask).sum() / mask.sum()).item()
    if gamma_logp is not None:
        has_token = (batch.extra["gamma_index"] >= 0).float()
        old = batch.extra["old_gamma_logp"][:, n] if "old_gamma_logp" in batch.extra else gamma_logp.detach()
        ratio = torch.exp(gamma_logp - old)
        clipped = torch.clamp(ratio, 1 - cfg.epsilon, 1 + cfg.epsilon)
        total = total - (has_token * torch.min(ratio * adv, clipped * adv)).sum() / batch.extra["rows"][0]
        grid = torch.tensor(cfg.gamma_grid, device=adv.device)
        metrics["gamma"] = grid[batch.extra["gamma_index"].clamp(min=0)].mean().item()
        metrics["gamma_ratio"] = ratio.detach().mean().item()
    return total, metrics
