"""The engine as the asyncio side sees it: submit a GenerationRequest, iterate its events.

Everything that can be refused (unknown model, prompt too long, failed load) is raised by
`submit` before a byte is streamed, so the API can answer with a proper status code.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor

import structlog

from app.core.types import (
    Failed,
    Finish,
    GenerationEvent,
    GenerationRequest,
    LogprobsDelta,
    TextDelta,
    TokenLogprob,
)
from app.engine.prompt import prompt_tokens
from app.engine.residency.pool import LoadedModel, ModelPool
from app.engine.sampling import make_sequence_processors, make_sequence_sampler
from app.engine.scheduler import Sequence
from app.engine.thread import EngineThread
from app.errors import (
    ContextLengthExceeded,
    EngineFailure,
    GatewayError,
    InvalidRequest,
    ModelLoadFailed,
    Overloaded,
)
from app.limits.admission import Admission
from app.limits.breaker import CircuitBreaker
from app.models.registry import ModelRegistry
from app.output import grammar
from app.settings import Settings

log = structlog.get_logger(__name__)


class GenerationStream:
    """Events of one generation. Iterate it; `aclose()` cancels it (the client went away)."""

    def __init__(self, model: str, seq: Sequence, engine: Engine, loaded: LoadedModel,
                 slot_started: float | None) -> None:
        self.model = model
        self.started_at = time.monotonic()
        self.first_token_at: float | None = None
        self._seq = seq
        self._engine = engine
        self._loaded = loaded
        self._inbox: asyncio.Queue[list[GenerationEvent]] = asyncio.Queue()
        self._ready: collections.deque[GenerationEvent] = collections.deque()
        self._finished = False
        self._slot_started = slot_started
        self.logprobs: list[TokenLogprob] = []  # every token's, for requests that asked

    @property
    def prompt_tokens(self) -> int:
        return len(self._seq.prompt)

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
        self._observe(event)
        return event

    async def batches(self, heartbeat: float) -> AsyncIterator[list[GenerationEvent]]:
        """Everything that is ready, as one list per wake-up; an empty list when nothing came
        for `heartbeat` seconds (prefill, queueing), so the caller can keep the line alive.

        Under load a slow reader gets several tokens per list and sends them as one chunk,
        instead of paying the per-chunk cost on the event loop for each token.
        """
        while not (self._finished and not self._ready):
            if not self._ready:
                try:
                    async with asyncio.timeout(heartbeat):
                        self._ready.extend(await self._inbox.get())
                except TimeoutError:
                    yield []
                    continue
            while not self._inbox.empty():
                self._ready.extend(self._inbox.get_nowait())
            events = list(self._ready)
            self._ready.clear()
            for event in events:
                self._observe(event)
            yield events

    def _observe(self, event: GenerationEvent) -> None:
        if isinstance(event, TextDelta) and self.first_token_at is None:
            self.first_token_at = time.monotonic()
        if isinstance(event, LogprobsDelta):
            self.logprobs.extend(event.tokens)
        if isinstance(event, Finish | Failed):
            self._finish(event)

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
            self._finish(None)

    def _finish(self, event: Finish | Failed | None) -> None:
        if not self._finished:
            self._finished = True
            self._engine._release(self._loaded, self._slot_started, event)


class Engine:
    def __init__(self, settings: Settings, registry: ModelRegistry, *,
                 admission: Admission | None = None,
                 breaker: CircuitBreaker | None = None) -> None:
        self.settings = settings.engine
        self.registry = registry
        # Admission control and the breaker sit at the engine's door, the one place every
        # protocol passes through.
        self.admission = admission
        self.breaker = breaker
        self._thread = EngineThread()
        self.pool = ModelPool(settings, registry, self._thread)
        # One tokenizer thread: HF fast tokenizers dislike concurrent use, and it keeps the
        # event loop and the MLX thread free while chat templates render.
        self._tokenize = ThreadPoolExecutor(1, thread_name_prefix="tokenizer")

    async def start(self) -> None:
        self._thread.start()
        self._sweeper = asyncio.create_task(self.pool.sweep_idle())

    async def stop(self) -> None:
        self._sweeper.cancel()
        await self.pool.close()
        await asyncio.to_thread(self._thread.stop)
        self._tokenize.shutdown(wait=False, cancel_futures=True)

    async def end_all_streams(self, reason: str) -> None:
        """End every running generation with an error event (the shutdown grace ran out)."""
        failure = Overloaded(reason, retry_after=5)
        await self._thread.call(lambda: self._thread.fail_all(failure))

    def loaded_models(self) -> dict[str, LoadedModel]:
        return self.pool.loaded()

    async def ensure_loaded(self, name: str) -> LoadedModel:
        """Make `name` resident without generating (warm-up, admin load)."""
        return await self.pool.load(name)

    async def count_prompt_tokens(self, request: GenerationRequest) -> int:
        """The prompt's exact length with the model's own template (loads the model)."""
        loaded = await self.pool.acquire(request.model)
        try:
            tokens = await asyncio.get_running_loop().run_in_executor(
                self._tokenize, prompt_tokens, loaded.tokenizer, request)
        finally:
            self.pool.release(loaded)
        return len(tokens)

    async def submit(self, request: GenerationRequest, *,
                     admit: Callable[[int], Awaitable[None]] | None = None) -> GenerationStream:
        """`admit(prompt + max_tokens)` runs once the prompt is tokenized and before the
        generation starts; raising there refuses the request (a token budget's reservation)."""
        self.registry.resolve(request.model)  # an unknown model is a 404, not a queue slot
        if request.constraint is not None:  # a schema we can't enforce is a 400, not a slot
            await asyncio.get_running_loop().run_in_executor(
                self._tokenize, grammar.check, request.constraint)
        if self.breaker is not None:
            self.breaker.allow()
        slot_started = await self.admission.acquire() if self.admission else None
        try:
            loaded = await self.pool.acquire(request.model)
        except ModelLoadFailed:
            self._release(None, slot_started, None)
            if self.breaker is not None:
                self.breaker.record_failure()
            raise
        except BaseException:
            self._release(None, slot_started, None)
            raise
        try:
            return await self._start(request, loaded, slot_started, admit)
        except BaseException:
            self._release(loaded, slot_started, None)
            raise

    async def _start(self, request: GenerationRequest, loaded: LoadedModel,
                     slot_started: float | None,
                     admit: Callable[[int], Awaitable[None]] | None = None
                     ) -> GenerationStream:
        loop = asyncio.get_running_loop()
        tokens = await loop.run_in_executor(
            self._tokenize, prompt_tokens, loaded.tokenizer, request
        )
        max_tokens = self._max_tokens(request, len(tokens), loaded.context_length)
        bias = request.sampling.logit_bias
        vocabulary = len(loaded.tokenizer.vocab) if bias else 0
        if any(not 0 <= token < vocabulary for token, _ in bias):
            raise InvalidRequest(f"logit_bias: token ids must be below {vocabulary} for this "
                                 "model", param="logit_bias")
        processors = make_sequence_processors(request.sampling)
        if request.constraint is not None or request.logprobs is not None:
            # Compiling a grammar (or llguidance's view of the vocabulary, once per model)
            # takes milliseconds to a second: on the tokenizer thread, never the MLX one.
            compiler = await loop.run_in_executor(
                self._tokenize, grammar.compiler_for, loaded.tokenizer)
        if request.constraint is not None:
            processors.append(await loop.run_in_executor(
                self._tokenize, compiler.processor, request.constraint))
        if admit is not None:
            await admit(len(tokens) + max_tokens)
        seq = Sequence(
            request_id=request.request_id,
            prompt=tokens,
            max_tokens=max_tokens,
            sampler=make_sequence_sampler(request.sampling),
            processors=processors,
            logprobs=request.logprobs,
            token_bytes=compiler.token_bytes if request.logprobs is not None else None,
            stop=list(request.stop),
            deliver=lambda events: stream.deliver(events),
            loop=loop,
        )
        stream = GenerationStream(loaded.id, seq, self, loaded, slot_started)
        self._thread.add_sequence(loaded.id, seq)
        return stream

    def _max_tokens(self, request: GenerationRequest, prompt_len: int, context: int) -> int:
        room = context - prompt_len
        if room <= 0:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {context} tokens, but the prompt has "
                f"{prompt_len} tokens. Shorten the prompt or the conversation.",
                param="messages" if request.messages is not None else "prompt",
                prompt_tokens=prompt_len, maximum=context,
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

    def _release(self, loaded: LoadedModel | None, slot_started: float | None,
                 outcome: Finish | Failed | None) -> None:
        if loaded is not None:
            self.pool.release(loaded)
        if slot_started is not None and self.admission is not None:
            self.admission.release(slot_started)
        if self.breaker is not None and outcome is not None:
            if isinstance(outcome, Failed):
                self.breaker.record_failure()
            else:
                self.breaker.record_success()


def gateway_error(error: BaseException) -> GatewayError:
    """Anything raised below the API as a GatewayError (unexpected ones become a 500)."""
    if isinstance(error, GatewayError):
        return error
    return EngineFailure(f"internal error: {type(error).__name__}")

