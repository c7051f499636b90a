"""Encoding (image, prompt, context, response) segments and summing response log-probs.

Shared by the reference log-prob stage and the preference trainer so that both score exactly the same tokens.
A segment's labels keep only the response (and the end-of-turn tokens): the prompt, the image tokens and — for
SENTINEL's C-DPO — the context are masked out.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm import tqdm

from halludpo.inference import load_image

IGNORE = -100


class ImageTokenMismatch(ValueError):
    """A sequence's image placeholder tokens do not match the image features (e.g. cut by truncation)."""


def render_turn(processor, prompt: str, assistant_text: str | None) -> str:
    """The chat template for one user turn with an image; with assistant_text, the whole finished turn."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    if assistant_text is None:
        return processor.apply_chat_template(messages, add_generation_prompt=True)
    messages.append({"role": "assistant", "content": [{"type": "text", "text": assistant_text}]})
    return processor.apply_chat_template(messages)


def join_context(context: str, response: str) -> str:
    return f"{context.rstrip()} {response.lstrip()}" if context.strip() else response


def encode_segment(processor, image, prompt: str, context: str, response: str, max_length: int) -> dict:
    """input_ids, labels (response tokens only) and the processor's image tensors for one segment.

    The scored span starts after prompt + context, found by encoding the generation prompt + context alone
    with the same processor call; any truncation is refused (it could cut image tokens or the response).
    """
    full = processor(images=[image], text=[render_turn(processor, prompt, join_context(context, response))],
                     return_tensors="pt")
    prefix_text = render_turn(processor, prompt, None) + (context.rstrip() + " " if context.strip() else "")
    prefix = processor(images=[image], text=[prefix_text], return_tensors="pt")
    input_ids = full["input_ids"][0]
    n_prefix = prefix["input_ids"].shape[1]
    if not torch.equal(input_ids[:n_prefix], prefix["input_ids"][0]):
        raise ValueError(f"the chat template does not extend the prompt prefix for prompt {prompt!r}")
    if len(input_ids) > max_length:
        raise ValueError(f"segment of {len(input_ids)} tokens exceeds max_length={max_length}; raise it — "
                         "truncation would cut the response or the image tokens")
    labels = input_ids.clone()
    labels[:n_prefix] = IGNORE
    extras = {k: v for k, v in full.items() if k not in ("input_ids", "attention_mask")}
    return {"input_ids": input_ids, "labels": labels, **extras}


def check_image_tokens(segments: Sequence[dict], image_token_id: int, expected: int, where: str) -> None:
    for i, seg in enumerate(segments):
        n = int((seg["input_ids"] == image_token_id).sum())
        if n != expected:
            raise ImageTokenMismatch(f"{where}, segment {i}: {n} image tokens but the image gives {expected} "
                                     "features; the sequence was cut or the prompt holds a stray image token")


def collate_segments(segments: Sequence[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad input_ids/labels; concatenate image tensors (pixel_values, image_sizes, image_grid_thw...)."""
    width = max(len(s["input_ids"]) for s in segments)
    batch = {
        "input_ids": torch.full((len(segments), width), pad_id, dtype=torch.long),
        "labels": torch.full((len(segments), width), IGNORE, dtype=torch.long),
        "attention_mask": torch.zeros((len(segments), width), dtype=torch.long),
    }
    for row, seg in enumerate(segments):
        n = len(seg["input_ids"])
        batch["input_ids"][row, :n] = seg["input_ids"]
        batch["labels"][row, :n] = seg["labels"]
        batch["attention_mask"][row, :n] = 1
    for key in segments[0]:
        if key not in batch:
            batch[key] = torch.cat([s[key] for s in segments])
    return batch


def summed_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of log p(token) over labelled positions (no length normalisation) and the token counts, (N,) each."""
    logits = logits[:, :-1].float()  # position t predicts token t+1
    targets = labels[:, 1:]
    mask = targets != IGNORE
    token_logps = torch.gather(logits.log_softmax(-1), 2, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (token_logps * mask).sum(-1), mask.sum(-1)


def forward_logps(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs, use_cache=False).logits
    return summed_logps(logits, batch["labels"])


def pair_segments(processor, row: dict, max_length: int, image=None) -> list[dict]:
    """[chosen, rejected] segments of a pairs.jsonl row (the context, if any, is masked out)."""
    image = image if image is not None else load_image(row["image_path"])
    context = row.get("context") or ""
    return [encode_segment(processor, image, row["prompt"], context, row[key], max_length)
            for key in ("chosen", "rejected")]


@torch.no_grad()
def score_pairs(model, processor, rows: Sequence[dict], max_length: int, batch_size: int = 16,
                progress: bool = True) -> torch.Tensor:
    """(2, N) summed log-probs [chosen; rejected] of every pair under `model`, with its image, batched."""
    model.eval()
    pad_id = processor.tokenizer.pad_token_id
    device = next(model.parameters()).device
    out = []
    for start in tqdm(range(0, len(rows), batch_size), desc="reference log-probs", disable=not progress):
        chunk = rows[start: start + batch_size]
        segments = [pair_segments(processor, r, max_length) for r in chunk]
        # batch layout: [chosen_1..chosen_b, rejected_1..rejected_b]
        batch = collate_segments([s[0] for s in segments] + [s[1] for s in segments], pad_id)
        logps, _ = forward_logps(model, {k: v.to(device) for k, v in batch.items()})
        out.append(logps.view(2, len(chunk)).cpu())
    return torch.cat(out, dim=1)
