"""`mlx-gateway bench`: the seeds' concurrency probe against any OpenAI-compatible base URL.

For each level N, N clients run at once, each sending `requests_per_client` streaming chat
completions one after another. Per request we time the first content delta (TTFT) and the
whole stream (latency); per level we report percentiles, errors, aggregate generated tokens/s
(sum of completion tokens of successful requests / wall time of the level) and, when the
server is a local process, its peak resident memory sampled while the level ran.

Percentiles use linear interpolation between closest ranks (numpy's default, Excel's
PERCENTILE.INC): for sorted x[0..n-1], rank r = q/100 * (n-1), result x[floor r] + frac(r) *
(x[ceil r] - x[floor r]). It is exact, needs no binning and gives p50 = median.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import structlog

log = structlog.get_logger(__name__)

DEFAULT_PROMPT = (
    "Write a long, detailed story about a lighthouse keeper who finds a message in a bottle. "
    "Describe the sea, the weather and every step of the keeper's day."
)
_REPORT = " ".join(
    f"Day {i}: the {('north', 'east', 'south', 'west')[i % 4]} wind reached {12 + i % 9} knots, "
    f"{('rain', 'fog', 'sun', 'hail')[i % 4]} until noon, {3 + i % 5} ships passed the point."
    for i in range(24))
# Prompts of different lengths (about 40, 80, 250 and 600 tokens with the demo model's
# tokenizer): a probe that repeats one short prompt measures decoding alone and lets a prefix
# cache answer every prefill.
VARIED_PROMPTS: tuple[str, ...] = (
    "Tell me a story about a fox who learns to sail.",
    DEFAULT_PROMPT + " Give the keeper a name, a dog and a secret, and end with a storm.",
    "Here is a keeper's log. " + _REPORT[:700] + " Continue the log for the next ten days.",
    "Summarise this log, then write the keeper's letter to the harbour master about it. "
    + _REPORT,
)
RSS_INTERVAL_SECONDS = 0.1


# ---------------------------------------------------------------- statistics


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation between closest ranks.

    Raises ValueError on an empty sequence or q outside [0, 100]: a silent 0 would read as
    a (very good) measurement.
    """
    if not values:
        raise ValueError("percentile of an empty sequence")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {q}")
    ordered = sorted(values)
    rank = q / 100 * (len(ordered) - 1)
    low = math.floor(rank)
    high = math.ceil(rank)
    return ordered[low] + (rank - low) * (ordered[high] - ordered[low])


# ---------------------------------------------------------------- SSE parsing


@dataclass(frozen=True)
class SSEEvent:
    data: str
    event: str | None = None


class SSEParser:
    """Incremental server-sent-events parser fed with raw bytes as they arrive.

    Lines are split on bytes before decoding so a UTF-8 character cut between two network
    reads is never decoded half. Comment lines (`: ping`) are dropped; an event is dispatched
    at a blank line, with its `data:` lines joined by newlines as the SSE spec says.
    """

    def __init__(self) -> None:
        self._buffer = b""
        self._data: list[str] = []
        self._event: str | None = None

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        self._buffer += chunk
        events: list[SSEEvent] = []
        while True:
            newline = self._buffer.find(b"\n")
            if newline < 0:
                break
            raw, self._buffer = self._buffer[:newline], self._buffer[newline + 1 :]
            event = self._line(raw.rstrip(b"\r").decode("utf-8"))
            if event is not None:
                events.append(event)
        return events

    def close(self) -> list[SSEEvent]:
        """Flush a last event a server sent without its final blank line."""
        events = self.feed(b"\n") if self._buffer else []
        if self._data:
            events.append(self._dispatch())
        return events

    def _line(self, line: str) -> SSEEvent | None:
        if line == "":
            return self._dispatch() if self._data else None
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        return None

    def _dispatch(self) -> SSEEvent:
        event = SSEEvent(data="\n".join(self._data), event=self._event)
        self._data, self._event = [], None
        return event


# ---------------------------------------------------------------- one request


