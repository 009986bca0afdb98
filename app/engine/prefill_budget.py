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
FIRST_CHUNK per decode step of budget, then never more than twice the last: the rate was
measured at the last chunk's size, and per-token cost is higher for small chunks, so growing
slowly keeps it honest).
With nothing decoding, prompts prefill at the full `max_chunk`: nobody waits on them.

Only long prompts are chunked that way. A prompt of at most `long_prompt_tokens` new tokens is
prefilled whole in one step, beside the decoding rows (a step prefills at most that many such
tokens): sized to one decode step (4-32 tokens here), a 600-token chat prompt waited dozens of
steps for its first token and the 10-client level lost half its throughput. A long prompt
waiting behind whole ones joins once they are done (next step), then prefills by the budget.

Which waiting prompts join the prompt batch (`plan`): mlx-lm pads every row of a prefill
step to its longest, so 8 prompts of 40-600 tokens cost 8 x 600. A waiting prompt joins only
while the padding stays small (`PAD_SLACK`, `PAD_FREE_TOKENS`); the rest join next step, in
arrival order. Batching prefill rows saves little (prefill is compute-bound on a CPU and on a
GPU alike); padding costs all of it.
"""

from __future__ import annotations

from dataclasses import dataclass

# Tokens per row at least: on a busy 2-core CPU one decode step of 8 rows costs about as much
# as 8 prompt tokens, so a floor of 16 alone made every step cost 3 decode steps.
MIN_CHUNK = 4
# Tokens per row of the first chunk prefilled beside decoding rows, per decode step of budget
# (nothing is measured yet: 32 tokens cost about one decode step of 8 rows here).
FIRST_CHUNK = 32
_SMOOTHING = 0.3  # weight of the newest sample in the running averages
# A waiting prompt joins a prefill step while rows x longest <= PAD_SLACK x tokens + this.
PAD_SLACK = 1.25
PAD_FREE_TOKENS = 128  # tiny prompts batch freely: a step's fixed cost dwarfs their padding


@dataclass(frozen=True)
class PrefillPlan:
    chunk: int  # prompt tokens per prefilling row this step
    rows: int  # prompt rows this step: those already prefilling plus the waiting ones admitted
    budgeted: bool  # the chunk is the budget's (a long prompt beside decoding rows)


@dataclass
class PrefillBudget:
    max_chunk: int  # `[engine] prefill_chunk`
    decode_steps: float  # `[engine] prefill_budget`; 0 turns the budget off
    long_prompt_tokens: int = 1024  # `[engine] long_prompt_tokens`
    # Beside decoding rows a chunk never exceeds this: what the decode forward can carry
    # (scheduler.RIDER_MAX_TOKENS on the CPU backend); past it the cost per token jumps.
    max_decoding_chunk: int | None = None
    decode_seconds: float | None = None  # running average of a decode-only step
    seconds_per_token: float | None = None  # running average of prefill cost per prompt token
    # The chunk of the last step that decoded and prefilled; None before the first such step,
    # whose chunk is FIRST_CHUNK at most (a rate measured on full-size chunks is optimistic).
    last_chunk: int | None = None

    def chunk(self, *, decoding: bool, rows: int = 1) -> int:
        """Prompt tokens per prefilling row for the next step."""
        if not decoding or self.decode_steps <= 0:
            return self.max_chunk
        cap = (max(MIN_CHUNK, int(FIRST_CHUNK * self.decode_steps)) if self.last_chunk is None
               else 2 * self.last_chunk)
        if self.max_decoding_chunk is not None:
            cap = min(cap, self.max_decoding_chunk)
        if self.decode_seconds is None or self.seconds_per_token is None:
            return min(self.max_chunk, cap)
        fits = self.decode_steps * self.decode_seconds / self.seconds_per_token / max(1, rows)
        return max(MIN_CHUNK, min(self.max_chunk, cap, int(fits)))

    def plan(self, *, decoding: bool, prefilling: list[tuple[int, int]], waiting: list[int],
             max_rows: int) -> PrefillPlan:
        """This step's chunk and prompt rows. `prefilling`: (tokens left, new tokens in all)
        of each row already in the prompt batch; `waiting`: the new tokens of each queued
        prompt, in arrival order. A long prompt stays long to its last chunk."""
        budgeted = (decoding and self.decode_steps > 0
                    and any(n > self.long_prompt_tokens
                            for n in [total for _, total in prefilling] or waiting[:1]))
        if budgeted:
            rows = min(max_rows, len(prefilling) + len(waiting))
            chunk = self.chunk(decoding=True, rows=max(rows, 1))
        else:
            chunk = self.max_chunk
        step = [min(left, chunk) for left, _ in prefilling]
        # A row that needs more steps holds the batch anyway: padding to it is no extra wait.
        continuing = any(left > chunk for left, _ in prefilling)
        for n in waiting[:max(0, max_rows - len(prefilling))]:
            size = min(n, chunk)
            if step:
                total = sum(step) + size
                if decoding and not budgeted and (n > self.long_prompt_tokens
                                                  or total > self.long_prompt_tokens):
                    break  # beside decoding rows, whole prompts up to the limit per step
                padded = max(*step, size) * (len(step) + 1)
                if not continuing and padded > PAD_SLACK * total + PAD_FREE_TOKENS:
                    break  # too much padding: it joins next step
            step.append(size)
            continuing = continuing or n > chunk
        return PrefillPlan(chunk=chunk, rows=len(step), budgeted=budgeted)

    def observe(self, *, seconds: float, decoded: bool, prompt_tokens: int,
                chunk: int, budgeted: bool = True) -> None:
        """Record one step: its wall time, whether it decoded, the prompt tokens it prefilled,
        the chunk it was given and whether that chunk was the budget's."""
        if decoded and prompt_tokens == 0:
            self.decode_seconds = _average(self.decode_seconds, seconds)
            return
        if prompt_tokens <= 0 or (decoded and not budgeted):
            return  # whole short prompts at shallow depth say little of a long one's chunks
        prefill = seconds - (self.decode_seconds or 0.0) if decoded else seconds
        if decoded:
            self.last_chunk = chunk
        self.seconds_per_token = _average(self.seconds_per_token,
                                          max(prefill, 0.0) / prompt_tokens)


def _average(current: float | None, sample: float) -> float:
    return sample if current is None else (1 - _SMOOTHING) * current + _SMOOTHING * sample
