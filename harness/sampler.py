"""The one sampler: LLaDA semi-autoregressive block decoding, for rollouts and evaluation alike.

The completion canvas starts fully masked and is split into blocks decoded left to right; a position may
be committed only while its block is the row's current block (the first block that still has masks).
Committed tokens never change. Each step runs one forward pass (one NFE) and commits

  decoding="steps"      k_s tokens, the quota of LLaDA's linear schedule: a block of m masks gets S =
                        steps / n_blocks steps and k_s = m // S + [s < m % S] (LLaDA `generate.py`,
                        `get_num_transfer_tokens`), chosen by the remasking score:
                          low_confidence  softmax(logits)[x_hat] (untempered, as LLaDA and d1)
                          random          U(0, 1): positions chosen independently of the model (AGRPO)
                          entropy         -H of the sampling distribution
  decoding="threshold"  every eligible token whose confidence is >= `threshold`, at least the most
                        confident one (Fast-dLLM's confidence-aware parallel decoding)
  decoding="eb"         the longest prefix, in ascending entropy, whose entropies sum, minus the largest,
                        to <= `eb_gamma` (the entropy-bounded sampler, Ben-Hamu et al. 2025), at least one

Candidate tokens are drawn by Gumbel-max at `temperature` from a local `torch.Generator` (argmax at 0). For
every completion position the record keeps the step at which it was committed, the log-probability of the
committed token and the entropy under the sampling distribution softmax(logits / temperature) (plain
softmax at temperature 0) at that moment. Any intermediate state is recoverable from (tokens, unmask step):
the state before a row's step t masks exactly its positions with unmask_step >= t (`harness.rollout.state_at`);
a row's steps are 0..nfe-1 and each commits at least one token.

Exact and approximate modes:
  cache="none" (default)  exact: the tokens of LLaDA's generate() at temperature 0 in fp32 (the re-implementation
                          in harness/reference.py; tested). Every step encodes the whole canvas as there; the
                          speed comes from engineering only: the softmaxes and the selection (and, for models
                          that take `logits_to_keep` like harness/tiny.py, the LM head and the last layer's
                          queries and MLP) run on the masked positions of the current blocks only,
                          selection is batched (no per-row loop), rows that have finished leave the batch,
                          nothing is float64. Random draws keep their full shapes, so a seed gives the samples
                          it always gave. Recorded log-probs and entropies equal a full-canvas recomputation up
                          to the rounding of kernels run on other shapes (~1e-6).
  cache="prefix"|"dual"   approximate (Fast-dLLM's block-wise K/V cache): one full pass at the start of each
                          block caches every position's keys and values; the block's other steps encode only the
                          block and the suffix ("prefix") or only the block ("dual"). The whole batch decodes one
                          block at a time; a row that finished the block waits without spending steps.
  decoding="threshold"|"eb", or fewer steps than tokens: approximate parallel decoding (several tokens per
                          step from one forward pass); combines with either cache.
`python -m harness.bench` measures the speed of each mode against the reference and the accuracy they cost.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field, replace

import torch

from harness.model import is_shifted, log_policy, token_logits

REMASKING = ("low_confidence", "random", "entropy")
DECODING = ("steps", "threshold", "eb")
CACHE = ("none", "prefix", "dual")


@dataclass(frozen=True)
class SamplerConfig:
    gen_length: int | None = None
    """completion canvas length L; None = the task's GEN_LENGTH"""
    block_length: int | None = None
    """semi-autoregressive block length B (L % B == 0); None = the task's BLOCK_LENGTH"""
    steps: int | None = None
    """total denoising steps N for decoding="steps" (a multiple of L/B); None = the task's STEPS"""
    temperature: float = 0.0
    """Gumbel-max temperature of candidate tokens; 0 = greedy"""
    remasking: str = "low_confidence"
    """which k_s positions a "steps" step commits: low_confidence | random | entropy"""
    decoding: str = "steps"
    """steps (fixed quota) | threshold (confidence >= threshold) | eb (entropy-bounded)"""
    threshold: float = 0.9
    """confidence threshold for decoding="threshold" (Fast-dLLM default 0.9)"""
    eb_gamma: float = 0.1
    """entropy budget gamma for decoding="eb"; 0 = one token per step, inf = one step per block"""
    cache: str = "none"
    """K/V cache within a block (Fast-dLLM): none = exact, every step encodes the whole canvas; prefix = the
    prompt and finished blocks are encoded once per block; dual = the masked suffix too. prefix and dual
    are approximate for bidirectional models and need a model that accepts `canvas_cache` (harness/tiny.py)"""

    def resolve(self, task) -> SamplerConfig:
        """Fill unset lengths from the task module and check that they fit together."""
        cfg = replace(
            self,
            gen_length=self.gen_length or task.GEN_LENGTH,
            block_length=self.block_length or task.BLOCK_LENGTH,
            steps=self.steps or task.STEPS,
        )
        cfg.validate()
        return cfg

    def validate(self) -> None:
        L, B, N = self.gen_length, self.block_length, self.steps
        if self.remasking not in REMASKING:
            raise ValueError(f"sampler.remasking={self.remasking!r}; choose one of {', '.join(REMASKING)}")
        if self.decoding not in DECODING:
            raise ValueError(f"sampler.decoding={self.decoding!r}; choose one of {', '.join(DECODING)}")
        if self.cache not in CACHE:
            raise ValueError(f"sampler.cache={self.cache!r}; choose one of {', '.join(CACHE)}")
        if L is None or B is None or N is None or min(L, B, N) <= 0:
            raise ValueError(f"sampler lengths must be positive integers, got gen_length={L}, block_length={B}, steps={N}")
        if L % B:
            raise ValueError(f"sampler.gen_length={L} is not divisible by sampler.block_length={B}; "
                             f"choose a block length that divides {L}")
        if self.decoding == "steps" and (N % (L // B) or N // (L // B) > B):
            raise ValueError(f"sampler.steps={N} must be a multiple of the {L // B} blocks and at most "
                             f"gen_length={L} (1 to {B} steps per block)")
        if self.temperature < 0:
            raise ValueError(f"sampler.temperature={self.temperature} must be >= 0")


@dataclass
class Trajectory:
    """What one call of `generate` returns; every tensor has the batch as its first dimension."""

    completion: torch.Tensor  # [B, L] long   final tokens
    unmask_step: torch.Tensor  # [B, L] long  the row's step (0-based) at which each position was committed
    logp: torch.Tensor  # [B, L] float        log-prob of the committed token under the sampling distribution
    entropy: torch.Tensor  # [B, L] float     entropy of the sampling distribution at commit time
    nfe: torch.Tensor  # [B] long             forward passes that committed something in this row (= T_i)
    forward_passes: int  #                    batched forward passes run
    extra: dict = field(default_factory=dict)  # per-row tensors a method's `sample` adds; copied to Batch.extra


def step_quotas(block_length: int, steps_per_block: int) -> list[int]:
    """k_s for s = 0..S-1: the linear schedule's tokens per step, summing to the block length."""
    base, extra = divmod(block_length, steps_per_block)
    return [base + (s < extra) for s in range(steps_per_block)]


@torch.no_grad()
def generate(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, cfg: SamplerConfig,
             generator: torch.Generator | None = None, on_step=None, eb_gamma: torch.Tensor | None = None) -> Trajectory:
    """Sample completions for left-padded prompts [B, P] (`prompt_mask` is 1 on real tokens).

    `on_step(t, x)` is called before each step with the full canvas, for tests and visualisation.
    `eb_gamma` [B] replaces `cfg.eb_gamma` with one budget per row (a learned, prompt-conditioned threshold).
    """
    cfg.validate()
    cached = cfg.cache != "none"
    if cached:
        _check_cache_support(model, cfg)
    B, P = prompt_ids.shape
    L, block, dev = cfg.gen_length, cfg.block_length, prompt_ids.device
    mask_id, n_blocks = model.config.mask_token_id, cfg.gen_length // cfg.block_length
    x = torch.cat([prompt_ids, torch.full((B, L), mask_id, dtype=torch.long, device=dev)], dim=1)
    attention = torch.cat([prompt_mask.long(), torch.ones(B, L, dtype=torch.long, device=dev)], dim=1)
    unmask_step = torch.full((B, L), -1, dtype=torch.long, device=dev)
    logp, entropy = torch.zeros(B, L, device=dev), torch.zeros(B, L, device=dev)
    nfe = torch.zeros(B, dtype=torch.long, device=dev)
    block_of = torch.arange(L, device=dev) // block
    # "steps": the quota depends only on how many of the block's tokens are already committed.
    quotas = step_quotas(block, cfg.steps // n_blocks) if cfg.decoding == "steps" else []
    quota_by_done = torch.zeros(block + 1, dtype=torch.long, device=dev)
    for s, k in enumerate(quotas):
        quota_by_done[sum(quotas[:s])] = k
    gamma = torch.as_tensor(cfg.eb_gamma if eb_gamma is None else eb_gamma, device=dev).reshape(-1, 1).expand(B, 1)
    cache = _Cache(model, x, attention, cfg.cache, P, block) if cached else None

    step = 0
    while (masked := unmask_step < 0).any():
        if on_step is not None:
            on_step(step, x.clone())
        current = torch.where(masked, block_of, n_blocks).min(dim=1).values  # [B]; n_blocks for finished rows
        if cached:  # one block at a time for the whole batch: the cache holds one block's context
            current = torch.where(current == n_blocks, n_blocks, current.min())
        eligible = masked & (block_of[None, :] == current[:, None])
        rows = eligible.any(1).nonzero().squeeze(1)  # only rows with something to commit are run
        # each row's eligible positions in order, padded to the longest row with its first one
        n_eligible = eligible[rows].sum(1)
        order = eligible[rows].byte().argsort(dim=1, descending=True, stable=True)[:, :int(n_eligible.max())]
        valid = torch.arange(order.shape[1], device=dev) < n_eligible[:, None]
        pos = torch.where(valid, order, order[:, :1])  # [A, k]
        if cached:
            logits = cache.logits(rows, pos, int(current[rows[0]]) * block)
        else:  # only the eligible positions go through the last layer and the head
            logits = token_logits(model, x[rows], attention[rows], positions=P + pos)  # [A, k, V]
        # Random draws keep their full shapes, so a seed gives the same samples whatever rows are run.
        if cfg.temperature > 0:
            u = torch.rand((B, L, logits.shape[-1]), generator=generator, device=dev)[rows[:, None], pos]
            candidate = (logits / cfg.temperature - torch.log(-torch.log(u.clamp_(min=1e-20)))).argmax(-1)
        else:
            candidate = logits.argmax(-1)
        log_q = log_policy(logits, cfg.temperature)
        token_logp = log_q.gather(-1, candidate[..., None]).squeeze(-1)
        token_entropy = torch.special.entr(log_q.exp()).sum(-1)
        confidence = torch.softmax(logits, dim=-1).gather(-1, candidate[..., None]).squeeze(-1)

        if cfg.decoding == "steps":
            noise = torch.rand(B, L, generator=generator, device=dev)  # drawn every step (the seed's stream)
            score = {"low_confidence": confidence, "entropy": -token_entropy,
                     "random": noise[rows[:, None], pos]}[cfg.remasking]
            count = quota_by_done[block - n_eligible]
        elif cfg.decoding == "threshold":
            score = confidence
            count = ((confidence >= cfg.threshold) & valid).sum(1).clamp(min=1)
        else:  # eb: sorted ascending by entropy, keep k while the entropies before the k-th sum to <= gamma
            score = -token_entropy
            sorted_h = torch.where(valid, token_entropy, torch.inf).sort(dim=1, stable=True).values
            before = torch.cumsum(sorted_h, dim=1) - sorted_h
            count = ((before <= gamma[rows]) & torch.isfinite(sorted_h)).sum(1).clamp(min=1)
        rank = _rank(torch.where(valid, score, -torch.inf))  # ties: the earlier position first
        at = (valid & (rank < count[:, None])).nonzero(as_tuple=True)
        row, col = rows[at[0]], pos[at]
        x[row, P + col] = candidate[at]
        unmask_step[row, col] = nfe[row]  # the row's own step count: each row's steps are 0..nfe-1
        logp[row, col], entropy[row, col] = token_logp[at], token_entropy[at]
        nfe[rows] += 1
        step += 1
    return Trajectory(x[:, P:], unmask_step, logp, entropy, nfe, step)


def _check_cache_support(model, cfg: SamplerConfig) -> None:
    if "canvas_cache" not in inspect.signature(model.forward).parameters:
        raise ValueError(
            f"sampler.cache={cfg.cache!r} needs a model whose forward accepts `canvas_cache` (the embedded tiny "
            f"model, harness/tiny.py, does); {type(model).__name__} does not. Use sampler.cache='none' "
            f"(--sampler.cache none), which works with every model")


class _Cache:
    """Fast-dLLM's block-wise K/V cache (approximate for bidirectional models).

    The first step of a block encodes the whole canvas and keeps every position's keys and values; the
    other steps of the block encode only the block ("dual": the masked suffix keeps its block-start K/V)
    or the block and everything after it ("prefix"), attending over the cached rest. Rows leave the
    cache when they finish the block and return at the next block's full pass.
    """

    def __init__(self, model, x, attention, mode: str, prompt_length: int, block_length: int):
        self.model, self.x, self.attention, self.mode = model, x, attention, mode
        self.P, self.block_length = prompt_length, block_length
        self.shift = int(is_shifted(model.config))
        self.kv, self.rows, self.block = None, None, None

    def logits(self, rows: torch.Tensor, pos: torch.Tensor, block_start: int) -> torch.Tensor:
        """Logits [A, k, V] at completion positions `pos` [A, k] of `rows`, all in the block at `block_start`."""
        P, x, attention = self.P, self.x, self.attention
        if self.block != block_start:  # a new block: one full pass fills the cache
            self.block, self.rows, self.kv = block_start, rows, []
            return token_logits(self.model, x[rows], attention[rows], positions=P + pos, canvas_cache=self.kv)
        if len(rows) < len(self.rows):  # rows that finished the block leave the cache
            keep = torch.isin(self.rows, rows)
            self.kv, self.rows = [[t[keep] for t in layer] for layer in self.kv], rows
        first = max(P + block_start - self.shift, 0)  # a shifted model reads token j from position j - 1
        last = P + block_start + self.block_length if self.mode == "dual" else x.shape[1]
        return token_logits(self.model, x[rows, first:last], attention[rows], positions=P + pos - first,
                            canvas_cache=self.kv, cache_offset=first)


def _rank(score: torch.Tensor) -> torch.Tensor:
    """Rank of each entry within its row, 0 = highest score; ties broken by position (stable)."""
    order = score.argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(score.shape[1], device=score.device).expand_as(order))
    return rank
