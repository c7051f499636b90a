"""Contrast images for the image-conditional losses: mDPO's corrupted image, SymMPO's contrast image m'.

Everything random is seeded locally (random.Random / numpy Generator built from a seed, never global state), and
per-example seeds come from `example_seed`, a hash of (config seed, image_id, pair index) that is stable across
processes and machines (Python's hash() is salted per process).

mDPO: m_c = corrupt_image(m, example_seed(...)), sampled once per example so policy and reference see the same crop.
SymMPO: m' = the nearest neighbour of m among the training images by the model's own mean-pooled image features
(`image_embeddings` -> `nearest_neighbours` -> `contrast_rows`, which adds contrast_image_path and chosen_contrast
to each pair, docs/methods.md "Data contracts"); `black_image` and `noise_image` are the ablation contrasts.

Stage `contrast` (config group contrast/, kind = corrupt | black | noise | neighbour):

    python -m halludpo.contrast step=embeddings round=0   # rule contrast_embeddings (kind=neighbour only)
    python -m halludpo.contrast round=0                   # rule contrast

reads round_k/pairs/pairs.jsonl and writes round_k/pairs/contrast.jsonl = the pairs rows plus
    contrast_image_path   every kind: the image scored in the contrast segments (m_c for mDPO, m' for SymMPO)
    chosen_contrast       kind=neighbour: y'_w, the neighbour's chosen response
    meta.contrast_kind (+ meta.contrast_seed for seeded kinds, meta.contrast_image_id for neighbour).
The image-transform kinds (corrupt, black, noise) store one PNG per example under round_k/pairs/contrast_images/
(lossless, written once): the reference log-prob stage and the trainer both load that same file. kind=neighbour
uses model_k's pooled image features, computed once per round into round_k/pairs/embeddings.safetensors.
"""

from __future__ import annotations

import hashlib
import json
import math
import logging
import random
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from omegaconf import DictConfig

from halludpo import manifest, paths
from halludpo.config import stage_main, to_plain
from halludpo.inference import as_image, load_image
from halludpo.io import InputError, atomic_path, read_jsonl, write_jsonl
from halludpo.logprobs import PAIR_FIELDS

log = logging.getLogger(__name__)

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


def other_similarities(embeddings: torch.Tensor, chunk_size: int = 1024):
    """Yield (chunk_size, N) blocks of cosine similarities between rows of (N, D) embeddings, a row's similarity to
    itself set to -inf (an N x N matrix does not fit for large N)."""
    if embeddings.dim() != 2 or embeddings.shape[0] < 2:
        raise ValueError(f"need (N, D) embeddings with N >= 2, got shape {tuple(embeddings.shape)}")
    unit = F.normalize(embeddings.double(), dim=1)
    for start in range(0, unit.shape[0], chunk_size):
        sim = unit[start:start + chunk_size] @ unit.T
        rows = torch.arange(sim.shape[0])
        sim[rows, rows + start] = -math.inf
        yield sim


def nearest_neighbours(embeddings: torch.Tensor, chunk_size: int = 1024) -> torch.Tensor:
    """For each row of (N, D) embeddings, the index of the most cosine-similar OTHER row, as a (N,) LongTensor.

    A row is never its own neighbour; ties go to the lowest index (argmax returns the first maximum).
    """
    return torch.cat([sim.argmax(dim=1) for sim in other_similarities(embeddings, chunk_size)])


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


def unique_images(rows: list[dict]) -> list[tuple[int | str, str]]:
    """(image_id, image_path) of each distinct image_id, in order of first appearance: the row order of the
    embeddings that `contrast_rows` expects."""
    seen: dict = {}
    for row in rows:
        seen.setdefault(row["image_id"], row["image_path"])
    return list(seen.items())


def ranked_neighbours(embeddings: torch.Tensor, chunk_size: int = 1024) -> torch.Tensor:
    """(N, N-1) LongTensor: for each row, the OTHER rows by decreasing cosine similarity (ties: lowest index first),
    so column 0 is `nearest_neighbours`."""
    return torch.cat([torch.sort(sim, dim=1, descending=True, stable=True).indices[:, :-1]
                      for sim in other_similarities(embeddings, chunk_size)])


def known_objects(rows: list[dict]) -> set[str]:
    """Objects an image is known to show: its rows' verified chosen and context objects (SENTINEL's meta
    chosen_objects / context_objects; empty for methods that do not record them, such as APASI)."""
    return {o for r in rows for key in ("chosen_objects", "context_objects") for o in r.get("meta", {}).get(key, [])}


