import hashlib
import json
import os
from pathlib import Path

import pytest
import yaml

from halludpo.data import read_pope_file
from halludpo.metrics.pope import (
    PARSE_RULES,
    build_questions,
    co_occurrence,
    image_frequency,
    negative_picker,
    parse_answer,
    pope_metrics,
    question_text,
)

CATEGORY_NAMES = ["person", "dog", "cat", "car", "umbrella", "apple", "bus", "kite"]
# image id -> category names of its annotations, in annotation order
IMAGE_ANNOTATIONS = {
    10: ["dog", "person", "dog", "car"],  # distinct: dog, person, car
    20: ["person", "cat", "car"],
    30: ["person", "bus", "apple", "umbrella"],
    40: ["kite", "person"],  # only 2 objects: never sampled
    50: [],
}
# Sampled images (all three candidates): 10, 20, 30.
# Pool of objects: apple bus car cat dog person umbrella ('kite' is not in it).
# Images containing each: person 3, car 2, every other object 1.
# Co-occurrence: person-car 2; every other co-occurring pair 1.
SAMPLED = {
    10: ["dog", "person", "car"],
    20: ["person", "cat", "car"],
    30: ["person", "bus", "apple", "umbrella"],
}
POOL = {"apple", "bus", "car", "cat", "dog", "person", "umbrella"}


@pytest.fixture
def instances(tmp_path):
    category_id = {name: i + 1 for i, name in enumerate(CATEGORY_NAMES)}
    pairs = [(i, name) for i, names in IMAGE_ANNOTATIONS.items() for name in names]
    annotations = [
        {"id": n + 1, "image_id": image_id, "category_id": category_id[name],
         "bbox": [0, 0, 1, 1], "area": 1, "iscrowd": 0}
        for n, (image_id, name) in enumerate(pairs)
    ]  # fmt: skip
    data = {
        "images": [{"id": i, "file_name": f"img{i}.jpg"} for i in IMAGE_ANNOTATIONS],
        "categories": [{"id": i, "name": name} for name, i in category_id.items()],
        "annotations": annotations,
    }
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    return path


def _by_image(questions):
    pairs = {}
    for q in questions:
        pairs.setdefault(q["image_id"], []).append((q["object"], q["label"]))
    return pairs


def _check_common_rules(questions):
    for image_id, pairs in _by_image(questions).items():
        present = set(IMAGE_ANNOTATIONS[image_id])
        assert [obj for obj, label in pairs if label == "yes"] == SAMPLED[image_id][:3]
        assert [label for _, label in pairs] == ["yes", "no"] * 3
        negatives = [obj for obj, label in pairs if label == "no"]
        assert len(set(negatives)) == 3  # never repeated within an image
        assert not set(negatives) & present
        assert set(negatives) <= POOL


# --- question building -----------------------------------------------------


@pytest.mark.parametrize("split", ["random", "popular", "adversarial"])
def test_every_split_follows_common_rules(instances, split):
    questions = build_questions(instances, split, n_images=3)
    assert len(questions) == 18
    assert [q["question_id"] for q in questions] == list(range(1, 19))
    assert sorted(_by_image(questions)) == [10, 20, 30]
    _check_common_rules(questions)


def test_question_fields(instances):
    first = build_questions(instances, "popular", n_images=3)[0]
    assert set(first) == {"question_id", "image_id", "file_name", "object", "label", "text"}
    assert first["file_name"] == f"img{first['image_id']}.jpg"
    assert first["text"] == question_text(first["object"])


def test_popular_picks_most_frequent_absent(instances):
    # ranking: person(3) car(2) then apple bus cat dog umbrella (1, by name)
    assert _by_image(build_questions(instances, "popular", n_images=3)) == {
        10: [("dog", "yes"), ("apple", "no"), ("person", "yes"), ("bus", "no"),
             ("car", "yes"), ("cat", "no")],
        20: [("person", "yes"), ("apple", "no"), ("cat", "yes"), ("bus", "no"),
             ("car", "yes"), ("dog", "no")],
        30: [("person", "yes"), ("car", "no"), ("bus", "yes"), ("cat", "no"),
             ("apple", "yes"), ("dog", "no")],
    }  # fmt: skip


