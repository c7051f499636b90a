"""SENTINEL: sentence-level preference pairs from the model's own sampled sentences, verified object by object.

For each image the description grows sentence by sentence. At each step the model samples n one-sentence
continuations of (image, question, context); every object a sentence mentions is checked by TWO verifiers
(factual when both see it, hallucinated when both do not, uncertain when they disagree); a factual sentence that
shares an object with the context becomes a preferred continuation y_win, a hallucinated sentence of the same step a
dispreferred one y_lose. The context then grows by one sentence (a factual one with new objects if possible) and
the next step starts, until more than half of the samples are empty (the model wants to stop) or a step cap.

Everything here is pure: the model (sample_fn) and the verifiers (decide_fn) are functions passed in, and choices
are drawn from a random.Random seeded per item from (seed, image_id), so results do not depend on batching.
Objects are found with the CHAIR text pipeline of halludpo.metrics (synonyms, compounds, lemmas); the original
also adds a scene-graph parser's concrete nouns, which a closed vocabulary makes unnecessary here.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from halludpo.metrics.chair import ChairScorer

SENTENCE_ENDS = ".!?"
CONTEXT_SEPARATOR = " "

FACTUAL, HALLUCINATED, UNCERTAIN, NO_OBJECTS = "factual", "hallucinated", "uncertain", "no_objects"

# How the context grew at a step, in the order the rule tries them.
GROW_NEW_OBJECTS, GROW_COHERENT, GROW_ANY = "factual_new_objects", "factual_coherent", "any"
WIN_COHERENT, WIN_NEW_OBJECTS, WIN_FACTUAL = "context_coherent", "new_objects", "factual"
WIN_RULES = (WIN_COHERENT, WIN_NEW_OBJECTS, WIN_FACTUAL)
# Stop pairs (extension): where the answer should end.
STOP_OVER_HALLUCINATED, CONTINUE_OVER_STOP = "stop_over_hallucinated", "continue_over_stop"

# sample_fn(batch of (item, context)) -> n raw one-sentence continuations per entry.
SampleFn = Callable[[list[tuple[Any, str]]], list[list[str]]]
# decide_fn(batch of (item, objects)) -> per entry {object: (verifier A says present, verifier B says present)}.
DecideFn = Callable[[list[tuple[Any, list[str]]]], list[dict[str, tuple[bool, bool]]]]


# ---------------------------------------------------------------------------------------------------------------
# Sampling control


def cut_at_sentence_end(text: str) -> str:
    """text up to and including its first '.', '!' or '?' (the whole text when there is none): what one sampled
    continuation keeps when generation ran past the first sentence end."""
    ends = [i for i in (text.find(c) for c in SENTENCE_ENDS) if i >= 0]
    return text[: min(ends) + 1] if ends else text


def count_empty(samples: Iterable[str]) -> int:
    """Samples that are empty after stripping whitespace (the model emitted EOS at once)."""
    return sum(not s.strip() for s in samples)


def is_finished(samples: Sequence[str], n: int) -> bool:
    """Finished when MORE than half of the n samples are empty: 2 * n_empty > n (exactly half is not finished)."""
    return 2 * count_empty(samples) > n


def clean_samples(samples: Iterable[str]) -> list[str]:
    """Strip each sample, drop the empty ones and the duplicates (first occurrence kept, order kept)."""
    seen: set[str] = set()
    kept = []
    for sample in samples:
        text = sample.strip()
        if text and text not in seen:
            seen.add(text)
            kept.append(text)
    return kept


def append_sentence(context: str, sentence: str) -> str:
    """context + CONTEXT_SEPARATOR + sentence (just the sentence when the context is empty)."""
    return f"{context}{CONTEXT_SEPARATOR}{sentence}" if context else sentence


# ---------------------------------------------------------------------------------------------------------------
# Objects of a sentence (CHAIR pipeline)


def sentence_objects(scorer: ChairScorer, sentence: str) -> list[str]:
    """Distinct CHAIR categories mentioned in the sentence, in order of first mention. Build the scorer as the
    evaluation does (halludpo.evaluate.object_scorer: same vocabulary, compounds and text pipeline), so pairs and
    CHAIR count objects identically."""
    return list(dict.fromkeys(scorer.categories(sentence)))


def object_extractor(scorer: ChairScorer) -> Callable[[str], list[str]]:
    """sentence -> sentence_objects(scorer, sentence), the objects_of argument of sample_contexts."""
    return lambda sentence: sentence_objects(scorer, sentence)


# ---------------------------------------------------------------------------------------------------------------
# Verification and labels


def cross_check(present_a: bool, present_b: bool) -> str:
    """Two verifiers' decisions -> verdict: both yes -> factual; both no -> hallucinated; disagree -> uncertain."""
    if present_a and present_b:
        return FACTUAL
    if not present_a and not present_b:
        return HALLUCINATED
    return UNCERTAIN


