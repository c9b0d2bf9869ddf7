"""A least-recently-used map bounded by the bytes of the tensors it holds (the env's prefix cache)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Hashable

__all__ = ["TensorLRU"]


class TensorLRU:
    """``key -> (tensor, loads)`` (or any value, with ``sizeof``); the oldest go once they pass ``limit_bytes``.

    The newest entry always stays, however large, so a lookup right after a store never misses.

    With ``storage`` (a value -> ``(id, bytes)`` of the memory its tensor lives in), values that are views
    of one tensor count its bytes once, for as long as any of them is held: the bound is then on the
    memory the cache keeps alive (the env's nodes are views of their chunk's output), not on the views.
    """

    def __init__(self, limit_bytes: int, sizeof: Callable[[Any], int] | None = None,
                 storage: Callable[[Any], tuple[Hashable, int]] | None = None) -> None:
        self.limit_bytes = limit_bytes
        self.bytes = 0
        # Bytes an entry holds; by default those of its tensor (the value's first element).
        self.sizeof = sizeof or (lambda v: v[0].numel() * v[0].element_size())
        self.storage = storage
        self._shared: dict[Hashable, list[int]] = {}  # storage id -> [entries holding it, its bytes]
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
        self._count(value, +1)
        while self.bytes > self.limit_bytes and len(self._items) > 1:
            _, old = self._items.popitem(last=False)
            self._count(old, -1)

    def _count(self, value: Any, sign: int) -> None:
        if self.storage is None:
            self.bytes += sign * self.sizeof(value)
            return
        sid, nbytes = self.storage(value)
        # An id stays here only while an entry holds its storage alive, so its address cannot be reused meanwhile.
        held = self._shared.setdefault(sid, [0, nbytes])
        held[0] += sign
        if held[0] == (1 if sign > 0 else 0):  # the first view of this storage in, or the last one out
            self.bytes += sign * held[1]
        if held[0] == 0:
            del self._shared[sid]

    def clear(self) -> None:
        self._items.clear()
        self._shared.clear()
        self.bytes = 0
