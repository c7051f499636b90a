"""Every numeric and enumerated setting of the config tree with its type and range, checked when a config is
composed (the Snakefile at parse time, every stage at start), so a bad value fails before anything runs.

`SETTINGS` maps a key pattern to what the key may hold. A pattern is a dotted key whose segments may be `*` (any
one segment, fnmatch-style) or `**` (any number of segments, none included); the first pattern matching a key
applies, so specific patterns come before generic ones (`**.batch_size`). Keys no pattern matches (paths, prompts,
download URLs) are not checked here. `CROSS_CHECKS` hold the rules that tie two settings together (train.loss
against contrast.kind, ...).

    problems(tree) -> [(key, "train.beta = -1: must be a finite number > 0"), ...]

One line per problem: the key, the value and what the key allows. Light on imports (the Snakefile loads it at
parse time): the enumerations of heavy modules are copied here, and tests/reliability/test_settings.py checks that
they still agree with the modules.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase

from halludpo.families import FAMILIES
from halludpo.mixing import MIXES, SINGLE, pair_methods

# Enumerations of modules that import torch (checked against them by the tests).
LOSSES = ("sigmoid", "cdpo", "mdpo", "symmpo")                     # halludpo.losses.LOSSES
CONTRAST_KINDS = ("none", "corrupt", "black", "noise", "neighbour")  # halludpo.contrast.KINDS
INJECTION_MODES = ("replace", "insert", "both", "append")          # halludpo.apasi.MODES
CORRECT_AS = ("response", "sentence", "object")                    # halludpo.apasi.CORRECT_AS
WIN_RULES = ("context_coherent", "new_objects", "factual")         # halludpo.sentinel.WIN_RULES
TOY_VERIFIER_KINDS = ("cnn", "features", "mlp")                    # halludpo.verifiers.KINDS
DETECTOR_DTYPES = ("float32", "float16", "bfloat16")               # halludpo.detectors.DTYPES
POPE_SPLITS = ("random", "popular", "adversarial")                 # halludpo.metrics.pope.POPE_SPLITS
BENCHMARKS = ("chair", "pope", "amber", "object_halbench", "mmhal")  # halludpo.evaluate.BENCHMARKS
AMBER_ANSWER_RULES = ("amber", "first-word")                       # halludpo.metrics.amber.ANSWER_RULES
AMBER_NOUN_PIPELINES = ("auto", "nltk", "offline")                 # halludpo.metrics.amber.NOUN_PIPELINES
AMBER_MATCHERS = ("auto", "spacy", "table", "offline")             # halludpo.metrics.amber.MATCHERS
AMBER_WORDINGS = ("amber", "toy")                                  # halludpo.toyworld.AMBER_WORDINGS
TEXT_PIPELINES = ("auto", "nltk", "offline")                       # halludpo.metrics.text.TEXT_PIPELINE_NAMES
HALLUCINATION_POSITIONS = ("anywhere", "last")                     # halludpo.toyworld.HALLUCINATION_POSITIONS
VERIFY_MODES = ("strict", "tofu")                                  # halludpo.download.VERIFY_MODES
DEVICE_SETTING = re.compile(r"^(auto|cpu|meta|cuda(:\d+)?)$")    # halludpo.models.DEVICE_SETTING
# Learning-rate schedules the Trainer builds without extra arguments (transformers.SchedulerType minus
# reduce_lr_on_plateau, which needs evaluation, and the schedules that need lr_scheduler_kwargs).
SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
              "inverse_sqrt")
IMAGE_PROMPTS = "image"  # method.generation.prompts: each image's own prompt (halludpo.generate.IMAGE_PROMPTS)
LOSS_CONTRAST = {  # train.loss -> the contrast kinds whose rows carry the fields its segments score
    "sigmoid": ("none",), "cdpo": ("none",),
    "mdpo": ("corrupt", "black", "noise", "neighbour"),      # contrast_image_path
    "symmpo": ("neighbour",),                                # contrast_image_path + chosen_contrast
}


# ---------------------------------------------------------------------------------------------------------------
# What a setting may hold


@dataclass(frozen=True)
class Setting:
    """What one setting may hold: `accepts(value)`, and the words an error uses for it ("a finite number > 0")."""

    accepts: Callable[[object], bool]
    description: str


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def interval(low, high, low_open: bool, high_open: bool) -> str:
    """'> 0', '>= 1', '<= 5', 'in (0, 1]' ..."""
    if high is None:
        return f"{'>' if low_open else '>='} {low}"
    if low is None:
        return f"{'<' if high_open else '<='} {high}"
    return f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"


def within(value, low, high, low_open: bool, high_open: bool) -> bool:
    above = low is None or (value > low if low_open else value >= low)
    below = high is None or (value < high if high_open else value <= high)
    return above and below


def integer(low: int | None = None, high: int | None = None) -> Setting:
    """An int (not a bool, not 2.0) in [low, high]."""
    words = "an integer" if low is None and high is None else f"an integer {interval(low, high, False, False)}"
    return Setting(lambda v: is_int(v) and within(v, low, high, False, False), words)


def number(low: float | None = None, high: float | None = None, low_open: bool = False,
           high_open: bool = False) -> Setting:
    """A finite int or float in the interval (never nan or inf, never a bool or a string)."""
    words = "a finite number" if low is None and high is None else \
        f"a finite number {interval(low, high, low_open, high_open)}"
    return Setting(lambda v: is_number(v) and math.isfinite(v) and within(v, low, high, low_open, high_open), words)


def flag() -> Setting:
    return Setting(lambda v: isinstance(v, bool), "true or false")


def text() -> Setting:
    return Setting(lambda v: isinstance(v, str) and bool(v.strip()), "a non-empty string")


def one_of(*choices) -> Setting:
    return Setting(lambda v: isinstance(v, (str, type(None))) and v in choices,
                   "one of " + ", ".join("null" if c is None else str(c) for c in choices))


def device() -> Setting:
    """A torch device setting (halludpo.models.resolve_device): auto, cpu, cuda, cuda:N, meta."""
    return Setting(lambda v: isinstance(v, str) and bool(DEVICE_SETTING.match(v)),
                   "one of auto, cpu, cuda, cuda:N, meta")


def regex() -> Setting:
    """A non-empty string that compiles as a regular expression."""
    def compiles(value) -> bool:
        if not isinstance(value, str) or not value:
            return False
        try:
            re.compile(value)
        except re.error:
            return False
        return True
    return Setting(compiles, "a valid regular expression")


def nullable(setting: Setting) -> Setting:
    return Setting(lambda v: v is None or setting.accepts(v), f"{setting.description}, or null")


def list_of(setting: Setting, length: int | None = None, allow_empty: bool = False) -> Setting:
    """A list of values each accepted by `setting`: non-empty unless allow_empty; exactly `length` long if given."""
    def accepts(value) -> bool:
        if not isinstance(value, list):
            return False
        sized = len(value) == length if length is not None else allow_empty or len(value) > 0
        return sized and all(setting.accepts(v) for v in value)
    size = f"a list of {length}" if length is not None else "a list" if allow_empty else "a non-empty list"
    return Setting(accepts, f"{size} of values each {setting.description}")


def either(first: Setting, second: Setting) -> Setting:
    return Setting(lambda v: first.accepts(v) or second.accepts(v), f"{first.description}, or {second.description}")


def per_round(setting: Setting) -> Setting:
    """One value for every round, or a non-empty list of values, one per round (the last repeats;
    halludpo.config.per_round)."""
    return Setting(lambda v: setting.accepts(v) or list_of(setting).accepts(v),
                   f"{setting.description}, or a non-empty list of such values (one per round)")


POSITIVE = number(0, low_open=True)
NON_NEGATIVE = number(0)
RATE = number(0, 1)                                   # a probability or a fraction, ends included
LEARNING_RATE = number(0, 1, low_open=True, high_open=True)
COUNT = integer(1)                                    # shard, batch, epoch, token, image counts
SEED = integer(0)

# ---------------------------------------------------------------------------------------------------------------
# The table: key pattern -> what it may hold (first match wins)

SETTINGS: dict[str, Setting] = {
    # top level
    "experiment_name": text(),
    "seed": SEED,
    "rounds": integer(0),
    "round": integer(0),                              # and <= rounds (check_round)
    "split": one_of("eval", "gen"),
    "step": text(),                                   # each stage knows its own steps
    "shard": integer(0),                              # and < shards (check_shard)
    "shards": COUNT,
    "amber_shards": COUNT,
    "object_halbench_shards": COUNT,
    "mmhal_shards": COUNT,
    "gather": flag(),
    "parallel.shards.*": COUNT,
    "paths.*": text(),
    # data
    "data.name": text(),
    "data.kind": one_of("toy", "coco"),
    "data.compounds": one_of("coco", "vocabulary"),
    "data.splits.*": COUNT,
    "data.downloads": list_of(text()),
    "data.world.image_size": COUNT,
    "data.world.min_objects": COUNT,                  # min <= max (check_world)
    "data.world.max_objects": COUNT,
    "data.world.min_glyph": COUNT,                    # min <= max <= image_size (check_world)
    "data.world.max_glyph": COUNT,
    "data.world.partner_prob": RATE,
    "data.world.cross_scene_prob": RATE,
    "data.world.hallucination_share": RATE,
    "data.world.hallucination_position": one_of(*HALLUCINATION_POSITIONS),
    "data.world.synonym_prob": RATE,
    "data.world.noise_std": NON_NEGATIVE,
    "data.world.max_overlap": RATE,
    # model
    "model.name": text(),
    "model.family": one_of(*FAMILIES),
    "model.path": text(),
    "model.dtype": one_of("float32", "float16", "bfloat16"),
    "model.device": device(),
    "model.revision": text(),                         # a branch, tag or commit of the hub repository
    "model.arch.image_size": COUNT,
    "model.arch.patch_size": COUNT,                   # <= image_size (check_arch)
    "model.arch.vision_hidden": COUNT,                # a multiple of vision_heads (check_arch)
    "model.arch.vision_layers": COUNT,
    "model.arch.vision_heads": COUNT,
    "model.arch.vision_feature_layer": integer(),     # a hidden-state index (check_arch)
    "model.arch.text_hidden": COUNT,                  # a multiple of text_heads (check_arch)
    "model.arch.text_layers": COUNT,
    "model.arch.text_heads": COUNT,
    "model.arch.max_positions": COUNT,
    "model.pretrain.warmup_frac": number(0, 1, high_open=True),
    "model.pretrain.qa_per_image": COUNT,
    "model.pretrain.qa_weight": per_round(NON_NEGATIVE),  # one weight, or one per epoch (the last repeats)
    "model.pretrain.qa_probe": integer(0),
    "model.pretrain.qa_weight_until": nullable(RATE),  # read from the yes/no probe (qa_probe > 0)
    "model.pretrain.threads": nullable(COUNT),
    # method: APASI (also under a mix) and SENTINEL (method.sentinel.* under a mix)
    "method.name": one_of(*SINGLE, *MIXES),
    "method.sentinel.name": one_of("sentinel"),
    "method.generation.prompts": either(one_of(IMAGE_PROMPTS), list_of(text())),
    "method.injection_rates": list_of(RATE),          # per round (the pairs stage reads a list)
    "method.skip": integer(0),
    "method.mode": per_round(one_of(*INJECTION_MODES)),
    "method.templates": one_of("auto", "toy", "paper"),
    "method.top_k": COUNT,
    "method.completion.repetition_penalty": POSITIVE,
    "method.verify.correct_as": one_of(*CORRECT_AS),  # mirror needs object (check_mirror)
    "method.verify.injected": flag(),
    "method.verify.chosen": flag(),
    "method.verify.complete": flag(),
    "method.verify.correct": flag(),
    "method.verify.mirror": flag(),
    "method.**.prompts": list_of(text()),
    "method.**.sampling.n": COUNT,
    "method.**.sampling.max_steps": COUNT,
    "method.**.win": one_of(*WIN_RULES),
    "method.**.stop_pairs": flag(),
    "method.mix.*.weight": NON_NEGATIVE,
    "method.mix.*.cap": nullable(integer(0)),
    # train
    "train.loss": one_of(*LOSSES),                    # against contrast.kind (check_loss_contrast)
    "train.beta": POSITIVE,
    "train.symmpo.beta1": POSITIVE,
    "train.symmpo.beta2": POSITIVE,
    "train.symmpo.lam": NON_NEGATIVE,
    "train.symmpo.gamma": NON_NEGATIVE,
    "train.sft_weight": NON_NEGATIVE,
    "train.reference": one_of("stored", "online"),
    "train.grad_accum": COUNT,
    "train.scheduler": one_of(*SCHEDULERS),
    "train.warmup_ratio": number(0, 1, high_open=True),  # the Trainer's warmup_steps: a float in [0, 1) is a ratio
    "train.ref_batch_size": COUNT,
    "train.save_steps": COUNT,
    "train.bf16": flag(),
    "train.deepspeed": nullable(text()),
    "train.lora.r": COUNT,
    "train.lora.alpha": POSITIVE,
    "train.lora.dropout": number(0, 1, high_open=True),
    "train.lora.target_modules": either(regex(), list_of(text())),
    "train.lora.train_projector": flag(),
    # contrast
    "contrast.kind": one_of(*CONTRAST_KINDS),
    "contrast.min_area": number(0, 1, low_open=True),  # min <= max (check_contrast_areas)
    "contrast.max_area": number(0, 1, low_open=True),
    "contrast.std": NON_NEGATIVE,
    "contrast.distinct": flag(),
    # eval
    "eval.chair.image_ids_file": nullable(text()),
    "eval.chair.prompt": text(),
    "eval.chair.text_pipeline": one_of(*TEXT_PIPELINES),
    "eval.pope.splits": list_of(one_of(*POPE_SPLITS)),  # coco: each has a released file (check_pope_sources)
    "eval.pope.n_images": COUNT,
    "eval.pope.min_objects": COUNT,
    "eval.pope.per_image": COUNT,
    "eval.pope.parse": one_of("pope", "opera"),      # halludpo.metrics.pope.PARSE_RULES
    "eval.benchmarks": Setting(lambda v: list_of(one_of(*BENCHMARKS)).accepts(v) and len(set(v)) == len(v),
                               f"a non-empty list of distinct names, each one of {', '.join(BENCHMARKS)}"),
    "eval.amber.n_images": COUNT,                     # toy world: <= data.splits.eval (check_toy_image_counts)
    "eval.amber.n_hallu": integer(0),
    "eval.amber.wording": one_of(*AMBER_WORDINGS),
    "eval.amber.discriminative.answer_rule": one_of(*AMBER_ANSWER_RULES),
    "eval.amber.noun_pipeline": one_of(*AMBER_NOUN_PIPELINES),
    "eval.amber.matcher": one_of(*AMBER_MATCHERS),
    "eval.amber.similarity_table": nullable(text()),
    "eval.amber.threshold": number(0, 1),
    "eval.object_halbench.n_images": COUNT,           # toy world: <= data.splits.eval (check_toy_image_counts)
    "eval.object_halbench.prompts": one_of("toy", "paper"),
    "eval.object_halbench.mentions": one_of("every", "distinct"),
    "eval.judge.base_url": nullable(text()),         # null: no judge; judge-scored benchmarks refuse to run
    "eval.judge.model": text(),                       # pinned: a dated snapshot, recorded in every result
    "eval.judge.api_key_env": text(),                 # the NAME of the key's variable (halludpo.judge checks it)
    "eval.judge.max_retries": integer(0),
    "eval.judge.timeout": POSITIVE,
    "eval.judge.backoff": NON_NEGATIVE,
    "eval.judge.backoff_max": NON_NEGATIVE,
    "eval.judge.price_input_per_1k": NON_NEGATIVE,
    "eval.judge.price_output_per_1k": NON_NEGATIVE,
    "eval.judge.output_tokens_estimate": COUNT,
    "eval.judge.cache_dir": text(),
    "eval.judge.parameters.temperature": NON_NEGATIVE,  # before **.temperature: the judges' 0.0 is valid
    # tracking
    "tracking.enabled": flag(),
    "tracking.required": flag(),
    "tracking.tracking_uri": text(),
    "tracking.artifact_location": text(),
    # verifier
    "verifier.kind": one_of("toy", "detector"),
    "verifier.kinds": list_of(text(), length=2),      # known kinds (check_verifier_kinds)
    "verifier.thresholds": list_of(NON_NEGATIVE, length=2),
    "verifier.text_thresholds": list_of(nullable(NON_NEGATIVE), length=2),
    "verifier.oracle": flag(),
    "verifier.dtype": one_of(*DETECTOR_DTYPES),
    "verifier.device": device(),
    "verifier.models.*": text(),
    "verifier.max_queries": COUNT,
    "verifier.train.image_size": COUNT,
    "verifier.train.threads": COUNT,
    "verifier.train.hyper.*.pos_weight": POSITIVE,
    "verifier.train.arch.*.*": COUNT,                 # width, bins, grid, hidden
    # download
    "download.offline": flag(),
    "download.progress": flag(),
    "download.retries": integer(0),
    "download.names": list_of(text(), allow_empty=True),
    "download.bundles.*": list_of(text()),
    "download.entries.*.extract": one_of(None, "zip", "tar"),
    "download.entries.*.verify": one_of(*VERIFY_MODES),
    # the same meaning wherever they appear
    "**.seed": SEED,
    "**.lr": LEARNING_RATE,
    "**.epochs": COUNT,
    "**.batch_size": COUNT,
    "**.max_length": COUNT,
    "**.max_new_tokens": COUNT,
    "**.n_images": nullable(COUNT),                   # null: every image (method.*); eval: a count
    "**.weight_decay": NON_NEGATIVE,
    "**.do_sample": flag(),
    "**.num_beams": COUNT,
    "**.temperature": POSITIVE,
    "**.top_p": number(0, 1, low_open=True),
}


def matches(pattern: tuple[str, ...], key: tuple[str, ...]) -> bool:
    """Whether a dotted key (as segments) matches a pattern: `*` = any one segment, `**` = any number of them."""
    if not pattern:
        return not key
    head, rest = pattern[0], pattern[1:]
    if head == "**":
        return any(matches(rest, key[i:]) for i in range(len(key) + 1))
    return bool(key) and fnmatchcase(key[0], head) and matches(rest, key[1:])


PATTERNS = [(tuple(p.split(".")), setting) for p, setting in SETTINGS.items()]


@functools.lru_cache(maxsize=4096)
def setting_for(key: str) -> Setting | None:
    """The first table entry whose pattern matches the dotted key, or None."""
    segments = tuple(key.split("."))
    return next((setting for pattern, setting in PATTERNS if matches(pattern, segments)), None)


def shown(value) -> str:
    """A value as the config writes it: true / false / null, strings quoted, numbers and lists as Python does."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    return repr(value)


