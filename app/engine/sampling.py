"""Per-sequence samplers and logits processors from SamplingParams.

Greedy sequences share one sampler object so BatchGenerator samples them in one batched call.
A seeded sequence owns its PRNG key, so its draws don't depend on what else is in the batch.

Samplers take a row of logits, normalized or not: the decode step (`app.engine.decode`) skips
the normalization, so every sampler here must give the same draw for logits shifted by a
constant. Temperature scaling, top-p, min-p and top-k all do.

One sequence's sampling must never break the batch it shares a step with: values that depend
on the model (top_k, logit_bias token ids) are checked against its vocabulary before the
sequence starts (`check_sampling`), and every non-greedy sampler and processor is guarded
(`SequenceFault`): if it raises anyway, the sequence is marked failed and the step goes on
for the others with a harmless stand-in.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import Any

import mlx.core as mx
from mlx_lm.sample_utils import (
    apply_min_p,
    apply_top_k,
    apply_top_p,
    greedy_sampler,
    make_logits_processors,
)

from app.core.types import SamplingParams
from app.errors import InvalidRequest

Sampler = Callable[[mx.array], mx.array]
Processor = Callable[[mx.array, mx.array], mx.array]


def check_sampling(params: SamplingParams, vocab_size: int) -> None:
    """Refuse (400, naming the field) what only the model can tell is out of range."""
    if params.top_k > vocab_size:
        raise InvalidRequest(
            f"top_k must be at most the model's vocabulary size ({vocab_size}), "
            f"got {params.top_k}", param="top_k")
    for token, _ in params.logit_bias:
        if not 0 <= token < vocab_size:
            raise InvalidRequest(
                f"logit_bias: token id {token} is not in this model's vocabulary "
                f"(0..{vocab_size - 1})", param="logit_bias")


class SequenceFault:
    """The first exception one sequence's own sampling code raised, if any."""

    def __init__(self) -> None:
        self.error: Exception | None = None

    def caught(self, error: Exception) -> None:
        if self.error is None:
            self.error = error
        # mlx-lm's top-k/min-p filters are compiled with the global PRNG state as an input
        # and output; one that raises while tracing leaves that state a placeholder array,
        # and every later unseeded draw fails with "eval an array without a primitive"
        # (issue 13, item 2). A fresh seed repairs it; unseeded draws are random anyway.
        reseed_global_prng()

    def guard_sampler(self, sampler: Sampler) -> Sampler:
        def guarded(logits: mx.array) -> mx.array:
            if self.error is None:
                try:
                    return sampler(logits)
                except Exception as error:
                    self.caught(error)
            return greedy_sampler(logits)  # type: ignore[no-any-return]

        guarded.inner = sampler  # type: ignore[attr-defined]  # what speculation verifies with
        return guarded

    def guard_processor(self, processor: Processor) -> Processor:
        def guarded(tokens: mx.array, logits: mx.array) -> mx.array:
            if self.error is None:
                try:
                    return processor(tokens, logits)
                except Exception as error:
                    self.caught(error)
            return logits

        return guarded


def reseed_global_prng() -> None:
    mx.random.seed(secrets.randbits(63))
    # Evaluated now: a lazy key would belong to this thread's MLX stream.
    mx.eval(mx.random.state)


class TemperatureSampler:
    """Draws from softmax(filtered(logits) / temperature). Speculative decoding reads the same
    distribution (`filtered`, `inverse_temperature`) to verify drafts by rejection sampling, and
    its draws from the same `keys()`."""

    def __init__(self, params: SamplingParams) -> None:
        self.filters: list[Callable[[mx.array], mx.array]] = []
        if 0 < params.top_p < 1:
            self.filters.append(lambda lp: apply_top_p(lp, params.top_p))
        if params.min_p > 0:
            self.filters.append(lambda lp: apply_min_p(lp, params.min_p))
        if params.top_k > 0:
            # top_k at or above the vocabulary keeps every token: no filter (mlx-lm refuses it).
            self.filters.append(lambda lp: apply_top_k(lp, params.top_k)
                                if params.top_k < lp.shape[-1] else lp)
        self.inverse_temperature = 1.0 / params.temperature
        self._key: mx.array | None = (
            mx.random.key(params.seed) if params.seed is not None else None)

    def filtered(self, logits: mx.array) -> mx.array:
        for apply in self.filters:
            logits = apply(logits)
        return logits

    def keys(self, n: int) -> list[mx.array | None]:
        """`n` PRNG keys for this sequence's next draws (None: the global PRNG, unseeded)."""
        if self._key is None:
            return [None] * n
        parts = mx.random.split(self._key, n + 1)
        self._key = parts[0]
        return [parts[i + 1] for i in range(n)]

    def __call__(self, logits: mx.array) -> mx.array:
        (key,) = self.keys(1)
        return mx.random.categorical(self.filtered(logits) * self.inverse_temperature, key=key)


def make_sequence_sampler(params: SamplingParams) -> Sampler:
    if params.temperature <= 0:
        return greedy_sampler  # type: ignore[no-any-return]
    return TemperatureSampler(params)


def make_sequence_processors(params: SamplingParams) -> list[Any]:
    return list(
        make_logits_processors(
            logit_bias=dict(params.logit_bias) or None,
            repetition_penalty=params.repetition_penalty,
            presence_penalty=params.presence_penalty or None,
            frequency_penalty=params.frequency_penalty or None,
        )
    )
