"""The engine as the asyncio side sees it: submit a GenerationRequest, iterate its events.

Everything that can be refused (unknown model, prompt too long, failed load, a sampling
value the model cannot take) is raised by `submit` before a byte is streamed, so the API can
answer with a proper status code.

A generation's admission slot and model lease are given back when the engine finishes it,
not when the client has read the last event: a client that stops reading holds neither.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import structlog

from app import metrics
from app.core.types import (
    Failed,
    Finish,
    GenerationEvent,
    GenerationRequest,
    LogprobsDelta,
    ReasoningDelta,
    TextDelta,
    TokenLogprob,
    ToolCall,
    ToolCallDelta,
)
from app.engine.prompt import Prompt, packed_render, prompt_tokens, render
from app.engine.residency.pool import LoadedModel, ModelPool
from app.engine.sampling import check_sampling, make_sequence_processors, make_sequence_sampler
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
from app.output.detect import starts_in_reasoning
from app.output.harmony import HarmonyParser
from app.output.parser import OutputParser
from app.output.reasoning_budget import reasoning_budget, think_tracker
from app.settings import Settings

log = structlog.get_logger(__name__)


@dataclass
class Output:
    """A whole answer: content, reasoning and the calls (id, name, JSON arguments)."""

    text: str
    reasoning: str
    calls: list[ToolCall]
    finish: Finish


def output_parser(request: GenerationRequest, prompt: Prompt,
                  model: str) -> OutputParser | HarmonyParser | None:
    """The parser that turns this chat request's raw text into content, reasoning and calls,
    once, below every protocol. Raw completions get none."""
    output = prompt.output
    if output is None:
        return None
    parse_tools = bool(request.tools) and request.tool_choice != "none"
    if output.harmony:
        return HarmonyParser(parse_tools=parse_tools)
    schemas = {tool.name: tool.parameters for tool in request.tools}
    think = output.format.think if output.format is not None else ()
    return OutputParser(output.format, schemas=schemas, parse_tools=parse_tools,
                        start_in_reasoning=starts_in_reasoning(prompt.text, think), model=model)

Outcome = Finish | Failed | None  # how a generation ended; None: refused or cancelled


class _Hold:
    """What one generation holds while the engine works on it; given back once."""

    def __init__(self, owner: str | None, give_back: Callable[[_Hold, Outcome], None]) -> None:
        self.give_back = give_back
        self.owner = owner
        self.slot_started: float | None = None
        self.loaded: LoadedModel | None = None
        self.released = False

    def release(self, outcome: Outcome) -> None:
        if not self.released:
            self.released = True
            self.give_back(self, outcome)


class GenerationStream:
    """Events of one generation. Iterate it; `aclose()` cancels it (the client went away)."""

    def __init__(self, model: str, seq: Sequence, hold: _Hold, wake: Callable[[], None],
                 parser: OutputParser | HarmonyParser | None = None) -> None:
        self.model = model
        self.started_at = time.monotonic()
        self.first_token_at: float | None = None
        self._seq = seq
        self._hold = hold
        self._wake = wake  # tells the engine thread to look at the cancelled flag now
        self._inbox: asyncio.Queue[list[GenerationEvent]] = asyncio.Queue()
        self._ready: collections.deque[GenerationEvent] = collections.deque()
        self._finished = False
        self._parser = parser
        self.logprobs: list[TokenLogprob] = []  # every token's, for requests that asked
        self.packed_tokens = 0  # prompt tokens packing removed to fit the context (issue 19)

    @property
    def prompt_tokens(self) -> int:
        return len(self._seq.prompt)

    def deliver(self, events: list[GenerationEvent]) -> None:
        """On the event loop: a batch of events from the MLX thread."""
        if self._parser is not None:
            events = self._parse(events)
        self._inbox.put_nowait(events)
        for event in events:
            if isinstance(event, Finish | Failed):  # the engine is done with it
                self._hold.release(event)

    def _parse(self, events: list[GenerationEvent]) -> list[GenerationEvent]:
        """Raw text -> content / reasoning / tool-call events, the one place this happens."""
        parser = self._parser
        assert parser is not None
        out: list[GenerationEvent] = []
        for event in events:
            if isinstance(event, TextDelta):
                out += parser.feed(event.text)
            elif isinstance(event, Finish):
                out += parser.finish()
                if parser.calls and event.reason == "stop":
                    event = dataclasses.replace(event, reason="tool_calls")
                out.append(event)
            else:
                out.append(event)
        return out

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
        if isinstance(event, TextDelta | ReasoningDelta | ToolCallDelta) \
                and self.first_token_at is None:
            self.first_token_at = time.monotonic()
        if isinstance(event, LogprobsDelta):
            self.logprobs.extend(event.tokens)
        if isinstance(event, Finish | Failed):
            self._finish(event)

    async def collect(self) -> tuple[str, Finish]:
        """Run to the end; the whole text and the Finish. A Failed event is raised."""
        output = await self.collect_output()
        return output.text, output.finish

    async def collect_output(self) -> Output:
        """Run to the end; content, reasoning and calls merged. A Failed event is raised."""
        text: list[str] = []
        reasoning: list[str] = []
        calls: dict[int, list[str]] = {}
        async for event in self:
            if isinstance(event, TextDelta):
                text.append(event.text)
            elif isinstance(event, ReasoningDelta):
                reasoning.append(event.text)
            elif isinstance(event, ToolCallDelta):
                slot = calls.setdefault(event.index, ["", "", ""])
                slot[0] = slot[0] or event.id or ""
                slot[1] += event.name or ""
                slot[2] += event.arguments
            elif isinstance(event, Finish):
                return Output("".join(text), "".join(reasoning),
                              [ToolCall(i, n, a) for _, (i, n, a) in sorted(calls.items())],
                              event)
            elif isinstance(event, Failed):
                raise event.error
        raise RuntimeError("generation ended without a finish event")

    async def aclose(self) -> None:
        if not self._finished:
            if not self._hold.released:
                self._seq.cancelled.set()
                self._wake()
            self._finish(None)

    def _finish(self, event: Finish | Failed | None) -> None:
        if not self._finished:
            self._finished = True
            self._hold.release(event)


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
        if self._thread.dead is None:  # a dead thread unloads nothing; the process exits
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
        if self._thread.dead is not None:
            raise self._thread.dead_error()
        if request.constraint is not None:  # a schema we can't enforce is a 400, not a slot
            await asyncio.get_running_loop().run_in_executor(
                self._tokenize, grammar.check, request.constraint)
        if self.breaker is not None:
            # The one place the failure breaker is asked (it may make this request the
            # half-open trial); `_give_back` reports how it went.
            self.breaker.allow()
        hold = _Hold(request.owner, self._give_back)
        try:
            if self.admission is not None:
                hold.slot_started = await self.admission.acquire(request.owner,
                                                                 wait=request.queue_wait)
            # A model that fails to load is that model's problem (ModelLoadFailed names it
            # and the cause), not the engine failing: it does not count toward the breaker.
            hold.loaded = await self.pool.acquire(request.model)
            return await self._start(request, hold.loaded, hold, admit)
        except BaseException:
            hold.release(None)
            raise

    async def _start(self, request: GenerationRequest, loaded: LoadedModel, hold: _Hold,
                     admit: Callable[[int], Awaitable[None]] | None = None
                     ) -> GenerationStream:
        sampling = request.sampling.with_defaults(dict(loaded.spec.sampling))
        check_sampling(sampling, loaded.batch.vocab_size)
        loop = asyncio.get_running_loop()
        prompt = await loop.run_in_executor(self._tokenize, render, loaded.tokenizer, request)
        prompt, packed_tokens = await self._fit(request, loaded, prompt)
        tokens = prompt.ids
        max_tokens = self._max_tokens(request, len(tokens), loaded.context_length)
        processors = make_sequence_processors(sampling)
        if request.constraint is not None or request.logprobs is not None:
            # Compiling a grammar (or llguidance's view of the vocabulary, once per model)
            # takes milliseconds to a second: on the tokenizer thread, never the MLX one.
            compiler = await loop.run_in_executor(
                self._tokenize, grammar.compiler_for, loaded.tokenizer)
        if request.constraint is not None:
            processors.append(await loop.run_in_executor(
                self._tokenize, compiler.processor, request.constraint))
        if request.reasoning_budget is not None and prompt.output is not None:
            budget = reasoning_budget(loaded.tokenizer, prompt.output, prompt.text,
                                      request.reasoning_budget)
            if budget is not None:
                processors.append(budget)
        if admit is not None:
            await admit(len(tokens) + max_tokens)
        seq = Sequence(
            request_id=request.request_id,
            prompt=tokens,
            max_tokens=max_tokens,
            sampler=make_sequence_sampler(sampling),
            processors=processors,
            logprobs=request.logprobs,
            speculative=sampling.speculative,
            token_bytes=compiler.token_bytes if request.logprobs is not None else None,
            keep_leading_space=request.prompt is not None,
            stop=list(request.stop),
            owner=request.owner or "anonymous",  # prefix-cache namespace
            think=(think_tracker(loaded.tokenizer, prompt.output, prompt.text)
                   if prompt.output is not None else None),
            deliver=lambda events: stream.deliver(events),
            loop=loop,
        )
        stream = GenerationStream(loaded.id, seq, hold, self._thread.wake,
                                  output_parser(request, prompt, loaded.id))
        stream.packed_tokens = packed_tokens
        self._thread.add_sequence(loaded.id, seq)
        return stream

    def _reserve(self, request: GenerationRequest, loaded: LoadedModel) -> int:
        """Room packing keeps free for the answer: the configured reserve, or what the answer
        may use if that is less, and never more than a quarter of the context."""
        spec = loaded.spec
        configured = (spec.answer_reserve_tokens if spec.answer_reserve_tokens is not None
                      else self.settings.answer_reserve_tokens)
        wanted = (request.max_tokens if request.max_tokens is not None
                  else self.settings.default_max_tokens)
        return max(0, min(configured, wanted, loaded.context_length // 4))

    async def _fit(self, request: GenerationRequest, loaded: LoadedModel,
                   prompt: Prompt) -> tuple[Prompt, int]:
        """With overflow "pack", a prompt that leaves less than the answer's reserve is packed
        (and how many tokens that removed); with "error", or when packing cannot make it
        fit, the prompt as it is (`_max_tokens` refuses one that leaves no room at all)."""
        policy = request.overflow or loaded.spec.overflow or self.settings.overflow
        limit = loaded.context_length - self._reserve(request, loaded)
        if policy != "pack" or len(prompt.ids) <= limit or request.messages is None:
            return prompt, 0
        packed = await asyncio.get_running_loop().run_in_executor(
            self._tokenize, packed_render, loaded.tokenizer, request, limit)
        if packed is None:
            # The caller refuses it; say what was there (roles only, never content).
            log.info("prompt does not fit even packed", model=loaded.id,
                     prompt_tokens=len(prompt.ids), limit=limit, tools=len(request.tools),
                     roles="".join(m.role[0] for m in request.messages))
            return prompt, 0
        fitted, report = packed
        removed = len(prompt.ids) - len(fitted.ids)
        metrics.PACKED_REQUESTS.labels(loaded.id).inc()
        metrics.PACKED_TOKENS.labels(loaded.id).inc(removed)
        log.info("prompt packed", model=loaded.id, prompt_tokens=len(prompt.ids),
                 packed_tokens=removed, kept_tokens=len(fitted.ids), limit=limit,
                 dropped_messages=report.dropped_messages, cut_tool_outputs=report.cut_outputs,
                 cut_descriptions=report.cut_descriptions, cut_user_messages=report.cut_messages)
        return fitted, removed

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
        if request.max_tokens > room and not self.settings.strict_max_tokens:
            # Agents ask for 32k by habit: answer what fits, ending with finish_reason length.
            return room
        if request.max_tokens > room:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {context} tokens. The prompt has "
                f"{prompt_len} tokens and max_tokens asks for {request.max_tokens}, "
                f"{prompt_len + request.max_tokens} in all. Lower max_tokens to at most {room}.",
                param="max_tokens",
            )
        return request.max_tokens

    @property
    def dead(self) -> str | None:
        """Why the engine thread stopped serving (None while it serves)."""
        return self._thread.dead

    def _give_back(self, hold: _Hold, outcome: Outcome) -> None:
        if hold.loaded is not None:
            self.pool.release(hold.loaded)
        if hold.slot_started is not None and self.admission is not None:
            self.admission.release(hold.slot_started, hold.owner)
        if self.breaker is None:
            return
        if isinstance(outcome, Finish):
            self.breaker.record_success()
        elif isinstance(outcome, Failed) and counts_against_engine(outcome.error):
            self.breaker.record_failure()
        else:  # refused, cancelled, or the client's own fault: says nothing about the engine
            self.breaker.abandon()


def counts_against_engine(error: BaseException) -> bool:
    """Whether a failed generation means the engine is failing (what the breaker counts).
    A client's bad values (4xx) and a shutdown's goodbye do not."""
    if isinstance(error, Overloaded | ModelLoadFailed):
        return False
    return not (isinstance(error, GatewayError) and error.status < 500)


def gateway_error(error: BaseException) -> GatewayError:
    """Anything raised below the API as a GatewayError (unexpected ones become a 500)."""
    if isinstance(error, GatewayError):
        return error
    return EngineFailure(f"internal error: {type(error).__name__}")