def problem(key: str, value, must: str) -> tuple[str, str]:
    return key, f"{key} = {shown(value)}: {must}"


# ---------------------------------------------------------------------------------------------------------------
# One setting at a time


def setting_problems(tree: Mapping, prefix: str = "") -> list[tuple[str, str]]:
    """(key, message) for every value the table refuses. A key with a table entry is checked as a whole (a mapping
    given where a number belongs is refused); a mapping without one is walked into."""
    found = []
    for name, value in tree.items():
        key = f"{prefix}{name}"
        setting = setting_for(key)
        if setting is not None:
            if not setting.accepts(value):
                found.append(problem(key, value, f"must be {setting.description}"))
        elif isinstance(value, Mapping):
            found.extend(setting_problems(value, key + "."))
    return found


# ---------------------------------------------------------------------------------------------------------------
# Settings that depend on each other


def lookup(tree: Mapping, key: str, default=None):
    """tree["a"]["b"] for "a.b"; default when a part is missing or not a mapping."""
    node = tree
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return default
        node = node[part]
    return node


def check_round(tree: Mapping) -> list[tuple[str, str]]:
    rounds, k = tree.get("rounds"), tree.get("round")
    if is_int(rounds) and is_int(k) and k > rounds:
        return [problem("round", k, f"must be in [0, rounds={rounds}]")]
    return []


