"""Stage `download` (rule download): public datasets by URL and checksum, resumable, through pooch.

    python -m halludpo.download download.names=[coco2014_val]           # an entry or a bundle of configs/download/
    python -m halludpo.download download.names=[pope_coco] download.offline=true download.root=/data/public

An entry is {name, url, sha256, filename, extract}: `sha256` is a hex SHA256 or pooch's `alg:hex` form
("md5:..."); `filename` is relative to the root; `extract` is null, zip or tar (unpacked beside the archive).
An archive is unpacked only if every member is a plain file or folder that stays inside that folder: a link, a
device file, an absolute path or a '..' path is refused (InputError naming the archive and the member), before
anything is written.
Every entry needs a real checksum: null is an error, and "TO-VERIFY" (a file whose checksum no public source
gives) is refused with a message that says how to fill it in. The one exception is an entry with `verify: tofu`
and `sha256: null` (trust on first use, for a file no source publishes a hash of): the first download is trusted,
its sha256 recorded in a lock file (download.lock_dir, `<name>.json`) with a warning, and every later run checks
the file against that lock as strictly as against a configured hash. `verify: strict` is the default; a known hash
is always checked strictly.

Online, pooch fetches the file (an existing file whose checksum matches is not downloaded again). Its plain
HTTP downloader restarts a cut transfer from zero, so this module's downloader keeps the bytes in
`<filename>.part` and asks for the rest with an HTTP Range request on the next try. Offline
(`download.offline=true`), the files must already be under the root: they are checked, never downloaded.
A checksum mismatch names the file and both hashes; a bad download is deleted (a user's own file never is).
The stage's manifest (halludpo.manifest) lists the file, its unpacked files and the marker.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import stat
import sys
import tarfile
import time
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path, PurePosixPath

import pooch
from omegaconf import DictConfig
from tqdm.auto import tqdm

from halludpo import manifest
from halludpo.config import stage_main, to_plain
from halludpo.io import InputError, read_json, write_json

log = logging.getLogger(__name__)

UNVERIFIED = "TO-VERIFY"
ENTRY_KEYS = ("name", "url", "sha256", "filename", "extract")  # required; `verify` is optional (strict)
VERIFY_MODES = ("strict", "tofu")
EXTRACT_KINDS = ("zip", "tar")
HASH_FORM = re.compile(r"^(?:(?P<alg>[a-z0-9]+):)?(?P<hex>[0-9a-fA-F]+)$")


class EntryError(ValueError):
    """A download entry cannot be used as written: a missing key, no checksum, an unknown extract kind."""


class ChecksumError(ValueError):
    """A file's checksum differs from the one in the config."""


class DownloadError(OSError):
    """The server refused the file (HTTP error) or answered something that cannot be resumed."""


class DownloadInterrupted(DownloadError):
    """The transfer stopped early; the bytes received are kept for the next try."""


# ---------------------------------------------------------------- entries


def check_entry(entry: Mapping) -> dict:
    """The entry as a plain dict, or EntryError saying what to fix (a missing or unverified checksum first)."""
    entry = dict(entry)
    name = entry.get("name", "?")
    missing = [k for k in ENTRY_KEYS if k not in entry]
    if missing:
        raise EntryError(f"download entry {name!r}: missing key(s) {missing}")
    entry["verify"] = entry.get("verify") or "strict"
    if entry["verify"] not in VERIFY_MODES:
        raise EntryError(f"download entry {name!r}: verify must be strict or tofu, got {entry['verify']!r}")
    if not trusts_first_use(entry):
        check_hash(name, entry["sha256"], entry["url"])
    if entry["extract"] not in (None, *EXTRACT_KINDS):
        raise EntryError(f"download entry {name!r}: extract must be null, zip or tar, got {entry['extract']!r}")
    filename = PurePosixPath(str(entry["filename"]))
    if filename.is_absolute() or ".." in filename.parts or not filename.parts:
        raise EntryError(f"download entry {name!r}: filename must be a relative path under the root, "
                         f"got {entry['filename']!r}")
    return entry


def trusts_first_use(entry: Mapping) -> bool:
    """verify: tofu without a hash: the first download's sha256 is recorded and checked from then on."""
    return entry.get("verify") == "tofu" and entry["sha256"] is None