def test_adversarial_picks_most_cooccurring_absent(instances):
    pairs = _by_image(build_questions(instances, "adversarial", n_images=3))
    # image 30: person co-occurs with car twice -> car
    assert pairs[30][:2] == [("person", "yes"), ("car", "no")]
    # image 20: person's absent co-occurring objects all tie at 1 -> first by name
    assert pairs[20][:2] == [("person", "yes"), ("apple", "no")]
    # image 30: bus co-occurs only with objects in the image -> random fallback
    assert pairs[30][3][0] in {"cat", "dog"}


def test_same_seed_same_questions_and_same_images_across_splits(instances):
    first = build_questions(instances, "random", n_images=3, seed=7)
    assert first == build_questions(instances, "random", n_images=3, seed=7)
    images = [q["image_id"] for q in first]
    for split in ("popular", "adversarial"):
        questions = build_questions(instances, split, n_images=3, seed=7)
        assert [q["image_id"] for q in questions] == images


def test_random_negatives_vary_with_seed(instances):
    first_negatives = {
        build_questions(instances, "random", n_images=3, seed=seed)[1]["object"]
        for seed in range(12)
    }
    assert len(first_negatives) > 1


def test_too_few_candidates_names_file(instances):
    with pytest.raises(ValueError, match="instances.json"):
        build_questions(instances, "random", n_images=4)


def test_unknown_split_lists_valid_splits(instances):
    with pytest.raises(ValueError, match="random, popular, adversarial"):
        build_questions(instances, "hard", n_images=3)


def test_article_before_vowel():
    assert question_text("apple") == "Is there an apple in the image?"
    assert question_text("umbrella") == "Is there an umbrella in the image?"
    assert question_text("dog") == "Is there a dog in the image?"


# --- negative pickers with a controlled random source -----------------------


class FirstChoice:
    """Stand-in for random.Random: choice() returns the first option."""

    def __init__(self):
        self.offered = None

    def choice(self, options):
        self.offered = list(options)
        return self.offered[0]


def test_counts():
    assert image_frequency(SAMPLED)["person"] == 3 and image_frequency(SAMPLED)["car"] == 2
    assert co_occurrence(SAMPLED)["person"]["car"] == 2
    assert co_occurrence(SAMPLED)["bus"] == {"person": 1, "apple": 1, "umbrella": 1}


def test_random_picker_draws_only_absent_unused_objects():
    rng = FirstChoice()
    pick = negative_picker("random", SAMPLED, rng)
    assert pick("dog", {"dog", "person", "car", "apple"}) == "bus"
    assert rng.offered == ["bus", "cat", "umbrella"]


def test_popular_picker():
    pick = negative_picker("popular", SAMPLED, FirstChoice())
    assert pick("person", {"person", "bus", "apple", "umbrella"}) == "car"
    assert pick("person", {"person", "car"}) == "apple"


def test_adversarial_picker_and_fallback():
    rng = FirstChoice()
    pick = negative_picker("adversarial", SAMPLED, rng)
    assert pick("person", {"person", "bus", "apple", "umbrella"}) == "car"
    assert rng.offered is None
    # bus co-occurs only with excluded objects: uniform draw over the rest
    assert pick("bus", {"person", "bus", "apple", "umbrella", "car"}) == "cat"
    assert rng.offered == ["cat", "dog"]


# --- answers and metrics ---------------------------------------------------