def check_shard(tree: Mapping) -> list[tuple[str, str]]:
    shards, i = tree.get("shards"), tree.get("shard")
    if is_int(shards) and is_int(i) and i >= shards:
        return [problem("shard", i, f"must be in [0, shards={shards})")]
    return []


def check_loss_contrast(tree: Mapping) -> list[tuple[str, str]]:
    """The loss scores the contrast rows the contrast stage writes: mdpo needs a contrast image, symmpo also the
    neighbour's chosen response; sigmoid and cdpo would leave a contrast stage's work unused."""
    loss, kind = lookup(tree, "train.loss"), lookup(tree, "contrast.kind")
    if loss not in LOSS_CONTRAST or kind not in CONTRAST_KINDS or kind in LOSS_CONTRAST[loss]:
        return []
    if kind == "none":
        kinds, hint = ", ".join(LOSS_CONTRAST[loss]), "contrast=symmpo" if loss == "symmpo" else "contrast=mdpo"
        return [problem("train.loss", loss, f"needs contrast data (contrast.kind one of {kinds}), but "
                                            f"contrast.kind = 'none': add {hint}")]
    if loss in ("sigmoid", "cdpo"):
        return [problem("contrast.kind", kind, f"only feeds train.loss mdpo or symmpo; train.loss = {loss!r} "
                                                "would leave the contrast data unused (contrast=none)")]
    return [problem("contrast.kind", kind, f"must be {' or '.join(LOSS_CONTRAST[loss])} for train.loss = {loss!r} "
                                            "(its segments score the neighbour's chosen response): contrast=symmpo")]


