"""Keys, scopes, limits, admission and redaction through the real gateway, a real Redis and the
official SDK."""

from __future__ import annotations

import concurrent.futures
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import anthropic
import httpx
import openai
import pytest

from tests.e2e.conftest import DEMO_ID
from tests.e2e.gateway_process import ROOT, GatewayProcess
from tests.redis_server import RedisServer

pytestmark = pytest.mark.e2e
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


def keys_cli(config: Path, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "app.cli", "keys", *args, "--config", str(config)],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=True,
    )
    return result.stdout


class Secured:
    def __init__(self, server: GatewayProcess, redis: RedisServer, tokens: dict[str, str]):
        self.server, self.redis, self.tokens = server, redis, tokens

    def client(self, who: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.server.base_url + "/v1", api_key=self.tokens[who],
                             max_retries=0)

    def get(self, path: str, token: str | None = None, **headers: str) -> httpx.Response:
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        return httpx.get(self.server.base_url + path, headers=headers, timeout=60)


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory, demo_model_dir: Path) -> Iterator[Secured]:
    workdir = tmp_path_factory.mktemp("secured")
    redis = RedisServer()
    redis.start()
    server = GatewayProcess(workdir, {
        "auth": {"enabled": True},
        # Exact header counts need every check to reach Redis, even on a loaded test box.
        "redis": {"url": redis.url, "timeout": 2.0},
        "limits": {"per_key_rpm": 1000, "max_inflight": 1, "max_queue": 1},
        "engine": {"default_max_tokens": 16},
        "models": [
            {"id": DEMO_ID, "path": str(demo_model_dir)},
            {"id": "smollm2-other", "path": str(demo_model_dir), "aliases": ["other"]},
        ],
    })
    config = server.config_path
    tokens = {
        "admin": keys_cli(config, "create", "--name", "ops", "--admin").splitlines()[-1],
        "user": keys_cli(config, "create", "--name", "app", "--models", DEMO_ID)
        .splitlines()[-1],
        "limited": keys_cli(config, "create", "--name", "tiny", "--rpm", "3").splitlines()[-1],
        "other": keys_cli(config, "create", "--name", "o", "--models", "other").splitlines()[-1],
        "doomed": keys_cli(config, "create", "--name", "doomed").splitlines()[-1],
        "claude": keys_cli(config, "create", "--name", "cc", "--rpm", "2").splitlines()[-1],
    }
    server.start()
    yield Secured(server, redis, tokens)
    server.stop()
    redis.stop()


def test_missing_wrong_and_malformed_keys_get_the_same_401(secured: Secured) -> None:
    bodies = []
    for headers in ({}, {"Authorization": "Bearer mgw-0000000000000000-nope"},
                    {"Authorization": "Bearer garbage"}, {"x-api-key": "also-wrong"}):
        response = secured.get("/v1/models", **headers)
        assert response.status_code == 401
        bodies.append(response.json())
    assert all(b == bodies[0] for b in bodies)  # says nothing about which part was wrong
    assert bodies[0]["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=secured.server.base_url + "/v1", api_key="bad",
                      max_retries=0).models.list()


def test_open_routes_need_no_key(secured: Secured) -> None:
    assert secured.get("/health").status_code == 200
    assert secured.get("/ready").status_code == 200
    assert secured.get("/health?x=1", Host="evil.example").status_code == 200
    # A route that only *looks* open through tricks stays closed.
    for path in ("/health/../v1/models", "/v1/models?/health", "//v1/models"):
        assert secured.get(path).status_code in (401, 404)


def test_bearer_and_x_api_key(secured: Secured) -> None:
    user = secured.tokens["user"]
    assert secured.get("/v1/models", user).status_code == 200
    assert secured.get("/v1/models", **{"x-api-key": user}).status_code == 200
    reply = secured.client("user").chat.completions.create(
        model=DEMO_ID, messages=FRANCE, temperature=0, max_tokens=12)  # type: ignore[arg-type]
    assert "Paris" in (reply.choices[0].message.content or "")


