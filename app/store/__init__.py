"""Stored responses for `/v1/responses`: SQLite by default, Redis for several instances."""

from __future__ import annotations

from app.settings import ConfigError, Settings
from app.store.base import ResponseStore, StoredResponse
from app.store.redis_store import RedisStore
from app.store.sqlite_store import SqliteStore

__all__ = ["RedisStore", "ResponseStore", "SqliteStore", "StoredResponse", "open_store"]


def open_store(settings: Settings) -> ResponseStore:
    """The backend `[responses] store` names. Call from the app's lifespan; close it there."""
    if settings.responses.store == "redis":
        if not settings.redis.url:
            raise ConfigError(
                "config error: responses.store = 'redis' needs redis.url (redis://host:port/db)"
            )
        return RedisStore(settings.redis.url, timeout=settings.responses.timeout)
    return SqliteStore(settings.responses_path)