def check_method_select(tree: Mapping) -> list[tuple[str, str]]:
    """A Hydra multi-select of method files merges them into one node (halludpo.mixing.pair_methods)."""
    method = tree.get("method")
    if not isinstance(method, Mapping) or method.get("name") not in (*SINGLE, *MIXES):
        return []
    try:
        pair_methods(method)
    except ValueError as err:
        return [("method", f"method: {err}")]
    return []


def check_mirror(tree: Mapping) -> list[tuple[str, str]]:
    mirror, correct_as = lookup(tree, "method.verify.mirror", False), lookup(tree, "method.verify.correct_as")
    if mirror is True and correct_as in CORRECT_AS and correct_as != "object":
        return [problem("method.verify.mirror", mirror, f"needs method.verify.correct_as=object, not {correct_as!r} "
                                                         "(only pairs differing in the object alone can move)")]
    return []


def check_image_prompts(tree: Mapping) -> list[tuple[str, str]]:
    """method.generation.prompts=image reads each image's own prompt, which only rule prepare (COCO) writes."""
    prompts, kind = lookup(tree, "method.generation.prompts"), lookup(tree, "data.kind")
    if prompts == IMAGE_PROMPTS and kind not in ("coco", None):
        return [problem("method.generation.prompts", prompts, f"needs data.kind=coco (images with their own prompt), "
                                                               f"not {kind!r}: give a list of prompts")]
    return []


