"""Object HalBench (RLHF-V, Yu et al. 2024): object hallucination in detailed descriptions of 300 COCO images.

The protocol, as RLHF-V publishes it (RLHF-V/RLHF-V at 3d35a91568b2: eval/eval_gpt_obj_halbench.py and
eval/summarize_gpt_obj_halbench_review.py; the same scripts in RLHF-V/RLAIF-V at 83d917b2e811):

- 300 COCO val2014 images, each asked one of eight detailed-description prompts (:data:`PROMPTS`); RLAIF-V's
  generation script decodes greedily with 3 beams and at most 1,024 new tokens (:data:`GENERATION`).
- The objects of a description are COCO categories found through a synonym table, and a mention is hallucinated
  when its category is not in the image's ground truth: the instance categories plus the objects of the reference
  captions (COCO 2014 train and val annotations combined).
- Reported: the response-level hallucination rate, responses with >= 1 hallucinated object / responses that
  mention >= 1 COCO object (``CHAIRs_refine`` there, "Response Hall"), and the mention-level rate, hallucinated
  object mentions / all object mentions (``CHAIRi``, "Object Hall"); also the object recall.

Here the objects are found by our CHAIR object finder (:class:`halludpo.metrics.chair.ChairScorer`, by default
with the packaged COCO synonym table and the ``auto`` text pipeline). That is RLHF-V's rule-based path; its
reported numbers come from a judge-assisted path instead (gpt-3.5-turbo-0613 lists the objects of each answer,
which are then matched to the synonym table, each object name once per answer); docs/evaluation.md lists the
differences.

The question file (image ids and the prompt of each image, the images inlined as base64) is
eval/data/obj_halbench_300_with_image.jsonl of RLHF-V/RLAIF-V at commit 83d917b2e811 (git blob
cb8e15a81a1ddf720f306fda0decefb1ed80c31f, the blob RLHF-V/RLHF-V added in commit f0006b5aed74): 300 lines of
{org_idx, image_id, question, image}. Its sha256 in configs/download/default.yaml (:data:`QUESTION_FILE`) was
recorded by a third party after a full download; it could not be computed here (the file is not in the stored
snapshot of the repository), so a mismatch names the file and both hashes.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from halludpo.io import InputError
from halludpo.metrics.chair import ChairScorer, coco_synonyms_path, load_synonyms
from halludpo.metrics.text import get_text_pipeline

# The eight detailed-description prompts (RLHF-V paper, arXiv:2312.00849, Appendix D.2, Table 6: "The list of
# instructions for Object HalBench"; four taken from earlier work, four written by GPT-4). The question file
# carries each image's prompt; these are the texts it draws from.
PROMPTS: tuple[str, ...] = (
    "Provide a thorough description of the given image.",
    "What is this photo about? Please answer in great detail.",
    "Provide a thorough description of the given picture.",
    "Explain the narrative or story that the image seems to convey, detailing each part that contributes to it.",
    "Please provide a detailed description of the image. Describe the visual elements, colors, shapes, textures, "
    "and any objects or people present along with the overall mood or atmosphere portrayed in the image.",
    "Please provide a detailed description of the image, including its visual elements, such as colors, shapes, "
    "textures, objects, and people.",
    "Provide an intricate description of the image, capturing its visual elements, including colors, shapes, "
    "textures, objects, and any people present.",
    "Compose a detailed account of the image, encompassing its visual characteristics, like colors, shapes, "
    "textures, objects, and any human subjects, by paying careful attention to the specifics.",
)
N_IMAGES = 300
# RLAIF-V's script/eval/eval_rlaifv_objhal.sh + muffin/eval/llava15_chair.py: temperature 0, 3 beams, 1,024 tokens.
GENERATION: dict[str, Any] = {"do_sample": False, "num_beams": 3, "max_new_tokens": 1024}
QUESTION_FILE = {
    "repository": "RLHF-V/RLAIF-V",
    "path": "eval/data/obj_halbench_300_with_image.jsonl",
    "commit": "83d917b2e8118ca8e7877a796d72af9bb3e6b356",
    "git_blob": "cb8e15a81a1ddf720f306fda0decefb1ed80c31f",  # also RLHF-V/RLHF-V's, added in f0006b5aed74
    "bytes": 63_537_348,
    "sha256": "e89c705f3cdebc35b7863878e059c88a97506767b87ad17014d58428ce6547a7",  # third party's, not computed here
}
QUESTION_KEYS = ("image_id", "question")  # of each line; org_idx and the inlined image are not read
HEADLINE_KEYS = ("response_hall", "mention_hall", "chair_s", "recall", "avg_words")  # summary.json, MLflow


def default_scorer(text_pipeline: str = "auto") -> ChairScorer:
    """Our CHAIR object finder with the packaged COCO synonym table and CHAIR's compound list."""
    return ChairScorer(load_synonyms(coco_synonyms_path()), get_text_pipeline(text_pipeline))


