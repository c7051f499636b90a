"""POPE: polling-based object probing (Li et al. 2023, RUCAIBox/POPE).

Yes/no questions "Is there a {object} in the image?" built from instance
annotations: per image a few present objects ("yes") each followed by one
absent object ("no") chosen by the split's negative-sampling rule.
"""

from __future__ import annotations

import contextlib
import io
import os
import random
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from typing import Any

POPE_SPLITS: tuple[str, ...] = ("random", "popular", "adversarial")

# Answer parsing rules (eval.pope.parse). Both read the raw answer as the released scripts do: no stripping,
# no lower-casing, words = the text split at single spaces.
#   pope:  POPE's evaluate.py (RUCAIBox/POPE at 3df3ba1b110e), the same rule as LLaVA's llava/eval/eval_pope.py:
#          keep the text before the first '.', drop commas; "no" if a word is 'No', 'not' or 'no'.
#   opera: OPERA's pope_eval.py (shikiw/OPERA at 61426efe4e2e, function recorder): drop EVERY '.' and ',' (so
#          the whole answer counts, not its first sentence); "no" if a word is 'No', 'not', 'no' or 'NO', or a
#          word ends in "n't".
# Anything else, the empty answer included, is "yes" under both.
PARSE_RULES: tuple[str, ...] = ("pope", "opera")
POPE_NEGATION_WORDS = frozenset({"No", "not", "no"})
OPERA_NEGATION_WORDS = frozenset({"No", "not", "no", "NO"})
PARSE_DESCRIPTIONS: dict[str, str] = {
    "pope": "pope (POPE's evaluate.py, LLaVA's eval_pope.py): text before the first '.', commas dropped, split at "
            "spaces; a word 'No', 'not' or 'no' -> no, else yes",
    "opera": "opera (OPERA's pope_eval.py): every '.' and ',' dropped, split at spaces; a word 'No', 'not', 'no' "
             "or 'NO', or a word ending in \"n't\" -> no, else yes",
}


def _load_coco_quietly(path: str | os.PathLike[str]):
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):  # COCO() prints progress
        return COCO(str(path))


def image_objects(coco) -> dict[int, list[str]]:
    """{image_id: distinct category names in annotation order}, every image."""
    objects: dict[int, list[str]] = {image_id: [] for image_id in coco.getImgIds()}
    for annotation in coco.dataset.get("annotations", []):
        names = objects.setdefault(annotation["image_id"], [])
        name = coco.cats[annotation["category_id"]]["name"]
        if name not in names:
            names.append(name)
    return objects


def question_text(obj: str) -> str:
    """'Is there a {obj} in the image?' with 'an' before a vowel."""
    article = "an" if obj[:1].lower() in "aeiou" else "a"
    return f"Is there {article} {obj} in the image?"


def image_frequency(sampled: dict[int, list[str]]) -> Counter[str]:
    """Number of sampled images containing each object."""
    return Counter(name for names in sampled.values() for name in names)


def co_occurrence(sampled: dict[int, list[str]]) -> dict[str, Counter[str]]:
    """co[a][b] = number of sampled images containing both a and b (a != b)."""
    counts: dict[str, Counter[str]] = defaultdict(Counter)
    for names in sampled.values():
        for a in names:
            counts[a].update(b for b in names if b != a)
    return counts


def _most_counted(counts: Counter[str], excluded: set[str]) -> str | None:
    """Highest count first, ties by name; only objects with a positive count."""
    ranked = sorted((-n, name) for name, n in counts.items() if n > 0 and name not in excluded)
    return ranked[0][1] if ranked else None


NegativePicker = Callable[[str, set[str]], str | None]


def negative_picker(
    split: str, sampled: dict[int, list[str]], rng: random.Random
) -> NegativePicker:
    """Return pick(positive, excluded) -> absent object for ``split``.

    random:      uniform over the objects of the sampled images (sorted pool, so
                 the draw depends only on the seed).
    popular:     the most frequent object (images containing it) first.
    adversarial: the object co-occurring most with ``positive`` first; random
                 when no co-occurring object is left.
    """
    pool = sorted({name for names in sampled.values() for name in names})

    def pick_random(positive: str, excluded: set[str]) -> str | None:
        choices = [name for name in pool if name not in excluded]
        return rng.choice(choices) if choices else None

    if split == "random":
        return pick_random
    if split == "popular":
        frequency = image_frequency(sampled)
        return lambda positive, excluded: _most_counted(frequency, excluded)
    co = co_occurrence(sampled)

    def pick_adversarial(positive: str, excluded: set[str]) -> str | None:
        return _most_counted(co[positive], excluded) or pick_random(positive, excluded)

    return pick_adversarial


