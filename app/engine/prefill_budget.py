"""How many prompt tokens a step may prefill while other sequences are decoding.

mlx-lm's BatchGenerator runs one decode step for every running sequence and then one prefill
chunk (`prefill_step_size` tokens per prefilling row) in the same call, so every running stream
waits for that chunk before it gets its next token. A 2,048-token chunk costs many decode steps
on a CPU: the streams stall for seconds each time a long prompt arrives.

The budget: while sequences decode, a step's prefill may cost about `decode_steps` decode steps.
Whole-step wall times are measured (mlx-lm pipelines the decode step into the next call, so its
own decode/prompt timers split one cost between them): `decode` is the running average of steps
that only decoded, and a step that also prefilled is charged the rest of its time per prompt
token. The next chunk is the tokens that fit the budget at that rate (the first one at most
FIRST_CHUNK, then never more than twice the last: the rate was measured at the last chunk's
size, and per-token cost is higher for small chunks, so growing slowly keeps it honest).
With nothing decoding, prompts prefill at the full `max_chunk`: nobody waits on them.
"""

from __future__ import annotations

from dataclasses import dataclass

# Tokens per row at least: on a busy 2-core CPU one decode step of 8 rows costs about as much
# as 8 prompt tokens, so a floor of 16 alone made every step cost 3 decode steps.
MIN_CHUNK = 4
FIRST_CHUNK = 32  # tokens per row of the first chunk prefilled beside decoding rows
_SMOOTHING = 0.3  # weight of the newest sample in the running averages


@dataclass
class PrefillBudget:
    max_chunk: int  # `[engine] prefill_chunk`
    decode_steps: float  # `[engine] prefill_budget`; 0 turns the budget off
    decode_seconds: float | None = None  # running average of a decode-only step
    seconds_per_token: float | None = None  # running average of prefill cost per prompt token
    # The chunk of the last step that decoded and prefilled; None before the first such step,
    # whose chunk is FIRST_CHUNK at most (a rate measured on full-size chunks is optimistic).
    last_chunk: int | None = None

    def chunk(self, *, decoding: bool, rows: int = 1) -> int:
        """Prompt tokens per prefilling row for the next step."""
        if not decoding or self.decode_steps <= 0:
            return self.max_chunk
        cap = FIRST_CHUNK if self.last_chunk is None else 2 * self.last_chunk
        if self.decode_seconds is None or self.seconds_per_token is None:
            return min(self.max_chunk, cap)
        fits = self.decode_steps * self.decode_seconds / self.seconds_per_token / max(1, rows)
        return max(MIN_CHUNK, min(self.max_chunk, cap, int(fits)))

    def observe(self, *, seconds: float, decoded: bool, prompt_tokens: int,
                chunk: int) -> None:
        """Record one step: its wall time, whether it decoded, the prompt tokens it prefilled
        and the chunk it was given."""
        if decoded and prompt_tokens == 0:
            self.decode_seconds = _average(self.decode_seconds, seconds)
            return
        if prompt_tokens <= 0:
            return
        prefill = seconds - (self.decode_seconds or 0.0) if decoded else seconds
        if decoded:
            self.last_chunk = chunk
        self.seconds_per_token = _average(self.seconds_per_token,
                                          max(prefill, 0.0) / prompt_tokens)


def _average(current: float | None, sample: float) -> float:
    return sample if current is None else (1 - _SMOOTHING) * current + _SMOOTHING * sample