def test_model_scopes(secured: Secured) -> None:
    with pytest.raises(openai.PermissionDeniedError) as caught:
        secured.client("user").chat.completions.create(
            model="smollm2-other", messages=FRANCE, max_tokens=2)  # type: ignore[arg-type]
    assert "smollm2-other" in caught.value.message
    # The key names the alias; the id works too, and so does the alias itself.
    for model in ("smollm2-other", "other"):
        reply = secured.client("other").chat.completions.create(
            model=model, messages=FRANCE, max_tokens=2)  # type: ignore[arg-type]
        assert reply.choices[0].finish_reason == "length"


def test_model_list_follows_the_key_scope(secured: Secured) -> None:
    """A scoped key neither lists nor looks up models outside its scope (issue 13, item 15)."""
    def ids(who: str) -> list[str]:
        return sorted(m.id for m in secured.client(who).models.list())

    assert ids("user") == [DEMO_ID]
    assert ids("other") == ["smollm2-other"]  # scoped by its alias
    assert ids("admin") == sorted([DEMO_ID, "smollm2-other"])
    hidden = secured.get("/v1/models/smollm2-other", secured.tokens["user"])
    assert hidden.status_code == 404 and hidden.json()["error"]["code"] == "model_not_found"
    assert "smollm2-other" not in hidden.json()["error"]["message"].split("Available:")[1]
    assert secured.get(f"/v1/models/{DEMO_ID}", secured.tokens["user"]).status_code == 200
    assert secured.get("/v1/models/other", secured.tokens["other"]).status_code == 200


def test_admin_only_metrics(secured: Secured) -> None:
    assert secured.get("/metrics").status_code == 401
    denied = secured.get("/metrics", secured.tokens["user"])
    assert denied.status_code == 403 and denied.json()["error"]["code"] == "permission_denied"
    allowed = secured.get("/metrics", secured.tokens["admin"])
    assert allowed.status_code == 200 and "mlxgw_requests_total" in allowed.text


def test_revocation_is_picked_up_without_restart(secured: Secured) -> None:
    token = secured.tokens["doomed"]
    assert secured.get("/v1/models", token).status_code == 200
    key_id = token.split("-")[1]
    keys_cli(secured.server.config_path, "revoke", key_id)
    listing = keys_cli(secured.server.config_path, "list")
    assert key_id in listing and token.split("-", 2)[2] not in listing
    import time

    deadline = time.monotonic() + 10
    while secured.get("/v1/models", token).status_code != 401:
        assert time.monotonic() < deadline, "revoked key still accepted"
        time.sleep(0.2)


def test_per_key_rate_limit_with_exact_headers(secured: Secured) -> None:
    token = secured.tokens["limited"]
    remaining = []
    for _ in range(3):
        response = secured.get("/v1/models", token)
        assert response.status_code == 200
        assert response.headers["x-ratelimit-limit-requests"] == "3"
        remaining.append(response.headers["x-ratelimit-remaining-requests"])
        assert response.headers["x-ratelimit-reset-requests"].endswith("s")
    assert remaining == ["2", "1", "0"]
    refused = secured.get("/v1/models", token)
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    # Other keys are not affected.
    assert secured.get("/v1/models", secured.tokens["user"]).status_code == 200


def test_admission_rejects_beyond_the_queue(secured: Secured) -> None:
    """max_inflight = 1, max_queue = 1: of three long requests at once, one is turned away."""
    def ask() -> httpx.Response:
        return httpx.post(
            secured.server.base_url + "/v1/chat/completions", timeout=300,
            headers={"Authorization": f"Bearer {secured.tokens['admin']}"},
            json={"model": DEMO_ID, "max_tokens": 24, "temperature": 0,
                  "messages": [{"role": "user", "content": "Write a long story."}]},
        )

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        responses = list(pool.map(lambda _: ask(), range(3)))
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200, 200, 503], statuses
    busy = next(r for r in responses if r.status_code == 503)
    assert busy.json()["error"]["code"] == "overloaded"
    assert 1 <= int(busy.headers["retry-after"]) <= 60


