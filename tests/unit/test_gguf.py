"""GGUF header reader, refusal of unsupported files, name/config mapping, tokenizer rebuild,
and a full convert + mlx_lm.load of a tiny synthetic llama in every supported tensor type."""

from __future__ import annotations

import io
import json
import random
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tokenizers import Tokenizer

from app.models.gguf.convert import (
    GGUFHeader,
    TensorInfo,
    UnsupportedModel,
    _mlx_name,
    build_config,
    convert_gguf,
    ensure_converted,
    generation_config,
    is_conversion_of,
    read_gguf_header,
)
from app.models.gguf.tokenizer import build_tokenizer_files

# --------------------------------------------------------------------------- a tiny GGUF writer

U8, I8, U16, I16, U32, I32, F32V, BOOL, STR, ARR, U64, I64, F64 = range(13)
T_F32, T_F16, T_Q4_0, T_Q4_1, T_Q8_0, T_Q6_K = 0, 1, 2, 3, 8, 14
_FMT = {U8: "B", I8: "b", U16: "H", I16: "h", U32: "I", I32: "i", F32V: "f", BOOL: "?",
        U64: "Q", I64: "q", F64: "d"}


class Typed:
    """A metadata value with an explicit GGUF type (arrays: item type)."""

    def __init__(self, kind: int, value: Any) -> None:
        self.kind, self.value = kind, value


def _str(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("<Q", len(raw)) + raw


def _infer(value: Any) -> Typed:
    if isinstance(value, Typed):
        return value
    if isinstance(value, bool):
        return Typed(BOOL, value)
    if isinstance(value, int):
        return Typed(U32 if value >= 0 else I32, value)
    if isinstance(value, float):
        return Typed(F32V, value)
    if isinstance(value, str):
        return Typed(STR, value)
    raise TypeError(value)


def _value(typed: Typed) -> bytes:
    if typed.kind == STR:
        return _str(typed.value)
    return struct.pack("<" + _FMT[typed.kind], typed.value)


def _kv(key: str, value: Any) -> bytes:
    if isinstance(value, list) or (isinstance(value, Typed) and isinstance(value.value, list)):
        items = value.value if isinstance(value, Typed) else value
        kind = value.kind if isinstance(value, Typed) else _infer(items[0]).kind
        body = b"".join(_value(Typed(kind, v)) for v in items)
        return _str(key) + struct.pack("<IIQ", ARR, kind, len(items)) + body
    typed = _infer(value)
    return _str(key) + struct.pack("<I", typed.kind) + _value(typed)


def _f16(x: np.ndarray) -> bytes:
    return x.astype("<f2").tobytes()


def encode(array: np.ndarray, ggml_type: int) -> tuple[bytes, np.ndarray]:
    """Quantize like ggml; return (file bytes, what dequantizing them gives back)."""
    if ggml_type == T_F32:
        return array.astype("<f4").tobytes(), array.astype(np.float32)
    if ggml_type == T_F16:
        return _f16(array), array.astype(np.float16).astype(np.float32)
    blocks = array.astype(np.float32).reshape(-1, 32)
    out, deq = bytearray(), []
    for x in blocks:
        if ggml_type == T_Q8_0:
            d = np.float16(np.abs(x).max() / 127)
            q = np.round(x / np.float32(d)).astype(np.int8) if d else np.zeros(32, np.int8)
            out += _f16(np.array([d])) + q.tobytes()
            deq.append(np.float32(d) * q)
        elif ggml_type == T_Q4_0:
            peak = x[np.argmax(np.abs(x))]
            d = np.float16(peak / -8)
            inv = 1 / np.float32(d) if d else 0.0
            q = np.minimum(15, (x * inv + 8.5).astype(np.int32)).astype(np.uint8)
            out += _f16(np.array([d])) + (q[:16] | (q[16:] << 4)).astype(np.uint8).tobytes()
            deq.append((q.astype(np.float32) - 8) * np.float32(d))
        elif ggml_type == T_Q4_1:
            lo, hi = x.min(), x.max()
            d, m = np.float16((hi - lo) / 15), np.float16(lo)
            inv = 1 / np.float32(d) if d else 0.0
            q = np.clip(np.round((x - np.float32(m)) * inv), 0, 15).astype(np.uint8)
            out += _f16(np.array([d, m])) + (q[:16] | (q[16:] << 4)).astype(np.uint8).tobytes()
            deq.append(q.astype(np.float32) * np.float32(d) + np.float32(m))
        else:
            raise ValueError(ggml_type)
    return bytes(out), np.concatenate(deq).reshape(array.shape)


def write_gguf(path: Path, metadata: dict[str, Any],
               tensors: list[tuple[str, tuple[int, ...], int, bytes]], version: int = 3) -> Path:
    """tensors: (name, row-major shape, ggml type id, data bytes)."""
    head = b"GGUF" + struct.pack("<IQQ", version, len(tensors), len(metadata))
    head += b"".join(_kv(k, v) for k, v in metadata.items())
    blob, offset = bytearray(), 0
    for name, shape, kind, data in tensors:
        dims = list(reversed(shape))
        head += _str(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, kind, offset)
        blob += data + b"\0" * (-len(data) % 32)
        offset = len(blob)
    head += b"\0" * (-len(head) % 32)
    path.write_bytes(head + bytes(blob))
    return path


# --------------------------------------------------------------------------- a tiny model


def _bytes_to_unicode() -> list[str]:
    """GPT-2's printable stand-ins for the 256 byte values."""
    keep = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    extra = 0
    chars = {}
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["1 2", "h e", "Ġ t", "Ġt he", "l l", "he ll", "hell o"]
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tokenizer_meta(pre: str = "smollm", add_bos: bool = False) -> dict[str, Any]:
    tokens = SPECIALS + _bytes_to_unicode() + [m.replace(" ", "") for m in MERGES]
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": Typed(I32, [3] * 3 + [1] * (len(tokens) - 3)),
        "tokenizer.ggml.merges": MERGES,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.padding_token_id": 2,
        "tokenizer.ggml.add_bos_token": add_bos,
        "tokenizer.chat_template": TEMPLATE,
    }


