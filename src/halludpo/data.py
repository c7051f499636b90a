"""Stage `data`: the data set every later stage reads, written into cfg.paths.data_dir by data.kind.

    python -m halludpo.data                    # toy (rule render): images, COCO instances, captions, vocabulary
    python -m halludpo.data data=coco          # coco (rule prepare): splits from the downloaded files

COCO (prepare_coco) reads only downloaded files (configs/data/coco.yaml `sources`) and writes:
    gen/instances.json     COCO-format image list of detail-23k's COCO 2017 train images (no annotations);
                           each image keeps its detail-23k prompt (images[].prompt)
    gen/prompts.json       the distinct detail-23k prompts with their counts
    eval/instances.json    OPERA's 500 CHAIR images (val2014) with their instance annotations, in OPERA's order
    eval/captions.json     their val2014 reference captions (CHAIR's ground truth adds caption objects)
    chair_image_ids.json   OPERA's image ids in OPERA's order (eval.chair.image_ids_file)
    pope/<split>.jsonl     POPE's released questions as the evaluate stage's rows
                           {question_id, image_id, file_name, object, label, text}
    vocabulary.txt         CHAIR's COCO synonym table (halludpo/resources/coco_synonyms.txt)
    prepared.json          counts and source checksums, written last (the rule's completion marker)
Everything goes to a temporary folder renamed into place at the end: a failure leaves no half-written data set.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import re
import shutil
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from halludpo import paths
from halludpo.config import stage_main
from halludpo.io import InputError, iter_jsonl, read_json, sha256_file, write_json, write_jsonl, write_text
from halludpo.toyworld import WorldConfig, render_world

log = logging.getLogger(__name__)


def render_toy_data(out_dir: str | Path, splits: dict[str, int], seed: int, world: dict,
                    progress: bool = True) -> dict:
    """Render into a temporary folder and rename it into place, so a crash leaves no half-written world."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    stats = render_world(tmp, dict(splits), seed, WorldConfig(**world), progress=progress)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return stats


# ---------------------------------------------------------------------------------------------------------------
# COCO from the downloads

POPE_QUESTION = re.compile(r"^Is there (?:a|an) (?P<object>.+?) in the image\?$")
TRAILING_ID = re.compile(r"(\d+)$")
LAYOUT = {  # data config key -> file under data_dir; prepare_coco writes exactly these
    "gen_instances": "gen/instances.json",
    "eval_instances": "eval/instances.json",
    "eval_captions": "eval/captions.json",
    "vocabulary": "vocabulary.txt",
}


def _load_coco(path: str | Path):
    """pycocotools' COCO of an annotation file, quietly (it prints progress), with a clear error for a bad file."""
    from pycocotools.coco import COCO

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return COCO(str(path))
    except json.JSONDecodeError as err:
        raise InputError(f"{path}:{err.lineno}: invalid JSON ({err.msg})") from None
    except (KeyError, TypeError) as err:
        raise InputError(f"{path}: not a COCO annotation file ({type(err).__name__}: {err})") from None


def _image_id_of(file_name: str) -> int | None:
    """COCO's numeric id from a file name: 000000442786.jpg and COCO_val2014_000000442786.jpg -> 442786."""
    match = TRAILING_ID.search(Path(file_name).stem)
    return int(match.group(1)) if match else None


