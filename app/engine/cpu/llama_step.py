"""One decode step of a CPU-tuned llama-family model, built from fewer graph nodes.

On MLX's CPU backend every graph node costs a few microseconds twice: on the thread that builds
and dispatches the graph, and on the compute thread that runs it. mlx-lm's llama forward, with
the layers of `cpu_tuning`, is about 3,650 nodes per decode step for a 30-layer model; at 10
sequences that overhead rivals the arithmetic. This forward computes the same thing for a decode
step (one new token per sequence) from about 1,660 nodes, and the engine thread's CPU time per
step drops from about 35 ms to 20 ms:

- the hidden state stays one (rows, features) matrix, padded once to a multiple of 16 rows (the
  row count OpenBLAS is fastest at), instead of every projection padding, reshaping and slicing
  its own input; padded rows are zero and stay zero through every layer;
- RoPE's cos/sin for this step's positions are computed once, not in each of the 2 x 30 calls,
  and applied as `x * cos + swapped(x) * sin`, bit for bit what RoPE computes; the attention
  scale rides on the queries' cos/sin when it is a power of two (exact);
- queries are laid out grouped by key/value head from the start, the padding mask is turned
  into an additive one once per step, and each half of the batch attends on its own CPU stream
  (as `cpu_tuning.decode_attention` does).

`many` is the same step for L > 1 new tokens a row (speculative decoding's verify forward):
causal within the new tokens on top of the padding mask, positions offset..offset+L-1. mlx-lm's
forward for it (through the tuned layers) costs about twice a single-token step on this CPU;
this one about 1.x (see bench/RESULTS.md, "verify step").

A `Rider` is a prefill chunk computed in the same pass as a decode or verify step: its rows
join the hidden state after the step's own, share every projection and MLP product (one read
of the weights for both, which is what a small step costs), and attend over their own cache.
Where the native kernel is built every part attends in it (`tuning.kernel_takes`). Without it,
several new tokens a row deep in context (a rider at depth; several rows verifying) attend in
NumPy, whose vectorised softmax beats MLX's scalar CPU `exp` (`tuning.numpy_attention_pays`).

Everything else is the model's own: its weights, its norms' functions, its KV cache objects.
Prefill and anything this class does not know go through the model's own `__call__`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import llama
from mlx_lm.models.activations import swiglu
from mlx_lm.models.cache import BatchKVCache

from app.engine.cpu.tuning import (
    ROW_BLOCK,
    CpuLinear,
    CpuRMSNorm,
    CpuRoPE,
    CpuTiedEmbedding,
    attend_grouped,
    attend_in_kernel,
    attend_in_numpy,
    batch_parts,
    kernel_takes,
    numpy_attention_pays,
    numpy_mask,
    on_two_streams,
)

# A multi-token step pads its rows to a multiple of 16 only from this many rows on. One row's
# L = 2..8 verify step is cheaper unpadded: on the shared 2-core box (load ~12, alternating,
# bench.verify_step) 2 tokens cost 1.06 plain steps unpadded vs 2.05 padded to 16, 4 tokens
# 1.38 vs 2.05, 8 tokens about the same; the 16-row blocking pays from about 10 rows
# (cpu/tuning.py's note).
MANY_PAD_MIN_ROWS = 9


def _rotate(x: mx.array, cos: mx.array, sin: mx.array, traditional: bool) -> mx.array:
    """RoPE with precomputed factors: `sin` carries the sign of each pair's first element."""
    if traditional:  # pairs are neighbours: (x0, x1) -> (x1, x0)
        swapped = x.reshape(*x.shape[:-1], -1, 2)[..., ::-1].reshape(x.shape)
    else:  # pairs are half a head apart
        half = x.shape[-1] // 2
        swapped = mx.concatenate([x[..., half:], x[..., :half]], axis=-1)
    return x * cos + swapped * sin


_rotate_compiled = mx.compile(_rotate, shapeless=False)


