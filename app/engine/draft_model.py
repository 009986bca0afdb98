"""Drafts from a small model (`[[models]] draft = "<id>"`) for speculative decoding.

Each speculating row keeps its own KV cache in the draft model (`DraftRow`), so a draft of k
tokens costs k one-token steps of the small model, not a prefill of the whole sequence. Before
drafting, the row's cache is brought in line with the row's sequence (prompt, tokens in the
target's KV, carried tokens, the last sampled one): the tokens it drafted last time that were
rejected are trimmed out, what the target emitted since is fed (normally 1-2 tokens; the whole
prompt the first time).

At temperature 0 the draft is the small model's greedy continuation; at temperature > 0 it is
sampled from the small model's distribution under the row's own sampler (temperature, top-p,
top-k, min-p) and that distribution, q, goes to the rejection rule with the draft
(`speculative.rejection_inputs`): accept with min(1, p/q), else resample from max(0, p - q).

The rows' draft steps are one lazy graph evaluated once (a sync per step, not per token); the
rows are not batched together: each has its own cache length, and the small model's step for
one row is cheap.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import can_trim_prompt_cache, make_prompt_cache, trim_prompt_cache

from app.engine.sampling import TemperatureSampler

PREFILL_CHUNK = 512  # the first draft of a row feeds its whole prompt, in chunks


@dataclass(eq=False)
class DraftRow:
    """One row's state in the draft model: its KV cache and the tokens that cache holds."""

    cache: list[Any] | None = None
    tokens: list[int] = field(default_factory=list)
    sure: int = 0  # tokens[:sure] is known to be a prefix of the row's sequence


@dataclass(frozen=True)
class DraftRequest:
    row: DraftRow
    sequence: list[int]  # the row's tokens so far, the last sampled one included
    length: int  # draft tokens wanted (>= 1)
    sampler: TemperatureSampler | None  # None: greedy


class DraftModel:
    """A loaded draft model, shared by the rows of its target's batch (MLX thread only)."""

    def __init__(self, model: Any, *, vocab: int, model_id: str = "draft") -> None:
        self.model = model
        self.vocab = vocab  # width of the target's logits: q must be over the same ids
        self.id = model_id

    def propose(self, requests: list[DraftRequest]) -> list[tuple[list[int], mx.array | None]]:
        """Each request's draft tokens, and for sampled rows the (length, vocab) probabilities
        they were drawn from."""
        pending: list[tuple[mx.array, mx.array | None]] = []
        for request in requests:
            pending.append(self._draft(request))
        mx.eval([tokens for tokens, _ in pending], [q for _, q in pending if q is not None])
        out: list[tuple[list[int], mx.array | None]] = []
        for request, (tokens, q) in zip(requests, pending, strict=True):
            drafted: list[int] = tokens.tolist()  # type: ignore[assignment]
            # The cache now holds the sequence and every draft token but the last.
            request.row.tokens = request.sequence + drafted[:-1]
            request.row.sure = len(request.sequence)
            out.append((drafted, q))
        return out

    def _draft(self, request: DraftRequest) -> tuple[mx.array, mx.array | None]:
        row, sequence = request.row, request.sequence
        rest = self._sync(row, sequence)
        logits = self._feed(row, rest)
        tokens: list[mx.array] = []
        probs: list[mx.array] = []
        sampler = request.sampler
        keys = sampler.keys(request.length) if sampler is not None else []
        for j in range(request.length):
            if sampler is None:
                token = mx.argmax(logits, axis=-1)
            else:
                scaled = sampler.filtered(logits) * sampler.inverse_temperature
                probs.append(mx.softmax(scaled.astype(mx.float32), axis=-1))
                token = mx.random.categorical(scaled, key=keys[j])
            tokens.append(token)
            if j + 1 < request.length:
                logits = self._logits(self.model(token.reshape(1, 1), cache=row.cache))
        return mx.concatenate(tokens), (mx.concatenate(probs) if probs else None)

    def _sync(self, row: DraftRow, sequence: list[int]) -> list[int]:
        """Trim the row's cache to what it shares with `sequence`; the tokens to feed."""
        if row.cache is None:
            row.cache, row.tokens, row.sure = make_prompt_cache(self.model), [], 0
        held = row.tokens
        common = min(row.sure, len(held), len(sequence))
        limit = min(len(held), len(sequence))
        while common < limit and held[common] == sequence[common]:
            common += 1
        common = min(common, len(sequence) - 1)  # the last token is fed for its logits
        if common < len(held):
            if can_trim_prompt_cache(row.cache):
                trim_prompt_cache(row.cache, len(held) - common)
            else:  # a cache that cannot roll back starts over
                row.cache, common = make_prompt_cache(self.model), 0
        row.tokens = sequence[:common]
        return sequence[common:]

    def _feed(self, row: DraftRow, tokens: list[int]) -> mx.array:
        """Feed `tokens` (>= 1) to the row's cache; the logits after the last one."""
        while len(tokens) > PREFILL_CHUNK:
            self.model(mx.array(tokens[:PREFILL_CHUNK])[None], cache=row.cache)
            mx.eval([c.state for c in row.cache or []])
            tokens = tokens[PREFILL_CHUNK:]
        return self._logits(self.model(mx.array(tokens)[None], cache=row.cache))

    def _logits(self, out: mx.array) -> mx.array:
        """The last position's logits (1, vocab), over exactly the target's token ids: a draft
        with a wider vocabulary never proposes ids the target lacks, a narrower one gives
        the ids it lacks no probability."""
        logits = out[:, -1, :].astype(mx.float32)
        width = logits.shape[-1]
        if width > self.vocab:
            return logits[:, : self.vocab]
        if width < self.vocab:
            pad = mx.full((1, self.vocab - width), -mx.inf, dtype=logits.dtype)
            return mx.concatenate([logits, pad], axis=-1)
        return logits
