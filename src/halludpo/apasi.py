"""APASI: rejected responses made by injecting hallucinated sentences into the model's own descriptions.

The chosen response is the model's own greedy description of an image. The rejected response is the same text in
which a few sentences (later ones likelier, never the first `skip`) are replaced by a sentence about an object that
is absent from the response but co-occurs, in the model's own responses, with an object of the kept sentences. The
injected sentence starts from a template ("There is a {}") and is completed by the SAME model WITHOUT the image, so
its wording comes from the language prior alone. Every other sentence is kept word for word.

Extension ("insert" mode): the injected sentence is inserted after the selected sentence instead of replacing it,
so rejected = chosen + one extra sentence per selection: the pair teaches against the extra-object hallucination.

Extension ("verified APASI", method.verify): two object verifiers (those of SENTINEL, rule train_verifiers) check
each image; an object both verifiers find in the image is never injected (else the rejected response would hold a
true object and DPO would teach the model to leave real objects out), and with verify.chosen the chosen response
loses its sentences naming an object both verifiers find absent (the model's own hallucinations, which the SFT term
would otherwise reinforce).

Everything but :class:`TextOnlyCompleter` is pure: randomness comes from a ``random.Random`` passed in, and
:func:`build_apasi_pairs` seeds one per item from (seed, image_id), so results do not depend on processing order.
"""

from __future__ import annotations

import math
import random
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch

from halludpo.metrics.text import split_sentences
from halludpo.models import chat_prompt

MODES = ("replace", "insert", "both", "append")

# ~20 templates in the spirit of APASI's: a sentence opening that names the object and leaves the rest to the model.
PAPER_TEMPLATES: list[str] = [
    "There is a {}",
    "There is also a {}",
    "In the background, a {} can be seen",
    "A {} is also visible",
    "I can also see a {}",
    "Next to it, there is a {}",
    "Nearby, a {} is placed",
    "A {} can be spotted",
    "The scene also includes a {}",
    "On one side, there is a {}",
    "Close by, a {} sits",
    "Additionally, a {} is present",
    "In the foreground, a {} stands out",
    "A {} appears in the image",
    "Further back, a {} is visible",
    "The image also features a {}",
    "Not far away, a {} can be noticed",
    "Among the other items, there is a {}",
    "A {} is located",
    "Toward the edge of the picture, a {} is shown",
]
# The toy world's caption style (its tokenizer is word-level and lower case).
TOY_TEMPLATES: list[str] = ["there is a {}", "i can see a {}", "there is also a {}", "a {} is"]

_ARTICLE_BEFORE_SLOT = re.compile(r"\b([Aa]) \{\}")


# ---------------------------------------------------------------------------------------------------------------
# Which sentences


def n_to_replace(n_sentences: int, rate: float) -> int | None:
    """round(rate * n_sentences) with Python's round (banker's rounding: round(2.5) == 2, as in the original);
    None unless 1 <= n <= n_sentences - 1 (at least one sentence must stay)."""
    n = round(rate * n_sentences)
    return n if 1 <= n <= n_sentences - 1 else None


def position_weights(n_sentences: int, skip: int) -> list[float]:
    """Weights of sentence indices skip .. n-1: w_i = a*sqrt(i) + b, a = 1/(sqrt(n-1) - sqrt(skip)),
    b = 1 - a*sqrt(skip), i.e. 1 at index `skip` rising to 2 at the last index. One candidate: [1.0]."""
    last = n_sentences - 1
    if last < skip:
        return []
    if last == skip:
        return [1.0]
    a = 1.0 / (math.sqrt(last) - math.sqrt(skip))
    b = 1.0 - a * math.sqrt(skip)
    return [a * math.sqrt(i) + b for i in range(skip, n_sentences)]


