"""Open-vocabulary detectors as SENTINEL verifiers (verifier.kind=detector): tiny RANDOM GroundingDINO and OWLv2
models built offline (local tokenizers, small configs), saved with save_pretrained and loaded back through
halludpo.detectors.load_detector, the production path. Random weights say nothing about images; the tests check the
plumbing: output structure, thresholds, determinism, batch independence, the mapping of names to queries."""

from __future__ import annotations

import re
import string

import numpy as np
import pytest
import torch
from PIL import Image

from halludpo import detectors
from halludpo.detectors import (
    grounding_prompt,
    load_detector,
    load_pair,
    make_detector_decide_fn,
    query_tasks,
    verdict,
)
from halludpo.inference import as_image

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LETTERS = list(string.ascii_lowercase)
OBJECTS = ["cat", "dog", "traffic light", "hair drier"]
# thresholds at which the seeded tiny models call some objects present and some not (retune if the init changes)
SPLITTING_THRESHOLD = {"grounding_dino": 0.8, "owlv2": 0.53}


def save_tiny_grounding_dino(out) -> str:
    """A random GroundingDINO (Swin backbone 8 channels, 1-layer BERT, d_model 32, 10 boxes) with a WordPiece
    tokenizer over single letters (any lower-case word tokenizes), 64-px images."""
    from transformers import (BertConfig, BertTokenizer, GroundingDinoConfig, GroundingDinoForObjectDetection,
                              GroundingDinoImageProcessorPil, GroundingDinoProcessor, SwinConfig)

    torch.manual_seed(0)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", *LETTERS, *(f"##{c}" for c in LETTERS)]
    tokenizer = BertTokenizer(vocab={t: i for i, t in enumerate(vocab)}, model_max_length=64)
    backbone = SwinConfig(image_size=64, patch_size=4, embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1],
                          window_size=2, out_features=["stage2", "stage3", "stage4"])
    text = BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=16, max_position_embeddings=64)
    config = GroundingDinoConfig(backbone_config=backbone, text_config=text, num_queries=10, encoder_layers=1,
                                 decoder_layers=2, encoder_ffn_dim=32, decoder_ffn_dim=32, encoder_attention_heads=2,
                                 decoder_attention_heads=2, d_model=32, num_feature_levels=3, encoder_n_points=1,
                                 decoder_n_points=1, max_text_len=64, disable_custom_kernels=True)
    model = GroundingDinoForObjectDetection(config)
    with torch.no_grad():  # random logits are ~+-10: all boxes would score ~1; scaled down, scores spread ~0.5-0.9
        model.model.decoder.layer_norm.weight.mul_(0.1)
        model.model.decoder.layer_norm.bias.mul_(0.1)
    model.save_pretrained(out)
    images = GroundingDinoImageProcessorPil(size={"shortest_edge": 64, "longest_edge": 64})
    GroundingDinoProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(out)
    return str(out)


def save_tiny_owlv2(out) -> str:
    """A random OWLv2 (1-layer ViT on 32-px images in 8-px patches, 1-layer text encoder) with a byte-level BPE
    tokenizer over single letters (no merges), queries of at most 16 tokens."""
    from transformers import CLIPTokenizer, Owlv2Config, Owlv2ForObjectDetection, Owlv2ImageProcessorPil, Owlv2Processor

    torch.manual_seed(1)
    # id 0 must not be the start token: OWL masks out queries whose first token id is 0
    vocab = ["!", "<|startoftext|>", "<|endoftext|>", *LETTERS, *(f"{c}</w>" for c in LETTERS), ".", ".</w>"]
    tokenizer = CLIPTokenizer(vocab={t: i for i, t in enumerate(vocab)}, merges=[], model_max_length=16)
    config = Owlv2Config(
        text_config=dict(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16, bos_token_id=1, eos_token_id=2,
                         pad_token_id=2),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16)
    model = Owlv2ForObjectDetection(config)
    with torch.no_grad():  # random per-box logit scales saturate the sigmoid; a fixed small scale spreads scores
        for linear in (model.class_head.logit_shift, model.class_head.logit_scale):
            linear.weight.zero_()
            linear.bias.zero_()
        model.class_head.logit_scale.bias.fill_(-0.5)  # scale elu(-0.5) + 1 = 0.61
    model.save_pretrained(out)
    images = Owlv2ImageProcessorPil(size={"height": 32, "width": 32})
    Owlv2Processor(image_processor=images, tokenizer=tokenizer).save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("detectors")
    return {"grounding_dino": save_tiny_grounding_dino(root / "grounding_dino"),
            "owlv2": save_tiny_owlv2(root / "owlv2")}


