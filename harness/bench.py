"""`python -m harness.bench`: how fast the sampler and the RL step are, measured side by side.

Every timed figure is a ratio of two things measured in this process, interleaved (one call of each per
round, after an untimed warm-up round), as the median over rounds of the per-round ratio, with a fixed
thread count and the machine's matmul peak measured in every round. Load from other processes then
hits both sides of a ratio alike; absolute times and fractions of peak are only as good as the machine
was quiet (run.json records the load average before and after).

Figures (the metrics of docs/performance.md §4):
  equal_steps.csv     speed-up over LLaDA's reference sampler (harness/reference.py) at the same steps, one
                      token per step, for the exact mode and the prefix / dual K/V caches, with the
                      fraction of completion tokens equal to the reference's at temperature 0; workloads:
                      the task's own lengths, a longer canvas of several blocks, and an RL rollout batch
                      (TrainConfig's prompts x group size at its sampling temperature)
  frontier.csv        accuracy against forward passes and FLOPs for fixed-step, threshold and entropy-bounded
                      decoding, uncached and with the dual cache (counted, not timed), with the paired
                      bootstrap 95% interval of the accuracy difference to the reference
  equal_accuracy.csv  the cheapest setting of the frontier whose accuracy is within 1 point of the
                      reference's, timed against the reference and the exact mode
  forward.csv         one forward pass: FLOPs (counted) and fraction of the fp32 matmul peak
  allocator.csv       the allocator settings of harness/__init__.py against glibc's default (process-wide,
                      so measured in alternating fresh processes: the one figure not from this process)
  rl_step.csv         per method (every module in algorithms/): RL step time and its rollout / scoring /
                      update shares, from `harness.train` with its default sampler
  table.md, table.tex the summary table against the targets; printed at the end
FLOPs are counted by torch.utils.flop_counter (matmuls and attention), per generated completion token.
A trained model is needed (random weights make confidence meaningless): --model, else results/base, else a
small base is trained into {out}/base with harness.pretrain.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy.stats import bootstrap
from torch.utils.flop_counter import FlopCounterMode, flop_registry, register_flop_formula

import algorithms
import benchmarks
from harness import reference, runs
from harness.cli import add_fields, build
from harness.model import load
from harness.pretrain import PretrainConfig, pretrain
from harness.rollout import decode, encode_prompts
from harness.sampler import SamplerConfig, generate
from harness.tiny import TinyMDLM, TinyMDLMConfig
from harness.train import TrainConfig, train

TARGETS = {"exact": 1.1, "cached": 3.5, "equal_accuracy": 8.0, "forward": 0.65, "sampler": 0.50, "rollout": 0.50}


@dataclass(frozen=True)
class BenchConfig:
    model: str = ""
    """trained tiny MDM folder; empty = results/base if present, else a base is trained into {out}/base"""
    out: str = "results/perf"
    """folder for the CSV files, table.md, table.tex and run.json"""
    task: str = "arithmetic"
    """task of the prompts, of the equal-accuracy figure and of the RL steps"""
    threads: int = 2
    """torch CPU threads, fixed for every measurement"""
    repeats: int = 5
    """timed rounds per figure; each figure is the median over rounds"""
    batch: int = 128
    """rows per sampler call (an RL rollout batch: 16 prompts x G = 8)"""
    long_length: int = 64
    """completion length of the long-canvas workload (one token per step)"""
    long_block: int = 16
    """block length of the long-canvas workload"""
    eval_limit: int = 0
    """test items of the equal-accuracy figure; 0 = the whole test split"""
    train_steps: int = 5
    """RL steps per method for the step breakdown; 0 skips it"""
    pretrain_tasks: str = "arithmetic:1500"
    """budget of the base that is trained when no model is found (harness pretrain --tasks)"""


@register_flop_formula(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu)
def _cpu_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """Q K^T and the weighted sum of V; torch counts this kernel only on GPUs."""
    b, h, q, d = query_shape
    return 2 * b * h * q * key_shape[-2] * (d + value_shape[-1])


def counted(fn):
    """(result of fn(), model FLOPs it ran)."""
    with FlopCounterMode(display=False) as counter:
        result = fn()
    return result, counter.get_total_flops()


class Peak:
    """The fp32 matmul peak: one call = a [4096 x 256] x [256 x 1024] product five times (an FFN-sized GEMM)."""

    flops = 5 * 2 * 4096 * 256 * 1024

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.a, self.b = torch.randn(4096, 256, generator=g), torch.randn(256, 1024, generator=g)

    def __call__(self):
        for _ in range(5):
            torch.mm(self.a, self.b)


def interleaved(fns: dict, repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each function over `repeats` rounds, one call of each per round, after a warm-up
    round; every other round runs them in reverse order, so that a drifting load favours none."""
    times = {name: [] for name in fns}
    for r in range(repeats + 1):
        for name in (list(fns) if r % 2 else list(fns)[::-1]):
            start = time.perf_counter()
            fns[name]()
            if r:
                times[name].append(time.perf_counter() - start)
    return times


