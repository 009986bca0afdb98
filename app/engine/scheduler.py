"""Continuous batching for one resident model, on the MLX thread.

mlx-lm's BatchGenerator does the batched arithmetic (chunked prefill, one decode step for every
running sequence); this module owns the scheduling around it: which sequences join, text-level
stop strings, cancellation between steps, and turning tokens into GenerationEvents.

Containment: one sequence's failure (its sampler, its detokenizer) fails that sequence alone;
a failed generator step fails the batch's sequences and starts a fresh generator, so the next
request does not inherit a half-updated one. Anything else raised from `step` is the engine
thread's to handle (`EngineThread`). `fault` is a test hook: called with the name of each
point where a fault can be injected ("add", "step", "advance", "cache_insert", "forget").
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from types import SimpleNamespace
from typing import Any, cast

import mlx.core as mx
import structlog
from mlx_lm.generate import BatchGenerator, GenerationBatch, StopSequences
from mlx_lm.sample_utils import greedy_sampler

from app import metrics
from app.core.types import (
    Failed,
    Finish,
    FinishReason,
    GenerationEvent,
    LogprobsDelta,
    TextDelta,
    TokenLogprob,
    Usage,
)
from app.engine.cpu.llama_step import LlamaDecodeStep, RiderSlot
from app.engine.decode import (
    LogitsGenerationBatch,
    PromptForward,
    prompt_forward,
    use_logits_decode,
)
from app.engine.decode_groups import DecodeGroups, weight_bytes
from app.engine.disk_cache import ModelDisk
from app.engine.draft_model import DraftModel
from app.engine.kv_growth import KVGrowth
from app.engine.prefill_budget import PrefillBudget, PrefillPlan
from app.engine.prefix_cache import PrefixCache
from app.engine.sampling import SequenceFault, reseed_global_prng
from app.engine.speculative import SpeculationPolicy, use_speculative_decode
from app.engine.stops import StopStringMatcher
from app.errors import EngineFailure, InvalidRequest
from app.output.reasoning_budget import ThinkTracker

log = structlog.get_logger(__name__)

EventSink = Callable[[list[GenerationEvent]], None]
FaultHook = Callable[[str], None]

# A prompt with at least this many new tokens is put in the prefix cache as soon as its prefill
# completes, and a request arriving meanwhile with the same prefix waits for that instead of
# computing it alongside; shorter ones only when they end (one copy of their KV fewer, and they
# are cheap to redo). At 256, the 10-client level's 227-token prompt was prefilled twice at
# once: ~1 s of a 10-stream step on a 2-core CPU, against a ~10 MB copy (TTFT p95 6.5-6.8 s
# -> 5.1-5.4 s, tokens/s within noise; ABAB probe 2026-12-01).
EARLY_INSERT_MIN_TOKENS = 128
# ... unless it may write at most this many tokens: its end comes first, with one copy fewer
# (a 4,000-token prompt's KV is 185 MB for the demo model, 130-250 ms to copy on a 2-core CPU).
ENDS_SOON_TOKENS = 16
# Prefill chunks of at most this many tokens a row go through the tuned multi-token step
# (`decode.PromptForward`); see bench/RESULTS.md for where it stops paying.
SMALL_CHUNK_MAX_TOKENS = 8
# Prefill chunks of at most this many tokens a row beside decoding rows are computed in the
# decode step's own forward (`_offer_chunk`).
RIDER_MAX_TOKENS = 64
# Decoding rows' KV gets its next block before it has less room than this: a verify step of
# speculative decoding usually writes max_draft + 1 (13) positions a row. A wider one (a lone
# row may carry more) grows inside the forward, as mlx-lm grows it.
DECODE_STEP_MOST_TOKENS = 16


@dataclass(eq=False)
class Sequence:
    """One generation as the MLX thread sees it."""

    request_id: str
    prompt: list[int]
    max_tokens: int
    sampler: Any
    processors: list[Any]
    stop: list[str]
    deliver: EventSink  # runs on `loop`: hands events to the request's stream
    loop: asyncio.AbstractEventLoop
    owner: str = "anonymous"  # whose prefix cache namespace this prompt reads and feeds
    logprobs: int | None = None  # None: not asked; N: the chosen token's and the top N
    token_bytes: Callable[[int], bytes] | None = None
    speculative: bool = True  # may verify prompt-lookup drafts (the engine's setting permitting)
    # Raw completions continue the prompt's text: " Paris" after "…France is" keeps its space,
    # which mlx-lm's detokenizers trim from an answer's first token (right for chat).
    keep_leading_space: bool = False
    cancelled: threading.Event = field(default_factory=threading.Event)
    uid: int = -1
    generated: int = 0
    cached_tokens: int = 0
    think: ThinkTracker | None = None  # counts the answer's reasoning tokens, for usage
    first_token_at: float | None = None
    fault: SequenceFault = field(default_factory=SequenceFault)
    _pending: list[GenerationEvent] = field(default_factory=list)
    _detokenizer: Any = None
    _stops: StopStringMatcher | None = None

    def text(self, piece: str) -> None:
        assert self._stops is not None
        out = self._stops.feed(piece)
        if out:
            self._pending.append(TextDelta(out))

    def finish(self, reason: FinishReason) -> None:
        usage = Usage(prompt_tokens=len(self.prompt), completion_tokens=self.generated,
                      cached_tokens=self.cached_tokens,
                      reasoning_tokens=self.think.spent if self.think is not None else 0)
        matched = self._stops.matched if self._stops is not None else None
        self._pending.append(Finish(reason=reason, usage=usage, stop_sequence=matched))

    def logprob(self, token: int, logprobs: Any) -> None:
        """The chosen token's log-probability (and the top N) from its row's log-softmax."""
        assert self.token_bytes is not None and self.logprobs is not None
        if logprobs is None or logprobs.size == 0:
            return
        top: tuple[tuple[str, float, tuple[int, ...]], ...] = ()
        chosen = logprobs[token]
        if self.logprobs > 0:
            n = min(self.logprobs, logprobs.shape[-1])
            ids = mx.argpartition(-logprobs, kth=n - 1)[:n]
            values = logprobs[ids]
            mx.eval(chosen, ids, values)
            pairs: list[tuple[int, float]] = sorted(
                zip(ids.tolist(), values.tolist(), strict=True),  # type: ignore[arg-type]
                key=lambda pair: -pair[1])
            top = tuple(_entry(self.token_bytes(t), v) for t, v in pairs)
        text, value, raw = _entry(self.token_bytes(token), float(chosen.item()))
        self._pending.append(LogprobsDelta((TokenLogprob(text, value, raw, top),)))

    def take_events(self) -> list[GenerationEvent]:
        events, self._pending = self._pending, []
        return events

    def flush_events(self) -> None:
        if self._pending:
            self.loop.call_soon_threadsafe(self.deliver, self.take_events())

    def fail(self, error: Exception) -> None:
        """End this sequence with an error event (sent at once)."""
        self._pending.append(Failed(error))
        self.flush_events()


def _tokens_left(segments: list[list[int]]) -> int:
    """Prompt tokens a row of mlx-lm's prefill queue still has to prefill."""
    return sum(len(segment) for segment in segments)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


