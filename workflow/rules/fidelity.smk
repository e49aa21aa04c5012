# The likelihood-fidelity study (`python -m harness.fidelity`, fidelity.enabled): each method's likelihood
# surrogate and policy-gradient estimate against the exact ones, on short completions of the profile's base;
# and its table and figure in the paper (written as a one-line note when the study is off).

FIDELITY = "results/fidelity"
FIDELITY_CSV = [f"{FIDELITY}/{name}.csv" for name in ("exact", "loglik", "gradient", "gradient_mean")]
FIDELITY_TABLES = ["fidelity", "fidelity_findings"]  # the table and a generated paragraph
FIDELITY_FIGURES = ["fidelity"]
FIDELITY_ON = config["fidelity"]["enabled"]
# the config's keys as flags of harness.fidelity: {draws: [1, 2]} -> '--draws 1 2'
FIDELITY_FLAGS = " ".join(
    f"--{k} {' '.join(map(str, v)) if isinstance(v, list) else v}" for k, v in config["fidelity"].items() if k != "enabled"
)


rule fidelity:
    input:
        f"{BASE}/pretrain.json",
    output:
        FIDELITY_CSV,
        f"{FIDELITY}/run.json",
    log:
        "results/logs/fidelity.log",
    benchmark:
        "results/logs/fidelity.tsv"
    params:
        harness=HARNESS,
        base=lambda w, input: Path(input[0]).parent,
        out=lambda w, output: Path(output[0]).parent,
        args=FIDELITY_FLAGS,
    threads: 1
    resources:
        mem_mb=1500,
    shell:
        "OMP_NUM_THREADS={threads} {params.harness}.fidelity --model {params.base} --out {params.out} "
        "--threads {threads} {params.args} > {log} 2>&1"


rule fidelity_report:
    input:
        FIDELITY_CSV if FIDELITY_ON else [],
    output:
        report(
            expand("paper/tables/{name}.{ext}", name=FIDELITY_TABLES, ext=["md", "tex"])
            + expand("paper/figures/{name}.{ext}", name=FIDELITY_FIGURES, ext=["pdf", "png"]),
            caption="../report/fidelity.rst",
            category="Likelihood fidelity",
        ),
    log:
        "results/logs/fidelity_report.log",
    benchmark:
        "results/logs/fidelity_report.tsv"
    params:
        methods=ALGOS,
        names=config["report"]["names"],
    threads: 1
    resources:
        mem_mb=1000,
    script:
        "../scripts/fidelity_report.py"
