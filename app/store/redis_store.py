"""Stored responses in Redis, shared by several gateway instances; Redis expires them."""

from __future__ import annotations

import math
import time

import redis.asyncio as aioredis

from app.store.base import StoredResponse

_PREFIX = "mlxgw:response:"

# Check the owner and delete in one step, so a wrong owner can never remove the key.
_DELETE_IF_OWNER = """
local body = redis.call('GET', KEYS[1])
if not body then return 0 end
local ok, data = pcall(cjson.decode, body)
if not ok or data['owner'] ~= ARGV[1] then return 0 end
return redis.call('DEL', KEYS[1])
"""


class RedisStore:
    def __init__(self, url: str, *, prefix: str = _PREFIX) -> None:
        self.prefix = prefix
        self._redis: aioredis.Redis = aioredis.Redis.from_url(url)

    def _key(self, response_id: str) -> str:
        return self.prefix + response_id

    async def put(self, item: StoredResponse) -> None:
        ttl = math.ceil(item.expires_at - time.time())
        if ttl <= 0:
            return  # already expired: nothing to keep
        await self._redis.set(self._key(item.id), item.to_json(), ex=ttl)

    async def get(self, response_id: str, owner: str) -> StoredResponse | None:
        body = await self._redis.get(self._key(response_id))
        if body is None:
            return None
        item = StoredResponse.from_json(body)
        if item.owner != owner or item.expires_at <= time.time():
            return None
        return item

    async def delete(self, response_id: str, owner: str) -> bool:
        deleted = await self._redis.eval(
            _DELETE_IF_OWNER, 1, self._key(response_id), owner
        )
        return bool(deleted)

    async def close(self) -> None:
        await self._redis.aclose()
