"""Packing a conversation into the context (overflow = "pack"): what is kept, exactly.

A character is a token here, so every cut can be checked to the character; the last test
packs the real Claude Code request with the demo model's tokenizer and template.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from app.core.types import ChatMessage, GenerationRequest, ToolCall, ToolSpec
from app.engine.pack import (
    DESCRIPTION_MARKER,
    DESCRIPTION_STEP,
    OUTPUT_MARKER,
    OUTPUT_STEP,
    Tokens,
    droppable_units,
    pack,
)

CHARS = Tokens(encode=lambda text: [ord(c) for c in text],
               decode=lambda ids: "".join(chr(i) for i in ids))


def count(messages: list[ChatMessage], tools: list[ToolSpec]) -> int:
    """One token per character of every content, call, tool description and schema."""
    total = sum(len(m.content) + sum(len(c.arguments) + len(c.name) for c in m.tool_calls)
                for m in messages)
    return total + sum(len(t.name) + len(t.description) + len(json.dumps(t.parameters))
                       for t in tools)


def call(name: str) -> tuple[ToolCall, ...]:
    return (ToolCall(id=f"id-{name}", name=name, arguments="{}"),)


SYSTEM = ChatMessage(role="system", content="S" * 10)
TOOL = ToolSpec("read", "Reads a file.", {"type": "object", "properties": {
    "path": {"type": "string", "description": "Where."}}})


def test_oldest_turns_go_first_keeping_system_tools_and_the_newest_turns() -> None:
    history = [
        SYSTEM,
        ChatMessage(role="user", content="u1" * 10),
        ChatMessage(role="assistant", content="a1" * 10),
        ChatMessage(role="system", content="mid"),  # Claude Code's mid-conversation system
        ChatMessage(role="user", content="u2" * 10),
        ChatMessage(role="assistant", content="", tool_calls=call("read")),
        ChatMessage(role="tool", content="r2" * 10, tool_call_id="id-read"),
        ChatMessage(role="assistant", content="a2" * 5),
        ChatMessage(role="user", content="u3"),
    ]
    full = count(history, [TOOL])
    packed = pack(history, [TOOL], full - 1, count, CHARS)
    assert packed is not None
    assert packed.messages == [SYSTEM, history[3], *history[4:]]  # turn 1 out, "mid" stays
    assert packed.tools == [TOOL] and packed.dropped_messages == 2
    assert packed.prompt_tokens == full - 40
    # Tighter: the second turn goes too, whole (its call never without its result).
    packed = pack(history, [TOOL], full - 41, count, CHARS)
    assert packed is not None
    assert packed.messages == [SYSTEM, history[3], history[8]]
    assert packed.dropped_messages == 6


def test_inside_an_agent_loop_the_oldest_exchanges_go_with_their_results() -> None:
    task = ChatMessage(role="user", content="fix the test")
    loop = [SYSTEM, task]
    for n in range(3):
        loop += [ChatMessage(role="assistant", content=f"step {n}", tool_calls=call(f"t{n}")),
                 ChatMessage(role="tool", content=f"result {n} " * 5, tool_call_id=f"id-t{n}")]
    assert droppable_units(loop) == [[2, 3], [4, 5]]  # the newest exchange is never dropped
    full = count(loop, [])
    packed = pack(loop, [], full - 1, count, CHARS)
    assert packed is not None
    assert packed.messages == [SYSTEM, task, *loop[4:]]
    packed = pack(loop, [], full - count(loop[2:4], []) - 1, count, CHARS)
    assert packed is not None
    assert packed.messages == [SYSTEM, task, *loop[6:]]


def test_then_long_tool_outputs_lose_their_middle_with_a_marker() -> None:
    output = "".join(f"line {n:03d}\n" for n in range(100))  # 900 characters
    conversation = [SYSTEM, ChatMessage(role="user", content="run it"),
                    ChatMessage(role="assistant", content="", tool_calls=call("run")),
                    ChatMessage(role="tool", content=output, tool_call_id="id-run")]
    limit = count(conversation, [TOOL]) - 600
    packed = pack(conversation, [TOOL], limit, count, CHARS)
    assert packed is not None and packed.cut_outputs == 1 and packed.dropped_messages == 0
    assert packed.messages[:3] == conversation[:3] and packed.tools == [TOOL]
    cut = packed.messages[3]
    assert cut.role == "tool" and cut.tool_call_id == "id-run"
    # The largest cap (in steps) that fits: head and tail halves of it, and what went.
    marker_len = len(OUTPUT_MARKER.format(n=100))  # what is cut has 3 digits
    cap = (900 - 600 - marker_len) // OUTPUT_STEP * OUTPUT_STEP
    expected = output[:cap // 2] + OUTPUT_MARKER.format(n=900 - cap) + output[-(cap - cap // 2):]
    assert cut.content == expected
    assert packed.prompt_tokens <= limit


def test_then_tool_descriptions_are_shortened_and_the_system_prompt_never() -> None:
    tools = [ToolSpec("edit", "Edits a file. " * 20, {"type": "object", "properties": {
        "path": {"type": "string", "description": "The file to edit, absolute. " * 5}}}),
        TOOL]
    conversation = [SYSTEM, ChatMessage(role="user", content="go")]
    full = count(conversation, tools)
    packed = pack(conversation, tools, full - 300, count, CHARS)
    assert packed is not None and packed.messages == conversation
    assert packed.cut_descriptions == 1
    edit = packed.tools[0]
    # One cap, a whole number of steps, for the tool's and its argument's description.
    cap = next(c for c in range(DESCRIPTION_STEP, 300, DESCRIPTION_STEP)
               if edit.description == ("Edits a file. " * 20)[:c].rstrip() + DESCRIPTION_MARKER)
    path = edit.parameters["properties"]["path"]["description"]
    assert path == ("The file to edit, absolute. " * 5)[:cap].rstrip() + DESCRIPTION_MARKER
    assert packed.tools[1] == TOOL  # short enough already
    assert edit.parameters["properties"]["path"]["type"] == "string"
    assert packed.prompt_tokens <= full - 300


def test_last_the_newest_user_message_loses_its_middle() -> None:
    """A resume turn with long reminders, beside a system prompt and tools that already fill
    the window: the descriptions go, then the user message keeps its head and tail."""
    message = "Resume directly. " + "<reminder>" * 100 + " Continue the task."
    conversation = [SYSTEM, ChatMessage(role="user", content=message)]
    tools = [ToolSpec("edit", "Edits a file. " * 10, {"type": "object"})]
    limit = count(conversation, tools) - 900
    packed = pack(conversation, tools, limit, count, CHARS)
    assert packed is not None and packed.prompt_tokens <= limit
    assert packed.messages[0] == SYSTEM and packed.tools[0].description == ""
    assert packed.cut_messages == 1 and packed.cut_descriptions == 1
    cap = len(message) - int(packed.messages[1].content.split(" tokens of this")[0]
                             .rsplit("[... ", 1)[1])
    assert cap % OUTPUT_STEP == 0
    assert packed.messages[1].content == (message[:cap // 2] + OUTPUT_MARKER.format(
        n=len(message) - cap) + message[-(cap - cap // 2):])


def test_what_cannot_be_packed_is_none() -> None:
    conversation = [ChatMessage(role="system", content="S" * 500),
                    ChatMessage(role="user", content="go")]
    assert pack(conversation, [TOOL], 100, count, CHARS) is None


def test_the_real_claude_code_request_fits_the_demo_model(tokenizer: Any) -> None:
    """Claude Code's first request (~20k tokens with its 24 tools) packed for an 8k model:
    its system prompt and every tool stay, and the prompt fits."""
    from app.api.anthropic.schema import MessagesRequest
    from app.engine.prompt import packed_render, render

    fixture = Path(__file__).parents[1] / "fixtures" / "client_tools" / "claude.request.json"
    body = MessagesRequest.model_validate(json.loads(fixture.read_text())["body"])
    request = GenerationRequest(model="m", request_id="r", messages=body.internal_messages(),
                                tools=body.tool_specs(), tool_choice="auto")
    assert len(render(tokenizer, request).ids) > 15_000
    result = packed_render(tokenizer, request, 8192 - 1024)
    assert result is not None
    prompt, packed = result
    assert len(prompt.ids) == packed.prompt_tokens <= 8192 - 1024
    assert [t.name for t in packed.tools] == [t.name for t in request.tools]
    assert packed.messages == request.messages  # nothing but descriptions needed cutting
    assert all(f'<tool name="{t.name}">' in prompt.text for t in request.tools)


def test_the_policy_comes_from_the_request_then_the_model_then_the_engine(
        tokenizer: Any, tmp_path: Path) -> None:
    """[[models]] overflow = "error" leaves a too-long prompt alone (the engine refuses it
    later); the engine default packs it; a request's own choice wins over both."""
    import asyncio
    import dataclasses
    from types import SimpleNamespace

    from app.engine.engine import Engine
    from app.engine.prompt import render
    from app.models.demo import demo_model_dir
    from app.models.registry import ModelRegistry
    from app.settings import Settings

    folder = demo_model_dir(Settings().cache_dir)
    settings = Settings(models=[  # type: ignore[list-item]
        {"id": "strict", "path": str(folder), "overflow": "error"},
        {"id": "packs", "path": str(folder), "answer_reserve_tokens": 8}],
        cache_dir=tmp_path)
    registry = ModelRegistry.from_settings(settings, log_warnings=False)
    assert registry.resolve("strict").overflow == "error"
    engine = Engine(settings, registry)
    history = [ChatMessage(role="user", content="Tell me about Paris and its museums."),
               ChatMessage(role="assistant", content="The Louvre and the Orsay."),
               ChatMessage(role="user", content="Capital of France?")]
    request = GenerationRequest(model="m", request_id="r", messages=history)
    prompt = render(tokenizer, request)

    def fit(model: str, request: GenerationRequest) -> int:
        # A context 4 tokens short of the whole prompt: it fits only without the first turn.
        loaded = SimpleNamespace(spec=registry.resolve(model), tokenizer=tokenizer, id=model,
                                 context_length=len(prompt.ids) + 8 - 4)
        fitted, removed = asyncio.run(engine._fit(request, loaded, prompt))  # type: ignore[arg-type]
        assert removed == len(prompt.ids) - len(fitted.ids)
        return removed

    assert fit("strict", request) == 0
    assert fit("packs", request) > 0
    assert fit("packs", dataclasses.replace(request, overflow="error")) == 0
    assert fit("strict", dataclasses.replace(request, overflow="pack")) > 0
