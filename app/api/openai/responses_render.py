"""Internal generation events -> the Responses API object and its stream events.

Pure: no I/O. One `ResponseRenderer` per response turns TextDelta / ToolCallDelta / Finish /
Failed into the exact event sequence the OpenAI SDK's stream accumulator checks (it raises on
a content event before its item, on an item whose id changes, on a missing `completed`), and
keeps the snapshot that non-stream callers and the store receive.
"""

from __future__ import annotations

import copy
import time
from typing import Any

from app.api.common import new_id
from app.api.openai.logprobs import chat_entries
from app.api.openai.responses_schema import ResponsesRequest
from app.core.types import (
    Failed,
    Finish,
    GenerationEvent,
    LogprobsDelta,
    ReasoningDelta,
    TextDelta,
    TokenLogprob,
    ToolCallDelta,
    Usage,
)
from app.errors import GatewayError, InvalidRequest, RateLimited


def response_usage(usage: Usage) -> dict[str, Any]:
    return {
        "input_tokens": usage.prompt_tokens,
        # cache_write_tokens: newer SDKs require it; nothing is written to a paid cache here.
        "input_tokens_details": {"cached_tokens": usage.cached_tokens, "cache_write_tokens": 0},
        "output_tokens": usage.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
        "total_tokens": usage.total_tokens,
    }


def request_echo(req: ResponsesRequest) -> dict[str, Any]:
    """The response keys that repeat what the request asked for (null where allowed)."""
    text: dict[str, Any] = {"format": req.text.format.echo(),
                            "verbosity": req.text.verbosity or "medium"}
    return {
        "instructions": req.instructions,
        "max_output_tokens": req.max_output_tokens,
        "max_tool_calls": req.max_tool_calls,
        "parallel_tool_calls": req.parallel_tool_calls,
        "previous_response_id": req.previous_response_id,
        "reasoning": {"effort": (req.reasoning or {}).get("effort"),
                      "summary": (req.reasoning or {}).get("summary")},
        "store": req.store,
        "temperature": 1.0 if req.temperature is None else req.temperature,
        "text": text,
        "tool_choice": req.tool_choice_echo(),
        "tools": [tool.echo() for tool in req.tools],
        "top_p": 1.0 if req.top_p is None else req.top_p,
        "top_logprobs": req.top_logprobs or 0,
        "truncation": req.truncation,
        "user": req.user,
        "metadata": dict(req.metadata or {}),
    }


def page_items(items: list[dict[str, Any]], *, after: str | None, limit: int,
               order: str) -> dict[str, Any]:
    """A cursor page: `has_more: false` on the last one, or the SDK paginates forever."""
    ordered = items if order == "asc" else list(reversed(items))
    start = 0
    if after is not None:
        ids = [item.get("id") for item in ordered]
        if after not in ids:
            raise InvalidRequest(f"no input item with id '{after}' in this response",
                                 param="after")
        start = ids.index(after) + 1
    page = ordered[start:start + limit]
    return {
        "object": "list",
        "data": page,
        "first_id": page[0]["id"] if page else None,
        "last_id": page[-1]["id"] if page else None,
        "has_more": start + limit < len(ordered),
    }


def error_code(error: GatewayError) -> str:
    # The SDK types ResponseError.code as a closed set; map onto its nearest members.
    if isinstance(error, RateLimited):
        return "rate_limit_exceeded"
    if isinstance(error, InvalidRequest):
        return "invalid_prompt"
    return "server_error"


