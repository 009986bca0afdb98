"""GGUF files -> MLX model folders that `mlx_lm.load` reads.

Two halves. `read_gguf_header` is pure Python: it parses the header (metadata
and tensor table, never the tensor data) so a file can be refused or sized
before any MLX work. `convert_gguf` then lets `mx.load` decode the tensors
(it unpacks F32/F16/Q4_0/Q4_1/Q8_0 into MLX affine-quantized triples with
group size 32), renames them to the mlx_lm llama layout, and writes
config.json, model.safetensors and a Hugging Face tokenizer built from the
vocabulary stored in the file.
"""

from __future__ import annotations

import fcntl
import io
import json
import os
import shutil
import struct
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import structlog

from app.models.gguf.tokenizer import build_tokenizer_files, check_tokenizer
from app.models.stamp import file_stamp

log = structlog.get_logger(__name__)

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
SUPPORTED_ARCHITECTURES = ("llama",)
# What `mx.load` decodes natively; everything else (K-quants, IQ*, BF16...) is refused.
SUPPORTED_TYPES = ("F32", "F16", "Q4_0", "Q4_1", "Q8_0")
GROUP_SIZE = 32  # every ggml block type mx.load reads has 32 weights per block
SOURCE_FILE = "gguf_source.json"  # in each converted folder: which GGUF it came from
CONVERTER_VERSION = 1  # bump when the output changes so old conversions are redone

# ggml_type ids from ggml.h; unknown ids are reported as "type<N>".
GGML_TYPES: dict[int, str] = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 9: "Q8_1",
    10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K",
    16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S",
    22: "IQ2_S", 23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64",
    29: "IQ1_M", 30: "BF16", 34: "TQ1_0", 35: "TQ2_0", 39: "MXFP4",
}
# Bytes per block of 32 values in the file, for cheap sizing.
_FILE_BYTES_PER_32 = {"F32": 128, "F16": 64, "Q4_0": 18, "Q4_1": 20, "Q8_0": 34}
# Bytes per 32 values once in MLX: packed weights plus one fp16 scale and bias per group.
_MLX_BYTES_PER_32 = {"F32": 128, "F16": 64, "Q4_0": 20, "Q4_1": 20, "Q8_0": 36}

# Per-layer GGUF names -> mlx_lm llama module paths.
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm",
                 "output": "lm_head"}
# mx.load splits a quantized tensor into these parts; `.bias` is a real bias vector.
_SUFFIXES = ("weight", "scales", "biases", "bias")


