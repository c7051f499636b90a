# The pairs the reference and the trainer score: with a contrast kind (mDPO, SymMPO) the contrast stage's output,
# else pairs.jsonl, referenced by path (inject and SENTINEL's pairs rule both produce it).
SCORED_PAIRS = str(EXP / "round_{k}" / "pairs" / ("pairs.jsonl" if CFG.contrast.kind == "none" else "contrast.jsonl"))


rule reference_logps:
    """Summed log-probs of every scored segment of train.loss under model_k (chosen and rejected with the image,
    plus the contrast segments of mDPO / SymMPO): computed once per round."""
    input:
        code=[SRC / "train.py", SRC / "scoring.py"],
        pairs=SCORED_PAIRS,
        model=model_marker,
    output:
        str(EXP / "round_{k}" / "pairs" / "ref_logps.jsonl"),
    params:
        config=subtree("train.max_length", "train.ref_batch_size", "train.loss"),
    threads: workflow.cores
    conda:
        CONDA_ENV
    log:
        EXP / "logs" / "reference_logps_r{k}.log",
    benchmark:
        EXP / "benchmarks" / "reference_logps_r{k}.tsv"
    shell:
        "OMP_NUM_THREADS={threads} "
        + stage("train", "reference_logps", round="{wildcards.k}", step="reference")
        + " > {log} 2>&1"


rule dpo:
    """LoRA preference optimisation of model_k on round k's pairs (transformers.Trainer + halludpo.losses)."""
    input:
        code=[SRC / "train.py", SRC / "losses.py", SRC / "scoring.py"],
        pairs=rules.reference_logps.output[0],
        model=model_marker,
    output:
        adapter=str(EXP / "round_{k}" / "train" / "adapter" / "adapter_config.json"),
        log=str(EXP / "round_{k}" / "train" / "train_log.jsonl"),
        stats=str(EXP / "round_{k}" / "train" / "train_stats.json"),
    params:
        config=subtree("train"),
    threads: workflow.cores
    conda:
        CONDA_ENV
    log:
        EXP / "logs" / "dpo_r{k}.log",
    benchmark:
        EXP / "benchmarks" / "dpo_r{k}.tsv"
    shell:
        "OMP_NUM_THREADS={threads} " + stage("train", "dpo", round="{wildcards.k}", step="dpo") + " > {log} 2>&1"


rule merge:
    """model_{k+1} = model_k + round k's LoRA, merged and saved in full (safetensors)."""
    input:
        code=SRC / "train.py",
        adapter=rules.dpo.output.adapter,
        model=model_marker,
    output:
        str(EXP / "round_{k}" / "merged" / "config.json"),
    conda:
        CONDA_ENV
    log:
        EXP / "logs" / "merge_r{k}.log",
    shell:
        stage("train", "merge", round="{wildcards.k}", step="merge") + " > {log} 2>&1"
