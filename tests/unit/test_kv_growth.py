"""Staged KV growth (app/engine/kv_growth.py): the caches hold exactly what mlx-lm's own
growth gives them, step by step, while the copying happens in the steps before they fill."""

from __future__ import annotations

from typing import Any

import pytest

mx = pytest.importorskip("mlx.core")

from mlx_lm.models.cache import BatchKVCache  # noqa: E402

from app.engine.kv_growth import LEAD_STEPS, KVGrowth  # noqa: E402

LAYERS = 6


def _filled(positions: int) -> list[Any]:
    """Per-layer caches of 3 rows (left-padded) holding `positions` positions."""
    mx.random.seed(positions)
    caches = [BatchKVCache([2, 0, 5]) for _ in range(LAYERS)]
    for cache in caches:
        cache.update_and_fetch(mx.random.normal((3, 2, positions, 8)),
                               mx.random.normal((3, 2, positions, 8)))
    mx.eval([c.state for c in caches])
    return caches


def _step(caches: list[Any], tokens: int, seed: int) -> list[tuple[Any, Any]]:
    mx.random.seed(seed)
    rows = caches[0].keys.shape[0]
    out = [c.update_and_fetch(mx.random.normal((rows, 2, tokens, 8)),
                              mx.random.normal((rows, 2, tokens, 8))) for c in caches]
    mx.eval(out)
    return out


def _assert_same(ours: list[Any], theirs: list[Any], step: int) -> None:
    for mine, reference in zip(ours, theirs, strict=True):
        assert mine._idx == reference._idx
        for got, expected in zip(mine.keys_and_values(), reference.keys_and_values(),
                                 strict=True):
            assert mx.array_equal(got, expected), step


@pytest.mark.parametrize(("tokens", "most"), [(1, 4), (3, 3)])
def test_staged_growth_holds_what_mlx_lms_growth_holds(tokens: int, most: int) -> None:
    start = 256 - most - tokens * (LEAD_STEPS + 4)  # a few steps before copying starts
    ours, theirs = _filled(start), _filled(start)
    growth = KVGrowth()
    grown_by_us = 0
    for step in range(LEAD_STEPS + 12):
        before = [c.keys.shape[2] for c in ours]
        growth.prepare(ours, most, per_step=tokens)
        grown_by_us += sum(c.keys.shape[2] != b for c, b in zip(ours, before, strict=True))
        sizes = [c.keys.shape[2] for c in ours]
        _step(ours, tokens, step)
        _step(theirs, tokens, step)
        # Never grown inside the forward: every layer had its room already.
        assert [c.keys.shape[2] for c in ours] == sizes, step
        _assert_same(ours, theirs, step)
    assert grown_by_us == LAYERS
    assert all(c.keys.shape[2] > 256 for c in ours)


def test_copies_of_a_batch_whose_rows_changed_or_rolled_back_are_dropped() -> None:
    ours, theirs = _filled(256 - 4 - 10), _filled(256 - 4 - 10)
    growth = KVGrowth()
    for step in range(4):  # some layers copied
        growth.prepare(ours, 4)
        _step(ours, 1, step)
        _step(theirs, 1, step)
    assert growth._copies
    for cache in (*ours, *theirs):  # a sequence leaves, a verify step is rolled back
        cache.filter([0, 2])
        cache.trim(2)
    for n in range(20):
        growth.prepare(ours, 4)
        _step(ours, 1, 100 + n)
        _step(theirs, 1, 100 + n)
        _assert_same(ours, theirs, n)
    assert all(c.keys.shape[2] > 252 for c in ours)


def test_forget_lets_go_of_every_copy() -> None:
    """A prompt batch's copies go when its chunks stop riding (it joins the decoding rows)."""
    caches = _filled(256 - 3 - 4)
    growth = KVGrowth()
    growth.prepare(caches, 3, per_step=3)
    assert growth._copies
    growth.forget()
    assert not growth._copies
