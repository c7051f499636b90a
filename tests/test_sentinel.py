"""SENTINEL sentence-level logic: sampling control, objects, labels, pairs, context growth, and the driver run with a
fake deterministic sampler and fake verifiers."""

import json
import random

import pytest

from halludpo import toyworld
from halludpo.metrics.chair import ChairScorer, coco_synonyms_path, load_synonyms
from halludpo.metrics.text import OfflineTextPipeline
from halludpo.sentinel import (
    CONTINUE_OVER_STOP,
    FACTUAL,
    GROW_ANY,
    GROW_COHERENT,
    GROW_NEW_OBJECTS,
    HALLUCINATED,
    NO_OBJECTS,
    STOP_OVER_HALLUCINATED,
    UNCERTAIN,
    append_sentence,
    build_sentinel_pairs,
    choose_next_sentence,
    clean_samples,
    cross_check,
    cut_at_sentence_end,
    is_finished,
    item_rngs,
    judge_sentence,
    lose_indices,
    object_extractor,
    sample_contexts,
    sentence_label,
    sentence_objects,
    step_pairs,
    stop_pair,
    win_indices,
)

# --------------------------------------------------------------------------------------------------------------
# Sampling control


def test_finish_rule_needs_more_than_half_empty():
    assert not is_finished(["", "", "a dog .", "a cup ."], 4)  # exactly half: not finished
    assert is_finished(["", "", "", "a cup ."], 4)
    assert not is_finished(["", "", "a", "b", "c"], 5)
    assert is_finished(["", " ", "\n", "b", "c"], 5)  # whitespace-only samples are empty
    assert is_finished([""], 1) and not is_finished(["a ."], 1)
    assert not is_finished(["a ."] * 10, 10)


def test_clean_samples_strips_drops_empty_and_duplicates_keeping_order():
    samples = [" a dog .", "", "a cup .", "a dog .", "  ", "a bowl . ", "a cup ."]
    assert clean_samples(samples) == ["a dog .", "a cup .", "a bowl ."]
    assert clean_samples([]) == [] and clean_samples(["", " "]) == []


def test_cut_at_sentence_end_and_append_sentence():
    assert cut_at_sentence_end(" a dog . a cup .") == " a dog ."
    assert cut_at_sentence_end("is it a dog? yes.") == "is it a dog?"
    assert cut_at_sentence_end("wow! a dog.") == "wow!"
    assert cut_at_sentence_end("no end") == "no end"
    assert append_sentence("", "a dog .") == "a dog ."
    assert append_sentence("a dog .", "a cup .") == "a dog . a cup ."


# --------------------------------------------------------------------------------------------------------------
# Objects through the CHAIR pipeline


@pytest.fixture(scope="module")
def toy_scorer(tmp_path_factory):
    path = tmp_path_factory.mktemp("vocab") / "vocabulary.txt"
    path.write_text(toyworld.vocabulary_text())
    return ChairScorer.for_vocabulary(load_synonyms(path), OfflineTextPipeline())  # as data.compounds=vocabulary


def test_sentence_objects_use_chair_synonyms_compounds_and_lemmas(toy_scorer):
    assert sentence_objects(toy_scorer, "there is a puppy next to a dog .") == ["dog"]  # synonym, deduplicated
    assert sentence_objects(toy_scorer, "two traffic lights and a bike .") == ["traffic light", "bicycle"]
    assert sentence_objects(toy_scorer, "the knives are near the forks .") == ["knife", "fork"]
    assert sentence_objects(toy_scorer, "this is a park scene .") == []
    assert object_extractor(toy_scorer)("a mug and a cup .") == ["cup"]


def test_coco_80_scorer_with_chair_compounds():
    scorer = ChairScorer(load_synonyms(coco_synonyms_path()), OfflineTextPipeline())  # as data.compounds=coco
    assert sentence_objects(scorer, "A man rides a motorbike past a hot dog stand, men watch.") == [
        "person", "motorcycle", "hot dog"]


# --------------------------------------------------------------------------------------------------------------
# Verification and labels


@pytest.mark.parametrize("a, b, verdict", [
    (True, True, FACTUAL), (False, False, HALLUCINATED), (True, False, UNCERTAIN), (False, True, UNCERTAIN)])
def test_cross_check_table(a, b, verdict):
    assert cross_check(a, b) == verdict