# (answer, POPE / LLaVA rule, OPERA rule). pope: text before the first '.', commas dropped, words split at ' ',
# 'No' / 'not' / 'no' -> no. opera: every '.' and ',' dropped (the whole answer), 'No' / 'not' / 'no' / 'NO' or a
# word ending in "n't" -> no. Everything else is yes.
PARSE_CASES = [
    ("No, there is not.", "no", "no"),
    ("Yes. No.", "yes", "no"),  # pope reads the first sentence only; opera the whole answer
    ("Yes, there is a dog. It is not a cat.", "yes", "no"),
    ("There isn't", "yes", "no"),  # "n't" is a negation for opera only
    ("There isn't.", "yes", "no"),
    ("Don't know", "yes", "no"),
    ("NO", "yes", "no"),  # 'NO' is a negation for opera only
    ("no", "no", "no"),
    ("No.", "no", "no"),
    ("no, ", "no", "no"),
    (" no", "no", "no"),  # split at single spaces: ['', 'no']
    ("I do not see one", "no", "no"),
    ("There is no dog", "no", "no"),
    ("Yes, there is a dog in the image.", "yes", "yes"),
    ("", "yes", "yes"),  # the empty answer is yes in both originals
    ("Not really", "yes", "yes"),  # 'Not' is in neither list
    ("Nope", "yes", "yes"),
    ("nothing", "yes", "yes"),
    ("No\nthere is none", "yes", "yes"),  # split at spaces only: the word is 'No\nthere'
]


@pytest.mark.parametrize(("answer", "pope", "opera"), PARSE_CASES)
def test_parse_answer_both_rules(answer, pope, opera):
    assert parse_answer(answer, "pope") == pope
    assert parse_answer(answer, "opera") == opera


def test_parse_answer_default_is_the_original_rule():
    assert PARSE_RULES == ("pope", "opera")
    assert [parse_answer(a) for a, _, _ in PARSE_CASES] == [pope for _, pope, _ in PARSE_CASES]


def test_parse_answer_unknown_rule_names_the_valid_ones():
    with pytest.raises(ValueError, match="pope, opera"):
        parse_answer("yes", "lmms")


def test_the_rule_changes_the_metrics():
    labels = ["no", "no", "no", "yes"]
    answers = ["There isn't a dog.", "NO", "Yes. No.", "Yes, there is."]
    # pope: yes yes yes yes -> TP=1 FP=3: accuracy 1/4, precision 1/4, recall 1, F1 = 2(1/4)(1)/(5/4) = 2/5
    pope = pope_metrics(labels, [parse_answer(a, "pope") for a in answers])
    assert (pope["accuracy"], pope["precision"], pope["recall"]) == (0.25, 0.25, 1.0)
    assert pope["f1"] == pytest.approx(0.4) and pope["yes_ratio"] == 1.0
    # opera: no no no yes -> TP=1 TN=3: everything 1, yes_ratio 1/4
    opera = pope_metrics(labels, [parse_answer(a, "opera") for a in answers])
    assert (opera["accuracy"], opera["f1"], opera["yes_ratio"]) == (1.0, 1.0, 0.25)


def test_pope_metrics_hand_example():
    labels = ["yes", "yes", "yes", "yes", "no", "no", "no", "no"]
    predictions = ["yes", "yes", "no", "no", "yes", "yes", "yes", "no"]
    # TP=2 FN=2 FP=3 TN=1
    metrics = pope_metrics(labels, predictions)
    assert metrics["accuracy"] == pytest.approx(3 / 8)
    assert metrics["precision"] == pytest.approx(2 / 5)
    assert metrics["recall"] == pytest.approx(2 / 4)
    assert metrics["f1"] == pytest.approx(2 * 0.4 * 0.5 / 0.9)
    assert metrics["yes_ratio"] == pytest.approx(5 / 8)  # ground truth would give 4/8
    assert metrics["n"] == 8


def test_pope_metrics_undefined_are_zero():
    metrics = pope_metrics(["yes", "no"], ["no", "no"])
    assert metrics["precision"] == metrics["recall"] == metrics["f1"] == 0.0
    assert metrics["accuracy"] == 0.5 and metrics["yes_ratio"] == 0.0
    assert pope_metrics([], [])["accuracy"] == 0.0


def test_pope_metrics_length_mismatch():
    with pytest.raises(ValueError):
        pope_metrics(["yes"], [])


