"""Who may do what: admin and model scopes, the first key, and the startup bind check.

The middleware that establishes the caller is app/http/auth.py.
"""

from __future__ import annotations

import structlog

from app.errors import PermissionDenied
from app.security.keys import KeyStore
from app.security.principal import Principal
from app.settings import ConfigError, Settings

log = structlog.get_logger(__name__)

def require_admin(principal: Principal | None) -> None:
    if principal is None or not principal.admin:
        raise PermissionDenied("This operation needs an admin key.")


def may_use(principal: Principal | None, model_id: str, *aliases: str) -> bool:
    """Whether the key's model scope covers this model (under its id or any alias)."""
    if principal is None:
        return False
    if principal.models is None:
        return True
    return model_id in principal.models or any(alias in principal.models for alias in aliases)


def authorize_model(principal: Principal | None, model_id: str, *aliases: str) -> None:
    """403 unless the key may use this model (under its id or any alias)."""
    if not may_use(principal, model_id, *aliases):
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
