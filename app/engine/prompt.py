"""Requests -> prompt token ids, with the model's own chat template."""

from __future__ import annotations

import json
from typing import Any

from app.core.types import ChatMessage, GenerationRequest
from app.errors import InvalidRequest


def _template_message(message: ChatMessage) -> dict[str, Any]:
    # Most chat templates know no `developer` role; it means the same as `system` to them.
    role = "system" if message.role == "developer" else message.role
    out: dict[str, Any] = {"role": role, "content": message.content}
    if message.tool_calls:
        out["tool_calls"] = [
            {"id": call.id, "type": "function",
             "function": {"name": call.name, "arguments": json.loads(call.arguments or "{}")}}
            for call in message.tool_calls
        ]
    if message.tool_call_id:
        out["tool_call_id"] = message.tool_call_id
    if message.name:
        out["name"] = message.name
    return out


def prompt_tokens(tokenizer: Any, request: GenerationRequest) -> list[int]:
    """Token ids for the request. Runs off the event loop and off the MLX thread."""
    if request.prompt is not None:
        ids = list(tokenizer.encode(request.prompt))
    else:
        messages = [_template_message(m) for m in request.messages or []]
        if not getattr(tokenizer, "has_chat_template", False):
            raise InvalidRequest(
                f"model {request.model!r} has no chat template; use /v1/completions",
                param="messages",
            )
        tools = [
            {"type": "function", "function": {"name": t.name, "description": t.description,
                                              "parameters": t.parameters}}
            for t in request.tools
        ] or None
        text = tokenizer.apply_chat_template(
            messages, tools=tools, add_generation_prompt=True, tokenize=False
        )
        ids = list(tokenizer.encode(text, add_special_tokens=False))
    if not ids:
        raise InvalidRequest("the prompt is empty", param="prompt")
    return ids
