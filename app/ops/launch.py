"""`mlx-gateway launch claude | codex | opencode`: run a coding agent against this gateway.

Each client is told, in its own terms, where the gateway is, which model to ask for, how big
its context window is (so it compacts before it overflows) and which key to use. The key
travels only in the client's environment: config files name the variable, never the secret.
A key made for a client is kept in a 0600 file under the config dir and reused while valid.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from app.models.registry import ModelRegistry
from app.ops.doctor import local_url
from app.security.keys import KeyStore, parse_token
from app.settings import ConfigError, Settings, load_settings

KEY_VARIABLE = "MLXGW_API_KEY"
PROVIDER_ID = "mlxgw"
CLIENTS = {
    # client -> (executable, npm package that installs it)
    "claude": ("claude", "@anthropic-ai/claude-code"),
    "codex": ("codex", "@openai/codex"),
    "opencode": ("opencode", "opencode-ai"),
}


@dataclass
class LaunchPlan:
    argv: list[str]
    env: dict[str, str]  # added to (or, with an empty value, removed from) the environment
    files: dict[Path, str] = field(default_factory=dict)
    secret: str | None = None  # the key, for masking in --print output
    defaults: dict[str, str] = field(default_factory=dict)  # set unless the user set them


@dataclass(frozen=True)
class Target:
    url: str  # the gateway's root, no /v1
    model: str
    context: int
    max_output: int
    key: str


def plan_for(client: str, target: Target, *, args: list[str], home: Path,
             clients_dir: Path) -> LaunchPlan:
    executable = CLIENTS[client][0]
    if client == "claude":
        model_vars = ("ANTHROPIC_MODEL", "ANTHROPIC_SMALL_FAST_MODEL",
                      "ANTHROPIC_DEFAULT_OPUS_MODEL", "ANTHROPIC_DEFAULT_SONNET_MODEL",
                      "ANTHROPIC_DEFAULT_HAIKU_MODEL")
        env = {
            "ANTHROPIC_BASE_URL": target.url,
            "ANTHROPIC_AUTH_TOKEN": target.key,
            "ANTHROPIC_API_KEY": "",  # a real Anthropic key would take precedence
            **dict.fromkeys(model_vars, target.model),
            # No telemetry, error reports, update checks: only the gateway is spoken to.
            "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        }
        # Not CLAUDE_CODE_MAX_CONTEXT_TOKENS: given the real window, Claude Code 2.1 keeps
        # fixed buffers (13k below it to compact, 3k to refuse on its own count) that leave
        # nothing of an 8k window, so it refuses after the first packed answer.
        sizes = {"CLAUDE_CODE_MAX_OUTPUT_TOKENS": str(target.max_output),
                 **_claude_compaction(target, _claude_max_output(target)),
                 # Claude Code drops a stream that sends no message event for 5 minutes (pings
                 # do not count) and sends it again: a long prompt's prefill on a local model
                 # can take that long, and each retry starts it over.
                 "CLAUDE_STREAM_IDLE_TIMEOUT_MS": str(CLAUDE_STREAM_IDLE_MS)}
        return LaunchPlan([executable, *args], env, secret=target.key, defaults=sizes)
    if client == "codex":
        codex_home = Path(os.environ.get("CODEX_HOME") or home / ".codex")
        profile = codex_home / f"{PROVIDER_ID}.config.toml"
        return LaunchPlan([executable, "--profile", PROVIDER_ID, *args],
                          {KEY_VARIABLE: target.key}, {profile: _codex_profile(target)},
                          secret=target.key)
    path = clients_dir / "opencode.json"
    return LaunchPlan([executable, *args],
                      {KEY_VARIABLE: target.key, "OPENCODE_CONFIG": str(path)},
                      {path: _opencode_config(target)}, secret=target.key)


# Claude Code 2.1 raises CLAUDE_CODE_AUTO_COMPACT_WINDOW to at least this, and caps it at the
# window it assumes for a model it does not know.
CLAUDE_MIN_COMPACT_WINDOW = 100_000
CLAUDE_DEFAULT_WINDOW = 200_000
CLAUDE_STREAM_IDLE_MS = 1_800_000
# Claude Code's own prompt with its default tools is ~18.4k tokens (bench/RESULTS.md), and a
# compaction shrinks only the conversation: below this context the request is back over the
# threshold a turn after each compaction (Claude Code gives up after three, "Autocompact is
# thrashing"). There its compaction is turned off and the gateway's packing fits each request.
CLAUDE_MIN_CONTEXT_TO_COMPACT = 32_768


def _claude_max_output(target: Target) -> int:
    """The answer size Claude Code will ask for: the user's own setting wins over ours."""
    mine = os.environ.get("CLAUDE_CODE_MAX_OUTPUT_TOKENS", "")
    return int(mine) if mine.isdigit() and int(mine) > 0 else target.max_output


def _claude_compaction(target: Target, max_output: int) -> dict[str, str]:
    """Claude Code's auto-compaction at the model's real size. It compacts when the
    conversation reaches AUTOCOMPACT_PCT_OVERRIDE percent of its window, and that window is
    never below 100k: for a smaller model the percentage carries the real size (a 32k model
    answering up to 8,192: compact at 24,576 tokens of a 100k window = 24.576%). Below
    CLAUDE_MIN_CONTEXT_TO_COMPACT it is off."""
    if target.context < CLAUDE_MIN_CONTEXT_TO_COMPACT:
        return {"DISABLE_AUTO_COMPACT": "1"}
    window = min(CLAUDE_DEFAULT_WINDOW, max(CLAUDE_MIN_COMPACT_WINDOW, target.context))
    threshold = max(1, target.context - max_output)
    percent = round(100 * threshold / window, 3)
    return {"CLAUDE_CODE_AUTO_COMPACT_WINDOW": str(target.context),
            "CLAUDE_AUTOCOMPACT_PCT_OVERRIDE": f"{percent:g}"}


