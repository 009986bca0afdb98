"""The sliding log of app/limits/window.py in Redis: one Lua script, so concurrent gateway
instances update a key atomically and share one limit.

Per limit key: a sorted set of entries (score = timestamp, member = "<uid>:<cost>") and a
running total, so expiring old entries costs O(expired) instead of summing the whole log.
The clock is the gateway's (passed in), so results match the in-process backend exactly;
instances on one host share it, and small skew across hosts only shifts a window edge.
"""

from __future__ import annotations

import math
import time
import uuid

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from app.limits.window import WINDOW, Clock, LimitResult, Mode

KEY_PREFIX = "mlxgw:rl:"

# KEYS: log zset, total. ARGV: now, window, limit, cost, mode, member, ttl_ms.
# Returns {allowed, total, reset, retry_after} (floats as strings: Lua numbers become ints).
_SCRIPT = """
local log, total_key = KEYS[1], KEYS[2]
local now, window = tonumber(ARGV[1]), tonumber(ARGV[2])
local limit, cost, mode = tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5]
local cutoff = now - window

local function cost_of(member) return tonumber(string.match(member, ':(%d+)$')) or 0 end

local total = tonumber(redis.call('GET', total_key))
if total == nil then
  total = 0
  for _, m in ipairs(redis.call('ZRANGEBYSCORE', log, cutoff, '+inf')) do
    total = total + cost_of(m)
  end
end
local expired = redis.call('ZRANGEBYSCORE', log, '-inf', cutoff)
if #expired > 0 then
  for _, m in ipairs(expired) do total = total - cost_of(m) end
  redis.call('ZREMRANGEBYSCORE', log, '-inf', cutoff)
  if total < 0 then total = 0 end
end

local allowed = mode == 'charge' or total + cost <= limit
if allowed and mode ~= 'peek' and cost > 0 then
  redis.call('ZADD', log, now, ARGV[6])
  total = total + cost
end
redis.call('SET', total_key, total, 'PX', ARGV[7])
redis.call('PEXPIRE', log, ARGV[7])

local reset = 0
local oldest = redis.call('ZRANGE', log, 0, 0, 'WITHSCORES')
if #oldest > 0 then reset = math.max(0, tonumber(oldest[2]) + window - now) end

local retry = 0
if not allowed then
  retry = window
  if cost <= limit then
    local excess, freed = total + cost - limit, 0
    local entries = redis.call('ZRANGE', log, 0, -1, 'WITHSCORES')
    for i = 1, #entries, 2 do
      freed = freed + cost_of(entries[i])
      if freed >= excess then
        retry = math.max(0, tonumber(entries[i + 1]) + window - now)
        break
      end
    end
  end
end
return {allowed and 1 or 0, total, tostring(reset), tostring(retry)}
"""


# KEYS: log zset, total. ARGV: old member, new member. Re-records an entry with a new cost at
# its old timestamp and moves the running total by the difference.
_ADJUST = """
local log, total_key = KEYS[1], KEYS[2]
local score = redis.call('ZSCORE', log, ARGV[1])
if not score then return 0 end
local function cost_of(member) return tonumber(string.match(member, ':(%d+)$')) or 0 end
redis.call('ZREM', log, ARGV[1])
redis.call('ZADD', log, score, ARGV[2])
local total = tonumber(redis.call('GET', total_key))
if total ~= nil then
  total = math.max(0, total + cost_of(ARGV[2]) - cost_of(ARGV[1]))
  redis.call('SET', total_key, total, 'KEEPTTL')
end
return 1
"""


def fast_client(url: str, timeout: float = 0.1) -> aioredis.Redis:
    """A client that fails fast: short socket timeouts and no retries, so an unreachable
    Redis costs a request milliseconds, not the redis-py default of seconds."""
    return aioredis.Redis.from_url(
        url, socket_timeout=timeout, socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0), retry_on_timeout=False, health_check_interval=0,
    )


class RedisLimiter:
    def __init__(self, client: aioredis.Redis, clock: Clock = time.time) -> None:
        self.client = client
        self.clock = clock
        self._script = client.register_script(_SCRIPT)
        self._adjust = client.register_script(_ADJUST)

    @classmethod
    def from_url(cls, url: str, clock: Clock = time.time, *, timeout: float = 0.1
                 ) -> RedisLimiter:
        return cls(fast_client(url, timeout), clock)

    async def acquire(
        self, key: str, limit: int, *, cost: int = 1, window: float = WINDOW, mode: Mode = "hit"
    ) -> LimitResult:
        tag = f"{KEY_PREFIX}{{{key}}}"  # hash tag: both keys in one cluster slot
        ttl_ms = math.ceil(window * 1000) + 1000
        member = f"{uuid.uuid4().hex}:{cost}"
        raw = await self._script(
            keys=[f"{tag}:log", f"{tag}:total"],
            args=[repr(self.clock()), repr(window), limit, cost, mode, member, ttl_ms],
        )
        allowed, total, reset, retry = raw
        recorded = (bool(int(allowed)) and mode != "peek" and cost > 0)
        return LimitResult(bool(int(allowed)), limit, max(0, limit - int(total)),
                           float(reset), float(retry), member if recorded else None)

    async def adjust(self, key: str, entry: str, cost: int, *, window: float = WINDOW) -> str:
        tag = f"{KEY_PREFIX}{{{key}}}"
        member = f"{entry.rsplit(':', 1)[0]}:{max(0, cost)}"
        if member != entry:
            await self._adjust(keys=[f"{tag}:log", f"{tag}:total"], args=[entry, member])
        return member

    async def ping(self) -> bool:
        return bool(await self.client.ping())

    async def aclose(self) -> None:
        await self.client.aclose()
