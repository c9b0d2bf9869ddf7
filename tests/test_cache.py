"""TensorLRU: byte accounting, least-recently-used eviction, the newest entry always kept."""

from __future__ import annotations

import numpy as np
import torch

from routing_env.env.cache import TensorLRU


def _entry(n: int):
    return torch.zeros(n), np.zeros(2)  # n float32 = 4n bytes


def test_evicts_least_recently_used_and_tracks_bytes():
    c = TensorLRU(limit_bytes=100)
    for k in "abc":
        c.put(k, _entry(8))  # 32 bytes each: 96 in all, under the limit
    assert len(c) == 3 and c.bytes == 96
    c.get("a")  # a becomes the most recent; b is now the oldest
    c.put("d", _entry(8))
    assert "b" not in c and all(k in c for k in "acd") and c.bytes == 96
    c.put("huge", _entry(1000))  # larger than the limit: everything else goes, it stays
    assert len(c) == 1 and "huge" in c and c.bytes == 4000
    c.clear()
    assert len(c) == 0 and c.bytes == 0 and c.get("huge") is None


def test_put_of_a_present_key_keeps_the_first_value():
    c = TensorLRU(limit_bytes=1000)
    first = _entry(4)
    c.put("k", first)
    c.put("k", _entry(4))
    assert c.get("k")[0] is first[0] and c.bytes == 16


def test_views_of_one_tensor_count_its_memory_once_while_any_is_held():
    """The env's nodes are views of their chunk's output: the bound is on what the cache keeps alive."""
    def storage(v):
        s = v[0].untyped_storage()
        return s.data_ptr(), s.nbytes()

    c = TensorLRU(limit_bytes=1000, storage=storage)
    chunk = torch.zeros(4, 50)  # 800 bytes, four nodes' rows
    for n in range(4):
        c.put(n, (chunk[n], np.zeros(2)))
    assert c.bytes == 800  # once, not 4 x 200
    c.put("other", _entry(25))  # 100 more: 900, under the limit
    assert len(c) == 5 and c.bytes == 900
    c.put("big", _entry(50))  # 1100: the oldest views go, but their chunk is freed only with the last one
    assert c.bytes == 300 and all(n not in c for n in range(4)) and "other" in c and "big" in c
