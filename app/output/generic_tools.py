"""The gateway's own tool format, for models whose chat template has no tool support.

The tool definitions go compactly into the system prompt, and the model is told to answer with
one `<tool_call>{"name": "...", "arguments": {...}}</tool_call>` block per call (Hermes style,
which many small models have seen in training). The parser reads exactly this format
(`formats.FORMATS["generic"]`), and constrained decoding of a forced call builds its grammar on
these markers.
"""

from __future__ import annotations

import json
from typing import Any

from app.core.types import ChatMessage, ToolSpec

TOOL_CALL_START = "<tool_call>"
TOOL_CALL_END = "</tool_call>"
TOOL_RESPONSE_START = "<tool_response>"
TOOL_RESPONSE_END = "</tool_response>"


def _signature(tool: ToolSpec) -> dict[str, Any]:
    spec: dict[str, Any] = {"name": tool.name}
    if tool.description:
        spec["description"] = tool.description
    spec["parameters"] = tool.parameters or {"type": "object", "properties": {}}
    return spec


def render_tools_prompt(tools: list[ToolSpec], *, required: bool = False,
                        name: str | None = None) -> str:
    """The system-prompt text that offers `tools` to a model without a tool template."""
    lines = [
        "You can call these tools (JSON Schema of each tool's arguments):",
        *(json.dumps(_signature(tool), ensure_ascii=False, separators=(",", ":"))
          for tool in tools),
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
