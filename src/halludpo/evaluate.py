"""Stage `evaluate`: CHAIR on model_k's descriptions, POPE by asking model_k yes/no questions, AMBER (its
descriptions and yes/no questions) and Object HalBench (detailed descriptions); eval.benchmarks picks which.

    python -m halludpo.evaluate step=questions      # rule pope_questions: POPE files from the eval annotations
    python -m halludpo.evaluate step=amber_questions   # rule amber_questions (toy world): AMBER's files
    python -m halludpo.evaluate round=0 step=answers shard=0 shards=4   # rule pope_answers: model_k answers
    python -m halludpo.evaluate round=0 step=amber_answers shard=0 shards=4   # rule amber_answers
    python -m halludpo.evaluate step=object_halbench_questions   # rule object_halbench_questions
    python -m halludpo.evaluate round=0 step=object_halbench_answers shard=0 shards=2   # rule object_halbench_answers
    python -m halludpo.evaluate round=0 shards=4 amber_shards=4 object_halbench_shards=2   # rule evaluate:
                                                    # chair.json, pope.json, amber.json, object_halbench.json
    python -m halludpo.evaluate round=0 step=mmhal_answers shard=0 shards=1   # rule mmhal_answers
    python -m halludpo.evaluate round=0 step=mmhal_estimate   # the judge's calls, tokens and cost; nothing sent
    python -m halludpo.evaluate round=0 step=mmhal_judge      # rule mmhal_judge: mmhal.json (the judge's ratings)
                                                    # (+ per-sample JSONL) and lmms_eval/ (lmms-eval's layout)

Every result file carries its full protocol (prompt, decoding, max_new_tokens, image ids and their hash, question
file hashes, text pipeline, package versions): numbers that cannot be reproduced are the field's common complaint.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

from omegaconf import DictConfig

from halludpo import paths
from halludpo.config import stage_main, to_plain
from halludpo.inference import decoding_kwargs, generate_texts
from halludpo.io import (
    InputError,
    package_versions,
    read_json,
    read_jsonl,
    sha256_file,
    sha256_json,
    write_json,
    write_jsonl,
)
from halludpo.lmms_results import amber_tasks, pope_tasks, write_lmms_eval
from halludpo.metrics.amber import amber_headline, load_amber, load_queries, score_amber
from halludpo.judge import Judge, JudgeError
from halludpo.metrics import mmhal, object_halbench
from halludpo.metrics.chair import COCO_COMPOUNDS, ChairScorer, ground_truth_from_coco, load_synonyms
from halludpo.metrics.pope import PARSE_DESCRIPTIONS, build_questions, parse_answer, pope_metrics
from halludpo.metrics.text import get_text_pipeline
from halludpo.models import load_model_and_processor
from halludpo.shards import (
    batch_seed,
    input_fingerprint,
    read_shards,
    run_batches,
    shard_file,
    shard_files,
    shard_range,
)

log = logging.getLogger(__name__)

GENERATION_FIELDS = ("image_id", "image_path", "prompt", "response", "model", "round", "sampling")
QUESTION_FIELDS = ("question_id", "image_id", "file_name", "object", "label", "text")
BENCHMARKS = ("chair", "pope", "amber", "object_halbench", "mmhal")  # eval.benchmarks
AMBER_TASKS = ("generative", "discriminative")
ANSWER_ROW_FIELDS = ("id", "image", "query", "response")  # a row of answer_queries (AMBER, Object HalBench, MMHal)
OBJECT_HALBENCH_QUESTION_FIELDS = ("id", "image_id", "image", "query")


# ---------------------------------------------------------------------------------------------------------------
# CHAIR


def chair_scorer(vocabulary: str | Path, compounds: str, text_pipeline: str) -> ChairScorer:
    """compounds: 'coco' = CHAIR's fixed list (COCO data), 'vocabulary' = every multi-word synonym (toy, LVIS)."""
    synonyms = load_synonyms(vocabulary)
    pipeline = get_text_pipeline(text_pipeline)
    if compounds == "coco":
        return ChairScorer(synonyms, pipeline, COCO_COMPOUNDS)
    if compounds == "vocabulary":
        return ChairScorer.for_vocabulary(synonyms, pipeline)
    raise ValueError(f"data.compounds={compounds!r}; valid: coco, vocabulary")


def object_scorer(cfg: DictConfig) -> ChairScorer:
    """The one object finder of the metric and the pairs: chair_scorer of the config's data.vocabulary,
    data.compounds and eval.chair.text_pipeline. CHAIR, APASI and SENTINEL all use it, so they count the same
    objects in a text."""
    return chair_scorer(cfg.data.vocabulary, cfg.data.compounds, cfg.eval.chair.text_pipeline)