@dataclass
class RequestResult:
    ok: bool
    ttft: float | None = None
    latency: float | None = None
    completion_tokens: int = 0
    exact_tokens: bool = False  # from the usage chunk rather than counted chunks
    prompt_tokens: int | None = None  # from the usage chunk, when sent
    cached_tokens: int | None = None  # usage.prompt_tokens_details.cached_tokens, when sent
    text: str = ""
    error: str | None = None


def chat_url(base_url: str) -> str:
    """`http://host:port` or `http://host:port/v1` -> `.../v1/chat/completions`."""
    parts = urlsplit(base_url.rstrip("/"))
    path = parts.path or "/v1"
    return urlunsplit((parts.scheme, parts.netloc, path + "/chat/completions", "", ""))


def _messages(prompt: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt


async def stream_chat(
    client: httpx.AsyncClient,
    url: str,
    body: dict[str, Any],
    headers: dict[str, str],
) -> RequestResult:
    """Send one streaming chat completion and time it; never raises for server faults."""
    start = time.perf_counter()
    ttft: float | None = None
    chunks = 0
    usage_tokens: int | None = None
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    pieces: list[str] = []
    done = False
    parser = SSEParser()
    try:
        async with client.stream("POST", url, json=body, headers=headers) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode("utf-8", "replace")
                return RequestResult(ok=False, error=f"HTTP {response.status_code}: {text[:200]}")
            async for raw in response.aiter_raw():
                for event in parser.feed(raw):
                    if event.data.strip() == "[DONE]":
                        done = True
                        continue
                    payload = json.loads(event.data)
                    if "error" in payload:
                        return RequestResult(ok=False, error=f"stream error: {payload['error']}")
                    usage = payload.get("usage")
                    if usage and usage.get("completion_tokens") is not None:
                        usage_tokens = int(usage["completion_tokens"])
                        prompt_tokens = usage.get("prompt_tokens")
                        details = usage.get("prompt_tokens_details") or {}
                        cached_tokens = details.get("cached_tokens")
                    for choice in payload.get("choices") or []:
                        content = (choice.get("delta") or {}).get("content")
                        if content:
                            chunks += 1
                            pieces.append(content)
                            if ttft is None:
                                ttft = time.perf_counter() - start
            for event in parser.close():
                done = done or event.data.strip() == "[DONE]"
    # ValueError covers bad JSON and bad UTF-8; Type/AttributeError a payload of the wrong shape.
    except (httpx.HTTPError, ValueError, TypeError, AttributeError) as error:
        return RequestResult(ok=False, error=f"{type(error).__name__}: {error}")
    latency = time.perf_counter() - start
    if not done:
        return RequestResult(ok=False, latency=latency, error="stream ended without [DONE]")
    tokens = usage_tokens if usage_tokens is not None else chunks
    return RequestResult(
        ok=True,
        # A stream with no content at all (immediate EOS) has its first byte at the end.
        ttft=ttft if ttft is not None else latency,
        latency=latency,
        completion_tokens=tokens,
        exact_tokens=usage_tokens is not None,
        prompt_tokens=prompt_tokens,
        cached_tokens=cached_tokens,
        text="".join(pieces),
    )


# ---------------------------------------------------------------- memory of the server


def _linux_tree_rss(root: int) -> tuple[int, int] | None:
    """(sum of VmRSS, sum of VmHWM) in bytes over `root` and all its descendants."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name may hold spaces and parentheses: the ppid follows the last ')'.
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    rss = hwm = 0
    found = False
    pending = [root]
    while pending:
        pid = pending.pop()
        pending.extend(children.get(pid, []))
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        found = True
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                rss += int(line.split()[1]) * 1024
            elif line.startswith("VmHWM:"):
                hwm += int(line.split()[1]) * 1024
    return (rss, hwm) if found else None


def _ps_tree_rss(root: int) -> tuple[int, int] | None:
    """macOS and other systems without /proc: `ps` RSS (KiB) over the process tree."""
    try:
        output = subprocess.run(
            ["ps", "-A", "-o", "pid=,ppid=,rss="], capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    rows = [tuple(int(part) for part in line.split()) for line in output.splitlines() if line]
    by_parent: dict[int, list[tuple[int, int]]] = {}
    own: int | None = None
    for pid, ppid, rss_kib in rows:
        by_parent.setdefault(ppid, []).append((pid, rss_kib))
        if pid == root:
            own = rss_kib
    if own is None:
        return None
    total = own
    pending = [root]
    while pending:
        for pid, rss_kib in by_parent.get(pending.pop(), []):
            total += rss_kib
            pending.append(pid)
    return total * 1024, 0  # ps has no high-water mark


def tree_rss(pid: int) -> tuple[int, int] | None:
    """(current RSS, high-water RSS or 0) of a process and its children, or None if gone."""
    if Path("/proc/self/status").exists():
        return _linux_tree_rss(pid)
    return _ps_tree_rss(pid)


class RssSampler:
    """Samples a process tree's RSS in the background; `peak` is the largest sum seen."""

    def __init__(self, pid: int, interval: float = RSS_INTERVAL_SECONDS) -> None:
        self.pid = pid
        self.interval = interval
        self.peak = 0
        self.hwm = 0
        self._task: asyncio.Task[None] | None = None

    async def _sample(self) -> None:
        # /proc scans are blocking file reads: keep them off the loop that times requests.
        sample = await asyncio.to_thread(tree_rss, self.pid)
        if sample is not None:
            self.peak = max(self.peak, sample[0])
            self.hwm = max(self.hwm, sample[1])

    async def _run(self) -> None:
        while True:
            await self._sample()
            await asyncio.sleep(self.interval)

    async def __aenter__(self) -> RssSampler:
        await self._sample()
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._sample()


# ---------------------------------------------------------------- levels


@dataclass
class LevelResult:
    level: int
    requests: int
    errors: int
    ttft_p50: float | None
    ttft_p95: float | None
    latency_p50: float | None
    latency_p95: float | None
    tokens_per_s: float
    completion_tokens: int
    wall_seconds: float
    exact_tokens: bool  # every successful request reported usage
    peak_rss_bytes: int | None = None
    hwm_rss_bytes: int | None = None  # kernel high-water mark (process lifetime), Linux only
    error_samples: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def summarize(
    level: int,
    results: Sequence[RequestResult],
    wall_seconds: float,
    peak_rss_bytes: int | None = None,
    hwm_rss_bytes: int | None = None,
) -> LevelResult:
    good = [r for r in results if r.ok]
    ttfts = [r.ttft for r in good if r.ttft is not None]
    latencies = [r.latency for r in good if r.latency is not None]
    tokens = sum(r.completion_tokens for r in good)
    errors = [r.error or "unknown error" for r in results if not r.ok]
    return LevelResult(
        level=level,
        requests=len(results),
        errors=len(errors),
        ttft_p50=percentile(ttfts, 50) if ttfts else None,
        ttft_p95=percentile(ttfts, 95) if ttfts else None,
        latency_p50=percentile(latencies, 50) if latencies else None,
        latency_p95=percentile(latencies, 95) if latencies else None,
        tokens_per_s=tokens / wall_seconds if wall_seconds > 0 else 0.0,
        completion_tokens=tokens,
        wall_seconds=wall_seconds,
        exact_tokens=bool(good) and all(r.exact_tokens for r in good),
        peak_rss_bytes=peak_rss_bytes,
        hwm_rss_bytes=hwm_rss_bytes,
        error_samples=sorted(set(errors))[:3],
    )


async def run_probe(
    base_url: str,
    *,
    model: str,
    levels: list[int] = [1, 5, 10],  # noqa: B006 - read only, the documented default
    requests_per_client: int,
    prompt: str | list[dict[str, Any]],
    max_tokens: int,
    api_key: str | None,
    server_pid: int | None,
    prompts: Sequence[str | list[dict[str, Any]]] = (),
    temperature: float = 0.0,
    warmup: int = 1,
    request_timeout: float = 600.0,
    on_level: Callable[[LevelResult], None] | None = None,
    extra_body: dict[str, Any] | None = None,
) -> list[LevelResult]:
    """Run every level in turn against `base_url` and return one LevelResult per level.

    `warmup` requests are sent first and not counted, so a lazily loaded model is not
    billed to the first level. Connection limits are sized to the largest level so clients
    never queue inside httpx. `on_level` sees each level as soon as it ends (progress).
    `extra_body` adds request fields (e.g. a response_format, to price constrained decoding).
    `prompts`, when given, replaces `prompt`: client c's k-th request sends prompts[(c + k) % n],
    so every level mixes prompt lengths.
    """
    if not levels or any(level < 1 for level in levels):
        raise ValueError("levels must be positive integers")
    if requests_per_client < 1:
        raise ValueError("requests_per_client must be at least 1")
    url = chat_url(base_url)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    body: dict[str, Any] = {
        "model": model,
        "messages": _messages(prompts[0] if prompts else prompt),
        "max_tokens": max_tokens,
        "temperature": temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
        **(extra_body or {}),
    }
    limits = httpx.Limits(max_connections=max(levels) + 1, max_keepalive_connections=max(levels))
    results: list[LevelResult] = []
    async with httpx.AsyncClient(timeout=httpx.Timeout(request_timeout), limits=limits) as client:
        for _ in range(warmup):
            first = await stream_chat(client, url, body, headers)
            if not first.ok:
                log.warning("bench.warmup_failed", url=url, error=first.error)

        def body_for(client_index: int, request_index: int) -> dict[str, Any]:
            if not prompts:
                return body
            chosen = prompts[(client_index + request_index) % len(prompts)]
            return {**body, "messages": _messages(chosen)}

        async def one_client(index: int) -> list[RequestResult]:
            return [await stream_chat(client, url, body_for(index, k), headers)
                    for k in range(requests_per_client)]

        for level in levels:
            async with contextlib.AsyncExitStack() as stack:
                sampler = None
                if server_pid is not None:
                    sampler = await stack.enter_async_context(RssSampler(server_pid))
                start = time.perf_counter()
                per_client = await asyncio.gather(*(one_client(c) for c in range(level)))
                wall = time.perf_counter() - start
            flat = [result for batch in per_client for result in batch]
            summary = summarize(
                level,
                flat,
                wall,
                peak_rss_bytes=(sampler.peak or None) if sampler else None,
                hwm_rss_bytes=(sampler.hwm or None) if sampler else None,
            )
            results.append(summary)
            if on_level is not None:
                on_level(summary)
    return results


# ---------------------------------------------------------------- rendering


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f}"


