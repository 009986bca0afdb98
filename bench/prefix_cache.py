"""Prefix-cache scenarios, each as TTFT of a second request over the first's:

- a conversation's second turn after a first turn that finished (`first_vs_second_turn`);
- a second turn after a first turn the client stopped after one token (`stopped_then_continued`);
- two requests with one long prefix sent a second apart (`shared_prefix_apart`).

Every history starts with a fresh nonce so a first request can never hit a cache left by an
earlier run. `python -m bench.prefix_cache` starts a gateway on the demo model's float32 copy
and runs the three (the first is also part of `make bench`, against mlx_lm.server too).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shlex
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from app.ops.bench import SSEParser, chat_url, stream_chat

Messages = list[dict[str, Any]]
TokenCounter = Callable[[Messages], int]

_COLORS = ["red", "green", "amber", "violet", "grey", "golden", "pale", "dark"]
_THINGS = ["fox", "heron", "otter", "lynx", "crane", "badger", "seal", "wren"]
_PLACES = ["harbour", "orchard", "quarry", "marsh", "library", "bridge", "mill", "ridge"]
_ITEMS = ["lanterns", "letters", "stones", "apples", "ropes", "maps", "keys", "shells"]


def token_counter(model_dir: Path) -> TokenCounter:
    """Count prompt tokens with the model's own chat template; a rough estimate otherwise."""
    try:
        from transformers import AutoTokenizer  # the dependency mlx_lm already brings

        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))

        def count(messages: Messages) -> int:
            # Render then encode: apply_chat_template's tokenized return type varies by version.
            text = tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=False
            )
            return len(tokenizer.encode(text, add_special_tokens=False))

        count([{"role": "user", "content": "probe"}])
        return count
    except Exception:  # any tokenizer trouble falls back to the estimate
        return lambda messages: sum(len(str(m.get("content", ""))) for m in messages) // 4


def _note(rng: random.Random, index: int) -> str:
    return (
        f"Note {index}: the {rng.choice(_COLORS)} {rng.choice(_THINGS)} near the "
        f"{rng.choice(_PLACES)} carried {rng.randint(2, 99)} {rng.choice(_ITEMS)}."
    )


def build_history(target_tokens: int, count: TokenCounter, nonce: str) -> Messages:
    """System prompt plus user/assistant exchanges of varied notes, grown to ~target tokens."""
    rng = random.Random(nonce)
    history: Messages = [
        {"role": "system", "content": f"Session {nonce}. You keep a logbook of notes."}
    ]
    index = 0
    while count(history) < target_tokens:
        if index > 4 * target_tokens:  # a counter that never grows must not loop forever
            raise RuntimeError("token counter does not grow with the history")
        notes = " ".join(_note(rng, index + i) for i in range(4))
        index += 4
        history.append({"role": "user", "content": f"Please log these. {notes}"})
        history.append({"role": "assistant", "content": f"Logged notes {index - 4}-{index - 1}."})
    return history


@dataclass
class PrefixResult:
    history_tokens: int
    first_ttft: float  # median over repetitions, seconds
    second_ttft: float
    first_prompt_tokens: int | None
    second_prompt_tokens: int | None
    repeats: int

    @property
    def ratio(self) -> float:
        return self.second_ttft / self.first_ttft


async def first_vs_second_turn(
    base_url: str,
    *,
    model: str,
    count: TokenCounter,
    history_tokens: int = 1000,
    repeats: int = 3,
    max_tokens: int = 24,
    api_key: str | None = None,
) -> PrefixResult:
    url = chat_url(base_url)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    firsts: list[float] = []
    seconds: list[float] = []
    prompt_sizes: list[tuple[int | None, int | None]] = []
    measured = 0
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0)) as client:

        async def turn(messages: Messages) -> tuple[float, str, int | None]:
            body = {"model": model, "messages": messages, "max_tokens": max_tokens,
                    "temperature": 0.0, "stream": True,
                    "stream_options": {"include_usage": True}}
            result = await stream_chat(client, url, body, headers)
            if not result.ok or result.ttft is None:
                raise RuntimeError(f"prefix-cache turn failed: {result.error}")
            return result.ttft, result.text, result.prompt_tokens

        for _ in range(repeats):
            history = build_history(history_tokens, count, uuid.uuid4().hex)
            measured = count(history)
            first_messages = [*history, {"role": "user", "content": "Which animals were logged?"}]
            first, answer, first_prompt = await turn(first_messages)
            second_messages = [
                *first_messages,
                {"role": "assistant", "content": answer},
                {"role": "user", "content": "And which places?"},
            ]
            second, _, second_prompt = await turn(second_messages)
            firsts.append(first)
            seconds.append(second)
            prompt_sizes.append((first_prompt, second_prompt))
    return PrefixResult(
        history_tokens=measured,
        first_ttft=statistics.median(firsts),
        second_ttft=statistics.median(seconds),
        first_prompt_tokens=prompt_sizes[-1][0],
        second_prompt_tokens=prompt_sizes[-1][1],
        repeats=repeats,
    )


