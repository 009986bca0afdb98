"""Speculative decoding inside the continuous batch: prompt-lookup (n-gram) drafts, verified for
every row in one batched forward.

Agents repeat their context (an edit re-emits most of a file), so the tokens that followed the
last few generated tokens earlier in the prompt or output are often what the model says next.
Verifying k such draft tokens costs about one decode step on a bandwidth-bound machine.

One step, for a batch of B rows: every row feeds the same number L of tokens, its pending tokens
(accepted, KV not computed yet; normally 1) then its draft, then filler that is never accepted.
One forward over (B, L). Row i accepts a_i drafts (greedy: argmax equality; temperature > 0:
rejection sampling against a deterministic draft, `verify_sampled`) and gets one new token from
the first position it did not accept. Row i's KV is valid for p_i + a_i of the L positions; the
cache is trimmed uniformly to m = min_i(p_i + a_i), and a row with more valid tokens carries the
surplus (already emitted) as pending tokens into the next step, where their KV is recomputed.
No per-row trim: BatchKVCache keeps one length for the whole batch.

A token reaches the client when it is fed (as in mlx-lm's pipelined step, where the token sampled
in one step is returned by the next): pending + accepted drafts in one step, each through the
same stop-token and max_tokens checks as a plain step, so a stop cuts exactly.

Rows that must not speculate (logits processors, grammar masks, log-probabilities, opted out)
feed their one pending token and filler; their first position is sampled by the plain step's own
code (`LogitsGenerationBatch._choose`), so their semantics do not change. When no row has a
worthwhile draft, the step is the plain pipelined decode step.

Drafts come from prompt lookup (`NgramDrafter`), or, for a model configured with
`draft = "<id>"`, from that small model's continuation instead (`DraftModel`, one KV cache per
row, rolled back to what was accepted). Then at temperature > 0 the rejection rule uses the
draft model's probabilities q: accept with min(1, p/q), resample from max(0, p - q).

Because the trim is uniform, a batch advances at the pace of its slowest row: a row that
accepts drafts while another cannot advance only runs ahead by its pending tokens. So the
policy weighs the expected advance of the whole batch (`SpeculationPolicy.draft_length`): a
row without a draft, or many rows that rarely all accept together, mean no drafting.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import BatchKVCache
from mlx_lm.sample_utils import greedy_sampler

from app import metrics
from app.engine.decode import (
    NO_LOGPROBS,
    LogitsGenerationBatch,
    MultiTokenForward,
    multi_token_forward,
)
from app.engine.draft_model import DraftModel, DraftRequest, DraftRow
from app.engine.sampling import TemperatureSampler

NGRAM_SIZES = (3, 2)  # longest first: a longer match is a better guess


class NgramDrafter:
    """Prompt lookup over one sequence's tokens: after the last n tokens, propose what followed
    their most recent earlier occurrence."""

    def __init__(self) -> None:
        self.history: list[int] = []
        self._index: dict[tuple[int, ...], int] = {}  # n-gram -> where its continuation starts

    def append(self, tokens: list[int]) -> None:
        history, index = self.history, self._index
        for token in tokens:
            end = len(history)
            # The n-grams ending here get their continuation now; the current suffix is not
            # indexed until the token after it is known, so a lookup finds earlier copies only.
            for n in NGRAM_SIZES:
                if end >= n:
                    index[tuple(history[end - n:])] = end
            history.append(token)

    def propose(self, k: int) -> list[int]:
        history = self.history
        if k <= 0:
            return []
        for n in NGRAM_SIZES:
            if len(history) >= n:
                at = self._index.get(tuple(history[-n:]))
                if at is not None:
                    return history[at : at + k]
        return []


@dataclass
class RowStats:
    """Decayed counts of accepted draft tokens: the row's per-token acceptance rate."""

    # Prior 0.85: a fresh row tries drafts (alone in a batch, the policy drafts from a rate of
    # about 0.5 on a CPU), and one whose drafts failed drifts back to it and tries again after
    # some 40 plain steps.
    accepted: float = 1.7
    tried: float = 2.0

    @property
    def rate(self) -> float:
        return self.accepted / self.tried

    def update(self, drafted: int, accepted: int) -> None:
        # A run of `accepted` successes, ended by a failure unless every draft was accepted.
        self.accepted = 0.8 * self.accepted + accepted
        self.tried = 0.8 * self.tried + accepted + (1 if accepted < drafted else 0)

    def recover(self) -> None:
        """A step without drafting drifts the rate back toward the prior, so a row whose
        drafts failed once tries again later (what it repeats may change)."""
        self.accepted = 0.97 * self.accepted + 0.03 * 1.7
        self.tried = 0.97 * self.tried + 0.03 * 2.0


