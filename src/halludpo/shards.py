"""Sharded model stages: one stage's model work split into N jobs, and progress that survives a kill.

A stage's model calls go in batches over a list in a fixed order (images sorted by id, pairs in file order,
completion prompts in plan order). Shard i of N takes a contiguous group of whole batches (shard_range), so every
batch holds the same items, padding and sampling seed (batch_seed) as in an unsharded run: the shards' rows,
concatenated in shard order, are the unsharded run's rows byte for byte, whatever N is.

Within a shard, each finished batch is appended to `<shard file>.partial` (BatchLog); a rerun after a kill or a
time limit skips the batches already there, and the shard file itself is published atomically once all are done.
The partial file's first line is a fingerprint of the config and the input files: a partial file left by another
config or another model_k is discarded, not resumed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from tqdm import tqdm

from halludpo.io import InputError, iter_jsonl, origin, read_jsonl, sha256_json, write_jsonl

log = logging.getLogger(__name__)


def shard_range(n_items: int, batch_size: int, shard: int, n_shards: int) -> range:
    """The item positions of shard `shard` of `n_shards`: a contiguous run of whole batches of batch_size items
    (the batches split as evenly as the count allows; a shard may be empty when there are fewer batches)."""
    if n_shards < 1 or not 0 <= shard < n_shards:
        raise ValueError(f"shard {shard} of {n_shards}: need 0 <= shard < shards, shards >= 1")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: must be >= 1")
    n_batches = -(-n_items // batch_size)
    first, last = shard * n_batches // n_shards, (shard + 1) * n_batches // n_shards
    return range(min(first * batch_size, n_items), min(last * batch_size, n_items))


def batch_seed(seed: int, start: int) -> int:
    """The sampling seed of the batch that starts at item `start`: the stage's seed for the first batch, a value
    derived from (seed, start) for the others, so a batch draws the same samples in any shard."""
    if start == 0:
        return int(seed)
    digest = hashlib.sha256(f"{seed}/batch/{start}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


def shard_file(path: str | os.PathLike, shard: int, n_shards: int, name: str | None = None) -> Path:
    """<folder of path>/shards/<name or path's stem>.<shard>-of-<n_shards>.jsonl"""
    path = Path(path)
    return path.parent / "shards" / f"{name or path.stem}.{shard}-of-{n_shards}.jsonl"


def shard_files(path: str | os.PathLike, n_shards: int, name: str | None = None) -> list[Path]:
    return [shard_file(path, i, n_shards, name) for i in range(n_shards)]


def finished_shard_count(path: str | os.PathLike, name: str | None = None) -> int | None:
    """The shard count of a complete set of shard files next to `path` (the largest when several are), else None.

    The Snakefile asks this for a finished output, so changing parallel.shards afterwards reruns nothing."""
    folder = Path(path).parent / "shards"
    stem = name or Path(path).stem
    counts = set()
    for f in folder.glob(f"{stem}.*-of-*.jsonl"):
        try:
            counts.add(int(f.name.removesuffix(".jsonl").rsplit("-of-", 1)[1]))
        except ValueError:
            continue
    complete = [n for n in counts if all(p.is_file() for p in shard_files(path, n, name))]
    return max(complete) if complete else None


# ---------------------------------------------------------------------------------------------------------------
# Progress that survives a kill


def input_fingerprint(config: dict, inputs: Iterable[str | os.PathLike]) -> str:
    """sha256 of the resolved config and of each input file's (path, size, mtime): a changed setting, a new
    model_k or a rewritten input file gives another fingerprint. Folders count with all their files."""
    stats = []
    for item in inputs:
        item = Path(item)
        files = sorted(p for p in item.rglob("*") if p.is_file()) if item.is_dir() else [item]
        for f in files:
            st = f.stat()
            stats.append([str(f), st.st_size, st.st_mtime_ns])
    return sha256_json({"config": config, "inputs": stats})