def read_detail_23k(path: str | Path) -> list[dict]:
    """LLaVA's detail_23k.json -> [{image_id, file_name, prompt}], one per image (the first entry of an image).

    An entry: {"id", "image": "000000442786.jpg", "conversations": [{"from": "human", "value": "<image>\\n..."},
    {"from": "gpt", ...}]}; the prompt is the human turn without the <image> token.
    """
    data = read_json(path)
    if not isinstance(data, list) or not data:
        raise InputError(f"{path}: expected a non-empty JSON list of detail-23k entries")
    rows, seen = [], set()
    for i, entry in enumerate(data):
        where = f"{path}: entry {i}" + (f" (id {entry.get('id')!r})" if isinstance(entry, dict) else "")
        if not isinstance(entry, dict) or "image" not in entry or "conversations" not in entry:
            raise InputError(f"{where}: expected an object with 'image' and 'conversations'")
        image_id = _image_id_of(str(entry["image"]))
        if image_id is None:
            raise InputError(f"{where}: image {entry['image']!r} is not a COCO file name (no numeric id)")
        turns = entry["conversations"]
        if not isinstance(turns, list) or not turns or not isinstance(turns[0], dict) \
                or turns[0].get("from") != "human" or not isinstance(turns[0].get("value"), str):
            raise InputError(f"{where}: the first conversation turn must be a human turn with a text value")
        prompt = " ".join(turns[0]["value"].replace("<image>", " ").split())
        if not prompt:
            raise InputError(f"{where}: empty prompt")
        if image_id in seen:
            continue
        seen.add(image_id)
        rows.append({"image_id": image_id, "file_name": str(entry["image"]), "prompt": prompt})
    return rows


def read_image_list(path: str | Path) -> list[tuple[int, int]]:
    """OPERA's CHAIR list (one {"image_id", ...} per line) -> [(image_id, line)] in file order, no repeats."""
    ids, seen = [], {}
    for lineno, row in iter_jsonl(path):
        image_id = row.get("image_id")
        if isinstance(image_id, str) and image_id.isdigit():
            image_id = int(image_id)
        if not isinstance(image_id, int) or isinstance(image_id, bool):
            raise InputError(f"{path}:{lineno}: missing or non-integer 'image_id' ({image_id!r})")
        if image_id in seen:
            raise InputError(f"{path}:{lineno}: image {image_id} repeats line {seen[image_id]}")
        seen[image_id] = lineno
        ids.append((image_id, lineno))
    if not ids:
        raise InputError(f"{path}: no image ids")
    return ids


def read_pope_file(path: str | Path, images_dir: str | Path | None = None) -> list[dict]:
    """A released POPE file (JSON Lines {question_id, image, text, label}) -> the evaluate stage's question rows
    {question_id, image_id, file_name, object, label, text}. With images_dir, every image must be there."""
    rows, checked = [], set()
    for lineno, row in iter_jsonl(path):
        missing = [k for k in ("question_id", "image", "text", "label") if k not in row]
        if missing:
            raise InputError(f"{path}:{lineno}: missing field(s) {missing}")
        match = POPE_QUESTION.match(str(row["text"]).strip())
        if not match:
            raise InputError(f"{path}:{lineno}: question {row['text']!r} is not 'Is there a/an <object> in the "
                             "image?'")
        label = str(row["label"]).strip().lower()
        if label not in ("yes", "no"):
            raise InputError(f"{path}:{lineno}: label {row['label']!r} is not yes or no")
        image_id = _image_id_of(str(row["image"]))
        if image_id is None:
            raise InputError(f"{path}:{lineno}: image {row['image']!r} is not a COCO file name (no numeric id)")
        if images_dir is not None and row["image"] not in checked:
            if not (Path(images_dir) / row["image"]).is_file():
                raise InputError(f"{path}:{lineno}: image {row['image']} not found in {images_dir}")
            checked.add(row["image"])
        rows.append({"question_id": row["question_id"], "image_id": image_id, "file_name": str(row["image"]),
                     "object": match.group("object"), "label": label, "text": str(row["text"]).strip()})
    if not rows:
        raise InputError(f"{path}: no questions")
    return rows


