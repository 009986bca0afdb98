"""The disk tier of the prefix cache with small synthetic KV: what a restarted process reads
back, what it refuses to serve (corrupted, truncated, stale weights, another owner), and the
byte budget. The real model goes through it in tests/e2e/test_disk_cache.py."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlx.core as mx
import pytest
from mlx_lm.models.cache import KVCache
from structlog.testing import capture_logs

from app.engine.disk_cache import BLOCK, DiskCache, ModelDisk, weights_fingerprint
from app.engine.prefix_cache import PrefixCache

MODEL, FP = "demo", "fingerprint-1"
LAYERS, HEADS, DIM = 2, 2, 4


def kv(tokens: list[int], *, salt: float = 0.0) -> list[Any]:
    """Per-layer KV whose values depend on the tokens (so a wrong file reads differently)."""
    layers = []
    for index in range(LAYERS):
        base = mx.array(tokens, dtype=mx.float32).reshape(1, 1, len(tokens), 1)
        layer = KVCache()
        layer.keys = mx.broadcast_to(base + index + salt, (1, HEADS, len(tokens), DIM)) * 1.0
        layer.values = layer.keys * -0.5
        layer.offset = len(tokens)
        layers.append(layer)
    mx.eval([layer.state for layer in layers])
    return layers


def prompt(n: int, start: int = 1000) -> list[int]:
    return list(range(start, start + n))


def files(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.suffix in (".safetensors", ".tmp"))


def disk_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in files(root))


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "prefix-cache"


@pytest.fixture
def store(root: Path) -> Iterator[DiskCache]:
    store = DiskCache(root, 10_000_000, min_tokens=128)
    yield store
    store.close()


def save(disk: ModelDisk, owner: str, tokens: list[int], **kw: float) -> None:
    assert disk.save(owner, tokens, kv(tokens, **kw))
    assert disk.store.flush(10)


def reopen(store: DiskCache, max_bytes: int = 10_000_000) -> DiskCache:
    """What a restarted gateway sees: the same directory, a new process's store."""
    store.close()
    return DiskCache(store.root, max_bytes, min_tokens=128)


def test_a_restarted_store_serves_the_same_kv(store: DiskCache) -> None:
    tokens = prompt(300)
    save(store.bind(MODEL, FP), "alice", tokens)
    again = reopen(store)
    try:
        disk = again.bind(MODEL, FP)
        longer = tokens + prompt(50, start=9)
        found = disk.find("alice", longer)
        assert found is not None and found.matched == (300 // BLOCK) * BLOCK
        loaded = disk.load(found)
        assert loaded is not None
        read_tokens, layers = loaded
        assert read_tokens == tokens
        for got, want in zip(layers, kv(tokens), strict=True):
            assert got.offset == 300
            assert mx.array_equal(got.keys, want.keys) and mx.array_equal(got.values, want.values)
    finally:
        again.close()


def test_the_memory_cache_serves_a_prompt_from_disk_after_a_restart(store: DiskCache) -> None:
    tokens = prompt(300)
    first = PrefixCache(10_000_000, model_id=MODEL, disk=store.bind(MODEL, FP))
    first.insert("alice", tokens, kv(tokens), "finished")
    assert store.flush(10)
    again = reopen(store)
    try:
        cache = PrefixCache(10_000_000, model_id=MODEL, disk=again.bind(MODEL, FP))
        found = cache.lookup("alice", [*tokens, 7, 8, 9])
        assert found.cached_tokens == 300 and found.rest == [7, 8, 9]
        assert found.cache is not None and mx.array_equal(found.cache[1].keys[..., :300, :],
                                                          kv(tokens)[1].keys)
        # Nothing on disk for a prompt that starts otherwise, nor for a cold cache without disk.
        assert PrefixCache(10_000_000).lookup("alice", tokens).cached_tokens == 0
        assert cache.lookup("alice", prompt(300, start=5)).cached_tokens == 0
    finally:
        again.close()


def test_another_owner_never_gets_the_prefix(store: DiskCache) -> None:
    tokens = prompt(300)
    save(store.bind(MODEL, FP), "alice", tokens)
    again = reopen(store)
    try:
        assert again.bind(MODEL, FP).find("bob", tokens) is None
        assert again.bind("other-model", FP).find("alice", tokens) is None
        cache = PrefixCache(10_000_000, model_id=MODEL, disk=again.bind(MODEL, FP))
        assert cache.lookup("bob", tokens).cached_tokens == 0
        assert cache.lookup("alice", tokens).cached_tokens == 299
    finally:
        again.close()


def _corrupt(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) - 100] ^= 0x40  # one bit of one value, past the header
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    with path.open("r+b") as handle:
        handle.truncate(path.stat().st_size - 64)


@pytest.mark.parametrize("damage", [_corrupt, _truncate])
def test_a_damaged_file_is_ignored_with_a_warning(store: DiskCache, damage: Any) -> None:
    tokens = prompt(300)
    save(store.bind(MODEL, FP), "alice", tokens)
    (path,) = files(store.root)
    damage(path)
    with capture_logs() as logs:
        cache = PrefixCache(10_000_000, model_id=MODEL, disk=store.bind(MODEL, FP))
        found = cache.lookup("alice", tokens)
    assert found.cached_tokens == 0 and found.cache is None
    assert any(e["log_level"] == "warning" and "unsound" in e["event"] for e in logs), logs
    assert not path.exists() and len(store) == 0  # never tried again


