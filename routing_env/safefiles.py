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

__all__ = ["COMPLETE", "RunLock", "RunLockedError", "atomic_write", "atomic_write_text", "is_complete",
           "mark_complete"]

#: The marker file of a complete checkpoint folder (its content: the names of the files it vouches for).
COMPLETE = "COMPLETE"


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


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class RunLock:
    """``with RunLock(run_dir):`` -- the only writer of ``run_dir`` until the block ends.

    The lock is a file holding the owner's pid, created with ``O_EXCL``. A lock whose pid is no
    longer running (the owner was killed) is taken over, so a crash never blocks the resume.
    """

    def __init__(self, folder: str | os.PathLike[str], name: str = ".lock") -> None:
        self.path = Path(folder) / name

    @classmethod
    def for_file(cls, path: str | os.PathLike[str]) -> RunLock:
        """A lock for one file that several runs could append to (``.<name>.lock`` beside it)."""
        return cls(Path(path).parent, f".{Path(path).name}.lock")

    def __enter__(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    pid = int(self.path.read_text().strip() or 0)
                except (OSError, ValueError):
                    pid = 0
                if pid and pid != os.getpid() and _alive(pid):
                    raise RunLockedError(
                        f"{self.path.parent} is in use by process {pid} (lock file {self.path}). Wait for it to "
                        f"finish, stop it, or use another run name; if pid {pid} is not this job, delete the lock.")
                self.path.unlink(missing_ok=True)  # stale: its owner is gone
                continue
            with os.fdopen(fd, "w") as fh:
                fh.write(str(os.getpid()))
            return self
        raise RunLockedError(f"could not take the lock {self.path}; another process keeps re-creating it")

    def __exit__(self, *exc: object) -> None:
        self.path.unlink(missing_ok=True)
