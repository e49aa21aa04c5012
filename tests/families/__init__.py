"""Tiny random models with the interfaces of the published families, saved with `auto_map` and loaded with
`trust_remote_code=True` in tests exactly as LLaDA-8B-Instruct and Dream-v0-Instruct-7B are: nothing here is
imported by the harness. Written from the public modeling code's interface (NVlabs/Fast-dLLM@24cc59e
llada/model/{configuration,modeling}_llada.py, dream/model/{configuration,modeling}_dream.py), not copied.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

# The turn markers of each family's chat template (LLaDA-8B-Instruct: Llama-3 style headers; Dream-v0-Instruct:
# Qwen2's im_start / im_end with its default system turn). What matters to the harness is that the model's own
# template is applied, whatever it is.
TEMPLATES = {
    "llada": ("<|startoftext|>", ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
              "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
              "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
              "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"),
    "dream": (None, ["<|im_start|>", "<|im_end|>"],
              "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
              "{% endif %}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
              "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"),
}


def save_family(family: str, tokenizer, folder: Path, seed: int = 0, **sizes) -> Path:
    """A random tiny `family` ("llada" or "dream") model and its tokenizer (the test tokenizer with the family's chat
    template and special tokens) saved to `folder` with `auto_map`: `AutoModel.from_pretrained(folder,
    trust_remote_code=True)` then imports the copied modeling files, as for the published checkpoints. `sizes`: config
    fields that override the tiny defaults (a 4-bit base needs layer widths that are multiples of 64)."""
    from tests.families.configuration_dream import DreamConfig
    from tests.families.configuration_llada import LLaDAConfig
    from tests.families.modeling_dream import DreamModel
    from tests.families.modeling_llada import LLaDAModelLM

    bos, specials, template = TEMPLATES[family]
    tok = copy.deepcopy(tokenizer)
    tok.add_special_tokens({**({"bos_token": bos} if bos else {}), "additional_special_tokens": specials})
    tok.chat_template = template
    ids = {"mask_token_id": tok.mask_token_id, "pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id}
    torch.manual_seed(seed)
    if family == "llada":
        config_class, model_class = LLaDAConfig, LLaDAModelLM
        model = LLaDAModelLM(LLaDAConfig(vocab_size=len(tok), **ids, **sizes))
    else:
        config_class, model_class = DreamConfig, DreamModel
        model = DreamModel(DreamConfig(vocab_size=len(tok), **ids, **sizes))
    with torch.no_grad():  # random logits far from uniform, as tests/conftest.py's tiny model
        model.get_output_embeddings().weight.mul_(20)
    config_class.register_for_auto_class()
    model_class.register_for_auto_class("AutoModel")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return Path(folder)
