"""The contrast stage: stored contrast images (the same file for reference and policy), the cached embeddings, the
stage app on a composed config, clear input errors, and one tiny end-to-end mDPO pipeline."""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from halludpo import paths
from halludpo.config import compose
from halludpo.contrast import (
    contrast_rows,
    corrupt_image,
    example_seed,
    image_contrast_rows,
    load_embeddings,
    nearest_neighbours,
    ranked_neighbours,
    run,
    save_embeddings,
    unique_images,
)
from halludpo.inference import load_image
from halludpo.io import InputError, read_jsonl, write_jsonl
from halludpo.models import load_model_and_processor
from tests.test_pipeline import TINY, job_counts, snakemake
from tests.conftest import TINY_TRAIN

TRAIN = TINY_TRAIN | {"loss": "mdpo"}


@pytest.fixture(scope="module")
def pairs(tiny_world, tiny_model_dir):
    """Two pairs per image on four images (pair index != image index), as the pairs stage writes them."""
    captions = json.loads((tiny_world / "eval" / "captions.json").read_text())["annotations"]
    files = {im["id"]: im["file_name"]
             for im in json.loads((tiny_world / "eval" / "instances.json").read_text())["images"]}
    rows = []
    for c in captions[:4]:
        for extra in (" there is a dog .", " there is a cat ."):
            rows.append({"image_id": c["image_id"], "image_path": str(tiny_world / "eval" / "images" / files[c["image_id"]]),
                         "prompt": "Please describe this image in detail.", "context": "", "chosen": c["caption"],
                         "rejected": c["caption"] + extra, "method": "apasi",
                         "meta": {"generator_model": str(tiny_model_dir)}})
    return rows


def file_sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_image_contrasts_are_stored_once_per_example_and_reproducible(pairs, tmp_path):
    out = image_contrast_rows(pairs, "corrupt", tmp_path / "a" / "contrast_images", seed=3)
    again = image_contrast_rows(pairs, "corrupt", tmp_path / "b" / "contrast_images", seed=3)
    assert len(out) == len(pairs) == len(list((tmp_path / "a" / "contrast_images").iterdir()))
    assert not (tmp_path / "a" / "contrast_images.tmp").exists()
    for i, (row, other) in enumerate(zip(out, again)):
        assert {k: v for k, v in row.items() if k not in ("contrast_image_path", "meta")} == \
            {k: v for k, v in pairs[i].items() if k != "meta"}
        assert row["meta"] == pairs[i]["meta"] | {"contrast_kind": "corrupt",
                                                  "contrast_seed": example_seed(3, row["image_id"], i)}
        stored = load_image(row["contrast_image_path"])
        # the stored PNG is exactly the seeded crop (lossless), reproducible from the seed
        assert stored.tobytes() == corrupt_image(load_image(row["image_path"]), row["meta"]["contrast_seed"]).tobytes()
        assert stored.tobytes() == load_image(other["contrast_image_path"]).tobytes()
        assert stored.tobytes() != load_image(row["image_path"]).tobytes()
    # two pairs on the same image get their own crops (seeded by the pair index)
    assert load_image(out[0]["contrast_image_path"]).tobytes() != load_image(out[1]["contrast_image_path"]).tobytes()
    # a rerun replaces the folder whole
    image_contrast_rows(pairs[:2], "black", tmp_path / "a" / "contrast_images", seed=3)
    assert len(list((tmp_path / "a" / "contrast_images").iterdir())) == 2
    black = np.asarray(load_image(tmp_path / "a" / "contrast_images" / "000000.png"))
    assert black.max() == 0


def test_missing_image_names_the_pairs_line(pairs, tmp_path):
    bad = [dict(pairs[0]), dict(pairs[1], image_path=str(tmp_path / "gone.png"))]
    with pytest.raises(InputError, match=r"pairs.jsonl:2: .*gone.png: image not found"):
        image_contrast_rows(bad, "noise", tmp_path / "contrast_images", 0, {"std": 0.3}, source="pairs.jsonl")
    assert not (tmp_path / "contrast_images").exists() and not (tmp_path / "contrast_images.tmp").exists()