def sentence_label(verdicts: Sequence[str]) -> str:
    """Verdicts of a sentence's objects -> label:
    hallucinated = >= 1 hallucinated object;
    factual      = >= 1 object, none hallucinated, none uncertain;
    uncertain    = >= 1 uncertain object, none hallucinated;
    no_objects   = no object. Only factual and hallucinated sentences enter pairs."""
    if not verdicts:
        return NO_OBJECTS
    if HALLUCINATED in verdicts:
        return HALLUCINATED
    if all(v == FACTUAL for v in verdicts):
        return FACTUAL
    return UNCERTAIN


def judge_sentence(text: str, objects: Sequence[str], decisions: Mapping[str, tuple[bool, bool]]) -> dict:
    """{"text", "objects", "decisions" {object: [a, b]}, "verdicts" {object: verdict}, "label"} of one sentence."""
    verdicts = {o: cross_check(*decisions[o]) for o in objects}
    return {"text": text, "objects": list(objects), "decisions": {o: list(decisions[o]) for o in objects},
            "verdicts": verdicts, "label": sentence_label(list(verdicts.values()))}


# ---------------------------------------------------------------------------------------------------------------
# Pairs and context growth


def is_context_coherent(objects: Iterable[str], context_objects: Iterable[str]) -> bool:
    """Context-coherent = shares >= 1 object with the context."""
    return bool(set(objects) & set(context_objects))


def introduces_new_objects(objects: Iterable[str], context_objects: Iterable[str]) -> bool:
    """Has >= 1 object the context does not mention."""
    return bool(set(objects) - set(context_objects))


def win_indices(sentences: Sequence[dict], context_objects: Iterable[str], rule: str = WIN_COHERENT) -> list[int]:
    """y_win candidates, in sample order: factual sentences that are context-coherent (rule "context_coherent",
    the paper's), that introduce an object the context does not mention ("new_objects", an extension for data
    whose sentences name one object each, where coherent means repeating one), or any factual one ("factual")."""
    if rule not in WIN_RULES:
        raise ValueError(f"win rule {rule!r}; valid: {', '.join(WIN_RULES)}")
    context_objects = set(context_objects)
    keep = {WIN_COHERENT: is_context_coherent, WIN_NEW_OBJECTS: introduces_new_objects,
            WIN_FACTUAL: lambda objects, context: True}[rule]
    return [i for i, s in enumerate(sentences) if s["label"] == FACTUAL and keep(s["objects"], context_objects)]


def lose_indices(sentences: Sequence[dict]) -> list[int]:
    """y_lose candidates, in sample order: hallucinated sentences."""
    return [i for i, s in enumerate(sentences) if s["label"] == HALLUCINATED]


def step_pairs(sentences: Sequence[dict], context_objects: Iterable[str], win_rule: str = WIN_COHERENT
               ) -> list[tuple[int, int]]:
    """(win, lose) index pairs of one step: zip of win_indices and lose_indices, min(#win, #lose) pairs. With the
    paper's rule an empty context has no objects, so the first sentence never yields a pair."""
    return list(zip(win_indices(sentences, context_objects, win_rule), lose_indices(sentences)))


def choose_next_sentence(sentences: Sequence[dict], context_objects: Iterable[str],
                         rng: random.Random) -> tuple[int, str] | None:
    """(index, rule) of the sentence appended to the context; rng.choice within the first non-empty group of:
    1. factual sentences that introduce new objects        (rule "factual_new_objects")
    2. factual context-coherent sentences                  (rule "factual_coherent")
    3. any sentence                                        (rule "any")
    None when there is no sentence at all."""
    context_objects = set(context_objects)
    factual = [i for i, s in enumerate(sentences) if s["label"] == FACTUAL]
    groups = [
        (GROW_NEW_OBJECTS, [i for i in factual if introduces_new_objects(sentences[i]["objects"], context_objects)]),
        (GROW_COHERENT, [i for i in factual if is_context_coherent(sentences[i]["objects"], context_objects)]),
        (GROW_ANY, list(range(len(sentences)))),
    ]
    for rule, candidates in groups:
        if candidates:
            return rng.choice(candidates), rule
    return None


