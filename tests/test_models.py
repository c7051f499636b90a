import math
import random

import pytest
import torch
from transformers import LlavaForConditionalGeneration, LlavaProcessor

from halludpo.families import UnknownModelFamily
from halludpo.inference import generate_texts, load_image
from halludpo.io import InputError
from halludpo.models import IMAGE_TOKEN, build_toy_model, chat_prompt, load_model_and_processor, save_model
from halludpo.pretrain import as_messages, conversations, encode, load_split, toy_vocabulary
from tests.conftest import TINY_ARCH


@pytest.fixture(scope="module")
def examples(tiny_world):
    return load_split(tiny_world / "train" / "instances.json", tiny_world / "train" / "captions.json")


def test_toy_model_round_trips_through_auto_classes(examples, tmp_path):
    model, processor = build_toy_model(toy_vocabulary(examples), TINY_ARCH, seed=0)
    save_model(model, processor, tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").is_file()
    loaded, proc = load_model_and_processor(tmp_path / "m", "toy")
    assert isinstance(loaded, LlavaForConditionalGeneration) and isinstance(proc, LlavaProcessor)
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    assert proc.tokenizer.padding_side == "left"


def test_unknown_family_is_refused(tmp_path):
    with pytest.raises(UnknownModelFamily, match="unknown model family 'gpt2'; valid families: toy"):
        load_model_and_processor(tmp_path, "gpt2")


def test_chat_template_and_image_token_expansion(examples):
    _, processor = build_toy_model(toy_vocabulary(examples), TINY_ARCH, seed=0)
    prompt = chat_prompt(processor, "Please describe this image in detail.")
    assert prompt == "user : <image> Please describe this image in detail. assistant : "
    batch = processor(images=[torch.zeros(3, 32, 32)], text=[prompt], return_tensors="pt")
    n_image = (batch["input_ids"] == processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)).sum().item()
    assert n_image == (32 // 8) ** 2  # CLS dropped by the "default" feature strategy


def test_encode_masks_everything_but_assistant_turns(examples):
    _, processor = build_toy_model(toy_vocabulary(examples), TINY_ARCH, seed=0)
    messages = as_messages([("is there a dog in the image ?", "yes ."), ("is there a cup in the image ?", "no .")])
    ids, labels = encode(processor, messages, n_image_tokens=16, max_length=200)
    tok = processor.tokenizer
    trained = tok.convert_ids_to_tokens([i for i, lab in zip(ids, labels) if lab != -100])
    assert trained == ["yes", ".", "</s>", "no", ".", "</s>"]
    with pytest.raises(ValueError, match="exceeds max_length=10"):
        encode(processor, messages, n_image_tokens=16, max_length=10)


def test_conversations_ask_present_and_absent_objects(examples):
    rng = random.Random(0)
    for ex in examples[:10]:
        describe, qa = conversations(ex, rng, qa_per_image=4)
        assert describe[1]["content"][0]["text"] == ex["caption"]
        answers = [m["content"][0]["text"] for m in qa if m["role"] == "assistant"]
        assert sorted(answers) == ["no .", "no .", "yes .", "yes ."]
        for user, assistant in zip(qa[::2], qa[1::2]):
            obj = user["content"][-1]["text"].split(" in the image")[0].split(" ", 3)[-1]
            assert (obj in ex["objects"]) == (assistant["content"][0]["text"] == "yes .")


def test_batched_generation_equals_one_at_a_time(tiny_model_dir, tiny_world):
    model, processor = load_model_and_processor(tiny_model_dir, "toy")
    images = sorted((tiny_world / "eval" / "images").glob("*.png"))[:5]
    prompts = ["Please describe this image in detail."] * 5
    kwargs = {"max_new_tokens": 12, "do_sample": False}
    batched = generate_texts(model, processor, images, prompts, kwargs, batch_size=5, progress=False)
    single = [generate_texts(model, processor, [i], [p], kwargs, batch_size=1, progress=False)[0]
              for i, p in zip(images, prompts)]
    assert batched == single
    assert all(isinstance(r, str) for r in batched)


def test_sampling_is_seeded(tiny_model_dir, tiny_world):
    model, processor = load_model_and_processor(tiny_model_dir, "toy")
    images = sorted((tiny_world / "eval" / "images").glob("*.png"))[:4]
    kwargs = {"max_new_tokens": 10, "do_sample": True, "temperature": 1.5}
    run = lambda seed: generate_texts(model, processor, images, ["describe this image ."] * 4, kwargs, 4,  # noqa
                                      seed=seed, progress=False)
    assert run(1) == run(1)


def test_corrupt_image_names_the_file(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG not really")
    with pytest.raises(InputError, match="bad.png: corrupt or unreadable image"):
        load_image(bad)
    with pytest.raises(InputError, match="missing.png: image not found"):
        load_image(tmp_path / "missing.png")


def test_pretraining_is_deterministic(examples, tiny_world, tmp_path):
    """Same config, same thread count -> bit-identical weights (float reduction order depends on the threads)."""
    import hashlib

    from halludpo.pretrain import pretrain_toy

    pretrain = dict(seed=3, epochs=1, batch_size=16, lr=1e-3, weight_decay=0.0, warmup_frac=0.1, qa_per_image=2,
                    max_length=120)
    digests = []
    for run in ("a", "b"):
        torch.manual_seed(run == "b")  # global state left by earlier code must not matter
        pretrain_toy(examples, tiny_world / "train" / "images", tmp_path / run, TINY_ARCH, pretrain, progress=False)
        digests.append(hashlib.sha256((tmp_path / run / "model.safetensors").read_bytes()).hexdigest())
    assert digests[0] == digests[1]


def test_yes_no_probe_is_logged_per_epoch_and_leaves_training_alone(examples, tiny_world, tmp_path):
    """pretrain.qa_probe: one accuracy per epoch, in [0, 1], over 2 questions per probed image; the weights are
    the same bytes as without the probe (it has its own RNG and does not train)."""
    import hashlib

    from halludpo.pretrain import pretrain_toy

    pretrain = dict(seed=3, epochs=2, batch_size=16, lr=1e-3, weight_decay=0.0, warmup_frac=0.1, qa_per_image=2,
                    max_length=120)
    digests, stats = [], {}
    for run, probe in (("off", 0), ("on", 8)):
        stats[run] = pretrain_toy(examples, tiny_world / "train" / "images", tmp_path / run, TINY_ARCH,
                                  pretrain | {"qa_probe": probe}, progress=False)
        digests.append(hashlib.sha256((tmp_path / run / "model.safetensors").read_bytes()).hexdigest())
    assert digests[0] == digests[1]
    assert stats["off"]["qa_probe_accuracy"] == []
    accuracy = stats["on"]["qa_probe_accuracy"]
    assert len(accuracy) == 2 and all(0.0 <= a <= 1.0 for a in accuracy)
    assert all(round(a * 16) == a * 16 for a in accuracy)  # 8 images x (present, absent) = 16 questions


def test_weighted_lm_loss_is_the_model_loss_at_unit_weights_and_weights_rows():
    """All weights 1 -> the model's own mean token cross-entropy; weight w on a row counts its tokens w times."""
    from halludpo.pretrain import weighted_lm_loss

    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[-100, 1, 2, 3, -100], [-100, -100, 4, 5, 6]])
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 7), labels[:, 1:].reshape(-1),
                                           reduction="none").view(2, 4)
    mask = (labels[:, 1:] != -100).float()
    unit = weighted_lm_loss(logits, labels, torch.ones(2))
    assert torch.allclose(unit, (ce * mask).sum() / mask.sum())
    row_sums, row_counts = (ce * mask).sum(1), mask.sum(1)  # row 0: 2 tokens, row 1: 3 tokens
    weighted = weighted_lm_loss(logits, labels, torch.tensor([1.0, 4.0]))
    expected = (row_sums[0] + 4 * row_sums[1]) / (row_counts[0] + row_counts[1])  # row 0's share is unchanged
    assert torch.allclose(weighted, expected)


