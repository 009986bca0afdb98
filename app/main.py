"""`create_app(settings)`: routers, middleware and the engine's lifetime. Nothing global."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import structlog
from fastapi import FastAPI

from app.api import chat, completions, health, metrics_route, models, responses
from app.api.errors import install_error_handlers
from app.api.middleware import BodySizeLimitMiddleware, RequestContextMiddleware
from app.engine.registry import ModelRegistry
from app.engine.service import Engine
from app.settings import DEMO_MODEL_ID, Settings
from app.store import open_store

log = structlog.get_logger(__name__)


def demo_model_dir(settings: Settings) -> Path:
    return settings.cache_dir / "models" / DEMO_MODEL_ID


def create_app(settings: Settings) -> FastAPI:
    demo = demo_model_dir(settings)
    registry = ModelRegistry.build(settings, demo_path=demo if demo.is_dir() else None)
    engine = Engine(settings.engine, registry)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await engine.start()
        app.state.response_store = open_store(settings)
        warm = asyncio.create_task(_warm_default_model(engine, registry))
        try:
            yield
        finally:
            warm.cancel()
            await engine.stop()
            await app.state.response_store.close()

    app = FastAPI(title="mlx-gateway", version="0.1.0", lifespan=lifespan)
    app.state.settings = settings
    app.state.registry = registry
    app.state.engine = engine
    install_error_handlers(app)
    for module in (health, models, chat, completions, metrics_route, responses):
        app.include_router(module.router)
    # Added innermost first: the request id wraps everything, then the body limit.
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.server.max_body_bytes)
    app.add_middleware(RequestContextMiddleware)
    return app


async def _warm_default_model(engine: Engine, registry: ModelRegistry) -> None:
    """Load the default model at start so the first request and /ready don't wait."""
    if registry.default_id is None:
        log.warning("no models configured or discovered")
        return
    with contextlib.suppress(Exception):  # a failed load is logged; requests report it
        await engine.ensure_loaded(registry.default_id)
