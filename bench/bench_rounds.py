"""Benchmarks for the round loop, measured side by side in one run on this machine:

1. DPO step time with stored reference log-probs vs. online (adapter disabled, one extra forward per step);
2. batched vs. one-at-a-time generation.

    python bench/bench_rounds.py [--pairs 128] [--images 64] [--repeats 3]

Builds a toy world and a randomly initialised toy model of the default size in a temporary folder (timing does not
depend on what the weights know). Prints a table and the ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from halludpo.config import compose, to_plain
from halludpo.data import render_toy_data
from halludpo.inference import generate_texts
from halludpo.models import build_toy_model, load_model_and_processor, save_model
from halludpo.pretrain import load_split, toy_vocabulary
from halludpo.train import compute_reference_logps, train_preference


def build(tmp: Path, n_images: int):
    cfg = compose()
    world = to_plain(cfg.data.world)
    render_toy_data(tmp / "world", {"train": n_images, "eval": n_images}, 0, world, progress=False)
    examples = load_split(tmp / "world" / "train" / "instances.json", tmp / "world" / "train" / "captions.json")
    model, processor = build_toy_model(toy_vocabulary(examples), to_plain(cfg.model.arch), seed=0)
    save_model(model, processor, tmp / "model")
    return cfg, examples


def bench_generation(model_dir: Path, images: list[Path], max_new_tokens: int) -> dict[str, float]:
    model, processor = load_model_and_processor(model_dir, "toy")
    prompts = ["Please describe this image in detail."] * len(images)
    # min_new_tokens = max_new_tokens: a random model must do the same amount of work in both modes
    kwargs = {"max_new_tokens": max_new_tokens, "min_new_tokens": max_new_tokens, "do_sample": False}
    times = {}
    for name, batch_size in (("batched (64)", 64), ("one at a time", 1)):
        start = time.perf_counter()
        generate_texts(model, processor, images, prompts, kwargs, batch_size=batch_size, progress=False)
        times[name] = time.perf_counter() - start
    return times


def bench_dpo(cfg, model_dir: Path, examples: list[dict], world: Path, n_pairs: int, tmp: Path,
              repeats: int) -> dict[str, float]:
    """Median seconds per DPO step with stored vs online reference log-probs."""
    rows = [{"image_id": e["image_id"], "image_path": str(world / "train" / "images" / e["file_name"]),
             "prompt": "Please describe this image in detail.", "context": "", "chosen": e["caption"],
             "rejected": e["caption"] + " there is also a dog .", "method": "bench",
             "meta": {"generator_model": str(model_dir)}} for e in (examples * 4)[:n_pairs]]
    train = to_plain(cfg.train)
    model, processor = load_model_and_processor(model_dir, "toy")
    stored = compute_reference_logps(model, processor, rows, train["max_length"], train["ref_batch_size"])
    variants = (("stored reference", "stored", stored), ("online reference", "online", rows))
    times = {name: [] for name, _, _ in variants}
    for repeat in range(repeats + 1):  # repeat 0 warms up (first-call allocations, lazy imports) and is dropped
        for name, reference, data in variants:  # interleaved, so load drift hits both alike
            model, processor = load_model_and_processor(model_dir, "toy")
            out = tmp / f"{name.replace(' ', '_')}_{repeat}"
            stats = train_preference(model, processor, data, out, train | {"reference": reference}, str(model_dir))
            if repeat:
                times[name].append(stats["train_seconds"] / stats["steps"])
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=128)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        cfg, examples = build(tmp, args.images)
        images = sorted((tmp / "world" / "eval" / "images").glob("*.png"))
        gen = bench_generation(tmp / "model", images, args.max_new_tokens)
        dpo = bench_dpo(cfg, tmp / "model", examples, tmp / "world", args.pairs, tmp, args.repeats)
    print(f"\n{'benchmark':<42} {'seconds':>10}")
    for name, t in gen.items():
        print(f"{'generate ' + str(len(images)) + ' descriptions, ' + name:<42} {t:>10.2f}")
    for name, t in dpo.items():
        print(f"{'DPO step (batch ' + str(cfg.train.batch_size) + '), ' + name:<42} {t:>10.3f}")
    ratios = {"generation: one-at-a-time / batched": gen["one at a time"] / gen["batched (64)"],
              "DPO step: online / stored reference": dpo["online reference"] / dpo["stored reference"]}
    for name, r in ratios.items():
        print(f"{name:<42} {r:>9.2f}x")
    print(json.dumps({"generation_seconds": gen, "dpo_step_seconds": dpo, "ratios": ratios}))


if __name__ == "__main__":
    main()
