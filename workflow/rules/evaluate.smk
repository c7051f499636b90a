# eval.benchmarks picks what rule evaluate scores: chair (model_k's descriptions, rule generate), pope (rule
# pope_answers), amber (rule amber_answers), object_halbench (rule object_halbench_answers). It also writes
# eval/lmms_eval/ (lmms-eval's results layout). mmhal (judge-scored) has its own rules: mmhal_answers, mmhal_judge.
BENCHMARKS = list(CFG.eval.benchmarks)
from halludpo import lmms_results

# POPE's question files: sampled from the eval annotations (rule pope_questions, the toy world) or, when the data
# config names released files (data.sources.pope, COCO), converted from them by the data rule (prepare).
POPE_QUESTIONS = [str(paths.pope_questions(CFG, s)) for s in CFG.eval.pope.splits]
RELEASED_POPE = OmegaConf.select(CFG, "data.sources.pope") is not None

if not RELEASED_POPE and "pope" in BENCHMARKS:

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


# AMBER's files: written from the eval split by rule amber_questions (the toy world), or its released files named by
# the data config (data.sources.amber, read as they are; the inputs are their download markers, as for prepare).
RELEASED_AMBER = paths.released_amber(CFG)
AMBER_FILES = [str(f) for f in paths.amber_files(CFG).values()]
AMBER_INPUTS = (download.marker_paths(CFG.download, CFG.data.sources.amber.downloads) if RELEASED_AMBER
                else AMBER_FILES)

if not RELEASED_AMBER and "amber" in BENCHMARKS:

    rule amber_questions:
        """AMBER's files for eval.amber.n_images images of the toy eval split (toyworld.write_amber_split): the
        annotations, the word relations, the query files (questions in eval.amber.wording)."""
        input:
            code=code("evaluate"),
            instances=CFG.data.eval_instances,
            world=str(paths.data_done(CFG)),
        output:
            AMBER_FILES,
            [str(paths.amber_dir(CFG) / f"query_discriminative-{d}.json")
             for d in ("attribute", "existence", "relation")],
        params:
            config=subtree("eval.amber.n_images", "eval.amber.n_hallu", "eval.amber.wording", "eval.seed"),
        conda:
            CONDA_ENV
        log:
            RESULTS / "logs" / f"amber_questions_{CFG.data.name}.log",
        shell:
            stage("evaluate", "amber_questions", step="amber_questions") + " > {log} 2>&1"


AMBER_JSON = str(EXP / "round_{k}" / "eval" / "amber.json")  # its shards: eval/shards/amber_<task>.*


rule amber_answers:
    """AMBER by model_k, shard {i} of {n}: descriptions of AMBER's images (its prompt) and greedy answers to its
    yes/no questions, each list split into whole batches."""
    input:
        code=code("evaluate"),
        amber=AMBER_INPUTS,
        model=model_marker,
    output:
        generative=str(EXP / "round_{k}" / "eval" / "shards" / "amber_generative.{i}-of-{n}.jsonl"),
        discriminative=str(EXP / "round_{k}" / "eval" / "shards" / "amber_discriminative.{i}-of-{n}.jsonl"),
    params:
        config=subtree("eval.amber.generative", "eval.amber.discriminative.max_new_tokens", "eval.generation",
                       "eval.batch_size", "eval.seed"),
    threads: workflow.cores
    conda:
        CONDA_ENV
    log:
        EXP / "logs" / "amber_answers_{i}-of-{n}_r{k}.log",
    benchmark:
        EXP / "benchmarks" / "amber_answers_{i}-of-{n}_r{k}.tsv"
    shell:
        "OMP_NUM_THREADS={threads} "
        + stage("evaluate", "amber_answers", **shard_settings(round="{wildcards.k}", step="amber_answers"))
        + " > {log} 2>&1"

# Object HalBench's questions and the ground truth of their images: RLHF-V's question file with COCO's val2014
# annotations (data.sources.object_halbench, after their downloads), or eval.object_halbench.n_images toy eval images.
RELEASED_OBJECT_HALBENCH = paths.released_object_halbench(CFG)
OBJECT_HALBENCH_FILES = {name: str(f) for name, f in paths.object_halbench_files(CFG).items()}
# its shards: eval/shards/object_halbench_answers.*
OBJECT_HALBENCH_JSON = str(EXP / "round_{k}" / "eval" / "object_halbench.json")

