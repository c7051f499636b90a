"""Object verifiers: two small learned models beat chance on held-out toy images, disagree now and then, and round-trip
through save/load; the annotation oracle is exact."""

import numpy as np
import pytest
import torch

from halludpo import toyworld
from halludpo.data import render_toy_data
from halludpo.verifiers import (
    AnnotationOracleVerifier,
    colour_features,
    evaluate_verifier,
    load,
    load_labelled_split,
    make_decide_fn,
    predict_present,
    presence_probabilities,
    presence_scores,
    save,
    train_verifier,
)
from tests.conftest import TINY_WORLD


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """100 training and 60 held-out 32-px toy images."""
    out = tmp_path_factory.mktemp("verifier_world") / "toy"
    render_toy_data(out, {"train": 100, "eval": 60}, seed=0, world=TINY_WORLD, progress=False)
    return out


def split(world, name):
    return world / name / "images", world / name / "instances.json"


@pytest.fixture(scope="module")
def trained(world):
    return {kind: train_verifier(kind, *split(world, "train"), seed=0) for kind in ("cnn", "features", "mlp")}


@pytest.fixture(scope="module")
def held_out(world):
    return load_labelled_split(*split(world, "eval"))


def test_split_tensors_match_the_annotations(held_out):
    assert held_out["images"].shape == (60, 3, 32, 32)
    assert held_out["categories"] == toyworld.categories()
    assert 0.0 <= held_out["images"].min() and held_out["images"].max() <= 1.0
    per_image = held_out["targets"].sum(1)
    assert per_image.min() >= 1 and per_image.max() <= TINY_WORLD["max_objects"]


@pytest.mark.parametrize("kind", ["cnn", "features", "mlp"])
def test_trained_verifiers_beat_chance_on_held_out_images(trained, world, kind):
    # Most (image, category) cells are "absent", so plain accuracy is high for any model; balanced accuracy
    # (TPR + TNR) / 2 is 0.5 for chance and for "always absent".
    scores = evaluate_verifier(trained[kind], *split(world, "eval"))
    assert scores["balanced_accuracy"] > 0.8, scores
    assert scores["accuracy"] > 0.85, scores


def test_the_two_verifiers_disagree_on_some_objects(trained, held_out):
    cats = held_out["categories"]
    a = predict_present(trained["cnn"], held_out["images"], cats)
    b = predict_present(trained["features"], held_out["images"], cats)
    disagree = (a != b).mean()
    assert 0.0 < disagree < 0.2
    truth = held_out["targets"].numpy().astype(bool)
    both_wrong = ((a != truth) & (b != truth)).sum()
    assert both_wrong < min((a != truth).sum(), (b != truth).sum())  # cross-checking catches some errors


def test_save_load_round_trip_gives_identical_predictions(trained, held_out, tmp_path):
    for kind, verifier in trained.items():
        save(verifier, tmp_path / kind)
        assert sorted(p.name for p in (tmp_path / kind).iterdir()) == ["verifier.json", "verifier.safetensors"]
        again = load(tmp_path / kind)
        assert (again.kind, again.categories, again.image_size) == (kind, verifier.categories, 32)
        assert torch.equal(presence_probabilities(again, held_out["images"]),
                           presence_probabilities(verifier, held_out["images"]))
        cats = ["dog", "fork", "car"]
        assert np.array_equal(predict_present(again, held_out["paths"], cats, 0.3),
                              predict_present(verifier, held_out["paths"], cats, 0.3))


def test_training_is_deterministic_for_a_seed(world):
    one = train_verifier("features", *split(world, "train"), seed=3, epochs=5)
    two = train_verifier("features", *split(world, "train"), seed=3, epochs=5)
    for key, value in one.net.state_dict().items():
        assert torch.equal(value, two.net.state_dict()[key])


def test_paths_and_tensors_give_the_same_predictions_and_columns_follow_the_request(trained, held_out):
    verifier = trained["cnn"]
    from_paths = predict_present(verifier, held_out["paths"][:5], ["knife", "fork"])
    from_tensor = predict_present(verifier, held_out["images"][:5], ["fork", "knife"])
    assert from_paths.shape == (5, 2) and from_paths.dtype == bool
    assert np.array_equal(from_paths, from_tensor[:, ::-1])
    with pytest.raises(KeyError, match="giraffe"):
        predict_present(verifier, held_out["images"][:1], ["giraffe"])


def test_annotation_oracle_reads_the_ground_truth(world, held_out):
    oracle = AnnotationOracleVerifier(world / "eval" / "instances.json")
    present = predict_present(oracle, held_out["paths"], held_out["categories"])
    assert np.array_equal(present, held_out["targets"].numpy().astype(bool))
    with pytest.raises(KeyError, match="not an image"):
        oracle.present(["elsewhere.png"], ["dog"])


