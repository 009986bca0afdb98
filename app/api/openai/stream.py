"""The flow chat and text completions share: submit, then either the streaming loop (events ->
chunks -> [DONE]) or one JSON answer, in the same envelope.

The two routes differ only in their ids and object names, the shape of a choice, what comes
before the first token, and how a whole answer becomes one choice (`CompletionFlow`).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from app.api.common import (
    EventStreamResponse,
    new_id,
    record_finish,
    submit,
    until_disconnected,
)
from app.api.sse import DONE, OPENAI_HEARTBEAT, sse_data
from app.core.types import (
    Failed,
    Finish,
    GenerationEvent,
    GenerationRequest,
    LogprobsDelta,
    ReasoningDelta,
    TextDelta,
    TokenLogprob,
    ToolCallDelta,
    Usage,
)
from app.engine.engine import GenerationStream, gateway_error

# (text or None for the final chunk, finish_reason or None) -> one entry of "choices"
ChoiceFactory = Callable[[str | None, str | None], dict[str, Any]]
# this chunk's tokens -> the choice's "logprobs" value
LogprobsRender = Callable[[list[TokenLogprob]], Any]
# the events of one wake-up (no Finish / Failed) -> the "choices" entries to send, one a chunk
EventRenderer = Callable[[list[GenerationEvent]], list[dict[str, Any]]]


@dataclass
class CompletionFlow:
    id_prefix: str  # "chatcmpl-" / "cmpl-"
    object: str  # of the whole answer
    chunk_object: str  # of each streamed chunk
    choice: ChoiceFactory
    # the whole answer -> its one choice, and how it finished
    whole: Callable[[GenerationStream], Awaitable[tuple[dict[str, Any], Finish]]]
    prelude: list[dict[str, Any]] = field(default_factory=list)
    render: EventRenderer | None = None
    logprobs: LogprobsRender | None = None


async def respond(request: Request, generation: GenerationRequest, flow: CompletionFlow, *,
                  streaming: bool, include_usage: bool) -> Response:
    stream = await submit(request, generation)
    envelope = {"id": new_id(flow.id_prefix), "object": flow.object, "created": int(time.time()),
                "model": stream.model, "system_fingerprint": None}
    if streaming:
        heartbeat = request.app.state.settings.server.heartbeat_seconds
        return EventStreamResponse(openai_chunks(
            request, stream, {**envelope, "object": flow.chunk_object}, flow.choice,
            include_usage=include_usage, prelude=flow.prelude, heartbeat=heartbeat,
            render=flow.render, logprobs=flow.logprobs))
    choice, finish = await until_disconnected(request.receive, flow.whole(stream), stream.aclose)
    await record_finish(request, stream, finish)
    return JSONResponse({**envelope, "choices": [choice], "usage": completion_usage(finish.usage)})


def chat_deltas(events: list[GenerationEvent]) -> list[dict[str, Any]]:
    """Chat chunk deltas in event order: content, `reasoning_content` and tool-call deltas
    (index, id, type and name in the first delta of a call; argument fragments after)."""
    deltas: list[dict[str, Any]] = []
    for event in events:
        last = deltas[-1] if deltas else None
        if isinstance(event, TextDelta):
            if last is not None and set(last) == {"content"}:
                last["content"] += event.text
            else:
                deltas.append({"content": event.text})
        elif isinstance(event, ReasoningDelta):
            if last is not None and set(last) == {"reasoning_content"}:
                last["reasoning_content"] += event.text
            else:
                deltas.append({"reasoning_content": event.text})
        elif isinstance(event, ToolCallDelta):
            entry: dict[str, Any] = {"index": event.index}
            if event.name is not None:
                entry.update(id=event.id, type="function",
                             function={"name": event.name, "arguments": event.arguments})
            else:
                entry["function"] = {"arguments": event.arguments}
            deltas.append({"tool_calls": [entry]})
    return [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}
            for delta in deltas]


def completion_usage(usage: Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
        "completion_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
    }


async def openai_chunks(request: Request, stream: GenerationStream, envelope: dict[str, Any],
                        choice: ChoiceFactory, *, include_usage: bool,
                        prelude: list[dict[str, Any]], heartbeat: float,
                        render: EventRenderer | None = None,
                        logprobs: LogprobsRender | None = None) -> AsyncIterator[bytes]:
    """SSE for one generation: `prelude` choices, a chunk per text delta, one chunk with the
    finish_reason, the usage chunk when asked for, then [DONE]. A failure mid-stream is sent
    as an OpenAI error payload, which the SDKs raise."""

    def chunk(choices: list[dict[str, Any]], usage: Usage | None = None) -> bytes:
        payload = {**envelope, "choices": choices}
        if include_usage:
            payload["usage"] = completion_usage(usage) if usage else None
        return sse_data(payload)

    try:
        for entry in prelude:
            yield chunk([entry])
        async for events in stream.batches(heartbeat):
            if not events:
                yield OPENAI_HEARTBEAT
                continue
            tokens = [t for e in events if isinstance(e, LogprobsDelta) for t in e.tokens]
            if logprobs is None:
                tokens = []
            if render is not None:
                entries = render([e for e in events if not isinstance(e, Finish | Failed)])
            else:
                text = "".join(e.text for e in events if isinstance(e, TextDelta))
                entries = [choice(text, None)] if text else []
            if tokens:
                # This wake-up's log-probabilities ride on its first content entry.
                carrier = next((e for e in entries if "content" in e.get("delta", {})
                                or "text" in e), None)
                if carrier is None:
                    carrier = choice("", None)
                    entries.append(carrier)
                assert logprobs is not None
                carrier["logprobs"] = logprobs(tokens)
            for entry in entries:
                yield chunk([entry])
            for event in events:
                if isinstance(event, Finish):
                    await record_finish(request, stream, event)
                    yield chunk([choice(None, event.reason)])
                    if include_usage:
                        yield chunk([], event.usage)
                    yield DONE
                elif isinstance(event, Failed):
                    yield sse_data(gateway_error(event.error).openai_body())
    finally:
        await stream.aclose()