def test_policy_and_reference_score_the_same_stored_contrast_image(pairs, tiny_model_dir, tmp_path, monkeypatch):
    """The reference stage and the trainer both load contrast_image_path, the one stored file: same bytes, and at
    LoRA init (policy == reference) every mDPO term is exactly log 2, which fails if the images differed."""
    import halludpo.logprobs as logprobs
    from halludpo.train import compute_reference_logps, train_preference

    rows = image_contrast_rows(pairs, "corrupt", tmp_path / "contrast_images", seed=0)
    contrast_paths = {r["contrast_image_path"] for r in rows}
    stored = {p: file_sha(p) for p in contrast_paths}
    seen: dict[str, list] = {"reference": [], "policy": []}
    phase = "reference"
    real_load = logprobs.load_image

    def recording_load(path):
        image = real_load(path)
        seen[phase].append((str(path), hashlib.sha256(image.tobytes()).hexdigest()))
        return image

    monkeypatch.setattr(logprobs, "load_image", recording_load)
    model, processor = load_model_and_processor(tiny_model_dir, "toy")
    scored = compute_reference_logps(model, processor, rows, 200, 4, loss="mdpo")
    phase = "policy"
    stats = train_preference(model, processor, scored, tmp_path / "train", TRAIN, str(tiny_model_dir))
    by_phase = {p: {path: h for path, h in seen[p] if path in contrast_paths} for p in seen}
    assert set(by_phase["reference"]) == set(by_phase["policy"]) == contrast_paths
    assert by_phase["reference"] == by_phase["policy"]  # the same pixels, path by path
    assert {p: file_sha(p) for p in contrast_paths} == stored  # the files were written once, never rewritten
    first = stats["history"][0]
    assert first["loss"] == pytest.approx(3 * math.log(2), abs=1e-4)
    assert first["loss/image"] == pytest.approx(math.log(2), abs=1e-5)


def stage_cfg(tmp_path, tiny_model_dir, *overrides):
    return compose([f"paths.results={tmp_path}", f"model.path={tiny_model_dir}", "rounds=1", *overrides])


def test_stage_builds_mdpo_contrast_from_pairs_jsonl(pairs, tiny_model_dir, tmp_path):
    cfg = stage_cfg(tmp_path, tiny_model_dir, "experiment=toy_mdpo")
    write_jsonl(paths.pairs_jsonl(cfg, 0), pairs)
    run(cfg)
    out = read_jsonl(paths.contrast_jsonl(cfg, 0))
    assert len(out) == len(pairs) and paths.scored_pairs_jsonl(cfg, 0) == paths.contrast_jsonl(cfg, 0)
    images = sorted(paths.contrast_images_dir(cfg, 0).iterdir())
    assert [r["contrast_image_path"] for r in out] == [str(p) for p in images]
    assert all("chosen_contrast" not in r for r in out)


def test_stage_neighbour_embeddings_are_cached_and_checked(pairs, tiny_model_dir, tmp_path):
    cfg = stage_cfg(tmp_path, tiny_model_dir, "experiment=toy_symmpo")
    write_jsonl(paths.pairs_jsonl(cfg, 0), pairs)
    with pytest.raises(InputError, match="embeddings not found"):
        run(cfg)
    run(compose([f"paths.results={tmp_path}", f"model.path={tiny_model_dir}", "rounds=1", "experiment=toy_symmpo",
                 "step=embeddings"]))
    cached = load_embeddings(paths.embeddings_file(cfg, 0), pairs)
    assert cached.shape[0] == len(unique_images(pairs)) == 4
    run(cfg)
    out = read_jsonl(paths.contrast_jsonl(cfg, 0))
    assert all(r["contrast_image_path"] != r["image_path"] for r in out)
    chosen_of = {r["image_path"]: r["chosen"] for r in pairs}
    assert all(r["chosen_contrast"] == chosen_of[r["contrast_image_path"]] for r in out)
    assert {r["meta"]["contrast_kind"] for r in out} == {"neighbour"}
    # a cache of other images is refused, not silently misaligned
    save_embeddings(paths.embeddings_file(cfg, 0), cached[:3], unique_images(pairs)[:3], "m")
    with pytest.raises(InputError, match="stale cache"):
        run(cfg)


