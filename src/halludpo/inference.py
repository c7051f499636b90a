"""Batched generation through a processor's chat template (shared by the generate and evaluate stages)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

from halludpo.io import load_image  # re-exported: stages import it from here
from halludpo.models import chat_prompt


def as_image(image: Image.Image | str | Path) -> Image.Image:
    """An RGB image from a PIL image (converted if it is not RGB) or a path (opened with load_image)."""
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    return load_image(image)


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


SENTENCE_END_TOKENS = (".", "!", "?")


def sentence_stop_kwargs(tokenizer) -> dict:
    """generate() kwargs that stop a sequence at the end of its first sentence: stop_strings '.', '!', '?' when the
    tokenizer supports them, else (word-level tokenizers, which transformers' StopStringCriteria cannot map) EOS
    plus the sentence-end tokens themselves as end-of-sequence ids."""
    from halludpo.apasi import _stop_strings_supported

    if _stop_strings_supported(tokenizer):
        return {"stop_strings": list(SENTENCE_END_TOKENS), "tokenizer": tokenizer}
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for mark in SENTENCE_END_TOKENS:
        token_id = tokenizer.convert_tokens_to_ids(mark)
        if token_id is not None and token_id != tokenizer.unk_token_id:
            ids.append(token_id)
    return {"eos_token_id": ids}


def continue_prompt(head: str, context: str) -> str:
    """The generation prompt followed by the assistant's text so far (a space between when the prompt does not
    end in whitespace); no trailing space, which would be an odd token for sentencepiece tokenizers."""
    context = context.strip()
    if not context:
        return head
    return head + context if head[-1:].isspace() else f"{head} {context}"


class SentenceSampler:
    """SENTINEL's sample_fn: for each (item, context), n sampled continuations of (image, question, context) that
    stop at the end of one sentence ('.', '!', '?' or EOS); an immediate EOS gives an empty sample.

    item: a mapping with image_path and prompt. One generate call per batch of entries (num_return_sequences=n);
    the global torch RNG is seeded once at construction, so a run with the same config gives the same samples.
    """

    def __init__(self, model, processor, n: int, temperature: float, max_new_tokens: int, top_p: float = 1.0,
                 seed: int = 0, progress: bool = True, desc: str = "sentinel sampling") -> None:
        from halludpo.sentinel import cut_at_sentence_end

        self.model, self.processor, self.n = model, processor, int(n)
        self.gen_kwargs = {"do_sample": True, "temperature": float(temperature), "top_p": float(top_p),
                           "max_new_tokens": int(max_new_tokens), "num_return_sequences": self.n,
                           **sentence_stop_kwargs(processor.tokenizer)}
        self.cut = cut_at_sentence_end
        self.bar = tqdm(desc=desc, unit="context", disable=not progress)
        torch.manual_seed(seed)

    @torch.no_grad()
    def __call__(self, batch: Sequence[tuple[dict, str]]) -> list[list[str]]:
        if not batch:
            return []
        self.processor.tokenizer.padding_side = "left"
        device = next(self.model.parameters()).device
        texts = [continue_prompt(chat_prompt(self.processor, item["prompt"]), context) for item, context in batch]
        images = [load_image(item["image_path"]) for item, _ in batch]
        inputs = self.processor(images=images, text=texts, return_tensors="pt", padding=True).to(device)
        out = self.model.generate(**inputs, **self.gen_kwargs)
        decoded = self.processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        samples = [self.cut(text.strip()).strip() for text in decoded]
        self.bar.update(len(batch))
        return [samples[i * self.n: (i + 1) * self.n] for i in range(len(batch))]

    def close(self) -> None:
        self.bar.close()
