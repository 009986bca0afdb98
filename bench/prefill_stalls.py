"""Engine-level view of the `mixed` scenario: N streams decode, then one long prompt arrives.

    python -m bench.prefill_stalls --model-dir PATH [--streams 8] [--long-tokens 4000]
        [--budgets 0,1,2] [--prefill-chunk 2048] [--variants groups:16,merged:4] [--rounds 1]

Runs the gateway's ModelBatch in this process (no HTTP), once per budget and variant, and
reports per run: the running streams' median step time before the long prompt, the longest
step while it prefilled, the chunk sizes chosen, the tokens each running stream received during
the prefill, the long prompt's time to first token, and the median step once all 9 decode.
`[engine] prefill_budget = 0` is the old behaviour. A variant is `groups` (decode groups,
app/engine/decode_groups.py) or `merged` (every row in one batch, padded to the longest: the
behaviour before them), and the prefill budget's chunk floor (`prefill_budget.MIN_CHUNK`):
before/after comparisons in one sitting.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx_lm import load
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.sample_utils import greedy_sampler

from app.core.types import GenerationEvent, TextDelta
from app.engine import prefill_budget
from app.engine.cpu.tuning import tune_for_cpu
from app.engine.decode_groups import DecodeGroups
from app.engine.scheduler import ModelBatch, Sequence


class ImmediateLoop:
    """Stands in for the event loop a Sequence hands its events to: runs them at once."""

    def call_soon_threadsafe(self, callback: Callable[..., Any], *args: Any) -> None:
        callback(*args)


@dataclass
class StepRecord:
    seconds: float
    prompt_tokens: int  # prefilled this step, all rows
    chunk: int  # the chunk the budget gave this step
    decoded: int  # tokens the running streams received this step


@dataclass
class MixedRun:
    budget: float
    variant: str = "groups:16"
    before: list[StepRecord] = field(default_factory=list)  # decode only, long prompt not yet in
    during: list[StepRecord] = field(default_factory=list)  # while the long prompt prefilled
    after: list[StepRecord] = field(default_factory=list)  # every stream and the long decode
    ttft: float = 0.0  # the long prompt's insert to its first token

    @property
    def median_step(self) -> float:
        return statistics.median(r.seconds for r in self.before)

    @property
    def longest_step(self) -> float:
        return max(r.seconds for r in self.during)

    def summary(self) -> str:
        chunks = sorted({r.chunk for r in self.during if r.prompt_tokens})
        shown = chunks if len(chunks) <= 6 else [*chunks[:3], "...", *chunks[-2:]]
        after = statistics.median(r.seconds for r in self.after) if self.after else 0.0
        during = statistics.median(r.seconds for r in self.during)
        return (f"| {self.variant} | {self.budget:g} | {self.median_step * 1000:.0f} "
                f"| {self.longest_step * 1000:.0f} "
                f"| {self.longest_step / self.median_step:.1f} "
                f"| {during / self.median_step:.1f} | {len(self.during)} "
                f"| {sum(r.decoded for r in self.during)} | {shown} | {self.ttft:.2f} "
                f"| {after * 1000:.0f} |")


HEADER = ("| variant | prefill_budget | median step ms | longest step ms during prefill "
          "| longest / median | median during / median | prefill steps "
          "| tokens to running streams during prefill | chunks | long TTFT s "
          "| median step after, ms |\n"
          "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: |")


def no_end(eos: list[int]) -> Callable[[Any, mx.array], mx.array]:
    """A logits processor that keeps a running stream from ending (end-of-sequence masked)."""
    def mask(_tokens: Any, logits: mx.array) -> mx.array:
        logits[..., eos] = -mx.inf
        return logits
    return mask


def sequence(prompt: list[int], max_tokens: int, sink: list[GenerationEvent],
             request_id: str, processors: list[Any] | None = None) -> Sequence:
    return Sequence(request_id=request_id, prompt=prompt, max_tokens=max_tokens,
                    sampler=greedy_sampler, processors=processors or [], stop=[],
                    deliver=sink.extend,
                    loop=ImmediateLoop(),  # type: ignore[arg-type]
                    owner=request_id)


def long_prompt(tokenizer: Any, tokens: int) -> list[int]:
    text = " ".join(f"Line {i}: the heron carried {i % 7 + 2} stones to the mill." for i in
                    range(tokens // 10 + 10))
    ids: list[int] = tokenizer.encode(text)
    return ids[:tokens]


def prefix_kv(model: Any, tokens: list[int], chunk: int = 512) -> list[Any]:
    """The KV of `tokens`, prefilled alone (what the prefix cache would hold for them)."""
    cache = make_prompt_cache(model)
    for start in range(0, len(tokens), chunk):
        model(mx.array([tokens[start:start + chunk]]), cache=cache)
        mx.eval([c.state for c in cache])
    return cache


def run_mixed(model: Any, tokenizer: Any, *, budget: float, streams: int, long_tokens: int,
              prefill_chunk: int, warm_steps: int = 6, prompt_cache_bytes: int = 0,
              variant: str | None = None, long_prompt_tokens: int = 1024,
              cached: tuple[list[int], list[Any]] | None = None) -> MixedRun:
    """One run of the scenario; `variant` GROUPING:MIN_CHUNK (default: the gateway's own),
    the chunk floor set for this run only."""
    floor = prefill_budget.MIN_CHUNK
    grouping, min_chunk = (variant or f"groups:{floor}").split(":")
    prefill_budget.MIN_CHUNK = int(min_chunk)
    try:
        return _run_mixed(model, tokenizer, budget=budget, streams=streams,
                          long_tokens=long_tokens, prefill_chunk=prefill_chunk,
                          warm_steps=warm_steps, prompt_cache_bytes=prompt_cache_bytes,
                          variant=f"{grouping}:{min_chunk}", cached=cached,
                          long_prompt_tokens=long_prompt_tokens)
    finally:
        prefill_budget.MIN_CHUNK = floor


def _run_mixed(model: Any, tokenizer: Any, *, budget: float, streams: int, long_tokens: int,
               prefill_chunk: int, warm_steps: int, prompt_cache_bytes: int, variant: str,
               cached: tuple[list[int], list[Any]] | None, long_prompt_tokens: int) -> MixedRun:
    grouping = variant.split(":")[0]
    batch = ModelBatch(model, tokenizer, max_batch_size=max(16, streams + 1),
                       prefill_chunk=prefill_chunk, prompt_cache_bytes=prompt_cache_bytes,
                       stream=mx.default_stream(mx.default_device()),
                       prefill_budget=budget, long_prompt_tokens=long_prompt_tokens)
    groups = batch._generator._generation_batch
    assert isinstance(groups, DecodeGroups)
    if grouping == "merged":
        groups.max_groups = 1  # every row in one batch: mlx-lm's own way
    run = MixedRun(budget, variant)
    endless = no_end(list(tokenizer.eos_token_ids))
    running = [sequence(tokenizer.encode(f"Stream {i}: write a long story about a lighthouse."),
                        100_000, [], f"s{i}", [endless]) for i in range(streams)]
    for seq in running:
        batch.add(seq)

    def texts() -> int:  # tokens (a token can end inside a character: no text of its own yet)
        return sum(seq.generated for seq in running)

    def step() -> StepRecord:
        decoded, tokens = texts(), batch._generator._counters.prompt_tokens
        started = time.perf_counter()
        batch.step()
        # The step set its own chunk (ModelBatch._size_prefill) before prefilling.
        return StepRecord(time.perf_counter() - started,
                          batch._generator._counters.prompt_tokens - tokens,
                          batch._generator.prefill_step_size, texts() - decoded)

    while texts() < streams * warm_steps:  # every stream decoding, warm
        step()
    run.before = [step() for _ in range(warm_steps)]
    long_sink: list[GenerationEvent] = []
    if cached is not None:  # the long prompt's prefix was computed before: it only joins
        batch._prefix.insert("long", cached[0], cached[1], "seed")
    inserted = time.perf_counter()
    batch.add(sequence(long_prompt(tokenizer, long_tokens), 4, long_sink, "long"))
    while not any(isinstance(e, TextDelta) for e in long_sink):
        run.during.append(step())
    run.ttft = time.perf_counter() - inserted
    run.after = [step() for _ in range(warm_steps)]
    batch.close()
    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--long-tokens", type=int, default=4000)
    parser.add_argument("--prefill-chunk", type=int, default=2048)
    parser.add_argument("--budgets", default="0,1,2")
    parser.add_argument("--prompt-cache-bytes", type=int, default=512_000_000,
                        help="The prefix cache (the gateway's default; it saves a long prompt's "
                             "KV as soon as it is prefilled).")
    parser.add_argument("--variants", default=f"groups:{prefill_budget.MIN_CHUNK}",
                        help="Comma-separated GROUPING:MIN_CHUNK, GROUPING groups or merged.")
    parser.add_argument("--rounds", type=int, default=1,
                        help="Repeat every variant, alternating their order.")
    parser.add_argument("--cached-prefix", action="store_true",
                        help="All but the last 16 tokens of the long prompt are in the prefix "
                             "cache (a coding agent's next turn): what its joining costs.")
    parser.add_argument("--verbose", action="store_true", help="Print every prefill step.")
    args = parser.parse_args(argv)
    model, tokenizer = load(str(args.model_dir))[:2]
    tune_for_cpu(model)
    cached = None
    if args.cached_prefix:
        prefix = long_prompt(tokenizer, args.long_tokens)[:-16]
        cached = (prefix, prefix_kv(model, prefix))
    print(HEADER)
    variants = args.variants.split(",")
    for round_ in range(args.rounds):
        for budget in (float(b) for b in args.budgets.split(",")):
            for variant in variants if round_ % 2 == 0 else variants[::-1]:
                report(run_mixed(model, tokenizer, budget=budget, streams=args.streams,
                                 long_tokens=args.long_tokens, prefill_chunk=args.prefill_chunk,
                                 prompt_cache_bytes=args.prompt_cache_bytes, variant=variant,
                                 cached=cached),
                       args.verbose)
    return 0


def report(run: MixedRun, verbose: bool) -> None:
    print(run.summary(), flush=True)
    if verbose:
        for i, r in enumerate(run.during):
            print(f"  step {i}: {r.seconds * 1000:.0f} ms, chunk {r.chunk}, "
                  f"prefilled {r.prompt_tokens}, tokens to streams {r.decoded}")


if __name__ == "__main__":
    raise SystemExit(main())
