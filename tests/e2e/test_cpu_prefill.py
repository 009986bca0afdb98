"""Prefill on the CPU backend with the real demo model, in process.

- While a long prompt prefills, the running streams keep getting a token every step: the budget
  splits it into chunks that start small and at most double (with the budget off, one chunk);
  a short prompt is prefilled whole, in one step.
- The 4-bit demo model and its float32 copy (what `cpu_dequantize` serves) answer the same.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import httpx
import mlx.core as mx
import pytest
from mlx_lm import load
from mlx_lm.generate import generate_step

from app.core.types import GenerationEvent, LogprobsDelta, TextDelta
from app.engine import scheduler
from app.engine.cpu.tuning import tune_for_cpu
from app.engine.prefill_budget import FIRST_CHUNK
from app.engine.scheduler import ModelBatch
from app.engine.speculative import SpeculationPolicy
from app.models.dequantize import is_copy_of
from app.models.registry import _make_spec
from bench.prefill_stalls import long_prompt, run_mixed, sequence
from tests.e2e.conftest import DEMO_ID
from tests.e2e.gateway_process import GatewayProcess

pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(mx.default_device() != mx.cpu, reason="CPU backend only")]

STREAMS = 2
LONG = 600  # tokens: more than FIRST_CHUNK * (1 + 2 + 4 + 8): at least five chunks
LONG_PROMPT = 256  # long_prompt_tokens: LONG is a long prompt here, a 200-token one is not
CHUNK = 1024  # prefill_chunk: the whole long prompt in one step without the budget


@pytest.fixture(scope="module")
def float32_model(demo_float32_dir: Path) -> tuple[object, object]:
    model, tokenizer = load(str(demo_float32_dir))[:2]
    return model, tokenizer


def test_running_streams_get_tokens_while_a_long_prompt_prefills(
        float32_model: tuple[object, object]) -> None:
    model, tokenizer = float32_model
    run = run_mixed(model, tokenizer, budget=1.0, streams=STREAMS, long_tokens=LONG,
                    prefill_chunk=CHUNK, warm_steps=2, long_prompt_tokens=LONG_PROMPT)
    chunks = [r.chunk for r in run.during if r.prompt_tokens]
    assert sum(r.prompt_tokens for r in run.during) >= LONG - 1
    # Small first, never more than doubling: the running streams never wait for a big chunk.
    assert chunks[0] <= FIRST_CHUNK
    assert all(b <= 2 * a for a, b in itertools.pairwise(chunks))
    assert len(chunks) >= 5
    # Every step of the prefill gave every running stream its token.
    assert all(r.decoded == STREAMS for r in run.during)
    between_first_and_last_chunk = sum(r.decoded for r in run.during[1:len(chunks)])
    assert between_first_and_last_chunk >= STREAMS * (len(chunks) - 1)

    # The same scenario without the budget: one chunk, the streams wait for all of it.
    off = run_mixed(model, tokenizer, budget=0.0, streams=STREAMS, long_tokens=LONG,
                    prefill_chunk=CHUNK, warm_steps=2, long_prompt_tokens=LONG_PROMPT)
    assert [r.chunk for r in off.during if r.prompt_tokens] == [CHUNK]


def test_a_short_prompt_beside_running_streams_is_prefilled_in_one_step(
        float32_model: tuple[object, object]) -> None:
    """Chunked to one decode step's cost, a short prompt waited dozens of steps for its first
    token; prefilled whole, the running streams wait one step for it."""
    model, tokenizer = float32_model
    run = run_mixed(model, tokenizer, budget=1.0, streams=STREAMS, long_tokens=200,
                    prefill_chunk=CHUNK, warm_steps=2, long_prompt_tokens=LONG_PROMPT)
    prefills = [r for r in run.during if r.prompt_tokens]
    assert len(prefills) == 1 and prefills[0].prompt_tokens >= 199
    assert all(r.decoded == STREAMS for r in run.during)
    # long_prompt_tokens = 0: the same prompt in budgeted chunks.
    chunked = run_mixed(model, tokenizer, budget=1.0, streams=STREAMS, long_tokens=200,
                        prefill_chunk=CHUNK, warm_steps=2, long_prompt_tokens=0)
    assert len([r for r in chunked.during if r.prompt_tokens]) >= 3


@pytest.fixture(scope="module")
def tuned_model(demo_float32_dir: Path) -> tuple[object, object]:
    model, tokenizer = load(str(demo_float32_dir))[:2]
    assert tune_for_cpu(model) > 0
    return model, tokenizer


def _mixed_answers(model: object, tokenizer: object, long: list[int]
                   ) -> tuple[list[str], list[float], int]:
    """Two streams decode, then `long` arrives and prefills beside them by the budget; every
    sequence's greedy text, the long answer's log-probabilities (they show any KV it lacks
    even where the greedy tokens do not), and how many prefill chunks a decode forward
    computed."""
    batch = ModelBatch(model, tokenizer, max_batch_size=16, prefill_chunk=CHUNK,
                       prompt_cache_bytes=0, stream=mx.default_stream(mx.default_device()),
                       prefill_budget=1.0, long_prompt_tokens=LONG_PROMPT,
                       speculation=SpeculationPolicy())  # chunks ride verify forwards too
    taken = 0
    take = batch._riders.take

    def counting_take() -> object:
        nonlocal taken
        rider = take()
        taken += rider is not None
        return rider

    batch._riders.take = counting_take  # type: ignore[method-assign]
    sinks: list[list[GenerationEvent]] = [[] for _ in range(3)]
    # Answers that repeat their prompts: the steps verify prompt-lookup drafts.
    for i, bird in enumerate(["heron", "crane"]):
        listing = "\n".join(f"{n}. the {bird} carried {n + 2} stones" for n in range(1, 9))
        question = f"Repeat this list exactly:\n{listing}"
        prompt = tokenizer.apply_chat_template(  # type: ignore[attr-defined]
            [{"role": "user", "content": question}], add_generation_prompt=True)
        batch.add(sequence(prompt, 32, sinks[i], f"s{i}"))
    for _ in range(4):
        batch.step()
    answer = sequence(long, 12, sinks[2], "long")
    answer.logprobs = 0
    answer.token_bytes = lambda token: tokenizer.decode([token]).encode()  # type: ignore[attr-defined]
    batch.add(answer)
    while len(batch):
        batch.step()
    batch.close()
    texts = ["".join(e.text for e in sink if isinstance(e, TextDelta)) for sink in sinks]
    logprobs = [t.logprob for e in sinks[2] if isinstance(e, LogprobsDelta) for t in e.tokens]
    return texts, logprobs, taken


def test_prefill_chunks_computed_in_the_decode_forward_change_no_answer(
        tuned_model: tuple[object, object], float32_model: tuple[object, object],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A long prompt's small chunks beside decoding rows ride in their forward (one pass over
    the weights for both, `decode.PromptForward.offer`): every answer is what it is when each
    chunk is a forward of its own, and the long prompt's is mlx-lm's own greedy answer."""
    model, tokenizer = tuned_model
    long = long_prompt(tokenizer, LONG_PROMPT + 64)  # long here, and soon prefilled
    riding, riding_logprobs, taken = _mixed_answers(model, tokenizer, long)
    assert taken >= 2
    monkeypatch.setattr(scheduler, "RIDER_MAX_TOKENS", 0)
    alone, alone_logprobs, none_taken = _mixed_answers(model, tokenizer, long)
    assert none_taken == 0
    assert riding == alone
    assert len(riding_logprobs) == len(alone_logprobs) > 0
    assert max(abs(a - b) for a, b in zip(riding_logprobs, alone_logprobs, strict=True)) < 1e-3
    assert all(riding)
    expected = tokenizer.decode(greedy(float32_model[0], long, 12))  # type: ignore[attr-defined]
    assert riding[2] == expected


