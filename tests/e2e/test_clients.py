"""The real coding agents against the real gateway, and the whole path with no network at all.

The clients come from npm (`make clients`); each test skips, saying so, where one is missing.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.clients import ROOT, client_path, require_client
from tests.e2e.conftest import DEMO_ID
from tests.e2e.gateway_process import GatewayProcess

pytestmark = pytest.mark.e2e


def _keyed_gateway(workdir: Path, engine: dict[str, object], model: dict[str, object]
                   ) -> Iterator[GatewayProcess]:
    """A gateway with keys on and the demo model at temperature 0 (Claude Code sends no
    temperature: the model's configured default decides)."""
    server = GatewayProcess(workdir, {
        "auth": {"enabled": True}, "engine": engine,
        "models": [{"id": DEMO_ID, "sampling": {"temperature": 0}, **model}],
    })
    # A first admin key, so serve does not mint one on start.
    subprocess.run([sys.executable, "-m", "app.cli", "keys", "create", "--name", "ops",
                    "--admin", "--config", str(server.config_path)],
                   cwd=ROOT, check=True, capture_output=True)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory, demo_float32_dir: Path
          ) -> Iterator[GatewayProcess]:
    yield from _keyed_gateway(tmp_path_factory.mktemp("clients"), {"default_max_tokens": 64},
                              {"path": str(demo_float32_dir)})


