"""A parsed tool call, and how argument values written as text become JSON values."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

Schemas = dict[str, dict[str, Any]]  # tool name -> its JSON Schema `parameters`


@dataclass(frozen=True)
class Call:
    name: str
    arguments: str  # a JSON object, as the wire protocols carry it


def make_call(name: Any, arguments: Any) -> Call | None:
    """A call from a decoded name and arguments (a dict, or a JSON string of one)."""
    if not isinstance(name, str) or not name.strip():
        return None
    if arguments is None:
        arguments = {}
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return Call(name.strip(), json.dumps(arguments, ensure_ascii=False))


def _types(schema: dict[str, Any]) -> set[str]:
    kind = schema.get("type")
    if isinstance(kind, str):
        return {kind}
    if isinstance(kind, list):
        return {str(k) for k in kind}
    found: set[str] = set()
    for key in ("anyOf", "oneOf"):
        for option in schema.get(key) or []:
            if isinstance(option, dict):
                found |= _types(option)
    if "enum" in schema and not found:
        found = {type_name(v) for v in schema["enum"]}
    return found


def type_name(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if value is None:
        return "null"
    return "string"


def param_schema(schemas: Schemas, tool: str, param: str) -> dict[str, Any]:
    props = (schemas.get(tool) or {}).get("properties") or {}
    found = props.get(param)
    return found if isinstance(found, dict) else {}


def text_value(raw: str, schema: dict[str, Any]) -> Any:
    """A parameter value that a format writes as bare text (XML-like formats).

    The tool's schema decides: a string parameter keeps the text as written; anything else is
    read as JSON when it parses, else kept as text.
    """
    types = _types(schema)
    if types and types <= {"string"}:
        return raw
    try:
        value = json.loads(raw)
    except ValueError:
        lowered = raw.strip()
        if lowered in ("True", "False", "None"):  # Python spellings some models use
            return {"True": True, "False": False, "None": None}[lowered]
        return raw
    if "string" in types and not isinstance(value, (dict, list)) and type_name(value) not in types:
        return raw
    return value
