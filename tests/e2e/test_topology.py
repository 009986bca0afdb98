"""Several gateways behind one Caddy, sharing one Redis (issue 16): deploy/multi/ for real.

Two `mlx-gateway serve` processes run deploy/multi/gateway.toml (addresses, ports and the
model changed for this machine), a real Caddy runs deploy/multi/Caddyfile in front of them and
a real redis-server holds what they share. Nothing of ours is mocked.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.security.keys import KeyStore
from tests.caddy_server import GATEWAY_HEADER, running_caddy
from tests.e2e.conftest import DEMO_ID
from tests.e2e.gateway_process import ROOT, GatewayProcess
from tests.redis_server import RedisServer

pytestmark = pytest.mark.e2e
CLIENT_KEYS = 12  # enough that both gateways get some keys (all on one: 2 in 2**12)


def gateway_config(redis_url: str, model_dir: Path, **limits: int) -> dict[str, Any]:
    """The shipped example, pointed at this machine."""
    config = tomllib.loads((ROOT / "deploy" / "multi" / "gateway.toml").read_text())
    config["server"] |= {"host": "127.0.0.1", "trusted_proxies": ["127.0.0.1"],
                         "heartbeat_seconds": 0.2}
    # Exact counts need every limit check to reach Redis, even on a loaded test machine.
    config["redis"] |= {"url": redis_url, "timeout": 2.0}
    config["limits"] |= limits
    config["engine"] = {"default_max_tokens": 8}
    config["models"] = [{"id": DEMO_ID, "path": str(model_dir), "pinned": True}]
    return config


def start_all(gateways: list[GatewayProcess]) -> None:
    with concurrent.futures.ThreadPoolExecutor(len(gateways)) as pool:
        list(pool.map(lambda g: g.start(), gateways))


@dataclasses.dataclass
class Fleet:
    gateways: list[GatewayProcess]
    caddy: str
    admin: str
    clients: list[str]  # keys whose requests go through Caddy
    doomed: tuple[str, str]  # (id, token) of the key the revocation test revokes

    def port_of(self, name: str) -> GatewayProcess:
        return next(g for g in self.gateways if str(g.port) == name)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, demo_float32_dir: Path) -> Iterator[Fleet]:
    redis = RedisServer()
    redis.start()
    root = tmp_path_factory.mktemp("fleet")
    gateways = []
    for name in ("a", "b"):
        (root / name).mkdir()
        gateways.append(GatewayProcess(root / name, gateway_config(redis.url, demo_float32_dir)))
    # Keys are made on one machine and its keys file copied to the others (README).
    keys = KeyStore(root / "a" / "config" / "keys.json")
    admin = keys.create("ops", admin=True)[1]
    clients = [keys.create(f"client-{i}")[1] for i in range(CLIENT_KEYS)]
    doomed, doomed_token = keys.create("doomed")
    (root / "b" / "config").mkdir(parents=True)
    (root / "b" / "config" / "keys.json").write_bytes(keys.path.read_bytes())
    (root / "b" / "config" / "keys.json").chmod(0o600)
    try:
        start_all(gateways)
        with running_caddy(root, 0, probe_path="/ready",
                           gateway_ports=[g.port for g in gateways]) as caddy:
            yield Fleet(gateways, caddy, admin, clients, (doomed.id, doomed_token))
    finally:
        for gateway in gateways:
            gateway.stop()
        redis.stop()


def post(base: str, path: str, token: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(base + path, json=body, headers={"Authorization": f"Bearer {token}"},
                      timeout=120, verify=False)


def chat(base: str, token: str, text: str = "Say hi.") -> httpx.Response:
    return post(base, "/v1/chat/completions", token, {
        "model": DEMO_ID, "messages": [{"role": "user", "content": text}], "max_tokens": 4})


def test_a_responses_chain_started_on_one_gateway_continues_on_the_other(fleet: Fleet) -> None:
    one, two = fleet.gateways
    token = fleet.clients[0]
    first = post(one.base_url, "/v1/responses", token, {
        "model": DEMO_ID, "input": "My name is Ada.", "temperature": 0,
        "max_output_tokens": 8})
    assert first.status_code == 200, first.text
    first_body = first.json()
    second = post(two.base_url, "/v1/responses", token, {
        "model": DEMO_ID, "input": "What is my name?", "temperature": 0,
        "max_output_tokens": 8, "previous_response_id": first_body["id"]})
    assert second.status_code == 200, second.text
    body = second.json()
    assert body["previous_response_id"] == first_body["id"]
    # The second gateway read the first turn from Redis: its prompt holds that history.
    before = first_body["usage"]
    assert body["usage"]["input_tokens"] > before["input_tokens"] + before["output_tokens"]
    # And either gateway returns either turn.
    for gateway in fleet.gateways:
        for response_id in (first_body["id"], body["id"]):
            got = httpx.get(f"{gateway.base_url}/v1/responses/{response_id}",
                            headers={"Authorization": f"Bearer {token}"}, timeout=30)
            assert got.status_code == 200 and got.json()["id"] == response_id


def test_a_key_revoked_with_one_gateways_cli_is_refused_by_both(fleet: Fleet) -> None:
    key_id, token = fleet.doomed
    one, two = fleet.gateways
    for gateway in fleet.gateways:
        assert httpx.get(gateway.base_url + "/v1/models", timeout=30,
                         headers={"Authorization": f"Bearer {token}"}).status_code == 200
    done = subprocess.run(
        [sys.executable, "-m", "app.cli", "keys", "revoke", key_id,
         "--config", str(one.config_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert "every gateway sharing Redis" in done.stdout
    # The second gateway's own keys file still has the key active: only Redis tells it.
    assert not KeyStore(two.workdir / "config" / "keys.json").records()[-1].revoked
    for gateway in (two, one):
        deadline = time.monotonic() + 30  # a check interval is 1s; this is only a backstop
        while True:
            status = httpx.get(gateway.base_url + "/v1/models", timeout=30,
                               headers={"Authorization": f"Bearer {token}"}).status_code
            if status == 401:
                break
            assert status == 200 and time.monotonic() < deadline, status
            time.sleep(0.2)
    # Through Caddy too, whichever gateway it picks.
    assert chat(fleet.caddy, token).status_code == 401


@pytest.fixture(scope="module")
def routing(fleet: Fleet) -> dict[str, list[str]]:
    """Which gateway (its port) answered each client key's requests through Caddy."""
    served: dict[str, list[str]] = {}
    for token in fleet.clients:
        for _ in range(2):
            reply = chat(fleet.caddy, token)
            assert reply.status_code == 200, reply.text
            served.setdefault(token, []).append(reply.headers[GATEWAY_HEADER])
    return served


