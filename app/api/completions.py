"""POST /v1/completions (legacy text completions; LlamaIndex's OpenAILike calls it by default)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from app.api.chat import usage_body
from app.api.common import (
    EventStreamResponse,
    new_id,
    owner_of,
    record_finish,
    submit,
    until_disconnected,
)
from app.api.openai_schema import CompletionRequest
from app.api.sse import DONE, sse_data
from app.core.types import Failed, Finish, GenerationRequest, TextDelta
from app.engine.service import GenerationStream, gateway_error

router = APIRouter()


@router.post("/v1/completions", response_model=None)
async def completions(body: CompletionRequest, request: Request) -> Response:
    prompt = body.prompt_text()
    generation = GenerationRequest(
        model=body.model,
        request_id=request.state.request_id,
        prompt=prompt,
        max_tokens=body.max_tokens,
        sampling=body.sampling(),
        stop=body.stop_list(),
        owner=owner_of(request),
    )
    stream = await submit(request, generation)
    completion_id, created = new_id("cmpl-"), int(time.time())
    echo = prompt if body.echo else ""
    if body.stream:
        return EventStreamResponse(
            _chunks(request, stream, completion_id, created, body.include_usage, echo),
            heartbeat_seconds=request.app.state.settings.server.heartbeat_seconds,
        )
    text, finish = await until_disconnected(request, stream.collect(), stream.aclose)
    await record_finish(request, stream, finish)
    return JSONResponse({
        "id": completion_id,
        "object": "text_completion",
        "created": created,
        "model": stream.model,
        "system_fingerprint": None,
        "choices": [{"index": 0, "text": echo + text, "logprobs": None,
                     "finish_reason": finish.reason}],
        "usage": usage_body(finish.usage),
    })


async def _chunks(request: Request, stream: GenerationStream, completion_id: str, created: int,
                  include_usage: bool, echo: str) -> AsyncIterator[bytes]:
    def chunk(text: str, finish_reason: str | None = None) -> bytes:
        payload: dict[str, Any] = {
            "id": completion_id, "object": "text_completion", "created": created,
            "model": stream.model, "system_fingerprint": None,
            "choices": [{"index": 0, "text": text, "logprobs": None,
                         "finish_reason": finish_reason}],
        }
        if include_usage:
            payload["usage"] = None
        return sse_data(payload)

    try:
        if echo:
            yield chunk(echo)
        async for event in stream:
            if isinstance(event, TextDelta):
                yield chunk(event.text)
            elif isinstance(event, Finish):
                await record_finish(request, stream, event)
                yield chunk("", event.reason)
                if include_usage:
                    yield sse_data({
                        "id": completion_id, "object": "text_completion", "created": created,
                        "model": stream.model, "choices": [], "usage": usage_body(event.usage),
                    })
                yield DONE
            elif isinstance(event, Failed):
                yield sse_data(gateway_error(event.error).openai_body())
    finally:
        await stream.aclose()
