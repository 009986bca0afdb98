"""Sliding-log limits on both backends (exact numbers), Redis shared by two limiters,
Redis killed and restarted mid-test, and the limit headers through the middleware."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import REGISTRY
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from structlog.testing import capture_logs

from app.http.auth import AuthMiddleware
from app.http.limits import RateLimitMiddleware
from app.limits.breaker import CircuitBreaker
from app.limits.fallback import FallbackLimiter
from app.limits.redis_backend import RedisLimiter
from app.limits.window import InProcessLimiter, Limiter
from app.security.keys import KeyStore
from app.settings import Settings
from tests.redis_server import RedisServer


class FakeClock:
    def __init__(self, start: float = 1_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(params=["memory", "redis"])
async def limiter(request: pytest.FixtureRequest, clock: FakeClock,
                  redis_server: RedisServer) -> AsyncIterator[Limiter]:
    if request.param == "memory":
        yield InProcessLimiter(clock)
        return
    backend = RedisLimiter.from_url(redis_server.url, clock, timeout=5)
    await backend.client.flushdb()
    yield backend
    await backend.aclose()


async def test_request_arithmetic(limiter: Limiter, clock: FakeClock) -> None:
    results = []
    for _ in range(3):
        results.append(await limiter.acquire("k", 3))
        clock.advance(10)
    assert [(r.allowed, r.remaining, r.reset_header) for r in results] == [
        (True, 2, "60s"), (True, 1, "50s"), (True, 0, "40s")]
    refused = await limiter.acquire("k", 3)  # t=30
    assert (refused.allowed, refused.limit, refused.remaining) == (False, 3, 0)
    assert refused.retry_after == pytest.approx(30)
    assert refused.reset_header == "30s"
    clock.advance(30)  # t=60: the t=0 entry leaves the window
    again = await limiter.acquire("k", 3)
    assert (again.allowed, again.remaining, again.reset_header) == (True, 0, "10s")
    other = await limiter.acquire("other", 3)  # keys are independent
    assert (other.allowed, other.remaining) == (True, 2)


async def test_reservations_settle_in_place(limiter: Limiter, clock: FakeClock) -> None:
    """Reserve prompt + max_tokens, settle to the real use: the refund frees room at once and
    the settled cost ages out with the reservation's timestamp (issue 13, item 12)."""
    held = await limiter.acquire("r", 100, cost=80)
    assert (held.allowed, held.remaining) == (True, 20) and held.entry
    refused = await limiter.acquire("r", 100, cost=30)  # 80 held: 30 does not fit
    assert not refused.allowed and refused.entry is None
    clock.advance(10)
    entry = await limiter.adjust("r", held.entry, 25)  # used only 25
    assert (await limiter.acquire("r", 100, mode="peek")).remaining == 75
    fits = await limiter.acquire("r", 100, cost=70)
    assert (fits.allowed, fits.remaining) == (True, 5)
    # The settled 25 ages out at t=60 (the reservation's time), not at t=70.
    clock.advance(50)
    assert (await limiter.acquire("r", 100, mode="peek")).remaining == 30
    await limiter.adjust("r", entry, 0)  # aged out already: nothing changes
    assert (await limiter.acquire("r", 100, mode="peek")).remaining == 30
    assert (await limiter.acquire("r", 100, cost=5, mode="peek")).entry is None


async def test_token_costs(limiter: Limiter, clock: FakeClock) -> None:
    first = await limiter.acquire("t", 100, cost=70, mode="charge")
    assert (first.allowed, first.remaining) == (True, 30)
    clock.advance(5)
    peek = await limiter.acquire("t", 100, mode="peek")
    assert (peek.allowed, peek.remaining, peek.reset_header) == (True, 30, "55s")
    too_big = await limiter.acquire("t", 100, cost=40)
    assert (too_big.allowed, too_big.remaining) == (False, 30)
    assert too_big.retry_after == pytest.approx(55)  # once the 70 ages out
    fits = await limiter.acquire("t", 100, cost=30)
    assert (fits.allowed, fits.remaining) == (True, 0)
    clock.advance(5)
    over = await limiter.acquire("t", 100, cost=25, mode="charge")  # known only afterwards
    assert (over.allowed, over.remaining) == (True, 0)
    spent = await limiter.acquire("t", 100, mode="peek")
    assert not spent.allowed
    # used 125: freeing the 70 (t=0) leaves 55 < 100, so the window reopens at t=60
    assert spent.retry_after == pytest.approx(50)
    clock.advance(50)
    assert (await limiter.acquire("t", 100, mode="peek")).remaining == 45
    impossible = await limiter.acquire("t", 100, cost=101)
    assert not impossible.allowed and impossible.retry_after == pytest.approx(60)


