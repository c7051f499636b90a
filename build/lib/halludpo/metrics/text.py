"""Text pipelines: caption -> list of lowercase lemmatized words.

CHAIR depends on how a caption is split into words and lemmatized. The exact
OPERA variant needs NLTK data (tokenizer, POS tagger, WordNet) that may be
absent; the offline variant needs only the ``lemminflect`` package. Every
result should record ``pipeline.name`` so numbers from the two are never mixed.
"""

from __future__ import annotations

import re
from typing import Protocol


# A '.' that has no digit on either side ends a sentence; the whitespace after it belongs to that sentence.
_SENTENCE_END = re.compile(r"(?<!\d)\.(?!\d)\s*")


def split_sentences(text: str) -> list[str]:
    """Split after every '.' that has no digit on either side ("3.5" stays whole; note "in 2020. Then" does not
    split either, the '.' being next to a digit). Each piece keeps its '.' and the whitespace after it, so
    ``"".join(pieces) == text``; text after the last '.' is a final piece; no empty piece is returned."""
    pieces, start = [], 0
    for match in _SENTENCE_END.finditer(text):
        pieces.append(text[start:match.end()])
        start = match.end()
    if start < len(text):
        pieces.append(text[start:])
    return pieces


class TextPipeline(Protocol):
    """Turns a caption into lowercase lemmatized words."""

    name: str

    def words(self, text: str) -> list[str]: ...


# (resource label, nltk.data paths that satisfy it, in order of preference)
_NLTK_RESOURCES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("punkt_tab", ("tokenizers/punkt_tab", "tokenizers/punkt")),
    (
        "averaged_perceptron_tagger_eng",
        ("taggers/averaged_perceptron_tagger_eng", "taggers/averaged_perceptron_tagger"),
    ),
    ("wordnet", ("corpora/wordnet",)),
)

NLTK_INSTALL_COMMAND = (
    "python -m nltk.downloader punkt_tab averaged_perceptron_tagger_eng wordnet"
)


def _nltk_resource_found(paths: tuple[str, ...]) -> bool:
    import nltk

    for path in paths:
        try:
            nltk.data.find(path)  # also finds the zipped form; never downloads
        except LookupError:
            continue
        return True
    return False


def missing_nltk_resources() -> list[str]:
    """Names of the NLTK data packages the exact pipeline needs but cannot find."""
    try:
        import nltk  # noqa: F401
    except ImportError:
        return ["nltk (the Python package)"]
    return [label for label, paths in _NLTK_RESOURCES if not _nltk_resource_found(paths)]


# First letter of a Penn Treebank tag -> WordNet POS (the values of
# wordnet.ADJ/VERB/NOUN/ADV, written out so the corpus is not loaded here).
_WORDNET_POS = {"J": "a", "V": "v", "N": "n", "R": "r"}


def _wordnet_pos(treebank_tag: str) -> str:
    """Penn Treebank tag -> WordNet POS: J/V/N/R -> adj/verb/noun/adv, else noun."""
    return _WORDNET_POS.get(treebank_tag[:1], "n")


class NltkTextPipeline:
    """The exact OPERA CHAIR path.

    ``nltk.word_tokenize(text.lower())`` -> ``nltk.pos_tag`` -> WordNetLemmatizer
    with the tag's WordNet POS (J/V/N/R, anything else lemmatized as a noun).
    """

    name = "nltk-wordnet"

    def __init__(self) -> None:
        from nltk.stem import WordNetLemmatizer

        self._lemmatizer = WordNetLemmatizer()

    @staticmethod
    def available() -> bool:
        """True when nltk and its punkt, tagger and wordnet data are installed."""
        return not missing_nltk_resources()

    def words(self, text: str) -> list[str]:
        import nltk

        tokens = nltk.word_tokenize(text.lower())
        return [
            self._lemmatizer.lemmatize(token, pos=_wordnet_pos(tag))
            for token, tag in nltk.pos_tag(tokens)
        ]


