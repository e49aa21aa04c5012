"""The likelihood-fidelity study (harness/fidelity.py): its exact likelihoods against brute force over unmasking
orders and against the sampler itself, their gradients against autograd through the brute force, and the
study's entry point on a toy budget."""

from __future__ import annotations

import math
from itertools import permutations, product

import pandas as pd
import pytest
import torch

import benchmarks
from harness import fidelity
from harness.likelihood import exact_elbo
from harness.model import load, token_logits
from harness.rollout import Batch, encode_prompts
from harness.sampler import SamplerConfig, generate
from harness.tiny import TinyMDLM, TinyMDLMConfig


@pytest.fixture(scope="module")
def trained(trained_dir):
    return load(trained_dir)


def sudoku_prompt(tokenizer, index=0):
    task = benchmarks.get("sudoku")
    return encode_prompts(tokenizer, [task.prompt(task.load("test")[index])])


def brute_force(model, prompt_ids, prompt_mask, completion, temperature, rule) -> torch.Tensor:
    """log pi(o) as the sum over all L! unmasking orders of the product of the per-step commit probabilities,
    each step's state scored by its own forward pass (differentiable; float64 accumulation)."""
    L, P, mask_id = len(completion), prompt_ids.shape[1], model.config.mask_token_id
    orders = []
    for order in permutations(range(L)):
        log_p = torch.zeros((), dtype=torch.float64)
        revealed = []
        for j in order:
            state = torch.tensor([completion[k] if k in revealed else mask_id for k in range(L)])
            ids = torch.cat([prompt_ids[0], state])[None]
            attention = torch.cat([prompt_mask[0].long(), torch.ones(L, dtype=torch.long)])[None]
            logits = token_logits(model, ids, attention, start=P)[0].double()  # [L, V]
            sample, conf = torch.softmax(logits / temperature, -1), torch.softmax(logits, -1)
            masked = [i for i in range(L) if i not in revealed]
            if rule == "random":
                q = sample[j, completion[j]] / len(masked)
            else:  # every other masked position's draw must be less confident (ties: the earlier position wins)
                c = conf[j, completion[j]].detach()
                q = sample[j, completion[j]]
                for i in masked:
                    if i != j:
                        loses = conf[i].detach() < c if i < j else conf[i].detach() <= c
                        q = q * sample[i][loses].sum()
            log_p = log_p + torch.log(q)
            revealed.append(j)
        orders.append(log_p)
    return torch.logsumexp(torch.stack(orders), 0)


@pytest.mark.parametrize("length, temperature", [(3, 1.0), (4, 0.7)])
def test_sampler_likelihoods_equal_the_sum_over_unmasking_orders(trained, length, temperature):
    model, tokenizer = trained
    ids, mask = sudoku_prompt(tokenizer)
    g = torch.Generator().manual_seed(length)
    sampler = SamplerConfig(length, length, length, temperature)
    completions = torch.cat([generate(model, ids.repeat(3, 1), mask.repeat(3, 1), sampler, g).completion,  # 3 drawn
                             torch.randint(3, len(tokenizer), (1, length), generator=g)])  # and one arbitrary
    n = len(completions)
    with torch.no_grad():
        exact = fidelity.exact_log_likelihoods(model, ids.repeat(n, 1), mask.repeat(n, 1), completions,
                                               torch.zeros_like(completions), temperature)
    for i, o in enumerate(completions.tolist()):
        with torch.no_grad():
            for rule, target in (("random", "random_order"), ("low_confidence", "low_confidence")):
                want = brute_force(model, ids, mask, o, temperature, rule).item()
                assert exact[target][i].item() == pytest.approx(want, abs=2e-5), (rule, o)