async def test_window_edge_burst_does_not_double(limiter: Limiter, clock: FakeClock) -> None:
    clock.now = 6_000_000.0 + 59.5  # just before a fixed-window boundary
    assert all([(await limiter.acquire("edge", 10)).allowed for _ in range(10)])
    clock.advance(1.0)  # a fixed window would start fresh here
    late = [(await limiter.acquire("edge", 10)).allowed for _ in range(10)]
    assert late == [False] * 10
    clock.advance(58.9)  # 59.9 s after the burst: still inside the sliding window
    assert not (await limiter.acquire("edge", 10)).allowed
    clock.advance(0.1)  # 60 s after the burst
    assert [(await limiter.acquire("edge", 10)).allowed for _ in range(11)] == [True] * 10 + [
        False]


async def test_two_limiters_share_one_redis(redis_server: RedisServer, clock: FakeClock) -> None:
    one = RedisLimiter.from_url(redis_server.url, clock, timeout=5)
    two = RedisLimiter.from_url(redis_server.url, clock, timeout=5)
    await one.client.flushdb()
    try:
        allowed = [(await (one if i % 2 else two).acquire("global", 5)).allowed for i in range(8)]
        assert allowed == [True] * 5 + [False] * 3
        assert (await two.acquire("global", 5, mode="peek")).remaining == 0
    finally:
        await one.aclose()
        await two.aclose()


def _fallbacks() -> float:
    return REGISTRY.get_sample_value("mlxgw_ratelimit_fallback_total") or 0.0


async def test_redis_killed_then_restarted(clock: FakeClock) -> None:
    with RedisServer() as server:
        # generous timeouts so a busy test machine can't fake an outage; a stopped server
        # refuses connections at once anyway
        limiter = FallbackLimiter(RedisLimiter.from_url(server.url, clock, timeout=5),
                                  InProcessLimiter(clock), probe_interval=0, timeout=5)
        try:
            assert (await limiter.acquire("v", 3)).remaining == 2  # in Redis
            assert limiter.redis_up
            before = _fallbacks()
            server.stop()
            with capture_logs() as logs:
                down = [await limiter.acquire("v", 3) for _ in range(5)]
            # in-process takes over: limited from its own count, never unlimited, no exception
            assert [r.allowed for r in down] == [True, True, True, False, False]
            assert not limiter.redis_up
            assert _fallbacks() - before == 5
            warnings = [e for e in logs if e["event"].startswith("redis unreachable")]
            assert len(warnings) == 1 and warnings[0]["log_level"] == "warning"
            assert REGISTRY.get_sample_value("mlxgw_ratelimit_redis_up") == 0

            server.start()  # same port, empty (no persistence)
            back = await limiter.acquire("v", 3)
            assert limiter.redis_up
            assert (back.allowed, back.remaining) == (True, 2)  # counted in Redis again
            assert _fallbacks() - before == 5
            assert REGISTRY.get_sample_value("mlxgw_ratelimit_redis_up") == 1
        finally:
            await limiter.aclose()


async def test_unreachable_redis_from_the_start_still_limits(clock: FakeClock) -> None:
    server = RedisServer()  # never started: nothing listens on the port
    limiter = FallbackLimiter(RedisLimiter.from_url(server.url, clock), InProcessLimiter(clock))
    try:
        results = [await limiter.acquire("x", 2) for _ in range(3)]
        assert [r.allowed for r in results] == [True, True, False]
    finally:
        await limiter.aclose()


# --- through the middleware ------------------------------------------------------------------

async def _chat(request: Request) -> JSONResponse:
    await request.state.limits.charge_tokens(30)
    return JSONResponse({"ok": True})


async def _ok(request: Request) -> JSONResponse:
    return JSONResponse({"ok": True})


