"""GET /v1/admin/status: what the gateway is doing, for the console and `mlx-gateway status`.

Admin only. Read from the live objects (registry, pool, admission, breaker, key store,
recent activity); nothing here computes or waits on MLX. Key secrets never leave the store:
only ids, names, scopes and when each key was last used.
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request
from prometheus_client import REGISTRY

from app.activity import Activity
from app.engine.engine import Engine
from app.models.registry import ModelRegistry, ModelSpec
from app.security.auth import require_admin
from app.security.keys import KeyStore
from app.settings import Settings

router = APIRouter()


def _gauge(name: str) -> float | None:
    return REGISTRY.get_sample_value(name)


def model_status(spec: ModelSpec, engine: Engine, now: float) -> dict[str, Any]:
    pool = engine.pool
    resident = pool.policy.get(spec.id)
    loaded = spec.id in engine.loaded_models()
    ttl_left = pool.policy.ttl_left(spec.id, now) if loaded else None
    return {
        "id": spec.id,
        "aliases": list(spec.aliases),
        "format": spec.format,
        "source": spec.source,
        "loaded": loaded,
        "loading": pool.is_loading(spec.id),
        "size_bytes": pool.footprint(spec),
        "context_length": spec.context_length,
        "pinned": spec.pinned,
        "ttl_seconds": spec.ttl if spec.ttl is not None else pool.policy.default_ttl,
        "ttl_left_seconds": None if ttl_left is None else round(ttl_left, 1),
        "in_flight": resident.leases if resident and loaded else 0,
        "waiting": pool.waiting(spec.id),
        "last_used": resident.last_used if resident and loaded else None,
    }


def _memory(engine: Engine) -> dict[str, Any]:
    policy = engine.pool.policy
    active = _gauge("mlxgw_mlx_active_bytes")
    return {
        "budget_bytes": policy.budget_bytes,
        "used_bytes": policy.used_bytes,  # estimated: weights + KV allowance per model
        "max_loaded_models": policy.max_loaded,
        "mlx_active_bytes": int(active) if active is not None else None,
    }


def _limits(settings: Settings, engine: Engine) -> dict[str, Any]:
    limits = settings.limits
    admission, breaker = engine.admission, engine.breaker
    redis_up = _gauge("mlxgw_ratelimit_redis_up")
    return {
        "per_key_rpm": limits.per_key_rpm,
        "per_key_tpm": limits.per_key_tpm,
        "per_ip_rpm": limits.per_ip_rpm,
        "global_rpm": limits.global_rpm,
        "max_inflight": limits.max_inflight,
        "max_queue": limits.max_queue,
        "inflight": admission.inflight if admission else None,
        "queued": admission.queued if admission else None,
        "backend": "redis" if settings.redis.url else "memory",
        "redis_up": None if not settings.redis.url or redis_up is None else bool(redis_up),
        "breaker": {
            "state": breaker.state.name.lower(),
            "consecutive_failures": breaker.consecutive_failures,
            "failures_to_open": breaker.failure_threshold,
            "cooldown_seconds": breaker.cooldown,
        } if breaker else None,
    }


def _keys(keys: KeyStore | None) -> list[dict[str, Any]]:
    if keys is None:
        return []
    return [{
        "id": record.id,  # public half of the token, as in logs; the secret is never here
        "name": record.name,
        "admin": record.admin,
        "models": list(record.models) if record.models is not None else None,
        "rpm": record.rpm,
        "tpm": record.tpm,
        "visitor_rpm": record.visitor_rpm,
        "created": record.created,
        "revoked": record.revoked,
        "last_used": keys.last_used(record.id),
    } for record in keys.records()]


@router.get("/v1/admin/status")
async def status(request: Request) -> dict[str, Any]:
    require_admin(request.state.principal)
    state = request.app.state
    settings: Settings = state.settings
    registry: ModelRegistry = state.registry
    engine: Engine = state.engine
    activity: Activity = state.activity
    now = time.time()
    return {
        "object": "gateway.status",
        "version": request.app.version,
        "time": now,
        "uptime_seconds": round(time.monotonic() - state.started_monotonic, 1),
        "default_model": registry.default_id,
        "auth_enabled": settings.auth.enabled,
        "models": [model_status(spec, engine, now) for spec in registry],
        "memory": _memory(engine),
        "limits": _limits(settings, engine),
        "traffic": activity.snapshot(),
        "keys": _keys(state.keys),
        # Upstream servers and routes have no home yet (app/targets/); the console shows
        # these lists when they do.
        "upstreams": [],
        "routes": [],
    }
