"""Start and stop the two servers under comparison, one at a time, with the same environment."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from app.ops.system_blas import with_system_blas

REPO_ROOT = Path(__file__).resolve().parents[1]
GATEWAY_MODEL_ID = "bench-model"
READY_TIMEOUT = 600.0
STOP_GRACE = 30.0


@dataclass
class ServerSpec:
    name: str
    argv: list[str]
    base_url: str
    model: str  # the `model` each request sends
    settings: str  # one line for the report: what we configured and why


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def bench_env(*, blas_settings: bool = True) -> dict[str, str]:
    """The environment a server gets: ours, plus Debian's OpenBLAS when it exists, with the
    thread timeout `mlx-gateway serve` gives itself (`app.ops.system_blas`).

    `blas_settings=False` keeps the preload but leaves OpenBLAS's own thread timeout: how a
    user runs mlx_lm.server with OpenBLAS preloaded. MLX's CPU backend uses whatever BLAS is
    loaded for float32 matmuls; the reference BLAS bundled with mlx-cpu is many times slower.
    """
    env = with_system_blas(os.environ)
    if not blas_settings:
        env.pop("OPENBLAS_THREAD_TIMEOUT", None)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def mlx_lm_spec(model_dir: Path, port: int, top_level: int, python: str) -> ServerSpec:
    """mlx_lm.server at its best for this probe.

    Defaults are decode 32 / prompt 8 concurrency and 10 cached prompts; raising prompt
    concurrency to the top level lets all clients of a level prefill in one batch (its best
    TTFT p95), and a larger prompt cache with the gateway's byte bound keeps the comparison
    of prefix reuse fair.
    """
    decode = max(32, top_level)
    prompt = max(8, top_level)
    argv = [
        python, "-m", "mlx_lm", "server", "--model", str(model_dir),
        "--host", "127.0.0.1", "--port", str(port),
        "--decode-concurrency", str(decode), "--prompt-concurrency", str(prompt),
        "--prompt-cache-size", "64", "--prompt-cache-bytes", "512MB",
        "--log-level", "WARNING",
    ]
    settings = (
        f"--decode-concurrency {decode} --prompt-concurrency {prompt} "
        "--prompt-cache-size 64 --prompt-cache-bytes 512MB (prefill step 2048, default)"
    )
    return ServerSpec("mlx_lm", argv, f"http://127.0.0.1:{port}/v1", "default_model", settings)


def gateway_config(model_dir: Path, port: int, top_level: int, workdir: Path,
                   prompt_cache_bytes: str = "512MB", speculative: str = "auto",
                   extra: str = "") -> Path:
    """A throwaway TOML: one pinned model, no auth (loopback only), no limits in the way."""
    batch = max(16, top_level)
    text = f"""\
cache_dir = "{workdir / 'cache'}"
config_dir = "{workdir / 'config'}"
state_dir = "{workdir / 'state'}"

[server]
host = "127.0.0.1"
port = {port}

[[models]]
id = "{GATEWAY_MODEL_ID}"
path = "{model_dir}"
pinned = true

[engine]
max_batch_size = {batch}
prompt_cache_bytes = "{prompt_cache_bytes}"
speculative = "{speculative}"

[auth]
enabled = false

[limits]
per_key_rpm = 0
per_ip_rpm = 0
max_inflight = {max(64, top_level)}
max_queue = 256

[log]
level = "warning"
""" + extra  # more tables (e.g. [[models]] a level needs besides the pinned one)
    path = workdir / "gateway.toml"
    path.write_text(text)
    return path


def gateway_spec(
    model_dir: Path, port: int, top_level: int, workdir: Path, python: str,
    prompt_cache_bytes: str = "512MB", speculative: str = "auto", extra: str = "",
) -> ServerSpec:
    config = gateway_config(model_dir, port, top_level, workdir, prompt_cache_bytes,
                            speculative, extra)
    argv = [python, "-m", "app.cli", "serve", "--config", str(config), "--port", str(port)]
    settings = (
        f"[engine] max_batch_size = {max(16, top_level)}, "
        f"prompt_cache_bytes = {prompt_cache_bytes}, "
        f"speculative = {speculative}, prefill_chunk default; auth and rate limits off "
        "(loopback)"
    )
    return ServerSpec("gateway", argv, f"http://127.0.0.1:{port}/v1", GATEWAY_MODEL_ID, settings)


def _ready(base_url: str) -> bool:
    root = base_url.removesuffix("/v1")
    for url in (f"{base_url}/models", f"{root}/health"):
        try:
            if httpx.get(url, timeout=2.0).status_code == 200:
                return True
        except httpx.HTTPError:
            continue
    return False


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@contextmanager
def running(spec: ServerSpec, env: dict[str, str], log_path: Path) -> Iterator[int]:
    """Start the server, wait until it answers, yield its pid, and stop it afterwards."""
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            spec.argv, cwd=REPO_ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT
        )
        try:
            deadline = time.monotonic() + READY_TIMEOUT
            while not _ready(spec.base_url):
                if proc.poll() is not None:
                    raise RuntimeError(
                        f"{spec.name} exited with {proc.returncode} before it was ready; "
                        f"log tail:\n{_tail(log_path)}"
                    )
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{spec.name} not ready after {READY_TIMEOUT:.0f}s")
                time.sleep(0.5)
            yield proc.pid
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=STOP_GRACE)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
