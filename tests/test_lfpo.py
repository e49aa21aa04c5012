"""LFPO invariants (spec lfpo_agrpo.md §2.7 items 1-7) and the reward map of §2.2."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

import benchmarks
from algorithms import lfpo
from harness import runs
from harness.sampler import SamplerConfig, generate
from harness.train import TrainConfig, train
from tests.conftest import make_batch, make_model

MIXINGS = ["logit", "prob"]


def prepared(policy, ref, tokenizer, **fields):
    cfg = lfpo.Config(**fields)
    return lfpo.prepare(policy, ref, make_batch(policy, tokenizer), cfg), cfg


def policy_ce(model, batch, cfg):
    """(c / beta) x the mean over states of the mean CE of the policy at the state's masked positions."""
    t, K = batch.extra["state_step"], cfg.num_states
    logits = lfpo._state_logits(model, batch, t)
    ce = -torch.log_softmax(logits, -1).gather(-1, batch.completion.repeat_interleave(K, 0)[..., None]).squeeze(-1)
    masked = (batch.unmask_step.repeat_interleave(K, 0) >= t.flatten()[:, None]).float()
    return cfg.adv_clip / cfg.beta * ((ce * masked).sum(-1) / masked.sum(-1)).mean()


def old_log_probs(ref, batch, cfg):
    """[B K, L, V] theta_old's log-probs on the batch's states, as `loss` recomputes them from `ref`."""
    with torch.no_grad():
        return torch.log_softmax(lfpo._state_logits(ref, batch, batch.extra["state_step"]), -1)


@pytest.mark.parametrize("mixing", MIXINGS)
@pytest.mark.parametrize("beta", [1.0, 0.3])
def test_value_at_theta_old_is_scaled_ce_whatever_r(model, tokenizer, mixing, beta):
    twin = copy.deepcopy(model)  # theta_old = theta, held in a separate module as in the loop
    batch, cfg = prepared(model, twin, tokenizer, mixing=mixing, beta=beta)
    want, sampled_r = policy_ce(model, batch, cfg).item(), batch.extra["r"]
    for r in (sampled_r, torch.zeros(len(batch)), torch.ones(len(batch))):
        batch.extra["r"] = r
        assert lfpo.loss(model, twin, batch, cfg)[0].item() == pytest.approx(want, rel=1e-5)
    batch.extra["r"] = sampled_r  # the old logits come from `ref`: another old model moves the value
    assert lfpo.loss(model, make_model(tokenizer, seed=1), batch, cfg)[0].item() != pytest.approx(want, rel=1e-3)


def _logit_grad(monkeypatch, policy, ref, batch, cfg, logits):
    """d loss / d z_theta at z_theta = `logits` (the policy's logits replaced by a leaf; ref's are its own)."""
    leaf, real = logits.clone().requires_grad_(True), lfpo._state_logits
    monkeypatch.setattr(lfpo, "_state_logits", lambda model, *a: leaf if model is policy else real(model, *a))
    lfpo.loss(policy, ref, batch, cfg)[0].backward()
    monkeypatch.undo()
    return leaf.grad