@dataclass
class _StepPlan:
    """What every layer of one decode step shares."""

    batch: int
    cos: mx.array  # (batch, 1, 1, head_dim), for the keys
    sin: mx.array
    query_cos: mx.array  # the same with the attention scale folded in, for the queries
    query_sin: mx.array
    query_scale: float  # 1.0 when the scale is folded into query_cos/query_sin
    masks: dict[int, mx.array | None]  # additive, by the first row of each `batch_parts`
    length: int = 1  # new tokens a row
    # Several new tokens a row deep in context attend in NumPy (`numpy_attention_pays`), with
    # this mask (`numpy_mask`; None: nothing hidden) instead of `masks`.
    in_numpy: bool = False
    hidden: Any = None
    # Attention in the native kernel (`tuning.attend_in_kernel`), with the cache's own mask.
    in_kernel: bool = False
    kernel_mask: mx.array | None = None


@dataclass
class Rider:
    """A prefill chunk to compute inside the next decode forward of its model."""

    tokens: mx.array  # (rows, L) prompt tokens, every row the same length
    caches: list[Any]  # the prompt batch's per-layer caches (BatchKVCache)
    taken: bool = False  # a forward computed it: the prompt batch must not compute it again


class RiderSlot:
    """Where a model's scheduler leaves a `Rider` for the next decode forward of that model
    (every `LlamaDecodeStep` of the model holds the same slot; the first forward takes it)."""

    def __init__(self) -> None:
        self.rider: Rider | None = None

    def take(self) -> Rider | None:
        rider = self.rider
        if rider is None or rider.taken:
            return None
        rider.taken = True
        return rider


