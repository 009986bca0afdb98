"""A draft model is charged in its target's memory footprint (it is loaded and evicted with
it), and only while speculative decoding is on (off: it is never loaded)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from app.engine.residency.pool import ModelPool
from app.models.registry import ModelRegistry
from app.settings import Settings


def folder(where: Path, layers: int, weight_bytes: int) -> Path:
    where.mkdir()
    (where / "config.json").write_text(json.dumps({
        "num_hidden_layers": layers, "num_attention_heads": 4, "num_key_value_heads": 2,
        "hidden_size": 64, "max_position_embeddings": 1024, "torch_dtype": "float32"}))
    (where / "model.safetensors").write_bytes(b"\0" * weight_bytes)
    return where


def pool(tmp_path: Path, **engine: Any) -> tuple[ModelPool, ModelRegistry]:
    big = folder(tmp_path / f"big-{len(engine)}", 8, 50_000)
    small = folder(tmp_path / f"small-{len(engine)}", 2, 10_000)
    settings = Settings(cache_dir=tmp_path / "cache", config_dir=tmp_path,
                        models=[{"id": "big", "path": big, "draft": "small"},  # type: ignore[list-item]
                                {"id": "small", "path": small}],  # type: ignore[list-item]
                        residency={"memory_budget": "1GB"},  # type: ignore[arg-type]
                        engine={"prompt_cache_bytes": 1000, "cpu_dequantize": False,  # type: ignore[arg-type]
                                **engine})
    registry = ModelRegistry.build(settings, demo_path=None)
    return ModelPool(settings, registry, thread=None), registry  # type: ignore[arg-type]


def test_the_draft_is_counted_with_its_target(tmp_path: Path) -> None:
    models, registry = pool(tmp_path)
    big, small = registry.resolve("big"), registry.resolve("small")
    assert big.draft == "small" and models.draft_of(big) == small
    assert small.estimated_bytes > small.weight_bytes > 0  # its KV counts too
    assert models.footprint(big) == big.estimated_bytes + small.estimated_bytes + 1000
    # The draft named on its own is a model like any other (a separate copy).
    assert models.draft_of(small) is None
    assert models.footprint(small) == small.estimated_bytes + 1000


def test_no_draft_is_loaded_or_counted_with_speculation_off(tmp_path: Path) -> None:
    models, registry = pool(tmp_path, speculative="off")
    big = registry.resolve("big")
    assert models.draft_of(big) is None
    assert models.footprint(big) == big.estimated_bytes + 1000
