"""The prefill chunk the budget gives a step (app/engine/prefill_budget.py), from scripted step
times: full chunks when nothing decodes, small ones while streams decode, converging to a chunk
whose prefill costs about `decode_steps` decode steps."""

from __future__ import annotations

import pytest

from app.engine.prefill_budget import FIRST_CHUNK, MIN_CHUNK, PrefillBudget, PrefillPlan


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
    # Sized by the budget: half a decode step's worth, never below the floor.
    assert PrefillBudget(max_chunk=2048, decode_steps=0.5).chunk(decoding=True) == FIRST_CHUNK // 2
    assert PrefillBudget(max_chunk=2048, decode_steps=0.01).chunk(decoding=True) == MIN_CHUNK


def test_the_chunk_fits_the_budget_at_the_measured_rate() -> None:
    budget = PrefillBudget(max_chunk=2048, decode_steps=2.0)
    budget.observe(seconds=0.1, decoded=True, prompt_tokens=0, chunk=2048)  # decode step 0.1 s
    budget.observe(seconds=1.0, decoded=False, prompt_tokens=1000, chunk=2048)  # 1 ms a token
    budget.observe(seconds=0.1 + 0.128, decoded=True, prompt_tokens=128, chunk=128)
    # Two decode steps' worth (0.2 s) at 1 ms a token: 200 tokens; shared by the rows.
    assert budget.chunk(decoding=True) == 200
    assert budget.chunk(decoding=True, rows=4) == 50
    assert budget.chunk(decoding=True, rows=100) == MIN_CHUNK


def test_beside_decoding_rows_a_chunk_stays_within_what_the_decode_forward_carries() -> None:
    budget = PrefillBudget(max_chunk=2048, decode_steps=2.0, max_decoding_chunk=64)
    budget.observe(seconds=0.1, decoded=True, prompt_tokens=0, chunk=2048)
    budget.observe(seconds=0.1 + 0.064, decoded=True, prompt_tokens=64, chunk=64)
    assert budget.chunk(decoding=True) == 64  # 200 fit the budget at 1 ms a token
    assert budget.chunk(decoding=False) == 2048


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


# ------------------------------------------------------------ plan: the chunk and who joins


def measured(long_prompt_tokens: int = 1024) -> PrefillBudget:
    """A budget that has seen a 0.1 s decode step and 1 ms a prompt token at 128-token chunks."""
    budget = PrefillBudget(max_chunk=2048, decode_steps=1.0,
                           long_prompt_tokens=long_prompt_tokens)
    budget.observe(seconds=0.1, decoded=True, prompt_tokens=0, chunk=2048)
    budget.observe(seconds=0.1 + 0.128, decoded=True, prompt_tokens=128, chunk=128)
    return budget


def test_short_prompts_beside_decoding_rows_prefill_whole() -> None:
    plan = measured().plan(decoding=True, prefilling=[], waiting=[600], max_rows=16)
    assert plan == PrefillPlan(chunk=2048, rows=1, budgeted=False)


def test_a_long_prompt_beside_decoding_rows_gets_the_budget() -> None:
    plan = measured().plan(decoding=True, prefilling=[(3000, 3000)], waiting=[], max_rows=16)
    assert plan == PrefillPlan(chunk=100, rows=1, budgeted=True)  # 0.1 s at 1 ms a token
    # With nothing decoding nobody waits: full chunks.
    idle = measured().plan(decoding=False, prefilling=[(3000, 3000)], waiting=[], max_rows=16)
    assert idle == PrefillPlan(chunk=2048, rows=1, budgeted=False)
    # Its last 1,000 tokens are still a long prompt's: not one 1,000-token step.
    tail = measured().plan(decoding=True, prefilling=[(1000, 3000)], waiting=[], max_rows=16)
    assert tail == PrefillPlan(chunk=100, rows=1, budgeted=True)


def test_prompts_that_arrive_beside_a_budgeted_long_one_share_its_chunk() -> None:
    plan = measured().plan(decoding=True, prefilling=[(3000, 3000)], waiting=[40, 600], max_rows=16)
    assert plan.budgeted and plan.rows == 3 and plan.chunk == 100 // 3


def test_whole_prompts_beside_decoding_rows_are_capped_per_step() -> None:
    """A step next to decoding streams prefills at most long_prompt_tokens whole tokens; a long
    prompt waiting behind short ones joins the step after, under the budget."""
    budget = measured()
    assert budget.plan(decoding=True, prefilling=[], waiting=[600, 600],
                       max_rows=16).rows == 1
    assert budget.plan(decoding=True, prefilling=[], waiting=[100, 5000],
                       max_rows=16).rows == 1
    assert budget.plan(decoding=True, prefilling=[], waiting=[5000, 100],
                       max_rows=16).budgeted


def test_prompts_of_very_different_lengths_are_not_padded_together() -> None:
    """The bench's 40/80/250/600-token prompts arriving at once: padded to 600, 8 rows cost
    4,800 tokens for 1,940 real ones."""
    budget = PrefillBudget(max_chunk=2048, decode_steps=1.0)
    waiting = [40, 80, 250, 600, 40, 80, 250, 600]
    assert budget.plan(decoding=False, prefilling=[], waiting=waiting, max_rows=16).rows == 2
    assert budget.plan(decoding=False, prefilling=[], waiting=[250, 260, 240, 600],
                       max_rows=16).rows == 3
    # Tiny prompts batch freely: their padding costs less than a step of their own.
    assert budget.plan(decoding=False, prefilling=[], waiting=[10, 60, 5, 70],
                       max_rows=16).rows == 4
    assert budget.plan(decoding=False, prefilling=[], waiting=[250, 260, 240],
                       max_rows=2).rows == 2


def test_a_row_that_needs_more_steps_takes_others_along_whatever_their_padding() -> None:
    """Waiting for a 6,000-token prompt's every chunk would cost a short one more than the
    padding of one step."""
    plan = PrefillBudget(max_chunk=2048, decode_steps=1.0).plan(
        decoding=False, prefilling=[(6000, 6000)], waiting=[40], max_rows=16)
    assert plan.rows == 2


def test_whole_prompt_steps_do_not_teach_the_budget() -> None:
    budget = measured()
    rate = budget.seconds_per_token
    budget.observe(seconds=0.2, decoded=True, prompt_tokens=600, chunk=2048, budgeted=False)
    assert budget.seconds_per_token == rate and budget.last_chunk == 128


def test_long_prompt_tokens_zero_chunks_every_prompt() -> None:
    plan = measured(long_prompt_tokens=0).plan(decoding=True, prefilling=[], waiting=[40],
                                               max_rows=16)
    assert plan == PrefillPlan(chunk=100, rows=1, budgeted=True)
