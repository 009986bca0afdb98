"""/v1/responses: request parsing, input translation and event rendering, without an engine."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from typing import Any

import pytest
from openai.lib.streaming.responses._responses import ResponseStreamState
from openai.types.responses import Response, ResponseItemList

from app.api.openai.responses_render import ResponseRenderer, page_items, request_echo
from app.api.openai.responses_schema import (
    ResponsesRequest,
    items_to_messages,
    message_from_json,
    message_to_json,
    normalize_input,
    parse_request,
    turn_starts,
)
from app.core.types import (
    ChatMessage,
    Failed,
    Finish,
    GenerationEvent,
    TextDelta,
    ToolCall,
    ToolCallDelta,
    Usage,
)
from app.errors import EngineFailure, InvalidRequest, NotFound
from app.security.principal import Principal


def _no_refs(_: str) -> dict[str, Any] | None:
    return None


# --- request schema -------------------------------------------------------------------------

def test_minimal_request_defaults() -> None:
    req = parse_request({"model": "m", "input": "hi", "x-unknown": 1, "include": ["a"]})
    assert req.store is True and req.stream is False and req.truncation == "disabled"
    assert req.tool_choice == "auto" and req.text.format.type == "text"


@pytest.mark.parametrize(
    ("body", "param", "fragment"),
    [
        ({"model": "m", "input": "x", "temperature": 3}, "temperature", "less than or equal"),
        ({"model": "m", "input": "x", "max_output_tokens": 0}, "max_output_tokens", "greater"),
        ({"model": "m", "input": "x", "truncation": "middle"}, "truncation", "'auto'"),
        ({"model": "m", "input": "x", "tools": [{"type": "function", "function": {"name": "f"}}]},
         "tools.0", "flat"),
        ({"model": "m", "input": "x", "tools": [{"type": "function", "name": "bad name"}]},
         "tools.0.name", "function name"),
        ({"model": "m", "input": "x", "tool_choice": {"type": "function", "name": "g"}}, None,
         "not in `tools`"),
        ({"model": "m", "input": "x", "tool_choice": "sometimes"}, "tool_choice", ""),
        ({"model": "m", "input": "x", "text": {"format": {"type": "json_schema",
                                                          "schema": {}}}},
         "text.format", "needs `name`"),
        ({"model": "m", "input": "x", "text": {"format": {"type": "json_schema", "name": "n"}}},
         "text.format", "`schema`"),
        ({"model": "m", "input": "x", "metadata": {str(i): "v" for i in range(17)}},
         "metadata", "16"),
        ({"model": "m", "input": "x", "background": True}, None, "background"),
        ({"model": "m"}, None, "`input` is required"),
    ],
)
def test_bad_requests_are_clear_400s(body: dict[str, Any], param: str | None,
                                     fragment: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse_request(body)
    assert caught.value.status == 400
    assert caught.value.param == param
    assert fragment in caught.value.message


def test_json_schema_format_and_tools_are_echoed_flat() -> None:
    req = parse_request({
        "model": "m", "input": "x",
        "text": {"format": {"type": "json_schema", "name": "person",
                            "schema": {"type": "object"}, "strict": True}},
        "tools": [{"type": "function", "name": "get_weather", "parameters": {"type": "object"}}],
        "tool_choice": {"type": "function", "name": "get_weather"},
        "reasoning": {"effort": "high"},
    })
    echo = request_echo(req)
    assert echo["text"]["format"] == {"type": "json_schema", "name": "person",
                                      "schema": {"type": "object"}, "description": None,
                                      "strict": True}
    assert echo["tools"][0]["name"] == "get_weather" and "function" not in echo["tools"][0]
    assert echo["tool_choice"] == {"type": "function", "name": "get_weather"}
    assert req.tool_choice_internal() == "required"
    assert [spec.name for spec in req.tool_specs()] == ["get_weather"]


def test_parse_request_rejects_non_object() -> None:
    with pytest.raises(InvalidRequest, match="JSON object"):
        parse_request(["input"])


# --- input translation ----------------------------------------------------------------------

def test_string_input_is_one_user_message_with_an_id() -> None:
    items = normalize_input("My name is Ada", _no_refs)
    assert len(items) == 1
    assert items[0]["id"].startswith("msg_")
    assert items[0]["content"] == [{"type": "input_text", "text": "My name is Ada"}]
    assert items_to_messages(items) == [ChatMessage(role="user", content="My name is Ada")]


def test_every_item_kind_translates_in_order() -> None:
    items = normalize_input([
        {"role": "developer", "content": "be brief"},
        {"type": "message", "role": "user",
         "content": [{"type": "input_text", "text": "weather?"}]},
        {"type": "message", "role": "assistant", "id": "msg_keep",
         "content": [{"type": "output_text", "text": "checking"}]},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather",
         "arguments": '{"city":"Oslo"}'},
        {"type": "function_call", "call_id": "call_2", "name": "get_time", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
        {"type": "function_call_output", "call_id": "call_2",
         "output": [{"type": "input_text", "text": "noon"}]},
    ], _no_refs)
    assert items[2]["id"] == "msg_keep"
    assert items[2]["content"][0] == {"type": "output_text", "text": "checking",
                                      "annotations": [], "logprobs": []}
    assert items[3]["id"].startswith("fc_") and items[5]["id"].startswith("fco_")
    messages = items_to_messages(items)
    assert messages == [
        ChatMessage(role="developer", content="be brief"),
        ChatMessage(role="user", content="weather?"),
        ChatMessage(role="assistant", content="checking", tool_calls=(
            ToolCall(id="call_1", name="get_weather", arguments='{"city":"Oslo"}'),
            ToolCall(id="call_2", name="get_time", arguments="{}"),
        )),
        ChatMessage(role="tool", content="sunny", tool_call_id="call_1", name="get_weather"),
        ChatMessage(role="tool", content="noon", tool_call_id="call_2", name="get_time"),
    ]


def test_tool_output_finds_its_name_in_earlier_context() -> None:
    items = normalize_input(
        [{"type": "function_call_output", "call_id": "call_9", "output": "42"}], _no_refs)
    messages = items_to_messages(items, {"call_9": "answer"})
    assert messages == [ChatMessage(role="tool", content="42", tool_call_id="call_9",
                                    name="answer")]


def test_item_reference_resolves_or_404s() -> None:
    known = {"id": "msg_prev", "type": "message", "role": "user", "status": "completed",
             "content": [{"type": "input_text", "text": "earlier"}]}
    items = normalize_input([{"type": "item_reference", "id": "msg_prev"}],
                            {"msg_prev": known}.get)
    assert items == [known]
    with pytest.raises(NotFound) as caught:
        normalize_input([{"type": "item_reference", "id": "msg_gone"}], _no_refs)
    assert caught.value.status == 404 and caught.value.param == "input[0].id"


@pytest.mark.parametrize(
    ("item", "param"),
    [
        ({"type": "message", "role": "robot", "content": "x"}, "input[0].role"),
        ({"type": "message", "role": "user", "content": [{"type": "input_image"}]},
         "input[0].content[0].type"),
        ({"type": "message", "role": "user", "content": 5}, "input[0].content"),
        ({"type": "function_call", "name": "f", "arguments": "{}"}, "input[0].call_id"),
        ({"type": "function_call", "call_id": "c", "name": "f", "arguments": {}},
         "input[0].arguments"),
        ({"type": "computer_call"}, "input[0].type"),
        ("just a string", "input[0]"),
    ],
)
def test_bad_items_name_the_field(item: Any, param: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        normalize_input([item], _no_refs)
    assert caught.value.param == param


def test_messages_round_trip_through_json() -> None:
    message = ChatMessage(role="assistant", content="x",
                          tool_calls=(ToolCall(id="c", name="f", arguments="{}"),))
    tool = ChatMessage(role="tool", content="r", tool_call_id="c", name="f")
    for original in (message, tool, ChatMessage(role="user", content="hi")):
        assert message_from_json(message_to_json(original)) == original


def test_turn_starts_cut_before_user_turns() -> None:
    context = [ChatMessage(role="user", content="a"), ChatMessage(role="assistant", content="b"),
               ChatMessage(role="user", content="c"), ChatMessage(role="user", content="c2"),
               ChatMessage(role="assistant", content="d"), ChatMessage(role="tool", content="e"),
               ChatMessage(role="user", content="f")]
    assert turn_starts(context) == [2, 6, 7]


# --- rendering ------------------------------------------------------------------------------

REQUIRED_KEYS = {
    "id", "object", "created_at", "completed_at", "status", "error", "incomplete_details",
    "instructions", "max_output_tokens", "model", "output", "parallel_tool_calls",
    "previous_response_id", "reasoning", "store", "temperature", "text", "tool_choice", "tools",
    "top_p", "truncation", "usage", "user", "metadata", "background", "service_tier",
}


def _renderer(**request: Any) -> ResponseRenderer:
    req = ResponsesRequest.model_validate({"model": "m", "input": "hi", **request})
    return ResponseRenderer(response_id="resp_test", model="demo", echo=request_echo(req))


async def _fake_engine(events: Iterable[GenerationEvent]) -> AsyncIterator[GenerationEvent]:
    for event in events:
        yield event


async def _render(renderer: ResponseRenderer,
                  events: Iterable[GenerationEvent]) -> list[dict[str, Any]]:
    out = renderer.start()
    async for event in _fake_engine(events):
        out += renderer.feed(event)
    return out


def _sdk_replay(out: list[dict[str, Any]]) -> Any:
    """Feed the events through the openai SDK's own stream accumulator (it raises on misorder)."""
    from openai import omit
    from openai._models import construct_type
    from openai.types.responses import ResponseStreamEvent

    state: ResponseStreamState[Any] = ResponseStreamState(input_tools=[], text_format=omit)
    for event in out:
        state.handle_event(construct_type(type_=ResponseStreamEvent, value=event))  # type: ignore[arg-type]
    return state


