"""d1 / diffu-GRPO invariants (spec d1_diffpo.md §1.7 items 1-8)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from algorithms import d1
from harness.rollout import completion_mask, group_centered
from tests.conftest import make_batch


def prepared(model, tokenizer, **cfg):
    cfg = d1.Config(**cfg)
    batch = make_batch(model, tokenizer)
    return d1.prepare(model, model, batch, cfg), cfg


def test_ratio_is_one_at_the_first_inner_step(model, tokenizer):
    batch, cfg = prepared(model, tokenizer, num_iterations=3, beta=0.0)
    loss, metrics = d1.loss(model, model, batch, cfg)
    assert metrics["ratio"] == pytest.approx(1.0, abs=1e-6) and metrics["clip_fraction"] == 0.0


def test_first_step_loss_and_gradient_are_reinforce_with_a_mean_baseline(model, tokenizer):
    batch, cfg = prepared(model, tokenizer, num_iterations=1, beta=0.0)
    loss, _ = d1.loss(model, model, batch, cfg)
    m, adv = batch.completion_mask.float(), batch.extra["advantages"][:, None]
    assert loss.item() == pytest.approx(-(m * adv).sum().item() / m.sum().item(), abs=1e-6)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    logp = d1.mean_field_logp(model, batch.prompt_ids, batch.prompt_mask, batch.completion,
                              batch.extra["mask_seeds"][:, 0], cfg.p_mask)
    reinforce = -(m * adv * logp).sum() / m.sum()
    for g, want in zip(grads, torch.autograd.grad(reinforce, list(model.parameters()))):
        torch.testing.assert_close(g, want, rtol=1e-5, atol=1e-7)


def _grad_wrt_logp(monkeypatch, model, batch, cfg, logp_value):
    leaf = logp_value.clone().requires_grad_(True)
    monkeypatch.setattr(d1, "mean_field_logp", lambda *a, **k: leaf)
    loss, _ = d1.loss(model, model, batch, cfg)
    loss.backward()
    return leaf.grad


def test_clipping_zeroes_the_gradient_outside_the_trust_region(monkeypatch, model, tokenizer):
    batch, cfg = prepared(model, tokenizer, num_iterations=2, beta=0.0, epsilon=0.2)
    batch.completion_mask = torch.ones_like(batch.completion_mask)
    old = batch.extra["old_logp"][:, 0]
    shift = torch.linspace(-0.5, 0.5, batch.completion.shape[1]).expand_as(old)  # ratios from e^-0.5 to e^0.5
    grad = _grad_wrt_logp(monkeypatch, model, batch, cfg, old + shift)
    ratio, adv = torch.exp(shift), batch.extra["advantages"][:, None].expand_as(shift)
    clipped = ((adv > 0) & (ratio > 1.2)) | ((adv < 0) & (ratio < 0.8))
    assert clipped.any() and (~clipped).any()
    assert (grad[clipped] == 0).all()
    n = batch.completion_mask.sum()
    torch.testing.assert_close(grad[~clipped], (-adv * ratio / n)[~clipped])


def test_k3_kl_value_and_gradient(monkeypatch, model, tokenizer):
    batch, cfg = prepared(model, tokenizer, num_iterations=1, beta=1.0)
    batch.extra["advantages"] = torch.zeros(len(batch))  # isolate the KL term
    ref = batch.extra["ref_logp"][:, 0]
    logp = ref + torch.linspace(-1, 1, ref.shape[1])
    grad = _grad_wrt_logp(monkeypatch, model, batch, cfg, logp)
    m = batch.completion_mask.float()
    torch.testing.assert_close(grad, (1 - torch.exp(ref - logp)) * m / m.sum())
    _, metrics = d1.loss(model, model, batch, cfg)  # D >= 0, and 0 at ref = logp (same model as reference)
    assert metrics["kl"] > 0
    monkeypatch.undo()
    assert d1.loss(model, model, batch, cfg)[1]["kl"] == pytest.approx(0.0, abs=1e-7)


def test_same_mask_seed_for_current_old_and_reference(model, tokenizer):
    batch, cfg = prepared(model, tokenizer, num_iterations=3, beta=0.04)
    seeds = batch.extra["mask_seeds"]
    assert seeds.shape == (len(batch), 3) and len(set(seeds.flatten().tolist())) == seeds.numel()
    torch.testing.assert_close(batch.extra["old_logp"], batch.extra["ref_logp"])  # policy == ref here
    for n in range(3):
        batch.iteration = n
        assert d1.loss(model, model, batch, cfg)[1]["ratio"] == pytest.approx(1.0, abs=1e-6)


def test_group_advantages_sum_to_zero_and_vanish_for_equal_rewards():
    rewards, group = torch.tensor([1.0, 0.0, 0.5, 0.5, 0.2, 0.2]), torch.tensor([0, 0, 0, 1, 1, 1])
    adv = group_centered(rewards, group)
    torch.testing.assert_close(adv, torch.tensor([0.5, -0.5, 0.0, 0.2, -0.1, -0.1]))
    assert group_centered(torch.full((4,), 0.7), torch.tensor([0, 0, 1, 1])).abs().max() == 0


def test_equal_rewards_leave_only_the_kl_gradient(model, tokenizer):
    batch, cfg = prepared(model, tokenizer, num_iterations=1, beta=0.0)
    batch.extra["advantages"] = group_centered(torch.ones(len(batch)), batch.group)
    loss, _ = d1.loss(model, model, batch, cfg)
    assert all((g == 0).all() for g in torch.autograd.grad(loss, list(model.parameters())))


def test_completion_mask_includes_the_first_eos_only():
    eos = 9
    comp = torch.tensor([[4, 5, eos, eos, 6], [4, 5, 6, 7, 8], [eos, 1, 2, 3, 4]])
    want = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(completion_mask(comp, eos), want)


def test_fixed_masking_uses_the_same_seeds_every_rollout(model, tokenizer):
    cfg = d1.Config(num_iterations=2, random_masking=False, beta=0.0)
    a = d1.prepare(model, model, make_batch(model, tokenizer, seed=0), cfg).extra["mask_seeds"]
    b = d1.prepare(model, model, make_batch(model, tokenizer, seed=5), cfg).extra["mask_seeds"]
    assert torch.equal(a, b)
    r = d1.prepare(model, model, make_batch(model, tokenizer, seed=5), replace(cfg, random_masking=True))
    assert not torch.equal(a, r.extra["mask_seeds"])
