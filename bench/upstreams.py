"""What a hop through a gateway's upstream costs, and what a fallback costs (issue 16).

Starts a "remote" gateway B (the demo model) and a gateway A whose upstream is B, plus a tiny
stub upstream that answers at once (tests/misbehaving_upstream.py's `echo`), then times, in
alternating order per round:

- direct to B vs through A (`remote:MODEL`): non-stream max_tokens 1, and a stream's time to
  its first content chunk;
- the stub direct vs through A (`stub:echo`): the relay's own cost, with no model in it;
- a route whose first target is a closed port, then B: what falling over costs.

    python -m bench.upstreams --model-dir <demo model folder> [--rounds 15]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import tomli_w

from bench.servers import REPO_ROOT, bench_env, free_port
from tests.local_server import serving
from tests.misbehaving_upstream import Misbehaving

MODEL = "bench-model"
HELLO = [{"role": "user", "content": "Say hello."}]


def _start(workdir: Path, config: dict[str, Any], env: dict[str, str]) -> tuple[
        subprocess.Popen[bytes], str]:
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = {"cache_dir": str(workdir / "cache"), "config_dir": str(workdir / "config"),
              "state_dir": str(workdir / "state"), "auth": {"enabled": False}, **config}
    (workdir / "config.toml").write_text(tomli_w.dumps(config))
    log = (workdir / "server.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "serve", "--config", str(workdir / "config.toml"),
         "--port", str(port)], cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/ready", timeout=2).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    process.kill()
    raise TimeoutError(f"{workdir.name} did not become ready")


def _timed(call: Callable[[], None]) -> float:
    started = time.perf_counter()
    call()
    return (time.perf_counter() - started) * 1000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args(argv)
    env = {**bench_env(), "PYTHONPATH": str(REPO_ROOT)}
    with tempfile.TemporaryDirectory() as tmp, serving(Misbehaving()) as stub_port:
        stub = f"http://127.0.0.1:{stub_port}/v1"
        b, b_url = _start(Path(tmp) / "b", {
            "limits": {"per_ip_rpm": 0},
            "models": [{"id": MODEL, "path": str(args.model_dir)}]}, env)
        a, a_url = _start(Path(tmp) / "a", {
            "limits": {"per_ip_rpm": 0},
            "models": [{"id": MODEL, "path": str(args.model_dir)}],
            "upstreams": [
                {"id": "remote", "base_url": b_url + "/v1", "models": [MODEL]},
                {"id": "stub", "base_url": stub, "models": ["echo"], "health_interval": 0},
                {"id": "closed", "base_url": f"http://127.0.0.1:{free_port()}/v1",
                 "models": ["any"], "health_interval": 0, "breaker_failures": 1000}],
            "routes": [{"name": "fall-over", "chain": ["closed:any", f"remote:{MODEL}"]}],
        }, env)
        try:
            results = _measure(a_url, b_url, stub, args.rounds)
        finally:
            for process in (a, b):
                process.terminate()
                process.wait(60)
    print(json.dumps({"load_average": os.getloadavg(), "rounds": args.rounds, **results},
                     indent=2))
    return 0


def _measure(a_url: str, b_url: str, stub: str, rounds: int) -> dict[str, float]:
    http = httpx.Client(timeout=120)

    def chat(url: str, model: str, max_tokens: int = 1) -> Callable[[], None]:
        def call() -> None:
            response = http.post(url + "/v1/chat/completions", json={
                "model": model, "messages": HELLO, "max_tokens": max_tokens,
                "temperature": 0})
            assert response.status_code == 200, response.text

        return call

    def first_chunk(url: str, model: str) -> Callable[[], None]:
        def call() -> None:
            with http.stream("POST", url + "/v1/chat/completions", json={
                    "model": model, "messages": HELLO, "max_tokens": 8, "stream": True,
                    "temperature": 0}) as response:
                next(line for line in response.iter_lines() if '"content":"' in line
                     and '"content":""' not in line)

        return call

    cases: dict[str, Callable[[], None]] = {
        "direct_b_ms": chat(b_url, MODEL),
        "via_a_ms": chat(a_url, f"remote:{MODEL}"),
        "fall_over_closed_port_ms": chat(a_url, "fall-over"),
        "direct_b_first_chunk_ms": first_chunk(b_url, MODEL),
        "via_a_first_chunk_ms": first_chunk(a_url, f"remote:{MODEL}"),
        "stub_direct_ms": chat(stub.removesuffix("/v1"), "echo"),
        "stub_via_a_ms": chat(a_url, "stub:echo"),
    }
    for call in cases.values():
        call()  # warm-up: connections, prompt cache
    samples: dict[str, list[float]] = {name: [] for name in cases}
    order = list(cases)
    for round_ in range(rounds):
        for name in order if round_ % 2 == 0 else reversed(order):
            samples[name].append(_timed(cases[name]))
    return {name: round(statistics.median(values), 1) for name, values in samples.items()}


if __name__ == "__main__":
    raise SystemExit(main())