def check_hash(name: str, known_hash: str | None, url: str) -> None:
    """Refuse a null or TO-VERIFY checksum, and one that is not hex of the right length for its algorithm."""
    if known_hash is None:
        raise EntryError(f"download entry {name!r} has no checksum (sha256: null): give its sha256, or, if no "
                         f"source publishes one, set download.entries.{name}.verify=tofu (trust on first use: the "
                         f"first download's sha256 is recorded under results/downloads/ and checked on every run)")
    if str(known_hash).strip().upper() == UNVERIFIED:
        raise EntryError(
            f"download entry {name!r} has checksum {UNVERIFIED}: no public source gives it. Download {url} once "
            f"yourself, check the file, then set download.entries.{name}.sha256 to the output of `sha256sum` "
            f"(in configs/download/default.yaml or as an override)")
    match = HASH_FORM.match(str(known_hash))
    alg = (match.group("alg") or "sha256") if match else None
    if not match or alg not in hashlib.algorithms_guaranteed:
        raise EntryError(f"download entry {name!r}: checksum {known_hash!r} is not '<sha256 hex>' or 'alg:<hex>'")
    if len(match.group("hex")) != 2 * hashlib.new(alg).digest_size:
        raise EntryError(f"download entry {name!r}: {alg} checksum {known_hash!r} has the wrong length")


def select_entries(entries: Mapping[str, Mapping], bundles: Mapping[str, Iterable[str]],
                   names: Iterable[str] = ()) -> list[dict]:
    """Entries by name, a bundle name standing for its entries; no names = every entry. Each gets its `name`."""
    names = list(names) or list(entries)
    chosen: list[str] = []
    for name in names:
        if name in bundles:
            members = list(bundles[name])
        elif name in entries:
            members = [name]
        else:
            raise EntryError(f"unknown download {name!r}; entries: {sorted(entries)}, bundles: {sorted(bundles)}")
        unknown = [m for m in members if m not in entries]
        if unknown:
            raise EntryError(f"download bundle {name!r} lists unknown entries {unknown}")
        chosen += [m for m in members if m not in chosen]
    return [{"name": n, **entries[n]} for n in chosen]


# ---------------------------------------------------------------- checksums


def hash_parts(known_hash: str) -> tuple[str, str]:
    """('sha256', hex) from 'hex' or 'alg:hex'."""
    alg, _, digest = str(known_hash).rpartition(":")
    return (alg or "sha256").lower(), digest.lower()


