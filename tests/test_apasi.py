"""APASI injection: every rule checked on hand-computed cases, and the text-only completion on the tiny toy model."""

import math
import random
from collections import Counter

import pytest
import torch

from halludpo.apasi import (
    PAPER_TEMPLATES,
    TOY_TEMPLATES,
    TextOnlyCompleter,
    build_apasi_pairs,
    choose_injected_object,
    drop_hallucinated_sentences,
    fill_template,
    finish_sentence,
    inject,
    injection_context,
    n_to_replace,
    object_statistics,
    object_swap,
    position_weights,
    realize,
    select_sentences,
    split_sentences,
)

TOY_OBJECTS = ["dog", "frisbee", "bench", "bird", "kite", "fork", "knife", "spoon", "bowl", "cup"]


def toy_objects_of(text: str) -> set[str]:
    words = text.lower().replace(".", " ").split()
    return {w for w in words if w in TOY_OBJECTS}


RESPONSE = ("this is a park scene . there is a dog on the left . i can see a frisbee . "
            "a bench is at the top . there is a bird .")
OTHER_RESPONSES = ["there is a dog . i can see a kite .", "a dog is here . a bench . a kite .",
                   "a fork . a knife . a spoon .", "there is a bird . a kite is at the top ."]


def toy_co_freq():
    return object_statistics(toy_objects_of(r) for r in [RESPONSE, *OTHER_RESPONSES])[1]


# --------------------------------------------------------------------------------------------------------------
# Sentences


def test_split_sentences_round_trips_and_keeps_trailing_space():
    text = "A dog sits.  A cat runs. \nThe end"
    pieces = split_sentences(text)
    assert pieces == ["A dog sits.  ", "A cat runs. \n", "The end"]
    assert "".join(pieces) == text
    assert split_sentences("there is a dog . a cup .") == ["there is a dog . ", "a cup ."]
    assert split_sentences("") == []
    assert split_sentences("no period") == ["no period"]


def test_split_sentences_digit_rule():
    assert split_sentences("It is 3.5 meters tall. Next.") == ["It is 3.5 meters tall. ", "Next."]
    # a '.' with a digit on either side never splits
    assert split_sentences("Room 12. Then .5 more.") == ["Room 12. Then .5 more."]


def test_n_to_replace_uses_bankers_rounding_and_bounds():
    assert n_to_replace(5, 0.5) == 2  # round(2.5) == 2
    assert n_to_replace(7, 0.5) == 4  # round(3.5) == 4
    assert n_to_replace(10, 0.25) == 2  # round(2.5) == 2
    assert n_to_replace(5, 0.2) == 1
    assert n_to_replace(2, 0.2) is None  # round(0.4) == 0
    assert n_to_replace(4, 0.75) == 3  # n - 1: allowed
    assert n_to_replace(4, 0.875) is None  # round(3.5) == 4 > n - 1
    assert n_to_replace(1, 1.0) is None
    assert n_to_replace(0, 0.2) is None


def test_position_weights_by_hand():
    w = position_weights(5, 1)  # a = 1 / (2 - 1) = 1, b = 0: w_i = sqrt(i)
    assert w == pytest.approx([1.0, math.sqrt(2), math.sqrt(3), 2.0])
    w = position_weights(10, 1)  # a = 1 / (3 - 1) = 0.5, b = 0.5
    assert w[0] == pytest.approx(1.0) and w[-1] == pytest.approx(2.0)
    assert w[4 - 1] == pytest.approx(0.5 * 2 + 0.5)  # index 4
    assert position_weights(5, 0) == pytest.approx([1.0, 1.5, 1 + math.sqrt(2) / 2, 1 + math.sqrt(3) / 2, 2.0])
    assert position_weights(2, 1) == [1.0]
    assert position_weights(1, 1) == []


def test_select_sentences_respects_skip_no_repeats_and_seed():
    for seed in range(200):
        picked = select_sentences(8, 0.4, 2, random.Random(seed))  # round(3.2) = 3
        assert len(picked) == 3 == len(set(picked)) and picked == sorted(picked)
        assert min(picked) >= 2 and max(picked) <= 7
        assert picked == select_sentences(8, 0.4, 2, random.Random(seed))
    assert select_sentences(2, 0.2, 1, random.Random(0)) is None  # n_to_replace None
    assert select_sentences(5, 0.6, 3, random.Random(0)) is None  # 3 needed, 2 candidates


