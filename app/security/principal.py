"""Who is calling: set by the auth middleware at `scope["state"]["principal"]`."""

from __future__ import annotations

from dataclasses import dataclass

from app.security.keys import KeyRecord


@dataclass(frozen=True)
class Principal:
    key_id: str | None
    name: str
    admin: bool
    models: frozenset[str] | None  # None: every model
    rpm: int | None  # None: the configured default
    tpm: int | None
    client_ip: str
    visitor_rpm: int | None = None  # per client address, for keys embedded in public pages

    @property
    def owner(self) -> str:
        """Owner tag for stored objects (responses)."""
        return self.key_id or "anonymous"

    @classmethod
    def from_key(cls, record: KeyRecord, client_ip: str) -> Principal:
        return cls(
            key_id=record.id, name=record.name, admin=record.admin,
            models=frozenset(record.models) if record.models is not None else None,
            rpm=record.rpm, tpm=record.tpm, client_ip=client_ip, visitor_rpm=record.visitor_rpm,
        )

    @classmethod
    def anonymous(cls, client_ip: str) -> Principal:
        """Auth disabled (loopback only): full access, limited per IP."""
        return cls(key_id=None, name="anonymous", admin=True, models=None,
                   rpm=None, tpm=None, client_ip=client_ip)

    @classmethod
    def unauthenticated(cls, client_ip: str) -> Principal:
        """Open routes (health, CORS preflight) without a key: no models, no admin."""
        return cls(key_id=None, name="unauthenticated", admin=False, models=frozenset(),
                   rpm=None, tpm=None, client_ip=client_ip)
