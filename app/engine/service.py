"""The engine as the asyncio side sees it: submit a GenerationRequest, iterate its events.

Everything that can be refused (unknown model, prompt too long, failed load) is raised by
`submit` before a byte is streamed, so the API can answer with a proper status code.
"""

from __future__ import annotations

import asyncio
import collections
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog

from app.core.types import Failed, Finish, GenerationEvent, GenerationRequest, TextDelta
from app.engine.prompt import prompt_tokens
from app.engine.sampling import make_sequence_processors, make_sequence_sampler
from app.engine.scheduler import ModelBatch, Sequence
from app.engine.worker import EngineThread
from app.errors import (
    ContextLengthExceeded,
    EngineFailure,
    GatewayError,
    InvalidRequest,
    ModelLoadFailed,
)
from app.settings import EngineSettings

log = structlog.get_logger(__name__)


class ModelSource(Protocol):
    """What the engine needs to know about a model it may load."""

    @property
    def id(self) -> str: ...

    @property
    def load_path(self) -> str: ...

    @property
    def max_context(self) -> int | None: ...


class Resolver(Protocol):
    def resolve(self, name: str) -> ModelSource: ...


@dataclass(eq=False)
class LoadedModel:
    id: str
    batch: ModelBatch
    tokenizer: Any
    context_length: int
    loaded_at: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.time)
    leases: int = 0


class GenerationStream:
    """Events of one generation. Iterate it; `aclose()` cancels it (the client went away)."""

    def __init__(self, model: str, prompt_tokens: int, seq: Sequence, engine: Engine,
                 loaded: LoadedModel) -> None:
        self.model = model
        self.prompt_tokens = prompt_tokens
        self.started_at = time.monotonic()
        self.first_token_at: float | None = None
        self._seq = seq
        self._engine = engine
        self._loaded = loaded
        self._inbox: asyncio.Queue[list[GenerationEvent]] = asyncio.Queue()
        self._ready: collections.deque[GenerationEvent] = collections.deque()
        self._finished = False

    def deliver(self, events: list[GenerationEvent]) -> None:
        """On the event loop: a batch of events from the MLX thread."""
        self._inbox.put_nowait(events)

    def __aiter__(self) -> GenerationStream:
        return self

    async def __anext__(self) -> GenerationEvent:
        if self._finished and not self._ready:
            raise StopAsyncIteration
        while not self._ready:
            self._ready.extend(await self._inbox.get())
        event = self._ready.popleft()
        if isinstance(event, TextDelta) and self.first_token_at is None:
            self.first_token_at = time.monotonic()
        if isinstance(event, Finish | Failed):
            self._finish()
        return event

    async def collect(self) -> tuple[str, Finish]:
        """Run to the end; the whole text and the Finish. A Failed event is raised."""
        parts: list[str] = []
        async for event in self:
            if isinstance(event, TextDelta):
                parts.append(event.text)
            elif isinstance(event, Finish):
                return "".join(parts), event
            elif isinstance(event, Failed):
                raise event.error
        raise RuntimeError("generation ended without a finish event")

    async def aclose(self) -> None:
        if not self._finished:
            self._seq.cancelled.set()
            self._engine._thread.wake()
            self._finish()

    def _finish(self) -> None:
        if not self._finished:
            self._finished = True
            self._engine._release(self._loaded)


