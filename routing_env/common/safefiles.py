"""Crash-safe files: atomic writes, completeness markers for checkpoint folders, one writer per run.

A process killed at any instant leaves each file either as it was or complete, never truncated:
every write goes to a temporary file beside the target and is moved over it with ``os.replace``
(atomic on POSIX within one file system). A checkpoint folder is complete once its ``COMPLETE``
marker exists, written after everything else, so a resume skips a folder a crash left half-made.
A run folder has one writer at a time: :class:`RunLock` refuses a second, naming the holder's pid.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["COMPLETE", "RunLock", "RunLockedError", "atomic_write", "atomic_write_text", "check_run_name",
           "is_complete", "mark_complete"]

#: The marker file of a complete checkpoint folder (its content: the names of the files it vouches for).
COMPLETE = "COMPLETE"


def check_run_name(name: str, flag: str = "--name") -> str:
    """A run name is one plain folder name inside ``--logdir``: no path separators, no ``..``, not absolute.

    ``--name ../../x`` or ``--name /tmp/x`` would write (and lock, and later resume) outside the
    log folder the user asked for.
    """
    if (not name or name in (".", "..") or "/" in name or "\\" in name
            or name.startswith(".") or any(ord(c) < 32 for c in name)):
        raise ValueError(f"{flag} {name!r} is not a plain run name: it must be one folder name inside --logdir "
                         "(letters, digits, '-', '_', '.'; no '/', no leading '.'); put the folder in --logdir instead")
    return name


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], Any]) -> Path:
    """Call ``write(tmp)`` to make the file at a temporary path beside ``path``, then move it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb") as fh:  # on disk before the rename, so a power cut cannot expose an empty file
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; results are for everyone to read
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """``Path.write_text``, atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def mark_complete(folder: str | os.PathLike[str]) -> None:
    """Declare ``folder`` complete (call after its last file is written)."""
    folder = Path(folder)
    names = sorted(p.name for p in folder.iterdir() if p.name != COMPLETE and not p.name.startswith("."))
    atomic_write_text(folder / COMPLETE, json.dumps(names) + "\n")


def is_complete(folder: str | os.PathLike[str]) -> bool:
    """Whether ``folder`` has its marker and every file the marker lists."""
    marker = Path(folder) / COMPLETE
    if not marker.is_file():
        return False
    try:
        names = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return all((Path(folder) / n).exists() for n in names)


class RunLockedError(RuntimeError):
    """Another live process holds the run folder."""


class RunLock:
    """``with RunLock(run_dir):`` -- the only writer of ``run_dir`` until the block ends.

    The lock is an advisory ``flock`` on a file holding the owner's pid. The kernel grants it to one
    process at a time, atomically (a create-then-write-pid file lock has a window in which a second
    process reads an empty pid, takes it for stale and takes the lock as well), and releases it when
    its process dies, so a crash never blocks the resume. A holder removes the file when it is done;
    a process that locked the file just before it was removed notices (the path no longer names the
    file it holds) and tries again on the new file.
    """

    def __init__(self, folder: str | os.PathLike[str], name: str = ".lock") -> None:
        self.path = Path(folder) / name
        self._fd: int | None = None

    @classmethod
    def for_file(cls, path: str | os.PathLike[str]) -> RunLock:
        """A lock for one file that several runs could append to (``.<name>.lock`` beside it)."""
        return cls(Path(path).parent, f".{Path(path).name}.lock")

    def __enter__(self) -> RunLock:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(100):
            fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                try:
                    pid = self.path.read_text().strip() or "?"
                except OSError:
                    pid = "?"
                raise RunLockedError(
                    f"{self.path.parent} is in use by process {pid} (lock file {self.path}). Wait for it to finish, "
                    "stop it, or use another run name.") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # the holder removed the file between our open and our lock: lock the new one
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, str(os.getpid()).encode())
            self._fd = fd
            return self
        raise RunLockedError(f"could not take the lock {self.path}; other processes keep re-creating it")

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            self.path.unlink(missing_ok=True)  # before the release, so no one locks a file about to vanish
            os.close(self._fd)
            self._fd = None