def small_model(vocab: int = 6, seed: int = 0) -> TinyMDLM:
    torch.manual_seed(seed)
    model = TinyMDLM(TinyMDLMConfig(vocab_size=vocab, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                    intermediate_size=32, mask_token_id=vocab - 1)).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(40)  # far from uniform, so the low-confidence rule matters
    return model


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_probabilities_over_all_completions_sum_to_one_and_the_elbo_bounds_the_random_order_one(temperature):
    model, L = small_model(), 3
    every = torch.tensor(list(product(range(5), repeat=L)))  # all 5^3 completions of the 5 real tokens
    n = len(every)
    prompt, prompt_mask = torch.tensor([[0, 3, 1]]).repeat(n, 1), torch.ones(n, 3, dtype=torch.bool)
    with torch.no_grad():
        exact = fidelity.exact_log_likelihoods(model, prompt, prompt_mask, every, torch.zeros_like(every), temperature)
    for target in ("random_order", "low_confidence"):
        assert exact[target].exp().sum().item() == pytest.approx(1.0, abs=1e-5), target
    # the two samplers are different distributions over the same completions
    assert (exact["random_order"].exp() - exact["low_confidence"].exp()).abs().sum().item() > 0.1
    if temperature == 1.0:  # Jensen: E_order[log p(o | order)] <= log E_order[p(o | order)]
        assert (exact["elbo"] <= exact["random_order"] + 1e-5).all()
        assert (exact["random_order"] - exact["elbo"]).max().item() > 0.1


@pytest.mark.parametrize("remasking, target", [("low_confidence", "low_confidence"), ("random", "random_order")])
def test_exact_likelihood_is_the_sampler_s_distribution(remasking, target):
    """The frequencies of 20000 completions drawn by harness.sampler.generate (one token per step, T = 0.7: the
    tempered draw, the untempered confidence) match exp(exact log-likelihood) on every one of the 5^3
    completions; the other sampler's likelihood does not (the test can tell the two rules apart)."""
    model, L, N = small_model(), 3, 20000
    every = torch.tensor(list(product(range(5), repeat=L)))
    prompt, prompt_mask = torch.tensor([[0, 3, 1]]), torch.ones(1, 3, dtype=torch.bool)
    cfg = SamplerConfig(L, L, L, temperature=0.7, remasking=remasking)
    drawn = generate(model, prompt.repeat(N, 1), prompt_mask.repeat(N, 1), cfg, torch.Generator().manual_seed(0))
    counts = torch.zeros(len(every), dtype=torch.float64)
    counts.index_add_(0, (drawn.completion * torch.tensor([25, 5, 1])).sum(1), torch.ones(N, dtype=torch.float64))
    with torch.no_grad():
        exact = fidelity.exact_log_likelihoods(model, prompt.repeat(len(every), 1), prompt_mask.repeat(len(every), 1),
                                               every, torch.zeros_like(every), 0.7)
    other = "random_order" if target == "low_confidence" else "low_confidence"

    def z(log_p):  # standardized deviations of the counts from N p
        p = log_p.exp().double()
        return ((counts - N * p) / (N * p * (1 - p)).clamp(min=1e-12).sqrt()).abs().max().item()

    assert z(exact[target]) < 4.5
    assert z(exact[other]) > 8


def test_trajectory_and_elbo_agree_with_the_sampler_record_and_the_harness(trained):
    model, tokenizer = trained
    ids, mask = sudoku_prompt(tokenizer, 2)
    ids, mask = ids.repeat(4, 1), mask.repeat(4, 1)
    traj = generate(model, ids, mask, SamplerConfig(4, 4, 4, temperature=0.8, remasking="random"),
                    torch.Generator().manual_seed(1))
    with torch.no_grad():
        exact = fidelity.exact_log_likelihoods(model, ids, mask, traj.completion, traj.unmask_step, 0.8)
        torch.testing.assert_close(exact["trajectory"], traj.logp.sum(1), rtol=0, atol=1e-5)
        torch.testing.assert_close(exact["elbo"], exact_elbo(model, ids, mask, traj.completion), rtol=0, atol=1e-5)


def flat(grads) -> torch.Tensor:
    return torch.cat([g.flatten() for g in grads])


