"""Who may do what: admin and model scopes, the first key, and the startup bind check.

The middleware that establishes the caller is app/http/auth.py.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TextIO

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
    log.warning("created the first admin key", key_id=record.id, keys_file=str(store.path))
    return token


FIRST_KEY_FILE = "first-admin-key.txt"


def announce_first_key(token: str, keys_file: Path, out: TextIO) -> Path | None:
    """Show the first admin key once: on a terminal, printed; otherwise (launchd, systemd,
    a pipe: stdout is the service log) written to a 0600 file next to the keys file, and only
    that file's path is logged. Returns the file written, if any."""
    if out.isatty():
        print("Created the first admin key. It is shown only this once; keep it safe:\n"
              f"{token}", file=out, flush=True)
        return None
    path = keys_file.parent / FIRST_KEY_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)  # a fresh file, so O_EXCL below creates it 0600
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(token + "\n")
    log.warning("the first admin key was written to a file readable only by you; read it, "
                "keep the key safe and delete the file", path=str(path))
    return path


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
