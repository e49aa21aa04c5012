# One RL run per method x task x seed. Single-threaded, so `--cores N` runs N of them side by side.


rule train:
    input:
        f"{BASE}/pretrain.json",
    output:
        metrics=f"{RUN}/metrics.jsonl",
        config=f"{RUN}/config.json",
        snapshots=[directory(f"{RUN}/snapshots/step{n}") for n in SNAPSHOTS] if LM_EVAL else [],
    log:
        f"{RUN}/train.log",
    benchmark:
        f"{RUN}/timing.tsv"
    params:
        harness=HARNESS,
        base=lambda w, input: Path(input[0]).parent,
        run=lambda w, output: Path(output.metrics).parent,
        args=train_flags,
    threads: 1
    resources:
        mem_mb=2000,  # measured peak RSS up to 1.7 GB (AGRPO on sudoku)
    # A job always trains from scratch: Snakemake has deleted the run's outputs, so the harness must not
    # resume from an old checkpoint. To resume a crashed run by hand, rerun the command recorded in its
    # provenance.json: the harness continues from the last checkpoint.
    shell:
        "rm -rf {params.run}/checkpoint && "
        "OMP_NUM_THREADS={threads} {params.harness} train --algo {wildcards.algo} "
        "--task {wildcards.task} --seed {wildcards.seed} --profile {wildcards.profile} "
        "--model {params.base} --out {params.run} --threads {threads} {params.args} > {log} 2>&1"
