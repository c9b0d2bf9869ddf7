"""Routing-targets files: the contract between the search (stage 2) and the supervised fine-tune (stage 3).

The file format, and how a record becomes a target distribution (``target_form``: as written, one-hot
or a softmax of the process values, ``q_targets``; ``balance_targets``): agents and stage 3 read both here.

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

from routing_env.common.configs import TARGET_BALANCING, TARGET_FORMS  # the choices, declared once
from routing_env.common.safefiles import atomic_write_text

__all__ = ["FORMAT", "VERSION", "MATCH_KEYS", "TARGET_FORMS", "TARGET_BALANCING", "TargetsError", "RoutingTargets",
           "TargetsWriter", "balance_targets", "check_compatible", "load_targets", "q_targets", "target_form"]

FORMAT, VERSION = "routing-targets", 1
#: Header fields that must agree between a targets file and the model/env it is used with.
MATCH_KEYS = ("task", "fingerprint", "num_groups", "num_experts", "num_actions", "action_mode", "group_experts")


def balance_targets(targets: np.ndarray, iters: int = 200, smoothing: float = 1e-3) -> np.ndarray:
    """Sinkhorn projection of ``targets [N, E]`` (one group's targets over N questions) onto balance.

    Returns ``diag(u) (targets + smoothing) diag(v)`` with every row summing to 1 and every column
    to ``N / E``. Column scaling is shared by all questions, so which questions prefer expert e over
    f *more than the others do* is kept (the odds ratio ``t_e / t_f`` of every question is scaled by
    the same factor), while an expert the searched targets favour across the whole split is scaled
    down for everyone. Why: a router that cannot tell the questions apart (hindsight routes are
    barely predictable from the input) drifts toward the expert the targets name most often, so
    even a mildly skewed target histogram trains an imbalanced model (results/ablations.md: one-hot
    oracle targets raise dev CV from 0.15 to 0.41). ``smoothing`` keeps one-hot rows rescalable.
    """
    t = np.asarray(targets, dtype=float) + smoothing
    n, e = t.shape
    col = np.full(e, n / e)
    for _ in range(iters):
        t = t / t.sum(1, keepdims=True)  # rows: distributions
        t = t * (col / t.sum(0))[None, :]  # columns: equal mass
    return t / t.sum(1, keepdims=True)


def q_targets(q: np.ndarray, temperature: float) -> np.ndarray:
    """A target distribution from action values ``q [..., A]``: softmax at ``temperature``, one-hot at 0.

    Q is in log-probability units, so temperature 1 weighs each route by how much more likely it
    makes the correct answer; ties at temperature 0 go to the lower index. NaN (an action whose value
    was not estimated, as in MCTS) gets no mass.
    """
    q = np.asarray(q, dtype=float)
    if temperature <= 0:
        return np.eye(q.shape[-1])[np.nanargmax(q, -1)]
    z = np.where(np.isnan(q), -np.inf, q - np.nanmax(q, -1, keepdims=True)) / temperature
    w = np.exp(z)
    return w / w.sum(-1, keepdims=True)


def target_form(record: dict, form: str, temperature: float) -> np.ndarray:
    """``[G, E]`` targets of one record in the chosen form (see ``TARGET_FORMS``)."""
    if form == "file":
        return record["targets"]
    q = np.asarray(record["values"], dtype=float)  # [G, E], NaN = not estimated
    if np.isnan(q).all(1).any():
        raise ValueError(f"target form {form!r} needs process values for every group; example {record['id']!r} has none "
                         "(a file from an agent without values: use --target-form file)")
    return q_targets(q, 0.0 if form == "onehot" else temperature)


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
