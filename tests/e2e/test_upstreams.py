"""Routes and upstreams for real: the gateway under test (A) in front of a second real
`mlx-gateway serve` (B, the remote Mac), a closed port, and a tiny server that misbehaves on
purpose (500, 429 + Retry-After, hangs, dies mid-stream, drips until the client leaves).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import anthropic
import httpx
import openai
import pytest

from app.security.keys import KeyStore
from tests.e2e.conftest import DEMO_ID
from tests.e2e.gateway_process import GatewayProcess
from tests.local_server import free_port, serving
from tests.misbehaving_upstream import Misbehaving

pytestmark = pytest.mark.e2e
REMOTE = f"remote:{DEMO_ID}"
HELLO = [{"role": "user", "content": "Say hello."}]
# The upstream secrets, as the gateway's environment holds them; never to be seen anywhere.
REMOTE_SECRET = "remote-secret-" + "7" * 24
FLAKY_SECRET = "flaky-secret-" + "9" * 24


class Rig:
    def __init__(self, gateway: GatewayProcess, remote: GatewayProcess, bad: Misbehaving,
                 caller_key: str, small_key: str, remote_key: str) -> None:
        self.gateway = gateway
        self.remote = remote
        self.bad = bad
        self.caller_key = caller_key
        self.small_key = small_key
        self.remote_key = remote_key

    def openai(self, key: str | None = None) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.gateway.base_url + "/v1",
                             api_key=key or self.caller_key, max_retries=0, timeout=120)

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.gateway.base_url, timeout=120,
                            headers={"authorization": f"Bearer {self.caller_key}"})

    def metric(self, name: str, **labels: str) -> float:
        text = httpx.get(self.gateway.base_url + "/metrics",
                         headers={"authorization": f"Bearer {self.caller_key}"}).text
        total = 0.0
        for line in text.splitlines():
            if line.startswith((name + "{", name + " ")) and all(
                    f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
        return total


def _keys(config_dir: Path) -> KeyStore:
    config_dir.mkdir(parents=True, exist_ok=True)
    return KeyStore(config_dir / "keys.json")


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory, demo_float32_dir: Path) -> Iterator[Rig]:
    bad = Misbehaving()
    remote_dir = tmp_path_factory.mktemp("remote")
    _, remote_token = _keys(remote_dir / "config").create("gateway A")
    work = tmp_path_factory.mktemp("gateway")
    keys = _keys(work / "config")
    _, caller_key = keys.create("caller", admin=True)
    _, small_key = keys.create("small budget", tpm=40)
    broken = work / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps({"model_type": "llama"}))  # no weights
    closed_port = free_port()  # nothing listens there
    with serving(bad) as bad_port:
        remote = GatewayProcess(remote_dir, {
            "engine": {"default_max_tokens": 16},
            "metrics": {"require_admin": False},  # the test reads it with A's key
            "limits": {"per_ip_rpm": 0, "per_key_rpm": 0},
            "models": [{"id": DEMO_ID, "path": str(demo_float32_dir)}],
        }).start()
        bad_url = f"http://127.0.0.1:{bad_port}/v1"
        gateway = GatewayProcess(work, {
            "server": {"heartbeat_seconds": 0.5},
            "engine": {"default_max_tokens": 16},
            # One local generation at a time; a route's local target does not queue behind it
            # (queue_wait 0) but passes the request on.
            "limits": {"per_ip_rpm": 0, "per_key_rpm": 0, "max_inflight": 1},
            "models": [{"id": DEMO_ID, "path": str(demo_float32_dir)},
                       {"id": "broken", "path": str(broken)}],
            "anthropic": {"models": {"claude-remote*": "to-remote", "claude-*": "claude"}},
            "upstreams": [
                {"id": "remote", "base_url": remote.base_url + "/v1",
                 "api_key_env": "REMOTE_KEY", "models": "*", "anthropic": True,
                 "health_interval": 2},
                {"id": "flaky", "base_url": bad_url, "api_key_env": "FLAKY_KEY",
                 "models": ["fail500", "busy429", "die", "drip", "echo"],
                 "health_interval": 0, "breaker_failures": 100},
                {"id": "fragile", "base_url": bad_url, "models": ["fail500"],
                 "health_interval": 0, "breaker_failures": 1, "breaker_cooldown": 600},
                {"id": "slow", "base_url": bad_url, "models": ["hang"], "timeout": 1.0,
                 "health_interval": 0},
                {"id": "impostor", "base_url": remote.base_url + "/v1",
                 "api_key_env": "IMPOSTOR_KEY", "models": [DEMO_ID], "health_interval": 0},
                {"id": "closed", "base_url": f"http://127.0.0.1:{closed_port}/v1",
                 "models": ["any"], "health_interval": 0, "connect_timeout": 1.0},
            ],
            "routes": [
                {"name": "cascade", "chain": ["flaky:fail500", "flaky:busy429", "closed:any",
                                              "slow:hang", REMOTE]},
                {"name": "dies", "chain": ["flaky:die", REMOTE]},
                {"name": "local-first", "chain": [DEMO_ID, REMOTE]},
                {"name": "broken-first", "chain": ["broken", REMOTE]},
                {"name": "fragile", "chain": ["fragile:fail500", REMOTE]},
                {"name": "claude", "chain": ["flaky:echo", DEMO_ID]},
                {"name": "to-remote", "chain": [REMOTE]},
                {"name": "impostor-first", "chain": [f"impostor:{DEMO_ID}", REMOTE]},
            ],
        }, env={"REMOTE_KEY": remote_token, "FLAKY_KEY": FLAKY_SECRET,
                "IMPOSTOR_KEY": "not-a-key-of-the-remote"})
        try:
            gateway.start()
            yield Rig(gateway, remote, bad, caller_key, small_key, remote_token)
        finally:
            gateway.stop()
            remote.stop()
    assert remote_token not in gateway.logs()


def test_a_route_falls_through_its_chain_in_order_to_the_remote_mac(rig: Rig) -> None:
    before = {reason: rig.metric("mlxgw_target_fallbacks_total", target=target, reason=reason)
              for target, reason in [("flaky:fail500", "5xx"), ("flaky:busy429", "429"),
                                     ("closed:any", "unreachable"), ("slow:hang", "timeout")]}
    seen = len(rig.bad.requests)
    raw = rig.openai().chat.completions.with_raw_response.create(
        model="cascade", messages=HELLO, max_tokens=4, temperature=0)
    reply = raw.parse()
    assert raw.headers["x-mlxgw-served-by"] == REMOTE
    assert reply.model == REMOTE and reply.choices[0].message.content
    for target, reason in [("flaky:fail500", "5xx"), ("flaky:busy429", "429"),
                           ("closed:any", "unreachable"), ("slow:hang", "timeout")]:
        assert rig.metric("mlxgw_target_fallbacks_total", target=target,
                          reason=reason) == before[reason] + 1, target
    # The chain's order, as the misbehaving server saw it (the closed port sees nothing).
    assert [s.model for s in rig.bad.requests[seen:]] == ["fail500", "busy429", "hang"]
    # The upstream got its own key, never the caller's.
    for request in rig.bad.requests[seen:seen + 2]:
        assert request.headers["authorization"] == f"Bearer {FLAKY_SECRET}"
        assert rig.caller_key not in json.dumps(request.headers)
    assert "x-api-key" not in rig.bad.requests[seen + 2].headers  # slow has no key at all


def test_streams_pass_through_and_usage_is_counted(rig: Rig) -> None:
    client = rig.openai()
    # Unbuffered: the first content chunk is here while the remote still generates the rest.
    with rig.http() as http, http.stream("POST", "/v1/chat/completions", json={
            "model": REMOTE, "messages": [{"role": "user", "content": "Tell a long story."}],
            "max_tokens": 64, "stream": True}) as response:
        assert response.headers["x-mlxgw-served-by"] == REMOTE
        # Kept in a name: a discarded line iterator may close the response when collected.
        lines = response.iter_lines()
        next(line for line in lines if '"content":"' in line and '"content":""' not in line)
        remote_metrics = httpx.get(rig.remote.base_url + "/metrics", headers={
            "authorization": f"Bearer {rig.remote_key}"}).text
        assert re.search(r"^mlxgw_inflight_requests 1\.0$", remote_metrics, re.M)
    tokens_before = rig.metric("mlxgw_completion_tokens_total", model=REMOTE)
    chunks = list(client.chat.completions.create(
        model=REMOTE, messages=HELLO, max_tokens=6, temperature=0, stream=True))
    assert chunks and {c.model for c in chunks} == {REMOTE}
    assert all(c.usage is None for c in chunks)  # the usage the gateway asked for is not shown
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert rig.metric("mlxgw_completion_tokens_total", model=REMOTE) > tokens_before
    # With include_usage, the client gets its usage chunk.
    with_usage = list(client.chat.completions.create(
        model=REMOTE, messages=HELLO, max_tokens=4, stream=True,
        stream_options={"include_usage": True}))
    assert with_usage[-1].usage is not None and with_usage[-1].usage.completion_tokens > 0
    # Responses and legacy completions go the same way.
    response = client.responses.create(model=REMOTE, input="Say hi.", max_output_tokens=4)
    assert response.model == REMOTE and response.status in ("completed", "incomplete")
    with client.responses.stream(model="to-remote", input="Say hi.",
                                 max_output_tokens=4) as stream:
        events = list(stream)
    assert events[0].type == "response.created" and events[0].response.model == REMOTE
    assert events[-1].type in ("response.completed", "response.incomplete")
    text = client.completions.create(model=REMOTE, prompt="Once upon", max_tokens=4)
    assert text.model == REMOTE and text.choices[0].text


def test_upstream_usage_counts_against_the_callers_token_budget(rig: Rig) -> None:
    client = rig.openai(rig.small_key)  # 40 tokens a minute
    refused = None
    for _ in range(6):
        try:
            client.chat.completions.create(model="flaky:echo", messages=HELLO, max_tokens=4)
        except openai.RateLimitError as error:
            refused = error
            break
    # echo reports 12 tokens an answer, charged to the key: the budget runs out.
    assert refused is not None and "tokens per minute" in refused.message


def test_no_fallback_after_the_first_byte(rig: Rig) -> None:
    remote_before = rig.metric("mlxgw_target_requests_total", target=REMOTE)
    with rig.http() as http, http.stream("POST", "/v1/chat/completions", json={
            "model": "dies", "messages": HELLO, "stream": True}) as response:
        assert response.status_code == 200
        assert response.headers["x-mlxgw-served-by"] == "flaky:die"
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    payloads = [json.loads(e) for e in events if e != "[DONE]"]
    assert [p["choices"][0]["delta"]["content"] for p in payloads[:2]] == ["Hel", "lo"]
    assert payloads[0]["model"] == "flaky:die"
    assert payloads[-1]["error"]["code"] == "upstream_failed"
    assert rig.metric("mlxgw_target_requests_total", target=REMOTE) == remote_before


def test_a_client_that_leaves_cancels_the_upstream_request(rig: Rig) -> None:
    gone = len(rig.bad.disconnected)
    with rig.http() as http, http.stream("POST", "/v1/chat/completions", json={
            "model": "flaky:drip", "messages": HELLO, "stream": True}) as response:
        next(line for line in response.iter_lines() if line.startswith("data: "))
    deadline = time.monotonic() + 15
    while len(rig.bad.disconnected) == gone and time.monotonic() < deadline:
        time.sleep(0.1)
    assert rig.bad.disconnected[gone:] == ["drip"]


def test_local_first_falls_back_when_local_is_busy_or_broken(rig: Rig) -> None:
    client = rig.openai()
    idle = client.chat.completions.with_raw_response.create(
        model="local-first", messages=HELLO, max_tokens=4)
    assert idle.headers["x-mlxgw-served-by"] == DEMO_ID and idle.parse().model == DEMO_ID
    overloaded = rig.metric("mlxgw_target_fallbacks_total", target=DEMO_ID, reason="overloaded")
    # Hold the one local slot with a long stream (end-of-text tokens banned, so it cannot
    # finish early), then ask the route again.
    with rig.http() as http, http.stream("POST", "/v1/chat/completions", json={
            "model": DEMO_ID, "messages": [{"role": "user", "content": "Tell a long story."}],
            "max_tokens": 400, "stream": True, "logit_bias": {"0": -100, "2": -100}}) as long:
        lines = long.iter_lines()
        next(line for line in lines if '"content":"' in line and '"content":""' not in line)
        assert rig.metric("mlxgw_admission_inflight") == 1  # the one slot is taken
        busy = client.chat.completions.with_raw_response.create(
            model="local-first", messages=HELLO, max_tokens=4)
    assert busy.headers["x-mlxgw-served-by"] == REMOTE and busy.parse().model == REMOTE
    assert rig.metric("mlxgw_target_fallbacks_total", target=DEMO_ID,
                      reason="overloaded") == overloaded + 1
    broken = client.chat.completions.with_raw_response.create(
        model="broken-first", messages=HELLO, max_tokens=4)
    assert broken.headers["x-mlxgw-served-by"] == REMOTE
    assert rig.metric("mlxgw_target_fallbacks_total", target="broken",
                      reason="load_failed") >= 1


def test_breaker_opens_and_client_errors_do_not_fall_back(rig: Rig) -> None:
    client = rig.openai()
    for _ in range(2):
        served = client.chat.completions.with_raw_response.create(
            model="fragile", messages=HELLO, max_tokens=4)
        assert served.headers["x-mlxgw-served-by"] == REMOTE
    assert rig.metric("mlxgw_target_fallbacks_total", target="fragile:fail500",
                      reason="5xx") == 1
    assert rig.metric("mlxgw_target_fallbacks_total", target="fragile:fail500",
                      reason="breaker_open") == 1
    assert rig.metric("mlxgw_upstream_breaker_state", upstream="fragile") == 2
    # The remote refusing the gateway's own key is not the client's fault: next target.
    served = client.chat.completions.with_raw_response.create(
        model="impostor-first", messages=HELLO, max_tokens=4)
    assert served.headers["x-mlxgw-served-by"] == REMOTE
    assert rig.metric("mlxgw_target_fallbacks_total", target=f"impostor:{DEMO_ID}",
                      reason="auth") == 1
    # A request the remote refuses as the client's fault comes back as it is.
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="to-remote", messages=HELLO, max_tokens=4,
                                       temperature=5)


def test_anthropic_requests_skip_openai_only_upstreams(rig: Rig) -> None:
    client = anthropic.Anthropic(base_url=rig.gateway.base_url, api_key=rig.caller_key,
                                 max_retries=0)
    skipped = rig.metric("mlxgw_target_fallbacks_total", target="flaky:echo",
                         reason="protocol")
    raw = client.messages.with_raw_response.create(
        model="claude-3-5-haiku-latest", max_tokens=4, messages=HELLO)
    assert raw.headers["x-mlxgw-served-by"] == DEMO_ID and raw.parse().model == DEMO_ID
    assert rig.metric("mlxgw_target_fallbacks_total", target="flaky:echo",
                      reason="protocol") == skipped + 1
    # count_tokens on a route counts with the chain's first local model.
    counted = client.messages.count_tokens(model="claude-3-5-haiku-latest", messages=HELLO)
    assert counted.input_tokens > 0
    with client.messages.stream(model="claude-remote", max_tokens=4, messages=HELLO) as stream:
        message = stream.get_final_message()
    assert message.model == REMOTE and message.usage.output_tokens > 0


def test_models_lists_upstreams_and_routes_and_logs_hold_no_key(rig: Rig) -> None:
    with rig.http() as http:
        listed = {m["id"]: m for m in http.get("/v1/models").json()["data"]}
        assert listed[REMOTE]["owned_by"] == "remote"  # listed by the remote's /v1/models
        assert f"impostor:{DEMO_ID}" in listed  # configured, whatever it answers
        assert listed["cascade"]["owned_by"] == "route"
        assert listed["cascade"]["chain"][-1] == REMOTE
        assert http.get("/v1/models/cascade").json()["id"] == "cascade"
    logs = rig.gateway.logs()
    assert re.search(r"target passed over", logs)
    for secret in (FLAKY_SECRET, rig.caller_key):
        assert secret not in logs
