"""Rule dpo's stage resumes: killed (SIGKILL) or stopped (SIGTERM) mid-run, a rerun continues from its last whole
checkpoint and ends with the same adapter, byte for byte, as a run that was never interrupted; checkpoints of other
train settings are not resumed.

The stage runs as a subprocess (`python -m halludpo.train step=dpo`'s entry point) on the tiny toy model, through a
wrapper that can slow every step down (a sleep in a TrainerCallback, which changes no number), so a signal reliably
lands mid-run."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from halludpo import paths
from halludpo.config import compose
from halludpo.io import read_json, write_jsonl
from halludpo.train import COMPLETE, FINGERPRINT, prepare_checkpoints, training_fingerprint
from tests.conftest import TINY_TRAIN

ROOT = Path(__file__).resolve().parents[1]
SAVE_STEPS = 3
# 16 pairs, 2 a step, 2 epochs: 16 steps, checkpoints at 3, 6, 9, ...; LoRA dropout, so the restored RNG matters
TRAIN = ["train.batch_size=2", "train.epochs=2", "train.lr=5e-3", "train.max_length=200", "train.lora.r=4",
         "train.lora.alpha=8", "train.lora.dropout=0.1", "train.scheduler=cosine", "train.warmup_ratio=0.1"]
STEPS = 16
# The stage's own entry point; HALLUDPO_TEST_STEP_SECONDS adds a sleep at the end of every step.
WRAPPER = """\
import os, sys, time
import halludpo.train as stage
from transformers import TrainerCallback

