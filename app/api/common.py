"""What every protocol adapter does the same way: ids, engine submission, disconnects, usage."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import structlog
from fastapi import Request
from starlette.responses import StreamingResponse
from starlette.types import Message, Receive, Scope, Send

from app import metrics
from app.api.sse import SSE_HEADERS
from app.core.types import Finish, GenerationRequest
from app.engine.engine import Engine, GenerationStream
from app.errors import ClientDisconnected, InvalidRequest
from app.security.auth import authorize_model

T = TypeVar("T")
PACKED_HEADER = "x-mlxgw-packed-tokens"  # prompt tokens packing removed (overflow = "pack")
log = structlog.get_logger(__name__)


def new_id(prefix: str) -> str:
    return f"{prefix}{secrets.token_hex(12)}"


def check_message_count(request: Request, count: int, param: str) -> None:
    """`[server] max_messages` for every protocol, checked before any per-message work."""
    limit: int = request.app.state.settings.server.max_messages
    if count > limit:
        raise InvalidRequest(f"{param}: at most {limit} per request (got {count})", param=param)


def authorize(request: Request, model: str) -> None:
    """404 for a model nobody configured, 403 for one outside the caller's key scope."""
    spec = request.app.state.registry.resolve(model)
    if getattr(request.state, "granted_model", None) == spec.id:
        return  # a local target of a route the key may use (app/targets)
    authorize_model(getattr(request.state, "principal", None), spec.id, *spec.aliases)


def engine_of(request: Request) -> Engine:
    engine: Engine = request.app.state.engine
    return engine


async def submit(request: Request, generation: GenerationRequest) -> GenerationStream:
    """Hand the request to the engine; errors here still become a proper HTTP status."""
    request.state.log_fields = {"model": generation.model}
    authorize(request, generation.model)
    principal = getattr(request.state, "principal", None)
    if principal is not None and principal.key_id is not None:
        generation.owner = principal.key_id  # per-key in-flight cap; prefix-cache owner
    # A route's local target waits this long for a slot, then the next target is tried.
    generation.queue_wait = getattr(request.state, "queue_wait", None)
    limits = getattr(request.state, "limits", None)
    # A token budget reserves prompt + max_tokens once the prompt's length is known.
    stream = await engine_of(request).submit(
        generation, admit=limits.reserve if limits is not None else None)
    request.state.log_fields["model"] = stream.model
    if stream.packed_tokens:
        # Said once for every protocol: the edge adds these to whatever response goes out.
        request.state.log_fields["packed_tokens"] = stream.packed_tokens
        request.state.response_headers = {PACKED_HEADER: str(stream.packed_tokens)}
    return stream


async def record_finish(request: Request, stream: GenerationStream, finish: Finish) -> None:
    """Usage into the access log line and metrics; tokens charged to rate limits."""
    fields: dict[str, Any] = request.state.log_fields
    fields.update(prompt_tokens=finish.usage.prompt_tokens,
                  completion_tokens=finish.usage.completion_tokens)
    if stream.first_token_at is not None:
        ttft = stream.first_token_at - stream.started_at
        fields["ttft_ms"] = round(ttft * 1000, 1)
        metrics.TTFT.labels(stream.model).observe(ttft)
    metrics.PROMPT_TOKENS.labels(stream.model).inc(finish.usage.prompt_tokens)
    metrics.COMPLETION_TOKENS.labels(stream.model).inc(finish.usage.completion_tokens)
    limits = getattr(request.state, "limits", None)
    if limits is not None:  # settle the reservation: refund what was not used
        await limits.charge_tokens(finish.usage.total_tokens)


async def until_disconnected(receive: Receive, work: Awaitable[T],
                             on_disconnect: Callable[[], Awaitable[None]] | None = None) -> T:
    """Await `work`, but stop it (and call `on_disconnect`) if the client goes away first:
    then ClientDisconnected. The body was read already, so the next ASGI message can only be
    `http.disconnect`.
    """
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(receive))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        task.cancel()
        if on_disconnect is not None:
            await on_disconnect()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        # Not CancelledError: that surfaced as a 500 with an "Exception in ASGI application"
        # traceback. The error handler's answer goes nowhere, and the log says 499.
        raise ClientDisconnected("the client disconnected before the answer was ready")
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()


async def _wait_for_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class EventStreamResponse(StreamingResponse):
    """SSE whose body iterator is always closed, so a vanished client's generation is
    cancelled at once rather than whenever the generator is collected.

    Heartbeats come from the body itself (`GenerationStream.batches` yields an empty list
    when the engine is quiet). A client that stops reading makes a write wait once the
    socket buffers are full; after `[server] send_timeout` seconds the stream is cut.
    """

    media_type = "text/event-stream"

    def __init__(self, body: AsyncIterator[bytes], *, headers: dict[str, str] | None = None):
        self._source = body
        super().__init__(body, headers={**SSE_HEADERS, **(headers or {})},
                         media_type=self.media_type)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        timeout: float = scope["app"].state.settings.server.send_timeout

        async def send_or_give_up(message: Message) -> None:
            try:
                async with asyncio.timeout(timeout):
                    await send(message)
            except TimeoutError:
                metrics.STALLED_STREAMS.inc()
                log.warning("client stopped reading: stream cut", timeout_seconds=timeout)
                raise ClientStalled from None

        try:
            await super().__call__(scope, receive, send_or_give_up)
        except ClientStalled:
            pass  # the connection is dropped by the server; nothing more to send
        finally:
            aclose = getattr(self._source, "aclose", None)
            if aclose is not None:
                await aclose()


class ClientStalled(Exception):
    """A send waited longer than `send_timeout` for the client to read."""

