"""A split's examples tokenised once, so that a batch is an index and a slice: no tokenizer on the
critical path, and no host sync.

``EncodedSplit.build(encode, examples, pad_id=...)`` runs the backbone kind's own ``encode`` over the
split (in chunks, to bound the memory of the long intermediate tensors) and keeps every field padded
to the split's longest row and widest question; each example's length and number of choices stay on
the host (numpy). ``batch(indices)`` then cuts the columns a batch of those examples would have
(computed from the host lengths) and ``index_select``s its rows: the result is exactly what
``encode(examples of indices)`` returns (the tests compare with ``torch.equal``), because an
encoding's rows do not depend on the other rows of their batch, only the padding does, and the
padding is checked at build time to be the convention ``batch`` reproduces.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import fields

import numpy as np
import torch

from .encode import MCBatch, move, resolve_device
from .tasks import MCExample

__all__ = ["EncodedSplit", "SEQ_FIELDS"]

#: fields with a sequence axis (last); the others are per example ([B]) or per choice ([B, C])
SEQ_FIELDS = ("input_ids", "attention_mask", "token_type_ids")


def _narrow(t: torch.Tensor) -> torch.Tensor:
    """``t`` in the smallest of uint8 / int32 that holds its values: a split of long rows (RACE) is
    large, and a batch widens back to its own dtype after the cut, which is exact."""
    if t.dtype != torch.long or t.numel() == 0:
        return t
    lo, hi = int(t.min()), int(t.max())
    if lo >= 0 and hi <= 255:
        return t.to(torch.uint8)
    return t.to(torch.int32) if lo >= -(2**31) and hi < 2**31 else t


def _padding_side(mask: torch.Tensor) -> str | None:
    """``"right"`` or ``"left"`` when every row's real tokens are one block at that end (None: no row is
    padded, so either); anything else cannot be cut to a shorter width exactly."""
    lens = mask.sum(-1, keepdim=True)
    pos = torch.arange(mask.shape[-1])
    right, left = pos < lens, pos >= mask.shape[-1] - lens
    sides = [name for name, want in (("right", right), ("left", left)) if torch.equal(mask.bool(), want)]
    if not sides:
        raise ValueError("the encoding's attention mask is not one block of real tokens per row; its rows cannot be cut")
    return None if len(sides) == 2 else sides[0]


class EncodedSplit:
    """The examples of a split, encoded once (see the module docstring); ``batch(indices)`` is ``encode``'s batch."""

    def __init__(self, examples: Sequence[MCExample], stored: dict[str, torch.Tensor | None], dtypes: dict[str, torch.dtype],
                 lengths: np.ndarray, choices: np.ndarray, floor: int, side: str) -> None:
        self.examples = list(examples)
        self.ids = [ex.id for ex in self.examples]
        self.stored, self.dtypes = stored, dtypes
        self.lengths, self.choices = lengths, choices  # [N] on the host: a batch's width is read from here
        self.floor, self.side = floor, side  # the narrowest width any batch has; where the padding is

    @classmethod
    def build(cls, encode: Callable[[Sequence[MCExample]], MCBatch], examples: Sequence[MCExample], *, pad_id: int,
              chunk_size: int = 1024) -> EncodedSplit:
        """Encode ``examples`` with ``encode`` (a backbone kind's, tokenizer and length bound in) once.

        ``pad_id`` is the id ``encode`` pads with; the build checks that every padded position holds it.
        """
        if not examples:
            raise ValueError("cannot encode an empty split")
        # Every chunk is encoded with the widest question appended (and dropped): all chunks then have
        # the split's number of choice slots, padded slots holding what ``encode`` puts there.
        widest = max(range(len(examples)), key=lambda i: len(examples[i].choices))
        chunks: list[MCBatch] = []
        dtypes: dict[str, torch.dtype] = {}  # what ``encode`` gives, restored per batch
        side: str | None = None
        for start in range(0, len(examples), chunk_size):
            part = list(examples[start : start + chunk_size])
            enc = encode([*part, examples[widest]])
            mask = enc.attention_mask
            found = _padding_side(mask)
            if found is not None and side not in (None, found):
                raise ValueError("the encoding pads on the left in one chunk and on the right in another")
            side = side or found
            pads = mask == 0
            if not bool((enc.input_ids[pads] == pad_id).all()) or (
                    enc.token_type_ids is not None and bool(enc.token_type_ids[pads].any())):
                raise ValueError(f"the encoding's padding is not pad id {pad_id} (token types 0); it cannot be rebuilt")
            dtypes = {f.name: v.dtype for f in fields(MCBatch) if isinstance(v := getattr(enc, f.name), torch.Tensor)}
            kept = {f.name: getattr(enc, f.name) for f in fields(MCBatch)}
            chunks.append(MCBatch(**{k: v if v is None else _narrow(v[: len(part)]) if isinstance(v, torch.Tensor)
                                     else v[: len(part)] for k, v in kept.items()}))
        widths = {c.input_ids.shape[-1] for c in chunks}
        if side is None and len(widths) > 1:
            raise ValueError("no row of the encoding is padded, so its padding side is unknown; cannot widen the chunks")
        side = side or "right"
        T = max(widths)
        stored: dict[str, torch.Tensor | None] = {}
        for name in dtypes:
            parts = [getattr(c, name) for c in chunks]
            dtype = parts[0].dtype
            for p in parts[1:]:
                dtype = torch.promote_types(dtype, p.dtype)
            if name not in SEQ_FIELDS:
                stored[name] = torch.cat([p.to(dtype) for p in parts])
                continue
            out = torch.full((len(examples), *parts[0].shape[1:-1], T), pad_id if name == "input_ids" else 0, dtype=dtype)
            row = 0
            for p in parts:
                cols = slice(0, p.shape[-1]) if side == "right" else slice(T - p.shape[-1], T)
                out[row : row + len(p), ..., cols] = p
                row += len(p)
            stored[name] = out
        for f in fields(MCBatch):  # the fields this encoding leaves empty (token types, letter ids)
            if f.name != "ids" and f.name not in stored:
                stored[f.name] = None
        mask, choice_mask = stored["attention_mask"].long(), stored["choice_mask"]
        row_lens = mask.sum(-1)  # [N] or [N, C]
        if row_lens.dim() == 2:  # per example, its real choices' longest row (padded slots hold filler)
            row_lens = (row_lens * choice_mask).amax(1)
        lengths = row_lens.numpy().astype(np.int64)
        choices = choice_mask.sum(1).numpy().astype(np.int64)
        # Some encodings have a floor on a batch's width (encode_pairs: the filler of padded choice slots
        # counts even where no slot is padded). The shortest example's own batch shows it: a batch's width is
        # max(its rows, floor), and below the shortest example the floor is the only thing that can matter.
        shortest = int(np.argmin(lengths))
        floor = int(encode([examples[shortest]]).input_ids.shape[-1])
        return cls(examples, stored, dtypes, lengths, choices, floor, side)

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def device(self) -> torch.device:
        return self.stored["input_ids"].device

    @property
    def width(self) -> int:
        return self.stored["input_ids"].shape[-1]

    def to(self, device: torch.device | str, non_blocking: bool = True) -> EncodedSplit:
        """The split with its tensors on ``device`` (once: the batches are then cut there)."""
        if resolve_device(device) == self.device:
            return self
        stored = {k: None if v is None else move(v, device, non_blocking) for k, v in self.stored.items()}
        return EncodedSplit(self.examples, stored, self.dtypes, self.lengths, self.choices, self.floor, self.side)

    def batch(self, indices: Sequence[int] | np.ndarray | range, width_multiple: int = 1) -> MCBatch:
        """The batch of these examples, as ``encode`` makes it; its shape is read from the host lengths.

        ``width_multiple``: the width rounded up to a multiple of it (at most the split's), the extra
        columns padding as any other (a bucketed shape: replayed graphs need few distinct shapes).
        """
        if isinstance(indices, range):  # consecutive examples (evaluation): the index is made on the device
            idx = np.arange(indices.start, indices.stop, indices.step, dtype=np.int64)
            index = torch.arange(indices.start, indices.stop, indices.step, device=self.device)
        else:
            idx = np.ascontiguousarray(indices, dtype=np.int64)
            index = move(torch.from_numpy(idx), self.device)
        if len(idx) == 0:
            raise ValueError("cannot make an empty batch")
        T = max(int(self.lengths[idx].max()), self.floor)
        T = min(-(-T // width_multiple) * width_multiple, self.width)
        C = int(self.choices[idx].max())
        cols = slice(0, T) if self.side == "right" else slice(self.width - T, self.width)
        out: dict[str, object] = {"ids": [self.ids[i] for i in idx]}
        for name, t in self.stored.items():
            if t is None:
                out[name] = None
                continue
            if name in SEQ_FIELDS:
                t = t[:, :C, cols] if t.dim() == 3 else t[:, cols]
            elif t.dim() == 2:  # [N, C]: choice mask, letter ids
                t = t[:, :C]
            out[name] = t.index_select(0, index).to(self.dtypes[name])
        return MCBatch(**out)