USAGE = Usage(prompt_tokens=7, completion_tokens=3, cached_tokens=2)


async def test_text_stream_has_the_contract_order_and_a_full_object() -> None:
    renderer = _renderer(instructions="be nice", metadata={"k": "v"})
    out = await _render(renderer, [TextDelta("Hel"), TextDelta(""), TextDelta("lo"),
                                   Finish("stop", USAGE)])
    assert [e["type"] for e in out] == [
        "response.created", "response.in_progress", "response.output_item.added",
        "response.content_part.added", "response.output_text.delta",
        "response.output_text.delta", "response.output_text.done",
        "response.content_part.done", "response.output_item.done", "response.completed",
    ]
    assert [e["sequence_number"] for e in out] == list(range(len(out)))
    assert out[0]["response"]["status"] == "in_progress" and out[0]["response"]["output"] == []
    assert out[3]["part"]["text"] == "" and out[6]["text"] == "Hello"
    final = out[-1]["response"]
    assert final.keys() >= REQUIRED_KEYS
    assert final["status"] == "completed" and final["error"] is None
    assert isinstance(final["completed_at"], int)
    assert final["instructions"] == "be nice" and final["metadata"] == {"k": "v"}
    assert final["usage"] == {"input_tokens": 7,
                              "input_tokens_details": {"cached_tokens": 2, "cache_write_tokens": 0},
                              "output_tokens": 3, "output_tokens_details": {"reasoning_tokens": 0},
                              "total_tokens": 10}
    [message] = final["output"]
    assert message["id"].startswith("msg_") and message["status"] == "completed"
    assert message["content"] == [{"type": "output_text", "text": "Hello", "annotations": [],
                                   "logprobs": []}]
    assert renderer.snapshot() == final
    parsed = Response.model_validate(final)
    assert parsed.output_text == "Hello"
    state = _sdk_replay(out)
    assert state._completed_response.output_text == "Hello"


