"""Float copies of a (possibly quantized) MLX model folder.

The CPU backend serves a quantized model from a float32 copy (`app.models.dequantize`), and
tests and benchmarks need several distinct real models of different sizes: the 4-bit demo
model plus float16 and float32 copies of it. Uses MLX, so call it from the thread that owns MLX
(a CLI command, a test fixture, or the engine thread), never from the event loop.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any, Literal

import structlog

log = structlog.get_logger(__name__)

FloatDtype = Literal["float16", "float32"]

# Written fresh for the copy; everything else in the source folder (tokenizer, chat template,
# generation config) is copied as is.
_REWRITTEN = ("config.json", "model.safetensors.index.json")


def make_float_variant(src: Path, dst: Path, dtype: FloatDtype, *,
                       exist_ok: bool = False) -> Path:
    """Write a dequantized `dtype` copy of the MLX folder `src` to `dst` and return `dst`.

    The copy is built in a sibling temporary folder and renamed into place, so `dst` is
    either absent or complete. With `exist_ok`, an existing `dst` is returned untouched.
    """
    import mlx.core as mx
    from mlx.utils import tree_map_with_path
    from mlx_lm.utils import dequantize_model, load_model, save_config, save_model

    if dtype not in ("float16", "float32"):
        raise ValueError(f"dtype must be float16 or float32, got {dtype!r}")
    if dst.exists():
        if exist_ok and (dst / "config.json").is_file():
            return dst
        raise FileExistsError(f"{dst} already exists")
    if not (src / "config.json").is_file():
        raise FileNotFoundError(f"{src} is not an MLX model folder (no config.json)")

    started = time.monotonic()
    log.info("float variant started", src=str(src), dst=str(dst), dtype=dtype)
    model, config = load_model(src, lazy=True)
    config = dict(config)
    config.pop("quantization", None)
    config.pop("quantization_config", None)
    config["torch_dtype"] = dtype  # the KV estimate and loaders read the dtype from here
    model = dequantize_model(model)

    target = getattr(mx, dtype)
    cast_predicate = getattr(model, "cast_predicate", lambda _path: True)

    def cast(path: str, value: Any) -> Any:
        if cast_predicate(path) and mx.issubdtype(value.dtype, mx.floating):
            return value.astype(target)
        return value

    model.update(tree_map_with_path(cast, model.parameters()))
    mx.eval(model.parameters())

    partial = dst.with_name(f".{dst.name}.partial-{os.getpid()}")
    if partial.exists():
        shutil.rmtree(partial)
    try:
        save_model(partial, model)
        save_config(config, config_path=partial / "config.json")
        _copy_side_files(src, partial)
        partial.rename(dst)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    log.info("float variant finished", dst=str(dst), dtype=dtype,
             seconds=round(time.monotonic() - started, 3))
    return dst


def _copy_side_files(src: Path, dst: Path) -> None:
    for item in sorted(src.iterdir()):
        if item.name in _REWRITTEN or item.suffix == ".safetensors" or item.name.startswith("."):
            continue
        if item.is_file():  # follows Hugging Face cache symlinks to real bytes
            shutil.copy2(item, dst / item.name)


def make_layer_skip_variant(src: Path, dst: Path, keep: list[int], *,
                            exist_ok: bool = False) -> Path:
    """Write a copy of the float MLX folder `src` with only the decoder layers `keep` (in
    order; embeddings, final norm and head kept) to `dst` and return `dst`.

    A shallow model with the same tokenizer and mostly the same predictions: what a
    self-speculative draft model is (and the only draft model a test or a benchmark can make
    from the one demo model). Renamed into place like `make_float_variant`.
    """
    import json
    import re

    import mlx.core as mx

    if dst.exists():
        if exist_ok and (dst / "config.json").is_file():
            return dst
        raise FileExistsError(f"{dst} already exists")
    config = json.loads((src / "config.json").read_text())
    if "quantization" in config:
        raise ValueError(f"{src} is quantized: make a float variant of it first")
    layers = int(config["num_hidden_layers"])
    if not keep or any(not 0 <= i < layers for i in keep) or len(set(keep)) != len(keep):
        raise ValueError(f"keep must name distinct layers in 0..{layers - 1}, got {keep}")
    renumber = {old: new for new, old in enumerate(keep)}
    weights: dict[str, mx.array] = {}
    for file in sorted(src.glob("*.safetensors")):
        for name, value in mx.load(str(file)).items():  # type: ignore[union-attr]
            match = re.match(r"(.*\.layers\.)(\d+)(\..*)", name)
            if match is None:
                weights[name] = value
            elif int(match.group(2)) in renumber:
                weights[f"{match.group(1)}{renumber[int(match.group(2))]}{match.group(3)}"] = \
                    value
    config["num_hidden_layers"] = len(keep)
    partial = dst.with_name(f".{dst.name}.partial-{os.getpid()}")
    if partial.exists():
        shutil.rmtree(partial)
    try:
        partial.mkdir(parents=True)
        mx.save_safetensors(str(partial / "model.safetensors"), weights,
                            metadata={"format": "mlx"})
        (partial / "config.json").write_text(json.dumps(config, indent=2))
        _copy_side_files(src, partial)
        partial.rename(dst)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return dst