def test_select_sentences_prefers_later_positions():
    counts = Counter(i for seed in range(3000) for i in select_sentences(5, 0.2, 1, random.Random(seed)))
    assert set(counts) == {1, 2, 3, 4}
    assert counts[1] < counts[2] < counts[3] < counts[4]
    assert counts[4] / counts[1] == pytest.approx(2.0, rel=0.2)  # weights 2 vs 1


# --------------------------------------------------------------------------------------------------------------
# Objects


def test_object_statistics_counts_responses():
    freq, co = object_statistics([{"dog", "frisbee"}, {"dog", "bench"}, {"dog", "frisbee", "bird"}])
    assert freq == Counter(dog=3, frisbee=2, bench=1, bird=1)
    assert co["dog"] == Counter(frisbee=2, bench=1, bird=1)
    assert co["frisbee"] == Counter(dog=2, bird=1)
    assert co["bird"] == Counter(dog=1, frisbee=1)
    assert co["bench"] == Counter(dog=1)
    assert co["dog"]["dog"] == 0


def test_choose_injected_object_only_top_k_absent_cooccurring():
    ranked = [f"c{i:02d}" for i in range(1, 13)]  # c01 (most frequent) .. c12
    co = {"key": Counter({"r1": 100, "r2": 99, **{c: 50 - i for i, c in enumerate(ranked)}})}
    response = {"key", "r1", "r2"}
    picks = Counter()
    for seed in range(500):
        key, obj = choose_injected_object({"key"}, response, co, ["v1", "v2"], random.Random(seed))
        assert key == "key"
        picks[obj] += 1
    assert set(picks) == set(ranked[:10])  # ranks 11-12 and response objects never appear
    for seed in range(50):  # with 9 excluded, the top 10 absent ones are c10..c12
        assert choose_injected_object({"key"}, response, co, [], random.Random(seed), exclude=ranked[:9])[1] in (
            "c10", "c11", "c12")


def test_choose_injected_object_ties_by_name_and_fallback():
    co = {"k": Counter({"b": 5, "a": 5, "c": 4})}
    assert choose_injected_object({"k"}, {"k"}, co, [], random.Random(0), top_k=1) == ("k", "a")
    # no co-occurring absent object -> a vocabulary object absent from response and exclude
    for seed in range(20):
        assert choose_injected_object({"k"}, {"k", "r"}, {}, ["k", "r", "x", "y"], random.Random(seed),
                                      exclude=["y"]) == ("k", "x")
    assert choose_injected_object(set(), {"k"}, co, ["x"], random.Random(0)) is None
    assert choose_injected_object({"k"}, {"k"}, {}, ["k"], random.Random(0)) is None


def test_templates_and_articles():
    assert 18 <= len(PAPER_TEMPLATES) <= 22 and all(t.count("{}") == 1 for t in PAPER_TEMPLATES)
    assert TOY_TEMPLATES == ["there is a {}", "i can see a {}", "there is also a {}", "a {} is"]
    assert fill_template("There is a {}", "apple") == "There is an apple"
    assert fill_template("A {} is also visible", "orange") == "An orange is also visible"
    assert fill_template("In the background, a {} can be seen", "umbrella") == \
        "In the background, an umbrella can be seen"
    assert fill_template("there is a {}", "dog") == "there is a dog"
    assert fill_template("The scene also includes a {}", "elephant") == "The scene also includes an elephant"


def test_finish_sentence():
    assert finish_sentence("there is a dog", " on the left . a cup .") == "there is a dog on the left ."
    assert finish_sentence("There is a dog", " on the grass. It") == "There is a dog on the grass."
    assert finish_sentence("there is a dog", " on the left ") == "there is a dog on the left ."  # length limit
    assert finish_sentence("There is a dog", " near", terminator=".") == "There is a dog near."


# --------------------------------------------------------------------------------------------------------------
# Planning and realising


