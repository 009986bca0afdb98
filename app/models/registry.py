"""Which models exist: the ids and aliases clients may name, where their files are, and how much
memory each is expected to need.

Built once at start from `[[models]]` and a scan of `[discovery] model_dirs`. A request can only
name a registry id or alias: its string is looked up in a dict and never reaches the filesystem.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import structlog

from app.errors import ModelNotFound
from app.models.demo import demo_model_dir
from app.models.dequantize import float32_bytes, is_quantized
from app.models.gguf.convert import read_gguf_header
from app.settings import (
    DEMO_MODEL_ID,
    ModelEntry,
    Settings,
)

log = structlog.get_logger(__name__)

Source = Literal["config", "mlx", "hf-cache", "lmstudio", "gguf", "demo"]
Format = Literal["mlx", "gguf"]

DEFAULT_CONTEXT = 4096  # when a model's files do not say
_SHOWN_IDS = 8  # ids listed in a "model not found" message


@dataclass(frozen=True)
class ModelSpec:
    id: str
    path: Path
    source: Source
    format: Format
    aliases: tuple[str, ...] = ()
    weight_bytes: int = 0
    kv_bytes_per_token: int = 0
    context_length: int = DEFAULT_CONTEXT  # the model's own, capped by max_context
    max_context: int | None = None  # the configured cap, if any
    # Issue 19: this model's overflow policy and answer reserve; None = the [engine] default.
    overflow: str | None = None
    answer_reserve_tokens: int | None = None
    pinned: bool = False
    ttl: float | None = None  # None: [residency] default_ttl; 0: never evict when idle
    # Sampling for fields a request leaves out: [[models]] sampling over generation_config.json.
    sampling: tuple[tuple[str, float], ...] = ()
    # Quantized models: their weights' size dequantized to float32 (what the CPU backend serves,
    # app.models.dequantize); 0 for float models.
    float32_weight_bytes: int = 0
    # Issue 17: the id of the model whose greedy/sampled continuation drafts for this one
    # (speculative decoding); None: prompt lookup.
    draft: str | None = None

    @property
    def load_path(self) -> str:
        return str(self.path)

    @property
    def max_output_tokens(self) -> int:
        """The longest answer clients are told to ask for: a quarter of the context (at least
        256), so a client keeps most of the window for its conversation."""
        return min(self.context_length, max(256, self.context_length // 4))

    @property
    def estimated_bytes(self) -> int:
        """Weights plus a KV cache filled to the context length: what residency budgets."""
        return self.weight_bytes + self.kv_bytes_per_token * self.context_length

    @property
    def quantized(self) -> bool:
        return self.float32_weight_bytes > 0

    @property
    def float32_estimated_bytes(self) -> int:
        """`estimated_bytes` of the float32 copy: float32 weights, and a KV cache in float32
        (twice the 16-bit estimate of a quantized model: activations follow the weights)."""
        return self.float32_weight_bytes + 2 * self.kv_bytes_per_token * self.context_length


class ModelRegistry:
    def __init__(self, specs: list[ModelSpec], warnings: list[str] | None = None, *,
                 log_warnings: bool = True) -> None:
        self.warnings: list[str] = list(warnings or [])
        self.specs: list[ModelSpec] = []
        self._names: dict[str, ModelSpec] = {}
        for spec in specs:
            self._add(spec)
        if log_warnings:  # the CLI prints them itself, keeping stdout for the table
            for message in self.warnings:
                log.warning("model registry", problem=message)

    def _add(self, spec: ModelSpec) -> None:
        # First wins, in a deterministic order (config, then model_dirs in order, sorted names).
        holder = self._names.get(spec.id)
        if holder is not None:
            self.warnings.append(f"duplicate model id {spec.id!r}: {spec.path} ignored, "
                                 f"{holder.path} ({holder.source}) keeps it")
            return
        aliases = []
        for alias in spec.aliases:
            taken = self._names.get(alias)
            if taken is not None or alias == spec.id or alias in aliases:
                owner = taken.id if taken else spec.id
                self.warnings.append(f"duplicate alias {alias!r} of model {spec.id!r} "
                                     f"ignored: it already names {owner!r}")
                continue
            aliases.append(alias)
        if tuple(aliases) != spec.aliases:
            spec = replace(spec, aliases=tuple(aliases))
        self.specs.append(spec)
        for name in (spec.id, *spec.aliases):
            self._names[name] = spec

    @classmethod
    def from_settings(cls, settings: Settings, *, log_warnings: bool = True) -> ModelRegistry:
        """The registry `serve` and `models list` use: the demo model counts once it exists
        (`mlx-gateway models demo` converts it)."""
        demo = demo_model_dir(settings.cache_dir)
        return cls.build(settings, demo_path=demo if demo.is_dir() else None,
                         log_warnings=log_warnings)

    @classmethod
    def build(cls, settings: Settings, *, demo_path: Path | None,
              log_warnings: bool = True) -> ModelRegistry:
        warnings: list[str] = []
        specs = [_spec_from_entry(entry, warnings) for entry in settings.models]
        for folder in settings.discovery.model_dirs:
            specs.extend(discover(folder.expanduser(), warnings))
        if not specs and demo_path is not None:
            specs.append(_demo_spec(demo_path))
        return cls(specs, warnings, log_warnings=log_warnings)

    def __iter__(self) -> Iterator[ModelSpec]:
        return iter(self.specs)

    def __len__(self) -> int:
        return len(self.specs)

    @property
    def ids(self) -> list[str]:
        return [spec.id for spec in self.specs]

    @property
    def default_id(self) -> str | None:
        """The first model: configured ones come first, the demo model when nothing else."""
        return self.specs[0].id if self.specs else None

    def get(self, name: str) -> ModelSpec | None:
        return self._names.get(name)

    def resolve(self, name: str, visible: Callable[[ModelSpec], bool] | None = None
                ) -> ModelSpec:
        """The model a request names, by exact id or alias; ModelNotFound otherwise.

        `visible` narrows what the caller may know exists (a key's model scope): a model
        outside it is not found, and the error lists only visible ones.
        """
        spec = self._names.get(name) if isinstance(name, str) else None
        if spec is not None and visible is not None and not visible(spec):
            spec = None
        if spec is None:
            ids = [s.id for s in self.specs if visible is None or visible(s)]
            shown = ", ".join(ids[:_SHOWN_IDS]) or "none"
            hidden = len(ids) - _SHOWN_IDS
            more = f" and {hidden} more" if hidden > 0 else ""
            named = name[:100] + "..." if isinstance(name, str) and len(name) > 100 else name
            raise ModelNotFound(
                f"The model {named!r} does not exist on this server. Available: {shown}{more}.",
                param="model")
        return spec


# --- building specs ------------------------------------------------------------------------


def _spec_from_entry(entry: ModelEntry, warnings: list[str]) -> ModelSpec:
    path = entry.path.expanduser()
    if path.is_dir() and not _is_mlx_folder(path) and len(_ggufs(path)) == 1:
        path = _ggufs(path)[0]  # a folder holding one .gguf (as LM Studio keeps them)
    if not path.exists():
        warnings.append(f"model {entry.id!r}: {path} does not exist; loading it will fail")
    elif not (path.is_file() and path.suffix == ".gguf") and not _is_mlx_folder(path):
        warnings.append(f"model {entry.id!r}: {path} is neither an MLX folder "
                        "(config.json + *.safetensors) nor a .gguf file")
    spec = _make_spec(entry.id, path, "config", aliases=tuple(entry.aliases),
                      pinned=entry.pinned, ttl=entry.ttl, max_context=entry.max_context)
    configured = {k: v for k, v in entry.sampling.model_dump().items() if v is not None}
    return replace(spec, sampling=tuple({**dict(spec.sampling), **configured}.items()),
                   overflow=entry.overflow, answer_reserve_tokens=entry.answer_reserve_tokens,
                   draft=entry.draft)


def _demo_spec(demo_path: Path) -> ModelSpec:
    return _make_spec(DEMO_MODEL_ID, demo_path, "demo")


def _make_spec(model_id: str, path: Path, source: Source, *, aliases: tuple[str, ...] = (),
               pinned: bool = False, ttl: float | None = None,
               max_context: int | None = None) -> ModelSpec:
    if path.suffix == ".gguf":
        fmt: Format = "gguf"
        weights = _size(path)
        kv_per_token, context = _gguf_kv(path)
        float32 = _gguf_float32_bytes(path)
    else:
        fmt = "mlx"
        weights = sum(_size(p) for p in _safetensors(path))
        kv_per_token, context = _config_kv(path / "config.json")
        float32 = _mlx_float32_bytes(path)
    if max_context is not None:
        context = min(context, max_context)
    return ModelSpec(id=model_id, path=path, source=source, format=fmt, aliases=aliases,
                     weight_bytes=weights, kv_bytes_per_token=kv_per_token,
                     context_length=context, max_context=max_context, pinned=pinned, ttl=ttl,
                     sampling=_generation_defaults(path) if fmt == "mlx" else (),
                     float32_weight_bytes=float32)


def _mlx_float32_bytes(folder: Path) -> int:
    if not is_quantized(folder):
        return 0
    try:
        return float32_bytes(folder)
    except (OSError, ValueError, KeyError, TypeError):  # unreadable: served as it is
        return 0


def _gguf_float32_bytes(path: Path) -> int:
    """Float32 size of a GGUF with quantized tensors (it converts to a quantized MLX folder)."""
    try:
        tensors = read_gguf_header(path).tensors
    except (OSError, ValueError):
        return 0
    if all(t.ggml_type in ("F32", "F16") for t in tensors):
        return 0
    return sum(t.n_elements for t in tensors) * 4


def _generation_defaults(folder: Path) -> tuple[tuple[str, float], ...]:
    """The sampling a model's authors recommend (generation_config.json), as vLLM uses it."""
    try:
        config = json.loads((folder / "generation_config.json").read_text())
    except (OSError, ValueError):
        return ()
    if not isinstance(config, dict):
        return ()
    return tuple((name, float(config[name])) for name in
                 ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
                 if isinstance(config.get(name), int | float)
                 and not isinstance(config.get(name), bool))


def _size(path: Path) -> int:
    try:
        return path.stat().st_size  # follows HF cache symlinks to the blobs
    except OSError:
        return 0


def _safetensors(folder: Path) -> list[Path]:
    try:
        return sorted(p for p in folder.glob("*.safetensors") if p.is_file())
    except OSError:
        return []


def _is_mlx_folder(folder: Path) -> bool:
    return folder.is_dir() and (folder / "config.json").is_file() and bool(_safetensors(folder))


def _ggufs(folder: Path) -> list[Path]:
    # Vision projectors ship beside the language model in LM Studio repos; they are not models.
    try:
        return sorted(p for p in folder.glob("*.gguf")
                      if p.is_file() and not p.name.lower().startswith("mmproj"))
    except OSError:
        return []


def _config_kv(config_file: Path) -> tuple[int, int]:
    """(KV bytes per token, context length) from a Hugging Face style config.json."""
    try:
        config: dict[str, Any] = json.loads(config_file.read_text())
    except (OSError, ValueError):
        return 0, DEFAULT_CONTEXT
    text = config.get("text_config")
    if isinstance(text, dict):  # multimodal configs keep the language model's keys here
        config = {**config, **text}
    try:
        layers = int(config.get("num_hidden_layers") or config.get("n_layer") or 0)
        heads = int(config.get("num_attention_heads") or config.get("n_head") or 0)
        kv_heads = int(config.get("num_key_value_heads") or heads)
        hidden = int(config.get("hidden_size") or config.get("n_embd") or 0)
        head_dim = int(config.get("head_dim") or (hidden // heads if heads else 0))
        context = int(config.get("max_position_embeddings") or DEFAULT_CONTEXT)
    except (TypeError, ValueError):
        return 0, DEFAULT_CONTEXT
    dtype = str(config.get("torch_dtype") or config.get("dtype") or "float16")
    element = 4 if dtype == "float32" else 2
    return 2 * layers * kv_heads * head_dim * element, context


def _gguf_kv(path: Path) -> tuple[int, int]:
    """(KV bytes per token, context length) from GGUF metadata; KV assumed float16 once loaded."""
    try:
        meta = read_gguf_header(path).metadata
    except (OSError, ValueError):  # malformed or unreadable: the estimate falls back
        return 0, DEFAULT_CONTEXT
    arch = meta.get("general.architecture")
    if not isinstance(arch, str):
        return 0, DEFAULT_CONTEXT

    def number(key: str, default: int = 0) -> int:
        value = meta.get(f"{arch}.{key}", default)
        if isinstance(value, list):  # per-layer values in some architectures
            value = max((v for v in value if isinstance(v, int)), default=default)
        return int(value) if isinstance(value, int | float) else default

    layers = number("block_count")
    heads = number("attention.head_count")
    kv_heads = number("attention.head_count_kv", heads)
    embedding = number("embedding_length")
    key_len = number("attention.key_length", embedding // heads if heads else 0)
    value_len = number("attention.value_length", key_len)
    context = number("context_length", DEFAULT_CONTEXT) or DEFAULT_CONTEXT
    return layers * kv_heads * (key_len + value_len) * 2, context


# --- discovery -------------------------------------------------------------------------------


def discover(folder: Path, warnings: list[str]) -> list[ModelSpec]:
    """Models under one `[discovery] model_dirs` entry, in sorted (deterministic) order.

    Recognised, one or two levels deep: MLX folders (`name/`, id `name`), Hugging Face cache
    entries (`models--org--name/`, id `org/name`), LM Studio repos (`publisher/repo/`, id
    `publisher/repo`, or the file stem when a repo holds several .gguf files) and loose
    `.gguf` files (id: the file stem). The folder itself may also be an MLX folder.
    """
    if not folder.is_dir():
        warnings.append(f"[discovery] model_dirs: {folder} is not a folder; skipped")
        return []
    if _is_mlx_folder(folder):
        return [_make_spec(folder.name, folder, "mlx")]
    found: list[ModelSpec] = []
    for child in _children(folder, warnings):
        if child.name == "hub" and child.is_dir():  # ~/.cache/huggingface given, not its hub/
            found.extend(discover(child, warnings))
        elif child.name.startswith("models--") and child.is_dir():
            found.extend(_hf_cache_entry(child, warnings))
        elif _is_mlx_folder(child):
            found.append(_make_spec(child.name, child, "mlx"))
        elif child.is_dir():
            for repo in _children(child, warnings):
                found.extend(_lmstudio_repo(child.name, repo, warnings))
        elif (child.suffix == ".gguf" and child.is_file()
              and not child.name.lower().startswith("mmproj")):
            found.append(_make_spec(child.stem, child, "gguf"))
    return found


def _children(folder: Path, warnings: list[str]) -> list[Path]:
    try:
        return sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    except OSError as error:
        warnings.append(f"cannot scan {folder}: {error.strerror or error}")
        return []


def _hf_cache_entry(entry: Path, warnings: list[str]) -> list[ModelSpec]:
    parts = entry.name.split("--")[1:]
    if len(parts) < 2 or not all(parts):
        return []
    model_id = "/".join(parts)
    snapshot = _hf_snapshot(entry)
    if snapshot is None:
        return []
    if _is_mlx_folder(snapshot):
        return [_make_spec(model_id, snapshot, "hf-cache")]
    ggufs = _ggufs(snapshot)
    if len(ggufs) == 1:
        return [_make_spec(model_id, ggufs[0], "hf-cache")]
    return [_make_spec(p.stem, p, "hf-cache") for p in ggufs]


def _hf_snapshot(entry: Path) -> Path | None:
    """refs/main's snapshot when present, else the most recently written one."""
    snapshots = entry / "snapshots"
    try:
        revision = (entry / "refs" / "main").read_text().strip()
    except OSError:
        revision = ""
    # The revision is a commit hash written by huggingface_hub; refuse anything path-like.
    if revision and "/" not in revision and "\\" not in revision and revision not in {".", ".."}:
        candidate = snapshots / revision
        if candidate.is_dir():
            return candidate
    try:
        folders = [(p.stat().st_mtime, p.name, p) for p in snapshots.iterdir() if p.is_dir()]
    except OSError:
        return None
    return max(folders)[2] if folders else None


def _lmstudio_repo(publisher: str, repo: Path, warnings: list[str]) -> list[ModelSpec]:
    model_id = f"{publisher}/{repo.name}"
    if _is_mlx_folder(repo):
        return [_make_spec(model_id, repo, "lmstudio")]
    if not repo.is_dir():
        return []
    ggufs = _ggufs(repo)
    if len(ggufs) == 1:
        return [_make_spec(model_id, ggufs[0], "lmstudio")]
    return [_make_spec(p.stem, p, "lmstudio") for p in ggufs]
