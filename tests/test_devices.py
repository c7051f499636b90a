"""Model stages run on the device they are given (model.device) in model.dtype, checked without a GPU: the decision
(halludpo.models.resolve_device), and every model stage run with model.device=meta, a device that holds no data, so
any step that moved the model or its inputs to the CPU would show (or fail: a meta tensor cannot be copied out)."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors import safe_open

from halludpo import contrast, evaluate, generate, models, pairs, paths, train
from halludpo.config import compose
from halludpo.io import read_json, write_jsonl
from halludpo.models import DeviceError, build_toy_model, resolve_device, save_model
from halludpo.pretrain import load_split, toy_vocabulary
from tests.conftest import TINY_ARCH, TINY_TRAIN

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------------------------------------------------------
# The decision


def test_auto_is_cuda_when_torch_sees_a_gpu_else_cpu(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == "cuda" and resolve_device("cuda") == "cuda"
    monkeypatch.setenv("LOCAL_RANK", "3")  # one process per GPU (accelerate launch): the process's own GPU
    assert resolve_device("auto") == "cuda:3" and resolve_device("cpu") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu" and resolve_device("meta") == "meta"


def test_cuda_without_a_gpu_and_unknown_settings_are_one_line_errors(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for setting in ("cuda", "cuda:0"):
        with pytest.raises(DeviceError, match=f"model.device={setting}: torch sees no CUDA GPU") as err:
            resolve_device(setting)
        assert "\n" not in str(err.value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == "cuda:1"
    with pytest.raises(DeviceError, match="sees 2 GPU"):
        resolve_device("cuda:2")
    with pytest.raises(DeviceError, match="valid settings are auto, cpu, cuda, cuda:N and meta"):
        resolve_device("gpu")


def test_the_trainer_stays_on_the_gpu_the_model_is_on(tmp_path):
    on_gpu = train.training_arguments(tmp_path, TINY_TRAIN, 8, on_cuda=True)
    on_cpu = train.training_arguments(tmp_path, TINY_TRAIN | {"bf16": True}, 8, on_cuda=False)
    assert on_gpu.use_cpu is False and on_cpu.use_cpu is True and on_cpu.bf16 is False


def test_the_loader_places_the_model_and_logs_device_and_dtype(model_dir, caplog):
    with caplog.at_level(logging.INFO, logger="halludpo.models"):
        model, _ = models.load_model_and_processor(model_dir, "toy", "bfloat16", "meta")
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert "on device meta, dtype bfloat16 (model.device=meta)" in caplog.text


# ---------------------------------------------------------------------------------------------------------------
# Every model stage with model.device=meta


class Reached(Exception):
    """The stage called its model: how (generate, forward, image features, the Trainer, saving) and the devices of
    the tensors it passed."""

    def __init__(self, call: str, devices: set[str]):
        super().__init__(call, devices)
        self.call, self.devices = call, devices


def tensor_devices(*values) -> set[str]:
    found = set()
    for value in values:
        if isinstance(value, torch.Tensor):
            found.add(value.device.type)
        elif isinstance(value, dict):
            found |= tensor_devices(*value.values())
        elif isinstance(value, (list, tuple)):
            found |= tensor_devices(*value)
    return found


def probed(model):
    """The model, whose first call (generate, forward or get_image_features) raises Reached with its inputs'
    devices: computing on meta tensors gives no numbers to go on with."""
    def stop(call):
        def method(*args, **kwargs):
            raise Reached(call, tensor_devices(args, kwargs))
        return method
    for call in ("generate", "forward", "get_image_features"):
        setattr(model, call, stop(call))
    return model


@pytest.fixture(scope="module")
def model_dir(tiny_world, tmp_path_factory):
    """A tiny toy LLaVA with random weights (saved like pretrain_base's): what runs here needs no training."""
    examples = load_split(tiny_world / "train" / "instances.json", tiny_world / "train" / "captions.json")
    model, processor = build_toy_model(toy_vocabulary(examples), TINY_ARCH, seed=0)
    out = tmp_path_factory.mktemp("device_model") / "toy"
    save_model(model, processor, out)
    return out


@pytest.fixture
def loads(monkeypatch):
    """The devices the stages ask the loader for; the models it returns are probed."""
    asked = []
    real = models.load_model_and_processor

    def load(path, family, dtype="float32", device="auto"):
        asked.append(device)
        model, processor = real(path, family, dtype, device)
        return probed(model), processor

    for module in (generate, evaluate, pairs, train, models):  # contrast imports it from models when it runs
        monkeypatch.setattr(module, "load_model_and_processor", load)
    return asked


def stage_cfg(tmp_path, tiny_world, model_dir, *extra):
    return compose([f"paths.results={tmp_path}", f"paths.data_dir={tiny_world}", f"model.path={model_dir}",
                    "data.world.image_size=32", "eval.chair.text_pipeline=offline", "model.device=meta",
                    "eval.chair.n_images=4", "eval.pope.n_images=4", *extra])


def described(tiny_world, split: str, n: int = 4) -> list[dict]:
    """Generation rows for `split`'s first images, each answered with a training caption (real toy sentences)."""
    images = read_json(tiny_world / split / "instances.json")["images"][:n]
    captions = [c["caption"] for c in read_json(tiny_world / "train" / "captions.json")["annotations"]]
    return [{"image_id": im["id"], "image_path": str(tiny_world / split / "images" / im["file_name"]),
             "prompt": "describe the image .", "response": caption, "model": "m", "round": 0,
             "sampling": {"max_new_tokens": 24}} for im, caption in zip(images, captions)]


def pair_rows(tiny_world) -> list[dict]:
    return [{**{k: r[k] for k in ("image_id", "image_path", "prompt")}, "context": "", "chosen": r["response"],
             "rejected": r["response"].replace(" .", " and a cat ."), "method": "apasi", "meta": {}}
            for r in described(tiny_world, "unlabeled")]


def run_generate(cfg, tiny_world):
    generate.run(cfg)


def run_evaluate(cfg, tiny_world):
    questions = cfg.copy()
    questions.step = "questions"
    evaluate.run(questions)
    write_jsonl(paths.eval_generations(cfg, 0), described(tiny_world, "eval"))
    evaluate.run(cfg)


def run_amber(cfg, tiny_world):
    """AMBER's toy files of the tiny world's eval split (written under paths.results, not into the shared tiny
    world), then model_k's AMBER answers."""
    import copy

    cfg = copy.deepcopy(cfg)
    cfg.data.eval_instances = str(tiny_world / "eval" / "instances.json")
    cfg.data.eval_images = str(tiny_world / "eval" / "images")
    cfg.paths.data_dir = f"{cfg.paths.results}/data"
    questions = copy.deepcopy(cfg)
    questions.step = "amber_questions"
    evaluate.run(questions)
    evaluate.run(cfg)


def run_inject(cfg, tiny_world):
    write_jsonl(paths.gen_generations(cfg, 0), described(tiny_world, "unlabeled"))
    pairs.run(cfg)


def run_sentinel(cfg, tiny_world):
    pairs.run(cfg)


def run_with_pairs(stage):
    def run(cfg, tiny_world):
        write_jsonl(paths.pairs_jsonl(cfg, 0), pair_rows(tiny_world))
        stage.run(cfg)
    return run


def run_merge(cfg, tiny_world):
    model = models.AutoModelForImageTextToText.from_pretrained(cfg.model.path)  # an adapter for model_0
    lora = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=TINY_TRAIN["lora"]["target_modules"]))
    lora.save_pretrained(paths.train_dir(cfg, 0) / "adapter")
    train.run(cfg)