def test_realize_and_context_preserve_spacing():
    plan = lambda i, action: {"sentences": ["A dog. ", "A cat.  ", "A bus."], "mode": action,  # noqa: E731
                              "plan": [{"index": i, "action": action}]}
    new = {0: "There is a cup here.", 1: "There is a cup here.", 2: "There is a cup here."}
    assert realize(plan(1, "replace"), new) == "A dog. There is a cup here.  A bus."
    assert realize(plan(0, "insert"), new) == "A dog. There is a cup here. A cat.  A bus."
    assert realize(plan(2, "insert"), new) == "A dog. A cat.  A bus. There is a cup here."
    sentences = ["A dog. ", "A cat.  ", "A bus."]
    assert injection_context(sentences, 1, "replace") == "A dog. "
    assert injection_context(sentences, 1, "insert") == "A dog. A cat.  "
    assert injection_context(sentences, 2, "insert") == "A dog. A cat.  A bus. "


def _fake_completions(result):
    return {step["index"]: step["template_prefix"] + " on the right ." for step in result["plan"]}


@pytest.mark.parametrize("mode", ["replace", "insert"])
def test_inject_modes(mode):
    original = split_sentences(RESPONSE)
    co = toy_co_freq()
    for seed in range(40):
        result = inject(RESPONSE, toy_objects_of, co, TOY_OBJECTS, 0.4, 1, mode, TOY_TEMPLATES, random.Random(seed))
        assert result["sentences"] == original and result["mode"] == mode
        indices = [s["index"] for s in result["plan"]]
        assert len(indices) == 2 and min(indices) >= 1  # round(0.4 * 5) = 2, skip = 1
        injected = [s["object"] for s in result["plan"]]
        assert len(set(injected)) == 2 and not set(injected) & toy_objects_of(RESPONSE)
        for step in result["plan"]:
            assert step["action"] == mode
            assert step["template_prefix"].endswith(step["object"]) or f" {step['object']} " in step["template_prefix"]
            if mode == "replace":  # the key object comes from a sentence that stays
                kept = "".join(s for i, s in enumerate(original) if i not in indices)
                assert step["key_object"] in toy_objects_of(kept)
        rejected = split_sentences(realize(result, _fake_completions(result)))
        assert rejected[0] == original[0]
        if mode == "replace":
            assert len(rejected) == len(original)
            assert [s for i, s in enumerate(rejected) if i not in indices] == \
                [s for i, s in enumerate(original) if i not in indices]
        else:
            assert len(rejected) == len(original) + 2
            inserted_at = {i + 1 + k for k, i in enumerate(indices)}
            assert [s.strip() for j, s in enumerate(rejected) if j not in inserted_at] == \
                [s.strip() for s in original]


def test_inject_both_uses_both_actions_and_drops_unusable():
    co = toy_co_freq()
    actions = {inject(RESPONSE, toy_objects_of, co, TOY_OBJECTS, 0.4, 1, "both", TOY_TEMPLATES,
                      random.Random(seed))["mode"] for seed in range(30)}
    assert actions == {"replace", "insert"}
    assert inject("hello . world . again .", toy_objects_of, co, TOY_OBJECTS, 0.4, 1, "replace", TOY_TEMPLATES,
                  random.Random(0)) is None  # no object in kept sentences
    assert inject("a dog .", toy_objects_of, co, TOY_OBJECTS, 0.4, 1, "replace", TOY_TEMPLATES,
                  random.Random(0)) is None  # too few sentences
    with pytest.raises(ValueError, match="unknown injection mode"):
        inject(RESPONSE, toy_objects_of, co, TOY_OBJECTS, 0.4, 1, "swap", TOY_TEMPLATES, random.Random(0))


def test_inject_append_adds_one_sentence_at_the_end():
    original = split_sentences(RESPONSE)
    for seed in range(10):
        result = inject(RESPONSE, toy_objects_of, toy_co_freq(), TOY_OBJECTS, 0.4, 1, "append", TOY_TEMPLATES,
                        random.Random(seed))
        (step,) = result["plan"]
        assert step["index"] == len(original) - 1 and step["action"] == "insert" and result["mode"] == "insert"
        rejected = split_sentences(realize(result, _fake_completions(result)))
        assert rejected[:-1] == [s if s.endswith(" ") else s + " " for s in original]
        assert step["object"] in rejected[-1] and step["object"] not in toy_objects_of(RESPONSE)


class FakeCompleter:
    def __init__(self):
        self.prefixes = []

    def complete(self, prefixes):
        self.prefixes += prefixes
        return [p + " on the right ." for p in prefixes]


