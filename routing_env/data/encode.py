"""Turn batches of :class:`MCExample` into padded tensors.

Two encodings are provided:

* :func:`encode_pairs` for encoder backbones (BERT-style): one two-segment
  input per (question, choice) pair, giving ``[B, C, T]`` tensors that a
  scoring head reduces to one logit per choice.
* :func:`encode_letter_prompt` for causal LMs: one prompt per question that
  lists the choices as ``A.``, ``B.``, ... and ends in ``Answer:``; the model's
  next-token logits at the last position, read at ``letter_ids``, score the
  choices.

Questions in a batch may have different numbers of choices (ARC has 3- and
5-choice questions), so choices are padded to the batch maximum and masked
out with ``choice_mask``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

import torch

from .tasks import MCExample

__all__ = ["LETTERS", "MCBatch", "encode_letter_prompt", "encode_pairs", "letter_prompt_text", "move", "pad_token_id",
           "resolve_device"]

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def resolve_device(device: torch.device | str) -> torch.device:
    """``device`` with the index a bare ``cuda`` stands for (the current one), so that a tensor already
    there compares equal to it."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def move(t: torch.Tensor, device: torch.device | str, non_blocking: bool = True) -> torch.Tensor:
    """``t`` on ``device``: itself when already there; from the host to a GPU through pinned memory
    with a non-blocking copy when ``non_blocking``.

    A blocking host-to-GPU copy waits for the whole stream to drain (PyTorch synchronises after
    ``cudaMemcpyAsync`` from pageable memory), so the host cannot queue the next kernels while the
    GPU works; a copy from pinned memory with ``non_blocking=True`` is queued like a kernel. Copies
    towards the host stay blocking: the caller reads the result right after.
    """
    device = resolve_device(device)
    if t.device == device:
        return t
    if non_blocking and t.device.type == "cpu" and device.type != "cpu":
        if device.type == "cuda" and not t.is_pinned():
            t = t.pin_memory()  # the caching host allocator keeps it alive until the copy has run
        return t.to(device, non_blocking=True)
    return t.to(device)


@dataclass
class MCBatch:
    """A padded batch of multiple-choice questions."""

    input_ids: torch.Tensor  # [B, C, T] long (encoder pairs) or [B, T] (letter prompts)
    attention_mask: torch.Tensor  # same shape as input_ids
    token_type_ids: torch.Tensor | None  # same shape, when the tokenizer uses segments
    choice_mask: torch.Tensor  # [B, C] bool, True where a real choice
    labels: torch.Tensor  # [B] long, index of the correct choice
    letter_ids: torch.Tensor | None  # [B, C] long, letter-prompt only; 0 where padded
    ids: list[str]

    def __len__(self) -> int:
        return len(self.ids)

    def to(self, device: torch.device | str, non_blocking: bool = True) -> MCBatch:
        """Return a copy with every tensor on ``device`` (``move``: pinned, non-blocking copies from
        the host to a GPU; a tensor already there is kept)."""
        moved: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                moved[f.name] = move(value, device, non_blocking)
        return replace(self, **moved)


def _check_examples(examples: Sequence[MCExample]) -> int:
    """Validate the batch and return the padded number of choices ``C``."""
    if len(examples) == 0:
        raise ValueError("cannot encode an empty batch of examples")
    return max(len(ex.choices) for ex in examples)


