"""Prefill and single-stream decode speed of a quantized MLX model vs its float32 copy (what
`[engine] cpu_dequantize` serves on the CPU backend), alternating in one process.

    python -m bench.quantized_prefill --model-dir <quantized MLX folder> [--tokens 1000]
        [--rounds 3]

Prints a markdown table: prefill tokens/s (one forward over the whole prompt, as mlx-lm's
prefill does in chunks of up to 2048) and decode tokens/s (one row), median of rounds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx_lm import load
from mlx_lm.models.cache import make_prompt_cache

from app.engine.cpu.tuning import tune_for_cpu
from app.models.dequantize import ensure_dequantized


def prefill_seconds(model: Any, tokens: list[int]) -> float:
    cache = make_prompt_cache(model)
    started = time.perf_counter()
    mx.eval(model(mx.array([tokens]), cache=cache))
    return time.perf_counter() - started


def decode_seconds(model: Any, steps: int = 16) -> float:
    cache = make_prompt_cache(model)
    mx.eval(model(mx.array([[1, 2, 3, 4]]), cache=cache))
    token = mx.array([[5]])
    started = time.perf_counter()
    for _ in range(steps):
        logits = model(token, cache=cache)
        token = mx.argmax(logits[:, -1:, :], axis=-1)
        mx.eval(token)
    return (time.perf_counter() - started) / steps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--tokens", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cache-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="mlxgw-dequant-") as tmp:
        copy = ensure_dequantized(args.model_dir, args.cache_dir or Path(tmp))
        quantized, tokenizer = load(str(args.model_dir))[:2]
        float32 = load(str(copy))[0]
        tune_for_cpu(float32)  # as the gateway serves it
        text = " ".join(f"Line {i}: the heron carried {i % 7 + 2} stones." for i in
                        range(args.tokens // 8))
        tokens = tokenizer.encode(text)[: args.tokens]
        models = {"4-bit kernels": quantized, "float32 copy (OpenBLAS)": float32}
        prefill: dict[str, list[float]] = {name: [] for name in models}
        decode: dict[str, list[float]] = {name: [] for name in models}
        load_before = os.getloadavg()
        for _ in range(args.rounds):
            for name, model in models.items():
                prefill[name].append(len(tokens) / prefill_seconds(model, tokens))
                decode[name].append(1 / decode_seconds(model))
        load_after = os.getloadavg()
    print(f"Prompt {len(tokens)} tokens, median of {args.rounds} alternating rounds; load "
          f"average {load_before[0]:.1f} before, {load_after[0]:.1f} after.\n")
    print("| weights | prefill tokens/s | decode tokens/s (1 stream) |")
    print("| --- | ---: | ---: |")
    for name in models:
        print(f"| {name} | {statistics.median(prefill[name]):.1f} "
              f"| {statistics.median(decode[name]):.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
