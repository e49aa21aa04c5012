# lm-eval of the real benchmarks (lm_eval.benchmarks, lm_eval.limit items each): the final models of the first
# lm_eval.benchmark_seeds seeds, and the base. The test evaluations on the training task (every train.eval_every
# steps, and the inference frontier at lm_eval.eb_gammas of the initial and final models) are lm-eval's too, run
# inside the train job: they need no rule.


rule lm_eval_benchmarks:
    input:
        f"{RUN}/snapshots/step{STEPS}",
    output:
        f"{RUN}/eval/step{STEPS}.json",
    log:
        f"{RUN}/eval/step{STEPS}.log",
    benchmark:
        f"{RUN}/eval/step{STEPS}.timing.tsv"
    params:
        harness=lambda w, output: launcher(output[0]),
        tasks=",".join(BENCHMARKS),
        limit=config["lm_eval"]["limit"],
    threads: 1
    resources:
        **job_resources("lm_eval", mem_mb=2000),
    shell:
        "OMP_NUM_THREADS={threads} {params.harness} eval --model {input} --tasks {params.tasks} "
        "--limit {params.limit} --out {output} > {log} 2>&1"


rule lm_eval_base:
    input:
        [] if MODEL else f"{BASE}/pretrain.json",
    output:
        f"{BASE}/eval/step0.json",
    log:
        f"{BASE}/eval/step0.log",
    benchmark:
        f"{BASE}/eval/step0.timing.tsv"
    params:
        harness=lambda w, output: launcher(output[0]),
        model=lambda w, input: MODEL or Path(input[0]).parent,
        tasks=",".join(BENCHMARKS),
        limit=config["lm_eval"]["limit"],
    threads: 1
    resources:
        **job_resources("lm_eval", mem_mb=2000),
    shell:
        "OMP_NUM_THREADS={threads} {params.harness} eval --model {params.model} --tasks {params.tasks} "
        "--limit {params.limit} --out {output} > {log} 2>&1"
