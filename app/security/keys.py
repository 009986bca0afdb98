"""API keys: `mgw-<id>-<secret>`, stored as SHA-256 of the secret in a 0600 JSON file.

The server only reads the file; the `keys` CLI writes it. A running server notices
changes by a cheap stat (mtime, size, inode) at most once per `check_interval`, or at
once through `reload()` (SIGHUP). Secrets are never logged: only key id and name.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import hmac
import json
import os
import re
import secrets
import signal
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import structlog

from app.settings import ConfigError

log = structlog.get_logger(__name__)

KEY_PREFIX = "mgw-"
FILE_VERSION = 1
_ID_RE = re.compile(r"[0-9a-f]{16}")
# Compared against when the id is unknown, so both paths do the same work.
_DUMMY_HASH = hashlib.sha256(b"mlx-gateway-unknown-key").hexdigest()


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def parse_token(token: str) -> tuple[str, str] | None:
    """`mgw-<id>-<secret>` -> (id, secret); None when it does not have that shape."""
    if not token.startswith(KEY_PREFIX):
        return None
    key_id, sep, secret = token[len(KEY_PREFIX):].partition("-")
    if not sep or not secret or not _ID_RE.fullmatch(key_id):
        return None
    return key_id, secret


@dataclass(frozen=True)
class KeyRecord:
    id: str
    name: str
    hash: str
    admin: bool = False
    models: tuple[str, ...] | None = None
    rpm: int | None = None
    tpm: int | None = None
    created: float = 0.0
    revoked: bool = False
    # Requests/minute for each client address using this key: for a key that a public page
    # embeds (anyone can read it), so one visitor cannot use up the key's whole `rpm`.
    visitor_rpm: int | None = None

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["models"] = list(self.models) if self.models is not None else None
        if self.visitor_rpm is None:
            del data["visitor_rpm"]  # files without it read the same in older versions
        return data

    @classmethod
    def from_json(cls, data: Any) -> KeyRecord:
        if not isinstance(data, dict):
            raise ValueError("a key entry must be an object")
        models = data.get("models")
        if models is not None and not (
            isinstance(models, list) and all(isinstance(m, str) for m in models)
        ):
            raise ValueError("models must be a list of strings or null")
        for field in ("rpm", "tpm", "visitor_rpm"):
            value = data.get(field)
            if value is not None and (not isinstance(value, int) or value < 0):
                raise ValueError(f"{field} must be a non-negative integer or null")
        key_id, name, digest = data.get("id"), data.get("name"), data.get("hash")
        if not isinstance(key_id, str) or not _ID_RE.fullmatch(key_id):
            raise ValueError("id must be 16 hex characters")
        if not isinstance(name, str) or not isinstance(digest, str) or len(digest) != 64:
            raise ValueError("name must be a string and hash a sha256 hex digest")
        return cls(
            id=key_id, name=name, hash=digest.lower(), admin=bool(data.get("admin", False)),
            models=tuple(models) if models is not None else None,
            rpm=data.get("rpm"), tpm=data.get("tpm"),
            created=float(data.get("created", 0.0)), revoked=bool(data.get("revoked", False)),
            visitor_rpm=data.get("visitor_rpm"),
        )


def _validate_new(name: str, models: list[str] | None, rpm: int | None, tpm: int | None,
                  visitor_rpm: int | None = None) -> None:
    if not name.strip() or len(name) > 100 or not name.isprintable():
        raise ValueError("name must be 1-100 printable characters")
    if models is not None and (not models or any(not m.strip() for m in models)):
        raise ValueError("models must list at least one non-empty model id")
    for label, value in (("rpm", rpm), ("tpm", tpm), ("visitor_rpm", visitor_rpm)):
        if value is not None and value < 0:
            raise ValueError(f"{label} must be >= 0 (0 = unlimited)")


class KeyStore:
    """Keys file reader/writer; `verify` is safe to call on every request."""

    def __init__(self, path: Path, *, check_interval: float = 1.0) -> None:
        self.path = Path(path).expanduser()
        self.check_interval = check_interval
        self._records: dict[str, KeyRecord] = {}
        self._stamp: tuple[int, int, int] | None = None
        self._checked_at = 0.0
        self._lock = threading.Lock()
        # When each key last authenticated a request, in memory only: a write per request
        # would be costly and would race the CLI; a restart forgets it.
        self._last_used: dict[str, float] = {}
        # Ids revoked on another gateway (app/security/revocations.py keeps it up to date
        # when Redis is configured): refused here even while this file still lists them.
        self.revoked_elsewhere: frozenset[str] = frozenset()
        try:
            self._records, self._stamp = self._read()
        except ValueError as error:
            raise ConfigError(f"config error: keys file {self.path}: {error}") from None
        self._checked_at = time.monotonic()
        self._warn_if_readable()

    # --- reading -------------------------------------------------------------------------

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _read(self) -> tuple[dict[str, KeyRecord], tuple[int, int, int] | None]:
        stamp = self._stat()
        if stamp is None:
            return {}, None
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"cannot read it ({error})") from None
        if not isinstance(data, dict) or data.get("version") != FILE_VERSION:
            raise ValueError(f"expected {{'version': {FILE_VERSION}, 'keys': [...]}}")
        entries = data.get("keys")
        if not isinstance(entries, list):
            raise ValueError("'keys' must be a list")
        records = [KeyRecord.from_json(entry) for entry in entries]
        return {record.id: record for record in records}, stamp

    def _warn_if_readable(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            if self.path.stat().st_mode & 0o077:
                log.warning("keys file is readable by other users; run chmod 600",
                            keys_file=str(self.path))

    def reload(self) -> bool:
        """Re-read the file now (SIGHUP). A broken file keeps the keys already loaded."""
        try:
            records, stamp = self._read()
        except ValueError as error:
            log.error("keys file unreadable; keeping the keys already loaded",
                      keys_file=str(self.path), error=str(error))
            self._stamp = self._stat()  # don't retry a broken file on every request
            return False
        changed = stamp != self._stamp
        self._records, self._stamp = records, stamp
        if changed:
            log.info("keys reloaded", keys_file=str(self.path), count=len(records))
        return True

    def maybe_reload(self) -> None:
        """Reload when the file changed; stats at most once per `check_interval`."""
        now = time.monotonic()
        if now - self._checked_at < self.check_interval:
            return
        self._checked_at = now
        if self._stat() != self._stamp:
            self.reload()

    def records(self) -> list[KeyRecord]:
        self.maybe_reload()
        return sorted(self._records.values(), key=lambda record: record.created)

    def usable(self) -> list[KeyRecord]:
        return [record for record in self.records()
                if not record.revoked and record.id not in self.revoked_elsewhere]

    def verify(self, token: str) -> KeyRecord | None:
        """The live record for a presented key, or None. Constant-time digest comparison."""
        self.maybe_reload()
        parsed = parse_token(token)
        key_id, secret = parsed if parsed else ("", token)
        record = self._records.get(key_id)
        presented = hash_secret(secret)
        expected = record.hash if record else _DUMMY_HASH
        matches = hmac.compare_digest(presented.encode(), expected.encode())
        if record is None or not matches or record.revoked or record.id in self.revoked_elsewhere:
            return None
        self._last_used[record.id] = time.time()
        return record

    def last_used(self, key_id: str) -> float | None:
        """Wall-clock time this key last authenticated a request since start, or None."""
        return self._last_used.get(key_id)

    # --- writing (the CLI; also the first-key bootstrap) ---------------------------------

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[dict[str, KeyRecord]]:
        """Read-modify-write under an flock, so two CLI runs can't lose each other's keys."""
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        lock_path = self.path.with_name(self.path.name + ".lock")
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        with self._lock:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                try:
                    records, _ = self._read()
                except ValueError as error:
                    raise ConfigError(f"config error: keys file {self.path}: {error}") from None
                yield records
                self._write(records)
                self._records, self._stamp = records, self._stat()
            finally:
                os.close(fd)

    def _write(self, records: dict[str, KeyRecord]) -> None:
        payload = {"version": FILE_VERSION,
                   "keys": [record.to_json() for record in records.values()]}
        fd, tmp = tempfile.mkstemp(prefix=".keys-", dir=self.path.parent)  # created 0600
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(payload, handle, indent=2)
                handle.write("\n")
                handle.flush()
                os.fsync(handle.fileno())
            os.chmod(tmp, 0o600)
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    def create(
        self, name: str, *, admin: bool = False, models: list[str] | None = None,
        rpm: int | None = None, tpm: int | None = None, visitor_rpm: int | None = None,
    ) -> tuple[KeyRecord, str]:
        """A new key; returns its record and the full token (shown once, never stored)."""
        _validate_new(name, models, rpm, tpm, visitor_rpm)
        secret = secrets.token_urlsafe(32)  # 256 bits
        with self._exclusive() as records:
            key_id = secrets.token_hex(8)
            while key_id in records:
                key_id = secrets.token_hex(8)
            record = KeyRecord(
                id=key_id, name=name.strip(), hash=hash_secret(secret), admin=admin,
                models=tuple(m.strip() for m in models) if models is not None else None,
                rpm=rpm, tpm=tpm, created=time.time(), visitor_rpm=visitor_rpm,
            )
            records[key_id] = record
        log.info("key created", key_id=key_id, name=record.name, admin=admin)
        return record, f"{KEY_PREFIX}{key_id}-{secret}"

    def revoke(self, key_id: str) -> bool:
        """Mark a key revoked (kept for the audit trail); False when the id is unknown."""
        with self._exclusive() as records:
            record = records.get(key_id)
            if record is None:
                return False
            records[key_id] = replace(record, revoked=True)
        log.info("key revoked", key_id=key_id, name=record.name)
        return True


def reload_on_sighup(store: KeyStore) -> bool:
    """`kill -HUP <pid>` re-reads the keys file. Call from the running loop (lifespan);
    False where the signal can't be hooked (no SIGHUP, or not the main thread)."""
    try:
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, store.reload)
    except (NotImplementedError, RuntimeError, ValueError, AttributeError):
        return False
    return True
