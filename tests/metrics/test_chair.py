import json

import pytest

from halludpo.metrics.chair import (
    COCO_COMPOUNDS,
    ChairScorer,
    coco_synonyms_path,
    ground_truth_from_coco,
    load_synonyms,
    merge_pairs,
)
from halludpo.metrics.text import OfflineTextPipeline


@pytest.fixture(scope="module")
def pipeline():
    return OfflineTextPipeline()


@pytest.fixture(scope="module")
def synonyms():
    return load_synonyms(coco_synonyms_path())


@pytest.fixture(scope="module")
def scorer(synonyms, pipeline):
    return ChairScorer(synonyms, pipeline)


# --- synonym table ---------------------------------------------------------


def test_packaged_table_has_80_categories(synonyms):
    assert len(set(synonyms.values())) == 80
    assert synonyms["motorcycle"] == "motorcycle"
    assert synonyms["puppy"] == "dog"
    assert synonyms["bow tie"] == "tie"


def test_two_space_quirk_is_reproduced(synonyms):
    # "scooter,  motor bike" split on ", " leaves a leading space.
    assert synonyms[" motor bike"] == "motorcycle"
    assert "motor bike" not in synonyms
    assert synonyms[" cheesecake"] == "cake"
    assert "cheesecake" not in synonyms
    # trailing spaces at line end are stripped with the line: "bison " -> "bison"
    assert synonyms["bison"] == "cow"


def test_compound_list_is_the_spec_list():
    assert len(COCO_COMPOUNDS) == 27
    assert COCO_COMPOUNDS[0] == "motor bike" and COCO_COMPOUNDS[-1] == "train track"


# --- objects ---------------------------------------------------------------


def test_compounds_map_to_one_category(scorer):
    assert scorer.objects("A traffic light, a hot dog and a Teddy Bear.") == [
        ("traffic light", "traffic light"),
        ("hot dog", "hot dog"),
        ("teddy bear", "teddy bear"),
    ]


def test_compound_needs_adjacent_words(scorer):
    # the comma is a token, so 'hot' and 'dog' are not adjacent
    assert scorer.objects("It is hot, dog") == [("dog", "dog")]


def test_merging_is_left_to_right(scorer):
    # 'passenger train' is merged first, so 'train track' is never formed
    assert scorer.objects("a passenger train track") == [("train", "train")]
    assert merge_pairs(["a", "b", "c"], {"a b": "ab", "b c": "bc"}) == ["ab", "c"]


def test_toilet_seat_is_toilet(scorer):
    assert scorer.objects("a toilet seat") == [("toilet", "toilet")]


def test_seat_dropped_when_toilet_present(scorer):
    assert scorer.objects("a seat next to the toilet, another seat") == [("toilet", "toilet")]
    assert scorer.objects("a seat") == [("seat", "chair")]


def test_baby_and_adult_animals(scorer):
    assert scorer.objects("a baby dog") == [("dog", "dog")]
    assert scorer.objects("an adult cat") == [("cat", "cat")]
    # without an animal after it, 'baby' is a person
    assert scorer.objects("a baby") == [("baby", "person")]


def test_passenger_vehicles(scorer):
    assert scorer.objects("a passenger train") == [("train", "train")]
    assert scorer.objects("a passenger jet") == [("jet", "airplane")]
    assert scorer.objects("a passenger") == [("passenger", "person")]


def test_bow_tie_is_tie(scorer):
    assert scorer.objects("a man in a bow tie") == [("man", "person"), ("tie", "tie")]


def test_home_plate_and_train_track_are_dropped(scorer):
    assert scorer.objects("a player at home plate near the train track") == [
        ("player", "person")
    ]


def test_motor_bike_quirk(scorer):
    # 'motor bike' is merged as a compound, but the table only has ' motor bike'
    assert scorer.objects("a motor bike") == []
    assert scorer.objects("a motorbike") == [("motorbike", "motorcycle")]
    assert scorer.objects("a cheesecake and a cupcake") == [("cupcake", "cake")]


def test_three_word_compound_never_matches(scorer):
    # 'stove top oven' is in the list but only pairs are merged
    assert scorer.objects("a stove top oven") == [("stove", "oven"), ("oven", "oven")]


def test_repeats_and_plurals(scorer):
    assert scorer.objects("Two dogs and another dog.") == [("dog", "dog"), ("dog", "dog")]


def test_for_vocabulary_uses_multiword_synonyms(tmp_path, pipeline):
    table = tmp_path / "toy.txt"
    table.write_text("red cube, crimson block, cube\nblue ball, ball, sphere\n")
    synonyms = load_synonyms(table)
    toy = ChairScorer.for_vocabulary(synonyms, pipeline)
    assert sorted(toy.compounds) == ["blue ball", "crimson block", "red cube"]
    assert toy.objects("A crimson block beside a blue ball and two spheres.") == [
        ("crimson block", "red cube"),
        ("blue ball", "blue ball"),
        ("sphere", "blue ball"),
    ]
    # with the COCO compounds 'crimson block' is not merged and not found
    assert ChairScorer(synonyms, pipeline).objects("a crimson block") == []


# --- score -----------------------------------------------------------------

