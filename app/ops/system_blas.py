"""The system OpenBLAS for MLX's CPU backend, and how our processes start with it.

The mlx-cpu wheel bundles a slow reference BLAS. Preloading Debian's OpenBLAS
(libopenblas0-pthread) makes MLX's float32 matrix products about 30x faster on x86. OpenBLAS
reads its settings once, when it loads, so they must be in the environment before the process
starts: `mlx-gateway serve` re-executes itself once with them; the bench and the tests start
their servers with them.

OPENBLAS_THREAD_TIMEOUT: after each product, OpenBLAS's worker threads spin for 2^N cycles
before they sleep. The default (N=28, about 0.1 s) keeps a core spinning through a whole decode
step; on a 2-core machine that is the core MLX's second stream (decode attention), the engine's
Python and the HTTP side need. N=16 (about 25 us) still covers the gap between back-to-back
products. Measured in bench/RESULTS.md.

OPENBLAS_CORETYPE: Debian's OpenBLAS is a DYNAMIC_ARCH build that picks its kernels from the
CPU's model number. A CPU newer than the library (0.3.21 does not know Emerald Rapids) gets the
generic SSE3 "Prescott" kernels, which leave AVX2 and AVX-512 unused: on such a 2-core box the
products of a 16-row decode step take twice as long and prefill more. Then we name the kernels
the CPU's instruction set runs; a CPU the library recognises keeps its own choice.

Run as a script (`python3 app/ops/system_blas.py`, stdlib only) it prints the settings it
would add as shell assignments: the Makefile's prefix for the tests and the bench.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from collections.abc import Mapping
from functools import cache
from pathlib import Path

OPENBLAS = Path("/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3")
THREAD_TIMEOUT = "16"
# What OpenBLAS falls back to for an x86-64 CPU model it does not know.
FALLBACK_KERNELS = "Prescott"
# OpenBLAS kernel sets by the instructions they need, best first (the names OPENBLAS_CORETYPE
# takes). Cooperlake is SkylakeX's kernels plus bfloat16 ones; OpenBLAS 0.3.21 uses it for
# Sapphire Rapids.
_AVX512 = frozenset({"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"})
KERNELS_BY_FLAGS: tuple[tuple[str, frozenset[str]], ...] = (
    ("Cooperlake", _AVX512 | {"avx512_bf16"}),
    ("SkylakeX", _AVX512),
    ("Haswell", frozenset({"avx2", "fma"})),
)
CPUINFO = Path("/proc/cpuinfo")
# Set in the re-executed process, so a failed preload can never loop.
_REEXECUTED = "MLXGW_SYSTEM_BLAS_REEXEC"


def with_system_blas(env: Mapping[str, str], library: Path = OPENBLAS) -> dict[str, str]:
    """`env` plus the OpenBLAS preload, thread timeout and (when the library would fall back
    to its generic kernels) core type, on Linux when `library` exists.

    A timeout or core type already in `env` is kept: the operator chose it."""
    out = dict(env)
    if not sys.platform.startswith("linux") or not library.exists():
        return out
    preloads = [entry for entry in out.get("LD_PRELOAD", "").split(":") if entry]
    if str(library) not in preloads:
        out["LD_PRELOAD"] = ":".join([str(library), *preloads])
    out.setdefault("OPENBLAS_THREAD_TIMEOUT", THREAD_TIMEOUT)
    if "OPENBLAS_CORETYPE" not in out:
        kernels = kernels_for_this_cpu(library)
        if kernels is not None:
            out["OPENBLAS_CORETYPE"] = kernels
    return out


def kernels_for_this_cpu(library: Path = OPENBLAS) -> str | None:
    """The OPENBLAS_CORETYPE this CPU needs: None when OpenBLAS knows it (or no better kernels
    run on it), else the best kernel set its instructions run."""
    if detected_kernels(library) != FALLBACK_KERNELS:
        return None
    return best_kernels(cpu_flags())


def best_kernels(flags: frozenset[str] | set[str]) -> str | None:
    """The best of `KERNELS_BY_FLAGS` a CPU with these /proc/cpuinfo flags runs."""
    return next((name for name, needs in KERNELS_BY_FLAGS if needs <= flags), None)


def cpu_flags(cpuinfo: Path = CPUINFO) -> frozenset[str]:
    """The instruction set flags of the first CPU in /proc/cpuinfo (empty when unreadable)."""
    try:
        lines = cpuinfo.read_text().splitlines()
    except OSError:
        return frozenset()
    for line in lines:
        name, _, value = line.partition(":")
        if name.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


_CORENAME = ("import ctypes, sys; f = ctypes.CDLL(sys.argv[1]).openblas_get_corename; "
             "f.restype = ctypes.c_char_p; print(f().decode())")


@cache
def detected_kernels(library: Path = OPENBLAS) -> str | None:
    """The kernel set `library` picks by itself on this CPU (None if it cannot be asked)."""
    return kernels_loaded_with({k: v for k, v in os.environ.items()
                                if k not in ("OPENBLAS_CORETYPE", "LD_PRELOAD",
                                             "OPENBLAS_VERBOSE")}, library)


def kernels_loaded_with(env: Mapping[str, str], library: Path = OPENBLAS) -> str | None:
    """The kernel set `library` runs when a process with `env` loads it (None if it cannot be
    asked). Asked in a fresh interpreter: the library reads the CPU (and OPENBLAS_CORETYPE)
    once, when it loads, and this process may have loaded it already with other settings."""
    try:
        done = subprocess.run([sys.executable, "-c", _CORENAME, str(library)], env=env,
                              capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    name = done.stdout.strip()
    return name if done.returncode == 0 and name else None


def reexec_with_system_blas() -> None:
    """Replace this process with the same command under `with_system_blas`, once.

    Returns (doing nothing) when the environment already has everything, on macOS, or when
    this process is itself the re-executed one."""
    env = with_system_blas(os.environ)
    if env == dict(os.environ) or os.environ.get(_REEXECUTED):
        return
    env[_REEXECUTED] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    # orig_argv keeps the interpreter's own options and `-m app.cli` or the script path.
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)  # noqa: S606


if __name__ == "__main__":
    # The settings a process started from this environment should add, for a shell prefix.
    added = {k: v for k, v in with_system_blas(os.environ).items() if os.environ.get(k) != v}
    print(" ".join(f"{k}={shlex.quote(v)}" for k, v in added.items()))