def verify(path: str | os.PathLike, known_hash: str, name: str, delete_on_mismatch: bool = False) -> Path:
    """Check a file's checksum (pooch.file_hash); a mismatch raises ChecksumError naming file and both hashes."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{name}: {path} not found")
    alg, expected = hash_parts(known_hash)
    actual = pooch.file_hash(str(path), alg=alg)
    if actual != expected:
        if delete_on_mismatch:
            path.unlink(missing_ok=True)
        fate = "deleted it" if delete_on_mismatch else "left it untouched"
        raise ChecksumError(f"{name}: {alg} checksum of {path} does not match: expected {expected}, got {actual} "
                            f"({fate}; the file is corrupt or the configured checksum is outdated)")
    return path


def partial_path(target: Path) -> Path:
    """Where the bytes of an unfinished download of `target` are kept between tries."""
    return target.with_name(target.name + ".part")


# ---------------------------------------------------------------- resumable transfer


class ResumableHTTPDownloader(pooch.HTTPDownloader):
    """pooch's HTTP downloader, made resumable with HTTP Range requests on a kept partial file.

    pooch streams into a temporary file that it deletes on any failure. This downloader appends to `partial`
    instead (asking the server only for the missing bytes), checks the finished file's checksum, and only then
    moves it onto pooch's temporary file, which pooch checks again and renames into place. A checksum mismatch
    deletes the partial file, so a bad download leaves nothing behind.
    """

    def __init__(self, partial: Path, known_hash: str, name: str, progressbar: bool = True,
                 chunk_size: int = 1 << 20, timeout: float = 60):
        super().__init__(progressbar=progressbar, chunk_size=chunk_size, timeout=timeout)
        self.partial = Path(partial)
        self.known_hash = known_hash
        self.name = name
        self.transfers = 0

    def __call__(self, url, output_file, pooch_instance, check_only=False):
        if check_only:
            return super().__call__(url, output_file, pooch_instance, check_only=True)
        self.transfers += 1
        self.partial.parent.mkdir(parents=True, exist_ok=True)
        self.fetch_rest(url)
        if self.known_hash is not None:  # None: trust on first use, the caller records the hash
            verify(self.partial, self.known_hash, self.name, delete_on_mismatch=True)
        os.replace(self.partial, output_file)
        return None

    def fetch_rest(self, url: str, restarted: bool = False) -> None:
        """Append the bytes after those already in `partial`; the server may resend all (200) or none (416)."""
        import requests
        import urllib3

        offset = self.partial.stat().st_size if self.partial.exists() else 0
        headers = {"Accept-Encoding": "identity"}  # byte offsets must count the bytes on disk, not gzip's
        if offset:
            headers["Range"] = f"bytes={offset}-"
        try:
            with requests.get(url, headers=headers, stream=True, timeout=self.kwargs["timeout"]) as response:
                if response.status_code == 416 and not restarted:
                    self.restart_after_416(url, response, offset)
                    return
                if response.status_code >= 400:  # 429 and 5xx may pass: retried; others are final
                    transient = response.status_code == 429 or response.status_code >= 500
                    error = DownloadInterrupted if transient else DownloadError
                    raise error(f"{self.name}: {url} answered HTTP {response.status_code}")
                self.write_body(response, offset)
        except (requests.RequestException, urllib3.exceptions.HTTPError) as err:
            have = self.partial.stat().st_size if self.partial.exists() else 0
            kept = f"{have} bytes kept in {self.partial}, run again to resume" if have else "nothing received"
            raise DownloadInterrupted(f"{self.name}: transfer from {url} failed ({err}); {kept}") from err

    def restart_after_416(self, url: str, response, offset: int) -> None:
        """Range not satisfiable: the partial file is already whole (then keep it) or longer than the file."""
        total = response.headers.get("Content-Range", "").rpartition("/")[2]
        if total.isdigit() and int(total) == offset:
            return
        log.warning("%s: the kept partial file does not fit %s; starting over", self.name, url)
        self.partial.unlink(missing_ok=True)
        self.fetch_rest(url, restarted=True)

    def write_body(self, response, offset: int) -> None:
        """Stream the body into `partial`: appended after a 206 that starts at `offset`, else from byte 0."""
        resumed = response.status_code == 206
        if resumed and not response.headers.get("Content-Range", "").startswith(f"bytes {offset}-"):
            raise DownloadError(f"{self.name}: server answered range {response.headers.get('Content-Range')!r} "
                                f"to a request for bytes {offset}-")
        if offset and not resumed:
            log.info("%s: the server ignored the Range request; downloading from the start", self.name)
            offset = 0
        length = response.headers.get("Content-Length")
        expected = offset + int(length) if length and length.isdigit() else None
        with open(self.partial, "ab" if resumed else "wb") as out, \
                tqdm(total=expected, initial=offset, unit="B", unit_scale=True, desc=self.name,
                     disable=not self.progressbar, leave=True) as bar:
            # read1: whatever has arrived, so a cut transfer keeps every byte it received (iter_content would
            # drop the last unfilled chunk); raw bytes, so offsets count what is on disk
            while chunk := response.raw.read1(self.chunk_size, decode_content=False):
                out.write(chunk)
                bar.update(len(chunk))
        have = self.partial.stat().st_size
        if expected is not None and have != expected:
            raise DownloadInterrupted(f"{self.name}: got {have} of {expected} bytes; kept in {self.partial}, "
                                      "run again to resume")


# ---------------------------------------------------------------- fetch


def download(entry: dict, target: Path, progress: bool) -> bool:
    """pooch.retrieve with the resumable downloader; True if bytes were transferred (False: the file was there)."""
    downloader = ResumableHTTPDownloader(partial_path(target), entry["sha256"], entry["name"], progressbar=progress)
    pooch.retrieve(entry["url"], known_hash=entry["sha256"], fname=target.name, path=target.parent,
                   downloader=downloader)
    return downloader.transfers > 0


def download_with_retries(entry: dict, target: Path, progress: bool, retries: int) -> bool:
    """Retry a cut transfer (each try resumes where the last stopped); HTTP and checksum errors are final."""
    for attempt in range(retries + 1):
        try:
            return download(entry, target, progress)
        except DownloadInterrupted as err:
            if attempt == retries:
                raise
            wait = min(2 ** attempt, 30)
            log.warning("%s; retrying in %d s (%d of %d)", err, wait, attempt + 1, retries)
            time.sleep(wait)
    raise AssertionError("unreachable")


# ---------------------------------------------------------------- extraction


def outside_reason(name: str, dest: Path) -> str | None:
    """Why a member called `name` would be written outside `dest` (absolute, '..', through a link), else None."""
    if name.startswith("/") or PurePosixPath(name).is_absolute():
        return "an absolute path"
    if ".." in PurePosixPath(name).parts:
        return "a path outside the target ('..')"
    if not (dest / name).resolve().is_relative_to(dest.resolve()):
        return f"a path outside the target {dest}"
    return None


def tar_kind_reason(member: tarfile.TarInfo) -> str | None:
    """Why a tar member is not a plain file or folder (links and special files are refused), else None."""
    if member.issym():
        return f"a symbolic link (to {member.linkname!r})"
    if member.islnk():
        return f"a hard link (to {member.linkname!r})"
    if not (member.isfile() or member.isdir()):
        return "a device, FIFO or other special file"
    return None


def zip_kind_reason(info: zipfile.ZipInfo) -> str | None:
    """Why a zip member is not a plain file or folder (a symlink stored with its Unix mode), else None."""
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_IFMT(mode) and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):  # no type bits: a plain file
        return "a device, FIFO or other special file"
    return None


def refuse(archive: Path, name: str, reason: str) -> None:
    raise InputError(f"{archive}: member {name!r} is {reason}; refused to unpack the archive (nothing was extracted)")


def check_members(archive: Path, members: list, kind: str) -> list:
    """The members (TarInfo / ZipInfo), each checked to be a plain file or folder that stays inside the archive's
    folder; the first that is not raises InputError naming the archive and the member."""
    kind_reason = zip_kind_reason if kind == "zip" else tar_kind_reason
    for member in members:
        name = member.filename if kind == "zip" else member.name
        reason = kind_reason(member) or outside_reason(name, archive.parent)
        if reason:
            refuse(archive, name, reason)
    return members


def archive_members(archive: Path, kind: str) -> list[tuple[str, int]]:
    """(name, size) of every regular file in a zip or tar archive, after check_members."""
    if kind == "zip":
        with zipfile.ZipFile(archive) as zf:
            return [(i.filename, i.file_size) for i in check_members(archive, zf.infolist(), kind) if not i.is_dir()]
    with tarfile.open(archive) as tf:
        return [(m.name, m.size) for m in check_members(archive, tf.getmembers(), kind) if m.isfile()]


def is_extracted(archive: Path, members: list[tuple[str, int]]) -> bool:
    """Every file of the archive is beside it with its full size (a cut extraction leaves a short file)."""
    dest = archive.parent
    return all((dest / n).is_file() and (dest / n).stat().st_size == size for n, size in members)


def extract_archive(archive: Path, kind: str) -> None:
    """Unpack an archive beside itself once check_members accepts every member. tar also goes through tarfile's
    "data" filter (Python >= 3.11.4), which refuses the same members and drops set-uid bits and others' write bit."""
    dest = archive.parent
    if kind == "zip":
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(dest, members=check_members(archive, zf.infolist(), kind))
        return
    with tarfile.open(archive) as tf:
        members = check_members(archive, tf.getmembers(), kind)
        if hasattr(tarfile, "data_filter"):
            tf.extractall(dest, members=members, filter="data")
        else:
            tf.extractall(dest, members=members)