def test_a_truncated_file_is_dropped_when_a_restarted_store_opens(store: DiskCache) -> None:
    tokens = prompt(300)
    save(store.bind(MODEL, FP), "alice", tokens)
    store.close()
    (path,) = files(store.root)
    _truncate(path)
    with capture_logs() as logs:
        again = DiskCache(store.root, 10_000_000, min_tokens=128)
    try:
        assert any(e["log_level"] == "warning" for e in logs), logs
        assert len(again) == 0 and again.bind(MODEL, FP).find("alice", tokens) is None
        assert not path.exists()
    finally:
        again.close()


def test_changed_weights_drop_the_models_entries(store: DiskCache, tmp_path: Path) -> None:
    weights = tmp_path / "model"
    weights.mkdir()
    (weights / "config.json").write_text("{}")
    (weights / "model.safetensors").write_bytes(b"x" * 100)
    before = weights_fingerprint(weights)
    tokens = prompt(300)
    save(store.bind(MODEL, before), "alice", tokens)
    save(store.bind("other", before), "alice", tokens)
    assert weights_fingerprint(weights) == before  # stable while nothing changes
    stat = (weights / "model.safetensors").stat()
    os.utime(weights / "model.safetensors", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    after = weights_fingerprint(weights)
    assert after != before
    again = reopen(store)
    try:
        disk = again.bind(MODEL, after)
        assert disk.find("alice", tokens) is None
        assert [e.model for e in again.entries().values()] == ["other"]  # deleted, not hidden
        assert len(files(again.root)) == 1
    finally:
        again.close()


def test_the_byte_budget_holds_and_evicts_the_least_recently_used(root: Path) -> None:
    probe = DiskCache(root / "probe", 10_000_000, min_tokens=128)
    save(probe.bind(MODEL, FP), "alice", prompt(300))
    size = disk_bytes(probe.root)
    probe.close()
    budget = int(size * 3.5)  # room for three entries
    store = DiskCache(root, budget, min_tokens=128)
    try:
        disk = store.bind(MODEL, FP)
        prompts = [prompt(300, start=10_000 * i) for i in range(5)]
        for index, tokens in enumerate(prompts):
            save(disk, "alice", tokens)
            assert disk_bytes(root) <= budget and store.used_bytes <= budget
            if index == 2:  # prompt 0 is used again: prompts 1 and 2 go first
                found = disk.find("alice", prompts[0])
                assert found is not None and disk.load(found) is not None
        assert len(store) == 3
        kept = [tokens for tokens in prompts if disk.find("alice", tokens) is not None]
        assert kept == [prompts[0], prompts[3], prompts[4]]
        too_big = DiskCache(root / "small", size - 1, min_tokens=128)
        try:
            too_big.bind(MODEL, FP).save("alice", prompts[0], kv(prompts[0]))
            assert too_big.flush(10) and len(too_big) == 0 and disk_bytes(too_big.root) == 0
        finally:
            too_big.close()
    finally:
        store.close()


def test_a_longer_prefix_replaces_the_one_it_extends(store: DiskCache) -> None:
    disk = store.bind(MODEL, FP)
    turn1 = prompt(300)
    save(disk, "alice", turn1)
    assert not disk.save("alice", [*turn1, 1, 2, 3], kv([*turn1, 1, 2, 3]))  # adds too little
    turn2 = turn1 + prompt(300, start=50_000)
    save(disk, "alice", turn2)
    assert len(store) == 1 and len(files(store.root)) == 1
    found = disk.find("alice", turn1)
    assert found is not None and found.matched == (300 // BLOCK) * BLOCK
    loaded = disk.load(found)
    assert loaded is not None and loaded[0] == turn2


def test_one_process_per_directory(store: DiskCache) -> None:
    with capture_logs() as logs:
        second = DiskCache(store.root, 10_000_000)
    assert not second.enabled and any("another process" in e["event"] for e in logs)
    assert not second.bind(MODEL, FP).save("alice", prompt(300), kv(prompt(300)))


def test_a_well_formed_but_foreign_header_is_ignored(store: DiskCache) -> None:
    tokens = prompt(300)
    save(store.bind(MODEL, FP), "alice", tokens)
    (path,) = files(store.root)
    data = path.read_bytes()
    header = data[8:8 + int.from_bytes(data[:8], "little")]
    # Same length, still JSON, still our format: one tensor's offsets renamed away.
    forged = header.replace(b'"data_offsets"', b'"data_offsetz"', 1)
    path.write_bytes(data[:8] + forged + data[8 + len(header):])
    with capture_logs() as logs:
        found = PrefixCache(10_000_000, model_id=MODEL,
                            disk=store.bind(MODEL, FP)).lookup("alice", tokens)
    assert found.cached_tokens == 0
    assert any(e["log_level"] == "warning" and "unsound" in e["event"] for e in logs), logs
    assert not path.exists()