def test_caddy_keeps_each_key_on_one_gateway_and_spreads_keys(
        fleet: Fleet, routing: dict[str, list[str]]) -> None:
    assert all(len(set(ports)) == 1 for ports in routing.values()), routing
    used = {ports[0] for ports in routing.values()}
    assert used == {str(g.port) for g in fleet.gateways}, routing


def test_the_global_limit_holds_across_both_gateways(
        tmp_path: Path, demo_float32_dir: Path) -> None:
    """global_rpm counts every gateway's requests in one Redis budget."""
    with RedisServer() as redis:
        gateways = []
        for name in ("a", "b"):
            (tmp_path / name).mkdir()
            config = gateway_config(redis.url, demo_float32_dir, global_rpm=5)
            config["server"]["unready_delay"] = 0.0
            config["auth"] = {"enabled": False}
            gateways.append(GatewayProcess(tmp_path / name, config))
        try:
            start_all(gateways)
            statuses = [(gateway.port, httpx.get(gateway.base_url + "/v1/models",
                                                 timeout=30).status_code)
                        for _ in range(5) for gateway in gateways]
        finally:
            for gateway in gateways:
                gateway.stop()
    assert [status for _, status in statuses] == [200] * 5 + [429] * 5, statuses
    assert {port for port, status in statuses if status == 429} == {g.port for g in gateways}


@dataclasses.dataclass
class Outcome:
    key: str
    started_at: float
    ended_at: float = 0.0
    status: int | None = None
    gateway: str | None = None
    streamed: bool = False  # an SSE data line reached the client
    done: bool = False  # the stream ended with [DONE]
    error: str | None = None


