"""The embedded tiny masked-diffusion LM: a bidirectional transformer in the LLaDA style.

No causal mask, a [MASK] token, RMSNorm, rotary positions and SwiGLU feed-forward blocks, written as a
transformers `PretrainedConfig` + `PreTrainedModel` so that it is saved, reloaded and served exactly like
LLaDA-8B and Dream-7B: `AutoModel.from_pretrained(local_dir)` after importing this module (in-process
registration), or `AutoModel.from_pretrained(local_dir, trust_remote_code=True)` in a fresh process through
the `auto_map` that `save_pretrained` writes (this file is copied next to the weights).

This file must stay self-contained (torch + transformers only): it is the remote code of every tiny
checkpoint.

`shift_logits=True` makes the model Dream-like: the output at position j-1 carries the prediction for
token j (Dream is initialised from an autoregressive model and keeps that convention). The harness undoes
the shift in one place (`harness.model.token_logits`), so tests can exercise both families.

Two optional forward arguments serve the sampler (`harness.sampler`); without them the forward is the plain
full-sequence pass:
  logits_to_keep  1-D positions whose logits are returned (transformers' convention): the last layer's
                  queries, output projection and MLP and the LM head run on those positions only (every
                  position still supplies keys and values), e.g. the masked positions of the block being
                  decoded.
  canvas_cache    Fast-dLLM's block-wise K/V cache over a fixed-length canvas. An empty list: `input_ids` is
                  the whole canvas and the list is filled with one (key, value) pair [B, H, S, D] per layer.
                  A filled list: `input_ids` are canvas positions [cache_offset, cache_offset + q) and
                  `attention_mask` still covers the whole canvas; their fresh keys and values overwrite the
                  cached ones in place and the queries attend over the whole canvas. Keys and values of the
                  other positions are those of the pass that filled the cache, so for a bidirectional model
                  the result is an approximation (exact only if those positions did not change).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import MaskedLMOutput


class TinyMDLMConfig(PretrainedConfig):
    model_type = "tiny_mdlm"

    def __init__(
        self,
        vocab_size: int = 320,
        hidden_size: int = 128,
        num_hidden_layers: int = 4,
        num_attention_heads: int = 4,
        intermediate_size: int = 384,
        max_position_embeddings: int = 512,
        rope_theta: float = 10000.0,
        rms_norm_eps: float = 1e-6,
        initializer_range: float = 0.02,
        mask_token_id: int | None = None,
        shift_logits: bool = False,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.max_position_embeddings = max_position_embeddings
        self.rope_theta = rope_theta
        self.rms_norm_eps = rms_norm_eps
        self.initializer_range = initializer_range
        self.mask_token_id = mask_token_id
        self.shift_logits = shift_logits
        super().__init__(**kwargs)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding, rotate-half convention; x is [B, H, S, D], cos/sin are [B, 1, S, D]."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Block(nn.Module):
    def __init__(self, cfg: TinyMDLMConfig):
        super().__init__()
        d, self.n_heads = cfg.hidden_size, cfg.num_attention_heads
        self.attn_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.out = nn.Linear(d, d, bias=False)
        self.mlp_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.gate_up = nn.Linear(d, 2 * cfg.intermediate_size, bias=False)
        self.down = nn.Linear(cfg.intermediate_size, d, bias=False)

    def forward(self, x, cos, sin, key_mask, cache: list | None = None, offset: int = 0,
                keep: torch.Tensor | None = None):
        """`keep`: return only these positions; every position still supplies keys and values."""
        b, s, d = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).view(b, s, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        k = rotate(k, cos, sin)
        if keep is not None:
            x, q, cos, sin = x[:, keep], q[:, :, keep], cos[:, :, keep], sin[:, :, keep]
        q = rotate(q, cos, sin)
        if cache is not None:  # cache = [key, value] of the whole canvas: write this slice, attend over all of it
            if len(cache) == 0:
                cache.extend((k.contiguous(), v.contiguous()))
            else:
                cache[0][:, :, offset:offset + s] = k
                cache[1][:, :, offset:offset + s] = v
                k, v = cache
        # Bidirectional: no causal mask, only padded keys are hidden.
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)
        x = x + self.out(a.transpose(1, 2).reshape(b, q.shape[2], d))
        gate, up = self.gate_up(self.mlp_norm(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)


class TinyMDLM(PreTrainedModel):
    config_class = TinyMDLMConfig
    base_model_prefix = "tiny_mdlm"
    _no_split_modules = ["Block"]

    def __init__(self, config: TinyMDLMConfig):
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        head_dim = config.hidden_size // config.num_attention_heads
        inv_freq = 1.0 / config.rope_theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.post_init()

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.config.initializer_range)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)
        elif isinstance(module, TinyMDLM):
            head_dim = module.config.hidden_size // module.config.num_attention_heads
            freqs = torch.arange(0, head_dim, 2, device=module.inv_freq.device).float() / head_dim
            module.inv_freq.copy_(1.0 / module.config.rope_theta**freqs)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                logits_to_keep: torch.Tensor | None = None, canvas_cache: list | None = None, cache_offset: int = 0,
                **kwargs) -> MaskedLMOutput:
        """Logits for every position (or the `logits_to_keep` positions). `attention_mask` (1 = real token)
        hides left padding from attention and makes positions count from the first real token, so padding
        never changes a row's output. `canvas_cache` / `cache_offset`: see the module docstring."""
        if canvas_cache and attention_mask is None:
            raise ValueError("a filled canvas_cache needs the attention_mask of the whole canvas")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        if canvas_cache:
            positions = positions[:, cache_offset:cache_offset + input_ids.shape[1]]
        angles = positions[:, None, :, None].float() * self.inv_freq  # [B, 1, S, D/2]
        cos, sin = angles.cos().repeat(1, 1, 1, 2), angles.sin().repeat(1, 1, 1, 2)
        key_mask = attention_mask.bool()[:, None, None, :]
        if canvas_cache is not None and not canvas_cache:
            canvas_cache.extend([] for _ in self.blocks)
        if logits_to_keep is not None and self.config.shift_logits:  # the shift below, on the kept positions
            logits_to_keep = (logits_to_keep + 1).clamp(max=input_ids.shape[1] - 1)
        x = self.embed(input_ids)
        for i, block in enumerate(self.blocks):
            last = i == len(self.blocks) - 1  # its outputs feed only the head: computed where logits are kept
            x = block(x, cos, sin, key_mask, None if canvas_cache is None else canvas_cache[i], cache_offset,
                      logits_to_keep if last else None)
        logits = self.lm_head(self.norm(x))
        if self.config.shift_logits and logits_to_keep is None:
            # Dream convention: position j-1 carries the prediction for token j
            logits = torch.cat([logits[:, 1:], logits[:, -1:]], dim=1)
        return MaskedLMOutput(logits=logits)


# exist_ok: the copy of this file loaded as remote code registers the same names again.
AutoConfig.register(TinyMDLMConfig.model_type, TinyMDLMConfig, exist_ok=True)
AutoModel.register(TinyMDLMConfig, TinyMDLM, exist_ok=True)
TinyMDLMConfig.register_for_auto_class()
TinyMDLM.register_for_auto_class("AutoModel")
