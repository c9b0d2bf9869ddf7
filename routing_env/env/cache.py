"""A least-recently-used map bounded by the bytes of the tensors it holds (the env's prefix cache)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Hashable

__all__ = ["TensorLRU"]


class TensorLRU:
    """``key -> (tensor, loads)`` (or any value, with ``sizeof``); the oldest go once they pass ``limit_bytes``.

    The newest entry always stays, however large, so a lookup right after a store never misses.
    """

    def __init__(self, limit_bytes: int, sizeof: Callable[[Any], int] | None = None) -> None:
        self.limit_bytes = limit_bytes
        self.bytes = 0
        # Bytes an entry holds; by default those of its tensor (the value's first element).
        self.sizeof = sizeof or (lambda v: v[0].numel() * v[0].element_size())
        self._items: OrderedDict[Hashable, Any] = OrderedDict()

    def __contains__(self, key: Hashable) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: Hashable) -> Any:
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def put(self, key: Hashable, value: Any) -> None:
        if key in self._items:
            return
        self._items[key] = value
        self.bytes += self.sizeof(value)
        while self.bytes > self.limit_bytes and len(self._items) > 1:
            _, old = self._items.popitem(last=False)
            self.bytes -= self.sizeof(old)

    def clear(self) -> None:
        self._items.clear()
        self.bytes = 0