def _generations():
    rows = [{"image_id": i, "image_path": f"img/{i}.png", "prompt": "describe this image .", "response": r,
             "model": "toy-0", "round": 0, "sampling": {}}
            for i, r in enumerate([RESPONSE, *OTHER_RESPONSES])]
    rows.append({**rows[0], "image_id": 90, "response": "a dog ."})  # one sentence: skipped_rate
    rows.append({**rows[0], "image_id": 91, "response": "hello . world . again . more . end ."})  # no objects
    return rows


def test_build_apasi_pairs_contract_and_counts():
    gens = _generations()
    completer = FakeCompleter()
    rows, stats = build_apasi_pairs(gens, toy_objects_of, TOY_OBJECTS, completer, 0.4, 1, "replace",
                                    TOY_TEMPLATES, seed=3)
    assert stats == {"responses": 7, "pairs": 5, "skipped_rate": 1, "skipped_no_objects": 1,
                     "skipped_identical": 0}
    by_id = {g["image_id"]: g for g in gens}
    for row in rows:
        assert set(row) == {"image_id", "image_path", "prompt", "context", "chosen", "rejected", "method", "meta"}
        gen = by_id[row["image_id"]]
        assert row["chosen"] == gen["response"] and row["rejected"] != row["chosen"]
        assert row["method"] == "apasi" and row["context"] == "" and row["prompt"] == gen["prompt"]
        meta = row["meta"]
        assert meta["mode"] == "replace" and meta["rate"] == 0.4 and meta["inserted_indices"] == []
        assert meta["generator_model"] == "toy-0" and meta["round"] == 0
        assert len(meta["injected_objects"]) == len(meta["guide_objects"]) == len(meta["replaced_indices"])
        for obj in meta["injected_objects"]:
            assert obj in row["rejected"] and obj not in toy_objects_of(row["chosen"])
    # each prefix = original preceding sentences + a filled toy template
    for prefix in completer.prefixes:
        assert any(prefix.endswith(fill_template(t, o)) for t in TOY_TEMPLATES for o in TOY_OBJECTS)
    # per-item seeding: the same rows whatever the order of the generations
    again, _ = build_apasi_pairs(gens[::-1], toy_objects_of, TOY_OBJECTS, FakeCompleter(), 0.4, 1, "replace",
                                 TOY_TEMPLATES, seed=3)
    assert sorted(again, key=lambda r: r["image_id"]) == sorted(rows, key=lambda r: r["image_id"])


def test_build_apasi_pairs_insert_prefix_is_original_text():
    completer = FakeCompleter()
    rows, _ = build_apasi_pairs(_generations()[:1], toy_objects_of, TOY_OBJECTS, completer, 0.4, 1, "insert",
                                TOY_TEMPLATES, seed=0)
    (row,) = rows
    sentences = split_sentences(RESPONSE)
    first, second = row["meta"]["inserted_indices"]
    assert completer.prefixes[0].startswith("".join(sentences[: first + 1]))
    assert completer.prefixes[1].startswith("".join(sentences[: second + 1]))  # earlier insertion not applied
    assert len(split_sentences(row["rejected"])) == len(sentences) + 2


# --------------------------------------------------------------------------------------------------------------
# Verified APASI (extension): the two verifiers' verdicts steer injection and clean the chosen response


def test_drop_hallucinated_sentences_keeps_the_rest_verbatim():
    kept, dropped = drop_hallucinated_sentences(RESPONSE, toy_objects_of, {"frisbee", "bird"})
    assert dropped == [2, 4]
    assert kept == "this is a park scene . there is a dog on the left . a bench is at the top ."
    assert drop_hallucinated_sentences(RESPONSE, toy_objects_of, set()) == (RESPONSE.strip(), [])


def test_inject_never_picks_an_excluded_object():
    # dog's co-occurring objects absent from RESPONSE: kite only; excluding it leaves the vocabulary fallback
    picked = {inject(RESPONSE, toy_objects_of, toy_co_freq(), TOY_OBJECTS, 0.4, 1, "insert", TOY_TEMPLATES,
                     random.Random(seed), exclude={"kite", "fork"})["plan"][0]["object"] for seed in range(40)}
    assert picked and not picked & {"kite", "fork"}
    assert not picked & toy_objects_of(RESPONSE)


def _verdicts(gens, present: set[str], both_absent: set[str]):
    """Per generation: objects in `present` seen by verifier A only (a disagreement), objects in `both_absent`
    rejected by both, every other object seen by both."""
    def verdict(o):
        return (True, False) if o in present else (False, False) if o in both_absent else (True, True)
    return [{o: verdict(o) for o in TOY_OBJECTS} for _ in gens]