if "object_halbench" in BENCHMARKS:

    rule object_halbench_questions:
        """Object HalBench's questions ({id, image_id, image, query}) and its images' COCO ground truth, cut from
        the annotations."""
        input:
            code=code("evaluate"),
            sources=(download.marker_paths(CFG.download, CFG.data.sources.object_halbench.downloads)
                     if RELEASED_OBJECT_HALBENCH else [CFG.data.eval_instances, str(paths.data_done(CFG))]),
        output:
            **OBJECT_HALBENCH_FILES,
        params:
            config=subtree("eval.object_halbench.n_images", "eval.object_halbench.prompts", "eval.seed",
                           "data.sources.object_halbench", "data.eval_captions"),
        conda:
            CONDA_ENV
        log:
            RESULTS / "logs" / f"object_halbench_questions_{CFG.data.name}.log",
        shell:
            stage("evaluate", "object_halbench_questions", step="object_halbench_questions") + " > {log} 2>&1"

    rule object_halbench_answers:
        """Object HalBench by model_k, shard {i} of {n}: a detailed description per question (its prompt, the
        benchmark's decoding: eval.object_halbench.generation)."""
        input:
            code=code("evaluate"),
            questions=OBJECT_HALBENCH_FILES["questions"],
            model=model_marker,
        output:
            str(EXP / "round_{k}" / "eval" / "shards" / "object_halbench_answers.{i}-of-{n}.jsonl"),
        params:
            config=subtree("eval.object_halbench.generation", "eval.object_halbench.max_new_tokens",
                           "eval.batch_size", "eval.seed"),
        threads: workflow.cores
        conda:
            CONDA_ENV
        log:
            EXP / "logs" / "object_halbench_answers_{i}-of-{n}_r{k}.log",
        benchmark:
            EXP / "benchmarks" / "object_halbench_answers_{i}-of-{n}_r{k}.tsv"
        shell:
            "OMP_NUM_THREADS={threads} "
            + stage("evaluate", "object_halbench_answers",
                    **shard_settings(round="{wildcards.k}", step="object_halbench_answers"))
            + " > {log} 2>&1"


# MMHal-Bench: its questions and images (data.sources.mmhal; after their downloads when it names some), model_k's
# answers (GPU shards), the judge's ratings (rule mmhal_judge: on the submitting host, which can reach the endpoint;
# every call cached under eval.judge.cache_dir, so a rerun sends only what is new).
MMHAL_JSON = str(EXP / "round_{k}" / "eval" / "mmhal.json")  # shards: eval/shards/mmhal_answers.*

if "mmhal" in BENCHMARKS:
    MMHAL = CFG.data.sources.mmhal
    MMHAL_INPUTS = (download.marker_paths(CFG.download, MMHAL.downloads) if MMHAL.get("downloads")
                    else [MMHAL.template])

    rule mmhal_answers:
        """MMHal-Bench by model_k, shard {i} of {n}: greedy answers to its run of whole batches of the questions."""
        input:
            code=code("evaluate"),
            mmhal=MMHAL_INPUTS,
            model=model_marker,
        output:
            str(EXP / "round_{k}" / "eval" / "shards" / "mmhal_answers.{i}-of-{n}.jsonl"),
        params:
            config=subtree("eval.mmhal", "eval.batch_size", "eval.seed", "data.sources.mmhal"),
        threads: workflow.cores
        conda:
            CONDA_ENV
        log:
            EXP / "logs" / "mmhal_answers_{i}-of-{n}_r{k}.log",
        benchmark:
            EXP / "benchmarks" / "mmhal_answers_{i}-of-{n}_r{k}.tsv"
        shell:
            "OMP_NUM_THREADS={threads} "
            + stage("evaluate", "mmhal_answers", **shard_settings(round="{wildcards.k}", step="mmhal_answers"))
            + " > {log} 2>&1"

    localrules: mmhal_judge

    rule mmhal_judge:
        """The judge's ratings of model_k's MMHal-Bench answers (eval.judge): the estimate of calls, tokens and cost
        in the log first, then mmhal.json (average score, hallucination rate, per type, every reply)."""
        input:
            code=code("evaluate"),
            mmhal=MMHAL_INPUTS,
            answers=gathered_shards(MMHAL_JSON, "mmhal", "mmhal_answers"),
        output:
            mmhal=report(MMHAL_JSON, caption="../report/mmhal.rst", category="Evaluation", subcategory="round {k}"),
        params:
            config=subtree("eval.judge.base_url", "eval.judge.model", "eval.judge.parameters", "data.sources.mmhal"),
            shards=lambda w, input: len(input.answers),
        conda:
            CONDA_ENV
        log:
            EXP / "logs" / "mmhal_judge_r{k}.log",
        shell:
            stage("evaluate", "mmhal_judge", round="{wildcards.k}", step="mmhal_judge", mmhal_shards="{params.shards}")
            + " > {log} 2>&1"