def limited_app(limiter: Limiter, settings: Settings, keys: KeyStore | None = None,
                breaker: CircuitBreaker | None = None) -> Any:
    inner = Starlette(routes=[
        Route("/v1/chat/completions", _chat, methods=["POST"]),
        Route("/v1/messages", _chat, methods=["POST"]),
        Route("/v1/models", _ok), Route("/health", _ok),
    ])
    app = RateLimitMiddleware(inner, limiter=limiter, settings=settings, breaker=breaker)
    return AuthMiddleware(app, keys=keys, settings=settings)


def http_client(app: Any, peer: str = "127.0.0.1") -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, client=(peer, 50000))
    return httpx.AsyncClient(transport=transport, base_url="http://testserver")


def _headers(response: httpx.Response, kind: str) -> tuple[str | None, ...]:
    return tuple(response.headers.get(f"x-ratelimit-{part}-{kind}")
                 for part in ("limit", "remaining", "reset"))


async def test_per_ip_limit_headers_and_429(limiter: Limiter, clock: FakeClock,
                                            tmp_path: Path) -> None:
    settings = Settings(config_dir=tmp_path, auth={"enabled": False},
                        limits={"per_ip_rpm": 2, "per_key_tpm": 50})
    async with http_client(limited_app(limiter, settings)) as http:
        first = await http.get("/v1/models")
        assert first.status_code == 200
        assert _headers(first, "requests") == ("2", "1", "60s")
        assert _headers(first, "tokens") == ("50", "50", "0s")
        clock.advance(15)
        second = await http.post("/v1/chat/completions", json={})
        assert second.status_code == 200
        assert _headers(second, "requests") == ("2", "0", "45s")
        assert _headers(second, "tokens") == ("50", "50", "0s")  # charged after the headers
        clock.advance(5)
        third = await http.post("/v1/messages", json={})
        assert third.status_code == 429
        assert third.json() == {"type": "error", "error": {
            "type": "rate_limit_error", "message": third.json()["error"]["message"]}}
        assert third.headers["retry-after"] == "40"
        assert _headers(third, "requests") == ("2", "0", "40s")
        openai_shape = await http.get("/v1/models")
        assert openai_shape.status_code == 429
        assert openai_shape.json()["error"]["code"] == "rate_limit_exceeded"
        assert openai_shape.json()["error"]["type"] == "rate_limit_error"
        health = await http.get("/health")  # not a limited route
        assert health.status_code == 200 and "x-ratelimit-limit-requests" not in health.headers


async def test_tokens_per_minute_refuses_once_spent(limiter: Limiter, clock: FakeClock,
                                                    tmp_path: Path) -> None:
    settings = Settings(config_dir=tmp_path, auth={"enabled": False},
                        limits={"per_ip_rpm": 100, "per_key_tpm": 50})
    async with http_client(limited_app(limiter, settings)) as http:
        one = await http.post("/v1/chat/completions", json={})  # charges 30
        two = await http.post("/v1/chat/completions", json={})  # 30 < 50: allowed, charges 30
        assert (one.status_code, two.status_code) == (200, 200)
        assert _headers(two, "tokens") == ("50", "20", "60s")
        clock.advance(10)
        three = await http.post("/v1/chat/completions", json={})
        assert three.status_code == 429
        assert "tokens" in three.json()["error"]["message"]
        assert three.headers["retry-after"] == "50"
        assert _headers(three, "tokens") == ("50", "0", "50s")
        assert _headers(three, "requests") == ("100", "97", "50s")  # oldest from t=0


async def test_per_key_limits_and_overrides(limiter: Limiter, tmp_path: Path) -> None:
    settings = Settings(config_dir=tmp_path, limits={"per_key_rpm": 3, "per_ip_rpm": 1})
    store = KeyStore(settings.keys_file)
    tight = store.create("tight", rpm=1)[1]
    normal = store.create("normal")[1]
    async with http_client(limited_app(limiter, settings, store)) as http:
        t1 = await http.get("/v1/models", headers={"x-api-key": tight})
        t2 = await http.get("/v1/models", headers={"x-api-key": tight})
        assert (t1.status_code, t2.status_code) == (200, 429)
        n = [await http.get("/v1/models", headers={"Authorization": f"Bearer {normal}"})
             for _ in range(4)]
        assert [r.status_code for r in n] == [200, 200, 200, 429]
        assert [r.headers["x-ratelimit-remaining-requests"] for r in n] == ["2", "1", "0", "0"]
        assert n[0].headers["x-ratelimit-limit-requests"] == "3"
        # a refused key is a 401 before any limit is counted
        assert (await http.get("/v1/models", headers={"x-api-key": "bad"})).status_code == 401


