"""A structlog processor that masks anything shaped like a gateway key, wherever it appears.

Defence in depth: the security code never logs secrets, but another module might log a
header, a URL or an exception message that carries one. Install it before the renderer.
"""

from __future__ import annotations

import re
from collections.abc import MutableMapping
from typing import Any

# mgw-<16 hex id>-<urlsafe secret>: keep the id (useful, not secret), mask the secret.
_KEY_RE = re.compile(r"\b(mgw-[0-9a-f]{16}-)[A-Za-z0-9_\-]+")
_MASK = r"\1[redacted]"


def redact_text(text: str) -> str:
    return _KEY_RE.sub(_MASK, text)


def _redact(value: Any, depth: int = 0) -> Any:
    if isinstance(value, str):
        return redact_text(value) if "mgw-" in value else value
    if depth > 4:
        return value
    if isinstance(value, dict):
        return {key: _redact(item, depth + 1) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_redact(item, depth + 1) for item in value)
    return value


def redact_keys(
    logger: Any, method_name: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    for key, value in list(event_dict.items()):
        event_dict[key] = _redact(value)
    return event_dict
