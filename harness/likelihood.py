"""Shared likelihood estimators. Every method that needs one of these calls it from here.

  mean_field_logp   d1's one-step mean-field surrogate: the completion fully masked, the prompt randomly
                    masked, one forward pass, log p(o_k | masked prompt) at every completion position.
  step_logits /     the exact per-step conditionals of a recorded trajectory: rebuild the state before step
  step_logp         t from (tokens, unmask step) and score it (AGRPO, LFPO, DiFFPO).
  elbo              the coupled Monte-Carlo ELBO: stratified mask counts and the complementary pass, so
                    every position is masked in exactly one of the two passes (ESPO, DMPO, lm-eval).
  exact_elbo        the same ELBO by enumerating every mask set (tests and the fidelity study).

Randomness comes only from per-row seeds fed to local `torch.Generator`s, never the global RNG, and a row's
masks depend only on its own seed and real length, not on padding or on which micro-batch it sits in. So
the current, old and reference passes share masks by sharing seeds, and gradient accumulation cannot
change an estimate.
"""

from __future__ import annotations

import math
from itertools import combinations

import torch

from harness.model import log_policy, token_logits
from harness.rollout import state_at


def masked_prompt(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, seeds: torch.Tensor, p_mask: float,
                   mask_id: int) -> torch.Tensor:
    """Each real prompt token replaced by [MASK] with probability p_mask, drawn from the row's seed."""
    out = prompt_ids.clone()
    for i, seed in enumerate(seeds.tolist()):
        g = torch.Generator().manual_seed(int(seed))
        real = prompt_mask[i].nonzero().squeeze(1)
        hit = (torch.rand(len(real), generator=g) < p_mask).to(prompt_ids.device)
        out[i, real[hit]] = mask_id
    return out


def mean_field_logp(model, prompt_ids, prompt_mask, completion, seeds: torch.Tensor, p_mask: float) -> torch.Tensor:
    """[B, L] log p(o_k | masked prompt, all-[MASK] completion), one forward pass (d1 §1.2)."""
    mask_id = model.config.mask_token_id
    prompt = masked_prompt(prompt_ids, prompt_mask, seeds, p_mask, mask_id)
    ids = torch.cat([prompt, torch.full_like(completion, mask_id)], dim=1)
    attention = torch.cat([prompt_mask.long(), torch.ones_like(completion)], dim=1)
    logits = token_logits(model, ids, attention, start=prompt_ids.shape[1])
    return torch.log_softmax(logits, -1).gather(-1, completion[..., None]).squeeze(-1)


def step_logits(model, prompt_ids, prompt_mask, completion, unmask_step, t) -> torch.Tensor:
    """[B, L, V] completion logits on the state just before step t (an int or one step per row)."""
    state = state_at(completion, unmask_step, t, model.config.mask_token_id)
    ids = torch.cat([prompt_ids, state], dim=1)
    attention = torch.cat([prompt_mask.long(), torch.ones_like(completion)], dim=1)
    return token_logits(model, ids, attention, start=prompt_ids.shape[1])


def step_logp(model, prompt_ids, prompt_mask, completion, unmask_step, t, temperature: float) -> torch.Tensor:
    """[B, L] log pi(o_k | state before step t) under the sampling distribution; the positions committed at t
    (`unmask_step == t`) are the trajectory's step-t factors, and they replay the sampler's recorded `logp`."""
    logits = step_logits(model, prompt_ids, prompt_mask, completion, unmask_step, t)
    return log_policy(logits, temperature).gather(-1, completion[..., None]).squeeze(-1)


def elbo_masks(seeds: torch.Tensor, length: int, num_mc: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Masks [B, num_mc, L] (bool) and counts n [B, num_mc] of the coupled estimator.

    Per row, k ~ U{0..L} and n_m = (k + round(m (L+1) / num_mc)) mod (L+1): stratified counts whose
    marginals are each U{0..L}; each mask is a uniformly random set of n_m positions.
    """
    masks = torch.zeros(len(seeds), num_mc, length, dtype=torch.bool)
    counts = torch.zeros(len(seeds), num_mc, dtype=torch.long)
    for i, seed in enumerate(seeds.tolist()):
        g = torch.Generator().manual_seed(int(seed))
        k = int(torch.randint(0, length + 1, (1,), generator=g))
        for m in range(num_mc):
            n = (k + round(m * (length + 1) / num_mc)) % (length + 1)
            masks[i, m, torch.randperm(length, generator=g)[:n]] = True
            counts[i, m] = n
    return masks, counts


def elbo(model, prompt_ids, prompt_mask, completion, seeds: torch.Tensor, num_mc: int = 1) -> torch.Tensor:
    """[B] unbiased estimate of the ELBO  E_t[(1/t) sum_{masked k} log p(o_k | o_unmasked, prompt)].

    Pass 1 masks M (|M| = n) and weighs its tokens by (L+1)/n; pass 2 masks the complement with weight
    (L+1)/(L-n) (ESPO `_get_elbo`, `reduce_var`); the estimate is their mean, averaged over num_mc samples.
    All 2 * num_mc noisy copies of a row go through one batched forward pass. The prompt is never masked.
    """
    B, L = completion.shape
    masks, counts = elbo_masks(seeds, L, num_mc)
    masks, counts = masks.to(completion.device), counts.to(completion.device)
    both = torch.cat([masks, ~masks], dim=1)  # [B, 2 num_mc, L]
    sizes = torch.cat([counts, L - counts], dim=1).float()
    mask_id = model.config.mask_token_id
    noisy = torch.where(both, torch.full_like(both, mask_id, dtype=torch.long), completion[:, None, :])
    copies = both.shape[1]
    ids = torch.cat([prompt_ids.repeat_interleave(copies, 0), noisy.reshape(B * copies, L)], dim=1)
    attention = torch.cat([prompt_mask.long().repeat_interleave(copies, 0), torch.ones(B * copies, L, dtype=torch.long,
                                                                                       device=completion.device)], dim=1)
    logits = token_logits(model, ids, attention, start=prompt_ids.shape[1])
    logp = torch.log_softmax(logits, -1).gather(-1, completion.repeat_interleave(copies, 0)[..., None]).squeeze(-1)
    per_copy = (logp.reshape(B, copies, L) * both).sum(-1) * (L + 1) / sizes.clamp(min=1)
    return per_copy.mean(1)  # mean over the 2 passes x num_mc samples = mean_m of (a_m + a_m^c) / 2


@torch.no_grad()
def exact_elbo(model, prompt_ids, prompt_mask, completion) -> torch.Tensor:
    """[B] the ELBO by enumerating all 2^L - 1 mask sets: sum_M (|M|-1)!(L-|M|)!/L! sum_{k in M} log p(o_k | rest)."""
    B, L = completion.shape
    total = torch.zeros(B, device=completion.device)
    for size in range(1, L + 1):
        weight = math.factorial(size - 1) * math.factorial(L - size) / math.factorial(L)
        for subset in combinations(range(L), size):
            masked = torch.zeros(L, dtype=torch.bool, device=completion.device)
            masked[list(subset)] = True
            noisy = torch.where(masked, model.config.mask_token_id, completion)
            ids = torch.cat([prompt_ids, noisy], dim=1)
            attention = torch.cat([prompt_mask.long(), torch.ones_like(completion)], dim=1)
            logits = token_logits(model, ids, attention, start=prompt_ids.shape[1])
            logp = torch.log_softmax(logits, -1).gather(-1, completion[..., None]).squeeze(-1)
            total += weight * (logp * masked).sum(-1)
    return total
