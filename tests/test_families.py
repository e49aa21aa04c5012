"""The paper-scale model path on tiny models with the published families' interfaces (tests/families): loading
through `auto_map` with trust_remote_code, each family's logit and padding conventions, chat templates, LoRA with
the reference as the adapter-disabled model (or a second adapter for LFPO's EMA), gradient checkpointing, LoRA
checkpoints that resume bit-identically, and LoRA snapshots evaluated by lm-eval."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import algorithms
import benchmarks
from harness import runs
from harness.cli import main
from harness.model import Adapter, Base, add_lora, enable_gradient_checkpointing, is_shifted, load, reference, token_logits
from harness.rollout import encode_prompts, rollout
from harness.sampler import SamplerConfig
from tests.families import save_family
from tests.test_algorithms import tiny_run, untimed

FAMILIES = ["llada", "dream"]


@pytest.fixture(scope="module")
def family_dirs(tokenizer, tmp_path_factory):
    return {f: save_family(f, tokenizer, tmp_path_factory.mktemp(f) / "model") for f in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_loaded_through_auto_map_with_the_family_conventions(family, family_dirs):
    model, tok = load(family_dirs[family])
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__  # the copied code
    assert model.config.model_type.lower() == family and is_shifted(model.config) == (family == "dream")
    assert model.config.mask_token_id == tok.mask_token_id
    ids, mask = encode_prompts(tok, ["12+34=", "1+2="])
    first = ids[1][mask[1]].tolist()
    marker = "<|startoftext|>" if family == "llada" else "<|im_start|>"
    assert tok.convert_ids_to_tokens(first[0]) == marker and tok.decode(first).count("1+2=") == 1
    with torch.no_grad():
        raw = model(input_ids=ids[:1]).logits
        logits = token_logits(model, ids[:1], positions=torch.arange(1, ids.shape[1]))
    shift = int(family == "dream")  # Dream: the output at j - 1 carries token j
    expected = raw[:, 1 - shift: ids.shape[1] - shift].float()
    expected[..., model.config.mask_token_id] = -torch.inf
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_left_padding_does_not_change_a_row(family, family_dirs):
    """LLaDA takes the [B, S] mask (absolute RoPE positions, invariant to a shift); Dream a [B, 1, S, S] mask and
    position ids from the first real token, which token_logits builds."""
    model, tok = load(family_dirs[family])
    ids, mask = encode_prompts(tok, ["1+2=", "123+456=789"])
    alone, alone_mask = encode_prompts(tok, ["1+2="])
    with torch.no_grad():  # from the second token: Dream reads token j at j - 1, the first token has no reading
        padded = token_logits(model, ids[:1], mask[:1].long(), start=ids.shape[1] - alone.shape[1] + 1)
        single = token_logits(model, alone, alone_mask.long(), start=1)
    torch.testing.assert_close(padded, single, rtol=0, atol=1e-4)


def _changed(before: dict, after: dict) -> set[str]:
    return {k for k in before if not torch.equal(before[k], after[k])}


@pytest.mark.parametrize("family, algo", [("llada", "d1"), ("dream", "espo"), ("llada", "lfpo")])
def test_a_lora_step_trains_the_adapter_only_and_the_reference_is_the_base(family, algo, family_dirs):
    """One RL step of the method's own prepare/loss/after_step on LoRA + gradient checkpointing: the base weights
    are bit-identical afterwards, every adapter B matrix moved (A's gradient is 0 while B = 0); the frozen reference IS the base model (its logits
    equal those of the folder loaded afresh, before and after); LFPO's reference is a second adapter that starts
    as the policy's and moves by the EMA, alpha-weighted toward the new policy."""
    module, task = algorithms.get(algo), benchmarks.get("arithmetic")
    cfg = module.Config(num_iterations=1) if hasattr(module.Config(), "num_iterations") else module.Config()
    base, tok = load(family_dirs[family])
    torch.manual_seed(0)
    policy = add_lora(base, rank=4, alpha=8, dropout=0.0, targets="all-linear")
    enable_gradient_checkpointing(policy)
    ref = reference(policy, updated=hasattr(module, "after_step"))
    assert isinstance(ref, Adapter if algo == "lfpo" else Base) and not any(p.requires_grad for p in ref.parameters())
    weights = lambda name: {k: v.detach().clone() for k, v in policy.named_parameters() if name in k}  # noqa: E731
    frozen, adapter = weights("base_layer"), weights(".default.")
    trainable = [p for p in policy.parameters() if p.requires_grad]
    assert trainable and {id(p) for p in trainable} == {id(p) for n, p in policy.named_parameters() if ".default." in n}
    fresh, _ = load(family_dirs[family])
    ids, mask = encode_prompts(tok, ["12+34=", "5+6="])
    with torch.no_grad():
        truth = token_logits(fresh, ids, mask.long())
        if algo != "lfpo":
            torch.testing.assert_close(token_logits(ref, ids, mask.long()), truth, rtol=0, atol=1e-6)
        old_ref = {n: p.clone() for n, p in ref.named_parameters()}

    sampler = SamplerConfig(temperature=1.0).resolve(task)
    policy.eval()
    batch, _ = rollout(policy, tok, task, task.load("train")[:2], sampler, 4, torch.Generator().manual_seed(0))
    batch.rewards, batch.seed = torch.rand(len(batch), generator=torch.Generator().manual_seed(1)), 0
    with torch.no_grad():
        batch = module.prepare(policy, ref, batch, cfg)
    policy.train()
    loss, _ = module.loss(policy, ref, batch, cfg)
    loss.backward()
    torch.optim.SGD(trainable, lr=1.0).step()
    if hasattr(module, "after_step"):
        module.after_step(Adapter(policy, "default"), ref, step=100, cfg=cfg)

    assert not _changed(frozen, weights("base_layer"))
    # at LoRA's start B = 0, so the first step moves every B (A's gradient is B^T times something: zero)
    assert _changed(adapter, weights(".default.")) == {k for k in adapter if "lora_B" in k}
    with torch.no_grad():
        assert not torch.allclose(token_logits(policy, ids, mask.long()), truth)
        if algo != "lfpo":
            torch.testing.assert_close(token_logits(ref, ids, mask.long()), truth, rtol=0, atol=1e-6)
            return
        alpha = min(cfg.ema_ramp * 100, cfg.ema_max)
        new = dict(Adapter(policy, "default").named_parameters())
        for name, p in ref.named_parameters():
            torch.testing.assert_close(p, alpha * old_ref[name] + (1 - alpha) * new[name.replace(".reference.", ".default.")])


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_runs_resume_bit_identically_and_snapshots_are_adapters(family, family_dirs, tmp_path):
    """The training entry point with LoRA and gradient checkpointing on each family, LFPO (its reference is the
    second adapter; and its loss moves the adapter even though the random models earn no reward): a run stopped at
    step 2 and resumed ends bit-identical to one run straight through (the checkpoint holds the adapter, the
    reference adapter in its state); the snapshot is an adapter folder, which `load` merges into its base and
    lm-eval evaluates."""
    algo = "lfpo"
    lora = dict(lora_rank=4, lora_alpha=8.0, gradient_checkpointing=True, snapshot_every=3)
    model = family_dirs[family]
    full = tiny_run(model, tmp_path / "full", algo, steps=3, save_every=1, eval_every=1, **lora)
    tiny_run(model, tmp_path / "part", algo, steps=2, save_every=1, eval_every=1, **lora)
    part = tiny_run(model, tmp_path / "part", algo, steps=3, save_every=1, eval_every=1, **lora)
    assert untimed(runs.read_metrics(part / "metrics.jsonl")) == untimed(runs.read_metrics(full / "metrics.jsonl"))
    a, b = (load_file(r / "checkpoint/model/adapter_model.safetensors") for r in (full, part))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not any("reference" in k for k in a)  # the second adapter lives in the checkpoint's state
    assert all(a[k].abs().sum() > 0 for k in a if "lora_B" in k)  # trained: B left 0
    snapshot = full / "snapshots/step3"
    assert json.loads((snapshot / "adapter_config.json").read_text())["base_model_name_or_path"] == str(model)
    merged, tok = load(snapshot)
    trained, _ = load(full / "checkpoint/model", trainable_adapter=True)
    ids, mask = encode_prompts(tok, ["12+34="])
    with torch.no_grad():
        torch.testing.assert_close(token_logits(merged, ids, mask.long()), token_logits(trained, ids, mask.long()),
                                   rtol=0, atol=1e-4)
    out = tmp_path / "eval.json"
    main(["eval", "--model", str(snapshot), "--tasks", "sudoku", "--limit", "2", "--out", str(out)])
    assert json.loads(out.read_text())["harness"]["tasks"]["sudoku"]["nfe"] == [16, 16]


