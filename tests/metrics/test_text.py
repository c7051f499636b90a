import pytest

from halludpo.metrics.text import (
    NltkTextPipeline,
    OfflineTextPipeline,
    get_text_pipeline,
    missing_nltk_resources,
    offline_tokenize,
)

NLTK_DATA_INSTALLED = NltkTextPipeline.available()


@pytest.fixture(scope="module")
def offline():
    return OfflineTextPipeline()


@pytest.mark.parametrize(
    ("word", "lemma"),
    [
        ("dogs", "dog"),
        ("bus", "bus"),
        ("buses", "bus"),
        ("knives", "knife"),
        ("people", "people"),
        ("glasses", "glass"),
        ("men", "man"),  # NLTK's WordNet keeps 'men'; documented difference
        ("giraffes", "giraffe"),
    ],
)
def test_offline_noun_lemmas(offline, word, lemma):
    assert offline.words(word) == [lemma]


def test_offline_function_words_pass_through(offline):
    assert offline.words("This was as it has been") == ["this", "was", "as", "it", "has", "been"]


def test_offline_lowercases_and_splits_punctuation(offline):
    assert offline.words("Two Dogs, a BUS.") == ["two", "dog", ",", "a", "bus", "."]


def test_offline_tokenizer_splits_clitics_like_nltk():
    assert offline_tokenize("The dog's bowl isn't here") == [
        "the", "dog", "'s", "bowl", "is", "n't", "here",
    ]  # fmt: skip
    assert offline_tokenize("a t-shirt at 3.5 o'clock") == ["a", "t-shirt", "at", "3.5", "o'clock"]


def test_offline_pipeline_name(offline):
    assert offline.name == "offline-lemminflect"


def test_get_text_pipeline_offline():
    assert isinstance(get_text_pipeline("offline"), OfflineTextPipeline)


def test_get_text_pipeline_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="auto, nltk, offline"):
        get_text_pipeline("spacy")


@pytest.mark.skipif(NLTK_DATA_INSTALLED, reason="NLTK data is installed here")
def test_auto_falls_back_to_offline_without_nltk_data():
    assert get_text_pipeline("auto").name == "offline-lemminflect"


@pytest.mark.skipif(NLTK_DATA_INSTALLED, reason="NLTK data is installed here")
def test_nltk_pipeline_error_names_missing_data_and_install_command():
    assert missing_nltk_resources()
    with pytest.raises(RuntimeError) as error:
        get_text_pipeline("nltk")
    message = str(error.value)
    assert "wordnet" in message
    assert "python -m nltk.downloader punkt_tab averaged_perceptron_tagger_eng wordnet" in message


@pytest.mark.skipif(not NLTK_DATA_INSTALLED, reason="NLTK data not installed")
def test_nltk_pipeline_when_data_installed():
    pipeline = get_text_pipeline("nltk")
    assert pipeline.name == "nltk-wordnet"
    assert pipeline.words("Two dogs") == ["two", "dog"]


def test_nltk_pipeline_wiring_with_stubbed_nltk(monkeypatch):
    """Lowercase -> word_tokenize -> pos_tag -> lemmatize with J/V/N/R else noun."""
    import nltk

    seen = {}
    monkeypatch.setattr(nltk, "word_tokenize", lambda text: seen.setdefault("text", text).split())
    tags = {"big": "JJ", "dogs": "NNS", "ran": "VBD", "fast": "RB", "the": "DT"}
    monkeypatch.setattr(nltk, "pos_tag", lambda tokens: [(t, tags[t]) for t in tokens])

    class RecordingLemmatizer:
        def lemmatize(self, word, pos):
            return f"{word}/{pos}"

    pipeline = NltkTextPipeline()
    pipeline._lemmatizer = RecordingLemmatizer()
    assert pipeline.words("The big Dogs ran fast") == ["the/n", "big/a", "dogs/n", "ran/v", "fast/r"]
    assert seen["text"] == "the big dogs ran fast"
