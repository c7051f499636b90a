"""Import/export of other preference formats: tiny fixtures of each layout built here, nothing downloaded."""

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from halludpo.interop import FORMATS, export_pairs, import_pairs, main
from halludpo.io import InputError, read_jsonl

PAIR_FIELDS = ("image_id", "image_path", "prompt", "context", "chosen", "rejected", "method", "meta")
# RLHF-V's stored log-probs: [win, win_avg, win_per_token, rej, rej_avg, rej_per_token]
LOGPS = [-10.5, -0.5, [-4.0, -6.5], -20.25, -0.75, [-10.0, -10.25]]


def png_bytes(color: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, format="PNG")
    return buf.getvalue()


def write_parquet(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def per_token_dropped(logps):
    """What survives a round trip: per-token lists are not kept."""
    return [logps[0], logps[1], [], logps[3], logps[4], []]


@pytest.fixture
def image_root(tmp_path):
    """a.png, sub/b.png, and Visual-Genome-like VG_100K/101.png, VG_100K_2/102.png."""
    root = tmp_path / "image_root"
    for rel, color in (("a.png", "red"), ("sub/b.png", "blue"), ("VG_100K/101.png", "green"),
                       ("VG_100K_2/102.png", "white")):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(png_bytes(color))
    return root


def apasi_rows():
    text = {"question": "<image>\nDescribe this image in detail.", "chosen": "A red square.",
            "rejected": "A red square. There is a cat on it."}
    meta = {"ds_name": "SI-23k", "origin_dataset": "detail_23k",
            "origin_split": json.dumps({"model": "llava-v1.5-7b", "type": "detailed_description"}), "score": 0.5}
    return [
        {**meta, "text": json.dumps(text | {"logps": LOGPS}), "idx": 0, "image_path": "a.png"},
        {**meta, "text": json.dumps(text | {"chosen": "A blue square."}), "idx": 1, "image_path": "sub/b.png"},
        # the authors' own relative path: found as image_root/<file name>
        {**meta, "text": json.dumps(text), "idx": 2, "image_path": "../../pub_dataset/coco/train2017/a.png"},
    ]


def test_apasi_round_trip(tmp_path, image_root):
    src = write_parquet(tmp_path / "SI-23k.parquet", apasi_rows())
    stats = import_pairs("apasi", src, tmp_path / "out" / "pairs.jsonl", image_root)
    assert stats["pairs"] == 3 and stats["with_ref_logps"] == 1 and stats["skipped_missing_images"] == 0

    rows = read_jsonl(tmp_path / "out" / "pairs.jsonl", required=PAIR_FIELDS)
    first = rows[0]
    assert first["image_path"] == str(image_root / "a.png") and first["image_id"] == "a"
    assert first["prompt"] == "Describe this image in detail." and first["context"] == ""
    assert first["ref_logps"] == {"chosen": -10.5, "rejected": -20.25}
    assert first["meta"]["ref_avg_logps"] == {"chosen": -0.5, "rejected": -0.75}
    assert first["meta"]["score"] == 0.5 and first["meta"]["origin_dataset"] == "detail_23k"
    assert rows[1]["image_path"] == str(image_root / "sub" / "b.png") and "ref_logps" not in rows[1]
    assert rows[2]["image_path"] == str(image_root / "a.png")

    export_pairs("apasi", tmp_path / "out" / "pairs.jsonl", tmp_path / "back.parquet", image_paths="source")
    back = pq.read_table(tmp_path / "back.parquet").to_pylist()
    for original, exported, row in zip(apasi_rows(), back, rows, strict=True):
        assert json.loads(exported.pop("halludpo"))["pair"] == row  # ours, for a round trip through this file
        text, exported_text = json.loads(original.pop("text")), json.loads(exported.pop("text"))
        if "logps" in text:
            text["logps"] = per_token_dropped(text["logps"])
        assert exported_text == text
        assert exported == original


def test_rlaif_v_round_trip_writes_embedded_images_once(tmp_path):
    image = {"bytes": png_bytes("green"), "path": "x.png"}
    source = [
        {"ds_name": "RLAIF-V-Dataset", "image": image, "question": "What is in the image?", "chosen": "A square.",
         "rejected": "A circle.", "origin_dataset": "OK-VQA", "origin_split": json.dumps({"type": "qa"}),
         "idx": "OK-VQA_0", "image_path": "OK-VQA/x.png", "logps": json.dumps({"logps": LOGPS})},
        {"ds_name": "RLAIF-V-Dataset", "image": image, "question": "Describe it.", "chosen": "Green.",
         "rejected": "Green, with a dog.", "origin_dataset": "OK-VQA", "origin_split": json.dumps({"type": "dd"}),
         "idx": "OK-VQA_1", "image_path": "OK-VQA/x.png", "logps": None},
    ]
    src = write_parquet(tmp_path / "RLAIF-V-Dataset_000.parquet", source)
    stats = import_pairs("rlaif_v", src, tmp_path / "out" / "pairs.jsonl")  # no image_root: bytes are embedded
    assert stats["pairs"] == 2 and stats["images_written"] == 1
    written = list((tmp_path / "out" / "images").iterdir())
    assert len(written) == 1 and written[0].read_bytes() == image["bytes"] and written[0].suffix == ".png"

    rows = read_jsonl(tmp_path / "out" / "pairs.jsonl")
    assert {r["image_path"] for r in rows} == {str(written[0])}
    assert rows[0]["ref_logps"] == {"chosen": -10.5, "rejected": -20.25} and "ref_logps" not in rows[1]
    assert rows[0]["meta"]["idx"] == "OK-VQA_0" and rows[0]["method"] == "rlaif_v"

    export_pairs("rlaif_v", tmp_path / "out" / "pairs.jsonl", tmp_path / "back.parquet", image_paths="source")
    back = pq.read_table(tmp_path / "back.parquet").to_pylist()
    for original, exported in zip(source, back, strict=True):
        assert exported.pop("image")["bytes"] == original.pop("image")["bytes"] and exported.pop("halludpo")
        if original["logps"]:
            original["logps"] = json.dumps({"logps": per_token_dropped(LOGPS)})
        assert exported == original


SENTINEL = {
    "101": [{"question": "Describe this image.", "context": "A green square.", "y_win": "It has a border.",
             "y_lose": "A cat sits on it.", "type": "context-coherent"},
            {"question": "Describe this image.", "context": "A green square. It has a border.",
             "y_win": "The border is thin.", "y_lose": "A dog is nearby.", "type": "other"}],
    "102": [{"question": "Describe this image.", "context": "A white square.", "y_win": "It is plain.",
             "y_lose": "It holds a vase.", "type": "context-coherent", "is_last_sent": True}],
}


def test_sentinel_round_trip(tmp_path, image_root):
    src = tmp_path / "LLaVA_v1_5_7b_SENTINEL.json"
    src.write_text(json.dumps(SENTINEL))
    import_pairs("sentinel", src, tmp_path / "pairs.jsonl", image_root)
    rows = read_jsonl(tmp_path / "pairs.jsonl")
    assert [r["image_id"] for r in rows] == ["101", "101", "102"]
    assert rows[0]["image_path"] == str(image_root / "VG_100K" / "101.png")  # found by id under the root
    assert rows[2]["image_path"] == str(image_root / "VG_100K_2" / "102.png")
    assert (rows[1]["context"], rows[1]["chosen"], rows[1]["rejected"]) == (
        "A green square. It has a border.", "The border is thin.", "A dog is nearby.")
    assert rows[0]["meta"]["type"] == "context-coherent" and rows[2]["meta"]["is_last_sent"] is True

    export_pairs("sentinel", tmp_path / "pairs.jsonl", tmp_path / "back.json", image_root=image_root)
    back = json.loads((tmp_path / "back.json").read_text())
    assert back.keys() == SENTINEL.keys()
    for image_id, entries in SENTINEL.items():
        for original, exported in zip(entries, back[image_id], strict=True):
            assert exported.pop("image_path").startswith("VG_100K")  # added: re-import needs no search
            assert exported.pop("halludpo")
            assert exported == original

    # the flat *_data_pair.jsonl layout re-imports to the same pairs
    export_pairs("sentinel", tmp_path / "pairs.jsonl", tmp_path / "flat.jsonl", image_root=image_root)
    import_pairs("sentinel", tmp_path / "flat.jsonl", tmp_path / "again.jsonl", image_root)
    again = read_jsonl(tmp_path / "again.jsonl")
    assert [(r["image_path"], r["context"], r["chosen"]) for r in again] == \
        [(r["image_path"], r["context"], r["chosen"]) for r in rows]


LLAMAFACTORY = {
    "sharegpt": {"conversations": [{"from": "human", "value": "<image>Describe the image."}],
                 "chosen": {"from": "gpt", "value": "A red square."},
                 "rejected": {"from": "gpt", "value": "A red square and a dog."}, "images": ["a.png"]},
    "alpaca": {"instruction": "<image>Describe the image.", "input": "", "chosen": "A blue square.",
               "rejected": "A blue square and a cup.", "images": ["sub/b.png"]},
}


@pytest.mark.parametrize("style", sorted(LLAMAFACTORY))
def test_llamafactory_round_trip(tmp_path, image_root, style):
    src = tmp_path / "dpo.json"
    src.write_text(json.dumps([LLAMAFACTORY[style]]))
    import_pairs("llamafactory", src, tmp_path / "pairs.jsonl", image_root)
    (row,) = read_jsonl(tmp_path / "pairs.jsonl")
    assert row["prompt"] == "Describe the image." and row["meta"]["source_style"] == style
    assert row["image_path"] == str(image_root / LLAMAFACTORY[style]["images"][0])

    export_pairs("llamafactory", tmp_path / "pairs.jsonl", tmp_path / "back.json", image_root=image_root)
    (back,) = json.loads((tmp_path / "back.json").read_text())
    assert json.loads(back.pop("halludpo"))["export"]["image_paths"] == "relative"
    assert back == LLAMAFACTORY[style]


TRL = {
    "conversational": {
        "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}],
        "chosen": [{"role": "assistant", "content": [{"type": "text", "text": "A red square."}]}],
        "rejected": [{"role": "assistant", "content": [{"type": "text", "text": "A red square and a bus."}]}],
        "images": ["a.png"]},
    "standard": {"prompt": "<image>Describe the image.", "chosen": "A red square.",
                 "rejected": "A red square and a bus.", "images": ["a.png"]},
}


@pytest.mark.parametrize("style", sorted(TRL))
def test_trl_round_trip(tmp_path, image_root, style):
    src = tmp_path / "trl.jsonl"
    src.write_text(json.dumps(TRL[style]) + "\n")
    import_pairs("trl", src, tmp_path / "pairs.jsonl", image_root)
    (row,) = read_jsonl(tmp_path / "pairs.jsonl")
    assert (row["prompt"], row["chosen"], row["rejected"]) == (
        "Describe the image.", "A red square.", "A red square and a bus.")

    export_pairs("trl", tmp_path / "pairs.jsonl", tmp_path / "back.jsonl", image_root=image_root)
    (back,) = read_jsonl(tmp_path / "back.jsonl")
    assert back.pop("halludpo") and back == TRL[style]


def test_trl_parquet_with_embedded_image(tmp_path):
    record = TRL["conversational"] | {"images": [{"bytes": png_bytes("red"), "path": "a.png"}]}
    src = write_parquet(tmp_path / "trl.parquet", [record])
    import_pairs("trl", src, tmp_path / "out" / "pairs.jsonl")
    (row,) = read_jsonl(tmp_path / "out" / "pairs.jsonl")
    assert open(row["image_path"], "rb").read() == png_bytes("red") and row["image_id"] == "a"


@pytest.mark.parametrize("fmt", ["apasi", "rlaif_v", "llamafactory", "trl"])
def test_formats_without_a_context_field_refuse_context_pairs(tmp_path, image_root, fmt):
    src = tmp_path / "sentinel.json"
    src.write_text(json.dumps(SENTINEL))
    import_pairs("sentinel", src, tmp_path / "pairs.jsonl", image_root)
    out = tmp_path / f"out{FORMATS[fmt].suffixes[0]}"
    with pytest.raises(SystemExit, match=rf"^error: .*pairs\.jsonl: 3 of 3 pairs continue an answer \(a context "
                                         rf"before the response, or meta\.is_last_sent false.*{fmt} has no unscored "
                                         r"prefix.*pass --flatten-context[^\n]*$"):
        main(["export", "--format", fmt, "--src", str(tmp_path / "pairs.jsonl"), "--out", str(out)])
    assert not out.exists()


def test_flatten_context_puts_it_in_front_of_the_responses(tmp_path, image_root):
    src = tmp_path / "sentinel.json"
    src.write_text(json.dumps(SENTINEL))
    import_pairs("sentinel", src, tmp_path / "pairs.jsonl", image_root)
    stats = export_pairs("trl", tmp_path / "pairs.jsonl", tmp_path / "trl.jsonl", flatten_context=True)
    assert stats["context_joined"] == 3 and stats["context"] == "flattened"
    first = read_jsonl(tmp_path / "trl.jsonl")[0]
    assert first["chosen"][0]["content"][0]["text"] == "A green square. It has a border."
    assert first["rejected"][0]["content"][0]["text"] == "A green square. A cat sits on it."


def test_missing_image_names_file_and_row_or_is_skipped(tmp_path, image_root):
    rows = apasi_rows()
    rows[1]["image_path"] = "nope.png"
    src = write_parquet(tmp_path / "si.parquet", rows)
    with pytest.raises(InputError, match=r"si\.parquet row 2: image not found: 'nope.png'"):
        import_pairs("apasi", src, tmp_path / "pairs.jsonl", image_root)
    assert not (tmp_path / "pairs.jsonl").exists()

    stats = import_pairs("apasi", src, tmp_path / "pairs.jsonl", image_root, skip_missing=True)
    assert stats["pairs"] == 2 and stats["skipped_missing_images"] == 1


def test_missing_image_error_from_the_cli(tmp_path, image_root):
    src = tmp_path / "trl.jsonl"
    src.write_text(json.dumps(TRL["standard"] | {"images": ["gone.png"]}) + "\n")
    with pytest.raises(SystemExit, match=r"error: .*trl\.jsonl row 1: image not found: 'gone.png'"):
        main(["import", "--format", "trl", "--src", str(src), "--out", str(tmp_path / "p.jsonl"),
              "--image-root", str(image_root)])


def test_malformed_rows_are_named(tmp_path, image_root):
    rows = apasi_rows()
    rows[1]["text"] = "{not json"
    src = write_parquet(tmp_path / "si.parquet", rows)
    with pytest.raises(InputError, match=r"si\.parquet row 2: field 'text' is not valid JSON"):
        import_pairs("apasi", src, tmp_path / "pairs.jsonl", image_root)

    trl = tmp_path / "trl.jsonl"
    trl.write_text(json.dumps(TRL["standard"]) + "\n" + json.dumps({"prompt": "Hi", "images": ["a.png"]}) + "\n")
    with pytest.raises(InputError, match=r"trl\.jsonl row 2: field 'chosen' must be"):
        import_pairs("trl", trl, tmp_path / "pairs.jsonl", image_root)

    broken = {"102": [{"question": "Q", "context": "", "y_win": "W"}]}
    (tmp_path / "s.json").write_text(json.dumps(broken))
    with pytest.raises(InputError, match=r"s\.json image '102' row 1: missing field 'y_lose'"):
        import_pairs("sentinel", tmp_path / "s.json", tmp_path / "pairs.jsonl", image_root)

    two_images = TRL["standard"] | {"images": ["a.png", "sub/b.png"]}
    trl.write_text(json.dumps(two_images) + "\n")
    with pytest.raises(InputError, match=r"trl\.jsonl row 1: 2 images; a pair needs exactly one"):
        import_pairs("trl", trl, tmp_path / "pairs.jsonl", image_root)


def test_unknown_format_lists_the_valid_ones(tmp_path):
    valid = ", ".join(sorted(FORMATS))
    assert valid == "apasi, llamafactory, rlaif_v, sentinel, trl"
    with pytest.raises(ValueError, match=f"unknown format 'dpo_x'; valid: {valid}"):
        import_pairs("dpo_x", tmp_path / "a.json", tmp_path / "pairs.jsonl")
    with pytest.raises(ValueError, match=f"unknown format 'dpo_x'; valid: {valid}"):
        export_pairs("dpo_x", tmp_path / "pairs.jsonl", tmp_path / "out.json")
    with pytest.raises(ValueError, match=r"rlaif_v exports to \.parquet files; got out\.json"):
        export_pairs("rlaif_v", tmp_path / "pairs.jsonl", tmp_path / "out.json")


def test_imported_pairs_load_with_datasets(tmp_path, image_root):
    from datasets import load_dataset

    import_pairs("apasi", write_parquet(tmp_path / "si.parquet", apasi_rows()), tmp_path / "apasi.jsonl", image_root)
    (tmp_path / "s.json").write_text(json.dumps(SENTINEL))
    import_pairs("sentinel", tmp_path / "s.json", tmp_path / "sentinel.jsonl", image_root)
    for name, n in (("apasi", 3), ("sentinel", 3)):
        ds = load_dataset("json", data_files=str(tmp_path / f"{name}.jsonl"), split="train",
                          cache_dir=str(tmp_path / "hf_cache"))
        assert ds.num_rows == n and set(PAIR_FIELDS) <= set(ds.column_names)
        assert ds[0]["meta"]["source_format"] == name
    assert ds[2]["context"] == "A white square."


# Our own pairs, as the pipeline writes them: image paths relative to the project root
OURS = {
    "apasi": [
        {"image_id": "7", "image_path": "results/data/toy/images/7.png", "prompt": "Describe this image in detail.",
         "context": "", "chosen": "A red square.", "rejected": "A red square and a dog.", "method": "apasi",
         "meta": {"mode": "insert", "rate": 0.5, "injected_objects": ["dog"], "guide_objects": ["square"],
                  "round": 1, "generator_model": None},
         "ref_logps": {"chosen": -4.5, "rejected": -9.25}},
        {"image_id": "8", "image_path": "results/data/toy/images/8.png", "prompt": "Describe this image in detail.",
         "context": "", "chosen": "A blue circle.", "rejected": "A blue circle near a cup.", "method": "apasi",
         "meta": {"kind": "correction", "removed_objects": ["cup"], "round": 1},
         "contrast_image_path": "results/data/toy/images/7.png", "chosen_contrast": "A red square."},
    ],
    "sentinel": [
        {"image_id": "7", "image_path": "results/data/toy/images/7.png", "prompt": "Describe this image in detail.",
         "context": "A red square.", "chosen": "It has a thin border.", "rejected": "A cat sits on it.",
         "method": "sentinel", "meta": {"step": 1, "type": "context-coherent", "is_last_sent": False,
                                        "chosen_verdicts": {"border": "real"}, "labels": ["real", "hallucinated"]}},
        {"image_id": "7", "image_path": "results/data/toy/images/7.png", "prompt": "Describe this image in detail.",
         "context": "A red square. It has a thin border.", "chosen": "", "rejected": "A dog is nearby.",
         "method": "sentinel", "meta": {"step": 2, "type": "stop_over_hallucinated", "is_last_sent": False}},
        {"image_id": "8", "image_path": "results/data/toy/images/8.png", "prompt": "Describe this image in detail.",
         "context": "A blue circle.", "chosen": "It is plain.", "rejected": "It holds a vase.", "method": "sentinel",
         "meta": {"step": 1, "type": "context-coherent", "is_last_sent": True}},
    ],
}


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A project root with the images under results/data/ and both pair kinds' pairs files; the test starts in it."""
    root = tmp_path / "project"
    (root / "results" / "data" / "toy" / "images").mkdir(parents=True)
    for name, color in (("7.png", "red"), ("8.png", "blue")):
        (root / "results" / "data" / "toy" / "images" / name).write_bytes(png_bytes(color))
    for kind, rows in OURS.items():
        (root / "results" / f"{kind}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.chdir(root)
    return root


@pytest.mark.parametrize("fmt,suffix", [(f.name, suffix) for f in FORMATS.values() for suffix in f.suffixes])
@pytest.mark.parametrize("kind", sorted(OURS))
def test_round_trip_of_our_pairs_is_the_identity(project, tmp_path, fmt, suffix, kind):
    """import(export(pairs)) == pairs: method, image_id, context, meta and every other field come back (from the
    "halludpo" field), the image paths as they were while they name the same files."""
    flatten = kind == "sentinel" and fmt != "sentinel"  # refused otherwise (trl: or rendered with a processor)
    out = tmp_path / "export" / f"pairs{suffix}"
    export_pairs(fmt, f"results/{kind}.jsonl", out, flatten_context=flatten)
    import_pairs(fmt, out, tmp_path / "back" / "pairs.jsonl")
    assert read_jsonl(tmp_path / "back" / "pairs.jsonl") == OURS[kind]


def test_round_trip_from_another_folder_keeps_all_but_the_relative_paths(project, tmp_path, monkeypatch):
    export_pairs("llamafactory", "results/sentinel.jsonl", tmp_path / "lf.json", flatten_context=True)
    monkeypatch.chdir(tmp_path)
    import_pairs("llamafactory", tmp_path / "lf.json", tmp_path / "back.jsonl")
    back = read_jsonl(tmp_path / "back.jsonl")
    assert [r["image_path"] for r in back] == [str(project / r["image_path"]) for r in OURS["sentinel"]]
    assert [r | {"image_path": None} for r in back] == [r | {"image_path": None} for r in OURS["sentinel"]]


def test_edited_rows_are_not_silently_replaced_by_the_record(project, tmp_path):
    export_pairs("trl", "results/apasi.jsonl", tmp_path / "trl.jsonl")
    records = read_jsonl(tmp_path / "trl.jsonl")
    records[1]["chosen"][0]["content"][0]["text"] = "A green circle."
    (tmp_path / "trl.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(InputError, match=r"trl\.jsonl row 2: 'chosen' no longer holds the pair recorded in field "
                                         r"'halludpo' \(edited after the export\?\)"):
        import_pairs("trl", tmp_path / "trl.jsonl", tmp_path / "back.jsonl")


def test_image_paths_absolute_relative_or_from_a_project_root(project, tmp_path, monkeypatch):
    images = project / "results" / "data" / "toy" / "images"
    stats = export_pairs("trl", "results/apasi.jsonl", tmp_path / "abs.jsonl")
    assert stats["image_paths"] == "absolute" and stats["image_root"] is None
    assert [r["images"] for r in read_jsonl(tmp_path / "abs.jsonl")] == [[str(images / "7.png")],
                                                                         [str(images / "8.png")]]

    export_pairs("llamafactory", "results/apasi.jsonl", tmp_path / "rel.json", image_root=project / "results")
    records = json.loads((tmp_path / "rel.json").read_text())
    assert [r["images"] for r in records] == [["data/toy/images/7.png"], ["data/toy/images/8.png"]]
    assert json.loads(records[0]["halludpo"])["export"] == {
        "written_by": "halludpo.interop", "format": "llamafactory", "image_paths": "relative",
        "image_root": str(project / "results"), "context": "none", "processor": None}

    # from elsewhere, the pairs' relative paths start from --project-root; without it they are not found
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match=r"error: .*apasi\.jsonl row 1: image not found: results/data/toy/images/"
                                         r"7\.png \(relative image paths start from the project root, .*; set it "
                                         r"with --project-root\)"):
        main(["export", "--format", "trl", "--src", str(project / "results" / "apasi.jsonl"), "--out", "x.jsonl"])
    stats = main(["export", "--format", "apasi", "--src", str(project / "results" / "apasi.jsonl"),
                  "--out", "si.parquet", "--project-root", str(project)])
    assert stats["image_paths"] == "absolute"
    table = pq.read_table(tmp_path / "si.parquet")
    assert table.column("image_path").to_pylist() == [str(images / "7.png"), str(images / "8.png")]
    assert json.loads(table.schema.metadata[b"halludpo"])["image_paths"] == "absolute"  # the file says which

    with pytest.raises(ValueError, match="relative image paths need the folder they start from: --image-root"):
        export_pairs("trl", project / "results" / "apasi.jsonl", tmp_path / "r.jsonl", image_paths="relative")
    with pytest.raises(ValueError, match="--processor renders trl's plain-text prompts; llamafactory takes none"):
        export_pairs("llamafactory", project / "results" / "apasi.jsonl", tmp_path / "r.json", processor="x")