def test_decide_fn_asks_both_verifiers_per_item(trained, world, held_out):
    oracle = AnnotationOracleVerifier(world / "eval" / "instances.json")
    items = [{"image_id": i, "image_path": p} for i, p in zip(held_out["image_ids"][:3], held_out["paths"][:3])]
    batch = [(items[0], ["dog", "fork"]), (items[1], []), (items[2], ["car"])]
    decisions = make_decide_fn(oracle, trained["features"])(batch)
    assert [sorted(d) for d in decisions] == [["dog", "fork"], [], ["car"]]
    truth = held_out["targets"].numpy().astype(bool)
    cats = held_out["categories"]
    assert decisions[0]["dog"][0] == truth[0, cats.index("dog")]
    assert decisions[2]["car"][0] == truth[2, cats.index("car")]
    assert all(isinstance(x, bool) for d in decisions for pair in d.values() for x in pair)
    assert make_decide_fn(oracle, oracle)([]) == []


def test_presence_scores_hand_computed():
    predicted = np.array([[1, 0, 0], [1, 1, 0]], bool)
    truth = np.array([[1, 0, 1], [0, 1, 0]], bool)
    scores = presence_scores(predicted, truth)  # tp 2, tn 2, fp 1, fn 1
    assert scores == {"accuracy": 4 / 6, "balanced_accuracy": (2 / 3 + 2 / 3) / 2, "precision": 2 / 3,
                      "recall": 2 / 3}


def test_colour_features_histogram_sums_to_one():
    images = torch.rand(2, 3, 16, 16)
    feats = colour_features(images, bins=4, grid=8)
    assert feats.shape == (2, 64 + 3 * 64)
    assert torch.allclose(feats[:, :64].sum(1), torch.ones(2))
    white = colour_features(torch.ones(1, 3, 4, 4), bins=4, grid=2)
    assert white[0, 63] == 1.0  # every channel in the top cell -> the last joint cell


def test_sentinel_driver_runs_on_real_verifiers(trained, world, held_out, tmp_path):
    from halludpo.metrics.chair import ChairScorer, load_synonyms
    from halludpo.metrics.text import OfflineTextPipeline
    from halludpo.sentinel import build_sentinel_pairs, object_extractor, sample_contexts

    (tmp_path / "vocabulary.txt").write_text(toyworld.vocabulary_text())
    scorer = ChairScorer.for_vocabulary(load_synonyms(tmp_path / "vocabulary.txt"), OfflineTextPipeline())
    cats = held_out["categories"]
    truth = held_out["targets"].numpy().astype(bool)
    items = [{"image_id": i, "image_path": p, "prompt": "describe this image .", "row": r}
             for r, (i, p) in enumerate(zip(held_out["image_ids"][:8], held_out["paths"][:8]))]

    def fake_sampler_for_tests(batch):
        """FAKE model: at step k, a sentence about the k-th present object, one about the k-th absent one, and the
        first present object again; 3 of 4 samples empty after the objects run out."""
        out = []
        for item, context in batch:
            k = context.count(".")
            present = [c for c, t in zip(cats, truth[item["row"]]) if t]
            absent = [c for c, t in zip(cats, truth[item["row"]]) if not t]
            if k >= len(present):
                out.append(["", "", "", "that is all ."])
            else:
                out.append([f"there is a {present[k]} .", f"i can see a {absent[k]} .",
                            f"a {present[0]} is here .", ""])
        return out

    oracle = AnnotationOracleVerifier(world / "eval" / "instances.json")
    for decide in (make_decide_fn(oracle, oracle), make_decide_fn(trained["cnn"], trained["features"])):
        trajectories = sample_contexts(fake_sampler_for_tests, items, 4, 10, object_extractor(scorer), decide,
                                       seed=0, batch_size=3)
        rows, stats = build_sentinel_pairs(trajectories)
        assert stats["finished"] == 8 and stats["steps"] == int(truth[:8].sum())
        assert rows and all(r["method"] == "sentinel" and r["context"] for r in rows)
    # with the oracle every y_win is truly present and every y_lose truly absent
    rows, _ = build_sentinel_pairs(sample_contexts(fake_sampler_for_tests, items, 4, 10, object_extractor(scorer),
                                                   make_decide_fn(oracle, oracle), seed=0))
    for r in rows:
        present = {c for c, t in zip(cats, truth[held_out["image_ids"].index(r["image_id"])]) if t}
        assert set(r["meta"]["chosen_objects"]) <= present
        assert not set(r["meta"]["rejected_hallucinated_objects"]) & present