def select_sentences(n_sentences: int, rate: float, skip: int, rng: random.Random) -> list[int] | None:
    """Sorted indices of the sentences to inject at: n_to_replace of them drawn by position_weights WITHOUT
    replacement (draw one by weight, remove it, renormalise). None if n_to_replace is None or fewer than that
    many candidates exist in [skip, n-1]."""
    k = n_to_replace(n_sentences, rate)
    candidates = list(range(skip, n_sentences))
    if k is None or len(candidates) < k:
        return None
    weights = position_weights(n_sentences, skip)
    chosen = []
    for _ in range(k):
        j = rng.choices(range(len(candidates)), weights=weights)[0]
        chosen.append(candidates.pop(j))
        weights.pop(j)
    return sorted(chosen)


# ---------------------------------------------------------------------------------------------------------------
# Which object


def object_statistics(objects_per_response: Iterable[set[str]]) -> tuple[Counter, dict[str, Counter]]:
    """object_freq[o] = number of responses mentioning o; co_freq[o][o2] = number mentioning both (o != o2)."""
    object_freq: Counter = Counter()
    co_freq: dict[str, Counter] = {}
    for objects in objects_per_response:
        objects = set(objects)
        object_freq.update(objects)
        for o in objects:
            co_freq.setdefault(o, Counter()).update(objects - {o})
    return object_freq, co_freq


def choose_injected_object(kept_objects: set[str], response_objects: set[str], co_freq: dict[str, Counter],
                           vocabulary: Sequence[str], rng: random.Random, top_k: int = 10,
                           exclude: Iterable[str] = ()) -> tuple[str, str] | None:
    """(key_object, injected_object), or None when nothing can be chosen.

    key = rng.choice(sorted(kept_objects)); candidates = the top_k objects co-occurring with key (count desc, then
    name) among those absent from response_objects and exclude (absent objects are filtered first, then the
    top_k taken); injected = rng.choice(candidates). Fallback when no candidate: a random vocabulary object
    absent from response_objects and exclude.
    """
    if not kept_objects:
        return None
    key = rng.choice(sorted(kept_objects))
    banned = set(response_objects) | set(exclude)
    ranked = sorted(((o, c) for o, c in co_freq.get(key, Counter()).items() if c > 0 and o not in banned),
                    key=lambda oc: (-oc[1], oc[0]))
    candidates = [o for o, _ in ranked[:top_k]]
    if not candidates:
        candidates = sorted(set(vocabulary) - banned)
        if not candidates:
            return None
    return key, rng.choice(candidates)


def fill_template(template: str, obj: str) -> str:
    """Put obj into the template's "{}"; "a {}" / "A {}" becomes "an {}" / "An {}" before a vowel."""
    if obj[:1].lower() in "aeiou":
        template = _ARTICLE_BEFORE_SLOT.sub(lambda m: m.group(1) + "n {}", template)
    return template.format(obj)


# ---------------------------------------------------------------------------------------------------------------
# Text-only completion (the language prior)


def _stop_strings_supported(tokenizer) -> bool:
    from transformers import StopStringCriteria

    try:
        StopStringCriteria(tokenizer, ["."])  # what generate(stop_strings=...) builds internally
    except Exception:  # noqa: BLE001 - e.g. the toy word-level tokenizer: "ValueError: substring not found"
        return False
    return True


def finish_sentence(prefix: str, continuation: str, terminator: str = " .") -> str:
    """prefix + continuation cut after its first '.'; when no '.' came (length limit hit), the right-stripped
    continuation + terminator, so the injected text is always one sentence ending with '.'."""
    cut = continuation.find(".")
    if cut >= 0:
        return prefix + continuation[: cut + 1]
    return prefix + continuation.rstrip() + terminator


