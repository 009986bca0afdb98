"""Every failure leaves as a JSON body in the caller's protocol, never as a bare 500 page."""

from __future__ import annotations

from typing import Any

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from app.activity import note_refusal
from app.errors import (
    EngineFailure as InternalError,
)
from app.errors import (
    GatewayError,
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
    protocol_for_path,
)

log = structlog.get_logger(__name__)
NESTED_TOO_DEEPLY = "The request body is nested too deeply to process."


def error_response(error: GatewayError, path: str) -> JSONResponse:
    return JSONResponse(error.body(protocol_for_path(path)), status_code=error.status,
                        headers=error.response_headers())


def _validation_error(error: RequestValidationError) -> InvalidRequest:
    problems = error.errors()
    first = problems[0] if problems else {"loc": (), "msg": "invalid request", "type": ""}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    field = ".".join(loc) or None
    if first.get("type") == "json_invalid":
        ctx: Any = first.get("ctx") or {}
        detail = str(ctx.get("error", "")).strip()
        return InvalidRequest(f"The request body is not valid JSON: {detail}".strip(": "))
    if first.get("type") == "model_attributes_type" or (not loc and "dict" in first["msg"]):
        return InvalidRequest("The request body must be a JSON object.")
    message = f"{field}: {first['msg']}" if field else str(first["msg"])
    more = len(problems) - 1
    if more > 0:
        message += f" (and {more} more problem{'s' if more > 1 else ''})"
    return InvalidRequest(message, param=field)


def _refuse(request: Request, error: GatewayError) -> JSONResponse:
    note_refusal(request.scope.setdefault("state", {}), error)
    return error_response(error, request.url.path)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(GatewayError)
    async def _gateway(request: Request, error: GatewayError) -> JSONResponse:
        return _refuse(request, error)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        return _refuse(request, _validation_error(error))

    @app.exception_handler(HTTPException)
    async def _http(request: Request, error: HTTPException) -> JSONResponse:
        mapped: GatewayError
        if error.status_code == 404:
            mapped = NotFound(f"No route for {request.method} {request.url.path}.")
        elif error.status_code == 405:
            mapped = MethodNotAllowed(f"{request.method} is not allowed on {request.url.path}.")
        else:
            mapped = InvalidRequest(str(error.detail))
            mapped.status = error.status_code  # type: ignore[misc]
        return _refuse(request, mapped)

    # Its own handler, not a case of the `Exception` one: Starlette answers through that one
    # from its outermost middleware and then re-raises, so the client saw a reset, not a 400.
    @app.exception_handler(RecursionError)
    async def _too_deep(request: Request, error: RecursionError) -> JSONResponse:
        # Only a client's deeply nested JSON recurses this far (parsing, validating, rendering
        # or packing it): the client's mistake, not ours.
        log.info("request nested too deeply", path=request.url.path)
        return error_response(InvalidRequest(NESTED_TOO_DEEPLY), request.url.path)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, error: Exception) -> JSONResponse:
        log.exception("unhandled error", path=request.url.path, error=repr(error))
        return _refuse(request, InternalError("Internal server error."))