def evaluate_chair(generations_path: str | Path, instances_path: str | Path, captions_path: str | Path | None,
                   scorer: ChairScorer) -> dict:
    """CHAIR_s, CHAIR_i, recall, len of a generations file, with per-item records and the protocol."""
    rows = read_jsonl(generations_path, required=GENERATION_FIELDS)
    if not rows:
        raise InputError(f"{generations_path}: no generations")
    gt = ground_truth_from_coco(instances_path, captions_path, scorer)
    records = [{"image_id": r["image_id"], "response": r["response"]} for r in rows]
    result = scorer.score(records, gt)
    items = result.pop("items")
    result["by_sentence"] = scorer.by_sentence(records, gt)
    image_ids = [r["image_id"] for r in rows]
    truncated = sum(not r["response"].rstrip().endswith((".", "!", "?")) for r in rows)
    protocol = {
        "prompt": sorted({r["prompt"] for r in rows}),
        "decoding": rows[0]["sampling"],
        "max_new_tokens": rows[0]["sampling"].get("max_new_tokens"),
        "n_images": len(image_ids),
        "image_ids": image_ids,
        "image_ids_sha256": sha256_json(image_ids),
        "generations_sha256": sha256_file(generations_path),
        "ground_truth": "instances" + (" + captions" if captions_path else ""),
        "instances_sha256": sha256_file(instances_path),
        "text_pipeline": scorer.pipeline.name,
        "responses_without_final_punctuation": truncated,  # a truncated last sentence shows up here
        "model": rows[0]["model"],
        "versions": package_versions(),
    }
    for item, row in zip(items, rows):
        item["response"] = row["response"]
    return {"benchmark": "chair", "metrics": result, "protocol": protocol, "items": items}


# ---------------------------------------------------------------------------------------------------------------
# POPE


def write_pope_questions(instances_path: str | Path, out_paths: dict[str, Path], n_images: int, min_objects: int,
                         per_image: int, seed: int) -> dict[str, int]:
    counts = {}
    for split, out in out_paths.items():
        questions = build_questions(instances_path, split, n_images=n_images, min_objects=min_objects,
                                    n_per_image=per_image, seed=seed)
        counts[split] = write_jsonl(out, questions)
    return counts


def unique_questions(questions: list[dict]) -> list[tuple[int, str, str]]:
    """(image_id, file_name, text) of every distinct question, sorted: the yes-questions repeat across splits and
    are asked once. This list, in this order, is what the pope_answers shards split."""
    return sorted({(q["image_id"], q["file_name"], q["text"]) for q in questions})


def answer_questions(model, processor, questions: list[dict], images_dir: str | Path, max_new_tokens: int,
                     batch_size: int, positions: range | None = None, resume: tuple[Path, str] | None = None
                     ) -> list[dict]:
    """Greedy answers {image_id, text, answer} to the distinct questions at `positions` (default: all), in
    batches; with resume=(shard file, fingerprint) resumable and written to the shard file (halludpo.shards)."""
    unique = unique_questions(questions)
    positions = range(len(unique)) if positions is None else positions

    def work(start: int, stop: int) -> list[dict]:
        chunk = unique[start:stop]
        answers = generate_texts(model, processor, [str(Path(images_dir) / f) for _, f, _ in chunk],
                                 [t for _, _, t in chunk], decoding_kwargs({}, max_new_tokens), batch_size,
                                 progress=False)
        return [{"image_id": i, "text": t, "answer": a} for (i, _, t), a in zip(chunk, answers)]

    if resume is not None:
        return run_batches(resume[0], positions, batch_size, work, resume[1], desc="pope")
    return [row for start in range(positions.start, positions.stop, batch_size)
            for row in work(start, min(start + batch_size, positions.stop))]


def read_questions(question_files: dict[str, Path]) -> dict[str, list[dict]]:
    return {s: read_jsonl(p, required=QUESTION_FIELDS) for s, p in question_files.items()}


