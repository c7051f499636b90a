"""MLflow tracking: one experiment per experiment_name, one parent run per resolved config, a child run per round.

The pipeline's files are the truth; MLflow is where people compare them. Runs are found again, never added twice:
the parent by its config tag (a hash of experiment_name and the resolved config, CONFIG_TAG), a round's child by
its parent and its `round` tag. A param, metric point or tag already logged is not logged again, so rerunning a
stage adds nothing; a value that changed is logged anew (it becomes the latest). Rule dpo sends the training curves
to the round's child while it trains (training_callbacks); rule summarize adds the evaluation and any curve point
dpo could not send.

An HTTP tracking server is probed first (GET <uri>/health, a few seconds in all) and MLflow's own HTTP retries are
bounded (HTTP_LIMITS), so a server that is down costs seconds, not MLflow's default minutes of retries. Every
failure is a TrackingError with a one-line message; the caller decides whether it stops the stage.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

MAX_PARAM_LENGTH = 6000  # MLflow rejects longer param values
BATCH_LIMITS = {"params": 100, "metrics": 1000}  # per log_batch request (REST API limits)
NOT_IDENTITY_KEYS = ("round", "step", "split", "tracking")  # set per stage invocation, or where to log: not the run
TAG_KEYS = {"method": "method.name", "loss": "train.loss", "model": "model.name", "data": "data.name"}
CONFIG_TAG = "halludpo.config"  # the parent's identity: config_hash()
KIND_TAG = "halludpo.kind"  # pipeline (the parent) | round (a child)
ROUND_TAG = "round"
NOT_LOGGED = "nothing was logged to MLflow"  # the notice of a run without tracking
PROBE_ATTEMPTS, PROBE_TIMEOUT, PROBE_PAUSE = 3, 4.0, 1.0  # at most ~14 s for a server that does not answer
# MLflow's HTTP client retries 7 times with backoff (~4 min) by default; these apply unless the user set them.
HTTP_LIMITS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
               "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


class TrackingError(RuntimeError):
    """The tracking store cannot be reached or refused a request; the message is one line."""


# ---------------------------------------------------------------------------------------------------------------
# What names a pipeline's runs


@dataclass(frozen=True)
class RunIdentity:
    """The MLflow experiment, the parent's config hash, the tags users filter by and the params of one config."""

    experiment: str
    config_hash: str
    tags: dict[str, str]
    params: dict[str, object]


def run_config(plain: dict) -> dict:
    """The resolved config without the keys that vary between the stage invocations of one pipeline run."""
    return {k: v for k, v in plain.items() if k not in NOT_IDENTITY_KEYS}


