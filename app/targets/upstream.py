"""One upstream server: a pooled httpx client, its key, health, breaker and in-flight cap.

`open()` sends a request and returns the upstream's answer once its status is known to be
worth relaying (2xx, or a 4xx that is the client's own fault); everything else raises
`Unavailable` with the reason the chain falls through for. The key is sent as a header and
kept only in the client's default headers: it is never logged, never put in an error message.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from dataclasses import dataclass

import httpx
import structlog

from app import metrics
from app.errors import GatewayError
from app.limits.breaker import BreakerState, CircuitBreaker
from app.limits.window import Limiter
from app.settings import ConfigError
from app.targets.config import UpstreamEntry

log = structlog.get_logger(__name__)

# Request headers a client may send that mean something to the upstream's answer; nothing
# else is forwarded (never the caller's Authorization / x-api-key).
FORWARDED_HEADERS = ("anthropic-version", "anthropic-beta", "openai-beta")


class Unavailable(Exception):
    """This target cannot answer now; the chain goes on to the next one."""

    def __init__(self, reason: str, detail: str, retry_after: float | None = None) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
        self.retry_after = retry_after


@dataclass
class Health:
    up: bool | None = None  # None: not checked yet
    checked_at: float | None = None
    detail: str = ""


class Upstream:
    def __init__(self, entry: UpstreamEntry, limiter: Limiter) -> None:
        self.entry = entry
        self.id = entry.id
        key = None
        if entry.api_key_env is not None:
            key = os.environ.get(entry.api_key_env)
            if not key:
                raise ConfigError(
                    f"config error: upstreams[{entry.id}].api_key_env: the environment "
                    f"variable {entry.api_key_env} is not set (or empty)")
        self._has_key = key is not None
        headers = {"user-agent": "mlx-gateway", "accept-encoding": "identity"}
        if key is not None:
            # Both spellings: OpenAI-style servers read Authorization, Anthropic x-api-key.
            headers |= {"authorization": f"Bearer {key}", "x-api-key": key}
        self.client = httpx.AsyncClient(
            base_url=entry.base_url + "/", headers=headers,
            timeout=httpx.Timeout(entry.timeout, connect=entry.connect_timeout),
            limits=httpx.Limits(max_connections=entry.max_inflight + 2,
                                max_keepalive_connections=entry.max_inflight),
            follow_redirects=False, trust_env=False)
        gauge = metrics.UPSTREAM_BREAKER_STATE.labels(entry.id)
        self.breaker = CircuitBreaker(limiter, global_rpm=0, failures=entry.breaker_failures,
                                      cooldown=entry.breaker_cooldown,
                                      name=f"upstream:{entry.id}", publish=gauge.set)
        self.inflight = 0
        self.health = Health()
        self.discovered: list[str] = []
        self._inflight_gauge = metrics.UPSTREAM_INFLIGHT.labels(entry.id)
        self._health_task: asyncio.Task[None] | None = None

    # --- models ----------------------------------------------------------------------------

    def models(self) -> list[str]:
        """The ids it serves: configured, or the last list its /v1/models gave."""
        return list(self.entry.models) if self.entry.models != "*" else list(self.discovered)

    def serves(self, model: str) -> bool:
        return self.entry.models == "*" or model in self.entry.models

    # --- health ----------------------------------------------------------------------------

    async def start(self) -> None:
        if self.entry.health_interval > 0 or self.entry.models == "*":
            self._health_task = asyncio.create_task(self._health_loop())

    async def aclose(self) -> None:
        if self._health_task is not None:
            self._health_task.cancel()
            with contextlib.suppress(BaseException):
                await self._health_task
        await self.client.aclose()

    async def _health_loop(self) -> None:
        while True:
            await self.check_health()
            if self.entry.health_interval <= 0:
                return  # only the one discovery at start
            await asyncio.sleep(self.entry.health_interval)

    async def check_health(self) -> Health:
        """GET /v1/models: up or not; with models = '*' the ids it lists are remembered.
        A failed check counts toward the breaker, so a dead upstream is skipped at once."""
        try:
            response = await self.client.get("models")
            if response.status_code != 200:
                raise ValueError(f"GET /models answered {response.status_code}")
            data = response.json().get("data", [])
            ids = [str(m["id"]) for m in data if isinstance(m, dict) and "id" in m]
        except (httpx.HTTPError, ValueError, AttributeError) as error:
            detail = _describe(error)
            if self.health.up is not False:
                log.warning("upstream health check failed", upstream=self.id, error=detail)
            self.health = Health(False, time.time(), detail)
            self.breaker.record_failure()
        else:
            if self.health.up is False:
                log.info("upstream healthy again", upstream=self.id)
            self.health = Health(True, time.time(), f"{len(ids)} models")
            self.discovered = ids
            if self.breaker.state is not BreakerState.CLOSED:
                self.breaker.record_success()
        metrics.UPSTREAM_UP.labels(self.id).set(1 if self.health.up else 0)
        return self.health

    # --- requests --------------------------------------------------------------------------

    def admit(self) -> None:
        """Take an in-flight slot and the breaker's word, or raise Unavailable."""
        if self.inflight >= self.entry.max_inflight:
            raise Unavailable("overloaded", f"{self.entry.max_inflight} requests already open")
        try:
            self.breaker.allow()
        except GatewayError as error:
            raise Unavailable("breaker_open", "its breaker is open after repeated failures",
                              error.retry_after) from None
        self.inflight += 1
        self._inflight_gauge.set(self.inflight)

    def done(self, outcome: str) -> None:
        """Give the slot back; `outcome` is success, failure or neutral (for the breaker)."""
        self.inflight -= 1
        self._inflight_gauge.set(self.inflight)
        if outcome == "success":
            self.breaker.record_success()
        elif outcome == "failure":
            self.breaker.record_failure()
        else:
            self.breaker.abandon()

    async def open(self, path: str, body: bytes, headers: dict[str, str]) -> httpx.Response:
        """POST `path` (relative to base_url); the answer with its body still unread. Statuses
        another target may do better on (5xx, 429, 401/403 for our key) and transport
        failures raise Unavailable."""
        request = self.client.build_request(
            "POST", path, content=body,
            headers={"content-type": "application/json", **headers})
        try:
            response = await self.client.send(request, stream=True)
        except httpx.TimeoutException as error:
            raise Unavailable("timeout", _describe(error)) from None
        except httpx.HTTPError as error:
            raise Unavailable("unreachable", _describe(error)) from None
        status = response.status_code
        if status >= 500 or status in (401, 403, 429):
            retry_after = _retry_after(response)
            await response.aclose()
            # 401/403: the upstream refused *our* key (the operator's to fix), never the
            # client's fault, and never relayed (the client would think its own key bad).
            reason = {429: "429", 401: "auth", 403: "auth"}.get(status, "5xx")
            raise Unavailable(reason, f"answered {status}", retry_after)
        return response


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _describe(error: BaseException) -> str:
    """What went wrong, without anything a request carried (URLs with queries, headers)."""
    if isinstance(error, httpx.TimeoutException):
        return f"timed out ({type(error).__name__})"
    if isinstance(error, httpx.HTTPError):
        return f"{type(error).__name__}: {str(error)[:200]}"
    return str(error)[:200]