def test_exact_gradient_equals_autograd_through_the_brute_force(trained):
    model, tokenizer = trained
    ids, mask = sudoku_prompt(tokenizer, 3)
    ids, mask = ids.repeat(3, 1), mask.repeat(3, 1)
    traj = generate(model, ids, mask, SamplerConfig(3, 3, 3, temperature=0.9), torch.Generator().manual_seed(2))
    batch = Batch(prompt_ids=ids, prompt_mask=mask, completion=traj.completion, unmask_step=traj.unmask_step,
                  logp=traj.logp, entropy=traj.entropy, nfe=traj.nfe, completion_mask=torch.ones_like(mask[:, :3]),
                  rewards=torch.zeros(3), group=torch.zeros(3, dtype=torch.long), temperature=0.9)
    weights = {"w": torch.tensor([0.5, -1.25, 0.75])}
    values, grads = fidelity.exact_gradients(model, batch, weights)
    params = list(model.parameters())
    for rule, target in (("random", "random_order"), ("low_confidence", "low_confidence")):
        oracle = [brute_force(model, ids[:1], mask[:1], o, 0.9, rule) for o in traj.completion.tolist()]
        torch.testing.assert_close(values[target].double(), torch.stack(oracle).detach(), rtol=0, atol=2e-5)
        want = flat(torch.autograd.grad(sum(w * v for w, v in zip(weights["w"].tolist(), oracle)), params))
        got = grads[(target, "w")].double()
        assert fidelity.cosine(got, want) > 1 - 1e-8
        assert (got - want).norm().item() < 1e-4 * want.norm().item()


def test_bad_settings_name_the_value_and_the_fix():
    with pytest.raises(SystemExit, match=r"^error: --gen_length=9: .* choose 1 to 8$"):
        fidelity.main(["--gen_length", "9"])
    with pytest.raises(SystemExit, match=r"^error: model folder '/nonexistent' does not exist"):
        fidelity.main(["--model", "/nonexistent"])
    with pytest.raises(ValueError, match=r"--gen_length=9: .* choose 1 to 8"):
        fidelity.FidelityConfig(gen_length=9)
    with pytest.raises(ValueError, match=r"--temperature=0.0: .* > 0"):
        fidelity.FidelityConfig(temperature=0.0)
    with pytest.raises(ValueError, match=r"no surrogate entry for \['zz'\]"):
        fidelity.FidelityConfig(methods=("d1", "zz"))


STUDY = ["--task", "sudoku", "--gen_length", "3", "--prompts", "2", "--group_size", "4", "--draws", "1", "8",
         "--repeats", "4", "--batches", "2"]


