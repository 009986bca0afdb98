"""A cap on how many tokens a sequence may spend thinking (Anthropic `thinking.budget_tokens`).

While the model is inside its think block the processor counts the tokens it writes; when the
budget is spent it forces the block's closing tag, token by token, and the model goes on to
answer. Outside a think block, and for models that never open one, it costs one short string
append per token and masks nothing.

It is a row mask like the grammars (app/output/row_mask.py).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from app.output.detect import ModelOutput, starts_in_reasoning
from app.output.row_mask import RowMaskProcessor

_TAIL = 64  # characters of recent output kept to spot an opening or closing tag


class ReasoningBudget(RowMaskProcessor):
    def __init__(self, tokenizer: Any, *, budget: int, think: tuple[str, str],
                 start_in_reasoning: bool) -> None:
        self._decode = tokenizer.decode
        self._open, self._close = think
        self._close_ids: list[int] = list(tokenizer.encode(self._close, add_special_tokens=False))
        self._budget = budget
        self._thinking = start_in_reasoning
        self._spent = 0  # tokens written inside think blocks, over the whole answer
        self._forcing: list[int] = []  # what is left of the closing tag being forced
        self._tail = ""
        self._closing = False

    def row_mask(self, last_token: int, vocab: int) -> np.ndarray[Any, Any] | None:
        """None (any token) unless the budget is spent inside a think block: then only the
        next token of the closing tag."""
        if self._started:
            self._feed(last_token)
        self._started = True
        if self._thinking and not self._forcing and self._spent >= self._budget:
            self._forcing = list(self._close_ids)
        if not self._forcing:
            return None
        allowed = np.zeros(vocab, dtype=np.bool_)
        allowed[self._forcing.pop(0)] = True
        if not self._forcing:  # the tag is written: out of the block, whatever its pieces decode to
            self._thinking, self._tail, self._closing = False, "", True
        return allowed

    def _feed(self, token: int) -> None:
        if self._closing:  # the forced tag's last token: already accounted for
            self._closing = False
            return
        if self._thinking:
            self._spent += 1
        self._tail = (self._tail + self._decode([token]))[-_TAIL:]
        opened, closed = self._tail.rfind(self._open), self._tail.rfind(self._close)
        if self._thinking and closed >= 0:
            self._thinking, self._tail = False, self._tail[closed + len(self._close):]
        elif not self._thinking and opened >= 0 and opened > closed:
            self._thinking, self._tail = True, self._tail[opened + len(self._open):]


# gpt-oss thinks in the analysis channel and answers in the final one.
_HARMONY_THINK = ("<|channel|>analysis<|message|>",
                  "<|end|><|start|>assistant<|channel|>final<|message|>")


def reasoning_budget(tokenizer: Any, output: ModelOutput, prompt_text: str,
                     budget: int) -> ReasoningBudget | None:
    """The processor that holds a chat answer's thinking to `budget` tokens; None for a model
    format with no think block (it never thinks, so the budget holds by itself)."""
    if output.harmony:
        return ReasoningBudget(tokenizer, budget=budget, think=_HARMONY_THINK,
                               start_in_reasoning=False)
    pairs = output.format.think if output.format is not None else ()
    if not pairs:
        return None
    return ReasoningBudget(tokenizer, budget=budget, think=pairs[0],
                           start_in_reasoning=starts_in_reasoning(prompt_text, pairs))