def _common(examples: Sequence[MCExample], num_choices: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Choice mask ``[B, C]`` and answer labels ``[B]``."""
    choice_mask = torch.zeros(len(examples), num_choices, dtype=torch.bool)
    for b, ex in enumerate(examples):
        choice_mask[b, : len(ex.choices)] = True
    labels = torch.tensor([ex.answer for ex in examples], dtype=torch.long)
    return choice_mask, labels


def pad_token_id(tokenizer: Any) -> int:
    """Pad token id, falling back to EOS for GPT-style tokenizers that have none."""
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    if getattr(tokenizer, "eos_token_id", None) is not None:
        return int(tokenizer.eos_token_id)
    raise ValueError("tokenizer has neither a pad token nor an EOS token; set tokenizer.pad_token first")


def _pair_texts(examples: Sequence[MCExample]) -> tuple[list[str], list[str], list[tuple[int, int]]]:
    """The two segments of every (example, choice) pair and its ``(b, c)`` slot."""
    firsts: list[str] = []
    seconds: list[str] = []
    slots: list[tuple[int, int]] = []
    for b, ex in enumerate(examples):
        if ex.question_first:
            first = ex.question + (" " + ex.context if ex.context else "")
        else:
            first = (ex.context + " " if ex.context else "") + ex.question
        for c, choice in enumerate(ex.choices):
            firsts.append(first)
            seconds.append(choice)
            slots.append((b, c))
    return firsts, seconds, slots


def _tokenize_pairs(tokenizer: Any, firsts: list[str], seconds: list[str], max_length: int) -> list[dict[str, list[int]]]:
    """Each pair's encoding, truncating only the first segment where the choice alone fits."""
    # Decide per pair whether "only_first" can succeed: fast tokenizers raise
    # instead of truncating when the second segment alone exceeds the budget.
    specials = tokenizer.num_special_tokens_to_add(pair=True)
    choice_lens = [len(ids) for ids in tokenizer(seconds, add_special_tokens=False)["input_ids"]]
    ok = [n + specials + 1 <= max_length for n in choice_lens]

    encoded: list[dict[str, list[int]]] = [{} for _ in firsts]
    for strategy, want in (("only_first", True), ("longest_first", False)):
        idx = [i for i, flag in enumerate(ok) if flag is want]
        if not idx:
            continue
        enc = tokenizer(
            [firsts[i] for i in idx],
            [seconds[i] for i in idx],
            truncation=strategy,
            max_length=max_length,
            padding=False,
        )
        for j, i in enumerate(idx):
            encoded[i] = {k: list(enc[k][j]) for k in enc.keys()}
    return encoded


def _empty_pair(tokenizer: Any, max_length: int) -> dict[str, list[int]]:
    """The encoding of a padded choice slot: an empty pair, whose attention mask is never all zero."""
    filler = dict(tokenizer("", "", truncation=True, max_length=max_length))
    if not filler["input_ids"]:
        # A tokenizer without special tokens yields nothing for an empty pair;
        # one pad token with mask 1 keeps downstream softmaxes finite.
        filler = {"input_ids": [pad_token_id(tokenizer)], "attention_mask": [1]}
    filler.setdefault("attention_mask", [1] * len(filler["input_ids"]))
    return filler


def encode_pairs(tokenizer: Any, examples: Sequence[MCExample], max_length: int = 128) -> MCBatch:
    """Encode every (context + question, choice) pair as a two-segment input.

    The first segment is ``context + " " + question`` (just the question when
    there is no context; ``question + " " + context`` for an example marked
    ``question_first``, so that truncation cuts the context), the second the
    choice text.  Only the first segment
    is truncated, because a cut-off choice can change which answer is right;
    if a choice alone does not fit, that pair falls back to ``longest_first``.
    ``T`` is the longest pair in the batch (at most ``max_length``), so short
    batches stay cheap.  Padding is on the right, as BERT-style position
    embeddings expect.  Padded choice slots hold the encoding of an empty pair
    (e.g. ``[CLS] [SEP]``) so that their attention mask is never all zero.
    """
    num_choices = _check_examples(examples)
    firsts, seconds, slots = _pair_texts(examples)
    encoded = _tokenize_pairs(tokenizer, firsts, seconds, max_length)
    filler = _empty_pair(tokenizer, max_length)

    seq_len = max(len(e["input_ids"]) for e in [*encoded, filler])
    B = len(examples)
    pad = pad_token_id(tokenizer)
    input_ids = torch.full((B, num_choices, seq_len), pad, dtype=torch.long)
    attention_mask = torch.zeros(B, num_choices, seq_len, dtype=torch.long)
    has_types = "token_type_ids" in encoded[0]
    token_type_ids = torch.zeros(B, num_choices, seq_len, dtype=torch.long) if has_types else None

    def put(b: int, c: int, e: dict[str, list[int]]) -> None:
        n = len(e["input_ids"])
        input_ids[b, c, :n] = torch.tensor(e["input_ids"], dtype=torch.long)
        attention_mask[b, c, :n] = torch.tensor(e.get("attention_mask", [1] * n), dtype=torch.long)
        if token_type_ids is not None and "token_type_ids" in e:
            token_type_ids[b, c, :n] = torch.tensor(e["token_type_ids"], dtype=torch.long)

    for (b, c), e in zip(slots, encoded):
        put(b, c, e)
    for b, ex in enumerate(examples):
        for c in range(len(ex.choices), num_choices):
            put(b, c, filler)

    choice_mask, labels = _common(examples, num_choices)
    return MCBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        token_type_ids=token_type_ids,
        choice_mask=choice_mask,
        labels=labels,
        letter_ids=None,
        ids=[ex.id for ex in examples],
    )


