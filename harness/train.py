"""The single RL loop every method runs on.

    for step in 1..steps:
        prompts  <- the task's train split, in the seed's fixed order           HARNESS: same data for all
        rollout  <- sampler (or the method's declared `sample` override)        HARNESS / ALGORITHM seam
        rewards  <- the task's reward function (= its evaluation metric)        HARNESS
        batch    <- algo.prepare(policy, ref, batch, cfg)   (no grad)           ALGORITHM seam
        for it in 0..mu-1:                                  (one optimizer step each)
            for micro-batch in batch:  loss <- algo.loss(policy, ref, mb, cfg); backward    ALGORITHM seam
            clip grad norm; optimizer step (a NaN/Inf loss or gradient stops the run, or skips the step)
        algo.after_step(policy, ref, step, cfg)                                  ALGORITHM seam
        metrics.jsonl row; test evaluation every `eval_every` steps; checkpoint every `save_every` steps

Micro-batch losses are summed, not averaged: each method returns its micro-batch's share of the batch
loss, so any split of a batch gives the same gradient.

A run resumes from its last complete checkpoint when started again with the same configuration (only `steps`
may grow), however it was stopped (SIGKILL in a step or in a checkpoint write; config.json and metrics.jsonl
deleted), and ends bit-identical on CPU to a run that was never stopped: the checkpoint holds the weights, the
optimizer, the reference, the RNG states (torch, numpy, python, the rollout and batch-seed generators), the
resolved config, the metrics rows and the snapshots so far. A checkpoint of another configuration or initial model is an error,
or with `restart_if_changed` discarded. Resuming assumes the code did not change in between.

A NaN/Inf loss or gradient norm stops the run with an error naming the step, the inner iteration and the last
good checkpoint; with `nonfinite_skips` N > 0 such an optimizer step is skipped instead (no update; counted
as `nonfinite/skipped` in metrics.jsonl) and the run stops at the (N+1)-th in a row.

Evaluation is lm-eval in this process (`harness.evaluate.score`: the task's lm-eval task, whose metric is the
task's reward, on the first `eval_limit` test items), greedy with the shared `eval_sampler` for every method (`eval/reward`, `eval/accuracy`,
`eval/nfe`: the comparable numbers). A method that declares a `sample` override is ALSO evaluated greedily
with its own decoding, logged next to them as `eval_own/reward`, `eval_own/accuracy`, `eval_own/nfe`
(DiFFPO: its learned EB threshold, accuracy vs NFE; AGRPO: random-order unmasking; LFPO: the EMA rollout
policy).
"""

from __future__ import annotations

import copy
import dataclasses
import random
import resource
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from tqdm import tqdm

import algorithms
import benchmarks
from harness import runs
from harness.model import load
from harness.evaluate import score
from harness.rollout import rollout
from harness.sampler import SamplerConfig


