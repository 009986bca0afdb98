"""A real Caddy running the shipped deploy/Caddyfile on free ports in front of an upstream.

Test-only globals: no admin API, no attempt to install Caddy's root CA into this machine's
trust store; its private CA lives under the given folder.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from tests.local_server import free_port

REPO = Path(__file__).resolve().parents[1]



def under_prefix(text: str, prefix: str) -> str:
    """The Caddyfile with its reverse_proxy block inside `handle_path <prefix>/*`, as the
    comment in deploy/Caddyfile describes for serving the gateway under a path."""
    lines = text.split("\n")
    start = next(i for i, line in enumerate(lines) if line.startswith("\treverse_proxy "))
    end = next(i for i in range(start, len(lines)) if lines[i] == "\t}")
    block = ["\t" + line for line in lines[start:end + 1]]
    return "\n".join([*lines[:start], f"\thandle_path {prefix}/* {{", *block, "\t}",
                      *lines[end + 1:]])


def _test_globals(text: str, http_port: int, https_port: int) -> str:
    globals_ = (f"{{\n\tadmin off\n\tskip_install_trust\n\thttp_port {http_port}\n"
                f"\thttps_port {https_port}\n")
    return text.replace("\n{\n", "\n" + globals_, 1)


def caddyfile_for_test(upstream_port: int, http_port: int, https_port: int,
                       prefix: str | None = None) -> str:
    text = (REPO / "deploy" / "Caddyfile").read_text()
    assert "reverse_proxy 127.0.0.1:8000 {" in text
    text = text.replace("reverse_proxy 127.0.0.1:8000", f"reverse_proxy 127.0.0.1:{upstream_port}")
    if prefix is not None:
        text = under_prefix(text, prefix)
    return _test_globals(text, http_port, https_port)


GATEWAY_HEADER = "x-test-gateway"


def multi_caddyfile_for_test(gateway_ports: list[int], http_port: int, https_port: int) -> str:
    """deploy/multi/Caddyfile with its example `to` lines replaced by these gateways, and a
    response header naming the gateway that answered (test-only: clients need not know)."""
    text = (REPO / "deploy" / "multi" / "Caddyfile").read_text()
    example = "\t\tto 10.0.0.11:8000\n\t\tto 10.0.0.12:8000\n"
    assert example in text
    lines = "".join(f"\t\tto 127.0.0.1:{port}\n" for port in gateway_ports)
    lines += f"\t\theader_down {GATEWAY_HEADER} {{http.reverse_proxy.upstream.port}}\n"
    return _test_globals(text.replace(example, lines), http_port, https_port)


@contextmanager
def running_caddy(workdir: Path, upstream_port: int, probe_path: str = "/health",
                  prefix: str | None = None, *, gateway_ports: list[int] | None = None
                  ) -> Iterator[str]:
    """Yield Caddy's https base URL once it answers; stop it afterwards. With
    `gateway_ports`, Caddy runs deploy/multi/Caddyfile in front of those gateways."""
    binary = shutil.which("caddy")
    if binary is None:
        pytest.skip("caddy not installed (make test installs it)")
    https_port = free_port()
    config = workdir / "Caddyfile"
    if gateway_ports is not None:
        config.write_text(multi_caddyfile_for_test(gateway_ports, free_port(), https_port))
    else:
        config.write_text(caddyfile_for_test(upstream_port, free_port(), https_port, prefix))
    env = {**os.environ, "HOME": str(workdir), "XDG_DATA_HOME": str(workdir / "data"),
           "XDG_CONFIG_HOME": str(workdir / "config"),
           "MLXGW_SITE": f"https://127.0.0.1:{https_port}"}
    proc = subprocess.Popen([binary, "run", "--config", str(config), "--adapter", "caddyfile"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"https://127.0.0.1:{https_port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else "died"
            try:
                httpx.request("POST" if probe_path == "/echo" else "GET",
                              base + (prefix or "") + probe_path,
                              verify=False, timeout=2)
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline, "caddy did not start"
                time.sleep(0.1)
        yield base
    finally:
        proc.terminate()
        proc.wait(10)


def caddy_root_certificate(workdir: Path) -> Path:
    return workdir / "data" / "caddy" / "pki" / "authorities" / "local" / "root.crt"
