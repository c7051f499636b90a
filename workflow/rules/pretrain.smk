rule pretrain_base:
    """model_0 for the toy family: a tiny LLaVA trained from scratch on the toy world's training split."""
    input:
        code=SRC / "pretrain.py",
        data=str(paths.data_done(CFG)),
    output:
        config=str(paths.model_marker(CFG, 0)),
    params:
        config=subtree("data", "model"),
    threads: workflow.cores
    conda:
        CONDA_ENV
    log:
        RESULTS / "logs" / f"pretrain_base_{CFG.model.name}_{CFG.data.name}.log",
    benchmark:
        RESULTS / "benchmarks" / f"pretrain_base_{CFG.model.name}_{CFG.data.name}.tsv"
    shell:
        "OMP_NUM_THREADS={threads} " + stage("pretrain", "pretrain_base") + " > {log} 2>&1"
