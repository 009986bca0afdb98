"""/v1/messages and count_tokens through the official `anthropic` SDK, against the real server."""

from __future__ import annotations

import json
from typing import Any

import anthropic
import httpx
import pytest

from tests.e2e.conftest import DEMO_ID, THINKING_ID
from tests.e2e.gateway_process import GatewayProcess

pytestmark = pytest.mark.e2e

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
# The current SDK no longer has sampling arguments; clients send them as extra body fields.
GREEDY = {"temperature": 0}


@pytest.fixture
def claude(gateway: GatewayProcess) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gateway.base_url, api_key="unused", max_retries=0)


def test_create_returns_a_message(claude: anthropic.Anthropic) -> None:
    message = claude.messages.create(model=DEMO_ID, max_tokens=24, extra_body=GREEDY,
                                     messages=QUESTION)
    assert message.type == "message" and message.role == "assistant"
    assert message.id.startswith("msg_") and message.model == DEMO_ID
    assert [block.type for block in message.content] == ["text"]
    assert "Paris" in message.content[0].text
    assert message.stop_reason in ("end_turn", "max_tokens")
    assert message.usage.output_tokens > 0 and message.usage.input_tokens > 0


def test_stream_accumulates_to_the_non_stream_message(claude: anthropic.Anthropic) -> None:
    kwargs: dict[str, Any] = {"model": DEMO_ID, "max_tokens": 40, "extra_body": GREEDY,
                              "system": "You are a geography teacher.",
                              "messages": [{"role": "user", "content": "Name three rivers."}]}
    whole = claude.messages.create(**kwargs)
    with claude.messages.stream(**kwargs) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert final.content[0].type == "text" and whole.content[0].type == "text"
    assert text == final.content[0].text == whole.content[0].text
    assert final.stop_reason == whole.stop_reason
    assert final.usage.output_tokens == whole.usage.output_tokens


def test_stream_events_are_well_formed(gateway: GatewayProcess) -> None:
    body = {"model": DEMO_ID, "max_tokens": 16, "temperature": 0, "stream": True,
            "messages": QUESTION}
    with httpx.stream("POST", gateway.base_url + "/v1/messages?beta=true", json=body,
                      headers={"anthropic-version": "2023-06-01",
                               "anthropic-beta": "claude-code-20250219,interleaved-thinking"},
                      timeout=120) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.read().decode()
    frames = [frame for frame in raw.split("\n\n") if frame.strip()]
    events = []
    for frame in frames:
        name, data = frame.split("\n", 1)
        assert name.startswith("event: ") and data.startswith("data: ")
        payload = json.loads(data[len("data: "):])
        assert payload["type"] == name[len("event: "):]
        events.append(payload)
    kinds = [e["type"] for e in events if e["type"] != "ping"]
    assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"]
    assert kinds[1] == "content_block_start" and kinds[-3] == "content_block_stop"
    assert {e["index"] for e in events if e["type"].startswith("content_block")} == {0}
    assert "[DONE]" not in raw


def test_stop_sequence_is_reported_and_cut(claude: anthropic.Anthropic) -> None:
    free = claude.messages.create(model=DEMO_ID, max_tokens=24, extra_body=GREEDY,
                                  messages=QUESTION)
    text = free.content[0].text
    words = text.split()
    assert len(words) >= 3
    stop = words[2]
    message = claude.messages.create(model=DEMO_ID, max_tokens=24, extra_body=GREEDY,
                                     messages=QUESTION, stop_sequences=["zzz-never", stop])
    assert message.stop_reason == "stop_sequence" and message.stop_sequence == stop
    assert message.content[0].text == text[: text.index(stop)]


