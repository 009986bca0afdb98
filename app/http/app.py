"""`create_app(settings)`: routers, middleware and the engine's lifetime. Nothing global."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import structlog
from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware

from app.activity import Activity
from app.api import admin, health, metrics_route, models
from app.api.anthropic import messages
from app.api.errors import install_error_handlers
from app.api.openai import chat, completions, responses
from app.console import routes as console
from app.engine.engine import Engine
from app.http.auth import AuthMiddleware
from app.http.edge import BodySizeLimitMiddleware, RequestContextMiddleware
from app.http.limits import RateLimitMiddleware
from app.limits.admission import Admission
from app.limits.breaker import CircuitBreaker
from app.limits.factory import build_limiter
from app.models.draft_check import draft_problems
from app.models.registry import ModelRegistry
from app.security.keys import KeyStore, reload_on_sighup
from app.security.revocations import SharedRevocations
from app.settings import ConfigError, Settings
from app.store import open_store
from app.targets.middleware import TargetMiddleware
from app.targets.resolve import Targets

log = structlog.get_logger(__name__)


def create_app(settings: Settings) -> FastAPI:
    registry = ModelRegistry.from_settings(settings)
    problems = draft_problems(registry)
    if problems:  # a draft whose tokenizer differs would draft nonsense: refuse to start
        raise ConfigError("\n".join(f"config error: {problem}" for problem in problems))
    limiter = build_limiter(settings)
    limits = settings.limits
    breaker = CircuitBreaker(limiter, global_rpm=limits.global_rpm,
                             failures=limits.breaker_failures, cooldown=limits.breaker_cooldown)
    engine = Engine(settings, registry, breaker=breaker,
                    admission=Admission(limits.max_inflight, limits.max_queue,
                                        per_owner=limits.per_key_inflight))
    keys = KeyStore(settings.keys_file) if settings.auth.enabled else None
    targets = Targets.build(settings, registry, limiter)  # None without upstreams and routes
    activity = Activity()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if keys is not None:
            reload_on_sighup(keys)
        revocations = (SharedRevocations(settings.redis.url, keys, interval=keys.check_interval)
                       if keys is not None and settings.redis.url else None)
        watch = asyncio.create_task(revocations.run()) if revocations is not None else None
        await engine.start()
        if targets is not None:
            await targets.start()
        app.state.response_store = open_store(settings)
        warm = asyncio.create_task(_warm_default_model(engine, registry))
        try:
            yield
        finally:
            warm.cancel()
            if watch is not None and revocations is not None:
                watch.cancel()
                await revocations.close()
            await engine.stop()
            if targets is not None:
                await targets.aclose()
            await limiter.aclose()
            await app.state.response_store.close()

    app = FastAPI(title="mlx-gateway", version="0.1.0", lifespan=lifespan)
    app.state.settings = settings
    app.state.registry = registry
    app.state.engine = engine
    app.state.keys = keys
    app.state.activity = activity
    app.state.targets = targets
    app.state.draining = False  # set on SIGTERM by the server; /ready then answers 503
    app.state.started_monotonic = time.monotonic()
    install_error_handlers(app)
    for module in (health, models, chat, completions, metrics_route, responses, messages,
                   admin, console):
        app.include_router(module.router)

    # add_middleware wraps: the last added runs first. Outermost first, requests pass:
    # request id -> body size limit -> CORS -> auth (deny by default) -> rate limits
    # -> targets (routes and upstreams, when configured).
    if targets is not None:
        app.add_middleware(TargetMiddleware, targets=targets, settings=settings, breaker=breaker)
    # With a chain to fall back on, an open local breaker must not refuse at the door.
    app.add_middleware(RateLimitMiddleware, limiter=limiter, settings=settings, breaker=breaker,
                       refuse_when_open=targets is None)
    app.add_middleware(AuthMiddleware, keys=keys, settings=settings)
    if settings.server.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.server.cors_origins,
            allow_methods=["GET", "POST", "DELETE", "OPTIONS"],
            allow_headers=["*"],  # SDKs send authorization, x-api-key and many x-stainless-*
            expose_headers=["x-request-id", "retry-after", "x-ratelimit-limit-requests",
                            "x-ratelimit-remaining-requests", "x-ratelimit-reset-requests",
                            "x-mlxgw-served-by"],
            max_age=600,
        )
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.server.max_body_bytes)
    app.add_middleware(RequestContextMiddleware, activity=activity)
    return app


async def _warm_default_model(engine: Engine, registry: ModelRegistry) -> None:
    """Load pinned models and the default one at start, so /ready means "can serve"."""
    if registry.default_id is None:
        log.warning("no models configured or discovered")
        return
    first = [spec.id for spec in registry if spec.pinned]
    for model_id in [*first, *([] if registry.default_id in first else [registry.default_id])]:
        try:
            await engine.ensure_loaded(model_id)
        except Exception as error:  # requests for it will report it too; say so at start
            log.warning("warm-up load failed", model=model_id, error=str(error))