def check_contrast_areas(tree: Mapping) -> list[tuple[str, str]]:
    low, high = lookup(tree, "contrast.min_area"), lookup(tree, "contrast.max_area")
    if is_number(low) and is_number(high) and low > high:
        return [problem("contrast.min_area", low, f"must be <= contrast.max_area = {high}")]
    return []


def check_world(tree: Mapping) -> list[tuple[str, str]]:
    """The toy world: object counts and glyph sizes are ranges; a glyph must fit in the image."""
    world = lookup(tree, "data.world")
    if not isinstance(world, Mapping):
        return []
    found = []
    for low, high in (("min_objects", "max_objects"), ("min_glyph", "max_glyph"), ("max_glyph", "image_size")):
        a, b = world.get(low), world.get(high)
        if is_int(a) and is_int(b) and a > b:
            found.append(problem(f"data.world.{low}", a, f"must be <= data.world.{high} = {b}"))
    return found


def check_toy_image_counts(tree: Mapping) -> list[tuple[str, str]]:
    """On the toy world the split sizes are settings too: a sample cannot ask for more images than its split has
    (CHAIR without a fixed id list, POPE and APASI's descriptions)."""
    if lookup(tree, "data.kind") != "toy":
        return []
    samples = [("eval.pope.n_images", "eval"), ("eval.amber.n_images", "eval"),
               ("method.generation.n_images", "unlabeled")]
    if "object_halbench" in (lookup(tree, "eval.benchmarks") or ()):  # off by default: its 300 only when asked for
        samples.append(("eval.object_halbench.n_images", "eval"))
    if lookup(tree, "eval.chair.image_ids_file") is None:
        samples.insert(0, ("eval.chair.n_images", "eval"))
    found = []
    for key, split in samples:
        n, available = lookup(tree, key), lookup(tree, f"data.splits.{split}")
        if is_int(n) and is_int(available) and n > available:
            found.append(problem(key, n, f"must be <= data.splits.{split} = {available} (the toy images there)"))
    return found


