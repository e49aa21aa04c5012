# Aggregation, tables, figures and the paper: pure functions of the run folders (they never retrain).


rule aggregate:
    input:
        summary_inputs(),
    output:
        summary=report("results/summary.csv", caption="../report/summary.rst", category="Results"),
        test_items="results/items.csv",
    log:
        "results/logs/aggregate.log",
    benchmark:
        "results/logs/aggregate.tsv"
    params:
        tasks=TASKS,
    threads: 1
    resources:
        mem_mb=500,
    script:
        "../scripts/aggregate.py"


rule tables:
    input:
        summary="results/summary.csv",
        test_items="results/items.csv",
        reported="paper/reported.csv",
    output:
        report(
            expand("paper/tables/{name}.{ext}", name=TABLES, ext=["md", "tex"]),
            caption="../report/tables.rst",
            category="Tables",
        ),
    log:
        "results/logs/tables.log",
    benchmark:
        "results/logs/tables.tsv"
    params:
        metric=config["report"]["metric"],
        names=config["report"]["names"],
        algos=ALGOS,
    threads: 1
    resources:
        mem_mb=500,
    script:
        "../scripts/tables.py"


rule figures:
    input:
        "results/summary.csv",
    output:
        report(
            expand("paper/figures/{name}.{ext}", name=FIGURES, ext=["pdf", "png"]),
            caption="../report/figures.rst",
            category="Figures",
        ),
    log:
        "results/logs/figures.log",
    benchmark:
        "results/logs/figures.tsv"
    params:
        metric=config["report"]["metric"],
        names=config["report"]["names"],
        algos=ALGOS,
    threads: 1
    resources:
        mem_mb=1000,
    script:
        "../scripts/figures.py"


rule paper:
    input:
        md="paper/main.md",
        tex="paper/main.tex",
        tables=expand("paper/tables/{name}.{ext}", name=TABLES, ext=["md", "tex"]),
        figures=expand("paper/figures/{name}.{ext}", name=FIGURES, ext=["pdf", "png"]),
        fidelity=rules.fidelity_report.output,
    output:
        report(paper_outputs(), caption="../report/paper.rst", category="Paper"),
    log:
        "results/logs/paper.log",
    benchmark:
        "results/logs/paper.tsv"
    params:
        latex=LATEX,
    threads: 1
    resources:
        mem_mb=500,
    script:
        "../scripts/paper.py"