# A number ("3.5", "1,000"), a word (inner hyphens and apostrophes kept) or one
# punctuation mark.
_TOKEN_RE = re.compile(r"\d+(?:[.,]\d+)+|[^\W_]+(?:[-'][^\W_]+)*|[^\w\s]|_")
# Clitics split off like NLTK's tokenizer does: "dog's" -> "dog", "'s".
_CLITIC_RE = re.compile(r"^(.+?)('s|'re|'ve|'ll|'d|'m)$")

# Passed through unchanged: the noun lemmatizer would otherwise mangle them
# ('was' -> 'wa', 'has' -> 'ha', 'as' -> 'a', 'does' -> 'doe').
FUNCTION_WORDS = frozenset(
    """
    a an the and or but nor so yet if as than then while whereas also
    is was are were be been being am has have had do does did
    this that these those it its he his him she her hers they them their theirs
    we us our ours you your yours i me my there here
    of in on at by for with from to into onto upon over under across towards
    besides beside perhaps always sometimes thus plus unless less
    yes no not some many several various numerous
    """.split()
)


def _split_clitics(token: str) -> list[str]:
    if token.endswith("n't") and len(token) > 3:
        return [token[:-3], "n't"]
    match = _CLITIC_RE.match(token)
    if match:
        return [match.group(1), match.group(2)]
    return [token]


def offline_tokenize(text: str) -> list[str]:
    """Lowercase regex tokenizer approximating ``nltk.word_tokenize``.

    Punctuation marks are separate tokens (so "hot, dog" is not merged into
    a compound), hyphenated words stay whole, and clitics are split off as NLTK
    does ("don't" -> "do", "n't"; "dog's" -> "dog", "'s").
    """
    normalized = text.lower().replace("\u2019", "'")
    tokens: list[str] = []
    for token in _TOKEN_RE.findall(normalized):
        tokens.extend(_split_clitics(token))
    return tokens


class OfflineTextPipeline:
    """Offline approximation of the OPERA path using lemminflect only.

    Differences from :class:`NltkTextPipeline`:

    * no POS tagging: every token is lemmatized as a noun with
      ``lemminflect.getLemma(token, upos="NOUN")`` (first result, or the token
      itself when there is none), except the tokens in :data:`FUNCTION_WORDS`,
      which pass through unchanged;
    * lemminflect's noun lemmas differ from WordNet's on some words, e.g.
      'men' -> 'man' (NLTK keeps 'men'); 'bus' stays 'bus', 'dogs' -> 'dog',
      'knives' -> 'knife', 'glasses' -> 'glass', 'people' stays 'people';
    * a regex tokenizer (:func:`offline_tokenize`) replaces punkt.

    The choice of pipeline moves CHAIR_s by up to ~1.6 points, so record
    ``name`` with every result.
    """

    name = "offline-lemminflect"

    def __init__(self) -> None:
        from lemminflect import getLemma

        self._get_lemma = getLemma

    def lemma(self, token: str) -> str:
        if token in FUNCTION_WORDS or "'" in token or not token[:1].isalpha():
            return token  # function words, clitics, numbers, punctuation
        lemmas = self._get_lemma(token, upos="NOUN")
        return lemmas[0] if lemmas else token

    def words(self, text: str) -> list[str]:
        return [self.lemma(token) for token in offline_tokenize(text)]


TEXT_PIPELINE_NAMES = ("auto", "nltk", "offline")


def get_text_pipeline(name: str = "auto") -> TextPipeline:
    """Return a text pipeline by name.

    "auto": the exact NLTK pipeline when its data is installed, else offline.
    "nltk": the exact pipeline; RuntimeError naming the missing data if absent.
    "offline": the lemminflect pipeline.
    """
    if name == "offline":
        return OfflineTextPipeline()
    if name == "auto":
        return NltkTextPipeline() if NltkTextPipeline.available() else OfflineTextPipeline()
    if name == "nltk":
        missing = missing_nltk_resources()
        if missing:
            raise RuntimeError(
                "The 'nltk' text pipeline needs NLTK data that is not installed: "
                f"{', '.join(missing)}. Install it with `{NLTK_INSTALL_COMMAND}` "
                "(or use the 'offline' pipeline)."
            )
        return NltkTextPipeline()
    raise ValueError(
        f"Unknown text pipeline {name!r}; valid names: {', '.join(TEXT_PIPELINE_NAMES)}"
    )
