"""POST /v1/messages and /v1/messages/count_tokens in the Anthropic wire format.

One `MessageAssembler` turns the engine's events into Anthropic stream events; the non-stream
answer is those same events folded into a message, so the two can never disagree.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from app.api.anthropic.schema import CountTokensRequest, MessagesRequest, resolve_model
from app.api.common import (
    EventStreamResponse,
    authorize,
    check_message_count,
    engine_of,
    new_id,
    record_finish,
    submit,
    until_disconnected,
)
from app.api.sse import ANTHROPIC_HEARTBEAT, sse_data
from app.core.types import (
    Failed,
    Finish,
    GenerationEvent,
    GenerationRequest,
    JsonConstraint,
    ReasoningDelta,
    TextDelta,
    ToolCallConstraint,
    ToolCallDelta,
    Usage,
)
from app.engine.engine import GenerationStream, gateway_error
from app.errors import InvalidRequest

router = APIRouter()

_STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}


def _generation(body: CountTokensRequest, request: Request, **more: Any) -> GenerationRequest:
    check_message_count(request, len(body.messages), "messages")
    registry = request.app.state.registry
    model = resolve_model(body.model, request.app.state.settings.anthropic.models,
                          registry.default_id)
    choice = body.tool_choice
    tool_choice: str | dict[str, Any] | None = None
    if choice is not None:
        if choice.type == "tool":
            tool_choice = {"type": "function", "function": {"name": choice.name or ""}}
        else:
            tool_choice = {"auto": "auto", "any": "required", "none": "none"}[choice.type]
    tools = body.tool_specs()
    constraint = None
    if choice is not None and choice.type in ("any", "tool") and tools:
        # "any" and a named tool force a call: enforced by the call grammar (app/output).
        forced = tuple(t for t in tools if choice.type == "any" or t.name == choice.name)
        if not forced:
            raise InvalidRequest(f"tool_choice names tool {choice.name!r}, which is not in "
                                 "`tools`", param="tool_choice")
        constraint = ToolCallConstraint(tools=forced, forced=True, param="tool_choice",
                                        parallel=not choice.disable_parallel_tool_use)
    return GenerationRequest(
        model=model, request_id=request.state.request_id,
        messages=body.internal_messages(), tools=tools, tool_choice=tool_choice,
        template_kwargs=body.template_kwargs(),
        constraint=constraint, **more,
    )


def message_usage(usage: Usage) -> dict[str, Any]:
    # input_tokens excludes what was read from the prefix cache, as Anthropic counts it.
    return {"input_tokens": usage.prompt_tokens - usage.cached_tokens,
            "output_tokens": usage.completion_tokens,
            "cache_read_input_tokens": usage.cached_tokens,
            "cache_creation_input_tokens": 0}


class MessageAssembler:
    """Engine events -> Anthropic stream events (as dicts), with block indices 0..n-1."""

    def __init__(self, message_id: str, model: str, prompt_tokens: int) -> None:
        self.message_id = message_id
        self.model = model
        self.prompt_tokens = prompt_tokens
        self._index = -1
        self._open: str | None = None  # the type of the block being written
        self._tool_ids: dict[int, int] = {}  # tool call index -> block index
        self._thinking = hashlib.sha256()  # of the open thinking block, for its signature

    def start(self) -> dict[str, Any]:
        return {"type": "message_start", "message": {
            "id": self.message_id, "type": "message", "role": "assistant", "model": self.model,
            "content": [], "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": self.prompt_tokens, "output_tokens": 0,
                      "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0},
        }}

    def feed(self, event: GenerationEvent) -> list[dict[str, Any]]:
        if isinstance(event, TextDelta):
            if not event.text:
                return []
            out = self._open_block("text", {"type": "text", "text": ""})
            out.append(self._delta({"type": "text_delta", "text": event.text}))
            return out
        if isinstance(event, ReasoningDelta):
            if not event.text:
                return []
            out = self._open_block("thinking", {"type": "thinking", "thinking": "",
                                                "signature": ""})
            self._thinking.update(event.text.encode())
            out.append(self._delta({"type": "thinking_delta", "thinking": event.text}))
            return out
        if isinstance(event, ToolCallDelta):
            out = []
            if event.name is not None:  # the first delta of a call opens its block
                out = self._open_block("tool_use", {
                    "type": "tool_use", "id": event.id or new_id("toolu_"), "name": event.name,
                    "input": {}}, force=True)
                self._tool_ids[event.index] = self._index
            if event.arguments:
                out.append(self._delta({"type": "input_json_delta",
                                        "partial_json": event.arguments}))
            return out
        if isinstance(event, Finish):
            out = [] if self._index >= 0 else self._open_block("text", {"type": "text",
                                                                        "text": ""})
            out += self._close_block()
            stop_reason = _STOP_REASONS.get(event.reason, "end_turn")
            if event.stop_sequence is not None:
                stop_reason = "stop_sequence"
            out.append({"type": "message_delta",
                        "delta": {"stop_reason": stop_reason,
                                  "stop_sequence": event.stop_sequence},
                        "usage": message_usage(event.usage)})
            out.append({"type": "message_stop"})
            return out
        if isinstance(event, Failed):
            return [gateway_error(event.error).anthropic_body()]
        return []

    def _open_block(self, kind: str, block: dict[str, Any], *,
                    force: bool = False) -> list[dict[str, Any]]:
        if self._open == kind and not force:
            return []
        out = self._close_block()
        self._index += 1
        self._open = kind
        out.append({"type": "content_block_start", "index": self._index, "content_block": block})
        return out

    def _close_block(self) -> list[dict[str, Any]]:
        if self._open is None:
            return []
        out = []
        if self._open == "thinking":
            # Clients keep a thinking block's signature and send it back; nothing verifies it
            # here (history thinking is dropped), so it only names what was thought.
            signature = "mlxgw-" + self._thinking.hexdigest()[:32]
            self._thinking = hashlib.sha256()
            out.append(self._delta({"type": "signature_delta", "signature": signature}))
        self._open = None
        return [*out, {"type": "content_block_stop", "index": self._index}]

    def _delta(self, delta: dict[str, Any]) -> dict[str, Any]:
        return {"type": "content_block_delta", "index": self._index, "delta": delta}


def fold(events: list[dict[str, Any]]) -> dict[str, Any]:
    """The message a client accumulates from the stream events."""
    message: dict[str, Any] = {}
    partial: dict[int, str] = {}
    for event in events:
        kind = event["type"]
        if kind == "message_start":
            message = dict(event["message"], content=[])
        elif kind == "content_block_start":
            message["content"].append(dict(event["content_block"]))
        elif kind == "content_block_delta":
            block, delta = message["content"][event["index"]], event["delta"]
            if delta["type"] == "text_delta":
                block["text"] += delta["text"]
            elif delta["type"] == "thinking_delta":
                block["thinking"] += delta["thinking"]
            elif delta["type"] == "signature_delta":
                block["signature"] = delta["signature"]
            elif delta["type"] == "input_json_delta":
                partial[event["index"]] = partial.get(event["index"], "") + delta["partial_json"]
        elif kind == "content_block_stop" and event["index"] in partial:
            raw = partial.pop(event["index"])
            message["content"][event["index"]]["input"] = json.loads(raw) if raw else {}
        elif kind == "message_delta":
            message.update(event["delta"])
            message["usage"] = event["usage"]
    return message


@router.post("/v1/messages", response_model=None)
async def messages(body: MessagesRequest, request: Request) -> Response:
    generation = _generation(body, request, max_tokens=body.max_tokens,
                             sampling=body.sampling(), stop=body.stop_list(),
                             reasoning_budget=body.reasoning_budget())
    wanted = body.output_config.format if body.output_config is not None else None
    if wanted is not None:
        if generation.constraint is not None:
            raise InvalidRequest("output_config.format cannot be combined with a tool_choice "
                                 "that forces a tool call", param="output_config.format")
        generation.constraint = JsonConstraint(schema=wanted.schema_,
                                               param="output_config.format.schema")
    stream = await submit(request, generation)
    assembler = MessageAssembler(new_id("msg_"), stream.model, stream.prompt_tokens)
    headers = _dropped_tools_header(body)
    if body.stream:
        heartbeat = request.app.state.settings.server.heartbeat_seconds
        return EventStreamResponse(_sse(request, stream, assembler, heartbeat), headers=headers)
    events = await until_disconnected(request.receive, _collect(request, stream, assembler),
                                      stream.aclose)
    return JSONResponse(fold(events), headers=headers)


async def _collect(request: Request, stream: GenerationStream,
                   assembler: MessageAssembler) -> list[dict[str, Any]]:
    events = [assembler.start()]
    async for event in stream:
        if isinstance(event, Failed):
            raise gateway_error(event.error)
        if isinstance(event, Finish):
            await record_finish(request, stream, event)
        events += assembler.feed(event)
    return events


async def _sse(request: Request, stream: GenerationStream, assembler: MessageAssembler,
               heartbeat: float) -> AsyncIterator[bytes]:
    try:
        yield _frame(assembler.start())
        async for events in stream.batches(heartbeat):
            if not events:
                yield ANTHROPIC_HEARTBEAT
                continue
            for event in _merge_text(events):
                if isinstance(event, Finish):
                    await record_finish(request, stream, event)
                for out in assembler.feed(event):
                    yield _frame(out)
    finally:
        await stream.aclose()


def _merge_text(events: list[GenerationEvent]) -> list[GenerationEvent]:
    """Adjacent text deltas of one wake-up as one delta: fewer frames under load."""
    merged: list[GenerationEvent] = []
    for event in events:
        if isinstance(event, TextDelta) and merged and isinstance(merged[-1], TextDelta):
            merged[-1] = TextDelta(merged[-1].text + event.text)
        else:
            merged.append(event)
    return merged


def _frame(event: dict[str, Any]) -> bytes:
    return sse_data(event, event=event["type"])


def _dropped_tools_header(body: CountTokensRequest) -> dict[str, str]:
    dropped = body.dropped_tools()
    return {"x-mlxgw-dropped-tools": ",".join(dropped)} if dropped else {}


@router.post("/v1/messages/count_tokens")
async def count_tokens(body: CountTokensRequest, request: Request) -> dict[str, int]:
    generation = _generation(body, request)
    authorize(request, generation.model)
    count = await engine_of(request).count_prompt_tokens(generation)
    return {"input_tokens": count}
