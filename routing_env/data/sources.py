"""Where a task's train / dev / test questions come from: a built-in benchmark or the user's own files.

:func:`resolve_task` turns what a user typed into a :class:`TaskSource`:

- a name from ``TASKS`` (``arc-easy``, ``obqa``, ...): the benchmark's own splits; or from ``MIXTURES``
  (``mix4``): the union of several benchmarks' splits, interleaved (``tasks.MixtureSpec``);
- a folder holding ``train``, ``dev`` (or ``validation``) and ``test`` files (``.jsonl`` or
  ``.jsonl.gz``);
- explicit files: ``train_file``, ``dev_file`` and ``test_file`` (``--train-file`` ... on the CLIs);
- one file: split deterministically by a hash of each question id (``SINGLE_FILE_FRACTIONS``), so
  that test accuracy is never measured on training questions and the split survives reordering.

Files are AI2 (ARC / OpenBookQA) or RACE records, detected per file. A custom source's identity
(``TaskSource.name``: run names, the warm-up cache, targets headers) is a readable name plus a hash
of the files' contents, so two different ``train.jsonl`` never share a run or a cache entry.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .tasks import (MIXTURES, SPLITS, TASKS, DataError, Format, MCExample, _iter_file, _open_text, _take, load_builtin,
                    task_names)

__all__ = ["SINGLE_FILE_FRACTIONS", "TaskSource", "describe_split", "detect_format", "load_task", "resolve_task", "split_of"]

#: How one file is split: a question goes to the first split whose cumulative share exceeds the
#: hash of its id (sha256, as a number in [0, 1)).
SINGLE_FILE_FRACTIONS: dict[str, float] = {"train": 0.8, "dev": 0.1, "test": 0.1}

# File names looked for in a task folder, per split (dev also as the hub's "validation").
_FOLDER_NAMES = {"train": ("train",), "dev": ("dev", "validation"), "test": ("test",)}
_SUFFIXES = (".jsonl.gz", ".jsonl")
_FORMS = ("a task name ({names}), a folder with train/dev/test .jsonl[.gz] files, one .jsonl[.gz] file "
          "(split by question-id hash), or --train-file/--dev-file/--test-file")


@dataclass(frozen=True)
class TaskSource:
    """A resolved task: ``name`` is its identity; ``files`` are set for the user's own data."""

    name: str  # built-in name, or "<readable>-<8 hex of the contents>"
    builtin: str | None = None  # key of TASKS or MIXTURES
    files: tuple[tuple[str, str], ...] = ()  # (split, path); one entry with split "all" for a single file
    spec: str = ""  # what was typed as the task (kept for re-creating the source in another process)

    @property
    def single_file(self) -> bool:
        return len(self.files) == 1

    def args(self) -> dict[str, str | None]:
        """The CLI fields (task, train_file, dev_file, test_file) that resolve to this source again."""
        if self.builtin or self.single_file or not self.files:
            return {"task": self.spec or self.name, "train_file": None, "dev_file": None, "test_file": None}
        f = dict(self.files)
        return {"task": self.spec, "train_file": f["train"], "dev_file": f["dev"], "test_file": f["test"]}

    def load(self, split: str, data_dir: str | os.PathLike[str] | None = None,
             limit: int | None = None) -> list[MCExample]:
        """The questions of ``split`` (train, dev or test), in file order; ``limit`` keeps the first N."""
        if self.builtin:
            return load_builtin(self.builtin, split, data_dir, limit)
        if split not in SPLITS:
            raise DataError(f"unknown split {split!r}: valid splits are {', '.join(SPLITS)}.")
        if self.single_file:
            path = Path(self.files[0][1])
            rows = (ex for ex in _iter_file(path, detect_format(path)) if split_of(ex.id) == split)
            where = f"{path} (its {split} share, by question-id hash)"
        else:
            path = Path(dict(self.files)[split])
            rows, where = _iter_file(path, detect_format(path)), str(path)
        out = _take(rows, limit)
        if not out and limit != 0:
            raise DataError(f"{where}: no questions. A task needs questions in each of train, dev and test; "
                            "add some or point at another file.")
        return out


def split_of(question_id: str) -> str:
    """The split a question of a single-file task belongs to (fixed by its id alone)."""
    u = int.from_bytes(hashlib.sha256(question_id.encode()).digest()[:8], "big") / 2.0**64
    total = 0.0
    for split, share in SINGLE_FILE_FRACTIONS.items():
        total += share
        if u < total:
            return split
    return "test"  # u within float rounding of 1


def detect_format(path: Path) -> Format:
    """``race`` when the first record has ``article`` and ``options``, else ``ai2`` (parse errors later)."""
    try:
        for line in _open_text(path):
            if line.strip():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    return "ai2"  # the parser reports the line
                return "race" if isinstance(rec, dict) and "article" in rec and "options" in rec else "ai2"
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read file ({e}). Re-copy the file or point at another one.") from e
    raise DataError(f"{path}: the file is empty (no questions). Add questions or point at another file.")


