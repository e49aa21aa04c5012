"""DiFFPO invariants (spec d1_diffpo.md §2.7 items 1-9 and 11; item 10, the EB sampler, is in test_sampler.py)."""

from __future__ import annotations

import math

import pytest
import torch

import benchmarks
from algorithms import diffpo
from harness.likelihood import mean_field_logp, step_logits
from harness.rollout import encode_prompts, group_centered, rollout
from harness.sampler import SamplerConfig, generate

TASK = benchmarks.get("arithmetic")  # L = 8 in one block, 8 steps: one token per step for the top-k sampler


def sampled(model, tokenizer, cfg, temperature=0.9, seed=0, rewards=None):
    """A real rollout batch through DiFFPO's `sample` override (2 prompts x 4), rewards seeded or given."""
    sampler = SamplerConfig(temperature=temperature).resolve(TASK)

    def sample(m, ids, mask, c, g):
        return diffpo.sample(m, m, ids, mask, c, g, cfg)

    batch, _ = rollout(model, tokenizer, TASK, TASK.load("test")[:2], sampler, 4, torch.Generator().manual_seed(seed),
                       sample)
    batch.rewards = torch.rand(len(batch), generator=torch.Generator().manual_seed(seed + 1)) if rewards is None \
        else rewards
    batch.seed = seed
    return batch


def prepared(model, tokenizer, temperature=0.9, rewards=None, **fields):
    cfg = diffpo.Config(**fields)
    return diffpo.prepare(model, model, sampled(model, tokenizer, cfg, temperature, rewards=rewards), cfg), cfg


def params(model):
    return list(model.parameters())


def test_tau_zero_reduces_the_surrogate_to_d1_mean_field(model, tokenizer):
    batch, cfg = prepared(model, tokenizer, temperature=1.0, mode="model", p_mask=0.15, p_mask_z=0.15, num_iterations=1)
    batch.extra["tau"].zero_()
    logp, _ = diffpo._surrogate(model, batch, 0, cfg)
    d1 = mean_field_logp(model, batch.prompt_ids, batch.prompt_mask, batch.completion, batch.extra["mask_seeds"][:, 0],
                         0.15)
    torch.testing.assert_close(logp, d1, rtol=0, atol=1e-5)


@pytest.mark.parametrize("mode", ["model", "joint"])
def test_tokens_decoded_at_tau_plus_one_replay_the_behaviour_log_prob(model, tokenizer, mode):
    """Items 2 and 4: under the rollout's temperature the z_tau pass at tau = d_k - 1 is the behaviour step."""
    batch, cfg = prepared(model, tokenizer, temperature=0.9, mode=mode, p_mask=0.15, num_iterations=1)
    for tau in range(int(batch.nfe.max())):
        batch.extra["tau"].fill_(tau)
        logp, _ = diffpo._surrogate(model, batch, 0, cfg)
        exact = batch.unmask_step == tau
        assert exact.any()
        torch.testing.assert_close(logp[exact], batch.logp[exact], rtol=0, atol=1e-5)  # untruncated w = 1
        if mode == "model" and tau == TASK.STEPS - 1:  # one token per step: only the last uses z_tau
            assert ((batch.unmask_step >= tau).sum(1) == 1).all()


@pytest.mark.parametrize("tau_per", ["batch", "sample"])
def test_z_tau_reveals_exactly_the_tokens_decoded_at_or_before_tau(model, tokenizer, tau_per):
    batch, cfg = prepared(model, tokenizer, mode="joint", tau_per=tau_per, num_iterations=6, beta=0.0)
    tau, T = batch.extra["tau"], batch.nfe
    assert ((0 <= tau) & (tau < T[:, None])).all() if tau_per == "sample" else (tau < T.max()).all()
    assert (tau == tau[:1]).all() if tau_per == "batch" else not (tau == tau[:1]).all()
    inputs = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: inputs.append(kw["input_ids"].clone()), with_kwargs=True)
    try:
        for n in range(6):
            diffpo._surrogate(model, batch, n, cfg)
    finally:
        hook.remove()
    B, P, mask_id = len(batch), batch.prompt_ids.shape[1], model.config.mask_token_id
    revealed = []
    for n, ids in enumerate(inputs):
        assert ids.shape[0] == 2 * B and (ids[:B, P:] == mask_id).all()  # the prompt-only pass
        torch.testing.assert_close(ids[B:, :P], batch.prompt_ids)  # p_mask_z = 0: the z pass sees the prompt
        before = batch.unmask_step < tau[:, n, None]
        assert torch.equal(ids[B:, P:], torch.where(before, batch.completion, mask_id))
        revealed.append(before.sum(1))
    order = tau.argsort(1)  # |z_tau| is non-decreasing in tau
    sizes = torch.stack(revealed, 1).gather(1, order)
    assert (sizes[:, 1:] >= sizes[:, :-1]).all()


