# lm-eval (`python -m harness eval`, lm_eval.enabled) of every run's snapshots, of its final model at the
# entropy-bounded gammas of the inference frontier, and of the base (step 0). The in-training test
# evaluation in metrics.jsonl needs no rule.


rule lm_eval_snapshot:
    input:
        f"{RUN}/snapshots/step{{step}}",
    output:
        f"{RUN}/eval/step{{step}}.json",
    log:
        f"{RUN}/eval/step{{step}}.log",
    benchmark:
        f"{RUN}/eval/step{{step}}.timing.tsv"
    params:
        harness=HARNESS,
        tasks=lambda w: eval_tasks(w.task, w.step),
        limit=config["lm_eval"]["limit"],
    threads: 1
    resources:
        mem_mb=2000,
    shell:
        "OMP_NUM_THREADS={threads} {params.harness} eval --model {input} --tasks {params.tasks} "
        "--limit {params.limit} --out {output} > {log} 2>&1"


rule lm_eval_frontier:
    input:
        f"{RUN}/snapshots/step{STEPS}",
    output:
        f"{RUN}/eval/eb{{gamma}}.json",
    log:
        f"{RUN}/eval/eb{{gamma}}.log",
    benchmark:
        f"{RUN}/eval/eb{{gamma}}.timing.tsv"
    params:
        harness=HARNESS,
        limit=config["lm_eval"]["limit"],
    threads: 1
    resources:
        mem_mb=2000,
    shell:
        "OMP_NUM_THREADS={threads} {params.harness} eval --model {input} --tasks {wildcards.task} "
        "--limit {params.limit} --sampler.decoding eb --sampler.eb_gamma {wildcards.gamma} --out {output} "
        "> {log} 2>&1"


rule lm_eval_base:
    input:
        f"{BASE}/pretrain.json",
    output:
        f"{BASE}/eval/step0.json",
    log:
        f"{BASE}/eval/step0.log",
    benchmark:
        f"{BASE}/eval/step0.timing.tsv"
    params:
        harness=HARNESS,
        model=lambda w, input: Path(input[0]).parent,
        tasks=",".join(dict.fromkeys(TASKS + config["lm_eval"]["tasks"])),
        limit=config["lm_eval"]["limit"],
    threads: 1
    resources:
        mem_mb=2000,
    shell:
        "OMP_NUM_THREADS={threads} {params.harness} eval --model {params.model} --tasks {params.tasks} "
        "--limit {params.limit} --out {output} > {log} 2>&1"


rule lm_eval_base_frontier:
    input:
        f"{BASE}/pretrain.json",
    output:
        f"{BASE}/eval/eb{{gamma}}.json",
    log:
        f"{BASE}/eval/eb{{gamma}}.log",
    benchmark:
        f"{BASE}/eval/eb{{gamma}}.timing.tsv"
    params:
        harness=HARNESS,
        model=lambda w, input: Path(input[0]).parent,
        tasks=",".join(TASKS),
        limit=config["lm_eval"]["limit"],
    threads: 1
    resources:
        mem_mb=2000,
    shell:
        "OMP_NUM_THREADS={threads} {params.harness} eval --model {params.model} --tasks {params.tasks} "
        "--limit {params.limit} --sampler.decoding eb --sampler.eb_gamma {wildcards.gamma} --out {output} "
        "> {log} 2>&1"