def gen_split(detail: Sequence[dict], images_dir: str | Path, categories: list[dict],
              source: str | Path = "detail-23k") -> dict:
    """COCO-format instances of the self-generation images (no annotations: they are unlabelled); every image
    must exist and be readable under images_dir (its size is read from the header)."""
    from PIL import Image, UnidentifiedImageError

    images = []
    for row in detail:
        path = Path(images_dir) / row["file_name"]
        try:
            with Image.open(path) as im:
                width, height = im.size
        except FileNotFoundError:
            raise InputError(f"{source}: image {row['file_name']} (id {row['image_id']}) not found in "
                             f"{images_dir}") from None
        except (UnidentifiedImageError, OSError) as err:
            raise InputError(f"{path}: not a readable image ({err})") from None
        images.append({"id": row["image_id"], "file_name": row["file_name"], "width": width, "height": height,
                       "prompt": row["prompt"]})
    return {"info": {"description": f"unlabelled self-generation images ({source})"}, "images": images,
            "annotations": [], "categories": categories}


def eval_split(instances, captions, image_ids: Sequence[tuple[int, int]], list_path: str | Path,
               instances_path: str | Path = "the instances file",
               images_dir: str | Path | None = None) -> tuple[dict, dict]:
    """(instances, captions) of the listed images [(image_id, line)], in list order, from pycocotools COCO objects
    of val2014 (instances_path only names the file in errors)."""
    unknown = [(i, line) for i, line in image_ids if i not in instances.imgs]
    if unknown:
        i, line = unknown[0]
        raise InputError(f"{list_path}:{line}: image {i} is not in {instances_path} "
                         f"({len(unknown)} unknown id(s) in all)")
    ids = [i for i, _ in image_ids]
    if images_dir is not None:
        for (i, line), image in zip(image_ids, instances.loadImgs(ids)):
            if not (Path(images_dir) / image["file_name"]).is_file():
                raise InputError(f"{list_path}:{line}: image {image['file_name']} not found in {images_dir}")
    images = instances.loadImgs(ids)
    inst = {"info": {"description": f"CHAIR images of {list_path}"}, "images": images,
            "annotations": instances.loadAnns(instances.getAnnIds(imgIds=ids)),
            "categories": instances.loadCats(instances.getCatIds())}
    caps = {"info": {"description": f"reference captions of the CHAIR images of {list_path}"}, "images": images,
            "annotations": captions.loadAnns(captions.getAnnIds(imgIds=ids))}
    no_caption = [i for i in ids if not captions.getAnnIds(imgIds=[i])]
    if no_caption:
        log.warning("%d CHAIR images have no reference caption (e.g. %s)", len(no_caption), no_caption[:5])
    return inst, caps


def prepare_coco(out_dir: str | Path, sources: Mapping, gen_images: str | Path, eval_images: str | Path,
                 pope_splits: Sequence[str]) -> dict:
    """Write the COCO data set (module docstring) into a temporary folder, then rename it onto out_dir."""
    from halludpo.metrics.chair import coco_synonyms_path

    out_dir = Path(out_dir)
    unknown = [s for s in pope_splits if s not in sources["pope"]]
    if unknown:
        raise ValueError(f"eval.pope.splits {unknown}: no released POPE file configured (data.sources.pope has "
                         f"{sorted(sources['pope'])})")
    chair_list = read_image_list(sources["chair_image_list"])
    pope = {s: read_pope_file(sources["pope"][s], eval_images) for s in pope_splits}
    detail = read_detail_23k(sources["detail_23k"])
    instances, captions = _load_coco(sources["instances"]), _load_coco(sources["captions"])
    inst, caps = eval_split(instances, captions, chair_list, sources["chair_image_list"], sources["instances"],
                            eval_images)
    gen = gen_split(detail, gen_images, inst["categories"], sources["detail_23k"])
    prompts = Counter(row["prompt"] for row in detail)

    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    write_json(tmp / LAYOUT["gen_instances"], gen)
    write_json(tmp / "gen" / "prompts.json", [{"prompt": p, "images": n} for p, n in prompts.most_common()])
    write_json(tmp / LAYOUT["eval_instances"], inst)
    write_json(tmp / LAYOUT["eval_captions"], caps)
    write_json(tmp / "chair_image_ids.json", [i for i, _ in chair_list])
    for split, rows in pope.items():
        write_jsonl(tmp / "pope" / f"{split}.jsonl", rows)
    write_text(tmp / LAYOUT["vocabulary"], coco_synonyms_path().read_text(encoding="utf-8"))
    stats = {
        "kind": "coco",
        "gen": {"images": len(gen["images"]), "prompts": len(prompts)},
        "eval": {"images": len(inst["images"]), "annotations": len(inst["annotations"]),
                 "captions": len(caps["annotations"]), "categories": len(inst["categories"])},
        "pope": {s: {"questions": len(rows), "images": len({r["image_id"] for r in rows}),
                     "yes": sum(r["label"] == "yes" for r in rows)} for s, rows in pope.items()},
        "sources": {k: str(v) for k, v in sources.items() if k != "pope"}
        | {f"pope_{s}": str(sources["pope"][s]) for s in pope_splits},
        "sources_sha256": {"detail_23k": sha256_file(sources["detail_23k"]),
                           "chair_image_list": sha256_file(sources["chair_image_list"])}
        | {f"pope_{s}": sha256_file(sources["pope"][s]) for s in pope_splits},
        "gen_images": str(gen_images), "eval_images": str(eval_images),
    }
    write_json(tmp / "prepared.json", stats)  # last: the marker
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return stats


