"""CHAIR object-hallucination metric (Rohrbach et al. 2018, OPERA protocol).

A caption is turned into words by a :class:`~halludpo.metrics.text.TextPipeline`,
two-word compounds are merged left to right, a few special phrases are
rewritten, and every remaining word found in the synonym table is a mention of
that table row's category. A mention is hallucinated when its category is not
in the image's ground truth.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from collections.abc import Iterable, Mapping
from importlib import resources
from pathlib import Path
from typing import Any

from halludpo.metrics.text import TextPipeline, get_text_pipeline, split_sentences

COCO_COMPOUNDS: list[str] = [
    "motor bike", "motor cycle", "air plane", "traffic light", "street light",
    "traffic signal", "stop light", "fire hydrant", "stop sign", "parking meter",
    "suit case", "sports ball", "baseball bat", "baseball glove", "tennis racket",
    "wine glass", "hot dog", "cell phone", "mobile phone", "teddy bear",
    "hair drier", "potted plant", "bow tie", "laptop computer", "stove top oven",
    "home plate", "train track",
]  # fmt: skip

# 'baby X' / 'adult X' -> X for these X.
ANIMAL_WORDS: tuple[str, ...] = (
    "bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra",
    "giraffe", "animal", "cub",
)  # fmt: skip

# 'passenger X' -> X for these X.
PASSENGER_VEHICLES: tuple[str, ...] = ("jet", "train")


def coco_synonyms_path() -> Path:
    """Path of the packaged COCO synonym table (80 lines, first entry = category)."""
    return Path(str(resources.files("halludpo") / "resources" / "coco_synonyms.txt"))


def load_synonyms(path: str | os.PathLike[str]) -> dict[str, str]:
    """Parse a synonym file into {synonym: category}.

    One line per category: ``category, synonym, synonym, ...``. As in the
    original CHAIR code each line is stripped of surrounding whitespace and then
    split on ", " (comma + one space). Hence the quirk of the COCO file:
    "scooter,  motor bike" yields the entry " motor bike" (leading space),
    which no word ever equals, likewise " cheesecake". Case is kept, so
    'iPhone' never matches lowercased text either. Blank lines are skipped.
    A synonym listed under two categories maps to the later one.
    """
    synonyms: dict[str, str] = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        entries = line.strip().split(", ")
        for entry in entries:
            synonyms[entry] = entries[0]
    return synonyms


def special_pairs() -> dict[str, str]:
    """Two-word phrases rewritten to one word: baby/adult animals, passenger
    jet/train, 'bow tie' -> 'tie', 'toilet seat' -> 'toilet'."""
    pairs: dict[str, str] = {}
    for animal in ANIMAL_WORDS:
        pairs[f"baby {animal}"] = animal
        pairs[f"adult {animal}"] = animal
    for vehicle in PASSENGER_VEHICLES:
        pairs[f"passenger {vehicle}"] = vehicle
    pairs["bow tie"] = "tie"
    pairs["toilet seat"] = "toilet"
    return pairs


def merge_pairs(words: list[str], pair_map: Mapping[str, str]) -> list[str]:
    """Scan left to right; when ``words[i] + ' ' + words[i+1]`` is a key of
    ``pair_map``, emit its value and skip both words, else emit ``words[i]``.

    Only pairs are looked at, so compounds of three or more words (e.g.
    'stove top oven') never match, as in the original.
    """
    merged: list[str] = []
    i = 0
    while i < len(words):
        pair = " ".join(words[i : i + 2])
        if i + 1 < len(words) and pair in pair_map:
            merged.append(pair_map[pair])
            i += 2
        else:
            merged.append(words[i])
            i += 1
    return merged


def drop_toilet_seats(words: list[str]) -> list[str]:
    """If both 'toilet' and 'seat' occur, drop every 'seat' (it is the toilet's
    seat, not a chair)."""
    if "toilet" in words and "seat" in words:
        return [word for word in words if word != "seat"]
    return words


def _fraction(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else 0.0


class ChairScorer:
    """Finds object mentions in text and scores CHAIR against ground truth."""

    def __init__(
        self,
        synonyms: Mapping[str, str],
        pipeline: TextPipeline,
        compounds: list[str] | None = None,
    ) -> None:
        self.synonyms = dict(synonyms)
        self.pipeline = pipeline
        self.compounds = list(COCO_COMPOUNDS if compounds is None else compounds)
        # Special phrases override compounds ('bow tie' -> 'tie', not 'bow tie').
        self._pair_map = {c: c for c in self.compounds} | special_pairs()

    @classmethod
    def for_vocabulary(cls, synonyms: Mapping[str, str], pipeline: TextPipeline) -> ChairScorer:
        """Scorer whose compounds are every multi-word synonym (Object HalBench
        style). Entries with stray spaces (the two-space quirk) never match."""
        compounds = [entry for entry in synonyms if " " in entry.strip()]
        return cls(synonyms, pipeline, compounds)

    def objects(self, text: str) -> list[tuple[str, str]]:
        """Object mentions in order, with repeats, as (matched word, category).

        lowercase -> pipeline.words -> merge compounds/special pairs left to
        right -> drop 'seat' when 'toilet' occurs -> keep words in the synonym
        table. Compounds not in the table ('home plate', 'train track') are
        consumed and dropped.
        """
        words = self.pipeline.words(text.lower())
        words = drop_toilet_seats(merge_pairs(words, self._pair_map))
        return [(word, self.synonyms[word]) for word in words if word in self.synonyms]

    def categories(self, text: str) -> list[str]:
        """Categories of :meth:`objects`, in order, with repeats."""
        return [category for _, category in self.objects(text)]

    def score_item(self, image_id: Any, response: str, gt: set[str]) -> dict[str, Any]:
        mentioned = self.categories(response)
        return {
            "image_id": image_id,
            "mentioned": mentioned,
            "hallucinated": [category for category in mentioned if category not in gt],
            "gt": sorted(gt),
            "recall_hits": sorted(set(mentioned) & gt),
        }

    def score(
        self,
        records: Iterable[Mapping[str, Any]],
        ground_truth: Mapping[Any, set[str]],
    ) -> dict[str, Any]:
        """CHAIR over records {"image_id", "response"}; fractions in [0, 1].

        CHAIR_s = responses with >= 1 hallucinated mention / responses
        CHAIR_i = hallucinated mentions / mentions (repeats counted; 0 if none)
        recall  = sum_r |distinct mentioned_r ∩ GT_r| / sum_r |GT_r|
        len     = mean number of tokens per response as returned by
                  ``pipeline.words`` (punctuation tokens included)
        Raises ValueError when a record's image_id has no ground truth.
        """
        items: list[dict[str, Any]] = []
        n_words = 0
        for record in records:
            image_id = record["image_id"]
            if image_id not in ground_truth:
                raise ValueError(f"No CHAIR ground truth for image_id {image_id!r}")
            response = record["response"] or ""
            items.append(self.score_item(image_id, response, set(ground_truth[image_id])))
            n_words += len(self.pipeline.words(response.lower()))
        return self._summarize(items, n_words)

    def by_sentence(self, records: Iterable[Mapping[str, Any]], ground_truth: Mapping[Any, set[str]]
                    ) -> list[dict[str, Any]]:
        """CHAIR_i per sentence position: where in the descriptions the hallucinations are.

        One row per position i (0 = first sentence, split by :func:`split_sentences`): responses that reach it,
        object mentions in sentence i, hallucinated ones among them, and CHAIR_i = hallucinated / mentions.
        Mentions are found sentence by sentence, so the sums can differ from the whole-response count only
        where a compound spans a sentence end.
        """
        rows: list[dict[str, Any]] = []
        for record in records:
            gt = set(ground_truth[record["image_id"]])
            for i, sentence in enumerate(split_sentences(record["response"] or "")):
                if i == len(rows):
                    rows.append({"sentence": i, "responses": 0, "mentions": 0, "hallucinated": 0})
                mentioned = self.categories(sentence)
                rows[i]["responses"] += 1
                rows[i]["mentions"] += len(mentioned)
                rows[i]["hallucinated"] += sum(category not in gt for category in mentioned)
        for row in rows:
            row["chair_i"] = _fraction(row["hallucinated"], row["mentions"])
        return rows

    def _summarize(self, items: list[dict[str, Any]], n_words: int) -> dict[str, Any]:
        n_responses = len(items)
        n_mentions = sum(len(item["mentioned"]) for item in items)
        n_hallucinated = sum(len(item["hallucinated"]) for item in items)
        return {
            "chair_s": _fraction(sum(bool(item["hallucinated"]) for item in items), n_responses),
            "chair_i": _fraction(n_hallucinated, n_mentions),
            "recall": _fraction(
                sum(len(item["recall_hits"]) for item in items),
                sum(len(item["gt"]) for item in items),
            ),
            "len": _fraction(n_words, n_responses),
            "n_responses": n_responses,
            "n_mentions": n_mentions,
            "n_hallucinated_mentions": n_hallucinated,
            "text_pipeline": self.pipeline.name,
            "items": items,
        }


def _load_coco_quietly(path: str | os.PathLike[str]):
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):  # COCO() prints progress
        return COCO(str(path))


def instance_ground_truth(
    instances_path: str | os.PathLike[str], synonyms: Mapping[str, str]
) -> dict[int, set[str]]:
    """{image_id: CHAIR categories of its instance annotations}; every image of
    the file is present, those without annotations with an empty set. Category
    names are mapped through the synonym table (unknown names kept as is)."""
    coco = _load_coco_quietly(instances_path)
    truth: dict[int, set[str]] = {image_id: set() for image_id in coco.getImgIds()}
    for annotation in coco.dataset.get("annotations", []):
        name = coco.cats[annotation["category_id"]]["name"]
        truth.setdefault(annotation["image_id"], set()).add(synonyms.get(name, name))
    return truth


def caption_ground_truth(
    captions_path: str | os.PathLike[str], scorer: ChairScorer
) -> dict[int, set[str]]:
    """{image_id: categories mentioned in its reference captions} for a COCO
    captions file (annotations with "image_id" and "caption")."""
    data = json.loads(Path(captions_path).read_text(encoding="utf-8"))
    truth: dict[int, set[str]] = {image["id"]: set() for image in data.get("images", [])}
    for annotation in data.get("annotations", []):
        categories = scorer.categories(annotation["caption"])
        truth.setdefault(annotation["image_id"], set()).update(categories)
    return truth


def ground_truth_from_coco(
    instances_path: str | os.PathLike[str],
    captions_path: str | os.PathLike[str] | None = None,
    scorer: ChairScorer | None = None,
) -> dict[int, set[str]]:
    """CHAIR ground truth: instance categories UNION objects parsed from the
    reference captions (when ``captions_path`` is given).

    ``scorer`` supplies the synonym table and text pipeline; default: the
    packaged COCO table with ``get_text_pipeline("auto")``.
    """
    if scorer is None:
        scorer = ChairScorer(load_synonyms(coco_synonyms_path()), get_text_pipeline("auto"))
    truth = instance_ground_truth(instances_path, scorer.synonyms)
    if captions_path is not None:
        for image_id, categories in caption_ground_truth(captions_path, scorer).items():
            truth.setdefault(image_id, set()).update(categories)
    return truth
