# model_0. The toy family is pretrained here (rule pretrain_base). Real families (llava, llava_next, qwen2_vl,
# qwen2_5_vl) start from their released weights and have no pretraining rule: model.path is a hub id (nothing for
# Snakemake to track; the stages load it through the Hugging Face cache, so fetch it once on a host with internet
# or set HF_HUB_OFFLINE=1 with a filled cache) or a local folder (its config.json is model_0's marker, see
# halludpo.paths.model_marker).
if CFG.model.family == "toy":

    rule pretrain_base:
        """model_0 for the toy family: a tiny LLaVA trained from scratch on the toy world's training split."""
        input:
            code=code("pretrain"),
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
