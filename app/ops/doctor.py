"""`mlx-gateway doctor`: the post-install check as one command.

Each check yields one line, ok / warn / fail, with the fix for anything not ok. The exit code is
1 when any check fails, so scripts and CI can gate on it.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import ssl
import stat
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import httpx

from app.security.auth import FIRST_KEY_FILE
from app.settings import ConfigError, Settings, load_settings, parse_bytes
from app.targets.config import UpstreamEntry

Status = Literal["ok", "warn", "fail"]
Verify = ssl.SSLContext | bool
HTTP_TIMEOUT = httpx.Timeout(3.0, connect=1.0)
REDIS_TIMEOUT = 1.0
# Files whose size approximates what a model occupies once loaded.
_WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".npz", ".bin")


@dataclass(frozen=True)
class CheckResult:
    name: str
    status: Status
    detail: str
    fix: str = ""


def _ok(name: str, detail: str) -> CheckResult:
    return CheckResult(name, "ok", detail)


def _warn(name: str, detail: str, fix: str) -> CheckResult:
    return CheckResult(name, "warn", detail, fix)


def _fail(name: str, detail: str, fix: str) -> CheckResult:
    return CheckResult(name, "fail", detail, fix)


# --- config ---------------------------------------------------------------------------------


def check_config(config: str | Path | None) -> tuple[CheckResult, Settings | None]:
    where = str(config) if config else "defaults and MLXGW_* environment"
    try:
        settings = load_settings(config)
    except ConfigError as error:
        return _fail("config", str(error),
                     "fix the lines above (config.example.toml documents every key)"), None
    return _ok("config", f"valid ({where})"), settings


# --- keys -----------------------------------------------------------------------------------


def _active_keys(path: Path) -> int:
    """Count keys that are not revoked; ValueError if the file is not a keys file."""
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise ValueError('expected {"version": 1, "keys": [...]}')
    return sum(1 for key in data["keys"] if isinstance(key, dict) and not key.get("revoked"))


def check_keys(settings: Settings) -> CheckResult:
    exposed = not settings.is_loopback
    where = f"{settings.server.host}:{settings.server.port}"
    create = "mlx-gateway keys create --name NAME"
    if not settings.auth.enabled:
        if exposed:
            return _fail("keys", f"auth is off and the server listens on {where}",
                         'set [auth] enabled = true, or bind [server] host = "127.0.0.1"')
        return _ok("keys", "auth off; loopback only")
    path = settings.keys_file
    try:
        active = _active_keys(path)
    except FileNotFoundError:
        active = -1
    except (OSError, ValueError) as error:
        return _fail("keys", f"{path} is unreadable: {error}",
                     f"restore it from a backup or move it away and run `{create}`")
    if active <= 0:
        what = "no keys file" if active < 0 else "no active keys"
        if exposed:
            return _fail("keys", f"{what} ({path}) but the server listens on {where}",
                         f"run `{create}`")
        return _warn("keys", f"{what} ({path}); every API call will get 401",
                     f"run `{create}`")
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        return _warn("keys", f"{active} active key(s), but {path} is mode {mode:o}",
                     f"chmod 600 {path}")
    leftover = path.parent / FIRST_KEY_FILE
    if leftover.exists():
        return _warn("keys", f"{active} active key(s); the first admin key is still in "
                     f"{leftover}", "keep that key somewhere safe, then delete the file")
    return _ok("keys", f"{active} active key(s) in {path}")


# --- port and HTTP --------------------------------------------------------------------------


def _probe_host(host: str) -> str:
    """Where to connect to reach a server bound to `host`."""
    if host in ("", "0.0.0.0"):  # noqa: S104 - we connect to it, we do not bind it
        return "127.0.0.1"
    if host == "::":
        return "::1"
    return host


def local_url(settings: Settings) -> str:
    host = _probe_host(settings.server.host)
    return f"http://{f'[{host}]' if ':' in host else host}:{settings.server.port}"


def _port_free(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        # As uvicorn does: a socket in TIME_WAIT does not make the port busy.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _is_gateway_health(response: httpx.Response) -> bool:
    """Our /health answers a JSON object with a `status` field."""
    try:
        body = response.json()
    except ValueError:
        return False
    return (isinstance(body, dict) and "status" in body
            and body.get("service", "mlx-gateway") == "mlx-gateway")


def _get(url: str, headers: dict[str, str] | None = None, verify: Verify = True
         ) -> httpx.Response:
    return httpx.get(url, headers=headers, timeout=HTTP_TIMEOUT, follow_redirects=False,
                     verify=verify)


def _unreachable_fix(error: httpx.HTTPError, default: str) -> str:
    if "CERTIFICATE_VERIFY_FAILED" in str(error):
        return ("the server's certificate is not trusted: pass --cacert with Caddy's root "
                "(caddy/pki/authorities/local/root.crt in Caddy's data dir)")
    return default


def check_port(settings: Settings) -> tuple[CheckResult, bool]:
    """(result, whether our server is already answering on the configured port)."""
    host, port = settings.server.host, settings.server.port
    bind_host = "0.0.0.0" if host == "" else host  # noqa: S104 - mirrors the configured bind
    try:
        free = _port_free(bind_host, port)
    except (OSError, UnicodeError) as error:  # e.g. a host name that does not resolve
        return _fail("port", f"cannot bind {host}:{port}: {error}",
                     "set [server] host to an address of this machine"), False
    if free:
        return _ok("port", f"{host}:{port} is free (no server running)"), False
    try:
        response = _get(f"{local_url(settings)}/health")
        ours = _is_gateway_health(response)
    except httpx.HTTPError:
        ours = False
    if ours:
        return _ok("port", f"{host}:{port} is in use by mlx-gateway"), True
    return _fail("port", f"{host}:{port} is in use by another program",
                 f"stop it (`lsof -nP -iTCP:{port} -sTCP:LISTEN` names it) "
                 "or set another [server] port"), False


def check_health(url: str, *, required: bool, verify: Verify = True) -> CheckResult:
    try:
        response = _get(f"{url}/health", verify=verify)
    except httpx.HTTPError as error:
        detail = f"no answer from {url}/health ({type(error).__name__})"
        fix = _unreachable_fix(
            error, "start it: `mlx-gateway serve` or `mlx-gateway service install`")
        return _fail("health", detail, fix) if required else _warn("health", detail, fix)
    if response.status_code != 200 or not _is_gateway_health(response):
        return _fail("health", f"{url}/health answered {response.status_code}, not mlx-gateway",
                     "check --url; `mlx-gateway service logs` shows why the server is unhealthy")
    return _ok("health", f"{url}/health: {response.json()['status']}")


def check_ready(url: str, verify: Verify = True) -> CheckResult | None:
    """/ready is 200 once the default model is resident, 503 while it loads."""
    try:
        response = _get(f"{url}/ready", verify=verify)
        body: Any = response.json()
    except (httpx.HTTPError, ValueError):
        return None  # /health already reported reachability
    if response.status_code == 404:
        return None
    model = body.get("model") if isinstance(body, dict) else None
    if response.status_code == 200:
        return _ok("ready", f"default model {model} is loaded" if model else "ready")
    if model is None:
        return _warn("ready", f"answered {response.status_code}: no default model",
                     "add [[models]] or [discovery] model_dirs to the config")
    return _warn("ready", f"default model {model} is not loaded yet ({response.status_code})",
                 "wait for the load; `mlx-gateway service logs` shows progress or the error")


def check_models_endpoint(url: str, key: str | None, auth_enabled: bool = True,
                          verify: Verify = True) -> CheckResult:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        response = _get(f"{url}/v1/models", headers, verify)
    except httpx.HTTPError as error:
        return _fail("v1/models", f"no answer from {url}/v1/models ({type(error).__name__})",
                     "`mlx-gateway service logs` shows what the server is doing")
    if response.status_code in (401, 403):
        if key:
            return _fail("v1/models", f"the key was refused ({response.status_code})",
                         "check --key; `mlx-gateway keys list` shows active keys")
        return _warn("v1/models", f"needs a key ({response.status_code})",
                     "pass --key (or set MLXGW_API_KEY) to check an authenticated call")
    try:
        body: Any = response.json()
        ids = [str(item["id"]) for item in body["data"]]
    except (ValueError, KeyError, TypeError):
        return _fail("v1/models", f"answered {response.status_code} without a model list",
                     "check --url points at mlx-gateway, not another server")
    if response.status_code != 200:
        return _fail("v1/models", f"answered {response.status_code}", "see the server log")
    if not ids:
        return _warn("v1/models", "answers, but lists no models",
                     "add [[models]] or [discovery] model_dirs to the config")
    shown = ", ".join(ids[:5]) + (f", ... ({len(ids)} in all)" if len(ids) > 5 else "")
    auth = "with the key" if key else "without a key" if auth_enabled else "auth off"
    return _ok("v1/models", f"{len(ids)} model(s) {auth}: {shown}")


# --- upstreams ------------------------------------------------------------------------------


def check_upstreams(settings: Settings) -> list[CheckResult]:
    """Every [[upstreams]] entry: its key variable is set, GET /models answers with the key,
    and the models it is configured for are among those it lists. The key is never shown."""
    return [_check_upstream(entry) for entry in settings.upstreams]


def _check_upstream(entry: UpstreamEntry) -> CheckResult:
    name = f"upstream {entry.id}"
    headers: dict[str, str] = {}
    if entry.api_key_env is not None:
        key = os.environ.get(entry.api_key_env)
        if not key:
            return _fail(name, f"the environment variable {entry.api_key_env} is not set",
                         f"set {entry.api_key_env} where the gateway runs (the service's "
                         "environment), holding that server's API key")
        headers = {"Authorization": f"Bearer {key}", "x-api-key": key}
    try:
        response = httpx.get(f"{entry.base_url}/models", headers=headers,
                             timeout=httpx.Timeout(5.0, connect=entry.connect_timeout))
    except httpx.HTTPError as error:
        return _fail(name, f"no answer from {entry.base_url}/models ({type(error).__name__})",
                     "is it running and reachable from here? check base_url (with its /v1)")
    if response.status_code in (401, 403):
        return _fail(name, f"the key was refused ({response.status_code})",
                     f"check the key in {entry.api_key_env or 'api_key_env (none is set)'}")
    try:
        ids = {str(item["id"]) for item in response.json()["data"]}
    except (ValueError, KeyError, TypeError):
        return _fail(name, f"answered {response.status_code} without a model list",
                     "base_url must be the OpenAI base URL, ending in /v1")
    missing = [m for m in entry.models if m not in ids] if entry.models != "*" else []
    if missing:
        return _warn(name, f"lists {len(ids)} models but not {', '.join(missing)}",
                     "fix the upstream's models list, or load those models there")
    return _ok(name, f"{entry.base_url}: {len(ids)} model(s)")


# --- redis ----------------------------------------------------------------------------------


def check_redis(settings: Settings) -> CheckResult | None:
    url = settings.redis.url
    if url is None:
        if settings.responses.store == "redis":
            return _fail("redis", '[responses] store = "redis" but [redis] url is unset',
                         'set [redis] url, or use [responses] store = "sqlite"')
        return None
    import redis  # imported lazily: most installs never configure it

    client = redis.Redis.from_url(url, socket_timeout=REDIS_TIMEOUT,
                                  socket_connect_timeout=REDIS_TIMEOUT)
    try:
        client.ping()
    except (redis.RedisError, OSError, ValueError) as error:
        return _fail("redis", f"{_safe_redis_url(url)} does not answer PING: {error}",
                     "start redis-server, or unset [redis] url (limits fall back to in-process)")
    finally:
        client.close()
    return _ok("redis", f"{_safe_redis_url(url)} answers PING")


def _safe_redis_url(url: str) -> str:
    """Drop a password from redis://user:pass@host before printing it."""
    scheme, sep, rest = url.partition("://")
    if sep and "@" in rest:
        return f"{scheme}://***@{rest.rsplit('@', 1)[1]}"
    return url


