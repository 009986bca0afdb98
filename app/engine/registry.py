"""Which models exist: ids and aliases clients may name, and where their files are.

A request can only name a registry id or alias; its string never reaches the filesystem.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from app.errors import ModelNotFound
from app.settings import DEMO_MODEL_ID, Settings


@dataclass(frozen=True)
class ModelSpec:
    id: str
    path: Path
    aliases: tuple[str, ...] = ()
    pinned: bool = False
    ttl: float | None = None
    max_context: int | None = None
    source: str = "config"

    @property
    def load_path(self) -> str:
        return str(self.path)


@dataclass
class ModelRegistry:
    specs: list[ModelSpec]
    _names: dict[str, ModelSpec] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        for spec in self.specs:
            for name in (spec.id, *spec.aliases):
                self._names.setdefault(name, spec)

    @classmethod
    def build(cls, settings: Settings, *, demo_path: Path | None) -> ModelRegistry:
        specs = [
            ModelSpec(id=m.id, path=m.path.expanduser(), aliases=tuple(m.aliases),
                      pinned=m.pinned, ttl=m.ttl, max_context=m.max_context)
            for m in settings.models
        ]
        if not specs and demo_path is not None:
            specs.append(ModelSpec(id=DEMO_MODEL_ID, path=demo_path, source="demo"))
        return cls(specs)

    @property
    def default_id(self) -> str | None:
        return self.specs[0].id if self.specs else None

    def resolve(self, name: str) -> ModelSpec:
        spec = self._names.get(name)
        if spec is None:
            known = ", ".join(sorted(s.id for s in self.specs)[:10]) or "none"
            raise ModelNotFound(
                f"The model {name!r} does not exist on this server. Available: {known}.",
                param="model",
            )
        return spec