HIDDEN, FFN, HEADS, KV_HEADS, LAYERS = 64, 96, 2, 1, 2


def llama_meta(**extra: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "general.architecture": "llama",
        "general.name": "tiny",
        "llama.context_length": 256,
        "llama.embedding_length": HIDDEN,
        "llama.block_count": LAYERS,
        "llama.feed_forward_length": FFN,
        "llama.attention.head_count": HEADS,
        "llama.attention.head_count_kv": KV_HEADS,
        "llama.rope.freq_base": 50000.0,
        "llama.attention.layer_norm_rms_epsilon": 1e-5,
        "llama.rope.dimension_count": HIDDEN // HEADS,
        "general.sampling.temp": 0.6,
        **tokenizer_meta(),
    }
    meta.update(extra)
    return meta


def tiny_llama(path: Path, types: dict[str, int] | None = None, *, tied: bool = False,
               meta: dict[str, Any] | None = None) -> tuple[Path, dict[str, np.ndarray]]:
    """Write a random tiny llama GGUF; `types` overrides per-tensor ggml types."""
    rng = np.random.default_rng(0)
    types = types or {}
    meta = meta or llama_meta()
    vocab = len(meta["tokenizer.ggml.tokens"])
    head_dim = HIDDEN // HEADS
    shapes: dict[str, tuple[int, ...]] = {"token_embd.weight": (vocab, HIDDEN),
                                          "output_norm.weight": (HIDDEN,)}
    if not tied:
        shapes["output.weight"] = (vocab, HIDDEN)
    for i in range(LAYERS):
        shapes.update({
            f"blk.{i}.attn_q.weight": (HIDDEN, HIDDEN),
            f"blk.{i}.attn_k.weight": (KV_HEADS * head_dim, HIDDEN),
            f"blk.{i}.attn_v.weight": (KV_HEADS * head_dim, HIDDEN),
            f"blk.{i}.attn_output.weight": (HIDDEN, HIDDEN),
            f"blk.{i}.ffn_gate.weight": (FFN, HIDDEN),
            f"blk.{i}.ffn_up.weight": (FFN, HIDDEN),
            f"blk.{i}.ffn_down.weight": (HIDDEN, FFN),
            f"blk.{i}.attn_norm.weight": (HIDDEN,),
            f"blk.{i}.ffn_norm.weight": (HIDDEN,),
        })
    tensors, reference = [], {}
    for name, shape in shapes.items():
        default = T_F32 if len(shape) == 1 else T_Q4_1
        kind = types.get(name, default)
        values = rng.normal(0, 0.2, size=shape).astype(np.float32)
        if len(shape) == 1:
            values = 1 + values * 0.1
        data, reference[name] = encode(values, kind) if kind != T_Q6_K else (b"\0" * 8, values)
        tensors.append((name, shape, kind, data))
    return write_gguf(path, meta, tensors), reference


