"""Shared fixtures: tiny toy worlds and tiny models built locally — nothing is downloaded."""

from __future__ import annotations

import contextlib
import os
import threading

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY_ARCH = dict(image_size=32, patch_size=8, vision_hidden=32, vision_layers=1, vision_heads=2,
                 vision_feature_layer=-1, text_hidden=32, text_layers=1, text_heads=2, max_positions=160)
# Preference training on the tiny model (train.py's config keys); tests change only what they test: TINY_TRAIN | {...}
TINY_TRAIN = dict(loss="sigmoid", beta=0.1, sft_weight=0.0, reference="stored", lr=5e-3, epochs=1, batch_size=4,
                  grad_accum=1, scheduler="constant", warmup_ratio=0.0, max_length=200, ref_batch_size=4, seed=0,
                  bf16=False, deepspeed=None, symmpo=dict(beta1=0.1, beta2=0.1, lam=0.5, gamma=1e-4),
                  lora=dict(r=4, alpha=8, dropout=0.0, train_projector=False,
                            target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"))
TINY_WORLD = dict(image_size=32, min_objects=2, max_objects=4, min_glyph=8, max_glyph=12, partner_prob=0.7,
                  cross_scene_prob=0.1, hallucination_share=0.8, synonym_prob=0.2, noise_std=8.0, max_overlap=0.3)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models train several times faster on one thread than on two cores shared with other jobs."""
    from halludpo.verifiers import torch_threads

    with torch_threads(1):
        yield


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    """A rendered toy world of a few dozen 32-px images per split."""
    from halludpo.data import render_toy_data

    out = tmp_path_factory.mktemp("world") / "toy"
    render_toy_data(out, {"train": 40, "unlabeled": 10, "eval": 40}, seed=0, world=TINY_WORLD, progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_world, tmp_path_factory):
    """A tiny toy LLaVA trained for a few steps on the tiny world, saved with save_pretrained."""
    from halludpo.pretrain import load_split, pretrain_toy

    examples = load_split(tiny_world / "train" / "instances.json", tiny_world / "train" / "captions.json")
    out = tmp_path_factory.mktemp("models") / "toy"
    pretrain = dict(seed=0, epochs=1, batch_size=16, lr=1e-3, weight_decay=0.0, warmup_frac=0.1, qa_per_image=2,
                    max_length=120)
    pretrain_toy(examples, tiny_world / "train" / "images", out, TINY_ARCH, pretrain, progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory):
    """The default DAG (toy_apasi, base + 1 round) on test_pipeline's TINY config through real Snakemake, run once:
    (workdir, dry-run output of the first plan)."""
    from tests.test_pipeline import snakemake

    workdir = tmp_path_factory.mktemp("pipeline")
    dry = snakemake(workdir, "-n")
    assert dry.returncode == 0, dry.stderr
    result = snakemake(workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir, dry.stdout + dry.stderr


@pytest.fixture
def workdir_with_tiny_base(tiny_pipeline, tmp_path):
    """A fresh Snakemake workdir holding a copy of the tiny pipeline's toy world and model_0: other experiments'
    end-to-end tests run only their own rules. copytree keeps mtimes and no provenance is copied, so Snakemake
    sees the shared files as up to date."""
    import shutil

    base, _ = tiny_pipeline
    for shared in ("data", "models"):
        shutil.copytree(base / "results" / shared, tmp_path / "results" / shared)
    return tmp_path


@contextlib.contextmanager
def serving(server):
    """Run an http.server-style server on a background thread for the block; shut it down after."""
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