class TextOnlyCompleter:
    """Completes sentence prefixes with the model and NO image: greedy, repetition penalty, stop at the first '.'.

    The prompt is the processor's chat template around `prompt_text` without an image, followed by the prefix; no
    pixel_values are ever passed, so the continuation is the model's language prior alone (as in APASI).
    """

    def __init__(self, model, processor, prompt_text: str, max_new_tokens: int = 64,
                 repetition_penalty: float = 1.1, batch_size: int = 32, terminator: str = " .") -> None:
        """`terminator` is appended when generation hits max_new_tokens before any '.': " ." matches the toy
        world's word-level style ("on the left ."); use "." for natural text. The original leaves such a sentence
        unterminated; ending it keeps the rejected text's sentence structure intact."""
        self.model, self.processor, self.prompt_text = model, processor, prompt_text
        self.max_new_tokens, self.repetition_penalty, self.batch_size = max_new_tokens, repetition_penalty, batch_size
        self.terminator = terminator
        self.tokenizer = processor.tokenizer
        self.use_stop_strings = _stop_strings_supported(self.tokenizer)

    def _stop_kwargs(self) -> dict:
        """stop_strings=["."] when the tokenizer supports it. Otherwise (word-level tokenizers: transformers'
        StopStringCriteria cannot map their vocabulary) stop on EOS or on the '.' token itself."""
        tok = self.tokenizer
        if self.use_stop_strings:
            return {"stop_strings": ["."], "tokenizer": tok}
        eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
        dot = tok.convert_tokens_to_ids(".")
        if dot is not None and dot != tok.unk_token_id:
            eos.append(dot)
        return {"eos_token_id": eos}

    def _continuation(self, prompt_ids: list[int], new_ids: list[int]) -> str:
        """Text of new_ids as it continues prompt_ids: decode(prompt + new) minus decode(prompt), which keeps the
        leading space a word-piece or word-level decoder would drop; plain decode(new) if that is not a prefix."""
        tok = self.tokenizer
        head = tok.decode(prompt_ids, skip_special_tokens=True)
        full = tok.decode(prompt_ids + new_ids, skip_special_tokens=True)
        if full.startswith(head):
            return full[len(head):]
        return " " + tok.decode(new_ids, skip_special_tokens=True).lstrip()

    @torch.no_grad()
    def complete(self, prefixes: list[str]) -> list[str]:
        """For each prefix: prefix + the model's text-only greedy continuation up to and including the first '.'."""
        tok = self.tokenizer
        tok.padding_side = "left"
        head = chat_prompt(self.processor, self.prompt_text, with_image=False)
        device = next(self.model.parameters()).device
        out_texts: list[str] = []
        for start in range(0, len(prefixes), self.batch_size):
            batch = prefixes[start: start + self.batch_size]
            enc = tok([head + p for p in batch], return_tensors="pt", padding=True).to(device)
            out = self.model.generate(
                input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], do_sample=False,
                repetition_penalty=self.repetition_penalty, max_new_tokens=self.max_new_tokens,
                **self._stop_kwargs(),
            )
            width = enc["input_ids"].shape[1]
            for row, prefix in enumerate(batch):
                prompt_ids = enc["input_ids"][row][enc["attention_mask"][row].bool()].tolist()
                new_ids = out[row, width:].tolist()
                out_texts.append(finish_sentence(prefix, self._continuation(prompt_ids, new_ids), self.terminator))
        return out_texts


# ---------------------------------------------------------------------------------------------------------------
# Planning and realising one rejected response


def _trailing_space(sentence: str) -> str:
    return sentence[len(sentence.rstrip()):]


def injection_context(sentences: Sequence[str], index: int, action: str) -> str:
    """The ORIGINAL text before the injected sentence (earlier injections not applied): sentences[:index] for a
    replacement, sentences[:index + 1] for an insertion (plus a space if that sentence has no trailing one)."""
    if action == "replace":
        return "".join(sentences[:index])
    context = "".join(sentences[: index + 1])
    return context if not context or _trailing_space(context) else context + " "


