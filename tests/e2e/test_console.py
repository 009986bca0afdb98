"""The console: its data endpoint's access rules, its pages' headers and contents, and the two
pages driven in a real headless Chromium against the real gateway and demo model (the status
page through the shipped Caddyfile under a path prefix)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.caddy_server import running_caddy
from tests.e2e.browser import chromium, screenshot, wait_for
from tests.e2e.conftest import DEMO_ID
from tests.e2e.gateway_process import ROOT, GatewayProcess
from tests.e2e.test_security import keys_cli
from tests.local_server import free_port, serving

pytestmark = pytest.mark.e2e
PAGES = ("/console", "/console/chat")


class Console:
    def __init__(self, server: GatewayProcess, tokens: dict[str, str], widget_port: int
                 ) -> None:
        self.server, self.tokens, self.widget_port = server, tokens, widget_port

    def get(self, path: str, who: str | None = None) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.tokens[who]}"} if who else {}
        return httpx.get(self.server.base_url + path, headers=headers, timeout=30)


@pytest.fixture(scope="module")
def console(tmp_path_factory: pytest.TempPathFactory, demo_float32_dir: Path
            ) -> Iterator[Console]:
    workdir = tmp_path_factory.mktemp("console")
    widget_port = free_port()  # where the example chat widget page is served from
    server = GatewayProcess(workdir, {
        "auth": {"enabled": True},
        "server": {"cors_origins": [f"http://127.0.0.1:{widget_port}"]},
        "engine": {"default_max_tokens": 24},
        "models": [{"id": DEMO_ID, "path": str(demo_float32_dir)}],
    })
    config = server.config_path
    tokens = {
        "admin": keys_cli(config, "create", "--name", "ops", "--admin").splitlines()[-1],
        "user": keys_cli(config, "create", "--name", "widget", "--models", DEMO_ID,
                         "--rpm", "60", "--visitor-rpm", "30").splitlines()[-1],
    }
    server.start()
    yield Console(server, tokens, widget_port)
    server.stop()


def test_status_needs_an_admin_key_and_shows_no_secret(console: Console) -> None:
    assert console.get("/v1/admin/status").status_code == 401
    refused = console.get("/v1/admin/status", "user")
    assert refused.status_code == 403
    assert refused.json()["error"]["code"] == "permission_denied"

    response = console.get("/v1/admin/status", "admin")
    assert response.status_code == 200
    status = response.json()
    (model,) = status["models"]
    assert model["id"] == DEMO_ID and model["loaded"] is True and model["size_bytes"] > 0
    assert status["memory"]["used_bytes"] == model["size_bytes"]
    assert status["limits"]["breaker"]["state"] == "closed"
    assert status["upstreams"] == [] and status["routes"] == []
    keys = {key["name"]: key for key in status["keys"]}
    assert keys["ops"]["admin"] is True and keys["widget"]["models"] == [DEMO_ID]
    assert keys["ops"]["last_used"] is not None  # this very request
    # The refused calls above are listed by reason, with the key that made them.
    reasons = status["traffic"]["refusals_by_reason"]
    assert reasons.get("invalid_api_key", 0) >= 1 and reasons.get("permission_denied", 0) >= 1
    assert any(r["key_name"] == "widget" and r["status"] == 403
               for r in status["traffic"]["recent_refusals"])
    for token in console.tokens.values():
        secret = token.split("-", 2)[2]
        assert secret not in response.text
    assert "hash" not in response.text


def test_pages_are_open_strict_and_hold_no_secret(console: Console) -> None:
    texts = []
    for path in PAGES:
        page = console.get(path)
        assert page.status_code == 200, path
        assert page.headers["content-type"].startswith("text/html")
        csp = page.headers["content-security-policy"]
        assert "default-src 'self'" in csp and "connect-src 'self'" in csp
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp
        assert "<script>" not in page.text  # every script is a file: no inline code
        texts.append(page.text)
        for asset in re.findall(r'(?:src|href)="([^"]+\.(?:js|css))"', page.text):
            url = httpx.URL(console.server.base_url + path).join(asset)
            fetched = httpx.get(url, timeout=30)
            assert fetched.status_code == 200, url
            assert "content-security-policy" in fetched.headers
            texts.append(fetched.text)
    assert len(texts) >= 2 + 4  # both pages, their scripts and the stylesheet
    for text in texts:
        assert not re.search(r"mgw-[0-9a-f]{16}-", text)
        for token in console.tokens.values():
            assert token.split("-", 2)[2] not in text
    assert console.get("/console/static/../keys.json").status_code == 404
    assert console.get("/console/static/nope.js").status_code == 404


# The table is redrawn on every refresh, so read and click it in one script each (an element
# found first and used later may be gone by then).
def _row_state(driver: Any) -> str | None:
    state: str | None = driver.execute_script(
        "const row = document.querySelector(`tr[data-model='${arguments[0]}']`);"
        "return row ? row.dataset.state : null;", DEMO_ID)
    return state


def _click(driver: Any, action: str) -> None:
    clicked = driver.execute_script(
        "const row = `tr[data-model='${arguments[0]}']`;"
        "const b = document.querySelector(`${row} button.${arguments[1]}`);"
        "if (!b || b.disabled) return false; b.click(); return true;", DEMO_ID, action)
    assert clicked, f"no enabled {action} button"


def _enter_key(driver: Any, token: str) -> None:
    from selenium.webdriver.common.by import By

    driver.find_element(By.ID, "key-input").send_keys(token)
    driver.find_element(By.CSS_SELECTOR, "#key-form button[type=submit]").click()


def _loaded(console: Console) -> bool:
    models = console.get("/v1/models", "admin").json()["data"]
    return bool(next(m for m in models if m["id"] == DEMO_ID)["loaded"])


def test_status_page_behind_caddy_under_a_prefix_unloads_and_loads(
        console: Console, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    with running_caddy(tmp_path, console.server.port, prefix="/gw") as base, \
            chromium("--ignore-certificate-errors") as driver:
        driver.get(base + "/gw/console")
        wait_for(driver, lambda d: "admin key" in d.find_element(By.ID, "message").text,
                 what="the page to ask for a key")
        _enter_key(driver, console.tokens["user"])
        wait_for(driver, lambda d: "not an admin key" in d.find_element(By.ID, "message").text,
                 what="a non-admin key to be refused")
        driver.find_element(By.ID, "key-forget").click()
        _enter_key(driver, console.tokens["admin"])
        wait_for(driver, lambda d: _row_state(d) == "loaded", what="the demo model, loaded")
        screenshot(driver, "status-loaded")
        # The key lives in this tab's sessionStorage only: not in the URL, not in a cookie.
        assert driver.execute_script("return sessionStorage.getItem('mlxgw.key')") == \
            console.tokens["admin"]
        assert driver.execute_script("return document.cookie") == ""
        assert console.tokens["admin"] not in driver.current_url
        assert driver.current_url.startswith(base + "/gw/console")

        _click(driver, "unload")
        wait_for(driver, lambda d: _row_state(d) == "unloaded", timeout=60, what="unloaded")
        assert not _loaded(console)
        screenshot(driver, "status-unloaded")
        _click(driver, "load")
        wait_for(driver, lambda d: _row_state(d) == "loaded", timeout=120, what="loaded again")
        assert _loaded(console)


def test_playground_streams_and_continues_the_conversation(console: Console) -> None:
    from selenium.webdriver.common.by import By

    def answers(driver: Any) -> list[Any]:
        return driver.find_elements(By.CSS_SELECTOR, "#turns li.assistant")

    def ask(driver: Any, text: str, count: int) -> Any:
        driver.find_element(By.ID, "prompt").send_keys(text)
        driver.find_element(By.ID, "send").click()
        wait_for(driver, lambda d: len(answers(d)) == count
                 and answers(d)[-1].get_attribute("data-status") != "streaming",
                 timeout=120, what=f"answer {count}")
        return answers(driver)[-1]

    with chromium() as driver:
        driver.get(console.server.base_url + "/console/chat")
        _enter_key(driver, console.tokens["user"])  # a model-scoped key is enough here
        picker = f'#model option[value="{DEMO_ID}"]'
        wait_for(driver, lambda d: d.find_elements(By.CSS_SELECTOR, picker),
                 what="the model picker")
        driver.find_element(By.ID, "instructions").send_keys("Answer in one short sentence.")
        first = ask(driver, "What is the capital of France?", 1)
        assert first.get_attribute("data-status") in ("completed", "incomplete"), first.text
        assert first.find_element(By.CSS_SELECTOR, ".text").text.strip()
        stats = first.find_element(By.CSS_SELECTOR, ".stats").text
        assert re.search(r"TTFT \d+\.\d\d s · [\d.]+ tok/s · \d+ tokens", stats), stats
        second = ask(driver, "And what about Italy?", 2)
        assert second.get_attribute("data-status") in ("completed", "incomplete"), second.text
        screenshot(driver, "playground")
        first_id = first.get_attribute("data-response-id")
        second_id = second.get_attribute("data-response-id")

    assert first_id and second_id and first_id != second_id
    stored = console.get(f"/v1/responses/{second_id}", "user").json()
    assert stored["previous_response_id"] == first_id
    assert stored["instructions"] == "Answer in one short sentence."


def test_status_cli_prints_the_same_with_the_key_from_the_environment(console: Console) -> None:
    import os
    import subprocess
    import sys

    def run(key: str | None) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if k != "MLXGW_API_KEY"}
        if key is not None:
            env["MLXGW_API_KEY"] = key
        return subprocess.run([sys.executable, "-m", "app.cli", "status", "--url",
                               console.server.base_url], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=60)

    shown = run(console.tokens["admin"])
    assert shown.returncode == 0, shown.stderr
    assert any(line.split()[:2] == [DEMO_ID, "loaded"] for line in shown.stdout.splitlines())
    assert "widget" in shown.stdout and console.tokens["admin"] not in shown.stdout
    refused = run(console.tokens["user"])
    assert refused.returncode == 1 and "admin key" in refused.stderr


def test_example_chat_widget_talks_across_origins_with_a_scoped_key(
        console: Console, tmp_path: Path) -> None:
    """deploy/examples/chat-widget.html as its README section says: served from another
    origin allowed by cors_origins, with the model-scoped, per-visitor-limited key."""
    from selenium.webdriver.common.by import By
    from starlette.staticfiles import StaticFiles

    examples = ROOT / "deploy" / "examples"
    page = (examples / "chat-widget.html").read_text()
    assert 'data-gateway="https://gateway.example.com"' in page
    page = page.replace("https://gateway.example.com", console.server.base_url)
    page = page.replace("mgw-REPLACE-WITH-THE-WIDGET-KEY", console.tokens["user"])
    (tmp_path / "index.html").write_text(page)
    for name in ("chat-widget.js", "chat-widget.css"):
        (tmp_path / name).write_text((examples / name).read_text())

    site = StaticFiles(directory=tmp_path, html=True)
    with serving(site, port=console.widget_port) as port, chromium() as driver:
        driver.get(f"http://127.0.0.1:{port}/")
        box = wait_for(driver, lambda d: d.find_elements(By.CSS_SELECTOR, ".mlxgw-widget input"),
                       what="the widget")[0]
        box.send_keys("What is the capital of France?")
        driver.find_element(By.CSS_SELECTOR, ".mlxgw-widget button").click()
        answer = wait_for(driver, lambda d: d.find_elements(
            By.CSS_SELECTOR, ".mlxgw-widget li.assistant[data-done], .mlxgw-widget li.error"),
            timeout=120, what="the answer")[0]
        screenshot(driver, "chat-widget")
        assert answer.get_attribute("class") == "assistant", answer.text
        assert answer.text.strip() and answer.get_attribute("data-response-id")
