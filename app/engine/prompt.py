"""Requests -> prompt token ids, with the model's own chat template.

Tools go to the template when it renders them; a template without tool support gets the
gateway's generic tool format in the system prompt instead (app/output/generic_tools.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from app.core.types import ChatMessage, GenerationRequest
from app.errors import InvalidRequest
from app.output.detect import ModelOutput, model_output
from app.output.generic_tools import history_for_generic, render_tools_prompt


@dataclass(frozen=True)
class Prompt:
    ids: list[int]
    text: str  # the rendered prompt ("" for raw completions): its end says if a think block is open
    output: ModelOutput | None  # how this model writes calls and reasoning (chat only)


def _template_message(message: ChatMessage) -> dict[str, Any]:
    # Most chat templates know no `developer` role; it means the same as `system` to them.
    role = "system" if message.role == "developer" else message.role
    out: dict[str, Any] = {"role": role, "content": message.content}
    if message.tool_calls:
        out["tool_calls"] = [
            {"id": call.id, "type": "function",
             "function": {"name": call.name, "arguments": _arguments(call.arguments)}}
            for call in message.tool_calls
        ]
    if message.tool_call_id:
        out["tool_call_id"] = message.tool_call_id
    if message.name:
        out["name"] = message.name
    return out


def _arguments(text: str) -> Any:
    try:
        return json.loads(text or "{}")
    except ValueError:
        return text  # a client's malformed history is its own; the template gets it as sent


def _with_tools_prompt(messages: list[ChatMessage],
                       request: GenerationRequest) -> list[ChatMessage]:
    choice = request.tool_choice
    named = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
    prompt = render_tools_prompt(request.tools, required=choice == "required" or bool(named),
                                 name=named if isinstance(named, str) else None)
    history = history_for_generic(messages)
    if history and history[0].role in ("system", "developer"):
        first = history[0]
        return [ChatMessage(role="system", content=f"{first.content}\n\n{prompt}"), *history[1:]]
    return [ChatMessage(role="system", content=prompt), *history]


def prompt_tokens(tokenizer: Any, request: GenerationRequest) -> list[int]:
    return render(tokenizer, request).ids


def render(tokenizer: Any, request: GenerationRequest) -> Prompt:
    """The prompt for the request. Runs off the event loop and off the MLX thread."""
    if request.prompt is not None:
        ids = list(tokenizer.encode(request.prompt))
        text, output = "", None
    else:
        if not getattr(tokenizer, "has_chat_template", False):
            raise InvalidRequest(
                f"model {request.model!r} has no chat template; use /v1/completions",
                param="messages",
            )
        output = model_output(tokenizer)
        chat = list(request.messages or [])
        offer_tools = bool(request.tools) and request.tool_choice != "none"
        tools = None
        if offer_tools and not output.template_tools:
            chat = _with_tools_prompt(chat, request)
        elif offer_tools:
            tools = [
                {"type": "function", "function": {"name": t.name, "description": t.description,
                                                  "parameters": t.parameters}}
                for t in request.tools
            ]
        elif not output.template_tools:
            chat = history_for_generic(chat)
        messages = [_template_message(m) for m in chat]
        try:
            text = tokenizer.apply_chat_template(
                messages, tools=tools, add_generation_prompt=True, tokenize=False,
                **request.template_kwargs,
            )
        except Exception as error:
            if not request.template_kwargs:
                raise
            # The client's kwargs broke the template (a colliding name, a wrong type).
            raise InvalidRequest(f"chat_template_kwargs: the chat template failed with them: "
                                 f"{type(error).__name__}: {error}",
                                 param="chat_template_kwargs") from None
        ids = list(tokenizer.encode(text, add_special_tokens=False))
    if not ids:
        raise InvalidRequest("the prompt is empty", param="prompt")
    return Prompt(ids=ids, text=text, output=output)
