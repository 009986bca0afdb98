"""POST /v1/completions (legacy text completions; LlamaIndex's OpenAILike calls it by default)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from app.api.openai.logprobs import completion_logprobs
from app.api.openai.schema import CompletionRequest
from app.api.openai.stream import CompletionFlow, respond
from app.core.types import Finish, GenerationRequest, TokenLogprob
from app.engine.engine import GenerationStream

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
    echo = prompt if body.echo else ""

    async def whole(stream: GenerationStream) -> tuple[dict[str, Any], Finish]:
        text, finish = await stream.collect()
        return {"index": 0, "text": echo + text,
                "logprobs": completion_logprobs(stream.logprobs)
                if body.logprobs is not None else None,
                "finish_reason": finish.reason}, finish

    flow = CompletionFlow(
        id_prefix="cmpl-", object="text_completion", chunk_object="text_completion",
        choice=_text_choice, whole=whole,
        prelude=[_text_choice(echo, None)] if echo else [],
        logprobs=_StreamedOffsets() if body.logprobs is not None else None)
    return await respond(request, generation, flow, streaming=body.stream,
                         include_usage=body.include_usage)


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