# ---------------------------------------------------------------------------------------------------------------
# The sentence-by-sentence driver


def _batched(fn: Callable[[list], list], inputs: list, batch_size: int | None) -> list:
    """fn over consecutive chunks of at most batch_size inputs (all at once when None); outputs concatenated."""
    size = batch_size or max(len(inputs), 1)
    outputs: list = []
    for start in range(0, len(inputs), size):
        chunk = inputs[start: start + size]
        result = list(fn(chunk))
        if len(result) != len(chunk):
            raise ValueError(f"{getattr(fn, '__name__', fn)} returned {len(result)} results for {len(chunk)} inputs")
        outputs.extend(result)
    return outputs


def item_rngs(items: Sequence[Mapping], seed: int) -> list[random.Random]:
    """One random.Random per item, seeded with f"{seed}/{image_id}/{k}" (k = how many earlier items had that
    image_id), as the APASI pairs are: independent of batching and of the other items."""
    seen: Counter = Counter()
    rngs = []
    for item in items:
        rngs.append(random.Random(f"{seed}/{item['image_id']}/{seen[item['image_id']]}"))
        seen[item["image_id"]] += 1
    return rngs


class _Trajectory:
    """The growing description of one item."""

    def __init__(self, item: Mapping, rng: random.Random) -> None:
        self.item, self.rng = item, rng
        self.context, self.context_objects = "", []
        self.steps: list[dict] = []
        self.final: dict | None = None  # the samples of the step where the model stopped (nothing appended)
        self.decisions: dict[str, tuple[bool, bool]] = {}  # verifiers are deterministic per image: ask once
        self.stopped: str | None = None

    def record(self) -> dict:
        return {"item": dict(self.item), "steps": self.steps, "final": self.final,
                "stopped": self.stopped or "max_steps", "description": self.context,
                "decisions": {o: list(d) for o, d in self.decisions.items()}}


def _decide_new_objects(decide_fn: DecideFn, trajectories: list[_Trajectory], objects: list[list[list[str]]],
                        batch_size: int | None) -> None:
    """Ask decide_fn about the objects (per trajectory, per sentence) each trajectory has not had decided yet;
    cache the answers."""
    asks = []
    for traj, per_sentence in zip(trajectories, objects):
        new = [o for o in dict.fromkeys(o for objs in per_sentence for o in objs) if o not in traj.decisions]
        if new:
            asks.append((traj, new))
    answers = _batched(decide_fn, [(traj.item, new) for traj, new in asks], batch_size) if asks else []
    for (traj, new), answer in zip(asks, answers):
        for o in new:
            a, b = answer[o]
            traj.decisions[o] = (bool(a), bool(b))


def _step_record(traj: _Trajectory, step: int, samples: list[str], objects: list[list[str]], n: int,
                 n_empty: int) -> dict:
    return {"step": step, "context": traj.context, "context_objects": list(traj.context_objects), "n_samples": n,
            "n_empty": n_empty,
            "sentences": [judge_sentence(text, objs, traj.decisions) for text, objs in zip(samples, objects)]}


def _grow(traj: _Trajectory, step: int, samples: list[str], objects: list[list[str]], n: int, n_empty: int
          ) -> None:
    """Judge the step's sentences, record the step, append the chosen sentence to the context."""
    record = _step_record(traj, step, samples, objects, n, n_empty)
    sentences = record["sentences"]
    index, rule = choose_next_sentence(sentences, traj.context_objects, traj.rng)
    appended = sentences[index]
    traj.steps.append(record | {"appended": index, "growth": rule})
    traj.context = append_sentence(traj.context, appended["text"])
    traj.context_objects = list(dict.fromkeys([*traj.context_objects, *appended["objects"]]))


