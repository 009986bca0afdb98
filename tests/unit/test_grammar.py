"""Grammars for constrained decoding, driven token by token with the demo model's tokenizer.

No model runs here: logits are random, so every document below is the grammar's doing. A walk
takes the highest allowed logit each step until EOS, as greedy decoding would.
"""

from __future__ import annotations

import json
import random
import re
from typing import Any

import jsonschema
import mlx.core as mx
import pytest

from app.core.types import JsonConstraint, ToolCallConstraint, ToolSpec
from app.errors import InvalidRequest
from app.output import grammar
from bench.grammar_schemas import SCHEMAS


def walk(tokenizer: Any, processor: Any, *, seed: int, max_steps: int = 300,
         bias: dict[int, float] | None = None) -> tuple[str, bool]:
    """Decode with random logits through `processor`; the text and whether EOS ended it."""
    key = mx.random.key(seed)
    eos = set(tokenizer.eos_token_ids)
    context = [1]  # stands in for the prompt's last token
    out: list[int] = []
    for _ in range(max_steps):
        key, draw = mx.random.split(key)
        logits = mx.random.normal((1, 49152), key=draw)
        for token, value in (bias or {}).items():
            logits[0, token] = value
        masked = processor(mx.array(context), logits)
        token = int(mx.argmax(masked, axis=-1).item())
        if token in eos:
            return tokenizer.decode(out), True
        out.append(token)
        context.append(token)
    return tokenizer.decode(out), False


def _closing_bias(tokenizer: Any) -> dict[int, float]:
    # Random logits rarely pick a closing quote; nudge toward ending strings and containers so
    # walks end well inside max_steps (the grammar still decides what is allowed).
    ids = {}
    for text in ['"', '"}', '"]', "}", "]", '",']:
        encoded = tokenizer.encode(text, add_special_tokens=False)
        if len(encoded) == 1:
            ids[encoded[0]] = 3.5
    return ids


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_every_everyday_schema_walk_validates(tokenizer: Any, name: str) -> None:
    schema = SCHEMAS[name]
    compiler = grammar.compiler_for(tokenizer)
    processor = compiler.processor(JsonConstraint(schema=schema, param="response_format"))
    text, ended = walk(tokenizer, processor, seed=list(SCHEMAS).index(name),
                       bias=_closing_bias(tokenizer))
    assert ended, f"no EOS within the step budget: {text[:200]!r}"
    jsonschema.validate(json.loads(text), schema)


def test_json_object_mode_gives_an_object(tokenizer: Any) -> None:
    processor = grammar.compiler_for(tokenizer).processor(JsonConstraint(None, "response_format"))
    eos = next(iter(tokenizer.eos_token_ids))
    # EOS first whenever allowed, then `}`: the shortest object, `{}`, then the end.
    close = tokenizer.encode("}", add_special_tokens=False)[0]
    text, ended = walk(tokenizer, processor, seed=3, bias={eos: 50.0, close: 40.0})
    assert ended
    assert json.loads(text) == {}


def test_eos_is_masked_until_the_document_is_complete(tokenizer: Any) -> None:
    eos = next(iter(tokenizer.eos_token_ids))
    processor = grammar.compiler_for(tokenizer).processor(
        JsonConstraint({"type": "object", "properties": {"a": {"type": "integer"}},
                        "required": ["a"]}, "response_format"))
    # EOS has the highest logit at every step: it may win only once `{"a": N}` is complete.
    text, ended = walk(tokenizer, processor, seed=5, bias={**_closing_bias(tokenizer),
                                                           eos: 50.0})
    assert ended
    assert re.fullmatch(r'\{"a": -?\d+\}', text), text


TOOLS = (
    ToolSpec("get_weather", parameters={
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                         "unit": {"enum": ["c", "f"]}},
        "required": ["city", "unit"], "additionalProperties": False}),
    ToolSpec("add", parameters={
        "type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9},
                                         "b": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["a", "b"], "additionalProperties": False}),
)

CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.S)


@pytest.mark.parametrize("parallel", [False, True])
def test_forced_calls_name_a_tool_and_match_its_parameters(tokenizer: Any,
                                                           parallel: bool) -> None:
    compiler = grammar.compiler_for(tokenizer)
    for seed in range(6):
        processor = compiler.processor(ToolCallConstraint(TOOLS, forced=True, parallel=parallel))
        text, ended = walk(tokenizer, processor, seed=seed, bias=_closing_bias(tokenizer))
        assert ended, text
        calls = CALL.findall(text)
        assert calls and CALL.sub("", text) == "", text
        if not parallel:
            assert len(calls) == 1
        for body in calls:
            call = json.loads(body)
            assert set(call) == {"name", "arguments"}
            tool = next(t for t in TOOLS if t.name == call["name"])
            jsonschema.validate(call["arguments"], tool.parameters)


