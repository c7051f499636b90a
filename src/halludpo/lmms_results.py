"""lmms-eval's results layout (EvolvingLMMs-Lab/lmms-eval) for one round's evaluation: the files a run of
`python -m lmms_eval --log_samples --output_path ...` writes, built from halludpo's own answers and scores.

    <folder>/results.json             {"results": {task: {"alias", "<metric>,none", "<metric>_stderr,none", ...}},
                                       "group_subtasks", "configs", "versions", "n-shot", "higher_is_better",
                                       "n-samples", "config", "task_hashes", "model_name", ...}
    <folder>/samples_<task>.jsonl     one line per document: doc_id, target, filtered_resps, doc_hash, prompt_hash,
                                       target_hash, the per-document value of each metric, input

Keys as lmms-eval's evaluator (`evaluator.evaluate`, `evaluator_utils.consolidate_results`) and its
EvaluationTracker write them: every metric under "<metric>,<filter>" with the filter "none" (generate_until tasks
without filters), its standard error "N/A" (custom aggregations are not bootstrapped); a sample line drops `doc`,
`arguments` and `resps` (equal to `filtered_resps`) as `save_results_samples` does, and every hash is sha256 of
the text (`utils.hash_string`). Tasks and metric names are lmms-eval's where it has the task: `pope_random`,
`pope_pop`, `pope_adv` (pope_accuracy, pope_precision, pope_recall, pope_f1_score, pope_yes_ratio: fractions) and
`amber_g` (amber_chair, amber_cover, amber_hal, amber_cog: percentages, as its aggregations return them).
lmms-eval has no task for AMBER's discriminative questions: `amber_d` here follows amber_g's naming and scale.

What differs from a file lmms-eval writes: no dates, timings or git hash (the same config gives the same bytes;
lmms-eval names its files `<date>_results.json` / `<date>_samples_<task>.jsonl`, here `results.json` /
`samples_<task>.jsonl`); the answers were parsed by halludpo's rules (recorded in each task's config), where
lmms-eval's POPE compares the lower-cased answer with "yes" / "no" as a whole; "pope_yes_ratio" keeps lmms-eval's
meaning (the share of "yes" labels), where pope.json's yes_ratio counts predictions.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from halludpo.io import write_json, write_jsonl

FILTER = "none"  # lmms-eval's filter key of a generate_until task without filters
STDERR = "N/A"   # lmms-eval's standard error of a metric it does not bootstrap
POPE_TASKS = {"random": "pope_random", "popular": "pope_pop", "adversarial": "pope_adv"}
POPE_METRICS = ("pope_accuracy", "pope_precision", "pope_recall", "pope_f1_score", "pope_yes_ratio")
AMBER_G_METRICS = ("amber_chair", "amber_cover", "amber_hal", "amber_cog")
AMBER_G_HIGHER = {"amber_chair": False, "amber_cover": True, "amber_hal": False, "amber_cog": True}
# amber_d: overall, then per dimension (AMBER's discriminative groups), in percent as amber_g
AMBER_D_GROUPS = ("overall", "existence", "attribute", "relation")
AMBER_D_STATS = ("accuracy", "precision", "recall", "f1")
VERSION = "N/A"  # a task version (lmms-eval prints "N/A" for tasks without one)


def hash_string(text: str) -> str:
    """lmms-eval's utils.hash_string: sha256 of the UTF-8 text, hex."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def metric_key(metric: str) -> str:
    return f"{metric},{FILTER}"


@dataclass
class Task:
    """One lmms-eval task: its aggregated metrics, which way each is better, its documents and its config."""

    name: str
    metrics: dict[str, float | None]
    higher_is_better: dict[str, bool]
    samples: list[dict] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)


def sample_line(doc_id: int, doc: Mapping[str, Any], target: Any, prompt: str, response: str,
                per_metric: Mapping[str, Any]) -> dict:
    """A samples_<task>.jsonl line as lmms-eval's EvaluationTracker writes it: the evaluator's example
    (doc_id, doc, target, arguments, resps, filtered_resps, doc_hash, prompt_hash, target_hash, each metric's
    per-document value) with `input` = the prompt, `doc` and `arguments` removed, `resps` removed because it
    equals `filtered_resps`, and `target` as a string."""
    line = {
        "doc_id": doc_id,
        "target": str(target),
        "filtered_resps": [response],
        "doc_hash": hash_string(json.dumps(doc, indent=2, ensure_ascii=False, default=str)),
        "prompt_hash": hash_string(prompt),
        "target_hash": hash_string(str(target)),
    }
    line.update(per_metric)
    line["input"] = prompt
    return line


