"""The gateway's own tool format, for models whose chat template has no tool support.

The tool definitions go compactly into the system prompt (`render_tool`: schema keywords the
model does not need dropped, no JSON whitespace, descriptions as plain text), and the model is
told to answer with one `<tool_call>{"name": "...", "arguments": {...}}</tool_call>` block per
call (Hermes style, which many small models have seen in training). The parser reads exactly
this format (`formats.FORMATS["generic"]`), and constrained decoding of a forced call builds its
grammar on these markers.
"""

from __future__ import annotations

import json
from typing import Any

from app.core.types import ChatMessage, ToolSpec

TOOL_CALL_START = "<tool_call>"
TOOL_CALL_END = "</tool_call>"
TOOL_RESPONSE_START = "<tool_response>"
TOOL_RESPONSE_END = "</tool_response>"


# Schema keywords that change nothing about what the model should write: annotations
# (`$schema`, `title`, `examples`, `$comment`...) and `additionalProperties: false/true`
# (the listed properties already say what to write). Everything else is kept.
_UNNEEDED = frozenset({"$schema", "$id", "$comment", "title", "examples", "readOnly",
                       "writeOnly", "strict"})
# Maps whose keys are names chosen by the tool's author, never keywords.
_NAMED = frozenset({"properties", "patternProperties", "$defs", "definitions",
                    "dependentSchemas"})


def compact_schema(schema: Any) -> Any:
    """`schema` without the keywords a model does not need to write valid arguments."""
    if isinstance(schema, list):
        return [compact_schema(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key in _UNNEEDED or (key == "additionalProperties" and isinstance(value, bool)):
            continue
        if key in _NAMED and isinstance(value, dict):
            out[key] = {name: compact_schema(sub) for name, sub in value.items()}
        else:
            out[key] = compact_schema(value)
    return out


def arguments_schema(parameters: dict[str, Any]) -> dict[str, Any]:
    """A tool's arguments as shown to the model: compact, without the top-level
    `"type":"object"` every tool repeats (arguments are always an object)."""
    schema = compact_schema(parameters or {})
    if schema.get("type") == "object":
        schema.pop("type")
    return schema or {"properties": {}}


def tidy_text(text: str) -> str:
    """A description without trailing spaces and blank lines: same words, fewer tokens."""
    lines = [line.rstrip() for line in text.strip().splitlines()]
    return "\n".join(line for line in lines if line)


def render_tool(tool: ToolSpec) -> str:
    """One tool: a header line with its name and the JSON Schema of its arguments (one line,
    no whitespace), then its description as plain text (no JSON escaping of its newlines and
    quotes, which costs tokens)."""
    schema = json.dumps(arguments_schema(tool.parameters), ensure_ascii=False,
                        separators=(",", ":"))
    head = f"<tool name={json.dumps(tool.name, ensure_ascii=False)}>{schema}"
    description = tidy_text(tool.description)
    return f"{head}\n{description}\n</tool>" if description else f"{head}</tool>"


def render_tools_prompt(tools: list[ToolSpec], *, required: bool = False,
                        name: str | None = None) -> str:
    """The system-prompt text that offers `tools` to a model without a tool template."""
    lines = [
        "You can call these tools. Each is <tool name=NAME>, the JSON Schema of its "
        "arguments, then what it does:",
        *(render_tool(tool) for tool in tools),
        "",
        "To call a tool, answer with exactly this and nothing after it:",
        f'{TOOL_CALL_START}{{"name": "<tool name>", "arguments": {{<arguments as JSON>}}}}'
        f"{TOOL_CALL_END}",
        "Write one block per call; for several calls write several blocks.",
        "A tool's result comes back in the next message, inside "
        f"{TOOL_RESPONSE_START}...{TOOL_RESPONSE_END}.",
    ]
    if name:
        lines.append(f"You must call the tool {name} now.")
    elif required:
        lines.append("You must call a tool now.")
    else:
        lines.append("If no tool is needed, answer normally.")
    return "\n".join(lines)


def render_call(name: str, arguments: str) -> str:
    """An earlier call, written back into the history the way the model was told to write it."""
    try:
        args: Any = json.loads(arguments or "{}")
    except ValueError:
        args = arguments
    body = json.dumps({"name": name, "arguments": args}, ensure_ascii=False)
    return f"{TOOL_CALL_START}{body}{TOOL_CALL_END}"


def history_for_generic(messages: list[ChatMessage]) -> list[ChatMessage]:
    """History for a template that knows no tool calls: calls as text, results as user turns."""
    out: list[ChatMessage] = []
    for message in messages:
        if message.role == "assistant" and message.tool_calls:
            calls = "\n".join(render_call(c.name, c.arguments) for c in message.tool_calls)
            text = f"{message.content}\n{calls}" if message.content else calls
            out.append(ChatMessage(role="assistant", content=text))
        elif message.role == "tool":
            out.append(ChatMessage(
                role="user", content=f"{TOOL_RESPONSE_START}{message.content}{TOOL_RESPONSE_END}"))
        else:
            out.append(message)
    return out
