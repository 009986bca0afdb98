"""Constrained decoding, tool_choice and logprobs through the real server and the official SDK.

The demo model (135M parameters) follows no schema by itself: every valid document here is the
grammar's doing. Requests run ten at a time, so they share the continuous batch as real clients
would (each sequence with its own grammar, or none).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from bench.grammar_schemas import SCHEMAS
from tests.e2e.conftest import DEMO_ID
from tests.e2e.gateway_process import GatewayProcess

T = TypeVar("T")
CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.S)


def _parallel(jobs: list[Callable[[], T]]) -> list[T]:
    with ThreadPoolExecutor(10) as pool:
        return list(pool.map(lambda job: job(), jobs))


# --- response_format json_schema: 20 schemas ------------------------------------------------------

def _json_answer(client: openai.OpenAI, name: str, schema: dict[str, Any],
                 stream: bool) -> tuple[str, str | None]:
    kwargs: dict[str, Any] = dict(
        model=DEMO_ID, temperature=0, max_tokens=200,
        messages=[{"role": "user", "content": f"Give an example {name.replace('_', ' ')} as "
                                              "JSON."}],
        response_format={"type": "json_schema",
                         "json_schema": {"name": name, "schema": schema, "strict": True}},
    )
    if not stream:
        choice = client.chat.completions.create(**kwargs).choices[0]
        return choice.message.content or "", choice.finish_reason
    text, finish = "", None
    for chunk in client.chat.completions.create(**kwargs, stream=True):
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
    return text, finish


def test_twenty_json_schema_answers_validate(client: openai.OpenAI) -> None:
    names = list(SCHEMAS)
    assert len(names) == 20
    answers = _parallel([
        (lambda n=n, i=i: _json_answer(client, n, SCHEMAS[n], stream=i % 2 == 1))
        for i, n in enumerate(names)
    ])
    for name, (text, finish) in zip(names, answers, strict=True):
        assert finish == "stop", (name, text)
        jsonschema.validate(json.loads(text), SCHEMAS[name])


def test_json_object_mode_answers_an_object(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=DEMO_ID, temperature=0, max_tokens=24, response_format={"type": "json_object"},
        messages=[{"role": "user", "content": "Say hello."}])
    text = reply.choices[0].message.content or ""
    assert text.startswith("{"), text
    if reply.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)


# --- tool_choice required / named: 20 forced calls -----------------------------------------------

def _tool(name: str, description: str, properties: dict[str, Any],
          required: list[str]) -> dict[str, Any]:
    return {"type": "function", "function": {
        "name": name, "description": description,
        "parameters": {"type": "object", "properties": properties, "required": required,
                       "additionalProperties": False}}}


TOOLS = [
    _tool("get_weather", "Weather now",
          {"city": {"type": "string", "maxLength": 24},
           "unit": {"enum": ["celsius", "fahrenheit"]}}, ["city", "unit"]),
    _tool("add", "Add two numbers",
          {"a": {"type": "integer", "minimum": -100, "maximum": 100},
           "b": {"type": "integer", "minimum": -100, "maximum": 100}}, ["a", "b"]),
    _tool("search", "Search the web",
          {"query": {"type": "string", "maxLength": 40},
           "limit": {"type": "integer", "minimum": 1, "maximum": 10}}, ["query"]),
    _tool("set_alarm", "Set an alarm",
          {"hour": {"type": "integer", "minimum": 0, "maximum": 23},
           "minute": {"type": "integer", "minimum": 0, "maximum": 59},
           "days": {"type": "array", "maxItems": 3,
                    "items": {"enum": ["mon", "tue", "wed", "thu", "fri"]}}}, ["hour", "minute"]),
]
PARAMS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
PROMPTS = ["What's the weather in Paris?", "Add 2 and 3.", "Search for mlx.", "Wake me at 7.",
           "Is it raining in Tokyo?"]


def _calls(message_calls: list[tuple[str, str]], content: str) -> list[tuple[str, str]]:
    """(name, arguments) of the answer's calls: parsed by the server when it parses the generic
    format, or read from the text when it does not (yet)."""
    if message_calls:
        return message_calls
    found = CALL.findall(content)
    assert found and CALL.sub("", content).strip() == "", content
    return [(json.loads(b)["name"], json.dumps(json.loads(b)["arguments"])) for b in found]


def _forced_call(client: openai.OpenAI, i: int, stream: bool
                 ) -> tuple[str | None, list[tuple[str, str]], str | None]:
    named = TOOLS[i % len(TOOLS)]["function"]["name"] if i % 2 else None
    choice: Any = {"type": "function", "function": {"name": named}} if named else "required"
    kwargs: dict[str, Any] = dict(
        model=DEMO_ID, temperature=0, max_tokens=120, tools=TOOLS, tool_choice=choice,
        parallel_tool_calls=i % 3 != 0,
        messages=[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}])
    if not stream:
        out = client.chat.completions.create(**kwargs).choices[0]
        calls = [(c.function.name, c.function.arguments)
                 for c in out.message.tool_calls or [] if c.type == "function"]
        return named, _calls(calls, out.message.content or ""), out.finish_reason
    content, finish = "", None
    by_index: dict[int, list[str]] = {}
    for chunk in client.chat.completions.create(**kwargs, stream=True):
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for call in delta.tool_calls or []:
            entry = by_index.setdefault(call.index, ["", ""])
            if call.function and call.function.name:
                entry[0] = call.function.name
            if call.function and call.function.arguments:
                entry[1] += call.function.arguments
        finish = chunk.choices[0].finish_reason or finish
    streamed = [(name, args) for name, args in by_index.values()]
    return named, _calls(streamed, content), finish


def test_twenty_forced_calls_are_schema_valid(client: openai.OpenAI) -> None:
    results = _parallel([(lambda i=i: _forced_call(client, i, stream=i >= 10))
                         for i in range(20)])
    for i, (named, calls, finish) in enumerate(results):
        assert finish in ("tool_calls", "stop"), (i, finish, calls)
        assert calls, i
        if i % 3 == 0:  # parallel_tool_calls false: exactly one
            assert len(calls) == 1, (i, calls)
        for name, arguments in calls:
            if named:
                assert name == named
            jsonschema.validate(json.loads(arguments), PARAMS[name])


def test_tool_choice_none_hides_the_tools(client: openai.OpenAI) -> None:
    def usage(**extra: Any) -> int:
        reply = client.chat.completions.create(
            model=DEMO_ID, max_tokens=1, messages=[{"role": "user", "content": "hi"}], **extra)
        assert reply.usage is not None
        return reply.usage.prompt_tokens

    assert usage(tools=TOOLS, tool_choice="none") == usage()


def test_bad_tool_choice_and_format_are_400s_naming_the_field(gateway: GatewayProcess) -> None:
    url = gateway.base_url + "/v1/chat/completions"
    base = {"model": DEMO_ID, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    cases = [
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
         "tool_choice"),
        ({"response_format": {"type": "json_schema", "json_schema": {
            "name": "x", "schema": {"type": "object", "properties": {"a": {"type": "nope"}}}}}},
         "response_format"),
        ({"response_format": {"type": "xml"}}, "response_format"),
        ({"response_format": {"type": "json_schema"}}, "response_format"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
            "type": "object", "properties": {"x": {"type": "nope"}}}}}], "tool_choice": "required"},
         "tool_choice"),
    ]
    for extra, param in cases:
        reply = httpx.post(url, json={**base, **extra}, timeout=60)
        assert reply.status_code == 400, (extra, reply.text)
        error = reply.json()["error"]
        assert param in (error["param"] or "") or param in error["message"], (extra, error)


# --- the SDK's parse helpers ----------------------------------------------------------------------

class City(BaseModel):
    name: str = Field(max_length=30)
    country: str = Field(max_length=30)
    population: int = Field(ge=0, le=50_000_000)


def test_chat_completions_parse_with_a_pydantic_model(client: openai.OpenAI) -> None:
    reply = client.chat.completions.parse(
        model=DEMO_ID, temperature=0, max_tokens=80, response_format=City,
        messages=[{"role": "user", "content": "Describe Paris."}])
    parsed = reply.choices[0].message.parsed
    assert isinstance(parsed, City)


def test_responses_parse_with_a_pydantic_model(client: openai.OpenAI) -> None:
    reply = client.responses.parse(model=DEMO_ID, temperature=0, max_output_tokens=80,
                                   input="Describe Rome.", text_format=City)
    assert isinstance(reply.output_parsed, City)


def test_responses_named_tool_choice_is_a_valid_call(client: openai.OpenAI) -> None:
    tool = TOOLS[0]["function"]
    reply = client.responses.create(
        model=DEMO_ID, temperature=0, max_output_tokens=80, input="Weather in Oslo?",
        tools=[{"type": "function", "name": tool["name"], "parameters": tool["parameters"]}],
        tool_choice={"type": "function", "name": tool["name"]})
    calls = [(o.name, o.arguments) for o in reply.output if o.type == "function_call"]
    text = "".join(c.text for o in reply.output if o.type == "message" for c in o.content
                   if c.type == "output_text")
    for name, arguments in _calls(calls, text):
        assert name == tool["name"]
        jsonschema.validate(json.loads(arguments), tool["parameters"])


def test_responses_text_format_bad_schema_is_a_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(model=DEMO_ID, input="x", text={"format": {
            "type": "json_schema", "name": "x", "schema": {"type": "integer", "minimum": "z"}}})
    assert caught.value.body["param"].startswith("text.format")  # type: ignore[index]


# --- logprobs -------------------------------------------------------------------------------------

def _check_entry(entry: Any, top: int) -> None:
    assert entry.logprob <= 0
    assert bytes(entry.bytes).decode("utf-8", errors="replace") == entry.token
    assert len(entry.top_logprobs) == top
    values = [t.logprob for t in entry.top_logprobs]
    assert values == sorted(values, reverse=True)
    assert entry.logprob <= values[0] + 1e-4 if top else True


def test_chat_logprobs_shape_stream_and_not(client: openai.OpenAI) -> None:
    kwargs: dict[str, Any] = dict(model=DEMO_ID, temperature=0, max_tokens=6, logprobs=True,
                                  top_logprobs=3, messages=[{"role": "user", "content": "Hi"}])
    reply = client.chat.completions.create(**kwargs)
    choice = reply.choices[0]
    assert choice.logprobs is not None and choice.logprobs.content is not None
    entries = choice.logprobs.content
    assert reply.usage is not None and len(entries) == reply.usage.completion_tokens
    assert "".join(e.token for e in entries) == choice.message.content
    for entry in entries:
        _check_entry(entry, 3)
        # Greedy: the chosen token is the most likely one.
        assert entry.token == entry.top_logprobs[0].token
    streamed = []
    for chunk in client.chat.completions.create(**kwargs, stream=True):
        if chunk.choices and chunk.choices[0].logprobs and chunk.choices[0].logprobs.content:
            streamed += chunk.choices[0].logprobs.content
    assert [e.token for e in streamed] == [e.token for e in entries]
    plain = client.chat.completions.create(model=DEMO_ID, max_tokens=2,
                                           messages=[{"role": "user", "content": "Hi"}])
    assert plain.choices[0].logprobs is None


def test_completions_logprobs_shape(gateway: GatewayProcess) -> None:
    body = {"model": DEMO_ID, "prompt": "The capital of France is", "max_tokens": 4,
            "temperature": 0, "logprobs": 2}
    reply = httpx.post(gateway.base_url + "/v1/completions", json=body, timeout=60).json()
    choice = reply["choices"][0]
    logprobs = choice["logprobs"]
    n = reply["usage"]["completion_tokens"]
    assert len(logprobs["tokens"]) == len(logprobs["token_logprobs"]) == n
    assert len(logprobs["top_logprobs"]) == len(logprobs["text_offset"]) == n
    # mlx-lm's BPE detokenizer drops the first token's leading space from the text (" Paris"
    # comes back as "Paris"); the token keeps it.
    assert "".join(logprobs["tokens"]).lstrip() == choice["text"].lstrip()
    assert all(len(top) <= 2 and top for top in logprobs["top_logprobs"])
    assert logprobs["text_offset"][0] == 0
    for extra, param in (({"echo": True}, "logprobs"), ({"suffix": "x"}, "suffix"),
                         ({"best_of": 3}, "best_of")):
        bad = httpx.post(gateway.base_url + "/v1/completions", json={**body, **extra},
                         timeout=60)
        assert bad.status_code == 400, bad.text
        assert param in bad.text


def test_responses_logprobs_through_include(client: openai.OpenAI) -> None:
    reply = client.responses.create(model=DEMO_ID, input="Hi", temperature=0,
                                    max_output_tokens=5, top_logprobs=2,
                                    include=["message.output_text.logprobs"])
    part = reply.output[0].content[0]  # type: ignore[union-attr]
    assert part.type == "output_text"
    assert part.logprobs and "".join(e.token for e in part.logprobs) == part.text
    for entry in part.logprobs:
        _check_entry(entry, 2)
    assert reply.top_logprobs == 2
    streamed = []
    with client.responses.stream(model=DEMO_ID, input="Hi", temperature=0, max_output_tokens=5,
                                 top_logprobs=2,
                                 include=["message.output_text.logprobs"]) as events:
        for event in events:
            if event.type == "response.output_text.delta":
                streamed += event.logprobs
    assert [e.token for e in streamed] == [e.token for e in part.logprobs]
    plain = client.responses.create(model=DEMO_ID, input="Hi", max_output_tokens=2)
    assert plain.output[0].content[0].logprobs == []  # type: ignore[union-attr]


# --- Anthropic tool_choice any / tool -------------------------------------------------------------

def test_anthropic_forced_tool_choice_is_a_valid_call(gateway: GatewayProcess) -> None:
    import anthropic

    claude = anthropic.Anthropic(base_url=gateway.base_url, api_key="unused", max_retries=0)
    tools: Any = [{"name": t["function"]["name"], "description": t["function"]["description"],
                   "input_schema": t["function"]["parameters"]} for t in TOOLS]
    for choice in ({"type": "any"}, {"type": "tool", "name": "add"}):
        message = claude.messages.create(
            model=DEMO_ID, max_tokens=100, tools=tools, tool_choice=choice,  # type: ignore[arg-type]
            messages=[{"role": "user", "content": "Add 4 and 5."}], extra_body={"temperature": 0})
        calls = [(b.name, json.dumps(b.input)) for b in message.content if b.type == "tool_use"]
        text = "".join(b.text for b in message.content if b.type == "text")
        for name, arguments in _calls(calls, text):
            if choice["type"] == "tool":
                assert name == "add"
            jsonschema.validate(json.loads(arguments), PARAMS[name])
    with pytest.raises(anthropic.BadRequestError):
        claude.messages.create(model=DEMO_ID, max_tokens=10, tools=tools,
                               tool_choice={"type": "tool", "name": "nope"},
                               messages=[{"role": "user", "content": "hi"}])
