"""AMBER (Wang et al. 2023, "An LLM-free Multi-dimensional Benchmark for MLLMs Hallucination Evaluation",
junyangwang0410/AMBER), scored as its evaluator (``inference.py`` at commit 5e1fd52f8ea6) scores it.

Generative task (1,004 images, "Describe this image."). Per image the annotation lists ``truth`` (objects in the
image) and ``hallu`` (hallucination-prone objects that are absent); ``relation.json`` maps every word of AMBER's
vocabulary to its associated words ("person" -> people, man, woman, ...), and ``safe_words.txt`` lists words never
counted as hallucinations. A response's nouns (NN* tokens, lemmatized) that belong to the vocabulary are judged one
by one, in order:

1. a safe word: skipped (it still counts in CHAIR's denominator);
2. equal to a truth word or to one of its associated words: that truth word is covered; not a hallucination;
3. equal to a hallu word or one of its associated words: that hallu word is "mentioned" (Cog); then the first
   hallu word or associated word that is *similar* (see below) is mentioned too;
4. similar to a truth word or one of its associated words: that truth word is covered; not a hallucination;
5. else: a hallucination.

"First" is the order of one list per image: every truth word's associated words (truth words in order), then the
truth words themselves; a match marks the truth word that list entry belongs to (likewise for hallu). Two quirks
follow and are kept: a truth word listed twice is covered at most once, and when a truth word is also another truth
word's associated word ("railing" under "guardrail"), mentioning it covers the other one.

Similar = word-vector similarity > 0.8 (spaCy en_core_web_lg, ``Doc.similarity``; a text is always 1.0 to itself).
Three matchers stand in for it, the result naming the one that ran: ``spacy`` (the model installed), ``table`` (a
precomputed word-pair table built by ``python -m halludpo.metrics.amber build-similarity``: every similarity AMBER
computes is between two words of its own vocabulary, so the table reproduces the spaCy path exactly) and ``offline``
(identity only: AMBER's annotations carry no synonym lists, and relation.json's associations are already used by the
exact steps 2 and 3).

Metrics: CHAIR = hallucinated nouns / counted nouns; Cover = covered truth words / truth words; Hal = responses with
a hallucination / responses; Cog = mentioned hallu words / hallu words.

Discriminative task (14,216 yes/no questions: existence 4,924, all "no"; attribute 7,628 of kinds state, number,
action; relation 1,664). AMBER reads an answer by exact string: "Yes" or "No"; anything else is neither (never
correct). The positive class is "no": precision = correct "No" answers / "No" answers, recall = correct "No"
answers / questions whose truth is "no"; accuracy, precision, recall and F1 per dimension, per attribute kind and
overall. AMBER score = (1 - CHAIR + F1) / 2 with the overall discriminative F1 (the paper's definition, x100 there;
AMBER's code does not compute it).

All metrics here are fractions in [0, 1]; ``amber_printed`` repeats them as AMBER's evaluator prints them
(percentages to one decimal, every denominator started at 0.001 as its metrics.txt does, F1 from the rounded
precision and recall with its small constants). docs/evaluation.md "AMBER" describes the protocol and the
departures.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from halludpo.io import InputError, iter_jsonl, origin, read_json, sha256_file
from halludpo.metrics.text import (
    _TOKEN_RE,
    FUNCTION_WORDS,
    NLTK_INSTALL_COMMAND,
    _split_clitics,
    missing_nltk_resources,
)

AMBER_SOURCE = "junyangwang0410/AMBER inference.py at 5e1fd52f8ea69150c70f0ba15de70af3a907a1fd"
GENERATIVE_PROMPT = "Describe this image."
SIMILARITY_THRESHOLD = 0.8
SPACY_MODEL = "en_core_web_lg"
SPACY_INSTALL_COMMAND = f"pip install spacy && python -m spacy download {SPACY_MODEL}"

GENERATIVE_TYPE = "generative"
DIMENSIONS: tuple[str, ...] = ("existence", "attribute", "relation")
ATTRIBUTE_KINDS: tuple[str, ...] = ("state", "number", "action")
# annotation "type" -> (dimension, attribute kind). Relation questions carry two labels in the released file.
QUESTION_TYPES: dict[str, tuple[str, str | None]] = {
    "discriminative-hallucination": ("existence", None),
    "discriminative-attribute-state": ("attribute", "state"),
    "discriminative-attribute-number": ("attribute", "number"),
    "discriminative-attribute-action": ("attribute", "action"),
    "discriminative-relation": ("relation", None),
    "relation": ("relation", None),
}
# Discriminative groups in AMBER's print order: overall, the three dimensions, the three attribute kinds.
GROUPS: tuple[str, ...] = ("overall", *DIMENSIONS, *ATTRIBUTE_KINDS)

# AMBER's metrics.txt starts every denominator counter at 0.001 (every numerator at 0); the attribute dimension adds
# its three kinds' counters, so its denominators start at 0.003.
COUNTER_SEED = 0.001
# F1 = 2PR / (P + R + eps) on rounded percentages / 100: eps is 0.001 for existence, 0.0001 elsewhere.
F1_EPSILON = {"existence": 0.001}
F1_EPSILON_DEFAULT = 0.0001

ANSWER_RULES: tuple[str, ...] = ("amber", "first-word")
ANSWER_RULE_DESCRIPTIONS = {
    "amber": "amber (AMBER's inference.py): the answer must be exactly 'Yes' or 'No'; anything else is neither "
             "and never correct",
    "first-word": "first-word: the first whitespace-separated word, stripped of surrounding punctuation and "
                  "lower-cased, must be 'yes' or 'no'; anything else is neither and never correct",
}


# ---------------------------------------------------------------------------------------------------------------
# Data files


@dataclass(frozen=True)
class GenerativeTruth:
    id: int
    truth: tuple[str, ...]
    hallu: tuple[str, ...]


@dataclass(frozen=True)
class Question:
    id: int
    type: str
    dimension: str
    kind: str | None
    truth: str  # "yes" | "no"


@dataclass
class AmberData:
    """AMBER's annotation files, validated. ``sources`` = {name: {"path", "sha256"}} of the files read."""

    generative: dict[int, GenerativeTruth]
    questions: dict[int, Question]
    relation: dict[str, list[str]]
    safe_words: list[str]
    sources: dict[str, dict[str, str]] = field(default_factory=dict)

    @property
    def vocabulary(self) -> set[str]:
        """AMBER's hallucination-prone words: relation.json's keys and all their associated words."""
        return vocabulary_of(self.relation)

    def words(self) -> set[str]:
        """Every word a similarity is ever computed between: the vocabulary and the annotations' words."""
        words = self.vocabulary
        for item in self.generative.values():
            words.update(item.truth)
            words.update(item.hallu)
        return words


