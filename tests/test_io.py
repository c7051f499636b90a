import json

import pytest

from halludpo.io import InputError, atomic_path, read_jsonl, write_jsonl


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.jsonl"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash")
    assert list(tmp_path.iterdir()) == []


def test_jsonl_round_trip_and_errors_name_file_and_line(tmp_path):
    path = tmp_path / "g.jsonl"
    write_jsonl(path, [{"a": 1}, {"a": 2}])
    assert read_jsonl(path, required=["a"]) == [{"a": 1}, {"a": 2}]
    path.write_text(json.dumps({"a": 1}) + "\n{not json\n")
    with pytest.raises(InputError, match=r"g.jsonl:2: malformed JSON line"):
        read_jsonl(path)
    path.write_text(json.dumps({"a": 1}) + "\n" + json.dumps({"b": 1}) + "\n")
    with pytest.raises(InputError, match=r"g.jsonl:2: missing field\(s\) \['a'\]"):
        read_jsonl(path, required=["a"])
    with pytest.raises(InputError, match="file not found"):
        read_jsonl(tmp_path / "missing.jsonl")
