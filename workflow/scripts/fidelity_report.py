"""results/fidelity/*.csv (python -m harness.fidelity) -> paper/tables/fidelity{,_findings}.{md,tex} and
paper/figures/fidelity.{pdf,png}.

Each method is measured on its own rollouts against the exact log-likelihood of the sampler that drew them
(low-confidence remasking, or random unmasking for AGRPO); `exact_<x>` rows measure another exact quantity
(the ELBO, the trajectory log-likelihood, the other sampler's likelihood) against the same target.

table   per method: rollouts, forward passes per sequence per draw; its log-likelihood estimate's bias (mean over
        completions of the mean over repeats minus the exact value, nats per sequence) and Spearman rank
        correlation with the exact value within a batch (mean over batches and repeats) at the most draws, and
        its standard deviation over repeats at one draw (root mean over completions of the variance); the
        cosine of its gradient with the exact gradient at one draw and at the most draws (each batch's mean over
        repeats; mean [95% bootstrap CI] over batches), and of the mean of a batch's repeats' gradients at the
        most draws (mean over batches: the estimator's limit)
findings  a paragraph for the paper stating the main contrasts, every number read from the table
figure  (a) gradient cosine and (b) log-likelihood RMSE against forward passes per sequence, mean and 95% CI
        over batches; lines: the exact ELBO and trajectory gradients on low-confidence rollouts
When the study did not run (fidelity.enabled false) the table is a one-line note and the figure says so.
"""


import sys
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from scipy.stats import spearmanr

from stats import mean_ci, name
from tables import cell, num, write

PRIMARY = {"low_confidence": "low_confidence", "random": "random_order"}  # the rollouts' own sampler likelihood
TARGETS = ("random_order", "low_confidence", "elbo", "trajectory")
EXACT = {"exact_elbo": "exact ELBO", "exact_trajectory": "exact trajectory", "exact_random_order": "exact random order",
         "exact_low_confidence": "exact low confidence"}
ROLLOUTS = {"low_confidence": "low-confidence", "random": "random"}


def display(method: str, names: dict) -> str:
    return EXACT.get(method, name(method, names))


def rank_correlation(a, b) -> float:
    a, b = np.asarray(a, float), np.asarray(b, float)
    return float("nan") if np.ptp(a) == 0 or np.ptp(b) == 0 else float(spearmanr(a, b).statistic)


def loglik_stats(exact: pd.DataFrame, loglik: pd.DataFrame) -> pd.DataFrame:
    """Per method, rollouts, draws: bias, sd, rmse and Spearman of the estimate against the rollouts' own exact
    log-likelihood, over every batch's completions; plus one row per other exact quantity (sd 0)."""
    rows = []
    merged = loglik.merge(exact, on=["batch", "rollouts", "row"])
    for (method, rollouts, draws, passes), g in merged.groupby(["method", "rollouts", "draws", "passes"]):
        truth = g[PRIMARY[rollouts]]
        per_row = g.assign(error=g.estimate - truth).groupby(["batch", "row"])
        rows.append({"method": method, "rollouts": rollouts, "draws": draws, "passes": passes,
                     "bias": per_row.error.mean().mean(), "sd": np.sqrt(per_row.estimate.var().mean()),
                     "rmse": np.sqrt(((g.estimate - truth) ** 2).mean()),
                     "spearman": np.nanmean([rank_correlation(r.estimate, r[PRIMARY[rollouts]])
                                             for _, r in g.groupby(["batch", "repeat"])])})
    for rollouts, g in exact.groupby("rollouts"):
        truth = g[PRIMARY[rollouts]]
        for other in (t for t in TARGETS if t != PRIMARY[rollouts]):
            rows.append({"method": f"exact_{other}", "rollouts": rollouts, "draws": 1, "passes": np.nan,
                         "bias": (g[other] - truth).mean(), "sd": 0.0,
                         "rmse": np.sqrt(((g[other] - truth) ** 2).mean()),
                         "spearman": np.nanmean([rank_correlation(b[other], b[PRIMARY[rollouts]])
                                                 for _, b in g.groupby("batch")])})
    return pd.DataFrame(rows)


