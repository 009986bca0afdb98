"""`[[upstreams]]` and `[[routes]]`: other OpenAI-compatible servers and fallback chains.

Only the *name* of the environment variable holding an upstream's key sits in the config;
the secret is read at start and never written anywhere (logs, responses, /v1/models).
"""

from __future__ import annotations

import re
from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator

_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_ROUTE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}")
_ENV = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")


class UpstreamEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(description="Name of the upstream; clients and chains say 'ID:MODEL'.")
    base_url: str = Field(
        description="Its OpenAI base URL, with the /v1 the SDKs want, e.g. "
        "'http://studio.local:8000/v1' or 'https://openrouter.ai/api/v1'.")
    api_key_env: str | None = Field(
        None, description="Name of the environment variable that holds its API key (the key "
        "itself never goes in this file). Unset: no key is sent.")
    models: list[str] | Literal["*"] = Field(
        "*", description="Model ids it serves; '*' = any, listed from its /v1/models.")
    timeout: float = Field(
        300.0, gt=0, description="Seconds to wait for each read from it (a non-stream answer "
        "arrives whole, so this bounds a whole generation there).")
    connect_timeout: float = Field(5.0, gt=0, description="Seconds to wait for a connection.")
    max_inflight: int = Field(16, ge=1, description="Requests sent to it at once; more fall "
                              "through to the next target of the chain.")
    health_interval: float = Field(
        30.0, ge=0, description="Seconds between GET /v1/models health checks; 0 = off.")
    breaker_failures: int = Field(
        3, ge=1, description="Failures in a row (unreachable, timeout, 5xx, failed health "
        "check) that open its breaker.")
    breaker_cooldown: float = Field(30.0, gt=0, description="Seconds its breaker stays open.")
    anthropic: bool = Field(
        False, description="It also serves the Anthropic /v1/messages (another mlx-gateway "
        "does); otherwise /v1/messages skips it in a chain.")

    @field_validator("id")
    @classmethod
    def _id(cls, value: str) -> str:
        if not _ID.fullmatch(value):
            raise ValueError("use letters, digits and . _ - (no ':'), at most 64 chars")
        return value

    @field_validator("base_url")
    @classmethod
    def _url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("expected an http:// or https:// URL")
        if parts.username or parts.password:
            raise ValueError("no credentials in the URL: put the key in the environment "
                             "variable named by api_key_env")
        if parts.query or parts.fragment:
            raise ValueError("no query or fragment")
        return value.rstrip("/")

    @field_validator("api_key_env")
    @classmethod
    def _env(cls, value: str | None) -> str | None:
        if value is not None and not _ENV.fullmatch(value):
            raise ValueError("the NAME of an environment variable (letters, digits, _), "
                             "not the key itself")
        return value


class RouteEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="The model name clients send.")
    chain: list[str] = Field(
        min_length=1, description="Targets tried in order: a local model id or alias, or "
        "'UPSTREAM:MODEL'.")
    queue_wait: float = Field(
        0.0, ge=0, description="Seconds a local target (not the last of the chain) waits for "
        "a free generation slot before the next target is tried; the last one queues as usual.")

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _ROUTE.fullmatch(value) or ".." in value:
            raise ValueError("use letters, digits and . _ : / - (no '..', at most 128 chars)")
        return value


def check_references(upstreams: list[UpstreamEntry], routes: list[RouteEntry]) -> None:
    """Unique ids and names; every 'UPSTREAM:MODEL' of a chain names a configured upstream
    (and, with a models list, one of its models). Local ids are checked against the model
    registry when the app is built."""
    ids = [u.id for u in upstreams]
    if len(set(ids)) != len(ids):
        raise ValueError(f"upstream ids must be unique (got {ids})")
    names = [r.name for r in routes]
    if len(set(names)) != len(names):
        raise ValueError(f"route names must be unique (got {names})")
    by_id = {u.id: u for u in upstreams}
    for route in routes:
        for target in route.chain:
            upstream_id, sep, model = target.partition(":")
            if not sep or upstream_id not in by_id:
                continue  # a local model; checked against the registry at start
            upstream = by_id[upstream_id]
            if not model:
                raise ValueError(f"route {route.name!r}: {target!r} names no model")
            if upstream.models != "*" and model not in upstream.models:
                raise ValueError(f"route {route.name!r}: {target!r}: upstream "
                                 f"{upstream_id!r} lists no model {model!r}")
