"""The model interface every other module uses: load, mask id, per-position logits, LoRA and the reference.

Two families exist. LLaDA-style models return, at position j, the prediction for token j. Dream-style
models (initialised from an autoregressive LM) return it at position j-1; `token_logits` undoes that shift
here and nowhere else, so samplers and estimators index positions the same way for both. The families also
take padding differently: LLaDA (and the tiny model) a [B, S] attention mask, Dream a [B, 1, S, S] boolean
mask with position ids counted from the first real token (its `generation_utils.py`); `token_logits` builds
what each family takes.

Paper scale (`harness.train` with `lora_rank > 0`): the policy is the loaded model with a LoRA adapter
(`add_lora`, peft), and `reference` gives the loop's reference without a second copy of the weights: the same
model with its adapter disabled, or, for a method that updates its reference (LFPO's EMA "old" policy), the
same model run with a second adapter. A folder saved from such a run holds the adapter only; `load` finds its
base model through the adapter's config.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import torch
from accelerate.utils import extract_model_from_parallel
from transformers import AutoModel, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

import harness.tiny  # noqa: F401  (registers the tiny model with the Auto classes)

# Mask ids of the published families whose configs do not carry one (LLaDA modeling code; Dream tokenizer).
KNOWN_MASK_IDS = {"llada": 126336, "dream": 151666}
SHIFTED_FAMILIES = {"dream"}
MASK_4D_FAMILIES = {"dream"}  # attention as a [B, 1, S, S] boolean mask plus position ids (Dream generation_utils.py)
REFERENCE_ADAPTER = "reference"  # the second adapter of a method that updates its reference (LoRA runs)


def load(name_or_path: str | Path, dtype: torch.dtype | None = None, trust_remote_code: bool = True,
         load_in_4bit: bool = False, trainable_adapter: bool = False):
    """Load (model, tokenizer) from a local folder or a hub id, with `model.config.mask_token_id` set.

    LLaDA and Dream ship their modeling code next to the weights (`auto_map`), hence trust_remote_code. `dtype`
    None loads the weights in the dtype they were saved in. A folder
    holding a LoRA adapter (adapter_config.json: what a LoRA run saves) loads the adapter's base model and the
    adapter, merged into the weights (inference), or as a trainable adapter (`trainable_adapter`: resuming).
    `load_in_4bit`: the base weights in 4-bit NF4 with double quantisation and bf16 compute (QLoRA, as d1's
    diffu_grpo_train.py and DMPO load LLaDA), through bitsandbytes (on a GPU; on a CPU too, where the layers' widths
    are multiples of 64, for tests).
    """
    name = str(name_or_path)
    if (Path(name).is_absolute() or name.startswith((".", "results"))) and not Path(name).is_dir():
        raise FileNotFoundError(
            f"model folder {name!r} does not exist; build the tiny base with `python -m harness pretrain` "
            "or pass a folder written by save_pretrained"
        )
    adapter = Path(name) / "adapter_config.json"
    base = json.loads(adapter.read_text())["base_model_name_or_path"] if adapter.is_file() else name
    tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    options = {"dtype": dtype or "auto"}  # None: the checkpoint's own (LLaDA's and Dream's: bf16; the tiny model's: fp32)
    if load_in_4bit:
        options["quantization_config"] = _four_bit()
    model = AutoModel.from_pretrained(base, trust_remote_code=trust_remote_code, **options)
    for layer in model.modules() if load_in_4bit else ():
        # bitsandbytes (0.50 at least) repacks a 4-bit layer's weights for a CPU inference kernel the first
        # time the layer runs in eval mode, and never back: in later training forwards the base layers then have
        # no backward, and gradients through them are silently dropped. Keep the trainable layout.
        if hasattr(layer, "support_avx512bf16_for_cpu"):
            layer.support_avx512bf16_for_cpu = False
    model.config.mask_token_id = mask_token_id(model.config, tokenizer, where=name)
    if adapter.is_file():
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, name, is_trainable=trainable_adapter)
        if not trainable_adapter:
            model = model.merge_and_unload()
    return model.eval(), tokenizer


def _four_bit():
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        raise ImportError("load_in_4bit needs bitsandbytes: pip install -e '.[cluster]'") from e
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)


def add_lora(model: PreTrainedModel, rank: int, alpha: float, dropout: float, targets: str):
    """The model with a trainable LoRA adapter (peft) and every other weight frozen. `targets`: "all-linear" (every
    linear layer but the output head) or comma-separated module names. A 4-bit base is first prepared as peft
    prepares k-bit models (norms in fp32, input gradients for checkpointing)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if getattr(model, "is_loaded_in_4bit", False):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    names = targets if targets == "all-linear" else [t.strip() for t in targets.split(",") if t.strip()]
    return get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=names))