def evaluate_pope(answer_rows: list[dict], question_files: dict[str, Path], max_new_tokens: int,
                  parse: str = "pope") -> tuple[dict, list[dict]]:
    """POPE's metrics from the answers of rule pope_answers ({image_id, text, answer} rows of every distinct
    question). parse: the answer parsing rule (eval.pope.parse; halludpo.metrics.pope.PARSE_RULES)."""
    if parse not in PARSE_DESCRIPTIONS:
        raise ValueError(f"eval.pope.parse={parse!r}; valid: {', '.join(PARSE_DESCRIPTIONS)}")
    per_split = read_questions(question_files)
    answers = {(row["image_id"], row["text"]): row["answer"] for row in answer_rows}
    wanted = unique_questions([q for qs in per_split.values() for q in qs])
    missing = [(i, t) for i, _, t in wanted if (i, t) not in answers]
    if missing or len(answers) != len(wanted):
        raise InputError(f"the POPE answers hold {len(answers)} questions, the question files {len(wanted)} "
                         f"(first missing: {missing[:1]}): rerun rule pope_answers")
    metrics, samples = {}, []
    for split, qs in per_split.items():
        raw = [answers[(q["image_id"], q["text"])] for q in qs]
        preds = [parse_answer(a, parse) for a in raw]
        metrics[split] = pope_metrics([q["label"] for q in qs], preds)
        samples += [q | {"split": split, "answer": a, "prediction": p} for q, a, p in zip(qs, raw, preds)]
    protocol = {
        "question_files": {s: str(p) for s, p in question_files.items()},
        "question_files_sha256": {s: sha256_file(p) for s, p in question_files.items()},
        "n_questions": {s: len(qs) for s, qs in per_split.items()},
        "image_ids": sorted({q["image_id"] for qs in per_split.values() for q in qs}),
        "decoding": decoding_kwargs({}, max_new_tokens),
        "max_new_tokens": max_new_tokens,
        "answer_parsing": PARSE_DESCRIPTIONS[parse],
        "answer_parsing_rule": parse,
        "positive_class": "yes",
        "versions": package_versions(),
    }
    protocol["image_ids_sha256"] = sha256_json(protocol["image_ids"])
    return {"benchmark": "pope", "metrics": metrics, "protocol": protocol}, samples


# ---------------------------------------------------------------------------------------------------------------
# AMBER


def write_amber_questions(cfg: DictConfig) -> dict:
    """Rule amber_questions (toy world): AMBER's files (toyworld.write_amber_split) for eval.amber.n_images images
    of the eval split, drawn with eval.seed, in eval.amber.wording, into paths.amber_dir."""
    from halludpo.toyworld import write_amber_split

    a = cfg.eval.amber
    ids = sorted(image["id"] for image in read_json(cfg.data.eval_instances)["images"])
    if a.n_images > len(ids):
        raise InputError(f"eval.amber.n_images={a.n_images}, but the eval split has {len(ids)} images")
    chosen = sorted(random.Random(cfg.eval.seed).sample(ids, a.n_images))
    world_dir = Path(cfg.data.eval_instances).parent.parent
    return write_amber_split(world_dir, paths.amber_dir(cfg), split=Path(cfg.data.eval_instances).parent.name,
                             n_hallu=a.n_hallu, seed=cfg.eval.seed, wording=a.wording, image_ids=chosen)


def amber_queries(cfg: DictConfig) -> dict[str, list[dict]]:
    """AMBER's queries per task ({id, image, query}), sorted by id: the lists the amber_answers shards split."""
    files = paths.amber_files(cfg)
    return {task: sorted(load_queries(files[f"query_{task}"]), key=lambda q: q["id"]) for task in AMBER_TASKS}


def amber_decoding(cfg: DictConfig) -> dict[str, dict]:
    """generate() kwargs per task: descriptions with eval.generation (as CHAIR's), answers greedy."""
    a = cfg.eval.amber
    return {"generative": decoding_kwargs(to_plain(cfg.eval.generation), a.generative.max_new_tokens),
            "discriminative": decoding_kwargs({}, a.discriminative.max_new_tokens)}


def answer_queries(model, processor, queries: list[dict], images_dir: str | Path, gen_kwargs: dict, batch_size: int,
                   seed: int, positions: range, resume: tuple[Path, str], desc: str) -> list[dict]:
    """model_k's responses {id, image, query, response} to the queries at `positions`, in whole batches (a batch
    samples with batch_seed(seed, its first position)), resumable into the shard file (halludpo.shards)."""
    def work(start: int, stop: int) -> list[dict]:
        chunk = queries[start:stop]
        responses = generate_texts(model, processor, [str(Path(images_dir) / q["image"]) for q in chunk],
                                   [q["query"] for q in chunk], gen_kwargs, batch_size, batch_seed(seed, start),
                                   progress=False)
        return [{"id": q["id"], "image": q["image"], "query": q["query"], "response": r}
                for q, r in zip(chunk, responses)]

    return run_batches(resume[0], positions, batch_size, work, resume[1], desc=desc)