@pytest.mark.parametrize("verdicts, label", [
    ([], NO_OBJECTS),
    ([FACTUAL], FACTUAL),
    ([FACTUAL, FACTUAL], FACTUAL),
    ([HALLUCINATED], HALLUCINATED),
    ([FACTUAL, HALLUCINATED], HALLUCINATED),
    ([UNCERTAIN, HALLUCINATED], HALLUCINATED),  # one hallucinated object is enough
    ([UNCERTAIN], UNCERTAIN),
    ([FACTUAL, UNCERTAIN], UNCERTAIN),  # factual needs no uncertain object
])
def test_sentence_label_table(verdicts, label):
    assert sentence_label(verdicts) == label


def test_judge_sentence_keeps_decisions_and_verdicts():
    judged = judge_sentence("a dog and a kite .", ["dog", "kite"], {"dog": (True, True), "kite": (True, False)})
    assert judged == {"text": "a dog and a kite .", "objects": ["dog", "kite"],
                      "decisions": {"dog": [True, True], "kite": [True, False]},
                      "verdicts": {"dog": FACTUAL, "kite": UNCERTAIN}, "label": UNCERTAIN}


# --------------------------------------------------------------------------------------------------------------
# Pairs and context growth


def sent(label, *objects):
    return {"text": f"{label} {' '.join(objects)} .", "objects": list(objects), "label": label,
            "verdicts": {o: (HALLUCINATED if label == HALLUCINATED else FACTUAL) for o in objects}}


def test_win_needs_factual_and_context_coherent_lose_needs_hallucinated():
    sentences = [sent(FACTUAL, "dog"), sent(FACTUAL, "kite"), sent(HALLUCINATED, "frisbee"),
                 sent(UNCERTAIN, "dog"), sent(FACTUAL, "bench", "dog"), sent(HALLUCINATED, "dog", "bird"),
                 sent(NO_OBJECTS)]
    assert win_indices(sentences, {"dog"}) == [0, 4]
    assert lose_indices(sentences) == [2, 5]
    assert step_pairs(sentences, {"dog"}) == [(0, 2), (4, 5)]
    assert step_pairs(sentences, {"bench"}) == [(4, 2)]  # zip: min(#win, #lose) pairs
    assert step_pairs(sentences, set()) == []  # empty context: no pair at the first sentence


def test_context_growth_order_new_objects_then_coherent_then_any():
    context = {"dog"}
    with_new = [sent(HALLUCINATED, "kite"), sent(FACTUAL, "dog"), sent(FACTUAL, "dog", "frisbee")]
    assert choose_next_sentence(with_new, context, random.Random(0)) == (2, GROW_NEW_OBJECTS)
    coherent_only = [sent(HALLUCINATED, "kite"), sent(UNCERTAIN, "bench"), sent(FACTUAL, "dog")]
    assert choose_next_sentence(coherent_only, context, random.Random(0)) == (2, GROW_COHERENT)
    no_factual = [sent(HALLUCINATED, "kite"), sent(UNCERTAIN, "bench"), sent(NO_OBJECTS)]
    picks = {choose_next_sentence(no_factual, context, random.Random(s)) for s in range(30)}
    assert picks == {(0, GROW_ANY), (1, GROW_ANY), (2, GROW_ANY)}
    assert choose_next_sentence([], context, random.Random(0)) is None


def test_context_growth_picks_within_the_group_with_the_seeded_rng():
    sentences = [sent(FACTUAL, "dog"), sent(FACTUAL, "kite"), sent(FACTUAL, "bench"), sent(FACTUAL, "bird")]
    picks = [choose_next_sentence(sentences, {"dog"}, random.Random(s))[0] for s in range(40)]
    assert set(picks) == {1, 2, 3}  # never the sentence without a new object
    assert picks == [choose_next_sentence(sentences, {"dog"}, random.Random(s))[0] for s in range(40)]


def test_item_rngs_depend_on_seed_and_image_id_not_on_position():
    a, b = item_rngs([{"image_id": 1}, {"image_id": 2}], seed=0), item_rngs([{"image_id": 2}, {"image_id": 1}], 0)
    assert a[0].random() == b[1].random()
    c = item_rngs([{"image_id": 1}, {"image_id": 1}], 0)
    assert c[0].random() != c[1].random()


# --------------------------------------------------------------------------------------------------------------
# The driver with a fake sampler and fake verifiers