def test_four_bit_needs_lora_and_checkpointing_needs_support(model_dir):
    from harness.train import TrainConfig

    with pytest.raises(ValueError, match="needs LoRA"):
        TrainConfig(load_in_4bit=True)
    model, _ = load(model_dir)  # the tiny model supports neither switch
    with pytest.raises(ValueError, match="--gradient_checkpointing false"):
        enable_gradient_checkpointing(model)


FOUR_BIT_SIZES = {"llada": {"d_model": 64, "mlp_hidden_size": 128}, "dream": {"hidden_size": 64, "intermediate_size": 128}}


@pytest.mark.parametrize("family", FAMILIES)
def test_a_four_bit_base_trains_like_its_dequantized_weights(family, tokenizer, tmp_path):
    """QLoRA on CPU (bitsandbytes' CPU backend; widths that are multiples of its 64-weight blocks): after an eval-mode
    forward, as rollouts make, the LoRA gradients of a 4-bit base are those of the same base with its dequantized
    weights in full precision (bf16 compute: cosine > 0.999 per adapter matrix), for every layer: the gradient
    flows through the 4-bit layers. Then the training entry point with --load_in_4bit (LFPO: its loss moves the
    adapter whatever the random model earns): the adapter moves, and the
    snapshot is an adapter on the 4-bit-loaded base."""
    import bitsandbytes as bnb

    folder = save_family(family, tokenizer, tmp_path / "model", **FOUR_BIT_SIZES[family])
    quantized, tok = load(folder, load_in_4bit=True)
    full, _ = load(folder)
    four_bit = {n: m for n, m in quantized.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert len(four_bit) >= 4 * 2  # every projection of both layers
    with torch.no_grad():
        for name, module in full.named_modules():
            if name in four_bit:
                weight = four_bit[name].weight
                module.weight.copy_(bnb.functional.dequantize_4bit(weight.data, weight.quant_state).float())
    ids, mask = encode_prompts(tok, ["12+34=", "5+6="])
    grads = []
    for model in (quantized, full):
        torch.manual_seed(0)
        policy = add_lora(model, rank=4, alpha=8, dropout=0.0, targets="all-linear")
        policy.eval()
        with torch.no_grad():
            token_logits(policy, ids, mask.long())  # what a rollout does first: bitsandbytes' repack trigger
        policy.train()
        logits = token_logits(policy, ids, mask.long()).float()
        logits.log_softmax(-1)[..., 5].mean().backward()
        grads.append({n: p.grad.float().flatten() for n, p in policy.named_parameters() if "lora_B" in n})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == len(four_bit)
    for name in grads[0]:
        assert torch.cosine_similarity(grads[0][name], grads[1][name], dim=0) > 0.999, name

    run = tiny_run(folder, tmp_path / "run", "lfpo", steps=2, lora_rank=4, lora_alpha=8.0, load_in_4bit=True,
                   snapshot_every=2)
    adapter = load_file(run / "checkpoint/model/adapter_model.safetensors")
    assert all(adapter[k].abs().sum() > 0 for k in adapter if "lora_B" in k)
    assert json.loads((run / "snapshots/step2/adapter_config.json").read_text())["base_model_name_or_path"] == str(folder)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_paper_setting_bf16_lora_checkpointing_trains(family, family_dirs, tmp_path):
    """The paper profile's model setting on each family: weights loaded in bfloat16 (--dtype bfloat16), LoRA,
    gradient checkpointing. Every logged number is finite, the adapter moves, and the snapshot, merged into its
    base, gives logits without NaN that differ from the base's."""
    run = tiny_run(family_dirs[family], tmp_path / "run", "lfpo", steps=2, dtype="bfloat16", lora_rank=4,
                   lora_alpha=8.0, gradient_checkpointing=True, snapshot_every=2)
    rows = runs.read_metrics(run / "metrics.jsonl")
    assert len(rows) == 3 and all(torch.isfinite(torch.tensor(float(v))) for r in rows for v in r.values())
    adapter = load_file(run / "checkpoint/model/adapter_model.safetensors")
    assert all(adapter[k].abs().sum() > 0 for k in adapter if "lora_B" in k)
    (merged, tok), (base, _) = load(run / "snapshots/step2"), load(family_dirs[family])
    ids, mask = encode_prompts(tok, ["12+34="])
    with torch.no_grad():
        after, before = (token_logits(m, ids, mask.long()) for m in (merged, base))
    assert not after.isnan().any() and not torch.allclose(after, before)  # (the mask token's logit is -inf)
