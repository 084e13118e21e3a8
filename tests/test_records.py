"""records.py: the one JSONL writer/reader: torn last lines (a kill mid-write) cut before appending and skipped when
reading, ids written once, part files merged idempotently, text no encoder can write (lone surrogates) stored and read
back, atomic JSON writes, deterministic ids.

    .venv/bin/python -m pytest -q tests/test_records.py
"""
import hashlib
import json
import os

import pytest

import records


def read(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def test_torn_line_and_merge(tmp_path):
    path = str(tmp_path / "d.jsonl")
    with open(path, "w") as f:
        f.write('{"id": "a", "x": 1}\n{"id": "b", "x": 2}\n{"id": "c", "x"')
    assert [r["id"] for r in records.iter_records(path)] == ["a", "b"]  # torn last line skipped
    writer = records.Writer(path)  # truncates the torn line, then appends
    writer.write({"id": "c", "x": 3})
    writer.write({"id": "a", "x": 9})  # already there: not written twice
    writer.close()
    assert read(path) == [{"id": "a", "x": 1}, {"id": "b", "x": 2}, {"id": "c", "x": 3}]
    with open(path + ".rank0", "w") as f:  # parts of a killed 2-rank run, one torn
        f.write('{"id": "c", "x": 3}\n{"id": "d", "x": 4}\n')
    with open(path + ".rank1", "w") as f:
        f.write('{"id": "e", "x": 5}\n{"id": "f", "x": 6}\n{"id": "g"')
    assert records.read_ids(path) == set("abcdef")
    assert records.merge_parts(path) == 3 and records.part_paths(path) == []
    assert [r["id"] for r in read(path)] == list("abcdef")
    assert records.merge_parts(path) == 0
    with open(path, "a") as f:
        f.write("not json\n")
    with pytest.raises(ValueError, match="d.jsonl:7 is not valid JSON"):
        list(records.iter_records(path))


def test_torn_tails(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"id": "a"}\n{"id": "b"}\n{"id": "c", "pro')
    assert [r["id"] for r in records.read_records(str(path))] == ["a", "b"]
    records.repair_tail(str(path))
    assert path.read_text() == '{"id": "a"}\n{"id": "b"}\n'
    path.write_text('{"id": "a"}\n{"id": "' + "x" * 200_000)  # a torn line longer than the 64 KiB tail chunk
    records.repair_tail(str(path))
    assert path.read_text() == '{"id": "a"}\n'
    path.write_text('{"id": "a"}\nnot json\n{"id": "b"}\n')
    with pytest.raises(ValueError, match="x.jsonl:2 is not valid JSON"):
        records.read_records(str(path))


def test_lone_surrogate_and_control_text_round_trip(tmp_path):
    """Half an emoji (a proxy cutting by UTF-16 length), NUL, U+2028: written (ASCII-escaped where UTF-8 cannot
    encode it), read back to the same string, never an exception that stops a run."""
    path = str(tmp_path / "a.jsonl")
    texts = ["ok \ud83d", "nul \x00 here", "line\u2028sep", "émoji 🙂"]
    with records.Writer(path) as w:
        for i, t in enumerate(texts):
            assert w.write({"id": str(i), "answer": t})
    assert [r["answer"] for r in records.iter_records(path)] == texts
    assert "émoji 🙂" in open(path, encoding="utf-8").read()  # readable UTF-8 where it can be
    records.write_json(str(tmp_path / "s.json"), {"t": "\udc80"})
    assert json.load(open(tmp_path / "s.json"))["t"] == "\udc80"
    assert records.stable_hash("\ud83d") == records.stable_hash("\ud83d")  # hashable too


def test_write_json_is_atomic_and_ids_are_stable(tmp_path):
    path = str(tmp_path / "d" / "s.json")
    records.write_json(path, {"a": 1})
    records.write_json(path, {"a": 2})
    assert json.load(open(path)) == {"a": 2} and os.listdir(tmp_path / "d") == ["s.json"]  # no temp file left
    assert records.video_id("a/b.mp4") == hashlib.sha1(b"a/b.mp4").hexdigest()[:16]  # ids of existing outputs
    assert len(records.video_id("a/b.mp4")) == 16 and records.video_id("a/b.mp4") != records.video_id("a/c.mp4")
    assert records.norm_video("a/./b/../c.mp4") == "a/c.mp4"
    records.write_records(str(tmp_path / "w.jsonl"), [{"id": "x"}])
    assert read(tmp_path / "w.jsonl") == [{"id": "x"}]
