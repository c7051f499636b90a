"""Rule fetch_model's stage (halludpo.hub) against a real HTTP server on 127.0.0.1 that answers the Hugging Face hub
routes snapshot_download uses (model info at a revision, the file tree at a commit, HEAD and GET of
/<repo>/resolve/<commit>/<file>), run as the rule runs it: `python -m halludpo.hub` with HF_ENDPOINT pointing at
the server. Nothing leaves the machine."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

from halludpo import paths
from halludpo.config import compose
from halludpo.models import build_toy_model, load_model_and_processor, save_model
from tests.conftest import TINY_ARCH, serving

ROOT = Path(__file__).resolve().parents[1]
REPO = "test-org/tiny-llava"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


class HubServer(ThreadingHTTPServer):
    """One model repository at one commit, reachable by that commit or by the branch `main`."""

    daemon_threads = True

    def __init__(self, files: dict[str, bytes]):
        super().__init__(("127.0.0.1", 0), HubHandler)
        self.files = files
        self.requests: list[tuple[str, str]] = []

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class HubHandler(BaseHTTPRequestHandler):
    def do_HEAD(self):  # noqa: N802 (http.server's naming)
        self.answer(body=False)

    def do_GET(self):  # noqa: N802
        self.answer(body=True)

    def answer(self, body: bool) -> None:
        path = unquote(urlparse(self.path).path)
        self.server.requests.append((self.command, path))
        api = f"/api/models/{REPO}/"
        if path in (f"{api}revision/main", f"{api}revision/{COMMIT}"):
            siblings = [{"rfilename": name} for name in self.server.files]
            return self.send_json({"id": REPO, "modelId": REPO, "sha": COMMIT, "private": False,
                                   "siblings": siblings}, body)
        if path == f"{api}tree/{COMMIT}":
            return self.send_json([{"type": "file", "path": name, "size": len(data), "oid": blob_id(data)}
                                   for name, data in self.server.files.items()], body)
        prefix = f"/{REPO}/resolve/{COMMIT}/"
        if path.startswith(prefix) and path[len(prefix):] in self.server.files:
            data = self.server.files[path[len(prefix):]]
            return self.send_bytes(data, body, {"X-Repo-Commit": COMMIT, "ETag": f'"{blob_id(data)}"'})
        self.send_json({"error": f"{path}: not found"}, body, status=404)

    def send_json(self, obj, body: bool, status: int = 200) -> None:
        self.send_bytes(json.dumps(obj).encode(), body, {"Content-Type": "application/json"}, status)

    def send_bytes(self, data: bytes, body: bool, headers: dict, status: int = 200) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)

    def log_message(self, *args):
        pass


def blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()  # git's blob id, as the hub reports it


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """The server, holding a tiny LLaVA saved like a hub repository, plus files fetch_model must skip."""
    model, processor = build_toy_model(["a", "bus", "cat", "."], TINY_ARCH, seed=0)
    folder = tmp_path_factory.mktemp("repo")
    save_model(model, processor, folder)
    files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    files |= {"pytorch_model.bin": b"pickled weights", "README.md": b"# tiny llava\n"}
    with serving(HubServer(files)) as server:
        yield server


def fetch_stage(results: Path, hub: HubServer, revision: str) -> subprocess.CompletedProcess:
    """The stage command of rule fetch_model, with the server as the hub endpoint."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env |= {"HF_ENDPOINT": hub.endpoint, "HF_HOME": str(results / "hf_home"), "HF_HUB_DISABLE_PROGRESS_BARS": "1",
            "PYTHONPATH": str(ROOT / "src")}
    cmd = [sys.executable, "-m", "halludpo.hub", "experiment=apasi_llava15_7b", f"model.path={REPO}",
           f"model.revision={revision}", f"paths.results={results}", f"hydra.run.dir={results}/hydra"]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=results, timeout=300)


def test_fetch_model_downloads_the_pinned_revision_into_results(hub, tmp_path):
    result = fetch_stage(tmp_path, hub, "main")
    assert result.returncode == 0, result.stderr[-3000:]
    cfg = compose(["experiment=apasi_llava15_7b", f"model.path={REPO}", "model.revision=main",
                   f"paths.results={tmp_path}"])
    folder = paths.base_model_dir(cfg)
    assert folder == tmp_path / "models" / "hub" / "test-org--tiny-llava@main"
    assert paths.model_marker(cfg, 0) == folder / "fetched.json"
    marker = json.loads((folder / "fetched.json").read_text())
    assert (marker["repo_id"], marker["revision"], marker["commit"]) == (REPO, "main", COMMIT)
    assert "model.safetensors" in marker["files"] and "pytorch_model.bin" not in marker["files"]
    assert not (folder / "pytorch_model.bin").exists()
    for name in marker["files"]:
        assert (folder / name).read_bytes() == hub.files[name]
    assert f"set model.revision={COMMIT} to pin it" in result.stderr  # a branch: the log names its commit
    model, _ = load_model_and_processor(folder, "llava", "float32", "cpu")  # what the model stages then load
    assert model.config.model_type == "llava"
    manifest = json.loads(next((tmp_path / "manifests").glob("hub_*.json")).read_text())
    assert {Path(f["path"]).name for f in manifest["files"]} >= {"fetched.json", "model.safetensors"}


def test_a_pinned_commit_is_not_fetched_again(hub, tmp_path):
    assert fetch_stage(tmp_path, hub, COMMIT).returncode == 0
    hub.requests.clear()
    again = fetch_stage(tmp_path, hub, COMMIT)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "to pin it" not in again.stderr
    assert not [r for r in hub.requests if r[0] == "GET" and "/resolve/" in r[1]]  # every file already complete


def test_an_unknown_revision_fails_with_one_line(hub, tmp_path):
    result = fetch_stage(tmp_path, hub, "no-such-branch")
    assert result.returncode == 1
    error = [line for line in result.stderr.splitlines() if "ERROR" in line]
    assert len(error) == 1 and f"fetch_model {REPO}@no-such-branch:" in error[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr and not (tmp_path / "models" / "hub").exists()


def test_a_local_folder_or_the_toy_model_has_nothing_to_fetch(tmp_path):
    from halludpo import hub as stage
    from halludpo.io import InputError

    local = compose(["experiment=apasi_llava15_7b", f"model.path={tmp_path}"])
    assert not paths.fetched_from_hub(local) and paths.base_model_dir(local) == tmp_path
    for cfg in (local, compose([])):
        with pytest.raises(InputError, match="nothing to fetch"):
            stage.run(cfg)
