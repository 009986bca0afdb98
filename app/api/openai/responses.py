"""/v1/responses: stateful turns (previous_response_id), stored responses, SSE events.

The request is translated in responses_schema, events are rendered in responses_render; this
module wires them to the engine and the response store (`app.state.response_store`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import structlog
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from app.api.common import (
    EventStreamResponse,
    check_message_count,
    new_id,
    record_finish,
    submit,
    until_disconnected,
)
from app.api.errors import NESTED_TOO_DEEPLY
from app.api.openai.responses_render import ResponseRenderer, page_items, request_echo
from app.api.openai.responses_schema import (
    ResponsesRequest,
    items_to_messages,
    known_calls,
    message_from_json,
    message_to_json,
    normalize_input,
    parse_request,
    turn_starts,
)
from app.api.openai.schema import unset_fields
from app.api.sse import DONE, sse_data
from app.core.types import (
    ChatMessage,
    Failed,
    Finish,
    GenerationEvent,
    GenerationRequest,
    LogprobsDelta,
    SamplingParams,
    TextDelta,
)
from app.engine.engine import GenerationStream, gateway_error
from app.errors import ContextLengthExceeded, EngineFailure, GatewayError, InvalidRequest, NotFound
from app.security.principal import Principal
from app.store import ResponseStore, StoredResponse

log = structlog.get_logger(__name__)
router = APIRouter()

TRUNCATED_HEADER = "x-mlxgw-truncated-messages"
DROPPED_TOOLS_HEADER = "x-mlxgw-dropped-tools"


def _owner(request: Request) -> str:
    principal: Principal = request.state.principal  # set on every request by the auth layer
    return principal.owner


def _store(request: Request) -> ResponseStore:
    store: ResponseStore = request.app.state.response_store
    return store


def _not_found(response_id: str, param: str = "response_id") -> NotFound:
    return NotFound(f"Response with id '{response_id}' not found.", param=param)


@dataclass
class _Turn:
    """What this turn stores once it ends: its input items and the context after it."""

    store: ResponseStore
    owner: str
    ttl: float
    keep: bool
    input_items: list[dict[str, Any]]
    context: list[ChatMessage]  # the context used (after truncation) + this turn's input

    async def save(self, renderer: ResponseRenderer) -> None:
        if not self.keep or renderer.status not in ("completed", "incomplete"):
            return
        output = items_to_messages(renderer.output, known_calls(self.context))
        now = time.time()
        item = StoredResponse(
            id=renderer.id, owner=self.owner, created_at=now, expires_at=now + self.ttl,
            response=renderer.snapshot(), input_items=self.input_items,
            context=[message_to_json(m) for m in [*self.context, *output]],
        )
        try:
            await self.store.put(item)
        except Exception:
            # The answer was generated; losing it over a store outage helps nobody. Say so loudly.
            log.exception("response_store_put_failed", response_id=renderer.id)


@router.post("/v1/responses", response_model=None)
async def create_response(request: Request) -> Response:
    try:
        body = await request.json()
    except ValueError:
        raise InvalidRequest("the request body is not valid JSON") from None
    except RecursionError:  # json.loads gives up on very deep nesting this way
        raise InvalidRequest(NESTED_TOO_DEEPLY) from None
    req = parse_request(body)
    settings = request.app.state.settings
    owner = _owner(request)

    previous: StoredResponse | None = None
    if req.previous_response_id is not None:
        previous = await _store(request).get(req.previous_response_id, owner)
        if previous is None:
            raise _not_found(req.previous_response_id, "previous_response_id")
    model = req.model or (str(previous.response.get("model")) if previous else None)
    if not model:
        raise InvalidRequest("`model` is required", param="model")

    # Counted before normalizing: the cap is there to bound that work.
    if isinstance(req.input, list):
        check_message_count(request, len(req.input), "input")
    items = normalize_input(req.input, _resolver(previous))
    context = [message_from_json(m) for m in previous.context] if previous else []
    new_messages = items_to_messages(items, known_calls(context))
    response_id = new_id("resp_")

    def build(history: list[ChatMessage]) -> GenerationRequest:
        system = [ChatMessage(role="system", content=req.instructions)] if req.instructions else []
        return GenerationRequest(
            model=model,
            request_id=getattr(request.state, "request_id", None) or response_id,
            messages=[*system, *history, *new_messages],
            max_tokens=req.max_output_tokens,
            sampling=_sampling(req),
            tools=req.tool_specs(),
            tool_choice=req.tool_choice_internal() if req.tools else None,
            template_kwargs=req.template_kwargs(),
            constraint=req.constraint(),
            logprobs=req.logprobs_count(),
            # A client that chose `truncation` gets OpenAI's meaning of it ("disabled": a 400;
            # "auto": whole turns dropped below, reported in truncation_details); one that did
            # not (Codex) gets the model's overflow policy.
            overflow="error" if "truncation" in req.model_fields_set else None,
        )

    extra: dict[str, Any] = {}
    headers: dict[str, str] = {}
    if req.dropped_tools:
        # Hosted tools (web_search, file_search, ...) run on OpenAI's side; this gateway has
        # none, so they are left out of the prompt rather than refusing the whole turn.
        headers[DROPPED_TOOLS_HEADER] = ",".join(req.dropped_tools)
        extra["warnings"] = [f"tool type {name!r} is not available on this server and was "
                             "left out" for name in req.dropped_tools]
        log.info("responses_tools_dropped", tools=req.dropped_tools)
    heartbeat = settings.server.heartbeat_seconds

    def turn_for(dropped: int) -> _Turn:
        return _Turn(store=_store(request), owner=owner, ttl=settings.responses.ttl,
                     keep=req.store, input_items=items,
                     context=[*context[dropped:], *new_messages])

    model_id = request.app.state.registry.resolve(model).id  # unknown: a 404 right here
    pending = asyncio.ensure_future(_submit_fitting(request, req, context, build))
    if req.stream:
        done, _ = await asyncio.wait({pending}, timeout=heartbeat)
        if not done:
            # Waiting in the queue (or for the model to load): answer now and keep the
            # client's idle timer fed with in_progress events; a refusal that comes later is
            # a response.failed event.
            renderer = ResponseRenderer(response_id=response_id, model=model_id,
                                        echo=request_echo(req), extra=extra)
            return EventStreamResponse(
                _sse_queued(request, pending, renderer, turn_for, heartbeat), headers=headers)
    stream, dropped = await pending
    if dropped:
        # Not an OpenAI key: the spec has no place to say what "auto" truncation removed.
        extra["truncation_details"] = {"dropped_messages": dropped}
        headers[TRUNCATED_HEADER] = str(dropped)
    renderer = ResponseRenderer(response_id=response_id, model=stream.model,
                                echo=request_echo(req), extra=extra)
    turn = turn_for(dropped)

    if req.stream:
        # The body sends its own heartbeats from the engine's batches.
        return EventStreamResponse(
            _sse(request, stream, renderer, turn, heartbeat), headers=headers,
        )
    error = await until_disconnected(request.receive, _run(request, stream, renderer),
                                     stream.aclose)
    if error is not None:
        raise error
    await turn.save(renderer)
    return JSONResponse(renderer.snapshot(), headers=headers)


def _sampling(req: ResponsesRequest) -> SamplingParams:
    defaults = SamplingParams()
    return SamplingParams(
        temperature=defaults.temperature if req.temperature is None else req.temperature,
        top_p=defaults.top_p if req.top_p is None else req.top_p,
        speculative=req.speculative == "auto",
        unset=unset_fields(req),
    )


def _resolver(previous: StoredResponse | None) -> Callable[[str], dict[str, Any] | None]:
    """`item_reference` finds items of the previous response: its input and its output."""
    items = [*previous.input_items, *previous.response.get("output", [])] if previous else []
    by_id = {item.get("id"): item for item in items}
    return by_id.get


async def _submit_fitting(
    request: Request, req: ResponsesRequest, context: list[ChatMessage],
    build: Callable[[list[ChatMessage]], GenerationRequest],
) -> tuple[GenerationStream, int]:
    """Submit, dropping the oldest turns when `truncation` is "auto" and the prompt is too long.

    Returns the stream and how many context messages were dropped. Only the engine knows the
    tokenized length, so turn cuts are probed by binary search. A probe that fits is closed at
    once unless it is the last: it holds an admission slot, and the next probe waiting for a
    slot behind it would wait for itself.
    """
    try:
        return await submit(request, build(context)), 0
    except ContextLengthExceeded as error:
        if not context:
            raise
        if req.truncation != "auto":
            raise ContextLengthExceeded(
                f"{error.message} The conversation has outgrown the model's context: start a "
                "new one, or send truncation: \"auto\" to drop the oldest turns.",
                param=error.param,
            ) from None
        last_error = error
    cuts = turn_starts(context)
    fits: int | None = None  # the smallest cut known to fit
    kept: GenerationStream | None = None
    low, high = 0, len(cuts) - 1
    while low <= high:
        middle = (low + high) // 2
        try:
            stream = await submit(request, build(context[cuts[middle]:]))
        except ContextLengthExceeded as error:
            last_error = error
            low = middle + 1
            continue
        fits, high = cuts[middle], middle - 1
        if low <= high:
            await stream.aclose()
        else:
            kept = stream
    if fits is None:
        raise ContextLengthExceeded(
            f"{last_error.message} This turn's input alone does not fit, even with the whole "
            "earlier conversation dropped.", param="input",
        )
    if kept is None:
        kept = await submit(request, build(context[fits:]))
    log.info("responses_truncated", dropped_messages=fits, kept=len(context) - fits)
    return kept, fits


async def _run(request: Request, stream: GenerationStream,
               renderer: ResponseRenderer) -> GatewayError | None:
    """Drive a non-stream response to its end; the error if it failed."""
    try:
        async for event in stream:
            if isinstance(event, Failed):
                return gateway_error(event.error)  # keeps its HTTP status
            if isinstance(event, Finish):
                await record_finish(request, stream, event)
            renderer.feed(event)
            if renderer.finished:
                break
    except Exception as exc:
        return gateway_error(exc)
    finally:
        await stream.aclose()
    if not renderer.finished or renderer.status == "failed":
        return EngineFailure("generation ended without finishing")
    return None


def _frame(event: dict[str, Any]) -> bytes:
    return sse_data(event, event=event["type"])


def _coalesce(events: list[GenerationEvent]) -> list[GenerationEvent]:
    """Adjacent text deltas of one wake-up as one delta: one SSE event instead of several.

    The wake-up's log-probabilities go first, as one event: the renderer holds them for the
    text that follows (each token's entry comes just before its text)."""
    tokens = tuple(t for e in events if isinstance(e, LogprobsDelta) for t in e.tokens)
    out: list[GenerationEvent] = [LogprobsDelta(tokens)] if tokens else []
    for event in events:
        if isinstance(event, LogprobsDelta):
            continue
        if isinstance(event, TextDelta) and out and isinstance(out[-1], TextDelta):
            out[-1] = TextDelta(out[-1].text + event.text)
        else:
            out.append(event)
    return out


async def _sse_queued(request: Request,
                      pending: asyncio.Future[tuple[GenerationStream, int]],
                      renderer: ResponseRenderer, turn_for: Callable[[int], _Turn],
                      heartbeat: float) -> AsyncIterator[bytes]:
    """The event stream of a turn still waiting for its slot: created and in_progress at once,
    in_progress again every heartbeat, then the generation as `_sse` streams it."""
    stream: GenerationStream | None = None
    try:
        yield b"".join(_frame(event) for event in renderer.start())
        while not pending.done():
            done, _ = await asyncio.wait({pending}, timeout=heartbeat)
            if not done:
                yield _frame(renderer.keepalive())
        try:
            stream, dropped = pending.result()
        except Exception as exc:
            yield b"".join(_frame(event) for event in renderer.fail(gateway_error(exc)))
            yield DONE
            return
        if dropped:
            renderer.extra["truncation_details"] = {"dropped_messages": dropped}
        async for chunk in _sse(request, stream, renderer, turn_for(dropped), heartbeat,
                                started=True):
            yield chunk
    finally:
        if not pending.done():
            pending.cancel()  # the client left while queued: give the slot back
            with contextlib.suppress(BaseException):
                await pending
        if stream is not None:
            await stream.aclose()


async def _sse(request: Request, stream: GenerationStream, renderer: ResponseRenderer,
               turn: _Turn, heartbeat: float, *, started: bool = False) -> AsyncIterator[bytes]:
    """The event stream; the turn is stored before its final event, so a client that chains
    the next turn the moment it sees `response.completed` finds it."""
    try:
        if not started:
            yield b"".join(_frame(event) for event in renderer.start())
        try:
            async for batch in stream.batches(heartbeat):
                if not batch:
                    yield _frame(renderer.keepalive())
                    continue
                events: list[dict[str, Any]] = []
                for generated in _coalesce(batch):
                    if isinstance(generated, Finish):
                        await record_finish(request, stream, generated)
                    events += renderer.feed(generated)
                    if renderer.finished:
                        await turn.save(renderer)
                        break
                yield b"".join(_frame(event) for event in events)
                if renderer.finished:
                    break
        except Exception as exc:
            yield b"".join(_frame(event) for event in renderer.fail(gateway_error(exc)))
        if not renderer.finished:
            failure = EngineFailure("generation ended without finishing")
            yield b"".join(_frame(event) for event in renderer.fail(failure))
        yield DONE
    finally:
        await stream.aclose()


@router.get("/v1/responses/{response_id}", response_model=None)
async def get_response(response_id: str, request: Request) -> Response:
    stored = await _store(request).get(response_id, _owner(request))
    if stored is None:
        raise _not_found(response_id)
    return JSONResponse(stored.response)


@router.delete("/v1/responses/{response_id}", response_model=None)
async def delete_response(response_id: str, request: Request) -> Response:
    if not await _store(request).delete(response_id, _owner(request)):
        raise _not_found(response_id)
    return JSONResponse({"id": response_id, "object": "response", "deleted": True})


@router.get("/v1/responses/{response_id}/input_items", response_model=None)
async def list_input_items(response_id: str, request: Request) -> Response:
    after, limit, order = _page_params(request)
    stored = await _store(request).get(response_id, _owner(request))
    if stored is None:
        raise _not_found(response_id)
    return JSONResponse(page_items(stored.input_items, after=after, limit=limit, order=order))


def _page_params(request: Request) -> tuple[str | None, int, str]:
    query = request.query_params
    order = query.get("order", "desc")
    if order not in ("asc", "desc"):
        raise InvalidRequest("order must be 'asc' or 'desc'", param="order")
    try:
        limit = int(query.get("limit", "20"))
    except ValueError:
        raise InvalidRequest("limit must be an integer from 1 to 100", param="limit") from None
    if not 1 <= limit <= 100:
        raise InvalidRequest("limit must be an integer from 1 to 100", param="limit")
    return query.get("after"), limit, order
