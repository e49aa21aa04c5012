"""Shared estimators: mean-field log-probs, trajectory steps, the coupled Monte-Carlo ELBO."""

from __future__ import annotations

import pytest
import torch

import benchmarks
from harness.likelihood import masked_prompt, elbo, elbo_masks, exact_elbo, mean_field_logp
from harness.rollout import encode_prompts


def prompts(tokenizer, n=4):
    task = benchmarks.get("arithmetic")
    return encode_prompts(tokenizer, [task.prompt(e) for e in task.load("test")[:n]])


def completions(tokenizer, n, length, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, len(tokenizer), (n, length), generator=g)


@torch.no_grad()
def test_mean_field_logp_equals_hand_computation(model, tokenizer):
    ids, mask = prompts(tokenizer)
    comp = completions(tokenizer, len(ids), 5)
    seeds = torch.tensor([3, 1, 4, 1])
    got = mean_field_logp(model, ids, mask, comp, seeds, p_mask=0.3)
    mask_id = model.config.mask_token_id
    for i in range(len(ids)):
        g = torch.Generator().manual_seed(int(seeds[i]))
        real = mask[i].nonzero().squeeze(1)
        prompt = ids[i].clone()
        prompt[real[torch.rand(len(real), generator=g) < 0.3]] = mask_id
        x = torch.cat([prompt, torch.full((5,), mask_id)])[None]
        attn = torch.cat([mask[i].long(), torch.ones(5, dtype=torch.long)])[None]
        logits = model(input_ids=x, attention_mask=attn).logits[0, ids.shape[1]:].clone()
        logits[:, mask_id] = -float("inf")
        want = -torch.nn.functional.cross_entropy(logits, comp[i], reduction="none")
        torch.testing.assert_close(got[i], want, rtol=0, atol=1e-5)


@torch.no_grad()
def test_mean_field_ignores_completion_content(model, tokenizer):
    ids, mask = prompts(tokenizer, 2)
    comp = completions(tokenizer, 2, 6)
    other = comp.clone()
    other[:, 2] = (other[:, 2] + 1) % len(tokenizer)
    a = mean_field_logp(model, ids, mask, comp, torch.tensor([0, 1]), 0.15)
    b = mean_field_logp(model, ids, mask, other, torch.tensor([0, 1]), 0.15)
    keep = torch.arange(6) != 2
    assert torch.equal(a[:, keep], b[:, keep]) and not torch.equal(a[:, 2], b[:, 2])


def test_prompt_masking_rate_seed_sharing_and_extremes(tokenizer):
    ids, mask = prompts(tokenizer, 4)
    many_ids, many_mask = ids.repeat(250, 1), mask.repeat(250, 1)
    mask_id = 2
    masked = masked_prompt(many_ids, many_mask, torch.arange(1000), 0.15, mask_id) == mask_id
    rate = masked[many_mask].float().mean().item()
    assert abs(rate - 0.15) < 0.02
    assert not masked[~many_mask].any()  # padding is never touched
    same = masked_prompt(ids, mask, torch.tensor([7, 7, 7, 7]), 0.5, mask_id)
    assert torch.equal(same, masked_prompt(ids, mask, torch.tensor([7, 7, 7, 7]), 0.5, mask_id))
    assert not torch.equal(same, masked_prompt(ids, mask, torch.tensor([8, 9, 10, 11]), 0.5, mask_id))
    assert torch.equal(masked_prompt(ids, mask, torch.arange(4), 0.0, mask_id), ids)
    assert (masked_prompt(ids, mask, torch.arange(4), 1.0, mask_id)[mask] == mask_id).all()


@torch.no_grad()
def test_estimates_do_not_depend_on_padding_or_batch_company(model, tokenizer):
    """A row's estimate depends only on its own seed: alone or in a padded batch it is the same."""
    ids, mask = prompts(tokenizer, 4)
    comp, seeds = completions(tokenizer, 4, 6), torch.tensor([5, 6, 7, 8])
    batch_mf = mean_field_logp(model, ids, mask, comp, seeds, 0.5)
    batch_elbo = elbo(model, ids, mask, comp, seeds, num_mc=2)
    for i in range(4):
        real = mask[i]
        alone_ids, alone_mask = ids[i, real][None], mask[i, real][None]
        torch.testing.assert_close(mean_field_logp(model, alone_ids, alone_mask, comp[i:i + 1], seeds[i:i + 1], 0.5)[0],
                                   batch_mf[i], rtol=0, atol=1e-5)
        torch.testing.assert_close(elbo(model, alone_ids, alone_mask, comp[i:i + 1], seeds[i:i + 1], 2)[0],
                                   batch_elbo[i], rtol=0, atol=1e-4)


def test_elbo_masks_are_stratified_and_complementary():
    masks, counts = elbo_masks(torch.arange(500), length=6, num_mc=2)
    assert torch.equal(masks.sum(-1), counts)
    gap = (counts[:, 1] - counts[:, 0]) % 7
    assert set(gap.tolist()) <= {3, 4}  # the two counts are half the range apart
    freq = torch.bincount(counts[:, 0], minlength=7).float() / 500
    assert (freq - 1 / 7).abs().max() < 0.05  # each count is marginally uniform on {0..L}


@pytest.mark.parametrize("num_mc", [1, 2])
@torch.no_grad()
def test_coupled_elbo_is_unbiased_for_the_exact_elbo(model, tokenizer, num_mc):
    ids, mask = prompts(tokenizer, 1)
    comp = completions(tokenizer, 1, 3, seed=1)
    exact = exact_elbo(model, ids, mask, comp)[0].item()
    n = 3000
    estimates = elbo(model, ids.repeat(n, 1), mask.repeat(n, 1), comp.repeat(n, 1), torch.arange(n), num_mc)
    mean, se = estimates.mean().item(), estimates.std().item() / n**0.5
    assert abs(mean - exact) < 4 * se, (mean, exact, se)
    assert se > 0  # the estimator is random, so the test has power


@torch.no_grad()
def test_exact_elbo_matches_brute_force_on_length_two(model, tokenizer):
    """L = 2: ELBO = 1/2 [log p(a|_,_)+log p(b|_,_)]... weights (|M|-1)!(L-|M|)!/L! are 1/2 and 1/2."""
    ids, mask = prompts(tokenizer, 1)
    comp = completions(tokenizer, 1, 2)
    m = model.config.mask_token_id

    def lp(state, pos):
        x = torch.cat([ids, torch.tensor([state])], 1)
        attn = torch.cat([mask.long(), torch.ones(1, 2, dtype=torch.long)], 1)
        logits = model(input_ids=x, attention_mask=attn).logits[0, ids.shape[1] + pos].clone()
        logits[m] = -float("inf")
        return torch.log_softmax(logits, -1)[comp[0, pos]].item()

    a, b = comp[0].tolist()
    want = 0.5 * (lp([m, b], 0) + lp([a, m], 1)) + 0.5 * (lp([m, m], 0) + lp([m, m], 1))
    assert exact_elbo(model, ids, mask, comp)[0].item() == pytest.approx(want, abs=1e-5)
