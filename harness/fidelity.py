"""`python -m harness.fidelity`: each method's likelihood surrogate against the exact likelihood, on tiny problems.

Every method replaces the intractable likelihood of a dLLM policy by a surrogate. For short completions
(L <= 8 positions) the truth is computable, so this study measures how far each surrogate is from it, on
fixed batches of rollouts of the tiny base with fixed rewards:

Exact quantities per completion o (one forward pass per revealed subset S of the L positions, 2^L - 1 in all;
the subset with nothing masked needs none):
  random_order    log pi(o) under the random-order sampler that commits one token per step (sampler
                  remasking="random", steps = L, one block): a dynamic programme over revealed subsets,
                  f(S u {j}) += f(S) q(j, o_j | S), q = p_j(o_j | S) / |masked|, instead of a sum over L! orders
  low_confidence  log pi(o) under LLaDA's low-confidence remasking, one token per step (remasking=
                  "low_confidence", steps = L, one block): every masked position i draws x_i ~ p_i and the one
                  whose draw has the highest confidence is committed, so
                    q(j, v | S) = p_j(v) prod_{i masked, i != j} P_{x_i ~ p_i}(c_i(x_i) < c_j(v)),
                  with p the sampling distribution softmax(logits / T) and c the untempered confidence
                  softmax(logits) (harness/sampler.py); ties go to the earlier position, as the sampler's
                  stable ranking does, so the comparison is strict (<) for i < j and <= for i > j
  elbo            the masked-diffusion ELBO of the untempered model (the quantity of harness.likelihood.elbo
                  and exact_elbo), sum_S (|M|-1)! (L-|M|)! / L! sum_{k in M} log p_k(o_k | S), M the masked set
  trajectory      the log-probability of the tokens along the rollout's own order, sum_k log p_k(o_k | state
                  before k's step) (the sampler's record `Batch.logp`; AGRPO's target, DiFFPO's IS denominator)
All four come from the same 2^L - 1 forward passes and are differentiable; the exact policy gradient is their
gradient (the low-confidence likelihood jumps where two confidences tie: its gradient is the one between the
jumps, almost everywhere). The sampling temperature T is the training sampler's (TrainConfig: 0.9), so the
untempered surrogates (d1's, ESPO's, DMPO's, the ELBO) also carry that mismatch; T must be > 0.

The surrogates, called as the methods call them (their `prepare` and `loss`, with the KL weight beta = 0 and
mu = 1: the gradient of the first inner step, at theta = theta_old = theta_ref, where KL terms vanish anyway):
  d1      mean-field one-step log-probs on a randomly masked prompt (harness.likelihood.mean_field_logp),
          summed up to the first EOS                                                  1 pass per draw
  diffpo  the two-times mean-field surrogate (mode="model": the token term only), IS-weighted in the
          gradient, summed up to the first EOS                                        2 passes per draw
  agrpo   the step likelihood of the randomly unmasked trajectory from M drawn steps (M = draws), scaled to
          the sum over its T_i effective steps                                        1 pass per step
  espo    the coupled Monte-Carlo ELBO with num_mc = draws                            2 passes per draw
  dmpo    the clamped-lambda antithetic estimate with 2 replicates per draw (the log-RND weights' estimate);
          the gradient is the weighted denoising cross-entropy with as many replicates 2 passes per draw
  lfpo    no likelihood: only its gradient direction is compared (K = draws stratified states, each scored
          by the policy and by the old policy)                                        2 passes per state
A method without a native number of Monte-Carlo draws (d1, DiFFPO) spends n draws as the mean of n
independent estimates. AGRPO trains on random-unmasking rollouts (its declared sampler), the others on
low-confidence rollouts (the shared training sampler).

The exact gradient a method is compared with is that of its own objective with the exact log-likelihood in
place of the surrogate: sum_i a_i grad log pi(o_i), a_i the per-sequence weight its `prepare` computes from the
fixed rewards (the group-centred advantage for d1, DiFFPO and AGRPO, the leave-one-out advantage for ESPO, the
tilted weight for DMPO, adv_clip (2 r - 1) for LFPO, whose gradient at theta = theta_old is that weight times a
cross-entropy gradient). So the cosine measures the likelihood surrogate alone, with what the method adds to it
(AGRPO's 1/T_i, d1's truncation at the first EOS, DiFFPO's importance weights).

Rewards are fixed seeded U(0, 1) draws, not the task's: at L <= 8 the tiny base rarely solves a task, and
the study is about likelihoods, not rewards. The direction of the exact gradient of a 32-completion batch
depends on which completions the batch holds, so the study draws `batches` independent batches (batch b: the
task's test prompts b * prompts to (b + 1) * prompts - 1, its own rollouts and rewards) and reports over them.

Outputs in --out (CSV, tidy, written atomically; `batch` numbers the batches, `row` the completions in one):
  exact.csv          per completion: batch, rollouts, row, group, reward, completion ids, and the four exact
                     log-likelihoods (nats per sequence)
  loglik.csv         method, batch, rollouts, draws, passes (forward passes per sequence), repeat, row, estimate
  gradient.csv       method, batch, rollouts, target, draws, passes, repeat, cosine with the exact gradient; rows
                     exact_<target> compare two exact gradients (group-centred weights)
  gradient_mean.csv  the same for the mean of the repeats' gradients (its limit shows the estimator's bias)
  run.json           the configuration, model folder, provenance and minutes
A killed run resumes after its last finished batch (kept in --out/.parts/ until the end).
workflow/scripts/fidelity_report.py turns them into paper/tables/fidelity.* and paper/figures/fidelity.*.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import time
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

import algorithms
import benchmarks
from algorithms import agrpo, d1, diffpo, espo
from harness import runs
from harness.cli import EXPECTED, Parser, add_fields, build
from harness.model import load, log_policy, token_logits
from harness.rollout import Batch, group_centered, rollout
from harness.sampler import SamplerConfig
from harness.train import TrainConfig

TARGETS = ("random_order", "low_confidence", "elbo", "trajectory")
MAX_LENGTH = 8  # 2^8 - 1 = 255 forward passes per completion
NEVER = -1e30  # log of an impossible step: finite, so that gradients through the DP stay finite


@dataclass(frozen=True)
class FidelityConfig:
    model: str = "results/base/default"
    """tiny base folder (python -m harness pretrain)"""
    out: str = "results/fidelity"
    """folder for the CSV files and run.json"""
    task: str = "arithmetic"
    """task whose first test prompts are used (module name in benchmarks/)"""
    prompts: int = 4
    """distinct prompts per batch (4 x 8 completions: the default profile's RL batch)"""
    group_size: int = 8
    """completions per prompt (one group each)"""
    gen_length: int = 6
    """completion length L (one block, one token per step); exact enumeration costs 2^L - 1 forward passes"""
    temperature: float = TrainConfig().sampler.temperature
    """sampling temperature T > 0 of the rollouts and of the exact sampler likelihoods (the training sampler's)"""
    draws: tuple[int, ...] = (1, 2, 4, 8)
    """Monte-Carlo draws per estimate (the x axis): AGRPO's steps, ESPO's num_mc, DMPO's antithetic pairs,
    LFPO's states, or independent d1 / DiFFPO estimates averaged"""
    batches: int = 4
    """independent rollout batches (other prompts, rollouts and rewards): the exact gradient's direction varies
    from batch to batch, so results are reported as means and 95% CIs over batches"""
    repeats: int = 4
    """independent estimates per batch and number of draws (bias, variance, rank correlation)"""
    methods: tuple[str, ...] = ("d1", "diffpo", "agrpo", "espo", "dmpo", "lfpo")
    """methods to study (each needs an entry in harness.fidelity.SURROGATES)"""
    seed: int = 0
    """seed of the rollouts, the rewards and every estimate"""
    threads: int = 1
    """torch CPU threads"""

    def __post_init__(self):
        if not 1 <= self.gen_length <= MAX_LENGTH:
            raise ValueError(f"--gen_length={self.gen_length}: the exact likelihoods enumerate all 2^L subsets; "
                             f"choose 1 to {MAX_LENGTH}")
        if not self.temperature > 0:
            raise ValueError(f"--temperature={self.temperature}: the low-confidence likelihood needs a sampling "
                             "temperature > 0 (at 0 the sampler is deterministic)")
        for name in ("prompts", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name}={getattr(self, name)} must be a positive integer")
        if self.group_size < 2 or self.repeats < 2 or self.batches < 1:
            raise ValueError(f"--group_size={self.group_size} and --repeats={self.repeats} must be >= 2 and "
                             f"--batches={self.batches} >= 1 (advantages are group-relative; a variance needs two "
                             "estimates)")
        if not self.draws or min(self.draws) < 1:
            raise ValueError(f"--draws={list(self.draws)} must be positive integers")
        unknown = sorted(set(self.methods) - set(SURROGATES))
        if unknown:
            raise ValueError(f"--methods: no surrogate entry for {unknown}; harness.fidelity.SURROGATES has "
                             f"{sorted(SURROGATES)}")


# ---- exact likelihoods: a dynamic programme over revealed subsets ----

def revealed_sets(length: int) -> torch.Tensor:
    """[2^L - 1, L] bool: row S reveals position j iff bit j of S is set (the full set, nothing masked, is left out)."""
    s = torch.arange(2**length - 1)[:, None]
    return (s >> torch.arange(length)) & 1 == 1


def subset_log_probs(model, prompt_ids, prompt_mask, completion, temperature: float, chunk: int = 1024):
    """(log p_T, log p_1) [N, 2^L - 1, L, V]: the sampling and the untempered distributions at every position of
    every partially revealed state of each completion (rows deduplicated: completions share states)."""
    N, L = completion.shape
    revealed = revealed_sets(L).to(completion.device)
    states = torch.where(revealed, completion[:, None, :], model.config.mask_token_id)  # [N, S, L]
    P = prompt_ids.shape[1]
    rows = torch.cat([prompt_ids[:, None].expand(-1, len(revealed), -1), prompt_mask.long()[:, None].expand(
        -1, len(revealed), -1), states], dim=-1).reshape(-1, 2 * P + L)
    unique, inverse = rows.unique(dim=0, return_inverse=True)
    ids = torch.cat([unique[:, :P], unique[:, 2 * P:]], dim=1)
    attention = torch.cat([unique[:, P:2 * P], torch.ones_like(unique[:, 2 * P:])], dim=1)
    logits = torch.cat([token_logits(model, ids[i:i + chunk], attention[i:i + chunk], start=P)
                        for i in range(0, len(ids), chunk)])[inverse].view(N, len(revealed), L, -1)
    return log_policy(logits, temperature), torch.log_softmax(logits, dim=-1)


def random_order_log_q(log_t, completion, revealed) -> torch.Tensor:
    """[N, S, L] log q(j, o_j | S) of the random-order sampler: log p_j(o_j | S) - log |masked|."""
    masked = (~revealed).sum(-1).clamp(min=1).to(log_t.dtype)
    token = log_t.gather(-1, completion[:, None, :, None].expand(-1, log_t.shape[1], -1, 1)).squeeze(-1)
    return token - masked.log()[None, :, None]


def low_confidence_log_q(log_t, log_1, completion, revealed) -> torch.Tensor:
    """[N, S, L] log q(j, o_j | S) of low-confidence remasking, one token per step (see the module docstring).

    P(c_i(x_i) < c) is the p_T-mass of the tokens whose confidence is below c: the vocabulary sorted by
    confidence, a cumulative sum of p_T, and a search for c (its position is piecewise constant in theta,
    so the gradient flows through the probabilities only, exactly as the derivative of q does)."""
    N, S, L, _ = log_t.shape
    index = completion[:, None, :, None].expand(-1, S, -1, 1)
    token = log_t.gather(-1, index).squeeze(-1)  # log p_T,j(o_j)
    conf = log_1.exp()
    c = conf.gather(-1, index).squeeze(-1).detach()  # [N, S, L_j]
    order = conf.detach().argsort(dim=-1)
    sorted_conf = conf.detach().gather(-1, order)
    mass = torch.cat([torch.zeros_like(conf[..., :1]), log_t.exp().gather(-1, order).cumsum(-1)], dim=-1)
    values = c[:, :, None, :].expand(-1, -1, L, -1).contiguous()  # [N, S, L_i, L_j]: c_j for every i
    below = torch.searchsorted(sorted_conf, values, right=False)  # #tokens of i with confidence < c_j
    at_most = torch.searchsorted(sorted_conf, values, right=True)  # ... <= c_j
    position = torch.arange(L, device=values.device)
    earlier = position[:, None] < position[None, :]  # [L_i, L_j]: i < j, where i wins ties
    beaten = mass.gather(-1, torch.where(earlier, below, at_most))  # P(position i loses to j)
    other = (~revealed)[None, :, :, None] & ~torch.eye(L, dtype=torch.bool, device=values.device)
    log_beaten = torch.where(beaten > 0, beaten.clamp(min=torch.finfo(beaten.dtype).tiny).log(), NEVER)
    return token + torch.where(other, log_beaten, 0.0).sum(2)


def subset_dp(log_q: torch.Tensor) -> torch.Tensor:
    """[N] log of the probability that one-token-per-step steps with transition log-probs log_q [N, S, L] reveal
    everything: f(S u {j}) = logsumexp over j of f(S) + log q(j | S), f(empty) = 0; subsets in numeric order
    come after all their subsets."""
    N, S, L = log_q.shape
    f = [torch.zeros(N, dtype=log_q.dtype, device=log_q.device)]
    for s in range(1, S + 1):
        terms = [f[s ^ (1 << j)] + log_q[:, s ^ (1 << j), j] for j in range(L) if s >> j & 1]
        f.append(torch.logsumexp(torch.stack(terms), dim=0))
    return f[S]


def elbo_from_subsets(log_1, completion, revealed) -> torch.Tensor:
    """[N] the exact ELBO sum_M (|M|-1)! (L-|M|)! / L! sum_{k in M} log p_k(o_k | rest), M the masked set."""
    L = completion.shape[1]
    masked = ~revealed
    m = masked.sum(-1)
    weight = torch.tensor([math.factorial(k - 1) * math.factorial(L - k) / math.factorial(L) for k in m.tolist()],
                          dtype=log_1.dtype, device=log_1.device)
    token = log_1.gather(-1, completion[:, None, :, None].expand(-1, len(revealed), -1, 1)).squeeze(-1)
    return (weight[None, :, None] * torch.where(masked[None], token, 0.0)).sum((1, 2))


def trajectory_from_subsets(log_t, completion, unmask_step) -> torch.Tensor:
    """[N] sum_k log p_T,k(o_k | the state before k's step): the state reveals the positions committed earlier."""
    L = completion.shape[1]
    earlier = (unmask_step[:, None, :] < unmask_step[:, :, None]).long()  # [N, k, j]: j committed before k
    subset = (earlier << torch.arange(L, device=completion.device)).sum(-1)  # [N, k] the bitmask S_k
    token = log_t.gather(-1, completion[:, None, :, None].expand(-1, log_t.shape[1], -1, 1)).squeeze(-1)
    return token.gather(1, subset[:, None, :]).squeeze(1).sum(-1)


def exact_log_likelihoods(model, prompt_ids, prompt_mask, completion, unmask_step, temperature: float) -> dict:
    """{target: [N]} the four exact log-likelihoods of the module docstring (differentiable when grad is on)."""
    revealed = revealed_sets(completion.shape[1]).to(completion.device)
    log_t, log_1 = subset_log_probs(model, prompt_ids, prompt_mask, completion, temperature)
    return {"random_order": subset_dp(random_order_log_q(log_t, completion, revealed)),
            "low_confidence": subset_dp(low_confidence_log_q(log_t, log_1, completion, revealed)),
            "elbo": elbo_from_subsets(log_1, completion, revealed),
            "trajectory": trajectory_from_subsets(log_t, completion, unmask_step)}


def exact_gradients(model, batch: Batch, weights: dict[str, torch.Tensor], progress=None):
    """({target: [B] exact log-likelihoods}, {(target, name): sum_i weights[name]_i grad log pi_target(o_i)}),
    the gradients flattened over the model's parameters; one distinct rollout (prompt, completion, order) at a
    time, its 2^L - 1 states in one pass (rollouts repeat: a group often samples a completion several times)."""
    params = [p for p in model.parameters() if p.requires_grad]
    values = {t: torch.zeros(len(batch)) for t in TARGETS}
    grads = {(t, name): torch.zeros(sum(p.numel() for p in params)) for t in TARGETS for name in weights}
    keys = torch.cat([batch.prompt_ids, batch.prompt_mask.long(), batch.completion, batch.unmask_step], dim=1)
    _, same = keys.unique(dim=0, return_inverse=True)
    for u in same.unique().tolist():
        rows = (same == u).nonzero().squeeze(1)
        one = batch.select(rows[:1])
        with torch.enable_grad():
            exact = exact_log_likelihoods(model, one.prompt_ids, one.prompt_mask, one.completion, one.unmask_step,
                                          batch.temperature)
            for t in TARGETS:
                g = torch.autograd.grad(exact[t].sum(), params, retain_graph=t != TARGETS[-1], allow_unused=True)
                flat = torch.cat([(x if x is not None else torch.zeros_like(p)).flatten() for x, p in zip(g, params)])
                values[t][rows] = exact[t].item()
                for name, w in weights.items():
                    grads[(t, name)] += float(w[rows].sum()) * flat
        if progress is not None:
            progress.update(len(rows))
    return values, grads


# ---- the surrogates, as the methods compute them ----

def _d1_loglik(model, batch: Batch, cfg) -> torch.Tensor:
    return (d1._logp(model, batch, batch.extra["mask_seeds"][:, 0], cfg) * batch.completion_mask).sum(1)


def _diffpo_loglik(model, batch: Batch, cfg) -> torch.Tensor:
    return (diffpo._surrogate(model, batch, 0, cfg)[0] * batch.completion_mask).sum(1)


def _agrpo_loglik(model, batch: Batch, cfg) -> torch.Tensor:
    """T_i / M sum_m w_im sum_{k committed at t_im} log pi: the estimate of sum_{t < T_i} log pi(step t) whose
    gradient, times A_i / T_i, is AGRPO's (algorithms/agrpo.py `loss`)."""
    steps, weights = batch.extra["mc_steps"][:, 0], batch.extra["is_weights"][:, 0]  # [B, M]
    committed = batch.unmask_step[:, None, :] == steps[..., None]
    logp = agrpo._step_logp(model, batch, steps)
    return batch.extra["T"] * (weights * (logp * committed).sum(-1)).mean(1)


def _espo_loglik(model, batch: Batch, cfg) -> torch.Tensor:
    return espo._elbo(model, batch, batch.extra["mask_seeds"][:, 0], cfg)


@dataclass(frozen=True)
class Surrogate:
    """How the study drives one method: its rollouts, its Monte-Carlo knob, its likelihood and its weights."""

    rollouts: str
    """remasking of the rollouts the method trains on (its declared sampler)"""
    passes: int
    """forward passes per sequence per draw"""
    draw_fields: tuple[str, ...] = ()
    """Config fields set to `per_draw` x draws; none: draws independent estimates are averaged"""
    per_draw: int = 1
    """value of draw_fields per draw"""
    loglik: Callable | None = None
    """(model, prepared batch, cfg) -> [B] the method's sequence log-likelihood estimate; None: it has none"""
    weight: Callable = lambda batch, cfg: batch.extra["advantages"]
    """(prepared batch, cfg) -> [B] the weight of grad log pi(o_i) in the method's objective"""
    overrides: dict = field(default_factory=dict)
    """Config overrides besides num_iterations = 1"""


NO_KL = {"beta": 0.0}  # the KL weight of d1, DiFFPO, AGRPO and ESPO (its gradient is zero at theta = theta_ref)
SURROGATES = {
    "d1": Surrogate("low_confidence", 1, loglik=_d1_loglik, overrides=NO_KL),
    "diffpo": Surrogate("low_confidence", 2, loglik=_diffpo_loglik, overrides={**NO_KL, "mode": "model"}),
    "agrpo": Surrogate("random", 1, ("mc_samples",), loglik=_agrpo_loglik, overrides=NO_KL),
    "espo": Surrogate("low_confidence", 2, ("num_mc",), loglik=_espo_loglik, overrides=NO_KL),
    "dmpo": Surrogate("low_confidence", 2, ("weight_replicates", "num_replicates"), 2,
                      loglik=lambda model, batch, cfg: batch.extra["old_logp"],
                      weight=lambda batch, cfg: batch.extra["weight"]),
    "lfpo": Surrogate("low_confidence", 2, ("num_states",), weight=lambda batch, cfg: cfg.adv_clip * (
        2 * batch.extra["r"] - 1)),
}


def method_config(name: str, draws: int):
    """The method's default Config with mu = 1, the study's overrides and its draw fields set."""
    s, cls = SURROGATES[name], algorithms.get(name).Config
    mu = {"num_iterations": 1} if "num_iterations" in {f.name for f in fields(cls)} else {}
    return replace(cls(), **mu, **s.overrides, **{f: s.per_draw * draws for f in s.draw_fields})


def prepared(module, model, batch: Batch, cfg, seed: int) -> Batch:
    fresh = replace(batch, extra={}, seed=seed, iteration=0)
    if hasattr(module, "prepare"):
        with torch.no_grad():
            fresh = module.prepare(model, model, fresh, cfg)
    return fresh


def flat_grad(params) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params])


