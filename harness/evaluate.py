"""Evaluation with lm-eval: the `dllm` model class and `python -m harness eval`.

`DiffusionLM` is an lm-eval `LM` for every model `harness.model.load` loads (the tiny base, LLaDA-, Dream-style):

  generate_until         the shared sampler (`harness.sampler.generate`), batched, prompts left-padded; lengths,
                         remasking and decoding from the model args, else from benchmarks/<task>.py as in
                         training, else (a task outside benchmarks/) gen_length = max_gen_toks with one block
                         and one token per step; greedy unless the task asks for sampling (do_sample with a
                         temperature); the text is cut at the first EOS, then at the first stop sequence
  loglikelihood          the coupled Monte-Carlo ELBO (`harness.likelihood.elbo`) of the continuation given the
                         context, mc_samples samples = 2 mc_samples noisy copies in one batch; the masks are
                         seeded by (seed, context), so the choices of one question share them (common random
                         numbers); is_greedy is always False (no greedy check: it would cost a full decode)
  loglikelihood_rolling  the sum of the ELBOs of lm-eval's disjoint rolling windows of max_length tokens
  all_gather, barrier,   through accelerate / torch.distributed, so `accelerate launch` shards the requests
  gather_object          (lm-eval >= 0.4.12 calls these; the base class's no-ops break multi-process runs)

and records the forward passes (NFE) of every request: the sampler's per-row count for generation, 2 x
mc_samples per ELBO. Contexts are tokenized as they come; lm-eval's `--apply_chat_template` (on by default in
`python -m harness eval`) first wraps them as the user turn of the model's chat template, which gives exactly the
token ids that training's `encode_prompts` feeds the sampler.

`python -m harness eval --model DIR --tasks gsm8k,humaneval,... --out FILE.json` runs each task of
benchmarks/lm_eval/ through `lm_eval.simple_evaluate` (offline: the data come from $DLLM_DATA_DIR) and writes
lm-eval's results dict plus ours under "harness" (see `run`). The same model from lm-eval's own CLI:

    python -m harness.evaluate --model dllm --model_args pretrained=DIR,mc_samples=64 \\
        --tasks gsm8k,hellaswag --include_path benchmarks/lm_eval --apply_chat_template --confirm_run_unsafe_code
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import time
import zlib
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import lm_eval
import lm_eval.evaluator
import torch
from accelerate import Accelerator
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.tasks import TaskManager
from lm_eval.utils import get_rolling_token_windows, handle_non_serializable, make_disjoint_window, make_table
from tqdm import tqdm

import benchmarks
from harness import runs
from harness.likelihood import elbo
from harness.model import load
from harness.rollout import decode, left_pad
from harness.sampler import SamplerConfig, generate

TASKS_DIR = Path(benchmarks.__file__).parent / "lm_eval"


@register_model("dllm")
class DiffusionLM(LM):
    """lm-eval model args: pretrained (a folder or hub id, or a loaded model with `tokenizer=`), batch_size
    (sequences per forward pass: prompts per sampler call; at least one request's 2 mc_samples ELBO copies),
    mc_samples, seed, add_bos_token, dtype, device, and every SamplerConfig field (gen_length, block_length,
    steps, temperature, remasking, decoding, threshold, eb_gamma). From Python only: `sample`, a method's
    declared decoding override (the signature `harness.rollout.rollout` takes), used instead of the shared
    sampler for generation."""

    def __init__(self, pretrained, tokenizer=None, batch_size: int | str = 32, mc_samples: int = 64, seed: int = 0,
                 add_bos_token: bool = False, dtype: str | None = None, device: str | None = None,
                 max_batch_size=None, sample=None, **sampler):
        super().__init__()
        if not str(batch_size).isdigit() or int(batch_size) < 1:
            raise ValueError(f"batch_size={batch_size!r}: pass a positive integer (sequences per forward pass)")
        if int(mc_samples) < 1:
            raise ValueError(f"mc_samples={mc_samples!r} must be >= 1")
        self.sampler, self.sample = SamplerConfig(**sampler), sample or generate
        self.accelerator = Accelerator()
        self._rank, self._world_size = self.accelerator.process_index, self.accelerator.num_processes
        self.progress = self._rank == 0  # progress bars on the main process (off for the training loop's evaluation)
        # lm-eval's CLI passes device="cuda:0" by default; one device per process under accelerate launch
        usable = device and not (str(device).startswith("cuda") and not torch.cuda.is_available())
        self._device = torch.device(device) if usable and self._world_size == 1 else self.accelerator.device
        if isinstance(pretrained, (str, Path)):
            self.model, self.tokenizer = load(pretrained, dtype=getattr(torch, dtype) if dtype else None)
        elif tokenizer is None:
            raise ValueError("pass tokenizer= together with a loaded model (or a model folder as pretrained)")
        else:
            self.model, self.tokenizer = pretrained.eval(), tokenizer
        self.model.to(self._device)
        self.batch_size, self.mc_samples, self.seed = int(batch_size), int(mc_samples), int(seed)
        self.add_bos_token = bool(add_bos_token)
        self.nfe: dict[tuple[str, int, int], int] = {}  # (task, doc_id, request idx) -> forward passes
        self.settings: dict[str, dict] = {}  # task -> the sampler / estimator settings it ran with

    # ---- tokens ----------------------------------------------------------------------------------------------
    @property
    def prefix_token_id(self) -> int:
        """The context of an empty context and of the first rolling window (BOS, else EOS; as lm-eval's HFLM)."""
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        """Longest sequence of the rolling windows: the model's position budget (2048 if it declares none)."""
        config = self.model.config
        return getattr(config, "max_position_embeddings", None) or getattr(config, "max_sequence_length", None) or 2048

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=self.add_bos_token).input_ids

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Context and continuation ids; the context's trailing spaces move into the continuation (lm-eval HFLM)."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole, ctx = self._encode(context + continuation), self._encode(context)
        return (ctx or [self.prefix_token_id]), whole[len(ctx):]

    def _record(self, request, nfe: int) -> None:
        self.nfe[(request.task_name, request.doc_id, request.idx)] = int(nfe)

    # ---- generation --------------------------------------------------------------------------------------------
    def _sampler_config(self, task_name: str, gen_kwargs: dict) -> SamplerConfig:
        task = benchmarks.TASKS.get(task_name)
        if task is not None and hasattr(task, "GEN_LENGTH"):
            cfg = self.sampler.resolve(task)
        else:
            length = self.sampler.gen_length or int(gen_kwargs.get("max_gen_toks", 256))
            cfg = dataclasses.replace(self.sampler, gen_length=length,
                                      block_length=self.sampler.block_length or length,
                                      steps=self.sampler.steps or length)
        if gen_kwargs.get("do_sample"):
            cfg = dataclasses.replace(cfg, temperature=float(gen_kwargs.get("temperature", 1.0)))
        cfg.validate()
        return cfg

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out: list[str | None] = [None] * len(requests)
        groups = defaultdict(list)  # one sampler configuration and stop list per group
        for i, request in enumerate(requests):
            groups[(request.task_name, json.dumps(request.args[1], sort_keys=True, default=str))].append(i)
        generator = torch.Generator(self.device).manual_seed(self.seed)
        bar = tqdm(total=len(requests), desc="generate_until", disable=disable_tqdm or not self.progress)
        for (task_name, _), indices in groups.items():
            gen_kwargs = requests[indices[0]].args[1]
            cfg = self._sampler_config(task_name, gen_kwargs)
            self.settings[task_name] = {"sampler": dataclasses.asdict(cfg)}
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else until
            ids = {i: self._encode(requests[i].args[0]) for i in indices}
            indices.sort(key=lambda i: -len(ids[i]))  # similar lengths together: less padding
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start:start + self.batch_size]
                prompt_ids, prompt_mask = left_pad([ids[i] for i in chunk], self.tokenizer.pad_token_id, self.device)
                traj = self.sample(self.model, prompt_ids, prompt_mask, cfg, generator)
                for i, text, nfe in zip(chunk, decode(self.tokenizer, traj.completion), traj.nfe.tolist()):
                    for stop in until:
                        text = text.split(stop, 1)[0]
                    out[i] = text
                    self._record(requests[i], nfe)
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                bar.update(len(chunk))
        bar.close()
        return out

    # ---- likelihood --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _elbo(self, pairs: list[tuple[list[int], list[int]]], seeds: list[int], bar: tqdm) -> list[float]:
        """ELBO of each (context ids, continuation ids) pair; pairs with equal continuation length share a batch."""
        out = [0.0] * len(pairs)  # an empty continuation has log-likelihood 0
        by_length = defaultdict(list)
        for i, (_, continuation) in enumerate(pairs):
            by_length[len(continuation)].append(i)
        per_batch = max(1, self.batch_size // (2 * self.mc_samples))
        for length, indices in by_length.items():
            for start in range(0, len(indices), per_batch):
                chunk = indices[start:start + per_batch]
                if length:
                    prompt_ids, prompt_mask = left_pad([pairs[i][0] for i in chunk], self.tokenizer.pad_token_id, self.device)
                    completion = torch.tensor([pairs[i][1] for i in chunk], dtype=torch.long, device=self.device)
                    values = elbo(self.model, prompt_ids, prompt_mask, completion,
                                  torch.tensor([seeds[i] for i in chunk]), self.mc_samples)
                    for i, value in zip(chunk, values.tolist()):
                        out[i] = value
                bar.update(len(chunk))
        return out

    def _seed(self, context: str) -> int:
        return (self.seed * 1_000_003 + zlib.crc32(context.encode())) % 2**31

    def _likelihood_settings(self, requests) -> None:
        for name in {r.task_name for r in requests}:
            self.settings[name] = {"likelihood": {"estimator": "coupled Monte-Carlo ELBO",
                                                  "mc_samples": self.mc_samples, "seed": self.seed}}

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        with tqdm(total=len(requests), desc="loglikelihood", disable=disable_tqdm or not self.progress) as bar:
            values = self._elbo([self._encode_pair(*r.args) for r in requests],
                                [self._seed(r.args[0]) for r in requests], bar)
        self._likelihood_settings(requests)
        for request, value in zip(requests, values):
            self._record(request, 2 * self.mc_samples)
            self.cache_hook.add_partial("loglikelihood", request.args, (value, False))
        return [(value, False) for value in values]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        self._likelihood_settings(requests)
        for request in tqdm(requests, desc="loglikelihood_rolling", disable=disable_tqdm or not self.progress):
            (text,) = request.args
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                self._encode(text), self.prefix_token_id, self.max_length, context_len=1)]
            out.append(sum(self._elbo(windows, [self._seed(text)] * len(windows), tqdm(disable=True))))
            self._record(request, 2 * self.mc_samples * len(windows))
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, out[-1])
        return out

    def get_model_info(self) -> dict:
        """What lm-eval records under results["config"] about the model."""
        parameters = list(self.model.parameters())
        return {"pretrained": str(self.model.config.name_or_path), "model_dtype": str(parameters[0].dtype),
                "model_num_parameters": sum(p.numel() for p in parameters)}

    # ---- chat template (lm-eval --apply_chat_template) ---------------------------------------------------------
    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.tokenizer.chat_template if chat_template else None

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt,
                                                  continue_final_message=not add_generation_prompt)

    # ---- multi-process (accelerate launch) ---------------------------------------------------------------------
    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.accelerator.gather(tensor) if self.world_size > 1 else tensor

    def gather_object(self, obj, dst: int = 0):
        if self.world_size == 1:
            return [obj]
        gathered = [None] * self.world_size if self.rank == dst else None
        torch.distributed.gather_object(obj, gathered, dst=dst)
        return gathered

    def barrier(self) -> None:
        if self.world_size > 1:
            self.accelerator.wait_for_everyone()