def test_qa_weight_changes_training_only_when_set(examples, tiny_world, tmp_path):
    """pretrain.qa_weight: 1 (default) trains with the model's own loss, bit-identical to leaving the key out; any
    other weight goes through weighted_lm_loss and gives other weights."""
    import hashlib

    from halludpo.pretrain import pretrain_toy

    pretrain = dict(seed=3, epochs=1, batch_size=16, lr=1e-3, weight_decay=0.0, warmup_frac=0.1, qa_per_image=2,
                    max_length=120)
    digests = {}
    for run, extra in (("absent", {}), ("one", {"qa_weight": 1.0}), ("four", {"qa_weight": 4.0})):
        stats = pretrain_toy(examples, tiny_world / "train" / "images", tmp_path / run, TINY_ARCH, pretrain | extra,
                             progress=False)
        assert math.isfinite(stats["final_loss"])
        digests[run] = hashlib.sha256((tmp_path / run / "model.safetensors").read_bytes()).hexdigest()
    assert digests["absent"] == digests["one"] != digests["four"]


def test_qa_weight_schedule_and_the_probe_switch(examples, tiny_world, tmp_path):
    """qa_weight as a per-epoch schedule: a weight of 0 leaves the question conversations out of that epoch (fewer
    steps); qa_weight_until switches the weight to 1 once the yes/no probe reaches it -- with a threshold of 0 the
    switch comes after epoch 0, so [4 then until 0] trains the same bytes as the schedule [4, 1]."""
    import hashlib

    from halludpo.pretrain import pretrain_toy

    pretrain = dict(seed=3, epochs=2, batch_size=16, lr=1e-3, weight_decay=0.0, warmup_frac=0.1, qa_per_image=2,
                    max_length=120, qa_probe=4)
    n = len(examples)
    runs = {"no_questions_first": {"qa_weight": [0.0, 1.0]}, "schedule": {"qa_weight": [4.0, 1.0]},
            "until": {"qa_weight": 4.0, "qa_weight_until": 0.0}}
    stats, digests = {}, {}
    for run, extra in runs.items():
        stats[run] = pretrain_toy(examples, tiny_world / "train" / "images", tmp_path / run, TINY_ARCH,
                                  pretrain | extra, progress=False)
        digests[run] = hashlib.sha256((tmp_path / run / "model.safetensors").read_bytes()).hexdigest()
    assert stats["no_questions_first"]["steps"] == math.ceil(n / 16) + math.ceil(2 * n / 16)
    assert stats["schedule"]["steps"] == 2 * math.ceil(2 * n / 16)
    assert digests["until"] == digests["schedule"] != digests["no_questions_first"]
