"""A least-recently-used map bounded by the bytes of the tensors it holds (the env's prefix cache)."""

from __future__ import annotations

from collections import OrderedDict
from typing import Hashable

import numpy as np
import torch

__all__ = ["TensorLRU"]


class TensorLRU:
    """``key -> (tensor, loads)``; the oldest entries go once the tensors pass ``limit_bytes``.

    The newest entry always stays, however large, so a lookup right after a store never misses.
    """

    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes = limit_bytes
        self.bytes = 0
        self._items: OrderedDict[Hashable, tuple[torch.Tensor, np.ndarray]] = OrderedDict()

    def __contains__(self, key: Hashable) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: Hashable) -> tuple[torch.Tensor, np.ndarray] | None:
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def put(self, key: Hashable, value: tuple[torch.Tensor, np.ndarray]) -> None:
        if key in self._items:
            return
        self._items[key] = value
        self.bytes += value[0].numel() * value[0].element_size()
        while self.bytes > self.limit_bytes and len(self._items) > 1:
            _, (old, _) = self._items.popitem(last=False)
            self.bytes -= old.numel() * old.element_size()

    def clear(self) -> None:
        self._items.clear()
        self.bytes = 0
