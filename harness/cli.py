"""`python -m harness pretrain|train|eval ...`: flags generated from the config dataclasses.

Every dataclass field becomes a flag whose help is the field's docstring: TrainConfig fields as `--name`,
the sampler's as `--sampler.name` and `--eval_sampler.name`, and the chosen method's Config as
`--algo.name` (run `python -m harness train --algo NAME --help` to see a method's own fields); EvalConfig
fields as `--name` and its sampler's as `--sampler.name`.

Bad input (an unknown or mistyped flag, a value of the wrong type, an unknown method or task, lengths that do
not fit, a missing or malformed data file, a model folder without a mask token, NaN/Inf in training) ends
with one line `error: <message>` on stderr and a non-zero exit status (2 for flags, 1 otherwise), before
anything is written; set DLLM_DEBUG=1 to see the traceback instead.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import inspect
import json
import os
import sys
import textwrap
import typing

import algorithms
from harness import evaluate
from harness.pretrain import PretrainConfig, pretrain
from harness.train import TrainConfig, train

# what bad input raises, each with a message that names the value, the place and the fix
EXPECTED = (ValueError, KeyError, TypeError, FileNotFoundError, ConnectionError, FloatingPointError)


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line pointing at --help, instead of a usage line listing every flag."""

    def error(self, message):
        self.exit(2, f"error: {message}; see `{self.prog} --help`\n")


def field_docs(cls) -> dict[str, str]:
    """The string literal written under each field of a dataclass (the one-documented-line convention)."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    return {a.target.id: b.value.value.strip() for a, b in zip(body, body[1:])
            if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant)}


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes"):
        return True
    if text.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def add_fields(parser: argparse.ArgumentParser, defaults, prefix: str = "") -> None:
    """One flag per field of the dataclass instance `defaults` (nested dataclasses are added separately)."""
    cls = type(defaults)
    hints, docs = typing.get_type_hints(cls), field_docs(cls)
    group = parser.add_argument_group(prefix.rstrip(".") or cls.__name__)
    for f in dataclasses.fields(cls):
        default = getattr(defaults, f.name)
        if dataclasses.is_dataclass(default):
            continue
        kind = hints[f.name]
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        options = {"dest": prefix + f.name, "default": argparse.SUPPRESS,
                   "help": f"{docs.get(f.name, '')} (default: {default})".replace("%", "%%")}
        if typing.get_origin(kind) is tuple:  # tuple[float, float] takes 2 values, tuple[float, ...] any number
            options.update(nargs="+" if args[-1] is Ellipsis else len(args), type=args[0],
                           metavar=args[0].__name__.upper())
        else:
            base = args[0] if args else kind
            options.update(type=_bool if base is bool else base, metavar=base.__name__.upper())
        group.add_argument(f"--{prefix}{f.name}", **options)


def build(base, values: dict, prefix: str = ""):
    """`base` (a dataclass instance) with the parsed values that belong to it, nested dataclasses included."""
    changes = {}
    for f in dataclasses.fields(base):
        key, current = prefix + f.name, getattr(base, f.name)
        if dataclasses.is_dataclass(current):
            changes[f.name] = build(current, values, key + ".")
        elif key in values:
            changes[f.name] = tuple(values[key]) if isinstance(values[key], list) else values[key]
    return dataclasses.replace(base, **changes)


def main(argv: list[str] | None = None) -> None:
    try:
        _main(sys.argv[1:] if argv is None else argv)
    except EXPECTED as e:
        if os.environ.get("DLLM_DEBUG"):
            raise
        sys.exit(f"error: {e.args[0] if isinstance(e, KeyError) and e.args else e}")  # KeyError's str() quotes


def _main(argv: list[str]) -> None:
    parser = Parser(prog="python -m harness", description=__doc__,
                    formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    commands = parser.add_subparsers(dest="command", required=True)
    pre = commands.add_parser("pretrain", help="build the tiny base model (tokenizer + masked-diffusion SFT)",
                              allow_abbrev=False)
    add_fields(pre, PretrainConfig())
    tr = commands.add_parser("train", help="train one method on one task with one seed", allow_abbrev=False,
                             description=f"methods: {', '.join(sorted(algorithms.ALGORITHMS))}")
    add_fields(tr, TrainConfig())
    add_fields(tr, TrainConfig().sampler, "sampler.")
    add_fields(tr, TrainConfig().eval_sampler, "eval_sampler.")
    ev = commands.add_parser("eval", help="evaluate a model with lm-eval on tasks of benchmarks/ (JSON results)",
                             allow_abbrev=False)
    add_fields(ev, evaluate.EvalConfig())
    add_fields(ev, evaluate.EvalConfig().sampler, "sampler.")
    algo_name = _peek(argv, "--algo", TrainConfig.algo)
    algo = algorithms.get(algo_name)
    add_fields(tr, algo.Config(), "algo.")

    namespace, unknown = parser.parse_known_args(argv)
    if unknown:
        sub = commands.choices[namespace.command]
        guesses = {g for flag in unknown if flag.startswith("--")
                   for g in difflib.get_close_matches(flag.split("=")[0], sub._option_string_actions, n=1)}
        sub.error(f"unrecognized arguments: {' '.join(unknown)}"
                  + (f" (did you mean {', '.join(sorted(guesses))}?)" if guesses else ""))
    values = vars(namespace)
    command = values.pop("command")
    if command == "pretrain":
        print(json.dumps(pretrain(build(PretrainConfig(), values)), indent=2))
    elif command == "eval":
        evaluate.run(build(evaluate.EvalConfig(), values))
    else:
        algo_values = {k.removeprefix("algo."): v for k, v in values.items() if k.startswith("algo.")}
        run = train(build(TrainConfig(), values), build(algo.Config(), algo_values))
        print(f"run folder: {run}")


def _peek(argv: list[str], flag: str, default: str) -> str:
    """The value of `flag` before full parsing (the method decides which flags exist)."""
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return default