# --------------------------------------------------------------------------- header reader


def test_header_reads_every_value_type_and_tensor_table(tmp_path: Path) -> None:
    meta = {
        "general.architecture": "llama",
        "u8": Typed(U8, 200), "i8": Typed(I8, -5), "u16": Typed(U16, 60000),
        "i16": Typed(I16, -300), "u32": Typed(U32, 4_000_000_000), "i32": Typed(I32, -70000),
        "f32": Typed(F32V, 0.5), "yes": True, "u64": Typed(U64, 2**40), "i64": Typed(I64, -2**40),
        "f64": Typed(F64, 1e-300), "text": "héllo",
        "ints": Typed(I32, [1, -2, 3]), "words": ["a b", "ĠĠ", ""],
    }
    data, _ = encode(np.ones((4, 32), np.float32), T_Q8_0)
    path = write_gguf(tmp_path / "m.gguf", meta, [
        ("token_embd.weight", (4, 32), T_Q8_0, data),
        ("blk.0.attn_norm.weight", (32,), T_F32, np.ones(32, "<f4").tobytes()),
    ], version=2)

    header = read_gguf_header(path)

    assert header.version == 2
    assert header.metadata == {**{k: v.value if isinstance(v, Typed) else v
                                  for k, v in meta.items()}}
    assert header.architecture == "llama"
    assert header.tensors == [TensorInfo("token_embd.weight", (4, 32), "Q8_0"),
                              TensorInfo("blk.0.attn_norm.weight", (32,), "F32")]
    # 4*32 Q8_0 values = 4 blocks of 34 bytes on disk, 4 * (32 + 4) bytes in MLX; plus 128 F32.
    assert header.file_bytes() == 4 * 34 + 128
    assert header.mlx_bytes() == 4 * 36 + 128


@pytest.mark.parametrize(("blob", "needle"), [
    (b"GGML" + b"\0" * 60, "not a GGUF file"),
    (b"GGUF" + struct.pack("<IQQ", 1, 0, 0), "version 1"),
    (b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + _str("abcde") + struct.pack("<I", U32) + b"\1\2",
     "truncated"),
    # A key claiming 2**60 bytes must be refused without trying to allocate it.
    (b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 2**60) + b"x" * 64, "corrupt"),
    (b"GGUF" + struct.pack("<IQQ", 3, 2**50, 0), "corrupt"),
])
def test_header_refuses_broken_files(tmp_path: Path, blob: bytes, needle: str) -> None:
    path = tmp_path / "bad.gguf"
    path.write_bytes(blob)
    with pytest.raises(UnsupportedModel, match=needle) as info:
        read_gguf_header(path)
    assert str(path) in str(info.value)


def test_header_refuses_a_truncated_download(tmp_path: Path) -> None:
    path, _ = tiny_llama(tmp_path / "t.gguf")
    assert len(read_gguf_header(path).tensors) == 2 + 1 + 9 * LAYERS
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(UnsupportedModel, match="truncated file"):
        read_gguf_header(path)


# --------------------------------------------------------------------------- refusals


def test_refuses_unsupported_tensor_type_naming_file_type_and_tensors(tmp_path: Path) -> None:
    path, _ = tiny_llama(tmp_path / "k.gguf", {"blk.0.ffn_down.weight": T_Q6_K,
                                               "blk.1.ffn_down.weight": T_Q6_K})
    out = tmp_path / "out"
    with pytest.raises(UnsupportedModel) as info:
        convert_gguf(path, out)
    message = str(info.value)
    assert str(path) in message
    assert "Q6_K" in message and "2 tensors" in message
    assert "blk.0.ffn_down.weight" in message and "blk.1.ffn_down.weight" in message
    assert isinstance(info.value, ValueError)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == [path]  # no temp folder left behind


def test_refuses_other_architectures(tmp_path: Path) -> None:
    path, _ = tiny_llama(tmp_path / "q.gguf", meta=llama_meta(**{
        "general.architecture": "qwen2"}))
    with pytest.raises(UnsupportedModel, match=r"architecture 'qwen2' is not supported"):
        convert_gguf(path, tmp_path / "out")


