"""The running batch as groups of sequences with similar KV lengths.

mlx-lm keeps every decoding sequence in one GenerationBatch whose KV cache is one dense array
per layer, left-padded to the longest row. When a 4,000-token prompt finishes prefilling beside
8 streams a few hundred tokens long, joining it copies all 8 short rows out to 4,000 positions
(30 layers of K and V: ~1.7 GB for the demo model in float32, seconds on a CPU, in one step),
and from then on every decode step reads and attends over 9 x 4,000 positions where 4,000 +
8 x 300 hold anything.

Here a joining group of sequences goes into the existing group where it adds the least padding,
unless that padding would cost more per step than a forward of its own: a separate group costs
one more read of the model's weights per step, a merge costs reading its padded KV positions
every step. Each group is a GenerationBatch of the engine's decode class, stepped one after the
other in the same engine step (each pipelines its next forward as mlx-lm's does). For mlx-lm's
BatchGenerator this class is its one generation batch: the same calls and fields, with indices
running over the groups in order.

Only plain KV caches (BatchKVCache) are grouped: other cache kinds (rotating windows, state
space layers) always merge, as mlx-lm does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import BatchKVCache

# A padded KV byte costs about this many weight bytes per decode step. On MLX's CPU backend
# attention reads the cache and exponentiates every score outside BLAS (measured: +600 ms a step
# for ~300 MB of padding, while a whole 8-row forward reading 540 MB of weights took ~220 ms).
# On a GPU both are memory reads.
CPU_KV_BYTE_COST = 4.0
GPU_KV_BYTE_COST = 1.0
MAX_GROUPS = 4  # every group is one more forward per step; past this, merging wins


class DecodeGroups:
    """Groups of decoding sequences; stands where mlx-lm expects its one GenerationBatch."""

    def __init__(self, make_group: Callable[[], Any], forward_bytes: int,
                 kv_byte_cost: float | None = None, max_groups: int = MAX_GROUPS) -> None:
        self._make_group = make_group
        # The first group is never dropped: it carries the decode class's own counters.
        self.groups: list[Any] = [make_group()]
        self.forward_bytes = forward_bytes  # what one more forward reads: the weights
        if kv_byte_cost is None:
            kv_byte_cost = (CPU_KV_BYTE_COST if mx.default_device() == mx.cpu
                            else GPU_KV_BYTE_COST)
        self.kv_byte_cost = kv_byte_cost
        self.max_groups = max_groups

    # --- what BatchGenerator and the scheduler read --------------------------------------

    def __len__(self) -> int:
        return sum(len(g) for g in self.groups)

    def __getattr__(self, name: str) -> Any:
        # Anything else (the decode class's counters, its per-row state) is the first group's.
        if name.startswith("__") or name == "groups":
            raise AttributeError(name)
        return getattr(self.groups[0], name)

    @property
    def uids(self) -> list[int]:
        return [uid for g in self.groups for uid in g.uids]

    @property
    def tokens(self) -> list[list[int]]:
        return [t for g in self.groups for t in g.tokens]

    @property
    def prompt_cache(self) -> list[Any]:
        """Every group's layer caches (what `BatchGenerator.prompt_cache_nbytes` sums)."""
        return [c for g in self.groups for c in g.prompt_cache]

    def _locate(self, idx: int) -> tuple[Any, int]:
        for g in self.groups:
            if idx < len(g):
                return g, idx
            idx -= len(g)
        raise IndexError(idx)

    def extract_cache(self, idx: int) -> list[Any]:
        group, i = self._locate(idx)
        return group.extract_cache(i)  # type: ignore[no-any-return]

    # --- stepping, joining, leaving ------------------------------------------------------

    def next(self) -> list[Any]:
        responses: list[Any] = []
        for g in self.groups:
            if len(g):
                responses.extend(g.next())
        self._drop_empty()
        return responses

    def filter(self, keep: list[int]) -> None:
        """Keep the rows at `keep` (indices over all groups, in order)."""
        wanted = set(keep)
        start = 0
        for g in self.groups:
            size = len(g)
            mine = [i - start for i in range(start, start + size) if i in wanted]
            if len(mine) < size:
                g.filter(mine)
            start += size
        self._drop_empty()

    def extend(self, batch: Any) -> None:
        """Take the sequences of `batch` (a GenerationBatch that just finished prefilling)."""
        target = self._place(batch)
        if target is None:
            target = self._make_group()
            self.groups.append(target)
        target.extend(batch)

    def _drop_empty(self) -> None:
        self.groups = [self.groups[0], *(g for g in self.groups[1:] if len(g))]

    def _place(self, batch: Any) -> Any | None:
        """The group `batch` joins, or None for a group of its own."""
        occupied = [g for g in self.groups if len(g)]
        if not occupied:
            return self.groups[0]
        joining = _kv_shape(batch.prompt_cache)
        if joining is None:
            return occupied[0]
        rows, length, position_bytes = joining
        best, best_cost = None, float("inf")
        for g in occupied:
            shape = _kv_shape(g.prompt_cache)
            if shape is None:
                return occupied[0]  # a cache kind mlx-lm merges its own way
            group_rows, group_length, _ = shape
            merged = max(length, group_length)
            padding = rows * (merged - length) + group_rows * (merged - group_length)
            cost = padding * position_bytes * self.kv_byte_cost
            if cost < best_cost:
                best, best_cost = g, cost
        if best_cost <= self.forward_bytes or len(self.groups) >= self.max_groups:
            return best
        if not len(self.groups[0]):
            return self.groups[0]  # the first group is free: use it before making one
        return None


def _kv_shape(caches: list[Any]) -> tuple[int, int, int] | None:
    """(rows, positions, bytes per row and position over all layers) of a batch's plain KV
    caches; None for other cache kinds or an empty cache."""
    if not caches or not all(type(c) is BatchKVCache for c in caches):
        return None
    first = caches[0]
    if first.keys is None:
        return None
    rows = first.keys.shape[0]
    # Arrays are allocated in steps of 256 positions: bytes / (rows x allocated positions).
    per_position = sum((c.keys.nbytes + c.values.nbytes) // (c.keys.shape[0] * c.keys.shape[2])
                       for c in caches if c.keys is not None and c.keys.shape[2])
    return rows, int(first._idx), per_position


def weight_bytes(model: Any) -> int:
    """Bytes of the model's parameters: what a forward reads once."""
    from mlx.utils import tree_flatten

    return sum(int(v.nbytes) for _, v in tree_flatten(model.parameters()))
