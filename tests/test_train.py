"""Reference log-probs, the preference trainer and the merge, on a tiny model trained on a tiny toy world."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
from peft import PeftModel

from halludpo.inference import load_image
from halludpo.models import load_model_and_processor
from halludpo.logprobs import (
    IGNORE,
    ImageTokenMismatch,
    check_image_tokens,
    encode_segment,
    score_pairs,
)
from halludpo.train import (
    OffPolicyWarning,
    RewardSaturationWarning,
    compute_reference_logps,
    merge_adapter,
    train_preference,
    warn_early_saturation,
    warn_off_policy,
)
from tests.conftest import TINY_TRAIN

TRAIN = TINY_TRAIN


@pytest.fixture(scope="module")
def pairs(tiny_world, tiny_model_dir):
    captions = json.loads((tiny_world / "eval" / "captions.json").read_text())["annotations"]
    images = {im["id"]: im["file_name"] for im in json.loads((tiny_world / "eval" / "instances.json").read_text())["images"]}
    return [{"image_id": c["image_id"], "image_path": str(tiny_world / "eval" / "images" / images[c["image_id"]]),
             "prompt": "Please describe this image in detail.", "context": "", "chosen": c["caption"],
             "rejected": c["caption"] + " there is a dog .", "method": "test",
             "meta": {"generator_model": str(tiny_model_dir)}} for c in captions[:8]]


@pytest.fixture(scope="module")
def model_and_processor(tiny_model_dir):
    return load_model_and_processor(tiny_model_dir, "toy")


def test_only_response_tokens_are_scored_and_context_is_masked(model_and_processor, pairs):
    _, processor = model_and_processor
    image = load_image(pairs[0]["image_path"])
    seg = encode_segment(processor, image, "describe this image .", "this is a park scene .", "there is a dog .", 200)
    scored = processor.tokenizer.convert_ids_to_tokens(seg["input_ids"][seg["labels"] != IGNORE])
    assert scored == ["there", "is", "a", "dog", ".", "</s>"]  # no context token contributes
    with pytest.raises(ValueError, match="exceeds max_length=20"):
        encode_segment(processor, image, "describe this image .", "", "there is a dog .", 20)


def test_image_token_check_catches_a_cut_sequence(model_and_processor, pairs):
    _, processor = model_and_processor
    seg = encode_segment(processor, load_image(pairs[0]["image_path"]), "describe .", "", "a dog .", 200)
    cut = dict(seg, input_ids=seg["input_ids"][5:])  # "user", ":" and 3 of the 16 image tokens cut
    with pytest.raises(ImageTokenMismatch, match="pairs:3, segment 0: 13 image tokens but the image gives 16"):
        check_image_tokens([cut], processor.image_token_id, 16, "pairs:3")


def test_batched_reference_logps_equal_one_at_a_time(model_and_processor, pairs):
    model, processor = model_and_processor
    batched = score_pairs(model, processor, pairs, 200, batch_size=8, progress=False)
    single = torch.cat([score_pairs(model, processor, [p], 200, batch_size=1, progress=False) for p in pairs], 1)
    assert batched.shape == (2, 8)
    assert torch.allclose(batched, single, atol=1e-4)
    assert (batched < 0).all()


def test_dpo_trains_only_lora_and_logs_preference_metrics(tiny_model_dir, pairs, tmp_path):
    model, processor = load_model_and_processor(tiny_model_dir, "toy")
    rows = compute_reference_logps(model, processor, pairs, 200, 4)
    before = [(n, p, p.detach().clone()) for n, p in model.named_parameters()]  # peft keeps these objects
    stats = train_preference(model, processor, rows, tmp_path, TRAIN, str(tiny_model_dir))
    assert stats["steps"] == 2 and stats["reference"] == "stored"
    first = stats["history"][0]
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen"):
        assert key in first, key
    # LoRA starts as the identity (B = 0): policy == reference, so the first loss is exactly log 2
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-4)
    adapted = PeftModel.from_pretrained(load_model_and_processor(tiny_model_dir, "toy")[0], tmp_path / "adapter")
    lora = {n: p for n, p in adapted.named_parameters() if "lora_B" in n}
    assert lora and all(p.abs().sum() > 0 for p in lora.values())  # every LoRA B matrix moved
    changed = [n for n, param, copy in before if not torch.equal(param, copy)]
    assert changed == []  # the base, i.e. the reference, stays frozen


def test_training_is_deterministic_whatever_the_global_rng_state(tiny_model_dir, pairs, tmp_path):
    # the LoRA matrices were drawn from the process's own random seed: two runs of one config gave two models
    adapters = []
    for run, global_seed in enumerate((1, 2)):
        model, processor = load_model_and_processor(tiny_model_dir, "toy")
        rows = compute_reference_logps(model, processor, pairs, 200, 4)
        torch.manual_seed(global_seed)
        stats = train_preference(model, processor, rows, tmp_path / str(run), TRAIN, str(tiny_model_dir))
        adapted = PeftModel.from_pretrained(load_model_and_processor(tiny_model_dir, "toy")[0],
                                            tmp_path / str(run) / "adapter")
        adapters.append(({n: p.detach() for n, p in adapted.named_parameters() if "lora_" in n}, stats["history"]))
    (first, history_1), (second, history_2) = adapters
    assert first.keys() == second.keys() and all(torch.equal(first[n], second[n]) for n in first)
    assert [h["grad_norm"] for h in history_1] == [h["grad_norm"] for h in history_2]


def test_online_reference_matches_stored_at_the_first_step(tiny_model_dir, pairs, tmp_path):
    model, processor = load_model_and_processor(tiny_model_dir, "toy")
    online = train_preference(model, processor, pairs, tmp_path / "online", TRAIN | {"reference": "online"},
                              str(tiny_model_dir))
    assert online["history"][0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert online["reference"] == "online"


def test_merge_gives_the_adapted_model(tiny_model_dir, pairs, tmp_path):
    model, processor = load_model_and_processor(tiny_model_dir, "toy")
    rows = compute_reference_logps(model, processor, pairs, 200, 4)
    train_preference(model, processor, rows, tmp_path, TRAIN, str(tiny_model_dir))
    merge_adapter(tiny_model_dir, tmp_path / "adapter", "toy", tmp_path / "merged")
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    merged, _ = load_model_and_processor(tmp_path / "merged", "toy")
    adapted = PeftModel.from_pretrained(load_model_and_processor(tiny_model_dir, "toy")[0], tmp_path / "adapter")
    adapted.eval()
    a = score_pairs(merged, processor, pairs[:2], 200, progress=False)
    b = score_pairs(adapted, processor, pairs[:2], 200, progress=False)
    assert torch.allclose(a, b, atol=1e-3)


def test_off_policy_and_saturation_warnings(pairs, tmp_path):
    with pytest.warns(OffPolicyWarning, match="8 of 8 pairs were generated by another model"):
        assert warn_off_policy(pairs, str(tmp_path)) == 8
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert warn_off_policy(pairs, pairs[0]["meta"]["generator_model"]) == 0
        assert not warn_early_saturation([1.0, 0.5, 1.0] + [1.0] * 60)
    with pytest.warns(RewardSaturationWarning, match="reward accuracy is 1.00 over the first 4 steps"):
        assert warn_early_saturation([1.0] * 70)
