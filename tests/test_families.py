"""The real model families (llava, llava_next, qwen2_vl, qwen2_5_vl) through generation, reference log-probs, one
DPO step and the merge, on tiny random models built offline (tests/tiny_families.py) and loaded back through
halludpo.models.load_model_and_processor like a hub checkpoint."""

from __future__ import annotations

import math
import re

import pytest
import torch
from peft import PeftModel
from PIL import Image, ImageDraw

from halludpo.inference import generate_texts, load_image
from halludpo.models import load_model_and_processor, save_model
from halludpo.logprobs import encode_segment, score_pairs
from halludpo.train import PairDataset, compute_reference_logps, lora_model, merge_adapter, preflight, train_preference
from tests.conftest import TINY_TRAIN
from tests.tiny_families import BUILDERS, FAMILIES

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# (width, height, colour) of the test images: different content and sizes, so that the dynamic-resolution
# families give each image another number of image tokens and a batch needs padding.
IMAGES = ((28, 28, "red"), (56, 28, "blue"), (56, 56, "green"))
# Image tokens per image, worked out by hand from the tiny configs:
# llava: CLIP 28 px / patch 14 = 2x2 features, CLS dropped ("default" strategy), whatever the input size;
# llava_next: 4 base features + the any-res tiles' features unpadded to the image's aspect + one newline token per
#   row (28x28 -> 4 + 2x2 + 2 = 10, 56x28 -> 4 + 2x4 + 2 = 14, 56x56 -> 4 + 4x4 + 4 = 24);
# qwen: patch 14 and 2x2 merge, smart_resize to multiples of 28 -> (h/28) * (w/28) tokens.
EXPECTED_IMAGE_TOKENS = {"llava": (4, 4, 4), "llava_next": (10, 14, 24), "qwen2_vl": (1, 2, 4),
                         "qwen2_5_vl": (1, 2, 4)}
PROMPTS = ("Describe this image.", "What is in the image?", "Please describe this image in detail.")
MAX_LENGTH = 300
TRAIN = TINY_TRAIN | {"batch_size": 3, "max_length": MAX_LENGTH}


@pytest.fixture(scope="module")
def image_paths(tmp_path_factory):
    out = tmp_path_factory.mktemp("family_images")
    paths = []
    for i, (width, height, colour) in enumerate(IMAGES):
        image = Image.new("RGB", (width, height), "white")
        ImageDraw.Draw(image).ellipse([4, 4, width - 4, height - 4], fill=colour)
        image.save(out / f"{i}.png")
        paths.append(str(out / f"{i}.png"))
    return paths


@pytest.fixture(scope="module", params=FAMILIES)
def family_dir(request, tmp_path_factory):
    """(family, folder) of a tiny random model of the family, saved with save_pretrained."""
    model, processor = BUILDERS[request.param](seed=0)
    out = tmp_path_factory.mktemp(request.param)
    save_model(model, processor, out)
    return request.param, out


@pytest.fixture(scope="module")
def pairs(image_paths, family_dir):
    _, model_dir = family_dir
    return [{"image_id": i, "image_path": path, "prompt": PROMPTS[i], "context": "",
             "chosen": "The image shows a red circle.", "rejected": "There is a dog, a cat and a cup on the table.",
             "method": "test", "meta": {"generator_model": str(model_dir)}} for i, path in enumerate(image_paths)]


def test_batched_greedy_generation(family_dir, image_paths):
    """Left-padded batches of images with different token counts give one string per image, the same as one
    image at a time, and greedy decoding gives the same texts twice."""
    family, model_dir = family_dir
    model, processor = load_model_and_processor(model_dir, family)
    assert processor.tokenizer.padding_side == "left"
    kwargs = {"max_new_tokens": 6, "do_sample": False}
    batched = generate_texts(model, processor, image_paths, PROMPTS, kwargs, batch_size=3, progress=False)
    again = generate_texts(model, processor, image_paths, PROMPTS, kwargs, batch_size=3, progress=False)
    single = [generate_texts(model, processor, [i], [p], kwargs, batch_size=1, progress=False)[0]
              for i, p in zip(image_paths, PROMPTS)]
    assert len(batched) == 3 and all(isinstance(text, str) and text for text in batched)
    assert batched == again == single


def test_image_tokens_match_the_models_features(family_dir, image_paths, pairs):
    """Each image's placeholder tokens in an encoded segment number exactly the features the model's vision tower
    gives for it (the hand-worked counts), and the trainer's preflight check accepts every segment."""
    family, model_dir = family_dir
    model, processor = load_model_and_processor(model_dir, family)
    counts = []
    for path in image_paths:
        segment = encode_segment(processor, load_image(path), "Describe this image.", "", "A dog.", MAX_LENGTH)
        image_inputs = {k: segment[k] for k in ("pixel_values", "image_sizes", "image_grid_thw") if k in segment}
        features = model.get_image_features(**image_inputs).pooler_output
        assert int((segment["input_ids"] == processor.image_token_id).sum()) == sum(len(f) for f in features)
        counts.append(sum(len(f) for f in features))
    assert tuple(counts) == EXPECTED_IMAGE_TOKENS[family]
    assert len(PairDataset(pairs, processor, MAX_LENGTH)) == 3


