"""Request schemas for the OpenAI chat and text completion routes.

Unknown fields are ignored (SDKs and agents send plenty); only what is invalid is rejected,
and the error names the field.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from app.core.types import (
    ChatMessage,
    Constraint,
    JsonConstraint,
    SamplingParams,
    ToolCall,
    ToolCallConstraint,
    ToolSpec,
)
from app.errors import InvalidRequest


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ContentPart(_Lenient):
    type: str
    text: str | None = None


class FunctionCallIn(_Lenient):
    name: str
    arguments: str | dict[str, Any] = "{}"


class ToolCallIn(_Lenient):
    id: str = ""
    type: Literal["function"] = "function"
    function: FunctionCallIn


class MessageIn(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None

    def to_internal(self, index: int) -> ChatMessage:
        calls = tuple(
            ToolCall(
                id=c.id,
                name=c.function.name,
                arguments=c.function.arguments if isinstance(c.function.arguments, str)
                else json.dumps(c.function.arguments),
            )
            for c in self.tool_calls or []
        )
        return ChatMessage(
            role=self.role, content=_text_of(self.content, f"messages[{index}].content"),
            tool_calls=calls, tool_call_id=self.tool_call_id, name=self.name,
        )


def _text_of(content: str | list[ContentPart] | None, where: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    texts = []
    for i, part in enumerate(content):
        if part.type in ("text", "input_text", "output_text") and part.text is not None:
            texts.append(part.text)
        else:
            raise InvalidRequest(
                f"{where}[{i}]: content part type {part.type!r} is not supported; "
                "this server accepts text parts only",
                param=f"{where}[{i}].type",
            )
    return "".join(texts)


class FunctionSpecIn(_Lenient):
    name: str = Field(min_length=1, max_length=64)
    description: str = ""
    parameters: dict[str, Any] = Field(default_factory=dict)
    strict: bool | None = None


class ToolIn(_Lenient):
    type: Literal["function"]
    function: FunctionSpecIn


class NamedFunction(_Lenient):
    name: str


class NamedToolChoice(_Lenient):
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaSpec(_Lenient):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    name: str = Field(min_length=1, max_length=64)
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    description: str | None = None
    strict: bool | None = None


class ResponseFormat(_Lenient):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type json_schema needs `json_schema` with `name` and `schema`")
        return self

    def constraint(self) -> JsonConstraint | None:
        if self.type == "text":
            return None
        if self.type == "json_object":
            return JsonConstraint(schema=None, param="response_format")
        assert self.json_schema is not None
        # Not strict still means JSON of that shape: enforcing it is the better answer.
        return JsonConstraint(schema=self.json_schema.schema_ or {},
                              param="response_format.json_schema.schema")


class StreamOptions(_Lenient):
    include_usage: bool = False


SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # what an int64 or uint64 seed field can carry
MAX_LOGIT_BIAS = 1024  # entries; each one is a column touched on every step


DEFAULTABLE = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def unset_fields(body: BaseModel) -> frozenset[str]:
    """The sampling fields a request left out, for the model's defaults to fill."""
    return frozenset(name for name in DEFAULTABLE if getattr(body, name, None) is None)


