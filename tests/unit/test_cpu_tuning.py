"""The CPU decode paths compute what mlx-lm computes: layer layout, grouped attention, and the
decode step that samples from logits. Tiny random llama models, so every case runs in seconds."""

from __future__ import annotations

from typing import Any

import pytest

mx = pytest.importorskip("mlx.core")
nn = pytest.importorskip("mlx.nn")

from mlx_lm.generate import BatchGenerator  # noqa: E402
from mlx_lm.models import llama  # noqa: E402
from mlx_lm.models.base import scaled_dot_product_attention as mlx_lm_attention  # noqa: E402

from app.core.types import SamplingParams  # noqa: E402
from app.engine.cpu import tuning  # noqa: E402
from app.engine.cpu.tuning import (  # noqa: E402
    CpuLinear,
    CpuRMSNorm,
    CpuRoPE,
    CpuTiedEmbedding,
    decode_attention,
    multiply_padded,
    numpy_attention_pays,
    tune_for_cpu,
)
from app.engine.decode import LogitsGenerationBatch, use_logits_decode  # noqa: E402
from app.engine.sampling import make_sequence_processors, make_sequence_sampler  # noqa: E402

pytestmark = pytest.mark.skipif(mx.default_device() != mx.cpu, reason="CPU backend only")

TINY = {
    "model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2,
    "intermediate_size": 160, "num_attention_heads": 4, "num_key_value_heads": 2,
    "rms_norm_eps": 1e-5, "vocab_size": 300, "max_position_embeddings": 512,
    "rope_traditional": True,
}


@pytest.fixture(params=["kernel", "mlx"])
def attention_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run the test with the native attention kernel, and again without it (the MLX and
    NumPy paths a machine without the kernel takes)."""
    if request.param == "kernel" and tuning.cache_attention is None:
        pytest.skip("the native attention kernel is not built (make install builds it)")
    if request.param == "mlx":
        monkeypatch.setattr(tuning, "cache_attention", None)
    return str(request.param)


def tiny_model(seed: int = 0, **overrides: Any) -> Any:
    mx.random.seed(seed)
    model = llama.Model(llama.ModelArgs.from_dict({**TINY, **overrides}))
    # Larger weights than the default init, so greedy tokens vary and outputs tell models apart.
    model.update(nn.utils.tree_map(lambda w: w * 4, model.parameters()))
    mx.eval(model.parameters())
    return model


@pytest.mark.parametrize("rows", [1, 2, 10, 16, 17, 40])
def test_padded_product_equals_the_plain_one(rows: int) -> None:
    x = mx.random.normal((rows, 24))
    weight = mx.random.normal((24, 40))
    bias = mx.random.normal((40,))
    assert mx.allclose(multiply_padded(x, weight), x @ weight, atol=1e-5)
    assert mx.allclose(multiply_padded(x, weight, bias), x @ weight + bias, atol=1e-5)
    batched = x.reshape(1, rows, 24)
    assert multiply_padded(batched, weight).shape == (1, rows, 40)


def test_cpu_linear_and_embedding_equal_the_layers_they_replace() -> None:
    linear = nn.Linear(24, 40, bias=True)
    x = mx.random.normal((3, 5, 24))
    assert mx.allclose(CpuLinear(linear)(x), linear(x), atol=1e-5)

    embedding = nn.Embedding(50, 24)
    tied = CpuTiedEmbedding(embedding)
    ids = mx.array([[3, 7, 49], [0, 0, 1]])
    assert mx.array_equal(tied(ids), embedding(ids))
    assert mx.allclose(tied.as_linear(x), embedding.as_linear(x), atol=1e-5)


@pytest.mark.parametrize(("batch", "heads", "kv_heads", "context"),
                         [(1, 4, 2, 7), (10, 9, 3, 60), (3, 8, 8, 33)])
def test_grouped_decode_attention_equals_mlx_lm(batch: int, heads: int, kv_heads: int,
                                                context: int, attention_path: str) -> None:
    q = mx.random.normal((batch, heads, 1, 16))
    k = mx.random.normal((batch, kv_heads, context, 16))
    v = mx.random.normal((batch, kv_heads, context, 16))
    padding = mx.random.uniform(shape=(batch, 1, 1, context)) > 0.3
    padding[..., -1] = True
    # Per sequence, per head, additive, and one mask broadcast over the batch: with two or
    # more sequences the halves of the batch go to two streams, each with its rows of the mask.
    masks = [None, padding, mx.broadcast_to(padding, (batch, heads, 1, context)),
             mx.random.normal((batch, 1, 1, context)), padding[:1]]
    for mask in masks:
        ours = decode_attention(q, k, v, None, 0.25, mask)
        theirs = mlx_lm_attention(q, k, v, None, scale=0.25, mask=mask)
        assert mx.allclose(ours, theirs, atol=1e-5)


def _chunk_inputs(batch: int, heads: int, kv_heads: int, length: int, context: int
                  ) -> tuple[mx.array, ...]:
    """Queries, keys, values and two boolean masks of a prefill chunk: causal after earlier
    chunks, and that with each sequence's left padding (sequence i padded by i positions)."""
    q = mx.random.normal((batch, heads, length, 16))
    k = mx.random.normal((batch, kv_heads, context, 16))
    v = mx.random.normal((batch, kv_heads, context, 16))
    causal = mx.arange(context)[None, :] <= mx.arange(length)[:, None] + (context - length)
    padded = mx.broadcast_to(causal, (batch, 1, length, context)) & (
        mx.arange(context) >= mx.arange(batch)[:, None])[:, None, None, :]
    return q, k, v, causal, padded


