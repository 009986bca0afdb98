"""Admission control (bounded queue, 503 + Retry-After) and the circuit breaker."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from app.errors import Overloaded, RateLimited
from app.http.limits import RateLimitMiddleware
from app.limits.admission import Admission
from app.limits.breaker import BreakerState, CircuitBreaker
from app.limits.window import InProcessLimiter
from app.settings import Settings


class FakeClock:
    def __init__(self) -> None:
        self.now = 500.0

    def __call__(self) -> float:
        return self.now


@contextlib.asynccontextmanager
async def slot(admission: Admission) -> AsyncIterator[None]:
    started = await admission.acquire()
    try:
        yield
    finally:
        admission.release(started)


async def _hold(admission: Admission, entered: asyncio.Event, leave: asyncio.Event) -> str:
    async with slot(admission):
        entered.set()
        await leave.wait()
    return "done"


async def test_closing_refuses_the_queued_and_the_new_but_lets_running_finish() -> None:
    """SIGTERM drain: queued waiters used to start new generations after the running ones
    were ended (issue 13, item 13)."""
    admission = Admission(max_inflight=1, max_queue=4)
    a_in, a_out, b_in, b_out = (asyncio.Event() for _ in range(4))
    a = asyncio.create_task(_hold(admission, a_in, a_out))
    await a_in.wait()
    b = asyncio.create_task(_hold(admission, b_in, b_out))
    await asyncio.sleep(0)
    assert admission.queued == 1
    admission.close("The server is shutting down; retry shortly.", retry_after=7)
    with pytest.raises(Overloaded) as queued:
        await b
    assert queued.value.status == 503 and queued.value.response_headers()["Retry-After"] == "7"
    with pytest.raises(Overloaded, match="shutting down"):
        await admission.acquire()
    a_out.set()
    assert await a == "done"  # the running one finishes normally
    assert (admission.inflight, admission.queued) == (0, 0)
    assert not b_in.is_set()


async def test_queue_then_503_with_retry_after() -> None:
    clock = FakeClock()
    admission = Admission(max_inflight=1, max_queue=1, clock=clock)
    a_in, a_out, b_in, b_out = (asyncio.Event() for _ in range(4))
    a = asyncio.create_task(_hold(admission, a_in, a_out))
    await a_in.wait()
    b = asyncio.create_task(_hold(admission, b_in, b_out))
    await asyncio.sleep(0)
    assert (admission.inflight, admission.queued) == (1, 1)
    assert not b_in.is_set()

    with pytest.raises(Overloaded) as refused:
        async with slot(admission):
            pass
    assert refused.value.status == 503
    assert refused.value.response_headers()["Retry-After"] == "1"  # no history yet
    assert refused.value.body("anthropic")["error"]["type"] == "overloaded_error"

    clock.now += 8  # A took 8 s
    a_out.set()
    assert await a == "done"
    await b_in.wait()
    assert (admission.inflight, admission.queued) == (1, 0)

    # with B running and one queued, a new request waits ~2 slot lengths: 16 s
    c_in, c_out = asyncio.Event(), asyncio.Event()
    c = asyncio.create_task(_hold(admission, c_in, c_out))
    await asyncio.sleep(0)
    with pytest.raises(Overloaded) as estimated:
        async with slot(admission):
            pass
    assert estimated.value.response_headers()["Retry-After"] == "16"
    b_out.set()
    c_out.set()
    assert await b == "done" and await c == "done"
    assert (admission.inflight, admission.queued) == (0, 0)


async def test_cancelled_waiter_gives_its_place_back() -> None:
    admission = Admission(max_inflight=1, max_queue=2)
    a_in, a_out = asyncio.Event(), asyncio.Event()
    a = asyncio.create_task(_hold(admission, a_in, a_out))
    await a_in.wait()
    b = asyncio.create_task(_hold(admission, asyncio.Event(), asyncio.Event()))
    c_in, c_out = asyncio.Event(), asyncio.Event()
    c = asyncio.create_task(_hold(admission, c_in, c_out))
    await asyncio.sleep(0)
    assert admission.queued == 2
    b.cancel()  # client went away while queued
    with pytest.raises(asyncio.CancelledError):
        await b
    assert admission.queued == 1
    a_out.set()
    await a
    await c_in.wait()  # C, not the cancelled B, got the slot
    assert admission.inflight == 1
    c_out.set()
    await c
    assert (admission.inflight, admission.queued) == (0, 0)


async def test_zero_queue_refuses_at_once() -> None:
    admission = Admission(max_inflight=1, max_queue=0)
    async with slot(admission):
        with pytest.raises(Overloaded):
            async with slot(admission):
                pass
    async with slot(admission):
        assert admission.inflight == 1


def _breaker(clock: FakeClock, global_rpm: int = 0) -> CircuitBreaker:
    return CircuitBreaker(InProcessLimiter(clock), global_rpm=global_rpm, failures=2,
                          cooldown=10, clock=clock)


async def test_breaker_open_half_open_closed() -> None:
    clock = FakeClock()
    breaker = _breaker(clock)
    breaker.allow()
    breaker.record_failure()
    assert breaker.state is BreakerState.CLOSED
    breaker.record_success()  # failures must be consecutive
    breaker.record_failure()
    breaker.record_failure()
    assert breaker.state is BreakerState.OPEN
    with pytest.raises(Overloaded) as opened:
        breaker.allow()
    assert opened.value.response_headers()["Retry-After"] == "10"
    clock.now += 4
    with pytest.raises(Overloaded) as still:
        breaker.allow()
    assert still.value.response_headers()["Retry-After"] == "6"

    clock.now += 6
    assert breaker.state is BreakerState.HALF_OPEN
    breaker.allow()  # the one trial
    with pytest.raises(Overloaded):
        breaker.allow()  # others wait for the trial
    breaker.record_failure()  # trial failed: open again, fresh cooldown
    assert breaker.state is BreakerState.OPEN
    clock.now += 10
    breaker.allow()
    breaker.record_success()
    assert breaker.state is BreakerState.CLOSED
    breaker.allow()
    breaker.allow()


async def test_half_open_trial_that_never_reports_expires() -> None:
    clock = FakeClock()
    breaker = _breaker(clock)
    breaker.record_failure()
    breaker.record_failure()
    clock.now += 10
    breaker.allow()  # trial goes out and is never heard of again
    clock.now += 10
    breaker.allow()  # another trial is allowed
    assert breaker.state is BreakerState.HALF_OPEN


async def test_global_rpm() -> None:
    clock = FakeClock()
    breaker = _breaker(clock, global_rpm=2)
    await breaker.hit_global()
    clock.now += 20
    await breaker.hit_global()
    with pytest.raises(RateLimited) as refused:
        await breaker.hit_global()
    assert refused.value.response_headers()["Retry-After"] == "40"
    assert refused.value.code == "rate_limit_exceeded"
    assert await _breaker(clock).hit_global() is None  # 0 = off


async def test_open_breaker_answers_503_in_the_callers_protocol(tmp_path: Path) -> None:
    clock = FakeClock()
    breaker = _breaker(clock)

    async def ok(request: Request) -> JSONResponse:
        return JSONResponse({"ok": True})

    inner = Starlette(routes=[Route("/v1/messages", ok, methods=["POST"]),
                              Route("/v1/models", ok)])
    settings = Settings(config_dir=tmp_path, auth={"enabled": False})
    app: Any = RateLimitMiddleware(inner, limiter=InProcessLimiter(clock), settings=settings,
                                   breaker=breaker)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
        assert (await http.post("/v1/messages")).status_code == 200
        breaker.record_failure()
        breaker.record_failure()
        refused = await http.post("/v1/messages")
        assert refused.status_code == 503
        assert refused.json()["error"]["type"] == "overloaded_error"
        assert refused.headers["retry-after"] == "10"
        assert refused.headers["x-ratelimit-limit-requests"] == "120"  # per_ip_rpm default
        assert (await http.get("/v1/models")).status_code == 200  # no engine work


async def test_breaker_asked_by_middleware_and_engine_still_closes() -> None:
    """The middleware may check the breaker, the engine takes the trial: one request must
    both pass and close it (issue 13, item 1: two `allow()`s refused the trial forever)."""
    clock = FakeClock()
    breaker = _breaker(clock)
    breaker.record_failure()
    breaker.record_failure()
    with pytest.raises(Overloaded):
        breaker.check()  # open: refused early
    clock.now += 10
    breaker.check()  # half-open: the middleware lets it through without taking the trial
    breaker.allow()  # the engine takes it
    breaker.record_success()
    assert breaker.state is BreakerState.CLOSED
    for _ in range(3):
        breaker.check()
        breaker.allow()


async def test_abandoned_trial_lets_the_next_request_be_the_trial() -> None:
    clock = FakeClock()
    breaker = _breaker(clock)
    breaker.record_failure()
    breaker.record_failure()
    clock.now += 10
    breaker.allow()  # trial taken, then the request is refused for its own reasons
    breaker.abandon()
    breaker.allow()  # no cooldown to wait out
    breaker.record_success()
    assert breaker.state is BreakerState.CLOSED


async def test_per_owner_cap_is_a_429_for_that_owner_only() -> None:
    admission = Admission(max_inflight=8, max_queue=8, per_owner=2)
    held = [await admission.acquire("a"), await admission.acquire("a")]
    with pytest.raises(RateLimited) as refused:
        await admission.acquire("a")
    assert refused.value.status == 429 and refused.value.code == "too_many_concurrent_requests"
    other = await admission.acquire("b")  # other keys are not affected
    anonymous = await admission.acquire()  # nor requests without a key
    admission.release(held.pop(), "a")
    held.append(await admission.acquire("a"))  # a slot of its own came back
    for started in held:
        admission.release(started, "a")
    admission.release(other, "b")
    admission.release(anonymous)
    assert admission.inflight == 0 and admission.by_owner == {}


async def test_per_owner_count_is_given_back_when_refused_or_cancelled_in_the_queue() -> None:
    admission = Admission(max_inflight=1, max_queue=1, per_owner=2)
    first = await admission.acquire("a")
    waiting = asyncio.ensure_future(admission.acquire("a"))
    await asyncio.sleep(0)
    with pytest.raises(Overloaded):  # the queue is full: refused, and not counted
        await admission.acquire("b")
    assert admission.by_owner == {"a": 2}
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert admission.by_owner == {"a": 1}
    admission.release(first, "a")
    assert admission.by_owner == {} and admission.inflight == 0


async def test_a_bounded_wait_gives_up_with_overloaded_and_leaves_the_queue_clean() -> None:
    admission = Admission(1, 8, per_owner=4)
    held = await admission.acquire("a")
    with pytest.raises(Overloaded, match="busy"):
        await admission.acquire("b", wait=0)  # a route's local target: no queueing at all
    with pytest.raises(Overloaded, match=r"within 0\.05s"):
        await admission.acquire("b", wait=0.05)
    assert admission.queued == 0 and admission.by_owner == {"a": 1}
    later = asyncio.ensure_future(admission.acquire("b", wait=5))
    await asyncio.sleep(0)
    admission.release(held, "a")
    admission.release(await later, "b")  # a slot that frees in time is taken
    assert admission.inflight == 0 and admission.by_owner == {}
