"""Bring your own pairs: import released preference sets into our pairs.jsonl, export ours to other tools.

    python -m halludpo.interop import --format apasi --src SI-23k.parquet --out pairs.jsonl --image-root coco/train2017
    python -m halludpo.interop export --format trl --src pairs.jsonl --out trl.jsonl \
        --processor llava-hf/llava-1.5-7b-hf

Our contract (docs/methods.md "Data contracts"): {image_id, image_path, prompt, context, chosen, rejected, method,
meta{...}}, plus ref_logps {chosen, rejected} (summed reference log-probs, train.py's layout) when the source stores
them.

Formats (the FORMATS registry at the bottom; each is one importer and one exporter):
  apasi         APASI SI-23k/SI-130k = the RLHF-V parquet layout: {ds_name, text, origin_dataset, origin_split, idx,
                image_path[, image]}, text = JSON {question, chosen, rejected[, logps]}.
  rlaif_v       RLAIF-V parquet: {ds_name, image{bytes,path}, question, chosen, rejected, origin_dataset,
                origin_split, idx, image_path[, logps]}, logps = JSON {"logps": [...]} (or the bare list).
  sentinel      SENTINEL JSON {image_id: [{question, context, y_win, y_lose, type, ...}]}, or flat rows
                (a JSON array / JSONL, as its *_data_pair.jsonl) holding image_id and image_path.
  llamafactory  LLaMA-Factory ranking data: sharegpt {conversations, chosen, rejected, images} or alpaca
                {instruction, input, chosen, rejected, images}. Register the exported file in dataset_info.json
                with "formatting": "sharegpt", "ranking": true, columns messages=conversations, chosen, rejected,
                images (tags from/value, human/gpt).
  trl           TRL's vision DPO rows {prompt, chosen, rejected, images}, conversational (TRL's default for VLMs)
                or plain strings (exported so with a processor, see Exports); images are paths (JSONL) or
                {bytes, path} structs (parquet).

Stored log-probs are [win, win_avg, win_per_token, rej, rej_avg, rej_per_token] (RLHF-V's layout). The summed ones
map to ref_logps, the averages to meta.ref_avg_logps; per-token lists are dropped (tokenizer-specific and large).
They are valid references only for the same model AND the same chat template that scored them.

Images: relative paths resolve against image_root (default: the source's folder), then image_root/<file name>
(released sets often keep the authors' absolute or ../../ paths). Each image must exist; skip_missing drops
such rows and counts them. Embedded bytes are written once to images/ beside the output, named by content hash.
Source fields we have no place for go to meta under their own names, so an export to the same format restores them.

Exports:
  image paths   absolute by default (a pairs file's relative paths start from project_root, default the current
                folder; each image must exist); relative to image_root ("relative"); or the source's own path for rows
                imported from the same format ("source").
  context       pairs that continue an answer (a context before the response, or meta.is_last_sent false) are
                native to sentinel. trl with a processor gets plain-text rows: prompt = the chat template's rendering
                + the context, completions = the new sentence, + the end-of-turn only where our trainer scores it
                (logprobs.scores_end), so TRL scores the tokens our trainer scores. Formats without an unscored
                prefix (apasi, rlaif_v, llamafactory; trl without a processor) refuse them unless flatten_context,
                which puts the context in front of chosen and rejected (scored, with an end-of-turn after each).
  the pair      every exported row carries the field "halludpo": JSON {pair: our row, export: {image_paths,
                image_root, context}}, which the tools ignore; importing it restores the row exactly (image_path:
                the recorded one while it names the same file, else the resolved one). Parquet files also hold
                the export settings in their key-value metadata under "halludpo".
"""

from __future__ import annotations

import argparse
import filecmp
import hashlib
import io
import json
import logging
import os
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from halludpo.io import InputError, atomic_path, read_json, read_jsonl, write_json, write_jsonl

log = logging.getLogger(__name__)

PAIR_FIELDS = ("image_id", "image_path", "prompt", "context", "chosen", "rejected", "method", "meta")  # = train.py's
IMAGE_TOKEN = "<image>"  # LLaVA's placeholder; our prompts hold none (the chat template places the image)
SOURCE_SUFFIXES = (".parquet", ".jsonl", ".json")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
# meta keys this module writes itself; every other meta key is a source field, restored on export
BOOKKEEPING = ("source_format", "source_style", "source_prompt", "source_image_path", "ref_avg_logps", "text_extra",
               "system")
RECORD_FIELD = "halludpo"  # every exported row: JSON {pair, export}; restores the pair on import
IMAGE_PATHS = ("absolute", "relative", "source")


# ---------------------------------------------------------------------------------------------------------------
# Reading sources: every record comes with `where` ("file row N", 1-based) for error messages


def source_files(src: Path) -> list[Path]:
    """src itself, or the data files of a folder (sharded releases: RLAIF-V-Dataset_000.parquet, ...)."""
    if src.is_dir():
        files = sorted(p for p in src.iterdir() if p.suffix in SOURCE_SUFFIXES)
        if not files:
            raise InputError(f"{src}: no {', '.join(SOURCE_SUFFIXES)} files in this folder")
        return files
    if not src.is_file():
        raise InputError(f"{src}: file not found")
    if src.suffix not in SOURCE_SUFFIXES:
        raise InputError(f"{src}: unsupported file type; expected one of {', '.join(SOURCE_SUFFIXES)}")
    return [src]


