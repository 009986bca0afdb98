"""`mlx-gateway bench --soak`: N clients for M minutes against a running gateway, every third
stream aborted after its first chunk, and what the server looks like afterwards.

A 24/7 process must come back to rest: after the load every in-flight gauge must read 0 again,
and its resident memory may not keep climbing (the drift is measured from the end of a warm-up,
so the first allocations of the model, MLX's buffers and the prefix cache are not counted).
Every prompt is new (a nonce) and of varied length, so the prefix cache keeps filling and
evicting for the whole run.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import statistics
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx

from app.ops.bench import SSEParser, chat_url, tree_rss

# Gauges that must return to 0 once no request is running.
INFLIGHT_GAUGES = ("mlxgw_inflight_requests", "mlxgw_admission_inflight", "mlxgw_admission_queued")
RSS_SAMPLE_SECONDS = 1.0
SETTLE_SECONDS = 30.0  # how long the gauges get to reach 0 after the last client stopped

_WORDS = ("harbour", "lantern", "heron", "orchard", "quarry", "marsh", "bridge", "mill",
          "ridge", "letters", "stones", "ropes", "maps", "keys", "shells", "otter")


@dataclass
class SoakResult:
    clients: int
    seconds: float
    warmup_seconds: float
    requests: int = 0
    completed: int = 0
    aborted: int = 0
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    gauges_after: dict[str, float] = field(default_factory=dict)
    prefix_cache_bytes: float | None = None
    rss_start: int | None = None  # bytes, process tree, before the load
    rss_warm: int | None = None  # median over the first minute after the warm-up
    rss_end: int | None = None  # median over the last minute of the load
    rss_peak: int | None = None
    rss_after: int | None = None  # once the gauges settled

    @property
    def drift(self) -> float | None:
        """Growth of RSS from the end of the warm-up to the end of the load (0.1 = 10%)."""
        if not self.rss_warm or self.rss_end is None:
            return None
        return (self.rss_end - self.rss_warm) / self.rss_warm

    @property
    def settled(self) -> bool:
        return bool(self.gauges_after) and all(v == 0 for v in self.gauges_after.values())

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "drift": self.drift, "settled": self.settled}


def soak_prompt(rng: random.Random) -> str:
    """A prompt nobody sent before, about 40 to 300 tokens long."""
    words = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(10, 200)))
    return f"Request {uuid.uuid4().hex}. Summarise these words in one sentence: {words}"


async def _one_stream(client: httpx.AsyncClient, url: str, body: dict[str, Any],
                      headers: dict[str, str], abort: bool) -> str | None:
    """Run one stream; None when it went as planned, else the error."""
    parser = SSEParser()
    try:
        async with client.stream("POST", url, json=body, headers=headers) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode("utf-8", "replace")
                return f"HTTP {response.status_code}: {text[:160]}"
            async for raw in response.aiter_raw():
                for event in parser.feed(raw):
                    if event.data.strip() == "[DONE]":
                        return None
                    payload = json.loads(event.data)
                    if "error" in payload:
                        return f"stream error: {payload['error']}"
                    choices = payload.get("choices") or []
                    if abort and any((c.get("delta") or {}).get("content") for c in choices):
                        return None  # leaving the block closes the connection mid-stream
    except (httpx.HTTPError, ValueError) as error:
        return f"{type(error).__name__}: {error}"
    return "stream ended without [DONE]"


async def read_gauges(client: httpx.AsyncClient, base_url: str,
                      headers: dict[str, str]) -> dict[str, float]:
    root = base_url.rstrip("/").removesuffix("/v1")
    text = (await client.get(f"{root}/metrics", headers=headers)).text
    values: dict[str, float] = {}
    for name in (*INFLIGHT_GAUGES, "mlxgw_prefix_cache_bytes"):
        found = re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M)
        if found:
            values[name] = sum(float(v) for v in found)
    return values


async def run_soak(
    base_url: str, *, model: str, clients: int, seconds: float, warmup_seconds: float,
    max_tokens: int = 48, api_key: str | None = None, server_pid: int | None = None,
    seed: int = 0,
) -> SoakResult:
    url = chat_url(base_url)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    result = SoakResult(clients=clients, seconds=seconds, warmup_seconds=warmup_seconds)
    rng = random.Random(seed)  # noqa: S311 - varied test prompts, not secrets
    counter = 0
    samples: list[tuple[float, int]] = []
    start = time.monotonic()
    stop_at = start + seconds

    async def sample_rss() -> None:
        while True:
            if server_pid is not None:
                rss = await asyncio.to_thread(tree_rss, server_pid)
                if rss is not None:
                    samples.append((time.monotonic() - start, rss[0]))
            await asyncio.sleep(RSS_SAMPLE_SECONDS)

    async def one_client(client: httpx.AsyncClient) -> None:
        nonlocal counter
        while time.monotonic() < stop_at:
            counter += 1
            abort = counter % 3 == 0  # every third stream is abandoned after its first chunk
            body = {"model": model, "stream": True, "temperature": 0.0,
                    "max_tokens": rng.randint(max_tokens // 2, max_tokens),
                    "messages": [{"role": "user", "content": soak_prompt(rng)}]}
            error = await _one_stream(client, url, body, headers, abort)
            result.requests += 1
            if error is not None:
                result.errors += 1
                if len(result.error_samples) < 5:
                    result.error_samples.append(error)
            elif abort:
                result.aborted += 1
            else:
                result.completed += 1

    limits = httpx.Limits(max_connections=clients + 2, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=httpx.Timeout(300.0), limits=limits) as client:
        if server_pid is not None:
            first = await asyncio.to_thread(tree_rss, server_pid)
            result.rss_start = first[0] if first else None
        sampler = asyncio.create_task(sample_rss())
        try:
            await asyncio.gather(*(one_client(client) for _ in range(clients)))
        finally:
            sampler.cancel()
        deadline = time.monotonic() + SETTLE_SECONDS
        while True:
            result.gauges_after = await read_gauges(client, base_url, headers)
            if result.settled or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
        result.prefix_cache_bytes = result.gauges_after.pop("mlxgw_prefix_cache_bytes", None)
    if server_pid is not None:
        after = tree_rss(server_pid)
        result.rss_after = after[0] if after else None
    _rss_summary(result, samples)
    return result


def _rss_summary(result: SoakResult, samples: list[tuple[float, int]]) -> None:
    if not samples:
        return
    end = samples[-1][0]
    window = min(60.0, max((end - result.warmup_seconds) / 3, RSS_SAMPLE_SECONDS))
    warm = [rss for t, rss in samples if result.warmup_seconds <= t < result.warmup_seconds
            + window]
    last = [rss for t, rss in samples if t >= end - window]
    result.rss_warm = int(statistics.median(warm)) if warm else None
    result.rss_end = int(statistics.median(last)) if last else None
    result.rss_peak = max(rss for _, rss in samples)


def render(result: SoakResult) -> str:
    def mib(value: float | None) -> str:
        return "-" if value is None else f"{value / 2**20:.0f}"

    drift = result.drift
    rows = [
        ("clients", str(result.clients)),
        ("duration s (warm-up s)", f"{result.seconds:.0f} ({result.warmup_seconds:.0f})"),
        ("requests", str(result.requests)),
        ("completed", str(result.completed)),
        ("aborted after first chunk", str(result.aborted)),
        ("errors", str(result.errors)),
        ("in-flight gauges after", ", ".join(f"{k} {v:g}" for k, v in
                                             result.gauges_after.items()) or "-"),
        ("prefix cache MiB after", mib(result.prefix_cache_bytes)),
        ("RSS MiB start / warm / end / peak / after",
         " / ".join(mib(v) for v in (result.rss_start, result.rss_warm, result.rss_end,
                                      result.rss_peak, result.rss_after))),
        ("RSS drift after warm-up", "-" if drift is None else f"{drift * 100:+.1f}%"),
    ]
    lines = ["| measure | value |", "| --- | ---: |"]
    lines += [f"| {name} | {value} |" for name, value in rows]
    return "\n".join(lines)


def passed(result: SoakResult, max_drift: float = 0.15) -> bool:
    drift = result.drift
    return result.settled and result.errors == 0 and (drift is None or drift <= max_drift)