class UnsupportedModel(ValueError):
    """The file is not a GGUF this converter can turn into a working MLX model."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # row-major (MLX/numpy) order: GGUF's dims reversed
    ggml_type: str

    @property
    def n_elements(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count


@dataclass
class GGUFHeader:
    version: int
    metadata: dict[str, Any] = field(default_factory=dict)
    tensors: list[TensorInfo] = field(default_factory=list)

    @property
    def architecture(self) -> str | None:
        arch = self.metadata.get("general.architecture")
        return arch if isinstance(arch, str) else None

    def file_bytes(self) -> int:
        """Tensor bytes on disk (0 for types we cannot size)."""
        return sum(_sized(t, _FILE_BYTES_PER_32) for t in self.tensors)

    def mlx_bytes(self) -> int:
        """Approximate resident bytes after conversion: what a memory budget should charge."""
        return sum(_sized(t, _MLX_BYTES_PER_32) for t in self.tensors)


def _sized(tensor: TensorInfo, per_32: dict[str, int]) -> int:
    return tensor.n_elements * per_32.get(tensor.ggml_type, 0) // 32


# --------------------------------------------------------------------------- header


class _Reader:
    """Little-endian reads that refuse lengths the file cannot hold (no memory bombs)."""

    def __init__(self, stream: BinaryIO, size: int, path: Path) -> None:
        self._stream = stream
        self._size = size
        self._path = path

    def _take(self, n: int) -> bytes:
        data = self._stream.read(n)
        if len(data) != n:
            raise UnsupportedModel(f"{self._path}: truncated GGUF header")
        return data

    def unpack(self, fmt: str) -> Any:
        return struct.unpack("<" + fmt, self._take(struct.calcsize("<" + fmt)))[0]

    def count(self, what: str, item_bytes: int = 1) -> int:
        n = int(self.unpack("Q"))
        if n * item_bytes > self._size - self._stream.tell():
            raise UnsupportedModel(f"{self._path}: corrupt GGUF header ({what} count {n})")
        return n

    def string(self) -> str:
        return self._take(self.count("string length")).decode("utf-8", errors="replace")

    def array(self, fmt: str, n: int) -> list[Any]:
        return list(struct.unpack(f"<{n}{fmt}", self._take(n * struct.calcsize(fmt))))


# GGUF value type id -> struct format (8 = string and 9 = array handled apart).
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q",
            11: "q", 12: "d"}


def _read_value(reader: _Reader, value_type: int) -> Any:
    if value_type in _SCALARS:
        return reader.unpack(_SCALARS[value_type])
    if value_type == 8:
        return reader.string()
    if value_type == 9:
        item_type = int(reader.unpack("I"))
        if item_type in _SCALARS:
            fmt = _SCALARS[item_type]
            return reader.array(fmt, reader.count("array", struct.calcsize(fmt)))
        # Strings are at least 8 bytes each (their length prefix).
        n = reader.count("array", 8 if item_type == 8 else 1)
        return [_read_value(reader, item_type) for _ in range(n)]
    raise UnsupportedModel(f"unknown GGUF value type {value_type}")


def read_gguf_header(path: Path) -> GGUFHeader:
    """Parse a GGUF header: metadata key/values and the tensor table (no tensor data)."""
    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as raw:
        stream = io.BufferedReader(raw, buffer_size=1 << 20)
        reader = _Reader(stream, size, path)
        if stream.read(4) != GGUF_MAGIC:
            raise UnsupportedModel(f"{path}: not a GGUF file (bad magic)")
        version = int(reader.unpack("I"))
        if version not in SUPPORTED_VERSIONS:
            raise UnsupportedModel(
                f"{path}: GGUF version {version} is not supported (need 2 or 3, little-endian)"
            )
        # A tensor info takes at least 8+4+8+4+8 bytes, a key/value at least 8+4+1.
        n_tensors = reader.count("tensor", 32)
        n_kv = reader.count("key/value", 13)
        header = GGUFHeader(version=version)
        for _ in range(n_kv):
            key = reader.string()
            header.metadata[key] = _read_value(reader, int(reader.unpack("I")))
        ends: list[tuple[int, str]] = []
        for _ in range(n_tensors):
            name = reader.string()
            n_dims = int(reader.unpack("I"))
            if n_dims > 8:
                raise UnsupportedModel(f"{path}: corrupt GGUF header ({name} has {n_dims} dims)")
            dims = reader.array("Q", n_dims)
            type_id = int(reader.unpack("I"))
            offset = int(reader.unpack("Q"))
            info = TensorInfo(name=name, shape=tuple(reversed(dims)),
                              ggml_type=GGML_TYPES.get(type_id, f"type{type_id}"))
            header.tensors.append(info)
            ends.append((offset + _sized(info, _FILE_BYTES_PER_32), name))
        # Data starts at the next alignment boundary; an incomplete download shows
        # up here as a tensor running past the end of the file.
        alignment = int(header.metadata.get("general.alignment", 32)) or 32
        data_start = -(-stream.tell() // alignment) * alignment
        end, name = max(ends, default=(0, ""))
        if data_start + end > size:
            raise UnsupportedModel(
                f"{path}: truncated file ({name} ends past the end; incomplete download?)"
            )
    return header


# --------------------------------------------------------------------------- checks


def check_supported(header: GGUFHeader, path: Path) -> None:
    """Raise UnsupportedModel unless `convert_gguf` can produce a working model."""
    arch = header.architecture
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModel(
            f"{path}: architecture {arch!r} is not supported (supported: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    meta = header.metadata
    sizes = ("llama.embedding_length", "llama.block_count", "llama.feed_forward_length",
             "llama.attention.head_count")
    missing = [k for k in (*sizes, "tokenizer.ggml.tokens") if k not in meta]
    if missing:
        raise UnsupportedModel(f"{path}: GGUF metadata lacks {', '.join(missing)}")
    if not all(isinstance(meta[k], int) and meta[k] > 0 for k in sizes):
        if isinstance(meta[sizes[-1]], list):
            raise UnsupportedModel(f"{path}: per-layer attention head counts are not supported")
        raise UnsupportedModel(f"{path}: model sizes in the GGUF metadata are not integers")
    bad: dict[str, list[str]] = {}
    for tensor in header.tensors:
        if tensor.ggml_type not in SUPPORTED_TYPES:
            bad.setdefault(tensor.ggml_type, []).append(tensor.name)
    if bad:
        details = "; ".join(
            f"{kind} ({len(names)} tensors, e.g. {', '.join(names[:3])})"
            for kind, names in sorted(bad.items())
        )
        raise UnsupportedModel(
            f"{path}: unsupported tensor types: {details}. Supported: "
            f"{', '.join(SUPPORTED_TYPES)} (use a Q4_0, Q4_1, Q8_0 or F16 file)"
        )
    unknown = [t.name for t in header.tensors if _mlx_name(t.name) is None]
    if unknown:
        raise UnsupportedModel(
            f"{path}: tensors with no llama equivalent: {', '.join(unknown[:5])} (e.g. "
            "llama 3.1 rope_freqs or mixture-of-experts weights are not supported)"
        )
    if int(meta.get("llama.expert_count", 0) or 0) > 0:
        raise UnsupportedModel(f"{path}: mixture-of-experts llama models are not supported")
    scaling = meta.get("llama.rope.scaling.type", "none")
    if scaling not in ("none", "linear"):
        raise UnsupportedModel(f"{path}: rope scaling {scaling!r} is not supported")
    head_dim = _head_dim(meta)
    rope_dims = meta.get("llama.rope.dimension_count", head_dim)
    if rope_dims != head_dim:
        raise UnsupportedModel(
            f"{path}: partial rotary embeddings ({rope_dims} of {head_dim} dims) not supported"
        )
    if not isinstance(meta.get("llama.attention.head_count_kv", 0), int):
        raise UnsupportedModel(f"{path}: per-layer attention head counts are not supported")
    problem = check_tokenizer(meta)
    if problem:
        raise UnsupportedModel(f"{path}: {problem}")


# --------------------------------------------------------------------------- mapping


def _split_suffix(name: str) -> tuple[str, str]:
    base, _, suffix = name.rpartition(".")
    if suffix in _SUFFIXES and base:
        return base, suffix
    return name, ""


def _mlx_base(base: str) -> str | None:
    if base in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[base]
    parts = base.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_NAMES:
        return f"model.layers.{int(parts[1])}.{_LAYER_NAMES[parts[2]]}"
    return None


def _mlx_name(gguf_name: str) -> str | None:
    """`blk.3.attn_q.scales` -> `model.layers.3.self_attn.q_proj.scales`; None if unknown."""
    base, suffix = _split_suffix(gguf_name)
    mapped = _mlx_base(base)
    if mapped is None or not suffix:
        return None
    return f"{mapped}.{suffix}"


def _head_dim(meta: dict[str, Any]) -> int:
    heads = int(meta.get("llama.attention.head_count", 1) or 1)
    default = int(meta.get("llama.embedding_length", 0)) // heads
    return int(meta.get("llama.attention.key_length", default))


def build_config(header: GGUFHeader, quant_bits: dict[str, int]) -> dict[str, Any]:
    """config.json for mlx_lm's llama model. `quant_bits`: module path -> bits per weight."""
    meta = header.metadata
    names = {t.name for t in header.tensors}
    embed = next((t for t in header.tensors if t.name == "token_embd.weight"), None)
    vocab_size = embed.shape[0] if embed else len(meta["tokenizer.ggml.tokens"])
    heads = int(meta["llama.attention.head_count"])
    config: dict[str, Any] = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": int(meta["llama.embedding_length"]),
        "num_hidden_layers": int(meta["llama.block_count"]),
        "intermediate_size": int(meta["llama.feed_forward_length"]),
        "num_attention_heads": heads,
        "num_key_value_heads": int(meta.get("llama.attention.head_count_kv", heads)),
        "head_dim": _head_dim(meta),
        "rms_norm_eps": float(meta.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(meta.get("llama.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(meta.get("llama.context_length", 4096)),
        "vocab_size": int(vocab_size),
        # No separate output matrix: the head reuses the embedding.
        "tie_word_embeddings": "output.weight" not in names,
        # llama.cpp's converter permutes Q/K rows for interleaved RoPE; rotating
        # pairs the same way is cheaper than un-permuting quantized rows.
        "rope_traditional": True,
        "attention_bias": any(n.endswith(".bias") and ".attn_" in n for n in names),
        "mlp_bias": any(n.endswith(".bias") and ".ffn_" in n for n in names),
    }
    if meta.get("llama.rope.scaling.type") == "linear":
        config["rope_scaling"] = {"type": "linear",
                                  "factor": float(meta["llama.rope.scaling.factor"])}
    for key in ("bos", "eos", "padding"):
        token_id = meta.get(f"tokenizer.ggml.{key}_token_id")
        if isinstance(token_id, int):
            config["pad_token_id" if key == "padding" else f"{key}_token_id"] = token_id
    if quant_bits:
        # mlx_lm reads per-module overrides from the same dict; the default is the
        # commonest width so only the odd layers (often a Q8_0 embedding) are listed.
        default_bits = Counter(quant_bits.values()).most_common(1)[0][0]
        quantization: dict[str, Any] = {"group_size": GROUP_SIZE, "bits": default_bits}
        for module, bits in sorted(quant_bits.items()):
            if bits != default_bits:
                quantization[module] = {"group_size": GROUP_SIZE, "bits": bits}
        config["quantization"] = quantization
        config["quantization_config"] = quantization
    return config


def generation_config(meta: dict[str, Any]) -> dict[str, Any]:
    """Stop ids plus any sampling defaults the GGUF author recorded (general.sampling.*)."""
    out: dict[str, Any] = {}
    eos = [meta.get(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot")]
    eos_ids = list(dict.fromkeys(i for i in eos if isinstance(i, int)))
    if eos_ids:
        out["eos_token_id"] = eos_ids[0] if len(eos_ids) == 1 else eos_ids
    if isinstance(meta.get("tokenizer.ggml.bos_token_id"), int):
        out["bos_token_id"] = meta["tokenizer.ggml.bos_token_id"]
    for gguf_key, hf_key in (("temp", "temperature"), ("top_p", "top_p"), ("top_k", "top_k"),
                             ("min_p", "min_p"), ("penalty_repeat", "repetition_penalty")):
        value = meta.get(f"general.sampling.{gguf_key}")
        if isinstance(value, int | float) and not isinstance(value, bool):
            out[hf_key] = value
    if any(k in out for k in ("temperature", "top_p", "top_k", "min_p")):
        out["do_sample"] = True
    return out


# --------------------------------------------------------------------------- convert


def convert_gguf(
    gguf_path: Path,
    out_dir: Path,
    *,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Convert a supported GGUF into an MLX model folder at `out_dir` (replaced atomically).

    Must run on the thread that owns MLX. Raises UnsupportedModel before any
    heavy work when the file cannot be converted.
    """
    # Imported here so the header reader works where MLX is missing or broken.
    import mlx.core as mx

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    header = read_gguf_header(gguf_path)
    check_supported(header, gguf_path)
    log.info("gguf_convert_start", path=str(gguf_path), tensors=len(header.tensors))

    try:
        loaded = mx.load(str(gguf_path), return_metadata=False)
    except (RuntimeError, ValueError) as exc:
        raise UnsupportedModel(f"{gguf_path}: MLX cannot read the tensors: {exc}") from exc
    assert isinstance(loaded, dict)
    weights: dict[str, Any] = {}
    quant_bits: dict[str, int] = {}
    total = len(header.tensors)
    for done, info in enumerate(header.tensors, start=1):
        # A quantized GGUF tensor comes back from mx.load as weight + scales + biases.
        base, suffix = _split_suffix(info.name)
        parts = [info.name] + ([f"{base}.scales", f"{base}.biases"] if suffix == "weight" else [])
        for name in parts:
            if name not in loaded:
                continue
            mapped = _mlx_name(name)
            if mapped is None:  # check_supported vetted the names; this would be a bug
                raise UnsupportedModel(f"{gguf_path}: unexpected tensor {name} from mx.load")
            weights[mapped] = loaded.pop(name)
            mx.eval(weights[mapped])
        scales = weights.get(f"{_mlx_base(base)}.scales")
        if suffix == "weight" and scales is not None:
            packed = weights[f"{_mlx_base(base)}.weight"]
            bits = packed.shape[-1] * 32 // (scales.shape[-1] * GROUP_SIZE)
            quant_bits[str(_mlx_base(base))] = bits
        if progress is not None:
            progress(done, total)
    if loaded:
        raise UnsupportedModel(f"{gguf_path}: mx.load returned unexpected {sorted(loaded)[:3]}")

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "mlx"})
        _write_json(tmp / "config.json", build_config(header, quant_bits))
        gen = generation_config(header.metadata)
        if gen:
            _write_json(tmp / "generation_config.json", gen)
        build_tokenizer_files(header.metadata, tmp)
        _write_json(tmp / SOURCE_FILE, {**_source_stamp(gguf_path),
                                         "name": header.metadata.get("general.name")})
        _swap_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("gguf_convert_done", path=str(gguf_path), out=str(out_dir))
    return out_dir


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _swap_into_place(tmp: Path, out_dir: Path) -> None:
    """Rename the finished folder over `out_dir`; readers never see a half-written one."""
    old = None
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
        out_dir.rename(old)
    tmp.rename(out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)




def _source_stamp(gguf_path: Path) -> dict[str, Any]:
    """What identifies a GGUF cheaply (app/models/stamp.py), so a changed file is converted
    anew."""
    return {"file": gguf_path.name, **file_stamp(gguf_path), "converter": CONVERTER_VERSION}


def is_conversion_of(out_dir: Path, gguf_path: Path) -> bool:
    """True if `out_dir` is a finished conversion of this GGUF (same name, size, mtime and
    sampled hash, same converter version)."""
    try:
        stamp = json.loads((Path(out_dir) / SOURCE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    expected = _source_stamp(Path(gguf_path))
    return isinstance(stamp, dict) and all(stamp.get(k) == v for k, v in expected.items())


def ensure_converted(
    gguf_path: Path,
    out_dir: Path,
    *,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """`convert_gguf` unless `out_dir` already holds this file's conversion.

    Processes converting the same target take turns (file lock), so the second
    one finds the first one's result instead of converting again.
    """
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if is_conversion_of(out_dir, gguf_path):
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(out_dir.parent / f".{out_dir.name}.lock"):
        if is_conversion_of(out_dir, gguf_path):
            return out_dir
        return convert_gguf(gguf_path, out_dir, progress=progress)


@contextmanager
def file_lock(lock_path: Path) -> Iterator[None]:
    """An exclusive advisory lock across processes, held for the `with` block."""
    with Path(lock_path).open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
