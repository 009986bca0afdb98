"""The bench probe: percentile math, SSE parsing, table rendering, and a run against a real
streaming server started here (a minimal Starlette app emitting OpenAI-shaped chunks)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from app.ops import bench
from app.ops.bench import LevelResult, SSEEvent, SSEParser, percentile, render_table, run_probe
from tests.local_server import free_port, serving

# ---------------------------------------------------------------- percentile


def test_percentile_linear_interpolation_matches_hand_computed_values() -> None:
    values = [15.0, 20.0, 35.0, 40.0, 50.0]
    assert percentile(values, 0) == 15.0
    assert percentile(values, 100) == 50.0
    assert percentile(values, 50) == 35.0
    # rank = 0.4 * 4 = 1.6 -> 20 + 0.6 * (35 - 20)
    assert percentile(values, 40) == pytest.approx(29.0)
    # rank = 0.95 * 4 = 3.8 -> 40 + 0.8 * 10
    assert percentile(values, 95) == pytest.approx(48.0)


def test_percentile_ignores_input_order_and_handles_one_value() -> None:
    assert percentile([3.0, 1.0, 2.0, 4.0], 50) == pytest.approx(2.5)
    assert percentile([7.0], 95) == 7.0


def test_percentile_matches_numpy_linear_on_many_values() -> None:
    numpy = pytest.importorskip("numpy")
    values = [float((i * 37) % 101) / 7 for i in range(1, 60)]
    for q in (1, 5, 25, 50, 75, 90, 95, 99):
        assert percentile(values, q) == pytest.approx(float(numpy.percentile(values, q)))


@pytest.mark.parametrize("q", [-1, 100.5])
def test_percentile_rejects_out_of_range_q(q: float) -> None:
    with pytest.raises(ValueError, match="percentile"):
        percentile([1.0, 2.0], q)


def test_percentile_rejects_empty_input() -> None:
    with pytest.raises(ValueError, match="empty"):
        percentile([], 50)


# ---------------------------------------------------------------- SSE parser


def test_sse_parser_reassembles_events_split_across_reads() -> None:
    stream = b'data: {"a": 1}\n\ndata: {"b": 2}\n\ndata: [DONE]\n\n'
    parser = SSEParser()
    events: list[SSEEvent] = []
    for i in range(len(stream)):  # the worst case: one byte per read
        events.extend(parser.feed(stream[i : i + 1]))
    events.extend(parser.close())
    assert [e.data for e in events] == ['{"a": 1}', '{"b": 2}', "[DONE]"]


def test_sse_parser_keeps_a_multibyte_character_split_between_reads() -> None:
    encoded = 'data: {"t": "naïve ☃"}\n\n'.encode()
    cut = encoded.index("☃".encode()) + 1  # inside the three-byte snowman
    parser = SSEParser()
    events = parser.feed(encoded[:cut]) + parser.feed(encoded[cut:])
    assert [json.loads(e.data)["t"] for e in events] == ["naïve ☃"]


def test_sse_parser_drops_ping_comments_and_reads_event_names() -> None:
    parser = SSEParser()
    events = parser.feed(
        b": ping\n\n"
        b"event: message_delta\r\ndata: one\r\ndata: two\r\n\r\n"
        b":another comment\n"
        b"data:no-space\n\n"
    )
    assert events == [
        SSEEvent(data="one\ntwo", event="message_delta"),
        SSEEvent(data="no-space", event=None),
    ]


def test_sse_parser_flushes_a_final_event_without_blank_line() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: [DONE]") == []
    assert parser.close() == [SSEEvent(data="[DONE]")]


# ---------------------------------------------------------------- table


def _level(level: int, **overrides: Any) -> LevelResult:
    values: dict[str, Any] = dict(
        level=level, requests=level * 3, errors=0, ttft_p50=0.0421, ttft_p95=0.1234,
        latency_p50=1.5, latency_p95=2.25, tokens_per_s=123.456, completion_tokens=999,
        wall_seconds=8.1, exact_tokens=True, peak_rss_bytes=300 * 2**20,
    )
    values.update(overrides)
    return LevelResult(**values)


def test_render_table_aligns_columns_and_formats_units() -> None:
    text = render_table([
        _level(1),
        _level(10, errors=2, ttft_p95=None, exact_tokens=False, peak_rss_bytes=None),
    ])
    lines = text.splitlines()
    assert len(lines) == 4
    assert lines[0].split()[:3] == ["clients", "requests", "errors"]
    assert set(lines[1]) <= {"-", " "}
    # Every line has the same width and the columns end at the same offsets.
    assert len({len(line) for line in lines}) == 1
    first, second = lines[2].split(), lines[3].split()
    assert first == ["1", "3", "0", "42", "123", "1.50", "2.25", "123.5", "300"]
    assert second == ["10", "30", "2", "42", "-", "1.50", "2.25", "123.5~", "-"]
    assert lines[2].index("123.5") + len("123.5") == lines[3].index("123.5~") + len("123.5~")


def test_render_table_markdown_has_header_separator_and_pipes() -> None:
    lines = render_table([_level(5)], markdown=True).splitlines()
    assert lines[0].startswith("| clients |")
    assert lines[1].startswith("|") and lines[1].rstrip("|").strip().endswith(":")
    assert lines[2].split("|")[1].strip() == "5"


# ---------------------------------------------------------------- CLI parsing


def test_bench_command_parses_levels_and_rejects_bad_ones() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    bench.add_commands(sub)
    args = parser.parse_args(["bench", "--url", "http://x/v1", "--model", "m", "--levels", "2,4"])
    assert args.levels == [2, 4] and args.handler is bench._run_command
    assert args.requests == 3 and args.json is False
    for bad in (["--levels", "1,zero"], ["--levels", "0"], ["--requests", "0"]):
        with pytest.raises(SystemExit):
            parser.parse_args(["bench", "--url", "u", "--model", "m", *bad])


def test_chat_url_accepts_base_urls_with_and_without_v1() -> None:
    assert bench.chat_url("http://h:1") == "http://h:1/v1/chat/completions"
    assert bench.chat_url("http://h:1/v1/") == "http://h:1/v1/chat/completions"
    assert bench.chat_url("https://h/proxy/v1") == "https://h/proxy/v1/chat/completions"


# ---------------------------------------------------------------- memory sampling


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc")
def test_tree_rss_includes_children() -> None:
    child = subprocess.Popen(
        [sys.executable, "-c",
         "import sys; b = bytearray(64 * 2**20); print('ready', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        child_only = bench.tree_rss(child.pid)
        with_parent = bench.tree_rss(os.getpid())
        assert child_only is not None and with_parent is not None
        assert child_only[0] > 60 * 2**20
        assert child_only[1] >= child_only[0]  # the high-water mark is never below current
        # This test process itself holds well over 10 MiB, on top of its child.
        assert with_parent[0] >= child_only[0] + 10 * 2**20
        ps_view = bench._ps_tree_rss(child.pid)
        assert ps_view is not None and ps_view[0] > 60 * 2**20
    finally:
        child.kill()
        child.wait()
    assert bench.tree_rss(child.pid) is None


# ---------------------------------------------------------------- against a real server

HAS_PROC = os.path.exists("/proc/self/status")
TOKENS = ["Once", " upon", " a", " time", ",", " there", " was", " a", " lamp"]


class FakeServer:
    """OpenAI-shaped streaming endpoint. Models pick behaviours:

    - "ok": one content chunk per token, `: ping` comments in between, usage if asked;
    - "nousage": never sends a usage chunk (tokens must be counted from chunks);
    - "flaky": every third request (by arrival) is a 500;
    - "midstream": sends a token, then an error event and no [DONE].
    """

    def __init__(self) -> None:
        self.arrivals = 0
        self.lock = threading.Lock()
        self.bodies: list[dict[str, Any]] = []
        self.auth: list[str | None] = []

    async def chat(self, request: Request) -> Response:
        body = await request.json()
        with self.lock:
            self.arrivals += 1
            arrival = self.arrivals
            self.bodies.append(body)
            self.auth.append(request.headers.get("authorization"))
        model = body["model"]
        if model == "flaky" and arrival % 3 == 0:
            return JSONResponse({"error": {"message": "boom", "type": "server_error",
                                           "param": None, "code": None}}, status_code=500)
        count = min(body["max_tokens"], len(TOKENS))
        usage = (body.get("stream_options") or {}).get("include_usage") and model != "nousage"

        async def events() -> AsyncIterator[bytes]:
            yield b": ping\n\n"
            base = {"id": "c1", "object": "chat.completion.chunk", "model": model}
            role = {**base, "choices": [{"index": 0, "delta": {"role": "assistant"}}]}
            yield f"data: {json.dumps(role)}\n\n".encode()
            for i, token in enumerate(TOKENS[:count]):
                chunk = {**base, "choices": [{"index": 0, "delta": {"content": token}}]}
                yield f"data: {json.dumps(chunk)}\n\n".encode()
                if model == "midstream":
                    error = {"error": {"message": "engine failed", "type": "server_error"}}
                    yield f"data: {json.dumps(error)}\n\n".encode()
                    return
                if i % 3 == 0:
                    yield b": ping\n\n"
            stop = {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]}
            yield f"data: {json.dumps(stop)}\n\n".encode()
            if usage:
                # Deliberately unlike the chunk count, to prove usage wins when present.
                tail = {**base, "choices": [],
                        "usage": {"prompt_tokens": 5, "completion_tokens": count * 2,
                                  "total_tokens": 5 + count * 2}}
                yield f"data: {json.dumps(tail)}\n\n".encode()
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")



@pytest.fixture(scope="module")
def fake_server() -> Iterator[tuple[str, FakeServer]]:
    fake = FakeServer()
    app = Starlette(routes=[Route("/v1/chat/completions", fake.chat, methods=["POST"])])
    with serving(app) as port:
        yield f"http://127.0.0.1:{port}/v1", fake


async def test_run_probe_counts_requests_tokens_and_prefers_usage(
    fake_server: tuple[str, FakeServer],
) -> None:
    url, fake = fake_server
    before = len(fake.bodies)
    seen: list[LevelResult] = []
    results = await run_probe(
        url, model="ok", levels=[1, 3], requests_per_client=2, prompt="hi", max_tokens=4,
        api_key="sk-test", server_pid=os.getpid(), warmup=1, on_level=seen.append,
    )
    assert seen == results
    assert [r.level for r in results] == [1, 3]
    assert [r.requests for r in results] == [2, 6]
    assert [r.errors for r in results] == [0, 0]
    # Usage says 2 * 4 = 8 tokens per request; 4 content chunks would give 4.
    assert [r.completion_tokens for r in results] == [16, 48]
    assert all(r.exact_tokens for r in results)
    for r in results:
        assert r.ttft_p50 is not None and r.ttft_p95 is not None
        assert r.latency_p50 is not None and r.latency_p95 is not None
        assert 0 < r.ttft_p50 <= r.latency_p95
        assert r.tokens_per_s == pytest.approx(r.completion_tokens / r.wall_seconds)
        if HAS_PROC:
            assert r.peak_rss_bytes is not None and r.peak_rss_bytes > 10 * 2**20
            assert r.hwm_rss_bytes is not None and r.hwm_rss_bytes >= r.peak_rss_bytes
    # Warm-up + 2 + 6 requests reached the server, each a streaming request with usage.
    sent = fake.bodies[before:]
    assert len(sent) == 9
    assert all(b["stream"] is True and b["stream_options"] == {"include_usage": True}
               for b in sent)
    assert sent[0]["messages"] == [{"role": "user", "content": "hi"}]
    assert sent[0]["temperature"] == 0.0 and sent[0]["max_tokens"] == 4
    assert set(fake.auth[before:]) == {"Bearer sk-test"}


async def test_run_probe_falls_back_to_counting_content_chunks(
    fake_server: tuple[str, FakeServer],
) -> None:
    url, _ = fake_server
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    (result,) = await run_probe(
        url, model="nousage", levels=[2], requests_per_client=2, prompt=messages,
        max_tokens=50, api_key=None, server_pid=None, warmup=0,
    )
    assert result.errors == 0
    assert result.completion_tokens == 4 * len(TOKENS)
    assert result.exact_tokens is False
    assert result.peak_rss_bytes is None
    assert "~" in render_table([result])


async def test_run_probe_accounts_http_errors_per_level(
    fake_server: tuple[str, FakeServer],
) -> None:
    url, fake = fake_server
    with fake.lock:
        fake.arrivals = 0  # "flaky" fails arrivals 3, 6, 9
    results = await run_probe(
        url, model="flaky", levels=[1, 2], requests_per_client=3, prompt="hi", max_tokens=3,
        api_key=None, server_pid=None, warmup=0,
    )
    assert [(r.requests, r.errors) for r in results] == [(3, 1), (6, 2)]
    # Only successful requests count: usage says 6 tokens each.
    assert [r.completion_tokens for r in results] == [12, 24]
    assert results[0].error_samples and results[0].error_samples[0].startswith("HTTP 500")
    assert "boom" in results[0].error_samples[0]


async def test_run_probe_counts_mid_stream_errors_and_refused_connections(
    fake_server: tuple[str, FakeServer],
) -> None:
    url, _ = fake_server
    (broken,) = await run_probe(
        url, model="midstream", levels=[2], requests_per_client=1, prompt="hi", max_tokens=5,
        api_key=None, server_pid=None, warmup=0,
    )
    assert (broken.requests, broken.errors) == (2, 2)
    assert broken.ttft_p50 is None and broken.completion_tokens == 0
    assert "engine failed" in broken.error_samples[0]

    (refused,) = await run_probe(
        f"http://127.0.0.1:{free_port()}/v1", model="ok", levels=[1], requests_per_client=2,
        prompt="hi", max_tokens=5, api_key=None, server_pid=None, warmup=0,
    )
    assert (refused.requests, refused.errors) == (2, 2)
    assert refused.error_samples[0].startswith("ConnectError")


# ---------------------------------------------------------------- bench/compare_mlx_lm rounds


def test_compare_report_gives_medians_over_rounds_and_checks_targets() -> None:
    from bench.compare_mlx_lm import ServerRun, report
    from bench.levels import LevelOutcome

    def run(key: str, one: float, ten: float, gap: float, rss: float) -> ServerRun:
        outcomes = {
            "1-client": LevelOutcome({"tokens_per_s": one, "peak_rss_mib": rss}),
            "10-clients": LevelOutcome({"tokens_per_s": ten, "ttft_p95_ms": 900.0,
                                        "peak_rss_mib": rss}),
            "mixed": LevelOutcome({"longest_gap_ms": gap, "gap_over_median": gap / 100,
                                   "peak_rss_mib": rss + 10}, "mixed: detail line"),
        }
        return ServerRun(key, "settings", outcomes, None, "cmd")

    rounds = [{"gateway": run("gateway", *ours), "mlx_lm": run("mlx_lm", 10.0, 40.0, 2000.0,
                                                               300.0)}
              for ours in ((13.0, 60.0, 250.0, 330.0), (11.0, 50.0, 400.0, 340.0),
                           (12.0, 70.0, 200.0, 320.0))]
    args = argparse.Namespace(requests=2, max_tokens=64, levels=["1-client", "10-clients",
                              "mixed"], history_tokens=0, mlx_lm_blas="same", long_tokens=4000)
    text = report(args, Path("/m"), rounds, [(1.0, 2.0, 3.0)])
    assert "### Round 3" in text and "3 rounds" in text and "mixed: detail line" in text
    # Medians over rounds: gateway 12 vs 10 tokens/s at 1 client -> 1.20, meets >= 1.2x.
    assert "| tokens/s, 1 client | 12.0 | 10.0 | 1.20 | 13.0 / 10.0, 11.0 / 10.0, 12.0 / 10.0 " \
           "| >= 1.2x | yes |" in text
    assert "| tokens/s, 10 clients | 60.0 | 40.0 | 1.50 |" in text
    # The mixed gap: median 250 ms vs 2000 -> 0.125 (<= 0.5x), and 2.5x its own median gap.
    assert "| mixed: longest gap during the long prefill, ms | 250.0 | 2000.0 | 0.12 |" in text
    assert "| mixed: longest gap / median gap | 2.5 | 20.0 | 0.12 | " in text
    assert "<= 3 (gateway) | yes |" in text
    # Peak RSS: the largest level of each round (mixed), median over rounds 340 vs 310.
    assert "| peak RSS MiB (any level) | 340.0 | 310.0 | 1.10 |" in text


def test_bench_env_can_leave_mlx_lm_openblas_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    from bench import servers

    monkeypatch.setenv("OPENBLAS_THREAD_TIMEOUT", "16")
    assert servers.bench_env()["OPENBLAS_THREAD_TIMEOUT"] == "16"
    assert "OPENBLAS_THREAD_TIMEOUT" not in servers.bench_env(blas_settings=False)


def test_mixed_gaps_split_at_the_long_prompts_window() -> None:
    from bench.levels import gaps_during

    times = [0.0, 0.1, 0.2, 0.3, 1.5, 1.6, 3.0, 3.1]
    before, during = gaps_during(times, start=0.25, end=2.9)
    assert before == pytest.approx([0.1, 0.1])
    # The gap that spans the arrival (0.2 -> 0.3) and the one that ends after the first token
    # of the long prompt (1.6 -> 3.0) both count.
    assert during == pytest.approx([0.1, 1.2, 0.1, 1.4])


def test_level_names_are_checked() -> None:
    from bench.compare_mlx_lm import parse_args

    args = parse_args(["--model-dir", "/m", "--levels", "mixed,1-client"])
    assert args.levels == ["mixed", "1-client"] and args.rounds == 3
    with pytest.raises(SystemExit):
        parse_args(["--model-dir", "/m", "--levels", "nope"])


# ---------------------------------------------------------------- bench/restart


def test_restart_section_judges_each_round_against_the_target() -> None:
    from bench.restart import RestartRound, section

    rounds = [RestartRound(4000, 100.0, 5.0, 3999, True), RestartRound(4000, 100.0, 30.0, 0, False)]
    text = section(rounds, {"load + verify (engine thread)": 0.5, "file MB": 184.0}, 4000, "cmd")
    lines = text.splitlines()
    assert "| 1 | 4000 | 100.00 | 5.00 | 3999 | yes | 0.050 | yes |" in lines
    assert "| 2 | 4000 | 100.00 | 30.00 | 0 | **no** | 0.300 | **no** |" in lines
    assert "| median | | | | | | 0.175 | yes |" in lines
    assert "| load + verify (engine thread) | 500 |" in lines and "184 MB" in text