async def _first_chunk_then_abort(client: httpx.AsyncClient, url: str, body: dict[str, Any],
                                  headers: dict[str, str]) -> tuple[float, str]:
    """Stream until the first content chunk, then hang up (a user pressing "stop")."""
    start = time.perf_counter()
    parser = SSEParser()
    async with client.stream("POST", url, json=body, headers=headers) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread())[:200]!r}")
        async for raw in response.aiter_raw():
            for event in parser.feed(raw):
                if event.data.strip() == "[DONE]":
                    raise RuntimeError("the stream ended before its first content chunk")
                payload = json.loads(event.data)
                for choice in payload.get("choices") or []:
                    content = (choice.get("delta") or {}).get("content")
                    if content:
                        return time.perf_counter() - start, content
    raise RuntimeError("the stream ended before its first content chunk")


async def stopped_then_continued(
    base_url: str, *, model: str, count: TokenCounter, history_tokens: int = 1000,
    repeats: int = 3, max_tokens: int = 24, api_key: str | None = None,
) -> PrefixResult:
    """Turn 1 is stopped by the client after its first token; turn 2 continues the chat with
    what was shown. Turn 2's TTFT / turn 1's is the issue-20 target (<= 0.2)."""
    url = chat_url(base_url)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    firsts: list[float] = []
    seconds: list[float] = []
    sizes: tuple[int | None, int | None] = (None, None)
    measured = 0
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0)) as client:
        for _ in range(repeats):
            history = build_history(history_tokens, count, uuid.uuid4().hex)
            measured = count(history)
            first_messages = [*history, {"role": "user", "content": "Which animals were logged?"}]
            body = {"model": model, "messages": first_messages, "max_tokens": 256,
                    "temperature": 0.0, "stream": True}
            first, shown = await _first_chunk_then_abort(client, url, body, headers)
            await asyncio.sleep(0.2)  # the server notices the hang-up (a human is slower)
            second_messages = [*first_messages, {"role": "assistant", "content": shown},
                               {"role": "user", "content": "Go on."}]
            result = await stream_chat(client, url, {
                "model": model, "messages": second_messages, "max_tokens": max_tokens,
                "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True},
            }, headers)
            if not result.ok or result.ttft is None:
                raise RuntimeError(f"second turn failed: {result.error}")
            firsts.append(first)
            seconds.append(result.ttft)
            sizes = (count(first_messages), result.prompt_tokens)
    return PrefixResult(history_tokens=measured, first_ttft=statistics.median(firsts),
                        second_ttft=statistics.median(seconds), first_prompt_tokens=sizes[0],
                        second_prompt_tokens=sizes[1], repeats=repeats)