def test_refuses_unknown_tensors_and_pre_tokenizers(tmp_path: Path) -> None:
    path, _ = tiny_llama(tmp_path / "p.gguf", meta=llama_meta(**{
        "tokenizer.ggml.pre": "qwen2"}))
    with pytest.raises(UnsupportedModel, match="pre-tokenizer 'qwen2'"):
        convert_gguf(path, tmp_path / "out")
    meta = llama_meta()
    rope = ("rope_freqs.weight", (16,), T_F32, np.ones(16, "<f4").tobytes())
    path = write_gguf(tmp_path / "r.gguf", meta, [rope])
    with pytest.raises(UnsupportedModel, match=r"rope_freqs\.weight"):
        convert_gguf(path, tmp_path / "out")


# --------------------------------------------------------------------------- mapping


@pytest.mark.parametrize(("gguf", "mlx"), [
    ("token_embd.weight", "model.embed_tokens.weight"),
    ("token_embd.scales", "model.embed_tokens.scales"),
    ("blk.12.attn_q.biases", "model.layers.12.self_attn.q_proj.biases"),
    ("blk.0.attn_k.weight", "model.layers.0.self_attn.k_proj.weight"),
    ("blk.0.attn_v.bias", "model.layers.0.self_attn.v_proj.bias"),
    ("blk.3.attn_output.weight", "model.layers.3.self_attn.o_proj.weight"),
    ("blk.3.ffn_gate.weight", "model.layers.3.mlp.gate_proj.weight"),
    ("blk.3.ffn_up.weight", "model.layers.3.mlp.up_proj.weight"),
    ("blk.3.ffn_down.scales", "model.layers.3.mlp.down_proj.scales"),
    ("blk.3.attn_norm.weight", "model.layers.3.input_layernorm.weight"),
    ("blk.3.ffn_norm.weight", "model.layers.3.post_attention_layernorm.weight"),
    ("output_norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
    ("rope_freqs.weight", None),
    ("blk.3.ffn_gate_exps.weight", None),
    ("blk.x.attn_q.weight", None),
    ("token_embd", None),
])
def test_tensor_names_map_to_mlx_lm_llama(gguf: str, mlx: str | None) -> None:
    assert _mlx_name(gguf) == mlx


def test_config_from_metadata(tmp_path: Path) -> None:
    meta = {k: (v.value if isinstance(v, Typed) else v) for k, v in llama_meta().items()}
    vocab = len(meta["tokenizer.ggml.tokens"])
    tied = GGUFHeader(3, meta, [TensorInfo("token_embd.weight", (vocab, HIDDEN), "Q8_0")])
    config = build_config(tied, {"model.embed_tokens": 8, "model.layers.0.mlp.up_proj": 4,
                                 "model.layers.0.mlp.down_proj": 4})
    assert config["model_type"] == "llama"
    assert (config["hidden_size"], config["num_hidden_layers"], config["intermediate_size"]) == (
        HIDDEN, LAYERS, FFN)
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (HEADS, KV_HEADS)
    assert config["head_dim"] == HIDDEN // HEADS
    assert config["rope_theta"] == 50000.0
    assert config["rms_norm_eps"] == pytest.approx(1e-5)
    assert config["max_position_embeddings"] == 256
    assert config["vocab_size"] == vocab
    assert config["tie_word_embeddings"] is True
    assert config["rope_traditional"] is True
    assert config["quantization"] == {"group_size": 32, "bits": 4,
                                      "model.embed_tokens": {"group_size": 32, "bits": 8}}
    untied = GGUFHeader(3, meta, [*tied.tensors, TensorInfo("output.weight", (vocab, 64), "F16")])
    assert build_config(untied, {})["tie_word_embeddings"] is False
    assert "quantization" not in build_config(untied, {})

    gen = generation_config({**meta, "tokenizer.ggml.eot_token_id": 0})
    assert gen["eos_token_id"] == [2, 0]
    assert gen["temperature"] == pytest.approx(0.6)


# --------------------------------------------------------------------------- tokenizer


def _tokenizer(tmp_path: Path, **kwargs: Any) -> tuple[Tokenizer, dict[str, Any]]:
    raw = tokenizer_meta(**kwargs)
    meta = {k: (v.value if isinstance(v, Typed) else v) for k, v in raw.items()}
    build_tokenizer_files(meta, tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    return Tokenizer.from_file(str(tmp_path / "tokenizer.json")), config


def test_tokenizer_round_trip_specials_and_digits(tmp_path: Path) -> None:
    tok, config = _tokenizer(tmp_path)
    text = "hello the 12 <|im_start|>ünï\n  x<|im_end|>"
    encoding = tok.encode(text)
    assert tok.decode(encoding.ids, skip_special_tokens=False) == text
    assert "hello" in encoding.tokens and "Ġthe" in encoding.tokens
    # smollm pre-tokenizer: digits never merge even though the merge "1 2" exists.
    assert "12" not in encoding.tokens and [t for t in encoding.tokens if t in "12"] == ["1", "2"]
    assert 1 in encoding.ids and 2 in encoding.ids  # specials stay whole
    assert tok.decode(encoding.ids, skip_special_tokens=True) == "hello the 12 ünï\n  x"
    assert config["chat_template"] == TEMPLATE
    assert (config["bos_token"], config["eos_token"], config["pad_token"]) == (
        "<|im_start|>", "<|im_end|>", "<|im_end|>")
    assert config["add_bos_token"] is False
    assert tok.encode("hi").ids[0] != 1


def test_gpt2_pre_tokenizer_merges_digits_and_bos_is_added(tmp_path: Path) -> None:
    tok, config = _tokenizer(tmp_path, pre="gpt-2", add_bos=True)
    encoding = tok.encode("12")
    assert encoding.tokens == ["<|im_start|>", "12"]
    assert config["add_bos_token"] is True


# --------------------------------------------------------------------------- full conversion


def test_convert_every_supported_type_and_load_with_mlx_lm(tmp_path: Path) -> None:
    mx = pytest.importorskip("mlx.core")
    mlx_lm = pytest.importorskip("mlx_lm")
    types = {"token_embd.weight": T_Q8_0, "output.weight": T_Q4_0,
             "blk.0.attn_q.weight": T_Q4_0, "blk.0.attn_k.weight": T_Q4_1,
             "blk.0.attn_v.weight": T_F16, "blk.0.attn_output.weight": T_Q8_0,
             "blk.0.ffn_down.weight": T_F32}
    path, reference = tiny_llama(tmp_path / "tiny.gguf", types)
    calls: list[tuple[int, int]] = []
    out = convert_gguf(path, tmp_path / "models" / "tiny",
                       progress=lambda done, total: calls.append((done, total)))

    assert out == tmp_path / "models" / "tiny"
    assert {p.name for p in out.iterdir()} >= {"config.json", "model.safetensors",
                                               "tokenizer.json", "tokenizer_config.json",
                                               "generation_config.json"}
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["tiny"]  # no temp leftovers
    n_tensors = len(read_gguf_header(path).tensors)
    assert calls == [(i, n_tensors) for i in range(1, n_tensors + 1)]
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"]["bits"] == 4
    assert config["quantization"]["model.embed_tokens"] == {"group_size": 32, "bits": 8}
    assert config["quantization"]["model.layers.0.self_attn.o_proj"]["bits"] == 8
    assert config["tie_word_embeddings"] is False

    model, tokenizer = mlx_lm.load(str(out))
    layer = model.model.layers[0]

    def dense(module: Any) -> np.ndarray:
        if hasattr(module, "scales"):
            return np.array(mx.dequantize(module.weight, module.scales, module.biases,
                                          group_size=module.group_size, bits=module.bits))
        return np.array(module.weight.astype(mx.float32))

    checks = {
        "token_embd.weight": model.model.embed_tokens,
        "output.weight": model.lm_head,
        "blk.0.attn_q.weight": layer.self_attn.q_proj,
        "blk.0.attn_k.weight": layer.self_attn.k_proj,
        "blk.0.attn_v.weight": layer.self_attn.v_proj,
        "blk.0.attn_output.weight": layer.self_attn.o_proj,
        "blk.0.ffn_down.weight": layer.mlp.down_proj,
        "blk.1.ffn_up.weight": model.model.layers[1].mlp.up_proj,
        "blk.1.ffn_norm.weight": model.model.layers[1].post_attention_layernorm,
    }
    for name, module in checks.items():
        np.testing.assert_allclose(dense(module), reference[name], atol=2e-3, err_msg=name)

    ids = tokenizer.encode("hello the 12")
    logits = model(mx.array([ids]))
    assert logits.shape == (1, len(ids), config["vocab_size"])
    assert bool(mx.all(mx.isfinite(logits)).item())
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}],
                                           add_generation_prompt=True, tokenize=False)
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_convert_replaces_an_existing_folder(tmp_path: Path) -> None:
    pytest.importorskip("mlx.core")
    path, _ = tiny_llama(tmp_path / "tiny.gguf", tied=True)
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    convert_gguf(path, out)
    assert not (out / "stale.txt").exists()
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "tiny.gguf"]


