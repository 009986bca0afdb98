"""Fixtures shared by the unit tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest


@pytest.fixture(scope="session")
def tokenizer() -> Any:
    """The demo model's tokenizer (mlx-lm's wrapper): real vocabulary and chat template,
    no weights loaded. `make test` converts the demo model first."""
    from mlx_lm.utils import load_tokenizer

    from app.models.demo import ensure_demo_model
    from app.settings import load_settings

    return load_tokenizer(Path(ensure_demo_model(load_settings().cache_dir)))
