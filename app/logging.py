"""structlog setup: JSON lines to stdout (launchd and systemd capture it)."""

from __future__ import annotations

import logging
import sys

import structlog

from app.settings import LogSettings


def configure_logging(log: LogSettings) -> None:
    level = getattr(logging, log.level.upper())
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if log.format == "json"
        else structlog.dev.ConsoleRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(sys.stdout),
        cache_logger_on_first_use=False,
    )
