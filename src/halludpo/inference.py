"""Batched generation through a processor's chat template (shared by the generate and evaluate stages)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from halludpo.io import InputError
from halludpo.models import chat_prompt


def load_image(path: str | Path) -> Image.Image:
    """Open an RGB image; a missing or corrupt file raises InputError naming it."""
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except FileNotFoundError:
        raise InputError(f"{path}: image not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise InputError(f"{path}: corrupt or unreadable image ({err})") from None


def decoding_kwargs(generation: dict, max_new_tokens: int) -> dict:
    """generate() keyword arguments from a config block; sampling knobs only when sampling."""
    kwargs = {"max_new_tokens": int(max_new_tokens), "do_sample": bool(generation.get("do_sample", False)),
              "num_beams": int(generation.get("num_beams", 1))}
    if kwargs["do_sample"]:
        kwargs.update(temperature=float(generation.get("temperature", 1.0)), top_p=float(generation.get("top_p", 1.0)))
    if generation.get("repetition_penalty"):
        kwargs["repetition_penalty"] = float(generation["repetition_penalty"])
    return kwargs


@torch.no_grad()
def generate_texts(model, processor, image_paths: Sequence[str | Path], prompts: Sequence[str], gen_kwargs: dict,
                   batch_size: int = 32, seed: int = 0, desc: str = "generate", progress: bool = True) -> list[str]:
    """One response per (image, prompt); batched, left-padded, decoded without special tokens.

    Sampling is seeded once (torch.manual_seed(seed)) so the same config gives the same files.
    """
    if len(image_paths) != len(prompts):
        raise ValueError(f"{len(image_paths)} images but {len(prompts)} prompts")
    torch.manual_seed(seed)
    processor.tokenizer.padding_side = "left"
    responses: list[str] = []
    device = next(model.parameters()).device
    for start in tqdm(range(0, len(prompts), batch_size), desc=desc, disable=not progress, unit="batch"):
        batch_paths = image_paths[start: start + batch_size]
        texts = [chat_prompt(processor, p) for p in prompts[start: start + batch_size]]
        images = [load_image(p) for p in batch_paths]
        inputs = processor(images=images, text=texts, return_tensors="pt", padding=True).to(device)
        out = model.generate(**inputs, **gen_kwargs)
        new_tokens = out[:, inputs["input_ids"].shape[1]:]
        responses += [r.strip() for r in processor.batch_decode(new_tokens, skip_special_tokens=True)]
    return responses