async def test_a_public_key_limits_each_visitor_and_all_of_them(limiter: Limiter,
                                                                tmp_path: Path) -> None:
    settings = Settings(config_dir=tmp_path, limits={"per_ip_rpm": 100})
    store = KeyStore(settings.keys_file)
    widget = store.create("widget", rpm=5, visitor_rpm=2)[1]
    app = limited_app(limiter, settings, store)

    async def calls(peer: str, n: int) -> list[httpx.Response]:
        async with http_client(app, peer=peer) as http:
            return [await http.get("/v1/models", headers={"x-api-key": widget})
                    for _ in range(n)]

    first = await calls("198.51.100.1", 3)
    assert [r.status_code for r in first] == [200, 200, 429]
    assert "from this address (2)" in first[2].json()["error"]["message"]
    # The visitor's budget is the tighter one, so it is what the headers show.
    assert [_headers(r, "requests")[:2] for r in first] == [("2", "1"), ("2", "0"), ("2", "0")]
    second = await calls("198.51.100.2", 3)  # another visitor has a budget of their own
    assert [r.status_code for r in second] == [200, 200, 429]
    # The refused calls spent none of the key's 5: four used, one left for a third visitor.
    third = await calls("198.51.100.3", 2)
    assert [r.status_code for r in third] == [200, 429]
    assert "from this address" not in third[1].json()["error"]["message"]
    assert _headers(third[1], "requests")[:2] == ("5", "0")


async def test_spoofed_forwarded_for_from_untrusted_peer(limiter: Limiter,
                                                         tmp_path: Path) -> None:
    # Auth off serves loopback clients only, so the visitors here are other loopback addresses.
    settings = Settings(config_dir=tmp_path, auth={"enabled": False}, limits={"per_ip_rpm": 2},
                        server={"trusted_proxies": ["127.0.0.1"]})
    app = limited_app(limiter, settings)
    async with http_client(app, peer="127.0.0.9") as http:  # not a trusted proxy
        codes = [(await http.get("/v1/models", headers={"X-Forwarded-For": f"127.9.9.{i}"}))
                 .status_code for i in range(4)]
    assert codes == [200, 200, 429, 429]  # all counted against the real peer
    async with http_client(app, peer="127.0.0.1") as http:  # trusted proxy (Caddy)
        codes = [(await http.get("/v1/models", headers={"X-Forwarded-For": f"127.8.8.{i}"}))
                 .status_code for i in range(4)]
    assert codes == [200] * 4  # four different clients behind the proxy


async def test_global_limit_shared_by_two_gateways(redis_server: RedisServer, clock: FakeClock,
                                                   tmp_path: Path) -> None:
    settings = Settings(config_dir=tmp_path, auth={"enabled": False},
                        limits={"per_ip_rpm": 100, "global_rpm": 3})
    limiters = [RedisLimiter.from_url(redis_server.url, clock, timeout=5) for _ in range(2)]
    await limiters[0].client.flushdb()
    apps = [limited_app(lim, settings, breaker=CircuitBreaker(
        lim, global_rpm=3, failures=5, cooldown=30)) for lim in limiters]
    try:
        codes = []
        for i in range(5):
            async with http_client(apps[i % 2], peer=f"127.0.2.{i}") as http:
                codes.append((await http.get("/v1/models")).status_code)
        assert codes == [200, 200, 200, 429, 429]
    finally:
        for lim in limiters:
            await lim.aclose()