def inject(response: str, objects_of: Callable[[str], set[str]], co_freq: dict[str, Counter],
           vocabulary: Sequence[str], rate: float, skip: int, mode: str, templates: Sequence[str],
           rng: random.Random, top_k: int = 10, exclude: Iterable[str] = ()) -> dict[str, Any] | None:
    """Plan one rejected response (no model call): which sentences, which action, which object, which template.

    mode "replace" (APASI) replaces each selected sentence; "insert" puts the injected sentence after it, keeping
    it; "both" lets rng pick one of the two for this response; "append" (extension) adds one injected sentence
    after the last one, whatever the rate — the extra-object-at-the-end hallucination of list-like descriptions. Objects are chosen around the objects of the kept
    sentences (all sentences not replaced), never one of `exclude` (objects a verifier found in the image); no kept
    object, or too few sentences for `rate` -> None. Returns
    {"sentences", "mode", "plan": [{"index", "action", "object", "key_object", "template_prefix"}]}.
    """
    if mode not in MODES:
        raise ValueError(f"unknown injection mode {mode!r}; valid modes: {', '.join(MODES)}")
    action = rng.choice(["replace", "insert"]) if mode == "both" else "insert" if mode == "append" else mode
    sentences = split_sentences(response)
    if mode == "append":
        selected = [len(sentences) - 1] if len(sentences) > skip else None
    else:
        selected = select_sentences(len(sentences), rate, skip, rng)
    if selected is None:
        return None
    replaced = set(selected) if action == "replace" else set()
    kept_objects: set[str] = set()
    for i, sentence in enumerate(sentences):
        if i not in replaced:
            kept_objects |= set(objects_of(sentence))
    if not kept_objects:
        return None
    response_objects = set(objects_of(response))
    plan, injected = [], []
    for index in selected:
        choice = choose_injected_object(kept_objects, response_objects, co_freq, vocabulary, rng, top_k,
                                        [*injected, *sorted(exclude)])
        if choice is None:
            return None
        key, obj = choice
        injected.append(obj)
        template = rng.choice(templates)
        plan.append({"index": index, "action": action, "object": obj, "key_object": key, "template": template,
                     "template_prefix": fill_template(template, obj)})
    return {"sentences": sentences, "plan": plan, "mode": action}


def faithful_insertions(plan: Sequence[dict], missed_objects: set[str], rng: random.Random) -> list[dict]:
    """Verified APASI (verify.complete): for the plan's insertions, in order, the same insertion with the object
    swapped for one the response does not mention but both verifiers find in the image (drawn without
    replacement) — while such objects remain. The chosen response gets these, so chosen and rejected go on at the
    same place and differ in the object: the pair teaches which object, not where to stop."""
    missed = sorted(missed_objects)
    steps = []
    for step in plan:
        if step["action"] != "insert" or not missed:
            continue
        obj = missed.pop(rng.randrange(len(missed)))
        steps.append(step | {"object": obj, "template_prefix": fill_template(step["template"], obj)})
    return steps


def correction_plan(sentences: Sequence[str], objects_of: Callable[[str], set[str]], hallucinated: set[str],
                    missed_objects: set[str], templates: Sequence[str], rng: random.Random) -> list[dict]:
    """Verified APASI (verify.correct): the model's OWN hallucinations corrected. Each sentence naming an object
    both verifiers find absent is replaced by a sentence about an object both find present that the response does
    not mention (drawn without replacement, template drawn with `rng`), or dropped once none remains. The pair
    (chosen = corrected, rejected = the response as generated) pushes down what the model itself said wrong, at
    the place it said it — APASI's injected objects are ones the model would not have said."""
    missed = sorted(missed_objects - set().union(*(objects_of(s) for s in sentences)))
    steps = []
    for index, sentence in enumerate(sentences):
        wrong = sorted(objects_of(sentence) & hallucinated)
        if not wrong:
            continue
        if not missed:
            steps.append({"index": index, "action": "drop", "object": None, "removed": wrong})
            continue
        obj = missed.pop(rng.randrange(len(missed)))
        template = rng.choice(templates)
        steps.append({"index": index, "action": "replace", "object": obj, "removed": wrong, "template": template,
                      "template_prefix": fill_template(template, obj)})
    return steps


