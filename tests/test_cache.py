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
