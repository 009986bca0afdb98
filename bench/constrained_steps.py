"""Constrained decoding's cost per decode step, free of the shared box's drift: two batches of
N sequences in one process (the gateway's own ModelBatch, CPU tuning and grammar processors),
one plain and one under a JSON schema, stepped alternately so both see the same load.

    python -m bench.constrained_steps --model-dir <MLX folder> [--batch 10] [--steps 60]

Prints the median step time of each batch and their ratio. The HTTP-level comparison at 10
clients is `bench.constrained`; this one isolates the engine's share.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path
from typing import Any

import mlx.core as mx

from app.core.types import GenerationRequest, JsonConstraint, SamplingParams
from app.engine.cpu.tuning import tune_for_cpu
from app.engine.prompt import prompt_tokens
from app.engine.sampling import make_sequence_processors, make_sequence_sampler
from app.engine.scheduler import ModelBatch, Sequence
from app.output import grammar
from bench.constrained import LONG_TEXT

SCHEMA = {"type": "object", "properties": {"title": {"type": "string", "maxLength": 40},
                                           "story": LONG_TEXT},
          "required": ["title", "story"], "additionalProperties": False}


class _NoLoop:
    """Stands in for the event loop: events are dropped, only the steps are timed."""

    def call_soon_threadsafe(self, *_: Any) -> None:
        return None


def _batch(model: Any, tokenizer: Any, size: int, constrained: bool, steps: int) -> ModelBatch:
    batch = ModelBatch(model, tokenizer, max_batch_size=size, prefill_chunk=512,
                       prompt_cache_bytes=0, stream=mx.default_stream(mx.default_device()))
    compiler = grammar.compiler_for(tokenizer)
    for i in range(size):
        request = GenerationRequest(model="m", request_id=str(i), messages=None,
                                    prompt=f"Story {i}: a lighthouse keeper and a storm.")
        processors = make_sequence_processors(SamplingParams(temperature=0))
        if constrained:
            processors.append(compiler.processor(JsonConstraint(SCHEMA, "bench")))
        batch.add(Sequence(request_id=str(i), prompt=prompt_tokens(tokenizer, request),
                           max_tokens=steps + 20, sampler=make_sequence_sampler(
                               SamplingParams(temperature=0)),
                           processors=processors, stop=[], deliver=lambda _: None,
                           loop=_NoLoop()))  # type: ignore[arg-type]
    return batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--batch", type=int, default=10)
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    from mlx_lm import load

    asyncio.set_event_loop(asyncio.new_event_loop())
    model, tokenizer = load(str(args.model_dir))[:2]
    tune_for_cpu(model)
    plain = _batch(model, tokenizer, args.batch, False, args.steps)
    constrained = _batch(model, tokenizer, args.batch, True, args.steps)
    for batch in (plain, constrained):  # prefill and the first tokens, not timed
        for _ in range(5):
            batch.step()
    times: dict[str, list[float]] = {"plain": [], "constrained": []}
    pairs = [("plain", plain), ("constrained", constrained)]
    for step in range(args.steps):
        for name, batch in pairs if step % 2 == 0 else pairs[::-1]:  # neither always first
            started = time.perf_counter()
            batch.step()
            times[name].append(time.perf_counter() - started)
    plain_ms = statistics.median(times["plain"]) * 1000
    constrained_ms = statistics.median(times["constrained"]) * 1000
    # Neighbouring steps saw the same load: the median of their ratios is the steadier number.
    ratios = [p / c for p, c in zip(times["plain"], times["constrained"], strict=True)]
    print(json.dumps({"batch": args.batch, "steps": args.steps,
                      "plain_step_ms_median": round(plain_ms, 2),
                      "constrained_step_ms_median": round(constrained_ms, 2),
                      "tokens_per_s_ratio_of_medians": round(plain_ms / constrained_ms, 3),
                      "tokens_per_s_ratio_median_of_pairs": round(statistics.median(ratios), 3),
                      "sequences_left": [len(plain), len(constrained)]}))


if __name__ == "__main__":
    main()
