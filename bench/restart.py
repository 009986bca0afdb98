"""The `restart` level: TTFT of a long prompt on a cold gateway, then again after the gateway
was stopped (SIGTERM) and started anew, with the disk prefix cache in between (issue 17,
target: after / cold <= 0.2). Plus the disk tier's own costs for a prefix of that length.

    python -m bench.restart --model-dir PATH [--prompt-tokens 4000] [--rounds 1]

Each round uses a fresh conversation (a nonce) and a fresh cache directory; both gateways get
one short warm-up request first, so TTFT measures the prompt, not the first MLX call. Also run
by `make bench` (bench.compare_mlx_lm --restart-tokens). Progress goes to stderr; a markdown
section for bench/RESULTS.md goes to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import structlog

from app.ops.bench import RequestResult, chat_url, stream_chat
from bench import servers
from bench.prefix_cache import Messages, build_history, token_counter

log = structlog.get_logger("bench.restart")


@dataclass
class RestartRound:
    prompt_tokens: int | None
    cold_ttft: float
    restart_ttft: float
    restart_cached_tokens: int | None
    same_answer: bool

    @property
    def ratio(self) -> float:
        return self.restart_ttft / self.cold_ttft


async def _ask(base_url: str, model: str, messages: Messages) -> RequestResult:
    body = {"model": model, "messages": messages, "max_tokens": 8, "temperature": 0.0,
            "stream": True, "stream_options": {"include_usage": True}}
    async with httpx.AsyncClient(timeout=httpx.Timeout(3600.0)) as client:
        result = await stream_chat(client, chat_url(base_url), body, {})
    if not result.ok or result.ttft is None:
        raise RuntimeError(f"restart level request failed: {result.error}")
    return result


def _serve_once(spec: servers.ServerSpec, log_path: Path, messages: Messages) -> RequestResult:
    """Start the gateway, warm it up, time `messages`, stop it (SIGTERM: queued disk writes
    are finished on the way out)."""
    with servers.running(spec, servers.bench_env(), log_path):
        asyncio.run(_ask(spec.base_url, spec.model, [{"role": "user", "content": "Hi"}]))
        return asyncio.run(_ask(spec.base_url, spec.model, messages))


def restart_round(model_dir: Path, workdir: Path, prompt_tokens: int) -> RestartRound:
    count = token_counter(model_dir)
    history = build_history(prompt_tokens, count, uuid.uuid4().hex)
    messages = [*history, {"role": "user", "content": "Which animals were logged?"}]
    workdir.mkdir(parents=True, exist_ok=True)
    port = servers.free_port()
    spec = servers.gateway_spec(model_dir, port, 1, workdir, sys.executable)
    cold = _serve_once(spec, workdir / "cold.log", messages)
    log.info("bench.restart.cold", ttft=round(cold.ttft or 0, 2), prompt=cold.prompt_tokens)
    again = _serve_once(spec, workdir / "restarted.log", messages)
    log.info("bench.restart.after", ttft=round(again.ttft or 0, 2), cached=again.cached_tokens)
    assert cold.ttft is not None and again.ttft is not None
    return RestartRound(cold.prompt_tokens, cold.ttft, again.ttft, again.cached_tokens,
                        cold.text == again.text)


def disk_ops(model_dir: Path, tokens: int, repeats: int = 3) -> dict[str, float]:
    """Median seconds of the disk tier's steps for a `tokens`-long prefix of this model's KV
    shape (values do not matter): the engine thread's hand-over, the writer thread's write,
    the engine thread's load and integrity check."""
    import mlx.core as mx
    from mlx_lm.models.cache import KVCache

    from app.engine.disk_cache import DiskCache

    config = json.loads((model_dir / "config.json").read_text())
    heads = config.get("num_key_value_heads") or config["num_attention_heads"]
    dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    layers = []
    for _ in range(config["num_hidden_layers"]):
        layer = KVCache()
        layer.keys = mx.random.normal((1, heads, tokens, dim))
        layer.values = mx.random.normal((1, heads, tokens, dim))
        layer.offset = tokens
        layers.append(layer)
    mx.eval([layer.state for layer in layers])
    times: dict[str, list[float]] = {"hand-over (engine thread)": [], "write (writer thread)": [],
                                     "load + verify (engine thread)": []}
    with tempfile.TemporaryDirectory(prefix="mlxgw-disk-") as tmp:
        store = DiskCache(Path(tmp), 10 * 2**30, min_tokens=64)
        try:
            for index in range(repeats):
                ids = list(range(index * tokens, (index + 1) * tokens))
                disk = store.bind("probe", "probe")
                started = time.perf_counter()
                assert disk.save("owner", ids, layers)
                times["hand-over (engine thread)"].append(time.perf_counter() - started)
                started = time.perf_counter()
                assert store.flush(600)
                times["write (writer thread)"].append(time.perf_counter() - started)
                found = disk.find("owner", ids)
                assert found is not None
                started = time.perf_counter()
                assert disk.load(found) is not None
                times["load + verify (engine thread)"].append(time.perf_counter() - started)
            size = store.used_bytes // max(len(store), 1)
        finally:
            store.close()
    out = {name: statistics.median(values) for name, values in times.items()}
    out["file MB"] = size / 1e6
    return out


