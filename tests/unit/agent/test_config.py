"""AgentConfig: precedence of sources, errors naming the setting, node identity."""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path

import msgspec
import pytest

from cloudmon_agent.config import (
    AgentConfig,
    ConfigError,
    default_config_file,
    default_state_dir,
    load_config,
    resolve_node_id,
    sanitize_hostname,
)
from cloudmon_agent.schema import NodeId


def _toml(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "agent.toml"
    p.write_text(text, encoding="utf-8")
    return p


def test_defaults(tmp_path: Path) -> None:
    cfg = load_config(_toml(tmp_path, ""), environ={"XDG_STATE_HOME": str(tmp_path / "st")})
    assert cfg.collector is None
    assert cfg.token is None
    assert cfg.interval == 1.0
    assert cfg.timeout == 5.0
    assert cfg.log_level == "INFO"
    assert cfg.name == socket.gethostname()
    assert cfg.state_dir == tmp_path / "st" / "cloudmon-agent"


def test_precedence_file_then_env_then_flags(tmp_path: Path) -> None:
    path = _toml(
        tmp_path,
        'collector = "http://file:1"\ntoken = "file-token"\ninterval = 5\nname = "from-file"\n'
        'node_id = "file-id"\ntimeout = 7\n',
    )
    env = {"CLOUDMON_COLLECTOR": "http://env:2", "CLOUDMON_INTERVAL": "2.5", "CLOUDMON_NODE_NAME": "from-env"}
    cfg = load_config(path, environ=env, overrides={"interval": "0.5", "token": None})
    assert cfg.collector == "http://env:2"  # env over file
    assert cfg.interval == 0.5  # flag over env over file
    assert cfg.name == "from-env"
    assert cfg.token == "file-token"  # a flag left unset (None) does not override
    assert cfg.node_id == "file-id"
    assert cfg.timeout == 7.0


def test_empty_environment_variable_counts_as_unset(tmp_path: Path) -> None:
    cfg = load_config(_toml(tmp_path, "interval = 3"), environ={"CLOUDMON_INTERVAL": ""})
    assert cfg.interval == 3.0


def test_state_dir_sources(tmp_path: Path) -> None:
    assert default_state_dir({"STATE_DIRECTORY": "/var/lib/a:/var/lib/b"}) == Path("/var/lib/a")
    assert default_state_dir({"XDG_STATE_HOME": "/x"}) == Path("/x/cloudmon-agent")
    assert default_state_dir({"HOME": "/home/me"}) == Path("/home/me/.local/state/cloudmon-agent")
    cfg = load_config(_toml(tmp_path, ""), environ={"CLOUDMON_STATE_DIR": str(tmp_path / "s")})
    assert cfg.state_dir == tmp_path / "s"


def test_default_config_file_from_xdg(tmp_path: Path) -> None:
    if Path("/etc/cloudmon/agent.toml").exists():
        pytest.skip("this machine has a system-wide agent config, which takes precedence")
    env = {"XDG_CONFIG_HOME": str(tmp_path)}
    assert default_config_file(env) is None
    (tmp_path / "cloudmon").mkdir()
    (tmp_path / "cloudmon" / "agent.toml").write_text("interval = 4\n")
    assert default_config_file(env) == tmp_path / "cloudmon" / "agent.toml"
    assert load_config(environ=env).interval == 4.0


@pytest.mark.parametrize(
    ("source", "value", "expected"),
    [
        ("env", "abc", "interval (from $CLOUDMON_INTERVAL): expected a number, got 'abc'"),
        ("env", "0", "interval (from $CLOUDMON_INTERVAL): must be > 0"),
        ("flag", "-1", "interval (from --interval): must be > 0"),
        ("file", "true", "expected a float"),
    ],
)
def test_bad_interval_names_setting_and_source(
    tmp_path: Path, source: str, value: str, expected: str
) -> None:
    path = _toml(tmp_path, f"interval = {value}\n" if source == "file" else "")
    env = {"CLOUDMON_INTERVAL": value} if source == "env" else {}
    flags = {"interval": value} if source == "flag" else {}
    with pytest.raises(ConfigError, match="interval") as err:
        load_config(path, environ=env, overrides=flags)
    assert expected in str(err.value)
    if source == "file":
        assert str(path) in str(err.value)


@pytest.mark.parametrize(
    ("setting", "value", "fragment"),
    [
        ("collector", "collector.example:8470", "must look like http://HOST:PORT"),
        ("collector", "http://host:99999", "invalid port"),
        ("token", "has space", "visible ASCII"),
        ("node_id", "bad id!", "A-Z a-z 0-9"),
        ("log_level", "chatty", "DEBUG, INFO"),
        ("timeout", "0", "timeout"),
        ("spool_max_bytes", "lots", "a size in bytes like 67108864 or 64MiB"),
        ("spool_max_bytes", "1000", "must be >= 65536 bytes"),
        ("retry_max", "0", "must be >= 0.05"),
    ],
)
def test_invalid_values_name_the_setting(tmp_path: Path, setting: str, value: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(_toml(tmp_path, ""), environ={}, overrides={setting: value})
    text = str(err.value)
    assert text.startswith(f"{setting} (from --{setting.replace('_', '-')})")
    assert fragment in text
    if setting == "token":
        assert value not in text  # never echo a token


def test_unknown_and_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown setting\(s\) intervall; known: collector"):
        load_config(_toml(tmp_path, "intervall = 1\n"), environ={})
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml", environ={})
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(_toml(tmp_path, "interval = = 1\n"), environ={})


def test_direct_construction_is_validated_too(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^interval: must be > 0"):
        AgentConfig(interval=0, state_dir=tmp_path)
    cfg = AgentConfig(collector="http://h:1/", log_level="debug", state_dir=tmp_path)
    assert cfg.collector == "http://h:1"
    assert cfg.log_level == "DEBUG"
    assert AgentConfig(token="s3cret", state_dir=tmp_path).redacted()["token"] == "***"


# -- node identity ------------------------------------------------------------


def test_node_id_is_generated_once_and_persisted(tmp_path: Path) -> None:
    cfg = AgentConfig(state_dir=tmp_path / "a")
    first = resolve_node_id(cfg)
    assert first.startswith(sanitize_hostname(socket.gethostname()) + "-")
    assert len(first.rsplit("-", 1)[1]) == 8
    assert int(first.rsplit("-", 1)[1], 16) >= 0
    assert (tmp_path / "a" / "node-id").read_text().strip() == first
    assert resolve_node_id(AgentConfig(state_dir=tmp_path / "a")) == first  # a restart keeps it
    msgspec.convert(first, NodeId)  # matches the wire schema's pattern


def test_distinct_state_dirs_are_distinct_nodes(tmp_path: Path) -> None:
    a = resolve_node_id(AgentConfig(state_dir=tmp_path / "a"))
    b = resolve_node_id(AgentConfig(state_dir=tmp_path / "b"))
    assert a != b


def test_configured_node_id_wins_and_writes_nothing(tmp_path: Path) -> None:
    assert resolve_node_id(AgentConfig(node_id="rack1-n7", state_dir=tmp_path / "s")) == "rack1-n7"
    assert not (tmp_path / "s").exists()


def test_concurrent_first_start_agrees_on_one_id(tmp_path: Path) -> None:
    cfg = AgentConfig(state_dir=tmp_path / "shared")
    results: list[str] = []
    threads = [threading.Thread(target=lambda: results.append(resolve_node_id(cfg))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 1
    assert sorted(os.listdir(tmp_path / "shared")) == ["node-id"]  # no temp files left


def test_corrupt_or_unwritable_node_id_errors_say_how_to_fix(tmp_path: Path) -> None:
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "node-id").write_text("not a valid id!\n")
    with pytest.raises(ConfigError, match="not a valid node id; fix or delete the file"):
        resolve_node_id(AgentConfig(state_dir=tmp_path / "bad"))
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match=r"state_dir: cannot create .* --state-dir, or set --node-id"):
        resolve_node_id(AgentConfig(state_dir=tmp_path / "file" / "sub"))


@pytest.mark.parametrize(
    ("hostname", "expected"),
    [
        ("web-01.example.com", "web-01.example.com"),
        ("my host (2)", "my-host-2"),
        ("***", "node"),
        ("é", "node"),
    ],
)
def test_sanitize_hostname(hostname: str, expected: str) -> None:
    assert sanitize_hostname(hostname) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("67108864", 64 << 20),
        ("64MiB", 64 << 20),
        ("64M", 64 << 20),
        ("512KiB", 512 << 10),
        ("1 GiB", 1 << 30),
    ],
)
def test_spool_size_accepts_bytes_and_binary_units(tmp_path: Path, raw: str, expected: int) -> None:
    assert (
        load_config(_toml(tmp_path, ""), environ={"CLOUDMON_SPOOL_MAX_BYTES": raw}).spool_max_bytes
        == expected
    )


def test_spool_and_retry_settings_from_file_env_and_flags(tmp_path: Path) -> None:
    path = _toml(tmp_path, "spool_max_bytes = 1048576\nretry_max = 5.0\n")
    cfg = load_config(path, environ={})
    assert (cfg.spool_max_bytes, cfg.retry_max) == (1 << 20, 5.0)
    cfg = load_config(path, environ={"CLOUDMON_RETRY_MAX": "2"}, overrides={"spool_max_bytes": "2MiB"})
    assert (cfg.spool_max_bytes, cfg.retry_max) == (2 << 20, 2.0)
    assert load_config(_toml(tmp_path, ""), environ={}).spool_max_bytes == 64 << 20
    with pytest.raises(ConfigError, match=r"spool_max_bytes .*expected a int"):
        load_config(_toml(tmp_path, "spool_max_bytes = 1.5\n"), environ={})


def test_collector_switch_defaults(tmp_path: Path) -> None:
    cfg = load_config(_toml(tmp_path, ""), environ={})
    assert (cfg.libvirt_uri, cfg.top_n, cfg.processes_every) == ("qemu:///system", 5, 5.0)
    assert (cfg.containers, cfg.gpus, cfg.budget_ms) == (True, True, 1.0)


def test_collector_switches_file_then_env_then_flags(tmp_path: Path) -> None:
    path = _toml(
        tmp_path,
        'libvirt_uri = "qemu+ssh://h/system"\ntop_n = 3\nprocesses_every = 10\n'
        "containers = false\ngpus = false\nbudget_ms = 2.5\n",
    )
    cfg = load_config(path, environ={})
    assert (cfg.libvirt_uri, cfg.top_n, cfg.processes_every) == ("qemu+ssh://h/system", 3, 10.0)
    assert (cfg.containers, cfg.gpus, cfg.budget_ms) == (False, False, 2.5)
    env = {
        "CLOUDMON_LIBVIRT_URI": "test:///default",
        "CLOUDMON_TOP_N": "7",
        "CLOUDMON_PROCESSES_EVERY": "2",
        "CLOUDMON_CONTAINERS": "yes",
        "CLOUDMON_GPUS": "1",
        "CLOUDMON_BUDGET_MS": "0",
    }
    cfg = load_config(path, environ=env)
    assert (cfg.libvirt_uri, cfg.top_n, cfg.processes_every) == ("test:///default", 7, 2.0)
    assert (cfg.containers, cfg.gpus, cfg.budget_ms) == (True, True, 0.0)
    flags: dict[str, object] = {
        "libvirt_uri": "",
        "top_n": "0",
        "processes_every": "1.5",
        "containers": False,
        "gpus": None,  # a flag not given does not override
        "budget_ms": "0.5",
    }
    cfg = load_config(path, environ=env, overrides=flags)
    assert (cfg.libvirt_uri, cfg.top_n, cfg.processes_every) == ("", 0, 1.5)
    assert (cfg.containers, cfg.gpus, cfg.budget_ms) == (False, True, 0.5)


@pytest.mark.parametrize("off", ["none", "off", "NONE"])
def test_libvirt_uri_none_turns_vms_off_from_the_environment(tmp_path: Path, off: str) -> None:
    # An empty variable counts as unset, so the environment says "none".
    assert load_config(_toml(tmp_path, ""), environ={"CLOUDMON_LIBVIRT_URI": off}).libvirt_uri == ""


@pytest.mark.parametrize(
    ("setting", "value", "fragment"),
    [
        ("CLOUDMON_TOP_N", "-1", "top_n (from $CLOUDMON_TOP_N): must be 0"),
        ("CLOUDMON_TOP_N", "5MiB", "top_n (from $CLOUDMON_TOP_N): expected a whole number"),
        (
            "CLOUDMON_PROCESSES_EVERY",
            "soon",
            "processes_every (from $CLOUDMON_PROCESSES_EVERY): expected a number",
        ),
        ("CLOUDMON_CONTAINERS", "maybe", "containers (from $CLOUDMON_CONTAINERS): expected true or false"),
        ("CLOUDMON_GPUS", "2", "gpus (from $CLOUDMON_GPUS): expected true or false"),
        ("CLOUDMON_BUDGET_MS", "-1", "budget_ms (from $CLOUDMON_BUDGET_MS): must be 0"),
        (
            "CLOUDMON_LIBVIRT_URI",
            "not a uri",
            "libvirt_uri (from $CLOUDMON_LIBVIRT_URI): must be a libvirt URI",
        ),
    ],
)
def test_bad_collector_switches_name_the_setting(
    tmp_path: Path, setting: str, value: str, fragment: str
) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(_toml(tmp_path, ""), environ={setting: value})
    assert fragment in str(err.value)


def test_collector_switches_are_checked_on_direct_construction(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="top_n: must be 0"):
        AgentConfig(state_dir=tmp_path, top_n=101)
    with pytest.raises(ConfigError, match="gpus: must be true or false"):
        AgentConfig(state_dir=tmp_path, gpus="yes")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"containers .*expected a bool"):
        load_config(_toml(tmp_path, "containers = 1\n"), environ={})
