"""The CPU decode paths on the real demo model: a tuned, batched decode (the tuned layers, split
attention and cpu_decode's llama step) writes what mlx-lm's own single-sequence generation
writes, token for token (greedy)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

mx = pytest.importorskip("mlx.core")

from mlx_lm import load, stream_generate  # noqa: E402
from mlx_lm.generate import BatchGenerator  # noqa: E402

from app.engine.cpu.llama_step import LlamaDecodeStep  # noqa: E402
from app.engine.cpu.tuning import tune_for_cpu  # noqa: E402
from app.engine.decode import PromptForward, prompt_forward, use_logits_decode  # noqa: E402
from app.engine.speculative import (  # noqa: E402
    RowOutlook,
    SpeculationPolicy,
    use_speculative_decode,
)

pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(mx.default_device() != mx.cpu, reason="CPU backend only")]

QUESTIONS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "Write a haiku about the sea.",
    "What does a compiler do?",
    "Give me a tip for sleeping better.",
    "Why is the sky blue?",
]
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def mlx_lm_answers(demo_float32_dir: Path) -> tuple[list[list[int]], list[list[int]]]:
    """(the QUESTIONS' prompts, mlx-lm's own greedy answers to them, one at a time)."""
    reference, tokenizer = load(str(demo_float32_dir))
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}],
                                             add_generation_prompt=True) for q in QUESTIONS]
    expected = [[r.token for r in stream_generate(reference, tokenizer, prompt,
                                                  max_tokens=MAX_TOKENS)] for prompt in prompts]
    return prompts, expected


@pytest.mark.parametrize("small_chunks", [False, True])
def test_tuned_batched_decode_matches_mlx_lm_token_for_token(
        demo_float32_dir: Path, mlx_lm_answers: tuple[list[list[int]], list[list[int]]],
        small_chunks: bool) -> None:
    """With `small_chunks` the prompts (of different lengths: right-padded together) are also
    prefilled 4 tokens a step through the tuned multi-token step (`decode.PromptForward`),
    as the prefill budget prefills a long prompt beside decoding streams."""
    prompts, expected = mlx_lm_answers
    tuned, tokenizer = load(str(demo_float32_dir))
    assert tune_for_cpu(tuned) > 0
    generator = BatchGenerator(tuned, completion_batch_size=16, prefill_batch_size=16,
                               stop_tokens=[[t] for t in tokenizer.eos_token_ids],
                               prefill_step_size=4 if small_chunks else 2048)
    use_logits_decode(generator)
    assert isinstance(generator._generation_batch.forward, LlamaDecodeStep)
    if small_chunks:
        generator._prompt_batch.model = prompt_forward(tuned, max_tokens=8)
        assert isinstance(generator._prompt_batch.model, PromptForward)
        calls = _count_calls(generator._prompt_batch.model.step)
    uids = generator.insert(prompts, max_tokens=[MAX_TOKENS] * len(prompts))
    got = _run_to_the_end(generator, uids)

    batched = [got[uid] for uid in uids]
    assert batched == expected
    assert "Paris" in tokenizer.decode(batched[0])
    if small_chunks:
        assert calls["many"] >= max(len(p) for p in prompts) // 4 - 1


def _count_calls(step: LlamaDecodeStep) -> dict[str, int]:
    calls = {"many": 0}
    many = step.many

    def counted(tokens: Any, caches: list[Any]) -> Any:
        calls["many"] += 1
        return many(tokens, caches)

    step.many = counted  # type: ignore[method-assign]
    return calls


def _run_to_the_end(generator: BatchGenerator, uids: list[int]) -> dict[int, list[int]]:
    """Every sequence's tokens, stepping until each has finished; then the generator closes."""
    got: dict[int, list[int]] = {uid: [] for uid in uids}
    finished: set[int] = set()
    while len(finished) < len(uids):
        for response in generator.next_generated():
            got[response.uid].append(response.token)
            if response.finish_reason is not None:
                finished.add(response.uid)
    generator.close()
    return got


class _Eager(SpeculationPolicy):
    """Drafts as long as it may whenever a row has a draft: this test is about correctness."""

    def draft_length(self, rows: list[RowOutlook]) -> int:
        return self.max_draft if any(row.available for row in rows) else 0


COPY = ("Repeat this code exactly, nothing else:\n\ndef area(width, height):\n    return "
        "width * height\n\ndef perimeter(width, height):\n    return 2 * (width + height)\n")


def _batched(model: Any, tokenizer: Any, prompts: list[list[int]], speculate: bool
             ) -> tuple[list[list[int]], Any]:
    generator = BatchGenerator(model, completion_batch_size=16, prefill_batch_size=16,
                               stop_tokens=[[t] for t in tokenizer.eos_token_ids])
    allowed: set[int] = set()
    batch: Any = (use_speculative_decode(generator, set(), allowed, _Eager()) if speculate
                  else use_logits_decode(generator))
    uids = generator.insert(prompts, max_tokens=[40] * len(prompts))
    allowed.update(uids)
    got = _run_to_the_end(generator, uids)
    return [got[uid] for uid in uids], batch


def test_tuned_speculative_verify_writes_what_plain_tuned_decoding_writes(
        demo_float32_dir: Path) -> None:
    """Drafts verified by the tuned multi-token step (one row alone: unpadded rows; four
    rows: padded) are accepted exactly where plain decoding writes them."""
    model, tokenizer = load(str(demo_float32_dir))
    assert tune_for_cpu(model) > 0
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}],
                                             add_generation_prompt=True)
               for q in [COPY, *QUESTIONS[:3]]]
    for count in (1, 4):
        plain, _ = _batched(model, tokenizer, prompts[:count], speculate=False)
        spec, batch = _batched(model, tokenizer, prompts[:count], speculate=True)
        assert getattr(batch.verify_forward, "__self__", None) is batch.forward  # tuned many
        assert batch.accepted > 0
        assert spec == plain
