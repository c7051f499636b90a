"""The DAG end to end with a tiny config: real Snakemake, real stages, real MLflow store."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "data.splits.train=200", "data.splits.unlabeled=16", "data.splits.eval=60", "data.world.image_size=32",
    "data.world.min_glyph=8", "data.world.max_glyph=12", "data.world.max_objects=4",
    "model.arch.vision_hidden=32", "model.arch.vision_layers=1", "model.arch.vision_heads=2",
    "model.arch.text_hidden=48", "model.arch.text_layers=2", "model.arch.text_heads=2",
    "model.pretrain.epochs=8", "model.pretrain.batch_size=16", "model.pretrain.lr=3e-3",
    "rounds=1", "train.batch_size=4", "train.max_length=200", "method.generation.max_new_tokens=24",
    "eval.amber.n_images=8", "eval.amber.generative.max_new_tokens=24",
    "eval.chair.n_images=20", "eval.chair.max_new_tokens=24", "eval.pope.n_images=8", "eval.batch_size=16",
]


def snakemake(workdir: Path, *args: str, overrides=TINY) -> subprocess.CompletedProcess:
    cmd = [str(Path(sys.executable).parent / "snakemake"), "-s", str(ROOT / "Snakefile"), "--directory",
           str(workdir), "--cores", "2", "--config", f"overrides=[{','.join(overrides)}]", *args]
    env = os.environ | {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)


@pytest.fixture(scope="module")
def pipeline_dir(tiny_pipeline):
    return tiny_pipeline


@pytest.mark.slow
def test_dry_run_lists_every_rule(pipeline_dir):
    _, dry = pipeline_dir
    for rule in ("render", "pretrain_base", "pope_questions", "amber_questions", "generate", "pope_answers",
                 "amber_answers", "evaluate", "inject", "reference_logps", "dpo", "merge", "summarize", "all"):
        assert f"rule {rule}:" in dry or f"\n{rule} " in dry, rule


@pytest.mark.slow
def test_summary_and_protocol(pipeline_dir):
    workdir, _ = pipeline_dir
    exp = workdir / "results" / "toy_apasi"
    summary = json.loads((exp / "summary.json").read_text())
    assert summary["experiment"] == "toy_apasi"
    row, last = summary["rounds"]
    assert row["round"] == 0 and row["model"].endswith("toy_llava_toy")
    assert last["round"] == 1 and last["model"].endswith("round_0/merged")
    assert row["train"]["pairs"] > 0 and row["train"]["steps"] >= 1
    assert (exp / "rounds.png").stat().st_size > 1000
    assert set(row["chair"]) == {"chair_s", "chair_i", "recall", "len"}
    assert all(0.0 <= row["chair"][k] <= 1.0 for k in ("chair_s", "chair_i", "recall"))
    assert set(row["pope"]) == {"random", "popular", "adversarial"}
    for split in row["pope"].values():
        assert set(split) == {"accuracy", "precision", "recall", "f1", "yes_ratio"}
    chair = json.loads((exp / "round_0" / "eval" / "chair.json").read_text())
    protocol = chair["protocol"]
    assert protocol["n_images"] == 20 == len(protocol["image_ids"]) == len(chair["items"])
    assert protocol["max_new_tokens"] == 24 and protocol["prompt"] == ["Please describe this image in detail."]
    assert protocol["text_pipeline"] in ("offline-lemminflect", "nltk-wordnet") and protocol["versions"]["torch"]
    assert chair["metrics"]["chair_i"] == row["chair"]["chair_i"]
    by_sentence = row["chair_by_sentence"]
    assert by_sentence == chair["metrics"]["by_sentence"] and 0 < by_sentence[0]["responses"] <= 20
    assert sum(s["hallucinated"] for s in by_sentence) == chair["metrics"]["n_hallucinated_mentions"]
    assert "CHAIR_i by sentence position" in (exp / "summary.md").read_text()
    pope = json.loads((exp / "round_0" / "eval" / "pope.json").read_text())
    assert pope["protocol"]["n_questions"] == {"random": 48, "popular": 48, "adversarial": 48}
    assert set(pope["protocol"]["question_files_sha256"]) == {"random", "popular", "adversarial"}
    samples = (exp / "round_0" / "eval" / "pope_samples.jsonl").read_text().splitlines()
    assert len(samples) == 144


@pytest.mark.slow
def test_amber_in_summary_and_its_protocol(pipeline_dir):
    workdir, _ = pipeline_dir
    exp = workdir / "results" / "toy_apasi"
    summary = json.loads((exp / "summary.json").read_text())
    row = summary["rounds"][0]
    assert set(row["amber"]) == {"chair", "cover", "hal", "cog", "accuracy", "f1", "amber_score"}
    assert all(0.0 <= v <= 1.0 for v in row["amber"].values()), row["amber"]
    assert row["n_images"]["amber"] == 8
    amber = json.loads((exp / "round_0" / "eval" / "amber.json").read_text())
    assert amber["benchmark"] == "amber" and amber["round"] == 0
    assert amber["metrics"]["generative"]["chair"] == row["amber"]["chair"]
    assert amber["metrics"]["amber_score"] == row["amber"]["amber_score"]
    protocol = amber["protocol"]
    assert protocol["prompt"] == ["Describe this image."]
    assert protocol["max_new_tokens"] == {"generative": 24, "discriminative": 4}
    assert protocol["decoding"]["discriminative"]["do_sample"] is False
    assert protocol["noun_pipeline"] in ("offline-lemminflect", "nltk-wordnet")
    assert protocol["matcher"]["name"] in ("offline-exact", "spacy", "table")
    assert protocol["answer_rule"].startswith("first-word") and protocol["versions"]["torch"]
    assert set(protocol["files"]) == {"annotations", "relation", "safe_words"}
    assert set(protocol["query_files_sha256"]) == {"query_generative", "query_discriminative"}
    assert protocol["answered"]["generative"] == "8 of 8" and "wording 'toy'" in protocol["questions"]
    assert protocol["model"].endswith("toy_llava_toy")
    md = (exp / "summary.md").read_text()
    assert "AMBER CHAIR" in md.splitlines()[0] and "AMBER score" in md.splitlines()[0]


@pytest.mark.slow
def test_lmms_eval_layout(pipeline_dir):
    workdir, _ = pipeline_dir
    folder = workdir / "results" / "toy_apasi" / "round_1" / "eval" / "lmms_eval"
    results = json.loads((folder / "results.json").read_text())
    tasks = ["pope_random", "pope_pop", "pope_adv", "amber_g", "amber_d"]
    assert list(results["results"]) == tasks
    pope = json.loads((folder.parent / "pope.json").read_text())
    assert results["results"]["pope_adv"]["pope_f1_score,none"] == pytest.approx(pope["metrics"]["adversarial"]["f1"])
    assert results["results"]["pope_random"]["samples"] == 48
    amber = json.loads((folder.parent / "amber.json").read_text())
    assert results["results"]["amber_g"]["amber_chair,none"] == pytest.approx(
        amber["metrics"]["generative"]["chair"] * 100)
    assert results["results"]["amber_d"]["amber_f1,none"] == pytest.approx(
        amber["metrics"]["discriminative"]["overall"]["f1"] * 100)
    assert results["config"]["halludpo"]["round"] == 1 and results["n-shot"]["amber_g"] == 0
    for task in tasks:
        lines = (folder / f"samples_{task}.jsonl").read_text().splitlines()
        assert len(lines) == results["n-samples"][task]["effective"] > 0, task
        assert {"doc_id", "target", "filtered_resps", "doc_hash", "prompt_hash", "input"} <= json.loads(lines[0]).keys()


@pytest.mark.slow
def test_mlflow_store_holds_parent_and_round_child(pipeline_dir):
    from mlflow import MlflowClient

    workdir, _ = pipeline_dir
    ids = json.loads((workdir / "results" / "toy_apasi" / "mlflow_runs.json").read_text())
    client = MlflowClient(tracking_uri=ids["tracking_uri"])
    assert ids["tracking_uri"] == f"sqlite:///{workdir / 'results' / 'mlflow.db'}"
    children = client.search_runs([ids["experiment_id"]],
                                  filter_string=f"tags.mlflow.parentRunId = '{ids['parent_run_id']}'")
    assert sorted(c.info.run_name for c in children) == ["round_0", "round_1"]
    round_0 = next(c for c in children if c.info.run_name == "round_0")
    summary = json.loads((workdir / "results" / "toy_apasi" / "summary.json").read_text())
    metrics = round_0.data.metrics
    assert metrics["chair_i"] == pytest.approx(summary["rounds"][0]["chair"]["chair_i"])
    assert metrics["pope_adversarial_f1"] == pytest.approx(summary["rounds"][0]["pope"]["adversarial"]["f1"])
    assert metrics["amber_cover"] == pytest.approx(summary["rounds"][0]["amber"]["cover"])
    assert round_0.data.params["eval.chair.max_new_tokens"] == "24"
    steps = summary["rounds"][0]["train"]["steps"]
    for name in ("loss", "rewards/accuracies", "rewards/margins"):  # training curves in the same child run
        assert len(client.get_metric_history(round_0.info.run_id, name)) == steps, name


@pytest.mark.slow
def test_second_run_does_nothing(pipeline_dir):
    workdir, _ = pipeline_dir
    again = snakemake(workdir, "-n")
    assert again.returncode == 0
    assert "Nothing to be done" in again.stdout + again.stderr


@pytest.mark.slow
def test_forcerun_evaluate_does_not_retrain(pipeline_dir):
    workdir, _ = pipeline_dir
    plan = snakemake(workdir, "-n", "--forcerun", "evaluate")
    jobs = job_counts(plan.stdout)
    assert jobs == {"evaluate": 2, "summarize": 1, "all": 1}, jobs


@pytest.mark.slow
def test_changed_decoding_setting_reruns_only_downstream(pipeline_dir):
    workdir, _ = pipeline_dir
    plan = snakemake(workdir, "-n", overrides=[*TINY[:-3], "eval.chair.max_new_tokens=20", *TINY[-2:]])
    jobs = job_counts(plan.stdout)
    assert "pretrain_base" not in jobs and "render" not in jobs
    assert {"generate", "evaluate", "summarize"} <= jobs.keys(), jobs


@pytest.mark.slow
def test_changed_dpo_hyperparameter_reruns_only_training_and_after(pipeline_dir):
    workdir, _ = pipeline_dir
    jobs = job_counts(snakemake(workdir, "-n", overrides=[*TINY, "train.beta=0.2"]).stdout)
    assert jobs == {"dpo": 1, "merge": 1, "generate": 1, "gather_generate": 1, "pope_answers": 1, "amber_answers": 1,
                    "evaluate": 1, "summarize": 1, "all": 1}, jobs


@pytest.mark.slow
def test_per_round_schedules_rerun_only_the_round_whose_entry_changed(pipeline_dir):
    workdir, _ = pipeline_dir  # rounds=1: round 0 uses the first entry of method.injection_rates / method.mode
    later = snakemake(workdir, "-n", overrides=[*TINY, "method.injection_rates=[0.4,0.1]", "method.mode=[both,replace]"])
    assert "Nothing to be done" in later.stdout, later.stdout
    first = job_counts(snakemake(workdir, "-n", overrides=[*TINY, "method.mode=[replace,both]"]).stdout)
    assert first.get("inject") == 1 and first.get("dpo") == 1, first


def test_bad_override_is_one_clear_error(tmp_path):
    result = snakemake(tmp_path, "-n", overrides=["train.no_such_key=1"])
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "Could not override 'train.no_such_key'" in output
    assert output.count("Could not override") == 1


def job_counts(stdout: str) -> dict[str, int]:
    """The 'Job stats' table of a dry run -> {rule: count}."""
    lines = stdout.split("Job stats:")[1].splitlines()[3:]
    counts = {}
    for line in lines:
        parts = line.split()
        if len(parts) != 2 or parts[0] == "total":
            break
        counts[parts[0]] = int(parts[1])
    return counts
