"""The OpenBLAS environment our processes start with (app/ops/system_blas.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.ops import system_blas
from app.ops.system_blas import THREAD_TIMEOUT, with_system_blas


@pytest.fixture
def library(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(system_blas.sys, "platform", "linux")
    path = tmp_path / "libblas.so.3"
    path.write_bytes(b"")
    return path


def test_adds_the_preload_and_the_timeout(library: Path) -> None:
    env = with_system_blas({"PATH": "/bin"}, library)
    assert env == {"PATH": "/bin", "LD_PRELOAD": str(library),
                   "OPENBLAS_THREAD_TIMEOUT": THREAD_TIMEOUT}


def test_keeps_other_preloads_and_the_operators_timeout(library: Path) -> None:
    env = with_system_blas({"LD_PRELOAD": "/lib/libjemalloc.so", "OPENBLAS_THREAD_TIMEOUT": "20"},
                           library)
    assert env["LD_PRELOAD"] == f"{library}:/lib/libjemalloc.so"
    assert env["OPENBLAS_THREAD_TIMEOUT"] == "20"
    # Already complete: nothing changes, so `serve` does not re-execute.
    assert with_system_blas(env, library) == env


def test_nothing_without_the_library_or_off_linux(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(system_blas.sys, "platform", "linux")
    assert with_system_blas({"A": "1"}, tmp_path / "missing.so") == {"A": "1"}
    present = tmp_path / "libblas.so.3"
    present.write_bytes(b"")
    monkeypatch.setattr(system_blas.sys, "platform", "darwin")
    assert with_system_blas({"A": "1"}, present) == {"A": "1"}
