"""Stage `generate` (rule generate): model_k describes a set of images -> generations.jsonl.

    python -m halludpo.generate round=0 split=eval                          # shard 0 of 1 (the shards/ file)
    python -m halludpo.generate round=0 split=eval shard=2 shards=8         # shard 2 of 8
    python -m halludpo.generate round=0 split=eval gather=true shards=8     # -> round_0/generate/eval.jsonl

Shards take contiguous runs of whole batches of the images sorted by id (halludpo.shards), so the gathered file is
the same for any shard count; a shard resumes from its .partial file after a kill.
Each row: {image_id, image_path, prompt, response, model, round, sampling} (docs/methods.md "Data contracts").
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

from omegaconf import DictConfig

from halludpo import paths
from halludpo.config import round_seed, stage_main, to_plain
from halludpo.inference import decoding_kwargs, generate_texts
from halludpo.io import InputError, read_json
from halludpo.models import load_model_and_processor
from halludpo.shards import batch_seed, gather_jsonl, input_fingerprint, run_batches, shard_file, shard_files, \
    shard_range

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


IMAGE_PROMPTS = "image"  # method.generation.prompts: each image's own prompt (images[].prompt of the instances)


def image_prompt(image: dict) -> str:
    if not isinstance(image.get("prompt"), str) or not image["prompt"].strip():
        raise InputError(f"image {image.get('id')} ({image.get('file_name')}): no `prompt` in the instances file, "
                         f"which method.generation.prompts={IMAGE_PROMPTS!r} needs; give a prompt list instead")
    return image["prompt"]


def image_prompts(images: list[dict], prompts: str | list[str], seed: int) -> list[str]:
    """Each image's prompt: with a list, one drawn per image with the seed (over the whole list, so a shard
    draws what an unsharded run does); with prompts == IMAGE_PROMPTS, each image's own `prompt` field of the
    instances file (COCO: detail-23k's)."""
    if prompts == IMAGE_PROMPTS:
        return [image_prompt(im) for im in images]
    prompts = [prompts] if isinstance(prompts, str) else prompts
    rng = random.Random(seed)
    return [prompts[0] if len(prompts) == 1 else rng.choice(prompts) for _ in images]


def describe_images(model, processor, images: list[dict], images_dir: str | Path, prompts: str | list[str],
                    generation: dict, max_new_tokens: int, batch_size: int, seed: int, model_name: str,
                    round_k: int, positions: range | None = None, resume: tuple[Path, str] | None = None
                    ) -> list[dict]:
    """One description per image of `positions` (default: all), in batches of batch_size; batch b samples
    with batch_seed(seed, its first position). With resume=(shard file, fingerprint), finished batches go to
    the shard's .partial file and the shard file is written at the end (halludpo.shards.run_batches)."""
    paths_ = [str(Path(images_dir) / im["file_name"]) for im in images]
    per_image = image_prompts(images, prompts, seed)
    kwargs = decoding_kwargs(generation, max_new_tokens)
    sampling = kwargs | {"seed": seed}
    positions = range(len(images)) if positions is None else positions

    def work(start: int, stop: int) -> list[dict]:
        responses = generate_texts(model, processor, paths_[start:stop], per_image[start:stop], kwargs, batch_size,
                                   batch_seed(seed, start), progress=False)
        return [{"image_id": im["id"], "image_path": p, "prompt": prompt, "response": r, "model": model_name,
                 "round": round_k, "sampling": sampling}
                for im, p, prompt, r in zip(images[start:stop], paths_[start:stop], per_image[start:stop],
                                            responses)]

    if resume is not None:
        out, fingerprint = resume
        return run_batches(out, positions, batch_size, work, fingerprint, desc=f"describe r{round_k}")
    return [row for start in range(positions.start, positions.stop, batch_size)
            for row in work(start, min(start + batch_size, positions.stop))]


def run(cfg: DictConfig) -> None:
    k = cfg.round
    model_path = paths.model_dir(cfg, k)
    if cfg.split == "eval":  # the CHAIR descriptions
        chair = cfg.eval.chair
        images = select_images(cfg.data.eval_instances, chair.n_images, cfg.eval.seed, chair.image_ids_file)
        images_dir, prompts, generation = cfg.data.eval_images, chair.prompt, to_plain(cfg.eval.generation)
        max_new_tokens, batch_size, seed = chair.max_new_tokens, cfg.eval.batch_size, cfg.eval.seed
        out = paths.eval_generations(cfg, k)
        instances = cfg.data.eval_instances
    elif cfg.split == "gen":  # round k's raw material for preference pairs, on the unlabelled images
        gen = cfg.method.generation
        seed = round_seed(cfg, k)  # new images and samples every round
        images = select_images(cfg.data.gen_instances, gen.n_images, seed)
        prompts = gen.prompts if isinstance(gen.prompts, str) else list(gen.prompts)
        images_dir, generation = cfg.data.gen_images, to_plain(gen.decoding)
        max_new_tokens, batch_size = gen.max_new_tokens, gen.batch_size
        out = paths.gen_generations(cfg, k)
        instances = cfg.data.gen_instances
    else:
        raise ValueError(f"split={cfg.split!r}; valid: eval, gen")
    if cfg.gather:
        n = gather_jsonl(shard_files(out, cfg.shards), out)
        log.info("%d descriptions from %d shard(s) -> %s", n, cfg.shards, out)
        return
    positions = shard_range(len(images), batch_size, cfg.shard, cfg.shards)
    target = shard_file(out, cfg.shard, cfg.shards)
    fingerprint = input_fingerprint(to_plain(cfg), [model_path, instances])
    model, processor = load_model_and_processor(model_path, cfg.model.family, cfg.model.dtype,
                                                cfg.model.device)
    rows = describe_images(model, processor, images, images_dir, prompts, generation, max_new_tokens, batch_size,
                           seed, str(model_path), k, positions, resume=(target, fingerprint))
    log.info("shard %d of %d: %d descriptions -> %s", cfg.shard, cfg.shards, len(rows), target)


main = stage_main(run)

if __name__ == "__main__":
    main()
