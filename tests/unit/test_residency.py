"""The eviction policy over scripted sequences: time is a number we pass in."""

from __future__ import annotations

import pytest

from app.engine.residency.policy import (
    LoadDecision,
    ResidencyPolicy,
    parse_budget,
    physical_memory_bytes,
)
from app.settings import format_bytes

GB = 10**9


def policy(budget: int = 10 * GB, max_loaded: int = 4, ttl: float = 100.0) -> ResidencyPolicy:
    return ResidencyPolicy(budget_bytes=budget, max_loaded=max_loaded, default_ttl=ttl)


def load(p: ResidencyPolicy, model: str, size: int, now: float, **kw: object) -> LoadDecision:
    """What the engine thread does: decide, evict as told, mark loaded."""
    decision = p.decide_load(model, size, now)
    assert decision.kind == "load", decision
    for victim in decision.evict:
        assert p.mark_evicted(victim, "lru") is not None
    p.mark_loaded(model, size, now, **kw)  # type: ignore[arg-type]
    return decision


def test_first_load_fits_and_then_is_resident() -> None:
    p = policy()
    assert p.decide_load("a", 3 * GB, now=0) == LoadDecision("load", "a")
    p.mark_loaded("a", 3 * GB, now=0)
    assert p.decide_load("a", 3 * GB, now=1).kind == "resident"
    assert p.used_bytes == 3 * GB


def test_lru_evicts_least_recently_used_first_and_only_as_many_as_needed() -> None:
    p = policy(budget=10 * GB)
    load(p, "a", 4 * GB, now=1)
    load(p, "b", 3 * GB, now=2)
    load(p, "c", 3 * GB, now=3)
    p.acquire("a", now=4)  # a is now the most recently used; b is the oldest
    p.release("a", now=4)
    decision = p.decide_load("d", 3 * GB, now=5)
    assert decision.kind == "load"
    assert decision.evict == ("b",)
    # Needing more room takes the next oldest too, in LRU order.
    assert p.decide_load("e", 6 * GB, now=5).evict == ("b", "c")
    assert p.decide_load("f", 9 * GB, now=5).evict == ("b", "c", "a")


def test_lru_ties_break_by_id_deterministically() -> None:
    p = policy(budget=4 * GB)
    load(p, "zeta", 2 * GB, now=1)
    load(p, "alpha", 2 * GB, now=1)
    assert p.decide_load("new", 2 * GB, now=2).evict == ("alpha",)


def test_max_loaded_evicts_even_when_bytes_fit() -> None:
    p = policy(budget=100 * GB, max_loaded=2)
    load(p, "a", 1 * GB, now=1)
    load(p, "b", 1 * GB, now=2)
    decision = p.decide_load("c", 1 * GB, now=3)
    assert decision.kind == "load"
    assert decision.evict == ("a",)


def test_pinned_models_are_never_evicted() -> None:
    p = policy(budget=10 * GB)
    load(p, "pinned", 4 * GB, now=0, pinned=True)
    load(p, "b", 4 * GB, now=5)
    decision = p.decide_load("c", 5 * GB, now=6)
    assert decision.evict == ("b",)
    assert "pinned" not in decision.evict


def test_leases_block_eviction_and_the_request_waits_naming_the_holders() -> None:
    p = policy(budget=10 * GB)
    load(p, "busy", 6 * GB, now=1)
    load(p, "idle", 2 * GB, now=2)
    p.acquire("busy", now=3)
    decision = p.decide_load("big", 7 * GB, now=4)
    assert decision.kind == "wait"
    assert decision.evict == ()  # nothing evicted while it still would not fit: no thrashing
    assert decision.holders == ("busy",)
    assert "busy" in decision.reason and "1 request in flight" in decision.reason
    # Once released, the same request can load after evicting both, LRU first.
    p.release("busy", now=5)
    after = p.decide_load("big", 7 * GB, now=6)
    assert after.kind == "load"
    assert after.evict == ("idle", "busy")


def test_leased_models_are_skipped_but_idle_ones_still_evicted() -> None:
    p = policy(budget=10 * GB)
    load(p, "old-busy", 5 * GB, now=1)
    load(p, "new-idle", 5 * GB, now=2)
    p.acquire("old-busy", now=3)
    decision = p.decide_load("c", 5 * GB, now=4)
    assert decision.kind == "load"
    assert decision.evict == ("new-idle",)


def test_model_larger_than_the_budget_can_never_fit() -> None:
    p = policy(budget=2 * GB)
    decision = p.decide_load("huge", 3 * GB, now=0)
    assert decision.kind == "never"
    assert "huge" in decision.reason
    assert "3.0 GB" in decision.reason and "2.0 GB" in decision.reason


def test_pins_that_leave_too_little_room_mean_never_not_wait() -> None:
    p = policy(budget=10 * GB, max_loaded=3)
    load(p, "pin", 7 * GB, now=0, pinned=True)
    decision = p.decide_load("big", 4 * GB, now=1)
    assert decision.kind == "never"
    assert decision.holders == ("pin",)
    assert "pin" in decision.reason and "pinned" in decision.reason


def test_pins_filling_max_loaded_mean_never() -> None:
    p = policy(budget=10 * GB, max_loaded=1)
    load(p, "pin", 1 * GB, now=0, pinned=True)
    assert p.decide_load("other", 1 * GB, now=1).kind == "never"