def test_build_apasi_pairs_with_verdicts():
    gens = _generations()
    verdicts = _verdicts(gens, present=set(), both_absent={"cup", "bowl", "frisbee"})
    rows, stats = build_apasi_pairs(gens, toy_objects_of, TOY_OBJECTS, FakeCompleter(), 0.4, 1, "insert",
                                    TOY_TEMPLATES, seed=3, verdicts=verdicts, verify_injected=True,
                                    verify_chosen=True)
    assert rows and stats["dropped_sentences"] == 1 and stats["skipped_all_dropped"] == 0
    for row in rows:
        injected = set(row["meta"]["injected_objects"])
        assert injected <= {"cup", "bowl", "frisbee"}   # never an object both verifiers see
        assert "frisbee" not in row["chosen"]            # the chosen response lost its hallucinated sentence
    (park,) = [r for r in rows if r["image_id"] == 0]
    assert park["meta"]["dropped_sentences"] == [2]
    assert park["chosen"] == "this is a park scene . there is a dog on the left . a bench is at the top . " \
                             "there is a bird ."
    # without verify_chosen the chosen responses are the model's own, verbatim
    rows, stats = build_apasi_pairs(gens, toy_objects_of, TOY_OBJECTS, FakeCompleter(), 0.4, 1, "insert",
                                    TOY_TEMPLATES, seed=3, verdicts=verdicts, verify_injected=True)
    assert stats["dropped_sentences"] == 0 and all("dropped_sentences" not in r["meta"] for r in rows)
    with pytest.raises(ValueError, match="verdicts"):
        build_apasi_pairs(gens, toy_objects_of, TOY_OBJECTS, FakeCompleter(), 0.4, 1, "insert", TOY_TEMPLATES,
                          seed=3, verdicts=verdicts[:2])


def test_verify_complete_gives_the_chosen_the_same_insertion_about_a_missed_true_object():
    gens = _generations()[:1]  # RESPONSE mentions dog, frisbee, bench, bird
    verdicts = _verdicts(gens, present=set(), both_absent={"cup", "bowl", "fork", "knife", "spoon"})  # seen: kite
    completer = FakeCompleter()
    (row,), stats = build_apasi_pairs(gens, toy_objects_of, TOY_OBJECTS, completer, 0.4, 1, "insert",
                                      TOY_TEMPLATES, seed=0, verdicts=verdicts, verify_injected=True,
                                      verify_complete=True)
    assert stats["faithful_insertions"] == 1 and row["meta"]["faithful_objects"] == ["kite"]
    first = row["meta"]["inserted_indices"][0]
    chosen, rejected = split_sentences(row["chosen"]), split_sentences(row["rejected"])
    sentences = split_sentences(RESPONSE)
    # the chosen response = RESPONSE + the kite sentence after the first insertion point, same template
    assert len(chosen) == len(sentences) + 1 and "kite" in chosen[first + 1]
    assert chosen[first + 1].replace("kite", "X") == rejected[first + 1].replace(row["meta"]["injected_objects"][0], "X")
    assert rejected[first + 1] != chosen[first + 1] and not set(row["meta"]["injected_objects"]) & {"kite"}
    # no missed object seen by both verifiers: the chosen response stays the model's own
    none_seen = _verdicts(gens, present=set(), both_absent=set(TOY_OBJECTS) - toy_objects_of(RESPONSE))
    (row,), stats = build_apasi_pairs(gens, toy_objects_of, TOY_OBJECTS, FakeCompleter(), 0.4, 1, "insert",
                                      TOY_TEMPLATES, seed=0, verdicts=none_seen, verify_complete=True)
    assert row["chosen"] == RESPONSE and row["meta"]["faithful_objects"] == [] and stats["faithful_insertions"] == 0
    # a disagreement (kite seen by one verifier) is neither a missed true object nor a hallucination to drop
    disagree = _verdicts(gens, present={"kite", "frisbee"}, both_absent={"cup", "bowl", "fork", "knife", "spoon"})
    (row,), stats = build_apasi_pairs(gens, toy_objects_of, TOY_OBJECTS, FakeCompleter(), 0.4, 1, "insert",
                                      TOY_TEMPLATES, seed=0, verdicts=disagree, verify_complete=True,
                                      verify_chosen=True)
    assert row["meta"]["faithful_objects"] == [] and "frisbee" in row["chosen"] and stats["dropped_sentences"] == 0
    with pytest.raises(ValueError, match="verdicts"):
        build_apasi_pairs(gens, toy_objects_of, TOY_OBJECTS, FakeCompleter(), 0.4, 1, "insert", TOY_TEMPLATES,
                          seed=0, verify_complete=True)


