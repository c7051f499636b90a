"""The toy world written in AMBER's format (halludpo.toyworld.write_amber_split) and scored by
halludpo.metrics.amber."""

import json
from math import comb

import pytest

from halludpo.metrics.amber import load_amber, load_queries, score_amber
from halludpo.toyworld import COLOURS, categories, glyph_mask, in_contact, write_amber_split

IDS = {name: i + 1 for i, name in enumerate(categories())}


def _world(tmp_path, images):
    """A hand-made rendered world: world.json (64 px images, glyphs 12-22 px: small below 17) and
    eval/instances.json with images {image_id: [(category, [x, y, w, h]), ...]}."""
    (tmp_path / "eval").mkdir(parents=True)
    (tmp_path / "world.json").write_text(json.dumps({"config": {"image_size": 64, "min_glyph": 12, "max_glyph": 22}}))
    annotations = [{"id": n + 1, "image_id": image_id, "category_id": IDS[name], "bbox": box}
                   for n, (image_id, name, box) in enumerate(
                       (image_id, name, box) for image_id, objects in images.items() for name, box in objects)]
    instances = {"images": [{"id": image_id, "file_name": f"eval_{image_id}.png", "width": 64, "height": 64}
                            for image_id in images],
                 "annotations": annotations,
                 "categories": [{"id": i, "name": name} for name, i in IDS.items()]}
    (tmp_path / "eval" / "instances.json").write_text(json.dumps(instances))
    return tmp_path


# Glyphs: fork = red circle, knife = blue square, spoon = yellow triangle, cup = purple cross, dog = yellow diamond.
IMAGES = {
    # fork's circle (x 0-19) overlaps knife's square (drawn x 19-36, y 1-18): contact; cup (x, y 40-53) is apart.
    # fork and knife are 20 px: large (>= 17); cup 14 px: small.
    10: [("fork", [0, 0, 20, 20]), ("knife", [18, 0, 20, 20]), ("cup", [40, 40, 14, 14])],
    # the boxes share the pixel (19, 19), but the circle does not reach its box's corner and the triangle's apex
    # is at (26, 19): no contact.
    20: [("fork", [0, 0, 20, 20]), ("spoon", [19, 19, 14, 14])],
    # two dogs, the first 16 px: small.
    30: [("dog", [5, 5, 16, 16]), ("dog", [40, 40, 18, 18])],
}
# Co-occurrence in this split: fork-knife 1, fork-cup 1, fork-spoon 1, knife-cup 1.
# hallu of image 10 (fork, knife, cup): spoon (1 with fork); image 20 (fork, spoon): cup 1, knife 1 (ties by name);
# image 30 (dog): nothing co-occurs with dog.
# Ids: generative 1-3; attribute 6 per category: (3 + 2 + 1) x 6 = 36, ids 4-39; existence 1 + 2 + 0 = 3, ids 40-42;
# relation: pairs 3 + 1 + 0 = 4, ids 43-46.


@pytest.fixture
def written(tmp_path):
    out = tmp_path / "amber"
    counts = write_amber_split(_world(tmp_path / "world", IMAGES), out, seed=0)
    return out, counts


def test_hand_made_world(written):
    out, counts = written
    assert counts == {"generative": 3, "attribute": 36, "existence": 3, "relation": 4}
    annotations = json.loads((out / "annotations.json").read_text())
    assert annotations[:3] == [
        {"id": 1, "type": "generative", "truth": ["fork", "knife", "cup"], "hallu": ["spoon"]},
        {"id": 2, "type": "generative", "truth": ["fork", "spoon"], "hallu": ["cup", "knife"]},
        {"id": 3, "type": "generative", "truth": ["dog"], "hallu": []},
    ]
    queries = {q["id"]: q for q in load_queries(out / "query_discriminative.json")}
    truth = {a["id"]: a["truth"] for a in annotations}
    assert [(queries[i]["query"], truth[i]) for i in range(43, 47)] == [
        ("Is there direct contact between the fork and knife?", "yes"),
        ("Is there direct contact between the fork and cup?", "no"),
        ("Is there direct contact between the knife and cup?", "no"),
        ("Is there direct contact between the fork and spoon?", "no"),
    ]
    assert [(queries[i]["query"], truth[i], queries[i]["image_id"]) for i in range(40, 43)] == [
        ("Is there a spoon in this image?", "no", 10),
        ("Is there a cup in this image?", "no", 20),
        ("Is there a knife in this image?", "no", 20),
    ]
    fork = [(queries[i]["query"], truth[i]) for i in range(4, 10)]
    assert fork[0] == ("Is the fork red in this image?", "yes")
    wrong = fork[1][0].split()[3]
    assert wrong in COLOURS and wrong != "red" and fork[1][1] == "no"
    assert fork[2:] == [("Is the fork large in this image?", "yes"), ("Is the fork small in this image?", "no"),
                        ("Is there one fork in this image?", "yes"), ("Are there two forks in this image?", "no")]
    dog = [(queries[i]["query"], truth[i]) for i in range(34, 40)]
    assert dog[0] == ("Is the dog yellow in this image?", "yes")
    assert dog[2:] == [("Is the dog small in this image?", "yes"), ("Is the dog large in this image?", "no"),
                       ("Are there two dogs in this image?", "yes"), ("Are there three dogs in this image?", "no")]
    kinds = [a["type"] for a in annotations[3:39]]
    assert kinds.count("discriminative-attribute-state") == 24 and kinds.count("discriminative-attribute-number") == 12
    generative = load_queries(out / "query_generative.json")
    assert generative[0] == {"id": 1, "image": "eval_10.png", "query": "Describe this image.", "image_id": 10}
    per_dimension = [len(load_queries(out / f"query_discriminative-{d}.json"))
                     for d in ("attribute", "existence", "relation")]
    assert per_dimension == [36, 3, 4]


