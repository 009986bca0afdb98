"""Token log-probabilities in the OpenAI wire shapes: chat (and Responses) entries, and the
legacy completions arrays."""

from __future__ import annotations

from typing import Any

from app.core.types import TokenLogprob


def chat_entries(tokens: list[TokenLogprob]) -> list[dict[str, Any]]:
    """Chat's `logprobs.content` (Responses' `output_text.logprobs` has the same entries)."""
    return [{
        "token": t.token, "logprob": t.logprob, "bytes": list(t.bytes),
        "top_logprobs": [{"token": text, "logprob": value, "bytes": list(raw)}
                         for text, value, raw in t.top],
    } for t in tokens]


def chat_logprobs(tokens: list[TokenLogprob]) -> dict[str, Any]:
    return {"content": chat_entries(tokens), "refusal": None}


def completion_logprobs(tokens: list[TokenLogprob], offset: int = 0) -> dict[str, Any]:
    """/v1/completions' `logprobs`: parallel arrays; `offset` is where the text starts (after
    an echoed prompt, or after the chunks streamed before)."""
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t.token)
    return {
        "tokens": [t.token for t in tokens],
        "token_logprobs": [t.logprob for t in tokens],
        "top_logprobs": [{text: value for text, value, _ in t.top} for t in tokens],
        "text_offset": offsets,
    }