def results_json(tasks: Sequence[Task], config: Mapping[str, Any], model_name: str) -> dict:
    """results.json's content for the tasks (in their order)."""
    results, hashes = {}, {}
    for task in tasks:
        entry: dict[str, Any] = {"alias": task.name}
        for metric, value in task.metrics.items():
            entry[metric_key(metric)] = value
            entry["samples"] = len(task.samples)
            entry[f"{metric}_stderr,{FILTER}"] = STDERR
        results[task.name] = entry
        hashes[task.name] = hash_string("".join(f"sample_{i}" + s["doc_hash"] for i, s in enumerate(task.samples)))
    names = [task.name for task in tasks]
    return {
        "results": results,
        "group_subtasks": {name: [] for name in reversed(names)},
        "configs": dict(sorted((task.name, {"task": task.name, **task.config}) for task in tasks)),
        "versions": dict(sorted((name, VERSION) for name in names)),
        "n-shot": dict(sorted((name, 0) for name in names)),
        "higher_is_better": dict(sorted((task.name, dict(task.higher_is_better)) for task in tasks)),
        "n-samples": {task.name: {"original": len(task.samples), "effective": len(task.samples)} for task in tasks},
        "config": dict(config),
        "task_hashes": hashes,
        "model_source": "halludpo",
        "model_name": model_name,
        "model_name_sanitized": sanitize_model_name(model_name),
        "system_instruction": None,
        "system_instruction_sha": None,
        "fewshot_as_multiturn": False,
        "chat_template": None,
        "chat_template_sha": None,
    }


def sanitize_model_name(model_name: str) -> str:
    """lmms-eval's utils.sanitize_model_name: the last two path parts, forbidden characters as '__'."""
    parts = model_name.split("/")
    last_two = "/".join(parts[-2:]) if len(parts) > 1 else parts[-1]
    return re.sub(r"[\"<>:/\|\\?\*\[\]]+", "__", last_two)


def write_lmms_eval(folder: str | os.PathLike, tasks: Sequence[Task], config: Mapping[str, Any],
                    model_name: str) -> dict:
    """Write results.json and samples_<task>.jsonl for every task into folder (each atomically); returns the
    results.json content. Task names must be unique."""
    names = [task.name for task in tasks]
    if len(set(names)) != len(names):
        raise ValueError(f"task names repeat: {names}")
    folder = Path(folder)
    for task in tasks:
        write_jsonl(folder / f"samples_{task.name}.jsonl", task.samples)
    content = results_json(tasks, config, model_name)
    write_json(folder / "results.json", content)
    return content


# ---------------------------------------------------------------------------------------------------------------
# POPE


def pope_aggregates(samples: Iterable[Mapping[str, Any]]) -> dict[str, float]:
    """lmms-eval's pope_aggregate_* over the per-document values {score, prediction, ground_truth}: accuracy,
    precision / recall / F1 with "yes" as the positive class, and yes_ratio = the share of "yes" ground truths."""
    rows = list(samples)
    tp = sum(r["ground_truth"] == "yes" and r["prediction"] == "yes" for r in rows)
    fp = sum(r["ground_truth"] == "no" and r["prediction"] == "yes" for r in rows)
    fn = sum(r["ground_truth"] == "yes" and r["prediction"] == "no" for r in rows)
    precision = tp / (tp + fp) if tp + fp else 0
    recall = tp / (tp + fn) if tp + fn else 0
    yes = sum(r["ground_truth"] == "yes" for r in rows)
    no = sum(r["ground_truth"] == "no" for r in rows)
    return {
        "pope_accuracy": sum(r["score"] for r in rows) / len(rows) if rows else 0,
        "pope_precision": precision,
        "pope_recall": recall,
        "pope_f1_score": 2 * precision * recall / (precision + recall) if precision + recall else 0,
        "pope_yes_ratio": yes / (yes + no) if yes + no else 0,
    }


def pope_tasks(samples: Sequence[Mapping[str, Any]], decoding: Mapping[str, Any], parsing: str) -> list[Task]:
    """One task per POPE split from pope_samples.jsonl's rows (question_id, text, label, answer, prediction,
    split), in the order the splits first appear. The prompt is the question as the model got it."""
    splits = list(dict.fromkeys(row["split"] for row in samples))
    tasks = []
    for split in splits:
        rows = [row for row in samples if row["split"] == split]
        name = POPE_TASKS.get(split, f"pope_{split}")
        lines, values = [], []
        for doc_id, row in enumerate(rows):
            value = {"question_id": row["question_id"], "score": float(row["prediction"] == row["label"]),
                     "prediction": row["prediction"], "ground_truth": row["label"]}
            values.append(value)
            doc = {key: row[key] for key in ("question_id", "image_id", "file_name", "object", "text", "label")
                   if key in row}
            lines.append(sample_line(doc_id, doc, row["label"], row["text"], row["answer"],
                                     {metric: value for metric in POPE_METRICS}))
        config = {"output_type": "generate_until", "test_split": split, "doc_to_target": "answer",
                  "generation_kwargs": {**decoding, "until": []},
                  "metric_list": [{"metric": m, "higher_is_better": True} for m in POPE_METRICS],
                  "halludpo": {"answer_parsing": parsing, "prompt": "the question alone (no post_prompt)"}}
        tasks.append(Task(name, pope_aggregates(values), {m: True for m in POPE_METRICS}, lines, config))
    return tasks


