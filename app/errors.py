"""One exception tree, raised anywhere, rendered at the edge in the caller's protocol.

OpenAI:    {"error": {"message", "type", "param", "code"}}  (all four keys, code a str or null)
Anthropic: {"type": "error", "error": {"type", "message"}}
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

Protocol = Literal["openai", "anthropic"]


class GatewayError(Exception):
    status: ClassVar[int] = 500
    openai_type: ClassVar[str] = "server_error"
    anthropic_type: ClassVar[str] = "api_error"
    default_code: ClassVar[str | None] = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after: float | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code or self.default_code
        self.retry_after = retry_after
        self.headers = dict(headers or {})

    def response_headers(self) -> dict[str, str]:
        headers = dict(self.headers)
        if self.retry_after is not None:
            # Above 60 s some SDK versions give up at once instead of waiting.
            seconds = max(1, min(60, round(self.retry_after)))
            headers["Retry-After"] = str(seconds)
            headers["retry-after-ms"] = str(seconds * 1000)
        return headers

    def openai_body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.openai_type,
                          "param": self.param, "code": self.code}}

    def anthropic_body(self) -> dict[str, Any]:
        return {"type": "error", "error": {"type": self.anthropic_type, "message": self.message}}

    def body(self, protocol: Protocol) -> dict[str, Any]:
        return self.anthropic_body() if protocol == "anthropic" else self.openai_body()


class InvalidRequest(GatewayError):
    status = 400
    openai_type = "invalid_request_error"
    anthropic_type = "invalid_request_error"


class ContextLengthExceeded(InvalidRequest):
    default_code = "context_length_exceeded"

    def __init__(self, message: str, *, prompt_tokens: int | None = None,
                 maximum: int | None = None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.prompt_tokens = prompt_tokens
        self.maximum = maximum

    def anthropic_body(self) -> dict[str, Any]:
        if self.prompt_tokens is None or self.maximum is None:
            return super().anthropic_body()
        # The exact wording Claude Code looks for before it compacts its history.
        return {"type": "error", "error": {
            "type": self.anthropic_type,
            "message": f"prompt is too long: {self.prompt_tokens} tokens > {self.maximum} maximum",
        }}


class AuthenticationFailed(GatewayError):
    status = 401
    openai_type = "invalid_request_error"
    anthropic_type = "authentication_error"
    default_code = "invalid_api_key"


class PermissionDenied(GatewayError):
    status = 403
    openai_type = "invalid_request_error"
    anthropic_type = "permission_error"
    default_code = "permission_denied"


class NotFound(GatewayError):
    status = 404
    openai_type = "invalid_request_error"
    anthropic_type = "not_found_error"
    default_code = "not_found"


class ModelNotFound(NotFound):
    default_code = "model_not_found"


class MethodNotAllowed(GatewayError):
    status = 405
    openai_type = "invalid_request_error"
    anthropic_type = "invalid_request_error"
    default_code = "method_not_allowed"


class Conflict(GatewayError):
    status = 409
    openai_type = "invalid_request_error"
    anthropic_type = "invalid_request_error"
    default_code = "conflict"


class PayloadTooLarge(GatewayError):
    status = 413
    openai_type = "invalid_request_error"
    anthropic_type = "request_too_large"
    default_code = "request_too_large"


class RateLimited(GatewayError):
    status = 429
    openai_type = "rate_limit_error"
    anthropic_type = "rate_limit_error"
    default_code = "rate_limit_exceeded"


class EngineFailure(GatewayError):
    """Generation broke inside the engine; the request cannot be completed."""


class ModelLoadFailed(GatewayError):
    status = 503
    openai_type = "server_error"
    anthropic_type = "api_error"
    default_code = "model_load_failed"


class Overloaded(GatewayError):
    status = 503
    openai_type = "server_error"
    anthropic_type = "overloaded_error"
    default_code = "overloaded"


class StoreUnavailable(GatewayError):
    """The response store (Redis) did not answer in time or failed."""

    status = 503
    openai_type = "server_error"
    anthropic_type = "api_error"
    default_code = "store_unavailable"


class InsufficientMemory(GatewayError):
    status = 507
    openai_type = "server_error"
    anthropic_type = "api_error"
    default_code = "insufficient_memory"


def protocol_for_path(path: str) -> Protocol:
    """Which wire protocol an error on this path must be rendered in."""
    return "anthropic" if path.startswith("/v1/messages") else "openai"


class ClientDisconnected(GatewayError):
    """The client went away before a non-stream answer was ready. Not a server error: the
    access log shows 499 (nginx's "client closed request"), and nothing reaches the client."""

    status = 499
    openai_type = "client_disconnected"
    anthropic_type = "api_error"