def check_arch(tree: Mapping) -> list[tuple[str, str]]:
    """The toy model: attention heads divide the hidden size; patches fit the image; a real hidden-state index."""
    arch = lookup(tree, "model.arch")
    if not isinstance(arch, Mapping):
        return []
    found = []
    for size, heads in (("vision_hidden", "vision_heads"), ("text_hidden", "text_heads")):
        if is_int(arch.get(size)) and is_int(arch.get(heads)) and arch[heads] > 0 and arch[size] % arch[heads]:
            found.append(problem(f"model.arch.{size}", arch[size],
                                 f"must be a multiple of model.arch.{heads} = {arch[heads]}"))
    patch, image = arch.get("patch_size"), arch.get("image_size")
    if is_int(patch) and is_int(image) and patch > image:
        found.append(problem("model.arch.patch_size", patch, f"must be <= model.arch.image_size = {image}"))
    layers, index = arch.get("vision_layers"), arch.get("vision_feature_layer")
    if is_int(layers) and is_int(index) and not -(layers + 1) <= index <= layers:
        found.append(problem("model.arch.vision_feature_layer", index,
                             f"must be in [{-(layers + 1)}, {layers}] (model.arch.vision_layers = {layers})"))
    return found


def check_verifier_kinds(tree: Mapping) -> list[tuple[str, str]]:
    """toy: the learned verifiers halludpo.verifiers trains; detector: keys of verifier.models."""
    kind, kinds = lookup(tree, "verifier.kind"), lookup(tree, "verifier.kinds")
    known = {"toy": TOY_VERIFIER_KINDS, "detector": tuple(lookup(tree, "verifier.models") or ())}.get(kind)
    if known is None or not isinstance(kinds, list) or all(k in known for k in kinds):
        return []
    source = "toy verifiers" if kind == "toy" else "keys of verifier.models"
    return [problem("verifier.kinds", kinds, f"must name {source} ({', '.join(known)}) for verifier.kind = {kind!r}")]