def parquet_rows(path: Path) -> Iterator[dict]:
    """Rows as dicts, a batch at a time (released shards hold ~1 GB of embedded images)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=256)
    except (OSError, pa.ArrowException) as err:
        raise InputError(f"{path}: unreadable parquet ({err})") from None
    for batch in batches:
        yield from batch.to_pylist()


def file_records(path: Path) -> Iterator[dict]:
    if path.suffix == ".parquet":
        yield from parquet_rows(path)
    elif path.suffix == ".jsonl":
        yield from read_jsonl(path)
    else:
        data = read_json(path)
        if not isinstance(data, list):
            raise InputError(f"{path}: expected a JSON array of rows, got {type(data).__name__}")
        yield from data


def read_records(src: Path) -> Iterator[tuple[str, dict]]:
    """(where, record) over every row of src; a row that is not an object raises naming it."""
    for path in source_files(src):
        for n, record in enumerate(file_records(path), start=1):
            where = f"{path} row {n}"
            if not isinstance(record, dict):
                raise InputError(f"{where}: expected an object, got {type(record).__name__}")
            yield where, record


def text_field(record: dict, key: str, where: str) -> str:
    value = record.get(key)
    if not isinstance(value, str):
        problem = "missing field" if value is None else f"field is {type(value).__name__}, not a string:"
        raise InputError(f"{where}: {problem} {key!r}")
    return value


def json_field(record: dict, key: str, where: str):
    try:
        return json.loads(text_field(record, key, where))
    except json.JSONDecodeError as err:
        raise InputError(f"{where}: field {key!r} is not valid JSON ({err.msg})") from None


def extras(record: dict, known: tuple[str, ...]) -> dict:
    """The source's other fields, for meta; values JSON cannot hold (binary columns) are dropped."""
    kept = {}
    for key, value in record.items():
        if key in known:
            continue
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            log.warning("dropping field %r: not JSON-serialisable (%s)", key, type(value).__name__)
            continue
        kept[key] = value
    return kept


# ---------------------------------------------------------------------------------------------------------------
# Images


class ImageResolver:
    """A source's image reference (a path, or embedded bytes) -> an existing file; counts what it skipped."""

    def __init__(self, src: Path, image_root: str | os.PathLike | None, images_dir: Path, skip_missing: bool):
        self.root = Path(image_root).absolute() if image_root else None
        self.base = self.root or (src if src.is_dir() else src.parent).absolute()
        self.images_dir = images_dir.absolute()
        self.skip_missing = skip_missing
        self.missing = 0
        self.written = 0
        self._by_stem: dict[str, Path] | None = None

    def resolve(self, ref, where: str) -> Path | None:
        """ref: a path string, raw bytes or a {bytes, path} struct. None: missing and skip_missing is on."""
        if isinstance(ref, dict):
            data, path = ref.get("bytes"), ref.get("path")
        elif isinstance(ref, (bytes, bytearray)):
            data, path = ref, None
        else:
            data, path = None, ref
        if data:
            return self.save_bytes(bytes(data), where)
        if not isinstance(path, str) or not path:
            raise InputError(f"{where}: no image (neither embedded bytes nor a path)")
        return self.find_path(path, where)

    def find_path(self, path: str, where: str) -> Path | None:
        given = Path(path)
        tried = [given if given.is_absolute() else self.base / given, self.base / given.name]
        for candidate in tried:
            if candidate.is_file():
                return candidate
        return self.missing_image(where, f"{path!r} (tried {', '.join(str(p) for p in dict.fromkeys(tried))})")

    def find_by_id(self, image_id, where: str) -> Path | None:
        """SENTINEL's dict layout has no paths: find <image_id>.<ext> anywhere under image_root (VG_100K, ...)."""
        if self.root is None:
            raise InputError(f"{where}: rows without image_path need an image root (--image-root) to find "
                             f"image {image_id!r}")
        if self._by_stem is None:
            self._by_stem = {p.stem: p for p in sorted(self.root.rglob("*")) if p.suffix.lower() in IMAGE_SUFFIXES}
        found = self._by_stem.get(str(image_id))
        return found or self.missing_image(where, f"for image_id {image_id!r} (no {image_id}.<ext> under {self.root})")

    def missing_image(self, where: str, what: str) -> None:
        if not self.skip_missing:
            raise InputError(f"{where}: image not found: {what}; check --image-root, or pass --skip-missing to "
                             "drop such rows")
        self.missing += 1
        return None

    def save_bytes(self, data: bytes, where: str) -> Path:
        """Write embedded image bytes once, as images/<sha256[:16]>.<ext> (same bytes -> same file)."""
        try:
            with Image.open(io.BytesIO(data)) as img:
                suffix = "." + (img.format or "img").lower().replace("jpeg", "jpg")
        except (UnidentifiedImageError, OSError):
            raise InputError(f"{where}: embedded image bytes are not a readable image") from None
        path = self.images_dir / f"{hashlib.sha256(data).hexdigest()[:16]}{suffix}"
        if not path.exists():
            with atomic_path(path) as tmp:
                tmp.write_bytes(data)
            self.written += 1
        return path


# ---------------------------------------------------------------------------------------------------------------
# Building our rows


def clean_prompt(text: str) -> str:
    """Drop LLaVA's <image> placeholder (our chat template inserts the image; a stray one breaks scoring)."""
    return re.sub(rf"\s*{re.escape(IMAGE_TOKEN)}\s*", " ", text).strip()


def make_pair(fmt: str, method: str, image: Path, image_id, prompt: str, context: str, chosen: str, rejected: str,
              meta: dict) -> dict:
    """One pairs.jsonl row; meta records the source format and the raw prompt when cleaning changed it."""
    meta = {"source_format": fmt, **meta}
    if clean_prompt(prompt) != prompt:
        meta["source_prompt"] = prompt
    return {"image_id": image_id, "image_path": str(image), "prompt": clean_prompt(prompt), "context": context,
            "chosen": chosen, "rejected": rejected, "method": method, "meta": meta}