def test_sentencepiece_vocab_tokenizes_like_sentencepiece(tmp_path: Path) -> None:
    """A llama-style (sentencepiece BPE, byte fallback) vocab, rebuilt from what a GGUF
    stores, must segment exactly like sentencepiece itself."""
    spm = pytest.importorskip("sentencepiece")

    words = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "hello", "world",
             "token", "model", "llama", "merge", "piece", "score", "byte", "fallback"]
    rng = random.Random(0)
    lines = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(2000)]
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=proto, model_type="bpe", vocab_size=400,
        byte_fallback=True, normalization_rule_name="identity", add_dummy_prefix=True,
        remove_extra_whitespaces=False, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2,
        minloglevel=2,
    )
    sp = spm.SentencePieceProcessor(model_proto=proto.getvalue())
    ids = range(sp.get_piece_size())
    # The token types llama.cpp's converter writes.
    types = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1
             for i in ids]
    meta = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": [sp.id_to_piece(i) for i in ids],
        "tokenizer.ggml.scores": [sp.get_score(i) for i in ids],
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0, "tokenizer.ggml.add_bos_token": True,
    }
    build_tokenizer_files(meta, tmp_path)
    tok = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert (config["bos_token"], config["eos_token"], config["unk_token"]) == (
        "<s>", "</s>", "<unk>")
    for text in ["the quick brown fox", "hello world", "  two  spaces", "Ünïcödé 🚀\nnew",
                 "lazydog jumps", "x"]:
        assert tok.encode(text).ids == [1, *sp.encode(text)], text
        assert tok.decode(tok.encode(text).ids) == text
    # Unlike sentencepiece (but like llama.cpp and transformers), control tokens in text
    # are recognised whole.
    assert tok.encode("hello</s>").ids == [1, *sp.encode("hello"), 2]