def test_count_tokens_equals_the_prompt_the_model_sees(claude: anthropic.Anthropic) -> None:
    request: dict[str, Any] = {
        "model": DEMO_ID,
        "system": [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
        "messages": QUESTION,
    }
    counted = claude.messages.count_tokens(**request)
    message = claude.messages.create(max_tokens=4, extra_body=GREEDY, **request)
    usage = message.usage
    assert counted.input_tokens == usage.input_tokens + (usage.cache_read_input_tokens or 0)
    assert counted.input_tokens > 10


def test_claude_code_shaped_request(gateway: GatewayProcess) -> None:
    """What Claude Code 2.1 sends, minus its tool list: claude-* id, system blocks with
    cache_control, a mid-conversation system message, thinking/context_management/
    output_config/metadata, ?beta=true and beta headers."""
    assert httpx.head(gateway.base_url + "/", timeout=10).status_code == 200
    body = {
        "model": "claude-sonnet-4-5-20250929", "max_tokens": 16, "stream": False,
        "system": [{"type": "text", "text": "You are Claude Code.",
                    "cache_control": {"type": "ephemeral"}},
                   {"type": "text", "text": "Answer briefly."}],
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "hello"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "Hi."}]},
            {"role": "system", "content": "The user's time zone is UTC."},
            {"role": "user", "content": "What is the capital of France?"},
        ],
        "thinking": {"type": "adaptive"},
        "context_management": {"edits": [{"type": "clear_thinking_20251015"}]},
        "output_config": {"effort": "high"},
        "metadata": {"user_id": "user_abc_account_def_session_ghi"},
        "temperature": 0,
    }
    response = httpx.post(gateway.base_url + "/v1/messages?beta=true", json=body, timeout=120,
                          headers={"anthropic-version": "2023-06-01",
                                   "anthropic-beta": "oauth-2025-04-20,fine-grained-tool-streaming",
                                   "x-stainless-lang": "js"})
    assert response.status_code == 200, response.text
    message = response.json()
    assert message["model"] == DEMO_ID  # claude-* maps to the default model
    assert message["content"][0]["type"] == "text"


def test_tool_history_is_accepted(claude: anthropic.Anthropic) -> None:
    message = claude.messages.create(
        model=DEMO_ID, max_tokens=16, extra_body=GREEDY,
        tools=[{"name": "get_weather", "description": "Weather for a city",
                "input_schema": {"type": "object", "properties": {"city": {"type": "string"}},
                                 "required": ["city"]}}],
        messages=[
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": [
                {"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                 "input": {"city": "Paris"}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": "Sunny, 21 C"},
                {"type": "tool_result", "tool_use_id": "toolu_2", "is_error": True,
                 "content": [{"type": "text", "text": "timeout"}]},
                {"type": "text", "text": "Summarize."}]},
        ])
    assert message.stop_reason in ("end_turn", "max_tokens", "tool_use")


def _error(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert body["type"] == "error" and set(body["error"]) == {"type", "message"}
    error: dict[str, Any] = body["error"]
    return error


def test_errors_in_anthropic_shape(gateway: GatewayProcess) -> None:
    url = gateway.base_url + "/v1/messages"
    missing = httpx.post(url, json={"model": DEMO_ID, "messages": QUESTION}, timeout=30)
    assert missing.status_code == 400
    assert _error(missing)["type"] == "invalid_request_error"
    assert "max_tokens" in _error(missing)["message"]

    unknown = httpx.post(url, json={"model": "nope", "max_tokens": 4, "messages": QUESTION},
                         timeout=30)
    assert unknown.status_code == 404 and _error(unknown)["type"] == "not_found_error"

    image = httpx.post(url, timeout=30, json={"model": DEMO_ID, "max_tokens": 4, "messages": [
        {"role": "user", "content": [
            {"type": "text", "text": "what is this?"},
            {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                         "data": "iVBORw0KGgo="}}]}]})
    assert image.status_code == 400
    assert "'image'" in _error(image)["message"] and "content[1]" in _error(image)["message"]

    long_prompt = [{"role": "user", "content": "word " * 200}]
    too_long = httpx.post(url, timeout=60, json={"model": "smollm2-short", "max_tokens": 4,
                                                 "messages": long_prompt})
    assert too_long.status_code == 400
    assert _error(too_long)["message"].startswith("prompt is too long: ")
    assert _error(too_long)["message"].endswith(" tokens > 48 maximum")

    huge = httpx.post(url, timeout=60, content=b'{"model": "' + b"x" * 11_000_000 + b'"}',
                      headers={"content-type": "application/json"})
    assert huge.status_code == 413 and _error(huge)["type"] == "request_too_large"

    bad_json = httpx.post(gateway.base_url + "/v1/messages/count_tokens", content=b"{nope",
                          headers={"content-type": "application/json"}, timeout=30)
    assert bad_json.status_code == 400
    assert _error(bad_json)["type"] == "invalid_request_error"