def enable_gradient_checkpointing(model) -> None:
    """Recompute each layer's activations in the backward pass: transformers' switch where the model supports it
    (Dream, the tiny model does not need it), LLaDA's own (`set_activation_checkpointing`, its modeling code)."""
    base = core(model)
    if getattr(base, "supports_gradient_checkpointing", False):  # transformers >= 5.25 renamed the switch
        enable = getattr(base, "activation_checkpointing_enable", None) or base.gradient_checkpointing_enable
        enable({"use_reentrant": False})
    elif hasattr(getattr(base, "model", None), "set_activation_checkpointing"):
        base.model.set_activation_checkpointing("whole_layer")
    else:
        raise ValueError(f"{type(base).__name__} supports neither transformers' gradient checkpointing nor LLaDA's "
                         "set_activation_checkpointing; run with --gradient_checkpointing false")


def core(model):
    """The transformers model inside the wrappers training puts around it (a reference view, DDP / DeepSpeed /
    FSDP, a peft adapter): where the config and the forward's signature are read."""
    model = getattr(model, "model", model) if isinstance(model, (Base, Adapter)) else model
    model = extract_model_from_parallel(model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


# ---- the reference without a second copy (LoRA) -----------------------------------------------------------------

def reference(policy, updated: bool):
    """The loop's reference model: a frozen copy of the initial policy under full fine-tuning; under LoRA (a peft
    policy) no copy: the policy with its adapter disabled (`Base`: the initial policy, as LoRA starts at B = 0),
    or for a method that updates its reference (`updated`: it defines `after_step`) the policy run with a second
    adapter initialised from the policy's (`Adapter`, as DiffusionNFT keeps its "old" model)."""
    if not hasattr(policy, "peft_config"):
        import copy

        return copy.deepcopy(policy).requires_grad_(False).eval()
    if not updated:
        return Base(policy)
    policy.add_adapter(REFERENCE_ADAPTER, policy.peft_config["default"])
    policy.set_adapter("default")  # add_adapter leaves the new one inactive; this keeps it frozen
    ref = Adapter(policy, REFERENCE_ADAPTER)
    with torch.no_grad():
        for old, new in zip(ref.parameters(), Adapter(policy, "default").parameters(), strict=True):
            old.copy_(new)
    return ref


class _View:
    """A model as seen through one adapter setting of a peft model: called like the model (in eval mode, the
    setting restored afterwards), with the model's config; its parameters are only its adapter's."""

    def __init__(self, model):
        self.model = model

    @property
    def config(self):
        return self.model.config

    @property
    def device(self):
        return self.model.device

    def __call__(self, *args, **kwargs):
        was_training = self.model.training
        self.model.eval()
        try:
            with self._active():
                return self.model(*args, **kwargs)
        finally:
            self.model.train(was_training)

    def named_parameters(self):
        return []

    def parameters(self):
        return [p for _, p in self.named_parameters()]

    def state_dict(self) -> dict:
        return {name: p.detach().clone() for name, p in self.named_parameters()}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            for name, p in self.named_parameters():
                p.copy_(state[name])

    def eval(self):
        return self

    def to(self, *args, **kwargs):
        return self


class Base(_View):
    """The peft model with its adapter disabled: the frozen base (no parameters of its own)."""

    def _active(self):
        return self.model.disable_adapter()


class Adapter(_View):
    """The peft model run with adapter `name`; its parameters are that adapter's weights, in module order."""

    def __init__(self, model, name: str):
        super().__init__(model)
        self.name = name

    def named_parameters(self):
        return [(n, p) for n, p in self.model.named_parameters() if f".{self.name}." in n]

    def _active(self):
        import contextlib

        @contextlib.contextmanager
        def active():
            previous = self.model.active_adapter
            if previous == self.name:
                yield
                return
            self.model.set_adapter(self.name, inference_mode=True)
            try:
                yield
            finally:
                self.model.set_adapter(previous)  # makes `previous` trainable again, as it was

        return active()


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
    config = core(model).config
    keep = (positions - int(is_shifted(config))).clamp(min=0)  # the output carrying each token (Dream: j - 1)
    inputs = {"input_ids": input_ids, **family_inputs(config, attention_mask), **model_kwargs}
    if "logits_to_keep" in inspect.signature(core(model).forward).parameters:
        logits = model(**inputs, logits_to_keep=keep).logits
    else:
        logits = model(**inputs).logits[:, keep]
    logits = logits.float()
    return logits.index_fill(-1, torch.tensor([config.mask_token_id], device=logits.device), float("-inf"))


def family_inputs(config, attention_mask: torch.Tensor | None) -> dict:
    """The padding arguments of the model's forward for a [B, S] mask (1 on real tokens): the mask itself, or for
    Dream a [B, 1, S, S] boolean mask of real query-key pairs and position ids counted from each row's first real
    token (None without padding), as Dream's `diffusion_generate` builds them."""
    if config.model_type.lower() not in MASK_4D_FAMILIES:
        return {"attention_mask": attention_mask}
    if attention_mask is None or bool(attention_mask.all()):
        return {}
    real = attention_mask.bool()
    positions = (real.long().cumsum(-1) - 1).masked_fill(~real, 1)
    return {"attention_mask": real[:, None, None, :] & real[:, None, :, None], "position_ids": positions}


def log_policy(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Log of the sampling distribution softmax(logits / temperature); plain softmax at temperature 0 (greedy).

    The sampler records log-probs and entropies under it, and trajectory estimators replay it.
    """
    return torch.log_softmax(logits / temperature if temperature > 0 else logits, dim=-1)