def test_a_mid_answer_sentence_is_scored_without_the_end_of_turn(family_dir, image_paths):
    """SENTINEL's sentences before a description's last: every family's chat template extends prompt + context +
    sentence token for token, so the end-of-turn tokens after it can be masked (and only they are)."""
    family, model_dir = family_dir
    _, processor = load_model_and_processor(model_dir, family)
    image = load_image(image_paths[0])
    args = (processor, image, "Describe this image.", "A red circle.", "It is on white.", MAX_LENGTH)
    whole, middle = encode_segment(*args), encode_segment(*args, score_end=False)
    assert torch.equal(whole["input_ids"], middle["input_ids"])
    scored_whole, scored_middle = (seg["labels"] != -100 for seg in (whole, middle))
    n_middle = int(scored_middle.sum())
    assert 0 < n_middle < int(scored_whole.sum())  # the response's tokens, without the end-of-turn ones
    assert torch.equal(scored_whole.nonzero()[:n_middle], scored_middle.nonzero())  # a prefix of the scored span
    text = processor.tokenizer.decode(middle["input_ids"][scored_middle])
    assert text.strip().endswith("white.")


def test_reference_logps_batched_equal_single(family_dir, pairs):
    """The reference_logps stage's summed log-probs of chosen / rejected are finite, negative, and the same
    batched (3 images of different sizes, right-padded) as one pair at a time."""
    family, model_dir = family_dir
    model, processor = load_model_and_processor(model_dir, family)
    rows = compute_reference_logps(model, processor, pairs, MAX_LENGTH, batch_size=3)
    batched = torch.tensor([[r["ref_logps"]["chosen"], r["ref_logps"]["rejected"]] for r in rows]).T
    single = torch.cat([score_pairs(model, processor, [p], MAX_LENGTH, batch_size=1, progress=False) for p in pairs], 1)
    assert batched.shape == (2, 3)
    assert torch.isfinite(batched).all() and (batched < 0).all()
    assert torch.allclose(batched, single, atol=1e-4)


def test_lora_targets_the_language_model_attention_and_mlp(family_dir):
    """train.lora.target_modules matches the 7 projections of each language-model layer and nothing in the vision
    tower; train_projector makes the family's projector (multi_modal_projector / visual.merger) train fully."""
    family, model_dir = family_dir
    model, _ = load_model_and_processor(model_dir, family)
    pattern = TRAIN["lora"]["target_modules"]
    targets = [name for name, _ in model.named_modules() if re.fullmatch(pattern, name)]
    assert len(targets) == 7 and all(name.startswith("model.language_model.layers.0.") for name in targets)
    trainable = preflight(lora_model(model, TRAIN["lora"] | {"train_projector": True}))
    projector = [name for name in trainable if "modules_to_save" in name]
    expected = "multi_modal_projector" if family.startswith("llava") else "visual.merger"
    assert projector and all(expected in name for name in projector)
    assert sum("lora_A" in name for name in trainable) == 7


def test_one_dpo_step_trains_only_lora_and_merges(family_dir, pairs, tmp_path):
    """One DPO step with stored reference log-probs starts at exactly log 2 (policy == reference), moves every
    LoRA B matrix and no base weight; the merged model loads and scores as the adapted model does."""
    family, model_dir = family_dir
    model, processor = load_model_and_processor(model_dir, family)
    rows = compute_reference_logps(model, processor, pairs, MAX_LENGTH, batch_size=3)
    before = [(n, p, p.detach().clone()) for n, p in model.named_parameters()]  # peft keeps these objects
    stats = train_preference(model, processor, rows, tmp_path, TRAIN, str(model_dir))
    assert stats["steps"] == 1 and math.isfinite(stats["train_loss"])
    assert stats["history"][0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert [n for n, param, copy in before if not torch.equal(param, copy)] == []
    adapted = PeftModel.from_pretrained(load_model_and_processor(model_dir, family)[0], tmp_path / "adapter")
    lora_b = [p for n, p in adapted.named_parameters() if "lora_B" in n]
    assert len(lora_b) == 7 and all(p.abs().sum() > 0 for p in lora_b)

    merge_adapter(model_dir, tmp_path / "adapter", family, tmp_path / "merged")
    merged, merged_processor = load_model_and_processor(tmp_path / "merged", family)
    assert type(merged) is type(model) and type(merged_processor).__name__ == type(processor).__name__
    adapted.eval()
    merged_logps = score_pairs(merged, merged_processor, pairs, MAX_LENGTH, progress=False)
    assert torch.allclose(merged_logps, score_pairs(adapted, processor, pairs, MAX_LENGTH, progress=False), atol=1e-3)
    base = torch.tensor([[r["ref_logps"]["chosen"], r["ref_logps"]["rejected"]] for r in rows]).T
    assert not torch.allclose(merged_logps, base, atol=1e-4)  # the step changed the model
