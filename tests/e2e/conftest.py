"""Fixtures that start real servers with the real demo model."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.e2e.gateway_process import GatewayProcess

DEMO_ID = "smollm2-135m-instruct"


@pytest.fixture(scope="session")
def demo_model_dir() -> Path:
    """The converted demo model (`mlx-gateway models demo`); MLXGW_TEST_MODEL_DIR overrides."""
    override = os.environ.get("MLXGW_TEST_MODEL_DIR")
    if override:
        return Path(override)
    from app.engine.demo import ensure_demo_model

    from app.settings import load_settings

    return ensure_demo_model(load_settings().cache_dir)


@pytest.fixture(scope="session")
def gateway(tmp_path_factory: pytest.TempPathFactory, demo_model_dir: Path
            ) -> Iterator[GatewayProcess]:
    """The gateway with auth off on loopback, the demo model, and a short-context alias."""
    workdir = tmp_path_factory.mktemp("gateway")
    config = {
        "auth": {"enabled": False},
        "server": {"heartbeat_seconds": 1.0},
        "models": [
            {"id": DEMO_ID, "path": str(demo_model_dir)},
            # Same weights, tiny context: cheap way to exercise context-length errors.
            {"id": "smollm2-short", "path": str(demo_model_dir), "max_context": 48},
        ],
    }
    server = GatewayProcess(workdir, config).start()
    yield server
    server.stop()


@pytest.fixture
def client(gateway: GatewayProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.base_url + "/v1", api_key="unused", max_retries=0)
