"""The `mlx-gateway` command: serve, models, keys, bench, doctor, service, status."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from app.settings import ConfigError, load_settings

# Nothing may reach a model hub at run time; local folders only.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")



def _serve(args: argparse.Namespace) -> int:
    from app.http.app import create_app
    from app.http.server import DrainingServer
    from app.logging import configure_logging
    from app.models.cli import ensure_demo
    from app.security.auth import announce_first_key, check_bind_safety, ensure_first_key
    from app.security.keys import KeyStore

    overrides: dict[str, Any] = {}
    if args.host is not None:
        overrides["host"] = args.host
    if args.port is not None:
        overrides["port"] = args.port
    settings = load_settings(args.config, **({"server": overrides} if overrides else {}))
    configure_logging(settings.log)
    # A public bind needs keys made on purpose; the convenience first key is for loopback.
    check_bind_safety(settings, KeyStore(settings.keys_file) if settings.auth.enabled else None)
    first_key = ensure_first_key(settings)
    if first_key is not None:
        announce_first_key(first_key, settings.keys_file, sys.stdout)
    if not settings.models and not settings.discovery.model_dirs:
        ensure_demo(settings, quiet=True)
    app = create_app(settings)
    DrainingServer(app, host=settings.server.host, port=settings.server.port,
                   grace=settings.server.shutdown_grace,
                   unready_delay=settings.server.unready_delay).run()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mlx-gateway", description="Serve local MLX models as an OpenAI-compatible API."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    # Every subcommand that reads the config takes the same --config.
    config = argparse.ArgumentParser(add_help=False)
    config.add_argument("--config", type=Path, default=None,
                        help="TOML config file (default: $MLXGW_CONFIG)")

    serve = commands.add_parser("serve", parents=[config], help="run the gateway")
    serve.add_argument("--host", default=None, help="bind address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=None, help="TCP port (default 8000)")
    serve.set_defaults(handler=_serve)

    from app.models import cli as models_cli
    from app.ops import bench, doctor, launch, service_manager, status
    from app.security import cli as keys_cli

    for module in (models_cli, keys_cli, doctor, service_manager, launch, status):
        module.add_commands(commands, config)
    bench.add_commands(commands)  # talks to a URL; reads no config
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        if getattr(args, "passthrough", None) is None:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.passthrough = extra[1:] if extra[0] == "--" else extra
    if argv is None and args.handler is _serve:
        # Before MLX loads: on Linux the system OpenBLAS is preloaded into a fresh process.
        from app.ops.system_blas import reexec_with_system_blas
        reexec_with_system_blas()
    try:
        code: int = args.handler(args)
    except ConfigError as error:
        print(error, file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