def test_stage_input_errors_name_file_and_line(pairs, tiny_model_dir, tmp_path):
    cfg = stage_cfg(tmp_path, tiny_model_dir, "experiment=toy_mdpo")
    broken = [pairs[0], {k: v for k, v in pairs[1].items() if k != "chosen"}]
    write_jsonl(paths.pairs_jsonl(cfg, 0), broken)
    with pytest.raises(InputError, match=r"pairs.jsonl:2: missing field\(s\) \['chosen'\]"):
        run(cfg)
    with pytest.raises(ValueError, match="contrast.kind=none"):
        run(stage_cfg(tmp_path, tiny_model_dir))
    with pytest.raises(ValueError, match="step=embeddings is for contrast.kind=neighbour"):
        run(stage_cfg(tmp_path, tiny_model_dir, "experiment=toy_mdpo", "step=embeddings"))


def test_distinct_neighbour_skips_images_that_give_the_same_answer():
    def row(i, chosen):
        return {"image_id": i, "image_path": f"/imgs/{i}.png", "prompt": "describe", "chosen": chosen,
                "rejected": "r", "meta": {}}

    rows = [row(1, "a dog ."), row(2, "a dog ."), row(3, "a cat ."), row(4, "a dog .")]
    embeddings = torch.tensor([[1.0, 0.0], [0.95, 0.05], [0.8, 0.2], [0.0, 1.0]])
    ranked = ranked_neighbours(embeddings)
    assert ranked[:, 0].tolist() == nearest_neighbours(embeddings).tolist()
    assert ranked[0].tolist() == [1, 2, 3] and all(i not in r for i, r in enumerate(ranked.tolist()))
    nearest = contrast_rows(rows, embeddings)
    assert [r["contrast_image_path"] for r in nearest][:2] == ["/imgs/2.png", "/imgs/1.png"]
    distinct = contrast_rows(rows, embeddings, distinct=True)
    # 1 and 2 say the same as each other: each skips to image 3; 3's nearest (2) already differs
    assert [r["meta"]["contrast_image_id"] for r in distinct] == [3, 3, 2, 3]
    assert [r["meta"]["contrast_rank"] for r in distinct] == [1, 1, 0, 0]
    assert all(r["chosen_contrast"] != r["chosen"] for r in distinct)
    same = contrast_rows(rows[:2] + [row(3, "a dog .")], embeddings[:3], distinct=True)
    assert [r["meta"]["contrast_rank"] for r in same] == [0, 0, 0]  # nothing differs: the nearest


def test_black_image_is_black_of_the_same_size():
    image = Image.new("RGB", (20, 10), (200, 30, 10))
    from halludpo.contrast import transformed_image

    out = transformed_image("black", image, 0, {})
    assert out.size == image.size and not np.asarray(out).any()
    with pytest.raises(ValueError, match="not an image transform"):
        transformed_image("neighbour", image, 0, {})


