"""gpt-oss (Harmony) output: messages with a header (channel, recipient) and a body.

`<|channel|>analysis<|message|>...<|end|>` is reasoning, `final` (or a `commentary` without a
recipient) is content, and a header with `to=functions.NAME` makes the body a call's JSON
arguments, ended by `<|call|>` (or by the end of the output).
"""

from __future__ import annotations

import json
import re

from app import metrics
from app.core.types import ReasoningDelta, TextDelta, ToolCallDelta
from app.output import jsonscan
from app.output.calls import make_call
from app.output.parser import OutputEvent, _merge, new_call_id

_ENDS = ("<|end|>", "<|call|>", "<|return|>", "<|start|>")
_RECIPIENT = re.compile(r"to=(?:functions\.)?([^\s<]+)")
_CHANNEL = re.compile(r"<\|channel\|>\s*(\w+)")


class HarmonyParser:
    def __init__(self, *, parse_tools: bool = True) -> None:
        self._parse_tools = parse_tools
        self._buf = ""
        self._header: str | None = ""  # None while inside a body
        self._kind = "content"  # of the current body: content | reasoning | call
        self._name = ""
        self._body_started = False
        self._ws = ""
        self.calls = 0
        self.failed_calls = 0
        self._seen = {"content": False, "reasoning": False}

    def feed(self, text: str) -> list[OutputEvent]:
        self._buf += text
        return self._drain(final=False)

    def finish(self) -> list[OutputEvent]:
        return self._drain(final=True)

    def _drain(self, final: bool) -> list[OutputEvent]:
        out: list[OutputEvent] = []
        while True:
            before = (self._header, len(self._buf))
            if self._header is not None:
                self._read_header(out, final)
            else:
                self._read_body(out, final)
            if (self._header, len(self._buf)) == before:
                return _merge(out)

    def _read_header(self, out: list[OutputEvent], final: bool) -> None:
        at = self._buf.find("<|message|>")
        if at < 0:
            if final:
                rest = self._buf
                self._buf = ""
                if rest.strip() and "<|" not in rest:  # plain text, no Harmony at all
                    out.append(TextDelta(rest))
            return
        header = self._buf[:at]
        start = header.rfind("<|start|>")
        if start >= 0:
            header = header[start:]
        self._buf = self._buf[at + len("<|message|>"):]
        channel = _CHANNEL.search(header)
        recipient = _RECIPIENT.search(header)
        name = channel.group(1) if channel else "final"
        if recipient and self._parse_tools:
            self._kind, self._name = "call", recipient.group(1)
        elif name == "analysis":
            self._kind = "reasoning"
        else:
            self._kind = "content"
        self._header = None
        self._body_started = False
        self._ws = ""

    def _read_body(self, out: list[OutputEvent], final: bool) -> None:
        if self._kind == "call":
            # The arguments are JSON: a marker written inside one of its strings is text.
            found = [(i, m) for m in _ENDS
                     if (i := jsonscan.find_outside_strings(self._buf, m)) >= 0]
        else:
            found = [(i, m) for m in _ENDS if (i := self._buf.find(m)) >= 0]
        if self._kind == "call":
            if not found and not final:
                return
            at, marker = min(found) if found else (len(self._buf), "")
            body = self._buf[:at]
            self._buf = self._buf[at + (0 if marker == "<|start|>" else len(marker)):]
            self._header = ""
            self._call(out, body)
            return
        if found:
            at, marker = min(found)
            self._text(out, self._buf[:at], closing=True)
            self._buf = self._buf[at + (0 if marker == "<|start|>" else len(marker)):]
            self._header = ""
            return
        hold = 0 if final else jsonscan.partial_suffix(self._buf, _ENDS)
        self._text(out, self._buf[:len(self._buf) - hold], closing=final)
        self._buf = self._buf[len(self._buf) - hold:]

    def _text(self, out: list[OutputEvent], text: str, *, closing: bool) -> None:
        """A body's text less its leading and trailing whitespace (held until more follows)."""
        if not self._body_started:
            text = text.lstrip()
        core = text.rstrip()
        if core:
            self._body_started = True
            piece = self._ws + core
            out.append(ReasoningDelta(piece) if self._kind == "reasoning" else TextDelta(piece))
            self._ws = text[len(core):]
        else:
            self._ws += text
        if closing:
            self._ws = ""

    def _call(self, out: list[OutputEvent], body: str) -> None:
        text = body.strip()
        try:
            args = json.loads(text) if text else {}
        except ValueError:
            args = None
        call = make_call(self._name, args) if isinstance(args, dict) else None
        if call is None:
            self.failed_calls += 1
            metrics.TOOL_CALL_PARSE_FAILURES.labels("harmony").inc()
            if text:
                out.append(TextDelta(text))
            return
        out.append(ToolCallDelta(index=self.calls, id=new_call_id(), name=call.name,
                                 arguments=call.arguments))
        self.calls += 1