def gradient_stats(gradient: pd.DataFrame, gradient_mean: pd.DataFrame) -> pd.DataFrame:
    """Per method, rollouts, draws, at the rollouts' own target: each batch's mean cosine over repeats
    (`cosines`), their mean and 95% bootstrap CI over batches, and the mean over batches of the cosine of the
    mean gradient over repeats (`pooled`)."""
    keys = ["method", "rollouts", "draws", "passes"]

    def own(frame):
        return frame[frame.target == frame.rollouts.map(PRIMARY)]

    per_batch = own(gradient).groupby([*keys, "batch"]).cosine.mean()
    pooled = own(gradient_mean).groupby(keys).cosine.mean()
    rows = []
    for key, g in per_batch.groupby(level=keys):
        mean, low, high = mean_ci(g.to_numpy())
        rows.append({**dict(zip(keys, key)), "mean": mean, "low": low, "high": high, "cosines": g.to_numpy(),
                     "pooled": pooled[key]})
    return pd.DataFrame(rows)


def fidelity_table(ll: pd.DataFrame, gs: pd.DataFrame, methods: list[str], names: dict) -> pd.DataFrame:
    most = int(gs[~gs.method.str.startswith("exact_")].draws.max())
    order = [m for m in methods if m in set(gs.method)] + [m for m in EXACT if m in set(gs.method)]
    rows = []
    for method in order:
        for rollouts in (r for r in ROLLOUTS if ((gs.method == method) & (gs.rollouts == r)).any()):
            g = gs[(gs.method == method) & (gs.rollouts == rollouts)].set_index("draws")
            lik = ll[(ll.method == method) & (ll.rollouts == rollouts)].set_index("draws")
            at = 1 if method.startswith("exact_") else most  # an exact quantity takes no draws
            rows.append({
                "method": display(method, names), "rollouts": ROLLOUTS[rollouts],
                "passes / draw": num(g.passes.iloc[0] / g.index[0], 0),
                "log-lik bias": num(lik.bias.get(at, np.nan), 2),
                "sd, 1 draw": num(lik.sd.get(1, np.nan), 2),
                "Spearman": num(lik.spearman.get(at, np.nan), 2),
                "grad cos, 1 draw": cell(g.cosines[1], 1.0, 2),
                f"grad cos, {most} draws": cell(g.cosines[at], 1.0, 2),
                "grad cos, mean of repeats": num(g.loc[at, "pooled"], 2)})
    return pd.DataFrame(rows)


def findings(ll: pd.DataFrame, gs: pd.DataFrame, methods: list[str], names: dict) -> str:
    """A paragraph stating what the table and figure measure, with every number read from them."""
    studied = gs[~gs.method.str.startswith("exact_")]
    most = int(studied.draws.max())
    at_most = studied[studied.draws == most].set_index("method")
    ranked = at_most["mean"].sort_values()
    pooled = at_most.pooled

    def exact(method, rollouts):
        row = gs[(gs.method == method) & (gs.rollouts == rollouts)]["mean"]
        return row.iloc[0] if len(row) else float("nan")

    def who(m):
        return display(m, names)

    batches = len(studied.cosines.iloc[0])
    text = [f"At {most} draws per estimate, {who(ranked.index[-1])} has the policy gradient best aligned with the "
            f"exact one (mean cosine over {batches} batches {ranked.iloc[-1]:.2f}) and {who(ranked.index[0])} the "
            f"worst ({ranked.iloc[0]:.2f})."]
    trajectory, elbo = exact("exact_trajectory", "low_confidence"), exact("exact_elbo", "low_confidence")
    if not np.isnan(trajectory):
        gap = ll[(ll.method == "exact_trajectory") & (ll.rollouts == "low_confidence")].bias.iloc[0]
        nearly = (f" (their log-likelihoods differ by {gap:.2f} nats on average: the recorded order carries nearly "
                  "all of a completion's probability under the sampler, so replaying the trajectory is nearly exact)"
                  if trajectory >= 0.95 and abs(gap) < 0.1 else "")
        text.append(f"On low-confidence rollouts the gradient of the recorded trajectory's log-likelihood has cosine "
                    f"{trajectory:.2f} with the exact gradient of the sampler's likelihood{nearly}; the exact ELBO's "
                    f"gradient, the limit of ESPO's estimate, has cosine {elbo:.2f}"
                    + (f", and the mean of ESPO's repeated estimates reaches {pooled['espo']:.2f}." if "espo" in pooled
                       else "."))
    random_trajectory = exact("exact_trajectory", "random")
    if "agrpo" in pooled and not np.isnan(random_trajectory):
        text.append(f"On random-unmasking rollouts the recorded trajectory's gradient, which AGRPO estimates, has "
                    f"cosine {random_trajectory:.2f} with the exact random-order gradient, and the mean of AGRPO's "
                    f"repeated estimates {pooled['agrpo']:.2f}.")
    if "lfpo" in ranked:
        text.append("LFPO has no likelihood: only its gradient is compared.")
    return " ".join(text)