def test_redis_outage_falls_back_without_errors(secured: Secured) -> None:
    token = secured.tokens["admin"]
    secured.redis.stop()
    try:
        statuses = [secured.get("/v1/models", token).status_code for _ in range(5)]
        assert statuses == [200] * 5
        assert "x-ratelimit-remaining-requests" in secured.get("/v1/models", token).headers
    finally:
        secured.redis.start()
    import time

    time.sleep(1.2)  # the limiter retries Redis at most once a second
    assert secured.get("/v1/models", token).status_code == 200
    metrics = secured.get("/metrics", token).text
    assert "mlxgw_ratelimit_fallback_total" in metrics


def test_secrets_never_reach_the_logs(secured: Secured) -> None:
    secured.get("/v1/models", secured.tokens["user"])
    secured.get("/v1/models", "mgw-0123456789abcdef-notarealsecretbutlooksone")
    logs = secured.server.logs()
    for token in secured.tokens.values():
        assert token.split("-", 2)[2] not in logs
    assert "notarealsecretbutlooksone" not in logs
    lines = [json.loads(line) for line in logs.splitlines() if line.startswith("{")]
    assert any(e.get("key_id") for e in lines if e.get("event") == "request")


def test_refuses_public_bind_without_keys(tmp_path: Path, demo_model_dir: Path) -> None:
    def serve(config: dict[str, object]) -> subprocess.CompletedProcess[str]:
        server = GatewayProcess(tmp_path, {"models": [{"id": DEMO_ID,
                                                        "path": str(demo_model_dir)}], **config})
        return subprocess.run(
            [sys.executable, "-m", "app.cli", "serve", "--config", str(server.config_path),
             "--host", "0.0.0.0", "--port", str(server.port)],
            cwd=ROOT, capture_output=True, text=True, timeout=60,
        )

    no_auth = serve({"auth": {"enabled": False}})
    assert no_auth.returncode == 2 and "refusing to bind 0.0.0.0" in no_auth.stderr
    (tmp_path / "config").mkdir(exist_ok=True)
    (tmp_path / "config" / "keys.json").write_text(json.dumps({"version": 1, "keys": []}))
    no_keys = serve({"auth": {"enabled": True}})
    assert no_keys.returncode == 2 and "no usable API keys" in no_keys.stderr


def test_first_start_writes_the_admin_key_to_a_file_not_the_log(
        tmp_path: Path, demo_model_dir: Path) -> None:
    """stdout is a file here, as under launchd/systemd: the key goes to a 0600 file and the
    log names only that file (issue 13, item 9)."""
    server = GatewayProcess(tmp_path, {"auth": {"enabled": True},
                                       "models": [{"id": DEMO_ID, "path": str(demo_model_dir)}]})
    server.start(wait_ready=False)
    try:
        key_file = tmp_path / "config" / "first-admin-key.txt"
        assert key_file.stat().st_mode & 0o777 == 0o600
        token = key_file.read_text().strip()
        output = server.logs()
        assert token.split("-", 2)[2] not in output  # never in the service log
        assert str(key_file) in output
        models = httpx.get(server.base_url + "/v1/models",
                           headers={"Authorization": f"Bearer {token}"})
        assert models.status_code == 200
        assert (tmp_path / "config" / "keys.json").stat().st_mode & 0o777 == 0o600
    finally:
        server.stop()


