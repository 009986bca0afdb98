"""Server-sent events: framing, heartbeats while the engine is quiet, and [DONE]."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

OPENAI_HEARTBEAT = b": ping\n\n"
# An `event:` line without `data:` crashes the OpenAI SDK; Anthropic clients expect a ping event.
ANTHROPIC_HEARTBEAT = b'event: ping\ndata: {"type": "ping"}\n\n'
DONE = b"data: [DONE]\n\n"

SSE_HEADERS = {
    "Cache-Control": "no-cache",
    "Connection": "keep-alive",
    "X-Accel-Buffering": "no",  # nginx and friends: don't buffer the stream
}


def sse_data(payload: dict[str, Any] | str, event: str | None = None) -> bytes:
    """One SSE message. JSON payloads are compact and single-line by construction."""
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {data}\n\n".encode()


async def with_heartbeats(
    source: AsyncIterator[bytes], interval: float, heartbeat: bytes = OPENAI_HEARTBEAT
) -> AsyncIterator[bytes]:
    """Yield from `source`, inserting `heartbeat` whenever it is silent for `interval` seconds.

    Long prefills and queue waits would otherwise look like a dead connection to proxies.
    """
    iterator = source.__aiter__()
    pending: asyncio.Task[bytes] | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(iterator.__anext__())
            done, _ = await asyncio.wait({pending}, timeout=interval)
            if not done:
                yield heartbeat
                continue
            try:
                chunk = pending.result()
            except StopAsyncIteration:
                return
            finally:
                pending = None
            yield chunk
    finally:
        if pending is not None:
            pending.cancel()
            with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                await pending
        aclose = getattr(iterator, "aclose", None)
        if aclose is not None:
            await aclose()
