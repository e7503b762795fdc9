"""Atomic file and folder writes: a crash, Ctrl-C or kill never leaves half-written work behind.

- :func:`atomic_write_bytes` / :func:`atomic_write_text`: write a temporary sibling, fsync, then
  ``os.replace`` it over the file (atomic on POSIX within one file system).
- :func:`atomic_directory`: a folder that is only ever replaced whole (caches).
- :func:`atomic_files_into`: write some files into a folder the user owns (an adapter or scores folder,
  a checkpoint, a merged model folder): only the files written are replaced, one ``os.replace`` each,
  the ``last`` ones (the config) last; every other entry of the folder is kept.

Every temporary or old copy lives beside its target under one recognisable name,
``.<name>.rowsft-tmp-<pid>-<random>``; it is removed on success and on failure, and the next save to
the same target clears those left by a killed one (:func:`clear_leftovers`), and nothing else.
"""
from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Callable, Iterable

TEMP_MARK = "rowsft-tmp"


def _umasked(mode: int) -> int:
    """``mode`` under the process umask: the permissions a plain ``open``/``mkdir`` would give
    (``mkstemp``/``mkdtemp`` create 0600/0700, which would hide saved work from the user's group)."""
    mask = os.umask(0)
    os.umask(mask)
    return mode & ~mask


def resolved(path: str | os.PathLike) -> Path:
    """``path`` made absolute with ``.``/``..`` resolved, so that ``"."`` has a name and a parent."""
    return Path(os.path.abspath(os.fspath(path)))


def temp_sibling(path: str | os.PathLike) -> Path:
    """A fresh name beside ``path`` for a temporary or old copy: ``.<name>.rowsft-tmp-<pid>-<random>``."""
    path = resolved(path)
    return path.with_name(f".{path.name}.{TEMP_MARK}-{os.getpid()}-{secrets.token_hex(4)}")


