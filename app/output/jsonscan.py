"""Scanning JSON text without parsing it: where a value ends, whether a marker is inside a string.

Tool-call formats end a call with a marker (`</tool_call>`) or with the end of a JSON value
(`[TOOL_CALLS]name[ARGS]{...}`); either may also appear inside a string argument, where it is
just text. These helpers find the real end.
"""

from __future__ import annotations


def value_end(text: str, start: int) -> int | None:
    """Index just past the JSON object/array starting at `text[start]`; None while incomplete."""
    depth = 0
    in_string = False
    escaped = False
    for i in range(start, len(text)):
        ch = text[i]
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
            if depth == 0:
                return i + 1
            if depth < 0:
                return None
    return None


def find_outside_strings(text: str, marker: str, start: int = 0) -> int:
    """Index of `marker` in `text` outside JSON strings (-1 if none).

    Quotes count only once JSON has begun (after the first `{` or `[`), so prose before the
    JSON, like an apostrophe, does not open a string.
    """
    in_string = False
    escaped = False
    started = False
    i = start
    while i < len(text):
        ch = text[i]
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        else:
            if text.startswith(marker, i):
                return i
            if ch in "{[":
                started = True
            elif ch == '"' and started:
                in_string = True
        i += 1
    return -1


def partial_suffix(text: str, markers: tuple[str, ...]) -> int:
    """Length of the longest end of `text` that is a proper start of some marker.

    That much text is held back while streaming: it may turn out to be a marker.
    """
    best = 0
    for marker in markers:
        for n in range(min(len(marker) - 1, len(text)), best, -1):
            if marker.startswith(text[-n:]):
                best = n
                break
    return best


def find_outside_regions(text: str, marker: str, regions: tuple[tuple[str, str], ...]) -> int:
    """Index of `marker` outside the given (open, close) regions, e.g. argument values whose
    text may contain the call's own end marker. -1 if none (or while a region is open)."""
    i = 0
    while i < len(text):
        if text.startswith(marker, i):
            return i
        for open_, close in regions:
            if text.startswith(open_, i):
                end = text.find(close, i + len(open_))
                if end < 0:
                    return -1
                i = end + len(close)
                break
        else:
            i += 1
    return -1