N = 4
SCRIPT = {
    # image 1: finishes at step 2 (3 of 4 samples empty)
    1: [
        ["there is a dog .", "there is a dog .", "there is a kite .", ""],
        ["a dog is on the left .", "there is a frisbee near the dog .", "there is a kite near the dog .",
         "a bench is here ."],
        ["", "", "", "there is a bench ."],
    ],
    # image 2: finishes at once
    2: [["", "", "", "a dog ."]],
}
# image 3 never finishes: it describes a new bird every step.
# What each fake verifier sees in each image: A and B agree except on the bench of image 1.
SEEN = {1: ({"dog", "frisbee", "bench"}, {"dog", "frisbee"}), 2: ({"dog"}, {"dog"}), 3: ({"bird"}, {"bird"})}


def fake_sampler_for_tests(calls):
    """A FAKE sampler for tests, standing in for the model: scripted samples chosen by (image_id, number of
    sentences in the context); logs every batch it receives."""

    def sample(batch):
        calls.append([(item["image_id"], context) for item, context in batch])
        out = []
        for item, context in batch:
            k = context.count(".")
            if item["image_id"] == 3:
                out.append([f"there is bird number {k} .", "a bird .", "a bird .", "" if k % 2 else "a dog ."])
            else:
                out.append(list(SCRIPT[item["image_id"]][k]))
        return out

    return sample


def fake_decide_for_tests(asked):
    """FAKE pair of verifiers: decisions from SEEN; logs what is asked."""

    def decide(batch):
        asked.append([(item["image_id"], list(objects)) for item, objects in batch])
        return [{o: (o in SEEN[item["image_id"]][0], o in SEEN[item["image_id"]][1]) for o in objects}
                for item, objects in batch]

    return decide


ITEMS = [{"image_id": i, "image_path": f"img_{i}.png", "prompt": "describe this image .", "model": "toy",
          "round": 0} for i in (1, 2, 3)]


def run_driver(toy_scorer, max_steps=5, batch_size=None, seed=0, all_objects=None):
    calls, asked = [], []
    trajectories = sample_contexts(fake_sampler_for_tests(calls), ITEMS, N, max_steps, object_extractor(toy_scorer),
                                   fake_decide_for_tests(asked), seed=seed, batch_size=batch_size,
                                   all_objects=all_objects)
    return trajectories, calls, asked


def test_driver_batches_active_items_and_honours_the_step_cap(toy_scorer):
    trajectories, calls, _ = run_driver(toy_scorer, max_steps=5)
    # step 0: all three; image 2 finishes; steps 1-2: images 1 and 3; image 1 finishes; steps 3-4: image 3 only
    assert [[image_id for image_id, _ in batch] for batch in calls] == [[1, 2, 3], [1, 3], [1, 3], [3], [3]]
    one, two, three = trajectories
    assert (one["stopped"], len(one["steps"])) == ("finished", 2)
    assert (two["stopped"], len(two["steps"])) == ("finished", 0)
    assert (three["stopped"], len(three["steps"])) == ("max_steps", 5)  # sampled exactly max_steps times
    assert three["description"].count(".") == 5
    json.dumps(trajectories)  # plain JSON


def test_driver_chunks_batches_and_does_not_depend_on_batching(toy_scorer):
    whole, _, _ = run_driver(toy_scorer)
    chunked, calls, _ = run_driver(toy_scorer, batch_size=2)
    assert [len(batch) for batch in calls] == [2, 1, 2, 2, 1, 1]
    assert chunked == whole


def test_driver_labels_grows_context_and_asks_each_object_once(toy_scorer):
    trajectories, _, asked = run_driver(toy_scorer, max_steps=5)
    step0, step1 = trajectories[0]["steps"]
    assert [s["text"] for s in step0["sentences"]] == ["there is a dog .", "there is a kite ."]  # cleaned
    assert [s["label"] for s in step0["sentences"]] == [FACTUAL, HALLUCINATED]
    assert (step0["appended"], step0["growth"], step0["context"]) == (0, GROW_NEW_OBJECTS, "")
    assert step1["context"] == "there is a dog ." and step1["context_objects"] == ["dog"]
    assert [s["label"] for s in step1["sentences"]] == [FACTUAL, FACTUAL, HALLUCINATED, UNCERTAIN]
    assert step1["sentences"][3]["verdicts"] == {"bench": UNCERTAIN}
    assert (step1["appended"], step1["growth"]) == (1, GROW_NEW_OBJECTS)  # the frisbee sentence
    assert trajectories[0]["description"] == "there is a dog . there is a frisbee near the dog ."
    image1_asks = [objects for batch in asked for image_id, objects in batch if image_id == 1]
    assert image1_asks == [["dog", "kite"], ["frisbee", "bench"]]  # decisions are cached per image