GROUND_TRUTH = {
    1: {"dog", "person", "frisbee", "bench"},
    2: {"cat", "couch"},
    3: {"car"},
}
RECORDS = [
    # person, frisbee, dog, dog -> 0 hallucinated; 13 tokens:
    # a man throws a frisbee to his dog . the dog jumps .
    {"image_id": 1, "response": "A man throws a frisbee to his dog. The dog jumps."},
    # cat, couch, remote, remote -> 2 hallucinated; 14 tokens:
    # a cat sleeps on a sofa next to a remote and a remote .
    {"image_id": 2, "response": "A cat sleeps on a sofa next to a remote and a remote."},
    # truck -> 1 hallucinated; 8 tokens: a red truck parked on the street .
    {"image_id": 3, "response": "A red truck parked on the street."},
]
# CHAIR_s = 2 responses with a hallucination / 3            = 2/3
# CHAIR_i = (0 + 2 + 1) hallucinated / (4 + 4 + 1) mentions = 3/9
# recall  = (|{person,frisbee,dog}| + |{cat,couch}| + 0) / (4 + 2 + 1) = 5/7
# len     = (13 + 14 + 8) / 3 = 35/3


def test_score_hand_example(scorer):
    result = scorer.score(RECORDS, GROUND_TRUTH)
    assert result["chair_s"] == pytest.approx(2 / 3)
    assert result["chair_i"] == pytest.approx(3 / 9)
    assert result["recall"] == pytest.approx(5 / 7)
    assert result["len"] == pytest.approx(35 / 3)
    assert result["n_responses"] == 3
    assert result["n_mentions"] == 9
    assert result["n_hallucinated_mentions"] == 3
    assert result["text_pipeline"] == "offline-lemminflect"


def test_score_items(scorer):
    items = scorer.score(RECORDS, GROUND_TRUTH)["items"]
    assert items[0] == {
        "image_id": 1,
        "mentioned": ["person", "frisbee", "dog", "dog"],
        "hallucinated": [],
        "gt": ["bench", "dog", "frisbee", "person"],
        "recall_hits": ["dog", "frisbee", "person"],
    }
    assert items[1]["hallucinated"] == ["remote", "remote"]
    assert items[2]["mentioned"] == ["truck"] and items[2]["recall_hits"] == []


def test_score_without_mentions_is_zero(scorer):
    result = scorer.score([{"image_id": 3, "response": "Nothing here."}], GROUND_TRUTH)
    assert result["chair_i"] == 0.0 and result["chair_s"] == 0.0 and result["recall"] == 0.0


def test_score_missing_ground_truth_names_image(scorer):
    with pytest.raises(ValueError, match="42"):
        scorer.score([{"image_id": 42, "response": "a dog"}], GROUND_TRUTH)


# --- ground truth from COCO files ------------------------------------------


def _write_json(path, data):
    path.write_text(json.dumps(data))
    return path


@pytest.fixture
def tiny_coco(tmp_path):
    images = [{"id": i, "file_name": f"{i}.jpg", "width": 10, "height": 10} for i in (1, 2, 3)]
    instances = {
        "images": images,
        "categories": [
            {"id": 1, "name": "person"},
            {"id": 18, "name": "dog"},
            {"id": 63, "name": "sofa"},  # not the CHAIR name: maps to 'couch'
        ],
        "annotations": [
            {"id": n + 1, "image_id": image_id, "category_id": category_id,
             "bbox": [0, 0, 1, 1], "area": 1, "iscrowd": 0}
            for n, (image_id, category_id) in enumerate([(1, 1), (1, 18), (1, 18), (2, 63)])
        ],
    }  # fmt: skip
    captions = {
        "images": images,
        "annotations": [
            {"id": 1, "image_id": 1, "caption": "A man and his puppy."},
            {"id": 2, "image_id": 2, "caption": "A woman on a scooter."},
            {"id": 3, "image_id": 2, "caption": "A bus behind the motorbike."},
            {"id": 4, "image_id": 3, "caption": "An empty room with a hot dog on a table."},
        ],
    }
    return _write_json(tmp_path / "instances.json", instances), _write_json(
        tmp_path / "captions.json", captions
    )


def test_ground_truth_instances_only(tiny_coco, scorer):
    instances, _ = tiny_coco
    assert ground_truth_from_coco(instances, scorer=scorer) == {
        1: {"person", "dog"},
        2: {"couch"},
        3: set(),  # no annotations, still present
    }


def test_ground_truth_union_with_captions(tiny_coco, scorer):
    instances, captions = tiny_coco
    assert ground_truth_from_coco(instances, captions, scorer=scorer) == {
        1: {"person", "dog"},
        2: {"couch", "person", "motorcycle", "bus"},
        3: {"hot dog", "dining table"},
    }


def test_ground_truth_default_scorer(tiny_coco):
    instances, captions = tiny_coco
    truth = ground_truth_from_coco(instances, captions)
    assert truth[2] == {"couch", "person", "motorcycle", "bus"}


# --- by sentence position --------------------------------------------------


def test_by_sentence_counts_mentions_and_hallucinations_per_position(scorer):
    records = [
        {"image_id": 1, "response": "A dog on a bed. There is also a cat. A laptop is nearby."},
        {"image_id": 2, "response": "A cat sits. A pizza."},
    ]
    gt = {1: {"dog", "bed", "cat"}, 2: {"cat", "dog"}}
    rows = scorer.by_sentence(records, gt)
    assert [r["sentence"] for r in rows] == [0, 1, 2]
    assert [r["responses"] for r in rows] == [2, 2, 1]
    assert [r["mentions"] for r in rows] == [3, 2, 1]        # dog, bed, cat | cat, pizza | laptop
    assert [r["hallucinated"] for r in rows] == [0, 1, 1]    # pizza; laptop
    assert [r["chair_i"] for r in rows] == [0.0, 0.5, 1.0]
    whole = scorer.score(records, gt)
    assert sum(r["mentions"] for r in rows) == whole["n_mentions"]
    assert sum(r["hallucinated"] for r in rows) == whole["n_hallucinated_mentions"]
