"""Per-sequence samplers and logits processors from SamplingParams.

Greedy sequences share one sampler object so BatchGenerator samples them in one batched call.
A seeded sequence owns its PRNG key, so its draws don't depend on what else is in the batch.

Samplers take a row of logits, normalized or not: the decode step (`app.engine.decode`) skips
the normalization, so every sampler here must give the same draw for logits shifted by a
constant. Temperature scaling, top-p, min-p and top-k all do.
"""

from __future__ import annotations

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

Sampler = Callable[[mx.array], mx.array]


def make_sequence_sampler(params: SamplingParams) -> Sampler:
    if params.temperature <= 0:
        return greedy_sampler  # type: ignore[no-any-return]
    filters: list[Callable[[mx.array], mx.array]] = []
    if 0 < params.top_p < 1:
        filters.append(lambda lp: apply_top_p(lp, params.top_p))
    if params.min_p > 0:
        filters.append(lambda lp: apply_min_p(lp, params.min_p))
    if params.top_k > 0:
        filters.append(lambda lp: apply_top_k(lp, params.top_k))
    inverse_temperature = 1.0 / params.temperature
    key: list[Any] = [mx.random.key(params.seed)] if params.seed is not None else []

    def sample(logits: mx.array) -> mx.array:
        for apply in filters:
            logits = apply(logits)
        if key:
            key[0], draw = mx.random.split(key[0])
            return mx.random.categorical(logits * inverse_temperature, key=draw)
        return mx.random.categorical(logits * inverse_temperature)

    return sample


def make_sequence_processors(params: SamplingParams) -> list[Any]:
    return list(
        make_logits_processors(
            logit_bias=dict(params.logit_bias) or None,
            repetition_penalty=params.repetition_penalty,
            presence_penalty=params.presence_penalty or None,
            frequency_penalty=params.frequency_penalty or None,
        )
    )
