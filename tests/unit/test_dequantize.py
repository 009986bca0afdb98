"""A quantized MLX model served from its float32 copy on the CPU backend (app/models/dequantize.py):
made once, reused, remade when the source changes, counted at its real size, same outputs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

mx = pytest.importorskip("mlx.core")
nn = pytest.importorskip("mlx.nn")

from mlx_lm.generate import generate_step  # noqa: E402
from mlx_lm.utils import load_model  # noqa: E402

from app.engine.residency.pool import ModelPool  # noqa: E402
from app.models.dequantize import (  # noqa: E402
    SOURCE_FILE,
    _safetensors_header,
    copy_dir,
    ensure_dequantized,
    float32_bytes,
    is_copy_of,
)
from app.models.registry import ModelRegistry  # noqa: E402
from app.settings import Settings  # noqa: E402
from tests.unit.test_variants import write_quantized_folder  # noqa: E402

pytestmark = pytest.mark.skipif(mx.default_device() != mx.cpu, reason="CPU backend only")


@pytest.fixture
def quantized_folder(tmp_path: Path) -> Path:
    return write_quantized_folder(tmp_path / "tiny-4bit")


def tensor_bytes(folder: Path) -> int:
    """Bytes of every tensor in the folder's safetensors files (their real size)."""
    return sum(info["data_offsets"][1] - info["data_offsets"][0]
               for file in folder.glob("*.safetensors")
               for info in _safetensors_header(file).values())


def greedy(model: Any, prompt: list[int], n: int) -> list[int]:
    tokens = []
    for token, _ in generate_step(mx.array(prompt), model, max_tokens=n):
        tokens.append(int(token))
    return tokens


def test_the_copy_is_made_once_and_reused(quantized_folder: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    copy = ensure_dequantized(quantized_folder, cache)
    assert copy == copy_dir(cache, quantized_folder) and is_copy_of(copy, quantized_folder)
    weights = copy / "model.safetensors"
    made = weights.stat().st_mtime_ns, weights.stat().st_ino
    assert ensure_dequantized(quantized_folder, cache) == copy
    assert (weights.stat().st_mtime_ns, weights.stat().st_ino) == made  # not written again
    params = dict(nn.utils.tree_flatten(load_model(copy)[0].parameters()))
    assert all(v.dtype == mx.float32 for v in params.values())
    assert not any(name.endswith(".scales") for name in params)


def test_a_changed_source_gets_a_fresh_copy(quantized_folder: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    copy = ensure_dequantized(quantized_folder, cache)
    before = load_model(copy)[0]
    prompt = [1, 5, 9, 42, 7]
    # Other weights saved over the source, as a re-download or re-quantization does.
    write_quantized_folder(quantized_folder, seed=1)
    other = load_model(quantized_folder)[0]
    assert not is_copy_of(copy, quantized_folder)
    assert ensure_dequantized(quantized_folder, cache) == copy
    after = load_model(copy)[0]
    assert is_copy_of(copy, quantized_folder)
    assert mx.allclose(after(mx.array([prompt])), other(mx.array([prompt])), atol=1e-4).item()
    assert not mx.allclose(after(mx.array([prompt])), before(mx.array([prompt])),
                           atol=1e-4).item()
    # A config change (another quantization, another architecture setting) counts too.
    config = json.loads((quantized_folder / "config.json").read_text())
    (quantized_folder / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-6}))
    assert not is_copy_of(copy, quantized_folder)
    assert json.loads((ensure_dequantized(quantized_folder, cache) / "config.json")
                      .read_text())["rms_norm_eps"] == 1e-6
    assert json.loads((copy / SOURCE_FILE).read_text())["version"] >= 1


def test_outputs_equal_the_quantized_kernels(quantized_folder: Path, tmp_path: Path) -> None:
    """The same weights, the quantized matmul replaced by a float32 one: logits equal up to
    float rounding, so greedy tokens are the same."""
    quantized = load_model(quantized_folder)[0]
    copy = load_model(ensure_dequantized(quantized_folder, tmp_path / "cache"))[0]
    for prompt in ([1, 5, 9, 42, 7], [3, 3, 3], list(range(10, 60, 3))):
        expected = quantized(mx.array([prompt])).astype(mx.float32)
        got = copy(mx.array([prompt]))
        assert mx.allclose(got, expected, atol=1e-4, rtol=1e-4).item()
        assert greedy(copy, prompt, 12) == greedy(quantized, prompt, 12)


def test_the_budget_counts_the_float32_size(quantized_folder: Path, tmp_path: Path) -> None:
    copy = ensure_dequantized(quantized_folder, tmp_path / "copy")
    assert float32_bytes(quantized_folder) == tensor_bytes(copy)
    assert float32_bytes(quantized_folder) > tensor_bytes(quantized_folder)

    def pool(**engine: Any) -> tuple[ModelPool, Any]:
        settings = Settings(cache_dir=tmp_path / "cache", config_dir=tmp_path,
                            models=[{"id": "q", "path": quantized_folder}],  # type: ignore[list-item]
                            residency={"memory_budget": "1GB"},  # type: ignore[arg-type]
                            engine={"prompt_cache_bytes": 1000, **engine})  # type: ignore[arg-type]
        registry = ModelRegistry.build(settings, demo_path=None)
        return ModelPool(settings, registry, thread=None), registry.resolve("q")  # type: ignore[arg-type]

    on, spec = pool()
    assert spec.quantized and spec.float32_weight_bytes == tensor_bytes(copy)
    assert on.serves_float32(spec)
    kv = spec.kv_bytes_per_token * spec.context_length
    assert on.footprint(spec) == tensor_bytes(copy) + 2 * kv + 1000
    assert on._mlx_folder(spec) == copy_dir(tmp_path / "cache", quantized_folder)

    off, spec = pool(cpu_dequantize=False)
    assert not off.serves_float32(spec)
    assert off.footprint(spec) == spec.weight_bytes + kv + 1000
    assert off._mlx_folder(spec) == quantized_folder

    # Where the float32 copy would not fit the budget, the quantized model is served as it is.
    small, spec = pool(prompt_cache_bytes=1_000_000_000 - spec.float32_estimated_bytes + 1)
    assert not small.serves_float32(spec) and small._mlx_folder(spec) == quantized_folder