def config_hash(plain: dict) -> str:
    """16 hex digits of sha256 over experiment_name and the resolved config (run_config): the same config, from
    any stage (dpo of round k, summarize), gives the same hash."""
    text = json.dumps(run_config(plain), sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def select(plain: dict, dotted: str) -> object:
    """plain['a']['b'] for 'a.b'; None when a key is missing."""
    node: object = plain
    for key in dotted.split("."):
        node = node.get(key) if isinstance(node, dict) else None
    return node


def run_identity(plain: dict) -> RunIdentity:
    """RunIdentity of a resolved config (OmegaConf.to_container(cfg, resolve=True))."""
    from halludpo.config import flatten

    tags = {tag: str(select(plain, key)) for tag, key in TAG_KEYS.items() if select(plain, key) is not None}
    return RunIdentity(plain["experiment_name"], config_hash(plain), tags, flatten(run_config(plain)))


# ---------------------------------------------------------------------------------------------------------------
# Connecting


def tracking_uri(configured: str) -> str:
    """MLFLOW_TRACKING_URI wins over the config; a relative sqlite path is made absolute."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or configured
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        db = Path(uri[len(prefix):]).resolve()
        db.parent.mkdir(parents=True, exist_ok=True)
        uri = prefix + str(db)
    return uri


def probe(uri: str) -> None:
    """An HTTP(S) tracking server must answer GET <uri>/health (any status below 500) within PROBE_ATTEMPTS tries
    of PROBE_TIMEOUT s; TrackingError otherwise. Other stores (sqlite, file) are local: nothing to probe."""
    if not uri.startswith(("http://", "https://")):
        return
    start, problem = time.monotonic(), ""
    for attempt in range(PROBE_ATTEMPTS):
        if attempt:
            time.sleep(PROBE_PAUSE)
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=PROBE_TIMEOUT):
                return
        except urllib.error.HTTPError as err:
            if err.code < 500:
                return  # it answers (a proxy or an auth layer in front of MLflow)
            problem = f"HTTP {err.code}"
        except (urllib.error.URLError, OSError) as err:
            problem = str(getattr(err, "reason", err))
    raise TrackingError(f"MLflow tracking server {uri} cannot be reached ({problem}; {PROBE_ATTEMPTS} attempts "
                        f"in {time.monotonic() - start:.0f} s)")


def connect(uri: str):
    """An MlflowClient for uri after a successful probe, with MLflow's HTTP retries bounded (HTTP_LIMITS)."""
    probe(uri)
    for name, value in HTTP_LIMITS.items():
        os.environ.setdefault(name, value)
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def one_line(err: BaseException) -> str:
    """An exception as one line: its type and the first line of its message."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


# ---------------------------------------------------------------------------------------------------------------
# Runs: found by tags, created once


def get_experiment_id(client, name: str, artifact_location: str | None) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = Path(artifact_location).resolve().as_uri() if artifact_location else None
    return client.create_experiment(name, artifact_location=location)


def find_run(client, experiment_id: str, tags: dict[str, str]) -> str | None:
    """The oldest active run carrying all these tags, or None."""
    clauses = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    runs = client.search_runs([experiment_id], filter_string=clauses, order_by=["attributes.start_time ASC"],
                              max_results=1)
    return runs[0].info.run_id if runs else None


def get_or_create_run(client, experiment_id: str, key_tags: dict[str, str], tags: dict[str, str], run_name: str,
                      params: dict[str, object]) -> str:
    """The run found by key_tags, or a new one with key_tags | tags; then its tags and params are completed."""
    run_id = find_run(client, experiment_id, key_tags)
    if run_id is None:
        run_id = client.create_run(experiment_id, run_name=run_name, tags=key_tags | tags).info.run_id
        log.info("MLflow run %s (%s) created", run_id, run_name)
    complete_run(client, run_id, tags, params)
    return run_id


def parent_run(client, experiment_id: str, identity: RunIdentity) -> str:
    """The pipeline's parent run: found by CONFIG_TAG, created once."""
    key = {CONFIG_TAG: identity.config_hash, KIND_TAG: "pipeline"}
    return get_or_create_run(client, experiment_id, key, identity.tags, identity.experiment, identity.params)


def round_run(client, experiment_id: str, parent_id: str, identity: RunIdentity, k: int, model: str) -> str:
    """Round k's child run of parent_id (model_k's evaluation and the training of round k): created once."""
    key = {"mlflow.parentRunId": parent_id, KIND_TAG: "round", ROUND_TAG: str(k)}
    tags = identity.tags | {CONFIG_TAG: identity.config_hash}
    return get_or_create_run(client, experiment_id, key, tags, f"round_{k}",
                             identity.params | {"round": k, "model": model})


def clip_params(params: dict[str, object]) -> dict[str, str]:
    return {k: str(v)[:MAX_PARAM_LENGTH] for k, v in params.items()}


def complete_run(client, run_id: str, tags: dict[str, str], params: dict[str, object]) -> None:
    """Log the tags and params the run does not hold yet, in batches (a logged param cannot change)."""
    from mlflow.entities import Param, RunTag

    data = client.get_run(run_id).data
    new_tags = [RunTag(k, v) for k, v in tags.items() if data.tags.get(k) != v]
    new_params = [Param(k, v) for k, v in clip_params(params).items() if k not in data.params]
    if new_tags:
        client.log_batch(run_id, tags=new_tags)
    step = BATCH_LIMITS["params"]
    for start in range(0, len(new_params), step):
        client.log_batch(run_id, params=new_params[start: start + step])


# ---------------------------------------------------------------------------------------------------------------
# Metrics: each (key, step) logged once


def same_value(a: float | None, b: float) -> bool:
    """a (a logged value, None if none) equals b up to float round trips; NaN equals NaN."""
    if a is None:
        return False
    return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)


def logged_points(client, run_id: str, keys: Iterable[str] | None = None) -> dict[tuple[str, int], float]:
    """{(key, step): latest value} of the run's metrics (all keys, or those of `keys` it holds)."""
    present = set(client.get_run(run_id).data.metrics)
    points = {}
    for key in sorted(present if keys is None else present & set(keys)):
        for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.timestamp):
            points[(key, m.step)] = m.value
    return points


