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


def test_names_kernels_only_for_a_cpu_the_library_does_not_know(
        library: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(system_blas, "cpu_flags", lambda: frozenset({"avx2", "fma", "sse3"}))
    monkeypatch.setattr(system_blas, "detected_kernels", lambda _: "Prescott")
    assert with_system_blas({}, library)["OPENBLAS_CORETYPE"] == "Haswell"
    # The operator's choice stands.
    assert with_system_blas({"OPENBLAS_CORETYPE": "Zen"}, library)["OPENBLAS_CORETYPE"] == "Zen"
    # A CPU the library recognises keeps the library's own choice.
    monkeypatch.setattr(system_blas, "detected_kernels", lambda _: "SkylakeX")
    assert "OPENBLAS_CORETYPE" not in with_system_blas({}, library)
    # Unknown to the library, but no better kernels run on it.
    monkeypatch.setattr(system_blas, "detected_kernels", lambda _: "Prescott")
    monkeypatch.setattr(system_blas, "cpu_flags", lambda: frozenset({"sse3", "avx"}))
    assert "OPENBLAS_CORETYPE" not in with_system_blas({}, library)


@pytest.mark.parametrize(("flags", "kernels"), [
    ({"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl", "avx512_bf16", "avx2", "fma"},
     "Cooperlake"),
    ({"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl", "avx2", "fma"}, "SkylakeX"),
    ({"avx512f", "avx2", "fma"}, "Haswell"),  # AVX-512 Foundation alone is not SkylakeX's set
    ({"avx2"}, None),
    (set(), None),
])
def test_best_kernels_follow_the_instruction_set(flags: set[str], kernels: str | None) -> None:
    assert system_blas.best_kernels(frozenset(flags)) == kernels


def test_cpu_flags_read_from_cpuinfo(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse3 avx2 fma\n\nprocessor\t: 1\n"
                       "flags\t\t: fpu\n")
    assert system_blas.cpu_flags(cpuinfo) == {"fpu", "sse3", "avx2", "fma"}
    assert system_blas.cpu_flags(tmp_path / "missing") == frozenset()


def test_a_library_that_cannot_be_asked_names_no_kernels(library: Path) -> None:
    # `library` is an empty file: loading it fails in the child, which is not an error here.
    assert system_blas.detected_kernels(library) is None
    assert system_blas.kernels_for_this_cpu(library) is None
