"""Stage `report` (rule summarize): summary.json over every evaluated model, and the MLflow runs.

    python -m halludpo.report

summary.json: {"experiment", "rounds": [{"round", "model", "chair": {chair_s, chair_i, recall, len},
"pope": {<split>: {accuracy, precision, recall, f1, yes_ratio}}}]}; fractions in 0-1.
"""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig

from halludpo import paths
from halludpo.config import flatten, stage_main, to_plain
from halludpo.io import read_json, write_json
from halludpo.tracking import log_experiment, tracking_uri

log = logging.getLogger(__name__)

CHAIR_KEYS = ("chair_s", "chair_i", "recall", "len")
POPE_KEYS = ("accuracy", "precision", "recall", "f1", "yes_ratio")


def summary_row(k: int, model: str, chair_path: str | Path, pope_path: str | Path) -> dict:
    chair, pope = read_json(chair_path), read_json(pope_path)
    return {
        "round": k,
        "model": model,
        "chair": {key: chair["metrics"][key] for key in CHAIR_KEYS},
        "pope": {split: {key: m[key] for key in POPE_KEYS} for split, m in pope["metrics"].items()},
        "text_pipeline": chair["protocol"]["text_pipeline"],
        "n_images": {"chair": chair["protocol"]["n_images"], "pope": len(pope["protocol"]["image_ids"])},
    }


def build_summary(experiment: str, rows: list[dict]) -> dict:
    return {"experiment": experiment, "rounds": sorted(rows, key=lambda r: r["round"])}


def markdown_table(summary: dict) -> str:
    splits = list(summary["rounds"][0]["pope"]) if summary["rounds"] else []
    head = ["round", "CHAIR_s", "CHAIR_i", "recall", "len"] + [f"POPE {s} F1" for s in splits]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in summary["rounds"]:
        c = r["chair"]
        cells = [str(r["round"]), f"{c['chair_s']:.3f}", f"{c['chair_i']:.3f}", f"{c['recall']:.3f}",
                 f"{c['len']:.1f}"] + [f"{r['pope'][s]['f1']:.3f}" for s in splits]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def track(cfg: DictConfig, summary: dict) -> dict | None:
    """Log to MLflow; on failure say so and return None (summary.json stays the truth)."""
    if not cfg.tracking.enabled:
        return None
    uri = tracking_uri(cfg.tracking.tracking_uri)
    artifacts = {r["round"]: [paths.chair_json(cfg, r["round"]), paths.pope_json(cfg, r["round"])]
                 for r in summary["rounds"]}
    try:
        return log_experiment(uri, cfg.experiment_name, cfg.tracking.artifact_location, flatten(to_plain(cfg)),
                              summary["rounds"], artifacts)
    except Exception as err:  # noqa: BLE001 - any tracking failure must not fail the pipeline
        log.warning("MLflow tracking at %s failed (%s: %s); results are in %s", uri, type(err).__name__, err,
                    paths.summary_json(cfg))
        return None


def run(cfg: DictConfig) -> None:
    rows = [summary_row(k, str(paths.model_dir(cfg, k)), paths.chair_json(cfg, k), paths.pope_json(cfg, k))
            for k in range(cfg.rounds + 1)]
    summary = build_summary(cfg.experiment_name, rows)
    out = paths.summary_json(cfg)
    write_json(out, summary)
    (out.parent / "summary.md").write_text(markdown_table(summary))
    ids = track(cfg, summary)
    if ids:
        write_json(out.parent / "mlflow_runs.json", ids)
    log.info("summary -> %s\n%s", out, markdown_table(summary))


main = stage_main(run)

if __name__ == "__main__":
    main()
