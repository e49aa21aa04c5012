"""DMPO invariants (spec espo_dmpo.md §B7 items 1-12)."""

from __future__ import annotations

import math

import pytest
import torch

from algorithms import dmpo
from harness.likelihood import exact_elbo
from harness.rollout import encode_prompts
from tests.conftest import make_batch, make_model, reward_climb

GROUP = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
REWARDS = torch.tensor([1.0, 0.0, 0.0, 0.5, 0.2, 0.2, 0.9, 0.0])
LOG_RND = torch.tensor([0.3, -0.2, 0.1, 0.0, -1.0, 0.5, 0.2, 0.4])


def prepared(model, tokenizer, ref=None, **cfg):
    cfg = dmpo.Config(**cfg)
    return dmpo.prepare(model, ref or model, make_batch(model, tokenizer), cfg), cfg


def grads(loss, model):
    return torch.autograd.grad(loss, list(model.parameters()))


def test_weights_are_normalised_per_group_and_baselines_sum_to_zero(model, tokenizer):
    """Item 1 (and item 11: weights per group, whatever else is in the batch)."""
    w_plus, w_minus = dmpo.tilted_weights(LOG_RND, REWARDS, GROUP, 0.5, torch.tensor([1.0, 0.7]))
    for k in (0, 1):
        g = GROUP == k
        assert (w_plus >= 0).all() and (w_minus >= 0).all()
        torch.testing.assert_close(w_plus[g].sum(), torch.tensor(1.0))
        torch.testing.assert_close(w_minus[g].sum(), torch.tensor(1.0))
        c = [1.0, 0.7][k]
        torch.testing.assert_close(w_plus[g], torch.softmax(c * (LOG_RND[g] + REWARDS[g] / 0.5), 0))  # group alone
    for baseline in ("mean", "negative_tilt"):
        batch, _ = prepared(model, tokenizer, baseline=baseline)
        sums = torch.zeros(2).index_add(0, batch.group, batch.extra["weight"])
        assert sums.abs().max() < 1e-6
        if baseline == "mean":
            torch.testing.assert_close(batch.extra["weight"], batch.extra["w_plus"] - 1 / 4)
    batch, _ = prepared(model, tokenizer, baseline="none")
    torch.testing.assert_close(batch.extra["weight"], batch.extra["w_plus"])


def test_equal_rewards_give_zero_weights_and_zero_gradient(model, tokenizer):
    """Item 2: w+ = w- for a group of equal rewards (whatever rho~ is), so w^ = 0 and the gradient vanishes."""
    batch, cfg = make_batch(model, tokenizer), dmpo.Config()
    batch.rewards = torch.tensor([0.5] * 4 + [1.0] * 4)
    ref = make_model(tokenizer, seed=3)
    batch = dmpo.prepare(model, ref, batch, cfg)
    assert batch.extra["log_rnd"].abs().min() > 0  # a different reference: non-uniform weights
    assert batch.extra["w_plus"].std() > 0.01 and batch.extra["weight"].abs().max() < 1e-6
    assert all(g.abs().max() < 1e-7 for g in grads(dmpo.loss(model, ref, batch, cfg)[0], model))


def test_policy_equal_to_reference_gives_zero_log_rnd(tokenizer):
    """Item 3: with shared masks, theta = ref (LoRA B = 0 at init) gives rho~ = 0 exactly, w+ = softmax(c r / alpha)."""
    policy, ref = make_model(tokenizer, seed=0), make_model(tokenizer, seed=0)
    batch, cfg = prepared(policy, tokenizer, ref=ref, alpha=0.5, coeff=0.8)
    assert torch.equal(batch.extra["log_rnd"], torch.zeros(len(batch)))
    for k in (0, 1):
        g = batch.group == k
        torch.testing.assert_close(batch.extra["w_plus"][g], torch.softmax(0.8 * batch.rewards[g] / 0.5, 0))
    other = dmpo.prepare(policy, make_model(tokenizer, seed=1), make_batch(policy, tokenizer), cfg)
    assert other.extra["log_rnd"].abs().min() > 0  # a different reference does move it