class LlamaDecodeStep:
    """`logits = step(tokens, caches)` for mlx-lm's llama Model after `tune_for_cpu`."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        inner = model.model
        self.layers = inner.layers
        attention = self.layers[0].self_attn
        self.heads, self.kv_heads = attention.n_heads, attention.n_kv_heads
        self.group = self.heads // self.kv_heads  # query heads per key/value head
        self.head_dim = attention.head_dim
        self.scale = attention.scale
        self.rope: CpuRoPE = attention.rope
        tied = "lm_head" not in model
        self.output_t: mx.array = (inner.embed_tokens if tied else model.lm_head).weight_t
        self.riders: RiderSlot | None = None  # prefill chunks to compute with a decode step

    @staticmethod
    def supports(model: nn.Module) -> bool:
        """Plain llama layers, all rewritten by `tune_for_cpu` (float32, CPU)."""
        if type(model) is not llama.Model:
            return False
        inner = model.model
        tied = "lm_head" not in model
        output_ok = (type(inner.embed_tokens) is CpuTiedEmbedding if tied
                     else type(model.lm_head) is CpuLinear and "bias" not in model.lm_head)
        if not output_ok or type(inner.norm) is not CpuRMSNorm:
            return False
        for layer in inner.layers:
            attention, mlp = layer.self_attn, layer.mlp
            linears = [attention.q_proj, attention.k_proj, attention.v_proj, attention.o_proj,
                       mlp.gate_proj, mlp.up_proj, mlp.down_proj]
            if (layer.use_sliding or type(attention.rope) is not CpuRoPE
                    or attention.rope.dims != attention.head_dim
                    or type(layer.input_layernorm) is not CpuRMSNorm
                    or type(layer.post_attention_layernorm) is not CpuRMSNorm
                    or any(type(m) is not CpuLinear or "bias" in m for m in linears)):
                return False
        return True

    def __call__(self, tokens: mx.array, caches: list[Any]) -> mx.array:
        if not tuned_step_reads(caches):
            logits: mx.array = self.model(tokens[:, None], cache=caches)[:, -1, :]
            return logits
        return self._forward(tokens[:, None], caches, pad_from=2)[:, 0]

    def many(self, tokens: mx.array, caches: list[Any]) -> mx.array:
        """Logits (batch, L, vocabulary) for L new tokens a row (batch, L), as the model's own
        `model(tokens, cache=caches)` computes them; the caches advance by L."""
        if tokens.shape[1] == 1:
            return self(tokens[:, 0], caches)[:, None, :]
        if not tuned_step_reads(caches):
            logits: mx.array = self.model(tokens, cache=caches)
            return logits
        return self._forward(tokens, caches, pad_from=MANY_PAD_MIN_ROWS)

    def _forward(self, tokens: mx.array, caches: list[Any], pad_from: int) -> mx.array:
        """Logits (batch, L, vocabulary) for `tokens` (batch, L); a waiting rider's chunk is
        computed in the same pass (its rows after these, no logits of its own)."""
        batch, length = tokens.shape
        count = batch * length  # hidden rows of these tokens: row b * length + j
        # One row's verify step stays in MLX: there NumPy's evaluation per layer cost more than
        # it saved (13 tokens at 650-1,000 of context: 256-271 ms a step against 196-222);
        # several rows' (8 rows, 8-13 tokens at 650-1,100: 597-837 ms against 773-1,158) and a
        # prefill chunk's beside decoding rows (4 tokens at 3,800: ~270 against ~330) gain.
        parts = [(self._plan(batch, caches[0], length, numpy_ok=batch > 1), caches)]
        ids = tokens.reshape(count)
        rider = self.riders.take() if self.riders is not None else None
        if rider is not None:
            prompts, chunk = rider.tokens.shape
            parts.append((self._plan(prompts, rider.caches[0], chunk), rider.caches))
            ids = mx.concatenate([ids, rider.tokens.reshape(prompts * chunk)])
        total = ids.shape[0]
        rows = _padded(total, pad_from)
        inner = self.model.model
        hidden = inner.embed_tokens(ids)  # (total, features)
        if rows != total:
            hidden = mx.pad(hidden, [(0, rows - total), (0, 0)])
        for index, layer in enumerate(self.layers):
            hidden = self._layer(layer, hidden, [(plan, cache[index]) for plan, cache in parts])
        if rider is not None:  # logits for these tokens only, still in whole row blocks
            hidden = hidden[:_padded(count, pad_from)]
        out: mx.array = (inner.norm(hidden) @ self.output_t)[:count]
        return out.reshape(batch, length, -1)

    def _plan(self, batch: int, cache: Any, length: int = 1, *, numpy_ok: bool = True
              ) -> _StepPlan:
        # Every layer's cache holds the same positions and padding: they are filled, extended
        # and filtered together.
        cos, sin = self._rotation(cache.offset, length)
        query_cos, query_sin, query_scale = cos, sin, self.scale
        if math.log2(self.scale).is_integer():  # a power of two: folding it in is exact
            query_cos, query_sin, query_scale = cos * self.scale, sin * self.scale, 1.0
        # What the model makes for `length` new tokens a sequence: (batch or 1, 1, length,
        # context), causal within the new tokens, padding hidden.
        mask = cache.make_mask(length)
        if kernel_takes(mask, batch, length):
            return _StepPlan(batch, cos, sin, query_cos, query_sin, query_scale, {}, length,
                             in_kernel=True, kernel_mask=mask)
        if numpy_ok and mask is not None and numpy_attention_pays(length, mask.shape[-1]):
            hidden = numpy_mask(mask, length, mask.shape[-1])
            if hidden is not False:
                return _StepPlan(batch, cos, sin, query_cos, query_sin, query_scale, {}, length,
                                 in_numpy=True, hidden=hidden)
        masks: dict[int, mx.array | None] = {}
        for part in batch_parts(batch):
            if mask is None:
                masks[part.start] = None
                continue
            rows = mask[part] if mask.shape[0] == batch else mask
            additive = mx.where(rows, mx.array(0.0), mx.array(-mx.inf))
            context, count = additive.shape[-1], part.stop - part.start
            if length == 1:
                masks[part.start] = mx.broadcast_to(
                    additive, (count, self.kv_heads, self.group, context))
                continue
            # Laid out like the scores of `_layer_many`: (rows, kv_heads, length * group, ctx).
            additive = additive.reshape(-1, 1, length, 1, context)
            masks[part.start] = mx.broadcast_to(
                additive, (count, self.kv_heads, length, self.group, context)).reshape(
                count, self.kv_heads, length * self.group, context)
        return _StepPlan(batch, cos, sin, query_cos, query_sin, query_scale, masks, length)

    def _layer(self, layer: Any, hidden: mx.array, parts: list[tuple[_StepPlan, Any]]
               ) -> mx.array:
        """One layer for the hidden rows of every part (a plan and that part's cache of this
        layer), in order: the projections and MLP over all rows at once, attention per part."""
        attention = layer.self_attn
        normed = layer.input_layernorm(hidden)
        queries = normed @ attention.q_proj.weight_t
        keys = normed @ attention.k_proj.weight_t
        values = normed @ attention.v_proj.weight_t
        attended, start = [], 0
        for plan, cache in parts:
            rows = slice(start, start + plan.batch * plan.length)
            attend = self._attend_one if plan.length == 1 else self._attend_many
            attended.append(attend(queries[rows], keys[rows], values[rows], plan, cache))
            start = rows.stop
        return _project_and_mlp(
            layer, hidden, attended[0] if len(attended) == 1 else mx.concatenate(attended))

    def _attend_one(self, queries: mx.array, keys: mx.array, values: mx.array,
                    plan: _StepPlan, cache: Any) -> mx.array:
        """Attention for one new token a row: (batch, heads * head_dim)."""
        batch, traditional = plan.batch, self.rope.traditional
        queries = queries.reshape(batch, self.kv_heads, self.group, self.head_dim)
        queries = _rotate_compiled(queries, plan.query_cos, plan.query_sin, traditional)
        if plan.query_scale != 1.0:
            queries = queries * plan.query_scale
        keys = keys.reshape(batch, self.kv_heads, 1, self.head_dim)
        keys = _rotate_compiled(keys, plan.cos, plan.sin, traditional)
        values = values.reshape(batch, self.kv_heads, 1, self.head_dim)
        keys, values = cache.update_and_fetch(keys, values)
        if plan.in_kernel:
            attended = self._attend_in_kernel(
                queries.reshape(batch, self.heads, 1, self.head_dim), keys, values, plan)
        else:
            attended = self._attend(queries, keys, values, plan)
        return attended.reshape(batch, self.heads * self.head_dim)

    def _attend_many(self, queries: mx.array, keys: mx.array, values: mx.array,
                     plan: _StepPlan, cache: Any) -> mx.array:
        """`_attend_one` for `plan.length` tokens a row: rows are (batch * length) tokens."""
        batch, length, traditional = plan.batch, plan.length, self.rope.traditional
        count = batch * length
        kv_heads, group, head_dim = self.kv_heads, self.group, self.head_dim
        queries = queries.reshape(batch, length, kv_heads, group, head_dim)
        queries = _rotate_compiled(queries, plan.query_cos, plan.query_sin, traditional)
        keys = keys.reshape(batch, length, kv_heads, 1, head_dim)
        keys = _rotate_compiled(keys, plan.cos, plan.sin, traditional)
        keys = keys.reshape(batch, length, kv_heads, head_dim).transpose(0, 2, 1, 3)
        values = values.reshape(batch, length, kv_heads, head_dim).transpose(0, 2, 1, 3)
        keys, values = cache.update_and_fetch(keys, values)
        if plan.in_kernel:  # read as (b, heads, L, d) where they lie
            queries = queries.reshape(batch, length, self.heads, head_dim).transpose(0, 2, 1, 3)
            attended = self._attend_in_kernel(queries, keys, values, plan)
            return attended.transpose(0, 2, 1, 3).reshape(count, self.heads * head_dim)
        if plan.in_numpy:  # the model's head order: (b, heads, L, d)
            queries = queries.reshape(batch, length, self.heads, head_dim).transpose(0, 2, 1, 3)
            attended = attend_in_numpy(queries, keys, values, plan.query_scale, plan.hidden)
            return attended.transpose(0, 2, 1, 3).reshape(count, self.heads * head_dim)
        if plan.query_scale != 1.0:
            queries = queries * plan.query_scale
        # Grouped by key/value head, each head's queries token by token: (b, kv, L * g, d).
        queries = queries.transpose(0, 2, 1, 3, 4).reshape(batch, kv_heads, -1, head_dim)
        attended = self._attend(queries, keys, values, plan)  # (b, kv, L * g, d)
        attended = attended.reshape(batch, kv_heads, length, group, head_dim)
        return attended.transpose(0, 2, 1, 3, 4).reshape(count, self.heads * head_dim)

    @staticmethod
    def _attend_in_kernel(queries: mx.array, keys: mx.array, values: mx.array,
                          plan: _StepPlan) -> mx.array:
        attended = attend_in_kernel(queries, keys, values, plan.query_scale, plan.kernel_mask)
        if attended is None:  # `kernel_takes` said it would take this step's mask
            raise RuntimeError("the native attention kernel refused a step it was planned for")
        return attended

    @staticmethod
    def _attend(queries: mx.array, keys: mx.array, values: mx.array,
                plan: _StepPlan) -> mx.array:
        """Grouped single-query attention, each half of the batch on its own stream."""
        def part(rows: slice) -> mx.array:
            whole = rows.stop - rows.start == plan.batch
            q, k, v = ((queries, keys, values) if whole
                       else (queries[rows], keys[rows], values[rows]))
            return attend_grouped(q, k, v, plan.masks[rows.start])

        return on_two_streams(plan.batch, part)

    def _rotation(self, offsets: mx.array, length: int = 1) -> tuple[mx.array, mx.array]:
        """cos and signed sin for each sequence's position, shaped (batch, 1, 1, head_dim);
        for `length` > 1 positions offset..offset+length-1, shaped (batch, length, 1, 1,
        head_dim).

        They come from the model's own RoPE applied to unit vectors, so they are exactly the
        values RoPE multiplies by."""
        dims, half = self.head_dim, self.head_dim // 2
        if self.rope.traditional:  # (1, 0, 1, 0, ...) rotates to (c0, s0, c1, s1, ...)
            unit = mx.tile(mx.array([1.0, 0.0]), half)
        else:  # (1, .., 1, 0, .., 0) rotates to (c0, .., c_h, s0, .., s_h)
            unit = mx.concatenate([mx.ones(half), mx.zeros(half)])
        batch = offsets.shape[0] if offsets.ndim else 1
        rotated = self.rope(mx.broadcast_to(unit, (batch, 1, length, dims)), offsets)
        if self.rope.traditional:
            pairs = rotated.reshape(batch, 1, length, half, 2)
            c, s = pairs[..., 0:1], pairs[..., 1:2]
            cos = mx.concatenate([c, c], axis=-1).reshape(batch, 1, length, dims)
            sin = mx.concatenate([-s, s], axis=-1).reshape(batch, 1, length, dims)
        else:
            c, s = rotated[..., :half], rotated[..., half:]
            cos = mx.concatenate([c, c], axis=-1)
            sin = mx.concatenate([-s, s], axis=-1)
        if length > 1:  # (batch, 1, length, d) -> (batch, length, 1, 1, d): a token's heads
            cos = cos.reshape(batch, length, 1, 1, dims)
            sin = sin.reshape(batch, length, 1, 1, dims)
        return cos, sin


def tuned_step_reads(caches: list[Any]) -> bool:
    """Whether the tuned step can use these per-layer caches (mlx-lm's BatchKVCache)."""
    return all(type(cache) is BatchKVCache for cache in caches)


def _padded(rows: int, pad_from: int) -> int:
    """`rows` rounded up to whole ROW_BLOCKs, from `pad_from` rows on."""
    return rows + (-rows % ROW_BLOCK if rows >= pad_from else 0)


def _project_and_mlp(layer: Any, hidden: mx.array, attended: mx.array) -> mx.array:
    """The rest of a layer after attention: output projection, residual, norm and MLP.
    `attended` has the real token rows; `hidden` may carry zero rows of padding below them."""
    if hidden.shape[0] != attended.shape[0]:
        attended = mx.pad(attended, [(0, hidden.shape[0] - attended.shape[0]), (0, 0)])
    mlp = layer.mlp
    hidden = hidden + attended @ layer.self_attn.o_proj.weight_t
    normed = layer.post_attention_layernorm(hidden)
    gated = swiglu(normed @ mlp.gate_proj.weight_t, normed @ mlp.up_proj.weight_t)
    out: mx.array = hidden + gated @ mlp.down_proj.weight_t
    return out
