"""Configuration: precedence of file < environment < flags, errors, token file."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from cloudmon.config import Config, ConfigError, ensure_token, is_loopback_host, load_config


def test_defaults_listen_on_loopback(tmp_path: Path) -> None:
    config = load_config(None, environ={}, overrides={"data_dir": str(tmp_path)})
    assert config.listen_host == "127.0.0.1"
    assert config.is_loopback
    assert config.store_url == f"sqlite:///{tmp_path / 'telemetry.db'}"


def test_file_then_env_then_flags(tmp_path: Path) -> None:
    file = tmp_path / "cloudmon.toml"
    file.write_text('listen_port = 9001\nnode_timeout = 7.5\ntoken = "from-file"\n', encoding="utf-8")
    env = {"CLOUDMON_LISTEN_PORT": "9002", "CLOUDMON_TOKEN": "from-env"}
    config = load_config(file, environ=env, overrides={"token": "from-flag", "listen_host": None})
    assert config.listen_port == 9002
    assert config.node_timeout == 7.5
    assert config.token == "from-flag"


def test_unknown_setting_is_named(tmp_path: Path) -> None:
    file = tmp_path / "cloudmon.toml"
    file.write_text("listen_prot = 1\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="listen_prot"):
        load_config(file, environ={})


def test_bad_env_value_is_named() -> None:
    with pytest.raises(ConfigError, match="listen_port"):
        load_config(None, environ={"CLOUDMON_LISTEN_PORT": "eighty"})


def test_out_of_range_port() -> None:
    with pytest.raises(ConfigError, match="listen_port"):
        load_config(None, environ={"CLOUDMON_LISTEN_PORT": "70000"})


def test_missing_explicit_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml", environ={})


def test_broken_toml_names_the_file(tmp_path: Path) -> None:
    file = tmp_path / "cloudmon.toml"
    file.write_text("listen_port = = 1\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=str(file)):
        load_config(file, environ={})


def test_token_is_generated_once_with_private_mode(tmp_path: Path) -> None:
    config = Config(data_dir=str(tmp_path))
    first = ensure_token(config)
    assert len(first) >= 24
    assert ensure_token(config) == first
    mode = stat.S_IMODE((tmp_path / "token").stat().st_mode)
    assert mode == 0o600
    assert ensure_token(Config(data_dir=str(tmp_path), token="explicit")) == "explicit"


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("127.3.4.5", True), ("::1", True), ("localhost", True), ("0.0.0.0", False),
     ("192.0.2.1", False), ("example.org", False)],
)
def test_loopback_detection(host: str, loopback: bool) -> None:
    assert is_loopback_host(host) is loopback