def test_importance_weight_is_truncated_positive_and_carries_no_gradient(model, tokenizer):
    batch, cfg = prepared(model, tokenizer, mode="model", num_iterations=1, beta=0.0, is_cap=1.0)
    loss, metrics = diffpo.loss(model, model, batch, cfg)
    logp, _ = diffpo._surrogate(model, batch, 0, cfg)
    raw = torch.exp(logp.detach() - batch.logp)
    w = raw.clamp(max=1.0)
    m, adv = batch.completion_mask.float(), batch.extra["advantages"][:, None]
    assert (w > 0).all() and (raw > 1).any() and (raw < 1).any()
    assert metrics["is_truncated"] == pytest.approx(((raw >= 1) * m).sum().item() / m.sum().item())
    assert loss.item() == pytest.approx(-(m * w * adv).sum().item() / m.sum().item(), abs=1e-6)  # rho = 1
    # the gradient is REINFORCE weighted by the constant w: no term from d w / d theta
    reinforce = -(m * w * adv * logp).sum() / m.sum()
    for g, want in zip(torch.autograd.grad(loss, params(model)), torch.autograd.grad(reinforce, params(model))):
        torch.testing.assert_close(g, want, rtol=1e-5, atol=1e-7)
    untruncated_cfg = diffpo.Config(mode="model", num_iterations=1, beta=0.0, is_cap=math.inf)
    _, untruncated = diffpo.loss(model, model, batch, untruncated_cfg)
    assert untruncated["is_weight"] == pytest.approx(((raw * m).sum() / m.sum()).item(), rel=1e-5)
    assert untruncated["is_truncated"] == 0


def test_ratio_is_one_at_the_first_inner_step_for_both_terms(model, tokenizer):
    batch, cfg = prepared(model, tokenizer, mode="joint", num_iterations=3, p_mask=0.15)
    for n in range(3):
        batch.iteration = n
        _, metrics = diffpo.loss(model, model, batch, cfg)
        assert metrics["ratio"] == pytest.approx(1.0, abs=1e-6) and metrics["gamma_ratio"] == pytest.approx(1.0, abs=1e-6)
        assert metrics["clip_fraction"] == 0 and metrics["kl"] == pytest.approx(0.0, abs=1e-7)  # ref = policy
    # without prompt masking the frozen threshold log-prob is the rollout's record
    batch, _ = prepared(model, tokenizer, mode="joint", num_iterations=2, p_mask=0.0)
    torch.testing.assert_close(batch.extra["old_gamma_logp"][:, 0], batch.extra["gamma_logp"], rtol=0, atol=1e-6)


def _leaf_grads(monkeypatch, model, batch, cfg, token=None, gamma=None):
    leaves = [None if v is None else v.clone().requires_grad_(True) for v in (token, gamma)]
    monkeypatch.setattr(diffpo, "_surrogate", lambda *a: tuple(leaves))
    diffpo.loss(model, model, batch, cfg)[0].backward()
    monkeypatch.undo()
    return [None if v is None else v.grad for v in leaves]


def test_clipping_zeroes_the_gradient_outside_the_trust_region(monkeypatch, model, tokenizer):
    batch, cfg = prepared(model, tokenizer, mode="joint", num_iterations=2, beta=0.0, epsilon=0.2)
    old, old_g = batch.extra["old_logp"][:, 0], batch.extra["old_gamma_logp"][:, 0]
    shift = torch.linspace(-0.5, 0.5, old.shape[1]).expand_as(old)  # ratios e^-0.5 .. e^0.5
    shift_g = torch.linspace(-0.5, 0.5, len(batch))
    grad, grad_g = _leaf_grads(monkeypatch, model, batch, cfg, old + shift, old_g + shift_g)
    adv, m = batch.extra["advantages"], batch.completion_mask.float()
    w = torch.exp(old - batch.logp).clamp(max=cfg.is_cap)
    for g, ratio, a, want_scale in ((grad, torch.exp(shift), adv[:, None].expand_as(shift), w * m / m.sum()),
                                    (grad_g, torch.exp(shift_g), adv, torch.full_like(adv, 1 / len(batch)))):
        clipped = ((a > 0) & (ratio > 1.2)) | ((a < 0) & (ratio < 0.8))
        assert clipped.any() and (~clipped).any()
        assert (g[clipped] == 0).all()
        torch.testing.assert_close(g[~clipped], (-a * ratio * want_scale)[~clipped])


