"""Call bodies of each family -> calls. Each takes the text between a call's markers.

A parser returns None when the text is not a well-formed call: the caller then gives the
text back as content, never drops it.
"""

from __future__ import annotations

import ast
import json
import re
from typing import Any

from app.output.calls import Call, Schemas, make_call, param_schema, text_value

_DECODER = json.JSONDecoder()


def _json_objects(text: str) -> list[Any] | None:
    """Every JSON value in `text`, separated by whitespace, commas or semicolons."""
    values: list[Any] = []
    i = 0
    while True:
        while i < len(text) and text[i] in " \t\r\n,;":
            i += 1
        if i >= len(text):
            return values
        try:
            value, i = _DECODER.raw_decode(text, i)
        except ValueError:
            return None
        values.append(value)


def _from_object(obj: Any) -> Call | None:
    if not isinstance(obj, dict):
        return None
    if isinstance(obj.get("function"), dict) and "name" not in obj:
        obj = obj["function"]
    args = obj.get("arguments", obj.get("parameters"))
    if "arguments" not in obj and "parameters" not in obj:
        args = {}
    return make_call(obj.get("name"), args)


def json_calls(body: str, _schemas: Schemas) -> list[Call] | None:
    """Hermes style: `{"name": ..., "arguments": {...}}` (several allowed, or a list)."""
    values = _json_objects(body.strip())
    if not values:
        return None
    flat = [item for value in values for item in (value if isinstance(value, list) else [value])]
    calls = [_from_object(item) for item in flat]
    if not calls or any(call is None for call in calls):
        return None
    return [call for call in calls if call is not None]


def json_args(name: str, args: str) -> list[Call] | None:
    """A name from a header and a JSON arguments object."""
    text = args.strip()
    if text.startswith("```"):  # DeepSeek V3 fences the JSON
        text = re.sub(r"^```[a-z]*\s*", "", text)
        text = re.sub(r"\s*```$", "", text)
    try:
        value = json.loads(text) if text else {}
    except ValueError:
        return None
    call = make_call(name, value)
    return [call] if call else None


_QWEN_FUNCTION_OPEN = re.compile(r"<function=([^>\n]+)>")
# A parameter opens at the start of the function body or of a line; written mid-line inside a
# value it is just text.
_QWEN_PARAM_OPEN = re.compile(r"(?:^|(?<=\n)|(?<=</parameter>))[ \t]*<parameter=([^>\n]+)>")


def _strip_newline(value: str) -> str:
    if value.startswith("\n"):
        value = value[1:]
    if value.endswith("\n"):
        value = value[:-1]
    return value


def qwen_xml(body: str, schemas: Schemas) -> list[Call] | None:
    """Qwen3-Coder: `<function=NAME><parameter=K>\nV\n</parameter></function>`.

    A value runs to the last `</parameter>` before the next parameter (so the closing tags may
    appear inside it), and a missing `</parameter>` is tolerated.
    """
    text = body.strip()
    opener = _QWEN_FUNCTION_OPEN.match(text)
    end = text.rfind("</function>")
    if opener is None or end < opener.end() or text[end + len("</function>"):].strip():
        return None
    # Parallel calls in one block: split where one function closes and the next opens.
    parts = re.split(r"</function>\s*(?=<function=)", text[:end])
    calls: list[Call] = []
    for part in parts:
        call = _qwen_function(part, schemas)
        if call is None:
            return None
        calls.append(call)
    return calls


def _qwen_function(text: str, schemas: Schemas) -> Call | None:
    opener = _QWEN_FUNCTION_OPEN.match(text.strip())
    if opener is None:
        return None
    name = opener.group(1).strip()
    inner = text.strip()[opener.end():]
    opens = list(_QWEN_PARAM_OPEN.finditer(inner))
    if inner[:opens[0].start()].strip() if opens else inner.strip():
        return None
    args: dict[str, Any] = {}
    for k, match in enumerate(opens):
        stop = opens[k + 1].start() if k + 1 < len(opens) else len(inner)
        raw = inner[match.end():stop].rstrip()
        raw = raw.removesuffix("</parameter>")
        key = match.group(1).strip()
        args[key] = text_value(_strip_newline(raw), param_schema(schemas, name, key))
    return make_call(name, args)


def bare_qwen_function(body: str, schemas: Schemas) -> list[Call] | None:
    """A Qwen3-Coder call written without its `<tool_call>` opener."""
    return qwen_xml(f"<function={body}</function>", schemas)


_GLM_OPEN_VALUE = re.compile(r"<arg_key>(.*?)</arg_key>\s*<arg_value>((?:(?!</?arg_).)*)",
                             re.DOTALL)
_GLM_PAIR = re.compile(r"<arg_key>(.*?)</arg_key>\s*<arg_value>(.*?)</arg_value>", re.DOTALL)


