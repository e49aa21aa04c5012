"""A tiny LLaDA-style config: LLaDA's field names (d_model, n_heads, n_layers, mlp_hidden_size, max_sequence_length,
weight_tying, mask_token_id), model_type "llada"."""

from transformers import PretrainedConfig


class LLaDAConfig(PretrainedConfig):
    model_type = "llada"
    attribute_map = {"hidden_size": "d_model", "num_attention_heads": "n_heads", "num_hidden_layers": "n_layers",
                     "max_position_embeddings": "max_sequence_length"}

    def __init__(self, d_model=32, n_heads=2, n_layers=2, mlp_hidden_size=64, vocab_size=320, max_sequence_length=512,
                 rope_theta=10000.0, rms_norm_eps=1e-5, weight_tying=False, mask_token_id=None, use_cache=False,
                 **kwargs):
        self.d_model, self.n_heads, self.n_layers = d_model, n_heads, n_layers
        self.mlp_hidden_size, self.vocab_size, self.max_sequence_length = mlp_hidden_size, vocab_size, max_sequence_length
        self.rope_theta, self.rms_norm_eps, self.weight_tying = rope_theta, rms_norm_eps, weight_tying
        self.mask_token_id, self.use_cache = mask_token_id, use_cache
        super().__init__(**kwargs)