@pytest.mark.parametrize(("batch", "heads", "kv_heads", "length", "context"),
                         [(1, 4, 2, 4, 7), (2, 9, 3, 16, 60), (3, 8, 8, 31, 33)])
def test_small_chunk_attention_equals_mlx_lm(batch: int, heads: int, kv_heads: int,
                                             length: int, context: int,
                                             attention_path: str) -> None:
    """A few queries a sequence at shallow depth (a small prefill chunk, draft verification)
    attend in the kernel, or without it grouped by key/value head with the exp2 softmax:
    mlx-lm's numbers for every boolean mask form; additive masks of several queries go to the
    kernel (up to its length) or mlx-lm's own version."""
    assert not numpy_attention_pays(length, context)
    q, k, v, causal, padded = _chunk_inputs(batch, heads, kv_heads, length, context)
    for mask in ("causal", None, padded, causal):
        ours = decode_attention(q, k, v, None, 0.25, mask)
        theirs = mlx_lm_attention(q, k, v, None, scale=0.25, mask=mask)
        assert mx.allclose(ours, theirs, atol=1e-5), mask
    additive = mx.where(padded, 0.0, -1e9).astype(mx.float32)
    ours = decode_attention(q, k, v, None, 0.25, additive)
    theirs = mlx_lm_attention(q, k, v, None, scale=0.25, mask=additive)
    if attention_path == "kernel" and length <= tuning.KERNEL_MAX_LENGTH:
        assert mx.allclose(ours, theirs, atol=1e-5)
    else:
        assert mx.array_equal(ours, theirs)


@pytest.mark.parametrize(("batch", "heads", "kv_heads", "length", "context"),
                         [(1, 9, 3, 4, 2100), (2, 4, 2, 40, 300), (3, 8, 8, 64, 160)])
def test_numpy_attention_equals_mlx_lm(batch: int, heads: int, kv_heads: int, length: int,
                                       context: int, attention_path: str) -> None:
    """Several queries a sequence at depth (a prefill chunk; a 4-token one from ~2,000 tokens
    of context) attend in NumPy: the same numbers as mlx-lm's attention for every mask form a
    batch prefill uses (causal after earlier chunks, left padding as booleans, one table for
    all, additive)."""
    assert numpy_attention_pays(length, context)
    q, k, v, causal, padded = _chunk_inputs(batch, heads, kv_heads, length, context)
    additive = mx.where(padded, 0.0, -1e9).astype(mx.float32)
    for mask in ("causal", None, padded, causal, additive):
        ours = decode_attention(q, k, v, None, 0.25, mask)
        theirs = mlx_lm_attention(q, k, v, None, scale=0.25, mask=mask)
        assert mx.allclose(ours, theirs, atol=1e-5), mask


def test_compiled_rope_and_norm_equal_the_layers_they_replace() -> None:
    rope = nn.RoPE(16, traditional=True, base=10000.0)
    x = mx.random.normal((5, 4, 1, 16))
    offsets = mx.array([0, 3, 17, 100, 255])
    assert mx.allclose(CpuRoPE(rope)(x, offsets), rope(x, offsets), atol=1e-6)
    prefill = mx.random.normal((1, 4, 9, 16))
    assert mx.array_equal(CpuRoPE(rope)(prefill, 4), rope(prefill, 4))

    norm = nn.RMSNorm(24, eps=1e-5)
    norm.weight = mx.random.normal((24,))
    for shape in [(7, 1, 24), (1, 9, 24)]:
        h = mx.random.normal(shape)
        assert mx.allclose(CpuRMSNorm(norm)(h), norm(h), atol=1e-6)


