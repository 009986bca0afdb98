"""Every Prometheus collector in one place, named `mlxgw_*`.

Areas append their collectors below under a heading, so /metrics and the Grafana dashboard
(deploy/grafana/) have one list to agree on.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

# --- HTTP edge -------------------------------------------------------------------------------
REQUESTS = Counter(
    "mlxgw_requests_total", "HTTP requests by route and status.", ["route", "status"]
)
REQUEST_DURATION = Histogram(
    "mlxgw_request_duration_seconds", "Request duration, to the last byte.", ["route"],
    buckets=_LATENCY_BUCKETS,
)
TTFT = Histogram(
    "mlxgw_ttft_seconds", "Time to first generated token.", ["model"], buckets=_LATENCY_BUCKETS
)
PROMPT_TOKENS = Counter("mlxgw_prompt_tokens_total", "Prompt tokens processed.", ["model"])
COMPLETION_TOKENS = Counter("mlxgw_completion_tokens_total", "Tokens generated.", ["model"])

# --- engine ----------------------------------------------------------------------------------
INFLIGHT = Gauge("mlxgw_inflight_requests", "Generations running in the engine.")
QUEUE_DEPTH = Gauge("mlxgw_queue_depth", "Generations waiting to join the running batch.")
CANCELLED = Counter(
    "mlxgw_sequences_cancelled_total", "Sequences stopped early because the client went away."
)
DECODE_TOKENS_PER_SECOND = Gauge(
    "mlxgw_decode_tokens_per_second", "Aggregate generated tokens/s over the last seconds."
)
ENGINE_FAILURES = Counter("mlxgw_engine_failures_total", "Generations that failed in the engine.")
