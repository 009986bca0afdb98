"""Fit a conversation into a model's context by packing it (`overflow = "pack"`, issue 19).

Works on the protocol-neutral messages and tools, before templating, so chat completions,
Responses and Anthropic messages are packed the same way. In order, until the prompt fits:

1. drop the oldest turns, whole: a turn from a user message to the next one; inside the
   newest turn (an agent's loop is one long turn) the oldest exchanges, an assistant message
   with the tool results that answer it. A tool call never loses its result, or the reverse.
   Kept always: every system/developer message, the newest turn's user message(s) and the
   newest exchange;
2. shorten the middle of long tool outputs (head and tail kept, a marker between): the
   longest are cut first, to one common cap;
3. shorten tool descriptions and their arguments' descriptions (the beginning kept), to one
   common cap;
4. last, with the descriptions gone: shorten the middle of the kept user messages (an agent's
   newest message can be long: Claude Code's "resume" turn carries ~1.4k tokens of
   reminders), to one common cap.

Caps move in steps (OUTPUT_STEP, DESCRIPTION_STEP) so that consecutive turns of a conversation
keep the same cuts, and so the same prompt prefix for the prefix cache.

The tools themselves are never dropped, and the system prompt is never cut: what the client
set up stays. If all that is not enough, the caller answers "too long" as with `error`.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from app.core.types import ChatMessage, ToolSpec

OUTPUT_MARKER = "\n[... {n} tokens of this output cut by the gateway to fit the context ...]\n"
DESCRIPTION_MARKER = " [...]"
MIN_OUTPUT_TOKENS = 32  # a tool output is never cut shorter than this (head + tail)
# Caps move in steps, not to the last token: the next turn of the same conversation then
# mostly gets the same cuts, so the same prompt prefix, and the prefix cache still serves it.
OUTPUT_STEP = 64
DESCRIPTION_STEP = 16

# The prompt's token count for these messages and tools (the model's template rendered).
Count = Callable[[list[ChatMessage], list[ToolSpec]], int]


@dataclass(frozen=True)
class Tokens:
    encode: Callable[[str], list[int]]
    decode: Callable[[list[int]], str]


@dataclass(frozen=True)
class Packed:
    messages: list[ChatMessage]
    tools: list[ToolSpec]
    prompt_tokens: int  # after packing
    dropped_messages: int = 0
    cut_outputs: int = 0  # tool outputs shortened
    cut_descriptions: int = 0  # tool descriptions shortened (tools' and arguments')
    cut_messages: int = 0  # user messages shortened (the last resort)


def is_system(message: ChatMessage) -> bool:
    return message.role in ("system", "developer")


def droppable_units(messages: Sequence[ChatMessage]) -> list[list[int]]:
    """Indices of what may be dropped, oldest first: each earlier turn whole, then the newest
    turn's exchanges after its user message(s), except the newest exchange."""
    chat = [i for i, m in enumerate(messages) if not is_system(m)]
    starts = [n for n, i in enumerate(chat) if messages[i].role == "user"
              and (n == 0 or messages[chat[n - 1]].role != "user")]
    if not starts or starts[0] != 0:
        starts.insert(0, 0)  # whatever comes before the first user message is a turn too
    bounds = [*starts, len(chat)]
    turns = [chat[a:b] for a, b in itertools.pairwise(bounds) if a < b]
    if not turns:
        return []
    units = turns[:-1]
    last = turns[-1]
    lead = 0
    while lead < len(last) and messages[last[lead]].role == "user":
        lead += 1
    exchanges: list[list[int]] = []
    for i in last[lead:]:
        if messages[i].role == "assistant" or not exchanges:
            exchanges.append([i])
        else:  # tool results (and user notes) stay with the assistant message they follow
            exchanges[-1].append(i)
    return units + exchanges[:-1]


def _largest_fitting(low: int, high: int, fits: Callable[[int], bool]) -> int | None:
    """The largest value in [low, high] for which `fits` holds (monotonic), or None."""
    best = None
    while low <= high:
        middle = (low + high) // 2
        if fits(middle):
            best, low = middle, middle + 1
        else:
            high = middle - 1
    return best


def shorten_middle(text: str, cap: int, tokens: Tokens) -> str:
    """`text` cut to about `cap` tokens: its head and tail, with a marker that says how much
    went missing."""
    ids = tokens.encode(text)
    if len(ids) <= cap:
        return text
    head = cap // 2
    tail = cap - head
    cut = len(ids) - head - tail
    return (tokens.decode(ids[:head]) + OUTPUT_MARKER.format(n=cut)
            + tokens.decode(ids[len(ids) - tail:]))


def shorten_head(text: str, cap: int, tokens: Tokens) -> str:
    """`text` cut to its first `cap` tokens (nothing at all for 0)."""
    if cap <= 0:
        return ""
    ids = tokens.encode(text)
    if len(ids) <= cap:
        return text
    return tokens.decode(ids[:cap]).rstrip() + DESCRIPTION_MARKER


