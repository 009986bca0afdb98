"""The one internal request and event vocabulary every wire protocol translates to.

Plain dataclasses, no I/O: nothing below `api/` knows which protocol a request came in on.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

Role = Literal["system", "developer", "user", "assistant", "tool"]
FinishReason = Literal["stop", "length", "tool_calls", "cancelled", "error"]


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float | None = None
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)
    # May verify prompt-lookup drafts (extra body field `speculative`: "auto" | "off"); the
    # output's distribution is the same either way, only its speed differs.
    speculative: bool = True
    # Fields the client left out: the model's own defaults may fill them (`with_defaults`).
    unset: frozenset[str] = frozenset()

    def with_defaults(self, defaults: Mapping[str, float]) -> SamplingParams:
        chosen: dict[str, Any] = {name: int(value) if name == "top_k" else value
                                  for name, value in defaults.items() if name in self.unset}
        return replace(self, **chosen) if chosen else self


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # a JSON document, as the wire protocols carry it


@dataclass(frozen=True)
class ChatMessage:
    role: Role
    content: str = ""
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None
    name: str | None = None


@dataclass(frozen=True)
class ToolSpec:
    name: str
    description: str = ""
    parameters: dict[str, Any] = field(default_factory=dict)
    strict: bool = False  # arguments constrained to `parameters` even when the call is free


@dataclass(frozen=True)
class JsonConstraint:
    """The whole answer is one JSON document: any object (`schema` None) or one matching it."""

    schema: dict[str, Any] | None
    param: str  # the request field an error names ("response_format", "text.format")


@dataclass(frozen=True)
class ToolCallConstraint:
    """Calls in the generic `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` format.

    `forced` (tool_choice required or a named function): the answer is only calls, each naming
    one of `tools` with arguments matching its `parameters`. Otherwise the text is free and
    only a call the model starts is constrained (the arguments of `strict` tools).
    """

    tools: tuple[ToolSpec, ...]
    forced: bool
    parallel: bool = True
    param: str = "tools"
    max_calls: int | None = None  # Responses' max_tool_calls

    @property
    def call_limit(self) -> int | None:
        return 1 if not self.parallel else self.max_calls


Constraint = JsonConstraint | ToolCallConstraint


@dataclass
class GenerationRequest:
    """What to generate. Exactly one of `messages` (chat) or `prompt` (raw text) is set."""

    model: str
    request_id: str
    messages: list[ChatMessage] | None = None
    prompt: str | None = None
    max_tokens: int | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: list[str] = field(default_factory=list)
    tools: list[ToolSpec] = field(default_factory=list)
    tool_choice: str | dict[str, Any] | None = None  # auto/required/none or a named call
    constraint: Constraint | None = None  # enforced by a grammar while decoding
    logprobs: int | None = None  # None: none; N >= 0: the chosen token's and the top N
    # Passed to the chat template as keyword arguments (e.g. enable_thinking); `reasoning_effort`
    # is how the Responses/chat `reasoning.effort` reaches templates that read it.
    template_kwargs: dict[str, Any] = field(default_factory=dict)
    reasoning_budget: int | None = None  # most tokens a chat answer may spend thinking
    # The key it runs for (None: no key): the per-key in-flight cap counts by it, and prefix-cache
    # reuse never crosses owners (`cached_tokens` would reveal what another key sent); every
    # keyless (loopback) client is one owner.
    owner: str | None = None
    # A prompt bigger than the context: "error" or "pack"; None = the model's policy. Set by a
    # request that says so (Responses truncation "disabled") or, later, by a route.
    overflow: Literal["error", "pack"] | None = None
    # Seconds it may wait for an admission slot before Overloaded (None: as long as the queue
    # allows). A route's local target sets it, so a saturated engine passes the request on to
    # the next target instead of queueing it (app/targets).
    queue_wait: float | None = None


@dataclass(frozen=True)
class TextDelta:
    text: str


@dataclass(frozen=True)
class TokenLogprob:
    token: str
    logprob: float
    bytes: tuple[int, ...]
    top: tuple[tuple[str, float, tuple[int, ...]], ...] = ()  # (token, logprob, bytes)


@dataclass(frozen=True)
class LogprobsDelta:
    """Log-probabilities of generated tokens, for requests that ask; text comes separately."""

    tokens: tuple[TokenLogprob, ...]


@dataclass(frozen=True)
class ReasoningDelta:
    """Text the model wrote inside its reasoning (think) block: never part of the content."""

    text: str


@dataclass(frozen=True)
class ToolCallDelta:
    index: int
    arguments: str
    id: str | None = None  # set on the first delta of a call, with `name`
    name: str | None = None


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    reasoning_tokens: int = 0  # of completion_tokens, those written inside think blocks

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class Finish:
    reason: FinishReason
    usage: Usage
    stop_sequence: str | None = None  # which stop string ended it, when one did


@dataclass(frozen=True)
class Failed:
    """The generation broke after it started; `error` is a GatewayError."""

    error: Exception


GenerationEvent = (TextDelta | ReasoningDelta | ToolCallDelta | LogprobsDelta | Finish
                   | Failed)