def _entry(raw: bytes, value: float) -> tuple[str, float, tuple[int, ...]]:
    # A token that ends inside a UTF-8 character has no text of its own; `bytes` has it all.
    return raw.decode("utf-8", errors="replace"), value, tuple(raw)


def _deliver_all(batches: list[tuple[EventSink, list[GenerationEvent]]]) -> None:
    for deliver, events in batches:
        deliver(events)


class ModelBatch:
    """The running batch of one model. Every method runs on the MLX thread."""

    def __init__(
        self, model: Any, tokenizer: Any, *, max_batch_size: int, prefill_chunk: int,
        prompt_cache_bytes: int, stream: Any, model_id: str = "model",
        prefill_budget: float = 0.0,
        long_prompt_tokens: int = 1024,
        disk: ModelDisk | None = None,
        speculation: SpeculationPolicy | None = None,
        draft_model: DraftModel | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        # Every sequence leaves the KV it computed here, however it ends; a later prompt of the
        # same owner that starts the same way prefills only what is new. Long prefixes also
        # go to `disk`, which outlives this batch and the process.
        self._prefix = PrefixCache(prompt_cache_bytes, model_id=model_id, disk=disk)
        self._eos = set(tokenizer.eos_token_ids)
        self._model = model
        self._generator_options: dict[str, Any] = dict(
            completion_batch_size=max_batch_size,
            prefill_batch_size=max_batch_size,  # set per step by _plan_prefill
            prefill_step_size=prefill_chunk,
            stream=stream,
        )
        self._logprob_uids: set[int] = set()  # sequences that asked for logprobs
        self._spec_uids: set[int] = set()  # sequences that may speculate
        self._speculation = speculation  # None: speculative decoding off for this model
        self.draft_model = draft_model  # drafts instead of prompt lookup (held while resident)
        # Running streams keep getting tokens while a long prompt prefills (prefill_budget.py).
        self.prefill = PrefillBudget(max_chunk=prefill_chunk, decode_steps=prefill_budget,
                                     long_prompt_tokens=long_prompt_tokens)
        self._prefill_rows = max_batch_size  # a burst of arrivals prefills together
        self._forward_bytes = weight_bytes(model)
        # A prefill chunk beside decoding rows is computed in their forward (`_offer_chunk`).
        self._riders = RiderSlot()
        # KV arrays grown a few layers a step before they fill (kv_growth.py): decoding rows',
        # and the prompt batch's while its chunks ride decode forwards.
        self._decode_growth, self._prompt_growth = KVGrowth(), KVGrowth()
        self._generator = self._new_generator()
        if isinstance(self._generator._prompt_batch.model, PromptForward) and RIDER_MAX_TOKENS:
            self.prefill.max_decoding_chunk = RIDER_MAX_TOKENS  # what a decode forward carries
        self.vocab_size = _vocab_size(model, tokenizer)
        self._by_uid: dict[int, Sequence] = {}
        self._prefilling: set[int] = set()  # uids prefilling >= EARLY_INSERT_MIN_TOKENS
        self._parked: list[tuple[Sequence, int]] = []  # (sequence, the uid it waits for)
        self.fault: FaultHook | None = None

    def _new_generator(self) -> BatchGenerator:
        generator = BatchGenerator(
            self._model, stop_tokens=[[t] for t in sorted(self._eos)], **self._generator_options
        )
        self._logprob_uids.clear()  # a new generator holds no sequence yet
        self._spec_uids.clear()
        running = generator._generation_batch
        if len(running):
            raise RuntimeError("a new generator holds no sequence yet")
        # A long prompt decodes in a group of its own instead of padding every short row's KV
        # out to its length (decode_groups.py).
        generator._generation_batch = DecodeGroups(
            partial(self._decode_group, running.fallback_sampler), self._forward_bytes)
        # Small prefill chunks through the tuned multi-token step (every later prompt batch is
        # this one, extended and split).
        generator._prompt_batch.model = prompt_forward(self._model, SMALL_CHUNK_MAX_TOKENS,
                                                       self._riders)
        return generator

    def _decode_group(self, fallback_sampler: Any) -> LogitsGenerationBatch:
        """An empty batch of the decode class this model uses: speculative or plain. Made by
        the same functions that set up a generator's one batch, on a stand-in that holds
        only that batch, so a group is set up exactly as that batch would be."""
        holder = SimpleNamespace(
            _generation_batch=GenerationBatch.empty(self._model, fallback_sampler))
        generator = cast(BatchGenerator, holder)
        group: LogitsGenerationBatch
        if self._speculation is not None:
            group = use_speculative_decode(generator, self._logprob_uids, self._spec_uids,
                                           self._speculation, self.draft_model)
        else:
            group = use_logits_decode(generator, self._logprob_uids)
        if isinstance(group.forward, LlamaDecodeStep):
            group.forward.riders = self._riders  # computes prefill chunks it is offered
        return group

    def _inject(self, point: str) -> None:
        if self.fault is not None:
            self.fault(point)

    def __len__(self) -> int:
        return len(self._by_uid) + len(self._parked)

    def add(self, seq: Sequence) -> None:
        """Start `seq`; an exception leaves the batch as it was (the caller fails `seq`)."""
        self._inject("add")
        seq._detokenizer = self.tokenizer.detokenizer
        if seq.keep_leading_space:
            _keep_leading_space(seq._detokenizer)
        seq._stops = StopStringMatcher(seq.stop)
        self._drop_cancelled()  # a turn the client just stopped: its KV goes in before lookup
        if not self._wait_for_shared_prefill(seq):
            self._start(seq)

    def _wait_for_shared_prefill(self, seq: Sequence) -> bool:
        """Park `seq` while a sequence of the same owner prefills a long prefix of its prompt
        (two requests with one long system prompt, close together): it starts from that KV
        once computed, instead of computing it a second time alongside."""
        if not self._prefix.enabled:
            return False
        for uid in self._prefilling:
            other = self._by_uid[uid]
            if other.owner != seq.owner:
                continue
            shared = _common_prefix(other.prompt, seq.prompt)
            if shared - other.cached_tokens >= EARLY_INSERT_MIN_TOKENS:
                self._parked.append((seq, uid))
                return True
        return False

    def _unpark(self) -> None:
        ready = [seq for seq, uid in self._parked if uid not in self._prefilling]
        if ready:
            self._parked = [(seq, uid) for seq, uid in self._parked if uid in self._prefilling]
            for seq in ready:
                self._start(seq)

    def _start(self, seq: Sequence) -> None:
        stop_tokens = StopSequences([[t] for t in sorted(self._eos)])
        found = self._prefix.lookup(seq.owner, seq.prompt)
        seq.cached_tokens = found.cached_tokens
        (seq.uid,) = self._generator.insert(
            [found.rest],
            caches=[found.cache] if found.cache is not None else None,
            all_tokens=[seq.prompt[: seq.cached_tokens]],
            max_tokens=[seq.max_tokens],
            samplers=[_guarded_sampler(seq)],
            # Grammar masks (`row_mask`) are applied batched by the decode step and guard
            # themselves; wrapping them would hide them from it.
            logits_processors=[[p if hasattr(p, "row_mask") else seq.fault.guard_processor(p)
                                for p in seq.processors]],
            stop_sequences=[stop_tokens],
        )
        self._by_uid[seq.uid] = seq
        if len(found.rest) >= EARLY_INSERT_MIN_TOKENS and self._prefix.enabled:
            self._prefilling.add(seq.uid)
        if seq.logprobs is not None:
            self._logprob_uids.add(seq.uid)
        if seq.speculative:
            self._spec_uids.add(seq.uid)

    @property
    def prompt_cache_bytes(self) -> int:
        """Bytes the prefix cache holds (its own arrays: what is counted is what is held)."""
        return self._prefix.nbytes

    def _save(self, uids: list[int], reason: str, *, decode_only: bool = False,
              background: bool = False) -> None:
        """Put what `uids` have computed so far into the prefix cache (they are ending, or a
        long prompt just finished prefilling). `decode_only` after a failed step: a prefill
        chunk that broke may have left some layers written and others not, while a decoding
        row's KV is sound up to the tokens it records."""
        if not self._prefix.enabled:
            return
        generator = self._generator
        for uid, (stage, idx) in generator._find_uids(uids).items():
            seq = self._by_uid.get(uid)
            if seq is None or stage == 0 or (decode_only and stage == 1):
                continue  # stage 0: not started, its cache came from the prefix cache
            batch = generator._generation_batch if stage == 2 else generator._prompt_batch
            self._keep(seq, list(batch.tokens[idx]), partial(batch.extract_cache, idx), reason,
                       background=background)

    def _keep(self, seq: Sequence, tokens: list[int], layers: Callable[[], list[Any]],
              reason: str, *, background: bool = False) -> None:
        """Insert `seq`'s KV for `tokens`. The cache only saves work later: a failure here is
        logged and costs that entry, never the sequence or the batch."""
        if not self._prefix.enabled or len(tokens) <= seq.cached_tokens:
            return  # nothing was computed beyond what came from the cache
        try:
            self._inject("cache_insert")
            self._prefix.insert(seq.owner, tokens, layers(), reason, background=background)
        except Exception:
            log.exception("prefix cache insert failed", request_id=seq.request_id)

    def step(self) -> None:
        """Drop cancelled sequences, then advance every other one by a prefill chunk or a token."""
        self._drop_cancelled()
        self._unpark()
        if not self._by_uid:
            return
        decoding, plan = self._plan_prefill()
        riding = decoding and self._offer_chunk()
        if not riding:
            self._prompt_growth.forget()  # its copies were for chunks riding decode forwards
        if decoding:
            self._decode_growth.prepare(self._generator._generation_batch.prompt_cache,
                                        DECODE_STEP_MOST_TOKENS)
        prompt_tokens = self._generator._counters.prompt_tokens
        started = time.perf_counter()
        try:
            self._inject("step")
            prompt_responses, responses = self._generator.next()
            unclaimed = self._riders.rider  # the prompt batch's call empties the slot
            if unclaimed is not None and unclaimed.taken:
                raise RuntimeError("a prefill chunk computed with the decode step was not the "
                                   "prompt batch's next one")
        except Exception as error:  # a broken step fails its sequences, not the server
            self._fail_all(error)
            return
        finally:
            self._riders.rider = None  # an offer is for this step only
        elapsed = time.perf_counter() - started
        self.prefill.observe(seconds=elapsed, decoded=decoding, chunk=plan.chunk,
                             budgeted=plan.budgeted,
                             prompt_tokens=self._generator._counters.prompt_tokens - prompt_tokens)
        metrics.ENGINE_STEP.observe(elapsed)
        metrics.STEP_SEQUENCES.observe(len(self._by_uid))
        done: list[int] = []
        ended: set[int] = set()  # finished this step: later tokens of theirs are not theirs
        keeps: list[Callable[[], None]] = []  # their KV into the prefix cache
        now = time.monotonic()
        for response in responses:  # a speculating sequence may get several tokens in a step
            seq = self._by_uid.get(response.uid)
            if seq is None or seq.fault.error is not None or seq.uid in ended:
                continue
            try:
                self._inject("advance")
                if seq.logprobs is not None and response.token not in self._eos:
                    seq.logprob(response.token, response.logprobs)
                finished = self._advance(seq, response.token, response.finish_reason, now)
            except Exception as error:  # this sequence's text broke: fail it alone
                log.exception("sequence failed", request_id=seq.request_id)
                metrics.ENGINE_FAILURES.inc()
                seq.fail(EngineFailure(f"generation failed in the engine: {error!r}"))
                done.append(seq.uid)
                ended.add(seq.uid)
                continue
            if finished:
                done.append(seq.uid)
                ended.add(seq.uid)
                if response.finish_reason is not None and response.prompt_cache is not None:
                    keeps.append(partial(self._keep, seq, list(response.all_tokens or []),
                                         partial(list, response.prompt_cache), "finished",
                                         background=True))
                else:  # a stop string ended it while mlx-lm still runs it
                    keeps.append(partial(self._save, [seq.uid], "finished", background=True))
        done.extend(self._fail_faulted())
        # One hop to the event loop per step for every sequence: each hop wakes the loop,
        # and the loop shares the GIL with this thread.
        ready = [(seq.deliver, seq.take_events()) for seq in self._by_uid.values()
                 if seq._pending]
        if ready:
            next(iter(self._by_uid.values())).loop.call_soon_threadsafe(_deliver_all, ready)
        # The last step's copies went beside this step's forward: to the disk tier now that
        # the tokens are out (handing them over waits for any copy not done yet).
        self._prefix.flush()
        # Into the prefix cache once the tokens are out, copied beside the next step: the
        # streams need not wait for the copies (a 4,000-token prompt's KV: 130-250 ms here).
        for keep in keeps:
            keep()
        self._save_prefilled(prompt_responses)
        if done:
            self._forget(done)
        if not self._by_uid:
            self._prefix.flush()  # no next step to wait for

    def _plan_prefill(self) -> tuple[bool, PrefillPlan]:
        """Set this step's prefill chunk and the prompts that join it (prefill_budget.py);
        (whether rows decode, the plan)."""
        generator = self._generator
        decoding = len(generator._generation_batch) > 0
        room = generator.completion_batch_size - len(generator._generation_batch)
        plan = self.prefill.plan(
            decoding=decoding,
            # mlx-lm's row: [segments left, tokens done, new tokens in all]
            prefilling=[(_tokens_left(row[0]), row[2]) for row in
                        generator._currently_processing],
            waiting=[_tokens_left(queued[1]) for queued in
                     itertools.islice(generator._unprocessed_sequences, max(room, 0))],
            max_rows=self._prefill_rows)
        generator.prefill_step_size = plan.chunk
        generator.prefill_batch_size = max(plan.rows, 1)
        # A prompt batch made at a small chunk keeps that size for its inner loop: a later
        # full-size chunk would run as many small model calls.
        generator._prompt_batch.prefill_step_size = self.prefill.max_chunk
        return decoding, plan

    def _offer_chunk(self) -> bool:
        """Offer this step's prefill chunk to the decode forward (`PromptForward.offer`) when
        it is certain what mlx-lm's step will prefill: the rows already prefilling, none
        joining or moving on to decode, every row's chunk the same length. Whether it did."""
        generator = self._generator
        forward = generator._prompt_batch.model
        rows = generator._currently_processing
        if (not isinstance(forward, PromptForward) or not rows
                or len(generator._prompt_batch) != len(rows)
                or len(generator._generation_batch) >= generator.completion_batch_size
                or (generator._unprocessed_sequences
                    and generator.prefill_batch_size > len(rows))):
            return False
        chunks = []
        for segments, _, _ in rows:
            if len(segments) == 1 and len(segments[0]) == 1:
                return False  # its last token: it moves on to decoding this step
            chunks.append(segments[0][:generator.prefill_step_size])
        if len({len(chunk) for chunk in chunks}) == 1 and len(chunks[0]) <= RIDER_MAX_TOKENS:
            forward.offer(chunks, generator._prompt_batch.prompt_cache)
            self._prompt_growth.prepare(generator._prompt_batch.prompt_cache, len(chunks[0]),
                                        per_step=len(chunks[0]))
            return True
        return False

    def _save_prefilled(self, prompt_responses: list[Any]) -> None:
        # A sequence that ends within a few tokens is inserted then (one copy of its KV, not
        # two); sequences parked on it wait for that.
        long = [r.uid for r in prompt_responses if r.end_of_prompt and r.uid in self._prefilling
                and self._by_uid[r.uid].max_tokens > ENDS_SOON_TOKENS]
        if long:
            self._save(long, "prefilled", background=True)
            self._prefilling.difference_update(long)
            self._unpark()

    def _advance(self, seq: Sequence, token: int, finish_reason: str | None, now: float) -> bool:
        """Feed one sampled token to its sequence; True when the sequence is finished."""
        if seq.first_token_at is None:
            seq.first_token_at = now
        is_eos = token in self._eos
        if not is_eos:
            seq.generated += 1
            if seq.think is not None:
                seq.think.feed(token)
            seq._detokenizer.add_token(token)
            seq.text(seq._detokenizer.last_segment)
        assert seq._stops is not None
        if seq._stops.stopped:
            seq.finish("stop")
            return True
        if finish_reason is None:
            return False
        seq._detokenizer.finalize()
        seq.text(seq._detokenizer.last_segment)
        tail = seq._stops.flush()
        if tail:
            seq._pending.append(TextDelta(tail))
        seq.finish("length" if finish_reason == "length" and not is_eos else "stop")
        return True

    def _drop_cancelled(self) -> None:
        for seq, _ in self._parked:
            if seq.cancelled.is_set():
                metrics.CANCELLED.inc()
                seq.finish("cancelled")
                seq.flush_events()
        self._parked = [(seq, uid) for seq, uid in self._parked if not seq.cancelled.is_set()]
        gone = [uid for uid, seq in self._by_uid.items() if seq.cancelled.is_set()]
        for uid in gone:
            seq = self._by_uid[uid]
            metrics.CANCELLED.inc()
            log.info("sequence cancelled", request_id=seq.request_id, generated=seq.generated)
            seq.finish("cancelled")
            seq.flush_events()
        if gone:
            self._save(gone, "cancelled")
            self._forget(gone)

    def _fail_faulted(self) -> list[int]:
        """Fail the sequences whose own sampling or text broke this step; their uids."""
        faulted = [seq for seq in self._by_uid.values() if seq.fault.error is not None]
        for seq in faulted:
            log.warning("sequence failed", request_id=seq.request_id,
                        error=repr(seq.fault.error))
            seq.fail(InvalidRequest(
                f"generation failed for this request's parameters: {seq.fault.error}"))
        return [seq.uid for seq in faulted]

    def _forget(self, uids: list[int]) -> None:
        for uid in uids:
            self._by_uid.pop(uid, None)
            self._prefilling.discard(uid)
            self._logprob_uids.discard(uid)
            self._spec_uids.discard(uid)
        self._inject("forget")
        self._generator.remove(uids)

    def _fail_all(self, error: Exception) -> None:
        log.error("decode step failed", error=repr(error), sequences=len(self._by_uid))
        metrics.ENGINE_FAILURES.inc(len(self._by_uid))
        self._save(list(self._by_uid), "failed", decode_only=True)
        self.reset(EngineFailure(f"generation failed in the engine: {error}"))

    def reset(self, failure: Exception) -> None:
        """Fail every sequence and start over with a fresh generator: after a failure its
        state (half-split prompt batches, caches advanced for a step that never finished)
        cannot be trusted by the next request. Parked sequences were not part of it: they
        start on the fresh generator at the next step."""
        for seq in self._by_uid.values():
            seq.fail(failure)
        self._by_uid.clear()
        self._prefilling.clear()
        old, self._generator = self._generator, self._new_generator()
        try:
            old.close()
        except Exception:
            log.exception("closing the failed generator")
        reseed_global_prng()

    def abandon(self, failure: Exception) -> None:
        """Fail every sequence without touching the generator (the engine is dead)."""
        parked, self._parked = [seq for seq, _ in self._parked], []
        for seq in [*self._by_uid.values(), *parked]:
            seq.fail(failure)
        self._by_uid.clear()
        self._prefilling.clear()

    def cancel_all(self, failure: Exception, *, save: bool = True) -> None:
        """End every sequence with `failure`: the model is unloaded or the server stops.
        What they computed stays in the prefix cache (`save`) for when the client retries."""
        if save:
            self._save(list(self._by_uid), "failed")
        parked, self._parked = [seq for seq, _ in self._parked], []
        for seq in [*self._by_uid.values(), *parked]:
            seq.fail(failure)
        self._forget(list(self._by_uid))

    def close(self) -> None:
        self._prefix.clear()
        self._generator.close()
        self.draft_model = None  # its weights go with the model they draft for
        mx.clear_cache()


def _keep_leading_space(detokenizer: Any) -> None:
    """Turn off the first-token space trim of mlx-lm's SPM and BPE streaming detokenizers."""
    if hasattr(detokenizer, "trim_space"):  # SPM has a switch for it
        detokenizer.trim_space = False
    elif hasattr(detokenizer, "_maybe_trim_space"):  # BPE trims in a method of its own
        detokenizer._maybe_trim_space = lambda text: text


def _guarded_sampler(seq: Sequence) -> Any:
    # Greedy sequences keep the one shared sampler (one batched call for all of them); it
    # has no parameters that could fail.
    if seq.sampler is greedy_sampler:
        return seq.sampler
    return seq.fault.guard_sampler(seq.sampler)


def _vocab_size(model: Any, tokenizer: Any) -> int:
    """Rows of the model's logits: what top_k and logit_bias token ids are checked against."""
    args = getattr(model, "args", None)
    size = getattr(args, "vocab_size", None)
    if isinstance(size, int) and size > 0:
        return size
    return len(tokenizer._tokenizer) if hasattr(tokenizer, "_tokenizer") else 0
