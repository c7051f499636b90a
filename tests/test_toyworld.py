import hashlib
import json

from pycocotools.coco import COCO

from halludpo import toyworld
from halludpo.data import render_toy_data
from tests.conftest import TINY_WORLD


def tree_digest(root):
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def test_same_seed_gives_identical_bytes_and_other_seed_differs(tmp_path):
    splits = {"train": 12, "unlabeled": 4, "eval": 8}
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        render_toy_data(tmp_path / name, splits, seed, TINY_WORLD, progress=False)
    assert tree_digest(tmp_path / "a") == tree_digest(tmp_path / "b")
    assert tree_digest(tmp_path / "a") != tree_digest(tmp_path / "c")


def test_pycocotools_loads_the_annotations(tiny_world):
    coco = COCO(str(tiny_world / "eval" / "instances.json"))
    assert len(coco.getImgIds()) == 40
    assert len(coco.getCatIds()) == len(toyworld.categories()) >= 20
    ann = coco.loadAnns(coco.getAnnIds(imgIds=coco.getImgIds()[:1]))[0]
    x, y, w, h = ann["bbox"]
    assert ann["area"] == w * h and 0 <= x <= 32 - w and 0 <= y <= 32 - h
    images = json.loads((tiny_world / "eval" / "instances.json").read_text())["images"]
    assert all((tiny_world / "eval" / "images" / im["file_name"]).is_file() for im in images)


def test_unlabeled_split_has_images_but_no_annotations(tiny_world):
    inst = json.loads((tiny_world / "unlabeled" / "instances.json").read_text())
    assert len(inst["images"]) == 10 and inst["annotations"] == []
    assert not (tiny_world / "unlabeled" / "captions.json").exists()


def test_world_has_scene_types_categories_and_distinct_glyphs():
    assert len(toyworld.SCENES) >= 4
    cats = toyworld.categories()
    assert len(cats) >= 20 and len(set(cats)) == len(cats)
    glyphs = [toyworld.glyph_of(i) for i in range(len(cats))]
    assert len(set(glyphs)) == len(glyphs)


def test_partners_usually_cooccur(tmp_path):
    render_toy_data(tmp_path / "w", {"train": 300}, 0, TINY_WORLD | {"partner_prob": 0.8}, progress=False)
    inst = json.loads((tmp_path / "w" / "train" / "instances.json").read_text())
    assert toyworld.cooccurrence_rate(inst) > 0.6


def test_captions_one_sentence_per_object_and_configurable_absent_partner(tmp_path):
    render_toy_data(tmp_path / "w", {"train": 300}, 0, TINY_WORLD | {"hallucination_share": 0.0}, progress=False)
    render_toy_data(tmp_path / "h", {"train": 300}, 0, TINY_WORLD | {"hallucination_share": 1.0}, progress=False)
    plain = json.loads((tmp_path / "w" / "train" / "captions.json").read_text())["annotations"]
    prior = json.loads((tmp_path / "h" / "train" / "captions.json").read_text())["annotations"]
    inst = json.loads((tmp_path / "w" / "train" / "instances.json").read_text())
    n_objects = {}
    for ann in inst["annotations"]:
        n_objects[ann["image_id"]] = n_objects.get(ann["image_id"], 0) + 1
    assert all(c["hallucinated"] is None for c in plain)
    # one opening sentence about the scene + one per object
    assert all(c["caption"].count(" .") == n_objects[c["image_id"]] + 1 for c in plain)
    with_absent = [c for c in prior if c["hallucinated"]]
    assert len(with_absent) > 50
    for c in with_absent:
        present = {a["category_id"] for a in inst["annotations"] if a["image_id"] == c["image_id"]}
        names = {x["id"]: x["name"] for x in inst["categories"]}
        present_names = {names[i] for i in present}
        assert c["hallucinated"] not in present_names
        assert any(toyworld.partner_of(o) == c["hallucinated"] for o in present_names)


def test_absent_partner_sentence_goes_last_when_configured_and_nothing_else_changes():
    import random

    cfg_any = toyworld.WorldConfig(hallucination_share=1.0)
    cfg_last = toyworld.WorldConfig(hallucination_share=1.0, hallucination_position="last")
    moved = 0
    for k in range(200):
        scene_rng = random.Random(k)
        scene, objects = toyworld.sample_objects(scene_rng, cfg_any)
        boxes = toyworld.place_boxes(scene_rng, len(objects), cfg_any)
        text_any, h_any = toyworld.caption(random.Random(f"c{k}"), scene, objects, boxes, cfg_any)
        text_last, h_last = toyworld.caption(random.Random(f"c{k}"), scene, objects, boxes, cfg_last)
        assert h_any == h_last
        if h_last is None:
            assert text_any == text_last
            continue
        sentences_any, sentences_last = (t.removesuffix(" .").split(" . ") for t in (text_any, text_last))
        assert sorted(sentences_any) == sorted(sentences_last)  # the same sentences, only the order differs
        assert h_last in sentences_last[-1] or any(s in sentences_last[-1] for s in toyworld.SYNONYMS.get(h_last, []))
        moved += text_any != text_last
    assert moved > 20
    try:
        toyworld.caption(random.Random(0), "kitchen", ["fork"], [(0, 0, 12, 12)],
                         toyworld.WorldConfig(hallucination_position="middle"))
    except ValueError as err:
        assert "hallucination_position" in str(err)
    else:
        raise AssertionError("an unknown hallucination_position must be an error")


def test_vocabulary_file_lists_every_category_first():
    lines = toyworld.vocabulary_text().splitlines()
    assert [line.split(", ")[0] for line in lines] == toyworld.categories()
    assert "dog, puppy" in lines
