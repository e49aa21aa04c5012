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
resolved config, the metrics and test-item rows and the snapshots so far. A checkpoint of another configuration
or initial model is an error, or with `restart_if_changed` discarded. Resuming assumes the code did not change in
between.

A NaN/Inf loss or gradient norm stops the run with an error naming the step, the inner iteration and the last
good checkpoint; with `nonfinite_skips` N > 0 such an optimizer step is skipped instead (no update; counted
as `nonfinite/skipped` in metrics.jsonl) and the run stops at the (N+1)-th in a row.

Paper scale (README "Paper scale"): LoRA (`lora_rank` > 0; the reference is then the same model with its adapter
disabled, or for a method with `after_step` a second adapter: `harness.model.reference`), bf16, gradient
checkpointing, a 4-bit base, and several processes under `accelerate launch` (DDP, DeepSpeed ZeRO-2 or -3). With W
processes each samples and rewards its share of the rows (rows, not prompts: a group may span processes), in
chunks of `rollout_batch_size` rows with one generator per chunk, so the samples do not depend on W; the rows
are gathered, and every process runs `prepare` on the whole batch (group statistics, batch totals and the
method's random draws are those of one process), then `loss` on its own rows; the gradients are summed over
processes (DDP averages: the loss is scaled by W). A run on W processes thus gives what one process gives with
the same `rollout_batch_size`, up to float summation order (tested with 2 CPU processes; dropout, e.g. LoRA's,
draws from each process's own stream); the scoring in `prepare` is repeated on every process. Under ZeRO-3 the
rollouts and evaluations run with each process holding the whole weights (`whole`): their forward passes differ in
number between processes, and ZeRO-3's hooks would have every process wait for the others' gathers.

Evaluation is lm-eval in this process (`harness.evaluate.score`: the task's lm-eval task, whose metric is the
task's reward, on the first `eval_limit` test items), greedy with the shared `eval_sampler` for every method (`eval/reward`, `eval/accuracy`,
`eval/nfe`: the comparable numbers). A method that declares a `sample` override is ALSO evaluated greedily
with its own decoding, logged next to them as `eval_own/reward`, `eval_own/accuracy`, `eval_own/nfe`
(DiFFPO: its learned EB threshold, accuracy vs NFE; AGRPO: random-order unmasking; LFPO: the EMA rollout
policy). With `eval_eb_gammas`, the initial and the final model are also evaluated with entropy-bounded decoding at
each gamma (`eval_eb<gamma>/*`), the inference frontier. The shared evaluation's reward per test item goes to
`test_items.jsonl` (one row per evaluation), for the paired comparison of the final model with the base.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import random
import resource
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType
from tqdm import tqdm

import algorithms
import benchmarks
from harness import runs
from harness.evaluate import score
from harness.model import Adapter, add_lora, enable_gradient_checkpointing, load, reference
from harness.rollout import Batch, rollout
from harness.sampler import SamplerConfig


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


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
    eval_eb_gammas: tuple[float, ...] = ()
    """at step 0 and the last step, also evaluate with entropy-bounded decoding at each of these gammas
    (`eval_eb<gamma>/*`: the inference frontier of the initial and the final model); none by default"""
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
    dtype: str = "float32"
    """dtype of the loaded weights: float32 | bfloat16 (d1, ESPO and DMPO train LLaDA in bf16)"""
    lora_rank: int = 0
    """LoRA rank r; 0 = full fine-tuning (the embedded default). With LoRA only the adapter trains and the reference
    is the same model with the adapter disabled, no second copy (d1 slurm_scripts/train.yaml: 128)"""
    lora_alpha: float = 64.0
    """LoRA alpha (d1 train.yaml: 64)"""
    lora_dropout: float = 0.05
    """LoRA dropout (d1 train.yaml: 0.05)"""
    lora_targets: str = "all-linear"
    """modules given an adapter: all-linear (every linear layer but the output head; d1 lists all projections) or
    comma-separated module names (AGRPO train.yaml: q_proj,k_proj,v_proj,attn_out,ff_proj,up_proj,ff_out)"""
    load_in_4bit: bool = False
    """base weights in 4-bit NF4 under the adapter (QLoRA: d1 diffu_grpo_train.py, DMPO); needs LoRA, bitsandbytes
    and a CUDA GPU"""
    gradient_checkpointing: bool = False
    """recompute activations in the backward pass: less memory for about a third more compute"""
    rollout_batch_size: int = 0
    """rows per sampler call, each call with its own generator seeded by (seed, step, call), so that the samples do
    not depend on how the rows are split over processes (d1 train.yaml `generation_batch_size`: 6); 0 = each
    process's rows in one call (on one process: from the run's own rollout generator)"""
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
        for name in ("nonfinite_skips", "snapshot_every", "threads", "lora_rank", "rollout_batch_size"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name}={getattr(self, name)} must be >= 0")
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype={self.dtype}; choose one of {', '.join(DTYPES)}")
        if self.load_in_4bit and not self.lora_rank:
            raise ValueError("--load_in_4bit true needs LoRA (a 4-bit base cannot be trained): set --lora_rank")


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


def _launch(cfg: TrainConfig) -> tuple[Accelerator, int, int, int]:
    """(accelerator, rows per process, rows per sampler call, micro-batches per process) of this launch; a launch
    the loop cannot run is refused here, before anything is loaded or written."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true" and os.environ.get("DS_ACCELERATOR") == "cpu":
        # DeepSpeed on CPU processes (its CPU accelerator; tests): accelerate finds no device backend there and would
        # count 1 process; the collectives are gloo's, as DeepSpeed's without oneCCL
        PartialState(backend="gloo")
    accelerator = Accelerator()  # reads the launch (and ACCELERATE_USE_CPU: several CPU processes over gloo)
    world, rows = accelerator.num_processes, cfg.prompts_per_step * cfg.group_size
    if rows % world:
        raise ValueError(f"prompts_per_step x group_size = {rows} rows do not split evenly over {world} processes; "
                         f"choose them so that {world} divides their product")
    local = rows // world
    chunk = cfg.rollout_batch_size or local
    if local % chunk:
        raise ValueError(f"--rollout_batch_size={chunk} does not divide the {local} rows of each process")
    n_micro = math.ceil(local / cfg.micro_batch_size)
    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    zero = accelerator.state.deepspeed_plugin.zero_stage if deepspeed else None
    if accelerator.distributed_type == DistributedType.FSDP:
        raise ValueError("FSDP is not supported: it gathers the weights collectively in every forward pass, and the "
                         "processes' sampler forward passes differ in number (threshold and EB decoding stop early), "
                         "so a run would hang. Launch with config/accelerate/zero3.yaml (which gathers the whole "
                         "weights for those passes), ddp.yaml or zero2.yaml")
    if zero == 3 and cfg.load_in_4bit:
        raise ValueError("ZeRO-3 does not partition a 4-bit base here (bitsandbytes' packed weights); a 4-bit base is "
                         "small (LLaDA-8B: about 5 GB), so launch --load_in_4bit with config/accelerate/zero2.yaml")
    if deepspeed and cfg.nonfinite_skips:
        raise ValueError("under DeepSpeed the optimizer step happens inside the backward pass, so --nonfinite_skips "
                         "cannot skip it; launch with config/accelerate/ddp.yaml or set --nonfinite_skips 0")
    if deepspeed:  # DeepSpeed steps the optimizer itself, after as many backward passes as it accumulates. No data
        # loader tells it the batch: all three sizes are set (left to accelerate's "auto", they disagree and DeepSpeed
        # refuses to start); the clipping norm is the run's
        accelerator.gradient_accumulation_steps = n_micro
        accelerator.state.deepspeed_plugin.deepspeed_config.update(
            train_micro_batch_size_per_gpu=cfg.micro_batch_size, gradient_accumulation_steps=n_micro,
            train_batch_size=cfg.micro_batch_size * n_micro * world, gradient_clipping=cfg.max_grad_norm)
    return accelerator, local, chunk, n_micro


def _chunk_seed(seed: int, step: int, chunk: int) -> int:
    """The seed of rollout chunk `chunk` of RL step `step`: a function of nothing else (not of the processes)."""
    return int(np.random.SeedSequence([seed, step, chunk]).generate_state(1)[0])


@contextlib.contextmanager
def whole(engines: list):
    """ZeRO-3 (`engines`: the DeepSpeed engines of the run): a forward pass through DeepSpeed's hooks gathers each
    layer collectively, and its start-of-forward hook compares module traces across processes, so every process must
    run as many as the others; the sampler's do not (threshold, EB and DiFFPO's decoding stop when their rows are
    done). For those passes each process holds the whole weights, all of DeepSpeed's hooks removed (TRL generates so;
    DeepSpeed's own `unwrap_model_for_generation` leaves the start-of-forward hook). No engines: nothing to do."""
    if not engines:
        yield
        return
    import deepspeed
    from deepspeed.runtime.zero import parameter_offload

    offloads = [getattr(e.optimizer, "parameter_offload", e.optimizer) for e in engines]  # no optimizer: the offload
    with deepspeed.zero.GatheredParameters([p for e in engines for p in e.module.parameters()]):
        for offload in offloads:
            offload._remove_module_hooks()
            offload.forward_hooks, offload.backward_hooks = [], []
        try:
            yield
        finally:
            for offload in offloads:
                offload.setup_zero_stage3_hooks()  # DeepSpeed's own setup, which also pushes the module on its
                parameter_offload.FWD_MODULE_STACK.pop()  # stack of forward modules again: it is there already


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
    accelerator, local, chunk, n_micro = _launch(cfg)
    world, rank, main = accelerator.num_processes, accelerator.process_index, accelerator.is_main_process
    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    zero = accelerator.state.deepspeed_plugin.zero_stage if deepspeed else None
    zero3 = zero == 3
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    run, ckpt = cfg.run_dir(), cfg.run_dir() / "checkpoint"
    resolved = {"train": dataclasses.asdict(cfg), "algo": dataclasses.asdict(algo_cfg),
                "sampler": dataclasses.asdict(sampler_cfg), "eval_sampler": dataclasses.asdict(eval_cfg)}
    train_set = task.load("train")
    task.load("test")  # bad data fails before any write
    origin = _origin(cfg, resolved)
    state = None
    for turn in ("main", "others"):  # the main process tidies up after a crash first, then the others read
        if main == (turn == "main"):
            state = runs.load_state(ckpt)
            if state is not None and state["origin"] != origin:
                if not cfg.restart_if_changed:
                    raise ValueError(f"{run} holds a checkpoint of a different configuration or initial model (only "
                                     f"--steps may change on resume); delete the folder, pick another --out, or pass "
                                     f"--restart_if_changed true to start afresh")
                if main:
                    shutil.rmtree(ckpt)
                state = None
        accelerator.wait_for_everyone()
    if state is not None and deepspeed and (world > 1 or zero3):
        raise ValueError(f"{ckpt} cannot be resumed under DeepSpeed ZeRO-{zero} with {world} process(es) (ZeRO "
                         f"partitions the optimizer state and the checkpoint holds one process's); resume with "
                         f"config/accelerate/ddp.yaml or delete the checkpoint")

    torch.manual_seed(cfg.seed)
    model, tokenizer = load(ckpt / "model" if state else cfg.model, dtype=DTYPES[cfg.dtype],
                            load_in_4bit=cfg.load_in_4bit, trainable_adapter=state is not None)
    if cfg.lora_rank and not hasattr(model, "peft_config"):
        model = add_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    copied = not (zero3 and not hasattr(model, "peft_config"))  # ZeRO-3 full fine-tuning: see below
    if copied:
        ref = reference(model, updated=hasattr(algo, "after_step"))  # on resume its saved state is loaded below
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    policy, optimizer = accelerator.prepare(model, optimizer)  # policy: called in `loss`, gradients synchronised
    # The methods read the model's config from what they call: DDP's wrapper has none, and DeepSpeed's engine holds
    # its own JSON there (read again only by DeepSpeed's checkpoint functions, which the harness does not use).
    policy.config = model.config
    engines = [policy] if zero3 else []  # what ZeRO-3 partitions: gathered whole in `whole` and `gathered` below
    if not copied:  # ZeRO-3 loads weights partitioned (zero.Init), which a copy would not hold: the frozen reference
        # is loaded again and partitioned by an engine of its own without optimizer, as TRL partitions its reference
        import deepspeed

        ds_config = {k: v for k, v in accelerator.state.deepspeed_plugin.deepspeed_config.items()
                     if k not in ("optimizer", "scheduler")}  # the launch's, "auto" values resolved by `prepare`
        ref_engine = deepspeed.initialize(model=load(cfg.model, dtype=DTYPES[cfg.dtype])[0], config=ds_config)[0]
        ref = ref_engine.module.requires_grad_(False).eval()
        engines.append(ref_engine)
    if isinstance(ref, torch.nn.Module):
        ref.to(accelerator.device)

    def gathered(*modules, modifier: bool = False):
        """ZeRO-3: the whole parameters of `modules` on every process (to save them, or to read and update them in
        `after_step`); `modifier`: what the main process leaves in them is partitioned again. Otherwise nothing."""
        if not zero3:
            return contextlib.nullcontext()
        import deepspeed

        params = [p for m in modules for p in m.parameters()]
        return deepspeed.zero.GatheredParameters(params, modifier_rank=0 if modifier else None)

    # Forward passes without gradient (rollouts, `prepare`, evaluation) call `model`, outside the wrapper.
    counter = ForwardCounter(model, *([ref] if isinstance(ref, torch.nn.Module) else []))
    # `after_step` sees the trainable weights as the reference holds them: the model, or under LoRA the adapter.
    trained = Adapter(model, "default") if hasattr(model, "peft_config") else model
    # The loss of each micro-batch is its share of the whole batch's: gradients are summed over processes (DDP and
    # DeepSpeed average them) and, under DeepSpeed, over the micro-batches it accumulates (it averages those too).
    scale = world * (n_micro if deepspeed else 1)

    order = np.random.default_rng(cfg.seed).permutation(len(train_set))
    generators = {"rollout": torch.Generator(accelerator.device).manual_seed(cfg.seed),
                  "batch_seed": torch.Generator().manual_seed(cfg.seed + 1)}
    sample = None
    if hasattr(algo, "sample"):  # the method's declared training-time decoding override
        def sample(model, prompt_ids, prompt_mask, sampler, generator):
            return algo.sample(model, ref, prompt_ids, prompt_mask, sampler, generator, algo_cfg)
    prepare = getattr(algo, "prepare", lambda policy, ref, batch, cfg: batch)

    start, saved, nonfinite_run = 0, None, 0  # saved: step of the last checkpoint; NaN/Inf updates in a row
    if main:
        runs.write_json(run / "config.json", resolved)
        if state is None or not (run / "provenance.json").exists():
            runs.write_json(run / "provenance.json", {**runs.provenance(), "processes": world,
                                                       "distributed": accelerator.distributed_type.value,
                                                       **({"zero_stage": zero} if deepspeed else {})})
        if state is None:
            runs.write_text(run / "metrics.jsonl", "")
            runs.write_text(run / "test_items.jsonl", "")
    if state is not None:
        start = saved = state["step"]
        nonfinite_run = state["nonfinite_run"]
        optimizer.load_state_dict(state["optimizer"])
        ref.load_state_dict(state["ref"])
        _set_rng_state(state["rng"], generators)
        if main:
            for name in ("metrics", "test_items"):
                runs.write_text(run / f"{name}.jsonl", "".join(runs.dumps(r) + "\n" for r in state[name]))
            runs.link_missing(ckpt / "snapshots", run / "snapshots")
            tqdm.write(f"resuming {run} from its checkpoint of step {start}")

    def evaluate_now(step: int, frontier: bool = False) -> dict:
        """Every process takes part (lm-eval shares the items out); the main process gets the scores and appends
        the shared evaluation's reward per test item to test_items.jsonl."""
        counter.phase = "eval"
        with whole(engines):
            scores = {"eval": score(model, tokenizer, cfg.task, cfg.eval_limit, eval_cfg, items=True)}
            if sample:  # the method's own decoding, next to the shared (comparable) evaluation
                scores["eval_own"] = score(model, tokenizer, cfg.task, cfg.eval_limit, eval_cfg, sample=sample)
            for gamma in cfg.eval_eb_gammas if frontier else ():
                eb = dataclasses.replace(eval_cfg, decoding="eb", eb_gamma=float(gamma))
                scores[f"eval_eb{float(gamma)}"] = score(model, tokenizer, cfg.task, cfg.eval_limit, eb)
        if main:
            runs.append_metrics(run / "test_items.jsonl", {"step": step, "reward": scores["eval"].pop("items")})
        return {f"{prefix}/{k}": v for prefix, values in scores.items() for k, v in (values or {}).items()}

    def total(value: float) -> float:
        return accelerator.reduce(torch.tensor(float(value), device=accelerator.device), "sum").item()

    if start == 0:
        row = evaluate_now(0, frontier=True)
        if main:
            runs.append_metrics(run / "metrics.jsonl", {"step": 0, **row})
    bar = tqdm(range(start + 1, cfg.steps + 1), desc=f"{cfg.algo}/{cfg.task}/seed{cfg.seed}", unit="step",
               initial=start, total=cfg.steps, dynamic_ncols=True, disable=not main)
    for step in bar:
        t0, calls0, rows0 = time.perf_counter(), counter.calls.copy(), counter.rows.copy()
        # HARNESS: the same prompts, sampler and reward for every method.
        first = (step - 1) * cfg.prompts_per_step
        picks = [train_set[order[(first + j) % len(order)]] for j in range(cfg.prompts_per_step)]
        counter.phase = "rollout"
        model.eval()
        with whole(engines):
            if world == 1 and not cfg.rollout_batch_size:
                batch, _ = rollout(model, tokenizer, task, picks, sampler_cfg, cfg.group_size, generators["rollout"],
                                   sample)
            else:  # this process's chunks of rows, each from its own generator; then every process's rows
                chunks = range(rank * local // chunk, (rank + 1) * local // chunk)
                batch = Batch.cat([rollout(model, tokenizer, task, picks, sampler_cfg, cfg.group_size,
                                           torch.Generator(accelerator.device).manual_seed(
                                               _chunk_seed(cfg.seed, step, c)),
                                           sample, rows=slice(c * chunk, (c + 1) * chunk))[0] for c in chunks])
                batch = batch.gather(accelerator)
        batch.seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generators["batch_seed"]))
        t1 = time.perf_counter()
        # ALGORITHM: frozen quantities of this rollout batch (advantages, old/ref likelihoods, seeds), on all of it.
        counter.phase = "scoring"
        with torch.no_grad():
            batch = prepare(model, ref, batch, algo_cfg)
        mine = batch.select(slice(rank * local, (rank + 1) * local)) if world > 1 else batch
        t2 = time.perf_counter()
        # ALGORITHM: mu optimizer steps on this batch, each summing the method's micro-batch losses.
        counter.phase = "training"
        model.train()
        losses, method_metrics, grad_norms, skipped = [], [], [], 0
        for it in range(mu):
            mine.iteration = it
            optimizer.zero_grad(set_to_none=True)
            total_loss, it_metrics, bad = 0.0, [], None
            micro = mine.micro_batches(cfg.micro_batch_size)
            if deepspeed:  # the last micro-batch of each inner iteration ends an accumulation; set every time, as
                # every Accelerator() (lm-eval's in the evaluations too) resets accelerate's shared accumulation state
                accelerator.gradient_accumulation_steps, accelerator.step = n_micro, 0
            for k, mb in enumerate(micro):
                sync = accelerator.accumulate(policy) if deepspeed else (
                    contextlib.nullcontext() if k == len(micro) - 1 else accelerator.no_sync(policy))
                with sync:
                    loss, metrics = algo.loss(policy, ref, mb, algo_cfg)
                    if not torch.isfinite(loss):
                        bad = f"loss ({loss.item()})"
                        if world == 1:
                            break
                    # several processes: every one runs every backward pass (they synchronise); a NaN spreads
                    # to every gradient, so all of them skip the step together
                    accelerator.backward(loss * scale if scale != 1 else loss)
                total_loss += loss.item()
                it_metrics.append(metrics)
            norm = accelerator.clip_grad_norm_(trainable, cfg.max_grad_norm) if bad is None else 0.0
            grad_norm = float(norm) if norm is not None else 0.0  # None: DeepSpeed before its first step
            if bad is None and not np.isfinite(grad_norm):
                bad = f"gradient norm ({grad_norm})"
            if world > 1 and total(bad is not None):
                bad = bad or "loss on another process"
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
            losses.append(total(total_loss) if world > 1 else total_loss)
            grad_norms.append(grad_norm)
            method_metrics += it_metrics
        # ALGORITHM: optional update of the reference/rollout model (e.g. LFPO's EMA).
        if hasattr(algo, "after_step"):
            with gathered(trained), gathered(ref, modifier=True):
                algo.after_step(trained, ref, step, algo_cfg)
        t3 = time.perf_counter()

        means = {k: float(np.mean([m[k] for m in method_metrics])) for k in (method_metrics or [{}])[0]}
        if world > 1:  # the processes' means, averaged
            means = {k: total(v) / world for k, v in means.items()}
        row = {
            "step": step, "reward/mean": batch.rewards.mean().item(), "reward/std": batch.rewards.std().item(),
            "loss": float(np.mean(losses)) if losses else None,
            "grad_norm": float(np.mean(grad_norms)) if grad_norms else None, "nonfinite/skipped": skipped,
            "rollout/nfe": batch.nfe.float().mean().item(),
            **{f"algo/{k}": v for k, v in means.items()},
            **{f"forward/{p}": counter.calls[p] - calls0[p] for p in ("rollout", "scoring", "training")},
            **{f"sequences/{p}": counter.rows[p] - rows0[p] for p in ("rollout", "scoring", "training")},
            "time/rollout": t1 - t0, "time/scoring": t2 - t1, "time/update": t3 - t2,
            "time/step": t3 - t0, "tokens_per_s": batch.completion.numel() / (t1 - t0),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }
        if world > 1:  # forward passes and sequences of all processes
            row.update({k: int(total(v)) for k, v in row.items() if k.startswith(("forward/", "sequences/"))})
        if step % cfg.eval_every == 0 or step == cfg.steps:
            row.update(evaluate_now(step, frontier=step == cfg.steps))
        if main:
            runs.append_metrics(run / "metrics.jsonl", row)
        bar.set_postfix(reward=f"{row['reward/mean']:.3f}", loss=f"{row['loss']:.4f}" if losses else "skipped",
                        **({"test": f"{row['eval/reward']:.3f}"} if "eval/reward" in row else {}))
        snapshot = cfg.snapshot_every and (step % cfg.snapshot_every == 0 or step == cfg.steps)
        save = step % cfg.save_every == 0 or step == cfg.steps
        with gathered(*(e.module for e in engines)) if snapshot or save else contextlib.nullcontext():
            if main and snapshot:
                runs.save_model(model, tokenizer, run / "snapshots" / f"step{step}")
            if main and save:
                runs.save_checkpoint(ckpt, model, tokenizer, {
                    "step": step, "optimizer": optimizer.state_dict(), "ref": ref.state_dict(),
                    "rng": _rng_state(generators), "origin": origin, "nonfinite_run": nonfinite_run,
                    "metrics": runs.read_metrics(run / "metrics.jsonl"),
                    "test_items": runs.read_metrics(run / "test_items.jsonl")}, keep=run / "snapshots")
        if save:
            saved = step
    accelerator.wait_for_everyone()
    return run