def test_tuned_model_computes_the_same_logits() -> None:
    model = tiny_model()
    tokens = mx.array([[5, 17, 42, 99, 7, 250, 3, 3, 8, 1, 64]])
    before = model(tokens)
    # Per layer 7 projections, 2 norms and the RoPE; plus the tied embedding and the final norm.
    assert tune_for_cpu(model) == 2 * 10 + 2
    assert isinstance(model.model.layers[0].mlp.up_proj, CpuLinear)
    assert isinstance(model.model.layers[1].self_attn.rope, CpuRoPE)
    assert isinstance(model.model.norm, CpuRMSNorm)
    assert isinstance(model.model.embed_tokens, CpuTiedEmbedding)
    after = model(tokens)
    assert mx.allclose(before, after, atol=1e-4)


def test_untied_and_quantized_models_keep_what_the_tuning_cannot_help() -> None:
    untied = tiny_model(tie_word_embeddings=False)
    assert tune_for_cpu(untied) == 2 * 10 + 2  # the separate lm_head, not the embedding
    assert isinstance(untied.lm_head, CpuLinear)
    assert type(untied.model.embed_tokens) is nn.Embedding

    quantized = tiny_model()
    nn.quantize(quantized, group_size=32, bits=4)
    assert tune_for_cpu(quantized) == 2 * 3 + 1  # norms and RoPE only
    assert isinstance(quantized.model.layers[0].mlp.up_proj, nn.QuantizedLinear)


def _generate(model: Any, prompts: list[list[int]], samplers: list[Any], processors: list[Any],
              *, logits_decode: bool, max_tokens: int = 12) -> dict[int, list[int]]:
    generator = BatchGenerator(model, completion_batch_size=8, prefill_batch_size=8)
    if logits_decode:
        use_logits_decode(generator)
    uids = generator.insert(prompts, max_tokens=[max_tokens] * len(prompts), samplers=samplers,
                            logits_processors=processors)
    out: dict[int, list[int]] = {uid: [] for uid in uids}
    while any(len(tokens) < max_tokens for tokens in out.values()):
        for response in generator.next_generated():
            out[response.uid].append(response.token)
    generator.close()
    return {i: out[uid] for i, uid in enumerate(uids)}


def test_logits_decode_samples_what_mlx_lm_samples() -> None:
    model = tiny_model()
    tune_for_cpu(model)
    prompts = [[5, 17, 42], [99, 7, 250, 3, 3, 8, 1], [64], [9, 9, 9, 9]]
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0.8, top_p=0.9, seed=7),
              SamplingParams(temperature=1.0, top_k=20, min_p=0.05, seed=3),
              SamplingParams(temperature=0, repetition_penalty=1.3)]
    samplers = [make_sequence_sampler(p) for p in params]
    processors = [make_sequence_processors(p) for p in params]
    ours = _generate(model, prompts, samplers, processors, logits_decode=True)
    samplers = [make_sequence_sampler(p) for p in params]  # fresh PRNG keys
    theirs = _generate(model, prompts, samplers, processors, logits_decode=False)
    assert ours == theirs
    assert len({tuple(tokens) for tokens in ours.values()}) == len(prompts)


def test_logits_decode_replaces_only_an_empty_batch() -> None:
    generator = BatchGenerator(tiny_model())
    use_logits_decode(generator)
    assert isinstance(generator._generation_batch, LogitsGenerationBatch)
    generator.insert([[1, 2, 3]], max_tokens=[4])
    generator.next_generated()
    with pytest.raises(RuntimeError):
        use_logits_decode(generator)
    generator.close()


def test_each_engine_thread_splits_on_its_own_side_stream() -> None:
    """MLX streams are thread-local: a second engine thread in the process (tests, a restart)
    must not be handed the first thread's side stream."""
    import threading

    from app.engine.cpu.tuning import on_two_streams

    rows = mx.arange(8, dtype=mx.float32).reshape(4, 2)
    mx.eval(rows)  # made here, used in the threads below: no lazy work tied to this thread

    def split() -> list[float]:
        out = on_two_streams(4, lambda part: rows[part] * 2)
        mx.eval(out)
        return [float(v) for v in out.reshape(-1)]

    expected = [2.0 * v for v in range(8)]
    results: list[object] = []
    for _ in range(2):  # two threads one after the other, each with fresh streams
        def run() -> None:
            with mx.stream(mx.new_stream(mx.cpu)):
                try:
                    results.append(split())
                except Exception as error:  # reported below, not lost in the thread
                    results.append(error)

        thread = threading.Thread(target=run)
        thread.start()
        thread.join()
    assert results == [expected, expected]
