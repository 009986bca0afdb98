"""Fixtures that start real servers with the real demo model."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.e2e.gateway_process import GatewayProcess

DEMO_ID = "smollm2-135m-instruct"
THINKING_ID = "smollm2-thinking"


@pytest.fixture(scope="session")
def demo_model_dir() -> Path:
    """The converted demo model (`mlx-gateway models demo`); MLXGW_TEST_MODEL_DIR overrides."""
    override = os.environ.get("MLXGW_TEST_MODEL_DIR")
    if override:
        return Path(override)
    from app.models.demo import ensure_demo_model
    from app.settings import load_settings

    return ensure_demo_model(load_settings().cache_dir)


@pytest.fixture(scope="session")
def demo_float32_dir(demo_model_dir: Path) -> Path:
    """The demo model's weights dequantized to float32, made once into the cache.

    Same model, same answers; on a CPU with OpenBLAS its prefill is about ten times faster
    than the 4-bit kernels', which keeps the suite short. The 4-bit folder itself is served
    by the security, residency and demo-model tests.
    """
    from app.models.variants import make_float_variant

    target = demo_model_dir.parent / f"{demo_model_dir.name}-float32"
    return make_float_variant(demo_model_dir, target, "float32", exist_ok=True)


@pytest.fixture(scope="session")
def demo_thinking_dir(tmp_path_factory: pytest.TempPathFactory, demo_float32_dir: Path) -> Path:
    """The demo weights under a Qwen3-style template that opens a think block when
    `enable_thinking` is true (mlx-lm passes false for a vocabulary without think tokens) or a
    reasoning effort is asked for: a reasoning model as far as the gateway can tell. (The demo
    model itself never closes the block; what closes it is the gateway's thinking budget.)"""
    target = tmp_path_factory.mktemp("thinking") / "smollm2-thinking"
    target.mkdir()
    for item in demo_float32_dir.iterdir():
        if item.name != "tokenizer_config.json":
            (target / item.name).symlink_to(item)
    config = json.loads((demo_float32_dir / "tokenizer_config.json").read_text())
    config["chat_template"] += (
        "{% if add_generation_prompt and (enable_thinking is not defined or enable_thinking or "
        "(reasoning_effort is defined and reasoning_effort != 'none')) %}{{ '<think>\\n' }}"
        "{% endif %}")
    (target / "tokenizer_config.json").write_text(json.dumps(config))
    return target


@pytest.fixture(scope="session")
def gateway(tmp_path_factory: pytest.TempPathFactory, demo_float32_dir: Path,
            demo_thinking_dir: Path) -> Iterator[GatewayProcess]:
    """The gateway with auth off on loopback, the demo model, and a short-context alias."""
    workdir = tmp_path_factory.mktemp("gateway")
    config = {
        "auth": {"enabled": False},
        "server": {"heartbeat_seconds": 0.2},
        "engine": {"default_max_tokens": 32},
        # Protocol tests and the fuzzer send hundreds of requests a minute from one address;
        # limits have fixtures of their own (test_security, test_operations).
        "limits": {"per_ip_rpm": 0},
        "models": [
            {"id": DEMO_ID, "path": str(demo_float32_dir)},
            # Same weights, tiny context: cheap way to exercise context-length errors.
            {"id": "smollm2-short", "path": str(demo_float32_dir), "max_context": 48},
            {"id": THINKING_ID, "path": str(demo_thinking_dir)},
        ],
    }
    server = GatewayProcess(workdir, config).start()
    yield server
    server.stop()


@pytest.fixture
def client(gateway: GatewayProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.base_url + "/v1", api_key="unused", max_retries=0)