@dataclass(frozen=True)
class TrainConfig:
    algo: str = "d1"
    """method: a module name in algorithms/"""
    task: str = "arithmetic"
    """task: a module name in benchmarks/"""
    model: str = "results/base"
    """policy initialisation: a local model folder or a hub id; the reference is a frozen copy of it"""
    profile: str = "default"
    """profile name, a results path component"""
    out: str = ""
    """run folder; empty = results/runs/{profile}/{task}/{algo}/seed{seed}"""
    seed: int = 0
    """seed of data order, rollouts and every method's randomness"""
    steps: int = 60
    """RL steps (rollout batches)"""
    prompts_per_step: int = 16
    """distinct prompts per rollout batch"""
    group_size: int = 8
    """completions per prompt G"""
    micro_batch_size: int = 16
    """sequences per forward/backward pass (gradient accumulation over the batch)"""
    lr: float = 1e-5
    """AdamW learning rate, constant (d1 train.yaml: constant_with_warmup, warmup ratio 1e-4). Shared by every
    method; measured on the tiny base (arithmetic, 60 steps, seed 0): at 3e-5 ESPO and DMPO (mu = 8, no
    per-token clip) fall below the base (19.1%, 20.7% from 26.2%), at 1e-5 every method ends above it"""
    betas: tuple[float, float] = (0.9, 0.99)
    """AdamW betas (d1 train.yaml)"""
    weight_decay: float = 0.1
    """AdamW weight decay (d1 train.yaml)"""
    max_grad_norm: float = 0.2
    """gradient clipping norm (d1 train.yaml)"""
    eval_every: int = 20
    """evaluate on the test split every this many steps (and at steps 0 and the last)"""
    eval_limit: int = 256
    """test items per evaluation"""
    save_every: int = 20
    """checkpoint every this many steps (and at the last)"""
    nonfinite_skips: int = 0
    """optimizer steps in a row that may be skipped for a NaN/Inf loss or gradient; 0 = stop at the first"""
    restart_if_changed: bool = False
    """a checkpoint in the run folder from another configuration or initial model: false = stop with an error,
    true = discard it and start afresh (the workflow's setting: Snakemake reruns a job whose params or input changed)"""
    snapshot_every: int = 0
    """also keep the model every this many steps (and at the last) in snapshots/step{N}/ for later
    evaluation (the workflow's lm-eval convergence curves); 0 = none"""
    threads: int = 0
    """torch CPU threads; 0 = torch's default"""
    sampler: SamplerConfig = field(default_factory=lambda: SamplerConfig(temperature=0.9))
    """rollout sampler (d1 train.yaml: temperature 0.9, low-confidence remasking); lengths default to the task's"""
    eval_sampler: SamplerConfig = field(default_factory=SamplerConfig)
    """evaluation sampler, shared by every method (greedy)"""

    def run_dir(self) -> Path:
        return Path(self.out or f"results/runs/{self.profile}/{self.task}/{self.algo}/seed{self.seed}")

    def __post_init__(self):
        for name in ("steps", "prompts_per_step", "group_size", "micro_batch_size", "eval_every", "eval_limit",
                     "save_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name}={getattr(self, name)} must be a positive integer")
        for name in ("nonfinite_skips", "snapshot_every", "threads"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name}={getattr(self, name)} must be >= 0")


class ForwardCounter:
    """Counts forward passes (batched calls) and sequence-forwards (rows) of the models it is attached to."""

    def __init__(self, *models):
        self.calls, self.rows = Counter(), Counter()
        self.phase = "rollout"
        for model in models:
            model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.calls[self.phase] += 1
        self.rows[self.phase] += ids.shape[0]


def _rng_state(generators: dict[str, torch.Generator]) -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            **{k: g.get_state() for k, g in generators.items()}}


