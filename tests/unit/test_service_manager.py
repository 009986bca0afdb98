"""Service definitions: rendered plist/unit content, absolute paths, restart semantics, dry-run."""

from __future__ import annotations

import asyncio
import json
import os
import plistlib
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from app.cli import build_parser
from app.ops import service_manager
from app.ops.doctor import run_doctor
from app.ops.service_manager import ServiceSpec, render_launchd_plist, render_systemd_unit
from tests.caddy_server import caddy_root_certificate, running_caddy
from tests.local_server import free_port, serving

REPO = Path(__file__).resolve().parents[2]


def _spec(tmp_path: Path, **overrides: object) -> ServiceSpec:
    config = tmp_path / "my config & co" / "config.toml"  # a space and an XML special char
    values: dict[str, object] = {
        "python": Path("/opt/venvs/mlx gateway/bin/python"),
        "config": config,
        "workdir": REPO,
        "log_dir": tmp_path / "Logs" / "mlx-gateway",
        "shutdown_grace": 42.5,
        "env": {"PYTHONUNBUFFERED": "1", "MLXGW_LOG__LEVEL": "debug", "ODD": "50% $HOME"},
    }
    values.update(overrides)
    return ServiceSpec(**values)  # type: ignore[arg-type]


def test_plist_parses_and_has_the_launchd_keys(tmp_path: Path) -> None:
    spec = _spec(tmp_path)
    plist = plistlib.loads(render_launchd_plist(spec).encode())
    assert plist["Label"] == "com.mlx-gateway"
    assert plist["ProgramArguments"] == [
        "/opt/venvs/mlx gateway/bin/python", "-m", "app.cli", "serve",
        "--config", str(spec.config),
    ]
    assert all(Path(arg).is_absolute() for arg in (plist["ProgramArguments"][0],
                                                   plist["ProgramArguments"][-1]))
    assert plist["WorkingDirectory"] == str(REPO)
    assert plist["RunAtLoad"] is True
    # Restart on failure only: a clean exit (after a SIGTERM drain) must stay down.
    assert plist["KeepAlive"] == {"SuccessfulExit": False}
    assert plist["ThrottleInterval"] >= 5
    assert plist["ProcessType"] == "Interactive"
    assert plist["ExitTimeOut"] > spec.shutdown_grace
    assert plist["ExitTimeOut"] == 43 + service_manager.STOP_MARGIN_SECONDS
    assert plist["StandardOutPath"] == str(tmp_path / "Logs" / "mlx-gateway" / "mlx-gateway.log")
    assert plist["StandardErrorPath"].endswith("/mlx-gateway/mlx-gateway.err.log")
    assert plist["EnvironmentVariables"] == {
        "PYTHONUNBUFFERED": "1", "MLXGW_LOG__LEVEL": "debug", "ODD": "50% $HOME",
    }


def test_plist_escapes_xml_specials(tmp_path: Path) -> None:
    text = render_launchd_plist(_spec(tmp_path))
    assert "my config &amp; co" in text
    assert "my config & co" not in text


def test_relative_paths_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="config must be an absolute path"):
        _spec(tmp_path, config=Path("config.toml"))


def test_broken_template_is_caught(tmp_path: Path) -> None:
    bad = tmp_path / "bad.plist.in"
    template = service_manager.PLIST_TEMPLATE.read_text()
    bad.write_text(template.replace("</dict>\n</plist>", "</plist>"))
    with pytest.raises(ValueError, match="does not parse"):
        render_launchd_plist(_spec(tmp_path), template=bad)
    unfilled = tmp_path / "unfilled.plist.in"
    unfilled.write_text(service_manager.PLIST_TEMPLATE.read_text().replace("@LABEL@", "@NOPE@"))
    with pytest.raises(ValueError, match="@NOPE@"):
        render_launchd_plist(_spec(tmp_path), template=unfilled)


@pytest.mark.skipif(shutil.which("plutil") is None, reason="plutil exists on macOS only")
def test_plist_passes_plutil_lint(tmp_path: Path) -> None:
    path = tmp_path / "job.plist"
    path.write_text(render_launchd_plist(_spec(tmp_path)))
    assert subprocess.run(["plutil", "-lint", str(path)], check=False).returncode == 0


def _unit_lines(text: str) -> dict[str, list[str]]:
    values: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values.setdefault(key, []).append(value)
    return values


