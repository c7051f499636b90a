"""The toy world: procedural scenes with exact object annotations and human-like captions.

Each scene type has a background colour and a pool of objects; objects come in partner pairs that usually appear
together (fork + knife, car + traffic light). Every object category is a distinct glyph (shape x colour) drawn at
a random size and position with pixel noise. Reference captions describe the scene one sentence per object with a
position or attribute phrase; a configurable share of them also mentions an absent partner of a present object:
the language prior that makes a model trained on them hallucinate, as COCO captions do for LLaVA.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from halludpo.io import write_json, write_text

# scene -> (background RGB, objects); partners are pairs that usually co-occur.
SCENES: dict[str, tuple[tuple[int, int, int], list[str]]] = {
    "kitchen": ((222, 200, 160), ["fork", "knife", "spoon", "bowl", "cup", "bottle"]),
    "street": ((128, 128, 128), ["car", "traffic light", "bus", "bicycle", "stop sign"]),
    "park": ((120, 190, 110), ["dog", "frisbee", "bench", "bird", "kite"]),
    "office": ((170, 200, 235), ["laptop", "mouse", "keyboard", "book", "clock"]),
    "bathroom": ((235, 235, 240), ["toilet", "sink", "toothbrush"]),
}
PARTNERS: list[tuple[str, str]] = [
    ("fork", "knife"), ("spoon", "bowl"), ("cup", "bottle"),
    ("car", "traffic light"), ("bus", "stop sign"),
    ("dog", "frisbee"), ("bench", "bird"),
    ("laptop", "mouse"), ("keyboard", "book"),
    ("toilet", "sink"),
]
# Words a caption may use instead of the category name (the toy world's own synonym table).
SYNONYMS: dict[str, list[str]] = {
    "car": ["automobile"], "dog": ["puppy"], "bicycle": ["bike"], "cup": ["mug"],
    "laptop": ["computer"], "book": ["notebook"], "bird": ["pigeon"], "bus": ["coach"],
}
SHAPES = ["circle", "square", "triangle", "diamond", "cross", "ring", "hbar", "vbar"]
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (200, 30, 30), "blue": (30, 60, 200), "yellow": (235, 200, 20), "black": (20, 20, 20),
    "purple": (140, 40, 170), "orange": (240, 120, 20),
}
POSITION_PHRASES = {
    ("left", "top"): "at the top left", ("center", "top"): "at the top", ("right", "top"): "at the top right",
    ("left", "middle"): "on the left", ("center", "middle"): "in the middle", ("right", "middle"): "on the right",
    ("left", "bottom"): "at the bottom left", ("center", "bottom"): "at the bottom",
    ("right", "bottom"): "at the bottom right",
}
SENTENCE_TEMPLATES = [
    "there is a {size} {obj} {pos} .",
    "i can see a {colour} {obj} {pos} .",
    "a {obj} is {pos} .",
    "there is also a {obj} .",
    "{pos} , there is a {obj} .",
    "i can see a {size} {obj} .",
]
OPENING_TEMPLATES = ["this is {a} {scene} scene .", "the picture shows {a} {scene} .", "a view of {a} {scene} ."]
DESCRIBE_PROMPTS = [
    "please describe this image in detail .",
    "describe this image .",
    "what do you see in this picture ?",
    "tell me what is in the image .",
]
QUESTION_TEMPLATE = "is there {article} {obj} in the image ?"


def categories() -> list[str]:
    return [obj for _, objs in SCENES.values() for obj in objs]


def partner_of(obj: str) -> str | None:
    for a, b in PARTNERS:
        if obj == a:
            return b
        if obj == b:
            return a
    return None


def glyph_of(index: int) -> tuple[str, str]:
    """Category index -> (shape, colour): unique for the first len(SHAPES) * 3 categories, and neighbours in the
    category list (the objects of one scene) differ in both shape and colour.

    colour = (i + 3 * (i // len(SHAPES))) mod 6: categories sharing a shape are 8 apart and get colours s, s+5, s+4.
    """
    colour_names = list(COLOURS)
    if index >= 3 * len(SHAPES):
        raise ValueError(f"only {3 * len(SHAPES)} distinct glyphs; category index {index}")
    colour = (index + 3 * (index // len(SHAPES))) % len(colour_names)
    return SHAPES[index % len(SHAPES)], colour_names[colour]


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


@dataclass(frozen=True)
class WorldConfig:
    image_size: int = 64
    min_objects: int = 2
    max_objects: int = 5
    min_glyph: int = 12
    max_glyph: int = 22
    partner_prob: float = 0.8       # P(partner present | object present and partnered)
    cross_scene_prob: float = 0.1   # P(one object from another scene type)
    hallucination_share: float = 0.3  # P(caption mentions an absent partner | the scene has one)
    hallucination_position: str = "anywhere"  # where that sentence goes: anywhere after the opening | last
    synonym_prob: float = 0.2
    noise_std: float = 8.0
    max_overlap: float = 0.3        # max IoU between two glyphs


# ---------------------------------------------------------------------------------------------------------------
# Scene sampling


def sample_objects(rng: random.Random, cfg: WorldConfig) -> tuple[str, list[str]]:
    scene = rng.choice(list(SCENES))
    pool = SCENES[scene][1]
    n = rng.randint(cfg.min_objects, cfg.max_objects)
    chosen: list[str] = []
    candidates = pool[:]
    rng.shuffle(candidates)
    for obj in candidates:
        if len(chosen) >= n:
            break
        if obj in chosen:
            continue
        chosen.append(obj)
        mate = partner_of(obj)
        if mate and mate in pool and mate not in chosen and len(chosen) < n and rng.random() < cfg.partner_prob:
            chosen.append(mate)
    chosen = chosen[:n]
    if rng.random() < cfg.cross_scene_prob:  # an out-of-context object now and then
        chosen[-1] = rng.choice([o for o in categories() if o not in pool])
    return scene, chosen


def iou(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    ix = max(0.0, min(ax + aw, bx + bw) - max(ax, bx))
    iy = max(0.0, min(ay + ah, by + bh) - max(ay, by))
    inter = ix * iy
    return inter / (aw * ah + bw * bh - inter)


def place_boxes(rng: random.Random, n: int, cfg: WorldConfig) -> list[tuple[int, int, int, int]]:
    boxes: list[tuple[int, int, int, int]] = []
    for _ in range(n):
        box = None
        for _attempt in range(50):
            size = rng.randint(cfg.min_glyph, cfg.max_glyph)
            x, y = rng.randint(0, cfg.image_size - size), rng.randint(0, cfg.image_size - size)
            box = (x, y, size, size)
            if all(iou(box, other) <= cfg.max_overlap for other in boxes):
                break
        boxes.append(box)
    return boxes


# ---------------------------------------------------------------------------------------------------------------
# Rendering


def draw_glyph(draw: ImageDraw.ImageDraw, shape: str, colour: tuple[int, int, int], box) -> None:
    x, y, w, h = box
    x1, y1 = x + w - 1, y + h - 1
    cx, cy = x + w / 2, y + h / 2
    t = max(2, w // 4)
    if shape == "circle":
        draw.ellipse([x, y, x1, y1], fill=colour)
    elif shape == "square":
        draw.rectangle([x + 1, y + 1, x1 - 1, y1 - 1], fill=colour)
    elif shape == "triangle":
        draw.polygon([(cx, y), (x, y1), (x1, y1)], fill=colour)
    elif shape == "diamond":
        draw.polygon([(cx, y), (x1, cy), (cx, y1), (x, cy)], fill=colour)
    elif shape == "cross":
        draw.rectangle([cx - t / 2, y, cx + t / 2, y1], fill=colour)
        draw.rectangle([x, cy - t / 2, x1, cy + t / 2], fill=colour)
    elif shape == "ring":
        draw.ellipse([x, y, x1, y1], outline=colour, width=t)
    elif shape == "hbar":
        draw.rectangle([x, cy - t, x1, cy + t], fill=colour)
    elif shape == "vbar":
        draw.rectangle([cx - t, y, cx + t, y1], fill=colour)
    else:
        raise ValueError(f"unknown glyph shape {shape!r}")


def render(scene: str, objects: list[str], boxes, cfg: WorldConfig, noise_seed: list[int]) -> Image.Image:
    img = Image.new("RGB", (cfg.image_size, cfg.image_size), SCENES[scene][0])
    draw = ImageDraw.Draw(img)
    index = {c: i for i, c in enumerate(categories())}
    for obj, box in zip(objects, boxes):
        shape, colour = glyph_of(index[obj])
        draw_glyph(draw, shape, COLOURS[colour], box)
    pixels = np.asarray(img, dtype=np.float32)
    pixels += np.random.default_rng(noise_seed).normal(0.0, cfg.noise_std, pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8))


# ---------------------------------------------------------------------------------------------------------------
# Captions


def position_phrase(box, image_size: int) -> str:
    x, y, w, h = box
    cx, cy = (x + w / 2) / image_size, (y + h / 2) / image_size
    col = "left" if cx < 0.36 else "right" if cx > 0.64 else "center"
    row = "top" if cy < 0.36 else "bottom" if cy > 0.64 else "middle"
    return POSITION_PHRASES[(col, row)]


def object_sentence(rng: random.Random, obj: str, box, cfg: WorldConfig) -> str:
    name = rng.choice(SYNONYMS[obj]) if obj in SYNONYMS and rng.random() < cfg.synonym_prob else obj
    _, colour = glyph_of(categories().index(obj))
    size = "small" if box[2] < (cfg.min_glyph + cfg.max_glyph) / 2 else "large"
    template = rng.choice(SENTENCE_TEMPLATES)
    sentence = template.format(size=size, colour=colour, obj=name, pos=position_phrase(box, cfg.image_size))
    return sentence.replace(" a a", " an a").replace(" a o", " an o").replace(" a e", " an e")


HALLUCINATION_POSITIONS = ("anywhere", "last")


def caption(rng: random.Random, scene: str, objects: list[str], boxes, cfg: WorldConfig) -> tuple[str, str | None]:
    """One sentence per object, left to right; maybe one extra sentence about an absent partner, placed anywhere
    after the opening sentence or, with cfg.hallucination_position == "last", after every real object (as in long
    LVLM descriptions, where hallucinations gather towards the end).

    Returns (caption, hallucinated category or None).
    """
    if cfg.hallucination_position not in HALLUCINATION_POSITIONS:
        raise ValueError(f"hallucination_position must be one of {HALLUCINATION_POSITIONS}, "
                         f"got {cfg.hallucination_position!r}")
    order = sorted(range(len(objects)), key=lambda i: boxes[i][0] + boxes[i][2] / 2)
    sentences = [rng.choice(OPENING_TEMPLATES).format(a=article(scene), scene=scene)]
    sentences += [object_sentence(rng, objects[i], boxes[i], cfg) for i in order]
    hallucinated = None
    absent_partners = sorted({p for o in objects if (p := partner_of(o)) and p not in objects})
    if absent_partners and rng.random() < cfg.hallucination_share:
        hallucinated = rng.choice(absent_partners)
        size = rng.randint(cfg.min_glyph, cfg.max_glyph)
        fake_box = (rng.randint(0, cfg.image_size - size), rng.randint(0, cfg.image_size - size), size, size)
        position = rng.randint(2, len(sentences))  # drawn in both modes: "last" changes nothing else in the world
        if cfg.hallucination_position == "last":
            position = len(sentences)
        sentences.insert(position, object_sentence(rng, hallucinated, fake_box, cfg))
    return " ".join(sentences), hallucinated


# ---------------------------------------------------------------------------------------------------------------
# Splits


SPLIT_IDS = {"train": 1, "unlabeled": 2, "eval": 3}


def write_split(out_dir: Path, split: str, n_images: int, seed: int, cfg: WorldConfig, progress: bool = True) -> dict:
    """Render one split: images/<file>.png, instances.json (COCO), captions.json (COCO captions)."""
    cats = categories()
    cat_id = {c: i + 1 for i, c in enumerate(cats)}
    images, annotations, captions_out = [], [], []
    img_dir = out_dir / split / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    split_id = SPLIT_IDS[split]
    for k in tqdm(range(n_images), desc=f"render {split}", disable=not progress):
        image_id = split_id * 1_000_000 + k
        rng = random.Random(f"{seed}/{split}/{k}")
        scene, objects = sample_objects(rng, cfg)
        boxes = place_boxes(rng, len(objects), cfg)
        file_name = f"{split}_{k:06d}.png"
        render(scene, objects, boxes, cfg, [seed, split_id, k]).save(img_dir / file_name, format="PNG")
        images.append({"id": image_id, "file_name": file_name, "width": cfg.image_size,
                       "height": cfg.image_size, "scene": scene})
        for obj, (x, y, w, h) in zip(objects, boxes):
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": cat_id[obj],
                                "bbox": [x, y, w, h], "area": float(w * h), "iscrowd": 0})
        text, hallucinated = caption(rng, scene, objects, boxes, cfg)
        captions_out.append({"id": len(captions_out) + 1, "image_id": image_id, "caption": text,
                             "hallucinated": hallucinated})
    categories_json = [{"id": cat_id[c], "name": c, "supercategory": scene}
                       for scene, (_, objs) in SCENES.items() for c in objs]
    info = {"description": f"halludpo toy world, split {split}", "seed": seed}
    labelled = split != "unlabeled"
    instances = {"info": info, "images": images, "annotations": annotations if labelled else [],
                 "categories": categories_json}
    write_json(out_dir / split / "instances.json", instances)
    if labelled:
        write_json(out_dir / split / "captions.json", {"info": info, "images": images, "annotations": captions_out})
    n_hallucinated = sum(c["hallucinated"] is not None for c in captions_out)
    return {"images": n_images, "objects": len(annotations), "captions_with_absent_partner": n_hallucinated}


def vocabulary_text() -> str:
    """The toy world's synonym table, in the format of CHAIR's coco synonyms file (first word = category)."""
    return "".join(", ".join([c, *SYNONYMS.get(c, [])]) + "\n" for c in categories())


def world_description(cfg: WorldConfig) -> dict:
    cats = categories()
    return {
        "scenes": {s: {"background": list(bg), "objects": objs} for s, (bg, objs) in SCENES.items()},
        "partners": [list(p) for p in PARTNERS],
        "glyphs": {c: dict(zip(("shape", "colour"), glyph_of(i))) for i, c in enumerate(cats)},
        "synonyms": SYNONYMS,
        "describe_prompts": DESCRIBE_PROMPTS,
        "question_template": QUESTION_TEMPLATE,
        "config": cfg.__dict__,
    }


def render_world(out_dir: str | Path, splits: dict[str, int], seed: int, cfg: WorldConfig,
                 progress: bool = True) -> dict:
    """Write the whole toy world under out_dir; returns per-split statistics."""
    out_dir = Path(out_dir)
    stats = {split: write_split(out_dir, split, n, seed, cfg, progress) for split, n in splits.items()}
    write_text(out_dir / "vocabulary.txt", vocabulary_text())
    write_json(out_dir / "world.json", world_description(cfg) | {"seed": seed, "splits": splits})
    return stats


def cooccurrence_rate(instances: dict) -> float:
    """Share of images holding a partnered object whose partner is present too (a check of the structure)."""
    names = {c["id"]: c["name"] for c in instances["categories"]}
    per_image: dict[int, set[str]] = {}
    for ann in instances["annotations"]:
        per_image.setdefault(ann["image_id"], set()).add(names[ann["category_id"]])
    hits = total = 0
    for objs in per_image.values():
        for o in objs:
            if partner_of(o):
                total += 1
                hits += partner_of(o) in objs
    return hits / max(total, 1)


# ---------------------------------------------------------------------------------------------------------------
# AMBER's format


AMBER_NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")


def amber_word(category: str) -> str:
    """A category as one word of AMBER's vocabulary: its last word ("traffic light" -> "light"), as AMBER's nouns
    are single tokens."""
    return category.split()[-1]


def glyph_mask(obj: str, box, image_size: int) -> np.ndarray:
    """The pixels the renderer draws for ``obj`` in ``box`` (bool, image_size x image_size), noise aside."""
    shape, _ = glyph_of(categories().index(obj))
    mask = Image.new("L", (image_size, image_size), 0)
    draw_glyph(ImageDraw.Draw(mask), shape, 255, box)
    return np.asarray(mask) > 0


def in_contact(mask: np.ndarray, other: np.ndarray) -> bool:
    """True when two drawn glyphs overlap or touch (a pixel of one among the 8 neighbours of a pixel of the other)."""
    grown = mask.copy()
    grown[1:, :] |= mask[:-1, :]
    grown[:-1, :] |= mask[1:, :]
    wide = grown.copy()
    wide[:, 1:] |= grown[:, :-1]
    wide[:, :-1] |= grown[:, 1:]
    return bool((wide & other).any())


def _plural(name: str) -> str:
    from lemminflect import getInflection

    *head, last = name.split()
    forms = getInflection(last, tag="NNS")
    return " ".join([*head, forms[0] if forms else last + "s"])


def _how_many(name: str, n: int) -> str:
    """"Is there one fork" / "Are there two forks"."""
    if n == 1:
        return f"Is there one {name}"
    return f"Are there {AMBER_NUMBERS[n] if n < len(AMBER_NUMBERS) else n} {_plural(name)}"


AMBER_WORDINGS = ("amber", "toy")
# wording="toy": the questions in words the toy model knows (its word-level vocabulary: captions, prompts, the POPE
# question and the category names; halludpo.pretrain.toy_vocabulary). AMBER's own wording is kept where the toy
# knows every word (existence, colour and size questions); relation questions ask whether one object is "on" the
# other ("direct contact" and "between" are unknown words); number questions are left out (no numerals or plurals).
TOY_RELATION_QUESTION = "Is the {a} on the {b} in this image?"


def write_amber_split(world_dir: str | Path, out_dir: str | Path, split: str = "eval", n_hallu: int = 5,
                      seed: int = 0, wording: str = "amber", image_ids: Iterable[int] | None = None) -> dict:
    """Write a rendered split of the toy world in AMBER's format, so halludpo.metrics.amber can score it.

    Reads ``world_dir/<split>/instances.json`` and ``world_dir/world.json``; writes into ``out_dir``
    annotations.json, relation.json, safe_words.txt (empty), query_generative.json, query_discriminative.json and
    query_discriminative-{attribute,existence,relation}.json. Ids follow AMBER: one generative item per image
    (1..N, images in file order), then the attribute, existence and relation questions in that order. Query
    entries also carry the toy ``image_id``. Words in the annotation lists are :func:`amber_word`; question texts
    use the category names.

    - truth: the image's categories in annotation order; hallu: up to ``n_hallu`` absent categories that co-occur
      with the present ones in this split, most co-occurrences first (summed over the present categories), ties
      by name (a partner of a present object usually comes first).
    - attribute (kinds state and number; the toy world draws no actions), per present category, each a "yes"
      question followed by a "no" one: its glyph colour against another colour (drawn with ``seed``), its size
      class as the captions name it (small below the middle of the glyph size range, else large) against the
      other, and its instance count against one more.
    - existence: "Is there a <hallu> in this image?", all "no", as in AMBER.
    - relation: "Is there direct contact between the <a> and <b>?" for every pair of present categories: "yes"
      when their drawn glyphs overlap or touch.

    relation.json maps every category's word to its one-word synonyms of the toy world's table. Returns the
    counts per task and dimension.

    wording: "amber" (AMBER's question texts, above) or "toy" (TOY_RELATION_QUESTION for relations, no number
    questions: the words a toy model can read). image_ids: only these images of the split get items (in the split's
    file order; the co-occurrence statistics still count every image of the split); None = all.
    """
    if wording not in AMBER_WORDINGS:
        raise ValueError(f"wording={wording!r}; valid: {', '.join(AMBER_WORDINGS)}")
    from halludpo.io import read_json

    world_dir, out_dir = Path(world_dir), Path(out_dir)
    world = read_json(world_dir / "world.json")
    instances = read_json(world_dir / split / "instances.json")
    config = world["config"]
    size_middle = (config["min_glyph"] + config["max_glyph"]) / 2
    words = {category: amber_word(category) for category in categories()}
    if len(set(words.values())) != len(words):
        raise ValueError("two toy categories share their AMBER word")
    names = {category["id"]: category["name"] for category in instances["categories"]}
    placed: dict[int, list[tuple[str, list]]] = {image["id"]: [] for image in instances["images"]}
    for annotation in instances["annotations"]:
        placed[annotation["image_id"]].append((names[annotation["category_id"]], annotation["bbox"]))
    present = {image_id: list(dict.fromkeys(name for name, _ in objects)) for image_id, objects in placed.items()}
    co: dict[str, dict[str, int]] = {}
    for objects in present.values():
        for a in objects:
            for b in objects:
                if a != b:
                    co.setdefault(a, {})[b] = co.get(a, {}).get(b, 0) + 1

    annotations, generative_queries = [], []
    attribute, existence, relation = [], [], []  # (image, truth, type, query) per dimension, in AMBER's id order
    chosen = None if image_ids is None else set(image_ids)
    if chosen is not None and not chosen <= set(placed):
        raise ValueError(f"image ids not in the {split} split: {sorted(chosen - set(placed))[:5]}")
    images = [image for image in instances["images"] if chosen is None or image["id"] in chosen]
    for k, image in enumerate(images, start=1):
        image_id, objects = image["id"], present[image["id"]]
        scores = {name: sum(co.get(p, {}).get(name, 0) for p in objects) for name in categories()
                  if name not in objects}
        hallu = [name for name in sorted(scores, key=lambda n: (-scores[n], n)) if scores[name] > 0][:n_hallu]
        annotations.append({"id": k, "type": "generative", "truth": [words[n] for n in objects],
                            "hallu": [words[n] for n in hallu]})
        generative_queries.append({"id": k, "image": image["file_name"], "query": "Describe this image.",
                                   "image_id": image_id})
        masks = {}
        for name in objects:
            boxes = [box for other, box in placed[image_id] if other == name]
            _, colour = glyph_of(categories().index(name))
            rng = random.Random(f"{seed}/amber/{image_id}/{name}")
            wrong = rng.choice([c for c in COLOURS if c != colour])
            size = "small" if boxes[0][2] < size_middle else "large"
            other_size = "large" if size == "small" else "small"
            count = len(boxes)
            asked = [
                ("yes", f"Is the {name} {colour} in this image?", "state"),
                ("no", f"Is the {name} {wrong} in this image?", "state"),
                ("yes", f"Is the {name} {size} in this image?", "state"),
                ("no", f"Is the {name} {other_size} in this image?", "state"),
            ]
            if wording == "amber":
                asked += [("yes", f"{_how_many(name, count)} in this image?", "number"),
                          ("no", f"{_how_many(name, count + 1)} in this image?", "number")]
            for truth, query, kind in asked:
                attribute.append((image, truth, f"discriminative-attribute-{kind}", query))
            masks[name] = np.zeros((image["height"], image["width"]), dtype=bool)
            for box in boxes:
                masks[name] |= glyph_mask(name, box, image["width"])
        for name in hallu:
            existence.append((image, "no", "discriminative-hallucination",
                              f"Is there {article(name)} {name} in this image?"))
        for i, a in enumerate(objects):
            for b in objects[i + 1:]:
                truth = "yes" if in_contact(masks[a], masks[b]) else "no"
                query = (f"Is there direct contact between the {a} and {b}?" if wording == "amber"
                         else TOY_RELATION_QUESTION.format(a=a, b=b))
                relation.append((image, truth, "discriminative-relation", query))

    queries: dict[str, list[dict]] = {"attribute": [], "existence": [], "relation": []}
    next_id = len(annotations) + 1
    for dimension, questions in (("attribute", attribute), ("existence", existence), ("relation", relation)):
        for image, truth, kind, query in questions:
            annotations.append({"id": next_id, "type": kind, "truth": truth})
            queries[dimension].append({"id": next_id, "image": image["file_name"], "query": query,
                                       "image_id": image["id"]})
            next_id += 1
    write_json(out_dir / "annotations.json", annotations)
    write_json(out_dir / "relation.json",
               {words[c]: [s for s in SYNONYMS.get(c, []) if " " not in s] for c in categories()})
    write_text(out_dir / "safe_words.txt", "")
    write_json(out_dir / "query_generative.json", generative_queries)
    write_json(out_dir / "query_discriminative.json",
               queries["attribute"] + queries["existence"] + queries["relation"])
    for dimension, rows in queries.items():
        write_json(out_dir / f"query_discriminative-{dimension}.json", rows)
    return {"generative": len(generative_queries), **{dimension: len(rows) for dimension, rows in queries.items()}}


__all__ = ["WorldConfig", "render_world", "categories", "partner_of", "vocabulary_text", "DESCRIBE_PROMPTS",
           "QUESTION_TEMPLATE", "article", "cooccurrence_rate"]
