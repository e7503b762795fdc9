"""Atomic writes: a failure mid-save leaves earlier work intact and no temporary debris."""
import os

import pytest

from rowsft.io_utils import atomic_directory, atomic_files_into, atomic_write_text, leftovers


def test_failed_directory_write_keeps_the_old_one(tmp_path):
    dest = tmp_path / "adapter"
    with atomic_directory(dest) as d:
        (d / "a.txt").write_text("v1")
    with pytest.raises(RuntimeError):
        with atomic_directory(dest) as d:
            (d / "a.txt").write_text("half")
            raise RuntimeError("crash mid-save")
    assert (dest / "a.txt").read_text() == "v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_directory_replace_and_text(tmp_path):
    dest = tmp_path / "x"
    for v in ("1", "2"):
        with atomic_directory(dest) as d:
            (d / "v").write_text(v)
    assert (dest / "v").read_text() == "2" and sorted(p.name for p in tmp_path.iterdir()) == ["x"]
    atomic_write_text(tmp_path / "sub" / "f.json", "{}")
    assert (tmp_path / "sub" / "f.json").read_text() == "{}"


def test_saved_files_and_folders_get_the_usual_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        with atomic_directory(tmp_path / "adapter") as folder:
            (folder / "f").write_text("y")
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "adapter").stat().st_mode & 0o777 == 0o755


def test_files_into_a_folder_replace_only_their_own_config_last(tmp_path, monkeypatch):
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "notes.md").write_text("mine")
    (dest / "config.json").write_text("old")
    moved = []
    real_replace = os.replace

    def recording_replace(src, dst):
        moved.append(os.path.basename(dst))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", recording_replace)
    with atomic_files_into(dest, last=["config.json"]) as d:
        (d / "config.json").write_text("new")
        (d / "weights.bin").write_bytes(b"w")
    assert moved == ["weights.bin", "config.json"]
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == {"notes.md": b"mine", "config.json": b"new",
                                                                "weights.bin": b"w"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_failed_files_into_a_folder_change_nothing(tmp_path):
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "config.json").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_files_into(dest, last=["config.json"]) as d:
            (d / "config.json").write_text("half")
            raise RuntimeError("crash mid-save")
    assert {p.name: p.read_text() for p in dest.iterdir()} == {"config.json": "old"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and not leftovers(dest)


def test_a_file_is_never_replaced_by_a_folder(tmp_path):
    (tmp_path / "x").write_text("a file")
    for writer in (atomic_directory, atomic_files_into):
        with pytest.raises(ValueError, match="is a file, not a folder"):
            with writer(tmp_path / "x"):
                pass
    assert (tmp_path / "x").read_text() == "a file" and sorted(p.name for p in tmp_path.iterdir()) == ["x"]