def image_id_of(source_path, image: Path):
    """The stem of the source's own image path (a COCO/VG file name); the content hash for embedded images."""
    return Path(source_path).stem if isinstance(source_path, str) and source_path else image.stem


def parse_stored_logps(value, where: str) -> tuple[dict, dict | None] | None:
    """RLHF-V/RLAIF-V stored log-probs -> (ref_logps, ref_avg_logps); None when absent or marked invalid.

    value: [win, win_avg, win_per_token, rej, rej_avg, rej_per_token], bare or as {"logps": [...]}, maybe as a
    JSON string. APASI writes None entries for rows it could not score.
    """
    if value is None:
        return None
    try:
        value = json.loads(value) if isinstance(value, str) else value
    except json.JSONDecodeError as err:
        raise InputError(f"{where}: stored logps are not valid JSON ({err.msg})") from None
    if isinstance(value, dict):
        value = value.get("logps")
    if not isinstance(value, list) or len(value) != 6:
        raise InputError(f"{where}: stored logps must be [win, win_avg, win_per_token, rej, rej_avg, "
                         f"rej_per_token]; got {str(value)[:80]}")
    win, win_avg, _, rej, rej_avg, _ = value
    if win is None or rej is None:
        return None
    averages = None if win_avg is None or rej_avg is None else {"chosen": float(win_avg), "rejected": float(rej_avg)}
    return {"chosen": float(win), "rejected": float(rej)}, averages