class Slow(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        time.sleep(float(os.environ.get("HALLUDPO_TEST_STEP_SECONDS", "0")))

stage.training_callbacks = lambda cfg: [Slow()]
stage.main()
"""


@pytest.fixture(scope="module")
def stored_pairs(tiny_world, tiny_model_dir, tmp_path_factory):
    """16 pairs of the tiny world's eval captions with the tiny model's reference log-probs (a ref_logps.jsonl)."""
    from halludpo.models import load_model_and_processor
    from halludpo.train import compute_reference_logps

    captions = read_json(tiny_world / "eval" / "captions.json")["annotations"]
    files = {im["id"]: im["file_name"] for im in read_json(tiny_world / "eval" / "instances.json")["images"]}
    rows = [{"image_id": c["image_id"], "image_path": str(tiny_world / "eval" / "images" / files[c["image_id"]]),
             "prompt": "Please describe this image in detail.", "context": "", "chosen": c["caption"],
             "rejected": c["caption"] + " there is a dog .", "method": "test",
             "meta": {"generator_model": str(tiny_model_dir)}} for c in captions[:STEPS]]
    model, processor = load_model_and_processor(tiny_model_dir, "toy")
    out = tmp_path_factory.mktemp("pairs") / "ref_logps.jsonl"
    write_jsonl(out, compute_reference_logps(model, processor, rows, 200, 8))
    return out


class Stage:
    """Rule dpo's stage in its own results folder: the pairs in place, runs as subprocesses with logs."""

    def __init__(self, root: Path, pairs: Path, model_dir: Path):
        self.root, self.model_dir, self.runs = root, model_dir, 0
        self.cfg = compose(self.overrides())
        target = paths.ref_logps_jsonl(self.cfg, 0)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(pairs.read_bytes())
        self.checkpoints = paths.train_checkpoints_dir(self.cfg, 0)
        self.train_dir = paths.train_dir(self.cfg, 0)

    def overrides(self, *extra: str) -> list[str]:
        return [f"paths.results={self.root}", f"model.path={self.model_dir}", "model.device=cpu",
                "tracking.enabled=false", f"train.save_steps={SAVE_STEPS}", *TRAIN, *extra]

    def start(self, *extra: str, step_seconds: float = 0.0) -> tuple[subprocess.Popen, Path]:
        self.runs += 1
        log = self.root / f"run{self.runs}.log"
        (self.root / "wrapper.py").write_text(WRAPPER)
        cmd = [sys.executable, str(self.root / "wrapper.py"), "step=dpo", "round=0", *self.overrides(*extra),
               f"hydra.run.dir={self.root / 'hydra'}", "hydra.job.chdir=false"]
        env = os.environ | {"OMP_NUM_THREADS": "1", "HALLUDPO_TEST_STEP_SECONDS": str(step_seconds),
                            "PYTHONPATH": str(ROOT / "src")}
        env.pop("MLFLOW_TRACKING_URI", None)
        with open(log, "w") as out:
            return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=self.root), log

    def run(self, *extra: str) -> tuple[int, str]:
        proc, log = self.start(*extra)
        return proc.wait(timeout=600), log.read_text()

    def whole_checkpoints(self) -> list[int]:
        return sorted(int(p.parent.name.split("-")[1]) for p in self.checkpoints.glob(f"checkpoint-*/{COMPLETE}"))

    def wait_for_checkpoint(self, proc: subprocess.Popen, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while not self.whole_checkpoints():
            assert proc.poll() is None, "the stage ended before its first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint within the timeout"
            time.sleep(0.05)

    def outputs(self) -> dict[str, bytes]:
        """The rule's result files: the adapter's weights and config, the training log and stats."""
        files = ("adapter/adapter_model.safetensors", "adapter/adapter_config.json", "train_log.jsonl",
                 "train_stats.json")
        return {name: (self.train_dir / name).read_bytes() for name in files}


@pytest.fixture(scope="module")
def uninterrupted(stored_pairs, tiny_model_dir, tmp_path_factory):
    """One run from start to end: its result files, and the checkpoint folder is gone afterwards."""
    stage = Stage(tmp_path_factory.mktemp("uninterrupted"), stored_pairs, tiny_model_dir)
    code, log = stage.run()
    assert code == 0, log[-3000:]
    assert "resuming" not in log
    assert not stage.checkpoints.exists()
    assert json.loads(stage.outputs()["train_stats.json"])["steps"] == STEPS
    return stage.outputs()


def test_killed_mid_epoch_resumes_to_the_same_adapter(uninterrupted, stored_pairs, tiny_model_dir, tmp_path):
    stage = Stage(tmp_path, stored_pairs, tiny_model_dir)
    proc, _ = stage.start(step_seconds=0.3)
    stage.wait_for_checkpoint(proc)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    saved = stage.whole_checkpoints()
    assert saved and saved[-1] < STEPS, saved
    # a checkpoint the kill cut off while it was written: no completion mark, a truncated file
    cut = stage.checkpoints / f"checkpoint-{saved[-1] + 1}"
    cut.mkdir(exist_ok=True)
    (cut / "optimizer.pt").write_bytes(b"\x80\x02truncated")

    code, log = stage.run()
    assert code == 0, log[-3000:]
    assert f"resuming from step {saved[-1]}: " in log and saved[-1] > 0
    assert f"{cut} was cut off while it was written: removed" in log
    assert stage.outputs() == uninterrupted  # the adapter byte for byte, the training log and stats too
    assert not stage.checkpoints.exists()
    print(f"killed after checkpoint {saved[-1]} of {STEPS} steps (whole: {saved}); resumed to the same adapter")


def test_sigterm_saves_the_current_step_and_resumes_to_the_same_adapter(uninterrupted, stored_pairs,
                                                                        tiny_model_dir, tmp_path):
    stage = Stage(tmp_path, stored_pairs, tiny_model_dir)
    proc, log_file = stage.start(step_seconds=0.3)
    stage.wait_for_checkpoint(proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 143
    log = log_file.read_text()
    stopped = int(log.split("stopped by SIGTERM at step ")[1].split(";")[0])
    assert 0 < stopped < STEPS
    assert f"checkpoint saved in {stage.checkpoints / f'checkpoint-{stopped}'}; rerun to resume" in log
    assert stage.whole_checkpoints()[-1] == stopped  # the step it stopped at, whatever save_steps says
    assert not (stage.train_dir / "adapter").exists()

    code, log = stage.run("train.save_steps=4")  # when checkpoints are written is no part of the fingerprint
    assert code == 0, log[-3000:]
    assert f"resuming from step {stopped}: " in log
    assert stage.outputs() == uninterrupted
    print(f"SIGTERM: stopped at step {stopped} of {STEPS}; resumed to the same adapter")


def test_checkpoints_of_other_train_settings_are_not_resumed(uninterrupted, stored_pairs, tiny_model_dir,
                                                            tmp_path):
    stage = Stage(tmp_path, stored_pairs, tiny_model_dir)
    proc, _ = stage.start(step_seconds=0.3)
    stage.wait_for_checkpoint(proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 143 and stage.whole_checkpoints()

    code, log = stage.run("train.lr=1e-3")
    assert code == 0, log[-3000:]
    assert log.count("checkpoints of other train settings or pairs (fingerprint.json differs); starting over") == 1
    assert "resuming" not in log
    assert json.loads(stage.outputs()["train_stats.json"])["steps"] == STEPS
    assert stage.outputs()["adapter/adapter_model.safetensors"] != uninterrupted["adapter/adapter_model.safetensors"]


def test_the_fingerprint_covers_the_train_settings_and_the_pairs_file(stored_pairs, tmp_path):
    train = {"lr": 5e-3, "save_steps": 3, "lora": {"r": 4}}
    first = training_fingerprint(train, stored_pairs)
    assert training_fingerprint(train | {"save_steps": 7}, stored_pairs) == first
    assert training_fingerprint(train | {"lora": {"r": 8}}, stored_pairs) != first
    changed = tmp_path / "pairs.jsonl"
    changed.write_bytes(stored_pairs.read_bytes().rsplit(b"\n", 2)[0] + b"\n")  # one pair fewer
    assert training_fingerprint(train, changed) != first

    folder = tmp_path / "checkpoints"
    (folder / "checkpoint-3").mkdir(parents=True)
    (folder / "checkpoint-3" / COMPLETE).write_text("{}")
    (folder / FINGERPRINT).write_text(json.dumps(first))
    prepare_checkpoints(folder, first)
    assert (folder / "checkpoint-3").is_dir()
    prepare_checkpoints(folder, training_fingerprint(train, changed))
    assert not (folder / "checkpoint-3").exists()
    assert read_json(folder / FINGERPRINT) == training_fingerprint(train, changed)


@pytest.mark.usefixtures("one_torch_thread")
def test_a_run_killed_after_its_last_checkpoint_trains_no_step_again(stored_pairs, tiny_model_dir, tmp_path, caplog):
    """Killed after the final checkpoint, before the outputs were written: the rerun resumes at the last step."""
    from halludpo.io import read_jsonl
    from halludpo.models import load_model_and_processor
    from halludpo.train import train_preference

    rows, train = read_jsonl(stored_pairs), TINY_TRAIN | {"save_steps": 3}  # 16 pairs, 4 a step: steps 1-4
    stats = []
    for run in ("first", "again"):
        model, processor = load_model_and_processor(tiny_model_dir, "toy")
        with caplog.at_level(logging.INFO, logger="halludpo.train"):
            stats.append(train_preference(model, processor, rows, tmp_path / run, train, str(tiny_model_dir),
                                          checkpoint_dir=tmp_path / "checkpoints",
                                          fingerprint=training_fingerprint(train, stored_pairs)))
    assert "resuming from step 4: " in caplog.text
    first, again = ({k: v for k, v in s.items() if k != "train_seconds"} for s in stats)
    assert first == again and first["steps"] == 4
    weights = "adapter/adapter_model.safetensors"
    assert (tmp_path / "first" / weights).read_bytes() == (tmp_path / "again" / weights).read_bytes()