def answer_shard_of_lists(cfg: DictConfig, k: int, lists: dict[str, tuple[list[dict], Path, Path, dict]],
                          inputs: list) -> None:
    """A shard job of the query benchmarks: model_k (loaded once) answers its run of whole batches of each list,
    name -> (queries, answers path, images folder, generate() kwargs), each split on its own, resumable into
    <answers folder>/shards/<answers stem>.<cfg.shard>-of-<cfg.shards>.jsonl. `inputs`: the files besides model_k
    whose change starts a partial shard over (halludpo.shards.input_fingerprint)."""
    model_path = paths.model_dir(cfg, k)
    fingerprint = input_fingerprint(to_plain(cfg), [model_path, *inputs])
    model, processor = load_model_and_processor(model_path, cfg.model.family, cfg.model.dtype, cfg.model.device)
    for name, (queries, answers, images, gen_kwargs) in lists.items():
        positions = shard_range(len(queries), cfg.eval.batch_size, cfg.shard, cfg.shards)
        target = shard_file(answers, cfg.shard, cfg.shards)
        rows = answer_queries(model, processor, queries, images, gen_kwargs, cfg.eval.batch_size, cfg.eval.seed,
                              positions, resume=(target, fingerprint), desc=name)
        log.info("round %d: shard %d of %d, %d %s responses -> %s", k, cfg.shard, cfg.shards, len(rows), name, target)


def amber_answer_shard(cfg: DictConfig, k: int) -> None:
    """Rule amber_answers, shard `cfg.shard` of `cfg.shards`: model_k describes its run of whole batches of AMBER's
    generative images and answers its run of the discriminative questions (each list split on its own, so every
    shard gets both kinds of work) -> eval/shards/amber_<task>.<i>-of-<n>.jsonl, resumable."""
    queries, decoding = amber_queries(cfg), amber_decoding(cfg)
    answer_shard_of_lists(cfg, k, {f"AMBER {task}": (queries[task], paths.amber_answers(cfg, k, task),
                                                     paths.amber_images(cfg), decoding[task])
                                   for task in AMBER_TASKS}, inputs=list(paths.amber_files(cfg).values()))


def evaluate_amber(cfg: DictConfig, rows: dict[str, list[dict]], model: str) -> dict:
    """amber.json's content: AMBER's metrics (halludpo.metrics.amber.score_amber) of the responses of every task,
    with the protocol (prompts, decoding, answer rule, noun pipeline, matcher, file hashes, versions)."""
    a = cfg.eval.amber
    files = paths.amber_files(cfg)
    queries = amber_queries(cfg)
    for task in AMBER_TASKS:
        asked, answered = [q["id"] for q in queries[task]], [r["id"] for r in rows[task]]
        if sorted(answered) != asked:
            missing = sorted(set(asked) - set(answered))
            raise InputError(f"the AMBER {task} responses hold {len(answered)} ids, the query file "
                             f"{len(asked)} (first missing: {missing[:1]}): rerun rule amber_answers")
    data = load_amber(annotations=files["annotations"], relation=files["relation"], safe_words=files["safe_words"])
    records = [{"id": r["id"], "response": r["response"]} for task in AMBER_TASKS for r in rows[task]]
    result = score_amber(records, data, nouns=a.noun_pipeline, matcher=a.matcher, similarity_table=a.similarity_table,
                         threshold=a.threshold, answer_rule=a.discriminative.answer_rule)
    decoding = amber_decoding(cfg)
    result["protocol"] |= {
        "prompt": sorted({q["query"] for q in queries["generative"]}),
        "decoding": decoding,
        "max_new_tokens": {task: decoding[task]["max_new_tokens"] for task in AMBER_TASKS},
        "n_responses": {task: len(rows[task]) for task in AMBER_TASKS},
        "query_files": {f"query_{t}": str(files[f"query_{t}"]) for t in AMBER_TASKS},
        "query_files_sha256": {f"query_{t}": sha256_file(files[f"query_{t}"]) for t in AMBER_TASKS},
        "images": str(paths.amber_images(cfg)),
        "image_files_sha256": sha256_json(sorted({q["image"] for qs in queries.values() for q in qs})),
        "questions": ("AMBER's released files" if paths.released_amber(cfg) else
                      f"toy world, rule amber_questions: {a.n_images} eval images (eval.seed {cfg.eval.seed}), "
                      f"wording {a.wording!r}"),
        "model": model,
        "config": to_plain(a),
        "versions": package_versions(),
    }
    return result


def read_amber_rows(cfg: DictConfig, k: int, n_shards: int) -> dict[str, list[dict]]:
    """The amber_answers shards' rows per task, in shard order (= id order)."""
    return {task: read_shards(shard_files(paths.amber_answers(cfg, k, task), n_shards), required=ANSWER_ROW_FIELDS)
            for task in AMBER_TASKS}


# ---------------------------------------------------------------------------------------------------------------
# Object HalBench

