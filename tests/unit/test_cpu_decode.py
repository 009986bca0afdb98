"""The llama decode step of app/engine/cpu/llama_step.py computes exactly what the tuned model's own
forward computes, bit for bit, for every batch size and both RoPE layouts."""

from __future__ import annotations

from typing import Any

import pytest

mx = pytest.importorskip("mlx.core")

from mlx_lm.models.cache import BatchKVCache, KVCache  # noqa: E402

from app.engine.cpu.llama_step import LlamaDecodeStep  # noqa: E402
from app.engine.cpu.tuning import tune_for_cpu  # noqa: E402
from app.engine.decode import decode_forward  # noqa: E402
from tests.unit.test_cpu_tuning import tiny_model  # noqa: E402

pytestmark = pytest.mark.skipif(mx.default_device() != mx.cpu, reason="CPU backend only")


def _prefilled(model: Any, prompts: list[list[int]]) -> list[Any]:
    """Per-layer BatchKVCaches holding `prompts`, left-padded as BatchGenerator pads them."""
    longest = max(len(p) for p in prompts)
    padding = [longest - len(p) for p in prompts]
    caches = [BatchKVCache(padding) for _ in model.layers]
    tokens = mx.array([[0] * pad + p for pad, p in zip(padding, prompts, strict=True)])
    model(tokens, cache=caches)
    mx.eval([c.state for c in caches])
    return caches


@pytest.mark.parametrize("traditional", [True, False])
@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("batch", [1, 3, 10, 17])
def test_decode_step_equals_the_models_own_forward(traditional: bool, tied: bool,
                                                   batch: int) -> None:
    model = tiny_model(seed=batch, rope_traditional=traditional, tie_word_embeddings=tied)
    tune_for_cpu(model)
    assert LlamaDecodeStep.supports(model)
    step = LlamaDecodeStep(model)
    # Prompts of different lengths: left padding, so the mask matters.
    prompts = [[(7 * i + j) % 300 for j in range(3 + (5 * i) % 11)] for i in range(batch)]
    ours, theirs = _prefilled(model, prompts), _prefilled(model, prompts)
    tokens = mx.array([(11 * i) % 300 for i in range(batch)])
    for _ in range(4):  # several steps: positions and the caches advance together
        expected = model(tokens[:, None], cache=theirs)[:, -1, :]
        got = step(tokens, ours)
        assert got.shape == expected.shape
        assert mx.array_equal(got, expected), float(mx.abs(got - expected).max())
        tokens = mx.argmax(expected, axis=-1)
    assert mx.array_equal(ours[0].offset, theirs[0].offset)


def test_other_models_and_caches_use_the_models_own_forward() -> None:
    untuned = tiny_model()
    assert not LlamaDecodeStep.supports(untuned)  # plain nn.Linear layers: mlx-lm's forward
    tuned = tiny_model()
    tune_for_cpu(tuned)
    forward = decode_forward(tuned)
    assert isinstance(forward, LlamaDecodeStep)
    # A cache type the step does not handle goes to the model's own call.
    caches, reference = [KVCache() for _ in tuned.layers], [KVCache() for _ in tuned.layers]
    prompt = mx.array([[5, 6, 7]])
    tuned(prompt, cache=caches)
    tuned(prompt, cache=reference)
    tokens = mx.array([9])
    assert mx.array_equal(forward(tokens, caches),
                          tuned(tokens[:, None], cache=reference)[:, -1, :])
