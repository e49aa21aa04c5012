"""What tables.py and figures.py share: the summary's final values per run, mean with a 95% bootstrap CI
over seeds, and method order and display names."""


import numpy as np
import pandas as pd
from scipy.stats import bootstrap

CONFIDENCE = 0.95
RESAMPLES = 2000


def mean_ci(values) -> tuple[float, float, float]:
    """(mean, low, high): percentile bootstrap of the mean over seeds. The CI is (nan, nan) for one seed and
    (mean, mean) when every seed agrees (the bootstrap distribution is then a point)."""
    x = np.asarray(values, dtype=float)
    x = x[~np.isnan(x)]
    if x.size == 0:
        return float("nan"), float("nan"), float("nan")
    mean = float(x.mean())
    if x.size == 1:
        return mean, float("nan"), float("nan")
    if np.all(x == x[0]):
        return mean, mean, mean
    ci = bootstrap((x,), np.mean, confidence_level=CONFIDENCE, n_resamples=RESAMPLES, method="percentile",
                   rng=np.random.default_rng(0)).confidence_interval
    return mean, float(ci.low), float(ci.high)


def load(path) -> pd.DataFrame:
    return pd.read_csv(path, dtype={"profile": str, "task": str, "algo": str, "metric": str})


def final(summary: pd.DataFrame, metric: str) -> pd.DataFrame:
    """`metric` at each run's last step at which it was logged: columns task, algo, seed, step, value."""
    rows = summary[summary.metric == metric]
    last = rows.groupby(["task", "algo", "seed"]).step.transform("max")
    return rows[rows.step == last][["task", "algo", "seed", "step", "value"]]


def order(algos, present) -> list[str]:
    """The configured methods in their order, then any other method found in the summary."""
    present = set(present) - {"base"}
    return [a for a in algos if a in present] + sorted(present - set(algos))


def name(algo: str, names: dict) -> str:
    return names.get(algo, algo)
