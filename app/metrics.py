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
CANCELLED = Counter(
    "mlxgw_sequences_cancelled_total", "Sequences stopped early because the client went away."
)
STALLED_STREAMS = Counter(
    "mlxgw_streams_stalled_total", "Streams cut because the client stopped reading."
)
ENGINE_FAILURES = Counter("mlxgw_engine_failures_total", "Generations that failed in the engine.")
PREFIX_CACHE_LOOKUPS = Counter(
    "mlxgw_prefix_cache_lookups_total",
    "Prompts looked up in the prefix cache, by outcome: hit (all but the last token cached), "
    "partial (a shorter prefix cached), miss (nothing reused).",
    ["outcome"],
)
PREFIX_CACHE_TOKENS = Counter(
    "mlxgw_prefix_cache_tokens_total",
    "Prompt tokens reused from the prefix cache or prefilled.", ["kind"],
)
PREFIX_CACHE_INSERTS = Counter(
    "mlxgw_prefix_cache_inserts_total",
    "Computed KV kept in the prefix cache, by how its sequence got there: finished, "
    "cancelled, failed (ended by an engine error or shutdown), prefilled (a long prompt kept "
    "as soon as its prefill completed), disk (read back from the disk tier).",
    ["reason"],
)
PREFIX_CACHE_BYTES = Gauge(
    "mlxgw_prefix_cache_bytes", "Bytes of KV the prefix cache holds, per model.", ["model"]
)
DISK_CACHE_LOOKUPS = Counter(
    "mlxgw_prefix_disk_lookups_total",
    "Prompts the memory prefix cache could not serve in full, looked up on disk: hit (KV read "
    "from disk), miss (nothing useful there), invalid (a file failed its integrity check and "
    "was deleted).",
    ["outcome"],
)
DISK_CACHE_BYTES = Gauge(
    "mlxgw_prefix_disk_bytes", "Bytes of prefix KV files on disk (all models)."
)
DISK_CACHE_WRITES = Counter(
    "mlxgw_prefix_disk_writes_total",
    "Prefixes handed to the disk tier: written, skipped (the writer was behind or the file "
    "would exceed the budget), failed (an OS error).",
    ["outcome"],
)
DISK_CACHE_EVICTIONS = Counter(
    "mlxgw_prefix_disk_evictions_total",
    "Disk prefix entries deleted: budget (least recently used), covered (a longer entry of "
    "the same prefix was written), stale (the model's files changed), invalid (failed its "
    "integrity check).",
    ["reason"],
)
DISK_CACHE_SECONDS = Histogram(
    "mlxgw_prefix_disk_seconds", "Time to write (writer thread) or load and verify (engine "
    "thread) one prefix file.", ["op"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
ENGINE_STEP = Histogram(
    "mlxgw_engine_step_seconds",
    "One engine step: a token for every decoding sequence, plus any prefill chunk.",
    buckets=(0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2.5, 5, 10),
)
SPEC_DRAFTED = Counter(
    "mlxgw_speculative_drafted_tokens_total",
    "Draft tokens verified by speculative decoding steps, by where they came from "
    "(prompt_lookup, draft_model).", ["source"],
)
SPEC_ACCEPTED = Counter(
    "mlxgw_speculative_accepted_tokens_total",
    "Draft tokens the model accepted (acceptance rate = accepted / drafted).", ["source"],
)
SPEC_STEPS = Counter(
    "mlxgw_speculative_steps_total", "Decode steps that verified drafts (several tokens a row).",
    ["source"],
)
STEP_SEQUENCES = Histogram(
    "mlxgw_engine_step_sequences", "Sequences in the batch at each engine step.",
    buckets=(1, 2, 4, 8, 12, 16, 24, 32, 48, 64),
)

# --- security and limits ---------------------------------------------------------------------
AUTH_FAILURES = Counter("mlxgw_auth_failures_total", "Requests refused for a missing or bad key.")
RATE_LIMITED = Counter(
    "mlxgw_rate_limited_total", "Requests refused with 429, by the limit that refused them.",
    ["limit"],
)
RATELIMIT_FALLBACK = Counter(
    "mlxgw_ratelimit_fallback_total",
    "Limit checks answered in-process because the configured Redis was unreachable.",
)
RATELIMIT_REDIS_UP = Gauge(
    "mlxgw_ratelimit_redis_up", "1 while the shared Redis limiter answers, 0 while falling back."
)
BREAKER_STATE = Gauge("mlxgw_breaker_state", "Circuit breaker: 0 closed, 1 half-open, 2 open.")
ADMISSION_INFLIGHT = Gauge("mlxgw_admission_inflight", "Requests holding a generation slot.")
ADMISSION_QUEUED = Gauge("mlxgw_admission_queued", "Requests waiting for a generation slot.")
ADMISSION_REJECTED = Counter(
    "mlxgw_admission_rejected_total", "Requests refused with 503 because the queue was full."
)

# --- residency -------------------------------------------------------------------------------
# LOADED_MODELS, RESIDENT_BYTES and MODEL_EVICTIONS are kept current by ResidencyPolicy; the
# engine thread records loads, load durations, waits and reclaimed memory.
LOADED_MODELS = Gauge("mlxgw_models_loaded", "Models resident in memory.")
RESIDENT_BYTES = Gauge(
    "mlxgw_resident_bytes", "Estimated bytes held by resident models (weights + KV allowance)."
)
MODEL_LOADS = Counter("mlxgw_model_loads_total", "Model loads by result.", ["result"])
MODEL_EVICTIONS = Counter(
    "mlxgw_model_evictions_total", "Model evictions by reason (lru, ttl, manual, budget).",
    ["reason"],
)
MODEL_LOAD_DURATION = Histogram(
    "mlxgw_model_load_duration_seconds", "Time to load a model.", ["model"],
    buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
)
MODEL_WAIT_DURATION = Histogram(
    "mlxgw_model_wait_seconds", "Time requests waited for their model to be loaded.",
    buckets=_LATENCY_BUCKETS,
)
RECLAIMED_BYTES = Counter(
    "mlxgw_evicted_reclaimed_bytes_total",
    "Process memory returned by evictions (RSS / MLX active memory before minus after).",
)
MLX_ACTIVE_BYTES = Gauge(
    "mlxgw_mlx_active_bytes", "Bytes MLX holds in arrays, read after each load and eviction."
)

# --- output parsing --------------------------------------------------------------------------
TOOL_CALL_PARSE_FAILURES = Counter(
    "mlxgw_tool_call_parse_failures_total",
    "Tool-call blocks the model wrote that could not be parsed; their text went to content.",
    ["format"],
)

# --- overflow packing (issue 19) -------------------------------------------------------------
PACKED_REQUESTS = Counter(
    "mlxgw_packed_requests_total", "Prompts packed to fit the model's context.", ["model"]
)
PACKED_TOKENS = Counter(
    "mlxgw_packed_tokens_total", "Prompt tokens removed by packing.", ["model"]
)

# --- targets: local engine and upstreams (app/targets) ----------------------------------------
TARGET_REQUESTS = Counter(
    "mlxgw_target_requests_total",
    "Requests a route or 'upstream:model' name sent to a target, by outcome: served (its "
    "answer went to the client), fallback (the next target was tried), failed (the last one).",
    ["target", "outcome"],
)
TARGET_FALLBACKS = Counter(
    "mlxgw_target_fallbacks_total",
    "Times a target was passed over for the next one of its chain, by reason: overloaded, "
    "load_failed, unreachable, timeout, 5xx, 429, auth (it refused the gateway's key), "
    "breaker_open, protocol (no /v1/messages).",
    ["target", "reason"],
)
TARGET_LATENCY = Histogram(
    "mlxgw_target_latency_seconds",
    "Time from sending a request to a target until its answer began (first body byte).",
    ["target"], buckets=_LATENCY_BUCKETS,
)
UPSTREAM_BREAKER_STATE = Gauge(
    "mlxgw_upstream_breaker_state", "Per-upstream breaker: 0 closed, 1 half-open, 2 open.",
    ["upstream"],
)
UPSTREAM_UP = Gauge(
    "mlxgw_upstream_up", "1 if the upstream's last health check (GET /v1/models) answered.",
    ["upstream"],
)
UPSTREAM_INFLIGHT = Gauge("mlxgw_upstream_inflight", "Requests open to an upstream.",
                          ["upstream"])
