"""The thinking budget, driven token by token with the demo tokenizer (no model needed)."""

from __future__ import annotations

from typing import Any

from app.output.reasoning_budget import ReasoningBudget

VOCAB = 49152


def drive(tokenizer: Any, budget: ReasoningBudget, text: str) -> str:
    """Feed `text`'s tokens as the model's choices, except where the budget forces one;
    return what was written."""
    written: list[int] = []
    last = -1
    for token in tokenizer.encode(text, add_special_tokens=False):
        mask = budget.row_mask(last, VOCAB)
        if mask is not None:
            assert mask.sum() == 1
            token = int(mask.argmax())
        written.append(token)
        last = token
    return str(tokenizer.decode(written))


def test_closes_an_open_block_after_the_budget(tokenizer: Any) -> None:
    budget = ReasoningBudget(tokenizer, budget=4, think=("<think>", "</think>"),
                             start_in_reasoning=True)
    out = drive(tokenizer, budget, " one two three four five six seven eight nine ten")
    thought, _, answer = out.partition("</think>")
    assert thought == " one two three four" and answer  # four tokens, the tag, then an answer
    # Once out of the block nothing is masked again.
    assert all(budget.row_mask(5, VOCAB) is None for _ in range(5))


def test_a_block_the_model_opens_counts_and_the_budget_spans_blocks(tokenizer: Any) -> None:
    budget = ReasoningBudget(tokenizer, budget=5, think=("<think>", "</think>"),
                             start_in_reasoning=False)
    text = "Hi <think> a b</think> ok <think> c d e f g h i j"
    out = drive(tokenizer, budget, text)
    assert out.startswith("Hi <think> a b</think> ok <think>")
    second = out.split("<think>")[2]
    assert second.count("</think>") == 1 and len(second.split("</think>")[0].split()) < 6


def test_nothing_is_masked_when_the_model_never_thinks(tokenizer: Any) -> None:
    budget = ReasoningBudget(tokenizer, budget=1, think=("<think>", "</think>"),
                             start_in_reasoning=False)
    text = "The capital of France is Paris, a city on the Seine."
    assert drive(tokenizer, budget, text) == text
