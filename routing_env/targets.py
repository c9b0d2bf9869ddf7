"""Routing-targets files: the contract between the search (stage 2) and the supervised fine-tune (stage 3).

JSON Lines, written incrementally so an interrupted search resumes where it stopped:

* line 1, the header: ``{"format": "routing-targets", "version": 1, "env_id", "task", "split",
  "fingerprint" (of the warm-up model), "num_groups" G, "num_experts" E, "num_actions" A,
  "group_experts" [G] (a MoLA model's experts per group; absent: E in every group), "action_mode",
  "agent", "agent_config", ...}``;
* then one record per example: ``{"example", "id", "targets" [G][A], "values" [G][A] (null = not
  estimated), "path" [G], "outcome", "correct", "loads" [G][E], "balance"}``.

``load_targets`` validates every line (file and line in each error) and ``check_compatible``
refuses a file made for another model, naming every field that differs.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np

from routing_env.safefiles import atomic_write_text

__all__ = ["FORMAT", "VERSION", "MATCH_KEYS", "TargetsError", "RoutingTargets", "TargetsWriter", "load_targets",
           "check_compatible"]

FORMAT, VERSION = "routing-targets", 1
#: Header fields that must agree between a targets file and the model/env it is used with.
MATCH_KEYS = ("task", "fingerprint", "num_groups", "num_experts", "num_actions", "action_mode", "group_experts")


class TargetsError(ValueError):
    """A routing-targets file that is malformed or does not match the model it is applied to."""


@dataclass
class RoutingTargets:
    header: dict
    records: dict[str, dict] = field(default_factory=dict)  # example id -> record with numpy arrays

    def __len__(self) -> int:
        return len(self.records)


def _jsonable(rec: dict) -> dict:
    out = {}
    for k, v in rec.items():
        if isinstance(v, np.ndarray):
            v = v.tolist()
        if isinstance(v, (np.floating, np.integer, np.bool_)):
            v = v.item()
        out[k] = v
    if "values" in out:  # JSON has no NaN: unestimated values are null
        out["values"] = [[None if (x is None or (isinstance(x, float) and math.isnan(x))) else x for x in row]
                         for row in out["values"]]
    return out


def _parse_record(line: str, path: Path, lineno: int, header: dict) -> dict:
    where = f"{path}:{lineno}"
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as e:
        raise TargetsError(f"{where}: malformed JSON ({e.msg})") from e
    missing = [k for k in ("id", "targets", "path") if k not in rec]
    if missing:
        raise TargetsError(f"{where}: record lacks {', '.join(missing)}")
    G, A = header["num_groups"], header["num_actions"]
    t = np.asarray(rec["targets"], dtype=float)
    if t.shape != (G, A):
        raise TargetsError(f"{where}: targets of example {rec['id']!r} are {list(t.shape)}, the header says [G, A] = [{G}, {A}]")
    if not np.isfinite(t).all() or (t < 0).any() or not np.allclose(t.sum(1), 1.0, atol=1e-4):
        raise TargetsError(f"{where}: targets of example {rec['id']!r} are not distributions (each group's row must be >= 0 and sum to 1)")
    p = np.asarray(rec["path"], dtype=int)
    if p.shape != (G,) or (p < 0).any() or (p >= A).any():
        raise TargetsError(f"{where}: path of example {rec['id']!r} must be {G} actions in [0, {A}), got {rec['path']}")
    widths = header.get("group_experts")
    if widths is not None and header.get("action_mode", "primary") == "primary":  # MoLA: fewer experts below
        for g, w in enumerate(widths):
            if p[g] >= w or t[g, w:].any():
                raise TargetsError(f"{where}: group {g} has {w} experts (header group_experts {widths}), but example "
                                   f"{rec['id']!r} routes or targets an expert at index {w} or above there")
    rec["targets"], rec["path"] = t, p
    try:
        values = np.array([[np.nan if x is None else x for x in row] for row in rec.get("values", [[None] * A] * G)], float)
    except (TypeError, ValueError) as e:
        raise TargetsError(f"{where}: values of example {rec['id']!r} must be a [G][A] array of numbers or null ({e})") from e
    if values.shape != (G, A) or np.isinf(values).any():
        # null (not estimated) is allowed; an infinite value would turn the value-gap weights and
        # the softmax target forms into NaN and train the adapters to NaN.
        raise TargetsError(f"{where}: values of example {rec['id']!r} must be [G, A] = [{G}, {A}] finite numbers or "
                           f"null, got shape {list(values.shape)}{' with an infinite value' if np.isinf(values).any() else ''}")
    rec["values"] = values
    if "loads" in rec:
        rec["loads"] = np.asarray(rec["loads"], dtype=float)
    return rec


def _read(path: Path) -> tuple[dict, list[dict], int]:
    """Header, records, and the byte length of the well-formed part (a torn last line is left out)."""
    data = path.read_bytes()
    lines = data.split(b"\n")
    if not lines[0].strip():
        raise TargetsError(f"{path}:1: empty file; expected a routing-targets header line")
    try:
        header = json.loads(lines[0])
    except json.JSONDecodeError as e:
        raise TargetsError(f"{path}:1: malformed header ({e.msg})") from e
    if header.get("format") != FORMAT:
        raise TargetsError(f"{path}:1: not a routing-targets file (format {header.get('format')!r})")
    if header.get("version") != VERSION:
        raise TargetsError(f"{path}:1: format version {header.get('version')} is not supported (this library reads {VERSION})")
    records, good = [], len(lines[0]) + 1
    seen: dict[str, int] = {}  # id -> line
    for n, raw in enumerate(lines[1:], start=2):
        if not raw.strip():
            good += len(raw) + 1
            continue
        last = n == len(lines) and not data.endswith(b"\n")
        try:
            records.append(_parse_record(raw.decode(), path, n, header))
        except TargetsError:
            if last:  # the run was interrupted mid-write: drop the torn line, keep the rest
                break
            raise
        good += len(raw) + 1
        if str(records[-1]["id"]) in seen:  # two writers on one file, or files concatenated
            raise TargetsError(f"{path}:{n}: example {records[-1]['id']!r} already has a record (line "
                               f"{seen[str(records[-1]['id'])]}); one record per example: remove the duplicate or "
                               "search again with --overwrite")
        seen[str(records[-1]["id"])] = n
    return header, records, min(good, len(data))


def load_targets(path: str | os.PathLike) -> RoutingTargets:
    """Read and validate a routing-targets file."""
    path = Path(path)
    if not path.is_file():
        raise TargetsError(f"no routing-targets file at {path}; make one with `python train_rl.py --env ... --output {path}`")
    header, records, _ = _read(path)
    return RoutingTargets(header, {str(r["id"]): r for r in records})


def check_compatible(header: dict, expected: dict, what: str = "this model") -> None:
    """Raise ``TargetsError`` naming every ``MATCH_KEYS`` field where ``header`` and ``expected`` differ."""
    diffs = [f"{k}: file has {header.get(k)!r}, {what} has {expected[k]!r}"
             for k in MATCH_KEYS if k in expected and header.get(k) != expected[k]]
    if diffs:
        raise TargetsError("routing targets do not match " + what + ": " + "; ".join(diffs))


class TargetsWriter:
    """Append records to a targets file; on an existing file, check its header and resume after it."""

    def __init__(self, path: str | os.PathLike, header: dict, overwrite: bool = False) -> None:
        self.path = Path(path)
        self.header = {"format": FORMAT, "version": VERSION, **header}
        self.done: dict[str, dict] = {}
        if self.path.is_file() and not overwrite:
            old, records, good = _read(self.path)
            check_compatible(old, self.header, "this run")
            for k in ("agent", "agent_config", "env_id", "split"):
                if old.get(k) != self.header.get(k):
                    raise TargetsError(f"{self.path} was written with {k}={old.get(k)!r}, this run has {self.header.get(k)!r}; "
                                       "pass another --output, or --overwrite to start again")
            with open(self.path, "r+b") as f:  # cut a torn last line so appends start on a clean line
                f.truncate(good)
                if good and not self.path.read_bytes().endswith(b"\n"):
                    f.seek(0, 2)
                    f.write(b"\n")
            self.done = {str(r["id"]): r for r in records}
        else:
            atomic_write_text(self.path, json.dumps(self.header) + "\n")

    def write(self, records: Iterable[dict]) -> None:
        with open(self.path, "a") as f:
            for rec in records:
                f.write(json.dumps(_jsonable(rec)) + "\n")
                self.done[str(rec["id"])] = rec
            f.flush()
            os.fsync(f.fileno())
