"""Each tool-call format as data: its markers, how a call ends, and how its body is read.

`FORMATS` is keyed by our format names; `detect.py` picks one for a tokenizer (mlx-lm's
template-based detection first, then markers of the families mlx-lm does not know).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from app.output import bodies
from app.output.calls import Call, Schemas
from app.output.generic_tools import TOOL_CALL_END, TOOL_CALL_START

BodyParser = Callable[[str, Schemas], list[Call] | None]
EndMode = Literal["marker", "json", "eof"]


@dataclass(frozen=True)
class Block:
    """One call (or a group of calls) between `start` and its end.

    end_mode "marker": ends at `end` (outside JSON strings when `json_body`); "json": ends where
    the JSON value after the header ends (Mistral); "eof": runs to the end of the output.
    `incremental`: the body is `{"name": ..., "arguments": {...}}`, so the arguments can be
    streamed as they are written.
    """

    start: str
    end: str = ""
    parse: BodyParser = bodies.json_calls
    end_mode: EndMode = "marker"
    json_body: bool = False
    incremental: bool = False
    opaque: tuple[tuple[str, str], ...] = ()  # regions where the end marker is just text
    complete_prefix: Callable[[str], str] | None = None  # the whole calls of a cut-off body


@dataclass(frozen=True)
class Format:
    name: str
    blocks: tuple[Block, ...] = ()
    wrappers: tuple[str, ...] = ()  # section markers around calls: dropped, never content
    think: tuple[tuple[str, str], ...] = (("<think>", "</think>"),)
    leading_call: bool = False  # Llama 3/4: the whole output may be one JSON or pythonic call
    extra_markers: tuple[str, ...] = field(default=())  # stray control text, never content


_HERMES = Block(TOOL_CALL_START, TOOL_CALL_END, bodies.json_calls, json_body=True,
                incremental=True)

FORMATS: dict[str, Format] = {
    "generic": Format("generic", (_HERMES,)),
    "hermes": Format("hermes", (_HERMES,)),
    "qwen3_xml": Format(
        "qwen3_xml",
        (Block("<tool_call>", "</tool_call>", bodies.qwen_xml,
               opaque=(("<parameter=", "</parameter>"),)),
         # Qwen3-Coder sometimes drops the opener: a bare function is a call too, and its
         # stray closer is no content.
         Block("<function=", "</function>", bodies.bare_qwen_function,
               opaque=(("<parameter=", "</parameter>"),))),
        extra_markers=("</tool_call>",),
    ),
    "glm": Format("glm", (Block("<tool_call>", "</tool_call>", bodies.glm,
                                opaque=(("<arg_value>", "</arg_value>"),)),)),
    "kimi": Format(
        "kimi", (Block("<|tool_call_begin|>", "<|tool_call_end|>", bodies.kimi,
                       json_body=True),),
        wrappers=("<|tool_calls_section_begin|>", "<|tool_calls_section_end|>"),
        think=(("<think>", "</think>"), ("◁think▷", "◁/think▷")),
    ),
    "deepseek": Format(
        "deepseek",
        (
            Block("<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", bodies.deepseek),
            Block("<｜DSML｜function_calls>", "</｜DSML｜function_calls>", bodies.dsml,
                  complete_prefix=bodies.dsml_prefix),
            Block("<｜DSML｜tool_calls>", "</｜DSML｜tool_calls>", bodies.dsml,
                  complete_prefix=bodies.dsml_prefix),
            Block("<｜DSML｜ calls>", "</｜DSML｜ calls>", bodies.dsml,
                  complete_prefix=bodies.dsml_prefix),
        ),
        wrappers=("<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"),
    ),
    "mistral": Format(
        "mistral", (Block("[TOOL_CALLS]", "", bodies.mistral, end_mode="json"),),
        think=(("[THINK]", "[/THINK]"), ("<think>", "</think>")),
    ),
    "gemma4": Format(
        "gemma4", (Block("<|tool_call>", "<tool_call|>", bodies.gemma4,
                         opaque=(('<|"|>', '<|"|>'),)),),
        think=(("<|channel>thought", "<channel|>"),),
    ),
    "llama": Format(
        "llama",
        (
            Block("<|python_tag|>", "", bodies.json_or_pythonic, end_mode="eof"),
            Block("<|python_start|>", "<|python_end|>", bodies.json_or_pythonic),
        ),
        think=(),
        leading_call=True,
        extra_markers=("<|eom_id|>", "<|eot_id|>"),
    ),
    "kimi_k3": Format(
        "kimi_k3", (Block("<|open|>tools<|sep|>", "<|close|>tools<|sep|>", bodies.kimi_k3),),
        think=(("<|open|>think<|sep|>", "<|close|>think<|sep|>"),),
        extra_markers=("<|open|>response<|sep|>", "<|close|>response<|sep|>",
                       "<|close|>message<|sep|>"),
    ),
    "pythonic": Format(
        "pythonic", (Block("<|tool_call_start|>", "<|tool_call_end|>", bodies.pythonic),)),
}

# mlx-lm's tool parser modules (mlx_lm/tool_parsers) -> our formats. Families mlx-lm knows
# that have no entry here keep mlx-lm's own parser, wrapped in `mlx_lm_format`.
MLX_LM_PARSERS: dict[str, str] = {
    "json_tools": "hermes",
    "qwen3_coder": "qwen3_xml",
    "glm47": "glm",
    "laguna": "glm",
    "kimi_k2": "kimi",
    "kimi_k3": "kimi_k3",
    "mistral": "mistral",
    "gemma4": "gemma4",
    "pythonic": "pythonic",
}


def mlx_lm_format(module_name: str, start: str, end: str,
                  parse: Callable[[str, object], object]) -> Format:
    """A family we have no parser of our own for: mlx-lm's markers and its parse function."""

    def body(text: str, schemas: Schemas) -> list[Call] | None:
        tools = [{"type": "function", "function": {"name": name, "parameters": params}}
                 for name, params in schemas.items()]
        try:
            found = parse(text, tools)
        except Exception:  # mlx-lm parsers raise on malformed text; that is "not a call"
            return None
        items = found if isinstance(found, list) else [found]
        calls: list[Call] = []
        for item in items:
            call = bodies.make_call_from_mapping(item)
            if call is None:
                return None
            calls.append(call)
        return calls or None

    mode: EndMode = "marker" if end else "eof"
    return Format(module_name, (Block(start, end, body, end_mode=mode),))