# --- the CPU's BLAS (Linux) ------------------------------------------------------------------


def check_blas() -> CheckResult | None:
    """On Linux MLX multiplies float32 on the CPU with the BLAS it finds: which one `serve`
    runs with, and which kernels. None elsewhere (a Mac computes on Metal)."""
    if not sys.platform.startswith("linux"):
        return None
    from app.ops import system_blas

    library = system_blas.OPENBLAS
    if not library.exists():
        return _warn("blas", "MLX's bundled BLAS: float32 products ~30x slower than OpenBLAS",
                     "install libopenblas0-pthread (make system-deps)")
    detected = system_blas.detected_kernels(library)
    if detected is None:
        return _warn("blas", f"{library} does not load", "reinstall libopenblas0-pthread")
    named = system_blas.with_system_blas(os.environ, library).get("OPENBLAS_CORETYPE")
    if named is None or named == detected:
        return _ok("blas", f"OpenBLAS, {detected} kernels (its own choice for this CPU)")
    return _ok("blas", f"OpenBLAS, {named} kernels (OPENBLAS_CORETYPE; by itself it would run "
                       f"{detected})")


# --- models ---------------------------------------------------------------------------------


def physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def memory_budget(settings: Settings) -> int | None:
    raw = settings.residency.memory_budget.strip()
    if raw.endswith("%"):
        total = physical_memory()
        return None if total is None else int(total * float(raw[:-1]) / 100)
    return parse_bytes(raw)


