"""halludpo.tracking against a real `mlflow server`: runs found again instead of added, tags, the live training
curve of rule dpo; and the stage `report` (rule summarize) against a server that is down or does not answer.

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

from halludpo.tracking import (
    CONFIG_TAG,
    NOT_LOGGED,
    LiveCurve,
    TrackingError,
    config_hash,
    log_experiment,
    probe,
    round_metrics,
    run_identity,
    tracking_uri,
)
from tests.conftest import TINY_TRAIN
from tests.test_train import pairs  # noqa: F401  (fixture: preference pairs on the tiny world)

ROOT = Path(__file__).resolve().parents[1]

SERVER_START_TIMEOUT = 120  # s; healthy after ~25-30 s on 2 idle cores, more when a training job shares them
FAIL_WITHIN = 30  # s: a tracking server that is down fails summarize within this (MLflow's own retries: ~4 min)


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


def dead_uri() -> str:
    """An HTTP address where nothing listens (a port bound, then released)."""
    return f"http://127.0.0.1:{free_port()}"


@pytest.fixture
def silent_server():
    """An HTTP address that accepts connections and never answers (a hung server): a listening socket that is
    never accept()ed, so connections complete in its backlog and wait."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        yield f"http://127.0.0.1:{s.getsockname()[1]}"


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
N_GROUP_PARAMS = 127  # + the named keys below: > 100, and the REST API takes at most 100 params per request


def fake_config(experiment: str = "test_exp", **changes) -> dict:
    """A resolved config (plain dict) with more than 100 leaves; `changes` replace top-level keys."""
    config: dict = {"experiment_name": experiment, "round": 0, "step": "main", "split": "eval",
                    "method": {"name": "apasi"}, "model": {"name": "toy_llava"}, "data": {"name": "toy"},
                    "train": {"loss": "sigmoid", "lora": True} | {f"group{i // 10}": {} for i in range(N_GROUP_PARAMS)},
                    "tracking": {"enabled": True, "required": True, "tracking_uri": "sqlite:///x.db"}}
    for i in range(N_GROUP_PARAMS):
        config["train"][f"group{i // 10}"][f"p{i}"] = i * 0.5
    return config | changes


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


def run_counts(client, experiment_id: str, run_ids: list[str]) -> tuple[int, dict[str, int]]:
    """(runs in the experiment, {run id/metric: number of logged points}) - what a rerun must leave unchanged."""
    points = {}
    for run_id in run_ids:
        for key in client.get_run(run_id).data.metrics:
            points[f"{run_id}/{key}"] = len(client.get_metric_history(run_id, key))
    return len(client.search_runs([experiment_id])), points


# --- identity and tags ------------------------------------------------------------------------------------------

def test_round_metrics_names():
    metrics = round_metrics(ROWS[0])
    assert metrics["chair_i"] == pytest.approx(0.141)
    assert metrics["pope_adversarial_f1"] == pytest.approx(0.808)
    assert len(metrics) == 4 + 3 * 5
    by_sentence = [{"sentence": 0, "responses": 2, "mentions": 4, "hallucinated": 1, "chair_i": 0.25}]
    assert round_metrics(ROWS[0] | {"chair_by_sentence": by_sentence})["chair_i_sentence_1"] == 0.25


def test_config_hash_is_the_run_not_the_invocation():
    base = config_hash(fake_config())
    # rule dpo of round 1 and rule summarize (round=0, step=main) of one pipeline find the same parent run;
    # where and whether to log (tracking.*) is not the experiment either
    assert config_hash(fake_config(round=1, step="dpo", split="gen")) == base
    assert config_hash(fake_config(tracking={"enabled": True, "required": False, "tracking_uri": "http://h:1"})) == base
    assert config_hash(fake_config(seed=1)) != base
    assert config_hash(fake_config("other_exp")) != base
    identity = run_identity(fake_config())
    assert identity.tags == {"method": "apasi", "loss": "sigmoid", "model": "toy_llava", "data": "toy"}
    assert identity.config_hash == base and identity.experiment == "test_exp"
    assert "round" not in identity.params and not any(k.startswith("tracking.") for k in identity.params)
    assert identity.params["train.group12.p126"] == 63.0


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


