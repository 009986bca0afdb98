"""Our parser driven the way canitoolcall replays an engine: one parse of the whole output,
and streamed parses under its chunking strategies. Shared by the unit test and the bench script.

The fixtures carry token ids of tokenizers we do not ship, so the stream is split into units
the way a tokenizer would: each format marker is one unit (special tokens are atomic), other
text goes in word / space / punctuation pieces. canitoolcall's seeded strategies then group
those units exactly as they group token ids.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from functools import cache
from typing import Any

from canitoolcall.checks import case_status, run_checks
from canitoolcall.chunking import DEFAULT_STRATEGIES, ChunkStrategy, split
from canitoolcall.fixtures import Fixture
from canitoolcall.pytest_plugin import family_for
from canitoolcall.results import Observation, ParsedToolCall, ParseResult, Status

from app.core.types import ReasoningDelta, TextDelta, ToolCallDelta
from app.output.detect import starts_in_reasoning
from app.output.formats import FORMATS, Format
from app.output.harmony import HarmonyParser
from app.output.parser import OutputParser

FAMILY_FORMAT = {
    "qwen3-hermes": "hermes", "qwen3-xml": "qwen3_xml", "glm": "glm", "kimi": "kimi",
    "gemma4": "gemma4", "deepseek": "deepseek", "llama": "llama", "mistral": "mistral",
    "gpt-oss": "harmony",
}


def _format(fixture: Fixture) -> Format | None:
    name = FAMILY_FORMAT[fixture.family]
    if fixture.reference_model.startswith("moonshotai/Kimi-K3"):
        name = "kimi_k3"
    return None if name == "harmony" else FORMATS[name]


def _schemas(fixture: Fixture) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for tool in fixture.tools:
        fn = tool.get("function", tool)
        if isinstance(fn, dict) and isinstance(fn.get("name"), str):
            out[fn["name"]] = fn.get("parameters") or {}
    return out


def new_parser(fixture: Fixture) -> OutputParser | HarmonyParser:
    fmt = _format(fixture)
    if fmt is None:
        return HarmonyParser()
    prompt = fixture.generation_prompt or _default_prompt(fixture)
    return OutputParser(fmt, schemas=_schemas(fixture),
                        start_in_reasoning=starts_in_reasoning(prompt, fmt.think))


def _default_prompt(fixture: Fixture) -> str:
    """The reference model's generation prompt, for fixtures that do not record theirs: we
    render the prompt ourselves, so we always know whether it opened a think block."""
    family = family_for(fixture)
    for model in family.reference_models if family else ():
        if model.repo == fixture.reference_model:
            return model.default_generation_prompt or ""
    return ""


def run(fixture: Fixture, deltas: Sequence[str]) -> ParseResult:
    """Feed `deltas`, accumulate the events as an OpenAI client merges chat chunks."""
    parser = new_parser(fixture)
    content: list[str] = []
    reasoning: list[str] = []
    calls: dict[int, list[str]] = {}
    events = [event for delta in deltas for event in parser.feed(delta)]
    events += parser.finish()
    for event in events:
        if isinstance(event, TextDelta):
            content.append(event.text)
        elif isinstance(event, ReasoningDelta):
            reasoning.append(event.text)
        elif isinstance(event, ToolCallDelta):
            slot = calls.setdefault(event.index, ["", ""])
            slot[0] += event.name or ""
            slot[1] += event.arguments
    return ParseResult(
        content="".join(content) or None,
        reasoning_content="".join(reasoning) or None,
        tool_calls=tuple(ParsedToolCall(n, a) for _, (n, a) in sorted(calls.items())),
    )


def parse(fixture: Fixture) -> ParseResult:
    return run(fixture, [fixture.raw_output])


@cache
def _unit_pattern(markers: tuple[str, ...]) -> re.Pattern[str]:
    alternatives = [re.escape(m) for m in sorted(markers, key=len, reverse=True)]
    return re.compile("|".join([*alternatives, r" ?\w+", r"\s+", r"[^\w\s]"]))


def markers_of(fixture: Fixture) -> tuple[str, ...]:
    family = family_for(fixture)
    found = set(family.markers if family else ())
    fmt = _format(fixture)
    if fmt is not None:
        found |= {b.start for b in fmt.blocks} | {b.end for b in fmt.blocks if b.end}
        found |= set(fmt.wrappers) | {m for pair in fmt.think for m in pair}
    else:
        found |= {"<|channel|>", "<|message|>", "<|end|>", "<|call|>", "<|start|>",
                  "<|constrain|>", "<|return|>"}
    return tuple(sorted(found))


def units(fixture: Fixture) -> tuple[list[str], set[str]]:
    markers = markers_of(fixture)
    pieces = _unit_pattern(markers).findall(fixture.raw_output)
    assert "".join(pieces) == fixture.raw_output, fixture.id
    return pieces, set(markers)


def stream(fixture: Fixture, strategy: ChunkStrategy) -> ParseResult:
    pieces, special = units(fixture)
    groups = split(pieces, strategy, special=special)
    return run(fixture, ["".join(group) for group in groups])


def observe(fixture: Fixture) -> Observation:
    return Observation(nonstream=parse(fixture),
                       streams={s.id: stream(fixture, s) for s in DEFAULT_STRATEGIES})


def case(fixture: Fixture) -> tuple[Status, list[str]]:
    """The fixture's status as canitoolcall scores an engine, and its failing checks."""
    rows = run_checks(fixture, family_for(fixture), observe(fixture))
    bad = [f"{r.check}[{r.strategy}]: {r.detail}" for r in rows
           if r.status in (Status.FAIL, Status.ERROR)]
    return case_status(rows), bad


def dump(result: ParseResult) -> str:
    return json.dumps(result.to_dict(), ensure_ascii=False)