class SamplingFields(_Lenient):
    """Fields shared by chat and text completions.

    Every sampling value is checked here, at the door, so that no request can make the
    batched decode step fail for the others; what depends on the model (top_k and
    logit_bias token ids against its vocabulary) is checked by the engine before it starts.
    """

    model: str = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0, le=1)
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    stop: str | list[str] | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0, le=10, allow_inf_nan=False)
    logit_bias: dict[str, float] | None = Field(
        None, max_length=MAX_LOGIT_BIAS,
        description="Token id (as a string) -> bias in [-100, 100], added to its logit.")
    n: int = Field(1, ge=1, le=1, description="Only one choice per request is generated.")
    speculative: Literal["auto", "off"] = Field(
        "auto", description="Speculative decoding (prompt-lookup drafts) for this request: "
        "auto (the server's setting) or off.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _at_most_four(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > 4:
            raise ValueError("at most 4 stop sequences")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _token_ids_and_biases(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for token, bias in (value or {}).items():
            if not token.isascii() or not token.isdigit() or len(token) > 12:
                raise ValueError(f"keys must be token ids (non-negative integers), got {token!r}")
            if not -100 <= bias <= 100:  # also refuses NaN
                raise ValueError(f"biases must be in [-100, 100], got {bias} for {token}")
        return value

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def sampling(self) -> SamplingParams:
        return SamplingParams(
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=self.top_p or 1.0,
            top_k=self.top_k or 0,
            min_p=self.min_p or 0.0,
            # Negative seeds (int64 senders) map onto the same 64 bits MLX keys take.
            seed=None if self.seed is None else self.seed % 2**64,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=self.repetition_penalty,
            logit_bias=tuple((int(t), float(b)) for t, b in (self.logit_bias or {}).items()),
            speculative=self.speculative == "auto",
            unset=unset_fields(self),
        )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(SamplingFields):
    messages: list[MessageIn] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[ToolIn] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None  # None: allowed, as OpenAI's default
    response_format: ResponseFormat | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    # Known OpenAI fields this server can't honour: refused by name rather than dropped.
    functions: Any = None
    function_call: Any = None
    audio: Any = None
    modalities: list[str] | None = None
    web_search_options: Any = None

    @model_validator(mode="after")
    def _consistent(self) -> ChatCompletionRequest:
        for field, hint in (("functions", "send `tools`"), ("function_call", "send `tool_choice`"),
                            ("audio", "this server generates text only"),
                            ("web_search_options", "this server cannot search the web")):
            if getattr(self, field) is not None:
                raise ValueError(f"`{field}` is not supported: {hint}")
        if self.modalities is not None and set(self.modalities) - {"text"}:
            raise ValueError("`modalities`: this server generates text only")
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        choice = self.tool_choice
        if (choice == "required" or isinstance(choice, NamedToolChoice)) and not self.tools:
            raise ValueError("tool_choice forces a call but `tools` is empty")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in {
            t.function.name for t in self.tools or []
        }:
            raise ValueError(f"tool_choice names function {choice.function.name!r}, which is "
                             "not in `tools`")
        return self

    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    def template_kwargs(self) -> dict[str, Any]:
        """What reaches the chat template: the client's kwargs, and the reasoning effort."""
        kwargs = dict(self.chat_template_kwargs or {})
        if self.reasoning_effort is not None:
            kwargs.setdefault("reasoning_effort", self.reasoning_effort)
        reserved = {"messages", "tools", "add_generation_prompt", "tokenize"} & set(kwargs)
        if reserved:
            raise InvalidRequest(f"chat_template_kwargs: {sorted(reserved)[0]!r} is set by the "
                                 "gateway", param="chat_template_kwargs")
        return kwargs

    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def internal_messages(self) -> list[ChatMessage]:
        return [m.to_internal(i) for i, m in enumerate(self.messages)]

    def tool_specs(self) -> list[ToolSpec]:
        """The tools the model is shown: none for tool_choice "none", only the named one for a
        named choice."""
        tools = self.tools or []
        if self.tool_choice == "none":
            return []
        if isinstance(self.tool_choice, NamedToolChoice):
            tools = [t for t in tools if t.function.name == self.tool_choice.function.name]
        return [
            ToolSpec(t.function.name, t.function.description, t.function.parameters,
                     strict=bool(t.function.strict))
            for t in tools
        ]

    def tool_choice_internal(self) -> str | dict[str, Any] | None:
        if isinstance(self.tool_choice, NamedToolChoice):
            return {"type": "function", "function": {"name": self.tool_choice.function.name}}
        return self.tool_choice

    def constraint(self) -> Constraint | None:
        """What decoding must obey: a forced call, then a response_format, then strict tools."""
        tools = tuple(self.tool_specs())  # only the named tool for a named choice
        forced = self.tool_choice == "required" or isinstance(self.tool_choice, NamedToolChoice)
        if tools and forced:
            return ToolCallConstraint(tools=tools, forced=True,
                                      parallel=self.parallel_tool_calls is not False,
                                      param="tool_choice",
                                      max_calls=self._max_calls())
        if self.response_format is not None:
            json_constraint = self.response_format.constraint()
            if json_constraint is not None:
                return json_constraint
        if any(t.strict for t in tools) or (tools and self.parallel_tool_calls is False) or (
                tools and self._max_calls() is not None):
            # Armed only when the model starts a call: strict arguments, and the call count.
            return ToolCallConstraint(tools=tools, forced=False,
                                      parallel=self.parallel_tool_calls is not False, param="tools",
                                      max_calls=self._max_calls())
        return None

    def _max_calls(self) -> int | None:
        return None  # chat has no max_tool_calls

    def logprobs_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(SamplingFields):
    prompt: str | list[str] = Field(description="A string (a one-element list is accepted too).")
    echo: bool = False
    suffix: str | None = None
    logprobs: int | None = Field(None, ge=0, le=20)
    best_of: int | None = Field(None, ge=1, le=1, description="Only one candidate is generated.")

    @model_validator(mode="after")
    def _supported(self) -> CompletionRequest:
        if self.suffix:
            raise ValueError("suffix (insertion) is not supported by this server")
        if self.echo and self.logprobs is not None:
            raise ValueError("logprobs of an echoed prompt are not supported; drop echo or "
                             "logprobs")
        return self

    def prompt_text(self) -> str:
        if isinstance(self.prompt, str):
            return self.prompt
        if len(self.prompt) != 1:
            raise InvalidRequest(
                "prompt: send one prompt per request (a string or a one-element list)",
                param="prompt",
            )
        return self.prompt[0]