@pytest.mark.parametrize("mixing", MIXINGS)
def test_gradient_at_theta_old_is_the_advantage_weighted_ce_gradient(monkeypatch, model, tokenizer, mixing):
    """d loss / d z_theta = (c / beta) beta (2r - 1)(p_old - e_y) / (|M| B K) at each masked position; beta cancels."""
    policy = make_model(tokenizer, seed=1)  # its logits are replaced by theta_old's: theta = theta_old in logit space
    batch, cfg = prepared(policy, model, tokenizer, mixing=mixing, beta=0.5)
    B, K = len(batch), cfg.num_states
    old = old_log_probs(model, batch, cfg)
    grad = _logit_grad(monkeypatch, policy, model, batch, cfg, old)
    target = torch.nn.functional.one_hot(batch.completion.repeat_interleave(K, 0), old.shape[-1]).float()
    masked = (batch.unmask_step.repeat_interleave(K, 0) >= batch.extra["state_step"].flatten()[:, None]).float()
    r = batch.extra["r"].repeat_interleave(K)[:, None, None]
    scale = (masked / masked.sum(-1, keepdim=True))[..., None] / (B * K)
    want = cfg.adv_clip * (2 * r - 1) * (old.exp() - target) * scale
    torch.testing.assert_close(grad, want, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("mixing", MIXINGS)
def test_r_one_half_gives_zero_gradient_at_theta_old_and_a_restoring_force_away(monkeypatch, model, tokenizer, mixing):
    twin = copy.deepcopy(model)
    batch, cfg = prepared(model, twin, tokenizer, mixing=mixing)
    def largest_gradient():
        return max(g.abs().max() for g in torch.autograd.grad(lfpo.loss(model, twin, batch, cfg)[0],
                                                              list(model.parameters())))

    signal = largest_gradient()
    batch.extra["r"] = torch.full((len(batch),), 0.5)
    half = largest_gradient()
    assert signal > 1 and half < 1e-6 * signal  # zero up to float rounding
    # Away from theta_old, g . delta >= 0 at every position (pulled back to old): for any delta in logit space
    # (log-sum-exp is convex), only for small delta in probability space (at delta ~ N(0, 0.5^2) about 9% of
    # positions are pushed away there, measured on a toy).
    old = old_log_probs(twin, batch, cfg)
    delta = (0.5 if mixing == "logit" else 0.01) * torch.randn(old.shape, generator=torch.Generator().manual_seed(0))
    grad = _logit_grad(monkeypatch, model, twin, batch, cfg, old + delta)
    along = torch.where(torch.isfinite(old), grad * delta, 0).sum(-1)
    assert (along >= -1e-6 * along.abs().max()).all() and along.sum() > 0


def test_beta_one_and_r_one_is_masked_diffusion_sft_on_the_trajectories(tokenizer):
    policy, old = make_model(tokenizer, seed=0), make_model(tokenizer, seed=1)  # the old policy plays no part
    batch, cfg = prepared(policy, old, tokenizer, beta=1.0)
    batch.extra["r"] = torch.ones(len(batch))
    loss = lfpo.loss(policy, old, batch, cfg)[0]
    sft = policy_ce(policy, batch, cfg)
    assert loss.item() == pytest.approx(sft.item(), rel=1e-6)
    for g, want in zip(torch.autograd.grad(loss, list(policy.parameters())),
                       torch.autograd.grad(sft, list(policy.parameters()))):
        torch.testing.assert_close(g, want, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("mixing", MIXINGS)
def test_toy_bandit_learns_the_rewarded_arm(mixing):
    """Item 5: a 5-armed softmax bandit, G = 8 pulls from the EMA old policy, alpha = 0.5: p(best) 0.2 -> ~1."""
    cfg = lfpo.Config(mixing=mixing)
    V, best, G = 5, 2, 8
    z, z_old = torch.zeros(V, requires_grad=True), torch.zeros(V)
    never = torch.tensor([float("-inf")])  # column V plays the mask token
    opt, gen = torch.optim.Adam([z], lr=0.05), torch.Generator().manual_seed(0)
    for _ in range(200):
        arms = torch.multinomial(torch.softmax(z_old, -1), G, replacement=True, generator=gen)
        r = lfpo.optimality((arms == best).float(), torch.zeros(G, dtype=torch.long), cfg)
        pos, neg = lfpo.implicit_log_probs(torch.log_softmax(torch.cat([z_old, never]), -1).expand(G, V + 1),
                                           torch.cat([z, never]).expand(G, V + 1), cfg, V)
        pick = arms[:, None]
        loss = cfg.adv_clip / cfg.beta * (-r * pos.gather(1, pick).squeeze(1) - (1 - r) * neg.gather(1, pick).squeeze(1))
        opt.zero_grad()
        loss.mean().backward()
        opt.step()
        with torch.no_grad():
            z_old.mul_(0.5).add_(z, alpha=0.5)
    assert torch.softmax(z, -1)[best] > 0.95


def test_reward_map_numbers():
    rewards, group = torch.tensor([1.0, 0, 0, 0, 0.5, 0.5, 0.5, 0.5]), torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    r = lfpo.optimality(rewards, group, lfpo.Config())  # A = (R - 0.25) / (0.4330 + 1e-4), c = 5
    torch.testing.assert_close(r, torch.tensor([0.673165, 0.442278, 0.442278, 0.442278, 0.5, 0.5, 0.5, 0.5]))
    r = lfpo.optimality(rewards, group, lfpo.Config(adv_clip=1.0))  # A = 1.73 clipped to 1 -> r = 1
    torch.testing.assert_close(r, torch.tensor([1.0, 0.211392, 0.211392, 0.211392, 0.5, 0.5, 0.5, 0.5]))
    raw = lfpo.optimality(torch.tensor([1.0, 0.0, 1.7, -0.2]), torch.tensor([0, 0, 1, 1]), lfpo.Config(reward_map="raw"))
    assert raw.tolist() == [1.0, 0.0, 1.0, 0.0]


def test_ema_alpha_one_freezes_alpha_zero_copies_and_the_ramp(tokenizer):
    policy = make_model(tokenizer, seed=0)
    for cfg, step, alpha in ((lfpo.Config(ema_ramp=float("inf"), ema_max=1.0), 7, 1.0),
                             (lfpo.Config(ema_ramp=0.0), 7, 0.0), (lfpo.Config(ema_ramp=0.1, ema_max=0.5), 3, 0.3),
                             (lfpo.Config(ema_ramp=0.1, ema_max=0.5), 9, 0.5)):
        ref = make_model(tokenizer, seed=1)
        before = [p.clone() for p in ref.parameters()]
        lfpo.after_step(policy, ref, step, cfg)
        for old, new, p in zip(before, ref.parameters(), policy.parameters()):
            if alpha in (0.0, 1.0):
                assert torch.equal(new, p if alpha == 0 else old)
            else:
                torch.testing.assert_close(new, alpha * old + (1 - alpha) * p)


def test_rollouts_come_from_the_old_policy(tokenizer):
    policy, old = make_model(tokenizer, seed=0), make_model(tokenizer, seed=1)
    task = benchmarks.get("arithmetic")
    batch = make_batch(policy, tokenizer)
    cfg = SamplerConfig(temperature=1.0).resolve(task)
    args = (batch.prompt_ids, batch.prompt_mask, cfg)
    traj = lfpo.sample(policy, old, *args, torch.Generator().manual_seed(0), lfpo.Config())
    assert torch.equal(traj.completion, generate(old, *args, torch.Generator().manual_seed(0)).completion)
    assert not torch.equal(traj.completion, generate(policy, *args, torch.Generator().manual_seed(0)).completion)


def test_the_loop_keeps_a_frozen_old_policy_frozen_and_moves_the_default_one(trained_dir, tmp_path):
    settings = dict(algo="lfpo", task="sudoku", model=str(trained_dir), steps=1, prompts_per_step=2, group_size=4,
                    micro_batch_size=4, eval_every=1, eval_limit=4, lr=1e-3)
    refs = []
    for name, cfg in (("frozen", lfpo.Config(ema_ramp=float("inf"), ema_max=1.0)), ("ema", lfpo.Config())):
        run = train(TrainConfig(out=str(tmp_path / name), **settings), cfg)
        refs.append(runs.load_state(run / "checkpoint")["ref"])
    initial = load_file(trained_dir / "model.safetensors")
    assert all(torch.equal(refs[0][k], initial[k]) for k in initial)
    assert any(not torch.equal(refs[1][k], initial[k]) for k in initial)


@pytest.mark.parametrize("steps", [8, 5, 3, 1])
def test_one_sampled_step_per_stratum_all_before_t_i(steps):
    K, n = 4, 500
    t = lfpo.stratified_steps(torch.full((n,), steps), K, torch.Generator().manual_seed(0))
    k = torch.arange(K)
    assert ((0 <= t) & (t < steps)).all()
    assert (t >= (k * steps) // K).all() and (t <= -(-(k + 1) * steps // K) - 1).all()  # floor(kT/K)..ceil((k+1)T/K)-1
    if steps % K == 0:  # equal integer strata: exactly one step in each
        assert torch.equal(t // (steps // K), k.expand_as(t))
    assert set(t.flatten().tolist()) == set(range(steps))  # every step can be drawn


def test_states_are_the_sampler_states_rebuilt_from_tokens_and_unmask_steps(model, tokenizer):
    batch = make_batch(model, tokenizer)
    task = benchmarks.get("arithmetic")
    P = batch.prompt_ids.shape[1]
    states = []
    generate(model, batch.prompt_ids, batch.prompt_mask, SamplerConfig(temperature=1.0).resolve(task),
             torch.Generator().manual_seed(0), on_step=lambda step, x: states.append(x[:, P:]))
    policy, old, inputs = copy.deepcopy(model), copy.deepcopy(model), {}
    for name, m in (("policy", policy), ("old", old)):
        m.register_forward_pre_hook(lambda m, a, kw, name=name: inputs.setdefault(name, []).append(kw["input_ids"]),
                                    with_kwargs=True)
    cfg = lfpo.Config(num_states=3)
    batch = lfpo.prepare(policy, old, batch, cfg)
    assert inputs == {}  # prepare runs no forward: theta_old's logits are recomputed in `loss`
    lfpo.loss(policy, old, batch, cfg)
    assert len(inputs["policy"]) == len(inputs["old"]) == 1  # one pass each on the micro-batch's K states
    t = batch.extra["state_step"]
    for fed in (inputs["policy"][0][:, P:].unflatten(0, t.shape), inputs["old"][0][:, P:].unflatten(0, t.shape)):
        for i in range(len(batch)):
            for k in range(3):
                assert torch.equal(fed[i, k], states[int(t[i, k])][i])


def test_bad_choice_names_the_options():
    with pytest.raises(ValueError, match="mixing='velocity'; choose one of logit, prob"):
        lfpo.Config(mixing="velocity")
    with pytest.raises(ValueError, match="beta=0"):
        replace(lfpo.Config(), beta=0)