def _s(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.2f}"


def _mib(nbytes: int | None) -> str:
    return "-" if nbytes is None else f"{nbytes / 2**20:.0f}"


TABLE_HEADERS = (
    "clients", "requests", "errors", "ttft p50 ms", "ttft p95 ms",
    "latency p50 s", "latency p95 s", "tokens/s", "peak RSS MiB",
)


def table_rows(results: Iterable[LevelResult]) -> list[tuple[str, ...]]:
    return [
        (
            str(r.level), str(r.requests), str(r.errors), _ms(r.ttft_p50), _ms(r.ttft_p95),
            _s(r.latency_p50), _s(r.latency_p95),
            f"{r.tokens_per_s:.1f}" + ("" if r.exact_tokens else "~"), _mib(r.peak_rss_bytes),
        )
        for r in results
    ]


def render_table(results: Iterable[LevelResult], *, markdown: bool = False) -> str:
    """An aligned text table (numbers right-aligned); `markdown=True` for RESULTS.md.

    A `~` after tokens/s means some server sent no usage chunk and tokens were counted as
    content chunks, which can undercount when a chunk carries several tokens.
    """
    rows = [TABLE_HEADERS, *table_rows(results)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(TABLE_HEADERS))]

    def line(row: Sequence[str]) -> str:
        cells = [cell.rjust(width) for cell, width in zip(row, widths, strict=True)]
        return ("| " + " | ".join(cells) + " |") if markdown else "  ".join(cells)

    out = [line(rows[0])]
    if markdown:
        out.append("| " + " | ".join("-" * (w - 1) + ":" for w in widths) + " |")
    else:
        out.append("  ".join("-" * w for w in widths))
    out.extend(line(row) for row in rows[1:])
    return "\n".join(out)


