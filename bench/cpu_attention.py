"""One layer's attention on MLX's CPU backend: the native kernel against the paths a machine
without it takes, on the shapes a decode step and its riding chunks hand it.

    python -m bench.cpu_attention [--shapes 8x1x300,8x1x700,8x1x1300,8x1x3000,1x4x1000,...]
        [--repeats 30]

Each shape is rows x new tokens a row x context, with the demo model's 9 query heads over 3
key/value heads of 64 dimensions, keys and values read as a view of a larger cache buffer. The
two paths alternate call by call (so load on the box falls on both alike); prints the median
milliseconds of each and their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time

import mlx.core as mx

from app.engine.cpu import tuning

HEADS, KV_HEADS, DIMS = 9, 3, 64
SHAPES = "8x1x300,8x1x700,8x1x1300,8x1x3000,1x4x1000,1x4x3000,1x8x3000,1x16x3000"


def _inputs(rows: int, length: int, context: int) -> tuple[mx.array, ...]:
    queries = mx.random.normal((rows, length, HEADS, DIMS)).transpose(0, 2, 1, 3)
    keys = mx.random.normal((rows, KV_HEADS, context + 256, DIMS))[:, :, :context]
    values = mx.random.normal((rows, KV_HEADS, context + 256, DIMS))[:, :, :context]
    mx.eval(queries, keys, values)
    return queries, keys, values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default=SHAPES)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args(argv)
    kernel = tuning.cache_attention
    if kernel is None:
        raise SystemExit("the native kernel is not built: make kernels")
    print("| rows x tokens x context | kernel ms | without it ms | ratio |")
    print("| --- | ---: | ---: | ---: |")
    for shape in args.shapes.split(","):
        rows, length, context = (int(n) for n in shape.split("x"))
        queries, keys, values = _inputs(rows, length, context)
        mask = "causal" if length > 1 else None
        times: dict[bool, list[float]] = {True: [], False: []}
        for repeat in range(2 * args.repeats + 2):
            with_kernel = repeat % 2 == 0
            tuning.cache_attention = kernel if with_kernel else None
            start = time.perf_counter()
            mx.eval(tuning.decode_attention(queries, keys, values, None, DIMS ** -0.5, mask))
            if repeat >= 2:  # the first call of each is a warm-up
                times[with_kernel].append(time.perf_counter() - start)
        tuning.cache_attention = kernel
        ours, theirs = (statistics.median(times[k]) * 1000 for k in (True, False))
        print(f"| {shape} | {ours:.2f} | {theirs:.2f} | {theirs / ours:.1f}x |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
