# One RL run per method x task x seed. Single-threaded, so `--cores N` runs N of them side by side.


rule train:
    input:
        [] if MODEL else f"{BASE}/pretrain.json",
    output:
        metrics=f"{RUN}/metrics.jsonl",
        test_items=f"{RUN}/test_items.jsonl",
        config=f"{RUN}/config.json",
        final_model=[directory(f"{RUN}/snapshots/step{STEPS}")] if FINAL_MODEL else [],
    log:
        f"{RUN}/train.log",
    benchmark:
        f"{RUN}/timing.tsv"
    params:
        harness=lambda w, output: launcher(output[0]),
        base=lambda w, input: MODEL or Path(input[0]).parent,
        run=lambda w, output: Path(output.metrics).parent,
        args=train_flags,
    threads: 1
    resources:
        **job_resources("train", mem_mb=2000),  # measured peak RSS up to 1.7 GB (AGRPO on sudoku)
    # A job resumes from the run's checkpoint (git-ignored, not an output) when its config and base are those
    # of the checkpoint, e.g. after a crash (`snakemake --rerun-incomplete`): the harness restores the outputs
    # Snakemake deleted (metrics.jsonl, test_items.jsonl and snapshots up to the checkpoint) and ends bit-identical to an
    # uninterrupted run. When the params or the base changed, the old checkpoint is discarded.
    shell:
        "OMP_NUM_THREADS={threads} {params.harness} train --algo {wildcards.algo} "
        "--task {wildcards.task} --seed {wildcards.seed} --profile {wildcards.profile} "
        "--model {params.base} --out {params.run} --threads {threads} --restart_if_changed true "
        "{params.args} > {log} 2>&1"
