"""Request schema of the Anthropic Messages API, and its translation to a GenerationRequest.

Unknown fields (`context_management`, `output_config`, `cache_control`, beta features) are
ignored; what cannot be honoured on a local text model (images, documents) is refused with a
400 that names the block.
"""

from __future__ import annotations

import fnmatch
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from app.api.openai.schema import unset_fields
from app.core.types import ChatMessage, SamplingParams, ToolCall, ToolSpec
from app.errors import InvalidRequest
from app.settings import DEFAULT_MODEL_TARGET

# Thinking blocks from an earlier turn carry the model's reasoning, which templates drop from
# history anyway; server-side tool blocks describe work this server never did.
_SKIPPED_BLOCKS = frozenset({"thinking", "redacted_thinking"})
_UNSUPPORTED_MEDIA = frozenset({"image", "document", "search_result", "container_upload"})


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class Block(_Lenient):
    """Any content block; which fields matter depends on `type`."""

    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None
    id: str | None = None
    name: str | None = None
    input: Any = None
    tool_use_id: str | None = None
    content: str | list[Block] | None = None
    is_error: bool = False


class MessageIn(_Lenient):
    # Claude Code >= 2.1.154 puts a `system` message inside the conversation.
    role: Literal["user", "assistant", "system"]
    content: str | list[Block]


class ToolIn(_Lenient):
    name: str = Field(min_length=1, max_length=128)
    description: str = ""
    input_schema: dict[str, Any] = Field(default_factory=dict)
    type: str | None = None  # None or "custom": a client tool; anything else is server-side


class ToolChoiceIn(_Lenient):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool = False


class ThinkingIn(_Lenient):
    type: Literal["enabled", "disabled", "adaptive", "between_tools"]
    budget_tokens: int | None = Field(None, ge=1)


class OutputFormatIn(_Lenient):
    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")


class OutputConfigIn(_Lenient):
    # How hard a reasoning model should think; models without reasoning have nothing to tune.
    effort: str | None = None
    format: OutputFormatIn | None = None


class MetadataIn(_Lenient):
    user_id: str | None = None


class CountTokensRequest(_Lenient):
    """What /v1/messages/count_tokens takes: a message request without max_tokens."""

    model: str = Field(min_length=1, max_length=256)
    messages: list[MessageIn] = Field(min_length=1)
    system: str | list[Block] | None = None
    tools: list[ToolIn] | None = None
    tool_choice: ToolChoiceIn | None = None
    thinking: ThinkingIn | None = None

    def internal_messages(self) -> list[ChatMessage]:
        out: list[ChatMessage] = []
        if self.system:
            out.append(ChatMessage("system", _text(self.system, "system")))
        for i, message in enumerate(self.messages):
            out.extend(_translate(message, i))
        return out

    def client_tools(self) -> list[ToolIn]:
        return [t for t in self.tools or [] if t.type in (None, "custom")]

    def tool_specs(self) -> list[ToolSpec]:
        if self.tool_choice is not None and self.tool_choice.type == "none":
            return []
        return [ToolSpec(t.name, t.description, t.input_schema) for t in self.client_tools()]

    def template_kwargs(self) -> dict[str, Any]:
        """`thinking` as the chat template's switch (Qwen3-style `enable_thinking`); adaptive
        and between_tools leave the model's own default."""
        if self.thinking is None or self.thinking.type not in ("enabled", "disabled"):
            return {}
        return {"enable_thinking": self.thinking.type == "enabled"}

    def dropped_tools(self) -> list[str]:
        """Server-side tools (web search, code execution, ...) this gateway cannot run."""
        return [t.name for t in self.tools or [] if t.type not in (None, "custom")]