class Engine:
    def __init__(self, settings: EngineSettings, resolver: Resolver) -> None:
        self.settings = settings
        self.resolver = resolver
        self._thread = EngineThread()
        self._loaded: dict[str, LoadedModel] = {}
        self._loading: dict[str, asyncio.Future[LoadedModel]] = {}
        # One tokenizer thread: HF fast tokenizers dislike concurrent use, and it keeps the
        # event loop and the MLX thread free while chat templates render.
        self._tokenize = ThreadPoolExecutor(1, thread_name_prefix="tokenizer")

    async def start(self) -> None:
        self._thread.start()

    async def stop(self) -> None:
        await asyncio.to_thread(self._thread.stop)
        self._tokenize.shutdown(wait=False, cancel_futures=True)

    def loaded_models(self) -> dict[str, LoadedModel]:
        return dict(self._loaded)

    async def ensure_loaded(self, name: str) -> LoadedModel:
        """The resident model for `name`, loading it once however many requests ask at once."""
        source = self.resolver.resolve(name)
        if (loaded := self._loaded.get(source.id)) is not None:
            return loaded
        if (pending := self._loading.get(source.id)) is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[LoadedModel] = asyncio.get_running_loop().create_future()
        self._loading[source.id] = future
        try:
            loaded = await self._thread.call(lambda: self._load_on_thread(source))
        except Exception as error:
            failure = ModelLoadFailed(f"model {source.id!r} failed to load: {error}")
            log.error("model load failed", model=source.id, error=repr(error))
            future.set_exception(failure)
            future.exception()  # retrieved: waiters get it via shield, no "never retrieved" noise
            raise failure from error
        finally:
            self._loading.pop(source.id, None)
        self._loaded[source.id] = loaded
        future.set_result(loaded)
        return loaded

    def _load_on_thread(self, source: ModelSource) -> LoadedModel:
        from mlx_lm import load

        started = time.monotonic()
        log.info("model load started", model=source.id, path=source.load_path)
        model, tokenizer, config = load(source.load_path, return_config=True)
        context = int(config.get("max_position_embeddings") or 4096)
        if source.max_context:
            context = min(context, source.max_context)
        batch = ModelBatch(
            model, tokenizer, max_batch_size=self.settings.max_batch_size,
            prefill_chunk=self.settings.prefill_chunk, stream=self._thread.stream,
        )
        self._thread.attach(source.id, batch)
        log.info("model load finished", model=source.id,
                 seconds=round(time.monotonic() - started, 3), context_length=context)
        return LoadedModel(id=source.id, batch=batch, tokenizer=tokenizer, context_length=context)

    async def submit(self, request: GenerationRequest) -> GenerationStream:
        loaded = await self.ensure_loaded(request.model)
        loaded.leases += 1
        try:
            return await self._start(request, loaded)
        except BaseException:
            self._release(loaded)
            raise

    async def _start(self, request: GenerationRequest, loaded: LoadedModel) -> GenerationStream:
        loop = asyncio.get_running_loop()
        tokens = await loop.run_in_executor(
            self._tokenize, prompt_tokens, loaded.tokenizer, request
        )
        max_tokens = self._max_tokens(request, len(tokens), loaded.context_length)
        stream_ref: list[GenerationStream] = []

        def emit(events: list[GenerationEvent]) -> None:
            loop.call_soon_threadsafe(stream_ref[0].deliver, events)

        seq = Sequence(
            request_id=request.request_id,
            prompt=tokens,
            max_tokens=max_tokens,
            sampler=make_sequence_sampler(request.sampling),
            processors=make_sequence_processors(request.sampling),
            stop=list(request.stop),
            emit=emit,
        )
        stream = GenerationStream(loaded.id, len(tokens), seq, self, loaded)
        stream_ref.append(stream)
        self._thread.add_sequence(loaded.id, seq)
        return stream

    def _max_tokens(self, request: GenerationRequest, prompt_len: int, context: int) -> int:
        room = context - prompt_len
        if room <= 0:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {context} tokens, but the prompt has "
                f"{prompt_len} tokens. Shorten the prompt or the conversation.",
                param="messages" if request.messages is not None else "prompt",
            )
        if request.max_tokens is None:
            return min(room, self.settings.default_max_tokens)
        if request.max_tokens < 1:
            raise InvalidRequest("max_tokens must be at least 1", param="max_tokens")
        if request.max_tokens > room:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {context} tokens. The prompt has "
                f"{prompt_len} tokens and max_tokens asks for {request.max_tokens}, "
                f"{prompt_len + request.max_tokens} in all. Lower max_tokens to at most {room}.",
                param="max_tokens",
            )
        return request.max_tokens

    def _release(self, loaded: LoadedModel) -> None:
        loaded.leases -= 1
        loaded.last_used = time.time()


def gateway_error(error: BaseException) -> GatewayError:
    """Anything raised below the API as a GatewayError (unexpected ones become a 500)."""
    if isinstance(error, GatewayError):
        return error
    return EngineFailure(f"internal error: {type(error).__name__}")

