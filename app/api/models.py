"""GET /v1/models and /v1/models/{id} (the registry with residency state), and the admin
routes POST /v1/models/{id}/load and /unload."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Request

from app.engine.engine import Engine
from app.models.registry import ModelRegistry, ModelSpec
from app.security.auth import may_use, require_admin

router = APIRouter()


def _model_object(spec: ModelSpec, engine: Engine) -> dict[str, Any]:
    resident = engine.pool.policy.get(spec.id)
    loaded = spec.id in engine.loaded_models()
    try:
        created = int(spec.path.stat().st_mtime)
    except OSError:
        created = 0
    return {
        "id": spec.id,
        "object": "model",
        "created": created,
        "owned_by": "mlx-gateway",
        # Extra fields (clients ignore them): where the model stands in memory.
        "loaded": loaded,
        "size_bytes": engine.pool.footprint(spec),
        "pinned": spec.pinned,
        "aliases": list(spec.aliases),
        "last_used": int(resident.last_used) if resident and loaded else None,
        "in_flight": resident.leases if resident and loaded else 0,
    }


def _parts(request: Request) -> tuple[ModelRegistry, Engine]:
    return request.app.state.registry, request.app.state.engine


def _visible(request: Request) -> Callable[[ModelSpec], bool]:
    """The caller's model scope: a key limited to some models sees only those."""
    principal = getattr(request.state, "principal", None)
    return lambda spec: may_use(principal, spec.id, *spec.aliases)


def _target_objects(request: Request) -> list[dict[str, Any]]:
    """Upstream models (`owned_by` the upstream's id) and routes (`owned_by` "route", with
    their chain), from app/targets when configured."""
    targets = getattr(request.app.state, "targets", None)
    if targets is None:
        return []
    principal = getattr(request.state, "principal", None)
    return [{"id": name, "object": "model", "created": 0, "owned_by": owner, "chain": chain}
            for name, owner, chain in targets.names() if may_use(principal, name)]


@router.get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    registry, engine = _parts(request)
    visible = _visible(request)
    return {"object": "list",
            "data": [*(_model_object(s, engine) for s in registry if visible(s)),
                     *_target_objects(request)]}


@router.post("/v1/models/{model_id:path}/load")
async def load_model(model_id: str, request: Request) -> dict[str, Any]:
    require_admin(request.state.principal)
    engine: Engine = request.app.state.engine
    loaded = await engine.ensure_loaded(model_id)
    return _model_object(loaded.spec, engine)


@router.post("/v1/models/{model_id:path}/unload")
async def unload_model(model_id: str, request: Request) -> dict[str, Any]:
    require_admin(request.state.principal)
    registry, engine = _parts(request)
    spec = registry.resolve(model_id)
    unloaded = await engine.pool.unload(spec.id)
    return {**_model_object(spec, engine), "unloaded": unloaded}


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, request: Request) -> dict[str, Any]:
    registry, engine = _parts(request)
    for listed in _target_objects(request):
        if listed["id"] == model_id:
            return listed
    return _model_object(registry.resolve(model_id, _visible(request)), engine)