# --- a real server ------------------------------------------------------------------------------------------------

@pytest.mark.server
def test_log_experiment_to_real_server(mlflow_server, tmp_path, monkeypatch):
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = mlflow_server
    identity = run_identity(fake_config())
    artifacts = fake_artifacts(tmp_path)

    ids = log_experiment(uri, identity, None, ROWS, artifacts, CURVES)

    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("test_exp")
    assert exp is not None and exp.experiment_id == ids["experiment_id"]

    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.run_id == ids["parent_run_id"]
    assert parent.info.status == "FINISHED"
    assert parent.data.tags[CONFIG_TAG] == identity.config_hash == ids["config_hash"]
    assert {k: parent.data.tags[k] for k in identity.tags} == identity.tags  # method, loss, model, data

    children = client.search_runs([exp.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(r.info.run_name for r in children) == ["round_0", "round_1"]
    by_name = {r.info.run_name: r for r in children}

    for row in ROWS:
        child = by_name[f"round_{row['round']}"]
        assert child.info.run_id == ids["rounds"][row["round"]]
        assert child.info.status == "FINISHED"
        assert child.data.tags["round"] == str(row["round"]) and child.data.tags["method"] == "apasi"
        metrics = child.data.metrics  # latest value per key
        for key, value in row["chair"].items():
            assert metrics[key] == pytest.approx(value), key
        for split, values in row["pope"].items():
            for name, value in values.items():
                assert metrics[f"pope_{split}_{name}"] == pytest.approx(value), (split, name)

        child_params = child.data.params
        assert len(child_params) > 100
        assert len(child_params) == len(identity.params) + 2  # + round, model
        assert child_params["round"] == str(row["round"])
        assert child_params["model"] == row["model"]
        assert child_params["train.group12.p126"] == str(126 * 0.5)  # a param beyond the first 100

        listed = client.list_artifacts(child.info.run_id, "eval")
        assert sorted(a.path for a in listed) == ["eval/chair.json", "eval/pope.json"]

    # the users' filters: every run of a loss, one round's runs
    assert len(client.search_runs([exp.experiment_id], "tags.loss = 'sigmoid'")) == 3
    assert [r.info.run_name for r in client.search_runs([exp.experiment_id], "tags.round = '1'")] == ["round_1"]

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


@pytest.mark.server
def test_rerun_updates_the_same_runs(mlflow_server, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    client = MlflowClient(tracking_uri=mlflow_server)
    identity = run_identity(fake_config("rerun_exp"))
    artifacts = fake_artifacts(tmp_path)
    ids = log_experiment(mlflow_server, identity, None, ROWS, artifacts, CURVES)
    run_ids = [ids["parent_run_id"], *ids["rounds"].values()]
    before = run_counts(client, ids["experiment_id"], run_ids)
    assert before[0] == 3

    for _ in range(2):  # summarize rerun twice: the same runs, not one metric point more
        assert log_experiment(mlflow_server, identity, None, ROWS, artifacts, CURVES) == ids
        assert run_counts(client, ids["experiment_id"], run_ids) == before

    # a value that changed (the evaluation redone) is logged again and becomes the latest; still no run added
    changed = [ROWS[0], fake_row(1, (0.37, 0.090, 0.61, 91.25), {s: tuple(v.values()) for s, v in ROWS[1]["pope"].items()})]
    assert log_experiment(mlflow_server, identity, None, changed, artifacts, CURVES) == ids
    assert client.get_run(ids["rounds"][1]).data.metrics["chair_i"] == pytest.approx(0.090)
    assert len(client.search_runs([ids["experiment_id"]])) == 3

    # another config of the same experiment is another parent
    other = run_identity(fake_config("rerun_exp", seed=7))
    assert log_experiment(mlflow_server, other, None, ROWS, artifacts)["parent_run_id"] != ids["parent_run_id"]
    assert len(client.search_runs([ids["experiment_id"]])) == 6


@pytest.fixture
def live_config(tiny_model_dir, tmp_path):
    """Rule dpo's config of round 0, as training_callbacks reads it (tracking_uri set by the test)."""
    def make(uri: str):
        return OmegaConf.create(fake_config("live_exp") | {
            "model": {"name": "toy_llava", "family": "toy", "path": str(tiny_model_dir)},
            "paths": {"experiment_dir": str(tmp_path / "results" / "live_exp")},
            "tracking": {"enabled": True, "required": True, "tracking_uri": uri, "artifact_location": None},
        })
    return make


@pytest.mark.server
@pytest.mark.slow
def test_training_curve_reaches_the_round_run_while_training(mlflow_server, live_config, tiny_model_dir, pairs,
                                                             tmp_path, monkeypatch, one_torch_thread):
    from mlflow import MlflowClient
    from transformers import TrainerCallback

    from halludpo.models import load_model_and_processor
    from halludpo.report import training_curve
    from halludpo.tracking import training_callbacks
    from halludpo.train import compute_reference_logps, train_preference

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    client = MlflowClient(tracking_uri=mlflow_server)
    cfg = live_config(mlflow_server)
    live = training_callbacks(cfg)
    curve = live[0].curve
    seen_in_mlflow = []

    class WatchMlflow(TrainerCallback):
        """After each training log has been sent: how many loss points the round's run holds already."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                seen_in_mlflow.append(len(client.get_metric_history(curve.run_id, "loss")))

    model, processor = load_model_and_processor(tiny_model_dir, "toy")
    rows = compute_reference_logps(model, processor, pairs, 200, 4)
    stats = train_preference(model, processor, rows, tmp_path / "train", TINY_TRAIN | {"batch_size": 2},
                             str(tiny_model_dir), callbacks=[*live, WatchMlflow()])
    steps = stats["steps"]
    assert steps == 4 and seen_in_mlflow == [1, 2, 3, 4]  # each point was in MLflow during training

    child = client.get_run(curve.run_id)
    assert child.info.run_name == "round_0" and child.data.tags["round"] == "0" and child.data.tags["loss"] == "sigmoid"
    assert child.info.status == "FINISHED"
    assert {"loss", "rewards/accuracies", "rewards/margins", "grad_norm"} <= set(child.data.metrics)

    # summarize then finds this child (same config): no run added, the curve not logged twice
    (tmp_path / "train_log.jsonl").write_text("".join(json.dumps(h) + "\n" for h in stats["history"]))
    identity = run_identity(OmegaConf.to_container(cfg, resolve=True))
    rounds = [ROWS[0] | {"model": str(tiny_model_dir)}]
    ids = log_experiment(mlflow_server, identity, None, rounds, {}, {0: training_curve(tmp_path / "train_log.jsonl")})
    assert ids["rounds"][0] == curve.run_id
    assert client.get_run(curve.run_id).data.tags["mlflow.parentRunId"] == ids["parent_run_id"]
    assert len(client.search_runs([ids["experiment_id"]])) == 2
    assert len(client.get_metric_history(curve.run_id, "loss")) == steps

    # dpo of the same round rerun (a retry): the same child again, no point added
    retry = LiveCurve(mlflow_server, identity, None, 0, str(tiny_model_dir))
    for h in stats["history"]:
        retry.log(h["step"], h)
    assert retry.run_id == curve.run_id and len(client.get_metric_history(curve.run_id, "loss")) == steps


# --- a server that is down --------------------------------------------------------------------------------------

def test_training_goes_on_when_tracking_is_down(caplog):
    curve = LiveCurve(dead_uri(), run_identity(fake_config()), None, 0, "model_0")
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="halludpo.tracking"):
        for step in (1, 2, 3):
            curve.log(step, {"loss": 0.5})  # no exception: training must not stop
        curve.finish()
    assert time.monotonic() - start < FAIL_WITHIN
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "not logged live" in warnings[0] and "cannot be reached" in warnings[0]


def test_probe_gives_up_on_a_server_that_does_not_answer(silent_server):
    start = time.monotonic()
    with pytest.raises(TrackingError, match="cannot be reached"):
        probe(silent_server)
    assert time.monotonic() - start < FAIL_WITHIN - 10  # the stage's start-up needs the rest


def write_fake_evaluation(experiment_dir: Path) -> None:
    """round_<k>/eval/{chair,pope}.json of ROWS, with the protocol fields summarize reads."""
    for row in ROWS:
        folder = experiment_dir / f"round_{row['round']}" / "eval"
        folder.mkdir(parents=True)
        chair = {"metrics": row["chair"], "protocol": {"text_pipeline": "offline-lemminflect", "n_images": 20}}
        pope = {"metrics": row["pope"], "protocol": {"image_ids": list(range(8))}}
        (folder / "chair.json").write_text(json.dumps(chair))
        (folder / "pope.json").write_text(json.dumps(pope))


def run_summarize(tmp_path: Path, uri: str, *overrides: str) -> tuple[subprocess.CompletedProcess, list[str], float]:
    """Stage `report` as rule summarize runs it, against uri (MLFLOW_TRACKING_URI, MLflow's HTTP settings left at
    their defaults): (process, the lines it wrote for the user's console, seconds)."""
    results = tmp_path / "results"
    write_fake_evaluation(results / "test_exp")
    read_end, write_end = os.pipe()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_HTTP_REQUEST")}
    env |= {"MLFLOW_TRACKING_URI": uri, "HALLUDPO_CONSOLE_FD": str(write_end),
            "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "halludpo.report", "experiment_name=test_exp", "rounds=1",
           "eval.benchmarks=[chair,pope]",  # write_fake_evaluation's files
           f"paths.results={results}", f"hydra.run.dir={tmp_path / 'hydra'}", *overrides]
    start = time.monotonic()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, pass_fds=(write_end,), timeout=300,
                              cwd=tmp_path)
    finally:
        os.close(write_end)
    seconds = time.monotonic() - start
    with os.fdopen(read_end) as console:
        return proc, console.read().splitlines(), seconds


def stale_runs_file(tmp_path: Path) -> Path:
    """An earlier run's mlflow_runs.json, which summarize must not leave behind."""
    path = tmp_path / "results" / "test_exp" / "mlflow_runs.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"logged": True, "parent_run_id": "0123old", "rounds": {"0": "4567old"}}))
    return path


def test_server_down_fails_summarize_fast_with_one_line(tmp_path):
    runs_file = stale_runs_file(tmp_path)
    uri = dead_uri()
    proc, console, seconds = run_summarize(tmp_path, uri)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert seconds < FAIL_WITHIN, seconds
    assert len(console) == 1, console
    assert uri in console[0] and "cannot be reached" in console[0] and "tracking.required=false" in console[0]
    assert console[0] in proc.stderr  # the rule's log has it too
    assert json.loads(runs_file.read_text())["logged"] is False  # never the earlier run's ids


def test_not_required_says_once_that_nothing_was_logged(tmp_path):
    runs_file = stale_runs_file(tmp_path)
    proc, console, seconds = run_summarize(tmp_path, dead_uri(), "tracking.required=false")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert seconds < FAIL_WITHIN, seconds
    assert len(console) == 1 and NOT_LOGGED in console[0], console
    assert proc.stderr.count(NOT_LOGGED) == 1
    runs = json.loads(runs_file.read_text())
    assert runs["logged"] is False and "cannot be reached" in runs["reason"] and "parent_run_id" not in runs
    summary = json.loads((tmp_path / "results" / "test_exp" / "summary.json").read_text())
    assert [r["round"] for r in summary["rounds"]] == [0, 1]  # the results are there


def test_tracking_disabled_logs_nothing_and_says_so(tmp_path):
    runs_file = stale_runs_file(tmp_path)
    proc, console, _ = run_summarize(tmp_path, dead_uri(), "tracking.enabled=false")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert console == []  # the user chose it: nothing to tell
    assert json.loads(runs_file.read_text()) == {"logged": False, "reason": "tracking.enabled=false"}


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