class MessagesRequest(CountTokensRequest):
    max_tokens: int = Field(ge=1)
    stop_sequences: list[str] | None = Field(None, max_length=16)
    stream: bool = False
    temperature: float | None = Field(None, ge=0, le=1)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    metadata: MetadataIn | None = None
    output_config: OutputConfigIn | None = None
    speculative: Literal["auto", "off"] = Field(
        "auto", description="Speculative decoding (prompt-lookup drafts) for this request: "
        "auto (the server's setting) or off.")

    def sampling(self) -> SamplingParams:
        return SamplingParams(
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=self.top_p or 1.0,
            top_k=self.top_k or 0,
            speculative=self.speculative == "auto",
            unset=unset_fields(self),
        )

    def stop_list(self) -> list[str]:
        return [s for s in self.stop_sequences or [] if s]

    def reasoning_budget(self) -> int | None:
        """`thinking.budget_tokens` of an enabled thinking block: the most tokens the answer
        may think for. Like Anthropic's API, it must leave room for the answer."""
        thinking = self.thinking
        if thinking is None or thinking.type != "enabled" or thinking.budget_tokens is None:
            return None
        if thinking.budget_tokens >= self.max_tokens:
            raise InvalidRequest(
                f"`max_tokens` must be greater than `thinking.budget_tokens` "
                f"({self.max_tokens} <= {thinking.budget_tokens})",
                param="thinking.budget_tokens")
        return thinking.budget_tokens


def resolve_model(name: str, patterns: dict[str, str], default_id: str | None) -> str:
    """Claude clients ask for claude-* ids; `[anthropic] models` maps them to local names."""
    for pattern, target in patterns.items():
        if fnmatch.fnmatchcase(name, pattern):
            if target == DEFAULT_MODEL_TARGET:
                return default_id or name
            return target
    return name


def _translate(message: MessageIn, index: int) -> list[ChatMessage]:
    where = f"messages[{index}].content"
    if isinstance(message.content, str):
        return [ChatMessage(message.role, message.content)]
    if message.role == "system":
        return [ChatMessage("system", _text(message.content, where))]
    texts: list[str] = []
    calls: list[ToolCall] = []
    results: list[ChatMessage] = []
    for j, block in enumerate(message.content):
        at = f"{where}[{j}]"
        if block.type == "text":
            texts.append(block.text or "")
        elif block.type == "tool_use" and message.role == "assistant":
            if not block.id or not block.name:
                raise InvalidRequest(f"{at}: a tool_use block needs an id and a name",
                                     param=at)
            calls.append(ToolCall(block.id, block.name, json.dumps(block.input or {})))
        elif block.type == "tool_result" and message.role == "user":
            if not block.tool_use_id:
                raise InvalidRequest(f"{at}: a tool_result block needs a tool_use_id",
                                     param=f"{at}.tool_use_id")
            output = _text(block.content or "", f"{at}.content")
            results.append(ChatMessage("tool", f"Error: {output}" if block.is_error else output,
                                       tool_call_id=block.tool_use_id))
        elif block.type in _SKIPPED_BLOCKS:
            continue
        elif block.type in _UNSUPPORTED_MEDIA:
            raise InvalidRequest(
                f"{at}: content block type {block.type!r} is not supported: the models served "
                "here read text only. Send the content as text blocks.", param=f"{at}.type")
        else:
            raise InvalidRequest(
                f"{at}: content block type {block.type!r} is not supported in a "
                f"{message.role} message here", param=f"{at}.type")
    out = list(results)  # tool results answer the previous assistant turn: they come first
    if texts or calls or not results:
        out.append(ChatMessage(message.role, "".join(texts), tool_calls=tuple(calls)))
    return out


def _text(content: str | list[Block], where: str) -> str:
    if isinstance(content, str):
        return content
    parts = []
    for i, block in enumerate(content):
        if block.type != "text":
            raise InvalidRequest(
                f"{where}[{i}]: block type {block.type!r} is not supported here; send text "
                "blocks", param=f"{where}[{i}].type")
        parts.append(block.text or "")
    return "\n\n".join(parts) if where == "system" else "".join(parts)
