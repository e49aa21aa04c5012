"""The rollout record and the one path from prompts to rewarded samples (training; evaluation is lm-eval's,
through `harness.evaluate`, on the same sampler and rewards).

A `Batch` holds G completions per prompt, contiguous, with the sampler's trajectory record. Full
intermediate states are never stored: `state_at` rebuilds any of them from (tokens, unmask step).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import torch

from harness.sampler import SamplerConfig, Trajectory, generate


@dataclass
class Batch:
    """One rollout batch; every tensor field (and every tensor in `extra`) has the batch first.

    | field           | shape, dtype | meaning                                                          |
    |-----------------|--------------|------------------------------------------------------------------|
    | prompt_ids      | [B, P] long  | chat-templated prompts, left-padded with the pad id              |
    | prompt_mask     | [B, P] bool  | True on real prompt tokens                                       |
    | completion      | [B, L] long  | sampled completions (the whole canvas, EOS-filled tail included) |
    | unmask_step     | [B, L] long  | step at which each completion position was committed             |
    | logp            | [B, L] float | behaviour log-prob of each committed token (sampler record)      |
    | entropy         | [B, L] float | entropy of the sampling distribution when it was committed       |
    | nfe             | [B] long     | forward passes the row needed (T_i)                              |
    | completion_mask | [B, L] bool  | positions up to and including the first EOS (all if none)        |
    | rewards         | [B] float    | task reward of each completion                                   |
    | group           | [B] long     | index of the prompt a row belongs to (G contiguous rows each)    |
    | temperature     | float        | sampler temperature the rollout was drawn at (0 = greedy)        |
    | extra           | dict         | what `prepare` computes: advantages, old/ref log-probs, seeds    |
    | seed            | int          | a fresh seed per rollout batch for the method's own randomness   |
    | iteration       | int          | inner iteration (0..mu-1) the loop is in when calling `loss`     |
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    completion: torch.Tensor
    unmask_step: torch.Tensor
    logp: torch.Tensor
    entropy: torch.Tensor
    nfe: torch.Tensor
    completion_mask: torch.Tensor
    rewards: torch.Tensor
    group: torch.Tensor
    temperature: float
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    seed: int = 0
    iteration: int = 0

    def __len__(self) -> int:
        return self.completion.shape[0]

    def select(self, index: torch.Tensor | slice) -> Batch:
        """The rows `index` of every tensor, `extra` included."""
        tensors = {f.name: getattr(self, f.name)[index] for f in fields(self)
                   if isinstance(getattr(self, f.name), torch.Tensor)}
        return replace(self, **tensors, extra={k: v[index] for k, v in self.extra.items()})

    def micro_batches(self, size: int) -> list[Batch]:
        return [self.select(slice(i, i + size)) for i in range(0, len(self), size)]

    @staticmethod
    def cat(parts: list[Batch]) -> Batch:
        """The rows of `parts` in order (their scalars are the first part's)."""
        tensors = {f.name: torch.cat([getattr(b, f.name) for b in parts]) for f in fields(Batch)
                   if isinstance(getattr(parts[0], f.name), torch.Tensor)}
        extra = {k: torch.cat([b.extra[k] for b in parts]) for k in parts[0].extra}
        return replace(parts[0], **tensors, extra=extra)

    def gather(self, accelerator) -> Batch:
        """Every process's rows, in process order, on every process (`accelerate launch`; a no-op on one)."""
        if accelerator.num_processes == 1:
            return self

        def everyone(t: torch.Tensor) -> torch.Tensor:
            return accelerator.gather(t.to(torch.uint8)).bool() if t.dtype == torch.bool else accelerator.gather(t)

        tensors = {f.name: everyone(getattr(self, f.name)) for f in fields(self)
                   if isinstance(getattr(self, f.name), torch.Tensor)}
        return replace(self, **tensors, extra={k: everyone(v) for k, v in self.extra.items()})

    def input_ids(self, completion: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(prompt + completion ids, attention mask) for a forward pass; `completion` defaults to the final one."""
        completion = self.completion if completion is None else completion
        attention = torch.cat([self.prompt_mask.long(), torch.ones_like(completion)], dim=1)
        return torch.cat([self.prompt_ids, completion], dim=1), attention


def group_centered(rewards: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """A_i = r_i - mean of r over i's group (no division by the std: Dr. GRPO, as d1 and AGRPO do)."""
    sums = torch.zeros(int(group.max()) + 1, device=rewards.device).index_add_(0, group, rewards)
    sizes = torch.bincount(group).to(rewards.dtype)
    return rewards - (sums / sizes)[group]


def state_at(completion: torch.Tensor, unmask_step: torch.Tensor, t: int | torch.Tensor, mask_id: int) -> torch.Tensor:
    """The completion canvas just before step t (int, or one step per row): positions with step >= t masked."""
    t = torch.as_tensor(t, device=completion.device).reshape(-1, 1)
    return torch.where(unmask_step >= t, torch.full_like(completion, mask_id), completion)


def completion_mask(completion: torch.Tensor, eos_id: int) -> torch.Tensor:
    """True up to and including the first EOS of each row; all True if a row has none (d1 §1.2)."""
    is_eos = completion == eos_id
    return (is_eos.long().cumsum(1) - is_eos.long()) == 0


def left_pad(rows: list[list[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id rows left-padded with `pad_id`: (ids [B, P], mask [B, P] bool, True on real tokens)."""
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row):] = True
    return ids.to(device), mask.to(device)


def encode_prompts(tokenizer, texts: list[str], device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply the chat template to each user turn and left-pad: (ids [B, P], mask [B, P] bool)."""
    rows = [tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True,
                                          tokenize=True, return_dict=False) for t in texts]
    return left_pad(rows, tokenizer.pad_token_id, device)


def decode(tokenizer, completion: torch.Tensor) -> list[str]:
    """Completion text up to the first EOS, special tokens skipped (what rewards and metrics see)."""
    keep = completion_mask(completion, tokenizer.eos_token_id) & (completion != tokenizer.eos_token_id)
    return [tokenizer.decode(row[m].tolist(), skip_special_tokens=True) for row, m in zip(completion, keep)]


def rollout(model, tokenizer, task, examples: list[dict], cfg: SamplerConfig, group_size: int,
            generator: torch.Generator | None = None, sample=None, rows: slice = slice(None)) -> tuple[Batch, list[str]]:
    """Sample `group_size` completions per example and reward them with the task's reward.

    `sample(model, prompt_ids, prompt_mask, cfg, generator) -> Trajectory` replaces the shared sampler only
    for a method that declares a training-time decoding override; the shared evaluation never passes one.
    `rows` samples only those rows of the len(examples) x group_size: prompts keep the width of the whole batch
    and `group` its prompt indices, so the parts of a batch sampled apart (chunks, processes) concatenate to it.
    """
    repeated = [e for e in examples for _ in range(group_size)]
    prompt_ids, prompt_mask = encode_prompts(tokenizer, [task.prompt(e) for e in repeated], model.device)
    repeated, prompt_ids, prompt_mask = repeated[rows], prompt_ids[rows], prompt_mask[rows]
    traj: Trajectory = (sample or generate)(model, prompt_ids, prompt_mask, cfg, generator)
    texts = decode(tokenizer, traj.completion)
    rewards = torch.tensor([task.reward(t, e) for t, e in zip(texts, repeated)], dtype=torch.float32)
    batch = Batch(
        prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion=traj.completion,
        unmask_step=traj.unmask_step, logp=traj.logp, entropy=traj.entropy, nfe=traj.nfe,
        completion_mask=completion_mask(traj.completion, tokenizer.eos_token_id),
        rewards=rewards.to(prompt_ids.device),
        group=torch.arange(len(examples), device=prompt_ids.device).repeat_interleave(group_size)[rows],
        temperature=cfg.temperature,
        extra=dict(traj.extra),
    )
    return batch, texts
