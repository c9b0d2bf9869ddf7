"""Own data: task folders, explicit split files, one file split by id hash, and content identity."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

from routing_env.data import SINGLE_FILE_FRACTIONS, SPLITS, DataError, load_file, load_task, resolve_task
from routing_env.data.sources import split_of


def _ai2(qid: str, key: str = "A") -> dict[str, Any]:
    return {"id": qid, "question": {"stem": f"stem {qid}", "choices": [{"text": f"o{lb}", "label": lb} for lb in "ABCD"]},
            "answerKey": key}


def _race(qid: str) -> dict[str, Any]:
    return {"id": qid, "article": "An article.", "question": f"q {qid}?", "options": ["a", "b", "c", "d"], "answer": "C"}


def _write(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _folder(root: Path, dev_name: str = "dev", n: int = 3, make=_ai2) -> Path:
    for split in ("train", dev_name, "test"):
        _write(root / f"{split}.jsonl", [make(f"{split}-{i}") for i in range(n)])
    return root


def test_single_file_split_is_disjoint_stable_and_near_its_fractions(tmp_path: Path) -> None:
    records = [_ai2(f"q{i}") for i in range(2000)]
    a = _write(tmp_path / "a" / "mine.jsonl", records)
    shuffled = records[:]
    random.Random(0).shuffle(shuffled)
    b = _write(tmp_path / "b" / "mine.jsonl", shuffled)
    ids_a = {s: [ex.id for ex in load_task(str(a), s)] for s in SPLITS}
    ids_b = {s: {ex.id for ex in load_task(str(b), s)} for s in SPLITS}
    assert all(set(ids_a[s]) == ids_b[s] for s in SPLITS)  # fixed by the ids, not by their order
    assert sum(len(v) for v in ids_a.values()) == 2000 and len(set().union(*map(set, ids_a.values()))) == 2000
    for s, share in SINGLE_FILE_FRACTIONS.items():  # binomial sd at n=2000 is <= 0.9 points
        assert abs(len(ids_a[s]) / 2000 - share) < 0.04, (s, len(ids_a[s]))
    assert all(split_of(i) == s for s, v in ids_a.items() for i in v)


def test_folder_and_explicit_files_give_each_split_its_own_file(tmp_path: Path) -> None:
    root = _folder(tmp_path / "mytask", dev_name="validation")
    for split in SPLITS:
        assert [ex.id for ex in load_task(str(root), split)] == [f"{'validation' if split == 'dev' else split}-{i}"
                                                                 for i in range(3)]
    src = resolve_task("ignored", train_file=str(root / "train.jsonl"), dev_file=str(root / "validation.jsonl"),
                       test_file=str(root / "test.jsonl"))
    assert src.load("test") == load_file(root / "test.jsonl")
    assert resolve_task(**src.args()) == src  # what the scripts pass on re-creates the same source


def test_race_records_are_detected(tmp_path: Path) -> None:
    root = _folder(tmp_path / "r", make=_race)
    [ex, *_] = load_task(str(root), "dev")
    assert ex.context == "An article." and ex.answer == 2


def test_identity_is_name_plus_content_hash(tmp_path: Path) -> None:
    one = _folder(tmp_path / "x" / "data")
    two = _folder(tmp_path / "y" / "data")
    assert resolve_task(str(one)).name == resolve_task(str(two)).name  # same contents, same identity
    _write(two / "train.jsonl", [_ai2("other")])
    names = {resolve_task(str(one)).name, resolve_task(str(two)).name}
    assert len(names) == 2 and all(n.startswith("data-") for n in names)
    f1, f2 = _write(tmp_path / "p" / "train.jsonl", [_ai2("a")]), _write(tmp_path / "q" / "train.jsonl", [_ai2("b")])
    assert resolve_task(str(f1)).name != resolve_task(str(f2)).name  # no shared "train" stem any more
    assert resolve_task("arc-easy").name == "arc-easy"


@pytest.mark.parametrize("kwargs, needle", [
    ({"train_file": "t.jsonl"}, "--dev-file, --test-file"),
    ({"train_file": "nope.jsonl", "dev_file": "d", "test_file": "e"}, "--train-file nope.jsonl does not exist"),
])
def test_explicit_files_errors_name_the_flag(kwargs: dict, needle: str) -> None:
    with pytest.raises(DataError, match=needle):
        resolve_task("x", **kwargs)


def test_folder_errors(tmp_path: Path) -> None:
    _write(tmp_path / "f" / "train.jsonl", [_ai2("a")])
    with pytest.raises(DataError, match="lacks dev.jsonl.gz or dev.jsonl or validation"):
        resolve_task(str(tmp_path / "f"))
    root = _folder(tmp_path / "g")
    _write(root / "validation.jsonl", [_ai2("v")])
    with pytest.raises(DataError, match="2 dev files"):
        resolve_task(str(root))


def test_empty_inputs_are_refused(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match="empty"):
        load_task(str(empty), "train")
    root = _folder(tmp_path / "h")
    (root / "test.jsonl").write_text("")
    with pytest.raises(DataError, match="no questions"):
        load_task(str(root), "test")
    tiny = _write(tmp_path / "tiny.jsonl", [_ai2("only")])  # one question: two of the three splits are empty
    empty_splits = [s for s in SPLITS if s != split_of("only")]
    with pytest.raises(DataError, match="no questions"):
        load_task(str(tiny), empty_splits[0])