def fidelity_figure(ll: pd.DataFrame, gs: pd.DataFrame, methods: list[str], names: dict):
    fig, (left, right) = plt.subplots(1, 2, figsize=(11.5, 3.6), layout="constrained")
    studied = [m for m in methods if m in set(gs.method)]
    colors = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(studied)}
    for m in studied:
        g = gs[gs.method == m].sort_values("passes")
        label = display(m, names) + (" (random rollouts)" if (g.rollouts == "random").all() else "")
        left.plot(g.passes, g["mean"], marker="o", ms=3, color=colors[m], label=label)
        left.fill_between(g.passes, g.low, g.high, color=colors[m], alpha=0.15, lw=0)
        lik = ll[ll.method == m].sort_values("passes")
        if not lik.empty:
            right.plot(lik.passes, lik.rmse, marker="o", ms=3, color=colors[m], label=label)
    for ref, style in (("exact_elbo", ":"), ("exact_trajectory", "-.")):
        value = gs[(gs.method == ref) & (gs.rollouts == "low_confidence")]["mean"]
        if not value.empty:
            left.axhline(value.iloc[0], color="0.4", ls=style, lw=1, label=f"{EXACT[ref]} (low-confidence rollouts)")
    left.set(xscale="log", xlabel="forward passes per sequence", ylabel="cosine with the exact gradient",
             title="(a) policy-gradient direction")
    right.set(xscale="log", yscale="log", xlabel="forward passes per sequence",
              ylabel="RMSE of log-likelihood (nats / sequence)",
              title="(b) log-likelihood error (LFPO: none)")
    ticks = sorted(set(gs[~gs.method.str.startswith("exact_")].passes))
    for ax in (left, right):
        ax.set_xticks(ticks, [str(int(t)) for t in ticks])
        ax.minorticks_off()
        ax.grid(alpha=0.3)
    fig.legend(*left.get_legend_handles_labels(), loc="outside right upper", frameon=False)
    return fig


def main(inputs: list[str], outputs: list[str], methods: list[str], names: dict) -> None:
    files = {Path(p).stem: Path(p) for p in inputs}
    if files:
        exact, loglik = pd.read_csv(files["exact"]), pd.read_csv(files["loglik"])
        ll = loglik_stats(exact, loglik)
        gs = gradient_stats(pd.read_csv(files["gradient"]), pd.read_csv(files["gradient_mean"]))
        table, fig = fidelity_table(ll, gs, methods, names), fidelity_figure(ll, gs, methods, names)
        text = findings(ll, gs, methods, names)
    else:
        table = pd.DataFrame({"likelihood fidelity": ["not run (config fidelity.enabled is false)"]})
        text = "The likelihood-fidelity study did not run (config fidelity.enabled is false)."
        fig = plt.figure(figsize=(6, 1))
        fig.text(0.5, 0.5, "likelihood-fidelity study not run (fidelity.enabled: false)", ha="center", va="center")
    outputs = [Path(p) for p in outputs]
    tables = next(p for p in outputs if p.suffix == ".md").parent
    write(table, tables, "fidelity")
    (tables / "fidelity_findings.md").write_text(text + "\n")
    (tables / "fidelity_findings.tex").write_text(text.replace("%", r"\%").replace("_", r"\_") + "\n")
    figure = next(p for p in outputs if p.suffix == ".png")
    figure.parent.mkdir(parents=True, exist_ok=True)
    for ext in ("pdf", "png"):
        fig.savefig(figure.with_suffix(f".{ext}"), dpi=150)
    plt.close(fig)


if __name__ == "__main__" and "snakemake" in globals():
    sys.stderr = open(snakemake.log[0], "w")
    main(list(snakemake.input), list(snakemake.output), list(snakemake.params.methods), dict(snakemake.params.names))
