"""GET /v1/models and /v1/models/{id}: the registry, with residency state."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from app.engine.registry import ModelRegistry, ModelSpec
from app.engine.service import Engine

router = APIRouter()


def _model_object(spec: ModelSpec, engine: Engine) -> dict[str, Any]:
    loaded = engine.loaded_models().get(spec.id)
    try:
        created = int(spec.path.stat().st_mtime)
    except OSError:
        created = 0
    return {
        "id": spec.id,
        "object": "model",
        "created": created,
        "owned_by": "mlx-gateway",
        "loaded": loaded is not None,
        "pinned": spec.pinned,
        "aliases": list(spec.aliases),
        "last_used": int(loaded.last_used) if loaded else None,
    }


@router.get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    registry: ModelRegistry = request.app.state.registry
    engine: Engine = request.app.state.engine
    return {"object": "list", "data": [_model_object(s, engine) for s in registry.specs]}


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, request: Request) -> dict[str, Any]:
    registry: ModelRegistry = request.app.state.registry
    return _model_object(registry.resolve(model_id), request.app.state.engine)