def test_driver_rejects_a_sampler_returning_the_wrong_number_of_samples(toy_scorer):
    with pytest.raises(ValueError, match="expected n=4"):
        sample_contexts(lambda batch: [["a dog ."]] * len(batch), ITEMS, N, 2, object_extractor(toy_scorer),
                        fake_decide_for_tests([]), seed=0)


def test_pairs_follow_the_contract(toy_scorer):
    trajectories, _, _ = run_driver(toy_scorer, max_steps=5)
    rows, stats = build_sentinel_pairs(trajectories)
    image1 = [r for r in rows if r["image_id"] == 1]
    assert len(image1) == 1  # step 0 has no context, step 1 zips 2 wins with 1 lose
    row = image1[0]
    assert set(row) == {"image_id", "image_path", "prompt", "context", "chosen", "rejected", "method", "meta"}
    assert (row["image_path"], row["prompt"], row["method"]) == ("img_1.png", "describe this image .", "sentinel")
    assert (row["context"], row["chosen"], row["rejected"]) == (
        "there is a dog .", "a dog is on the left .", "there is a kite near the dog .")
    meta = row["meta"]
    assert meta["step"] == 1 and meta["is_last_sent"] is True and meta["type"] == "context_coherent"
    assert meta["chosen_objects"] == ["dog"] and meta["rejected_hallucinated_objects"] == ["kite"]
    assert meta["labels"] == [FACTUAL, FACTUAL, HALLUCINATED, UNCERTAIN]
    assert (meta["generator_model"], meta["round"]) == ("toy", 0)
    # image 3: "there is bird number k ." and "a bird ." are factual and coherent from step 1 on, "a dog ." of the
    # even steps is hallucinated -> one pair at steps 2 and 4; never is_last_sent (cut by the cap)
    image3 = [r for r in rows if r["image_id"] == 3]
    assert [r["meta"]["step"] for r in image3] == [2, 4]
    assert not any(r["meta"]["is_last_sent"] for r in image3)
    assert stats["pairs"] == len(rows) == 3 and stats["finished"] == 2 and stats["capped"] == 1
    assert stats["steps"] == 7 and stats["steps_with_pairs"] == 3
    json.dumps(rows)


def test_win_rules_new_objects_pairs_from_the_first_object_sentence():
    sentences = [
        {"label": FACTUAL, "objects": ["dog"]},
        {"label": HALLUCINATED, "objects": ["kite"]},
        {"label": FACTUAL, "objects": ["bench"]},
        {"label": FACTUAL, "objects": ["dog", "bench"]},
        {"label": HALLUCINATED, "objects": ["cup"]},
    ]
    assert win_indices(sentences, {"dog"}) == [0, 3]                      # the paper's: shares an object
    assert win_indices(sentences, {"dog"}, "new_objects") == [2, 3]       # names an object the context lacks
    assert win_indices(sentences, {"dog"}, "factual") == [0, 2, 3]
    assert step_pairs(sentences, set(), "new_objects") == [(0, 1), (2, 4)]  # empty context: pairs all the same
    assert step_pairs(sentences, set()) == []
    with pytest.raises(ValueError, match="new_objects"):
        win_indices(sentences, set(), "newest")


# --------------------------------------------------------------------------------------------------------------
# Stop pairs (extension, method.stop_pairs)


def step_of(context_objects, sentences, n_empty):
    return {"step": 3, "context": "there is a dog .", "context_objects": context_objects, "n_samples": 4,
            "n_empty": n_empty, "sentences": sentences}


def test_stop_pair_ends_the_answer_only_when_neither_verifier_sees_anything_unnamed():
    sentences = [sent(FACTUAL, "dog"), sent(HALLUCINATED, "kite"), sent(HALLUCINATED, "cup")]
    decisions = {"dog": (True, True), "kite": (False, False), "cup": (False, False), "bench": (False, False)}
    assert stop_pair(step_of(["dog"], sentences, 0), decisions) == (STOP_OVER_HALLUCINATED, 1)  # first in order
    assert stop_pair(step_of(["dog"], sentences[:1], 2), decisions) is None  # nothing hallucinated to reject
    for uncertain in [(True, False), (False, True)]:  # one verifier sees the bench: maybe there is more to say
        assert stop_pair(step_of(["dog"], sentences, 3), decisions | {"bench": uncertain}) is None


