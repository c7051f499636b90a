"""MLflow tracking: one experiment per experiment_name, a parent run per invocation, a child run per round.

The pipeline's files are the truth; MLflow is where people compare them. A tracking server that cannot be reached
is reported once and the stage carries on.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger(__name__)

MAX_PARAM_LENGTH = 6000  # MLflow rejects longer param values


def tracking_uri(configured: str) -> str:
    """MLFLOW_TRACKING_URI wins over the config; a relative sqlite path is made absolute."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or configured
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        db = Path(uri[len(prefix):]).resolve()
        db.parent.mkdir(parents=True, exist_ok=True)
        uri = prefix + str(db)
    return uri


def get_experiment_id(client, name: str, artifact_location: str | None) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = Path(artifact_location).resolve().as_uri() if artifact_location else None
    return client.create_experiment(name, artifact_location=location)


def round_metrics(row: dict) -> dict[str, float]:
    """summary.json row -> MLflow metric names (chair_s, chair_i, recall, len, chair_i_sentence_<n>,
    pope_<split>_<metric>)."""
    metrics = {k: float(v) for k, v in row["chair"].items()}
    for position in row.get("chair_by_sentence", []):
        metrics[f"chair_i_sentence_{position['sentence'] + 1}"] = float(position["chair_i"])
    for split, values in row["pope"].items():
        metrics.update({f"pope_{split}_{m}": float(v) for m, v in values.items()})
    return metrics


def clip_params(params: dict[str, object]) -> dict[str, str]:
    return {k: str(v)[:MAX_PARAM_LENGTH] for k, v in params.items()}


def log_params(client, run_id: str, params: dict[str, object]) -> None:
    """All params, in batches: the REST API takes at most 100 per request."""
    from mlflow.entities import Param

    items = list(clip_params(params).items())
    for start in range(0, len(items), 100):
        client.log_batch(run_id, params=[Param(n, v) for n, v in items[start: start + 100]])


def log_experiment(uri: str, experiment: str, artifact_location: str | None, params: dict[str, object],
                   rounds: list[dict], artifacts: dict[int, Iterable[Path]],
                   curves: dict[int, list[dict]] | None = None, plot: Path | None = None) -> dict:
    """Create the parent run and one nested child run `round_<k>` per summary row; returns the run ids.

    curves[k] = [{"step": s, "<name>": value, ...}] (training history of the round) is logged with its steps.
    """
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    client = MlflowClient(tracking_uri=uri)
    exp_id = get_experiment_id(client, experiment, artifact_location)
    parent = client.create_run(exp_id, run_name=f"{experiment}", tags={"halludpo.kind": "pipeline"})
    ids = {"tracking_uri": uri, "experiment_id": exp_id, "parent_run_id": parent.info.run_id, "rounds": {}}
    log_params(client, parent.info.run_id, params)
    for row in rounds:
        k = row["round"]
        child = client.create_run(exp_id, run_name=f"round_{k}",
                                  tags={"mlflow.parentRunId": parent.info.run_id, "halludpo.round": str(k)})
        run_id = child.info.run_id
        ids["rounds"][k] = run_id
        log_params(client, run_id, params | {"round": k, "model": row["model"]})
        client.log_batch(run_id, metrics=[Metric(n, v, 0, 0) for n, v in round_metrics(row).items()])
        for point in (curves or {}).get(k, []):
            step = int(point["step"])
            client.log_batch(run_id, metrics=[Metric(n, float(v), 0, step) for n, v in point.items() if n != "step"])
        for path in artifacts.get(k, []):
            client.log_artifact(run_id, str(path), artifact_path="eval")
        for m, v in round_metrics(row).items():  # the parent shows the curve over rounds
            client.log_metric(parent.info.run_id, m, v, step=k)
        client.set_terminated(run_id)
    if plot is not None and Path(plot).is_file():
        client.log_artifact(parent.info.run_id, str(plot))
    client.set_terminated(parent.info.run_id)
    return ids
