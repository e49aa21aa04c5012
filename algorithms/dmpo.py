"""DMPO: match the reward-tilted optimal policy with an importance-weighted denoising cross-entropy.

Paper: Zhu, Guo, Choi, Molodyk, Yuan, Tao, Chen. "Enhancing Reasoning for Diffusion LLMs via Distribution
Matching Policy Optimization", arXiv 2510.08233 (ICML 2026).
Reference: yuchen-zhu-zyc/DMPO@96af1a4, DMPO/dmpo_trainer.py (`compute_log_prob_elbo`,
`_generate_and_score_completions`, `compute_loss`, `find_coeff`), DMPO/DMPO_config.py,
DMPO/dmpo_train_config.yaml and DMPO/run_dmpo.sh (hyperparameters).
Spec: shared/docs/specs/espo_dmpo.md Part B.

The target is p*(y|x) proportional to p_ref(y|x) exp(r(x,y)/alpha), the optimum of KL-regularised RL. DMPO
minimises the forward KL(p* || p_theta), i.e. the cross-entropy -E_{p*}[log p_theta], with -log p_theta replaced
by the masked-diffusion denoising loss and E_{p*} by self-normalised importance weights over each group.

Implementation details:
1. Sequence log-likelihoods for the weights: R_w antithetic replicates per rollout, each masking every
   completion position independently with probability lambda ~ U[0.1, 1) (the code's "clamp"
   0.1 + 0.9 U), its partner masking the complement; m = #masked clamped to >= 1;
   l(y) = mean over replicates of (L/m) sum_{masked} log p(y_k | y_masked, x) (`compute_log_prob_elbo`,
   `log_prob_estimate` here). The policy at rollout time (theta_old) and the reference score the same masks.
2. log-RND rho~(y) = l_ref(y) - l_old(y); per group of G completions of one prompt
   w+ = softmax(c (rho~ + r/alpha)), w- = softmax(c (rho~ - r/alpha)) (`_generate_and_score_completions`).
   c = `coeff` (1: jump straight to p*), or with `ada_coeff` the c in [0.01, 0.99] whose ESS = 1/(G sum w+^2)
   equals `ess_threshold`, the nearer bound if none does (`find_coeff`).
3. Loss weight w^ = w+ - s b (`compute_loss`): none b = 0; mean b = group mean of w+ (= 1/G);
   negative_tilt (default) b = w-, so w^ sums to 0 per group; unbiased b = softmax over the group of
   l_theta(y) - l_old(y), with l_theta detached and read from the training masks.
4. WDCE: every rollout is re-noised from scratch into R = `num_replicates` antithetic replicates (fresh masks
   each inner iteration, drawn as in 1; the prompt is never masked, the EOS tail may be); loss =
   (1/R) sum_{rows, replicates} w^_i (1/m) sum_{masked} -log p_theta (the constant L of the ELBO weight dropped,
   as the code does "for smaller loss scales"). Gradient flows only through log p_theta; the weights are
   computed once per rollout batch and reused for all mu = `num_iterations` optimizer steps. No clipping and
   no KL term: the reference enters only through rho~.
5. DDO (`loss="ddo"`): with l_theta^(a), l_theta^(b) the (L/m)-weighted estimates on the first and the
   complementary half of the replicates (`ddo_indep_set`), loss = -mean_i[w+_i log sigmoid(beta_d (l^(a) - l_old))]
   - alpha_d mean_i[log sigmoid(-beta_d (l^(b) - l_old))].

Deviations:
- Weights, the mean baseline, the unbiased baseline and the adaptive c are computed per group (batch.group);
  the official code computes the mean/unbiased baselines and c over the per-device batch, which is a group only
  when the per-device batch size equals G (4 vs 16 in run_dmpo.sh; spec B6 quirk 2).
- lambda's range is a Config field, [mask_prob_min, mask_prob_max) = [0.1, 1.0) by default as in the code
  (`0.1 + 0.9 * rand`); the config help text and comments say [0.1, 0.9] (spec B6 quirk 5). Set
  mask_prob_max=0.9 for the documented range.
- The loss is divided by the number of groups in the optimizer batch (so it is the mean over prompts of each
  group's weighted cross-entropy); the official loss sums over the device batch and HF/DDP average over
  micro-steps and devices, which scales it by per_device_bs / G (1/4 in run_dmpo.sh) and depends on the
  split. The DDO means are over the whole optimizer batch.
- The adaptive c is found by bracketing (scipy brentq on the monotone ESS(c)); the official `find_coeff`
  minimises (threshold - ESS)^2 with L-BFGS-B from c = 0.5, which stops at 0.5 whenever the ESS is flat there
  (e.g. r/alpha gaps of 25 at the default alpha = 0.04) and reports success.
- With baseline="unbiased", a micro-batch must hold whole groups (the softmax reads the current policy on every
  member); otherwise the loss raises an error saying so.
- DDO with ddo_indep_set=False averages over all replicates; the official code sums over them (B6 quirk 6).
- Masks come from per-(row, iteration) seeds and local generators, not the global RNG; forward passes carry the
  prompt attention mask and give the mask token probability zero (the official ones do neither).
- Rollouts use the shared sampler (the official default is Fast-dLLM's prefix-cached sampler at T=0.2), so the
  weights carry the same approximation the code has: the sampler is not exactly p_theta_old (B6 quirk 4).
- Not offered: alpha = 0 / alpha = -1 (reward-only and reward-as-weight variants), `loss_mask_non_eos` and
  `log_rnd_omit_eos` (both off in run_dmpo.sh), the roar sampler of v1, 4-bit loading.
- Rewards are the benchmark's (one function per task, shared by every method), not DMPO's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.optimize
import scipy.special
import torch

from harness.model import token_logits
from harness.rollout import Batch

BASELINES = ("none", "mean", "negative_tilt", "unbiased")
LOSSES = ("wdce", "ddo")


@dataclass(frozen=True)
class Config:
    alpha: float = 0.04
    """KL temperature alpha > 0 of the target p_ref exp(r/alpha) (run_dmpo.sh `--alpha 0.04`)"""
    coeff: float = 1.0
    """proximal step c in (0, 1]: w = softmax(c (rho~ +- r/alpha)); 1 targets p* directly (yaml `coeff`)"""
    ada_coeff: bool = False
    """choose c per group so that the ESS of w+ equals ess_threshold (yaml `ada_coeff`)"""
    ess_threshold: float = 0.7
    """target ESS of the adaptive c (yaml `ada_coeff_ess_threshold`; DMPO_config.py default 0.8)"""
    baseline: str = "negative_tilt"
    """none | mean | negative_tilt | unbiased: b in w^ = w+ - s b (run_dmpo.sh: `advantage_centering_neg true`).
    Measured on the tiny arithmetic task at config/long.yaml's budget (2 seeds, 5,000 test items): the paired gain
    over the base was +0.1 [-1.2, 1.4] points with negative_tilt, +0.1 [-0.9, 1.1] with none, +2.9 [1.9, 4.0] with
    mean; with 64 prompts per step negative_tilt gained +2.6 [1.2, 4.0]"""
    centering_strength: float = 1.0
    """s in w^ = w+ - s b (run_dmpo.sh `--centering_strength 1.0`)"""
    num_replicates: int = 4
    """R, antithetic re-noised copies of each rollout in the loss, even (yaml `num_replicates`)"""
    weight_replicates: int = 4
    """antithetic replicates of the log-RND estimate, even (run_dmpo.sh `--compute_ref_log_prob_elbo_size 4`)"""
    mask_prob_min: float = 0.1
    """lower end of the mask probability lambda ~ U[min, max) (code: 0.1 + 0.9 * rand)"""
    mask_prob_max: float = 1.0
    """upper end of lambda's range: 1.0 as the code does; its help text documents 0.9"""
    loss: str = "wdce"
    """wdce (weighted denoising cross-entropy) | ddo (weighted direct discriminative optimisation) (yaml `loss`)"""
    ddo_alpha: float = 1.0
    """alpha_d, weight of DDO's fake-sample term (yaml `ddo_alpha`)"""
    ddo_beta: float = 1.0
    """beta_d, scale of DDO's log-likelihood gap (yaml `ddo_beta`)"""
    ddo_indep_set: bool = True
    """DDO real/fake terms on the two antithetic halves (yaml `ddo_indep_set: true`; DMPO_config.py default False)"""
    num_iterations: int = 8
    """mu, optimizer steps per rollout batch (run_dmpo.sh `--num_iterations 8`)"""


