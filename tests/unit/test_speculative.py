"""Speculative decoding's pure parts: prompt lookup, the draft-length policy, and the rejection
rule for temperature > 0 (a statistical check on a toy distribution, fixed seed)."""

from __future__ import annotations

import math
import random
import re
from collections import Counter

import mlx.core as mx
import pytest

from app.core.types import SamplingParams
from app.engine.sampling import TemperatureSampler
from app.engine.speculative import (
    NgramDrafter,
    RowOutlook,
    RowStats,
    SpeculationPolicy,
    rejection_inputs,
    verify_sampled,
)
from app.models.draft_check import tokenizer_mismatch
from app.settings import ConfigError, load_settings


def drafter(tokens: list[int]) -> NgramDrafter:
    d = NgramDrafter()
    d.append(tokens)
    return d


def test_lookup_proposes_what_followed_the_latest_earlier_copy() -> None:
    d = drafter([1, 2, 3, 4, 5, 9, 2, 3, 7, 8, 6, 2, 3])
    assert d.propose(3) == [7, 8, 6]  # "2 3" last seen before the suffix: followed by 7 8 6
    d.append([4])  # suffix "2 3 4": the trigram match (earliest copy) beats the bigram
    assert d.propose(2) == [5, 9]


def test_lookup_never_matches_the_suffix_itself() -> None:
    assert drafter([5, 6, 7]).propose(4) == []
    assert drafter([5, 6, 7, 5, 6]).propose(4) == [7, 5, 6]  # runs up to the end, no further
    assert drafter([1, 2, 3, 1, 2]).propose(0) == []


def test_draft_length_follows_the_acceptance_rate_and_the_batch() -> None:
    policy = SpeculationPolicy(wide_step_cost=0.0)

    def alone(rate: float) -> int:
        return policy.draft_length([RowOutlook(rate, 1, 20)])

    lengths = [alone(rate) for rate in (0.05, 0.3, 0.6, 0.9, 1.0)]
    assert lengths[0] == 0  # drafts that are rarely right cost more than they give
    assert lengths == sorted(lengths) and lengths[-1] == policy.max_draft
    assert policy.draft_length([RowOutlook(0.9, 1, 3)]) > 0  # a short draft is still worth it
    assert policy.draft_length([RowOutlook(0.9, 1, 0)]) == 0  # nothing to draft


def test_draft_length_weighs_the_whole_batch() -> None:
    policy = SpeculationPolicy(wide_step_cost=0.0)
    sure = RowOutlook(0.95, 1, 20)
    assert policy.draft_length([sure, sure]) > 0
    # A row that cannot draft holds the batch's KV to one token: drafting would only cost.
    assert policy.draft_length([sure, RowOutlook(0.0, 1, 0)]) == 0
    assert policy.draft_length([sure, RowOutlook(0.95, 1, 0)]) == 0
    # Ten rows that each accept 60% of the time rarely all accept together.
    assert policy.draft_length([RowOutlook(0.6, 1, 20)] * 10) == 0
    assert policy.draft_length([sure] * 8) < policy.draft_length([sure])
    assert policy.draft_length([sure] * 64) == 0  # B * (1 + d) over max_step_tokens
    # Carried tokens count as already valid: the others' drafts decide.
    assert policy.draft_length([RowOutlook(0.9, 4, 0), sure]) > 0


def test_a_costly_wide_step_needs_drafts_that_land() -> None:
    cpu = SpeculationPolicy(wide_step_cost=2.0)  # any wide step: 3 plain steps
    assert cpu.draft_length([RowOutlook(0.6, 1, 20)]) == 0
    assert SpeculationPolicy(wide_step_cost=0.0).draft_length([RowOutlook(0.6, 1, 20)]) > 0
    assert cpu.draft_length([RowOutlook(0.95, 1, 20)]) == cpu.max_draft  # then: draft long
    assert cpu.draft_length([RowOutlook(0.95, 1, 2)]) == 0  # too short to pay for the step


def test_acceptance_rate_tracks_recent_drafts_and_recovers() -> None:
    stats = RowStats()
    for _ in range(10):
        stats.update(drafted=4, accepted=0)
    low = stats.rate
    assert low < 0.1
    for _ in range(100):
        stats.recover()
    assert stats.rate > 0.5  # a row may try drafting again later
    for _ in range(10):
        stats.update(drafted=8, accepted=8)
    assert stats.rate > 0.9


