"""What a stored response is, and the interface every backend offers."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol


@dataclass
class StoredResponse:
    """One turn of a `/v1/responses` conversation, as kept between requests.

    `context` is what the NEXT turn continues from: the previous context, this turn's input
    and this turn's output, as JSON-able internal messages. Instructions are not part of it
    (they are not inherited). Keeping the whole context per turn costs space, but a chain
    survives the deletion or expiry of its earlier turns.
    """

    id: str
    owner: str
    created_at: float
    expires_at: float
    response: dict[str, Any]
    input_items: list[dict[str, Any]] = field(default_factory=list)
    context: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> StoredResponse:
        data = json.loads(text)
        return cls(
            id=str(data["id"]),
            owner=str(data["owner"]),
            created_at=float(data["created_at"]),
            expires_at=float(data["expires_at"]),
            response=dict(data["response"]),
            input_items=list(data.get("input_items") or []),
            context=list(data.get("context") or []),
        )


class ResponseStore(Protocol):
    """Stored responses, scoped by owner: another owner's response does not exist for you."""

    async def put(self, item: StoredResponse) -> None: ...

    async def get(self, response_id: str, owner: str) -> StoredResponse | None: ...

    async def delete(self, response_id: str, owner: str) -> bool: ...

    async def close(self) -> None: ...
