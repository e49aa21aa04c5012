"""ESPO invariants (spec espo_dmpo.md §A7 items 4-10; items 1-3, the coupled ELBO's unbiasedness, stratified
counts and complementary passes, are tested on the shared estimator in test_likelihood.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from algorithms import espo
from harness.likelihood import elbo, exact_elbo
from harness.rollout import group_centered
from tests.conftest import make_batch, make_model, reward_climb


def prepared(model, tokenizer, ref=None, **cfg):
    cfg = espo.Config(**cfg)
    batch = make_batch(model, tokenizer)
    return espo.prepare(model, ref or model, batch, cfg), cfg


def grads(loss, model):
    return torch.autograd.grad(loss, list(model.parameters()))


def test_leave_one_out_advantages():
    """Item 5: A_i = r_i - mean of the others = G/(G-1) (r_i - mean); they sum to 0 per group."""
    rewards, group = torch.tensor([1.0, 0.0, 0.5, 0.5, 0.2, 0.8, 0.0, 1.0]), torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    adv = espo.leave_one_out(rewards, group)
    torch.testing.assert_close(adv, torch.tensor([2 / 3, -2 / 3, 0.0, 0.0, -0.4, 0.4, -2 / 3, 2 / 3]))
    others = [rewards[(group == group[i]) & (torch.arange(8) != i)].mean() for i in range(8)]
    torch.testing.assert_close(adv, rewards - torch.stack(others))
    assert adv[:4].sum().abs() < 1e-7 and adv[4:].sum().abs() < 1e-6
    with pytest.raises(ValueError, match="at least 2 completions"):
        espo.leave_one_out(torch.tensor([1.0, 0.0]), torch.tensor([0, 1]))


def test_shared_seeds_ratio_one_and_first_step_loss(model, tokenizer):
    """Item 4: one seed per (row, iteration) shared by current, old and reference ELBOs; at theta = theta_old the
    ratio is 1, nothing is clipped, and the loss is -mean(A) (= 0: LOO advantages sum to 0 per group)."""
    batch, cfg = prepared(model, tokenizer, num_iterations=3, beta=0.01)
    seeds = batch.extra["mask_seeds"]
    assert seeds.shape == (len(batch), 3) and len(set(seeds.flatten().tolist())) == seeds.numel()
    torch.testing.assert_close(batch.extra["old_elbo"], batch.extra["ref_elbo"])  # same model, same masks
    for n in range(3):
        batch.iteration = n
        loss, metrics = espo.loss(model, model, batch, cfg)
        assert metrics["ratio"] == pytest.approx(1.0, abs=1e-6) and metrics["clip_fraction"] == 0.0
        assert metrics["kl"] == pytest.approx(0.0, abs=1e-9)
        assert loss.item() == pytest.approx(-batch.extra["advantages"].mean().item(), abs=1e-6)
    again = espo.prepare(model, model, make_batch(model, tokenizer), cfg)
    assert torch.equal(again.extra["mask_seeds"], seeds)  # seeds come from the batch seed only


def test_gradient_at_ratio_one_is_reinforce_on_the_elbo_and_independent_of_epsilon(model, tokenizer):
    """Item 5: grad = -(1/(B L)) sum_i A_i grad ELBO_i, for any clip range; equal rewards give exactly 0."""
    batch, cfg = prepared(model, tokenizer, num_iterations=1, beta=0.0)
    B, L = len(batch), batch.completion.shape[1]
    value = elbo(model, batch.prompt_ids, batch.prompt_mask, batch.completion, batch.extra["mask_seeds"][:, 0], 2)
    want = grads(-(batch.extra["advantages"] * value).sum() / (B * L), model)
    for eps in (0.2, 0.0):
        got = grads(espo.loss(model, model, batch, espo.Config(num_iterations=1, beta=0.0, epsilon=eps))[0], model)
        assert any(g.abs().sum() > 0 for g in got)
        for g, h in zip(got, want):
            torch.testing.assert_close(g, h, rtol=1e-4, atol=1e-8)
    batch.extra["advantages"] = espo.leave_one_out(torch.full((B,), 0.4), batch.group)
    assert all((g == 0).all() for g in grads(espo.loss(model, model, batch, cfg)[0], model))


def _grad_wrt_elbo(monkeypatch, model, batch, cfg, value):
    leaf = value.clone().requires_grad_(True)
    monkeypatch.setattr(espo, "elbo", lambda *a, **k: leaf)
    loss, metrics = espo.loss(model, model, batch, cfg)
    loss.backward()
    return loss, leaf.grad, metrics


def test_clipping_zeroes_a_sequence_gradient(monkeypatch, model, tokenizer):
    """Item 6: A > 0 with rho > 1 + eps, or A < 0 with rho < 1 - eps: zero gradient; else A rho / (B L)."""
    batch, cfg = prepared(model, tokenizer, num_iterations=2, beta=0.0, epsilon=0.2)
    B, L = len(batch), batch.completion.shape[1]
    batch.extra["advantages"] = torch.tensor([1.0, -1.0] * (B // 2))
    log_ratio = torch.tensor([0.5, 0.5, -0.5, -0.5, 0.1, -0.1, 0.0, 0.3])  # per-token ELBO differences
    _, grad, metrics = _grad_wrt_elbo(monkeypatch, model, batch, cfg, batch.extra["old_elbo"][:, 0] + L * log_ratio)
    rho, adv = torch.exp(log_ratio), batch.extra["advantages"]
    clipped = ((adv > 0) & (rho > 1.2)) | ((adv < 0) & (rho < 0.8))
    assert clipped.tolist() == [True, False, False, True, False, False, False, False]
    assert metrics["clip_fraction"] == pytest.approx(2 / 8)
    torch.testing.assert_close(grad, torch.where(clipped, 0.0, -adv * rho / (B * L)))


def test_k2_kl_value_and_gradient(monkeypatch, model, tokenizer):
    """Item 7: beta/(B L) sum (ELBO - ELBO_ref)^2 / 2 >= 0, gradient beta (ELBO - ELBO_ref) / (B L)."""
    batch, cfg = prepared(model, tokenizer, num_iterations=1, beta=0.5)
    B, L = len(batch), batch.completion.shape[1]
    batch.extra["advantages"] = torch.zeros(B)
    # theta = ref: 0, no gradient
    assert all((g == 0).all() for g in grads(espo.loss(model, model, batch, cfg)[0], model))
    delta = torch.linspace(-3, 3, B)
    loss, grad, metrics = _grad_wrt_elbo(monkeypatch, model, batch, cfg, batch.extra["ref_elbo"][:, 0] + delta)
    assert loss.item() == pytest.approx(0.5 * (delta**2 / 2).sum().item() / (B * L), rel=1e-5)
    torch.testing.assert_close(grad, 0.5 * delta / (B * L))
    assert metrics["kl"] > 0


def test_lora_like_zero_init_gives_identical_reference_elbo(tokenizer):
    """Item 7: a policy whose weights equal the reference's (LoRA B = 0) has ELBO_theta = ELBO_ref on shared seeds."""
    policy, ref = make_model(tokenizer, seed=0), make_model(tokenizer, seed=0)
    batch, cfg = prepared(policy, tokenizer, ref=ref, num_iterations=1, beta=0.1)
    value = elbo(policy, batch.prompt_ids, batch.prompt_mask, batch.completion, batch.extra["mask_seeds"][:, 0], 2)
    assert torch.equal(value, batch.extra["ref_elbo"][:, 0])


