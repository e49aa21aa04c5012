"""LLaDA's published sampler, re-implemented as the yardstick of `python -m harness.bench`; never used to train.

Source: ML-GSAI/LLaDA@b7e6c35, generate.py (`generate`, `get_num_transfer_tokens`, `add_gumbel_noise`),
read and re-written, not copied. What it does, per step:
1. one forward pass over the whole canvas: the prompt and every completion block, the masked future
   blocks included;
2. candidates: argmax of the logits, after float64 Gumbel noise on the full [B, S, V] tensor when the
   temperature is > 0 (exp(logits) / (-log u)^T, the form LLaDA uses);
3. confidence (low_confidence remasking): the softmax over the full vocabulary at every position,
   gathered at the candidate; -inf beyond the current block and on committed positions;
4. per row, in a Python loop, the k most confident positions are committed, k from the linear schedule
   of the row's masks in the block (`get_num_transfer_tokens`).

Deviations (so that the comparison with `harness.sampler` measures computation, not conventions):
- Logits come from `harness.model.token_logits` (the Dream shift undone; the mask token gets probability
  zero), as in every harness sampler. The canvas positions are still all computed.
- Ties in confidence are broken by position, lowest first, with a stable sort per row: `torch.topk`
  leaves their order unspecified (on CPU it does not pick the lowest position), and at temperature 0
  saturated confidences (exactly 1.0 in fp32) do tie.
- Classifier-free guidance and the EOS/EoT logit switches are left out (cfg_scale = 0 in d1 and here).
"""

from __future__ import annotations

import torch

from harness.model import token_logits


def transfer_counts(block_masks: torch.Tensor, steps: int) -> torch.Tensor:
    """[B, steps]: the masks of each row's block spread evenly over the steps, the remainder first."""
    n = block_masks.sum(dim=1, keepdim=True)
    counts = (n // steps).expand(-1, steps).clone()
    for i in range(len(counts)):
        counts[i, : int(n[i] % steps)] += 1
    return counts


@torch.no_grad()
def generate(model, prompt: torch.Tensor, attention_mask: torch.Tensor | None = None, steps: int = 128,
             gen_length: int = 128, block_length: int = 128, temperature: float = 0.0,
             remasking: str = "low_confidence", mask_id: int | None = None,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """The canvas [B, P + gen_length] (prompt followed by the completion) for left-padded prompts [B, P]."""
    mask_id = model.config.mask_token_id if mask_id is None else mask_id
    B, P = prompt.shape
    x = torch.full((B, P + gen_length), mask_id, dtype=torch.long, device=prompt.device)
    x[:, :P] = prompt
    if attention_mask is not None:
        attention_mask = torch.cat([attention_mask.long(), torch.ones(B, gen_length, dtype=torch.long,
                                                                      device=prompt.device)], dim=1)
    assert gen_length % block_length == 0 and steps % (gen_length // block_length) == 0
    n_blocks = gen_length // block_length
    steps //= n_blocks
    for b in range(n_blocks):
        block_end = P + (b + 1) * block_length
        counts = transfer_counts(x[:, P + b * block_length:block_end] == mask_id, steps)
        for i in range(steps):
            masked = x == mask_id
            logits = token_logits(model, x, attention_mask)  # [B, S, V], every canvas position
            if temperature > 0:
                noisy = logits.double()
                u = torch.rand(noisy.shape, dtype=torch.float64, generator=generator, device=x.device)
                noisy = noisy.exp() / (-torch.log(u)) ** temperature
            else:
                noisy = logits
            x0 = noisy.argmax(dim=-1)
            if remasking == "low_confidence":
                p = torch.softmax(logits, dim=-1)
                x0_p = p.gather(-1, x0[..., None]).squeeze(-1)
            elif remasking == "random":
                x0_p = torch.rand(x0.shape, generator=generator, device=x.device)
            else:
                raise ValueError(f"remasking={remasking!r}; LLaDA's sampler knows low_confidence and random")
            x0_p[:, block_end:] = -torch.inf
            x0 = torch.where(masked, x0, x)
            confidence = torch.where(masked, x0_p, -torch.inf)
            commit = torch.zeros_like(masked)
            for j in range(B):
                order = torch.argsort(confidence[j], descending=True, stable=True)
                commit[j, order[: int(counts[j, i])]] = True
            x[commit] = x0[commit]
    return x
