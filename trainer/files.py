"""Atomic file and folder writes: a temp name in the same folder, fsync, rename; stale temps cleaned.

A process killed mid-write leaves the old file untouched; its temp file (`.<target>.tmp-<pid>-<token>`) is
ignored by readers and removed by the next write to that folder once its process is gone.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path

_TEMP_RE = re.compile(r"^\.(?P<target>.+)\.tmp-(?P<pid>\d+)-[0-9a-f]{8}$")



def _pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (our own pid counts as alive)."""
    if pid == os.getpid():
        return True
    if os.name == "nt":  # os.kill(pid, 0) would terminate the process on Windows
        import ctypes

        handle = ctypes.windll.kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
        if handle:
            ctypes.windll.kernel32.CloseHandle(handle)
            return True
        return ctypes.GetLastError() == 5  # access denied: it exists
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _temp_path(target: Path) -> Path:
    return target.with_name(f".{target.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")


def remove_path(path: Path) -> None:
    """Delete a file or folder if it exists."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def clean_stale_temps(folder: str | os.PathLike, target: str | None = None) -> list[Path]:
    """Remove temp files/folders left in folder by dead processes (only those for target, if given)."""
    removed = []
    with contextlib.suppress(FileNotFoundError):
        for entry in Path(folder).iterdir():
            m = _TEMP_RE.match(entry.name)
            if m and (target is None or m["target"] == target) and not _pid_alive(int(m["pid"])):
                remove_path(entry)
                removed.append(entry)
    return removed


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    """Make a rename inside path durable (a no-op where folders cannot be opened, e.g. Windows)."""
    if os.name == "nt":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write_fn: Callable[[Path], None]) -> Path:
    """Write a file via write_fn(temp_path) then rename it onto path; on any error path is left untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(path.parent, path.name)
    tmp = _temp_path(path)
    try:
        write_fn(tmp)
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        remove_path(tmp)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_dir(path: str | os.PathLike, write_fn: Callable[[Path], None]) -> Path:
    """Build a folder via write_fn(temp_folder) then rename it onto path (replacing an old one last)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path(path)
    moved: Path | None = None
    try:
        tmp.mkdir()
        write_fn(tmp)
        for file in tmp.rglob("*"):
            if file.is_file():
                _fsync_file(file)
        _fsync_dir(tmp)
        if path.exists():
            moved = _temp_path(path)
            os.replace(path, moved)
        os.replace(tmp, path)
    except BaseException:
        remove_path(tmp)
        if moved is not None and not path.exists():
            os.replace(moved, path)
        raise
    if moved is not None:
        remove_path(moved)
    _fsync_dir(path.parent)
    return path