# ---------------------------------------------------------------- CLI


def _levels(text: str) -> list[int]:
    try:
        levels = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected levels like 1,5,10, got {text!r}") from None
    if not levels or any(level < 1 for level in levels):
        raise argparse.ArgumentTypeError(f"levels must be positive integers, got {text!r}")
    return levels


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _run_soak(args: argparse.Namespace) -> int:
    from app.ops import soak

    result = asyncio.run(soak.run_soak(
        args.url, model=args.model, clients=args.clients, seconds=args.minutes * 60,
        warmup_seconds=args.warmup, max_tokens=args.max_tokens,
        api_key=args.key or os.environ.get("MLXGW_BENCH_KEY"), server_pid=args.pid,
    ))
    if args.json:
        sys.stdout.write(json.dumps(result.to_dict(), indent=2) + "\n")
    else:
        sys.stdout.write(soak.render(result) + "\n")
        for sample in result.error_samples:
            sys.stdout.write(f"error: {sample}\n")
    return 0 if soak.passed(result) else 1


def _run_command(args: argparse.Namespace) -> int:
    if args.soak:
        return _run_soak(args)
    results = asyncio.run(
        run_probe(
            args.url,
            model=args.model,
            levels=args.levels,
            requests_per_client=args.requests,
            prompt=args.prompt,
            max_tokens=args.max_tokens,
            api_key=args.key or os.environ.get("MLXGW_BENCH_KEY"),
            server_pid=args.pid,
            temperature=args.temperature,
        )
    )
    if args.json:
        sys.stdout.write(json.dumps([r.to_dict() for r in results], indent=2) + "\n")
    else:
        sys.stdout.write(render_table(results) + "\n")
        for r in results:
            for sample in r.error_samples:
                sys.stdout.write(f"level {r.level} error: {sample}\n")
    return 1 if any(r.errors == r.requests for r in results) else 0