STAGES = {  # rule: (overrides, how it runs, the call it reaches)
    "generate eval": ([], run_generate, "generate"),
    "generate gen": (["split=gen", "method.generation.n_images=4"], run_generate, "generate"),
    "pope_answers": (["step=answers"], run_evaluate, "generate"),
    "amber_answers": (["step=amber_answers", "eval.amber.n_images=2"], run_amber, "generate"),
    "inject": ([], run_inject, "generate"),
    "sentinel": (["experiment=toy_sentinel", "verifier.oracle=true", "method.instances=${data.train_instances}",
                  "method.images_dir=${data.train_images}", "method.n_images=4"], run_sentinel, "generate"),
    "contrast_embeddings": (["experiment=toy_symmpo", "step=embeddings"], run_with_pairs(contrast),
                            "get_image_features"),
    "reference_logps": (["step=reference"], run_with_pairs(train), "forward"),
    "dpo": (["step=dpo", "train.reference=online", "train.batch_size=2"], run_with_pairs(train), "trainer"),
    "merge": (["step=merge"], run_merge, "save"),
}


@pytest.fixture
def stops(monkeypatch):
    """The Trainer and the saving of the merged model raise Reached with the devices of the model they get."""
    def trainer(*args, model, **kwargs):
        raise Reached("trainer", tensor_devices(list(model.parameters())))

    def save(model, processor, out_dir):
        raise Reached("save", tensor_devices(list(model.parameters())))

    monkeypatch.setattr(train, "PreferenceTrainer", trainer)
    monkeypatch.setattr(train, "save_model", save)


@pytest.mark.filterwarnings("ignore:.*copying from a non-meta parameter:UserWarning")  # merge: the adapter on meta
@pytest.mark.parametrize("stage", STAGES)
def test_every_model_stage_runs_on_the_configured_device(stage, loads, stops, tiny_world, model_dir, tmp_path):
    """The stage asks the loader for model.device, and its model's first call gets tensors on that device only."""
    overrides, run, call = STAGES[stage]
    cfg = stage_cfg(tmp_path, tiny_world, model_dir, *overrides)
    with pytest.raises(Reached) as reached:
        run(cfg, tiny_world)
    assert loads == ["meta"]
    assert (reached.value.call, reached.value.devices) == (call, {"meta"})


# ---------------------------------------------------------------------------------------------------------------
# The merge keeps the model's dtype


def test_merge_writes_the_merged_model_in_model_dtype(model_dir, tmp_path):
    model = models.AutoModelForImageTextToText.from_pretrained(model_dir)
    lora = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, init_lora_weights=False,
                                            target_modules=TINY_TRAIN["lora"]["target_modules"]))
    lora.save_pretrained(tmp_path / "adapter")
    train.merge_adapter(model_dir, tmp_path / "adapter", "toy", tmp_path / "merged", dtype="bfloat16", device="cpu")
    with safe_open(tmp_path / "merged" / "model.safetensors", "pt") as f:
        dtypes = {f.get_slice(name).get_dtype() for name in f.keys()}
    assert dtypes == {"BF16"}
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["dtype"] == "bfloat16"
    full = (model_dir / "model.safetensors").stat().st_size
    assert (tmp_path / "merged" / "model.safetensors").stat().st_size < 0.6 * full
    merged, _ = models.load_model_and_processor(tmp_path / "merged", "toy", "bfloat16", "cpu")
    base, _ = models.load_model_and_processor(model_dir, "toy", "bfloat16", "cpu")
    changed = [n for n, p in merged.named_parameters() if not torch.equal(p, dict(base.named_parameters())[n])]
    assert changed and all("language_model" in n for n in changed)  # the LoRA was merged in, in bf16
