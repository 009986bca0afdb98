"""The CPU decode paths on the real demo model: a tuned, batched decode (the tuned layers, split
attention and cpu_decode's llama step) writes what mlx-lm's own single-sequence generation
writes, token for token (greedy)."""

from __future__ import annotations

from pathlib import Path

import pytest

mx = pytest.importorskip("mlx.core")

from mlx_lm import load, stream_generate  # noqa: E402
from mlx_lm.generate import BatchGenerator  # noqa: E402

from app.engine.cpu.llama_step import LlamaDecodeStep  # noqa: E402
from app.engine.cpu.tuning import tune_for_cpu  # noqa: E402
from app.engine.decode import use_logits_decode  # noqa: E402

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


def test_tuned_batched_decode_matches_mlx_lm_token_for_token(demo_float32_dir: Path) -> None:
    reference, tokenizer = load(str(demo_float32_dir))
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}],
                                             add_generation_prompt=True) for q in QUESTIONS]
    expected = []
    for prompt in prompts:
        tokens = [r.token for r in stream_generate(reference, tokenizer, prompt,
                                                   max_tokens=MAX_TOKENS)]
        expected.append(tokens)
    del reference

    tuned, _ = load(str(demo_float32_dir))
    assert tune_for_cpu(tuned) > 0
    generator = BatchGenerator(tuned, completion_batch_size=16, prefill_batch_size=16,
                               stop_tokens=[[t] for t in tokenizer.eos_token_ids])
    use_logits_decode(generator)
    assert isinstance(generator._generation_batch.forward, LlamaDecodeStep)
    uids = generator.insert(prompts, max_tokens=[MAX_TOKENS] * len(prompts))
    got: dict[int, list[int]] = {uid: [] for uid in uids}
    finished: set[int] = set()
    while len(finished) < len(uids):
        for response in generator.next_generated():
            got[response.uid].append(response.token)
            if response.finish_reason is not None:
                finished.add(response.uid)
    generator.close()

    batched = [got[uid] for uid in uids]
    assert batched == expected
    assert "Paris" in tokenizer.decode(batched[0])