TOY = [0.5, 0.2, 0.15, 0.1, 0.05]
TRIALS = 4000


def sample_with_draft(sampler: TemperatureSampler, logits: mx.array, draft: list[int]
                      ) -> list[int]:
    """The tokens one verification step emits: accepted drafts, then the next token."""
    accepted, token = verify_sampled(*rejection_inputs(sampler, logits, draft))
    return [*draft[:accepted], token]


def frequencies(samples: list[int], vocab: int) -> list[float]:
    counts = Counter(samples)
    return [counts[t] / len(samples) for t in range(vocab)]


def close(observed: list[float], expected: list[float], n: int) -> bool:
    # Five standard deviations of a binomial proportion: a fixed seed, so never flaky, and a
    # wrong rule (e.g. accepting the draft always, or resampling from p with t kept) is far off.
    return all(abs(o - e) <= 5 * math.sqrt(max(e * (1 - e), 1e-4) / n)
               for o, e in zip(observed, expected, strict=True))


@pytest.mark.parametrize(("draft", "top_k"), [(1, 0), (0, 0), (4, 3)])
def test_rejection_sampling_keeps_the_distribution(draft: int, top_k: int) -> None:
    sampler = TemperatureSampler(SamplingParams(temperature=0.7, top_k=top_k, seed=7))
    logits = mx.log(mx.array([TOY, TOY]))  # the draft's position and the one after it
    scaled = [p ** (1 / 0.7) for p in TOY]
    if top_k:
        kept = sorted(range(len(TOY)), key=lambda t: -TOY[t])[:top_k]
        scaled = [s if t in kept else 0.0 for t, s in enumerate(scaled)]
    expected = [s / sum(scaled) for s in scaled]

    firsts = [sample_with_draft(sampler, logits, [draft])[0] for _ in range(TRIALS)]
    assert close(frequencies(firsts, len(TOY)), expected, TRIALS)
    accepted = sum(1 for t in firsts if t == draft) / TRIALS  # how often the draft stands
    assert abs(accepted - expected[draft]) <= 5 * math.sqrt(0.25 / TRIALS)


def test_rejection_sampling_of_a_two_token_draft() -> None:
    """Second position: the draft's second token counts only after its first was accepted, and
    the token after an accepted pair comes from the last position's full distribution."""
    sampler = TemperatureSampler(SamplingParams(temperature=1.0, seed=11))
    second = [0.1, 0.1, 0.6, 0.1, 0.1]
    third = [0.05, 0.05, 0.05, 0.05, 0.8]
    logits = mx.log(mx.array([TOY, second, third]))
    runs = [sample_with_draft(sampler, logits, [0, 2]) for _ in range(TRIALS)]
    firsts = [run[0] for run in runs]
    assert close(frequencies(firsts, 5), TOY, TRIALS)
    after_zero = [run[1] for run in runs if run[0] == 0]
    assert close(frequencies(after_zero, 5), second, len(after_zero))
    after_pair = [run[2] for run in runs if run[:2] == [0, 2]]
    assert close(frequencies(after_pair, 5), third, len(after_pair))
    assert all(len(run) <= 3 for run in runs)


def test_seeded_verification_is_reproducible() -> None:
    logits = mx.log(mx.array([TOY, TOY]))
    runs = []
    for _ in range(2):
        sampler = TemperatureSampler(SamplingParams(temperature=1.0, seed=3))
        runs.append([sample_with_draft(sampler, logits, [1]) for _ in range(50)])
    assert runs[0] == runs[1]


# --- a draft model's q (issue 17: `[[models]] draft`) --------------------------------------

DRAFT_Q = [0.1, 0.4, 0.3, 0.1, 0.1]  # the draft model's distribution: unlike TOY