def realize(plan_result: dict[str, Any], completions: dict[int, str]) -> str:
    """The rejected text: completions[index] (the completed injected sentence, without its preceding context)
    replaces or follows sentence `index` (a "drop" step removes it); it takes that sentence's trailing whitespace
    (a space after the last sentence for an insertion), so every other sentence is unchanged character for
    character."""
    actions = {step["index"]: step["action"] for step in plan_result["plan"]}
    pieces = []
    for i, sentence in enumerate(plan_result["sentences"]):
        if i not in actions:
            pieces.append(sentence)
            continue
        if actions[i] == "drop":
            continue
        new = completions[i].strip()
        space = _trailing_space(sentence)
        if actions[i] == "replace":
            pieces.append(new + space)
        else:
            pieces.append(sentence + new + space if space else sentence + " " + new)
    return "".join(pieces)


# ---------------------------------------------------------------------------------------------------------------
# Pairs


def drop_hallucinated_sentences(response: str, objects_of: Callable[[str], set[str]],
                                hallucinated: set[str]) -> tuple[str, list[int]]:
    """(the response without its sentences that name an object of `hallucinated`, indices of the dropped
    sentences); every other sentence is kept character for character."""
    sentences = split_sentences(response)
    dropped = [i for i, sentence in enumerate(sentences) if set(objects_of(sentence)) & hallucinated]
    kept = "".join(s for i, s in enumerate(sentences) if i not in dropped)
    return kept.strip(), dropped


def _complete_steps(completer, jobs: list[tuple[Sequence[str], dict]]) -> Iterator[str]:
    """The completed sentence of every (sentences, plan step), in order, without its preceding context: one
    completer.complete call on prefixes = original preceding text + template prefix."""
    contexts = [injection_context(sentences, step["index"], step["action"]) for sentences, step in jobs]
    prefixes = [context + step["template_prefix"] for context, (_, step) in zip(contexts, jobs)]
    for context, text in zip(contexts, completer.complete(prefixes) if prefixes else []):
        if not text.startswith(context):
            raise ValueError(f"completer changed its prefix: {context!r} -> {text!r}")
        yield text[len(context):]


def _verified_objects(verdict: dict[str, tuple[bool, bool]] | None) -> tuple[set[str], set[str]]:
    """(objects both verifiers find in the image, objects both find absent); disagreements are in neither."""
    if verdict is None:
        return set(), set()
    return ({o for o, (a, b) in verdict.items() if a and b}, {o for o, (a, b) in verdict.items() if not (a or b)})


def _plannable(response: str, rate: float, skip: int, mode: str) -> bool:
    """Enough sentences to inject at, as inject() decides: mode "append" needs a sentence past the first `skip`
    (whatever the rate), the other modes n_to_replace(n, rate) sentences at index >= skip."""
    n = len(split_sentences(response))
    if mode == "append":
        return n > skip
    k = n_to_replace(n, rate)
    return k is not None and n - skip >= k


CORRECT_AS = ("response", "sentence", "object")
ARTICLES = ("a", "an", "the")


def object_swap(sentence: str, old: str, new: str, objects_of: Callable[[str], set[str]],
                max_modifiers: int = 3) -> tuple[str, str] | None:
    """(y_lose, y_win) for verify.correct_as "object": `sentence` cut right after its mention of object `old`, and
    the same with `new` in its place, so that the two differ from the object's article on and nowhere else. Up to
    `max_modifiers` words between the article and the object ("a large red knife") are left out of both: they
    describe the old object, and would also differ between the two. Without an article that close, the mention
    alone is swapped. None when `old` is not found word by word."""
    words = sentence.split()
    end = next((i for i in range(len(words)) if old in objects_of(" ".join(words[: i + 1]))), None)
    if end is None:
        return None
    start = max(j for j in range(end + 1) if old in objects_of(" ".join(words[j: end + 1])))
    article = next((i for i in range(start - 1, max(-1, start - 2 - max_modifiers), -1)
                    if words[i].lower() in ARTICLES), None)
    mention = words[start: end + 1]
    if article is None:
        return " ".join(words[: end + 1]), " ".join(words[:start] + [new])
    head = words[:article]
    if words[article].lower() == "the":
        return " ".join(head + ["the"] + mention), " ".join(head + ["the", new])
    return (" ".join(head + ["an" if mention[0][:1] in "aeiou" else "a"] + mention),
            " ".join(head + ["an" if new[:1] in "aeiou" else "a", new]))


