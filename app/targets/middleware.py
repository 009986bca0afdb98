"""The chain walk, as the innermost ASGI middleware (after auth and rate limits).

A generation request whose `model` is a route or 'UPSTREAM:MODEL' tries its targets in order:
a local target runs the request through the local API stack with `model` set to the local id;
an upstream target forwards the body (with its own model id) and relays the answer. The next
target is tried only while nothing has gone to the client yet, and only for what another
target may do better on: overloaded (admission full, in-flight cap), a model that fails to
load, unreachable, timeout, 5xx, 429, an open breaker, no /v1/messages there. A 4xx that is
the client's fault goes back as it is; a stream that breaks after its first byte ends with an
error event in the caller's protocol, never a second answer.

Every other request passes through untouched. The local stack is the one the API rooms build,
so this module sits between app/http and app/api.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Awaitable
from typing import Any, TypeVar

import structlog

from app import metrics
from app.api.anthropic.schema import resolve_model
from app.api.common import until_disconnected
from app.errors import ClientDisconnected, GatewayError, InvalidRequest, PermissionDenied
from app.http.asgi import ASGIApp, Message, Receive, Scope, Send, send_error, state
from app.limits.breaker import BreakerState, CircuitBreaker
from app.security.auth import may_use
from app.settings import Settings
from app.targets.forward import SERVED_BY, Forward
from app.targets.resolve import Target, Targets
from app.targets.upstream import Unavailable

log = structlog.get_logger(__name__)
T = TypeVar("T")

# Path -> the upstream path relative to its base URL (which ends in /v1).
PATHS = {"/v1/chat/completions": "chat/completions", "/v1/completions": "completions",
         "/v1/responses": "responses", "/v1/messages": "messages"}
COUNT_TOKENS = "/v1/messages/count_tokens"
# A local 5xx with these codes (from the error handler's note in the request state).
_LOAD_FAILED = {"model_load_failed", "insufficient_memory"}
_CAPACITY = {"overloaded", "429", "breaker_open"}


class NoTargetAvailable(GatewayError):
    """Every target of a chain was passed over; the client gets one error naming why."""

    status = 502
    openai_type = "server_error"
    anthropic_type = "api_error"
    default_code = "no_target_available"


class _ClientGone(Exception):
    pass



class TargetMiddleware:
    def __init__(self, app: ASGIApp, *, targets: Targets, settings: Settings,
                 breaker: CircuitBreaker | None = None) -> None:
        self.app = app
        self.targets = targets
        self.settings = settings
        self.breaker = breaker  # the local engine's: tells breaker_open from overloaded

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        kind = "count" if path == COUNT_TOKENS else PATHS.get(path)
        if kind is None or scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        body = await _read_body(receive)
        payload = _json_object(body)
        name = payload.get("model") if payload is not None else None
        if isinstance(name, str) and kind in ("messages", "count"):
            name = resolve_model(name, self.settings.anthropic.models,
                                 self.targets.registry.default_id)
        chain = self.targets.resolve(name) if isinstance(name, str) else None
        if chain is None or payload is None or not isinstance(name, str):
            await self.app(scope, _replay(body, receive), send)
            return
        principal = state(scope).get("principal")
        if not may_use(principal, name):
            await send_error(scope, send, PermissionDenied(
                f"This key may not use model '{name}'.", param="model"))
            return
        if kind == "count":
            await self._count_tokens(scope, receive, send, payload, name, chain)
            return
        walk = _Walk(self, scope, receive, send, kind, payload, name, chain)
        with contextlib.suppress(_ClientGone):
            await walk.run()

    async def _count_tokens(self, scope: Scope, receive: Receive, send: Send,
                            payload: dict[str, Any], name: str, chain: list[Target]) -> None:
        """Counted with the first local model of the chain: the tokenizer is here, and
        upstreams have no count route in the OpenAI wire."""
        local = next((t for t in chain if t.upstream is None), None)
        if local is None:
            await send_error(scope, send, InvalidRequest(
                f"'{name}' has no local model to count tokens with.", param="model"))
            return
        body = json.dumps({**payload, "model": local.model}).encode()
        state(scope)["granted_model"] = local.model
        try:
            await self.app({**scope, "headers": _content_length(scope["headers"], len(body))},
                           _replay(body, receive), send)
        finally:
            state(scope).pop("granted_model", None)


class _Walk:
    """One request going down its chain."""

    def __init__(self, owner: TargetMiddleware, scope: Scope, receive: Receive, send: Send,
                 kind: str, payload: dict[str, Any], name: str, chain: list[Target]) -> None:
        self.owner = owner
        self.scope = scope
        self.receive = receive
        self.send = send
        self.kind = kind
        self.payload = payload
        self.name = name
        self.chain = chain
        self.state = state(scope)
        self.state.setdefault("log_fields", {})["route"] = name

    async def run(self) -> None:
        passed: list[tuple[Target, Unavailable]] = []
        for index, target in enumerate(self.chain):
            last = index == len(self.chain) - 1
            if target.upstream is None:
                unavailable = await self._local(target, last)
            else:
                forward = Forward(self.scope, self.send, self.kind, self.payload,
                                  self.owner.settings.server.send_timeout)
                unavailable = await self._watched(forward.attempt(target))
            if unavailable is None:
                metrics.TARGET_REQUESTS.labels(target.name, "served").inc()
                return
            metrics.TARGET_REQUESTS.labels(target.name, "failed" if last else "fallback").inc()
            metrics.TARGET_FALLBACKS.labels(target.name, unavailable.reason).inc()
            log.info("target passed over", route=self.name, target=target.name,
                     reason=unavailable.reason, detail=unavailable.detail)
            passed.append((target, unavailable))
        await send_error(self.scope, self.send, self._all_failed(passed))

    def _all_failed(self, passed: list[tuple[Target, Unavailable]]) -> GatewayError:
        summary = "; ".join(f"{target.name}: {why.reason}" for target, why in passed)
        error = NoTargetAvailable(f"No target of '{self.name}' could answer ({summary}).",
                                  param="model")
        if all(why.reason in _CAPACITY for _, why in passed):
            error.status = 503  # type: ignore[misc]  # busy, not broken: worth a retry
            hints = [why.retry_after for _, why in passed if why.retry_after]
            error.retry_after = min(hints) if hints else 1.0
        return error

    # --- the local engine ------------------------------------------------------------------

    async def _local(self, target: Target, last: bool) -> Unavailable | None:
        """Through the local API stack; a 5xx held back (not sent) unless this is the last
        target. Only 5xx: a local 429 is the caller's own budget, which no fallback should
        get around."""
        body = json.dumps({**self.payload, "model": target.model}).encode()
        scope = {**self.scope, "headers": _content_length(self.scope["headers"], len(body))}
        held: list[Message] = []
        started = time.monotonic()

        async def intercept(message: Message) -> None:
            if held or (message["type"] == "http.response.start" and not last
                        and message["status"] >= 500):
                held.append(message)
                return
            if message["type"] == "http.response.start":
                metrics.TARGET_LATENCY.labels(target.name).observe(time.monotonic() - started)
                self.state["log_fields"]["served_by"] = target.name
                message = {**message, "headers": [*message.get("headers", ()),
                                                  (SERVED_BY.encode(), target.name.encode())]}
            await self.send(message)

        # The key may use the route; that covers the local models of its chain.
        self.state["granted_model"] = target.model
        if not last:  # a busy engine passes the request on rather than queueing it
            self.state["queue_wait"] = self.owner.targets.queue_wait.get(self.name, 0.0)
        self.state.pop("refusal", None)
        sent = [False]

        async def tracked(message: Message) -> None:
            await intercept(message)
            sent[0] = sent[0] or not held

        try:
            await self.owner.app(scope, _replay(body, self.receive), tracked)
        except Exception as error:
            if sent[0] or last:
                raise  # the client has part of an answer, or nobody is left to ask
            log.exception("local target raised", target=target.name)
            return Unavailable("5xx", f"raised {type(error).__name__}")
        finally:
            self.state.pop("granted_model", None)
            self.state.pop("queue_wait", None)
            if "route" in scope:  # the access log's route label
                self.scope["route"] = scope["route"]
        if not held:
            return None
        # Read, then forgotten: the request goes on, and the console should not list it as
        # refused when the next target serves it.
        code = str((self.state.pop("refusal", None) or ("",))[0])
        status = held[0]["status"]
        if code in _LOAD_FAILED or status == 507:
            reason = "load_failed"
        elif code == "overloaded":
            breaker = self.owner.breaker
            reason = ("breaker_open" if breaker is not None
                      and breaker.state is not BreakerState.CLOSED else "overloaded")
        else:
            reason = "5xx"
        retry = dict(held[0].get("headers", ())).get(b"retry-after")
        return Unavailable(reason, f"answered {status} ({code or 'no code'})",
                           float(retry) if retry and retry.isdigit() else None)

    # --- an upstream -----------------------------------------------------------------------

    async def _watched(self, work: Awaitable[T]) -> T:
        """Run `work`, cancelling it (and so the upstream request) if the client leaves."""
        try:
            return await until_disconnected(self.receive, work)
        except ClientDisconnected:
            self.state["log_fields"]["cancelled"] = True
            raise _ClientGone from None

async def _read_body(receive: Receive) -> bytes:
    parts: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        parts.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return b"".join(parts)


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replaying() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replaying


def _json_object(body: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):
        return None  # the route answers with its own 400
    return value if isinstance(value, dict) else None


def _content_length(headers: Any, length: int) -> list[tuple[bytes, bytes]]:
    kept = [(k, v) for k, v in headers if k.lower() != b"content-length"]
    return [*kept, (b"content-length", str(length).encode())]