def check_pope_sources(tree: Mapping) -> list[tuple[str, str]]:
    """COCO's POPE questions are the released files: one per split in data.sources.pope."""
    sources, splits = lookup(tree, "data.sources.pope"), lookup(tree, "eval.pope.splits")
    if not isinstance(sources, Mapping) or not isinstance(splits, list):
        return []
    missing = [s for s in splits if s not in sources]
    if missing:
        return [problem("eval.pope.splits", splits, f"has no released file for {missing} (data.sources.pope: "
                                                    f"{', '.join(sources)})")]
    return []


def check_released_sources(tree: Mapping) -> list[tuple[str, str]]:
    """AMBER and Object HalBench on real data read their released files (data.sources.amber,
    data.sources.object_halbench); only the toy world writes its own. MMHal-Bench has no toy version: it reads
    data.sources.mmhal on any data, and its judge needs an endpoint (eval.judge.base_url)."""
    benchmarks, kind = lookup(tree, "eval.benchmarks"), lookup(tree, "data.kind")
    if not isinstance(benchmarks, list):
        return []
    found = []
    for name, files in (("amber", "AMBER files"), ("object_halbench", "Object HalBench question file"),
                        ("mmhal", "MMHal-Bench files")):
        if name not in benchmarks or (kind in ("toy", None) and name != "mmhal"):
            continue
        if not isinstance(lookup(tree, f"data.sources.{name}"), Mapping):
            found.append(problem("eval.benchmarks", benchmarks, f"names {name}, but data.kind = {kind!r} has no "
                                                                f"{files} (data.sources.{name}); drop {name} or add them"))
    if "mmhal" in benchmarks and not lookup(tree, "eval.judge.base_url"):
        found.append(problem("eval.benchmarks", benchmarks, "names mmhal, a judge-scored benchmark, but "
                                                            "eval.judge.base_url is null: set the judge's endpoint"))
    return found


CROSS_CHECKS: tuple[Callable[[Mapping], list[tuple[str, str]]], ...] = (
    check_round, check_shard, check_loss_contrast, check_method_select, check_mirror, check_image_prompts,
    check_contrast_areas,
    check_world, check_toy_image_counts, check_arch, check_verifier_kinds, check_pope_sources, check_released_sources,
)


def problems(tree: Mapping) -> list[tuple[str, str]]:
    """(key, one-line message) for every setting of a resolved config tree (plain dicts and lists) that is out of
    its type or range, then for every pair of settings that do not go together."""
    found = setting_problems(tree)
    bad_keys = {key for key, _ in found}
    for check in CROSS_CHECKS:
        found.extend(p for p in check(tree) if p[0] not in bad_keys)
    return found


def summary(found: list[tuple[str, str]]) -> str:
    """The first problem's message, and the other keys on the same line."""
    others = list(dict.fromkeys(key for key, _ in found[1:] if key != found[0][0]))
    return found[0][1] + (f" (also invalid: {', '.join(others)})" if others else "")
