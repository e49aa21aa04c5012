"""results/summary.csv -> paper/figures/{name}.{pdf,png}; one panel per task, one colour per method.

curve_step      test metric (eval/<metric>, the shared greedy sampler) vs RL step: mean and 95% bootstrap CI
                band over seeds; step 0 is the base
curve_forward   the same vs cumulative training forward passes (rollout + scoring + training)
curve_time      the same vs cumulative training time (time/step; evaluation excluded)
frontier        final test metric vs mean NFE per completion: the shared sampler's default decoding (filled
                marker), a method's own decoding (eval_own, open marker) and the entropy-bounded sampler at
                each gamma (eval_eb<gamma>, a line per method; the base, step 0, in grey); methods are shifted
                sideways by a few points so that equal NFEs stay readable
time_breakdown  training time per run split into rollout / scoring (prepare) / update, mean over seeds
"""


import sys
from pathlib import Path

import matplotlib.pyplot as plt
from matplotlib.transforms import ScaledTranslation
import pandas as pd

from stats import final, load, mean_ci, name, order

FORWARD = ["forward/rollout", "forward/scoring", "forward/training"]
PHASES = {"rollout": "time/rollout", "scoring": "time/scoring", "update": "time/update"}
X_LABELS = {"step": "RL step", "forward": "training forward passes", "time": "training time (s)"}