def sample_images(
    objects: dict[int, list[str]], n_images: int, min_objects: int, rng: random.Random, source: Any
) -> list[int]:
    """Sample ``n_images`` ids among images with >= ``min_objects`` objects."""
    candidates = sorted(i for i, names in objects.items() if len(names) >= min_objects)
    if len(candidates) < n_images:
        raise ValueError(
            f"{source}: only {len(candidates)} images have >= {min_objects} objects, "
            f"{n_images} requested"
        )
    return rng.sample(candidates, n_images)


def build_questions(
    instances_path: str | os.PathLike[str],
    split: str,
    n_images: int = 500,
    min_objects: int = 3,
    n_per_image: int = 3,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """POPE questions for one split from a COCO-format instances file.

    Images with >= ``min_objects`` distinct categories are candidates (sorted by
    id); ``n_images`` are drawn with ``random.Random(seed)`` (the same images for
    every split). Per image, the first ``n_per_image`` distinct categories in
    annotation order are "yes" questions, each followed by a "no" question on an
    object absent from the image and not yet used for it, chosen by ``split``
    (see :func:`negative_picker`). Deterministic given ``seed``.
    """
    if split not in POPE_SPLITS:
        raise ValueError(f"Unknown POPE split {split!r}; valid splits: {', '.join(POPE_SPLITS)}")
    coco = _load_coco_quietly(instances_path)
    objects = image_objects(coco)
    rng = random.Random(seed)
    image_ids = sample_images(objects, n_images, min_objects, rng, instances_path)
    sampled = {image_id: objects[image_id] for image_id in image_ids}
    pick = negative_picker(split, sampled, rng)
    questions: list[dict[str, Any]] = []
    for image_id in image_ids:
        file_name = coco.imgs[image_id].get("file_name", "")
        for obj, label in _image_pairs(image_id, sampled[image_id], n_per_image, pick):
            questions.append({
                "question_id": len(questions) + 1,
                "image_id": image_id,
                "file_name": file_name,
                "object": obj,
                "label": label,
                "text": question_text(obj),
            })  # fmt: skip
    return questions


def _image_pairs(
    image_id: int, present: list[str], n_per_image: int, pick: NegativePicker
) -> list[tuple[str, str]]:
    """[(positive, "yes"), (negative, "no"), ...] for one image."""
    pairs: list[tuple[str, str]] = []
    excluded = set(present)
    for positive in present[:n_per_image]:
        negative = pick(positive, excluded)
        if negative is None:
            raise ValueError(f"No absent object left to ask about for image {image_id}")
        excluded.add(negative)
        pairs += [(positive, "yes"), (negative, "no")]
    return pairs


def parse_answer(text: str, rule: str = "pope") -> str:
    """A yes/no answer -> "yes" or "no" by ``rule`` (see PARSE_RULES above; default: the original POPE rule).

    pope:  words = text before the first '.', commas dropped, split at ' '; "no" if any word is 'No', 'not'
           or 'no'.
    opera: words = the whole text with every '.' and ',' dropped, split at ' '; "no" if any word is 'No',
           'not', 'no' or 'NO' or ends in "n't".
    Everything else, including the empty answer, is "yes" (both originals).
    """
    if rule == "pope":
        words = text.split(".")[0].replace(",", "").split(" ")
        return "no" if any(word in POPE_NEGATION_WORDS for word in words) else "yes"
    if rule == "opera":
        words = text.replace(".", "").replace(",", "").split(" ")
        negated = any(word in OPERA_NEGATION_WORDS or word.endswith("n't") for word in words)
        return "no" if negated else "yes"
    raise ValueError(f"Unknown POPE answer parsing rule {rule!r}; valid: {', '.join(PARSE_RULES)}")


def _ratio(numerator: int, denominator: int) -> float:
    return numerator / denominator if denominator else 0.0


def pope_metrics(labels: Sequence[str], predictions: Sequence[str]) -> dict[str, float | int]:
    """Binary metrics with "yes" as the positive class.

    accuracy = (TP + TN) / n; precision = TP / (TP + FP); recall = TP / (TP + FN);
    f1 = 2PR / (P + R); each 0.0 when its denominator is 0.
    yes_ratio = predicted "yes" / n: the share of PREDICTIONS, which shows a
    model's bias toward answering yes (the ground-truth share is 0.5 by
    construction and says nothing; lmms-eval computes that by mistake).
    """
    if len(labels) != len(predictions):
        raise ValueError(f"{len(labels)} labels but {len(predictions)} predictions")
    pairs = list(zip(labels, predictions))
    tp = sum(label == "yes" and pred == "yes" for label, pred in pairs)
    fp = sum(label != "yes" and pred == "yes" for label, pred in pairs)
    fn = sum(label == "yes" and pred != "yes" for label, pred in pairs)
    precision = _ratio(tp, tp + fp)
    recall = _ratio(tp, tp + fn)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": _ratio(sum(label == pred for label, pred in pairs), len(pairs)),
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": _ratio(tp + fp, len(pairs)),
        "n": len(pairs),
    }
