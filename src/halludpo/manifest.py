"""Manifests: the size and sha256 of every file a stage wrote, so `python -m halludpo.verify` can tell later which
output changed, went missing or was truncated.

While a stage runs (config.stage_main calls start(), then finish() once run(cfg) has succeeded), every file
written through halludpo.io.atomic_path is recorded here, and so is every folder passed to record_tree (a model
folder saved by models.save_model, a folder of images). A file written into a temporary folder `X.tmp` that the
stage then renamed to `X` (how data, pretrain, merge and contrast publish their folders) stands for the whole
folder `X`. finish() hashes the files and writes one JSON file per stage invocation:

    results/<experiment>/manifests/<name>.json   a stage whose files are all in the experiment's folder
    results/manifests/<name>.json                a shared stage (data, base model, verifiers, downloads)

<name> is the stage module, round, step and split (+ for a shared stage the folder it wrote), so a rerun replaces
its manifest. Paths are relative to the working directory (absolute outside it), like the rules' paths.
"""

from __future__ import annotations

import logging
import os
import re
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from halludpo import paths
from halludpo.io import atomic_path, sha256_file

log = logging.getLogger(__name__)

MANIFESTS = "manifests"  # the folder name, in results/<experiment>/ and in results/

_files: dict[Path, None] | None = None  # None: not recording (outside a stage)
_trees: dict[Path, None] = {}
_labels: list[str] = []


def start() -> None:
    """Begin recording a stage's files (forgetting any earlier stage's)."""
    global _files
    _files = {}
    _trees.clear()
    _labels.clear()


def stop() -> None:
    """Stop recording and forget what was recorded."""
    global _files
    _files = None
    _trees.clear()
    _labels.clear()


def recording() -> bool:
    return _files is not None


def absolute(path: str | os.PathLike) -> Path:
    """The absolute, normalised path (symlinks kept: the manifest names what the stage named)."""
    return Path(os.path.abspath(path))


def record(path: str | os.PathLike) -> None:
    """Record one written file (a no-op outside a stage)."""
    if _files is not None:
        _files[absolute(path)] = None


def record_tree(folder: str | os.PathLike) -> None:
    """Record every file under `folder`, as it is when the stage ends (a no-op outside a stage)."""
    if _files is not None:
        _trees[absolute(folder)] = None


def label(text: str) -> None:
    """Add a part to this invocation's manifest name (download: the entries it fetched)."""
    if _files is not None and text not in _labels:
        _labels.append(text)


# ---------------------------------------------------------------- collecting


def published(path: Path) -> Path | None:
    """The folder `X` that a vanished temporary folder `X.tmp` holding `path` was renamed to, else None."""
    for folder in (path, *path.parents):
        if folder.name.endswith(".tmp") and not folder.exists():
            final = folder.with_name(folder.name[: -len(".tmp")])
            if final.is_dir():
                return final
    return None


def files_under(folder: Path) -> list[Path]:
    """Every regular file under `folder` (symlinks are not files a stage wrote)."""
    return [p for p in folder.rglob("*") if p.is_file() and not p.is_symlink()]


def collect() -> list[Path]:
    """The recorded files as they are now: files, recorded folders' files, renamed temporary folders' files."""
    files: set[Path] = set()
    trees = set()
    for path in [*(_files or {}), *_trees]:
        if path.is_file():
            files.add(path)
        elif path.is_dir():
            trees.add(path)
        elif (final := published(path)) is not None:
            trees.add(final)
        else:
            log.debug("manifest: %s was written but is gone (a temporary file?)", path)
    for folder in trees:
        files.update(files_under(folder))
    return sorted(files)


def display(path: Path) -> str:
    """`path` relative to the working directory, or absolute outside it."""
    cwd = Path.cwd()
    return str(path.relative_to(cwd)) if path.is_relative_to(cwd) else str(path)


def file_entry(path: Path) -> dict:
    return {"path": display(path), "size": path.stat().st_size, "sha256": sha256_file(path)}


