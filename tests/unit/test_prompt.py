"""Prompt rendering with the demo model's real tokenizer: client mistakes that used to be 500s
(issue 13, item 10) are 400s naming the field."""

from __future__ import annotations

from typing import Any

import pytest

from app.core.types import ChatMessage, GenerationRequest, ToolCall
from app.engine.prompt import prompt_tokens
from app.errors import InvalidRequest

# A template that refuses what it does not like, as many real ones do (Mistral, Llama 2, ...).
STRICT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' and not loop.first %}"
    "{{ raise_exception('System messages must come first') }}"
    "{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "<|im_start|>assistant\n"
)


def chat(*messages: ChatMessage) -> GenerationRequest:
    return GenerationRequest(model="m", request_id="r", messages=list(messages))


def test_tool_call_arguments_that_are_not_a_json_object_are_a_400(tokenizer: Any) -> None:
    for bad in ("{not json", "[1, 2]", "7", "[" * 5000 + "]" * 5000):
        request = chat(ChatMessage(role="user", content="hi"),
                       ChatMessage(role="assistant", content="",
                                   tool_calls=(ToolCall(id="c1", name="f", arguments=bad),)))
        with pytest.raises(InvalidRequest) as caught:
            prompt_tokens(tokenizer, request)
        assert caught.value.param == "messages[1].tool_calls[0].function.arguments"
    good = chat(ChatMessage(role="user", content="hi"),
                ChatMessage(role="assistant", content="",
                            tool_calls=(ToolCall(id="c1", name="f", arguments='{"x": 1}'),)))
    assert prompt_tokens(tokenizer, good)


def test_a_template_that_raises_is_a_400_with_its_message(tokenizer: Any,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tokenizer._tokenizer, "chat_template", STRICT_TEMPLATE)
    assert prompt_tokens(tokenizer, chat(ChatMessage(role="user", content="hi")))
    with pytest.raises(InvalidRequest, match="System messages must come first") as caught:
        prompt_tokens(tokenizer, chat(ChatMessage(role="user", content="hi"),
                                      ChatMessage(role="system", content="late")))
    assert caught.value.status == 400 and caught.value.param == "messages"


def test_a_template_that_does_not_compile_stays_a_server_error(
        tokenizer: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from jinja2.exceptions import TemplateSyntaxError

    monkeypatch.setattr(tokenizer._tokenizer, "chat_template", "{% for m in messages %}")
    with pytest.raises(TemplateSyntaxError):
        prompt_tokens(tokenizer, chat(ChatMessage(role="user", content="hi")))
