"""What constrained decoding costs: tokens/s at N clients, unconstrained vs response_format
json_schema vs a forced tool call, against one gateway in the same sitting.

    python -m bench.constrained --model-dir <MLX folder> [--clients 10] [--rounds 3]

(`make bench-constrained` runs it on the demo model's float32 copy, as `make bench` does.)

Every request runs to max_tokens (the schema asks for a long string, the forced call's
argument too, the plain prompt asks for a long story), so the three kinds generate the same
number of tokens and tokens/s compares like with like. Rounds alternate the order of the
kinds; the report gives each round and the median ratio to the unconstrained level.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from app.ops.bench import LevelResult, run_probe
from bench.compare_mlx_lm import make_float32_copy
from bench.servers import bench_env, free_port, gateway_spec, running

PROMPT = "Write a long story about a lighthouse keeper and a storm."
LONG_TEXT = {"type": "string", "minLength": 2000, "maxLength": 4000}
KINDS: dict[str, dict[str, Any]] = {
    "unconstrained": {},
    "json_schema": {"response_format": {"type": "json_schema", "json_schema": {
        "name": "story", "strict": True, "schema": {
            "type": "object", "properties": {"title": {"type": "string", "maxLength": 40},
                                             "story": LONG_TEXT},
            "required": ["title", "story"], "additionalProperties": False}}}},
    "forced_tool_call": {
        "tools": [{"type": "function", "function": {"name": "save_story", "parameters": {
            "type": "object", "properties": {"story": LONG_TEXT}, "required": ["story"],
            "additionalProperties": False}}}],
        "tool_choice": {"type": "function", "function": {"name": "save_story"}}},
}


async def _sitting(base_url: str, model: str, pid: int, args: argparse.Namespace
                   ) -> list[dict[str, LevelResult]]:
    rounds: list[dict[str, LevelResult]] = []
    names = list(KINDS)
    for index in range(args.rounds):
        order = names if index % 2 == 0 else list(reversed(names))
        measured: dict[str, LevelResult] = {}
        for name in order:
            (result,) = await run_probe(
                base_url, model=model, levels=[args.clients], requests_per_client=args.requests,
                prompt=PROMPT, max_tokens=args.max_tokens, api_key=None, server_pid=pid,
                warmup=1, extra_body=KINDS[name])
            measured[name] = result
            print(f"round {index + 1} {name}: {result.tokens_per_s:.1f} tok/s, "
                  f"{result.errors} errors", file=sys.stderr, flush=True)
        rounds.append(measured)
    return rounds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--requests", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    # Dequantized like `make bench`: on a CPU the float32 model decodes several times faster.
    model_dir = make_float32_copy(
        args.model_dir, Path.home() / ".cache/mlx-gateway/bench" / f"{args.model_dir.name}-float32")
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        spec = gateway_spec(model_dir, free_port(), args.clients, workdir, sys.executable)
        with running(spec, bench_env(), workdir / "gateway.log") as pid:
            rounds = asyncio.run(_sitting(spec.base_url, spec.model, pid, args))
    report: dict[str, Any] = {"clients": args.clients, "requests_per_client": args.requests,
                              "max_tokens": args.max_tokens, "rounds": []}
    for measured in rounds:
        base = measured["unconstrained"].tokens_per_s
        report["rounds"].append({name: {"tokens_per_s": round(r.tokens_per_s, 2),
                                        "ratio": round(r.tokens_per_s / base, 3) if base else None,
                                        "errors": r.errors,
                                        "completion_tokens": r.completion_tokens,
                                        "ttft_p50_ms": round((r.ttft_p50 or 0) * 1000)}
                                 for name, r in measured.items()})
    report["median_ratio"] = {
        name: round(statistics.median(r[name]["ratio"] for r in report["rounds"]), 3)
        for name in KINDS}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