def glm(body: str, schemas: Schemas) -> list[Call] | None:
    """GLM-4.5+: `NAME\\n<arg_key>K</arg_key>\\n<arg_value>V</arg_value>...`."""
    stripped = body.strip()
    if stripped.startswith("{"):
        return json_calls(stripped, schemas)
    first = stripped.find("<arg_key>")
    name = (stripped if first < 0 else stripped[:first]).strip()
    rest = "" if first < 0 else stripped[first:]
    leftover = _GLM_PAIR.sub("", rest).strip()
    last = _GLM_OPEN_VALUE.fullmatch(leftover)
    if last:  # the last value's </arg_value> is missing: the block's end closes it
        rest = f"{rest.rstrip()}</arg_value>"
        leftover = ""
    if not name or "<" in name or "\n" in name or leftover:
        return None
    args = {}
    for pair in _GLM_PAIR.finditer(rest):
        key = pair.group(1).strip()
        args[key] = text_value(pair.group(2), param_schema(schemas, name, key))
    call = make_call(name, args)
    return [call] if call else None


def kimi(body: str, _schemas: Schemas) -> list[Call] | None:
    """Kimi K2: `functions.NAME:IDX <|tool_call_argument_begin|>{json}`."""
    header, sep, args = body.partition("<|tool_call_argument_begin|>")
    if not sep:
        return None
    name = header.strip()
    name = re.sub(r":\d+$", "", name)
    name = name.removeprefix("functions.")
    return json_args(name, args)


def deepseek(body: str, _schemas: Schemas) -> list[Call] | None:
    """DeepSeek V3 (`function`, sep, NAME, fenced JSON) and V3.1 (NAME, sep, JSON)."""
    left, sep, right = body.partition("<｜tool▁sep｜>")
    if not sep:
        return None
    if left.strip() == "function":
        name, _, args = right.partition("\n")
        return json_args(name.strip(), args)
    return json_args(left.strip(), right)


_DSML_INVOKE = re.compile(
    r'<｜DSML｜\s*invoke\s+name="([^"]*)"\s*(?:/>|>(.*?)</｜DSML｜\s*invoke>)', re.DOTALL)
_DSML_PARAM = re.compile(
    r'<｜DSML｜\s*parameter\s+name="([^"]*)"(?:\s+string="(true|false)")?\s*>(.*?)'
    r"</｜DSML｜\s*parameter>", re.DOTALL)


def dsml(body: str, schemas: Schemas) -> list[Call] | None:
    """DeepSeek V3.2+ DSML: `<｜DSML｜invoke name="X"><｜DSML｜parameter name="k" ...>v...`."""
    invokes = list(_DSML_INVOKE.finditer(body))
    if not invokes or _DSML_INVOKE.sub("", body).strip():
        return None
    calls: list[Call] = []
    for match in invokes:
        name, inner = match.group(1), match.group(2) or ""
        if _DSML_PARAM.sub("", inner).strip():
            return None
        args: dict[str, Any] = {}
        for param in _DSML_PARAM.finditer(inner):
            key, is_string, raw = param.group(1), param.group(2), param.group(3)
            if is_string == "true":
                args[key] = raw
            elif is_string == "false":
                try:
                    args[key] = json.loads(raw)
                except ValueError:
                    return None
            else:
                args[key] = text_value(raw, param_schema(schemas, name, key))
        call = make_call(name, args)
        if call is None:
            return None
        calls.append(call)
    return calls


_MISTRAL_HEADER = re.compile(
    r"\s*([A-Za-z0-9_.\-]+)\s*(?:\[CALL_ID\]\s*[^\[]*)?\[ARGS\]", re.DOTALL)


def mistral(body: str, schemas: Schemas) -> list[Call] | None:
    """Mistral: `[TOOL_CALLS] [{...}]` (v3) or `[TOOL_CALLS]NAME[ARGS]{...}` (v11+)."""
    header = _MISTRAL_HEADER.match(body)
    if header:
        return json_args(header.group(1), body[header.end():])
    stripped = body.strip()
    if stripped.startswith(("[", "{")):
        return json_calls(stripped, schemas)
    name, brace, args = stripped.partition("{")  # NAME{json}, seen from some fine-tunes
    if brace and re.fullmatch(r"[A-Za-z0-9_.\-]+", name.strip()):
        return json_args(name.strip(), "{" + args)
    return None


def pythonic(body: str, _schemas: Schemas) -> list[Call] | None:
    """Llama 4 / LFM: `[f(a=1, b='x'), g()]`, Python literals only."""
    text = body.strip()
    if not text.startswith("["):
        text = f"[{text}]"
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError:
        return None
    if not isinstance(tree.body, ast.List) or not tree.body.elts:
        return None
    calls: list[Call] = []
    for node in tree.body.elts:
        if not isinstance(node, ast.Call) or node.args:
            return None
        name = _dotted(node.func)
        if name is None:
            return None
        args: dict[str, Any] = {}
        for keyword in node.keywords:
            if keyword.arg is None:
                return None
            try:
                args[keyword.arg] = ast.literal_eval(keyword.value)
            except (ValueError, SyntaxError):
                return None
        try:
            call = make_call(name, args)
        except (TypeError, ValueError):  # a set or bytes literal is no JSON
            return None
        if call is None:
            return None
        calls.append(call)
    return calls


