"""MMHal-Bench as a stage: its question file, rules mmhal_answers and mmhal_judge on the tiny DAG with a judge that
is a chat-completions test server on 127.0.0.1 (scripted ratings), the judge's cache across reruns, a missing key,
and the summary's MMHal block."""

from __future__ import annotations

import json
import shutil

import pytest

from halludpo.io import InputError
from halludpo.metrics.mmhal import image_file, read_template
from halludpo.report import markdown_table, summary_row
from halludpo.tracking import round_metrics
from tests.conftest import serving
from tests.test_judge import KEY, KEY_ENV, MODEL, ChatTestServer, completion
from tests.test_pipeline import TINY, snakemake
from tests.test_shards import copy_base


def template_record(image_src: str, question: str = "What is in the image?", kind: str = "attribute",
                    gt_answer: str = "There is a circle.") -> dict:
    return {"question_type": kind, "question_topic": "toy", "image_id": image_src.rsplit("/", 1)[-1][:-4],
            "image_src": image_src, "image_content": ["circle", "square"], "question": question,
            "gt_answer": gt_answer, "model_answer": ""}


def test_template_records_and_their_image_files(tmp_path):
    path = tmp_path / "template.json"
    records = [template_record("https://c4.staticflickr.com/8/7211/7206072054_c53d53b97d_o.jpg"),
               template_record("https://example.org/a/b/img%201.png?size=large")]
    path.write_text(json.dumps(records))
    assert read_template(path) == records
    assert [image_file(r) for r in records] == ["7206072054_c53d53b97d_o.jpg", "img%201.png"]


@pytest.mark.parametrize("change, message", [
    (lambda r: r.pop("gt_answer"), "record 2: an MMHal-Bench record needs the fields"),
    (lambda r: r.update(question=" "), "record 2: the question is empty"),
    (lambda r: r.update(image_content="circle"), "record 2: image_content must be a list of words"),
    (lambda r: r.update(image_src="https://example.org/"), "record 2: image_src 'https://example.org/' names no file"),
])
def test_a_bad_record_is_named(tmp_path, change, message):
    records = [template_record("https://example.org/1.png"), template_record("https://example.org/2.png")]
    change(records[1])
    path = tmp_path / "template.json"
    path.write_text(json.dumps(records))
    with pytest.raises(InputError) as error:
        read_template(path)
    assert str(error.value).startswith(f"{path}: ") and message in str(error.value)


def test_a_template_that_is_not_json_names_the_line(tmp_path):
    path = tmp_path / "template.json"
    path.write_text('[\n{"question": 1,\n')
    with pytest.raises(InputError, match=rf"^{path}:3: not JSON"):
        read_template(path)


# --- the rules on the tiny DAG ---------------------------------------------------------------------------------

REPLIES = ["The answer is informative and correct. Rating: 6", "It names a square that is not there. Rating: 2",
           "I cannot decide.", "Mostly right. rating: 4"]  # -> 6, 2, unparsed (0), 4


