"""The levels `make bench` runs against each server, one function per level.

A level is `async def name(ctx: LevelContext) -> LevelOutcome`, registered with `@level("name")`
and compared across servers through the `Comparison`s it declares (which metric, which way is
better, the target ratio). `bench.compare_mlx_lm` runs the selected levels in registry order on
each server of each round and reports per metric the median over rounds and the ratio.
To add a level: write the function, decorate it, declare its comparisons. Nothing else.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import httpx

from app.ops.bench import (
    VARIED_PROMPTS,
    LevelResult,
    RssSampler,
    SSEParser,
    chat_url,
    run_probe,
    stream_chat,
)
from bench.prefix_cache import TokenCounter


@dataclass
class LevelContext:
    server: str  # "gateway" or "mlx_lm"
    base_url: str
    model: str
    server_pid: int
    model_dir: Path
    count_tokens: TokenCounter
    options: Any  # the parsed command line (requests, max_tokens, long_tokens...)
    round: int


@dataclass
class LevelOutcome:
    metrics: dict[str, float]  # what the comparisons read; "peak_rss_mib" by convention
    detail: str = ""  # a line or a markdown table for the per-round part of the report
    raw: list[LevelResult] = field(default_factory=list)  # probe levels, when there are any


LevelFn = Callable[[LevelContext], Awaitable[LevelOutcome]]
LEVELS: dict[str, LevelFn] = {}


@dataclass(frozen=True)
class Comparison:
    level: str
    metric: str
    label: str
    better: Literal["higher", "lower"]
    # The ratio gateway / mlx_lm.server must reach (>= for higher, <= for lower); None: shown.
    target: float | None = None
    # Or a bound on the gateway's own value (e.g. the mixed gap over its median gap).
    own_max: float | None = None


COMPARISONS: list[Comparison] = []


def level(name: str, *comparisons: Comparison) -> Callable[[LevelFn], LevelFn]:
    def register(fn: LevelFn) -> LevelFn:
        LEVELS[name] = fn
        COMPARISONS.extend(comparisons)
        return fn
    return register


# ---------------------------------------------------------------- throughput


def _throughput(clients: int) -> LevelFn:
    async def run(ctx: LevelContext) -> LevelOutcome:
        (result,) = await run_probe(
            ctx.base_url, model=ctx.model, levels=[clients],
            requests_per_client=ctx.options.requests, prompt=VARIED_PROMPTS[0],
            prompts=VARIED_PROMPTS, max_tokens=ctx.options.max_tokens, api_key=None,
            server_pid=ctx.server_pid, temperature=0.0)
        metrics = {"tokens_per_s": result.tokens_per_s}
        if result.ttft_p95 is not None:
            metrics["ttft_p95_ms"] = result.ttft_p95 * 1000
        if result.peak_rss_bytes:
            metrics["peak_rss_mib"] = result.peak_rss_bytes / 2**20
        return LevelOutcome(metrics, raw=[result])
    return run


level("1-client",
      Comparison("1-client", "tokens_per_s", "tokens/s, 1 client", "higher", 1.2))(
    _throughput(1))
level("10-clients",
      Comparison("10-clients", "tokens_per_s", "tokens/s, 10 clients", "higher", 1.5),
      Comparison("10-clients", "ttft_p95_ms", "TTFT p95 ms, 10 clients", "lower"))(
    _throughput(10))


# ---------------------------------------------------------------- mixed


MIXED_STREAMS = 8


def long_document(count: TokenCounter, tokens: int, nonce: str) -> list[dict[str, Any]]:
    """A user message of about `tokens` prompt tokens that no server has seen (the nonce)."""
    lines = [f"Document {nonce}."]

    def messages() -> list[dict[str, Any]]:
        return [{"role": "user", "content": "\n".join(lines) + "\nWhich bay got most?"}]

    while (have := count(messages())) < tokens:
        # About 25 tokens a line: add nine tenths of what is missing, then measure again.
        for _ in range(max(1, (tokens - have) * 9 // 250)):
            n = len(lines)
            lines.append(f"Entry {n}: crate {n * 7 % 997} went to bay {n % 13}, checked by "
                         f"inspector {n % 29}.")
    return messages()


async def _stream_times(client: httpx.AsyncClient, url: str, body: dict[str, Any],
                        times: list[float], stop: asyncio.Event) -> None:
    """Stream one chat completion, appending the arrival time of every content chunk, until
    it ends or `stop` is set."""
    parser = SSEParser()
    async with client.stream("POST", url, json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread())[:200]!r}")
        async for raw in response.aiter_raw():
            now = time.perf_counter()
            for event in parser.feed(raw):
                if event.data.strip() == "[DONE]":
                    return
                payload = json.loads(event.data)
                for choice in payload.get("choices") or []:
                    if (choice.get("delta") or {}).get("content"):
                        times.append(now)
            if stop.is_set():
                return


def gaps_during(times: list[float], start: float, end: float) -> tuple[list[float], list[float]]:
    """(gaps before `start`, gaps that overlap [start, end]) between consecutive chunk times.
    A gap overlaps the window when it ends after `start` and began before `end`."""
    before, during = [], []
    for a, b in itertools.pairwise(times):
        if b <= start:
            before.append(b - a)
        elif a < end:
            during.append(b - a)
    return before, during


@level("mixed",
       Comparison("mixed", "longest_gap_ms", "mixed: longest gap during the long prefill, ms",
                  "lower", 0.5),
       Comparison("mixed", "gap_over_median", "mixed: longest gap / median gap", "lower",
                  own_max=3.0))
async def mixed(ctx: LevelContext) -> LevelOutcome:
    """8 streaming clients; once each has its first tokens, a ~4,000-token prompt arrives.
    Reports the running streams' longest inter-token gap while it prefilled (from its arrival
    to its first token) against their median gap before it arrived."""
    url = chat_url(ctx.base_url)
    long_messages = long_document(ctx.count_tokens, ctx.options.long_tokens,
                                  f"{ctx.server}-{ctx.round}-{uuid.uuid4().hex[:8]}")
    stop = asyncio.Event()
    times: list[list[float]] = [[] for _ in range(MIXED_STREAMS)]
    limits = httpx.Limits(max_connections=MIXED_STREAMS + 2)
    async with httpx.AsyncClient(timeout=httpx.Timeout(1800.0), limits=limits) as client, \
            RssSampler(ctx.server_pid) as rss:
        streams = [asyncio.create_task(_stream_times(client, url, {
            "model": ctx.model, "stream": True, "temperature": 0.0, "max_tokens": 4096,
            "messages": [{"role": "user", "content": f"Story {i}: " + VARIED_PROMPTS[1]}],
        }, times[i], stop)) for i in range(MIXED_STREAMS)]
        deadline = time.monotonic() + 600
        while min(len(t) for t in times) < 12:  # every stream decoding, a steady median
            if time.monotonic() > deadline or any(s.done() for s in streams):
                break
            await asyncio.sleep(0.05)
        sent = time.perf_counter()
        long = await stream_chat(client, url, {
            "model": ctx.model, "messages": long_messages, "max_tokens": 1, "stream": True,
            "temperature": 0.0, "stream_options": {"include_usage": True}}, {})
        first_token = sent + (long.ttft if long.ttft is not None else 0.0)
        await asyncio.sleep(0.5)  # the gap that ends after the first token still counts
        stop.set()
        for task in streams:
            task.cancel()
        await asyncio.gather(*streams, return_exceptions=True)
    before: list[float] = []
    during: list[float] = []
    for stream_times in times:
        b, d = gaps_during(stream_times, sent, first_token)
        before.extend(b)
        during.extend(d)
    if not long.ok or not before or not during:
        raise RuntimeError(f"mixed level incomplete: long ok={long.ok} ({long.error}), "
                           f"{len(before)} gaps before, {len(during)} during")
    median = statistics.median(before)
    longest = max(during)
    metrics = {"median_gap_ms": median * 1000, "longest_gap_ms": longest * 1000,
               "gap_over_median": longest / median, "long_ttft_s": first_token - sent,
               "long_prompt_tokens": float(long.prompt_tokens or 0)}
    if rss.peak:
        metrics["peak_rss_mib"] = rss.peak / 2**20
    detail = (f"mixed: long prompt {long.prompt_tokens} tokens, TTFT {first_token - sent:.1f} s; "
              f"running streams' median gap {median * 1000:.0f} ms, longest during its "
              f"prefill {longest * 1000:.0f} ms ({longest / median:.1f}x), "
              f"{len(during)} gaps in that window")
    return LevelOutcome(metrics, detail)


COMPARISONS.append(Comparison("*", "peak_rss_mib", "peak RSS MiB (any level)", "lower", 1.2))
