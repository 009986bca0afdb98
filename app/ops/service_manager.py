"""`mlx-gateway service install|uninstall|status|logs`: run the gateway 24/7.

macOS: a LaunchAgent in ~/Library/LaunchAgents, loaded with `launchctl bootstrap gui/<uid>`.
Linux: a systemd user unit in ~/.config/systemd/user, driven with `systemctl --user`.
Both are rendered from the templates in deploy/ with absolute paths, because neither launchd
nor systemd expands `~` or searches PATH the way a shell does.
"""

from __future__ import annotations

import argparse
import math
import os
import plistlib
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from xml.sax.saxutils import escape

import structlog

from app.settings import ConfigError, load_settings

log = structlog.get_logger(__name__)

LABEL = "com.mlx-gateway"
UNIT_NAME = "mlx-gateway.service"
# Installed in editable mode from a clone: the templates live next to `app/`.
REPO_ROOT = Path(__file__).resolve().parents[2]
DEPLOY_DIR = REPO_ROOT / "deploy"
PLIST_TEMPLATE = DEPLOY_DIR / "launchd" / "com.mlx-gateway.plist.in"
UNIT_TEMPLATE = DEPLOY_DIR / "systemd" / "mlx-gateway.service.in"

THROTTLE_SECONDS = 10
# SIGTERM -> SIGKILL must outlast [server] shutdown_grace: add room to release the model.
STOP_MARGIN_SECONDS = 15
DEFAULT_ENV = {
    "PYTHONUNBUFFERED": "1",  # log lines reach the log file as they happen
    "PATH": "/opt/homebrew/bin:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
}

_PLACEHOLDER = re.compile(r"@[A-Z_]+@")

Manager = Literal["launchd", "systemd"]
Runner = Callable[[Sequence[str]], int]


@dataclass(frozen=True)
class ServiceSpec:
    """Everything a rendered service definition needs, as absolute paths."""

    python: Path
    config: Path
    workdir: Path = REPO_ROOT
    log_dir: Path = field(default_factory=lambda: Path.home() / "Library" / "Logs" / "mlx-gateway")
    label: str = LABEL
    shutdown_grace: float = 30.0
    env: Mapping[str, str] = field(default_factory=lambda: dict(DEFAULT_ENV))

    def __post_init__(self) -> None:
        for name in ("python", "config", "workdir", "log_dir"):
            if not getattr(self, name).is_absolute():
                raise ValueError(f"{name} must be an absolute path, got {getattr(self, name)}")

    @property
    def stop_timeout(self) -> int:
        return math.ceil(self.shutdown_grace) + STOP_MARGIN_SECONDS

    @property
    def stdout_path(self) -> Path:
        return self.log_dir / "mlx-gateway.log"

    @property
    def stderr_path(self) -> Path:
        return self.log_dir / "mlx-gateway.err.log"

    @property
    def argv(self) -> list[str]:
        return [str(self.python), "-m", "app.cli", "serve", "--config", str(self.config)]


def venv_python() -> Path:
    """The interpreter running us, as invoked: a venv's bin/python is a symlink to the base
    interpreter, and resolving it would start the service outside the venv."""
    return Path(os.path.abspath(sys.executable))


def _read_template(path: Path) -> str:
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: `service install` renders the templates in deploy/ of the clone "
            "the gateway runs from (pip install -e .)"
        )
    return path.read_text(encoding="utf-8")


def _fill(template: str, values: Mapping[str, str]) -> str:
    for name, value in values.items():
        template = template.replace(f"@{name}@", value)
    leftovers = sorted(set(_PLACEHOLDER.findall(template)))
    if leftovers:
        raise ValueError(f"unfilled template placeholders: {', '.join(leftovers)}")
    return template