def stream_once(base: str, token: str, hold: Callable[[Outcome], None]) -> Outcome:
    """One streamed chat completion; `hold` runs after its first data line."""
    outcome = Outcome(token, time.monotonic())
    body = {"model": DEMO_ID, "stream": True, "max_tokens": 16,
            "messages": [{"role": "user", "content": "Count to five."}]}
    try:
        with httpx.stream("POST", base + "/v1/chat/completions", json=body, verify=False,
                          headers={"Authorization": f"Bearer {token}"}, timeout=120) as reply:
            outcome.status = reply.status_code
            outcome.gateway = reply.headers.get(GATEWAY_HEADER)
            for line in reply.iter_lines():
                if line.startswith("data: {") and not outcome.streamed:
                    outcome.streamed = True
                    hold(outcome)
                outcome.done = outcome.done or line == "data: [DONE]"
    except httpx.HTTPError as error:
        outcome.error = repr(error)
    outcome.ended_at = time.monotonic()
    return outcome


def test_stopping_a_gateway_loses_no_request_that_had_not_started_streaming(
        fleet: Fleet, routing: dict[str, list[str]]) -> None:
    """Clients keep sending through Caddy while one gateway gets SIGTERM: its /ready turns 503,
    Caddy's active check moves new requests to the other, running streams finish, it exits."""
    victim, survivor = fleet.gateways
    victim_keys = {k for k, ports in routing.items() if ports[0] == str(victim.port)}
    outcomes: list[Outcome] = []
    lock = threading.Lock()
    stop_sending = threading.Event()
    holding, release = threading.Event(), threading.Event()
    held: list[Outcome] = []

    def hold(outcome: Outcome) -> None:
        """Keep one of the victim's streams open across the SIGTERM (the client reads the rest
        only once the gateway has stopped listening), so a stream in flight is always seen."""
        with lock:
            if held or outcome.gateway != str(victim.port):
                return
            held.append(outcome)
        holding.set()
        release.wait(120)

    def client(worker: int) -> None:
        turn = worker
        while not stop_sending.is_set():
            outcome = stream_once(fleet.caddy, fleet.clients[turn % len(fleet.clients)], hold)
            turn += 1
            with lock:
                outcomes.append(outcome)

    workers = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(4)]
    for worker in workers:
        worker.start()
    assert holding.wait(120), "no stream reached the gateway about to stop"

    sigterm_at = time.monotonic()
    exit_codes: list[int | None] = []
    stopper = threading.Thread(target=lambda: exit_codes.append(victim.stop()))
    stopper.start()
    readiness: list[str] = []  # what the stopping gateway's /ready said, until it stopped listening
    while stopper.is_alive():
        try:
            readiness.append(httpx.get(victim.base_url + "/ready", timeout=5).json()["status"])
        except httpx.HTTPError:
            break  # the drain has begun: the listener is closed
        time.sleep(0.1)
    release.set()
    stopper.join()
    exited_at = time.monotonic()
    stop_sending.set()
    # Every key of the stopped gateway, asked again now that it is gone.
    outcomes += [stream_once(fleet.caddy, key, lambda _: None) for key in sorted(victim_keys)]
    for worker in workers:
        worker.join(180)

    lost = [o for o in outcomes if not o.streamed and not (o.status == 200 and o.done)]
    cut = [o for o in outcomes if o.streamed and not o.done]
    in_flight = [o for o in outcomes if o.gateway == str(victim.port)
                 and o.started_at < sigterm_at < o.ended_at]
    moved = [o for o in outcomes if o.started_at > exited_at and o.key in victim_keys]
    summary = (f"sent {len(outcomes)}, answered {sum(o.done for o in outcomes)}, "
               f"in flight on the stopped gateway at SIGTERM {len(in_flight)}, "
               f"sent after SIGTERM {sum(o.started_at > sigterm_at for o in outcomes)}, "
               f"its keys served by the other after it exited {len(moved)}, "
               f"lost before streaming {len(lost)}, cut mid-stream {len(cut)}, "
               f"/ready while stopping {sorted(set(readiness))}, "
               f"stop took {exited_at - sigterm_at:.1f}s")
    print("\ntopology drain:", summary)
    assert not lost, [dataclasses.asdict(o) for o in lost[:5]]
    assert held[0].done, held[0]  # the stream open across the SIGTERM finished
    # Drained and shut down by itself, cleanly (not killed by stop()'s timeout, no abort in
    # native teardown).
    assert exit_codes == [0], victim.logs()[-3000:]
    assert "Application shutdown complete" in victim.logs()
    assert "draining" in readiness, readiness
    assert moved and all(o.gateway == str(survivor.port) and o.done for o in moved), summary
