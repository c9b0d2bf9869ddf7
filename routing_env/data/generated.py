"""A generated multiple-choice task where the best route is known and predictable from the input:
the positive control of the routing study (never a default task).

Every question is ``"<tag> <word>"``. Each of ``K`` tags names a sub-task, a rule that maps each of
``N`` question words to one of ``N`` answer words; the ``K`` rules conflict on every word: the four
choices of a question are exactly the ``K`` rules' answers for its word, so the surface form (the
word and the choices) never tells which choice is right, only the tag does. The rules form a Latin
rectangle (``answer_k(w) = π((ρ(w) + k) mod N)`` for seeded permutations π, ρ), so for every word the
``K`` answers are distinct and every rule is a permutation of the answer words.

Why this is a positive control for LayerMoE: a model that keeps each rule in its own expert needs
the tag-given route; with experts too small to hold every rule (``--rank``) and one expert per token
(``--top-k 1``), which expert a question goes to decides its answer, and the right one is a function
of the tag, which a router can read. Splits hold the same (tag, word) pairs with other choice
orders: the task is to store the rules, and the question is whether routing can learn to find them.

    python -m routing_env.data.generated --out runs/routing-control --num-tags 4 --num-words 16
    python -m routing_env.pipeline --task runs/routing-control --top-k 1 --rank 4 --lr 1e-3 --epochs 8 ...

What it showed (README, "Positive control"): lora-moe stays at chance on it, the designed route
(``agents/known_route.py``) becomes accuracy only with ``--teacher-forcing 1 --route-loss-grad
router``, and the exhaustive search on the warm-up does not find that route.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

__all__ = ["TAGS", "QUESTION_WORDS", "ANSWER_WORDS", "rules", "write_routing_control"]

#: sub-task tags (one word piece each in MiniLM's vocabulary)
TAGS = ("alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta")
#: question words (animals) and answer words (objects, colours, places): single word pieces in MiniLM
QUESTION_WORDS = ("cat", "dog", "horse", "cow", "pig", "sheep", "goat", "lion", "tiger", "bear", "wolf", "fox",
                  "deer", "rabbit", "mouse", "rat", "snake", "frog", "fish", "shark", "whale", "bird", "eagle", "owl",
                  "duck", "chicken", "bee", "ant", "spider", "monkey", "elephant", "camel")
ANSWER_WORDS = ("table", "chair", "door", "window", "bottle", "cup", "knife", "spoon", "hammer", "rope", "wheel",
                "clock", "lamp", "bell", "coin", "ring", "red", "blue", "green", "yellow", "black", "white", "brown",
                "river", "mountain", "forest", "desert", "island", "bridge", "tower", "castle", "garden")


def rules(num_tags: int, num_words: int, seed: int) -> np.ndarray:
    """``[K, N]`` answer index of each (tag, question word): a Latin rectangle, distinct along each column."""
    rng = np.random.default_rng([seed, 0x5EED])
    pi, rho = rng.permutation(num_words), rng.permutation(num_words)
    return np.stack([pi[(rho + k) % num_words] for k in range(num_tags)])


def _questions(table: np.ndarray, reps: int, split: str, seed: int, num_choices: int) -> list[dict]:
    K, N = table.shape
    rng = np.random.default_rng([seed, {"train": 1, "dev": 2, "test": 3}[split]])
    out = []
    for r in range(reps):
        for k in range(K):
            for w in range(N):
                # The K rules' answers for this word, plus distractors no rule gives it, in a fresh order.
                others = np.setdiff1d(np.arange(N), table[:, w])
                answers = np.concatenate([table[:, w], rng.choice(others, num_choices - K, replace=False)])
                order = rng.permutation(num_choices)
                labels = "ABCDEFGH"[:num_choices]
                out.append({"id": f"{split}-{r}-{TAGS[k]}-{QUESTION_WORDS[w]}",
                            "question": {"stem": f"{TAGS[k]} {QUESTION_WORDS[w]}",
                                         "choices": [{"text": ANSWER_WORDS[answers[j]], "label": lab}
                                                     for j, lab in zip(order, labels)]},
                            "answerKey": labels[int(np.flatnonzero(order == k)[0])]})
    rng.shuffle(out)  # training batches mix the sub-tasks
    return out


def write_routing_control(folder: str | Path, num_tags: int = 4, num_words: int = 32, train_reps: int = 8,
                          eval_reps: int = 2, seed: int = 0, num_choices: int | None = None) -> Path:
    """Write ``train.jsonl``, ``dev.jsonl``, ``test.jsonl`` (AI2 format) into ``folder``; deterministic by its arguments.

    ``train_reps`` / ``eval_reps``: how many times each (tag, word) pair appears per split, each time
    with its choices in another order. ``num_choices`` (default ``num_tags``): choices per question;
    beyond the ``num_tags`` rules' answers, distractors that no rule gives the word (then the word
    alone narrows the choices, a pairwise cue that gradient descent picks up first).
    """
    num_choices = num_tags if num_choices is None else num_choices
    if not 2 <= num_tags <= len(TAGS):
        raise ValueError(f"num_tags must be between 2 and {len(TAGS)}, got {num_tags}")
    if not num_tags <= num_words <= min(len(QUESTION_WORDS), len(ANSWER_WORDS)):
        raise ValueError(f"num_words must be between num_tags and {len(QUESTION_WORDS)}, got {num_words}")
    if not num_tags <= num_choices <= min(8, num_words):
        raise ValueError(f"num_choices must be between num_tags and min(8, num_words), got {num_choices}")
    for name, value in (("train_reps", train_reps), ("eval_reps", eval_reps)):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    table = rules(num_tags, num_words, seed)
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    for split, reps in (("train", train_reps), ("dev", eval_reps), ("test", eval_reps)):
        rows = _questions(table, reps, split, seed, num_choices)
        (out / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / "rules.json").write_text(json.dumps({"tags": list(TAGS[:num_tags]), "words": list(QUESTION_WORDS[:num_words]),
                                                "answers": [[ANSWER_WORDS[i] for i in row] for row in table.tolist()],
                                                "seed": seed}, indent=1) + "\n")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for train/dev/test.jsonl (then: --task <folder>)")
    ap.add_argument("--num-tags", type=int, default=4, help="sub-tasks (rules), one tag each")
    ap.add_argument("--num-words", type=int, default=32, help="question words per rule")
    ap.add_argument("--train-reps", type=int, default=8, help="appearances of each (tag, word) in train")
    ap.add_argument("--eval-reps", type=int, default=2, help="appearances of each (tag, word) in dev and in test")
    ap.add_argument("--num-choices", type=int, default=None, help="choices per question (default: one per tag)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    print(write_routing_control(a.out, a.num_tags, a.num_words, a.train_reps, a.eval_reps, a.seed, a.num_choices))


if __name__ == "__main__":
    main()
