"""Snakemake's HTML report of the tiny DAG (conftest's tiny_pipeline, run once per session): one self-contained file
holding the rounds plot, the summary tables (CHAIR by sentence position included), the training curves, every
round's eval files (CHAIR, POPE, AMBER, lmms-eval's results.json) and the resolved config, each with its caption,
and the workflow page."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pytest
import yaml

from tests.test_pipeline import TINY, snakemake

EXP = "results/toy_apasi"
SUMMARY = {f"{EXP}/{name}" for name in ("rounds.png", "summary.md", "summary.json")}
TRAINING = {f"{EXP}/round_0/train/training_curves.png"}  # TINY: rounds=1, so one trained round
EVALUATION = {f"{EXP}/round_{k}/eval/{name}" for k in (0, 1)
              for name in ("chair.json", "pope.json", "pope_samples.jsonl", "amber.json", "lmms_eval/results.json")}
CONFIG = {f"{EXP}/resolved_config.yaml"}


def embedded(html: str, script_id: str):
    """The JSON that the report's <script id=script_id> assigns (`var <name> = ...;`)."""
    match = re.search(rf'<script id="{script_id}">\s*var \w+ = (.*?);\s*</script>', html, re.S)
    assert match, f"no <script id={script_id!r}> in the report"
    return json.loads(match.group(1))


def decoded(data_uri: str) -> bytes:
    assert data_uri.startswith("data:"), data_uri[:80]
    return base64.b64decode(data_uri.rsplit(";base64,", 1)[1])


@pytest.fixture(scope="module")
def report(tiny_pipeline, tmp_path_factory):
    """(workdir, the report's HTML, its embedded results) of `snakemake --report` on the finished tiny DAG. The file
    goes outside the workdir, whose files other tests compare with another run's."""
    workdir, _ = tiny_pipeline
    out = tmp_path_factory.mktemp("report") / "report.html"
    result = snakemake(workdir, "--report", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    html = out.read_text(encoding="utf-8")
    return workdir, html, embedded(html, "results")


@pytest.mark.slow
def test_report_holds_every_result_in_its_category(report):
    _, html, results = report
    assert set(results) == SUMMARY | TRAINING | EVALUATION | CONFIG
    categories = embedded(html, "categories")
    assert set(categories) == {"Summary", "Training", "Evaluation", "Configuration"}
    assert set(categories["Summary"]["Other"]) == SUMMARY
    assert categories["Training"] == {"round 0": sorted(TRAINING)}
    assert set(categories["Evaluation"]) == {"round 0", "round 1"}
    for k in (0, 1):
        assert set(categories["Evaluation"][f"round {k}"]) == {p for p in EVALUATION if f"/round_{k}/" in p}
    assert set(categories["Configuration"]["Other"]) == CONFIG
    assert {results[p]["job_properties"]["rule"] for p in EVALUATION} == {"evaluate"}
    assert {results[p]["job_properties"]["rule"] for p in SUMMARY | TRAINING | CONFIG} == {"summarize"}


@pytest.mark.slow
def test_report_is_self_contained(report):
    workdir, html, results = report
    for path, entry in results.items():  # every file embedded byte for byte, none linked
        assert decoded(entry["data_uri"]) == (workdir / path).read_bytes(), path
    for path in ({f"{EXP}/rounds.png"} | TRAINING):
        assert results[path]["mime_type"] == "image/png"
        assert decoded(results[path]["data_uri"]).startswith(b"\x89PNG"), path
    assert not re.search(r"<(script|img|link)\b[^>]*\b(src|href)=\"https?:", html)


@pytest.mark.slow
def test_captions_describe_each_result(report):
    workdir, _, results = report
    for path, entry in results.items():
        assert entry["caption"].strip() and "System Message" not in entry["caption"], path
    table = results[f"{EXP}/summary.md"]["caption"]  # the tables themselves, CHAIR_i by sentence position included
    assert "CHAIR_i by sentence position" in table
    for line in (workdir / EXP / "summary.md").read_text().splitlines():
        if line.startswith("| 1 |"):
            assert line in table
    assert "sentence 1" in table
    assert "reward margin" in results[next(iter(TRAINING))]["caption"]
    assert "rounds: 1" in results[next(iter(CONFIG))]["caption"]
    for k in (0, 1):  # the caption names the round's model through the rule's wildcards
        assert f"model_{k}</tt>" in results[f"{EXP}/round_{k}/eval/chair.json"]["caption"]
        assert "POPE" in results[f"{EXP}/round_{k}/eval/pope.json"]["caption"]


@pytest.mark.slow
def test_workflow_page(report):
    _, html, _ = report
    page = embedded(html, "workflow-desc")
    assert "halludpo: one experiment, round by round" in page
    assert "rounds=1" in page  # the --config overrides the report was made with
    assert "System Message" not in page


@pytest.mark.slow
def test_training_curves_and_resolved_config(report):
    from halludpo.config import compose, to_plain
    from halludpo.report import PER_INVOCATION_KEYS, training_curve

    workdir, _, _ = report
    curve = training_curve(workdir / EXP / "round_0" / "train" / "train_log.jsonl")
    assert [r for r in curve if "loss" in r and "rewards/margins" in r and "rewards/accuracies" in r]
    assert (workdir / next(iter(TRAINING))).stat().st_size > 10_000  # three panels with their lines
    resolved = yaml.safe_load((workdir / EXP / "resolved_config.yaml").read_text())
    expected = {k: v for k, v in to_plain(compose(TINY)).items() if k not in PER_INVOCATION_KEYS}
    assert resolved == expected


def test_training_curve_plot_without_training_log(tmp_path):
    from halludpo.report import plot_training_curve

    out = tmp_path / "curves.png"
    plot_training_curve([{"train_loss": 0.5, "step": 4}], "round 0", out)  # the Trainer's totals only: no points
    assert out.read_bytes().startswith(b"\x89PNG")
