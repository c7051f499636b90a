"""The same model_0 whatever kernel level the CPU would pick: pretraining under halludpo's pinned kernels gives the
same bytes when the environment it starts from asks for another ATen level, MKL path or oneDNN ISA."""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from halludpo import determinism

pytestmark = pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"),
                                reason="the pinned kernel levels are x86-64's")

# A tiny world and a short pretraining, at a fixed thread count (kernel levels are what this test varies).
PRETRAIN_SCRIPT = """
import hashlib, sys
from pathlib import Path
import torch
from halludpo.data import render_toy_data
from halludpo.pretrain import load_split, pretrain_toy
torch.set_num_threads(2)
out = Path(sys.argv[1])
world = dict(image_size=32, min_objects=2, max_objects=4, min_glyph=8, max_glyph=12, partner_prob=0.7,
             cross_scene_prob=0.1, hallucination_share=0.8, synonym_prob=0.2, noise_std=8.0, max_overlap=0.3)
render_toy_data(out / "toy", {"train": 32, "unlabeled": 2, "eval": 2}, seed=0, world=world, progress=False)
examples = load_split(out / "toy/train/instances.json", out / "toy/train/captions.json")
arch = dict(image_size=32, patch_size=8, vision_hidden=32, vision_layers=1, vision_heads=2, vision_feature_layer=-1,
            text_hidden=64, text_layers=2, text_heads=2, max_positions=160)
pretrain = dict(seed=0, epochs=2, batch_size=16, lr=1e-3, weight_decay=0.01, warmup_frac=0.1, qa_per_image=2,
                max_length=120)
pretrain_toy(examples, out / "toy/train/images", out / "model", arch, pretrain, progress=False)
print(torch.backends.cpu.get_cpu_capability())
print(hashlib.sha256((out / "model/model.safetensors").read_bytes()).hexdigest())
"""

# What two different machines would choose on their own: an AVX-512 one and one without vector units.
MACHINE_CHOICES = {
    "avx512 machine": {"ATEN_CPU_CAPABILITY": "avx512", "MKL_CBWR": "AUTO", "ONEDNN_MAX_CPU_ISA": "ALL"},
    "no-vector machine": {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE", "ONEDNN_MAX_CPU_ISA": "SSE41"},
}


def pretrain_in_subprocess(tmp_path: Path, name: str, machine_env: dict, pinned: bool) -> tuple[str, str]:
    """(ATen's capability, sha256 of model.safetensors) of a tiny pretraining started as the rules start stages:
    the pinned variables prefixed to the command, on top of what the machine's environment says."""
    env = {k: v for k, v in os.environ.items() if k not in determinism.PINNED_CPU_KERNELS}
    env |= machine_env | {"OMP_NUM_THREADS": "2", "MKL_DYNAMIC": "FALSE", "OMP_DYNAMIC": "FALSE",
                          "HALLUDPO_CPU_KERNELS": "avx2" if pinned else "native"}
    command = f"{determinism.shell_exports() if pinned else ''} {sys.executable} -c \"$SCRIPT\" {tmp_path / name}"
    result = subprocess.run(["bash", "-c", command], env=env | {"SCRIPT": PRETRAIN_SCRIPT}, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    capability, digest = result.stdout.split()[-2:]
    return capability, digest


def test_pinned_kernels_give_the_same_model_whatever_the_machine_would_choose(tmp_path):
    pinned = {name: pretrain_in_subprocess(tmp_path, f"pinned_{i}", env, pinned=True)
              for i, (name, env) in enumerate(MACHINE_CHOICES.items())}
    assert {capability for capability, _ in pinned.values()} == {"AVX2"}
    assert len({digest for _, digest in pinned.values()}) == 1, pinned


def test_without_the_pins_the_kernel_level_changes_the_model(tmp_path):
    """The reason for the pins, shown on this machine: its own kernel choice and a lower one train different
    bytes from the same config and thread count."""
    import torch

    native = torch.backends.cpu.get_cpu_capability()
    levels = ["avx2", "avx512" if native == "AVX512" else "default"]
    digests = {level: pretrain_in_subprocess(tmp_path, f"native_{level}",
                                             {"ATEN_CPU_CAPABILITY": level}, pinned=False)[1] for level in levels}
    assert len(set(digests.values())) == len(levels), digests


def test_pinned_env_is_empty_when_asked_for_native_kernels():
    assert determinism.pinned_env({"HALLUDPO_CPU_KERNELS": "native"}) == {}
    assert determinism.pinned_env({})["ATEN_CPU_CAPABILITY"] == "avx2"
