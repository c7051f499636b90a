"""Model families: build the tiny toy LLaVA, and load any supported family through transformers' Auto classes.

Every family is loaded the same way (`load_model_and_processor`): AutoProcessor + AutoModelForImageTextToText from a
folder or hub id, safetensors only, trust_remote_code off. The toy family is a real LlavaForConditionalGeneration
(tiny CLIP vision tower + tiny Llama) with a word-level tokenizer, saved with save_pretrained like any HF model.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import (
    AutoConfig,
    AutoModelForImageTextToText,
    AutoProcessor,
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)
from transformers.models.auto.processing_auto import PROCESSOR_MAPPING
from transformers.utils import is_torchvision_available

from halludpo.families import check_family

log = logging.getLogger(__name__)

IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>", IMAGE_TOKEN]

# A LLaVA-1.5-style template in lower case (the toy tokenizer is word-level and lower-cases everything).
TOY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}user : "
    "{% if message['content'] is string %}{{ message['content'] }} {% else %}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image> {% elif c['type'] == 'text' %}"
    "{{ c['text'] }} {% endif %}{% endfor %}{% endif %}"
    "{% else %}assistant : "
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{% endif %} </s> {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}assistant : {% endif %}"
)


def build_word_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    """A lower-casing word-level tokenizer over `words` (punctuation marks are words of their own)."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for w in sorted(set(words)):
        vocab.setdefault(w, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        extra_special_tokens={"image_token": IMAGE_TOKEN}, padding_side="left",
    )
    tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    return tok


def build_toy_model(words: list[str], arch: dict, seed: int) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """A randomly initialised tiny LLaVA and its processor. `arch` holds image_size, patch_size, vision_* , text_*."""
    tokenizer = build_word_tokenizer(words)
    image_size, patch = arch["image_size"], arch["patch_size"]
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
        do_convert_rgb=True,
    )
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=patch,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,  # CLIP's CLS token, dropped
        chat_template=TOY_CHAT_TEMPLATE, image_token=IMAGE_TOKEN,
    )
    vision = CLIPVisionConfig(
        image_size=image_size, patch_size=patch, hidden_size=arch["vision_hidden"],
        intermediate_size=2 * arch["vision_hidden"], num_hidden_layers=arch["vision_layers"],
        num_attention_heads=arch["vision_heads"], projection_dim=arch["vision_hidden"],
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=arch["text_hidden"], intermediate_size=2 * arch["text_hidden"],
        num_hidden_layers=arch["text_layers"], num_attention_heads=arch["text_heads"],
        num_key_value_heads=arch["text_heads"], max_position_embeddings=arch["max_positions"],
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=(image_size // patch) ** 2, vision_feature_select_strategy="default",
        vision_feature_layer=arch["vision_feature_layer"], pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model, processor


def save_model(model, processor, out_dir: str | Path) -> None:
    """save_pretrained of model (safetensors) and processor; io.publish_tree gives the files the umask's
    permissions and puts the folder into the stage's manifest."""
    from halludpo.io import publish_tree

    out_dir = Path(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    processor.save_pretrained(out_dir)
    publish_tree(out_dir)


DEVICE_SETTING = re.compile(r"^(auto|cpu|meta|cuda(:\d+)?)$")


class DeviceError(ValueError):
    """A model.device setting this machine cannot give (CUDA asked without a GPU) or not a device at all."""


def resolve_device(setting: str = "auto") -> str:
    """The torch device of a model stage from its setting (`model.device`): `auto` = CUDA when torch sees a GPU,
    else the CPU; `cpu`, `cuda`, `cuda:N`, and `meta` (tests: parameters without memory) as given. Under a
    launcher with one process per GPU (LOCAL_RANK set), `auto` and `cuda` mean the process's own GPU. CUDA asked
    where torch sees none is a DeviceError."""
    text = str(setting).strip().lower()
    if not DEVICE_SETTING.match(text):
        raise DeviceError(f"model.device={setting!r}: valid settings are auto, cpu, cuda, cuda:N and meta")
    if text == "auto":
        text = "cuda" if torch.cuda.is_available() else "cpu"
    if not text.startswith("cuda"):
        return text
    if not torch.cuda.is_available():
        raise DeviceError(f"model.device={setting}: torch sees no CUDA GPU here (torch {torch.__version__}, CUDA "
                          f"build {torch.version.cuda}); use model.device=auto or cpu, or run on a GPU node")
    if text == "cuda" and os.environ.get("LOCAL_RANK", "").isdigit():
        return f"cuda:{os.environ['LOCAL_RANK']}"
    if ":" in text and int(text.partition(":")[2]) >= torch.cuda.device_count():
        raise DeviceError(f"model.device={setting}: torch sees {torch.cuda.device_count()} GPU(s)")
    return text


def model_device(model) -> torch.device:
    """Where a model's parameters are (the device its inputs must be on)."""
    return next(model.parameters()).device


def load_model_and_processor(path_or_id: str | Path, family: str, dtype: str = "float32", device: str = "auto"):
    """Load any supported family the way a user loads it from the hub: Auto classes, safetensors only; in `dtype`,
    on the device `resolve_device(device)` picks (logged)."""
    check_family(family)
    path = str(path_or_id)
    if Path(path).exists() and not (Path(path) / "config.json").is_file():
        raise FileNotFoundError(f"{path}: not a saved model folder (no config.json)")
    target = resolve_device(device)
    processor = load_processor(path)
    model = AutoModelForImageTextToText.from_pretrained(
        path, dtype=getattr(torch, dtype), use_safetensors=True, trust_remote_code=False,
    ).to(target)
    log.info("model %s (%s) on device %s, dtype %s (model.device=%s)", path, family, model_device(model),
             dtype, device)
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "left"  # batched generation: prompts end at the same position
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    return model, processor


def image_only_processor_class(processor_class: type) -> type:
    """processor_class without its video processor: transformers' video processors need torchvision, which a CPU
    machine may not have, and halludpo passes images only. Saved under the original class name."""

    class ImageOnlyProcessor(processor_class):
        @classmethod
        def get_attributes(cls):
            return [a for a in super().get_attributes() if a != "video_processor"]

    ImageOnlyProcessor.__name__ = ImageOnlyProcessor.__qualname__ = processor_class.__name__
    return ImageOnlyProcessor


def load_processor(path: str):
    """AutoProcessor; a processor that also takes videos (Qwen-VL) loads without its video processor when
    torchvision is missing (AutoProcessor would fail on the video processor)."""
    if not is_torchvision_available():
        processor_class = PROCESSOR_MAPPING.get(type(AutoConfig.from_pretrained(path, trust_remote_code=False)), None)
        if processor_class is not None and "video_processor" in processor_class.get_attributes():
            return image_only_processor_class(processor_class).from_pretrained(path, trust_remote_code=False)
    return AutoProcessor.from_pretrained(path, trust_remote_code=False)


def chat_prompt(processor, text: str, with_image: bool = True) -> str:
    """The processor's own chat template around one user turn, ending where the assistant starts."""
    content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": text}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