def test_ttl_expiry_uses_default_per_model_override_zero_and_pins() -> None:
    p = policy(ttl=100.0)
    load(p, "default", 1, now=0)
    load(p, "short", 1, now=0, ttl=10.0)
    load(p, "forever", 1, now=0, ttl=0.0)
    load(p, "pinned", 1, now=0, pinned=True, ttl=1.0)
    assert p.expired(now=9) == []
    assert p.expired(now=10) == ["short"]
    assert p.expired(now=1000) == ["default", "short"]
    assert p.next_expiry(now=5) == 5.0


def test_ttl_counts_from_last_use_and_leases_prevent_expiry() -> None:
    p = policy(ttl=10.0)
    load(p, "a", 1, now=0)
    p.acquire("a", now=5)
    assert p.expired(now=100) == []  # in use: never idle-evicted
    p.release("a", now=100)
    assert p.expired(now=109) == []
    assert p.expired(now=110) == ["a"]


def test_default_ttl_zero_disables_expiry() -> None:
    p = policy(ttl=0.0)
    load(p, "a", 1, now=0)
    assert p.expired(now=10**9) == []
    assert p.next_expiry(now=0) is None


def test_eviction_frees_the_budget_and_forget_undoes_a_failed_load() -> None:
    p = policy(budget=10 * GB)
    load(p, "a", 6 * GB, now=0)
    assert p.mark_evicted("a", "manual") is not None
    assert p.mark_evicted("a", "manual") is None
    assert p.used_bytes == 0
    p.mark_loaded("b", 6 * GB, now=1)  # reservation at load start
    p.forget("b")  # the load failed
    assert p.get("b") is None
    assert p.decide_load("c", 10 * GB, now=2) == LoadDecision("load", "c")


def test_release_without_acquire_is_an_error_and_acquire_needs_residency() -> None:
    p = policy()
    load(p, "a", 1, now=0)
    with pytest.raises(ValueError):
        p.release("a", now=1)
    with pytest.raises(KeyError):
        p.acquire("missing", now=1)
    p.release("gone", now=1)  # evicted while in use: nothing to do


def test_snapshot_is_lru_ordered_copies() -> None:
    p = policy()
    load(p, "a", 1, now=2)
    load(p, "b", 2, now=1)
    p.acquire("a", now=3)
    snap = p.snapshot()
    assert [r.id for r in snap] == ["b", "a"]
    assert snap[1].leases == 1
    snap[1].leases = 99  # copies: the policy is unaffected
    resident = p.get("a")
    assert resident is not None and resident.leases == 1


@pytest.mark.parametrize(
    ("value", "physical", "expected"),
    [
        ("12GB", 0, 12 * GB),
        ("512MB", 0, 512 * 10**6),
        ("2GiB", 0, 2 * 2**30),
        ("60%", 16 * GB, int(16 * GB * 0.6)),
        (" 100% ", 8 * GB, 8 * GB),
        ("12.5%", 8 * GB, GB),
    ],
)
def test_parse_budget(value: str, physical: int, expected: int) -> None:
    assert parse_budget(value, physical) == expected


@pytest.mark.parametrize("value", ["0%", "101%", "abc%", "12 parsecs", ""])
def test_parse_budget_rejects_nonsense(value: str) -> None:
    with pytest.raises(ValueError):
        parse_budget(value, 16 * GB)


def test_physical_memory_is_plausible() -> None:
    assert 256 * 10**6 < physical_memory_bytes() < 100 * 10**12


def test_format_bytes() -> None:
    assert format_bytes(512) == "512 B"
    assert format_bytes(82_400_000) == "82.4 MB"
    assert format_bytes(12 * GB) == "12.0 GB"


def test_invalid_policy_parameters() -> None:
    with pytest.raises(ValueError):
        ResidencyPolicy(budget_bytes=0, max_loaded=1, default_ttl=0)
    with pytest.raises(ValueError):
        ResidencyPolicy(budget_bytes=1, max_loaded=0, default_ttl=0)


def test_from_settings_reads_the_residency_section() -> None:
    from app.settings import ResidencySettings

    p = ResidencyPolicy.from_settings(
        ResidencySettings(memory_budget="50%", max_loaded_models=2, default_ttl=7.0),
        physical_bytes=8 * GB)
    assert (p.budget_bytes, p.max_loaded, p.default_ttl) == (4 * GB, 2, 7.0)
    default = ResidencyPolicy.from_settings(ResidencySettings())
    assert default.budget_bytes == int(physical_memory_bytes() * 0.6)


def test_ttl_left_for_the_console() -> None:
    p = policy(ttl=100.0)
    load(p, "idle", 1, now=0)
    load(p, "pinned", 1, now=0, pinned=True)
    load(p, "forever", 1, now=0, ttl=0.0)
    assert p.ttl_left("idle", now=30) == 70.0
    assert p.ttl_left("idle", now=500) == 0.0  # overdue, not negative
    assert p.ttl_left("pinned", now=30) is None
    assert p.ttl_left("forever", now=30) is None
    assert p.ttl_left("absent", now=30) is None
    p.acquire("idle", now=40)
    assert p.ttl_left("idle", now=50) is None  # in use
    p.release("idle", now=60)
    assert p.ttl_left("idle", now=60) == 100.0
