"""/health and /ready when the engine thread has stopped for good (issue 13, item 5)."""

from __future__ import annotations

from types import SimpleNamespace

from fastapi import FastAPI
from fastapi.testclient import TestClient

from app.api import health


class _Engine:
    """Only what the health routes read of the engine."""

    def __init__(self, dead: str | None) -> None:
        self.dead = dead

    def loaded_models(self) -> dict[str, object]:
        return {"m": object()}


def _client(dead: str | None, *, draining: bool = False) -> TestClient:
    app = FastAPI()
    app.state.engine = _Engine(dead)
    app.state.draining = draining
    app.state.registry = SimpleNamespace(default_id="m")
    app.include_router(health.router)
    return TestClient(app)


def test_a_serving_engine_is_healthy_and_ready() -> None:
    http = _client(None)
    assert http.get("/health").json()["status"] == "ok"
    assert http.get("/ready").status_code == 200


def test_a_dead_engine_is_degraded_and_not_ready() -> None:
    http = _client("RuntimeError('boom')")
    sick = http.get("/health")
    assert sick.status_code == 503 and sick.json()["status"] == "degraded"
    assert "boom" in sick.json()["reason"]
    assert http.get("/ready").status_code == 503
    assert http.head("/").status_code == 503  # Claude Code's probe says the same


def test_a_draining_server_is_healthy_but_not_ready() -> None:
    """After SIGTERM a balancer's check on /ready moves traffic away; /health stays ok (the
    process is fine, a liveness probe must not restart it mid-drain)."""
    http = _client(None, draining=True)
    assert http.get("/health").status_code == 200
    ready = http.get("/ready")
    assert ready.status_code == 503 and ready.json()["status"] == "draining"
