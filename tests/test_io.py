import json
import os

import pytest

from sad.io import atomic_dir, read_jsonl, write_json_atomic, write_jsonl_atomic


def test_failed_jsonl_write_leaves_the_old_file_and_no_temp(tmp_path):
    path = tmp_path / "out.jsonl"
    write_jsonl_atomic(path, [{"a": 1}])

    def rows():
        yield {"a": 2}
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        write_jsonl_atomic(path, rows())
    assert read_jsonl(path) == [{"a": 1}]
    assert sorted(os.listdir(tmp_path)) == ["out.jsonl"]


def test_failed_directory_write_leaves_nothing(tmp_path):
    target = tmp_path / "models" / "teacher"
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "weights.safetensors").write_text("half")
            raise RuntimeError("crash")
    assert not target.exists()
    assert os.listdir(tmp_path / "models") == []


def test_directory_write_replaces_whole(tmp_path):
    target = tmp_path / "out"
    with atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("1")
    with atomic_dir(target) as tmp:
        (tmp / "b.txt").write_text("2")
    assert sorted(os.listdir(target)) == ["b.txt"]
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_written_files_get_normal_permissions(tmp_path):
    path = tmp_path / "m.json"
    write_json_atomic(path, {"x": 1})
    assert json.loads(path.read_text()) == {"x": 1}
    import stat

    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask  # as open() would make it, unlike mkstemp's 0o600


def test_bad_jsonl_line_is_named(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"ok": 1}\n{broken\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        read_jsonl(path)


def test_invalid_utf8_line_is_named(tmp_path):
    bad = tmp_path / "rows.jsonl"
    bad.write_bytes(b'{"a": 1}\n{"b": "\xff\xfe"}\n')
    with pytest.raises(ValueError, match=r"rows.jsonl:2: not valid UTF-8"):
        read_jsonl(bad)