def object_halbench_prompts(name: str) -> tuple[str, ...]:
    """The prompts rotated over the toy eval images: the paper's eight, or the toy world's describe prompts (words
    the toy model knows; the paper's are mostly unknown words to it)."""
    if name == "toy":
        from halludpo.toyworld import DESCRIBE_PROMPTS

        return tuple(DESCRIBE_PROMPTS)
    return object_halbench.PROMPTS


def object_halbench_source(cfg: DictConfig) -> str:
    """Where the Object HalBench questions come from, as the result files say it."""
    o = cfg.eval.object_halbench
    if paths.released_object_halbench(cfg):
        q = object_halbench.QUESTION_FILE
        return f"RLHF-V's question file ({q['repository']} {q['path']} at {q['commit'][:12]})"
    return f"toy eval split: {o.n_images} images (eval.seed {cfg.eval.seed}), {o.prompts!r} prompts rotated"


def object_halbench_sources(cfg: DictConfig) -> tuple[list[dict], Path, Path | None]:
    """(questions [{image_id, prompt}], instances, captions or None): RLHF-V's file and COCO's val2014
    annotations, or n_images of the toy eval split with the prompts rotated."""
    o = cfg.eval.object_halbench
    if paths.released_object_halbench(cfg):
        source = cfg.data.sources.object_halbench
        return (object_halbench.read_question_file(source.questions), Path(source.instances), Path(source.captions))
    ids = sorted(image["id"] for image in read_json(cfg.data.eval_instances)["images"])
    if o.n_images > len(ids):
        raise InputError(f"eval.object_halbench.n_images={o.n_images}, but the eval split has {len(ids)} images")
    chosen = sorted(random.Random(cfg.eval.seed).sample(ids, o.n_images))
    captions = Path(cfg.data.eval_captions) if cfg.data.eval_captions else None
    return (object_halbench.rotate_prompts(chosen, object_halbench_prompts(o.prompts)),
            Path(cfg.data.eval_instances), captions)


def coco_subset(coco: dict, image_ids: set[int]) -> dict:
    """A COCO annotation file cut to the given images (images, annotations, and categories when it has them)."""
    cut = {"images": [im for im in coco["images"] if im["id"] in image_ids],
           "annotations": [a for a in coco["annotations"] if a["image_id"] in image_ids]}
    if "categories" in coco:
        cut["categories"] = coco["categories"]
    return cut


def write_object_halbench_questions(cfg: DictConfig) -> dict:
    """Rule object_halbench_questions: questions.jsonl ({id, image_id, image, query}, id = position) and the
    ground truth of its images (instances.json, captions.json: COCO files cut to them) in
    paths.object_halbench_dir. An image missing from the instances is an error naming the question's line."""
    questions, instances_path, captions_path = object_halbench_sources(cfg)
    instances = read_json(instances_path)
    images = {image["id"]: image for image in instances["images"]}
    for number, q in enumerate(questions, 1):
        if q["image_id"] not in images:
            where = (f"{cfg.data.sources.object_halbench.questions}:{number}" if paths.released_object_halbench(cfg)
                     else f"question {number}")
            raise InputError(f"{where}: image {q['image_id']} is not in {instances_path}")
    unknown = sorted({q["prompt"] for q in questions} - set(object_halbench.PROMPTS))
    if paths.released_object_halbench(cfg) and unknown:
        log.warning("%d prompt(s) of the question file are not among the paper's eight: %s", len(unknown), unknown)
    ids = {q["image_id"] for q in questions}
    files = paths.object_halbench_files(cfg)
    captions = read_json(captions_path) if captions_path else {"images": [], "annotations": []}
    write_json(files["instances"], coco_subset(instances, ids))
    write_json(files["captions"], coco_subset(captions, ids))
    rows = [{"id": n, "image_id": q["image_id"], "image": images[q["image_id"]]["file_name"], "query": q["prompt"]}
            for n, q in enumerate(questions)]
    write_jsonl(files["questions"], rows)
    return {"questions": len(rows), "images": len(ids), "prompts": len({q["prompt"] for q in questions}),
            "source": object_halbench_source(cfg)}


def object_halbench_decoding(cfg: DictConfig) -> dict:
    o = cfg.eval.object_halbench
    return decoding_kwargs(to_plain(o.generation), o.max_new_tokens)


def object_halbench_answer_shard(cfg: DictConfig, k: int) -> None:
    """Rule object_halbench_answers, shard `cfg.shard` of `cfg.shards`: model_k describes its run of whole batches
    of the questions -> eval/shards/object_halbench_answers.<i>-of-<n>.jsonl, resumable."""
    questions = paths.object_halbench_files(cfg)["questions"]
    queries = read_jsonl(questions, required=OBJECT_HALBENCH_QUESTION_FIELDS)
    answer_shard_of_lists(cfg, k, {"Object HalBench": (queries, paths.object_halbench_answers(cfg, k),
                                                       Path(cfg.data.eval_images), object_halbench_decoding(cfg))},
                          inputs=[questions])


