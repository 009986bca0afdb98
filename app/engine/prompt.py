"""Requests -> prompt token ids, with the model's own chat template."""

from __future__ import annotations

import json
from typing import Any

from jinja2.exceptions import TemplateError, TemplateSyntaxError

from app.core.types import ChatMessage, GenerationRequest, ToolCall
from app.errors import InvalidRequest


def _arguments(call: ToolCall, where: str) -> dict[str, Any]:
    """A tool call's arguments as the object chat templates expect; a client that sent
    something else gets a 400 naming the field, not a 500 from inside the template."""
    try:
        value = json.loads(call.arguments or "{}")
    except (ValueError, RecursionError):
        raise InvalidRequest(f"{where}: must be a JSON object encoded as a string, "
                             f"got {call.arguments[:80]!r}", param=where) from None
    if not isinstance(value, dict):
        raise InvalidRequest(f"{where}: must encode a JSON object, not {type(value).__name__}",
                             param=where)
    return value


def _template_message(message: ChatMessage, index: int) -> dict[str, Any]:
    # Most chat templates know no `developer` role; it means the same as `system` to them.
    role = "system" if message.role == "developer" else message.role
    out: dict[str, Any] = {"role": role, "content": message.content}
    if message.tool_calls:
        out["tool_calls"] = [
            {"id": call.id, "type": "function",
             "function": {"name": call.name, "arguments": _arguments(
                 call, f"messages[{index}].tool_calls[{n}].function.arguments")}}
            for n, call in enumerate(message.tool_calls)
        ]
    if message.tool_call_id:
        out["tool_call_id"] = message.tool_call_id
    if message.name:
        out["name"] = message.name
    return out


def _render(tokenizer: Any, messages: list[dict[str, Any]],
            tools: list[dict[str, Any]] | None) -> str:
    """The chat template's text. A template that refuses the conversation (`raise_exception`,
    e.g. "roles must alternate") is the client's mistake: a 400 with the template's words.
    A template that does not compile is the model's problem and stays a server error."""
    try:
        text: str = tokenizer.apply_chat_template(
            messages, tools=tools, add_generation_prompt=True, tokenize=False)
    except TemplateSyntaxError:
        raise
    except TemplateError as error:
        raise InvalidRequest(f"messages: the model's chat template refused them: {error}",
                             param="messages") from None
    except RecursionError:
        raise InvalidRequest("messages: nested too deeply to render", param="messages") from None
    return text


def prompt_tokens(tokenizer: Any, request: GenerationRequest) -> list[int]:
    """Token ids for the request. Runs off the event loop and off the MLX thread."""
    if request.prompt is not None:
        ids = list(tokenizer.encode(request.prompt))
    else:
        messages = [_template_message(m, i) for i, m in enumerate(request.messages or [])]
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
        text = _render(tokenizer, messages, tools)
        ids = list(tokenizer.encode(text, add_special_tokens=False))
    if not ids:
        raise InvalidRequest("the prompt is empty", param="prompt")
    return ids