async def test_length_finish_is_incomplete_with_the_reason() -> None:
    renderer = _renderer(max_output_tokens=3)
    out = await _render(renderer, [TextDelta("a b c"), Finish("length", USAGE)])
    assert out[-1]["type"] == "response.incomplete"
    final = out[-1]["response"]
    assert final["status"] == "incomplete"
    assert final["incomplete_details"] == {"reason": "max_output_tokens"}
    assert final["max_output_tokens"] == 3
    assert final["output"][0]["status"] == "incomplete"


async def test_empty_generation_still_has_one_message() -> None:
    out = await _render(_renderer(), [Finish("stop", USAGE)])
    assert [e["type"] for e in out][2:] == [
        "response.output_item.added", "response.content_part.added",
        "response.output_text.done", "response.content_part.done",
        "response.output_item.done", "response.completed",
    ]
    assert out[-1]["response"]["output"][0]["content"][0]["text"] == ""


async def test_failure_mid_stream_ends_with_response_failed() -> None:
    renderer = _renderer()
    out = await _render(renderer, [TextDelta("par"), Failed(EngineFailure("MLX broke")),
                                   TextDelta("ignored")])
    assert [e["type"] for e in out][-4:] == [
        "response.output_text.done", "response.content_part.done",
        "response.output_item.done", "response.failed"]
    final = out[-1]["response"]
    assert final["status"] == "failed"
    assert final["error"] == {"code": "server_error", "message": "MLX broke"}
    assert final["output"][0]["status"] == "incomplete"
    assert renderer.finished and renderer.feed(Finish("stop", USAGE)) == []


