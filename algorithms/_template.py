"""<Method name>: one line on what it optimises.  (Copy this file to algorithms/<name>.py and edit.)

Paper: <authors>, "<title>", arXiv <id>.
Reference: <owner/repo>@<commit>, <files and functions the objective comes from>.

Implementation details:
1. <each choice, with the place in the reference code or paper it comes from>

Deviations:
- <what this implementation does differently from the reference, and why; "none" if none>

The harness (harness/train.py) owns everything that decides comparability: prompts, the sampler, rewards,
data order, optimizer, evaluation. A method owns only what is below. It is discovered by file name, which is
also its --algo value and results path component; the generic tests in tests/test_algorithms.py run it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from harness.likelihood import mean_field_logp
from harness.rollout import Batch, group_centered


@dataclass(frozen=True)
class Config:
    num_iterations: int = 1
    """mu, optimizer steps per rollout batch (omit the field for 1)"""


@torch.no_grad()
def prepare(policy, ref, batch: Batch, cfg: Config) -> Batch:
    """Optional. Once per rollout, no grad: store advantages and frozen log-probs in batch.extra.

    Tensors in batch.extra must have the batch as first dimension: the harness slices them into micro-batches.
    """
    batch.extra["advantages"] = group_centered(batch.rewards, batch.group)
    batch.extra["token_norm"] = batch.completion_mask.sum().float().expand(len(batch))
    return batch


def loss(policy, ref, batch: Batch, cfg: Config) -> tuple[torch.Tensor, dict[str, float]]:
    """Required. This micro-batch's share of the batch loss (the harness sums micro-batches), and metrics.

    `ref` is the loop's reference model (frozen, or updated by `after_step`): use it here, under torch.no_grad(),
    for what would be too large to store in `prepare` (e.g. full-vocabulary logits; see algorithms/lfpo.py).
    """
    seeds = torch.arange(len(batch))  # a toy estimator: REINFORCE on the mean-field log-probs
    logp = mean_field_logp(policy, batch.prompt_ids, batch.prompt_mask, batch.completion, seeds, p_mask=0.0)
    mask = batch.completion_mask.float()
    loss = -(batch.extra["advantages"][:, None] * logp * mask).sum() / batch.extra["token_norm"][0]
    return loss, {}
