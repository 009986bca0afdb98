"""The shape every per-sequence logits mask in the gateway takes (grammars, thinking budget).

Two ways in: `row_mask(last token, vocabulary)`, which the decode step (`app.engine.decode`)
calls for every masked row and applies in one batched op; and the mlx-lm logits-processor call
`(tokens so far, logits (1, V)) -> logits`, which only mlx-lm's own step uses (a sequence's
first token). The first call of either kind sees -1 (nothing sampled yet); each later one sees
the token sampled by the previous step.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import numpy as np


class RowMaskProcessor:
    _started = False  # set by row_mask once it has been called

    def row_mask(self, last_token: int, vocab: int) -> np.ndarray[Any, Any] | None:
        """Which of `vocab` tokens may come next (None: any)."""
        raise NotImplementedError

    def __call__(self, context: mx.array, logits: mx.array) -> mx.array:
        last = int(context[-1].item()) if self._started else -1  # type: ignore[arg-type]
        allowed = self.row_mask(last, logits.shape[-1])
        if allowed is None:
            return logits
        return mx.where(mx.array(allowed), logits, mx.array(-mx.inf, dtype=logits.dtype))