async def test_tool_calls_after_text_are_function_call_items() -> None:
    out = await _render(_renderer(), [
        TextDelta("Let me check."),
        ToolCallDelta(index=0, arguments='{"city":', id="call_a", name="get_weather"),
        ToolCallDelta(index=0, arguments='"Oslo"}'),
        ToolCallDelta(index=1, arguments="{}", id="call_b", name="get_time"),
        Finish("tool_calls", USAGE),
    ])
    kinds = [e["type"] for e in out]
    assert kinds[2:] == [
        "response.output_item.added", "response.content_part.added",
        "response.output_text.delta", "response.output_text.done",
        "response.content_part.done", "response.output_item.done",
        "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.delta", "response.function_call_arguments.done",
        "response.output_item.done",
        "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.done", "response.output_item.done",
        "response.completed",
    ]
    final = out[-1]["response"]
    assert final["status"] == "completed"
    call = final["output"][1]
    assert call["type"] == "function_call" and call["id"].startswith("fc_")
    assert (call["call_id"], call["name"], call["arguments"]) == (
        "call_a", "get_weather", '{"city":"Oslo"}')
    assert [e["output_index"] for e in out if e["type"] == "response.output_item.done"] == [
        0, 1, 2]
    _sdk_replay(out)
    messages = items_to_messages(final["output"])
    assert messages[0].tool_calls[0] == ToolCall("call_a", "get_weather", '{"city":"Oslo"}')


# --- pagination -----------------------------------------------------------------------------

def test_pages_walk_to_the_end_with_has_more_false() -> None:
    items = normalize_input(
        [{"role": "user", "content": f"turn {i}", "id": f"msg_{i}"} for i in range(5)], _no_refs)
    seen: list[str] = []
    after = None
    while True:
        page = page_items(items, after=after, limit=2, order="asc")
        ResponseItemList.model_validate(page)  # the SDK's own type accepts every page
        seen += [item["id"] for item in page["data"]]
        if not page["has_more"]:
            break
        after = page["last_id"]
    assert seen == [f"msg_{i}" for i in range(5)]
    desc = page_items(items, after=None, limit=20, order="desc")
    assert [i["id"] for i in desc["data"]] == [f"msg_{i}" for i in reversed(range(5))]
    assert desc["first_id"] == "msg_4" and desc["last_id"] == "msg_0" and not desc["has_more"]
    with pytest.raises(InvalidRequest):
        page_items(items, after="msg_x", limit=2, order="asc")


# --- truncation: probing turn cuts against an engine with one slot ----------------------------

