"""`mlx-gateway status`: what the running gateway is doing, as the console shows it.

Prints GET /v1/admin/status as a few aligned lines (or the JSON with --json). The admin key
comes from --key or $MLXGW_API_KEY (the environment keeps it out of `ps` and shell history).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import httpx

from app.settings import ConfigError, format_bytes, load_settings

TIMEOUT = httpx.Timeout(5.0, connect=2.0)


def _ago(epoch: float | None, now: float) -> str:
    if not epoch:
        return "never"
    return f"{_duration(max(0.0, now - epoch))} ago"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{seconds // 60:.0f}m{seconds % 60:02.0f}s"
    return f"{seconds // 3600:.0f}h{(seconds % 3600) // 60:02.0f}m"


def _off(value: int | None, unit: str) -> str:
    return f"{value} {unit}" if value else f"{unit} off"


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
            for row in rows]


def format_status(status: dict[str, Any]) -> str:
    now = float(status.get("time") or time.time())
    lines = [f"mlx-gateway {status['version']}, up {_duration(status['uptime_seconds'])}, "
             f"default model {status['default_model'] or 'none'}"
             + ("" if status["auth_enabled"] else ", auth off"), ""]
    models = [["MODEL", "STATE", "SIZE", "PINNED", "TTL LEFT", "IN FLIGHT", "WAITING",
               "ALIASES"]]
    for m in status["models"]:
        state = "loading" if m["loading"] else "loaded" if m["loaded"] else "unloaded"
        models.append([m["id"], state, format_bytes(m["size_bytes"]),
                       "yes" if m["pinned"] else "no",
                       _duration(m["ttl_left_seconds"]) if m["loaded"] else "",
                       str(m["in_flight"]), str(m["waiting"]), ", ".join(m["aliases"])])
    lines += [*_table(models), ""]

    mem, lim, traffic = status["memory"], status["limits"], status["traffic"]
    active = mem["mlx_active_bytes"]
    lines.append(f"memory   {format_bytes(mem['used_bytes'])} of "
                 f"{format_bytes(mem['budget_bytes'])} budget (estimated), MLX active "
                 f"{format_bytes(active) if active is not None else '-'}, "
                 f"at most {mem['max_loaded_models']} models")
    breaker = lim.get("breaker") or {}
    lines.append(f"limits   per key {_off(lim['per_key_rpm'], 'rpm')}, "
                 f"{_off(lim['per_key_tpm'], 'tpm')}; per IP {_off(lim['per_ip_rpm'], 'rpm')}; "
                 f"global {_off(lim['global_rpm'], 'rpm')}; kept in {lim['backend']}"
                 + (" (down, in-process fallback)" if lim.get("redis_up") is False else ""))
    lines.append(f"engine   {lim['inflight']}/{lim['max_inflight']} generating, "
                 f"{lim['queued']}/{lim['max_queue']} queued; breaker "
                 f"{breaker.get('state', '-')} ({breaker.get('consecutive_failures', 0)}/"
                 f"{breaker.get('failures_to_open', '-')} failures)")
    lines.append(f"traffic  {traffic['requests_last_minute']} requests in the last minute, "
                 f"{traffic['refused_last_minute']} refused")
    reasons = traffic["refusals_by_reason"]
    if reasons:
        lines.append("refused  " + ", ".join(f"{n} {why}" for why, n in reasons.items())
                     + " (since start)")
        for r in traffic["recent_refusals"][:5]:
            who = r["key_name"] or r["client_ip"] or "?"
            lines.append(f"         {_ago(r['at'], now)}: {r['status']} {r['reason']} "
                         f"{r['path']} ({who})")
    if status["keys"]:
        keys = [["KEY", "ID", "ADMIN", "MODELS", "LAST USED", "STATE"]]
        for k in status["keys"]:
            keys.append([k["name"], k["id"], "yes" if k["admin"] else "no",
                         ", ".join(k["models"]) if k["models"] is not None else "all",
                         _ago(k["last_used"], now), "revoked" if k["revoked"] else "active"])
        lines += ["", *_table(keys)]
    targets = [*status.get("upstreams", []), *status.get("routes", [])]
    if targets:
        lines += ["", f"upstreams and routes: {len(targets)}"]
    return "\n".join(lines) + "\n"


def fetch_status(url: str, key: str | None) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    response = httpx.get(url.rstrip("/") + "/v1/admin/status", headers=headers, timeout=TIMEOUT)
    if response.status_code in (401, 403):
        raise PermissionError("an admin key is needed: pass --key or set MLXGW_API_KEY "
                              f"(the server said {response.status_code})")
    response.raise_for_status()
    body: dict[str, Any] = response.json()
    return body


def _cmd_status(args: argparse.Namespace) -> int:
    url = args.url
    if url is None:
        from app.ops.doctor import local_url

        try:
            url = local_url(load_settings(args.config))
        except ConfigError as error:
            sys.stderr.write(f"{error}\n")
            return 2
    key = args.key or os.environ.get("MLXGW_API_KEY")
    try:
        status = fetch_status(url, key)
    except PermissionError as error:
        sys.stderr.write(f"{error}\n")
        return 1
    except httpx.HTTPError as error:
        sys.stderr.write(f"cannot read {url}/v1/admin/status: {error}\n")
        return 1
    sys.stdout.write(json.dumps(status, indent=2) + "\n" if args.json else format_status(status))
    return 0


def add_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
                 config: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser(
        "status", parents=[config],
        help="Show what the running gateway is doing (models, memory, limits, traffic, keys).",
        description="Reads GET /v1/admin/status with an admin key, as the browser console "
                    "(/console) does.",
    )
    parser.add_argument("--url", metavar="URL",
                        help="Gateway to ask (default: the configured host and port).")
    parser.add_argument("--key", metavar="KEY",
                        help="Admin key (default: $MLXGW_API_KEY, which keeps it out of `ps` "
                             "and shell history).")
    parser.add_argument("--json", action="store_true", help="Print the raw JSON.")
    parser.set_defaults(handler=_cmd_status)

