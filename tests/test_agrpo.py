"""AGRPO invariants (spec lfpo_agrpo.md §1.7 items 1-9; state rebuilding itself is tested in test_sampler.py)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import benchmarks
from algorithms import agrpo
from harness.rollout import group_centered, rollout
from harness.sampler import SamplerConfig, generate
from tests.conftest import make_model, reward_climb

TASK = benchmarks.get("arithmetic")


def sampled(model, tokenizer, temperature=0.6, seed=0, prompts=2, group=4, **sampler):
    """A rollout batch from agrpo.sample (random unmasking), rewards replaced by distinct seeded values."""
    cfg = replace(SamplerConfig(temperature=temperature).resolve(TASK), **sampler)
    batch, _ = rollout(model, tokenizer, TASK, TASK.load("test")[:prompts], cfg, group,
                       torch.Generator().manual_seed(seed),
                       sample=lambda m, ids, mask, c, g: agrpo.sample(m, None, ids, mask, c, g, agrpo.Config()))
    batch.rewards = torch.rand(len(batch), generator=torch.Generator().manual_seed(seed + 1))
    batch.seed = seed
    return batch


def prepared(model, tokenizer, temperature=0.6, **cfg):
    cfg = agrpo.Config(**cfg)
    return agrpo.prepare(model, model, sampled(model, tokenizer, temperature), cfg), cfg


def grads(loss, model):
    return torch.autograd.grad(loss, list(model.parameters()))


def test_sample_is_the_shared_sampler_with_random_unmasking(model, tokenizer):
    ids, mask = torch.tensor([[5, 6, 7]] * 3), torch.ones(3, 3, dtype=torch.bool)
    cfg = SamplerConfig(temperature=0.6).resolve(TASK)
    traj = agrpo.sample(model, None, ids, mask, cfg, torch.Generator().manual_seed(1), agrpo.Config())
    want = generate(model, ids, mask, replace(cfg, remasking="random"), torch.Generator().manual_seed(1))
    assert torch.equal(traj.completion, want.completion) and torch.equal(traj.unmask_step, want.unmask_step)
    with pytest.raises(ValueError, match="decoding='steps'"):
        agrpo.sample(model, None, ids, mask, replace(cfg, decoding="threshold"), None, agrpo.Config())


def test_the_batch_carries_the_rollout_temperature_into_every_micro_batch(model, tokenizer):
    """`rollout` records the sampler's temperature (Batch.temperature), the one the loss scores at."""
    batch = sampled(model, tokenizer, temperature=0.6)
    assert batch.temperature == 0.6 and [mb.temperature for mb in batch.micro_batches(3)] == [0.6] * 3


@pytest.mark.parametrize("temperature", [0.6, 1.0])
def test_replayed_step_logp_gives_ratio_one_at_every_step(model, tokenizer, temperature):
    """Item 2: at theta = theta_old the rebuilt states replay the recorded log-probs, so rho = 1."""
    batch, cfg = prepared(model, tokenizer, temperature, beta=0.0)
    T = int(batch.unmask_step.max()) + 1
    steps = torch.arange(T).expand(len(batch), T)
    logp = agrpo._step_logp(model, batch, steps)  # every step of every row
    committed = batch.unmask_step[:, None, :] == steps[..., None]
    torch.testing.assert_close(logp[committed], batch.logp[:, None, :].expand_as(logp)[committed], rtol=0, atol=1e-5)
    _, metrics = agrpo.loss(model, model, batch, cfg)
    assert metrics["ratio"] == pytest.approx(1.0, abs=1e-5) and metrics["clip_fraction"] == 0.0