def add_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="Concurrency probe against any OpenAI-compatible server.",
        description="Streams chat completions at 1, 5 and 10 parallel clients (by default) and "
        "reports TTFT and latency p50/p95, generated tokens/s and the server's peak RSS.",
    )
    parser.add_argument("--url", required=True, help="Base URL, e.g. http://127.0.0.1:8000/v1.")
    parser.add_argument("--model", required=True, help="The `model` sent in every request.")
    parser.add_argument("--levels", type=_levels, default=[1, 5, 10],
                        help="Comma-separated parallel client counts (default 1,5,10).")
    parser.add_argument("--requests", type=_positive, default=3,
                        help="Requests each client sends per level (default 3).")
    parser.add_argument("--max-tokens", type=_positive, default=128, help="max_tokens per request.")
    parser.add_argument("--temperature", type=float, default=0.0, help="Sampling temperature.")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help="The user message.")
    parser.add_argument("--key", default=None,
                        help="API key (default: $MLXGW_BENCH_KEY, else none).")
    parser.add_argument("--pid", type=_positive, default=None,
                        help="Local server process id whose peak RSS to sample.")
    parser.add_argument("--json", action="store_true", help="Print JSON instead of a table.")
    soak = parser.add_argument_group(
        "soak", "--soak: CLIENTS clients stream for MINUTES minutes, every third stream "
        "abandoned after its first chunk; reports errors, the in-flight gauges once idle (must "
        "be 0) and the RSS drift after WARMUP seconds (with --pid; must be <= 15%%). Exits 1 "
        "when either fails.")
    soak.add_argument("--soak", action="store_true", help="Run the soak test instead.")
    soak.add_argument("--clients", type=_positive, default=10, help="Soak clients (default 10).")
    soak.add_argument("--minutes", type=float, default=5.0, help="Soak duration (default 5).")
    soak.add_argument("--warmup", type=float, default=60.0,
                      help="Seconds of load before the RSS baseline is taken (default 60).")
    parser.set_defaults(handler=_run_command)
