"""One lm-eval job: a model evaluated by `harness.evaluate.run` (what `python -m harness eval` runs) once per
output file, in one process, so that the start-up of torch, transformers and lm-eval is paid once per job.

params: root (the checkout whose harness runs), model (a model folder), evaluations (one {"tasks", "limit",
"sampler"} per output file, in order; workflow/rules/common.smk `evaluations`), launch (the profile's
`accelerate launch ... -m harness` command, or empty): under a launch each evaluation is its own
`... -m harness eval` command, one process per GPU sharing the items.
"""


import subprocess
import sys

if __name__ == "__main__" and "snakemake" in globals():
    sys.stdout = sys.stderr = open(snakemake.log[0], "w")
    sys.path.insert(0, str(snakemake.params.root))
    import torch

    from harness.evaluate import EvalConfig, run
    from harness.sampler import SamplerConfig

    torch.set_num_threads(snakemake.threads)
    for out, spec in zip(snakemake.output, snakemake.params.evaluations, strict=True):
        if snakemake.params.launch:
            sampler = " ".join(f"--sampler.{k} {v}" for k, v in spec["sampler"].items())
            command = (f"{snakemake.params.launch} eval --model {snakemake.params.model} --tasks {spec['tasks']} "
                       f"--limit {spec['limit']} --out {out} {sampler}")
            print(command, flush=True)
            subprocess.run(command, shell=True, check=True, stdout=sys.stdout, stderr=sys.stderr)
            continue
        run(EvalConfig(model=str(snakemake.params.model), tasks=spec["tasks"], limit=spec["limit"], out=out,
                       sampler=SamplerConfig(**spec["sampler"])))