def test_limits_of_alpha_and_c():
    """Item 4: alpha -> inf gives softmax(c rho~) and w^ -> 0; alpha -> 0 gives uniform weight on the best (w+) and
    the worst (w-) samples; c = 0 gives uniform weights."""
    one = torch.ones(2)
    w_plus, w_minus = dmpo.tilted_weights(LOG_RND, REWARDS, GROUP, 1e9, one)
    torch.testing.assert_close(w_plus, dmpo.group_softmax(LOG_RND, GROUP))
    torch.testing.assert_close(w_plus - w_minus, torch.zeros(8), atol=1e-7, rtol=0)
    w_plus, w_minus = dmpo.tilted_weights(torch.zeros(8), torch.zeros(8), GROUP, 1e9, one)
    torch.testing.assert_close(w_plus, torch.full((8,), 0.25))  # theta = ref: uniform
    w_plus, w_minus = dmpo.tilted_weights(torch.zeros(8), REWARDS, GROUP, 1e-4, one)
    torch.testing.assert_close(w_plus, torch.tensor([1.0, 0, 0, 0, 0, 0, 1.0, 0]))
    torch.testing.assert_close(w_minus, torch.tensor([0, 0.5, 0.5, 0, 0, 0, 0, 1.0]))  # tied samples share it
    w_plus, w_minus = dmpo.tilted_weights(LOG_RND, REWARDS, GROUP, 1e-4, one)  # ... in proportion to e^rho~
    torch.testing.assert_close(w_minus[1:3], torch.softmax(LOG_RND[1:3], 0))
    w_plus, w_minus = dmpo.tilted_weights(LOG_RND, REWARDS, GROUP, 0.04, torch.zeros(2))
    assert (w_plus == 0.25).all() and (w_minus == 0.25).all()


def test_invariance_to_reward_shift_and_equivalence_of_scale_and_alpha():
    """Item 5."""
    c = torch.tensor([1.0, 0.6])
    base = dmpo.tilted_weights(LOG_RND, REWARDS, GROUP, 0.3, c)
    shifted = dmpo.tilted_weights(LOG_RND, REWARDS + torch.tensor([5.0, -2.0])[GROUP], GROUP, 0.3, c)
    scaled = dmpo.tilted_weights(LOG_RND, 4 * REWARDS, GROUP, 1.2, c)
    for a, b, s in zip(base, shifted, scaled):
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(a, s)


def test_adaptive_c_hits_the_target_ess():
    """Item 6: the ESS of w+ matches the threshold unless c sits at a bound of [0.01, 0.99]."""
    for threshold in (0.5, 0.7, 0.9):
        c = dmpo.find_coeff(LOG_RND[:4], REWARDS[:4], 0.5, threshold)
        w = torch.softmax(c * (LOG_RND[:4] + REWARDS[:4] / 0.5), 0)
        assert 0.01 <= c <= 0.99 and dmpo.ess(w) == pytest.approx(threshold, abs=1e-3)
    c = dmpo.find_coeff(LOG_RND[:4], REWARDS[:4], 0.04, 0.7)  # r/alpha gaps of 25: ESS is flat at c = 0.5
    assert dmpo.ess(torch.softmax(c * (LOG_RND[:4] + REWARDS[:4] / 0.04), 0)) == pytest.approx(0.7, abs=1e-6)
    assert dmpo.find_coeff(LOG_RND[:4], REWARDS[:4], 0.001, 0.9) == 0.01  # unreachable: the nearer bound
    assert dmpo.find_coeff(LOG_RND[:4], REWARDS[:4], 100.0, 0.5) == 0.99
    assert dmpo.ess(torch.full((4,), 0.25)) == 1.0 and dmpo.ess(torch.tensor([1.0, 0, 0, 0])) == 0.25


