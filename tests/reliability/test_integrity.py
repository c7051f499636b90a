"""Nothing lost, nothing silently wrong: output permissions, safe archive extraction, manifests + verify, images
checked when read and reported with the row that named them, clear errors for empty and malformed JSON Lines."""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import subprocess
import sys
import tarfile
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from halludpo import manifest
from halludpo.download import fetch
from halludpo.io import InputError, load_image, read_json, read_jsonl, write_json, write_jsonl, write_text
from halludpo.logprobs import example_images, example_segments
from halludpo.verify import verify

ROOT = Path(__file__).resolve().parents[2]
PROMPT = "Please describe this image in detail."


@pytest.fixture
def umask():
    """Set the process umask for one test; restored afterwards."""
    old = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# ---------------------------------------------------------------- permissions


@pytest.mark.parametrize(("mask", "file_mode", "dir_mode"), [(0o022, 0o644, 0o755), (0o002, 0o664, 0o775),
                                                             (0o077, 0o600, 0o700)])
def test_atomic_writes_keep_the_umask_permissions(tmp_path, umask, mask, file_mode, dir_mode):
    umask(mask)
    write_json(tmp_path / "new" / "out.json", {"a": 1})
    write_jsonl(tmp_path / "new" / "rows.jsonl", [{"a": 1}])
    write_text(tmp_path / "new" / "text.txt", "x")
    assert mode(tmp_path / "new") == dir_mode
    for name in ("out.json", "rows.jsonl", "text.txt"):
        assert mode(tmp_path / "new" / name) == file_mode, name


def test_a_rewritten_file_gets_the_umask_permissions_again(tmp_path, umask):
    umask(0o022)
    path = tmp_path / "out.json"
    write_json(path, {"a": 1})
    write_json(path, {"a": 2})
    assert mode(path) == 0o644 and read_json(path) == {"a": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]  # no temporary file left


def test_safetensors_written_through_atomic_path_keep_the_umask_permissions(tmp_path, umask):
    """safetensors replaces the file it writes with an owner-only one; atomic_path sets the mode after the block."""
    import torch
    from safetensors.torch import save_file

    from halludpo.io import atomic_path

    umask(0o022)
    with atomic_path(tmp_path / "w.safetensors") as tmp:
        save_file({"w": torch.zeros(2)}, str(tmp))
    assert mode(tmp_path / "w.safetensors") == 0o644


def test_saved_model_folders_keep_the_umask_permissions_and_are_recorded(tmp_path, umask):
    from halludpo.models import build_toy_model, save_model
    from tests.conftest import TINY_ARCH

    umask(0o022)
    model, processor = build_toy_model(["a", "dog", "."], TINY_ARCH, seed=0)
    manifest.start()
    try:
        save_model(model, processor, tmp_path / "model")
        recorded = manifest.collect()
    finally:
        manifest.stop()
    files = sorted(p for p in (tmp_path / "model").rglob("*") if p.is_file())
    assert any(p.suffix == ".safetensors" for p in files)
    assert {p: mode(p) for p in files} == {p: 0o644 for p in files}
    assert recorded == files


# ---------------------------------------------------------------- archives

GOOD = {"set/a.txt": b"alpha\n" * 10, "set/sub/b.txt": b"beta\n" * 5}


