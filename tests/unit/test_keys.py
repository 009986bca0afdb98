"""Key store: hashing at rest, 0600, verify/revoke, reload on change, CLI, no secret in logs."""

from __future__ import annotations

import argparse
import hashlib
import json
import stat
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from app.cli import build_parser
from app.security.keys import KeyStore, parse_token


@pytest.fixture
def keys_path(tmp_path: Path) -> Path:
    return tmp_path / "conf" / "keys.json"


def test_create_stores_only_a_hash_with_0600(keys_path: Path) -> None:
    store = KeyStore(keys_path)
    record, token = store.create("alice", models=["m1", "m2"], rpm=5, tpm=100)
    parsed = parse_token(token)
    assert parsed is not None
    key_id, secret = parsed
    assert token.startswith(f"mgw-{record.id}-") and key_id == record.id
    assert len(secret) >= 43  # token_urlsafe(32): 256 bits
    text = keys_path.read_text()
    assert secret not in text
    data = json.loads(text)
    assert data["version"] == 1
    [entry] = data["keys"]
    assert entry == {
        "id": record.id, "name": "alice", "hash": hashlib.sha256(secret.encode()).hexdigest(),
        "admin": False, "models": ["m1", "m2"], "rpm": 5, "tpm": 100,
        "created": entry["created"], "revoked": False,
    }
    assert stat.S_IMODE(keys_path.stat().st_mode) == 0o600
    assert not list(keys_path.parent.glob(".keys-*"))  # no temp file left behind


def test_verify_accepts_only_the_exact_live_key(keys_path: Path) -> None:
    store = KeyStore(keys_path)
    record, token = store.create("bob")
    other, other_token = store.create("carol", admin=True)
    assert store.verify(token) == record
    assert store.verify(other_token) == other
    key_id, secret = parse_token(token)  # type: ignore[misc]
    assert store.verify(f"mgw-{key_id}-{secret}x") is None
    assert store.verify(f"mgw-{key_id}-{secret[:-1]}") is None
    assert store.verify(f"mgw-{other.id}-{secret}") is None  # right secret, wrong id
    assert store.verify(f"mgw-0000000000000000-{secret}") is None
    for junk in ("", secret, "mgw-", f"mgw-{key_id}", f"Bearer {token}", token + "\n"):
        assert store.verify(junk) is None
    assert store.revoke(record.id) is True
    assert store.verify(token) is None
    assert store.verify(other_token) == other
    assert store.revoke("ffffffffffffffff") is False
    assert [r.revoked for r in KeyStore(keys_path).records()] == [True, False]


def test_running_store_picks_up_changes_from_another_writer(keys_path: Path) -> None:
    server = KeyStore(keys_path, check_interval=0)
    cli = KeyStore(keys_path)
    record, token = cli.create("dave")
    assert server.verify(token) == record  # created after the server loaded the file
    cli.revoke(record.id)
    assert server.verify(token) is None


def test_explicit_reload_and_broken_file_keeps_old_keys(keys_path: Path) -> None:
    server = KeyStore(keys_path, check_interval=3600)
    record, token = KeyStore(keys_path).create("erin")
    assert server.verify(token) is None  # not checked yet (interval)
    server.reload()  # SIGHUP
    assert server.verify(token) == record
    keys_path.write_text("{not json")
    with capture_logs() as logs:
        assert server.reload() is False
    assert server.verify(token) == record
    assert any(entry["event"].startswith("keys file unreadable") for entry in logs)


def test_create_validates_input(keys_path: Path) -> None:
    store = KeyStore(keys_path)
    with pytest.raises(ValueError):
        store.create("  ")
    with pytest.raises(ValueError):
        store.create("x", rpm=-1)
    with pytest.raises(ValueError):
        store.create("x", models=[])
    assert not keys_path.exists()


def test_secret_never_reaches_the_logs(keys_path: Path) -> None:
    with capture_logs() as logs:
        store = KeyStore(keys_path, check_interval=0)
        record, token = store.create("frank", admin=True)
        store.verify(token)
        store.revoke(record.id)
        store.verify(token)
    secret = parse_token(token)[1]  # type: ignore[index]
    assert logs, "expected create/revoke to be logged"
    assert secret not in repr(logs) and token not in repr(logs)
    assert record.id in repr(logs) and "frank" in repr(logs)


# --- CLI -------------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    return build_parser()


def _run(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    code: int = args.handler(args)
    return code


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "gateway.toml"
    path.write_text(f'config_dir = "{tmp_path / "cfg"}"\n')
    return path


def test_cli_create_list_revoke(config: Path, tmp_path: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    code = _run(["keys", "create", "--name", "laptop", "--models", "a, b", "--rpm", "7",
                 "--config", str(config)])
    assert code == 0
    out = capsys.readouterr().out
    token = out.rstrip("\n").splitlines()[-1]
    store = KeyStore(tmp_path / "cfg" / "keys.json")
    record = store.verify(token)
    assert record is not None
    assert (record.name, record.models, record.rpm, record.tpm, record.admin) == (
        "laptop", ("a", "b"), 7, None, False)

    assert _run(["keys", "create", "--name", "ops", "--admin", "--config", str(config)]) == 0
    capsys.readouterr()
    assert _run(["keys", "list", "--config", str(config)]) == 0
    table = capsys.readouterr().out
    lines = table.splitlines()
    assert lines[0].split()[:3] == ["ID", "NAME", "ADMIN"]
    assert any(line.startswith(record.id) and "laptop" in line and "a,b" in line
               and "active" in line for line in lines)
    assert token not in table and record.hash not in table

    assert _run(["keys", "revoke", record.id, "--config", str(config)]) == 0
    assert store.reload() and store.verify(token) is None
    capsys.readouterr()
    assert _run(["keys", "list", "--config", str(config)]) == 0
    assert "revoked" in capsys.readouterr().out
    assert _run(["keys", "revoke", "0123456789abcdef", "--config", str(config)]) == 1


def test_cli_rejects_bad_numbers(config: Path) -> None:
    with pytest.raises(SystemExit):
        _parser().parse_args(["keys", "create", "--name", "x", "--rpm", "-3"])
    with pytest.raises(SystemExit):
        _parser().parse_args(["keys", "create", "--name", "x", "--tpm", "lots"])
    with pytest.raises(SystemExit):
        _parser().parse_args(["keys", "create"])  # --name is required


async def test_sighup_reloads(keys_path: Path) -> None:
    import asyncio
    import os
    import signal

    from app.security.keys import reload_on_sighup

    server = KeyStore(keys_path, check_interval=3600)
    assert reload_on_sighup(server)
    try:
        record, token = KeyStore(keys_path).create("grace")
        assert server.verify(token) is None
        os.kill(os.getpid(), signal.SIGHUP)
        for _ in range(200):  # let the loop run the handler
            if server.verify(token) is not None:
                break
            await asyncio.sleep(0.01)
        assert server.verify(token) == record
    finally:
        asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)


def test_redaction_processor_masks_keys_anywhere() -> None:
    from app.logging import redact_processor

    token = "mgw-0123456789abcdef-AbC_d-eF0123456789abcdefABCDEF0123456789xyz"
    event = {"event": f"bad header Authorization: Bearer {token}",
             "headers": [("authorization", f"Bearer {token}")], "nested": {"url": f"/x?k={token}"},
             "count": 3}
    out = redact_processor(None, "info", dict(event))  # type: ignore[arg-type]
    assert token not in repr(out)
    assert "***" in out["event"]
    assert "AbC_d" not in repr(out["headers"]) and "AbC_d" not in repr(out["nested"])
    assert out["count"] == 3