# ---- the clamped-lambda antithetic Bernoulli estimate (also used by the likelihood-fidelity study) ----

def replicate_masks(seeds: torch.Tensor, length: int, replicates: int, mask_prob_min: float = 0.1,
                    mask_prob_max: float = 1.0) -> torch.Tensor:
    """[B, R, L] bool: per row, R/2 masks with lambda ~ U[min, max) each, then their complements (partner r + R/2)."""
    if replicates % 2:
        raise ValueError(f"DMPO replicates come in antithetic pairs; got an odd number ({replicates})")
    masks = torch.zeros(len(seeds), replicates, length, dtype=torch.bool)
    for i, seed in enumerate(seeds.tolist()):
        g = torch.Generator().manual_seed(int(seed))
        lam = mask_prob_min + (mask_prob_max - mask_prob_min) * torch.rand(replicates // 2, 1, generator=g)
        half = torch.rand(replicates // 2, length, generator=g) < lam
        masks[i] = torch.cat([half, ~half])
    return masks


def masked_logp(model, prompt_ids, prompt_mask, completion, masks: torch.Tensor) -> torch.Tensor:
    """[B, R, L] log p(o_k | o with masks[:, r] set to [MASK], prompt) at masked positions, 0 elsewhere."""
    B, R, L = masks.shape
    masks = masks.to(completion.device)
    noisy = torch.where(masks, model.config.mask_token_id, completion[:, None, :]).reshape(B * R, L)
    ids = torch.cat([prompt_ids.repeat_interleave(R, 0), noisy], dim=1)
    attention = torch.cat([prompt_mask.long().repeat_interleave(R, 0), torch.ones_like(noisy)], dim=1)
    logits = token_logits(model, ids, attention, start=prompt_ids.shape[1])
    logp = torch.log_softmax(logits, -1).gather(-1, completion.repeat_interleave(R, 0)[..., None]).squeeze(-1)
    return torch.where(masks, logp.view(B, R, L), 0.0)


def log_prob_estimate(model, prompt_ids, prompt_mask, completion, seeds: torch.Tensor, replicates: int = 4,
                      mask_prob_min: float = 0.1, mask_prob_max: float = 1.0) -> torch.Tensor:
    """[B] DMPO's sequence log-likelihood estimate: mean over replicates of (L/m) sum_{masked} log p (m >= 1).

    Biased: without the lambda clamp its expectation is L/(L+1) times the ELBO (spec B7 item 8).
    """
    masks = replicate_masks(seeds, completion.shape[1], replicates, mask_prob_min, mask_prob_max)
    logp = masked_logp(model, prompt_ids, prompt_mask, completion, masks)
    m = masks.sum(-1).clamp(min=1).to(logp.device)
    return (completion.shape[1] / m * logp.sum(-1)).mean(1)


# ---- tilted importance weights, per group ----

def group_softmax(x: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """softmax of x within each group (rows with equal `group` ids)."""
    size = int(group.max()) + 1
    top = torch.full((size,), -torch.inf, dtype=x.dtype, device=x.device).scatter_reduce(0, group, x, "amax")
    e = torch.exp(x - top[group])
    return e / torch.zeros(size, dtype=x.dtype, device=x.device).index_add(0, group, e)[group]


def ess(weights: torch.Tensor) -> float:
    """Normalised effective sample size 1 / (G sum w^2) of one group's weights (1 = uniform, 1/G = one-hot)."""
    return float(1.0 / (len(weights) * (weights**2).sum()))


def find_coeff(log_rnd: torch.Tensor, rewards: torch.Tensor, alpha: float, ess_threshold: float) -> float:
    """The c in [0.01, 0.99] whose weights softmax(c (log_rnd + r/alpha)) have ESS = ess_threshold, or the nearer
    bound when none does. ESS falls monotonically in c, so a bracketing root finder cannot miss it."""
    logits = (log_rnd + rewards / alpha).double().cpu().numpy()

    def gap(c: float) -> float:
        w = scipy.special.softmax(c * logits)
        return 1.0 / (len(w) * np.sum(w**2)) - ess_threshold

    low, high = 0.01, 0.99
    if gap(low) <= 0:
        return low
    if gap(high) >= 0:
        return high
    return float(scipy.optimize.brentq(gap, low, high, xtol=1e-10))


def tilted_weights(log_rnd, rewards, group, alpha: float, coeff: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(w+, w-) = per-group softmax(c (log_rnd +- r/alpha)); `coeff` holds one c per group."""
    c = coeff[group]
    return group_softmax(c * (log_rnd + rewards / alpha), group), group_softmax(c * (log_rnd - rewards / alpha), group)


@torch.no_grad()
def prepare(policy, ref, batch: Batch, cfg: Config) -> Batch:
    # ALGO LOGIC: log-RND on shared masks, tilted weights per group, the baseline, per-iteration loss-mask seeds.
    if cfg.alpha <= 0:
        raise ValueError(f"dmpo alpha={cfg.alpha}: only alpha > 0 (the tilted target p_ref e^(r/alpha)) is implemented")
    if cfg.baseline not in BASELINES or cfg.loss not in LOSSES:
        raise ValueError(f"dmpo baseline={cfg.baseline!r}, loss={cfg.loss!r}; choose baseline from {BASELINES} "
                         f"and loss from {LOSSES}")
    B, dev, group = len(batch), batch.rewards.device, batch.group
    generator = torch.Generator().manual_seed(batch.seed)
    weight_seeds = torch.randint(0, 2**31 - 1, (B,), generator=generator)
    lam = (cfg.mask_prob_min, cfg.mask_prob_max)
    args = (batch.prompt_ids, batch.prompt_mask, batch.completion, weight_seeds, cfg.weight_replicates, *lam)
    old, reference = log_prob_estimate(policy, *args), log_prob_estimate(ref, *args)
    log_rnd = reference - old
    n_groups = int(group.max()) + 1
    if cfg.ada_coeff:
        coeff = torch.tensor([find_coeff(log_rnd[group == k], batch.rewards[group == k], cfg.alpha, cfg.ess_threshold)
                              for k in range(n_groups)], device=dev)
    else:
        coeff = torch.full((n_groups,), cfg.coeff, device=dev)
    w_plus, w_minus = tilted_weights(log_rnd, batch.rewards, group, cfg.alpha, coeff)
    sizes = torch.bincount(group, minlength=n_groups).float()
    baseline = {"none": torch.zeros_like(w_plus), "mean": (1.0 / sizes)[group], "negative_tilt": w_minus,
                "unbiased": torch.zeros_like(w_plus)}[cfg.baseline]  # unbiased: computed in `loss`
    batch.extra.update(
        w_plus=w_plus, weight=w_plus - cfg.centering_strength * baseline, old_logp=old, log_rnd=log_rnd,
        coeff=coeff[group], ess=torch.tensor([ess(w_plus[group == k]) for k in range(n_groups)], device=dev)[group],
        group_size=sizes[group], n_groups=torch.full((B,), float(n_groups), device=dev),
        rows=torch.full((B,), float(B), device=dev),
        loss_seeds=torch.randint(0, 2**31 - 1, (B, cfg.num_iterations), generator=generator),
    )
    return batch


def _unbiased_baseline(batch: Batch, elbo_theta: torch.Tensor) -> torch.Tensor:
    """softmax over each group of l_theta - l_old (detached): needs every member of the group in this micro-batch."""
    groups, counts = batch.group.unique(return_counts=True)
    sizes = torch.stack([batch.extra["group_size"][batch.group == g][0] for g in groups])
    if not torch.equal(counts.float(), sizes):
        raise ValueError("dmpo baseline='unbiased' needs whole groups in each micro-batch; set micro_batch_size to "
                         "a multiple of group_size")
    return group_softmax(elbo_theta.detach() - batch.extra["old_logp"], batch.group)


def loss(policy, ref, batch: Batch, cfg: Config) -> tuple[torch.Tensor, dict[str, float]]:
    # ALGO LOGIC: freshly re-noised antithetic replicates; weighted denoising cross-entropy (or weighted DDO).
    R, L = cfg.num_replicates, batch.completion.shape[1]
    masks = replicate_masks(batch.extra["loss_seeds"][:, batch.iteration], L, R, cfg.mask_prob_min, cfg.mask_prob_max)
    logp = masked_logp(policy, batch.prompt_ids, batch.prompt_mask, batch.completion, masks)  # [b, R, L]
    m = masks.sum(-1).clamp(min=1).to(logp.device)
    elbo_r = L / m * logp.sum(-1)  # [b, R] per-replicate (L/m)-weighted log-likelihood
    metrics = {"log_rnd": batch.extra["log_rnd"].mean().item(), "ess": batch.extra["ess"].mean().item(),
               "coeff": batch.extra["coeff"].mean().item()}
    if cfg.loss == "wdce":
        weight = batch.extra["weight"]
        if cfg.baseline == "unbiased":
            weight = batch.extra["w_plus"] - cfg.centering_strength * _unbiased_baseline(batch, elbo_r.mean(1))
        ce = -logp.sum(-1) / m  # [b, R]
        loss = (weight[:, None] * ce).sum() / (R * batch.extra["n_groups"][0])
        metrics["ce"] = ce.detach().mean().item()
        return loss, metrics
    half = R // 2
    real, fake = (elbo_r[:, :half].mean(1), elbo_r[:, half:].mean(1)) if cfg.ddo_indep_set else (elbo_r.mean(1),) * 2
    old = batch.extra["old_logp"]
    terms = (-batch.extra["w_plus"] * torch.nn.functional.logsigmoid(cfg.ddo_beta * (real - old))
             - cfg.ddo_alpha * torch.nn.functional.logsigmoid(-cfg.ddo_beta * (fake - old)))
    return terms.sum() / batch.extra["rows"][0], metrics
