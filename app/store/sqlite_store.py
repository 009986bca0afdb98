"""Stored responses in one embedded SQLite file, so conversations survive a restart."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import threading
import time
from pathlib import Path

import structlog

from app.store.base import StoredResponse

log = structlog.get_logger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS responses_expires_at ON responses (expires_at);
"""


class SqliteStore:
    """sqlite3 is blocking, so every call runs in a worker thread behind one lock.

    Expired rows are invisible on read and deleted by a purge that runs at most every
    `purge_interval` seconds, piggybacking on writes (no background task to manage).
    """

    def __init__(self, path: Path, *, purge_interval: float = 600.0) -> None:
        self.path = path
        self.purge_interval = purge_interval
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not path.exists():
            # Conversations are private: create the file owner-only before sqlite opens it.
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = sqlite3.connect(
            str(path), check_same_thread=False, isolation_level=None
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        self._last_purge = 0.0
        self._purge_now()

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError("response store is closed")
        return self._db

    def _purge_now(self) -> int:
        with self._lock:
            cursor = self._conn().execute(
                "DELETE FROM responses WHERE expires_at <= ?", (time.time(),)
            )
        self._last_purge = time.monotonic()
        if cursor.rowcount:
            log.info("responses_purged", count=cursor.rowcount)
        return cursor.rowcount

    def _put(self, item: StoredResponse) -> None:
        with self._lock:
            self._conn().execute(
                "INSERT OR REPLACE INTO responses (id, owner, created_at, expires_at, body) "
                "VALUES (?, ?, ?, ?, ?)",
                (item.id, item.owner, item.created_at, item.expires_at, item.to_json()),
            )
        if time.monotonic() - self._last_purge >= self.purge_interval:
            self._purge_now()

    def _get(self, response_id: str, owner: str) -> StoredResponse | None:
        with self._lock:
            row = self._conn().execute(
                "SELECT body FROM responses WHERE id = ? AND owner = ? AND expires_at > ?",
                (response_id, owner, time.time()),
            ).fetchone()
        return StoredResponse.from_json(row[0]) if row else None

    def _delete(self, response_id: str, owner: str) -> bool:
        with self._lock:
            cursor = self._conn().execute(
                "DELETE FROM responses WHERE id = ? AND owner = ? AND expires_at > ?",
                (response_id, owner, time.time()),
            )
        return cursor.rowcount > 0

    def _close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    async def put(self, item: StoredResponse) -> None:
        await asyncio.to_thread(self._put, item)

    async def get(self, response_id: str, owner: str) -> StoredResponse | None:
        return await asyncio.to_thread(self._get, response_id, owner)

    async def delete(self, response_id: str, owner: str) -> bool:
        return await asyncio.to_thread(self._delete, response_id, owner)

    async def close(self) -> None:
        await asyncio.to_thread(self._close)
