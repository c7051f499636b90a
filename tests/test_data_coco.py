"""Rule prepare (halludpo.data.prepare_coco): COCO splits, vocabulary and POPE files from the downloaded files.

Every input is a tiny local fixture in the downloads' layout (configs/data/coco.yaml `sources`): a few COCO-format
val2014 instances and captions with PIL-made images, a 3-entry detail-23k, a 2-line OPERA list, tiny POPE files.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from halludpo import paths
from halludpo.config import compose
from halludpo.data import (
    LAYOUT,
    prepare_coco,
    read_detail_23k,
    read_image_list,
    read_pope_file,
    run,
    warn_prompt_mismatch,
)
from halludpo.evaluate import QUESTION_FIELDS, chair_scorer
from halludpo.generate import select_images
from halludpo.io import InputError, read_json, read_jsonl
from halludpo.metrics.chair import coco_synonyms_path, ground_truth_from_coco

CATEGORIES = [{"id": 1, "name": "person", "supercategory": "person"},
              {"id": 17, "name": "cat", "supercategory": "animal"},
              {"id": 18, "name": "dog", "supercategory": "animal"},
              {"id": 67, "name": "dining table", "supercategory": "furniture"}]
VAL_OBJECTS = {1: [1, 18], 2: [17], 3: [1, 67, 18], 4: [17, 67]}   # image id -> category ids
DETAIL = [("000000000011.jpg", "<image>\nWhat is this photo about?"),
          ("000000000012.jpg", "Explain the visual content of the image in great detail.\n<image>"),
          ("000000000013.jpg", "<image>\nWhat is this photo about?")]
POPE = {  # split -> (image id, object, label)
    "random": [(3, "person", "yes"), (3, "cat", "no"), (1, "dog", "yes"), (1, "dining table", "no")],
    "popular": [(3, "dog", "yes"), (3, "cat", "no")],
    "adversarial": [(1, "person", "yes"), (1, "cat", "no")],
}


def val_name(image_id: int) -> str:
    return f"COCO_val2014_{image_id:012d}.jpg"


def write_lines(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def image(path: Path, size=(40, 30), colour=(200, 30, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


@pytest.fixture()
def downloads(tmp_path) -> Path:
    """download.root with the files of coco2014_val, coco2017_train, llava_detail_23k, opera_chair500, pope_coco."""
    root = tmp_path / "downloads"
    images, annotations, captions = [], [], []
    for image_id, cats in VAL_OBJECTS.items():
        images.append({"id": image_id, "file_name": val_name(image_id), "width": 40, "height": 30})
        image(root / "coco" / "val2014" / val_name(image_id), colour=(image_id * 40, 20, 20))
        for cat in cats:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": cat,
                                "bbox": [1, 1, 10, 10], "area": 100, "iscrowd": 0})
        captions.append({"id": 100 + image_id, "image_id": image_id, "caption": f"A photo with a bowl {image_id}."})
    ann = root / "coco" / "annotations"
    ann.mkdir(parents=True)
    (ann / "instances_val2014.json").write_text(json.dumps(
        {"info": {}, "images": images, "annotations": annotations, "categories": CATEGORIES}))
    (ann / "captions_val2014.json").write_text(json.dumps({"info": {}, "images": images, "annotations": captions}))
    for i, (name, _) in enumerate(DETAIL):
        image(root / "coco" / "train2017" / name, size=(50 + i, 20))
    detail = [{"id": name[:-4], "image": name, "conversations": [{"from": "human", "value": prompt},
                                                                 {"from": "gpt", "value": "A description."}]}
              for name, prompt in DETAIL]
    (root / "llava").mkdir()
    (root / "llava" / "detail_23k.json").write_text(json.dumps(detail, indent=2))
    write_lines(root / "chair" / "opera_chair500_llava-1.5_greedy.jsonl",
                [{"image_id": 3, "caption": "A man at a table."}, {"image_id": 1, "caption": "A dog."}])
    for split, rows in POPE.items():
        write_lines(root / "pope" / f"coco_pope_{split}.json",
                    [{"question_id": i + 1, "image": val_name(img), "label": label,
                      "text": f"Is there {'an' if obj[0] in 'aeiou' else 'a'} {obj} in the image?"}
                     for i, (img, obj, label) in enumerate(rows)])
    return root


def sources(root: Path) -> dict:
    return {"instances": root / "coco/annotations/instances_val2014.json",
            "captions": root / "coco/annotations/captions_val2014.json",
            "detail_23k": root / "llava/detail_23k.json",
            "chair_image_list": root / "chair/opera_chair500_llava-1.5_greedy.jsonl",
            "pope": {s: root / f"pope/coco_pope_{s}.json" for s in POPE}}


def prepare(root: Path, out: Path, splits=tuple(POPE)) -> dict:
    return prepare_coco(out, sources(root), root / "coco/train2017", root / "coco/val2014", list(splits))


def test_prepare_writes_the_data_contract(downloads, tmp_path):
    out = tmp_path / "data" / "coco"
    stats = prepare(downloads, out)
    assert not out.with_name("coco.tmp").exists()

    gen = read_json(out / LAYOUT["gen_instances"])
    assert [im["id"] for im in gen["images"]] == [11, 12, 13] and gen["annotations"] == []
    assert gen["images"][1] == {"id": 12, "file_name": "000000000012.jpg", "width": 51, "height": 20,
                                "prompt": "Explain the visual content of the image in great detail."}
    assert read_json(out / "gen" / "prompts.json") == [
        {"prompt": "What is this photo about?", "images": 2},
        {"prompt": "Explain the visual content of the image in great detail.", "images": 1}]

    inst = read_json(out / LAYOUT["eval_instances"])
    assert [im["id"] for im in inst["images"]] == [3, 1]          # OPERA's order
    assert sorted(a["image_id"] for a in inst["annotations"]) == [1, 1, 3, 3, 3]
    assert len(inst["categories"]) == 4
    caps = read_json(out / LAYOUT["eval_captions"])
    assert sorted(a["image_id"] for a in caps["annotations"]) == [1, 3]
    assert read_json(out / "chair_image_ids.json") == [3, 1]
    assert (out / "vocabulary.txt").read_text() == coco_synonyms_path().read_text()

    random_rows = read_jsonl(out / "pope" / "random.jsonl", required=QUESTION_FIELDS)
    assert random_rows[3] == {"question_id": 4, "image_id": 1, "file_name": val_name(1), "object": "dining table",
                              "label": "no", "text": "Is there a dining table in the image?"}
    assert stats["pope"]["random"] == {"questions": 4, "images": 2, "yes": 2}
    assert stats["eval"] == {"images": 2, "annotations": 5, "captions": 2, "categories": 4}
    assert read_json(out / "prepared.json")["gen"] == {"images": 3, "prompts": 2}


def test_the_stages_read_what_prepare_writes(downloads, tmp_path):
    """generate's image selection (OPERA's id list), CHAIR's ground truth (instances + captions), COCO compounds."""
    out = tmp_path / "coco"
    prepare(downloads, out)
    chosen = select_images(out / "eval/instances.json", 500, 0, out / "chair_image_ids.json")
    assert [im["id"] for im in chosen] == [3, 1]
    scorer = chair_scorer(out / "vocabulary.txt", "coco", "offline")
    truth = ground_truth_from_coco(out / "eval/instances.json", out / "eval/captions.json", scorer)
    assert truth[3] == {"person", "dining table", "dog", "bowl"} and truth[1] == {"person", "dog", "bowl"}


