"""Stage `pairs`: round k's preference pairs from model_k's own outputs.

    python -m halludpo.pairs round=0                                   # method=apasi (rule inject) or sentinel
    python -m halludpo.pairs round=0 method=apasi_sentinel step=sentinel   # one method of a mix; then step=mix

The model work is sharded (halludpo.shards): shard=i shards=n runs shard i (APASI's text-only completions,
SENTINEL's sampled sentences) into pairs/shards/; gather=true shards=n builds the pairs from all shards.

APASI (rule inject) injects hallucinations into model_k's descriptions; SENTINEL (rule sentinel) samples sentences
and keeps pairs at the first hallucinated sentence with its context; a mixed method concatenates both (rule
mix_pairs, halludpo.mixing).

Writes pairs.jsonl: {image_id, image_path, prompt, context, chosen, rejected, method, meta{...}}
(docs/methods.md "Data contracts").
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

from omegaconf import DictConfig

from halludpo import paths
from halludpo.config import per_round, round_seed, stage_main, to_plain
from halludpo.evaluate import object_scorer
from halludpo.generate import select_images
from halludpo.apasi import MODES, PAPER_TEMPLATES, TOY_TEMPLATES, TextOnlyCompleter, build_apasi_pairs
from halludpo.io import InputError, read_json, read_jsonl, write_json, write_jsonl
from halludpo.mixing import apasi_verifies, method_settings, mix_pairs, pair_methods
from halludpo.models import load_model_and_processor
from halludpo.sentinel import build_sentinel_pairs
from halludpo.shards import (RecordingCompleter, ReplayCompleter, batch_seed, input_fingerprint, read_shards,
                             run_batches, shard_file, shard_files, shard_range)

log = logging.getLogger(__name__)

GENERATION_FIELDS = ("image_id", "image_path", "prompt", "response", "model", "round")


def injection_rate(rates: list[float], k: int) -> float:
    """Round k's injection rate from the per-round schedule (the last entry repeats)."""
    return float(per_round(rates, k, "method.injection_rates"))


def injection_mode(modes, k: int) -> str:
    """Round k's injection mode: method.mode is one mode for every round or a per-round list (the last repeats);
    every entry is checked, so a typo in a later round fails in round 0."""
    for mode in [modes] if isinstance(modes, str) else modes:
        if mode not in MODES:
            raise ValueError(f"method.mode: unknown injection mode {mode!r}; valid modes: {', '.join(MODES)}")
    return per_round(modes, k, "method.mode")


def templates_for(choice: str, data_kind: str) -> list[str]:
    if choice == "auto":
        choice = "toy" if data_kind == "toy" else "paper"
    if choice not in ("toy", "paper"):
        raise ValueError(f"method.templates={choice!r}; valid: auto, toy, paper")
    return list(TOY_TEMPLATES if choice == "toy" else PAPER_TEMPLATES)


def object_finder(cfg: DictConfig):
    """(text -> set of vocabulary categories, the sorted categories): APASI's view of the evaluation's
    object_scorer, so the injected and kept objects are those CHAIR counts."""
    scorer = object_scorer(cfg)
    return lambda text: set(scorer.categories(text)), sorted(set(scorer.synonyms.values()))


def apasi_pairs(cfg: DictConfig, k: int, method, out: Path) -> dict:
    """APASI (rule inject): injected hallucinations in model_k's own descriptions of round k's gen split."""
    source = paths.gen_generations(cfg, k)
    generations = read_jsonl(source, required=GENERATION_FIELDS)
    if not generations:
        raise InputError(f"{source}: no generations")
    objects_of, vocabulary = object_finder(cfg)
    completer = apasi_completer(cfg, k, method, generations[0]["prompt"], out, source)
    rate = injection_rate(list(method.injection_rates), k)
    mode = injection_mode(method.mode, k)
    verify = method.get("verify") or {}
    verdicts = None
    if apasi_verifies(method):
        decide = verifier_decide_fn(cfg, cfg.data.gen_instances)
        verdicts = verify_images(decide, generations, vocabulary)
    rows, stats = build_apasi_pairs(generations, objects_of, vocabulary, completer, rate=rate, skip=method.skip,
                                    mode=mode, templates=templates_for(method.templates, cfg.data.kind),
                                    seed=round_seed(cfg, k), top_k=method.top_k, verdicts=verdicts,
                                    verify_injected=bool(verify.get("injected")),
                                    verify_chosen=bool(verify.get("chosen")),
                                    verify_complete=bool(verify.get("complete")),
                                    verify_correct=bool(verify.get("correct")),
                                    correct_as=verify.get("correct_as", "response"),
                                    mirror=bool(verify.get("mirror", False)))
    if not cfg.gather:
        if not completer.out.exists():  # no sentence to complete in any shard
            write_jsonl(completer.out, [])
        log.info("round %d: shard %d of %d of the completions -> %s", k, cfg.shard, cfg.shards,
                 completer.out)
        return stats
    if not rows:
        raise InputError(f"{source}: no preference pair could be built from {len(generations)} descriptions "
                         f"({stats}); the descriptions need >= 2 sentences with vocabulary objects")
    write_jsonl(out, rows)
    write_json(out.with_name("pairs_stats.json"), stats | {"rate": rate, "mode": mode, "round": k})
    log.info("round %d: %d APASI pairs from %d descriptions (rate %.2f, mode %s) -> %s", k, len(rows),
             len(generations), rate, mode, out)
    return stats