def render_launchd_plist(spec: ServiceSpec, template: Path = PLIST_TEMPLATE) -> str:
    """The LaunchAgent plist for `spec`; raises ValueError if it does not parse."""
    env_xml = "\n".join(
        f"    <key>{escape(key)}</key>\n    <string>{escape(value)}</string>"
        for key, value in sorted(spec.env.items())
    )
    text = _fill(_read_template(template), {
        "LABEL": escape(spec.label),
        "PYTHON": escape(str(spec.python)),
        "CONFIG": escape(str(spec.config)),
        "WORKDIR": escape(str(spec.workdir)),
        "STDOUT": escape(str(spec.stdout_path)),
        "STDERR": escape(str(spec.stderr_path)),
        "THROTTLE": str(THROTTLE_SECONDS),
        "EXIT_TIMEOUT": str(spec.stop_timeout),
        "ENVIRONMENT": env_xml,
    })
    validate_plist(text)
    return text


def validate_plist(text: str) -> dict[str, object]:
    """Parse with plistlib (always) and `plutil -lint` (macOS); ValueError on failure."""
    try:
        parsed = plistlib.loads(text.encode("utf-8"))
    except Exception as error:  # plistlib raises ExpatError, ValueError, InvalidFileException
        raise ValueError(f"rendered plist does not parse: {error}") from error
    plutil = shutil.which("plutil")
    if plutil is not None:
        result = subprocess.run([plutil, "-lint", "-"], input=text.encode(),
                                capture_output=True, check=False)
        if result.returncode != 0:
            raise ValueError(f"plutil -lint: {result.stdout.decode().strip()}")
    if not isinstance(parsed, dict):
        raise ValueError("rendered plist is not a dictionary")
    return parsed


def _systemd_quote(arg: str, *, dollar: bool = True) -> str:
    """One double-quoted word with systemd's % specifiers (and, in ExecStart, $ variable
    references) escaped, so paths with spaces or those characters arrive unchanged."""
    escaped = arg.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%")
    return '"' + (escaped.replace("$", "$$") if dollar else escaped) + '"'


def render_systemd_unit(spec: ServiceSpec, template: Path = UNIT_TEMPLATE) -> str:
    """The systemd user unit for `spec`."""
    env_lines = "\n".join(
        f"Environment={_systemd_quote(f'{key}={value}', dollar=False)}"
        for key, value in sorted(spec.env.items())
    )
    return _fill(_read_template(template), {
        "WORKDIR": str(spec.workdir).replace("%", "%%"),
        "EXEC_START": " ".join(_systemd_quote(arg) for arg in spec.argv),
        "ENVIRONMENT": env_lines,
        "RESTART_SEC": "5",
        "STOP_TIMEOUT": str(spec.stop_timeout),
    })


def detect_manager() -> Manager:
    if sys.platform == "darwin":
        return "launchd"
    if sys.platform.startswith("linux"):
        return "systemd"
    raise SystemExit(f"mlx-gateway service: unsupported platform {sys.platform!r}")


def launch_agent_path(label: str = LABEL) -> Path:
    return Path.home() / "Library" / "LaunchAgents" / f"{label}.plist"


def systemd_unit_path() -> Path:
    config_home = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config_home) / "systemd" / "user" / UNIT_NAME


# --- plans: what a command writes and runs, so --dry-run can print it without doing it ---


@dataclass(frozen=True)
class Step:
    """One thing a command does: make a directory, write or remove a file, or run a program."""

    kind: Literal["mkdir", "write", "remove", "run"]
    path: Path | None = None
    content: str = ""
    argv: tuple[str, ...] = ()
    may_fail: bool = False  # e.g. bootout of a job that is not loaded

    def describe(self) -> list[str]:
        if self.kind == "mkdir":
            return [f"would create directory {self.path}"]
        if self.kind == "write":
            return [f"would write {self.path}:",
                    *(f"    {line}" for line in self.content.splitlines())]
        if self.kind == "remove":
            return [f"would remove {self.path}"]
        return ["would run: " + " ".join(self.argv)]


def _mkdir(path: Path) -> Step:
    return Step("mkdir", path=path)


def _write(path: Path, content: str) -> Step:
    return Step("write", path=path, content=content)


def _remove(path: Path) -> Step:
    return Step("remove", path=path)


def _cmd(*argv: str, may_fail: bool = False) -> Step:
    return Step("run", argv=argv, may_fail=may_fail)