def test_generation_can_use_each_images_own_detail_23k_prompt(downloads, tmp_path, tiny_model_dir):
    """method.generation.prompts=image: generate asks each gen image with its own prompt from prepare's
    instances (the real tiny toy model describes the fixture's COCO images); an image without one is refused."""
    from halludpo.generate import IMAGE_PROMPTS, describe_images
    from halludpo.io import InputError
    from halludpo.models import load_model_and_processor

    out = tmp_path / "coco"
    prepare(downloads, out)
    images = read_json(out / LAYOUT["gen_instances"])["images"]
    model, processor = load_model_and_processor(tiny_model_dir, "toy")
    rows = describe_images(model, processor, images, downloads / "coco/train2017", IMAGE_PROMPTS,
                           {"do_sample": False}, 4, 2, 0, "toy", 0)
    assert [r["prompt"] for r in rows] == [im["prompt"] for im in images]
    assert rows[1]["prompt"] == "Explain the visual content of the image in great detail."
    assert all(isinstance(r["response"], str) for r in rows)
    with pytest.raises(InputError, match="no `prompt`"):
        describe_images(model, processor, [{k: v for k, v in images[0].items() if k != "prompt"}],
                        downloads / "coco/train2017", IMAGE_PROMPTS, {"do_sample": False}, 4, 2, 0, "toy", 0)