def apasi_completer(cfg: DictConfig, k: int, method, prompt: str, out: Path, source: Path):
    """The completer of APASI's injected sentences: model_k without the image, completing this shard's part of
    the prompts into pairs/shards/completions.<i>-of-<n>.jsonl; with gather=true the shards' completions."""
    if cfg.gather:
        return ReplayCompleter(shard_files(out, cfg.shards, "completions"))
    model_path = paths.model_dir(cfg, k)
    model, processor = load_model_and_processor(model_path, cfg.model.family, cfg.model.dtype, cfg.model.device)
    completer = TextOnlyCompleter(model, processor, prompt, max_new_tokens=method.completion.max_new_tokens,
                                  repetition_penalty=method.completion.repetition_penalty,
                                  batch_size=method.completion.batch_size,
                                  terminator=" ." if cfg.data.kind == "toy" else ".")
    fingerprint = input_fingerprint(to_plain(cfg), [model_path, source])
    return RecordingCompleter(completer, shard_file(out, cfg.shard, cfg.shards, "completions"), cfg.shard,
                              cfg.shards, fingerprint)


def sentinel_items(method, k: int, seed: int, model_name: str) -> list[dict]:
    """The images SENTINEL describes in round k: method.instances (a seeded sample of method.n_images, new each
    round, as generate's gen split), each with a question drawn from method.prompts."""
    images = select_images(method.instances, method.n_images, seed)
    prompts = list(method.prompts)
    if not prompts:
        raise ValueError("method.prompts is empty")
    rng = random.Random(f"{seed}/prompts")
    return [{"image_id": im["id"], "image_path": str(Path(method.images_dir) / im["file_name"]),
             "prompt": prompts[0] if len(prompts) == 1 else rng.choice(prompts), "model": model_name, "round": k}
            for im in images]


def verify_images(decide, generations: list[dict], categories: list[str], batch_size: int = 256) -> list[dict]:
    """Per generation, the two verifiers' {category: (A present, B present)} for every category on its image."""
    verdicts = []
    for start in range(0, len(generations), batch_size):
        verdicts += decide([(gen, categories) for gen in generations[start: start + batch_size]])
    return verdicts


def verifier_decide_fn(cfg: DictConfig, instances: str):
    """The two verifiers' decide_fn: the trained verifiers of rule train_verifiers (kind toy), the two zero-shot
    detectors of configs/verifier/detector.yaml (kind detector), or with verifier.oracle the annotation oracle of
    `instances` twice (ablation)."""
    from halludpo import verifiers

    v = cfg.verifier
    if v.kind not in ("toy", "detector"):
        raise ValueError(f"verifier.kind={v.kind!r}: valid kinds are toy (configs/verifier/toy.yaml) and detector "
                         "(configs/verifier/detector.yaml)")
    thresholds = list(v.thresholds)
    if v.oracle:
        if not read_json(instances).get("annotations"):
            raise InputError(f"{instances}: no annotations, so verifier.oracle=true (ablation) cannot read "
                             "the ground truth; point method.instances/method.images_dir at an annotated split")
        oracle = verifiers.AnnotationOracleVerifier(instances)
        log.warning("ABLATION verifier.oracle=true: both verifiers are the annotations of %s", instances)
        return verifiers.make_decide_fn(oracle, oracle)
    if v.kind == "detector":
        from halludpo.detectors import decide_fn_from_config

        return decide_fn_from_config(to_plain(v))
    a, b = verifiers.load_trained(paths.verifiers_dir(cfg), list(v.kinds))
    return verifiers.make_decide_fn(a, b, *thresholds)