def test_uniform_first_step_loss_is_zero_and_gradient_is_reinforce(model, tokenizer):
    """Items 3 and 5: with rho = 1, one token per step and uniform steps, the loss is -mean(A) = 0, and the
    gradient is -(1/(M B)) sum_{i,m} w A_i sum_{k committed at t_im} grad log pi."""
    for mode in ("uniform", "entropy"):
        batch, cfg = prepared(model, tokenizer, importance_sampling=mode, mc_samples=3)
        loss, _ = agrpo.loss(model, model, batch, cfg)
        if mode == "uniform":
            assert loss.item() == pytest.approx(0.0, abs=1e-6)
        steps, w = batch.extra["mc_steps"][:, 0], batch.extra["is_weights"][:, 0]
        logp = agrpo._step_logp(model, batch, steps)
        committed = batch.unmask_step[:, None, :] == steps[..., None]
        A = batch.extra["advantages"]
        reinforce = -((w * A[:, None])[..., None] * logp * committed).sum() / (3 * len(batch))
        got, want = grads(loss, model), grads(reinforce, model)
        assert any(g.abs().sum() > 0 for g in got)
        for g, h in zip(got, want):
            torch.testing.assert_close(g, h, rtol=1e-4, atol=1e-7)


def test_equal_rewards_give_exactly_zero_gradient(model, tokenizer):
    """Item 4."""
    batch, cfg = prepared(model, tokenizer)
    batch.extra["advantages"] = group_centered(torch.full((len(batch),), 0.3), batch.group)
    assert all((g == 0).all() for g in grads(agrpo.loss(model, model, batch, cfg)[0], model))


def _grad_wrt_logp(monkeypatch, model, batch, cfg, logp_value):
    leaf = logp_value.clone().requires_grad_(True)
    monkeypatch.setattr(agrpo, "step_logp", lambda *a, **k: leaf)
    loss, metrics = agrpo.loss(model, model, batch, cfg)
    loss.backward()
    return leaf.grad, metrics


def test_clipping_zeroes_the_gradient_outside_the_trust_region(monkeypatch, model, tokenizer):
    """Item 6 (entropy-IS weights included)."""
    batch, cfg = prepared(model, tokenizer, mc_samples=2, epsilon=0.2)
    B, M, L = len(batch), 2, batch.completion.shape[1]
    old = batch.logp.repeat_interleave(M, 0)
    shift = torch.linspace(-0.5, 0.5, B * M * L).view(B * M, L)  # ratios from e^-0.5 to e^0.5
    grad, _ = _grad_wrt_logp(monkeypatch, model, batch, cfg, old + shift)
    ratio = torch.exp(shift)
    adv = batch.extra["advantages"].repeat_interleave(M)[:, None].expand_as(ratio)
    w = batch.extra["is_weights"][:, 0].reshape(-1, 1).expand_as(ratio)
    committed = batch.unmask_step.repeat_interleave(M, 0) == batch.extra["mc_steps"][:, 0].reshape(-1, 1)
    clipped = ((adv > 0) & (ratio > 1.2)) | ((adv < 0) & (ratio < 0.8))
    assert (clipped & committed).any() and (~clipped & committed).any()
    assert (grad[clipped | ~committed] == 0).all()
    keep = ~clipped & committed
    torch.testing.assert_close(grad[keep], (-adv * ratio * w / (M * B))[keep])


def test_rho_weighted_k3_value_and_gradient(monkeypatch, model, tokenizer):
    """KL term: beta * rho * k3 with gradient through rho and k3; zero when policy = reference."""
    batch, cfg = prepared(model, tokenizer, beta=1.0, mc_samples=2)
    assert agrpo.loss(model, model, batch, cfg)[1]["kl"] == pytest.approx(0.0, abs=1e-6)  # ref is the same model
    batch.extra["advantages"] = torch.zeros(len(batch))  # isolate the KL term
    B, M = len(batch), 2
    ref = batch.extra["ref_logp"][:, 0].reshape(B * M, -1)
    old = batch.logp.repeat_interleave(M, 0)
    logp = ref + torch.linspace(-1, 1, ref.numel()).view_as(ref)
    grad, metrics = _grad_wrt_logp(monkeypatch, model, batch, cfg, logp)
    assert metrics["kl"] > 0
    rho, d = torch.exp(logp - old), ref - logp
    want = rho * (torch.exp(d) - d - 1) + rho * (1 - torch.exp(d))  # d/dlogp [rho * k3]
    committed = batch.unmask_step.repeat_interleave(M, 0) == batch.extra["mc_steps"][:, 0].reshape(-1, 1)
    w = batch.extra["is_weights"][:, 0].reshape(-1, 1)
    torch.testing.assert_close(grad, want * w * committed / (M * B))


