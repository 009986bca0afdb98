"""Grow a batch's KV arrays a few layers at a time in the steps before they fill.

mlx-lm's BatchKVCache holds K and V in blocks of `step` (256) positions. A forward whose new
tokens do not fit first concatenates every layer's whole array onto a fresh block, inside that
forward: for 8 streams ~1,300 tokens deep (the demo model in float32) ~570 MB of fresh memory
and ~470 MB copied in one decode step, 569 ms against ~266 ms for its neighbours, once every 256
steps. That was the longest gap the running streams saw while a long prompt prefilled (bench
`mixed`). Making the same concatenation one step early on another stream did not help: the
cost is CPU time (fresh pages fault in at about 1 GB/s on the benchmark VM), and both cores
are busy with the step.

`KVGrowth.prepare` spreads it over the steps before: once a cache is within `LEAD_STEPS` steps
of filling, each step copies a share of its layers into arrays with a block more room. When the
next forward might not fit, every layer copied takes its new arrays, after the positions
written since its copy are copied over too (a few positions). A layer not copied in time grows
as mlx-lm grows it. A cache whose rows change (a sequence joins or leaves) drops its copies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import BatchKVCache

LEAD_STEPS = 16  # start copying this many steps before a cache fills


@dataclass
class _Copy:
    keys: mx.array
    values: mx.array
    kept: int  # positions copied: [0, kept) of the arrays it was made from
    left_padding: Any  # the cache's rows when copied (mlx-lm replaces it on filter and extend)
    shape: tuple[int, ...]  # the cache's keys when copied: rows and room


class KVGrowth:
    """Staged growth of BatchKVCache layers (one instance per model batch, engine thread)."""

    def __init__(self) -> None:
        self._copies: dict[Any, _Copy] = {}  # by cache (mlx-lm's caches hash by identity)

    def prepare(self, caches: list[Any], most: int, per_step: int = 1) -> None:
        """Before a forward that writes up to `most` positions a row into `caches` (about
        `per_step` a step from here on): copy a share of the layers that fill within
        LEAD_STEPS steps; give the copies to the layers where `most` may not fit."""
        live = set(caches)
        self._copies = {c: copy for c, copy in self._copies.items() if c in live}
        waiting: list[Any] = []  # layers that fill soon, not copied yet
        steps_left = LEAD_STEPS
        for cache in caches:
            if type(cache) is not BatchKVCache or cache.keys is None:
                continue
            room = cache.keys.shape[2] - cache._idx
            copy = self._copy_of(cache)
            if room < most:
                if copy is not None:
                    self._install(cache, copy)
                continue
            steps = (room - most) // max(per_step, 1)
            if copy is None and steps < LEAD_STEPS:
                waiting.append(cache)
                steps_left = min(steps_left, steps)
        if waiting:  # the rest of them over the steps left, so all are copied in time
            made = [self._copy(cache, most) for cache in
                    waiting[:math.ceil(len(waiting) / (steps_left + 1))]]
            mx.async_eval([a for c in made for a in (c.keys, c.values)])  # type: ignore[no-untyped-call]

    def forget(self) -> None:
        """Let go of every copy (the caches they were for are done with, or will be)."""
        self._copies.clear()

    def _copy_of(self, cache: Any) -> _Copy | None:
        copy = self._copies.get(cache)
        if copy is not None and (cache.left_padding is not copy.left_padding
                                 or cache.keys.shape != copy.shape or cache._idx < copy.kept):
            del self._copies[cache]  # rows changed, or rolled back past the copy
            return None
        return copy

    def _copy(self, cache: Any, tokens: int) -> _Copy:
        kept = cache._idx
        room = cache.keys.shape[2] - kept + (cache.step + tokens - 1) // cache.step * cache.step
        keys, values = (
            mx.concatenate([kv[..., :kept, :],
                            mx.zeros((*kv.shape[:2], room, kv.shape[3]), kv.dtype)], axis=2)
            for kv in (cache.keys, cache.values))
        copy = _Copy(keys, values, kept, cache.left_padding, tuple(cache.keys.shape))
        self._copies[cache] = copy
        return copy

    def _install(self, cache: Any, copy: _Copy) -> None:
        written = slice(copy.kept, cache._idx)  # since the copy: a few positions
        copy.keys[..., written, :] = cache.keys[..., written, :]
        copy.values[..., written, :] = cache.values[..., written, :]
        cache.keys, cache.values = copy.keys, copy.values
        del self._copies[cache]
