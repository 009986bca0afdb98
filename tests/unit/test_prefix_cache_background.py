"""Prefix-cache copies made beside the next step (`PrefixCache.insert(background=True)`)."""

from __future__ import annotations

from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import KVCache

from app.engine.prefix_cache import PrefixCache


class RecordingDisk:
    """Stands in for the disk tier: records what it is handed."""

    enabled = True

    def __init__(self) -> None:
        self.saved: list[tuple[str, list[int], list[Any]]] = []

    def save(self, owner: str, tokens: list[int], layers: list[Any]) -> bool:
        self.saved.append((owner, tokens, layers))
        return True

    def find(self, owner: str, prompt: list[int]) -> None:
        return None


def _layers(length: int, allocated: int = 256) -> list[KVCache]:
    out = []
    for _ in range(3):
        layer = KVCache()
        layer.keys = mx.random.normal((1, 2, allocated, 8))
        layer.values = mx.random.normal((1, 2, allocated, 8))
        layer.offset = length
        out.append(layer)
    return out


def test_a_background_copy_is_served_like_one_made_at_once() -> None:
    tokens = list(range(100))
    layers = _layers(len(tokens))
    disk = RecordingDisk()
    cache = PrefixCache(10_000_000, disk=disk)  # type: ignore[arg-type]
    assert cache.insert("owner", tokens, layers, "finished", background=True)
    found = cache.lookup("owner", [*tokens, 7, 8])
    assert found.cached_tokens == len(tokens) and found.rest == [7, 8]
    assert found.cache is not None
    for served, source in zip(found.cache, layers, strict=True):
        assert mx.array_equal(served.keys[..., :100, :], source.keys[..., :100, :])
        assert mx.array_equal(served.values[..., :100, :], source.values[..., :100, :])
    # Exactly its own positions, no reference to the batch's longer buffer.
    assert cache.nbytes == sum(2 * 1 * 2 * 100 * 8 * 4 for _ in layers)


def test_the_disk_tier_gets_background_copies_at_the_next_flush() -> None:
    disk = RecordingDisk()
    cache = PrefixCache(10_000_000, disk=disk)  # type: ignore[arg-type]
    cache.insert("a", list(range(50)), _layers(50), "finished", background=True)
    assert disk.saved == []  # handing it over now would wait for the copy
    cache.insert("b", list(range(60)), _layers(60), "finished")
    assert [owner for owner, _, _ in disk.saved] == ["b"]  # made at once: handed over at once
    cache.flush()
    assert [owner for owner, _, _ in disk.saved] == ["b", "a"]
    cache.flush()  # nothing twice
    assert len(disk.saved) == 2


def test_clearing_the_memory_tier_still_hands_pending_copies_to_disk() -> None:
    disk = RecordingDisk()
    cache = PrefixCache(10_000_000, disk=disk)  # type: ignore[arg-type]
    cache.insert("a", list(range(50)), _layers(50), "finished", background=True)
    cache.clear()
    assert [owner for owner, _, _ in disk.saved] == ["a"]
    assert len(cache) == 0
