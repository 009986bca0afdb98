"""One request's streaming output parser: raw text deltas in, content / reasoning / calls out.

`feed(delta)` returns the events that are certain so far; `finish()` the rest. Text that could
still be the start of a marker is held back, so no marker ever reaches the content, and the
events do not depend on how the text was split (a non-stream answer is `feed(all) + finish()`).
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass

from app import metrics
from app.core.types import ReasoningDelta, TextDelta, ToolCallDelta
from app.output import jsonscan
from app.output.calls import Call, Schemas
from app.output.formats import Block, Format

OutputEvent = TextDelta | ReasoningDelta | ToolCallDelta

_TEXT, _REASONING, _CALL, _LEADING = "text", "reasoning", "call", "leading"
_NAME_PREFIX = re.compile(r'\s*\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"arguments"\s*:\s*')


def new_call_id() -> str:
    return f"call_{secrets.token_hex(12)}"


@dataclass
class _Incremental:
    """A JSON call whose arguments are being streamed: where they start, how much was sent."""

    index: int
    args_start: int
    sent: int = 0  # characters of the arguments value already sent
    done: bool = False


class OutputParser:
    def __init__(self, fmt: Format | None, *, schemas: Schemas | None = None,
                 parse_tools: bool = True, start_in_reasoning: bool = False,
                 model: str = "") -> None:
        self.format = fmt
        self.schemas = schemas or {}
        self.model = model
        blocks = fmt.blocks if fmt is not None and parse_tools else ()
        self._blocks: tuple[Block, ...] = blocks
        self._wrappers = fmt.wrappers if fmt is not None and parse_tools else ()
        self._think = fmt.think if fmt is not None else (("<think>", "</think>"),)
        self._extra = fmt.extra_markers if fmt is not None else ()
        self._leading = bool(fmt is not None and parse_tools and fmt.leading_call)
        self._text_markers = (*[t[0] for t in self._think], *[b.start for b in blocks],
                              *self._wrappers, *self._extra)
        self._buf = ""
        self._mode = _TEXT
        self._think_end = self._think[0][1] if self._think else ""
        if start_in_reasoning and self._think:
            self._mode = _REASONING
        self._ws = ""  # content's trailing whitespace, held until more content follows
        # ... only where a call can follow it (its separator is no part of the content); else
        # whitespace is content, sent as it comes (holding it delays a stream by a token).
        self._hold_ws = bool(blocks)
        self._rws = ""  # the same for reasoning
        self._content_started = False
        self._reasoning_started = False
        self._marked = start_in_reasoning  # any think block or call seen
        self._in_section = False
        self._block: Block | None = None
        self._incremental: _Incremental | None = None
        self._at_start = True  # nothing but whitespace seen yet (for `leading_call`)
        self.calls = 0
        self.failed_calls = 0

    # --- public -------------------------------------------------------------------------------

    def feed(self, text: str) -> list[OutputEvent]:
        if not text:
            return []
        self._buf += text
        return self._drain(final=False)

    def finish(self) -> list[OutputEvent]:
        events = self._drain(final=True)
        if self._ws and not self._marked:
            events.append(TextDelta(self._ws))
        self._ws = ""
        return _merge(events)

    # --- the state machine --------------------------------------------------------------------

    def _drain(self, final: bool) -> list[OutputEvent]:
        out: list[OutputEvent] = []
        while True:
            before = (self._mode, len(self._buf))
            if self._mode == _TEXT:
                self._text(out, final)
            elif self._mode == _REASONING:
                self._reasoning(out, final)
            elif self._mode == _CALL:
                self._call(out, final)
            else:
                self._leading_call(out, final)
            if (self._mode, len(self._buf)) == before:
                return _merge(out)

    def _text(self, out: list[OutputEvent], final: bool) -> None:
        if self._leading and self._at_start:
            stripped = self._buf.lstrip()
            if stripped[:1] in ("{", "["):
                self._mode = _LEADING
                return
            if not stripped and not final:
                return  # only whitespace so far: cannot tell yet
        found = _earliest(self._buf, self._text_markers)
        if found is None:
            hold = 0 if final else jsonscan.partial_suffix(self._buf, self._text_markers)
            self._section_text(out, self._buf[:len(self._buf) - hold])
            self._buf = self._buf[len(self._buf) - hold:]
            return
        at, marker = found
        self._section_text(out, self._buf[:at])
        self._buf = self._buf[at + len(marker):]
        self._marked = True
        self._at_start = False
        for start, end in self._think:
            if marker == start:
                self._mode, self._think_end = _REASONING, end
                return
        for block in self._blocks:
            if marker == block.start:
                self._mode, self._block, self._incremental = _CALL, block, None
                return
        if marker in self._wrappers:
            # Inside a tool section only calls count: stray text there is dropped.
            opens = self._wrappers.index(marker) % 2 == 0
            self._in_section = opens

    def _section_text(self, out: list[OutputEvent], text: str) -> None:
        if not self._in_section:
            self._emit_text(out, text)

    def _emit_text(self, out: list[OutputEvent], text: str) -> None:
        """Content, less the whitespace at its very start and (where a call can follow) at its
        end: separators the templates put around think blocks and calls are no part of it.
        Whitespace inside is kept."""
        if not self._content_started:
            text = text.lstrip()
        if not text:
            return
        core = text.rstrip() if self._hold_ws else text
        if not core:
            self._ws += text
            return
        self._at_start = False
        self._content_started = True
        out.append(TextDelta(self._ws + core))
        self._ws = text[len(core):]

    def _reasoning(self, out: list[OutputEvent], final: bool) -> None:
        end = self._think_end
        at = self._buf.find(end)
        if at < 0:
            hold = 0 if final else jsonscan.partial_suffix(self._buf, (end,))
            self._emit_reasoning(out, self._buf[:len(self._buf) - hold])
            self._buf = self._buf[len(self._buf) - hold:]
            return
        self._emit_reasoning(out, self._buf[:at])
        self._buf = self._buf[at + len(end):]
        self._rws, self._mode = "", _TEXT

    def _emit_reasoning(self, out: list[OutputEvent], text: str) -> None:
        if not self._reasoning_started:
            text = text.lstrip()
        if not text:
            return
        core = text.rstrip()
        if not core:
            self._rws += text
            return
        self._reasoning_started = True
        out.append(ReasoningDelta(self._rws + core))
        self._rws = text[len(core):]

    def _call(self, out: list[OutputEvent], final: bool) -> None:
        block = self._block
        assert block is not None
        if block.incremental:
            self._stream_arguments(out)
        end = self._block_end(block, final)
        if end is None:
            if final:
                self._close_call(out, self._buf, complete=False)
                self._buf = ""
            return
        body_end, resume = end
        body = self._buf[:body_end]
        self._buf = self._buf[resume:]
        self._close_call(out, body, complete=True)

    def _block_end(self, block: Block, final: bool) -> tuple[int, int] | None:
        buf = self._buf
        if block.end_mode == "eof":
            return (len(buf), len(buf)) if final else None
        if block.end_mode == "json":
            # The call ends where the JSON value after its header ends; the next call (or
            # text) may follow at once.
            first = _json_start(buf)
            if first < 0:
                return (len(buf), len(buf)) if final else None
            stop = jsonscan.value_end(buf, first)
            if stop is None:
                return (len(buf), len(buf)) if final else None
            return stop, stop
        if block.json_body:
            at = jsonscan.find_outside_strings(buf, block.end)
        elif block.opaque:
            at = jsonscan.find_outside_regions(buf, block.end, block.opaque)
        else:
            at = buf.find(block.end)
        if at < 0 and final and (block.json_body or block.opaque):
            # Malformed (an unclosed string or value): fall back to the first end marker.
            at = buf.find(block.end)
        if at < 0:
            return None
        return at, at + len(block.end)

    def _close_call(self, out: list[OutputEvent], body: str, *, complete: bool) -> None:
        block = self._block
        assert block is not None
        inc = self._incremental
        self._mode, self._block, self._incremental = _TEXT, None, None
        if inc is not None:
            # Already announced and streamed: send what is left of the arguments.
            end = jsonscan.value_end(body, inc.args_start)
            stop = end if end is not None else len(body)
            rest = body[inc.args_start + inc.sent:stop]
            if rest:
                out.append(ToolCallDelta(index=inc.index, arguments=rest))
            return
        if not complete and block.complete_prefix is not None:
            # Cut off (max_tokens): keep the calls that were written in full.
            body = block.complete_prefix(body)
            complete = True
        # A call whose end marker never came was cut off: it is no call, even if its body
        # happens to read as one.
        cut_off = not complete and block.end_mode == "marker"
        calls = block.parse(body, self.schemas) if body.strip() and not cut_off else None
        if calls:
            for call in calls:
                self._emit_call(out, call)
            return
        if body.strip():
            self.failed_calls += 1
            metrics.TOOL_CALL_PARSE_FAILURES.labels(self.format.name if self.format else "").inc()
            if not complete and self.calls:
                return  # the cut-off tail after complete calls: counted, not content
            self._emit_text(out, body)

    def _emit_call(self, out: list[OutputEvent], call: Call) -> None:
        out.append(ToolCallDelta(index=self.calls, id=new_call_id(), name=call.name,
                                 arguments=call.arguments))
        self.calls += 1

    def _stream_arguments(self, out: list[OutputEvent]) -> None:
        """Hermes-style JSON: announce the call once its name is read, then send the arguments
        text as it arrives (everything inside the still-open arguments object is its text)."""
        inc = self._incremental
        if inc is None:
            match = _NAME_PREFIX.match(self._buf)
            if match is None or not self._buf[match.end():].lstrip().startswith("{"):
                return
            try:
                name = json.loads(match.group(1))
            except ValueError:
                return
            if not isinstance(name, str) or not name.strip():
                return
            start = match.end() + (len(self._buf[match.end():]) -
                                   len(self._buf[match.end():].lstrip()))
            inc = self._incremental = _Incremental(index=self.calls, args_start=start)
            out.append(ToolCallDelta(index=self.calls, id=new_call_id(), name=name.strip(),
                                     arguments=""))
            self.calls += 1
        if inc.done:
            return
        end = jsonscan.value_end(self._buf, inc.args_start)
        stop = end if end is not None else len(self._buf)
        piece = self._buf[inc.args_start + inc.sent:stop]
        if piece:
            out.append(ToolCallDelta(index=inc.index, arguments=piece))
            inc.sent += len(piece)
        inc.done = end is not None

    def _leading_call(self, out: list[OutputEvent], final: bool) -> None:
        """Llama: an output that starts with `{` or `[` may be a call; wait for the end."""
        if not final:
            return
        text, self._buf = self._buf, ""
        self._mode = _TEXT
        block = self._blocks[0]
        calls = block.parse(text, self.schemas)
        if calls:
            for call in calls:
                self._emit_call(out, call)
        else:
            self._emit_text(out, text)


_HEADER_NAME = re.compile(r"\s*[A-Za-z0-9_.\-]+\s*$")


def _json_start(buf: str) -> int:
    """Where the JSON of a Mistral call starts: `[{...}]`, `NAME[ARGS]{...}` or `NAME{...}`."""
    lead = len(buf) - len(buf.lstrip())
    if buf[lead:lead + 1] in ("[", "{"):
        return lead
    args = buf.find("[ARGS]")
    if args >= 0:
        after = args + len("[ARGS]")
        return after + len(buf[after:]) - len(buf[after:].lstrip()) if buf[after:].strip() else -1
    brace = buf.find("{")
    if brace >= 0 and _HEADER_NAME.match(buf[:brace]):
        return brace
    return -1


def _earliest(text: str, markers: tuple[str, ...]) -> tuple[int, str] | None:
    best: tuple[int, str] | None = None
    for marker in markers:
        at = text.find(marker)
        if at >= 0 and (best is None or at < best[0]
                        or (at == best[0] and len(marker) > len(best[1]))):
            best = (at, marker)
    return best


def _merge(events: list[OutputEvent]) -> list[OutputEvent]:
    """Adjacent deltas of one kind as one event (fewer chunks on the wire)."""
    out: list[OutputEvent] = []
    for event in events:
        last = out[-1] if out else None
        if isinstance(event, TextDelta) and isinstance(last, TextDelta):
            out[-1] = TextDelta(last.text + event.text)
        elif isinstance(event, ReasoningDelta) and isinstance(last, ReasoningDelta):
            out[-1] = ReasoningDelta(last.text + event.text)
        else:
            out.append(event)
    return out
