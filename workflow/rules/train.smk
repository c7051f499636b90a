# The pairs the reference and the trainer score: with a contrast kind (mDPO, SymMPO) the contrast stage's output,
# else pairs.jsonl, referenced by path (inject and SENTINEL's pairs rule both produce it).
SCORED_PAIRS = str(EXP / "round_{k}" / "pairs" / ("pairs.jsonl" if CFG.contrast.kind == "none" else "contrast.jsonl"))


rule reference_logps:
    """Summed log-probs of every scored segment of train.loss under model_k (chosen and rejected with the image,
    plus the contrast segments of mDPO / SymMPO), shard {i} of {n} of the pairs: computed once per round."""
    input:
        code=code("train"),
        pairs=SCORED_PAIRS,
        model=model_marker,
    output:
        str(EXP / "round_{k}" / "pairs" / "shards" / "ref_logps.{i}-of-{n}.jsonl"),
    params:
        config=subtree("train.max_length", "train.ref_batch_size", "train.loss"),
    threads: workflow.cores
    conda:
        CONDA_ENV
    log:
        EXP / "logs" / "reference_logps_{i}-of-{n}_r{k}.log",
    benchmark:
        EXP / "benchmarks" / "reference_logps_{i}-of-{n}_r{k}.tsv"
    shell:
        "OMP_NUM_THREADS={threads} "
        + stage("train", "reference_logps", **shard_settings(round="{wildcards.k}", step="reference"))
        + " > {log} 2>&1"


REF_LOGPS = str(EXP / "round_{k}" / "pairs" / "ref_logps.jsonl")

localrules:
    gather_reference_logps,


rule gather_reference_logps:
    """reference_logps's shard files, concatenated in order: every scored pair with its reference log-probs."""
    input:
        code=code("train"),
        shards=gathered_shards(REF_LOGPS, "reference_logps"),
    output:
        REF_LOGPS,
    params:
        shards=lambda w, input: len(input.shards),
    conda:
        CONDA_ENV
    log:
        EXP / "logs" / "gather_reference_logps_r{k}.log",
    shell:
        stage("train", "gather_reference_logps", round="{wildcards.k}", step="reference", gather="true",
              shards="{params.shards}") + " > {log} 2>&1"


def dpo_gpus():
    """GPUs of rule dpo as the profile or --set-resources give them (dpo:gpu=N); 1 when not set.

    Read at parse time, here and in every SLURM job (snakemake passes --set-resources on to the job), so the
    command and the GPUs SLURM allocates agree."""
    gpu = (workflow.resource_settings.overwrite_resources.get("dpo") or {}).get("gpu")
    gpu = getattr(gpu, "value", gpu)  # a snakemake Resource, or a plain value
    try:
        return max(1, int(gpu or 1))
    except (TypeError, ValueError):
        raise WorkflowError(f"rule dpo: resource gpu={gpu!r} must be a whole number of GPUs") from None


ACCELERATE_CONFIG = shlex.quote(str(Path(workflow.basedir) / "configs" / "accelerate" / "multi_gpu.yaml"))


def dpo_command():
    """One process (`{PYTHON} -m halludpo.train`) for CPU or one GPU -- the command text of every other stage --
    and accelerate's launcher (`accelerate launch`, run by the same interpreter) with one process per GPU when the
    rule has more (data parallel; train.deepspeed=configs/deepspeed/zero2.json or zero3.json shards it with
    DeepSpeed ZeRO). The port comes from the SLURM job id, so two multi-GPU jobs on one node do not collide.
    `exec`: the stage replaces the job's shell, so SLURM's SIGTERM before a time limit reaches the training (which
    saves a checkpoint and exits 143) instead of killing the shell and, with it, the job."""
    command = "OMP_NUM_THREADS={threads} " + stage("train", "dpo", round="{wildcards.k}", step="dpo") + " > {log} 2>&1"
    command = command.replace("{PYTHON} -m halludpo.train", "exec {PYTHON} -m halludpo.train")
    if dpo_gpus() == 1:
        return command
    launch = ("{PYTHON} -m accelerate.commands.launch --config_file {ACCELERATE_CONFIG} "
              "--num_processes {resources.gpu} --main_process_port $((29500 + ${{SLURM_JOB_ID:-0}} % 20000)) "
              "-m halludpo.train")
    threads = "OMP_NUM_THREADS=$(( ({threads} + {resources.gpu} - 1) / {resources.gpu} )) "  # per process
    assert command.count("{PYTHON} -m halludpo.train") == 1
    return threads + command.removeprefix("OMP_NUM_THREADS={threads} ").replace("{PYTHON} -m halludpo.train", launch)


# What rule dpo reads: the scored pairs with model_k's stored log-probs (train.reference=stored), or the scored pairs
# themselves (online: the trainer scores the reference with the adapter disabled; rule reference_logps never runs).
DPO_PAIRS = SCORED_PAIRS if CFG.train.reference == "online" else REF_LOGPS


rule dpo:
    """LoRA preference optimisation of model_k on round k's pairs (transformers.Trainer + halludpo.losses)."""
    input:
        code=code("train"),
        pairs=DPO_PAIRS,
        model=model_marker,
    output:
        adapter=str(EXP / "round_{k}" / "train" / "adapter" / "adapter_config.json"),
        log=str(EXP / "round_{k}" / "train" / "train_log.jsonl"),
        stats=str(EXP / "round_{k}" / "train" / "train_stats.json"),
    params:
        config=subtree("train"),
    threads: workflow.cores
    conda:
        GPU_ENV if CFG.train.deepspeed else CONDA_ENV
    log:
        EXP / "logs" / "dpo_r{k}.log",
    benchmark:
        EXP / "benchmarks" / "dpo_r{k}.tsv"
    shell:
        dpo_command()


rule merge:
    """model_{k+1} = model_k + round k's LoRA, merged and saved in full (safetensors)."""
    input:
        code=code("train"),
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
