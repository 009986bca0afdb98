"""A client's model name -> the ordered chain of targets that may serve it.

- a route name: its chain;
- 'UPSTREAM:MODEL' with a configured upstream id: a chain of one;
- anything else (a local id or alias, or an unknown name): None, and the request goes to the
  local stack untouched, as it did before targets existed.
"""

from __future__ import annotations

from dataclasses import dataclass

from app.limits.window import Limiter
from app.models.registry import ModelRegistry
from app.settings import ConfigError, Settings
from app.targets.upstream import Upstream


@dataclass(frozen=True)
class Target:
    """One step of a chain. `upstream` None: the local engine, serving `model`."""

    name: str  # what x-mlxgw-served-by and the body's `model` say: 'qwen3-4b', 'studio:qwen3'
    model: str  # the id sent to whoever serves it
    upstream: Upstream | None = None


class Targets:
    def __init__(self, settings: Settings, registry: ModelRegistry,
                 upstreams: dict[str, Upstream]) -> None:
        self.registry = registry
        self.upstreams = upstreams
        self.routes: dict[str, list[Target]] = {}
        self.queue_wait: dict[str, float] = {}
        for route in settings.routes:
            self.routes[route.name] = [self._target(route.name, entry) for entry in route.chain]
            self.queue_wait[route.name] = route.queue_wait

    def _target(self, route: str, entry: str) -> Target:
        upstream = self._upstream_of(entry)
        if upstream is not None:
            return Target(entry, entry.partition(":")[2], upstream)
        try:
            spec = self.registry.resolve(entry)
        except Exception:
            raise ConfigError(
                f"config error: routes[{route}]: {entry!r} is neither a local model nor "
                f"'UPSTREAM:MODEL' with a configured upstream "
                f"(upstreams: {sorted(self.upstreams) or 'none'})") from None
        return Target(spec.id, spec.id)

    def _upstream_of(self, name: str) -> Upstream | None:
        upstream_id, sep, model = name.partition(":")
        upstream = self.upstreams.get(upstream_id) if sep and model else None
        return upstream if upstream is not None and upstream.serves(model) else None

    def resolve(self, name: str) -> list[Target] | None:
        """The chain for `name`, or None when the local stack alone answers for it."""
        if name in self.routes:
            return self.routes[name]
        upstream = self._upstream_of(name)
        if upstream is not None:
            return [Target(name, name.partition(":")[2], upstream)]
        return None

    @classmethod
    def build(cls, settings: Settings, registry: ModelRegistry,
              limiter: Limiter) -> Targets | None:
        """None when no upstream and no route is configured: nothing changes then."""
        if not settings.upstreams and not settings.routes:
            return None
        upstreams = {entry.id: Upstream(entry, limiter) for entry in settings.upstreams}
        return cls(settings, registry, upstreams)

    async def start(self) -> None:
        for upstream in self.upstreams.values():
            await upstream.start()

    async def aclose(self) -> None:
        for upstream in self.upstreams.values():
            await upstream.aclose()

    def names(self) -> list[tuple[str, str, list[str]]]:
        """(name, owned_by, chain) for /v1/models: every upstream model, then every route."""
        listed: list[tuple[str, str, list[str]]] = []
        for upstream in self.upstreams.values():
            listed += [(f"{upstream.id}:{model}", upstream.id, [f"{upstream.id}:{model}"])
                       for model in upstream.models()]
        listed += [(name, "route", [t.name for t in chain]) for name, chain in self.routes.items()]
        return listed
