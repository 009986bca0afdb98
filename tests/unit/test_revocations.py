"""Revocations shared through Redis: a key revoked with one machine's CLI is refused by a
gateway whose own keys file still lists it as active (a real redis-server, no mocks)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.cli import build_parser
from app.security.keys import KeyStore
from app.security.revocations import REVOKED_SET, SharedRevocations
from tests.redis_server import RedisServer


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


def _machine(root: Path, name: str, redis_url: str | None) -> Path:
    """A config file for one machine, with its own config_dir (its own keys file)."""
    config = root / f"{name}.toml"
    lines = [f'config_dir = "{root / name}"']
    if redis_url:
        lines.append(f'[redis]\nurl = "{redis_url}"')
    config.write_text("\n".join(lines) + "\n")
    return config


def _run(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.handler(args)
    return code


async def test_revoked_on_one_machine_is_refused_by_another(
        tmp_path: Path, redis_server: RedisServer) -> None:
    one = _machine(tmp_path, "one", redis_server.url)
    _machine(tmp_path, "two", redis_server.url)
    keys_one = KeyStore(tmp_path / "one" / "keys.json")
    record, token = keys_one.create("laptop")
    # The operator copies the keys file to the second machine once.
    (tmp_path / "two").mkdir()
    shutil.copy(keys_one.path, tmp_path / "two" / "keys.json")
    keys_two = KeyStore(tmp_path / "two" / "keys.json")
    watcher = SharedRevocations(redis_server.url, keys_two)
    try:
        await watcher.refresh()
        assert keys_two.verify(token) is not None

        assert _run(["keys", "revoke", record.id, "--config", str(one)]) == 0
        await watcher.refresh()
        assert keys_two.verify(token) is None
        assert record.id not in {r.id for r in keys_two.usable()}
        # Its own file still says active: the refusal comes from Redis alone.
        assert not KeyStore(keys_two.path).records()[0].revoked

        # A flushed (or replaced) Redis does not bring the key back: the known set only grows.
        await watcher._redis.flushdb()
        await watcher.refresh()
        assert keys_two.verify(token) is None
    finally:
        await watcher.close()


async def test_a_revocation_made_without_redis_spreads_from_the_server(
        tmp_path: Path, redis_server: RedisServer) -> None:
    """Revoked in a file whose CLI had no Redis (or Redis was down): the server reading that
    file publishes it, so the other gateways learn it too."""
    alone = _machine(tmp_path, "alone", None)
    keys_alone = KeyStore(tmp_path / "alone" / "keys.json")
    record, token = keys_alone.create("ci")
    (tmp_path / "other").mkdir()
    shutil.copy(keys_alone.path, tmp_path / "other" / "keys.json")
    assert _run(["keys", "revoke", record.id, "--config", str(alone)]) == 0

    server_alone = SharedRevocations(redis_server.url, KeyStore(keys_alone.path))
    keys_other = KeyStore(tmp_path / "other" / "keys.json")
    server_other = SharedRevocations(redis_server.url, keys_other)
    try:
        assert keys_other.verify(token) is not None
        await server_alone.refresh()
        assert record.id.encode() in await server_alone._redis.smembers(REVOKED_SET)
        await server_other.refresh()
        assert keys_other.verify(token) is None
    finally:
        await server_alone.close()
        await server_other.close()


def test_cli_says_so_when_redis_does_not_answer(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Revoked locally, but the other gateways were not told: exit 1 and say what to do."""
    down = RedisServer()  # never started: its port refuses connections
    config = _machine(tmp_path, "m", down.url)
    record, token = KeyStore(tmp_path / "m" / "keys.json").create("x")
    assert _run(["keys", "revoke", record.id, "--config", str(config)]) == 1
    assert "other gateways accept the key" in capsys.readouterr().err
    assert KeyStore(tmp_path / "m" / "keys.json").verify(token) is None
