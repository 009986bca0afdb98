"""The prefix (prompt) cache of one model: KV already computed, reused by later prompts that
start the same way (the next turn of a chat, an agent's fixed system prompt).

Two things mlx-lm's LRUPromptCache does not do on its own, and this module adds:

- **Owners.** Reuse is namespaced by owner (the API key; every anonymous loopback client is one
  owner). `cached_tokens` is returned to the caller, so a shared cache would tell any key
  whether another key recently sent a given document.
- **A byte budget that holds.** mlx-lm hands over a finished row's KV as a *lazy* slice of the
  whole batch's buffers: until evaluated it keeps every layer's (batch x heads x length x dim)
  buffer alive while the LRU counts only the row's share. Entries are evaluated into their own
  exact-size arrays on insert, so the bytes counted are the bytes held.

Under it, optionally, the disk tier (`disk_cache.ModelDisk`): long prefixes are also handed to
it on insert, and a prompt the memory cannot serve in full is looked up there; a file that
saves enough prefill is loaded, put back in memory, and served from there.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import Any, Literal

import mlx.core as mx
import structlog
from mlx_lm.models.cache import (
    KVCache,
    LRUPromptCache,
    can_trim_prompt_cache,
    trim_prompt_cache,
)

from app import metrics
from app.engine.disk_cache import ModelDisk

log = structlog.get_logger(__name__)

Outcome = Literal["hit", "partial", "miss"]

# Read a disk entry only when it spares at least this many more tokens of prefill than memory
# does: loading and verifying costs about as much as prefilling a few dozen tokens.
DISK_MIN_GAIN = 128


@dataclass
class Lookup:
    cache: list[Any] | None  # per-layer caches to start from, or None
    rest: list[int]  # the prompt tokens still to prefill
    cached_tokens: int
    outcome: Outcome


def _own_copy(layers: list[Any], length: int, *, background: bool = False
              ) -> list[Any] | None:
    """`layers` cut to exactly `length` positions, evaluated into arrays of their own; None when
    a layer holds fewer positions (its KV was never computed, e.g. a prefill chunk that failed).

    `background`: the copies run on a stream of their own, beside the next decode step, and
    this returns without waiting (a 4,000-token prompt's KV is ~185 MB for the demo model:
    130-250 ms of copying on a 2-core CPU, mostly faulting in fresh pages, that every running
    stream would otherwise wait for). Whatever reads them later waits for them."""
    out: list[Any] = []
    with mx.stream(_copy_stream()) if background else contextlib.nullcontext():
        for layer in layers:
            if isinstance(layer, KVCache):
                if layer.keys is None or layer.offset < length:
                    return None
                copy = KVCache()
                # contiguous() of a slice copies; evaluated, it no longer references the batch.
                copy.keys = mx.contiguous(layer.keys[..., :length, :])
                copy.values = mx.contiguous(layer.values[..., :length, :])
                copy.offset = length
                out.append(copy)
            else:  # other kinds (rotating, SSM state) are kept whole, as mlx-lm extracted them
                out.append(layer)
    states = [layer.state for layer in out]
    if background:
        mx.async_eval(states)  # type: ignore[no-untyped-call]
    else:
        mx.eval(states)
    return out


# MLX streams belong to the thread that made them: one copy stream per engine thread.
_COPY_STREAM = threading.local()


def _copy_stream() -> Any:
    stream = getattr(_COPY_STREAM, "stream", None)
    if stream is None:
        stream = _COPY_STREAM.stream = mx.new_stream(mx.default_device())
    return stream


class PrefixCache:
    """One model's prefix cache. Every method runs on the MLX thread."""

    def __init__(self, max_bytes: int, *, model_id: str = "model",
                 disk: ModelDisk | None = None) -> None:
        self.model_id = model_id
        self.disk = disk if disk is not None and max_bytes > 0 else None
        self.enabled = max_bytes > 0
        self.max_bytes = max_bytes
        self._lru = LRUPromptCache(max_size=1 << 20, max_bytes=max(max_bytes, 1))
        # Entries copied in the background, for the disk tier once their copies are done
        # (`flush`): handing them over sooner would wait for the copies.
        self._for_disk: list[tuple[str, list[int], list[Any]]] = []

    @property
    def nbytes(self) -> int:
        return int(self._lru.nbytes)

    def __len__(self) -> int:
        return len(self._lru)

    def lookup(self, owner: str, prompt: list[int]) -> Lookup:
        """The longest cached KV of `owner` this prompt starts with; counted in the metrics."""
        cache, rest = self._nearest(owner, prompt)
        cached = len(prompt) - len(rest)
        outcome: Outcome = "miss" if cached == 0 else (
            "hit" if cached >= len(prompt) - 1 else "partial")
        metrics.PREFIX_CACHE_LOOKUPS.labels(outcome).inc()
        metrics.PREFIX_CACHE_TOKENS.labels("reused").inc(cached)
        metrics.PREFIX_CACHE_TOKENS.labels("prefilled").inc(len(rest))
        return Lookup(cache=cache, rest=rest, cached_tokens=cached, outcome=outcome)

    def _nearest(self, owner: str, prompt: list[int]) -> tuple[list[Any] | None, list[int]]:
        if not self.enabled:
            return None, prompt
        cache, rest = self._lru.fetch_nearest_cache(owner, prompt)
        if len(rest) > 1 and self._from_disk(owner, prompt, len(prompt) - len(rest)):
            cache, rest = self._lru.fetch_nearest_cache(owner, prompt)
        if cache is not None and not rest:
            # An exact hit still needs one token to compute the first logits from.
            if not can_trim_prompt_cache(cache):
                return None, prompt
            trim_prompt_cache(cache, 1)
            rest = prompt[-1:]
        return cache, list(rest)

    def _from_disk(self, owner: str, prompt: list[int], cached: int) -> bool:
        """Bring the disk's best entry for `prompt` into memory when it beats `cached` by
        enough; True when it is there."""
        if self.disk is None or not self.disk.enabled or len(prompt) - cached < DISK_MIN_GAIN:
            return False  # (a short remainder: nothing on disk could spare enough of it)
        try:
            found = self.disk.find(owner, prompt)
            if found is None or found.matched - cached < DISK_MIN_GAIN:
                return False
            loaded = self.disk.load(found)
            if loaded is None:
                return False
            tokens, layers = loaded
            nbytes = sum(layer.nbytes for layer in layers)
            if nbytes > self.max_bytes:
                return False
            # The whole entry goes in (later prompts may share more of it); the memory LRU
            # trims a copy to what this prompt shares.
            self._lru.insert_cache(owner, tokens, layers)
        except Exception:  # the disk only saves work: a failure costs the hit, not the request
            log.exception("disk prefix cache lookup failed")
            return False
        metrics.PREFIX_CACHE_INSERTS.labels("disk").inc()
        metrics.PREFIX_CACHE_BYTES.labels(self.model_id).set(self.nbytes)
        return True

    def insert(self, owner: str, tokens: list[int], layers: list[Any], reason: str, *,
               background: bool = False) -> bool:
        """Keep the KV of `tokens` (the first len(tokens) positions of `layers`) for `owner`.

        Entries that are a prefix of this one are dropped by the LRU (this one covers them);
        the least recently used go when the budget is exceeded. False when nothing was kept.
        `background`: copy beside the next step (`_own_copy`); only for `layers` computed by a
        step that succeeded (a failed one's graph would fail the reader, not this call), and
        the disk tier gets it at the next `flush`.
        """
        if not self.enabled or not tokens:
            return False
        try:
            own = _own_copy(layers, len(tokens), background=background)
        except Exception as error:  # a poisoned graph (failed step): keep nothing, serve on
            log.warning("prefix cache insert skipped", reason=reason, error=repr(error))
            return False
        if own is None:
            return False
        nbytes = sum(layer.nbytes for layer in own)
        if nbytes > self.max_bytes:
            return False  # would evict everything, itself included
        self._lru.insert_cache(owner, list(tokens), own)
        metrics.PREFIX_CACHE_INSERTS.labels(reason).inc()
        metrics.PREFIX_CACHE_BYTES.labels(self.model_id).set(self.nbytes)
        if background:
            self._for_disk.append((owner, list(tokens), own))
        else:
            self._save_to_disk(owner, list(tokens), own)
        return True

    def flush(self) -> None:
        """Hand the entries copied in the background to the disk tier (call a step later)."""
        pending, self._for_disk = self._for_disk, []
        for owner, tokens, own in pending:
            self._save_to_disk(owner, tokens, own)

    def _save_to_disk(self, owner: str, tokens: list[int], own: list[Any]) -> None:
        if self.disk is None:
            return
        try:  # queued for the writer thread when long and new enough
            self.disk.save(owner, tokens, own)
        except Exception:
            log.exception("disk prefix cache save failed")

    def clear(self) -> None:
        self.flush()  # the disk tier outlives the memory one
        self._lru.trim_to(n_sequences=0)
        metrics.PREFIX_CACHE_BYTES.labels(self.model_id).set(0)
