"""Which models stay in memory: LRU eviction under a byte budget and a count cap, idle TTL,
pins and leases.

Pure bookkeeping: no MLX, no threads, no clock. The engine thread asks `decide_load` before a
load, performs the evictions it names, then reports back with `mark_loaded` / `mark_evicted`.
Every call takes `now` so tests can script time. Call it from one thread only (the engine
thread), and call `mark_loaded` when a load *starts* so a second decision cannot promise the
same memory twice; `forget(id)` undoes that if the load fails.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Literal

from app import metrics
from app.settings import ResidencySettings, format_bytes, parse_bytes

DecisionKind = Literal["resident", "load", "wait", "never"]
EvictReason = Literal["lru", "ttl", "manual", "budget"]


@dataclass
class Resident:
    """One model the policy counts as holding memory."""

    id: str
    size: int
    pinned: bool
    ttl: float | None  # None: use the policy's default; 0: never expire
    last_used: float
    loaded_at: float
    leases: int = 0


@dataclass(frozen=True)
class LoadDecision:
    """What to do about a request for `model`.

    - `resident`: already loaded, nothing to do.
    - `load`: evict `evict` (in this order), then load.
    - `wait`: it would fit once `holders` release their leases; retry after a release or give
      up after `[residency] load_wait` with a 503 carrying `reason`.
    - `never`: it cannot fit even with everything evictable evicted (507 with `reason`).
    """

    kind: DecisionKind
    model: str
    evict: tuple[str, ...] = ()
    holders: tuple[str, ...] = ()
    reason: str = ""


def parse_budget(value: str, physical_bytes: int) -> int:
    """'12GB' -> bytes; '60%' -> that share of `physical_bytes`."""
    text = value.strip()
    if text.endswith("%"):
        try:
            percent = float(text[:-1])
        except ValueError:
            raise ValueError(f"expected a percentage like '60%', got {value!r}") from None
        if not 0 < percent <= 100:
            raise ValueError(f"a memory budget percentage must be in (0, 100], got {value!r}")
        return int(physical_bytes * percent / 100)
    return parse_bytes(text)


def physical_memory_bytes() -> int:
    """Installed RAM (Linux and macOS both answer these sysconf names)."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError) as error:
        raise RuntimeError(
            "cannot read physical memory size; set [residency] memory_budget in bytes"
        ) from error


