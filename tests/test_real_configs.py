"""The real-scale experiments (7B models on COCO): composed values against the papers (docs/methods.md,
docs/evaluation.md), model_0 from the hub, the data config schema, and a dry run of the whole DAG from nothing."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from halludpo import download, paths
from halludpo.config import compose, to_plain

ROOT = Path(__file__).resolve().parents[1]
REAL = ["apasi_llava15_7b", "apasi_qwen2vl_7b", "sentinel_llava15_7b", "symmpo_llava15_7b"]
MODELS = {"llava15_7b": ("llava", "llava-hf/llava-1.5-7b-hf"), "qwen2vl_7b": ("qwen2_vl", "Qwen/Qwen2-VL-7B-Instruct"),
          "llava16_7b": ("llava_next", "llava-hf/llava-v1.6-vicuna-7b-hf"),
          "qwen25vl_7b": ("qwen2_5_vl", "Qwen/Qwen2.5-VL-7B-Instruct")}


@pytest.mark.parametrize("name", REAL)
def test_every_real_experiment_runs_on_coco_with_the_paper_protocol(name):
    cfg = compose([f"experiment={name}"])
    assert cfg.experiment_name == name
    assert cfg.data.kind == "coco" and cfg.data.compounds == "coco"
    assert cfg.model.dtype == "bfloat16" and cfg.model.family in ("llava", "qwen2_vl")
    t = cfg.train
    assert t.batch_size * t.grad_accum == 64                                  # global batch 64 on one GPU
    assert t.bf16 is True and t.deepspeed == "configs/deepspeed/zero2.json"
    assert (ROOT / t.deepspeed).is_file()
    assert t.reference == "stored"
    # evaluation: CHAIR on OPERA's 500 (their order, 512 new tokens, greedy), POPE's 3 released splits
    assert cfg.eval.chair.n_images == 500 and cfg.eval.chair.max_new_tokens == 512
    assert cfg.eval.chair.image_ids_file == str(paths.chair_image_ids(cfg))
    assert cfg.eval.generation.do_sample is False and cfg.eval.generation.num_beams == 1
    assert list(cfg.eval.pope.splits) == ["random", "popular", "adversarial"]
    assert set(cfg.data.sources.pope) >= set(cfg.eval.pope.splits)
    # AMBER: its released files as they are, its image archive trusted on first use (no published checksum)
    assert list(cfg.eval.benchmarks) == ["chair", "pope", "amber", "object_halbench"] and paths.released_amber(cfg)
    assert cfg.download.entries.amber_images.verify == "tofu" and cfg.download.entries.amber_images.sha256 is None
    root = cfg.download.root
    assert paths.amber_files(cfg)["annotations"] == Path(f"{root}/amber/data/annotations.json")
    assert paths.amber_files(cfg)["query_discriminative"] == Path(f"{root}/amber/data/query/query_discriminative.json")
    assert paths.amber_images(cfg) == Path(f"{root}/amber")
    assert cfg.eval.amber.generative.max_new_tokens == 512 and cfg.parallel.shards.amber == 4
    # Object HalBench: RLHF-V's question file (pinned: commit + sha256) on COCO val2014, RLAIF-V's decoding
    assert paths.released_object_halbench(cfg) and cfg.parallel.shards.object_halbench == 2
    entry = cfg.download.entries.object_halbench_questions
    assert "/RLHF-V/RLAIF-V/83d917b2e8118ca8e7877a796d72af9bb3e6b356/" in entry.url and len(entry.sha256) == 64
    assert cfg.data.sources.object_halbench.questions == f"{root}/object_halbench/obj_halbench_300_with_image.jsonl"
    assert cfg.data.sources.object_halbench.instances == f"{root}/coco/annotations/instances_val2014.json"
    assert sorted(Path(m).stem for m in download.marker_paths(cfg.download, cfg.data.sources.object_halbench.downloads)
                  ) == ["coco2014_annotations", "coco2014_val_images", "object_halbench_questions"]
    o = cfg.eval.object_halbench
    assert (o.max_new_tokens, o.generation.num_beams, o.generation.do_sample, o.mentions) == (1024, 3, False, "every")
    # MMHal-Bench, opt-in (judge calls cost money): its question file pinned, its images trusted on first use
    assert "mmhal" not in cfg.eval.benchmarks and cfg.eval.judge.base_url is None
    entry = cfg.download.entries.mmhal_template
    assert "/RLHF-V/RLAIF-V/83d917b2e8118ca8e7877a796d72af9bb3e6b356/" in entry.url and len(entry.sha256) == 64
    images = cfg.download.entries.mmhal_images
    assert images.verify == "tofu" and "f5f49a938f45" in images.url
    assert cfg.data.sources.mmhal.template == f"{root}/mmhal/mmhal-bench_answer_template.json"
    # the downloads prepare reads: COCO 2014 val + annotations, COCO 2017 train, detail-23k, OPERA's list, POPE
    markers = download.marker_paths(cfg.download, cfg.data.downloads)
    assert sorted(Path(m).stem for m in markers) == sorted([
        "coco2014_val_images", "coco2014_annotations", "coco2017_train_images", "llava_detail_23k",
        "opera_chair500", "pope_coco_random", "pope_coco_popular", "pope_coco_adversarial"])
    root = cfg.download.root
    assert cfg.data.gen_images == f"{root}/coco/train2017" and cfg.data.eval_images == f"{root}/coco/val2014"
    assert cfg.data.sources.detail_23k == f"{root}/llava/detail_23k.json"
    # model_0 = the released weights at model.revision: a hub id, no pretraining; rule fetch_model downloads them
    assert paths.fetched_from_hub(cfg) and cfg.model.revision and cfg.model.device == "auto"
    assert paths.model_marker(cfg, 0) == paths.model_dir(cfg, 0) / "fetched.json"
    assert paths.model_dir(cfg, 0).parent == Path(cfg.paths.models_dir) / "hub"


@pytest.mark.parametrize("name", ["apasi_llava15_7b", "apasi_qwen2vl_7b"])
def test_apasi_paper_settings(name):
    cfg = compose([f"experiment={name}"])
    m, t = cfg.method, cfg.train
    assert m.name == "apasi" and m.mode == "replace" and m.templates == "paper"
    assert list(m.injection_rates) == [0.4, 0.2] and cfg.rounds == 2 and m.skip == 1 and m.top_k == 10
    assert m.generation.max_new_tokens == 1024 and m.generation.decoding.do_sample is False
    assert m.generation.n_images is None                      # every detail-23k image
    assert m.generation.prompts == "image"                    # each image's own detail-23k prompt
    assert m.completion.max_new_tokens == 64 and m.completion.repetition_penalty == 1.1
    assert t.loss == "sigmoid" and t.beta == 0.1 and t.sft_weight == 0.0
    assert t.lr == 4.0e-7 and t.scheduler == "cosine" and t.warmup_ratio == 0.05 and t.epochs == 3
    assert t.lora.r == 128 and t.lora.alpha == 256
    assert re.fullmatch(t.lora.target_modules, "model.language_model.layers.0.mlp.down_proj")
    assert t.lora.train_projector is (cfg.model.family == "llava")   # Qwen2-VL has no multi_modal_projector
    assert cfg.model.path == {"apasi_llava15_7b": "llava-hf/llava-1.5-7b-hf",
                              "apasi_qwen2vl_7b": "Qwen/Qwen2-VL-7B-Instruct"}[name]


def test_sentinel_and_symmpo_paper_settings():
    s = compose(["experiment=sentinel_llava15_7b"])
    assert s.method.name == "sentinel" and s.verifier.kind == "detector" and s.rounds == 1
    assert s.method.instances == s.data.gen_instances and s.method.images_dir == s.data.gen_images
    assert s.method.sampling.n == 10 and s.method.sampling.temperature == 0.7
    assert (s.train.loss, s.train.beta, s.train.lr, s.train.epochs) == ("cdpo", 0.1, 2.0e-6, 1)
    assert (s.train.lora.r, s.train.lora.alpha) == (128, 256)
    y = compose(["experiment=symmpo_llava15_7b"])
    assert y.contrast.kind == "neighbour" and y.train.loss == "symmpo"
    assert to_plain(y.train.symmpo) == {"beta1": 0.1, "beta2": 0.1, "lam": 0.5, "gamma": 1.0e-4}
    assert (y.train.lr, y.train.epochs, y.train.lora.r, y.train.lora.alpha) == (1.0e-5, 3, 64, 128)


@pytest.mark.parametrize("model", sorted(MODELS))
def test_model_configs(model):
    cfg = compose(["experiment=apasi_llava15_7b", f"model={model}"])
    assert (cfg.model.family, cfg.model.path, cfg.model.dtype) == (*MODELS[model], "bfloat16")
    assert "pretrain" not in cfg.model and paths.model_marker(cfg, 0).name == "fetched.json"
    assert cfg.model.revision == "main" and cfg.model.device == "auto"


def test_model_0_marker_by_kind_of_path(tmp_path):
    toy = compose()
    assert paths.model_marker(toy, 0) == Path(toy.model.path) / "config.json"     # built by pretrain_base
    local = compose(["experiment=apasi_llava15_7b", f"model.path={tmp_path}"])
    assert paths.model_marker(local, 0) == tmp_path / "config.json"              # a folder on this machine
    relative = compose(["experiment=apasi_llava15_7b", "model.path=./models/llava"])
    assert paths.model_marker(relative, 0) == Path("models/llava/config.json")   # a path, never a hub id
    hub = compose(["experiment=apasi_llava15_7b"])
    assert paths.model_marker(hub, 0) == Path("results/models/hub/llava-hf--llava-1.5-7b-hf@main/fetched.json")
    pinned = compose(["experiment=apasi_llava15_7b", "model.revision=0123456789abcdef0123456789abcdef01234567"])
    assert paths.model_dir(pinned, 0).name == "llava-hf--llava-1.5-7b-hf@0123456789abcdef0123456789abcdef01234567"
    assert paths.model_marker(hub, 1) == Path("results/apasi_llava15_7b/round_0/merged/config.json")
    assert paths.is_hub_id("org/name-1.5") and not paths.is_hub_id("results/models/x") \
        and not paths.is_hub_id("/abs/x") and not paths.is_hub_id("name")


@pytest.mark.parametrize("experiment, change, ok", [
    ("toy_apasi", {}, True),
    ("apasi_llava15_7b", {}, True),
    ("apasi_llava15_7b", {"eval_images": None}, False),
    ("apasi_llava15_7b", {"sources": None}, False),          # coco needs its downloaded sources
    ("toy_apasi", {"compounds": "lvis"}, False),
    ("toy_apasi", {"sources": {"mmhal": {"template": "t.json", "images": "img"}}}, True),  # MMHal-Bench on any data
    ("toy_apasi", {"sources": {"mmhal": {"template": "t.json"}}}, False),
    ("apasi_llava15_7b", {"sources": {"mmhal": {"template": "t.json", "images": "img"}}}, False),  # coco: all
])
def test_data_config_schema(experiment, change, ok):
    """workflow/schemas/data_config.schema.yaml: the keys every stage reads (checked when the Snakefile loads)."""
    from snakemake.exceptions import WorkflowError
    from snakemake.utils import validate

    schema = str(ROOT / "workflow" / "schemas" / "data_config.schema.yaml")
    data = to_plain(compose([f"experiment={experiment}"]).data)
    data = {k: v for k, v in (data | change).items() if not (k == "sources" and v is None)}
    if ok:
        validate(data, schema, set_default=False)
    else:
        with pytest.raises(WorkflowError):
            validate(data, schema, set_default=False)


def job_counts(text: str) -> dict[str, int]:
    table = text.split("Job stats:")[-1]
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M)}


def dry_run(workdir: Path, experiment: str, *overrides: str) -> subprocess.CompletedProcess:
    """`snakemake -n --config overrides="[experiment=...]"` in an empty folder (a clean checkout: no files)."""
    env = os.environ | {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    cmd = [str(Path(sys.executable).parent / "snakemake"), "-n", "-s", str(ROOT / "Snakefile"), "--directory",
           str(workdir), "--config", f"overrides=[{','.join([f'experiment={experiment}', *overrides])}]"]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


# rounds R, shards S of each stage (parallel.shards.*): generate = ((R+1) eval + R gen) x S, gathered by
# gather_generate; pope_answers and amber_answers = (R+1) x S; per round: the pairs' shard jobs + their gather,
# reference shards + gather, dpo, merge. download: prepare's 8 entries + AMBER's 7 (bundle amber) + Object HalBench's
# question file; object_halbench_answers = (R+1) x S
APASI_7B = {"download": 16, "fetch_model": 1, "prepare": 1, "generate": 40, "gather_generate": 5, "inject": 16,
            "inject_pairs": 2, "reference_logps": 16, "gather_reference_logps": 2, "dpo": 2, "merge": 2,
            "pope_answers": 12, "amber_answers": 12, "object_halbench_questions": 1, "object_halbench_answers": 6,
            "evaluate": 3, "summarize": 1, "all": 1}
EXPECTED_JOBS = {
    "apasi_llava15_7b": APASI_7B,
    "apasi_qwen2vl_7b": APASI_7B,
    "symmpo_llava15_7b": APASI_7B | {"contrast_embeddings": 2, "contrast": 2},
    "sentinel_llava15_7b": {"download": 16, "fetch_model": 1, "prepare": 1, "generate": 16, "gather_generate": 2,
                            "sentinel": 16, "sentinel_pairs": 1,  # detectors: no training
                            "reference_logps": 8, "gather_reference_logps": 1, "dpo": 1, "merge": 1,
                            "pope_answers": 8, "amber_answers": 8, "object_halbench_questions": 1,
                            "object_halbench_answers": 4, "evaluate": 2, "summarize": 1, "all": 1},
}


@pytest.mark.parametrize("experiment", sorted(EXPECTED_JOBS))
def test_dry_run_plans_the_whole_dag_from_nothing(tmp_path, experiment):
    result = dry_run(tmp_path, experiment)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout + result.stderr
    assert job_counts(out) == EXPECTED_JOBS[experiment] | {"total": sum(EXPECTED_JOBS[experiment].values())}
    # no toy rule: no rendering, no pretraining, no sampled POPE or AMBER questions; model_0 = fetch_model's folder
    for rule in ("render", "pretrain_base", "pope_questions", "amber_questions"):
        assert f"rule {rule}:" not in out
    assert "results/data/coco/pope/random.jsonl" in out and "results/downloads/done/llava_detail_23k.json" in out
    # AMBER on its released files: the amber_answers shards wait for the bundle's markers, images included
    assert "results/downloads/done/amber_images.json" in out and "results/downloads/done/amber_relation.json" in out
    # Object HalBench on RLHF-V's question file: its questions wait for the file and COCO val2014
    assert "results/downloads/done/object_halbench_questions.json" in out
    assert "results/data/coco/object_halbench/questions.jsonl" in out
    assert str(paths.model_marker(compose([f"experiment={experiment}"]), 0)) in out
    assert "llava-hf/" not in out and "Qwen/" not in out  # a hub id is never read as a path


def test_dry_run_plans_mmhal_when_asked(tmp_path):
    """MMHal-Bench on a paper experiment: its answers per round on a GPU, the judge's ratings, its two downloads."""
    result = dry_run(tmp_path, "symmpo_llava15_7b", "eval.benchmarks=[chair,pope,amber,object_halbench,mmhal]",
                     "eval.judge.base_url=https://judge.example/v1")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout + result.stderr
    counts = job_counts(out)
    expected = EXPECTED_JOBS["symmpo_llava15_7b"]
    assert counts["mmhal_answers"] == 3 and counts["mmhal_judge"] == 3  # model_0..2, one shard each
    assert counts["download"] == expected["download"] + 2 and counts["total"] == sum(expected.values()) + 8
    assert "results/downloads/done/mmhal_images.json" in out
    assert "results/symmpo_llava15_7b/round_2/eval/mmhal.json" in out
