"""Stage `hub` (rule fetch_model): model_0 of a real family named by a hub id, downloaded once at model.revision
with huggingface_hub's snapshot_download into <models_dir>/hub/<owner>--<name>@<revision>/. The rule runs on the
submitting host (compute nodes often have no internet); the model stages then load that local folder.

    python -m halludpo.hub experiment=apasi_llava15_7b model.revision=<commit>

Only what halludpo loads is fetched: safetensors weights, JSON configs, tokenizer and processor files (no PyTorch
.bin, TensorFlow, Flax or ONNX copies). The server is huggingface_hub's endpoint (HF_ENDPOINT: a mirror works;
HF_TOKEN for gated models). A revision that is a branch or a tag is resolved to its commit first, which the log
names so it can be pinned. The marker fetched.json (repository, revision, commit, files) is written last: a cut
download is resumed by the next run, which skips the files already complete.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from omegaconf import DictConfig

from halludpo import manifest, paths
from halludpo.config import stage_main
from halludpo.io import InputError, new_file_mode, write_json

log = logging.getLogger(__name__)

COMMIT = re.compile(r"^[0-9a-f]{40}$")
SKIPPED = ["*.bin", "*.pt", "*.pth", "*.ckpt", "*.h5", "*.msgpack", "*.onnx", "*.gguf", "*.tflite", "original/*"]


def resolve_commit(repo_id: str, revision: str, endpoint: str | None = None) -> str:
    """The commit a revision (branch, tag or commit) names on the hub now; a moving one is logged to pin."""
    from huggingface_hub import HfApi

    commit = HfApi(endpoint=endpoint).model_info(repo_id, revision=revision).sha
    if not COMMIT.match(revision):
        log.warning("%s: model.revision=%s is a branch or tag, commit %s today; set model.revision=%s to pin it",
                    repo_id, revision, commit, commit)
    return commit


def model_files(folder: Path) -> list[str]:
    """The files of a fetched model folder, without huggingface_hub's download metadata (.cache/)."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if p.is_file() and ".cache" not in p.relative_to(folder).parts)


def fetch_model(repo_id: str, revision: str, out_dir: str | os.PathLike, endpoint: str | None = None) -> dict:
    """Download repo_id at revision into out_dir (resumable) and write its marker fetched.json; returns it."""
    from huggingface_hub import snapshot_download

    out_dir = Path(out_dir)
    commit = resolve_commit(repo_id, revision, endpoint)
    snapshot_download(repo_id, revision=commit, local_dir=out_dir, ignore_patterns=SKIPPED, endpoint=endpoint)
    files = model_files(out_dir)
    if "config.json" not in files or not any(f.endswith(".safetensors") for f in files):
        raise InputError(f"{repo_id}@{commit}: no config.json and safetensors weights (halludpo loads safetensors "
                         f"only); fetched {files}")
    mode = new_file_mode()
    for name in files:  # the umask's permissions, and every file into the stage's manifest
        os.chmod(out_dir / name, mode)
        manifest.record(out_dir / name)
    marker = {"repo_id": repo_id, "revision": revision, "commit": commit, "files": files}
    write_json(out_dir / paths.FETCHED, marker)
    log.info("%s@%s (commit %s): %d files -> %s", repo_id, revision, commit, len(files), out_dir)
    return marker


def run(cfg: DictConfig) -> None:
    """Fetch model_0 (model.path, a hub id) at model.revision into paths.hub_model_dir."""
    if not paths.fetched_from_hub(cfg):
        raise InputError(f"model.path={cfg.model.path}: not a hub id of a real family (a local folder is used as it "
                         "is; the toy family is pretrained), so there is nothing to fetch")
    repo_id, revision = cfg.model.path, paths.hub_revision(cfg)
    try:
        fetch_model(repo_id, revision, paths.hub_model_dir(cfg))
    except InputError:
        raise
    except Exception as err:  # HTTP, connection and hub errors of several libraries: one line for the rule's log
        first = (str(err).strip().splitlines() or [""])[0]
        raise InputError(f"fetch_model {repo_id}@{revision}: {type(err).__name__}: {first}") from err


main = stage_main(run)

if __name__ == "__main__":
    main()
