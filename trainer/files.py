"""Atomic file and folder writes: a temp name in the same folder, fsync, rename; stale temps cleaned.

A process killed mid-write leaves the old file untouched; its temp file (`.<target>.tmp-<pid>-<token>`) is
ignored by readers and removed by the next write to that folder once its process is gone.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

from .errors import ZitError

_TEMP_RE = re.compile(r"^\.(?P<target>.+)\.tmp-(?P<pid>\d+)-[0-9a-f]{8}$")
_REASONS = {
    errno.ENOENT: "no such file or folder", errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EISDIR: "is a folder, not a file", errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EEXIST: "already exists", errno.EROFS: "read-only file system", errno.ENOSPC: "disk full",
    errno.ENAMETOOLONG: "name too long", errno.ELOOP: "too many symbolic links",
}
OVERWRITE_HINT = "give --overwrite to replace it"


class FileRefused(ZitError):
    """A path a command will not read or write (missing, unreadable, a folder, or an existing output)."""


def os_reason(exc: OSError) -> str:
    """What an OSError means in a few words: 'permission denied', 'no such file or folder', ..."""
    return _REASONS.get(exc.errno or 0) or (exc.strerror or str(exc)).lower()


def describe_os_error(exc: OSError) -> str:
    """One line naming the path and the reason, e.g. 'run.toml: permission denied'."""
    where = exc.filename if exc.filename is not None else ""
    return f"{where}: {os_reason(exc)}" if where != "" else os_reason(exc)


def open_error(path: str | os.PathLike) -> str | None:
    """Why this process cannot open path for reading ('permission denied', ...), or None when it can."""
    try:
        with open(path, "rb"):
            return None
    except OSError as exc:
        return os_reason(exc)


def check_readable(path: str | os.PathLike, label: str | None = None) -> Path:
    """The path, if it is a file this process can open; FileRefused '<label or path>: <reason>' otherwise."""
    why = open_error(path)
    if why:
        raise FileRefused(f"{label or path}: {why}")
    return Path(path)


def _file_ancestor(path: Path) -> Path | None:
    """The first existing ancestor of path that is not a folder (a file in the way), or None."""
    for parent in path.parents:
        if parent.exists():
            return None if parent.is_dir() else parent
    return None


def _writable_base(path: Path) -> Path | None:
    """The nearest existing folder above path when this process may not create entries in it, else None."""
    for parent in path.parents:
        if parent.is_dir():
            return None if os.access(parent, os.W_OK | os.X_OK) else parent
    return None


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def check_output(path: str | os.PathLike, *, overwrite: bool = False,
                 inputs: Iterable[str | os.PathLike] = (), label: str | None = None) -> Path:
    """An output file path that may be written: not a folder, no file in the way, writable, and neither
    an input nor an existing file unless `overwrite`; FileRefused naming it otherwise (nothing is written)."""
    path = Path(path)
    name = label or str(path)
    if path.is_dir():
        raise FileRefused(f"{name}: is a folder; give a file name")
    blocker = _file_ancestor(path)
    if blocker is not None:
        raise FileRefused(f"{name}: {blocker} is a file, not a folder")
    denied = _writable_base(path)
    if denied is not None:
        raise FileRefused(f"{name}: permission denied (cannot write in {denied})")
    if not overwrite:
        source = next((Path(i) for i in inputs if _same_file(Path(i), path)), None)
        if source is not None:
            raise FileRefused(f"{name}: is also an input; write to another file or {OVERWRITE_HINT}")
        if path.exists() or path.is_symlink():
            raise FileRefused(f"{name}: already exists; {OVERWRITE_HINT}")
    elif path.exists() and not os.access(path, os.W_OK):
        raise FileRefused(f"{name}: permission denied")
    return path


def check_folder(path: str | os.PathLike, label: str | None = None, *, overwrite: bool | None = None) -> Path:
    """A folder path a command may create or write into: not a file, no file in the way, writable; with
    `overwrite=False` it must also be missing or empty. FileRefused naming it otherwise."""
    path = Path(path)
    name = label or str(path)
    if path.exists() and not path.is_dir():
        raise FileRefused(f"{name}: is a file, not a folder")
    blocker = _file_ancestor(path)
    if blocker is not None:
        raise FileRefused(f"{name}: {blocker} is a file, not a folder")
    denied = path if path.is_dir() and not os.access(path, os.W_OK | os.X_OK) else _writable_base(path)
    if denied is not None:
        raise FileRefused(f"{name}: permission denied (cannot write in {denied})")
    if overwrite is False and path.is_dir() and any(path.iterdir()):
        raise FileRefused(f"{name}: is not empty; give --overwrite to write into it (files are replaced)")
    return path


def new_folders(path: str | os.PathLike) -> list[Path]:
    """The folders that creating `path` would create, outermost first (none when it exists)."""
    path = Path(path)
    missing = [p for p in (path, *path.parents) if not p.exists()]
    return missing[::-1]


def remove_empty_folders(folders: Iterable[Path]) -> None:
    """Remove the given folders (innermost last in the list) where they hold no file at any depth."""
    for folder in folders:
        if folder.is_dir() and not any(p.is_file() or p.is_symlink() for p in folder.rglob("*")):
            shutil.rmtree(folder, ignore_errors=True)
            return  # the outermost empty one holds the rest



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
