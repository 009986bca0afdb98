"""What a prefill chunk beside decoding rows costs: in a forward of its own, or inside theirs.

    python -m bench.rider_step --model-dir <float32 llama folder> [--rows 8] [--depth 4000]
        [--rows-context 300] [--chunks 2,4,8,16,32,64] [--repeats 8] [--rounds 2]
        [--without-kernel]

On the CPU-tuned llama step (`app/engine/cpu/llama_step.py`): `rows` sequences decode one token each
(their KV `rows-context` positions deep) while a prompt `depth` tokens into its prefill adds a
chunk. Prints the median milliseconds of the decode step alone, of the decode step followed by the
chunk's own forward (`many`, what the prompt batch does without riders), and of one forward carrying
both (`Rider`). The caches are rolled back after every call, so each one measures the same depths.
`--without-kernel` attends as a machine without the native kernel does (MLX and NumPy).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx_lm import load
from mlx_lm.models.cache import BatchKVCache

from app.engine.cpu import tuning
from app.engine.cpu.llama_step import LlamaDecodeStep, Rider, RiderSlot
from app.engine.cpu.tuning import tune_for_cpu


def _caches(step: LlamaDecodeStep, rows: int, depth: int) -> list[Any]:
    caches = [BatchKVCache([0] * rows) for _ in step.layers]
    for start in range(0, depth, 512):
        size = min(512, depth - start)
        step.model(mx.array([[1] * size] * rows), cache=caches)
        mx.eval([c.state for c in caches])
    return caches


def _roll_back(caches: list[Any], tokens: int) -> None:
    for cache in caches:
        cache.offset -= tokens
        cache._idx -= tokens


def _median_ms(call: Callable[[], None], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--depth", type=int, default=4000)
    parser.add_argument("--rows-context", type=int, default=300,
                        help="positions already in each decoding row's KV")
    parser.add_argument("--chunks", default="2,4,8,16,32,64")
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--without-kernel", action="store_true",
                        help="attend without the native kernel (app/engine/cpu/kernels)")
    args = parser.parse_args(argv)
    if args.without_kernel:
        tuning.cache_attention = None
    model = load(str(args.model_dir))[0]
    tune_for_cpu(model)
    if not LlamaDecodeStep.supports(model):
        raise SystemExit("not a CPU-tuned llama model: no rider path to measure")
    step = LlamaDecodeStep(model)
    step.riders = slot = RiderSlot()
    decoding = _caches(step, args.rows, args.rows_context)
    prompt = _caches(step, 1, args.depth)
    inputs = mx.array([5] * args.rows)

    def decode() -> None:
        mx.eval(step(inputs, decoding))
        _roll_back(decoding, 1)

    def separate(chunk: int) -> Callable[[], None]:
        def call() -> None:
            decode()
            mx.eval(step.many(mx.array([[3] * chunk]), prompt), [c.state for c in prompt])
            _roll_back(prompt, chunk)
        return call

    def riding(chunk: int) -> Callable[[], None]:
        def call() -> None:
            slot.rider = Rider(mx.array([[3] * chunk]), prompt)
            mx.eval(step(inputs, decoding), [c.state for c in prompt])
            _roll_back(decoding, 1)
            _roll_back(prompt, chunk)
            slot.rider = None
        return call

    print(f"{args.rows} decoding rows {args.rows_context} tokens deep, a prompt {args.depth} "
          f"tokens deep; median of "
          f"{args.repeats} calls, ms\n")
    print("| round | chunk | decode alone | decode, then the chunk's own forward "
          "| one forward for both |\n| ---: | ---: | ---: | ---: | ---: |")
    for round_ in range(1, args.rounds + 1):
        alone = _median_ms(decode, args.repeats)
        for chunk in (int(c) for c in args.chunks.split(",")):
            print(f"| {round_} | {chunk} | {alone:.0f} "
                  f"| {_median_ms(separate(chunk), args.repeats):.0f} "
                  f"| {_median_ms(riding(chunk), args.repeats):.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