def test_sdk_raises_typed_errors(claude: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.NotFoundError):
        claude.messages.create(model="nope", max_tokens=4, messages=QUESTION)
    with pytest.raises(anthropic.BadRequestError, match="prompt is too long"):
        claude.messages.create(model="smollm2-short", max_tokens=4,
                               messages=[{"role": "user", "content": "word " * 200}])


def test_output_config_format_is_enforced(claude: anthropic.Anthropic) -> None:
    schema = {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 40},
        "country": {"type": "string", "enum": ["France", "Germany", "Italy"]}},
        "required": ["city", "country"], "additionalProperties": False}
    message = claude.messages.create(
        model=DEMO_ID, max_tokens=60, extra_body=GREEDY,
        messages=[{"role": "user", "content": "Which city is the capital of France? JSON."}],
        output_config={"format": {"type": "json_schema", "schema": schema}})
    assert message.content[0].type == "text"
    answer = json.loads(message.content[0].text)
    assert set(answer) == {"city", "country"} and answer["country"] in schema[
        "properties"]["country"]["enum"]  # type: ignore[index]
    with pytest.raises(anthropic.BadRequestError, match="output_config"):
        claude.messages.create(
            model=DEMO_ID, max_tokens=8, messages=QUESTION,
            tools=[{"name": "f", "input_schema": {"type": "object"}}],
            tool_choice={"type": "any"},
            output_config={"format": {"type": "json_schema", "schema": schema}})


RIVERS = [{"role": "user", "content": "Name three rivers of Europe and say where each flows."}]


def _thinking_message(claude: anthropic.Anthropic, thinking: dict[str, Any]) -> Any:
    return claude.messages.create(model=THINKING_ID, max_tokens=40, extra_body=GREEDY,
                                  thinking=thinking, messages=RIVERS)  # type: ignore[arg-type]


def test_thinking_budget_closes_the_think_block(claude: anthropic.Anthropic) -> None:
    """The demo model never ends a think block by itself: without a budget its whole answer is
    thinking; with budget_tokens 8 the gateway closes the block after 8 and the model answers.
    Greedy decoding makes the budgeted thinking the unbudgeted one's beginning."""
    free = _thinking_message(claude, {"type": "enabled"})
    assert [block.type for block in free.content] == ["thinking"]
    assert free.usage.output_tokens > 8
    capped = _thinking_message(claude, {"type": "enabled", "budget_tokens": 8})
    assert [block.type for block in capped.content] == ["thinking", "text"]
    thought = capped.content[0].thinking  # type: ignore[union-attr]
    assert thought and free.content[0].thinking.startswith(thought)  # type: ignore[union-attr]
    assert len(thought) < len(free.content[0].thinking)  # type: ignore[union-attr]
    assert capped.content[1].text.strip()  # type: ignore[union-attr]
    with claude.messages.stream(model=THINKING_ID, max_tokens=40, extra_body=GREEDY,
                                thinking={"type": "enabled", "budget_tokens": 8},
                                messages=RIVERS) as stream:  # type: ignore[arg-type]
        final = stream.get_final_message()
    assert [block.model_dump() for block in final.content] == \
        [block.model_dump() for block in capped.content]


def test_thinking_budget_must_leave_room_for_the_answer(claude: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.BadRequestError) as caught:
        _thinking_message(claude, {"type": "enabled", "budget_tokens": 40})
    assert "thinking.budget_tokens" in str(caught.value)
