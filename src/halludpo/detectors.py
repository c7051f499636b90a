"""Open-vocabulary object detectors as SENTINEL's verifiers on real images (verifier.kind=detector).

Two zero-shot detectors loaded through transformers (AutoProcessor + AutoModelForZeroShotObjectDetection,
safetensors only, no remote code) answer "is a <name> in this image?" for a batch of (image, object names), and
:func:`make_detector_decide_fn` turns them into the same decide_fn as the toy verifiers
(:func:`halludpo.verifiers.make_decide_fn`): batch of (item, objects) -> per item {object: (A present, B present)}.

An object is PRESENT when at least one predicted box scores above the detector's threshold for THAT object:

* GroundingDINO (model types ``grounding-dino``, ``mm-grounding-dino``): the names go in one lower-case prompt
  "a. b. c." (as the original SENTINEL asks it). A box counts when its score (the max token probability, as in
  ``post_process_grounded_object_detection``) exceeds ``box_threshold`` AND the max probability over the tokens of
  the object's own span exceeds ``text_threshold``. Spans come from the tokenizer's character offsets of each
  name inside the prompt, so labels map back to our names BY QUERY INDEX: the processor's text labels (decoded
  tokens above text_threshold, which can merge several names into one phrase or keep a piece of one) are not used.
* OWLv2 / OWL-ViT (``owlv2``, ``owlvit``): the names are the per-image list of text queries. Present when some box
  has sigmoid(logit for that query) > ``threshold``. This is the score ``post_process_grounded_object_detection``
  thresholds, taken per query instead of after its argmax over queries, so a name's verdict depends neither on the
  other names asked nor on the blank queries the processor pads a batch with.

Each item is asked about its own objects only (deduplicated, sorted, at most ``max_queries`` names per prompt), so
its verdicts do not depend on the other items of a batch: answers are the same for any batch size.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from halludpo.inference import as_image
from halludpo.models import resolve_device

log = logging.getLogger(__name__)

GROUNDING_TYPES = ("grounding-dino", "mm-grounding-dino")
OWL_TYPES = ("owlv2", "owlvit")
SUPPORTED_TYPES = GROUNDING_TYPES + OWL_TYPES
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class Detector:
    """A loaded zero-shot detector with its decision settings. `name` is the verifier kind (config label) and
    `source` the model id or folder it was loaded from (both for messages)."""

    name: str
    source: str
    model: torch.nn.Module
    processor: object
    box_threshold: float
    text_threshold: float | None = None
    batch_size: int = 8
    max_queries: int = 16

    @property
    def model_type(self) -> str:
        return self.model.config.model_type

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype


# ---------------------------------------------------------------------------------------------------------------
# Loading


def load_detector(name: str, source: str | os.PathLike, box_threshold: float, text_threshold: float | None = None,
                  device: str = "auto", dtype: str = "float32", batch_size: int = 8, max_queries: int = 16) -> Detector:
    """AutoProcessor + AutoModelForZeroShotObjectDetection from a hub id or a save_pretrained folder (safetensors
    only, trust_remote_code off), in eval mode on the device models.resolve_device(device) picks (auto: CUDA when
    there is a GPU). GroundingDINO needs a text_threshold (None: 0.25, the
    paper's); OWL models have none and refuse one."""
    from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

    source = str(source)
    if Path(source).exists() and not (Path(source) / "config.json").is_file():
        raise FileNotFoundError(f"verifier {name}: {source} is not a saved model folder (no config.json)")
    if dtype not in DTYPES:
        raise ValueError(f"verifier {name}: dtype={dtype!r}; valid: {', '.join(DTYPES)}")
    try:
        processor = AutoProcessor.from_pretrained(source)
        model = AutoModelForZeroShotObjectDetection.from_pretrained(
            source, dtype=DTYPES[dtype], use_safetensors=True, trust_remote_code=False)
    except (OSError, ValueError) as err:
        raise OSError(f"verifier {name}: cannot load the zero-shot detector {source!r} ({err}); a hub id needs the "
                      "network or the local HF cache (HF_HUB_OFFLINE), a folder needs save_pretrained files") from err
    model_type = model.config.model_type
    if model_type not in SUPPORTED_TYPES:
        raise ValueError(f"verifier {name}: {source} is a {model_type!r} model; supported zero-shot detectors: "
                         f"{', '.join(SUPPORTED_TYPES)}")
    text_threshold = _text_threshold_for(name, model_type, text_threshold)
    device = resolve_device(device)
    model.to(device).eval()
    log.info("verifier %s: %s (%s) on %s/%s, box threshold %s, text threshold %s", name, source, model_type, device,
             dtype, box_threshold, text_threshold)
    return Detector(name, source, model, processor, float(box_threshold), text_threshold, int(batch_size),
                    int(max_queries))


def _text_threshold_for(name: str, model_type: str, text_threshold: float | None) -> float | None:
    if model_type in GROUNDING_TYPES:
        return 0.25 if text_threshold is None else float(text_threshold)
    if text_threshold is not None:
        raise ValueError(f"verifier {name}: text_threshold={text_threshold} but {model_type} has no text threshold "
                         "(set it to null)")
    return None


def load_pair(verifier_cfg: dict) -> tuple[Detector, Detector]:
    """Verifiers A and B of a verifier config (plain dict): kinds [a, b], models {kind: id or folder},
    thresholds [a, b], text_thresholds [a, b], device, dtype, batch_size, max_queries."""
    v = verifier_cfg
    kinds = list(v["kinds"])
    if len(kinds) != 2:
        raise ValueError(f"verifier.kinds={kinds}: SENTINEL cross-checks exactly two detectors")
    models = v.get("models") or {}
    missing = [k for k in kinds if not models.get(k)]
    if missing:
        raise ValueError(f"verifier.models has no model id for {missing} (configs/verifier/detector.yaml)")
    thresholds = list(v["thresholds"])
    text_thresholds = list(v.get("text_thresholds") or [None, None])
    if len(thresholds) != 2 or len(text_thresholds) != 2:
        raise ValueError(f"verifier.thresholds={thresholds}, verifier.text_thresholds={text_thresholds}: "
                         "one value per detector (two)")
    common = {"device": v.get("device", "auto"), "dtype": v.get("dtype", "float32"),
              "batch_size": v.get("batch_size", 8), "max_queries": v.get("max_queries", 16)}
    a, b = (load_detector(kind, models[kind], thresholds[i], text_thresholds[i], **common)
            for i, kind in enumerate(kinds))
    return a, b


# ---------------------------------------------------------------------------------------------------------------
# Queries


def normalise_name(name: str) -> str:
    """The text a detector is asked for an object name: lower case, single spaces, no periods (GroundingDINO's
    separator)."""
    text = re.sub(r"\s+", " ", name.replace(".", " ")).strip().lower()
    if not text:
        raise ValueError(f"object name {name!r} is empty once normalised")
    return text


def grounding_prompt(names: Sequence[str]) -> tuple[str, list[tuple[int, int]]]:
    """GroundingDINO's prompt "a. b. c." for normalised names, with each name's character span (start, end)."""
    parts, spans, position = [], [], 0
    for name in names:
        spans.append((position, position + len(name)))
        parts.append(name + ".")
        position += len(name) + 2  # ". " between names
    return " ".join(parts), spans


def query_tasks(objects_per_image: Sequence[Sequence[str]], max_queries: int) -> list[tuple[int, list[str]]]:
    """(image index, names) per detector input: each image's distinct names, sorted, in chunks of max_queries."""
    if max_queries < 1:
        raise ValueError(f"max_queries={max_queries}: must be >= 1")
    tasks = []
    for i, objects in enumerate(objects_per_image):
        names = sorted(set(objects))
        tasks += [(i, names[s: s + max_queries]) for s in range(0, len(names), max_queries)]
    return tasks


# ---------------------------------------------------------------------------------------------------------------
# Detection


def _pixel_inputs(detector: Detector, images: list[Image.Image]) -> dict:
    pixels = detector.processor.image_processor(images=images, return_tensors="pt")
    return {k: v.to(detector.device, detector.dtype if v.is_floating_point() else v.dtype)
            for k, v in pixels.items()}


@torch.no_grad()
def grounding_present(detector: Detector, images: list[Image.Image], queries: list[list[str]]) -> list[list[bool]]:
    """GroundingDINO: per image, per query, present (see the module docstring for the rule)."""
    prompts, spans = zip(*(grounding_prompt([normalise_name(q) for q in qs]) for qs in queries))
    text = detector.processor.tokenizer(list(prompts), padding="longest", return_offsets_mapping=True,
                                        return_tensors="pt")
    offsets = text.pop("offset_mapping")
    max_len = detector.model.config.max_text_len
    if text["input_ids"].shape[1] > max_len:
        raise ValueError(f"verifier {detector.name}: a prompt of {text['input_ids'].shape[1]} tokens exceeds "
                         f"{detector.source}'s max_text_len {max_len}; lower verifier.max_queries "
                         f"(now {detector.max_queries})")
    outputs = detector.model(**{k: v.to(detector.device) for k, v in text.items()},
                             **_pixel_inputs(detector, images))
    probs = torch.sigmoid(outputs.logits.float())  # (images, boxes, max_text_len)
    box_kept = probs.max(-1).values > detector.box_threshold  # (images, boxes)
    rows = []
    for i, image_spans in enumerate(spans):
        row = []
        for start, end in image_spans:
            tokens = _span_tokens(offsets[i], text["attention_mask"][i], start, end)
            if not tokens:
                raise ValueError(f"verifier {detector.name}: no token of {prompts[i][start:end]!r} in the prompt "
                                 f"{prompts[i]!r} ({detector.source}'s tokenizer)")
            text_score = probs[i][:, tokens].max(-1).values  # (boxes,)
            row.append(bool((box_kept[i] & (text_score > detector.text_threshold)).any()))
        rows.append(row)
    return rows


def _span_tokens(offsets: torch.Tensor, mask: torch.Tensor, start: int, end: int) -> list[int]:
    """Token positions whose characters lie inside [start, end) (special and padding tokens have empty spans)."""
    return [t for t, ((s, e), m) in enumerate(zip(offsets.tolist(), mask.tolist()))
            if m and e > s and s >= start and e <= end]


@torch.no_grad()
def owl_present(detector: Detector, images: list[Image.Image], queries: list[list[str]]) -> list[list[bool]]:
    """OWLv2 / OWL-ViT: per image, per query, present = some box with sigmoid(logit of the query) > threshold."""
    text_queries = [[normalise_name(q) for q in qs] for qs in queries]
    text = detector.processor(text=text_queries, truncation=True, return_tensors="pt")
    outputs = detector.model(input_ids=text["input_ids"].to(detector.device),
                             attention_mask=text["attention_mask"].to(detector.device),
                             **_pixel_inputs(detector, images))
    probs = torch.sigmoid(outputs.logits.float())  # (images, boxes, max queries in the batch)
    present = (probs > detector.box_threshold).any(1)  # (images, max queries)
    return [present[i, : len(qs)].tolist() for i, qs in enumerate(queries)]


def detect_present(detector: Detector, images: Sequence[str | os.PathLike | Image.Image],
                   objects_per_image: Sequence[Sequence[str]]) -> list[dict[str, bool]]:
    """Per image, {object name: detected}, for the names asked about that image, in forwards of
    detector.batch_size (image, names) inputs."""
    if len(images) != len(objects_per_image):
        raise ValueError(f"{len(images)} images but {len(objects_per_image)} object lists")
    present_fn = grounding_present if detector.model_type in GROUNDING_TYPES else owl_present
    tasks = query_tasks(objects_per_image, detector.max_queries)
    answers: list[dict[str, bool]] = [{} for _ in images]
    opened: dict[int, Image.Image] = {}
    for start in range(0, len(tasks), detector.batch_size):
        chunk = tasks[start: start + detector.batch_size]
        for i, _ in chunk:
            if i not in opened:
                opened[i] = as_image(images[i])
        rows = present_fn(detector, [opened[i] for i, _ in chunk], [names for _, names in chunk])
        for (i, names), row in zip(chunk, rows):
            answers[i].update(zip(names, row))
    return answers


# ---------------------------------------------------------------------------------------------------------------
# Two detectors -> SENTINEL's decide_fn


def verdict(answers: dict[str, bool], name: str, detector: Detector, image) -> bool:
    """answers[name], or a KeyError naming the detector and the image."""
    if name not in answers:
        raise KeyError(f"verifier {detector.name} ({detector.source}) gave no verdict for {name!r} on {image}; "
                       f"it answered {sorted(answers)}")
    return answers[name]


def make_detector_decide_fn(detector_a: Detector, detector_b: Detector, image_key: str = "image_path"
                            ) -> Callable[[list], list[dict[str, tuple[bool, bool]]]]:
    """decide_fn for sentinel.sample_contexts: batch of (item, objects) -> per item {object: (A present,
    B present)}, each detector asked about each item's own objects on the image at item[image_key]."""

    def decide(batch):
        if not batch:
            return []
        images = [item[image_key] for item, _ in batch]
        objects = [list(objs) for _, objs in batch]
        present_a = detect_present(detector_a, images, objects)
        present_b = detect_present(detector_b, images, objects)
        return [{o: (verdict(present_a[i], o, detector_a, images[i]), verdict(present_b[i], o, detector_b, images[i]))
                 for o in objs} for i, objs in enumerate(objects)]

    return decide


def decide_fn_from_config(verifier_cfg: dict):
    """The detectors' decide_fn of a verifier config (plain dict, configs/verifier/detector.yaml)."""
    return make_detector_decide_fn(*load_pair(verifier_cfg))
