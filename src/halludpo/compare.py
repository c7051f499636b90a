"""One comparison table across experiments (rule compare): CHAIR_s, CHAIR_i, recall, POPE F1 per split, AMBER's
CHAIR, discriminative F1 and score (when the experiment ran AMBER) and the wall time of each round, from each
experiment's summary.json and its per-rule Snakemake benchmarks.

    python -m halludpo.compare results/toy_apasi/summary.json results/toy_mdpo/summary.json \
        --md results/comparison.md --csv results/comparison.csv

Not a Hydra stage: it spans experiments, each composed from its own config. Wall time of round k = the summed
seconds of the experiment's rules for round k (benchmarks/*_r<k>.tsv: generation, pairs, contrast, reference
log-probs, training, evaluation); the shared data and base-model rules are not counted.
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
from pathlib import Path

from halludpo.io import InputError, read_json, write_text
from halludpo.metrics.mmhal import HEADLINE_KEYS as MMHAL_KEYS


def round_wall_seconds(experiment_dir: str | Path, k: int) -> float | None:
    """Summed `s` column of experiment_dir/benchmarks/*_r<k>.tsv; None when there is none."""
    files = sorted((Path(experiment_dir) / "benchmarks").glob(f"*_r{k}.tsv"))
    total = 0.0
    for path in files:
        lines = path.read_text(encoding="utf-8").splitlines()
        if len(lines) < 2 or not lines[0].startswith("s\t"):
            raise InputError(f"{path}: not a Snakemake benchmark file")
        total += sum(float(line.split("\t")[0]) for line in lines[1:] if line.strip())
    return total if files else None


AMBER_KEYS = ("chair", "f1", "amber_score")  # AMBER's columns of the table: CHAIR, discriminative F1, AMBER score
OBJECT_HALBENCH_KEYS = ("response_hall", "mention_hall")  # Object HalBench's: its two hallucination rates


def comparison_rows(summary_paths: list[str | Path]) -> list[dict]:
    """One row per (experiment, round): the headline metrics, POPE F1 per split, wall seconds."""
    rows = []
    for path in summary_paths:
        summary = read_json(path)
        if "rounds" not in summary or "experiment" not in summary:
            raise InputError(f"{path}: not a summary.json (no experiment/rounds)")
        for r in summary["rounds"]:
            row = {"experiment": summary["experiment"], "round": r["round"]}
            if "chair" in r:
                row |= {key: r["chair"][key] for key in ("chair_s", "chair_i", "recall")}
            row |= {f"pope_{split}_f1": m["f1"] for split, m in r.get("pope", {}).items()}
            if "amber" in r:
                row |= {f"amber_{key}": r["amber"][key] for key in AMBER_KEYS}
            if "object_halbench" in r:
                row |= {f"objhal_{key}": r["object_halbench"][key] for key in OBJECT_HALBENCH_KEYS}
            if "mmhal" in r:
                row |= {f"mmhal_{key}": r["mmhal"][key] for key in MMHAL_KEYS}
            row["wall_seconds"] = round_wall_seconds(Path(path).parent, r["round"])
            rows.append(row)
    return rows


def to_csv(rows: list[dict]) -> str:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def to_markdown(rows: list[dict]) -> str:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    names = {"chair_s": "CHAIR_s", "chair_i": "CHAIR_i", "wall_seconds": "wall s", "amber_chair": "AMBER CHAIR",
             "amber_f1": "AMBER F1", "amber_amber_score": "AMBER score", "objhal_response_hall": "ObjHal response",
             "objhal_mention_hall": "ObjHal mention", "mmhal_average_score": "MMHal score",
             "mmhal_hallucination_rate": "MMHal hal rate"}
    head = [names.get(c, c.replace("pope_", "POPE ").replace("_f1", " F1")) for c in columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = []
        for c in columns:
            v = row.get(c)
            cells.append("" if v is None else f"{v:.0f}" if c == "wall_seconds" else
                         f"{v:.3f}" if isinstance(v, float) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("summaries", nargs="+", help="summary.json of each experiment, in table order")
    parser.add_argument("--md", required=True)
    parser.add_argument("--csv", required=True)
    args = parser.parse_args(argv)
    try:
        rows = comparison_rows(args.summaries)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    write_text(args.csv, to_csv(rows))
    write_text(args.md, to_markdown(rows))
    print(to_markdown(rows))


if __name__ == "__main__":
    main()