def test_global_limit_is_shared_by_two_gateways(tmp_path: Path, demo_model_dir: Path) -> None:
    """global_rpm counts every request to every gateway that shares the Redis."""
    redis = RedisServer()
    redis.start()
    # A loaded 2-core test machine can delay a live Redis past the 0.1 s default, which would
    # (correctly) fall back to per-process counting; this test is about sharing, not outages.
    config = {"auth": {"enabled": False}, "redis": {"url": redis.url, "timeout": 2.0},
              "limits": {"global_rpm": 3, "per_ip_rpm": 0},
              "models": [{"id": DEMO_ID, "path": str(demo_model_dir)}]}
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = GatewayProcess(tmp_path / "a", config).start(wait_ready=False)
    second = GatewayProcess(tmp_path / "b", config).start(wait_ready=False)
    try:
        codes = [httpx.get(server.base_url + "/v1/models").status_code
                 for server in (first, second, first, second, first)]
        assert codes == [200, 200, 200, 429, 429]
        refused = httpx.get(second.base_url + "/v1/models")
        assert refused.status_code == 429, refused.text
        assert refused.json()["error"]["code"] == "rate_limit_exceeded", refused.text
        assert 1 <= int(refused.headers["retry-after"]) <= 60
    finally:
        first.stop()
        second.stop()
        redis.stop()


def test_anthropic_route_auth_in_anthropic_shape(secured: Secured) -> None:
    url = secured.server.base_url + "/v1/messages?beta=true"
    body = {"model": DEMO_ID, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}
    refused = httpx.post(url, json=body, headers={"x-api-key": "mgw-nope-nope"}, timeout=60)
    assert refused.status_code == 401
    assert refused.json() == {"type": "error", "error": {
        "type": "authentication_error", "message": refused.json()["error"]["message"]}}
    scoped = httpx.post(url, json={**body, "model": "other"}, timeout=60,
                        headers={"x-api-key": secured.tokens["user"]})
    assert scoped.status_code == 403
    assert scoped.json()["error"]["type"] == "permission_error"
    for header in ({"x-api-key": secured.tokens["user"]},
                   {"Authorization": f"Bearer {secured.tokens['user']}"}):
        answered = httpx.post(url, json=body, headers=header, timeout=120)
        assert answered.status_code == 200, answered.text
        assert answered.json()["type"] == "message"
    # Claude Code's first request, a connectivity probe, needs no key.
    assert httpx.head(secured.server.base_url + "/", timeout=10).status_code == 200


def test_anthropic_rate_limit_and_overload_in_anthropic_shape(secured: Secured) -> None:
    """What Claude Code retries on: 429 rate_limit_error and 503 overloaded_error, each with
    Retry-After, in Anthropic's error shape; the official SDK raises its typed errors."""
    url = secured.server.base_url + "/v1/messages"
    body = {"model": DEMO_ID, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}
    claude = anthropic.Anthropic(base_url=secured.server.base_url, max_retries=0,
                                 api_key=secured.tokens["claude"])
    for _ in range(2):
        claude.messages.create(**body)  # type: ignore[arg-type]
    with pytest.raises(anthropic.RateLimitError) as limited:
        claude.messages.create(**body)  # type: ignore[arg-type]
    refused = limited.value.response
    assert refused.json() == {"type": "error", "error": {
        "type": "rate_limit_error", "message": refused.json()["error"]["message"]}}
    assert 1 <= int(refused.headers["retry-after"]) <= 60

    def ask() -> httpx.Response:  # max_inflight = 1, max_queue = 1: one of three is turned away
        return httpx.post(url, timeout=300, headers={"x-api-key": secured.tokens["admin"]},
                          json={**body, "max_tokens": 24, "temperature": 0,
                                "messages": [{"role": "user", "content": "Write a long story."}]})

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        responses = list(pool.map(lambda _: ask(), range(3)))
    assert sorted(r.status_code for r in responses) == [200, 200, 503]
    busy = next(r for r in responses if r.status_code == 503)
    assert busy.json()["type"] == "error" and busy.json()["error"]["type"] == "overloaded_error"
    assert 1 <= int(busy.headers["retry-after"]) <= 60
