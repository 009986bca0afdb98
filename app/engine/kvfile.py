"""One prefix's KV in one file: the safetensors layout, written without MLX, read by `mx.load`.

Why not mlx-lm's `save_prompt_cache`: it writes through MLX, and MLX belongs to the engine
thread, where writing a 4,000-token prefix of the demo model (184 MB) stalls every decoding
stream for ~0.3 s. Here the engine thread only builds the header and takes zero-copy views of
arrays that are already evaluated and never written again; a writer thread streams them to
disk and digests them on the way. The file is plain safetensors (any safetensors reader can
open it), and `read` checks it against that digest before anything is served.

Layout: tensors `tokens` (int32, the prefix's token ids) and `<layer>.keys` / `<layer>.values`
(1 x heads x n x dim each), laid out in that order without gaps; metadata names the format.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import mlx.core as mx
from mlx_lm.models.cache import KVCache

FORMAT = "mlxgw-prefix-kv/1"
_DTYPES = {mx.float32: "F32", mx.float16: "F16", mx.bfloat16: "BF16", mx.int32: "I32"}


class KVFileError(Exception):
    """The file is not a sound prefix-KV file (truncated, corrupted, another format)."""


@dataclass
class Blob:
    """A prefix's KV ready to be written off the engine thread."""

    header: bytes  # the 8-byte length and the JSON header, padded
    views: list[memoryview]  # the tensors' bytes, in file order
    keep: list[Any]  # the arrays the views point into: alive until written

    @property
    def size(self) -> int:
        return len(self.header) + sum(view.nbytes for view in self.views)


def supported(layers: list[Any]) -> bool:
    """Plain KV caches only: rotating windows and recurrent state are not prefix-shaped."""
    return bool(layers) and all(
        type(layer) is KVCache and layer.keys is not None and layer.keys.dtype in _DTYPES
        for layer in layers)


def encode(tokens: list[int], layers: list[Any]) -> Blob:
    """On the engine thread: the header and views for `layers` (evaluated, exactly
    len(tokens) positions long, as the prefix cache keeps them)."""
    ids = mx.array(tokens, dtype=mx.int32)
    arrays: list[tuple[str, Any]] = [("tokens", ids)]
    for index, layer in enumerate(layers):
        arrays += [(f"{index}.keys", layer.keys), (f"{index}.values", layer.values)]
    mx.eval([array for _, array in arrays])
    # The prefix cache's arrays are its own contiguous copies; anything else is made so.
    arrays = [(name, array if memoryview(array).c_contiguous else mx.contiguous(array))
              for name, array in arrays]
    mx.eval([array for _, array in arrays])
    header: dict[str, Any] = {"__metadata__": {"format": FORMAT, "layers": str(len(layers)),
                                               "tokens": str(len(tokens))}}
    views, offset = [], 0
    for name, array in arrays:
        view = memoryview(array)
        header[name] = {"dtype": _DTYPES[array.dtype], "shape": list(array.shape),
                        "data_offsets": [offset, offset + view.nbytes]}
        offset += view.nbytes
        views.append(view)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # safetensors pads the header to 8 bytes
    return Blob(len(text).to_bytes(8, "little") + text, views,
                [array for _, array in arrays])


def write(blob: Blob, path: Path) -> str:
    """Any thread: write `blob` to `path` (via a temporary name); the file's sha256."""
    digest = hashlib.sha256(blob.header)
    temporary = path.with_suffix(".tmp")
    try:
        with temporary.open("wb") as handle:
            handle.write(blob.header)
            for view in blob.views:
                handle.write(view)
                digest.update(view)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return digest.hexdigest()


def _read_header(handle: BinaryIO, size: int) -> tuple[bytes, dict[str, Any]]:
    raw = handle.read(8)
    if len(raw) < 8:
        raise KVFileError("shorter than a header")
    length = int.from_bytes(raw, "little")
    if length > min(size - 8, 100_000_000):
        raise KVFileError("header length past the end of the file")
    text = handle.read(length)
    try:
        header = json.loads(text)
    except ValueError as error:
        raise KVFileError(f"unreadable header: {error}") from None
    if not isinstance(header, dict) or header.get("__metadata__", {}).get("format") != FORMAT:
        raise KVFileError("not a prefix-KV file")
    return raw + text, header


def read(path: Path, *, size: int, digest: str) -> tuple[list[int], list[Any]]:
    """On the engine thread: the tokens and per-layer KV caches of the file at `path`.

    Raises KVFileError unless the file has exactly `size` bytes, is laid out as `write` lays
    it out, and its bytes (header and every tensor, as loaded) hash to `digest`."""
    actual = path.stat().st_size
    if actual != size:
        raise KVFileError(f"{actual} bytes, expected {size} (truncated or replaced)")
    with path.open("rb") as handle:
        header_bytes, header = _read_header(handle, size)
    try:
        names = sorted((k for k in header if k != "__metadata__"),
                       key=lambda k: int(header[k]["data_offsets"][0]))
        expected_end = 0
        for name in names:
            start, end = header[name]["data_offsets"]
            if start != expected_end:
                raise KVFileError("tensors are not laid out back to back")
            expected_end = end
    except (KeyError, TypeError, ValueError, IndexError) as error:  # parses, yet is not ours
        raise KVFileError(f"malformed header: {error!r}") from None
    if len(header_bytes) + expected_end != size:
        raise KVFileError("the tensors do not fill the file")
    try:
        arrays: dict[str, Any] = mx.load(str(path), format="safetensors")  # type: ignore[assignment]
    except Exception as error:
        raise KVFileError(f"unreadable tensors: {error}") from None
    check = hashlib.sha256(header_bytes)
    try:
        for name in names:  # hashed as loaded: what is verified is what is served
            check.update(memoryview(arrays[name]))
    except (KeyError, ValueError, RuntimeError) as error:
        raise KVFileError(f"unreadable tensors: {error}") from None
    if check.hexdigest() != digest:
        raise KVFileError("content digest mismatch (corrupted)")
    return _layers(header, arrays)


def _layers(header: dict[str, Any], arrays: dict[str, Any]) -> tuple[list[int], list[Any]]:
    try:
        tokens: list[int] = arrays["tokens"].tolist()
        count = int(header["__metadata__"]["layers"])
        layers: list[Any] = []
        for index in range(count):
            layer = KVCache()
            layer.keys, layer.values = arrays[f"{index}.keys"], arrays[f"{index}.values"]
            if layer.keys.shape[2] != len(tokens) or layer.values.shape[2] != len(tokens):
                raise KVFileError("a layer's length differs from the tokens'")
            layer.offset = len(tokens)
            layers.append(layer)
    except (KeyError, ValueError, IndexError) as error:
        raise KVFileError(f"inconsistent file: {error!r}") from None
    return tokens, layers
