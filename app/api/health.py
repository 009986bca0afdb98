"""Liveness and readiness. Neither needs a key; neither touches MLX (they must answer while the
engine is busy)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

router = APIRouter()


@router.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok", "service": "mlx-gateway"}


@router.api_route("/", methods=["GET", "HEAD"])
async def root() -> dict[str, str]:
    """Claude Code's connectivity probe (`HEAD /`) answers like /health, without a key."""
    return await health()


@router.get("/ready")
async def ready(request: Request) -> JSONResponse:
    default_id = request.app.state.registry.default_id
    if default_id is not None and default_id in request.app.state.engine.loaded_models():
        return JSONResponse({"status": "ready", "model": default_id})
    return JSONResponse({"status": "loading", "model": default_id}, status_code=503)
