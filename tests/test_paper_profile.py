"""The paper profile as far as it can be checked without GPUs: `snakemake -n --configfile config/paper.yaml` plans
one accelerate-launched GPU job per method (no pretraining: the runs start from LLaDA-8B-Instruct, which need not
exist at planning time), each with the shared settings stated once and its paper's own overrides; the Slurm
profile plans the same jobs; every setting of config/paper.yaml says where it comes from; the shipped accelerate
configs parse."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from accelerate.commands.config.config_args import load_config_from_file

from tests.test_workflow import METHODS, ROOT, job_counts, snakemake

PAPER = yaml.safe_load((ROOT / "config/paper.yaml").read_text())


def jobs(output: str) -> dict[str, dict]:
    """{run folder: {"command": ..., "resources": ...}} of the planned train jobs of a dry run with -p."""
    found = {}
    for block in output.split("\n\n"):
        if block.lstrip().startswith("[") and "\nrule train:" in block:
            run = re.search(r"output: (\S+)/metrics\.jsonl", block)[1]
            found[run] = {"command": re.search(r"Shell command: (.+)", block)[1],
                          "resources": re.search(r"resources: (.+)", block)[1]}
    return found


def test_dry_run_plans_accelerate_launched_gpu_jobs_with_each_papers_settings():
    done = snakemake("-n", "-p", "--configfile", "config/paper.yaml")
    assert done.returncode == 0, done.stdout[-3000:]
    counts = job_counts(done.stdout)
    assert "pretrain" not in counts and counts["train"] == len(METHODS) * len(PAPER["tasks"])
    assert counts["lm_eval_base"] == 1 and counts["lm_eval_benchmarks"] == len(METHODS)
    planned = jobs(done.stdout)
    assert sorted(Path(run).parent.name for run in planned) == METHODS
    for run, job in planned.items():
        algo, command = Path(run).parent.name, job["command"]
        assert "-m accelerate.commands.launch --config_file" in command and "config/accelerate/ddp.yaml" in command
        assert "--num_processes 8 --main_process_port" in command and " -m harness train " in command
        assert "--model GSAI-ML/LLaDA-8B-Instruct " in command and "--dtype bfloat16" in command
        assert "gpu=8" in job["resources"] and "runtime=4320" in job["resources"] and "nodes=1" in job["resources"]
        settings = {**PAPER["train"], **PAPER["train_overrides"].get(algo, {})}
        for key, value in settings.items():  # each flag once, the method's override where it has one
            text = " ".join(map(str, value)) if isinstance(value, list) else str(value)
            assert command.count(f"--{key} ") == 1 and f"--{key} {text} " in command + " ", (algo, key)
    ports = {re.search(r"--main_process_port (\d+)", j["command"])[1] for j in planned.values()}
    assert len(ports) == len(planned)  # jobs sharing a node do not share a rendezvous port
    dmpo = planned["results/runs/paper/gsm8k/dmpo/seed0"]["command"]
    assert "--lr 1e-06 " in dmpo and "--group_size 16 " in dmpo and "--load_in_4bit True " in dmpo
    lm_eval = [b for b in done.stdout.split("\n\n") if "\nrule lm_eval_" in b]
    assert lm_eval and all("gpu=8" in b for b in lm_eval)


def test_slurm_profile_plans_the_same_jobs():
    pytest.importorskip("snakemake_executor_plugin_slurm")
    done = snakemake("-n", "--configfile", "config/paper.yaml", "--workflow-profile", "workflow/profiles/slurm")
    assert done.returncode == 0, done.stdout[-3000:]
    assert job_counts(done.stdout)["train"] == len(METHODS)
    resources = re.findall(r"rule train:\n(?:    .*\n)*?    resources: (.+)", done.stdout)
    assert len(resources) == len(METHODS)
    assert all({"slurm_partition=gpu", "gpu=8", "runtime=4320"} <= set(r.split(", ")) for r in resources)


def test_every_paper_setting_says_where_it_comes_from():
    """A value line of train / train_overrides / launch / resources / model / tasks carries a comment, or sits in a
    method block whose header line does (a block of one paper's values)."""
    uncited, block_cited = [], False
    section = None
    for line in (ROOT / "config/paper.yaml").read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        indent = len(line) - len(line.lstrip())
        if indent == 0:
            section = line.split(":")[0]
        if section not in ("model", "tasks", "seeds", "launch", "resources", "train", "train_overrides"):
            continue
        if section == "train_overrides" and indent == 2:
            block_cited = "#" in line
        cited = "#" in line or (section == "train_overrides" and indent == 4 and block_cited)
        if not cited and not line.rstrip().endswith(":"):
            uncited.append(line)
    # the few lines left are continuations of a cited value (LoRA alpha / dropout after rank, the 4-bit of d1)
    assert uncited == ["  lora_alpha: 64", "  lora_dropout: 0.05"], uncited


@pytest.mark.parametrize("name, kind", [("ddp", "MULTI_GPU"), ("zero2", "DEEPSPEED"), ("zero3", "DEEPSPEED")])
def test_accelerate_configs_parse(name, kind):
    config = load_config_from_file(str(ROOT / f"config/accelerate/{name}.yaml"))
    assert config.distributed_type == kind and config.mixed_precision == "bf16" and config.num_machines == 1
    if kind == "DEEPSPEED":
        assert config.deepspeed_config["zero_stage"] == int(name[-1])


def test_launched_workflow_jobs_run_on_two_cpu_processes(tmp_path, monkeypatch):
    """The smoke profile with `launch` (config/accelerate/cpu.yaml, 2 gloo processes): the train job (with its
    in-process lm-eval, the frontier included) and the benchmark job of a run go through `accelerate launch`, as the
    paper profile's do on GPUs."""
    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")  # what makes accelerate start gloo processes (cpu.yaml)
    work = tmp_path / "work"
    work.mkdir()
    (tmp_path / "launch.yaml").write_text(yaml.safe_dump({
        "algorithms": ["d1"], "launch": {"accelerate_config": "config/accelerate/cpu.yaml", "processes": 2},
        "lm_eval": {"benchmarks": ["arithmetic"], "benchmark_seeds": 1, "limit": 2, "eb_gammas": [1.0]}}))
    run = "results/runs/smoke/arithmetic/d1/seed0"
    done = snakemake(f"{run}/eval/step2.json", "--snakefile", str(ROOT / "workflow/Snakefile"), "--directory",
                     str(work), "--cores", "2", "--configfile", str(ROOT / "config/smoke.yaml"),
                     str(tmp_path / "launch.yaml"), "-p", timeout=900)
    assert done.returncode == 0, done.stdout[-5000:]
    log = (work / run / "train.log").read_text()
    provenance = yaml.safe_load((work / run / "provenance.json").read_text())
    assert provenance["processes"] == 2 and "accelerate.commands.launch" in done.stdout
    rows = [yaml.safe_load(line) for line in (work / run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2] and "eval/reward" in rows[-1], log[-2000:]
    assert "eval_eb1.0/nfe" in rows[0] and "eval_eb1.0/nfe" in rows[-1]  # the frontier, in the launched train job
    assert "accelerate.commands.launch" in done.stdout.split("rule lm_eval_benchmarks:")[1]  # its printed command
    benchmarks = yaml.safe_load((work / run / "eval/step2.json").read_text())
    assert benchmarks["harness"]["tasks"]["arithmetic"]["nfe"] and "reward,none" in benchmarks["results"]["arithmetic"]