def test_entropy_weights_make_every_step_count_one_over_T():
    """Item 7 by enumeration: q_i(t) w_i(t) = 1/T_i for every t < T_i, and q_i = 0 beyond T_i."""
    unmask_step = torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0], [0, 0, 1, 1]])
    entropy = torch.tensor([[0.5, 0.0, 2.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.1, 0.2, 0.3, 0.4]])
    T = torch.tensor([3, 4, 2])
    q = agrpo.step_distribution(unmask_step, entropy, T)
    assert q.shape == (3, 4) and (q[0, 3] == 0) and (q[2, 2:] == 0).all()
    torch.testing.assert_close(q.sum(1), torch.ones(3, dtype=torch.float64))
    want = torch.tensor([0.5 + 1e-8, 1e-8, 2.0 + 1e-8], dtype=torch.float64) / (2.5 + 3e-8)
    torch.testing.assert_close(q[0, :3], want)
    t, w = agrpo.draw_steps(T, 50, torch.Generator().manual_seed(0), True, q)
    assert (t < T[:, None]).all() and set(t[1].tolist()) == {0, 1, 2, 3}
    torch.testing.assert_close(w.double() * q.gather(1, t), (1.0 / T[:, None]).double().expand_as(q.gather(1, t)))


def test_uniform_steps_reach_the_last_step_and_low_discrepancy_covers_each_stratum():
    """Items 7-8: floor(u T_i) is uniform on {0..T_i-1} (the last step included: HEAD's off-by-one fix); with
    T_i = S the B*M stratified draws hit every stratum exactly once."""
    T = torch.tensor([1, 2, 3, 5] * 50)
    counts = torch.zeros(4, 5)
    for seed in range(20):
        t, w = agrpo.draw_steps(T, 4, torch.Generator().manual_seed(seed), True)
        assert (w == 1).all() and (t < T[:, None]).all() and (t >= 0).all()
        for j in range(4):
            counts[j] += torch.bincount(t[j::4].flatten(), minlength=5)
    freq = counts / counts.sum(1, keepdim=True)
    for j, Tj in enumerate((1, 2, 3, 5)):
        assert (freq[j, :Tj] - 1 / Tj).abs().max() < 0.03 and freq[j, Tj:].sum() == 0
    S = 6 * 4
    t, _ = agrpo.draw_steps(torch.full((6,), S), 4, torch.Generator().manual_seed(3), True)
    assert sorted(t.flatten().tolist()) == list(range(S))


def test_entropy_draws_follow_q():
    """Item 8: inverse-CDF draws have frequencies q (a chi-square-free check with a large sample)."""
    unmask_step = torch.tensor([[0, 1, 2, 3]] * 4000)
    entropy = torch.tensor([[0.1, 0.6, 0.3, 5.0]]).expand(4000, 4)
    T = torch.full((4000,), 3)
    q = agrpo.step_distribution(unmask_step, entropy, T)
    t, _ = agrpo.draw_steps(T, 2, torch.Generator().manual_seed(0), True, q)
    freq = torch.bincount(t.flatten(), minlength=4).double() / t.numel()
    torch.testing.assert_close(freq, q[0], atol=2e-3, rtol=0)  # stratified: far tighter than iid sampling


