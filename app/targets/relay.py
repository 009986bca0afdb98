"""An upstream's answer, passed on: SSE event by event as each one completes (never the whole
stream), JSON whole. On the way the `model` field is renamed to the target that served it, the
usage is read for the caller's token budget, and a usage chunk the gateway asked for on the
client's behalf (to count tokens) is taken out again.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

_EVENT_END = re.compile(rb"\n\n")


@dataclass
class UsageMeter:
    """Tokens an answer reported, in any of the wire shapes (chat/completions `usage`,
    Responses `response.usage`, Anthropic `message.usage` + cumulative `message_delta`)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    seen: bool = False

    @property
    def total(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def feed(self, payload: dict[str, Any]) -> None:
        for holder in (payload, payload.get("response"), payload.get("message")):
            if not isinstance(holder, dict):
                continue
            usage = holder.get("usage")
            if not isinstance(usage, dict):
                continue
            prompt = _int(usage.get("prompt_tokens", usage.get("input_tokens")))
            completion = _int(usage.get("completion_tokens", usage.get("output_tokens")))
            if prompt is not None or completion is not None:
                self.seen = True
            self.prompt_tokens = max(self.prompt_tokens, prompt or 0)
            self.completion_tokens = max(self.completion_tokens, completion or 0)


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def rename_model(payload: dict[str, Any], name: str) -> None:
    """The body names the target that served it, wherever the protocol keeps `model`."""
    for holder in (payload, payload.get("response"), payload.get("message")):
        if isinstance(holder, dict) and "model" in holder:
            holder["model"] = name


class SSERewriter:
    """Bytes in, whole SSE events out (rewritten), as soon as each one is complete."""

    def __init__(self, name: str, meter: UsageMeter, *, strip_usage: bool) -> None:
        self.name = name
        self.meter = meter
        self.strip_usage = strip_usage
        self.sequence_number = -1  # the last Responses sequence_number seen
        self._buffer = b""

    def feed(self, chunk: bytes) -> bytes:
        self._buffer += chunk
        text = self._buffer.replace(b"\r\n", b"\n")
        if text.endswith(b"\r"):  # a CRLF split across two chunks: wait for its LF
            text, tail = text[:-1], b"\r"
        else:
            tail = b""
        parts = _EVENT_END.split(text)
        self._buffer = parts.pop() + tail
        return b"".join(self._event(part) for part in parts)

    def flush(self) -> bytes:
        rest, self._buffer = self._buffer, b""
        return self._event(rest.replace(b"\r\n", b"\n")) if rest.strip() else b""

    def _event(self, block: bytes) -> bytes:
        lines = block.split(b"\n")
        data = [line[5:].removeprefix(b" ") for line in lines if line.startswith(b"data:")]
        if not data:
            return block + b"\n\n"  # comments (heartbeats), bare event lines
        try:
            payload = json.loads(b"\n".join(data))
        except ValueError:
            return block + b"\n\n"  # [DONE] and anything else that is not JSON
        if not isinstance(payload, dict):
            return block + b"\n\n"
        self.meter.feed(payload)
        if isinstance(payload.get("sequence_number"), int):
            self.sequence_number = payload["sequence_number"]
        if self.strip_usage:
            if payload.get("choices") == [] and payload.get("usage") is not None:
                return b""  # the usage chunk the client did not ask for
            if "usage" in payload and payload["usage"] is None:
                del payload["usage"]
        rename_model(payload, self.name)
        others = [line for line in lines if not line.startswith(b"data:")]
        encoded = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()
        return b"\n".join([*others, b"data: " + encoded]) + b"\n\n"


def rewrite_json(body: bytes, name: str, meter: UsageMeter) -> bytes:
    """A whole JSON answer with `model` renamed; anything not a JSON object goes as it came."""
    try:
        payload = json.loads(body)
    except ValueError:
        return body
    if not isinstance(payload, dict):
        return body
    meter.feed(payload)
    rename_model(payload, name)
    return json.dumps(payload, ensure_ascii=False).encode()


def stream_error(kind: str, message: str, sequence_number: int) -> bytes:
    """The last event of a stream whose upstream broke off, in the caller's protocol."""
    if kind == "messages":
        payload: dict[str, Any] = {"type": "error",
                                   "error": {"type": "api_error", "message": message}}
        return b"event: error\ndata: " + json.dumps(payload).encode() + b"\n\n"
    if kind == "responses":
        payload = {"type": "error", "code": "upstream_failed", "message": message,
                   "param": None, "sequence_number": sequence_number + 1}
        return b"event: error\ndata: " + json.dumps(payload).encode() + b"\n\n"
    payload = {"error": {"message": message, "type": "server_error", "param": None,
                         "code": "upstream_failed"}}
    return b"data: " + json.dumps(payload).encode() + b"\n\n"
