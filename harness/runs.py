"""Run-folder I/O: resolved config, provenance, metrics.jsonl and checkpoints, all written atomically.

    results/runs/{profile}/{task}/{algo}/seed{seed}/
        config.json       the fully resolved configuration that ran
        provenance.json   git sha and dirty flag, package versions, device, start time
        metrics.jsonl     one JSON object per RL step
        checkpoint/       model/ (save_pretrained + tokenizer) and state.pt (step, optimizer, reference, RNGs, the
                          resolved config and the metrics rows so far: a run resumes even when config.json and
                          metrics.jsonl were deleted, as Snakemake does before rerunning a job) and hard links
                          to the snapshots so far; git-ignored

Every file is written to a temporary name in the same folder and renamed into place, so a crash leaves
either the old complete file or the new complete one, never half of either.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import torch

PACKAGES = ("torch", "transformers", "accelerate", "tokenizers", "numpy", "lm_eval", "snakemake", "peft")


def dumps(obj) -> str:
    return json.dumps(obj, sort_keys=True)


def jsonable(obj):
    """`obj` as it reads back from JSON (tuples become lists), for comparing configs with saved ones."""
    return json.loads(json.dumps(obj))


def write_json(path: Path, obj) -> None:
    write_text(Path(path), json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: Path):
    path = Path(path)
    return json.loads(path.read_text()) if path.exists() else None


def write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(f.name, path)


def read_metrics(path: Path) -> list[dict]:
    path = Path(path)
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def append_metrics(path: Path, row: dict) -> None:
    """Append one row; the file is rewritten whole so that a crash never leaves a torn last line."""
    rows = read_metrics(path) + [row]
    write_text(Path(path), "".join(dumps(r) + "\n" for r in rows))


def provenance() -> dict:
    root = Path(__file__).resolve().parent.parent

    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name.replace("_", "-"))
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "git_sha": git("rev-parse", "HEAD") or None,
        "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "python": sys.version.split()[0],
        "packages": versions,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
    }


def _replace_dir(tmp: Path, final: Path) -> None:
    """Move a finished folder into place; the previous one is removed only after the new one is there."""
    old = final.with_name(f".{final.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def save_model(model, tokenizer, folder: Path) -> None:
    """save_pretrained (weights, config, remote code; or a LoRA adapter) plus the tokenizer, atomically."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    _save_pretrained(model, tmp)
    tokenizer.save_pretrained(tmp)
    _replace_dir(tmp, folder)


def _save_pretrained(model, folder: Path) -> None:
    """save_pretrained; of a LoRA model only the trained adapter (its config names the base model), not the
    reference adapter a method may keep (that one is in the checkpoint's state), nor the embeddings (never trained)."""
    lora = {"selected_adapters": ["default"], "save_embedding_layers": False}
    model.save_pretrained(folder, **(lora if hasattr(model, "peft_config") else {}))


def save_checkpoint(folder: Path, model, tokenizer, state: dict, keep: Path | None = None) -> None:
    """checkpoint/ = model/ + state.pt (+ hard links to the folders in `keep`, e.g. the run's snapshots, which
    Snakemake deletes with the job's other outputs before rerunning it), written as one folder, swapped in whole."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    _save_pretrained(model, tmp / "model")
    tokenizer.save_pretrained(tmp / "model")
    torch.save(state, tmp / "state.pt")
    if keep is not None:
        link_missing(keep, tmp / Path(keep).name)
    _replace_dir(tmp, folder)


def link_missing(src: Path, dst: Path) -> None:
    """Give folder `dst` each folder of `src` that it lacks, as hard links (no data is copied: files here are
    replaced, never modified in place), each moved into place whole."""
    src, dst = Path(src), Path(dst)
    for entry in sorted(src.iterdir()) if src.is_dir() else []:
        if entry.is_dir() and not entry.name.startswith(".") and not (dst / entry.name).exists():
            dst.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(dir=dst, prefix=f".{entry.name}."))
            shutil.copytree(entry, tmp, copy_function=os.link, dirs_exist_ok=True)
            os.replace(tmp, dst / entry.name)


def load_state(folder: Path) -> dict | None:
    """The state of the last complete checkpoint in `folder` (None if there is none), after cleaning up what a
    crash left: a kill between the two renames of `_replace_dir` leaves the previous checkpoint complete under
    `.checkpoint.old`, which is moved back; half-written temporaries (`.<name>.*`) of the run folder are removed."""
    folder = Path(folder)
    old = folder.with_name(f".{folder.name}.old")
    if old.is_dir() and not folder.exists():
        os.replace(old, folder)
    for tmp in folder.parent.glob(".*.*"):  # temporaries of write_text, save_model and save_checkpoint
        shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()
    path = folder / "state.pt"
    return torch.load(path, weights_only=False) if path.exists() else None