def test_stop_pair_continues_when_both_verifiers_see_an_unnamed_object_and_some_samples_stopped():
    decisions = {"dog": (True, True), "bench": (True, True), "kite": (False, False)}
    sentences = [sent(HALLUCINATED, "kite"), sent(FACTUAL, "dog"), sent(FACTUAL, "bench"), sent(FACTUAL, "bench")]
    assert stop_pair(step_of(["dog"], sentences, 1), decisions) == (CONTINUE_OVER_STOP, 2)  # names the bench
    assert stop_pair(step_of(["dog"], sentences, 0), decisions) is None  # no sample stopped: nothing to reject
    assert stop_pair(step_of(["dog"], sentences[:2], 1), decisions) is None  # no sentence names the bench
    assert stop_pair(step_of(["dog", "bench"], sentences, 2), decisions) == (STOP_OVER_HALLUCINATED, 0)


def test_driver_decides_every_object_up_front_and_records_the_finishing_step(toy_scorer):
    everything = ["bench", "bird", "dog", "frisbee", "kite"]
    trajectories, _, asked = run_driver(toy_scorer, max_steps=5, all_objects=everything)
    assert asked[0] == [(i, everything) for i in (1, 2, 3)] and len(asked) == 1  # nothing left to ask later
    one, two, three = trajectories
    assert one["decisions"] == {"bench": [True, False], "bird": [False, False], "dog": [True, True],
                                "frisbee": [True, True], "kite": [False, False]}
    assert one["final"]["step"] == 2 and one["final"]["n_empty"] == 3
    assert [s["text"] for s in one["final"]["sentences"]] == ["there is a bench ."]
    assert "appended" not in one["final"] and one["description"].count(".") == 2  # nothing appended
    assert two["final"]["context"] == "" and [s["label"] for s in two["final"]["sentences"]] == [FACTUAL]
    assert three["final"] is None  # capped, never finished
    assert [s["n_empty"] for s in one["steps"]] == [1, 0]
    without, _, _ = run_driver(toy_scorer, max_steps=5)
    assert [t["description"] for t in without] == [t["description"] for t in trajectories]  # same growth


def test_stop_pairs_rows_and_stats(toy_scorer):
    trajectories, _, _ = run_driver(toy_scorer, max_steps=5, all_objects=["bench", "bird", "dog", "frisbee", "kite"])
    plain, _ = build_sentinel_pairs(trajectories)
    rows, stats = build_sentinel_pairs(trajectories, stop_pairs=True)
    assert all(r in rows for r in plain)
    stops = [r for r in rows if r["meta"]["type"] in (STOP_OVER_HALLUCINATED, CONTINUE_OVER_STOP)]
    assert len(rows) == len(plain) + len(stops)
    assert stats["stop_pairs"] == {STOP_OVER_HALLUCINATED: 2, CONTINUE_OVER_STOP: 2}
    as_tuples = [(r["image_id"], r["meta"]["step"], r["meta"]["type"], r["context"], r["chosen"], r["rejected"])
                 for r in stops]
    assert as_tuples == [
        # image 1, step 0: both see a dog and a frisbee, one of 4 samples stopped
        (1, 0, CONTINUE_OVER_STOP, "", "there is a dog .", ""),
        # image 1's final step leaves the bench, which only verifier A sees: no pair; image 2 stopped at once
        (2, 0, CONTINUE_OVER_STOP, "", "a dog .", ""),
        # image 3: once the bird is named nothing is left, and the even steps' dog is hallucinated
        (3, 2, STOP_OVER_HALLUCINATED, trajectories[2]["steps"][2]["context"], "", "a dog ."),
        (3, 4, STOP_OVER_HALLUCINATED, trajectories[2]["steps"][4]["context"], "", "a dog ."),
    ]
    assert all(r["meta"]["is_last_sent"] is False for r in stops)
    assert stops[2]["meta"]["rejected_hallucinated_objects"] == ["dog"] and stops[2]["meta"]["chosen_objects"] == []
    json.dumps(rows)