def extract(entry: dict, archive: Path, fresh: bool) -> Path:
    """Unpack the archive beside itself (extract_archive), unless it already is; return that folder. Its files go
    into the stage's manifest either way."""
    kind = entry["extract"]
    members = archive_members(archive, kind)
    if fresh or not is_extracted(archive, members):
        log.info("%s: extracting %s", entry["name"], archive)
        extract_archive(archive, kind)
    for name, _ in members:
        manifest.record(archive.parent / name)
    return archive.parent


def fetch(entry: Mapping, root: str | os.PathLike, progress: bool = True, offline: bool = False,
          retries: int = 0, lock_dir: str | os.PathLike | None = None) -> Path:
    """Download (or, offline, only check) one entry under `root`; returns the file, or for an archive the folder
    it was unpacked in. Online, a file already there with the right checksum is not downloaded again. An entry
    trusted on first use is checked against its lock in `lock_dir` (default: `root`/locks), or records it."""
    entry = check_entry(entry)
    target = Path(root) / entry["filename"]
    lock = None
    if trusts_first_use(entry):
        lock = lock_path(lock_dir if lock_dir is not None else Path(root) / "locks", entry["name"])
        entry["sha256"] = recorded_hash(lock, entry)
    try:
        fresh = fetch_file(entry, target, progress, offline, retries)
    except ChecksumError as err:
        if lock is None:
            raise
        raise ChecksumError(f"{err}; the expected sha256 was recorded on first use in {lock}: delete that lock "
                            "file to trust a new download") from None
    if lock is not None and entry["sha256"] is None:
        record_first_use(lock, entry, target)
    manifest.record(target)
    return extract(entry, target, fresh) if entry["extract"] else target


