"""`mlx-gateway keys create|list|revoke`. The new key is printed once, alone on the last
line of stdout (scripts take `| tail -n1`); everything else goes to stderr or the table."""

from __future__ import annotations

import argparse
import sys
import time

from redis.exceptions import RedisError

from app.security.keys import KeyRecord, KeyStore
from app.security.revocations import publish_revocation
from app.settings import load_settings


def _store(args: argparse.Namespace) -> KeyStore:
    return KeyStore(load_settings(args.config).keys_file)


def _models(text: str) -> list[str]:
    models = [part.strip() for part in text.split(",") if part.strip()]
    if not models:
        raise argparse.ArgumentTypeError("expected model ids separated by commas")
    return models


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError("must be >= 0 (0 = unlimited)")
    return value


def create_key(args: argparse.Namespace) -> int:
    store = _store(args)
    try:
        record, token = store.create(args.name, admin=args.admin, models=args.models,
                                     rpm=args.rpm, tpm=args.tpm,
                                     visitor_rpm=args.visitor_rpm)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"Created key {record.id} ({record.name}) in {store.path}.", file=sys.stderr)
    print("Copy it now: it is stored hashed and cannot be shown again.", file=sys.stderr)
    sys.stdout.flush()
    print(token)
    return 0


def _limit(value: int | None) -> str:
    return "default" if value is None else str(value)


def _row(record: KeyRecord) -> list[str]:
    return [
        record.id, record.name, "yes" if record.admin else "no",
        ",".join(record.models) if record.models is not None else "*",
        _limit(record.rpm), _limit(record.tpm),
        str(record.visitor_rpm) if record.visitor_rpm else "-",
        time.strftime("%Y-%m-%d %H:%M", time.localtime(record.created)),
        "revoked" if record.revoked else "active",
    ]


def list_keys(args: argparse.Namespace) -> int:
    records = _store(args).records()
    if not records:
        print("no keys (create one with: mlx-gateway keys create --name NAME)", file=sys.stderr)
        return 0
    rows = [["ID", "NAME", "ADMIN", "MODELS", "RPM", "TPM", "VISITOR RPM", "CREATED", "STATUS"]]
    rows += [_row(record) for record in records]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
              .rstrip())
    return 0


def revoke_key(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    if not KeyStore(settings.keys_file).revoke(args.id):
        print(f"error: no key with id {args.id!r} (see: mlx-gateway keys list)", file=sys.stderr)
        return 1
    if settings.redis.url:
        # Every gateway sharing this Redis refuses it too, whatever its own keys file says.
        try:
            publish_revocation(settings.redis.url, args.id)
        except (RedisError, OSError) as error:
            print(f"warning: revoked in {settings.keys_file}, but Redis did not answer "
                  f"({type(error).__name__}): other gateways accept the key until this "
                  "server passes it on (when Redis is back) or their keys files are updated",
                  file=sys.stderr)
            return 1
        print(f"revoked {args.id}; every gateway sharing Redis refuses it within a second or two")
        return 0
    print(f"revoked {args.id}; running servers refuse it within a second or two")
    return 0


def add_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
                 config: argparse.ArgumentParser) -> None:
    keys = subparsers.add_parser("keys", help="create, list and revoke API keys")
    commands = keys.add_subparsers(dest="keys_command", required=True)

    def leaf(name: str, help_text: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, parents=[config], help=help_text)

    create = leaf("create", "create a key; prints it once on the last line")
    create.add_argument("--name", required=True, help="who or what the key is for")
    create.add_argument("--admin", action="store_true", help="may load/unload models, metrics")
    create.add_argument("--models", type=_models, default=None,
                        help="comma-separated model ids this key may use (default: all)")
    create.add_argument("--rpm", type=_non_negative, default=None,
                        help="requests per minute (default: [limits] per_key_rpm; 0 = none)")
    create.add_argument("--tpm", type=_non_negative, default=None,
                        help="tokens per minute (default: [limits] per_key_tpm; 0 = none)")
    create.add_argument("--visitor-rpm", type=_non_negative, default=None,
                        help="requests per minute for each client address using this key, "
                             "for a key a public page embeds (default: none)")
    create.set_defaults(handler=create_key)

    leaf("list", "list keys (never their secrets)").set_defaults(handler=list_keys)

    revoke = leaf("revoke", "revoke a key by id")
    revoke.add_argument("id", help="the key id shown by `keys list`")
    revoke.set_defaults(handler=revoke_key)
