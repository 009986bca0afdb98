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
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path

OPENBLAS = Path("/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3")
THREAD_TIMEOUT = "16"
# Set in the re-executed process, so a failed preload can never loop.
_REEXECUTED = "MLXGW_SYSTEM_BLAS_REEXEC"


def with_system_blas(env: Mapping[str, str], library: Path = OPENBLAS) -> dict[str, str]:
    """`env` plus the OpenBLAS preload and thread timeout, on Linux when `library` exists.

    A timeout already in `env` is kept: the operator chose it."""
    out = dict(env)
    if not sys.platform.startswith("linux") or not library.exists():
        return out
    preloads = [entry for entry in out.get("LD_PRELOAD", "").split(":") if entry]
    if str(library) not in preloads:
        out["LD_PRELOAD"] = ":".join([str(library), *preloads])
    out.setdefault("OPENBLAS_THREAD_TIMEOUT", THREAD_TIMEOUT)
    return out


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
