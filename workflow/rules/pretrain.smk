# model_0. The toy family is pretrained here (rule pretrain_base). Real families (llava, llava_next, qwen2_vl,
# qwen2_5_vl) start from their released weights and have no pretraining rule: model.path is a hub id (rule
# fetch_model downloads it at model.revision into results/models/hub/, on the submitting host, and the stages load
# that folder) or a local folder (used as it is; its config.json is model_0's marker, see
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

elif paths.fetched_from_hub(CFG):

    rule fetch_model:
        """model_0 of a real family named by a hub id: its safetensors, configs and processor files at model.revision
        (snapshot_download, resumable) into results/models/hub/<owner>--<name>@<revision>/, marker fetched.json.
        Runs on the submitting host (localrule), like rule download: compute nodes need no internet. No code input:
        editing halludpo/hub.py must not refetch the model and rerun every round."""
        output:
            marker=str(paths.model_marker(CFG, 0)),
        params:
            config=subtree("model.path", "model.revision"),
        localrule: True
        conda:
            CONDA_ENV
        log:
            RESULTS / "logs" / f"fetch_model_{CFG.model.name}.log",
        shell:
            stage("hub", "fetch_model") + " > {log} 2>&1"
