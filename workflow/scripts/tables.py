"""results/{summary,items}.csv, paper/reported.csv -> paper/tables/{results,compute,reference[,lm_eval]}.{md,tex}.

results    per task and method: the final test metric (the in-training evaluation with the shared greedy
           sampler, eval/<metric>) as mean [95% bootstrap CI] over seeds in %, its mean NFE, and the reward
           gained over the base on the same test items (items.csv: each item's final minus step-0 reward,
           averaged over seeds; mean [95% bootstrap CI over items] in points); the base row is the step-0
           evaluation of the same runs; a method that decodes with its own sampler (eval_own/*) gets a second
           row for it
compute    per task and method, means over seeds: forward passes (rollout + scoring + training), training
           time (sum of time/step), the job's wall time and peak memory (Snakemake benchmark; not its cpu_time,
           which Snakemake samples and stops updating after 30 s); the base row is the pretraining job
reference  the papers' reported numbers, each with its source (paper/reported.csv); never our results
lm_eval    the final models' lm-eval scores on the real benchmarks per task and metric (rows) and method
           (columns), mean [95% CI] over the seeds evaluated (a one-line note when the summary has none:
           lm_eval.benchmarks is empty)
"""


import sys
from pathlib import Path

import pandas as pd

from stats import final, load, mean_ci, name, order


def cell(values, scale: float = 100.0, digits: int = 1) -> str:
    mean, low, high = mean_ci(values)
    if pd.isna(mean):
        return "–"
    if pd.isna(low) or low == high:
        return f"{scale * mean:.{digits}f}"
    return f"{scale * mean:.{digits}f} [{scale * low:.{digits}f}, {scale * high:.{digits}f}]"


def gains(items: pd.DataFrame) -> pd.Series:
    """Per test item (the runs of one task and method): the last evaluation's reward minus the first's (the
    base's), averaged over seeds."""
    steps = items.groupby("seed").step
    first = items[items.step == steps.transform("min")].set_index(["seed", "item"]).reward
    last = items[items.step == steps.transform("max")].set_index(["seed", "item"]).reward
    return (last - first).groupby("item").mean()


def results_table(summary: pd.DataFrame, metric: str, algos: list[str], names: dict,
                  items: pd.DataFrame) -> pd.DataFrame:
    tasks = sorted(summary.task.unique())
    runs = summary[summary.algo != "base"]
    step0 = runs[runs.step == 0]
    table = {"method": ["base"]}
    for task in tasks:
        at0 = step0[step0.task == task]
        table[f"{task} {metric} %"] = [cell(at0[at0.metric == f"eval/{metric}"].value)]
        table[f"{task} NFE"] = [cell(at0[at0.metric == "eval/nfe"].value, 1.0)]
        table[f"{task} reward gain, paired"] = ["–"]
    for algo in order(algos, runs.algo.unique()):
        for prefix, label in (("eval", name(algo, names)), ("eval_own", f"{name(algo, names)}, own decoding")):
            if prefix == "eval_own" and not (runs[runs.algo == algo].metric == f"eval_own/{metric}").any():
                continue
            table["method"].append(label)
            for task in tasks:
                for column, m, scale in ((f"{task} {metric} %", metric, 100.0), (f"{task} NFE", "nfe", 1.0)):
                    values = final(runs, f"{prefix}/{m}")
                    table[column].append(cell(values[(values.task == task) & (values.algo == algo)].value, scale))
                paired = items[(items.task == task) & (items.algo == algo)]
                table[f"{task} reward gain, paired"].append(
                    cell(gains(paired)) if prefix == "eval" and not paired.empty else "–")
    return pd.DataFrame(table)


def per_run_total(summary: pd.DataFrame, metrics: list[str]) -> pd.Series:
    rows = summary[summary.metric.isin(metrics)]
    return rows.groupby(["task", "algo", "seed"]).value.sum()


def compute_table(summary: pd.DataFrame, algos: list[str], names: dict) -> pd.DataFrame:
    """Means over seeds of per-run totals; the base row is the pretraining job."""
    runs, base = summary[summary.algo != "base"], summary[summary.algo == "base"]
    columns = {"forward passes": ["forward/rollout", "forward/scoring", "forward/training"],
               "training time s": ["time/step"], "job wall time s": ["bench/s"],
               "peak memory MB": ["bench/max_rss"]}
    totals = pd.DataFrame({c: per_run_total(runs, m) for c, m in columns.items()}).reindex(columns=list(columns))
    means = totals.groupby(["task", "algo"]).mean()
    base = base[base.task == base.task.min()].set_index("metric").value
    rows = [{"task": "all", "method": "base (pretraining)", "forward passes": "–",
             "training time s": num(60 * base.get("pretrain/minutes", float("nan")), 0),
             **{c: num(base.get(m[0], float("nan")), 0) for c, m in columns.items() if m[0].startswith("bench/")}}]
    for task in sorted(runs.task.unique()):
        for algo in order(algos, runs[runs.task == task].algo.unique()):
            row = means.loc[(task, algo)]
            rows.append({"task": task, "method": name(algo, names),
                         **{c: num(row[c], 1 if c.endswith(" s") else 0) for c in columns}})
    return pd.DataFrame(rows)


def num(value: float, digits: int) -> str:
    return "–" if pd.isna(value) else f"{value:.{digits}f}"


def lm_eval_table(summary: pd.DataFrame, algos: list[str], names: dict) -> pd.DataFrame:
    """One row per training task and lm-eval metric, one column per method (the base first)."""
    lm = summary[summary.metric.str.startswith("lm_eval/") & ~summary.metric.str.endswith(("/seconds", "/sample_len"))]
    if lm.empty:
        return pd.DataFrame({"lm-eval": ["no lm-eval results in results/summary.csv (config lm_eval.benchmarks is empty)"]})
    methods = ["base", *order(algos, lm.algo.unique())]
    rows = []
    for task in sorted(lm.task.unique()):
        for metric in sorted(lm[lm.task == task].metric.unique()):
            values = final(lm[lm.task == task], metric)
            rows.append({"task": task, "lm-eval metric": metric.removeprefix("lm_eval/"),
                         **{name(a, names): cell(values[values.algo == a].value, 1.0, 3) for a in methods}})
    return pd.DataFrame(rows)


def reference_table(path) -> pd.DataFrame:
    reported = pd.read_csv(path, dtype=str, comment="#")
    return reported[["method", "model", "benchmark", "setting", "value", "source"]]


def write(table: pd.DataFrame, folder: Path, stem: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{stem}.md").write_text(table.to_markdown(index=False, disable_numparse=True) + "\n")
    (folder / f"{stem}.tex").write_text(table.to_latex(index=False, escape=True))


def main(summary_path, items_path, reported_path, outputs: list[str], metric: str, algos: list[str],
         names: dict) -> None:
    summary = load(summary_path)
    tables = {"results": lambda: results_table(summary, metric, algos, names, load(items_path)),
              "compute": lambda: compute_table(summary, algos, names),
              "reference": lambda: reference_table(reported_path),
              "lm_eval": lambda: lm_eval_table(summary, algos, names)}
    for stem in dict.fromkeys(Path(p).stem for p in outputs):
        write(tables[stem](), Path(outputs[0]).parent, stem)


if __name__ == "__main__" and "snakemake" in globals():
    sys.stderr = open(snakemake.log[0], "w")
    main(snakemake.input.summary, snakemake.input.test_items, snakemake.input.reported, list(snakemake.output),
         snakemake.params.metric, list(snakemake.params.algos), dict(snakemake.params.names))
