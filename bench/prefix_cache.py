"""The multi-turn scenario: TTFT of a conversation's first turn vs its second turn.

The history (~1,000 tokens) starts with a fresh nonce on every repetition so the first turn
can never hit a cache left by an earlier run; the second turn resends the same history plus
the first exchange, which a prefix cache should not prefill again.
"""

from __future__ import annotations

import random
import statistics
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from app.ops.bench import chat_url, stream_chat

Messages = list[dict[str, Any]]
TokenCounter = Callable[[Messages], int]

_COLORS = ["red", "green", "amber", "violet", "grey", "golden", "pale", "dark"]
_THINGS = ["fox", "heron", "otter", "lynx", "crane", "badger", "seal", "wren"]
_PLACES = ["harbour", "orchard", "quarry", "marsh", "library", "bridge", "mill", "ridge"]
_ITEMS = ["lanterns", "letters", "stones", "apples", "ropes", "maps", "keys", "shells"]


def token_counter(model_dir: Path) -> TokenCounter:
    """Count prompt tokens with the model's own chat template; a rough estimate otherwise."""
    try:
        from transformers import AutoTokenizer  # the dependency mlx_lm already brings

        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))

        def count(messages: Messages) -> int:
            # Render then encode: apply_chat_template's tokenized return type varies by version.
            text = tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=False
            )
            return len(tokenizer.encode(text, add_special_tokens=False))

        count([{"role": "user", "content": "probe"}])
        return count
    except Exception:  # any tokenizer trouble falls back to the estimate
        return lambda messages: sum(len(str(m.get("content", ""))) for m in messages) // 4


def _note(rng: random.Random, index: int) -> str:
    return (
        f"Note {index}: the {rng.choice(_COLORS)} {rng.choice(_THINGS)} near the "
        f"{rng.choice(_PLACES)} carried {rng.randint(2, 99)} {rng.choice(_ITEMS)}."
    )


def build_history(target_tokens: int, count: TokenCounter, nonce: str) -> Messages:
    """System prompt plus user/assistant exchanges of varied notes, grown to ~target tokens."""
    rng = random.Random(nonce)
    history: Messages = [
        {"role": "system", "content": f"Session {nonce}. You keep a logbook of notes."}
    ]
    index = 0
    while count(history) < target_tokens:
        if index > 4 * target_tokens:  # a counter that never grows must not loop forever
            raise RuntimeError("token counter does not grow with the history")
        notes = " ".join(_note(rng, index + i) for i in range(4))
        index += 4
        history.append({"role": "user", "content": f"Please log these. {notes}"})
        history.append({"role": "assistant", "content": f"Logged notes {index - 4}-{index - 1}."})
    return history


@dataclass
class PrefixResult:
    history_tokens: int
    first_ttft: float  # median over repetitions, seconds
    second_ttft: float
    first_prompt_tokens: int | None
    second_prompt_tokens: int | None
    repeats: int

    @property
    def ratio(self) -> float:
        return self.second_ttft / self.first_ttft


async def first_vs_second_turn(
    base_url: str,
    *,
    model: str,
    count: TokenCounter,
    history_tokens: int = 1000,
    repeats: int = 3,
    max_tokens: int = 24,
    api_key: str | None = None,
) -> PrefixResult:
    url = chat_url(base_url)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    firsts: list[float] = []
    seconds: list[float] = []
    prompt_sizes: list[tuple[int | None, int | None]] = []
    measured = 0
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0)) as client:

        async def turn(messages: Messages) -> tuple[float, str, int | None]:
            body = {"model": model, "messages": messages, "max_tokens": max_tokens,
                    "temperature": 0.0, "stream": True,
                    "stream_options": {"include_usage": True}}
            result = await stream_chat(client, url, body, headers)
            if not result.ok or result.ttft is None:
                raise RuntimeError(f"prefix-cache turn failed: {result.error}")
            return result.ttft, result.text, result.prompt_tokens

        for _ in range(repeats):
            history = build_history(history_tokens, count, uuid.uuid4().hex)
            measured = count(history)
            first_messages = [*history, {"role": "user", "content": "Which animals were logged?"}]
            first, answer, first_prompt = await turn(first_messages)
            second_messages = [
                *first_messages,
                {"role": "assistant", "content": answer},
                {"role": "user", "content": "And which places?"},
            ]
            second, _, second_prompt = await turn(second_messages)
            firsts.append(first)
            seconds.append(second)
            prompt_sizes.append((first_prompt, second_prompt))
    return PrefixResult(
        history_tokens=measured,
        first_ttft=statistics.median(firsts),
        second_ttft=statistics.median(seconds),
        first_prompt_tokens=prompt_sizes[-1][0],
        second_prompt_tokens=prompt_sizes[-1][1],
        repeats=repeats,
    )
