"""Tool calls, reasoning fields and real agent request shapes, with the demo model and the
official SDKs.

The demo model's template has no tool support, so the gateway offers the tools in its generic
format. Whether a 135M model calls a tool spontaneously is chance; one earlier call in the
history (few-shot) makes it call at temperature 0, which these tests rely on. The parser
itself is tested deterministically in tests/unit/test_output_parser.py and the canitoolcall
corpus.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx
import openai
import pytest

from tests.e2e.conftest import DEMO_ID
from tests.e2e.gateway_process import GatewayProcess

pytestmark = pytest.mark.e2e

WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
CHAT_TOOLS: Any = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather for a city", "parameters": WEATHER}}]
RESPONSES_TOOLS: Any = [{"type": "function", "name": "get_weather",
                         "description": "Current weather for a city", "parameters": WEATHER}]
# One earlier call in the history: the model then calls for the next city too.
FEW_SHOT: Any = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [{
        "id": "call_0", "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "user", "content": "Weather in London?"},
]
FEW_SHOT_ITEMS: Any = [
    {"role": "user", "content": "Weather in Paris?"},
    {"type": "function_call", "call_id": "call_0", "name": "get_weather",
     "arguments": '{"city": "Paris"}'},
    {"role": "user", "content": "Weather in London?"},
]


def test_the_model_sees_the_tools(client: openai.OpenAI) -> None:
    plain = client.chat.completions.create(model=DEMO_ID, messages=FEW_SHOT[:1], max_tokens=1)
    with_tools = client.chat.completions.create(model=DEMO_ID, messages=FEW_SHOT[:1],
                                                tools=CHAT_TOOLS, max_tokens=1)
    assert plain.usage is not None and with_tools.usage is not None
    assert with_tools.usage.prompt_tokens > plain.usage.prompt_tokens + 50


def test_chat_tool_call_non_stream(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model=DEMO_ID, messages=FEW_SHOT, tools=CHAT_TOOLS,
                                           temperature=0, max_tokens=60)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    calls = choice.message.tool_calls or []
    assert len(calls) == 1 and calls[0].type == "function"
    assert calls[0].function.name == "get_weather"  # type: ignore[union-attr]
    assert json.loads(calls[0].function.arguments) == {"city": "London"}  # type: ignore[union-attr]
    assert calls[0].id.startswith("call_")


def test_chat_stream_tool_call_events(client: openai.OpenAI, gateway: GatewayProcess) -> None:
    with client.chat.completions.stream(model=DEMO_ID, messages=FEW_SHOT, tools=CHAT_TOOLS,
                                        temperature=0, max_tokens=60) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_completion()
    assert "tool_calls.function.arguments.delta" in kinds
    assert "tool_calls.function.arguments.done" in kinds
    call = (final.choices[0].message.tool_calls or [])[0]
    assert final.choices[0].finish_reason == "tool_calls"
    assert json.loads(call.function.arguments) == {"city": "London"}

    # The raw chunks, as the contract words them.
    with httpx.stream("POST", gateway.base_url + "/v1/chat/completions", timeout=120, json={
            "model": DEMO_ID, "messages": FEW_SHOT, "tools": CHAT_TOOLS, "temperature": 0,
            "max_tokens": 60, "stream": True}) as response:
        chunks = [json.loads(line[6:]) for line in response.iter_lines()
                  if line.startswith("data: {")]
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    entries = [e for d in deltas for e in d.get("tool_calls", [])]
    assert entries[0]["index"] == 0 and entries[0]["type"] == "function"
    assert entries[0]["id"].startswith("call_")
    assert entries[0]["function"]["name"] == "get_weather"
    assert all(set(e) == {"index", "function"} and set(e["function"]) == {"arguments"}
               for e in entries[1:])
    assert json.loads("".join(e["function"]["arguments"] for e in entries)) == {"city": "London"}
    finishes = [c["choices"][0]["finish_reason"] for c in chunks
                if c["choices"] and c["choices"][0]["finish_reason"]]
    assert finishes == ["tool_calls"]
    assert not any("<tool_call>" in (d.get("content") or "") for d in deltas)


def test_responses_stream_function_call_and_its_output(client: openai.OpenAI) -> None:
    with client.responses.stream(model=DEMO_ID, input=FEW_SHOT_ITEMS, tools=RESPONSES_TOOLS,
                                 temperature=0, max_output_tokens=60) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_response()
    assert "response.function_call_arguments.delta" in kinds
    assert kinds.index("response.function_call_arguments.done") < kinds.index(
        "response.output_item.done")
    assert final.status == "completed"
    call = final.output[0]
    assert call.type == "function_call" and call.name == "get_weather"
    assert json.loads(call.arguments) == {"city": "London"}

    # The call's output continues the turn.
    follow = client.responses.create(model=DEMO_ID, tools=RESPONSES_TOOLS, temperature=0,
                                     max_output_tokens=20, input=[
        *FEW_SHOT_ITEMS,
        {"type": "function_call", "call_id": call.call_id, "name": call.name,
         "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": "12 C, rain"},
    ])
    assert follow.status in ("completed", "incomplete")
    assert follow.usage is not None and follow.usage.input_tokens > 0


def test_agents_sdk_function_tool_round_trip(gateway: GatewayProcess) -> None:
    from agents import (
        Agent,
        ModelSettings,
        OpenAIResponsesModel,
        Runner,
        function_tool,
        set_tracing_disabled,
    )

    set_tracing_disabled(True)
    cities: list[str] = []

    @function_tool
    def get_weather(city: str) -> str:
        """Current weather for a city."""
        cities.append(city)
        return f"12 C in {city}"

    sdk = openai.AsyncOpenAI(base_url=gateway.base_url + "/v1", api_key="unused", max_retries=0)
    agent = Agent(name="weather", instructions="Answer weather questions with the tool.",
                  tools=[get_weather], model=OpenAIResponsesModel(DEMO_ID, sdk),
                  model_settings=ModelSettings(temperature=0, max_tokens=60),
                  tool_use_behavior="stop_on_first_tool")
    result = asyncio.run(Runner.run(agent, input=FEW_SHOT_ITEMS))
    assert cities == ["London"]
    assert result.final_output == "12 C in London"


def test_codex_request_shape_streams_to_completion(gateway: GatewayProcess) -> None:
    """Codex CLI 0.171's turn (CONTRACT.md "What real clients send"): developer input, function
    tools with a namespace and the hosted web_search, reasoning summary, store false, include,
    prompt_cache_key, client_metadata, parallel tool calls, no max_output_tokens."""
    shell = {"type": "function", "name": "shell", "description": "Run a command",
             "strict": False, "parameters": {"type": "object", "properties": {
                 "command": {"type": "array", "items": {"type": "string"}}},
                 "required": ["command"], "additionalProperties": False}}
    body = {
        "model": DEMO_ID,
        "instructions": None,
        "input": [
            {"type": "message", "role": "developer",
             "content": [{"type": "input_text", "text": "You are a coding agent. " * 20}]},
            {"type": "message", "role": "user",
             "content": [{"type": "input_text", "text": "Say hello."}]},
        ],
        "tools": [shell,
                  {"type": "namespace", "name": "mcp__docs", "description": "Docs",
                   "tools": [{"type": "function", "name": "mcp__docs__search",
                              "strict": False, "parameters": {"type": "object",
                                                              "properties": {}}}]},
                  {"type": "web_search", "external_web_access": False}],
        "tool_choice": "auto",
        "parallel_tool_calls": True,
        "reasoning": {"summary": "auto"},
        "store": False,
        "stream": True,
        "include": ["reasoning.encrypted_content"],
        "prompt_cache_key": "3f1c7a52-codex-session",
        "client_metadata": {"originator": "codex_cli_rs"},
        "text": {"verbosity": "medium"},
    }
    with httpx.stream("POST", gateway.base_url + "/v1/responses", json=body,
                      timeout=300) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["x-mlxgw-dropped-tools"] == "web_search"
        lines = [line for line in response.iter_lines() if line]
    events = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    names = [event["type"] for event in events]
    # No max_output_tokens and no temperature, as Codex sends it: the fixture's 32-token
    # default may cut the sampled answer (incomplete, reason max_output_tokens).
    assert names[0] == "response.created"
    assert names[-1] in ("response.completed", "response.incomplete")
    assert all(not line.startswith(":") for line in lines), "keep-alives are events here"
    done = events[-1]["response"]
    assert done["id"].startswith("resp_")
    assert isinstance(done["usage"]["input_tokens"], int)
    assert isinstance(done["usage"]["output_tokens"], int)
    assert [tool["name"] for tool in done["tools"]] == ["shell", "mcp__docs__search"]
    assert lines[-1] == "data: [DONE]"


def test_chat_template_kwargs_that_collide_are_a_400(gateway: GatewayProcess) -> None:
    reply = httpx.post(gateway.base_url + "/v1/chat/completions", timeout=60, json={
        "model": DEMO_ID, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2,
        "chat_template_kwargs": {"tools": []}})
    assert reply.status_code == 400
    assert reply.json()["error"]["param"] == "chat_template_kwargs"
    fine = httpx.post(gateway.base_url + "/v1/chat/completions", timeout=60, json={
        "model": DEMO_ID, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2,
        "chat_template_kwargs": {"enable_thinking": False}, "reasoning_effort": "low",
        "parallel_tool_calls": True})
    assert fine.status_code == 200, fine.text


def test_non_stream_client_disconnect_is_not_a_server_error(gateway: GatewayProcess) -> None:
    marker = "disconnect-probe-7d1e"
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(gateway.base_url + "/v1/chat/completions", timeout=httpx.Timeout(60, read=1),
                   headers={"x-request-id": marker}, json={
                       "model": DEMO_ID, "max_tokens": 400, "temperature": 0,
                       "messages": [{"role": "user", "content": "Write a long story."}]})
    lines: list[str] = []
    for _ in range(300):  # the access line is written once the generation is cancelled
        lines = [line for line in gateway.logs().splitlines() if marker in line]
        if any('"request"' in line or "event=request" in line for line in lines):
            break
        time.sleep(0.2)
    access = [line for line in lines if '"request"' in line or "event=request" in line]
    assert access, lines
    assert "499" in access[-1] and "500" not in access[-1]
    assert "Exception in ASGI application" not in gateway.logs()
