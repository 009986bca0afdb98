"""Helpers for the pure ASGI middleware: headers, per-request state, errors in the caller's
protocol."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from app.activity import note_refusal
from app.errors import GatewayError, protocol_for_path

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def header(scope: Scope, name: bytes) -> str | None:
    """First value of a request header (name in lower case), or None."""
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return bytes(value).decode("latin-1")
    return None


def state(scope: Scope) -> dict[str, Any]:
    """The per-request state dict Starlette exposes as `request.state`."""
    value: dict[str, Any] = scope.setdefault("state", {})
    return value


async def send_error(
    scope: Scope, send: Send, error: GatewayError, extra_headers: dict[str, str] | None = None
) -> None:
    note_refusal(state(scope), error)
    body = json.dumps(error.body(protocol_for_path(scope.get("path", "")))).encode()
    headers = {**(extra_headers or {}), **error.response_headers()}
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": error.status, "headers": raw})
    await send({"type": "http.response.body", "body": body})
