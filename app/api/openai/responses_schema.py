"""The /v1/responses request: its wire schema and its translation into internal messages.

Input items are parsed by hand rather than with a pydantic union: a union's error for one bad
item lists every member it did not match, while a client needs one line naming the bad field.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from app.api.common import new_id
from app.core.types import (
    ChatMessage,
    Constraint,
    JsonConstraint,
    Role,
    ToolCall,
    ToolCallConstraint,
    ToolSpec,
)
from app.errors import InvalidRequest, NotFound

LOGPROBS_INCLUDE = "message.output_text.logprobs"
_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_INPUT_ROLES = frozenset({"user", "system", "developer", "assistant"})
_TEXT_PARTS = frozenset({"input_text", "output_text", "text"})
_UNSUPPORTED_PARTS = frozenset({"input_image", "input_file", "input_audio"})
# Prefixes OpenAI uses for item ids; clients sometimes branch on them.
_ITEM_PREFIX = {"message": "msg_", "function_call": "fc_", "function_call_output": "fco_"}


class _Wire(BaseModel):
    # Real clients send fields we do not know (and newer ones every month): ignore them.
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class TextFormat(_Wire):
    type: Literal["text", "json_schema", "json_object"] = "text"
    name: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    description: str | None = None
    strict: bool | None = None

    @model_validator(mode="after")
    def _json_schema_shape(self) -> TextFormat:
        if self.type == "json_schema":
            if self.name is None or not _NAME_RE.match(self.name):
                raise ValueError("json_schema format needs `name` (a-z, A-Z, 0-9, _ and -, "
                                 "at most 64) at the top of text.format")
            if self.schema_ is None:
                raise ValueError("json_schema format needs a `schema` object at the top of "
                                 "text.format")
        return self

    def constraint(self) -> JsonConstraint | None:
        if self.type == "json_object":
            return JsonConstraint(schema=None, param="text.format")
        if self.type == "json_schema":
            return JsonConstraint(schema=self.schema_ or {}, param="text.format.schema")
        return None

    def echo(self) -> dict[str, Any]:
        if self.type != "json_schema":
            return {"type": self.type}
        return {"type": "json_schema", "name": self.name, "schema": self.schema_,
                "description": self.description, "strict": self.strict}


class TextConfig(_Wire):
    format: TextFormat = Field(default_factory=TextFormat)
    verbosity: Literal["low", "medium", "high"] | None = None


class FunctionTool(_Wire):
    type: Literal["function"]
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    @model_validator(mode="before")
    @classmethod
    def _flat(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("function"), dict) and "name" not in data:
            raise ValueError("Responses API function tools are flat: put name, description and "
                             "parameters at the top of the tool, not under `function`")
        if isinstance(data, dict) and data.get("type") not in (None, "function"):
            raise ValueError(f"tool type {data.get('type')!r} is not supported here; only "
                             "function tools are")
        return data

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME_RE.match(value):
            raise ValueError("a function name is 1-64 of a-z, A-Z, 0-9, _ and -")
        return value

    def echo(self) -> dict[str, Any]:
        return {"type": "function", "name": self.name, "description": self.description,
                "parameters": self.parameters, "strict": self.strict}


class ToolChoiceFunction(_Wire):
    type: Literal["function"]
    name: str


class ResponsesRequest(_Wire):
    model: str | None = None
    input: str | list[dict[str, Any]] = Field(default_factory=list)
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    previous_response_id: str | None = None
    store: bool = True
    metadata: dict[str, str] | None = None
    stream: bool = False
    text: TextConfig = Field(default_factory=TextConfig)
    speculative: Literal["auto", "off"] = Field(
        "auto", description="Speculative decoding (prompt-lookup drafts) for this request: "
        "auto (the server's setting) or off.")
    tools: list[FunctionTool] = Field(default_factory=list)
    tool_choice: Literal["none", "auto", "required"] | ToolChoiceFunction = "auto"
    parallel_tool_calls: bool = True
    reasoning: dict[str, Any] | None = None  # effort reaches the template; summary accepted
    dropped_tools: list[str] = Field(default_factory=list)  # hosted tools left out (set below)
    include: list[str] | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    max_tool_calls: int | None = Field(None, ge=1)
    prompt: Any = None  # a stored prompt template: refused, there are none here
    truncation: Literal["disabled", "auto"] = "disabled"
    user: str | None = None
    background: bool = False
    conversation: Any = None

    @model_validator(mode="before")
    @classmethod
    def _flatten_tools(cls, data: Any) -> Any:
        """Function tools as they are; a `namespace` tool's functions flattened (their names
        kept, so calls map back); hosted tools the gateway cannot run, dropped and listed."""
        if not isinstance(data, dict) or not isinstance(data.get("tools"), list):
            return data
        tools: list[Any] = []
        dropped: list[str] = []
        for tool in data["tools"]:
            kind = tool.get("type") if isinstance(tool, dict) else None
            if kind == "namespace" and isinstance(tool, dict):
                members = tool.get("tools") or tool.get("functions") or []
                if not isinstance(members, list):
                    raise ValueError("a namespace tool's `tools` must be a list of functions")
                tools += [t for t in members
                          if not isinstance(t, dict) or t.get("type", "function") == "function"]
            elif kind in (None, "function") or not isinstance(kind, str):
                tools.append(tool)
            else:
                dropped.append(kind)
        return {**data, "tools": tools, "dropped_tools": list(dict.fromkeys(dropped))}

    def template_kwargs(self) -> dict[str, Any]:
        effort = (self.reasoning or {}).get("effort")
        return {"reasoning_effort": effort} if isinstance(effort, str) else {}

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is not None:
            if len(value) > 16:
                raise ValueError("metadata holds at most 16 pairs")
            for key, item in value.items():
                if len(key) > 64 or len(item) > 512:
                    raise ValueError("metadata keys are at most 64 chars, values at most 512")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> ResponsesRequest:
        if self.background:
            raise ValueError("background responses are not supported; omit `background`")
        if self.prompt is not None:
            raise ValueError("`prompt` (stored prompt templates) is not supported; send "
                             "`instructions` and `input`")
        if self.conversation is not None:
            raise ValueError("`conversation` is not supported; chain turns with "
                             "previous_response_id")
        choice = self.tool_choice
        if choice == "required" and not self.tools:
            raise ValueError("tool_choice \"required\" forces a call but `tools` is empty")
        if isinstance(choice, ToolChoiceFunction) and choice.name not in {
            tool.name for tool in self.tools
        }:
            raise ValueError(f"tool_choice names function {choice.name!r}, which is not in "
                             "`tools`")
        if self.input == [] and self.previous_response_id is None:
            raise ValueError("`input` is required")
        return self

    def tool_choice_echo(self) -> str | dict[str, Any]:
        if isinstance(self.tool_choice, ToolChoiceFunction):
            return {"type": "function", "name": self.tool_choice.name}
        return self.tool_choice

    def tool_choice_internal(self) -> str:
        # A forced function becomes "required" with only that tool offered.
        return "required" if isinstance(self.tool_choice, ToolChoiceFunction) else self.tool_choice

    def tool_specs(self) -> list[ToolSpec]:
        """The tools the model is shown: none for tool_choice "none"."""
        if self.tool_choice == "none":
            return []
        tools = self.tools
        if isinstance(self.tool_choice, ToolChoiceFunction):
            tools = [tool for tool in tools if tool.name == self.tool_choice.name]
        return [ToolSpec(name=t.name, description=t.description or "",
                         parameters=t.parameters or {}, strict=bool(t.strict)) for t in tools]

    def constraint(self) -> Constraint | None:
        """What decoding must obey: a forced call, then text.format, then strict tools."""
        tools = tuple(self.tool_specs())
        if tools and self.tool_choice_internal() == "required":
            return ToolCallConstraint(tools=tools, forced=True,
                                      parallel=self.parallel_tool_calls, param="tool_choice",
                                      max_calls=self._max_calls())
        json_constraint = self.text.format.constraint()
        if json_constraint is not None:
            return json_constraint
        if any(t.strict for t in tools) or (tools and not self.parallel_tool_calls) or (
                tools and self._max_calls() is not None):
            # Armed only when the model starts a call: strict arguments, and the call count.
            return ToolCallConstraint(tools=tools, forced=False,
                                      parallel=self.parallel_tool_calls, param="tools",
                                      max_calls=self._max_calls())
        return None

    def _max_calls(self) -> int | None:
        return self.max_tool_calls

    def logprobs_count(self) -> int | None:
        """Log-probabilities are asked for through `include`; top_logprobs says how many."""
        if LOGPROBS_INCLUDE in (self.include or []):
            return self.top_logprobs or 0
        return None


def parse_request(body: Any) -> ResponsesRequest:
    """Validate a JSON body; a problem becomes one clear 400 naming the field."""
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    try:
        return ResponsesRequest.model_validate(body)
    except ValidationError as error:
        problem = error.errors()[0]
        where = ".".join(str(part) for part in problem["loc"] if not _union_tag(part)) or None
        message = str(problem["msg"]).removeprefix("Value error, ")
        raise InvalidRequest(f"{where}: {message}" if where else message, param=where) from None


def _union_tag(part: str | int) -> bool:
    # pydantic names the union member in `loc` ("str", "literal[...]", "ToolChoiceFunction").
    return isinstance(part, str) and (
        "[" in part or part[:1].isupper() or part in {"str", "int", "float", "bool", "dict"})


# --- input items -> normalized items (stored, listed) -> internal messages ----------------------

ItemResolver = Callable[[str], dict[str, Any] | None]


def normalize_input(
    value: str | list[dict[str, Any]], resolve: ItemResolver
) -> list[dict[str, Any]]:
    """Client input as complete items with ids, the shape /input_items lists."""
    if isinstance(value, str):
        return [_message_item("user", value, None)]
    items: list[dict[str, Any]] = []
    for index, raw in enumerate(value):
        items.append(_normalize_item(raw, f"input[{index}]", resolve))
    return items


def _is_json_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except (ValueError, RecursionError):
        return False


def _normalize_item(raw: Any, where: str, resolve: ItemResolver) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise InvalidRequest(f"{where}: an input item must be an object", param=where)
    kind = raw.get("type") or ("message" if "role" in raw else None)
    item_id = raw.get("id") if isinstance(raw.get("id"), str) else None
    if kind == "message":
        role = raw.get("role")
        if role not in _INPUT_ROLES:
            raise InvalidRequest(f"{where}.role: expected one of user, assistant, system, "
                                 f"developer, got {role!r}", param=f"{where}.role")
        return _message_item(role, _content_text(raw.get("content"), f"{where}.content"), item_id)
    if kind == "function_call":
        call_id, name = _string(raw, "call_id", where), _string(raw, "name", where)
        arguments = raw.get("arguments", "")
        if not isinstance(arguments, str) or not _is_json_object(arguments or "{}"):
            raise InvalidRequest(f"{where}.arguments: must be a JSON object encoded as a string",
                                 param=f"{where}.arguments")
        return {"id": item_id or new_id("fc_"), "type": "function_call", "status": "completed",
                "call_id": call_id, "name": name, "arguments": arguments}
    if kind == "function_call_output":
        call_id = _string(raw, "call_id", where)
        output = raw.get("output")
        text = output if isinstance(output, str) else _content_text(output, f"{where}.output")
        return {"id": item_id or new_id("fco_"), "type": "function_call_output",
                "status": "completed", "call_id": call_id, "output": text}
    if kind == "reasoning":
        # Codex sends back the reasoning items of earlier turns (store: false): kept in the
        # stored input, not replayed into the prompt.
        return {**raw, "id": item_id or new_id("rs_"), "type": "reasoning"}
    if kind == "item_reference":
        ref = _string(raw, "id", where)
        found = resolve(ref)
        if found is None:
            raise NotFound(f"{where}: item {ref!r} not found in the previous response",
                           param=f"{where}.id")
        return found
    raise InvalidRequest(f"{where}.type: unsupported input item type {kind!r} (use message, "
                         "function_call, function_call_output or item_reference)",
                         param=f"{where}.type")


def _string(raw: dict[str, Any], key: str, where: str) -> str:
    value = raw.get(key)
    if not isinstance(value, str) or not value:
        raise InvalidRequest(f"{where}.{key}: a non-empty string is required",
                             param=f"{where}.{key}")
    return value


def _content_text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidRequest(f"{where}: expected a string or a list of text parts", param=where)
    texts: list[str] = []
    for index, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in _TEXT_PARTS and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "refusal" and isinstance(part.get("refusal"), str):
            texts.append(part["refusal"])
        elif kind in _UNSUPPORTED_PARTS:
            raise InvalidRequest(f"{where}[{index}]: {kind} is not supported; this gateway "
                                 "serves text models", param=f"{where}[{index}].type")
        else:
            raise InvalidRequest(f"{where}[{index}]: expected an input_text or output_text part "
                                 "with `text`", param=f"{where}[{index}]")
    return "\n".join(texts)


def _message_item(role: str, text: str, item_id: str | None) -> dict[str, Any]:
    part: dict[str, Any] = (
        {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
        if role == "assistant" else {"type": "input_text", "text": text}
    )
    return {"id": item_id or new_id("msg_"), "type": "message", "role": role,
            "status": "completed", "content": [part]}


def item_text(item: dict[str, Any]) -> str:
    return "".join(str(part.get("text", "")) for part in item.get("content", []))


def items_to_messages(items: list[dict[str, Any]],
                      known_calls: dict[str, str] | None = None) -> list[ChatMessage]:
    """Normalized items (input or output) as internal chat messages.

    Consecutive function calls join the assistant message before them, as one turn with
    parallel calls; a call output finds its function name by `call_id`.
    """
    names = dict(known_calls or {})
    messages: list[ChatMessage] = []
    for item in items:
        kind = item["type"]
        if kind == "message":
            messages.append(ChatMessage(role=_role(item["role"]), content=item_text(item)))
        elif kind == "function_call":
            call = ToolCall(id=item["call_id"], name=item["name"], arguments=item["arguments"])
            names[call.id] = call.name
            last = messages[-1] if messages else None
            if last is not None and last.role == "assistant":
                messages[-1] = ChatMessage(role="assistant", content=last.content,
                                           tool_calls=(*last.tool_calls, call))
            else:
                messages.append(ChatMessage(role="assistant", tool_calls=(call,)))
        elif kind == "function_call_output":
            messages.append(ChatMessage(role="tool", content=item["output"],
                                        tool_call_id=item["call_id"],
                                        name=names.get(item["call_id"])))
    return messages


def _role(value: str) -> Role:
    roles: dict[str, Role] = {"user": "user", "system": "system", "developer": "developer",
                              "assistant": "assistant", "tool": "tool"}
    return roles[value]


def known_calls(messages: list[ChatMessage]) -> dict[str, str]:
    return {call.id: call.name for message in messages for call in message.tool_calls}


# --- internal messages <-> JSON, for the stored context -------------------------------------

def message_to_json(message: ChatMessage) -> dict[str, Any]:
    data: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.tool_calls:
        data["tool_calls"] = [{"id": c.id, "name": c.name, "arguments": c.arguments}
                              for c in message.tool_calls]
    if message.tool_call_id is not None:
        data["tool_call_id"] = message.tool_call_id
    if message.name is not None:
        data["name"] = message.name
    return data


def message_from_json(data: dict[str, Any]) -> ChatMessage:
    calls = tuple(ToolCall(id=c["id"], name=c["name"], arguments=c["arguments"])
                  for c in data.get("tool_calls", []))
    return ChatMessage(role=_role(data["role"]), content=data.get("content", ""),
                       tool_calls=calls, tool_call_id=data.get("tool_call_id"),
                       name=data.get("name"))


def turn_starts(context: list[ChatMessage]) -> list[int]:
    """Where the oldest turns can be cut: before each user message, and after everything."""
    starts = [i for i, message in enumerate(context) if i > 0 and message.role == "user"
              and context[i - 1].role != "user"]
    return [*starts, len(context)]