class ResponseRenderer:
    def __init__(self, *, response_id: str, model: str, echo: dict[str, Any],
                 extra: dict[str, Any] | None = None, created_at: int | None = None) -> None:
        self.id = response_id
        self.model = model
        self.created_at = int(time.time()) if created_at is None else created_at
        self.echo = echo
        self.extra = dict(extra or {})
        self.output: list[dict[str, Any]] = []
        self.status = "in_progress"
        self.error: dict[str, Any] | None = None
        self.incomplete_details: dict[str, Any] | None = None
        self.usage: dict[str, Any] | None = None
        self.completed_at: int | None = None
        self._seq = 0
        self._open: dict[str, Any] | None = None  # the output item still receiving deltas
        self._calls: dict[int, dict[str, Any]] = {}  # engine tool-call index -> its item
        self._logprobs: list[TokenLogprob] = []  # waiting for the text they belong to

    # --- the object ---------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "completed_at": self.completed_at,
            "status": self.status,
            "error": self.error,
            "incomplete_details": self.incomplete_details,
            "model": self.model,
            "output": copy.deepcopy(self.output),
            "usage": self.usage,
            "background": False,
            "service_tier": "default",
            "safety_identifier": None,
            "prompt_cache_key": None,
            **self.echo,
            **self.extra,
        }

    @property
    def finished(self) -> bool:
        return self.status != "in_progress"

    # --- events -------------------------------------------------------------------------------

    def _event(self, kind: str, **fields: Any) -> dict[str, Any]:
        event = {"type": kind, "sequence_number": self._seq, **fields}
        self._seq += 1
        return event

    def _lifecycle(self, kind: str) -> dict[str, Any]:
        return self._event(kind, response=self.snapshot())

    def start(self) -> list[dict[str, Any]]:
        return [self._lifecycle("response.created"), self._lifecycle("response.in_progress")]

    def keepalive(self) -> dict[str, Any]:
        """A repeated `response.in_progress` while the prompt prefills: Codex resets its idle
        timer on events, not on `:` comment lines."""
        return self._lifecycle("response.in_progress")

    def feed(self, event: GenerationEvent) -> list[dict[str, Any]]:
        if self.finished:
            return []
        if isinstance(event, TextDelta):
            return self._text(event.text)
        if isinstance(event, LogprobsDelta):  # they ride on the text that follows them
            self._logprobs.extend(event.tokens)
            return []
        if isinstance(event, ReasoningDelta):
            return self._reasoning(event.text)
        if isinstance(event, ToolCallDelta):
            return self._tool_call(event)
        if isinstance(event, Finish):
            return self._finish(event)
        if isinstance(event, Failed):
            error = event.error
            return self.fail(error if isinstance(error, GatewayError)
                             else GatewayError(f"internal error: {type(error).__name__}"))
        return []

    def fail(self, error: GatewayError) -> list[dict[str, Any]]:
        if self.finished:
            return []
        events = self._close("incomplete")
        self.status = "failed"
        self.error = {"code": error_code(error), "message": error.message}
        return [*events, self._lifecycle("response.failed")]

    def _text(self, text: str) -> list[dict[str, Any]]:
        if not text:
            return []
        events: list[dict[str, Any]] = []
        if self._open is None or self._open["type"] != "message":
            events += self._close("completed")
            events += self._open_message()
        assert self._open is not None
        part = self._open["content"][0]
        part["text"] += text
        logprobs = self._take_logprobs()
        part["logprobs"] += logprobs
        events.append(self._event(
            "response.output_text.delta", item_id=self._open["id"],
            output_index=self._index(), content_index=0, delta=text, logprobs=logprobs))
        return events

    def _take_logprobs(self) -> list[dict[str, Any]]:
        tokens, self._logprobs = self._logprobs, []
        return chat_entries(tokens)

    def _reasoning(self, text: str) -> list[dict[str, Any]]:
        if not text:
            return []
        events: list[dict[str, Any]] = []
        if self._open is None or self._open["type"] != "reasoning":
            events += self._close("completed")
            item: dict[str, Any] = {"id": new_id("rs_"), "type": "reasoning",
                                    "status": "in_progress", "summary": [], "content": [],
                                    "encrypted_content": None}
            self.output.append(item)
            self._open = item
            events.append(self._event("response.output_item.added", output_index=self._index(),
                                      item=copy.deepcopy(item)))
            part = {"type": "reasoning_text", "text": ""}
            item["content"].append(part)
            events.append(self._event("response.content_part.added", item_id=item["id"],
                                      output_index=self._index(), content_index=0,
                                      part=copy.deepcopy(part)))
        assert self._open is not None
        self._open["content"][0]["text"] += text
        events.append(self._event("response.reasoning_text.delta", item_id=self._open["id"],
                                  output_index=self._index(), content_index=0, delta=text))
        return events

    def _open_message(self) -> list[dict[str, Any]]:
        item: dict[str, Any] = {"id": new_id("msg_"), "type": "message", "status": "in_progress",
                                "role": "assistant", "content": []}
        self.output.append(item)
        self._open = item
        added = self._event("response.output_item.added", output_index=self._index(),
                            item=copy.deepcopy(item))
        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        item["content"].append(part)
        part_added = self._event("response.content_part.added", item_id=item["id"],
                                 output_index=self._index(), content_index=0,
                                 part=copy.deepcopy(part))
        return [added, part_added]

    def _tool_call(self, delta: ToolCallDelta) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        item = self._calls.get(delta.index)
        if item is None:
            events += self._close("completed")
            item = {"id": new_id("fc_"), "type": "function_call", "status": "in_progress",
                    "call_id": delta.id or new_id("call_"), "name": delta.name or "",
                    "arguments": ""}
            self._calls[delta.index] = item
            self.output.append(item)
            self._open = item
            events.append(self._event("response.output_item.added", output_index=self._index(),
                                      item=copy.deepcopy(item)))
        item["arguments"] += delta.arguments
        if delta.arguments and item is self._open:
            events.append(self._event("response.function_call_arguments.delta",
                                      item_id=item["id"], output_index=self._index(),
                                      delta=delta.arguments))
        return events

    def _index(self) -> int:
        return next(i for i, item in enumerate(self.output) if item is self._open)

    def _close(self, status: str) -> list[dict[str, Any]]:
        item = self._open
        if item is None:
            return []
        index = self._index()
        events: list[dict[str, Any]] = []
        item["status"] = status
        if item["type"] == "reasoning":
            part = item["content"][0]
            events.append(self._event("response.reasoning_text.done", item_id=item["id"],
                                      output_index=index, content_index=0, text=part["text"]))
            events.append(self._event("response.content_part.done", item_id=item["id"],
                                      output_index=index, content_index=0,
                                      part=copy.deepcopy(part)))
        elif item["type"] == "message":
            part = item["content"][0]
            part["logprobs"] += self._take_logprobs()
            events.append(self._event("response.output_text.done", item_id=item["id"],
                                      output_index=index, content_index=0, text=part["text"],
                                      logprobs=copy.deepcopy(part["logprobs"])))
            events.append(self._event("response.content_part.done", item_id=item["id"],
                                      output_index=index, content_index=0,
                                      part=copy.deepcopy(part)))
        else:
            events.append(self._event("response.function_call_arguments.done",
                                      item_id=item["id"], output_index=index,
                                      arguments=item["arguments"]))
        events.append(self._event("response.output_item.done", output_index=index,
                                  item=copy.deepcopy(item)))
        self._open = None
        return events

    def _finish(self, finish: Finish) -> list[dict[str, Any]]:
        if finish.reason == "error":
            return self.fail(GatewayError("generation failed"))
        truncated = finish.reason == "length"
        events: list[dict[str, Any]] = []
        if not any(item["type"] != "reasoning" for item in self.output):
            # clients expect one message even when nothing (or only reasoning) was generated
            events += self._open_message()
        events += self._close("incomplete" if truncated else "completed")
        self.usage = response_usage(finish.usage)
        self.completed_at = int(time.time())
        if truncated:
            self.status = "incomplete"
            self.incomplete_details = {"reason": "max_output_tokens"}
            return [*events, self._lifecycle("response.incomplete")]
        if finish.reason == "cancelled":
            self.status = "incomplete"
            return [*events, self._lifecycle("response.incomplete")]
        self.status = "completed"
        return [*events, self._lifecycle("response.completed")]