def _alive(pid: int) -> bool:
    """Whether a process ``pid`` runs on this machine (its save may still be under way)."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError, ValueError):
        return False
    except PermissionError:
        return True
    return True


def leftovers(path: str | os.PathLike) -> list[Path]:
    """The temporary copies of ``path`` that a killed save left beside it: entries named
    ``.<name>.rowsft-tmp-<pid>-<random>`` whose process is gone (a running save's are not leftovers)."""
    path = resolved(path)
    pattern = re.compile(rf"\.{re.escape(path.name)}\.{TEMP_MARK}-(\d+)-[0-9a-f]+")
    if not path.parent.is_dir():
        return []
    found = ((p, pattern.fullmatch(p.name)) for p in path.parent.iterdir())
    return sorted(p for p, m in found if m and not _alive(int(m.group(1))))


def _remove(entry: Path) -> None:
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            entry.unlink()


def clear_leftovers(path: str | os.PathLike) -> list[Path]:
    """Remove the temporary copies of ``path`` left by a killed save; returns what was removed."""
    found = leftovers(path)
    for entry in found:
        _remove(entry)
    return found


def _fsync_path(path: Path) -> None:
    """Flush a file or a folder entry list to disk (folders: best effort, not every OS allows it)."""
    flags = os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() and hasattr(os, "O_DIRECTORY") else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = resolved(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clear_leftovers(path)
    tmp = temp_sibling(path)
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def refuse_file(path: str | os.PathLike, what: str = "folder") -> Path:
    """``path`` resolved; a ValueError (nothing changed) when it is an existing file, not a folder."""
    path = resolved(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{str(path)!r} is a file, not a folder; give the path of {'an' if what[:1] in 'aeiou' else 'a'} {what} (a new or existing folder), "
                         f"or move that file away first")
    return path


@contextlib.contextmanager
def file_lock(lock_path: str | os.PathLike):
    """An exclusive inter-process lock held on the file ``lock_path`` (created when missing) for the
    ``with`` block: POSIX ``flock``; where there is none (Windows), no lock."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no flock; the atomic renames still protect each file
        yield
        return
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def check_output_folder(path: str | os.PathLike, what: str, is_ours: Callable[[Path, list[str]], bool], held: str,
                        writes: str, overwrite: bool = False) -> Path:
    """``path`` resolved, checked as the target of a save that writes ``writes`` into a folder: a file
    is always refused; a non-empty folder for which ``is_ours(folder, entry names)`` is False (it
    holds ``held``, e.g. "no rowsft adapter") is refused unless ``overwrite``. A ValueError naming
    the fix; nothing is changed."""
    target = refuse_file(path, what)
    entries = sorted(p.name for p in target.iterdir()) if target.is_dir() else []
    if overwrite or not entries or is_ours(target, entries):
        return target
    more = f" and {len(entries) - 3} more" if len(entries) > 3 else ""
    raise ValueError(f"{str(target)!r} is not empty ({entries[:3]}{more}) and holds {held}; save into a new or empty "
                     f"folder, or pass overwrite=True (--overwrite on the command line) to write {writes} beside "
                     f"those files (nothing else there is deleted)")


def _new_staging_folder(path) -> tuple[Path, Path]:
    """``(path, staging)``: ``path`` checked (not a file), its parent made, leftovers of killed saves
    cleared, and a new empty temporary folder beside it."""
    path = refuse_file(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clear_leftovers(path)
    staging = temp_sibling(path)
    staging.mkdir(mode=0o777)
    return path, staging


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike):
    """Yield a temporary folder; on success it replaces the folder ``path`` whole, on error it is removed.

    For folders rowsft alone owns (caches): everything in an existing ``path`` is
    replaced. An existing ``path`` is only moved aside once the new one is complete, so earlier work
    survives a failed save; an existing file at ``path`` is refused. Use :func:`atomic_files_into`
    for folders a user may share with other files.
    """
    path, tmp = _new_staging_folder(path)
    try:
        yield tmp
        _fsync_tree(tmp)
    except BaseException:
        _remove(tmp)
        raise
    old = None
    if path.exists():
        old = temp_sibling(path)
        os.replace(path, old)
    os.replace(tmp, path)
    _fsync_path(path.parent)
    if old is not None:
        _remove(old)


def _fsync_tree(folder: Path) -> None:
    for entry in folder.rglob("*"):
        if entry.is_file():
            _fsync_path(entry)
    _fsync_path(folder)


def _written_files(staging: Path) -> list[str]:
    """Relative paths of the files written into ``staging`` (sub-folders included)."""
    return sorted(str(p.relative_to(staging)) for p in staging.rglob("*") if p.is_file() and not p.is_symlink())


def _move_into(staging: Path, folder: Path, names: Iterable[str]) -> None:
    for name in names:
        target = folder / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.is_dir() and not target.is_symlink():
            raise IsADirectoryError(f"{str(target)!r} is a folder; cannot put the file {name} there (move it away)")
        os.replace(staging / name, target)


@contextlib.contextmanager
def atomic_files_into(path: str | os.PathLike, last: Iterable[str] = (),
                      stale: Callable[[str], bool] | None = None):
    """Yield a staging folder beside the folder ``path``; on success move each file written there into
    ``path`` (created when missing), replacing same-named files; on error remove it, ``path`` untouched.

    Only the files written are replaced, one ``os.replace`` each after all are fsynced, the names in
    ``last`` (a config that makes the folder count as complete) after the others. Every other entry
    of ``path`` is kept, except files for which ``stale(name)`` is true (files an earlier save of the
    same kind wrote and this one did not, e.g. old model shards), removed after the move. A kill at
    any moment leaves each file either old or new, never half-written.
    """
    path, staging = _new_staging_folder(path)
    try:
        yield staging
        _fsync_tree(staging)
        written = _written_files(staging)
        final = [n for n in last if n in written]
        path.mkdir(exist_ok=True)
        _move_into(staging, path, [n for n in written if n not in final])
        _move_into(staging, path, final)
        if stale is not None:
            _remove_stale(path, set(written), stale)
        _fsync_path(path)
    finally:
        _remove(staging)


def _remove_stale(folder: Path, written: set[str], stale: Callable[[str], bool]) -> None:
    for entry in folder.iterdir():
        if entry.is_file() and entry.name not in written and stale(entry.name):
            entry.unlink()
