"""Tests for routing_env.data.tasks against the real offline data and malformed inputs."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import pytest

from routing_env.data import (
    DATA_ENV_VAR,
    SPLITS,
    TASKS,
    DataError,
    MCExample,
    load_file,
    load_task,
    resolve_data_dir,
    task_names,
)




def _ai2(qid: str, key: str = "A", labels: str = "ABCD") -> dict[str, Any]:
    return {
        "id": qid,
        "question": {"stem": f"stem {qid}", "choices": [{"text": f"opt {lb}", "label": lb} for lb in labels]},
        "answerKey": key,
    }


def _write(path: Path, lines: list[str]) -> Path:
    text = "\n".join(lines) + "\n"
    if path.name.endswith(".gz"):
        with gzip.open(path, "wt", encoding="utf-8") as fh:
            fh.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- real data

EXPECTED = {
    ("arc-easy", "train"): 2251,
    ("arc-easy", "dev"): 570,
    ("arc-easy", "test"): 2376,
    ("arc-challenge", "train"): 1119,
    ("arc-challenge", "dev"): 299,
    ("arc-challenge", "test"): 1172,
    ("obqa", "train"): 4957,
    ("obqa", "dev"): 500,
    ("obqa", "test"): 500,
    ("race", "dev"): 4887,
    ("race", "test"): 4934,
}


@pytest.mark.parametrize(("task", "split"), sorted(EXPECTED))
def test_real_counts(data_dir: Path, task: str, split: str) -> None:
    examples = load_task(task, split, data_dir=data_dir)
    assert len(examples) == EXPECTED[(task, split)]
    assert len({ex.id for ex in examples}) == len(examples)
    for ex in examples:
        assert isinstance(ex, MCExample)
        assert 0 <= ex.answer < len(ex.choices) == len(ex.labels)


def _raw_keys(path: Path) -> dict[str, str]:
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        return {d["id"]: d["answerKey"] for d in map(json.loads, fh) if d}


def test_arc_easy_structure(data_dir: Path) -> None:
    examples = load_task("arc-easy", "train", data_dir=data_dir)
    sizes = {len(ex.choices) for ex in examples}
    assert {3, 4, 5} <= sizes
    assert any(ex.labels[0] == "1" for ex in examples), "some ARC labels are digits"
    keys = _raw_keys(data_dir / "arc" / "arc-easy-train.jsonl.gz")
    for ex in examples:
        assert ex.labels[ex.answer] == keys[ex.id]
        assert ex.context == ""
    digit = next(ex for ex in examples if ex.labels[0] == "1")
    assert digit.labels[: len(digit.choices)] == tuple(str(i + 1) for i in range(len(digit.choices)))


def test_race_carries_article(data_dir: Path) -> None:
    examples = load_task("race", "dev", data_dir=data_dir, limit=50)
    assert len(examples) == 50
    with gzip.open(data_dir / "race" / "dev.jsonl.gz", "rt", encoding="utf-8") as fh:
        first = json.loads(fh.readline())
    ex = examples[0]
    assert ex.id == first["id"] and ex.context == first["article"] and ex.question == first["question"]
    assert ex.choices == tuple(first["options"]) and ex.labels == ("A", "B", "C", "D")
    assert ex.labels[ex.answer] == first["answer"]
    assert all(len(e.context) > 100 for e in examples)


def test_limit_is_prefix(data_dir: Path) -> None:
    full = load_task("obqa", "dev", data_dir=data_dir)
    assert load_task("obqa", "dev", data_dir=data_dir, limit=7) == full[:7]
    assert load_task("obqa", "dev", data_dir=data_dir, limit=0) == []


def test_env_var_is_used(data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DATA_ENV_VAR, str(data_dir))
    assert len(load_task("arc-challenge", "dev")) == 299


def test_real_file_as_task_path_is_split_not_reused(data_dir: Path) -> None:
    """One file as the task: each split is a disjoint share of it (never test on training questions)."""
    path = data_dir / "arc" / "arc-challenge-dev.jsonl.gz"
    whole = load_file(path)
    parts = {s: load_task(str(path), split=s) for s in SPLITS}
    ids = {s: {ex.id for ex in exs} for s, exs in parts.items()}
    assert not ids["train"] & ids["test"] and not ids["train"] & ids["dev"] and not ids["dev"] & ids["test"]
    assert set().union(*ids.values()) == {ex.id for ex in whole}
    assert parts["train"] == [ex for ex in whole if ex.id in ids["train"]]  # file order kept


# ----------------------------------------------------------------------------- resolution


def test_resolve_data_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(DATA_ENV_VAR, raising=False)
    assert resolve_data_dir() is None
    monkeypatch.setenv(DATA_ENV_VAR, str(tmp_path / "env"))
    assert resolve_data_dir() == tmp_path / "env"
    assert resolve_data_dir(tmp_path / "flag") == tmp_path / "flag"  # flag wins
    assert resolve_data_dir(str(tmp_path)) == tmp_path


def test_task_names() -> None:
    assert list(TASKS) == ["arc-easy", "arc-challenge", "obqa", "race"]
    assert task_names() == [*TASKS, "mix4"]  # benchmarks, then mixtures
    assert SPLITS == ("train", "dev", "test")


# ----------------------------------------------------------------------------- malformed input


def test_gzip_named_jsonl_is_read(tmp_path: Path) -> None:
    lines = [json.dumps(_ai2("q1", "B")), json.dumps(_ai2("q2"))]
    real_gz = _write(tmp_path / "a.jsonl.gz", lines)
    misnamed = tmp_path / "a.jsonl"
    misnamed.write_bytes(real_gz.read_bytes())
    assert load_file(misnamed) == load_file(real_gz) and len(load_file(misnamed)) == 2


def test_duplicate_ids_name_both_lines(tmp_path: Path) -> None:
    path = _write(tmp_path / "dup.jsonl", [json.dumps(_ai2("q1")), json.dumps(_ai2("q2")), json.dumps(_ai2("q1"))])
    with pytest.raises(DataError, match="line 3") as info:
        load_file(path)
    assert "'q1'" in str(info.value) and "line 1" in str(info.value) and "dup.jsonl" in str(info.value)


def test_gz_and_plain_load_the_same(tmp_path: Path) -> None:
    lines = [json.dumps(_ai2("q1", "B")), "", json.dumps(_ai2("q2", "3", "1234"))]
    gz = load_file(str(_write(tmp_path / "a.jsonl.gz", lines)))
    plain = load_file(str(_write(tmp_path / "b.jsonl", lines)))
    assert gz == plain and len(gz) == 2  # the blank line is skipped
    assert gz[0].answer == 1 and gz[1].answer == 2 and gz[1].labels == ("1", "2", "3", "4")


def test_plain_jsonl_in_data_dir(tmp_path: Path) -> None:
    (tmp_path / "obqa").mkdir()
    _write(tmp_path / "obqa" / "obqa-dev.jsonl", [json.dumps(_ai2("x", "D"))])
    [ex] = load_task("obqa", "dev", data_dir=tmp_path)
    assert ex.id == "x" and ex.answer == 3


def test_bad_json_names_file_and_line(tmp_path: Path) -> None:
    path = _write(tmp_path / "bad.jsonl", [json.dumps(_ai2("q1")), json.dumps(_ai2("q2")), '{"id": "q3", oops'])
    with pytest.raises(DataError, match="line 3") as info:
        load_file(str(path))
    assert "bad.jsonl" in str(info.value) and "malformed JSON" in str(info.value)


def test_bad_answer_key(tmp_path: Path) -> None:
    path = _write(tmp_path / "key.jsonl", [json.dumps(_ai2("q1")), json.dumps(_ai2("q2", key="E"))])
    with pytest.raises(DataError) as info:
        load_file(str(path))
    msg = str(info.value)
    assert "key.jsonl" in msg and "line 2" in msg and "'q2'" in msg and "'E'" in msg and "'D'" in msg


def test_missing_field(tmp_path: Path) -> None:
    rec = _ai2("q1")
    del rec["answerKey"]
    path = _write(tmp_path / "miss.jsonl", [json.dumps(rec)])
    with pytest.raises(DataError, match="answerKey") as info:
        load_file(str(path))
    assert "miss.jsonl" in str(info.value) and "line 1" in str(info.value)
    rec = _ai2("q1")
    del rec["question"]["choices"][1]["text"]
    _write(path, [json.dumps(rec)])
    with pytest.raises(DataError, match=r"question\.choices\[1\]\.text"):
        load_file(str(path))


def test_missing_race_field(tmp_path: Path) -> None:
    (tmp_path / "race").mkdir()
    rec = {"id": "r1", "level": "high", "question": "q?", "options": ["a", "b", "c", "d"], "answer": "A"}
    _write(tmp_path / "race" / "test.jsonl.gz", [json.dumps(rec)])
    with pytest.raises(DataError, match="'article'"):
        load_task("race", "test", data_dir=tmp_path)


def test_too_few_choices(tmp_path: Path) -> None:
    path = _write(tmp_path / "few.jsonl", [json.dumps(_ai2("lonely", labels="A"))])
    with pytest.raises(DataError, match="at least 2") as info:
        load_file(str(path))
    assert "few.jsonl" in str(info.value) and "line 1" in str(info.value) and "lonely" in str(info.value)


def test_unknown_task() -> None:
    with pytest.raises(DataError) as info:
        load_task("arc-medium")
    msg = str(info.value)
    assert "arc-easy" in msg and "race" in msg and "mix4" in msg and "folder" in msg and "--train-file" in msg


def test_unknown_split(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="validation") as info:
        load_task("obqa", "validation", data_dir=tmp_path)
    assert "train, dev, test" in str(info.value)


def test_missing_file_lists_paths(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        load_task("arc-challenge", "test", data_dir=tmp_path)
    msg = str(info.value)
    assert str(tmp_path / "arc" / "arc-challenge-test.jsonl.gz") in msg
    assert str(tmp_path / "arc" / "arc-challenge-test.jsonl") in msg
    assert "--data-dir" in msg and DATA_ENV_VAR in msg


def test_bad_limit() -> None:
    with pytest.raises(DataError, match="limit"):
        load_task("obqa", limit=-1)


# ----------------------------------------------------------------------------- hub fallback (no network: faked)


def test_hub_rows_are_converted(monkeypatch: pytest.MonkeyPatch) -> None:
    datasets = pytest.importorskip("datasets")
    rows = {
        ("allenai/ai2_arc", "ARC-Easy", "validation"): [
            {"id": "a1", "question": "Q?", "choices": {"text": ["x", "y", "z"], "label": ["1", "2", "3"]}, "answerKey": "2"}
        ],
        ("allenai/openbookqa", "main", "test"): [
            {"id": "o1", "question_stem": "S", "choices": {"text": ["p", "q"], "label": ["A", "B"]}, "answerKey": "B"}
        ],
        ("ehovy/race", "all", "train"): [
            {"example_id": "r1", "article": "Art.", "question": "Q", "options": ["a", "b", "c", "d"], "answer": "C"}
        ],
    }
    calls: list[tuple[str, str, str]] = []

    def fake_load_dataset(path: str, name: str, split: str) -> list[dict[str, Any]]:
        calls.append((path, name, split))
        return rows[(path, name, split)]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    monkeypatch.delenv(DATA_ENV_VAR, raising=False)
    assert load_task("arc-easy", "dev") == [MCExample("a1", "Q?", ("x", "y", "z"), ("1", "2", "3"), 1)]
    assert load_task("obqa", "test") == [MCExample("o1", "S", ("p", "q"), ("A", "B"), 1)]
    assert load_task("race", "train") == [MCExample("r1", "Q", ("a", "b", "c", "d"), ("A", "B", "C", "D"), 2, "Art.")]
    assert calls == list(rows)


def test_hub_failure_explains_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    datasets = pytest.importorskip("datasets")

    def offline(*args: Any, **kwargs: Any) -> None:
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    monkeypatch.delenv(DATA_ENV_VAR, raising=False)
    with pytest.raises(DataError, match=DATA_ENV_VAR) as info:
        load_task("arc-challenge", "test")
    assert "allenai/ai2_arc" in str(info.value) and "--data-dir" in str(info.value)
