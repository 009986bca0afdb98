"""The decode step: one token for every running sequence of a batch.

mlx-lm's GenerationBatch turns each row of logits into log-probabilities (a logsumexp over the
whole vocabulary) before sampling. Only requests that ask for logprobs read them, and every
sampler in `app.engine.sampling` gives the same draw for logits shifted by a constant, so this
step samples from the logits directly and normalizes only the rows of sequences that asked
(`logprob_uids`), from the model's raw logits (before penalties and grammar masks). On MLX's
CPU backend that saves a scalar `exp` per vocabulary entry per sequence: about 1.2 ms per
sequence per step for a 49k vocabulary.

Everything else (extending, filtering, stop tokens, the KV cache) is mlx-lm's GenerationBatch.
The forward itself is the model's own call, or `cpu_decode.LlamaDecodeStep` for a llama model
tuned for the CPU (the same arithmetic from fewer graph nodes).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.generate import BatchGenerator, GenerationBatch

from app.engine.cpu.llama_step import LlamaDecodeStep, Rider, RiderSlot, tuned_step_reads

# (tokens (batch,), per-layer caches) -> logits (batch, vocabulary) for one new token each.
DecodeForward = Callable[[mx.array, list[Any]], mx.array]

# (tokens (batch, L), per-layer caches) -> logits (batch, L, vocabulary): L new tokens a row,
# as speculative decoding verifies drafts.
MultiTokenForward = Callable[[mx.array, list[Any]], mx.array]

# Stands in for a row's log-probabilities in mlx-lm's responses; nothing reads it.
NO_LOGPROBS = mx.array([], dtype=mx.float32)


def decode_forward(model: nn.Module) -> DecodeForward:
    """The fastest forward for `model`'s decode steps."""
    if LlamaDecodeStep.supports(model):
        return LlamaDecodeStep(model)
    return lambda tokens, caches: model(tokens[:, None], cache=caches)[:, -1, :]


def multi_token_forward(forward: DecodeForward, model: nn.Module) -> MultiTokenForward:
    """The forward for several new tokens a row that goes with the decode step `forward`:
    the tuned llama step's own when it is one (on the CPU mlx-lm's forward costs about twice
    as much), else the model's call."""
    if isinstance(forward, LlamaDecodeStep):
        return forward.many
    return lambda tokens, caches: model(tokens, cache=caches)


class LogitsGenerationBatch(GenerationBatch):  # type: ignore[misc]
    forward: DecodeForward
    logprob_uids: set[int]  # sequences that asked for log-probabilities

    def _step(self) -> tuple[list[int], list[Any]]:
        inputs: mx.array = self._next_tokens  # type: ignore[has-type]
        self._current_tokens = inputs
        self._current_logprobs = self._next_logprobs  # type: ignore[has-type]
        logits = self.forward(inputs, self.prompt_cache)
        sampled, logprobs, contexts, tokens = self._choose(logits, inputs, None)

        # Start the next step's arithmetic before reading this step's tokens back.
        self._next_tokens = sampled
        self._next_logprobs = logprobs
        mx.async_eval(sampled, contexts, logprobs)  # type: ignore[no-untyped-call]

        if tokens is None:
            tokens = inputs.tolist()  # type: ignore[assignment]
            assert tokens is not None
        for history, token in zip(self.tokens, tokens, strict=True):
            history.append(token)
        return tokens, self._current_logprobs

    def _choose(
        self, logits: mx.array, inputs: mx.array, tokens: list[int] | None,
        samplers: list[Any] | None = None,
    ) -> tuple[mx.array, list[Any], list[Any], list[int] | None]:
        """Next tokens from each row's logits (batch, vocabulary) given the token each row fed
        (`inputs`; `tokens` when already known on the host): log-probabilities for the rows
        that asked, grammar masks, logits processors, samplers (`samplers` overrides the rows'
        own). Returns (sampled, logprobs, processor contexts, tokens if it had to read them)."""
        logprobs = [NO_LOGPROBS] * len(self.uids)
        if self.logprob_uids:
            for i, uid in enumerate(self.uids):
                if uid in self.logprob_uids:
                    row = logits[i]
                    logprobs[i] = row - mx.logsumexp(row)

        masks = [(i, p) for i, processors in enumerate(self.logits_processors)
                 for p in processors if hasattr(p, "row_mask")]
        if masks:
            # Grammar masks need the token sampled last step (a sync). Start this step's forward
            # first, then build every constrained row's mask and apply them in one op.
            if tokens is None:
                mx.async_eval(logits)  # type: ignore[no-untyped-call]
                tokens = inputs.tolist()  # type: ignore[assignment]
            assert tokens is not None
            vocab = logits.shape[-1]
            allowed: np.ndarray[Any, Any] | None = None
            for i, processor in masks:
                row = processor.row_mask(tokens[i], vocab)
                if row is not None:
                    if allowed is None:
                        allowed = np.ones((len(self.uids), vocab), dtype=np.bool_)
                    allowed[i] = row
            if allowed is not None:
                logits = mx.where(mx.array(allowed), logits,
                                  mx.array(-mx.inf, dtype=logits.dtype))

        contexts = []
        if any(p for processors in self.logits_processors for p in processors
               if not hasattr(p, "row_mask")):
            rows = []
            for i, processors in enumerate(self.logits_processors):
                row = logits[i : i + 1]
                others = [p for p in processors if not hasattr(p, "row_mask")]
                if others:
                    context = self._token_context[i].update_and_fetch(inputs[i : i + 1])
                    contexts.append(context)
                    for processor in others:
                        row = processor(context, row)
                rows.append(row)
            logits = mx.concatenate(rows, axis=0)

        if samplers is None:
            samplers = [s or self.fallback_sampler for s in self.samplers]
        samplers = samplers or [self.fallback_sampler]
        if all(s is samplers[0] for s in samplers):
            sampled = samplers[0](logits)  # greedy sequences share one sampler: one call
        else:
            sampled = mx.concatenate([s(logits[i : i + 1]) for i, s in enumerate(samplers)])
        return sampled, logprobs, contexts, tokens


