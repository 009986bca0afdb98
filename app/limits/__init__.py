"""Rate limits (Redis-shared with an in-process fallback), admission control, the breaker."""