def vocabulary_of(relation: Mapping[str, Sequence[str]]) -> set[str]:
    return set(relation) | {word for words in relation.values() for word in words}


def _is_word_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(word, str) and word for word in value)


def load_annotations(path: str | os.PathLike) -> tuple[dict[int, GenerativeTruth], dict[int, Question]]:
    """AMBER's annotations.json: a JSON list of {"id", "type", "truth"[, "hallu"]}.

    generative: truth and hallu are lists of words; any other type (QUESTION_TYPES) has truth "yes" or "no".
    A malformed entry or a repeated id raises InputError naming the file, the entry's position and its id.
    """
    data = read_json(path)
    if not isinstance(data, list):
        raise InputError(f"{path}: expected a JSON list of annotation entries, got {type(data).__name__}")
    generative: dict[int, GenerativeTruth] = {}
    questions: dict[int, Question] = {}
    for position, entry in enumerate(data):
        where = f"{path}: entry {position}"
        if not isinstance(entry, dict):
            raise InputError(f"{where}: expected a JSON object, got {type(entry).__name__}")
        entry_id = entry.get("id")
        if not isinstance(entry_id, int) or isinstance(entry_id, bool):
            raise InputError(f"{where}: 'id' must be an integer, got {entry_id!r}")
        where = f"{where} (id {entry_id})"
        if entry_id in generative or entry_id in questions:
            raise InputError(f"{where}: id {entry_id} appears twice")
        kind = entry.get("type")
        if kind == GENERATIVE_TYPE:
            for key in ("truth", "hallu"):
                if not _is_word_list(entry.get(key)):
                    raise InputError(f"{where}: generative '{key}' must be a list of words, got {entry.get(key)!r}")
            generative[entry_id] = GenerativeTruth(entry_id, tuple(entry["truth"]), tuple(entry["hallu"]))
        elif kind in QUESTION_TYPES:
            if entry.get("truth") not in ("yes", "no"):
                raise InputError(f"{where}: a {kind} question's 'truth' must be 'yes' or 'no', "
                                 f"got {entry.get('truth')!r}")
            dimension, attribute_kind = QUESTION_TYPES[kind]
            questions[entry_id] = Question(entry_id, kind, dimension, attribute_kind, entry["truth"])
        else:
            raise InputError(f"{where}: unknown type {kind!r}; known: "
                             f"{', '.join([GENERATIVE_TYPE, *QUESTION_TYPES])}")
    return generative, questions


def load_relation(path: str | os.PathLike) -> dict[str, list[str]]:
    """AMBER's relation.json: {word: [associated words]} (the association table)."""
    data = read_json(path)
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object {{word: [associated words]}}, got {type(data).__name__}")
    for word, associated in data.items():
        if not word or not isinstance(associated, list) or not all(isinstance(w, str) and w for w in associated):
            raise InputError(f"{path}: entry {word!r}: expected a list of words, got {associated!r}")
    return data


