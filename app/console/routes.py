"""GET /console (status), /console/chat (playground) and their static files.

The pages and scripts need no key and hold no secret: the person types the admin key, the
script keeps it in sessionStorage and sends it as a header to /v1/admin/status and the API.
Every URL inside them is relative, so they work under a path prefix (Caddy `handle_path`).
Files are read once from the package; only names found there are served (no paths from
the request reach the filesystem).
"""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter
from fastapi.responses import RedirectResponse, Response

from app.errors import NotFound

router = APIRouter(include_in_schema=False)

# No inline script or style, nothing from another origin, no framing, no plugins; the data
# comes from this origin only (connect-src 'self').
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)
_SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-cache",  # revalidate, so an upgrade's pages are seen at once
}
_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}


def _load_static() -> dict[str, tuple[bytes, str]]:
    folder = resources.files("app.console") / "static"
    files: dict[str, tuple[bytes, str]] = {}
    for entry in folder.iterdir():
        suffix = "." + entry.name.rpartition(".")[2]
        if entry.is_file() and suffix in _TYPES:
            files[entry.name] = (entry.read_bytes(), _TYPES[suffix])
    return files


STATIC = _load_static()


def _serve(name: str) -> Response:
    found = STATIC.get(name)
    if found is None:
        raise NotFound(f"No console file named {name!r}.")
    body, media_type = found
    return Response(body, media_type=media_type, headers=_SECURITY_HEADERS)


@router.get("/console")
async def console_page() -> Response:
    return _serve("index.html")


@router.get("/console/")
async def console_slash() -> Response:
    # Relative, so it stays under whatever prefix the proxy stripped.
    return RedirectResponse("../console", status_code=308)


@router.get("/console/chat")
async def chat_page() -> Response:
    return _serve("chat.html")


@router.get("/console/static/{name}")
async def static_file(name: str) -> Response:
    return _serve(name)