# --------------------------------------------------------------------------------------------------------------
# The real tiny model: the completion is text only


def image_inputs(forward_kwargs: dict) -> list[str]:
    """Names of image inputs in one forward call. transformers 5 generate() encodes the image before the first
    forward and passes the features as mm_encoder_outputs ({modality: features}; {} without an image) instead of
    pixel_values, so both are checked."""
    names = [k for k in ("pixel_values", "image_features") if forward_kwargs.get(k) is not None]
    encoded = forward_kwargs.get("mm_encoder_outputs") or {}
    return names + [f"mm_encoder_outputs[{k}]" for k, v in encoded.items() if v is not None]


@pytest.mark.slow
def test_text_only_completer_never_sees_pixels(tiny_model_dir, tiny_world):
    from halludpo.inference import load_image
    from halludpo.models import chat_prompt, load_model_and_processor

    model, processor = load_model_and_processor(tiny_model_dir, "toy")
    calls, vision_calls = [], []
    hook = model.register_forward_pre_hook(lambda mod, args, kwargs: calls.append(dict(kwargs)), with_kwargs=True)
    vision_hook = model.model.vision_tower.register_forward_pre_hook(lambda *a: vision_calls.append(1))
    try:
        # control: the hooks do see pixels when an image is given
        image = load_image(sorted((tiny_world / "eval" / "images").glob("*.png"))[0])
        inputs = processor(images=[image], text=[chat_prompt(processor, "describe this image .")],
                           return_tensors="pt")
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=1, do_sample=False)
        assert vision_calls and any(image_inputs(c) for c in calls)
        calls.clear(), vision_calls.clear()

        completer = TextOnlyCompleter(model, processor, "describe this image .", max_new_tokens=8, batch_size=2)
        assert not completer.use_stop_strings  # word-level tokenizer: eos + '.' fallback
        assert completer._stop_kwargs()["eos_token_id"][-1] == processor.tokenizer.convert_tokens_to_ids(".")
        prefixes = ["this is a park scene . there is a dog", "there is a fork on the left . i can see a knife"]
        outputs = completer.complete(prefixes)
    finally:
        hook.remove()
        vision_hook.remove()
    assert calls and not any(image_inputs(c) for c in calls)
    assert not vision_calls  # the vision tower never ran
    for prefix, out in zip(prefixes, outputs):
        assert out.startswith(prefix) and out.endswith(".")
        assert out[len(prefix):].count(".") == 1  # cut after the first '.'



