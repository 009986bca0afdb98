"""The prefill chunk the budget gives a step (app/engine/prefill_budget.py), from scripted step
times: full chunks when nothing decodes, small ones while streams decode, converging to a chunk
whose prefill costs about `decode_steps` decode steps."""

from __future__ import annotations

import pytest

from app.engine.prefill_budget import FIRST_CHUNK, MIN_CHUNK, PrefillBudget


def test_full_chunks_when_nothing_decodes_or_the_budget_is_off() -> None:
    budget = PrefillBudget(max_chunk=2048, decode_steps=1.0)
    assert budget.chunk(decoding=False) == 2048
    off = PrefillBudget(max_chunk=2048, decode_steps=0.0)
    off.observe(seconds=0.1, decoded=True, prompt_tokens=0, chunk=2048)
    off.observe(seconds=5.0, decoded=True, prompt_tokens=2048, chunk=2048)
    assert off.chunk(decoding=True) == 2048


def test_a_small_first_chunk_before_anything_is_measured() -> None:
    budget = PrefillBudget(max_chunk=2048, decode_steps=1.0)
    assert budget.chunk(decoding=True) == FIRST_CHUNK
    assert PrefillBudget(max_chunk=16, decode_steps=1.0).chunk(decoding=True) == 16


def test_the_chunk_fits_the_budget_at_the_measured_rate() -> None:
    budget = PrefillBudget(max_chunk=2048, decode_steps=2.0)
    budget.observe(seconds=0.1, decoded=True, prompt_tokens=0, chunk=2048)  # decode step 0.1 s
    budget.observe(seconds=1.0, decoded=False, prompt_tokens=1000, chunk=2048)  # 1 ms a token
    budget.observe(seconds=0.1 + 0.128, decoded=True, prompt_tokens=128, chunk=128)
    # Two decode steps' worth (0.2 s) at 1 ms a token: 200 tokens; shared by the rows.
    assert budget.chunk(decoding=True) == 200
    assert budget.chunk(decoding=True, rows=4) == 50
    assert budget.chunk(decoding=True, rows=100) == MIN_CHUNK


def test_growth_is_at_most_twofold_per_step() -> None:
    budget = PrefillBudget(max_chunk=2048, decode_steps=1.0)
    budget.observe(seconds=1.0, decoded=True, prompt_tokens=0, chunk=2048)
    budget.observe(seconds=0.01, decoded=False, prompt_tokens=1000, chunk=2048)  # very cheap
    assert budget.chunk(decoding=True) == FIRST_CHUNK  # measured on full chunks: not trusted
    budget.observe(seconds=1.0 + 0.00001 * 32, decoded=True, prompt_tokens=32, chunk=32)
    assert budget.chunk(decoding=True) == 64
    budget.observe(seconds=1.0 + 0.00001 * 64, decoded=True, prompt_tokens=64, chunk=64)
    assert budget.chunk(decoding=True) == 128


@pytest.mark.parametrize("decode_steps", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("overhead", [0.0, 0.02])
def test_converges_to_a_prefill_costing_the_budget(decode_steps: float, overhead: float) -> None:
    """A step costs decode + overhead + per_token * tokens (the fixed overhead makes small
    chunks dearer per token). After some steps the prefill part costs about the budget."""
    decode, per_token = 0.1, 0.002
    budget = PrefillBudget(max_chunk=4096, decode_steps=decode_steps)
    for _ in range(3):
        budget.observe(seconds=decode, decoded=True, prompt_tokens=0, chunk=4096)
    for _ in range(30):
        chunk = budget.chunk(decoding=True)
        budget.observe(seconds=decode + overhead + per_token * chunk, decoded=True,
                       prompt_tokens=chunk, chunk=chunk)
    chunk = budget.chunk(decoding=True)
    expected = (decode_steps * decode - overhead) / per_token
    assert abs(chunk - expected) <= 0.1 * expected + 1, (chunk, expected)
