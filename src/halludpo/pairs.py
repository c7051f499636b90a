"""Stage `pairs` (rule inject for APASI): round k's preference pairs from model_k's own descriptions.

    python -m halludpo.pairs round=0

Writes pairs.jsonl: {image_id, image_path, prompt, context, chosen, rejected, method, meta{...}} (DESIGN.md).
"""

from __future__ import annotations

import logging

from omegaconf import DictConfig

from halludpo import paths
from halludpo.config import stage_main
from halludpo.injection import PAPER_TEMPLATES, TOY_TEMPLATES, TextOnlyCompleter, build_apasi_pairs
from halludpo.io import InputError, read_jsonl, write_json, write_jsonl
from halludpo.metrics.chair import ChairScorer, load_synonyms
from halludpo.metrics.text import get_text_pipeline
from halludpo.models import load_model_and_processor

log = logging.getLogger(__name__)

GENERATION_FIELDS = ("image_id", "image_path", "prompt", "response", "model", "round")


def injection_rate(rates: list[float], k: int) -> float:
    """Round k's injection rate from the per-round schedule (the last entry repeats)."""
    if not rates:
        raise ValueError("method.injection_rates is empty")
    return float(rates[min(k, len(rates) - 1)])


def templates_for(choice: str, data_kind: str) -> list[str]:
    if choice == "auto":
        choice = "toy" if data_kind == "toy" else "paper"
    if choice not in ("toy", "paper"):
        raise ValueError(f"method.templates={choice!r}; valid: auto, toy, paper")
    return list(TOY_TEMPLATES if choice == "toy" else PAPER_TEMPLATES)


def object_finder(vocabulary_path: str, text_pipeline: str):
    """text -> set of vocabulary categories, with CHAIR's matching (compounds, synonyms, lemmas)."""
    synonyms = load_synonyms(vocabulary_path)
    scorer = ChairScorer.for_vocabulary(synonyms, get_text_pipeline(text_pipeline))
    return lambda text: set(scorer.categories(text)), sorted(set(synonyms.values()))


def run(cfg: DictConfig) -> None:
    k = cfg.round
    method = cfg.method
    if method.name != "apasi":
        raise ValueError(f"method.name={method.name!r}: the pairs stage implements apasi so far")
    source = paths.gen_generations(cfg, k)
    generations = read_jsonl(source, required=GENERATION_FIELDS)
    if not generations:
        raise InputError(f"{source}: no generations")
    objects_of, vocabulary = object_finder(cfg.data.vocabulary, cfg.eval.chair.text_pipeline)
    model, processor = load_model_and_processor(paths.model_dir(cfg, k), cfg.model.family, cfg.model.dtype)
    completer = TextOnlyCompleter(model, processor, generations[0]["prompt"],
                                  max_new_tokens=method.completion.max_new_tokens,
                                  repetition_penalty=method.completion.repetition_penalty,
                                  batch_size=method.completion.batch_size,
                                  terminator=" ." if cfg.data.kind == "toy" else ".")
    rate = injection_rate(list(method.injection_rates), k)
    rows, stats = build_apasi_pairs(generations, objects_of, vocabulary, completer, rate=rate, skip=method.skip,
                                    mode=method.mode, templates=templates_for(method.templates, cfg.data.kind),
                                    seed=cfg.seed + k, top_k=method.top_k)
    if not rows:
        raise InputError(f"{source}: no preference pair could be built from {len(generations)} descriptions "
                         f"({stats}); the descriptions need >= 2 sentences with vocabulary objects")
    out = paths.pairs_jsonl(cfg, k)
    write_jsonl(out, rows)
    write_json(out.with_name("pairs_stats.json"), stats | {"rate": rate, "round": k})
    log.info("round %d: %d pairs from %d descriptions (rate %.2f, mode %s) -> %s", k, len(rows),
             len(generations), rate, method.mode, out)


main = stage_main(run)

if __name__ == "__main__":
    main()