def fetch_file(entry: dict, target: Path, progress: bool, offline: bool, retries: int) -> bool:
    """The file at `target`, checked (offline) or downloaded and checked; True if bytes were transferred. A hash
    of None (first use) checks nothing."""
    if not offline:
        return download_with_retries(entry, target, progress, retries)
    if not target.is_file():
        raise FileNotFoundError(f"{entry['name']}: offline, and {target} is not there; put the file from "
                                f"{entry['url']} there, or run without download.offline=true")
    if entry["sha256"] is not None:
        verify(target, entry["sha256"], entry["name"])
    return False


# ---------------------------------------------------------------- trust on first use


def lock_path(lock_dir: str | os.PathLike, name: str) -> Path:
    """The lock file of a trust-on-first-use entry: the sha256 its first download had."""
    return Path(lock_dir) / f"{name}.json"


def recorded_hash(lock: Path, entry: Mapping) -> str | None:
    """The sha256 recorded on first use, or None before it; a lock recorded for another URL is an EntryError."""
    if not lock.is_file():
        return None
    recorded = read_json(lock)
    if recorded.get("url") != entry["url"]:
        raise EntryError(f"download entry {entry['name']!r}: {lock} trusts {recorded.get('url')}, but the entry now "
                         f"names {entry['url']}; delete the lock file to trust the new file")
    log.info("%s: checking against the sha256 recorded on first use (%s)", entry["name"], lock)
    return recorded["sha256"]


def record_first_use(lock: Path, entry: Mapping, target: Path) -> None:
    """Write the lock of a file trusted on first use, and warn (once: later runs find the lock)."""
    digest = pooch.file_hash(str(target), alg="sha256")
    write_json(lock, {"name": entry["name"], "url": entry["url"], "sha256": digest, "bytes": target.stat().st_size,
                      "recorded": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    log.warning("%s: no published checksum; trusting this first download (verify: tofu): sha256 %s recorded in %s "
                "and checked on every later run", entry["name"], digest, lock)


def fetch_all(entries: Iterable[Mapping], root: str | os.PathLike, progress: bool = True, offline: bool = False,
              retries: int = 0, lock_dir: str | os.PathLike | None = None) -> dict[str, Path]:
    """fetch() each entry; all entries are checked first, so an unverified checksum stops the run before any
    download starts."""
    entries = [check_entry(e) for e in entries]
    return {e["name"]: fetch(e, root, progress=progress, offline=offline, retries=retries, lock_dir=lock_dir)
            for e in entries}


# ---------------------------------------------------------------- stage


def marker_path(done_dir: str | os.PathLike, name: str) -> Path:
    """The small JSON file that says an entry is fetched and checked (the rule's output)."""
    return Path(done_dir) / f"{name}.json"


def marker_paths(download_cfg: DictConfig, names: Iterable[str]) -> list[str]:
    """The markers of entries or bundles (e.g. "coco2014_val"): what a rule that reads real data takes as input."""
    chosen = select_entries(to_plain(download_cfg.entries), to_plain(download_cfg.bundles), names)
    return [str(marker_path(download_cfg.done_dir, e["name"])) for e in chosen]


def requested_names(names) -> list[str]:
    """download.names as a list: `download.names=[a,b]`, or one name given as `download.names=a`."""
    if not names:
        return []
    return [names] if isinstance(names, str) else list(names)


def run(cfg: DictConfig) -> None:
    """Fetch cfg.download.names (entries or bundles; none = all) and write one marker per entry."""
    dl = cfg.download
    entries = select_entries(to_plain(dl.entries), to_plain(dl.bundles), requested_names(dl.names))
    lock_dir = dl.get("lock_dir") or Path(dl.root) / "locks"
    try:
        fetched = fetch_all(entries, dl.root, progress=dl.progress, offline=dl.offline, retries=dl.retries,
                            lock_dir=lock_dir)
    except DownloadError as err:
        log.error("%s", err)
        sys.exit(1)
    for entry in entries:
        manifest.label(entry["name"])
        path = fetched[entry["name"]]
        if trusts_first_use(check_entry(entry)):
            entry = {**entry, "sha256": recorded_hash(lock_path(lock_dir, entry["name"]), entry)}
        write_json(marker_path(dl.done_dir, entry["name"]),
                   {**entry, "path": str(path), "offline": bool(dl.offline)})
        log.info("%s: %s", entry["name"], path)


main = stage_main(run)

if __name__ == "__main__":
    main()
