rule reference_logps:
    """Summed log-probs of chosen and rejected under model_k, with the image: computed once per round."""
    input:
        code=[SRC / "train.py", SRC / "scoring.py"],
        pairs=rules.inject.output[0],
        model=model_marker,
    output:
        str(EXP / "round_{k}" / "pairs" / "ref_logps.jsonl"),
    params:
        config=subtree("train.max_length", "train.ref_batch_size"),
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
