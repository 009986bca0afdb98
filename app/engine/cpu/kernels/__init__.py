"""Native kernels for MLX's CPU backend, built by `make kernels` (CMakeLists.txt here), which
`make run` and `make test` run.

`cache_attention` is None when the kernel was not built (a Mac, where MLX computes on the GPU,
or a machine without a compiler) or does not work against the installed mlx: callers keep
their MLX and NumPy paths for that case.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import mlx.core as mx
import structlog

log = structlog.get_logger(__name__)

CacheAttention = Callable[..., mx.array]


def _load() -> CacheAttention | None:
    try:
        module: Any = importlib.import_module("app.engine.cpu.kernels._cache_attention")
    except ImportError:
        return None
    kernel: CacheAttention = module.cache_attention
    try:  # built against another mlx, the call fails or disagrees: use the other paths
        queries = mx.random.normal((1, 4, 2, 8), key=mx.random.key(0))
        keys = mx.random.normal((1, 2, 5, 8), key=mx.random.key(1))
        values = mx.random.normal((1, 2, 5, 8), key=mx.random.key(2))
        with mx.stream(mx.cpu):
            ours = kernel(queries, keys, values, scale=0.5, causal=True)
            theirs = mx.fast.scaled_dot_product_attention(queries, keys, values, scale=0.5,
                                                          mask="causal")
            agrees = mx.allclose(ours, theirs, atol=1e-5).item()
    except Exception as error:  # any failure means "not usable"
        log.warning("cpu attention kernel unusable", error=str(error))
        return None
    if not agrees:
        log.warning("cpu attention kernel disagrees with mlx: not used")
        return None
    return kernel


cache_attention = _load()
