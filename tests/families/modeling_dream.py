"""A tiny Dream-style masked diffusion LM with Dream's interface (not its code):

* `DreamModel(PreTrainedModel)` = `model` (embed_tokens, layers with self_attn {q,k,v (with bias), o}_proj,
  grouped key/value heads, mlp {gate,up,down}_proj, norms) + `lm_head`: Qwen2's module names;
* `forward(input_ids, attention_mask=None, position_ids=None, ..., num_logits_to_keep=0)` -> `.logits` where the
  output at position j-1 predicts token j (Dream keeps its autoregressive initialisation's convention); the
  attention mask is used as given, a boolean [B, 1, S, S] mask (None or "full" without padding), and positions
  come from `position_ids` (0..S-1 if None): Dream's generation utilities build both from a padded [B, S] mask;
* transformers' gradient checkpointing (`supports_gradient_checkpointing = True`).
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import MaskedLMOutput

from .configuration_dream import DreamConfig


def _rms(x, weight, eps):
    return weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


class DreamDecoderLayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        d, self.config = config.hidden_size, config
        kv = d // config.num_attention_heads * config.num_key_value_heads
        self.self_attn = nn.ModuleDict({"q_proj": nn.Linear(d, d), "k_proj": nn.Linear(d, kv), "v_proj": nn.Linear(d, kv),
                                        "o_proj": nn.Linear(d, d, bias=False)})
        self.mlp = nn.ModuleDict({"gate_proj": nn.Linear(d, config.intermediate_size, bias=False),
                                  "up_proj": nn.Linear(d, config.intermediate_size, bias=False),
                                  "down_proj": nn.Linear(config.intermediate_size, d, bias=False)})
        self.input_layernorm = nn.Parameter(torch.ones(d))
        self.post_attention_layernorm = nn.Parameter(torch.ones(d))

    def forward(self, x, mask, cos, sin):
        b, s, d = x.shape
        c, att = self.config, self.self_attn
        h, hk = c.num_attention_heads, c.num_key_value_heads
        y = _rms(x, self.input_layernorm, c.rms_norm_eps)
        q = att["q_proj"](y).view(b, s, h, d // h).transpose(1, 2)
        k = att["k_proj"](y).view(b, s, hk, d // h).transpose(1, 2)
        v = att["v_proj"](y).view(b, s, hk, d // h).transpose(1, 2)
        rot = lambda t: t * cos + torch.cat((-t[..., t.shape[-1] // 2:], t[..., :t.shape[-1] // 2]), -1) * sin
        q, k = rot(q), rot(k).repeat_interleave(h // hk, 1)
        a = F.scaled_dot_product_attention(q, k, v.repeat_interleave(h // hk, 1), attn_mask=mask)  # not causal
        x = x + att["o_proj"](a.transpose(1, 2).reshape(b, s, d))
        y = _rms(x, self.post_attention_layernorm, c.rms_norm_eps)
        return x + self.mlp["down_proj"](F.silu(self.mlp["gate_proj"](y)) * self.mlp["up_proj"](y))


class DreamBaseModel(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DreamDecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = nn.Parameter(torch.ones(config.hidden_size))
        self.gradient_checkpointing = False

    def forward(self, input_ids, attention_mask, position_ids):
        x = self.embed_tokens(input_ids)
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=x.device).expand_as(input_ids)
        half = self.config.hidden_size // self.config.num_attention_heads // 2
        inv = 1.0 / self.config.rope_theta ** (torch.arange(half, device=x.device).float() / half)
        angles = position_ids[:, None, :, None].float() * inv
        cos, sin = angles.cos().repeat(1, 1, 1, 2).to(x.dtype), angles.sin().repeat(1, 1, 1, 2).to(x.dtype)
        mask = attention_mask if isinstance(attention_mask, torch.Tensor) else None
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                x = self._gradient_checkpointing_func(layer.__call__, x, mask, cos, sin)
            else:
                x = layer(x, mask, cos, sin)
        return _rms(x, self.norm, self.config.rms_norm_eps)


class DreamModel(PreTrainedModel):
    config_class = DreamConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["DreamDecoderLayer"]

    def __init__(self, config):
        super().__init__(config)
        self.model = DreamBaseModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None, inputs_embeds=None,
                labels=None, use_cache=None, output_attentions=None, output_hidden_states=None, return_dict=None,
                num_logits_to_keep=0, **kwargs):
        hidden = self.model(input_ids, attention_mask, position_ids)
        return MaskedLMOutput(logits=self.lm_head(hidden[:, -num_logits_to_keep:, :]))
