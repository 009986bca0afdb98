"""Model residency end to end: three real models (the demo's 4-bit, float16 and float32
weights) under a memory budget that holds any two of them."""

from __future__ import annotations

import concurrent.futures
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.models.variants import make_float_variant
from tests.e2e.gateway_process import GatewayProcess

pytestmark = pytest.mark.e2e
ASK = [{"role": "user", "content": "What is the capital of France?"}]
# With max_context 512 and a 10 MB prefix cache each, the models are charged about 120 MB
# (4-bit), 291 MB (float16) and 572 MB (float32): any two fit in 900 MB, all three do not.
BUDGET = "900MB"
CONTEXT = 512


@pytest.fixture(scope="session")
def variants(tmp_path_factory: pytest.TempPathFactory, demo_model_dir: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("variants")
    return {
        "q4": demo_model_dir,
        "f16": make_float_variant(demo_model_dir, root / "f16", "float16", exist_ok=True),
        "f32": make_float_variant(demo_model_dir, root / "f32", "float32", exist_ok=True),
    }


def start(workdir: Path, models: list[dict[str, Any]], **residency: Any) -> GatewayProcess:
    return GatewayProcess(workdir, {
        "auth": {"enabled": False},
        "residency": {"memory_budget": BUDGET, "max_loaded_models": 3, "default_ttl": 0,
                      "load_wait": 3, **residency},
        "limits": {"per_ip_rpm": 0},
        # Three real sizes: the 4-bit model is served as it is, not from its float32 copy.
        "engine": {"prompt_cache_bytes": "10MB", "cpu_dequantize": False},
        "models": models,
    }).start()


def chat(server: GatewayProcess, model: str, max_tokens: int = 4) -> httpx.Response:
    return httpx.post(server.base_url + "/v1/chat/completions", timeout=300, json={
        "model": model, "messages": ASK, "max_tokens": max_tokens, "temperature": 0})


def states(server: GatewayProcess) -> dict[str, dict[str, Any]]:
    data = httpx.get(server.base_url + "/v1/models").json()["data"]
    return {m["id"]: m for m in data}


def loaded(server: GatewayProcess) -> set[str]:
    return {m for m, state in states(server).items() if state["loaded"]}


def metric(server: GatewayProcess, name: str, **labels: str) -> float:
    text = httpx.get(server.base_url + "/metrics").text
    selector = "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else ""
    match = re.search(rf"^{re.escape(name + selector)} (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory, variants: dict[str, Path]
         ) -> Iterator[GatewayProcess]:
    broken = tmp_path_factory.mktemp("broken")
    (broken / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    (broken / "model.safetensors").write_bytes(b"not really safetensors")
    server = start(tmp_path_factory.mktemp("pool"), [
        *({"id": name, "path": str(path), "max_context": CONTEXT}
          for name, path in variants.items()),
        {"id": "q4-brief", "path": str(variants["q4"]), "max_context": CONTEXT, "ttl": 2},
        {"id": "broken", "path": str(broken)},
        {"id": "too-big", "path": str(variants["f32"])},  # 8k context: ~915 MB alone
    ], load_wait=300)  # parallel requests wait for each other's leases here, never fail
    yield server
    server.stop()


def test_models_list_shows_residency_fields(pool: GatewayProcess) -> None:
    q4 = states(pool)["q4"]
    assert {"loaded", "size_bytes", "pinned", "last_used"} <= set(q4)
    assert 110_000_000 < q4["size_bytes"] < 140_000_000


def test_lru_eviction_in_turn(pool: GatewayProcess) -> None:
    for model in ("q4", "f16", "f32"):
        response = chat(pool, model)
        assert response.status_code == 200, response.text
        assert response.json()["model"] == model
    # All three do not fit: the least recently used (q4) made room for f32.
    assert loaded(pool) == {"f16", "f32"}
    assert chat(pool, "q4").status_code == 200
    assert loaded(pool) == {"f32", "q4"}  # f16 was now the least recently used


def test_parallel_requests_across_models_all_succeed(pool: GatewayProcess) -> None:
    models = ["q4", "f16", "f32", "q4", "f16", "f32"]
    with concurrent.futures.ThreadPoolExecutor(len(models)) as threads:
        responses = list(threads.map(lambda m: chat(pool, m, 6), models))
    assert [r.status_code for r in responses] == [200] * len(models), \
        [r.text for r in responses if r.status_code != 200]
    assert [r.json()["model"] for r in responses] == models
    assert len(loaded(pool)) == 2


def test_concurrent_first_requests_share_one_load(pool: GatewayProcess) -> None:
    httpx.post(pool.base_url + "/v1/models/f16/unload").raise_for_status()
    assert "f16" not in loaded(pool)
    before = metric(pool, "mlxgw_model_loads_total", result="ok")
    with concurrent.futures.ThreadPoolExecutor(4) as threads:
        responses = list(threads.map(lambda _: chat(pool, "f16"), range(4)))
    assert [r.status_code for r in responses] == [200] * 4
    assert metric(pool, "mlxgw_model_loads_total", result="ok") == before + 1


def test_idle_ttl_evicts(pool: GatewayProcess) -> None:
    before = metric(pool, "mlxgw_model_evictions_total", reason="ttl")
    assert chat(pool, "q4-brief").status_code == 200
    assert "q4-brief" in loaded(pool)
    deadline = time.monotonic() + 30
    while "q4-brief" in loaded(pool):
        assert time.monotonic() < deadline, "TTL eviction did not happen"
        time.sleep(0.5)
    assert metric(pool, "mlxgw_model_evictions_total", reason="ttl") == before + 1


def test_failed_load_is_clear_and_the_server_keeps_serving(pool: GatewayProcess) -> None:
    response = chat(pool, "broken")
    assert response.status_code == 503
    error = response.json()["error"]
    assert error["code"] == "model_load_failed" and "broken" in error["message"]
    assert chat(pool, "q4").status_code == 200


def test_model_that_can_never_fit_gets_507(pool: GatewayProcess) -> None:
    response = chat(pool, "too-big")
    assert response.status_code == 507
    error = response.json()["error"]
    assert error["code"] == "insufficient_memory"
    assert "too-big" in error["message"] and "memory_budget" in error["message"]


def test_load_and_evict_twenty_times_does_not_grow_memory(pool: GatewayProcess) -> None:
    def cycle() -> None:
        httpx.post(pool.base_url + "/v1/models/q4/load", timeout=120).raise_for_status()
        unloaded = httpx.post(pool.base_url + "/v1/models/q4/unload", timeout=120).json()
        assert unloaded["unloaded"] is True and unloaded["loaded"] is False

    for _ in range(3):  # warm-up: allocator pools and imports settle
        cycle()
    rss_start = metric(pool, "process_resident_memory_bytes")
    mlx_start = metric(pool, "mlxgw_mlx_active_bytes")
    for _ in range(20):
        cycle()
    rss_growth = metric(pool, "process_resident_memory_bytes") - rss_start
    assert rss_growth < 40_000_000, f"RSS grew {rss_growth / 1e6:.1f} MB over 20 cycles"
    assert metric(pool, "mlxgw_mlx_active_bytes") <= mlx_start + 1_000_000
    assert metric(pool, "mlxgw_evicted_reclaimed_bytes_total") > 20 * 50_000_000


def test_pinned_model_stays_and_leases_block_eviction(
        tmp_path: Path, variants: dict[str, Path]) -> None:
    server = start(tmp_path, [
        {"id": "q4", "path": str(variants["q4"]), "max_context": CONTEXT, "pinned": True},
        {"id": "f16", "path": str(variants["f16"]), "max_context": CONTEXT},
        {"id": "f32", "path": str(variants["f32"]), "max_context": CONTEXT},
    ], load_wait=2)
    try:
        assert loaded(server) == {"q4"}  # pinned models load at start
        assert states(server)["q4"]["pinned"] is True
        for model in ("f16", "f32", "f16"):
            assert chat(server, model).status_code == 200
            assert "q4" in loaded(server)
        # f32 is busy streaming (a lease) and f16 cannot fit beside it and the pinned q4:
        # the request waits load_wait seconds, then gets 503 naming who holds the memory.
        story = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]
        with httpx.stream("POST", server.base_url + "/v1/chat/completions", timeout=300, json={
                "model": "f32", "messages": story, "max_tokens": 400, "stream": True,
                "temperature": 0}) as busy:
            lines = busy.iter_lines()
            next(line for line in lines if '"content":"' in line)
            assert states(server)["f32"]["in_flight"] == 1
            refused = chat(server, "f16")
        assert refused.status_code == 503, refused.text
        assert 1 <= int(refused.headers["retry-after"]) <= 60
        message = refused.json()["error"]["message"]
        assert "f32" in message and "q4" in message
        assert loaded(server) >= {"q4"}
    finally:
        server.stop()
