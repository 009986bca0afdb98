"""Start the real gateway (`python -m app.cli serve`) as a subprocess on a free port."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import tomli_w

from app.ops.system_blas import with_system_blas
from tests.local_server import free_port

ROOT = Path(__file__).resolve().parents[2]



class GatewayProcess:
    """One gateway server. `config` is the TOML content as a dict."""

    def __init__(self, workdir: Path, config: dict[str, Any], *, port: int | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.workdir = workdir
        self.port = port or free_port()
        self.config_path = workdir / "config.toml"
        self.log_path = workdir / "server.log"
        config = {
            "cache_dir": str(workdir / "cache"),
            "config_dir": str(workdir / "config"),
            "state_dir": str(workdir / "state"),
            **config,
            # Tests choose their weights (the float32 copy, or the 4-bit folder where 4-bit is
            # the point): no 540 MB float32 copy per test gateway unless a test asks for one.
            "engine": {"cpu_dequantize": False, **config.get("engine", {})},
        }
        self.config_path.write_text(tomli_w.dumps(config))
        # What `serve` would re-execute itself with, given up front (the faster start).
        self.env = with_system_blas({**os.environ, **(env or {})})
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, *, wait_ready: bool = True, timeout: float = 180) -> GatewayProcess:
        self._log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "serve", "--config", str(self.config_path),
             "--port", str(self.port)],
            cwd=ROOT, env=self.env, stdout=self._log, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        path = "/ready" if wait_ready else "/health"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"gateway exited with {self.process.returncode}:\n{self.logs()}")
            try:
                if httpx.get(self.base_url + path, timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"gateway not ready in {timeout}s:\n{self.logs()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
