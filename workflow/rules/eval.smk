# lm-eval of the final models and the base, one job (one process) each: the real benchmarks (lm_eval.benchmarks,
# final models of the first lm_eval.benchmark_seeds seeds) and the inference frontier (every final model on its
# task under entropy-bounded decoding at each of lm_eval.eb_gammas). The in-training test evaluation, lm-eval's
# too, runs inside the train job and needs no rule.


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
        root=ROOT,
        launch=lambda w, output: launcher(output[0]) if LAUNCH else "",
        model=lambda w, input: input[0],
        evaluations=lambda w, output: evaluations(output, []),
    threads: 1
    resources:
        **job_resources("lm_eval", mem_mb=2000),
    script:
        "../scripts/lm_eval.py"


rule lm_eval_frontier:
    input:
        f"{RUN}/snapshots/step{STEPS}",
    output:
        [f"{RUN}/eval/eb{g}.json" for g in GAMMAS],
    log:
        f"{RUN}/eval/frontier.log",
    benchmark:
        f"{RUN}/eval/frontier.timing.tsv"
    params:
        root=ROOT,
        launch=lambda w, output: launcher(output[0]) if LAUNCH else "",
        model=lambda w, input: input[0],
        evaluations=lambda w, output: evaluations(output, [w.task]),
    threads: 1
    resources:
        **job_resources("lm_eval", mem_mb=2000),
    script:
        "../scripts/lm_eval.py"


rule lm_eval_base:
    input:
        [] if MODEL else f"{BASE}/pretrain.json",
    output:
        base_eval_files(),
    log:
        f"{BASE}/eval/lm_eval.log",
    benchmark:
        f"{BASE}/eval/lm_eval.timing.tsv"
    params:
        root=ROOT,
        launch=lambda w, output: launcher(output[0]) if LAUNCH else "",
        model=lambda w, input: MODEL or Path(input[0]).parent,
        evaluations=lambda w, output: evaluations(output, TASKS),
    threads: 1
    resources:
        **job_resources("lm_eval", mem_mb=2000),
    script:
        "../scripts/lm_eval.py"