def correction_sentence_rows(gen: dict, fix: dict, completions: dict[int, str], form: str = "sentence",
                             objects_of: Callable[[str], set[str]] | None = None) -> list[dict]:
    """Correction pairs inside the description (verify.correct_as "sentence" or "object"): for each hallucinated
    sentence that has a replacement, context = the description before it (earlier hallucinated sentences already
    corrected, or dropped); form "sentence": chosen = the replacement sentence, rejected = the sentence as
    generated; form "object": the two cut after the object, differing only from its article on (object_swap).
    meta.is_last_sent is false, so the context is masked and no end-of-turn is scored (halludpo.logprobs): the pair
    cannot teach where the description stops, which whole-response corrections do whenever the chosen one is
    shorter. Dropped sentences (no seen object left to name) give no pair."""
    actions = {step["index"]: step for step in fix["plan"]}
    rows, kept = [], []
    for index, sentence in enumerate(fix["sentences"]):
        step = actions.get(index)
        if step is None:
            kept.append(sentence)
            continue
        if step["action"] == "replace":
            chosen, rejected = completions[index].strip(), sentence.strip()
            if form == "object":
                swapped = object_swap(sentence, step["removed"][0], step["object"], objects_of)
                if swapped is None:
                    kept.append(completions[index].strip() + _trailing_space(sentence))
                    continue
                rejected, chosen = swapped
            rows.append({
                "image_id": gen["image_id"], "image_path": gen["image_path"], "prompt": gen["prompt"],
                "context": "".join(kept).strip(), "chosen": chosen, "rejected": rejected, "method": "apasi",
                "meta": {"kind": "correction", "form": form, "corrected_indices": [index],
                         "removed_objects": list(step["removed"]), "faithful_objects": [step["object"]],
                         "is_last_sent": False, "generator_model": gen.get("model"), "round": gen.get("round")},
            })
            kept.append(completions[index].strip() + _trailing_space(sentence))
    return rows


def mirror_row(row: dict, generations: Sequence[dict], verdicts: Sequence[dict[str, tuple[bool, bool]]],
               objects_of: Callable[[str], set[str]], seed: int) -> dict | None:
    """The counterfactual twin of an "object" correction pair (verify.mirror): the same context and the same two
    texts on ANOTHER image where both verifiers see the rejected object (and every object of the context) and both
    find the chosen one absent — with the preference reversed. Alone, a correction pair can be satisfied by a text
    rule ("after a fork, never a knife"); with its twin only looking at the image satisfies both. The other image is
    drawn with random.Random(f"{seed}/mirror/{image_id}/{rejected}") among the candidates; None when there is none.
    """
    removed, faithful = row["meta"]["removed_objects"][0], row["meta"]["faithful_objects"][0]
    needed = objects_of(row["context"]) | {removed}
    candidates = [i for i, (gen, verdict) in enumerate(zip(generations, verdicts))
                  if gen["image_id"] != row["image_id"] and verdict.get(faithful) == (False, False)
                  and all(verdict.get(o) == (True, True) for o in needed)]
    if not candidates:
        return None
    other = generations[random.Random(f"{seed}/mirror/{row['image_id']}/{row['rejected']}").choice(candidates)]
    return row | {"image_id": other["image_id"], "image_path": other["image_path"], "prompt": other["prompt"],
                  "chosen": row["rejected"], "rejected": row["chosen"],
                  "meta": row["meta"] | {"kind": "correction_mirror", "mirror_of": row["image_id"],
                                         "removed_objects": [faithful], "faithful_objects": [removed]}}