def draws(q: list[float], n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return rng.choices(range(len(q)), weights=q, k=n)


def test_rejection_with_draft_probabilities_keeps_the_distribution() -> None:
    """Draft t ~ q, accept with min(1, p/q), else resample from max(0, p - q): the emitted
    token is distributed as p, and the draft stands sum(min(p, q)) of the time."""
    sampler = TemperatureSampler(SamplingParams(temperature=1.0, seed=21))
    logits = mx.log(mx.array([TOY, TOY]))
    q = mx.array([DRAFT_Q])
    firsts, kept = [], 0
    for t in draws(DRAFT_Q, TRIALS, 5):
        accepted, token = verify_sampled(*rejection_inputs(sampler, logits, [t], q))
        firsts.append(t if accepted else token)
        kept += accepted
    assert close(frequencies(firsts, len(TOY)), TOY, TRIALS)
    overlap = sum(min(p, r) for p, r in zip(TOY, DRAFT_Q, strict=True))
    assert abs(kept / TRIALS - overlap) <= 5 * math.sqrt(0.25 / TRIALS)


def test_q_is_what_makes_a_sampled_draft_land() -> None:
    """The point-mass rule (accept t with p(t)) also keeps p whatever picked t, but a draft
    sampled from q then stands only sum(q * p) of the time; with q, sum(min(p, q))."""
    sampler = TemperatureSampler(SamplingParams(temperature=1.0, seed=22))
    logits = mx.log(mx.array([TOY, TOY]))
    q = mx.array([TOY])  # a draft model that agrees with the target
    with_q = without_q = 0
    firsts = []
    for t in draws(TOY, TRIALS, 6):
        with_q += verify_sampled(*rejection_inputs(sampler, logits, [t], q))[0]
        run = sample_with_draft(sampler, logits, [t])
        without_q += len(run) - 1
        firsts.append(run[0])
    assert close(frequencies(firsts, len(TOY)), TOY, TRIALS)
    assert with_q == TRIALS
    assert abs(without_q / TRIALS - sum(p * p for p in TOY)) <= 5 * math.sqrt(0.25 / TRIALS)


def test_rejection_with_draft_probabilities_over_two_positions() -> None:
    sampler = TemperatureSampler(SamplingParams(temperature=1.0, seed=23))
    second = [0.1, 0.1, 0.6, 0.1, 0.1]
    second_q = [0.3, 0.1, 0.2, 0.3, 0.1]
    third = [0.05, 0.05, 0.05, 0.05, 0.8]
    logits = mx.log(mx.array([TOY, second, third]))
    q = mx.array([DRAFT_Q, second_q])
    runs = []
    for a, b in zip(draws(DRAFT_Q, TRIALS, 7), draws(second_q, TRIALS, 8), strict=True):
        accepted, token = verify_sampled(*rejection_inputs(sampler, logits, [a, b], q))
        runs.append([*[a, b][:accepted], token])
    assert close(frequencies([run[0] for run in runs], 5), TOY, TRIALS)
    after = [run[1] for run in runs if run[0] == 0 and len(run) > 1]
    assert close(frequencies(after, 5), second, len(after))


def test_a_costly_draft_model_drafts_less() -> None:
    free = SpeculationPolicy(wide_step_cost=0.5)
    row = [RowOutlook(0.9, 1, 12)]
    assert free.draft_length(row) == free.max_draft
    cheap = SpeculationPolicy(wide_step_cost=0.5, draft_token_cost=0.1)
    assert 0 < cheap.draft_length(row) <= free.draft_length(row)
    # A draft model as costly as the target (the same weights) never pays.
    assert SpeculationPolicy(wide_step_cost=0.5, draft_token_cost=1.0).draft_length(row) == 0


class FakeTokenizer:
    def __init__(self, size: int, shift: int = 0) -> None:
        self.size, self.shift = size, shift

    def __len__(self) -> int:
        return self.size

    def encode(self, text: str) -> list[int]:
        return [ord(c) % 97 + self.shift for c in text]


def test_a_draft_needs_the_same_tokenizer() -> None:
    assert tokenizer_mismatch(FakeTokenizer(100), FakeTokenizer(100)) is None
    assert "vocabularies differ (100 vs 101" in (
        tokenizer_mismatch(FakeTokenizer(100), FakeTokenizer(101)) or "")
    assert "different token ids" in (
        tokenizer_mismatch(FakeTokenizer(100), FakeTokenizer(100, shift=1)) or "")


@pytest.mark.parametrize(("models", "message"), [
    ([{"id": "big", "path": "/m/big", "draft": "small"}],
     "model 'big': draft 'small' is not a [[models]] id"),
    ([{"id": "big", "path": "/m/big", "draft": "big"}],
     "model 'big': draft must name another model, not itself"),
])
def test_a_draft_must_name_another_configured_model(models: list[dict[str, str]],
                                                    message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_settings(models=models)
    settings = load_settings(models=[*models, {"id": "small", "path": "/m/small"}]) \
        if "itself" not in message else None
    if settings is not None:
        assert settings.models[0].draft == "small"
