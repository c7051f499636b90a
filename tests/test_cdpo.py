"""C-DPO (SENTINEL): the question AND the context are masked out of the log-probs; only the sentence after the
context (and the end-of-turn token, when the sentence ends the description) is scored. Checked on a tiny LLaVA
trained on a tiny toy world (as in test_train.py): the labels of every context token are IGNORE, and no change to
the log-probs at context positions changes the summed log-prob, while a change at a response position does."""

from __future__ import annotations

import pytest
import torch

from halludpo.inference import load_image
from halludpo.losses import preference_loss
from halludpo.models import load_model_and_processor
from halludpo.logprobs import IGNORE, collate_segments, encode_segment, forward_logps, pair_segments, summed_logps

PROMPT = "Please describe this image in detail."
CONTEXTS = ["", "this is a park scene .", "this is a park scene . there is a dog on the left ."]
RESPONSE = "there is a bench at the bottom ."


@pytest.fixture(scope="module")
def model_and_processor(tiny_model_dir):
    return load_model_and_processor(tiny_model_dir, "toy")


@pytest.fixture(scope="module")
def image(tiny_world):
    return load_image(next((tiny_world / "eval" / "images").glob("*.png")))


def spans(processor, image, context: str, response: str = RESPONSE) -> tuple[dict, int, int]:
    """The encoded segment, and [start, end) of its context tokens (computed independently of encode_segment:
    the token counts of the generation prompt alone and of the prompt + context)."""
    seg = encode_segment(processor, image, PROMPT, context, response, 200)
    head = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}],
        add_generation_prompt=True)
    n_head = processor(images=[image], text=[head], return_tensors="pt")["input_ids"].shape[1]
    n_with_context = n_head
    if context:
        with_context = processor(images=[image], text=[head + context + " "], return_tensors="pt")
        n_with_context = with_context["input_ids"].shape[1]
    return seg, n_head, n_with_context


@pytest.mark.parametrize("context", CONTEXTS)
def test_every_context_and_prompt_token_is_ignored(model_and_processor, image, context):
    _, processor = model_and_processor
    seg, start, end = spans(processor, image, context)
    labels, ids = seg["labels"], seg["input_ids"]
    tokens = processor.tokenizer.convert_ids_to_tokens(ids)
    assert end - start == len(context.split())  # word-level tokenizer: one token per word of the context
    assert tokens[start:end] == context.split()
    assert (labels[:end] == IGNORE).all()  # image, prompt and every context token
    scored = processor.tokenizer.convert_ids_to_tokens(ids[labels != IGNORE])
    assert scored == [*RESPONSE.split(), "</s>"]  # exactly the sentence after the context + end of turn


def test_context_logprobs_never_reach_the_summed_logprob(model_and_processor, image):
    model, processor = model_and_processor
    context = CONTEXTS[2]
    seg, start, end = spans(processor, image, context)
    batch = collate_segments([seg], processor.tokenizer.pad_token_id)
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits.float()
    base, count = summed_logps(logits, batch["labels"])
    assert count.item() == len(RESPONSE.split()) + 1
    # logits[t] predicts token t+1: the log-probs OF the context tokens live at positions start-1 .. end-2; change
    # them (and every other prompt/image position) arbitrarily -> the summed log-prob does not move
    torch.manual_seed(0)
    prefix = logits.clone()
    prefix[:, : end - 1] += 50.0 * torch.randn_like(prefix[:, : end - 1])
    context_only = logits.clone()
    context_only[:, start - 1: end - 1] = torch.randn_like(context_only[:, start - 1: end - 1]) * 100.0
    for changed in (prefix, context_only):
        assert torch.equal(summed_logps(changed, batch["labels"])[0], base)
    # ... while a change at one response position does
    response = logits.clone()
    response[:, end - 1] += 50.0 * torch.randn_like(response[:, end - 1])
    assert not torch.allclose(summed_logps(response, batch["labels"])[0], base)


def test_summed_logprob_is_the_sum_over_response_tokens_only(model_and_processor, image):
    model, processor = model_and_processor
    seg, _, end = spans(processor, image, CONTEXTS[1])
    batch = collate_segments([seg], processor.tokenizer.pad_token_id)
    with torch.no_grad():
        total, _ = forward_logps(model, batch)
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits.float()
    logps = logits[0, :-1].log_softmax(-1).gather(1, batch["input_ids"][0, 1:, None])[:, 0]
    assert torch.allclose(total[0], logps[end - 1:].sum(), atol=1e-4)