def calls(name: str, draws: int) -> int:
    """Calls of prepare + loss that spend `draws` draws: one with the draw fields set, or `draws` single draws."""
    return 1 if SURROGATES[name].draw_fields else draws


def estimate(name: str, model, batch: Batch, draws: int, seeds: list[int]) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(log-likelihood estimates [B] or None, ascent direction -grad loss) of one method at `draws` draws, averaged
    over its `calls(name, draws)` calls of prepare + loss, one seed each (the batch seed its prepare draws from)."""
    s, module = SURROGATES[name], algorithms.get(name)
    cfg = method_config(name, draws if s.draw_fields else 1)
    params = [p for p in model.parameters() if p.requires_grad]
    model.zero_grad(set_to_none=True)
    logliks = []
    for seed in seeds:
        b = prepared(module, model, batch, cfg, seed)
        if s.loglik is not None:
            with torch.no_grad():
                logliks.append(s.loglik(model, b, cfg))
        loss, _ = module.loss(model, model, b, cfg)
        loss.backward()
    return (torch.stack(logliks).mean(0) if logliks else None), -flat_grad(params) / len(seeds)


def seed_of(*key: int | str) -> int:
    """A seed from a key of integers and names (names by CRC-32, so that a method's draws do not depend on which
    other methods are studied)."""
    ints = [zlib.crc32(k.encode()) if isinstance(k, str) else k for k in key]
    return int(np.random.SeedSequence(ints).generate_state(1)[0] & 0x7FFFFFFF)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=0))


# ---- the study ----

def rollouts(model, tokenizer, cfg: FidelityConfig, b: int) -> dict[str, Batch]:
    """Batch b: one rollout batch per sampler the studied methods train with, on the task's test prompts
    b * prompts ... (b + 1) * prompts - 1, with the same fixed rewards."""
    task = benchmarks.get(cfg.task)
    examples = task.load("test")[b * cfg.prompts:(b + 1) * cfg.prompts]
    out = {}
    for remasking in dict.fromkeys(SURROGATES[m].rollouts for m in cfg.methods):
        sampler = SamplerConfig(gen_length=cfg.gen_length, block_length=cfg.gen_length, steps=cfg.gen_length,
                                temperature=cfg.temperature, remasking=remasking)
        batch, _ = rollout(model, tokenizer, task, examples, sampler, cfg.group_size,
                           torch.Generator().manual_seed(seed_of(cfg.seed, 1, b, remasking)))
        batch.rewards = torch.rand(len(batch), generator=torch.Generator().manual_seed(seed_of(cfg.seed, 2, b)))
        out[remasking] = batch
    return out


def study(model, tokenizer, cfg: FidelityConfig, parts: Path | None = None) -> dict[str, pd.DataFrame]:
    """Every batch's tables, concatenated. With `parts`, each finished batch is saved there and a rerun of the same
    configuration on the same model resumes after the last saved one."""
    test = len(benchmarks.get(cfg.task).load("test"))
    if cfg.batches * cfg.prompts > test:
        raise ValueError(f"--batches={cfg.batches} x --prompts={cfg.prompts} prompts exceed the {test} test items of "
                         f"{cfg.task}; lower one of them")
    units = cfg.batches * (len(cfg.methods) * cfg.repeats * sum(cfg.draws) + cfg.prompts * cfg.group_size * len(
        {SURROGATES[m].rollouts for m in cfg.methods}))
    bar = tqdm(total=units, desc="fidelity", unit="draw", dynamic_ncols=True)
    # Gradients through probabilities below float32's normal range make CPU matmuls ~20x slower (denormals);
    # flushing them to zero changes nothing above 1e-38. The setting is process-wide: restored at the end.
    torch.set_flush_denormal(True)
    tables = []
    try:
        for b in range(cfg.batches):
            part = parts / f"batch{b}.pkl" if parts else None
            if part and part.exists():
                tables.append(pd.read_pickle(part))
                bar.update(units // cfg.batches)
                continue
            tables.append(study_batch(model, rollouts(model, tokenizer, cfg, b), cfg, b, bar))
            if part:
                part.parent.mkdir(parents=True, exist_ok=True)
                pd.to_pickle(tables[-1], part.with_suffix(".tmp"))
                os.replace(part.with_suffix(".tmp"), part)
    finally:
        torch.set_flush_denormal(False)
        bar.close()
    return {name: pd.concat([t[name] for t in tables], ignore_index=True) for name in tables[0]}


def study_batch(model, batches: dict[str, Batch], cfg: FidelityConfig, b: int, bar) -> dict[str, pd.DataFrame]:
    """The four tables of one batch (module docstring); every row carries the batch index b."""
    L = cfg.gen_length
    exact_rows, loglik_rows, grad_rows, mean_rows = [], [], [], []
    for rollouts_name, batch in batches.items():
        methods = [m for m in cfg.methods if SURROGATES[m].rollouts == rollouts_name]
        weights = {"advantages": group_centered(batch.rewards, batch.group)}
        for m in methods:  # the weights are deterministic given the rewards (log-RND = 0 at theta = theta_ref)
            weights[m] = SURROGATES[m].weight(prepared(algorithms.get(m), model, batch, method_config(m, 1), 0),
                                              method_config(m, 1)).detach().cpu()
        bar.set_postfix(step=f"batch {b}, exact, {rollouts_name} rollouts")
        values, exact = exact_gradients(model, batch, weights, bar)
        head = {"batch": b, "rollouts": rollouts_name}
        exact_rows += [{**head, "row": i, "group": int(batch.group[i]), "reward": float(batch.rewards[i]),
                        "completion": " ".join(map(str, batch.completion[i].tolist())),
                        **{t: float(values[t][i]) for t in TARGETS}} for i in range(len(batch))]
        for target in TARGETS:  # the exact gradients against each other (group-centred weights)
            for other in (t for t in TARGETS if t != target):
                row = {"method": f"exact_{other}", **head, "target": target, "draws": 1,
                       "passes": L if other == "trajectory" else 2**L - 1,
                       "cosine": cosine(exact[(other, "advantages")], exact[(target, "advantages")])}
                grad_rows.append({**row, "repeat": 0})
                mean_rows.append({**row, "repeats": 1})
        for m in methods:
            for n in cfg.draws:
                bar.set_postfix(step=f"batch {b}, {m}, {n} draws")
                common = {"method": m, **head, "draws": n, "passes": SURROGATES[m].passes * n}
                total = 0.0
                for r in range(cfg.repeats):
                    seeds = [seed_of(cfg.seed, 3, b, m, n, r, k) for k in range(calls(m, n))]
                    loglik, grad = estimate(m, model, batch, n, seeds)
                    total = total + grad
                    if loglik is not None:
                        loglik_rows += [{**common, "repeat": r, "row": i, "estimate": float(v)}
                                        for i, v in enumerate(loglik.tolist())]
                    grad_rows += [{**common, "target": t, "repeat": r, "cosine": cosine(grad, exact[(t, m)])}
                                  for t in TARGETS]
                    bar.update(n)
                mean_rows += [{**common, "target": t, "repeats": cfg.repeats, "cosine": cosine(total, exact[(t, m)])}
                              for t in TARGETS]
    key = ["method", "batch", "rollouts", "target", "draws", "passes"]
    return {"exact": pd.DataFrame(exact_rows),
            "loglik": pd.DataFrame(loglik_rows, columns=[*key[:3], *key[4:], "repeat", "row", "estimate"]),
            "gradient": pd.DataFrame(grad_rows)[[*key, "repeat", "cosine"]],
            "gradient_mean": pd.DataFrame(mean_rows)[[*key, "repeats", "cosine"]]}


def parts_folder(cfg: FidelityConfig) -> Path:
    """Where finished batches wait for the end of the run: keyed by the configuration and the model's files, so
    that a rerun resumes only the same study of the same model."""
    files = sorted(f for f in Path(cfg.model).glob("*") if f.is_file())
    key = runs.dumps({**asdict(cfg), "out": "",
                      "model_files": [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]})
    return Path(cfg.out) / ".parts" / f"{zlib.crc32(key.encode()):08x}"


def main(argv: list[str] | None = None) -> dict[str, pd.DataFrame]:
    """The command line; bad input ends in one line `error: ...` (DLLM_DEBUG=1: the traceback), as harness.cli."""
    try:
        return _main(argv)
    except EXPECTED as e:
        if os.environ.get("DLLM_DEBUG"):
            raise
        sys.exit(f"error: {e}")


def _main(argv: list[str] | None) -> dict[str, pd.DataFrame]:
    parser = Parser(prog="python -m harness.fidelity", description=__doc__,
                    formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    add_fields(parser, FidelityConfig())
    cfg = build(FidelityConfig(), vars(parser.parse_args(argv)))
    torch.set_num_threads(cfg.threads)
    started = time.time()
    model, tokenizer = load(cfg.model)
    parts = parts_folder(cfg)
    tables = study(model, tokenizer, cfg, parts)
    out = Path(cfg.out)
    for name, frame in tables.items():
        runs.write_text(out / f"{name}.csv", frame.to_csv(index=False, float_format="%.7g"))
    shutil.rmtree(out / ".parts")
    runs.write_json(out / "run.json", {"config": asdict(cfg), "minutes": round((time.time() - started) / 60, 2),
                                       "cpus": os.cpu_count(), "provenance": runs.provenance()})
    print(f"{(time.time() - started) / 60:.1f} min; files in {out}/")
    return tables


if __name__ == "__main__":
    main()
