"""lmms-eval's results layout (halludpo.lmms_results): results.json keyed by task with "<metric>,none" entries and
one samples_<task>.jsonl per task, the keys lmms-eval's evaluator and EvaluationTracker write."""

import hashlib
import json

import pytest

from halludpo.lmms_results import (
    Task,
    amber_tasks,
    hash_string,
    pope_aggregates,
    pope_tasks,
    sanitize_model_name,
    write_lmms_eval,
)
from halludpo.metrics.amber import load_amber, load_queries, score_amber
from halludpo.toyworld import write_amber_split
from tests.test_toyworld_amber import IMAGES, _world

DECODING = {"max_new_tokens": 4, "do_sample": False, "num_beams": 1}

# pope_samples.jsonl rows: random 4 questions (tp 1, fp 1, tn 1, fn 1), adversarial 2 (both right)
POPE_SAMPLES = [
    {"question_id": 1, "image_id": 7, "file_name": "a.png", "object": "dog", "label": "yes",
     "text": "Is there a dog in the image?", "split": "random", "answer": "yes .", "prediction": "yes"},
    {"question_id": 2, "image_id": 7, "file_name": "a.png", "object": "cat", "label": "no",
     "text": "Is there a cat in the image?", "split": "random", "answer": "yes .", "prediction": "yes"},
    {"question_id": 3, "image_id": 8, "file_name": "b.png", "object": "cup", "label": "no",
     "text": "Is there a cup in the image?", "split": "random", "answer": "no .", "prediction": "no"},
    {"question_id": 4, "image_id": 8, "file_name": "b.png", "object": "fork", "label": "yes",
     "text": "Is there a fork in the image?", "split": "random", "answer": "no", "prediction": "no"},
    {"question_id": 1, "image_id": 7, "file_name": "a.png", "object": "dog", "label": "yes",
     "text": "Is there a dog in the image?", "split": "adversarial", "answer": "yes .", "prediction": "yes"},
    {"question_id": 2, "image_id": 7, "file_name": "a.png", "object": "bone", "label": "no",
     "text": "Is there a bone in the image?", "split": "adversarial", "answer": "no .", "prediction": "no"},
]


def test_pope_tasks_and_files(tmp_path):
    tasks = pope_tasks(POPE_SAMPLES, DECODING, "pope (POPE's rule)")
    assert [t.name for t in tasks] == ["pope_random", "pope_adv"]
    assert tasks[0].metrics == {"pope_accuracy": 0.5, "pope_precision": 0.5, "pope_recall": 0.5,
                                "pope_f1_score": 0.5, "pope_yes_ratio": 0.5}
    assert tasks[1].metrics["pope_accuracy"] == 1.0 and tasks[1].metrics["pope_f1_score"] == 1.0
    config = {"model": "toy", "model_args": "pretrained=results/models/toy_llava_toy", "batch_size": 16}
    content = write_lmms_eval(tmp_path, tasks, config, "results/models/toy_llava_toy")
    assert json.loads((tmp_path / "results.json").read_text()) == content
    random = content["results"]["pope_random"]
    assert random["alias"] == "pope_random" and random["samples"] == 4
    assert random["pope_f1_score,none"] == 0.5 and random["pope_f1_score_stderr,none"] == "N/A"
    assert set(random) == {"alias", "samples"} | {f"pope_{m}{s},none" for m in
                                                 ("accuracy", "precision", "recall", "f1_score", "yes_ratio")
                                                 for s in ("", "_stderr")}
    assert content["n-samples"] == {"pope_random": {"original": 4, "effective": 4},
                                    "pope_adv": {"original": 2, "effective": 2}}
    assert content["n-shot"] == {"pope_adv": 0, "pope_random": 0}
    assert content["higher_is_better"]["pope_adv"]["pope_yes_ratio"] is True
    assert content["configs"]["pope_random"]["task"] == "pope_random"
    assert content["configs"]["pope_random"]["generation_kwargs"] == DECODING | {"until": []}
    assert content["config"] == config and content["model_name_sanitized"] == "models__toy_llava_toy"
    assert content["group_subtasks"] == {"pope_adv": [], "pope_random": []}
    lines = [json.loads(line) for line in (tmp_path / "samples_pope_random.jsonl").read_text().splitlines()]
    assert len(lines) == 4
    first = lines[0]
    assert list(first) == ["doc_id", "target", "filtered_resps", "doc_hash", "prompt_hash", "target_hash",
                           "pope_accuracy", "pope_precision", "pope_recall", "pope_f1_score", "pope_yes_ratio",
                           "input"]
    assert first["doc_id"] == 0 and first["target"] == "yes" and first["filtered_resps"] == ["yes ."]
    assert first["input"] == "Is there a dog in the image?"
    assert first["prompt_hash"] == hashlib.sha256(b"Is there a dog in the image?").hexdigest()
    assert first["target_hash"] == hash_string("yes")
    doc = {k: POPE_SAMPLES[0][k] for k in ("question_id", "image_id", "file_name", "object", "text", "label")}
    assert first["doc_hash"] == hash_string(json.dumps(doc, indent=2, ensure_ascii=False))
    assert first["pope_f1_score"] == {"question_id": 1, "score": 1.0, "prediction": "yes", "ground_truth": "yes"}
    expected = hash_string("".join(f"sample_{i}" + line["doc_hash"] for i, line in enumerate(lines)))
    assert content["task_hashes"]["pope_random"] == expected


