"""Tiny random models of the real families (llava-hf 1.5 / 1.6, Qwen2-VL, Qwen2.5-VL), built offline.

Each builder returns (model, processor) made only from config objects: a CLIP or Qwen vision tower and a Llama,
Mistral or Qwen2 text model of hidden size 32 and one layer, a small BPE tokenizer trained here on a few sentences
with the family's special tokens, the family's own image processor class (PIL backend, tiny sizes) and processor
class with a chat template written like the family's published one. Nothing is downloaded.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
    LlavaProcessor,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
    Qwen2VLProcessor,
)
from transformers.utils import is_torchvision_available

from halludpo.models import image_only_processor_class

FAMILIES = ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl")

CORPUS = [
    "Please describe this image in detail.", "What is in the image?", "Is there a dog in the image?",
    "The image shows a red square on a white background.", "A blue circle is next to a green tree.",
    "There is a dog, a cat and a cup on the table.", "yes", "no", "The picture shows a park with people.",
]
HIDDEN, HEADS = 32, 2

# Chat templates in the style of each family's published one (llava-hf/llava-1.5-7b-hf,
# llava-hf/llava-v1.6-mistral-7b-hf, Qwen/Qwen2-VL-2B-Instruct; Qwen2.5-VL uses the Qwen2-VL one).
LLAVA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' ' }}"
    "{% endfor %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
LLAVA_NEXT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' }}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{{ ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'][0]['text'] + '</s>' }}"
    "{% endif %}{% endfor %}"
)
QWEN_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAMA_SPECIALS = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
QWEN_SPECIALS = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
QWEN_EXTRA = ["<|im_start|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]


def bpe_tokenizer(specials: dict, extra: list[str], byte_level: bool, extra_special: dict | None = None,
                  **init) -> PreTrainedTokenizerFast:
    """A BPE trained on CORPUS: byte-level like Qwen's, or sentencepiece-style (Metaspace) like Llama's/Mistral's."""
    special_list = list(specials.values()) + extra
    if byte_level:
        core = Tokenizer(models.BPE())
        core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        core.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=special_list,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    else:
        core = Tokenizer(models.BPE(unk_token=specials["unk_token"], fuse_unk=True, byte_fallback=False))
        core.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
        core.decoder = decoders.Metaspace(prepend_scheme="first")
        trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=special_list,
                                      initial_alphabet=list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
                                                            "0123456789.,?!:;'\"()[]/-\n "))
    core.train_from_iterator(CORPUS * 4, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, extra_special_tokens=extra_special or {}, **specials,
                                        **init)
    tokenizer.add_special_tokens({"additional_special_tokens": extra})
    return tokenizer


def llama_like_text(config_class, tokenizer, **extra):
    return config_class(
        vocab_size=len(tokenizer), hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=1,
        num_attention_heads=HEADS, num_key_value_heads=HEADS, max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        **extra,
    )


def clip_vision(image_size: int, patch: int) -> CLIPVisionConfig:
    return CLIPVisionConfig(image_size=image_size, patch_size=patch, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN,
                            num_hidden_layers=1, num_attention_heads=HEADS, projection_dim=HIDDEN)


def set_generation_tokens(model, tokenizer) -> None:
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id


def build_llava(seed: int = 0):
    """llava-hf 1.5: CLIP (28 px, patch 14 -> 4 image tokens, CLS dropped) + Llama, "USER: <image>\\n..." template."""
    tokenizer = bpe_tokenizer(LLAMA_SPECIALS, ["<image>"], byte_level=False,
                              extra_special={"image_token": "<image>"})
    image_size, patch = 28, 14
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                            crop_size={"height": image_size, "width": image_size})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=LLAVA_TEMPLATE, image_token="<image>")
    config = LlavaConfig(vision_config=clip_vision(image_size, patch),
                         text_config=llama_like_text(LlamaConfig, tokenizer),
                         image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                         image_seq_length=(image_size // patch) ** 2, vision_feature_select_strategy="default",
                         vision_feature_layer=-2, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    set_generation_tokens(model, tokenizer)
    return model, processor


def build_llava_next(seed: int = 0):
    """llava-hf 1.6 (Mistral): CLIP at 28 px + any-resolution tiles from 28/56-px grid pinpoints, [INST] template."""
    tokenizer = bpe_tokenizer(LLAMA_SPECIALS, ["<image>"], byte_level=False,
                              extra_special={"image_token": "<image>"})
    image_size, patch = 28, 14
    pinpoints = [[28, 56], [56, 28], [56, 56]]
    image_processor = LlavaNextImageProcessorPil(size={"shortest_edge": image_size},
                                                 crop_size={"height": image_size, "width": image_size},
                                                 image_grid_pinpoints=pinpoints)
    processor = LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch,
                                   vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                   chat_template=LLAVA_NEXT_TEMPLATE, image_token="<image>")
    config = LlavaNextConfig(vision_config=clip_vision(image_size, patch),
                             text_config=llama_like_text(MistralConfig, tokenizer, sliding_window=None),
                             image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                             image_grid_pinpoints=pinpoints, vision_feature_select_strategy="default",
                             vision_feature_layer=-2, image_seq_length=(image_size // patch) ** 2,
                             pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config)
    set_generation_tokens(model, tokenizer)
    return model, processor


def build_qwen(version: str, seed: int = 0):
    """Qwen2-VL or Qwen2.5-VL: patch 14, merge 2, 28-56 px images (1-4 image tokens each), M-RoPE, ChatML template."""
    tokenizer = bpe_tokenizer(QWEN_SPECIALS, QWEN_EXTRA, byte_level=True)
    image_processor = Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=56 * 56, patch_size=14,
                                               temporal_patch_size=2, merge_size=2)
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}  # sums to head_dim / 2
    if version == "qwen2_vl":
        vision = dict(depth=1, embed_dim=HIDDEN, hidden_size=HIDDEN, num_heads=HEADS, mlp_ratio=2, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2)
        config_class, model_class, processor_class = Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor
    else:
        vision = dict(depth=1, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, out_hidden_size=HIDDEN,
                      num_heads=HEADS, patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                      fullatt_block_indexes=[0])
        config_class, model_class, processor_class = (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration,
                                                      Qwen2_5_VLProcessor)
    text = dict(vocab_size=len(tokenizer), hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=1,
                num_attention_heads=HEADS, num_key_value_heads=HEADS, max_position_embeddings=512,
                rope_parameters=rope, bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)
    config = config_class(text_config=text, vision_config=vision, **ids)
    processor = qwen_processor(processor_class, image_processor, tokenizer)
    torch.manual_seed(seed)
    model = model_class(config)
    set_generation_tokens(model, tokenizer)
    return model, processor


def qwen_processor(processor_class, image_processor, tokenizer):
    """The family's processor; without torchvision (no video processor) the image-only one halludpo loads."""
    if is_torchvision_available():
        from transformers import Qwen2VLVideoProcessor

        return processor_class(image_processor=image_processor, tokenizer=tokenizer,
                               video_processor=Qwen2VLVideoProcessor(), chat_template=QWEN_TEMPLATE)
    return image_only_processor_class(processor_class)(image_processor=image_processor, tokenizer=tokenizer,
                                                       chat_template=QWEN_TEMPLATE)


BUILDERS = {"llava": build_llava, "llava_next": build_llava_next,
            "qwen2_vl": lambda seed=0: build_qwen("qwen2_vl", seed),
            "qwen2_5_vl": lambda seed=0: build_qwen("qwen2_5_vl", seed)}