def new_points(points: Iterable[tuple[str, float, int]], logged: dict[tuple[str, int], float]) -> list:
    """The (key, value, step) points whose value is not already the latest at that step, as Metrics stamped now."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [Metric(key, float(value), now, int(step)) for key, value, step in points
            if not same_value(logged.get((key, int(step))), float(value))]


def log_metric_batches(client, run_id: str, metrics: list) -> None:
    step = BATCH_LIMITS["metrics"]
    for start in range(0, len(metrics), step):
        client.log_batch(run_id, metrics=metrics[start: start + step])


def log_new_metrics(client, run_id: str, points: list[tuple[str, float, int]]) -> int:
    """Log the points the run does not hold yet (or holds with another value); returns how many were logged."""
    metrics = new_points(points, logged_points(client, run_id, {key for key, _, _ in points}))
    log_metric_batches(client, run_id, metrics)
    return len(metrics)


def curve_points(curve: list[dict]) -> list[tuple[str, float, int]]:
    """[{"step": s, "<name>": value, ...}] (train_log.jsonl rows) -> (name, value, step) points."""
    return [(name, value, int(row["step"])) for row in curve for name, value in row.items() if name != "step"]


def round_metrics(row: dict) -> dict[str, float]:
    """summary.json row -> MLflow metric names (chair_s, chair_i, recall, len, chair_i_sentence_<n>,
    pope_<split>_<metric>, amber_<metric>: amber_chair, amber_cover, amber_hal, amber_cog, amber_accuracy,
    amber_f1, amber_score, object_halbench_<metric>, mmhal_<metric>), for the benchmarks the row holds; a metric
    without a value (null) is not logged."""
    metrics = {k: float(v) for k, v in row.get("chair", {}).items()}
    for position in row.get("chair_by_sentence", []):
        metrics[f"chair_i_sentence_{position['sentence'] + 1}"] = float(position["chair_i"])
    for split, values in row.get("pope", {}).items():
        metrics.update({f"pope_{split}_{m}": float(v) for m, v in values.items()})
    for name, value in row.get("amber", {}).items():
        if value is not None:
            metrics["amber_score" if name == "amber_score" else f"amber_{name}"] = float(value)
    metrics.update({f"object_halbench_{name}": float(value) for name, value in row.get("object_halbench", {}).items()})
    metrics.update({f"mmhal_{name}": float(value) for name, value in row.get("mmhal", {}).items()})
    return metrics


# ---------------------------------------------------------------------------------------------------------------
# Rule summarize: the whole experiment


def log_experiment(uri: str, identity: RunIdentity, artifact_location: str | None, rounds: list[dict],
                   artifacts: dict[int, Iterable[Path]], curves: dict[int, list[dict]] | None = None,
                   plot: Path | None = None) -> dict:
    """The parent run and a child run `round_<k>` per summary row (found or created), their evaluation metrics,
    the training curves (curves[k] = train_log.jsonl rows of round k) and artifacts; returns the run ids.

    TrackingError (one line) when the store cannot be reached or a request fails."""
    client = connect(uri)
    try:
        return log_runs(client, uri, identity, artifact_location, rounds, artifacts, curves or {}, plot)
    except Exception as err:  # noqa: BLE001 - MLflow raises many types; the caller needs one line
        raise TrackingError(f"MLflow logging to {uri} failed ({one_line(err)})") from err


def log_runs(client, uri: str, identity: RunIdentity, artifact_location: str | None, rounds: list[dict],
             artifacts: dict[int, Iterable[Path]], curves: dict[int, list[dict]], plot: Path | None) -> dict:
    """log_experiment's body, on a connected client."""
    exp_id = get_experiment_id(client, identity.experiment, artifact_location)
    parent = parent_run(client, exp_id, identity)
    ids = {"tracking_uri": uri, "experiment_id": exp_id, "config_hash": identity.config_hash,
           "parent_run_id": parent, "rounds": {}}
    over_rounds = []  # the parent shows each metric over the rounds
    for row in rounds:
        k = row["round"]
        child = round_run(client, exp_id, parent, identity, k, row["model"])
        ids["rounds"][k] = child
        metrics = round_metrics(row)
        log_new_metrics(client, child, [(n, v, 0) for n, v in metrics.items()] + curve_points(curves.get(k, [])))
        for path in artifacts.get(k, []):
            client.log_artifact(child, str(path), artifact_path="eval")
        client.set_terminated(child)
        over_rounds += [(n, v, k) for n, v in metrics.items()]
    log_new_metrics(client, parent, over_rounds)
    if plot is not None and Path(plot).is_file():
        client.log_artifact(parent, str(plot))
    client.set_terminated(parent)
    return ids