async def shared_prefix_apart(
    base_url: str, *, model: str, count: TokenCounter, prefix_tokens: int = 4000,
    gap: float = 1.0, repeats: int = 2, max_tokens: int = 16,
    api_key: str | None = None,
) -> PrefixResult:
    """Two requests with one ~`prefix_tokens` prefix and different last questions, the second
    sent `gap` seconds after the first: each one's TTFT
    from its own send. Issue 20's target: second / first <= 0.3 at gap 1 s."""
    url = chat_url(base_url)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    firsts: list[float] = []
    seconds: list[float] = []
    sizes: tuple[int | None, int | None] = (None, None)
    measured = 0
    async with httpx.AsyncClient(timeout=httpx.Timeout(900.0)) as client:

        def body(messages: Messages) -> dict[str, Any]:
            return {"model": model, "messages": messages, "max_tokens": max_tokens,
                    "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True}}

        for _ in range(repeats):
            shared = build_history(prefix_tokens, count, uuid.uuid4().hex)
            measured = count(shared)
            one = [*shared, {"role": "user", "content": "Which animals were logged?"}]
            two = [*shared, {"role": "user", "content": "Which places were named?"}]
            first_task = asyncio.create_task(stream_chat(client, url, body(one), headers))
            await asyncio.sleep(gap)
            second = await stream_chat(client, url, body(two), headers)
            first = await first_task
            if not (first.ok and second.ok) or first.ttft is None or second.ttft is None:
                raise RuntimeError(f"shared-prefix requests failed: {first.error} {second.error}")
            firsts.append(first.ttft)
            seconds.append(second.ttft)
            sizes = (first.prompt_tokens, second.prompt_tokens)
    return PrefixResult(history_tokens=measured, first_ttft=statistics.median(firsts),
                        second_ttft=statistics.median(seconds), first_prompt_tokens=sizes[0],
                        second_prompt_tokens=sizes[1], repeats=repeats)


def _row(name: str, target: str, limit: float | None, r: PrefixResult) -> str:
    met = "-" if limit is None else ("yes" if r.ratio <= limit else "**no**")
    return (f"| {name} | {r.history_tokens} | {r.first_prompt_tokens} | {r.first_ttft * 1000:.0f} "
            f"| {r.second_prompt_tokens} | {r.second_ttft * 1000:.0f} | {r.ratio:.2f} "
            f"| {target} | {met} |")


async def _scenarios(base_url: str, model: str, count: TokenCounter,
                     args: argparse.Namespace) -> list[str]:
    rows = []
    only = set(args.only or ["turn", "stopped", "apart"])
    if "turn" in only:
        done = await first_vs_second_turn(base_url, model=model, count=count,
                                          history_tokens=args.history_tokens,
                                          repeats=args.repeats)
        rows.append(_row("turn 2 after a finished turn 1", "<= 0.5", 0.5, done))
    if "stopped" in only:
        stopped = await stopped_then_continued(base_url, model=model, count=count,
                                               history_tokens=args.history_tokens,
                                               repeats=args.repeats)
        rows.append(_row("turn 2 after turn 1 stopped at its first token", "<= 0.2", 0.2,
                         stopped))
    if "apart" not in only:
        return rows
    apart = await shared_prefix_apart(base_url, model=model, count=count,
                                      prefix_tokens=args.prefix_tokens, gap=args.gap,
                                      repeats=args.repeats)
    rows.append(_row(f"same ~{args.prefix_tokens}-token prefix, sent {args.gap:g} s apart",
                     "<= 0.3", 0.3, apart))
    return rows


def main(argv: list[str] | None = None) -> int:
    from app.models.variants import make_float_variant
    from bench import servers

    parser = argparse.ArgumentParser(description="Prefix-cache TTFT scenarios on a gateway.")
    parser.add_argument("--model-dir", type=Path, default=None,
                        help="An MLX folder (default: the demo model); a float32 copy is used.")
    parser.add_argument("--url", default=None, help="Probe a running gateway instead.")
    parser.add_argument("--model", default=None, help="With --url: the model to ask.")
    parser.add_argument("--history-tokens", type=int, default=1000)
    parser.add_argument("--prefix-tokens", type=int, default=4000)
    parser.add_argument("--gap", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", action="append", choices=["turn", "stopped", "apart"],
                        help="Run only these scenarios (repeatable).")
    args = parser.parse_args(argv)
    if args.model_dir is None:
        from app.models.demo import demo_model_dir
        from app.settings import load_settings

        args.model_dir = demo_model_dir(load_settings().cache_dir)
    source: Path = args.model_dir
    model_dir = make_float_variant(source, source.parent / f"{source.name}-float32", "float32",
                                   exist_ok=True)
    count = token_counter(model_dir)
    if args.url:
        rows = asyncio.run(_scenarios(args.url, args.model or "default", count, args))
        server = f"the gateway at {args.url}"
    else:
        with tempfile.TemporaryDirectory(prefix="mlxgw-prefix-") as tmp:
            spec = servers.gateway_spec(model_dir, servers.free_port(), 1, Path(tmp),
                                        sys.executable)
            with servers.running(spec, servers.bench_env(), Path(tmp) / "server.log"):
                rows = asyncio.run(_scenarios(spec.base_url, spec.model, count, args))
            server = f"`{shlex.join(spec.argv)}` ({spec.settings})"
    command = "python -m bench.prefix_cache " + shlex.join(
        argv if argv is not None else sys.argv[1:])
    print(f"- Command: `{command}`; server: {server}; weights {model_dir}; medians of "
          f"{args.repeats}, temperature 0\n")
    print("| scenario | shared tokens | request 1 prompt tokens | request 1 TTFT ms "
          "| request 2 prompt tokens | request 2 TTFT ms | 2 / 1 | target | met |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
