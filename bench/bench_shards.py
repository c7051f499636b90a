"""Benchmark: what sharding a model stage costs and what two parallel workers gain, for generate and
reference_logps, measured side by side in one run on this machine.

    python bench/bench_shards.py [--images 128] [--shards 3]

Builds a toy world and a randomly initialised toy model of the default size in a temporary folder, then runs the
real stage commands (`python -m halludpo.generate ... shard=i shards=n`, `python -m halludpo.train
step=reference ...`), one thread each:
  - 1 shard: the whole list in one process;
  - --shards shards one after the other: overhead = (sum of the shards' wall times) / (the 1-shard wall time),
    which counts what every shard job repeats (process start, config, model load); target <= 1.10x;
  - 2 shards at once (two workers, as two GPUs would be): wall-time ratio to the 1-shard run.
Each shard job is a whole stage process, as Snakemake runs it; the gather step is not timed (a file copy).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_rounds import build  # noqa: E402  (toy world + random toy model of the default size)

from halludpo.io import write_jsonl  # noqa: E402


def stage_command(module: str, settings: list[str], tmp: Path, name: str) -> list[str]:
    return [sys.executable, "-m", f"halludpo.{module}", *settings, f"paths.data_dir={tmp / 'world'}",
            f"model.path={tmp / 'model'}", f"paths.results={tmp / 'results'}", "eval.chair.text_pipeline=offline",
            f"hydra.run.dir={tmp / 'hydra' / name}", "hydra.job.chdir=false"]


def run_shards(module: str, settings: list[str], tmp: Path, shards: int, which: list[int]) -> float:
    """Wall seconds of running shards `which` of `shards` at the same time (one process each, one thread)."""
    env = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src"),
                        "TQDM_DISABLE": "1"}
    start = time.perf_counter()
    procs = [subprocess.Popen(stage_command(module, [*settings, f"shard={i}", f"shards={shards}"], tmp,
                                            f"{module}_{i}of{shards}"),
                              cwd=tmp, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for i in which]
    for proc in procs:
        _, err = proc.communicate()
        if proc.returncode:
            raise SystemExit(f"{module} shard failed:\n{err[-3000:]}")
    return time.perf_counter() - start


def measure(module: str, settings: list[str], tmp: Path, shards: int) -> dict[str, float]:
    whole = run_shards(module, settings, tmp, 1, [0])
    parts = [run_shards(module, settings, tmp, shards, [i]) for i in range(shards)]
    parallel = run_shards(module, settings, tmp, 2, [0, 1])
    return {"whole": whole, "parts": sum(parts), "parallel": parallel}


def pair_rows(examples: list[dict], world: Path, n: int) -> list[dict]:
    return [{"image_id": e["image_id"], "image_path": str(world / "train" / "images" / e["file_name"]),
             "prompt": "Please describe this image in detail.", "context": "", "chosen": e["caption"],
             "rejected": e["caption"] + " there is also a dog .", "method": "bench", "meta": {}}
            for e in (examples * 4)[:n]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=128, help="images described / pairs scored")
    parser.add_argument("--shards", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        print(f"building a toy world of {args.images} images and a random toy model ...", flush=True)
        _, examples = build(tmp, args.images)
        pairs = tmp / "results" / "toy_apasi" / "round_0" / "pairs" / "pairs.jsonl"
        write_jsonl(pairs, pair_rows(examples, tmp / "world", args.images))
        stages = {
            "generate (eval split)": ("generate", ["round=0", "split=eval", f"eval.chair.n_images={args.images}",
                                                   f"data.splits.eval={args.images}",
                                                   "eval.batch_size=16", "eval.chair.max_new_tokens=64"]),
            "reference_logps": ("train", ["round=0", "step=reference", "train.ref_batch_size=8"]),
        }
        rows = []
        for name, (module, settings) in stages.items():
            print(f"timing {name} ...", flush=True)
            t = measure(module, settings, tmp, args.shards)
            rows.append((name, t))
    print(f"\n{args.images} items, one thread per process; {args.shards} shards for the overhead\n")
    print(f"| stage | 1 shard (s) | {args.shards} shards, summed (s) | overhead | 2 shards at once (s) | wall ratio |")
    print("|---|---|---|---|---|---|")
    for name, t in rows:
        print(f"| {name} | {t['whole']:.1f} | {t['parts']:.1f} | {t['parts'] / t['whole']:.2f}x | "
              f"{t['parallel']:.1f} | {t['parallel'] / t['whole']:.2f}x |")


if __name__ == "__main__":
    main()