def curves(runs: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Per (task, algo, step) with an evaluation: mean and CI of eval/<metric> over seeds, and the mean over
    seeds of the cumulative forward passes and training time up to that step."""
    wide = runs.pivot_table(index=["task", "algo", "seed", "step"], columns="metric", values="value")
    spent = wide.reindex(columns=[*FORWARD, "time/step"]).fillna(0.0).groupby(level=["task", "algo", "seed"]).cumsum()
    wide["forward"], wide["time"] = spent[FORWARD].sum(axis=1), spent["time/step"]
    evaluated = wide[wide.reindex(columns=[f"eval/{metric}"]).iloc[:, 0].notna()]
    rows = []
    for (task, algo, step), group in evaluated.groupby(level=["task", "algo", "step"]):
        mean, low, high = mean_ci(group[f"eval/{metric}"])
        rows.append({"task": task, "algo": algo, "step": step, "forward": group["forward"].mean(),
                     "time": group["time"].mean(), "mean": mean, "low": low, "high": high})
    return pd.DataFrame(rows)


def panels(tasks: list[str], width: float = 4.2, height: float = 3.2):
    """One panel per task, plus room on the right for the legend."""
    fig, axes = plt.subplots(1, len(tasks), figsize=(width * len(tasks) + 2.4, height), squeeze=False,
                             layout="constrained")
    return fig, dict(zip(tasks, axes[0]))


def legend(fig, axes) -> None:
    handles = {}
    for ax in axes:
        for h, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, h)
    fig.legend(handles.values(), handles.keys(), loc="outside right upper", frameon=False)


def curve_figure(data: pd.DataFrame, x: str, metric: str, methods: list[str], colors: dict, names: dict):
    tasks = sorted(data.task.unique())
    fig, axes = panels(tasks)
    for task, ax in axes.items():
        for algo in methods:
            c = data[(data.task == task) & (data.algo == algo)].sort_values("step")
            if c.empty:
                continue
            ax.plot(c[x], 100 * c["mean"], marker="o", ms=3, color=colors[algo], label=name(algo, names))
            ax.fill_between(c[x], 100 * c["low"], 100 * c["high"], color=colors[algo], alpha=0.15, lw=0)
        ax.set(title=task, xlabel=X_LABELS[x], ylabel=f"test {metric} (%)")
        ax.grid(alpha=0.3)
    legend(fig, axes.values())
    return fig


def frontier_figure(runs: pd.DataFrame, metric: str, methods: list[str], colors: dict, names: dict):
    tasks = sorted(runs.task.unique())
    fig, axes = panels(tasks)
    gammas = sorted({m.split("/")[0] for m in runs.metric.unique() if m.startswith("eval_eb")},
                    key=lambda prefix: float(prefix.removeprefix("eval_eb")))

    def point(rows: pd.DataFrame, prefix: str):
        """(mean NFE, mean %, CI half-widths below and above) over seeds of `prefix`/metric and `prefix`/nfe at
        each run's last step in `rows`, or None if not logged."""
        y, x = final(rows, f"{prefix}/{metric}"), final(rows, f"{prefix}/nfe")
        if y.empty or x.empty:
            return None
        mean, low, high = mean_ci(y.value)
        low, high = (mean, mean) if pd.isna(low) else (low, high)
        return x.value.mean(), 100 * mean, 100 * (mean - low), 100 * (high - mean)

    def dodge(ax, i: int):
        """Methods side by side: a shift of a few points per method, so that equal NFEs do not hide each other."""
        return ax.transData + ScaledTranslation(3 * (i - len(methods) / 2) / 72, 0, fig.dpi_scale_trans)

    def draw(ax, points, i, color, label=None, **style):
        xs, ys, below, above = zip(*points)
        ax.errorbar(xs, ys, yerr=[below, above], color=color, capsize=2, label=label, transform=dodge(ax, i), **style)
        # a non-data transform does not update the axes limits by itself
        ax.update_datalim([(x, y + d) for x, y, b, a in points for d in (-b, a)])
        ax.autoscale_view()

    for task, ax in axes.items():
        for i, algo in enumerate(["base", *methods]):
            # the base is the step 0 of every run of the task (one model: every run gives the same numbers)
            rows = runs[(runs.task == task) & (runs.step == 0)] if algo == "base" else \
                runs[(runs.task == task) & (runs.algo == algo) & (runs.step > 0)]
            color = "0.4" if algo == "base" else colors[algo]
            if eb := [p for g in gammas if (p := point(rows, g))]:
                draw(ax, eb, i, color, marker="s", ms=4, lw=1)
            label = "base" if algo == "base" else name(algo, names)
            if p := point(rows, "eval"):
                draw(ax, [p], i, color, label, marker="o", ms=7, ls="none")
            if algo != "base" and (p := point(rows, "eval_own")):
                draw(ax, [p], i, color, f"{label}, own decoding", marker="o", ms=7, mfc="none", ls="none")
        if gammas:  # a legend entry for the squares; the colour says whose they are
            ax.plot([], [], color="0.4", marker="s", ms=4, lw=1, label="EB sampler, per gamma")
        ax.margins(x=0.08)  # room for the sideways shifts
        ax.set(title=task, xlabel="mean NFE per completion", ylabel=f"test {metric} (%)")
        ax.grid(alpha=0.3)
    legend(fig, axes.values())
    return fig


def time_breakdown_figure(runs: pd.DataFrame, methods: list[str], names: dict):
    tasks = sorted(runs.task.unique())
    fig, axes = panels(tasks, height=0.8 + 0.4 * len(methods))
    totals = runs[runs.metric.isin(PHASES.values())].groupby(["task", "algo", "seed", "metric"]).value.sum()
    means = totals.groupby(["task", "algo", "metric"]).mean()
    for task, ax in axes.items():
        present = [a for a in methods if (task, a) in means.index.droplevel("metric")]
        left = [0.0] * len(present)
        for (phase, metric), color in zip(PHASES.items(), ("tab:blue", "tab:orange", "tab:green")):
            widths = [means.get((task, a, metric), 0.0) for a in present]
            ax.barh(range(len(present)), widths, left=left, color=color, label=phase)
            left = [l + w for l, w in zip(left, widths)]
        ax.set_yticks(range(len(present)), [name(a, names) for a in present])
        ax.invert_yaxis()
        ax.set(title=task, xlabel="training time per run (s), mean over seeds")
        ax.grid(axis="x", alpha=0.3)
    legend(fig, axes.values())
    return fig


def main(summary_path, outputs: list[str], metric: str, algos: list[str], names: dict) -> None:
    summary = load(summary_path)
    runs = summary[summary.algo != "base"]
    methods = order(algos, runs.algo.unique())
    colors = {a: plt.get_cmap("tab10")(i % 10) for i, a in enumerate(methods)}
    data = curves(runs, metric)
    figures = {
        "curve_step": lambda: curve_figure(data, "step", metric, methods, colors, names),
        "curve_forward": lambda: curve_figure(data, "forward", metric, methods, colors, names),
        "curve_time": lambda: curve_figure(data, "time", metric, methods, colors, names),
        "frontier": lambda: frontier_figure(runs, metric, methods, colors, names),
        "time_breakdown": lambda: time_breakdown_figure(runs, methods, names),
    }
    folder = Path(outputs[0]).parent
    folder.mkdir(parents=True, exist_ok=True)
    for stem in dict.fromkeys(Path(p).stem for p in outputs):
        fig = figures[stem]()
        for ext in ("pdf", "png"):
            fig.savefig(folder / f"{stem}.{ext}", dpi=150)
        plt.close(fig)


if __name__ == "__main__" and "snakemake" in globals():
    sys.stderr = open(snakemake.log[0], "w")
    main(snakemake.input[0], list(snakemake.output), snakemake.params.metric, list(snakemake.params.algos),
         dict(snakemake.params.names))