# ---------------------------------------------------------------- naming and writing


def setting(cfg: DictConfig, key: str, default=None):
    value = OmegaConf.select(cfg, key, default=default)
    return default if value is None else value


def is_shared(cfg: DictConfig, files: list[Path]) -> bool:
    """A stage is shared when it wrote anything outside results/<experiment>/ (data, base model, downloads)."""
    experiment = absolute(setting(cfg, "paths.experiment_dir", "."))
    return not all(f.is_relative_to(experiment) for f in files)


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._]+", "-", text).strip("-.") or "root"


def manifest_path(cfg: DictConfig, module: str, files: list[Path]) -> Path:
    """Where this invocation's manifest goes; the same invocation again gets the same path (a rerun replaces it)."""
    parts = [module.removeprefix("halludpo."), f"round{setting(cfg, 'round', 0)}", str(setting(cfg, "step", "main")),
             str(setting(cfg, "split", "eval")), *_labels]
    results = absolute(setting(cfg, "paths.results", "results"))
    if not is_shared(cfg, files):
        return Path(setting(cfg, "paths.experiment_dir", ".")) / MANIFESTS / f"{'_'.join(map(slug, parts))}.json"
    common = Path(os.path.commonpath(files))
    common = common if common.is_dir() else common.parent
    where = common.relative_to(results) if common.is_relative_to(results) else common
    name = "_".join(map(slug, [*parts, str(where)]))
    return Path(setting(cfg, "paths.results", "results")) / MANIFESTS / f"{name}.json"


def uses(cfg: DictConfig) -> list[str]:
    """The shared folders this invocation's config reads: its data set, base model, object verifiers (when its
    method uses them) and downloads (real data). verify checks the shared manifests with files in them."""
    roots = [setting(cfg, "paths.data_dir"), setting(cfg, "model.path")]
    if needs_verifiers(cfg):
        roots.append(paths.verifiers_dir(cfg))
    if setting(cfg, "data.kind", "toy") != "toy":
        roots += [setting(cfg, "download.root"), setting(cfg, "download.done_dir")]
    return sorted({display(absolute(r)) for r in roots if r})


def needs_verifiers(cfg: DictConfig) -> bool:
    """The configured method reads the learned object verifiers (halludpo.mixing.uses_verifiers)."""
    from halludpo.mixing import uses_verifiers

    try:
        return bool(setting(cfg, "method")) and uses_verifiers(cfg.method)
    except (ValueError, KeyError, AttributeError):
        return False


def is_writer() -> bool:
    """One process writes the manifest: rank 0 under `accelerate launch` / torchrun, else the only one."""
    return os.environ.get("RANK", "0") == "0"


def finish(cfg: DictConfig, module: str) -> Path | None:
    """Hash the recorded files and write the manifest; stops recording. None when nothing was written."""
    try:
        files = collect()
        labels = list(_labels)
        if not files or not is_writer():
            return None
        out = manifest_path(cfg, module, files)
        manifest = {"stage": module, "round": setting(cfg, "round", 0), "step": setting(cfg, "step", "main"),
                    "split": setting(cfg, "split", "eval"), "labels": labels,
                    "experiment": setting(cfg, "experiment_name"),
                    "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "manifest": display(absolute(out)),
                    "uses": uses(cfg), "files": [file_entry(f) for f in files]}
    finally:
        stop()
    write_manifest(out, manifest)
    log.info("manifest: %d files -> %s", len(manifest["files"]), out)
    return out


def write_manifest(path: Path, manifest: dict) -> None:
    """Atomically, and outside recording (a manifest is not a stage output)."""
    import json

    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def stage_module(func) -> str:
    """The module a stage's run() is defined in, "halludpo.data" also when it runs as `python -m halludpo.data`."""
    import sys

    module = func.__module__
    if module == "__main__":
        spec = getattr(sys.modules["__main__"], "__spec__", None)
        module = spec.name if spec is not None else Path(sys.argv[0]).stem
    return module
