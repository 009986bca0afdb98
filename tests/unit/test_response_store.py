"""The response stores against a real SQLite file and a real redis-server."""

from __future__ import annotations

import asyncio
import os
import stat
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis

from app.settings import ConfigError, Settings
from app.store import RedisStore, ResponseStore, SqliteStore, StoredResponse, open_store
from tests.redis_server import running_redis


def _item(response_id: str = "resp_1", owner: str = "key1", ttl: float = 60.0) -> StoredResponse:
    now = time.time()
    return StoredResponse(
        id=response_id,
        owner=owner,
        created_at=now,
        expires_at=now + ttl,
        response={"id": response_id, "object": "response", "output": []},
        input_items=[{"id": "msg_1", "type": "message", "role": "user", "content": []}],
        context=[{"role": "user", "content": "My name is Ada"},
                 {"role": "assistant", "content": "Hello Ada"}],
    )


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    with running_redis() as server:
        yield server.url


@pytest.fixture(params=["sqlite", "redis"])
async def store(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[ResponseStore]:
    backend: ResponseStore
    if request.param == "sqlite":
        backend = SqliteStore(tmp_path / "state" / "responses.db")
    else:
        url = request.getfixturevalue("redis_url")
        backend = RedisStore(url, prefix=f"test:{tmp_path.name}:")
    yield backend
    await backend.close()


async def test_put_then_get_round_trips_every_field(store: ResponseStore) -> None:
    item = _item()
    await store.put(item)
    got = await store.get("resp_1", "key1")
    assert got == item


async def test_another_owner_sees_nothing_and_cannot_delete(store: ResponseStore) -> None:
    await store.put(_item())
    assert await store.get("resp_1", "someone-else") is None
    assert await store.delete("resp_1", "someone-else") is False
    assert await store.get("resp_1", "key1") is not None


async def test_delete_removes_once(store: ResponseStore) -> None:
    await store.put(_item())
    assert await store.delete("resp_1", "key1") is True
    assert await store.get("resp_1", "key1") is None
    assert await store.delete("resp_1", "key1") is False


async def test_unknown_id_is_none(store: ResponseStore) -> None:
    assert await store.get("resp_missing", "key1") is None


async def test_expired_is_invisible(store: ResponseStore) -> None:
    item = _item(ttl=60)
    item.expires_at = time.time() - 1
    await store.put(item)
    assert await store.get("resp_1", "key1") is None


async def test_put_replaces(store: ResponseStore) -> None:
    await store.put(_item())
    replaced = _item()
    replaced.response = {"id": "resp_1", "status": "completed"}
    await store.put(replaced)
    got = await store.get("resp_1", "key1")
    assert got is not None and got.response == {"id": "resp_1", "status": "completed"}


async def test_sqlite_survives_reopening_and_is_private(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "responses.db"
    first = SqliteStore(path)
    await first.put(_item("resp_keep"))
    await first.close()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    second = SqliteStore(path)
    try:
        got = await second.get("resp_keep", "key1")
        assert got is not None and got.context[0]["content"] == "My name is Ada"
    finally:
        await second.close()


async def test_sqlite_purge_deletes_expired_rows(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "r.db")
    try:
        old = _item("resp_old")
        old.expires_at = time.time() - 5
        await store.put(old)
        await store.put(_item("resp_new"))
        assert await asyncio.to_thread(store._purge_now) == 1
        assert await store.get("resp_new", "key1") is not None
    finally:
        await store.close()


async def test_redis_sets_a_ttl(redis_url: str) -> None:
    store = RedisStore(redis_url, prefix="ttltest:")
    try:
        await store.put(_item("resp_ttl", ttl=100))
        ttl = redis.Redis.from_url(redis_url).ttl("ttltest:resp_ttl")
        assert 0 < ttl <= 100
    finally:
        await store.close()


async def test_open_store_picks_the_backend(tmp_path: Path, redis_url: str) -> None:
    sqlite_settings = Settings(state_dir=tmp_path)
    store = open_store(sqlite_settings)
    assert isinstance(store, SqliteStore) and store.path == tmp_path / "responses.db"
    await store.close()

    redis_settings = Settings(responses={"store": "redis"}, redis={"url": redis_url})
    store = open_store(redis_settings)
    assert isinstance(store, RedisStore)
    await store.close()

    with pytest.raises(ConfigError, match=r"redis\.url"):
        open_store(Settings(responses={"store": "redis"}))


async def test_a_paused_redis_is_a_503_within_the_timeout_then_recovers() -> None:
    """No timeouts and no error mapping meant a hung Redis stalled /v1/responses and its
    errors were 500s (issue 13, item 13)."""
    from app.errors import StoreUnavailable
    from tests.redis_server import RedisServer

    with RedisServer() as server:
        store = RedisStore(server.url, timeout=0.3)
        try:
            await store.put(_item())
            paused = server.pause(3)  # longer than the timeout: an answer means we waited
            for call in (store.get("resp_1", "key1"), store.put(_item("resp_2")),
                         store.delete("resp_1", "key1")):
                with pytest.raises(StoreUnavailable) as caught:
                    await call
                assert caught.value.status == 503 and caught.value.retry_after
                assert "not answering" in caught.value.message
            paused.join()
            back = await store.get("resp_1", "key1")  # the client reconnects by itself
            assert back is not None and back.id == "resp_1"
        finally:
            await store.close()
        server.stop()
        gone = RedisStore(server.url, timeout=0.3)
        with pytest.raises(StoreUnavailable):  # nothing listening: also a 503
            await gone.get("resp_1", "key1")
        await gone.close()
