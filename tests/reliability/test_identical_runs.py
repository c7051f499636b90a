"""The same config gives the same result files, and MLflow tracking never duplicates nor fails silently: the tiny DAG
(conftest's tiny_pipeline) run a second time into another workdir, compared byte for byte; then, in that workdir,
rule summarize rerun (no run added), against a tracking server that is down (fails in seconds, one line in
Snakemake's output) and with tracking.required=false (says once that nothing was logged)."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from pathlib import Path

import pytest

from halludpo.tracking import NOT_LOGGED
from tests.test_pipeline import TINY, job_counts, snakemake

# Not results: the run's bookkeeping, which differs between two runs of one config by nature.
EXCLUDED_DIRS = {
    ".snakemake",  # Snakemake's metadata and locks
    "logs",  # the rules' logs: timestamps
    "benchmarks",  # the rules' timings
    "hydra",  # Hydra's run folders: the stage's log with timestamps
    "mlartifacts",  # the MLflow store's artifacts (logged copies of results)
    "manifests",  # halludpo.manifest's records: a `written` timestamp, and the hash of mlflow_runs.json
}
EXCLUDED_FILES = {
    "mlflow.db",  # the MLflow store: run ids, timestamps
    "mlflow_runs.json",  # pointers into the MLflow store: its run ids are random, its tracking_uri names the workdir
}
SNAKEMAKE_TIMEOUT = 900  # s per invocation (the helper's own limit)
FAIL_WITHIN = 30  # s for the whole `snakemake` invocation whose summarize meets a down server (~8 s on 2 cores)


def result_files(workdir: Path) -> dict[str, Path]:
    """{path relative to workdir: path} of every file that is a result of the run (EXCLUDED_* left out)."""
    files = {}
    for root, dirs, names in os.walk(workdir):
        dirs[:] = sorted(d for d in dirs if d not in EXCLUDED_DIRS)
        for name in names:
            if name not in EXCLUDED_FILES:
                path = Path(root) / name
                files[str(path.relative_to(workdir))] = path
    return files


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def second_run(tmp_path_factory, tiny_pipeline):
    """The tiny DAG once more, into a fresh workdir (the first run is tiny_pipeline's)."""
    workdir = tmp_path_factory.mktemp("pipeline_again")
    result = snakemake(workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir


def run_ids(workdir: Path) -> dict:
    return json.loads((workdir / "results" / "toy_apasi" / "mlflow_runs.json").read_text())


def mlflow_runs(workdir: Path) -> list:
    """Every run of the workdir's MLflow store (its default sqlite store), in experiment toy_apasi."""
    from mlflow import MlflowClient

    ids = run_ids(workdir)
    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'results' / 'mlflow.db'}")
    return client.search_runs([ids["experiment_id"]])


def dead_uri() -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"  # released: nothing listens there


def summarize_only(workdir: Path, *args: str, overrides=TINY):
    """snakemake() running rule summarize alone: only a changed param reruns a rule (--rerun-triggers params), so
    code edited since the run does not rerun the rules before it."""
    result = snakemake(workdir, "--rerun-triggers", "params", *args, overrides=overrides)
    assert set(job_counts(result.stdout + result.stderr)) <= {"summarize", "all"}, result.stderr[-3000:]
    return result


def with_tracking(uri: str, *overrides: str) -> list[str]:
    """TINY with tracking_uri=uri (as MLFLOW_TRACKING_URI would set it; snakemake() removes that variable)."""
    return [*TINY, f"tracking.tracking_uri={uri}", *overrides]


@pytest.mark.slow
def test_same_config_gives_byte_identical_results(tiny_pipeline, second_run):
    first, _ = tiny_pipeline
    a, b = result_files(first), result_files(second_run)
    assert sorted(a) == sorted(b)
    assert any(name.endswith("summary.json") for name in a) and any(name.endswith(".safetensors") for name in a)
    differing = [name for name in sorted(a) if digest(a[name]) != digest(b[name])]
    assert differing == []


@pytest.mark.slow
def test_summary_holds_no_timings(second_run):
    summary = (second_run / "results" / "toy_apasi" / "summary.json").read_text()
    assert "seconds" not in summary and "runtime" not in summary


@pytest.mark.slow
def test_rerun_of_summarize_adds_no_mlflow_run(second_run):
    before = run_ids(second_run)
    runs = mlflow_runs(second_run)
    assert len(runs) == 3  # the parent, round_0 (created by rule dpo, found by summarize), round_1
    steps = {r.info.run_name: r.data.metrics.get("loss") for r in runs}
    for _ in range(2):
        result = summarize_only(second_run, "--forcerun", "summarize")
        assert result.returncode == 0, result.stderr[-3000:]
        assert run_ids(second_run) == before
        again = mlflow_runs(second_run)
        assert sorted(r.info.run_id for r in again) == sorted(r.info.run_id for r in runs)
        assert {r.info.run_name: r.data.metrics.get("loss") for r in again} == steps


@pytest.mark.slow
def test_down_server_fails_summarize_with_one_line_then_not_required_says_so_once(second_run):
    uri = dead_uri()
    start = time.monotonic()
    result = summarize_only(second_run, overrides=with_tracking(uri))  # a changed tracking setting reruns it
    seconds = time.monotonic() - start
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert seconds < FAIL_WITHIN, seconds
    assert output.count("cannot be reached") == 1, output[-3000:]  # the stage's one line, in Snakemake's output
    assert f"summarize: MLflow tracking server {uri} cannot be reached" in output
    assert run_ids(second_run)["logged"] is False  # not the earlier run's ids

    result = summarize_only(second_run, overrides=with_tracking(uri, "tracking.required=false"))
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert output.count(NOT_LOGGED) == 1, output[-3000:]
    assert run_ids(second_run)["logged"] is False

    # the server back (the configured local store): the same runs as before, nothing added
    result = summarize_only(second_run)
    assert result.returncode == 0, result.stderr[-3000:]
    assert run_ids(second_run)["logged"] is True and len(mlflow_runs(second_run)) == 3
