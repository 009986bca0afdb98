"""Float32 layers laid out for MLX's CPU backend, where matrix products go to the system BLAS.

Measured with Debian's OpenBLAS on a 2-core x86 box (see bench/RESULTS.md):

- A product whose left side has 2..15 rows costs up to twice what 16 rows cost (a (10, 576) by
  (576, 1536) product: 0.77 ms; (16, 576): 0.49 ms). OpenBLAS's kernels work in blocks of 16
  rows, so a decode step over a batch of 10 sequences is cheapest when each product is padded to
  16 rows and the extra rows are dropped afterwards. One row (single-stream decode) is its own
  fast path and is left alone.
- `x @ w.T` with the weight stored as (out, in) packs the whole weight on every call; storing it
  transposed and contiguous does not. That matters most for the vocabulary projection: 49152 x
  576 costs 16.8 ms as `x @ w.T` and 10.1 ms as `x @ w_t` for one row.
- MLX's CPU attention gives every query head its own small product against a repeated copy of
  its key/value head. For a decode step (one query per sequence) grouping the query heads that
  share a key/value head into one product is a third cheaper at short contexts and more as the
  context grows (10 sequences, 270-token context: 239 ms per step down to 184 ms).
- MLX runs a stream's work on one thread. With two or more sequences, decode attention gives
  half the batch to a second CPU stream, so the per-sequence products and softmaxes of two
  halves run on both cores (a 10-sequence step: 153 ms -> 136 ms in one sitting).
- MLX's CPU `exp` is scalar (about 50M a second here; NumPy's vectorised one does 700M), so
  the softmax of a prefill chunk's attention dominates it as the context grows: a 512-token
  chunk against 4,096 tokens spends 400 of its 500 ms per layer there. Several queries a
  sequence attend in NumPy (products through its BLAS, softmax vectorised) once queries x
  context reaches `NUMPY_ATTENTION_MIN_SCORES`: 90 ms for that chunk and layer, and a 4-token
  chunk at 3,800 tokens of context costs half what it does in MLX. Everywhere else (decode
  steps, short chunks and draft verification at shallow depth) the softmax takes exp(x) as
  2^(x log2 e): MLX's CPU `power` runs about 3.5x faster than its `exp`, as accurate
  (`softmax_exp2`).
- All of that is the fallback. Where `make kernels` (run by `make run` and `make test`) built
  the native kernel (`kernels/attention.cpp`, an MLX primitive), decode steps, verify steps
  and chunks of up to `KERNEL_MAX_LENGTH` tokens attend in it instead: each key and value row
  is read once for every query head that shares it, with a vectorised exp, so attention runs
  near memory speed (8 rows 3,000 tokens deep: 3.7 ms a layer against 15-19 ms grouped; a
  4-token chunk at 1,000 tokens: 0.55 against 1.4-1.7 ms) and, unlike NumPy, inside the lazy
  graph with no evaluation in the middle of the step.
- MLX has no fused RoPE or RMSNorm kernel on the CPU: each call becomes a dozen or more graph
  nodes, and every node costs dispatch time on both the calling thread and MLX's compute thread.
  Compiled for the decode shape, the 30-layer model's step drops from about 4,560 nodes to
  3,050, and the engine thread's CPU time per step by a quarter (time the 2 cores then give to
  the arithmetic).

Quantized layers use MLX's own kernels and are left alone; so is every model on a Mac, where
MLX runs on the GPU. The rewrite keeps the model's outputs: the same products on the same rows,
the same RoPE and RMSNorm functions.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import structlog
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.models.base import scaled_dot_product_attention as _MLX_LM_ATTENTION

from app.engine.cpu.kernels import cache_attention

log = structlog.get_logger(__name__)

ROW_BLOCK = 16
LOG2_E = 1.4426950408889634
# What a hidden position scores, as MLX's attention uses: a row whose every key is hidden (left
# padding) averages the values instead of becoming NaN.
_LOWEST = float(np.finfo(np.float32).min)
# Several queries a sequence attend in NumPy from this many scores per query head (queries x
# context): a 4-token chunk from ~2,000 tokens of context, a 16-token one from ~500. Below it
# (and for one query a sequence: decode steps) the evaluation NumPy needs in the middle of the
# graph costs more than the faster softmax saves (bench/RESULTS.md, "small chunks at depth").
NUMPY_ATTENTION_MIN_SCORES = 8192


# The native kernel (`kernels.cache_attention`) takes up to this many new tokens a sequence:
# decode and verify steps, and the small prefill chunks that ride them. Longer chunks are bound
# by arithmetic, where BLAS products (NumPy's) are faster than its loops.
KERNEL_MAX_LENGTH = 16


def kernel_takes(mask: Any, batch: int, length: int) -> bool:
    """Whether `length` new queries a sequence of a `batch` attend in the native kernel with
    this mask: None, "causal", or an array broadcastable to (batch, 1, length, context)."""
    if cache_attention is None or length > KERNEL_MAX_LENGTH:
        return False
    if mask is None or isinstance(mask, str):
        return mask is None or mask == "causal"
    if not isinstance(mask, mx.array) or mask.ndim not in (2, 4):
        return False
    shape = mask.shape if mask.ndim == 4 else (1, 1, *mask.shape)
    return shape[1] == 1 and shape[0] in (1, batch) and shape[2] in (1, length)


def attend_in_kernel(queries: mx.array, keys: mx.array, values: mx.array, scale: float,
                     mask: Any) -> mx.array | None:
    """Attention of (batch, heads, length, dims) queries against the cache's (batch, kv_heads,
    context, dims) keys and values in the native kernel, reading them where they lie; None
    when the kernel is not built or does not take this form (the caller's paths do)."""
    batch, heads, length, _ = queries.shape
    if (cache_attention is None or not kernel_takes(mask, batch, length)
            or heads % keys.shape[1]
            or not queries.dtype == keys.dtype == values.dtype == mx.float32
            or (isinstance(mask, mx.array) and mask.shape[-1] != keys.shape[2])):
        return None
    if isinstance(mask, str):
        return cache_attention(queries, keys, values, scale=scale, causal=True)
    return cache_attention(queries, keys, values, scale=scale, mask=mask)


def numpy_attention_pays(length: int, context: int) -> bool:
    """Whether `length` new queries a sequence against `context` keys attend in NumPy."""
    return length > 1 and length * context >= NUMPY_ATTENTION_MIN_SCORES


def multiply_padded(x: mx.array, weight_t: mx.array, bias: mx.array | None = None) -> mx.array:
    """`x @ weight_t (+ bias)` over the last axis, with the rows padded to a multiple of 16."""
    product = (lambda a: a @ weight_t) if bias is None else (
        lambda a: mx.addmm(bias, a, weight_t))
    rows = x.size // x.shape[-1] if x.shape[-1] else 0
    padding = -rows % ROW_BLOCK if rows > 1 else 0
    if not padding:
        return product(x)
    if x.ndim == 3 and x.shape[1] == 1:
        # A decode step's (batch, 1, features): pad the batch axis, no reshapes needed.
        return product(mx.pad(x, [(0, padding), (0, 0), (0, 0)]))[:rows]
    flat = mx.pad(x.reshape(rows, x.shape[-1]), [(0, padding), (0, 0)])
    return product(flat)[:rows].reshape(*x.shape[:-1], weight_t.shape[-1])


class CpuLinear(nn.Module):  # type: ignore[misc]
    """nn.Linear with its weight stored transposed (in, out)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.weight_t = mx.contiguous(linear.weight.T)
        if "bias" in linear:
            self.bias = linear.bias

    def __call__(self, x: mx.array) -> mx.array:
        return multiply_padded(x, self.weight_t, self.get("bias"))


class CpuTiedEmbedding(nn.Module):  # type: ignore[misc]
    """An embedding that is also the output projection, stored once, transposed (dims, vocab).

    Looking tokens up becomes a column gather, which costs little next to the projection.
    """

    def __init__(self, embedding: nn.Embedding) -> None:
        super().__init__()
        self.weight_t = mx.contiguous(embedding.weight.T)

    def __call__(self, ids: mx.array) -> mx.array:
        return mx.moveaxis(mx.take(self.weight_t, ids, axis=1), 0, -1)

    def as_linear(self, x: mx.array) -> mx.array:
        return multiply_padded(x, self.weight_t)


class CpuRoPE(nn.RoPE):  # type: ignore[misc]
    """nn.RoPE whose decode call (one position per sequence) runs as one compiled function."""

    def __init__(self, rope: nn.RoPE) -> None:
        super().__init__(rope.dims, rope.traditional, rope.base, rope.scale)
        dims, traditional, base, scale = rope.dims, rope.traditional, rope.base, rope.scale
        self._decode = mx.compile(lambda x, offset: mx.fast.rope(
            x, dims, traditional=traditional, base=base, scale=scale, offset=offset))

    def __call__(self, x: mx.array, offset: int | mx.array = 0) -> mx.array:
        # Array offsets only: a Python int would be baked in, one compilation per position.
        if isinstance(offset, mx.array) and x.shape[-2] == 1:
            rotated: mx.array = self._decode(x, offset)
            return rotated
        return super().__call__(x, offset)  # type: ignore[no-any-return]


class CpuRMSNorm(nn.RMSNorm):  # type: ignore[misc]
    """nn.RMSNorm whose decode call (batch, 1, dims) runs as one compiled function."""

    def __init__(self, norm: nn.RMSNorm) -> None:
        super().__init__(norm.weight.shape[0], norm.eps)
        self.weight = norm.weight
        eps = norm.eps
        self._decode = mx.compile(lambda x, weight: mx.fast.rms_norm(x, weight, eps))

    def __call__(self, x: mx.array) -> mx.array:
        # Decode shapes: (batch, 1, dims), or the (rows, dims) of cpu_decode. Prefill lengths
        # vary, so prefill is left uncompiled.
        if x.ndim == 2 or (x.ndim == 3 and x.shape[1] == 1):
            normed: mx.array = self._decode(x, self["weight"])
            return normed
        return super().__call__(x)  # type: ignore[no-any-return]


def decode_attention(queries: mx.array, keys: mx.array, values: mx.array, cache: Any,
                     scale: float, mask: Any, sinks: mx.array | None = None) -> mx.array:
    """mlx-lm's `scaled_dot_product_attention` for the CPU: the native kernel where it is
    built (`attend_in_kernel`); without it, several queries a sequence at depth in NumPy
    (`attend_in_numpy`); a few at shallow depth (a small chunk, draft verification) with one
    product per key/value head (`attend_chunk`); one query a sequence (a decode step) the
    same way, each half of the batch on its own CPU stream
    (`on_two_streams`). Forms these do not take (sinks, quantized caches, additive masks of
    several queries) go to mlx-lm's.
    """
    batch, heads, length, dims = queries.shape
    kv_heads = keys.shape[1]
    if sinks is None and not hasattr(cache, "bits"):
        attended = attend_in_kernel(queries, keys, values, scale, mask)
        if attended is not None:
            return attended
    if (numpy_attention_pays(length, keys.shape[2]) and sinks is None
            and not hasattr(cache, "bits") and heads % kv_heads == 0):
        hidden = numpy_mask(mask, length, keys.shape[2])
        if hidden is not False:
            return attend_in_numpy(queries, keys, values, scale, hidden)
    if sinks is not None or hasattr(cache, "bits") or heads % kv_heads:
        attention: mx.array = _MLX_LM_ATTENTION(queries, keys, values, cache, scale=scale,
                                                mask=mask, sinks=sinks)
        return attention
    if length > 1:
        chunk_mask = _chunk_mask(mask, length, keys.shape[2])
        if chunk_mask is not False:
            return attend_chunk(queries * scale, keys, values, chunk_mask)
        attention = _MLX_LM_ATTENTION(queries, keys, values, cache, scale=scale, mask=mask)
        return attention
    grouped_mask = _grouped_mask(mask, heads, kv_heads)
    if grouped_mask is False:
        attention = _MLX_LM_ATTENTION(queries, keys, values, cache, scale=scale, mask=mask)
        return attention

    def part(rows: slice) -> mx.array:
        mask = grouped_mask
        if mask is not None and mask.shape[0] == batch:
            mask = mask[rows]
        grouped = (queries[rows] * scale).reshape(-1, kv_heads, heads // kv_heads, dims)
        attended = attend_grouped(grouped, keys[rows], values[rows], mask)
        return attended.reshape(-1, heads, 1, dims)

    return on_two_streams(batch, part)


def attend_in_numpy(queries: mx.array, keys: mx.array, values: mx.array, scale: float,
                    hidden: np.ndarray[Any, Any] | None) -> mx.array:
    """Attention of several queries a sequence, (batch, heads, length, dims), computed in NumPy
    with the query heads grouped by the key/value head they share; `hidden` from `numpy_mask`.
    Same arithmetic as MLX's: float32 products, a max-subtracted softmax; only the exp is
    vectorised. Reading the inputs evaluates them: a sync point in the lazy graph."""
    batch, heads, length, dims = queries.shape
    kv_heads, context = keys.shape[1], keys.shape[2]
    group = heads // kv_heads
    q = np.asarray((queries * scale).astype(mx.float32)).reshape(
        batch, kv_heads, group * length, dims)
    k = np.asarray(keys.astype(mx.float32))
    v = np.asarray(values.astype(mx.float32))
    scores = np.matmul(q, k.swapaxes(-1, -2)).reshape(batch, kv_heads, group, length, context)
    if hidden is not None:
        if hidden.dtype == np.bool_:  # True hides the position
            # The lowest finite float, as MLX uses: a row with every key hidden (left padding)
            # averages the values instead of becoming NaN and poisoning later layers.
            np.copyto(scores, np.finfo(np.float32).min, where=hidden)
        else:
            scores += hidden
    scores -= scores.max(axis=-1, keepdims=True)
    np.exp(scores, out=scores)
    weights = scores.reshape(batch, kv_heads, group * length, context)
    # Normalised after the product: a division over (queries, dims), not (queries, context).
    out = np.matmul(weights, v) / weights.sum(axis=-1, keepdims=True)
    return mx.array(out.reshape(batch, heads, length, dims)).astype(queries.dtype)


def numpy_mask(mask: Any, length: int, context: int) -> Any:
    """The mask as NumPy laid out like the grouped scores (batch, kv_heads, group, length,
    context): boolean where True hides a position, or additive; None for no mask; False for
    a form this path does not take."""
    if mask is None:
        return None
    if isinstance(mask, str):
        if mask != "causal":
            return False
        # Query i sits at position context - length + i and sees keys up to it.
        return (np.arange(context)[None, :] > np.arange(length)[:, None] + (context - length))
    if not isinstance(mask, mx.array) or mask.shape[-2:] != (length, context):
        return False
    if mask.ndim != 2 and not (mask.ndim == 4 and mask.shape[1] == 1):
        return False
    boolean = mask.dtype == mx.bool_
    table = ~np.asarray(mask) if boolean else np.asarray(mask.astype(mx.float32))
    return table if mask.ndim == 2 else table[:, :, None]  # (batch, 1, 1, length, context)


def softmax_exp2(scores: mx.array) -> mx.array:
    """Softmax over the last axis, in float32, with exp(x) computed as 2^(x log2 e) (MLX's CPU
    `exp` is scalar; its `power` about 3.5x faster and as accurate)."""
    scores = scores.astype(mx.float32)
    weights = mx.power(2.0, (scores - scores.max(axis=-1, keepdims=True)) * LOG2_E)
    return weights / weights.sum(axis=-1, keepdims=True)


def attend_chunk(queries: mx.array, keys: mx.array, values: mx.array,
                 mask: mx.array | None) -> mx.array:
    """Attention of a few new tokens a sequence, (batch, heads, length, dims) scaled queries
    against (batch, kv_heads, context, dims): the query heads that share a key/value head in
    one product, `softmax_exp2`. `mask`: from `_chunk_mask`."""
    batch, heads, length, dims = queries.shape
    kv_heads, context = keys.shape[1], keys.shape[2]
    grouped = queries.reshape(batch, kv_heads, heads // kv_heads * length, dims)
    scores = (grouped @ keys.swapaxes(-1, -2)).reshape(
        batch, kv_heads, heads // kv_heads, length, context)
    if mask is not None:
        scores = mx.where(mask, scores, mx.array(_LOWEST, scores.dtype))
    weights = softmax_exp2(scores).astype(values.dtype)
    attended = weights.reshape(batch, kv_heads, -1, context) @ values
    return attended.reshape(batch, heads, length, dims)


def _chunk_mask(mask: Any, length: int, context: int) -> Any:
    """The mask of `attend_chunk`: boolean, True where a query sees a key, laid out (batch or
    1, 1, 1, length, context); None for no mask; False for a form it does not take."""
    if mask is None:
        return None
    if isinstance(mask, str):
        if mask != "causal":
            return False
        # Query i sits at position context - length + i and sees keys up to it.
        return (mx.arange(context)[None, :] <= mx.arange(length)[:, None] + (context - length))
    if (not isinstance(mask, mx.array) or mask.dtype != mx.bool_
            or mask.shape[-2:] != (length, context)):
        return False
    if mask.ndim == 2:
        return mask
    if mask.ndim == 4 and mask.shape[1] == 1:
        return mask[:, :, None]  # (batch, 1, 1, length, context)
    return False


def attend_grouped(queries: mx.array, keys: mx.array, values: mx.array,
                   mask: mx.array | None) -> mx.array:
    """Single-query attention with the (scaled) queries grouped by the key/value head they
    share: (batch, kv_heads, group, dims) against (batch, kv_heads, context, dims). `mask` is
    boolean (False hides a position) or additive."""
    scores = queries @ keys.swapaxes(-1, -2)  # (batch, kv_heads, group, context)
    if mask is not None:
        if mask.dtype == mx.bool_:
            scores = mx.where(mask, scores, mx.array(-mx.inf, scores.dtype))
        else:
            scores = scores + mask
    return softmax_exp2(scores).astype(values.dtype) @ values


def on_two_streams(batch: int, part: Callable[[slice], mx.array]) -> mx.array:
    """`part(rows)` for the whole batch, concatenated along it.

    With two or more sequences the first half of the batch is computed on a second CPU stream
    (MLX gives each stream its own thread) while the calling stream computes the other half:
    per-sequence work that MLX's one compute thread would otherwise do alone while the BLAS
    threads wait for the next projection."""
    parts = batch_parts(batch)
    if len(parts) == 1:
        return part(parts[0])
    with mx.stream(_side_stream()):
        head = part(parts[0])
    return mx.concatenate([head, part(parts[1])])


def batch_parts(batch: int) -> list[slice]:
    """The rows `on_two_streams` hands to `part`: the whole batch, or its two halves."""
    half = batch // 2
    return [slice(0, half), slice(half, batch)] if batch > 1 else [slice(0, batch)]


# MLX streams belong to the thread that made them: one side stream per engine thread, or a
# second engine in the process (tests; a restarted thread) fails with "no Stream in thread".
_SIDE_STREAM = threading.local()


def _side_stream() -> Any:
    """This thread's second CPU stream for `on_two_streams` (made on first use)."""
    stream = getattr(_SIDE_STREAM, "stream", None)
    if stream is None:
        stream = _SIDE_STREAM.stream = mx.new_stream(mx.cpu)
    return stream


def _grouped_mask(mask: Any, heads: int, kv_heads: int) -> Any:
    """The mask laid out like the grouped scores; None for no mask, False when unsupported."""
    if mask is None:
        return None
    if not isinstance(mask, mx.array) or mask.ndim != 4:
        return False  # "causal" and other forms: only used with several queries anyway
    if mask.shape[1] == 1:
        return mask  # (batch, 1, 1, context) broadcasts over the groups
    if mask.shape[1] == heads:
        return mask.reshape(mask.shape[0], kv_heads, heads // kv_heads, mask.shape[-1])
    return False


def _install_decode_attention(model: nn.Module) -> None:
    """Point the modules that define `model`'s layers at `decode_attention`.

    mlx-lm's model files call the `scaled_dot_product_attention` they import from
    mlx_lm.models.base, so the name is replaced in those modules (for every model of the same
    architecture in this process, which is what we want on a CPU-only machine).
    """
    for name in {type(module).__module__ for module in model.modules()}:
        source = sys.modules.get(name)
        if getattr(source, "scaled_dot_product_attention", None) is _MLX_LM_ATTENTION:
            source.scaled_dot_product_attention = decode_attention  # type: ignore[union-attr]


def on_cpu_backend() -> bool:
    """MLX computes on the CPU (Linux, or a Mac told to): no GPU kernels."""
    return bool(mx.default_device() == mx.cpu)


def tune_for_cpu(model: nn.Module) -> int:
    """When MLX computes on the CPU: rewrite `model`'s float32 Linear (and tied embedding),
    RoPE and RMSNorm layers in place and give its architecture the grouped decode attention.
    Returns how many layers were rewritten (0 on a GPU; quantized layers are left alone)."""
    if mx.default_device() != mx.cpu:
        return 0
    _install_decode_attention(model)
    tied = "lm_head" not in model  # mlx-lm models name an untied output projection lm_head
    is_module = lambda m: isinstance(m, nn.Module)  # noqa: E731
    # Paths, not layers: holding every old layer would keep all the old weights alive.
    paths = [path for path, _ in tree_flatten(model.leaf_modules(), is_leaf=is_module)]
    rewritten = 0
    for path in paths:
        layer = _module_at(model, path)
        if type(layer) is nn.Linear and layer.weight.dtype == mx.float32:
            new: nn.Module = CpuLinear(layer)
        elif type(layer) is nn.Embedding and tied and layer.weight.dtype == mx.float32:
            new = CpuTiedEmbedding(layer)
        elif type(layer) is nn.RoPE:
            new = CpuRoPE(layer)
        elif type(layer) is nn.RMSNorm:
            new = CpuRMSNorm(layer)
        else:
            continue
        del layer
        # One layer at a time, so the old and new copies of all the weights never coexist.
        mx.eval(new.parameters())
        model.update_modules(tree_unflatten([(path, new)]))
        rewritten += 1
    mx.clear_cache()
    if rewritten:
        log.info("cpu tuning applied", layers=rewritten,
                 attention="native kernel" if cache_attention is not None else "mlx + numpy")
    return rewritten


def _module_at(model: nn.Module, path: str) -> Any:
    node: Any = model
    for key in path.split("."):
        node = node[int(key)] if isinstance(node, list) else node[key]
    return node
