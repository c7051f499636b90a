"""halludpo.download against a real HTTP server on 127.0.0.1 serving archives built here: nothing leaves the machine."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from halludpo.download import (ChecksumError, DownloadInterrupted, EntryError, check_entry, fetch, fetch_all,
                               lock_path, marker_path, marker_paths, partial_path, requested_names, run,
                               select_entries)
from tests.conftest import serving

FILES = {"data/a.txt": b"alpha\n" * 50, "data/sub/b.txt": b"beta\n" * 70}


class FileServer(ThreadingHTTPServer):
    """Serves `files` by URL path; honours `Range: bytes=N-`; `cut_after` bytes then hangs up, once."""

    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), RangeHandler)
        self.files: dict[str, bytes] = {}
        self.cut_after: int | None = None
        self.ignore_range = False
        self.fail_once: int | None = None
        self.requests: list[tuple[str, str | None]] = []

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/{path}"


class RangeHandler(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's naming)
        server = self.server
        name = self.path.lstrip("/")
        server.requests.append((name, self.headers.get("Range")))
        body = server.files.get(name)
        if server.fail_once:
            # cleared before answering: the client's retry may arrive before this thread runs another line
            status, server.fail_once = server.fail_once, None
            self.send_error(status)
            return
        if body is None:
            self.send_error(404)
            return
        start = 0
        if self.headers.get("Range") and not server.ignore_range:
            start = int(self.headers["Range"].removeprefix("bytes=").rstrip("-"))
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        if server.cut_after is not None:
            self.wfile.write(body[start:start + server.cut_after])
            server.cut_after = None
            self.close_connection = True
            return
        self.wfile.write(body[start:])

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    with serving(FileServer()) as srv:
        yield srv


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def zip_bytes() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in FILES.items():
            zf.writestr(name, data)
    return buf.getvalue()


def tar_gz_bytes() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in FILES.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def entry(server, name, body, filename, extract=None, known_hash=None):
    server.files[filename] = body
    return {"name": name, "url": server.url(filename), "sha256": known_hash or sha256(body),
            "filename": filename, "extract": extract}


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


@pytest.mark.parametrize(("kind", "build", "filename"), [("zip", zip_bytes, "set/a.zip"),
                                                        ("tar", tar_gz_bytes, "set/b.tar.gz")])
def test_download_extract_and_checksum(server, tmp_path, kind, build, filename):
    body = build()
    e = entry(server, "set", body, filename, extract=kind)
    folder = fetch(e, tmp_path, progress=False)
    assert folder == tmp_path / "set"
    for name, data in FILES.items():
        assert (folder / name).read_bytes() == data
    assert (tmp_path / filename).read_bytes() == body  # archive kept, so a rerun can check it
    assert not partial_path(tmp_path / filename).exists()
    # a rerun finds the file with the right checksum: no request, nothing unpacked again
    (folder / "data" / "a.txt").write_bytes(b"edited")
    n = len(server.requests)
    assert fetch(e, tmp_path, progress=False) == folder
    assert len(server.requests) == n
    assert (folder / "data" / "a.txt").read_bytes() == FILES["data/a.txt"]  # short file -> extracted again


def test_md5_known_hash_and_plain_file(server, tmp_path):
    body = b"x" * 1000
    e = entry(server, "plain", body, "p/x.bin", known_hash="md5:" + hashlib.md5(body).hexdigest())
    assert fetch(e, tmp_path).read_bytes() == body  # with its progress bar


def test_resume_after_interrupted_transfer(server, tmp_path):
    body = os.urandom(200_000)
    e = entry(server, "big", body, "big/file.bin")
    server.cut_after = 50_000
    with pytest.raises(DownloadInterrupted, match="run again to resume"):
        fetch(e, tmp_path, progress=False)
    part = partial_path(tmp_path / "big/file.bin")
    assert part.stat().st_size == 50_000 and not (tmp_path / "big/file.bin").exists()

    path = fetch(e, tmp_path, progress=False)
    assert server.requests[-1] == ("big/file.bin", "bytes=50000-")
    assert path.read_bytes() == body
    assert files_under(tmp_path) == ["big/file.bin"]


def test_retries_resume_within_one_call(server, tmp_path, monkeypatch):
    monkeypatch.setattr("halludpo.download.time.sleep", lambda s: None)
    body = os.urandom(100_000)
    e = entry(server, "big", body, "f.bin")
    server.cut_after = 30_000
    assert fetch(e, tmp_path, progress=False, retries=1).read_bytes() == body
    assert [r for _, r in server.requests] == [None, "bytes=30000-"]


def test_server_ignoring_range_restarts_from_zero(server, tmp_path):
    body = os.urandom(80_000)
    e = entry(server, "big", body, "f.bin")
    server.cut_after = 20_000
    with pytest.raises(DownloadInterrupted):
        fetch(e, tmp_path, progress=False)
    server.ignore_range = True
    assert fetch(e, tmp_path, progress=False).read_bytes() == body


def test_whole_partial_is_kept_on_416(server, tmp_path):
    body = b"complete" * 100
    e = entry(server, "f", body, "f.bin")
    partial_path(tmp_path / "f.bin").write_bytes(body)  # a try that died after the last byte
    assert fetch(e, tmp_path, progress=False).read_bytes() == body
    assert server.requests == [("f.bin", f"bytes={len(body)}-")]


def test_checksum_mismatch_names_file_and_hashes_and_leaves_nothing(server, tmp_path):
    body = b"the real bytes" * 100
    wrong = "0" * 64
    e = entry(server, "bad", body, "bad/file.bin", extract=None, known_hash=wrong)
    with pytest.raises(ChecksumError) as err:
        fetch(e, tmp_path, progress=False)
    message = str(err.value)
    assert "file.bin" in message and wrong in message and sha256(body) in message
    assert files_under(tmp_path) == []


def test_checksum_mismatch_after_resume_deletes_the_partial(server, tmp_path):
    body = os.urandom(60_000)
    e = entry(server, "bad", body, "bad.bin", known_hash="1" * 64)
    server.cut_after = 10_000
    with pytest.raises(DownloadInterrupted):
        fetch(e, tmp_path, progress=False)
    with pytest.raises(ChecksumError):
        fetch(e, tmp_path, progress=False)
    assert files_under(tmp_path) == []


def test_offline_root_verifies_without_any_request(server, tmp_path):
    body = zip_bytes()
    e = entry(server, "mine", body, "coco/mine.zip", extract="zip")
    (tmp_path / "coco").mkdir()
    (tmp_path / "coco/mine.zip").write_bytes(body)
    folder = fetch(e, tmp_path, progress=False, offline=True)
    assert (folder / "data/sub/b.txt").read_bytes() == FILES["data/sub/b.txt"]
    assert server.requests == []


def test_offline_mismatch_and_missing_file(server, tmp_path):
    e = entry(server, "mine", b"expected", "mine.bin")
    (tmp_path / "mine.bin").write_bytes(b"something else")
    with pytest.raises(ChecksumError, match=f"expected {sha256(b'expected')}, got {sha256(b'something else')}"):
        fetch(e, tmp_path, offline=True)
    assert files_under(tmp_path) == ["mine.bin"]  # a user's own file is reported, never deleted
    with pytest.raises(FileNotFoundError, match="offline"):
        fetch({**e, "filename": "absent.bin"}, tmp_path, offline=True)
    assert server.requests == []


@pytest.mark.parametrize("known_hash", [None, "TO-VERIFY", "to-verify"])
def test_null_or_unverified_checksum_is_refused_before_any_request(server, tmp_path, known_hash):
    good = entry(server, "good", b"ok", "good.bin")
    bad = {**entry(server, "bad", b"??", "bad.bin"), "sha256": known_hash}
    with pytest.raises(EntryError, match="bad") as err:
        fetch_all([good, bad], tmp_path, progress=False)
    if known_hash:
        assert "sha256sum" in str(err.value) and "download.entries.bad.sha256" in str(err.value)
    assert server.requests == [] and files_under(tmp_path) == []


@pytest.mark.parametrize(("change", "words"), [({"sha256": "abc"}, "wrong length"),
                                               ({"sha256": "md5:" + "a" * 64}, "wrong length"),
                                               ({"extract": "rar"}, "extract"),
                                               ({"filename": "../up.bin"}, "relative"),
                                               ({"url": None, "sha256": "a" * 64}, None)])
def test_malformed_entries(change, words):
    e = {"name": "e", "url": "http://127.0.0.1/x", "sha256": "a" * 64, "filename": "x", "extract": None, **change}
    if words is None:
        check_entry(e)
        return
    with pytest.raises(EntryError, match=words):
        check_entry(e)


def test_http_error_is_final(server, tmp_path):
    e = {"name": "gone", "url": server.url("nothing-here"), "sha256": "a" * 64, "filename": "g.bin",
         "extract": None}
    with pytest.raises(OSError, match="HTTP 404"):
        fetch(e, tmp_path, progress=False, retries=3)
    assert len(server.requests) == 1


def test_server_error_is_retried(server, tmp_path, monkeypatch):
    monkeypatch.setattr("halludpo.download.time.sleep", lambda s: None)
    e = entry(server, "busy", b"data" * 10, "busy.bin")
    server.fail_once = 503
    assert fetch(e, tmp_path, progress=False, retries=1).read_bytes() == b"data" * 10
    assert len(server.requests) == 2


def test_select_entries_expands_bundles():
    entries = {"a": {"url": "u"}, "b": {"url": "v"}, "c": {"url": "w"}}
    bundles = {"ab": ["a", "b"]}
    assert [e["name"] for e in select_entries(entries, bundles, ["ab", "a", "c"])] == ["a", "b", "c"]
    assert [e["name"] for e in select_entries(entries, bundles)] == ["a", "b", "c"]
    with pytest.raises(EntryError, match="unknown download"):
        select_entries(entries, bundles, ["zz"])


def test_shipped_config_entries():
    """Every entry of configs/download/default.yaml is well formed and has a checksum, except AMBER's and MMHal-Bench's
    image archives (no hash published or readable): refused as shipped, accepted with verify=tofu. Every GitHub file
    is pinned to a commit."""
    from halludpo.config import compose, to_plain

    dl = compose([]).download
    entries = select_entries(to_plain(dl.entries), to_plain(dl.bundles))
    for bundle in dl.bundles:
        select_entries(to_plain(dl.entries), to_plain(dl.bundles), [bundle])
    refused = []
    for e in entries:
        assert e["url"].startswith(("http://", "https://")), e
        if "raw.githubusercontent.com" in e["url"]:
            assert re.search(r"/[0-9a-f]{40}/", e["url"]), e["url"]
        try:
            check_entry(e)
        except EntryError as err:
            assert "verify=tofu" in str(err)
            refused.append(e["name"])
            assert check_entry({**e, "verify": "tofu"})["sha256"] is None
    assert refused == ["amber_images", "mmhal_images"]
    tofu = compose(["download.entries.amber_images.verify=tofu"]).download.entries.amber_images
    assert check_entry({"name": "amber_images", **to_plain(tofu)})["verify"] == "tofu"


def test_marker_paths_and_requested_names():
    dl = OmegaConf.create({"done_dir": "d", "bundles": {"ab": ["a", "b"]},
                           "entries": {"a": {"url": "u"}, "b": {"url": "v"}}})
    assert marker_paths(dl, ["ab"]) == ["d/a.json", "d/b.json"]
    assert requested_names("a") == ["a"] and requested_names(OmegaConf.create(["a", "b"])) == ["a", "b"]
    assert requested_names(None) == [] and requested_names([]) == []


def test_run_fetches_names_and_writes_markers(server, tmp_path):
    body = zip_bytes()
    e = entry(server, "z", body, "z/z.zip", extract="zip")
    entries = {"z": {k: v for k, v in e.items() if k != "name"},
               "other": {"url": server.url("o"), "sha256": "TO-VERIFY", "filename": "o", "extract": None}}
    cfg = OmegaConf.create({"download": {"root": str(tmp_path / "data"), "done_dir": str(tmp_path / "done"),
                                         "offline": False, "progress": False, "retries": 0, "names": ["zz"],
                                         "bundles": {"zz": ["z"]}, "entries": entries}})
    run(cfg)
    marker = marker_path(tmp_path / "done", "z")
    assert OmegaConf.load(marker).path == str(tmp_path / "data" / "z")
    assert (tmp_path / "data/z/data/a.txt").read_bytes() == FILES["data/a.txt"]


def test_run_records_the_file_its_members_and_the_marker_for_the_manifest(server, tmp_path, monkeypatch):
    from halludpo import manifest

    monkeypatch.chdir(tmp_path)
    e = entry(server, "z", zip_bytes(), "z/z.zip", extract="zip")
    cfg = OmegaConf.create({"download": {"root": "results/downloads", "done_dir": "results/downloads/done",
                                         "offline": False, "progress": False, "retries": 0, "names": ["z"],
                                         "bundles": {}, "entries": {"z": {k: v for k, v in e.items() if k != "name"}}},
                            "paths": {"results": "results", "experiment_dir": "results/exp"}})
    manifest.start()
    run(cfg)
    out = manifest.finish(cfg, "halludpo.download")
    assert out == Path("results/manifests/download_round0_main_eval_z_downloads.json")
    written = json.loads(out.read_text())
    assert [f["path"] for f in written["files"]] == [
        "results/downloads/done/z.json", "results/downloads/z/data/a.txt", "results/downloads/z/data/sub/b.txt",
        "results/downloads/z/z.zip"]


def test_downloaded_and_extracted_files_get_the_umask_permissions(server, tmp_path):
    old = os.umask(0o022)
    try:
        e = entry(server, "set", tar_gz_bytes(), "set/b.tar.gz", extract="tar")
        folder = fetch(e, tmp_path, progress=False)
    finally:
        os.umask(old)
    assert oct((tmp_path / "set" / "b.tar.gz").stat().st_mode & 0o777) == oct(0o644)
    assert oct((folder / "data" / "a.txt").stat().st_mode & 0o777) == oct(0o644)


# ---------------------------------------------------------------- trust on first use (verify: tofu)


def tofu_entry(server, body=b"images" * 40):
    return {**entry(server, "imgs", body, "imgs.bin"), "sha256": None, "verify": "tofu"}


def test_tofu_records_the_first_download_warns_once_and_checks_every_later_run(server, tmp_path, caplog):
    e, locks = tofu_entry(server), tmp_path / "locks"
    with caplog.at_level("WARNING", logger="halludpo.download"):
        fetch(e, tmp_path / "data", progress=False, lock_dir=locks)
    assert json.loads(lock_path(locks, "imgs").read_text())["sha256"] == sha256(b"images" * 40)
    assert sum("trusting this first download" in r.message for r in caplog.records) == 1
    caplog.clear()
    server.requests.clear()
    (tmp_path / "data" / "imgs.bin").unlink()
    with caplog.at_level("WARNING", logger="halludpo.download"):
        fetch(e, tmp_path / "data", progress=False, lock_dir=locks)  # same bytes again: checked, no warning
    assert len(server.requests) == 1 and not caplog.records
    (tmp_path / "data" / "imgs.bin").unlink()
    server.files["imgs.bin"] = b"changed" * 40                     # the server now serves other bytes
    with pytest.raises(ChecksumError, match="recorded on first use in .*imgs.json"):
        fetch(e, tmp_path / "data", progress=False, lock_dir=locks)
    assert not (tmp_path / "data" / "imgs.bin").exists()
    path = fetch(e, tmp_path / "data2", progress=False, lock_dir=tmp_path / "locks2")  # a new lock: trusted
    path.write_bytes(b"tampered")
    with pytest.raises(ChecksumError, match="imgs.json"):  # offline: checked against the lock too
        fetch(e, tmp_path / "data2", offline=True, lock_dir=tmp_path / "locks2")


def test_tofu_lock_for_another_url_is_refused(server, tmp_path):
    e, locks = tofu_entry(server), tmp_path / "locks"
    fetch(e, tmp_path, progress=False, lock_dir=locks)
    with pytest.raises(EntryError, match="delete the lock file"):
        fetch({**e, "url": server.url("elsewhere.bin")}, tmp_path, progress=False, lock_dir=locks)


def test_known_hash_stays_strict_under_tofu_and_bad_modes_are_refused(server, tmp_path):
    e = {**entry(server, "k", b"known", "k.bin"), "verify": "tofu"}
    with pytest.raises(ChecksumError):
        fetch({**e, "sha256": sha256(b"other")}, tmp_path, progress=False, lock_dir=tmp_path / "locks")
    assert not (tmp_path / "locks").exists()
    with pytest.raises(EntryError, match="strict or tofu"):
        check_entry({**e, "verify": "trust"})


def test_run_marker_of_a_tofu_entry_names_the_recorded_hash(server, tmp_path):
    e = tofu_entry(server)
    cfg = OmegaConf.create({"download": {
        "root": str(tmp_path / "data"), "done_dir": str(tmp_path / "done"), "lock_dir": str(tmp_path / "locks"),
        "offline": False, "progress": False, "retries": 0, "names": ["imgs"], "bundles": {},
        "entries": {"imgs": {k: v for k, v in e.items() if k != "name"}}}})
    run(cfg)
    marker = json.loads(marker_path(tmp_path / "done", "imgs").read_text())
    assert marker["sha256"] == sha256(b"images" * 40) and marker["verify"] == "tofu"
