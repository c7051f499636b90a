"""Encoding (image, prompt, context, response) segments and summing response log-probs.

Shared by the reference log-prob stage and the preference trainer so that both score exactly the same tokens.
A segment's labels keep only the response (and the end-of-turn tokens, unless the response is a sentence in the
middle of an answer): the prompt, the image tokens and — for SENTINEL's C-DPO — the context are masked out.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm import tqdm

from halludpo.inference import load_image
from halludpo.io import InputError, origin

IGNORE = -100

PAIR_FIELDS = ("image_id", "image_path", "prompt", "context", "chosen", "rejected", "method", "meta")

# The scored (image, response) segments of one example per loss, in the row order of halludpo.losses:
# (name, image field, response field). The name is the key of the segment's reference log-prob in ref_logps:
# the response field, + "@contrast" when it is scored with the contrast image (contrast_image_path).
SEGMENTS: dict[str, tuple[tuple[str, str, str], ...]] = {
    "sigmoid": (("chosen", "image_path", "chosen"), ("rejected", "image_path", "rejected")),
    "mdpo": (("chosen", "image_path", "chosen"), ("rejected", "image_path", "rejected"),
             ("chosen@contrast", "contrast_image_path", "chosen")),
    "symmpo": (("chosen", "image_path", "chosen"), ("rejected", "image_path", "rejected"),
               ("chosen_contrast", "image_path", "chosen_contrast"),
               ("chosen@contrast", "contrast_image_path", "chosen"),
               ("chosen_contrast@contrast", "contrast_image_path", "chosen_contrast")),
}
SEGMENTS["cdpo"] = SEGMENTS["sigmoid"]


def segment_names(loss: str) -> list[str]:
    """The ref_logps keys of loss's segments, in row order."""
    return [name for name, _, _ in segment_specs(loss)]


def segment_specs(loss: str) -> tuple[tuple[str, str, str], ...]:
    if loss not in SEGMENTS:
        raise ValueError(f"unknown preference loss {loss!r}; valid: {', '.join(sorted(SEGMENTS))}")
    return SEGMENTS[loss]


def required_fields(loss: str) -> tuple[str, ...]:
    """The row fields loss's segments read: PAIR_FIELDS + contrast_image_path (mdpo) + chosen_contrast (symmpo)."""
    extra = {f for _, image, response in segment_specs(loss) for f in (image, response)} - set(PAIR_FIELDS)
    return PAIR_FIELDS + tuple(sorted(extra))


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
    """The assistant text: context + " " + response; an empty response (a stop pair's "end here") is the context."""
    if not response.strip():
        return context.rstrip()
    return f"{context.rstrip()} {response.lstrip()}" if context.strip() else response


def encode_segment(processor, image, prompt: str, context: str, response: str, max_length: int,
                   score_end: bool = True) -> dict:
    """input_ids, labels (response tokens only) and the processor's image tensors for one segment.

    The scored span starts after prompt + context: the token count of the generation prompt alone, or with a
    context, of the finished turn's text cut after the context (a cut inside the assistant text, so that every
    template tokenizes it as it does in the whole turn); any truncation is refused (it could cut image tokens or
    the response). score_end=False also masks the end-of-turn tokens after the response: for a sentence in the
    middle of an answer (SENTINEL's pairs before the last sentence), whose end-of-turn would teach the answer to
    stop there.
    """
    answer = join_context(context, response)
    full_text = render_turn(processor, prompt, answer)
    full = processor(images=[image], text=[full_text], return_tensors="pt")
    input_ids = full["input_ids"][0]
    if len(input_ids) > max_length:
        raise ValueError(f"segment of {len(input_ids)} tokens exceeds max_length={max_length}; raise it — "
                         "truncation would cut the response or the image tokens")
    prefix_text = (full_text[:answer_start(full_text, answer) + len(context.rstrip())] if context.strip()
                   else render_turn(processor, prompt, None))
    labels = input_ids.clone()
    labels[:prefix_length(processor, image, prefix_text, input_ids, "prompt and context")] = IGNORE
    if not score_end:
        end_text = full_text[:answer_start(full_text, answer) + len(answer.rstrip())]
        labels[prefix_length(processor, image, end_text, input_ids, "response"):] = IGNORE
    # everything else the processor returns goes to the model as is: image tensors (pixel_values, image_sizes,
    # image_grid_thw) and per-token fields (Qwen-VL's mm_token_type_ids, kept 1-D like input_ids)
    extras = {k: v[0] if v.shape == full["input_ids"].shape else v for k, v in full.items()
              if k not in ("input_ids", "attention_mask")}
    return {"input_ids": input_ids, "labels": labels, **extras}


def answer_start(full_text: str, answer: str) -> int:
    """Where the assistant text begins in a rendered turn (only asked when a cut inside it is needed)."""
    start = full_text.rfind(answer)
    if start < 0:
        raise ValueError(f"the chat template changed the assistant text {answer[:80]!r}: its tokens cannot be "
                         "told from the prompt's")
    return start


def prefix_length(processor, image, text: str, input_ids: torch.Tensor, what: str) -> int:
    """Number of tokens of `text`, checked to be a token-for-token prefix of the whole turn's input_ids."""
    ids = processor(images=[image], text=[text], return_tensors="pt")["input_ids"][0]
    if not torch.equal(input_ids[:len(ids)], ids):
        raise ValueError(f"the chat template does not extend the {what} token for token: {text[-80:]!r}")
    return len(ids)


