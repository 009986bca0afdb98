"""structlog setup: JSON lines (or text on a terminal) to stdout, an optional size-rotated
JSON file, secrets masked.

structlog is routed through stdlib `logging`, so uvicorn's own loggers (which we re-parent to
the root logger) come out in the same format and pass the same redaction. Call
`configure_logging` again to reconfigure: handlers it installed before are closed and replaced.
"""

from __future__ import annotations

import logging
import logging.handlers
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TextIO

import structlog
from structlog.types import EventDict, Processor, WrappedLogger

from app.settings import LogSettings

REDACTED = "***"

# Keys whose values are secrets wherever they appear (compared lower-case, '-' as '_').
_SECRET_KEYS = frozenset({
    "authorization", "proxy_authorization", "x_api_key", "api_key", "apikey", "token",
    "access_token", "refresh_token", "secret", "client_secret", "password", "passwd",
    "cookie", "set_cookie",
})
_SECRET_SUFFIXES = ("_password", "_secret", "_api_key")

# A gateway key is mgw-<id>-<secret>: keep the id (useful when reading logs), mask the rest.
_GATEWAY_KEY = re.compile(r"\bmgw-([A-Za-z0-9]+)-[A-Za-z0-9_\-]+")
_BEARER = re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=\-]+")
# key=value inside URLs, query strings or free text.
_INLINE_SECRET = re.compile(
    r"(?i)\b(api_key|apikey|access_token|token|secret|password|x-api-key)=([^&\s\"']+)"
)

_UVICORN_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access")
_OWNED = "_mlxgw_owned"  # marks handlers installed here, so a second call can remove them


def _is_secret_key(key: object) -> bool:
    if isinstance(key, bytes):
        key = key.decode("latin-1")
    if not isinstance(key, str):
        return False
    norm = key.lower().replace("-", "_")
    return norm in _SECRET_KEYS or norm.endswith(_SECRET_SUFFIXES)


def redact_text(text: str) -> str:
    """Mask gateway keys, bearer tokens and secret query parameters inside free text."""
    text = _GATEWAY_KEY.sub(lambda m: f"mgw-{m.group(1)}-{REDACTED}", text)
    text = _BEARER.sub(lambda m: f"{m.group(1)} {REDACTED}", text)
    return _INLINE_SECRET.sub(lambda m: f"{m.group(1)}={REDACTED}", text)


def redact(value: Any) -> Any:
    """Return `value` with secrets masked, recursing through dicts, lists, tuples and ASGI
    header pairs such as `(b"authorization", b"Bearer ...")`."""
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, bytes):
        return redact_text(value.decode("latin-1"))
    if isinstance(value, Mapping):
        return {k: (REDACTED if _is_secret_key(k) else redact(v)) for k, v in value.items()}
    if isinstance(value, tuple) and len(value) == 2 and _is_secret_key(value[0]):
        return (redact(value[0]), REDACTED)
    if isinstance(value, list | tuple | set | frozenset):
        return [redact(item) for item in value]
    return value


def redact_processor(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """structlog processor: mask secrets anywhere in the event."""
    return {
        key: (REDACTED if _is_secret_key(key) else redact(value))
        for key, value in event_dict.items()
    }


def _uvicorn_access_fields(
    _logger: WrappedLogger, _method: str, event_dict: EventDict
) -> EventDict:
    """Give uvicorn's access lines structured fields instead of only a formatted string."""
    # ProcessorFormatter hands the record's args over separately (pass_foreign_args); they
    # are already formatted into `event`, so drop them unless they are uvicorn's access tuple.
    args = event_dict.pop("positional_args", None)
    record = event_dict.get("_record")
    is_access = isinstance(record, logging.LogRecord) and record.name == "uvicorn.access"
    if is_access and isinstance(args, tuple) and len(args) == 5:
        client, method, path, http_version, status = args
        event_dict.update(client=client, method=method, path=path,
                          http_version=http_version, status=status)
    return event_dict


class _StdoutHandler(logging.StreamHandler[TextIO]):
    """Writes to whatever `sys.stdout` is at emit time (pytest's capture swaps it)."""

    def __init__(self) -> None:
        super().__init__(sys.stdout)

    @property
    def stream(self) -> TextIO:
        return sys.stdout

    @stream.setter
    def stream(self, _value: TextIO) -> None:
        pass


class _RotatingFileHandler(logging.handlers.RotatingFileHandler):
    """Size rotation; with `backups == 0` the file is truncated instead of growing forever
    (the stdlib handler never rolls over when backupCount is 0)."""

    def doRollover(self) -> None:
        if self.backupCount > 0:
            super().doRollover()
            return
        if self.stream:
            self.stream.close()
        self.stream = open(self.baseFilename, "w", encoding=self.encoding)  # noqa: SIM115


def _shared_processors() -> list[Processor]:
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
    ]


def _formatter(renderer: Processor) -> structlog.stdlib.ProcessorFormatter:
    return structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*_shared_processors(), _uvicorn_access_fields],
        pass_foreign_args=True,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            # Last before rendering so structlog events and foreign stdlib records
            # (uvicorn, httpx, ...) are both covered, tracebacks included.
            redact_processor,
            renderer,
        ],
    )


def _is_terminal() -> bool:
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):  # replaced or closed stdout
        return False


def _stdout_renderer(fmt: str, json_renderer: Processor) -> Processor:
    """A person at a terminal reads text (coloured, keys aligned); launchd, systemd, pipes
    and files get JSON lines for machines. An explicit `[log] format` wins."""
    terminal = _is_terminal()
    if fmt == "console" or (fmt == "auto" and terminal):
        return structlog.dev.ConsoleRenderer(colors=terminal)
    return json_renderer


def configure_logging(log: LogSettings) -> None:
    """Install the handlers and structlog configuration described by `[log]`."""
    level = getattr(logging, log.level.upper())
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, _OWNED, False):
            root.removeHandler(handler)
            handler.close()

    json_renderer: Processor = structlog.processors.JSONRenderer()
    stdout_renderer = _stdout_renderer(log.format, json_renderer)
    handlers: list[logging.Handler] = [_StdoutHandler()]
    handlers[0].setFormatter(_formatter(stdout_renderer))
    if log.file is not None:
        path = Path(log.file).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        file_handler = _RotatingFileHandler(
            path, maxBytes=log.max_bytes, backupCount=log.backups, encoding="utf-8"
        )
        file_handler.setFormatter(_formatter(json_renderer))  # files are for machines
        handlers.append(file_handler)
    for handler in handlers:
        setattr(handler, _OWNED, True)
        root.addHandler(handler)
    root.setLevel(level)

    # uvicorn installs its own handlers when given a log_config; serve passes log_config=None,
    # and any leftovers are dropped here so its records reach the root handlers exactly once.
    for name in _UVICORN_LOGGERS:
        uv_logger = logging.getLogger(name)
        uv_logger.handlers.clear()
        uv_logger.propagate = True
        uv_logger.setLevel(logging.NOTSET)

    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *_shared_processors(),
            structlog.stdlib.PositionalArgumentsFormatter(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        # Not cached: reconfiguring (tests, `serve` after CLI parsing) must reach loggers that
        # modules created at import time.
        cache_logger_on_first_use=False,
    )
