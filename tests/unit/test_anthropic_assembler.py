"""The Anthropic event assembler: block indices, tool_use input deltas, stop reasons, and the
non-stream message as the fold of the stream events."""

from __future__ import annotations

import json

from app.api.anthropic.messages import MessageAssembler, fold
from app.api.anthropic.schema import MessagesRequest, resolve_model
from app.core.types import Finish, TextDelta, ToolCallDelta, Usage


def _run(events: list[object]) -> list[dict[str, object]]:
    assembler = MessageAssembler("msg_1", "m", prompt_tokens=10)
    out = [assembler.start()]
    for event in events:
        out += assembler.feed(event)  # type: ignore[arg-type]
    return out


def test_text_then_two_tool_calls_fold_to_blocks() -> None:
    usage = Usage(prompt_tokens=10, completion_tokens=7, cached_tokens=4)
    events = _run([
        TextDelta("Let me "), TextDelta("check."),
        ToolCallDelta(0, "", id="toolu_a", name="weather"),
        ToolCallDelta(0, '{"city": '), ToolCallDelta(0, '"Paris"}'),
        ToolCallDelta(1, '{"q": 1}', id="toolu_b", name="search"),
        Finish("tool_calls", usage),
    ])
    kinds = [e["type"] for e in events]
    assert kinds == ["message_start",
                     "content_block_start", "content_block_delta", "content_block_delta",
                     "content_block_stop",
                     "content_block_start", "content_block_delta", "content_block_delta",
                     "content_block_stop",
                     "content_block_start", "content_block_delta", "content_block_stop",
                     "message_delta", "message_stop"]
    starts = [e for e in events if e["type"] == "content_block_start"]
    assert [e["index"] for e in starts] == [0, 1, 2]
    message = fold(events)
    assert message["content"] == [
        {"type": "text", "text": "Let me check."},
        {"type": "tool_use", "id": "toolu_a", "name": "weather", "input": {"city": "Paris"}},
        {"type": "tool_use", "id": "toolu_b", "name": "search", "input": {"q": 1}},
    ]
    assert message["stop_reason"] == "tool_use" and message["stop_sequence"] is None
    assert message["usage"] == {"input_tokens": 6, "output_tokens": 7,
                                "cache_read_input_tokens": 4, "cache_creation_input_tokens": 0}
    json.dumps(events)  # every event is plain JSON


def test_stop_reasons_and_an_empty_answer() -> None:
    usage = Usage(prompt_tokens=3, completion_tokens=0)
    empty = fold(_run([Finish("length", usage)]))
    assert empty["content"] == [{"type": "text", "text": ""}]
    assert empty["stop_reason"] == "max_tokens"
    stopped = fold(_run([TextDelta("a"), Finish("stop", usage, stop_sequence="END")]))
    assert stopped["stop_reason"] == "stop_sequence" and stopped["stop_sequence"] == "END"
    assert fold(_run([TextDelta("a"), Finish("stop", usage)]))["stop_reason"] == "end_turn"


def test_model_patterns() -> None:
    patterns = {"*haiku*": "fast", "claude-*": "@default"}
    assert resolve_model("claude-3-5-haiku-20241022", patterns, "big") == "fast"
    assert resolve_model("claude-sonnet-4-5", patterns, "big") == "big"
    assert resolve_model("qwen3", patterns, "big") == "qwen3"


def test_translation_of_blocks() -> None:
    body = MessagesRequest.model_validate({
        "model": "m", "max_tokens": 5,
        "system": [{"type": "text", "text": "A"}, {"type": "text", "text": "B"}],
        "messages": [
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "hmm", "signature": "s"},
                {"type": "text", "text": "calling"},
                {"type": "tool_use", "id": "t1", "name": "f", "input": {"x": 1}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "t1", "content": "ok"},
                {"type": "tool_result", "tool_use_id": "t2", "is_error": True,
                 "content": [{"type": "text", "text": "boom"}]}]},
        ],
        "tools": [{"name": "f", "input_schema": {"type": "object"}},
                  {"type": "web_search_20250305", "name": "web_search"}],
    })
    messages = body.internal_messages()
    assert [(m.role, m.content) for m in messages] == [
        ("system", "A\n\nB"), ("user", "q"), ("assistant", "calling"),
        ("tool", "ok"), ("tool", "Error: boom")]
    assert messages[2].tool_calls[0].name == "f"
    assert json.loads(messages[2].tool_calls[0].arguments) == {"x": 1}
    assert [m.tool_call_id for m in messages[3:]] == ["t1", "t2"]
    assert [t.name for t in body.tool_specs()] == ["f"]
    assert body.dropped_tools() == ["web_search"]


def test_thinking_block_gets_a_signature_and_the_switch_reaches_the_template() -> None:
    from app.core.types import ReasoningDelta

    usage = Usage(prompt_tokens=3, completion_tokens=4)
    events = _run([ReasoningDelta("Let me think"), ReasoningDelta("."), TextDelta("Paris."),
                   Finish("stop", usage)])
    deltas = [e["delta"]["type"] for e in events if e["type"] == "content_block_delta"]
    assert deltas == ["thinking_delta", "thinking_delta", "signature_delta", "text_delta"]
    message = fold(events)
    thinking, text = message["content"]
    assert thinking["thinking"] == "Let me think." and thinking["signature"].startswith("mlxgw-")
    assert text == {"type": "text", "text": "Paris."}
    body = {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "q"}]}
    for kind, expected in (("enabled", {"enable_thinking": True}),
                           ("disabled", {"enable_thinking": False}), ("adaptive", {})):
        request = MessagesRequest.model_validate({**body, "thinking": {"type": kind}})
        assert request.template_kwargs() == expected