def build_apasi_pairs(generations: list[dict], objects_of: Callable[[str], set[str]], vocabulary: Sequence[str],
                      completer, rate: float, skip: int, mode: str, templates: Sequence[str], seed: int,
                      top_k: int = 10, verdicts: Sequence[dict[str, tuple[bool, bool]]] | None = None,
                      verify_injected: bool = False, verify_chosen: bool = False,
                      verify_complete: bool = False, verify_correct: bool = False,
                      correct_as: str = "response", mirror: bool = False) -> tuple[list[dict], dict]:
    """APASI pairs (pairs.jsonl rows) from generations.jsonl rows, and counts.

    Co-occurrence statistics come from the model's OWN responses. Each response is planned with
    random.Random(f"{seed}/{image_id}/{k}") (k = how many earlier rows had that image_id), then all injected
    sentences are completed in one completer.complete call on prefixes = original preceding text + template
    prefix. Rows whose rejected text equals the chosen one are dropped.
    meta.mode is the configured mode; replaced_indices / inserted_indices show what "both" picked.
    verdicts (extension, one per generation): {category: (verifier A present, verifier B present)}; with
    verify_injected an object both verifiers find is never injected; with verify_chosen the sentences naming an object both find
    absent are dropped from the chosen response first (meta.dropped_sentences); with verify_complete the chosen
    response gets faithful_insertions (meta.faithful_objects), completed like the injected ones; with
    verify_correct every response naming an object both find absent also gives a correction pair
    (:func:`correction_plan`; meta.kind "correction", after the injection pairs): one pair of whole responses
    (correct_as "response"), or one pair per corrected sentence (correct_as "sentence" or "object",
    :func:`correction_sentence_rows`), with `mirror` also their counterfactual twins (:func:`mirror_row`).
    Stats: responses, pairs, skipped_rate (too few sentences), skipped_no_objects, skipped_identical,
    and with verdicts dropped_sentences, skipped_all_dropped, faithful_insertions, correction_pairs (+ mirror_pairs).
    """
    if mirror and correct_as != "object":
        raise ValueError(f"verify.mirror needs verify.correct_as=object (got {correct_as!r}): only pairs that differ "
                         "in the object alone can be moved to another image")
    if correct_as not in CORRECT_AS:
        raise ValueError(f"correct_as={correct_as!r}: valid values are {', '.join(CORRECT_AS)}")
    if verdicts is not None and len(verdicts) != len(generations):
        raise ValueError(f"{len(verdicts)} verdicts for {len(generations)} generations")
    if (verify_injected or verify_chosen or verify_complete or verify_correct) and verdicts is None:
        raise ValueError("verify_injected / verify_chosen / verify_complete / verify_correct need the verifiers' "
                         "verdicts")
    _, co_freq = object_statistics(objects_of(g["response"]) for g in generations)
    stats = {"responses": len(generations), "pairs": 0, "skipped_rate": 0, "skipped_no_objects": 0,
             "skipped_identical": 0}
    if verdicts is not None:
        stats |= {"dropped_sentences": 0, "skipped_all_dropped": 0, "faithful_insertions": 0,
                  "correction_pairs": 0}
    seen: Counter = Counter()
    planned: list[tuple[dict, dict, list[dict]]] = []
    corrections: list[tuple[dict, dict]] = []
    for i, gen in enumerate(generations):
        rng = random.Random(f"{seed}/{gen['image_id']}/{seen[gen['image_id']]}")
        seen[gen["image_id"]] += 1
        present, hallucinated = _verified_objects(verdicts[i] if verdicts is not None else None)
        if verify_correct and hallucinated:
            sentences = split_sentences(gen["response"])
            steps = correction_plan(sentences, objects_of, hallucinated, present, templates,
                                    random.Random(f"{seed}/{gen['image_id']}/correct/{seen[gen['image_id']]}"))
            if steps:
                corrections.append((gen, {"sentences": sentences, "plan": steps}))
        if verify_chosen and hallucinated:
            response, dropped = drop_hallucinated_sentences(gen["response"], objects_of, hallucinated)
            stats["dropped_sentences"] += len(dropped)
            if not response:
                stats["skipped_all_dropped"] += 1
                continue
            gen = gen | {"response": response, "dropped_sentences": dropped}
        if not _plannable(gen["response"], rate, skip, mode):
            stats["skipped_rate"] += 1
            continue
        result = inject(gen["response"], objects_of, co_freq, vocabulary, rate, skip, mode, templates, rng, top_k,
                        exclude=present if verify_injected else ())
        if result is None:
            stats["skipped_no_objects"] += 1
            continue
        missed = (present - set(objects_of(gen["response"]))) if verify_complete else set()
        faithful = faithful_insertions(result["plan"], missed, rng)
        if verdicts is not None:
            stats["faithful_insertions"] += len(faithful)
        planned.append((gen, result, faithful))

    completions = _complete_steps(completer, [(result["sentences"], step) for _, result, faithful in planned
                                              for step in [*result["plan"], *faithful]]
                                  + [(fix["sentences"], step) for _, fix in corrections for step in fix["plan"]
                                     if step["action"] == "replace"])
    rows = []
    for gen, result, faithful in planned:
        rejected = realize(result, {step["index"]: next(completions) for step in result["plan"]})
        chosen = gen["response"]
        if faithful:
            chosen = realize({"sentences": result["sentences"], "plan": faithful},
                             {step["index"]: next(completions) for step in faithful})
        if rejected == chosen:
            stats["skipped_identical"] += 1
            continue
        plan = result["plan"]
        rows.append({
            "image_id": gen["image_id"], "image_path": gen["image_path"], "prompt": gen["prompt"], "context": "",
            "chosen": chosen, "rejected": rejected, "method": "apasi",
            "meta": {
                "mode": mode, "rate": rate, "skip": skip,
                "injected_objects": [s["object"] for s in plan],
                "guide_objects": [s["key_object"] for s in plan],
                "replaced_indices": [s["index"] for s in plan if s["action"] == "replace"],
                "inserted_indices": [s["index"] for s in plan if s["action"] == "insert"],
                "generator_model": gen.get("model"), "round": gen.get("round"),
                **({"dropped_sentences": gen["dropped_sentences"]} if "dropped_sentences" in gen else {}),
                **({"faithful_objects": [s["object"] for s in faithful]} if verify_complete else {}),
            },
        })
    for gen, fix in corrections:
        fixed = {step["index"]: next(completions) for step in fix["plan"] if step["action"] == "replace"}
        if correct_as != "response":
            sentence_rows = correction_sentence_rows(gen, fix, fixed, correct_as, objects_of)
            stats["correction_pairs"] += len(sentence_rows)
            rows += sentence_rows
            if mirror:
                mirrors = [m for row in sentence_rows
                           if (m := mirror_row(row, generations, verdicts, objects_of, seed)) is not None]
                stats["mirror_pairs"] = stats.get("mirror_pairs", 0) + len(mirrors)
                rows += mirrors
            continue
        chosen = realize(fix, fixed)
        chosen = chosen.strip()
        if not objects_of(chosen):  # nothing left to describe: the pair would only teach to stop
            stats["skipped_no_objects"] += 1
            continue
        plan = fix["plan"]
        stats["correction_pairs"] += 1
        rows.append({
            "image_id": gen["image_id"], "image_path": gen["image_path"], "prompt": gen["prompt"], "context": "",
            "chosen": chosen, "rejected": gen["response"], "method": "apasi",
            "meta": {
                "kind": "correction",
                "corrected_indices": [s["index"] for s in plan],
                "removed_objects": [o for s in plan for o in s["removed"]],
                "faithful_objects": [s["object"] for s in plan if s["action"] == "replace"],
                "dropped_indices": [s["index"] for s in plan if s["action"] == "drop"],
                "generator_model": gen.get("model"), "round": gen.get("round"),
            },
        })
    stats["pairs"] = len(rows)
    return rows, stats