def sample_contexts(sample_fn: SampleFn, items: Sequence[Mapping], n: int, max_steps: int,
                    objects_of: Callable[[str], list[str]], decide_fn: DecideFn, seed: int,
                    batch_size: int | None = None, all_objects: Sequence[str] | None = None) -> list[dict]:
    """Grow every item's description sentence by sentence; returns one trajectory per item, in item order:
    {"item", "steps": [step record], "final": record of the finishing step or None, "stopped": "finished" |
    "max_steps", "description": final context, "decisions": {object: [A present, B present]}}.

    Each step, for all still-active items together (chunks of batch_size):
      samples = sample_fn([(item, context), ...])[i]  (exactly n raw continuations, one sentence each);
      sentences = clean_samples(samples), objects = objects_of(sentence), each new object decided by decide_fn
      (two verifiers), labelled (judge_sentence);
      is_finished(samples, n) -> the item stops (its step is kept as "final", nothing appended);
      else choose_next_sentence appends one sentence to the context.
    An item samples at most max_steps times. Items are mappings with at least "image_id" (the rng key).
    all_objects: decided for every item before the first step (what stop_pairs needs to know what is left).
    Step record: {"step", "context", "context_objects", "n_samples", "n_empty", "sentences": [judge_sentence
    dicts], "appended": index into sentences, "growth": the rule that chose it} (no "appended"/"growth" in final).
    """
    trajectories = [_Trajectory(item, rng) for item, rng in zip(items, item_rngs(items, seed))]
    if all_objects:
        _decide_new_objects(decide_fn, trajectories, [[list(all_objects)]] * len(trajectories), batch_size)
    for step in range(max_steps):
        active = [t for t in trajectories if t.stopped is None]
        if not active:
            break
        raw = _batched(sample_fn, [(t.item, t.context) for t in active], batch_size)
        for samples in raw:
            if len(samples) != n:
                raise ValueError(f"sample_fn returned {len(samples)} samples, expected n={n}")
        kept = [clean_samples(samples) for samples in raw]
        objects = [[objects_of(text) for text in texts] for texts in kept]
        _decide_new_objects(decide_fn, active, objects, batch_size)
        for traj, samples, texts, objs in zip(active, raw, kept, objects):
            if is_finished(samples, n):
                traj.stopped = "finished"
                traj.final = _step_record(traj, step, texts, objs, n, count_empty(samples))
            else:
                _grow(traj, step, texts, objs, n, count_empty(samples))
    return [t.record() for t in trajectories]


# ---------------------------------------------------------------------------------------------------------------
# Pairs (pairs.jsonl rows)


def pair_row(item: Mapping, step: dict, win: int, lose: int, is_last_sent: bool, win_rule: str = WIN_COHERENT
             ) -> dict:
    """One pairs.jsonl row (docs/methods.md "Data contracts"): prompt = the question, context = the description so far,
    chosen = y_win, rejected = y_lose; the training response is context + CONTEXT_SEPARATOR + chosen/rejected."""
    chosen, rejected = step["sentences"][win], step["sentences"][lose]
    hallucinated = [o for o, v in rejected["verdicts"].items() if v == HALLUCINATED]
    return {
        "image_id": item["image_id"], "image_path": item["image_path"], "prompt": item["prompt"],
        "context": step["context"], "chosen": chosen["text"], "rejected": rejected["text"], "method": "sentinel",
        "meta": {
            "step": step["step"], "type": win_rule, "is_last_sent": is_last_sent,
            "context_objects": step["context_objects"],
            "chosen_objects": chosen["objects"], "chosen_verdicts": chosen["verdicts"],
            "rejected_objects": rejected["objects"], "rejected_verdicts": rejected["verdicts"],
            "rejected_hallucinated_objects": hallucinated,
            "labels": [s["label"] for s in step["sentences"]], "n_samples": step["n_samples"],
            "generator_model": item.get("model"), "round": item.get("round"),
        },
    }


def objects_left(decisions: Mapping[str, Sequence[bool]], context_objects: Iterable[str]
                 ) -> tuple[list[str], list[str]]:
    """(seen, maybe): objects the context does not mention that both verifiers see / that at least one sees."""
    said = set(context_objects)
    seen = [o for o, (a, b) in decisions.items() if a and b and o not in said]
    maybe = [o for o, (a, b) in decisions.items() if (a or b) and o not in said]
    return seen, maybe


