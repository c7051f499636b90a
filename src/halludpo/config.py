"""One config tree for the DAG and the stages: Hydra composition, validation, and the stage entry point.

The Snakefile composes the config once at parse time with the user's overrides; every rule calls its stage as a
Hydra app with the same overrides plus `round=<k>`, so the DAG and the stages always see the same values.
"""

from __future__ import annotations

import functools
import logging
import os
import shlex
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

CONFIG_DIR = Path(os.environ.get("HALLUDPO_CONFIG_DIR", Path(__file__).resolve().parents[2] / "configs"))


class ConfigError(ValueError):
    """The composed config is invalid: an unknown key or group, a wrong type, a missing value."""


def normalize_overrides(overrides: str | Iterable[str] | None) -> list[str]:
    """Accept a list, a '[a=1,b=2]' string or a whitespace-separated string of Hydra overrides. In the bracketed
    form only top-level commas separate overrides, so a value may be a list: '[rounds=1,train.foo=[0.5,0.7]]',
    and quotes stay for Hydra, which needs them around a value with brackets, '|' or commas:
    "[train.lora.target_modules='.*(q_proj|v_proj)']"."""
    if overrides is None:
        return []
    if isinstance(overrides, str):
        text = overrides.strip()
        if text.startswith("[") and text.endswith("]"):
            return [item.strip() for item in split_top_level(text[1:-1])]
        return shlex.split(text)
    return [str(o) for o in overrides]


def split_top_level(text: str, separator: str = ",") -> list[str]:
    """text split at the separators outside brackets and quotes: 'a=1,b=[2,3]' -> ['a=1', 'b=[2,3]']."""
    pieces, depth, quote, start = [], 0, None, 0
    for i, ch in enumerate(text):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == separator and depth == 0:
            pieces.append(text[start:i])
            start = i + 1
    pieces.append(text[start:])
    return [p for p in pieces if p.strip()]


def one_line(message: str) -> str:
    """A Hydra or OmegaConf error message on one line: its lines joined ('; ' unless a line ends a sentence), an
    indented list after a 'header:' line joined by ', ', the config search path left out."""
    parts: list[str] = []
    for raw in str(message).splitlines():
        line = raw.strip()
        if line.startswith("Config search path"):
            break
        if not line:
            continue
        if parts and raw[:1].isspace():
            parts[-1] += (" " if parts[-1].endswith(":") else ", ") + line
        else:
            parts.append(line)
    return "".join(part + (" " if part.endswith((".", "!", "?")) else "; ") for part in parts).rstrip("; ")


def compose(overrides: Iterable[str] = (), config_dir: str | Path = CONFIG_DIR) -> DictConfig:
    """Compose configs/config.yaml with overrides and validate it; any error becomes a one-line ConfigError that
    names the setting, not the whole override list."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(Path(config_dir).resolve()), version_base="1.3"):
            cfg = hydra_compose(config_name="config", overrides=list(overrides))
    except Exception as err:  # Hydra raises several types; users need the message, not the class
        raise ConfigError(f"invalid config: {one_line(err)}") from None
    finally:
        GlobalHydra.instance().clear()
    validate(cfg)
    return cfg


REQUIRED_GROUPS = ("paths", "data", "model", "method", "train", "eval", "tracking")


def validate(cfg: DictConfig) -> None:
    """Checks Hydra cannot do: every group present, values resolvable, and every setting of the tree within its type
    and range and consistent with the others (halludpo.settings). Raises one ConfigError line."""
    from halludpo.settings import problems, summary

    missing = [g for g in REQUIRED_GROUPS if g not in cfg]
    if missing:
        raise ConfigError(f"config group(s) missing: {missing}")
    try:
        tree = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except Exception as err:
        raise ConfigError(f"config value cannot be resolved: {one_line(err)}") from None
    found = problems(tree)
    if found:
        raise ConfigError(summary(found))


def to_plain(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)


PER_ROUND_KEYS = ("injection_rates", "mode")  # APASI method keys that may hold one entry per round


def per_round(schedule, k: int, name: str = "schedule"):
    """Round k's entry of a per-round schedule (a list whose last entry repeats), or the value itself (a scalar)."""
    if isinstance(schedule, str) or not isinstance(schedule, Sequence):
        return schedule
    if len(schedule) == 0:
        raise ValueError(f"{name} is empty")
    return schedule[min(k, len(schedule) - 1)]


ROUND_SEED_STRIDE = 1000  # seeds of consecutive rounds lie this far apart: seed s, round 1 is not seed s+1, round 0


def round_seed(cfg: DictConfig, k: int) -> int:
    """Round k's seed, the one rule every stage derives its per-round randomness from (which images are described
    or sampled, injection plans, mixing): cfg.seed + ROUND_SEED_STRIDE * k, new samples every round."""
    return int(cfg.seed) + ROUND_SEED_STRIDE * k


def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    """{'a': {'b': 1}} -> {'a.b': 1}; lists become their string form (MLflow params are strings)."""
    flat: dict[str, object] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value if isinstance(value, (int, float, str, bool)) or value is None else str(value)
    return flat


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr, force=True)


def stage_main(run: Callable[[DictConfig], object]) -> Callable[[], None]:
    """Wrap `run(cfg)` as the stage's Hydra app: `python -m halludpo.<stage> round=1 key=value ...`.

    Hydra parses the command line; version_base 1.3 keeps the working directory (outputs are relative paths).
    Errors a user can fix (bad input, bad config) print one line and exit 1 instead of a traceback. After a
    successful run, the files it wrote are listed with their sha256 in a manifest (halludpo.manifest).
    """
    import hydra

    from halludpo import manifest
    from halludpo.io import InputError

    @hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base="1.3")
    @functools.wraps(run)
    def main(cfg: DictConfig) -> None:
        setup_logging()
        try:
            validate(cfg)
            manifest.start()  # every file the stage writes through halludpo.io is recorded ...
            run(cfg)
            manifest.finish(cfg, manifest.stage_module(run))  # ... and hashed into its manifest once run succeeds
        except (ConfigError, InputError, FileNotFoundError, ValueError) as err:
            logging.getLogger(run.__module__).error("%s", err)
            sys.exit(1)
        finally:
            manifest.stop()

    return main
