"""Sharded model stages: the partition, the resumable batch log, and the tiny DAG with 1 vs 3 shards (the gathered
files byte for byte the same; a changed shard count reruns nothing that is finished)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from halludpo.shards import (BatchLog, batch_seed, finished_shard_count, input_fingerprint, run_batches, shard_file,
                             shard_files, shard_range)
from halludpo.toyworld import DESCRIBE_PROMPTS
from tests.test_pipeline import ROOT, TINY, job_counts, snakemake


@pytest.mark.parametrize("n_items,batch,shards", [(0, 4, 3), (1, 4, 3), (10, 4, 3), (12, 4, 3), (13, 4, 5),
                                                    (100, 7, 8), (5, 1, 5), (9, 3, 1)])
def test_shards_cover_the_items_in_order_with_whole_batches(n_items, batch, shards):
    ranges = [shard_range(n_items, batch, i, shards) for i in range(shards)]
    assert [p for r in ranges for p in r] == list(range(n_items))  # a partition, in order
    for r in ranges:
        assert r.start % batch == 0  # whole batches: the unsharded run's batches, item for item
        assert r.stop % batch == 0 or r.stop == n_items
    batches = [len(range(r.start, r.stop, batch)) for r in ranges]
    assert max(batches) - min(batches) <= 1  # as even as the batch count allows


def test_shard_range_refuses_a_shard_outside_the_count():
    with pytest.raises(ValueError, match="shard 3 of 3"):
        shard_range(10, 2, 3, 3)


def test_batch_seed_is_the_seed_for_the_first_batch_and_differs_after():
    assert batch_seed(7, 0) == 7
    assert batch_seed(7, 4) == batch_seed(7, 4) != batch_seed(7, 8)
    assert batch_seed(7, 4) != batch_seed(8, 4)


def test_shard_file_names_and_finished_count(tmp_path):
    out = tmp_path / "generate" / "eval.jsonl"
    assert shard_file(out, 1, 3) == tmp_path / "generate" / "shards" / "eval.1-of-3.jsonl"
    assert finished_shard_count(out) is None
    for path in shard_files(out, 3)[:2]:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("")
    assert finished_shard_count(out) is None  # 2 of 3: not a finished set
    shard_files(out, 3)[2].write_text("")
    shard_files(out, 1)[0].write_text("")
    assert finished_shard_count(out) == 3


def test_run_batches_resumes_after_a_cut_line_and_skips_finished_batches(tmp_path):
    out = tmp_path / "shard.jsonl"
    calls = []

    def work(start, stop):
        calls.append(start)
        return [{"i": i} for i in range(start, stop)]

    log = BatchLog(out, "fp")
    log.start({0: [{"i": 0}, {"i": 1}]})
    with open(log.path, "a", encoding="utf-8") as f:
        f.write('{"start": 2, "rows": [{"i": 2}')  # a kill mid-line
    rows = run_batches(out, range(0, 7), 2, work, "fp")
    assert calls == [2, 4, 6]  # batch 0 came from the partial file, the cut batch 2 ran again
    assert rows == [{"i": i} for i in range(7)]
    assert [json.loads(line) for line in out.read_text().splitlines()] == rows
    assert not log.path.exists()  # published: the partial file is gone


def test_a_partial_file_of_another_config_is_not_resumed(tmp_path):
    out = tmp_path / "shard.jsonl"
    BatchLog(out, "old").start({0: [{"i": "stale"}]})
    rows = run_batches(out, range(0, 2), 2, lambda a, b: [{"i": i} for i in range(a, b)], "new")
    assert rows == [{"i": 0}, {"i": 1}]


def test_fingerprint_changes_with_config_and_inputs(tmp_path):
    f = tmp_path / "in.txt"
    f.write_text("a")
    first = input_fingerprint({"x": 1}, [f])
    assert first == input_fingerprint({"x": 1}, [f])
    assert first != input_fingerprint({"x": 2}, [f])
    f.write_text("ab")
    assert first != input_fingerprint({"x": 1}, [f])


# ---------------------------------------------------------------------------------------------------------------
# The tiny DAG, 1 vs 3 shards

SMALL_BATCHES = ["method.generation.batch_size=4", "method.completion.batch_size=2", "eval.batch_size=8",
                 "train.ref_batch_size=2"]
SHARDED = ["parallel.shards.generate=3", "parallel.shards.inject=3", "parallel.shards.reference_logps=3"]
GATHERED = ["round_0/generate/eval.jsonl", "round_0/generate/gen.jsonl", "round_0/pairs/pairs.jsonl",
            "round_0/pairs/pairs_stats.json", "round_0/pairs/ref_logps.jsonl"]


def run_until_reference(workdir, overrides):
    target = "results/toy_apasi/round_0/pairs/ref_logps.jsonl"
    eval_target = "results/toy_apasi/round_0/generate/eval.jsonl"
    result = snakemake(workdir, "--keep-going", target, eval_target, overrides=overrides)  # a flag ends --config
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def copy_base(tiny_pipeline, workdir):
    base, _ = tiny_pipeline
    for shared in ("data", "models"):
        shutil.copytree(base / "results" / shared, workdir / "results" / shared)


@pytest.mark.slow
def test_three_shards_give_the_unsharded_files_byte_for_byte(tiny_pipeline, tmp_path):
    one, three = tmp_path / "one", tmp_path / "three"
    for workdir in (one, three):
        copy_base(tiny_pipeline, workdir)
    run_until_reference(one, TINY + SMALL_BATCHES)
    sharded = run_until_reference(three, TINY + SMALL_BATCHES + SHARDED)
    counts = job_counts(sharded.stderr + sharded.stdout)
    assert counts["generate"] == 6 and counts["inject"] == 3 and counts["reference_logps"] == 3, counts
    exp_one, exp_three = one / "results" / "toy_apasi", three / "results" / "toy_apasi"
    for name in GATHERED:
        assert (exp_one / name).read_bytes() == (exp_three / name).read_bytes(), name
    shard_rows = [len(p.read_text().splitlines()) for p in shard_files(exp_three / "round_0/generate/gen.jsonl", 3)]
    assert sum(shard_rows) == 16 and min(shard_rows) > 0  # 16 images in batches of 4: every shard had work

    # another shard count reruns nothing that is finished
    dry = snakemake(three, "-n", "results/toy_apasi/round_0/pairs/ref_logps.jsonl",
                    "results/toy_apasi/round_0/generate/eval.jsonl",
                    overrides=TINY + SMALL_BATCHES + [s.replace("=3", "=2") for s in SHARDED])
    assert dry.returncode == 0, dry.stderr[-2000:]
    assert "Nothing to be done" in dry.stdout + dry.stderr, (dry.stdout + dry.stderr)[-2000:]


@pytest.mark.slow
def test_a_killed_generate_shard_resumes_from_its_partial_file(tiny_pipeline, tmp_path):
    """The stage run directly, killed (SIGKILL) once its partial file holds finished batches: the rerun takes
    them over (its log says so) and writes the shard file a run without a kill writes."""
    copy_base(tiny_pipeline, tmp_path)
    overrides = TINY + ["method.generation.batch_size=1", "split=gen", "round=0"]
    env = os.environ | {"PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "halludpo.generate", *overrides, "hydra.run.dir=hydra",
               "hydra.job.chdir=false"]
    target = tmp_path / "results/toy_apasi/round_0/generate/shards/gen.0-of-1.jsonl"
    partial = target.with_name(target.name + ".partial")
    killed = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and killed.poll() is None:
        if partial.is_file() and len(partial.read_bytes().splitlines()) >= 4:  # header + 3 batches
            break
        time.sleep(0.01)
    killed.kill()
    killed.wait()
    assert killed.returncode == -signal.SIGKILL and not target.exists()
    done = len([line for line in partial.read_bytes().splitlines() if line.endswith(b"}")]) - 1  # whole lines
    assert 3 <= done < 16

    resumed = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming, {done} of 16 batches already done" in resumed.stderr
    assert not partial.exists()
    kept = target.read_bytes()
    target.unlink()
    fresh = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    assert "resuming" not in fresh.stderr
    assert kept == target.read_bytes() and len(kept.splitlines()) == 16


@pytest.mark.slow
def test_amber_and_object_halbench_answers_in_three_shards_give_the_unsharded_results(tiny_pipeline, tmp_path):
    """rule amber_answers splits AMBER's descriptions and its questions each into whole batches, rule
    object_halbench_answers its descriptions: amber.json, object_halbench.json and the lmms-eval files of 3 shards
    are the unsharded run's byte for byte, and every shard got work."""
    one, three = tmp_path / "one", tmp_path / "three"
    overrides = TINY + ["eval.batch_size=2", "eval.benchmarks=[amber,object_halbench]",  # 8 + 6 descriptions
                        "eval.object_halbench.n_images=6", "eval.object_halbench.max_new_tokens=24"]
    targets = ["results/toy_apasi/round_0/eval/amber.json", "results/toy_apasi/round_0/eval/object_halbench.json"]
    sharded = ["parallel.shards.amber=3", "parallel.shards.object_halbench=3"]
    for workdir, settings in ((one, overrides), (three, overrides + sharded)):
        copy_base(tiny_pipeline, workdir)
        result = snakemake(workdir, "--keep-going", *targets, overrides=settings)  # a flag ends --config
        assert result.returncode == 0, result.stderr[-3000:]
    counts = job_counts(result.stderr + result.stdout)
    assert counts["amber_answers"] == 3 and counts["object_halbench_answers"] == 3, counts
    assert counts["object_halbench_questions"] == 1 and "pope_answers" not in counts and "generate" not in counts
    eval_one, eval_three = (w / "results" / "toy_apasi" / "round_0" / "eval" for w in (one, three))
    for name in ("amber.json", "object_halbench.json", "lmms_eval/results.json", "lmms_eval/samples_amber_g.jsonl",
                 "lmms_eval/samples_amber_d.jsonl"):
        assert (eval_one / name).read_bytes() == (eval_three / name).read_bytes(), name
    for stem, total in (("amber_generative", 8), ("amber_discriminative", None), ("object_halbench_answers", 6)):
        rows = [len(p.read_text().splitlines()) for p in shard_files(eval_three / f"{stem}.jsonl", 3)]
        assert min(rows) > 0 and (total is None or sum(rows) == total), (stem, rows)
    assert list(json.loads((eval_three / "lmms_eval" / "results.json").read_text())["results"]) == ["amber_g",
                                                                                                  "amber_d"]
    # Object HalBench on the toy world: 6 eval images, the toy describe prompts rotated (4 of them: 2, 2, 1, 1)
    objhal = json.loads((eval_three / "object_halbench.json").read_text())
    m, protocol = objhal["metrics"], objhal["protocol"]
    assert m["n_responses"] == 6 and protocol["n_images"] == 6 and objhal["round"] == 0
    assert sorted(protocol["prompts"].values()) == [1, 1, 2, 2] and set(protocol["prompts"]) <= set(DESCRIBE_PROMPTS)
    assert protocol["decoding"] == {"max_new_tokens": 24, "do_sample": False, "num_beams": 3}
    assert protocol["ground_truth"] == "instances" and protocol["questions"].startswith("toy eval split: 6 images")
    # the rates recomputed from the items
    items = objhal["items"]
    mentions = sum(len(i["mentioned"]) for i in items)
    assert m["n_mentions"] == mentions > 0
    assert m["mention_hall"] == pytest.approx(sum(len(i["hallucinated"]) for i in items) / mentions)
    with_objects = [i for i in items if i["mentioned"]]
    assert m["response_hall"] == pytest.approx(sum(bool(i["hallucinated"]) for i in with_objects) / len(with_objects))