def contrast_rows(rows: list[dict], embeddings: torch.Tensor, distinct: bool = False) -> list[dict]:
    """SymMPO pairs: copies of `rows` with contrast_image_path (m' = nearest other image) and chosen_contrast (y'_w).

    embeddings: (N, D), one row per image of `unique_images(rows)`, in that order.
    y'_w is the chosen response of one of the neighbour's pairs (its donor): one with the same prompt (the question
    x is shared) if any, and among those one at the same meta.step if any (sentence-level pairs: y'_w is then the
    neighbour's sentence at the same position, scored after the row's own context). meta gains contrast_image_id.
    Input rows are not modified.

    distinct: take the nearest neighbour with an informative donor (meta.contrast_rank = the neighbour's rank,
    0 = nearest): y'_w differs from y_w (y'_w == y_w makes both image-contrast margins identically 0 and SymMPO
    degenerates to DPO + anchors; a model that describes similar images alike makes that common), and where the
    rows record objects (`known_objects`), y'_w names none known in m and y_w none known in m' (else a margin asks
    to prefer one true sentence over another). Falls back to the nearest neighbour's first donor whose y'_w differs,
    else to the nearest.
    """
    images = unique_images(rows)
    if embeddings.shape[0] != len(images):
        raise ValueError(f"{embeddings.shape[0]} embeddings for {len(images)} distinct images")
    ranked = ranked_neighbours(embeddings) if distinct else nearest_neighbours(embeddings).unsqueeze(1)
    position = {image_id: i for i, (image_id, _) in enumerate(images)}
    by_image: dict = {}
    for row in rows:
        by_image.setdefault(row["image_id"], []).append(row)
    present = {image_id: known_objects(image_rows) for image_id, image_rows in by_image.items()}

    donor_lists: dict = {}  # (image, prompt, step) -> donors; rows of one image share them

    def donors(other_id, row) -> list[dict]:
        prompt, step = row.get("prompt"), row.get("meta", {}).get("step")
        key = (other_id, prompt, step)
        if key not in donor_lists:
            same_prompt = [r for r in by_image[other_id] if r.get("prompt") == prompt] or by_image[other_id]
            donor_lists[key] = sorted(same_prompt, key=lambda r: r.get("meta", {}).get("step") != step)
        return donor_lists[key]  # stable sort: the same step first, then file order

    def informative(row, other_id, donor) -> bool:
        return (donor["chosen"] != row["chosen"]
                and not present[row["image_id"]] & set(donor.get("meta", {}).get("chosen_objects", []))
                and not present[other_id] & set(row.get("meta", {}).get("chosen_objects", [])))

    def choose(row) -> tuple[int, int, dict]:
        """(rank, index into images, donor row) of the row's contrast image."""
        candidates = ranked[position[row["image_id"]]].tolist()
        for rank, c in enumerate(candidates if distinct else []):
            donor = next((d for d in donors(images[c][0], row) if informative(row, images[c][0], d)), None)
            if donor is not None:
                return rank, c, donor
        nearest = donors(images[candidates[0]][0], row)
        return 0, candidates[0], next((d for d in nearest if d["chosen"] != row["chosen"]), nearest[0])

    out = []
    for row in rows:
        rank, c, donor = choose(row)
        other_id, other_path = images[c]
        meta = {**row.get("meta", {}), "contrast_image_id": other_id} | ({"contrast_rank": rank} if distinct else {})
        out.append({**row, "contrast_image_path": other_path, "chosen_contrast": donor["chosen"], "meta": meta})
    return out


# ---------------------------------------------------------------------------------------------------------------
# Stage

IMAGE_KINDS = ("corrupt", "black", "noise")  # a transformed copy of m, stored once per example
KINDS = ("none", *IMAGE_KINDS, "neighbour")


def check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"contrast.kind={kind!r}; valid: {', '.join(KINDS)}")
    return kind


def transformed_image(kind: str, image: Image.Image, seed: int, params: dict) -> Image.Image:
    """The contrast image of an image-transform kind (corrupt: mDPO's crop; black, noise: the ablations)."""
    if kind == "corrupt":
        return corrupt_image(image, seed, params.get("min_area", 0.01), params.get("max_area", 0.2))
    if kind == "black":
        return black_image(image)
    if kind == "noise":
        return noise_image(image, seed, params.get("std", 0.5))
    raise ValueError(f"contrast.kind={kind!r} is not an image transform; those are: {', '.join(IMAGE_KINDS)}")


def image_contrast_rows(rows: list[dict], kind: str, out_dir: str | Path, seed: int, params: dict | None = None,
                        source: str = "pairs") -> list[dict]:
    """Copies of `rows` with contrast_image_path: example i's transformed image, saved ONCE as out_dir/<i>.png.

    The per-example seed is example_seed(seed, image_id, i), i = the row's index (its pair index in the file).
    Files are written to a temporary folder that replaces out_dir only when every image is saved. PNG is
    lossless, so whoever loads the file later (reference log-probs, trainer) sees exactly these pixels.
    """
    params = params or {}
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        out = save_transformed(rows, kind, out_dir, tmp, seed, params, source)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    manifest.record_tree(out_dir)  # the stage's manifest lists every contrast image
    return out


