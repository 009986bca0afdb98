"""POST /v1/completions (legacy text completions; LlamaIndex's OpenAILike calls it by default)."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from app.api.common import (
    EventStreamResponse,
    new_id,
    record_finish,
    submit,
    until_disconnected,
)
from app.api.openai.logprobs import completion_logprobs
from app.api.openai.schema import CompletionRequest
from app.api.openai.stream import openai_chunks, usage_body
from app.core.types import GenerationRequest, TokenLogprob

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
        logprobs=body.logprobs,
    )
    stream = await submit(request, generation)
    completion_id, created = new_id("cmpl-"), int(time.time())
    echo = prompt if body.echo else ""
    if body.stream:
        envelope = {"id": completion_id, "object": "text_completion", "created": created,
                    "model": stream.model, "system_fingerprint": None}
        heartbeat = request.app.state.settings.server.heartbeat_seconds
        return EventStreamResponse(
            openai_chunks(request, stream, envelope, _text_choice,
                          include_usage=body.include_usage,
                          prelude=[_text_choice(echo, None)] if echo else [],
                          heartbeat=heartbeat,
                          logprobs=_StreamedOffsets() if body.logprobs is not None else None))
    text, finish = await until_disconnected(request, stream.collect(), stream.aclose)
    await record_finish(request, stream, finish)
    return JSONResponse({
        "id": completion_id,
        "object": "text_completion",
        "created": created,
        "model": stream.model,
        "system_fingerprint": None,
        "choices": [{"index": 0, "text": echo + text,
                     "logprobs": completion_logprobs(stream.logprobs)
                     if body.logprobs is not None else None,
                     "finish_reason": finish.reason}],
        "usage": usage_body(finish.usage),
    })


def _text_choice(text: str | None, finish_reason: str | None) -> dict[str, Any]:
    return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}


class _StreamedOffsets:
    """Legacy logprobs per chunk, with text offsets counted across the whole stream."""

    def __init__(self) -> None:
        self.offset = 0

    def __call__(self, tokens: list[TokenLogprob]) -> dict[str, Any]:
        body = completion_logprobs(tokens, self.offset)
        self.offset += sum(len(t.token) for t in tokens)
        return body
