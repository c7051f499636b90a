rule generate:
    """model_k describes the evaluation images (CHAIR prompt and decoding from eval/)."""
    input:
        code=SRC / "generate.py",
        model=model_marker,
        instances=CFG.data.eval_instances,
    output:
        str(EXP / "round_{k}" / "eval" / "generations.jsonl"),
    params:
        config=subtree("model", "eval.chair", "eval.generation", "eval.batch_size", "eval.seed"),
        cmd=lambda w: stage("generate", "generate", round=w.k, split="eval"),
    threads: workflow.cores
    conda:
        CONDA_ENV
    log:
        EXP / "logs" / "generate_eval_r{k}.log",
    benchmark:
        EXP / "benchmarks" / "generate_eval_r{k}.tsv"
    shell:
        "OMP_NUM_THREADS={threads} {params.cmd} > {log} 2>&1"