def weight_bytes(path: Path) -> int:
    """Bytes of weights in a model file or folder: a cheap stand-in for its resident size."""
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*")
               if f.is_file() and f.suffix in _WEIGHT_SUFFIXES)


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 10**8 else f"{n / 1e6:.1f} MB"


def check_models(settings: Settings) -> list[CheckResult]:
    results: list[CheckResult] = []
    budget = memory_budget(settings)
    pinned_total = 0
    for model in settings.models:
        name = f"model {model.id}"
        path = Path(model.path).expanduser()
        if not path.exists():
            results.append(_fail(name, f"{path} does not exist",
                                 "fix [[models]] path, or remove the entry"))
            continue
        size = weight_bytes(path)
        if size == 0:
            results.append(_fail(name, f"{path} holds no weight files (*.safetensors, *.gguf)",
                                 "point path at an MLX model folder or a .gguf file"))
            continue
        if model.pinned:
            pinned_total += size
        if budget is not None and size > budget:
            results.append(_fail(name, f"~{_gb(size)} of weights exceeds the memory budget "
                                       f"{_gb(budget)}",
                                 "raise [residency] memory_budget or use a smaller quant"))
            continue
        results.append(_ok(name, f"{path} (~{_gb(size)})"))
    if budget is not None and pinned_total > budget:
        results.append(_fail("pinned models", f"pinned models need ~{_gb(pinned_total)}, "
                                              f"budget is {_gb(budget)}",
                             "unpin some models or raise [residency] memory_budget"))
    for folder in settings.discovery.model_dirs:
        if not Path(folder).expanduser().is_dir():
            results.append(_warn("model dir", f"{folder} is not a folder",
                                 "fix or remove it in [discovery] model_dirs"))
    results.extend(check_drafts(settings))
    if not settings.models and not settings.discovery.model_dirs:
        results.append(_warn("models", "no [[models]] and no [discovery] model_dirs",
                             "add a [[models]] entry with id and path"))
    return results


