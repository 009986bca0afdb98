"""Auth middleware on a minimal Starlette app: deny by default, both headers, open health,
preflight, Host/query tricks, per-model scopes, admin routes, startup safety, redaction."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from structlog.testing import capture_logs

from app.errors import GatewayError
from app.http.auth import AuthMiddleware
from app.security.auth import (
    authorize_model,
    check_bind_safety,
    ensure_first_key,
    require_admin,
)
from app.security.keys import KeyStore
from app.security.principal import Principal
from app.settings import ConfigError, Settings


async def whoami(request: Request) -> JSONResponse:
    principal: Principal = request.state.principal
    return JSONResponse({"key_id": principal.key_id, "name": principal.name,
                         "admin": principal.admin, "client_ip": principal.client_ip})


async def health(request: Request) -> JSONResponse:
    return JSONResponse({"status": "ok"})


async def chat(request: Request) -> JSONResponse:
    body = await request.json()
    try:
        authorize_model(request.state.principal, body["model"])
    except GatewayError as error:
        return JSONResponse(error.body("openai"), status_code=error.status)
    return JSONResponse({"model": body["model"]})


async def admin_only(request: Request) -> JSONResponse:
    try:
        require_admin(request.state.principal)
    except GatewayError as error:
        return JSONResponse(error.body("openai"), status_code=error.status)
    return JSONResponse({"ok": True})


def make_app(keys: KeyStore | None, settings: Settings) -> Any:
    inner = Starlette(routes=[
        Route("/health", health), Route("/ready", health),
        Route("/v1/models", whoami, methods=["GET", "OPTIONS"]),
        Route("/v1/messages", whoami, methods=["POST"]),
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/admin/models/load", admin_only, methods=["POST"]),
    ])
    return AuthMiddleware(inner, keys=keys, settings=settings)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(config_dir=tmp_path)


@pytest.fixture
def store(settings: Settings) -> KeyStore:
    return KeyStore(settings.keys_file, check_interval=0)


@pytest.fixture
def tokens(store: KeyStore) -> dict[str, str]:
    return {
        "user": store.create("user", models=["allowed-model"])[1],
        "admin": store.create("root", admin=True)[1],
    }


def client(app: Any, peer: str = "127.0.0.1") -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, client=(peer, 40000))
    return httpx.AsyncClient(transport=transport, base_url="http://testserver")


def assert_401_openai(response: httpx.Response) -> None:
    assert response.status_code == 401
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == "invalid_api_key"
    assert "missing or invalid" in error["message"].lower()
    assert response.headers["www-authenticate"] == "Bearer"


async def test_no_key_wrong_key_revoked_key(store: KeyStore, settings: Settings,
                                            tokens: dict[str, str]) -> None:
    async with client(make_app(store, settings)) as http:
        assert_401_openai(await http.get("/v1/models"))
        wrong = tokens["user"][:-2] + "zz"
        assert_401_openai(await http.get("/v1/models",
                                         headers={"Authorization": f"Bearer {wrong}"}))
        assert_401_openai(await http.get("/v1/models", headers={"Authorization": "Bearer "}))
        assert_401_openai(await http.get("/v1/models", headers={"Authorization": tokens["user"]}))
        # every failure says the same thing
        bodies = {(await http.get("/v1/models", headers=h)).text for h in (
            {}, {"Authorization": f"Bearer {wrong}"}, {"x-api-key": "nonsense"})}
        assert len(bodies) == 1

        ok = await http.get("/v1/models", headers={"Authorization": f"Bearer {tokens['user']}"})
        assert ok.status_code == 200 and ok.json()["name"] == "user"
        key_id = ok.json()["key_id"]
        store.revoke(key_id)
        assert_401_openai(await http.get(
            "/v1/models", headers={"Authorization": f"Bearer {tokens['user']}"}))


async def test_bearer_and_x_api_key_and_anthropic_shape(
        store: KeyStore, settings: Settings, tokens: dict[str, str]) -> None:
    async with client(make_app(store, settings)) as http:
        by_header = await http.post("/v1/messages", headers={"x-api-key": tokens["admin"]})
        assert by_header.status_code == 200 and by_header.json()["name"] == "root"
        by_bearer = await http.post("/v1/messages",
                                    headers={"authorization": f"bearer {tokens['admin']}"})
        assert by_bearer.status_code == 200 and by_bearer.json()["admin"] is True
        # a stale bearer next to a good x-api-key (SDKs with both env vars set) still works
        both = await http.post("/v1/messages", headers={
            "Authorization": "Bearer stale", "x-api-key": tokens["admin"]})
        assert both.status_code == 200
        refused = await http.post("/v1/messages?beta=true", headers={"x-api-key": "mgw-nope"})
        assert refused.status_code == 401
        assert refused.json()["type"] == "error"
        assert refused.json()["error"]["type"] == "authentication_error"


async def test_open_routes_preflight_and_path_games(store: KeyStore, settings: Settings,
                                                    tokens: dict[str, str]) -> None:
    async with client(make_app(store, settings)) as http:
        assert (await http.get("/health")).json() == {"status": "ok"}
        assert (await http.get("/ready")).status_code == 200
        assert (await http.get("/health?probe=1")).status_code == 200
        preflight = await http.options("/v1/models", headers={
            "Origin": "https://example.com", "Access-Control-Request-Method": "POST"})
        assert preflight.status_code == 200
        assert preflight.json()["name"] == "unauthenticated"
        assert preflight.json()["admin"] is False
        assert (await http.options("/v1/models")).status_code == 401  # not a preflight
        for path in ("/healthz", "/health/", "/ready/x", "//health", "/v1/models?path=/health",
                     f"/v1/models?api_key={tokens['user']}", "/nonexistent"):
            # An absolute URL: httpx would read "//health" as a host named "health".
            assert (await http.get(f"http://testserver{path}")).status_code == 401, path
        assert (await http.head("/")).status_code != 401  # Claude Code's probe passes auth
        # Host header and absolute-URL games don't change the decision
        for host in ("localhost", "127.0.0.1", "health", "testserver/health"):
            assert (await http.get("/v1/models", headers={"Host": host})).status_code == 401


async def test_decision_uses_raw_scope_path(store: KeyStore, settings: Settings) -> None:
    """Call the middleware directly with a scope whose Host/raw_path point at /health."""
    reached: list[str] = []

    async def inner(scope: Any, receive: Any, send: Any) -> None:
        reached.append(scope["path"])

    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    scope = {"type": "http", "method": "GET", "path": "/v1/models", "raw_path": b"/health",
             "query_string": b"", "root_path": "",
             "headers": [(b"host", b"localhost"), (b"x-original-url", b"/health")],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 8000), "scheme": "http"}
    await AuthMiddleware(inner, keys=store, settings=settings)(scope, receive, send)
    assert reached == [] and sent[0]["status"] == 401


async def test_model_scopes_and_admin(store: KeyStore, settings: Settings,
                                      tokens: dict[str, str]) -> None:
    user = {"Authorization": f"Bearer {tokens['user']}"}
    admin = {"Authorization": f"Bearer {tokens['admin']}"}
    async with client(make_app(store, settings)) as http:
        ok = await http.post("/v1/chat/completions", json={"model": "allowed-model"}, headers=user)
        assert ok.status_code == 200
        denied = await http.post("/v1/chat/completions", json={"model": "other"}, headers=user)
        assert denied.status_code == 403
        assert denied.json()["error"]["code"] == "permission_denied"
        assert (await http.post("/v1/chat/completions", json={"model": "other"},
                                headers=admin)).status_code == 200
        assert (await http.post("/admin/models/load", headers=user)).status_code == 403
        assert (await http.post("/admin/models/load", headers=admin)).status_code == 200


def test_authorize_model_accepts_aliases() -> None:
    principal = Principal("k", "n", False, frozenset({"alias"}), None, None, "1.2.3.4")
    authorize_model(principal, "real-id", "alias")
    with pytest.raises(GatewayError):
        authorize_model(principal, "real-id")


async def test_auth_disabled_is_anonymous_admin_with_client_ip(tmp_path: Path) -> None:
    settings = Settings(config_dir=tmp_path, auth={"enabled": False})
    async with client(make_app(None, settings), peer="127.0.0.1") as http:
        response = await http.get("/v1/models", headers={"X-Forwarded-For": "127.0.0.7"})
    assert response.json() == {"key_id": None, "name": "anonymous", "admin": True,
                               "client_ip": "127.0.0.7"}  # peer is a trusted proxy


async def test_auth_disabled_serves_loopback_clients_only(tmp_path: Path) -> None:
    """Auth off behind a local proxy must not make the LAN or the internet an admin."""
    settings = Settings(config_dir=tmp_path, auth={"enabled": False})
    app = make_app(None, settings)
    async with client(app, peer="127.0.0.1") as http:
        forwarded = await http.get("/v1/models", headers={"X-Forwarded-For": "198.51.100.7"})
        health = await http.get("/health", headers={"X-Forwarded-For": "198.51.100.7"})
    assert forwarded.status_code == 403
    assert "only clients on the same machine" in forwarded.json()["error"]["message"]
    assert forwarded.json()["error"]["code"] == "auth_disabled_remote"
    assert health.status_code == 200  # health checks stay open, as with auth on
    async with client(app, peer="192.0.2.10") as http:
        assert (await http.post("/v1/chat/completions", json={"model": "m"})).status_code == 403
    async with client(app, peer="::1") as http:
        assert (await http.get("/v1/models")).status_code == 200


async def test_auth_on_without_store_denies(settings: Settings) -> None:
    async with client(make_app(None, settings)) as http:
        assert (await http.get("/v1/models", headers={"x-api-key": "mgw-x-y"})).status_code == 401
        assert (await http.get("/health")).status_code == 200


async def test_secret_never_logged_by_auth(store: KeyStore, settings: Settings,
                                           tokens: dict[str, str]) -> None:
    wrong = tokens["user"][:-3] + "abc"
    with capture_logs() as logs:
        async with client(make_app(store, settings)) as http:
            await http.get("/v1/models", headers={"Authorization": f"Bearer {tokens['user']}"})
            await http.get("/v1/models", headers={"Authorization": f"Bearer {wrong}"})
            await http.get("/v1/models", headers={"x-api-key": wrong})
    assert any("missing or invalid" in entry["event"] for entry in logs)
    dump = repr(logs)
    for secret in (tokens["user"], wrong, tokens["user"].split("-", 2)[2]):
        assert secret not in dump


def test_first_key_created_once_and_only_with_auth(settings: Settings) -> None:
    with capture_logs() as logs:
        token = ensure_first_key(settings)
    assert token is not None
    record = KeyStore(settings.keys_file).verify(token)
    assert record is not None and record.admin
    assert token not in repr(logs) and str(settings.keys_file) in repr(logs)
    assert ensure_first_key(settings) is None  # already has a key
    off = Settings(config_dir=settings.config_dir / "other", auth={"enabled": False})
    assert ensure_first_key(off) is None
    assert not off.keys_file.exists()


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_first_key_is_printed_only_to_a_terminal(settings: Settings) -> None:
    from app.security.auth import FIRST_KEY_FILE, announce_first_key

    terminal = _Terminal()
    assert announce_first_key("mgw-aaaa-secret1", settings.keys_file, terminal) is None
    assert "mgw-aaaa-secret1" in terminal.getvalue()
    assert not (settings.keys_file.parent / FIRST_KEY_FILE).exists()

    service_log = io.StringIO()  # launchd/systemd: stdout is the service log
    with capture_logs() as logs:
        written = announce_first_key("mgw-bbbb-secret2", settings.keys_file, service_log)
    assert written == settings.keys_file.parent / FIRST_KEY_FILE
    assert written.read_text() == "mgw-bbbb-secret2\n"
    assert written.stat().st_mode & 0o777 == 0o600
    assert service_log.getvalue() == ""
    assert "secret2" not in repr(logs) and str(written) in repr(logs)


def test_bind_safety(settings: Settings, tmp_path: Path) -> None:
    check_bind_safety(settings, None)  # loopback: fine without keys
    exposed = Settings(config_dir=tmp_path, server={"host": "0.0.0.0"})
    store = KeyStore(exposed.keys_file)
    with pytest.raises(ConfigError, match=r"no usable API keys.*keys create"):
        check_bind_safety(exposed, store)
    record, _ = store.create("k")
    check_bind_safety(exposed, store)
    store.revoke(record.id)
    with pytest.raises(ConfigError, match="no usable API keys"):
        check_bind_safety(exposed, store)
    open_door = Settings(config_dir=tmp_path, server={"host": "0.0.0.0"},
                         auth={"enabled": False})
    with pytest.raises(ConfigError, match=r"auth.*enabled = false"):
        check_bind_safety(open_door, store)


def _scope(peer: str | None, *forwarded: str) -> dict[str, Any]:
    return {"type": "http", "client": (peer, 1) if peer else None,
            "headers": [(b"x-forwarded-for", value.encode()) for value in forwarded]}


def test_client_ip_rightmost_untrusted() -> None:
    from app.security.client_ip import client_ip, parse_networks

    trusted = parse_networks(["127.0.0.1", "::1", "10.0.0.0/8"])
    assert client_ip(_scope("203.0.113.5", "1.2.3.4"), trusted) == "203.0.113.5"  # untrusted
    assert client_ip(_scope("127.0.0.1"), trusted) == "127.0.0.1"
    assert client_ip(_scope("127.0.0.1", "198.51.100.1"), trusted) == "198.51.100.1"
    # the client prepends a forged hop; the proxy appends the real one: rightmost wins
    assert client_ip(_scope("127.0.0.1", "6.6.6.6, 198.51.100.1"), trusted) == "198.51.100.1"
    # chains of trusted proxies are skipped, split headers are joined in order
    assert client_ip(_scope("127.0.0.1", "6.6.6.6, 198.51.100.2", "10.1.1.1"),
                     trusted) == "198.51.100.2"
    assert client_ip(_scope("127.0.0.1", "10.2.2.2, 10.1.1.1"), trusted) == "10.2.2.2"
    assert client_ip(_scope("127.0.0.1", "6.6.6.6, garbage"), trusted) == "127.0.0.1"
    assert client_ip(_scope("::ffff:127.0.0.1", "198.51.100.3"), trusted) == "198.51.100.3"
    assert client_ip(_scope("::1", "2001:db8::7"), trusted) == "2001:db8::7"
    assert client_ip(_scope(None, "1.2.3.4"), trusted) == "unknown"
    with pytest.raises(ValueError):
        parse_networks(["not-an-ip"])
