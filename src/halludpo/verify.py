"""Re-check an experiment's outputs against the manifests its stages wrote (halludpo.manifest).

    python -m halludpo.verify results/<experiment>      # or: snakemake --cores 1 verify

Reads every manifest under results/<experiment>/ and the shared ones (results/manifests/) of the folders the
experiment's stages read (its data set, base model, verifiers, downloads), hashes every file again and prints one
line per problem:

    <file>: missing (manifest <manifest>)
    <file>: truncated, <n> of <m> bytes (manifest <manifest>)
    <file>: changed, sha256 differs (manifest <manifest>)

Exit status 1 if there is any problem (or no manifest at all), else 0 after one summary line. Paths in a
manifest are relative to the folder the stage ran in; verify finds that folder from the manifest's own place, so
it may run from anywhere.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from halludpo.io import InputError, read_json, sha256_file
from halludpo.manifest import MANIFESTS


def experiment_manifests(experiment_dir: Path) -> list[Path]:
    """Every manifest under the experiment's folder."""
    return sorted(p for p in experiment_dir.rglob("*.json") if p.parent.name == MANIFESTS)


def shared_manifests(experiment_dir: Path) -> list[Path]:
    """The shared stages' manifests: results/manifests/ beside results/<experiment>/."""
    return sorted((experiment_dir.parent / MANIFESTS).glob("*.json"))


def load(path: Path) -> dict:
    """A manifest, checked to have a file list."""
    manifest = read_json(path)
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), list):
        raise InputError(f"{path}: not a manifest (no `files` list)")
    for i, entry in enumerate(manifest["files"]):
        if not isinstance(entry, dict) or not {"path", "size", "sha256"} <= entry.keys():
            raise InputError(f"{path}: files[{i}] is not {{path, size, sha256}}")
    return manifest


def base_dir(path: Path, manifest: dict) -> Path:
    """The folder the stage ran in: the manifest's path minus the relative path it was written under, else the
    current folder."""
    written = manifest.get("manifest")
    here = Path(os.path.abspath(path))
    if written and not Path(written).is_absolute():
        parts = Path(written).parts
        if here.parts[-len(parts):] == parts:
            return Path(*here.parts[: -len(parts)])
    return Path.cwd()


def located(base: Path, name: str) -> Path:
    return Path(name) if Path(name).is_absolute() else base / name


def problem(path: Path, entry: dict) -> str | None:
    """What is wrong with one file of a manifest: missing, truncated, changed; None if it is intact."""
    if not path.is_file():
        return "missing"
    size, expected = path.stat().st_size, int(entry["size"])
    if size < expected:
        return f"truncated, {size} of {expected} bytes"
    if size != expected:
        return f"changed, {size} bytes instead of {expected}"
    if sha256_file(path) != entry["sha256"]:
        return "changed, sha256 differs"
    return None


def is_under(path: Path, roots: Sequence[Path]) -> bool:
    return any(path.is_relative_to(root) for root in roots)


def used_shared(experiment_dir: Path, experiment: list[tuple[Path, dict]]) -> list[tuple[Path, dict]]:
    """The shared manifests with a file under a folder that the experiment's stages read (their `uses`)."""
    roots = {located(base_dir(p, m), u) for p, m in experiment for u in m.get("uses", [])}
    chosen = []
    for path in shared_manifests(experiment_dir):
        manifest = load(path)
        base = base_dir(path, manifest)
        if any(is_under(located(base, e["path"]), list(roots)) for e in manifest["files"]):
            chosen.append((path, manifest))
    return chosen


def check(manifests: list[tuple[Path, dict]]) -> Iterator[str | None]:
    """For every file of the manifests, each file once: None if it is intact, else the line naming its problem."""
    seen: set[Path] = set()
    for path, manifest in manifests:
        base = base_dir(path, manifest)
        for entry in manifest["files"]:
            file = located(base, entry["path"])
            if file in seen:
                continue
            seen.add(file)
            what = problem(file, entry)
            yield f"{entry['path']}: {what} (manifest {path})" if what else None


def verify(experiment_dir: str | os.PathLike, out=None) -> int:
    """Print the problems of the experiment's outputs and a summary; the exit status (0: all intact)."""
    out = out or sys.stdout
    experiment_dir = Path(experiment_dir)
    if not experiment_dir.is_dir():
        print(f"{experiment_dir}: no such folder", file=out)
        return 1
    try:
        own = [(p, load(p)) for p in experiment_manifests(experiment_dir)]
        if not own:
            print(f"{experiment_dir}: no manifests (no stage of this experiment has finished yet?)", file=out)
            return 1
        manifests = own + used_shared(experiment_dir, own)
    except InputError as err:
        print(err, file=out)
        return 1
    files = problems = 0
    for line in check(manifests):
        files += 1
        if line:
            problems += 1
            print(line, file=out)
    if problems:
        print(f"verify: {problems} of {files} files missing, truncated or changed ({len(manifests)} manifests)",
              file=out)
        return 1
    print(f"verify: all {files} files intact ({len(own)} manifests of {experiment_dir}, "
          f"{len(manifests) - len(own)} shared)", file=out)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m halludpo.verify", description=__doc__.split("\n\n")[0])
    parser.add_argument("experiment_dir", help="results/<experiment>")
    return verify(parser.parse_args(argv).experiment_dir)


if __name__ == "__main__":
    sys.exit(main())