def section(rounds: list[RestartRound], ops: dict[str, float] | None, prompt_tokens: int,
            command: str) -> str:
    load = os.getloadavg()
    lines = [f"### Restart: ~{prompt_tokens}-token prompt, cold vs after a gateway restart "
             "with the disk prefix cache", "",
             f"`{command}`; load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} "
             "(1/5/15 min) at the end.", "",
             "| round | prompt tokens | cold TTFT s | after-restart TTFT s | cached tokens "
             "| same answer | ratio | target <= 0.2 |",
             "| ---: | ---: | ---: | ---: | ---: | --- | ---: | --- |"]
    for index, r in enumerate(rounds):
        met = "yes" if r.ratio <= 0.2 else "**no**"
        lines.append(f"| {index + 1} | {r.prompt_tokens} | {r.cold_ttft:.2f} "
                     f"| {r.restart_ttft:.2f} | {r.restart_cached_tokens} "
                     f"| {'yes' if r.same_answer else '**no**'} | {r.ratio:.3f} | {met} |")
    if len(rounds) > 1:
        median = statistics.median(r.ratio for r in rounds)
        lines.append(f"| median | | | | | | {median:.3f} "
                     f"| {'yes' if median <= 0.2 else '**no**'} |")
    if ops:
        size = ops.pop("file MB")
        lines += ["", f"Disk tier steps for one {prompt_tokens}-token prefix of this model "
                  f"({size:.0f} MB file), median of 3:", "",
                  "| step | ms |", "| --- | ---: |"]
        lines += [f"| {name} | {seconds * 1000:.0f} |" for name, seconds in ops.items()]
    return "\n".join(lines)


def run(model_dir: Path, workdir: Path, prompt_tokens: int, rounds: int,
        command: str) -> tuple[str, list[RestartRound]]:
    results = [restart_round(model_dir, workdir / f"restart-{index}", prompt_tokens)
               for index in range(rounds)]
    ops = disk_ops(model_dir, prompt_tokens)
    return section(results, ops, prompt_tokens, command), results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, required=True,
                        help="An MLX model folder (the float32 demo copy for the numbers "
                             "in bench/RESULTS.md).")
    parser.add_argument("--prompt-tokens", type=int, default=4000)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args(argv)
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    command = " ".join(["python -m bench.restart", *(argv or sys.argv[1:])])
    with tempfile.TemporaryDirectory(prefix="mlxgw-restart-") as tmp:
        text, results = run(args.model_dir.expanduser().resolve(), Path(tmp),
                            args.prompt_tokens, args.rounds, command)
    sys.stdout.write(text + "\n")
    if args.json_out:
        raw: list[dict[str, Any]] = [vars(r) for r in results]
        args.json_out.write_text(json.dumps(raw, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
