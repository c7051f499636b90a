rule inject:
    """APASI: hallucinations injected into model_k's own descriptions, completed by model_k without the image."""
    input:
        code=[SRC / "pairs.py", SRC / "injection.py"],
        generations=str(EXP / "round_{k}" / "generate" / "gen.jsonl"),
        model=model_marker,
        vocabulary=CFG.data.vocabulary,
    output:
        str(EXP / "round_{k}" / "pairs" / "pairs.jsonl"),
    params:
        config=subtree("method", "data.vocabulary", "data.compounds", "eval.chair.text_pipeline", "seed"),
    threads: workflow.cores
    conda:
        CONDA_ENV
    log:
        EXP / "logs" / "inject_r{k}.log",
    benchmark:
        EXP / "benchmarks" / "inject_r{k}.tsv"
    shell:
        "OMP_NUM_THREADS={threads} " + stage("pairs", "inject", round="{wildcards.k}") + " > {log} 2>&1"
