"""The generated routing positive-control task: deterministic, conflicting on every surface form, loadable."""

from __future__ import annotations

import json

import numpy as np
import pytest

from routing_env.data import resolve_task
from routing_env.data.generated import ANSWER_WORDS, TAGS, rules, write_routing_control


def test_rules_conflict_on_every_word_and_each_rule_is_a_permutation():
    table = rules(4, 16, seed=3)  # [K, N]
    assert all(len(set(table[:, w])) == 4 for w in range(16))  # the tag alone decides among the K answers
    assert all(sorted(row) == list(range(16)) for row in table.tolist())
    assert np.array_equal(table, rules(4, 16, seed=3)) and not np.array_equal(table, rules(4, 16, seed=4))


def test_written_task_is_deterministic_and_only_the_tag_tells_the_answer(tmp_path):
    a = write_routing_control(tmp_path / "a", num_tags=3, num_words=8, train_reps=2, eval_reps=1, seed=1)
    b = write_routing_control(tmp_path / "b", num_tags=3, num_words=8, train_reps=2, eval_reps=1, seed=1)
    for split in ("train", "dev", "test"):
        assert (a / f"{split}.jsonl").read_bytes() == (b / f"{split}.jsonl").read_bytes()
    table = rules(3, 8, seed=1)
    rows = [json.loads(line) for line in (a / "train.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 3 * 8
    for r in rows:
        tag, word = r["question"]["stem"].split()
        choices = {c["label"]: c["text"] for c in r["question"]["choices"]}
        k, w = TAGS.index(tag), json.loads((a / "rules.json").read_text())["words"].index(word)
        assert choices[r["answerKey"]] == ANSWER_WORDS[table[k, w]]
        assert sorted(choices.values()) == sorted(ANSWER_WORDS[i] for i in table[:, w])  # every rule's answer
    src = resolve_task(str(a))  # a task folder like any other: loads through the project's loaders
    assert src.name.startswith("a-") and len(src.load("test")) == 3 * 8


def test_distractors_are_answers_no_rule_gives_the_word(tmp_path):
    a = write_routing_control(tmp_path, num_tags=2, num_words=8, train_reps=1, eval_reps=1, seed=0, num_choices=4)
    table = rules(2, 8, seed=0)
    words = json.loads((a / "rules.json").read_text())["words"]
    for line in (a / "dev.jsonl").read_text().splitlines():
        r = json.loads(line)
        w = words.index(r["question"]["stem"].split()[1])
        texts = [c["text"] for c in r["question"]["choices"]]
        assert len(texts) == 4 and len(set(texts)) == 4
        assert sum(t in {ANSWER_WORDS[i] for i in table[:, w]} for t in texts) == 2


@pytest.mark.parametrize("kw, needle", [({"num_tags": 1}, "num_tags"), ({"num_words": 2}, "num_words"),
                                        ({"train_reps": 0}, "train_reps"), ({"num_choices": 1}, "num_choices")])
def test_bad_arguments_name_the_argument(tmp_path, kw, needle):
    with pytest.raises(ValueError, match=needle):
        write_routing_control(tmp_path, **kw)