async def test_fallback_settles_each_reservation_where_it_was_made(
        redis_server: RedisServer, clock: FakeClock) -> None:
    limiter = FallbackLimiter(RedisLimiter.from_url(redis_server.url, clock, timeout=5),
                              InProcessLimiter(clock), timeout=5, probe_interval=3600)
    try:
        await limiter.primary.client.flushdb()
        in_redis = await limiter.acquire("f", 100, cost=90)
        assert limiter.redis_up and in_redis.entry
        await limiter.adjust("f", in_redis.entry, 10)
        assert (await limiter.acquire("f", 100, mode="peek")).remaining == 90
        redis_server.stop()
        local = await limiter.acquire("g", 100, cost=90)  # Redis down: in-process entry
        assert not limiter.redis_up and local.entry and local.entry.startswith("local:")
        await limiter.adjust("g", local.entry, 10)
        assert limiter.local.acquire_now("g", 100, mode="peek").remaining == 90
        await limiter.adjust("f", in_redis.entry, 0)  # unreachable: kept, never an error
    finally:
        redis_server.start()
        await limiter.aclose()


async def test_hung_redis_times_out_into_the_fallback(clock: FakeClock) -> None:
    """A Redis that accepts connections but never answers (a wedged server, a black-holed
    network) must cost a bounded timeout, then fall back, not hang the request."""
    import socket

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)  # the kernel completes handshakes; nobody ever replies
        port = listener.getsockname()[1]
        limiter = FallbackLimiter(
            RedisLimiter.from_url(f"redis://127.0.0.1:{port}/0", clock), InProcessLimiter(clock),
            probe_interval=3600)
        try:
            first = await limiter.acquire("h", 1)
            second = await limiter.acquire("h", 1)  # no new probe: straight to in-process
            assert (first.allowed, second.allowed) == (True, False)
            assert not limiter.redis_up
        finally:
            await limiter.aclose()


def test_ipv6_clients_share_their_64() -> None:
    from app.http.limits import ip_bucket

    assert ip_bucket("2001:db8:1:2:aaaa::1") == ip_bucket("2001:db8:1:2:ffff::9")
    assert ip_bucket("2001:db8:1:2::1") != ip_bucket("2001:db8:1:3::1")
    assert ip_bucket("192.0.2.1") == "192.0.2.1"
    assert ip_bucket("unknown") == "unknown"


async def test_limit_headers_on_streaming_responses(tmp_path: Path, clock: FakeClock) -> None:
    from starlette.responses import StreamingResponse

    async def stream(request: Request) -> StreamingResponse:
        async def chunks() -> AsyncIterator[bytes]:
            yield b"data: 1\n\n"
            await request.state.limits.charge_tokens(12)
            yield b"data: [DONE]\n\n"
        return StreamingResponse(chunks(), media_type="text/event-stream")

    limiter = InProcessLimiter(clock)
    settings = Settings(config_dir=tmp_path, auth={"enabled": False},
                        limits={"per_ip_rpm": 5, "per_key_tpm": 20})
    inner = Starlette(routes=[Route("/v1/chat/completions", stream, methods=["POST"])])
    app = AuthMiddleware(RateLimitMiddleware(inner, limiter=limiter, settings=settings),
                         keys=None, settings=settings)
    async with http_client(app) as http:
        first = await http.post("/v1/chat/completions")
        assert first.text == "data: 1\n\ndata: [DONE]\n\n"
        assert _headers(first, "requests") == ("5", "4", "60s")
        second = await http.post("/v1/chat/completions")
        assert _headers(second, "tokens") == ("20", "8", "60s")  # first stream's 12 charged