@dataclass(frozen=True)
class EvalConfig:
    model: str = "results/base"
    """model folder (a checkpoint's model/ or a base) or hub id"""
    tasks: str = "gsm8k,humaneval,hellaswag,arithmetic,sudoku"
    """comma-separated task names: modules in benchmarks/, lm-eval tasks in benchmarks/lm_eval/"""
    limit: int | None = None
    """evaluate only the first N items of each task; None = all"""
    out: str = ""
    """the results JSON file to write (required)"""
    mc_samples: int = 64
    """coupled ELBO samples per log-likelihood request, 2 forward passes each: 128 passes, LLaDA's mc_num=128
    (eval_llada_lm_eval.sh @b7e6c35)"""
    batch_size: int = 32
    """sequences per forward pass: prompts per sampler call; log-likelihood requests per pass as far as their
    2 x mc_samples copies fit (at least one)"""
    seed: int = 0
    """seed of the ELBO masks and of sampling at temperature > 0"""
    apply_chat_template: bool = True
    """wrap each context as the user turn of the model's chat template, as training does; false = raw text"""
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    """sampler for generation tasks (greedy); unset lengths come from each task, as in training"""


def score(model, tokenizer, task: str, limit: int, sampler: SamplerConfig, sample=None, items: bool = False,
          batch_size: int = 64) -> dict | None:
    """lm-eval, in this process, of a loaded model on a generated-answer task of benchmarks/ (the training loop's
    test evaluation): {"reward", "accuracy", "nfe"}, the means over the first `limit` test items of the task's
    lm-eval metrics (its LM_EVAL_REWARD, see benchmarks/__init__.py) and of the forward passes per item; with
    `items`, also "items": the reward of each item in test-split order (a paired comparison of two models).
    Greedy; `sample` evaluates a method's own decoding.

    lm-eval's lower-level `evaluate`, not `simple_evaluate`: that one reseeds the global RNGs (in the middle of a
    training run) and records the environment (`pip list`, git: about a second a call). lm-eval's log is kept to
    errors and the model's progress bars are off. Under `accelerate launch` every process must call it; the main
    process gets the scores, the others None.
    """
    was_training = model.training
    lm = DiffusionLM(model, tokenizer=tokenizer, batch_size=batch_size, sample=sample,
                     **dataclasses.asdict(dataclasses.replace(sampler, temperature=0.0)))
    lm.progress = False
    lm_logger, level = logging.getLogger("lm_eval"), logging.getLogger("lm_eval").level
    lm_logger.setLevel(logging.ERROR)
    try:
        result = lm_eval.evaluator.evaluate(lm=lm, task_dict=_manager().load([task]), limit=limit, bootstrap_iters=0,
                                            log_samples=items, apply_chat_template=True)
    finally:
        lm_logger.setLevel(level)
        model.train(was_training)
    nfe = [v for part in lm.gather_object(lm.nfe) or [] for v in part.values()]
    if result is None:
        return None
    scores, key = result["results"][task], getattr(benchmarks.get(task), "LM_EVAL_REWARD", "reward,none")
    reward, (metric, _, kept) = scores[key], key.partition(",")
    accuracy = scores.get("accuracy,none", reward)  # without an accuracy metric the reward is 0/1 (gsm8k)
    out = {"reward": reward, "accuracy": accuracy, "nfe": sum(nfe) / len(nfe)}
    if items:
        rewards = sorted((s["doc_id"], float(s[metric])) for s in result["samples"][task] if s["filter"] == kept)
        out["items"] = [r for _, r in rewards]
    return out


