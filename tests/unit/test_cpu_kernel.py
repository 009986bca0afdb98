"""The native attention kernel (app/engine/cpu/kernels) computes what MLX's attention computes,
for every layout and mask form the engine hands it, and refuses what it does not take."""

from __future__ import annotations

import sys

import pytest

mx = pytest.importorskip("mlx.core")

from app.engine.cpu.kernels import cache_attention  # noqa: E402

pytestmark = pytest.mark.skipif(mx.default_device() != mx.cpu, reason="CPU backend only")
needs_kernel = pytest.mark.skipif(cache_attention is None, reason="kernel not built")


@pytest.mark.skipif(sys.platform != "linux", reason="built on Linux only")
def test_make_install_builds_a_kernel_that_loads() -> None:
    # `make test` builds it first; a broken build must fail here, not silently fall back.
    assert cache_attention is not None


def _cache_view(batch: int, kv_heads: int, context: int, dims: int) -> mx.array:
    """Keys or values as a KV cache hands them over: the first `context` positions of a
    larger buffer, so rows are strided and not contiguous."""
    buffer = mx.random.normal((batch, kv_heads, context + 29, dims))
    return buffer[:, :, :context, :]


def _reference(queries: mx.array, keys: mx.array, values: mx.array, scale: float,
               mask: mx.array | str | None) -> mx.array:
    with mx.stream(mx.cpu):
        out: mx.array = mx.fast.scaled_dot_product_attention(
            queries, keys, values, scale=scale, mask=mask)
    return out


def _masks(batch: int, length: int, context: int) -> list[object]:
    causal = mx.arange(context)[None, :] <= mx.arange(length)[:, None] + (context - length)
    padding = mx.arange(context)[None, :] >= mx.arange(batch)[:, None] * 3  # left padding
    padded = causal[None, None] & padding[:, None, None, :]
    # A query that sees only the second half of the keys, and one that sees none of them
    # (MLX then averages every value): the kernel's two halves of the keys must merge so.
    halves = mx.broadcast_to(mx.arange(context) >= context // 2, (batch, 1, length, context))
    nothing = mx.zeros((batch, 1, length, context), dtype=mx.bool_)
    additive = mx.where(padded, 0.0, -1e9).astype(mx.float32)
    return [None, "causal", causal, padded, padded[:1], padding[:, None, None, :], halves,
            nothing, additive, additive.astype(mx.float16),
            mx.random.normal((batch, 1, 1, context))]


@needs_kernel
@pytest.mark.parametrize(("batch", "heads", "kv_heads", "length", "context", "dims"), [
    (1, 9, 3, 1, 7, 64),      # one decoding row, shallow
    (8, 9, 3, 1, 700, 64),    # a decode step of eight rows
    (1, 9, 3, 4, 1100, 64),   # a prefill chunk at depth: its keys split across both cores
    (2, 4, 1, 16, 600, 16),   # the longest chunk it takes, one shared key/value head
    (3, 8, 8, 2, 40, 20),     # no grouping; a head size that is not a multiple of 8
    (1, 2, 2, 3, 513, 128),
])
def test_kernel_equals_mlx_attention(batch: int, heads: int, kv_heads: int, length: int,
                                     context: int, dims: int) -> None:
    mx.random.seed(batch * 1000 + context)
    # Queries as the model lays them out before attention: (batch, length, heads, dims)
    # transposed, so they are strided too.
    queries = mx.random.normal((batch, length, heads, dims)).transpose(0, 2, 1, 3)
    keys = _cache_view(batch, kv_heads, context, dims)
    values = _cache_view(batch, kv_heads, context, dims)
    scale = dims ** -0.5
    for mask in _masks(batch, length, context):
        if isinstance(mask, str):
            ours = cache_attention(queries, keys, values, scale=scale, causal=True)
        else:
            ours = cache_attention(queries, keys, values, scale=scale, mask=mask)
        theirs = _reference(queries, keys, values, scale, mask)
        assert ours.shape == theirs.shape == (batch, heads, length, dims)
        assert mx.allclose(ours, theirs, atol=2e-5, rtol=1e-4).item(), (
            mask if isinstance(mask, str) or mask is None else mask.shape,
            float(mx.abs(ours - theirs).max()))


@needs_kernel
def test_kernel_refuses_what_it_does_not_take() -> None:
    queries = mx.random.normal((1, 4, 2, 8))
    keys = mx.random.normal((1, 2, 5, 8))
    refused = [
        ((queries.astype(mx.float16), keys, keys), {}),  # float32 only
        ((queries, keys[:, :, :, :4], keys[:, :, :, :4]), {}),  # head sizes differ
        ((mx.random.normal((1, 3, 2, 8)), keys, keys), {}),  # 3 heads over 2 kv heads
        ((queries, keys[:, :, :1], keys[:, :, :1]), {}),  # fewer keys than queries
        ((queries, keys, keys), {"mask": mx.ones((1, 2, 2, 5), dtype=mx.bool_)}),  # per head
        ((queries, keys, keys), {"mask": mx.ones((1, 1, 2, 4), dtype=mx.bool_)}),
        ((queries, keys, keys), {"mask": mx.ones((2, 5), dtype=mx.bool_), "causal": True}),
        ((queries[0], keys[0], keys[0]), {}),
    ]
    for args, options in refused:
        with pytest.raises(ValueError, match="cache_attention"):
            cache_attention(*args, scale=1.0, **options)
