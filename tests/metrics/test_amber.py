"""AMBER scoring against hand-computed values on a cut of the released files (tests/fixtures/amber/README.md).

The hand computations use the offline noun pipeline and, unless a test says otherwise, the offline matcher
(identity), so every expected number follows from the annotation and association lists quoted in the comments.
"""

import hashlib
import json
import os
import sys
import types
from pathlib import Path

import lemminflect  # noqa: F401  (imported before any test puts a stub 'spacy' module in sys.modules)
import numpy as np
import pytest

from halludpo.io import InputError
from halludpo.metrics import amber
from halludpo.metrics.amber import (
    COUNTER_SEED,
    AmberGenerativeScorer,
    ExactMatcher,
    NltkNouns,
    OfflineNouns,
    SpacyMatcher,
    TableMatcher,
    amber_score,
    build_similarity_table,
    get_matcher,
    get_noun_extractor,
    load_amber,
    load_annotations,
    load_queries,
    load_responses,
    parse_answer,
    score_amber,
    score_discriminative,
    write_similarity_table,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "amber"


@pytest.fixture(scope="module")
def data():
    return load_amber(FIXTURES)


@pytest.fixture(scope="module")
def nouns():
    return OfflineNouns()


@pytest.fixture(scope="module")
def scorer(data, nouns):
    return AmberGenerativeScorer(data.relation, data.safe_words, nouns, ExactMatcher())


# --- the files ---------------------------------------------------------------------------------------------------


def test_fixture_files_load(data):
    assert sorted(data.generative) == [1, 2, 3, 35]
    dimensions = [question.dimension for question in data.questions.values()]
    assert (dimensions.count("existence"), dimensions.count("attribute"), dimensions.count("relation")) == (7, 12, 4)
    assert {data.questions[i].kind for i in (1005, 1013, 1017)} == {"state", "number", "action"}
    assert data.questions[13558].type == "relation" and data.questions[13558].dimension == "relation"
    assert len(data.relation) == 340 and len(data.vocabulary) == 418
    assert data.safe_words == ["orange", "snack", "line", "camera", "light", "shoe", "sign", "range", "individual"]
    assert data.generative[2].truth.count("ship") == 2
    assert set(data.sources) == {"annotations", "relation", "safe_words"}


def test_counter_seed_is_metrics_txt():
    # AMBER's metrics.txt starts every denominator ("..._num") at 0.001 and every numerator ("..._score") at 0.
    values = dict(line.split("=") for line in (FIXTURES / "metrics.txt").read_text().split())
    assert {float(v) for k, v in values.items() if k.endswith("_num")} == {COUNTER_SEED}
    assert {float(v) for k, v in values.items() if k.endswith("_score")} == {0.0}


def test_query_files_match_the_annotations(data):
    generative = load_queries(FIXTURES / "query_generative.json")
    questions = load_queries(FIXTURES / "query_discriminative.json")
    assert [q["id"] for q in generative] == [1, 2, 3, 35]
    assert {q["query"] for q in generative} == {amber.GENERATIVE_PROMPT}
    assert {q["id"] for q in questions} == set(data.questions)
    assert questions[0] == {"id": 1005, "image": "AMBER_1.jpg", "query": "Is the sky sunny in this image?"}


def _write(path, obj):
    path.write_text(json.dumps(obj))
    return path


def test_malformed_annotation_names_file_and_entry(tmp_path):
    path = _write(tmp_path / "annotations.json", [{"id": 1, "type": "generative", "truth": ["sky"]}])
    with pytest.raises(InputError, match=r"annotations\.json: entry 0 \(id 1\): generative 'hallu'"):
        load_annotations(path)
    _write(path, [{"id": 1, "type": "generative", "truth": [], "hallu": []},
                  {"id": 2, "type": "discriminative-relation", "truth": "Yes"}])
    with pytest.raises(InputError, match=r"entry 1 \(id 2\): .* 'truth' must be 'yes' or 'no'"):
        load_annotations(path)
    _write(path, [{"id": 7, "type": "caption", "truth": "yes"}])
    with pytest.raises(InputError, match=r"entry 0 \(id 7\): unknown type 'caption'"):
        load_annotations(path)
    _write(path, [{"id": 3, "type": "relation", "truth": "no"}, {"id": 3, "type": "relation", "truth": "no"}])
    with pytest.raises(InputError, match=r"entry 1 \(id 3\): id 3 appears twice"):
        load_annotations(path)
    path.write_text('[{"id": 1,')
    with pytest.raises(InputError, match=r"annotations\.json:1: invalid JSON"):
        load_annotations(path)


def test_truth_word_outside_the_association_table_is_named(tmp_path):
    for name in ("relation.json", "safe_words.txt"):
        (tmp_path / name).write_bytes((FIXTURES / name).read_bytes())
    _write(tmp_path / "annotations.json", [{"id": 1, "type": "generative", "truth": ["sky", "unicorn"], "hallu": []}])
    with pytest.raises(InputError, match=r"id 1: truth word 'unicorn' is not a key of .*relation\.json"):
        load_amber(tmp_path)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(InputError, match=r"annotations\.json: file not found"):
        load_amber(tmp_path)


def test_responses_are_validated(tmp_path, data):
    path = _write(tmp_path / "responses.json", [{"id": 1, "response": "A sky."}, {"id": 2}])
    with pytest.raises(InputError, match=r"responses\.json: entry 1: 'response' must be a string"):
        load_responses(path)
    _write(path, [{"id": 1, "response": "A sky."}, {"id": 99999, "response": "Yes"}])
    with pytest.raises(InputError, match=r"responses\.json: entry 1: id 99999 is not in AMBER's annotations"):
        score_amber(load_responses(path), data, nouns="offline", matcher="offline")
    _write(path, [{"id": 1005, "response": "Yes"}, {"id": 1005, "response": "No"}])
    with pytest.raises(InputError, match=r"entry 1: id 1005 was already answered \(.*entry 0\)"):
        score_amber(load_responses(path), data, nouns="offline", matcher="offline")
    lines = tmp_path / "responses.jsonl"
    lines.write_text('{"id": 1, "response": "A sky."}\n{"id": "2", "response": "x"}\n')
    with pytest.raises(InputError, match=r"responses\.jsonl:2: 'id' must be an integer"):
        load_responses(lines)


# --- generative: nouns and judging --------------------------------------------------------------------------------

# Image 1: truth [sky, forest, grass, person, lake, mountain, road]; hallu [cloud, sun, bird, dog, flower].
# Associations: forest [tree, leave, bush], grass [ground], person [people, individual, man, woman, boy, girl],
# lake [water, sea, river], mountain [hill, rock, stone, reef], road [path, street, ground], bird [bill].
RESPONSE_1 = "A man walks on a road near a lake, with trees and a dog. The sky is blue and there is a camera."
# Image 2: truth [sky, man, ship, ship, forest, bridge, mountain, cloud, lake, building];
# hallu [plane, bird, sun, paddle, ground]; man [person, people, individual, boy], ship [boat, vessel, sailing,
# vehicle], paddle [oar].
RESPONSE_2 = "Two ships sail under a bridge. A boat, an oar and some people are on the water."
# Image 35: truth [sky, cloud, person, sea, backpack, ground, guardrail, sun, railing]; hallu [sun, bench, fish, bird];
# guardrail [rail, bar, railing, fence, barrier].
RESPONSE_35 = "A railing by the sea under the sun, and a bench with a fish."
# Image 3: truth [child, grass, flower]; hallu [sky, cloud, tree, house, bench]; child [kid, person, ...].
RESPONSE_3 = "Two kids play on the grass."


def test_nouns_keep_vocabulary_words_in_order(scorer):
    # 'A', 'The' (capitalised: kept as they are, not in the vocabulary), 'walks' -> 'walk', 'near', 'blue' are not
    # vocabulary words; 'trees' -> 'tree'.
    assert scorer.nouns(RESPONSE_1) == ["man", "road", "lake", "tree", "dog", "sky", "camera"]
    # A capitalised word stays as it is (WordNet's index is lower-case), so 'Grass' is not counted.
    assert scorer.nouns("Grass and flowers.") == ["flower"]


def test_judging_image_1(scorer, data):
    item = scorer.score_item(1, RESPONSE_1, data.generative[1].truth, data.generative[1].hallu)
    # man: person's associated word -> person covered; road, lake, sky: truth words; tree: forest's associated word
    # -> forest covered; dog: no truth match, a hallu word -> mentioned and hallucinated; camera: a safe word.
    assert item["judged"] == ["truth", "truth", "truth", "truth", "hallucinated", "truth", "safe"]
    assert item["hallucinated"] == ["dog"]
    assert item["truth_covered"] == [True, True, False, True, True, False, True]  # not grass, mountain
    assert item["hallu_mentioned"] == [False, False, False, True, False]


def test_a_truth_word_listed_twice_is_covered_once(scorer, data):
    item = scorer.score_item(2, RESPONSE_2, data.generative[2].truth, data.generative[2].hallu)
    # nouns ship, bridge, boat, oar, people, water ('sail' is not in the vocabulary).
    # ship: the first 'ship' entry (index 2) only; boat: ship's associated word -> index 2 again; the second 'ship'
    # (index 3) is never covered. people -> man; water -> lake. oar: paddle's associated word -> paddle mentioned,
    # and no truth match -> hallucinated.
    assert item["nouns"] == ["ship", "bridge", "boat", "oar", "people", "water"]
    assert item["truth_covered"] == [False, True, True, False, False, True, False, False, True, False]
    assert item["hallucinated"] == ["oar"]
    assert item["hallu_mentioned"] == [False, False, False, True, False]


def test_an_associated_word_covers_its_owner_first(scorer, data):
    item = scorer.score_item(35, RESPONSE_35, data.generative[35].truth, data.generative[35].hallu)
    # railing: found first among guardrail's associated words -> guardrail covered, the truth word 'railing' not.
    # sun: a truth word -> covered, and not mentioned as the hallu word 'sun' (truth matches end the judging).
    # bench, fish: hallu words -> mentioned and hallucinated.
    assert item["truth_covered"] == [False, False, False, True, False, False, True, True, False]
    assert item["hallu_mentioned"] == [False, True, True, False]
    assert item["hallucinated"] == ["bench", "fish"]


RECORDS = [
    {"id": 1, "response": RESPONSE_1},    # 7 nouns, 1 hallucinated; truth 5 of 7 covered; hallu 1 of 5
    {"id": 2, "response": RESPONSE_2},    # 6 nouns, 1 hallucinated; truth 4 of 10; hallu 1 of 5
    {"id": 35, "response": RESPONSE_35},  # 5 nouns, 2 hallucinated; truth 3 of 9; hallu 2 of 4
    {"id": 3, "response": RESPONSE_3},    # kid -> child, grass: 2 nouns, none hallucinated; truth 2 of 3; hallu 0 of 5
]
# CHAIR = (1 + 1 + 2 + 0) / (7 + 6 + 5 + 2) = 4/20;  Cover = (5 + 4 + 3 + 2) / (7 + 10 + 9 + 3) = 14/29
# Hal   = 3 responses with a hallucination / 4;      Cog   = (1 + 1 + 2 + 0) / (5 + 5 + 4 + 5) = 4/19
# As AMBER prints them (denominators + 0.001, x100, one decimal):
# CHAIR 4/20.001 = 19.999 -> 20.0; Cover 14/29.001 = 48.27 -> 48.3; Hal 100 - 1/4.001*100 = 75.006 -> 75.0;
# Cog 4/19.001 = 21.05 -> 21.1


def test_generative_metrics(scorer, data):
    result = scorer.score(RECORDS, data.generative)
    metrics = result["metrics"]
    assert metrics["chair"] == pytest.approx(4 / 20)
    assert metrics["cover"] == pytest.approx(14 / 29)
    assert metrics["hal"] == pytest.approx(3 / 4)
    assert metrics["cog"] == pytest.approx(4 / 19)
    assert (metrics["n_nouns"], metrics["n_truth"], metrics["n_hallu"]) == (20, 29, 19)
    assert result["printed"] == {"CHAIR": 20.0, "Cover": 48.3, "Hal": 75.0, "Cog": 21.1}


def test_generative_id_without_annotation_is_named(scorer, data):
    with pytest.raises(InputError, match=r"responses\.json: entry 3: id 1005 is not a generative item"):
        scorer.score([{"id": 1005, "response": "x", "origin": "responses.json: entry 3"}], data.generative)


# --- generative: similar words --------------------------------------------------------------------------------


def _table(path, data, pairs, min_similarity=0.5):
    return _write(path, {"format": amber.TABLE_FORMAT, "min_similarity": min_similarity,
                         "words": sorted(data.words()), "pairs": pairs})


def _scorer(data, nouns, matcher):
    return AmberGenerativeScorer(data.relation, data.safe_words, nouns, matcher)


def test_similar_words_from_a_table(tmp_path, data, nouns):
    # Image 1, "A cat and a boat.": with the table below,
    # cat: no exact match; the first similar hallu entry (order bill, cloud, sun, bird, dog, flower) is dog (0.9)
    #      -> dog mentioned; no similar truth entry -> hallucinated.
    # boat: no exact match; truth entries in order: tree leave bush | ground | people ... girl | water SEA river |
    #       ... | path street ground | sky forest grass person LAKE mountain ROAD: sea (0.81, lake's associated
    #       word) comes first -> lake covered, although road (0.95) is more similar; not hallucinated.
    path = _table(tmp_path / "table.json", data, [["cat", "dog", 0.9], ["boat", "sea", 0.81], ["boat", "road", 0.95],
                                                  ["boat", "lake", 0.85]])
    truth, hallu = data.generative[1].truth, data.generative[1].hallu
    item = _scorer(data, nouns, TableMatcher(path)).score_item(1, "A cat and a boat.", truth, hallu)
    assert item["hallucinated"] == ["cat"]
    assert item["truth_covered"] == [False, False, False, False, True, False, False]
    assert item["hallu_mentioned"] == [False, False, False, True, False]
    # threshold 0.9: cat-dog (0.9) is not above it; boat-road (0.95) is the only similar truth entry -> road.
    item = _scorer(data, nouns, TableMatcher(path, threshold=0.9)).score_item(1, "A cat and a boat.", truth, hallu)
    assert item["hallu_mentioned"] == [False] * 5
    assert item["truth_covered"] == [False, False, False, False, False, False, True]
    # offline (identity only): both nouns are hallucinated, nothing covered or mentioned.
    item = _scorer(data, nouns, ExactMatcher()).score_item(1, "A cat and a boat.", truth, hallu)
    assert item["hallucinated"] == ["cat", "boat"] and not any(item["truth_covered"] + item["hallu_mentioned"])


def test_a_noun_similar_to_a_hallu_and_a_truth_word(tmp_path, data, nouns):
    # cat ~ dog (hallu) and cat ~ girl (person's associated word): dog is mentioned (the hallu check comes first)
    # and person covered, so cat is not a hallucination.
    path = _table(tmp_path / "table.json", data, [["cat", "dog", 0.9], ["cat", "girl", 0.85]])
    item = _scorer(data, nouns, TableMatcher(path)).score_item(1, "a cat", data.generative[1].truth,
                                                               data.generative[1].hallu)
    assert item["judged"] == ["similar"]
    assert item["truth_covered"] == [False, False, False, True, False, False, False]
    assert item["hallu_mentioned"] == [False, False, False, True, False]


def test_table_checks(tmp_path, data):
    path = _table(tmp_path / "table.json", data, [], min_similarity=0.8)
    with pytest.raises(ValueError, match="--min-similarity 0.7"):
        TableMatcher(path, threshold=0.7)
    small = _write(tmp_path / "small.json", {"format": amber.TABLE_FORMAT, "min_similarity": 0.5,
                                             "words": ["cat", "dog"], "pairs": []})
    with pytest.raises(InputError, match=r"small\.json: built for another vocabulary; \d+ word\(s\)"):
        score_amber([{"id": 1, "response": "a cat"}], data, nouns="offline", matcher=TableMatcher(small))
    with pytest.raises(InputError, match="not an AMBER similarity table"):
        TableMatcher(_write(tmp_path / "other.json", {"pairs": []}))


class FakeDoc:
    def __init__(self, text, vector):
        self.text, self.vector = text, vector

    def similarity(self, other):  # spaCy's Doc.similarity: 1.0 for the same text, else the vectors' cosine
        if self.text == other.text:
            return 1.0
        return float(self.vector @ other.vector / (np.linalg.norm(self.vector) * np.linalg.norm(other.vector)))


class FakeNlp:
    """Word vectors around one centre per first letter: words sharing it are often > 0.8 alike, others not."""

    meta = {"version": "0.0-test"}

    def __call__(self, text):
        own = np.random.default_rng(int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)).normal(size=16)
        centre = np.random.default_rng(ord(text[0])).normal(size=16)
        return FakeDoc(text, (centre + 0.45 * own).astype(np.float32))


