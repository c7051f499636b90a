"""Contrast images: seeded corruption, ablation images, nearest neighbours, image features, SymMPO rows."""

import hashlib
import json
import random

import numpy as np
import pytest
import torch
from PIL import Image

from halludpo.contrast import (
    black_image,
    contrast_rows,
    corrupt_image,
    crop_box,
    example_seed,
    image_embeddings,
    nearest_neighbours,
    noise_image,
    unique_images,
)
from halludpo.models import build_toy_model
from tests.conftest import TINY_ARCH


def random_image(seed: int, size=(48, 40)) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


def gradient_image(width: int, height: int) -> Image.Image:
    """Red = x, green = y: a pixel's colour says where it came from."""
    xs, ys = np.meshgrid(np.arange(width), np.arange(height))
    return Image.fromarray(np.stack([xs, ys, np.zeros_like(xs)], axis=-1).astype(np.uint8), "RGB")


def test_example_seed_is_a_stable_hash_of_its_inputs():
    expected = int.from_bytes(hashlib.sha256(json.dumps([7, 139, 2]).encode()).digest()[:8], "big")
    assert example_seed(7, 139, 2) == expected
    assert len({example_seed(7, 139, 2), example_seed(8, 139, 2), example_seed(7, 140, 2),
                example_seed(7, 139, 3), example_seed(7, "139", 2)}) == 5
    assert 0 <= example_seed(0, "x", 0) < 2 ** 64


def test_corrupt_image_is_deterministic_from_the_seed():
    image = random_image(0)
    a, b = corrupt_image(image, seed=5), corrupt_image(image, seed=5)
    assert a.tobytes() == b.tobytes()
    assert a.size == image.size and a.mode == image.mode
    assert corrupt_image(image, seed=6).tobytes() != a.tobytes()
    random.seed(0)  # global state plays no part
    c = corrupt_image(image, seed=5)
    random.seed(1)
    assert corrupt_image(image, seed=5).tobytes() == c.tobytes() == a.tobytes()


def test_corrupt_image_is_the_seeded_box_resized_back():
    image = random_image(1)
    box = crop_box(image.size, random.Random(11))
    expected = image.crop(box).resize(image.size, Image.Resampling.BILINEAR)
    assert corrupt_image(image, seed=11).tobytes() == expected.tobytes()


@pytest.mark.parametrize("size", [(32, 32), (640, 480), (37, 101)])
def test_crop_box_area_within_bounds(size):
    width, height = size
    fractions = []
    for seed in range(300):
        left, top, right, bottom = crop_box(size, random.Random(seed))
        assert 0 <= left < right <= width and 0 <= top < bottom <= height
        fractions.append((right - left) * (bottom - top) / (width * height))
    assert 0.01 <= min(fractions) and max(fractions) <= 0.2
    assert max(fractions) - min(fractions) > 0.1  # the area really varies over the range


def test_corrupted_gradient_shows_a_crop_within_bounds():
    image = gradient_image(200, 160)
    for seed in range(20):
        pixels = np.asarray(corrupt_image(image, seed)).astype(int)
        width = pixels[..., 0].max() - pixels[..., 0].min() + 1  # columns of the original seen in the output
        height = pixels[..., 1].max() - pixels[..., 1].min() + 1
        assert 0.01 <= width * height / (200 * 160) <= 0.2


def test_crop_box_refuses_impossible_requests():
    with pytest.raises(ValueError, match="no crop of 1%-20% of the area found for a 2x2 image"):
        crop_box((2, 2), random.Random(0))
    with pytest.raises(ValueError, match="need 0 < min_area <= max_area <= 1"):
        crop_box((10, 10), random.Random(0), min_area=0.3, max_area=0.2)


def test_black_and_noise_images():
    image = random_image(2)
    black = black_image(image)
    assert black.size == image.size and black.mode == image.mode and not np.asarray(black).any()
    noisy = noise_image(image, seed=3)
    assert noisy.size == image.size and noisy.mode == "RGB"
    assert noisy.tobytes() == noise_image(image, seed=3).tobytes()
    assert noisy.tobytes() != noise_image(image, seed=4).tobytes()
    assert noisy.tobytes() != image.tobytes()
    assert noise_image(image, seed=3, std=0.0).tobytes() == image.tobytes()


def test_nearest_neighbours_is_never_self():
    embeddings = torch.randn(30, 8, generator=torch.Generator().manual_seed(0))
    embeddings[5] = embeddings[6]  # identical rows: each other's neighbour, never their own
    neighbours = nearest_neighbours(embeddings, chunk_size=7)
    assert neighbours.dtype == torch.long and neighbours.shape == (30,)
    assert (neighbours != torch.arange(30)).all()
    assert neighbours[5] == 6 and neighbours[6] == 5


def test_nearest_neighbours_uses_cosine_and_breaks_ties_low():
    scaled = torch.tensor([[1.0, 0.0], [10.0, 0.1], [0.0, 1.0], [0.1, 5.0]])
    assert nearest_neighbours(scaled).tolist() == [1, 0, 3, 2]
    tied = torch.tensor([[1.0, 0.0], [1.0, 0.0], [2.0, 0.0], [0.0, 1.0]])
    # row 0: rows 1 and 2 tie -> 1; row 3 is orthogonal to all three -> 0
    assert nearest_neighbours(tied).tolist() == [1, 0, 0, 0]
    with pytest.raises(ValueError, match="N >= 2"):
        nearest_neighbours(torch.zeros(1, 4))