def test_cdpo_pair_scores_chosen_and_rejected_after_the_same_masked_context(model_and_processor, tiny_world):
    model, processor = model_and_processor
    path = str(next((tiny_world / "eval" / "images").glob("*.png")))
    row = {"image_id": 1, "image_path": path, "prompt": PROMPT, "context": CONTEXTS[2],
           "chosen": "there is a bench .", "rejected": "there is a kite .", "method": "sentinel", "meta": {}}
    chosen, rejected = pair_segments(processor, row, 200)
    for seg, text in ((chosen, row["chosen"]), (rejected, row["rejected"])):
        scored = processor.tokenizer.convert_ids_to_tokens(seg["input_ids"][seg["labels"] != IGNORE])
        assert scored == [*text.split(), "</s>"]
    # a different context changes what the model conditions on, never which tokens are scored
    other = pair_segments(processor, row | {"context": CONTEXTS[1]}, 200)
    assert [int((s["labels"] != IGNORE).sum()) for s in other] == [int((s["labels"] != IGNORE).sum())
                                                                  for s in (chosen, rejected)]
    with torch.no_grad():
        policy, _ = forward_logps(model, collate_segments([chosen, rejected], processor.tokenizer.pad_token_id))
    losses, win, lose = preference_loss("cdpo", policy.view(2, 1), policy.view(2, 1).clone(), beta=0.1)
    assert torch.allclose(losses, torch.log(torch.tensor([2.0])))  # policy == reference -> log 2
    assert win.item() == lose.item() == 0.0


def test_a_sentence_before_the_last_is_scored_without_the_end_of_turn(model_and_processor, tiny_world):
    """SENTINEL's pairs before a description's last sentence continue the answer: scoring the end-of-turn after
    them would teach the model to stop after every sentence it is taught to prefer."""
    _, processor = model_and_processor
    path = str(next((tiny_world / "eval" / "images").glob("*.png")))
    row = {"image_id": 1, "image_path": path, "prompt": PROMPT, "context": CONTEXTS[2],
           "chosen": "there is a bench .", "rejected": "there is a kite .", "method": "sentinel",
           "meta": {"is_last_sent": False}}
    for last, end in ((False, []), (True, ["</s>"])):
        segments = pair_segments(processor, row | {"meta": {"is_last_sent": last}}, 200)
        for seg, text in zip(segments, (row["chosen"], row["rejected"])):
            scored = processor.tokenizer.convert_ids_to_tokens(seg["input_ids"][seg["labels"] != IGNORE])
            assert scored == [*text.split(), *end]
    middle = encode_segment(processor, load_image(path), PROMPT, "", "there is a bench .", 200, score_end=False)
    assert processor.tokenizer.convert_ids_to_tokens(middle["input_ids"])[-1] == "</s>"  # still in the input


def test_a_stop_pair_scores_only_the_end_of_turn_for_its_empty_response(model_and_processor, tiny_world):
    """SENTINEL's stop pairs (method.stop_pairs): "" = end the answer after the context. Its segment scores the
    end-of-turn alone, right after the context; the sentence against it is scored without one (it continues)."""
    model, processor = model_and_processor
    path = str(next((tiny_world / "eval" / "images").glob("*.png")))
    row = {"image_id": 1, "image_path": path, "prompt": PROMPT, "context": CONTEXTS[2], "chosen": "",
           "rejected": "there is a kite .", "method": "sentinel",
           "meta": {"is_last_sent": False, "type": "stop_over_hallucinated"}}
    stop, sentence = pair_segments(processor, row, 200)
    tokens = processor.tokenizer.convert_ids_to_tokens(stop["input_ids"])
    assert tokens[-len(CONTEXTS[2].split()) - 1:] == [*CONTEXTS[2].split(), "</s>"]  # no stray space token
    assert processor.tokenizer.convert_ids_to_tokens(stop["input_ids"][stop["labels"] != IGNORE]) == ["</s>"]
    scored = processor.tokenizer.convert_ids_to_tokens(sentence["input_ids"][sentence["labels"] != IGNORE])
    assert scored == row["rejected"].split()
    # the stop segment's log-prob is log P(end-of-turn | image, question, context), from the same forward pass
    batch = collate_segments([stop], processor.tokenizer.pad_token_id)
    with torch.no_grad():
        logps, counts = forward_logps(model, batch)
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits[0]
    assert counts.tolist() == [1]
    end = len(stop["input_ids"]) - 1
    expected = torch.log_softmax(logits[end - 1], -1)[stop["input_ids"][end]]
    assert torch.allclose(logps[0], expected, atol=1e-5)
