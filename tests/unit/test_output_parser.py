"""The streaming output parser: content, reasoning and calls, however the text is split."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from app import metrics
from app.core.types import ReasoningDelta, TextDelta, ToolCallDelta, ToolSpec
from app.output.detect import starts_in_reasoning
from app.output.formats import FORMATS
from app.output.generic_tools import TOOL_CALL_END, TOOL_CALL_START, render_tools_prompt
from app.output.parser import OutputEvent, OutputParser


def _parser(name: str = "generic", **kwargs: object) -> OutputParser:
    return OutputParser(FORMATS[name], **kwargs)  # type: ignore[arg-type]


def _run(parser: OutputParser, deltas: list[str]) -> list[OutputEvent]:
    events = [e for d in deltas for e in parser.feed(d)]
    return events + parser.finish()


def _merged(events: list[OutputEvent]) -> dict[str, object]:
    calls: dict[int, list[str]] = {}
    for e in events:
        if isinstance(e, ToolCallDelta):
            slot = calls.setdefault(e.index, ["", "", ""])
            slot[0] += e.id or ""
            slot[1] += e.name or ""
            slot[2] += e.arguments
    return {
        "content": "".join(e.text for e in events if isinstance(e, TextDelta)),
        "reasoning": "".join(e.text for e in events if isinstance(e, ReasoningDelta)),
        "calls": [(n, json.loads(a)) for _, (_, n, a) in sorted(calls.items())],
        "ids": [bool(i) for _, (i, _, _) in sorted(calls.items())],
    }


SAMPLE = (
    '<think>\nCheck both.\n</think>\n\nLet me look. <tool_call>\n{"name": "get_weather", '
    '"arguments": {"city": "Par</tool_call>is", "n": [1, {"x": "}"}]}}\n</tool_call>\n'
    '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>'
)
EXPECTED = {
    "content": "Let me look.",
    "reasoning": "Check both.",
    "calls": [("get_weather", {"city": "Par</tool_call>is", "n": [1, {"x": "}"}]}),
              ("get_time", {})],
    "ids": [True, True],
}


def test_generic_format_whole() -> None:
    assert _merged(_run(_parser(), [SAMPLE])) == EXPECTED


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=len(SAMPLE)), max_size=40))
def test_any_split_gives_the_same_answer(cuts: list[int]) -> None:
    points = sorted(set(cuts))
    deltas = [SAMPLE[a:b] for a, b in zip([0, *points], [*points, len(SAMPLE)], strict=True)]
    events = _run(_parser(), [d for d in deltas if d])
    assert _merged(events) == EXPECTED
    text = "".join(e.text for e in events if isinstance(e, TextDelta))
    assert "<tool_call" not in text and "<think" not in text


def test_arguments_stream_as_they_are_written() -> None:
    parser = _parser()
    first = parser.feed('<tool_call>{"name": "write", "arguments": {"text": "hel')
    assert first[0] == ToolCallDelta(index=0, arguments="", id=first[0].id, name="write")  # type: ignore[union-attr]
    assert first[1] == ToolCallDelta(index=0, arguments='{"text": "hel')
    assert parser.feed('lo"}}</tool_call>') == [ToolCallDelta(index=0, arguments='lo"}')]
    assert parser.finish() == []


def test_text_streams_and_only_a_possible_marker_is_held_back() -> None:
    parser = _parser()
    assert parser.feed("Hello <tool") == [TextDelta("Hello")]
    assert parser.feed("box> is a tag") == [TextDelta(" <toolbox> is a tag")]


def test_whitespace_is_sent_as_it_comes_where_no_call_can_follow() -> None:
    # A stream's "\n\n" between paragraphs reaches the client with its own token, not with
    # the next word: nothing could make it a separator to drop.
    plain = _parser(parse_tools=False)
    assert plain.feed("The end.") == [TextDelta("The end.")]
    assert plain.feed("\n\n") == [TextDelta("\n\n")]
    assert plain.feed("Next") == [TextDelta("Next")]
    assert plain.finish() == []
    # Where a call may follow, it waits for the next text: before a call it is the template's.
    tools = _parser()
    assert tools.feed("The end.") == [TextDelta("The end.")]
    assert tools.feed("\n\n") == []
    assert tools.feed("Next") == [TextDelta("\n\nNext")]
    assert _merged(_run(_parser(), ["Look.\n\n", '<tool_call>{"name": "f", "arguments": {}}'
                                    "</tool_call>"]))["content"] == "Look."


def test_unparseable_call_comes_back_as_text_and_is_counted() -> None:
    before = metrics.TOOL_CALL_PARSE_FAILURES.labels("generic")._value.get()
    events = _run(_parser(), ['Sure. <tool_call>{"name": get_weather}</tool_call>'])
    assert _merged(events)["content"] == 'Sure. {"name": get_weather}'
    assert not any(isinstance(e, ToolCallDelta) for e in events)
    assert metrics.TOOL_CALL_PARSE_FAILURES.labels("generic")._value.get() == before + 1


def test_no_tools_offered_means_no_call_parsing() -> None:
    text = '<tool_call>{"name": "f", "arguments": {}}</tool_call>'
    events = _run(_parser(parse_tools=False), [text])
    assert _merged(events)["content"] == text


def test_prompt_that_opens_a_think_block_starts_in_reasoning() -> None:
    assert starts_in_reasoning("<|im_start|>assistant\n<think>\n", (("<think>", "</think>"),))
    assert not starts_in_reasoning("<|im_start|>assistant\n<think>\n\n</think>\n\n",
                                   (("<think>", "</think>"),))
    parser = _parser("hermes", start_in_reasoning=True)
    merged = _merged(_run(parser, ["Hmm.\n</think>\n\nAnswer."]))
    assert merged["reasoning"] == "Hmm." and merged["content"] == "Answer."


def test_mistral_call_ends_with_its_json() -> None:
    raw = ('[TOOL_CALLS]a[ARGS]{"s": "[TOOL_CALLS]x{"}[TOOL_CALLS]b[ARGS]{}')
    merged = _merged(_run(_parser("mistral"), list(raw)))
    assert merged["calls"] == [("a", {"s": "[TOOL_CALLS]x{"}), ("b", {})]


def test_generic_tools_prompt_names_every_tool_and_the_markers() -> None:
    tools = [ToolSpec("get_weather", "Weather now", {"type": "object", "properties": {
        "city": {"type": "string"}}, "required": ["city"]}), ToolSpec("get_time")]
    prompt = render_tools_prompt(tools)
    assert '<tool name="get_weather">' in prompt and '<tool name="get_time">' in prompt
    assert TOOL_CALL_START in prompt and TOOL_CALL_END in prompt
    assert "must call" in render_tools_prompt(tools, required=True)
