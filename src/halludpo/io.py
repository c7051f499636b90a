"""File helpers shared by every stage: atomic writes, validated JSON Lines, checked images, hashes, provenance.

Every file written through atomic_path (write_text, write_json, write_jsonl) is recorded for the stage's manifest
(halludpo.manifest) and gets the permissions the umask gives a new file, as open() would.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import tempfile
from collections.abc import Iterable, Iterator
from importlib import metadata
from io import BytesIO
from pathlib import Path
from typing import Any


class InputError(ValueError):
    """A stage input is missing or malformed; the message names the file (and line)."""


def current_umask() -> int:
    """The process umask, read from /proc/self/status (no race with other threads); else set and restored."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def new_file_mode() -> int:
    """The mode open() gives a new file: 0o666 minus the umask (mkstemp's files are owner-only, 0o600)."""
    return 0o666 & ~current_umask()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    A crash or an exception leaves no half-written output behind (rename is atomic on POSIX). The file gets the
    umask's permissions, like one made by open(), and is recorded for the stage's manifest.
    """
    from halludpo import manifest

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, new_file_mode())  # after the block: a writer may have replaced the file (safetensors does)
        os.replace(tmp, path)
        manifest.record(path)
    finally:
        tmp.unlink(missing_ok=True)


def publish_tree(folder: str | os.PathLike) -> None:
    """A folder written by a library (save_pretrained): every file gets the umask's permissions (safetensors
    writes owner-only files, 0o600) and the folder goes into the stage's manifest. Only the writing process
    (rank 0 under `accelerate launch`) does this."""
    from halludpo import manifest

    if not manifest.is_writer():
        return
    mode = new_file_mode()
    for file in Path(folder).rglob("*"):
        if file.is_file() and not file.is_symlink():
            os.chmod(file, mode)
    manifest.record_tree(folder)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise InputError(f"{path}:{err.lineno}: invalid JSON ({err.msg})") from None
    except UnicodeDecodeError as err:
        raise InputError(f"{path}: not UTF-8 text (byte {err.start}: {err.reason})") from None


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> int:
    n = 0
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


class Row(dict):
    """A JSON Lines object that knows where it was read: `origin` is "<file>:<line>" (see origin())."""

    origin: str | None = None


def origin(row: Any) -> str | None:
    """"<file>:<line>" of a row read by read_jsonl, None for any other mapping (a copy or a merge is a plain dict)."""
    return getattr(row, "origin", None)


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """(line number, object) of each non-blank line of a JSON Lines file; InputError naming file:line."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise InputError(f"{path}:{lineno}: not UTF-8 text (byte {err.start}: {err.reason})") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                cut = "; the file ends mid-line: truncated?" if not raw.endswith(b"\n") else ""
                raise InputError(f"{path}:{lineno}: malformed JSON line ({err.msg}{cut})") from None
            if not isinstance(row, dict):
                raise InputError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            yield lineno, row


def read_jsonl(path: str | os.PathLike, required: Iterable[str] = ()) -> list[dict]:
    """Read JSON Lines; a malformed line or a missing required field raises InputError naming file:line.

    Each row is a Row (a dict) whose origin is "<file>:<line>", so a later error about it can name its line.
    """
    required = tuple(required)
    rows = []
    for lineno, obj in iter_jsonl(path):
        missing = [k for k in required if k not in obj]
        if missing:
            raise InputError(f"{path}:{lineno}: missing field(s) {missing}")
        row = Row(obj)
        row.origin = f"{path}:{lineno}"
        rows.append(row)
    return rows


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the IEND chunk, the last of every whole PNG


def load_image(path: str | os.PathLike, named_by: str | None = None):
    """The RGB image at `path`, decoded now (Image.load), so a missing, corrupt or truncated file fails here.

    PIL decodes a PNG cut in its last bytes without complaint, so a PNG must also hold its end chunk. The
    InputError starts with `named_by` (e.g. "pairs.jsonl:12", the row that named the image) when given.
    """
    from PIL import Image, UnidentifiedImageError

    where = f"{named_by}: " if named_by else ""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise InputError(f"{where}{path}: image not found") from None
    except OSError as err:
        raise InputError(f"{where}{path}: image cannot be read ({err.strerror or err})") from None
    try:
        if data.startswith(PNG_SIGNATURE) and PNG_END not in data:
            raise OSError("truncated PNG file (no IEND chunk)")
        with Image.open(BytesIO(data)) as img:
            img.load()
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise InputError(f"{where}{path}: corrupt or unreadable image ({err})") from None


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


TRACKED_PACKAGES = ("halludpo", "torch", "transformers", "tokenizers", "peft", "accelerate", "pycocotools",
                    "nltk", "lemminflect", "numpy", "pillow")


def package_versions(names: Iterable[str] = TRACKED_PACKAGES) -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions
