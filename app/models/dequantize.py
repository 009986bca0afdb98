"""Serve a quantized MLX model from a float32 copy on MLX's CPU backend.

On Linux MLX computes on the CPU, where its quantized matmul kernels prefill about ten times
slower than float32 weights multiplied by the system BLAS (OpenBLAS): a coding agent's
5,000-token prompt takes minutes instead of seconds. So a quantized model is dequantized once
into the cache and the copy is served (at its real, larger size in the memory budget). On a
Mac MLX runs on the GPU, where the quantized kernels are the fast ones; nothing changes there.

The copy records what it was made from (each source file's name, size, mtime and a hash of its
first and last MiB); a source that changed since gets a fresh copy. Uses MLX: call
`ensure_dequantized` on the thread that owns MLX.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
from pathlib import Path
from typing import Any

import structlog

from app.models.gguf.convert import file_lock
from app.models.stamp import file_stamp
from app.models.variants import make_float_variant

log = structlog.get_logger(__name__)

SOURCE_FILE = "dequantized_from.json"
VERSION = 1  # bump when the copy's layout changes: older copies are remade


def is_quantized(folder: Path) -> bool:
    """An MLX folder whose config.json declares a quantization."""
    try:
        config = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and isinstance(config.get("quantization"), dict)


def _safetensors_header(path: Path) -> dict[str, Any]:
    with path.open("rb") as handle:
        (size,) = struct.unpack("<Q", handle.read(8))
        header: dict[str, Any] = json.loads(handle.read(size))
    header.pop("__metadata__", None)
    return header


def float32_bytes(folder: Path) -> int:
    """Bytes the weights of MLX folder `folder` take once dequantized to float32, read from the
    safetensors headers (no tensor is loaded). A quantized weight holds its scales' rows x
    groups x group size values; its scales and biases go away."""
    tensors: dict[str, list[int]] = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        tensors.update({name: info["shape"] for name, info in _safetensors_header(file).items()})
    total = 0
    for name, shape in tensors.items():
        module, _, kind = name.rpartition(".")
        quantized = f"{module}.scales" in tensors
        if quantized and kind in ("scales", "biases"):
            continue
        if quantized and kind == "weight":
            shape = [*tensors[f"{module}.scales"], _group_size(folder, module)]
        elements = 1
        for dim in shape:
            elements *= dim
        total += elements * 4
    return total


def _group_size(folder: Path, module: str) -> int:
    """Columns per scale of `module`: its own entry in the config's quantization, else the
    default (mlx-lm writes per-module overrides under the module's path)."""
    config = json.loads((Path(folder) / "config.json").read_text())
    quantization = config.get("quantization") or {}
    own = quantization.get(module)
    size = own.get("group_size") if isinstance(own, dict) else None
    return int(size or quantization.get("group_size") or 64)


def source_identity(src: Path) -> dict[str, Any]:
    """What a copy of `src` must match: every weight file's stamp and the config's bytes."""
    files = {p.name: file_stamp(p) for p in sorted(Path(src).glob("*.safetensors"))}
    config = hashlib.sha256((Path(src) / "config.json").read_bytes()).hexdigest()
    return {"version": VERSION, "config_sha256": config, "files": files}


def is_copy_of(dst: Path, src: Path) -> bool:
    try:
        recorded = json.loads((Path(dst) / SOURCE_FILE).read_text())
    except (OSError, ValueError):
        return False
    return bool(recorded == source_identity(src))


def copy_dir(cache_dir: Path, src: Path) -> Path:
    """Where the float32 copy of `src` lives: one per source folder."""
    key = hashlib.sha256(str(Path(src).resolve()).encode()).hexdigest()[:12]
    return Path(cache_dir) / "dequantized" / f"{Path(src).name}-{key}"


def ensure_dequantized(src: Path, cache_dir: Path) -> Path:
    """The float32 copy of the quantized MLX folder `src`, made now unless a copy of this very
    source is already in the cache. Processes take turns (a file lock)."""
    src = Path(src)
    dst = copy_dir(cache_dir, src)
    if is_copy_of(dst, src):
        return dst
    dst.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(dst.parent / f".{dst.name}.lock"):
        if is_copy_of(dst, src):  # another process made it while we waited
            return dst
        if dst.exists():
            log.info("dequantized copy is stale; remaking it", src=str(src), dst=str(dst))
            shutil.rmtree(dst)
        identity = source_identity(src)  # before reading: a change during the copy is caught
        make_float_variant(src, dst, "float32")
        (dst / SOURCE_FILE).write_text(json.dumps(identity, indent=2) + "\n")
    return dst
