"""POST /v1/chat/completions in the OpenAI wire format, stream and non-stream."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from app.api.common import (
    EventStreamResponse,
    check_message_count,
    new_id,
    record_finish,
    submit,
    until_disconnected,
)
from app.api.openai.logprobs import chat_logprobs
from app.api.openai.schema import ChatCompletionRequest
from app.api.openai.stream import chat_deltas, openai_chunks, usage_body
from app.core.types import GenerationRequest

router = APIRouter()


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    check_message_count(request, len(body.messages), "messages")
    generation = GenerationRequest(
        model=body.model,
        request_id=request.state.request_id,
        messages=body.internal_messages(),
        max_tokens=body.token_limit(),
        sampling=body.sampling(),
        stop=body.stop_list(),
        tools=body.tool_specs(),
        tool_choice=body.tool_choice_internal(),
        template_kwargs=body.template_kwargs(),
        constraint=body.constraint(),
        logprobs=body.logprobs_count(),
    )
    stream = await submit(request, generation)
    completion_id, created = new_id("chatcmpl-"), int(time.time())
    if body.stream:
        envelope = {"id": completion_id, "object": "chat.completion.chunk", "created": created,
                    "model": stream.model, "system_fingerprint": None}
        # `role` only in the first delta: repeating it makes SDK mergers write
        # "assistantassistant".
        first = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                 "finish_reason": None}
        heartbeat = request.app.state.settings.server.heartbeat_seconds
        return EventStreamResponse(
            openai_chunks(request, stream, envelope, _delta, include_usage=body.include_usage,
                          prelude=[first], heartbeat=heartbeat, render=chat_deltas,
                          logprobs=chat_logprobs if body.logprobs else None))
    output = await until_disconnected(request, stream.collect_output(), stream.aclose)
    finish = output.finish
    await record_finish(request, stream, finish)
    message: dict[str, Any] = {"role": "assistant", "content": output.text or None,
                               "refusal": None}
    if not output.calls:
        message["content"] = output.text
    if output.reasoning:
        message["reasoning_content"] = output.reasoning
    if output.calls:
        message["tool_calls"] = [
            {"id": call.id, "type": "function",
             "function": {"name": call.name, "arguments": call.arguments}}
            for call in output.calls
        ]
    return JSONResponse({
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": stream.model,
        "system_fingerprint": None,
        "choices": [{
            "index": 0,
            "message": message,
            "logprobs": chat_logprobs(stream.logprobs) if body.logprobs else None,
            "finish_reason": finish.reason,
        }],
        "usage": usage_body(finish.usage),
    })


def _delta(text: str | None, finish_reason: str | None) -> dict[str, Any]:
    return {"index": 0, "delta": {"content": text} if text is not None else {},
            "logprobs": None, "finish_reason": finish_reason}
