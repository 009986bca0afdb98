"""uvicorn, taught to drain: on SIGTERM answer /ready with 503 for `[server] unready_delay`
seconds while still serving (a load balancer's health check moves new traffic away), then stop
accepting, let streams finish for `[server] shutdown_grace` seconds, end the rest with an error
event and exit 0."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType

import structlog
import uvicorn
from fastapi import FastAPI

from app.engine.engine import Engine

log = structlog.get_logger(__name__)
DRAINING_MESSAGE = "The server is shutting down; retry shortly."


class DrainingServer(uvicorn.Server):
    def __init__(self, app: FastAPI, *, host: str, port: int, grace: float,
                 unready_delay: float = 0.0) -> None:
        # uvicorn's own deadline comes after ours, so streams end with our error event
        # rather than a cut connection. proxy_headers off: uvicorn would otherwise rewrite the
        # client address from X-Forwarded-For (trusting 127.0.0.1) before our code runs, and
        # `[server] trusted_proxies` would be ignored. The auth middleware decides it alone.
        super().__init__(uvicorn.Config(
            app, host=host, port=port, log_config=None, access_log=False,
            timeout_graceful_shutdown=int(grace) + 5, proxy_headers=False,
        ))
        self.engine: Engine = app.state.engine
        self.app_state = app.state
        self.grace = grace
        self.unready_delay = unready_delay
        self._unready = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._draining = False

    async def serve(self, sockets: list[object] | None = None) -> None:  # type: ignore[override]
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)  # type: ignore[arg-type]

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """Like uvicorn's, minus re-raising the signal afterwards: a drained shutdown exits 0,
        which launchd's KeepAlive and systemd's Restart=on-failure read as deliberate."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit)
                    for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.unready_delay > 0 and not self._unready and self._loop is not None:
            # First signal: only stop looking ready. The listener stays open, so a request a
            # balancer sends before its next health check is still served, not refused.
            self._unready = True
            self.app_state.draining = True
            log.info("shutting down: /ready answers 503 before draining",
                     unready_seconds=self.unready_delay)
            self._loop.call_soon_threadsafe(
                self._loop.call_later, self.unready_delay, self._after_unready, sig)
            return
        self._begin_drain(sig, frame)  # no delay, or a second signal: drain now

    def _after_unready(self, sig: int) -> None:
        if not self._draining:  # a second signal may have started the drain already
            self._begin_drain(sig, None)

    def _begin_drain(self, sig: int, frame: FrameType | None) -> None:
        self.app_state.draining = True
        super().handle_exit(sig, frame)
        if not self._draining and self._loop is not None:
            self._draining = True
            log.info("shutting down: draining in-flight streams", grace_seconds=self.grace)
            self._loop.call_soon_threadsafe(self._stop_admitting)
            self._loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self._drain()))

    def _stop_admitting(self) -> None:
        """Queued requests (and any that still arrive on open connections) get 503 with
        Retry-After: a generation started now would only be cut off when the grace ends."""
        if self.engine.admission is not None:
            self.engine.admission.close(DRAINING_MESSAGE, retry_after=max(5.0, self.grace))

    async def _drain(self) -> None:
        await asyncio.sleep(self.grace)
        log.warning("shutdown grace over: ending the remaining streams")
        await self.engine.end_all_streams(DRAINING_MESSAGE)