def test_ratio_is_per_token_so_canvas_length_cancels(monkeypatch, model, tokenizer):
    """Item 8: at a fixed per-token ELBO difference d, log rho = d for any canvas length L."""
    batch, cfg = prepared(model, tokenizer, num_iterations=2, beta=0.0)
    for width in (8, 24):
        wide = batch.select(slice(None))
        wide.completion = batch.completion[:, :1].expand(-1, width)
        _, _, metrics = _grad_wrt_elbo(monkeypatch, model, wide, cfg, batch.extra["old_elbo"][:, 0] + 0.05 * width)
        assert metrics["ratio"] == pytest.approx(torch.exp(torch.tensor(0.05)).item(), rel=1e-6)


class ContextFree(torch.nn.Module):
    """A 'denoiser' whose log p(token | anything) depends only on the position: the ELBO is tight."""

    def __init__(self, length, vocab):
        super().__init__()
        self.config = SimpleNamespace(model_type="test", mask_token_id=vocab - 1, shift_logits=False)
        self.table = torch.randn(length, vocab, generator=torch.Generator().manual_seed(0))

    def forward(self, input_ids, attention_mask=None):
        S = input_ids.shape[1]
        return SimpleNamespace(logits=self.table[-S:].expand(len(input_ids), -1, -1))


def test_context_free_denoiser_makes_the_elbo_exact():
    """Item 9: if log p(y_k | .) = c_k ignores the context, ELBO = sum_k c_k (exactly, and in MC expectation)."""
    P, L, V = 2, 4, 7
    model = ContextFree(P + L, V)
    prompt, prompt_mask = torch.tensor([[0, 1]]), torch.ones(1, P, dtype=torch.bool)
    completion = torch.tensor([[3, 1, 4, 1]])
    logp = torch.log_softmax(model.table[P:, :V - 1], -1)  # the mask token (last id) gets probability 0
    c = logp.gather(1, completion.T).sum()
    assert exact_elbo(model, prompt, prompt_mask, completion)[0].item() == pytest.approx(c.item(), rel=1e-6)
    n = 4000
    est = elbo(model, prompt.repeat(n, 1), prompt_mask.repeat(n, 1), completion.repeat(n, 1), torch.arange(n), 1)
    assert abs(est.mean() - c) < 4 * est.std() / n**0.5
    assert torch.isfinite(est).all()  # n = 0 and n = L each leave one empty pass: no division by zero


def test_dream_style_model_scores_position_i_with_row_i_minus_1(tokenizer):
    """Item 10: a Dream-style (shifted) model with the same weights gives the same ESPO ELBO."""
    llada, dream = make_model(tokenizer, seed=2), make_model(tokenizer, shift_logits=True)
    dream.load_state_dict(llada.state_dict())
    batch = make_batch(llada, tokenizer)
    seeds = torch.arange(len(batch))
    args = (batch.prompt_ids, batch.prompt_mask, batch.completion, seeds, 2)
    torch.testing.assert_close(elbo(dream, *args), elbo(llada, *args))


def test_group_centering_is_not_the_espo_baseline():
    """LOO differs from the plain group mean by the factor G/(G-1) (here 4/3), which scales the step."""
    r, g = torch.tensor([1.0, 0.0, 0.0, 0.0]), torch.zeros(4, dtype=torch.long)
    torch.testing.assert_close(espo.leave_one_out(r, g), group_centered(r, g) * 4 / 3)


def test_toy_reward_rises(tokenizer):
    """A few updates raise a toy reward (the fraction of even token ids) from the random model's level."""
    history = reward_climb(espo, espo.Config(), tokenizer)
    assert history[-1] > history[0] + 0.2, history
