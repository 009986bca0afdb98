"""Logging: JSON lines on stdout, secrets masked everywhere, size rotation, idempotent setup."""

from __future__ import annotations

import io
import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from app.logging import configure_logging, redact, redact_text
from app.settings import LogSettings


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    yield
    configure_logging(LogSettings())  # closes any file handler a test opened


def _json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_json_lines_on_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging(LogSettings())
    structlog.get_logger("t").info("model loaded", model="m1", seconds=1.5)
    [line] = _json_lines(capsys.readouterr().out)
    assert line["event"] == "model loaded"
    assert line["model"] == "m1"
    assert line["seconds"] == 1.5
    assert line["level"] == "info"
    assert line["logger"] == "t"
    assert line["timestamp"].endswith("Z")


def test_configure_twice_does_not_duplicate_lines(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging(LogSettings())
    configure_logging(LogSettings())
    structlog.get_logger("t").info("once")
    assert len(_json_lines(capsys.readouterr().out)) == 1


def test_level_filters(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging(LogSettings(level="warning"))
    log = structlog.get_logger("t")
    log.info("quiet")
    log.warning("loud")
    assert [line["event"] for line in _json_lines(capsys.readouterr().out)] == ["loud"]


def test_secrets_redacted_in_structlog_events(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging(LogSettings())
    structlog.get_logger("t").info(
        "request",
        headers={"Authorization": "Bearer mgw-k1-topsecret", "X-API-Key": "plain-secret"},
        asgi_headers=[(b"authorization", b"Bearer zzz"), (b"content-type", b"json")],
        api_key="mgw-k2-othersecret",
        password="hunter2",
        note="client sent mgw-abc123-S3cr3t_value-x in the body",
    )
    out = capsys.readouterr().out
    for secret in ("topsecret", "plain-secret", "zzz", "othersecret", "hunter2", "S3cr3t"):
        assert secret not in out
    [line] = _json_lines(out)
    assert line["headers"] == {"Authorization": "***", "X-API-Key": "***"}
    assert line["asgi_headers"] == [["authorization", "***"], ["content-type", "json"]]
    assert line["api_key"] == "***"
    assert line["note"] == "client sent mgw-abc123-*** in the body"


def test_stdlib_and_uvicorn_records_are_json_and_redacted(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure_logging(LogSettings())
    logging.getLogger("uvicorn.access").info(
        '%s - "%s %s HTTP/%s" %d', "10.0.0.9:5000", "GET", "/v1/models?api_key=leaky", "1.1", 200
    )
    logging.getLogger("httpx").warning("retrying with key %s", "mgw-id9-leaky2")
    out = capsys.readouterr().out
    assert "leaky" not in out
    access, other = _json_lines(out)
    assert access["logger"] == "uvicorn.access"
    assert access["status"] == 200
    assert access["client"] == "10.0.0.9:5000"
    assert access["path"] == "/v1/models?api_key=***"
    assert other["event"] == "retrying with key mgw-id9-***"
    assert other["level"] == "warning"


def test_exception_traceback_is_rendered_and_redacted(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure_logging(LogSettings())
    try:
        raise RuntimeError("bad key mgw-x1-verysecret")
    except RuntimeError:
        structlog.get_logger("t").exception("failed")
    [line] = _json_lines(capsys.readouterr().out)
    assert "RuntimeError" in line["exception"]
    assert "verysecret" not in line["exception"]


def test_console_format_is_not_json(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging(LogSettings(format="console"))
    structlog.get_logger("t").info("hello", token="abc")
    out = capsys.readouterr().out
    assert "hello" in out
    assert "token=***" in out
    with pytest.raises(json.JSONDecodeError):
        json.loads(out.splitlines()[0])


def test_file_rotation_keeps_backups(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "gateway.log"
    configure_logging(LogSettings(file=path, max_bytes=2048, backups=2))
    log = structlog.get_logger("t")
    for i in range(200):
        log.info("line", i=i, pad="x" * 40)
    assert path.is_file()
    assert (tmp_path / "logs" / "gateway.log.1").is_file()
    assert (tmp_path / "logs" / "gateway.log.2").is_file()
    assert not (tmp_path / "logs" / "gateway.log.3").exists()
    assert path.stat().st_size <= 2048
    last = _json_lines(path.read_text())[-1]
    assert last["i"] == 199


def test_file_without_backups_is_truncated_not_unbounded(tmp_path: Path) -> None:
    path = tmp_path / "gateway.log"
    configure_logging(LogSettings(file=path, max_bytes=1024, backups=0))
    log = structlog.get_logger("t")
    for i in range(100):
        log.info("line", i=i, pad="y" * 40)
    assert path.stat().st_size <= 1024
    assert list(tmp_path.iterdir()) == [path]


def test_redact_helpers() -> None:
    assert redact_text("Authorization: Bearer abc.def") == "Authorization: Bearer ***"
    assert redact_text("https://x/?a=1&token=abc&b=2") == "https://x/?a=1&token=***&b=2"
    assert redact({"nested": [{"client_secret": "s"}], "prompt_tokens": 12}) == {
        "nested": [{"client_secret": "***"}], "prompt_tokens": 12,
    }


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_auto_format_is_coloured_text_on_a_terminal_and_json_in_the_file(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stdout", terminal)
    configure_logging(LogSettings(file=tmp_path / "gw.log"))
    structlog.get_logger("t").info("model loaded", model="m1", token="abc")
    out = terminal.getvalue()
    assert "model loaded" in out and "m1" in out and "abc" not in out
    assert "\x1b[" in out  # colours for a person
    with pytest.raises(json.JSONDecodeError):
        json.loads(out.splitlines()[0])
    [line] = _json_lines((tmp_path / "gw.log").read_text())
    assert line["event"] == "model loaded" and line["token"] == "***"


def test_auto_format_is_json_when_stdout_is_not_a_terminal(
        monkeypatch: pytest.MonkeyPatch) -> None:
    piped = io.StringIO()  # launchd and systemd hand us a file or a socket, not a TTY
    monkeypatch.setattr(sys, "stdout", piped)
    configure_logging(LogSettings())
    structlog.get_logger("t").info("model loaded", model="m1")
    [line] = _json_lines(piped.getvalue())
    assert line["model"] == "m1"


def test_explicit_json_wins_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stdout", terminal)
    configure_logging(LogSettings(format="json"))
    structlog.get_logger("t").info("model loaded")
    [line] = _json_lines(terminal.getvalue())
    assert line["event"] == "model loaded"