def stop_pair(step: Mapping, decisions: Mapping[str, Sequence[bool]]) -> tuple[str, int] | None:
    """(kind, sentence index) of the step's stop pair, or None (extension, method.stop_pairs; not in SENTINEL).
    Where the description should end is a decision the sentence pairs never teach: end-of-turn is not scored
    after a sentence that continues the answer, so stopping is learnt only from the model's own habits.
    - STOP_OVER_HALLUCINATED: neither verifier sees an object the context has not named, and a sample names a
      hallucinated one: chosen = end the answer here, rejected = that sentence (the first in sample order).
    - CONTINUE_OVER_STOP: both verifiers see an object the context has not named, some samples stopped
      (n_empty >= 1), and a factual sample names such an object: chosen = that sentence, rejected = stop here.
    Needs decisions about every object of the vocabulary (sample_contexts' all_objects)."""
    seen, maybe = objects_left(decisions, step["context_objects"])
    sentences = step["sentences"]
    if not maybe:
        lose = lose_indices(sentences)
        return (STOP_OVER_HALLUCINATED, lose[0]) if lose else None
    if seen and step.get("n_empty", 0) >= 1:
        win = [i for i, s in enumerate(sentences) if s["label"] == FACTUAL and set(s["objects"]) & set(seen)]
        return (CONTINUE_OVER_STOP, win[0]) if win else None
    return None


def stop_pair_row(item: Mapping, step: dict, kind: str, index: int) -> dict:
    """A stop pair as a pairs.jsonl row: the empty response ("") is the end of the answer after the context
    (halludpo.logprobs scores only its end-of-turn); the sentence is scored without one (it continues)."""
    sentence = step["sentences"][index]
    chosen, rejected = ("", sentence) if kind == STOP_OVER_HALLUCINATED else (sentence, "")
    chosen_text, rejected_text = (s["text"] if s else "" for s in (chosen, rejected))
    return {
        "image_id": item["image_id"], "image_path": item["image_path"], "prompt": item["prompt"],
        "context": step["context"], "chosen": chosen_text, "rejected": rejected_text, "method": "sentinel",
        "meta": {
            "step": step["step"], "type": kind, "is_last_sent": False, "context_objects": step["context_objects"],
            "chosen_objects": chosen["objects"] if chosen else [],
            "rejected_objects": rejected["objects"] if rejected else [],
            "rejected_hallucinated_objects": [o for o, v in rejected["verdicts"].items() if v == HALLUCINATED]
            if rejected else [],
            "labels": [s["label"] for s in step["sentences"]], "n_samples": step["n_samples"],
            "n_empty": step.get("n_empty"), "generator_model": item.get("model"), "round": item.get("round"),
        },
    }


def build_sentinel_pairs(trajectories: Sequence[dict], win_rule: str = WIN_COHERENT, stop_pairs: bool = False
                         ) -> tuple[list[dict], dict]:
    """pairs.jsonl rows from sample_contexts trajectories, and counts. Every step contributes step_pairs;
    meta.is_last_sent = the step is the last one of a description that finished (not cut by max_steps).
    stop_pairs: every step, the finishing one included, may also give one stop_pair (the trajectories must
    hold decisions about every object: sample_contexts' all_objects).
    Stats: images, steps, finished, capped, sentences per label, growth per rule, pairs, steps_with_pairs,
    stop_pairs per kind."""
    rows: list[dict] = []
    labels: Counter = Counter()
    growth: Counter = Counter()
    stops: Counter = Counter()
    steps_with_pairs = 0
    for traj in trajectories:
        last = len(traj["steps"]) - 1
        for k, step in enumerate(traj["steps"]):
            labels.update(s["label"] for s in step["sentences"])
            growth[step["growth"]] += 1
            pairs = step_pairs(step["sentences"], step["context_objects"], win_rule)
            steps_with_pairs += bool(pairs)
            is_last = k == last and traj["stopped"] == "finished"
            rows.extend(pair_row(traj["item"], step, win, lose, is_last, win_rule) for win, lose in pairs)
        if stop_pairs:
            for step in [*traj["steps"], *([traj["final"]] if traj.get("final") else [])]:
                if found := stop_pair(step, traj["decisions"]):
                    stops[found[0]] += 1
                    rows.append(stop_pair_row(traj["item"], step, *found))
    stats = {"images": len(trajectories), "steps": sum(len(t["steps"]) for t in trajectories),
             "finished": sum(t["stopped"] == "finished" for t in trajectories),
             "capped": sum(t["stopped"] == "max_steps" for t in trajectories),
             "sentences": {label: labels[label] for label in (FACTUAL, HALLUCINATED, UNCERTAIN, NO_OBJECTS)},
             "growth": {rule: growth[rule] for rule in (GROW_NEW_OBJECTS, GROW_COHERENT, GROW_ANY)},
             "pairs": len(rows), "steps_with_pairs": steps_with_pairs}
    if stop_pairs:
        stats["stop_pairs"] = {kind: stops[kind] for kind in (STOP_OVER_HALLUCINATED, CONTINUE_OVER_STOP)}
    return rows, stats