def _launch(server: GatewayProcess, client: str, home: Path, *args: str,
            stdin: str | None = None, extra_env: dict[str, str] | None = None,
            timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": client_path(), "HOME": str(home), **(extra_env or {})}
    return subprocess.run(
        [sys.executable, "-m", "app.cli", "launch", client, "--config",
         str(server.config_path), "--url", server.base_url, "--", *args],
        input=stdin, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.timeout(900)
def test_claude_code_answers_through_launch(keyed: GatewayProcess, tmp_path: Path) -> None:
    require_client("claude")
    # --bare --tools "": Claude Code's own prompt without its ~17.8k tokens of tool
    # definitions, which cannot fit the demo model's 8k context.
    done = _launch(keyed, "claude", tmp_path, "-p", "--bare", "--tools", "",
                   stdin="What is the capital of France?")
    assert done.returncode == 0, done.stderr
    assert "Paris" in done.stdout
    key_file = keyed.workdir / "config" / "clients" / "claude.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    token = key_file.read_text().strip()
    assert token not in keyed.logs() and token not in done.stdout + done.stderr
    # The key is reused on the next launch, and it is scoped to the one model.
    listed = subprocess.run([sys.executable, "-m", "app.cli", "keys", "list", "--config",
                             str(keyed.config_path)], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout
    assert listed.count("launch claude") == 1 and DEMO_ID in listed
    requests = [json.loads(line) for line in keyed.logs().splitlines()
                if line.startswith("{") and '"path": "/v1/messages"' in line]
    assert requests and all(r["status"] == 200 for r in requests)
    assert all(r["completion_tokens"] > 0 for r in requests)


# Issue 19: the real clients with their default tools and prompts, which do not fit the demo
# model: Claude Code's first request is ~18k tokens, Codex's ~9k. The window is capped to 6,144
# tokens (above the ~4.9k / ~5.5k that packing can bring them down to) and answers are short,
# because prefilling a packed prompt of that size takes minutes on a loaded 2-core CPU.
SMALL_WINDOW = 6144


@pytest.fixture(scope="module")
def small_window(tmp_path_factory: pytest.TempPathFactory, demo_float32_dir: Path
                 ) -> Iterator[GatewayProcess]:
    yield from _keyed_gateway(tmp_path_factory.mktemp("small-window"),
                              {"default_max_tokens": 16, "overflow": "pack"},
                              {"path": str(demo_float32_dir), "max_context": SMALL_WINDOW})


def _packed_requests(server: GatewayProcess, path: str) -> list[dict[str, object]]:
    lines = [json.loads(line) for line in server.logs().splitlines() if line.startswith("{")]
    return [e for e in lines if e.get("event") == "request" and e.get("path") == path]


@pytest.mark.timeout(1200)
def test_claude_code_with_its_default_tools_answers_through_launch_and_pack(
        small_window: GatewayProcess, tmp_path: Path) -> None:
    require_client("claude")
    # Its own prompt and all its tools; only the answer is kept short (the user's setting wins
    # over what launch suggests), yet long enough to end by itself: an answer cut at
    # max_tokens makes Claude Code ask again ("Output token limit hit. Resume directly").
    done = _launch(small_window, "claude", tmp_path, "-p", "--max-turns", "1",
                   "--output-format", "json", stdin="What is the capital of France?",
                   extra_env={"CLAUDE_CODE_MAX_OUTPUT_TOKENS": "128"}, timeout=1100)
    requests = _packed_requests(small_window, "/v1/messages")
    answered = [r for r in requests if r["status"] == 200 and "completion_tokens" in r]
    assert answered, (done.stderr, requests)
    first = answered[0]
    assert int(str(first["packed_tokens"])) > 10_000  # ~18k tokens of prompt and tools in
    assert int(str(first["prompt_tokens"])) <= SMALL_WINDOW - 128
    assert int(str(first["completion_tokens"])) > 0
    assert all(r["status"] != 499 for r in requests)  # none dropped by the client, sent again
    # The demo model talks until max_tokens; Claude Code then asks it to resume, with a last
    # message of ~1.4k tokens of reminders: packing cuts its middle, so that turn is answered
    # too. Every request it sent was answered:
    assert all(r["status"] == 200 for r in requests), requests
    # and it never refused on its own count of the window ("Prompt is too long", which it
    # did when told the real window). Its run completes; it still reports an error when the
    # demo model has not stopped after three resumes, which is the demo model's doing.
    result = json.loads(done.stdout)
    assert result["terminal_reason"] == "completed", result
    assert not result["is_error"] or "output token maximum" in result["result"], result


@pytest.mark.timeout(1200)
def test_codex_with_its_default_tools_answers_through_launch_and_pack(
        small_window: GatewayProcess, tmp_path: Path) -> None:
    require_client("codex")
    codex_home = tmp_path / "codex-home"
    codex_home.mkdir()
    done = _launch(small_window, "codex", tmp_path, "exec", "--skip-git-repo-check",
                   "What is the capital of France?", extra_env={"CODEX_HOME": str(codex_home)})
    requests = _packed_requests(small_window, "/v1/responses")
    answered = [r for r in requests if r["status"] == 200 and "completion_tokens" in r]
    assert answered, (done.stderr, requests)
    assert int(str(answered[0]["packed_tokens"])) > 0
    assert int(str(answered[0]["prompt_tokens"])) <= SMALL_WINDOW - 16
    profile = (codex_home / "mlxgw.config.toml").read_text()
    assert f"model_context_window = {SMALL_WINDOW}" in profile
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip()


def test_codex_accepts_its_profile(keyed: GatewayProcess, tmp_path: Path) -> None:
    require_client("codex")
    codex_home = tmp_path / "codex-home"
    codex_home.mkdir()
    (codex_home / "config.toml").write_text('# the user\'s own settings stay as they are\n')
    # `debug prompt-input` loads the config and profile and renders the first request
    # without sending it: a config Codex refuses fails here.
    done = _launch(keyed, "codex", tmp_path, "debug", "prompt-input", "hi",
                   extra_env={"CODEX_HOME": str(codex_home)})
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)  # the request's input items, and nothing else on stdout
    assert (codex_home / "config.toml").read_text().startswith("# the user's own")
    profile = (codex_home / "mlxgw.config.toml").read_text()
    assert 'wire_api = "responses"' in profile and "model_context_window = 8192" in profile
    assert "mgw-" not in profile  # the key travels in the environment only


def test_opencode_accepts_its_provider(keyed: GatewayProcess, tmp_path: Path) -> None:
    require_client("opencode")
    done = _launch(keyed, "opencode", tmp_path, "debug", "config")
    assert done.returncode == 0, done.stderr
    resolved = json.loads(done.stdout[done.stdout.index("{"):])
    provider = resolved["provider"]["mlxgw"]
    assert provider["options"]["baseURL"] == keyed.base_url + "/v1"
    assert provider["models"][DEMO_ID]["limit"] == {"context": 8192, "output": 2048}
    assert resolved["model"] == f"mlxgw/{DEMO_ID}"


@pytest.mark.timeout(1200)
def test_everything_works_with_loopback_only(tmp_path: Path, demo_float32_dir: Path) -> None:
    """Gateway, SDKs and Claude Code in a network namespace whose only interface is `lo`."""
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        pytest.skip("needs util-linux unshare and iproute2 ip")
    probe = subprocess.run(["unshare", "--net", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot create a network namespace here: {probe.stderr.decode()}")
    script = (f"ip link set lo up && exec {sys.executable} -m tests.e2e.offline_session "
              f"{tmp_path} {demo_float32_dir}")
    done = subprocess.run(["unshare", "--net", "sh", "-c", script], cwd=ROOT,
                          capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["interfaces"] == ["lo"] and "default" not in result["routes"]
    assert "Paris" in result["anthropic"]
    assert result["openai"]
    claude = result["claude"]
    if shutil.which("claude", path=client_path()) is not None:
        assert claude["code"] == 0 and "Paris" in claude["out"], claude


def test_one_key_never_reuses_another_keys_cached_prefix(keyed: GatewayProcess) -> None:
    """Issue 13, item 7, through the HTTP stack: the prefix cache is per key, so `cached_tokens`
    cannot tell one key what another key sent."""
    import openai

    def key(name: str) -> str:
        return subprocess.run(
            [sys.executable, "-m", "app.cli", "keys", "create", "--name", name, "--config",
             str(keyed.config_path)], cwd=ROOT, capture_output=True, text=True, check=True,
        ).stdout.splitlines()[-1]

    document = " ".join(f"Clause {i}: the tenant keeps the garden tidy." for i in range(40))
    messages = [{"role": "system", "content": document},
                {"role": "user", "content": "Summarize in one word."}]

    def cached(token: str) -> int:
        client = openai.OpenAI(base_url=keyed.base_url + "/v1", api_key=token, max_retries=0)
        reply = client.chat.completions.create(model=DEMO_ID, messages=messages,  # type: ignore[arg-type]
                                               max_tokens=2, temperature=0)
        assert reply.usage is not None and reply.usage.prompt_tokens > 300
        details = reply.usage.prompt_tokens_details
        return details.cached_tokens or 0 if details is not None else 0

    alice, bob = key("alice"), key("bob")
    assert cached(alice) == 0
    assert cached(bob) == 0  # alice's document is not visible to bob
    assert cached(alice) > 300  # alice reuses her own