def check_drafts(settings: Settings) -> list[CheckResult]:
    """A `draft` model must share its model's tokenizer (serve refuses the config too)."""
    if not any(model.draft for model in settings.models):
        return []
    from app.models.draft_check import draft_problems
    from app.models.registry import ModelRegistry

    problems = draft_problems(ModelRegistry.build(settings, demo_path=None, log_warnings=False))
    if problems:
        return [_fail("draft models", problem, "set draft to a model of the same family "
                      "(same tokenizer), or remove it") for problem in problems]
    return [_ok("draft models", "every draft shares its model's tokenizer")]


# --- all together ---------------------------------------------------------------------------


def run_checks(settings: Settings, *, url: str | None = None, key: str | None = None,
               cacert: Path | None = None) -> list[CheckResult]:
    """Every check after the config check, in the order a person would debug them.
    `cacert` is a CA bundle to trust for an https `url` (Caddy's `tls internal` root)."""
    verify = _verify(cacert)
    results = [check_keys(settings)]
    port_result, ours_running = check_port(settings)
    results.append(port_result)
    base = (url or local_url(settings)).rstrip("/")
    # A foreign program on our port already failed above; asking it for /health again adds
    # nothing. Without --url and with nothing on the port, the server is simply not running.
    if url or port_result.status == "ok":
        health = check_health(base, required=bool(url) or ours_running, verify=verify)
        results.append(health)
        if health.status == "ok":
            results.extend(_server_checks(base, key, settings.auth.enabled, verify))
    redis_result = check_redis(settings)
    if redis_result is not None:
        results.append(redis_result)
    results.extend(check_models(settings))
    blas = check_blas()
    if blas is not None:
        results.append(blas)
    results.extend(check_upstreams(settings))
    return results


