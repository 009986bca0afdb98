"""`mlx-gateway status` output from a status document."""

from __future__ import annotations

from typing import Any

from app.ops.status import format_status

NOW = 1_800_000_000.0


def status_document() -> dict[str, Any]:
    return {
        "object": "gateway.status", "version": "0.1.0", "time": NOW, "uptime_seconds": 3725.0,
        "default_model": "small", "auth_enabled": True,
        "models": [
            {"id": "small", "aliases": ["s"], "loaded": True, "loading": False,
             "size_bytes": 800_000_000, "pinned": False, "ttl_left_seconds": 95.0,
             "in_flight": 2, "waiting": 0},
            {"id": "big", "aliases": [], "loaded": False, "loading": True,
             "size_bytes": 12_000_000_000, "pinned": True, "ttl_left_seconds": None,
             "in_flight": 0, "waiting": 3},
        ],
        "memory": {"budget_bytes": 20_000_000_000, "used_bytes": 12_800_000_000,
                   "max_loaded_models": 4, "mlx_active_bytes": None},
        "limits": {"per_key_rpm": 600, "per_key_tpm": 0, "per_ip_rpm": 120, "global_rpm": 0,
                   "max_inflight": 32, "max_queue": 64, "inflight": 2, "queued": 1,
                   "backend": "redis", "redis_up": False,
                   "breaker": {"state": "open", "consecutive_failures": 5,
                               "failures_to_open": 5, "cooldown_seconds": 30.0}},
        "traffic": {"requests_last_minute": 42, "refused_last_minute": 7, "per_minute": [],
                    "refusals_by_reason": {"rate_limit_exceeded": 6, "invalid_api_key": 1},
                    "recent_refusals": [
                        {"at": NOW - 5, "status": 429, "reason": "rate_limit_exceeded",
                         "message": "m", "path": "/v1/responses", "key_name": "widget",
                         "client_ip": "10.0.0.2"}]},
        "keys": [{"id": "0123456789abcdef", "name": "widget", "admin": False,
                  "models": ["small"], "rpm": 10, "tpm": None, "created": NOW - 100,
                  "revoked": False, "last_used": NOW - 5}],
        "upstreams": [], "routes": [],
    }


def test_format_status_names_everything_a_person_looks_for() -> None:
    text = format_status(status_document())
    lines = text.splitlines()
    assert lines[0] == "mlx-gateway 0.1.0, up 1h02m, default model small"
    small = next(line for line in lines if line.startswith("small "))
    assert small.split()[:8] == ["small", "loaded", "800.0", "MB", "no", "1m35s", "2", "0"]
    big = next(line for line in lines if line.startswith("big "))
    assert "loading" in big and "yes" in big and big.split()[-1] == "3"
    assert "kept in redis (down, in-process fallback)" in text
    assert "breaker open (5/5 failures)" in text
    assert "42 requests in the last minute, 7 refused" in text
    assert "6 rate_limit_exceeded, 1 invalid_api_key" in text
    assert "5s ago: 429 rate_limit_exceeded /v1/responses (widget)" in text
    widget = next(line for line in lines if line.startswith("widget "))
    assert widget.split() == ["widget", "0123456789abcdef", "no", "small", "5s", "ago", "active"]
