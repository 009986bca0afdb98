"""Per-visitor and global limits on /v1/* as a pure ASGI middleware (after auth).

Visitor = the key (`key:<id>`, limits from the key or `[limits] per_key_*`), or the client
IP without one (`ip:<addr>`, `per_ip_rpm`). A key with `visitor_rpm` (one a public page
embeds) also limits each client address using it (`key:<id>:ip:<addr>`), checked first.
Order: the visitor's own request budget, their token budget (refused once spent), then the
global budget and an open failure breaker (only checked here: the engine takes the half-open
trial), so one visitor hammering away cannot use up everyone's global budget with refused
requests.

Tokens: once the prompt is tokenized the engine calls `scope["state"]["limits"].reserve(n)`
with prompt + max_tokens, which takes that much of the budget or refuses with 429; at the end
`charge_tokens(used)` settles the reservation to the real use (refunding the rest). Without
the reservation, a key with one token left could start `max_inflight` full-context runs.
Every response on a limited route carries the x-ratelimit-* headers, not only 429s.
"""

from __future__ import annotations

import ipaddress
import math

from app import metrics
from app.errors import GatewayError, RateLimited
from app.http.asgi import (
    ASGIApp,
    Message,
    Receive,
    Scope,
    Send,
    send_error,
    state,
)
from app.http.auth import is_preflight
from app.limits.breaker import CircuitBreaker
from app.limits.window import Limiter, LimitResult
from app.security.client_ip import client_ip, parse_networks
from app.security.principal import Principal
from app.settings import Settings

LIMITED_PREFIX = "/v1/"


def limit_headers(kind: str, result: LimitResult) -> dict[str, str]:
    """x-ratelimit-{limit,remaining,reset}-{requests,tokens}."""
    return {
        f"x-ratelimit-limit-{kind}": str(result.limit),
        f"x-ratelimit-remaining-{kind}": str(result.remaining),
        f"x-ratelimit-reset-{kind}": result.reset_header,
    }


class RequestLimits:
    """Put at `scope["state"]["limits"]`: the engine reserves tokens through it at admission,
    and the route settles them when the generation ends."""

    def __init__(self, limiter: Limiter, bucket: str, tpm: int,
                 requests: LimitResult | None, tokens: LimitResult | None) -> None:
        self._limiter = limiter
        self._key = f"{bucket}:tokens"
        self.tpm = tpm
        self.requests = requests
        self.tokens = tokens
        self.charged = 0
        self.reserved = 0
        self._entry: str | None = None

    async def reserve(self, n: int) -> None:
        """Take `n` tokens (prompt + max_tokens) of the budget, or raise RateLimited."""
        if self.tpm <= 0:
            return
        if self._entry is not None:  # admitted again (truncation probes): one reservation
            await self._limiter.adjust(self._key, self._entry, 0)
            self._entry, self.reserved = None, 0
        result = await self._limiter.acquire(self._key, self.tpm, cost=n)
        self.tokens = result
        if not result.allowed:
            metrics.RATE_LIMITED.labels(limit="tokens").inc()
            if n > self.tpm:
                message = (f"This request may use up to {n} tokens (prompt + max_tokens), more "
                           f"than the whole budget of {self.tpm} tokens per minute; lower "
                           "max_tokens or shorten the prompt.")
            else:
                message = (f"Rate limit reached for tokens per minute ({self.tpm}): this "
                           f"request may use up to {n} tokens (prompt + max_tokens) and "
                           f"{result.remaining} are left; retry in "
                           f"{math.ceil(result.retry_after)}s or lower max_tokens.")
            raise RateLimited(message, retry_after=math.ceil(result.retry_after))
        self._entry, self.reserved = result.entry, n

    async def charge_tokens(self, n: int) -> None:
        """The real use, once known: settles the reservation (the unused part is refunded in
        place, so it ages out when the reservation would have) or, without one, charges."""
        n = max(0, n)
        self.charged += n
        if self.tpm <= 0:
            return
        if self._entry is not None:
            entry, self._entry = self._entry, None
            await self._limiter.adjust(self._key, entry, n)
            return
        if n > 0:
            self.tokens = await self._limiter.acquire(self._key, self.tpm, cost=n, mode="charge")


