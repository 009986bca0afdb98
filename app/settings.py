"""Configuration: defaults < TOML file < `MLXGW_` environment < CLI flags.

Every key is documented by its `Field(description=...)`; `config.example.toml`
mirrors this file. Problems are reported one readable line each by
`format_validation_error`, and the CLI exits 2 on them.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from app.targets.config import RouteEntry, UpstreamEntry, check_references

DEMO_MODEL_ID = "smollm2-135m-instruct"
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})

_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")


def parse_bytes(value: int | str) -> int:
    """'512MB', '12GB', '2GiB' or a plain integer -> bytes."""
    if isinstance(value, int):
        return value
    match = _SIZE_RE.match(value)
    unit = match.group(2).upper() if match else ""
    if not match or unit not in _SIZE_UNITS:
        raise ValueError(f"expected a size like '512MB' or '12GB', got {value!r}")
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


def format_bytes(value: int) -> str:
    """12_300_000_000 -> '12.3 GB' (decimal units, as users see them in Finder)."""
    amount = float(value)
    for unit in ("B", "KB", "MB", "GB"):
        if abs(amount) < 1000:
            return f"{amount:.0f} {unit}" if unit == "B" else f"{amount:.1f} {unit}"
        amount /= 1000
    return f"{amount:.1f} TB"


def _home(*parts: str) -> Path:
    return Path.home().joinpath(*parts)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


DEFAULT_MODEL_TARGET = "@default"
# What to do with a prompt bigger than the model's context (issue 19): refuse it in the words
# each client recognises, or pack it (oldest turns out, long tool outputs and descriptions cut).
Overflow = Literal["error", "pack"]


class ServerSettings(_Section):
    host: str = Field("127.0.0.1", description="Address to bind. Keep loopback behind Caddy.")
    port: int = Field(8000, ge=1, le=65535, description="TCP port to listen on.")
    max_body_bytes: int = Field(10_000_000, ge=1024, description="Largest request body (413).")
    max_messages: int = Field(
        2048, ge=1, description="Most messages (chat) or input items (responses) per request; "
        "more is a 400."
    )
    cors_origins: list[str] = Field(
        default_factory=list, description="Origins allowed by CORS; empty turns CORS off."
    )
    trusted_proxies: list[str] = Field(
        default_factory=lambda: ["127.0.0.1", "::1"],
        description="Peers whose X-Forwarded-For is believed (IPs or CIDRs); the only "
        "source of the client address (per-IP limits, auth off's loopback check). [] = none.",
    )
    shutdown_grace: float = Field(
        30.0, ge=0, description="Seconds in-flight streams may finish after SIGTERM."
    )
    unready_delay: float = Field(
        0.0, ge=0, le=300, description="Seconds after SIGTERM during which /ready answers 503 "
        "while requests are still served, before the drain starts: behind a load balancer "
        "with active health checks on /ready, longer than its check interval. 0 = drain at once."
    )
    heartbeat_seconds: float = Field(
        5.0, gt=0, description="SSE keep-alive interval while a request waits or prefills."
    )
    send_timeout: float = Field(
        30.0, gt=0, description="Seconds one SSE write may wait for a client that stopped "
        "reading before the stream is cut (and its generation cancelled)."
    )


class SamplingDefaults(_Section):
    """Used where a request leaves a field out (Claude Code and Codex send no temperature)."""

    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0, le=10)


class ModelEntry(_Section):
    id: str = Field(description="The name clients send as `model`.")
    path: Path = Field(description="An MLX model folder or a .gguf file.")
    aliases: list[str] = Field(default_factory=list, description="Other names for this model.")
    pinned: bool = Field(False, description="Load at start and never evict.")
    ttl: float | None = Field(None, ge=0, description="Idle seconds before eviction; 0 = never.")
    max_context: int | None = Field(None, ge=16, description="Cap the context length.")
    overflow: Overflow | None = Field(
        None, description="A prompt that does not fit: 'error' or 'pack'; unset = [engine] "
        "overflow.")
    answer_reserve_tokens: int | None = Field(
        None, ge=0, description="Room kept free for the answer; unset = [engine] "
        "answer_reserve_tokens.")
    sampling: SamplingDefaults = Field(
        default_factory=SamplingDefaults,
        description="Sampling for fields a request leaves out; over the model's "
                    "generation_config.json, which is over the API defaults.")
    draft: str | None = Field(
        None, description="Speculative decoding drafts with this other [[models]] id (a small "
        "model with the same tokenizer) instead of prompt lookup; loaded and evicted with "
        "this model, counted in its memory.")

    @field_validator("id")
    @classmethod
    def _id_is_a_name(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}", value) or ".." in value:
            raise ValueError("use letters, digits and . _ : / - (no '..', at most 128 chars)")
        return value


class DiscoverySettings(_Section):
    model_dirs: list[Path] = Field(
        default_factory=list,
        description="Folders scanned for MLX folders, HF cache, LM Studio layouts, .gguf files.",
    )


class ResidencySettings(_Section):
    memory_budget: str = Field(
        "60%", description="Memory for resident models: bytes ('12GB') or % of physical memory."
    )
    max_loaded_models: int = Field(4, ge=1, description="Most models resident at once.")
    default_ttl: float = Field(1800.0, ge=0, description="Idle seconds before eviction; 0 = never.")
    load_wait: float = Field(
        30.0, ge=0, description="Seconds a request waits for memory before a 503."
    )

    @field_validator("memory_budget")
    @classmethod
    def _budget_parses(cls, value: str) -> str:
        if value.strip().endswith("%"):
            percent = float(value.strip()[:-1])
            if not 0 < percent <= 100:
                raise ValueError("a percentage must be in (0, 100]")
        else:
            parse_bytes(value)
        return value


class EngineSettings(_Section):
    max_batch_size: int = Field(16, ge=1, description="Sequences decoded together per step.")
    prefill_chunk: int = Field(
        2048, ge=16, description="Most prompt tokens prefilled per row per step (the chunk "
        "when nothing else is decoding)."
    )
    prefill_budget: float = Field(
        0.5, ge=0, description="While sequences decode, a step's prefill chunk is sized to "
        "cost about this many decode steps, so running streams keep receiving tokens while a "
        "long prompt prefills (a longer TTFT for that prompt); 0 = off, always prefill_chunk."
    )
    long_prompt_tokens: int = Field(
        1024, ge=0, description="While sequences decode, prompts of up to this many new tokens "
        "are prefilled whole, up to this many tokens a step (running streams wait for that "
        "step); only longer prompts are chunked by prefill_budget. 0 = chunk every prompt."
    )
    prompt_cache_bytes: int = Field(
        512_000_000, ge=0, description="Bytes of reusable prompt KV per model (LRU); 0 = off."
    )
    disk_cache_bytes: int = Field(
        10_000_000_000, ge=0, description="Bytes of prompt KV kept on disk, under "
        "<cache_dir>/prefix-cache, for every model together (LRU; never exceeded): long "
        "prefixes survive restarts and model evictions. 0 = off; needs prompt_cache_bytes > 0."
    )
    disk_cache_min_tokens: int = Field(
        1024, ge=64, description="Shortest prefix (tokens) written to the disk cache; "
        "shorter ones are cheaper to prefill again than to store."
    )
    default_max_tokens: int = Field(
        4096, ge=1, description="Completion cap when a request names none."
    )
    strict_max_tokens: bool = Field(
        False, description="Refuse (400) a max_tokens larger than the context leaves room for; "
        "by default it is capped to the room left and the answer ends with finish_reason length."
    )
    overflow: Overflow = Field(
        "pack", description="A prompt that does not fit the context: 'pack' keeps the "
        "system prompt, the tools and the newest turns, drops the oldest turns, then shortens "
        "long tool outputs and tool descriptions (header x-mlxgw-packed-tokens); 'error' "
        "answers 400 (context_length_exceeded / 'prompt is too long'). Per model: [[models]] "
        "overflow."
    )
    answer_reserve_tokens: int = Field(
        1024, ge=0, description="Room kept free for the answer: a prompt must leave this much "
        "(or the request's max_tokens, or a quarter of the context, if smaller)."
    )
    speculative: Literal["auto", "off"] = Field(
        "auto", description="Speculative decoding: draft tokens by prompt lookup (what followed "
        "the last tokens earlier in the prompt or output) and verify them in the batched decode "
        "step, where the batch and the acceptance rate make it pay (auto), or never (off). "
        "Same output either way; a request can opt out with `speculative: \"off\"`.")
    cpu_tuning: bool = Field(
        True, description="On MLX's CPU backend, lay float32 layers out for the BLAS, group "
        "decode attention by key/value head and compile RoPE/RMSNorm for decoding (faster "
        "decode, same outputs); no effect on a GPU."
    )

    cpu_dequantize: bool = Field(
        True, description="On MLX's CPU backend, serve a quantized model from a float32 copy "
        "made once in the cache (its prefill is about 10x faster with the system BLAS), when "
        "that copy fits the memory budget; it is counted at its float32 size. No effect on a "
        "GPU, where the quantized kernels are the fast ones."
    )

    @field_validator("prompt_cache_bytes", "disk_cache_bytes", mode="before")
    @classmethod
    def _size(cls, value: int | str) -> int:
        return parse_bytes(value)


class AuthSettings(_Section):
    enabled: bool = Field(
        True, description="Require a key on every route but health checks. Off, only "
        "loopback clients (by the resolved address) are served; others get 403."
    )
    keys_file: Path | None = Field(
        None, description="Hashed keys (0600). Default: <config_dir>/keys.json."
    )


class LimitsSettings(_Section):
    per_key_rpm: int = Field(600, ge=0, description="Requests/minute per key; 0 = unlimited.")
    per_key_tpm: int = Field(
        0, ge=0, description="Tokens/minute per key; 0 = unlimited. prompt + max_tokens is "
        "reserved at admission (429 if it does not fit), the unused part refunded at the end."
    )
    per_ip_rpm: int = Field(120, ge=0, description="Requests/minute per IP without a key.")
    global_rpm: int = Field(0, ge=0, description="Requests/minute for everyone; 0 = off.")
    max_inflight: int = Field(32, ge=1, description="Generations running at once.")
    max_queue: int = Field(64, ge=0, description="Generations waiting for a slot.")
    per_key_inflight: int = Field(
        16, ge=0, description="Generations one key may have running or queued; 0 = no cap."
    )
    breaker_failures: int = Field(5, ge=1, description="Engine failures that open the breaker.")
    breaker_cooldown: float = Field(30.0, gt=0, description="Seconds before half-open.")


class RedisSettings(_Section):
    url: str | None = Field(None, description="redis://host:port/db; unset = in-process limits.")
    timeout: float = Field(
        0.1, gt=0, le=5, description="Seconds a limit check waits for Redis before it falls "
        "back to in-process limits."
    )


class ResponsesSettings(_Section):
    store: Literal["sqlite", "redis"] = Field("sqlite", description="Where stored responses live.")
    path: Path | None = Field(None, description="SQLite file. Default: <state_dir>/responses.db.")
    ttl: float = Field(30 * 86400.0, gt=0, description="Seconds a stored response is kept.")
    timeout: float = Field(
        2.0, gt=0, le=60, description="With store = 'redis': seconds a read or write waits "
        "for Redis before the request gets a 503."
    )


class LogSettings(_Section):
    level: Literal["debug", "info", "warning", "error"] = Field("info", description="Log level.")
    format: Literal["auto", "json", "console"] = Field(
        "auto", description="stdout as JSON lines or human text; auto: text on a terminal, "
        "JSON otherwise (launchd, systemd, pipes). Files are always JSON.")
    file: Path | None = Field(None, description="Also write to this file, size-rotated.")
    max_bytes: int = Field(10_000_000, ge=1024, description="Rotate the file at this size.")
    backups: int = Field(5, ge=0, description="Rotated files kept.")


class MetricsSettings(_Section):
    enabled: bool = Field(True, description="Serve Prometheus text at /metrics.")
    require_admin: bool = Field(True, description="With auth on, /metrics needs an admin key.")


class AnthropicSettings(_Section):
    models: dict[str, str] = Field(
        default_factory=lambda: {"claude-*": DEFAULT_MODEL_TARGET},
        description="On /v1/messages: model-name patterns (fnmatch, first match wins) -> a model "
        f"id or alias; {DEFAULT_MODEL_TARGET!r} = the default model. Lets an unchanged Claude "
        "Code ask for claude-* ids.",
    )


class Settings(BaseSettings):
    """Everything the gateway reads at start."""

    model_config = SettingsConfigDict(
        env_prefix="MLXGW_", env_nested_delimiter="__", extra="forbid", validate_default=True
    )

    server: ServerSettings = Field(default_factory=ServerSettings)
    models: list[ModelEntry] = Field(default_factory=list)
    discovery: DiscoverySettings = Field(default_factory=DiscoverySettings)
    residency: ResidencySettings = Field(default_factory=ResidencySettings)
    engine: EngineSettings = Field(default_factory=EngineSettings)
    auth: AuthSettings = Field(default_factory=AuthSettings)
    limits: LimitsSettings = Field(default_factory=LimitsSettings)
    redis: RedisSettings = Field(default_factory=RedisSettings)
    responses: ResponsesSettings = Field(default_factory=ResponsesSettings)
    log: LogSettings = Field(default_factory=LogSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    anthropic: AnthropicSettings = Field(default_factory=AnthropicSettings)
    # Other servers and fallback chains (app/targets/).
    upstreams: list[UpstreamEntry] = Field(default_factory=list)
    routes: list[RouteEntry] = Field(default_factory=list)
    cache_dir: Path = Field(
        default_factory=lambda: _home(".cache", "mlx-gateway"),
        description="Converted models (the demo model among them) and the disk prefix cache.",
    )
    config_dir: Path = Field(
        default_factory=lambda: _home(".config", "mlx-gateway"), description="Keys file."
    )
    state_dir: Path = Field(
        default_factory=lambda: _home(".local", "state", "mlx-gateway"),
        description="Stored responses.",
    )

    @field_validator("cache_dir", "config_dir", "state_dir")
    @classmethod
    def _expand_home(cls, value: Path) -> Path:
        return value.expanduser()

    @model_validator(mode="after")
    def _targets_agree(self) -> Settings:
        check_references(self.upstreams, self.routes)
        return self

    @model_validator(mode="after")
    def _drafts_name_models(self) -> Settings:
        # Only the ids here: whether the tokenizers agree needs the files
        # (app.models.draft_check, at start and in `doctor`).
        ids = {entry.id for entry in self.models}
        for entry in self.models:
            if entry.draft is None:
                continue
            if entry.draft == entry.id:
                raise ValueError(f"model {entry.id!r}: draft must name another model, not "
                                 "itself")
            if entry.draft not in ids:
                known = ", ".join(sorted(ids - {entry.id})) or "none"
                raise ValueError(f"model {entry.id!r}: draft {entry.draft!r} is not a "
                                 f"[[models]] id (configured: {known})")
        return self

    @property
    def keys_file(self) -> Path:
        return (self.auth.keys_file or self.config_dir / "keys.json").expanduser()

    @property
    def responses_path(self) -> Path:
        return (self.responses.path or self.state_dir / "responses.db").expanduser()

    @property
    def is_loopback(self) -> bool:
        return self.server.host in LOOPBACK_HOSTS or self.server.host.startswith("127.")


class ConfigError(Exception):
    """Configuration that cannot start a server; `str()` is one line per problem."""


def format_validation_error(error: ValidationError) -> str:
    lines = []
    for problem in error.errors():
        where = ".".join(str(part) for part in problem["loc"]) or "config"
        lines.append(f"config error: {where}: {problem['msg']} (got {problem.get('input')!r})")
    return "\n".join(lines)


def load_settings(config_file: Path | str | None = None, **overrides: Any) -> Settings:
    """Build settings from all sources; raise ConfigError with readable lines."""
    path = config_file or os.environ.get("MLXGW_CONFIG")
    toml_path = Path(path).expanduser() if path else None
    if toml_path is not None and not toml_path.is_file():
        raise ConfigError(f"config error: config file {toml_path} does not exist")

    class _FromSources(Settings):
        @classmethod
        def settings_customise_sources(
            cls,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
            if toml_path is not None:
                sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_path))
            return tuple(sources)

    try:
        loaded = _FromSources(**overrides)
    except ValidationError as error:
        raise ConfigError(format_validation_error(error)) from None
    except ValueError as error:  # e.g. TOML syntax
        raise ConfigError(f"config error: {error}") from None
    return Settings.model_construct(**dict(loaded))