def assign_prompts(image_ids: Sequence[Any], seed: int = 0) -> list[dict[str, Any]]:
    """[{"image_id", "prompt"}] with one of :data:`PROMPTS` per image, drawn with ``random.Random(seed)``.

    For image sets without the released question file (the toy world); RLHF-V's own pairing of images and
    prompts is the one in its question file.
    """
    rng = random.Random(seed)
    return [{"image_id": image_id, "prompt": rng.choice(PROMPTS)} for image_id in image_ids]


def rotate_prompts(image_ids: Sequence[Any], prompts: Sequence[str] = PROMPTS) -> list[dict[str, Any]]:
    """[{"image_id", "prompt"}]: the n-th image (in the given order) gets prompts[n % len(prompts)], so every prompt
    is asked about as often as the others (give or take one)."""
    return [{"image_id": image_id, "prompt": prompts[n % len(prompts)]} for n, image_id in enumerate(image_ids)]


def read_question_file(path: str | Path) -> list[dict[str, Any]]:
    """RLHF-V's question file -> [{"image_id": int, "prompt": str}] in file order.

    One JSON object per line with :data:`QUESTION_KEYS` (other keys, the inlined image included, are not read).
    A malformed line, a missing or empty key, a non-integer image id or an image asked twice raises InputError
    naming the file and line."""
    rows, seen = [], {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                item = json.loads(line)
            except json.JSONDecodeError as error:
                raise InputError(f"{where}: not a JSON line ({error.msg})") from None
            if not isinstance(item, dict) or any(key not in item for key in QUESTION_KEYS):
                raise InputError(f"{where}: an Object HalBench question needs the keys {', '.join(QUESTION_KEYS)}")
            image_id, prompt = item["image_id"], item["question"]
            if isinstance(image_id, bool) or not isinstance(image_id, (int, str)) or not str(image_id).isdigit():
                raise InputError(f"{where}: image_id {image_id!r} is not a COCO image id")
            if not isinstance(prompt, str) or not prompt.strip():
                raise InputError(f"{where}: the question is empty")
            if int(image_id) in seen:
                raise InputError(f"{where}: image {image_id} is asked again (first on line {seen[int(image_id)]})")
            seen[int(image_id)] = number
            rows.append({"image_id": int(image_id), "prompt": prompt})
    if not rows:
        raise InputError(f"{path}: no questions")
    return rows


def _fraction(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else 0.0


def score(
    records: Iterable[Mapping[str, Any]],
    ground_truth: Mapping[Any, set[str]],
    scorer: ChairScorer | None = None,
    distinct_words: bool = False,
) -> dict[str, Any]:
    """Object HalBench rates of records {"image_id", "response"}; fractions in [0, 1].

    response_hall  = responses with >= 1 hallucinated mention / responses with >= 1 mention (RLHF-V's reported
                     response-level rate; 0.0 when no response mentions an object)
    chair_s        = responses with >= 1 hallucinated mention / all responses
    mention_hall   = hallucinated mentions / all mentions (RLHF-V's mention-level rate, CHAIR_i)
    recall         = sum over responses of |distinct correctly mentioned categories| / sum of |ground truth|
    avg_words      = mean number of space-separated words per response, as RLHF-V measures length

    Mentions come from ``scorer`` (default: :func:`default_scorer`); repeats count, as in RLHF-V's rule-based
    path. ``distinct_words=True`` counts each matched word once per response, as its judge-assisted path counts
    each extracted object name once.
    """
    scorer = scorer or default_scorer()
    records = list(records)
    result = scorer.score(records, ground_truth)
    items = result.pop("items")
    if distinct_words:
        for item, record in zip(items, records):
            gt = set(ground_truth[record["image_id"]])
            mentioned = [category for _, category in dict.fromkeys(scorer.objects(record["response"] or ""))]
            item["mentioned"] = mentioned
            item["hallucinated"] = [category for category in mentioned if category not in gt]
    n_mentions = sum(len(item["mentioned"]) for item in items)
    n_hallucinated = sum(len(item["hallucinated"]) for item in items)
    with_objects = sum(bool(item["mentioned"]) for item in items)
    hallucinated_responses = sum(bool(item["hallucinated"]) for item in items)
    for item, record in zip(items, records):
        item["response"] = record["response"]
    metrics = {
        "response_hall": _fraction(hallucinated_responses, with_objects),
        "chair_s": _fraction(hallucinated_responses, len(items)),
        "mention_hall": _fraction(n_hallucinated, n_mentions),
        "recall": result["recall"],
        "avg_words": _fraction(sum(len((r["response"] or "").strip().split(" ")) for r in records), len(items)),
        "n_responses": len(items),
        "n_responses_with_objects": with_objects,
        "n_hallucinated_responses": hallucinated_responses,
        "n_mentions": n_mentions,
        "n_hallucinated_mentions": n_hallucinated,
        "mentions": "distinct words per response" if distinct_words else "every mention (repeats counted)",
        "text_pipeline": result["text_pipeline"],
    }
    return {"benchmark": "object_halbench", "metrics": metrics, "items": items}
