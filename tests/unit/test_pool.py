"""ModelPool's event-loop side with the MLX work replaced by a scripted stand-in: what a
cancelled load, a failing sweep and the warm-up leave behind (issue 13, item 13)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from app.engine.residency.pool import LoadedModel, ModelPool
from app.errors import ModelLoadFailed
from app.models.registry import ModelRegistry, ModelSpec
from app.settings import Settings


class ScriptedThread:
    """Stands in for the MLX thread: each call waits until the test lets it finish."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.calls = 0

    async def call(self, fn: Any) -> Any:
        self.calls += 1
        await self.gate.wait()
        return fn()


class Pool(ModelPool):
    def _load_on_thread(self, spec: ModelSpec) -> LoadedModel:
        return LoadedModel(spec=spec, batch=None, tokenizer=None,  # type: ignore[arg-type]
                           context_length=64)

    def _unload_on_thread(self, model_id: str) -> int:
        if model_id == "broken":
            raise RuntimeError("unload blew up")
        return 0


def make_pool(tmp_path: Path, *ids: str, ttl: float = 0) -> tuple[Pool, ScriptedThread]:
    models = []
    for model_id in ids:
        folder = tmp_path / model_id
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"max_position_embeddings": 64}))
        (folder / "model.safetensors").write_bytes(b"\0" * 1000)
        models.append({"id": model_id, "path": str(folder), "ttl": ttl})
    settings = Settings(config_dir=tmp_path, cache_dir=tmp_path / "cache", models=models,
                        residency={"memory_budget": "10GB"}, engine={"prompt_cache_bytes": 0})
    thread = ScriptedThread()
    return Pool(settings, ModelRegistry.from_settings(settings), thread), thread  # type: ignore[arg-type]


async def test_a_cancelled_requester_neither_leaks_the_reservation_nor_strands_waiters(
        tmp_path: Path) -> None:
    pool, thread = make_pool(tmp_path, "m")
    first = asyncio.ensure_future(pool.acquire("m"))
    await asyncio.sleep(0.01)
    second = asyncio.ensure_future(pool.acquire("m"))  # shares the load under way
    await asyncio.sleep(0.01)
    first.cancel()  # the first client went away mid-load
    await asyncio.sleep(0.01)
    thread.gate.set()
    loaded = await asyncio.wait_for(second, 5)  # used to wait forever
    assert loaded.id == "m" and thread.calls == 1
    with pytest.raises(asyncio.CancelledError):
        await first
    resident = pool.policy.get("m")
    assert resident is not None and resident.leases == 1  # only the second's lease
    pool.release(loaded)
    assert pool.policy.get("m").leases == 0  # type: ignore[union-attr]


async def test_a_load_cancelled_at_shutdown_frees_its_memory_and_fails_waiters(
        tmp_path: Path) -> None:
    pool, _ = make_pool(tmp_path, "m")
    waiter = asyncio.ensure_future(pool.acquire("m"))
    await asyncio.sleep(0.01)
    assert pool.policy.used_bytes > 0  # reserved while loading
    await pool.close()  # cancels the load task
    with pytest.raises(ModelLoadFailed, match="stopping"):
        await asyncio.wait_for(waiter, 5)
    assert pool.policy.used_bytes == 0 and pool.policy.get("m") is None


async def test_the_idle_sweeper_survives_a_failed_eviction(tmp_path: Path) -> None:
    pool, thread = make_pool(tmp_path, "broken", "m", ttl=0.05)
    thread.gate.set()
    for model_id in ("broken", "m"):
        pool.release(await pool.acquire(model_id))
    with capture_logs() as logs:
        sweeper = asyncio.ensure_future(pool.sweep_idle())
        try:
            for _ in range(100):
                if not pool.loaded():
                    break
                await asyncio.sleep(0.05)
            assert not sweeper.done()  # used to die on the first error
        finally:
            sweeper.cancel()
    assert pool.loaded() == {}  # "m" expired too, whatever the order
    assert any(entry["event"].startswith("idle sweep failed") for entry in logs)


async def test_warm_up_failures_are_logged(tmp_path: Path) -> None:
    from app.http.app import _warm_default_model

    class Engine:
        async def ensure_loaded(self, model_id: str) -> None:
            raise ModelLoadFailed(f"model {model_id!r} failed to load: no weights")

    registry = make_pool(tmp_path, "m")[0].registry
    with capture_logs() as logs:
        await _warm_default_model(Engine(), registry)  # type: ignore[arg-type]
    failed = [e for e in logs if e["event"] == "warm-up load failed"]
    assert failed and failed[0]["model"] == "m" and "no weights" in failed[0]["error"]