def with_stored_logps(row: dict, stored, where: str) -> dict:
    parsed = parse_stored_logps(stored, where)
    if parsed:
        row["ref_logps"] = parsed[0]
        if parsed[1]:
            row["meta"]["ref_avg_logps"] = parsed[1]
    return row


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two paths (relative ones from the current folder) hold the same image: one file, or equal bytes."""
    try:
        return os.path.samefile(a, b) or filecmp.cmp(a, b, shallow=False)
    except OSError:
        return False


def restored_pair(record: dict, where: str, image: Path, chosen: str, rejected: str) -> dict | None:
    """The pair an export recorded in the record's "halludpo" field; None when the record has none.

    chosen/rejected are the record's visible responses: each must still hold the recorded one (a context in front,
    an end-of-turn after it are the export's), else the row was edited after the export and the record is stale.
    image_path: the recorded one while it names the same image as the record's (resolved) image, else that image.
    """
    value = record.get(RECORD_FIELD)
    if value is None:
        return None
    try:
        data = json.loads(value) if isinstance(value, str) else value
    except json.JSONDecodeError as err:
        raise InputError(f"{where}: field {RECORD_FIELD!r} is not valid JSON ({err.msg})") from None
    row = data.get("pair") if isinstance(data, dict) else None
    if not isinstance(row, dict) or not set(PAIR_FIELDS) <= row.keys():
        raise InputError(f"{where}: field {RECORD_FIELD!r} holds no pair {{{', '.join(PAIR_FIELDS)}}}")
    for key, shown in (("chosen", chosen), ("rejected", rejected)):
        if not isinstance(row[key], str) or row[key].strip() not in shown:
            raise InputError(f"{where}: {key!r} no longer holds the pair recorded in field {RECORD_FIELD!r} (edited "
                             "after the export?); delete that field to import the row as it reads")
    if not same_file(row["image_path"], image):
        row["image_path"] = str(image)
    return row


# ---------------------------------------------------------------------------------------------------------------
# Importers: (src, images) -> rows; None for a row skipped for its missing image


def released_image(record: dict, images: ImageResolver, where: str) -> Path | None:
    """RLHF-V-style rows: embedded image bytes win over image_path (which may be the authors' local path)."""
    image = record.get("image")
    if (isinstance(image, dict) and image.get("bytes")) or isinstance(image, (bytes, bytearray)):
        return images.resolve(image, where)
    path = record.get("image_path") or (image.get("path") if isinstance(image, dict) else image)
    return images.resolve(path, where)


def import_apasi(src: Path, images: ImageResolver) -> Iterator[dict | None]:
    for where, record in read_records(src):
        text = json_field(record, "text", where)
        if not isinstance(text, dict):
            raise InputError(f"{where}: field 'text' must hold a JSON object {{question, chosen, rejected}}")
        question, chosen, rejected = (text_field(text, k, f"{where} (text)")
                                      for k in ("question", "chosen", "rejected"))
        image = released_image(record, images, where)
        if image is None:
            yield None
            continue
        if (row := restored_pair(record, where, image, chosen, rejected)) is not None:
            yield row
            continue
        meta = extras(record, ("text", "image", "image_path"))
        meta["source_image_path"] = record.get("image_path")
        text_extra = extras(text, ("question", "chosen", "rejected", "logps"))
        if text_extra:
            meta["text_extra"] = text_extra
        row = make_pair("apasi", "apasi", image, image_id_of(record.get("image_path"), image), question, "", chosen,
                        rejected, meta)
        yield with_stored_logps(row, text.get("logps"), where)


def import_rlaif_v(src: Path, images: ImageResolver) -> Iterator[dict | None]:
    for where, record in read_records(src):
        question, chosen, rejected = (text_field(record, k, where) for k in ("question", "chosen", "rejected"))
        image = released_image(record, images, where)
        if image is None:
            yield None
            continue
        if (row := restored_pair(record, where, image, chosen, rejected)) is not None:
            yield row
            continue
        meta = extras(record, ("question", "chosen", "rejected", "image", "image_path", "logps"))
        meta["source_image_path"] = record.get("image_path")
        row = make_pair("rlaif_v", "rlaif_v", image, image_id_of(record.get("image_path"), image), question, "",
                        chosen, rejected, meta)
        yield with_stored_logps(row, record.get("logps"), where)


def sentinel_records(src: Path) -> Iterator[tuple[str, dict]]:
    """The released {image_id: [entries]} JSON, or flat rows (JSON array / JSONL) carrying image_id."""
    if src.suffix == ".json" and src.is_file() and isinstance(data := read_json(src), dict):
        for image_id, entries in data.items():
            if not isinstance(entries, list):
                raise InputError(f"{src} image {image_id!r}: expected a list of pairs, got {type(entries).__name__}")
            for n, entry in enumerate(entries, start=1):
                where = f"{src} image {image_id!r} row {n}"
                if not isinstance(entry, dict):
                    raise InputError(f"{where}: expected an object, got {type(entry).__name__}")
                yield where, {"image_id": image_id, **entry}
    else:
        yield from read_records(src)


def import_sentinel(src: Path, images: ImageResolver) -> Iterator[dict | None]:
    for where, record in sentinel_records(src):
        question, context, y_win, y_lose = (text_field(record, k, where)
                                            for k in ("question", "context", "y_win", "y_lose"))
        if record.get("image_path"):
            image = images.resolve(record["image_path"], where)
        elif record.get("image_id") is not None:
            image = images.find_by_id(record["image_id"], where)
        else:
            raise InputError(f"{where}: missing field 'image_id' (or 'image_path')")
        if image is None:
            yield None
            continue
        if (row := restored_pair(record, where, image, y_win, y_lose)) is not None:
            yield row
            continue
        meta = extras(record, ("image_id", "image_path", "question", "context", "y_win", "y_lose"))
        meta["source_image_path"] = record.get("image_path")
        image_id = record.get("image_id", image_id_of(record.get("image_path"), image))
        yield make_pair("sentinel", "sentinel", image, image_id, question, context, y_win, y_lose, meta)


def single_image(record: dict, where: str):
    """The one image of a TRL / LLaMA-Factory row (our pairs are single-image)."""
    value = record.get("images", record.get("image"))
    value = value if isinstance(value, list) else [] if value is None else [value]
    if len(value) != 1:
        raise InputError(f"{where}: {len(value)} images; a pair needs exactly one")
    return value[0]


def message_text(content, where: str) -> str:
    """A message's text: a plain string, or the text parts of a [{type: image}, {type: text, text}] list."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        return "".join(p.get("text") or "" for p in content if p.get("type") == "text")
    raise InputError(f"{where}: message content must be a string or a list of parts, got {str(content)[:80]}")


def single_user_turn(turns: list[tuple[str, str]], where: str) -> tuple[str, str | None]:
    """(prompt, system) from (role, text) turns: one user turn, optionally after a system turn."""
    system = [text for role, text in turns if role == "system"]
    others = [(role, text) for role, text in turns if role != "system"]
    if len(others) != 1 or others[0][0] != "user" or len(system) > 1:
        roles = [role for role, _ in turns]
        raise InputError(f"{where}: expected one user turn (after an optional system turn), got roles {roles}; "
                         "multi-turn pairs are not supported")
    return others[0][1], (system[0] if system else None)


def response_text(value, where: str, key: str) -> str:
    """chosen/rejected as a string, a {from|role, value|content} turn, or a list holding one assistant message."""
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, dict):
        value = message_text(value.get("value", value.get("content")), where)
    if not isinstance(value, str):
        raise InputError(f"{where}: field {key!r} must be a response string or one assistant message")
    return value


def tool_pair(fmt: str, record: dict, where: str, images: ImageResolver, prompt: str, system: str | None,
              style: str, known: tuple[str, ...]) -> dict | None:
    """The shared tail of the TRL and LLaMA-Factory importers."""
    chosen, rejected = (response_text(record.get(k), where, k) for k in ("chosen", "rejected"))
    ref = single_image(record, where)
    image = images.resolve(ref, where)
    if image is None:
        return None
    if (row := restored_pair(record, where, image, chosen, rejected)) is not None:
        return row
    source_path = ref.get("path") if isinstance(ref, dict) else ref if isinstance(ref, str) else None
    meta = extras(record, known + ("chosen", "rejected", "images", "image", "system"))
    meta |= {"source_style": style, "source_image_path": source_path}
    if system:
        meta["system"] = system
    return make_pair(fmt, "dpo", image, image_id_of(source_path, image), prompt, "", chosen, rejected, meta)


LF_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def llamafactory_prompt(record: dict, where: str) -> tuple[str, str | None, str, tuple[str, ...]]:
    """(prompt, system, style, fields used) for sharegpt (conversations), openai (messages) or alpaca rows."""
    for key, style in (("conversations", "sharegpt"), ("messages", "openai")):
        if key in record:
            turns = record[key]
            if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
                raise InputError(f"{where}: field {key!r} must be a list of turns")
            pairs = [(LF_ROLES.get(t.get("from", t.get("role")), "?"), message_text(t.get("value", t.get("content")),
                                                                                      where)) for t in turns]
            prompt, system = single_user_turn(pairs, where)
            return prompt, system or record.get("system"), style, (key,)
    if "instruction" in record:
        if record.get("history"):
            raise InputError(f"{where}: field 'history' is not empty; multi-turn pairs are not supported")
        prompt = text_field(record, "instruction", where)
        if record.get("input"):
            prompt = f"{prompt}\n{record['input']}"
        return prompt, record.get("system"), "alpaca", ("instruction", "input", "history")
    raise InputError(f"{where}: missing field 'conversations' (sharegpt), 'messages' or 'instruction' (alpaca)")


def import_llamafactory(src: Path, images: ImageResolver) -> Iterator[dict | None]:
    for where, record in read_records(src):
        prompt, system, style, known = llamafactory_prompt(record, where)
        yield tool_pair("llamafactory", record, where, images, prompt, system, style, known)


def import_trl(src: Path, images: ImageResolver) -> Iterator[dict | None]:
    for where, record in read_records(src):
        prompt = record.get("prompt")
        if isinstance(prompt, list):
            if not all(isinstance(m, dict) for m in prompt):
                raise InputError(f"{where}: field 'prompt' must be a string or a list of messages")
            turns = [(m.get("role"), message_text(m.get("content"), where)) for m in prompt]
            prompt, system = single_user_turn(turns, where)
            style = "conversational"
        else:
            prompt, system, style = text_field(record, "prompt", where), None, "standard"
        yield tool_pair("trl", record, where, images, prompt, system, style, ("prompt",))


# ---------------------------------------------------------------------------------------------------------------
# Exporters: (rows, opts) -> records; opts.where(i) names a pairs-file row for errors


@dataclass
class ExportOptions:
    """How an export writes image paths and pairs that continue an answer; `info` is what the file records."""

    fmt: str
    where: Callable[[int], str]
    image_paths: str = "absolute"  # one of IMAGE_PATHS
    image_root: Path | None = None  # "relative": paths are written relative to it
    project_root: Path = Path(".")  # where the pairs file's relative image paths start
    context: str = "none"  # native | prompt (trl's plain-text rows) | flattened | none
    processor: object | None = None  # loaded; trl's plain-text rows
    info: dict | None = None  # the export's settings, recorded in every row (and a parquet file's metadata)
    token_mismatches: int | None = None  # trl's plain-text rows: see PlainTextRows

    def record(self, row: dict) -> str:
        """The "halludpo" field: our whole row and the export's settings, one JSON string (tools read a string
        column without needing a schema for meta, which differs from row to row)."""
        return json.dumps({"pair": dict(row), "export": self.info}, ensure_ascii=False)


def source_meta(row: dict, fmt: str) -> dict:
    """The row's meta if it was imported from fmt (so its source fields can be restored), else {}."""
    meta = row.get("meta") or {}
    return meta if meta.get("source_format") == fmt else {}


