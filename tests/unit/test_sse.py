from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

from app.api.sse import ANTHROPIC_HEARTBEAT, DONE, OPENAI_HEARTBEAT, sse_data, with_heartbeats


def test_framing() -> None:
    assert sse_data({"a": 1, "b": "x\ny"}) == b'data: {"a":1,"b":"x\\ny"}\n\n'
    framed = sse_data({"type": "message_start"}, event="message_start")
    assert framed == b'event: message_start\ndata: {"type":"message_start"}\n\n'
    assert DONE == b"data: [DONE]\n\n"
    # An OpenAI heartbeat is a comment; an Anthropic one is an event with data.
    assert OPENAI_HEARTBEAT.startswith(b":")
    lines = ANTHROPIC_HEARTBEAT.decode().splitlines()
    assert lines[0] == "event: ping" and json.loads(lines[1][6:]) == {"type": "ping"}


async def test_heartbeats_fill_silence_and_stop_with_source() -> None:
    async def slow() -> AsyncIterator[bytes]:
        yield b"first"
        await asyncio.sleep(0.35)
        yield b"second"

    out = [chunk async for chunk in with_heartbeats(slow(), 0.1)]
    assert out[0] == b"first" and out[-1] == b"second"
    assert out[1:-1] and set(out[1:-1]) == {OPENAI_HEARTBEAT}


async def test_closing_the_wrapper_closes_the_source() -> None:
    closed = asyncio.Event()

    async def endless() -> AsyncIterator[bytes]:
        try:
            while True:
                yield b"x"
                await asyncio.sleep(0)
        finally:
            closed.set()

    wrapper = with_heartbeats(endless(), 1.0)
    assert await wrapper.__anext__() == b"x"
    await wrapper.aclose()  # type: ignore[attr-defined]
    assert closed.is_set()
