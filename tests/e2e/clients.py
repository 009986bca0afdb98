"""Where the real coding-agent CLIs are: `make clients` installs them into .tools/ from npm."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TOOLS_BIN = ROOT / ".tools" / "node_modules" / ".bin"


def client_path() -> str:
    """PATH with the project's client installs first."""
    return f"{TOOLS_BIN}{os.pathsep}{os.environ.get('PATH', '')}"


def require_client(name: str) -> str:
    found = shutil.which(name, path=client_path())
    if found is None:
        pytest.skip(f"{name} is not installed: run `make clients` (npm) to test with it")
    return found