def test_ensure_converted_reuses_a_matching_conversion(tmp_path: Path) -> None:
    pytest.importorskip("mlx.core")
    path, _ = tiny_llama(tmp_path / "tiny.gguf", tied=True)
    out = tmp_path / "models" / "tiny"
    assert ensure_converted(path, out) == out
    assert is_conversion_of(out, path)
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert ensure_converted(path, out) == out
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp
    # A different file under the same name (here: untied, so bigger) is converted anew.
    tiny_llama(path)
    assert not is_conversion_of(out, path)
    ensure_converted(path, out)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False


def test_a_replaced_gguf_of_the_same_size_is_converted_anew(tmp_path: Path) -> None:
    """Name + size + converter version served a stale conversion (issue 13, item 14): the
    stamp also holds the mtime and a hash of the file's ends."""
    import os

    pytest.importorskip("mlx.core")
    path, _ = tiny_llama(tmp_path / "tiny.gguf", tied=True)
    out = tmp_path / "models" / "tiny"
    ensure_converted(path, out)
    first = (out / "model.safetensors").read_bytes()
    stat = path.stat()

    # Same bytes, newer mtime (the file was replaced by a copy): converted again.
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert not is_conversion_of(out, path)
    ensure_converted(path, out)
    assert is_conversion_of(out, path)

    # Other weights of the same size, mtime forged back: the sampled hash tells them apart.
    stat = path.stat()
    data = bytearray(path.read_bytes())
    data[-8:] = bytes(b ^ 0x55 for b in data[-8:])  # the last tensor's last bytes
    path.write_bytes(bytes(data))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size
    assert not is_conversion_of(out, path)
    ensure_converted(path, out)
    assert (out / "model.safetensors").read_bytes() != first


def test_demo_model_follows_a_changed_local_gguf(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The demo folder was reused whatever GGUF it came from; a changed file on disk (here
    MLXGW_DEMO_GGUF) is converted anew, and with no GGUF on disk the folder is kept."""
    import os

    from app.models.demo import DEMO_GGUF_ENV, ensure_demo_model

    pytest.importorskip("mlx.core")
    path, _ = tiny_llama(tmp_path / "tiny.gguf", tied=True)
    monkeypatch.setenv(DEMO_GGUF_ENV, str(path))
    out = ensure_demo_model(tmp_path / "cache")
    assert is_conversion_of(out, path)
    tiny_llama(path)  # replaced by another model
    assert not is_conversion_of(out, path)
    assert ensure_demo_model(tmp_path / "cache") == out
    assert is_conversion_of(out, path)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    os.unlink(path)
    monkeypatch.setenv(DEMO_GGUF_ENV, "")
    assert ensure_demo_model(tmp_path / "cache") == out  # nothing local to compare: kept
