from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from pydantic import BaseModel

from app.settings import ConfigError, Settings, load_settings, parse_bytes

ROOT = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def test_precedence_defaults_file_env_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_settings().server.port == 8000
    config = write(tmp_path, "[server]\nport = 9001\nhost = '0.0.0.0'\n")
    assert load_settings(config).server.port == 9001
    monkeypatch.setenv("MLXGW_SERVER__PORT", "9002")
    from_env = load_settings(config)
    assert from_env.server.port == 9002 and from_env.server.host == "0.0.0.0"
    from_cli = load_settings(config, server={"port": 9003})
    assert from_cli.server.port == 9003 and from_cli.server.host == "0.0.0.0"


def test_config_path_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLXGW_CONFIG", str(write(tmp_path, "[limits]\nper_ip_rpm = 7\n")))
    assert load_settings().limits.per_ip_rpm == 7


def test_models_tables(tmp_path: Path) -> None:
    config = write(tmp_path, """
[[models]]
id = "org/model-a"
path = "~/models/a"
aliases = ["a"]
pinned = true
""")
    (model,) = load_settings(config).models
    assert model.id == "org/model-a" and model.aliases == ["a"] and model.pinned


def test_every_problem_is_one_readable_line(tmp_path: Path) -> None:
    config = write(tmp_path, """
[server]
port = "eighty"
bogus = 1
[engine]
prompt_cache_bytes = "lots"
[[models]]
id = "../escape"
path = "/x"
""")
    with pytest.raises(ConfigError) as caught:
        load_settings(config)
    lines = str(caught.value).splitlines()
    assert len(lines) == 4
    assert all(line.startswith("config error: ") for line in lines)
    joined = "\n".join(lines)
    for where in ("server.port", "server.bogus", "engine.prompt_cache_bytes", "models.0.id"):
        assert where in joined


def test_missing_file_and_bad_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.toml")
    with pytest.raises(ConfigError):
        load_settings(write(tmp_path, "[server\nport = 1"))


def test_cli_exits_2_on_bad_config(tmp_path: Path) -> None:
    config = write(tmp_path, "[server]\nport = -1\n")
    result = subprocess.run(
        [sys.executable, "-m", "app.cli", "serve", "--config", str(config)],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.strip().startswith("config error: server.port")


def test_sizes() -> None:
    assert parse_bytes("512MB") == 512_000_000
    assert parse_bytes("2GiB") == 2 * 2**30
    assert parse_bytes(123) == 123
    with pytest.raises(ValueError):
        parse_bytes("12 parsecs")


def test_example_config_documents_every_key_with_its_default() -> None:
    example = tomllib.loads((ROOT / "config.example.toml").read_text())
    defaults = Settings()
    loaded = load_settings(ROOT / "config.example.toml")
    for name, field in Settings.model_fields.items():
        if name in ("models", "upstreams", "routes"):  # tables, documented in comments
            continue
        assert name in example, f"config.example.toml lacks {name}"
        value = getattr(defaults, name)
        if isinstance(value, BaseModel):
            assert set(example[name]) | {k for k in type(value).model_fields
                                         if getattr(value, k) is None} == set(
                type(value).model_fields), name
            assert getattr(loaded, name) == value, name
        else:
            assert getattr(loaded, name) == value, name
        del field