def source_fields(row: dict, fmt: str) -> dict:
    return {k: v for k, v in source_meta(row, fmt).items() if k not in BOOKKEEPING}


def export_prompt(row: dict, fmt: str, placeholder: bool) -> str:
    """The source's raw prompt when it still cleans to ours (an exact round trip), else ours (+ <image>)."""
    raw = source_meta(row, fmt).get("source_prompt")
    if raw is not None and clean_prompt(raw) == row["prompt"]:
        return raw
    return f"{IMAGE_TOKEN}\n{row['prompt']}" if placeholder else row["prompt"]


def image_file(row: dict, opts: ExportOptions, i: int) -> Path:
    """The row's image as an absolute path; relative paths start from opts.project_root. It must exist."""
    path = Path(row["image_path"])
    path = path if path.is_absolute() else opts.project_root / path
    if not path.is_file():
        raise InputError(f"{opts.where(i)}: image not found: {path} (relative image paths start from the project "
                         f"root, {opts.project_root.absolute()}; set it with --project-root)")
    return Path(os.path.abspath(path))


def export_image_path(row: dict, opts: ExportOptions, i: int) -> str:
    """absolute; relative to image_root; or "source": the source's own path for rows imported from this format,
    else ours as it is."""
    if opts.image_paths == "source":
        return source_meta(row, opts.fmt).get("source_image_path") or row["image_path"]
    path = image_file(row, opts, i)
    return str(path) if opts.image_paths == "absolute" else os.path.relpath(path, opts.image_root)


def continues_answer(row: dict) -> bool:
    """A pair whose responses are not a whole answer: a context before them, or a sentence before the last one
    (meta.is_last_sent false: our trainer scores no end-of-turn after it)."""
    from halludpo.logprobs import ends_answer

    return bool((row.get("context") or "").strip()) or not ends_answer(row)


def responses(row: dict) -> tuple[str, str]:
    """chosen, rejected for formats without a context field: the context (only with flatten_context: the others
    are refused) goes in front of both responses. Same join as logprobs.join_context."""
    context = row.get("context") or ""
    if not context.strip():
        return row["chosen"], row["rejected"]
    return tuple(f"{context.rstrip()} {row[k].lstrip()}" for k in ("chosen", "rejected"))


def stored_logps(row: dict) -> list | None:
    """ref_logps back to RLHF-V's 6-list; averages from meta if known, per-token lists empty (not kept)."""
    if "ref_logps" not in row:
        return None
    avg = (row.get("meta") or {}).get("ref_avg_logps") or {}
    ref = row["ref_logps"]
    return [ref["chosen"], avg.get("chosen"), [], ref["rejected"], avg.get("rejected"), []]


def default_origin_split(row: dict) -> str:
    """RLHF-V's origin_split is JSON metadata (APASI json.loads it); ours holds the method and our meta."""
    meta = {k: v for k, v in (row.get("meta") or {}).items() if k not in BOOKKEEPING}
    return json.dumps({"method": row["method"], **meta})


def export_apasi(rows: list[dict], opts: ExportOptions) -> list[dict]:
    records = []
    for i, row in enumerate(rows):
        chosen, rejected = responses(row)
        text = {"question": export_prompt(row, "apasi", placeholder=True), "chosen": chosen, "rejected": rejected,
                **source_meta(row, "apasi").get("text_extra", {})}
        if (logps := stored_logps(row)) is not None:
            text["logps"] = logps
        records.append({"ds_name": "halludpo", "text": json.dumps(text, ensure_ascii=False), "origin_dataset":
                        row["method"], "origin_split": default_origin_split(row), "idx": i,
                        "image_path": export_image_path(row, opts, i)} | source_fields(row, "apasi")
                       | {RECORD_FIELD: opts.record(row)})
    return records


