"""Benchmark: the training step time of mDPO (3 segments) and SymMPO (5 segments) relative to plain DPO (2), on
the same pairs, the same model and the same batch size, measured side by side in one run on this machine.

    python bench/bench_losses.py [--pairs 64] [--images 32] [--repeats 10]

Builds a toy world and a randomly initialised toy model of the default size in a temporary folder (timing does not
depend on what the weights know). Contrast data as the pipeline builds it: mDPO's corrupted images stored once per
example, SymMPO's nearest neighbours from the model's own image features. Reference log-probs are stored
(precomputed per round), so a step is one policy forward + backward over all segments of the batch (the trainer's
compute_loss, then an AdamW step), on the same train.batch_size pairs for every loss. The losses are timed in turn,
`--repeats` times (interleaved, so a load change on a shared machine hits them alike); the table shows the median
and the minimum seconds per step and their ratios to plain DPO.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_rounds import build  # noqa: E402  (toy world + random toy model of the default size)

from halludpo.config import to_plain  # noqa: E402
from halludpo.contrast import contrast_rows, image_contrast_rows, image_embeddings, unique_images  # noqa: E402
from halludpo.models import load_model_and_processor  # noqa: E402
from halludpo.train import (  # noqa: E402
    PairCollator,
    PairDataset,
    PreferenceTrainer,
    compute_reference_logps,
    lora_model,
    loss_params,
    training_arguments,
)

LOSSES = {"sigmoid": "DPO (2 segments)", "mdpo": "mDPO (3 segments)", "symmpo": "SymMPO (5 segments)"}


def pair_rows(examples: list[dict], world: Path, model_dir: Path, n_pairs: int) -> list[dict]:
    return [{"image_id": e["image_id"], "image_path": str(world / "train" / "images" / e["file_name"]),
             "prompt": "Please describe this image in detail.", "context": "", "chosen": e["caption"],
             "rejected": e["caption"] + " there is also a dog .", "method": "bench",
             "meta": {"generator_model": str(model_dir)}} for e in (examples * 4)[:n_pairs]]


def contrast_data(rows: list[dict], model_dir: Path, tmp: Path) -> dict[str, list[dict]]:
    """The scored rows of each loss: plain pairs, + corrupted images, + nearest neighbours (as the stage does)."""
    model, processor = load_model_and_processor(model_dir, "toy")
    t0 = time.perf_counter()
    corrupted = image_contrast_rows(rows, "corrupt", tmp / "contrast_images", seed=0)
    t1 = time.perf_counter()
    embeddings = image_embeddings(model, processor, [p for _, p in unique_images(rows)])
    neighbours = contrast_rows(rows, embeddings)
    t2 = time.perf_counter()
    print(f"contrast data: {len(rows)} corrupted images in {t1 - t0:.2f}s; embeddings + neighbours of "
          f"{len(unique_images(rows))} images in {t2 - t1:.2f}s", file=sys.stderr)
    return {"sigmoid": rows, "mdpo": corrupted, "symmpo": neighbours}


def bench_losses(cfg, model_dir: Path, data: dict[str, list[dict]], tmp: Path, repeats: int) -> dict[str, dict]:
    """Seconds of one training step (policy forward over all segments + loss + backward + AdamW step) on the SAME
    batch of pairs for each loss, the losses interleaved `repeats` times (load changes hit them alike)."""
    train = to_plain(cfg.train) | {"reference": "stored"}
    model, processor = load_model_and_processor(model_dir, "toy")
    batch_rows = {loss: rows[:train["batch_size"]] for loss, rows in data.items()}  # the same pairs for every loss
    setups = {}
    for loss, rows in batch_rows.items():
        scored = compute_reference_logps(model, processor, rows, train["max_length"], train["ref_batch_size"], loss)
        dataset = PairDataset(scored, processor, train["max_length"], "bench", loss)
        batch = PairCollator(processor.tokenizer.pad_token_id)([dataset[i] for i in range(len(dataset))])
        torch.manual_seed(0)
        policy = lora_model(load_model_and_processor(model_dir, "toy")[0], train["lora"])
        policy.train()
        with contextlib.redirect_stdout(sys.stderr):
            trainer = PreferenceTrainer(model=policy, args=training_arguments(tmp / loss, train, len(dataset)),
                                        train_dataset=dataset, data_collator=PairCollator(0), loss_name=loss,
                                        beta=train["beta"], sft_weight=train["sft_weight"],
                                        loss_params=loss_params(train | {"loss": loss}))
        optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=train["lr"])
        setups[loss] = (trainer, policy, optimizer, batch)
    times: dict[str, list[float]] = {loss: [] for loss in data}
    order = list(setups)
    for r in range(repeats + 1):  # the first round warms up (allocator, kernels) and is not counted
        for loss in order[r % len(order):] + order[:r % len(order)]:  # rotate: no loss always runs first
            trainer, policy, optimizer, batch = setups[loss]
            start = time.perf_counter()
            value = trainer.compute_loss(policy, dict(batch))
            value.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if r:
                times[loss].append(time.perf_counter() - start)
    return {loss: {"median": statistics.median(t), "min": min(t), "segments": int(setups[loss][3]["n_segments"]),
                   "sequences": int(setups[loss][3]["input_ids"].shape[0])} for loss, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (1 keeps timings stable on a machine shared with other jobs)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        cfg, examples = build(tmp, args.images)
        rows = pair_rows(examples, tmp / "world", tmp / "model", args.pairs)
        data = contrast_data(rows, tmp / "model", tmp)
        times = bench_losses(cfg, tmp / "model", data, tmp, args.repeats)
    base = times["sigmoid"]
    batch = cfg.train.batch_size
    print(f"\n{'one step, batch ' + str(batch) + ' pairs, stored reference':<40} {'sequences':>9} "
          f"{'median s':>9} {'x DPO':>7} {'min s':>8} {'x DPO':>7}")
    for loss, label in LOSSES.items():
        t = times[loss]
        print(f"{label:<40} {t['sequences']:>9} {t['median']:>9.3f} {t['median'] / base['median']:>6.2f}x "
              f"{t['min']:>8.3f} {t['min'] / base['min']:>6.2f}x")
    ratios = {f"{loss} / sigmoid": {"median": times[loss]["median"] / base["median"],
                                    "min": times[loss]["min"] / base["min"]} for loss in ("mdpo", "symmpo")}
    print(json.dumps({"step_seconds": times, "ratios": ratios, "batch_size": batch, "repeats": args.repeats,
                      "threads": args.threads}))


if __name__ == "__main__":
    main()