def greedy(model: object, prompt: list[int], n: int) -> list[int]:
    return [int(token) for token, _ in generate_step(mx.array(prompt), model, max_tokens=n)]


def test_the_float32_copy_answers_as_the_4bit_model(demo_model_dir: Path,
                                                    float32_model: tuple[object, object]) -> None:
    """Same weights, float32 arithmetic instead of the 4-bit kernels' float16: logits agree to
    float16 rounding, and greedy answers to short prompts are the same tokens."""
    float32, tokenizer = float32_model
    quantized = load(str(demo_model_dir))[0]
    for question in ("What is the capital of France?", "Name three primary colors.",
                     "Write a haiku about the sea."):
        prompt = tokenizer.apply_chat_template(  # type: ignore[attr-defined]
            [{"role": "user", "content": question}], add_generation_prompt=True)
        ours = float32(mx.array([prompt]))[0, -1]  # type: ignore[operator]
        theirs = quantized(mx.array([prompt]))[0, -1].astype(mx.float32)
        spread = float(mx.max(theirs) - mx.min(theirs))
        assert float(mx.max(mx.abs(ours - theirs))) <= 0.02 * spread
        assert greedy(float32, prompt, 16) == greedy(quantized, prompt, 16), question


def test_a_gateway_serves_the_4bit_demo_from_its_float32_copy(tmp_path: Path,
                                                              demo_model_dir: Path) -> None:
    """The default on the CPU backend, through the real server: the copy is made in the cache
    once, the model is charged its float32 size, and it answers."""
    cache_bytes = 10_000_000
    server = GatewayProcess(tmp_path, {
        "auth": {"enabled": False}, "limits": {"per_ip_rpm": 0},
        "engine": {"cpu_dequantize": True, "prompt_cache_bytes": cache_bytes},
        "models": [{"id": DEMO_ID, "path": str(demo_model_dir), "max_context": 512}],
    }).start()
    try:
        answer = httpx.post(server.base_url + "/v1/chat/completions", timeout=300, json={
            "model": DEMO_ID, "max_tokens": 12, "temperature": 0,
            "messages": [{"role": "user", "content": "What is the capital of France?"}]})
        assert answer.status_code == 200, answer.text
        assert "Paris" in answer.json()["choices"][0]["message"]["content"]
        (copy,) = [p for p in (tmp_path / "cache" / "dequantized").iterdir() if p.is_dir()]
        assert is_copy_of(copy, demo_model_dir)
        (model,) = httpx.get(server.base_url + "/v1/models").json()["data"]
        spec = _make_spec(DEMO_ID, demo_model_dir, "config", max_context=512)
        assert model["size_bytes"] == spec.float32_estimated_bytes + cache_bytes
        assert model["size_bytes"] > spec.estimated_bytes + cache_bytes
    finally:
        server.stop()