def evaluate_inputs():
    """Rule evaluate's inputs, by eval.benchmarks."""
    inputs = {"code": code("evaluate")}
    if "chair" in BENCHMARKS:
        inputs["generations"] = str(EXP / "round_{k}" / "generate" / "eval.jsonl")
    if "pope" in BENCHMARKS:
        inputs["questions"] = POPE_QUESTIONS
        inputs["answers"] = gathered_shards(POPE_JSON, "evaluate", "pope_answers")
    if "amber" in BENCHMARKS:
        inputs["amber"] = AMBER_INPUTS
        inputs["amber_generative"] = gathered_shards(AMBER_JSON, "amber", "amber_generative")
        inputs["amber_discriminative"] = gathered_shards(AMBER_JSON, "amber", "amber_discriminative")
    if "object_halbench" in BENCHMARKS:
        inputs["object_halbench"] = [OBJECT_HALBENCH_FILES["questions"], OBJECT_HALBENCH_FILES["instances"],
                                     OBJECT_HALBENCH_FILES["captions"]]
        inputs["object_halbench_answers"] = gathered_shards(OBJECT_HALBENCH_JSON, "object_halbench",
                                                            "object_halbench_answers")
    return inputs


# lmms-eval's tasks of the chosen benchmarks (halludpo.lmms_results): one samples_<task>.jsonl each
LMMS_EVAL_TASKS = ([lmms_results.POPE_TASKS[s] for s in CFG.eval.pope.splits] if "pope" in BENCHMARKS else []) + (
    ["amber_g", "amber_d"] if "amber" in BENCHMARKS else [])


def evaluate_outputs():
    """Rule evaluate's outputs, by eval.benchmarks: the metric files (in the HTML report) and lmms-eval's layout."""
    def shown(name, caption):
        return report(str(EXP / "round_{k}" / "eval" / name), caption=f"../report/{caption}", category="Evaluation",
                      subcategory="round {k}")

    outputs = {}
    if "chair" in BENCHMARKS:
        outputs["chair"] = shown("chair.json", "chair.rst")
    if "pope" in BENCHMARKS:
        outputs["pope"] = shown("pope.json", "pope.rst")
        outputs["samples"] = shown("pope_samples.jsonl", "pope_samples.rst")
    if "amber" in BENCHMARKS:
        outputs["amber"] = shown("amber.json", "amber.rst")
    if "object_halbench" in BENCHMARKS:
        outputs["object_halbench"] = shown("object_halbench.json", "object_halbench.rst")
    outputs["lmms_eval"] = shown("lmms_eval/results.json", "lmms_eval.rst")
    outputs["lmms_eval_samples"] = [str(EXP / "round_{k}" / "eval" / "lmms_eval" / f"samples_{task}.jsonl")
                                    for task in LMMS_EVAL_TASKS]
    return outputs


rule evaluate:
    """The metrics of eval.benchmarks: CHAIR on model_k's descriptions, POPE's on the pope_answers shards' answers,
    AMBER's on the amber_answers shards', Object HalBench's on the object_halbench_answers shards'; lmms-eval's
    results layout of them."""
    input:
        **evaluate_inputs(),
    output:
        **evaluate_outputs(),
    params:
        config=subtree("eval.benchmarks", "data.vocabulary", "data.compounds", "data.eval_captions",
                       "eval.chair.text_pipeline", "eval.pope", "eval.batch_size", "eval.amber", "eval.generation",
                       "eval.object_halbench"),
        shards=lambda w, input: len(input.get("answers", [])) or 1,
        amber_shards=lambda w, input: len(input.get("amber_generative", [])) or 1,
        object_halbench_shards=lambda w, input: len(input.get("object_halbench_answers", [])) or 1,
    conda:
        CONDA_ENV
    log:
        EXP / "logs" / "evaluate_r{k}.log",
    benchmark:
        EXP / "benchmarks" / "evaluate_r{k}.tsv"
    shell:
        stage("evaluate", "evaluate", round="{wildcards.k}", shards="{params.shards}",
              amber_shards="{params.amber_shards}", object_halbench_shards="{params.object_halbench_shards}")
        + " > {log} 2>&1"