def load_safe_words(path: str | os.PathLike) -> list[str]:
    """AMBER's safe_words.txt: one word per line (line ends removed; blank lines skipped)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise InputError(f"{path}: not UTF-8 text (byte {err.start}: {err.reason})") from None
    return [line for line in lines if line]


def _source(path: str | os.PathLike) -> dict[str, str]:
    return {"path": str(path), "sha256": sha256_file(path)}


def load_amber(data_dir: str | os.PathLike | None = None, *, annotations: str | os.PathLike | None = None,
               relation: str | os.PathLike | None = None,
               safe_words: str | os.PathLike | None = None) -> AmberData:
    """Read annotations.json, relation.json and safe_words.txt (from ``data_dir``, or each by its own path).

    Every generative truth and hallu word must be a key of relation.json (AMBER's evaluator looks each one up
    there): InputError naming the annotation entry and the word otherwise.
    """
    def pick(given, name):
        if given is not None:
            return Path(given)
        if data_dir is None:
            raise ValueError(f"load_amber: give data_dir or the path of {name}")
        return Path(data_dir) / name

    paths = {"annotations": pick(annotations, "annotations.json"), "relation": pick(relation, "relation.json"),
             "safe_words": pick(safe_words, "safe_words.txt")}
    generative, questions = load_annotations(paths["annotations"])
    table = load_relation(paths["relation"])
    for item in generative.values():
        for key, words in (("truth", item.truth), ("hallu", item.hallu)):
            for word in words:
                if word not in table:
                    raise InputError(f"{paths['annotations']}: id {item.id}: {key} word {word!r} is not a key of "
                                     f"{paths['relation']}")
    return AmberData(generative, questions, table, load_safe_words(paths["safe_words"]),
                     {name: _source(path) for name, path in paths.items()})


def _read_records(path: Path, kind: str) -> list[tuple[str, dict]]:
    """(where, object) of a JSON list file or a JSON Lines file (.jsonl)."""
    if path.suffix == ".jsonl":
        return [(f"{path}:{lineno}", row) for lineno, row in iter_jsonl(path)]
    data = read_json(path)
    if not isinstance(data, list):
        raise InputError(f"{path}: expected a JSON list of {kind}, got {type(data).__name__}")
    return [(f"{path}: entry {position}", entry) for position, entry in enumerate(data)]


def _check_fields(where: str, entry: Any, fields: Mapping[str, type]) -> None:
    if not isinstance(entry, dict):
        raise InputError(f"{where}: expected a JSON object, got {type(entry).__name__}")
    for key, kind in fields.items():
        value = entry.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise InputError(f"{where}: '{key}' must be {'an integer' if kind is int else 'a string'}, "
                             f"got {value!r}")


def load_responses(path: str | os.PathLike) -> list[dict]:
    """Responses in AMBER's format: a JSON list of {"id": int, "response": str} (or the same as JSON Lines).

    Each returned dict carries "origin" ("<file>: entry <n>" or "<file>:<line>"), so a later error names it.
    """
    path = Path(path)
    rows = []
    for where, entry in _read_records(path, "responses"):
        _check_fields(where, entry, {"id": int, "response": str})
        rows.append({**entry, "origin": where})
    return rows


def load_queries(path: str | os.PathLike) -> list[dict]:
    """An AMBER query file (query_generative.json, query_discriminative*.json): [{"id", "image", "query"}]."""
    path = Path(path)
    rows = []
    for where, entry in _read_records(path, "queries"):
        _check_fields(where, entry, {"id": int, "image": str, "query": str})
        rows.append(entry)
    return rows


# ---------------------------------------------------------------------------------------------------------------
# Nouns


class NounExtractor(Protocol):
    name: str

    def nouns(self, text: str) -> list[str]: ...


class NltkNouns:
    """AMBER's extraction: ``nltk.word_tokenize(text)`` (no lower-casing), ``nltk.pos_tag``, the tokens whose tag
    starts with NN, each lemmatized by WordNet as a noun (WordNet's index is lower-case, so a capitalised token
    stays as it is)."""

    name = "nltk-wordnet"

    def __init__(self) -> None:
        from nltk.stem import WordNetLemmatizer

        self._lemmatizer = WordNetLemmatizer()

    def nouns(self, text: str) -> list[str]:
        import nltk

        tagged = nltk.pos_tag(nltk.word_tokenize(text))
        return [self._lemmatizer.lemmatize(token) for token, tag in tagged if tag.startswith("NN")]


def offline_tokens(text: str) -> list[str]:
    """The offline CHAIR tokenizer (halludpo.metrics.text) without its lower-casing: AMBER keeps the case."""
    tokens: list[str] = []
    for token in _TOKEN_RE.findall(text.replace("\u2019", "'")):
        tokens.extend(_split_clitics(token))
    return tokens


class OfflineNouns:
    """Offline stand-in for :class:`NltkNouns`, with lemminflect and no POS tagger.

    Every token is a candidate noun except function words, clitics, numbers and punctuation; a lower-case token
    becomes lemminflect's first noun lemma, a token with a capital letter stays as it is (as WordNet leaves it).
    Differences: without a tagger, vocabulary words used as verbs or adjectives ("a light blue sky", "people
    walk") count as nouns; lemmas differ on some words ("men" -> "man", "leaves" -> "leave", where WordNet keeps
    "men" and gives "leaf").
    """

    name = "offline-lemminflect"

    def __init__(self) -> None:
        from lemminflect import getLemma

        self._get_lemma = getLemma

    def nouns(self, text: str) -> list[str]:
        nouns = []
        for token in offline_tokens(text):
            if token.lower() in FUNCTION_WORDS or "'" in token or not token[:1].isalpha():
                continue
            if token != token.lower():
                nouns.append(token)
                continue
            lemmas = self._get_lemma(token, upos="NOUN")
            nouns.append(lemmas[0] if lemmas else token)
        return nouns


NOUN_PIPELINES = ("auto", "nltk", "offline")


def get_noun_extractor(name: str = "auto") -> NounExtractor:
    """"auto": AMBER's NLTK path when NLTK's data is installed, else offline; "nltk" (RuntimeError naming the
    missing data when absent); "offline"."""
    if name == "offline":
        return OfflineNouns()
    if name == "auto":
        return OfflineNouns() if missing_nltk_resources() else NltkNouns()
    if name == "nltk":
        missing = missing_nltk_resources()
        if missing:
            raise RuntimeError(f"AMBER's 'nltk' noun pipeline needs NLTK data that is not installed: "
                               f"{', '.join(missing)}. Install it with `{NLTK_INSTALL_COMMAND}` (or use 'offline').")
        return NltkNouns()
    raise ValueError(f"Unknown AMBER noun pipeline {name!r}; valid names: {', '.join(NOUN_PIPELINES)}")


# ---------------------------------------------------------------------------------------------------------------
# Similar words


class Matcher(Protocol):
    name: str

    def similar(self, word: str, other: str) -> bool: ...

    def describe(self) -> dict[str, Any]: ...

    def check_words(self, words: Iterable[str]) -> None: ...


def spacy_available(model: str = SPACY_MODEL) -> bool:
    try:
        import spacy.util
    except ImportError:
        return False
    return bool(spacy.util.is_package(model))


class SpacyMatcher:
    """AMBER's comparison: ``nlp(word).similarity(nlp(other)) > threshold`` with spaCy's en_core_web_lg."""

    name = "spacy"

    def __init__(self, threshold: float = SIMILARITY_THRESHOLD, model: str = SPACY_MODEL, nlp: Any = None) -> None:
        if nlp is None:
            import spacy

            nlp = spacy.load(model)
        self.nlp, self.model, self.threshold = nlp, model, threshold
        self._docs: dict[str, Any] = {}
        self._similarity: dict[tuple[str, str], float] = {}

    def _doc(self, word: str):
        if word not in self._docs:
            self._docs[word] = self.nlp(word)
        return self._docs[word]

    def similarity(self, word: str, other: str) -> float:
        key = (word, other)
        if key not in self._similarity:
            self._similarity[key] = float(self._doc(word).similarity(self._doc(other)))
        return self._similarity[key]

    def similar(self, word: str, other: str) -> bool:
        return self.similarity(word, other) > self.threshold

    def check_words(self, words: Iterable[str]) -> None:
        pass

    def describe(self) -> dict[str, Any]:
        meta = getattr(self.nlp, "meta", {}) or {}
        return {"name": self.name, "threshold": self.threshold, "model": self.model,
                "model_version": meta.get("version"), "spacy_version": _version("spacy")}


TABLE_FORMAT = "halludpo-amber-similarity"


class TableMatcher:
    """spaCy's similarities read from a table built by ``build-similarity``: identical words are similar (spaCy
    gives a text 1.0 against itself); a pair absent from the table is below its ``min_similarity``."""

    name = "table"

    def __init__(self, path: str | os.PathLike, threshold: float = SIMILARITY_THRESHOLD) -> None:
        self.path, self.threshold = Path(path), threshold
        data = read_json(self.path)
        if not isinstance(data, dict) or data.get("format") != TABLE_FORMAT:
            raise InputError(f"{self.path}: not an AMBER similarity table (no \"format\": \"{TABLE_FORMAT}\"); "
                             f"build one with `python -m halludpo.metrics.amber build-similarity --out FILE`")
        try:
            self.min_similarity = float(data["min_similarity"])
            self.words = set(data["words"])
            self.pairs: dict[tuple[str, str], float] = {}
            for word, other, value in data["pairs"]:
                self.pairs[(word, other)] = self.pairs[(other, word)] = float(value)
        except (KeyError, TypeError, ValueError) as err:
            raise InputError(f"{self.path}: malformed similarity table ({type(err).__name__}: {err})") from None
        if threshold < self.min_similarity:
            raise ValueError(f"{self.path} holds only similarities >= {self.min_similarity}; threshold {threshold} "
                             f"needs a table built with --min-similarity {threshold} or lower")
        self.meta = {key: data.get(key) for key in ("model", "model_version", "spacy_version", "sources")}
        self.sha256 = sha256_file(self.path)

    def similarity(self, word: str, other: str) -> float:
        if word == other:
            return 1.0
        return self.pairs.get((word, other), float("-inf"))

    def similar(self, word: str, other: str) -> bool:
        return self.similarity(word, other) > self.threshold

    def check_words(self, words: Iterable[str]) -> None:
        """InputError when the table was built for another vocabulary (words it has never seen)."""
        missing = sorted(set(words) - self.words)
        if missing:
            shown = ", ".join(repr(word) for word in missing[:10]) + (" ..." if len(missing) > 10 else "")
            raise InputError(f"{self.path}: built for another vocabulary; {len(missing)} word(s) of AMBER's "
                             f"files are not in it: {shown}. Rebuild it from these files.")

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "threshold": self.threshold, "table": str(self.path), "table_sha256": self.sha256,
                "min_similarity": self.min_similarity, **self.meta}


class ExactMatcher:
    """Offline: a word is similar only to itself."""

    name = "offline-exact"

    def __init__(self, threshold: float = SIMILARITY_THRESHOLD) -> None:
        self.threshold = threshold  # recorded only: identity needs no threshold

    def similar(self, word: str, other: str) -> bool:
        return word == other

    def check_words(self, words: Iterable[str]) -> None:
        pass

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "threshold": None}


MATCHERS = ("auto", "spacy", "table", "offline")


def get_matcher(name: str = "auto", table: str | os.PathLike | None = None,
                threshold: float = SIMILARITY_THRESHOLD) -> Matcher:
    """"auto": spaCy when en_core_web_lg is installed, else the table when ``table`` names an existing file, else
    offline. "spacy" and "table" fail with a clear message when not available."""
    if name not in MATCHERS:
        raise ValueError(f"Unknown AMBER matcher {name!r}; valid names: {', '.join(MATCHERS)}")
    if name == "spacy" or (name == "auto" and spacy_available()):
        if not spacy_available():
            raise RuntimeError(f"The 'spacy' matcher needs spaCy and its {SPACY_MODEL} model: "
                               f"`{SPACY_INSTALL_COMMAND}` (or use a similarity table, or 'offline').")
        return SpacyMatcher(threshold)
    if name == "table" or (name == "auto" and table is not None and Path(table).is_file()):
        if table is None:
            raise ValueError("The 'table' matcher needs the table's path")
        return TableMatcher(table, threshold)
    return ExactMatcher(threshold)


def build_similarity_table(words: Iterable[str], nlp: Callable[[str], Any],
                           min_similarity: float = 0.5) -> list[list]:
    """[[word, other, similarity], ...] for every pair word < other of ``words`` whose spaCy similarity
    ``nlp(word).similarity(nlp(other))`` is >= ``min_similarity`` (AMBER's comparison; cosine, so symmetric)."""
    ordered = sorted(set(words))
    docs = {word: nlp(word) for word in ordered}
    pairs = []
    for i, word in enumerate(ordered):
        for other in ordered[i + 1:]:
            value = float(docs[word].similarity(docs[other]))
            if value >= min_similarity:
                pairs.append([word, other, value])
    return pairs


def write_similarity_table(out: str | os.PathLike, data: AmberData, nlp: Any, model: str = SPACY_MODEL,
                           min_similarity: float = 0.5) -> dict:
    """Build the table over ``data.words()`` and write it as JSON; returns what was written."""
    from halludpo.io import write_json

    words = sorted(data.words())
    meta = getattr(nlp, "meta", {}) or {}
    table = {
        "format": TABLE_FORMAT,
        "comparison": "spaCy nlp(word).similarity(nlp(other)), as AMBER's check_synonyms_word",
        "model": model, "model_version": meta.get("version"), "spacy_version": _version("spacy"),
        "min_similarity": min_similarity,
        "sources": {name: source["sha256"] for name, source in data.sources.items() if name != "safe_words"},
        "words": words,
        "pairs": build_similarity_table(words, nlp, min_similarity),
    }
    write_json(out, table)
    return table


def _version(package: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


# ---------------------------------------------------------------------------------------------------------------
# Generative task


def _fraction(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else 0.0


def _printed(numerator: float, denominator: float, seed: float = COUNTER_SEED) -> float:
    """A percentage as AMBER prints it: counters seeded with ``seed``, x100, one decimal."""
    return round(numerator / (denominator + seed) * 100, 1)


class AmberGenerativeScorer:
    """CHAIR, Cover, Hal and Cog of descriptions (see the module docstring for the judging order)."""

    def __init__(self, relation: Mapping[str, Sequence[str]], safe_words: Iterable[str], extractor: NounExtractor,
                 matcher: Matcher) -> None:
        self.relation = {word: list(associated) for word, associated in relation.items()}
        self.vocabulary = vocabulary_of(self.relation)
        self.safe_words = set(safe_words)
        self.extractor, self.matcher = extractor, matcher
        self.matcher.check_words(self.vocabulary)

    def nouns(self, text: str) -> list[str]:
        """The response's nouns that are in AMBER's vocabulary, in order, repeats kept."""
        return [noun for noun in self.extractor.nouns(text) if noun in self.vocabulary]

    def _candidates(self, words: Sequence[str]) -> list[tuple[str, int]]:
        """(word, index of the annotation word it stands for): every word's associated words, then the words."""
        associated = [(other, i) for i, word in enumerate(words) for other in self.relation[word]]
        return associated + [(word, i) for i, word in enumerate(words)]

    @staticmethod
    def _first(candidates: list[tuple[str, int]], test: Callable[[str], bool]) -> int | None:
        return next((owner for word, owner in candidates if test(word)), None)

    def score_item(self, item_id: int, response: str, truth: Sequence[str], hallu: Sequence[str]) -> dict[str, Any]:
        truth_candidates, hallu_candidates = self._candidates(truth), self._candidates(hallu)
        covered, mentioned = [False] * len(truth), [False] * len(hallu)
        nouns = self.nouns(response)
        judged = []
        for noun in nouns:
            if noun in self.safe_words:
                judged.append("safe")
                continue
            owner = self._first(truth_candidates, lambda word: word == noun)
            if owner is not None:
                covered[owner] = True
                judged.append("truth")
                continue
            for test in (lambda word: word == noun, lambda word: self.matcher.similar(noun, word)):
                owner = self._first(hallu_candidates, test)
                if owner is not None:
                    mentioned[owner] = True
            owner = self._first(truth_candidates, lambda word: self.matcher.similar(noun, word))
            if owner is not None:
                covered[owner] = True
                judged.append("similar")
                continue
            judged.append("hallucinated")
        return {
            "id": item_id,
            "nouns": nouns,
            "judged": judged,
            "hallucinated": [noun for noun, verdict in zip(nouns, judged) if verdict == "hallucinated"],
            "truth": list(truth),
            "truth_covered": covered,
            "hallu": list(hallu),
            "hallu_mentioned": mentioned,
        }

    def score(self, records: Iterable[Mapping[str, Any]], truths: Mapping[int, GenerativeTruth]) -> dict[str, Any]:
        """Metrics over records {"id", "response"}; each id must be in ``truths`` (else InputError naming the
        record's origin when known)."""
        items = []
        for record in records:
            item = annotated(truths, record, "a generative item")
            items.append(self.score_item(item.id, record["response"] or "", item.truth, item.hallu))
        return self.summarize(items)

    @staticmethod
    def summarize(items: list[dict[str, Any]]) -> dict[str, Any]:
        counts = {
            "n_responses": len(items),
            "n_nouns": sum(len(item["nouns"]) for item in items),
            "n_hallucinated_nouns": sum(len(item["hallucinated"]) for item in items),
            "n_responses_hallucinating": sum(bool(item["hallucinated"]) for item in items),
            "n_truth": sum(len(item["truth"]) for item in items),
            "n_truth_covered": sum(sum(item["truth_covered"]) for item in items),
            "n_hallu": sum(len(item["hallu"]) for item in items),
            "n_hallu_mentioned": sum(sum(item["hallu_mentioned"]) for item in items),
        }
        metrics = {
            "chair": _fraction(counts["n_hallucinated_nouns"], counts["n_nouns"]),
            "cover": _fraction(counts["n_truth_covered"], counts["n_truth"]),
            "hal": _fraction(counts["n_responses_hallucinating"], counts["n_responses"]),
            "cog": _fraction(counts["n_hallu_mentioned"], counts["n_hallu"]),
        }
        printed = {
            "CHAIR": _printed(counts["n_hallucinated_nouns"], counts["n_nouns"]),
            "Cover": _printed(counts["n_truth_covered"], counts["n_truth"]),
            "Hal": round(100 - (counts["n_responses"] - counts["n_responses_hallucinating"])
                         / (counts["n_responses"] + COUNTER_SEED) * 100, 1),
            "Cog": _printed(counts["n_hallu_mentioned"], counts["n_hallu"]),
        }
        return {"metrics": metrics | counts, "printed": printed, "items": items}


# ---------------------------------------------------------------------------------------------------------------
# Discriminative task


def parse_answer(response: str, rule: str = "amber") -> str | None:
    """"yes", "no" or None (neither) by ``rule`` (ANSWER_RULE_DESCRIPTIONS)."""
    if rule == "amber":
        return {"Yes": "yes", "No": "no"}.get(response)
    if rule == "first-word":
        words = response.split()
        word = words[0].strip(".,!?;:'\"()[]").lower() if words else ""
        return word if word in ("yes", "no") else None
    raise ValueError(f"Unknown AMBER answer rule {rule!r}; valid: {', '.join(ANSWER_RULES)}")


def _group_counts(items: list[dict[str, Any]]) -> dict[str, int]:
    return {
        "n": len(items),
        "correct": sum(item["correct"] for item in items),
        "truth_no": sum(item["truth"] == "no" for item in items),
        "answered_no": sum(item["answer"] == "no" for item in items),
        "correct_no": sum(item["truth"] == "no" and item["answer"] == "no" for item in items),
        "unparsed": sum(item["answer"] is None for item in items),
    }


def discriminative_metrics(counts: Mapping[str, int]) -> dict[str, float]:
    """Accuracy, and precision / recall / F1 with "no" as the positive class (0 where a denominator is 0)."""
    precision = _fraction(counts["correct_no"], counts["answered_no"])
    recall = _fraction(counts["correct_no"], counts["truth_no"])
    return {"accuracy": _fraction(counts["correct"], counts["n"]), "precision": precision, "recall": recall,
            "f1": _fraction(2 * precision * recall, precision + recall)}


def printed_discriminative(counts: Mapping[str, int], group: str) -> dict[str, float]:
    """One group's numbers as AMBER prints them (seeded counters, rounded percentages, F1 from the rounded
    precision and recall with its epsilon)."""
    seed = COUNTER_SEED * (len(ATTRIBUTE_KINDS) if group == "attribute" else 1)
    precision = _printed(counts["correct_no"], counts["answered_no"], seed)
    recall = _printed(counts["correct_no"], counts["truth_no"], seed)
    eps = F1_EPSILON.get(group, F1_EPSILON_DEFAULT)
    f1 = round(2 * (precision / 100) * (recall / 100) / ((precision / 100) + (recall / 100) + eps) * 100, 1)
    return {"Accuracy": _printed(counts["correct"], counts["n"], seed), "Precision": precision, "Recall": recall,
            "F1": f1}


def annotated(entries: Mapping[int, Any], record: Mapping[str, Any], what: str):
    """The entry of AMBER's annotations that a response record answers; InputError naming the record's origin
    (when known) if its id has none."""
    entry = entries.get(record["id"])
    if entry is None:
        where = record.get("origin") or origin(record) or "responses"
        raise InputError(f"{where}: id {record['id']!r} is not {what} of AMBER's annotations")
    return entry


def score_discriminative(records: Iterable[Mapping[str, Any]], questions: Mapping[int, Question],
                         rule: str = "amber") -> dict[str, Any]:
    """Per group (GROUPS present in the records) counts, fractions and AMBER's printed numbers."""
    items = []
    for record in records:
        question = annotated(questions, record, "a discriminative question")
        answer = parse_answer(record["response"] or "", rule)
        items.append({"id": question.id, "dimension": question.dimension, "kind": question.kind,
                      "truth": question.truth, "response": record["response"], "answer": answer,
                      "correct": answer == question.truth})
    members = {"overall": items}
    for dimension in DIMENSIONS:
        members[dimension] = [item for item in items if item["dimension"] == dimension]
    for kind in ATTRIBUTE_KINDS:
        members[kind] = [item for item in items if item["kind"] == kind]
    metrics, printed = {}, {}
    for group in GROUPS:
        if not members[group]:
            continue
        counts = _group_counts(members[group])
        metrics[group] = discriminative_metrics(counts) | counts
        printed[group] = printed_discriminative(counts, group)
    return {"metrics": metrics, "printed": printed, "items": items}


# ---------------------------------------------------------------------------------------------------------------
# Both tasks


def amber_score(chair: float, f1: float) -> float:
    """AMBER score = (1 - CHAIR + F1) / 2 (fractions; the paper's (100 - CHAIR + F1) / 2 on percentages)."""
    return (1 - chair + f1) / 2


def score_amber(records: Iterable[Mapping[str, Any]], data: AmberData, *, nouns: str | NounExtractor = "auto",
                matcher: str | Matcher = "auto", similarity_table: str | os.PathLike | None = None,
                threshold: float = SIMILARITY_THRESHOLD, answer_rule: str = "amber") -> dict[str, Any]:
    """Score AMBER responses {"id", "response"} (generative and discriminative ids in any mix).

    Returns {"benchmark": "amber", "metrics": {"generative", "discriminative", "amber_score"}, "amber_printed",
    "protocol", "items"}. An id that is not in the annotations, or one given twice, raises InputError naming the
    record. The AMBER score needs generative responses and questions of all three dimensions (else None).
    """
    extractor = get_noun_extractor(nouns) if isinstance(nouns, str) else nouns
    if isinstance(matcher, str):
        matcher = get_matcher(matcher, similarity_table, threshold)
    matcher.check_words(data.words())
    generative_records, question_records, seen = [], [], {}
    for record in records:
        where = record.get("origin") or origin(record) or "responses"
        record_id = record.get("id")
        if record_id in seen:
            raise InputError(f"{where}: id {record_id!r} was already answered ({seen[record_id]})")
        seen[record_id] = where
        if record_id in data.generative:
            generative_records.append(record)
        elif record_id in data.questions:
            question_records.append(record)
        else:
            raise InputError(f"{where}: id {record_id!r} is not in AMBER's annotations "
                             f"({data.sources.get('annotations', {}).get('path', 'annotations.json')})")
    metrics: dict[str, Any] = {"generative": None, "discriminative": None, "amber_score": None}
    printed: dict[str, Any] = {}
    items: dict[str, list] = {"generative": [], "discriminative": []}
    if generative_records:
        scorer = AmberGenerativeScorer(data.relation, data.safe_words, extractor, matcher)
        generative = scorer.score(generative_records, data.generative)
        metrics["generative"], printed["generative"], items["generative"] = (
            generative["metrics"], generative["printed"], generative["items"])
    if question_records:
        discriminative = score_discriminative(question_records, data.questions, answer_rule)
        metrics["discriminative"], printed["discriminative"], items["discriminative"] = (
            discriminative["metrics"], discriminative["printed"], discriminative["items"])
    complete = metrics["discriminative"] is not None and all(d in metrics["discriminative"] for d in DIMENSIONS)
    if metrics["generative"] is not None and complete:
        metrics["amber_score"] = amber_score(metrics["generative"]["chair"],
                                             metrics["discriminative"]["overall"]["f1"])
        printed["AMBER"] = (100 - printed["generative"]["CHAIR"] + printed["discriminative"]["overall"]["F1"]) / 2
    answered = {"generative": f"{len(generative_records)} of {len(data.generative)}"}
    for dimension in DIMENSIONS:
        total = sum(question.dimension == dimension for question in data.questions.values())
        done = sum(data.questions[record["id"]].dimension == dimension for record in question_records)
        answered[dimension] = f"{done} of {total}"
    protocol = {
        "source": AMBER_SOURCE,
        "noun_pipeline": extractor.name,
        "matcher": matcher.describe(),
        "answer_rule": ANSWER_RULE_DESCRIPTIONS.get(answer_rule, answer_rule),
        "answered": answered,
        "unparsed_answers": sum(item["answer"] is None for item in items["discriminative"]),
        "amber_score": "(1 - CHAIR + overall discriminative F1) / 2; null unless generative responses and "
                       "questions of all three dimensions were scored",
        "files": data.sources,
    }
    return {"benchmark": "amber", "metrics": metrics, "amber_printed": printed, "protocol": protocol,
            "items": items}


HEADLINE = ("chair", "cover", "hal", "cog", "accuracy", "f1", "amber_score")


def amber_headline(result: Mapping[str, Any]) -> dict[str, float | None]:
    """score_amber's headline numbers (fractions), HEADLINE's keys: generative CHAIR, Cover, Hal, Cog;
    discriminative accuracy and F1 over all questions; the AMBER score. None where a task was not scored."""
    metrics = result["metrics"]
    generative = metrics["generative"] or {}
    overall = (metrics["discriminative"] or {}).get("overall", {})
    return {"chair": generative.get("chair"), "cover": generative.get("cover"), "hal": generative.get("hal"),
            "cog": generative.get("cog"), "accuracy": overall.get("accuracy"), "f1": overall.get("f1"),
            "amber_score": metrics["amber_score"]}


# ---------------------------------------------------------------------------------------------------------------
# Command line


DEFAULT_DATA_DIR = "results/downloads/amber/data"  # where `download` puts AMBER's data/ files


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m halludpo.metrics.amber", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser(
        "build-similarity",
        help="precompute spaCy's word similarities over AMBER's vocabulary (needs spaCy and en_core_web_lg)")
    build.add_argument("--out", required=True, help="the table to write (JSON)")
    build.add_argument("--data-dir", default=os.environ.get("HALLUDPO_AMBER_DIR", DEFAULT_DATA_DIR),
                       help="folder with annotations.json, relation.json and safe_words.txt (default: "
                            f"$HALLUDPO_AMBER_DIR, else {DEFAULT_DATA_DIR})")
    build.add_argument("--model", default=SPACY_MODEL)
    build.add_argument("--min-similarity", type=float, default=0.5,
                       help="keep pairs at least this similar (a scoring threshold must not be lower)")
    args = parser.parse_args(argv)
    try:
        data = load_amber(args.data_dir)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if not spacy_available(args.model):
        print(f"error: spaCy and its {args.model} model are needed: `pip install spacy && python -m spacy download "
              f"{args.model}`", file=sys.stderr)
        return 1
    import spacy

    table = write_similarity_table(args.out, data, spacy.load(args.model), args.model, args.min_similarity)
    print(f"{args.out}: {len(table['words'])} words, {len(table['pairs'])} pairs with similarity >= "
          f"{args.min_similarity} ({args.model} {table['model_version']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