@pytest.fixture(scope="module")
def toy_model():
    model, processor = build_toy_model(["a", "dog", "cup", "."], TINY_ARCH, seed=0)
    model.eval()
    return model, processor


def test_image_embeddings_mean_pool_the_projected_vision_features(toy_model, tmp_path):
    model, processor = toy_model
    images = [random_image(i, size=(32, 32)) for i in range(4)] + [random_image(9, size=(48, 40))]
    embeddings = image_embeddings(model, processor, images, batch_size=2)
    assert embeddings.shape == (5, TINY_ARCH["text_hidden"]) and embeddings.dtype == torch.float32
    assert not embeddings.requires_grad

    pixels = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        hidden = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states[-1][:, 1:]  # drop CLS
        expected = model.model.multi_modal_projector(hidden).mean(dim=1)
    assert torch.allclose(embeddings, expected, atol=1e-5)
    assert torch.allclose(image_embeddings(model, processor, images, batch_size=5), embeddings, atol=1e-5)

    path = tmp_path / "img.png"
    images[0].save(path)
    assert torch.allclose(image_embeddings(model, processor, [path], batch_size=1)[0], embeddings[0], atol=1e-5)


def test_image_embeddings_restores_training_mode(toy_model):
    model, processor = toy_model
    model.train()
    try:
        image_embeddings(model, processor, [random_image(0, size=(32, 32))])
        assert model.training
    finally:
        model.eval()


def pair(image_id, prompt, chosen):
    return {"image_id": image_id, "image_path": f"/imgs/{image_id}.png", "prompt": prompt, "context": "",
            "chosen": chosen, "rejected": "r", "method": "symmpo", "meta": {"k": 1}}


def test_contrast_rows_add_the_neighbours_image_and_chosen():
    rows = [pair(1, "describe", "c1"), pair(2, "describe", "c2"), pair(2, "what is it", "c2-what"),
            pair(3, "what is it", "c3")]
    assert unique_images(rows) == [(1, "/imgs/1.png"), (2, "/imgs/2.png"), (3, "/imgs/3.png")]
    embeddings = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])  # neighbours: 1->2, 2->1, 3->2
    out = contrast_rows(rows, embeddings)
    assert [r["contrast_image_path"] for r in out] == ["/imgs/2.png", "/imgs/1.png", "/imgs/1.png", "/imgs/2.png"]
    # same prompt preferred: image 3 asks "what is it", image 2 has that pair; image 1 has only "describe"
    assert [r["chosen_contrast"] for r in out] == ["c2", "c1", "c1", "c2-what"]
    assert [r["meta"] for r in out] == [{"k": 1, "contrast_image_id": i} for i in (2, 1, 1, 2)]
    assert out[0]["chosen"] == "c1" and out[0]["rejected"] == "r"
    assert "contrast_image_path" not in rows[0] and rows[0]["meta"] == {"k": 1}  # inputs untouched
    with pytest.raises(ValueError, match="2 embeddings for 3 distinct images"):
        contrast_rows(rows, embeddings[:2])


def sentence_pair(image_id, step, chosen, objects, context_objects=()):
    return {"image_id": image_id, "image_path": f"/imgs/{image_id}.png", "prompt": "describe", "context": "c",
            "chosen": chosen, "rejected": "r", "method": "sentinel",
            "meta": {"step": step, "chosen_objects": list(objects), "context_objects": list(context_objects)}}


def test_sentence_pairs_take_an_informative_donor_at_the_same_step():
    rows = [sentence_pair(1, 1, "there is a dog .", ["dog"]),
            sentence_pair(1, 2, "i can see a cat .", ["cat"], ["dog"]),
            sentence_pair(2, 1, "there is a cat .", ["cat"]),              # cat is in image 1: not informative
            sentence_pair(2, 2, "i can see a bench .", ["bench"], ["cat"]),
            sentence_pair(3, 2, "i can see a kite .", ["kite"], ["tree"])]
    embeddings = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.5, 0.5]])  # from image 1: 2 nearest, then 3
    out = contrast_rows(rows, embeddings, distinct=True)
    # image 1, step 1: image 2's step-1 sentence names cat (known in image 1), so its step-2 bench sentence
    assert out[0]["chosen_contrast"] == "i can see a bench ." and out[0]["meta"]["contrast_rank"] == 0
    # image 1, step 2: y_w names cat, which image 2 shows -> the next neighbour, image 3, at the same step
    assert out[1]["chosen_contrast"] == "i can see a kite ." and out[1]["meta"]["contrast_image_id"] == 3
    assert out[1]["meta"]["contrast_rank"] == 1
    # image 3 (nearest: 2, then 1) at step 2: image 2's step-2 bench sentence
    assert out[4]["chosen_contrast"] == "i can see a bench ." and out[4]["meta"]["contrast_image_id"] == 2
