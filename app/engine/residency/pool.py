"""The resident models: load on demand (once, however many ask), evict by the residency
policy, wait for leases, sweep idle models after their TTL.

`ResidencyPolicy` decides (pure logic); this module carries the decisions out. Loads and
evictions run on the MLX thread; everything else runs on the event loop.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from app import metrics
from app.engine.cpu.tuning import on_cpu_backend, tune_for_cpu
from app.engine.disk_cache import DiskCache, ModelDisk, weights_fingerprint
from app.engine.draft_model import DraftModel
from app.engine.residency.policy import EvictReason, ResidencyPolicy
from app.engine.scheduler import ModelBatch, _vocab_size
from app.engine.speculative import SpeculationPolicy
from app.engine.thread import EngineThread
from app.errors import (
    Conflict,
    InsufficientMemory,
    ModelLoadFailed,
    Overloaded,
)
from app.models.draft_check import tokenizer_mismatch
from app.models.registry import ModelRegistry, ModelSpec
from app.settings import Settings, format_bytes

log = structlog.get_logger(__name__)
TTL_SWEEP_MAX_SECONDS = 30.0


@dataclass(eq=False)
class LoadedModel:
    spec: ModelSpec
    batch: ModelBatch
    tokenizer: Any
    context_length: int
    loaded_at: float = field(default_factory=time.time)

    @property
    def id(self) -> str:
        return self.spec.id


class ModelPool:
    def __init__(self, settings: Settings, registry: ModelRegistry, thread: EngineThread) -> None:
        self.settings = settings
        self.registry = registry
        self.policy = ResidencyPolicy.from_settings(settings.residency)
        self._thread = thread
        self._loaded: dict[str, LoadedModel] = {}
        self._loading: dict[str, asyncio.Future[LoadedModel]] = {}
        self._load_tasks: set[asyncio.Task[None]] = set()
        self._released = asyncio.Event()  # set whenever a lease or memory is given back
        self._waiting: collections.Counter[str] = collections.Counter()
        self._on_cpu = on_cpu_backend()
        self._disk: DiskCache | None = None  # opened with the first model (on the MLX thread)
        for spec in registry:
            if self.footprint(spec) <= self.policy.budget_bytes:
                continue
            log.warning("model can never fit the memory budget", model=spec.id,
                        needs=format_bytes(self.footprint(spec)),
                        budget=format_bytes(self.policy.budget_bytes))

    def footprint(self, spec: ModelSpec) -> int:
        """Bytes a model is charged: weights, KV for its context, and its prefix cache; a
        quantized model served from its float32 copy at the copy's size; and its draft
        model's weights and KV (loaded and evicted with it)."""
        weights = self._model_bytes(spec)
        draft = self.draft_of(spec)
        if draft is not None:
            weights += self._model_bytes(draft)
        return weights + self.settings.engine.prompt_cache_bytes

    def _model_bytes(self, spec: ModelSpec) -> int:
        return spec.float32_estimated_bytes if self.serves_float32(spec) \
            else spec.estimated_bytes

    def _weight_bytes(self, spec: ModelSpec) -> int:
        return spec.float32_weight_bytes if self.serves_float32(spec) else spec.weight_bytes

    def draft_of(self, spec: ModelSpec) -> ModelSpec | None:
        """The model that drafts for `spec` (speculative decoding on), or None.

        The draft is a private copy owned by its target's batch: loaded with the target,
        charged in the target's footprint, freed when the target is evicted, never evicted
        on its own while the target runs. A client naming the draft's id gets a separate,
        separately charged copy (keep it simple: no sharing of weights between entries)."""
        if spec.draft is None or self.settings.engine.speculative != "auto":
            return None
        return self.registry.get(spec.draft)

    def serves_float32(self, spec: ModelSpec) -> bool:
        """Whether a quantized model is served dequantized (`[engine] cpu_dequantize`): on
        MLX's CPU backend only, and only where the float32 copy fits the memory budget."""
        if not (spec.quantized and self.settings.engine.cpu_dequantize and self._on_cpu):
            return False
        cache = self.settings.engine.prompt_cache_bytes
        return spec.float32_estimated_bytes + cache <= self.policy.budget_bytes

    def loaded(self) -> dict[str, LoadedModel]:
        return dict(self._loaded)

    def is_loading(self, model_id: str) -> bool:
        return model_id in self._loading

    def waiting(self, model_id: str) -> int:
        """Requests waiting for `model_id` to be loaded (or for memory to load it)."""
        return self._waiting[model_id]

    async def acquire(self, name: str) -> LoadedModel:
        """The resident model for `name` with a lease on it (never evicted until `release`)."""
        spec = self.registry.resolve(name)
        self._waiting[spec.id] += 1
        try:
            return await self._acquire(spec)
        finally:
            self._waiting[spec.id] -= 1
            if not self._waiting[spec.id]:
                del self._waiting[spec.id]

    async def _acquire(self, spec: ModelSpec) -> LoadedModel:
        started = time.monotonic()
        deadline = started + self.settings.residency.load_wait
        while True:
            if (loaded := self._loaded.get(spec.id)) is not None:
                self.policy.acquire(spec.id, time.time())
                metrics.MODEL_WAIT_DURATION.observe(time.monotonic() - started)
                return loaded
            if (pending := self._loading.get(spec.id)) is not None:
                await asyncio.shield(pending)  # single flight: share the load under way
                continue
            decision = self.policy.decide_load(spec.id, self.footprint(spec), time.time())
            if decision.kind == "never":
                raise InsufficientMemory(decision.reason, param="model")
            if decision.kind == "wait":
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise Overloaded(f"The model cannot be loaded now: {decision.reason}.",
                                     retry_after=max(5.0, self.settings.residency.load_wait))
                self._released.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._released.wait(), remaining)
                continue
            await asyncio.shield(self._begin_load(spec, decision.evict))

    def release(self, loaded: LoadedModel) -> None:
        self.policy.release(loaded.id, time.time())
        self._released.set()

    async def load(self, name: str) -> LoadedModel:
        """Make `name` resident (admin endpoint, pinned models at start)."""
        loaded = await self.acquire(name)
        self.release(loaded)
        return loaded

    async def unload(self, name: str) -> bool:
        """Evict `name` now (admin endpoint); refuse while requests are using it."""
        spec = self.registry.resolve(name)
        resident = self.policy.get(spec.id)
        if resident is None or spec.id not in self._loaded:
            return False
        if resident.leases:
            raise Conflict(f"model {spec.id!r} has {resident.leases} requests in flight; "
                           "unload it when they finish")
        await self._evict(spec.id, "manual")
        return True

    async def sweep_idle(self) -> None:
        """Run forever: evict models whose idle TTL ran out. A failed eviction is logged and
        the sweep goes on (it used to end the sweeper for good, and with it every TTL)."""
        while True:
            delay = self.policy.next_expiry(time.time())
            await asyncio.sleep(min(delay if delay is not None else TTL_SWEEP_MAX_SECONDS,
                                    TTL_SWEEP_MAX_SECONDS) + 0.05)
            try:
                for model_id in self.policy.expired(time.time()):
                    if model_id in self._loaded:
                        await self._evict(model_id, "ttl")
            except Exception:
                log.exception("idle sweep failed; retrying at the next sweep")
                await asyncio.sleep(1.0)  # a persistent failure must not spin

    async def close(self) -> None:
        for task in list(self._load_tasks):
            task.cancel()
        for model_id in list(self._loaded):
            await self._evict(model_id, "manual")
        if self._disk is not None:  # the drain's last prefixes are the ones a restart wants
            await asyncio.to_thread(self._disk.close)

    # --- carrying decisions out ---------------------------------------------------------------

    def _begin_load(self, spec: ModelSpec, evict: tuple[str, ...]) -> asyncio.Future[LoadedModel]:
        """Reserve and start loading `spec` in a task of its own; the future settles with it.

        The load is nobody's coroutine: a requester that is cancelled (its client left, the
        warm-up stopped) neither cancels a load others wait for nor leaves its memory reserved.
        """
        future: asyncio.Future[LoadedModel] = asyncio.get_running_loop().create_future()
        self._loading[spec.id] = future
        # Victims leave the pool before the first await, so no request can lease one of them
        # while it is being unloaded.
        reason: EvictReason = (
            "budget" if self.policy.used_bytes + self.footprint(spec) > self.policy.budget_bytes
            else "lru")
        victims = [victim for victim in evict if self._detach(victim, reason)]
        # Reserve the memory before the first await, so every concurrent decision counts it.
        self.policy.mark_loaded(spec.id, self.footprint(spec), time.time(), pinned=spec.pinned,
                                ttl=spec.ttl)
        self.policy.acquire(spec.id, time.time())  # a model being loaded is no one's victim
        task = asyncio.ensure_future(self._load(spec, victims, reason, future))
        self._load_tasks.add(task)
        task.add_done_callback(self._load_tasks.discard)
        return future

    async def _load(self, spec: ModelSpec, victims: list[str], reason: EvictReason,
                    future: asyncio.Future[LoadedModel]) -> None:
        started = time.monotonic()
        try:
            for victim in victims:
                await self._unload(victim, reason)
            loaded = await self._thread.call(lambda: self._load_on_thread(spec))
        except BaseException as error:  # CancelledError too: never leak the reservation
            self.policy.forget(spec.id)
            self._released.set()
            metrics.MODEL_LOADS.labels(result="error").inc()
            log.error("model load failed", model=spec.id, error=repr(error))
            cause = "the server is stopping" if isinstance(error, asyncio.CancelledError) \
                else str(error)
            future.set_exception(ModelLoadFailed(f"model {spec.id!r} failed to load: {cause}"))
            future.exception()  # retrieved here; waiters re-raise it through shield
            if not isinstance(error, Exception):
                raise
            return
        finally:
            self._loading.pop(spec.id, None)
        self.policy.release(spec.id, time.time())
        metrics.MODEL_LOADS.labels(result="ok").inc()
        metrics.MODEL_LOAD_DURATION.labels(model=spec.id).observe(time.monotonic() - started)
        self._loaded[spec.id] = loaded
        future.set_result(loaded)

    async def _evict(self, model_id: str, reason: EvictReason) -> None:
        if self._detach(model_id, reason):
            await self._unload(model_id, reason)

    def _detach(self, model_id: str, reason: EvictReason) -> bool:
        if self._loaded.pop(model_id, None) is None:
            return False
        self.policy.mark_evicted(model_id, reason)
        return True

    async def _unload(self, model_id: str, reason: EvictReason) -> None:
        reclaimed = await self._thread.call(lambda: self._unload_on_thread(model_id))
        metrics.RECLAIMED_BYTES.inc(max(reclaimed, 0))
        log.info("model evicted", model=model_id, reason=reason,
                 reclaimed=format_bytes(max(reclaimed, 0)))
        self._released.set()

    # --- on the MLX thread --------------------------------------------------------------------

    def _load_on_thread(self, spec: ModelSpec) -> LoadedModel:
        from mlx_lm import load

        started = time.monotonic()
        log.info("model load started", model=spec.id, path=spec.load_path)
        path = self._mlx_folder(spec)
        model, tokenizer, config = load(str(path), return_config=True)
        disk = self._disk_for(spec, model)
        if self.settings.engine.cpu_tuning:
            tune_for_cpu(model)
        context = int(config.get("max_position_embeddings") or spec.context_length or 4096)
        if spec.max_context:
            context = min(context, spec.max_context)
        engine = self.settings.engine
        draft = self._load_draft(spec, model, tokenizer)
        speculation = None
        if engine.speculative == "auto":
            speculation = SpeculationPolicy()
            draft_spec = self.draft_of(spec)
            if draft is not None and draft_spec is not None:
                # A draft token costs about one step of the small model: on a bandwidth-bound
                # machine, its weights over the target's.
                speculation.draft_token_cost = (self._weight_bytes(draft_spec)
                                                / max(self._weight_bytes(spec), 1))
        batch = ModelBatch(model, tokenizer, max_batch_size=engine.max_batch_size,
                           prefill_chunk=engine.prefill_chunk,
                           prefill_budget=engine.prefill_budget,
                           long_prompt_tokens=engine.long_prompt_tokens,
                           prompt_cache_bytes=engine.prompt_cache_bytes,
                           stream=self._thread.stream, model_id=spec.id, disk=disk,
                           speculation=speculation, draft_model=draft)
        self._thread.attach(spec.id, batch)
        _publish_memory()
        log.info("model load finished", model=spec.id, context_length=context,
                 seconds=round(time.monotonic() - started, 3))
        return LoadedModel(spec=spec, batch=batch, tokenizer=tokenizer, context_length=context)

    def _load_draft(self, spec: ModelSpec, model: Any, tokenizer: Any) -> DraftModel | None:
        """Load `spec`'s draft model (its own copy, see `draft_of`); refuses a draft whose
        tokenizer differs (a GGUF pair is only comparable once converted)."""
        from mlx_lm import load

        draft_spec = self.draft_of(spec)
        if draft_spec is None:
            return None
        log.info("draft model load started", model=spec.id, draft=draft_spec.id)
        draft_model, draft_tokenizer = load(str(self._mlx_folder(draft_spec)))[:2]
        why = tokenizer_mismatch(tokenizer, draft_tokenizer)
        if why is not None:
            raise ValueError(f"its draft model {draft_spec.id!r} does not share its tokenizer: "
                             f"{why}")
        if self.settings.engine.cpu_tuning:
            tune_for_cpu(draft_model)
        return DraftModel(draft_model, vocab=_vocab_size(model, tokenizer), model_id=draft_spec.id)

    def _disk_for(self, spec: ModelSpec, model: Any) -> ModelDisk | None:
        """The model's disk tier, keyed by the weights it was loaded from (their files and
        the loaded parameters), or None when off."""
        engine = self.settings.engine
        if engine.disk_cache_bytes <= 0 or engine.prompt_cache_bytes <= 0:
            return None
        if self._disk is None:
            self._disk = DiskCache(self.settings.cache_dir / "prefix-cache",
                                   engine.disk_cache_bytes,
                                   min_tokens=engine.disk_cache_min_tokens)
        if not self._disk.enabled:
            return None
        try:
            # KV computed with and without the CPU layouts may differ in the last bits.
            fingerprint = weights_fingerprint(Path(spec.load_path), model,
                                              f"cpu_tuning={engine.cpu_tuning}")
        except OSError as error:
            log.warning("disk prefix cache off for a model whose files cannot be read",
                        model=spec.id, error=repr(error))
            return None
        return self._disk.bind(spec.id, fingerprint)

    def _mlx_folder(self, spec: ModelSpec) -> Path:
        folder = Path(spec.load_path)
        if spec.format == "gguf":
            from app.models.gguf.convert import ensure_converted

            safe = re.sub(r"[^A-Za-z0-9._-]+", "--", spec.id)
            folder = ensure_converted(folder, self.settings.cache_dir / "models" / safe)
        if self.serves_float32(spec):
            from app.models.dequantize import ensure_dequantized

            log.info("serving a float32 copy of a quantized model (CPU backend)", model=spec.id)
            folder = ensure_dequantized(folder, self.settings.cache_dir)
        return folder

    def _unload_on_thread(self, model_id: str) -> int:
        """Drop every reference, collect, return MLX's cache to the OS; bytes reclaimed."""
        import mlx.core as mx

        before = int(mx.get_active_memory())
        batch = self._thread.detach(model_id)
        if batch is not None:
            batch.cancel_all(Overloaded("The model was unloaded; retry shortly.", retry_after=1),
                             save=False)
            batch.close()
        del batch
        gc.collect()
        mx.clear_cache()
        _publish_memory()
        return before - int(mx.get_active_memory())


def _publish_memory() -> None:
    import mlx.core as mx

    metrics.MLX_ACTIVE_BYTES.set(int(mx.get_active_memory()))
