"""Contrast images for the image-conditional losses: mDPO's corrupted image, SymMPO's contrast image m'.

Everything random is seeded locally (random.Random / numpy Generator built from a seed, never global state), and
per-example seeds come from `example_seed`, a hash of (config seed, image_id, pair index) that is stable across
processes and machines (Python's hash() is salted per process).

mDPO: m_c = corrupt_image(m, example_seed(...)), sampled once per example so policy and reference see the same crop.
SymMPO: m' = the nearest neighbour of m among the training images by the model's own mean-pooled image features
(`image_embeddings` -> `nearest_neighbours` -> `contrast_rows`, which adds contrast_image_path and chosen_contrast
to each pair, DESIGN.md "Data contracts"); `black_image` and `noise_image` are the ablation contrasts.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from halludpo.inference import load_image

ASPECT_RATIOS = (3 / 4, 4 / 3)  # the aspect-ratio range of torchvision's RandomResizedCrop, which mDPO uses


def example_seed(seed: int, image_id: int | str, pair_index: int) -> int:
    """A 64-bit seed for one example: the first 8 bytes of sha256 of [seed, image_id, pair_index] as JSON."""
    key = json.dumps([seed, image_id, pair_index]).encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "big")


def crop_box(size: tuple[int, int], rng: random.Random, min_area: float = 0.01, max_area: float = 0.2,
             max_tries: int = 100) -> tuple[int, int, int, int]:
    """A random (left, top, right, bottom) box covering min_area..max_area of a (width, height) image.

    As RandomResizedCrop: area fraction uniform in [min_area, max_area], aspect ratio log-uniform in [3/4, 4/3];
    a draw whose rounded box leaves the image or the area bounds is redrawn (no whole-image fallback).
    """
    if not 0 < min_area <= max_area <= 1:
        raise ValueError(f"need 0 < min_area <= max_area <= 1, got {min_area}, {max_area}")
    width, height = size
    total = width * height
    for _ in range(max_tries):
        area = rng.uniform(min_area, max_area) * total
        ratio = math.exp(rng.uniform(*map(math.log, ASPECT_RATIOS)))
        w, h = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
        if 1 <= w <= width and 1 <= h <= height and min_area <= w * h / total <= max_area:
            left, top = rng.randint(0, width - w), rng.randint(0, height - h)
            return left, top, left + w, top + h
    raise ValueError(f"no crop of {min_area:.0%}-{max_area:.0%} of the area found for a {width}x{height} image")


def corrupt_image(image: Image.Image, seed: int, min_area: float = 0.01, max_area: float = 0.2) -> Image.Image:
    """mDPO's corrupted image: a random crop keeping min_area..max_area of the area, resized back (bilinear)."""
    box = crop_box(image.size, random.Random(seed), min_area, max_area)
    return image.crop(box).resize(image.size, Image.Resampling.BILINEAR)


def black_image(image: Image.Image) -> Image.Image:
    """An all-black image of the same size and mode (SymMPO ablation)."""
    return Image.new(image.mode, image.size)


def noise_image(image: Image.Image, seed: int, std: float = 0.5) -> Image.Image:
    """The image under additive Gaussian noise, std a fraction of the 0-255 range, clipped (SymMPO ablation).

    A large std (>= 1) leaves little of the image: close to pure noise.
    """
    pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    noise = np.random.default_rng(seed).normal(0.0, std * 255.0, pixels.shape)
    return Image.fromarray(np.clip(np.rint(pixels + noise), 0, 255).astype(np.uint8), "RGB")


def nearest_neighbours(embeddings: torch.Tensor, chunk_size: int = 1024) -> torch.Tensor:
    """For each row of (N, D) embeddings, the index of the most cosine-similar OTHER row, as a (N,) LongTensor.

    A row is never its own neighbour; ties go to the lowest index (argmax returns the first maximum).
    """
    if embeddings.dim() != 2 or embeddings.shape[0] < 2:
        raise ValueError(f"need (N, D) embeddings with N >= 2, got shape {tuple(embeddings.shape)}")
    unit = F.normalize(embeddings.double(), dim=1)
    neighbours = []
    for start in range(0, unit.shape[0], chunk_size):  # an N x N similarity matrix does not fit for large N
        sim = unit[start:start + chunk_size] @ unit.T
        rows = torch.arange(sim.shape[0])
        sim[rows, rows + start] = -math.inf
        neighbours.append(sim.argmax(dim=1))
    return torch.cat(neighbours)


@torch.no_grad()
def image_embeddings(model, processor, images: Sequence[Image.Image | str | Path], batch_size: int = 16
                     ) -> torch.Tensor:
    """(N, D) float32 CPU features: the model's own image features (vision tower + projector, as the language
    model sees them, via model.get_image_features), mean-pooled over image tokens. Paths are loaded per batch.

    The model is put in eval mode for the call (no dropout) and restored after.
    """
    was_training = model.training
    model.eval()
    try:
        pooled = [pooled_features(model, processor, [as_image(i) for i in images[start:start + batch_size]])
                  for start in range(0, len(images), batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(pooled).float().cpu()


def pooled_features(model, processor, images: list[Image.Image]) -> torch.Tensor:
    inputs = processor.image_processor(images=images, return_tensors="pt")
    inputs = {k: v.to(model.device, dtype=model.dtype) if v.is_floating_point() else v.to(model.device)
              for k, v in inputs.items()}
    features = model.get_image_features(**inputs).pooler_output
    if isinstance(features, torch.Tensor):  # (N, tokens, D)
        return features.mean(dim=1)
    return torch.stack([f.mean(dim=0) for f in features])  # one (tokens_i, D) per image


def as_image(image: Image.Image | str | Path) -> Image.Image:
    return image if isinstance(image, Image.Image) else load_image(image)


def unique_images(rows: list[dict]) -> list[tuple[int | str, str]]:
    """(image_id, image_path) of each distinct image_id, in order of first appearance: the row order of the
    embeddings that `contrast_rows` expects."""
    seen: dict = {}
    for row in rows:
        seen.setdefault(row["image_id"], row["image_path"])
    return list(seen.items())


def contrast_rows(rows: list[dict], embeddings: torch.Tensor) -> list[dict]:
    """SymMPO pairs: copies of `rows` with contrast_image_path (m' = nearest other image) and chosen_contrast (y'_w).

    embeddings: (N, D), one row per image of `unique_images(rows)`, in that order.
    y'_w is the chosen response of the neighbour's first pair with the same prompt (the question x is shared),
    or of its first pair if none has it. meta gains contrast_image_id. Input rows are not modified.
    """
    images = unique_images(rows)
    if embeddings.shape[0] != len(images):
        raise ValueError(f"{embeddings.shape[0]} embeddings for {len(images)} distinct images")
    neighbour = nearest_neighbours(embeddings).tolist()
    position = {image_id: i for i, (image_id, _) in enumerate(images)}
    by_image: dict = {}
    for row in rows:
        by_image.setdefault(row["image_id"], []).append(row)
    out = []
    for row in rows:
        other_id, other_path = images[neighbour[position[row["image_id"]]]]
        donor = next((r for r in by_image[other_id] if r.get("prompt") == row.get("prompt")), by_image[other_id][0])
        out.append({**row, "contrast_image_path": other_path, "chosen_contrast": donor["chosen"],
                    "meta": {**row.get("meta", {}), "contrast_image_id": other_id}})
    return out
