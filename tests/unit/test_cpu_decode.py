"""The llama decode step of app/engine/cpu/llama_step.py computes exactly what the tuned model's own
forward computes, bit for bit, for every batch size and both RoPE layouts."""

from __future__ import annotations

from typing import Any

import pytest

mx = pytest.importorskip("mlx.core")

from mlx_lm.models.cache import BatchKVCache, KVCache  # noqa: E402

from app.engine.cpu import llama_step, tuning  # noqa: E402
from app.engine.cpu.llama_step import LlamaDecodeStep, Rider, RiderSlot  # noqa: E402
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


def _attention_in(path: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, list[int]]:
    """Make the decode step attend several new tokens a row in the native kernel, in MLX or
    in NumPy whatever the depth (NumPy's real threshold wants thousands of positions); the
    returned lists count the kernel's and NumPy's calls. Without the kernel (the "mlx" and
    "numpy" paths) the model's own forward, the reference, keeps NumPy's real threshold: MLX
    here."""
    if path == "kernel" and tuning.cache_attention is None:
        pytest.skip("the native attention kernel is not built (make install builds it)")
    if path != "kernel":
        monkeypatch.setattr(tuning, "cache_attention", None)
    monkeypatch.setattr(llama_step, "numpy_attention_pays",
                        lambda length, context: path == "numpy" and length > 1)
    calls: dict[str, list[int]] = {"kernel": [], "numpy": []}
    for name, function in [("kernel", llama_step.attend_in_kernel),
                           ("numpy", llama_step.attend_in_numpy)]:
        def counted(*args: Any, _name: str = name, _function: Any = function) -> Any:
            calls[_name].append(1)
            return _function(*args)

        monkeypatch.setattr(llama_step, f"attend_in_{name}", counted)
    return calls


@pytest.mark.parametrize("traditional", [True, False])
@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("batch", [1, 3, 17])
@pytest.mark.parametrize("path", ["kernel", "mlx", "numpy"])
def test_multi_token_step_equals_the_models_own_forward(traditional: bool, tied: bool,
                                                        batch: int, path: str,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The verify forward of speculative decoding: L new tokens a row, causal among them,
    left padding hidden, and rolled back by a trim as the speculative step does; attending in
    MLX (shallow, or one row), in NumPy (several rows deep in context) and in the kernel."""
    calls = _attention_in(path, monkeypatch)
    model = tiny_model(seed=100 + batch, rope_traditional=traditional, tie_word_embeddings=tied)
    tune_for_cpu(model)
    step = LlamaDecodeStep(model)
    prompts = [[(13 * i + 3 * j) % 300 for j in range(2 + (7 * i) % 13)] for i in range(batch)]
    ours, theirs = _prefilled(model, prompts), _prefilled(model, prompts)
    for n, length in enumerate([2, 5, 1, 8, 3]):
        tokens = mx.array([[(17 * i + 5 * j + n) % 300 for j in range(length)]
                           for i in range(batch)])
        expected = model(tokens, cache=theirs)
        got = step.many(tokens, ours)
        assert got.shape == expected.shape == (batch, length, 300)
        # Not bit for bit: MLX's fused attention sums in another order, and some BLAS kernels
        # (OpenBLAS's Zen ones) round a projection differently by its row count, so the KV
        # kept from earlier rounds differs by ~1e-6 too. Logits here span about +-40: 1e-2 is
        # float32 rounding carried through these rounds (2.6e-3 seen), far below a wrong mask
        # or position (those move logits by whole units).
        assert mx.allclose(got, expected, rtol=1e-4, atol=1e-2), float(mx.abs(got - expected).max())
        # Roll back all but the first token (a rejected draft), on both sides alike.
        for cache in (*ours, *theirs):
            cache.trim(length - 1)
        assert mx.array_equal(ours[0].offset, theirs[0].offset)
    # After the trims the next single-token step still equals the model's own. Not bit for
    # bit: the KV each side kept came from projections of a different number of rows, and
    # some BLAS kernels (OpenBLAS's Zen ones) block, and so round, by the row count: the
    # caches differ by ~1e-6 before this step, though a single-token step over equal caches
    # is bit for bit (test_decode_step_equals_the_models_own_forward).
    tokens = mx.array([(3 * i) % 300 for i in range(batch)])
    got, expected = step(tokens, ours), model(tokens[:, None], cache=theirs)[:, -1, :]
    assert mx.allclose(got, expected, rtol=1e-4, atol=1e-2), float(mx.abs(got - expected).max())
    assert bool(calls["numpy"]) == (path == "numpy" and batch > 1)  # one row stays in MLX
    assert bool(calls["kernel"]) == (path == "kernel")


@pytest.mark.parametrize("path", ["kernel", "mlx", "numpy"])
@pytest.mark.parametrize("chunk", [1, 6])
def test_a_prefill_chunk_riding_a_decode_step_equals_its_own_forward(
        path: str, chunk: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """A `Rider` (a prefill chunk computed in the decode step's forward) leaves the decoding
    rows' logits and its prompt's KV as they are when the chunk is a forward of its own."""
    calls = _attention_in(path, monkeypatch)
    model = tiny_model(seed=7)
    tune_for_cpu(model)
    step = LlamaDecodeStep(model)
    step.riders = slot = RiderSlot()
    rows = [[(5 * i + j) % 300 for j in range(4 + 3 * i)] for i in range(3)]
    ours, theirs = _prefilled(model, rows), _prefilled(model, rows)
    prompt = [(11 * j) % 300 for j in range(40)]
    ours_prompt, theirs_prompt = _prefilled(model, [prompt]), _prefilled(model, [prompt])
    tokens = mx.array([9, 99, 199])
    pieces = mx.array([[(3 * j + 1) % 300 for j in range(chunk)]])
    slot.rider = Rider(pieces, ours_prompt)
    got = step(tokens, ours)
    expected = model(tokens[:, None], cache=theirs)[:, -1, :]
    model(pieces, cache=theirs_prompt)
    assert slot.rider.taken
    assert mx.allclose(got, expected, rtol=1e-4, atol=1e-2), float(mx.abs(got - expected).max())
    # The chunk's KV is the prompt's own (every layer after the first holds what its
    # attention computed), so the prompt's next tokens see the same context.
    for mine, reference in zip(ours_prompt, theirs_prompt, strict=True):
        assert mx.array_equal(mine.offset, reference.offset)
        for got_kv, expected_kv in zip(mine.state[:2], reference.state[:2], strict=True):
            assert mx.allclose(got_kv, expected_kv, atol=1e-3), float(
                mx.abs(got_kv - expected_kv).max())
    after = mx.array([[17, 23, 29]])
    got, expected = model(after, cache=ours_prompt), model(after, cache=theirs_prompt)
    assert mx.allclose(got, expected, rtol=1e-4, atol=1e-2), float(mx.abs(got - expected).max())
    assert bool(calls["numpy"]) == (path == "numpy" and chunk > 1)
    assert bool(calls["kernel"]) == (path == "kernel")


def test_multi_token_step_falls_back_to_the_models_own_forward() -> None:
    tuned = tiny_model()
    tune_for_cpu(tuned)
    step = LlamaDecodeStep(tuned)
    caches, reference = [KVCache() for _ in tuned.layers], [KVCache() for _ in tuned.layers]
    prompt = mx.array([[5, 6, 7]])
    tuned(prompt, cache=caches)
    tuned(prompt, cache=reference)
    tokens = mx.array([[9, 10, 11]])
    assert mx.array_equal(step.many(tokens, caches), tuned(tokens, cache=reference))
