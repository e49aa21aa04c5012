"""A tiny LLaDA-style masked diffusion LM with LLaDA's interface (not its code):

* `LLaDAModelLM(PreTrainedModel)` holding `model.transformer` = {wte, blocks, ln_f, ff_out}; each block has LLaDA's
  module names q_proj, k_proj, v_proj, attn_out (attention), ff_proj, up_proj, ff_out (SwiGLU), so LoRA target
  lists written for LLaDA (AGRPO's train.yaml) match;
* `forward(input_ids, inputs_embeds=None, attention_mask=None, attention_bias=None, ...)` -> an output with `.logits`
  [B, S, V] where position j predicts token j; a [B, S] attention mask becomes an additive bias on the keys and
  positions are absolute (RoPE over 0..S-1), as LLaDA's;
* no transformers gradient checkpointing (`supports_gradient_checkpointing` is unset, as in LLaDA); instead
  `model.set_activation_checkpointing(strategy)`, LLaDA's own switch.
"""

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_llada import LLaDAConfig


def _rms(x, weight, eps):
    return weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def _rope(x, positions, theta):
    half = x.shape[-1] // 2
    freqs = positions[:, None].float() / theta ** (torch.arange(half, device=x.device).float() / half)
    cos, sin = freqs.cos().repeat(1, 2).to(x.dtype), freqs.sin().repeat(1, 2).to(x.dtype)  # computed in fp32, as LLaDA
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), -1) * sin


class LLaDALlamaBlock(nn.Module):
    def __init__(self, config):
        super().__init__()
        d = config.d_model
        self.config = config
        self.attn_norm, self.ff_norm = nn.Parameter(torch.ones(d)), nn.Parameter(torch.ones(d))
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(d, d, bias=False) for _ in range(3))
        self.attn_out = nn.Linear(d, d, bias=False)
        self.ff_proj = nn.Linear(d, config.mlp_hidden_size, bias=False)
        self.up_proj = nn.Linear(d, config.mlp_hidden_size, bias=False)
        self.ff_out = nn.Linear(config.mlp_hidden_size, d, bias=False)

    def forward(self, x, bias):
        b, s, d = x.shape
        h, eps = self.config.n_heads, self.config.rms_norm_eps
        y = _rms(x, self.attn_norm, eps)
        q, k, v = (p(y).view(b, s, h, d // h).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        positions = torch.arange(s, device=x.device)
        q, k = _rope(q, positions, self.config.rope_theta), _rope(k, positions, self.config.rope_theta)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # bidirectional
        x = x + self.attn_out(a.transpose(1, 2).reshape(b, s, d))
        y = _rms(x, self.ff_norm, eps)
        return x + self.ff_out(F.silu(self.ff_proj(y)) * self.up_proj(y))


class LLaDAModel(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(config.vocab_size, config.d_model),
            "blocks": nn.ModuleList(LLaDALlamaBlock(config) for _ in range(config.n_layers)),
            "ln_f": nn.LayerNorm(config.d_model, bias=False),
            "ff_out": nn.Linear(config.d_model, config.vocab_size, bias=False),
        })
        self._checkpointing = None

    def set_activation_checkpointing(self, strategy):
        if strategy not in (None, "whole_layer"):
            raise ValueError(f"this tiny LLaDA implements only 'whole_layer', not {strategy!r}")
        self._checkpointing = strategy

    def forward(self, input_ids, attention_mask=None):
        x = self.transformer.wte(input_ids)
        bias = None
        if attention_mask is not None and (attention_mask == 0).any():
            bias = (1.0 - attention_mask.to(x.dtype))[:, None, None, :] * torch.finfo(x.dtype).min
        for block in self.transformer.blocks:
            if self._checkpointing and self.training:
                x = checkpoint(block, x, bias, use_reentrant=False)
            else:
                x = block(x, bias)
        return self.transformer.ff_out(self.transformer.ln_f(x))


class LLaDAModelLM(PreTrainedModel):
    config_class = LLaDAConfig
    base_model_prefix = "model"
    _no_split_modules = ["LLaDALlamaBlock"]

    def __init__(self, config):
        super().__init__(config)
        self.model = LLaDAModel(config)
        self.post_init()

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)

    def get_output_embeddings(self):
        return self.model.transformer.ff_out

    def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None, attention_bias=None,
                past_key_values=None, labels=None, use_cache=None, output_attentions=None, output_hidden_states=None,
                return_dict=None, **kwargs):
        if attention_bias is not None or past_key_values is not None or inputs_embeds is not None:
            raise ValueError("the tiny LLaDA takes input_ids and attention_mask only")
        return CausalLMOutputWithPast(logits=self.model(input_ids, attention_mask))
