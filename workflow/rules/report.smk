# Rule summarize's stderr goes to its log; the stage's few lines for the user (tracking failed, or nothing was
# logged) go to file descriptor 3 as well, which is Snakemake's stderr (halludpo.report.tell_console).
CONSOLE = "HALLUDPO_CONSOLE_FD=3 "


# Snakemake's HTML report (`snakemake --report results/<experiment>/report.html`, `make report`): the files marked
# report(...) here and in rule evaluate, with the captions of workflow/report/ (reStructuredText; the Snakefile's
# `report:` names the workflow page). The report holds the files of the default target's jobs only, so the plots it
# needs beyond summary.json (training curves) and the resolved config come from rule summarize itself: a rule of
# their own would be another job in every run's plan.
REPORT_CAPTIONS = "../report/"  # relative to this file


def in_report(path, caption, category, subcategory=None):
    return report(str(path), caption=REPORT_CAPTIONS + caption, category=category, subcategory=subcategory)


rule summarize:
    """summary.json (one row per model_k) and the MLflow parent run with a child run per round (found again on a
    rerun, not added). A tracking store that cannot be reached fails it with one line unless tracking.required=false.
    Also the report's training curves (one plot per trained round) and the resolved config."""
    input:
        code=code("report"),
        evaluations=[expand(getattr(rules.evaluate.output, b), k=ROUNDS) for b in BENCHMARKS if b != "mmhal"],
        judged=expand(rules.mmhal_judge.output.mmhal, k=ROUNDS) if "mmhal" in BENCHMARKS else [],
        lmms_eval=expand(rules.evaluate.output.lmms_eval, k=ROUNDS),
        train=expand(rules.dpo.output.stats, k=ROUNDS[:-1]),
        train_log=expand(rules.dpo.output.log, k=ROUNDS[:-1]),
    output:
        summary=in_report(paths.summary_json(CFG), "summary_json.rst", "Summary"),
        table=in_report(EXP / "summary.md", "summary_table.rst", "Summary"),
        plot=in_report(paths.rounds_plot(CFG), "rounds.rst", "Summary"),
        curves=[in_report(EXP / f"round_{k}" / "train" / "training_curves.png", "training_curves.rst", "Training",
                          f"round {k}") for k in ROUNDS[:-1]],
        config=in_report(EXP / "resolved_config.yaml", "resolved_config.rst", "Configuration"),
    params:
        config=subtree("experiment_name", "rounds", "tracking", "eval.benchmarks"),
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