def sentinel_pairs(cfg: DictConfig, k: int, method, out: Path) -> dict:
    """SENTINEL (rule sentinel): model_k grows each description sentence by sentence from n sampled sentences per
    step, objects through the CHAIR text pipeline, two verifiers cross-check them; pairs at the first hallucinated
    sentence with the faithful context before it. Shard jobs (gather=false) sample the trajectories
    (sample_shard); the gather step (rule sentinel_pairs) builds the pairs from all shards'."""
    sampling = method.sampling
    seed = round_seed(cfg, k)  # new images and samples every round
    trajectories_file = out.with_name("trajectories.jsonl")
    if cfg.gather:
        trajectories = read_shards(shard_files(trajectories_file, cfg.shards))
    else:
        sample_shard(cfg, k, method, seed, shard_file(trajectories_file, cfg.shard, cfg.shards))
        return {}
    rows, stats = build_sentinel_pairs(trajectories, method.get("win", "context_coherent"),
                                       bool(method.get("stop_pairs", False)))
    write_jsonl(trajectories_file, trajectories)
    if not rows:
        raise InputError(f"round {k}: SENTINEL built no pair from {len(trajectories)} images ({stats}); a pair "
                         "needs, at one step, a factual context-coherent sentence and a hallucinated one (more "
                         "samples, more steps or more images help)")
    stats |= {"round": k, "n": sampling.n, "max_steps": sampling.max_steps,
              "verifier_oracle": bool(cfg.verifier.oracle)}
    write_jsonl(out, rows)
    write_json(out.with_name("pairs_stats.json"), stats)
    log.info("round %d: %d SENTINEL pairs from %d images (%d steps) -> %s", k, len(rows), len(trajectories),
             stats["steps"], out)
    return stats


def sample_shard(cfg: DictConfig, k: int, method, seed: int, target: Path) -> None:
    """One shard of SENTINEL's sampling: its images' trajectories, grown chunk by chunk (sampling.batch_size
    images each, sampled with batch_seed(seed, the chunk's first position)), so that a chunk draws the same
    sentences in any shard and a killed shard resumes after its last finished chunk."""
    import torch

    from halludpo.inference import SentenceSampler
    from halludpo.sentinel import object_extractor, sample_contexts

    sampling = method.sampling
    model_path = paths.model_dir(cfg, k)
    items = sentinel_items(method, k, seed, str(model_path))
    if not items:
        raise InputError(f"{method.instances}: no images")
    scorer = object_scorer(cfg)
    objects_of = object_extractor(scorer)
    decide = verifier_decide_fn(cfg, method.instances)
    model, processor = load_model_and_processor(model_path, cfg.model.family, cfg.model.dtype,
                                                cfg.model.device)
    sampler = SentenceSampler(model, processor, n=sampling.n, temperature=sampling.temperature,
                              max_new_tokens=sampling.max_new_tokens, top_p=sampling.top_p, seed=seed,
                              desc=f"sentinel r{k}", progress=False)
    all_objects = sorted(set(scorer.synonyms.values())) if method.get("stop_pairs", False) else None
    chunk = int(sampling.batch_size)

    def work(start: int, stop: int) -> list[dict]:
        torch.manual_seed(batch_seed(seed, start))
        return sample_contexts(sampler, items[start:stop], sampling.n, sampling.max_steps, objects_of, decide,
                               seed=seed, batch_size=chunk, all_objects=all_objects)

    fingerprint = input_fingerprint(to_plain(cfg), [model_path, method.instances])
    positions = shard_range(len(items), chunk, cfg.shard, cfg.shards)
    try:
        rows = run_batches(target, positions, chunk, work, fingerprint, desc=f"sentinel r{k} shard {cfg.shard}")
    finally:
        sampler.close()
    log.info("round %d: shard %d of %d, %d trajectories -> %s", k, cfg.shard, cfg.shards, len(rows), target)


BUILDERS = {"apasi": apasi_pairs, "sentinel": sentinel_pairs}


def run(cfg: DictConfig) -> None:
    """step=main: the configured single method -> pairs.jsonl. A mixed method runs step=<method> per method
    (-> pairs/<method>/pairs.jsonl), then step=mix (-> pairs.jsonl)."""
    k = cfg.round
    methods = pair_methods(cfg.method)
    if cfg.step == "main":
        if len(methods) != 1:
            raise ValueError(f"method={cfg.method.name}: run the pairs stage with step=<one of {methods}> or step=mix")
        BUILDERS[methods[0]](cfg, k, cfg.method, paths.pairs_jsonl(cfg, k))
    elif cfg.step in methods and len(methods) > 1:
        BUILDERS[cfg.step](cfg, k, method_settings(cfg.method, cfg.step), paths.method_pairs_jsonl(cfg, k, cfg.step))
    elif cfg.step == "mix" and len(methods) > 1:
        by_method = {m: read_jsonl(paths.method_pairs_jsonl(cfg, k, m)) for m in methods}
        rows, stats = mix_pairs(by_method, to_plain(cfg.method.mix), round_seed(cfg, k))
        if not rows:
            raise InputError(f"round {k}: the mix took no pair ({stats}); check method.mix weights and caps")
        out = paths.pairs_jsonl(cfg, k)
        write_jsonl(out, rows)
        write_json(out.with_name("pairs_stats.json"), {"mix": stats, "pairs": len(rows), "round": k})
        log.info("round %d: %d mixed pairs %s -> %s", k, len(rows), stats, out)
    else:
        raise ValueError(f"step={cfg.step!r} for method={cfg.method.name}; valid: "
                         f"{['main'] if len(methods) == 1 else [*methods, 'mix']}")


main = stage_main(run)

if __name__ == "__main__":
    main()