@dataclass(frozen=True)
class RowOutlook:
    """What a row brings to a step: its acceptance rate, its pending tokens (the carried ones
    plus the last sampled), and how many draft tokens it has (0: it cannot draft)."""

    rate: float
    pending: int
    available: int

    def reaches(self, k: int, draft: int) -> float:
        """Chance its valid KV this step is at least 1 + k tokens, drafting `draft` tokens."""
        if k <= self.pending - 1:
            return 1.0
        beyond = k - self.pending + 1  # drafts that must all be accepted
        return min(self.rate, 0.98) ** beyond if beyond <= min(draft, self.available) else 0.0


def _wide_step_cost() -> float:
    # On MLX's CPU backend the verify forward is the tuned llama step's multi-token path
    # (`LlamaDecodeStep.many`): one row's 2-token step costs about 1.1 plain steps, 4 tokens
    # about 1.4 (bench.verify_step, 2026-11-30, loaded), i.e. ~0.15 on top of the
    # row_cost_tokens term. Charging just that drafted from acceptance rates of ~0.3, and on
    # the varied-prompt probe at 1 client (answers that rarely repeat) speculation then cost
    # ~7% (bench.spec_onoff); the edit level drafted the same either way (its runs are long or
    # absent). 0.5 keeps drafts to rows accepting half or more. On a GPU the weights are read
    # once either way; what is left is the lost pipelining.
    return 0.5 if mx.default_device() == mx.cpu else 0.25


@dataclass
class SpeculationPolicy:
    max_draft: int = 12
    # A forward over one more row costs about as much as this many more tokens in a row (the
    # weights are read once per step either way).
    row_cost_tokens: float = 16.0
    # What any step wider than one token a row costs on top, in plain steps.
    wide_step_cost: float = field(default_factory=_wide_step_cost)
    max_step_tokens: int = 96  # B * L at most: verification must stay about one step's cost
    min_gain: float = 1.1  # expected advance per unit of cost vs no drafts (covers the sync)
    # What one draft token costs to make, in plain steps: 0 for prompt lookup; a draft model's
    # one-token step (about its weights over the target's, on a bandwidth-bound machine).
    draft_token_cost: float = 0.0

    def draft_length(self, rows: list[RowOutlook]) -> int:
        """Draft tokens a row (each row up to its own `available`) for the best expected KV
        advance per cost; 0 when none beats not drafting by `min_gain`.

        The batch's KV advances by the smallest row's valid tokens (a uniform trim), so the
        expected advance is 1 + sum over k of P(every row reaches 1 + k): one row that cannot
        draft holds it at its pending tokens, and many rows rarely all accept together."""
        count = len(rows)

        def value(draft: int) -> float:
            width = max(r.pending + min(draft, r.available) for r in rows)
            advance = 1.0
            for k in range(1, width):
                chance = 1.0
                for row in rows:
                    chance *= row.reaches(k, draft)
                    if chance == 0.0:
                        break
                advance += chance
            wide = self.wide_step_cost if width > 1 else 0.0
            making = self.draft_token_cost * sum(min(draft, r.available) for r in rows)
            return advance / (1.0 + wide + making + count * width / self.row_cost_tokens)

        best, best_value = 0, value(0) * self.min_gain
        for draft in range(1, self.max_draft + 1):
            if count * (1 + draft) > self.max_step_tokens:
                break
            candidate = value(draft)
            if candidate > best_value:
                best, best_value = draft, candidate
        return best