def median_ratio(num: list[float], den: list[float]) -> float:
    return statistics.median(a / b for a, b in zip(num, den))


def peak_gflops(times: dict[str, list[float]]) -> float:
    return Peak.flops / statistics.median(times["peak"]) / 1e9


def prompts(tokenizer, task, examples):
    return encode_prompts(tokenizer, [task.prompt(e) for e in examples])


def take(task, n: int) -> list[dict]:
    """n examples of the test split (cycled if it is shorter)."""
    test = task.load("test")
    return [test[i % len(test)] for i in range(n)]


def equal_steps(model, tokenizer, task, cfg: BenchConfig) -> pd.DataFrame:
    """Reference vs exact / prefix / dual at one token per step."""
    rl = TrainConfig()
    workloads = {  # name: prompts, copies of each, completion length, block length, temperature
        "task": (cfg.batch, 1, task.GEN_LENGTH, task.BLOCK_LENGTH, 0.0),
        "long": (cfg.batch, 1, cfg.long_length, cfg.long_block, 0.0),
        "rollout": (rl.prompts_per_step, rl.group_size, task.GEN_LENGTH, task.BLOCK_LENGTH, rl.sampler.temperature),
    }
    rows = []
    for workload, (n, copies, L, block, temperature) in workloads.items():
        ids, mask = prompts(tokenizer, task, [e for e in take(task, n) for _ in range(copies)])
        P, sampler = ids.shape[1], SamplerConfig(gen_length=L, block_length=block, steps=L, temperature=temperature)
        fns = {"reference": lambda: reference.generate(model, ids, mask, steps=L, gen_length=L, block_length=block,
                                                       temperature=temperature, generator=torch.Generator().manual_seed(0))[:, P:]}
        for cache in ("none", "prefix", "dual"):
            fns["exact" if cache == "none" else cache] = lambda c=cache: generate(
                model, ids, mask, replace(sampler, cache=c), torch.Generator().manual_seed(0)).completion
        outputs, flops = {}, {}
        for name, fn in fns.items():
            outputs[name], flops[name] = counted(fn)
        canvas = torch.cat([ids, torch.full((len(ids), L), model.config.mask_token_id)], 1)
        per_token_forward = counted(lambda: model(input_ids=canvas))[1] / canvas.numel()
        print(f"equal steps, {workload}: B={len(ids)} prompt={P} gen={L} block={block} steps={L} "
              f"temperature={temperature}", flush=True)
        times = interleaved({**fns, "peak": Peak()}, cfg.repeats)
        peak = peak_gflops(times)
        for name in fns:
            t, per_token = statistics.median(times[name]), flops[name] / outputs[name].numel()
            rows.append({
                "workload": workload, "sampler": name, "batch": len(ids), "prompt_length": P, "gen_length": L,
                "block_length": block, "steps": L, "temperature": temperature, "seconds": t,
                "best_seconds": min(times[name]), "speedup": median_ratio(times["reference"], times[name]),
                # samples at temperature > 0 come from different random streams: no token comparison
                "token_match": (outputs[name] == outputs["reference"]).float().mean().item() if temperature == 0 else None,
                "flops_per_token": per_token, "amplification": per_token / per_token_forward,
                "gflops": flops[name] / t / 1e9, "peak_fraction": flops[name] / t / 1e9 / peak, "peak_gflops": peak,
            })
    return pd.DataFrame(rows)


