"""Registry: config entries, discovery over fake layouts, duplicates, resolution, the table."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import pytest

from app.cli import main
from app.errors import ModelNotFound
from app.models.cli import format_table
from app.models.demo import DEMO_GGUF_NAME
from app.models.registry import ModelRegistry
from app.settings import DEMO_MODEL_ID, Settings, load_settings

# Left in the cache by `mlx-gateway models demo` (make test runs it first).
DEMO_GGUF = load_settings().cache_dir / "downloads" / DEMO_GGUF_NAME

LLAMA_CONFIG = {
    "model_type": "llama", "num_hidden_layers": 30, "num_attention_heads": 9,
    "num_key_value_heads": 3, "hidden_size": 576, "max_position_embeddings": 8192,
    "torch_dtype": "bfloat16",
}
KV_PER_TOKEN = 2 * 30 * 3 * 64 * 2  # K and V, layers, kv heads, head dim, bf16


def mlx_folder(path: Path, weights: int = 1000, config: dict[str, Any] | None = None) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config or LLAMA_CONFIG))
    (path / "model.safetensors").write_bytes(b"\0" * weights)
    (path / "tokenizer.json").write_text("{}")
    return path


def gguf_file(path: Path, meta: dict[str, Any] | None = None, padding: int = 0) -> Path:
    """A tiny but well-formed GGUF v3 file holding only metadata."""
    meta = meta if meta is not None else {
        "general.architecture": "llama", "llama.block_count": 4, "llama.context_length": 2048,
        "llama.embedding_length": 256, "llama.attention.head_count": 8,
        "llama.attention.head_count_kv": 2, "tokenizer.ggml.tokens": ["a", "bb", "ccc"],
    }

    def string(text: str) -> bytes:
        raw = text.encode()
        return struct.pack("<Q", len(raw)) + raw

    body = b""
    for key, value in meta.items():
        body += string(key)
        if isinstance(value, str):
            body += struct.pack("<I", 8) + string(value)
        elif isinstance(value, list):
            body += struct.pack("<IIQ", 9, 8, len(value)) + b"".join(string(v) for v in value)
        else:
            body += struct.pack("<IQ", 10, value)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, len(meta)) + body + b"\0" * padding)
    return path


def settings(tmp_path: Path, models: list[dict[str, Any]] | None = None,
             dirs: list[Path] | None = None) -> Settings:
    return Settings(models=models or [], discovery={"model_dirs": dirs or []},  # type: ignore[arg-type]
                    cache_dir=tmp_path / "cache")


# --- config entries and the demo default ---------------------------------------------------------


def test_demo_model_is_the_default_when_nothing_is_configured(tmp_path: Path) -> None:
    demo = mlx_folder(tmp_path / "demo")
    registry = ModelRegistry.build(settings(tmp_path), demo_path=demo)
    assert registry.ids == [DEMO_MODEL_ID]
    assert registry.default_id == DEMO_MODEL_ID
    spec = registry.resolve(DEMO_MODEL_ID)
    assert spec.source == "demo" and spec.format == "mlx" and spec.path == demo


def test_no_models_and_no_demo_path_gives_an_empty_registry(tmp_path: Path) -> None:
    registry = ModelRegistry.build(settings(tmp_path), demo_path=None)
    assert registry.default_id is None
    assert len(registry) == 0
    with pytest.raises(ModelNotFound, match="Available: none"):
        registry.resolve("anything")


def test_config_entry_with_aliases_pins_ttl_and_context_cap(tmp_path: Path) -> None:
    folder = mlx_folder(tmp_path / "m", weights=5000)
    registry = ModelRegistry.build(settings(tmp_path, models=[{
        "id": "smol", "path": str(folder), "aliases": ["gpt-4o", "tiny"], "pinned": True,
        "ttl": 60, "max_context": 1024}]), demo_path=tmp_path / "demo")
    assert registry.ids == ["smol"]  # configured models replace the demo default
    assert registry.default_id == "smol"
    spec = registry.resolve("gpt-4o")
    assert spec is registry.resolve("tiny") is registry.resolve("smol")
    assert (spec.source, spec.format, spec.pinned, spec.ttl) == ("config", "mlx", True, 60)
    assert spec.weight_bytes == 5000
    assert spec.kv_bytes_per_token == KV_PER_TOKEN
    assert spec.context_length == 1024 and spec.max_context == 1024
    assert spec.estimated_bytes == 5000 + KV_PER_TOKEN * 1024
    assert spec.load_path == str(folder)


def test_context_defaults_to_the_models_own_and_float32_doubles_kv(tmp_path: Path) -> None:
    folder = mlx_folder(tmp_path / "m", config={**LLAMA_CONFIG, "torch_dtype": "float32"})
    spec = ModelRegistry.build(settings(tmp_path, models=[{"id": "f32", "path": str(folder)}]),
                               demo_path=None).resolve("f32")
    assert spec.context_length == 8192
    assert spec.kv_bytes_per_token == 2 * KV_PER_TOKEN


def test_missing_configured_path_is_kept_with_a_warning(tmp_path: Path) -> None:
    registry = ModelRegistry.build(settings(tmp_path, models=[
        {"id": "gone", "path": str(tmp_path / "nowhere")}]), demo_path=None)
    assert registry.ids == ["gone"]
    assert any("does not exist" in w for w in registry.warnings)


# --- discovery -----------------------------------------------------------------------------------


def test_discovers_every_layout_with_readable_ids(tmp_path: Path) -> None:
    root = tmp_path / "models"
    mlx_folder(root / "my-mlx-model", weights=100)
    gguf_file(root / "loose-model.Q4_0.gguf")
    (root / "notes.txt").parent.mkdir(parents=True, exist_ok=True)
    (root / "notes.txt").write_text("not a model")
    mlx_folder(root / "mlx-community" / "Qwen-0.5B-4bit", weights=200)
    gguf_file(root / "lmstudio-community" / "Llama-GGUF" / "Llama-Q4_K_M.gguf")
    gguf_file(root / "lmstudio-community" / "Llama-GGUF" / "mmproj-model-f16.gguf")
    gguf_file(root / "bartowski" / "Multi-GGUF" / "Multi-Q4.gguf")
    gguf_file(root / "bartowski" / "Multi-GGUF" / "Multi-Q8.gguf")
    (root / ".hidden").mkdir()
    mlx_folder(root / ".hidden" / "secret")

    registry = ModelRegistry.build(settings(tmp_path, dirs=[root]), demo_path=tmp_path / "demo")
    by_id = {spec.id: spec for spec in registry}
    assert sorted(by_id) == sorted([
        "my-mlx-model", "loose-model.Q4_0", "mlx-community/Qwen-0.5B-4bit",
        "lmstudio-community/Llama-GGUF", "Multi-Q4", "Multi-Q8"])
    assert DEMO_MODEL_ID not in by_id  # something was discovered
    assert (by_id["my-mlx-model"].source, by_id["my-mlx-model"].format) == ("mlx", "mlx")
    assert by_id["my-mlx-model"].weight_bytes == 100
    assert (by_id["loose-model.Q4_0"].source, by_id["loose-model.Q4_0"].format) == ("gguf", "gguf")
    qwen = by_id["mlx-community/Qwen-0.5B-4bit"]
    assert (qwen.source, qwen.format, qwen.weight_bytes) == ("lmstudio", "mlx", 200)
    llama = by_id["lmstudio-community/Llama-GGUF"]
    assert llama.format == "gguf" and llama.path.name == "Llama-Q4_K_M.gguf"
    assert by_id["Multi-Q8"].source == "lmstudio"
    assert registry.warnings == []


def test_hf_cache_prefers_refs_main_and_follows_symlinks_for_sizes(tmp_path: Path) -> None:
    hub = tmp_path / "hub"
    entry = hub / "models--mlx-community--SmolLM2-135M-Instruct-4bit"
    blobs = entry / "blobs"
    blobs.mkdir(parents=True)
    (blobs / "weights").write_bytes(b"\0" * 4321)
    (blobs / "config").write_text(json.dumps(LLAMA_CONFIG))
    for rev in ("aaa111", "bbb222"):
        snap = entry / "snapshots" / rev
        snap.mkdir(parents=True)
        (snap / "config.json").symlink_to(blobs / "config")
        (snap / "model.safetensors").symlink_to(blobs / "weights")
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text("aaa111\n")
    os.utime(entry / "snapshots" / "bbb222", (2e9, 2e9))  # newer, but refs/main wins

    spec = ModelRegistry.build(settings(tmp_path, dirs=[hub]), demo_path=None).resolve(
        "mlx-community/SmolLM2-135M-Instruct-4bit")
    assert spec.source == "hf-cache" and spec.format == "mlx"
    assert spec.path == entry / "snapshots" / "aaa111"
    assert spec.weight_bytes == 4321
    assert spec.kv_bytes_per_token == KV_PER_TOKEN


def test_hf_cache_without_refs_takes_the_newest_snapshot(tmp_path: Path) -> None:
    entry = tmp_path / "hub" / "models--org--name"
    old = mlx_folder(entry / "snapshots" / "old")
    new = mlx_folder(entry / "snapshots" / "new")
    os.utime(old, (1e9, 1e9))
    os.utime(new, (2e9, 2e9))
    spec = ModelRegistry.build(settings(tmp_path, dirs=[tmp_path / "hub"]),
                               demo_path=None).resolve("org/name")
    assert spec.path == new


def test_hf_cache_refs_main_cannot_point_outside_snapshots(tmp_path: Path) -> None:
    entry = tmp_path / "hub" / "models--org--name"
    only = mlx_folder(entry / "snapshots" / "abc")
    mlx_folder(tmp_path / "outside")
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text("../../../outside")
    spec = ModelRegistry.build(settings(tmp_path, dirs=[tmp_path / "hub"]),
                               demo_path=None).resolve("org/name")
    assert spec.path == only


def test_model_dir_that_is_itself_an_mlx_folder(tmp_path: Path) -> None:
    folder = mlx_folder(tmp_path / "Phi-mini")
    registry = ModelRegistry.build(settings(tmp_path, dirs=[folder]), demo_path=None)
    assert registry.ids == ["Phi-mini"]


def test_missing_model_dir_is_a_warning(tmp_path: Path) -> None:
    registry = ModelRegistry.build(settings(tmp_path, dirs=[tmp_path / "absent"]),
                                   demo_path=tmp_path / "demo")
    assert registry.ids == [DEMO_MODEL_ID]
    assert any("absent" in w and "not a folder" in w for w in registry.warnings)


def test_gguf_metadata_gives_the_kv_estimate(tmp_path: Path) -> None:
    path = gguf_file(tmp_path / "m" / "tiny.gguf", padding=1000)
    spec = ModelRegistry.build(settings(tmp_path, dirs=[tmp_path / "m"]),
                               demo_path=None).resolve("tiny")
    # layers * kv heads * (key + value head dim) * 2 bytes; head dim = 256 / 8
    assert spec.kv_bytes_per_token == 4 * 2 * (32 + 32) * 2
    assert spec.context_length == 2048
    assert spec.weight_bytes == path.stat().st_size


def test_corrupt_gguf_is_listed_with_fallback_estimates(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "broken.gguf").write_bytes(b"GGUF\x03\0\0\0garbage")
    spec = ModelRegistry.build(settings(tmp_path, dirs=[tmp_path / "m"]),
                               demo_path=None).resolve("broken")
    assert spec.kv_bytes_per_token == 0 and spec.context_length == 4096


@pytest.mark.skipif(not DEMO_GGUF.is_file(), reason="demo GGUF not present")
def test_real_demo_gguf_sizes(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "demo.gguf").symlink_to(DEMO_GGUF)
    spec = ModelRegistry.build(settings(tmp_path, dirs=[tmp_path / "m"]),
                               demo_path=None).resolve("demo")
    # 30 layers x 3 KV heads x (64 + 64) head dims x 2 bytes (float16)
    assert spec.kv_bytes_per_token == 30 * 3 * 128 * 2
    assert spec.context_length == 8192


# --- duplicates and resolution -------------------------------------------------------------------


def test_duplicates_are_reported_and_the_first_wins(tmp_path: Path) -> None:
    a, b = mlx_folder(tmp_path / "a"), mlx_folder(tmp_path / "b")
    root = tmp_path / "dir"
    mlx_folder(root / "smol")  # discovered id collides with the configured one
    registry = ModelRegistry.build(settings(tmp_path, models=[
        {"id": "smol", "path": str(a), "aliases": ["fast"]},
        {"id": "other", "path": str(b), "aliases": ["fast", "other2", "smol"]},
    ], dirs=[root]), demo_path=None)
    assert registry.ids == ["smol", "other"]
    assert registry.resolve("smol").path == a
    assert registry.resolve("fast").id == "smol"
    assert registry.resolve("other").aliases == ("other2",)
    assert len(registry.warnings) == 3
    assert any("duplicate model id 'smol'" in w for w in registry.warnings)
    assert any("duplicate alias 'fast'" in w for w in registry.warnings)
    assert any("duplicate alias 'smol'" in w for w in registry.warnings)


@pytest.mark.parametrize("name", [
    "../../etc/passwd", "/etc/passwd", "smol/../smol", "./smol", "SMOL", " smol", "",
    "~/models/smol", "smol\x00",
])
def test_only_exact_ids_and_aliases_resolve(tmp_path: Path, name: str) -> None:
    folder = mlx_folder(tmp_path / "smol")
    registry = ModelRegistry.build(settings(tmp_path, models=[
        {"id": "smol", "path": str(folder)}]), demo_path=None)
    with pytest.raises(ModelNotFound) as caught:
        registry.resolve(name)
    error = caught.value
    assert error.status == 404
    assert error.param == "model" and error.code == "model_not_found"
    assert "Available: smol." in error.message


def test_not_found_lists_a_few_ids_and_counts_the_rest(tmp_path: Path) -> None:
    root = tmp_path / "many"
    for i in range(12):
        mlx_folder(root / f"m{i:02d}")
    registry = ModelRegistry.build(settings(tmp_path, dirs=[root]), demo_path=None)
    with pytest.raises(ModelNotFound) as caught:
        registry.resolve("x" * 5000)
    message = caught.value.message
    assert "m00, m01" in message and "and 4 more" in message
    assert len(message) < 400  # the request's string is truncated, not echoed whole


# --- table and CLI -------------------------------------------------------------------------------


def test_format_table(tmp_path: Path) -> None:
    folder = mlx_folder(tmp_path / "m", weights=82_400_000 // 1000)
    gguf_file(tmp_path / "dir" / "tiny.gguf")
    registry = ModelRegistry.build(settings(tmp_path, models=[
        {"id": "smol", "path": str(folder), "pinned": True, "aliases": ["a1"]}],
        dirs=[tmp_path / "dir"]), demo_path=None)
    lines = format_table(registry).splitlines()
    assert lines[0].split() == ["ID", "SOURCE", "FORMAT", "SIZE", "MEMORY", "CONTEXT", "PINNED",
                                "ALIASES"]
    assert lines[1].split()[:3] == ["smol", "config", "mlx"]
    assert "82.4 KB" in lines[1] and lines[1].split()[-2:] == ["yes", "a1"]
    assert lines[2].split()[:3] == ["tiny", "gguf", "gguf"]
    assert lines[2].split()[-2:] == ["no", "-"]
    # Columns line up: every row starts its SOURCE cell at the same offset.
    offset = lines[0].index("SOURCE")
    assert lines[1][offset:].startswith("config") and lines[2][offset:].startswith("gguf")


def test_format_table_empty(tmp_path: Path) -> None:
    registry = ModelRegistry.build(settings(tmp_path), demo_path=None)
    assert "no models" in format_table(registry)


def test_models_list_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = mlx_folder(tmp_path / "m")
    config = tmp_path / "config.toml"
    config.write_text(
        f'cache_dir = "{tmp_path / "cache"}"\n'
        f'[[models]]\nid = "smol"\npath = "{folder}"\n'
        f'[[models]]\nid = "smol"\npath = "{folder}"\n')
    assert main(["models", "list", "--config", str(config)]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines()[1].split()[:3] == ["smol", "config", "mlx"]
    assert len(out.splitlines()) == 2
    assert "duplicate model id 'smol'" in err


def test_models_list_command_bad_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "list", "--config", str(tmp_path / "missing.toml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_hf_cache_root_above_hub_and_config_folder_with_one_gguf(tmp_path: Path) -> None:
    mlx_folder(tmp_path / "huggingface" / "hub" / "models--org--name" / "snapshots" / "r1")
    gguf = gguf_file(tmp_path / "lm" / "one" / "model-Q4.gguf")
    registry = ModelRegistry.build(settings(tmp_path, models=[
        {"id": "one", "path": str(gguf.parent)}], dirs=[tmp_path / "huggingface"]),
        demo_path=None)
    assert registry.ids == ["one", "org/name"]
    assert registry.resolve("one").path == gguf
    assert registry.resolve("one").format == "gguf"
    assert registry.warnings == []


def test_sampling_defaults_from_generation_config_then_the_entry(tmp_path: Path) -> None:
    folder = mlx_folder(tmp_path / "qwen")
    (folder / "generation_config.json").write_text(json.dumps(
        {"do_sample": True, "temperature": 0.6, "top_k": 20, "top_p": 0.95, "eos_token_id": 2}))
    plain = mlx_folder(tmp_path / "plain")
    registry = ModelRegistry.build(settings(tmp_path, models=[
        {"id": "qwen", "path": str(folder), "sampling": {"temperature": 0.2}},
        {"id": "plain", "path": str(plain)}]), demo_path=None)
    assert dict(registry.resolve("qwen").sampling) == {
        "temperature": 0.2, "top_p": 0.95, "top_k": 20.0}
    assert registry.resolve("plain").sampling == ()


def test_model_defaults_fill_only_what_the_request_left_out() -> None:
    from app.core.types import SamplingParams

    asked = SamplingParams(temperature=0.9, top_k=0, unset=frozenset({"top_k", "top_p"}))
    filled = asked.with_defaults({"temperature": 0.2, "top_k": 20.0, "top_p": 0.95})
    assert (filled.temperature, filled.top_k, filled.top_p) == (0.9, 20, 0.95)
    assert isinstance(filled.top_k, int)
    assert SamplingParams().with_defaults({"temperature": 0.2}).temperature == 1.0