def test_adaptive_c_in_prepare_is_per_group(model, tokenizer):
    batch, cfg = prepared(model, tokenizer, ada_coeff=True, ess_threshold=0.8, alpha=1.0)
    for k in (0, 1):
        g = batch.group == k
        c = dmpo.find_coeff(batch.extra["log_rnd"][g], batch.rewards[g], 1.0, 0.8)
        assert torch.allclose(batch.extra["coeff"][g], torch.tensor(c))
        assert dmpo.ess(batch.extra["w_plus"][g]) == pytest.approx(batch.extra["ess"][g][0].item())


def test_one_hot_weights_reduce_wdce_to_masked_diffusion_sft(model, tokenizer):
    """Item 7: w^ = e_j gives (1/R) sum_r (1/m_r) sum_{masked} -log p(y_j) / n_groups, computed here by hand."""
    batch, cfg = prepared(model, tokenizer, baseline="none", num_replicates=2)
    j = 5
    batch.extra["weight"] = torch.nn.functional.one_hot(torch.tensor(j), len(batch)).float()
    loss, _ = dmpo.loss(model, model, batch, cfg)
    L, P, mask_id = batch.completion.shape[1], batch.prompt_ids.shape[1], model.config.mask_token_id
    masks = dmpo.replicate_masks(batch.extra["loss_seeds"][j:j + 1, 0], L, 2)[0]
    want = 0.0
    for masked in masks:
        x = torch.cat([batch.prompt_ids[j], torch.where(masked, mask_id, batch.completion[j])])[None]
        attn = torch.cat([batch.prompt_mask[j].long(), torch.ones(L, dtype=torch.long)])[None]
        logits = model(input_ids=x, attention_mask=attn).logits[0, P:].clone()
        logits[:, mask_id] = -torch.inf
        ce = torch.nn.functional.cross_entropy(logits, batch.completion[j], reduction="none")
        want += (ce * masked).sum() / max(int(masked.sum()), 1) / 2
    assert loss.item() == pytest.approx(want.item() / 2, rel=1e-5)  # two groups


def test_estimate_is_biased_by_L_over_L_plus_1_without_the_clamp(model, tokenizer):
    """Item 8: with lambda ~ U[0, 1), E[l] = L/(L+1) ELBO (enumeration against the exact ELBO); each antithetic
    pair masks every position exactly once."""
    ids, mask = encode_prompts(tokenizer, ["12+34="])
    comp = torch.tensor([[5, 9, 7]])
    exact = exact_elbo(model, ids, mask, comp)[0].item()
    n = 3000
    est = dmpo.log_prob_estimate(model, ids.repeat(n, 1), mask.repeat(n, 1), comp.repeat(n, 1), torch.arange(n),
                                 replicates=2, mask_prob_min=0.0, mask_prob_max=1.0)
    se = est.std().item() / n**0.5
    assert se > 0 and abs(est.mean().item() - 3 / 4 * exact) < 4 * se, (est.mean().item(), 0.75 * exact, se)
    masks = dmpo.replicate_masks(torch.arange(50), 6, 4)
    assert torch.equal(masks[:, :2] ^ masks[:, 2:], torch.ones(50, 2, 6, dtype=torch.bool))


def test_mask_probability_range_is_the_config_field():
    """The code's lambda = 0.1 + 0.9 U lies in [0.1, 1.0) (the help text says [0.1, 0.9]); both are selectable."""
    code, documented = (dmpo.replicate_masks(torch.arange(300), 4000, 2, mask_prob_max=top)[:, 0].float().mean(1)
                        for top in (1.0, 0.9))
    assert 0.08 < code.min() < 0.15 and code.max() > 0.95
    assert 0.08 < documented.min() < 0.15 and 0.85 < documented.max() < 0.92


