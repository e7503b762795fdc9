"""Atomic writes: a failure mid-save leaves earlier work intact and no temporary debris."""
import pytest

from rowsft.io_utils import atomic_directory, atomic_write_text


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
    import os

    from rowsft.io_utils import atomic_directory, atomic_write_text
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        with atomic_directory(tmp_path / "adapter") as folder:
            (folder / "f").write_text("y")
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "adapter").stat().st_mode & 0o777 == 0o755
