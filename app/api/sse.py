"""Server-sent events: framing, the heartbeat lines, and [DONE]."""

from __future__ import annotations

import json
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