def ends_answer(row: dict) -> bool:
    """Whether a pair's responses end the answer: all but SENTINEL's sentences before the last one
    (meta.is_last_sent false), which continue it."""
    return bool((row.get("meta") or {}).get("is_last_sent", True))


def scores_end(row: dict, response: str) -> bool:
    """Whether a segment's end-of-turn is scored: when the row's responses end the answer (ends_answer), and
    always for an empty response, whose end-of-turn is all it says (a stop pair's "end the answer here")."""
    return ends_answer(row) or not response.strip()


def check_image_tokens(segments: Sequence[dict], image_token_id: int, expected: int | Sequence[int],
                       where: str) -> None:
    """Each segment holds exactly its image's number of features as image tokens (`expected`: one count for
    all segments, or one per segment when their images differ)."""
    counts = [expected] * len(segments) if isinstance(expected, int) else list(expected)
    for i, (seg, expected) in enumerate(zip(segments, counts, strict=True)):
        n = int((seg["input_ids"] == image_token_id).sum())
        if n != expected:
            raise ImageTokenMismatch(f"{where}, segment {i}: {n} image tokens but the image gives {expected} "
                                     "features; the sequence was cut or the prompt holds a stray image token")


def concat_padded(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Concatenate along dim 0, zero-padding the other dims to the largest (LLaVA-NeXT's pixel_values have one
    row per image and a crop count that depends on the image size; the model drops the padded crops)."""
    shape = [max(sizes) for sizes in zip(*(t.shape[1:] for t in tensors))]
    padded = []
    for t in tensors:
        pad = [p for size, target in zip(reversed(t.shape[1:]), reversed(shape)) for p in (0, target - size)]
        padded.append(torch.nn.functional.pad(t, pad) if any(pad) else t)
    return torch.cat(padded)


def collate_segments(segments: Sequence[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad input_ids/labels and any other per-token field (1-D, as long as input_ids) with 0; concatenate
    image tensors along their first dim (per image: pixel_values, image_sizes, image_grid_thw; Qwen-VL's
    pixel_values are per patch, so concatenating along patches is what its model expects)."""
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
        if key in batch:
            continue
        values = [s[key] for s in segments]
        if all(v.dim() == 1 and len(v) == len(s["input_ids"]) for v, s in zip(values, segments)):
            batch[key] = torch.zeros((len(segments), width), dtype=values[0].dtype)
            for row, v in enumerate(values):
                batch[key][row, :len(v)] = v
        else:
            batch[key] = concat_padded(values)
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
    return example_segments(processor, row, "sigmoid", max_length, {row["image_path"]: image} if image is not None else None)


def example_images(row: dict, loss: str, images: dict | None = None, named_by: str | None = None) -> dict:
    """{path: PIL image} of every image loss's segments of `row` use, each loaded once (`images` pre-filled).
    A missing or corrupt image is reported after `named_by`, by default the row's "<file>:<line>" (io.origin)."""
    images = dict(images or {})
    named_by = named_by or origin(row)
    for _, image_field, _ in segment_specs(loss):
        path = row[image_field]
        if path not in images:
            try:
                images[path] = load_image(path)
            except InputError as err:
                raise (InputError(f"{named_by}: {err}") if named_by else err) from None
    return images


def example_segments(processor, row: dict, loss: str, max_length: int, images: dict | None = None) -> list[dict]:
    """The encoded segments of one example for `loss`, in halludpo.losses' row order (see SEGMENTS).

    Every segment shares the row's prompt and context (the question x; the context, if any, is masked out).
    `images` maps image paths to loaded images; missing ones are loaded from the row's paths.
    """
    images = example_images(row, loss, images)
    context = row.get("context") or ""
    return [encode_segment(processor, images[row[image_field]], row["prompt"], context, row[response_field],
                           max_length, score_end=scores_end(row, row[response_field]))
            for _, image_field, response_field in segment_specs(loss)]


@torch.no_grad()
def score_segments(model, processor, rows: Sequence[dict], loss: str, max_length: int, batch_size: int = 16,
                   progress: bool = True) -> torch.Tensor:
    """(S, N) summed log-probs of every segment of `loss` (S = len(SEGMENTS[loss])) of every row, batched.

    A batch holds the S segments of batch_size rows (segment-major, as the trainer's collator).
    """
    model.eval()
    n_segments = len(segment_specs(loss))
    pad_id = processor.tokenizer.pad_token_id
    device = next(model.parameters()).device
    out = []
    for start in tqdm(range(0, len(rows), batch_size), desc="reference log-probs", disable=not progress):
        chunk = rows[start: start + batch_size]
        segments = [example_segments(processor, r, loss, max_length) for r in chunk]
        # batch layout: [seg0_1..seg0_b, seg1_1..seg1_b, ...]
        batch = collate_segments([s[i] for i in range(n_segments) for s in segments], pad_id)
        logps, _ = forward_logps(model, {k: v.to(device) for k, v in batch.items()})
        out.append(logps.view(n_segments, len(chunk)).cpu())
    return torch.cat(out, dim=1)


def score_pairs(model, processor, rows: Sequence[dict], max_length: int, batch_size: int = 16,
                progress: bool = True) -> torch.Tensor:
    """(2, N) summed log-probs [chosen; rejected] of every pair under `model`, with its image, batched."""
    return score_segments(model, processor, rows, "sigmoid", max_length, batch_size, progress)
