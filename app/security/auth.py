"""Deny-by-default authentication as a pure ASGI middleware, plus the startup safety checks.

The decision uses only the raw ASGI `scope["path"]` (never a URL rebuilt from the Host
header) and the method, so Host tricks and query strings cannot open a route.
"""

from __future__ import annotations

import structlog

from app import metrics
from app.errors import AuthenticationFailed, PermissionDenied
from app.security.asgi import ASGIApp, Receive, Scope, Send, header, send_error, state
from app.security.client_ip import client_ip, parse_networks
from app.security.keys import KeyRecord, KeyStore
from app.security.principal import Principal
from app.settings import ConfigError, Settings

log = structlog.get_logger(__name__)

OPEN_PATHS = frozenset({"/health", "/ready"})
# One message for missing, malformed, unknown and revoked keys: say nothing about which.
AUTH_MESSAGE = "Missing or invalid API key. Send it as 'Authorization: Bearer KEY' or 'x-api-key'."


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


def is_preflight(scope: Scope) -> bool:
    return scope.get("method") == "OPTIONS" and header(
        scope, b"access-control-request-method") is not None


class AuthMiddleware:
    def __init__(self, app: ASGIApp, *, keys: KeyStore | None, settings: Settings) -> None:
        self.app = app
        self.keys = keys
        self.enabled = settings.auth.enabled
        self.trusted = parse_networks(settings.server.trusted_proxies)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        ip = client_ip(scope, self.trusted)
        if not self.enabled:
            state(scope)["principal"] = Principal.anonymous(ip)
            await self.app(scope, receive, send)
            return
        record = self._verify(scope)
        if record is not None:
            state(scope)["principal"] = Principal.from_key(record, ip)
        elif scope.get("path") in OPEN_PATHS or is_preflight(scope):
            state(scope)["principal"] = Principal.unauthenticated(ip)
        else:
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

    def _verify(self, scope: Scope) -> KeyRecord | None:
        if self.keys is None:
            return None
        for token in presented_keys(scope):
            record = self.keys.verify(token)
            if record is not None:
                return record
        return None


def require_admin(principal: Principal | None) -> None:
    if principal is None or not principal.admin:
        raise PermissionDenied("This operation needs an admin key.")


def authorize_model(principal: Principal | None, model_id: str, *aliases: str) -> None:
    """403 unless the key may use this model (under its id or any alias)."""
    if principal is None:
        raise PermissionDenied(f"This key may not use model '{model_id}'.", param="model")
    if principal.models is None:
        return
    if model_id in principal.models or any(alias in principal.models for alias in aliases):
        return
    raise PermissionDenied(f"This key may not use model '{model_id}'.", param="model")


def ensure_first_key(settings: Settings) -> str | None:
    """With auth on and an empty keys file, create one admin key; the caller prints it once."""
    if not settings.auth.enabled:
        return None
    store = KeyStore(settings.keys_file)
    if store.records():  # revoked keys count: revoking everything must not mint a new key
        return None
    record, token = store.create("admin (created on first start)", admin=True)
    log.warning("created the first admin key; it is printed once on the terminal",
                key_id=record.id, keys_file=str(store.path))
    return token


def check_bind_safety(settings: Settings, keys: KeyStore | None) -> None:
    """Refuse to listen beyond loopback without authentication."""
    if settings.is_loopback:
        return
    host = settings.server.host
    if not settings.auth.enabled:
        raise ConfigError(
            f"config error: refusing to bind {host} with [auth] enabled = false: anyone who "
            "can reach this address could use your models and machine. Set [auth] enabled = "
            "true and create a key (mlx-gateway keys create --name NAME), or bind 127.0.0.1 "
            "and put a reverse proxy in front."
        )
    if keys is None or not keys.usable():
        where = keys.path if keys is not None else settings.keys_file
        raise ConfigError(
            f"config error: refusing to bind {host} with no usable API keys in {where}: "
            "nobody could use the gateway there. Create a key with "
            "`mlx-gateway keys create --name NAME` (add --admin for model management), "
            "or bind 127.0.0.1."
        )
