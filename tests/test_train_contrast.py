"""mDPO and SymMPO in the trainer: segment order, stored reference segments, one training step each with per-term
metrics, image-token checks on every segment, and clear errors for pairs without contrast data."""

from __future__ import annotations

import json
import math

import pytest
import torch

import halludpo.train as train_module
from halludpo.contrast import contrast_rows, image_contrast_rows, image_embeddings, unique_images
from halludpo.inference import load_image
from halludpo.io import InputError
from halludpo.losses import N_SEGMENTS
from halludpo.models import load_model_and_processor
from halludpo.logprobs import (
    IGNORE,
    SEGMENTS,
    ImageTokenMismatch,
    encode_segment,
    example_segments,
    required_fields,
    score_segments,
    segment_names,
)
from halludpo.train import PairCollator, PairDataset, compute_reference_logps, loss_params, train_preference
from tests.conftest import TINY_TRAIN

TRAIN = TINY_TRAIN


@pytest.fixture(scope="module")
def model_and_processor(tiny_model_dir):
    return load_model_and_processor(tiny_model_dir, "toy")


@pytest.fixture(scope="module")
def pairs(tiny_world, tiny_model_dir):
    captions = json.loads((tiny_world / "eval" / "captions.json").read_text())["annotations"]
    files = {im["id"]: im["file_name"]
             for im in json.loads((tiny_world / "eval" / "instances.json").read_text())["images"]}
    return [{"image_id": c["image_id"], "image_path": str(tiny_world / "eval" / "images" / files[c["image_id"]]),
             "prompt": "Please describe this image in detail.", "context": "", "chosen": c["caption"],
             "rejected": c["caption"] + " there is a dog .", "method": "test",
             "meta": {"generator_model": str(tiny_model_dir)}} for c in captions[:4]]


@pytest.fixture(scope="module")
def mdpo_rows(pairs, tmp_path_factory):
    return image_contrast_rows(pairs, "corrupt", tmp_path_factory.mktemp("contrast") / "contrast_images", seed=0)


@pytest.fixture(scope="module")
def symmpo_rows(pairs, model_and_processor):
    model, processor = model_and_processor
    embeddings = image_embeddings(model, processor, [p for _, p in unique_images(pairs)])
    return contrast_rows(pairs, embeddings)


def test_segment_tables_match_the_loss_module():
    assert {name: len(specs) for name, specs in SEGMENTS.items()} == N_SEGMENTS
    assert segment_names("sigmoid") == ["chosen", "rejected"]  # plain DPO keeps its ref_logps keys
    assert segment_names("mdpo") == ["chosen", "rejected", "chosen@contrast"]
    assert segment_names("symmpo") == ["chosen", "rejected", "chosen_contrast", "chosen@contrast",
                                       "chosen_contrast@contrast"]
    assert set(required_fields("mdpo")) - set(required_fields("sigmoid")) == {"contrast_image_path"}
    assert set(required_fields("symmpo")) - set(required_fields("sigmoid")) == {"contrast_image_path",
                                                                               "chosen_contrast"}


def response_and_pixels(seg, processor):
    tokens = processor.tokenizer.convert_ids_to_tokens(seg["input_ids"][seg["labels"] != IGNORE])
    return tokens, seg["pixel_values"]


@pytest.mark.parametrize("loss", ["mdpo", "symmpo"])
def test_segment_order_is_the_loss_row_order(loss, model_and_processor, mdpo_rows, symmpo_rows):
    """Row s of a segment list = (image, response) of losses.py's documented row s."""
    _, processor = model_and_processor
    row = (mdpo_rows if loss == "mdpo" else symmpo_rows)[0]
    m, m_c = load_image(row["image_path"]), load_image(row["contrast_image_path"])
    y_w, y_l, y_cw = row["chosen"], row["rejected"], row.get("chosen_contrast")
    expected = {"mdpo": [(m, y_w), (m, y_l), (m_c, y_w)],
                "symmpo": [(m, y_w), (m, y_l), (m, y_cw), (m_c, y_w), (m_c, y_cw)]}[loss]
    segments = example_segments(processor, row, loss, 200)
    assert len(segments) == N_SEGMENTS[loss]
    for seg, (image, response) in zip(segments, expected, strict=True):
        want = encode_segment(processor, image, row["prompt"], "", response, 200)
        got_tokens, got_pixels = response_and_pixels(seg, processor)
        want_tokens, want_pixels = response_and_pixels(want, processor)
        assert got_tokens == want_tokens and torch.equal(got_pixels, want_pixels)
    assert not torch.equal(segments[0]["pixel_values"], segments[-1]["pixel_values"])  # the contrast image differs


def test_collator_is_segment_major(model_and_processor, mdpo_rows):
    model, processor = model_and_processor
    rows = compute_reference_logps(model, processor, mdpo_rows, 200, 4, loss="mdpo")
    dataset = PairDataset(rows, processor, 200, "contrast.jsonl", loss="mdpo")
    batch = PairCollator(processor.tokenizer.pad_token_id)([dataset[0], dataset[1]])
    assert int(batch["n_segments"]) == 3 and batch["input_ids"].shape[0] == 6
    # rows [y_w|m of 0, of 1, y_l|m of 0, of 1, y_w|m_c of 0, of 1]
    assert torch.equal(batch["pixel_values"][4], dataset[0]["segments"][2]["pixel_values"][0])
    assert torch.equal(batch["ref_logps"][:, 1], torch.tensor(list(rows[1]["ref_logps"].values())))