@pytest.fixture(scope="module")
def image_paths(tmp_path_factory):
    """Three small RGB images of different sizes, saved as PNG."""
    root = tmp_path_factory.mktemp("detector_images")
    rng = np.random.default_rng(0)
    paths = []
    for i, size in enumerate([(48, 40), (40, 40), (56, 32)]):
        path = root / f"image_{i}.png"
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


def detector(model_dirs, kind, threshold, text_threshold=None, **settings):
    if kind == "grounding_dino" and text_threshold is None:
        text_threshold = threshold
    return load_detector(kind, model_dirs[kind], threshold, text_threshold, **settings)


def batch_of(image_paths):
    return [({"image_path": image_paths[0]}, ["cat", "dog", "traffic light"]),
            ({"image_path": image_paths[1]}, ["hair drier"]),
            ({"image_path": image_paths[2]}, ["dog", "cat", "dog"]),
            ({"image_path": image_paths[0]}, [])]


def test_prompt_spans_and_query_tasks():
    prompt, spans = grounding_prompt(["cat", "traffic light"])
    assert prompt == "cat. traffic light."
    assert [prompt[s:e] for s, e in spans] == ["cat", "traffic light"]
    assert detectors.normalise_name("  Traffic\tLight. ") == "traffic light"
    assert query_tasks([["b", "a", "b"], [], ["c", "d", "e"]], max_queries=2) == [
        (0, ["a", "b"]), (2, ["c", "d"]), (2, ["e"])]


@pytest.mark.parametrize("kind", ["grounding_dino", "owlv2"])
def test_decide_fn_structure_and_extreme_thresholds(model_dirs, image_paths, kind):
    batch = batch_of(image_paths)
    everything = detector(model_dirs, kind, 0.0)
    nothing = detector(model_dirs, kind, 1.01)
    assert everything.model_type == {"grounding_dino": "grounding-dino", "owlv2": "owlv2"}[kind]
    out = make_detector_decide_fn(everything, nothing)(batch)
    assert len(out) == len(batch)
    for answers, (_, objects) in zip(out, batch):
        assert set(answers) == set(objects)
        assert all(answers[o] == (True, False) for o in objects)
    assert out[3] == {}
    assert make_detector_decide_fn(everything, nothing)([]) == []


@pytest.mark.parametrize("kind", ["grounding_dino", "owlv2"])
def test_verdicts_are_deterministic_and_batch_independent(model_dirs, image_paths, kind):
    batch = batch_of(image_paths)
    threshold = SPLITTING_THRESHOLD[kind]
    big = detector(model_dirs, kind, threshold, batch_size=8)
    small = detector(model_dirs, kind, threshold, batch_size=1, max_queries=2)
    first = make_detector_decide_fn(big, big)(batch)
    assert {v for answers in first for pair in answers.values() for v in pair} == {True, False}
    assert make_detector_decide_fn(big, big)(batch) == first
    # answers for an item do not depend on the other items, the batch size or the name order (OWL: nor on
    # max_queries, its queries are scored independently)
    alone = [make_detector_decide_fn(big, big)([entry])[0] for entry in batch]
    assert alone == first
    if kind == "owlv2":
        assert make_detector_decide_fn(small, small)(batch) == first


@pytest.mark.parametrize("kind", ["grounding_dino", "owlv2"])
def test_verdicts_are_monotone_in_the_threshold(model_dirs, image_paths, kind):
    objects = [OBJECTS] * len(image_paths)
    grid = [detectors.detect_present(detector(model_dirs, kind, t), image_paths, objects)
            for t in (0.0, 0.5, 0.52, 0.54, 0.7, 0.75, 0.8, 1.01)]
    for looser, stricter in zip(grid, grid[1:]):
        for a, b in zip(looser, stricter):
            assert all(a[o] or not b[o] for o in OBJECTS)
    counts = [sum(sum(answers.values()) for answers in level) for level in grid]
    assert counts[0] == len(image_paths) * len(OBJECTS) and counts[-1] == 0
    assert any(0 < c < counts[0] for c in counts), counts  # some thresholds split the objects