def tar_member(tf: tarfile.TarFile, name: str, data: bytes = b"", kind=tarfile.REGTYPE, link: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size = kind, link, len(data) if kind == tarfile.REGTYPE else 0
    tf.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def build_tar(path: Path, bad: tuple | None) -> Path:
    """A tar.gz of GOOD, then the bad member (name, kind, link) if any."""
    with tarfile.open(path, "w:gz") as tf:
        for name, data in GOOD.items():
            tar_member(tf, name, data)
        if bad:
            name, kind, link = bad
            tar_member(tf, name, b"evil\n", kind, link)
    return path


def build_zip(path: Path, bad: tuple | None) -> Path:
    """A zip of GOOD, then the bad member (name, unix mode) if any."""
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in GOOD.items():
            zf.writestr(name, data)
        if bad:
            name, unix_mode = bad
            info = zipfile.ZipInfo(name)
            info.external_attr = unix_mode << 16
            zf.writestr(info, b"evil\n" if not stat.S_ISLNK(unix_mode) else b"/etc/passwd")
    return path


def offline_entry(archive: Path, root: Path, kind: str) -> dict:
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    return {"name": "crafted", "url": "http://127.0.0.1:9/never", "sha256": digest,
            "filename": str(archive.relative_to(root)), "extract": kind}


TAR_ATTACKS = {
    "dotdot": (("../evil.txt", tarfile.REGTYPE, ""), "a path outside the target ('..')"),
    "nested dotdot": (("set/../../evil.txt", tarfile.REGTYPE, ""), "a path outside the target ('..')"),
    "absolute": (("/tmp/halludpo-evil.txt", tarfile.REGTYPE, ""), "an absolute path"),
    "symlink out": (("set/link", tarfile.SYMTYPE, "/etc/passwd"), "a symbolic link"),
    "symlink in": (("set/link", tarfile.SYMTYPE, "a.txt"), "a symbolic link"),
    "hardlink": (("set/hard", tarfile.LNKTYPE, "/etc/passwd"), "a hard link"),
    "device": (("set/dev", tarfile.CHRTYPE, ""), "a device, FIFO or other special file"),
}
ZIP_ATTACKS = {
    "dotdot": (("../evil.txt", 0o100644), "a path outside the target ('..')"),
    "absolute": (("/tmp/halludpo-evil.txt", 0o100644), "an absolute path"),
    "symlink": (("set/link", 0o120777), "a symbolic link"),
}


ARCHIVES = {"tar": (build_tar, "x.tar.gz", TAR_ATTACKS), "zip": (build_zip, "x.zip", ZIP_ATTACKS)}


@pytest.mark.parametrize("kind, attack", [(kind, attack) for kind, (_, _, attacks) in ARCHIVES.items()
                                          for attack in attacks])
def test_crafted_archive_is_refused_before_anything_is_extracted(tmp_path, kind, attack):
    build, name, attacks = ARCHIVES[kind]
    bad, reason = attacks[attack]
    root = tmp_path / "root"
    archive = build((root / "dl").mkdir(parents=True) or root / "dl" / name, bad)
    with pytest.raises(InputError) as err:
        fetch(offline_entry(archive, root, kind), root, progress=False, offline=True)
    assert str(err.value).startswith(f"{archive}: member {bad[0]!r} is {reason}")
    assert sorted(p.name for p in (root / "dl").iterdir()) == [name]  # not even the good members
    assert not (tmp_path / "evil.txt").exists() and not (root / "evil.txt").exists()
    assert not Path("/tmp/halludpo-evil.txt").exists()


@pytest.mark.parametrize(("kind", "build", "name"), [("tar", build_tar, "x.tar.gz"), ("zip", build_zip, "x.zip")])
def test_a_good_archive_extracts_beside_itself(tmp_path, kind, build, name):
    root = tmp_path / "root"
    (root / "dl").mkdir(parents=True)
    archive = build(root / "dl" / name, None)
    folder = fetch(offline_entry(archive, root, kind), root, progress=False, offline=True)
    assert folder == root / "dl"
    for member, data in GOOD.items():
        assert (folder / member).read_bytes() == data


def test_a_member_through_a_symlinked_folder_is_refused(tmp_path):
    """A folder beside the archive that is a link to elsewhere must not carry a member out of the target."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "dl").mkdir(parents=True)
    outside.mkdir()
    (root / "dl" / "set").symlink_to(outside)
    archive = build_tar(root / "dl" / "x.tar.gz", None)
    with pytest.raises(InputError, match=r"member 'set/a.txt' is a path outside the target"):
        fetch(offline_entry(archive, root, "tar"), root, progress=False, offline=True)
    assert list(outside.iterdir()) == []


# ---------------------------------------------------------------- manifests and verify

FAKE_STAGE = '''
"""A stage like the real ones: files through halludpo.io, a folder published by renaming X.tmp, a recorded tree."""
import os
from pathlib import Path

from halludpo import manifest, paths
from halludpo.config import stage_main
from halludpo.io import InputError, write_json, write_jsonl


def run(cfg):
    if os.environ.get("FAKE_STAGE_FAIL"):
        write_json(paths.chair_json(cfg, 0), {"half": True})
        raise InputError("fake: failing on purpose")
    write_json(paths.chair_json(cfg, 0), {"chair_s": 0.25})
    write_jsonl(paths.pairs_jsonl(cfg, 0), [{"image_path": "x.png", "chosen": "a", "rejected": "b"}])
    merged = paths.model_dir(cfg, 1)
    tmp = merged.with_name(merged.name + ".tmp")
    write_json(tmp / "config.json", {"model": "toy"})
    (tmp / "model.safetensors").write_bytes(os.urandom(4096))  # written without halludpo.io
    tmp.rename(merged)
    images = paths.contrast_images_dir(cfg, 0)
    images.mkdir(parents=True)
    (images / "000000.png").write_bytes(os.urandom(512))
    manifest.record_tree(images)


main = stage_main(run)

if __name__ == "__main__":
    main()
'''


def run_module(workdir: Path, args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    env = os.environ | {"PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"} | (env or {})
    return subprocess.run([sys.executable, *args], cwd=workdir, capture_output=True, text=True, env=env,
                          timeout=600)


STAGE_ARGS = ["hydra.job.chdir=false", "data.splits.train=2", "data.splits.unlabeled=1", "data.splits.eval=2",
              "data.world.image_size=32", "data.world.min_glyph=8", "data.world.max_glyph=12",
              "eval.chair.n_images=2", "eval.pope.n_images=2", "eval.amber.n_images=2", "method.generation.n_images=1"]


@pytest.fixture(scope="module")
def stage_runs(tmp_path_factory):
    """The real data stage (toy world, 5 images) and a fake experiment stage, both through stage_main."""
    workdir = tmp_path_factory.mktemp("work")
    (workdir / "fake_stage.py").write_text(textwrap.dedent(FAKE_STAGE))
    data = run_module(workdir, ["-m", "halludpo.data", *STAGE_ARGS, "hydra.run.dir=results/hydra/render"])
    assert data.returncode == 0, data.stderr[-3000:]
    fake = run_module(workdir, ["fake_stage.py", *STAGE_ARGS, "hydra.run.dir=results/hydra/fake"])
    assert fake.returncode == 0, fake.stderr[-3000:]
    return workdir


def n_files(workdir: Path) -> int:
    """Files in the stages' manifests: the toy world's and the fake stage's five."""
    return sum(p.is_file() for p in (workdir / "results" / "data" / "toy").rglob("*")) + 5


def verify_output(experiment_dir: Path) -> tuple[int, str]:
    out = io.StringIO()
    code = verify(experiment_dir, out)
    return code, out.getvalue()


def test_stages_write_manifests_with_every_file(stage_runs):
    shared = sorted((stage_runs / "results" / "manifests").glob("*.json"))
    own = sorted((stage_runs / "results" / "toy_apasi" / "manifests").glob("*.json"))
    assert [p.name for p in shared] == ["data_round0_main_eval_data-toy.json"]
    assert [p.name for p in own] == ["fake_stage_round0_main_eval.json"]
    data = json.loads(shared[0].read_text())
    files = {e["path"]: e for e in data["files"]}
    world = stage_runs / "results" / "data" / "toy"
    on_disk = {str(p.relative_to(stage_runs)) for p in world.rglob("*") if p.is_file()}
    assert set(files) == on_disk  # images (written by PIL) too: the world folder was renamed from toy.tmp
    assert sum(name.endswith(".png") for name in files) == 5
    some = next(iter(files.values()))
    assert some["sha256"] == hashlib.sha256((stage_runs / some["path"]).read_bytes()).hexdigest()
    assert mode(shared[0]) == 0o666 & ~manifest_umask()
    fake = json.loads(own[0].read_text())
    assert {e["path"] for e in fake["files"]} == {
        "results/toy_apasi/round_0/eval/chair.json", "results/toy_apasi/round_0/pairs/pairs.jsonl",
        "results/toy_apasi/round_0/merged/config.json", "results/toy_apasi/round_0/merged/model.safetensors",
        "results/toy_apasi/round_0/pairs/contrast_images/000000.png"}
    assert fake["stage"] == "fake_stage" and "results/data/toy" in fake["uses"]


def manifest_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_verify_passes_on_untouched_outputs_from_any_folder(stage_runs, monkeypatch):
    monkeypatch.chdir(stage_runs.parent)  # paths are found from the manifests' own place
    code, out = verify_output(stage_runs / "results" / "toy_apasi")
    assert code == 0, out
    assert out.startswith(f"verify: all {n_files(stage_runs)} files intact (1 manifests of ")
    assert out.endswith(", 1 shared)\n")


def test_verify_names_changed_missing_and_truncated_files(stage_runs, tmp_path):
    import shutil

    work = tmp_path / "copy"
    shutil.copytree(stage_runs, work, symlinks=True)
    exp = work / "results" / "toy_apasi"
    chair = exp / "round_0" / "eval" / "chair.json"
    chair.write_text(chair.read_text().replace("0.25", "0.75"))  # same size, other bytes
    (exp / "round_0" / "pairs" / "pairs.jsonl").unlink()
    weights = exp / "round_0" / "merged" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    image = sorted((work / "results" / "data" / "toy" / "eval" / "images").glob("*.png"))[0]
    size = image.stat().st_size
    image.write_bytes(image.read_bytes()[:-4])  # cut in the last chunk: PIL would still decode it
    code, out = verify_output(exp)
    lines = out.splitlines()
    assert code == 1
    assert f"results/toy_apasi/round_0/eval/chair.json: changed, sha256 differs (manifest {exp / 'manifests'}" \
        in "\n".join(lines)
    assert any(line.startswith("results/toy_apasi/round_0/pairs/pairs.jsonl: missing (manifest ") for line in lines)
    assert any(line.startswith("results/toy_apasi/round_0/merged/model.safetensors: truncated, 1000 of 4096 bytes")
               for line in lines)
    rel = image.relative_to(work)
    assert any(line.startswith(f"{rel}: truncated, {size - 4} of {size} bytes (manifest ") for line in lines)
    assert lines[-1] == f"verify: 4 of {n_files(stage_runs)} files missing, truncated or changed (2 manifests)"
    # the truncated world image also fails where a stage reads it
    with pytest.raises(InputError, match=r"truncated PNG file"):
        load_image(image)


def test_verify_module_exit_status(stage_runs, tmp_path):
    ok = run_module(stage_runs, ["-m", "halludpo.verify", "results/toy_apasi"])
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert ok.stdout.startswith(f"verify: all {n_files(stage_runs)} files intact")
    empty = tmp_path / "results" / "nothing"
    empty.mkdir(parents=True)
    none = run_module(tmp_path, ["-m", "halludpo.verify", "results/nothing"])
    assert none.returncode == 1 and "no manifests" in none.stdout


def test_snakemake_verify_rule(stage_runs, tmp_path):
    """`snakemake verify`: not in the default target, runs when asked, fails naming a truncated world image."""
    import shutil

    work = tmp_path / "copy"
    shutil.copytree(stage_runs, work, symlinks=True)
    cmd = [str(Path(sys.executable).parent / "snakemake"), "-s", str(ROOT / "Snakefile"), "--directory", str(work),
           "--cores", "1", "verify"]
    env = os.environ | {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    ok = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert ok.returncode == 0 and "verify: all" in ok.stdout + ok.stderr, ok.stderr[-3000:]
    image = sorted((work / "results" / "data" / "toy" / "train" / "images").glob("*.png"))[0]
    image.write_bytes(image.read_bytes()[:100])
    bad = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert bad.returncode != 0
    assert f"{image.relative_to(work)}: truncated, 100 of " in bad.stdout + bad.stderr


def test_a_failed_stage_leaves_its_manifest_and_a_rerun_replaces_it(stage_runs, tmp_path):
    import shutil

    work = tmp_path / "copy"
    shutil.copytree(stage_runs, work, symlinks=True)
    own = work / "results" / "toy_apasi" / "manifests" / "fake_stage_round0_main_eval.json"
    before = own.read_text()
    failed = run_module(work, ["fake_stage.py", *STAGE_ARGS, "hydra.run.dir=results/hydra/fake2"],
                        env={"FAKE_STAGE_FAIL": "1"})
    assert failed.returncode == 1 and "fake: failing on purpose" in failed.stderr
    assert own.read_text() == before  # the failed run wrote no manifest
    shutil.rmtree(work / "results" / "toy_apasi" / "round_0")
    again = run_module(work, ["fake_stage.py", *STAGE_ARGS, "hydra.run.dir=results/hydra/fake3"])
    assert again.returncode == 0, again.stderr[-2000:]
    assert sorted(p.name for p in own.parent.iterdir()) == [own.name]  # replaced, not added
    assert own.read_text() != before  # new random weights, new hashes
    assert verify_output(work / "results" / "toy_apasi")[0] == 0


def test_recording_is_off_outside_a_stage(tmp_path):
    manifest.stop()
    write_json(tmp_path / "a.json", {})
    assert not manifest.recording() and manifest.collect() == []
    manifest.start()
    try:
        write_json(tmp_path / "b.json", {})
        assert manifest.collect() == [tmp_path / "b.json"]
    finally:
        manifest.stop()


# ---------------------------------------------------------------- images named by rows


def png_bytes(seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (16, 16, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def pairs_file(tmp_path):
    """pairs.jsonl: line 1 a whole image, line 2 a missing one, line 3 a PNG cut in its last bytes, line 4 one cut
    in the middle, line 5 a file that is no image at all."""
    good, cut_end, cut_mid, text = (tmp_path / n for n in ("good.png", "cut_end.png", "cut_mid.png", "text.png"))
    good.write_bytes(png_bytes())
    cut_end.write_bytes(png_bytes(1)[:-4])
    cut_mid.write_bytes(png_bytes(2)[: len(png_bytes(2)) // 2])
    text.write_text("not an image")
    rows = [{"image_path": str(p), "prompt": PROMPT, "context": "", "chosen": "a .", "rejected": "b ."}
            for p in (good, tmp_path / "gone.png", cut_end, cut_mid, text)]
    path = tmp_path / "pairs.jsonl"
    write_jsonl(path, rows)
    return path


def test_images_are_checked_when_read_and_named_with_the_pairs_line(pairs_file):
    rows = read_jsonl(pairs_file)
    assert example_images(rows[0], "sigmoid")[rows[0]["image_path"]].size == (16, 16)
    expected = {2: "image not found", 3: r"corrupt or unreadable image \(truncated PNG file",
                4: "corrupt or unreadable image", 5: r"corrupt or unreadable image \(cannot identify"}
    for line, what in expected.items():
        row = rows[line - 1]
        with pytest.raises(InputError, match=rf"^{pairs_file}:{line}: {row['image_path']}: {what}"):
            example_images(row, "sigmoid")
        with pytest.raises(InputError, match=rf"^{pairs_file}:{line}: "):  # the reference log-prob path
            example_segments(None, row, "sigmoid", 100)


def test_trainer_rows_rebuilt_from_the_file_name_the_line_explicitly(pairs_file):
    row = dict(read_jsonl(pairs_file)[2])  # a copy: no origin
    with pytest.raises(InputError, match=r"^ref_logps.jsonl:3: .*cut_end.png: corrupt or unreadable image"):
        example_images(row, "sigmoid", named_by="ref_logps.jsonl:3")
    with pytest.raises(InputError, match=r"^\S*cut_end.png: corrupt or unreadable image"):
        example_images(row, "sigmoid")


def test_rows_keep_their_origin_but_stay_plain_json(pairs_file):
    rows = read_jsonl(pairs_file)
    assert rows[1] == json.loads(pairs_file.read_text().splitlines()[1])
    assert json.dumps(rows[1]) == pairs_file.read_text().splitlines()[1]
    import pickle

    assert pickle.loads(pickle.dumps(rows[1])).origin == f"{pairs_file}:2"


# ---------------------------------------------------------------- JSON Lines


def test_an_empty_jsonl_where_rows_are_needed_is_one_clear_error(tmp_path):
    from halludpo.evaluate import evaluate_chair

    empty = tmp_path / "eval.jsonl"
    empty.write_text("")
    assert read_jsonl(empty) == []
    with pytest.raises(InputError, match=rf"^{empty}: no generations$"):
        evaluate_chair(empty, tmp_path / "instances.json", None, scorer=None)


def test_a_malformed_or_cut_jsonl_line_is_named(tmp_path):
    path = tmp_path / "pairs.jsonl"
    whole = json.dumps({"a": 1})
    path.write_text(f"{whole}\n\n{whole}\n{whole[:-3]}")  # blank line 2 is skipped; line 4 cut mid-way
    with pytest.raises(InputError, match=rf"^{path}:4: malformed JSON line \(.*the file ends mid-line: truncated\?\)$"):
        read_jsonl(path)
    path.write_text(f"{whole}\n{whole[:-3]}\n{whole}\n")
    with pytest.raises(InputError, match=rf"^{path}:2: malformed JSON line \([^;]*\)$"):
        read_jsonl(path)
    path.write_bytes(whole.encode() + b"\n" + b'{"a": "\xff\xfe"}\n')
    with pytest.raises(InputError, match=rf"^{path}:2: not UTF-8 text"):
        read_jsonl(path)
    path.write_text("[1, 2]\n")
    with pytest.raises(InputError, match=rf"^{path}:1: expected a JSON object, got list$"):
        read_jsonl(path)