@pytest.mark.parametrize("loss", ["mdpo", "symmpo"])
def test_stored_reference_segments_equal_one_at_a_time(loss, model_and_processor, mdpo_rows, symmpo_rows):
    model, processor = model_and_processor
    rows = mdpo_rows if loss == "mdpo" else symmpo_rows
    scored = compute_reference_logps(model, processor, rows, 200, 4, loss=loss)
    for row in scored:
        assert list(row["ref_logps"]) == segment_names(loss)
    single = torch.cat([score_segments(model, processor, [r], loss, 200, 1, progress=False) for r in rows], 1)
    stored = torch.tensor([list(r["ref_logps"].values()) for r in scored]).T
    assert stored.shape == (N_SEGMENTS[loss], len(rows))
    assert torch.allclose(stored, single, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("loss, terms, first_loss", [
    ("mdpo", ("dpo", "image", "anchor"), 3 * math.log(2)),
    # at LoRA init every r = 0: dpo + lam * (image + image_contrast) + two anchors = (1 + 2 * 0.5 + 2) log 2
    ("symmpo", ("dpo", "image", "image_contrast", "anchor", "anchor_contrast"), 4 * math.log(2)),
])
def test_one_training_step_logs_every_term(loss, terms, first_loss, tiny_model_dir, mdpo_rows, symmpo_rows, tmp_path):
    model, processor = load_model_and_processor(tiny_model_dir, "toy")
    rows = compute_reference_logps(model, processor, mdpo_rows if loss == "mdpo" else symmpo_rows, 200, 4, loss=loss)
    stats = train_preference(model, processor, rows, tmp_path, TRAIN | {"loss": loss}, str(tiny_model_dir))
    assert stats["steps"] == 1
    first = stats["history"][0]
    assert math.isfinite(first["loss"]) and first["loss"] == pytest.approx(first_loss, abs=1e-4)
    for term in terms:
        assert f"loss/{term}" in first and f"accuracy/{term}" in first, term
        assert 0.0 <= first[f"accuracy/{term}"] <= 1.0
    assert sum(first[k] for k in first if k.startswith("loss/")) == pytest.approx(first["preference_loss"], abs=1e-5)
    if loss == "symmpo":
        assert first["loss/margin"] == 0.0 and "accuracy/margin" not in first
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()


@pytest.mark.slow
def test_online_reference_scores_every_segment(tiny_model_dir, symmpo_rows, tmp_path):
    model, processor = load_model_and_processor(tiny_model_dir, "toy")
    stats = train_preference(model, processor, symmpo_rows, tmp_path, TRAIN | {"loss": "symmpo", "reference": "online"},
                             str(tiny_model_dir))
    assert stats["history"][0]["loss"] == pytest.approx(4 * math.log(2), abs=1e-4)


def test_loss_params_come_from_config():
    assert loss_params(TRAIN | {"loss": "mdpo", "beta": 0.3}) == {"beta": 0.3}
    assert loss_params(TRAIN | {"loss": "symmpo"}) == dict(beta1=0.1, beta2=0.1, lam=0.5, gamma=1e-4)
    assert loss_params(TRAIN) == {"beta": 0.1}


def test_pairs_without_contrast_data_are_a_clear_error(model_and_processor, pairs, mdpo_rows):
    model, processor = model_and_processor
    with pytest.raises(InputError, match=r"pairs.jsonl:1: loss 'mdpo' needs field\(s\) \['contrast_image_path'\] "
                                         r"\(build them with the contrast stage\)"):
        PairDataset(pairs, processor, 200, "pairs.jsonl", loss="mdpo")
    with pytest.raises(InputError, match=r"needs field\(s\) \['chosen_contrast'\]"):
        PairDataset(mdpo_rows, processor, 200, "contrast.jsonl", loss="symmpo")
    plain_ref = compute_reference_logps(model, processor, mdpo_rows, 200, 4)  # computed for sigmoid
    with pytest.raises(InputError, match=r"ref_logps.jsonl:1: ref_logps has no \['chosen@contrast'\]"):
        PairDataset(plain_ref, processor, 200, "ref_logps.jsonl", loss="mdpo")


def test_image_token_check_covers_every_segment(model_and_processor, symmpo_rows, monkeypatch):
    _, processor = model_and_processor
    real = train_module.example_segments

    def cut_last(*args, **kwargs):
        segments = real(*args, **kwargs)
        segments[4] = dict(segments[4], input_ids=segments[4]["input_ids"][5:])
        return segments

    monkeypatch.setattr(train_module, "example_segments", cut_last)
    with pytest.raises(ImageTokenMismatch, match="contrast.jsonl:1, segment 4: 13 image tokens"):
        PairDataset(symmpo_rows, processor, 200, "contrast.jsonl", loss="symmpo")
