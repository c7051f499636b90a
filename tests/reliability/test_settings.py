"""Settings are checked when a config is composed (halludpo.settings): a bad value, or two values that do not go
together, is one ConfigError line naming the key and the value, before any rule or stage runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from halludpo import settings
from halludpo.config import ConfigError, compose

ROOT = Path(__file__).resolve().parents[2]
EXPERIMENTS = sorted(p.stem for p in (ROOT / "configs" / "experiment").glob("*.yaml"))

# (overrides, "key = value" the one-line message starts with)
BAD_SETTINGS = [
    (["train.beta=-1"], "train.beta = -1"),
    (["train.beta=0"], "train.beta = 0"),
    (["train.beta={a:1}"], "train.beta = {'a': 1}"),
    (["train.lr=abc"], "train.lr = 'abc'"),
    (["train.lr=nan"], "train.lr = nan"),
    (["train.lr=inf"], "train.lr = inf"),
    (["train.lr=1.5"], "train.lr = 1.5"),
    (["train.lr=0"], "train.lr = 0"),
    (["train.loss=dpo"], "train.loss = 'dpo'"),
    (["train.reference=cached"], "train.reference = 'cached'"),
    (["train.epochs=0"], "train.epochs = 0"),
    (["train.epochs=1.5"], "train.epochs = 1.5"),
    (["train.batch_size=0"], "train.batch_size = 0"),
    (["train.grad_accum=-2"], "train.grad_accum = -2"),
    (["train.max_length=0"], "train.max_length = 0"),
    (["train.warmup_ratio=1.0"], "train.warmup_ratio = 1.0"),
    (["train.scheduler=cosine_with_min_lr"], "train.scheduler = 'cosine_with_min_lr'"),
    (["train.sft_weight=-0.1"], "train.sft_weight = -0.1"),
    (["train.bf16=maybe"], "train.bf16 = 'maybe'"),
    (["train.lora.r=0"], "train.lora.r = 0"),
    (["train.lora.dropout=1"], "train.lora.dropout = 1"),
    (["train.lora.target_modules='(q_proj'"], "train.lora.target_modules = '(q_proj'"),
    (["experiment=toy_symmpo", "train.symmpo.lam=-1"], "train.symmpo.lam = -1"),
    (["experiment=toy_symmpo", "train.symmpo.beta2=0"], "train.symmpo.beta2 = 0"),
    (["method.injection_rates=[0.4,1.2]"], "method.injection_rates = [0.4, 1.2]"),
    (["method.injection_rates=0.3"], "method.injection_rates = 0.3"),
    (["method.injection_rates=[]"], "method.injection_rates = []"),
    (["method.mode=swap"], "method.mode = 'swap'"),
    (["method.mode=[both,swap]"], "method.mode = ['both', 'swap']"),
    (["method.templates=fancy"], "method.templates = 'fancy'"),
    (["method.top_k=0"], "method.top_k = 0"),
    (["method.skip=-1"], "method.skip = -1"),
    (["method.generation.batch_size=0"], "method.generation.batch_size = 0"),
    (["method.generation.decoding.num_beams=0"], "method.generation.decoding.num_beams = 0"),
    (["method.completion.repetition_penalty=0"], "method.completion.repetition_penalty = 0"),
    (["method.verify.correct_as=paragraph"], "method.verify.correct_as = 'paragraph'"),
    (["experiment=toy_sentinel", "method.win=coherent"], "method.win = 'coherent'"),
    (["experiment=toy_sentinel", "method.sampling.temperature=0"], "method.sampling.temperature = 0"),
    (["experiment=toy_sentinel", "method.sampling.top_p=1.5"], "method.sampling.top_p = 1.5"),
    (["experiment=toy_sentinel", "method.sampling.n=0"], "method.sampling.n = 0"),
    (["experiment=toy_apasi_sentinel", "method.sentinel.win=any"], "method.sentinel.win = 'any'"),
    (["experiment=toy_apasi_sentinel", "method.mix.apasi.weight=-1"], "method.mix.apasi.weight = -1"),
    (["experiment=toy_apasi_sentinel", "method.mix.sentinel.cap=-5"], "method.mix.sentinel.cap = -5"),
    (["experiment=toy_mdpo", "contrast.min_area=0"], "contrast.min_area = 0"),
    (["experiment=toy_mdpo", "contrast.max_area=1.5"], "contrast.max_area = 1.5"),
    (["experiment=toy_mdpo", "contrast=noise", "contrast.std=-1"], "contrast.std = -1"),
    (["eval.batch_size=0"], "eval.batch_size = 0"),
    (["eval.chair.n_images=0"], "eval.chair.n_images = 0"),
    (["eval.pope.n_images=null"], "eval.pope.n_images = null"),
    (["eval.chair.text_pipeline=spacy"], "eval.chair.text_pipeline = 'spacy'"),
    (["eval.pope.splits=[random,hard]"], "eval.pope.splits = ['random', 'hard']"),
    (["eval.generation.top_p=0"], "eval.generation.top_p = 0"),
    (["data.kind=imagenet"], "data.kind = 'imagenet'"),
    (["data.splits.eval=0"], "data.splits.eval = 0"),
    (["data.world.partner_prob=1.5"], "data.world.partner_prob = 1.5"),
    (["data.world.hallucination_position=first"], "data.world.hallucination_position = 'first'"),
    (["model.family=gpt"], "model.family = 'gpt'"),
    (["model.dtype=float64"], "model.dtype = 'float64'"),
    (["model.device=gpu"], "model.device = 'gpu'"),
    (["model.device=cuda:x"], "model.device = 'cuda:x'"),
    (["model.pretrain.lr=-1"], "model.pretrain.lr = -1"),
    (["model.pretrain.qa_per_image=0"], "model.pretrain.qa_per_image = 0"),
    (["rounds=-1"], "rounds = -1"),
    (["seed=-1"], "seed = -1"),
    (["split=train"], "split = 'train'"),
    (["verifier.kind=yolo"], "verifier.kind = 'yolo'"),
    (["verifier.thresholds=[0.5]"], "verifier.thresholds = [0.5]"),
    (["verifier.train.hyper.cnn.lr=0"], "verifier.train.hyper.cnn.lr = 0"),
    (["download.retries=-1"], "download.retries = -1"),
    (["tracking.enabled=yes"], "tracking.enabled = 'yes'"),
]

# Two settings that do not go together: (overrides, "key = value" of the one the message names)
BAD_COMBINATIONS = [
    (["round=5"], "round = 5: must be in [0, rounds=2]"),
    (["train.loss=mdpo"], "train.loss = 'mdpo'"),                        # no contrast data
    (["experiment=toy_sentinel", "train.loss=symmpo"], "train.loss = 'symmpo'"),
    (["contrast=symmpo"], "contrast.kind = 'neighbour'"),                # its data unused by sigmoid
    (["experiment=toy_symmpo", "contrast=mdpo"], "contrast.kind = 'corrupt'"),  # symmpo needs y'_w
    (["experiment=toy_mdpo", "contrast.min_area=0.5", "contrast.max_area=0.2"], "contrast.min_area = 0.5"),
    (["method.verify.mirror=true"], "method.verify.mirror = true"),      # needs correct_as=object
    (["method.generation.prompts=image"], "method.generation.prompts = 'image'"),  # toy images have no prompt
    (["data.world.min_objects=6"], "data.world.min_objects = 6"),
    (["eval.chair.n_images=1001"], "eval.chair.n_images = 1001"),           # the toy eval split has 1,000
    (["data.splits.unlabeled=10", "method.generation.n_images=11"], "method.generation.n_images = 11"),
    (["data.world.max_glyph=80"], "data.world.max_glyph = 80"),          # > image_size 64
    (["model.arch.text_heads=3"], "model.arch.text_hidden = 128"),       # 128 heads of 3 do not divide
    (["model.arch.vision_feature_layer=9"], "model.arch.vision_feature_layer = 9"),
    (["verifier.kinds=[cnn,resnet]"], "verifier.kinds = ['cnn', 'resnet']"),
    (["experiment=sentinel_llava15_7b", "verifier.kinds=[grounding_dino,yolo]"],
     "verifier.kinds = ['grounding_dino', 'yolo']"),
    (["experiment=apasi_llava15_7b", "~data.sources.pope.adversarial"],        # no released file for a split
     "eval.pope.splits = ['random', 'popular', 'adversarial']"),
    (["eval.benchmarks=[chair,amber,chair]"], "eval.benchmarks = ['chair', 'amber', 'chair']"),
    (["eval.benchmarks=[]"], "eval.benchmarks = []"),
    (["eval.benchmarks=[chair,mmhal]"], "eval.benchmarks = ['chair', 'mmhal']"),
    (["eval.amber.n_images=1001"], "eval.amber.n_images = 1001"),           # the toy eval split has 1,000
    (["eval.amber.wording=plain"], "eval.amber.wording = 'plain'"),
    (["eval.amber.discriminative.answer_rule=exact"], "eval.amber.discriminative.answer_rule = 'exact'"),
    (["eval.amber.matcher=word2vec"], "eval.amber.matcher = 'word2vec'"),
    (["eval.amber.threshold=1.5"], "eval.amber.threshold = 1.5"),
    (["eval.amber.generative.max_new_tokens=0"], "eval.amber.generative.max_new_tokens = 0"),
    (["parallel.shards.amber=0"], "parallel.shards.amber = 0"),
    (["experiment=apasi_llava15_7b", "~data.sources.amber"],                  # AMBER without its files
     "eval.benchmarks = ['chair', 'pope', 'amber', 'object_halbench']: names amber"),
    (["experiment=apasi_llava15_7b", "~data.sources.object_halbench"],        # Object HalBench without its file
     "eval.benchmarks = ['chair', 'pope', 'amber', 'object_halbench']: names object_halbench"),
    (["eval.benchmarks=[chair,object_halbench]", "eval.object_halbench.n_images=1001"],
     "eval.object_halbench.n_images = 1001"),
    (["eval.object_halbench.prompts=coco"], "eval.object_halbench.prompts = 'coco'"),
    (["eval.object_halbench.mentions=unique"], "eval.object_halbench.mentions = 'unique'"),
    (["eval.object_halbench.generation.num_beams=0"], "eval.object_halbench.generation.num_beams = 0"),
    (["parallel.shards.object_halbench=0"], "parallel.shards.object_halbench = 0"),
    (["eval.benchmarks=[chair,mmhal]", "eval.judge.base_url=http://127.0.0.1:1/v1"],   # no toy MMHal-Bench
     "eval.benchmarks = ['chair', 'mmhal']: names mmhal, but data.kind = 'toy' has no MMHal-Bench files"),
    (["experiment=symmpo_llava15_7b", "eval.benchmarks=[chair,mmhal]"],        # a judge-scored benchmark, no judge
     "eval.benchmarks = ['chair', 'mmhal']: names mmhal, a judge-scored benchmark, but eval.judge.base_url is null"),
]


def composed_error(overrides: list[str]) -> str:
    with pytest.raises(ConfigError) as err:
        compose(overrides)
    return str(err.value)


def assert_one_line_naming(message: str, expected: str) -> None:
    assert message.startswith(expected), message
    assert "\n" not in message and "Traceback" not in message
    assert "overrides" not in message  # the override list is not echoed


@pytest.mark.parametrize("overrides, expected", BAD_SETTINGS, ids=[" ".join(o) for o, _ in BAD_SETTINGS])
def test_bad_setting_is_one_line_naming_key_value_and_range(overrides, expected):
    message = composed_error(overrides)
    assert_one_line_naming(message, expected)
    assert ": must be " in message


@pytest.mark.parametrize("overrides, expected", BAD_COMBINATIONS, ids=[" ".join(o) for o, _ in BAD_COMBINATIONS])
def test_settings_that_do_not_go_together_fail_at_compose(overrides, expected):
    assert_one_line_naming(composed_error(overrides), expected)


def test_unknown_choice_lists_the_allowed_values():
    assert composed_error(["train.loss=dpo"]) == "train.loss = 'dpo': must be one of sigmoid, cdpo, mdpo, symmpo"


def test_several_bad_settings_name_the_others_on_the_same_line():
    message = composed_error(["train.beta=-1", "train.lr=2", "eval.batch_size=0"])
    assert message == ("train.beta = -1: must be a finite number > 0 "
                       "(also invalid: train.lr, eval.batch_size)")


def test_method_multi_select_is_refused_at_compose():
    assert_one_line_naming(composed_error(["method=[apasi,sentinel]"]), "method: ")
    assert "use method=apasi_sentinel" in composed_error(["method=[apasi,sentinel]"])


def test_hydra_errors_are_one_line_without_the_overrides():
    message = composed_error(["train.lr=0.1", "model=no_such_model"])
    assert "\n" not in message and "train.lr=0.1" not in message
    assert "Could not find 'model/no_such_model'" in message and "Config search path" not in message


GOOD_EDGES = [
    ["train.beta=1e-9", "train.lr=0.999999", "train.warmup_ratio=0.0", "train.lora.dropout=0"],
    ["train.beta=1", "train.sft_weight=0", "train.lora.alpha=8", "train.scheduler=constant"],  # ints as numbers
    ["train.lora.target_modules=[q_proj,v_proj]", "train.reference=online", "train.deepspeed=null"],
    ["method.injection_rates=[0,1]", "method.mode=[both,replace]", "method.skip=0"],
    ["method.mode=append", "method.generation.n_images=null", "method.generation.prompts=[Describe.]"],
    ["rounds=0", "round=0", "seed=0"],
    ["rounds=3", "round=3", "split=gen", "step=questions"],
    ["eval.chair.n_images=5000", "eval.chair.image_ids_file=ids.json", "eval.pope.n_images=1000"],  # a fixed list
    ["eval.chair.n_images=1", "eval.pope.splits=[adversarial]", "eval.generation.temperature=0.01",
     "eval.generation.top_p=1.0"],
    ["data.world.min_objects=5", "data.world.max_objects=5", "data.world.max_glyph=64",
     "data.world.partner_prob=1", "data.world.noise_std=0"],
    ["experiment=toy_mdpo", "contrast.min_area=1.0", "contrast.max_area=1.0"],
    ["experiment=toy_mdpo", "contrast=black", "train.loss=mdpo"],
    ["experiment=toy_symmpo", "train.symmpo.lam=0", "train.symmpo.gamma=0"],
    ["experiment=toy_sentinel", "method.win=factual", "method.sampling.top_p=1.0", "method.stop_pairs=true"],
    ["experiment=toy_apasi_sentinel", "method.mix.apasi.weight=0", "method.mix.sentinel.cap=0"],
    ["experiment=toy_sentinel", "verifier=detector", "verifier.thresholds=[0.0,1.01]",
     "verifier.text_thresholds=[0.0,null]"],
    ["method.verify.mirror=true", "method.verify.correct_as=object", "method.verify.correct=true"],
    ["experiment=apasi_llava15_7b", "model=qwen25vl_7b", "eval.pope.splits=[random,popular]"],
    ["download.retries=0", "download.names=[]", "tracking.enabled=false"],
    ["eval.benchmarks=[amber]", "eval.amber.n_images=1000", "eval.amber.n_hallu=0", "eval.amber.threshold=0"],
    ["eval.benchmarks=[pope,chair]", "eval.amber.wording=amber", "eval.amber.discriminative.answer_rule=amber"],
    ["experiment=apasi_llava15_7b", "~data.sources.amber", "eval.benchmarks=[chair,pope]"],
    ["model.device=cuda:1", "download.entries.amber_images.verify=tofu"],
    ["experiment=apasi_llava15_7b", "model.device=cpu", "model.revision=0123456789abcdef0123456789abcdef01234567"],
]


@pytest.mark.parametrize("overrides", GOOD_EDGES, ids=[" ".join(o) for o in GOOD_EDGES])
def test_edge_values_are_accepted(overrides):
    compose(overrides)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_every_number_and_flag_has_a_setting(experiment):
    """Each int, float or bool of the composed tree (or list of them) has a table entry: a new numeric key needs
    its range in halludpo.settings."""
    from halludpo.config import to_plain

    unchecked = [key for key, value in leaves(to_plain(compose([f"experiment={experiment}"])))
                 if is_numeric_or_flag(value) and settings.setting_for(key) is None]
    assert unchecked == []


def leaves(tree: dict, prefix: str = ""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def is_numeric_or_flag(value) -> bool:
    values = value if isinstance(value, list) else [value]
    return any(isinstance(v, (bool, int, float)) for v in values)


@pytest.mark.parametrize("pattern, key, matched", [
    ("**.batch_size", "verifier.train.hyper.cnn.batch_size", True),
    ("**.batch_size", "batch_size", True),
    ("method.**.win", "method.win", True),
    ("method.**.win", "method.sentinel.win", True),
    ("model.arch.*", "model.arch.image_size", True),
    ("model.arch.*", "model.arch", False),
    ("train.lr", "train.lora.lr", False),
])
def test_key_patterns(pattern, key, matched):
    assert settings.matches(tuple(pattern.split(".")), tuple(key.split("."))) is matched


def test_enumerations_agree_with_the_modules_that_use_them():
    """settings.py copies the choices of modules that import torch (the Snakefile loads it at parse time)."""
    import transformers

    from halludpo import (apasi, contrast, detectors, download, generate, logprobs, losses, models, sentinel,
                          toyworld, verifiers)
    from halludpo.metrics import pope, text

    assert settings.LOSSES == tuple(losses.LOSSES) and set(settings.LOSS_CONTRAST) == set(logprobs.SEGMENTS)
    assert settings.CONTRAST_KINDS == contrast.KINDS
    assert settings.INJECTION_MODES == apasi.MODES and settings.CORRECT_AS == apasi.CORRECT_AS
    assert settings.WIN_RULES == sentinel.WIN_RULES
    assert settings.TOY_VERIFIER_KINDS == verifiers.KINDS
    assert settings.DETECTOR_DTYPES == tuple(detectors.DTYPES)
    assert settings.POPE_SPLITS == pope.POPE_SPLITS
    assert settings.TEXT_PIPELINES == text.TEXT_PIPELINE_NAMES
    assert settings.HALLUCINATION_POSITIONS == toyworld.HALLUCINATION_POSITIONS
    assert settings.IMAGE_PROMPTS == generate.IMAGE_PROMPTS
    assert set(settings.SCHEDULERS) <= {s.value for s in transformers.SchedulerType}
    assert settings.VERIFY_MODES == download.VERIFY_MODES
    assert settings.DEVICE_SETTING.pattern == models.DEVICE_SETTING.pattern
    from halludpo import evaluate
    from halludpo.metrics import amber

    assert settings.BENCHMARKS == evaluate.BENCHMARKS and settings.AMBER_WORDINGS == toyworld.AMBER_WORDINGS
    assert settings.AMBER_ANSWER_RULES == amber.ANSWER_RULES and settings.AMBER_MATCHERS == amber.MATCHERS
    assert settings.AMBER_NOUN_PIPELINES == amber.NOUN_PIPELINES


def test_snakemake_dry_run_fails_with_one_line_naming_the_setting(tmp_path):
    from tests.test_pipeline import snakemake

    result = snakemake(tmp_path, "-n", overrides=["train.beta=-1"])
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    lines = [line for line in output.splitlines() if "train.beta" in line]
    assert lines == ["invalid config: train.beta = -1: must be a finite number > 0"], output
    assert len(output.strip().splitlines()) == 1, output
    assert "Traceback" not in output and "overrides" not in output
    assert not (tmp_path / "results").exists()  # nothing ran
