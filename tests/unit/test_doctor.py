"""doctor: every broken setup is named with a fail line; a healthy one is all ok (exit 0)."""

from __future__ import annotations

import http.server
import json
import shutil
import socket
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from app.cli import build_parser
from app.ops.doctor import CheckResult, format_results, run_doctor
from tests.local_server import free_port, serving
from tests.redis_server import running_redis

KEY = "mgw-k1-testsecret"



def _by_name(results: list[CheckResult]) -> dict[str, CheckResult]:
    return {r.name: r for r in results}


def _write_config(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(f'config_dir = "{tmp_path}"\n' + body)
    return path


def _write_keys(tmp_path: Path, *, revoked: bool = False, mode: int = 0o600) -> Path:
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"version": 1, "keys": [{
        "id": "k1", "name": "me", "hash": "0" * 64, "admin": True, "models": None,
        "rpm": None, "tpm": None, "created": 0.0, "revoked": revoked}]}))
    path.chmod(mode)
    return path


def _model_dir(tmp_path: Path, size: int = 4096) -> Path:
    folder = tmp_path / "model"
    folder.mkdir(exist_ok=True)
    (folder / "model.safetensors").write_bytes(b"\0" * size)
    (folder / "config.json").write_text("{}")
    return folder


def _doctor_cli(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.handler(args)
    return code


# --- broken setups ----------------------------------------------------------------------------


def test_bad_toml_fails_config_and_stops(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "config.toml"
    config.write_text("[server\nport = 80\n")
    assert _doctor_cli(["doctor", "--config", str(config)]) == 1
    out = capsys.readouterr().out
    first = out.splitlines()[0]
    assert first.startswith("fail  config")
    assert "config error" in first
    assert "fix:" in out
    assert "port" not in _by_name(run_doctor(config))  # nothing else runs on a broken config


def test_invalid_value_lists_each_problem(tmp_path: Path) -> None:
    config = _write_config(tmp_path, "[server]\nport = 0\n[limits]\nmax_inflight = -1\n")
    [result] = run_doctor(config)
    assert result.status == "fail"
    assert "server.port" in result.detail
    assert "limits.max_inflight" in result.detail
    assert len(result.detail.splitlines()) == 2


def test_missing_config_file(tmp_path: Path) -> None:
    [result] = run_doctor(tmp_path / "nope.toml")
    assert (result.name, result.status) == ("config", "fail")
    assert "does not exist" in result.detail


def test_missing_model_path_fails(tmp_path: Path) -> None:
    config = _write_config(tmp_path, f"""
[server]
port = {free_port()}
[[models]]
id = "ghost"
path = "{tmp_path}/not-there"
""")
    results = _by_name(run_doctor(config))
    assert results["model ghost"].status == "fail"
    assert "does not exist" in results["model ghost"].detail
    assert results["config"].status == "ok"


def test_model_bigger_than_budget_fails(tmp_path: Path) -> None:
    folder = _model_dir(tmp_path, size=5000)
    config = _write_config(tmp_path, f"""
[server]
port = {free_port()}
[residency]
memory_budget = "2KB"
[[models]]
id = "big"
path = "{folder}"
pinned = true
""")
    results = _by_name(run_doctor(config))
    assert results["model big"].status == "fail"
    assert "exceeds the memory budget" in results["model big"].detail
    assert "memory_budget" in results["model big"].fix
    assert results["pinned models"].status == "fail"


def test_folder_without_weights_fails(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    config = _write_config(tmp_path, f"""
[server]
port = {free_port()}
[[models]]
id = "hollow"
path = "{tmp_path}/empty"
""")
    assert _by_name(run_doctor(config))["model hollow"].status == "fail"


def test_non_loopback_without_keys_fails(tmp_path: Path) -> None:
    config = _write_config(tmp_path, f'[server]\nhost = "0.0.0.0"\nport = {free_port()}\n')
    keys = _by_name(run_doctor(config))["keys"]
    assert keys.status == "fail"
    assert "0.0.0.0" in keys.detail
    assert "keys create" in keys.fix


def test_non_loopback_with_only_revoked_keys_fails(tmp_path: Path) -> None:
    _write_keys(tmp_path, revoked=True)
    config = _write_config(tmp_path, f'[server]\nhost = "0.0.0.0"\nport = {free_port()}\n')
    keys = _by_name(run_doctor(config))["keys"]
    assert keys.status == "fail"
    assert "no active keys" in keys.detail


def test_non_loopback_with_auth_off_fails(tmp_path: Path) -> None:
    config = _write_config(
        tmp_path, f'[server]\nhost = "0.0.0.0"\nport = {free_port()}\n[auth]\nenabled = false\n'
    )
    keys = _by_name(run_doctor(config))["keys"]
    assert keys.status == "fail"
    assert "auth is off" in keys.detail


def test_world_readable_keys_file_warns(tmp_path: Path) -> None:
    _write_keys(tmp_path, mode=0o644)
    config = _write_config(tmp_path, f'[server]\nhost = "0.0.0.0"\nport = {free_port()}\n')
    keys = _by_name(run_doctor(config))["keys"]
    assert keys.status == "warn"
    assert "chmod 600" in keys.fix


def test_a_leftover_first_key_file_warns(tmp_path: Path) -> None:
    _write_keys(tmp_path)
    (tmp_path / "first-admin-key.txt").write_text("mgw-k1-secret\n")
    config = _write_config(tmp_path, f"[server]\nport = {free_port()}\n")
    keys = _by_name(run_doctor(config))["keys"]
    assert keys.status == "warn" and "first-admin-key.txt" in keys.detail
    assert "delete the file" in keys.fix


def test_unreachable_redis_fails(tmp_path: Path) -> None:
    config = _write_config(
        tmp_path, f'[server]\nport = {free_port()}\n[redis]\nurl = '
                  f'"redis://:hunter2@127.0.0.1:{free_port()}/0"\n'
    )
    redis_check = _by_name(run_doctor(config))["redis"]
    assert redis_check.status == "fail"
    assert "PING" in redis_check.detail
    assert "hunter2" not in redis_check.detail


def test_redis_store_without_redis_url_fails(tmp_path: Path) -> None:
    config = _write_config(tmp_path, f'[server]\nport = {free_port()}\n'
                                     '[responses]\nstore = "redis"\n')
    assert _by_name(run_doctor(config))["redis"].status == "fail"


class _ForeignHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"<html>someone else's dashboard</html>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def foreign_server() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ForeignHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield int(server.server_address[1])
    server.shutdown()
    server.server_close()


def test_port_busy_with_a_foreign_server_fails(
    tmp_path: Path, foreign_server: int, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _write_config(tmp_path, f"[server]\nport = {foreign_server}\n")
    assert _doctor_cli(["doctor", "--config", str(config)]) == 1
    out = capsys.readouterr().out
    port_line = next(line for line in out.splitlines() if line.startswith("fail  port"))
    assert f"127.0.0.1:{foreign_server} is in use by another program" in port_line
    assert "lsof" in out


def test_port_busy_with_a_plain_tcp_listener_fails(tmp_path: Path) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        config = _write_config(tmp_path, f"[server]\nport = {port}\n")
        results = _by_name(run_doctor(config))
    assert results["port"].status == "fail"


def test_nothing_running_only_warns(tmp_path: Path) -> None:
    folder = _model_dir(tmp_path)
    _write_keys(tmp_path)
    config = _write_config(tmp_path, f"""
[server]
port = {free_port()}
[[models]]
id = "m"
path = "{folder}"
""")
    results = _by_name(run_doctor(config))
    assert results["port"].status == "ok"
    assert results["health"].status == "warn"
    assert "v1/models" not in results
    assert not [r for r in results.values() if r.status == "fail"]


def test_explicit_url_that_does_not_answer_fails(tmp_path: Path) -> None:
    config = _write_config(tmp_path, f"[server]\nport = {free_port()}\n")
    results = _by_name(run_doctor(config, url=f"http://127.0.0.1:{free_port()}"))
    assert results["health"].status == "fail"


# --- a live server ----------------------------------------------------------------------------


def _stub_gateway(state: dict[str, bool]) -> FastAPI:
    """Answers like the real gateway on the routes doctor calls."""
    app = FastAPI()

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok", "service": "mlx-gateway"}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        if state["ready"]:
            return JSONResponse({"status": "ready", "model": "m"})
        return JSONResponse({"status": "loading", "model": "m"}, status_code=503)

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        if request.headers.get("authorization") != f"Bearer {KEY}":
            error = {"message": "bad key", "type": "invalid_request_error", "param": None,
                     "code": "invalid_api_key"}
            return JSONResponse({"error": error}, status_code=401)
        return JSONResponse({"object": "list", "data": [
            {"id": "m", "object": "model", "created": 0, "owned_by": "mlx-gateway"}]})

    return app


@pytest.fixture
def stub_state() -> dict[str, bool]:
    return {"ready": True}


@pytest.fixture
def live_server(stub_state: dict[str, bool]) -> Iterator[int]:
    with serving(_stub_gateway(stub_state)) as port:
        yield port


@pytest.fixture
def redis_url() -> Iterator[str]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server not installed")
    with running_redis() as server:
        yield server.url


def test_healthy_setup_is_all_ok(
    tmp_path: Path, live_server: int, redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    _write_keys(tmp_path)
    folder = _model_dir(tmp_path)
    config = _write_config(tmp_path, f"""
[server]
port = {live_server}
[redis]
url = "{redis_url}"
[[models]]
id = "m"
path = "{folder}"
""")
    code = _doctor_cli(["doctor", "--config", str(config), "--key", KEY])
    out = capsys.readouterr().out
    assert code == 0, out
    results = _by_name(run_doctor(config, key=KEY))
    blas = {"blas"} if sys.platform.startswith("linux") else set()
    assert set(results) == {"config", "keys", "port", "health", "ready", "v1/models", "redis",
                            "model m", *blas}
    assert all(r.status == "ok" for r in results.values()), out
    assert "in use by mlx-gateway" in results["port"].detail
    assert "1 model(s) with the key: m" in results["v1/models"].detail
    assert KEY not in out


def test_live_server_with_wrong_or_missing_key(
    tmp_path: Path, live_server: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MLXGW_API_KEY", raising=False)
    config = _write_config(tmp_path, f"[server]\nport = {live_server}\n")
    url = f"http://127.0.0.1:{live_server}"
    wrong = _by_name(run_doctor(config, url=url, key="mgw-k1-wrong"))["v1/models"]
    assert wrong.status == "fail"
    assert "refused (401)" in wrong.detail
    missing = _by_name(run_doctor(config, url=url))["v1/models"]
    assert missing.status == "warn"
    assert "--key" in missing.fix


def test_key_from_environment(
    tmp_path: Path, live_server: int, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _write_keys(tmp_path)
    monkeypatch.setenv("MLXGW_API_KEY", KEY)
    config = _write_config(tmp_path, f"[server]\nport = {live_server}\n[[models]]\nid = 'm'\n"
                                     f"path = '{_model_dir(tmp_path)}'\n")
    assert _doctor_cli(["doctor", "--config", str(config)]) == 0
    assert "ok    v1/models" in capsys.readouterr().out


def test_model_still_loading_warns(
    tmp_path: Path, live_server: int, stub_state: dict[str, bool]
) -> None:
    stub_state["ready"] = False
    config = _write_config(tmp_path, f"[server]\nport = {live_server}\n")
    ready = _by_name(run_doctor(config, key=KEY))["ready"]
    assert ready.status == "warn"
    assert "m is not loaded yet (503)" in ready.detail


def test_remote_mode_checks_only_what_a_client_sees(
    live_server: int, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("MLXGW_CONFIG", raising=False)
    url = f"http://127.0.0.1:{live_server}"
    assert _doctor_cli(["doctor", "--url", url, "--key", KEY]) == 0
    names = [line.split()[1] for line in capsys.readouterr().out.splitlines()]
    assert names == ["health", "ready", "v1/models"]
    assert _doctor_cli(["doctor", "--url", url, "--key", "mgw-k1-nope"]) == 1
    dead = f"http://127.0.0.1:{free_port()}"
    assert [r.status for r in run_doctor(None, url=dead)] == ["fail"]


def test_format_results_aligns_columns() -> None:
    text = format_results([
        CheckResult("config", "ok", "valid"),
        CheckResult("model long-name", "fail", "line one\nline two", "do this"),
    ])
    assert text.splitlines() == [
        "ok    config           valid",
        "fail  model long-name  line one",
        "                       line two",
        "                       fix: do this",
    ]


@pytest.fixture
def on_linux(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    from app.ops import system_blas

    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.delenv("OPENBLAS_CORETYPE", raising=False)
    library = tmp_path / "libblas.so.3"
    library.write_bytes(b"")
    monkeypatch.setattr(system_blas, "OPENBLAS", library)
    monkeypatch.setattr(system_blas, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    return library


def test_blas_check_names_the_kernels_serve_runs(
        on_linux: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from app.ops import doctor, system_blas

    monkeypatch.setattr(system_blas, "detected_kernels", lambda _: "Prescott")
    result = doctor.check_blas()
    assert result is not None and result.status == "ok"
    assert "Haswell kernels (OPENBLAS_CORETYPE; by itself it would run Prescott)" in result.detail
    monkeypatch.setattr(system_blas, "detected_kernels", lambda _: "SkylakeX")
    result = doctor.check_blas()
    assert result is not None and "SkylakeX kernels (its own choice" in result.detail


def test_blas_check_warns_without_openblas(on_linux: Path) -> None:
    from app.ops import doctor

    on_linux.unlink()
    result = doctor.check_blas()
    assert result is not None and result.status == "warn"
    assert "libopenblas0-pthread" in result.fix
    on_linux.write_bytes(b"")  # there, but not a library
    result = doctor.check_blas()
    assert result is not None and result.status == "warn" and "does not load" in result.detail


def test_no_blas_check_off_linux(monkeypatch: pytest.MonkeyPatch) -> None:
    from app.ops import doctor

    monkeypatch.setattr(sys, "platform", "darwin")
    assert doctor.check_blas() is None