def _set_rng_state(state: dict, generators: dict[str, torch.Generator]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    for k, g in generators.items():
        g.set_state(state[k])


def _origin(cfg: TrainConfig, resolved: dict) -> dict:
    """What a checkpoint must match to be resumed: the resolved config minus the step budget (a run may be
    extended) and the restart policy, plus the initial model folder's files (name, size, mtime), so that a
    retrained base is not resumed from a checkpoint of the old one."""
    resolved = runs.jsonable(resolved)
    for name in ("steps", "restart_if_changed"):
        resolved["train"].pop(name)
    model = Path(cfg.model)
    files = sorted(model.iterdir()) if model.is_dir() else []
    return {**resolved, "model_files": [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]}


def train(cfg: TrainConfig, algo_cfg=None) -> Path:
    """Run (or resume) one training run and return its folder."""
    algo, task = algorithms.get(cfg.algo), benchmarks.get(cfg.task)
    if getattr(task, "EVALUATION_ONLY", False):
        trainable = [name for name, t in benchmarks.TASKS.items() if not getattr(t, "EVALUATION_ONLY", False)]
        raise ValueError(f"--task {cfg.task} is evaluation-only (no train split); train on one of "
                         f"{', '.join(trainable)}, and evaluate with `python -m harness eval --tasks {cfg.task}`")
    algo_cfg = algo_cfg or algo.Config()
    sampler_cfg, eval_cfg = cfg.sampler.resolve(task), cfg.eval_sampler.resolve(task)
    mu = getattr(algo_cfg, "num_iterations", 1)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    run, ckpt = cfg.run_dir(), cfg.run_dir() / "checkpoint"
    resolved = {"train": dataclasses.asdict(cfg), "algo": dataclasses.asdict(algo_cfg),
                "sampler": dataclasses.asdict(sampler_cfg), "eval_sampler": dataclasses.asdict(eval_cfg)}
    train_set = task.load("train")
    task.load("test")  # bad data fails before any write
    state, origin = runs.load_state(ckpt), _origin(cfg, resolved)
    if state is not None and state["origin"] != origin:
        if not cfg.restart_if_changed:
            raise ValueError(f"{run} holds a checkpoint of a different configuration or initial model (only --steps "
                             f"may change on resume); delete the folder, pick another --out, or pass "
                             f"--restart_if_changed true to start afresh")
        shutil.rmtree(ckpt)
        state = None

    torch.manual_seed(cfg.seed)
    policy, tokenizer = load(ckpt / "model" if state else cfg.model)
    ref = copy.deepcopy(policy).requires_grad_(False).eval()  # on resume its saved state is loaded below
    accelerator = Accelerator()
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    policy, optimizer = accelerator.prepare(policy, optimizer)
    ref.to(accelerator.device)
    counter = ForwardCounter(policy, ref)

    order = np.random.default_rng(cfg.seed).permutation(len(train_set))
    generators = {"rollout": torch.Generator().manual_seed(cfg.seed), "batch_seed": torch.Generator().manual_seed(cfg.seed + 1)}
    sample = None
    if hasattr(algo, "sample"):  # the method's declared training-time decoding override
        def sample(model, prompt_ids, prompt_mask, sampler, generator):
            return algo.sample(model, ref, prompt_ids, prompt_mask, sampler, generator, algo_cfg)
    prepare = getattr(algo, "prepare", lambda policy, ref, batch, cfg: batch)

    start, saved, nonfinite_run = 0, None, 0  # saved: step of the last checkpoint; NaN/Inf updates in a row
    runs.write_json(run / "config.json", resolved)
    if state is None or not (run / "provenance.json").exists():
        runs.write_json(run / "provenance.json", runs.provenance())
    if state is None:
        runs.write_text(run / "metrics.jsonl", "")
    else:
        start = saved = state["step"]
        nonfinite_run = state["nonfinite_run"]
        optimizer.load_state_dict(state["optimizer"])
        ref.load_state_dict(state["ref"])
        _set_rng_state(state["rng"], generators)
        runs.write_text(run / "metrics.jsonl", "".join(runs.dumps(r) + "\n" for r in state["metrics"]))
        runs.link_missing(ckpt / "snapshots", run / "snapshots")
        tqdm.write(f"resuming {run} from its checkpoint of step {start}")

    def evaluate_now() -> dict:
        counter.phase = "eval"
        row = {f"eval/{k}": v for k, v in score(policy, tokenizer, cfg.task, cfg.eval_limit, eval_cfg).items()}
        if sample is not None:  # the method's own decoding, next to the shared (comparable) evaluation
            row.update({f"eval_own/{k}": v for k, v in
                        score(policy, tokenizer, cfg.task, cfg.eval_limit, eval_cfg, sample=sample).items()})
        return row

    if start == 0:
        runs.append_metrics(run / "metrics.jsonl", {"step": 0, **evaluate_now()})
    bar = tqdm(range(start + 1, cfg.steps + 1), desc=f"{cfg.algo}/{cfg.task}/seed{cfg.seed}", unit="step",
               initial=start, total=cfg.steps, dynamic_ncols=True)
    for step in bar:
        t0, calls0, rows0 = time.perf_counter(), counter.calls.copy(), counter.rows.copy()
        # HARNESS: the same prompts, sampler and reward for every method.
        first = (step - 1) * cfg.prompts_per_step
        picks = [train_set[order[(first + j) % len(order)]] for j in range(cfg.prompts_per_step)]
        counter.phase = "rollout"
        policy.eval()
        batch, _ = rollout(policy, tokenizer, task, picks, sampler_cfg, cfg.group_size, generators["rollout"], sample)
        batch.seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generators["batch_seed"]))
        t1 = time.perf_counter()
        # ALGORITHM: frozen quantities of this rollout batch (advantages, old/ref likelihoods, seeds).
        counter.phase = "scoring"
        with torch.no_grad():
            batch = prepare(policy, ref, batch, algo_cfg)
        t2 = time.perf_counter()
        # ALGORITHM: mu optimizer steps on this batch, each summing the method's micro-batch losses.
        counter.phase = "training"
        policy.train()
        losses, method_metrics, grad_norms, skipped = [], [], [], 0
        for it in range(mu):
            batch.iteration = it
            optimizer.zero_grad(set_to_none=True)
            total, it_metrics, bad = 0.0, [], None
            for mb in batch.micro_batches(cfg.micro_batch_size):
                loss, metrics = algo.loss(policy, ref, mb, algo_cfg)
                if not torch.isfinite(loss):
                    bad = f"loss ({loss.item()})"
                    break
                accelerator.backward(loss)
                total += loss.item()
                it_metrics.append(metrics)
            grad_norm = float(accelerator.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm)) if bad is None else 0.0
            if bad is None and not np.isfinite(grad_norm):
                bad = f"gradient norm ({grad_norm})"
            if bad:  # NaN/Inf: no update; stop unless the skip policy allows one more
                nonfinite_run, skipped = nonfinite_run + 1, skipped + 1
                if nonfinite_run > cfg.nonfinite_skips:
                    raise FloatingPointError(
                        f"non-finite {bad} at step {step}, inner iteration {it}"
                        f"{f' ({nonfinite_run} in a row)' if cfg.nonfinite_skips else ''}; the last good checkpoint "
                        f"is {f'{ckpt} (step {saved})' if saved is not None else 'none (nothing saved yet)'}; "
                        f"lower --lr or --max_grad_norm, or skip such updates with --nonfinite_skips N")
                continue
            optimizer.step()
            nonfinite_run = 0
            losses.append(total)
            grad_norms.append(grad_norm)
            method_metrics += it_metrics
        # ALGORITHM: optional update of the reference/rollout model (e.g. LFPO's EMA).
        if hasattr(algo, "after_step"):
            algo.after_step(accelerator.unwrap_model(policy), ref, step, algo_cfg)
        t3 = time.perf_counter()

        row = {
            "step": step, "reward/mean": batch.rewards.mean().item(), "reward/std": batch.rewards.std().item(),
            "loss": float(np.mean(losses)) if losses else None,
            "grad_norm": float(np.mean(grad_norms)) if grad_norms else None, "nonfinite/skipped": skipped,
            "rollout/nfe": batch.nfe.float().mean().item(),
            **{f"algo/{k}": float(np.mean([m[k] for m in method_metrics])) for k in (method_metrics or [{}])[0]},
            **{f"forward/{p}": counter.calls[p] - calls0[p] for p in ("rollout", "scoring", "training")},
            **{f"sequences/{p}": counter.rows[p] - rows0[p] for p in ("rollout", "scoring", "training")},
            "time/rollout": t1 - t0, "time/scoring": t2 - t1, "time/update": t3 - t2,
            "time/step": t3 - t0, "tokens_per_s": batch.completion.numel() / (t1 - t0),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }
        if step % cfg.eval_every == 0 or step == cfg.steps:
            row.update(evaluate_now())
        runs.append_metrics(run / "metrics.jsonl", row)
        bar.set_postfix(reward=f"{row['reward/mean']:.3f}", loss=f"{row['loss']:.4f}" if losses else "skipped",
                        **({"test": f"{row['eval/reward']:.3f}"} if "eval/reward" in row else {}))
        if cfg.snapshot_every and (step % cfg.snapshot_every == 0 or step == cfg.steps):
            runs.save_model(accelerator.unwrap_model(policy), tokenizer, run / "snapshots" / f"step{step}")
        if step % cfg.save_every == 0 or step == cfg.steps:
            runs.save_checkpoint(ckpt, accelerator.unwrap_model(policy), tokenizer, {
                "step": step, "optimizer": optimizer.state_dict(), "ref": ref.state_dict(),
                "rng": _rng_state(generators), "origin": origin, "nonfinite_run": nonfinite_run,
                "metrics": runs.read_metrics(run / "metrics.jsonl")}, keep=run / "snapshots")
            saved = step
    return run