def export_rlaif_v(rows: list[dict], opts: ExportOptions) -> list[dict]:
    records = []
    for i, row in enumerate(rows):
        path = image_file(row, opts, i)  # rlaif_v embeds the image bytes
        chosen, rejected = responses(row)
        record = {"ds_name": "halludpo", "image": {"bytes": path.read_bytes(), "path": path.name},
                  "question": export_prompt(row, "rlaif_v", placeholder=False), "chosen": chosen, "rejected": rejected,
                  "origin_dataset": row["method"], "origin_split": default_origin_split(row), "idx": str(i),
                  "image_path": export_image_path(row, opts, i)}
        if (logps := stored_logps(row)) is not None:
            record["logps"] = json.dumps({"logps": logps})
        records.append(record | source_fields(row, "rlaif_v") | {RECORD_FIELD: opts.record(row)})
    return records


def export_sentinel(rows: list[dict], opts: ExportOptions) -> dict[str, list[dict]]:
    """The released layout {image_id: [entries]}; write_records flattens it for a .jsonl output."""
    grouped: dict[str, list[dict]] = {}
    for i, row in enumerate(rows):
        entry = {"question": export_prompt(row, "sentinel", placeholder=False), "context": row["context"],
                 "y_win": row["chosen"], "y_lose": row["rejected"], "image_path": export_image_path(row, opts, i)}
        grouped.setdefault(str(row["image_id"]), []).append(entry | source_fields(row, "sentinel")
                                                             | {RECORD_FIELD: opts.record(row)})
    return grouped


def export_llamafactory(rows: list[dict], opts: ExportOptions) -> list[dict]:
    """sharegpt rows (LLaMA-Factory's layout for multimodal ranking data); alpaca for rows imported as alpaca."""
    records = []
    for i, row in enumerate(rows):
        meta = source_meta(row, "llamafactory")
        prompt = export_prompt(row, "llamafactory", placeholder=True)
        chosen, rejected = responses(row)
        if meta.get("source_style") == "alpaca":
            record = {"instruction": prompt, "input": "", "chosen": chosen, "rejected": rejected}
        else:
            record = {"conversations": [{"from": "human", "value": prompt}], "chosen": {"from": "gpt", "value": chosen},
                      "rejected": {"from": "gpt", "value": rejected}}
        if meta.get("system"):
            record["system"] = meta["system"]
        records.append(record | {"images": [export_image_path(row, opts, i)]} | source_fields(row, "llamafactory")
                       | {RECORD_FIELD: opts.record(row)})
    return records


class PlainTextRows:
    """TRL's plain-text ("standard") rows that score what our trainer scores (logprobs.encode_segment).

    prompt = the processor's chat template rendered around the user turn (as logprobs.render_turn renders it: an
    imported system turn is left out, as in our trainer), up to where the response starts: the generation prompt,
    or with a context, the finished turn cut after the context. chosen/rejected = the rest of the
    finished turn: the response, and its end-of-turn only when our trainer scores it (logprobs.scores_end: not after
    a sentence before the last one). TRL's vision collator tokenizes prompt and completions apart, without special
    tokens, and adds nothing to plain-text completions, so it scores exactly these tokens. Our trainer tokenizes
    with special tokens: when the tokenizer adds a BOS, the prompt starts with the BOS string (followed by a space
    for tokenizers that mark the first word, e.g. Metaspace's prepend_scheme "first"), whichever gives the same
    ids. Pairs whose ids still differ (neither works, or tokens merge across the prompt/completion boundary) are
    counted in `token_mismatches`.
    """

    def __init__(self, processor):
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        bos = self.tokenizer.bos_token
        self.prefixes = ("", bos, f"{bos} ") if bos else ("",)
        self.token_mismatches = 0

    def ids(self, text: str, special: bool = False) -> list[int]:
        return self.tokenizer(text, add_special_tokens=special)["input_ids"]

    def pair(self, row: dict, where: str) -> tuple[str, str, str]:
        from halludpo.logprobs import answer_start, join_context, render_turn, scores_end

        context = row.get("context") or ""
        prompts, completions = [], []
        for key in ("chosen", "rejected"):
            answer = join_context(context, row[key])
            full = render_turn(self.processor, row["prompt"], answer)
            try:
                start = answer_start(full, answer)
            except ValueError as err:
                raise InputError(f"{where}: {err}") from None
            if context.strip():
                cut = start + len(context.rstrip())
            else:
                generation = render_turn(self.processor, row["prompt"], None)
                if not full.startswith(generation):
                    raise InputError(f"{where}: the chat template's generation prompt {generation[-80:]!r} does not "
                                     "begin the finished turn: no plain-text prompt can stand for it")
                cut = len(generation)
            end = len(full) if scores_end(row, row[key]) else start + len(answer.rstrip())
            prompts.append(full[:cut])
            completions.append(full[cut:end])
        if prompts[0] != prompts[1]:
            raise InputError(f"{where}: the chat template renders the prompt differently before chosen and rejected")
        prompt = self.with_special_tokens(prompts[0])
        if prompt is None:
            prompt = prompts[0]
            self.token_mismatches += 1
        elif any(self.ids(prompt) + self.ids(c) != self.ids(prompt + c) for c in completions):
            self.token_mismatches += 1
        return prompt, completions[0], completions[1]

    def with_special_tokens(self, prompt: str) -> str | None:
        """prompt, with the tokenizer's own special tokens written as text in front: TRL's ids (tokenized without
        special tokens) = ours (with); None when no prefix gives that."""
        target = self.ids(prompt, special=True)
        return next((p + prompt for p in self.prefixes if self.ids(p + prompt) == target), None)


