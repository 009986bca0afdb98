"""Think blocks followed token by token: the count behind `reasoning_tokens` in usage, and a cap
on how many tokens a sequence may spend thinking (Anthropic `thinking.budget_tokens`).

`ThinkTracker` sees each written token and knows whether the answer is inside a think block and
how many tokens it has written there. `ReasoningBudget` uses one: when the budget is spent inside
a block it forces the block's closing tag, token by token, and the model goes on to answer.
Outside a think block, and for models that never open one, either costs one short string
append per token and masks nothing.

The budget is a row mask like the grammars (app/output/row_mask.py).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from app.output.detect import ModelOutput, starts_in_reasoning
from app.output.row_mask import RowMaskProcessor

_TAIL = 64  # characters of recent output kept to spot an opening or closing tag

# gpt-oss thinks in the analysis channel and answers in the final one.
_HARMONY_THINK = ("<|channel|>analysis<|message|>",
                  "<|end|><|start|>assistant<|channel|>final<|message|>")


class ThinkTracker:
    def __init__(self, tokenizer: Any, *, think: tuple[str, str],
                 start_in_reasoning: bool) -> None:
        self._decode = tokenizer.decode
        self.open, self.close = think
        self.thinking = start_in_reasoning
        self.spent = 0  # tokens written after an opening tag up to its closing one, all blocks
        self._tail = ""
        self._skip_next = False

    def feed(self, token: int) -> None:
        if self.thinking:
            self.spent += 1
        if self._skip_next:
            self._skip_next = False
            return
        self._tail = (self._tail + self._decode([token]))[-_TAIL:]
        opened, closed = self._tail.rfind(self.open), self._tail.rfind(self.close)
        if self.thinking and closed >= 0:
            self.thinking, self._tail = False, self._tail[closed + len(self.close):]
        elif not self.thinking and opened >= 0 and opened > closed:
            self.thinking, self._tail = True, self._tail[opened + len(self.open):]

    def leave(self) -> None:
        """Out of the block before its closing tag's last token is fed (a forced tag's pieces
        need not decode to the tag one by one): that token is neither counted nor scanned."""
        self.thinking, self._tail, self._skip_next = False, "", True


def think_tracker(tokenizer: Any, output: ModelOutput, prompt_text: str) -> ThinkTracker | None:
    """A tracker for a chat answer in this model's format; None for a format with no think
    block (it never thinks)."""
    if output.harmony:
        return ThinkTracker(tokenizer, think=_HARMONY_THINK, start_in_reasoning=False)
    pairs = output.format.think if output.format is not None else ()
    if not pairs:
        return None
    return ThinkTracker(tokenizer, think=pairs[0],
                        start_in_reasoning=starts_in_reasoning(prompt_text, pairs))


class ReasoningBudget(RowMaskProcessor):
    def __init__(self, tokenizer: Any, *, budget: int, tracker: ThinkTracker) -> None:
        self._close_ids: list[int] = list(tokenizer.encode(tracker.close,
                                                           add_special_tokens=False))
        self._budget = budget
        self._tracker = tracker
        self._forcing: list[int] = []  # what is left of the closing tag being forced

    def row_mask(self, last_token: int, vocab: int) -> np.ndarray[Any, Any] | None:
        """None (any token) unless the budget is spent inside a think block: then only the
        next token of the closing tag."""
        tracker = self._tracker
        if self._started:
            tracker.feed(last_token)
        self._started = True
        if tracker.thinking and not self._forcing and tracker.spent >= self._budget:
            self._forcing = list(self._close_ids)
        if not self._forcing:
            return None
        allowed = np.zeros(vocab, dtype=np.bool_)
        allowed[self._forcing.pop(0)] = True
        if not self._forcing:  # the tag is written: out of the block
            tracker.leave()
        return allowed


def reasoning_budget(tokenizer: Any, output: ModelOutput, prompt_text: str,
                     budget: int) -> ReasoningBudget | None:
    """The processor that holds a chat answer's thinking to `budget` tokens; None for a model
    format with no think block (it never thinks, so the budget holds by itself)."""
    tracker = think_tracker(tokenizer, output, prompt_text)
    return None if tracker is None else ReasoningBudget(tokenizer, budget=budget,
                                                        tracker=tracker)
