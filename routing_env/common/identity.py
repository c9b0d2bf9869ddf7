"""A run's identity: the settings that change what it computes, and where a result came from.

A run is exactly what its settings say. Resuming a run folder, reusing a finished stage's record or
replacing a results table is allowed only when every setting that changes the result is the same;
otherwise the caller refuses, naming each difference. Only the settings in ``RUN_PLACE_FIELDS``
(where a run runs, writes and logs) may differ.

Imports nothing heavy (no torch), so command lines can use it before any model code loads.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterable

__all__ = ["RUN_PLACE_FIELDS", "check_same_run", "provenance", "run_differences", "settings_tag"]

#: Settings that say where a run runs, writes and logs, not what it computes: the only ones a
#: resumed or reused run may change. Every other field (budget, schedule, MoE shape, strategy,
#: stage-3 options, seed, task) is part of the run's identity. ``device`` is among them because a
#: run resumed on another device continues the same computation; the tables say where each number
#: was computed.
RUN_PLACE_FIELDS = ("device", "name", "logdir", "resume", "log_every", "data_dir", "eval_batch_size", "eval_test",
                    "threads", "results_dir", "table_only", "overwrite", "compare_router")

#: Fields holding a path: compared as the file they name, not as the string typed.
_PATH_FIELDS = ("init_checkpoint", "targets", "train_file", "dev_file", "test_file", "checkpoint", "output")


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default  # type: ignore[misc]


def _same(key: str, a: Any, b: Any) -> bool:
    if key in _PATH_FIELDS and isinstance(a, str) and isinstance(b, str):
        return os.path.realpath(a) == os.path.realpath(b)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return list(a) == list(b)
    return a == b


def run_differences(cfg: Any, stored: dict, ignore: Iterable[str] = RUN_PLACE_FIELDS) -> list[str]:
    """``"key: <stored> there, <cfg's> here"`` for every identity field of ``cfg`` that ``stored`` differs in.

    ``cfg`` is a config dataclass, ``stored`` the ``asdict`` of the one a run was made with. A field
    the stored settings lack (written by an older version) had its present default then.
    """
    ignore = set(ignore)
    out = []
    for f in dataclasses.fields(cfg):
        if f.name in ignore:
            continue
        had, now = stored.get(f.name, _default(f)), getattr(cfg, f.name)
        if not _same(f.name, had, now):
            out.append(f"{f.name}: {had!r} there, {now!r} here")
    return out


def check_same_run(cfg: Any, stored: dict | None, where: str | Path, fix: str) -> None:
    """Refuse to resume or reuse the run at ``where`` when it was made with other settings, naming each.

    Resuming with another lr, batch size, epochs, rank, ... would otherwise train 0 steps and report
    the old model under the new settings, or call the old checkpoints damaged and retrain over them.
    ``fix`` tells the user what to do instead.
    """
    if stored is None:
        return
    diff = run_differences(cfg, stored)
    if diff:
        raise ValueError(f"{where} was made with other settings ({'; '.join(diff)}). A run is exactly what its settings "
                         f"say: {fix}")


def settings_tag(cfg: Any, names: Iterable[str]) -> str:
    """``""`` when the settings ``names`` of ``cfg`` are all at their defaults, else ``"-<8 hex>"`` naming them.

    Default settings keep plain names (``results/arc-easy.md``), so any other budget or option
    gets a name of its own and never reuses or replaces the default one's results.
    """
    defaults = {f.name: _default(f) for f in dataclasses.fields(cfg)}
    changed = {k: getattr(cfg, k) for k in names if getattr(cfg, k) != defaults[k]}
    return "-" + hashlib.sha256(json.dumps(changed, sort_keys=True).encode()).hexdigest()[:8] if changed else ""


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=Path(__file__).resolve().parent, capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def provenance() -> dict[str, str | None]:
    """Where a result came from: the command (relative to the working folder), the commit and the date (UTC).

    The commit gets ``+dirty`` when the checkout had uncommitted changes to tracked files. No
    absolute paths: an argument under the working folder is written relative to it.
    """
    cwd = os.getcwd()

    def rel(arg: str) -> str:  # "/abs/x" and "--flag=/abs/x" relative to the working folder
        flag, eq, value = arg.rpartition("=") if arg.startswith("--") and "=" in arg else ("", "", arg)
        return flag + eq + (os.path.relpath(value, cwd) if os.path.isabs(value) else value)

    main = sys.modules.get("__main__")
    module = getattr(getattr(main, "__spec__", None), "name", None)  # set when run as `python -m module`
    head = ["python", "-m", module.removesuffix(".__main__")] if module else ["python", rel(sys.argv[0])]
    command = shlex.join(head + [rel(a) for a in sys.argv[1:]])
    commit = _git("rev-parse", "--short=12", "HEAD")
    if commit and _git("status", "--porcelain", "--untracked-files=no"):
        commit += "+dirty"
    return {"command": command, "commit": commit,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