def export_trl(rows: list[dict], opts: ExportOptions) -> list[dict]:
    """Conversational rows (what TRL's DPOTrainer expects for VLMs), plain strings for rows imported as such; with a
    processor, plain-text rows rendered with its chat template (PlainTextRows: the context in the prompt)."""
    plain = PlainTextRows(opts.processor) if opts.processor is not None else None
    records = []
    for i, row in enumerate(rows):
        meta = source_meta(row, "trl")
        if plain is not None:
            prompt, chosen, rejected = plain.pair(row, opts.where(i))
            record = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
        elif meta.get("source_style") == "standard":
            chosen, rejected = responses(row)
            record = {"prompt": export_prompt(row, "trl", placeholder=False), "chosen": chosen, "rejected": rejected}
        else:
            chosen, rejected = responses(row)
            system = [{"role": "system", "content": [{"type": "text", "text": meta["system"]}]}] if meta.get("system") \
                else []
            user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": row["prompt"]}]}
            record = {"prompt": system + [user]} | {
                k: [{"role": "assistant", "content": [{"type": "text", "text": text}]}]
                for k, text in (("chosen", chosen), ("rejected", rejected))}
        records.append(record | {"images": [export_image_path(row, opts, i)]} | source_fields(row, "trl")
                       | {RECORD_FIELD: opts.record(row)})
    if plain is not None and plain.token_mismatches:
        log.warning("%d pairs: TRL will tokenize them slightly differently from our trainer (the tokenizer joins "
                    "tokens across the prompt/completion boundary, or its BOS cannot be written as text)",
                    plain.token_mismatches)
    opts.token_mismatches = plain.token_mismatches if plain is not None else None
    return records


# ---------------------------------------------------------------------------------------------------------------
# Writing


def write_parquet(path: Path, records: list[dict], metadata: dict | None = None) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(records)
    if metadata:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}),
                                               RECORD_FIELD.encode(): json.dumps(metadata).encode()})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def write_records(path: Path, records: list[dict] | dict, metadata: dict | None = None) -> None:
    """By suffix: .parquet (metadata in the file's key-value metadata), .json (the records as they are), .jsonl (one
    row a line; grouped dicts flattened)."""
    if path.suffix == ".parquet":
        write_parquet(path, records, metadata)
    elif path.suffix == ".json":
        write_json(path, records)
    else:
        if isinstance(records, dict):  # sentinel's {image_id: [entries]} -> its flat *_data_pair.jsonl rows
            records = [{"image_id": image_id, **entry} for image_id, entries in records.items() for entry in entries]
        write_jsonl(path, records)


# ---------------------------------------------------------------------------------------------------------------
# The registry and the two entry points


@dataclass(frozen=True)
class Format:
    name: str
    read: Callable[[Path, ImageResolver], Iterator[dict | None]]
    write: Callable[[list[dict], ExportOptions], list[dict] | dict]
    suffixes: tuple[str, ...]  # output files its exporter can write; the first is the usual one


FORMATS = {f.name: f for f in (
    Format("apasi", import_apasi, export_apasi, (".parquet",)),
    Format("rlaif_v", import_rlaif_v, export_rlaif_v, (".parquet",)),
    Format("sentinel", import_sentinel, export_sentinel, (".json", ".jsonl")),
    Format("llamafactory", import_llamafactory, export_llamafactory, (".json", ".jsonl")),
    Format("trl", import_trl, export_trl, (".jsonl", ".json", ".parquet")),
)}


def get_format(fmt: str) -> Format:
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; valid: {', '.join(sorted(FORMATS))}")
    return FORMATS[fmt]


def import_pairs(fmt: str, src: str | os.PathLike, out: str | os.PathLike, image_root: str | os.PathLike | None = None,
                 skip_missing: bool = False) -> dict:
    """Read a released/other tool's preference file (or folder of shards) into our pairs.jsonl. Returns stats.

    Embedded images are written to <out's folder>/images/. A missing image raises naming the row, unless
    skip_missing, which drops the row and counts it. Rows an export of ours wrote come back as the recorded pairs.
    """
    spec, src, out = get_format(fmt), Path(src), Path(out)
    images = ImageResolver(src, image_root, out.parent / "images", skip_missing)
    rows = [row for row in spec.read(src, images) if row is not None]
    if not rows:
        raise InputError(f"{src}: no pairs imported ({images.missing} rows skipped for missing images)")
    write_jsonl(out, rows)
    stats = {"format": fmt, "src": str(src), "out": str(out), "pairs": len(rows),
             "skipped_missing_images": images.missing, "images_written": images.written,
             "with_ref_logps": sum("ref_logps" in r for r in rows)}
    log.info("imported %d %s pairs from %s -> %s (%d skipped for missing images)", len(rows), fmt, src, out,
             images.missing)
    return stats


def context_refusal(fmt: str, continuing: int, total: int) -> str:
    trl = (" or --processor MODEL (the model TRL trains) to put the context in plain-text prompts, where TRL does "
           "not score it") if fmt == "trl" else ""
    return (f"{continuing} of {total} pairs continue an answer (a context before the response, or meta.is_last_sent "
            f"false: sentence-level pairs); {fmt} has no unscored prefix for the context, so it would be scored, and "
            f"an end-of-turn after every sentence; pass --flatten-context to export them so anyway{trl}")


