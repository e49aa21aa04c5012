# The tiny masked-diffusion base every method starts from (harness/pretrain.py).


rule pretrain:
    output:
        report(f"{BASE}/pretrain.json", caption="../report/pretrain.rst", category="Base model"),
    log:
        f"results/logs/pretrain_{PROFILE}.log",  # not in BASE: writing the model replaces that folder
    benchmark:
        f"{BASE}/timing.tsv"
    params:
        harness=HARNESS,
        out=lambda w, output: Path(output[0]).parent,
        args=flags(config["pretrain"]),
    threads: 1  # fixed: the exact base depends on the float summation order (PretrainConfig.threads)
    resources:
        mem_mb=1000,
    shell:
        "OMP_NUM_THREADS={threads} {params.harness} pretrain --out {params.out} "
        "--threads {threads} {params.args} > {log} 2>&1"
