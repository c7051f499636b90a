# Rule summarize's stderr goes to its log; the stage's few lines for the user (tracking failed, or nothing was
# logged) go to file descriptor 3 as well, which is Snakemake's stderr (halludpo.report.tell_console).
CONSOLE = "HALLUDPO_CONSOLE_FD=3 "


rule summarize:
    """summary.json (one row per model_k) and the MLflow parent run with a child run per round (found again on a
    rerun, not added). A tracking store that cannot be reached fails it with one line unless tracking.required=false."""
    input:
        code=code("report"),
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
        CONSOLE + stage("report", "summarize") + " 3>&2 > {log} 2>&1"


# Comparison across experiments: `snakemake --cores 1 compare [--config compare="[toy_apasi,toy_mdpo]"]` after each
# experiment has run (`--config experiment=<name>`); their summary.json files are inputs, not built here.
COMPARE = normalize_overrides(config.get("compare")) or ["toy_apasi", "toy_mdpo", "toy_symmpo"]


rule compare:
    """One table across experiments (markdown + CSV): CHAIR_s, CHAIR_i, recall, POPE F1 per split, wall s/round."""
    input:
        code=code("compare"),
        summaries=[str(RESULTS / e / "summary.json") for e in COMPARE],
    output:
        md=str(RESULTS / "comparison.md"),
        csv=str(RESULTS / "comparison.csv"),
    conda:
        CONDA_ENV
    log:
        RESULTS / "logs" / "compare.log",
    shell:
        STAGE_ENV + " python -m halludpo.compare {input.summaries:q} "
        "--md {output.md:q} --csv {output.csv:q} > {log} 2>&1"