def save_transformed(rows: list[dict], kind: str, out_dir: Path, tmp: Path, seed: int, params: dict,
                     source: str) -> list[dict]:
    """image_contrast_rows' loop: save each example's image into tmp; rows name its final place in out_dir."""
    out, cache = [], {}
    for i, row in enumerate(rows):
        path = row["image_path"]
        if path not in cache:
            try:
                cache = {path: load_image(path)}  # pairs of one image are usually adjacent: keep the last one
            except InputError as err:
                raise InputError(f"{source}:{i + 1}: {err}") from None
        ex_seed = example_seed(seed, row["image_id"], i)
        name = f"{i:06d}.png"
        transformed_image(kind, cache[path], ex_seed, params).save(tmp / name, format="PNG")
        meta = {**row.get("meta", {}), "contrast_kind": kind}
        if kind != "black":
            meta["contrast_seed"] = ex_seed
        out.append({**row, "contrast_image_path": str(out_dir / name), "meta": meta})
    return out


def save_embeddings(path: str | Path, embeddings: torch.Tensor, images: list[tuple], model: str) -> None:
    """(N, D) embeddings + the (image_id, image_path) of each row and the model, as one safetensors file."""
    from safetensors.torch import save_file

    if embeddings.shape[0] != len(images):
        raise ValueError(f"{embeddings.shape[0]} embeddings for {len(images)} images")
    metadata = {"images": json.dumps([list(i) for i in images]), "model": str(model)}
    with atomic_path(path) as tmp:
        save_file({"embeddings": embeddings.contiguous()}, str(tmp), metadata=metadata)


def load_embeddings(path: str | Path, rows: list[dict]) -> torch.Tensor:
    """The cached embeddings, checked to be those of unique_images(rows) in that order."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: embeddings not found (rule contrast_embeddings writes them)")
    with safe_open(str(path), framework="pt") as f:
        images = [tuple(i) for i in json.loads(f.metadata()["images"])]
        embeddings = f.get_tensor("embeddings")
    expected = [(image_id, image_path) for image_id, image_path in unique_images(rows)]
    if images != expected:
        raise InputError(f"{path}: embeddings are of {len(images)} other images than the {len(expected)} of the "
                         "pairs (stale cache: rerun rule contrast_embeddings)")
    return embeddings


def run(cfg: DictConfig) -> None:
    k = cfg.round
    contrast = to_plain(cfg.contrast)
    kind = check_kind(contrast["kind"])
    if kind == "none":
        raise ValueError("contrast.kind=none: there is no contrast data to build (choose contrast=mdpo|symmpo|...)")
    if cfg.step not in ("embeddings", "main"):
        raise ValueError(f"step={cfg.step!r}; contrast knows: embeddings, main")
    if cfg.step == "embeddings" and kind != "neighbour":
        raise ValueError(f"step=embeddings is for contrast.kind=neighbour, not {kind!r}")
    source = paths.pairs_jsonl(cfg, k)
    rows = read_jsonl(source, required=PAIR_FIELDS)
    if not rows:
        raise InputError(f"{source}: no preference pairs")
    if cfg.step == "embeddings":
        from halludpo.models import load_model_and_processor

        model_path = paths.model_dir(cfg, k)
        model, processor = load_model_and_processor(model_path, cfg.model.family, cfg.model.dtype,
                                                    cfg.model.device)
        images = unique_images(rows)
        embeddings = image_embeddings(model, processor, [p for _, p in images], contrast.get("batch_size", 16))
        save_embeddings(paths.embeddings_file(cfg, k), embeddings, images, str(model_path))
        log.info("round %d: embeddings of %d images -> %s", k, len(images), paths.embeddings_file(cfg, k))
        return
    if kind == "neighbour":
        embeddings = load_embeddings(paths.embeddings_file(cfg, k), rows)
        out = [r | {"meta": {**r["meta"], "contrast_kind": kind}}
               for r in contrast_rows(rows, embeddings, distinct=contrast.get("distinct", True))]
        same = sum(r["chosen_contrast"] == r["chosen"] for r in out)
        if same:
            log.warning("round %d: %d of %d pairs have y'_w == y_w (no image gives another chosen response): their "
                        "SymMPO image-contrast terms are constant", k, same, len(out))
    else:
        out = image_contrast_rows(rows, kind, paths.contrast_images_dir(cfg, k), contrast.get("seed", cfg.seed),
                                  contrast, str(source))
    write_jsonl(paths.contrast_jsonl(cfg, k), out)
    log.info("round %d: %d %s contrast pairs -> %s", k, len(out), kind, paths.contrast_jsonl(cfg, k))


main = stage_main(run)

if __name__ == "__main__":
    main()
