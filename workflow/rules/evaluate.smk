# POPE's question files: sampled from the eval annotations (rule pope_questions, the toy world) or, when the data
# config names released files (data.sources.pope, COCO), converted from them by the data rule (prepare).
POPE_QUESTIONS = [str(paths.pope_questions(CFG, s)) for s in CFG.eval.pope.splits]
RELEASED_POPE = OmegaConf.select(CFG, "data.sources.pope") is not None

if not RELEASED_POPE:

    rule pope_questions:
        """POPE question files (random / popular / adversarial) from the evaluation annotations."""
        input:
            code=code("evaluate"),
            instances=CFG.data.eval_instances,
        output:
            [str(paths.pope_questions(CFG, s)) for s in CFG.eval.pope.splits],
        params:
            config=subtree("eval.pope", "eval.seed"),
        conda:
            CONDA_ENV
        log:
            RESULTS / "logs" / f"pope_questions_{CFG.data.name}.log",
        shell:
            stage("evaluate", "pope_questions", step="questions") + " > {log} 2>&1"


POPE_JSON = str(EXP / "round_{k}" / "eval" / "pope.json")  # its shards: eval/shards/pope_answers.*


rule pope_answers:
    """POPE by asking model_k, shard {i} of {n} of the distinct questions (greedy answers)."""
    input:
        code=code("evaluate"),
        questions=POPE_QUESTIONS,
        model=model_marker,
    output:
        str(EXP / "round_{k}" / "eval" / "shards" / "pope_answers.{i}-of-{n}.jsonl"),
    params:
        config=subtree("eval.pope.max_new_tokens", "eval.batch_size"),
    threads: workflow.cores
    conda:
        CONDA_ENV
    log:
        EXP / "logs" / "pope_answers_{i}-of-{n}_r{k}.log",
    benchmark:
        EXP / "benchmarks" / "pope_answers_{i}-of-{n}_r{k}.tsv"
    shell:
        "OMP_NUM_THREADS={threads} "
        + stage("evaluate", "pope_answers", **shard_settings(round="{wildcards.k}", step="answers"))
        + " > {log} 2>&1"


rule evaluate:
    """CHAIR on model_k's descriptions, POPE's metrics on the pope_answers shards' answers."""
    input:
        code=code("evaluate"),
        generations=str(EXP / "round_{k}" / "generate" / "eval.jsonl"),
        questions=POPE_QUESTIONS,
        answers=gathered_shards(POPE_JSON, "evaluate", "pope_answers"),
    output:
        chair=report(str(EXP / "round_{k}" / "eval" / "chair.json"), caption="../report/chair.rst",
                     category="Evaluation", subcategory="round {k}"),
        pope=report(str(EXP / "round_{k}" / "eval" / "pope.json"), caption="../report/pope.rst",
                    category="Evaluation", subcategory="round {k}"),
        samples=report(str(EXP / "round_{k}" / "eval" / "pope_samples.jsonl"), caption="../report/pope_samples.rst",
                       category="Evaluation", subcategory="round {k}"),
    params:
        config=subtree("data.vocabulary", "data.compounds", "data.eval_captions", "eval.chair.text_pipeline",
                       "eval.pope", "eval.batch_size"),
        shards=lambda w, input: len(input.answers),
    conda:
        CONDA_ENV
    log:
        EXP / "logs" / "evaluate_r{k}.log",
    benchmark:
        EXP / "benchmarks" / "evaluate_r{k}.tsv"
    shell:
        stage("evaluate", "evaluate", round="{wildcards.k}", shards="{params.shards}") + " > {log} 2>&1"
