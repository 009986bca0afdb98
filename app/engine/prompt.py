"""Requests -> prompt token ids, with the model's own chat template.

Tools go to the template when it renders them; a template without tool support gets the
gateway's generic tool format in the system prompt instead (app/output/generic_tools.py).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from jinja2.exceptions import TemplateError, TemplateSyntaxError

from app.core.types import ChatMessage, GenerationRequest, ToolCall, ToolSpec
from app.engine.pack import Packed, Tokens, pack
from app.errors import InvalidRequest
from app.output.detect import ModelOutput, model_output
from app.output.generic_tools import history_for_generic, render_tools_prompt


@dataclass(frozen=True)
class Prompt:
    ids: list[int]
    text: str  # the rendered prompt ("" for raw completions): its end says if a think block is open
    output: ModelOutput | None  # how this model writes calls and reasoning (chat only)


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


def _render(tokenizer: Any, messages: list[dict[str, Any]],
            tools: list[dict[str, Any]] | None, template_kwargs: dict[str, Any]) -> str:
    """The chat template's text. A template that refuses the conversation (`raise_exception`,
    e.g. "roles must alternate") is the client's mistake: a 400 with the template's words.
    A template that does not compile is the model's problem and stays a server error."""
    try:
        text: str = tokenizer.apply_chat_template(
            messages, tools=tools, add_generation_prompt=True, tokenize=False,
            **template_kwargs)
    except TemplateSyntaxError:
        raise
    except TemplateError as error:
        raise InvalidRequest(f"messages: the model's chat template refused them: {error}",
                             param="messages") from None
    except RecursionError:
        raise InvalidRequest("messages: nested too deeply to render", param="messages") from None
    except Exception as error:
        if not template_kwargs:
            raise
        # The client's kwargs broke the template (a colliding name, a wrong type).
        raise InvalidRequest(f"chat_template_kwargs: the chat template failed with them: "
                             f"{type(error).__name__}: {error}",
                             param="chat_template_kwargs") from None
    return text


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
        # The client's history is checked as sent, whichever way it is rendered.
        messages = [_template_message(m, i) for i, m in enumerate(chat)]
        offer_tools = bool(request.tools) and request.tool_choice != "none"
        tools = None
        if not output.template_tools:
            chat = (_with_tools_prompt(chat, request) if offer_tools
                    else history_for_generic(chat))
            messages = [_template_message(m, i) for i, m in enumerate(chat)]
        elif offer_tools:
            tools = [
                {"type": "function", "function": {"name": t.name, "description": t.description,
                                                  "parameters": t.parameters}}
                for t in request.tools
            ]
        text = _render(tokenizer, messages, tools, request.template_kwargs)
        ids = list(tokenizer.encode(text, add_special_tokens=False))
    if not ids:
        raise InvalidRequest("the prompt is empty", param="prompt")
    return Prompt(ids=ids, text=text, output=output)


def packed_render(tokenizer: Any, request: GenerationRequest,
                  limit: int) -> tuple[Prompt, Packed] | None:
    """The chat request packed to at most `limit` prompt tokens (app/engine/pack.py), or None
    when even the system prompt, the tools and the newest turn do not fit."""
    if request.messages is None:
        return None

    def count(messages: list[ChatMessage], tools: list[ToolSpec]) -> int:
        return len(render(tokenizer, dataclasses.replace(
            request, messages=messages, tools=tools)).ids)

    tokens = Tokens(encode=lambda text: list(tokenizer.encode(text, add_special_tokens=False)),
                    decode=lambda ids: str(tokenizer.decode(ids)))
    packed = pack(list(request.messages), list(request.tools), limit, count, tokens)
    if packed is None:
        return None
    prompt = render(tokenizer, dataclasses.replace(
        request, messages=packed.messages, tools=packed.tools))
    return prompt, packed