def test_zero_advantage_groups_give_zero_gradient_for_both_terms(model, tokenizer):
    equal = torch.tensor([0.3] * 4 + [1.0] * 4)
    batch, cfg = prepared(model, tokenizer, rewards=equal, mode="joint", num_iterations=1, beta=0.0)
    assert batch.extra["advantages"].abs().max() == 0
    grads = torch.autograd.grad(diffpo.loss(model, model, batch, cfg)[0], params(model), allow_unused=True)
    assert all(g is None or (g == 0).all() for g in grads)
    batch, cfg = prepared(model, tokenizer, mode="sampler", num_iterations=1)  # distinct rewards: a real signal
    assert any((g != 0).any() for g in torch.autograd.grad(diffpo.loss(model, model, batch, cfg)[0], params(model)))


def test_threshold_token_is_a_distribution_over_the_grid_and_drives_eb(model, tokenizer):
    cfg = diffpo.Config(mode="joint")
    M = len(cfg.gamma_grid)
    ids = diffpo.gamma_token_ids(model.config, M)
    special = {tokenizer.mask_token_id, tokenizer.pad_token_id, tokenizer.eos_token_id}
    assert len(set(ids.tolist())) == M and not special & set(ids.tolist())
    assert ids.tolist() == [i for i in range(model.config.vocab_size) if i not in special][-M:]
    batch = sampled(model, tokenizer, cfg, temperature=0.9)
    canvas = torch.zeros_like(batch.completion)
    logits = step_logits(model, batch.prompt_ids, batch.prompt_mask, canvas, canvas, 0)
    logp = diffpo.gamma_log_probs(model, logits, cfg)
    torch.testing.assert_close(logp.exp().sum(-1), torch.ones(len(batch)))
    g = batch.extra["gamma_index"]
    torch.testing.assert_close(batch.extra["gamma_logp"], logp.gather(1, g[:, None]).squeeze(1))
    # replay: draw g the same way, then EB at gamma_grid[g] reproduces the rollout
    gen, sampler = torch.Generator().manual_seed(0), SamplerConfig(temperature=0.9, decoding="eb").resolve(TASK)
    redrawn = torch.multinomial(logp.exp(), 1, generator=gen).squeeze(1)
    assert torch.equal(redrawn, g)
    traj = generate(model, batch.prompt_ids, batch.prompt_mask, sampler, gen,
                    eb_gamma=torch.tensor(cfg.gamma_grid)[g])
    assert torch.equal(traj.completion, batch.completion) and torch.equal(traj.nfe, batch.nfe)
    greedy = sampled(model, tokenizer, cfg, temperature=0.0)
    assert torch.equal(greedy.extra["gamma_index"], logp.argmax(-1))


@pytest.mark.parametrize("mode", ["model", "joint"])
def test_nfe_counts_sampler_steps_and_the_threshold_pass_separately(model, tokenizer, mode):
    calls = []
    hook = model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        ids, mask = encode_prompts(tokenizer, [TASK.prompt(e) for e in TASK.load("test")[:4]])
        sampler = SamplerConfig(temperature=0.9).resolve(TASK)
        traj = diffpo.sample(model, model, ids, mask, sampler, torch.Generator().manual_seed(0), diffpo.Config(mode=mode))
    finally:
        hook.remove()
    assert len(calls) == traj.forward_passes + (mode != "model")
    assert torch.equal(traj.nfe, traj.unmask_step.max(1).values + 1)
    assert traj.forward_passes == int(traj.nfe.max())
    if mode == "model":
        assert (traj.nfe == TASK.STEPS).all()


def test_nfe_penalty_enters_the_reward_before_group_centring(model, tokenizer):
    batch, cfg = prepared(model, tokenizer, mode="joint", num_iterations=1, nfe_penalty=0.5)
    want = group_centered(batch.rewards - 0.5 * batch.nfe.float() / batch.completion.shape[1], batch.group)
    torch.testing.assert_close(batch.extra["advantages"], want)
    assert len(set(batch.nfe.tolist())) > 1  # the penalty differs between rows


def test_gradient_accumulation_with_the_threshold_term(model, tokenizer):
    batch, cfg = prepared(model, tokenizer, mode="joint", num_iterations=2)
    batch.iteration = 1
    grads = []
    for size in (8, 3):
        model.zero_grad()
        for mb in batch.micro_batches(size):
            diffpo.loss(model, model, mb, cfg)[0].backward()
        grads.append([p.grad.clone() for p in params(model)])
    model.zero_grad()
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_bad_mode_names_the_choices():
    with pytest.raises(ValueError, match="mode='fast'; choose one of model, sampler, joint"):
        diffpo.Config(mode="fast")