def test_systemd_unit_content(tmp_path: Path) -> None:
    spec = _spec(tmp_path)
    text = render_systemd_unit(spec)
    assert "@" not in text
    unit = _unit_lines(text)
    assert unit["ExecStart"] == [
        f'"/opt/venvs/mlx gateway/bin/python" "-m" "app.cli" "serve" "--config" "{spec.config}"'
    ]
    assert unit["WorkingDirectory"] == [str(REPO)]
    assert unit["Restart"] == ["on-failure"]
    assert unit["KillSignal"] == ["SIGTERM"]
    assert int(unit["TimeoutStopSec"][0]) > spec.shutdown_grace
    assert int(unit["RestartSec"][0]) > 0
    assert unit["RestartPreventExitStatus"] == ["2"]
    assert unit["WantedBy"] == ["default.target"]
    # % is a systemd specifier everywhere; $ only in ExecStart. Both must arrive literally.
    assert '"ODD=50%% $HOME"' in unit["Environment"]
    assert '"MLXGW_LOG__LEVEL=debug"' in unit["Environment"]
    for section in ("[Unit]", "[Service]", "[Install]"):
        assert section in text


def test_systemd_quote_escapes_dollar_and_percent() -> None:
    assert service_manager._systemd_quote('/a b/$x%y"z') == '"/a b/$$x%%y\\"z"'


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_systemd_unit_verifies(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text("")
    spec = ServiceSpec(python=Path(sys.executable).absolute(), config=config, workdir=REPO,
                       log_dir=tmp_path)
    unit = tmp_path / "mlx-gateway.service"
    unit.write_text(render_systemd_unit(spec))
    result = subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit)],
                            capture_output=True, text=True, check=False)
    problems = [line for line in result.stderr.splitlines() if "mlx-gateway.service" in line]
    assert problems == [], result.stderr


def test_venv_python_keeps_the_venv_symlink() -> None:
    assert service_manager.venv_python() == Path(os.path.abspath(sys.executable))
    assert service_manager.venv_python().is_absolute()


# --- the CLI, through --dry-run ---------------------------------------------------------------