def test_gradient_flows_only_through_the_denoiser_and_replicates_are_linear(model, tokenizer):
    """Items 9-10: weights are constants; the batched loss's gradient equals the sum over single replicates of
    (1/R) sum_i w^_i grad CE_ir / n_groups."""
    batch, cfg = prepared(model, tokenizer)
    for key in ("weight", "w_plus", "old_logp", "log_rnd"):
        assert not batch.extra[key].requires_grad and batch.extra[key].grad_fn is None
    got = grads(dmpo.loss(model, model, batch, cfg)[0], model)
    assert any(g.abs().sum() > 0 for g in got)
    masks = dmpo.replicate_masks(batch.extra["loss_seeds"][:, 0], batch.completion.shape[1], 4)
    total = [torch.zeros_like(p) for p in model.parameters()]
    for r in range(4):
        logp = dmpo.masked_logp(model, batch.prompt_ids, batch.prompt_mask, batch.completion, masks[:, r:r + 1])
        ce = -logp.sum(-1)[:, 0] / masks[:, r].sum(-1).clamp(min=1)
        for t, g in zip(total, grads((batch.extra["weight"] * ce).sum() / (4 * 2), model)):
            t += g
    for g, h in zip(got, total):
        torch.testing.assert_close(g, h, rtol=1e-4, atol=1e-7)


def test_unbiased_baseline_sums_to_zero_and_needs_whole_groups(model, tokenizer):
    batch, cfg = prepared(model, tokenizer, baseline="unbiased")
    logp = dmpo.masked_logp(model, batch.prompt_ids, batch.prompt_mask, batch.completion,
                            dmpo.replicate_masks(batch.extra["loss_seeds"][:, 0], batch.completion.shape[1], 4))
    m = dmpo.replicate_masks(batch.extra["loss_seeds"][:, 0], batch.completion.shape[1], 4).sum(-1).clamp(min=1)
    b = dmpo._unbiased_baseline(batch, (batch.completion.shape[1] / m * logp.sum(-1)).mean(1))
    torch.testing.assert_close(torch.zeros(2).index_add(0, batch.group, b), torch.ones(2))
    loss, _ = dmpo.loss(model, model, batch, cfg)
    assert math.isfinite(loss.item())
    with pytest.raises(ValueError, match="whole groups"):
        dmpo.loss(model, model, batch.select(slice(0, 6)), cfg)


def test_ddo_loss_at_theta_old_on_shared_masks(model, tokenizer):
    """Item 12: with the training masks equal to the weight masks, the gap is 0 and the loss is
    log 2 (mean w+ + alpha_d)."""
    batch, cfg = prepared(model, tokenizer, loss="ddo", ddo_indep_set=False, ddo_alpha=0.7, alpha=0.3)
    seeds = torch.randint(0, 100, (len(batch),), generator=torch.Generator().manual_seed(9))
    batch.extra["old_logp"] = dmpo.log_prob_estimate(model, batch.prompt_ids, batch.prompt_mask, batch.completion,
                                                     seeds, 4)
    batch.extra["loss_seeds"][:, 0] = seeds
    loss, _ = dmpo.loss(model, model, batch, cfg)
    want = math.log(2) * (batch.extra["w_plus"].mean().item() + 0.7)
    assert loss.item() == pytest.approx(want, rel=1e-5)
    indep = dmpo.loss(model, model, batch, dmpo.Config(loss="ddo", ddo_alpha=0.7))[0]  # halves differ: not exactly at 0
    assert math.isfinite(indep.item()) and indep.item() != pytest.approx(want, rel=1e-6)


def test_bad_options_name_the_value():
    with pytest.raises(ValueError, match="alpha=0"):
        dmpo.prepare(None, None, None, dmpo.Config(alpha=0))
    with pytest.raises(ValueError, match="baseline='centered'"):
        dmpo.prepare(None, None, None, dmpo.Config(baseline="centered"))
    with pytest.raises(ValueError, match="odd number"):
        dmpo.replicate_masks(torch.arange(2), 4, 3)


@pytest.mark.parametrize("objective", ["wdce", "ddo"])
def test_toy_reward_rises(tokenizer, objective):
    """A few updates raise a toy reward (the fraction of even token ids) from the random model's level."""
    history = reward_climb(dmpo, dmpo.Config(loss=objective), tokenizer)
    assert history[-1] > history[0] + 0.2, history
