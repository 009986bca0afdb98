"""Liveness and readiness. Neither needs a key; neither touches MLX (they must answer while the
engine is busy)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

router = APIRouter()


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    dead = request.app.state.engine.dead
    if dead is not None:  # the process is up but can never generate again: restart it
        return JSONResponse({"status": "degraded", "service": "mlx-gateway",
                             "reason": f"engine stopped: {dead}"}, status_code=503)
    return JSONResponse({"status": "ok", "service": "mlx-gateway"})


@router.api_route("/", methods=["GET", "HEAD"])
async def root(request: Request) -> JSONResponse:
    """Claude Code's connectivity probe (`HEAD /`) answers like /health, without a key."""
    return await health(request)


@router.get("/ready")
async def ready(request: Request) -> JSONResponse:
    default_id = request.app.state.registry.default_id
    if request.app.state.engine.dead is not None:
        return JSONResponse({"status": "engine_stopped", "model": default_id}, status_code=503)
    if getattr(request.app.state, "draining", False):  # SIGTERM: balancers, go elsewhere
        return JSONResponse({"status": "draining", "model": default_id}, status_code=503)
    if default_id is not None and default_id in request.app.state.engine.loaded_models():
        return JSONResponse({"status": "ready", "model": default_id})
    return JSONResponse({"status": "loading", "model": default_id}, status_code=503)