def _codex_profile(target: Target) -> str:
    """A Codex profile file: Codex 0.171 reads `<CODEX_HOME>/<profile>.config.toml` for
    `--profile <profile>` on top of the user's config.toml, which stays untouched."""
    return "\n".join([
        "# Written by `mlx-gateway launch codex`; rewritten on each launch.",
        f"model = {json.dumps(target.model)}",
        f'model_provider = "{PROVIDER_ID}"',
        f"model_context_window = {target.context}",
        # Codex 0.171 has no output-size setting (model_max_output_tokens is gone); it compacts
        # its history at this many tokens, which leaves `max_output` for the answer.
        f"model_auto_compact_token_limit = {max(1, target.context - target.max_output)}",
        "",
        f"[model_providers.{PROVIDER_ID}]",
        'name = "mlx-gateway"',
        f"base_url = {json.dumps(target.url + '/v1')}",
        f'env_key = "{KEY_VARIABLE}"',
        'wire_api = "responses"',
        "",
    ])


def _opencode_config(target: Target) -> str:
    return json.dumps({
        "$schema": "https://opencode.ai/config.json",
        "provider": {PROVIDER_ID: {
            "npm": "@ai-sdk/openai-compatible",
            "name": "mlx-gateway",
            "options": {"baseURL": target.url + "/v1", "apiKey": f"{{env:{KEY_VARIABLE}}}"},
            "models": {target.model: {"name": target.model, "limit": {
                "context": target.context, "output": target.max_output}}},
        }},
        "model": f"{PROVIDER_ID}/{target.model}",
    }, indent=2) + "\n"


def client_key(settings: Settings, client: str, model_id: str) -> str:
    """A key that may use `model_id`, made once per client and kept in a 0600 file."""
    if not settings.auth.enabled:
        return "unused"  # loopback without keys; the clients still want a value
    store = KeyStore(settings.keys_file)
    saved = settings.config_dir / "clients" / f"{client}.key"
    if saved.exists():
        token = saved.read_text().strip()
        record = store.verify(token)
        if record is not None and (record.models is None or model_id in record.models):
            return token
    _, token = store.create(f"launch {client}", models=[model_id])
    saved.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(saved, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(token + "\n")
    return token


def target_for(settings: Settings, model: str | None, url: str | None, key: str) -> Target:
    registry = ModelRegistry.from_settings(settings, log_warnings=False)
    name = model or registry.default_id
    if name is None:
        raise ConfigError("config error: no models configured; pass --model or add [[models]]")
    spec = registry.resolve(name)
    base = (url or local_url(settings)).rstrip("/").removesuffix("/v1")
    return Target(base, spec.id, spec.context_length, spec.max_output_tokens, key)


def apply(plan: LaunchPlan) -> dict[str, str]:
    """Write the plan's files; the environment the client runs with."""
    for path, content in plan.files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
    env = {**plan.defaults, **os.environ}
    for name, value in plan.env.items():
        if value:
            env[name] = value
        else:
            env.pop(name, None)
    return env


def describe(plan: LaunchPlan) -> str:
    """What --print shows: variables, files and the command, the key masked."""

    def mask(text: str) -> str:
        parsed = parse_token(plan.secret) if plan.secret else None
        if plan.secret is None or parsed is None:
            return text  # no gateway key (auth off): nothing secret to hide
        return text.replace(plan.secret, f"mgw-{parsed[0]}-***")

    lines = [f"{name}={mask(value)}" if value else f"unset {name}"
             for name, value in plan.env.items()]
    lines += [f"{name}={value} (unless set)" for name, value in plan.defaults.items()]
    for path, content in plan.files.items():
        lines += [f"--- {path}", mask(content).rstrip("\n")]
    lines.append("$ " + " ".join(plan.argv))
    return "\n".join(lines)


def _run(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    executable, package = CLIENTS[args.client]
    passthrough: list[str] = args.passthrough
    if args.print_only:
        key = "mgw-<created on launch>" if settings.auth.enabled else "unused"
    else:
        if shutil.which(executable) is None:
            print(f"{executable} is not installed: npm install -g {package}", file=sys.stderr)
            return 127
        # The client owns stdout (its answer may be piped on): our log lines go to stderr.
        # This process becomes the client next, so changing logging for good is fine.
        structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
        model_id = target_for(settings, args.model, args.url, "").model
        key = client_key(settings, args.client, model_id)
    target = target_for(settings, args.model, args.url, key)
    plan = plan_for(args.client, target, args=passthrough, home=Path.home(),
                    clients_dir=settings.config_dir / "clients")
    if args.print_only:
        print(describe(plan))
        return 0
    env = apply(plan)
    os.execvpe(executable, plan.argv, env)  # noqa: S606 (the user asked to run this client)


def add_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
                 config: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser(
        "launch", parents=[config],
        help="Run Claude Code, Codex or OpenCode against this gateway.",
        description="Creates a key scoped to the model if needed, writes the client's own "
                    "config (Codex profile, OpenCode provider) or environment (Claude Code), "
                    "then runs the client. Arguments after -- go to the client.")
    parser.add_argument("client", choices=sorted(CLIENTS))
    parser.add_argument("--model", default=None, help="Model id or alias (default: the default).")
    parser.add_argument("--url", default=None,
                        help="The gateway's address (default: the configured host and port).")
    parser.add_argument("--print", dest="print_only", action="store_true",
                        help="Show what would be set and run; change nothing.")
    # Everything after `--` is the client's: app/cli.py hands unparsed arguments to commands
    # that set `passthrough`.
    parser.set_defaults(handler=_run, passthrough=[])