def _schema_descriptions(schema: Any, shorten: Callable[[str], str]) -> Any:
    """`schema` with every `description` string shortened (property names left alone)."""
    if isinstance(schema, list):
        return [_schema_descriptions(item, shorten) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key == "description" and isinstance(value, str):
            text = shorten(value)
            if text:
                out[key] = text
        elif key in ("properties", "$defs", "definitions") and isinstance(value, dict):
            out[key] = {name: _schema_descriptions(sub, shorten) for name, sub in value.items()}
        else:
            out[key] = _schema_descriptions(value, shorten)
    return out


def pack(messages: list[ChatMessage], tools: list[ToolSpec], limit: int, count: Count,
         tokens: Tokens) -> Packed | None:
    """The packed conversation whose prompt has at most `limit` tokens, or None if keeping
    the system prompt, the tools and the newest turn is already too much."""
    total = count(messages, tools)
    if total <= limit:
        return Packed(messages, tools, total)

    # 1. The oldest turns and exchanges, as few as will do.
    units = droppable_units(messages)

    def without(k: int) -> list[ChatMessage]:
        gone = {i for unit in units[:k] for i in unit}
        return [m for i, m in enumerate(messages) if i not in gone]

    counts: dict[int, int] = {0: total}

    def fits_dropping(k: int) -> bool:
        counts[k] = count(without(k), tools)
        return counts[k] <= limit

    # The fewest units to drop: the largest "kept" count that fits.
    kept = _largest_fitting(0, len(units) - 1, lambda keep: fits_dropping(len(units) - keep))
    dropped = len(units) - kept if kept is not None else len(units)
    kept_messages = without(dropped)
    dropped_messages = len(messages) - len(kept_messages)
    if kept is not None:
        return Packed(kept_messages, tools, counts[dropped], dropped_messages=dropped_messages)

    # 2. The middle of long tool outputs, all to one cap, the largest that fits.
    outputs = [i for i, m in enumerate(kept_messages) if m.role == "tool"]
    lengths = {i: len(tokens.encode(kept_messages[i].content)) for i in outputs}
    longest = max(lengths.values(), default=0)

    def capped(cap: int) -> list[ChatMessage]:
        return [dataclasses.replace(m, content=shorten_middle(m.content, cap, tokens))
                if i in lengths and lengths[i] > cap else m
                for i, m in enumerate(kept_messages)]

    cap = None
    if longest > MIN_OUTPUT_TOKENS:
        steps = _largest_fitting(1, (longest - 1) // OUTPUT_STEP,
                                 lambda k: count(capped(k * OUTPUT_STEP), tools) <= limit)
        cap = steps * OUTPUT_STEP if steps is not None else None
        if cap is None and count(capped(MIN_OUTPUT_TOKENS), tools) <= limit:
            cap = MIN_OUTPUT_TOKENS
        chosen = cap if cap is not None else MIN_OUTPUT_TOKENS
        kept_messages = capped(chosen)
        cut_outputs = sum(1 for n in lengths.values() if n > chosen)
    else:
        cut_outputs = 0
    if cap is not None:
        return Packed(kept_messages, tools, count(kept_messages, tools),
                      dropped_messages=dropped_messages, cut_outputs=cut_outputs)

    # 3. Tool descriptions (and their arguments'), all to one cap; 0 drops them.
    def described(cap: int) -> list[ToolSpec]:
        def shorten(text: str) -> str:
            return shorten_head(text, cap, tokens)

        return [dataclasses.replace(t, description=shorten(t.description),
                                    parameters=_schema_descriptions(t.parameters, shorten))
                for t in tools]

    texts = [t.description for t in tools]
    longest = max((len(tokens.encode(text)) for text in texts), default=0)
    longest = max(longest, _longest_schema_description(tools, tokens))
    steps = None
    if longest > 0:
        steps = _largest_fitting(0, (longest - 1) // DESCRIPTION_STEP, lambda k: count(
            kept_messages, described(k * DESCRIPTION_STEP)) <= limit)
    if steps is None:
        bare = described(0) if longest else tools
        cut = sum(1 for before, after in zip(tools, bare, strict=True) if before != after)
        return _cut_user_messages(kept_messages, bare, limit, count, tokens,
                                  Packed([], bare, 0, dropped_messages, cut_outputs, cut))
    desc_cap = steps * DESCRIPTION_STEP
    packed_tools = described(desc_cap)
    cut_descriptions = sum(1 for before, after in zip(tools, packed_tools, strict=True)
                           if before != after)
    return Packed(kept_messages, packed_tools, count(kept_messages, packed_tools),
                  dropped_messages=dropped_messages, cut_outputs=cut_outputs,
                  cut_descriptions=cut_descriptions)


def _longest_schema_description(tools: list[ToolSpec], tokens: Tokens) -> int:
    longest = [0]

    def measure(text: str) -> str:
        longest[0] = max(longest[0], len(tokens.encode(text)))
        return text

    for tool in tools:
        _schema_descriptions(tool.parameters, measure)
    return longest[0]


def _cut_user_messages(messages: list[ChatMessage], tools: list[ToolSpec], limit: int,
                       count: Count, tokens: Tokens, so_far: Packed) -> Packed | None:
    """Step 4: the middle of long user messages, all to one cap (the largest that fits);
    `so_far` counts what steps 1-3 cut."""
    users = {i: len(tokens.encode(m.content)) for i, m in enumerate(messages)
             if m.role == "user"}
    longest = max(users.values(), default=0)
    if longest <= MIN_OUTPUT_TOKENS:
        return None

    def capped(cap: int) -> list[ChatMessage]:
        return [dataclasses.replace(m, content=shorten_middle(m.content, cap, tokens))
                if users.get(i, 0) > cap else m for i, m in enumerate(messages)]

    steps = _largest_fitting(1, (longest - 1) // OUTPUT_STEP,
                             lambda k: count(capped(k * OUTPUT_STEP), tools) <= limit)
    if steps is not None:
        cap = steps * OUTPUT_STEP
    elif count(capped(MIN_OUTPUT_TOKENS), tools) <= limit:
        cap = MIN_OUTPUT_TOKENS
    else:
        return None
    packed = capped(cap)
    return dataclasses.replace(so_far, messages=packed, prompt_tokens=count(packed, tools),
                               cut_messages=sum(1 for n in users.values() if n > cap))
