"""Stage `generate` (rule generate): model_k describes a set of images -> generations.jsonl.

    python -m halludpo.generate round=0 split=eval     # the CHAIR descriptions of round 0's model

Each row: {image_id, image_path, prompt, response, model, round, sampling} (DESIGN.md contract).
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

from omegaconf import DictConfig

from halludpo import paths
from halludpo.config import stage_main, to_plain
from halludpo.inference import decoding_kwargs, generate_texts
from halludpo.io import InputError, read_json, write_jsonl
from halludpo.models import load_model_and_processor

log = logging.getLogger(__name__)


def select_images(instances_path: str | Path, n_images: int | None, seed: int,
                  image_ids_file: str | Path | None = None) -> list[dict]:
    """The images to describe: a fixed id list when given, else a seeded sample of n (all when n is None)."""
    images = read_json(instances_path)["images"]
    if image_ids_file:
        wanted = read_json(image_ids_file)
        by_id = {im["id"]: im for im in images}
        unknown = [i for i in wanted if i not in by_id]
        if unknown:
            raise InputError(f"{image_ids_file}: image id(s) {unknown[:5]} not in {instances_path}")
        return [by_id[i] for i in wanted]
    images = sorted(images, key=lambda im: im["id"])
    if n_images is None or n_images >= len(images):
        if n_images is not None and n_images > len(images):
            raise InputError(f"{instances_path}: {len(images)} images, fewer than the {n_images} asked for")
        return images
    return sorted(random.Random(seed).sample(images, n_images), key=lambda im: im["id"])


def describe_images(model, processor, images: list[dict], images_dir: str | Path, prompt: str, generation: dict,
                    max_new_tokens: int, batch_size: int, seed: int, model_name: str, round_k: int) -> list[dict]:
    paths_ = [str(Path(images_dir) / im["file_name"]) for im in images]
    kwargs = decoding_kwargs(generation, max_new_tokens)
    responses = generate_texts(model, processor, paths_, [prompt] * len(images), kwargs, batch_size, seed,
                               desc=f"describe r{round_k}")
    sampling = kwargs | {"seed": seed}
    return [{"image_id": im["id"], "image_path": p, "prompt": prompt, "response": r, "model": model_name,
             "round": round_k, "sampling": sampling} for im, p, r in zip(images, paths_, responses)]


def run(cfg: DictConfig) -> None:
    k = cfg.round
    if cfg.split != "eval":
        raise ValueError(f"split={cfg.split!r}: only 'eval' generation is wired so far")
    chair = cfg.eval.chair
    images = select_images(cfg.data.eval_instances, chair.n_images, cfg.eval.seed, chair.image_ids_file)
    model_path = paths.model_dir(cfg, k)
    model, processor = load_model_and_processor(model_path, cfg.model.family, cfg.model.dtype)
    rows = describe_images(model, processor, images, cfg.data.eval_images, chair.prompt,
                           to_plain(cfg.eval.generation), chair.max_new_tokens, cfg.eval.batch_size, cfg.eval.seed,
                           str(model_path), k)
    out = paths.eval_generations(cfg, k)
    write_jsonl(out, rows)
    log.info("%d descriptions -> %s", len(rows), out)


main = stage_main(run)

if __name__ == "__main__":
    main()
