"""Edge middleware as pure ASGI classes (BaseHTTPMiddleware breaks contextvars and streaming)."""

from __future__ import annotations

import re
import secrets
import time
from typing import Any

import structlog
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app import metrics
from app.activity import Activity, note_refusal
from app.api.errors import error_response
from app.errors import PayloadTooLarge
from app.http.asgi import header

log = structlog.get_logger("mlx_gateway.access")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class RequestContextMiddleware:
    """Request id (from or echoed as X-Request-ID), one access log line, request metrics."""

    def __init__(self, app: ASGIApp, *, activity: Activity | None = None) -> None:
        self.app = app
        self.activity = activity

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        given = header(scope, b"x-request-id")
        request_id = given if given and _REQUEST_ID.match(given) else secrets.token_hex(8)
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        state.setdefault("log_fields", {})
        structlog.contextvars.bind_contextvars(request_id=request_id)
        status = [500]

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message.setdefault("headers", [])
                extra = state.get("response_headers") or {}  # set by a route (e.g. packing)
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode()),
                                      *((k.encode(), v.encode()) for k, v in extra.items())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            duration = time.monotonic() - started
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            metrics.REQUESTS.labels(route, str(status[0])).inc()
            metrics.REQUEST_DURATION.labels(route).observe(duration)
            fields: dict[str, Any] = state.get("log_fields", {})
            principal = state.get("principal")
            if self.activity is not None:
                reason, message = state.get("refusal") or (None, "")
                self.activity.record(
                    scope["path"], status[0], reason=reason, message=message,
                    key_name=principal.name if getattr(principal, "key_id", None) else None,
                    client_ip=getattr(principal, "client_ip", None))
            refusal = state.get("refusal")
            if refusal:  # its code only: messages may quote what the client sent
                fields = {**fields, "error": refusal[0]}
            log.info(
                "request", method=scope["method"], path=scope["path"], status=status[0],
                duration_ms=round(duration * 1000, 1),
                key_id=getattr(principal, "key_id", None),
                client_ip=getattr(principal, "client_ip", None), **fields,
            )
            structlog.contextvars.unbind_contextvars("request_id")


class BodySizeLimitMiddleware:
    """413 before the route runs: on Content-Length at once, and for chunked bodies by reading
    the body here first (at most `max_bytes` held), then replaying it to the app.

    Raising from inside `receive` is not enough: FastAPI's body parser turns any exception
    there into a 400 "error parsing the body".
    """

    def __init__(self, app: ASGIApp, *, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = PayloadTooLarge(
            f"The request body is larger than this server accepts ({self.max_bytes} bytes)."
        )
        declared = header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            note_refusal(scope.setdefault("state", {}), too_large)
            await error_response(too_large, scope["path"])(scope, receive, send)
            return
        buffered: list[Message] = []
        seen = 0
        while True:
            message = await receive()
            buffered.append(message)
            if message["type"] != "http.request":
                break  # the client left; the app will see the disconnect
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                await error_response(too_large, scope["path"])(scope, _closed, send)
                return
            if not message.get("more_body", False):
                break
        body = b"".join(m.get("body", b"") for m in buffered if m["type"] == "http.request")
        replay: list[Message] = [{"type": "http.request", "body": body, "more_body": False}]
        replay += [m for m in buffered if m["type"] != "http.request"]

        async def replaying_receive() -> Message:
            return replay.pop(0) if replay else await receive()

        await self.app(scope, replaying_receive, send)


async def _closed() -> Message:
    return {"type": "http.disconnect"}