def evaluate_object_halbench(cfg: DictConfig, rows: list[dict], model: str) -> dict:
    """object_halbench.json's content: the response- and mention-level hallucination rates
    (halludpo.metrics.object_halbench.score, our CHAIR object finder) with the protocol."""
    o = cfg.eval.object_halbench
    files = paths.object_halbench_files(cfg)
    questions = read_jsonl(files["questions"], required=OBJECT_HALBENCH_QUESTION_FIELDS)
    if [r["id"] for r in rows] != [q["id"] for q in questions]:
        raise InputError(f"the Object HalBench descriptions hold {len(rows)} ids, {files['questions']} "
                         f"{len(questions)}: rerun rule object_halbench_answers")
    scorer = object_scorer(cfg)
    has_captions = bool(read_json(files["captions"])["annotations"])  # none on the toy world
    truth = ground_truth_from_coco(files["instances"], files["captions"] if has_captions else None, scorer)
    records = [{"image_id": q["image_id"], "response": r["response"]} for q, r in zip(questions, rows)]
    result = object_halbench.score(records, truth, scorer, distinct_words=o.mentions == "distinct")
    image_ids = [q["image_id"] for q in questions]
    prompts = [q["query"] for q in questions]
    result["protocol"] = {
        "questions": object_halbench_source(cfg),
        "questions_sha256": sha256_file(files["questions"]),
        "prompts": {prompt: prompts.count(prompt) for prompt in sorted(set(prompts))},
        "decoding": object_halbench_decoding(cfg),
        "n_images": len(image_ids),
        "image_ids_sha256": sha256_json(image_ids),
        "images": str(cfg.data.eval_images),
        "ground_truth": "instances" + (" + captions" if has_captions else ""),
        "instances_sha256": sha256_file(files["instances"]),
        "objects": "rule-based: halludpo's CHAIR object finder (data.vocabulary, data.compounds, "
                   "eval.chair.text_pipeline); RLHF-V's reported numbers use a judge to list the objects",
        "mentions": result["metrics"]["mentions"],
        "text_pipeline": scorer.pipeline.name,
        "model": model,
        "config": to_plain(o),
        "versions": package_versions(),
    }
    return result



# ---------------------------------------------------------------------------------------------------------------
# MMHal-Bench (judge-scored)


def mmhal_records(cfg: DictConfig) -> list[dict]:
    """MMHal-Bench's questions (data.sources.mmhal.template), in file order: the list the mmhal_answers shards
    split."""
    return mmhal.read_template(cfg.data.sources.mmhal.template)


def mmhal_decoding(cfg: DictConfig) -> dict:
    """Greedy, at most eval.mmhal.max_new_tokens (MMHal-Bench's get_response.py leaves decoding to the model)."""
    return decoding_kwargs({}, cfg.eval.mmhal.max_new_tokens)


def mmhal_answer_shard(cfg: DictConfig, k: int) -> None:
    """Rule mmhal_answers, shard `cfg.shard` of `cfg.shards`: model_k answers its run of whole batches of the
    questions about their images -> eval/shards/mmhal_answers.<i>-of-<n>.jsonl, resumable."""
    records = mmhal_records(cfg)
    images = Path(cfg.data.sources.mmhal.images)
    queries = [{"id": n, "image": mmhal.image_file(r), "query": r["question"]} for n, r in enumerate(records)]
    missing = [q["image"] for q in queries if not (images / q["image"]).is_file()]
    if missing:
        raise InputError(f"{images}: {len(missing)} MMHal-Bench image(s) missing, first {missing[0]}")
    answer_shard_of_lists(cfg, k, {"MMHal-Bench": (queries, paths.mmhal_answers(cfg, k), images, mmhal_decoding(cfg))},
                          inputs=[cfg.data.sources.mmhal.template])


def mmhal_answered(cfg: DictConfig, k: int) -> list[dict]:
    """The benchmark's records with model_k's answers (model_answer) from the mmhal_answers shards."""
    records = mmhal_records(cfg)
    rows = read_shards(shard_files(paths.mmhal_answers(cfg, k), cfg.mmhal_shards), required=ANSWER_ROW_FIELDS)
    if [r["id"] for r in rows] != list(range(len(records))):
        raise InputError(f"the MMHal-Bench answers hold {len(rows)} ids, {cfg.data.sources.mmhal.template} "
                         f"{len(records)} questions: rerun rule mmhal_answers")
    return [record | {"model_answer": row["response"]} for record, row in zip(records, rows)]