def test_contact_is_on_drawn_pixels():
    # knife squares are drawn one pixel inside their box: (0, 0, 10, 10) covers x 1-8.
    a = glyph_mask("knife", (0, 0, 10, 10), 32)
    assert a[5, 1] and a[5, 8] and not a[5, 9]
    assert in_contact(a, glyph_mask("knife", (8, 0, 10, 10), 32))       # x 9-16: next to x 8
    assert not in_contact(a, glyph_mask("knife", (9, 0, 10, 10), 32))   # x 10-17: a one-pixel gap
    assert in_contact(a, glyph_mask("knife", (8, 8, 10, 10), 32))       # diagonal neighbours touch


def test_scoring_the_written_files(written):
    out, _ = written
    data = load_amber(out)
    annotations = json.loads((out / "annotations.json").read_text())
    perfect = [{"id": 1, "response": "A fork, a knife and a cup."},
               {"id": 2, "response": "A fork and a spoon."},
               {"id": 3, "response": "Two dogs."}]
    perfect += [{"id": a["id"], "response": a["truth"].capitalize()} for a in annotations if a["type"] != "generative"]
    result = score_amber(perfect, data, nouns="offline", matcher="offline")["metrics"]
    assert result["generative"]["chair"] == 0.0 and result["generative"]["cover"] == 1.0
    assert result["discriminative"]["overall"]["accuracy"] == 1.0
    assert result["amber_score"] == 1.0
    # image 1 described with the spoon it lacks: 1 hallucinated noun of 3; spoon is its only hallu word (Cog 1/1);
    # cup not covered (Cover 2/3).
    wrong = score_amber([{"id": 1, "response": "A fork, a knife and a spoon."}], data, nouns="offline",
                        matcher="offline")["metrics"]["generative"]
    assert (wrong["chair"], wrong["cover"], wrong["cog"], wrong["hal"]) == pytest.approx((1 / 3, 2 / 3, 1.0, 1.0))


def test_a_rendered_world(tiny_world, tmp_path):
    counts = write_amber_split(tiny_world, tmp_path, n_hallu=3)
    data = load_amber(tmp_path)
    instances = json.loads((tiny_world / "eval" / "instances.json").read_text())
    names = {c["id"]: c["name"] for c in instances["categories"]}
    present: dict[int, list[str]] = {}
    for annotation in instances["annotations"]:
        objects = present.setdefault(annotation["image_id"], [])
        if names[annotation["category_id"]] not in objects:
            objects.append(names[annotation["category_id"]])
    assert counts["generative"] == len(instances["images"]) == len(data.generative)
    assert counts["attribute"] == 6 * sum(len(objects) for objects in present.values())
    assert counts["relation"] == sum(comb(len(objects), 2) for objects in present.values())
    assert counts["existence"] == sum(len(item.hallu) for item in data.generative.values())
    for k, image in enumerate(instances["images"], start=1):
        item = data.generative[k]
        assert list(item.truth) == [name.split()[-1] for name in present[image["id"]]]
        assert len(item.hallu) <= 3 and not set(item.hallu) & set(item.truth)
        assert (tiny_world / "eval" / "images" / image["file_name"]).is_file()
    assert {q.truth for q in data.questions.values() if q.dimension == "existence"} == {"no"}
    assert {q.truth for q in data.questions.values() if q.dimension == "relation"} <= {"yes", "no"}
    assert sum(q.truth == "yes" for q in data.questions.values() if q.dimension == "attribute") == counts[
        "attribute"] // 2


def test_toy_wording_uses_words_the_toy_model_knows(tiny_world, tmp_path):
    """wording="toy": every question reads in the toy model's vocabulary (category names, colours, sizes, the
    prompt and question words); AMBER's own wording has words it does not know. image_ids picks images."""
    import re

    from halludpo.pretrain import toy_vocabulary

    known = set(toy_vocabulary([], extra=[*COLOURS, "small", "large"]))  # colours and sizes: the captions' words

    def unknown(out):
        queries = load_queries(out / "query_generative.json") + load_queries(out / "query_discriminative.json")
        return {w for q in queries for w in re.findall(r"\w+|[^\w\s]+", q["query"].lower())} - known

    toy, amber = tmp_path / "toy", tmp_path / "amber"
    instances = json.loads((tiny_world / "eval" / "instances.json").read_text())
    ids = [image["id"] for image in instances["images"]][::3]
    counts = write_amber_split(tiny_world, toy, wording="toy", image_ids=ids)
    write_amber_split(tiny_world, amber, image_ids=ids)
    assert unknown(toy) == set()
    assert {"direct", "contact", "between"} <= unknown(amber)
    data = load_amber(toy)
    assert counts["generative"] == len(ids) == len(data.generative)
    assert not any(q.kind == "number" for q in data.questions.values())
    relation = [q for q in load_queries(toy / "query_discriminative-relation.json")]
    assert relation and all(re.fullmatch(r"Is the [a-z ]+ on the [a-z ]+ in this image\?", q["query"])
                            for q in relation)
    assert {q["image_id"] for q in load_queries(toy / "query_generative.json")} == set(ids)
    with pytest.raises(ValueError, match="wording"):
        write_amber_split(tiny_world, tmp_path / "x", wording="other")
    with pytest.raises(ValueError, match="not in the eval split"):
        write_amber_split(tiny_world, tmp_path / "x", image_ids=[-1])