def test_the_hydra_stage_writes_the_configured_files(downloads, tmp_path, caplog):
    cfg = compose(["experiment=apasi_llava15_7b", f"paths.results={tmp_path}/results", f"download.root={downloads}"])
    run(cfg)
    for key in ("gen_instances", "eval_instances", "eval_captions", "vocabulary"):
        assert Path(cfg.data[key]).is_file(), key
    assert paths.data_done(cfg).is_file() and paths.chair_image_ids(cfg).is_file()
    assert all(paths.pope_questions(cfg, s).is_file() for s in cfg.eval.pope.splits)
    assert cfg.eval.chair.image_ids_file == str(paths.chair_image_ids(cfg))
    # each image's own prompt: nothing to compare; a configured list that is not detail-23k's set is reported
    assert not any("detail-23k entry uses" in r.getMessage() for r in caplog.records)


def test_prompt_mismatch_warnings():
    assert warn_prompt_mismatch(compose(["experiment=apasi_llava15_7b"]), ["What is this photo about?"]) == []
    configured = ["What is this photo about?", "Explain the visual content of the image in great detail."]
    cfg = compose(["experiment=apasi_llava15_7b", f"method.generation.prompts={configured}"])
    assert warn_prompt_mismatch(cfg, configured) == []
    warnings = warn_prompt_mismatch(cfg, configured[1:] + ["Describe it."])
    assert len(warnings) == 2 and "'Describe it.'" in warnings[1]


def test_only_released_splits(downloads, tmp_path):
    prepare(downloads, tmp_path / "a", splits=["adversarial"])
    assert [p.name for p in (tmp_path / "a" / "pope").iterdir()] == ["adversarial.jsonl"]
    with pytest.raises(ValueError, match=r"eval.pope.splits \['hard'\]"):
        prepare(downloads, tmp_path / "b", splits=["random", "hard"])


def break_line(path: Path, lineno: int, text: str) -> None:
    lines = path.read_text().splitlines()
    lines[lineno - 1] = text
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("breakage, message", [
    (lambda r: break_line(r / "chair/opera_chair500_llava-1.5_greedy.jsonl", 2, "{not json"),
     r"opera_chair500_llava-1.5_greedy.jsonl:2: malformed JSON line"),
    (lambda r: break_line(r / "chair/opera_chair500_llava-1.5_greedy.jsonl", 2, '{"image_id": 99}'),
     r"opera_chair500_llava-1.5_greedy.jsonl:2: image 99 is not in .*instances_val2014.json"),
    (lambda r: break_line(r / "chair/opera_chair500_llava-1.5_greedy.jsonl", 2, '{"image_id": 3}'),
     r"greedy.jsonl:2: image 3 repeats line 1"),
    (lambda r: break_line(r / "chair/opera_chair500_llava-1.5_greedy.jsonl", 1, '{"caption": "x"}'),
     r"greedy.jsonl:1: missing or non-integer 'image_id'"),
    (lambda r: break_line(r / "pope/coco_pope_popular.json", 2, json.dumps(
        {"question_id": 2, "image": val_name(3), "text": "Is the cat black?", "label": "no"})),
     r"coco_pope_popular.json:2: question 'Is the cat black\?'"),
    (lambda r: break_line(r / "pope/coco_pope_random.json", 3, json.dumps(
        {"question_id": 3, "image": val_name(1), "text": "Is there a dog in the image?", "label": "maybe"})),
     r"coco_pope_random.json:3: label 'maybe'"),
    (lambda r: break_line(r / "pope/coco_pope_random.json", 1, json.dumps(
        {"question_id": 1, "image": val_name(3), "text": "Is there a dog in the image?"})),
     r"coco_pope_random.json:1: missing field\(s\) \['label'\]"),
    (lambda r: (r / "coco/val2014" / val_name(1)).unlink(),
     r"coco_pope_random.json:3: image COCO_val2014_000000000001.jpg not found in"),
    (lambda r: (r / "coco/train2017/000000000013.jpg").unlink(),
     r"detail_23k.json: image 000000000013.jpg \(id 13\) not found in .*train2017"),
    (lambda r: (r / "coco/train2017/000000000012.jpg").write_text("not an image"),
     r"000000000012.jpg: not a readable image"),
    (lambda r: (r / "llava/detail_23k.json").write_text(json.dumps(
        [{"id": "1", "image": "000000000011.jpg", "conversations": [{"from": "human", "value": "Hi"}]},
         {"id": "x", "image": "x.jpg", "conversations": []}])),
     r"detail_23k.json: entry 1 \(id 'x'\): image 'x.jpg' is not a COCO file name"),
    (lambda r: (r / "llava/detail_23k.json").write_text(json.dumps(
        [{"id": "1", "image": "000000000011.jpg", "conversations": [{"from": "gpt", "value": "Hi"}]}])),
     r"detail_23k.json: entry 0 \(id '1'\): the first conversation turn must be a human turn"),
    (lambda r: (r / "coco/annotations/captions_val2014.json").write_text('{"images": [\n'),
     r"captions_val2014.json:2: invalid JSON"),
    (lambda r: (r / "coco/annotations/instances_val2014.json").unlink(),
     r"instances_val2014.json: file not found"),
])
def test_bad_inputs_name_file_and_line_and_leave_the_old_data(downloads, tmp_path, breakage, message):
    out = tmp_path / "coco"
    out.mkdir()
    (out / "old.txt").write_text("kept")
    breakage(downloads)
    with pytest.raises(InputError, match=message):
        prepare(downloads, out)
    assert (out / "old.txt").read_text() == "kept" and not out.with_name("coco.tmp").exists()


