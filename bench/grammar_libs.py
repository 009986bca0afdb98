"""Compare grammar libraries for constrained decoding: per-token mask cost under batching and
JSON Schema coverage, with a real model's tokenizer.

    python -m bench.grammar_libs --tokenizer <folder with tokenizer.json> [--batch 10]

For each library: the time to prepare the tokenizer; per schema the compile time; then a batch
of `--batch` sequences (each under a different schema of `bench.grammar_schemas.SCHEMAS`) walks
token by token, every step computing all masks, applying them to a (batch, vocabulary) mlx
array of logits and advancing each matcher with a token drawn from its allowed set (biased
toward closing tokens so walks end). The step time excludes the draw. Coverage: each schema of
SCHEMAS and FEATURE_SCHEMAS compiles or not, and the walks' documents validate with
`jsonschema` or not (a library that compiles a schema but ignores a keyword fails here).

xgrammar is not measured: its wheel depends on torch (and CUDA packages on Linux).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import jsonschema
import mlx.core as mx
import numpy as np

from bench.grammar_schemas import FEATURE_SCHEMAS, SCHEMAS, Schema

CLOSERS = ('"', "}", "]", ",")


class Walker(Protocol):
    def fill(self, row: np.ndarray[Any, Any]) -> None: ...
    def advance(self, token: int) -> None: ...
    def done(self) -> bool: ...


class Library(Protocol):
    name: str

    def compile(self, schema: Schema) -> Callable[[], Walker]: ...
    def fill_batch(self, walkers: list[Walker], masks: np.ndarray[Any, Any]) -> None: ...


class LLGuidance:
    name = "llguidance"

    def __init__(self, tokenizer_json: str, eos: int) -> None:
        import llguidance

        self.ll = llguidance
        self.tokenizer = llguidance.LLTokenizer(tokenizer_json, eos_token=eos)
        self.executor = llguidance.LLExecutor(num_threads=2)

    def compile(self, schema: Schema) -> Callable[[], Walker]:
        grammar = self.ll.LLMatcher.grammar_from_json_schema(
            schema, defaults={"whitespace_flexible": False})
        error = self.ll.LLMatcher.validate_grammar(grammar, self.tokenizer)
        if error:
            raise ValueError(error)
        ll, tokenizer = self.ll, self.tokenizer

        class W:
            def __init__(self) -> None:
                self.m = ll.LLMatcher(tokenizer, grammar, log_level=0)

            def fill(self, row: np.ndarray[Any, Any]) -> None:
                self.m.unsafe_compute_mask_ptr(row.ctypes.data, row.nbytes)

            def advance(self, token: int) -> None:
                if not self.m.consume_token(token):
                    raise RuntimeError(self.m.get_error())

            def done(self) -> bool:
                return bool(self.m.is_stopped())

        return W

    def fill_batch(self, walkers: list[Walker], masks: np.ndarray[Any, Any]) -> None:
        from llguidance.numpy import fill_next_token_bitmask_par

        fill_next_token_bitmask_par(
            self.executor, [(w.m, i) for i, w in enumerate(walkers)], masks)  # type: ignore[attr-defined]


class OutlinesCore:
    name = "outlines-core"

    def __init__(self, tokenizer_json: str, eos: int) -> None:
        import outlines_core

        self.oc = outlines_core
        spec = json.loads(tokenizer_json)
        decode = _byte_decoder()
        special = {t["content"] for t in spec.get("added_tokens", [])}
        by_bytes: dict[bytes, list[int]] = {}
        for text, token in spec["model"]["vocab"].items():
            if text not in special:
                by_bytes.setdefault(bytes(decode[c] for c in text), []).append(token)
        self.vocabulary = outlines_core.Vocabulary(eos, by_bytes)
        self.eos = eos

    def compile(self, schema: Schema) -> Callable[[], Walker]:
        regex = self.oc.json_schema.build_regex_from_schema(json.dumps(schema))
        index = self.oc.Index(regex, self.vocabulary)
        oc, eos = self.oc, self.eos

        class W:
            def __init__(self) -> None:
                self.g = oc.Guide(index)
                self.finished = False

            def fill(self, row: np.ndarray[Any, Any]) -> None:
                self.g.write_mask_into(row.ctypes.data, row.size, row.itemsize)

            def advance(self, token: int) -> None:
                if token == eos:
                    self.finished = True
                    return
                self.g.advance(token, False)

            def done(self) -> bool:
                return self.finished

        return W

    def fill_batch(self, walkers: list[Walker], masks: np.ndarray[Any, Any]) -> None:
        for i, w in enumerate(walkers):
            w.fill(masks[i])


def _byte_decoder() -> dict[str, int]:
    """Byte-level BPE's printable stand-in characters back to their bytes."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    table, shifted = {}, 0
    for byte in range(256):
        if byte in printable:
            table[chr(byte)] = byte
        else:
            table[chr(256 + shifted)] = byte
            shifted += 1
    return table


def apply_masks(logits: mx.array, masks: mx.array) -> mx.array:
    """Bitmask rows (batch, ceil(V/32)) int32 -> logits with disallowed tokens at -inf."""
    vocab = logits.shape[-1]
    ids = mx.arange(vocab, dtype=mx.uint32)
    words = mx.take(masks.astype(mx.uint32), (ids >> 5).astype(mx.int32), axis=1)
    allowed = ((words >> (ids & 31)) & 1).astype(mx.bool_)
    return mx.where(allowed, logits, mx.array(-mx.inf, dtype=logits.dtype))


