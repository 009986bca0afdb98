"""`mlx-gateway serve` started without the OpenBLAS settings re-executes itself with them."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import httpx
import pytest

from app.ops.system_blas import (
    FALLBACK_KERNELS,
    OPENBLAS,
    THREAD_TIMEOUT,
    best_kernels,
    cpu_flags,
    kernels_for_this_cpu,
    kernels_loaded_with,
    with_system_blas,
)
from tests.e2e.conftest import DEMO_ID
from tests.e2e.gateway_process import GatewayProcess

pytestmark = pytest.mark.skipif(not (sys.platform.startswith("linux") and OPENBLAS.exists()),
                                reason="needs Debian's OpenBLAS (Linux)")


def test_serve_preloads_the_system_openblas_into_itself(tmp_path: Path,
                                                        demo_model_dir: Path) -> None:
    server = GatewayProcess(tmp_path, {
        "auth": {"enabled": False},
        "models": [{"id": DEMO_ID, "path": str(demo_model_dir)}],
    })
    for name in ("LD_PRELOAD", "OPENBLAS_THREAD_TIMEOUT", "OPENBLAS_CORETYPE"):
        server.env.pop(name, None)
    server.start()
    try:
        assert server.process is not None
        proc = Path(f"/proc/{server.process.pid}")  # execve keeps the pid
        environ = dict(entry.split("=", 1) for entry in
                       (proc / "environ").read_text().split("\0") if "=" in entry)
        assert OPENBLAS.as_posix() in environ["LD_PRELOAD"].split(":")
        assert environ["OPENBLAS_THREAD_TIMEOUT"] == THREAD_TIMEOUT
        assert environ.get("OPENBLAS_CORETYPE") == kernels_for_this_cpu()
        assert "openblas" in (proc / "maps").read_text()
        answer = httpx.post(server.base_url + "/v1/chat/completions", timeout=120, json={
            "model": DEMO_ID, "max_tokens": 12, "temperature": 0,
            "messages": [{"role": "user", "content": "What is the capital of France?"}]})
        assert answer.status_code == 200
        assert "Paris" in answer.json()["choices"][0]["message"]["content"]
    finally:
        server.stop()
    assert "Traceback" not in server.logs()


def test_our_processes_run_the_kernels_this_cpu_supports() -> None:
    """OpenBLAS, loaded with the settings our processes get, never runs its generic SSE3
    kernels on a CPU with AVX2 (a CPU model newer than the library falls back to them)."""
    env = with_system_blas({k: v for k, v in os.environ.items() if k != "OPENBLAS_CORETYPE"})
    kernels = kernels_loaded_with(env)
    assert kernels is not None
    if "OPENBLAS_CORETYPE" in env:
        assert kernels == env["OPENBLAS_CORETYPE"]
    if best_kernels(cpu_flags()) is not None:
        assert kernels != FALLBACK_KERNELS