def settings(task) -> dict[str, SamplerConfig]:
    """The frontier: fixed steps, threshold and entropy-bounded decoding, uncached and with the dual cache."""
    L, block = task.GEN_LENGTH, task.BLOCK_LENGTH
    base, out = SamplerConfig(gen_length=L, block_length=block, steps=L), {}
    for cache in ("none", "dual"):
        steps = L
        while steps >= L // block and steps % (L // block) == 0:
            out[f"steps={steps} cache={cache}"] = replace(base, steps=steps, cache=cache)
            steps //= 2
        for tau in (0.5, 0.7, 0.8, 0.9, 0.95, 0.99):
            out[f"threshold={tau} cache={cache}"] = replace(base, decoding="threshold", threshold=tau, cache=cache)
        for gamma in (0.01, 0.1, 0.3, 1.0):
            out[f"eb={gamma} cache={cache}"] = replace(base, decoding="eb", eb_gamma=gamma, cache=cache)
    return out


def equal_accuracy(model, tokenizer, task, cfg: BenchConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The accuracy / forward-pass frontier on the whole test split, and the speed-up at equal accuracy."""
    examples = task.load("test")[: cfg.eval_limit or None]
    chunks = [prompts(tokenizer, task, examples[i:i + cfg.batch]) for i in range(0, len(examples), cfg.batch)]
    L, block = task.GEN_LENGTH, task.BLOCK_LENGTH

    def run(sampler: SamplerConfig | None):
        """Completions of the whole split, mean NFE per row, batched forward passes."""
        out, nfe, passes = [], [], 0
        for ids, mask in chunks:
            if sampler is None:
                out.append(reference.generate(model, ids, mask, steps=L, gen_length=L, block_length=block)[:, ids.shape[1]:])
                nfe.append(torch.full((len(ids),), L))
                passes += L
            else:
                traj = generate(model, ids, mask, sampler)
                out.append(traj.completion)
                nfe.append(traj.nfe)
                passes += traj.forward_passes
        return torch.cat(out), torch.cat(nfe).float().mean().item(), passes

    def rewards(completion):
        return np.array([task.reward(t, e) for t, e in zip(decode(tokenizer, completion), examples)])

    (ref_out, _, ref_passes), ref_flops = counted(lambda: run(None))
    ref_rewards = rewards(ref_out)
    frontier = [{"setting": "reference", "accuracy": ref_rewards.mean(), "delta": 0.0, "delta_low": 0.0,
                 "delta_high": 0.0, "nfe": float(L), "forward_passes": ref_passes,
                 "flops_per_token": ref_flops / ref_out.numel(), "token_match": 1.0}]
    print(f"frontier: {len(settings(task))} settings on {len(examples)} test items", flush=True)
    for name, sampler in settings(task).items():
        (out, nfe, passes), flops = counted(lambda s=sampler: run(s))
        diff = rewards(out) - ref_rewards
        low, high = (bootstrap((diff,), np.mean, n_resamples=2000, random_state=0).confidence_interval
                     if diff.std() > 0 else (diff.mean(), diff.mean()))
        frontier.append({"setting": name, "accuracy": ref_rewards.mean() + diff.mean(), "delta": diff.mean(),
                         "delta_low": low, "delta_high": high, "nfe": nfe, "forward_passes": passes,
                         "flops_per_token": flops / out.numel(), "token_match": (out == ref_out).float().mean().item()})
    frontier = pd.DataFrame(frontier)
    frontier["cached"] = frontier.setting.str.endswith("cache=dual")
    equal = frontier[(frontier.delta >= -0.01) & (frontier.setting != "reference")]
    pick = equal.sort_values(["flops_per_token", "cached", "setting"]).iloc[0].setting  # ties: uncached first
    timed = {"reference": lambda: run(None), f"steps={L} cache=none": lambda: run(settings(task)[f"steps={L} cache=none"]),
             pick: lambda: run(settings(task)[pick])}
    print(f"equal accuracy: timing {pick!r} against the reference", flush=True)
    times = interleaved({**timed, "peak": Peak()}, cfg.repeats)
    rows = [{**frontier.set_index("setting").loc[name].to_dict(), "setting": name, "seconds": statistics.median(times[name]),
             "speedup": median_ratio(times["reference"], times[name]), "chosen": name == pick} for name in timed]
    return frontier, pd.DataFrame(rows)


def forward(model, tokenizer, cfg: BenchConfig) -> pd.DataFrame:
    """One forward pass at B32 x L128 (the anchor shape of performance.md) for the bench model and, for
    comparison, a random tiny model of the anchor's width (d256)."""
    wide = TinyMDLM(TinyMDLMConfig(vocab_size=model.config.vocab_size, hidden_size=256, intermediate_size=768,
                                   num_attention_heads=4, num_hidden_layers=4)).eval()
    x = torch.randint(0, model.config.vocab_size, (32, 128), generator=torch.Generator().manual_seed(0))
    models = {f"bench model d{model.config.hidden_size}": model, "tiny d256": wide}
    flops = {name: counted(lambda m=m: m(input_ids=x))[1] for name, m in models.items()}
    with torch.no_grad():
        times = interleaved({**{name: lambda m=m: m(input_ids=x) for name, m in models.items()}, "peak": Peak()},
                            cfg.repeats)
    peak = peak_gflops(times)
    return pd.DataFrame([{"model": name, "shape": "B32 x L128", "seconds": statistics.median(times[name]),
                          "gflops": flops[name] / statistics.median(times[name]) / 1e9, "peak_gflops": peak,
                          "peak_fraction": flops[name] / statistics.median(times[name]) / 1e9 / peak}
                         for name in models])


def rl_step(model_dir: Path, cfg: BenchConfig) -> pd.DataFrame:
    """`harness.train` for a few steps per method with its defaults; time shares of each step's phases."""
    rows = []
    for name in algorithms.ALGORITHMS:
        with tempfile.TemporaryDirectory() as tmp:
            train(TrainConfig(algo=name, task=cfg.task, model=str(model_dir), out=tmp, steps=cfg.train_steps,
                              eval_every=10**9, eval_limit=8, save_every=10**9, threads=cfg.threads))
            steps = [r for r in runs.read_metrics(Path(tmp) / "metrics.jsonl") if r["step"] > 0]
        total = sum(r["time/step"] for r in steps)  # shares of the summed step time, so they add up to 1
        share = {p: sum(r[f"time/{p}"] for r in steps) / total for p in ("rollout", "scoring", "update")}
        rows.append({"method": name, "steps": len(steps), "step_seconds": statistics.median(r["time/step"] for r in steps),
                     **{f"{p}_share": v for p, v in share.items()},
                     **{f"forward_{p}": steps[-1][f"forward/{p}"] for p in ("rollout", "scoring", "training")}})
    return pd.DataFrame(rows)


ALLOCATOR_CHILD = """
import importlib.util, statistics, sys, time, torch
folder, tiny_py, tuned, threads, batch, length, passes, rounds = sys.argv[1:]
if tuned == "1":
    import harness  # noqa: F401  (its import applies the allocator settings)
spec = importlib.util.spec_from_file_location("tiny_standalone", tiny_py)
tiny = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tiny)
torch.set_num_threads(int(threads))
model = tiny.TinyMDLM.from_pretrained(folder).eval()
x = torch.randint(0, model.config.vocab_size, (int(batch), int(length)), generator=torch.Generator().manual_seed(0))
times = []
with torch.no_grad():
    for _ in range(int(rounds) + 1):
        start = time.perf_counter()
        for _ in range(int(passes)):
            model(input_ids=x)
        times.append(time.perf_counter() - start)
print(statistics.median(times[1:]))
"""


def allocator(model_dir: Path, tokenizer, task, cfg: BenchConfig) -> pd.DataFrame:
    """The allocator settings against glibc's default. They are process-wide, so this one figure alternates
    two fresh processes (default, tuned, default, ...) that run the forward passes of one RL rollout batch."""
    rl = TrainConfig()
    batch = rl.prompts_per_step * rl.group_size
    length = prompts(tokenizer, task, take(task, 1))[0].shape[1] + task.GEN_LENGTH
    times = {"0": [], "1": []}
    print(f"allocator: {cfg.repeats} pairs of processes", flush=True)
    for _ in range(cfg.repeats):
        for tuned in times:
            out = subprocess.run([sys.executable, "-c", ALLOCATOR_CHILD, str(model_dir), str(Path(__file__).with_name("tiny.py")),
                                  tuned, str(cfg.threads), str(batch), str(length), str(task.STEPS), "3"],
                                 capture_output=True, text=True, check=True, cwd=Path(__file__).parents[1])
            times[tuned].append(float(out.stdout.strip().splitlines()[-1]))
    return pd.DataFrame([{"batch": batch, "length": length, "passes": task.STEPS,
                          "default_seconds": statistics.median(times["0"]), "tuned_seconds": statistics.median(times["1"]),
                          "speedup": median_ratio(times["0"], times["1"])}])


def summary(steps: pd.DataFrame, acc: pd.DataFrame, fwd: pd.DataFrame, alloc: pd.DataFrame,
            rl: pd.DataFrame | None) -> pd.DataFrame:
    def at(workload, sampler):
        return steps[(steps.workload == workload) & (steps.sampler == sampler)].iloc[0]

    def tokens(row) -> str:
        return "" if pd.isna(row.token_match) else f", tokens {row.token_match:.1%}"

    rows = []
    for workload in steps.workload.unique():
        e, d = at(workload, "exact"), at(workload, "dual")
        where = (f"B{e.batch}, prompt {e.prompt_length}, gen {e.gen_length}, block {e.block_length}, {e.steps} steps, "
                 f"T={e.temperature:g}")
        ref_flops = at(workload, "reference").flops_per_token
        exact_ok = e.speedup >= TARGETS["exact"] and (pd.isna(e.token_match) or e.token_match == 1)
        rows.append(("exact mode vs reference, equal steps", where,
                     f"{e.speedup:.2f}x (FLOPs {ref_flops / e.flops_per_token:.2f}x){tokens(e)}", "≥1.1x, 100%", exact_ok))
        rows.append(("dual cache vs reference, equal steps", where,
                     f"{d.speedup:.2f}x (FLOPs {ref_flops / d.flops_per_token:.2f}x){tokens(d)}", "≥3.5x",
                     d.speedup >= TARGETS["cached"]))
        rows.append(("FLOPs per generated token (reference / exact / dual)", where,
                     f"{ref_flops / 1e6:.1f} / {e.flops_per_token / 1e6:.1f} / "
                     f"{d.flops_per_token / 1e6:.1f} MFLOP", "", None))
        rows.append(("sampler fraction of fp32 peak (exact / dual)", where,
                     f"{e.peak_fraction:.0%} / {d.peak_fraction:.0%}", "≥50%",
                     min(e.peak_fraction, d.peak_fraction) >= TARGETS["sampler"]))
    best, ref = acc[acc.chosen].iloc[0], acc[acc.setting == "reference"].iloc[0]
    rows.append(("speed-up at equal accuracy", f"{best.setting}: accuracy {best.accuracy:.1%} "
                 f"(Δ {best.delta:+.1%}), NFE {best.nfe:.2f}",
                 f"{best.speedup:.2f}x (FLOPs {ref.flops_per_token / best.flops_per_token:.2f}x)", "≥8x",
                 best.speedup >= TARGETS["equal_accuracy"]))
    for r in fwd.itertuples():
        rows.append((f"forward fraction of fp32 peak ({r.model})", r.shape, f"{r.peak_fraction:.0%}", "≥65%",
                     r.peak_fraction >= TARGETS["forward"]))
    a = alloc.iloc[0]
    rows.append(("allocator settings (harness/__init__.py) vs glibc's default", f"{a.passes:.0f} forward passes of "
                 f"B{a.batch:.0f} x L{a.length:.0f}, separate processes", f"{a.speedup:.2f}x", "", None))
    for r in (rl.itertuples() if rl is not None else []):
        rows.append((f"RL step {r.method}: rollout / scoring / update", f"{r.step_seconds:.2f} s per step",
                     f"{r.rollout_share:.0%} / {r.scoring_share:.0%} / {r.update_share:.0%}", "rollout ≤50%",
                     r.rollout_share <= TARGETS["rollout"]))
    table = pd.DataFrame(rows, columns=["figure", "setting", "measured", "target", "met"])
    table["met"] = table.met.map({True: "yes", False: "no", None: ""})
    return table


def to_latex(table: pd.DataFrame) -> str:
    def esc(text: str) -> str:
        for a, b in (("\\", r"\textbackslash{}"), ("%", r"\%"), ("_", r"\_"), ("&", r"\&"), ("#", r"\#"),
                     ("≥", r"$\geq$"), ("≤", r"$\leq$"), ("Δ", r"$\Delta$"), ("γ", r"$\gamma$")):
            text = text.replace(a, b)
        return text

    lines = [r"\begin{tabular}{llllc}", r"\toprule", " & ".join(map(str.capitalize, table.columns)) + r" \\", r"\midrule"]
    lines += [" & ".join(esc(str(v)) for v in row) + r" \\" for row in table.itertuples(index=False)]
    return "\n".join(lines + [r"\bottomrule", r"\end{tabular}", ""])


def resolve_model(cfg: BenchConfig) -> Path:
    if cfg.model:
        return Path(cfg.model)
    if Path("results/base").is_dir():
        return Path("results/base")
    folder = Path(cfg.out) / "base"
    if not folder.is_dir():
        print(f"no trained model given and no results/base: training one into {folder}", flush=True)
        pretrain(PretrainConfig(out=str(folder), tasks=cfg.pretrain_tasks, threads=cfg.threads, eval_limit=64))
    return folder


def main(argv: list[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(prog="python -m harness.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    add_fields(parser, BenchConfig())
    cfg = build(BenchConfig(), vars(parser.parse_args(argv)))
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(0)
    out, task = Path(cfg.out), benchmarks.get(cfg.task)
    model_dir = resolve_model(cfg)
    model, tokenizer = load(model_dir)
    load_before, started = os.getloadavg(), time.time()
    if load_before[0] + cfg.threads > os.cpu_count() + 0.5:
        print(f"warning: load average {load_before[0]:.1f} on {os.cpu_count()} CPUs: other processes compete for the "
              f"cores. Ratios hold up better than absolute times; rerun on a quiet machine for the record"
              + (" (with more threads than free cores OpenMP collapses: try --threads 1)" if cfg.threads > 1 else ""),
              flush=True)
    steps = equal_steps(model, tokenizer, task, cfg)
    frontier, acc = equal_accuracy(model, tokenizer, task, cfg)
    fwd = forward(model, tokenizer, cfg)
    alloc = allocator(model_dir, tokenizer, task, cfg)
    rl = rl_step(model_dir, cfg) if cfg.train_steps else None
    table = summary(steps, acc, fwd, alloc, rl)

    for name, frame in (("equal_steps", steps), ("frontier", frontier), ("equal_accuracy", acc), ("forward", fwd),
                        ("allocator", alloc), ("rl_step", rl), ("summary", table)):
        if frame is not None:
            runs.write_text(out / f"{name}.csv", frame.to_csv(index=False, float_format="%.6g"))
    runs.write_text(out / "table.md", table.to_markdown(index=False) + "\n")
    runs.write_text(out / "table.tex", to_latex(table))
    runs.write_json(out / "run.json", {
        "config": asdict(cfg), "model": str(model_dir), "threads": torch.get_num_threads(),
        "loadavg_before": load_before, "loadavg_after": os.getloadavg(), "cpus": os.cpu_count(),
        "minutes": round((time.time() - started) / 60, 2),
        "processor": platform.processor() or platform.machine(), "provenance": runs.provenance()})
    print(f"\n{(time.time() - started) / 60:.1f} min; load average {load_before[0]:.1f} -> {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} CPUs, {cfg.threads} threads; files in {out}/\n")
    print(table.to_markdown(index=False))
    return table


if __name__ == "__main__":
    main()
