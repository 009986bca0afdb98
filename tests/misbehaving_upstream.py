"""A tiny OpenAI-shaped server that misbehaves on purpose, chosen by the request's `model`:

fail500   answers 500
busy429   answers 429 with Retry-After: 7
hang      waits 30 s before answering anything (past any sane upstream timeout)
die       starts an SSE stream, sends two chunks, then drops the connection
drip      streams a chunk every 50 ms for a minute; notes when the client went away
echo      a normal chat completion (JSON or SSE, with usage)

Every request is recorded (model, headers) so a test can see what the gateway sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import dataclass, field
from typing import Any

from starlette.types import Message, Receive, Scope, Send

MODELS = ["fail500", "busy429", "hang", "die", "drip", "echo"]


@dataclass
class Seen:
    model: str
    headers: dict[str, str]
    body: dict[str, Any]


@dataclass
class Misbehaving:
    requests: list[Seen] = field(default_factory=list)
    disconnected: list[str] = field(default_factory=list)  # models whose client went away

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        if scope["method"] == "GET" and scope["path"] == "/v1/models":
            await _json(send, 200, {"object": "list", "data": [
                {"id": m, "object": "model", "created": 0, "owned_by": "test"} for m in MODELS]})
            return
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        body = json.loads(b"".join(chunks) or b"{}")
        model = str(body.get("model"))
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        self.requests.append(Seen(model, headers, body))
        if model == "fail500":
            await _json(send, 500, {"error": {"message": "boom", "type": "server_error",
                                              "param": None, "code": None}})
        elif model == "busy429":
            await _json(send, 429, {"error": {"message": "slow down", "type": "rate_limit",
                                              "param": None, "code": None}},
                        [(b"retry-after", b"7")])
        elif model == "hang":
            # Until the client gives up (or 30 s): the gateway's timeout must end it first.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(30):
                    await _until_disconnected(receive)
                await _json(send, 200, _completion(model))
        elif model == "die":
            await _sse_start(send)
            for text in ("Hel", "lo"):
                await _chunk(send, model, text)
            raise ConnectionAbortedError("dying mid-stream on purpose")  # uvicorn drops it
        elif model == "drip":
            await self._drip(receive, send, model)
        elif body.get("stream"):
            await _sse_start(send)
            await _chunk(send, model, "hi")
            usage = {"prompt_tokens": 11, "completion_tokens": 1, "total_tokens": 12}
            if (body.get("stream_options") or {}).get("include_usage"):
                await _data(send, {"id": "c1", "object": "chat.completion.chunk",
                                   "created": 0, "model": model, "choices": [],
                                   "usage": usage})
            await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})
        else:
            await _json(send, 200, _completion(model))

    async def _drip(self, receive: Receive, send: Send, model: str) -> None:
        watcher = asyncio.ensure_future(_until_disconnected(receive))
        await _sse_start(send)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not watcher.done():
            await _chunk(send, model, "x")
            await asyncio.sleep(0.05)
        if watcher.done():
            self.disconnected.append(model)
        watcher.cancel()


async def _until_disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def _completion(model: str) -> dict[str, Any]:
    return {"id": "c1", "object": "chat.completion", "created": 0, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 11, "completion_tokens": 1, "total_tokens": 12}}


async def _json(send: Send, status: int, payload: dict[str, Any],
                extra: list[tuple[bytes, bytes]] | None = None) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), *(extra or [])]})
    await send({"type": "http.response.body", "body": json.dumps(payload).encode()})


async def _sse_start(send: Send) -> None:
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/event-stream")]})


async def _data(send: Send, payload: dict[str, Any]) -> None:
    message: Message = {"type": "http.response.body", "more_body": True,
                        "body": b"data: " + json.dumps(payload).encode() + b"\n\n"}
    await send(message)


async def _chunk(send: Send, model: str, text: str) -> None:
    await _data(send, {"id": "c1", "object": "chat.completion.chunk", "created": 0,
                       "model": model, "choices": [{"index": 0, "delta": {"content": text},
                                                    "finish_reason": None}]})