class RateLimitMiddleware:
    def __init__(self, app: ASGIApp, *, limiter: Limiter, settings: Settings,
                 breaker: CircuitBreaker | None = None, refuse_when_open: bool = True) -> None:
        self.app = app
        self.limiter = limiter
        # False with routes configured: the local engine's open breaker is a reason to fall
        # back to the next target (the engine still refuses its own work while open).
        self.refuse_when_open = refuse_when_open
        self.limits = settings.limits
        self.breaker = breaker
        # Only for use without AuthMiddleware in front, which otherwise decides the address.
        self.trusted = parse_networks(settings.server.trusted_proxies)

    def _visitor(self, scope: Scope) -> tuple[str, int, int, tuple[str, int] | None]:
        """(bucket, rpm, tpm, per-address bucket and rpm of a key embedded in a public page)."""
        principal = state(scope).get("principal")
        if not isinstance(principal, Principal):
            principal = Principal.anonymous(client_ip(scope, self.trusted))
        tpm = principal.tpm if principal.tpm is not None else self.limits.per_key_tpm
        if principal.key_id is not None:
            rpm = principal.rpm if principal.rpm is not None else self.limits.per_key_rpm
            bucket = f"key:{principal.key_id}"
            per_address = (f"{bucket}:ip:{ip_bucket(principal.client_ip)}",
                           principal.visitor_rpm) if principal.visitor_rpm else None
            return bucket, rpm, tpm, per_address
        return f"ip:{ip_bucket(principal.client_ip)}", self.limits.per_ip_rpm, tpm, None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not path.startswith(LIMITED_PREFIX) or is_preflight(scope):
            await self.app(scope, receive, send)
            return
        bucket, rpm, tpm, per_address = self._visitor(scope)
        headers: dict[str, str] = {}
        requests = tokens = None
        try:
            if per_address is not None:
                # First, so a visitor over their own limit spends none of the key's budget.
                address_bucket, visitor_rpm = per_address
                requests = await self.limiter.acquire(f"{address_bucket}:requests", visitor_rpm)
                headers |= limit_headers("requests", requests)
                _raise_if_refused(requests, "requests", limit="visitor",
                                  who=" from this address")
            if rpm > 0:
                shared = await self.limiter.acquire(f"{bucket}:requests", rpm)
                # The headers show whichever budget runs out first.
                if requests is None or shared.remaining < requests.remaining or not shared.allowed:
                    requests = shared
                    headers |= limit_headers("requests", shared)
                _raise_if_refused(shared, "requests")
            if tpm > 0:
                tokens = await self.limiter.acquire(f"{bucket}:tokens", tpm, mode="peek")
                headers |= limit_headers("tokens", tokens)
                _raise_if_refused(tokens, "tokens")
            if self.breaker is not None:
                await self.breaker.hit_global()
                if scope.get("method") == "POST" and self.refuse_when_open:  # engine work
                    # Refuse early while open, but leave the half-open trial to the engine,
                    # which asks once and reports how it went (issue 13, item 1).
                    self.breaker.check()
        except GatewayError as error:
            await send_error(scope, send, error, headers)
            return
        state(scope)["limits"] = RequestLimits(self.limiter, bucket, tpm, requests, tokens)
        raw = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start" and raw:
                present = {name.lower() for name, _ in message.get("headers", ())}
                extra = [(k, v) for k, v in raw if k not in present]
                message = {**message, "headers": [*message.get("headers", ()), *extra]}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def ip_bucket(address: str) -> str:
    """IPv6 clients get a /64 each (what one subscriber usually holds), so rotating through
    addresses in one's own prefix doesn't buy a fresh limit; IPv4 is per address."""
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        return address
    if parsed.version == 6:
        return str(ipaddress.ip_network(f"{parsed}/64", strict=False))
    return str(parsed)


def _raise_if_refused(result: LimitResult, kind: str, *, limit: str | None = None,
                      who: str = "") -> None:
    if result.allowed:
        return
    metrics.RATE_LIMITED.labels(limit=limit or kind).inc()
    # Whole seconds, rounded up: retrying a fraction early would only earn another 429.
    raise RateLimited(
        f"Rate limit reached for {kind} per minute{who} ({result.limit}); "
        f"retry in {math.ceil(result.retry_after)}s.",
        retry_after=math.ceil(result.retry_after),
    )