@dataclass(frozen=True)
class Plan:
    """What a command writes and runs, in order, so --dry-run can print it unchanged."""

    steps: tuple[Step, ...]

    def describe(self) -> str:
        return "".join(f"{line}\n" for step in self.steps for line in step.describe())

    def execute(self, run: Runner) -> int:
        for step in self.steps:
            if step.kind == "run":
                code = run(step.argv)
                if code != 0 and not step.may_fail:
                    log.error("service command failed", argv=list(step.argv), exit_code=code)
                    return code
                continue
            assert step.path is not None
            if step.kind == "mkdir":
                step.path.mkdir(parents=True, exist_ok=True)
            elif step.kind == "write":
                step.path.parent.mkdir(parents=True, exist_ok=True)
                step.path.write_text(step.content, encoding="utf-8")
                log.info("service file written", path=str(step.path))
            else:
                step.path.unlink(missing_ok=True)
                log.info("service file removed", path=str(step.path))
        return 0


def _gui_domain() -> str:
    return f"gui/{os.getuid()}"


def install_plan(spec: ServiceSpec, manager: Manager) -> Plan:
    if manager == "launchd":
        plist = launch_agent_path(spec.label)
        target = f"{_gui_domain()}/{spec.label}"
        return Plan((
            _mkdir(spec.log_dir),
            _write(plist, render_launchd_plist(spec)),
            _cmd("launchctl", "bootout", target, may_fail=True),  # replace an older version
            _cmd("launchctl", "enable", target),  # undo an earlier `launchctl disable`
            _cmd("launchctl", "bootstrap", _gui_domain(), str(plist)),
        ))
    return Plan((
        _write(systemd_unit_path(), render_systemd_unit(spec)),
        _cmd("systemctl", "--user", "daemon-reload"),
        _cmd("systemctl", "--user", "enable", UNIT_NAME),
        # restart, not start: a re-install must pick up the new unit and config.
        _cmd("systemctl", "--user", "restart", UNIT_NAME),
    ))


def uninstall_plan(manager: Manager, label: str = LABEL) -> Plan:
    if manager == "launchd":
        return Plan((
            _cmd("launchctl", "bootout", f"{_gui_domain()}/{label}", may_fail=True),
            _remove(launch_agent_path(label)),
        ))
    return Plan((
        # Disable while the unit file exists, or its default.target.wants link is left behind.
        _cmd("systemctl", "--user", "disable", "--now", UNIT_NAME, may_fail=True),
        _remove(systemd_unit_path()),
        _cmd("systemctl", "--user", "daemon-reload"),
    ))


def status_plan(manager: Manager, label: str = LABEL) -> Plan:
    if manager == "launchd":
        return Plan((_cmd("launchctl", "print", f"{_gui_domain()}/{label}"),))
    return Plan((_cmd("systemctl", "--user", "status", "--no-pager", UNIT_NAME),))


def logs_plan(manager: Manager, *, lines: int, follow: bool, log_dir: Path,
              log_file: Path | None) -> Plan:
    follow_flag = ("-f",) if follow else ()
    if log_file is not None:  # the app's own rotated file has everything stdout has
        return Plan((_cmd("tail", "-n", str(lines), *follow_flag, str(log_file)),))
    if manager == "launchd":
        files = (str(log_dir / "mlx-gateway.log"), str(log_dir / "mlx-gateway.err.log"))
        return Plan((_cmd("tail", "-n", str(lines), *follow_flag, *files),))
    return Plan((_cmd("journalctl", "--user", "-u", UNIT_NAME, "-n", str(lines), "--no-pager",
                      *follow_flag),))


# --- CLI ------------------------------------------------------------------------------------


def _run(argv: Sequence[str]) -> int:
    log.info("running", argv=list(argv))
    try:
        return subprocess.run(list(argv), check=False).returncode
    except FileNotFoundError:
        log.error("command not found", command=argv[0])
        return 127