def _allowed(row: np.ndarray[Any, Any], vocab: int) -> np.ndarray[Any, Any]:
    bits = np.unpackbits(row.view(np.uint8), bitorder="little")[:vocab]
    return np.flatnonzero(bits)


def walk_batch(lib: Library, makers: list[Callable[[], Walker]], vocab: int, texts: list[str],
               eos: int, rng: random.Random, closer: set[int], max_steps: int
               ) -> tuple[list[float], list[list[int]]]:
    walkers = [make() for make in makers]
    outputs: list[list[int]] = [[] for _ in walkers]
    live = list(range(len(walkers)))
    step_times: list[float] = []
    words = (vocab + 31) // 32
    logits = mx.random.normal((len(walkers), vocab))
    mx.eval(logits)
    for _ in range(max_steps):
        if not live:
            break
        batch = [walkers[i] for i in live]
        masks = np.zeros((len(batch), words), dtype=np.int32)
        started = time.perf_counter()
        lib.fill_batch(batch, masks)
        masked = apply_masks(logits[: len(batch)], mx.array(masks))
        mx.eval(masked)
        step_times.append(time.perf_counter() - started)
        choices = []
        for row in masks:
            allowed = _allowed(row, vocab)
            if len(allowed) == 0:
                choices.append(eos)
                continue
            closing = [t for t in allowed if t in closer or t == eos]
            pool = closing if closing and rng.random() < 0.5 else allowed
            choices.append(int(rng.choice(list(pool))))
        started = time.perf_counter()
        for walker, token in zip(batch, choices, strict=True):
            walker.advance(token)
        step_times[-1] += time.perf_counter() - started
        for i, token in zip(list(live), choices, strict=True):
            if token != eos:
                outputs[i].append(token)
        live = [i for i in live if not walkers[i].done()]
    return step_times, outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizer", type=Path, required=True)
    parser.add_argument("--batch", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-steps", type=int, default=250)
    args = parser.parse_args()
    from tokenizers import Tokenizer

    tokenizer_json = (args.tokenizer / "tokenizer.json").read_text()
    hf = Tokenizer.from_str(tokenizer_json)
    vocab = hf.get_vocab_size()
    eos = hf.token_to_id("<|im_end|>") or 0
    texts = [hf.decode([t]) for t in range(vocab)]
    closer = {t for t, s in enumerate(texts) if any(c in s for c in CLOSERS) and len(s) <= 3}
    rng = random.Random(7)
    report: dict[str, Any] = {"vocab": vocab, "batch": args.batch}
    for factory in (LLGuidance, OutlinesCore):
        started = time.perf_counter()
        lib: Library = factory(tokenizer_json, eos)  # type: ignore[assignment]
        prep = time.perf_counter() - started
        compiled: dict[str, Callable[[], Walker]] = {}
        compile_ms: dict[str, float] = {}
        coverage: dict[str, str] = {}
        for name, schema in {**SCHEMAS, **{f"feature: {k}": v for k, v in
                                           FEATURE_SCHEMAS.items()}}.items():
            started = time.perf_counter()
            try:
                compiled[name] = lib.compile(schema)
                compile_ms[name] = (time.perf_counter() - started) * 1000
            except Exception as error:
                coverage[name] = f"refused: {str(error)[:80]}"
        # Validity: three walks per schema, one sequence at a time.
        for name, make in compiled.items():
            schema = SCHEMAS.get(name) or FEATURE_SCHEMAS[name.removeprefix("feature: ")]
            bad = 0
            unfinished = 0
            for _ in range(3):
                _, (out,) = walk_batch(lib, [make], vocab, texts, eos, rng, closer,
                                       args.max_steps)
                text = hf.decode(out)
                try:
                    jsonschema.validate(json.loads(text), schema)
                except (ValueError, jsonschema.ValidationError):
                    if len(out) >= args.max_steps - 1:
                        unfinished += 1
                    else:
                        bad += 1
            coverage[name] = ("ok" if not bad and not unfinished else
                              f"{bad} invalid, {unfinished} unfinished of 3")
        # Batched cost: `batch` sequences, each under its own everyday schema.
        names = [n for n in SCHEMAS if n in compiled][: args.batch]
        per_step: list[float] = []
        for _ in range(args.rounds):
            times, _ = walk_batch(lib, [compiled[n] for n in names], vocab, texts, eos, rng,
                                  closer, args.max_steps)
            per_step += times
        report[lib.name] = {
            "tokenizer_prep_s": round(prep, 3),
            "compile_ms_median": round(statistics.median(compile_ms.values()), 2),
            "compile_ms_max": round(max(compile_ms.values()), 2),
            "step_ms_median": round(statistics.median(per_step) * 1000, 3),
            "step_ms_p95": round(sorted(per_step)[int(len(per_step) * 0.95)] * 1000, 3),
            "batch_in_steps": len(names),
            "everyday_ok": sum(coverage.get(n) == "ok" for n in SCHEMAS),
            "features_ok": sum(coverage.get(f"feature: {n}") == "ok" for n in FEATURE_SCHEMAS),
            "coverage": coverage,
        }
        print(json.dumps({lib.name: report[lib.name]}, indent=1), flush=True)


if __name__ == "__main__":
    main()
