"""POST /v1/chat/completions in the OpenAI wire format, stream and non-stream."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from app.api.common import check_message_count
from app.api.openai.logprobs import chat_logprobs
from app.api.openai.schema import ChatCompletionRequest
from app.api.openai.stream import CompletionFlow, chat_deltas, respond
from app.core.types import Finish, GenerationRequest
from app.engine.engine import GenerationStream

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

    async def whole(stream: GenerationStream) -> tuple[dict[str, Any], Finish]:
        output = await stream.collect_output()
        message: dict[str, Any] = {"role": "assistant",
                                   "content": output.text or None if output.calls
                                   else output.text,
                                   "refusal": None}
        if output.reasoning:
            message["reasoning_content"] = output.reasoning
        if output.calls:
            message["tool_calls"] = [
                {"id": call.id, "type": "function",
                 "function": {"name": call.name, "arguments": call.arguments}}
                for call in output.calls
            ]
        return {"index": 0, "message": message,
                "logprobs": chat_logprobs(stream.logprobs) if body.logprobs else None,
                "finish_reason": output.finish.reason}, output.finish

    flow = CompletionFlow(
        id_prefix="chatcmpl-", object="chat.completion", chunk_object="chat.completion.chunk",
        choice=_delta, whole=whole,
        # `role` only in the first delta: repeating it makes SDK mergers write
        # "assistantassistant".
        prelude=[{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                  "finish_reason": None}],
        render=chat_deltas, logprobs=chat_logprobs if body.logprobs else None)
    return await respond(request, generation, flow, streaming=body.stream,
                         include_usage=body.include_usage)


def _delta(text: str | None, finish_reason: str | None) -> dict[str, Any]:
    return {"index": 0, "delta": {"content": text} if text is not None else {},
            "logprobs": None, "finish_reason": finish_reason}