def _resolve_config(arg: str | Path | None) -> Path:
    candidates = [arg] if arg else [os.environ.get("MLXGW_CONFIG"),
                                    str(Path.home() / ".config" / "mlx-gateway" / "config.toml")]
    for candidate in candidates:
        if candidate and Path(candidate).expanduser().is_file():
            return Path(candidate).expanduser().absolute()
    if arg:
        raise ConfigError(f"config error: config file {arg} does not exist")
    raise ConfigError("config error: the service needs a config file: pass --config FILE")


def _finish(plan: Plan, args: argparse.Namespace) -> int:
    if args.dry_run:
        sys.stdout.write(plan.describe())
        return 0
    return plan.execute(_run)


def _manager(args: argparse.Namespace) -> Manager:
    return args.manager or detect_manager()


def _cmd_install(args: argparse.Namespace) -> int:
    manager = _manager(args)
    try:
        config = _resolve_config(args.config)
        settings = load_settings(config)  # refuse to install a service that cannot start
    except ConfigError as error:
        sys.stderr.write(f"{error}\n")
        return 2
    env = dict(DEFAULT_ENV)
    for item in args.env or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            sys.stderr.write(f"--env expects KEY=VALUE, got {item!r}\n")
            return 2
        env[key] = value
    spec = ServiceSpec(python=venv_python(), config=config, log_dir=_log_dir(args),
                       shutdown_grace=settings.server.shutdown_grace
                       + settings.server.unready_delay, env=env)
    return _finish(install_plan(spec, manager), args)


def _log_dir(args: argparse.Namespace) -> Path:
    if getattr(args, "log_dir", None):
        return Path(args.log_dir).expanduser().absolute()
    return Path.home() / "Library" / "Logs" / "mlx-gateway"


def _cmd_uninstall(args: argparse.Namespace) -> int:
    return _finish(uninstall_plan(_manager(args)), args)


def _cmd_status(args: argparse.Namespace) -> int:
    return _finish(status_plan(_manager(args)), args)


def _cmd_logs(args: argparse.Namespace) -> int:
    log_file: Path | None = None
    if args.config:
        try:
            configured = load_settings(args.config).log.file
        except ConfigError as error:
            sys.stderr.write(f"{error}\n")
            return 2
        log_file = Path(configured).expanduser() if configured else None
    plan = logs_plan(_manager(args), lines=args.lines, follow=args.follow,
                     log_dir=_log_dir(args), log_file=log_file)
    return _finish(plan, args)


def add_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
                 config: argparse.ArgumentParser) -> None:
    service = subparsers.add_parser(
        "service", help="Run the gateway at login and restart it after a crash.",
        description="Install the gateway as a launchd LaunchAgent (macOS) or a systemd user "
                    "unit (Linux).",
    )
    actions = service.add_subparsers(dest="service_command", required=True)

    def leaf(name: str, help_text: str, handler: Callable[[argparse.Namespace], int]
             ) -> argparse.ArgumentParser:
        parser = actions.add_parser(name, parents=[config], help=help_text,
                                    description=help_text)
        parser.add_argument("--dry-run", action="store_true",
                            help="Print what would be written and run; change nothing.")
        parser.add_argument("--manager", choices=["launchd", "systemd"], default=None,
                            help="Service manager (default: launchd on macOS, systemd on Linux).")
        parser.add_argument("--log-dir", metavar="DIR", default=None,
                            help="launchd log files (default ~/Library/Logs/mlx-gateway).")
        parser.set_defaults(handler=handler)
        return parser

    install = leaf("install", "Write the service definition and start it.", _cmd_install)
    install.add_argument("--env", action="append", metavar="KEY=VALUE",
                         help="Extra environment for the service (repeatable).")
    leaf("uninstall", "Stop the service and remove its definition.", _cmd_uninstall)
    leaf("status", "Show what the service manager knows about the job.", _cmd_status)
    logs = leaf("logs", "Show the service's log lines.", _cmd_logs)
    logs.add_argument("-n", "--lines", type=int, default=100, help="Lines to show.")
    logs.add_argument("-f", "--follow", action="store_true", help="Keep printing new lines.")
