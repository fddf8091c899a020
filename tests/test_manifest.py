import json

import pytest

from multigrounding.datasets.manifest import read_manifest, write_manifest
from multigrounding.datasets.problems import ProblemLog
from multigrounding.datasets.records import Record
from multigrounding.errors import DatasetError, DatasetNotFoundError


def test_write_then_read_gives_the_same_records_with_paths_relative(tmp_path):
    records = [Record(id=str(i), image=str(tmp_path / "img" / f"{i}.jpg"), captions=[f"cap {i}"])
               for i in range(3)]
    out = tmp_path / "sub" / "m.jsonl"
    assert write_manifest(records, out) == 3
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert lines[0]["image"] == "../img/0.jpg"
    assert list(read_manifest(out)) == records


def test_interrupted_write_leaves_the_old_file(tmp_path):
    out = tmp_path / "m.jsonl"
    out.write_text("old\n")

    def broken():
        yield Record(id="1", image=str(tmp_path / "a.jpg"), captions=["a"])
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_manifest(broken(), out)
    assert out.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["m.jsonl"]  # no temp file left behind


def test_bad_lines_are_reported_with_line_numbers_and_the_rest_is_read(tmp_path):
    path = tmp_path / "m.jsonl"
    good = json.dumps({"id": "a", "image": "a.jpg", "captions": ["x"]})
    path.write_bytes(b"\n".join([good.encode(), b"{not json", b"\xff\xfe", b"",
                                 json.dumps({"id": "b"}).encode(), good.replace('"a"', '"c"').encode()]))
    problems = ProblemLog()
    ids = [r.id for r in read_manifest(path, problems)]
    assert ids == ["a", "c"]
    found = [(p.where, p.field) for p in problems]
    assert found == [(2, "(line)"), (3, "(line)"), (5, "image")]
    assert str(problems.problems[0]).startswith(f"{path}:2: (line): not valid JSON")
    assert "UTF-8" in problems.problems[1].message


def test_without_a_log_the_first_bad_line_raises(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"id": "a"}\n')
    with pytest.raises(DatasetError, match=r"m.jsonl:1: image"):
        list(read_manifest(path))
    with pytest.raises(DatasetNotFoundError, match="manifest not found"):
        list(read_manifest(tmp_path / "missing.jsonl"))
