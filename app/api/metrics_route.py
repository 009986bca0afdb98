"""GET /metrics: Prometheus text exposition of app.metrics (admin key when auth is on)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app.errors import NotFound
from app.security.auth import require_admin

router = APIRouter()


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    settings = request.app.state.settings
    if not settings.metrics.enabled:
        raise NotFound("Metrics are turned off ([metrics] enabled = false).")
    if settings.auth.enabled and settings.metrics.require_admin:
        require_admin(request.state.principal)
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
