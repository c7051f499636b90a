"""File names of every stage output, derived from the config; the Snakefile and the stages both use these."""

from __future__ import annotations

import re
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # owner/name, as on the Hugging Face hub
FETCHED = "fetched.json"  # rule fetch_model's marker in a hub model's folder (halludpo.hub)


def data_done(cfg: DictConfig) -> Path:
    """The marker the data stage writes last: its presence means every split is complete (toy: rule render;
    real data: rule prepare)."""
    return Path(cfg.paths.data_dir) / ("world.json" if cfg.data.kind == "toy" else "prepared.json")


def base_model_dir(cfg: DictConfig) -> Path:
    """model_0's folder: model.path, or for a hub id the folder rule fetch_model downloads it into."""
    return hub_model_dir(cfg) if fetched_from_hub(cfg) else Path(cfg.model.path)


def fetched_from_hub(cfg: DictConfig) -> bool:
    """model_0 is a real family's released weights named by a hub id: rule fetch_model downloads them."""
    return cfg.model.family != "toy" and is_hub_id(cfg.model.path)


def hub_revision(cfg: DictConfig) -> str:
    """model.revision: the branch, tag or commit fetch_model downloads ("main" when the config has none)."""
    return str(cfg.model.get("revision") or "main")


def hub_model_dir(cfg: DictConfig) -> Path:
    """<models_dir>/hub/<owner>--<name>@<revision>: one folder per repository and revision."""
    name = f"{cfg.model.path}@{hub_revision(cfg)}".replace("/", "--")
    return Path(cfg.paths.models_dir) / "hub" / name


def round_dir(cfg: DictConfig, k: int) -> Path:
    return Path(cfg.paths.experiment_dir) / f"round_{k}"


def model_dir(cfg: DictConfig, k: int) -> Path:
    """model_0 is the base model; model_k (k >= 1) is round k-1's merged model."""
    return base_model_dir(cfg) if k == 0 else round_dir(cfg, k - 1) / "merged"


def is_hub_id(path: str | Path) -> bool:
    """model.path names a hub repository ("llava-hf/llava-1.5-7b-hf"), not a folder on this machine: no folder of
    that name exists, it does not start like a path ('/', '.', '~') and it has the hub's owner/name form."""
    text = str(path)
    return not Path(text).expanduser().exists() and not text.startswith(("/", ".", "~")) and bool(HUB_ID.match(text))


def model_marker(cfg: DictConfig, k: int) -> Path:
    """A file whose existence means model_k is fully saved (Snakemake tracks files, not folders).

    The toy family's model_0 is pretrained by rule pretrain_base; a real family's model_0 named by a hub id is
    downloaded by rule fetch_model, whose marker (fetched.json) is written last; one in a local folder is tracked
    by its config.json. model_k (k >= 1) is rule merge's config.json.
    """
    if k == 0 and fetched_from_hub(cfg):
        return hub_model_dir(cfg) / FETCHED
    return model_dir(cfg, k) / "config.json"


def generations(cfg: DictConfig, k: int, split: str) -> Path:
    """model_k's descriptions: split 'eval' for CHAIR, 'gen' (unlabelled images) for preference pairs."""
    return round_dir(cfg, k) / "generate" / f"{split}.jsonl"


def eval_generations(cfg: DictConfig, k: int) -> Path:
    return generations(cfg, k, "eval")


def chair_json(cfg: DictConfig, k: int) -> Path:
    return round_dir(cfg, k) / "eval" / "chair.json"


def pope_json(cfg: DictConfig, k: int) -> Path:
    return round_dir(cfg, k) / "eval" / "pope.json"


def pope_questions(cfg: DictConfig, split: str) -> Path:
    return Path(cfg.paths.data_dir) / "pope" / f"{split}.jsonl"


def amber_json(cfg: DictConfig, k: int) -> Path:
    return round_dir(cfg, k) / "eval" / "amber.json"


def amber_answers(cfg: DictConfig, k: int, task: str) -> Path:
    """model_k's AMBER responses of one task ('generative' | 'discriminative'), gathered by rule evaluate from the
    amber_answers shards (eval/shards/amber_<task>.<i>-of-<n>.jsonl); only the shard files are written."""
    return round_dir(cfg, k) / "eval" / f"amber_{task}.jsonl"


def lmms_eval_dir(cfg: DictConfig, k: int) -> Path:
    """lmms-eval's results layout of round k's evaluation: results.json and samples_<task>.jsonl."""
    return round_dir(cfg, k) / "eval" / "lmms_eval"


AMBER_FILES = ("annotations", "relation", "safe_words", "query_generative", "query_discriminative")
AMBER_FILE_NAMES = {"annotations": "annotations.json", "relation": "relation.json", "safe_words": "safe_words.txt",
                    "query_generative": "query_generative.json", "query_discriminative": "query_discriminative.json"}


def released_amber(cfg: DictConfig) -> bool:
    """AMBER's files come from the data config (data.sources.amber: the released files), not rule amber_questions."""
    return OmegaConf.select(cfg, "data.sources.amber") is not None


def amber_dir(cfg: DictConfig) -> Path:
    """Where rule amber_questions writes the toy world's AMBER files (results/data/<data.name>/amber/)."""
    return Path(cfg.paths.data_dir) / "amber"


def amber_files(cfg: DictConfig) -> dict[str, Path]:
    """AMBER's files the evaluation reads, by AMBER_FILES name: data.sources.amber's (released files) or the toy
    world's in amber_dir. rule amber_questions writes the toy's, plus the per-dimension query files."""
    if released_amber(cfg):
        return {name: Path(cfg.data.sources.amber[name]) for name in AMBER_FILES}
    return {name: amber_dir(cfg) / AMBER_FILE_NAMES[name] for name in AMBER_FILES}