@functools.cache
def _manager() -> TaskManager:
    return TaskManager(include_path=str(TASKS_DIR), include_defaults=False)


PER_TASK_KEYS = ("results", "group_subtasks", "configs", "versions", "n-shot", "higher_is_better", "n-samples")


def run(cfg: EvalConfig) -> dict | None:
    """Evaluate `cfg.model` on each task and write the JSON file `cfg.out` (on the main process; None elsewhere).

    The file holds lm-eval's results dict, merged over the tasks (each task is its own `simple_evaluate` call,
    so that its seconds are its own): results, versions, n-shot, n-samples, higher-is-better, configs, plus
    lm-eval's provenance fields (config, git_hash, date, pretty_env_info, transformers_version,
    lm_eval_version, tokenizer fields) from the first call. Ours are under "harness": the EvalConfig, per task
    the seconds, the mean NFE and the NFE of every evaluated item in order (forward passes; for multiple
    choice summed over the choices) and the sampler or estimator settings it ran with, the total seconds,
    and `harness.runs.provenance()`.
    """
    if not cfg.out:
        raise ValueError("--out is required: the results JSON to write, e.g. results/runs/.../eval/lm_eval.json")
    tasks = [name.strip() for name in cfg.tasks.split(",") if name.strip()]
    for name in tasks:
        benchmarks.get(name)  # an unknown name fails here, with the list of known tasks
    lm = DiffusionLM(cfg.model, batch_size=cfg.batch_size, mc_samples=cfg.mc_samples, seed=cfg.seed,
                     **dataclasses.asdict(cfg.sampler))
    manager = _manager()
    merged, per_task, start = {}, {}, time.perf_counter()
    for name in tasks:
        t0 = time.perf_counter()
        result = lm_eval.simple_evaluate(model=lm, tasks=[name], task_manager=manager, limit=cfg.limit,
                                         log_samples=False, apply_chat_template=cfg.apply_chat_template,
                                         confirm_run_unsafe_code=True)
        per_task[name] = {"seconds": time.perf_counter() - t0, **lm.settings.get(name, {})}
        for key, value in (result or {}).items():
            if key in PER_TASK_KEYS:
                merged.setdefault(key, {}).update(value)
            else:
                merged.setdefault(key, value)
    gathered = lm.gather_object(lm.nfe)
    if lm.rank != 0:
        return None
    nfe = defaultdict(lambda: defaultdict(int))  # task -> doc -> forward passes over its requests
    for (name, doc, _), value in {k: v for part in gathered for k, v in part.items()}.items():
        nfe[name][doc] += value
    for name in tasks:
        items = [nfe[name][doc] for doc in sorted(nfe[name])]
        per_task[name].update(nfe_mean=sum(items) / max(len(items), 1), nfe=items)
    merged["harness"] = {"config": dataclasses.asdict(cfg), "tasks": per_task,
                         "seconds": time.perf_counter() - start, "provenance": runs.provenance()}
    merged = json.loads(json.dumps(merged, default=handle_non_serializable))
    runs.write_json(Path(cfg.out), merged)
    print(make_table(merged))
    print(f"results: {cfg.out}")
    return merged


if __name__ == "__main__":  # lm-eval's own CLI, with the `dllm` model registered (see the module docstring)
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
