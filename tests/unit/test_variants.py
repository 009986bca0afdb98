"""Float copies of a quantized MLX folder: a tiny random model here, the demo model in e2e."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

mx = pytest.importorskip("mlx.core")
nn = pytest.importorskip("mlx.nn")

from mlx.utils import tree_flatten  # noqa: E402
from mlx_lm.models import llama  # noqa: E402
from mlx_lm.utils import load_model, save_config, save_model  # noqa: E402

from app.models.registry import ModelRegistry  # noqa: E402
from app.models.variants import make_float_variant  # noqa: E402
from app.settings import Settings  # noqa: E402

TINY = {
    "model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2,
    "intermediate_size": 128, "num_attention_heads": 2, "num_key_value_heads": 1,
    "rms_norm_eps": 1e-5, "vocab_size": 128, "max_position_embeddings": 256,
    "tie_word_embeddings": True, "torch_dtype": "bfloat16",
}


def write_quantized_folder(folder: Path, seed: int = 0) -> Path:
    """A 4-bit MLX folder with random weights, saved the way mlx_lm saves converted models."""
    mx.random.seed(seed)
    model = llama.Model(llama.ModelArgs.from_dict(TINY))
    nn.quantize(model, group_size=64, bits=4)
    mx.eval(model.parameters())
    save_model(folder, model)
    save_config({**TINY, "quantization": {"group_size": 64, "bits": 4}}, folder / "config.json")
    (folder / "tokenizer.json").write_text('{"fake": true}')
    (folder / "tokenizer_config.json").write_text("{}")
    (folder / "chat_template.jinja").write_text("{{ messages }}")
    return folder


@pytest.fixture
def quantized_folder(tmp_path: Path) -> Path:
    return write_quantized_folder(tmp_path / "tiny-4bit")


def test_float32_copy_is_dequantized_and_computes_the_same(
        quantized_folder: Path, tmp_path: Path) -> None:
    dst = make_float_variant(quantized_folder, tmp_path / "tiny-f32", "float32")
    assert dst == tmp_path / "tiny-f32"

    config = json.loads((dst / "config.json").read_text())
    assert "quantization" not in config and "quantization_config" not in config
    assert config["torch_dtype"] == "float32"
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (dst / name).read_text() == (quantized_folder / name).read_text()

    original, _ = load_model(quantized_folder)
    copy, _ = load_model(dst)
    assert not any(isinstance(m, nn.QuantizedLinear | nn.QuantizedEmbedding)
                   for _, m in copy.named_modules())
    params = dict(tree_flatten(copy.parameters()))
    assert params and all(v.dtype == mx.float32 for v in params.values())
    assert not any(k.endswith(".scales") for k in params)

    tokens = mx.array([[1, 5, 9, 42, 7]])
    expected = original(tokens).astype(mx.float32)
    got = copy(tokens)
    assert mx.allclose(expected, got, atol=1e-2, rtol=1e-2).item()


def test_float16_copy_has_float16_weights_and_is_bigger_than_4bit(
        quantized_folder: Path, tmp_path: Path) -> None:
    dst = make_float_variant(quantized_folder, tmp_path / "tiny-f16", "float16")
    copy, _ = load_model(dst)
    assert all(v.dtype == mx.float16 for _, v in tree_flatten(copy.parameters()))

    def weights(folder: Path) -> int:
        return sum(p.stat().st_size for p in folder.glob("*.safetensors"))

    assert weights(dst) > weights(quantized_folder)
    # The registry sees a distinct, bigger model with a float16 KV estimate.
    registry = ModelRegistry.build(
        Settings(discovery={"model_dirs": [tmp_path]}, cache_dir=tmp_path / "c"),  # type: ignore[arg-type]
        demo_path=None)
    assert {"tiny-4bit", "tiny-f16"} <= set(registry.ids)
    assert registry.resolve("tiny-f16").weight_bytes == weights(dst)


def test_refuses_to_overwrite_and_exist_ok_returns_existing(
        quantized_folder: Path, tmp_path: Path) -> None:
    dst = make_float_variant(quantized_folder, tmp_path / "v", "float16")
    stamp = (dst / "config.json").stat().st_mtime_ns
    with pytest.raises(FileExistsError):
        make_float_variant(quantized_folder, dst, "float16")
    assert make_float_variant(quantized_folder, dst, "float16", exist_ok=True) == dst
    assert (dst / "config.json").stat().st_mtime_ns == stamp
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


def test_bad_inputs(tmp_path: Path, quantized_folder: Path) -> None:
    with pytest.raises(FileNotFoundError):
        make_float_variant(tmp_path / "nope", tmp_path / "out", "float16")
    with pytest.raises(ValueError):
        make_float_variant(quantized_folder, tmp_path / "out", "int8")  # type: ignore[arg-type]
    assert not (tmp_path / "out").exists()


# --- the real demo model -------------------------------------------------------------------------


def _demo_folder() -> Path | None:
    override = os.environ.get("MLXGW_TEST_MODEL_DIR")  # as tests/e2e/conftest.py
    if override:
        return Path(override)
    from app.models.demo import demo_model_dir
    from app.settings import load_settings

    return demo_model_dir(load_settings().cache_dir)  # filled by `mlx-gateway models demo`


@pytest.mark.e2e
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_demo_float_variant_answers_paris(dtype: str, tmp_path: Path) -> None:
    from mlx_lm import generate, load

    demo = _demo_folder()
    if demo is None or not (demo / "config.json").is_file():
        reason = f"demo MLX folder absent ({demo}); run `mlx-gateway models demo`"
        print(reason)
        pytest.skip(reason)
    dst = make_float_variant(demo, tmp_path / f"demo-{dtype}", dtype)  # type: ignore[arg-type]
    model, tokenizer = load(str(dst))
    params = dict(tree_flatten(model.parameters()))
    assert all(v.dtype == getattr(mx, dtype) for v in params.values())
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True, tokenize=False)
    answer = generate(model, tokenizer, prompt=prompt, max_tokens=12)
    assert "Paris" in answer, answer