# --- POPE's released question files through the loader the prepare stage runs on the downloads ----------------

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures" / "pope"


def released(folder: Path) -> dict[str, list[dict]]:
    return {split: read_pope_file(folder / f"coco_pope_{split}.json") for split in ("random", "popular", "adversarial")}


def check_splits_share_images_and_yes_questions(splits: dict[str, list[dict]]) -> None:
    """POPE's design, in the released files: the same images, and the same 'yes' questions, in every split."""
    images = {s: [q["image_id"] for q in rows] for s, rows in splits.items()}
    yes = {s: [(q["image_id"], q["object"]) for q in rows if q["label"] == "yes"] for s, rows in splits.items()}
    assert images["random"] == images["popular"] == images["adversarial"]
    assert yes["random"] == yes["popular"] == yes["adversarial"]
    for rows in splits.values():
        assert [q["label"] for q in rows] == ["yes", "no"] * (len(rows) // 2)


def test_fixture_cut_of_the_released_files_loads():
    splits = released(FIXTURES)
    assert (FIXTURES / "LICENSE").read_text().startswith("MIT License")
    check_splits_share_images_and_yes_questions(splits)
    first = splits["random"][0]
    assert first == {"question_id": 1, "image_id": 310196, "file_name": "COCO_val2014_000000310196.jpg",
                     "object": "snowboard", "label": "yes", "text": "Is there a snowboard in the image?"}
    assert splits["random"][10]["object"] == "umbrella"  # "Is there an umbrella in the image?"
    for rows in splits.values():
        assert len(rows) == 12 and [q["question_id"] for q in rows] == list(range(1, 13))
        assert sorted({q["image_id"] for q in rows}) == [210789, 310196]
    assert [q["object"] for q in splits["random"] if q["label"] == "yes"] == [
        "snowboard", "person", "skis", "truck", "person", "umbrella"]
    negatives = {s: [q["object"] for q in rows if q["label"] == "no"] for s, rows in splits.items()}
    assert negatives == {
        "random": ["car", "sandwich", "couch", "pizza", "sink", "cell phone"],
        "popular": ["dining table", "car", "chair", "dining table", "car", "chair"],
        "adversarial": ["backpack", "car", "dog", "car", "dining table", "handbag"],
    }


POPE_DIR = os.environ.get("HALLUDPO_POPE_DIR")


@pytest.mark.skipif(not POPE_DIR, reason="HALLUDPO_POPE_DIR (a folder with POPE's coco_pope_<split>.json) not set")
def test_the_released_files_load_whole():
    folder = Path(POPE_DIR)
    entries = yaml.safe_load((ROOT / "configs" / "download" / "default.yaml").read_text())["entries"]
    for split in ("random", "popular", "adversarial"):  # the very files the download stage pins
        digest = hashlib.sha256((folder / f"coco_pope_{split}.json").read_bytes()).hexdigest()
        assert digest == entries[f"pope_coco_{split}"]["sha256"], split
    splits = released(folder)
    check_splits_share_images_and_yes_questions(splits)
    for rows in splits.values():
        assert len(rows) == 3000 and [q["question_id"] for q in rows] == list(range(1, 3001))
        assert len({q["image_id"] for q in rows}) == 500
        assert sum(q["label"] == "yes" for q in rows) == 1500
        assert len({q["object"] for q in rows if q["label"] == "yes"}) == 79
    assert min(q["image_id"] for q in splits["random"]) == 1171
    assert max(q["image_id"] for q in splits["random"]) == 580294
    # distinct absent objects asked about: popular keeps to the few most frequent ones
    assert {s: len({q["object"] for q in rows if q["label"] == "no"}) for s, rows in splits.items()} == {
        "random": 79, "popular": 10, "adversarial": 57}
    # what the evaluate stage asks the model: each distinct (image, question) once over the three splits
    assert len({(q["image_id"], q["text"]) for rows in splits.values() for q in rows}) == 5127
