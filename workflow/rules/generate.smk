GENERATE_CONFIG = {
    "eval": ("model", "eval.chair", "eval.generation", "eval.batch_size", "eval.seed"),
    "gen": ("model", "method.generation", "seed"),
}


rule generate:
    """model_k describes images: split eval (CHAIR prompt and decoding) or gen (unlabelled images, for pairs)."""
    input:
        code=code("generate"),
        model=model_marker,
        instances=lambda w: CFG.data.eval_instances if w.split == "eval" else CFG.data.gen_instances,
    output:
        str(EXP / "round_{k}" / "generate" / "{split}.jsonl"),
    wildcard_constraints:
        split="eval|gen",
    params:
        config=lambda w: subtree(*GENERATE_CONFIG[w.split]),
    threads: workflow.cores
    conda:
        CONDA_ENV
    log:
        EXP / "logs" / "generate_{split}_r{k}.log",
    benchmark:
        EXP / "benchmarks" / "generate_{split}_r{k}.tsv"
    shell:
        "OMP_NUM_THREADS={threads} "
        + stage("generate", "generate", round="{wildcards.k}", split="{wildcards.split}")
        + " > {log} 2>&1"