class _OneSlotEngine:
    """Fits prompts of at most `limit` messages; like admission with one slot and no queue,
    a second open stream is an error (a probe waiting behind its own kept probe would hang)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open = 0
        self.submitted: list[int] = []

    async def submit(self, request: Any, *, admit: Any = None) -> Any:
        from app.errors import ContextLengthExceeded, Overloaded

        self.submitted.append(len(request.messages))
        if self.open:
            raise Overloaded("only one slot")
        if len(request.messages) > self.limit:
            raise ContextLengthExceeded("too long")
        self.open += 1
        engine = self

        class _Stream:
            model = "m"
            closed = False
            packed_tokens = 0

            async def aclose(self) -> None:
                if not self.closed:
                    self.closed = True
                    engine.open -= 1

        return _Stream()


def _fake_request(engine: _OneSlotEngine) -> Any:
    from types import SimpleNamespace

    spec = SimpleNamespace(id="m", aliases=())
    principal = Principal(key_id="k", name="k", admin=False, models=None, rpm=None, tpm=None,
                          client_ip="127.0.0.1")
    state = SimpleNamespace(engine=engine, registry=SimpleNamespace(resolve=lambda _: spec))
    return SimpleNamespace(app=SimpleNamespace(state=state),
                           state=SimpleNamespace(principal=principal))


def _history(turns: int) -> list[ChatMessage]:
    return [ChatMessage(role=role, content=f"{role} {i}")  # type: ignore[arg-type]
            for i in range(turns) for role in ("user", "assistant")]


@pytest.mark.parametrize(("turns", "limit", "dropped"),
                         [(8, 6, 12), (8, 17, 0), (8, 15, 2), (8, 2, 16), (3, 3, 4), (5, 9, 2)])
async def test_auto_truncation_drops_the_fewest_oldest_turns(turns: int, limit: int,
                                                             dropped: int) -> None:
    from app.api.openai.responses import _submit_fitting
    from app.core.types import GenerationRequest

    context = _history(turns)
    new = [ChatMessage(role="user", content="now")]
    engine = _OneSlotEngine(limit)
    req = parse_request({"model": "m", "input": "now", "truncation": "auto"})

    def build(history: list[ChatMessage]) -> GenerationRequest:
        return GenerationRequest(model="m", request_id="r", messages=[*history, *new])

    stream, cut = await _submit_fitting(_fake_request(engine), req, context, build)
    assert cut == dropped
    assert engine.open == 1 and not stream.closed
    assert engine.submitted[-1] == len(context) - dropped + 1


async def test_too_long_input_alone_and_disabled_truncation_are_400s() -> None:
    from app.api.openai.responses import _submit_fitting
    from app.core.types import GenerationRequest
    from app.errors import ContextLengthExceeded

    context = _history(3)

    def build(history: list[ChatMessage]) -> GenerationRequest:
        return GenerationRequest(model="m", request_id="r",
                                 messages=[*history, ChatMessage(role="user", content="x")])

    engine = _OneSlotEngine(0)
    auto = parse_request({"model": "m", "input": "x", "truncation": "auto"})
    with pytest.raises(ContextLengthExceeded, match="alone does not fit"):
        await _submit_fitting(_fake_request(engine), auto, context, build)
    assert engine.open == 0
    disabled = parse_request({"model": "m", "input": "x"})
    with pytest.raises(ContextLengthExceeded, match='truncation: "auto"'):
        await _submit_fitting(_fake_request(_OneSlotEngine(2)), disabled, context, build)


# --- the SSE body: framing, failure mid-stream, what gets stored ------------------------------

class _MemoryStore:
    def __init__(self) -> None:
        self.items: dict[str, Any] = {}

    async def put(self, item: Any) -> None:
        self.items[item.id] = item


class _FakeStream:
    model = "m"
    first_token_at = None  # read by record_finish

    def __init__(self, events: list[Any]) -> None:
        self.events = events
        self.closed = False

    async def batches(self, heartbeat: float) -> AsyncIterator[list[Any]]:
        yield []  # a quiet spell: the body must send a keep-alive event
        for event in self.events:
            if isinstance(event, Exception):
                raise event
            yield [event, TextDelta("")] if isinstance(event, TextDelta) else [event]

    async def aclose(self) -> None:
        self.closed = True


async def _sse_frames(events: list[Any], store: _MemoryStore) -> list[tuple[str, str]]:
    from types import SimpleNamespace

    from app.api.openai.responses import _sse, _Turn

    request: Any = SimpleNamespace(state=SimpleNamespace(log_fields={}))
    turn = _Turn(store=store, owner="k", ttl=60, keep=True,  # type: ignore[arg-type]
                 input_items=normalize_input("hi", _no_refs),
                 context=[ChatMessage(role="user", content="hi")])
    stream = _FakeStream(events)
    chunks = [chunk.decode() async for chunk in
              _sse(request, stream, _renderer(), turn, 1.0)]  # type: ignore[arg-type]
    assert stream.closed
    # Codex counts events, not comments, as activity: the quiet spell repeats in_progress.
    assert chunks[1].startswith("event: response.in_progress\n")
    frames = [f for c in chunks for f in c.split("\n\n") if f]
    parsed = []
    for frame in frames:
        lines = frame.strip().splitlines()
        parsed.append((lines[0].removeprefix("event: "), lines[-1].removeprefix("data: ")))
    return parsed


@pytest.mark.parametrize("failure", [Failed(EngineFailure("boom")), RuntimeError("boom")])
async def test_sse_failure_mid_stream_is_response_failed_then_done(failure: Any) -> None:
    import json

    store = _MemoryStore()
    frames = await _sse_frames([TextDelta("par"), failure], store)
    assert frames[-1] == ("data: [DONE]", "[DONE]")
    name, data = frames[-2]
    payload = json.loads(data)
    assert name == payload["type"] == "response.failed"
    assert payload["response"]["error"]["code"] == "server_error"
    assert all(json.loads(d)["type"] == n for n, d in frames[:-1])
    assert store.items == {}  # a failed turn cannot be continued, so it is not stored


async def test_sse_stores_the_turn_with_its_output_in_the_context() -> None:
    import json

    store = _MemoryStore()
    frames = await _sse_frames([TextDelta("Hello"), Finish("stop", USAGE)], store)
    final = json.loads(frames[-2][1])
    assert final["type"] == "response.completed"
    [saved] = store.items.values()
    assert saved.response == final["response"] and saved.owner == "k"
    assert saved.context == [{"role": "user", "content": "hi"},
                             {"role": "assistant", "content": "Hello"}]


def test_hosted_tools_are_dropped_and_namespaces_flattened() -> None:
    """Codex's shape: function tools, a namespace of functions and the hosted web_search."""
    req = parse_request({"model": "m", "input": "x", "tools": [
        {"type": "function", "name": "shell", "parameters": {"type": "object"}},
        {"type": "namespace", "name": "mcp", "tools": [
            {"type": "function", "name": "read_page", "parameters": {"type": "object"}}]},
        {"type": "web_search"},
        {"type": "file_search", "vector_store_ids": ["v"]},
    ], "reasoning": {"effort": "low", "summary": "auto"}, "store": False,
        "include": ["reasoning.encrypted_content"], "prompt_cache_key": "k",
        "client_metadata": {"a": "b"}, "parallel_tool_calls": True})
    assert [t.name for t in req.tool_specs()] == ["shell", "read_page"]
    assert req.dropped_tools == ["web_search", "file_search"]
    assert req.template_kwargs() == {"reasoning_effort": "low"}