def test_pope_yes_ratio_counts_labels_as_lmms_eval():
    values = [{"score": 0.0, "prediction": "yes", "ground_truth": "no"},
              {"score": 0.0, "prediction": "yes", "ground_truth": "no"},
              {"score": 1.0, "prediction": "yes", "ground_truth": "yes"}]
    aggregates = pope_aggregates(values)
    assert aggregates["pope_yes_ratio"] == pytest.approx(1 / 3)       # labels, not predictions (3 of 3 yes)
    assert aggregates["pope_precision"] == pytest.approx(1 / 3) and aggregates["pope_recall"] == 1.0
    assert aggregates["pope_f1_score"] == pytest.approx(0.5)


def test_amber_tasks(tmp_path):
    out = tmp_path / "amber"
    write_amber_split(_world(tmp_path / "world", IMAGES), out)
    data = load_amber(out)
    generative = [q | {"response": r} for q, r in zip(load_queries(out / "query_generative.json"),
                                                       ["A fork, a knife and a spoon.", "A fork.", "A dog."])]
    discriminative = [q | {"response": "No"} for q in load_queries(out / "query_discriminative.json")]
    records = [{"id": r["id"], "response": r["response"]} for r in generative + discriminative]
    amber = score_amber(records, data, nouns="offline", matcher="offline")
    tasks = amber_tasks(amber, generative, discriminative,
                        {"generative": DECODING | {"max_new_tokens": 64}, "discriminative": DECODING})
    g, d = tasks
    assert (g.name, d.name) == ("amber_g", "amber_d")
    m = amber["metrics"]["generative"]
    # nouns: fork knife spoon | fork | dog; spoon hallucinated: CHAIR 1/5; Cover (2 + 1 + 1) / 6; Hal 1/3;
    # Cog: spoon of image 1's hallu [spoon], image 2's [cup, knife] none: 1/3
    assert g.metrics == pytest.approx({"amber_chair": 20.0, "amber_cover": 400 / 6, "amber_hal": 100 / 3,
                                       "amber_cog": 100 / 3})
    assert g.metrics["amber_chair"] == pytest.approx(m["chair"] * 100)
    assert g.higher_is_better == {"amber_chair": False, "amber_cover": True, "amber_hal": False, "amber_cog": True}
    assert g.samples[0]["amber_chair"] == {"chair_score": 1, "chair_num": 3, "safe_cover_score": 2,
                                           "safe_cover_num": 3, "hallu_cover_score": 1, "hallu_cover_num": 1,
                                           "non_hallu_score": 0, "non_hallu_num": 1}
    assert g.samples[0]["target"] == "['fork', 'knife', 'cup']" and g.samples[0]["input"] == "Describe this image."
    overall = amber["metrics"]["discriminative"]["overall"]
    assert d.metrics["amber_accuracy"] == pytest.approx(overall["accuracy"] * 100)
    assert d.metrics["amber_f1"] == pytest.approx(overall["f1"] * 100)
    assert {"amber_existence_f1", "amber_attribute_f1", "amber_relation_f1"} <= set(d.metrics)
    assert d.metrics["amber_score"] == pytest.approx(amber["metrics"]["amber_score"] * 100)
    assert len(d.samples) == len(discriminative) and d.samples[0]["filtered_resps"] == ["No"]
    content = write_lmms_eval(tmp_path / "lmms", tasks, {}, "m")
    assert content["results"]["amber_g"]["amber_cog,none"] == pytest.approx(100 / 3)
    assert (tmp_path / "lmms" / "samples_amber_d.jsonl").read_text().count("\n") == len(discriminative)


def test_repeated_task_names_are_refused(tmp_path):
    task = Task("pope_random", {"pope_accuracy": 1.0}, {"pope_accuracy": True})
    with pytest.raises(ValueError, match="repeat"):
        write_lmms_eval(tmp_path, [task, task], {}, "m")
    assert sanitize_model_name("llava-hf/llava-1.5-7b-hf") == "llava-hf__llava-1.5-7b-hf"
