rule summarize:
    """summary.json (one row per model_k) and the MLflow parent run with a child run per round."""
    input:
        code=[SRC / "report.py", SRC / "tracking.py"],
        chair=expand(rules.evaluate.output.chair, k=ROUNDS),
        pope=expand(rules.evaluate.output.pope, k=ROUNDS),
        train=expand(rules.dpo.output.stats, k=ROUNDS[:-1]),
    output:
        summary=str(paths.summary_json(CFG)),
        table=str(EXP / "summary.md"),
        plot=str(paths.rounds_plot(CFG)),
    params:
        config=subtree("experiment_name", "rounds", "tracking"),
    conda:
        CONDA_ENV
    log:
        EXP / "logs" / "summarize.log",
    shell:
        stage("report", "summarize") + " > {log} 2>&1"