def test_verify_correct_pairs_the_models_own_hallucination_with_its_correction():
    gens = _generations()[:1]  # RESPONSE: dog, frisbee (sentence 2), bench, bird (sentence 4)
    verdicts = _verdicts(gens, present=set(), both_absent={"frisbee", "bird", "cup", "bowl", "fork", "knife",
                                                           "spoon"})  # seen by both: dog, bench, kite
    completer = FakeCompleter()
    rows, stats = build_apasi_pairs(gens, toy_objects_of, TOY_OBJECTS, completer, 0.4, 1, "insert",
                                    TOY_TEMPLATES, seed=0, verdicts=verdicts, verify_correct=True)
    (injected, fix) = rows
    assert injected["meta"].get("kind") is None and fix["meta"]["kind"] == "correction"
    assert stats["correction_pairs"] == 1 and stats["pairs"] == 2
    sentences, chosen = split_sentences(RESPONSE), split_sentences(fix["chosen"])
    assert fix["rejected"] == RESPONSE                       # the description as the model wrote it
    assert fix["meta"]["corrected_indices"] == [2, 4] and fix["meta"]["removed_objects"] == ["frisbee", "bird"]
    # the one missed seen object (kite) replaces the first hallucinated sentence, the second is dropped
    assert fix["meta"]["faithful_objects"] == ["kite"] and fix["meta"]["dropped_indices"] == [4]
    assert len(chosen) == len(sentences) - 1 and "kite" in chosen[2]
    assert [chosen[i].strip() for i in (0, 1, 3)] == [sentences[i].strip() for i in (0, 1, 3)]
    assert not toy_objects_of(fix["chosen"]) & {"frisbee", "bird"}
    # completed by the model after the original preceding text, from a template naming the object
    prefix = completer.prefixes[-1]
    assert prefix.startswith("".join(sentences[:2])) and "kite" in prefix[len("".join(sentences[:2])):]
    # nothing both verifiers reject: no correction pair; a correction with no object left is skipped
    _, stats = build_apasi_pairs(gens, toy_objects_of, TOY_OBJECTS, FakeCompleter(), 0.4, 1, "insert",
                                 TOY_TEMPLATES, seed=0, verdicts=_verdicts(gens, set(), set()), verify_correct=True)
    assert stats["correction_pairs"] == 0
    everything_wrong = _verdicts(gens, present=set(), both_absent=set(TOY_OBJECTS))
    rows, stats = build_apasi_pairs(gens, toy_objects_of, TOY_OBJECTS, FakeCompleter(), 0.4, 1, "insert",
                                    TOY_TEMPLATES, seed=0, verdicts=everything_wrong, verify_correct=True)
    assert stats["correction_pairs"] == 0 and all(r["meta"].get("kind") != "correction" for r in rows)


def test_verify_correct_as_sentence_pairs_one_sentence_in_its_faithful_context():
    gens = _generations()[:1]  # RESPONSE: dog, frisbee (sentence 2), bench, bird (sentence 4)
    sentences = split_sentences(RESPONSE)
    both_absent = {"frisbee", "bird", "cup", "bowl", "fork", "knife", "spoon"}  # seen by both: dog, bench, kite
    rows, stats = build_apasi_pairs(gens, toy_objects_of, TOY_OBJECTS, FakeCompleter(), 0.0, 1, "insert",
                                    TOY_TEMPLATES, seed=0, verdicts=_verdicts(gens, set(), both_absent),
                                    verify_correct=True, correct_as="sentence")
    # rate 0: no injection pair; kite replaces the frisbee sentence; the bird sentence has nothing left to name
    # (dropped), which gives no pair: a sentence pair never teaches where to stop
    (row,) = rows
    assert stats["correction_pairs"] == 1 and stats["pairs"] == 1 and stats["skipped_rate"] == 1
    assert row["context"] == "".join(sentences[:2]).strip() and row["rejected"] == sentences[2].strip()
    assert "kite" in toy_objects_of(row["chosen"]) and split_sentences(row["chosen"]) == [row["chosen"]]
    assert row["meta"]["is_last_sent"] is False and row["meta"]["removed_objects"] == ["frisbee"]
    # two seen objects missed: both hallucinated sentences are replaced; the second pair's context carries the
    # first correction, never the hallucination
    one_more = _verdicts(gens, set(), both_absent - {"cup"})
    rows, stats = build_apasi_pairs(gens, toy_objects_of, TOY_OBJECTS, FakeCompleter(), 0.0, 1, "insert",
                                    TOY_TEMPLATES, seed=0, verdicts=one_more, verify_correct=True,
                                    correct_as="sentence")
    first, second = rows
    assert stats["correction_pairs"] == 2 and second["rejected"] == sentences[4].strip()
    assert first["chosen"] in second["context"] and "frisbee" not in second["context"]
    with pytest.raises(ValueError, match="correct_as"):
        build_apasi_pairs(gens, toy_objects_of, TOY_OBJECTS, FakeCompleter(), 0.0, 1, "insert", TOY_TEMPLATES,
                          seed=0, verdicts=one_more, verify_correct=True, correct_as="sentences")
    # form "object": the same pairs cut after the object, differing in it alone
    rows, _ = build_apasi_pairs(gens, toy_objects_of, TOY_OBJECTS, FakeCompleter(), 0.0, 1, "insert",
                                TOY_TEMPLATES, seed=0, verdicts=one_more, verify_correct=True, correct_as="object")
    assert [(r["rejected"], r["meta"]["form"]) for r in rows] == [("i can see a frisbee", "object"),
                                                                  ("there is a bird", "object")]
    assert sorted(r["meta"]["faithful_objects"][0] for r in rows) == ["cup", "kite"]
    assert all(r["chosen"].rsplit(" ", 1)[0] == r["rejected"].rsplit(" ", 1)[0] for r in rows)
    assert [r["context"] for r in rows] == [first["context"], second["context"]]