def letter_prompt_text(example: MCExample, context: str | None = None) -> str:
    """The prompt for one example; ``context`` overrides ``example.context``.

    Choices are always lettered A, B, C, ... even when the file labels them
    with digits, so that every task is scored against the same letter tokens.
    """
    if len(example.choices) > len(LETTERS):
        raise ValueError(f"example {example.id!r} has {len(example.choices)} choices; at most 26 can be lettered")
    ctx = example.context if context is None else context
    lines = [f"{LETTERS[i]}. {text}\n" for i, text in enumerate(example.choices)]
    head = f"{ctx}\n\n" if ctx else ""
    return head + f"Question: {example.question}\n" + "".join(lines) + "Answer:"


def _fit_prompt(tokenizer: Any, example: MCExample, max_length: int) -> list[int]:
    """Token ids of the prompt, dropping context from the left until it fits.

    Context is trimmed in token space and decoded back to text, then the whole
    prompt is re-tokenized so token boundaries match what the model would see
    for that text.  If even a context-free prompt is too long, the ids are cut
    from the left (keeping a leading BOS), which preserves "Answer:".
    """
    ids: list[int] = tokenizer(letter_prompt_text(example))["input_ids"]
    if len(ids) <= max_length:
        return ids
    ctx_ids: list[int] = tokenizer(example.context, add_special_tokens=False)["input_ids"] if example.context else []
    for _ in range(8):  # each round removes at least the measured excess; boundary effects rarely need >2
        if not ctx_ids:
            break
        excess = len(ids) - max_length
        ctx_ids = ctx_ids[max(excess, 1) :]
        ctx = tokenizer.decode(ctx_ids, skip_special_tokens=True).strip() if ctx_ids else ""
        ids = tokenizer(letter_prompt_text(example, context=ctx))["input_ids"]
        if len(ids) <= max_length:
            return ids
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None and ids and ids[0] == bos and max_length > 1:
        return [bos] + ids[-(max_length - 1) :]
    return ids[-max_length:]


def encode_letter_prompt(tokenizer: Any, examples: Sequence[MCExample], max_length: int = 512) -> MCBatch:
    """Encode one lettered prompt per example for a causal LM.

    Rows are LEFT padded so position ``-1`` is the prediction position for
    every row.  ``letter_ids[b, c]`` is the id of the token for ``" " + letter``
    (the token a model emits after ``Answer:``); padded choices hold 0.
    """
    num_choices = _check_examples(examples)
    if num_choices > len(LETTERS):
        raise ValueError(f"at most {len(LETTERS)} choices can be lettered, got {num_choices}")
    pad = pad_token_id(tokenizer)
    rows = [_fit_prompt(tokenizer, ex, max_length) for ex in examples]
    seq_len = max(len(r) for r in rows)
    B = len(examples)
    input_ids = torch.full((B, seq_len), pad, dtype=torch.long)
    attention_mask = torch.zeros(B, seq_len, dtype=torch.long)
    for b, r in enumerate(rows):
        if r:
            input_ids[b, seq_len - len(r) :] = torch.tensor(r, dtype=torch.long)
            attention_mask[b, seq_len - len(r) :] = 1

    # The last sub-token of " A" is the letter itself for BPE / SentencePiece
    # tokenizers that would otherwise split off a leading space token.
    letter_tok = [tokenizer.encode(" " + LETTERS[c], add_special_tokens=False)[-1] for c in range(num_choices)]
    letter_ids = torch.zeros(B, num_choices, dtype=torch.long)
    for b, ex in enumerate(examples):
        n = len(ex.choices)
        letter_ids[b, :n] = torch.tensor(letter_tok[:n], dtype=torch.long)

    choice_mask, labels = _common(examples, num_choices)
    return MCBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        token_type_ids=None,
        choice_mask=choice_mask,
        labels=labels,
        letter_ids=letter_ids,
        ids=[ex.id for ex in examples],
    )
