"""`mlx-gateway models demo | list`: the demo model and the catalog, without a server."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from app.models.registry import ModelRegistry
from app.settings import Settings, format_bytes, load_settings


def format_table(registry: ModelRegistry) -> str:
    header = ("ID", "SOURCE", "FORMAT", "SIZE", "MEMORY", "CONTEXT", "PINNED", "ALIASES")
    rows = [header]
    for spec in registry.specs:
        rows.append((spec.id, spec.source, spec.format, format_bytes(spec.weight_bytes),
                     format_bytes(spec.estimated_bytes), str(spec.context_length),
                     "yes" if spec.pinned else "no", ", ".join(spec.aliases) or "-"))
    if len(rows) == 1:
        return ("no models: add [[models]] entries or [discovery] model_dirs to the config, "
                "or run `mlx-gateway models demo`")
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
             for row in rows]
    return "\n".join(lines)


def _list_handler(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    registry = ModelRegistry.from_settings(settings, log_warnings=False)
    print(format_table(registry))
    for message in registry.warnings:
        print(f"warning: {message}", file=sys.stderr)
    return 0


def ensure_demo(settings: Settings, *, quiet: bool = False) -> Path:
    """The demo model's MLX folder, fetched and converted on first use."""
    from app.models.demo import ensure_demo_model

    def progress(done: int, total: int) -> None:
        if not quiet and sys.stderr.isatty():
            width = 30
            filled = width * done // max(total, 1)
            print(f"\rconverting [{'#' * filled}{'.' * (width - filled)}] {done}/{total}",
                  end="" if done < total else "\n", file=sys.stderr)

    return ensure_demo_model(settings.cache_dir, progress=progress)


def _demo_handler(args: argparse.Namespace) -> int:
    print(ensure_demo(load_settings(args.config)))
    return 0


def add_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
                 config: argparse.ArgumentParser) -> None:
    models = subparsers.add_parser("models", help="model registry and the demo model")
    commands = models.add_subparsers(dest="models_command", required=True)
    commands.add_parser(
        "demo", parents=[config], help="fetch and convert the demo model; print its folder",
    ).set_defaults(handler=_demo_handler)
    commands.add_parser(
        "list", parents=[config],
        help="Print the models the gateway would serve, without starting it.",
    ).set_defaults(handler=_list_handler)