def check_layout(cfg: DictConfig) -> None:
    """The data config's output paths must be the files prepare_coco writes under paths.data_dir."""
    data_dir = Path(cfg.paths.data_dir)
    expected = {key: data_dir / rel for key, rel in LAYOUT.items()}
    expected |= {"marker": data_dir / "prepared.json"}
    actual = {key: Path(cfg.data[key]) for key in LAYOUT} | {"marker": paths.data_done(cfg)}
    wrong = {k: str(v) for k, v in actual.items() if v != expected[k]}
    if wrong:
        raise ValueError(f"data.kind=coco writes {', '.join(f'{k}={expected[k]}' for k in wrong)}; "
                         f"the config says {wrong}")


def warn_prompt_mismatch(cfg: DictConfig, prompts: Sequence[str]) -> list[str]:
    """With a prompt list, generate draws each image's prompt from method.generation.prompts (seeded), not each
    image's own detail-23k prompt (method.generation.prompts=image): say when the configured list is not the
    detail-23k prompt set. Returns the warnings."""
    configured = OmegaConf.select(cfg, "method.generation.prompts")
    if configured is None or isinstance(configured, str):
        return []
    warnings = []
    outside, absent = sorted(set(configured) - set(prompts)), sorted(set(prompts) - set(configured))
    if outside:
        warnings.append(f"method.generation.prompts has {len(outside)} prompt(s) that no detail-23k entry uses, "
                        f"e.g. {outside[0]!r}")
    if absent:
        warnings.append(f"{len(absent)} detail-23k prompt(s) are not in method.generation.prompts, e.g. "
                        f"{absent[0]!r} (the full set: gen/prompts.json)")
    for warning in warnings:
        log.warning("%s", warning)
    return warnings


def run(cfg: DictConfig) -> None:
    if cfg.data.kind == "toy":
        stats = render_toy_data(cfg.paths.data_dir, cfg.data.splits, cfg.data.seed, cfg.data.world)
        for split, s in stats.items():
            log.info("%s: %s", split, s)
        return
    if cfg.data.kind != "coco":
        raise ValueError(f"data.kind={cfg.data.kind!r}; known: toy (rendered), coco (prepared from the downloads)")
    check_layout(cfg)
    stats = prepare_coco(cfg.paths.data_dir, OmegaConf.to_container(cfg.data.sources, resolve=True),
                         cfg.data.gen_images, cfg.data.eval_images, list(cfg.eval.pope.splits))
    prompts = [p["prompt"] for p in read_json(Path(cfg.paths.data_dir) / "gen" / "prompts.json")]
    warn_prompt_mismatch(cfg, prompts)
    log.info("prepared %s: %s", cfg.paths.data_dir, {k: stats[k] for k in ("gen", "eval", "pope")})


main = stage_main(run)

if __name__ == "__main__":
    main()