@pytest.mark.slow
def test_toy_mdpo_end_to_end(workdir_with_tiny_base):
    """base + 1 round of mDPO on the tiny world: contrast data, reference segments, per-term curves in MLflow."""
    from mlflow import MlflowClient

    tmp_path = workdir_with_tiny_base
    overrides = ["experiment=toy_mdpo", *TINY]  # a shorter pretraining leaves a model too weak to give pairs
    result = snakemake(tmp_path, overrides=overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    exp = tmp_path / "results" / "toy_mdpo"
    pairs_rows = read_jsonl(exp / "round_0" / "pairs" / "pairs.jsonl")
    contrast = read_jsonl(exp / "round_0" / "pairs" / "contrast.jsonl")
    assert len(contrast) == len(pairs_rows) == len(list((exp / "round_0" / "pairs" / "contrast_images").iterdir()))
    ref = read_jsonl(exp / "round_0" / "pairs" / "ref_logps.jsonl")
    assert all(list(r["ref_logps"]) == ["chosen", "rejected", "chosen@contrast"] for r in ref)
    assert all(r["contrast_image_path"] == c["contrast_image_path"] for r, c in zip(ref, contrast))
    log = read_jsonl(exp / "round_0" / "train" / "train_log.jsonl")
    assert {"loss/dpo", "loss/image", "loss/anchor", "accuracy/dpo", "accuracy/image", "accuracy/anchor"} <= set(log[0])
    summary = json.loads((exp / "summary.json").read_text())
    assert [r["round"] for r in summary["rounds"]] == [0, 1]
    ids = json.loads((exp / "mlflow_runs.json").read_text())
    client = MlflowClient(tracking_uri=ids["tracking_uri"])
    history = client.get_metric_history(ids["rounds"]["0"], "accuracy/image")
    assert len(history) == summary["rounds"][0]["train"]["steps"]
    # nothing left to do; a changed contrast setting reruns the contrast stage and what follows it, only
    assert "Nothing to be done" in (lambda r: r.stdout + r.stderr)(snakemake(tmp_path, "-n", overrides=overrides))
    jobs = job_counts(snakemake(tmp_path, "-n", overrides=[*overrides, "contrast.max_area=0.15"]).stdout)
    assert jobs == {"contrast": 1, "reference_logps": 1, "gather_reference_logps": 1, "dpo": 1, "merge": 1,
                    "generate": 1, "gather_generate": 1, "pope_answers": 1, "amber_answers": 1, "evaluate": 1,
                    "summarize": 1, "all": 1}, jobs


def test_comparison_table_across_experiments(tmp_path):
    """Rule compare's table: one row per (experiment, round), wall time = the round's benchmark seconds."""
    from halludpo.compare import comparison_rows, main

    def summary(name, chair_i):
        pope = {s: {"f1": 0.5} for s in ("random", "popular", "adversarial")}
        rounds = [{"round": k, "chair": {"chair_s": 0.3, "chair_i": c, "recall": 0.8}, "pope": pope}
                  for k, c in enumerate(chair_i)]
        (tmp_path / name / "benchmarks").mkdir(parents=True)
        (tmp_path / name / "summary.json").write_text(json.dumps({"experiment": name, "rounds": rounds}))
        for rule, s in (("dpo_r0", 10.5), ("evaluate_r0", 2.0), ("evaluate_r1", 3.0)):
            (tmp_path / name / "benchmarks" / f"{rule}.tsv").write_text(f"s\th:m:s\n{s}\t0:00:10\n")
        return tmp_path / name / "summary.json"

    files = [summary("toy_apasi", [0.12, 0.11]), summary("toy_mdpo", [0.12, 0.09])]
    rows = comparison_rows(files)
    assert [(r["experiment"], r["round"], r["chair_i"], r["wall_seconds"]) for r in rows] == [
        ("toy_apasi", 0, 0.12, 12.5), ("toy_apasi", 1, 0.11, 3.0), ("toy_mdpo", 0, 0.12, 12.5),
        ("toy_mdpo", 1, 0.09, 3.0)]
    assert rows[0]["pope_adversarial_f1"] == 0.5
    main([*map(str, files), "--md", str(tmp_path / "c.md"), "--csv", str(tmp_path / "c.csv")])
    assert (tmp_path / "c.csv").read_text().splitlines()[0].startswith("experiment,round,chair_s,chair_i,recall")
    assert "| toy_mdpo | 1 | 0.300 | 0.090 | 0.800 | 0.500 | 0.500 | 0.500 | 3 |" in (tmp_path / "c.md").read_text()