def test_the_table_reproduces_the_spacy_path(tmp_path, data, nouns):
    table = write_similarity_table(tmp_path / "table.json", data, FakeNlp(), "fake_model", min_similarity=0.5)
    assert table["words"] == sorted(data.words()) and table["model_version"] == "0.0-test"
    assert all(value >= 0.5 for _, _, value in table["pairs"])
    assert any(value > 0.8 for _, _, value in table["pairs"])
    responses = [{"id": 1, "response": RESPONSE_1 + " A cat, a boat, some stones, a sun and a flower."},
                 {"id": 2, "response": RESPONSE_2 + " Ships, boats, a bus, a sink and a plane by the sea."},
                 *RECORDS[2:]]
    offline = score_amber(responses, data, nouns=nouns, matcher="offline")
    for threshold in (0.6, 0.8):
        spacy_path = score_amber(responses, data, nouns=nouns, matcher=SpacyMatcher(threshold, nlp=FakeNlp()))
        table_path = score_amber(responses, data, nouns=nouns,
                                 matcher=TableMatcher(tmp_path / "table.json", threshold))
        assert table_path["items"] == spacy_path["items"]
        assert table_path["metrics"] == spacy_path["metrics"]
        assert spacy_path["metrics"] != offline["metrics"]  # similar words changed something
    assert table_path["protocol"]["matcher"]["name"] == "table"
    assert spacy_path["protocol"]["matcher"]["model_version"] == "0.0-test"


