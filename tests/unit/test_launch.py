"""`mlx-gateway launch`: what each client is told, key reuse and scope, and --print masking."""

from __future__ import annotations

import json
import stat
import tomllib
from pathlib import Path

import pytest

from app.cli import main
from app.ops.launch import Target, apply, client_key, describe, plan_for
from app.security.keys import KeyStore
from app.settings import load_settings

TOKEN = "mgw-0123456789abcdef-" + "s" * 43
TARGET = Target("http://127.0.0.1:8000", "qwen3", 32768, 8192, TOKEN)


def test_claude_gets_environment_only(tmp_path: Path) -> None:
    plan = plan_for("claude", TARGET, args=["-p"], home=tmp_path, clients_dir=tmp_path)
    assert plan.argv == ["claude", "-p"] and plan.files == {}
    assert plan.env["ANTHROPIC_BASE_URL"] == "http://127.0.0.1:8000"
    assert plan.env["ANTHROPIC_AUTH_TOKEN"] == TOKEN and plan.env["ANTHROPIC_API_KEY"] == ""
    assert plan.env["ANTHROPIC_DEFAULT_HAIKU_MODEL"] == "qwen3"
    assert plan.defaults["CLAUDE_CODE_AUTO_COMPACT_WINDOW"] == "32768"
    assert plan.defaults["CLAUDE_CODE_MAX_OUTPUT_TOKENS"] == "8192"
    assert int(plan.defaults["CLAUDE_STREAM_IDLE_TIMEOUT_MS"]) > 300_000  # long prefills


def test_claude_compacts_at_the_models_real_window(tmp_path: Path) -> None:
    """Claude Code never takes a compaction window under 100k: the percentage of it at which
    it compacts carries the real size, leaving the answer's room free."""
    def percent(context: int, output: int) -> float:
        plan = plan_for("claude", Target("http://x", "m", context, output, TOKEN), args=[],
                        home=tmp_path, clients_dir=tmp_path)
        assert "DISABLE_AUTO_COMPACT" not in plan.defaults
        return float(plan.defaults["CLAUDE_AUTOCOMPACT_PCT_OVERRIDE"])

    assert percent(32768, 8192) == 24.576  # 24,576 tokens of a 100k window
    assert percent(131072, 32768) == 75.0  # 98,304 of a 131,072 window
    assert percent(262144, 65536) == 98.304  # Claude Code caps its window at 200k


def test_claude_leaves_a_small_window_to_packing(tmp_path: Path) -> None:
    """Below 32k its own ~18k-token prompt refills the window after every compaction, and
    told the real window it refuses on its own count (fixed 13k and 3k buffers): it is told
    neither, and the gateway packs."""
    plan = plan_for("claude", Target("http://x", "m", 8192, 2048, TOKEN), args=[],
                    home=tmp_path, clients_dir=tmp_path)
    assert plan.defaults["DISABLE_AUTO_COMPACT"] == "1"
    assert not {"CLAUDE_AUTOCOMPACT_PCT_OVERRIDE", "CLAUDE_CODE_MAX_CONTEXT_TOKENS"} & {
        *plan.defaults, *plan.env}


def test_claude_compaction_leaves_room_for_the_users_answer_size(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLAUDE_CODE_MAX_OUTPUT_TOKENS", "768")
    plan = plan_for("claude", TARGET, args=[], home=tmp_path, clients_dir=tmp_path)
    assert plan.defaults["CLAUDE_AUTOCOMPACT_PCT_OVERRIDE"] == "32"  # (32768 - 768) of 100k


def test_user_settings_win_over_size_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLAUDE_CODE_MAX_OUTPUT_TOKENS", "100")
    monkeypatch.setenv("ANTHROPIC_BASE_URL", "https://api.anthropic.com")
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-real")
    env = apply(plan_for("claude", TARGET, args=[], home=Path("/nonexistent"),
                         clients_dir=Path("/nonexistent")))
    assert env["CLAUDE_CODE_MAX_OUTPUT_TOKENS"] == "100"
    assert env["CLAUDE_CODE_AUTO_COMPACT_WINDOW"] == "32768"
    assert env["ANTHROPIC_BASE_URL"] == "http://127.0.0.1:8000"  # where to go is not optional
    assert "ANTHROPIC_API_KEY" not in env


def test_codex_profile_file_names_the_variable_not_the_key(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CODEX_HOME", str(tmp_path / "codex"))
    plan = plan_for("codex", TARGET, args=["exec", "hi"], home=tmp_path, clients_dir=tmp_path)
    assert plan.argv == ["codex", "--profile", "mlxgw", "exec", "hi"]
    (path, content), = plan.files.items()
    assert path == tmp_path / "codex" / "mlxgw.config.toml"
    profile = tomllib.loads(content)
    assert profile["model"] == "qwen3" and profile["model_context_window"] == 32768
    assert profile["model_auto_compact_token_limit"] == 32768 - 8192
    assert profile["model_providers"]["mlxgw"] == {
        "name": "mlx-gateway", "base_url": "http://127.0.0.1:8000/v1",
        "env_key": "MLXGW_API_KEY", "wire_api": "responses"}
    assert TOKEN not in content and plan.env == {"MLXGW_API_KEY": TOKEN}


def test_opencode_provider(tmp_path: Path) -> None:
    plan = plan_for("opencode", TARGET, args=[], home=tmp_path, clients_dir=tmp_path)
    (path, content), = plan.files.items()
    assert plan.env["OPENCODE_CONFIG"] == str(path)
    config = json.loads(content)
    provider = config["provider"]["mlxgw"]
    assert provider["options"]["apiKey"] == "{env:MLXGW_API_KEY}"
    assert provider["models"]["qwen3"]["limit"] == {"context": 32768, "output": 8192}
    assert config["model"] == "mlxgw/qwen3" and TOKEN not in content


def test_print_masks_the_key(tmp_path: Path) -> None:
    text = describe(plan_for("claude", TARGET, args=[], home=tmp_path, clients_dir=tmp_path))
    assert TOKEN not in text and "mgw-0123456789abcdef-***" in text
    assert "unset ANTHROPIC_API_KEY" in text and text.splitlines()[-1] == "$ claude"


def test_client_key_is_made_once_scoped_and_kept_private(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(f'config_dir = "{tmp_path / "cfg"}"\n[auth]\nenabled = true\n')
    settings = load_settings(config)
    first = client_key(settings, "codex", "qwen3")
    saved = tmp_path / "cfg" / "clients" / "codex.key"
    assert stat.S_IMODE(saved.stat().st_mode) == 0o600
    assert client_key(settings, "codex", "qwen3") == first  # reused
    record = KeyStore(settings.keys_file).verify(first)
    assert record is not None and record.models == ("qwen3",) and not record.admin
    assert client_key(settings, "codex", "other") != first  # outside the scope: a new key
    KeyStore(settings.keys_file).revoke(record.id)
    assert client_key(settings, "codex", "qwen3") != first  # revoked: a new key


def test_cli_print_and_passthrough(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "config.toml"
    config.write_text(f'config_dir = "{tmp_path / "cfg"}"\n[auth]\nenabled = false\n')
    assert main(["launch", "claude", "--config", str(config), "--print", "--", "-p",
                 "--bare"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[-1] == "$ claude -p --bare"
    assert "ANTHROPIC_AUTH_TOKEN=unused" in out
    with pytest.raises(SystemExit):
        main(["keys", "list", "--config", str(config), "--stray"])