@dataclass
class _RowState:
    carry: list[int] = field(default_factory=list)  # emitted, KV not computed yet
    drafter: NgramDrafter | None = None
    drafted_by: DraftRow | None = None  # with a draft model: the row's KV cache in it
    stats: RowStats = field(default_factory=RowStats)


class SpeculativeGenerationBatch(LogitsGenerationBatch):
    policy: SpeculationPolicy
    spec_uids: set[int]  # sequences allowed to speculate
    verify_forward: MultiTokenForward
    _rows: list[_RowState]

    def setup(self, policy: SpeculationPolicy, spec_uids: set[int],
              draft_model: DraftModel | None = None) -> None:
        self.policy = policy
        self.spec_uids = spec_uids
        self.verify_forward = multi_token_forward(self.forward, self.model)
        self.draft_model = draft_model  # None: prompt lookup
        self.source = "prompt_lookup" if draft_model is None else "draft_model"
        self._draft_probs: list[mx.array | None] = []  # per row, the draft's q (sampled rows)
        self._rows = []
        self.drafted = 0  # draft tokens verified, and accepted, over this batch's life
        self.accepted = 0

    # --- keeping per-row state aligned with mlx-lm's lists --------------------------------

    def extend(self, batch: Any) -> None:
        super().extend(batch)
        self._rows.extend(getattr(batch, "_rows", None) or [_RowState() for _ in batch.uids])

    def filter(self, keep: list[int]) -> None:
        super().filter(keep)
        self._rows = [self._rows[i] for i in keep]

    # --- the step -------------------------------------------------------------------------

    def _eligible(self, i: int) -> bool:
        uid = self.uids[i]
        if uid not in self.spec_uids or uid in self.logprob_uids or self.logits_processors[i]:
            return False
        sampler = getattr(self.samplers[i], "inner", self.samplers[i])
        return sampler is greedy_sampler or isinstance(sampler, TemperatureSampler)

    def _known(self, i: int, last: int | None) -> list[int]:
        """Row i's tokens the drafter has not seen yet (its history is always a prefix of
        tokens-in-KV + carry + the last sampled token)."""
        state, tokens = self._rows[i], self.tokens[i]
        assert state.drafter is not None
        seen = len(state.drafter.history)
        tail = state.carry + ([] if last is None else [last])
        if seen < len(tokens):
            return list(tokens[seen:]) + tail
        return tail[seen - len(tokens):]

    def _drafter(self, i: int, last: int | None) -> NgramDrafter:
        state = self._rows[i]
        if state.drafter is None:
            state.drafter = NgramDrafter()
        state.drafter.append(self._known(i, last))
        return state.drafter

    def _worth_syncing(self, eligible: list[int]) -> bool:
        """Without reading the pending tokens back (which would stall the pipelined step):
        would the policy draft, judging by the drafts the rows have one token earlier? A row
        with carried tokens must feed them anyway."""
        if any(state.carry for state in self._rows):
            return True
        outlook = [RowOutlook(0.0, 1, 0) for _ in self.uids]
        for i in eligible:
            available = self.policy.max_draft if self.draft_model is not None \
                else len(self._drafter(i, None).propose(self.policy.max_draft))
            outlook[i] = RowOutlook(self._rows[i].stats.rate, 1, available)
        if self.policy.draft_length(outlook) > 0:
            return True
        for i in eligible:
            self._rows[i].stats.recover()
        return False

    def next(self) -> list[Any]:
        if not self.uids:
            return []
        if not all(type(c) is BatchKVCache for c in self.prompt_cache):
            return super().next()  # type: ignore[no-any-return]  # only a plain KV can be trimmed
        eligible = [i for i in range(len(self.uids)) if self._eligible(i)]
        if not eligible or not self._worth_syncing(eligible):
            return super().next()  # type: ignore[no-any-return]
        last: list[int] = self._next_tokens.tolist()  # type: ignore[assignment]
        drafts = self._plan(eligible, last)
        if not any(drafts) and not any(state.carry for state in self._rows):
            return super().next()  # type: ignore[no-any-return]
        return self._emit(*self._verify(last, drafts))

    def _plan(self, eligible: list[int], last: list[int]) -> list[list[int]]:
        """Every row's draft (empty: none); with a draft model, its q per row is left in
        `_draft_probs` for `_verify`."""
        rows = len(self.uids)
        room = max(1, self.policy.max_step_tokens // rows)  # L at most (pending always fits)
        proposals: list[list[int]] = [[] for _ in range(rows)]
        caps = [0] * rows
        self._draft_probs = [None] * rows
        for i in eligible:
            state = self._rows[i]
            caps[i] = max(0, min(self.policy.max_draft, room - len(state.carry) - 1,
                                 self.max_tokens[i] - self._num_tokens[i] - 1))
            if self.draft_model is None:
                proposals[i] = self._drafter(i, last[i]).propose(caps[i])
        # A draft model can always draft: the policy picks the length before it is run.
        available = caps if self.draft_model is not None else [len(p) for p in proposals]
        outlook = [RowOutlook(state.stats.rate, len(state.carry) + 1, n)
                   for state, n in zip(self._rows, available, strict=True)]
        draft = self.policy.draft_length(outlook)
        if draft == 0:
            for i in eligible:
                self._rows[i].stats.recover()
            return [[] for _ in range(rows)]
        if self.draft_model is not None:
            return self._run_draft_model(eligible, last, [min(draft, cap) for cap in caps])
        return [proposal[:draft] for proposal in proposals]

    def _run_draft_model(self, eligible: list[int], last: list[int], lengths: list[int]
                         ) -> list[list[int]]:
        assert self.draft_model is not None
        proposals: list[list[int]] = [[] for _ in self.uids]
        wanted = [i for i in eligible if lengths[i] > 0]
        requests = []
        for i in wanted:
            state = self._rows[i]
            if state.drafted_by is None:
                state.drafted_by = DraftRow()
            sampler = getattr(self.samplers[i], "inner", self.samplers[i])
            requests.append(DraftRequest(
                state.drafted_by, [*self.tokens[i], *state.carry, last[i]], lengths[i],
                sampler if isinstance(sampler, TemperatureSampler) else None))
        for i, (tokens, q) in zip(wanted, self.draft_model.propose(requests), strict=True):
            proposals[i] = tokens
            self._draft_probs[i] = q
        return proposals

    def _verify(self, last: list[int], drafts: list[list[int]]
                ) -> tuple[list[list[int]], list[int], list[Any]]:
        """One forward over every row's pending tokens and draft. Returns the tokens each row
        emits now, the token each samples next, and that token's log-probabilities."""
        rows = len(self.uids)
        pending = [[*state.carry, token] for state, token in zip(self._rows, last, strict=True)]
        width = max(len(p) + len(d) for p, d in zip(pending, drafts, strict=True))
        inputs = []
        for p, d in zip(pending, drafts, strict=True):
            row = p + d
            inputs.append(row + [row[-1]] * (width - len(row)))  # filler, never accepted
        logits = self.verify_forward(mx.array(inputs), self.prompt_cache)  # (B, L, vocabulary)

        at = [len(p) - 1 for p in pending]  # each row's position after its last pending token
        first = logits[mx.arange(rows), mx.array(at)]
        fed = [p[-1] for p in pending]
        samplers = [greedy_sampler if d else (s or self.fallback_sampler)
                    for d, s in zip(drafts, self.samplers, strict=True)]
        sampled, logprobs, contexts, _ = self._choose(first, mx.array(fed), fed, samplers)

        greedy_rows = [i for i in range(rows) if drafts[i] and not self._temperature(i)]
        argmax = mx.argmax(logits, axis=-1) if greedy_rows else None
        q = self._draft_probs if len(self._draft_probs) == rows else [None] * rows
        checks = {i: self._rejection_inputs(i, logits[i, at[i]: at[i] + len(drafts[i]) + 1],
                                            drafts[i], q[i])
                  for i in range(rows) if drafts[i] and self._temperature(i)}
        mx.eval(sampled, logprobs, contexts, [] if argmax is None else argmax,
                list(checks.values()))

        chosen: list[int] = sampled.tolist()  # type: ignore[assignment]
        best: list[list[int]] = argmax.tolist() if argmax is not None else []  # type: ignore[assignment]
        accepted = [0] * rows
        for i in range(rows):
            draft = drafts[i]
            if not draft:
                continue
            if i in checks:
                accepted[i], chosen[i] = verify_sampled(*checks[i])
            else:
                predicted = best[i][at[i]: at[i] + len(draft) + 1]
                a = 0
                while a < len(draft) and predicted[a] == draft[a]:
                    a += 1
                accepted[i], chosen[i] = a, predicted[a]
            self._rows[i].stats.update(len(draft), accepted[i])
        drafted = sum(len(d) for d in drafts)
        if drafted:
            self.drafted += drafted
            self.accepted += sum(accepted)
            metrics.SPEC_STEPS.labels(source=self.source).inc()
            metrics.SPEC_DRAFTED.labels(source=self.source).inc(drafted)
            metrics.SPEC_ACCEPTED.labels(source=self.source).inc(sum(accepted))

        # Keep the KV every row has valid; a row with more carries it as pending.
        valid = [p + d[:a] for p, d, a in zip(pending, drafts, accepted, strict=True)]
        keep = min(len(v) for v in valid)
        if width > keep:
            for cache in self.prompt_cache:
                cache.trim(width - keep)
        for i, tokens in enumerate(valid):
            self.tokens[i].extend(tokens[:keep])
            self._rows[i].carry = tokens[keep:]
        emitted = [[token, *d[:a]] for token, d, a in zip(last, drafts, accepted, strict=True)]
        return emitted, chosen, logprobs

    def _temperature(self, i: int) -> bool:
        return isinstance(getattr(self.samplers[i], "inner", self.samplers[i]),
                          TemperatureSampler)

    def _rejection_inputs(self, i: int, logits: mx.array, draft: list[int],
                          draft_probs: mx.array | None = None) -> tuple[Any, ...]:
        sampler: TemperatureSampler = getattr(self.samplers[i], "inner", self.samplers[i])
        return rejection_inputs(sampler, logits, draft, draft_probs)

    def _emit(self, emitted: list[list[int]], chosen: list[int], logprobs: list[Any]
              ) -> list[Any]:
        """Responses for the tokens each row emits, through the same stop-token and max_tokens
        checks as mlx-lm's step; a row that finishes emits nothing after its last token."""
        current = self._next_logprobs  # the pending tokens' own
        self._current_tokens = self._next_tokens
        self._current_logprobs = current
        self._next_tokens = mx.array(chosen)
        self._next_logprobs = logprobs
        keep: list[int] = []
        responses = []
        for i, tokens in enumerate(emitted):
            finish_reason = None
            for n, token in enumerate(tokens):
                self._num_tokens[i] += 1
                if self._num_tokens[i] >= self.max_tokens[i]:
                    finish_reason = "length"
                if self._matchers[i].advance(token):
                    finish_reason = "stop"
                row_logprobs = current[i] if n == 0 else NO_LOGPROBS
                if finish_reason is not None:
                    responses.append(self.Response(
                        uid=self.uids[i], token=token, logprobs=row_logprobs,
                        finish_reason=finish_reason, prompt_cache=self.extract_cache(i),
                        all_tokens=self.tokens[i]))
                    break
                responses.append(self.Response(
                    uid=self.uids[i], token=token, logprobs=row_logprobs, finish_reason=None,
                    prompt_cache=None, all_tokens=None))
            if finish_reason is None:
                keep.append(i)
        if len(keep) < len(self.uids):
            self.filter(keep)
        return responses


def rejection_inputs(sampler: TemperatureSampler, logits: mx.array, draft: list[int],
                     draft_probs: mx.array | None = None
                     ) -> tuple[mx.array, mx.array, mx.array]:
    """For a row's logits at its draft positions plus one (d + 1, vocabulary): the chance of
    accepting each draft token, min(1, p(t) / q(t)), a uniform draw per draft token, and one
    sample per position from norm(max(0, p - q)) (the last position: from p, the bonus token
    when every draft is accepted).

    `draft_probs` is q, the (d, vocabulary) distributions a draft model drew the draft from;
    None: a deterministic draft (prompt lookup), q one-hot, so the chance is p(t) and the
    residual is p with t removed. (That rule keeps p whatever chose t; with q, a draft sampled
    from q stands sum(min(p, q)) of the time instead of sum(p * q).)"""
    d = len(draft)
    scaled = sampler.filtered(logits) * sampler.inverse_temperature
    probs = mx.softmax(scaled.astype(mx.float32), axis=-1)
    positions = mx.arange(d)
    tokens = mx.array(draft)
    if draft_probs is None:
        chance = probs[positions, tokens]
        residual = scaled
        residual[positions, tokens] = -mx.inf
    else:
        q = draft_probs.astype(mx.float32)
        p_t, q_t = probs[positions, tokens], q[positions, tokens]
        chance = mx.minimum(p_t / mx.maximum(q_t, 1e-30), 1.0)  # q(t) > 0: t was drawn from q
        left = mx.maximum(probs[:d] - q, 0.0)
        # p == q leaves nothing (then the draft is always accepted); sample p, never NaN.
        left = mx.where(mx.sum(left, axis=-1, keepdims=True) > 0, left, probs[:d])
        residual = mx.concatenate([mx.log(left), scaled[d:].astype(mx.float32)], axis=0)
    uniform_key, sample_key = sampler.keys(2)
    uniform = mx.random.uniform(shape=(d,), key=uniform_key)
    samples = mx.random.categorical(residual, key=sample_key)
    return chance, uniform, samples


def verify_sampled(chance: mx.array, uniform: mx.array, samples: mx.array) -> tuple[int, int]:
    """Standard speculative sampling: accept draft token t with probability min(1, p(t)/q(t))
    (p(t) for a deterministic draft); at the first rejection, the token drawn from
    norm(max(0, p - q)) (`rejection_inputs`). Returns (accepted, next token)."""
    p: list[float] = chance.tolist()  # type: ignore[assignment]
    u: list[float] = uniform.tolist()  # type: ignore[assignment]
    drawn: list[int] = samples.tolist()  # type: ignore[assignment]
    a = 0
    while a < len(p) and u[a] < p[a]:
        a += 1
    return a, drawn[a]


def use_speculative_decode(generator: Any, logprob_uids: set[int], spec_uids: set[int],
                           policy: SpeculationPolicy | None = None,
                           draft_model: DraftModel | None = None) -> SpeculativeGenerationBatch:
    """Make `generator` decode with SpeculativeGenerationBatch (see `use_logits_decode`)."""
    from app.engine.decode import use_logits_decode

    batch = use_logits_decode(generator, logprob_uids, SpeculativeGenerationBatch)
    assert isinstance(batch, SpeculativeGenerationBatch)
    batch.setup(policy or SpeculationPolicy(), spec_uids, draft_model)
    return batch
