"""app/targets without a network: config checks, name resolution, the SSE relay's rewriting."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from app.limits.window import InProcessLimiter
from app.models.registry import ModelRegistry
from app.ops.doctor import check_upstreams, format_results
from app.settings import ConfigError, Settings, load_settings
from app.targets.config import UpstreamEntry
from app.targets.relay import SSERewriter, UsageMeter, rewrite_json, stream_error
from app.targets.resolve import Targets
from app.targets.upstream import Unavailable, Upstream
from tests.local_server import free_port, serving
from tests.misbehaving_upstream import Misbehaving


def _settings(tmp_path: Path, **extra: object) -> Settings:
    model = tmp_path / "tiny"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text("{}")
    return Settings(models=[{"id": "tiny", "path": str(model), "aliases": ["t"]}],
                    **extra)  # type: ignore[arg-type]


def _targets(settings: Settings) -> Targets:
    built = Targets.build(settings, ModelRegistry.from_settings(settings), InProcessLimiter())
    assert built is not None
    return built


def test_upstream_config_refuses_secrets_and_bad_references(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    cases = {
        'base_url = "http://user:pw@host/v1"': "no credentials in the URL",
        'base_url = "ftp://host/v1"': "http:// or https://",
        'base_url = "http://h/v1"\napi_key_env = "sk-live-123"': "NAME of an environment",
        'base_url = "http://h/v1"\nmodels = ["a"]\n[[routes]]\nname = "r"\nchain = ["u:b"]':
            "lists no model 'b'",
    }
    for body, message in cases.items():
        config.write_text(f'[[upstreams]]\nid = "u"\n{body}\n')
        with pytest.raises(ConfigError, match=message):
            load_settings(config)
    config.write_text('[[upstreams]]\nid = "u"\nbase_url = "http://h/v1"\n'
                      '[[upstreams]]\nid = "u"\nbase_url = "http://h/v1"\n')
    with pytest.raises(ConfigError, match="unique"):
        load_settings(config)


def test_missing_key_variable_and_unknown_local_model_fail_at_start(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    with pytest.raises(ConfigError, match="NO_SUCH_KEY_VAR is not set"):
        _targets(_settings(tmp_path, upstreams=[
            {"id": "u", "base_url": "http://h/v1", "api_key_env": "NO_SUCH_KEY_VAR"}]))
    with pytest.raises(ConfigError, match="neither a local model"):
        _targets(_settings(tmp_path, routes=[{"name": "r", "chain": ["nope"]}]))


def test_names_resolve_to_chains(tmp_path: Path) -> None:
    settings = _settings(
        tmp_path,
        upstreams=[{"id": "studio", "base_url": "http://h/v1", "models": ["big"]},
                   {"id": "cloud", "base_url": "https://c/v1"}],
        routes=[{"name": "fast", "chain": ["t", "studio:big", "cloud:any/model"]}])
    targets = _targets(settings)
    chain = targets.resolve("fast")
    assert chain is not None
    assert [(t.name, t.model, t.upstream.id if t.upstream else None) for t in chain] == [
        ("tiny", "tiny", None), ("studio:big", "big", "studio"),
        ("cloud:any/model", "any/model", "cloud")]
    one = targets.resolve("cloud:qwen/qwen3-8b")  # '*' upstream: any model id
    assert one is not None and [t.model for t in one] == ["qwen/qwen3-8b"]
    assert targets.resolve("studio:small") is None  # not in its list: local stack says 404
    assert targets.resolve("tiny") is None and targets.resolve("t") is None
    assert targets.resolve("nobody:x") is None
    assert ("fast", "route", ["tiny", "studio:big", "cloud:any/model"]) in targets.names()
    assert ("studio:big", "studio", ["studio:big"]) in targets.names()
    assert Targets.build(_settings(tmp_path), ModelRegistry.from_settings(_settings(tmp_path)),
                         InProcessLimiter()) is None


def _event(payload: dict[str, object], event: str | None = None) -> bytes:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(payload)}\n\n".encode()


def test_sse_rewriter_renames_model_and_hides_the_usage_chunk_it_asked_for() -> None:
    meter = UsageMeter()
    rewriter = SSERewriter("studio:big", meter, strip_usage=True)
    stream = (b": ping\n\n"
              + _event({"model": "big", "choices": [{"delta": {"content": "hi"}}],
                        "usage": None})
              + _event({"model": "big", "choices": [], "usage": {
                  "prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}})
              + b"data: [DONE]\n\n")
    # Fed a byte at a time, with CRLF line ends: events still come out whole, in order.
    crlf = stream.replace(b"\n", b"\r\n")
    out = b"".join(rewriter.feed(crlf[i:i + 1]) for i in range(len(crlf))) + rewriter.flush()
    events = out.split(b"\n\n")
    assert events[0] == b": ping"
    first = json.loads(events[1].removeprefix(b"data: "))
    assert first == {"model": "studio:big", "choices": [{"delta": {"content": "hi"}}]}
    assert events[2] == b"data: [DONE]" and events[3] == b""
    assert (meter.prompt_tokens, meter.completion_tokens, meter.total) == (7, 3, 10)


def test_usage_and_model_in_every_protocol_shape() -> None:
    meter = UsageMeter()
    rewriter = SSERewriter("r:m", meter, strip_usage=False)
    out = rewriter.feed(
        _event({"type": "message_start", "message": {"model": "m", "usage": {
            "input_tokens": 12, "output_tokens": 1}}}, "message_start")
        + _event({"type": "message_delta", "usage": {"output_tokens": 9}}, "message_delta"))
    assert b'"model":"r:m"' in out and out.startswith(b"event: message_start\n")
    assert (meter.prompt_tokens, meter.completion_tokens) == (12, 9)
    responses = UsageMeter()
    body = rewrite_json(json.dumps({"object": "response", "model": "m", "usage": {
        "input_tokens": 5, "output_tokens": 4}}).encode(), "r:m", responses)
    assert json.loads(body)["model"] == "r:m" and responses.total == 9
    assert rewrite_json(b"not json", "r:m", UsageMeter()) == b"not json"
    completed = UsageMeter()
    SSERewriter("x", completed, strip_usage=False).feed(_event(
        {"type": "response.completed", "sequence_number": 8,
         "response": {"model": "m", "usage": {"input_tokens": 2, "output_tokens": 3}}}))
    assert completed.total == 5


def test_stream_errors_speak_the_callers_protocol() -> None:
    chat = json.loads(stream_error("chat/completions", "gone", 0).removeprefix(b"data: "))
    assert chat["error"]["code"] == "upstream_failed"
    anthropic = stream_error("messages", "gone", 0)
    assert anthropic.startswith(b"event: error\n") and b'"api_error"' in anthropic
    responses = stream_error("responses", "gone", 4)
    assert json.loads(responses.split(b"data: ")[1])["sequence_number"] == 5


def test_doctor_checks_every_upstream_and_never_shows_its_key(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GOOD_UPSTREAM_KEY", "sk-do-not-print-me")
    monkeypatch.delenv("UNSET_UPSTREAM_KEY", raising=False)
    with serving(Misbehaving()) as port:
        url = f"http://127.0.0.1:{port}/v1"
        settings = _settings(tmp_path, upstreams=[
            {"id": "good", "base_url": url, "api_key_env": "GOOD_UPSTREAM_KEY",
             "models": ["echo"]},
            {"id": "stale", "base_url": url, "models": ["echo", "gone-model"]},
            {"id": "nokey", "base_url": url, "api_key_env": "UNSET_UPSTREAM_KEY"},
            {"id": "down", "base_url": f"http://127.0.0.1:{free_port()}/v1"}])
        results = {r.name: r for r in check_upstreams(settings)}
    assert {name: r.status for name, r in results.items()} == {
        "upstream good": "ok", "upstream stale": "warn", "upstream nokey": "fail",
        "upstream down": "fail"}
    assert "gone-model" in results["upstream stale"].detail
    assert "UNSET_UPSTREAM_KEY" in results["upstream nokey"].detail
    assert "sk-do-not-print-me" not in format_results(results.values())


def test_in_flight_cap_and_breaker_pass_a_request_on(tmp_path: Path) -> None:
    upstream = Upstream(UpstreamEntry(id="u", base_url="http://127.0.0.1:9/v1", max_inflight=1,
                                      breaker_failures=1, breaker_cooldown=600),
                        InProcessLimiter())
    upstream.admit()
    with pytest.raises(Unavailable) as full:
        upstream.admit()
    assert full.value.reason == "overloaded"
    upstream.done("failure")  # one failure opens this breaker
    with pytest.raises(Unavailable) as broken:
        upstream.admit()
    assert broken.value.reason == "breaker_open" and upstream.inflight == 0