async def _queued_frames(outcome: Any) -> list[str]:
    """`_sse_queued` with a slot that comes after three quiet heartbeats (or is refused)."""
    import asyncio
    from types import SimpleNamespace

    from app.api.openai.responses import _sse_queued, _Turn

    async def later() -> Any:
        await asyncio.sleep(0.35)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome, 0

    request: Any = SimpleNamespace(state=SimpleNamespace(log_fields={}))
    store = _MemoryStore()

    def turn_for(dropped: int) -> _Turn:
        return _Turn(store=store, owner="k", ttl=60, keep=False,  # type: ignore[arg-type]
                     input_items=[], context=[])

    chunks = [chunk.decode() async for chunk in _sse_queued(
        request, asyncio.ensure_future(later()), _renderer(), turn_for, 0.1)]
    return [line.removeprefix("event: ") for chunk in chunks for line in chunk.splitlines()
            if line.startswith("event: ")]


async def test_a_queued_stream_answers_at_once_and_keeps_the_client_waiting() -> None:
    stream = _FakeStream([TextDelta("Paris"), Finish("stop", Usage(3, 1))])
    names = await _queued_frames(stream)
    first_output = names.index("response.output_item.added")
    assert names[:2] == ["response.created", "response.in_progress"]
    assert names[2:first_output].count("response.in_progress") >= 1  # while it waited
    assert names[-1] == "response.completed" and stream.closed


async def test_a_queued_stream_that_is_refused_later_fails_in_band() -> None:
    from app.errors import Overloaded

    names = await _queued_frames(Overloaded("queue full", retry_after=1))
    assert names[0] == "response.created" and names[-1] == "response.failed"
