"""POST /v1/chat/completions in the OpenAI wire format, stream and non-stream."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from app.api.common import (
    EventStreamResponse,
    new_id,
    owner_of,
    record_finish,
    submit,
    until_disconnected,
)
from app.api.openai_schema import ChatCompletionRequest
from app.api.sse import DONE, sse_data
from app.core.types import Failed, Finish, GenerationRequest, TextDelta, Usage
from app.engine.service import GenerationStream, gateway_error

router = APIRouter()


def usage_body(usage: Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
    }


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    generation = GenerationRequest(
        model=body.model,
        request_id=request.state.request_id,
        messages=body.internal_messages(),
        max_tokens=body.token_limit(),
        sampling=body.sampling(),
        stop=body.stop_list(),
        tools=body.tool_specs(),
        tool_choice=body.tool_choice if isinstance(body.tool_choice, str) else None,
        owner=owner_of(request),
    )
    stream = await submit(request, generation)
    completion_id, created = new_id("chatcmpl-"), int(time.time())
    if body.stream:
        return EventStreamResponse(
            _chunks(request, stream, completion_id, created, body.include_usage),
            heartbeat_seconds=request.app.state.settings.server.heartbeat_seconds,
        )
    text, finish = await until_disconnected(request, stream.collect(), stream.aclose)
    await record_finish(request, stream, finish)
    return JSONResponse({
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": stream.model,
        "system_fingerprint": None,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": text, "refusal": None},
            "logprobs": None,
            "finish_reason": finish.reason,
        }],
        "usage": usage_body(finish.usage),
    })


async def _chunks(request: Request, stream: GenerationStream, completion_id: str, created: int,
                  include_usage: bool) -> AsyncIterator[bytes]:
    def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
        payload: dict[str, Any] = {
            "id": completion_id, "object": "chat.completion.chunk", "created": created,
            "model": stream.model, "system_fingerprint": None,
            "choices": [{"index": 0, "delta": delta, "logprobs": None,
                         "finish_reason": finish_reason}],
        }
        if include_usage:
            payload["usage"] = None
        return sse_data(payload)

    try:
        # `role` only in the first delta: repeating it makes SDK mergers write "assistantassistant".
        yield chunk({"role": "assistant", "content": ""})
        async for event in stream:
            if isinstance(event, TextDelta):
                yield chunk({"content": event.text})
            elif isinstance(event, Finish):
                await record_finish(request, stream, event)
                yield chunk({}, event.reason)
                if include_usage:
                    yield sse_data({
                        "id": completion_id, "object": "chat.completion.chunk",
                        "created": created, "model": stream.model, "system_fingerprint": None,
                        "choices": [], "usage": usage_body(event.usage),
                    })
                yield DONE
            elif isinstance(event, Failed):
                yield sse_data(gateway_error(event.error).openai_body())
    finally:
        await stream.aclose()