class PromptForward:
    """The model as mlx-lm's prompt batch calls it, `model(tokens, cache=...)`: a chunk of a
    few tokens a row (what the prefill budget gives a long prompt beside decoding streams)
    goes through the tuned multi-token step, which costs less than the model's own call for
    so few tokens on the CPU (bench/RESULTS.md); anything else through the model itself."""

    def __init__(self, model: nn.Module, step: LlamaDecodeStep, max_tokens: int,
                 riders: RiderSlot) -> None:
        self.model = model
        self.step = step
        self.max_tokens = max_tokens
        self.riders = riders  # shared with the model's decode steps (`offer`)

    def offer(self, tokens: list[list[int]], caches: list[Any]) -> None:
        """Let the next decode forward of this model compute the prompt batch's next chunk
        (`tokens`, equal lengths) along with its own rows: one pass over the weights for both.
        The prompt batch's own call then finds it done; if no decode forward took it, that call
        computes it as usual."""
        if tuned_step_reads(caches):
            self.riders.rider = Rider(mx.array(tokens), caches)

    def __call__(self, tokens: mx.array, cache: list[Any] | None = None,
                 **options: Any) -> mx.array:
        rider, self.riders.rider = self.riders.rider, None
        if rider is not None and rider.taken and cache is rider.caches and not options:
            if tokens.shape != rider.tokens.shape or not mx.array_equal(tokens, rider.tokens):
                raise RuntimeError("a prefill chunk was computed for other tokens than its own")
            return rider.tokens  # its KV is in the caches; mlx-lm reads nothing back
        if options or cache is None or tokens.ndim != 2 or tokens.shape[1] > self.max_tokens:
            return self.model(tokens, cache=cache, **options)  # type: ignore[no-any-return]
        return self.step.many(tokens, cache)

    def __getattr__(self, name: str) -> Any:  # layers, make_cache, ...: the model's
        return getattr(self.model, name)


def prompt_forward(model: nn.Module, max_tokens: int, riders: RiderSlot | None = None
                   ) -> nn.Module | PromptForward:
    """What a prompt batch should call for `model`: `PromptForward` where the tuned step
    applies, else the model. `riders`: the slot the model's decode steps take chunks from."""
    if max_tokens > 1 and LlamaDecodeStep.supports(model):
        return PromptForward(model, LlamaDecodeStep(model), max_tokens, riders or RiderSlot())
    return model


def use_logits_decode(
    generator: BatchGenerator, logprob_uids: set[int] | None = None,
    batch_class: type[LogitsGenerationBatch] = LogitsGenerationBatch,
) -> LogitsGenerationBatch:
    """Make `generator` decode with LogitsGenerationBatch.

    BatchGenerator keeps one running GenerationBatch and extends it with each group of sequences
    that finishes prefill, so replacing the empty one it starts with is enough. (The first token
    of each joining group is still sampled by mlx-lm's own step, from log-probabilities.)
    """
    running = generator._generation_batch
    if len(running):
        raise RuntimeError("use_logits_decode must be called before any sequence is inserted")
    batch = empty_decode_batch(running.model, running.fallback_sampler, logprob_uids,
                               batch_class)
    generator._generation_batch = batch
    return batch


def empty_decode_batch(
    model: nn.Module, fallback_sampler: Any, logprob_uids: set[int] | None = None,
    batch_class: type[LogitsGenerationBatch] = LogitsGenerationBatch,
) -> LogitsGenerationBatch:
    """An empty generation batch of `batch_class`, ready to be extended with sequences."""
    batch: LogitsGenerationBatch = batch_class.empty(model, fallback_sampler)
    batch.forward = decode_forward(model)
    batch.logprob_uids = set() if logprob_uids is None else logprob_uids
    return batch
