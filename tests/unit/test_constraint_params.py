"""How chat and Responses requests become constraints: tool_choice, response_format,
text.format, strict tools, logprobs; and the fields refused by name."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from app.api.openai.responses_schema import parse_request
from app.api.openai.schema import ChatCompletionRequest, CompletionRequest
from app.core.types import JsonConstraint, ToolCallConstraint
from app.errors import InvalidRequest

TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
STRICT = {"type": "function", "function": {"name": "g", "strict": True,
                                           "parameters": {"type": "object"}}}


def chat(**fields: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields})


def test_no_tools_no_format_no_constraint() -> None:
    assert chat().constraint() is None
    assert chat(tools=[TOOL]).constraint() is None  # auto, parallel, nothing strict


def test_required_and_named_choices_force_a_call() -> None:
    forced = chat(tools=[TOOL, STRICT], tool_choice="required").constraint()
    assert isinstance(forced, ToolCallConstraint) and forced.forced
    assert [t.name for t in forced.tools] == ["f", "g"]
    named = chat(tools=[TOOL, STRICT], tool_choice={"type": "function",
                                                    "function": {"name": "g"}})
    constraint = named.constraint()
    assert isinstance(constraint, ToolCallConstraint) and constraint.forced
    assert [t.name for t in constraint.tools] == ["g"]
    assert [t.name for t in named.tool_specs()] == ["g"]


def test_none_hides_tools_and_auto_arms_for_strict_tools() -> None:
    assert chat(tools=[STRICT], tool_choice="none").tool_specs() == []
    assert chat(tools=[STRICT], tool_choice="none").constraint() is None
    auto = chat(tools=[STRICT]).constraint()
    assert isinstance(auto, ToolCallConstraint) and not auto.forced
    single = chat(tools=[TOOL], parallel_tool_calls=False).constraint()
    assert isinstance(single, ToolCallConstraint) and single.call_limit == 1


def test_response_format_kinds() -> None:
    assert chat(response_format={"type": "text"}).constraint() is None
    assert chat(response_format={"type": "json_object"}).constraint() == JsonConstraint(
        None, "response_format")
    schema = {"type": "object"}
    constraint = chat(response_format={"type": "json_schema", "json_schema": {
        "name": "x", "schema": schema}}).constraint()
    assert isinstance(constraint, JsonConstraint) and constraint.schema == schema
    for bad in ({"type": "xml"}, {"type": "json_schema"}):
        with pytest.raises(ValidationError):
            chat(response_format=bad)


@pytest.mark.parametrize("fields", [
    {"top_logprobs": 2}, {"tool_choice": "required"}, {"functions": []},
    {"function_call": "auto"}, {"modalities": ["text", "audio"]}, {"audio": {}},
    {"web_search_options": {}}, {"logit_bias": {"x": 1}}, {"logit_bias": {"5": 500}},
    {"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "zz"}}},
])
def test_chat_refuses_what_it_cannot_honour(fields: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        chat(**fields)


def test_chat_logprobs_and_bias() -> None:
    assert chat().logprobs_count() is None
    assert chat(logprobs=True).logprobs_count() == 0
    assert chat(logprobs=True, top_logprobs=4).logprobs_count() == 4
    assert chat(logit_bias={"7": -100}).sampling().logit_bias == ((7, -100.0),)


@pytest.mark.parametrize("fields", [{"suffix": "x"}, {"echo": True, "logprobs": 1},
                                    {"best_of": 2}, {"logprobs": 50}])
def test_completions_refusals(fields: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        CompletionRequest.model_validate({"model": "m", "prompt": "p", **fields})


def responses(**fields: Any) -> Any:
    return parse_request({"model": "m", "input": "hi", **fields})


def test_responses_text_format_and_tool_choice() -> None:
    fmt = responses(text={"format": {"type": "json_schema", "name": "n",
                                     "schema": {"type": "object"}}}).constraint()
    assert isinstance(fmt, JsonConstraint) and fmt.param == "text.format.schema"
    flat = {"type": "function", "name": "f", "parameters": {"type": "object"}}
    forced = responses(tools=[flat], tool_choice="required", max_tool_calls=2).constraint()
    assert isinstance(forced, ToolCallConstraint) and forced.forced and forced.call_limit == 2
    assert responses(tools=[flat], tool_choice="none").tool_specs() == []
    with pytest.raises(InvalidRequest):
        responses(tool_choice="required")
    with pytest.raises(InvalidRequest):
        responses(prompt={"id": "pmpt_1"})


def test_responses_logprobs_through_include() -> None:
    assert responses().logprobs_count() is None
    assert responses(include=["message.output_text.logprobs"]).logprobs_count() == 0
    assert responses(include=["message.output_text.logprobs"],
                     top_logprobs=3).logprobs_count() == 3
    assert responses(include=["reasoning.encrypted_content"]).logprobs_count() is None


def test_speculative_opt_out_on_every_protocol() -> None:
    from app.api.anthropic.schema import MessagesRequest

    assert chat().sampling().speculative is True
    assert chat(speculative="off").sampling().speculative is False
    with pytest.raises(ValidationError, match="speculative"):
        chat(speculative="always")
    with pytest.raises(ValidationError, match="speculative"):
        CompletionRequest.model_validate({"model": "m", "prompt": "x", "speculative": True})
    assert parse_request({"model": "m", "input": "hi", "speculative": "off"}).speculative == "off"
    with pytest.raises((ValidationError, InvalidRequest)):
        parse_request({"model": "m", "input": "hi", "speculative": "sometimes"})
    message = {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
    assert MessagesRequest.model_validate({**message, "speculative": "off"}
                                          ).sampling().speculative is False
    with pytest.raises(ValidationError, match="speculative"):
        MessagesRequest.model_validate({**message, "speculative": 1})
