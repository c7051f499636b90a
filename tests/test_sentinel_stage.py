"""SENTINEL as a pipeline stage: the verifier stage, the pairs stage on a tiny model and a tiny toy world (contract,
context, seeded determinism, the learned verifiers' decisions), the APASI + SENTINEL mix, and one tiny end-to-end
Snakemake run of experiment toy_sentinel."""

from __future__ import annotations

import json
import random

import pytest
import torch

from halludpo import paths, pairs, verifiers
from halludpo.config import compose
from halludpo.io import InputError, read_jsonl
from halludpo.mixing import method_config_keys, method_settings, mix_pairs, pair_methods, weighted_rows
from tests.conftest import TINY_ARCH

PAIR_KEYS = {"image_id", "image_path", "prompt", "context", "chosen", "rejected", "method", "meta"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def sentence_model(tiny_world, tmp_path_factory):
    """A tiny LLaVA trained long enough on the tiny world to speak in sentences ("there is a bus at the right .")."""
    from halludpo.pretrain import load_split, pretrain_toy

    out = tmp_path_factory.mktemp("sentinel_model") / "toy"
    examples = load_split(tiny_world / "train" / "instances.json", tiny_world / "train" / "captions.json")
    pretrain_toy(examples, tiny_world / "train" / "images", out, TINY_ARCH,
                 dict(seed=0, epochs=60, batch_size=8, lr=3e-3, weight_decay=0.0, warmup_frac=0.1, qa_per_image=1,
                      max_length=120), progress=False)
    return out


def stage_cfg(results, tiny_world, model_dir, *extra):
    return compose([f"paths.results={results}", f"paths.data_dir={tiny_world}", f"model.path={model_dir}",
                    "experiment=toy_sentinel", "data.world.image_size=32", "eval.chair.text_pipeline=offline",
                    "verifier.train.hyper.cnn.epochs=20", "verifier.train.hyper.mlp.epochs=20",
                    "method.sampling.n=8", "method.sampling.max_steps=5", "method.sampling.max_new_tokens=16",
                    "method.sampling.batch_size=4", *extra])


def pairs_stage(cfg):
    """The pairs stage as the rules run it: its one shard (the model work), then the gather step (the pairs)."""
    pairs.run(cfg)
    gather = cfg.copy()
    gather.gather = True
    pairs.run(gather)


ORACLE = ["verifier.oracle=true", "method.instances=${data.train_instances}", "method.images_dir=${data.train_images}"]


def test_verifier_stage_trains_both_kinds_and_writes_the_marker(tiny_world, sentence_model, tmp_path):
    cfg = stage_cfg(tmp_path, tiny_world, sentence_model)
    threads = torch.get_num_threads()
    verifiers.run(cfg)
    assert torch.get_num_threads() == threads
    marker = paths.verifiers_marker(cfg)
    assert marker == tmp_path / "models" / "verifiers_toy" / "verifiers.json"
    summary = json.loads(marker.read_text())
    assert summary["kinds"] == ["cnn", "mlp"] and summary["held_out_images"] == 40
    assert 0.0 <= summary["held_out_agreement"] <= 1.0
    for kind in ("cnn", "mlp"):
        assert summary["verifiers"][kind]["hyper"]["epochs"] == 20
        assert set(summary["verifiers"][kind]["held_out"]) == {"accuracy", "balanced_accuracy", "precision", "recall"}
    a, b = verifiers.load_trained(paths.verifiers_dir(cfg), ["cnn", "mlp"])
    assert (a.kind, b.kind) == ("cnn", "mlp") and a.image_size == 32


def test_detector_verifiers_build_the_detectors_decide_fn_from_config(tiny_world, tmp_path):
    """verifier=detector: both detectors load from verifier.models (tiny random models saved to tmp) with the
    configured thresholds; threshold 0 -> every object present for A, above 1 -> none for B."""
    from tests.test_detectors import save_tiny_grounding_dino, save_tiny_owlv2

    gd, owl = save_tiny_grounding_dino(tmp_path / "gd"), save_tiny_owlv2(tmp_path / "owl")
    cfg = compose([f"paths.results={tmp_path}", "experiment=toy_sentinel", "verifier=detector",
                   f"verifier.models.grounding_dino={gd}", f"verifier.models.owlv2={owl}",
                   "verifier.thresholds=[0.0,1.01]", "verifier.text_thresholds=[0.0,null]", "verifier.batch_size=2"])
    decide = pairs.verifier_decide_fn(cfg, cfg.method.instances)
    images = sorted((tiny_world / "unlabeled" / "images").iterdir())[:3]
    assert len(images) == 3
    batch = [({"image_path": str(image)}, ["bus", "cat", "traffic light"][: i + 1]) for i, image in enumerate(images)]
    assert decide(batch) == [{o: (True, False) for o in objects} for _, objects in batch]
    with pytest.raises(OSError, match="verifier owlv2: cannot load the zero-shot detector"):
        pairs.verifier_decide_fn(compose([f"paths.results={tmp_path}", "experiment=toy_sentinel", "verifier=detector",
                                          f"verifier.models.grounding_dino={gd}",
                                          "verifier.models.owlv2=no-such/detector"]), cfg.method.instances)
    oracle = compose([f"paths.results={tmp_path}", f"paths.data_dir={tiny_world}", "experiment=toy_sentinel",
                      "verifier=detector", "verifier.oracle=true"])  # the ablation still wins over the detectors
    with pytest.raises(InputError, match="no annotations"):
        pairs.verifier_decide_fn(oracle, oracle.method.instances)


def test_oracle_ablation_needs_an_annotated_split(tiny_world, sentence_model, tmp_path):
    cfg = stage_cfg(tmp_path, tiny_world, sentence_model, "verifier.oracle=true")  # unlabeled split: no annotations
    with pytest.raises(InputError, match="no annotations"):
        pairs.verifier_decide_fn(cfg, cfg.method.instances)


@pytest.fixture(scope="module")
def oracle_runs(tiny_world, sentence_model, tmp_path_factory):
    """The pairs stage twice with the same config (different result folders)."""
    outs = []
    for i in range(2):
        cfg = stage_cfg(tmp_path_factory.mktemp(f"oracle_run{i}"), tiny_world, sentence_model, *ORACLE)
        pairs_stage(cfg)
        outs.append(paths.pairs_jsonl(cfg, 0))
    return outs


def test_pairs_stage_rows_follow_the_contract_and_carry_the_context(oracle_runs, tiny_world, sentence_model):
    out = oracle_runs[0]
    rows = read_jsonl(out)
    assert rows
    truth = verifiers.AnnotationOracleVerifier(tiny_world / "train" / "instances.json")
    for row in rows:
        assert set(row) == PAIR_KEYS and row["method"] == "sentinel"
        assert row["prompt"] == "Please describe this image in detail."
        assert row["context"].strip() and row["chosen"].strip() and row["rejected"].strip()
        assert row["chosen"] != row["rejected"]
        meta = row["meta"]
        # toy_sentinel's y_win rule (method.win=new_objects): y_win names an object the context lacks
        assert meta["step"] >= 1 and meta["type"] == "new_objects"
        assert set(meta["chosen_objects"]) - set(meta["context_objects"])
        assert meta["rejected_hallucinated_objects"]
        assert meta["generator_model"] == str(sentence_model) and meta["round"] == 0
        # the oracle ablation: y_win's objects are all in the image, y_lose's hallucinated ones are not
        present = truth.present([row["image_path"]], meta["chosen_objects"] + meta["rejected_hallucinated_objects"])[0]
        assert present[: len(meta["chosen_objects"])].all() and not present[len(meta["chosen_objects"]):].any()
    stats = json.loads(out.with_name("pairs_stats.json").read_text())
    assert stats["pairs"] == len(rows) and stats["verifier_oracle"] is True and stats["n"] == 8
    assert stats["images"] == 40 and stats["finished"] + stats["capped"] == 40
    trajectories = read_jsonl(out.with_name("trajectories.jsonl"))
    assert len(trajectories) == 40 and all(len(t["steps"]) <= 5 for t in trajectories)
    for t in trajectories:  # every step's sentences are single sentences, at most n, without duplicates
        for step in t["steps"]:
            texts = [s["text"] for s in step["sentences"]]
            assert 1 <= len(texts) <= 8 and len(set(texts)) == len(texts)
            assert all(sum(text.count(c) for c in ".!?") <= 1 for text in texts)


def test_pairs_stage_is_seeded(oracle_runs):
    first, second = oracle_runs
    assert first.read_bytes() == second.read_bytes()
    assert first.with_name("trajectories.jsonl").read_bytes() == second.with_name("trajectories.jsonl").read_bytes()


def test_pairs_stage_asks_the_learned_verifiers(tiny_world, sentence_model, tmp_path):
    cfg = stage_cfg(tmp_path, tiny_world, sentence_model, "method.sampling.max_steps=3",
                    "verifier.thresholds=[0.5,0.7]")
    verifiers.run(cfg)
    try:  # tiny verifiers on 40 images may confirm no object at all: the stage then says so, after the trajectories
        pairs_stage(cfg)
    except InputError as err:
        assert "SENTINEL built no pair" in str(err)
    trajectories = read_jsonl(paths.pairs_jsonl(cfg, 0).with_name("trajectories.jsonl"))
    assert len(trajectories) == 10  # the unlabeled split
    a, b = verifiers.load_trained(paths.verifiers_dir(cfg), ["cnn", "mlp"])
    threshold_a, threshold_b = cfg.verifier.thresholds
    assert (threshold_a, threshold_b) == (0.5, 0.7)  # each verifier decides at its own threshold
    checked = 0
    for t in trajectories:
        for step in t["steps"]:
            for sentence in step["sentences"]:
                for obj, (yes_a, yes_b) in sentence["decisions"].items():
                    image = [t["item"]["image_path"]]
                    assert yes_a == bool(verifiers.predict_present(a, image, [obj], threshold_a)[0, 0])
                    assert yes_b == bool(verifiers.predict_present(b, image, [obj], threshold_b)[0, 0])
                    checked += 1
    assert checked > 0


# ---------------------------------------------------------------------------------------------------------------
# Mixing


def test_verified_apasi_injects_only_absent_objects_and_cleans_the_chosen(tiny_world, sentence_model, tmp_path):
    """method.verify (extension) through the APASI pairs stage, with the annotation oracle as both verifiers: the
    "generations" are the training captions, which name an absent object on purpose (the language prior), each
    without its second sentence (so they miss a true object)."""
    from halludpo.apasi import split_sentences
    from halludpo.io import write_jsonl

    cfg = compose([f"paths.results={tmp_path}", f"paths.data_dir={tiny_world}", f"model.path={sentence_model}",
                   "data.world.image_size=32", "eval.chair.text_pipeline=offline", "method.mode=insert",
                   "method.verify.injected=true", "method.verify.chosen=true", "method.verify.complete=true",
                   "verifier.oracle=true",
                   "data.gen_instances=${data.train_instances}", "data.gen_images=${data.train_images}",
                   "method.completion.max_new_tokens=8"])
    captions = json.loads((tiny_world / "train" / "captions.json").read_text())["annotations"]
    images = json.loads((tiny_world / "train" / "instances.json").read_text())["images"]
    files = {im["id"]: im["file_name"] for im in images}
    write_jsonl(paths.gen_generations(cfg, 0), [  # the caption without its second sentence: a missed object
        {"image_id": c["image_id"], "image_path": str(tiny_world / "train" / "images" / files[c["image_id"]]),
         "prompt": "Please describe this image in detail.", "model": "toy", "round": 0,
         "response": "".join(s for i, s in enumerate(split_sentences(c["caption"])) if i != 1)}
        for c in captions])
    pairs_stage(cfg)
    rows = read_jsonl(paths.pairs_jsonl(cfg, 0))
    stats = json.loads(paths.pairs_jsonl(cfg, 0).with_name("pairs_stats.json").read_text())
    truth = verifiers.AnnotationOracleVerifier(tiny_world / "train" / "instances.json")
    hallucinated = {c["image_id"]: c["hallucinated"] for c in captions}
    assert rows and stats["dropped_sentences"] == sum(h is not None for h in hallucinated.values())
    for row in rows:
        injected = row["meta"]["injected_objects"]
        assert not truth.present([row["image_path"]], injected)[0].any()  # never a true object
        faithful = row["meta"]["faithful_objects"]
        assert truth.present([row["image_path"]], faithful)[0].all()   # the chosen insertion: a true object
        assert all(o in row["chosen"] for o in faithful)
        if hallucinated[row["image_id"]]:
            assert row["meta"]["dropped_sentences"] and hallucinated[row["image_id"]] not in row["chosen"]
        if not faithful:
            assert len(row["rejected"]) > len(row["chosen"])  # insert mode: chosen + an injected sentence
    assert stats["faithful_insertions"] > 0


def test_method_selection_and_the_refused_multi_select():
    assert pair_methods(compose([]).method) == ["apasi"]
    assert pair_methods(compose(["method=sentinel"]).method) == ["sentinel"]
    mixed = compose(["experiment=toy_apasi_sentinel"]).method
    assert pair_methods(mixed) == ["apasi", "sentinel"]
    assert method_settings(mixed, "apasi").injection_rates == [0.4, 0.2]  # APASI's keys keep their meaning
    assert method_settings(mixed, "sentinel").sampling.n == 10
    assert "method.generation" in method_config_keys(mixed, "apasi")
    assert not {"method.sentinel", "method.mix", "method.name"} & set(method_config_keys(mixed, "apasi"))
    assert method_config_keys(mixed, "sentinel") == ["method.sentinel"]
    with pytest.raises(ValueError, match="use method=apasi_sentinel"):
        pair_methods(compose(["method=[apasi,sentinel]"]).method)


def test_weighted_rows_weight_and_cap():
    rows = [{"i": i} for i in range(10)]
    rng = lambda: random.Random(0)  # noqa: E731
    assert weighted_rows(rows, 1.0, None, rng()) == rows
    half = weighted_rows(rows, 0.5, None, rng())
    assert len(half) == 5 and half == sorted(half, key=lambda r: r["i"])
    assert half == weighted_rows(rows, 0.5, None, rng())
    more = weighted_rows(rows, 2.3, None, rng())
    assert len(more) == 23 and more[:20] == rows + rows
    assert len(weighted_rows(rows, 2.0, 7, rng())) == 7
    assert weighted_rows(rows, 0.0, None, rng()) == [] and weighted_rows([], 3.0, None, rng()) == []
    with pytest.raises(ValueError):
        weighted_rows(rows, -1.0, None, rng())


def test_mix_pairs_concatenates_with_per_method_weights_and_caps():
    apasi = [{"method": "apasi", "context": "", "meta": {"i": i}} for i in range(6)]
    sentinel = [{"method": "sentinel", "context": "a dog .", "meta": {"i": i}} for i in range(4)]
    rows, stats = mix_pairs({"apasi": apasi, "sentinel": sentinel},
                            {"apasi": {"weight": 1.0, "cap": 3}, "sentinel": {"weight": 1.5, "cap": None}}, seed=0)
    assert [r["method"] for r in rows] == ["apasi"] * 3 + ["sentinel"] * 6
    assert all(r["meta"]["mix_source"] == r["method"] for r in rows)
    assert stats == {"apasi": {"built": 6, "taken": 3, "weight": 1.0, "cap": 3},
                     "sentinel": {"built": 4, "taken": 6, "weight": 1.5, "cap": None}}
    assert "mix_source" not in apasi[0]["meta"]  # inputs untouched


def test_mix_step_writes_pairs_jsonl(tmp_path):
    from halludpo.io import write_jsonl

    cfg = compose([f"paths.results={tmp_path}", "experiment=toy_apasi_sentinel", "step=mix",
                   "method.mix.sentinel.cap=1"])
    for method, n in (("apasi", 2), ("sentinel", 3)):
        write_jsonl(paths.method_pairs_jsonl(cfg, 0, method),
                    [{"image_id": i, "method": method, "context": "", "meta": {}} for i in range(n)])
    pairs.run(cfg)
    rows = read_jsonl(paths.pairs_jsonl(cfg, 0))
    assert [r["method"] for r in rows] == ["apasi", "apasi", "sentinel"]
    stats = json.loads(paths.pairs_jsonl(cfg, 0).with_name("pairs_stats.json").read_text())
    assert stats["pairs"] == 3 and stats["mix"]["sentinel"]["taken"] == 1
    with pytest.raises(ValueError, match="or step=mix"):
        pairs.run(compose([f"paths.results={tmp_path}", "experiment=toy_apasi_sentinel", "step=main"]))


# ---------------------------------------------------------------------------------------------------------------
# End to end


@pytest.mark.slow
def test_toy_sentinel_end_to_end(workdir_with_tiny_base):
    """experiment=toy_sentinel through the whole DAG with test_pipeline's TINY overrides (APASI's generation keys
    swapped for SENTINEL's sampling keys): verifiers, sentence-level pairs, C-DPO, merge, evaluation, summary."""
    from tests.test_pipeline import TINY, job_counts, snakemake

    tmp_path = workdir_with_tiny_base
    overrides = ["experiment=toy_sentinel",
                 *[o for o in TINY if not o.startswith("method.generation.")],
                 "method.sampling.max_new_tokens=24", "method.sampling.n=8", "method.sampling.max_steps=6",
                 "verifier.train.hyper.cnn.epochs=20", "verifier.train.hyper.mlp.epochs=20"]
    dry = snakemake(tmp_path, "-n", overrides=overrides)
    assert dry.returncode == 0, dry.stderr[-3000:]
    jobs = job_counts(dry.stdout)
    assert jobs["train_verifiers"] == 1 and jobs["sentinel"] == 1 and "inject" not in jobs
    result = snakemake(tmp_path, overrides=overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    exp = tmp_path / "results" / "toy_sentinel"
    rows = read_jsonl(exp / "round_0" / "pairs" / "pairs.jsonl")
    assert rows and all(set(r) == PAIR_KEYS and r["method"] == "sentinel" and r["context"] for r in rows)
    summary = json.loads((exp / "summary.json").read_text())
    assert summary["experiment"] == "toy_sentinel" and [r["round"] for r in summary["rounds"]] == [0, 1]
    assert summary["rounds"][0]["train"]["pairs"] == len(rows)
    assert (tmp_path / "results" / "models" / "verifiers_toy" / "verifiers.json").is_file()
    again = snakemake(tmp_path, "-n", overrides=overrides)
    assert "Nothing to be done" in again.stdout + again.stderr
