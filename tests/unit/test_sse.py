from __future__ import annotations

import asyncio
import json

from app.api.sse import ANTHROPIC_HEARTBEAT, DONE, OPENAI_HEARTBEAT, sse_data
from app.core.types import Finish, TextDelta, Usage
from app.engine.engine import GenerationStream, _Hold


def test_framing() -> None:
    assert sse_data({"a": 1, "b": "x\ny"}) == b'data: {"a":1,"b":"x\\ny"}\n\n'
    framed = sse_data({"type": "message_start"}, event="message_start")
    assert framed == b'event: message_start\ndata: {"type":"message_start"}\n\n'
    assert DONE == b"data: [DONE]\n\n"
    # An OpenAI heartbeat is a comment; an Anthropic one is an event with data.
    assert OPENAI_HEARTBEAT.startswith(b":")
    lines = ANTHROPIC_HEARTBEAT.decode().splitlines()
    assert lines[0] == "event: ping" and json.loads(lines[1][6:]) == {"type": "ping"}


class _Door:
    """Stands in for the engine's give-back hook: records how the stream ended."""

    def __init__(self) -> None:
        self.outcomes: list[object] = []

    def give_back(self, hold: object, outcome: object) -> None:
        self.outcomes.append(outcome)


def _stream(door: _Door) -> GenerationStream:
    return GenerationStream("m", None, _Hold(None, door.give_back),  # type: ignore[arg-type]
                            wake=lambda: None)


async def test_stream_batches_fill_silence_with_heartbeats_and_end_with_the_finish() -> None:
    door = _Door()
    stream = _stream(door)
    finish = Finish("stop", Usage(prompt_tokens=3, completion_tokens=2))
    stream.deliver([TextDelta("first")])
    asyncio.get_running_loop().call_later(0.35, stream.deliver, [TextDelta("second"), finish])

    out = [batch async for batch in stream.batches(0.1)]
    assert out[0] == [TextDelta("first")] and out[-1] == [TextDelta("second"), finish]
    assert out[1:-1] and all(batch == [] for batch in out[1:-1])  # heartbeats, nothing else
    assert door.outcomes == [finish] and stream.first_token_at is not None


async def test_slot_and_lease_are_given_back_when_the_engine_finishes_not_when_read() -> None:
    """A client that stops reading must not keep its slot (issue 13, item 6)."""
    door = _Door()
    stream = _stream(door)
    finish = Finish("stop", Usage(prompt_tokens=3, completion_tokens=2))
    stream.deliver([TextDelta("unread"), finish])
    assert door.outcomes == [finish]  # released with nobody reading
    out = [batch async for batch in stream.batches(0.1)]
    assert out == [[TextDelta("unread"), finish]]  # the reader still gets everything
    await stream.aclose()
    assert door.outcomes == [finish]  # once