@pytest.fixture(scope="module")
def study(trained_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("fidelity")
    fidelity.main(["--model", str(trained_dir), "--out", str(out), *STUDY])
    return out, {name: pd.read_csv(out / f"{name}.csv") for name in ("exact", "loglik", "gradient", "gradient_mean")}


def test_the_study_writes_every_estimate(study):
    out, t = study
    assert (out / "run.json").exists() and not (out / ".parts").exists()
    assert list(t["exact"].columns) == ["batch", "rollouts", "row", "group", "reward", "completion", *fidelity.TARGETS]
    assert sorted(t["exact"].groupby("rollouts").size().items()) == [("low_confidence", 16), ("random", 16)]
    loglik = t["loglik"].groupby(["method", "draws"]).size()
    assert set(loglik.index.get_level_values(0)) == {"d1", "diffpo", "agrpo", "espo", "dmpo"}  # LFPO has none
    assert (loglik == 2 * 4 * 8).all()  # batches x repeats x rows
    passes = t["gradient"].groupby("method").passes.max()
    assert passes.to_dict() == {"agrpo": 8, "d1": 8, "diffpo": 16, "dmpo": 16, "espo": 16, "lfpo": 16,
                                "exact_elbo": 7, "exact_low_confidence": 7, "exact_random_order": 7,
                                "exact_trajectory": 3}
    assert t["gradient"].cosine.between(-1, 1).all() and len(t["gradient_mean"]) == 2 * (2 * 4 * 6 + 2 * 12)


def test_unbiased_estimators_center_on_their_exact_targets(study):
    """ESPO's coupled ELBO is unbiased for the ELBO and AGRPO's step estimate for the trajectory log-likelihood;
    the study measures both within three standard errors, and their pooled gradients point at those targets."""
    _, t = study
    merged = t["loglik"].merge(t["exact"], on=["batch", "rollouts", "row"])
    pooled = t["gradient_mean"].groupby(["method", "target", "draws"]).cosine.min()
    for method, target in (("espo", "elbo"), ("agrpo", "trajectory")):
        rows = merged[(merged.method == method) & (merged.draws == 8)]
        error = rows.estimate - rows[target]
        assert abs(error.mean()) < 3 * error.std() / math.sqrt(len(error)) + 1e-6, method
        assert pooled[(method, target, 8)] > 0.95, method  # in every batch
    d1 = merged[merged.method == "d1"]
    assert (d1.estimate - d1.low_confidence).abs().mean() > 0.5  # the mean field is no unbiased estimate


def test_a_killed_study_resumes_after_its_last_finished_batch(trained_dir, study, tmp_path, monkeypatch):
    out, t = study
    finished = []

    def dies_in_batch_one(model, batches, cfg, b, bar):
        if b == 1:
            raise KeyboardInterrupt
        finished.append(b)
        return real(model, batches, cfg, b, bar)

    real = fidelity.study_batch
    monkeypatch.setattr(fidelity, "study_batch", dies_in_batch_one)
    with pytest.raises(KeyboardInterrupt):
        fidelity.main(["--model", str(trained_dir), "--out", str(tmp_path), *STUDY])
    assert finished == [0] and not (tmp_path / "exact.csv").exists()
    monkeypatch.setattr(fidelity, "study_batch", lambda *a: (finished.append(a[3]), real(*a))[1])
    fidelity.main(["--model", str(trained_dir), "--out", str(tmp_path), *STUDY])
    assert finished == [0, 1]  # batch 0 came from the saved part
    for name, frame in t.items():
        pd.testing.assert_frame_equal(pd.read_csv(tmp_path / f"{name}.csv"), frame)


# ---- the report: table, findings and figure (workflow/scripts/fidelity_report.py) ----

def report_module():
    import sys
    from pathlib import Path
    scripts = str(Path(__file__).resolve().parent.parent / "workflow" / "scripts")
    if scripts not in sys.path:
        sys.path.insert(0, scripts)
    import fidelity_report
    return fidelity_report


def synthetic_results(folder):
    """Two batches of the same three low-confidence completions, ESPO's estimates at 1 and 2 draws, d1's
    gradients, two exact rows."""
    exact = pd.DataFrame({"batch": [0, 0, 0, 1, 1, 1], "rollouts": "low_confidence", "row": [0, 1, 2] * 2,
                          "group": 0, "reward": 0.5, "completion": "4 5",
                          "random_order": [-1.5, -2.5, -3.5] * 2, "low_confidence": [-1.0, -2.0, -3.0] * 2,
                          "elbo": [-2.0, -3.0, -4.0] * 2, "trajectory": [-1.0, -2.0, -3.1] * 2})
    estimates = {(1, 0): [-1.5, -2.0, -4.0], (1, 1): [-0.5, -3.0, -3.0], (2, 0): [-1.0, -2.0, -3.0],
                 (2, 1): [-1.0, -2.0, -3.0]}
    loglik = pd.DataFrame([{"method": "espo", "batch": b, "rollouts": "low_confidence", "draws": n, "passes": 2 * n,
                            "repeat": r, "row": i, "estimate": v}
                           for b in (0, 1) for (n, r), values in estimates.items() for i, v in enumerate(values)])
    cosines = {("espo", 1, 0): [0.2, 0.4], ("espo", 1, 1): [0.4, 0.6], ("espo", 2, 0): [0.5, 0.7],
               ("espo", 2, 1): [0.5, 0.7], ("d1", 1, 0): [0.1, 0.1], ("d1", 2, 0): [0.1, 0.1],
               ("d1", 1, 1): [0.1, 0.1], ("d1", 2, 1): [0.1, 0.1]}
    gradient = [{"method": m, "batch": b, "rollouts": "low_confidence", "target": "low_confidence", "draws": n,
                 "passes": n * (2 if m == "espo" else 1), "repeat": r, "cosine": c}
                for (m, n, b), values in cosines.items() for r, c in enumerate(values)]
    gradient += [{"method": m, "batch": b, "rollouts": "low_confidence", "target": "low_confidence", "draws": 1,
                  "passes": p, "repeat": 0, "cosine": c}
                 for m, p, b, c in (("exact_elbo", 7, 0, 0.9), ("exact_elbo", 7, 1, 0.7),
                                    ("exact_trajectory", 3, 0, 0.99), ("exact_trajectory", 3, 1, 0.99))]
    gradient = pd.DataFrame(gradient)
    gradient_mean = gradient.drop_duplicates(["method", "batch", "draws"]).drop(columns="repeat").assign(repeats=2)
    gradient_mean["cosine"] = [{("espo", 2, 0): 0.6, ("espo", 2, 1): 0.7}.get((m, n, b), c) for m, n, b, c in zip(
        gradient_mean.method, gradient_mean.draws, gradient_mean.batch, gradient_mean.cosine)]
    paths = []
    for name, frame in (("exact", exact), ("loglik", loglik), ("gradient", gradient), ("gradient_mean", gradient_mean)):
        frame.to_csv(folder / f"{name}.csv", index=False)
        paths.append(str(folder / f"{name}.csv"))
    return paths


def outputs(folder):
    return [str(folder / p) for p in ("tables/fidelity.md", "tables/fidelity.tex", "tables/fidelity_findings.md",
                                      "tables/fidelity_findings.tex", "figures/fidelity.pdf", "figures/fidelity.png")]


def test_report_table_and_findings_pin_hand_computed_numbers(tmp_path):
    report = report_module()
    inputs = synthetic_results(tmp_path)
    report.main(inputs, outputs(tmp_path / "paper"), ["d1", "espo"], {"espo": "ESPO"})
    stats = report.loglik_stats(pd.read_csv(inputs[0]), pd.read_csv(inputs[1])).set_index(["method", "draws"])
    one = stats.loc[("espo", 1)]  # errors (rep 0, rep 1): (-.5, .5), (0, -1), (-1, 0)
    assert (one.bias, one.sd, one.rmse) == pytest.approx((-1 / 3, math.sqrt(0.5), math.sqrt(2.5 / 6)))
    assert one.spearman == pytest.approx((1.0 + 1.5 / math.sqrt(3)) / 2)  # rep 1 ties two estimates
    assert stats.loc[("exact_elbo", 1)].bias == pytest.approx(-1.0)
    table = pd.read_csv(tmp_path / "paper/tables/fidelity.md", sep="|", skipinitialspace=True).iloc[1:, 1:-1]
    table.columns = [c.strip() for c in table.columns]
    rows = {r["method"].strip(): {k: str(v).strip() for k, v in r.items()} for _, r in table.iterrows()}
    assert rows["ESPO"]["log-lik bias"] == "0.00" and rows["ESPO"]["sd, 1 draw"] == "0.71"
    assert rows["ESPO"]["grad cos, 1 draw"] == "0.40 [0.30, 0.50]"  # batch means 0.3 and 0.5
    assert rows["ESPO"]["grad cos, 2 draws"] == "0.60"  # both batches agree: no interval
    assert rows["ESPO"]["grad cos, mean of repeats"] == "0.65" and rows["d1"]["log-lik bias"] == "–"
    assert rows["exact ELBO"]["passes / draw"] == "7" and rows["exact ELBO"]["grad cos, 2 draws"] == "0.80 [0.70, 0.90]"
    text = (tmp_path / "paper/tables/fidelity_findings.md").read_text()
    assert text.startswith("At 2 draws per estimate, ESPO has the policy gradient best aligned with the exact one "
                           "(mean cosine over 2 batches 0.60) and d1 the worst (0.10).")
    assert ("cosine 0.99 with the exact gradient of the sampler's likelihood (their log-likelihoods differ by -0.03 "
            in text)
    assert "has cosine 0.80, and the mean of ESPO's repeated estimates reaches 0.65." in text
    assert (tmp_path / "paper/figures/fidelity.png").stat().st_size > 5000


def test_report_of_the_study_and_of_a_study_that_did_not_run(study, tmp_path):
    report = report_module()
    out, t = study
    report.main([str(out / f"{n}.csv") for n in ("exact", "loglik", "gradient", "gradient_mean")],
                outputs(tmp_path / "a"), ["d1", "agrpo", "espo", "dmpo", "diffpo", "lfpo"], {})
    table = (tmp_path / "a/tables/fidelity.md").read_text()
    assert all(f"| {m} " in table for m in ("d1", "agrpo", "espo", "dmpo", "diffpo", "lfpo", "exact ELBO"))
    espo = t["gradient"].query("method == 'espo' and target == 'low_confidence' and draws == 8")
    assert f"| {espo.groupby('batch').cosine.mean().mean():.2f} [" in table  # the mean over batches of repeats' means
    report.main([], outputs(tmp_path / "b"), [], {})
    assert "fidelity.enabled is false" in (tmp_path / "b/tables/fidelity.md").read_text()
    assert "did not run" in (tmp_path / "b/tables/fidelity_findings.tex").read_text()
