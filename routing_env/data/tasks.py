"""Multiple-choice QA tasks: ARC-Easy, ARC-Challenge, OpenBookQA and RACE.

Every task is loaded into the same :class:`MCExample` record so that the
encoders and the training / evaluation loops never need to know which
benchmark a question came from.  Data is read from a local directory laid out
like ``/work/shared/data`` (see its README) when one is configured, and only
otherwise from the Hugging Face hub.

Besides the four benchmarks there are *mixtures* (:data:`MIXTURES`): ``mix4`` is one task over
ARC-Easy, ARC-Challenge, OpenBookQA and RACE together (see :class:`MixtureSpec`), for routing
that may carry which task a question comes from.

Every problem with the data raises :class:`DataError`, whose message names
both the problem and how to fix it; questions are never dropped silently,
because a silently shrunken evaluation split makes accuracies incomparable.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

logger = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("train", "dev", "test")
DATA_ENV_VAR = "ROUTING_ENV_DATA"

# Hint appended to every "where is the data" error so the fix is always visible.
_POINT_AT_DATA = (
    f"Point the project at the offline data folder with the --data-dir flag or the "
    f"{DATA_ENV_VAR} environment variable (e.g. {DATA_ENV_VAR}=/work/shared/data)."
)

Format = Literal["ai2", "race"]


class DataError(ValueError):
    """A problem with task data; the message names the problem and the fix."""


@dataclass(frozen=True)
class MCExample:
    """One multiple-choice question, normalised across benchmarks."""

    id: str
    question: str  # the stem (RACE: the question)
    choices: tuple[str, ...]  # option texts, in file order
    labels: tuple[str, ...]  # option labels as in the file ("A".. or "1"..)
    answer: int  # index into ``choices`` of the correct option
    context: str = ""  # RACE: the article; "" otherwise
    # Encoder pairs put the context after the question instead of before it, so that truncating the
    # first segment (from its end) cuts the article, never the question. Set by mixtures for RACE
    # (``MixtureSpec.question_first``); the single ``race`` task keeps article-first. Letter prompts
    # ignore it: they already trim the context from its start and keep the question whole.
    question_first: bool = False


@dataclass(frozen=True)
class TaskSpec:
    """Where a task lives on disk and on the hub, and how its rows look."""

    name: str
    fmt: Format  # record layout of the JSONL files
    subdir: str  # folder under the data dir
    stem_template: str  # file name without extension; ``{split}`` is filled in
    hub_path: str
    hub_config: str

    def candidate_paths(self, data_dir: Path, split: str) -> tuple[Path, Path]:
        """The files looked for, in order: gzipped first, then plain JSONL."""
        base = data_dir / self.subdir / self.stem_template.format(split=split)
        return (base.with_name(base.name + ".jsonl.gz"), base.with_name(base.name + ".jsonl"))


TASKS: dict[str, TaskSpec] = {
    "arc-easy": TaskSpec("arc-easy", "ai2", "arc", "arc-easy-{split}", "allenai/ai2_arc", "ARC-Easy"),
    "arc-challenge": TaskSpec(
        "arc-challenge", "ai2", "arc", "arc-challenge-{split}", "allenai/ai2_arc", "ARC-Challenge"
    ),
    "obqa": TaskSpec("obqa", "ai2", "obqa", "obqa-{split}", "allenai/openbookqa", "main"),
    "race": TaskSpec("race", "race", "race", "{split}", "ehovy/race", "all"),
}


@dataclass(frozen=True)
class MixtureSpec:
    """One task made of several built-in tasks' splits.

    Split ``s`` of the mixture is the union of split ``s`` of every source, each question once, its
    id prefixed ``"<source>:"`` (ids stay unique across sources), interleaved round-robin in
    ``sources`` order (the i-th question of each source, then the (i+1)-th, ...; a source that runs
    out drops out), so the first N questions -- ``--train-limit``, ``--eval-limit``, the gate's first
    dev questions -- hold an equal share of every source up to N = len(sources) x the smallest
    source. Deterministic: no seed. Choice counts may differ (ARC has 3- and 5-choice questions);
    the encoders pad and mask choices per batch as for any task.
    """

    name: str
    sources: tuple[str, ...]  # keys of TASKS
    question_first: tuple[str, ...] = ()  # sources whose context is rendered after the question


#: Mixtures of the built-in tasks. In ``mix4`` RACE is rendered question-first: with max_length 128
#: an article-first pair loses the question (and a MiniLM truncated to the article cannot tell which
#: question it answers); question-first, truncation cuts the article instead.
MIXTURES: dict[str, MixtureSpec] = {
    "mix4": MixtureSpec("mix4", ("arc-easy", "arc-challenge", "obqa", "race"), question_first=("race",)),
}

#: separator between a mixture question's source and its own id
MIX_ID_SEP = ":"

# The hub calls the dev split "validation".
_HUB_SPLIT = {"train": "train", "dev": "validation", "test": "test"}


def task_names() -> list[str]:
    """The built-in task names, benchmarks then mixtures (``sources.load_task`` also takes folders and files)."""
    return [*TASKS, *MIXTURES]


def resolve_data_dir(data_dir: str | os.PathLike[str] | None = None) -> Path | None:
    """Return the data dir: the explicit argument first, else ``$ROUTING_ENV_DATA``.

    Returns ``None`` when neither is set; no location is guessed, so that a run
    never silently reads data from somewhere the user did not ask for.
    """
    if data_dir is not None and str(data_dir) != "":
        return Path(data_dir).expanduser()
    env = os.environ.get(DATA_ENV_VAR, "").strip()
    return Path(env).expanduser() if env else None


# --------------------------------------------------------------------------- parsing


def _require(record: Mapping[str, Any], key: str, where: str, field: str | None = None) -> Any:
    """Fetch ``record[key]`` or raise a DataError naming the location and field."""
    if not isinstance(record, Mapping) or key not in record or record[key] is None:
        raise DataError(
            f"{where}: missing required field {field or key!r}. "
            "Fix or remove this line; every question must carry all required fields."
        )
    return record[key]


def _require_str(record: Mapping[str, Any], key: str, where: str, field: str | None = None) -> str:
    value = _require(record, key, where, field)
    if not isinstance(value, (str, int)) or isinstance(value, bool):
        raise DataError(f"{where}: field {field or key!r} must be a string, got {type(value).__name__}.")
    # Some exports store labels / keys as integers; compare them as text.
    return str(value)


def _build(
    qid: str,
    question: str,
    choices: list[str],
    labels: list[str],
    key: str,
    where: str,
    context: str = "",
) -> MCExample:
    """Validate the choice structure and build the example."""
    if len(choices) < 2:
        raise DataError(
            f"{where} (id {qid!r}): question has {len(choices)} choice(s); at least 2 are needed. "
            "Fix or remove this question in the data file."
        )
    if key not in labels:
        raise DataError(
            f"{where} (id {qid!r}): answer key {key!r} is not among the choice labels {labels}. "
            "Fix the answer key or the labels in the data file."
        )
    return MCExample(
        id=qid,
        question=question,
        choices=tuple(choices),
        labels=tuple(labels),
        answer=labels.index(key),
        context=context,
    )


def _parse_ai2(record: Mapping[str, Any], where: str) -> MCExample:
    """Parse an AI2 (ARC / OpenBookQA) record; extra fields such as ``fact1`` are ignored."""
    qid = _require_str(record, "id", where)
    q = _require(record, "question", where)
    if not isinstance(q, Mapping):
        raise DataError(f"{where} (id {qid!r}): field 'question' must be an object with 'stem' and 'choices'.")
    stem = _require_str(q, "stem", where, "question.stem")
    raw_choices = _require(q, "choices", where, "question.choices")
    if not isinstance(raw_choices, list):
        raise DataError(f"{where} (id {qid!r}): field 'question.choices' must be a list.")
    choices: list[str] = []
    labels: list[str] = []
    for i, c in enumerate(raw_choices):
        choices.append(_require_str(c, "text", where, f"question.choices[{i}].text"))
        labels.append(_require_str(c, "label", where, f"question.choices[{i}].label"))
    key = _require_str(record, "answerKey", where)
    return _build(qid, stem, choices, labels, key.strip(), where)


def _parse_race(record: Mapping[str, Any], where: str) -> MCExample:
    """Parse a RACE record; options are labelled A, B, C, ... in order."""
    qid = _require_str(record, "id", where)
    article = _require_str(record, "article", where)
    question = _require_str(record, "question", where)
    options = _require(record, "options", where)
    if not isinstance(options, list) or not all(isinstance(o, str) for o in options):
        raise DataError(f"{where} (id {qid!r}): field 'options' must be a list of strings.")
    labels = [chr(ord("A") + i) for i in range(len(options))]
    key = _require_str(record, "answer", where)
    return _build(qid, question, list(options), labels, key.strip(), where, context=article)


_PARSERS = {"ai2": _parse_ai2, "race": _parse_race}


def _open_text(path: Path) -> Iterator[str]:
    """Yield lines of a JSONL file, gzipped or not (told by its first bytes, whatever its name says)."""
    with open(path, "rb") as fh:
        gzipped = fh.read(2) == b"\x1f\x8b"
    opener = gzip.open if gzipped else open
    with opener(path, "rt", encoding="utf-8") as fh:  # type: ignore[operator]
        yield from fh


def _take(rows: Iterable[MCExample], limit: int | None) -> list[MCExample]:
    """First ``limit`` rows, reading no further than needed (RACE train is large)."""
    out: list[MCExample] = []
    if limit == 0:
        return out
    for ex in rows:
        out.append(ex)
        if limit is not None and len(out) >= limit:
            break
    return out


def _iter_file(path: Path, fmt: Format) -> Iterator[MCExample]:
    parse = _PARSERS[fmt]
    seen: dict[str, int] = {}  # id -> line: ids key routing targets and results, so they must be unique
    try:
        lines = _open_text(path)
        for lineno, line in enumerate(lines, start=1):
            if not line.strip():
                continue  # blank lines (e.g. a trailing newline) are not questions
            where = f"{path}, line {lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: malformed JSON ({e}). Fix or remove this line.") from e
            if not isinstance(record, dict):
                raise DataError(f"{where}: expected a JSON object per line, got {type(record).__name__}.")
            ex = parse(record, where)
            if ex.id in seen:
                raise DataError(f"{where}: question id {ex.id!r} already used on line {seen[ex.id]}. Ids must be "
                                "unique (routing targets and results are keyed by id); rename or remove one.")
            seen[ex.id] = lineno
            yield ex
    except (OSError, EOFError, UnicodeDecodeError) as e:
        # Truncated gzip streams and bad encodings surface here.
        raise DataError(f"{path}: cannot read file ({e}). Re-copy the file or point at another data dir.") from e


def _check_limit(limit: int | None) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise DataError(f"limit must be a non-negative integer or None, got {limit!r}.")


def load_file(path: str | os.PathLike[str], fmt: Format = "ai2", limit: int | None = None) -> list[MCExample]:
    """Load one JSONL / JSONL.gz file in AI2 (``"ai2"``) or RACE (``"race"``) layout."""
    _check_limit(limit)
    if fmt not in _PARSERS:
        raise DataError(f"unknown file format {fmt!r}; use one of {sorted(_PARSERS)}.")
    p = Path(path)
    if not p.is_file():
        raise DataError(f"data file {p} does not exist. Check the path.")
    return _take(_iter_file(p, fmt), limit)


# --------------------------------------------------------------------------- hub


def _hub_to_record(spec: TaskSpec, row: Mapping[str, Any]) -> dict[str, Any]:
    """Convert a hub row to the on-disk record layout so one parser validates both."""
    if spec.fmt == "race":
        return {
            "id": row.get("example_id"),
            "article": row.get("article"),
            "question": row.get("question"),
            "options": row.get("options"),
            "answer": row.get("answer"),
        }
    # ai2_arc has "question"; openbookqa calls the same thing "question_stem".
    stem = row.get("question_stem", row.get("question"))
    raw = row.get("choices") or {}
    texts = list(raw.get("text") or [])
    labels = list(raw.get("label") or [])
    if len(texts) != len(labels):
        labels = labels[: len(texts)] + [None] * (len(texts) - len(labels))
    return {
        "id": row.get("id"),
        "question": {"stem": stem, "choices": [{"text": t, "label": lb} for t, lb in zip(texts, labels)]},
        "answerKey": row.get("answerKey"),
    }


def _iter_hub(spec: TaskSpec, split: str) -> Iterator[MCExample]:
    hub_split = _HUB_SPLIT[split]
    name = f"hub dataset {spec.hub_path} (config {spec.hub_config}, split {hub_split})"
    try:
        import datasets  # imported lazily: local runs never need it

        ds = datasets.load_dataset(spec.hub_path, spec.hub_config, split=hub_split)
    except Exception as e:  # network, auth, missing package: all mean "use local data"
        raise DataError(
            f"no data dir is configured and loading the {name} failed ({type(e).__name__}: {e}). "
            + _POINT_AT_DATA
        ) from e
    parse = _PARSERS[spec.fmt]
    for i, row in enumerate(ds, start=1):
        yield parse(_hub_to_record(spec, row), f"{name}, row {i}")


# --------------------------------------------------------------------------- public


def load_builtin(
    task: str,
    split: str = "train",
    data_dir: str | os.PathLike[str] | None = None,
    limit: int | None = None,
) -> list[MCExample]:
    """Load ``split`` of the built-in task or mixture ``task`` (:data:`TASKS`, :data:`MIXTURES`), in file order.

    The local data dir (``data_dir``, else ``$ROUTING_ENV_DATA``) is used when configured; only when
    none is configured is the Hugging Face hub tried.  ``limit`` keeps the first ``limit`` examples.
    ``sources.load_task`` takes folders, files and ``TaskSource`` objects as well.
    """
    _check_limit(limit)
    if task in MIXTURES:
        return _load_mixture(MIXTURES[task], split, data_dir, limit)
    if task not in TASKS:
        raise DataError(f"unknown built-in task {task!r}: valid names are {', '.join(task_names())}")
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}: valid splits are {', '.join(SPLITS)}.")
    spec = TASKS[task]
    root = resolve_data_dir(data_dir)
    if root is None:
        logger.info("no data dir configured; loading %s/%s from the Hugging Face hub", task, split)
        return _take(_iter_hub(spec, split), limit)
    candidates = spec.candidate_paths(root, split)
    for path in candidates:
        if path.is_file():
            out = _take(_iter_file(path, spec.fmt), limit)
            if not out and limit != 0:
                raise DataError(f"{path}: no questions. Re-copy the file or point at another data dir.")
            return out
    missing_root = "" if root.is_dir() else f" (the data dir {root} does not exist)"
    raise DataError(
        f"data for task {task!r} split {split!r} not found{missing_root}; looked for "
        + " and ".join(str(p) for p in candidates)
        + ". "
        + _POINT_AT_DATA
    )


def _load_mixture(mix: MixtureSpec, split: str, data_dir: str | os.PathLike[str] | None,
                  limit: int | None) -> list[MCExample]:
    """Split ``split`` of a mixture, interleaved round-robin (:class:`MixtureSpec`); ``limit`` keeps the first N."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}: valid splits are {', '.join(SPLITS)}.")
    # The first N of the mixture never need more than N of any one source (RACE train is large).
    parts = [load_builtin(src, split, data_dir, limit) for src in mix.sources]
    rows = (
        replace(part[i], id=f"{src}{MIX_ID_SEP}{part[i].id}", question_first=src in mix.question_first)
        for i in range(max(len(p) for p in parts))
        for src, part in zip(mix.sources, parts)
        if i < len(part)
    )
    return _take(rows, limit)
