"""Run folders -> results/summary.csv, tidy: profile, task, algo, seed, step, metric, value.

Reads only files inside run folders (the path scheme is in workflow/Snakefile):

  runs/{profile}/{task}/{algo}/seed{seed}/metrics.jsonl   every numeric field of every row, at its step
  runs/.../timing.tsv                                      Snakemake benchmark: `bench/<column>` at the last step
  runs/.../eval/step{N}.json                               lm-eval: `lm_eval/<lm task>/<metric>` at step N
  base/{profile}/pretrain.json                             the base's test scores `pretrain/<metric>`,
                                                           `pretrain/minutes`, `pretrain/parameters`
  base/{profile}/timing.tsv                                the pretraining job's benchmark: `bench/<column>`
  base/{profile}/eval/*.json                               lm-eval of the base, as for runs

Base rows have algo `base`, seed 0 and step 0, and are written once per training task (the base is the
step-0 model of every run of that task).

Each run's runs/.../test_items.jsonl (the shared evaluation's reward per test item) -> results/items.csv:
profile, task, algo, seed, step, item, reward, for the run's first and last evaluation (the base and the final
model, compared item by item in the results table).
"""


import csv
import json
import re
import sys
from pathlib import Path

COLUMNS = ["profile", "task", "algo", "seed", "step", "metric", "value"]
ITEM_COLUMNS = ["profile", "task", "algo", "seed", "step", "item", "reward"]
RUN = re.compile(r"runs/(?P<profile>[^/]+)/(?P<task>[^/]+)/(?P<algo>[^/]+)/seed(?P<seed>\d+)/")
BASE = re.compile(r"base/(?P<profile>[^/]+)/")
EVAL = re.compile(r"step(?P<step>\d+)\.json$")


def number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def metrics_rows(path: Path) -> list[tuple[int, str, float]]:
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            rows += [(int(record["step"]), k, number(v)) for k, v in sorted(record.items())
                     if k != "step" and number(v) is not None]
    return rows


def timing_rows(path: Path) -> list[tuple[str, float]]:
    """Snakemake's benchmark TSV: s, max_rss, cpu_time, ...; the h:m:s column and '-' placeholders skipped."""
    with path.open() as f:
        record = next(csv.DictReader(f, delimiter="\t"))
    rows = []
    for column, value in record.items():
        try:
            rows.append((f"bench/{column}", float(value)))
        except ValueError:
            pass
    return rows


def lm_eval_rows(path: Path, prefix: str) -> list[tuple[str, float]]:
    """`python -m harness eval`'s JSON: lm-eval's {"results": {task: {"metric,filter": value}}} (stderrs
    dropped, the filter kept unless it is "none") and our {"harness": {"tasks": {task: {"nfe_mean": ..,
    "seconds": ..}}}}."""
    data = json.loads(path.read_text())
    rows = []
    for task, scores in sorted(data["results"].items()):
        for name, value in sorted(scores.items()):
            metric, _, filt = name.partition(",")
            if number(value) is not None and "stderr" not in metric:
                rows.append((f"{prefix}/{task}/{metric}" + (f"/{filt}" if filt not in ("", "none") else ""),
                             number(value)))
    for task, fields in sorted(data["harness"]["tasks"].items()):
        rows += [(f"{prefix}/{task}/{k}", number(v)) for k, v in sorted(fields.items()) if number(v) is not None]
    return rows


def eval_rows(path: Path) -> list[tuple[int, str, float]]:
    match = EVAL.search(path.name)
    if match is None:
        raise ValueError(f"{path}: an lm-eval file must be named step<N>.json")
    return [(int(match["step"]), m, v) for m, v in lm_eval_rows(path, "lm_eval")]


def pretrain_rows(path: Path) -> list[tuple[str, float, str | None]]:
    """(metric, value, task or None for all tasks) from pretrain.json: {"test": {task: {metric: v}}, ...}."""
    data = json.loads(path.read_text())
    rows = [(f"pretrain/{m}", number(v), task) for task, scores in sorted(data["test"].items())
            for m, v in sorted(scores.items()) if number(v) is not None]
    return rows + [(f"pretrain/{k}", float(data[k]), None) for k in ("minutes", "parameters")]


def aggregate(paths: list[str], tasks: list[str]) -> list[dict]:
    runs: dict[tuple, list[Path]] = {}
    base: dict[str, list[Path]] = {}
    for p in map(Path, paths):
        if match := RUN.search(p.as_posix()):
            runs.setdefault((match["profile"], match["task"], match["algo"], int(match["seed"])), []).append(p)
        elif match := BASE.search(p.as_posix()):
            base.setdefault(match["profile"], []).append(p)
        else:
            raise ValueError(f"{p} is not inside a run folder (results/runs/...) or the base (results/base/...)")

    rows = []
    for (profile, task, algo, seed), files in runs.items():
        key = {"profile": profile, "task": task, "algo": algo, "seed": seed}
        metrics = [f for f in files if f.name == "metrics.jsonl"]
        if not metrics:
            raise FileNotFoundError(f"{'/'.join(map(str, key.values()))}: no metrics.jsonl among the inputs")
        found = metrics_rows(metrics[0])
        last = max(step for step, _, _ in found)
        for f in files:
            if f.name == "timing.tsv":
                found += [(last, m, v) for m, v in timing_rows(f)]
            elif f.parent.name == "eval" and f.suffix == ".json":
                found += eval_rows(f)
        rows += [{**key, "step": step, "metric": m, "value": v} for step, m, v in found]

    for profile, files in base.items():
        found = []  # (metric, value, task or None)
        for f in files:
            if f.name == "pretrain.json":
                found += pretrain_rows(f)
            elif f.name == "timing.tsv":
                found += [(m, v, None) for m, v in timing_rows(f)]
            elif f.parent.name == "eval" and f.suffix == ".json":
                found += [(m, v, None) for _, m, v in eval_rows(f)]
        rows += [{"profile": profile, "task": task, "algo": "base", "seed": 0, "step": 0, "metric": m, "value": v}
                 for m, v, only in found for task in tasks if only in (None, task)]
    rows.sort(key=lambda r: (r["profile"], r["task"], r["algo"], r["seed"], r["step"], r["metric"]))
    return rows


def item_rows(paths: list[str]) -> list[dict]:
    rows = []
    for p in map(Path, paths):
        if p.name == "test_items.jsonl" and (match := RUN.search(p.as_posix())):
            evals = [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
            key = {**match.groupdict(), "seed": int(match["seed"])}
            for e in {e["step"]: e for e in evals[:1] + evals[-1:]}.values():
                rows += [{**key, "step": e["step"], "item": i, "reward": r} for i, r in enumerate(e["reward"])]
    return rows


def write(rows: list[dict], path: str, columns: list[str] = COLUMNS) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(path).with_name(f".{Path(path).name}.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)


if __name__ == "__main__" and "snakemake" in globals():
    sys.stderr = open(snakemake.log[0], "w")
    rows = aggregate(list(snakemake.input), list(snakemake.params.tasks))
    write(rows, snakemake.output.summary)
    print(f"{len(rows)} rows from {len(snakemake.input)} files -> {snakemake.output.summary}", file=sys.stderr)
    items = item_rows(list(snakemake.input))
    write(items, snakemake.output.test_items, ITEM_COLUMNS)
    print(f"{len(items)} item rows -> {snakemake.output.test_items}", file=sys.stderr)
