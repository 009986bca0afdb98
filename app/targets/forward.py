"""One request forwarded to one upstream target, and its answer relayed to the client.

Until the upstream's first byte is here nothing has gone to the client, so every failure up
to then is `Unavailable` (the chain goes on); after it, the answer belongs to this target: a
break ends the stream with an error event in the caller's protocol.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import structlog

from app import metrics
from app.http.asgi import Message, Scope, Send, header, state
from app.targets.relay import SSERewriter, UsageMeter, rewrite_json, stream_error
from app.targets.resolve import Target
from app.targets.upstream import FORWARDED_HEADERS, Unavailable

log = structlog.get_logger(__name__)
SERVED_BY = "x-mlxgw-served-by"


class _MidStreamFailure(Exception):
    """The upstream broke off after the answer began (the client got an error event)."""


@dataclass(frozen=True)
class _RouteLabel:
    """What the access log reads its route label from when no local route ran."""

    path: str


class Forward:
    def __init__(self, scope: Scope, send: Send, kind: str, payload: dict[str, Any],
                 send_timeout: float) -> None:
        self.scope = scope
        self.send = send
        self.kind = kind  # the upstream path: chat/completions, completions, responses, ...
        self.payload = payload
        self.send_timeout = send_timeout
        self.state = state(scope)

    async def attempt(self, target: Target) -> Unavailable | None:
        upstream = target.upstream
        assert upstream is not None
        if self.kind == "messages" and not upstream.entry.anthropic:
            return Unavailable("protocol", "an OpenAI-only upstream: no /v1/messages there")
        try:
            upstream.admit()
        except Unavailable as unavailable:
            return unavailable
        self.scope.setdefault("route", _RouteLabel(self.scope["path"]))
        outcome = "neutral"
        try:
            payload, strip_usage = self._upstream_payload(target)
            started = time.monotonic()
            try:
                response = await upstream.open(self.kind, payload, self._forwarded_headers())
            except Unavailable as unavailable:
                outcome = "neutral" if unavailable.reason == "429" else "failure"
                return unavailable
            try:
                outcome = await self._relay(target, response, started, strip_usage)
            except Unavailable as unavailable:
                outcome = "failure"
                return unavailable
            finally:
                await response.aclose()  # an unfinished answer's connection is closed
            return None
        finally:
            upstream.done(outcome)

    def _upstream_payload(self, target: Target) -> tuple[bytes, bool]:
        payload = {**self.payload, "model": target.model}
        strip_usage = False
        if self.kind in ("chat/completions", "completions") and payload.get("stream") is True:
            options = payload.get("stream_options")
            options = options if isinstance(options, dict) else {}
            if not options.get("include_usage"):
                # Ask for usage to count it against the caller's budget; the chunk is taken
                # out again on the way back, as the client did not ask for it.
                payload["stream_options"] = {**options, "include_usage": True}
                strip_usage = True
        return json.dumps(payload).encode(), strip_usage

    def _forwarded_headers(self) -> dict[str, str]:
        headers = {name: value for name in FORWARDED_HEADERS
                   if (value := header(self.scope, name.encode())) is not None}
        request_id = self.state.get("request_id")
        if request_id:
            headers["x-request-id"] = str(request_id)
        return headers

    async def _relay(self, target: Target, response: httpx.Response, started: float,
                     strip_usage: bool) -> str:
        """Send the upstream's answer on. Until its first byte is here nothing has gone to
        the client, so failing then is still Unavailable (the chain goes on)."""
        meter = UsageMeter()
        chunks = response.aiter_bytes()
        is_sse = response.headers.get("content-type", "").startswith("text/event-stream")
        try:
            if is_sse:
                first = await anext(chunks, b"")
            else:  # a JSON answer is read whole: its `model` is renamed
                first = rewrite_json(b"".join([c async for c in chunks]), target.name, meter)
        except httpx.TimeoutException as error:
            raise Unavailable("timeout", f"no answer in time ({type(error).__name__})") from None
        except httpx.HTTPError as error:
            raise Unavailable("unreachable", f"broke off before answering "
                              f"({type(error).__name__})") from None
        metrics.TARGET_LATENCY.labels(target.name).observe(time.monotonic() - started)
        self.state["log_fields"].update(served_by=target.name, model=target.name)
        send = self._send_with_timeout
        headers = [(b"content-type", response.headers.get("content-type",
                                                          "application/json").encode()),
                   (SERVED_BY.encode(), target.name.encode())]
        if is_sse:
            headers += [(b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]
        await send({"type": "http.response.start", "status": response.status_code,
                    "headers": headers})
        outcome = "success" if response.status_code < 400 else "neutral"
        try:
            await self._relay_body(target, first, chunks, is_sse, strip_usage, meter)
        except TimeoutError:
            # Nothing moves the answer to a client that stopped reading: cut it, as the local
            # streams are cut, and let the upstream go.
            metrics.STALLED_STREAMS.inc()
            log.warning("client stopped reading: stream cut", target=target.name)
            outcome = "neutral"
        except _MidStreamFailure:
            outcome = "failure"
        await self._count(target, meter)
        return outcome

    async def _relay_body(self, target: Target, first: bytes,
                          chunks: AsyncIterator[bytes], is_sse: bool, strip_usage: bool,
                          meter: UsageMeter) -> None:
        send = self._send_with_timeout
        if not is_sse:
            await send({"type": "http.response.body", "body": first})
        else:
            rewriter = SSERewriter(target.name, meter, strip_usage=strip_usage)
            try:
                out = rewriter.feed(first)
                async for chunk in chunks:
                    if out:
                        await send({"type": "http.response.body", "body": out,
                                    "more_body": True})
                    out = rewriter.feed(chunk)
                out += rewriter.flush()
            except httpx.HTTPError as error:
                # Mid-stream: the client has part of an answer; no other target may add to it.
                log.warning("upstream broke off mid-stream", target=target.name,
                            error=type(error).__name__)
                out += stream_error(self.kind, f"The upstream {target.name} broke off the "
                                    "answer.", rewriter.sequence_number)
                await send({"type": "http.response.body", "body": out})
                raise _MidStreamFailure from None
            await send({"type": "http.response.body", "body": out})

    async def _send_with_timeout(self, message: Message) -> None:
        """A client that stopped reading does not hold the upstream forever."""
        async with asyncio.timeout(self.send_timeout):
            await self.send(message)

    async def _count(self, target: Target, meter: UsageMeter) -> None:
        """Upstream usage: into the access log, metrics and the caller's token budget."""
        if not meter.seen:
            return
        self.state["log_fields"].update(prompt_tokens=meter.prompt_tokens,
                                        completion_tokens=meter.completion_tokens)
        metrics.PROMPT_TOKENS.labels(target.name).inc(meter.prompt_tokens)
        metrics.COMPLETION_TOKENS.labels(target.name).inc(meter.completion_tokens)
        limits = self.state.get("limits")
        if limits is not None:
            await limits.charge_tokens(meter.total)