def _server_checks(url: str, key: str | None, auth_enabled: bool,
                   verify: Verify) -> list[CheckResult]:
    ready = check_ready(url, verify)
    return [*([ready] if ready else []), check_models_endpoint(url, key, auth_enabled, verify)]


def _verify(cacert: Path | None) -> Verify:
    return ssl.create_default_context(cafile=str(cacert)) if cacert else True


def remote_checks(url: str, *, key: str | None = None,
                  cacert: Path | None = None) -> list[CheckResult]:
    """From a second machine: only what a client sees (no local config, port or models)."""
    verify = _verify(cacert)
    base = url.rstrip("/")
    health = check_health(base, required=True, verify=verify)
    if health.status != "ok":
        return [health]
    return [health, *_server_checks(base, key, True, verify)]


def run_doctor(config: str | Path | None, *, url: str | None = None, key: str | None = None,
               cacert: Path | None = None) -> list[CheckResult]:
    """All checks; with a --url and no config anywhere, only the remote ones."""
    if url and config is None and not os.environ.get("MLXGW_CONFIG"):
        return remote_checks(url, key=key, cacert=cacert)
    config_result, settings = check_config(config)
    if settings is None:
        return [config_result]
    return [config_result, *run_checks(settings, url=url, key=key, cacert=cacert)]


def format_results(results: Iterable[CheckResult]) -> str:
    results = list(results)
    width = max((len(r.name) for r in results), default=0)
    lines: list[str] = []
    for result in results:
        detail_lines = result.detail.splitlines() or [""]
        lines.append(f"{result.status:<4}  {result.name:<{width}}  {detail_lines[0]}")
        indent = " " * (4 + 2 + width + 2)
        lines.extend(f"{indent}{line}" for line in detail_lines[1:])
        if result.fix and result.status != "ok":
            lines.append(f"{indent}fix: {result.fix}")
    return "\n".join(lines) + "\n"


def _cmd_doctor(args: argparse.Namespace) -> int:
    key = args.key or os.environ.get("MLXGW_API_KEY")
    cacert = Path(args.cacert).expanduser() if args.cacert else None
    if cacert is not None and not cacert.is_file():
        sys.stderr.write(f"--cacert {cacert}: no such file\n")
        return 2
    results = run_doctor(args.config, url=args.url, key=key, cacert=cacert)
    sys.stdout.write(format_results(results))
    return 1 if any(r.status == "fail" for r in results) else 0


def add_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
                 config: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser(
        "doctor", parents=[config],
        help="Check config, keys, port, server, Redis and models; exit 1 on failure.",
        description="Run after every install or config change. Each line is ok, warn or fail; "
                    "anything not ok comes with its fix.",
    )
    parser.add_argument("--url", metavar="URL",
                        help="Server to check (default: the configured host and port). From a "
                             "second machine: the address clients use, e.g. https://host.")
    parser.add_argument("--key", metavar="KEY",
                        help="API key for the /v1/models check (default: $MLXGW_API_KEY; the "
                             "environment keeps it out of `ps` and shell history).")
    parser.add_argument("--cacert", metavar="FILE",
                        help="CA certificate to trust for an https --url (Caddy's tls internal "
                             "root.crt).")
    parser.set_defaults(handler=_cmd_doctor)