def mmhal_judge(cfg: DictConfig, k: int, send: bool = True) -> dict | None:
    """Rule mmhal_judge: the estimate of the judge's calls, tokens and cost (logged before any call), then the
    ratings (halludpo.metrics.mmhal.evaluate; cached replies are not sent again) -> mmhal.json. With send=False
    only the estimate. A missing key or endpoint, or a judge that keeps failing, is one InputError line."""
    records = mmhal_answered(cfg, k)
    try:
        judge = Judge.from_config(to_plain(cfg.eval.judge))
        estimate = mmhal.estimate(records, judge)
        log.info("round %d: MMHal-Bench, %s", k, estimate.line())
        if not send:
            return None
        if estimate.to_send:
            judge.check()
        result = mmhal.evaluate(records, judge)
    except JudgeError as error:
        raise InputError(f"MMHal-Bench judge: {error}") from None
    template = cfg.data.sources.mmhal.template
    result["protocol"] |= {"template": str(template), "template_sha256": sha256_file(template),
                           "images": str(cfg.data.sources.mmhal.images), "decoding": mmhal_decoding(cfg),
                           "estimate": {"calls": estimate.calls, "cached": estimate.cached,
                                        "input_tokens": estimate.input_tokens, "output_tokens": estimate.output_tokens,
                                        "cost_usd": round(estimate.cost, 6), "method": estimate.method},
                           "model": str(paths.model_dir(cfg, k)), "versions": package_versions()}
    result["round"] = k
    return result


# ---------------------------------------------------------------------------------------------------------------
# lmms-eval's results layout


def write_lmms_layout(cfg: DictConfig, k: int, pope_samples: list[dict] | None, amber: dict | None,
                      amber_rows: dict[str, list[dict]] | None) -> dict:
    """round_k/eval/lmms_eval/: results.json and samples_<task>.jsonl of the benchmarks lmms-eval has a layout
    for (POPE's three splits, AMBER's two tasks; halludpo.lmms_results)."""
    tasks = []
    if pope_samples is not None:
        tasks += pope_tasks(pope_samples, decoding_kwargs({}, cfg.eval.pope.max_new_tokens),
                            PARSE_DESCRIPTIONS[cfg.eval.pope.parse])
    if amber is not None and amber_rows is not None:
        tasks += amber_tasks(amber, amber_rows["generative"], amber_rows["discriminative"], amber_decoding(cfg))
    model = str(paths.model_dir(cfg, k))
    config = {"model": cfg.model.family, "model_args": f"pretrained={model}", "batch_size": cfg.eval.batch_size,
              "batch_sizes": [], "device": cfg.model.device, "use_cache": None, "limit": None,
              "bootstrap_iters": 0, "gen_kwargs": None, "random_seed": cfg.eval.seed, "numpy_seed": None,
              "torch_seed": cfg.eval.seed, "fewshot_seed": None,
              "halludpo": {"experiment": cfg.experiment_name, "round": k, "benchmarks": list(cfg.eval.benchmarks),
                           "source": "written by halludpo.evaluate from its own answers (halludpo.lmms_results)"}}
    return write_lmms_eval(paths.lmms_eval_dir(cfg, k), tasks, config, model)


# ---------------------------------------------------------------------------------------------------------------
# Stage


def pope_question_files(cfg: DictConfig) -> dict[str, Path]:
    return {s: paths.pope_questions(cfg, s) for s in cfg.eval.pope.splits}


def answer_shard(cfg: DictConfig, k: int, answers_file: Path) -> None:
    """Rule pope_answers, shard `cfg.shard` of `cfg.shards`: model_k answers its run of whole batches of the
    distinct POPE questions (resumable) -> eval/shards/pope_answers.<i>-of-<n>.jsonl."""
    question_files = pope_question_files(cfg)
    questions = [q for qs in read_questions(question_files).values() for q in qs]
    positions = shard_range(len(unique_questions(questions)), cfg.eval.batch_size, cfg.shard, cfg.shards)
    model_path = paths.model_dir(cfg, k)
    target = shard_file(answers_file, cfg.shard, cfg.shards)
    fingerprint = input_fingerprint(to_plain(cfg), [model_path, *question_files.values()])
    model, processor = load_model_and_processor(model_path, cfg.model.family, cfg.model.dtype, cfg.model.device)
    rows = answer_questions(model, processor, questions, cfg.data.eval_images, cfg.eval.pope.max_new_tokens,
                            cfg.eval.batch_size, positions, resume=(target, fingerprint))
    log.info("round %d: shard %d of %d, %d POPE answers -> %s", k, cfg.shard, cfg.shards, len(rows), target)