def test_readers_directly(downloads):
    assert read_image_list(downloads / "chair/opera_chair500_llava-1.5_greedy.jsonl") == [(3, 1), (1, 2)]
    assert [r["image_id"] for r in read_detail_23k(downloads / "llava/detail_23k.json")] == [11, 12, 13]
    rows = read_pope_file(downloads / "pope/coco_pope_adversarial.json")
    assert [(r["object"], r["label"]) for r in rows] == [("person", "yes"), ("cat", "no")]


def test_detail_23k_keeps_the_first_entry_of_an_image(tmp_path):
    path = tmp_path / "d.json"
    entry = lambda prompt: {"id": "5", "image": "000000000005.jpg",  # noqa: E731
                            "conversations": [{"from": "human", "value": prompt}]}
    path.write_text(json.dumps([entry("<image>\nFirst  question?"), entry("Second?")]))
    assert read_detail_23k(path) == [{"image_id": 5, "file_name": "000000000005.jpg", "prompt": "First question?"}]


def test_a_moved_output_is_refused(downloads, tmp_path):
    cfg = compose(["experiment=apasi_llava15_7b", f"paths.results={tmp_path}", f"download.root={downloads}",
                   f"data.eval_instances={tmp_path}/elsewhere.json"])
    with pytest.raises(ValueError, match="eval_instances="):
        run(cfg)


def object_halbench_config(downloads, tmp_path):
    return compose(["experiment=apasi_llava15_7b", f"paths.results={tmp_path}/results", f"download.root={downloads}"])


def test_object_halbench_questions_from_the_question_file(downloads, tmp_path):
    """rule object_halbench_questions on COCO: the question file's images and prompts in its order, their val2014
    file names, and the val2014 instances and captions cut to those images."""
    from halludpo.evaluate import write_object_halbench_questions
    from halludpo.metrics.object_halbench import PROMPTS

    cfg = object_halbench_config(downloads, tmp_path)
    write_lines(Path(cfg.data.sources.object_halbench.questions),
                [{"org_idx": 0, "image_id": 3, "question": PROMPTS[4], "image": "aGk="},
                 {"org_idx": 1, "image_id": 1, "question": PROMPTS[0], "image": "aGk="}])
    said = write_object_halbench_questions(cfg)
    assert said["questions"] == 2 and said["images"] == 2 and "RLHF-V/RLAIF-V" in said["source"]
    files = paths.object_halbench_files(cfg)
    assert read_jsonl(files["questions"]) == [
        {"id": 0, "image_id": 3, "image": val_name(3), "query": PROMPTS[4]},
        {"id": 1, "image_id": 1, "image": val_name(1), "query": PROMPTS[0]}]
    instances, captions = read_json(files["instances"]), read_json(files["captions"])
    assert sorted(im["id"] for im in instances["images"]) == [1, 3] and instances["categories"] == CATEGORIES
    assert sorted(a["category_id"] for a in instances["annotations"]) == sorted(VAL_OBJECTS[1] + VAL_OBJECTS[3])
    assert sorted(c["image_id"] for c in captions["annotations"]) == [1, 3]
    truth = ground_truth_from_coco(files["instances"], files["captions"], chair_scorer(
        coco_synonyms_path(), "coco", "offline"))
    assert truth == {1: {"person", "dog", "bowl"}, 3: {"person", "dining table", "dog", "bowl"}}


def test_object_halbench_image_missing_from_val2014_names_the_line(downloads, tmp_path):
    from halludpo.evaluate import write_object_halbench_questions
    from halludpo.metrics.object_halbench import PROMPTS

    cfg = object_halbench_config(downloads, tmp_path)
    questions = Path(cfg.data.sources.object_halbench.questions)
    write_lines(questions, [{"image_id": 1, "question": PROMPTS[0]}, {"image_id": 999, "question": PROMPTS[1]}])
    with pytest.raises(InputError, match=rf"^{questions}:2: image 999 is not in .*instances_val2014.json"):
        write_object_halbench_questions(cfg)
    assert not paths.object_halbench_files(cfg)["questions"].exists()