class ResidencyPolicy:
    def __init__(self, budget_bytes: int, max_loaded: int, default_ttl: float) -> None:
        if budget_bytes <= 0 or max_loaded < 1 or default_ttl < 0:
            raise ValueError("need budget_bytes > 0, max_loaded >= 1, default_ttl >= 0")
        self.budget_bytes = budget_bytes
        self.max_loaded = max_loaded
        self.default_ttl = default_ttl
        self._residents: dict[str, Resident] = {}

    @classmethod
    def from_settings(cls, residency: ResidencySettings,
                      physical_bytes: int | None = None) -> ResidencyPolicy:
        """The policy `[residency]` describes; physical memory is read when not given."""
        physical = physical_bytes if physical_bytes is not None else physical_memory_bytes()
        return cls(budget_bytes=parse_budget(residency.memory_budget, physical),
                   max_loaded=residency.max_loaded_models, default_ttl=residency.default_ttl)

    # --- queries -----------------------------------------------------------------------------

    @property
    def used_bytes(self) -> int:
        return sum(r.size for r in self._residents.values())

    def get(self, model: str) -> Resident | None:
        resident = self._residents.get(model)
        return replace(resident) if resident else None

    def snapshot(self) -> list[Resident]:
        """Copies of every resident, least recently used first."""
        return [replace(r) for r in self._lru_order(self._residents.values())]

    def decide_load(self, model: str, size: int, now: float) -> LoadDecision:
        if model in self._residents:
            return LoadDecision("resident", model)
        if size > self.budget_bytes:
            return LoadDecision("never", model, reason=(
                f"model {model!r} needs about {format_bytes(size)} but the memory budget is "
                f"{format_bytes(self.budget_bytes)}; raise [residency] memory_budget or lower "
                f"its max_context"))
        pinned = [r for r in self._residents.values() if r.pinned]
        pinned_bytes = sum(r.size for r in pinned)
        if size > self.budget_bytes - pinned_bytes or len(pinned) >= self.max_loaded:
            return LoadDecision("never", model, holders=tuple(r.id for r in pinned), reason=(
                f"model {model!r} needs about {format_bytes(size)} and cannot fit beside the "
                f"pinned models {_describe(pinned)} (budget {format_bytes(self.budget_bytes)}, "
                f"at most {self.max_loaded} loaded)"))

        used, count = self.used_bytes, len(self._residents)
        candidates = self._lru_order(
            r for r in self._residents.values() if not r.pinned and r.leases == 0)
        evict: list[str] = []
        for victim in candidates:
            if used + size <= self.budget_bytes and count < self.max_loaded:
                break
            evict.append(victim.id)
            used -= victim.size
            count -= 1
        if used + size <= self.budget_bytes and count < self.max_loaded:
            return LoadDecision("load", model, evict=tuple(evict))

        # Evicting everything idle is not enough: evict nothing now (no thrashing) and wait for
        # leases to be released.
        holders = self._lru_order(
            r for r in self._residents.values() if r.pinned or r.leases > 0)
        return LoadDecision("wait", model, holders=tuple(r.id for r in holders), reason=(
            f"model {model!r} needs about {format_bytes(size)}; memory is held by "
            f"{_describe(holders)} (budget {format_bytes(self.budget_bytes)}, "
            f"{format_bytes(self.used_bytes)} in use, at most {self.max_loaded} loaded)"))

    def expired(self, now: float) -> list[str]:
        """Idle models whose TTL has run out, least recently used first."""
        due = []
        for resident in self._lru_order(self._residents.values()):
            expires_at = self._expires_at(resident)
            if expires_at is not None and now >= expires_at:
                due.append(resident.id)
        return due

    def ttl_left(self, model: str, now: float) -> float | None:
        """Seconds until `model` would be evicted as idle; None when it cannot expire now
        (pinned, in use, TTL 0, or not resident)."""
        resident = self._residents.get(model)
        expires_at = self._expires_at(resident) if resident else None
        return None if expires_at is None else max(0.0, expires_at - now)

    def next_expiry(self, now: float) -> float | None:
        """Seconds until the next TTL eviction is due (0 if overdue); None when none can expire."""
        times = [t for r in self._residents.values() if (t := self._expires_at(r)) is not None]
        return max(0.0, min(times) - now) if times else None

    # --- updates -----------------------------------------------------------------------------

    def mark_loaded(self, model: str, size: int, now: float, *, pinned: bool = False,
                    ttl: float | None = None) -> None:
        previous = self._residents.get(model)
        self._residents[model] = Resident(
            id=model, size=size, pinned=pinned, ttl=ttl, last_used=now, loaded_at=now,
            leases=previous.leases if previous else 0)
        self._publish()

    def mark_evicted(self, model: str, reason: EvictReason) -> Resident | None:
        """Forget `model`; returns what it was, or None if it was not resident."""
        resident = self._residents.pop(model, None)
        if resident is not None:
            metrics.MODEL_EVICTIONS.labels(reason=reason).inc()
            self._publish()
        return resident

    def forget(self, model: str) -> None:
        """Drop a reservation whose load failed (not an eviction: no metric)."""
        if self._residents.pop(model, None) is not None:
            self._publish()

    def acquire(self, model: str, now: float) -> None:
        """A request starts using `model`: it cannot be evicted until released."""
        resident = self._require(model)
        resident.leases += 1
        resident.last_used = now

    def release(self, model: str, now: float) -> None:
        resident = self._residents.get(model)
        if resident is None:  # evicted manually while in use: nothing left to release
            return
        if resident.leases <= 0:
            raise ValueError(f"release of {model!r} without a matching acquire")
        resident.leases -= 1
        resident.last_used = now

    # --- internals ---------------------------------------------------------------------------

    def _require(self, model: str) -> Resident:
        resident = self._residents.get(model)
        if resident is None:
            raise KeyError(f"model {model!r} is not resident")
        return resident

    def _expires_at(self, resident: Resident) -> float | None:
        ttl = self.default_ttl if resident.ttl is None else resident.ttl
        if resident.pinned or resident.leases > 0 or ttl <= 0:
            return None
        return resident.last_used + ttl

    @staticmethod
    def _lru_order(residents: Iterable[Resident]) -> list[Resident]:
        # Ties broken by id so decisions are deterministic.
        return sorted(residents, key=lambda r: (r.last_used, r.id))

    def _publish(self) -> None:
        metrics.LOADED_MODELS.set(len(self._residents))
        metrics.RESIDENT_BYTES.set(self.used_bytes)


def _describe(residents: list[Resident]) -> str:
    if not residents:
        return "no model"
    parts = []
    for r in residents:
        plural = "s" if r.leases != 1 else ""
        why = "pinned" if r.pinned else f"{r.leases} request{plural} in flight"
        parts.append(f"{r.id} ({format_bytes(r.size)}, {why})")
    return ", ".join(parts)