def amber_images(cfg: DictConfig) -> Path:
    """The folder holding the images AMBER's query files name: data.sources.amber.images, or the toy eval images."""
    return Path(cfg.data.sources.amber.images) if released_amber(cfg) else Path(cfg.data.eval_images)


def released_object_halbench(cfg: DictConfig) -> bool:
    """Object HalBench's questions come from RLHF-V's question file (data.sources.object_halbench), not the toy
    eval split."""
    return OmegaConf.select(cfg, "data.sources.object_halbench") is not None


def object_halbench_dir(cfg: DictConfig) -> Path:
    """Where rule object_halbench_questions writes the questions and their images' ground truth
    (results/data/<data.name>/object_halbench/)."""
    return Path(cfg.paths.data_dir) / "object_halbench"


def object_halbench_files(cfg: DictConfig) -> dict[str, Path]:
    """questions.jsonl ({id, image_id, image, query}) and the COCO-format ground truth of its images."""
    folder = object_halbench_dir(cfg)
    return {"questions": folder / "questions.jsonl", "instances": folder / "instances.json",
            "captions": folder / "captions.json"}


def object_halbench_json(cfg: DictConfig, k: int) -> Path:
    return round_dir(cfg, k) / "eval" / "object_halbench.json"


def object_halbench_answers(cfg: DictConfig, k: int) -> Path:
    """model_k's Object HalBench descriptions, gathered by rule evaluate from the object_halbench_answers shards
    (eval/shards/object_halbench_answers.<i>-of-<n>.jsonl); only the shard files are written."""
    return round_dir(cfg, k) / "eval" / "object_halbench_answers.jsonl"


def mmhal_json(cfg: DictConfig, k: int) -> Path:
    return round_dir(cfg, k) / "eval" / "mmhal.json"


def mmhal_answers(cfg: DictConfig, k: int) -> Path:
    """model_k's MMHal-Bench answers, gathered by rule mmhal_judge from the mmhal_answers shards
    (eval/shards/mmhal_answers.<i>-of-<n>.jsonl); only the shard files are written."""
    return round_dir(cfg, k) / "eval" / "mmhal_answers.jsonl"


def chair_image_ids(cfg: DictConfig) -> Path:
    return Path(cfg.paths.data_dir) / "chair_image_ids.json"


def summary_json(cfg: DictConfig) -> Path:
    return Path(cfg.paths.experiment_dir) / "summary.json"


def gen_generations(cfg: DictConfig, k: int) -> Path:
    """model_k's descriptions of the unlabelled images: the raw material of round k's preference pairs."""
    return generations(cfg, k, "gen")


def pairs_jsonl(cfg: DictConfig, k: int) -> Path:
    return round_dir(cfg, k) / "pairs" / "pairs.jsonl"


def ref_logps_jsonl(cfg: DictConfig, k: int) -> Path:
    return round_dir(cfg, k) / "pairs" / "ref_logps.jsonl"


def train_dir(cfg: DictConfig, k: int) -> Path:
    return round_dir(cfg, k) / "train"


def train_checkpoints_dir(cfg: DictConfig, k: int) -> Path:
    """Rule dpo's Trainer checkpoints (every train.save_steps steps): outside the rule's outputs, so Snakemake keeps
    them when the job fails and a rerun resumes from them; the stage removes them once its outputs are written."""
    return round_dir(cfg, k) / "train_checkpoints"


def rounds_plot(cfg: DictConfig) -> Path:
    return Path(cfg.paths.experiment_dir) / "rounds.png"


def contrast_jsonl(cfg: DictConfig, k: int) -> Path:
    """pairs.jsonl rows + contrast_image_path (and chosen_contrast for kind=neighbour): rule contrast."""
    return round_dir(cfg, k) / "pairs" / "contrast.jsonl"


def contrast_images_dir(cfg: DictConfig, k: int) -> Path:
    """The stored contrast images of the image-transform kinds (corrupt, black, noise), one file per example."""
    return round_dir(cfg, k) / "pairs" / "contrast_images"


def embeddings_file(cfg: DictConfig, k: int) -> Path:
    """model_k's pooled image features of round k's pair images (kind=neighbour), rule contrast_embeddings."""
    return round_dir(cfg, k) / "pairs" / "embeddings.safetensors"


def scored_pairs_jsonl(cfg: DictConfig, k: int) -> Path:
    """The pairs the reference and the trainer score: contrast.jsonl with a contrast kind, else pairs.jsonl."""
    return pairs_jsonl(cfg, k) if cfg.contrast.kind == "none" else contrast_jsonl(cfg, k)


def verifiers_dir(cfg: DictConfig) -> Path:
    """SENTINEL's learned object verifiers, one sub-folder per kind; trained once per data set (rule
    train_verifiers), shared by experiments like the base model."""
    return Path(cfg.paths.models_dir) / f"verifiers_{cfg.data.name}"


def verifiers_marker(cfg: DictConfig) -> Path:
    """Written last by rule train_verifiers (kinds + held-out presence scores): its presence means all are saved."""
    return verifiers_dir(cfg) / "verifiers.json"


def method_pairs_jsonl(cfg: DictConfig, k: int, method: str) -> Path:
    """One method's pairs when a mixed method (apasi_sentinel) concatenates several into pairs_jsonl."""
    return round_dir(cfg, k) / "pairs" / method / "pairs.jsonl"
