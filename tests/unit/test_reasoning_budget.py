"""The think-block tracker and the thinking budget, driven token by token with the demo
tokenizer (no model needed)."""

from __future__ import annotations

from typing import Any

from app.output.reasoning_budget import ReasoningBudget, ThinkTracker

VOCAB = 49152


def make_budget(tokenizer: Any, budget: int, *, start_in_reasoning: bool) -> ReasoningBudget:
    tracker = ThinkTracker(tokenizer, think=("<think>", "</think>"),
                           start_in_reasoning=start_in_reasoning)
    return ReasoningBudget(tokenizer, budget=budget, tracker=tracker)


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
    budget = make_budget(tokenizer, 4, start_in_reasoning=True)
    out = drive(tokenizer, budget, " one two three four five six seven eight nine ten")
    thought, _, answer = out.partition("</think>")
    assert thought == " one two three four" and answer  # four tokens, the tag, then an answer
    # Once out of the block nothing is masked again.
    assert all(budget.row_mask(5, VOCAB) is None for _ in range(5))


def test_a_block_the_model_opens_counts_and_the_budget_spans_blocks(tokenizer: Any) -> None:
    budget = make_budget(tokenizer, 5, start_in_reasoning=False)
    text = "Hi <think> a b</think> ok <think> c d e f g h i j"
    out = drive(tokenizer, budget, text)
    assert out.startswith("Hi <think> a b</think> ok <think>")
    second = out.split("<think>")[2]
    assert second.count("</think>") == 1 and len(second.split("</think>")[0].split()) < 6


def test_nothing_is_masked_when_the_model_never_thinks(tokenizer: Any) -> None:
    budget = make_budget(tokenizer, 1, start_in_reasoning=False)
    text = "The capital of France is Paris, a city on the Seine."
    assert drive(tokenizer, budget, text) == text


def spent(tokenizer: Any, text: str, *, start_in_reasoning: bool) -> tuple[int, int]:
    """(tokens of `text`, of those written inside think blocks) as the tracker counts them."""
    tracker = ThinkTracker(tokenizer, think=("<think>", "</think>"),
                           start_in_reasoning=start_in_reasoning)
    tokens = tokenizer.encode(text, add_special_tokens=False)
    for token in tokens:
        tracker.feed(token)
    return len(tokens), tracker.spent


def test_the_tracker_counts_think_blocks_up_to_their_closing_tags(tokenizer: Any) -> None:
    def count(text: str) -> int:
        return len(tokenizer.encode(text, add_special_tokens=False))

    thought = " weigh the options"
    total, inside = spent(tokenizer, thought + "</think> The answer.", start_in_reasoning=True)
    assert inside == count(thought + "</think>") and total > inside
    # A block the model opens counts from the token after its opening tag; blocks add up.
    text = "Hi <think> a b</think> ok <think> c</think> done"
    assert spent(tokenizer, text, start_in_reasoning=False)[1] == \
        count(" a b</think>") + count(" c</think>")
    assert spent(tokenizer, "No thinking here, just an answer.", start_in_reasoning=False)[1] == 0