async def test_tokens_are_reserved_at_admission_and_refunded_at_the_end(
        limiter: Limiter, clock: FakeClock, tmp_path: Path) -> None:
    """The old check admitted at cost 1 and charged afterwards: one token left was enough to
    start any number of long generations."""
    from app.errors import RateLimited
    from app.http.limits import RequestLimits

    async def generate(request: Request) -> JSONResponse:
        limits: RequestLimits = request.state.limits
        body = await request.json()
        try:
            await limits.reserve(body["prompt"] + body["max_tokens"])  # what the engine does
        except RateLimited as error:
            return JSONResponse(error.body("openai"), status_code=429,
                                headers=error.response_headers())
        if body.get("finish", True):
            await limits.charge_tokens(body["prompt"] + body["used"])
        return JSONResponse({"reserved": limits.reserved})

    settings = Settings(config_dir=tmp_path, auth={"enabled": False},
                        limits={"per_ip_rpm": 0, "per_key_tpm": 100})
    inner = Starlette(routes=[Route("/v1/chat/completions", generate, methods=["POST"])])
    app = AuthMiddleware(RateLimitMiddleware(inner, limiter=limiter, settings=settings),
                         keys=None, settings=settings)
    async with http_client(app) as http:
        async def post(**body: Any) -> httpx.Response:
            return await http.post("/v1/chat/completions", json=body)

        whole = await post(prompt=10, max_tokens=200, used=0)
        assert whole.status_code == 429 and "more than the whole budget" in \
            whole.json()["error"]["message"]
        # A running generation holds its reservation: a second one that would not fit waits.
        running = await post(prompt=10, max_tokens=60, used=0, finish=False)
        assert running.status_code == 200
        second = await post(prompt=10, max_tokens=40, used=0)
        assert second.status_code == 429 and second.headers["retry-after"] == "60"
        assert "30 are left" in second.json()["error"]["message"]
        # One that ends early gives back what it did not use.
        short = await post(prompt=10, max_tokens=20, used=2)
        assert short.status_code == 200
        after = await post(prompt=1, max_tokens=1, used=0, finish=False)
        assert after.headers["x-ratelimit-remaining-tokens"] == "18"  # 100 - 70 - 12


# --- two real gateway processes on one Redis ---------------------------------------------------

def gateway_factory() -> Any:
    """`uvicorn --factory tests.unit.test_limits:gateway_factory`, configured by MLXGW_ env."""
    from app.limits.factory import build_limiter
    from app.settings import load_settings

    settings = load_settings()
    limiter = build_limiter(settings)
    breaker = CircuitBreaker(limiter, global_rpm=settings.limits.global_rpm,
                             failures=settings.limits.breaker_failures,
                             cooldown=settings.limits.breaker_cooldown)
    return limited_app(limiter, settings, breaker=breaker)


def _start_gateway(redis_url: str, tmp_path: Path) -> tuple[Any, str]:
    import os
    import subprocess
    import sys
    import time as _time

    from tests.redis_server import free_port

    port = free_port()
    env = {**os.environ, "MLXGW_REDIS__URL": redis_url, "MLXGW_AUTH__ENABLED": "false",
           "MLXGW_LIMITS__GLOBAL_RPM": "3", "MLXGW_LIMITS__PER_IP_RPM": "100",
           "MLXGW_CONFIG_DIR": str(tmp_path)}
    process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "--factory", "tests.unit.test_limits:gateway_factory",
         "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning",
         "--no-proxy-headers"],
        env=env, cwd=Path(__file__).resolve().parents[2])
    url = f"http://127.0.0.1:{port}"
    deadline = _time.monotonic() + 30
    while _time.monotonic() < deadline:
        try:
            httpx.get(f"{url}/health", timeout=1)
            return process, url
        except httpx.TransportError:
            if process.poll() is not None:
                break
            _time.sleep(0.1)
    process.kill()
    raise RuntimeError("gateway process did not start")


@pytest.mark.e2e
async def test_global_limit_across_two_processes_and_redis_outage(tmp_path: Path) -> None:
    import asyncio

    with RedisServer() as server:
        gateways = [_start_gateway(server.url, tmp_path) for _ in range(2)]
        try:
            urls = [url for _, url in gateways]
            async with httpx.AsyncClient(timeout=10) as http:
                codes = [(await http.get(f"{urls[i % 2]}/v1/models")).status_code
                         for i in range(5)]
                assert codes == [200, 200, 200, 429, 429]  # one budget for both processes

                server.stop()  # each process falls back to its own in-process count
                down = [(await http.get(f"{urls[i % 2]}/v1/models")).status_code
                        for i in range(8)]
                assert all(code in (200, 429) for code in down), down  # never a 5xx
                assert down.count(200) == 6  # 3 per process: limited, not unlimited

                server.start()  # empty Redis again: one shared budget of 3
                await asyncio.sleep(1.2)  # each process re-probes Redis once per second
                back = [(await http.get(f"{urls[i % 2]}/v1/models")).status_code
                        for i in range(5)]
                assert back == [200, 200, 200, 429, 429]
        finally:
            for process, _ in gateways:
                process.terminate()
                process.wait(timeout=10)
