"""halludpo.tracking against a real `mlflow server`, plus the URI rules and the unreachable-server path of report.track.

The server tests start `mlflow server` (sqlite backend, proxied artifacts) once per module; it needs ~25-30 s to
become healthy on 2 cores.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from halludpo.report import track
from halludpo.tracking import round_metrics, tracking_uri

SERVER_START_TIMEOUT = 120  # s; healthy after ~25-30 s on 2 idle cores, more when a training job shares them


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM the main PID (it stops its workers), then wait; SIGKILL our own process group on timeout."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the group is the one start_new_session gave this server
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow_server")
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    cmd = [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
           "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",  # root is absolute: sqlite:////abs/...
           "--artifacts-destination", str(root / "artifacts"), "--workers", "1"]
    env = os.environ | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # 2 processes instead of 9
    env.pop("MLFLOW_TRACKING_URI", None)
    stdout, stderr = open(root / "server.out", "wb"), open(root / "server.err", "wb")  # files: a pipe could fill
    proc = subprocess.Popen(cmd, stdout=stdout, stderr=stderr, env=env, start_new_session=True)

    def server_log() -> str:
        return (root / "server.err").read_text(errors="replace")[-4000:]

    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while True:
            if proc.poll() is not None:
                pytest.fail(f"mlflow server exited with {proc.returncode}:\n{server_log()}")
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow server not healthy after {SERVER_START_TIMEOUT} s:\n{server_log()}")
            time.sleep(0.5)
        yield uri
    finally:
        stop(proc)
        stdout.close()
        stderr.close()


# --- fake pipeline output -----------------------------------------------------------------------------------------

def fake_row(k: int, chair: tuple[float, float, float, float], pope: dict[str, tuple[float, ...]]) -> dict:
    """One summary.json row; pope[split] = (accuracy, precision, recall, f1, yes_ratio)."""
    keys = ("accuracy", "precision", "recall", "f1", "yes_ratio")
    return {
        "round": k,
        "model": f"results/test_exp/round_{k}/merged",
        "chair": dict(zip(("chair_s", "chair_i", "recall", "len"), chair)),
        "pope": {split: dict(zip(keys, values)) for split, values in pope.items()},
    }


ROWS = [
    fake_row(0, (0.52, 0.141, 0.63, 98.5), {"random": (0.871, 0.902, 0.833, 0.866, 0.462),
                                             "popular": (0.842, 0.851, 0.829, 0.840, 0.487),
                                             "adversarial": (0.803, 0.788, 0.829, 0.808, 0.526)}),
    fake_row(1, (0.37, 0.097, 0.61, 91.25), {"random": (0.884, 0.921, 0.840, 0.879, 0.456),
                                              "popular": (0.866, 0.883, 0.844, 0.863, 0.478),
                                              "adversarial": (0.832, 0.827, 0.839, 0.833, 0.507)}),
]
CURVES = {1: [{"step": 1, "loss": 0.7, "rewards/accuracies": 0.5},
              {"step": 2, "loss": 0.6, "rewards/accuracies": 0.75}]}
N_PARAMS = 130  # > 100: the REST API takes at most 100 params per log_batch request


def fake_params() -> dict[str, object]:
    params: dict[str, object] = {f"train.group{i // 10}.p{i}": i * 0.5 for i in range(N_PARAMS - 3)}
    params |= {"experiment_name": "test_exp", "method": "apasi", "train.lora": True}
    return params


def fake_artifacts(tmp_path: Path) -> dict[int, list[Path]]:
    artifacts = {}
    for row in ROWS:
        k = row["round"]
        folder = tmp_path / f"round_{k}" / "eval"
        folder.mkdir(parents=True)
        chair, pope = folder / "chair.json", folder / "pope.json"
        chair.write_text(json.dumps({"metrics": row["chair"]}))
        pope.write_text(json.dumps({"metrics": row["pope"]}))
        artifacts[k] = [chair, pope]
    return artifacts


# --- tests ----------------------------------------------------------------------------------------------------------

def test_round_metrics_names():
    metrics = round_metrics(ROWS[0])
    assert metrics["chair_i"] == pytest.approx(0.141)
    assert metrics["pope_adversarial_f1"] == pytest.approx(0.808)
    assert len(metrics) == 4 + 3 * 5
    by_sentence = [{"sentence": 0, "responses": 2, "mentions": 4, "hallucinated": 1, "chair_i": 0.25}]
    assert round_metrics(ROWS[0] | {"chair_by_sentence": by_sentence})["chair_i_sentence_1"] == 0.25


def test_by_sentence_table_pads_rounds_with_fewer_sentences():
    from halludpo.report import by_sentence_table

    def row(k, counts):
        return {"round": k, "chair_by_sentence": [
            {"sentence": i, "responses": 9, "mentions": m, "hallucinated": h, "chair_i": h / m}
            for i, (h, m) in enumerate(counts)]}
    table = by_sentence_table({"rounds": [row(0, [(1, 10), (3, 6)]), row(1, [(1, 10)])]}).splitlines()
    assert table[0] == "| round | sentence 1 | sentence 2 |"
    assert table[2] == "| 0 | 0.100 (1/10) | 0.500 (3/6) |"
    assert table[3] == "| 1 | 0.100 (1/10) |  |"
    assert by_sentence_table({"rounds": [{"round": 0}]}) == ""


@pytest.mark.server
def test_log_experiment_to_real_server(mlflow_server, tmp_path, monkeypatch):
    import mlflow
    from halludpo.tracking import log_experiment

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = mlflow_server
    params = fake_params()
    artifacts = fake_artifacts(tmp_path)

    ids = log_experiment(uri, "test_exp", None, params, ROWS, artifacts, CURVES)

    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("test_exp")
    assert exp is not None and exp.experiment_id == ids["experiment_id"]

    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.run_id == ids["parent_run_id"]
    assert parent.info.status == "FINISHED"

    children = client.search_runs([exp.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(r.info.run_name for r in children) == ["round_0", "round_1"]
    by_name = {r.info.run_name: r for r in children}

    for row in ROWS:
        child = by_name[f"round_{row['round']}"]
        assert child.info.run_id == ids["rounds"][row["round"]]
        assert child.info.status == "FINISHED"
        metrics = child.data.metrics  # latest value per key
        for key, value in row["chair"].items():
            assert metrics[key] == pytest.approx(value), key
        for split, values in row["pope"].items():
            for name, value in values.items():
                assert metrics[f"pope_{split}_{name}"] == pytest.approx(value), (split, name)
        assert metrics["chair_i"] == pytest.approx(row["chair"]["chair_i"])
        assert metrics["pope_adversarial_f1"] == pytest.approx(row["pope"]["adversarial"]["f1"])

        child_params = child.data.params
        assert len(child_params) > 100
        assert len(child_params) == len(params) + 2  # + round, model
        assert child_params["round"] == str(row["round"])
        assert child_params["model"] == row["model"]
        assert child_params["train.group12.p126"] == str(126 * 0.5)  # a param beyond the first 100

        listed = client.list_artifacts(child.info.run_id, "eval")
        assert sorted(a.path for a in listed) == ["eval/chair.json", "eval/pope.json"]

    loss = client.get_metric_history(by_name["round_1"].info.run_id, "loss")
    loss = sorted(loss, key=lambda m: m.step)
    assert [m.step for m in loss] == [1, 2]
    assert [m.value for m in loss] == pytest.approx([0.7, 0.6])
    acc = sorted(client.get_metric_history(by_name["round_1"].info.run_id, "rewards/accuracies"), key=lambda m: m.step)
    assert [(m.step, m.value) for m in acc] == [(1, 0.5), (2, 0.75)]
    assert client.get_metric_history(by_name["round_0"].info.run_id, "loss") == []  # no curve given for round 0

    chair_i = sorted(client.get_metric_history(parent.info.run_id, "chair_i"), key=lambda m: m.step)
    assert [m.step for m in chair_i] == [0, 1]
    assert [m.value for m in chair_i] == pytest.approx([0.141, 0.097])


def test_tracking_uri(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a relative sqlite path resolves (and its folder is made) here
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")
    assert tracking_uri("sqlite:///x/y.db") == "http://tracking.example:5000"

    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    uri = tracking_uri("sqlite:///x/y.db")
    assert uri == f"sqlite:///{tmp_path.resolve() / 'x' / 'y.db'}"
    assert uri.startswith("sqlite:////")
    assert (tmp_path / "x").is_dir()
    assert tracking_uri("sqlite:////abs/mlflow.db") == "sqlite:////abs/mlflow.db"  # absolute stays as it is


def test_unreachable_server_does_not_fail(tmp_path, monkeypatch, caplog):
    uri = f"http://127.0.0.1:{free_port()}"  # bound then released: nothing listens there
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    cfg = OmegaConf.create({
        "experiment_name": "test_exp",
        "paths": {"experiment_dir": str(tmp_path / "results" / "test_exp")},
        "tracking": {"enabled": True, "tracking_uri": uri, "artifact_location": None},
    })
    summary = {"experiment": "test_exp", "rounds": ROWS}

    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="halludpo.report"):
        assert track(cfg, summary) is None
    assert time.monotonic() - start < 30

    warnings = [r for r in caplog.records if r.name == "halludpo.report" and r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert uri in warnings[0].getMessage()
    assert "summary.json" in warnings[0].getMessage()


def test_tracking_disabled_does_nothing(tmp_path):
    cfg = OmegaConf.create({"experiment_name": "test_exp", "paths": {"experiment_dir": str(tmp_path)},
                            "tracking": {"enabled": False, "tracking_uri": "http://127.0.0.1:1",
                                         "artifact_location": None}})
    assert track(cfg, {"experiment": "test_exp", "rounds": ROWS}) is None
