"""Stage `evaluate`: CHAIR on model_k's descriptions and POPE by asking model_k yes/no questions.

    python -m halludpo.evaluate step=questions      # rule pope_questions: POPE files from the eval annotations
    python -m halludpo.evaluate round=0             # rule evaluate: chair.json + pope.json (+ per-sample JSONL)

Every result file carries its full protocol (prompt, decoding, max_new_tokens, image ids and their hash, question
file hashes, text pipeline, package versions): numbers that cannot be reproduced are the field's common complaint.
"""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig

from halludpo import paths
from halludpo.config import stage_main, to_plain
from halludpo.inference import decoding_kwargs, generate_texts
from halludpo.io import (
    InputError,
    package_versions,
    read_jsonl,
    sha256_file,
    sha256_json,
    write_json,
    write_jsonl,
)
from halludpo.metrics.chair import COCO_COMPOUNDS, ChairScorer, ground_truth_from_coco, load_synonyms
from halludpo.metrics.pope import PARSE_DESCRIPTIONS, build_questions, parse_answer, pope_metrics
from halludpo.metrics.text import get_text_pipeline
from halludpo.models import load_model_and_processor

log = logging.getLogger(__name__)

GENERATION_FIELDS = ("image_id", "image_path", "prompt", "response", "model", "round", "sampling")
QUESTION_FIELDS = ("question_id", "image_id", "file_name", "object", "label", "text")


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


def answer_questions(model, processor, questions: list[dict], images_dir: str | Path, max_new_tokens: int,
                     batch_size: int) -> dict[tuple[int, str], str]:
    """Greedy answers, each distinct (image, question) asked once (the yes-questions repeat across splits)."""
    unique = sorted({(q["image_id"], q["file_name"], q["text"]) for q in questions})
    answers = generate_texts(model, processor, [str(Path(images_dir) / f) for _, f, _ in unique],
                             [t for _, _, t in unique], decoding_kwargs({}, max_new_tokens), batch_size,
                             desc="pope")
    return {(i, t): a for (i, _, t), a in zip(unique, answers)}


def evaluate_pope(model, processor, question_files: dict[str, Path], images_dir: str | Path, max_new_tokens: int,
                  batch_size: int, parse: str = "pope") -> tuple[dict, list[dict]]:
    """parse: the answer parsing rule (eval.pope.parse; halludpo.metrics.pope.PARSE_RULES)."""
    if parse not in PARSE_DESCRIPTIONS:
        raise ValueError(f"eval.pope.parse={parse!r}; valid: {', '.join(PARSE_DESCRIPTIONS)}")
    per_split = {s: read_jsonl(p, required=QUESTION_FIELDS) for s, p in question_files.items()}
    answers = answer_questions(model, processor, [q for qs in per_split.values() for q in qs], images_dir,
                               max_new_tokens, batch_size)
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
# Stage


def pope_question_files(cfg: DictConfig) -> dict[str, Path]:
    return {s: paths.pope_questions(cfg, s) for s in cfg.eval.pope.splits}


def run(cfg: DictConfig) -> None:
    if cfg.step == "questions":
        p = cfg.eval.pope
        counts = write_pope_questions(cfg.data.eval_instances, pope_question_files(cfg), p.n_images, p.min_objects,
                                      p.per_image, cfg.eval.seed)
        log.info("POPE questions: %s", counts)
        return
    if cfg.step != "main":
        raise ValueError(f"step={cfg.step!r}; evaluate knows: questions, main")
    k = cfg.round
    scorer = object_scorer(cfg)
    chair = evaluate_chair(paths.eval_generations(cfg, k), cfg.data.eval_instances, cfg.data.eval_captions, scorer)
    chair["round"] = k
    model, processor = load_model_and_processor(paths.model_dir(cfg, k), cfg.model.family, cfg.model.dtype,
                                                cfg.model.device)
    pope, samples = evaluate_pope(model, processor, pope_question_files(cfg), cfg.data.eval_images,
                                  cfg.eval.pope.max_new_tokens, cfg.eval.batch_size, parse=cfg.eval.pope.parse)
    pope["round"] = k
    pope["protocol"]["model"] = str(paths.model_dir(cfg, k))
    pope["protocol"]["config"] = to_plain(cfg.eval.pope)
    write_jsonl(paths.pope_json(cfg, k).with_name("pope_samples.jsonl"), samples)
    write_json(paths.pope_json(cfg, k), pope)
    write_json(paths.chair_json(cfg, k), chair)
    m = chair["metrics"]
    log.info("round %d CHAIR_s %.3f CHAIR_i %.3f recall %.3f len %.1f | POPE F1 %s", k, m["chair_s"], m["chair_i"],
             m["recall"], m["len"], {s: round(v["f1"], 3) for s, v in pope["metrics"].items()})


main = stage_main(run)

if __name__ == "__main__":
    main()