def reference_present(det, image, name) -> bool:
    """transformers' own post-processing on a prompt of ONE name (no label ambiguity): GroundingDINO -> a kept box
    whose phrase has a token of the name (not '.', [SEP]); OWL -> any kept box (its only query)."""
    img = as_image(image)
    if det.model_type == "owlv2":
        inputs = det.processor(text=[[name]], images=[img], return_tensors="pt")
        outputs = det.model(**inputs)
        return len(det.processor.post_process_grounded_object_detection(outputs, det.box_threshold)[0]["scores"]) > 0
    inputs = det.processor(text=[f"{name}."], images=[img], return_tensors="pt")
    outputs = det.model(**inputs)
    result = det.processor.post_process_grounded_object_detection(
        outputs, inputs["input_ids"], threshold=det.box_threshold, text_threshold=det.text_threshold)[0]
    return any(re.sub(r"\[SEP\]|\.|\s", "", label) for label in result["text_labels"])


@pytest.mark.parametrize("kind,thresholds", [("grounding_dino", [(0.75, 0.6), (0.8, 0.7), (0.7, 0.75)]),
                                             ("owlv2", [(0.52, None), (0.53, None), (0.54, None)])])
@torch.no_grad()
def test_verdicts_match_transformers_post_processing(model_dirs, image_paths, kind, thresholds):
    seen = set()
    for threshold, text_threshold in thresholds:
        det = load_detector(kind, model_dirs[kind], threshold, text_threshold)
        names = ["cat", "traffic light"]
        if kind == "owlv2":  # queries are scored independently: asking both names at once changes nothing
            ours = detectors.detect_present(det, image_paths, [names] * len(image_paths))
        else:  # the prompt conditions GroundingDINO's features: compare one name per prompt
            ours = [{n: detectors.detect_present(det, [p], [[n]])[0][n] for n in names} for p in image_paths]
        reference = [{n: reference_present(det, p, n) for n in names} for p in image_paths]
        assert ours == reference, (threshold, text_threshold)
        seen |= {v for answers in ours for v in answers.values()}
    assert seen == {True, False}


def test_grounding_dino_maps_tokens_back_to_each_name(model_dirs):
    det = detector(model_dirs, "grounding_dino", 0.3)
    prompt, spans = grounding_prompt(["cat", "traffic light"])
    text = det.processor.tokenizer([prompt], return_offsets_mapping=True, return_tensors="pt")
    tokens = [detectors._span_tokens(text["offset_mapping"][0], text["attention_mask"][0], s, e) for s, e in spans]
    pieces = det.processor.tokenizer.convert_ids_to_tokens(text["input_ids"][0].tolist())
    assert "".join(pieces[t].removeprefix("##") for t in tokens[0]) == "cat"
    assert "".join(pieces[t].removeprefix("##") for t in tokens[1]) == "trafficlight"


def test_a_name_without_a_verdict_is_a_clear_error(model_dirs):
    det = detector(model_dirs, "owlv2", 0.5)
    with pytest.raises(KeyError, match=r"owlv2 .* no verdict for 'zebra' on img.png"):
        verdict({"cat": True}, "zebra", det, "img.png")


def test_loading_errors_name_the_model(model_dirs, tmp_path):
    with pytest.raises(FileNotFoundError, match="not a saved model folder"):
        load_detector("grounding_dino", tmp_path, 0.35, 0.25)
    with pytest.raises(OSError, match="cannot load the zero-shot detector 'no-such/detector'"):
        load_detector("owlv2", "no-such/detector", 0.1)
    with pytest.raises(ValueError, match="owlv2 has no text threshold"):
        load_detector("owlv2", model_dirs["owlv2"], 0.1, 0.25)
    with pytest.raises(ValueError, match="dtype"):
        load_detector("owlv2", model_dirs["owlv2"], 0.1, dtype="float8")


def test_load_pair_reads_the_verifier_config(model_dirs):
    cfg = {"kinds": ["grounding_dino", "owlv2"], "models": model_dirs, "thresholds": [0.35, 0.1],
           "text_thresholds": [None, None], "device": "cpu", "dtype": "float32", "batch_size": 4, "max_queries": 8}
    a, b = load_pair(cfg)
    assert (a.name, a.box_threshold, a.text_threshold, a.batch_size, a.max_queries) == (
        "grounding_dino", 0.35, 0.25, 4, 8)
    assert (b.name, b.model_type, b.box_threshold, b.text_threshold) == ("owlv2", "owlv2", 0.1, None)
    with pytest.raises(ValueError, match="no model id for"):
        load_pair(cfg | {"models": {"grounding_dino": model_dirs["grounding_dino"]}})
    with pytest.raises(ValueError, match="exactly two"):
        load_pair(cfg | {"kinds": ["owlv2"]})
