"""Recent traffic for the console: per-minute counts, refusals by reason, what is not use."""

from __future__ import annotations

from app.activity import Activity, note_refusal
from app.errors import RateLimited


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def test_counts_api_use_and_refusals_by_reason() -> None:
    clock = Clock()
    activity = Activity(clock=clock)
    activity.record("/v1/chat/completions", 200)
    activity.record("/v1/responses", 429, reason="rate_limit_exceeded", message="slow down",
                    key_name="widget", client_ip="10.0.0.9")
    activity.record("/v1/models", 401, reason="invalid_api_key")
    activity.record("/health", 200)  # not API use
    activity.record("/v1/admin/status", 200)  # the console polling itself is not use
    activity.record("/v1/admin/status", 403, reason="permission_denied")  # but a refusal is
    snap = activity.snapshot()
    assert snap["requests_last_minute"] == 4
    assert snap["refused_last_minute"] == 3
    assert snap["refusals_by_reason"] == {"rate_limit_exceeded": 1, "invalid_api_key": 1,
                                          "permission_denied": 1}
    newest, _, oldest = snap["recent_refusals"]
    assert newest["path"] == "/v1/admin/status"
    assert oldest == {"at": clock.now, "status": 429, "reason": "rate_limit_exceeded",
                      "message": "slow down", "path": "/v1/responses", "key_name": "widget",
                      "client_ip": "10.0.0.9"}
    assert len(snap["per_minute"]) == 60
    assert snap["per_minute"][-1] == {"minute": 999960, "requests": 4, "refused": 3}
    assert snap["per_minute"][0] == {"minute": 999960 - 59 * 60, "requests": 0, "refused": 0}


def test_the_last_minute_moves_on_and_history_is_bounded() -> None:
    clock = Clock()
    activity = Activity(keep=3, clock=clock)
    for _ in range(5):
        activity.record("/v1/responses", 503, reason="overloaded")
    clock.now += 61
    activity.record("/v1/responses", 200)
    snap = activity.snapshot()
    assert snap["requests_last_minute"] == 1 and snap["refused_last_minute"] == 0
    assert len(snap["recent_refusals"]) == 3  # bounded
    assert snap["refusals_by_reason"] == {"overloaded": 5}  # counted since start
    assert [m["requests"] for m in snap["per_minute"]][-3:] == [0, 5, 1]
    clock.now += 3600
    assert not any(m["requests"] for m in activity.snapshot()["per_minute"])


def test_note_refusal_names_the_reason() -> None:
    state: dict[str, object] = {}
    note_refusal(state, RateLimited("Rate limit reached for requests per minute (10)."))
    assert state["refusal"] == ("rate_limit_exceeded",
                                "Rate limit reached for requests per minute (10).")
