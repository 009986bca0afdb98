"""The disk prefix cache with the real demo model: a restarted engine (in process) and a
restarted `mlx-gateway serve` (a real process, SIGTERM then start again) serve a repeated
prompt from disk, answering as a cold run does; another owner does not get it; a changed
model file invalidates it."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import REGISTRY

from app.core.types import ChatMessage, Finish, GenerationRequest, SamplingParams
from app.engine.engine import Engine
from app.models.registry import ModelRegistry
from app.settings import Settings
from tests.e2e.conftest import DEMO_ID
from tests.e2e.gateway_process import GatewayProcess

pytestmark = pytest.mark.e2e
DISK = {"prompt_cache_bytes": "256MB", "disk_cache_bytes": "1GB", "disk_cache_min_tokens": 128,
        # cpu_tuning's side stream belongs to the first MLX thread of a process (see
        # test_prefix_cache); the gateway process below runs with it.
        "cpu_tuning": False}


def conversation() -> list[ChatMessage]:
    """~400 tokens nobody sent before (a fresh nonce)."""
    nonce = uuid.uuid4().hex[:8]
    messages = [ChatMessage("system", f"Session {nonce}. You keep a logbook of animals.")]
    for i in range(10):
        messages.append(ChatMessage("user", f"Log note {i}: a heron carried {i + 3} stones "
                                            f"to the mill near the marsh."))
        messages.append(ChatMessage("assistant", f"Logged note {i}."))
    messages.append(ChatMessage("user", "Which note had the most stones?"))
    return messages


def disk_hits() -> float:
    value = REGISTRY.get_sample_value("mlxgw_prefix_disk_lookups_total", {"outcome": "hit"})
    return value or 0.0


async def answer(settings: Settings, messages: list[ChatMessage], owner: str
                 ) -> tuple[str, Finish]:
    """One request on a freshly started engine, stopped after (a gateway's life in small)."""
    engine = Engine(settings, ModelRegistry.build(settings, demo_path=None))
    await engine.start()
    try:
        stream = await engine.submit(GenerationRequest(
            model=DEMO_ID, request_id=uuid.uuid4().hex, messages=messages, max_tokens=12,
            sampling=SamplingParams(temperature=0.0), owner=owner))
        return await stream.collect()
    finally:
        await engine.stop()


@pytest.fixture
def model_dir(tmp_path: Path, demo_float32_dir: Path) -> Path:
    """The float32 demo weights behind links, with a config.json of its own to change."""
    folder = tmp_path / "model"
    folder.mkdir()
    for file in demo_float32_dir.iterdir():
        if file.name == "config.json":
            (folder / file.name).write_bytes(file.read_bytes())
        else:
            (folder / file.name).symlink_to(file)
    return folder


async def test_a_restarted_engine_serves_the_prompt_from_disk(tmp_path: Path,
                                                              model_dir: Path) -> None:
    settings = Settings(models=[{"id": DEMO_ID, "path": model_dir}],  # type: ignore[list-item]
                        engine=DISK, cache_dir=tmp_path / "cache")  # type: ignore[arg-type]
    messages = conversation()
    cold_text, cold = await answer(settings, messages, "alice")
    assert cold.usage.cached_tokens == 0 and cold.usage.prompt_tokens > 256
    assert list((tmp_path / "cache" / "prefix-cache").glob("*.safetensors"))

    hits = disk_hits()
    text, warm = await answer(settings, messages, "alice")
    assert warm.usage.cached_tokens == warm.usage.prompt_tokens - 1
    assert text == cold_text and disk_hits() == hits + 1

    other_text, other = await answer(settings, messages, "bob")  # another key: nothing reused
    assert other.usage.cached_tokens == 0 and other_text == cold_text

    config = model_dir / "config.json"  # the model's files change: the entries are dropped
    stat = config.stat()
    os.utime(config, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    changed_text, changed = await answer(settings, messages, "alice")
    assert changed.usage.cached_tokens == 0 and changed_text == cold_text
    assert disk_hits() == hits + 1


def _chat(server: GatewayProcess, messages: list[dict[str, Any]]) -> dict[str, Any]:
    response = httpx.post(server.base_url + "/v1/chat/completions", timeout=300, json={
        "model": DEMO_ID, "messages": messages, "max_tokens": 12, "temperature": 0})
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def test_a_restarted_gateway_serves_the_prompt_from_disk(tmp_path: Path,
                                                         demo_float32_dir: Path) -> None:
    config = {"auth": {"enabled": False}, "limits": {"per_ip_rpm": 0},
              "engine": {**DISK, "cpu_tuning": True},
              "models": [{"id": DEMO_ID, "path": str(demo_float32_dir), "pinned": True}]}
    messages = [{"role": m.role, "content": m.content} for m in conversation()]
    server = GatewayProcess(tmp_path, config).start()
    try:
        cold = _chat(server, messages)
    finally:
        server.stop()
    assert cold["usage"]["prompt_tokens_details"]["cached_tokens"] == 0

    server = GatewayProcess(tmp_path, config, port=server.port).start()
    try:
        warm = _chat(server, messages)
        metrics = httpx.get(server.base_url + "/metrics", timeout=10).text
    finally:
        server.stop()
    usage = warm["usage"]
    assert usage["prompt_tokens_details"]["cached_tokens"] == usage["prompt_tokens"] - 1
    assert warm["choices"][0]["message"]["content"] == cold["choices"][0]["message"]["content"]
    assert 'mlxgw_prefix_disk_lookups_total{outcome="hit"} 1.0' in metrics