# ---------------------------------------------------------------------------------------------------------------
# AMBER


def amber_g_values(item: Mapping[str, Any]) -> dict[str, int]:
    """One scored description (halludpo.metrics.amber item) as the counters of AMBER's metrics.txt that
    lmms-eval's amber_g keeps per document."""
    return {
        "chair_score": len(item["hallucinated"]), "chair_num": len(item["nouns"]),
        "safe_cover_score": sum(item["truth_covered"]), "safe_cover_num": len(item["truth"]),
        "hallu_cover_score": sum(item["hallu_mentioned"]), "hallu_cover_num": len(item["hallu"]),
        "non_hallu_score": int(not item["hallucinated"]), "non_hallu_num": 1,
    }


def amber_g_aggregates(values: Sequence[Mapping[str, int]]) -> dict[str, float]:
    """lmms-eval's amber_g_aggregate_*: percentages from the summed counters (0.0 when a denominator is 0)."""
    def total(key: str) -> int:
        return sum(v[key] for v in values)

    def percent(score: str, num: str) -> float:
        return total(score) / total(num) * 100 if total(num) else 0.0

    hal = 100 - total("non_hallu_score") / total("non_hallu_num") * 100 if total("non_hallu_num") else 0.0
    return {"amber_chair": percent("chair_score", "chair_num"), "amber_cover": percent("safe_cover_score",
            "safe_cover_num"), "amber_hal": hal, "amber_cog": percent("hallu_cover_score", "hallu_cover_num")}


def amber_tasks(amber: Mapping[str, Any], generative: Sequence[Mapping[str, Any]],
                discriminative: Sequence[Mapping[str, Any]], decoding: Mapping[str, Mapping[str, Any]]) -> list[Task]:
    """amber_g and amber_d from amber.json's content (metrics, items) and the responses (id, image, query,
    response) of each task; decoding = {"generative": ..., "discriminative": ...}."""
    tasks = []
    items = amber["items"]
    if generative is not None:
        by_id = {item["id"]: item for item in items["generative"]}
        lines, values = [], []
        for doc_id, row in enumerate(generative):
            item = by_id[row["id"]]
            value = amber_g_values(item)
            values.append(value)
            doc = {"question_id": row["id"], "image": row["image"], "truth": item["truth"], "hallu": item["hallu"]}
            lines.append(sample_line(doc_id, doc, item["truth"], row["query"], row["response"],
                                     {metric: value for metric in AMBER_G_METRICS}))
        config = {"output_type": "generate_until", "doc_to_target": "truth",
                  "generation_kwargs": {**decoding["generative"], "until": []},
                  "metric_list": [{"metric": m, "higher_is_better": AMBER_G_HIGHER[m]} for m in AMBER_G_METRICS],
                  "halludpo": {k: amber["protocol"][k] for k in ("noun_pipeline", "matcher") if k in amber["protocol"]}}
        tasks.append(Task("amber_g", amber_g_aggregates(values), dict(AMBER_G_HIGHER), lines, config))
    if discriminative is not None:
        by_id = {item["id"]: item for item in items["discriminative"]}
        metrics: dict[str, float | None] = {}
        groups = amber["metrics"]["discriminative"] or {}
        for group in AMBER_D_GROUPS:
            if group in groups:
                prefix = "amber" if group == "overall" else f"amber_{group}"
                metrics |= {f"{prefix}_{stat}": groups[group][stat] * 100 for stat in AMBER_D_STATS}
        score = amber["metrics"].get("amber_score")
        metrics["amber_score"] = None if score is None else score * 100
        lines = []
        for doc_id, row in enumerate(discriminative):
            item = by_id[row["id"]]
            value = {"question_id": row["id"], "dimension": item["dimension"], "kind": item["kind"],
                     "prediction": item["answer"], "ground_truth": item["truth"], "score": float(item["correct"])}
            doc = {"question_id": row["id"], "image": row["image"], "query": row["query"], "truth": item["truth"]}
            lines.append(sample_line(doc_id, doc, item["truth"], row["query"], row["response"],
                                     {metric: value for metric in metrics}))
        config = {"output_type": "generate_until", "doc_to_target": "truth",
                  "generation_kwargs": {**decoding["discriminative"], "until": []},
                  "metric_list": [{"metric": m, "higher_is_better": True} for m in metrics],
                  "halludpo": {"answer_rule": amber["protocol"]["answer_rule"],
                               "positive_class": "no (AMBER's precision, recall and F1)",
                               "note": "not an lmms-eval task: named after amber_g, percentages as amber_g"}}
        tasks.append(Task("amber_d", metrics, {m: True for m in metrics}, lines, config))
    return tasks
