import json

import pytest

from halludpo.io import InputError
from halludpo.metrics.chair import ChairScorer, coco_synonyms_path, load_synonyms
from halludpo.metrics.object_halbench import (
    GENERATION,
    N_IMAGES,
    PROMPTS,
    assign_prompts,
    read_question_file,
    rotate_prompts,
    score,
)
from halludpo.metrics.text import OfflineTextPipeline


@pytest.fixture(scope="module")
def scorer():
    return ChairScorer(load_synonyms(coco_synonyms_path()), OfflineTextPipeline())


GROUND_TRUTH = {1: {"dog", "person", "frisbee"}, 2: {"cat", "couch"}, 3: {"car"}, 4: {"car"}}
RECORDS = [
    # man(person) frisbee dog dog: nothing hallucinated; 11 space-separated words
    {"image_id": 1, "response": "A man throws a frisbee to his dog. The dog jumps."},
    # cat sofa(couch) remote remote: two hallucinated mentions of one object; 12 words
    {"image_id": 2, "response": "A cat on a sofa next to a remote and a remote."},
    # truck: hallucinated; 7 words
    {"image_id": 3, "response": "A red truck parked on the street."},
    # no COCO object at all: left out of the response-level rate's denominator; 7 words
    {"image_id": 4, "response": "A sunny day with a clear sky."},
]


def test_rates_by_hand(scorer):
    m = score(RECORDS, GROUND_TRUTH, scorer)["metrics"]
    # responses with a hallucination: 2 and 3; responses mentioning an object: 1, 2, 3
    assert m["response_hall"] == pytest.approx(2 / 3)
    assert m["chair_s"] == pytest.approx(2 / 4)
    # mentions 4 + 4 + 1 + 0 = 9, hallucinated 0 + 2 + 1 + 0 = 3
    assert m["mention_hall"] == pytest.approx(3 / 9)
    # recalled {person, frisbee, dog} + {cat, couch} of 3 + 2 + 1 + 1 ground-truth objects
    assert m["recall"] == pytest.approx(5 / 7)
    assert m["avg_words"] == pytest.approx((11 + 12 + 7 + 7) / 4)
    assert (m["n_responses"], m["n_responses_with_objects"], m["n_hallucinated_responses"]) == (4, 3, 2)
    assert (m["n_mentions"], m["n_hallucinated_mentions"]) == (9, 3)
    assert m["text_pipeline"] == "offline-lemminflect"


def test_distinct_words_count_each_object_name_once(scorer):
    m = score(RECORDS, GROUND_TRUTH, scorer, distinct_words=True)["metrics"]
    # man frisbee dog | cat sofa remote | truck: 7 mentions, remote and truck hallucinated
    assert (m["n_mentions"], m["n_hallucinated_mentions"]) == (7, 2)
    assert m["mention_hall"] == pytest.approx(2 / 7)
    assert m["response_hall"] == pytest.approx(2 / 3)
    # a synonym is another name: 'sofa' and 'couch' are two mentions of couch, as two extracted names would be
    two_names = [{"image_id": 2, "response": "A cat on a sofa, a couch and a sofa."}]
    assert score(two_names, GROUND_TRUTH, scorer, distinct_words=True)["metrics"]["n_mentions"] == 3


def test_items_name_the_hallucinated_objects(scorer):
    items = score(RECORDS, GROUND_TRUTH, scorer)["items"]
    assert [item["hallucinated"] for item in items] == [[], ["remote", "remote"], ["truck"], []]
    assert items[3]["response"] == RECORDS[3]["response"]


def test_no_object_anywhere_gives_zero_rates(scorer):
    m = score([RECORDS[3]], GROUND_TRUTH, scorer)["metrics"]
    assert m["response_hall"] == m["mention_hall"] == m["chair_s"] == 0.0
    assert m["n_responses_with_objects"] == 0


def test_missing_ground_truth_names_the_image(scorer):
    with pytest.raises(ValueError, match="image_id 9"):
        score([{"image_id": 9, "response": "A dog."}], GROUND_TRUTH, scorer)


def test_prompts_and_generation():
    assert len(PROMPTS) == 8 == len(set(PROMPTS)) and N_IMAGES == 300
    assert PROMPTS[0] == "Provide a thorough description of the given image."
    assert all(p.endswith(".") and "  " not in p for p in PROMPTS)
    assert GENERATION == {"do_sample": False, "num_beams": 3, "max_new_tokens": 1024}


def test_assign_prompts_is_seeded():
    ids = list(range(100))
    first = assign_prompts(ids, seed=3)
    assert first == assign_prompts(ids, seed=3)
    assert [row["image_id"] for row in first] == ids
    assert {row["prompt"] for row in first} == set(PROMPTS)  # 100 draws of 8: every prompt occurs
    assert first != assign_prompts(ids, seed=4)


def question_line(image_id, question, **extra):
    """A line of RLHF-V's question file (its keys; the inlined image is a stand-in string here)."""
    return json.dumps({"org_idx": extra.pop("org_idx", 0), "image_id": image_id, "question": question,
                       "image": "aGFsbHVkcG8="} | extra)


def test_question_file_reads_image_ids_and_prompts_in_file_order(tmp_path):
    path = tmp_path / "obj_halbench_300_with_image.jsonl"
    path.write_text("\n".join([question_line(42, PROMPTS[1]), question_line("7", PROMPTS[0]), ""]) + "\n")
    assert read_question_file(path) == [{"image_id": 42, "prompt": PROMPTS[1]}, {"image_id": 7, "prompt": PROMPTS[0]}]


@pytest.mark.parametrize("second_line, message", [
    ("{not json", "not a JSON line"),
    (json.dumps({"image_id": 3}), "needs the keys image_id, question"),
    (question_line(True, PROMPTS[0]), "image_id True is not a COCO image id"),
    (question_line("COCO_3", PROMPTS[0]), "is not a COCO image id"),
    (question_line(3, "  "), "the question is empty"),
    (question_line(1, PROMPTS[2]), "image 1 is asked again (first on line 1)"),
])
def test_a_bad_question_line_is_named(tmp_path, second_line, message):
    path = tmp_path / "questions.jsonl"
    path.write_text(question_line(1, PROMPTS[0]) + "\n" + second_line + "\n")
    with pytest.raises(InputError) as error:
        read_question_file(path)
    assert str(error.value).startswith(f"{path}:2: ") and message in str(error.value)


def test_an_empty_question_file_is_refused(tmp_path):
    path = tmp_path / "questions.jsonl"
    path.write_text("\n")
    with pytest.raises(InputError, match="no questions"):
        read_question_file(path)


def test_rotated_prompts_cycle_in_order():
    rows = rotate_prompts(list(range(10, 21)))
    assert [r["prompt"] for r in rows] == [PROMPTS[n % 8] for n in range(11)]
    assert [r["image_id"] for r in rows] == list(range(10, 21))
    assert [r["prompt"] for r in rotate_prompts([5, 6, 7], ("a", "b"))] == ["a", "b", "a"]
