"""Stage `data` (rule render): write the toy world — images, COCO instances, captions, vocabulary.

    python -m halludpo.data            # renders cfg.data into cfg.paths.data_dir
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from omegaconf import DictConfig

from halludpo.config import stage_main
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


def run(cfg: DictConfig) -> None:
    if cfg.data.kind != "toy":
        raise ValueError(f"data.kind={cfg.data.kind!r}: only the toy world is rendered; "
                         "real datasets come from the download rules")
    stats = render_toy_data(cfg.paths.data_dir, cfg.data.splits, cfg.data.seed, cfg.data.world)
    for split, s in stats.items():
        log.info("%s: %s", split, s)


main = stage_main(run)

if __name__ == "__main__":
    main()