# ---------------------------------------------------------------------------------------------------------------
# Rule dpo: the training curve, live


class LiveCurve:
    """Sends round k's training logs to its child run while it trains (the main process only; the runs are opened
    when training starts). If tracking cannot be reached or a request fails, it warns once and stops: training
    goes on, and summarize logs the curve from train_log.jsonl later."""

    def __init__(self, uri: str, identity: RunIdentity, artifact_location: str | None, k: int, model: str):
        self.uri, self.identity, self.artifact_location, self.k, self.model = uri, identity, artifact_location, k, model
        self.client, self.run_id, self.failed = None, None, False
        self.logged: dict[tuple[str, int], float] = {}

    def open(self) -> None:
        """Connect, get or create the parent and round k's child, and read what an earlier attempt logged."""
        self.client = connect(self.uri)
        exp_id = get_experiment_id(self.client, self.identity.experiment, self.artifact_location)
        parent = parent_run(self.client, exp_id, self.identity)
        self.run_id = round_run(self.client, exp_id, parent, self.identity, self.k, self.model)
        self.logged = logged_points(self.client, self.run_id)
        log.info("training curves -> MLflow run %s (round_%d of %s at %s)", self.run_id, self.k,
                 self.identity.experiment, self.uri)

    def start(self) -> None:
        """Open the runs now (when training starts), so the round's run is in the MLflow UI from the first step."""
        self.guarded(self.open_once)

    def open_once(self) -> None:
        """open() unless already open."""
        if self.run_id is None:
            self.open()

    def log(self, step: int, values: dict) -> None:
        """Log one training log (the numbers of a Trainer log entry) at `step`."""
        points = [(n, v, step) for n, v in values.items() if isinstance(v, (int, float))]
        self.guarded(self.send, points)

    def send(self, points: list[tuple[str, float, int]]) -> None:
        self.open_once()
        metrics = new_points(points, self.logged)
        log_metric_batches(self.client, self.run_id, metrics)
        self.logged.update({(m.key, m.step): m.value for m in metrics})

    def finish(self) -> None:
        """Mark the child run finished (summarize finishes it again after the evaluation)."""
        if self.run_id is not None:
            self.guarded(self.client.set_terminated, self.run_id)

    def guarded(self, action, *args) -> None:
        """Run action unless tracking failed before; on its first failure warn once and stop tracking."""
        if self.failed:
            return
        try:
            action(*args)
        except Exception as err:  # noqa: BLE001 - tracking must never stop training
            self.failed = True
            reason = str(err) if isinstance(err, TrackingError) else f"MLflow at {self.uri}: {one_line(err)}"
            log.warning("training curves of round %d are not logged live (%s); training goes on and summarize "
                        "logs them from train_log.jsonl", self.k, reason)


def training_callbacks(cfg) -> list:
    """[a transformers TrainerCallback sending round cfg.round's training logs to its MLflow child run], or []
    when tracking is off. Logs only entries with a `loss` (the rows of train_log.jsonl), from the main process."""
    if not cfg.tracking.enabled:
        return []
    from omegaconf import OmegaConf
    from transformers import TrainerCallback  # imported here: rule summarize does not need transformers

    from halludpo import paths

    curve = LiveCurve(tracking_uri(cfg.tracking.tracking_uri), run_identity(OmegaConf.to_container(cfg, resolve=True)),
                      cfg.tracking.artifact_location, int(cfg.round), str(paths.model_dir(cfg, cfg.round)))

    class LiveCurveCallback(TrainerCallback):
        """Hands every training log of the main process to `curve`."""

        def __init__(self):
            self.curve = curve

        def on_train_begin(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                self.curve.start()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and logs and "loss" in logs:
                self.curve.log(state.global_step, logs)

        def on_train_end(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                self.curve.finish()

    return [LiveCurveCallback()]