@pytest.fixture()
def mmhal_workdir(tiny_pipeline, tmp_path, monkeypatch):
    """A workdir with the tiny DAG's world and model_0, and an MMHal-Bench of 4 questions on toy eval images."""
    monkeypatch.setenv(KEY_ENV, KEY)
    for proxy in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(proxy, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    workdir = tmp_path / "run"
    copy_base(tiny_pipeline, workdir)
    eval_images = sorted((workdir / "results/data/toy/eval/images").iterdir())[:4]
    images = tmp_path / "mmhal" / "images"
    images.mkdir(parents=True)
    records = []
    for n, image in enumerate(eval_images):
        shutil.copy(image, images / image.name)
        records.append(template_record(f"https://example.org/openimages/{image.name}",
                                       ["what is in the image ?", "is there a circle in the image ?"][n % 2],
                                       ["attribute", "adversarial"][n % 2], f"The answer of question {n}."))
    template = tmp_path / "mmhal" / "template.json"
    template.write_text(json.dumps(records))
    return workdir, template, images


def mmhal_overrides(template, images, base_url, cache_dir):
    return TINY + ["eval.benchmarks=[mmhal]", f"+data.sources.mmhal.template={template}",
                   f"+data.sources.mmhal.images={images}", "eval.mmhal.max_new_tokens=12", "eval.batch_size=2",
                   f"eval.judge.base_url={base_url}", f"eval.judge.model={MODEL}", f"eval.judge.api_key_env={KEY_ENV}",
                   f"eval.judge.cache_dir={cache_dir}", "eval.judge.max_retries=1", "eval.judge.backoff=0.1"]


@pytest.mark.slow
def test_mmhal_rules_rate_the_answers_with_the_judge_and_cache_them(mmhal_workdir, tmp_path, monkeypatch):
    workdir, template, images = mmhal_workdir
    target = "results/toy_apasi/round_0/eval/mmhal.json"
    with serving(ChatTestServer([(200, completion(reply), {}) for reply in REPLIES])) as server:
        overrides = mmhal_overrides(template, images, server.base_url, tmp_path / "cache")
        run = snakemake(workdir, "--keep-going", target, overrides=overrides)  # a flag ends --config
        assert run.returncode == 0, run.stderr[-3000:]
        assert len(server.requests) == 4
        sent = [r["body"] for r in server.requests]
        assert all(body["model"] == MODEL and body["temperature"] == 0.0 for body in sent)
        assert all(r["auth"] == f"Bearer {KEY}" for r in server.requests)
        answers = [json.loads(line) for line in
                   (workdir / "results/toy_apasi/round_0/eval/shards/mmhal_answers.0-of-1.jsonl").read_text().splitlines()]
        assert [a["id"] for a in answers] == [0, 1, 2, 3]
        # each request carries the record's question and model_k's answer in MMHal-Bench's template
        for body, answer in zip(sent, answers):
            prompt = body["messages"][0]["content"]
            assert f"### Question\n{answer['query']}\n" in prompt and "### Image Contents\ncircle, square\n" in prompt
            assert prompt.endswith(f"### LMM Response to Evaluate\n{answer['response']}\n")
        result = json.loads((workdir / target).read_text())
        m = result["metrics"]
        assert m["average_score"] == pytest.approx((6 + 2 + 0 + 4) / 4) and m["hallucination_rate"] == 0.5
        assert m["n_unparsed"] == 1 and m["per_type"] == {"attribute": (6 + 0) / 2, "adversarial": (2 + 4) / 2}
        assert [item["rating"] for item in result["items"]] == [6, 2, None, 4]
        protocol = result["protocol"]
        assert protocol["judge"]["model"] == MODEL and protocol["estimate"]["calls"] == 4
        assert protocol["estimate"]["cached"] == 0 and protocol["usage"] == {"prompt_tokens": 44,
                                                                             "completion_tokens": 28}
        assert KEY not in (workdir / target).read_text()
        log = (workdir / "results/toy_apasi/logs/mmhal_judge_r0.log").read_text()
        assert f"judge {MODEL}: 4 calls (0 cached, 4 to send)" in log and KEY not in log

        # a rerun sends nothing: every reply comes from the cache
        again = snakemake(workdir, "--keep-going", "--forcerun", "mmhal_judge", target, overrides=overrides)
        assert again.returncode == 0, again.stderr[-3000:]
        assert len(server.requests) == 4
        cached = json.loads((workdir / target).read_text())
        assert all(item["cached"] for item in cached["items"]) and cached["metrics"] == m

    # the summary's block, its table columns and its MLflow metrics
    row = summary_row(0, "model_0", None, None, mmhal_path=workdir / target)
    assert row["mmhal"] == {"average_score": 3.0, "hallucination_rate": 0.5} and row["mmhal_judge"] == MODEL
    assert "| MMHal score (0-6) | MMHal hal rate |" in markdown_table({"experiment": "x", "rounds": [row]})
    assert round_metrics(row) == {"mmhal_average_score": 3.0, "mmhal_hallucination_rate": 0.5}

    # without the key nothing is sent and the judge's rule fails with one line
    monkeypatch.delenv(KEY_ENV)
    with serving(ChatTestServer()) as server:
        overrides = mmhal_overrides(template, images, server.base_url, tmp_path / "empty_cache")
        failed = snakemake(workdir, "--forcerun", "mmhal_judge", target, overrides=overrides)
        assert failed.returncode != 0 and server.requests == []
    log = (workdir / "results/toy_apasi/logs/mmhal_judge_r0.log").read_text()
    assert f"MMHal-Bench judge: no judge API key: environment variable {KEY_ENV} is not set" in log
    assert f"judge {MODEL}: 4 calls (0 cached, 4 to send)" in log  # the estimate came first
