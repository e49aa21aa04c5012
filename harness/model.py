"""The model interface every other module uses: load, mask id, per-position logits.

Two families exist. LLaDA-style models return, at position j, the prediction for token j. Dream-style
models (initialised from an autoregressive LM) return it at position j-1; `token_logits` undoes that shift
here and nowhere else, so samplers and estimators index positions the same way for both.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import torch
from transformers import AutoModel, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

import harness.tiny  # noqa: F401  (registers the tiny model with the Auto classes)

# Mask ids of the published families whose configs do not carry one (LLaDA modeling code; Dream tokenizer).
KNOWN_MASK_IDS = {"llada": 126336, "dream": 151666}
SHIFTED_FAMILIES = {"dream"}


def load(name_or_path: str | Path, dtype: torch.dtype | None = None, trust_remote_code: bool = True):
    """Load (model, tokenizer) from a local folder or a hub id, with `model.config.mask_token_id` set.

    LLaDA and Dream ship their modeling code next to the weights (`auto_map`), hence trust_remote_code.
    """
    name = str(name_or_path)
    if (Path(name).is_absolute() or name.startswith((".", "results"))) and not Path(name).is_dir():
        raise FileNotFoundError(
            f"model folder {name!r} does not exist; build the tiny base with `python -m harness pretrain` "
            "or pass a folder written by save_pretrained"
        )
    tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    model = AutoModel.from_pretrained(name, trust_remote_code=trust_remote_code, dtype=dtype or torch.float32)
    model.config.mask_token_id = mask_token_id(model.config, tokenizer, where=name)
    return model.eval(), tokenizer


def mask_token_id(config, tokenizer: PreTrainedTokenizerBase, where: str = "the model") -> int:
    """The [MASK] id: from the config, else the tokenizer, else the family's known id; a clear error if none."""
    for candidate in (getattr(config, "mask_token_id", None), tokenizer.mask_token_id,
                      KNOWN_MASK_IDS.get(config.model_type.lower())):
        if candidate is not None:
            return int(candidate)
    raise ValueError(
        f"{where} has no mask token: set `mask_token_id` in its config.json or a `mask_token` in its tokenizer "
        "(a masked diffusion LM cannot be sampled without one)"
    )


def is_shifted(config) -> bool:
    """True for Dream-style models whose output at j-1 predicts token j."""
    return config.model_type.lower() in SHIFTED_FAMILIES or bool(getattr(config, "shift_logits", False))


def token_logits(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 start: int = 0, end: int | None = None, positions: torch.Tensor | None = None,
                 **model_kwargs) -> torch.Tensor:
    """fp32 logits [B, end - start, V] where row j predicts token `start + j`, for either family; with
    `positions` ([k] or [B, k] per row), the logits [B, k, V] of those tokens instead.

    Only the positions asked for go through the LM head when the model accepts transformers'
    `logits_to_keep` (the tiny model does). `model_kwargs` go to the forward (e.g. the sampler's K/V
    cache). The mask token is given probability zero: every sampler and estimator scores real tokens only.
    """
    if positions is None:
        end = input_ids.shape[1] if end is None else end
        positions = torch.arange(start, end, device=input_ids.device)
    if positions.dim() == 2:  # per row: the union once, then each row's own
        union, index = positions.unique(return_inverse=True)
        logits = token_logits(model, input_ids, attention_mask, positions=union, **model_kwargs)
        return logits.gather(1, index[..., None].expand(-1, -1, logits.shape[-1]))
    keep = (positions - int(is_shifted(model.config))).clamp(min=0)  # the output carrying each token (Dream: j - 1)
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep, **model_kwargs).logits
    else:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, **model_kwargs).logits[:, keep]
    logits = logits.float()
    mask_id = model.config.mask_token_id
    return logits.index_fill(-1, torch.tensor([mask_id], device=logits.device), float("-inf"))


def log_policy(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Log of the sampling distribution softmax(logits / temperature); plain softmax at temperature 0 (greedy).

    The sampler records log-probs and entropies under it, and trajectory estimators replay it.
    """
    return torch.log_softmax(logits / temperature if temperature > 0 else logits, dim=-1)