def _run_cli(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.handler(args)
    return code


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    monkeypatch.delenv("MLXGW_CONFIG", raising=False)
    return tmp_path / "home"


def _config(tmp_path: Path, text: str = "[server]\nshutdown_grace = 20\n") -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def test_dry_run_install_launchd_prints_plist_and_commands(
    tmp_path: Path, home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _config(tmp_path)
    code = _run_cli(["service", "install", "--manager", "launchd", "--dry-run",
                     "--config", str(config), "--env", "EXTRA=yes"])
    out = capsys.readouterr().out
    assert code == 0
    plist_path = home / "Library" / "LaunchAgents" / "com.mlx-gateway.plist"
    assert f"would write {plist_path}:" in out
    assert f"would create directory {home}/Library/Logs/mlx-gateway" in out
    assert f"<string>{config}</string>" in out
    assert "<key>EXTRA</key>" in out
    assert "<integer>35</integer>" in out  # ExitTimeOut: grace 20 + margin 15
    uid = os.getuid()
    assert f"would run: launchctl bootout gui/{uid}/com.mlx-gateway" in out
    assert f"would run: launchctl bootstrap gui/{uid} {plist_path}" in out
    assert out.index("bootout") < out.index("bootstrap")
    assert not plist_path.exists()  # dry run wrote nothing


def test_the_stop_timeout_covers_the_unready_delay_too(
    tmp_path: Path, home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Behind a balancer, SIGTERM first waits `unready_delay`, then drains for the grace."""
    config = _config(tmp_path, "[server]\nshutdown_grace = 20\nunready_delay = 4\n")
    assert _run_cli(["service", "install", "--manager", "launchd", "--dry-run",
                     "--config", str(config)]) == 0
    assert "<integer>39</integer>" in capsys.readouterr().out  # 4 + 20 + margin 15


def test_dry_run_install_systemd(
    tmp_path: Path, home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _config(tmp_path)
    assert _run_cli(["service", "install", "--manager", "systemd", "--dry-run",
                     "--config", str(config)]) == 0
    out = capsys.readouterr().out
    unit_path = home / ".config" / "systemd" / "user" / "mlx-gateway.service"
    assert f"would write {unit_path}:" in out
    assert "TimeoutStopSec=35" in out
    runs = [line for line in out.splitlines() if line.startswith("would run:")]
    assert runs == [
        "would run: systemctl --user daemon-reload",
        "would run: systemctl --user enable mlx-gateway.service",
        "would run: systemctl --user restart mlx-gateway.service",
    ]
    assert not unit_path.exists()


def test_install_refuses_a_broken_config(
    tmp_path: Path, home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _config(tmp_path, "[server]\nport = 'eighty'\n")
    code = _run_cli(["service", "install", "--manager", "systemd", "--dry-run",
                     "--config", str(config)])
    captured = capsys.readouterr()
    assert code == 2
    assert "server.port" in captured.err
    assert "would write" not in captured.out


def test_install_without_any_config_says_so(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _run_cli(["service", "install", "--manager", "systemd", "--dry-run"]) == 2
    assert "pass --config FILE" in capsys.readouterr().err


def test_dry_run_uninstall_disables_before_removing(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _run_cli(["service", "uninstall", "--manager", "systemd", "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    unit_path = home / ".config" / "systemd" / "user" / "mlx-gateway.service"
    assert lines == [
        "would run: systemctl --user disable --now mlx-gateway.service",
        f"would remove {unit_path}",
        "would run: systemctl --user daemon-reload",
    ]


def test_dry_run_status_and_logs(
    tmp_path: Path, home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _run_cli(["service", "status", "--manager", "launchd", "--dry-run"]) == 0
    expected = f"would run: launchctl print gui/{os.getuid()}/com.mlx-gateway\n"
    assert capsys.readouterr().out == expected
    assert _run_cli(["service", "logs", "--manager", "systemd", "--dry-run", "-n", "5", "-f"]) == 0
    assert capsys.readouterr().out == (
        "would run: journalctl --user -u mlx-gateway.service -n 5 --no-pager -f\n"
    )
    log_file = tmp_path / "gw.log"
    config = _config(tmp_path, f'[log]\nfile = "{log_file}"\n')
    assert _run_cli(["service", "logs", "--manager", "launchd", "--dry-run",
                     "--config", str(config)]) == 0
    assert capsys.readouterr().out == f"would run: tail -n 100 {log_file}\n"


def test_install_executes_the_plan(tmp_path: Path, home: Path) -> None:
    """Without --dry-run the file is written and the commands run in order."""
    spec = _spec(tmp_path)
    ran: list[list[str]] = []

    def fake_run(argv: object) -> int:
        ran.append(list(argv))  # type: ignore[call-overload]
        return 1 if "bootout" in ran[-1] else 0  # "not loaded" must not stop the install

    plan = service_manager.install_plan(spec, "launchd")
    assert plan.execute(fake_run) == 0
    plist_path = home / "Library" / "LaunchAgents" / "com.mlx-gateway.plist"
    assert plistlib.loads(plist_path.read_bytes())["Label"] == "com.mlx-gateway"
    assert spec.log_dir.is_dir()
    assert [argv[1] for argv in ran] == ["bootout", "enable", "bootstrap"]

    failing = service_manager.install_plan(spec, "systemd")
    assert failing.execute(lambda argv: 5 if "enable" in argv else 0) == 5


# --- deploy/Caddyfile through a real Caddy, with a stub upstream ------------------------------



class _Upstream:
    """Stands in for the gateway: a stream that only continues when the test says so, and an
    echo of what Caddy forwarded."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.echoed: list[int] = []  # body sizes the upstream read completely
        self.app = FastAPI()

        @self.app.get("/stream")
        async def stream() -> StreamingResponse:
            async def chunks() -> AsyncIterator[bytes]:
                yield b'data: {"n": 1}\n\n'
                # Chunk 2 is only produced after the client has *received* chunk 1 through
                # Caddy: if Caddy buffered, the client would never see chunk 1 and time out.
                while not self.release.is_set():  # noqa: ASYNC110 - set from another thread
                    await asyncio.sleep(0.01)
                yield b'data: {"n": 2}\n\n'
                yield b"data: [DONE]\n\n"

            return StreamingResponse(chunks(), media_type="text/event-stream")

        @self.app.get("/health")
        async def health() -> dict[str, str]:
            return {"status": "ok"}

        @self.app.post("/echo")
        async def echo(request: Request) -> dict[str, object]:
            body = await request.body()
            self.echoed.append(len(body))
            return {"xff": request.headers.get("x-forwarded-for"), "bytes": len(body)}


@pytest.fixture
def upstream() -> Iterator[tuple[_Upstream, int]]:
    stub = _Upstream()
    with serving(stub.app) as port:
        try:
            yield stub, port
        finally:
            stub.release.set()


@pytest.fixture
def caddy(tmp_path: Path, upstream: tuple[_Upstream, int]) -> Iterator[tuple[_Upstream, str]]:
    """Caddy with the shipped Caddyfile on free ports; its private CA lives under tmp_path/data."""
    stub, upstream_port = upstream
    with running_caddy(tmp_path, upstream_port, probe_path="/echo") as base:
        yield stub, base


def test_caddyfile_validates(tmp_path: Path) -> None:
    binary = shutil.which("caddy")
    if binary is None:
        pytest.skip("caddy not installed")
    env = {**os.environ, "HOME": str(tmp_path), "XDG_DATA_HOME": str(tmp_path / "data"),
           "XDG_CONFIG_HOME": str(tmp_path / "config")}
    result = subprocess.run([binary, "validate", "--config", str(REPO / "deploy" / "Caddyfile"),
                             "--adapter", "caddyfile"], env=env, capture_output=True, text=True,
                            check=False)
    assert result.returncode == 0, result.stderr
    text = (REPO / "deploy" / "Caddyfile").read_text()
    assert "\ttls internal" in text
    assert "# tls you@example.com" in text
    assert "flush_interval -1" in text
    assert "header_up X-Forwarded-For {remote_host}" in text
    assert "\twrite " not in text  # no write timeout: long streams must survive


def test_caddy_streams_without_buffering(caddy: tuple[_Upstream, str]) -> None:
    stub, base = caddy
    received: list[str] = []
    with httpx.Client(verify=False, timeout=httpx.Timeout(20.0)) as client, \
            client.stream("GET", f"{base}/stream") as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if not line:
                continue
            received.append(line)
            if line == 'data: {"n": 1}':
                stub.release.set()  # the upstream may continue only now
    assert received == ['data: {"n": 1}', 'data: {"n": 2}', "data: [DONE]"]


def test_caddy_replaces_spoofed_forwarded_for(caddy: tuple[_Upstream, str]) -> None:
    _, base = caddy
    response = httpx.post(f"{base}/echo", content=b"{}", verify=False, timeout=10,
                          headers={"X-Forwarded-For": "6.6.6.6"})
    assert response.status_code == 200
    assert response.json() == {"xff": "127.0.0.1", "bytes": 2}


def test_caddy_refuses_oversized_bodies(caddy: tuple[_Upstream, str]) -> None:
    stub, base = caddy
    response = httpx.post(f"{base}/echo", content=b"x" * 11_000_000, verify=False, timeout=30)
    # Caddy >= 2.7 answers 413; 2.6 (Debian's) reports the cut-off upstream read as 502
    # (caddyserver/caddy#5652). Either way the body never reaches the gateway whole.
    assert response.status_code in (413, 502)
    assert all(size <= 10_000_000 for size in stub.echoed)


def test_doctor_through_caddy_needs_its_ca(tmp_path: Path, caddy: tuple[_Upstream, str]) -> None:
    """The second-host check: doctor --url https://... against Caddy's `tls internal`."""
    _, base = caddy
    config = tmp_path / "config.toml"
    config.write_text(f"[server]\nport = {free_port()}\n")
    untrusted = {r.name: r for r in run_doctor(config, url=base)}
    assert untrusted["health"].status == "fail"
    assert "--cacert" in untrusted["health"].fix
    root = caddy_root_certificate(tmp_path)
    trusted = {r.name: r for r in run_doctor(config, url=base, cacert=root)}
    assert trusted["health"].status == "ok"
    assert trusted["health"].detail == f"{base}/health: ok"


# --- deploy/grafana -----------------------------------------------------------------------------

# Named by the lead for app/metrics.py; some land with the residency and limits work.


def _registered_metrics() -> dict[str, str]:
    """mlxgw_* families in app.metrics -> type (counter names without the _total suffix)."""
    from prometheus_client import REGISTRY

    import app.metrics  # noqa: F401 - registers the collectors

    return {family.name: family.type for family in REGISTRY.collect()
            if family.name.startswith("mlxgw_")}


def _dashboard_exprs() -> list[str]:
    dashboard = json.loads((REPO / "deploy" / "grafana" / "mlx-gateway.json").read_text())
    assert dashboard["uid"] == "mlx-gateway"
    exprs = [target["expr"] for panel in dashboard["panels"] if panel["type"] != "row"
             for target in panel["targets"]]
    assert exprs
    return exprs


def test_dashboard_uses_only_known_metrics() -> None:
    registered = _registered_metrics()
    known = {f"{name}_total" if kind == "counter" else name for name, kind in registered.items()}
    used = set()
    for expr in _dashboard_exprs():
        assert 'instance=~"$instance"' in expr
        for name in re.findall(r"\bmlxgw_[a-z_]+", expr):
            base = re.sub(r"_(bucket|sum|count)$", "", name)
            if base != name:
                assert registered.get(base, "histogram") == "histogram", name
            used.add(base)
    unknown = used - known
    assert not unknown, f"dashboard queries metrics nobody defines: {unknown}"
    # Everything the gateway exports shows up somewhere.
    assert not known - used, f"metrics missing from the dashboard: {known - used}"


def test_missing_template_explains_the_editable_install(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="pip install -e"):
        render_systemd_unit(_spec(tmp_path), template=tmp_path / "nope.service.in")