def export_pairs(fmt: str, pairs_path: str | os.PathLike, out: str | os.PathLike,
                 image_root: str | os.PathLike | None = None, *, image_paths: str | None = None,
                 project_root: str | os.PathLike | None = None, processor=None, flatten_context: bool = False) -> dict:
    """Write our pairs.jsonl (or a ref_logps file) in another format. Returns stats.

    image_paths: "absolute" (the default; "relative" when image_root is given), "relative" (to image_root) or
    "source" (the source's own path for rows imported from fmt, else ours); relative paths in the pairs file start
    from project_root (default: the current folder). Pairs that continue an answer (continues_answer) are native to
    sentinel; trl puts their context in plain-text prompts when given a processor (a loaded one, or a model folder
    or hub id); elsewhere they are refused unless flatten_context, which puts the context in front of chosen and
    rejected. Every row records our pair in the field "halludpo" (import restores it).
    """
    spec, pairs_path, out = get_format(fmt), Path(pairs_path), Path(out)
    if out.suffix not in spec.suffixes:
        raise ValueError(f"{fmt} exports to {' or '.join(spec.suffixes)} files; got {out.name}")
    image_paths = image_paths or ("relative" if image_root else "absolute")
    if image_paths not in IMAGE_PATHS:
        raise ValueError(f"unknown image_paths {image_paths!r}; valid: {', '.join(IMAGE_PATHS)}")
    if image_paths == "relative" and not image_root:
        raise ValueError("relative image paths need the folder they start from: --image-root")
    if processor is not None and fmt != "trl":
        raise ValueError(f"--processor renders trl's plain-text prompts; {fmt} takes none")
    if processor is not None and flatten_context:
        raise ValueError("--processor puts the context in the prompt, --flatten-context in the responses: pass one")
    rows = read_jsonl(pairs_path, required=PAIR_FIELDS)
    if not rows:
        raise InputError(f"{pairs_path}: no pairs")
    continuing = sum(continues_answer(r) for r in rows)
    context = ("native" if fmt == "sentinel" else "prompt" if processor is not None
               else "flattened" if flatten_context else "none")
    if continuing and context == "none":
        raise InputError(f"{pairs_path}: {context_refusal(fmt, continuing, len(rows))}")
    processor_name = None
    if isinstance(processor, (str, os.PathLike)):
        from halludpo.models import load_processor

        processor_name, processor = str(processor), load_processor(str(processor))
    elif processor is not None:
        processor_name = getattr(getattr(processor, "tokenizer", processor), "name_or_path", None) or None
    root = Path(image_root).absolute() if image_paths == "relative" else None
    info = {"written_by": "halludpo.interop", "format": fmt, "image_paths": image_paths,
            "image_root": str(root) if root else None, "context": context, "processor": processor_name}
    opts = ExportOptions(fmt, lambda i: f"{pairs_path} row {i + 1}", image_paths, root,
                         Path(project_root) if project_root else Path("."), context, processor, info)
    records = spec.write(rows, opts)
    write_records(out, records, info)
    if continuing and context == "flattened":
        log.warning("%d pairs continue an answer; flattened: their context leads chosen and rejected, and %s scores "
                    "it, and an end-of-turn after every sentence", continuing, fmt)
    stats = {"format": fmt, "src": str(pairs_path), "out": str(out), "rows": len(rows), "image_paths": image_paths,
             "image_root": info["image_root"], "context": context, "continuing_pairs": continuing,
             "context_joined": sum(bool((r.get("context") or "").strip()) for r in rows) if context == "flattened"
             else 0}
    if opts.token_mismatches is not None:
        stats["token_mismatches"] = opts.token_mismatches
    log.info("exported %d pairs from %s -> %s (%s; image paths %s; context %s)", len(rows), pairs_path, out, fmt,
             image_paths, context)
    return stats


# ---------------------------------------------------------------------------------------------------------------
# CLI


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m halludpo.interop", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    imp = commands.add_parser("import", help="another format -> our pairs.jsonl")
    imp.add_argument("--format", required=True, choices=sorted(FORMATS))
    imp.add_argument("--src", required=True, help="the source file, or a folder of shards")
    imp.add_argument("--out", required=True, help="pairs.jsonl to write (images/ goes beside it)")
    imp.add_argument("--image-root", help="folder the source's relative image paths start from")
    imp.add_argument("--skip-missing", action="store_true", help="drop rows whose image is missing (counted)")
    exp = commands.add_parser("export", help="our pairs.jsonl -> another format")
    exp.add_argument("--format", required=True, choices=sorted(FORMATS))
    exp.add_argument("--src", "--pairs", dest="src", required=True, help="our pairs.jsonl (or ref_logps.jsonl)")
    exp.add_argument("--out", required=True, help="file to write; its suffix picks .parquet/.json/.jsonl")
    exp.add_argument("--image-paths", choices=IMAGE_PATHS,
                     help="absolute (the default), relative to --image-root (the default when it is given), or "
                          "source: the source's own path for rows imported from this format")
    exp.add_argument("--image-root", help="write image paths relative to this folder")
    exp.add_argument("--project-root", help="folder the pairs file's relative image paths start from (default: the "
                                            "current folder; the pipeline's pairs start from the project root)")
    exp.add_argument("--processor", help="trl: the model TRL trains (folder or hub id); its chat template renders "
                                         "plain-text prompts holding the context, so TRL scores only the response")
    exp.add_argument("--flatten-context", action="store_true",
                     help="export pairs that continue an answer to a format without an unscored prefix: the "
                          "context goes in front of chosen and rejected (and is scored)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        if args.command == "import":
            stats = import_pairs(args.format, args.src, args.out, args.image_root, args.skip_missing)
        else:
            stats = export_pairs(args.format, args.src, args.out, args.image_root, image_paths=args.image_paths,
                                 project_root=args.project_root, processor=args.processor,
                                 flatten_context=args.flatten_context)
    except (InputError, ValueError) as err:
        sys.exit(f"error: {err}")
    print(json.dumps(stats, indent=2))
    return stats


if __name__ == "__main__":
    main()
