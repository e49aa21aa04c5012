"""Sampler properties (d1 spec §1.7 item 9; AGRPO spec §1.7 items 1-2; DiFFPO spec §2.7 item 10)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from scipy.stats import chisquare

import benchmarks
from harness.likelihood import step_logp
from harness.model import token_logits
from harness.rollout import encode_prompts, state_at
from harness.sampler import SamplerConfig, generate, step_quotas

CFG = SamplerConfig(gen_length=8, block_length=4, steps=4, temperature=1.0)


def prompts(tokenizer, n=6):
    task = benchmarks.get("arithmetic")
    return encode_prompts(tokenizer, [task.prompt(e) for e in task.load("test")[:n]])


def run(model, tokenizer, cfg, seed=0):
    ids, mask = prompts(tokenizer)
    states = []
    traj = generate(model, ids, mask, cfg, torch.Generator().manual_seed(seed), on_step=lambda t, x: states.append(x))
    return ids, mask, traj, states


def test_quotas_follow_the_linear_schedule():
    assert step_quotas(32, 16) == [2] * 16
    assert step_quotas(5, 3) == [2, 2, 1]
    assert sum(step_quotas(7, 4)) == 7


@pytest.mark.parametrize("remasking", ["low_confidence", "random", "entropy"])
def test_fixed_steps_invariants(model, tokenizer, remasking):
    cfg = replace(CFG, remasking=remasking)
    ids, mask, traj, states = run(model, tokenizer, cfg)
    P, mask_id = ids.shape[1], model.config.mask_token_id
    assert traj.forward_passes == cfg.steps and (traj.nfe == cfg.steps).all()
    quotas = step_quotas(cfg.block_length, cfg.steps // (cfg.gen_length // cfg.block_length))
    block_of = torch.arange(cfg.gen_length) // cfg.block_length
    for t in range(cfg.steps):
        committed = traj.unmask_step == t
        assert (committed.sum(1) == quotas[t % len(quotas)]).all()  # k_s tokens per step
        assert (block_of[committed.nonzero()[:, 1]] == t // len(quotas)).all()  # only inside the current block
    assert (traj.completion != mask_id).all()
    for t, x in enumerate(states):
        assert torch.equal(x[:, :P], ids)  # the prompt never changes
        assert torch.equal(x[:, P:], state_at(traj.completion, traj.unmask_step, t, mask_id))  # recorded = rebuilt
        if t:  # committed tokens never change afterwards
            before = states[t - 1][:, P:] != mask_id
            assert torch.equal(x[:, P:][before], states[t - 1][:, P:][before])


def test_temperature_zero_is_deterministic_and_seeds_matter(model, tokenizer):
    greedy = replace(CFG, temperature=0.0)
    a, b = run(model, tokenizer, greedy, seed=1)[2], run(model, tokenizer, greedy, seed=2)[2]
    assert torch.equal(a.completion, b.completion) and torch.equal(a.unmask_step, b.unmask_step)
    c, d = run(model, tokenizer, CFG, seed=1)[2], run(model, tokenizer, CFG, seed=1)[2]
    assert torch.equal(c.completion, d.completion)
    assert not torch.equal(c.completion, run(model, tokenizer, CFG, seed=2)[2].completion)


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_replayed_logp_equals_recorded(model, tokenizer, temperature):
    cfg = replace(CFG, temperature=temperature, remasking="random")
    ids, mask, traj, _ = run(model, tokenizer, cfg)
    for t in range(cfg.steps):
        replay = step_logp(model, ids, mask, traj.completion, traj.unmask_step, t, temperature)
        at_t = traj.unmask_step == t
        torch.testing.assert_close(replay[at_t], traj.logp[at_t], rtol=0, atol=1e-5)


def test_gumbel_max_frequencies_match_softmax(model, tokenizer):
    """One masked position, 4000 draws: the sampled token frequencies match softmax(logits / T)."""
    ids, mask = prompts(tokenizer, n=1)
    n, cfg = 4000, SamplerConfig(gen_length=1, block_length=1, steps=1, temperature=1.5)
    traj = generate(model, ids.repeat(n, 1), mask.repeat(n, 1), cfg, torch.Generator().manual_seed(0))
    x = torch.cat([ids, torch.full((1, 1), model.config.mask_token_id)], 1)
    attn = torch.cat([mask.long(), torch.ones(1, 1, dtype=torch.long)], 1)
    with torch.no_grad():
        p = torch.softmax(token_logits(model, x, attn, start=ids.shape[1])[0, 0] / cfg.temperature, -1)
    likely = p > 5 / n  # pool rare tokens so that expected counts are large enough
    observed = torch.bincount(traj.completion[:, 0], minlength=len(p)).double()
    obs = torch.cat([observed[likely], observed[~likely].sum()[None]])
    exp = torch.cat([p[likely], p[~likely].sum()[None]]).double() * n
    assert chisquare(obs.numpy(), exp.numpy() * obs.sum().item() / exp.sum().item()).pvalue > 1e-3


def test_eb_gamma_zero_one_token_per_step_and_inf_one_step_per_block(model, tokenizer):
    eb = replace(CFG, decoding="eb", eb_gamma=0.0)
    ids, mask, traj, _ = run(model, tokenizer, eb)
    assert (traj.entropy > 0).all()  # so gamma = 0 must commit exactly one token per step
    assert (traj.nfe == eb.gen_length).all()
    traj = run(model, tokenizer, replace(eb, eb_gamma=float("inf")))[2]
    assert (traj.nfe == eb.gen_length // eb.block_length).all()


def test_eb_commits_the_longest_feasible_entropy_prefix(model, tokenizer):
    gamma = 1.5
    ids, mask, traj, states = run(model, tokenizer, replace(CFG, decoding="eb", eb_gamma=gamma))
    mask_id = model.config.mask_token_id
    for t, x in enumerate(states):
        masked = x[:, ids.shape[1]:] == mask_id
        with torch.no_grad():
            logits = token_logits(model, x, torch.cat([mask.long(), torch.ones_like(masked, dtype=torch.long)], 1),
                              start=ids.shape[1])
        entropy = torch.special.entr(torch.softmax(logits / CFG.temperature, -1)).sum(-1)
        for i in range(len(x)):
            if not masked[i].any():
                continue
            block = masked[i].nonzero()[0, 0] // CFG.block_length
            eligible = masked[i] & (torch.arange(CFG.gen_length) // CFG.block_length == block)
            h = entropy[i][eligible].sort().values
            chosen = int((traj.unmask_step[i] == t).sum())
            assert chosen >= 1 and (traj.unmask_step[i][~eligible & masked[i]] != t).all()
            assert chosen == 1 or h[: chosen - 1].sum() <= gamma + 1e-5  # the bound holds
            assert chosen == len(h) or h[:chosen].sum() > gamma - 1e-5  # adding the next token breaks it


def test_threshold_decoding_commits_confident_tokens(model, tokenizer):
    low = run(model, tokenizer, replace(CFG, decoding="threshold", threshold=0.0, temperature=0.0))[2]
    assert (low.nfe == CFG.gen_length // CFG.block_length).all()  # everything is confident enough
    high = run(model, tokenizer, replace(CFG, decoding="threshold", threshold=1.01, temperature=0.0))[2]
    assert (high.nfe == CFG.gen_length).all()  # nothing is: one token per step


def test_bad_lengths_name_the_value_and_the_fix():
    with pytest.raises(ValueError, match="gen_length=10 is not divisible by sampler.block_length=4"):
        SamplerConfig(gen_length=10, block_length=4, steps=5).validate()
    with pytest.raises(ValueError, match="steps=3 must be a multiple of the 2 blocks"):
        SamplerConfig(gen_length=8, block_length=4, steps=3).validate()


def test_per_row_eb_gamma_overrides_the_config(model, tokenizer):
    ids, mask = prompts(tokenizer, 2)
    cfg = replace(CFG, decoding="eb", eb_gamma=0.0)
    traj = generate(model, ids, mask, cfg, torch.Generator().manual_seed(0), eb_gamma=torch.tensor([0.0, float("inf")]))
    assert traj.nfe.tolist() == [cfg.gen_length, cfg.gen_length // cfg.block_length]


# --- exact mode against LLaDA's reference sampler; the approximate K/V-cache modes -----------------------------

def mixed_prompts(tokenizer, n=6):
    """Prompts of two tasks, so that rows are left-padded to different lengths."""
    texts = [t.prompt(e) for name in ("arithmetic", "sudoku") for t in [benchmarks.get(name)] for e in t.load("test")[:n // 2]]
    return encode_prompts(tokenizer, texts)


@pytest.mark.parametrize("lengths", [(8, 8, 8), (8, 4, 4), (12, 4, 6), (8, 2, 8)])
def test_exact_mode_gives_the_reference_tokens_at_temperature_zero(model, tokenizer, trained_dir, lengths):
    """Token identity with LLaDA's generate() (harness.reference) in fp32, for a random and a trained model
    (the trained one has saturated, tied confidences: ties are broken by position in both)."""
    from harness.model import load
    from harness.reference import generate as reference

    L, B, N = lengths
    trained, trained_tok = load(trained_dir)
    for m, tok in ((model, tokenizer), (trained, trained_tok)):
        ids, mask = mixed_prompts(tok)
        ours = generate(m, ids, mask, SamplerConfig(gen_length=L, block_length=B, steps=N))
        theirs = reference(m, ids, mask, steps=N, gen_length=L, block_length=B)
        assert torch.equal(ours.completion, theirs[:, ids.shape[1]:])


@pytest.mark.parametrize("cache", ["none", "dual"])
def test_rows_do_not_depend_on_the_batch(model, tokenizer, cache):
    """Finished rows leave the batch (and the cache) early: each row decodes as it would alone."""
    ids, mask = mixed_prompts(tokenizer)
    cfg = replace(CFG, decoding="eb", temperature=0.0, cache=cache)
    gamma = torch.tensor([0.0, 4.0, float("inf")]).repeat(2)
    together = generate(model, ids, mask, cfg, eb_gamma=gamma)
    assert together.nfe.unique().numel() == 3  # rows finish at different steps
    for i in range(len(ids)):
        alone = generate(model, ids[i:i + 1], mask[i:i + 1], cfg, eb_gamma=gamma[i:i + 1])
        assert torch.equal(alone.completion[0], together.completion[i])
        assert torch.equal(alone.unmask_step[0], together.unmask_step[i])


@pytest.mark.parametrize("shift", [False, True])
def test_logits_to_keep_and_canvas_cache_reproduce_the_full_pass(tokenizer, shift):
    """On an unchanged canvas the cached forward of any slice equals the full forward (positions, padding,
    shifted logits); the cache only approximates once the canvas changes."""
    from tests.conftest import make_model

    m = make_model(tokenizer, shift_logits=shift)
    ids, mask = mixed_prompts(tokenizer)
    P = ids.shape[1]
    x = torch.cat([ids, torch.randint(10, 100, (len(ids), 12))], 1)
    attention = torch.cat([mask.long(), torch.ones(len(ids), 12, dtype=torch.long)], 1)
    with torch.no_grad():
        full = token_logits(m, x, attention, start=P)
        pos = torch.stack([torch.randperm(12, generator=torch.Generator().manual_seed(i))[:5] for i in range(len(x))])
        torch.testing.assert_close(token_logits(m, x, attention, positions=P + pos),  # per-row positions
                                   full.gather(1, pos[..., None].expand(-1, -1, full.shape[-1])), rtol=0, atol=1e-5)
        cache = []
        torch.testing.assert_close(token_logits(m, x, attention, start=P + 4, end=P + 8, canvas_cache=cache),
                                   full[:, 4:8], rtol=0, atol=1e-5)
        for first, last in ((P + 3, P + 8), (P + 3, P + 12)):  # a block (dual cache), a block + suffix (prefix)
            got = token_logits(m, x[:, first:last], attention, start=1, end=5, canvas_cache=cache, cache_offset=first)
            torch.testing.assert_close(got, full[:, 4:8], rtol=0, atol=1e-5)


@pytest.mark.parametrize("cache", ["prefix", "dual"])
@pytest.mark.parametrize("decoding", ["steps", "threshold"])
def test_cached_modes_keep_the_record_invariants(model, tokenizer, cache, decoding):
    cfg = replace(CFG, cache=cache, decoding=decoding, threshold=0.6, temperature=0.7)
    ids, mask, traj, states = run(model, tokenizer, cfg)
    assert (traj.completion != model.config.mask_token_id).all() and (traj.unmask_step >= 0).all()
    block_of = torch.arange(cfg.gen_length) // cfg.block_length
    for i in range(len(ids)):
        steps = traj.unmask_step[i]
        assert set(steps.tolist()) == set(range(int(traj.nfe[i])))  # each row's steps are 0..T_i - 1
        assert (block_of[steps.argsort(stable=True)].diff() >= 0).all()  # blocks are decoded in order
    if decoding == "steps":
        assert traj.forward_passes == cfg.steps and (traj.nfe == cfg.steps).all()
    assert torch.isfinite(traj.logp).all() and (traj.logp <= 0).all() and (traj.entropy >= 0).all()


def test_cached_modes_equal_the_exact_mode_with_one_step_per_block(model, tokenizer):
    """Every step opens a block, so every forward is a full pass: the cache never goes stale."""
    cfg = replace(CFG, steps=CFG.gen_length // CFG.block_length, temperature=0.0)
    ids, mask = mixed_prompts(tokenizer)
    exact = generate(model, ids, mask, cfg)
    for cache in ("prefix", "dual"):
        cached = generate(model, ids, mask, replace(cfg, cache=cache))
        assert torch.equal(cached.completion, exact.completion) and torch.equal(cached.unmask_step, exact.unmask_step)
        torch.testing.assert_close(cached.logp, exact.logp, rtol=0, atol=1e-6)


def test_cache_needs_a_model_that_supports_it(model, tokenizer):
    class NoCache(torch.nn.Module):  # a remote-code model (LLaDA, Dream) without the tiny model's cache argument
        def __init__(self):
            super().__init__()
            self.inner, self.config = model, model.config

        def forward(self, input_ids, attention_mask=None):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask)

    ids, mask = prompts(tokenizer, 2)
    with pytest.raises(ValueError, match=r"sampler.cache='dual' needs a model .*--sampler.cache none"):
        generate(NoCache(), ids, mask, replace(CFG, cache="dual"))
    assert generate(NoCache(), ids, mask, CFG).completion.shape == (2, CFG.gen_length)  # uncached works
