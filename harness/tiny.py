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

    def forward(self, x, cos, sin, key_mask):
        b, s, d = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).view(b, s, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        # Bidirectional: no causal mask, only padded keys are hidden.
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)
        x = x + self.out(a.transpose(1, 2).reshape(b, s, d))
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

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs) -> MaskedLMOutput:
        """Logits for every position. `attention_mask` (1 = real token) hides left padding from attention
        and makes positions count from the first real token, so padding never changes a row's output."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        angles = positions[:, None, :, None].float() * self.inv_freq  # [B, 1, S, D/2]
        cos, sin = angles.cos().repeat(1, 1, 1, 2), angles.sin().repeat(1, 1, 1, 2)
        key_mask = attention_mask.bool()[:, None, None, :]
        x = self.embed(input_ids)
        for block in self.blocks:
            x = block(x, cos, sin, key_mask)
        logits = self.lm_head(self.norm(x))
        if self.config.shift_logits:  # Dream convention: position j-1 carries the prediction for token j
            logits = torch.cat([logits[:, 1:], logits[:, -1:]], dim=1)
        return MaskedLMOutput(logits=logits)


# exist_ok: the copy of this file loaded as remote code registers the same names again.
AutoConfig.register(TinyMDLMConfig.model_type, TinyMDLMConfig, exist_ok=True)
AutoModel.register(TinyMDLMConfig, TinyMDLM, exist_ok=True)
TinyMDLMConfig.register_for_auto_class()
TinyMDLM.register_for_auto_class("AutoModel")
