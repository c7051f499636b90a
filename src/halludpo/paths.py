"""File names of every stage output, derived from the config; the Snakefile and the stages both use these."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig


def data_done(cfg: DictConfig) -> Path:
    """The marker the data stage writes last: its presence means every split is complete."""
    return Path(cfg.paths.data_dir) / "world.json"


def base_model_dir(cfg: DictConfig) -> Path:
    return Path(cfg.model.path)


def round_dir(cfg: DictConfig, k: int) -> Path:
    return Path(cfg.paths.experiment_dir) / f"round_{k}"


def model_dir(cfg: DictConfig, k: int) -> Path:
    """model_0 is the base model; model_k (k >= 1) is round k-1's merged model."""
    return base_model_dir(cfg) if k == 0 else round_dir(cfg, k - 1) / "merged"


def model_marker(cfg: DictConfig, k: int) -> Path:
    """A file whose existence means model_k is fully saved (Snakemake tracks files, not folders)."""
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


def chair_image_ids(cfg: DictConfig) -> Path:
    return Path(cfg.paths.data_dir) / "chair_image_ids.json"


def summary_json(cfg: DictConfig) -> Path:
    return Path(cfg.paths.experiment_dir) / "summary.json"


def logs_dir(cfg: DictConfig) -> Path:
    return Path(cfg.paths.experiment_dir) / "logs"


def gen_generations(cfg: DictConfig, k: int) -> Path:
    """model_k's descriptions of the unlabelled images: the raw material of round k's preference pairs."""
    return generations(cfg, k, "gen")


def pairs_jsonl(cfg: DictConfig, k: int) -> Path:
    return round_dir(cfg, k) / "pairs" / "pairs.jsonl"


def ref_logps_jsonl(cfg: DictConfig, k: int) -> Path:
    return round_dir(cfg, k) / "pairs" / "ref_logps.jsonl"


def train_dir(cfg: DictConfig, k: int) -> Path:
    return round_dir(cfg, k) / "train"


def rounds_plot(cfg: DictConfig) -> Path:
    return Path(cfg.paths.experiment_dir) / "rounds.png"
