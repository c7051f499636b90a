GENERATE_CONFIG = {
    "eval": ("model", "eval.chair", "eval.generation", "eval.batch_size", "eval.seed"),
    "gen": ("model", "method.generation", "seed"),
}
GENERATIONS = str(EXP / "round_{k}" / "generate" / "{split}.jsonl")


rule generate:
    """model_k describes images, shard {i} of {n}: split eval (CHAIR prompt and decoding) or gen (unlabelled
    images, for pairs)."""
    input:
        code=code("generate"),
        model=model_marker,
        instances=lambda w: CFG.data.eval_instances if w.split == "eval" else CFG.data.gen_instances,
    output:
        str(EXP / "round_{k}" / "generate" / "shards" / "{split}.{i}-of-{n}.jsonl"),
    wildcard_constraints:
        split="eval|gen",
    params:
        config=lambda w: subtree(*GENERATE_CONFIG[w.split]),
    threads: workflow.cores
    conda:
        CONDA_ENV
    log:
        EXP / "logs" / "generate_{split}_{i}-of-{n}_r{k}.log",
    benchmark:
        EXP / "benchmarks" / "generate_{split}_{i}-of-{n}_r{k}.tsv"
    shell:
        "OMP_NUM_THREADS={threads} "
        + stage("generate", "generate", **shard_settings(round="{wildcards.k}", split="{wildcards.split}"))
        + " > {log} 2>&1"


localrules:
    gather_generate,


rule gather_generate:
    """generate's shard files, concatenated in order: the descriptions of split eval or gen."""
    input:
        code=code("generate"),
        shards=gathered_shards(GENERATIONS, "generate"),
    output:
        GENERATIONS,
    wildcard_constraints:
        split="eval|gen",
    params:
        shards=lambda w, input: len(input.shards),
    conda:
        CONDA_ENV
    log:
        EXP / "logs" / "gather_generate_{split}_r{k}.log",
    shell:
        stage("generate", "gather_generate", round="{wildcards.k}", split="{wildcards.split}", gather="true",
              shards="{params.shards}") + " > {log} 2>&1"
