"""Running it for real: behind Caddy, SIGTERM drain, /metrics, doctor."""

from __future__ import annotations

import concurrent.futures
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.caddy_server import running_caddy
from tests.e2e.conftest import DEMO_ID
from tests.e2e.gateway_process import ROOT, GatewayProcess

pytestmark = pytest.mark.e2e
STORY = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]


def metric(text: str, name: str, **labels: str) -> float:
    selector = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = rf"^{re.escape(name)}{re.escape('{' + selector + '}') if labels else ''} (\S+)$"
    match = re.search(pattern, text, re.M)
    return float(match.group(1)) if match else 0.0


def from_address(address: str) -> httpx.Client:
    """A client whose connections come from another loopback address (a second visitor)."""
    return httpx.Client(transport=httpx.HTTPTransport(local_address=address, verify=False),
                        timeout=300)


def test_behind_caddy_streams_unbuffered_and_limits_see_forwarded_ip(
        tmp_path: Path, demo_model_dir: Path) -> None:
    server = GatewayProcess(tmp_path, {
        "auth": {"enabled": False},
        "limits": {"per_ip_rpm": 3},
        "models": [{"id": DEMO_ID, "path": str(demo_model_dir)}],
    }).start()
    try:
        with running_caddy(tmp_path, server.port) as base:
            # 1. A stream arrives chunk by chunk: the first content chunk is through Caddy
            #    while the gateway is still generating the rest.
            with from_address("127.0.0.5") as visitor, visitor.stream(
                    "POST", base + "/v1/chat/completions",
                    json={"model": DEMO_ID, "messages": STORY, "max_tokens": 48,
                          "temperature": 0, "stream": True}) as response:
                assert response.status_code == 200
                lines = response.iter_lines()
                first = next(line for line in lines if '"content":"' in line
                             and '"content":""' not in line)
                assert first.startswith("data: ")
                still_running = metric(httpx.get(server.base_url + "/metrics").text,
                                       "mlxgw_inflight_requests")
                rest = list(lines)
            assert still_running == 1
            assert "data: [DONE]" in rest

            # 2. Per-visitor limits key on the address Caddy forwards, not on Caddy's own:
            #    127.0.0.2 spends its 3 requests/minute; 127.0.0.3 is a separate visitor.
            with from_address("127.0.0.2") as first_visitor:
                statuses = [first_visitor.get(base + "/v1/models",
                                              headers={"X-Forwarded-For": "198.51.100.7"}
                                              ).status_code for _ in range(4)]
            assert statuses == [200, 200, 200, 429]
            with from_address("127.0.0.3") as second_visitor:
                assert second_visitor.get(base + "/v1/models").status_code == 200
        entries = [json.loads(line) for line in server.logs().splitlines()
                   if line.startswith("{")]
        ips = {e.get("client_ip") for e in entries if e.get("path") == "/v1/models"}
        assert ips == {"127.0.0.2", "127.0.0.3"}  # the spoofed 198.51.100.7 was replaced
    finally:
        server.stop()


def test_sigterm_drains_streams_then_exits_zero(tmp_path: Path, demo_model_dir: Path) -> None:
    server = GatewayProcess(tmp_path, {
        "auth": {"enabled": False},
        "server": {"shutdown_grace": 3},
        "limits": {"max_inflight": 1, "max_queue": 4},
        "models": [{"id": DEMO_ID, "path": str(demo_model_dir)}],
    }).start()
    short_lines: list[str] = []
    with httpx.Client(timeout=300) as http, \
            http.stream("POST", server.base_url + "/v1/chat/completions", json={
                "model": DEMO_ID, "messages": STORY, "max_tokens": 2000, "stream": True,
                "temperature": 0}) as long_stream, \
            concurrent.futures.ThreadPoolExecutor(1) as pool:
        long_lines = long_stream.iter_lines()
        next(line for line in long_lines if '"content":"' in line)
        # A second request waits in the admission queue behind the stream.
        queued = pool.submit(httpx.post, server.base_url + "/v1/chat/completions", timeout=300,
                             json={"model": DEMO_ID, "messages": STORY, "max_tokens": 8})
        deadline = time.monotonic() + 30
        while metric(httpx.get(server.base_url + "/metrics").text,
                     "mlxgw_admission_queued") < 1:
            assert time.monotonic() < deadline, "the second request never queued"
            time.sleep(0.05)
        assert server.process is not None
        server.process.send_signal(signal.SIGTERM)
        # Draining stops admission: the queued request is refused, not started after the
        # running streams are ended (issue 13, item 13).
        refused = queued.result(60)
        assert refused.status_code == 503, refused.text
        assert "shutting down" in refused.json()["error"]["message"]
        assert int(refused.headers["retry-after"]) >= 1
        # New connections are refused once draining starts.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                httpx.get(server.base_url + "/health", timeout=1)
                time.sleep(0.1)
            except httpx.HTTPError:
                break
        else:
            pytest.fail("still accepting connections after SIGTERM")
        rest = list(long_lines)
    payloads = [json.loads(line[6:]) for line in rest if line.startswith("data: {")]
    assert "error" in payloads[-1], payloads[-1]
    assert "shutting down" in payloads[-1]["error"]["message"]
    assert server.process.wait(60) == 0
    assert not short_lines
    assert "shutdown grace over" in server.logs()


def test_metrics_move_after_requests(gateway: GatewayProcess) -> None:
    before = httpx.get(gateway.base_url + "/metrics").text
    route = {"route": "/v1/chat/completions", "status": "200"}
    httpx.post(gateway.base_url + "/v1/chat/completions", timeout=120, json={
        "model": DEMO_ID, "messages": STORY, "max_tokens": 3, "temperature": 0})
    after = httpx.get(gateway.base_url + "/metrics").text
    assert metric(after, "mlxgw_requests_total", **route) == \
        metric(before, "mlxgw_requests_total", **route) + 1
    assert metric(after, "mlxgw_completion_tokens_total", model=DEMO_ID) == \
        metric(before, "mlxgw_completion_tokens_total", model=DEMO_ID) + 3
    assert metric(after, "mlxgw_ttft_seconds_count", model=DEMO_ID) == \
        metric(before, "mlxgw_ttft_seconds_count", model=DEMO_ID) + 1
    for name in ("mlxgw_request_duration_seconds_bucket", "mlxgw_inflight_requests",
                 "mlxgw_prompt_tokens_total", "mlxgw_rate_limited_total",
                 "mlxgw_admission_queued"):
        assert name in after


def test_doctor_against_the_running_server(gateway: GatewayProcess) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "app.cli", "doctor", "--config", str(gateway.config_path),
         "--url", gateway.base_url],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert not [line for line in lines if re.match(r"\s*fail\b", line)]
    for check in ("config", "health", "models"):
        assert any(check in line for line in lines), check