def test_auto_mode_leaves_text_free_and_constrains_a_started_call(tokenizer: Any) -> None:
    strict = (ToolSpec("add", parameters=TOOLS[1].parameters, strict=True),)
    processor = grammar.compiler_for(tokenizer).processor(
        ToolCallConstraint(strict, forced=False, parallel=False))
    logits = mx.random.normal((1, 49152))
    # Before any marker the logits pass through untouched.
    assert mx.array_equal(processor(mx.array([1]), logits), logits)
    prefix = tokenizer.encode("Sure. <tool_call>", add_special_tokens=False)
    context = [1]
    for token in prefix:
        context.append(token)
        masked = processor(mx.array(context), logits)
    # The marker was fed: the next token must start `{"name": "add"`.
    allowed = [i for i, v in enumerate(masked[0].tolist()) if v != float("-inf")]
    assert allowed and all(tokenizer.decode([i]).startswith("{") or
                           "{".startswith(tokenizer.decode([i])) for i in allowed)


def test_bad_schema_is_refused_naming_the_field() -> None:
    with pytest.raises(InvalidRequest) as caught:
        grammar.check(JsonConstraint({"type": "foo"}, "response_format.json_schema.schema"))
    assert caught.value.param == "response_format.json_schema.schema"
    assert "foo" in caught.value.message
    with pytest.raises(InvalidRequest) as caught:
        grammar.check(JsonConstraint({"type": "array", "uniqueItems": True}, "text.format"))
    assert "uniqueItems" in caught.value.message


def test_tool_parameters_are_checked_too() -> None:
    bad = (ToolSpec("f", parameters={"type": "object", "properties": {"x": {"type": "nope"}}}),)
    with pytest.raises(InvalidRequest) as caught:
        grammar.check(ToolCallConstraint(bad, forced=True, param="tool_choice"))
    assert caught.value.param == "tool_choice"


def test_unbounded_integers_are_capped_and_data_left_alone() -> None:
    schema = {"type": "object", "properties": {
        "n": {"type": "integer"}, "m": {"type": ["integer", "null"], "minimum": 0},
        "k": {"const": {"type": "integer"}}}}
    bounded = grammar._bounded(schema)
    assert bounded["properties"]["n"] == {"type": "integer", "maximum": grammar.SAFE_INTEGER,
                                          "minimum": -grammar.SAFE_INTEGER}
    assert bounded["properties"]["m"]["minimum"] == 0
    assert bounded["properties"]["k"] == {"const": {"type": "integer"}}


def test_compiled_grammars_are_cached(tokenizer: Any) -> None:
    compiler = grammar.compiler_for(tokenizer)
    assert grammar.compiler_for(tokenizer) is compiler
    text = grammar.grammar_text(JsonConstraint({"type": "object", "properties": {
        "z": {"type": "string", "maxLength": random.randint(1, 10**6)}}}, "p"))
    compiler.matcher(text, "p")
    assert text in compiler._compiled


def test_auto_mode_ends_the_answer_after_the_last_allowed_call(tokenizer: Any) -> None:
    processor = grammar.compiler_for(tokenizer).processor(
        ToolCallConstraint(TOOLS, forced=False, parallel=True, max_calls=1))
    eos = set(tokenizer.eos_token_ids)
    logits = mx.random.normal((1, 49152))
    context = [1]
    text = 'Ok <tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>'
    for token in tokenizer.encode(text, add_special_tokens=False):
        context.append(token)
        masked = processor(mx.array(context), logits)
    allowed = {i for i, v in enumerate(masked[0].tolist()) if v != float("-inf")}
    assert allowed == eos


def test_forced_grammar_caps_the_number_of_calls() -> None:
    one = ToolCallConstraint(TOOLS, forced=True, parallel=False)
    three = ToolCallConstraint(TOOLS, forced=True, parallel=True, max_calls=3)
    assert "call{" not in grammar.grammar_text(one).splitlines()[0]
    assert grammar.grammar_text(three).splitlines()[0] == "start: call{1,3}"


def test_a_schema_nested_too_deeply_is_a_400() -> None:
    deep: dict[str, Any] = {"type": "integer"}
    for _ in range(5000):
        deep = {"type": "array", "items": deep}
    with pytest.raises(InvalidRequest) as caught:
        grammar.check(JsonConstraint(deep, "response_format.json_schema.schema"))
    assert caught.value.param == "response_format.json_schema.schema"