def _dotted(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else None
    return None


def gemma4(body: str, _schemas: Schemas) -> list[Call] | None:
    """Gemma 4: `call:NAME{key:<|"|>text<|"|>,n:3,nested:{...},list:[...]}`."""
    text = body.strip()
    if not text.startswith("call:"):
        return None
    brace = text.find("{")
    if brace < 0:
        return None
    name = text[5:brace].strip()
    try:
        value, end = _GemmaReader(text, brace).read_value()
    except ValueError:
        return None
    if text[end:].strip() or not isinstance(value, dict):
        return None
    call = make_call(name, value)
    return [call] if call else None


_GEMMA_QUOTE = '<|"|>'


class _GemmaReader:
    """Gemma 4's argument syntax: bare keys, `<|"|>`-quoted strings, JSON-like scalars."""

    def __init__(self, text: str, pos: int) -> None:
        self.text = text
        self.pos = pos

    def _skip(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos] in " \t\r\n":
            self.pos += 1

    def read_value(self) -> tuple[Any, int]:
        self._skip()
        text = self.text
        if text.startswith(_GEMMA_QUOTE, self.pos):
            end = text.find(_GEMMA_QUOTE, self.pos + len(_GEMMA_QUOTE))
            if end < 0:
                raise ValueError("unterminated string")
            value = text[self.pos + len(_GEMMA_QUOTE):end]
            self.pos = end + len(_GEMMA_QUOTE)
            return value, self.pos
        if self.pos >= len(text):
            raise ValueError("value expected")
        ch = text[self.pos]
        if ch == "{":
            return self._object(), self.pos
        if ch == "[":
            return self._array(), self.pos
        if ch == '"':
            value, self.pos = _DECODER.raw_decode(text, self.pos)
            return value, self.pos
        match = re.compile(r"[^,}\]]*").match(text, self.pos)
        assert match is not None
        raw = match.group(0).strip()
        self.pos = match.end()
        if not raw:
            raise ValueError("empty value")
        try:
            return json.loads(raw), self.pos
        except ValueError:
            return raw, self.pos

    def _object(self) -> dict[str, Any]:
        self.pos += 1
        out: dict[str, Any] = {}
        while True:
            self._skip()
            if self.text.startswith("}", self.pos):
                self.pos += 1
                return out
            colon = self.text.find(":", self.pos)
            if colon < 0:
                raise ValueError("key expected")
            key = self.text[self.pos:colon].strip()
            if key.startswith(_GEMMA_QUOTE) and key.endswith(_GEMMA_QUOTE):
                key = key[len(_GEMMA_QUOTE):-len(_GEMMA_QUOTE)]
            key = key.strip('"')
            if not key or key in out:
                raise ValueError("bad key")
            self.pos = colon + 1
            out[key], _ = self.read_value()
            self._skip()
            if self.text.startswith(",", self.pos):
                self.pos += 1
            elif not self.text.startswith("}", self.pos):
                raise ValueError("`,` or `}` expected")

    def _array(self) -> list[Any]:
        self.pos += 1
        out: list[Any] = []
        while True:
            self._skip()
            if self.text.startswith("]", self.pos):
                self.pos += 1
                return out
            value, _ = self.read_value()
            out.append(value)
            self._skip()
            if self.text.startswith(",", self.pos):
                self.pos += 1
            elif not self.text.startswith("]", self.pos):
                raise ValueError("`,` or `]` expected")


def json_or_pythonic(body: str, schemas: Schemas) -> list[Call] | None:
    """Llama: a JSON call (`parameters` or `arguments`) or a pythonic call list."""
    text = body.strip()
    for marker in ("<|eom_id|>", "<|eot_id|>"):
        text = text.removesuffix(marker).strip()
    if text.startswith("{"):
        return json_calls(text, schemas)
    if text.startswith("["):
        return pythonic(text, schemas)
    return None


def make_call_from_mapping(item: Any) -> Call | None:
    """A call from mlx-lm's parser result: {"name": ..., "arguments": dict | str}."""
    if not isinstance(item, dict):
        return None
    return make_call(item.get("name"), item.get("arguments", {}))


def dsml_prefix(body: str) -> str:
    """A cut-off DSML block up to its last complete invoke."""
    ends = [match.end() for match in _DSML_INVOKE.finditer(body)]
    return body[:ends[-1]] if ends else ""


def kimi_k3(body: str, schemas: Schemas) -> list[Call] | None:
    """Kimi K3 XTML: mlx-lm's parser, but a call it cannot read fails the block."""
    from mlx_lm.tool_parsers import kimi_k3 as k3

    found = list(k3._call_regex.finditer(body))
    if not found or k3._call_regex.sub("", body).strip():
        return None
    calls: list[Call] = []
    for match in found:
        try:
            item = k3._parse_single_call(match.group("attrs"), match.group("body"))
        except ValueError:
            return None
        call = make_call_from_mapping(item)
        if call is None:
            return None
        calls.append(call)
    return calls