def _digest(files: list[tuple[str, Path]]) -> str:
    h = hashlib.sha256()
    for split, path in files:
        h.update(split.encode())
        h.update(path.read_bytes())
    if len(files) == 1:  # the split rule is part of what a single file means
        h.update(json.dumps(SINGLE_FILE_FRACTIONS, sort_keys=True).encode())
    return h.hexdigest()[:8]


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (*_SUFFIXES, ".gz", ".json"):
        if name.endswith(suffix):
            return name[: -len(suffix)] or "task"
    return name


def _folder_files(folder: Path) -> list[tuple[str, Path]]:
    files, missing = [], []
    for split, names in _FOLDER_NAMES.items():
        found = [folder / (n + s) for n in names for s in _SUFFIXES if (folder / (n + s)).is_file()]
        if not found:
            missing.append(" or ".join(n + s for n in names for s in _SUFFIXES))
        elif len(found) > 1:
            raise DataError(f"task folder {folder} has {len(found)} {split} files ({', '.join(p.name for p in found)}); "
                            "keep one.")
        else:
            files.append((split, found[0]))
    if missing:
        raise DataError(f"task folder {folder} lacks {'; '.join(missing)}. A task folder holds train, dev and test "
                        "files; or pass one file (split by question-id hash) or --train-file/--dev-file/--test-file.")
    return files


def resolve_task(task: str | TaskSource, train_file: str | None = None, dev_file: str | None = None,
                 test_file: str | None = None) -> TaskSource:
    """What ``task`` (and the explicit files, which win) names, checked before anything loads a model."""
    if isinstance(task, TaskSource):
        return task
    explicit = {"train": train_file, "dev": dev_file, "test": test_file}
    if any(explicit.values()):
        lacking = [f"--{s}-file" for s, p in explicit.items() if not p]
        if lacking:
            raise DataError(f"own split files need all three of --train-file, --dev-file, --test-file; missing "
                            f"{', '.join(lacking)} (or pass one file as --task to split it by question-id hash)")
        files = []
        for split, p in explicit.items():
            path = Path(str(p)).expanduser()
            if not path.is_file():
                raise DataError(f"--{split}-file {path} does not exist. Check the path.")
            files.append((split, path))
        readable = _stem(files[0][1].parent) if files[0][1].parent.name else "custom"
        name = f"{readable}-{_digest(files)}"
        return TaskSource(name, files=tuple((s, str(p)) for s, p in files), spec=str(task or ""))
    if task in TASKS or task in MIXTURES:
        return TaskSource(str(task), builtin=str(task), spec=str(task))
    path = Path(str(task)).expanduser()
    if path.is_dir():
        files = _folder_files(path)
        return TaskSource(f"{_stem(path.resolve())}-{_digest(files)}", files=tuple((s, str(p)) for s, p in files),
                          spec=str(task))
    if path.is_file():
        files = [("all", path)]
        return TaskSource(f"{_stem(path)}-{_digest(files)}", files=(("all", str(path)),), spec=str(task))
    raise DataError(f"unknown task {task!r}: not a task name and no such file or folder. Give "
                    + _FORMS.format(names=", ".join(task_names())) + ".")


def describe_split(source: TaskSource, counts: dict[str, int]) -> str:
    """One line saying how a task was split, printed by the scripts (a single file's split is implicit)."""
    n = ", ".join(f"{s} {counts[s]}" for s in SPLITS if s in counts)
    if source.single_file:
        shares = " / ".join(f"{s} {int(100 * f)}%" for s, f in SINGLE_FILE_FRACTIONS.items())
        return (f"task {source.name}: one file ({source.files[0][1]}) split by question-id hash into {shares}: {n} "
                "questions. For your own split give a folder or --train-file/--dev-file/--test-file.")
    if source.builtin:
        return f"task {source.name}: {n} questions"
    return f"task {source.name}: {n} questions from {', '.join(p for _, p in source.files)}"


def load_task(task: Any, split: str = "train", data_dir: str | os.PathLike[str] | None = None,
              limit: int | None = None) -> list[MCExample]:
    """Load ``split`` of ``task`` as a list of :class:`MCExample`, in file order.

    ``task`` is a name from :data:`TASKS` or :data:`MIXTURES`, or anything :func:`resolve_task` accepts (a
    folder of split files, one file split by question-id hash, a ``TaskSource``).  For a name the
    local data dir (``data_dir``, else ``$ROUTING_ENV_DATA``) is used when configured; only when
    none is configured is the Hugging Face hub tried.  ``limit`` keeps the first ``limit`` examples.
    """
    if isinstance(task, str) and (task in TASKS or task in MIXTURES):
        return load_builtin(task, split, data_dir, limit)
    return resolve_task(task).load(split, data_dir, limit)
