"""Deny-by-default authentication as a pure ASGI middleware.

The decision uses only the raw ASGI `scope["path"]` (never a URL rebuilt from the Host
header) and the method, so Host tricks and query strings cannot open a route.
"""

from __future__ import annotations

import structlog

from app import metrics
from app.errors import AuthenticationFailed, PermissionDenied
from app.http.asgi import (
    ASGIApp,
    Receive,
    Scope,
    Send,
    header,
    send_error,
    state,
)
from app.security.client_ip import client_ip, is_loopback, parse_networks
from app.security.keys import KeyRecord, KeyStore
from app.security.principal import Principal
from app.settings import Settings

log = structlog.get_logger(__name__)

OPEN_PATHS = frozenset({"/", "/health", "/ready", "/console"})
# The console's pages and scripts hold no secret; their data needs the admin key.
OPEN_PREFIXES = ("/console/",)
# One message for missing, malformed, unknown and revoked keys: say nothing about which.
AUTH_MESSAGE = "Missing or invalid API key. Send it as 'Authorization: Bearer KEY' or 'x-api-key'."
LOOPBACK_ONLY_MESSAGE = (
    "Authentication is off on this server ([auth] enabled = false), so only clients on the "
    "same machine may use it. Ask its operator to turn authentication on and give you a key."
)


def presented_keys(scope: Scope) -> list[str]:
    """Candidate keys from `Authorization: Bearer` and `x-api-key`, in that order."""
    found: list[str] = []
    authorization = header(scope, b"authorization")
    if authorization:
        scheme, _, value = authorization.strip().partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            found.append(value.strip())
    api_key = header(scope, b"x-api-key")
    if api_key and api_key.strip() and api_key.strip() not in found:
        found.append(api_key.strip())
    return found


def is_open(path: str) -> bool:
    return path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)


def is_preflight(scope: Scope) -> bool:
    return scope.get("method") == "OPTIONS" and header(
        scope, b"access-control-request-method") is not None


class AuthMiddleware:
    def __init__(self, app: ASGIApp, *, keys: KeyStore | None, settings: Settings) -> None:
        self.app = app
        self.keys = keys
        self.enabled = settings.auth.enabled
        # The one place the client address is decided; later layers read the principal.
        self.trusted = parse_networks(settings.server.trusted_proxies)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        ip = client_ip(scope, self.trusted)
        if not self.enabled:
            await self._without_auth(scope, receive, send, ip)
            return
        record = self._verify(scope)
        if record is not None:
            state(scope)["principal"] = Principal.from_key(record, ip)
        elif is_open(scope.get("path", "")) or is_preflight(scope):
            state(scope)["principal"] = Principal.unauthenticated(ip)
        else:
            # Who was refused, for the access log and the console's recent refusals.
            state(scope)["principal"] = Principal.unauthenticated(ip)
            metrics.AUTH_FAILURES.inc()
            log.info("request refused: missing or invalid key", client_ip=ip,
                     path=scope.get("path"))
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
                return
            await send_error(scope, send, AuthenticationFailed(AUTH_MESSAGE),
                             {"WWW-Authenticate": "Bearer"})
            return
        await self.app(scope, receive, send)

    async def _without_auth(self, scope: Scope, receive: Receive, send: Send, ip: str) -> None:
        """Auth off means "this machine only", judged by the resolved client address: a local
        reverse proxy forwarding LAN or internet traffic must not make everyone an admin."""
        if is_loopback(ip):
            state(scope)["principal"] = Principal.anonymous(ip)
        elif is_open(scope.get("path", "")):
            state(scope)["principal"] = Principal.unauthenticated(ip)
        else:
            state(scope)["principal"] = Principal.unauthenticated(ip)  # for the access log
            log.info("request refused: auth is off and the client is not local", client_ip=ip,
                     path=scope.get("path"))
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
                return
            await send_error(scope, send, PermissionDenied(LOOPBACK_ONLY_MESSAGE,
                                                           code="auth_disabled_remote"))
            return
        await self.app(scope, receive, send)

    def _verify(self, scope: Scope) -> KeyRecord | None:
        if self.keys is None:
            return None
        for token in presented_keys(scope):
            record = self.keys.verify(token)
            if record is not None:
                return record
        return None
