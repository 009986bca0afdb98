"""The last-resort error handler: deep-nesting recursion is the client's mistake (a 400),
anything else unexpected a 500 in the caller's protocol."""

from __future__ import annotations

import httpx
from fastapi import FastAPI

from app.api.errors import install_error_handlers


def _app() -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)

    @app.post("/v1/deep")
    async def deep() -> None:
        def dive(n: int) -> int:
            return dive(n + 1) + 1
        dive(0)

    @app.post("/v1/messages")
    async def broken() -> None:
        raise KeyError("bug")

    return app


async def test_recursion_is_a_400_and_other_bugs_a_500() -> None:
    transport = httpx.ASGITransport(app=_app(), raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
        deep = await http.post("/v1/deep")
        broken = await http.post("/v1/messages")
    assert deep.status_code == 400
    assert deep.json()["error"]["message"] == "The request body is nested too deeply to process."
    assert broken.status_code == 500 and broken.json()["type"] == "error"