def run(cfg: DictConfig) -> None:
    if cfg.step == "questions":
        p = cfg.eval.pope
        counts = write_pope_questions(cfg.data.eval_instances, pope_question_files(cfg), p.n_images, p.min_objects,
                                      p.per_image, cfg.eval.seed)
        log.info("POPE questions: %s", counts)
        return
    if cfg.step == "amber_questions":
        log.info("AMBER files -> %s: %s", paths.amber_dir(cfg), write_amber_questions(cfg))
        return
    if cfg.step == "object_halbench_questions":
        log.info("Object HalBench questions -> %s: %s", paths.object_halbench_dir(cfg),
                 write_object_halbench_questions(cfg))
        return
    steps = ("main", "answers", "amber_answers", "object_halbench_answers", "mmhal_answers", "mmhal_estimate",
             "mmhal_judge")
    if cfg.step not in steps:
        raise ValueError(f"step={cfg.step!r}; evaluate knows: questions, amber_questions, object_halbench_questions, "
                         f"{', '.join(steps)}")
    k = cfg.round
    answers_file = paths.pope_json(cfg, k).with_name("pope_answers.jsonl")
    if cfg.step == "answers":
        answer_shard(cfg, k, answers_file)
        return
    if cfg.step == "amber_answers":
        amber_answer_shard(cfg, k)
        return
    if cfg.step == "object_halbench_answers":
        object_halbench_answer_shard(cfg, k)
        return
    if cfg.step == "mmhal_answers":
        mmhal_answer_shard(cfg, k)
        return
    if cfg.step in ("mmhal_estimate", "mmhal_judge"):
        result = mmhal_judge(cfg, k, send=cfg.step == "mmhal_judge")
        if result is not None:
            write_json(paths.mmhal_json(cfg, k), result)
            m = result["metrics"]
            log.info("round %d MMHal-Bench average %.2f, hallucination rate %.3f (%d unparsed) -> %s", k,
                     m["average_score"], m["hallucination_rate"], m["n_unparsed"], paths.mmhal_json(cfg, k))
        return
    benchmarks = list(cfg.eval.benchmarks)
    model = str(paths.model_dir(cfg, k))
    said = []
    if "chair" in benchmarks:
        scorer = object_scorer(cfg)
        chair = evaluate_chair(paths.eval_generations(cfg, k), cfg.data.eval_instances, cfg.data.eval_captions,
                               scorer)
        chair["round"] = k
        write_json(paths.chair_json(cfg, k), chair)
        m = chair["metrics"]
        said.append(f"CHAIR_s {m['chair_s']:.3f} CHAIR_i {m['chair_i']:.3f} recall {m['recall']:.3f} "
                    f"len {m['len']:.1f}")
    samples = None
    if "pope" in benchmarks:
        answer_rows = read_shards(shard_files(answers_file, cfg.shards), required=("image_id", "text", "answer"))
        pope, samples = evaluate_pope(answer_rows, pope_question_files(cfg), cfg.eval.pope.max_new_tokens,
                                      parse=cfg.eval.pope.parse)
        pope["round"] = k
        pope["protocol"]["model"] = model
        pope["protocol"]["config"] = to_plain(cfg.eval.pope)
        write_jsonl(paths.pope_json(cfg, k).with_name("pope_samples.jsonl"), samples)
        write_json(paths.pope_json(cfg, k), pope)
        said.append(f"POPE F1 {({s: round(v['f1'], 3) for s, v in pope['metrics'].items()})}")
    amber = amber_rows = None
    if "amber" in benchmarks:
        amber_rows = read_amber_rows(cfg, k, cfg.amber_shards)
        amber = evaluate_amber(cfg, amber_rows, model)
        amber["round"] = k
        write_json(paths.amber_json(cfg, k), amber)
        said.append("AMBER " + ", ".join(f"{key} {value:.3f}" for key, value in amber_headline(amber).items()
                                         if value is not None))
    if "object_halbench" in benchmarks:
        rows = read_shards(shard_files(paths.object_halbench_answers(cfg, k), cfg.object_halbench_shards),
                           required=ANSWER_ROW_FIELDS)
        objhal = evaluate_object_halbench(cfg, rows, model)
        objhal["round"] = k
        write_json(paths.object_halbench_json(cfg, k), objhal)
        m = objhal["metrics"]
        said.append(f"Object HalBench response {m['response_hall']:.3f} mention {m['mention_hall']:.3f}")
    write_lmms_layout(cfg, k, samples, amber, amber_rows)
    log.info("round %d %s", k, " | ".join(said))


main = stage_main(run)

if __name__ == "__main__":
    main()
