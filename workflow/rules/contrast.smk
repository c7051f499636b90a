# Image-contrast data for mDPO / SymMPO (config group contrast/; kind none = plain pairs, these rules never run).
# round_k/pairs/pairs.jsonl is referenced by path: more than one rule (inject, SENTINEL's) may produce it.
PAIRS_JSONL = str(EXP / "round_{k}" / "pairs" / "pairs.jsonl")
CONTRAST_JSONL = str(EXP / "round_{k}" / "pairs" / "contrast.jsonl")


rule contrast_embeddings:
    """SymMPO (kind=neighbour): model_k's pooled image features of the round's pair images, once per round."""
    input:
        code=code("contrast"),
        pairs=PAIRS_JSONL,
        model=model_marker,
    output:
        str(EXP / "round_{k}" / "pairs" / "embeddings.safetensors"),
    params:
        config=subtree("contrast.batch_size"),
    threads: workflow.cores
    conda:
        CONDA_ENV
    log:
        EXP / "logs" / "contrast_embeddings_r{k}.log",
    benchmark:
        EXP / "benchmarks" / "contrast_embeddings_r{k}.tsv"
    shell:
        "OMP_NUM_THREADS={threads} "
        + stage("contrast", "contrast_embeddings", round="{wildcards.k}", step="embeddings")
        + " > {log} 2>&1"


rule contrast:
    """contrast.jsonl = the pairs + contrast_image_path (+ chosen_contrast for SymMPO); transformed images are
    stored once per example under contrast_images/, so reference and policy score the same image."""
    input:
        code=code("contrast"),
        pairs=PAIRS_JSONL,
        embeddings=rules.contrast_embeddings.output if CFG.contrast.kind == "neighbour" else [],
    output:
        CONTRAST_JSONL,
    params:
        config=subtree("contrast", "seed"),
    conda:
        CONDA_ENV
    log:
        EXP / "logs" / "contrast_r{k}.log",
    benchmark:
        EXP / "benchmarks" / "contrast_r{k}.tsv"
    shell:
        stage("contrast", "contrast", round="{wildcards.k}") + " > {log} 2>&1"
