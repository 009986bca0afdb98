"""Recent traffic kept in memory for the console: requests per minute and recent refusals.

Prometheus counters only grow; a person asking "is anyone using it, and why are they refused"
wants the last minute and the last few refusals. Fed once per request by the access-log
middleware; read by `GET /v1/admin/status`. Bounded: 60 one-second buckets, 60 one-minute
buckets and the last `keep` refusals.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from app.errors import GatewayError

# Paths that count as use of the API. The console's own polling of /v1/admin/* is not use,
# but a refused admin call is worth seeing.
COUNTED_PREFIX = "/v1/"
ADMIN_PREFIX = "/v1/admin/"


def note_refusal(request_state: dict[str, Any], error: GatewayError) -> None:
    """Say why this request was refused (in `scope["state"]`), for the access-log middleware
    to record under a reason."""
    request_state["refusal"] = (error.code or error.openai_type, error.message)


@dataclass(frozen=True)
class Refusal:
    at: float
    status: int
    reason: str  # the error code (rate_limit_exceeded, overloaded, invalid_api_key, ...)
    message: str
    path: str
    key_name: str | None
    client_ip: str | None


class Activity:
    def __init__(self, *, keep: int = 50, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self._seconds: collections.deque[list[int]] = collections.deque(maxlen=60)
        self._minutes: collections.deque[list[int]] = collections.deque(maxlen=60)
        self._refusals: collections.deque[Refusal] = collections.deque(maxlen=keep)
        self._reasons: collections.Counter[str] = collections.Counter()

    @staticmethod
    def counts(path: str, status: int) -> bool:
        if path.startswith(ADMIN_PREFIX):
            return status >= 400
        return path.startswith(COUNTED_PREFIX)

    def record(self, path: str, status: int, *, reason: str | None = None, message: str = "",
               key_name: str | None = None, client_ip: str | None = None) -> None:
        if not self.counts(path, status):
            return
        now = self.clock()
        refused = status >= 400
        for buckets, width in ((self._seconds, 1), (self._minutes, 60)):
            start = int(now // width) * width
            if not buckets or buckets[-1][0] != start:
                buckets.append([start, 0, 0])
            buckets[-1][1] += 1
            buckets[-1][2] += refused
        if refused:
            why = reason or f"http_{status}"
            self._reasons[why] += 1
            self._refusals.append(Refusal(at=now, status=status, reason=why,
                                          message=message[:300], path=path,
                                          key_name=key_name, client_ip=client_ip))

    def snapshot(self) -> dict[str, Any]:
        now = self.clock()
        recent = [b for b in self._seconds if b[0] > now - 60]
        # The last hour, one entry per minute, oldest first, quiet minutes as zeros.
        seen = {start: (n, r) for start, n, r in self._minutes}
        current = int(now // 60) * 60
        per_minute = []
        for start in range(current - 59 * 60, current + 1, 60):
            n, r = seen.get(start, (0, 0))
            per_minute.append({"minute": start, "requests": n, "refused": r})
        return {
            "requests_last_minute": sum(b[1] for b in recent),
            "refused_last_minute": sum(b[2] for b in recent),
            "per_minute": per_minute,
            "refusals_by_reason": dict(self._reasons.most_common()),  # since start
            "recent_refusals": [asdict(r) for r in reversed(self._refusals)][:20],
        }