class BatchLog:
    """`<out>.partial`: a fingerprint line, then one line {"start": item position, "rows": [...]} per finished
    batch, flushed to disk as it is written. A line cut by a kill is the last one; it is dropped on reading."""

    def __init__(self, out: str | os.PathLike, fingerprint: str) -> None:
        self.out = Path(out)
        self.path = self.out.with_name(self.out.name + ".partial")
        self.fingerprint = fingerprint

    def load(self) -> dict[int, list[dict]]:
        """The finished batches of an earlier attempt with the same fingerprint ({} otherwise)."""
        if not self.path.is_file():
            return {}
        lines = self.path.read_bytes().split(b"\n")
        try:
            header = json.loads(lines[0])
        except json.JSONDecodeError:
            header = {}
        if header.get("fingerprint") != self.fingerprint:
            log.info("%s: left by another config or input; starting the shard over", self.path)
            self.path.unlink()
            return {}
        done = {}
        for raw in lines[1:]:
            try:
                batch = json.loads(raw)
            except json.JSONDecodeError:  # the line a kill cut short (always the last)
                break
            done[int(batch["start"])] = batch["rows"]
        return done

    def start(self, done: dict[int, list[dict]]) -> None:
        """Rewrite the partial file with the header and the batches kept (a cut last line is gone after this)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "w", encoding="utf-8") as f:
            f.write(json.dumps({"fingerprint": self.fingerprint}) + "\n")
            for start in sorted(done):
                f.write(json.dumps({"start": start, "rows": done[start]}, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def append(self, start: int, rows: list[dict]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"start": start, "rows": rows}, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def run_batches(out: str | os.PathLike, positions: range, batch_size: int,
                work: Callable[[int, int], list[dict]], fingerprint: str, desc: str = "batches") -> list[dict]:
    """Rows of work(start, stop) for every batch of `positions` (in order), appended to out's BatchLog as each
    batch finishes; batches an earlier attempt finished are taken from it. Writes `out` atomically at the end and
    removes the partial file; returns the rows."""
    batch_log = BatchLog(out, fingerprint)
    done = batch_log.load()
    starts = list(range(positions.start, positions.stop, batch_size))
    done = {s: rows for s, rows in done.items() if s in starts}
    if done:
        log.info("%s: resuming, %d of %d batches already done", batch_log.path, len(done), len(starts))
    batch_log.start(done)
    for start in tqdm([s for s in starts if s not in done], desc=desc, unit="batch"):
        rows = work(start, min(start + batch_size, positions.stop))
        batch_log.append(start, rows)
        done[start] = rows
    rows = [row for start in starts for row in done[start]]
    write_jsonl(out, rows)
    batch_log.remove()
    return rows


# ---------------------------------------------------------------------------------------------------------------
# Gathering


def gather_jsonl(shards: Sequence[str | os.PathLike], out: str | os.PathLike) -> int:
    """Concatenate the shard files in order into `out` (atomically); every line is checked to be a JSON object."""
    rows = []
    for path in shards:
        rows += [row for _, row in iter_jsonl(path)]
    return write_jsonl(out, rows)


def read_shards(shards: Sequence[str | os.PathLike], required: Iterable[str] = ()) -> list[dict]:
    """The rows of every shard file, in shard order."""
    rows = []
    for path in shards:
        if not Path(path).is_file():
            raise InputError(f"{path}: shard file not found (its shard job did not finish)")
        rows += read_jsonl(path, required)
    return rows


class RecordingCompleter:
    """A shard's view of a completer (APASI's text-only completion): complete(prefixes) completes only this
    shard's batches of the prompt list, recording them in its shard file (resumable), and returns the prefixes
    themselves for the rest. The pairs built from it are thrown away; rule inject builds them from all shards."""

    def __init__(self, completer, out: Path, shard: int, n_shards: int, fingerprint: str) -> None:
        self.completer, self.out, self.shard, self.n_shards = completer, out, shard, n_shards
        self.fingerprint = fingerprint

    def complete(self, prefixes: list[str]) -> list[str]:
        size = self.completer.batch_size
        positions = shard_range(len(prefixes), size, self.shard, self.n_shards)

        def work(start: int, stop: int) -> list[dict]:
            texts = self.completer.complete(prefixes[start:stop])
            return [{"position": i, "prefix": p, "text": t}
                    for i, p, t in zip(range(start, stop), prefixes[start:stop], texts)]

        run_batches(self.out, positions, size, work, self.fingerprint, desc=f"complete shard {self.shard}")
        return list(prefixes)


class ReplayCompleter:
    """Rule inject's completer: the completions the shard jobs recorded, checked prompt by prompt."""

    def __init__(self, shards: Sequence[str | os.PathLike]) -> None:
        self.rows = read_shards(shards, required=("position", "prefix", "text"))

    def complete(self, prefixes: list[str]) -> list[str]:
        if len(prefixes) != len(self.rows):
            raise InputError(f"the shard files hold {len(self.rows)} completions for {len(prefixes)} prompts: "
                             "they were made from other descriptions or settings; rerun the inject shards")
        for i, (prefix, row) in enumerate(zip(prefixes, self.rows)):
            if row["prefix"] != prefix or row["position"] != i:
                raise InputError(f"{origin(row)}: completion {i} was made for another prompt; rerun the inject "
                                 "shards")
        return [row["text"] for row in self.rows]
