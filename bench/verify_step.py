"""What a speculative verify step costs next to a plain decode step, in process, on the demo
model tuned for the CPU: one row at the `edit` level's context (its ~400-token prompt plus
part of a ~500-token answer).

    python -m bench.verify_step --model-dir PATH [--context 650] [--rounds 5] [--steps 8]

For each L (new tokens a row) it times one step and its roll-back (a trim, so the context stays
put): the tuned single-token step (L = 1), mlx-lm's own forward through the tuned layers (what
verification used before), and the tuned multi-token step (`LlamaDecodeStep.many`). Variants
alternate within each round; the report gives the median wall time per step and the engine
thread's CPU time per step (graph building and dispatch), with the load average.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx_lm import load
from mlx_lm.models.cache import BatchKVCache

from app.engine.cpu.llama_step import LlamaDecodeStep
from app.engine.cpu.tuning import tune_for_cpu
from bench.edit import PROMPT

Forward = Callable[[mx.array, list[Any]], mx.array]


def _time(forward: Forward, tokens: mx.array, caches: list[Any]) -> tuple[float, float]:
    """Wall and engine-thread CPU seconds of one step (its roll-back not counted)."""
    wall, cpu = time.perf_counter(), time.thread_time()
    logits = forward(tokens, caches)
    mx.eval(logits)
    spent = time.perf_counter() - wall, time.thread_time() - cpu
    for cache in caches:
        cache.trim(tokens.shape[-1])
    return spent


def run(model_dir: Path, context: int, rounds: int, steps: int, lengths: list[int]) -> str:
    model, tokenizer = load(str(model_dir))
    tune_for_cpu(model)
    step = LlamaDecodeStep(model)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}],
                                           add_generation_prompt=True)
    ids = (prompt * (context // len(prompt) + 1))[:context]  # the prompt, then repeated
    caches = [BatchKVCache([0]) for _ in model.layers]
    for start in range(0, context, 256):
        model(mx.array([ids[start:start + 256]]), cache=caches)
        mx.eval([c.state for c in caches])
    variants: dict[str, Forward] = {
        "tuned step": lambda t, c: step(t[:, 0], c) if t.shape[1] == 1 else step.many(t, c),
        "mlx-lm forward": lambda t, c: model(t, cache=c),
    }
    results: dict[tuple[str, int], list[tuple[float, float]]] = {}
    loads = []
    for _ in range(rounds):
        loads.append(" ".join(f"{x:.2f}" for x in os.getloadavg()))
        for length in lengths:
            tokens = mx.array([ids[100:100 + length]])
            for forward in variants.values():
                _time(forward, tokens, caches)  # compile / warm this shape
            # Variants alternate step by step: a busy machine slows them alike.
            for _ in range(steps):
                for name, forward in variants.items():
                    results.setdefault((name, length), []).append(
                        _time(forward, tokens, caches))
    plain = statistics.median(w for w, _ in results[("tuned step", 1)])
    lines = [
        f"1 row, context {context} tokens; median of {rounds} rounds x {steps} steps a "
        "variant, alternating; "
        f"load average at each round: {'; '.join(loads)}.",
        "",
        "| L | " + " | ".join(f"{name} ms | (CPU ms) | x plain" for name in variants) + " |",
        "| ---: |" + " ---: | ---: | ---: |" * len(variants),
    ]
    for length in lengths:
        cells = []
        for name in variants:
            wall = statistics.median(w for w, _ in results[(name, length)]) * 1000
            cpu = statistics.median(c for _, c in results[(name, length)]) * 1000
            cells += [f"{wall:.1f}", f"{cpu:.1f}", f"{wall / (plain * 1000):.2f}"]
        lines.append(f"| {length} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--context", type=int, default=650)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--lengths", type=lambda s: [int(x) for x in s.split(",")],
                        default=[1, 2, 3, 4, 6, 8])
    args = parser.parse_args(argv)
    print(run(args.model_dir, args.context, args.rounds, args.steps, args.lengths))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
