"""Shared readers/writers: line-numbered errors and writes that a kill cannot tear."""
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reasonrag_jax.io import (
    InputError,
    append_jsonl,
    atomic_dir,
    done_keys,
    drop_torn_tail,
    read_jsonl,
    write_json_atomic,
)

SCHEMA = {"id": str, "n": int}


def write(tmp_path, data: bytes):
    path = tmp_path / "f.jsonl"
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("data, message", [
    (b'{"id": "a", "n": 1}\n{"id": "b", "n": 2}', None),
    (b'{"id": "a", "n": 1}\n{"id": "b", "n": \n', "f.jsonl:2: invalid JSON"),
    (b'{"id": "a", "n": 1}\n\xff\xfe\n', "f.jsonl:2: invalid UTF-8"),
    (b'{"id": "a"}\n', "f.jsonl:1: field 'n' is missing"),
    (b'{"id": "a", "n": "1"}\n', "f.jsonl:1: field 'n' should be int, got str"),
    (b'{"id": "a", "n": true}\n', "f.jsonl:1: field 'n' should be int, got bool"),
    (b'[1, 2]\n', "f.jsonl:1: expected a JSON object, got list"),
    (b'{"id": "a", "n": 1}\n\n{"id": "a", "n": 2}\n', "f.jsonl:3: field 'id': duplicate value 'a'"),
    (b"\n\n", "f.jsonl: file is empty"),
])
def test_read_jsonl_errors_name_file_and_line(tmp_path, data, message):
    path = write(tmp_path, data)
    if message is None:
        assert [n for n, _ in read_jsonl(path, SCHEMA, unique="id")] == [1, 2]
        return
    with pytest.raises(InputError) as err:
        list(read_jsonl(path, SCHEMA, unique="id"))
    assert message in str(err.value)


def test_append_cuts_a_torn_tail_before_writing(tmp_path):
    path = tmp_path / "out.jsonl"
    append_jsonl(path, [{"id": "a"}])
    with open(path, "ab") as f:
        f.write(b'{"id": "b", "par')  # a kill in the middle of a foreign write
    assert done_keys(path, "id") == {"a"}
    append_jsonl(path, [{"id": "c"}, {"id": "d"}])
    assert [json.loads(x)["id"] for x in path.read_text().splitlines()] == ["a", "c", "d"]


@settings(max_examples=50, deadline=None)
@given(st.binary(max_size=200))
def test_drop_torn_tail_keeps_exactly_the_complete_lines(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("t") / "f.jsonl"
    path.write_bytes(data)
    drop_torn_tail(path)
    kept = path.read_bytes()
    cut = data.rfind(b"\n") + 1
    assert kept == data[:cut]


def test_atomic_dir_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "index"
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "half").write_text("x")
        raise RuntimeError("killed")
    assert not target.exists()
    with atomic_dir(target) as tmp:  # the next build clears the leftover partial dir
        (tmp / "done").write_text("y")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index"]
    assert (target / "done").read_text() == "y"


def test_write_json_atomic_replaces_whole_file(tmp_path):
    path = tmp_path / "s.json"
    write_json_atomic(path, {"a": 1})
    write_json_atomic(path, {"b": 2})
    assert json.loads(path.read_text()) == {"b": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["s.json"]