@pytest.mark.parametrize("sentence, old, new, expected", [
    ("there is a large knife at the bottom right .", "knife", "bowl", ("there is a knife", "there is a bowl")),
    ("i can see a red knife .", "knife", "cup", ("i can see a knife", "i can see a cup")),
    ("a knife is on the right .", "knife", "bowl", ("a knife", "a bowl")),
    ("at the top , there is a knife .", "knife", "apple", ("at the top , there is a knife",
                                                         "at the top , there is an apple")),
    ("i see the big knife .", "knife", "apple", ("i see the knife", "i see the apple")),
    ("there is also knife .", "knife", "bowl", ("there is also knife", "there is also bowl")),
    ("there is a dog .", "knife", "bowl", None),
])
def test_object_swap_differs_only_from_the_article_on(sentence, old, new, expected):
    objects_of = lambda text: {o for o in ("knife", "bowl", "apple", "dog", "cup") if o in text.split()}  # noqa
    assert object_swap(sentence, old, new, objects_of) == expected


def test_verify_mirror_moves_an_object_pair_to_an_image_that_reverses_it():
    gens = _generations()[:1]
    gens += [{**gens[0], "image_id": i, "image_path": f"img/{i}.png"} for i in (7, 8)]
    # image 0: frisbee and bird hallucinated, kite the one seen object missed: kite replaces frisbee (one pair),
    # the bird sentence is dropped (no pair)
    verdicts = _verdicts(gens[:1], set(), {"frisbee", "bird", "cup", "bowl", "fork", "knife", "spoon"})
    # image 7 sees dog (the context) and frisbee but not kite: the mirror goes there; image 8 sees everything, so
    # it mirrors nothing (the chosen object must be absent there)
    seen_all = {o: (True, True) for o in TOY_OBJECTS}
    verdicts += [seen_all | {"kite": (False, False)}, seen_all]
    rows, stats = build_apasi_pairs(gens, toy_objects_of, TOY_OBJECTS, FakeCompleter(), 0.0, 1, "insert",
                                    TOY_TEMPLATES, seed=0, verdicts=verdicts, verify_correct=True,
                                    correct_as="object", mirror=True)
    original, mirror = rows
    assert stats["correction_pairs"] == 1 and stats["mirror_pairs"] == 1
    assert original["meta"]["kind"] == "correction" and mirror["meta"]["kind"] == "correction_mirror"
    assert original["chosen"] == "i can see a kite" and original["rejected"] == "i can see a frisbee"
    assert mirror["image_id"] == 7 and mirror["image_path"] == "img/7.png" and mirror["meta"]["mirror_of"] == 0
    assert (mirror["chosen"], mirror["rejected"], mirror["context"]) == (original["rejected"], original["chosen"],
                                                                         original["context"])
    assert mirror["meta"]["faithful_objects"] == ["frisbee"] and mirror["meta"]["removed_objects"] == ["kite"]
    with pytest.raises(ValueError, match="mirror needs"):
        build_apasi_pairs(gens, toy_objects_of, TOY_OBJECTS, FakeCompleter(), 0.0, 1, "insert", TOY_TEMPLATES,
                          seed=0, verdicts=verdicts, verify_correct=True, correct_as="sentence", mirror=True)


def test_per_round_schedules_repeat_their_last_entry_and_check_every_mode():
    from omegaconf import OmegaConf

    from halludpo.pairs import injection_mode, injection_rate

    assert [injection_rate([0.4, 0.2], k) for k in range(4)] == [0.4, 0.2, 0.2, 0.2]
    assert [injection_mode("both", k) for k in range(3)] == ["both"] * 3
    schedule = OmegaConf.create({"mode": ["both", "replace"]}).mode  # as Hydra hands it over
    assert [injection_mode(schedule, k) for k in range(3)] == ["both", "replace", "replace"]
    with pytest.raises(ValueError, match="method.mode: unknown injection mode 'replce'"):
        injection_mode(["both", "replce"], 0)  # a typo in round 1's entry fails in round 0
    with pytest.raises(ValueError, match="method.injection_rates is empty"):
        injection_rate([], 0)