def test_build_pairs_are_the_nlp_similarities():
    pairs = build_similarity_table(["dog", "cat", "car"], FakeNlp(), min_similarity=-1.0)
    assert [pair[:2] for pair in pairs] == [["car", "cat"], ["car", "dog"], ["cat", "dog"]]
    nlp = FakeNlp()
    assert pairs[2][2] == pytest.approx(nlp("cat").similarity(nlp("dog")))


def test_build_similarity_command(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(amber, "spacy_available", lambda model=amber.SPACY_MODEL: True)
    monkeypatch.setitem(sys.modules, "spacy", types.SimpleNamespace(load=lambda model: FakeNlp()))
    out = tmp_path / "similarity.json"
    assert amber.main(["build-similarity", "--out", str(out), "--data-dir", str(FIXTURES)]) == 0
    assert "418 words" in capsys.readouterr().out
    assert TableMatcher(out).words == load_amber(FIXTURES).words()


def test_build_similarity_command_without_spacy(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(amber, "spacy_available", lambda model=amber.SPACY_MODEL: False)
    assert amber.main(["build-similarity", "--out", str(tmp_path / "t.json"), "--data-dir", str(FIXTURES)]) == 1
    assert "python -m spacy download en_core_web_lg" in capsys.readouterr().err
    assert amber.main(["build-similarity", "--out", str(tmp_path / "t.json"), "--data-dir", str(tmp_path)]) == 1
    assert "annotations.json: file not found" in capsys.readouterr().err


def test_matcher_selection(tmp_path, data, monkeypatch):
    monkeypatch.setattr(amber, "spacy_available", lambda model=amber.SPACY_MODEL: False)
    assert get_matcher("auto").name == "offline-exact"
    assert get_matcher("auto", tmp_path / "absent.json").name == "offline-exact"
    path = _table(tmp_path / "table.json", data, [])
    assert get_matcher("auto", path).name == "table"
    with pytest.raises(RuntimeError, match="python -m spacy download en_core_web_lg"):
        get_matcher("spacy")
    with pytest.raises(ValueError, match="auto, spacy, table, offline"):
        get_matcher("word2vec")


# --- noun pipelines -------------------------------------------------------------------------------------------


def test_noun_pipeline_selection():
    assert get_noun_extractor("offline").name == "offline-lemminflect"
    assert get_noun_extractor("auto").name in ("nltk-wordnet", "offline-lemminflect")
    with pytest.raises(ValueError, match="auto, nltk, offline"):
        get_noun_extractor("spacy")


def test_nltk_nouns_wiring_with_stubbed_nltk(monkeypatch):
    """AMBER's path: no lower-casing, word_tokenize -> pos_tag -> NN* tokens -> lemmatize as nouns."""
    import nltk

    tags = {"Dogs": "NNS", "run": "VBP", "on": "IN", "grass": "NN", "Paris": "NNP", "green": "JJ"}
    monkeypatch.setattr(nltk, "word_tokenize", lambda text: text.split())
    monkeypatch.setattr(nltk, "pos_tag", lambda tokens: [(token, tags[token]) for token in tokens])

    class RecordingLemmatizer:
        def lemmatize(self, word, pos="n"):
            return f"{word}/{pos}"

    extractor = NltkNouns()
    extractor._lemmatizer = RecordingLemmatizer()
    assert extractor.nouns("Dogs run on green grass Paris") == ["Dogs/n", "grass/n", "Paris/n"]


# --- discriminative -----------------------------------------------------------------------------------------------

# Existence 8633-8639, all truth "no".
EXISTENCE = {8633: "No", 8634: "No", 8635: "Yes", 8636: "No.", 8637: "no", 8638: "No", 8639: "Yes"}
# AMBER's parsing: no no yes - - no yes ('No.' and 'no' are neither): correct 3 of 7; answered no 3, all correct.
# accuracy 3/7, precision 3/3, recall 3/7, F1 = 2 * 1 * 3/7 / (1 + 3/7) = 0.6.
# Attribute (truth): state 1005 yes, 1006 no, 1007 yes, 1008 no, 1009 yes, 1010 no, 1011 yes, 1012 no;
# number 1013 yes, 1014 no; action 1017 yes, 1018 no.
ATTRIBUTE = {1005: "Yes", 1006: "No", 1007: "No", 1008: "No", 1009: "Yes", 1010: "Yes", 1011: "Yes", 1012: "Nope",
             1013: "Yes", 1014: "Yes", 1017: "No", 1018: "No"}
# correct: 1005 1006 1008 1009 1011 1013 1018 = 7 of 12; truth no: 1006 1008 1010 1012 1014 1018 = 6;
# answered no: 1006 1007 1008 1017 1018 = 5, of them correct 1006 1008 1018 = 3.
# attribute: accuracy 7/12, precision 3/5, recall 3/6, F1 = 2 * 0.6 * 0.5 / 1.1 = 6/11
# state (1005-1012): correct 5 of 8; truth no 4; answered no 3 (1006 1007 1008), correct 2:
#   precision 2/3, recall 2/4, F1 = (2/3) / (7/6) = 4/7
# number: correct 1 of 2 (1013); truth no 1; answered no 0: precision 0, recall 0, F1 0
# action: correct 1 of 2 (1018); truth no 1; answered no 2, correct 1: precision 1/2, recall 1, F1 2/3
# Relation (truth): 13557 yes, 13558 no, 13559 yes, 13560 no.
RELATION = {13557: "Yes", 13558: "No", 13559: "No", 13560: "Yes"}
# correct 2 of 4; truth no 2; answered no 2 (13558 13559), correct 1: precision 1/2, recall 1/2, F1 1/2
# Overall: correct 3 + 7 + 2 = 12 of 23; truth no 7 + 6 + 2 = 15; answered no 3 + 5 + 2 = 10, correct 3 + 3 + 1 = 7
# accuracy 12/23, precision 7/10, recall 7/15, F1 = 2 * (7/10)(7/15) / (7/10 + 7/15) = (49/75) / (7/6) = 0.56
ANSWERS = EXISTENCE | ATTRIBUTE | RELATION


def _answer_records(answers):
    return [{"id": question_id, "response": response} for question_id, response in answers.items()]


def test_amber_answer_parsing_is_exact():
    assert [parse_answer(r) for r in ("Yes", "No", "yes", "No.", "No, there is none.", " Yes", "")] == [
        "yes", "no", None, None, None, None, None]
    assert [parse_answer(r, "first-word") for r in ("yes", "No.", "No, there is none.", " Yes!", "Nope", "")] == [
        "yes", "no", "no", "yes", None, None]
    with pytest.raises(ValueError, match="amber, first-word"):
        parse_answer("Yes", "pope")


def test_discriminative_metrics(data):
    metrics = score_discriminative(_answer_records(ANSWERS), data.questions)["metrics"]
    expected = {  # (accuracy, precision, recall, F1)
        "overall": (12 / 23, 7 / 10, 7 / 15, 0.56),
        "existence": (3 / 7, 1.0, 3 / 7, 0.6),
        "attribute": (7 / 12, 3 / 5, 3 / 6, 6 / 11),
        "relation": (2 / 4, 1 / 2, 1 / 2, 1 / 2),
        "state": (5 / 8, 2 / 3, 2 / 4, 4 / 7),
        "number": (1 / 2, 0.0, 0.0, 0.0),
        "action": (1 / 2, 1 / 2, 1.0, 2 / 3),
    }
    assert list(metrics) == list(expected)
    for group, values in expected.items():
        got = metrics[group]
        assert (got["accuracy"], got["precision"], got["recall"], got["f1"]) == pytest.approx(values), group
    assert metrics["overall"]["unparsed"] == 3  # 'No.', 'no', 'Nope'
    assert metrics["existence"]["n"] == 7 and metrics["attribute"]["n"] == 12 and metrics["relation"]["n"] == 4


def test_discriminative_as_amber_prints_it(data):
    printed = score_discriminative(_answer_records(ANSWERS), data.questions)["printed"]
    # Seeded denominators (+0.001; attribute +0.003, its three kinds' counters added), x100, one decimal; F1 from
    # the rounded precision and recall, + 0.001 in existence's denominator, + 0.0001 elsewhere.
    # existence: 3/7.001 = 42.85 -> 42.9; 3/3.001 = 99.97 -> 100.0; F1 2 * 1.0 * 0.429 / 1.430 = 0.6 -> 60.0
    assert printed["existence"] == {"Accuracy": 42.9, "Precision": 100.0, "Recall": 42.9, "F1": 60.0}
    # attribute: 7/12.003 = 58.32 -> 58.3; 3/5.003 = 59.96 -> 60.0; 3/6.003 = 49.98 -> 50.0;
    # F1 2 * 0.6 * 0.5 / 1.1001 = 54.54 -> 54.5
    assert printed["attribute"] == {"Accuracy": 58.3, "Precision": 60.0, "Recall": 50.0, "F1": 54.5}
    # overall: 12/23.001 = 52.17 -> 52.2; 7/10.001 = 69.99 -> 70.0; 7/15.001 = 46.66 -> 46.7;
    # F1 2 * 0.7 * 0.467 / 1.1671 = 56.02 -> 56.0
    assert printed["overall"] == {"Accuracy": 52.2, "Precision": 70.0, "Recall": 46.7, "F1": 56.0}
    # number: 1/2.001 = 49.98 -> 50.0; precision 0/0.001 = 0; F1 0 / 0.0001 = 0
    assert printed["number"] == {"Accuracy": 50.0, "Precision": 0.0, "Recall": 0.0, "F1": 0.0}


def test_first_word_rule(data):
    metrics = score_discriminative(_answer_records(EXISTENCE), data.questions, rule="first-word")["metrics"]
    # 'No.' and 'no' now read as no: correct 5 of 7, answered no 5 (all correct): precision 1, recall 5/7,
    # F1 = 2 * (5/7) / (12/7) = 10/12
    assert metrics["existence"]["accuracy"] == pytest.approx(5 / 7)
    assert metrics["existence"]["f1"] == pytest.approx(10 / 12)
    assert metrics["existence"]["unparsed"] == 0


# --- both tasks ---------------------------------------------------------------------------------------------------


def test_score_amber(data):
    result = score_amber(RECORDS + _answer_records(ANSWERS), data, nouns="offline", matcher="offline")
    metrics = result["metrics"]
    assert metrics["generative"]["chair"] == pytest.approx(4 / 20)
    assert metrics["discriminative"]["overall"]["f1"] == pytest.approx(0.56)
    # AMBER score = (1 - CHAIR + F1) / 2 = (1 - 0.2 + 0.56) / 2 = 0.68; as percentages (100 - 20.0 + 56.0) / 2
    assert metrics["amber_score"] == pytest.approx(0.68)
    assert amber_score(0.2, 0.56) == pytest.approx(0.68)
    assert result["amber_printed"]["AMBER"] == pytest.approx(68.0)
    protocol = result["protocol"]
    assert protocol["noun_pipeline"] == "offline-lemminflect"
    assert protocol["matcher"] == {"name": "offline-exact", "threshold": None}
    assert protocol["answered"] == {"generative": "4 of 4", "existence": "7 of 7", "attribute": "12 of 12",
                                    "relation": "4 of 4"}
    assert protocol["unparsed_answers"] == 3
    assert protocol["files"]["annotations"]["sha256"] == hashlib.sha256(
        (FIXTURES / "annotations.json").read_bytes()).hexdigest()
    json.dumps(result)  # a result file can hold it


def test_no_amber_score_without_every_dimension(data):
    result = score_amber(RECORDS + _answer_records(EXISTENCE | RELATION), data, nouns="offline", matcher="offline")
    assert result["metrics"]["amber_score"] is None
    assert "attribute" not in result["metrics"]["discriminative"]
    assert score_amber(RECORDS, data, nouns="offline", matcher="offline")["metrics"]["discriminative"] is None


def test_responses_from_a_file(tmp_path, data):
    path = _write(tmp_path / "responses.json", RECORDS + _answer_records(ANSWERS))
    result = score_amber(load_responses(path), data, nouns="offline", matcher="offline")
    assert result["metrics"]["amber_score"] == pytest.approx(0.68)


# --- the released files -------------------------------------------------------------------------------------------

AMBER_DIR = os.environ.get("HALLUDPO_AMBER_DIR")


def _query_file(folder: Path, name: str) -> Path:
    return folder / name if (folder / name).is_file() else folder / "query" / name


@pytest.mark.skipif(not AMBER_DIR, reason="HALLUDPO_AMBER_DIR (AMBER's data/ folder) is not set")
def test_the_released_files():
    folder = Path(AMBER_DIR)
    released = load_amber(folder)
    assert len(released.generative) == 1004
    dimensions = [question.dimension for question in released.questions.values()]
    assert (dimensions.count("existence"), dimensions.count("attribute"), dimensions.count("relation")) == (
        4924, 7628, 1664)
    kinds = [question.kind for question in released.questions.values()]
    assert (kinds.count("state"), kinds.count("number"), kinds.count("action")) == (4764, 2072, 792)
    assert {q.truth for q in released.questions.values() if q.dimension == "existence"} == {"no"}
    assert len(released.relation) == 340 and len(released.vocabulary) == 418
    generative = load_queries(_query_file(folder, "query_generative.json"))
    questions = load_queries(_query_file(folder, "query_discriminative.json"))
    assert sorted(q["id"] for q in generative) == sorted(released.generative) == list(range(1, 1005))
    assert sorted(q["id"] for q in questions) == sorted(released.questions) == list(range(1005, 15221))
    records = [{"id": i, "response": "A man on a road."} for i in released.generative]
    records += [{"id": i, "response": "No"} for i in released.questions]
    result = score_amber(records, released, nouns="offline", matcher="offline")
    assert result["metrics"]["discriminative"]["existence"]["accuracy"] == 1.0
    assert result["metrics"]["discriminative"]["overall"]["recall"] == 1.0
    assert result["metrics"]["amber_score"] is not None
