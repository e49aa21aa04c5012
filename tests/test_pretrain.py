"""Masked-diffusion SFT loss (d1 spec §1.7 item 11) and the tokenizer."""

from __future__ import annotations

import pytest
import torch

from harness.pretrain import sft_loss
from harness.rollout import encode_prompts


def test_prompt_is_never_masked_and_masks_follow_the_documented_draw(model, tokenizer):
    ids, mask = encode_prompts(tokenizer, ["12+30=", "7+8="])
    completion = torch.randint(3, len(tokenizer), (2, 8), generator=torch.Generator().manual_seed(0))
    seen = {}
    handle = model.register_forward_hook(lambda m, a, k, out: seen.update(ids=k["input_ids"]), with_kwargs=True)
    sft_loss(model, ids, mask, completion, torch.Generator().manual_seed(0))
    handle.remove()
    assert torch.equal(seen["ids"][:, : ids.shape[1]], ids)
    g = torch.Generator().manual_seed(0)
    t = (1 - 1e-3) * torch.rand(2, 1, generator=g) + 1e-3  # one t per sequence
    masked = torch.rand(2, 8, generator=g) < t
    assert torch.equal(seen["ids"][:, ids.shape[1]:] == model.config.mask_token_id, masked)


def test_loss_is_weighted_by_one_over_t_per_sequence(model, tokenizer):
    ids, mask = encode_prompts(tokenizer, ["12+30="])
    completion = torch.randint(3, len(tokenizer), (1, 6), generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(2)
    t = (1 - 1e-3) * torch.rand(1, 1, generator=g) + 1e-3
    masked = torch.rand(1, 6, generator=g) < t
    noisy = torch.where(masked, model.config.mask_token_id, completion)
    with torch.no_grad():
        logits = model(input_ids=torch.cat([ids, noisy], 1)).logits[0, ids.shape[1]:].clone()
        logits[:, model.config.mask_token_id] = -torch.inf
        ce = torch.nn.functional.cross_entropy(logits, completion[0], reduction="none")
        want = (ce * masked[0]).sum() / t[0, 0] / 6
        got = sft_loss(model, ids, mask, completion, torch.Generator().manual_seed(2))
    torch.testing.assert_close(got, want)  # only masked tokens carry loss, each weighted 1/t


def test_tokenizer_round_trips_any_text_and_splits_digits(tokenizer):
    text = "Question: 123 apples? ünïcode ✓\n\tdef f(x): return x"
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text
    digits = tokenizer.convert_ids_to_tokens(tokenizer.encode("2026", add_special_tokens=False))
    assert digits == ["2", "0", "2", "6"]
    assert {tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.mask_token_id} == {0, 1, 2}


def test_schedule_interleaves_task_budgets_and_rejects_bad_specs():
    from harness.pretrain import schedule

    assert schedule("a:3,b:1") == ["a", "a", "b", "a"]
    plan = schedule("arithmetic:300,sudoku:20")
    assert len(plan) == 320 and plan.count("sudoku") == 20
    assert max(i for i, n in enumerate(plan) if n == "sudoku") > 300  # spread to the end, not bunched up
    with pytest.raises(ValueError, match="must look like 'arithmetic:3000,sudoku:200'"):
        schedule("arithmetic,sudoku")
