"""Headless Debian Chromium driven by selenium, for the console tests.

Skipped with a reason when chromium or chromium-driver is not installed (make test installs
both). Screenshots go to test-artifacts/ (ignored by git) so a person can look at them.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts" / "console"
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--window-size=1280,900",
)


def _binaries() -> tuple[str, str]:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if chromium is None or driver is None:
        pytest.skip("chromium and chromium-driver are not installed (make system-deps "
                    "installs them); the console's browser tests need a real browser")
    try:
        import selenium  # noqa: F401
    except ImportError:
        pytest.skip("selenium is not installed (pip install -e '.[dev]')")
    return chromium, driver


@contextmanager
def chromium(*extra_flags: str) -> Iterator[Any]:
    """A fresh headless Chromium (its own empty profile) as a selenium WebDriver."""
    binary, driver_path = _binaries()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    with tempfile.TemporaryDirectory(prefix="mlxgw-chromium-") as profile:
        options = webdriver.ChromeOptions()
        options.binary_location = binary
        for flag in (*CHROMIUM_FLAGS, *extra_flags, f"--user-data-dir={profile}"):
            options.add_argument(flag)
        # The test run preloads OpenBLAS for MLX; Chromium's renderers must not inherit it.
        env = {k: v for k, v in os.environ.items()
               if k != "LD_PRELOAD" and not k.startswith("OPENBLAS_")}
        driver = webdriver.Chrome(options=options, service=Service(driver_path, env=env))
        try:
            yield driver
        finally:
            driver.quit()


def wait_for(driver: Any, condition: Callable[[Any], Any], timeout: float = 30,
             what: str = "condition") -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(
        condition, message=f"timed out waiting for {what}")


def screenshot(driver: Any, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    driver.save_screenshot(str(path))
    return path