@pytest.mark.parametrize("mode", ["uniform", "entropy"])
def test_mc_loss_is_unbiased_for_the_full_step_sum(monkeypatch, model, tokenizer, mode):
    """Item 7: averaged over draws, the M-step estimate equals (1/B) sum_i (1/T_i) sum_{t<T_i} l_{i,t}."""
    batch, cfg = prepared(model, tokenizer, importance_sampling=mode, mc_samples=2, epsilon=0.2)
    L = batch.completion.shape[1]
    shift = 0.3 * torch.sin(torch.arange(len(batch) * L, dtype=torch.float32)).view(len(batch), L)
    # the stub's log-prob differs from the recorded one by a fixed per-position shift: l_{i,t} varies with t
    monkeypatch.setattr(agrpo, "step_logp", lambda m, ids, mask, comp, u, t, temp: (
        batch.logp + shift).repeat_interleave(len(ids) // len(batch), 0))
    ratio, A = torch.exp(shift), batch.extra["advantages"][:, None]
    per_token = -torch.min(ratio * A, ratio.clamp(0.8, 1.2) * A)
    T = batch.extra["T"]
    exact = sum(per_token[i][batch.unmask_step[i] < T[i]].sum() / T[i] for i in range(len(batch))) / len(batch)
    estimates = []
    for seed in range(400):
        batch.seed = seed
        estimates.append(agrpo.loss(model, model, agrpo.prepare(model, model, batch, cfg), cfg)[0].item())
    estimates = torch.tensor(estimates)
    se = estimates.std() / len(estimates) ** 0.5
    assert se > 0 and abs(estimates.mean() - exact) < 4 * se + 1e-6, (estimates.mean(), exact, se)


def test_left_to_right_limit_is_token_level_grpo(tokenizer):
    """Item 9: block length 1 forces left-to-right decoding for every unmasking rule; enumerating all T_i steps
    gives token-level GRPO with 1/|o| normalisation (|o| up to and including the first EOS), no std scaling."""
    old, new = make_model(tokenizer, seed=0), make_model(tokenizer, seed=0)
    with torch.no_grad():
        for p in new.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    batch = sampled(old, tokenizer, temperature=1.0, block_length=1)
    L = batch.completion.shape[1]
    assert (batch.unmask_step == torch.arange(L)).all()
    cfg = agrpo.Config(importance_sampling="uniform", mc_samples=L, epsilon=0.2)
    batch = agrpo.prepare(old, old, batch, cfg)
    T = batch.extra["T"]
    assert torch.equal(T, batch.completion_mask.sum(1))
    batch.extra["mc_steps"] = torch.arange(L).expand(len(batch), 1, L).clone()  # all steps, each once
    batch.extra["is_weights"] = (torch.arange(L) < T[:, None]).float()[:, None, :] * L / T[:, None, None]
    loss, _ = agrpo.loss(new, old, batch, cfg)
    # token-level GRPO by hand: position k is scored on prompt + o_<k + [MASK]*
    mask_id, P = new.config.mask_token_id, batch.prompt_ids.shape[1]
    terms = []
    for i in range(len(batch)):
        for k in range(int(T[i])):
            state = batch.completion[i].clone()
            state[k:] = mask_id
            x = torch.cat([batch.prompt_ids[i], state])[None]
            attn = torch.cat([batch.prompt_mask[i].long(), torch.ones(L, dtype=torch.long)])[None]
            logits = new(input_ids=x, attention_mask=attn).logits[0, P + k].clone()
            logits[mask_id] = -float("inf")
            rho = torch.exp(torch.log_softmax(logits, -1)[batch.completion[i, k]] - batch.logp[i, k])
            A = batch.extra["advantages"][i]
            terms.append(-torch.min(rho * A, rho.clamp(0.8, 1.2) * A) / T[i])
    grpo = torch.stack(terms).sum() / len(batch)
    assert loss.item() == pytest.approx(grpo.item(), abs=1e-6)
    for g, h in zip(grads(loss, new), grads(grpo, new)):
        torch.testing.assert_close(g, h, rtol=1e-4, atol=1e-7)
    lowconf = generate(old, batch.prompt_ids, batch.prompt_mask,
                       SamplerConfig(temperature=1.0, block_length=1).resolve(TASK), torch.Generator().manual_seed(0))
    assert (lowconf.unmask_step == torch.arange(L)).all()


def test_toy_reward_rises(tokenizer):
    """Item 10 (toy bandit): a few updates raise the reward from the random model's level."""
    history = reward_climb(agrpo, agrpo.Config(), tokenizer)
    assert history[-1] > history[0] + 0.2, history
